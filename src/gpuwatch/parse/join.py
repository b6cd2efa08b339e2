"""The join: compute apps to their GPU (by UUID, else PCI bus id) and to their ps owner."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from gpuwatch.model import ComputeApp, Gpu, GpuProcess, PsEntry

from .values import MAX_TEXT_CHARS, capped, normalize_bus_id


def _gpu_index_for(app: ComputeApp, gpus: Sequence[Gpu], uuids: Sequence[str | None]) -> int | None:
    """``uuids``: each GPU's UUID stripped and in lower case (None: it has none)."""
    uuid = app.gpu_uuid.strip().lower() if app.gpu_uuid else None
    by_uuid = [g for g, g_uuid in zip(gpus, uuids) if g_uuid == uuid] if uuid else []
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
    return capped(words[0], MAX_TEXT_CHARS) if words else ""


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
    uuids = [g.uuid.strip().lower() if g.uuid else None for g in gpus]
    gpu_of: dict[tuple[str | None, str | None], int | None] = {}  # the apps of one GPU share its ids
    for app in apps:
        where = (app.gpu_uuid, app.gpu_bus_id)
        if where not in gpu_of:
            gpu_of[where] = _gpu_index_for(app, gpus, uuids)
        entry = ps.get(app.pid)
        command: str | None = None
        if entry is not None:
            command = entry.command if commands is None else commands.get(app.pid)
        processes.append(
            GpuProcess(
                pid=app.pid,
                gpu_index=gpu_of[where],
                gpu_uuid=app.gpu_uuid,
                user=entry.user if entry is not None else None,
                name=app.process_name or _program(command),
                command=command,
                used_memory_mib=app.used_memory_mib,
                runtime_seconds=entry.elapsed_seconds if entry is not None else None,
            )
        )
    return tuple(processes)
