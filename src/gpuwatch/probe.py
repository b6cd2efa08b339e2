"""The one remote command per poll, and the turn of its output into a HostSnapshot.

A single ``sh -s`` exec runs a small POSIX script: ``nvidia-smi --query-gpu``,
``nvidia-smi --query-compute-apps``, then ``ps`` for just those PIDs. Each step is bounded
on the host by ``timeout`` and reports its own exit status between section markers::

    @@gpuwatch-probe 1
    @@begin gpu
    <nvidia-smi output, stderr merged>
    @@end gpu <exit status>
    ...

New sections (CPU, memory, disk, containers) are new steps in the script and new entries in
:func:`split_sections`' result; the parsing of each lives in ``parse``.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from . import parse
from .model import ComputeApp, HostErrorKind, HostIssue, HostSnapshot, PsEntry

PROBE_MARKER = "@@gpuwatch-probe 1"
TIMEOUT_EXITS = (124, 137)

_SCRIPT = r"""# gpuwatch probe: one exec per poll; every step bounded by timeout(1)
LC_ALL=C; export LC_ALL
PATH="$PATH:/usr/bin:/bin:/usr/sbin:/sbin:/usr/local/bin:/usr/local/nvidia/bin"; export PATH
T=__STEP__
SMI=__SMI__
run() { if command -v timeout >/dev/null 2>&1; then timeout -k 2 "$T" "$@"; else "$@"; fi; }
echo "@@gpuwatch-probe 1"
echo "@@begin gpu"
if ! command -v "$SMI" >/dev/null 2>&1; then
  echo "$SMI: command not found"
  printf '\n@@end gpu 127\n'
  exit 0
fi
run "$SMI" --query-gpu=__GPU_FIELDS__ --format=csv 2>&1
rc=$?
printf '\n@@end gpu %s\n' "$rc"
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then exit 0; fi
apps=$(run "$SMI" --query-compute-apps=__APP_FIELDS__ --format=csv 2>&1)
rc=$?
echo "@@begin apps"
printf '%s\n' "$apps"
printf '\n@@end apps %s\n' "$rc"
pids=$(printf '%s\n' "$apps" | awk -F', ' 'NR > 1 && $1 ~ /^[0-9]+$/ { printf "%s%s", s, $1; s = "," }')
echo "@@begin ps"
if [ -n "$pids" ]; then
  run ps -ww -o __PS_FORMAT__ -p "$pids" 2>&1
  printf '\n@@end ps %s\n' "$?"
else
  printf '\n@@end ps 0\n'
fi
"""


def step_timeout(command_timeout: float) -> int:
    """Each step gets 40% of the command budget, so a hung first step still leaves time to report."""
    return max(1, int(command_timeout * 0.4))


def build_script(command_timeout: float, nvidia_smi: str = "nvidia-smi") -> str:
    """The probe script for one host (``nvidia_smi`` may be a full path)."""
    return (
        _SCRIPT.replace("__STEP__", str(step_timeout(command_timeout)))
        .replace("__SMI__", shlex.quote(nvidia_smi))
        .replace("__GPU_FIELDS__", ",".join(parse.GPU_QUERY_FIELDS))
        .replace("__APP_FIELDS__", ",".join(parse.APP_QUERY_FIELDS))
        .replace("__PS_FORMAT__", parse.PS_FORMAT)
    )


@dataclass(frozen=True)
class Section:
    text: str
    exit_status: int | None  # None: the step never reported (the probe was cut short)


def split_sections(output: str) -> dict[str, Section] | None:
    """Probe output -> {section name: Section}; None when the probe marker is missing."""
    lines = output.splitlines()
    try:
        start = lines.index(PROBE_MARKER)
    except ValueError:
        return None
    sections: dict[str, Section] = {}
    name: str | None = None
    body: list[str] = []
    for line in lines[start + 1 :]:
        if line.startswith("@@begin ") and name is None:
            name, body = line[len("@@begin ") :].strip(), []
        elif name is not None and line.startswith(f"@@end {name} "):
            status_text = line.rsplit(" ", 1)[1]
            status = int(status_text) if status_text.lstrip("-").isdigit() else None
            sections[name] = Section("\n".join(body).strip("\n"), status)
            name = None
        elif name is not None:
            body.append(line)
    if name is not None:
        sections[name] = Section("\n".join(body).strip("\n"), None)
    return sections


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:200]
    return "(no output)"


def snapshot_from_output(
    name: str,
    address: str,
    stdout: str,
    stderr: str = "",
    probe_seconds: float | None = None,
    command_timeout: float = 30.0,
) -> HostSnapshot:
    """Everything one probe printed -> the host's snapshot (pure)."""
    sections = split_sections(stdout)
    if sections is None or "gpu" not in sections:
        shown = _first_line(stdout) if stdout.strip() else _first_line(stderr)
        return HostSnapshot.failed(
            name, address, HostErrorKind.UNPARSEABLE, f"unexpected probe output: {shown!r}", probe_seconds
        )
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
    gpus, issues = parse.parse_query_gpu(gpu_sec.text)
    failure = parse.classify_nvidia_smi_error(gpu_sec.text, gpu_sec.exit_status)
    if gpu_sec.exit_status is None:
        failure = failure or HostIssue(
            HostErrorKind.PROBE_TIMEOUT, "the probe was cut short before nvidia-smi finished"
        )
    if not gpus:
        issue = failure or (issues[0] if issues else None)
        if issue is None:
            issue = HostIssue(HostErrorKind.NO_DEVICES, "nvidia-smi listed no GPUs")
        return HostSnapshot.failed(name, address, issue.kind, issue.message, probe_seconds)
    warnings = list(issues)
    if failure is not None and failure not in warnings:
        warnings.append(failure)

    apps: list[ComputeApp] = []
    apps_sec = sections.get("apps")
    if apps_sec is None:
        warnings.append(HostIssue(HostErrorKind.PROBE_FAILED, "the process query did not run; processes unknown"))
    else:
        apps, app_issues = parse.parse_compute_apps(apps_sec.text)
        warnings += app_issues
        if apps_sec.exit_status not in (0, None) and not apps:
            problem = parse.classify_nvidia_smi_error(apps_sec.text, apps_sec.exit_status)
            text = problem.message if problem else _first_line(apps_sec.text)
            warnings.append(HostIssue(HostErrorKind.PROBE_FAILED, f"process query failed: {text}"))

    ps_entries: dict[int, PsEntry] = {}
    ps_sec = sections.get("ps")
    if ps_sec is not None:
        ps_entries = parse.parse_ps(ps_sec.text)
        # ps exits 1 when some PIDs are gone: normal. Anything else means owners are unknown.
        if ps_sec.exit_status not in (0, 1, None) and not ps_entries:
            warnings.append(
                HostIssue(HostErrorKind.PROBE_FAILED, f"ps failed ({_first_line(ps_sec.text)}); owners unknown")
            )
    elif apps:
        warnings.append(HostIssue(HostErrorKind.PROBE_FAILED, "ps did not run; owners unknown"))

    processes = parse.attribute(gpus, apps, ps_entries)
    return HostSnapshot(
        name=name,
        address=address,
        ok=True,
        probe_seconds=probe_seconds,
        gpus=tuple(sorted(gpus, key=lambda g: g.index)),
        processes=processes,
        warnings=tuple(dict.fromkeys(warnings)),
    )
