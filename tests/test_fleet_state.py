"""The one fleet state: latest result per host, stale after 3 intervals, following reloads."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from gpuwatch.config import FreeGpuConfig
from gpuwatch.fleet import FleetState
from gpuwatch.model import Gpu, HostErrorKind, HostSnapshot
from gpuwatch.render import host_dict, no_data_text
from gpuwatch.report import host_block

T0 = datetime(2026, 11, 28, 10, 0, tzinfo=timezone.utc)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def ok(name: str, gpus: int = 2) -> HostSnapshot:
    gpu_list = tuple(Gpu(index=i, memory_used_mib=0) for i in range(gpus))
    return HostSnapshot(name=name, address=name, ok=True, gpus=gpu_list)


def test_a_host_not_heard_from_for_three_intervals_is_stale_never_current() -> None:
    clock = Clock()
    state = FleetState([("a", "10.0.0.1"), ("b", "10.0.0.2")], poll_every=60, now=clock)
    first = state.snapshot()
    assert [h.error_kind for h in first.hosts] == [HostErrorKind.BUSY, HostErrorKind.BUSY]  # not polled yet
    assert not first.answered
    state.update(ok("a"))
    state.update(ok("b"))
    clock.now = T0 + timedelta(seconds=170)
    state.update(ok("b"))
    clock.now = T0 + timedelta(seconds=181)  # a: 181 s old, past 3 x 60 s
    snap = state.snapshot()
    a, b = snap.hosts
    assert a.stale and not a.current and a.age_seconds(snap.taken_at) == 181
    assert not b.stale and b.current
    assert [h.name for h in snap.answered] == ["b"]
    assert [h.name for h in snap.down] == ["a"]


def test_set_hosts_keeps_results_of_kept_hosts_and_drops_removed_ones() -> None:
    clock = Clock()
    state = FleetState([("a", "a"), ("b", "b")], poll_every=60, now=clock)
    state.update(ok("a", gpus=4))
    removed = state.set_hosts([("c", "c"), ("a", "a")])
    assert removed == ["b"]
    snap = state.snapshot()
    assert [h.name for h in snap.hosts] == ["c", "a"]  # the new config's order
    assert len(snap.hosts[1].gpus) == 4
    state.update(ok("b"))  # a late result of a removed host is dropped
    assert [h.name for h in state.snapshot().hosts] == ["c", "a"]


def test_readers_get_an_immutable_snapshot_and_see_news_by_the_version() -> None:
    state = FleetState([("a", "a")], poll_every=60)
    version = state.version
    snap = state.snapshot()
    state.update(ok("a"))
    assert snap.hosts[0].error_kind is HostErrorKind.BUSY  # the earlier snapshot did not change
    assert state.version != version


def test_failed_probes_are_counted_per_host_and_kind_and_a_failing_run_knows_its_start() -> None:
    clock = Clock()
    state = FleetState([("a", "a"), ("b", "b")], poll_every=60, now=clock)
    state.update(ok("a"))
    clock.now = T0 + timedelta(seconds=60)
    state.update(HostSnapshot.failed("a", "a", HostErrorKind.UNREACHABLE, "refused"))
    clock.now = T0 + timedelta(seconds=120)
    state.update(HostSnapshot.failed("a", "a", HostErrorKind.UNREACHABLE, "refused"))
    state.update(HostSnapshot.failed("a", "a", HostErrorKind.PROBE_TIMEOUT, "slow"))
    assert state.probe_errors() == {("a", "unreachable"): 2, ("a", "probe_timeout"): 1}
    a, b = state.snapshot().hosts
    assert a.last_ok_at == T0 and a.failing_since == T0 + timedelta(seconds=60)  # since the first failure
    assert b.last_ok_at is None and b.failing_since is None  # not polled yet: neither
    state.update(ok("a"))
    a = state.snapshot().hosts[0]
    assert a.failing_since is None and a.last_ok_at == T0 + timedelta(seconds=120)
    assert state.probe_errors()[("a", "unreachable")] == 2  # a counter: it never goes down
    state.set_hosts([("b", "b")])
    assert state.probe_errors() == {}  # a removed host's series go with it


def test_a_failed_host_has_one_error_name_in_every_output() -> None:
    """HostSnapshot.error_name: the kind's value, "error" for a failure without a kind; the probe
    counts, a report's host block, the status text and the JSON document all say it so."""
    lost = HostSnapshot.failed("a", "a", HostErrorKind.GPU_LOST, "GPU 0 fell off the bus")
    unclassified = HostSnapshot(name="b", address="b", ok=False, error="something broke")
    assert (lost.error_name, unclassified.error_name) == ("gpu_lost", "error")
    state = FleetState([("a", "a"), ("b", "b")], poll_every=60, now=Clock())
    state.update(lost)
    state.update(unclassified)
    assert state.probe_errors() == {("a", "gpu_lost"): 1, ("b", "error"): 1}
    assert host_block(unclassified, FreeGpuConfig()) == "b: NO DATA (error): something broke"
    assert no_data_text(lost, T0) == "DOWN gpu_lost: GPU 0 fell off the bus"
    assert [host_dict(h)["error_kind"] for h in (lost, unclassified, ok("c"))] == ["gpu_lost", "error", None]
