"""The page's reads of the usage history: the 24-hour sparklines (kept between requests) and the
usage by day, for :mod:`gpuwatch.web`.

The sparklines are read again at most once per :data:`REFRESH_SECONDS` (a page refreshes after
every poll; a 15-minute slot changes slowly), and only from the last slot not yet final: slots
that ended before the last 5-minute roll-up never change and are kept. So a fleet of hundreds of
GPUs costs one grouped query when the page is first asked for, then a few rows a minute.
A history switched off, missing, empty or unreadable gives no sparklines (the page says why),
never an error page.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date

from .historyview import SPARK_SLOTS, SPARK_STEP, DayUsage, SlotMean, Sparkline, spark_window, sparkline
from .store.history import HistoryError
from .store.historyread import HistoryReader
from .store.historyseries import SeriesReader
from .usage import GpuTally

log = logging.getLogger(__name__)

REFRESH_SECONDS = 60.0


@dataclass(frozen=True)
class SparkSet:
    """The sparklines of every GPU the history knows, by (host, GPU index)."""

    lines: Mapping[tuple[str, int], Sparkline] = field(default_factory=dict)
    version: int = 0  # changes when the lines do (for the page's ETag)
    note: str = ""  # why there are none: "" (there are), "no history yet", "history is off", an error
    enabled: bool = True  # history.enabled: the page leaves the sparkline row out when False

    def get(self, host: str, index: int) -> Sparkline | None:
        return self.lines.get((host, index))


OFF = SparkSet(note="history is off (history.enabled: false)", enabled=False)


class Sparklines:
    """The page's sparklines, read at most once per ``refresh`` seconds of ``clock``; one reader
    at a time (a request that comes while another reads gets the lines read before)."""

    def __init__(
        self,
        reader: SeriesReader,
        clock: Callable[[], float] = time.time,
        refresh: float = REFRESH_SECONDS,
        step: int = SPARK_STEP,
        count: int = SPARK_SLOTS,
    ) -> None:
        self.reader = reader
        self.clock = clock
        self.refresh = refresh
        self.step = step
        self.count = count
        self._lock = threading.Lock()
        self._current = SparkSet(note="no history yet")
        self._read_at: float | None = None
        self._final: dict[tuple[str, int], dict[float, SlotMean]] = {}  # slots that will not change
        self._final_until = 0.0
        self._said = ""

    def get(self) -> SparkSet:
        """The sparklines now (read again when they are older than ``refresh``)."""
        now = self.clock()
        if self._read_at is not None and now - self._read_at < self.refresh:
            return self._current
        if not self._lock.acquire(blocking=self._read_at is None):
            return self._current  # another thread is reading: the lines read before will do
        try:
            if self._read_at is None or now - self._read_at >= self.refresh:
                self._current = self._read(now)
                self._read_at = now
            return self._current
        finally:
            self._lock.release()

    def _read(self, now: float) -> SparkSet:
        start, end = spark_window(now, self.step, self.count)
        try:
            if not self.reader.exists():
                return SparkSet(note="no history yet")
            rolled = self.reader.rolled_until() or start
            fresh = self.reader.slots(max(start, self._final_until), end, self.step)
            infos = {(g.host, g.index): g for g in self.reader.gpus().values()}
        except HistoryError as exc:
            if str(exc) != self._said:
                log.warning("web: the sparklines are left out: %s", exc)
                self._said = str(exc)
            return SparkSet(note=f"history not readable: {exc}")
        self._said = ""
        # Final: slots that ended before the roll-ups did, and before now (the one holding now is never).
        final_until = max(start, min(rolled // self.step * self.step, end - self.step))
        lines: dict[tuple[str, int], Sparkline] = {}
        for key in set(self._final) | set(fresh):
            kept = {t: s for t, s in self._final.get(key, {}).items() if t >= start}
            slots = {**kept, **{t: SlotMean.of(s) for t, s in fresh.get(key, {}).items()}}
            self._final[key] = {t: s for t, s in slots.items() if t < final_until}
            info = infos.get(key)
            lines[key] = sparkline(
                slots, start, info.memory_total_mib if info else None, step=self.step, count=self.count
            )
        self._final = {k: v for k, v in self._final.items() if v}
        self._final_until = final_until
        note = "" if any(not s.empty for s in lines.values()) else "no history yet"
        return SparkSet(lines=lines, version=int(now), note=note)


def usage_by_day(reader: HistoryReader, days: Sequence[tuple[date, float, float]], idle_below: float) -> list[DayUsage]:
    """What each day of a period added up (``days``: (day, start, end), from
    :func:`gpuwatch.historyview.usage_days`): per person and for the fleet's GPUs."""
    out = []
    for day, start, end in days:
        found = reader.tallies(start, end, idle_below)
        fleet = GpuTally()
        for tally in found.gpus.values():
            fleet.add(tally)
        people = {name: (t.gpu_s, t.idle_s) for name, t in found.people.items()}
        out.append(DayUsage(day, start, end, people, fleet.used_s, fleet.idle_s, fleet.known_s, fleet.down_s))
    return out
