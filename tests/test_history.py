"""Usage history over recorded timelines with an explicit clock (no sleeping): what the writer
stores, what the roll-ups and the retention delete keep, and the usage figures exact for known
inputs (shared GPUs, a host down part of the time, hour boundaries)."""

from __future__ import annotations

import logging
import sqlite3
from datetime import timezone
from pathlib import Path

import pytest

from gpuwatch.store.history import HOUR, HistoryStore, connect, history_path
from gpuwatch.store.historyread import HistoryReader
from gpuwatch.store.historywriter import HistoryWriter
from gpuwatch.usage import (
    GpuReading,
    HostSample,
    PersonOnGpu,
    account,
    ewma_gpus,
    readings_of,
    shares,
    spans,
    stands_for,
)
from timeline import ALICE, ALICE_IDLE, BOB, BOB_IDLE, DAY, SETTINGS, T0, WEEK, Clock, answered, proc, two_hours

# ---------------------------------------------------------------- pure accounting


def test_a_shared_gpu_is_split_by_memory_and_equally_when_a_memory_is_unknown() -> None:
    gpu = GpuReading(0, people=(PersonOnGpu("alice", 3000, 2), PersonOnGpu("bob", 1000, 1)))
    assert shares(gpu) == {"alice": 0.75, "bob": 0.25}
    unknown = GpuReading(0, people=(PersonOnGpu("alice", None, 1), PersonOnGpu("bob", 1000, 1)))
    assert shares(unknown) == {"alice": 0.5, "bob": 0.5}
    assert shares(GpuReading(0)) == {}


def test_account_counts_each_person_share_and_held_idle_only_under_the_threshold() -> None:
    people = (PersonOnGpu("alice", 3000, 1), PersonOnGpu("bob", 1000, 1))
    idle = HostSample("a", T0, 60, True, (GpuReading(0, utilization_percent=2, memory_used_mib=4000, people=people),))
    result = account(idle, idle_below=5)
    assert result.gpus[0].used_s == result.gpus[0].idle_s == 60
    assert (result.people["alice"].gpu_s, result.people["alice"].idle_s) == (45, 45)
    assert (result.people["bob"].gpu_s, result.people["bob"].idle_s) == (15, 15)
    busy = account(idle, idle_below=2)  # 2 % is not under 2 %
    assert busy.gpus[0].idle_s == busy.people["alice"].idle_s == 0
    mig = HostSample("a", T0, 60, True, (GpuReading(0, utilization_percent=None, people=people),))
    assert account(mig, idle_below=5).gpus[0].idle_s == 0  # unknown utilization is not idleness
    down = account(HostSample("a", T0, 60, False, (GpuReading(0), GpuReading(1))), idle_below=5)
    assert {i: (g.known_s, g.down_s, g.used_s) for i, g in down.gpus.items()} == {0: (0, 60, 0), 1: (0, 60, 0)}
    assert down.people == {}


def test_a_poll_stands_for_the_time_since_the_previous_one_within_three_intervals() -> None:
    assert stands_for(T0 + 60, T0, 60) == 60
    assert stands_for(T0 + 170, T0, 60) == 170
    assert stands_for(T0 + 181, T0, 60) == 60  # a longer gap is not known: one interval
    assert stands_for(T0, None, 60) == 60  # the first poll
    assert stands_for(T0, T0 + 5, 60) == 60  # the clock went back


def test_readings_name_the_owner_and_a_process_ps_did_not_see() -> None:
    host = answered(T0, [10], [proc(1, 0, "alice", 100), proc(2, 0, "alice", 200), proc(3, 0, None, 50)])
    (gpu,) = readings_of(host)
    assert gpu.people == (PersonOnGpu("?", 50, 1), PersonOnGpu("alice", 300, 2))


def test_ewma_weighs_recent_hours_more() -> None:
    hourly = {float(T0): 3600 * 2.0, float(T0 + HOUR): 3600 * 1.0}
    two = spans(T0, T0 + 2 * HOUR)
    assert two == [(T0, HOUR), (T0 + HOUR, HOUR)]
    assert ewma_gpus(hourly, two, T0 + 2 * HOUR, half_life_seconds=HOUR) == pytest.approx((0.5 * 2 + 1) / 1.5)
    assert ewma_gpus({}, spans(T0, T0 + HOUR), T0 + HOUR, HOUR) == 0
    # a whole day read as one span: its hours weigh as one, aged at the day's end
    mixed = spans(T0 - HOUR, T0 + DAY + HOUR, (T0, T0 + DAY))
    assert mixed == [(T0 - HOUR, HOUR), (T0, DAY), (T0 + DAY, HOUR)]


# ---------------------------------------------------------------- a recorded timeline in the store


def by_key(doc: dict[str, object], by: str) -> dict[str, dict[str, float]]:
    groups = doc["groups"]
    assert isinstance(groups, list)
    return {g[by]: g for g in groups}


def usage(tmp_path: Path, by: str, start: float = T0, end: float = T0 + 2 * HOUR, **kw: float) -> dict[str, object]:
    reader = HistoryReader(tmp_path)
    try:
        return reader.usage(start, end, by, idle_below=kw.get("idle_below", 5), half_life=kw.get("half_life", WEEK))
    finally:
        reader.close()


def expect_people(doc: dict[str, object]) -> None:
    people = by_key(doc, "user")
    assert set(people) == {"alice", "bob"}
    assert people["alice"]["gpu_hours"] == pytest.approx(ALICE, abs=1e-4)
    assert people["alice"]["held_idle_gpu_hours"] == pytest.approx(ALICE_IDLE, abs=1e-4)
    assert people["bob"]["gpu_hours"] == pytest.approx(BOB, abs=1e-4)
    assert people["bob"]["held_idle_gpu_hours"] == pytest.approx(BOB_IDLE, abs=1e-4)


def expect_hosts(doc: dict[str, object]) -> None:
    (host,) = by_key(doc, "host").values()
    assert host["host"] == "gpu-a"
    assert host["gpu_hours"] == pytest.approx(2 * 105 * 60 / 3600)  # two GPUs, 105 polls answered
    assert host["held_idle_gpu_hours"] == pytest.approx(45 * 60 / 3600)  # GPU 1, first hour, answered
    assert host["unknown_gpu_hours"] == pytest.approx(2 * 15 * 60 / 3600)  # down: unknown, not zero
    assert host["known_gpu_hours"] == pytest.approx(2 * 105 * 60 / 3600)


def test_gpu_hours_and_held_idle_hours_are_exact_from_raw_samples(tmp_path: Path) -> None:
    writer, _ = two_hours(tmp_path)
    assert writer.written == 120
    with connect(history_path(tmp_path)) as conn:
        assert conn.execute("SELECT COUNT(*) FROM gpu_hour").fetchone() == (2,)  # the second hour is not over
    expect_people(usage(tmp_path, "user"))
    expect_hosts(usage(tmp_path, "host"))
    gpus = by_key(usage(tmp_path, "gpu"), "gpu")
    assert gpus["gpu-a:0"]["utilization_percent"] == 50
    assert gpus["gpu-a:1"]["utilization_percent"] == pytest.approx((45 * 2 + 60 * 80) / 105)
    assert by_key(usage(tmp_path, "model"), "model")["NVIDIA H100"]["gpu_hours"] == pytest.approx(3.5)


def test_rolled_up_hours_give_the_same_figures_and_a_sample_on_the_hour_counts_in_the_next(tmp_path: Path) -> None:
    writer, clock = two_hours(tmp_path)
    clock.now = T0 + 2 * HOUR + 121  # both hours over, with their grace
    writer.flush()
    with connect(history_path(tmp_path)) as conn:
        hours = conn.execute("SELECT t, SUM(known_s), SUM(down_s), SUM(idle_s) FROM gpu_hour GROUP BY t").fetchall()
        fives = conn.execute("SELECT COUNT(DISTINCT t) FROM gpu_5m").fetchone()[0]
    # the poll at T0 + 3600 is the second hour's first: the first hour has polls 0-59
    assert hours == [(T0, 2 * 45 * 60, 2 * 15 * 60, 45 * 60), (T0 + HOUR, 2 * 3600, 0, 0)]
    assert fives == 24
    expect_people(usage(tmp_path, "user"))
    expect_hosts(usage(tmp_path, "host"))
    first = by_key(usage(tmp_path, "user", end=T0 + HOUR), "user")
    assert first["alice"]["gpu_hours"] == pytest.approx((2700 + 2025) / 3600, abs=1e-4)
    second = by_key(usage(tmp_path, "user", start=T0 + HOUR), "user")
    assert second["bob"]["held_idle_gpu_hours"] == 0


def test_the_retention_delete_keeps_what_is_rolled_up_and_drops_old_hours(tmp_path: Path) -> None:
    writer, clock = two_hours(tmp_path)
    clock.now = T0 + 2 * HOUR + 121
    writer.flush()
    writer.stop()
    conn = connect(history_path(tmp_path))
    store = HistoryStore(conn, SETTINGS)
    deleted = store.retain(T0 + 3 * HOUR + 30)  # raw_for 2 h: raw before T0 + 1 h + 30 s goes
    assert deleted["raw"] == 61 and deleted["gpu_hour"] == 0
    expect_people(usage(tmp_path, "user"))  # the same figures, from the hours rolled up
    deleted = store.retain(T0 + 30 * DAY + 1800)  # keep 30 d: the first hour goes, the second stays
    assert deleted["gpu_hour"] == 2 and deleted["person_hour"] == 2
    people = by_key(usage(tmp_path, "user"), "user")
    assert people["alice"]["gpu_hours"] == pytest.approx((3600 + 2700) / 3600, abs=1e-4)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    conn.close()


def test_ewma_and_per_day_hours_for_the_page(tmp_path: Path) -> None:
    two_hours(tmp_path)
    doc = usage(tmp_path, "user", half_life=HOUR)
    alice = by_key(doc, "user")["alice"]
    assert alice["ewma_gpus"] == pytest.approx((0.5 * 4725 / 3600 + 6300 / 3600) / 1.5, abs=1e-4)
    reader = HistoryReader(tmp_path)
    daily = reader.person_daily(T0, T0 + DAY, tz=timezone.utc)
    assert daily["alice"] == {"2026-12-07": pytest.approx(ALICE, abs=1e-4)}
    series = reader.gpu_series(T0, T0 + 2 * HOUR)
    points = series[("gpu-a", 1)]
    assert len(points) == 24 and points[0].t == T0
    assert points[0].utilization_percent == 2 and points[0].memory_used_mib == 4000
    assert points[6].unknown and points[6].utilization_percent is None  # polls 30-34: the host was down
    assert points[-1].utilization_percent == 80
    reader.close()


def test_a_locked_history_file_is_logged_and_the_polls_of_that_batch_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "gpuwatch")
    clock = Clock(T0)
    writer = HistoryWriter(tmp_path, SETTINGS, poll_every=60, clock=clock)
    writer.record(answered(T0, [50], [proc(1, 0, "alice", 100)]))
    writer.flush()
    blocker = sqlite3.connect(history_path(tmp_path), timeout=0)
    blocker.execute("BEGIN IMMEDIATE")
    assert writer._store is not None
    writer._store.conn.execute("PRAGMA busy_timeout = 50")
    writer.record(answered(T0 + 60, [50], [proc(1, 0, "alice", 100)]))
    writer.flush()  # never raises
    assert "history: cannot write" in caplog.text and "locked" in caplog.text
    blocker.execute("ROLLBACK")
    blocker.close()
    writer.record(answered(T0 + 120, [50], [proc(1, 0, "alice", 100)]))
    writer.flush()
    assert "writing again" in caplog.text
    assert writer.written == 2
    writer.stop()


def test_a_corrupt_history_file_is_moved_aside_and_a_fresh_one_started(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    history_path(tmp_path).write_bytes(b"this is no database " * 100)
    writer = HistoryWriter(tmp_path, SETTINGS, poll_every=60, clock=Clock(T0))
    writer.record(answered(T0, [50], [proc(1, 0, "alice", 100)]))
    writer.flush()
    writer.stop()
    assert writer.written == 1
    (aside,) = tmp_path.glob("history.sqlite3.corrupt-*")
    assert aside.read_bytes().startswith(b"this is no database")
    assert "was corrupt" in caplog.text
    with connect(history_path(tmp_path)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_whole_days_are_read_from_daily_sums_with_the_same_figures(tmp_path: Path) -> None:
    """gpu-a polled every 10 min for three days from noon before T0: alice on GPU 0 at 50 %."""
    clock = Clock(T0)
    writer = HistoryWriter(tmp_path, SETTINGS, poll_every=600, clock=clock)
    start = T0 - 12 * HOUR
    for k in range(3 * 144):
        t = start + 600 * k
        clock.now = t + 1
        writer.record(answered(t, [50, 0], [proc(1, 0, "alice", 1000)]))
        if k % 6 == 0:
            writer.flush()
    clock.now = start + 3 * DAY + 121
    writer.flush()
    writer.stop()
    with connect(history_path(tmp_path)) as conn:
        days = conn.execute("SELECT t, SUM(known_s), SUM(used_s) FROM gpu_day GROUP BY t").fetchall()
    # each UTC day once all its hours are rolled up (the first has only the 12 hours polled)
    assert days == [(T0 - DAY, DAY, DAY / 2), (T0, 2 * DAY, DAY), (T0 + DAY, 2 * DAY, DAY)]
    reader = HistoryReader(tmp_path)
    end = start + 3 * DAY
    both = reader.tallies(start, end, 5)
    hours = reader.tallies(start, end, 5, days=False)
    assert (T0, DAY) in both.spans and len(both.spans) == 24 + 2
    assert both.people["alice"].gpu_s == hours.people["alice"].gpu_s == 3 * DAY
    doc = reader.usage(start, end, "user", idle_below=5, half_life=WEEK)
    (alice,) = doc["groups"]
    assert alice["gpu_hours"] == 72 and alice["ewma_gpus"] == pytest.approx(1.0)
    assert by_key(reader.usage(start, end, "gpu", idle_below=5, half_life=WEEK), "gpu")["gpu-a:0"]["gpu_hours"] == 72
    assert reader.person_daily(start, end, tz=timezone.utc)["alice"] == {
        "2026-12-06": 12.0,
        "2026-12-07": 24.0,
        "2026-12-08": 24.0,
        "2026-12-09": 12.0,
    }
    reader.close()
