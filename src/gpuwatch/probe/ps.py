"""The ps step: owners (``ps -o pid=,user:64=,etimes=``) and command lines (``ps -o pid=,args=``)
of the pids the apps step listed. Its reader also joins the compute apps to their GPU and owner."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from gpuwatch import parse
from gpuwatch.model import Gpu, GpuProcess, HostErrorKind, HostIssue, PsEntry

from .state import HostProbe
from .step import Draft, Step, StepOutput, cut_short, first_line

_PS = r"""echo "@@begin ps__K__"
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


def _fill(probe: HostProbe | None) -> Mapping[str, str]:
    return {"__PS_FORMAT__": parse.PS_FORMAT, "__ARGS_FORMAT__": parse.ARGS_FORMAT}


def _read(draft: Draft) -> None:
    """The owners and command lines, then the join: each compute app with its GPU and owner."""
    warnings = draft.warnings
    ps_entries: dict[int, PsEntry] = {}
    ps_sec = draft.sections.get("ps")
    if ps_sec is not None:
        ps_entries, ps_issues = parse.parse_ps(ps_sec.text)
        # ps exits 1 when some PIDs are gone: normal. Anything else means owners are unknown.
        if ps_sec.exit_status not in (0, 1, None) and not ps_entries:
            warnings.append(
                HostIssue(HostErrorKind.PROBE_FAILED, f"ps failed ({first_line(ps_sec.text)}); owners unknown")
            )
        else:
            warnings += ps_issues
            if ps_sec.exit_status is None:
                warnings.append(cut_short("ps", "owners unknown"))
    elif draft.apps:
        warnings.append(HostIssue(HostErrorKind.PROBE_FAILED, "ps did not run; owners unknown"))
    commands = _commands(draft.sections.get("args"), ps_entries, warnings)
    joined = parse.attribute(draft.gpus, draft.apps, ps_entries, commands)
    draft.processes = _checked(joined, draft.gpus, warnings)


def _commands(args_sec: StepOutput | None, entries: dict[int, PsEntry], warnings: list[HostIssue]) -> dict[int, str]:
    """Command lines: from the ``args`` listing, or (older probes) from the owners listing."""
    if args_sec is None:
        commands = {pid: entry.command for pid, entry in entries.items() if entry.command}
        if entries and not commands:
            warnings.append(HostIssue(HostErrorKind.UNPARSEABLE, "the command lines were not listed; unknown"))
        return commands
    commands, issues = parse.parse_ps_args(args_sec.text)
    warnings += issues
    if args_sec.exit_status is None:
        cut = cut_short("ps", "some command lines unknown")
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


STEP = Step("ps", _PS, ("ps", "args"), _fill, _read)
