"""Prometheus ``/metrics``: a custom collector over the fleet state and the store.

A scrape reads what the daemon already knows (:class:`~gpuwatch.fleet.FleetState`, the alert state
and the outbox through a read-only :class:`~gpuwatch.store.StoreReader`); it never polls a host and
never sends anything. Nothing is registered at import: :func:`build_registry` gives a registry of
its own, so tests and several daemons in one process never share metrics.

Base units in the names (bytes, seconds, a 0..1 ratio). A value nvidia-smi did not give is no
sample, never 0. GPU and user samples come only from hosts with current data: a host that did not
answer, or whose data is stale, has ``gpuwatch_host_up 0`` and no GPU samples. Users are counted
per user, not per pid, so the number of series stays bounded.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from datetime import datetime

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry

from .config import Config, FreeGpuConfig
from .fleet import FleetState
from .model import FleetSnapshot, Gpu, HostSnapshot
from .reservation import with_reservations
from .rules import BY_NAME
from .store import StoreReader
from .summary import gpu_free, users_on
from .text import UNKNOWN

log = logging.getLogger(__name__)

MIB = 1024 * 1024
GPU_LABELS = ("host", "gpu", "uuid", "model")

# A firing alert record's state (rules.lifecycle.AlertRecord.state).
FIRING = "firing"


def channel_names(config: Config) -> list[str]:
    return list(config.channels)


def _gpu_labels(host: HostSnapshot, gpu: Gpu) -> list[str]:
    return [host.name, str(gpu.index), gpu.uuid or "", gpu.name or ""]


def _epoch(when: datetime) -> float:
    return when.timestamp()


def fleet_metrics(
    snapshot: FleetSnapshot,
    probe_errors: dict[tuple[str, str], int],
    thresholds: FreeGpuConfig | None = None,
) -> list[Metric]:
    """The host, GPU and user families of one snapshot (pure); ``thresholds`` (``free_gpu:``)
    decide ``gpuwatch_gpu_free`` as they decide "free" on the page and in ``status``."""
    limits = thresholds or FreeGpuConfig()
    up = GaugeMetricFamily(
        "gpuwatch_host_up",
        "1 when the host's latest poll answered with GPU data and is not stale, else 0",
        labels=["host"],
    )
    duration = GaugeMetricFamily(
        "gpuwatch_host_probe_duration_seconds",
        "How long the host's latest probe took (SSH and nvidia-smi)",
        labels=["host"],
    )
    last_ok = GaugeMetricFamily(
        "gpuwatch_host_last_success_timestamp_seconds",
        "When the host last answered with GPU data (Unix time)",
        labels=["host"],
    )
    util = GaugeMetricFamily(
        "gpuwatch_gpu_utilization_ratio", "GPU utilization, 0..1 (utilization.gpu; none in MIG mode)", labels=GPU_LABELS
    )
    used = GaugeMetricFamily("gpuwatch_gpu_memory_used_bytes", "GPU memory in use (memory.used)", labels=GPU_LABELS)
    total = GaugeMetricFamily("gpuwatch_gpu_memory_total_bytes", "GPU memory in all (memory.total)", labels=GPU_LABELS)
    temp = GaugeMetricFamily(
        "gpuwatch_gpu_temperature_celsius", "GPU core temperature (temperature.gpu)", labels=GPU_LABELS
    )
    power = GaugeMetricFamily("gpuwatch_gpu_power_watts", "GPU power draw (power.draw)", labels=GPU_LABELS)
    free = GaugeMetricFamily(
        "gpuwatch_gpu_free",
        "1 when the GPU is free as the page and status say (no process, memory and utilization under free_gpu, "
        "not booked for someone), else 0; no sample for a host without current data",
        labels=GPU_LABELS,
    )
    reserved = GaugeMetricFamily(
        "gpuwatch_gpu_reserved",
        "1 while a booking (gpuwatch reserve) is in force on the GPU, else 0; "
        "no sample for a host without current data",
        labels=GPU_LABELS,
    )
    user_mem = GaugeMetricFamily(
        "gpuwatch_user_gpu_memory_bytes",
        f"GPU memory held by a user's processes on one GPU (user {UNKNOWN}: processes ps could not see)",
        labels=["host", "gpu", "user"],
    )
    user_gpus = GaugeMetricFamily(
        "gpuwatch_user_gpus",
        "How many GPUs of the host run at least one of the user's processes",
        labels=["host", "user"],
    )
    errors = CounterMetricFamily(
        "gpuwatch_probe_errors",
        "Failed probes since the daemon started, by host and error kind",
        labels=["host", "kind"],
    )
    for host in snapshot.hosts:
        if host.taken_at is not None:  # a host not polled yet is neither up nor down
            up.add_metric([host.name], 1.0 if host.current else 0.0)
        if host.probe_seconds is not None:
            duration.add_metric([host.name], host.probe_seconds)
        if host.last_ok_at is not None:
            last_ok.add_metric([host.name], _epoch(host.last_ok_at))
        if not host.current:
            continue
        gpus_of: dict[str, int] = {}
        for gpu in host.gpus:
            labels = _gpu_labels(host, gpu)
            free.add_metric(labels, 1.0 if gpu_free(host, gpu, limits) else 0.0)
            reserved.add_metric(labels, 0.0 if host.reservation_on(gpu) is None else 1.0)
            for family, value in (
                (util, None if gpu.utilization_percent is None else gpu.utilization_percent / 100),
                (used, None if gpu.memory_used_mib is None else gpu.memory_used_mib * MIB),
                (total, None if gpu.memory_total_mib is None else gpu.memory_total_mib * MIB),
                (temp, gpu.temperature_c),
                (power, gpu.power_w),
            ):
                if value is not None and math.isfinite(value):
                    family.add_metric(labels, float(value))
            for usage in users_on(host.processes_on(gpu)):
                user = usage.user if usage.user is not None else UNKNOWN
                gpus_of[user] = gpus_of.get(user, 0) + 1
                if usage.memory_mib is not None:
                    user_mem.add_metric([host.name, str(gpu.index), user], float(usage.memory_mib * MIB))
        for user, count in gpus_of.items():
            user_gpus.add_metric([host.name, user], float(count))
    for (host_name, kind), count in sorted(probe_errors.items()):
        errors.add_metric([host_name, kind], float(count))
    return [up, duration, last_ok, util, used, total, temp, power, free, reserved, user_mem, user_gpus, errors]


def shard_metric(config: Config) -> Metric:
    """``gpuwatch_shard_hosts{shard="1/2"}``: how many hosts this daemon polls, and which shard it is
    (``1/1`` without ``--shard``): summed over the shards, the size of the fleet."""
    family = GaugeMetricFamily(
        "gpuwatch_shard_hosts",
        "Hosts this daemon polls, labelled with its shard K/N (1/1: the whole fleet)",
        labels=["shard"],
    )
    family.add_metric([str(config.shard or "1/1")], float(len(config.hosts)))
    return family


class FleetCollector:
    """Reads the fleet state and the store at each scrape."""

    def __init__(self, state: FleetState, config: Callable[[], Config], store: StoreReader | None) -> None:
        self.state = state
        self.config = config
        self.store = store

    def collect(self) -> Iterator[Metric]:
        snapshot = self.state.snapshot()
        if self.store is not None:
            try:
                snapshot = with_reservations(snapshot, self.store.reservations(snapshot.taken_at.timestamp()))
            except Exception:  # the fleet is still worth a scrape: GPUs then count as if not booked
                log.warning("metrics: the bookings could not be read; gpuwatch_gpu_free leaves them out")
        yield from fleet_metrics(snapshot, self.state.probe_errors(), self.config().free_gpu)
        yield shard_metric(self.config())
        if self.store is None:
            return
        config = self.config()
        try:
            records, _ = self.store.alerts()
            waiting = self.store.outbox_counts()
        except Exception:  # a scrape must still answer with the fleet when the database cannot be read
            log.warning("metrics: the state database could not be read; alert and outbox metrics left out")
            return
        firing = GaugeMetricFamily(
            "gpuwatch_alerts_firing", "Alerts firing now, silenced ones included", labels=["rule"]
        )
        # A series for every rule switched on that announces alerts; a notice-only rule has none.
        counts = dict.fromkeys((r for r in config.alerts.rules if r in BY_NAME and BY_NAME[r].announces.alerts), 0)
        for record in records.values():
            if record.state == FIRING:
                counts[record.key.rule] = counts.get(record.key.rule, 0) + 1
        for rule, count in sorted(counts.items()):
            firing.add_metric([rule], float(count))
        yield firing
        outbox = GaugeMetricFamily(
            "gpuwatch_outbox_messages", "Messages waiting in the outbox for their channel", labels=["channel"]
        )
        for channel, count in sorted({**dict.fromkeys(channel_names(config), 0), **waiting}.items()):
            outbox.add_metric([channel], float(count))
        yield outbox


def build_registry(state: FleetState, config: Callable[[], Config], store: StoreReader | None) -> CollectorRegistry:
    """A registry of its own holding one :class:`FleetCollector` (nothing global is touched)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(state, config, store))
    return registry
