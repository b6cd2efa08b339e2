"""Benchmark: the page's 24-hour sparklines and its usage view for a big fleet.

Builds a history file (``--hosts 200 --gpus 8``) holding, per GPU, 25 hours of 5-minute roll-up
rows (random utilization and memory: the worst case for the size of the paths) and ``--days``
days of hourly per-person rows, inserted in bulk, then measures (process CPU seconds and wall):

1. the first read of the sparklines (:class:`gpuwatch.pagehistory.Sparklines`: one grouped query
   over the roll-ups, then the SVG paths of every GPU);
2. a read a minute later (the final quarter-hours kept; only the newest read again);
3. the bytes the sparklines add to the list view's HTML, plain and gzipped (as the page is sent);
4. the usage view of 7 and 30 days (one ``tallies`` per day over the hourly rows).

Run: ``python bench/page_history.py`` (``--hosts 20`` for a quick look). Figures depend on the
machine's load, which it prints.
"""

from __future__ import annotations

import argparse
import gzip
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from gpuwatch.historyview import UsageQuery, usage_days, usage_view  # noqa: E402
from gpuwatch.pagehistory import Sparklines, usage_by_day  # noqa: E402
from gpuwatch.store.history import connect, history_path  # noqa: E402
from gpuwatch.store.historyread import HistoryReader  # noqa: E402
from gpuwatch.store.historyseries import SeriesReader  # noqa: E402

PEOPLE = [f"user{i:02d}" for i in range(40)]


def build(state_dir: Path, hosts: int, gpus: int, days: int, now: float) -> None:
    conn = connect(history_path(state_dir))
    rng = random.Random(16)
    five = int(now) // 300 * 300
    conn.execute("BEGIN")
    gid = 0
    conn.executemany("INSERT INTO people (id, name) VALUES (?, ?)", list(enumerate(PEOPLE, start=1)))
    for h in range(1, hosts + 1):
        conn.execute("INSERT INTO hosts (id, name) VALUES (?, ?)", (h, f"lab-{h:03d}"))
        for i in range(gpus):
            gid += 1
            conn.execute(
                "INSERT INTO gpus (id, host_id, gpu_index, model, memory_total_mib) VALUES (?, ?, ?, ?, ?)",
                (gid, h, i, "NVIDIA H100 80GB HBM3", 81559),
            )
    rows = [
        (t, g, 300, 0, round(rng.random() * 100, 1), 100, rng.randint(0, 81559), 81559)
        for t in range(five - 25 * 3600, five, 300)
        for g in range(1, gid + 1)
    ]
    conn.executemany("INSERT INTO gpu_5m VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
    hour = int(now) // 3600 * 3600
    people = [
        (t, rng.randint(1, len(PEOPLE)), h, rng.randint(0, 8 * 3600_000), rng.randint(0, 3600_000), 40000, 4)
        for t in range(hour - days * 86400, hour, 3600)
        for h in range(1, hosts + 1)
    ]
    conn.executemany("INSERT OR IGNORE INTO person_hour VALUES (?, ?, ?, ?, ?, ?, ?)", people)
    conn.executemany(
        "INSERT INTO meta (key, value) VALUES (?, ?)", [("rolled_5m", str(five)), ("rolled_hour", str(hour))]
    )
    conn.execute("COMMIT")
    conn.close()


def timed(what: str, run: object) -> object:
    cpu, wall = time.process_time(), time.perf_counter()
    result = run()  # type: ignore[operator]
    print(f"{what}: {time.process_time() - cpu:.3f} s CPU, {time.perf_counter() - wall:.3f} s wall")
    return result


def svg_bytes(sparks: Sparklines) -> tuple[int, int]:
    current = sparks.get()
    parts = [
        f'<svg class="spark" viewBox="0 0 96 24" role="img"><title>{s.label}</title>'
        + "".join(f'<rect class="sd" x="{x}" y="0" width="{w}" height="24"/>' for x, w in s.unknown)
        + f'<path class="su" d="{s.util_area}"/><path class="sm" d="{s.mem_line}"/></svg>'
        for s in current.lines.values()
    ]
    html = "\n".join(parts).encode()
    return len(html), len(gzip.compress(html, compresslevel=5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=200)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--days", type=int, default=30)
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="gpuwatch-page-history-") as tmp:
        state = Path(tmp)
        now = time.time()
        build(state, args.hosts, args.gpus, args.days, now)
        size = history_path(state).stat().st_size
        print(f"{args.hosts} hosts x {args.gpus} GPUs; history file {size / 1e6:.1f} MB")
        clock = [now]
        sparks = Sparklines(SeriesReader(state), clock=lambda: clock[0])
        timed("sparklines, first read", sparks.get)
        clock[0] += 61
        timed("sparklines, a minute later", sparks.get)
        plain, zipped = svg_bytes(sparks)
        gpus = args.hosts * args.gpus
        print(f"sparkline HTML: {plain / 1e3:.0f} kB ({plain / gpus:.0f} B a GPU), {zipped / 1e3:.0f} kB gzipped")
        reader = HistoryReader(state)
        for n in (7, 30):
            query = UsageQuery(days=n)
            days = usage_days(query, now)
            found = timed(f"usage view, {n} days", lambda d=days: usage_by_day(reader, d, 5))
            usage_view(query, found, now)  # type: ignore[arg-type]
        reader.close()


if __name__ == "__main__":
    main()
