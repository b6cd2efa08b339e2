"""Turn the text a probe brought back from a host into records.

This module owns: reading ``nvidia-smi --query-gpu`` and ``--query-compute-apps`` CSV
output; classifying nvidia-smi's error messages and exit codes into ``HostErrorKind``;
reading ``ps -o pid=,user:64=,etimes=,args=`` output; joining compute apps to their GPU
and their ps owner. It also owns the field lists the probe queries (``GPU_QUERY_FIELDS``,
``APP_QUERY_FIELDS``, ``PS_FORMAT``), so what is asked and what is read cannot drift.

Pure functions over text: no I/O, nothing runs at import time. The parsers never raise
on odd input; what they cannot use becomes a ``HostIssue``.

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
    GpuProcess,
    HostErrorKind,
    HostIssue,
    PsEntry,
)

__all__ = [
    "APP_QUERY_FIELDS",
    "GPU_QUERY_FIELDS",
    "PS_FORMAT",
    "attribute",
    "classify_nvidia_smi_error",
    "is_unknown",
    "normalize_bus_id",
    "parse_compute_apps",
    "parse_float",
    "parse_int",
    "parse_ps",
    "parse_query_gpu",
    "parse_text",
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

APP_QUERY_FIELDS: tuple[str, ...] = (
    "pid",
    "gpu_uuid",
    "gpu_bus_id",
    "used_gpu_memory",
    "process_name",
)
"""``nvidia-smi --query-compute-apps=`` fields; ``process_name`` last (it may hold ", ")."""

PS_FORMAT = "pid=,user:64=,etimes=,args="
"""``ps -ww -o`` format: no header; a user column wide enough for long names."""

_SEPARATOR = ", "
_MAX_QUOTE = 200

# Aliases nvidia-smi accepts in a query; its header always prints the canonical name.
_GPU_ALIASES: Mapping[str, str] = {
    "gpu_name": "name",
    "gpu_uuid": "uuid",
    "gpu_bus_id": "pci.bus_id",
    "gpu_serial": "serial",
}
_APP_ALIASES: Mapping[str, str] = {
    "name": "process_name",
    "used_memory": "used_gpu_memory",
}

_UNIT_SUFFIX_RE = re.compile(r"\s*\[[^\]]*\]\s*$")
_HEADER_CELL_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*(?: \[[^\]]*\])?$")
_NUMBER_RE = re.compile(r"^([-+]?(?:\d+(?:\.\d*)?|\.\d+))(?:\s*[A-Za-z%/°]+)?$")
_BUS_ID_RE = re.compile(
    r"^(?P<domain>[0-9a-f]{1,8}):(?P<bus>[0-9a-f]{1,2}):"
    r"(?P<device>[0-9a-f]{1,2})\.(?P<function>[0-7])$"
)


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


def parse_text(value: str | None) -> str | None:
    """The value stripped of surrounding blanks, or ``None`` when it is unknown."""
    if value is None or is_unknown(value):
        return None
    return value.strip()


def _number_text(value: str | None) -> str | None:
    if value is None or is_unknown(value):
        return None
    match = _NUMBER_RE.match(value.strip())
    return match.group(1) if match else None


def parse_float(value: str | None) -> float | None:
    """A number with or without its unit (``433.78 W``, ``45 %``, ``11125``)."""
    number = _number_text(value)
    if number is None:
        return None
    try:
        return float(number)
    except ValueError:  # pragma: no cover - the regex only lets numbers through
        return None


def parse_int(value: str | None) -> int | None:
    """An integer with or without its unit (``11125 MiB``, ``53``); decimals round."""
    number = _number_text(value)
    if number is None:
        return None
    try:
        return int(number)
    except ValueError:
        try:
            return round(float(number))
        except ValueError:  # pragma: no cover - the regex only lets numbers through
            return None


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


def _quote(line: str) -> str:
    text = line.strip()
    if len(text) > _MAX_QUOTE:
        text = text[: _MAX_QUOTE - 3].rstrip() + "..."
    return text


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
        return _LineError(_RANK_VERSION, HostErrorKind.DRIVER_MISMATCH, version["version"])
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
_APP_QUERY = _Query("--query-compute-apps", APP_QUERY_FIELDS, _APP_ALIASES, "pid", "process_name")


@dataclass(frozen=True)
class _Table:
    columns: tuple[str, ...] | None  # None: no header and no field list
    rows: tuple[tuple[int, str], ...]  # (position among data lines, line as printed)
    errors: tuple[_LineError, ...]
    first_data_line: str | None


def _read_table(text: str, fields: Sequence[str] | None, query: _Query) -> _Table:
    """Separate the header, the data lines and the nvidia-smi error lines."""
    columns: tuple[str, ...] | None = None
    header_seen = False
    rows: list[tuple[int, str]] = []
    errors: list[_LineError] = []
    first_data_line: str | None = None
    for line in _lines(text):
        if not line.strip():
            continue
        # Specific nvidia-smi messages are never data; catch-alls only when no row fits.
        error = _classify_line(line, generic=False)
        if error is not None:
            errors.append(error)
            continue
        if _looks_like_header(line, query.vocabulary, query.aliases):
            if not header_seen and not rows:
                cells = line.strip().split(_SEPARATOR)
                columns = tuple(_field_name(cell, query.aliases) for cell in cells)
                header_seen = True
            continue  # a repeated header (two outputs concatenated) is no row either
        if columns is None and fields is not None:
            columns = tuple(_field_name(field, query.aliases) for field in fields)
        if columns is None or query.place(line, columns) is None:
            generic = _classify_line(line, generic=True)
            if generic is not None:
                errors.append(generic)
                continue
        if first_data_line is None:
            first_data_line = line
        rows.append((len(rows), line))
    if columns is None and fields is not None:
        columns = tuple(_field_name(field, query.aliases) for field in fields)
    return _Table(columns, tuple(rows), tuple(errors), first_data_line)


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


def _misfit(query: _Query, line: str, width: int, action: str) -> HostIssue:
    count = len(line.split(_SEPARATOR))
    return HostIssue(
        HostErrorKind.UNPARSEABLE,
        f"{action} a {query.label} row with {count} fields where {width} were expected: {_quote(line)}",
    )


# ------------------------------------------------------------------------------------
# --query-gpu


def parse_query_gpu(text: str, fields: Sequence[str] | None = None) -> tuple[list[Gpu], list[HostIssue]]:
    """Parse ``nvidia-smi --query-gpu=... --format=csv[,noheader][,nounits]`` output.

    With a header, columns are found by name, in any order and among any number of
    other columns. Without one (``noheader``), ``fields`` names the queried fields in
    order. Unknown values become ``None``; ``index`` comes from nvidia-smi (the row
    position only when ``index`` was not queried). Error lines mixed into the rows (a
    lost GPU) come back as issues beside the GPUs; if the whole output is an error, no
    GPUs and that one classified issue.
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
    warnings: list[HostIssue] = []
    for position, line in table.rows:
        cells = line.split(_SEPARATOR)
        if len(cells) != len(columns):
            placed = query.place(line, columns)
            if placed is None:
                warnings.append(_misfit(query, line, len(columns), "skipped"))
                continue
            warnings.append(_misfit(query, line, len(columns), "read the GPU name with ', ' from"))
            cells = placed
        values = dict(zip(columns, cells))
        index = parse_int(values["index"]) if "index" in values else position
        if index is None:
            index = position
            warnings.append(
                HostIssue(
                    HostErrorKind.UNPARSEABLE,
                    f"GPU index {values['index']!r} is not a number; numbered {position} by its row position",
                )
            )
        gpus.append(
            Gpu(
                index=index,
                uuid=parse_text(values.get("uuid")),
                name=parse_text(values.get("name")),
                pci_bus_id=parse_text(values.get("pci.bus_id")),
                utilization_percent=parse_int(values.get("utilization.gpu")),
                memory_used_mib=parse_int(values.get("memory.used")),
                memory_total_mib=parse_int(values.get("memory.total")),
                temperature_c=parse_int(values.get("temperature.gpu")),
                power_w=parse_float(values.get("power.draw")),
            )
        )

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


def parse_compute_apps(text: str, fields: Sequence[str] | None = None) -> tuple[list[ComputeApp], list[HostIssue]]:
    """Parse ``nvidia-smi --query-compute-apps=... --format=csv[,noheader][,nounits]`` output.

    Columns by header name (or by ``fields`` without a header). ``process_name`` may hold ``", "``:
    the other columns are split off from the left and from the right and the name keeps the
    middle exactly. A header without rows, or no output at all, means no processes. Rows whose
    pid is not a number are skipped with a warning.
    """
    query = _APP_QUERY
    kept = "\n".join(line for line in _lines(text) if not _RE_NO_PROCESSES.match(line.strip()))
    table = _read_table(kept, fields, query)
    if table.columns is None:
        return [], _no_columns_issues(table, query)

    columns = table.columns
    free_column = query.free_column(columns)
    apps: list[ComputeApp] = []
    warnings: list[HostIssue] = []
    for _position, line in table.rows:
        cells = _split_row(line, len(columns), free_column)
        if cells is None:
            warnings.append(_misfit(query, line, len(columns), "skipped"))
            continue
        values = dict(zip(columns, cells))
        pid_text = values.get("pid")
        pid = _parse_natural(pid_text)
        if pid is None:
            warnings.append(
                HostIssue(
                    HostErrorKind.UNPARSEABLE,
                    f"skipped a compute process whose pid is not a number ({pid_text!r}): {_quote(line)}",
                )
            )
            continue
        name = values.get("process_name", "")
        apps.append(
            ComputeApp(
                pid=pid,
                gpu_uuid=parse_text(values.get("gpu_uuid")),
                gpu_bus_id=parse_text(values.get("gpu_bus_id")),
                used_memory_mib=parse_int(values.get("used_gpu_memory")),
                process_name="" if is_unknown(name) else name,
            )
        )
    return apps, [*_error_issues(table.errors, len(apps)), *warnings]


def _parse_natural(value: str | None) -> int | None:
    """A plain non-negative integer (a pid, seconds), else ``None``."""
    if value is None:
        return None
    text = value.strip()
    return int(text) if text.isascii() and text.isdigit() else None


# ------------------------------------------------------------------------------------
# ps


def parse_ps(text: str) -> dict[int, PsEntry]:
    """Parse ``ps -ww -o pid=,user:64=,etimes=,args=`` output, keyed by pid.

    The user is kept as printed (a name, or a UID when the name is unknown); args keep
    their inner spacing and may be empty. Lines that do not fit (a header, garbage) are
    skipped.
    """
    entries: dict[int, PsEntry] = {}
    for raw in _lines(text):
        parts = raw.strip("\r\n").split(maxsplit=3)
        if len(parts) < 3:
            continue
        pid = _parse_natural(parts[0])
        if pid is None:
            continue
        elapsed_text = parts[2]
        elapsed = _parse_natural(elapsed_text)
        if elapsed is None and elapsed_text != "-":
            continue
        command = parts[3].rstrip() if len(parts) > 3 else ""
        entries[pid] = PsEntry(pid=pid, user=parts[1], elapsed_seconds=elapsed, command=command)
    return entries


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


def attribute(gpus: Sequence[Gpu], apps: Sequence[ComputeApp], ps: Mapping[int, PsEntry]) -> tuple[GpuProcess, ...]:
    """Join compute apps to their GPU (by UUID, else PCI bus id) and to their ps owner.

    A UUID shared by several GPUs (masked captures) defers to the bus id; no match gives
    ``gpu_index=None``. A pid ps did not report gets ``user=None``: the owner is never
    invented.
    """
    processes: list[GpuProcess] = []
    for app in apps:
        entry = ps.get(app.pid)
        processes.append(
            GpuProcess(
                pid=app.pid,
                gpu_index=_gpu_index_for(app, gpus),
                gpu_uuid=app.gpu_uuid,
                user=entry.user if entry is not None else None,
                name=app.process_name,
                command=entry.command if entry is not None else None,
                used_memory_mib=app.used_memory_mib,
                runtime_seconds=entry.elapsed_seconds if entry is not None else None,
            )
        )
    return tuple(processes)
