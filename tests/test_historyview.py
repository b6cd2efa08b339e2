"""The page's views of the usage history (historyview.py, pure): the sparkline's SVG paths for known
series, gaps and unknown time; the usage view's period, people, days and stacked bars. And the
slot sums they are drawn from (store/historyseries.py, pagehistory.py) over the recorded two-hour
timeline of tests/timeline.py, with an explicit clock."""

from __future__ import annotations

import re
from datetime import date, timezone
from pathlib import Path

import pytest

from gpuwatch.historyview import (
    SPARK_HEIGHT,
    DayUsage,
    UsageQuery,
    daily_document,
    spark_window,
    sparkline,
    step_paths,
    usage_days,
    usage_view,
)
from gpuwatch.pagehistory import Sparklines
from gpuwatch.store.historyseries import SeriesReader
from gpuwatch.usage import GpuTally
from timeline import DAY, HOUR, T0, Clock, two_hours

UTC = timezone.utc


def tally(util: float | None, mem: float | None, known: float = 900, down: float = 0) -> GpuTally:
    """A slot's sums with these means over ``known`` seconds."""
    return GpuTally(
        known_s=known,
        down_s=down,
        util_s=known if util is not None else 0,
        util_sum=(util or 0) * known,
        mem_s=known if mem is not None else 0,
        mem_sum=(mem or 0) * known,
    )


def points(path: str) -> list[tuple[int, int]]:
    """The (x, y) corners of a step path: M x y, then H x / V y."""
    out: list[tuple[int, int]] = []
    x = y = 0
    for cmd, args in re.findall(r"([MHVZ])([^MHVZ]*)", path):
        if cmd == "M":
            x, y = (int(v) for v in args.split())
        elif cmd == "H":
            x = int(args)
        elif cmd == "V":
            y = int(args)
        else:
            continue
        out.append((x, y))
    return out


# ---------------------------------------------------------------- sparklines (pure)


def test_a_series_of_percents_is_a_step_line_and_its_area_with_gaps_for_no_value() -> None:
    line, area = step_paths([None, 50, 50, 100, None, 0], height=24)
    assert line == "M1 12H3V0H4M5 24H6"  # 50 % -> half way up; a flat run is one H; None breaks the line
    assert area == "M1 24V12H3V0H4V24ZM5 24V24H6V24Z"
    assert step_paths([None, None]) == ("", "")
    assert step_paths([150, -5], height=10)[0] == "M0 0H1V10H2"  # clamped to 0..100 %
    assert points(line) == [(1, 12), (3, 12), (3, 0), (4, 0), (5, 24), (6, 24)]


def test_the_sparkline_places_each_slot_by_its_time_and_says_unknown_time_apart() -> None:
    start = 1_000_800.0  # a multiple of 900
    slots = {
        start: tally(25, 40_000),
        start + 900: tally(25, 40_000),
        start + 1800: tally(75, 80_000),
        start + 3600: tally(None, None, known=0, down=900),  # the host did not answer
        start + 4500: tally(None, 20_000),  # MIG: no utilization, memory known
        start + 5400: tally(10, 20_000, known=300, down=600),  # mostly silent: a band over its values
        start - 900: tally(100, 0),  # before the window: left out
        start + 8 * 900: tally(100, 0),  # after it
    }
    s = sparkline(slots, start, 80_000, count=8)
    assert points(s.util_line)[:4] == [(0, 18), (2, 18), (2, 6), (3, 6)]  # slot 3: no sample, a gap
    assert points(s.mem_line) == [(0, 12), (2, 12), (2, 0), (3, 0), (5, 18), (7, 18)]
    assert s.unknown == ((4, 1), (6, 1))
    assert points(s.util_line)[-2:] == [(6, 22), (7, 22)]
    assert s.label == (
        "last 24 h: utilization mean 34 %, peak 75 %; memory mean 50 %, peak 100 %; 25m unknown (host did not answer)"
    )
    assert not s.empty and (s.width, s.height) == (8, SPARK_HEIGHT)
    # memory without the GPU's size: no memory line, utilization still drawn
    assert sparkline(slots, start, None, count=8).mem_line == ""
    nothing = sparkline({}, start, 80_000, count=8)
    assert nothing.empty and nothing.label == "last 24 h: no history yet" and nothing.util_line == ""
    down_only = sparkline({start: tally(None, None, known=0, down=900)}, start, 80_000, count=8)
    assert not down_only.empty and down_only.unknown == ((0, 1),)


def test_the_sparkline_window_is_96_quarter_hours_ending_with_the_one_that_holds_now() -> None:
    start, end = spark_window(T0 + 3 * 900 + 10)
    assert end == T0 + 4 * 900 and end - start == DAY


# ---------------------------------------------------------------- from the history file


def test_slot_sums_of_a_recorded_timeline_draw_the_known_series(tmp_path: Path) -> None:
    """Two hours of gpu-a (tests/timeline.py): GPU 0 at 50 % with alice's 20000 MiB; GPU 1 at 2 %
    then 80 % with 4000 MiB; the host silent for polls 30-44, exactly the third quarter-hour."""
    writer, _ = two_hours(tmp_path)
    writer.stop()
    reader = SeriesReader(tmp_path)
    slots = reader.slots(T0, T0 + 2 * HOUR, 900)
    assert set(slots) == {("gpu-a", 0), ("gpu-a", 1)}
    assert sorted(slots["gpu-a", 0]) == [T0 + 900 * k for k in range(8)]
    assert slots["gpu-a", 0][T0 + 1800].down_s == 900 and slots["gpu-a", 0][T0 + 1800].known_s == 0
    gpu0 = sparkline(slots["gpu-a", 0], T0, 81559, count=8)
    assert points(gpu0.util_line) == [(0, 12), (2, 12), (3, 12), (8, 12)]  # a gap where it was unknown
    assert gpu0.unknown == ((2, 1),)
    y = round(24 - 24 * 20000 / 81559)
    assert points(gpu0.mem_line) == [(0, y), (2, y), (3, y), (8, y)]
    gpu1 = sparkline(slots["gpu-a", 1], T0, 81559, count=8)
    assert points(gpu1.util_line) == [(0, 24), (2, 24), (3, 24), (4, 24), (4, 5), (8, 5)]  # 2 %, then 80 %
    # the same slots whether read from the roll-ups or the raw polls after them
    assert reader.rolled_until() is not None and reader.rolled_until() < T0 + 2 * HOUR  # the last minutes: raw
    for (host, index), sums in slots.items():
        for t, s in sums.items():
            alone = reader.slots(t, t + 900, 900)[host, index][t]
            assert (alone.known_s, alone.down_s) == (s.known_s, s.down_s)
            assert alone.utilization_percent == pytest.approx(s.utilization_percent)
    reader.close()


def test_no_history_file_reads_as_no_sparklines_and_says_so(tmp_path: Path) -> None:
    reader = SeriesReader(tmp_path)
    assert reader.slots(T0, T0 + HOUR, 900) == {} and reader.rolled_until() is None
    sparks = Sparklines(reader, clock=Clock(T0)).get()
    assert sparks.lines == {} and sparks.note == "no history yet" and sparks.enabled
    assert not (tmp_path / "history.sqlite3").exists()  # reading made no file


def test_the_kept_sparklines_equal_a_fresh_read_and_are_read_again_only_after_a_minute(tmp_path: Path) -> None:
    writer, clock = two_hours(tmp_path)
    writer.stop()
    at = Clock(T0 + HOUR + 60)
    kept = Sparklines(SeriesReader(tmp_path), clock=at)
    first = kept.get()
    assert first.get("gpu-a", 0) is not None and first.note == ""
    at.now += 30
    assert kept.get() is first  # within the minute: not read again
    at.now = clock.now + 60
    later = kept.get()
    fresh = Sparklines(SeriesReader(tmp_path), clock=Clock(at.now)).get()
    assert later is not first and later.version != first.version
    assert later.lines == fresh.lines


# ---------------------------------------------------------------- the usage view (pure)


def test_the_usage_period_comes_from_the_url_and_says_what_is_wrong() -> None:
    assert UsageQuery.parse("") == UsageQuery(days=7)
    assert UsageQuery.parse("days=30") == UsageQuery(days=30)
    assert UsageQuery.parse("from=2026-12-01&to=2026-12-03") == UsageQuery(0, date(2026, 12, 1), date(2026, 12, 3))
    assert UsageQuery.parse("from=2026-12-01").url_query() == "?from=2026-12-01"
    assert UsageQuery.parse("days=30").url_query() == "?days=30" and UsageQuery().url_query() == ""
    for bad, words in (
        ("days=0", "days: a whole number"),
        ("days=x", "days: a whole number"),
        ("days=401", "from 1 to 400"),
        ("to=2026-12-01", "to: goes with from"),
        ("from=2026-12-05&to=2026-12-01", "to: is before from"),
        ("from=2026-13-01", "is not a date like"),
        ("from=<script>", "is not a date like"),
    ):
        with pytest.raises(ValueError, match=words):
            UsageQuery.parse(bad)


def test_the_usage_days_are_whole_local_days_the_last_one_ending_now() -> None:
    now = T0 + 14 * HOUR  # 2026-12-07 14:00 UTC
    days = usage_days(UsageQuery(days=3), now, UTC)
    assert [d for d, _, _ in days] == [date(2026, 12, 5), date(2026, 12, 6), date(2026, 12, 7)]
    assert days[0][1] == T0 - 2 * DAY and days[-1][1:] == (T0, now)
    custom = usage_days(UsageQuery(0, date(2026, 12, 1), date(2026, 12, 30)), now, UTC)
    assert len(custom) == 7 and custom[-1][2] == now  # not past today
    with pytest.raises(ValueError, match="has not begun"):
        usage_days(UsageQuery(0, date(2026, 12, 8), None), now, UTC)


def test_the_usage_view_ranks_people_and_stacks_each_day_with_held_idle_lighter() -> None:
    now = T0 + 14 * HOUR
    hostile = '<script>alert("x")</script>'
    days = [
        DayUsage(date(2026, 12, 6), T0 - DAY, T0, {"alice": (36000, 0), hostile: (7200, 3600)}, 43200, 3600, 86400),
        DayUsage(date(2026, 12, 7), T0, now, {"alice": (3600, 1800), "bob": (10800, 0)}, 14400, 1800, 50400, 3600),
    ]
    view = usage_view(UsageQuery(days=2), days, now, tz=UTC)
    assert view.title == "Last 2 days" and view.period == "2026-12-06 00:00 to 2026-12-07 14:00"
    assert [(p.name, p.gpu_hours, p.idle_hours, p.idle_percent) for p in view.people] == [
        ("alice", "11.0", "0.5", "5 %"),
        ("bob", "3.0", "0.0", "0 %"),
        (hostile, "2.0", "1.0", "50 %"),  # a name is data: escaping it is the template's work
    ]
    assert [p.colour for p in view.people] == ["p0", "p1", "p2"] and view.people[0].bar == 100
    assert view.legend == (("alice", "p0"), ("bob", "p1"), (hostile, "p2"))
    today, yesterday = view.days  # newest first
    assert (today.day, today.label, today.today) == ("2026-12-07", "Mon 7 Dec", True)
    assert (
        today.total == "4.0 GPU-hours" and today.idle == "0.5 held idle" and today.unknown == "1.0 unknown (hosts down)"
    )
    assert today.top == "bob 3.0, alice 1.0"
    # yesterday is the longest day: its bar is full width; alice's 10 h, then the hostile name's 1 h busy, 1 h idle
    assert [(s.colour, s.idle, s.x, s.width) for s in yesterday.segments] == [
        ("p0", False, 0.0, 83.33),
        ("p2", False, 83.33, 8.33),
        ("p2", True, 91.67, 8.33),
    ]
    assert yesterday.segments[1].title == f"{hostile}: 2.0 GPU-hours, 1.0 held idle"
    assert [(s.colour, s.width) for s in today.segments] == [("p0", 4.17), ("p0", 4.17), ("p1", 25.0)]
    assert view.fleet == (
        "The fleet's GPUs: 16.0 GPU-hours in use of 38.0 known (42 %), 1.5 held idle, 1.0 unknown (hosts down)."
    )
    assert [c for c in view.choices if c[2]] == [("7 days", "", False)] or all(not c[2] for c in view.choices)
    assert view.note == ""


def test_the_usage_view_gives_the_others_one_colour_and_says_why_it_is_empty() -> None:
    now = T0 + HOUR
    people = {f"user{i:02d}": (3600.0 * (20 - i), 0.0) for i in range(12)}
    view = usage_view(UsageQuery(days=1), [DayUsage(date(2026, 12, 7), T0, now, people, 1, 0, 1)], now, tz=UTC)
    assert [p.colour for p in view.people] == [f"p{i}" for i in range(8)] + ["po"] * 4
    assert view.legend[-1] == ("4 other persons", "po") and view.title == "Today"
    empty_day = [DayUsage(date(2026, 12, 7), T0, now, {})]
    assert usage_view(UsageQuery(days=1), empty_day, now, has_history=False, tz=UTC).note == (
        "No history yet: the daemon writes it as it polls."
    )
    quiet = usage_view(UsageQuery(days=1), empty_day, now, tz=UTC)
    assert quiet.note == "Nobody had a process on a GPU in this period." and quiet.days[0].total == "no data"
    off = usage_view(UsageQuery(days=1), [], now, note="The usage history is off.", tz=UTC)
    assert off.note == "The usage history is off." and off.people == () and off.fleet == ""
    custom = usage_view(UsageQuery(0, date(2026, 12, 1), None), empty_day, now, tz=UTC)
    assert custom.title == "7 Dec 2026 to 7 Dec 2026" and not any(chosen for _, _, chosen in custom.choices)


def test_the_daily_document_holds_each_day_with_its_people_in_hours() -> None:
    days = [DayUsage(date(2026, 12, 7), T0, T0 + HOUR, {"bob": (900, 0), "alice": (1800, 900)}, 2700, 900, 3600)]
    doc = daily_document(days)
    assert doc["from"] == "2026-12-07T00:00:00+00:00" and doc["to"] == "2026-12-07T01:00:00+00:00"
    (day,) = doc["days"]  # type: ignore[misc]
    assert day["day"] == "2026-12-07"
    assert day["people"] == [
        {"user": "alice", "gpu_hours": 0.5, "held_idle_gpu_hours": 0.25},
        {"user": "bob", "gpu_hours": 0.25, "held_idle_gpu_hours": 0.0},
    ]
    assert day["fleet"] == {
        "gpu_hours": 0.75,
        "held_idle_gpu_hours": 0.25,
        "known_gpu_hours": 1.0,
        "unknown_gpu_hours": 0.0,
    }
    assert daily_document([]) == {"from": None, "to": None, "days": []}
