"""When a scheduled report is due for a ``--once`` run: periods follow the clock, not the runs."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from gpuwatch.config import ReportSchedule
from gpuwatch.timetable import is_due, period_start

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
