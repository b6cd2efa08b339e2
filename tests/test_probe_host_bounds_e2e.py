"""What one probe costs the GPU server, measured on the real sshd fleet (issue 20 E2, E8).

- Memory: a streaming nvidia-smi (tests/standin/nvidia-smi's ``stream`` scenario) must not grow the
  host-side probe shell: every captured output is cut on the host after the client's cap, and the
  client reports the host as printing too much. The measure is the peak RSS (``VmHWM`` in
  /proc/PID/status) of every shell of the probe's SSH session, sampled while it runs.
- Files: killing the probe's wrapper shell on the host (logind's KillUserProcesses, the OOM killer,
  an admin) leaves no temporary file behind.
"""

from __future__ import annotations

import os
import pwd
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet import MONITOR_USER, Fleet, scenario_stream
from gpuwatch.config import parse_config
from gpuwatch.model import HostErrorKind
from gpuwatch.poll import probe_host
from gpuwatch.probe import HostProbe
from gpuwatch.ssh import HostKeyStore, SshConnection

SHELLS = ("sh", "dash", "bash")
BOUND_KIB = 64 * 1024
KILL_ABOVE_KIB = 512 * 1024  # a shell past this is killed at once: the test must not hurt the machine


def _status(pid: int) -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def _environ(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return []


def session_shells(fleet: Fleet, address: str) -> dict[int, dict[str, str]]:
    """{pid: /proc/PID/status} of the monitor user's shells in SSH sessions to ``address`` on this fleet."""
    monitor = str(pwd.getpwnam(MONITOR_USER).pw_uid)
    standin = f"GPUWATCH_STANDIN_DIR={fleet.standin_dir}".encode()
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        status = _status(int(entry.name))
        if status.get("Name", "").strip() not in SHELLS or status.get("Uid", "").split()[:1] != [monitor]:
            continue
        environ = _environ(int(entry.name))
        connection = next((v for v in environ if v.startswith(b"SSH_CONNECTION=")), b"").split()
        if standin in environ and len(connection) >= 3 and connection[2] == address.encode():
            found[int(entry.name)] = status
    return found


class PeakRss:
    """Samples the session's shells every 10 ms: the highest VmHWM seen (KiB), and whether one had
    to be killed for going past :data:`KILL_ABOVE_KIB`."""

    def __init__(self, fleet: Fleet, address: str) -> None:
        self.fleet, self.address = fleet, address
        self.peak_kib = 0
        self.shells: set[int] = set()
        self.killed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            for pid, status in session_shells(self.fleet, self.address).items():
                self.shells.add(pid)
                peak = int(status.get("VmHWM", "0 kB").split()[0])
                self.peak_kib = max(self.peak_kib, peak)
                if peak > KILL_ABOVE_KIB:
                    self.killed = True
                    os.kill(pid, signal.SIGKILL)


def connection(fleet: Fleet, address: str, known_hosts: Path, tmp_path: Path) -> SshConnection:
    config = parse_config({"hosts": [{"name": "gpu-s", "address": address}], "ssh": fleet.gpuwatch_ssh()})
    return SshConnection(config.hosts[0], HostKeyStore(tmp_path / "own_known_hosts", (known_hosts,)))


@pytest.fixture
def conn(fleet: Fleet, known_hosts: Path, tmp_path: Path) -> Iterator[SshConnection]:
    c = connection(fleet, fleet.addresses[3], known_hosts, tmp_path)
    yield c
    c.close()


@pytest.mark.parametrize("on", [None, "query-compute-apps"])
def test_a_streaming_nvidia_smi_costs_the_host_shell_no_more_than_the_cap(
    fleet: Fleet, conn: SshConnection, on: str | None
) -> None:
    """``yes``-like nvidia-smi output (on every call, or only the process query): the probe's
    shell stays under 64 MiB and the host is reported as printing too much."""
    address = fleet.addresses[3]
    scenario_stream(fleet.scenario_dir(address), b"y\n", on=on)
    config = parse_config({"hosts": [{"name": "gpu-s", "address": address}], "ssh": fleet.gpuwatch_ssh()})
    with PeakRss(fleet, address) as rss:
        snap = probe_host(config.hosts[0], conn, HostProbe())
    assert rss.shells, "no probe shell was seen on the host"
    print(f"peak VmHWM of the probe shells: {rss.peak_kib} KiB")
    assert not rss.killed and rss.peak_kib < BOUND_KIB, f"the probe's shell reached {rss.peak_kib} KiB"
    assert not snap.ok and snap.error_kind is HostErrorKind.UNPARSEABLE
    assert "printed more than 4 MiB" in (snap.error or ""), snap.error
    assert "it begins 'y'" in (snap.error or ""), snap.error
