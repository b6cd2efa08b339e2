"""Logging: a rotated file under state_dir and stderr, with secrets masked in every record.

The log files are 0600 whatever the umask (they name users, hosts and processes). A log file
that cannot be written (a full disk) is said once on stderr, not with a traceback per record;
logging to it resumes by itself when it can.
"""

from __future__ import annotations

import io
import logging
import logging.handlers
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .statedir import ensure_state_dir, make_private, open_private, os_error

_BACKUPS = 5
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_HOOK_TOKEN = re.compile(r"(/hook/)([A-Za-z0-9_\-]{4})[A-Za-z0-9_\-]+")
# DingTalk's access_token and WeCom's key in a query; a Slack webhook's path
_QUERY_TOKEN = re.compile(r"([?&](?:access_token|key)=)([A-Za-z0-9_\-]{4})[A-Za-z0-9_\-]+")
_SLACK_PATH = re.compile(r"(/services/)[A-Za-z0-9]+/[A-Za-z0-9]+/[A-Za-z0-9]+")


def mask_secrets(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret and len(secret) >= 3:
            text = text.replace(secret, "***")
    text = _QUERY_TOKEN.sub(r"\1\2…(masked)", text)
    text = _SLACK_PATH.sub(r"\1…(masked)", text)
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


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A rotated log whose files are created 0600, and that complains once, in one line, when
    it cannot write."""

    def __init__(self, filename: Path, **kwargs: Any) -> None:
        self._failing = False  # the last write failed (said once on stderr)
        self._erred = False
        super().__init__(filename, **kwargs)

    def _open(self) -> io.TextIOWrapper:
        fd = open_private(Path(self.baseFilename), os.O_WRONLY | os.O_APPEND)
        return open(fd, "a", encoding=self.encoding, errors=self.errors)

    def emit(self, record: logging.LogRecord) -> None:
        self._erred = False
        super().emit(record)  # calls handleError on a failure
        if self._erred:
            self._failing = True
        elif self._failing:
            self._failing = False
            sys.stderr.write(f"gpuwatch: the log file {self.baseFilename} can be written again\n")

    def handleError(self, record: logging.LogRecord) -> None:
        self._erred = True
        if self._failing:
            return
        exc = sys.exc_info()[1]
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        sys.stderr.write(
            f"gpuwatch: cannot write the log file {self.baseFilename}: {why} (said once; it resumes when it can)\n"
        )


def setup_logging(
    state_dir: Path | None,
    level: str = "INFO",
    stderr_level: str = "WARNING",
    secrets: Iterable[str] = (),
) -> Path | None:
    """Log to ``<state_dir>/gpuwatch.log`` (rotated, 5 x 5 MB) and to stderr. Returns the file.

    Raises :class:`StateError` (one line: what, where) when the directory or file cannot be made."""
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
        ensure_state_dir(state_dir)
        log_file = state_dir / "gpuwatch.log"
        for n in range(1, _BACKUPS + 1):
            make_private(Path(f"{log_file}.{n}"))  # an older gpuwatch rotated them with the umask's mode
        try:
            handler = PrivateRotatingFileHandler(log_file, maxBytes=5_000_000, backupCount=_BACKUPS, encoding="utf-8")
        except OSError as exc:
            raise os_error(exc, state_dir, f"open {log_file.name}") from None
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
