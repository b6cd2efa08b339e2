"""The one remote command per poll, and the turn of its output into a HostSnapshot.

A single ``sh -s`` exec runs a small POSIX script: ``nvidia-smi --query-gpu``,
``nvidia-smi --query-compute-apps``, then ``ps`` twice for just those PIDs (owners, then
command lines). Each step is bounded on the host by ``timeout`` and reports its own exit
status between section markers that carry a per-poll token::

    @@gpuwatch-probe 1 <token>
    @@begin gpu <token>
    <nvidia-smi output, stderr merged>
    @@end gpu <token> <exit status>
    ...

Output from a host is data written by its users (a command line is whatever its owner
typed), so a marker only counts with the token of this poll: :func:`new_token` gives 128
unguessable bits, which reach the host inside the script on ``sh -s``'s stdin and are
printed only by shell builtins (``echo``, ``printf``), so they are in no process's argv for
another user to read. With ``token=""`` the markers have no token (tests, older outputs).

Whatever a host prints, :func:`snapshot_from_output` gives that host's snapshot and never
raises: a section cut short is a warning (or, for the GPU list, a failure), never a silent
"ok" with its data missing.

New sections (CPU, memory, disk, containers) are new steps in the script and new entries in
:func:`split_sections`' result; the parsing of each lives in ``parse``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import secrets
import shlex
from dataclasses import dataclass

from . import parse
from .model import ComputeApp, Gpu, GpuProcess, HostErrorKind, HostIssue, HostSnapshot, PsEntry

log = logging.getLogger(__name__)

PROBE_MARKER = "@@gpuwatch-probe 1"
SECTIONS = ("gpu", "apps", "ps", "args")
TIMEOUT_EXITS = (124, 137)
MAX_WARNINGS = 20
"""Warnings kept per host; the rest are counted in one warning per kind."""

_TOKEN_RE = re.compile(r"[0-9A-Za-z]{8,128}")

_SCRIPT = r"""# gpuwatch probe: one exec per poll; every step bounded by timeout(1)
LC_ALL=C; export LC_ALL
PATH="$PATH:/usr/bin:/bin:/usr/sbin:/sbin:/usr/local/bin:/usr/local/nvidia/bin"; export PATH
T=__STEP__
SMI=__SMI__
run() { if command -v timeout >/dev/null 2>&1; then timeout -k 2 "$T" "$@"; else "$@"; fi; }
# The token (__K__) is printed by the builtins echo and printf only: never in an argv.
echo "@@gpuwatch-probe 1__K__"
echo "@@begin gpu__K__"
if ! command -v "$SMI" >/dev/null 2>&1; then
  echo "$SMI: command not found"
  printf '\n@@end gpu__K__ 127\n'
  exit 0
fi
run "$SMI" --query-gpu=__GPU_FIELDS__ --format=csv 2>&1
rc=$?
printf '\n@@end gpu__K__ %s\n' "$rc"
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then exit 0; fi
apps=$(run "$SMI" --query-compute-apps=__APP_FIELDS__ --format=csv 2>&1)
rc=$?
echo "@@begin apps__K__"
printf '%s\n' "$apps"
printf '\n@@end apps__K__ %s\n' "$rc"
pids=$(printf '%s\n' "$apps" | awk -F', ' 'NR > 1 && $1 ~ /^[0-9]+$/ { printf "%s%s", s, $1; s = "," }')
echo "@@begin ps__K__"
if [ -n "$pids" ]; then
  run ps -ww -o __PS_FORMAT__ -p "$pids" 2>&1
  printf '\n@@end ps__K__ %s\n' "$?"
  echo "@@begin args__K__"
  run ps -ww -o __ARGS_FORMAT__ -p "$pids" 2>&1
  printf '\n@@end args__K__ %s\n' "$?"
else
  printf '\n@@end ps__K__ 0\n'
fi
"""


def step_timeout(command_timeout: float) -> int:
    """Each step gets 40% of the command budget, so a hung first step still leaves time to report."""
    return max(1, int(command_timeout * 0.4))


def new_token() -> str:
    """A fresh marker token for one poll: 128 random bits, in hex."""
    return secrets.token_hex(16)


def _suffix(token: str) -> str:
    if token and not _TOKEN_RE.fullmatch(token):
        raise ValueError("a probe token is 8 to 128 letters and digits (use new_token())")
    return f" {token}" if token else ""


def build_script(command_timeout: float, nvidia_smi: str = "nvidia-smi", token: str = "") -> str:
    """The probe script for one host (``nvidia_smi`` may be a full path); ``token`` goes into
    every section marker (see :func:`new_token`)."""
    return (
        _SCRIPT.replace("__STEP__", str(step_timeout(command_timeout)))
        .replace("__SMI__", shlex.quote(nvidia_smi))
        .replace("__GPU_FIELDS__", ",".join(parse.GPU_QUERY_FIELDS))
        .replace("__APP_FIELDS__", ",".join(parse.APP_QUERY_FIELDS))
        .replace("__PS_FORMAT__", parse.PS_FORMAT)
        .replace("__ARGS_FORMAT__", parse.ARGS_FORMAT)
        .replace("__K__", _suffix(token))
    )


@dataclass(frozen=True)
class Section:
    text: str
    exit_status: int | None  # None: the step never reported (the probe was cut short)


@dataclass(frozen=True)
class _Read:
    sections: dict[str, Section]
    problems: tuple[str, ...]  # structure that the script never prints


def _read_sections(output: str, token: str) -> _Read | None:
    """Probe output -> its sections; None when the probe marker (with ``token``) is missing.

    Only whole lines equal to a marker with this poll's token count. A section whose end
    marker never came (the connection dropped, the output was cut) has ``exit_status=None``;
    when the output ended inside a line, that partial line is dropped. (After the last
    newline, ``split`` leaves "" or the partial line: either way not a line.)
    """
    suffix = _suffix(token)
    lines = [line.removesuffix("\r") for line in output.split("\n")]
    # Output cut inside a line: that line is partial (a marker's exit status may be cut to
    # another number), so it is no line at all.
    lines.pop()
    try:
        start = lines.index(PROBE_MARKER + suffix)
    except ValueError:
        return None
    begins = {f"@@begin {name}{suffix}": name for name in SECTIONS}
    end_re = re.compile(rf"@@end ({'|'.join(SECTIONS)}){re.escape(suffix)} ([0-9]{{1,3}})")
    sections: dict[str, Section] = {}
    problems: list[str] = []
    name: str | None = None
    skipping = False  # inside a section printed a second time
    outside = 0
    body: list[str] = []

    def close(status: int | None) -> None:
        assert name is not None
        if not skipping:
            sections[name] = Section("\n".join(body).strip("\n"), status)

    for line in lines[start + 1 :]:
        begin = begins.get(line)
        if begin is not None:
            if name is not None:
                close(None)
                problems.append(f"section {name} has no end marker")
            name, body = begin, []
            skipping = begin in sections
            if skipping:
                problems.append(f"section {begin} was printed twice")
            continue
        end = end_re.fullmatch(line) if name is not None else None
        if end is not None and end[1] == name:
            close(int(end[2]))
            name = None
        elif name is not None:
            body.append(line)
        elif line.strip():
            outside += 1  # the script prints nothing between its sections: a line lost its section
    if name is not None:
        close(None)
    if outside:
        problems.append(f"{outside} line{'s' if outside != 1 else ''} outside the sections")
    if not output.endswith("\n"):
        problems.append("it ends inside a line")  # the script's last byte is a newline
    return _Read(sections, tuple(problems))


def split_sections(output: str, token: str = "") -> dict[str, Section] | None:
    """Probe output -> {section name: Section}; None when the probe marker is missing."""
    read = _read_sections(output, token)
    return read.sections if read is not None else None


def _first_line(text: str) -> str:
    for line in text.split("\n"):
        if line.strip():
            return parse.quote(line)
    return "(no output)"


def snapshot_from_output(
    name: str,
    address: str,
    stdout: str,
    stderr: str = "",
    probe_seconds: float | None = None,
    command_timeout: float = 30.0,
    token: str = "",
) -> HostSnapshot:
    """Everything one probe printed -> the host's snapshot (pure, never raises).

    ``token`` is the one the script was built with (:func:`build_script`)."""
    try:
        return _snapshot(name, address, stdout, stderr, probe_seconds, command_timeout, token)
    except Exception as exc:  # a parser bug must cost this host's data, never the poll
        log.exception("could not read the probe output of %s", name)
        return HostSnapshot.failed(
            name,
            address,
            HostErrorKind.UNPARSEABLE,
            f"gpuwatch could not read this host's output ({type(exc).__name__}: {parse.quote(str(exc))}); "
            "this is a gpuwatch bug, please report it with the output of gpuwatch status --json",
            probe_seconds,
        )


def _cut_short(step: str, consequence: str) -> HostIssue:
    return HostIssue(
        HostErrorKind.PROBE_FAILED,
        f"the probe output ended while {step} was printing (the connection dropped or the output was cut "
        f"short); {consequence}",
    )


def _snapshot(
    name: str,
    address: str,
    stdout: str,
    stderr: str,
    probe_seconds: float | None,
    command_timeout: float,
    token: str,
) -> HostSnapshot:
    read = _read_sections(stdout, token)
    if read is None or "gpu" not in read.sections:
        shown = _first_line(stdout) if stdout.strip() else _first_line(stderr)
        return HostSnapshot.failed(
            name, address, HostErrorKind.UNPARSEABLE, f"unexpected probe output: {shown!r}", probe_seconds
        )
    sections = read.sections
    gpu_sec = sections["gpu"]
    if gpu_sec.exit_status in TIMEOUT_EXITS:
        return HostSnapshot.failed(
            name,
            address,
            HostErrorKind.PROBE_TIMEOUT,
            f"nvidia-smi did not answer within {step_timeout(command_timeout)}s and was killed; "
            "the driver may be hung or a GPU may have fallen off the bus",
            probe_seconds,
        )
    if gpu_sec.exit_status is None:
        # Some GPUs may be missing from a list cut short: no GPU data is better than a wrong count.
        return HostSnapshot.failed(
            name,
            address,
            HostErrorKind.PROBE_TIMEOUT,
            "the probe was cut short before nvidia-smi finished listing the GPUs "
            "(the connection dropped or the output was cut)",
            probe_seconds,
        )
    gpus, issues = parse.parse_query_gpu(gpu_sec.text, required=parse.GPU_QUERY_FIELDS)
    failure = parse.query_gpu_failure(gpu_sec.text, gpu_sec.exit_status)
    if not gpus:
        issue = failure or (issues[0] if issues else None)
        if issue is None:
            issue = HostIssue(HostErrorKind.NO_DEVICES, "nvidia-smi listed no GPUs")
        return HostSnapshot.failed(name, address, issue.kind, issue.message, probe_seconds)
    warnings = list(issues)
    if failure is not None and failure not in warnings:
        warnings.append(failure)
    for structure in read.problems:
        warnings.append(
            HostIssue(HostErrorKind.PROBE_FAILED, f"the probe output is malformed ({structure}); processes unknown")
        )

    apps: list[ComputeApp] = []
    apps_sec = sections.get("apps")
    if apps_sec is None:
        warnings.append(HostIssue(HostErrorKind.PROBE_FAILED, "the process query did not run; processes unknown"))
    else:
        apps, app_issues = parse.parse_compute_apps(apps_sec.text, required=parse.APP_QUERY_FIELDS)
        warnings += app_issues
        if apps_sec.exit_status is None:
            warnings.append(_cut_short("nvidia-smi --query-compute-apps", "processes unknown"))
        elif apps_sec.exit_status != 0 and not apps:
            problem = parse.compute_apps_failure(apps_sec.text, apps_sec.exit_status)
            text = problem.message if problem else _first_line(apps_sec.text)
            warnings.append(HostIssue(HostErrorKind.PROBE_FAILED, f"process query failed: {text}"))

    ps_entries: dict[int, PsEntry] = {}
    ps_sec = sections.get("ps")
    if ps_sec is not None:
        ps_entries, ps_issues = parse.parse_ps(ps_sec.text)
        # ps exits 1 when some PIDs are gone: normal. Anything else means owners are unknown.
        if ps_sec.exit_status not in (0, 1, None) and not ps_entries:
            warnings.append(
                HostIssue(HostErrorKind.PROBE_FAILED, f"ps failed ({_first_line(ps_sec.text)}); owners unknown")
            )
        else:
            warnings += ps_issues
            if ps_sec.exit_status is None:
                warnings.append(_cut_short("ps", "owners unknown"))
    elif apps:
        warnings.append(HostIssue(HostErrorKind.PROBE_FAILED, "ps did not run; owners unknown"))

    commands = _commands(sections.get("args"), ps_entries, warnings)
    processes = _checked(parse.attribute(gpus, apps, ps_entries, commands), gpus, warnings)
    return HostSnapshot(
        name=name,
        address=address,
        ok=True,
        probe_seconds=probe_seconds,
        gpus=tuple(sorted(gpus, key=lambda g: g.index)),
        processes=processes,
        warnings=_bounded(warnings),
    )


def _commands(args_sec: Section | None, entries: dict[int, PsEntry], warnings: list[HostIssue]) -> dict[int, str]:
    """Command lines: from the ``args`` listing, or (older probes) from the owners listing."""
    if args_sec is None:
        commands = {pid: entry.command for pid, entry in entries.items() if entry.command}
        if entries and not commands:
            warnings.append(HostIssue(HostErrorKind.UNPARSEABLE, "the command lines were not listed; unknown"))
        return commands
    commands, issues = parse.parse_ps_args(args_sec.text)
    warnings += issues
    if args_sec.exit_status is None:
        cut = _cut_short("ps", "some command lines unknown")
        warnings.append(HostIssue(HostErrorKind.UNPARSEABLE, cut.message))
    return commands


def _checked(processes: tuple[GpuProcess, ...], gpus: list[Gpu], warnings: list[HostIssue]) -> tuple[GpuProcess, ...]:
    """A process cannot hold more memory than its GPU has: such a reading is unknown."""
    totals = {g.index: g.memory_total_mib for g in gpus}
    checked: list[GpuProcess] = []
    for process in processes:
        total = totals.get(process.gpu_index) if process.gpu_index is not None else None
        if process.used_memory_mib is not None and total is not None and process.used_memory_mib > total:
            warnings.append(
                HostIssue(
                    HostErrorKind.UNPARSEABLE,
                    f"process {process.pid}: used_gpu_memory {process.used_memory_mib} MiB is more than its GPU "
                    f"{process.gpu_index}'s memory.total {total} MiB; taken as unknown",
                )
            )
            process = dataclasses.replace(process, used_memory_mib=None)
        checked.append(process)
    return tuple(checked)


def _bounded(warnings: list[HostIssue]) -> tuple[HostIssue, ...]:
    """At most MAX_WARNINGS distinct warnings; the rest become one count per kind, so the
    kinds the rules read (gpu_lost, probe_failed, ...) all survive."""
    unique = list(dict.fromkeys(warnings))
    if len(unique) <= MAX_WARNINGS:
        return tuple(unique)
    kept = unique[: MAX_WARNINGS - 1]
    rest: dict[HostErrorKind, int] = {}
    for warning in unique[MAX_WARNINGS - 1 :]:
        rest[warning.kind] = rest.get(warning.kind, 0) + 1
    for kind, count in rest.items():
        kept.append(HostIssue(kind, f"... and {count} more {kind.value} warning{'s' if count != 1 else ''}"))
    return tuple(kept)
