"""A recorded two-hour timeline of one host, written to the usage history with an explicit clock
(for tests/test_history.py and tests/test_usage.py)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from gpuwatch.model import Gpu, GpuProcess, HostErrorKind, HostSnapshot
from gpuwatch.store.history import HOUR, HistorySettings
from gpuwatch.store.historywriter import HistoryWriter

T0 = 1_796_601_600  # 2026-12-07 00:00:00 UTC, a whole hour
DAY = 86400.0
WEEK = 7 * DAY


def at(t: float) -> datetime:
    return datetime.fromtimestamp(t, timezone.utc)


def proc(pid: int, gpu: int, user: str | None, mib: int | None) -> GpuProcess:
    return GpuProcess(pid, gpu, f"GPU-{gpu}", user, "python", "python train.py", mib, 100)


def answered(t: float, utils: Sequence[int], procs: Sequence[GpuProcess], name: str = "gpu-a") -> HostSnapshot:
    gpus = tuple(
        Gpu(
            index=i,
            uuid=f"GPU-{i}",
            name="NVIDIA H100",
            utilization_percent=u,
            memory_used_mib=sum(p.used_memory_mib or 0 for p in procs if p.gpu_index == i),
            memory_total_mib=81559,
        )
        for i, u in enumerate(utils)
    )
    return HostSnapshot(name, name, True, gpus=gpus, processes=tuple(procs), taken_at=at(t))


def failed(t: float, name: str = "gpu-a") -> HostSnapshot:
    return HostSnapshot.failed(name, name, HostErrorKind.UNREACHABLE, "refused", taken_at=at(t))


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


SETTINGS = HistorySettings(raw_for=2 * HOUR, five_minutes_for=DAY, keep=30 * DAY, idle_below=5)


def two_hours(tmp_path: Path) -> tuple[HistoryWriter, Clock]:
    """gpu-a polled every 60 s from T0 for two hours (120 polls): GPU 0 alice alone at 50 %; GPU 1
    shared by alice (3000 MiB) and bob (1000 MiB), at 2 % (held idle) in the first hour and 80 %
    in the second; the host does not answer for polls 30-44 (15 minutes of the first hour)."""
    clock = Clock(T0)
    writer = HistoryWriter(tmp_path, SETTINGS, poll_every=60, clock=clock)
    for k in range(120):
        t = T0 + 60 * k
        clock.now = t + 1
        jobs = [proc(10, 0, "alice", 20000), proc(11, 1, "alice", 3000), proc(12, 1, "bob", 1000)]
        writer.record(failed(t) if 30 <= k < 45 else answered(t, [50, 2 if k < 60 else 80], jobs))
        if k % 7 == 0:
            writer.flush()
    writer.flush()
    return writer, clock


ALICE = (2700 + 2025 + 3600 + 2700) / 3600  # GPU 0 both hours (45 + 60 polls), 3/4 of GPU 1
ALICE_IDLE = 2025 / 3600  # her 3/4 of GPU 1 while it idled in the first hour (45 polls answered)
BOB = (675 + 900) / 3600
BOB_IDLE = 675 / 3600
