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
class GpuProcess:
    """A GPU process with its owner as ps on the host saw it.

    ``user`` is ``None`` when ps could not see the PID (another PID namespace, such as a
    container, or the process exited between the nvidia-smi and ps calls): never invented.
    """

    pid: int
    gpu_index: int | None
    gpu_uuid: str | None
    user: str | None
    name: str
    command: str | None
    used_memory_mib: int | None
    runtime_seconds: int | None

    @property
    def seen_by_ps(self) -> bool:
        return self.user is not None


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
    taken_at: datetime | None = None  # when this host's probe finished (None: never polled)
    stale: bool = False  # latest result older than 3 poll intervals
    # Set by the fleet state, which remembers a host across polls (None from a single poll):
    last_ok_at: datetime | None = None  # when the host last answered with GPU data
    failing_since: datetime | None = None  # when the current run of failed polls began (None: answering)

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
    def current(self) -> bool:
        """Answered, and recently: only a current host's GPUs can be called free or busy."""
        return self.ok and not self.stale

    def age_seconds(self, now: datetime) -> float | None:
        """How old this result is at ``now``; None when the host was never polled."""
        return None if self.taken_at is None else max(0.0, (now - self.taken_at).total_seconds())

    def processes_on(self, gpu: Gpu) -> tuple[GpuProcess, ...]:
        return tuple(p for p in self.processes if p.gpu_index == gpu.index)


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
