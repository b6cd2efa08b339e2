"""Logging: a rotated file under state_dir and stderr, with secrets masked in every record.

The log files are 0600 whatever the umask (they name users, hosts and processes). A log file
that cannot be written (a full disk) is said once on stderr, not with a traceback per record;
logging to it resumes by itself when it can. Commands that only read (status, check, alerts) go on
without the file when it cannot be opened at all (a user who may not write the state directory).

Each line of the file starts with its time in ISO 8601 with the offset of this machine's zone
(``2026-11-22T10:00:00.123+08:00``). Normal events are INFO; stderr shows warnings and errors,
and the few INFO lines logged with ``extra=ANNOUNCE`` (the daemon starting, reloading,
stopping), so a journal shows that the daemon runs without every poll in it.
"""

from __future__ import annotations

import io
import logging
import logging.handlers
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .statedir import StateError, ensure_state_dir, make_private, open_private, os_error

_BACKUPS = 5
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# ``log.info(..., extra=ANNOUNCE)``: an INFO line stderr shows too (start, reload, stop).
ANNOUNCE: Mapping[str, object] = {"announce": True}
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


class ZonedFormatter(logging.Formatter):
    """Times in ISO 8601 with this machine's offset, to the millisecond: a log line read in
    another zone, or next to another machine's logs, says when it happened."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        when = datetime.fromtimestamp(record.created, timezone.utc).astimezone()
        return when.isoformat(timespec="milliseconds")


class _StderrFilter(logging.Filter):
    """Records at ``level`` or above, and INFO records flagged ``announce``."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level or bool(getattr(record, "announce", False))


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


def _file_handler(state_dir: Path) -> PrivateRotatingFileHandler:
    ensure_state_dir(state_dir)
    log_file = state_dir / "gpuwatch.log"
    try:
        for n in range(1, _BACKUPS + 1):
            make_private(Path(f"{log_file}.{n}"))  # an older gpuwatch rotated them with the umask's mode
        return PrivateRotatingFileHandler(log_file, maxBytes=5_000_000, backupCount=_BACKUPS, encoding="utf-8")
    except OSError as exc:
        raise os_error(exc, state_dir, f"open {log_file.name}") from None


def setup_logging(
    state_dir: Path | None,
    level: str = "INFO",
    stderr_level: str = "WARNING",
    secrets: Iterable[str] = (),
    *,
    on_file_error: Callable[[StateError], None] | None = None,
) -> Path | None:
    """Log to ``<state_dir>/gpuwatch.log`` (rotated, 5 x 5 MB) and to stderr. Returns the file.

    Raises :class:`StateError` (one line: what, where) when the directory or file cannot be made;
    with ``on_file_error`` (commands that only read: status, check, alerts) hands it the error
    instead, logs to stderr only and returns None, so that a user who may not write the state
    directory can still run them."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    secret_filter = SecretFilter(secrets)
    formatter = ZonedFormatter(LOG_FORMAT)
    stderr = logging.StreamHandler(sys.stderr)
    stderr_no = logging.getLevelName(stderr_level)
    stderr.setLevel(min(stderr_no, logging.INFO))
    stderr.addFilter(_StderrFilter(stderr_no))
    stderr.setFormatter(logging.Formatter("gpuwatch: %(levelname)s: %(message)s"))
    stderr.addFilter(secret_filter)
    root.addHandler(stderr)
    log_file = None
    if state_dir is not None:
        try:
            handler = _file_handler(state_dir)
        except StateError as exc:
            if on_file_error is None:
                raise
            on_file_error(exc)
        else:
            log_file = Path(handler.baseFilename)
            handler.setLevel(level)
            handler.setFormatter(formatter)
            handler.addFilter(secret_filter)
            root.addHandler(handler)
    root.setLevel(min(logging.getLevelName(level), stderr_no, logging.INFO))
    # paramiko logs every failed connection with a traceback before raising the exception that
    # gpuwatch classifies and reports itself: keep only its critical messages.
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    return log_file
