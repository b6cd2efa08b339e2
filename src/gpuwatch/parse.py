"""Turn the text a probe brought back from a host into records.

This module owns: reading ``nvidia-smi --query-gpu`` and ``--query-compute-apps`` CSV
output; classifying nvidia-smi's error messages and exit codes into ``HostErrorKind``;
reading the two ``ps`` listings (``pid=,user:64=,etimes=`` for owners, ``pid=,args=`` for
command lines); joining compute apps to their GPU and their ps owner; the physical range of
every reading. It also owns the field lists the probe queries (``GPU_QUERY_FIELDS``,
``APP_QUERY_FIELDS``, ``PS_FORMAT``, ``ARGS_FORMAT``), so what is asked and what is read
cannot drift.

Pure functions over text: no I/O, nothing runs at import time. The parsers never raise
on odd input; what they cannot use becomes a ``HostIssue``.

Output from a host is data written by its users: a process name or a command line is
whatever its owner chose. So error messages are recognised only on lines that are not data
rows (a row that fits the header is data, whatever it says), one line is one record, a value
outside its physical range is unknown with a warning, and a record seen twice is kept once
with a warning. Owners are read from a listing that holds no user-written text at all.

What nvidia-smi CSV looks like (real captures in tests/fixtures/nvidia-smi):

- not quoted; cells are separated by ``", "``; ``process_name`` may contain ``", "``;
- the header names each column, with the unit in brackets: ``memory.used [MiB]``;
- values carry units unless ``nounits`` was given: ``11125 MiB``, ``45 %``, ``433.78 W``;
- missing values are bracketed tokens (``[N/A]``, ``[Not Supported]``,
  ``[Unknown Error]``, ...); a few fields print a bare ``N/A`` or nothing at all;
- error lines for one GPU can be mixed into the rows of the others (stderr is merged).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gpuwatch.model import (
    ComputeApp,
    Gpu,
    GpuHealth,
    GpuProcess,
    HostErrorKind,
    HostIssue,
    PsEntry,
)

__all__ = [
    "APP_QUERY_FIELDS",
    "ARGS_FORMAT",
    "GPU_QUERY_FIELDS",
    "HEALTH_QUERY_FIELDS",
    "LIMITS",
    "MAX_COMMAND_CHARS",
    "MAX_TEXT_CHARS",
    "PS_FORMAT",
    "Limit",
    "attribute",
    "classify_nvidia_smi_error",
    "compute_apps_failure",
    "health_fields_from",
    "is_unknown",
    "normalize_bus_id",
    "parse_compute_apps",
    "parse_cuda_version",
    "parse_float",
    "parse_int",
    "parse_ps",
    "parse_ps_args",
    "parse_query_gpu",
    "parse_text",
    "query_gpu_failure",
    "quote",
    "supported_health_fields",
]

GPU_QUERY_FIELDS: tuple[str, ...] = (
    "index",
    "uuid",
    "name",
    "pci.bus_id",
    "utilization.gpu",
    "memory.used",
    "memory.total",
    "temperature.gpu",
    "power.draw",
)
"""``nvidia-smi --query-gpu=`` fields, in the order the probe asks for them."""

HEALTH_QUERY_FIELDS: tuple[tuple[str, ...], ...] = (
    ("driver_version",),
    ("persistence_mode",),
    ("ecc.errors.uncorrected.volatile.total",),
    ("ecc.errors.uncorrected.aggregate.total",),
    ("retired_pages.double_bit.count",),
    ("retired_pages.pending",),
    ("remapped_rows.pending",),
    ("remapped_rows.failure",),
    ("clocks_event_reasons.hw_slowdown", "clocks_throttle_reasons.hw_slowdown"),
    ("clocks_event_reasons.hw_thermal_slowdown", "clocks_throttle_reasons.hw_thermal_slowdown"),
    ("clocks_event_reasons.hw_power_brake_slowdown", "clocks_throttle_reasons.hw_power_brake_slowdown"),
)
"""Extra ``--query-gpu`` fields for GPU health and the driver, asked only where the host's
nvidia-smi lists them in ``--help-query-gpu`` (:func:`supported_health_fields`). Each entry is
one reading: its name on current drivers first, then the older name (``clocks_throttle_reasons``
became ``clocks_event_reasons`` in driver 535); the first name a driver lists is asked."""

APP_QUERY_FIELDS: tuple[str, ...] = (
    "pid",
    "gpu_uuid",
    "gpu_bus_id",
    "used_gpu_memory",
)
"""``nvidia-smi --query-compute-apps=`` fields: all fixed-format, none written by a user.

``process_name`` is not asked for: it is the process's own argv[0], printed raw (a newline
in it would start a new row). The name comes from ``ps`` instead, which escapes control
characters. :func:`parse_compute_apps` still reads a ``process_name`` column where one is
printed (older probes, the corpus)."""

PS_FORMAT = "pid=,user:64=,etimes="
"""``ps -ww -o`` format for owners: no header; a user column wide enough for long names; no
user-written text, so no command line can forge another process's owner."""

ARGS_FORMAT = "pid=,args="
"""``ps -ww -o`` format for command lines (ps escapes newlines and control characters)."""

MAX_TEXT_CHARS = 256
"""Longest name, UUID, bus id or user kept; longer text is cut (with "...")."""
MAX_COMMAND_CHARS = 4096
"""Longest command line kept; longer ones are cut (with "...")."""

_SEPARATOR = ", "
_MAX_QUOTE = 80  # characters of a bad value or line quoted in a message
_MAX_NUMBER_CHARS = 24  # longer number text is out of range (and never reaches float()/int())

# Aliases nvidia-smi accepts in a query; its header always prints the canonical name.
_GPU_ALIASES: Mapping[str, str] = {
    "gpu_name": "name",
    "gpu_uuid": "uuid",
    "gpu_bus_id": "pci.bus_id",
    "gpu_serial": "serial",
    "retired_pages.dbe": "retired_pages.double_bit.count",
    **{names[1]: names[0] for names in HEALTH_QUERY_FIELDS if len(names) > 1},
}
_APP_ALIASES: Mapping[str, str] = {
    "name": "process_name",
    "used_memory": "used_gpu_memory",
}

_UNIT_SUFFIX_RE = re.compile(r"\s*\[[^\]]*\]\s*$")
# A header cell: a field name and maybe its unit ("[MiB]", "[%]", "[W/s]", "[seconds]"): plain
# ASCII, so a damaged line is never taken for a header (its columns would be shifted).
_HEADER_CELL_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*(?: \[[A-Za-z%/]{1,16}\])?$")
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
    if value is None:
        return True
    stripped = value.strip()
    if not stripped or stripped.upper() == "N/A":
        return True
    return stripped.startswith("[") and stripped.endswith("]")


def _capped(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_text(value: str | None, limit: int = MAX_TEXT_CHARS) -> str | None:
    """The value stripped of surrounding blanks (at most ``limit`` characters), or ``None``
    when it is unknown."""
    if value is None or is_unknown(value):
        return None
    return _capped(value.strip(), limit)


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


def _reading(cell: str | None, limit: Limit) -> tuple[int | float | None, str | None]:
    """(value, why it is unusable): ``(None, None)`` for nvidia-smi's own "unknown" tokens;
    ``(None, reason)`` for text that is no number in ``limit``'s unit and range."""
    if cell is None or is_unknown(cell):
        return None, None
    match = _NUMBER_RE.match(cell.strip())
    if not match:
        return None, "is not a number"
    number, unit = match.group(1), match.group(2)
    if unit is not None and unit != limit.unit:
        expected = f"in {limit.unit}" if limit.unit else "without a unit"
        return None, f"is not {expected}"
    value = float(number) if len(number) <= _MAX_NUMBER_CHARS else None
    if value is None or value not in limit:
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


def _lines(text: str) -> list[str]:
    """Lines split on LF only (a CR before it dropped): other separators are data."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def _escaped(text: str) -> str:
    """``text`` with every non-printable character (newline, ESC, NUL, bidi controls) escaped,
    so a quoted value can never start a line, colour a terminal or reorder a message."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def quote(text: str, limit: int = _MAX_QUOTE) -> str:
    """At most ``limit`` characters of ``text`` for a message, stripped and escaped."""
    shown = _escaped(text.strip()[: limit + 1])
    return shown if len(shown) <= limit else shown[: limit - 3].rstrip() + "..."


def _quote(line: str) -> str:
    return quote(line)


def _shown(value: str) -> str:
    """A bad value in a message: quoted, escaped, at most about 80 characters."""
    text = value.strip()
    more = f" ({len(text)} characters)" if len(text) > _MAX_QUOTE else ""
    return f'"{quote(text)}"{more}'


# ------------------------------------------------------------------------------------
# nvidia-smi errors

_LINE_PREFIX = r"^(?:(?:WARNING|ERROR|Error|error)\s*:\s*)?"
_SHELL_PREFIX = r"^(?:\S*(?:sh|bash|zsh|timeout|env)(?::\s*(?:line\s+)?\d+)?:\s*)?"

_RE_MISMATCH = re.compile(r"^Failed to initialize NVML:\s*Driver/library version mismatch", re.IGNORECASE)
_RE_NVML_VERSION = re.compile(r"^NVML library version:\s*(?P<version>\S+)", re.IGNORECASE)
_RE_NVML_UNKNOWN = re.compile(r"^Failed to initialize NVML:\s*Unknown Error", re.IGNORECASE)
_RE_NVML_PERMISSION = re.compile(r"^Failed to initialize NVML:\s*Insufficient Permissions", re.IGNORECASE)
_RE_NVML_OTHER = re.compile(r"^Failed to initialize NVML:\s*(?P<reason>.*)$", re.IGNORECASE)
_RE_NO_DRIVER = re.compile(
    r"^NVIDIA-SMI has failed because it couldn'?t communicate with the NVIDIA driver",
    re.IGNORECASE,
)
_RE_NO_LIBRARY = re.compile(
    r"(?:^NVIDIA-SMI couldn'?t find libnvidia-ml\.so"
    r"|NVML library not found"
    r"|libnvidia-ml\.so[.\d]*: cannot open shared object file)",
    re.IGNORECASE,
)
_RE_DEVICE_HANDLE = re.compile(
    r"^Unable to determine the device handle for (?:GPU)?\s*"
    r"(?P<address>[0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-9A-Fa-f])"
    r"\s*:\s*(?P<reason>.*)$",
    re.IGNORECASE,
)
_RE_DEVICE_HANDLE_ANY = re.compile(r"^Unable to determine the device handle for\s*(?P<rest>.*)$", re.IGNORECASE)
_RE_FALLEN_OFF = re.compile(r"^(?:.*\b)?GPU has fallen off the bus", re.IGNORECASE)
_RE_NO_DEVICES = re.compile(r"^No devices were found", re.IGNORECASE)
_RE_PERMISSION = re.compile(_LINE_PREFIX + r"Insufficient Permissions\b", re.IGNORECASE)
_RE_NOT_FOUND = re.compile(
    _SHELL_PREFIX
    + r"(?:(?:\S*/)?nvidia-smi'?:\s*"
    + r"(?:command not found|not found|No such file or directory)"
    + r"|command not found:\s*nvidia-smi)",
    re.IGNORECASE,
)
_RE_FAILED_TO_RUN = re.compile(
    r"^timeout: failed to run command .?(?:\S*/)?nvidia-smi.?:\s*(?P<reason>.*)$",
    re.IGNORECASE,
)
_RE_NOT_EXECUTABLE = re.compile(
    _SHELL_PREFIX + r"(?:\S*/)?nvidia-smi'?:\s*(?:Permission denied|cannot execute)",
    re.IGNORECASE,
)
_RE_INFOROM = re.compile(r"infoROM is corrupted(?: at gpu\s*(?P<address>\S+))?", re.IGNORECASE)
# Generic failures: only for lines with no ", " (never a CSV row) that do not fit as a row.
_RE_GENERIC = re.compile(
    r"^(?:ERROR:|Error:|NVML:|NVIDIA-SMI has failed)"
    r"|(?<!\[)\b(?:is|are) not supported\b",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class _LineError:
    """One recognised error line; ``rank`` orders the causes, most fundamental first."""

    rank: int
    kind: HostErrorKind
    message: str
    address: str | None = None


_RANK_NOT_FOUND = 0
_RANK_MISMATCH = 1
_RANK_DRIVER = 2
_RANK_PERMISSION = 3
_RANK_NO_DEVICES = 4
_RANK_GPU_LOST = 5
_RANK_GENERIC = 6
_RANK_VERSION = 99  # "NVML library version: X" only completes a mismatch message

_MSG_NOT_FOUND = "nvidia-smi is not installed on this host or not on the PATH of the SSH session"
_MSG_NOT_EXECUTABLE = "nvidia-smi was found but could not be executed (not a working binary, or no execute permission)"
_MSG_NO_DRIVER = (
    "nvidia-smi cannot talk to the NVIDIA driver: the kernel module is not loaded "
    "(driver not installed, or not rebuilt after a kernel update)"
)
_MSG_NO_LIBRARY = "the NVML library (libnvidia-ml.so) was not found: the NVIDIA driver is not installed, or only partly"
_MSG_NVML_UNKNOWN = (
    "NVML unknown error; in a container this follows a host daemon-reload "
    "(systemctl daemon-reload drops the container's GPU access): restart the container"
)
_MSG_PERMISSION = (
    "nvidia-smi has insufficient permissions to query the GPUs; check the SSH user's access to /dev/nvidia*"
)
_MSG_NO_DEVICES = (
    "nvidia-smi found no GPUs (No devices were found): the driver is loaded but no GPU "
    "initialised; the kernel log usually says why"
)
_MSG_TIMEOUT = (
    "nvidia-smi did not answer in time and was killed; a hung nvidia-smi often means a GPU has fallen off the bus"
)


def _mismatch_message(version: str | None) -> str:
    found = f" (NVML library version: {version})" if version else ""
    return (
        f"NVIDIA driver/library version mismatch{found}: the driver's user-space "
        "library was upgraded while the old kernel module is still loaded, usually by "
        "an unattended driver upgrade; a reboot fixes it"
    )


def _gpu_lost_message(address: str, reason: str) -> str:
    reason_text = reason.strip().rstrip(".")
    if re.search(r"GPU is lost|fallen off the bus", reason_text, re.IGNORECASE):
        return f"GPU {address} has fallen off the bus (GPU is lost); reboot the host to recover it"
    if re.match(r"Unknown Error$", reason_text, re.IGNORECASE):
        return (
            f"GPU {address} does not answer (Unknown Error on its device handle); "
            "it has likely fallen off the bus: reboot the host to recover it"
        )
    return (
        f"nvidia-smi cannot reach GPU {address} ({_quote(reason_text)}); "
        "the GPU is unusable until it is recovered, usually by a reboot"
    )


def _classify_line(line: str, generic: bool = True) -> _LineError | None:
    """Recognise one line of nvidia-smi (or shell) error output.

    ``generic`` also accepts catch-all failure lines (``ERROR: ...``,
    ``... are not supported``); the parsers only ask for those on lines that do not fit
    as data rows.
    """
    text = line.strip()
    if not text:
        return None
    failed_to_run = _RE_FAILED_TO_RUN.search(text)
    if _RE_NOT_FOUND.search(text) or (
        failed_to_run and not re.search(r"Permission denied", failed_to_run["reason"], re.IGNORECASE)
    ):
        return _LineError(_RANK_NOT_FOUND, HostErrorKind.NVIDIA_SMI_NOT_FOUND, _MSG_NOT_FOUND)
    if failed_to_run or _RE_NOT_EXECUTABLE.search(text):
        return _LineError(_RANK_NOT_FOUND, HostErrorKind.NVIDIA_SMI_NOT_FOUND, _MSG_NOT_EXECUTABLE)
    if _RE_MISMATCH.search(text):
        return _LineError(_RANK_MISMATCH, HostErrorKind.DRIVER_MISMATCH, _mismatch_message(None))
    version = _RE_NVML_VERSION.search(text)
    if version:
        return _LineError(_RANK_VERSION, HostErrorKind.DRIVER_MISMATCH, quote(version["version"], 40))
    if _RE_NVML_UNKNOWN.search(text):
        return _LineError(_RANK_DRIVER, HostErrorKind.DRIVER_NOT_LOADED, _MSG_NVML_UNKNOWN)
    if _RE_NVML_PERMISSION.search(text):
        return _LineError(_RANK_PERMISSION, HostErrorKind.PERMISSION_DENIED, _MSG_PERMISSION)
    if _RE_NO_LIBRARY.search(text):
        return _LineError(_RANK_DRIVER, HostErrorKind.DRIVER_NOT_LOADED, _MSG_NO_LIBRARY)
    other = _RE_NVML_OTHER.search(text)
    if other:
        message = f"NVML could not start ({_quote(other['reason'])}); the NVIDIA driver is not answering"
        return _LineError(_RANK_DRIVER, HostErrorKind.DRIVER_NOT_LOADED, message)
    if _RE_NO_DRIVER.search(text):
        return _LineError(_RANK_DRIVER, HostErrorKind.DRIVER_NOT_LOADED, _MSG_NO_DRIVER)
    handle = _RE_DEVICE_HANDLE.search(text)
    if handle:
        address, reason = handle["address"], handle["reason"]
        if re.search(r"Insufficient Permissions", reason, re.IGNORECASE):
            message = f"no permission to query GPU {address} (Insufficient Permissions)"
            return _LineError(_RANK_PERMISSION, HostErrorKind.PERMISSION_DENIED, message, address)
        return _LineError(
            _RANK_GPU_LOST,
            HostErrorKind.GPU_LOST,
            _gpu_lost_message(address, reason),
            address,
        )
    handle_any = _RE_DEVICE_HANDLE_ANY.search(text)
    if handle_any:
        message = (
            f"nvidia-smi cannot reach a GPU ({_quote(handle_any['rest'])}); "
            "it has likely fallen off the bus: reboot the host to recover it"
        )
        return _LineError(_RANK_GPU_LOST, HostErrorKind.GPU_LOST, message)
    if _RE_FALLEN_OFF.search(text):
        message = "a GPU has fallen off the bus; reboot the host to recover it"
        return _LineError(_RANK_GPU_LOST, HostErrorKind.GPU_LOST, message)
    if _RE_NO_DEVICES.search(text):
        return _LineError(_RANK_NO_DEVICES, HostErrorKind.NO_DEVICES, _MSG_NO_DEVICES)
    if _RE_PERMISSION.search(text):
        return _LineError(_RANK_PERMISSION, HostErrorKind.PERMISSION_DENIED, _MSG_PERMISSION)
    inforom = _RE_INFOROM.search(text)
    if inforom:
        where = f" on GPU {inforom['address']}" if inforom["address"] else ""
        message = f"the infoROM is corrupted{where}; the GPU may still work but needs checking"
        return _LineError(_RANK_GENERIC, HostErrorKind.PROBE_FAILED, message, inforom["address"])
    if generic and _SEPARATOR not in text and _RE_GENERIC.search(text):
        return _LineError(_RANK_GENERIC, HostErrorKind.PROBE_FAILED, f"nvidia-smi: {_quote(text)}")
    return None


def _merge_line_errors(errors: Sequence[_LineError]) -> HostIssue | None:
    """The most fundamental cause among several error lines, as one issue."""
    causes = [e for e in errors if e.rank != _RANK_VERSION]
    if not causes:
        return None
    top = min(e.rank for e in causes)
    chosen = [e for e in causes if e.rank == top]
    first = chosen[0]
    if first.kind is HostErrorKind.DRIVER_MISMATCH:
        versions = [e.message for e in errors if e.rank == _RANK_VERSION]
        return HostIssue(first.kind, _mismatch_message(versions[0] if versions else None))
    messages = list(dict.fromkeys(e.message for e in chosen))
    return HostIssue(first.kind, "; ".join(messages))


def _exit_code_issue(text: str, exit_code: int) -> HostIssue:
    first = next((line.strip() for line in _lines(text) if line.strip()), "")
    quoted = f": {_quote(first)}" if first else " and printed nothing"
    if exit_code == 127:
        return HostIssue(HostErrorKind.NVIDIA_SMI_NOT_FOUND, _MSG_NOT_FOUND)
    if exit_code == 126:
        return HostIssue(HostErrorKind.NVIDIA_SMI_NOT_FOUND, _MSG_NOT_EXECUTABLE)
    if exit_code in (124, 137):
        return HostIssue(HostErrorKind.PROBE_TIMEOUT, _MSG_TIMEOUT)
    if exit_code == 4:
        return HostIssue(HostErrorKind.PERMISSION_DENIED, _MSG_PERMISSION)
    if exit_code == 9:
        return HostIssue(HostErrorKind.DRIVER_NOT_LOADED, _MSG_NO_DRIVER)
    if exit_code == 12:
        return HostIssue(HostErrorKind.DRIVER_NOT_LOADED, _MSG_NO_LIBRARY)
    if exit_code == 15:
        message = "a GPU has fallen off the bus (nvidia-smi exit 15); reboot the host to recover it"
        return HostIssue(HostErrorKind.GPU_LOST, message)
    if exit_code == 14:
        message = f"nvidia-smi reports a corrupted infoROM (exit 14){quoted}"
        return HostIssue(HostErrorKind.PROBE_FAILED, message)
    if exit_code == 6:
        return HostIssue(HostErrorKind.PROBE_FAILED, f"the nvidia-smi query failed (exit 6){quoted}")
    return HostIssue(HostErrorKind.PROBE_FAILED, f"nvidia-smi failed (exit {exit_code}){quoted}")


def classify_nvidia_smi_error(text: str, exit_code: int | None) -> HostIssue | None:
    """Classify what nvidia-smi (or the shell running it) printed and how it exited.

    Known messages win over the exit code, except a timeout (124 from ``timeout``, 137
    from its ``-s KILL``), whose output is cut short. ``None`` when the text holds no
    error message and the exit code is 0 or unknown.
    """
    errors = [e for e in (_classify_line(line) for line in _lines(text)) if e is not None]
    issue = _merge_line_errors(errors)
    if exit_code in (124, 137):
        timeout = _exit_code_issue(text, exit_code)
        if issue is None:
            return timeout
        return HostIssue(timeout.kind, f"{timeout.message} (it had printed: {issue.message})")
    if issue is not None:
        return issue
    if exit_code is None or exit_code == 0:
        return None
    return _exit_code_issue(text, exit_code)


# ------------------------------------------------------------------------------------
# CSV tables


def _field_name(cell: str, aliases: Mapping[str, str]) -> str:
    """``memory.used [MiB]`` -> ``memory.used``; an alias becomes the canonical name."""
    name = _UNIT_SUFFIX_RE.sub("", cell).strip().lower()
    return aliases.get(name, name)


def _looks_like_header(line: str, vocabulary: Sequence[str], aliases: Mapping[str, str]) -> bool:
    cells = line.strip().split(_SEPARATOR)
    if not all(_HEADER_CELL_RE.match(cell.strip()) for cell in cells):
        return False
    return any(_field_name(cell, aliases) in vocabulary for cell in cells)


def _split_row(line: str, width: int, free_column: int | None) -> list[str] | None:
    """Split one unquoted CSV row into ``width`` cells.

    Extra ``", "`` are taken to belong to ``free_column``: the cells left of it are split
    from the left, the cells right of it from the right, and it gets the middle, rejoined
    exactly. ``None`` when the row cannot be placed.
    """
    cells = line.split(_SEPARATOR)
    if len(cells) == width:
        return cells
    if len(cells) < width or free_column is None:
        return None
    right = width - free_column - 1
    end = len(cells) - right
    return [*cells[:free_column], _SEPARATOR.join(cells[free_column:end]), *cells[end:]]


@dataclass(frozen=True)
class _Query:
    """What distinguishes the two nvidia-smi queries for the table reader."""

    label: str  # for messages: "--query-gpu"
    vocabulary: tuple[str, ...]  # known field names, to recognise a header
    aliases: Mapping[str, str]
    key: str  # an integer column every row has, when queried
    free: str  # the column that may hold ", "

    def free_column(self, columns: Sequence[str]) -> int | None:
        return columns.index(self.free) if self.free in columns else None

    def place(self, line: str, columns: Sequence[str]) -> list[str] | None:
        """The row's cells, or ``None`` when the line does not fit as a row."""
        cells = _split_row(line, len(columns), self.free_column(columns))
        if cells is None:
            return None
        if self.key in columns and _parse_natural(cells[columns.index(self.key)]) is None:
            return None
        return cells


_GPU_QUERY = _Query("--query-gpu", GPU_QUERY_FIELDS, _GPU_ALIASES, "index", "name")
_APP_QUERY = _Query("--query-compute-apps", (*APP_QUERY_FIELDS, "process_name"), _APP_ALIASES, "pid", "process_name")


@dataclass(frozen=True)
class _Table:
    columns: tuple[str, ...] | None  # None: no header and no field list
    rows: tuple[tuple[int, str], ...]  # (position among data lines, line as printed)
    errors: tuple[_LineError, ...]
    first_data_line: str | None
    not_rows: tuple[str, ...]  # every line that is no data row: where nvidia-smi writes errors


def _read_table(text: str, fields: Sequence[str] | None, query: _Query) -> _Table:
    """Separate the header, the data rows and the nvidia-smi error lines.

    A line that fits as a row is data, whatever it says: a process name may hold any text,
    an error message's included. Only the other lines are classified as errors.
    """
    columns: tuple[str, ...] | None = None
    if fields is not None:
        columns = tuple(_field_name(field, query.aliases) for field in fields)
    header_seen = False
    rows: list[tuple[int, str]] = []
    errors: list[_LineError] = []
    not_rows: list[str] = []
    first_data_line: str | None = None
    for line in _lines(text):
        if not line.strip():
            continue
        if _looks_like_header(line, query.vocabulary, query.aliases):
            if not header_seen and not rows:
                cells = line.strip().split(_SEPARATOR)
                columns = tuple(_field_name(cell, query.aliases) for cell in cells)
                header_seen = True
            continue  # a repeated header (two outputs concatenated) is no row either
        if columns is None or query.place(line, columns) is None:
            not_rows.append(line)
            error = _classify_line(line, generic=True)
            if error is not None:
                errors.append(error)
                continue
        if first_data_line is None:
            first_data_line = line
        rows.append((len(rows), line))
    return _Table(columns, tuple(rows), tuple(errors), first_data_line, tuple(not_rows))


def _error_issues(errors: Sequence[_LineError], rows_found: int) -> list[HostIssue]:
    """Issues for error lines: the one cause if nothing else was read, else one each."""
    if not errors:
        return []
    if rows_found == 0:
        merged = _merge_line_errors(errors)
        return [merged] if merged is not None else []
    versions = [e.message for e in errors if e.rank == _RANK_VERSION]
    issues: list[HostIssue] = []
    for error in errors:
        if error.rank == _RANK_VERSION:
            continue
        if error.kind is HostErrorKind.DRIVER_MISMATCH:
            issue = HostIssue(error.kind, _mismatch_message(versions[0] if versions else None))
        else:
            issue = HostIssue(error.kind, error.message)
        if issue not in issues:
            issues.append(issue)
    return issues


def _no_columns_issues(table: _Table, query: _Query) -> list[HostIssue]:
    """Issues for an output with neither header nor field list."""
    issues = _error_issues(table.errors, 0)
    if table.first_data_line is not None:
        issues.append(
            HostIssue(
                HostErrorKind.UNPARSEABLE,
                f"nvidia-smi {query.label} printed no header and no field list was given: "
                f"{_quote(table.first_data_line)}",
            )
        )
    return issues


def _misfit(query: _Query, line: str, width: int, action: str, kind: HostErrorKind) -> HostIssue:
    count = len(line.split(_SEPARATOR))
    return HostIssue(
        kind,
        f"{action} a {query.label} row with {count} fields where {width} were expected: {_quote(line)}",
    )


def query_gpu_failure(text: str, exit_code: int | None) -> HostIssue | None:
    """:func:`classify_nvidia_smi_error` for a ``--query-gpu`` output: only the lines that
    are not GPU rows are read as messages."""
    table = _read_table(text, None, _GPU_QUERY)
    return classify_nvidia_smi_error("\n".join(table.not_rows), exit_code)


def compute_apps_failure(text: str, exit_code: int | None) -> HostIssue | None:
    """:func:`classify_nvidia_smi_error` for a ``--query-compute-apps`` output: only the
    lines that are not process rows are read as messages (a process name is never one)."""
    table = _read_table(text, None, _APP_QUERY)
    return classify_nvidia_smi_error("\n".join(table.not_rows), exit_code)


def _missing(query: _Query, columns: Sequence[str], required: Sequence[str]) -> list[HostIssue]:
    """A warning naming the asked-for fields the header does not have."""
    absent = [field for field in required if _field_name(field, query.aliases) not in columns]
    if not absent:
        return []
    return [
        HostIssue(
            HostErrorKind.UNPARSEABLE,
            f"nvidia-smi {query.label} printed no {', '.join(absent)} column; taken as unknown",
        )
    ]


def _bad_value(who: str, field: str, cell: str, reason: str) -> HostIssue:
    return HostIssue(HostErrorKind.UNPARSEABLE, f"{who}: {field} {_shown(cell)} {reason}; taken as unknown")


# ------------------------------------------------------------------------------------
# --query-gpu

_GPU_READINGS = ("utilization.gpu", "memory.used", "memory.total", "temperature.gpu", "power.draw")


def _gpu_index(values: Mapping[str, str], position: int) -> tuple[int, HostIssue | None]:
    """nvidia-smi's index for the row; its position among the rows when not queried or
    unreadable (with a warning in that case)."""
    if "index" not in values:
        return position, None
    index = _parse_natural(values["index"])
    if index is not None and index in LIMITS["index"]:
        return index, None
    message = (
        f"GPU index {_shown(values['index'])} is not a GPU index ({LIMITS['index'].range_text}); "
        f"numbered {position} by its row position"
    )
    return position, HostIssue(HostErrorKind.UNPARSEABLE, message)


def _gpu_from_row(values: Mapping[str, str], index: int) -> tuple[Gpu, list[HostIssue]]:
    """One GPU from its cells; readings outside their physical range become unknown."""
    warnings: list[HostIssue] = []
    readings: dict[str, int | float | None] = {}
    for field in _GPU_READINGS:
        value, reason = _reading(values.get(field), LIMITS[field])
        if reason is not None:
            warnings.append(_bad_value(f"GPU {index}", field, values[field], reason))
        readings[field] = value
    used, total = readings["memory.used"], readings["memory.total"]
    if used is not None and total is not None and used > total:
        warnings.append(
            HostIssue(
                HostErrorKind.UNPARSEABLE,
                f"GPU {index}: memory.used {used} MiB is more than memory.total {total} MiB; both taken as unknown",
            )
        )
        readings["memory.used"] = readings["memory.total"] = None
    gpu = Gpu(
        index=index,
        uuid=parse_text(values.get("uuid")),
        name=parse_text(values.get("name")),
        pci_bus_id=parse_text(values.get("pci.bus_id")),
        utilization_percent=_as_int(readings["utilization.gpu"]),
        memory_used_mib=_as_int(readings["memory.used"]),
        memory_total_mib=_as_int(readings["memory.total"]),
        temperature_c=_as_int(readings["temperature.gpu"]),
        power_w=None if readings["power.draw"] is None else float(readings["power.draw"]),
        health=_gpu_health(values, index, warnings) if _HEALTH_KEYS & values.keys() else None,
    )
    return gpu, warnings


# ------------------------------------------------------------------------------------
# GPU health (the extra --query-gpu fields)

_HEALTH_KEYS = frozenset(names[0] for names in HEALTH_QUERY_FIELDS)
_HEALTH_COUNTS = {
    "ecc.errors.uncorrected.volatile.total": "ecc_uncorrected_volatile",
    "ecc.errors.uncorrected.aggregate.total": "ecc_uncorrected_aggregate",
    "retired_pages.double_bit.count": "retired_pages_double_bit",
}
_HEALTH_FLAGS = {
    "retired_pages.pending": ("retired_pages_pending", "Yes", "No"),
    "remapped_rows.pending": ("remapped_rows_pending", "Yes", "No"),
    "remapped_rows.failure": ("remapped_rows_failure", "Yes", "No"),
    "clocks_event_reasons.hw_slowdown": ("hw_slowdown", "Active", "Not Active"),
    "clocks_event_reasons.hw_thermal_slowdown": ("hw_thermal_slowdown", "Active", "Not Active"),
    "clocks_event_reasons.hw_power_brake_slowdown": ("hw_power_brake_slowdown", "Active", "Not Active"),
    "persistence_mode": ("persistence_mode", "Enabled", "Disabled"),
}
_VERSION_RE = re.compile(r"^[0-9]{1,4}(?:\.[0-9]{1,4}){0,3}$")


def _gpu_health(values: Mapping[str, str], index: int, warnings: list[HostIssue]) -> GpuHealth:
    """The health fields of one GPU row; ``[N/A]`` and absent fields are unknown, never 0 or "no"."""
    found: dict[str, object] = {}
    for field, attr in _HEALTH_COUNTS.items():
        value, reason = _reading(values.get(field), LIMITS[field])
        if reason is not None:
            warnings.append(_bad_value(f"GPU {index}", field, values[field], reason))
        found[attr] = _as_int(value)
    for field, (attr, yes, no) in _HEALTH_FLAGS.items():
        cell = values.get(field)
        if cell is None or is_unknown(cell):
            continue
        text = cell.strip()
        if text in (yes, no):
            found[attr] = text == yes
        else:
            warnings.append(_bad_value(f"GPU {index}", field, cell, f"is neither {yes} nor {no}"))
    version = values.get("driver_version")
    if version is not None and not is_unknown(version):
        if _VERSION_RE.match(version.strip()):
            found["driver_version"] = version.strip()
        else:
            warnings.append(_bad_value(f"GPU {index}", "driver_version", version, "is not a driver version"))
    return GpuHealth(**found)  # type: ignore[arg-type]


def supported_health_fields(help_text: str) -> tuple[str, ...]:
    """The :data:`HEALTH_QUERY_FIELDS` a host's ``nvidia-smi --help-query-gpu`` lists, one name per
    reading (the current name where both are listed), in that order.

    The probe computes the same list on the host (``probe.HEALTH_AWK``) so that the poll that
    learns them can already ask for them; only names from the fixed list ever reach a query.
    """
    listed: set[str] = set()
    for line in _lines(help_text):
        if line.startswith('"'):
            listed.update(re.findall(r'"([^"]*)"', line))
    chosen = []
    for names in HEALTH_QUERY_FIELDS:
        name = next((n for n in names if n in listed), None)
        if name is not None:
            chosen.append(name)
    return tuple(chosen)


def health_fields_from(text: str) -> tuple[str, ...]:
    """A comma-separated list printed by the probe, kept only where it names known health fields
    (anything else is dropped): what the host said it supports."""
    known = {name for names in HEALTH_QUERY_FIELDS for name in names}
    picked = [f.strip() for f in text.split(",") if f.strip() in known]
    return tuple(dict.fromkeys(picked))


_CUDA_RE = re.compile(r"^\s*\|?\s*(?:.*\s)?CUDA Version\s*:\s*([0-9]{1,3}(?:\.[0-9]{1,3}){0,2})\b")


def parse_cuda_version(text: str) -> str | None:
    """The CUDA version from ``nvidia-smi --version`` (``CUDA Version        : 13.1``) or the
    default table's header; ``None`` when neither is there (older drivers have no --version)."""
    for line in _lines(text):
        match = _CUDA_RE.match(line)
        if match:
            return match.group(1)
    return None


def _as_int(value: int | float | None) -> int | None:
    return None if value is None else int(value)


def _duplicate(what: str, line: str) -> HostIssue:
    return HostIssue(
        HostErrorKind.UNPARSEABLE, f"nvidia-smi listed {what} twice; kept the first row, dropped: {_quote(line)}"
    )


def parse_query_gpu(
    text: str, fields: Sequence[str] | None = None, required: Sequence[str] = ()
) -> tuple[list[Gpu], list[HostIssue]]:
    """Parse ``nvidia-smi --query-gpu=... --format=csv[,noheader][,nounits]`` output.

    With a header, columns are found by name, in any order and among any number of
    other columns. Without one (``noheader``), ``fields`` names the queried fields in
    order. Unknown values become ``None``; so do values outside their physical range
    (:data:`LIMITS`), with a warning. ``index`` comes from nvidia-smi (the row position only
    when ``index`` was not queried or is unreadable); a GPU index or UUID listed twice keeps
    its first row, with a warning. Error lines mixed into the rows (a lost GPU) come back
    as issues beside the GPUs; if the whole output is an error, no GPUs and that one
    classified issue.
    """
    query = _GPU_QUERY
    table = _read_table(text, fields, query)
    if table.columns is None:
        issues = _no_columns_issues(table, query)
        if not issues:
            issues.append(HostIssue(HostErrorKind.UNPARSEABLE, "nvidia-smi --query-gpu printed nothing"))
        return [], issues

    columns = table.columns
    gpus: list[Gpu] = []
    warnings: list[HostIssue] = _missing(query, columns, required)
    seen_uuids: set[str] = set()
    for position, line in table.rows:
        cells = line.split(_SEPARATOR)
        if len(cells) != len(columns):
            placed = query.place(line, columns)
            if placed is None:
                warnings.append(_misfit(query, line, len(columns), "skipped", HostErrorKind.UNPARSEABLE))
                continue
            warnings.append(
                _misfit(query, line, len(columns), "read the GPU name with ', ' from", HostErrorKind.UNPARSEABLE)
            )
            cells = placed
        values = dict(zip(columns, cells))
        index, index_issue = _gpu_index(values, position)
        if index_issue is not None:
            warnings.append(index_issue)
        if any(g.index == index for g in gpus):
            warnings.append(_duplicate(f"GPU {index}", line))
            continue
        gpu, value_issues = _gpu_from_row(values, index)
        uuid = gpu.uuid.lower() if gpu.uuid else None
        if uuid is not None and uuid in seen_uuids:
            warnings.append(_duplicate(f"the UUID of GPU {index}", line))
            continue
        if uuid is not None:
            seen_uuids.add(uuid)
        warnings += value_issues
        gpus.append(gpu)

    issues = _error_issues(table.errors, len(gpus))
    if not gpus and not table.errors:
        if warnings:
            issues.append(
                HostIssue(
                    HostErrorKind.UNPARSEABLE,
                    "nvidia-smi --query-gpu printed no readable GPU row",
                )
            )
        else:
            issues.append(
                HostIssue(
                    HostErrorKind.NO_DEVICES,
                    "nvidia-smi --query-gpu printed a header but no GPU",
                )
            )
    return gpus, [*issues, *warnings]


# ------------------------------------------------------------------------------------
# --query-compute-apps

_RE_NO_PROCESSES = re.compile(r"^No running (?:compute )?processes found", re.IGNORECASE)


def parse_compute_apps(
    text: str, fields: Sequence[str] | None = None, required: Sequence[str] = ()
) -> tuple[list[ComputeApp], list[HostIssue]]:
    """Parse ``nvidia-smi --query-compute-apps=... --format=csv[,noheader][,nounits]`` output.

    Columns by header name (or by ``fields`` without a header). ``process_name``, where
    printed, may hold ``", "``: the other columns are split off from the left and from the
    right and the name keeps the middle exactly. A header without rows, or no output at all,
    means no processes. A row that cannot be read (its pid is no pid, it has too few cells)
    is skipped with a ``probe_failed`` issue: the process list is then incomplete, and who
    runs what is not known. A row seen twice (same pid on the same GPU) is kept once; a memory
    value outside its range is unknown; a field in ``required`` missing from the header is
    unknown; all with an ``unparseable`` warning.
    """
    query = _APP_QUERY
    kept = "\n".join(line for line in _lines(text) if not _RE_NO_PROCESSES.match(line.strip()))
    table = _read_table(kept, fields, query)
    if table.columns is None:
        return [], _no_columns_issues(table, query)

    columns = table.columns
    free_column = query.free_column(columns)
    apps: list[ComputeApp] = []
    warnings: list[HostIssue] = _missing(query, columns, required) if table.rows else []
    seen: set[tuple[int, str | None]] = set()
    for _position, line in table.rows:
        cells = _split_row(line, len(columns), free_column)
        if cells is None:
            warnings.append(
                _misfit(query, line, len(columns), "skipped (process list incomplete)", HostErrorKind.PROBE_FAILED)
            )
            continue
        values = dict(zip(columns, cells))
        pid_text = values.get("pid")
        pid = _parse_natural(pid_text)
        if pid is None or pid not in LIMITS["pid"]:
            shown = _shown(pid_text) if pid_text is not None else "(none)"
            warnings.append(
                HostIssue(
                    HostErrorKind.PROBE_FAILED,
                    f"skipped a compute process whose pid {shown} is not a pid (process list incomplete): "
                    f"{_quote(line)}",
                )
            )
            continue
        uuid = parse_text(values.get("gpu_uuid"))
        bus = parse_text(values.get("gpu_bus_id"))
        key = (pid, uuid.lower()) if uuid else (pid, normalize_bus_id(bus))  # a GPU's UUID, else its bus id
        if key in seen:
            warnings.append(_duplicate(f"process {pid} on one GPU", line))
            continue
        seen.add(key)
        memory, reason = _reading(values.get("used_gpu_memory"), LIMITS["used_gpu_memory"])
        if reason is not None:
            warnings.append(_bad_value(f"process {pid}", "used_gpu_memory", values["used_gpu_memory"], reason))
        name = values.get("process_name", "")
        apps.append(
            ComputeApp(
                pid=pid,
                gpu_uuid=uuid,
                gpu_bus_id=bus,
                used_memory_mib=_as_int(memory),
                process_name="" if is_unknown(name) else _capped(name, MAX_TEXT_CHARS),
            )
        )
    return apps, [*_error_issues(table.errors, len(apps)), *warnings]


def _parse_natural(value: str | None) -> int | None:
    """A plain non-negative integer (a pid, seconds) of at most 19 digits, else ``None``."""
    if value is None:
        return None
    text = value.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 19:
        return None
    return int(text)


# ------------------------------------------------------------------------------------
# ps


def _first_bad(count: int, line: str) -> str:
    more = f" and {count - 1} more" if count > 1 else ""
    return f"{_quote(line)}{more}"


_ETIMES_RANGE = LIMITS["etimes"].range_text


def parse_ps(text: str) -> tuple[dict[int, PsEntry], list[HostIssue]]:
    """Parse ``ps -ww -o pid=,user:64=,etimes=`` output (owners), keyed by pid.

    The user is kept as printed (a name, or a UID when the name is unknown). A fourth
    column, when printed (older probes asked for ``args`` there), is the command line.

    Every line must be an owner: a line that is not (an error message, a fragment) and a pid
    printed twice (one of the two lines is not ps's own) are ``probe_failed`` issues, and a
    pid printed twice gets no owner: owners are then not known. A run time out of range is
    unknown, with an ``unparseable`` warning.
    """
    entries: dict[int, PsEntry] = {}
    twice: set[int] = set()
    unreadable: list[str] = []
    issues: list[HostIssue] = []
    for raw in _lines(text):
        if not raw.strip():
            continue
        parts = raw.strip().split(maxsplit=3)
        pid = _parse_natural(parts[0]) if len(parts) >= 3 else None
        elapsed_text = parts[2] if len(parts) >= 3 else ""
        elapsed = _parse_natural(elapsed_text)
        if pid is None or pid not in LIMITS["pid"] or (elapsed is None and elapsed_text != "-"):
            unreadable.append(raw)
            continue
        if elapsed is not None and elapsed not in LIMITS["etimes"]:
            issues.append(_bad_value(f"process {pid}", "etimes", elapsed_text, f"is out of range ({_ETIMES_RANGE})"))
            elapsed = None
        if pid in entries or pid in twice:
            twice.add(pid)
            entries.pop(pid, None)
            continue
        command = _capped(parts[3].rstrip(), MAX_COMMAND_CHARS) if len(parts) > 3 else ""
        user = _capped(parts[1], MAX_TEXT_CHARS)
        entries[pid] = PsEntry(pid=pid, user=user, elapsed_seconds=elapsed, command=command)
    if unreadable:
        issues.append(
            HostIssue(
                HostErrorKind.PROBE_FAILED,
                f"ps printed a line that is no process owner: {_first_bad(len(unreadable), unreadable[0])}; "
                "owners may be missing",
            )
        )
    if twice:
        shown = ", ".join(str(pid) for pid in sorted(twice)[:5])
        issues.append(
            HostIssue(
                HostErrorKind.PROBE_FAILED,
                f"ps printed process {shown} more than once; its owner is unknown",
            )
        )
    return entries, issues


def parse_ps_args(text: str) -> tuple[dict[int, str], list[HostIssue]]:
    """Parse ``ps -ww -o pid=,args=`` output: {pid: command line}.

    ps escapes newlines and control characters in command lines, so each line is one
    process. A line that does not start with a pid, or a pid printed twice (that pid's
    command becomes unknown), is an ``unparseable`` warning: command lines are only shown,
    never used to decide who owns what.
    """
    commands: dict[int, str] = {}
    twice: set[int] = set()
    unreadable: list[str] = []
    for raw in _lines(text):
        if not raw.strip():
            continue
        parts = raw.strip().split(maxsplit=1)
        pid = _parse_natural(parts[0])
        if pid is None or pid not in LIMITS["pid"]:
            unreadable.append(raw)
            continue
        if pid in commands or pid in twice:
            twice.add(pid)
            commands.pop(pid, None)
            continue
        commands[pid] = _capped(parts[1].rstrip(), MAX_COMMAND_CHARS) if len(parts) > 1 else ""
    issues: list[HostIssue] = []
    if unreadable:
        issues.append(
            HostIssue(
                HostErrorKind.UNPARSEABLE,
                f"ps printed a line that is no command line: {_first_bad(len(unreadable), unreadable[0])}",
            )
        )
    if twice:
        shown = ", ".join(str(pid) for pid in sorted(twice)[:5])
        issues.append(
            HostIssue(HostErrorKind.UNPARSEABLE, f"ps printed the command of process {shown} more than once; unknown")
        )
    return commands, issues


# ------------------------------------------------------------------------------------
# attribution


def _gpu_index_for(app: ComputeApp, gpus: Sequence[Gpu]) -> int | None:
    uuid = app.gpu_uuid.strip().lower() if app.gpu_uuid else None
    by_uuid = [g for g in gpus if uuid and g.uuid and g.uuid.strip().lower() == uuid]
    if len(by_uuid) == 1:
        return by_uuid[0].index
    bus = normalize_bus_id(app.gpu_bus_id)
    by_bus = [g for g in gpus if bus and normalize_bus_id(g.pci_bus_id) == bus]
    if by_uuid and len(by_bus) > 1:
        by_bus = [g for g in by_bus if g in by_uuid]
    if len(by_bus) == 1:
        return by_bus[0].index
    return None


def _program(command: str | None) -> str:
    """The first word of a command line: argv[0] as ps prints it (what nvidia-smi calls the
    process name, for any argv[0] without a blank)."""
    if not command:
        return ""
    words = command.split(maxsplit=1)
    return _capped(words[0], MAX_TEXT_CHARS) if words else ""


def attribute(
    gpus: Sequence[Gpu],
    apps: Sequence[ComputeApp],
    ps: Mapping[int, PsEntry],
    commands: Mapping[int, str] | None = None,
) -> tuple[GpuProcess, ...]:
    """Join compute apps to their GPU (by UUID, else PCI bus id) and to their ps owner.

    A UUID shared by several GPUs (masked captures) defers to the bus id; no match gives
    ``gpu_index=None``. A pid ps did not report gets ``user=None`` (and no command): the
    owner is never invented. ``commands`` ({pid: command line}, from the second ps listing)
    gives the command lines; without it, the ps entries' own. The name is nvidia-smi's
    ``process_name`` where it printed one, else the command's first word.
    """
    processes: list[GpuProcess] = []
    for app in apps:
        entry = ps.get(app.pid)
        command: str | None = None
        if entry is not None:
            command = entry.command if commands is None else commands.get(app.pid)
        processes.append(
            GpuProcess(
                pid=app.pid,
                gpu_index=_gpu_index_for(app, gpus),
                gpu_uuid=app.gpu_uuid,
                user=entry.user if entry is not None else None,
                name=app.process_name or _program(command),
                command=command,
                used_memory_mib=app.used_memory_mib,
                runtime_seconds=entry.elapsed_seconds if entry is not None else None,
            )
        )
    return tuple(processes)
