"""nvidia-smi's error messages and exit codes, classified into ``HostErrorKind`` with a fix in words.

A line is recognised on its own (:func:`classify_line`); several recognised lines merge into the
most fundamental cause (:func:`merge_line_errors`); :func:`classify_nvidia_smi_error` reads a whole
output and its exit status. The table reader only asks about lines that do not fit as data rows.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from gpuwatch.model import HostErrorKind, HostIssue

from .values import SEPARATOR, excerpt, split_lines

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
class LineError:
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
RANK_VERSION = 99  # "NVML library version: X" only completes a mismatch message

_MSG_NOT_FOUND = "nvidia-smi is not installed on this host or not on the PATH of the SSH session"
_RE_PATH_NOT_FOUND = re.compile(r"^(?P<path>/\S+?)'?:\s*(?:command not found|not found|No such file or directory)\s*$")


def _not_found(line: str) -> str:
    """Not found: a configured full path (``nvidia_smi: /opt/bin/nvidia-smi``) is no such file;
    a bare name is not on the PATH."""
    path = _RE_PATH_NOT_FOUND.match(line.strip())
    if path is None:
        return _MSG_NOT_FOUND
    return f"no such file: {excerpt(path['path'])} (or the login user may not run it); check the nvidia_smi setting"
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


def mismatch_message(version: str | None) -> str:
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
        f"nvidia-smi cannot reach GPU {address} ({excerpt(reason_text)}); "
        "the GPU is unusable until it is recovered, usually by a reboot"
    )


def classify_line(line: str, generic: bool = True) -> LineError | None:
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
        return LineError(_RANK_NOT_FOUND, HostErrorKind.NVIDIA_SMI_NOT_FOUND, _not_found(text))
    if failed_to_run or _RE_NOT_EXECUTABLE.search(text):
        return LineError(_RANK_NOT_FOUND, HostErrorKind.NVIDIA_SMI_NOT_FOUND, _MSG_NOT_EXECUTABLE)
    if _RE_MISMATCH.search(text):
        return LineError(_RANK_MISMATCH, HostErrorKind.DRIVER_MISMATCH, mismatch_message(None))
    version = _RE_NVML_VERSION.search(text)
    if version:
        return LineError(RANK_VERSION, HostErrorKind.DRIVER_MISMATCH, excerpt(version["version"], 40))
    if _RE_NVML_UNKNOWN.search(text):
        return LineError(_RANK_DRIVER, HostErrorKind.DRIVER_NOT_LOADED, _MSG_NVML_UNKNOWN)
    if _RE_NVML_PERMISSION.search(text):
        return LineError(_RANK_PERMISSION, HostErrorKind.PERMISSION_DENIED, _MSG_PERMISSION)
    if _RE_NO_LIBRARY.search(text):
        return LineError(_RANK_DRIVER, HostErrorKind.DRIVER_NOT_LOADED, _MSG_NO_LIBRARY)
    other = _RE_NVML_OTHER.search(text)
    if other:
        message = f"NVML could not start ({excerpt(other['reason'])}); the NVIDIA driver is not answering"
        return LineError(_RANK_DRIVER, HostErrorKind.DRIVER_NOT_LOADED, message)
    if _RE_NO_DRIVER.search(text):
        return LineError(_RANK_DRIVER, HostErrorKind.DRIVER_NOT_LOADED, _MSG_NO_DRIVER)
    handle = _RE_DEVICE_HANDLE.search(text)
    if handle:
        address, reason = handle["address"], handle["reason"]
        if re.search(r"Insufficient Permissions", reason, re.IGNORECASE):
            message = f"no permission to query GPU {address} (Insufficient Permissions)"
            return LineError(_RANK_PERMISSION, HostErrorKind.PERMISSION_DENIED, message, address)
        return LineError(
            _RANK_GPU_LOST,
            HostErrorKind.GPU_LOST,
            _gpu_lost_message(address, reason),
            address,
        )
    handle_any = _RE_DEVICE_HANDLE_ANY.search(text)
    if handle_any:
        message = (
            f"nvidia-smi cannot reach a GPU ({excerpt(handle_any['rest'])}); "
            "it has likely fallen off the bus: reboot the host to recover it"
        )
        return LineError(_RANK_GPU_LOST, HostErrorKind.GPU_LOST, message)
    if _RE_FALLEN_OFF.search(text):
        message = "a GPU has fallen off the bus; reboot the host to recover it"
        return LineError(_RANK_GPU_LOST, HostErrorKind.GPU_LOST, message)
    if _RE_NO_DEVICES.search(text):
        return LineError(_RANK_NO_DEVICES, HostErrorKind.NO_DEVICES, _MSG_NO_DEVICES)
    if _RE_PERMISSION.search(text):
        return LineError(_RANK_PERMISSION, HostErrorKind.PERMISSION_DENIED, _MSG_PERMISSION)
    inforom = _RE_INFOROM.search(text)
    if inforom:
        where = f" on GPU {inforom['address']}" if inforom["address"] else ""
        message = f"the infoROM is corrupted{where}; the GPU may still work but needs checking"
        return LineError(_RANK_GENERIC, HostErrorKind.PROBE_FAILED, message, inforom["address"])
    if generic and SEPARATOR not in text and _RE_GENERIC.search(text):
        return LineError(_RANK_GENERIC, HostErrorKind.PROBE_FAILED, f"nvidia-smi: {excerpt(text)}")
    return None


def merge_line_errors(errors: Sequence[LineError]) -> HostIssue | None:
    """The most fundamental cause among several error lines, as one issue."""
    causes = [e for e in errors if e.rank != RANK_VERSION]
    if not causes:
        return None
    top = min(e.rank for e in causes)
    chosen = [e for e in causes if e.rank == top]
    first = chosen[0]
    if first.kind is HostErrorKind.DRIVER_MISMATCH:
        versions = [e.message for e in errors if e.rank == RANK_VERSION]
        return HostIssue(first.kind, mismatch_message(versions[0] if versions else None))
    messages = list(dict.fromkeys(e.message for e in chosen))
    return HostIssue(first.kind, "; ".join(messages))


def _exit_code_issue(text: str, exit_code: int) -> HostIssue:
    first = next((line.strip() for line in split_lines(text) if line.strip()), "")
    quoted = f": {excerpt(first)}" if first else " and printed nothing"
    if exit_code == 127:
        return HostIssue(HostErrorKind.NVIDIA_SMI_NOT_FOUND, _not_found(first))
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
    errors = [e for e in (classify_line(line) for line in split_lines(text)) if e is not None]
    issue = merge_line_errors(errors)
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
