"""Benchmark: a simulated year of usage history for a big fleet, fed to the store directly.

What it builds (``--hosts 200 --gpus 8 --days 365``, a 60 s poll), in a fresh state directory:

- the newest ``raw_for`` (48 h) as real polls: ``HostStore.write`` of one sample per host per
  minute (utilization, memory, the people on each GPU), exactly as the daemon's writer writes them;
- everything older **generated directly as roll-up rows**: writing and rolling up a year of raw
  polls (105 million samples) would take days on this machine, so ``gpu_hour`` and
  ``person_hour`` rows (and ``gpu_5m`` rows for the 5-minute window) are made by the same kind of
  simulation, one row per GPU and per person and host each hour, and inserted in bulk;
- the 48 h of raw polls are then rolled up by the real code (``HistoryStore.rollup``), bucket by
  bucket, which is where the hourly roll-up time is measured; so are the daily sums of every day
  (from the hourly rows, generated or rolled up).

The simulation: each GPU is free or runs one person's job (jobs last ~8 h, gaps ~4 h, people drawn
with a skew among ``--people``, one job in ten shared by two people), a job is held idle (0-4 %)
a third of the time, a host does not answer 0.2 % of its hours, 5 % of GPUs are never used.

It reports: the database's size, a 30-day ``usage --by user`` (and ``--by host``), the hourly and
5-minute roll-up of one bucket, the retention delete (the daily steady state, and a whole day of
hourly rows at once), and the client CPU per host-poll of the history (``HistoryWriter.record``
and the writer's transaction, over many real ``HostSnapshot`` objects).

Run: ``python bench/history_year.py`` (``--days 30 --hosts 20`` for a quick look; ``--keep DIR``
keeps the database). Figures depend on the machine's load, which it prints.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from gpuwatch.model import Gpu, GpuProcess, HostSnapshot  # noqa: E402
from gpuwatch.store.history import (  # noqa: E402
    FIVE_MINUTES,
    HOUR,
    HistorySettings,
    HistoryStore,
    connect,
    history_path,
)
from gpuwatch.store.historyread import HistoryReader  # noqa: E402
from gpuwatch.store.historywriter import HistoryWriter  # noqa: E402
from gpuwatch.usage import GpuReading, HostSample, PersonOnGpu  # noqa: E402

DAY = 86400
MODEL = "NVIDIA H100 80GB HBM3"
TOTAL_MIB = 81559


class Sim:
    """The fleet's state, advanced one hour (or one minute) at a time."""

    def __init__(self, hosts: int, gpus: int, people: int, seed: int = 7) -> None:
        self.rng = random.Random(seed)
        self.hosts, self.gpus = hosts, gpus
        self.people = [f"user{i:03}" for i in range(people)]
        self.weights = [1.0 / (i + 1) ** 0.8 for i in range(people)]
        n = hosts * gpus
        self.never = {g for g in range(n) if self.rng.random() < 0.05}
        self.job: list[tuple[str, ...] | None] = [None] * n
        self.idle = [False] * n
        self.util = [0] * n

    def step(self, hours: float) -> None:
        rng = self.rng
        for g in range(len(self.job)):
            if g in self.never:
                continue
            if self.job[g] is not None and rng.random() < hours / 8:
                self.job[g] = None
            elif self.job[g] is None and rng.random() < hours / 4:
                who = rng.choices(self.people, self.weights, k=2 if rng.random() < 0.1 else 1)
                self.job[g] = tuple(dict.fromkeys(who))
                self.idle[g] = rng.random() < 0.33
            if self.job[g] is not None:
                self.util[g] = rng.randint(0, 4) if self.idle[g] else rng.randint(40, 100)
            else:
                self.util[g] = 0

    def host_down(self) -> bool:
        return self.rng.random() < 0.002


def generated_hours(
    store: HistoryStore,
    sim: Sim,
    start: int,
    end: int,
    gpu_ids: list[int],
    host_ids: list[int],
    person_ids: dict[str, int],
    idle_below: float,
) -> int:
    """gpu_hour and person_hour rows for [start, end), as the simulation says; returns rows."""
    rows = 0
    conn = store.conn
    for hour in range(start, end, HOUR):
        sim.step(1.0)
        gpu_rows, person_rows = [], []
        for h in range(sim.hosts):
            down = sim.host_down()
            people: dict[str, list[float]] = {}
            for i in range(sim.gpus):
                g = h * sim.gpus + i
                job, util = sim.job[g], sim.util[g]
                if down:
                    gpu_rows.append((hour, gpu_ids[g], 0, 3600, 0, 0, 0, 0, None, None, None))
                    continue
                used = 3600 if job else 0
                idle = used if job and util < idle_below else 0
                mem = 30000 if job else 0
                gpu_rows.append((hour, gpu_ids[g], 3600, 0, used, idle, 3600, util * 3600, util, mem, mem))
                for name in job or ():
                    share = 3600 / len(job)
                    tally = people.setdefault(name, [0.0, 0.0, 0])
                    tally[0] += share
                    tally[1] += share if idle else 0
                    tally[2] += 1
            person_rows += [
                (hour, person_ids[n], host_ids[h], round(t[0] * 1000), round(t[1] * 1000), 30000 * int(t[2]), int(t[2]))
                for n, t in people.items()
            ]
        conn.executemany("INSERT INTO gpu_hour VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", gpu_rows)
        conn.executemany("INSERT INTO person_hour VALUES (?, ?, ?, ?, ?, ?, ?)", person_rows)
        rows += len(gpu_rows) + len(person_rows)
    return rows


def generated_five_minutes(store: HistoryStore, sim: Sim, start: int, end: int, gpu_ids: list[int]) -> int:
    rows = []
    for t in range(start, end, FIVE_MINUTES):
        sim.step(FIVE_MINUTES / HOUR)
        for g, gid in enumerate(gpu_ids):
            util = sim.util[g]
            mem = 30000 if sim.job[g] else 0
            rows.append((t, gid, 300, 0, float(util), util, mem, mem))
    store.conn.executemany("INSERT INTO gpu_5m VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
    return len(rows)


def samples(sim: Sim, t: int) -> Iterator[HostSample]:
    """One minute of polls of the whole fleet at ``t``."""
    sim.step(1 / 60)
    for h in range(sim.hosts):
        if sim.rng.random() < 0.002:
            yield HostSample(f"gpu{h:03}", t + h % 60, 60, False, tuple(GpuReading(i) for i in range(sim.gpus)))
            continue
        gpus = []
        for i in range(sim.gpus):
            g = h * sim.gpus + i
            job = sim.job[g] or ()
            people = tuple(PersonOnGpu(n, 30000 // len(job), 2) for n in job)
            mem = 30000 if job else 0
            gpus.append(GpuReading(i, MODEL, None, sim.util[g], mem, TOTAL_MIB, people))
        yield HostSample(f"gpu{h:03}", t + h % 60, 60, True, tuple(gpus))


def snapshot(host: str, t: float, rng: random.Random, gpus: int) -> HostSnapshot:
    """A real-looking HostSnapshot: ``gpus`` GPUs, most busy with one or two people's processes."""
    rows, procs = [], []
    for i in range(gpus):
        busy = rng.random() < 0.7
        rows.append(
            Gpu(
                i,
                f"GPU-{host}-{i}",
                MODEL,
                None,
                rng.randint(40, 100) if busy else 0,
                30000 if busy else 0,
                TOTAL_MIB,
                60,
                300.0,
            )
        )
        if busy:
            for k in range(1 if rng.random() < 0.9 else 2):
                procs.append(
                    GpuProcess(
                        1000 + 10 * i + k,
                        i,
                        f"GPU-{host}-{i}",
                        f"user{rng.randint(0, 59):03}",
                        "python",
                        "python train.py",
                        15000,
                        3600,
                    )
                )
    taken = datetime.fromtimestamp(t, timezone.utc)
    return HostSnapshot(host, host, True, gpus=tuple(rows), processes=tuple(procs), taken_at=taken)


def timed(func, *args, **kwargs):  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    result = func(*args, **kwargs)
    return time.perf_counter() - started, result


def client_cost(directory: Path, polls: int, gpus: int) -> tuple[float, float]:
    """CPU seconds per host-poll of the history: record() alone, and record() plus the writer's
    transactions (flushed every 200 polls, as ~3 s of a 200-host fleet at a 60 s poll)."""
    rng = random.Random(3)
    snaps = [snapshot(f"gpu{i % 200:03}", 1_800_000_000 + 60 * (i // 200) + i % 60, rng, gpus) for i in range(polls)]
    writer = HistoryWriter(directory, HistorySettings(), 60.0, clock=lambda: 1_800_000_000.0)
    writer.flush()  # open and migrate outside the measurement
    started = time.process_time()
    for s in snaps:
        writer.record(s)
    record_only = (time.process_time() - started) / polls
    writer._queue = type(writer._queue)()
    writer._last.clear()
    started = time.process_time()
    for n, s in enumerate(snaps, 1):
        writer.record(s)
        if n % 200 == 0:
            writer.flush()
    writer.flush()
    total = (time.process_time() - started) / polls
    writer.stop()
    return record_only, total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=200)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--people", type=int, default=60)
    parser.add_argument("--raw-hours", type=int, default=48)
    parser.add_argument("--cost-polls", type=int, default=20000)
    parser.add_argument("--keep", metavar="DIR", help="build the database in DIR and keep it")
    args = parser.parse_args()
    directory = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="gpuwatch-history-bench-"))
    directory.mkdir(parents=True, exist_ok=True)
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    settings = HistorySettings()
    try:
        report(args, directory, settings)
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    return 0


def report(args: argparse.Namespace, directory: Path, settings: HistorySettings) -> None:
    now = (int(time.time()) // HOUR) * HOUR
    raw_start = now - args.raw_hours * HOUR
    first = raw_start - (args.days * DAY - args.raw_hours * HOUR)
    five_start = max(first, now - int(settings.five_minutes_for))
    conn = connect(history_path(directory))
    conn.execute("PRAGMA journal_mode=WAL")
    store = HistoryStore(conn, settings)
    sim = Sim(args.hosts, args.gpus, args.people)
    # every host, GPU and person once, through the store's own id tables
    with store.transaction():
        probe = [
            HostSample(
                f"gpu{h:03}",
                first,
                60,
                True,
                tuple(GpuReading(i, MODEL, None, 0, 0, TOTAL_MIB) for i in range(args.gpus)),
            )
            for h in range(args.hosts)
        ]
        host_ids = [store._host_id(s.host) for s in probe]
        gpu_ids = [store._gpu_id(host_ids[h], g) for h, s in enumerate(probe) for g in s.gpus]
        person_ids = {p: store._person_id(p) for p in sim.people}
    took, rows = timed(_generate, store, sim, first, raw_start, five_start, gpu_ids, host_ids, person_ids, settings)
    print(f"generated {rows:,} roll-up rows for {(raw_start - first) / DAY:.0f} days directly in {took:.0f}s")
    written, took = 0, time.perf_counter()
    for t in range(raw_start, now, 60):
        written += store.write(samples(sim, t))
    took = time.perf_counter() - took
    print(
        f"wrote {written:,} raw polls ({args.raw_hours}h of {args.hosts} hosts at 60 s) through HistoryStore.write "
        f"in {took:.0f}s ({1e6 * took / written:.0f} µs per poll, in batches of one minute of the fleet)"
    )
    _rollups(store, now)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size = sum(os.path.getsize(p) for p in directory.glob("history.sqlite3*"))
    counts = {
        t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
        for t in ("raw", "gpu_5m", "gpu_hour", "person_hour", "gpu_day", "person_day")
    }
    print(
        f"database: {size / 2**20:,.0f} MiB ({size / 1e9:.2f} GB); rows: "
        + ", ".join(f"{t} {n:,}" for t, n in counts.items())
    )
    _queries(directory, now, settings)
    _retention(store, now, settings)
    conn.close()
    record_only, total = client_cost(directory / "cost", args.cost_polls, args.gpus)
    print(
        f"client CPU per host-poll ({args.cost_polls:,} polls of {args.gpus}-GPU hosts): "
        f"record() {1e3 * record_only:.3f} ms; record() + the writer's transactions {1e3 * total:.3f} ms"
    )
    print(f"load average after: {os.getloadavg()[0]:.1f}")


def _generate(
    store: HistoryStore,
    sim: Sim,
    first: int,
    raw_start: int,
    five_start: int,
    gpu_ids: list[int],
    host_ids: list[int],
    person_ids: dict[str, int],
    settings: HistorySettings,
) -> int:
    rows = 0
    with store.transaction():
        rows += generated_hours(store, sim, first, raw_start, gpu_ids, host_ids, person_ids, settings.idle_below)
        if five_start < raw_start:
            rows += generated_five_minutes(store, sim, five_start, raw_start, gpu_ids)
        for key in ("rolled_5m", "rolled_hour"):
            store.conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, str(raw_start)))
    return rows


def _rollups(store: HistoryStore, now: int) -> None:
    """Roll up the raw part with the real code, one bucket per call, timing each kind."""
    times: dict[str, list[float]] = {"rolled_5m": [], "rolled_hour": [], "rolled_day": []}
    while True:
        before = {k: store._meta(k) for k in times}
        took, done = timed(store.rollup, now + 3 * HOUR, limit=1)
        if not done:
            break
        after = {k: store._meta(k) for k in times}
        times[next(k for k in times if after[k] != before[k])].append(took)
    for key, values in times.items():
        if values:
            what = {"rolled_5m": "5-minute bucket (from raw)", "rolled_hour": "hour (from raw)"}.get(
                key, "day (from hours)"
            )
            print(
                f"roll-up of one {what}, real code: "
                f"mean {statistics.mean(values):.2f}s, max {max(values):.2f}s over {len(values)} buckets"
            )


def _queries(directory: Path, now: int, settings: HistorySettings) -> None:
    for by in ("user", "host"):
        reader = HistoryReader(directory)
        took, doc = timed(
            reader.usage, now - 30 * DAY, now + 1800, by, idle_below=settings.idle_below, half_life=settings.half_life
        )
        reader.close()
        print(f"usage --since 30d --by {by}: {took:.2f}s ({len(doc['groups'])} groups, a fresh connection)")
    reader = HistoryReader(directory)
    took, series = timed(reader.gpu_series, now - DAY, now + 1800, host="gpu000")
    print(f"gpu_series of one host's GPUs, last 24h: {took:.2f}s ({sum(len(v) for v in series.values())} points)")
    took, daily = timed(reader.person_daily, now - 30 * DAY, now)
    print(f"person_daily, 30 days: {took:.2f}s ({len(daily)} people)")
    reader.close()


def _retention(store: HistoryStore, now: int, settings: HistorySettings) -> None:
    took, deleted = timed(store.retain, now + 3 * HOUR)
    print(f"retention delete, as the writer runs it (hourly): {took:.2f}s, deleted {deleted}")
    store.settings = HistorySettings(settings.raw_for, settings.five_minutes_for, keep=364 * DAY)
    took, deleted = timed(store.retain, now + 3 * HOUR)
    print(
        f"retention delete of a whole day of hourly rows at once (keep shortened by a day): {took:.2f}s, "
        f"deleted {deleted}"
    )
    store.settings = settings


if __name__ == "__main__":
    sys.exit(main())
