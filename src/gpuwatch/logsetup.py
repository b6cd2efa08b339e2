"""Logging: a rotated file under state_dir and stderr, with secrets masked in every record."""

from __future__ import annotations

import logging
import logging.handlers
import re
import sys
from collections.abc import Iterable
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_HOOK_TOKEN = re.compile(r"(/hook/)([A-Za-z0-9_\-]{4})[A-Za-z0-9_\-]+")


def mask_secrets(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret and len(secret) >= 3:
            text = text.replace(secret, "***")
    return _HOOK_TOKEN.sub(r"\1\2…(masked)", text)


class SecretFilter(logging.Filter):
    """Replaces every known secret, and any webhook token, by a mask before a record is written."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = tuple(s for s in secrets if s)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_secrets(message, self.secrets)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask_secrets(record.exc_text, self.secrets)
        if masked != message:
            record.msg, record.args = masked, None
        return True


def setup_logging(
    state_dir: Path | None,
    level: str = "INFO",
    stderr_level: str = "WARNING",
    secrets: Iterable[str] = (),
) -> Path | None:
    """Log to ``<state_dir>/gpuwatch.log`` (rotated, 5 x 5 MB) and to stderr. Returns the file."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    secret_filter = SecretFilter(secrets)
    formatter = logging.Formatter(LOG_FORMAT)
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setLevel(stderr_level)
    stderr.setFormatter(logging.Formatter("gpuwatch: %(levelname)s: %(message)s"))
    stderr.addFilter(secret_filter)
    root.addHandler(stderr)
    log_file = None
    if state_dir is not None:
        state_dir.mkdir(parents=True, exist_ok=True)
        log_file = state_dir / "gpuwatch.log"
        handler = logging.handlers.RotatingFileHandler(log_file, maxBytes=5_000_000, backupCount=5, encoding="utf-8")
        handler.setLevel(level)
        handler.setFormatter(formatter)
        handler.addFilter(secret_filter)
        root.addHandler(handler)
    root.setLevel(min(logging.getLevelName(level), logging.getLevelName(stderr_level)))
    # paramiko logs every failed connection with a traceback before raising the exception that
    # gpuwatch classifies and reports itself: keep only its critical messages.
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    return log_file
