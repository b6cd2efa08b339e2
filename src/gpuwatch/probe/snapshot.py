"""One probe output -> the host's snapshot: a loop over the steps' readers.

Whatever a host prints, :func:`snapshot_from_output` gives that host's snapshot and never raises:
a section cut short is a warning (or, for the GPU list, a failure), never a silent "ok" with its
data missing.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

from gpuwatch import parse
from gpuwatch.model import HostErrorKind, HostIssue, HostSnapshot

from .output import read_output
from .script import SECTIONS, STEPS
from .state import HostProbe
from .step import Draft, Step, StepOutput, first_line

log = logging.getLogger(__name__)

MAX_WARNINGS = 20
"""Warnings kept per host; the rest are counted in one warning per kind."""


def split_sections(output: str, token: str = "") -> dict[str, StepOutput] | None:
    """Probe output -> {section name: StepOutput}; None when the probe marker is missing."""
    read = read_output(output, token, SECTIONS)
    return read.sections if read is not None else None


def snapshot_from_output(
    name: str,
    address: str,
    stdout: str,
    stderr: str = "",
    probe_seconds: float | None = None,
    command_timeout: float = 30.0,
    token: str = "",
    probe: HostProbe | None = None,
    steps: Sequence[Step] = STEPS,
) -> HostSnapshot:
    """Everything one probe printed -> the host's snapshot (never raises).

    ``token`` is the one the script was built with (:func:`~gpuwatch.probe.script.build_script`).
    ``probe``, the same :class:`HostProbe` the script was built with, learns from the output (health
    fields, CUDA version, containers, uids): the only state this function changes. ``steps``: those
    the script was built with."""
    try:
        return assemble_snapshot(name, address, stdout, stderr, probe_seconds, command_timeout, token, probe, steps)
    except Exception as exc:  # a parser bug must cost this host's data, never the poll
        log.exception("could not read the probe output of %s", name)
        return HostSnapshot.failed(
            name,
            address,
            HostErrorKind.UNPARSEABLE,
            f"gpuwatch could not read this host's output ({type(exc).__name__}: {parse.excerpt(str(exc))}); "
            "this is a gpuwatch bug, please report it with the output of gpuwatch status --json",
            probe_seconds,
        )


def assemble_snapshot(
    name: str,
    address: str,
    stdout: str,
    stderr: str,
    probe_seconds: float | None,
    command_timeout: float,
    token: str,
    probe: HostProbe | None = None,
    steps: Sequence[Step] = STEPS,
) -> HostSnapshot:
    """:func:`snapshot_from_output` unguarded (a reader's exception propagates: the fuzzer's view).

    Each step reads its sections into one draft, in order; a failure (only the GPU step sets one:
    no probe output, no GPU list, a hung nvidia-smi) ends the loop with a failed snapshot that keeps
    the host's context."""
    read = read_output(stdout, token, [name for step in steps for name in step.sections])
    if read is None:
        shown = first_line(stdout) if stdout.strip() else first_line(stderr)
        return HostSnapshot.failed(
            name, address, HostErrorKind.UNPARSEABLE, f"unexpected probe output: {shown!r}", probe_seconds
        )
    draft = Draft(read.sections, read.problems, probe, command_timeout, stdout, stderr)
    for step in steps:
        step.read(draft)
        if draft.failure is not None:
            failed = HostSnapshot.failed(name, address, draft.failure.kind, draft.failure.message, probe_seconds)
            return dataclasses.replace(failed, context=draft.context)
    return HostSnapshot(
        name=name,
        address=address,
        ok=True,
        probe_seconds=probe_seconds,
        gpus=tuple(sorted(draft.gpus, key=lambda g: g.index)),
        processes=draft.processes,
        warnings=_bounded(draft.warnings),
        context=draft.context,
    )


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
