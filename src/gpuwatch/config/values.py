"""The value readers every config section uses, and the one :class:`ConfigError` that names the key path.

This is the bottom of the config: it imports nothing of gpuwatch but :mod:`gpuwatch.text` (pure), so
the rule families and the channels read their own sections with it, and :mod:`gpuwatch.config.load`
(which imports them) assembles the whole config above them. Every reader takes the value and its key
path (``alerts.idle_gpu.for``) and returns the value checked, or raises a ConfigError naming the path.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .. import text
from ..text import QUOTE_LIMIT, quote


class ConfigError(Exception):
    """A config problem, said once, with the file and key path. The CLI exits 2 on it."""


def from_env(name: str | None, fallback: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """A secret: the environment variable ``name`` when it is set and not empty, else ``fallback``."""
    env = os.environ if environ is None else environ
    if name and env.get(name):
        return env[name]
    return fallback


def parse_duration(value: object, path: str = "duration") -> float:
    """``30s``, ``5m``, ``1h``, ``2d``, ``1h30m`` or plain seconds -> seconds (text.parse_duration),
    or a ConfigError naming ``path``."""
    try:
        return text.parse_duration(value)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def type_name(value: object) -> str:
    """A YAML value's kind in words (``a mapping``, ``a list``, ``true/false``) for error texts."""
    return {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        int: "a number",
        float: "a number",
        bool: "true/false",
        type(None): "empty",
    }.get(type(value), type(value).__name__)


# While :func:`recording_keys` is active a document: each section checked -> the keys it accepts.
_CHECKED: contextvars.ContextVar[dict[str, tuple[str, ...]] | None] = contextvars.ContextVar(
    "gpuwatch_checked_keys", default=None
)


def check_keys(raw: Mapping[str, Any], allowed: tuple[str, ...], path: str) -> None:
    """Every key of the section at ``path`` is one of ``allowed``; else a ConfigError that names the
    unknown key and the closest allowed one ("did you mean"), or lists them."""
    checked = _CHECKED.get()
    if checked is not None:
        checked[path] = tuple(allowed)
    for key in raw:
        if not isinstance(key, str):
            raise ConfigError(f"{path or 'top level'}: key {quote(key)} must be a string")
        if key not in allowed:
            shown = key if len(key) <= QUOTE_LIMIT else quote(key)
            where = f"{path}.{shown}" if path else shown
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6) if len(key) <= QUOTE_LIMIT else []
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(allowed)}"
            raise ConfigError(f"{where}: unknown key{hint}")


def mapping(value: object, path: str) -> Mapping[str, Any]:
    """A mapping (``key: value`` lines); an empty section (``None``) reads as ``{}``."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path}: expected a mapping (key: value lines), got {type_name(value)}")
    return value


def string(value: object, path: str) -> str:
    """A non-empty string (a number is taken as its text), stripped."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(f"{path}: expected a string, got {type_name(value)}")
    stripped = str(value).strip()
    if not stripped:
        raise ConfigError(f"{path}: must not be empty")
    return stripped


def integer(value: object, path: str, low: int | None = None, high: int | None = None) -> int:
    """A whole number (digits in a string too) within ``low``..``high`` (inclusive) where given."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str) and re.fullmatch(r"[0-9]{1,30}", value.strip()):
            value = int(value.strip())
        else:
            raise ConfigError(f"{path}: expected a whole number, got {quote(value)}")
    assert isinstance(value, int)
    if low is not None and value < low:
        limit = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ConfigError(f"{path}: {quote(value)} is out of range; it must be {limit}")
    if high is not None and value > high:
        limit = f"between {low} and {high}" if low is not None else f"at most {high}"
        raise ConfigError(f"{path}: {quote(value)} is out of range; it must be {limit}")
    return value


def boolean(value: object, path: str) -> bool:
    """``true`` or ``false`` (YAML's own, not the strings)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{path}: expected true or false, got {quote(value)}")
    return value


def choice(value: object, path: str, choices: tuple[str, ...]) -> str:
    """One of ``choices``."""
    chosen = string(value, path)
    if chosen not in choices:
        raise ConfigError(f"{path}: {quote(chosen)} is not one of {', '.join(choices)}")
    return chosen


def positive_duration(value: object, path: str) -> float:
    """A duration (:func:`parse_duration`) longer than 0s, in seconds."""
    seconds = parse_duration(value, path)
    if seconds <= 0:
        raise ConfigError(f"{path}: must be longer than 0s")
    return seconds


def optional_int(value: object, path: str, low: int = 0) -> int | None:
    """A whole number of at least ``low``, or ``None`` for an empty value or ``false`` (switched off)."""
    if value is None or value is False:
        return None
    return integer(value, path, low)


def expand_path(value: str, base: Path) -> str:
    """A file path with ``~`` expanded, made absolute against ``base`` (the config file's folder)."""
    p = Path(os.path.expanduser(value))
    return str(p if p.is_absolute() else base / p)


def string_map(value: object, path: str) -> dict[str, str]:
    """A mapping of strings to strings (``mentions``, ``headers``), each value's path naming its key."""
    return {string(k, path): string(v, f"{path}.{k}") for k, v in mapping(value, path).items()}


def http_url(value: object, path: str) -> str:
    """An ``http(s)://`` address (a webhook), its first characters quoted when it is not one."""
    url = string(value, path)
    if not re.match(r"https?://", url):
        raise ConfigError(f"{path}: expected an http(s):// webhook URL, got {url[:40]!r}")
    return url


@contextlib.contextmanager
def recording_keys() -> Iterator[dict[str, tuple[str, ...]]]:
    """While inside: every :func:`check_keys` call records its section's path and accepted keys
    in the dict this yields (see :func:`gpuwatch.config.load.accepted_keys`)."""
    checked: dict[str, tuple[str, ...]] = {}
    token = _CHECKED.set(checked)
    try:
        yield checked
    finally:
        _CHECKED.reset(token)
