"""When a scheduled report is due, from when it was last made: for a ``--once`` run (cron) and
for the daemon alike (it asks every second).

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

A report never made before is due. Pure: the time and the time zone are parameters.
"""

from __future__ import annotations

from datetime import datetime, timedelta, tzinfo

from .config import ReportSchedule


def _local(now: float, tz: tzinfo | None) -> datetime:
    return datetime.fromtimestamp(now, tz) if tz is not None else datetime.fromtimestamp(now).astimezone()


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
