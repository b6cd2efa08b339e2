"""What the page shows of the usage history, as plain records: the 24-hour sparkline of each GPU
and the usage view (GPU-hours per person over a period, by day).

Pure: nothing here reads a clock, a file or the network; times and the time zone are parameters
(``tz`` None: this machine's local zone). :mod:`gpuwatch.pagehistory` reads the history and
:mod:`gpuwatch.web` renders these records with its templates, which escape every string.

Sparkline conventions: the last 24 hours in :data:`SPARK_SLOTS` slots of :data:`SPARK_STEP`
seconds, the last one holding now; per slot the GPU's mean utilization and its mean memory use as
a percent of its memory, over the seconds its host answered. A slot without any sample is a gap
in the lines (no history then); a slot where the host did not answer for most of its time is
*unknown* (a band; where it never answered, a gap in the lines too: never zero use).
Coordinates are a ``viewBox`` of one unit per slot across and :data:`SPARK_HEIGHT` units for
0..100 % up, drawn as steps (a slot's mean is flat over its slot), integers only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, tzinfo
from typing import NamedTuple, Protocol
from urllib.parse import parse_qs, urlencode

from .text import format_duration, iso_time, plural

SPARK_STEP = 900  # seconds per slot: 96 slots over 24 hours
SPARK_SLOTS = 96
SPARK_HEIGHT = 24
NO_HISTORY = "no history yet"

#: The usage view's periods offered as links (days back, today included).
USAGE_DAYS = (7, 30)
DEFAULT_DAYS = 7
MAX_DAYS = 400  # history.keep's default: hourly sums are not kept longer
#: People with a colour of their own in the stacked bars; the others share one.
PALETTE = 8


# ---------------------------------------------------------------- sparklines


class SlotReading(Protocol):
    """What a sparkline needs of one GPU over one slot (a :class:`~gpuwatch.usage.GpuTally` has it)."""

    @property
    def utilization_percent(self) -> float | None: ...
    @property
    def memory_mean_mib(self) -> float | None: ...
    @property
    def known_s(self) -> float: ...
    @property
    def down_s(self) -> float: ...


class SlotMean(NamedTuple):
    """A slot's reading, kept small (the page keeps the final slots of every GPU between reads)."""

    utilization_percent: float | None
    memory_mean_mib: float | None
    known_s: float
    down_s: float

    @classmethod
    def of(cls, slot: SlotReading) -> SlotMean:
        return cls(slot.utilization_percent, slot.memory_mean_mib, slot.known_s, slot.down_s)


@dataclass(frozen=True)
class Sparkline:
    """One GPU's last 24 hours as SVG paths (``d`` attributes) and words for its title."""

    util_line: str  # steps of mean utilization
    util_area: str  # the same steps closed down to 0, for a fill
    mem_line: str  # steps of mean memory use, percent of the GPU's memory
    unknown: tuple[tuple[int, int], ...]  # (x, width) of the runs of slots the host never answered
    label: str  # "last 24 h: utilization mean 43 %, peak 100 %; memory ..."
    empty: bool  # nothing at all in the 24 hours: say NO_HISTORY instead
    width: int = SPARK_SLOTS
    height: int = SPARK_HEIGHT


def spark_window(now: float, step: int = SPARK_STEP, slots: int = SPARK_SLOTS) -> tuple[float, float]:
    """``[start, end)`` of the sparklines at ``now``: whole slots, the last one holding now."""
    end = math.floor(now / step) * step + step
    return float(end - slots * step), float(end)


def _y(percent: float, height: int) -> int:
    return round(height - max(0.0, min(100.0, percent)) * height / 100)


def _runs(values: Sequence[int | None]) -> Iterable[tuple[int, int, str]]:
    """Each run of slots with a value: (first slot, y at the first slot, its path after "M x y")."""
    start = first = previous = None
    parts: list[str] = []
    for i, y in enumerate([*values, None]):
        if y is None:
            if start is not None and first is not None:
                yield start, first, "".join(parts) + f"H{i}"
            start = first = previous = None
            parts = []
            continue
        if start is None:
            start, first = i, y
        elif y != previous:
            parts.append(f"H{i}V{y}")
        previous = y


def step_paths(percents: Sequence[float | None], height: int = SPARK_HEIGHT) -> tuple[str, str]:
    """A series of percents (None: a gap) as a step line and the area under it (SVG path data)."""
    ys = [None if p is None else _y(p, height) for p in percents]
    line, area = [], []
    for x, y, rest in _runs(ys):
        line.append(f"M{x} {y}{rest}")
        area.append(f"M{x} {height}V{y}{rest}V{height}Z")
    return "".join(line), "".join(area)


def _unknown_runs(flags: Sequence[bool]) -> tuple[tuple[int, int], ...]:
    runs, start = [], None
    for i, flag in enumerate([*flags, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i - start))
            start = None
    return tuple(runs)


def sparkline(
    slots: Mapping[float, SlotReading],
    start: float,
    memory_total_mib: int | None,
    *,
    step: int = SPARK_STEP,
    count: int = SPARK_SLOTS,
    height: int = SPARK_HEIGHT,
) -> Sparkline:
    """The sparkline of one GPU from its sums per slot (``slots``: slot start -> what the slot
    added up; a slot absent had no sample) over ``count`` slots from ``start``."""
    util: list[float | None] = [None] * count
    mem: list[float | None] = [None] * count
    unknown = [False] * count
    for t, tally in slots.items():
        i = int((t - start) // step)
        if not 0 <= i < count:
            continue
        util[i] = tally.utilization_percent
        mean = tally.memory_mean_mib
        mem[i] = 100 * mean / memory_total_mib if mean is not None and memory_total_mib else None
        unknown[i] = tally.down_s > tally.known_s
    util_line, util_area = step_paths(util, height)
    mem_line, _ = step_paths(mem, height)
    down = sum(tally.down_s for t, tally in slots.items() if 0 <= (t - start) // step < count)
    return Sparkline(
        util_line=util_line,
        util_area=util_area,
        mem_line=mem_line,
        unknown=_unknown_runs(unknown),
        label=_spark_words(util, mem, down),
        empty=not any(v is not None for v in util + mem) and not any(unknown),
        width=count,
        height=height,
    )


def _spark_words(util: Sequence[float | None], mem: Sequence[float | None], down_s: float) -> str:
    parts = []
    for name, values in (("utilization", util), ("memory", mem)):
        known = [v for v in values if v is not None]
        if known:
            parts.append(f"{name} mean {sum(known) / len(known):.0f} %, peak {max(known):.0f} %")
    if down_s > 0:
        parts.append(f"{format_duration(down_s)} unknown (host did not answer)")
    return "last 24 h: " + ("; ".join(parts) if parts else NO_HISTORY)


# ---------------------------------------------------------------- the usage view: its period


@dataclass(frozen=True)
class UsageQuery:
    """The usage view's period, as in its URL: ``?days=30``, or ``?from=2026-12-01&to=2026-12-07``
    (local dates, both days whole). Default: the last :data:`DEFAULT_DAYS` days, today included."""

    days: int = DEFAULT_DAYS
    first: date | None = None
    last: date | None = None

    @classmethod
    def parse(cls, query_string: str) -> UsageQuery:
        """Raises ValueError, in words, for a period it cannot read."""
        params = parse_qs(query_string)

        def value(name: str) -> str:
            return params.get(name, [""])[-1].strip()

        first, last = value("from"), value("to")
        if first or last:
            start = _date(first, "from") if first else None
            end = _date(last, "to") if last else None
            if start is None:
                raise ValueError("to: goes with from (a first day)")
            if end is not None and end < start:
                raise ValueError("to: is before from")
            return cls(days=0, first=start, last=end)
        days = value("days") or str(DEFAULT_DAYS)
        if not days.isdigit() or not 1 <= int(days) <= MAX_DAYS:
            raise ValueError(f"days: a whole number of days from 1 to {MAX_DAYS}")
        return cls(days=int(days))

    def url_query(self) -> str:
        if self.first is not None:
            params = {"from": self.first.isoformat(), **({"to": self.last.isoformat()} if self.last else {})}
            return "?" + urlencode(params)
        return "" if self.days == DEFAULT_DAYS else f"?days={self.days}"


_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def _date(text: str, name: str) -> date:
    if _DATE.fullmatch(text):
        try:
            return date.fromisoformat(text)
        except ValueError:
            pass
    raise ValueError(f"{name}: {text[:20]!r} is not a date like 2026-12-01")


def local_date(t: float, tz: tzinfo | None = None) -> date:
    return datetime.fromtimestamp(t, tz).date()


def midnight(day: date, tz: tzinfo | None = None) -> float:
    """The start of a day in ``tz`` (None: local), as Unix time: daylight saving time included."""
    return datetime.combine(day, time(), tzinfo=tz).timestamp()


def usage_days(query: UsageQuery, now: float, tz: tzinfo | None = None) -> list[tuple[date, float, float]]:
    """The days of the period ``query`` asks for, each ``(day, start, end)``, oldest first, the
    last one ending now at the latest. Raises ValueError for a period in the future or too long."""
    today = local_date(now, tz)
    if query.first is not None:
        first, last = query.first, min(query.last or today, today)
    else:
        first, last = today - timedelta(days=query.days - 1), today
    if first > today:
        raise ValueError("from: that day has not begun yet")
    if (last - first).days + 1 > MAX_DAYS:
        raise ValueError(f"the period is longer than {MAX_DAYS} days")
    days = []
    day = first
    while day <= last:
        start, end = midnight(day, tz), min(midnight(day + timedelta(days=1), tz), now)
        days.append((day, start, end))
        day += timedelta(days=1)
    return days


# ---------------------------------------------------------------- the usage view: what it shows


@dataclass(frozen=True)
class DayUsage:
    """What one day added up (seconds): per person (GPU-seconds, held-idle GPU-seconds) and the
    fleet's GPUs (in use, held idle, known, unknown)."""

    day: date
    start: float
    end: float
    people: Mapping[str, tuple[float, float]]
    used_s: float = 0.0
    idle_s: float = 0.0
    known_s: float = 0.0
    down_s: float = 0.0


@dataclass(frozen=True)
class Segment:
    """A piece of a day's stacked bar, in a viewBox 100 wide."""

    x: float
    width: float
    colour: str  # css class: p0..p7, or po for everyone else
    idle: bool  # the held-idle part of a person's piece
    title: str


@dataclass(frozen=True)
class PersonUsageView:
    name: str
    gpu_hours: str
    idle_hours: str
    idle_percent: str
    colour: str
    bar: float  # 0..100: GPU-hours against the period's top person
    idle_bar: float  # 0..100: the held-idle part


@dataclass(frozen=True)
class DayView:
    day: str  # 2026-12-07
    label: str  # Mon 7 Dec
    total: str  # "12.5 GPU-hours"
    idle: str  # "1.0 held idle", or ""
    unknown: str  # "3.0 unknown (hosts down)", or ""
    segments: tuple[Segment, ...]
    top: str  # "alice 8.0, bob 4.5, +2"
    today: bool = False


@dataclass(frozen=True)
class UsageView:
    title: str  # "Last 7 days" or "1 Dec 2026 to 7 Dec 2026"
    period: str  # "2026-12-01 00:00 to 2026-12-07 14:05"
    fleet: str  # fleet totals in words
    people: tuple[PersonUsageView, ...]
    days: tuple[DayView, ...]
    legend: tuple[tuple[str, str], ...]  # (name, css class)
    choices: tuple[tuple[str, str, bool], ...]  # (label, url query, chosen)
    query: UsageQuery
    first: str  # the period's first and last day, for the date inputs
    last: str
    note: str = ""  # "no history yet", history off, unreadable


def _hours(seconds: float) -> str:
    hours = seconds / 3600.0
    return f"{hours:.1f}" if hours >= 0.05 or hours == 0 else "<0.1"


def _colours(totals: Mapping[str, float]) -> dict[str, str]:
    ranked = sorted(totals, key=lambda n: (-totals[n], n))
    return {name: f"p{i}" if i < PALETTE else "po" for i, name in enumerate(ranked)}


def _day_view(day: DayUsage, colours: Mapping[str, str], scale_s: float, today: date) -> DayView:
    segments: list[Segment] = []
    x = 0.0
    order = sorted(day.people, key=lambda n: (colours.get(n, "po") == "po", colours.get(n, ""), n))
    for name in order:
        gpu_s, idle_s = day.people[name]
        if gpu_s <= 0:
            continue
        words = f"{name}: {_hours(gpu_s)} GPU-hours" + (f", {_hours(idle_s)} held idle" if idle_s > 0 else "")
        busy = 100 * (gpu_s - idle_s) / scale_s
        idle = 100 * idle_s / scale_s
        for width, is_idle in ((busy, False), (idle, True)):
            if width > 0:
                segments.append(Segment(round(x, 2), round(width, 2), colours.get(name, "po"), is_idle, words))
                x += width
    ranked = sorted(day.people.items(), key=lambda kv: (-kv[1][0], kv[0]))
    shown = [f"{n} {_hours(s)}" for n, (s, _) in ranked[:3] if s > 0]
    more = sum(1 for _, (s, _) in ranked[3:] if s > 0)
    person_s = sum(s for s, _ in day.people.values())
    person_idle = sum(i for _, i in day.people.values())
    return DayView(
        day=day.day.isoformat(),
        label=f"{day.day:%a} {day.day.day} {day.day:%b}",
        total=f"{_hours(person_s)} GPU-hours" if day.known_s + day.down_s > 0 or person_s > 0 else "no data",
        idle=f"{_hours(person_idle)} held idle" if person_idle > 0 else "",
        unknown=f"{_hours(day.down_s)} unknown (hosts down)" if day.down_s > 0 else "",
        segments=tuple(segments),
        top=", ".join(shown) + (f", +{more}" if more else ""),
        today=day.day == today,
    )


def usage_view(
    query: UsageQuery,
    days: Sequence[DayUsage],
    now: float,
    *,
    has_history: bool = True,
    note: str = "",
    tz: tzinfo | None = None,
) -> UsageView:
    """The usage view of ``days`` (oldest first): people by GPU-hours over the period, then each
    day's stacked bar (one colour per person, lighter for their held-idle hours), newest day first.
    ``note``: why there is nothing to show (history off, unreadable); ``has_history`` False: the
    history file does not exist yet."""
    totals: dict[str, float] = {}
    idles: dict[str, float] = {}
    for day in days:
        for name, (gpu_s, idle_s) in day.people.items():
            totals[name] = totals.get(name, 0.0) + gpu_s
            idles[name] = idles.get(name, 0.0) + idle_s
    colours = _colours(totals)
    top = max(totals.values(), default=0.0)
    people = tuple(
        PersonUsageView(
            name=name,
            gpu_hours=_hours(totals[name]),
            idle_hours=_hours(idles[name]),
            idle_percent=f"{100 * idles[name] / totals[name]:.0f} %" if totals[name] > 0 else "",
            colour=colours[name],
            bar=round(100 * totals[name] / top, 2) if top > 0 else 0.0,
            idle_bar=round(100 * idles[name] / top, 2) if top > 0 else 0.0,
        )
        for name in sorted(totals, key=lambda n: (-totals[n], n))
        if totals[name] > 0
    )
    scale = max((sum(s for s, _ in d.people.values()) for d in days), default=0.0) or 1.0
    today = local_date(now, tz)
    day_views = tuple(_day_view(d, colours, scale, today) for d in reversed(days))
    legend = tuple((p.name, p.colour) for p in people if p.colour != "po")
    if any(p.colour == "po" for p in people):
        legend = (*legend, (f"{plural(sum(p.colour == 'po' for p in people), 'other person')}", "po"))
    first, last = (days[0].day, days[-1].day) if days else (today, today)
    if query.first is not None:
        title = f"{_long(first)} to {_long(last)}"
    else:
        title = "Today" if query.days == 1 else f"Last {query.days} days"
    period = ""
    if days:
        period = f"{_clock(days[0].start, tz)} to {_clock(days[-1].end, tz)}"
    choices = tuple(
        (f"{n} days", UsageQuery(days=n).url_query(), query.first is None and query.days == n) for n in USAGE_DAYS
    )
    return UsageView(
        title=title,
        period=period,
        fleet=_fleet_words(days),
        people=people,
        days=day_views,
        legend=legend,
        choices=choices,
        query=query,
        first=first.isoformat(),
        last=last.isoformat(),
        note=note or _empty_note(has_history, bool(people)),
    )


def daily_document(days: Sequence[DayUsage]) -> dict[str, object]:
    """``/api/v1/usage/daily``: per day (local dates) each person's GPU-hours and held-idle
    GPU-hours, most first, and the fleet's; times ISO 8601 as in every JSON gpuwatch prints."""
    return {
        "from": iso_time(days[0].start) if days else None,
        "to": iso_time(days[-1].end) if days else None,
        "days": [
            {
                "day": d.day.isoformat(),
                "from": iso_time(d.start),
                "to": iso_time(d.end),
                "people": [
                    {"user": name, "gpu_hours": round(s / 3600, 6), "held_idle_gpu_hours": round(i / 3600, 6)}
                    for name, (s, i) in sorted(d.people.items(), key=lambda kv: (-kv[1][0], kv[0]))
                ],
                "fleet": {
                    "gpu_hours": round(d.used_s / 3600, 6),
                    "held_idle_gpu_hours": round(d.idle_s / 3600, 6),
                    "known_gpu_hours": round(d.known_s / 3600, 6),
                    "unknown_gpu_hours": round(d.down_s / 3600, 6),
                },
            }
            for d in days
        ],
    }


def _fleet_words(days: Sequence[DayUsage]) -> str:
    """The fleet's totals over the days in words ("" when its hosts were never polled then)."""
    used, known, down = (sum(getattr(d, name) for d in days) for name in ("used_s", "known_s", "down_s"))
    if known + down <= 0:
        return ""
    share = f" ({100 * used / known:.0f} %)" if known > 0 else ""
    idle = _hours(sum(d.idle_s for d in days))
    return (
        f"The fleet's GPUs: {_hours(used)} GPU-hours in use of {_hours(known)} known{share}, {idle} held idle, "
        f"{_hours(down)} unknown (hosts down)."
    )


def _empty_note(has_history: bool, used: bool) -> str:
    if not has_history:
        return f"{NO_HISTORY[0].upper()}{NO_HISTORY[1:]}: the daemon writes it as it polls."
    return "" if used else "Nobody had a process on a GPU in this period."


def _long(day: date) -> str:
    return f"{day.day} {day:%b %Y}"


def _clock(t: float, tz: tzinfo | None) -> str:
    return datetime.fromtimestamp(t, tz).strftime("%Y-%m-%d %H:%M")
