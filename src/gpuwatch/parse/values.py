"""Values in nvidia-smi and ps output: unknown tokens, numbers, physical ranges, bus ids, and how
a bad value or line is quoted in a message.

Pure functions over text: no I/O, nothing runs at import time.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from gpuwatch.model import HostErrorKind, HostIssue

MAX_TEXT_CHARS = 256
"""Longest name, UUID, bus id or user kept; longer text is cut (with "...")."""
MAX_COMMAND_CHARS = 4096
"""Longest command line kept; longer ones are cut (with "...")."""

_MAX_QUOTE = 80  # characters of a bad value or line quoted in a message
_MAX_NUMBER_CHARS = 24  # longer number text is out of range (and never reaches float()/int())
SEPARATOR = ", "
"""The cell separator of nvidia-smi CSV (cells are not quoted)."""

_NUMBER_RE = re.compile(r"^([-+]?(?:\d+(?:\.\d*)?|\.\d+))(?:\s*([A-Za-z%/°]+))?$")
_BUS_ID_RE = re.compile(
    r"^(?P<domain>[0-9a-f]{1,8}):(?P<bus>[0-9a-f]{1,2}):"
    r"(?P<device>[0-9a-f]{1,2})\.(?P<function>[0-7])$"
)


# ------------------------------------------------------------------------------------
# Physical ranges


@dataclass(frozen=True)
class Limit:
    """The range a reading can physically take, and the unit nvidia-smi prints after it."""

    field: str  # nvidia-smi's field name, as the warnings say it
    low: float
    high: float
    unit: str  # "" when nvidia-smi prints the bare number
    integer: bool = True

    def __contains__(self, value: object) -> bool:
        return isinstance(value, (int, float)) and self.low <= value <= self.high

    @property
    def range_text(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        return f"{self.low:g}-{self.high:g}{unit}"


MAX_MEMORY_MIB = 16 * 1024 * 1024  # 16 TiB: far above any GPU (B300: 288 GB)
LIMITS: Mapping[str, Limit] = {
    "index": Limit("index", 0, 1023, ""),
    "utilization.gpu": Limit("utilization.gpu", 0, 100, "%"),
    "memory.used": Limit("memory.used", 0, MAX_MEMORY_MIB, "MiB"),
    "memory.total": Limit("memory.total", 1, MAX_MEMORY_MIB, "MiB"),
    "temperature.gpu": Limit("temperature.gpu", 0, 200, ""),  # Celsius; nvidia-smi reports no negatives
    "power.draw": Limit("power.draw", 0, 10_000, "W", integer=False),  # a GB200 superchip: 2.7 kW
    "pid": Limit("pid", 1, 2**31 - 1, ""),  # pid_t is a signed 32-bit int
    "used_gpu_memory": Limit("used_gpu_memory", 0, MAX_MEMORY_MIB, "MiB"),
    "etimes": Limit("etimes", 0, 100 * 366 * 86_400, "s"),  # a century of run time
    "ecc.errors.uncorrected.volatile.total": Limit("ecc.errors.uncorrected.volatile.total", 0, 2**32 - 1, ""),
    "ecc.errors.uncorrected.aggregate.total": Limit("ecc.errors.uncorrected.aggregate.total", 0, 2**32 - 1, ""),
    "retired_pages.double_bit.count": Limit("retired_pages.double_bit.count", 0, 2**32 - 1, ""),
}
"""Every reading's physical range: outside it, a value is unknown (with a warning)."""


# ------------------------------------------------------------------------------------
# Values


def is_unknown(value: str | None) -> bool:
    """True for values nvidia-smi uses to say "no reading".

    Any bracketed token (``[N/A]``, ``[Not Supported]``, ``[Unknown Error]``,
    ``[Insufficient Permissions]``, ``[Requested functionality has been deprecated]``,
    ...), the bare ``N/A`` some fields print, an empty cell, and ``None``.
    """
    return value is None or unknown_text(value.strip())


def unknown_text(stripped: str) -> bool:
    """:func:`is_unknown` of a value already stripped of surrounding blanks."""
    if not stripped or (stripped[0] == "[" and stripped[-1] == "]"):
        return True
    return stripped.upper() == "N/A"


def capped(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_text(value: str | None, limit: int = MAX_TEXT_CHARS) -> str | None:
    """The value stripped of surrounding blanks (at most ``limit`` characters), or ``None``
    when it is unknown."""
    if value is None:
        return None
    text = value.strip()
    return None if unknown_text(text) else capped(text, limit)


def _number_text(value: str | None) -> str | None:
    if value is None or is_unknown(value):
        return None
    match = _NUMBER_RE.match(value.strip())
    if not match or len(match.group(1)) > _MAX_NUMBER_CHARS:
        return None
    return match.group(1)


def parse_float(value: str | None) -> float | None:
    """A number with or without its unit (``433.78 W``, ``45 %``, ``11125``).

    ``None`` for unknown, non-numbers and number text too long to be a reading (so never
    an infinity)."""
    number = _number_text(value)
    return float(number) if number is not None else None


def parse_int(value: str | None) -> int | None:
    """An integer with or without its unit (``11125 MiB``, ``53``); decimals round."""
    number = parse_float(value)
    return round(number) if number is not None else None


def reading_in(cell: str | None, limit: Limit) -> tuple[int | float | None, str | None]:
    """(value, why it is unusable): ``(None, None)`` for nvidia-smi's own "unknown" tokens;
    ``(None, reason)`` for text that is no number in ``limit``'s unit and range."""
    if cell is None:
        return None, None
    text = cell.strip()
    if unknown_text(text):
        return None, None
    match = _NUMBER_RE.match(text)
    if not match:
        return None, "is not a number"
    number, unit = match.groups()
    if unit is not None and unit != limit.unit:
        expected = f"in {limit.unit}" if limit.unit else "without a unit"
        return None, f"is not {expected}"
    value = float(number) if len(number) <= _MAX_NUMBER_CHARS else None
    if value is None or not limit.low <= value <= limit.high:  # ``value in limit``, for a float
        return None, f"is out of range ({limit.range_text})"
    if limit.integer:
        return round(value), None
    return value + 0.0, None  # -0.0 -> 0.0


def normalize_bus_id(value: str | None) -> str | None:
    """A PCI bus id in one spelling: lower case, 8-digit domain (``00000000:0c:00.0``).

    nvidia-smi prints ``00000000:0C:00.0`` in CSV but ``0000:0C:00.0`` in messages and
    in the table. Other text comes back lower-cased and stripped; unknown gives ``None``.
    """
    text = parse_text(value)
    if text is None:
        return None
    lowered = text.lower()
    match = _BUS_ID_RE.match(lowered)
    if not match:
        return lowered
    return "{:08x}:{:02x}:{:02x}.{}".format(
        int(match["domain"], 16),
        int(match["bus"], 16),
        int(match["device"], 16),
        match["function"],
    )


def split_lines(text: str) -> list[str]:
    """Lines split on LF only (a CR before it dropped): other separators are data."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def _escaped(text: str) -> str:
    """``text`` with every non-printable character (newline, ESC, NUL, bidi controls) escaped,
    so a quoted value can never start a line, colour a terminal or reorder a message."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def excerpt(text: str, limit: int = _MAX_QUOTE) -> str:
    """At most ``limit`` characters of ``text`` for a message, stripped and escaped."""
    shown = _escaped(text.strip()[: limit + 1])
    return shown if len(shown) <= limit else shown[: limit - 3].rstrip() + "..."


def quoted_value(value: str) -> str:
    """A bad value in a message: quoted, escaped, at most about 80 characters."""
    text = value.strip()
    more = f" ({len(text)} characters)" if len(text) > _MAX_QUOTE else ""
    return f'"{excerpt(text)}"{more}'


def parse_natural(value: str | None) -> int | None:
    """A plain non-negative integer (a pid, seconds) of at most 19 digits, else ``None``."""
    if value is None:
        return None
    text = value.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 19:
        return None
    return int(text)


def as_int(value: int | float | None) -> int | None:
    return None if value is None else int(value)


def bad_value(who: str, field: str, cell: str, reason: str) -> HostIssue:
    return HostIssue(HostErrorKind.UNPARSEABLE, f"{who}: {field} {quoted_value(cell)} {reason}; taken as unknown")
