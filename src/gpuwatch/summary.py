"""Pure questions asked of a snapshot: is this GPU free, who is on it, fleet totals.

Shared by the terminal view, the reports and the rules, so that "free" means the
same thing everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from .config import FreeGpuConfig
from .model import FleetSnapshot, Gpu, GpuProcess, HostSnapshot


def is_free(gpu: Gpu, processes: Iterable[GpuProcess], thresholds: FreeGpuConfig) -> bool:
    """Free: no compute process, memory used and utilization below the thresholds.

    An unknown reading never makes a GPU look free, except utilization in MIG mode, which
    nvidia-smi never reports ([N/A]): there memory and processes decide.
    """
    if any(True for _ in processes):
        return False
    if gpu.memory_used_mib is None or gpu.memory_used_mib >= thresholds.memory_below_mib:
        return False
    return gpu.utilization_percent is None or gpu.utilization_percent < thresholds.util_below_percent


@dataclass(frozen=True)
class UserUsage:
    user: str | None  # None: a process ps could not see (another PID namespace, or gone)
    memory_mib: int | None
    pids: tuple[int, ...]

    def label(self) -> str:
        if self.user is not None:
            return self.user
        return "pid " + ",".join(str(p) for p in self.pids) + " (owner unknown)"


def users_on(processes: Iterable[GpuProcess]) -> list[UserUsage]:
    """Processes of one GPU grouped by owner, most memory first; unseen PIDs grouped last."""
    groups: dict[str | None, list[GpuProcess]] = {}
    for proc in processes:
        groups.setdefault(proc.user, []).append(proc)
    usages = []
    for user, procs in groups.items():
        known = [p.used_memory_mib for p in procs if p.used_memory_mib is not None]
        usages.append(UserUsage(user=user, memory_mib=sum(known) if known else None, pids=tuple(p.pid for p in procs)))
    return sorted(usages, key=lambda u: (u.user is None, -(u.memory_mib or 0), u.user or ""))


@dataclass(frozen=True)
class FleetTotals:
    hosts: int
    hosts_down: int  # answered with an error (not stale)
    gpus: int
    free_gpus: int
    hosts_stale: int = 0  # no new result for 3 poll intervals


def totals(snapshot: FleetSnapshot, thresholds: FreeGpuConfig) -> FleetTotals:
    gpus = free = 0
    for host in snapshot.answered:
        for gpu in host.gpus:
            gpus += 1
            free += is_free(gpu, host.processes_on(gpu), thresholds)
    stale = sum(1 for h in snapshot.hosts if h.stale)
    return FleetTotals(
        hosts=len(snapshot.hosts), hosts_down=len(snapshot.down) - stale, gpus=gpus, free_gpus=free, hosts_stale=stale
    )


def free_gpus(host: HostSnapshot, thresholds: FreeGpuConfig) -> list[Gpu]:
    return [g for g in host.gpus if is_free(g, host.processes_on(g), thresholds)]


def select(
    snapshot: FleetSnapshot, thresholds: FreeGpuConfig, *, user: str | None = None, free_only: bool = False
) -> FleetSnapshot:
    """The same fleet with only the GPUs ``user`` has a process on and/or (``free_only``) the free
    ones, each with every process on it. Hosts without current data stay, with their reason: a
    filter never makes a host that did not answer look as if it had nothing to show."""
    if user is None and not free_only:
        return snapshot
    hosts = []
    for host in snapshot.hosts:
        if not host.current:
            hosts.append(host)
            continue
        kept = [
            gpu
            for gpu in host.gpus
            if (user is None or any(p.user == user for p in host.processes_on(gpu)))
            and (not free_only or is_free(gpu, host.processes_on(gpu), thresholds))
        ]
        indices = {gpu.index for gpu in kept}
        stray = not free_only and user is not None  # the user's processes on a GPU nvidia-smi did not list
        processes = tuple(
            p for p in host.processes if p.gpu_index in indices or (stray and p.gpu_index is None and p.user == user)
        )
        hosts.append(replace(host, gpus=tuple(kept), processes=processes))
    return replace(snapshot, hosts=tuple(hosts))
