"""One place for the small words every output shares: durations, counts, times, the unknown value.

Pure (but for :func:`command_name`, which looks at the file system and PATH when called), and
importing nothing of gpuwatch, so every other module may use it. The conventions:

- the unknown value is ``N/A`` wherever people read (``null`` in JSON): never ``?``, never a unit
  after it (``N/A``, not ``N/A MiB``);
- durations read ``1m30s``, ``3d2h`` (the two largest units) and parse from ``30s``, ``5m``, ``1h30m``
  or plain seconds;
- counts agree with their number: ``1 host``, ``3 GPUs``, ``2 processes``;
- colour (:func:`paint`) is added after a column is padded, only where :func:`wants_color` says
  so: never when ``NO_COLOR`` is set (https://no-color.org) unless asked for on the command line;
- times for people are the local time of the machine running gpuwatch, with its zone
  (``2026-11-22 10:00 CST``; set ``TZ`` to change it; to the second where two moments within a
  minute must read differently, such as when an alert started); times for programs are ISO 8601 with their
  offset (``2026-11-22T10:00:00+00:00``).
"""

from __future__ import annotations

import math
import os
import re
import reprlib
import shlex
import shutil
import sys
from collections.abc import Callable, Mapping
from datetime import datetime, timezone, tzinfo

UNKNOWN = "N/A"


def number(value: float | None, suffix: str = "") -> str:
    """A reading for people: ``59°C`` with ``suffix="°C"``, ``0.5``, or ``N/A`` (no suffix) when unknown."""
    if value is None:
        return UNKNOWN
    if isinstance(value, float):
        return f"{value:g}{suffix}"
    return f"{value}{suffix}"


def size_kib(kib: float | None) -> str:
    """A size given in KiB, for people: ``512 KiB``, ``3.2 MiB``, ``23.5 GiB``, ``1.8 TiB``; ``N/A``."""
    if kib is None:
        return UNKNOWN
    value = float(kib)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024 or unit == "PiB":
            return f"{value:.0f} {unit}" if unit == "KiB" or value >= 100 else f"{value:.1f} {unit}"
        value /= 1024
    return UNKNOWN  # unreachable


def plural(count: int, word: str) -> str:
    """``1 host``, ``2 hosts``, ``1 GPU``, ``3 GPUs``, ``2 processes``, ``1 part``."""
    if count == 1:
        return f"{count} {word}"
    return f"{count} {word}es" if word.endswith(("s", "sh", "ch")) else f"{count} {word}s"


# ---------------------------------------------------------------- durations

_DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d|w)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


# ---------------------------------------------------------------- quoting values in messages

QUOTE_LIMIT = 80


class _BoundedRepr(reprlib.Repr):
    """``repr`` that looks at a bounded part of a value: a list that YAML aliases made huge, or
    a number with thousands of digits, is shown by its beginning, never formatted whole."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxdict = self.maxlist = self.maxtuple = self.maxset = self.maxfrozenset = 4
        self.maxstring = self.maxother = QUOTE_LIMIT
        self.maxlong = QUOTE_LIMIT

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 4 * QUOTE_LIMIT:  # str() of a huge int is slow (and refused past 4300 digits)
            digits = int(math.log10(abs(x))) + 1
            digits -= 10 ** (digits - 1) > abs(x)  # log10 of 99...9 rounds up to a whole number
            return f"<a number of {digits} digits>"
        return super().repr_int(x, level)

    def repr_str(self, x: str, level: int) -> str:
        return repr(x[: QUOTE_LIMIT + 1])


_REPR = _BoundedRepr()


def quote(value: object) -> str:
    """A value as an error message shows it: at most :data:`QUOTE_LIMIT` characters, made in
    time and memory bounded by that limit whatever the value."""
    text = _REPR.repr(value)
    return text if len(text) <= QUOTE_LIMIT else text[: QUOTE_LIMIT - 1] + "…"


MAX_DURATION = 100 * 365 * 86400.0  # past any timer's range; the timers that take it stay in range


def parse_duration(value: object) -> float:
    """``30s``, ``5m``, ``1h``, ``2d``, ``1h30m`` or plain seconds -> seconds (finite, 0 to 100 years).

    Raises ValueError saying what is wrong (the caller adds where: a config key, a flag).
    """
    seconds: float | None = None
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as 30s, 5m, 1h, got {quote(value)}")
    if isinstance(value, (int, float)):
        seconds = float(value) if not isinstance(value, int) or value.bit_length() < 1024 else math.inf
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        if len(text) > 100:
            pass  # nobody writes a duration that long; 1e400 seconds would not fit in a float
        elif re.fullmatch(r"[0-9]+(\.[0-9]+)?", text):
            seconds = float(text)
        elif text and re.fullmatch(r"(?:[0-9]+(?:\.[0-9]+)?(?:ms|s|m|h|d|w))+", text):
            seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_RE.findall(text))
    if seconds is None:
        raise ValueError(f"{quote(value)} is not a duration; use a number of seconds or 30s, 5m, 1h, 2d")
    if math.isnan(seconds) or math.isinf(seconds):
        raise ValueError(f"{quote(value)} is not a duration; use a finite number of seconds or 30s, 5m, 1h")
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative ({quote(value)})")
    if seconds > MAX_DURATION:
        raise ValueError(f"{quote(value)} is too long; at most 36500d (100 years)")
    return seconds


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


def local_time(when: datetime | float | None, tz: tzinfo | None = None, *, seconds: bool = False) -> str:
    """A moment for people: ``2026-11-22 10:00 CST``, in this machine's zone unless ``tz`` is given;
    ``seconds``: ``2026-11-22 10:00:07 CST`` (where two moments within a minute must differ).

    ``when`` is an aware datetime or epoch seconds; None -> ``N/A``.
    """
    if when is None:
        return UNKNOWN
    return _aware(when, tz).strftime(f"%Y-%m-%d %H:%M{':%S' if seconds else ''} %Z").strip()


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


# ---------------------------------------------------------------- colour on a terminal

COLORS = {"bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33", "blue": "34", "cyan": "36"}
COLOR_CHOICES = ("auto", "always", "never")


def wants_color(choice: str, is_terminal: bool, environ: Mapping[str, str]) -> bool:
    """Colour or not: ``always`` and ``never`` as asked; ``auto`` on a terminal whose ``TERM`` is not
    ``dumb``, unless ``NO_COLOR`` is set to anything but the empty string (a command-line choice
    overrides ``NO_COLOR``, as https://no-color.org asks)."""
    if choice == "always":
        return True
    if choice == "never" or environ.get("NO_COLOR"):
        return False
    return is_terminal and environ.get("TERM", "") != "dumb"


def paint(text: str, style: str | None, on: bool) -> str:
    """``text`` in ``style`` (a name of :data:`COLORS`) when ``on``; as it is otherwise."""
    if not on or not style or not text:
        return text
    return f"\x1b[{COLORS[style]}m{text}\x1b[0m"


def command_name(
    executable: str = sys.executable,
    which: Callable[[str], str | None] = shutil.which,
) -> str:
    """How a printed command line starts so that it runs as printed, pasted in a shell:
    ``gpuwatch`` when that name on the PATH is this gpuwatch (beside ``executable``, the Python
    running it), else the absolute path of the ``gpuwatch`` script beside that Python (a venv
    not on the PATH: systemd, cron), else ``<python> -m gpuwatch``. Reads the file system, no
    more (``executable`` and ``which`` are parameters for tests)."""
    beside = os.path.join(os.path.dirname(executable), "gpuwatch")
    here = os.path.isfile(beside) and os.access(beside, os.X_OK)
    found = which("gpuwatch")
    if found and (not here or os.path.realpath(found) == os.path.realpath(beside)):
        return "gpuwatch"
    if here:
        return shlex.quote(beside)
    return shlex.join([executable, "-m", "gpuwatch"])
