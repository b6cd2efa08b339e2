"""When a scheduled report is due for a ``--once`` run: periods follow the clock, not the runs."""

from __future__ import annotations

import zoneinfo
from datetime import datetime, timedelta, timezone

import pytest

from gpuwatch.config import ReportSchedule
from gpuwatch.timetable import is_due, next_due, period_start

CST = timezone(timedelta(hours=8))
HOURLY = ReportSchedule(report="overview", every=3600.0)
HALF_HOURLY = ReportSchedule(report="free", every=1800.0)
DAILY_9 = ReportSchedule(report="user", user="alice", at="09:00")


def t(text: str) -> float:
    """``"2026-11-22 10:00:03"`` in CST (UTC+8) as Unix time."""
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=CST).timestamp()


@pytest.mark.parametrize(
    ("last", "now", "due"),
    [
        (None, "2026-11-22 10:20:00", True),  # never made
        ("2026-11-22 10:00:03", "2026-11-22 10:20:00", False),  # an hourly cron's run 20 minutes later
        ("2026-11-22 10:00:03", "2026-11-22 11:00:01", True),  # cron started 2 s earlier than last time
        ("2026-11-22 10:59:59", "2026-11-22 11:00:00", True),  # a new clock hour
        ("2026-11-22 10:00:03", "2026-11-22 10:55:00", False),  # cron every 5 min: no drift to 55 min
        ("2026-11-22 12:00:00", "2026-11-22 11:00:00", True),  # the clock was set back
    ],
)
def test_every_hour_is_due_in_the_first_run_of_each_clock_hour(last: str | None, now: str, due: bool) -> None:
    assert is_due(HOURLY, t(last) if last else None, t(now), CST) is due


def test_every_half_hour_and_every_day_follow_the_local_clock() -> None:
    assert period_start(HALF_HOURLY, t("2026-11-22 10:47:10"), CST) == t("2026-11-22 10:30:00")
    daily = ReportSchedule(report="overview", every=86400.0)
    assert period_start(daily, t("2026-11-22 07:00:00"), CST) == t("2026-11-22 00:00:00")  # local midnight


@pytest.mark.parametrize(
    ("last", "now", "due"),
    [
        ("2026-11-21 09:00:02", "2026-11-22 08:00:00", False),  # before today's 09:00
        ("2026-11-21 09:00:02", "2026-11-22 09:00:01", True),
        ("2026-11-22 09:00:01", "2026-11-22 10:00:00", False),  # sent today already
        ("2026-11-20 09:00:00", "2026-11-22 14:00:00", True),  # the machine was off at 09:00: catch up
        ("2026-11-22 08:30:00", "2026-11-22 09:00:02", True),  # forced at 08:30: still due at 09:00
    ],
)
def test_daily_at_is_due_in_the_first_run_at_or_after_that_time(last: str, now: str, due: bool) -> None:
    assert is_due(DAILY_9, t(last), t(now), CST) is due


WEEKLY_MON_9 = ReportSchedule(report="usage", at="09:00", on=0)


@pytest.mark.parametrize(
    ("last", "now", "due"),
    [
        ("2026-11-23 09:00:02", "2026-11-29 23:00:00", False),  # Monday's, seen on Sunday night
        ("2026-11-23 09:00:02", "2026-11-30 08:59:00", False),  # next Monday, before 09:00
        ("2026-11-23 09:00:02", "2026-11-30 09:00:01", True),  # next Monday at 09:00
        ("2026-11-30 09:00:01", "2026-12-01 09:00:00", False),  # Tuesday: sent this week already
        ("2026-11-16 09:00:00", "2026-11-25 14:00:00", True),  # off on Monday: caught up on Wednesday
    ],
)
def test_weekly_on_a_day_at_a_time_is_due_once_a_week_from_that_day(last: str, now: str, due: bool) -> None:
    assert is_due(WEEKLY_MON_9, t(last), t(now), CST) is due


def test_a_weekly_period_starts_on_its_day_at_its_time() -> None:
    # 2026-11-25 is a Wednesday: the week began on Monday the 23rd at 09:00
    assert period_start(WEEKLY_MON_9, t("2026-11-25 14:00:00"), CST) == t("2026-11-23 09:00:00")
    assert period_start(WEEKLY_MON_9, t("2026-11-23 08:00:00"), CST) == t("2026-11-16 09:00:00")
    assert WEEKLY_MON_9.describe() == "usage weekly on Monday at 09:00"


# ---------------------------------------------------------------------- next_due: when the daemon looks again

WEEKLY_FRI_1730 = ReportSchedule(report="usage", at="17:30", on=4)
EVERY_90M = ReportSchedule(report="free", every=5400.0)


@pytest.mark.parametrize(
    ("spec", "last", "now", "due_at"),
    [
        (HOURLY, None, "2026-11-22 10:20:00", "2026-11-22 10:20:00"),  # never made: now
        (HOURLY, "2026-11-22 10:00:03", "2026-11-22 10:20:00", "2026-11-22 11:00:00"),
        (HOURLY, "2026-11-22 09:10:00", "2026-11-22 10:20:00", "2026-11-22 10:20:00"),  # missed this hour: now
        (HOURLY, "2026-11-22 12:00:00", "2026-11-22 11:00:00", "2026-11-22 11:00:00"),  # the clock was set back
        (HALF_HOURLY, "2026-11-22 10:30:00", "2026-11-22 10:47:10", "2026-11-22 11:00:00"),
        (EVERY_90M, "2026-11-22 10:30:00", "2026-11-22 10:31:00", "2026-11-22 12:00:00"),  # from 1970-01-01 00:00
        (DAILY_9, "2026-11-22 09:00:01", "2026-11-22 10:00:00", "2026-11-23 09:00:00"),
        (DAILY_9, "2026-11-21 09:00:02", "2026-11-22 08:00:00", "2026-11-22 09:00:00"),  # before today's 09:00
        (DAILY_9, "2026-11-21 09:00:02", "2026-11-22 09:30:00", "2026-11-22 09:30:00"),  # due since 09:00
        (WEEKLY_MON_9, "2026-11-23 09:00:02", "2026-11-25 14:00:00", "2026-11-30 09:00:00"),  # Wednesday
        (WEEKLY_MON_9, "2026-11-23 09:00:02", "2026-11-30 08:59:00", "2026-11-30 09:00:00"),  # Monday, before 09:00
        (WEEKLY_MON_9, "2026-11-23 09:00:02", "2026-11-23 10:00:00", "2026-11-30 09:00:00"),  # Monday, sent
        (WEEKLY_FRI_1730, "2026-11-20 17:30:00", "2026-11-27 17:29:59", "2026-11-27 17:30:00"),
        (WEEKLY_FRI_1730, "2026-11-20 17:30:00", "2026-11-22 12:00:00", "2026-11-27 17:30:00"),  # Sunday
    ],
)
def test_next_due_is_now_when_due_else_the_start_of_the_next_period(
    spec: ReportSchedule, last: str | None, now: str, due_at: str
) -> None:
    assert next_due(spec, t(last) if last else None, t(now), CST) == t(due_at)


@pytest.mark.parametrize("spec", [HOURLY, HALF_HOURLY, EVERY_90M, DAILY_9, WEEKLY_MON_9, WEEKLY_FRI_1730])
def test_next_due_agrees_with_is_due_second_by_second_around_it(spec: ReportSchedule) -> None:
    """Made at some time: not due a second before next_due says, due at it (a zone without summer time)."""
    for made in ("2026-11-22 10:00:03", "2026-11-23 09:00:00", "2026-11-27 17:45:00", "2026-11-29 23:59:59"):
        last = t(made)
        due_at = next_due(spec, last, last, CST)
        assert due_at > last
        assert not is_due(spec, last, due_at - 1, CST)
        assert is_due(spec, last, due_at, CST)
        assert next_due(spec, last, due_at - 1, CST) == due_at  # asked again later: the same answer


def test_next_due_where_the_clocks_change_is_never_late() -> None:
    """Europe/Berlin: clocks forward on 2026-03-29 02:00, back on 2026-10-25 03:00. The answer is
    never after the first minute :func:`is_due` says yes, and asking again at each answer reaches it."""
    berlin = zoneinfo.ZoneInfo("Europe/Berlin")

    def at(text: str) -> float:
        return datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=berlin).timestamp()

    daily = ReportSchedule(report="overview", every=86400.0)
    for spec, made in [
        (daily, "2026-03-28 12:00:00"),
        (daily, "2026-03-29 00:30:00"),  # a day of 23 hours
        (daily, "2026-10-25 00:30:00"),  # a day of 25 hours
        (DAILY_9, "2026-03-28 09:00:00"),
        (DAILY_9, "2026-10-24 09:00:00"),
        (HOURLY, "2026-03-29 01:30:00"),
        (HOURLY, "2026-10-25 02:30:00"),
        (ReportSchedule(report="free", every=5400.0), "2026-10-25 01:00:00"),
    ]:
        last = at(made)
        real = next(m for m in range(int(last), int(last) + 2 * 86400, 60) if is_due(spec, last, m, berlin))
        now, asked = last, 0
        while not is_due(spec, last, now, berlin):
            answer = next_due(spec, last, now, berlin)
            assert now < answer <= real, (spec, made, asked)
            now, asked = answer, asked + 1
        assert now == real and asked <= 3, (spec, made)
