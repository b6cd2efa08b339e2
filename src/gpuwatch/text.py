"""One place for the small words every output shares: durations, counts, times, the unknown value.

Pure, and importing nothing of gpuwatch, so every other module may use it. The conventions:

- the unknown value is ``N/A`` wherever people read (``null`` in JSON): never ``?``, never a unit
  after it (``N/A``, not ``N/A MiB``);
- durations read ``1m30s``, ``3d2h`` (the two largest units) and parse from ``30s``, ``5m``, ``1h30m``
  or plain seconds;
- counts agree with their number: ``1 host``, ``3 GPUs``, ``2 processes``;
- times for people are the local time of the machine running gpuwatch, with its zone
  (``2026-11-22 10:00 CST``; set ``TZ`` to change it); times for programs are ISO 8601 with their
  offset (``2026-11-22T10:00:00+00:00``).
"""

from __future__ import annotations

import re
from datetime import datetime, timezone, tzinfo

UNKNOWN = "N/A"


def number(value: float | None, suffix: str = "") -> str:
    """A reading for people: ``59°C`` with ``suffix="°C"``, ``0.5``, or ``N/A`` (no suffix) when unknown."""
    if value is None:
        return UNKNOWN
    if isinstance(value, float):
        return f"{value:g}{suffix}"
    return f"{value}{suffix}"


def plural(count: int, word: str) -> str:
    """``1 host``, ``2 hosts``, ``1 GPU``, ``3 GPUs``, ``2 processes``, ``1 part``."""
    if count == 1:
        return f"{count} {word}"
    return f"{count} {word}es" if word.endswith(("s", "sh", "ch")) else f"{count} {word}s"


# ---------------------------------------------------------------- durations

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: object) -> float:
    """``30s``, ``5m``, ``1h``, ``2d``, ``1h30m`` or plain seconds -> seconds.

    Raises ValueError saying what is wrong (the caller adds where: a config key, a flag).
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as 30s, 5m, 1h, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"a duration cannot be negative ({value})")
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        if re.fullmatch(r"\d+(\.\d+)?", text):
            return float(text)
        if text and re.fullmatch(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d|w))+", text):
            return sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_RE.findall(text))
    raise ValueError(f"{value!r} is not a duration; use a number of seconds or 30s, 5m, 1h, 2d")


def format_duration(seconds: float | None) -> str:
    """Seconds -> the shortest readable form: ``90`` -> ``1m30s``, ``86400`` -> ``1d``; None -> ``N/A``."""
    if seconds is None:
        return UNKNOWN
    total = round(seconds)
    if total < 60:
        return f"{total}s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        n, total = divmod(total, size)
        if n:
            parts.append(f"{n}{unit}")
    return "".join(parts[:2])


# ---------------------------------------------------------------- times


def _aware(when: datetime | float, tz: tzinfo | None) -> datetime:
    if isinstance(when, datetime):
        return when.astimezone(tz)
    return datetime.fromtimestamp(when, timezone.utc).astimezone(tz)


def local_time(when: datetime | float | None, tz: tzinfo | None = None) -> str:
    """A moment for people: ``2026-11-22 10:00 CST``, in this machine's zone unless ``tz`` is given.

    ``when`` is an aware datetime or epoch seconds; None -> ``N/A``.
    """
    if when is None:
        return UNKNOWN
    return _aware(when, tz).strftime("%Y-%m-%d %H:%M %Z").strip()


def iso_time(when: datetime | float) -> str:
    """A moment for programs: ISO 8601 to the second with its offset (epoch seconds are given in UTC)."""
    if isinstance(when, datetime):
        return when.isoformat(timespec="seconds")
    return datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------- a number in its unit

# Units that count things: the word for one of them.
_COUNTED = {"GPUs": "GPU", "hosts": "host", "polls": "poll", "failed polls": "failed poll", "processes": "process"}


def quantity(value: float | None, unit: str) -> str:
    """A reading in its unit, for people: ``3 GPUs``, ``1 poll``, ``3d19m`` (unit ``s``), ``59°C``,
    ``9%``, ``1235 MiB``; ``N/A`` when unknown."""
    if value is None:
        return UNKNOWN
    if unit == "s":
        return format_duration(value)
    if unit in _COUNTED:
        return plural(int(value), _COUNTED[unit])
    if unit in ("%", "°C", "C", ""):
        return number(value, unit)
    return number(value, f" {unit}")
