"""Pure: snapshots -> channel-neutral messages (overview, one user's processes, free GPUs).

Each host is one block, so a channel that splits a long report never cuts a host in half.
A host that did not answer is always listed with its reason: a report never lets a dead
host look like an idle one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, tzinfo

from .config import FreeGpuConfig, format_duration
from .model import FleetSnapshot, Gpu, GpuProcess, HostSnapshot
from .notify.base import Message
from .rules import AlertKey, Notice, Transition
from .summary import free_gpus, is_free, plural, totals, users_on

MAX_COMMAND_CHARS = 120


def _stamp(snapshot: FleetSnapshot, tz: tzinfo | None = None) -> str:
    """The poll's time in the reader's zone: this machine's local time unless ``tz`` is given."""
    return snapshot.taken_at.astimezone(tz).strftime("%Y-%m-%d %H:%M %Z").strip()


def _n(value: int | None) -> str:
    return "N/A" if value is None else str(value)


def _runtime(seconds: int | None) -> str:
    return "?" if seconds is None else format_duration(seconds)


def _down_line(host: HostSnapshot, now: datetime | None = None) -> str:
    kind = host.error_kind.value if host.error_kind else "error"
    if host.stale and now is not None:
        last = f"{len(host.gpus)} GPUs" if host.ok else f"{kind}: {host.error}"
        return f"{host.name}: STALE, no new result for {format_duration(host.age_seconds(now))} (last: {last})"
    return f"{host.name}: NO DATA ({kind}): {host.error}"


def _no_data_block(snapshot: FleetSnapshot) -> list[str]:
    """Hosts that did not answer, said plainly: what they run is not known, not "nothing"."""
    if not snapshot.down:
        return []
    return ["Not known (no data): " + "; ".join(_down_line(h, snapshot.taken_at) for h in snapshot.down)]


def _gpu_line(gpu: Gpu) -> str:
    util = "N/A" if gpu.utilization_percent is None else f"{gpu.utilization_percent}%"
    return f"{gpu.index}: {util}, Mem={_n(gpu.memory_used_mib)}/{_n(gpu.memory_total_mib)} MiB"


def _who(processes: Iterable[GpuProcess]) -> str:
    parts = []
    for usage in users_on(processes):
        mem = "? MiB" if usage.memory_mib is None else f"{usage.memory_mib} MiB"
        count = f", {len(usage.pids)} procs" if len(usage.pids) > 1 else ""
        parts.append(f"{usage.label()} {mem}{count}")
    return "; ".join(parts)


def host_block(host: HostSnapshot, thresholds: FreeGpuConfig, now: datetime | None = None) -> str:
    """The predecessor's familiar lines for one host, each GPU followed by who is on it."""
    if not host.current:
        return _down_line(host, now)
    lines = [f"GPU for {host.name}"]
    for gpu in host.gpus:
        procs = host.processes_on(gpu)
        lines.append(_gpu_line(gpu))
        if procs:
            lines.append(f"    {_who(procs)}")
        elif is_free(gpu, procs, thresholds):
            lines.append("    free")
    stray = [p for p in host.processes if p.gpu_index is None]
    if stray:
        lines.append(f"    on an unlisted GPU: {_who(stray)}")
    lines += [f"    warning: {w.message}" for w in host.warnings]
    return "\n".join(lines)


def overview(snapshot: FleetSnapshot, thresholds: FreeGpuConfig) -> Message:
    t = totals(snapshot, thresholds)
    down = f", {t.hosts_down} down" if t.hosts_down else ""
    down += f", {t.hosts_stale} stale" if t.hosts_stale else ""
    summary = f"{plural(t.hosts, 'host')}{down}, {plural(t.gpus, 'GPU')}, {t.free_gpus} free"
    # Hosts without data first: they are what someone must act on.
    hosts = sorted(snapshot.hosts, key=lambda h: h.current)
    return Message(
        title=f"GPU overview {_stamp(snapshot)}: {summary}",
        blocks=tuple(host_block(h, thresholds, snapshot.taken_at) for h in hosts),
        kind="report",
    )


def _process_line(proc: GpuProcess) -> str:
    mem = "? MiB" if proc.used_memory_mib is None else f"{proc.used_memory_mib} MiB"
    command = proc.command or proc.name
    if len(command) > MAX_COMMAND_CHARS:
        command = command[: MAX_COMMAND_CHARS - 1] + "…"
    return f"    GPU {_n(proc.gpu_index)}: pid {proc.pid} {command}, {mem}, up {_runtime(proc.runtime_seconds)}"


def user_report(snapshot: FleetSnapshot, user: str) -> Message:
    """One user's GPU processes across the fleet, grouped by host and GPU index."""
    blocks = []
    count = 0
    for host in snapshot.answered:
        mine = sorted(
            (p for p in host.processes if p.user == user),
            key=lambda p: (p.gpu_index is None, p.gpu_index or 0, p.pid),
        )
        if not mine:
            continue
        count += len(mine)
        gpus = {p.gpu_index for p in mine}
        blocks.append("\n".join([f"{host.name} ({plural(len(gpus), 'GPU')})", *(_process_line(p) for p in mine)]))
    if not blocks:
        blocks.append(f"{user} has no GPU processes on the {plural(len(snapshot.answered), 'host')} that answered.")
    blocks += _no_data_block(snapshot)
    return Message(
        title=f"GPU processes of {user} {_stamp(snapshot)}: {plural(count, 'process')}",
        blocks=tuple(blocks),
        kind="report",
    )


def free_report(snapshot: FleetSnapshot, thresholds: FreeGpuConfig) -> Message:
    """The GPUs free right now, by host."""
    t = totals(snapshot, thresholds)
    blocks = []
    for host in snapshot.answered:
        free = free_gpus(host, thresholds)
        if free:
            listed = ", ".join(f"{g.index} ({_n(g.memory_used_mib)}/{_n(g.memory_total_mib)} MiB)" for g in free)
            name = free[0].name or "GPU"
            blocks.append(f"{host.name}: {len(free)} free of {len(host.gpus)} {name}: GPU {listed}")
    if not blocks:
        blocks.append("No GPU is free right now.")
    blocks += _no_data_block(snapshot)
    return Message(
        title=f"Free GPUs {_stamp(snapshot)}: {t.free_gpus} of {t.gpus}",
        blocks=tuple(blocks),
        kind="report",
    )


def build_report(kind: str, snapshot: FleetSnapshot, thresholds: FreeGpuConfig, user: str | None = None) -> Message:
    if kind == "overview":
        return overview(snapshot, thresholds)
    if kind == "free":
        return free_report(snapshot, thresholds)
    if kind == "user" and user:
        return user_report(snapshot, user)
    raise ValueError(f"unknown report {kind!r}")


# ---------------------------------------------------------------- alerts

_LABELS = {"firing": "FIRING", "reminder": "STILL FIRING", "resolved": "RESOLVED"}


def _clock(epoch: float | None, tz: tzinfo | None) -> str:
    if epoch is None:
        return "?"
    return datetime.fromtimestamp(epoch, tz).astimezone(tz).strftime("%Y-%m-%d %H:%M %Z").strip()


def _where(key: AlertKey) -> str:
    parts = ["fleet" if key.host == "*" else key.host]
    if key.gpu is not None:
        parts.append(f"GPU {key.gpu}")
    if key.user is not None:
        parts.append(f"user {key.user}")
    if key.pid is not None:
        parts.append(f"pid {key.pid}")
    return ", ".join(parts)


def _key_order(key: AlertKey) -> tuple[str, str, int, str, int, str]:
    """Rule, host, GPU, user, pid: never comparing an unset field with a set one (None < 1 fails)."""
    gpu = -1 if key.gpu is None else key.gpu
    pid = -1 if key.pid is None else key.pid
    return (key.rule, key.host, gpu, key.user or "", pid, key.detail or "")


def alert_block(t: Transition, tz: tzinfo | None = None) -> str:
    r = t.record
    head = f"{_LABELS.get(t.kind, t.kind.upper())} {r.key.rule} ({_where(r.key)})"
    if t.kind == "resolved":
        lasted = format_duration(t.at - (r.fired_at or r.since))
        return (
            f"{head}\n    was: {r.summary}\n    threshold: {r.threshold}; fired {_clock(r.fired_at, tz)}, "
            f"resolved {_clock(t.at, tz)} (lasted {lasted})"
        )
    return f"{head}\n    {r.summary}\n    now: {r.value}; threshold: {r.threshold}; since {_clock(r.since, tz)}"


def alert_message(
    transitions: Sequence[Transition],
    notices: Sequence[Notice],
    mentions: Mapping[str, str],
    tz: tzinfo | None = None,
) -> Message | None:
    """New, reminded and resolved alerts and notices of one cycle, grouped in one message."""
    if not transitions and not notices:
        return None
    order = {"firing": 0, "reminder": 1, "resolved": 2}
    ordered = sorted(transitions, key=lambda t: (order.get(t.kind, 3), _key_order(t.record.key)))
    firing = sum(t.kind != "resolved" for t in ordered)
    resolved = len(ordered) - firing
    counts = [f"{firing} firing"] if firing else []
    counts += [f"{resolved} resolved"] if resolved else []
    counts += [f"{len(notices)} notices"] if notices else []
    blocks = [alert_block(t, tz) for t in ordered]
    blocks += [f"NOTICE {n.text}" for n in notices]
    users: list[str] = [t.record.key.user for t in ordered if t.record.key.user]
    users += [u for n in notices for u in n.users]
    open_ids = tuple(dict.fromkeys(mentions[u] for u in users if u in mentions))
    severity = "firing" if firing else ("resolved" if resolved else "info")
    return Message(
        title=f"GPU alerts: {', '.join(counts)}",
        blocks=tuple(blocks),
        severity=severity,
        mentions=open_ids,
        kind="alert",
    )
