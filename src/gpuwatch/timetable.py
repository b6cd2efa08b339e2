"""When a scheduled report is due, from when it was last made: for a ``--once`` run (cron) and
for the daemon alike (it asks when :func:`next_due` says).

The question is: has the report's period begun since the last one was made? Periods follow the
clock (local time), not the run that happened to send the last one, so the few seconds cron's
start wanders from run to run never skip or double a report, and a daemon sends at the same
times as cron would:

* ``every: 1h``: due in the first run of each clock hour (``30m``: of each half hour; ``1d``: of
  each day after midnight). A length that does not divide a day is counted from 1970-01-01 00:00
  local time.
* ``at: "09:00"``: due in the first run at or after 09:00 each day; a run that missed 09:00 (the
  machine was off) sends it at the next run, as anacron would. With ``day: monday``: the same, each
  Monday.

A report never made before is due. The daemon does not ask every second: :func:`next_due` says
when a report made at a given time falls due again, and it sleeps until then. Pure: the time and
the time zone are parameters.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta, tzinfo

from .config import ReportSchedule


def _local(now: float, tz: tzinfo | None) -> datetime:
    return datetime.fromtimestamp(now, tz) if tz is not None else datetime.fromtimestamp(now).astimezone()


def _offset(at: float, tz: tzinfo | None) -> float:
    return (_local(at, tz).utcoffset() or timedelta(0)).total_seconds()


def period_start(spec: ReportSchedule, now: float, tz: tzinfo | None = None) -> float:
    """The start (Unix time) of ``spec``'s period that holds ``now``: a report made before it is
    due again. ``tz``: the time zone of the schedule (default: this machine's)."""
    local = _local(now, tz)
    if spec.every:
        offset = local.utcoffset() or timedelta(0)
        wall = now + offset.total_seconds()  # seconds since 1970-01-01 00:00 local time
        return now - wall % spec.every
    hour, minute = (int(part) for part in (spec.at or "09:00").split(":"))
    start = local.replace(hour=hour, minute=minute, second=0, microsecond=0)
    if spec.on is not None:  # weekly: back to the last such weekday at that time
        start -= timedelta(days=(local.weekday() - spec.on) % 7)
    if start > local:
        start -= timedelta(days=1 if spec.on is None else 7)
    return start.timestamp()


def is_due(spec: ReportSchedule, last: float | None, now: float, tz: tzinfo | None = None) -> bool:
    """Whether a run (``--once``, or the daemon) at ``now`` should make ``spec``'s report, last
    made at ``last`` (None: never). A last time in the future (the clock was set back) does not hold it back."""
    if last is None or last > now:
        return True
    return last < period_start(spec, now, tz)


def next_start(spec: ReportSchedule, now: float, tz: tzinfo | None = None) -> float:
    """The start (Unix time) of ``spec``'s period after the one that holds ``now``; but where the
    UTC offset changes before then (summer time), the moment it changes: asked again then, with
    the new offset, it gives the start (so the answer is never after :func:`is_due` turns true)."""
    if spec.every:
        start = period_start(spec, now, tz) + spec.every
    else:
        local = datetime.fromtimestamp(now, tz)  # naive without tz: its timestamp() finds that day's offset
        hour, minute = (int(part) for part in (spec.at or "09:00").split(":"))
        day = local.replace(hour=hour, minute=minute, second=0, microsecond=0)
        if spec.on is not None:  # weekly: on to the next such weekday
            day += timedelta(days=(spec.on - local.weekday()) % 7)
        while day <= local:
            day += timedelta(days=1 if spec.on is None else 7)
        start = day.timestamp()
    if _offset(start, tz) != _offset(now, tz):
        return _offset_change(now, start, tz)
    return start


def _offset_change(before: float, after: float, tz: tzinfo | None) -> float:
    """The first whole second after ``before`` whose UTC offset is not ``before``'s (one is by ``after``)."""
    offset, low, high = _offset(before, tz), math.floor(before), math.ceil(after)
    while high - low > 1:
        middle = (low + high) // 2
        if _offset(middle, tz) == offset:
            low = middle
        else:
            high = middle
    return float(high)


def next_due(spec: ReportSchedule, last: float | None, now: float, tz: tzinfo | None = None) -> float:
    """When (Unix time) ``spec``'s report, last made at ``last`` (None: never), is due: ``now`` when
    :func:`is_due` says it is already, else the start of the next period (:func:`next_start`)."""
    if is_due(spec, last, now, tz):
        return now
    return next_start(spec, now, tz)
