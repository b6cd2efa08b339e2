"""The poller's own guarantees, with runners that replay a real probe output after a delay."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from fleet import scenario_healthy_multi_gpu, standin_env
from gpuwatch.config import HostConfig, SshSettings
from gpuwatch.poll import Poller
from gpuwatch.probe import build_script
from gpuwatch.ssh import CommandResult


class SlowReplay:
    """A runner that answers with a real probe output (run once, locally, through the stand-in
    nvidia-smi) after ``delay`` seconds, as a slow host would."""

    def __init__(self, output: str, delay: float) -> None:
        self.output = output
        self.delay = delay

    def run_script(self, script: str, timeout: float) -> CommandResult:
        time.sleep(self.delay)
        return CommandResult(0, self.output, "", self.delay)

    def close(self) -> None:
        pass


def real_probe_output(tmp_path: Path) -> str:
    scenario_healthy_multi_gpu(tmp_path / "standin" / "local")
    env = standin_env(tmp_path / "standin")
    return subprocess.run(
        ["sh", "-s"], input=build_script(30), env=env, capture_output=True, text=True, timeout=30, check=True
    ).stdout


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
