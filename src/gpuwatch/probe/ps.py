"""The ps step: owners (``ps -o pid=,etimes=,uid=,user:64=``), the names of their uids
(``getent passwd``) and command lines (``ps -o pid=,args=``) of the pids the apps step listed. Its
reader also joins the compute apps to their GPU and owner.

The owner's name is the one ``getent`` gives for the process's uid: it comes as bytes whatever the
locale (ps prints ``?`` for each non-ASCII byte of a name under the probe's ``LC_ALL=C``, so
``josé`` and ``josô`` would merge), and a name with blanks (``john doe`` from AD/LDAP) is one name.
Where getent does not answer, the name ps printed (the rest of its line) stands in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from gpuwatch import attribution, parse
from gpuwatch.model import Gpu, GpuProcess, HostErrorKind, HostIssue, PsEntry

from .state import HostProbe
from .step import QUICK_SECONDS, TIMEOUT_EXITS, Draft, Step, StepOutput, cut_short, first_line

MAX_UIDS = 64
"""Uids looked up per poll (the owners of one host's GPU processes: a handful)."""

_UIDS_AWK = r"""NF >= 4 && $1 ~ /^[0-9]+$/ && $3 ~ /^[0-9]+$/ && length($3) <= 10 && !seen[$3]++ && n++ < max {
  printf "%s ", $3 }"""

_PS = r"""echo "@@begin ps__K__"
if [ -n "$pids" ]; then
  echo "format __OWNERS_FORMAT__"
  got=$(grab run ps -ww -o __OWNERS_FORMAT__ -p "$pids"); took ps ps
  printf '%s' "$out"
  printf '\n@@end ps__K__ %s\n' "$rc"
  U=$(printf '%s\n' "$out" | awk -v max=__MAX_UIDS__ '__UIDS_AWK__')
  out=
  if [ -n "$U" ] && command -v getent >/dev/null 2>&1; then
    echo "@@begin uids__K__"
    quick getent passwd $U 2>&1
    printf '\n@@end uids__K__ %s\n' "$?"
  fi
  echo "@@begin args__K__"
  run ps -ww -o __ARGS_FORMAT__ -p "$pids" 2>&1
  printf '\n@@end args__K__ %s\n' "$?"
else
  printf '\n@@end ps__K__ 0\n'
fi
"""


def _fill(probe: HostProbe | None) -> Mapping[str, str]:
    return {
        "__OWNERS_FORMAT__": parse.OWNERS_FORMAT,
        "__ARGS_FORMAT__": parse.ARGS_FORMAT,
        "__MAX_UIDS__": str(MAX_UIDS),
        "__UIDS_AWK__": _UIDS_AWK,
    }


def _read(draft: Draft) -> None:
    """The owners and command lines, then the join: each compute app with its GPU and owner."""
    warnings = draft.warnings
    ps_entries: dict[int, PsEntry] = {}
    ps_sec = draft.sections.get("ps")
    if ps_sec is not None:
        listing, owners_format = _listing(ps_sec.text)
        if owners_format:
            ps_entries, uids, ps_issues = parse.parse_owners(listing)
            ps_entries = _named(ps_entries, uids, draft.sections.get("uids"), warnings)
        else:  # an older probe's listing: pid=,user:64=,etimes=
            ps_entries, ps_issues = parse.parse_ps(listing)
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


def _listing(text: str) -> tuple[str, bool]:
    """The ``ps`` section's listing, and whether it is in :data:`parse.OWNERS_FORMAT` (the probe
    prints that format's name first; ps's own lines come after it, so none can claim it)."""
    first, _, rest = text.partition("\n")
    if first == f"format {parse.OWNERS_FORMAT}":
        return rest, True
    return text, False


def _named(
    entries: dict[int, PsEntry], uids: Mapping[int, int], names_sec: StepOutput | None, warnings: list[HostIssue]
) -> dict[int, PsEntry]:
    """Each owner under the name getent gave for its uid (ps's own where getent gave none)."""
    if names_sec is None:
        return entries
    names, issues = attribution.parse_passwd(names_sec.text)
    warnings += issues
    if names_sec.exit_status is None:
        warnings.append(cut_short("getent", "some owners are shown as ps printed them", HostErrorKind.UNPARSEABLE))
    elif names_sec.exit_status in TIMEOUT_EXITS:
        warnings.append(
            HostIssue(
                HostErrorKind.UNPARSEABLE,
                f"getent passwd did not answer within {QUICK_SECONDS}s (is the user directory reachable?); "
                "some owners are shown as ps printed them",
            )
        )
    named = dict(entries)
    for pid, uid in uids.items():
        name = names.get(uid)
        if name is not None:
            named[pid] = dataclasses.replace(entries[pid], user=name)
    return named


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


STEP = Step("ps", _PS, ("ps", "uids", "args"), _fill, _read)
