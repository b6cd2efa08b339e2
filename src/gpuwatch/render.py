"""Snapshots for people and programs: the terminal fleet table and the JSON documents.

``snapshot_dict`` is the one fleet document (``status --json`` and ``/api/v1/snapshot``);
``alerts_dict`` the one alerts document (``alerts --json`` and ``/api/v1/alerts``). Times in them
are ISO 8601 with their offset, never epoch seconds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .config import FreeGpuConfig
from .fleet import STALE_AFTER_POLLS
from .model import (
    Container,
    Disk,
    FleetSnapshot,
    Gpu,
    GpuHealth,
    GpuProcess,
    HostContext,
    HostSnapshot,
    Reservation,
    SlurmJob,
)
from .report import alert_words
from .reservation import reserved_words
from .rules import Ack, AlertRecord, Silence, inhibited
from .summary import context_line, gpu_free, totals, users_on
from .text import UNKNOWN, format_duration, iso_time, local_time, number, paint, plural


def no_data_text(host: HostSnapshot, now: datetime) -> str:
    """Why a host has no current data, for people: down with its reason, or stale with its age."""
    kind = host.error_name
    if not host.stale:
        return f"DOWN {kind}: {host.error}"
    age = host.age_seconds(now)
    last = plural(len(host.gpus), "GPU") if host.ok else f"{kind}: {host.error}"
    return f"STALE: no new result for {format_duration(age)} (last: {last})"


def _memory(gpu: Gpu) -> str:
    return f"{number(gpu.memory_used_mib)} / {number(gpu.memory_total_mib)}"


def _users(processes: tuple[GpuProcess, ...]) -> str:
    return " ".join(f"{usage.label()}({number(usage.memory_mib, 'M')})" for usage in users_on(processes))


@dataclass(frozen=True)
class TableOptions:
    """What ``status`` shows beyond the default columns (gpustat's ``-p``, ``-c``, ``-P``).

    ``pids``, ``commands`` or ``runtime``: each process on its own, as gpustat writes it
    (``alice:python/4242(19818M, 3h12m)``) instead of grouped by owner; ``power``: a POWER column
    (``power.draw`` in watts); ``context``: each host's context line; ``color``: escape codes."""

    pids: bool = False
    commands: bool = False
    runtime: bool = False
    power: bool = False
    context: bool = True
    color: bool = False

    @property
    def per_process(self) -> bool:
        return self.pids or self.commands or self.runtime


def _command_word(proc: GpuProcess) -> str:
    """The executable's name (``python3``): the last part of nvidia-smi's process name (a path that
    may hold spaces), else the first word of ps's command line."""
    path = proc.name.strip() or (proc.command or "").split(" ", 1)[0]
    return path.rstrip("/").rsplit("/", 1)[-1] or UNKNOWN


def _process_text(proc: GpuProcess, options: TableOptions) -> str:
    """One process as gpustat writes it: ``owner[:command][/pid](memory[, runtime])``."""
    text = proc.owner or UNKNOWN
    if options.commands:
        text += f":{_command_word(proc)}"
    if options.pids:
        text += f"/{proc.pid}"
    inner = number(proc.used_memory_mib, "M")
    if options.runtime:
        inner += f", {format_duration(proc.runtime_seconds)}"
    return f"{text}({inner})"


def _processes(processes: tuple[GpuProcess, ...], options: TableOptions) -> str:
    if not options.per_process:
        return _users(processes)
    return " ".join(_process_text(p, options) for p in processes)


def _heat(value: int | None, warm: int, hot: int) -> str | None:
    if value is None:
        return None
    return "red" if value >= hot else "yellow" if value >= warm else "green"


def fleet_table(
    snapshot: FleetSnapshot,
    thresholds: FreeGpuConfig,
    options: TableOptions | None = None,
    *,
    whole: FleetSnapshot | None = None,
) -> str:
    """The fleet as an aligned table: one line per GPU, one line per host that did not answer,
    then the summary, each host's context line and the notes.

    ``whole``: the fleet before ``status`` filtered it (``--user``, ``--free``) into ``snapshot``:
    the summary then counts the whole fleet and says how many GPUs are shown, and only the hosts
    with a GPU shown get their context line and notes."""
    options = options or TableOptions()
    header = ["HOST", "GPU", "NAME", "UTIL", "MEM USED/TOTAL MiB", "TEMP"]
    header += ["POWER"] * options.power + ["PROCESSES" if options.per_process else "USERS", "FREE"]
    rows: list[list[tuple[str, str | None]]] = []  # cells: (text, style)
    downs: list[tuple[str, str, bool]] = []  # (host, reason, stale): spans the rest of the line
    notes: list[str] = []
    contexts: list[str] = []  # a line per host: load, memory, disks, uptime, kernel, driver
    filtered = whole is not None
    # Colours as gpustat uses them: the host bold, the index cyan, the model blue, readings by how high.
    for host in snapshot.hosts:
        if not host.current:
            rows.append([(host.name, "bold")])
            downs.append((host.name, no_data_text(host, snapshot.taken_at), host.stale))
            continue
        for gpu in host.gpus:
            procs = host.processes_on(gpu)
            row = [
                (host.name, "bold"),
                (str(gpu.index), "cyan"),
                (gpu.name or UNKNOWN, "blue"),
                (number(gpu.utilization_percent, "%"), _heat(gpu.utilization_percent, 30, 90)),
                (_memory(gpu), "yellow"),
                (number(gpu.temperature_c, "C"), _heat(gpu.temperature_c, 60, 80)),
            ]
            if options.power:
                row.append((number(None if gpu.power_w is None else round(gpu.power_w), "W"), "dim"))
            row.append((_processes(procs, options), None))
            row.append(_free_cell(host, gpu, thresholds))
            rows.append(row)
        if filtered and not host.gpus:
            continue  # nothing of this host is shown: nor its context
        orphans = tuple(p for p in host.processes if p.gpu_index is None)
        if orphans:
            notes.append(f"{host.name}: processes on an unlisted GPU: {_processes(orphans, options)}")
        notes.extend(f"{host.name}: warning: {w.message}" for w in host.warnings)
        line = context_line(host) if options.context else None
        if line is not None:
            contexts.append(line)
    lines = _aligned(header, rows, downs, options.color)
    lines.append("")
    lines.append(_summary_line(snapshot, whole, thresholds))
    lines += contexts
    lines += notes
    return "\n".join(lines)


def _aligned(
    header: list[str], rows: list[list[tuple[str, str | None]]], downs: list[tuple[str, str, bool]], color: bool
) -> list[str]:
    """The header and rows padded to their columns, then coloured (escape codes take no width)."""
    widths = [len(h) for h in header]
    for row in rows:
        widths = [max(w, len(cell[0])) for w, cell in zip(widths, row)] + widths[len(row) :]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths)).rstrip()]
    down = iter(downs)
    for row in rows:
        if len(row) == 1:  # a host without current data: its reason spans the rest of the line
            _, reason, stale = next(down)
            name = paint(row[0][0].ljust(widths[0]), "bold", color)
            lines.append(f"{name}  {'-'.ljust(widths[1])}  {paint(reason, 'yellow' if stale else 'red', color)}")
            continue
        cells = [paint(text.ljust(w), style, color) if text else text.ljust(w) for (text, style), w in zip(row, widths)]
        lines.append("  ".join(cells).rstrip())
    return lines


def _summary_line(snapshot: FleetSnapshot, whole: FleetSnapshot | None, thresholds: FreeGpuConfig) -> str:
    """``1 of 2 hosts answered, 8 GPUs, 2 free`` for the whole fleet; when filtered, how many are shown."""
    t = totals(whole or snapshot, thresholds)
    line = (
        f"{t.hosts - t.hosts_down - t.hosts_stale} of {plural(t.hosts, 'host')} answered"
        + (f", {t.hosts_stale} stale" if t.hosts_stale else "")
        + f", {plural(t.gpus, 'GPU')}, {t.free_gpus} free"
    )
    if whole is not None:
        line += f"; {plural(sum(len(h.gpus) for h in snapshot.answered), 'GPU')} shown"
    return line + f" (taken {local_time(snapshot.taken_at)})"


def _free_cell(host: HostSnapshot, gpu: Gpu, thresholds: FreeGpuConfig) -> tuple[str, str | None]:
    """The FREE column: ``free``, ``reserved for bob until ...`` (a booking in force), or empty."""
    booking = host.reservation_on(gpu)
    if booking is not None:
        return (reserved_words(booking), "yellow")
    return ("free" if gpu_free(host, gpu, thresholds) else "", "green")


def _reserved_dict(booking: Reservation | None) -> dict[str, Any] | None:
    if booking is None:
        return None
    return {"id": booking.id, "user": booking.user, "until": iso_time(booking.ends_at), "comment": booking.comment}


def gpu_dict(gpu: Gpu, free: bool = False, reserved: Reservation | None = None) -> dict[str, Any]:
    """One GPU for programs; ``reserved``: the booking in force on it (``reserved_for``: its id,
    user, end and comment), which makes it free for no one else."""
    return {
        "index": gpu.index,
        "uuid": gpu.uuid,
        "name": gpu.name,
        "pci_bus_id": gpu.pci_bus_id,
        "utilization_percent": gpu.utilization_percent,
        "memory_used_mib": gpu.memory_used_mib,
        "memory_total_mib": gpu.memory_total_mib,
        "temperature_c": gpu.temperature_c,
        "power_w": _finite(gpu.power_w),
        "free": free,
        "reserved_for": _reserved_dict(reserved),
        "health": None if gpu.health is None else health_dict(gpu.health),
    }


def health_dict(health: GpuHealth) -> dict[str, Any]:
    return {
        "ecc_uncorrected_volatile": health.ecc_uncorrected_volatile,
        "ecc_uncorrected_aggregate": health.ecc_uncorrected_aggregate,
        "retired_pages_double_bit": health.retired_pages_double_bit,
        "retired_pages_pending": health.retired_pages_pending,
        "remapped_rows_pending": health.remapped_rows_pending,
        "remapped_rows_failure": health.remapped_rows_failure,
        "hw_slowdown": health.hw_slowdown,
        "hw_thermal_slowdown": health.hw_thermal_slowdown,
        "hw_power_brake_slowdown": health.hw_power_brake_slowdown,
        "persistence_mode": health.persistence_mode,
        "driver_version": health.driver_version,
    }


def _finite(value: float | None) -> float | None:
    """JSON has no infinity or NaN: a reading that is not a finite number is unknown."""
    return value if value is not None and math.isfinite(value) else None


def process_dict(proc: GpuProcess) -> dict[str, Any]:
    return {
        "gpu_index": proc.gpu_index,
        "gpu_uuid": proc.gpu_uuid,
        "pid": proc.pid,
        "user": proc.user,
        "name": proc.name,
        "command": proc.command,
        "used_memory_mib": proc.used_memory_mib,
        "runtime_seconds": proc.runtime_seconds,
        "owner": proc.owner,
        "owner_source": proc.owner_source,
        "container": None if proc.container is None else container_dict(proc.container),
        "slurm_job": None if proc.slurm_job is None else slurm_dict(proc.slurm_job),
        "session_user": proc.session_user,
        "cgroup_note": proc.cgroup_note,
    }


def container_dict(container: Container) -> dict[str, Any]:
    return {
        "runtime": container.runtime,
        "id": container.id,
        "name": container.name,
        "image": container.image,
        "pod": container.pod,
        "namespace": container.namespace,
        "pod_uid": container.pod_uid,
        "rootless_uid": container.rootless_uid,
    }


def slurm_dict(job: SlurmJob) -> dict[str, Any]:
    return {"job_id": job.job_id, "step": job.step, "uid": job.uid, "user": job.user}


def disk_dict(disk: Disk) -> dict[str, Any]:
    return {
        "mount": disk.mount,
        "fs_type": disk.fs_type,
        "size_kib": disk.size_kib,
        "used_kib": disk.used_kib,
        "available_kib": disk.available_kib,
        "use_percent": disk.use_percent,
        "paths": list(disk.paths),
    }


def context_dict(context: HostContext) -> dict[str, Any]:
    return {
        "load_1m": _finite(context.load_1m),
        "load_5m": _finite(context.load_5m),
        "load_15m": _finite(context.load_15m),
        "cpus": context.cpus,
        "memory_total_kib": context.memory_total_kib,
        "memory_available_kib": context.memory_available_kib,
        "memory_used_kib": context.memory_used_kib,
        "swap_total_kib": context.swap_total_kib,
        "swap_used_kib": context.swap_used_kib,
        "uptime_seconds": _finite(context.uptime_seconds),
        "boot_time": None if context.boot_time is None else iso_time(context.boot_time),
        "kernel": context.kernel,
        "driver_version": context.driver_version,
        "cuda_version": context.cuda_version,
        "disks_known": context.disks_known,
        "disks": [disk_dict(d) for d in context.disks],
    }


def _iso(when: datetime | None) -> str | None:
    return None if when is None else iso_time(when)


def host_dict(host: HostSnapshot, thresholds: FreeGpuConfig | None = None) -> dict[str, Any]:
    limits = thresholds or FreeGpuConfig()
    return {
        "name": host.name,
        "address": host.address,
        "ok": host.ok,
        "error": host.error,
        "error_kind": None if host.ok else host.error_name,
        "probe_seconds": None if host.probe_seconds is None else round(host.probe_seconds, 3),
        "taken_at": _iso(host.taken_at),
        "stale": host.stale,
        "last_ok_at": _iso(host.last_ok_at),
        "failing_since": _iso(host.failing_since),
        "gpus": [gpu_dict(g, host.current and gpu_free(host, g, limits), host.reservation_on(g)) for g in host.gpus],
        "processes": [process_dict(p) for p in host.processes],
        "warnings": [{"kind": w.kind.value, "message": w.message} for w in host.warnings],
        "context": None if host.context is None else context_dict(host.context),
    }


def snapshot_dict(snapshot: FleetSnapshot, thresholds: FreeGpuConfig | None = None) -> dict[str, Any]:
    """The fleet for programs; ``thresholds`` (``free_gpu:``) decide each GPU's ``free``."""
    limits = thresholds or FreeGpuConfig()
    t = totals(snapshot, limits)
    return {
        "taken_at": iso_time(snapshot.taken_at),
        "summary": {
            "hosts": t.hosts,
            "hosts_down": t.hosts_down,
            "hosts_stale": t.hosts_stale,
            "gpus": t.gpus,
            "free_gpus": t.free_gpus,
        },
        "hosts": [host_dict(h, limits) for h in snapshot.hosts],
    }


@dataclass(frozen=True)
class AlertRow:
    """An alert as listed: its record, the silences muting it, the alerts inhibiting it."""

    record: AlertRecord
    silenced_by: list[int] = field(default_factory=list)  # silence ids
    inhibited_by: list[str] = field(default_factory=list)  # alert ids

    @property
    def muted(self) -> bool:
        return bool(self.silenced_by or self.inhibited_by)


def alert_rows(
    records: Mapping[str, AlertRecord], silences: Iterable[Silence], now: float, include_pending: bool = False
) -> list[AlertRow]:
    """Alerts to show, firing first then oldest first, each with the silences muting it and the
    alerts inhibiting it."""
    in_force = list(silences)
    by = inhibited(records.values())
    rows = []
    for record in sorted(records.values(), key=lambda r: (r.state != "firing", r.since)):
        if record.state != "firing" and not include_pending:
            continue
        silenced_by = [s.id for s in in_force if s.matches(record.key, now)]
        rows.append(AlertRow(record, silenced_by, by.get(record.key.id, [])))
    return rows


def alert_state_stale(taken_at: float | None, now: float, poll_every: float) -> bool:
    """Is the alert state old: no poll updated it for 3 poll intervals (or none ever did)?"""
    return taken_at is None or now - taken_at > STALE_AFTER_POLLS * poll_every


def _iso_or_none(when: float | None) -> str | None:
    return None if when is None else iso_time(when)


def alert_dict(row: AlertRow) -> dict[str, Any]:
    record = row.record
    data = record.as_dict()
    for key in ("since", "fired_at", "last_sent_at"):
        data[key] = _iso_or_none(data[key])
    return {
        "id": record.key.id,
        **data,
        "summary": alert_words(record).summary,
        "silenced_by": row.silenced_by,
        "inhibited_by": row.inhibited_by,
    }


def silence_dict(silence: Silence) -> dict[str, Any]:
    return {
        "id": silence.id,
        "rule": silence.rule,
        "host": silence.host,
        "user": silence.user,
        "gpu": silence.gpu,
        "pid": silence.pid,
        "author": silence.author,
        "comment": silence.comment,
        "created_at": iso_time(silence.created_at),
        "ends_at": iso_time(silence.ends_at),
    }


def ack_dict(ack: Ack) -> dict[str, Any]:
    """An acknowledgement for programs: who, when, why, the fields it was given, the alerts it covers."""
    return {
        "id": ack.id,
        "author": ack.author,
        "created_at": iso_time(ack.created_at),
        "comment": ack.comment,
        "ends_at": _iso_or_none(ack.ends_at),
        "rule": ack.rule,
        "host": ack.host,
        "user": ack.user,
        "gpu": ack.gpu,
        "pid": ack.pid,
        "alerts": sorted(ack.alerts),
    }


def alerts_dict(
    records: Mapping[str, AlertRecord],
    silences: Iterable[Silence],
    now: float,
    include_pending: bool = False,
    *,
    taken_at: float | None = None,
    poll_every: float = 60.0,
    acks: Iterable[Ack] = (),
) -> dict[str, Any]:
    """The alerts for programs: when a poll last updated them (``taken_at``, ``stale`` after 3 poll
    intervals without one), each alert with its summary, silences, inhibitions and the acks
    covering it (``acknowledged``), then the silences and the acks in force."""
    in_force = [s for s in silences if s.ends_at > now]
    live = [a for a in acks if a.live(records, now)]
    rows = alert_rows(records, in_force, now, include_pending)
    alerts = []
    for row in rows:
        alert = alert_dict(row)
        alert["acknowledged"] = [ack_dict(a) for a in live if a.covers(row.record, now)]
        alerts.append(alert)
    return {
        "taken_at": _iso_or_none(taken_at),
        "stale": alert_state_stale(taken_at, now, poll_every),
        "alerts": alerts,
        "silences": [silence_dict(s) for s in in_force],
        "acks": [ack_dict(a) for a in live],
    }
