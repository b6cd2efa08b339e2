"""A recorded week of a small lab, written to the usage history with an explicit clock, for the
page's sparklines and usage view (tests/test_web_history_e2e.py).

Each host has 4 H100s, polled every 5 minutes up to ``now``:

* GPU 0: alice's job (20000 MiB), 90 % from 09:00 to 21:00 (this machine's time), 40 % otherwise;
* GPU 1: shared by bob (3000 MiB) and :data:`HOSTILE` (1000 MiB): 2 % (held idle) before noon, 70 % after;
* GPU 2: verylongusername's job at 60 % on even days of the month, nothing otherwise;
* GPU 3: nobody, 0 %; on the last host, carol's at 30 % for the last 3 days;
* the second host does not answer for the two hours that ended three hours before ``now``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from gpuwatch.store.history import HistorySettings
from gpuwatch.store.historywriter import HistoryWriter
from timeline import Clock, answered, failed, proc

HOSTILE = "<img src=x onerror=alert(2)>"
POLL = 300
DOWN_FROM, DOWN_UNTIL = 5 * 3600, 3 * 3600  # seconds before now


def _poll(name: str, host: int, last: bool, t: float, now: float) -> object:
    hour, mday = time.localtime(t).tm_hour, time.localtime(t).tm_mday
    if host == 1 and now - DOWN_FROM <= t < now - DOWN_UNTIL:
        return failed(t, name)
    jobs = [proc(10, 0, "alice", 20000), proc(11, 1, "bob", 3000), proc(12, 1, HOSTILE, 1000)]
    utils = [90 if 9 <= hour < 21 else 40, 2 if hour < 12 else 70, 0, 0]
    if mday % 2 == 0:
        jobs.append(proc(13, 2, "verylongusername", 30000))
        utils[2] = 60
    if last and t >= now - 3 * 86400:
        jobs.append(proc(14, 3, "carol", 8000))
        utils[3] = 30
    return answered(t, utils, jobs, name)


def fill_week(state_dir: Path, hosts: Sequence[str], now: float, days: int = 7) -> int:
    """Write ``days`` days of polls of ``hosts`` ending at ``now``; returns how many."""
    start = now - days * 86400
    clock = Clock(start)
    writer = HistoryWriter(state_dir, HistorySettings(), poll_every=POLL, clock=clock)
    count = 0
    t = start
    while t < now:
        clock.now = t + 1
        for i, name in enumerate(hosts):
            writer.record(_poll(name, i, i == len(hosts) - 1, t, now))  # type: ignore[arg-type]
            count += 1
        if count % 900 == 0:
            writer.flush()
        t += POLL
    clock.now = now
    writer.stop()
    return count
