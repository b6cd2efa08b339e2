"""Pure questions asked of a snapshot: is this GPU free, who is on it, fleet totals.

Shared by the terminal view, the reports and the rules, so that "free" means the
same thing everywhere: :func:`gpu_free`, idle by its readings (:func:`is_free`) and not booked
for someone (the bookings in force that ``reservation.with_reservations`` put on the host).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from .config import FreeGpuConfig
from .model import Container, FleetSnapshot, Gpu, GpuProcess, HostSnapshot, Reservation
from .text import UNKNOWN, format_duration, number, size_kib


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


def gpu_free(host: HostSnapshot, gpu: Gpu, thresholds: FreeGpuConfig) -> bool:
    """Free for anyone: idle by its readings (:func:`is_free`) and no booking in force on it
    (``host.reservations``, put there by ``reservation.with_reservations``)."""
    return host.reservation_on(gpu) is None and is_free(gpu, host.processes_on(gpu), thresholds)


def container_text(container: Container) -> str:
    """``docker train-llm, pytorch:24.01``, ``k8s ml/train-0, nvcr.io/...``, ``podman 6e341326175b``."""
    if container.pod is not None:
        where = f"k8s {container.namespace}/{container.pod}" if container.namespace else f"k8s {container.pod}"
    else:
        runtime = "k8s" if container.pod_uid is not None else container.runtime
        where = f"{runtime} {container.name or container.short_id}"
    if container.rootless_uid is not None:
        where += " rootless"
    return f"{where}, {container.image}" if container.image else where


def process_context(proc: GpuProcess) -> str:
    """Where a process runs, for people: its container, Slurm job, another user's login session;
    or that its cgroup could not be read (its owner is then the ps user). Empty when none."""
    parts = []
    if proc.container is not None:
        parts.append(container_text(proc.container))
    if proc.slurm_job is not None:
        parts.append(f"slurm {proc.slurm_job.job_id}")
    if proc.session_user is not None:
        parts.append(f"session of {proc.session_user}")
    if not parts and proc.cgroup_note is not None and proc.user is not None:
        parts.append("cgroup not read")
    return ", ".join(parts)


def who(proc: GpuProcess) -> str:
    """The owner first, the context after it: ``alice (docker train-llm, pytorch:24.01)``,
    ``bob (slurm 48213)``, ``pid 4242 (owner unknown)``."""
    if proc.owner is None:
        return f"pid {proc.pid} (owner unknown)"
    context = process_context(proc)
    return f"{proc.owner} ({context})" if context else proc.owner


@dataclass(frozen=True)
class UserUsage:
    user: str | None  # the owner; None: a process ps could not see (another PID namespace, or gone)
    memory_mib: int | None
    pids: tuple[int, ...]
    contexts: tuple[str, ...] = ()  # where the owner's processes run (containers, jobs), each once

    def label(self) -> str:
        if self.user is not None:
            return f"{self.user} ({'; '.join(self.contexts)})" if self.contexts else self.user
        return "pid " + ",".join(str(p) for p in self.pids) + " (owner unknown)"


def users_on(processes: Iterable[GpuProcess]) -> list[UserUsage]:
    """Processes of one GPU grouped by owner (the person behind each, see ``GpuProcess.owner``),
    most memory first; unseen PIDs grouped last."""
    groups: dict[str | None, list[GpuProcess]] = {}
    for proc in processes:
        groups.setdefault(proc.owner, []).append(proc)
    usages = []
    for user, procs in groups.items():
        known = [p.used_memory_mib for p in procs if p.used_memory_mib is not None]
        contexts = tuple(dict.fromkeys(c for c in (process_context(p) for p in procs) if c))
        usages.append(
            UserUsage(
                user=user,
                memory_mib=sum(known) if known else None,
                pids=tuple(p.pid for p in procs),
                contexts=contexts if user is not None else (),
            )
        )
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
            free += gpu_free(host, gpu, thresholds)
    stale = sum(1 for h in snapshot.hosts if h.stale)
    return FleetTotals(
        hosts=len(snapshot.hosts), hosts_down=len(snapshot.down) - stale, gpus=gpus, free_gpus=free, hosts_stale=stale
    )


def free_gpus(host: HostSnapshot, thresholds: FreeGpuConfig) -> list[Gpu]:
    return [g for g in host.gpus if gpu_free(host, g, thresholds)]


def reserved_idle(host: HostSnapshot, thresholds: FreeGpuConfig) -> list[tuple[Gpu, Reservation]]:
    """The GPUs idle by their readings that a booking in force keeps from being free, with it."""
    found = []
    for gpu in host.gpus:
        booking = host.reservation_on(gpu)
        if booking is not None and is_free(gpu, host.processes_on(gpu), thresholds):
            found.append((gpu, booking))
    return found


# ---------------------------------------------------------------- what is wrong with a host

WRONG_DISK_PERCENT = 90  # a disk at least this full
WRONG_MEMORY_PERCENT = 90  # memory at least this used


def host_problems(host: HostSnapshot) -> list[str]:
    """What is wrong with a host beyond its GPU readings, for the overview (which shows only what
    is wrong): full disks, memory, and GPUs with uncorrectable ECC errors, memory rows waiting for
    a remap, or hardware slowdown. Empty when nothing is. (Load comes and goes with the jobs: it is
    in ``status`` and, past a limit the admin sets, in ``load_above`` alerts.)"""
    problems: list[str] = []
    context = host.context
    if context is not None:
        for disk in context.disks:
            if disk.use_percent >= WRONG_DISK_PERCENT:
                problems.append(f"disk {disk.mount} {disk.use_percent}% full ({size_kib(disk.available_kib)} free)")
        percent = context.memory_percent
        if percent is not None and percent >= WRONG_MEMORY_PERCENT:
            problems.append(
                f"memory {percent:.0f}% used "
                f"({size_kib(context.memory_used_kib)} of {size_kib(context.memory_total_kib)})"
            )
    for gpu in host.gpus:
        health = gpu.health
        if health is None:
            continue
        if health.ecc_uncorrected_volatile:
            problems.append(
                f"GPU {gpu.index}: {health.ecc_uncorrected_volatile} uncorrectable ECC errors since the driver loaded"
            )
        if health.remapped_rows_failure:
            problems.append(f"GPU {gpu.index}: no spare memory rows left (remapped_rows.failure)")
        elif health.remapped_rows_pending or health.retired_pages_pending:
            problems.append(f"GPU {gpu.index}: memory rows wait for a remap (needs a GPU reset)")
        if health.throttle_reasons:
            problems.append(f"GPU {gpu.index}: slowed down by the hardware ({', '.join(health.throttle_reasons)})")
    return problems


def context_line(host: HostSnapshot) -> str | None:
    """The host's context in one line for ``status``: load, memory, disks, uptime, kernel, driver."""
    context = host.context
    if context is None:
        return None
    parts = [
        f"load {number(context.load_1m)}/{number(context.load_5m)}/{number(context.load_15m)} "
        f"on {number(context.cpus)} CPUs"
    ]
    parts.append(f"mem {size_kib(context.memory_used_kib)}/{size_kib(context.memory_total_kib)}")
    if context.swap_total_kib:
        parts.append(f"swap {size_kib(context.swap_used_kib)}/{size_kib(context.swap_total_kib)}")
    if context.disks:
        parts.append("disk " + ", ".join(f"{d.mount} {d.use_percent}%" for d in context.disks))
    elif not context.disks_known:
        parts.append(f"disk {UNKNOWN}")
    parts.append(f"up {format_duration(context.uptime_seconds)}")
    if context.kernel:
        parts.append(f"kernel {context.kernel}")
    driver = context.driver_version or UNKNOWN
    parts.append(f"driver {driver}" + (f" (CUDA {context.cuda_version})" if context.cuda_version else ""))
    persistence = {
        g.health.persistence_mode for g in host.gpus if g.health is not None and g.health.persistence_mode is not None
    }
    if persistence:
        parts.append("persistence " + ("on" if persistence == {True} else "off" if persistence == {False} else "mixed"))
    return f"{host.name}: " + ", ".join(parts)


def select(
    snapshot: FleetSnapshot, thresholds: FreeGpuConfig, *, user: str | None = None, free_only: bool = False
) -> FleetSnapshot:
    """The same fleet with only the GPUs ``user`` has a process on and/or (``free_only``) the free
    ones, each with every process on it. ``user`` is the person behind a process (its owner: a
    Slurm job's user, a container's owner), as the page, chat and the rules name them. Hosts
    without current data stay, with their reason: a filter never makes a host that did not answer
    look as if it had nothing to show."""
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
            if (user is None or any(p.owner == user for p in host.processes_on(gpu)))
            and (not free_only or gpu_free(host, gpu, thresholds))
        ]
        indices = {gpu.index for gpu in kept}
        stray = not free_only and user is not None  # the user's processes on a GPU nvidia-smi did not list
        processes = tuple(
            p for p in host.processes if p.gpu_index in indices or (stray and p.gpu_index is None and p.owner == user)
        )
        hosts.append(replace(host, gpus=tuple(kept), processes=processes))
    return replace(snapshot, hosts=tuple(hosts))
