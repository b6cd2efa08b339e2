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
from .model import FleetSnapshot, Gpu, GpuProcess, HostSnapshot
from .report import alert_words
from .rules import AlertRecord, Silence, inhibited
from .summary import is_free, totals, users_on
from .text import UNKNOWN, format_duration, iso_time, local_time, number, plural


def no_data_text(host: HostSnapshot, now: datetime) -> str:
    """Why a host has no current data, for people: down with its reason, or stale with its age."""
    kind = host.error_kind.value if host.error_kind else "error"
    if not host.stale:
        return f"DOWN {kind}: {host.error}"
    age = host.age_seconds(now)
    last = plural(len(host.gpus), "GPU") if host.ok else f"{kind}: {host.error}"
    return f"STALE: no new result for {format_duration(age)} (last: {last})"


def _memory(gpu: Gpu) -> str:
    return f"{number(gpu.memory_used_mib)} / {number(gpu.memory_total_mib)}"


def _users(processes: tuple[GpuProcess, ...]) -> str:
    return " ".join(f"{usage.label()}({number(usage.memory_mib, 'M')})" for usage in users_on(processes))


def fleet_table(snapshot: FleetSnapshot, thresholds: FreeGpuConfig) -> str:
    """The fleet as an aligned table: one line per GPU, one line per host that did not answer."""
    header = ("HOST", "GPU", "NAME", "UTIL", "MEM USED/TOTAL MiB", "TEMP", "USERS", "FREE")
    rows: list[tuple[str, ...]] = []
    notes: list[str] = []
    for host in snapshot.hosts:
        if not host.current:
            rows.append((host.name, "-", no_data_text(host, snapshot.taken_at), "", "", "", "", ""))
            continue
        for gpu in host.gpus:
            procs = host.processes_on(gpu)
            rows.append(
                (
                    host.name,
                    str(gpu.index),
                    gpu.name or UNKNOWN,
                    number(gpu.utilization_percent, "%"),
                    _memory(gpu),
                    number(gpu.temperature_c, "C"),
                    _users(procs),
                    "free" if is_free(gpu, procs, thresholds) else "",
                )
            )
        orphans = tuple(p for p in host.processes if p.gpu_index is None)
        if orphans:
            notes.append(f"{host.name}: processes on an unlisted GPU: {_users(orphans)}")
        notes.extend(f"{host.name}: warning: {w.message}" for w in host.warnings)
    widths = [len(h) for h in header]
    for row in rows:
        if row[1] == "-":  # a down host's message spans the rest of the line
            widths[0] = max(widths[0], len(row[0]))
            continue
        widths = [max(w, len(c)) for w, c in zip(widths, row)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths)).rstrip()]
    for row in rows:
        if row[1] == "-":
            lines.append(f"{row[0].ljust(widths[0])}  {'-'.ljust(widths[1])}  {row[2]}")
        else:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    t = totals(snapshot, thresholds)
    lines.append("")
    lines.append(
        f"{t.hosts - t.hosts_down - t.hosts_stale} of {plural(t.hosts, 'host')} answered"
        + (f", {t.hosts_stale} stale" if t.hosts_stale else "")
        + f", {plural(t.gpus, 'GPU')}, {t.free_gpus} free"
        f" (taken {local_time(snapshot.taken_at)})"
    )
    lines += notes
    return "\n".join(lines)


def gpu_dict(gpu: Gpu, free: bool = False) -> dict[str, Any]:
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
        "error_kind": host.error_kind.value if host.error_kind else None,
        "probe_seconds": None if host.probe_seconds is None else round(host.probe_seconds, 3),
        "taken_at": _iso(host.taken_at),
        "stale": host.stale,
        "last_ok_at": _iso(host.last_ok_at),
        "failing_since": _iso(host.failing_since),
        "gpus": [gpu_dict(g, host.current and is_free(g, host.processes_on(g), limits)) for g in host.gpus],
        "processes": [process_dict(p) for p in host.processes],
        "warnings": [{"kind": w.kind.value, "message": w.message} for w in host.warnings],
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


def alerts_dict(
    records: Mapping[str, AlertRecord],
    silences: Iterable[Silence],
    now: float,
    include_pending: bool = False,
    *,
    taken_at: float | None = None,
    poll_every: float = 60.0,
) -> dict[str, Any]:
    """The alerts for programs: when a poll last updated them (``taken_at``, ``stale`` after 3 poll
    intervals without one), each alert with its summary, silences and inhibitions, and the
    silences in force."""
    in_force = [s for s in silences if s.ends_at > now]
    rows = alert_rows(records, in_force, now, include_pending)
    return {
        "taken_at": _iso_or_none(taken_at),
        "stale": alert_state_stale(taken_at, now, poll_every),
        "alerts": [alert_dict(row) for row in rows],
        "silences": [silence_dict(s) for s in in_force],
    }
