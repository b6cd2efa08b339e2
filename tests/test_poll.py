"""The poller's own guarantees, with runners that replay a real probe output after a delay."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from pathlib import Path

from fleet import scenario_healthy_multi_gpu, standin_env
from gpuwatch.config import HostConfig, SshSettings
from gpuwatch.poll import Poller, Workers, phase
from gpuwatch.probe import build_script
from gpuwatch.ssh import CommandResult

RECORDED_TOKEN = "0" * 32


class SlowReplay:
    """A runner that answers with a real probe output (run once, locally, through the stand-in
    nvidia-smi) after ``delay`` seconds, as a slow host would. The output was recorded with
    :data:`RECORDED_TOKEN`; each run answers with the token of the script it was given, as the
    real script would."""

    def __init__(self, output: str, delay: float) -> None:
        self.output = output
        self.delay = delay

    def run_script(self, script: str, timeout: float) -> CommandResult:
        time.sleep(self.delay)
        match = re.search(r'echo "@@gpuwatch-probe 1 ([0-9a-f]+)"', script)
        token = match.group(1) if match else ""
        return CommandResult(0, self.output.replace(RECORDED_TOKEN, token), "", self.delay)

    def close(self) -> None:
        pass


def real_probe_output(tmp_path: Path) -> str:
    scenario_healthy_multi_gpu(tmp_path / "standin" / "local")
    env = standin_env(tmp_path / "standin")
    script = build_script(30, token=RECORDED_TOKEN)
    done = subprocess.run(["sh", "-s"], input=script, env=env, capture_output=True, text=True, timeout=30, check=True)
    return done.stdout


def test_hosts_queued_behind_a_small_pool_are_not_timed_out(tmp_path: Path) -> None:
    output = real_probe_output(tmp_path)
    # budget per host: 1 s command timeout + 2 s grace; three 1.5 s probes one after another
    settings = SshSettings(command_timeout=1.0)
    hosts = [HostConfig(name=f"h{i}", address=None, ssh=settings, local=True) for i in range(3)]
    poller = Poller(hosts, lambda host: SlowReplay(output, 1.5), max_parallel=1)
    try:
        started = time.monotonic()
        snapshot = poller.poll()
        elapsed = time.monotonic() - started
    finally:
        poller.close()
    assert [h.ok for h in snapshot.hosts] == [True, True, True], [h.error for h in snapshot.hosts]
    assert [len(h.gpus) for h in snapshot.hosts] == [4, 4, 4]
    assert elapsed >= 4.5  # they really did wait for each other


def test_a_host_over_its_budget_is_reported_without_waiting_longer(tmp_path: Path) -> None:
    output = real_probe_output(tmp_path)
    settings = SshSettings(command_timeout=1.0)
    slow = HostConfig(name="slow", address=None, ssh=settings, local=True)
    fast = HostConfig(name="fast", address=None, ssh=settings, local=True)
    poller = Poller([slow, fast], lambda h: SlowReplay(output, 8.0 if h.name == "slow" else 0.1), max_parallel=4)
    try:
        started = time.monotonic()
        snapshot = poller.poll()
        elapsed = time.monotonic() - started
    finally:
        poller.close()
    by_name = {h.name: h for h in snapshot.hosts}
    assert by_name["fast"].ok
    assert by_name["slow"].error_kind is not None and by_name["slow"].error_kind.value == "probe_timeout"
    assert elapsed < 4.5  # the 3 s budget, not the 8 s the host would take


def test_probes_run_on_worker_threads_kept_between_polls(tmp_path: Path) -> None:
    """No new thread per probe: five polls of three hosts use at most three workers, kept."""
    output = real_probe_output(tmp_path)
    settings = SshSettings(command_timeout=5.0)
    hosts = [HostConfig(name=f"h{i}", address=None, ssh=settings, local=True) for i in range(3)]
    before = {t.ident for t in threading.enumerate()}  # other pollers' workers are not this one's
    poller = Poller(hosts, lambda host: SlowReplay(output, 0.05), max_parallel=8)
    started: set[int] = set()
    try:
        for _ in range(5):
            assert all(h.ok for h in poller.poll().hosts)
            started |= {t.ident or 0 for t in threading.enumerate() if t.name.startswith("probe-")} - before
    finally:
        poller.close()
    assert 1 <= len(started) <= 3
    time.sleep(0.2)
    assert not [t for t in threading.enumerate() if t.ident in started]  # closed: the workers ended


# ---------------------------------------------------------------- each host on its own clock


class Counting(SlowReplay):
    """A SlowReplay that counts its runs and whether it was closed."""

    def __init__(self, output: str, delay: float) -> None:
        super().__init__(output, delay)
        self.runs = 0
        self.closed = False

    def run_script(self, script: str, timeout: float) -> CommandResult:
        self.runs += 1
        return super().run_script(script, timeout)

    def close(self) -> None:
        self.closed = True


def test_each_host_on_its_own_clock_a_hung_host_delays_nobody(tmp_path: Path) -> None:
    output = real_probe_output(tmp_path)
    settings = SshSettings(command_timeout=1.0)
    hosts = [HostConfig(name=n, address=None, ssh=settings, local=True) for n in ("hung", "fast")]
    runners = {"hung": Counting(output, 30.0), "fast": Counting(output, 0.05)}
    results: list[tuple[str, bool, float]] = []
    poller = Poller(hosts, lambda h: runners[h.name])
    started = time.monotonic()
    try:
        poller.start(0.3, lambda h: results.append((h.name, h.ok, time.monotonic() - started)))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and sum(1 for r in results if r[0] == "fast") < 5:
            time.sleep(0.05)
    finally:
        poller.close()
    fast = [r for r in results if r[0] == "fast"]
    assert len(fast) >= 5 and all(ok for _, ok, _ in fast)
    # the fast host's first result did not wait for the hung host's budget (1 s + 2 s grace)
    assert fast[0][2] < 2.0
    assert runners["hung"].runs == 1  # never a second probe while the first still runs


def test_a_hung_probe_is_reported_as_timed_out_then_busy_never_run_twice(tmp_path: Path) -> None:
    output = real_probe_output(tmp_path)
    settings = SshSettings(command_timeout=0.5)
    host = HostConfig(name="hung", address=None, ssh=settings, local=True)
    runner = Counting(output, 30.0)
    results = []
    poller = Poller([host], lambda h: runner)
    try:
        poller.start(0.2, results.append)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and len(results) < 3:
            time.sleep(0.05)
    finally:
        poller.close()
    kinds = [r.error_kind.value for r in results[:3] if r.error_kind is not None]
    assert kinds[0] == "probe_timeout" and set(kinds[1:]) == {"busy"}
    assert runner.runs == 1


def test_phases_spread_two_hundred_hosts_over_the_interval() -> None:
    phases = sorted(phase(f"gpu{i:03d}") for i in range(200))
    # no tenth of the interval holds more than twice its share (20) of the hosts
    for start in range(10):
        window = [p for p in phases if start / 10 <= p < (start + 1) / 10]
        assert len(window) <= 40, (start, len(window))
    assert phase("gpu001") == phase("gpu001")  # stable: a reload does not move a host


def test_reload_keeps_unchanged_hosts_runners_and_closes_removed_ones(tmp_path: Path) -> None:
    output = real_probe_output(tmp_path)
    settings = SshSettings(command_timeout=1.0)
    made: dict[str, list[Counting]] = {}

    def factory(h: HostConfig) -> Counting:
        runner = Counting(output, 0.01)
        made.setdefault(h.name, []).append(runner)
        return runner

    def host(name: str, timeout: float = 1.0) -> HostConfig:
        return HostConfig(name=name, address=None, ssh=SshSettings(command_timeout=timeout), local=True)

    poller = Poller([host("a"), host("b"), host("c")], factory)
    seen: list[str] = []
    try:
        poller.start(0.2, lambda h: seen.append(h.name))
        result = poller.reload([host("a"), host("c", timeout=2.0), host("d")], factory)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and "d" not in seen:
            time.sleep(0.05)
        assert "d" in seen
    finally:
        poller.close()
    assert (result.added, result.removed, result.changed, result.kept) == (("d",), ("b",), ("c",), ("a",))
    assert len(made["a"]) == 1  # kept its connection
    assert made["b"][0].closed  # removed: closed
    assert len(made["c"]) == 2 and made["c"][0].closed  # changed: reconnected with its new settings
    assert [h.name for h in poller.hosts] == ["a", "c", "d"]
    assert settings.command_timeout == 1.0


def test_a_shorter_interval_from_a_reload_takes_effect_at_once(tmp_path: Path) -> None:
    output = real_probe_output(tmp_path)
    host = HostConfig(name="a", address=None, ssh=SshSettings(command_timeout=1.0), local=True)
    runner = Counting(output, 0.01)
    poller = Poller([host], lambda h: runner)
    try:
        poller.start(60.0, lambda h: None)  # first probe at once, the next a minute or more later
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and runner.runs < 1:
            time.sleep(0.02)
        poller.reload([host], lambda h: runner, every=0.2)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and runner.runs < 4:
            time.sleep(0.02)
    finally:
        poller.close()
    assert runner.runs >= 4  # not waiting out the old minute


def test_a_fleet_on_its_clocks_uses_one_clock_thread_and_idle_workers_end(tmp_path: Path) -> None:
    """Twenty hosts on their clocks: one thread for every clock (not one per host); the workers a
    burst of probes started end once idle, and the polling goes on with new ones."""
    output = real_probe_output(tmp_path)
    settings = SshSettings(command_timeout=2.0)
    hosts = [HostConfig(name=f"h{i:02d}", address=None, ssh=settings, local=True) for i in range(20)]
    before = {t.ident for t in threading.enumerate()}
    poller = Poller(hosts, lambda h: SlowReplay(output, 0.2))
    poller._workers._idle_seconds = 0.5  # the daemon's is a minute
    results: list[str] = []
    try:
        poller.start(1.5, lambda h: results.append(h.name) if h.ok else None)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(set(results)) < 20:
            time.sleep(0.05)
        new = [t.name for t in threading.enumerate() if t.ident not in before]
        assert new.count("clocks") == 1 and not [n for n in new if n.startswith("clock-")]
        burst = poller._workers.threads
        assert burst >= 10  # the first probes all at once
        count = len(results)
        time.sleep(3.0)  # two intervals: every host again, spread over its phase
        assert len(results) >= count + 20
        assert poller._workers.threads < burst  # idle workers ended; the spread probes need fewer
    finally:
        poller.close()
    assert set(results) == {h.name for h in hosts}


def test_probes_of_connected_hosts_go_before_those_still_to_log_in() -> None:
    """At the start of a big fleet every worker may be waiting for an SSH handshake slot: a host
    already connected must not wait behind all the logins still to come."""
    workers = Workers(1)
    release = threading.Event()
    ran: list[str] = []
    done = threading.Event()
    try:
        workers.submit(release.wait)  # the one worker is busy
        workers.submit(lambda: ran.append("login 1"))
        workers.submit(lambda: ran.append("login 2"))
        workers.submit(lambda: ran.append("connected"), first=True)
        workers.submit(done.set)
        release.set()
        assert done.wait(5)
    finally:
        workers.close()
    assert ran == ["connected", "login 1", "login 2"]
