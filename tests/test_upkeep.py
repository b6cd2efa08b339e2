"""The daemon's idle upkeep: with nothing to poll and nothing to send, nothing is read, nothing
ticks. Shown with injected clocks and counted calls, not timings (bench/upkeep.py measures it)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import schedule

from builders import Recorder
from gpuwatch.config import Config
from gpuwatch.config.load import parse_config
from gpuwatch.daemon import CLOCK_RECHECK_SECONDS, Daemon
from gpuwatch.notify.alertmanager import AlertmanagerChannel, AlertmanagerSettings, Resender
from gpuwatch.notify.spec import Transport
from gpuwatch.store import Outbox, ReportRuns, open_db
from gpuwatch.store.history import HOUR, connect, history_path
from gpuwatch.store.historywriter import HistoryWriter
from timeline import SETTINGS, T0, Clock, answered, proc
from waiting import wait_for

# ---------------------------------------------------------------------- reports


class CountedRuns(ReportRuns):
    """The ``report_runs`` table, counting its reads."""

    reads = 0

    def last(self) -> dict[str, float]:
        self.reads += 1
        return super().last()


def daemon_with(reports: list[dict[str, str]], clock: Clock, state: Path) -> tuple[Daemon, Recorder, CountedRuns]:
    doc = {
        "hosts": [{"name": "gpu-a", "address": "127.0.0.250"}],
        "state_dir": str(state),
        "schedule": {"poll_every": "1h", "reports": reports},
    }
    config: Config = parse_config(doc)
    outbox = Outbox(open_db(state))
    channel = Recorder()
    daemon = Daemon(config, None, outbox, {"feishu": channel}, clock=clock)  # type: ignore[arg-type]
    runs = CountedRuns(outbox.db)
    daemon.report_runs = runs
    return daemon, channel, runs


def test_without_reports_the_timetable_is_never_read_and_the_loop_sleeps_the_longest(tmp_path: Path) -> None:
    clock = Clock(T0)
    daemon, channel, runs = daemon_with([], clock, tmp_path)
    scheduler = daemon.build_scheduler()
    assert [job.job_func.func for job in scheduler.jobs] == [daemon.deliver]  # type: ignore[union-attr]
    for step in range(100):
        clock.now = T0 + step * 3600
        daemon.report_tick()
    assert runs.reads == 0 and channel.titles == []
    assert daemon.report_wait(clock.now) is None
    assert daemon.sleep_seconds(scheduler) == CLOCK_RECHECK_SECONDS  # the next deliver is an hour away
    daemon.outbox.db.close()


def test_report_runs_is_read_at_the_first_look_and_after_a_report_and_not_in_between(tmp_path: Path) -> None:
    clock = Clock(T0 + 20 * 60)  # 00:20 UTC; every 1h follows the clock's hours (T0 is a whole hour)
    daemon, channel, runs = daemon_with([{"report": "overview", "every": "1h"}], clock, tmp_path)
    daemon.report_tick()
    assert runs.reads == 0 and channel.titles == []  # not looked at before the first look (a job, 1 s in)
    daemon._first_report_look()
    assert len(channel.titles) == 1 and runs.reads == 2  # read, made, read back
    assert daemon.report_wait(clock.now) == 40 * 60
    for minutes in (21, 30, 59):
        clock.now = T0 + minutes * 60
        daemon.report_tick()
    clock.now = T0 + HOUR - 1
    daemon.report_tick()
    assert len(channel.titles) == 1 and runs.reads == 2  # nothing due: nothing read
    clock.now = T0 + HOUR
    daemon.report_tick()
    assert len(channel.titles) == 2 and runs.reads == 3  # due by what it knew; read back after
    assert daemon.report_wait(clock.now) == HOUR
    clock.now = T0 + 30 * 60  # the wall clock set back: the last report is in the future, so due
    daemon.report_tick()
    assert len(channel.titles) == 3
    assert ReportRuns(daemon.outbox.db).last() == {"overview every 1h": T0 + 30 * 60}
    assert daemon.report_wait(clock.now) == 30 * 60
    daemon.outbox.db.close()


def test_a_report_due_before_the_hosts_answered_waits_for_them_or_one_poll_every(tmp_path: Path) -> None:
    clock = Clock(T0)
    daemon, channel, runs = daemon_with([{"report": "overview", "every": "1h"}], clock, tmp_path)
    daemon._started_at = T0
    daemon._first_report_look()
    assert channel.titles == [] and runs.reads == 0  # gpu-a has not answered yet
    assert daemon.report_wait(T0 + 10) == HOUR - 10  # poll_every 1h; a result wakes the loop before
    clock.now = T0 + HOUR
    daemon.report_tick()
    assert len(channel.titles) == 1
    daemon.outbox.db.close()


def test_the_loop_sleeps_until_the_next_report_or_job_at_most_a_minute(tmp_path: Path) -> None:
    clock = Clock(T0 + HOUR - 10)
    daemon, _, _ = daemon_with([{"report": "overview", "every": "1h"}], clock, tmp_path)
    scheduler = schedule.Scheduler()
    daemon._first_report_look()
    assert daemon.sleep_seconds(scheduler) == 10
    clock.now = T0 + HOUR + 1
    daemon.report_tick()
    assert daemon.sleep_seconds(scheduler) == CLOCK_RECHECK_SECONDS
    scheduler.every(5).seconds.do(lambda: None)
    assert 4 < daemon.sleep_seconds(scheduler) <= 5
    daemon.outbox.db.close()


# ---------------------------------------------------------------------- Alertmanager's re-posts


def alertmanager(resend_every: float = 30) -> AlertmanagerChannel:
    settings = AlertmanagerSettings(urls=("http://127.0.0.1:9",), resend_every_seconds=resend_every)
    return AlertmanagerChannel(settings, Transport(sleep=lambda s: None))


def test_the_resender_waits_for_the_earliest_re_post_and_for_nothing_without_alertmanager() -> None:
    clock = [100.0]
    channels: dict[str, Any] = {"feishu": object()}
    resender = Resender(lambda: channels, lambda name: None, monotonic=lambda: clock[0])
    assert resender.wait_seconds() is None  # no Alertmanager channel: sleep until woken
    channels["alertmanager"] = alertmanager(30)
    assert resender.wait_seconds() == 0.05  # never posted: at once
    resender.tick()  # nothing firing: nothing posted, but the round is done
    clock[0] += 10
    assert resender.wait_seconds() == 20
    channels["second"] = alertmanager(15)
    assert resender.wait_seconds() == 0.05
    resender.tick()
    assert resender.wait_seconds() == 15
    clock[0] += 1000
    assert resender.wait_seconds() == 0.05


def test_without_an_alertmanager_channel_the_resender_thread_looks_once_and_again_only_when_woken() -> None:
    looks = [0]
    channels: dict[str, Any] = {"feishu": object()}

    def read() -> dict[str, Any]:
        looks[0] += 1
        return channels

    resender = Resender(read, lambda name: None, tick_seconds=0.01)  # the old loop: 30 rounds in 0.3 s
    resender.start()
    try:
        wait_for(lambda: looks[0] >= 2, 5, "the first round (a tick and its wait)")
        time.sleep(0.3)
        assert looks[0] == 2
        resender.wake()
        wait_for(lambda: looks[0] >= 4, 5, "a round after the wake")
        time.sleep(0.1)
        assert looks[0] == 4
    finally:
        resender.stop()
    assert not any(t.name == "alertmanager-resend" for t in threading.enumerate())


# ---------------------------------------------------------------------- the history's writer


def statements(writer: HistoryWriter) -> list[str]:
    """Trace the writer's SQL from now on."""
    seen: list[str] = []
    assert writer._store is not None
    writer._store.conn.set_trace_callback(seen.append)
    return seen


def test_an_empty_flush_reads_nothing_until_a_5_minute_boundary_or_the_hourly_delete(tmp_path: Path) -> None:
    clock = Clock(T0 + 130)  # the rollup horizon: T0 (each bucket rolls up 2 minutes after it ends)
    writer = HistoryWriter(tmp_path, SETTINGS, poll_every=60, clock=clock)
    writer.record(answered(T0 + 100, [50], [proc(1, 0, "alice", 100)]))
    writer.flush()
    seen = statements(writer)
    for now in (T0 + 131, T0 + 200, T0 + 410):
        clock.now = now
        writer.flush()
    assert seen == []
    assert writer.idle_seconds() == 10  # to T0 + 420: the next 5-minute bucket may be rolled up
    clock.now = T0 + 420
    writer.flush()
    assert any("FROM raw" in s for s in seen)
    with connect(history_path(tmp_path)) as conn:
        assert conn.execute("SELECT t FROM gpu_5m").fetchall() == [(T0,)]
    seen.clear()
    clock.now = T0 + 500
    writer.flush()
    assert seen == []
    clock.now = T0 + 130 + HOUR  # an hour since the first deletion: delete what aged out
    writer.flush()
    assert any(s.startswith("DELETE") for s in seen)
    writer.stop()


def test_a_poll_in_a_bucket_ready_already_is_rolled_up_at_once(tmp_path: Path) -> None:
    clock = Clock(T0 + 610)  # horizon T0 + 300
    writer = HistoryWriter(tmp_path, SETTINGS, poll_every=60, clock=clock)
    writer.record(answered(T0 + 600, [50], [proc(1, 0, "alice", 100)]))
    writer.flush()  # nothing ready: the bucket of T0 + 600 ends after the horizon
    writer.record(answered(T0 + 100, [20], [proc(1, 0, "bob", 100)], name="gpu-b"))  # late, before the horizon
    writer.flush()
    with connect(history_path(tmp_path)) as conn:
        assert conn.execute("SELECT t FROM gpu_5m").fetchall() == [(T0,)]
    writer.stop()


def test_the_writer_thread_sleeps_with_nothing_queued_and_writes_what_comes(tmp_path: Path) -> None:
    clock = Clock(T0 + 130)
    writer = HistoryWriter(tmp_path, SETTINGS, poll_every=60, clock=clock, flush_every=0.01)
    writer.flush()  # opened and rolled up: nothing due for 290 s of this clock
    seen = statements(writer)
    writer.start()
    try:
        time.sleep(0.3)  # the old loop: a flush (3 queries) every 0.01 s
        assert seen == []
        writer.record(answered(T0 + 125, [50], [proc(1, 0, "alice", 100)]))
        wait_for(lambda: writer.written == 1, 5, "the poll written")
    finally:
        writer.stop()
    with connect(history_path(tmp_path)) as conn:
        assert conn.execute("SELECT COUNT(*) FROM raw").fetchone() == (1,)
