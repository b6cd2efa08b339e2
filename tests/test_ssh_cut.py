"""A probe session cut by the host going away is a lost connection, never a probe result.

When sshd dies mid-probe, paramiko closes the connection's channels (waking the thread that waits
for the exit status). gpuwatch asked ``exit_status_ready()``, which paramiko also answers true for
a closed channel, so a cut session looked like a finished one without an exit status, and its
partial output became "unparseable" or "probe_timeout: cut short" on the page instead of
"unreachable" (tests/test_web_e2e.py::test_the_page_in_a_real_browser, 1 run in 3 once the fleet
cut connections first; 14 of 20 cuts in a loop). And paramiko closes the channels a moment before
it marks the connection inactive: here that moment is held still, a channel closed without an EOF
from the host and without an exit status, on a connection that still says it is active.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from gpuwatch.config import HostConfig, SshSettings
from gpuwatch.ssh import HostKeyStore, SshConnection


class CutChannel:
    """A session channel the way paramiko leaves it when the connection under it died: closed,
    no EOF from the host, no exit status; some output arrived before the cut."""

    def __init__(self, readable_fd: int, output: bytes, eof_received: bool = False) -> None:
        self._fd = readable_fd
        self._output = output
        self.closed = True
        self.eof_received = eof_received
        self.status_event = threading.Event()
        self.status_event.set()
        self.exit_status = -1

    def settimeout(self, timeout: float) -> None:
        pass

    def exec_command(self, command: str) -> None:
        pass

    def sendall(self, data: bytes) -> None:
        pass

    def shutdown_write(self) -> None:
        pass

    def fileno(self) -> int:
        return self._fd

    def recv_ready(self) -> bool:
        return bool(self._output)

    def recv(self, n: int) -> bytes:
        data, self._output = self._output[:n], self._output[n:]
        return data

    def recv_stderr_ready(self) -> bool:
        return False

    def exit_status_ready(self) -> bool:
        return self.closed or self.status_event.is_set()  # as paramiko's: true once closed

    def close(self) -> None:
        pass


class StillActive:
    """The connection in the moment before paramiko marks it inactive."""

    def __init__(self, channel: CutChannel) -> None:
        self.channel = channel

    def open_session(self, window_size: int, timeout: float) -> CutChannel:
        return self.channel

    def is_active(self) -> bool:
        return True


@pytest.fixture
def readable_fd() -> Iterator[int]:
    read_end, write_end = os.pipe()
    os.close(write_end)  # at EOF: select() says readable at once
    yield read_end
    os.close(read_end)


def connection(tmp_path: Path) -> SshConnection:
    host = HostConfig(name="gpu-08", address="127.0.0.1", ssh=SshSettings(use_ssh_config=False))
    return SshConnection(host, HostKeyStore(tmp_path / "known_hosts"))


def test_a_session_cut_without_eof_or_exit_status_is_a_lost_connection(tmp_path: Path, readable_fd: int) -> None:
    """Before: returned a result with no exit status and the partial output."""
    channel = CutChannel(readable_fd, b"@@gpuwatch-probe 1 0123\n")
    with pytest.raises(paramiko.SSHException, match="the connection to gpu-08 was lost during the probe"):
        connection(tmp_path)._exec(StillActive(channel), "true", 5.0, _far(), 0.0)  # type: ignore[arg-type]


def test_a_session_the_host_ended_without_exit_status_is_still_its_result(tmp_path: Path, readable_fd: int) -> None:
    """The host closed its side (EOF) and sent no exit status (the shell was killed by a signal):
    what it printed is read as it is, as before."""
    channel = CutChannel(readable_fd, b"some output\n", eof_received=True)
    result = connection(tmp_path)._exec(StillActive(channel), "true", 5.0, _far(), 0.0)  # type: ignore[arg-type]
    assert result.exit_status is None and result.stdout == "some output\n"


def _far() -> float:
    return time.monotonic() + 5.0
