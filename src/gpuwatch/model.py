"""Frozen records of what a poll saw: GPUs, their processes, hosts, the fleet.

Plain data only: no I/O, no rendering. Units live in the field names. Every reading that
comes from nvidia-smi names the query field it matches. ``None`` always means "unknown"
(nvidia-smi printed a bracketed token such as ``[N/A]``, or the value was not reported).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime


class HostErrorKind(str, enum.Enum):
    """Why a host gave no usable GPU data; each kind has its own diagnosis."""

    UNREACHABLE = "unreachable"  # refused, timed out, name not resolved
    AUTH_FAILED = "auth_failed"
    HOST_KEY_CHANGED = "host_key_changed"  # possible man-in-the-middle: always refused
    HOST_KEY_UNKNOWN = "host_key_unknown"  # strict policy and no known key
    SSH_ERROR = "ssh_error"  # any other SSH protocol failure
    NVIDIA_SMI_NOT_FOUND = "nvidia_smi_not_found"
    DRIVER_NOT_LOADED = "driver_not_loaded"  # driver not loaded or not answering
    DRIVER_MISMATCH = "driver_mismatch"  # driver/library version mismatch
    GPU_LOST = "gpu_lost"  # fallen off the bus, unknown error on a device handle
    NO_DEVICES = "no_devices"
    PERMISSION_DENIED = "permission_denied"
    PROBE_TIMEOUT = "probe_timeout"
    PROBE_FAILED = "probe_failed"  # nvidia-smi exited non-zero for another reason
    UNPARSEABLE = "unparseable"
    BUSY = "busy"  # the previous probe of this host is still running


@dataclass(frozen=True)
class HostIssue:
    """A classified problem: the whole host's failure, or a warning beside good data."""

    kind: HostErrorKind
    message: str


@dataclass(frozen=True)
class GpuHealth:
    """A GPU's health readings, from the extra ``--query-gpu`` fields its driver supports.

    ``None`` is "not reported": the driver does not have the field, or printed ``[N/A]`` (a GPU
    without ECC, a consumer card). Never read as zero or as "no".
    """

    ecc_uncorrected_volatile: int | None = None  # ecc.errors.uncorrected.volatile.total (since the driver loaded)
    ecc_uncorrected_aggregate: int | None = None  # ecc.errors.uncorrected.aggregate.total (the GPU's lifetime)
    retired_pages_double_bit: int | None = None  # retired_pages.double_bit.count
    retired_pages_pending: bool | None = None  # retired_pages.pending (Yes: a reset is needed)
    remapped_rows_pending: bool | None = None  # remapped_rows.pending (Yes: a reset is needed)
    remapped_rows_failure: bool | None = None  # remapped_rows.failure (Yes: the GPU ran out of spare rows)
    hw_slowdown: bool | None = None  # clocks_event_reasons.hw_slowdown (older drivers: clocks_throttle_reasons.*)
    hw_thermal_slowdown: bool | None = None  # clocks_event_reasons.hw_thermal_slowdown
    hw_power_brake_slowdown: bool | None = None  # clocks_event_reasons.hw_power_brake_slowdown
    persistence_mode: bool | None = None  # persistence_mode (Enabled/Disabled; [N/A] on Windows)
    driver_version: str | None = None  # driver_version

    @property
    def throttle_reasons(self) -> tuple[str, ...]:
        """The hardware clock-event reasons active now: ``hw_slowdown``, ``thermal``, ``power_brake``."""
        reasons = (
            ("hw_slowdown", self.hw_slowdown),
            ("thermal", self.hw_thermal_slowdown),
            ("power_brake", self.hw_power_brake_slowdown),
        )
        return tuple(name for name, active in reasons if active)


@dataclass(frozen=True)
class Gpu:
    """One GPU as ``nvidia-smi --query-gpu`` reported it."""

    index: int  # index (taken from nvidia-smi, never from the row position)
    uuid: str | None = None  # uuid
    name: str | None = None  # name
    pci_bus_id: str | None = None  # pci.bus_id
    utilization_percent: int | None = None  # utilization.gpu, [N/A] in MIG mode
    memory_used_mib: int | None = None  # memory.used
    memory_total_mib: int | None = None  # memory.total
    temperature_c: int | None = None  # temperature.gpu, in Celsius
    power_w: float | None = None  # power.draw, in watts
    health: GpuHealth | None = None  # None: no health field was asked of this GPU


@dataclass(frozen=True)
class ComputeApp:
    """One row of ``nvidia-smi --query-compute-apps`` (before ps attribution)."""

    pid: int  # pid (a host PID, even for processes inside containers)
    gpu_uuid: str | None = None  # gpu_uuid (the parent GPU's UUID in MIG mode)
    gpu_bus_id: str | None = None  # gpu_bus_id
    used_memory_mib: int | None = None  # used_gpu_memory, [N/A] on Windows/WDDM
    process_name: str = ""  # process_name (may hold ", " and spaces)


@dataclass(frozen=True)
class PsEntry:
    """One line of ``ps -o pid,user:64,etimes,args`` on the host."""

    pid: int
    user: str
    elapsed_seconds: int | None
    command: str


@dataclass(frozen=True)
class Container:
    """The container a process runs in, recognised from its cgroup path.

    ``id`` is the full id as the path names it; ``name``, ``image``, ``pod`` and ``namespace`` are
    known only when the host let gpuwatch ask the runtime (``docker inspect``, ``crictl inspect``).
    ``rootless_uid`` is set for a container that a user runs under their own systemd user manager
    (rootless Podman or Docker): that user started it.
    """

    runtime: str  # docker | containerd | cri-o | podman | kubernetes (the runtime is not in the path)
    id: str
    name: str | None = None
    image: str | None = None
    pod: str | None = None  # Kubernetes pod name
    namespace: str | None = None  # Kubernetes namespace
    pod_uid: str | None = None  # Kubernetes pod UID, from the path
    rootless_uid: int | None = None

    @property
    def short_id(self) -> str:
        return self.id[:12]


@dataclass(frozen=True)
class SlurmJob:
    """The Slurm job a process belongs to, from its cgroup path (``uid`` only with cgroup v1)."""

    job_id: str  # digits
    step: str | None = None  # 0, batch, extern, interactive, ...
    uid: int | None = None  # the job's user, /slurm/uid_<uid>/ (cgroup v1)
    user: str | None = None  # that uid's name on the host


@dataclass(frozen=True)
class GpuProcess:
    """A GPU process with its owner as ps on the host saw it, and the person behind it.

    ``user`` is ``None`` when ps could not see the PID (another PID namespace, such as a
    container, or the process exited between the nvidia-smi and ps calls): never invented.
    ``owner`` is the person behind the process: the Slurm job's user, a container's owner label or
    the user who runs a rootless container (``owner_source`` says which), else the ps user.
    """

    pid: int
    gpu_index: int | None
    gpu_uuid: str | None
    user: str | None
    name: str
    command: str | None
    used_memory_mib: int | None
    runtime_seconds: int | None
    container: Container | None = None
    slurm_job: SlurmJob | None = None
    session_user: str | None = None  # the user whose login session (user-<uid>.slice) holds it, when not ``user``
    attributed_owner: str | None = None  # the person behind it when the cgroup says so (see owner_source)
    owner_source: str | None = None  # slurm | label | rootless; None: the ps user
    cgroup_note: str | None = None  # why the cgroup could not be read or used; the owner is then the ps user

    @property
    def seen_by_ps(self) -> bool:
        return self.user is not None

    @property
    def owner(self) -> str | None:
        """The person behind the process; ``None`` when neither ps nor the cgroup told."""
        return self.attributed_owner if self.attributed_owner is not None else self.user


@dataclass(frozen=True)
class Disk:
    """One filesystem as ``df -P -k -T`` printed it (sizes in KiB, ``use_percent`` df's own)."""

    mount: str  # where it is mounted
    fs_type: str | None
    size_kib: int
    used_kib: int
    available_kib: int
    use_percent: int  # df's Capacity column: used / (used + available), rounded up
    paths: tuple[str, ...] = ()  # the configured paths (host_context.disks) on this filesystem


@dataclass(frozen=True)
class HostContext:
    """The rest of the host, read in the same probe: load, memory, disks, boot, kernel, driver.

    Memory and swap come from /proc/meminfo (``used`` is total minus available, as ``free``
    counts it), load from /proc/loadavg, the CPU count from /proc/stat, the boot time from
    /proc/stat ``btime`` (epoch seconds), the kernel from /proc/sys/kernel/osrelease.
    """

    load_1m: float | None = None
    load_5m: float | None = None
    load_15m: float | None = None
    cpus: int | None = None
    memory_total_kib: int | None = None
    memory_available_kib: int | None = None
    swap_total_kib: int | None = None
    swap_free_kib: int | None = None
    uptime_seconds: float | None = None
    boot_time: int | None = None
    kernel: str | None = None
    driver_version: str | None = None  # nvidia-smi driver_version (the user-space driver)
    cuda_version: str | None = None  # the CUDA version the driver supports (nvidia-smi --version)
    disks: tuple[Disk, ...] = ()
    disks_known: bool = False  # df answered: disks over the threshold would be listed

    @property
    def memory_used_kib(self) -> int | None:
        if self.memory_total_kib is None or self.memory_available_kib is None:
            return None
        return max(0, self.memory_total_kib - self.memory_available_kib)

    @property
    def memory_percent(self) -> float | None:
        used = self.memory_used_kib
        if used is None or not self.memory_total_kib:
            return None
        return 100.0 * used / self.memory_total_kib

    @property
    def swap_used_kib(self) -> int | None:
        if self.swap_total_kib is None or self.swap_free_kib is None:
            return None
        return max(0, self.swap_total_kib - self.swap_free_kib)

    @property
    def load_per_cpu(self) -> float | None:
        """The 5-minute load average per CPU."""
        if self.load_5m is None or not self.cpus:
            return None
        return self.load_5m / self.cpus


@dataclass(frozen=True)
class Reservation:
    """A booking of GPUs (``gpuwatch reserve add``): ``user`` has GPUs ``gpus`` of ``host`` from
    ``starts_at`` until ``ends_at`` (epoch seconds; in force while ``starts_at <= now < ends_at``).
    Kept in the state database, not seen by a poll: while in force its GPUs are free for no one else."""

    id: int
    user: str
    host: str
    gpus: tuple[int, ...]
    starts_at: float
    ends_at: float
    comment: str = ""
    author: str | None = None  # who added it (login name)
    created_at: float = 0.0

    def in_force(self, now: float) -> bool:
        return self.starts_at <= now < self.ends_at

    def covers(self, host: str, gpu: int) -> bool:
        return self.host == host and gpu in self.gpus


@dataclass(frozen=True)
class HostSnapshot:
    """What one poll of one host produced: GPU data, or the classified reason there is none."""

    name: str  # the label used in all output
    address: str
    ok: bool
    error: str | None = None  # short human message when not ok
    error_kind: HostErrorKind | None = None
    probe_seconds: float | None = None
    gpus: tuple[Gpu, ...] = ()
    processes: tuple[GpuProcess, ...] = ()
    warnings: tuple[HostIssue, ...] = ()  # problems beside good data (a lost GPU, ps failed)
    context: HostContext | None = None  # the rest of the host (None: not read, or an older probe)
    taken_at: datetime | None = None  # when this host's probe finished (None: never polled)
    stale: bool = False  # latest result older than 3 poll intervals
    # Set by the fleet state, which remembers a host across polls (None from a single poll):
    last_ok_at: datetime | None = None  # when the host last answered with GPU data
    failing_since: datetime | None = None  # when the current run of failed polls began (None: answering)
    # Set from the store (``reservation.with_reservations``), never by a poll: the bookings in force
    # on this host as of the fleet's ``taken_at``; their GPUs are free for no one else.
    reservations: tuple[Reservation, ...] = ()

    @classmethod
    def failed(
        cls,
        name: str,
        address: str,
        kind: HostErrorKind,
        message: str,
        probe_seconds: float | None = None,
        taken_at: datetime | None = None,
    ) -> HostSnapshot:
        return cls(
            name=name,
            address=address,
            ok=False,
            error=message,
            error_kind=kind,
            probe_seconds=probe_seconds,
            taken_at=taken_at,
        )

    @property
    def error_name(self) -> str:
        """The name of why this host gave no GPU data, in every output (text, JSON, logs, metric
        labels): its ``HostErrorKind`` value, or ``error`` for a failure without a kind. Says
        something only about a host that did not answer (``ok`` False)."""
        return self.error_kind.value if self.error_kind is not None else "error"

    @property
    def current(self) -> bool:
        """Answered, and recently: only a current host's GPUs can be called free or busy."""
        return self.ok and not self.stale

    def age_seconds(self, now: datetime) -> float | None:
        """How old this result is at ``now``; None when the host was never polled."""
        return None if self.taken_at is None else max(0.0, (now - self.taken_at).total_seconds())

    def processes_on(self, gpu: Gpu) -> tuple[GpuProcess, ...]:
        return tuple(p for p in self.processes if p.gpu_index == gpu.index)

    def reservation_on(self, gpu: Gpu) -> Reservation | None:
        """The booking in force on this GPU (``reservations``), or None."""
        return next((r for r in self.reservations if gpu.index in r.gpus), None)


@dataclass(frozen=True)
class FleetSnapshot:
    """The latest result of every configured host, in config order, as of ``taken_at``.

    Hosts are polled on their own clocks, so each host carries its own ``taken_at``; a host whose
    latest result is too old is ``stale`` and counts as neither answered nor free.
    """

    taken_at: datetime
    hosts: tuple[HostSnapshot, ...] = field(default_factory=tuple)

    @property
    def answered(self) -> tuple[HostSnapshot, ...]:
        """Hosts with current GPU data."""
        return tuple(h for h in self.hosts if h.current)

    @property
    def down(self) -> tuple[HostSnapshot, ...]:
        """Hosts without current GPU data: they failed, or their data is stale."""
        return tuple(h for h in self.hosts if not h.current)


@dataclass(frozen=True)
class SourceHealth:
    """A discovery source's latest refresh (``hosts_from:``), as the ``discovery_failed`` rule judges it.

    A failing source keeps its last good list: ``hosts`` counts it. Times are epoch seconds."""

    label: str  # e.g. "file:/etc/gpuwatch/hosts.txt"
    ok: bool  # its latest refresh worked
    error: str | None = None  # why the latest refresh failed, for people
    failing_since: float | None = None  # the first failed refresh of the current run of failures
    hosts: int = 0  # hosts in its last good list
    last_ok_at: float | None = None  # its latest good refresh (None: none since start)
