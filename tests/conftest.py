"""Fixtures for the loopback SSH fleet of tests/fleet.py (real sshd hosts + a replaying nvidia-smi).

Tests that use a fleet fixture get the ``fleet`` marker (deselect with ``-m "not fleet"``) and are
skipped, with the reason, where a fleet cannot run (not root, no sshd).
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fakefeishu import FakeFeishu
from fleet import (
    H100_LOAD_APPS,
    Fleet,
    capture_pids,
    fleet_unavailable_reason,
    scenario_healthy_multi_gpu,
    standin_env,
)

FLEET_HOSTS = 8  # 127.0.0.2 .. 127.0.0.9
_FLEET_FIXTURES = {
    "fleet",
    "fleet_session",
    "fleet_port",
    "monitor_user",
    "monitor_password",
    "monitor_key",
    "known_hosts",
    "job_pids",
    "refused_address",
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fleet: needs the loopback SSH fleet (root + OpenSSH sshd)")
    config.addinivalue_line("markers", "slow: a real browser or a real Prometheus; leave out with -m 'not slow'")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _FLEET_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.fleet)


@pytest.fixture(scope="session")
def fleet_session() -> Iterator[Fleet]:
    """The session's fleet; prefer ``fleet``, which also resets scenarios for each test."""
    reason = fleet_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with Fleet(FLEET_HOSTS) as fleet:
        yield fleet


@pytest.fixture
def fleet(fleet_session: Fleet) -> Iterator[Fleet]:
    """8 SSH hosts (``fleet.addresses``: 127.0.0.2-127.0.0.9), each with the default scenario: 4 H100
    GPUs, GPU 0 busy with alice's and verylongusername's real processes.  Hosts a test adds with
    ``fleet.add_host`` are removed after it."""
    fleet_session.reset_scenarios()
    yield fleet_session
    for address in list(fleet_session.all_addresses[len(fleet_session.addresses) :]):
        fleet_session.remove_host(address)


@pytest.fixture
def fleet_port(fleet: Fleet) -> int:
    """The one TCP port every fleet host listens on."""
    return fleet.port


@pytest.fixture
def monitor_user(fleet: Fleet) -> str:
    """Login user of the fleet (``gpuwatch-mon``)."""
    return fleet.monitor_user


@pytest.fixture
def monitor_password(fleet: Fleet) -> str:
    return fleet.monitor_password


@pytest.fixture
def monitor_key(fleet: Fleet) -> Path:
    """Private ed25519 key (OpenSSH format, no passphrase) authorized for the monitor user."""
    return fleet.client_key


@pytest.fixture
def known_hosts(fleet: Fleet, tmp_path: Path) -> Path:
    """A fresh known_hosts file with ``[addr]:port`` entries for every fleet host."""
    return fleet.write_known_hosts(tmp_path / "known_hosts")


@pytest.fixture
def job_pids(fleet: Fleet) -> dict[str, int]:
    """{"alice": pid, "verylongusername": pid} of real processes those users run."""
    return fleet.job_pids


@pytest.fixture
def refused_address(fleet: Fleet) -> str:
    """A loopback address where nothing listens on ``fleet_port`` (connection refused)."""
    return fleet.refused_address()


@pytest.fixture
def local_standin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The stand-in nvidia-smi on this process's PATH without SSH (no root needed); yields the
    ``local`` scenario directory, preset to the default 4-GPU scenario (pids unmapped)."""
    root = tmp_path / "standin"
    env = standin_env(root)
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setenv("GPUWATCH_STANDIN_DIR", env["GPUWATCH_STANDIN_DIR"])
    monkeypatch.delenv("SSH_CONNECTION", raising=False)
    return scenario_healthy_multi_gpu(root / "local")


@pytest.fixture
def mine(local_standin: Path) -> Iterator[int]:
    """A real process of this user on GPUs 0 and 1 of the local 4-GPU host (captured pid 11327)."""
    captured = capture_pids(H100_LOAD_APPS)  # [11327, 11328, 11345]
    proc = subprocess.Popen(["sleep", "300"])
    scenario_healthy_multi_gpu(local_standin, 4, busy_gpus=(0, 1), owners_pids={captured[0]: proc.pid})
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A real process of this user that the stand-in reports as a GPU process (via its pids file)."""
    proc = subprocess.Popen(["sleep", "300"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """``gpuwatch.cli.main`` installs its own log handlers on the root logger (stderr as captured for
    the test, the state_dir's file); take them away afterwards, so that a server thread still logging
    after the test never writes to a closed stream.  Modules ask for it with
    ``pytestmark = pytest.mark.usefixtures("restore_logging")``."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


@pytest.fixture
def feishu() -> Iterator[FakeFeishu]:
    """The Feishu-like server (tests/fakefeishu.py) requiring the keyword "GPU", the ``KEYWORD`` the
    end-to-end modules put in their configs; a module needing another one defines its own."""
    with FakeFeishu(keywords=["GPU"]) as server:
        yield server
