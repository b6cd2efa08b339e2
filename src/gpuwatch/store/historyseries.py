"""Each GPU's utilization and memory per slot (say 15 minutes) from the usage history, for the
page's sparklines, read-only and cheap enough for hundreds of GPUs.

The 5-minute roll-ups are summed into slots by SQLite (one grouped query, not one row per 5
minutes in Python); the raw samples after the last roll-up are accounted as the roll-up does
(:func:`gpuwatch.usage.account`) and added to their slots. A slot's sums are a
:class:`~gpuwatch.usage.GpuTally` (known and unknown seconds, utilization and memory times
seconds). A history file that does not exist yet reads as empty. Written by :mod:`.history`;
the usage figures are read by :mod:`.historyread`.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..usage import GpuTally, HostSample, account
from .history import GpuInfo, HistoryError, connect, history_path, unpack

#: (host, GPU index) -> slot start -> what the slot added up.
SlotSums = dict[tuple[str, int], dict[float, GpuTally]]
#: A reader's query: (sql, args) -> rows.
Rows = Callable[[str, tuple[object, ...]], list[tuple[Any, ...]]]

_SLOTS_SQL = (
    "SELECT gpu_id, (t - ?) / ? AS k, SUM(known_s), SUM(down_s), "
    "SUM(CASE WHEN util_mean IS NULL THEN 0 ELSE known_s END), SUM(util_mean * known_s), "
    "SUM(CASE WHEN mem_mean IS NULL THEN 0 ELSE known_s END), SUM(mem_mean * known_s) "
    "FROM gpu_5m WHERE t >= ? AND t < ? GROUP BY gpu_id, k"
)


class SeriesReader:
    """Read-only slot sums from the history file; a connection of its own, opened when first
    needed and shared by the web server's threads (one lock)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = history_path(state_dir)
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def exists(self) -> bool:
        return self.path.exists()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _rows(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        """Rows of a query (none while the file does not exist); called with the lock held."""
        if self._conn is None:
            if not self.path.exists():
                return []
            self._conn = connect(self.path, read_only=True)
        try:
            return self._conn.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            self._conn.close()
            self._conn = None
            raise HistoryError(f"cannot read {self.path}: {exc}") from None

    def gpus(self) -> dict[int, GpuInfo]:
        """Every GPU the history knows, by id."""
        with self._lock:
            return self._gpus()

    def _gpus(self) -> dict[int, GpuInfo]:
        rows = self._rows(
            "SELECT g.id, h.name, g.gpu_index, g.model, g.memory_total_mib FROM gpus g JOIN hosts h ON h.id = g.host_id"
        )
        return {int(i): GpuInfo(int(i), str(h), int(x), m, t) for i, h, x, m, t in rows}

    def rolled_until(self) -> float | None:
        """Where the 5-minute roll-ups end (None: none yet): slots before it will not change."""
        with self._lock:
            rows = self._rows("SELECT value FROM meta WHERE key = 'rolled_5m'")
        return float(rows[0][0]) if rows else None

    def slots(self, start: float, end: float, step: int) -> SlotSums:
        """Each GPU's sums per ``step`` seconds over ``[start, end)`` (``start`` a multiple of
        ``step``, ``step`` of 5 minutes): roll-ups, then raw samples after them."""
        with self._lock:
            return slot_sums(self._rows, self._gpus(), start, end, step)


def slot_sums(
    rows: Rows,
    infos: dict[int, GpuInfo],
    start: float,
    end: float,
    step: int,
    *,
    origin: float | None = None,
    host: str | None = None,
) -> SlotSums:
    """Each GPU's sums per ``step`` seconds (slots ``origin + k * step``, default from ``start``)
    over ``[start, end)``, read with ``rows`` (a reader's query, its lock held): the 5-minute
    roll-ups, then the raw samples after them. ``host``: that host's GPUs only."""
    base = start if origin is None else origin
    meta = rows("SELECT value FROM meta WHERE key = 'rolled_5m'", ())
    rolled = float(meta[0][0]) if meta else start
    out: SlotSums = {}
    for gid, k, known, down, util_s, util_sum, mem_s, mem_sum in rows(
        _SLOTS_SQL, (int(base), int(step), int(start), int(min(end, rolled)))
    ):
        info = infos.get(int(gid))
        if info is None or (host is not None and info.host != host):
            continue
        tally = GpuTally(
            known_s=float(known or 0),
            down_s=float(down or 0),
            util_s=float(util_s or 0),
            util_sum=float(util_sum or 0),
            mem_s=float(mem_s or 0),
            mem_sum=float(mem_sum or 0),
        )
        out.setdefault((info.host, info.index), {})[base + int(k) * step] = tally
    since = max(start, rolled)
    if since >= end:
        return out
    people = {int(i): str(n) for i, n in rows("SELECT id, name FROM people", ())}
    sql = "SELECT r.t, r.ok, r.dt, r.data FROM raw r"
    args: tuple[object, ...] = (int(since), int(end))
    if host is not None:
        sql += " JOIN hosts h ON h.id = r.host_id AND h.name = ?"
        args = (host, *args)
    for t, ok, dt, data in rows(sql + " WHERE r.t >= ? AND r.t < ?", args):
        pairs = unpack(bytes(data), infos, people)
        ids = {g.index: gid for gid, g in pairs}
        sample = HostSample("", float(t), float(dt), bool(ok), tuple(g for _, g in pairs))
        slot = base + (int(t) - int(base)) // step * step
        for index, tally in account(sample, 0).gpus.items():
            info = infos.get(ids[index])
            if info is not None:
                out.setdefault((info.host, info.index), {}).setdefault(slot, GpuTally()).add(tally)
    return out
