"""What one probe costs the GPU server, measured on the real sshd fleet (issue 20 E2, E8).

- Memory: a streaming nvidia-smi (tests/standin/nvidia-smi's ``stream`` scenario) must not grow the
  host-side probe shell: every captured output is cut on the host after the client's cap, and the
  client reports the host as printing too much. The measure is the peak RSS (``VmHWM`` in
  /proc/PID/status) of every shell of the probe's SSH session, sampled while it runs.
- Files: killing the probe's wrapper shell on the host (logind's KillUserProcesses, the OOM killer,
  an admin) leaves no temporary file behind.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet import MONITOR_USER, Fleet, scenario_hang, scenario_stream
from gpuwatch.config.load import parse_config
from gpuwatch.model import HostErrorKind
from gpuwatch.poll import probe_host
from gpuwatch.probe import HostProbe
from gpuwatch.ssh import HostKeyStore, SshConnection
from waiting import wait_for

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


def _cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
    except OSError:
        return []


def _probe_files(pid: int) -> set[str]:
    """The probe's temporary files ``pid`` has open (a removed one is named "... (deleted)")."""
    found = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if "gpuwatch-probe." in target:
                    found.add(target.removesuffix(" (deleted)"))
    return found


def test_killing_the_wrapper_shell_on_the_host_leaves_no_file_behind(
    fleet: Fleet, known_hosts: Path, tmp_path: Path
) -> None:
    """Five times: a probe waits on a hung nvidia-smi, its wrapper shell (``sh -s``) is killed with
    SIGKILL; the probe's temporary file must be gone (it is removed as soon as it is open)."""
    address = fleet.addresses[4]
    scenario_hang(fleet.scenario_dir(address))
    ssh = fleet.gpuwatch_ssh(command_timeout="4s")
    host = parse_config({"hosts": [{"name": "gpu-k", "address": address}], "ssh": ssh}).hosts[0]
    conn = SshConnection(host, HostKeyStore(tmp_path / "own_known_hosts", (known_hosts,)))
    seen: list[set[str]] = []
    try:
        for _ in range(5):
            done: list[object] = []
            poll = threading.Thread(target=lambda: done.append(probe_host(host, conn, HostProbe())), daemon=True)
            poll.start()
            state: dict[str, Any] = {}

            def started() -> bool:
                shells = session_shells(fleet, address)
                files = set().union(*(_probe_files(pid) for pid in shells)) if shells else set()
                wrappers = [pid for pid in shells if _cmdline(pid) == [b"sh", b"-s"]]
                state.update(files=files, wrappers=wrappers)
                return bool(files and wrappers)

            wait_for(started, 10, "the probe to be running on the host")
            for pid in state["wrappers"]:
                os.kill(pid, signal.SIGKILL)
            poll.join(30)
            assert done and not poll.is_alive()
            seen.append(state["files"])
    finally:
        conn.close()
    left = sorted(path for files in seen for path in files if os.path.exists(path))
    assert all(seen) and not left, f"left behind: {left}"
