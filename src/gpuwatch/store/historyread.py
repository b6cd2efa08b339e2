"""Reading the usage history (``history.sqlite3``, written by :mod:`.history`), read-only.

For ``gpuwatch usage``, ``/api/v1/usage``, the ``usage`` report and the page: usage per person,
host, model or GPU over a period (:meth:`HistoryReader.usage`), each GPU's utilization and memory
as 5-minute points (:meth:`HistoryReader.gpu_series`), each person's GPU-hours per day
(:meth:`HistoryReader.person_daily`).

A period ``[start, end)`` is read from the daily sums for its whole UTC days, the hourly
roll-ups for its other hours rolled up, and the raw samples after them, accounted the same way
(:mod:`gpuwatch.usage`): the figures of a sample's hour are those of its raw samples. Hours count
whole in a period where they start in it, so give hour-aligned bounds (the CLI and the API align
them) except for an ``end`` of now.
A history file that does not exist yet reads as empty.
"""

from __future__ import annotations

import math
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any

from ..usage import (
    GROUPINGS,
    GpuReading,
    GpuTally,
    HostSample,
    PersonTally,
    account,
    gpu_records,
    group_key,
    person_records,
    spans,
    usage_document,
)
from .history import DAY, FIVE_MINUTES, HOUR, GpuInfo, HistoryError, connect, history_path, unpack
from .historyseries import slot_sums

# The sums of a period's hourly roll-ups (for its whole days: gpu_day and person_day instead).
_GPU_SUMS = (
    "SELECT gpu_id, SUM(known_s), SUM(down_s), SUM(used_s), SUM(idle_s), SUM(util_s), SUM(util_sum), "
    "MAX(util_max), SUM(mem_mean * known_s), SUM(CASE WHEN mem_mean IS NULL THEN 0 ELSE known_s END), "
    "MAX(mem_max) FROM gpu_hour WHERE t >= ? AND t < ? GROUP BY gpu_id"
)
_PERSON_SUMS = (
    "SELECT person_id, t, SUM(gpu_ms), SUM(idle_ms), MAX(mem_max), MAX(gpus_max) "
    "FROM person_hour WHERE t >= ? AND t < ? GROUP BY person_id, t"
)


@dataclass(frozen=True)
class SeriesPoint:
    """One GPU over one 5-minute bucket starting at ``t``: means (None: no reading)."""

    t: float
    utilization_percent: float | None
    memory_used_mib: float | None
    unknown: bool = False  # the host did not answer in this bucket


@dataclass
class Tallies:
    """What a period added up: per GPU id, per person (their sum, and their GPU-seconds per span
    of ``spans``: the hours, and whole days, the period was read in)."""

    gpus: dict[int, GpuTally] = field(default_factory=dict)
    people: dict[str, PersonTally] = field(default_factory=dict)
    buckets: dict[str, dict[float, float]] = field(default_factory=dict)
    spans: list[tuple[float, float]] = field(default_factory=list)


class HistoryReader:
    """Read-only queries on the history file; a connection of its own, opened when first needed
    (thread-safe: one lock per reader)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = history_path(state_dir)
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.RLock()  # one connection, shared by the web server's threads

    def _connection(self) -> sqlite3.Connection | None:
        if self._conn is None and self.path.exists():
            self._conn = connect(self.path, read_only=True)
        return self._conn

    def _rows(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            conn = self._connection()
            if conn is None:
                return []
            try:
                return conn.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                self.close()
                raise HistoryError(f"cannot read {self.path}: {exc}") from None

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _meta(self, key: str) -> float | None:
        rows = self._rows("SELECT value FROM meta WHERE key = ?", (key,))
        return float(rows[0][0]) if rows else None

    def gpus(self) -> dict[int, GpuInfo]:
        """Every GPU the history knows, by id."""
        rows = self._rows(
            "SELECT g.id, h.name, g.gpu_index, g.model, g.memory_total_mib FROM gpus g JOIN hosts h ON h.id = g.host_id"
        )
        return {int(i): GpuInfo(int(i), str(h), int(x), m, t) for i, h, x, m, t in rows}

    def _people(self) -> dict[int, str]:
        return {int(i): str(n) for i, n in self._rows("SELECT id, name FROM people")}

    def _raw(
        self, start: float, end: float, gpus: dict[int, GpuInfo], people: dict[int, str]
    ) -> Iterator[tuple[int, int, bool, int, list[tuple[int, GpuReading]]]]:
        """The raw samples of ``[start, end)`` unpacked (none read when the span is empty)."""
        if start >= end:
            return
        sql = "SELECT t, host_id, ok, dt, data FROM raw WHERE t >= ? AND t < ?"
        for t, host_id, ok, dt, data in self._rows(sql, (int(start), int(end))):
            yield int(t), int(host_id), bool(ok), int(dt), unpack(bytes(data), gpus, people)

    # -- usage

    def tallies(self, start: float, end: float, idle_below: float, *, days: bool = True) -> Tallies:
        """Usage over ``[start, end)``: the daily sums for the whole UTC days in it (``days``), the
        hourly roll-ups for the other hours rolled up, the raw samples after them (accounted with
        ``idle_below``)."""
        with self._lock:
            out = Tallies()
            rolled = self._meta("rolled_hour") or start
            hours_end = min(end, rolled)
            first, last = math.ceil(start / DAY) * DAY, min(hours_end // DAY * DAY, self._meta("rolled_day") or 0)
            people = self._people()  # read once for the roll-ups and the raw samples
            if days and first < last:
                self._rolled(out, "day", first, last, people)
                self._rolled(out, "hour", start, first, people)
                self._rolled(out, "hour", last, hours_end, people)
                out.spans = spans(start, end, (first, last))
            else:
                self._rolled(out, "hour", start, hours_end, people)
                out.spans = spans(start, end)
            raw_from = max(start, rolled)
            gpus = self.gpus() if raw_from < end else {}
            for t, _host, ok, dt, pairs in self._raw(raw_from, end, gpus, people):
                sample = HostSample("", t, dt, ok, tuple(g for _, g in pairs))
                ids = {g.index: gid for gid, g in pairs}
                result = account(sample, idle_below)
                for index, tally in result.gpus.items():
                    out.gpus.setdefault(ids[index], GpuTally()).add(tally)
                hour = float(t // HOUR * HOUR)
                for name, p in result.people.items():
                    out.people.setdefault(name, PersonTally()).add(p)
                    per_span = out.buckets.setdefault(name, {})
                    per_span[hour] = per_span.get(hour, 0.0) + p.gpu_s
            return out

    def _rolled(self, out: Tallies, grain: str, start: float, end: float, people: dict[int, str]) -> None:
        """Add the ``hour`` or ``day`` roll-ups of ``[start, end)``."""
        if end <= start:
            return
        rows = self._rows(_GPU_SUMS.replace("gpu_hour", f"gpu_{grain}"), (int(start), int(end)))
        for gid, known, down, used, idle, util_s, util_sum, util_max, mem_sum, mem_s, mem_max in rows:
            out.gpus.setdefault(int(gid), GpuTally()).add(
                GpuTally(
                    known_s=float(known or 0),
                    down_s=float(down or 0),
                    used_s=float(used or 0),
                    idle_s=float(idle or 0),
                    util_s=float(util_s or 0),
                    util_sum=float(util_sum or 0),
                    util_max=util_max,
                    mem_s=float(mem_s or 0),
                    mem_sum=float(mem_sum or 0),
                    mem_max=mem_max,
                )
            )
        rows = self._rows(_PERSON_SUMS.replace("person_hour", f"person_{grain}"), (int(start), int(end)))
        for pid, t, gpu_ms, idle_ms, mem_max, gpus_max in rows:
            name = people.get(int(pid), "?")
            gpu_s = float(gpu_ms) / 1000.0
            out.people.setdefault(name, PersonTally()).add(
                PersonTally(gpu_s, float(idle_ms) / 1000.0, int(mem_max), int(gpus_max))
            )
            per_span = out.buckets.setdefault(name, {})
            per_span[float(t)] = per_span.get(float(t), 0.0) + gpu_s

    def usage(self, start: float, end: float, by: str, *, idle_below: float, half_life: float) -> dict[str, object]:
        """The ``usage --json`` document for ``[start, end)`` grouped ``by`` user, host, model or gpu."""
        if by not in GROUPINGS:
            raise ValueError(f"by: {by!r} is not one of {', '.join(GROUPINGS)}")
        with self._lock:
            found = self.tallies(start, end, idle_below)
            infos = self.gpus()
        fleet = GpuTally()
        groups: dict[str, GpuTally] = {}
        for gid, tally in found.gpus.items():
            fleet.add(tally)
            info = infos.get(gid)
            if info is not None and by != "user":
                groups.setdefault(group_key(by, info.host, info.index, info.model), GpuTally()).add(tally)
        never = [
            f"{infos[gid].host}:{infos[gid].index}"
            for gid, tally in found.gpus.items()
            if gid in infos and tally.known_s > 0 and tally.used_s == 0
        ]
        if by == "user":
            records = person_records(found.people, found.buckets, found.spans, end, half_life)
        else:
            records = gpu_records(groups)
        return usage_document(records, by, start, end, fleet, never)

    # -- for the page

    def gpu_series(
        self, start: float, end: float, *, host: str | None = None
    ) -> dict[tuple[str, int], list[SeriesPoint]]:
        """Each GPU's utilization and memory (means) per 5 minutes over ``[start, end)``, by
        (host, index), oldest first: from the 5-minute roll-ups, then the raw samples after them
        (:func:`.historyseries.slot_sums`, the sparklines' reading, in 5-minute slots).
        ``host``: that host's GPUs only."""
        with self._lock:
            sums = slot_sums(self._rows, self.gpus(), start, end, FIVE_MINUTES, origin=0, host=host)
        return {
            key: [
                SeriesPoint(t, s.utilization_percent, s.memory_mean_mib, s.down_s > 0 and not s.known_s)
                for t, s in sorted(slots.items())
            ]
            for key, slots in sums.items()
        }

    def person_daily(self, start: float, end: float, tz: tzinfo | None = None) -> dict[str, dict[str, float]]:
        """Each person's GPU-hours per day (``YYYY-MM-DD`` in ``tz``, default this machine's
        zone) over ``[start, end)``."""
        found = self.tallies(start, end, idle_below=0, days=False)
        out: dict[str, dict[str, float]] = {}
        for name, hours in found.buckets.items():
            days = out.setdefault(name, {})
            for hour, gpu_s in hours.items():
                day = _day(hour, tz)
                days[day] = days.get(day, 0.0) + gpu_s / 3600.0
        return {name: dict(sorted(days.items())) for name, days in sorted(out.items())}


def _day(t: float, tz: tzinfo | None) -> str:
    when = datetime.fromtimestamp(t, tz) if tz is not None else datetime.fromtimestamp(t).astimezone()
    return when.strftime("%Y-%m-%d")
