"""Finding the processes one test started (on this machine or on the loopback fleet's hosts, which
are this machine): each test marks them with a unique ``sleep`` argument; and starting and stopping
a real ``gpuwatch run`` daemon process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

from waiting import wait_for


def new_marker() -> str:
    """A unique ``sleep`` duration (over ten minutes, with random decimals) to find processes by."""
    return f"{600 + uuid.uuid4().int % 300}.{uuid.uuid4().int % 10**9:09d}"


def marked(marker: str) -> list[int]:
    """Live processes whose command line holds ``marker`` (a zombie's command line is empty)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cmdline = Path(entry.path, "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline:
            found.append(int(entry.name))
    return found


def kill_marked(marker: str) -> None:
    for pid in marked(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start_run(config: Path) -> subprocess.Popen[bytes]:
    """``gpuwatch run -c config`` as a real process, its stderr kept for ``stop_run``."""
    return subprocess.Popen(
        [sys.executable, "-m", "gpuwatch", "run", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=os.environ.copy(),
    )


def stop_run(proc: subprocess.Popen[bytes], timeout: float = 20) -> str:
    """SIGTERM to a ``start_run`` daemon (if still running); asserts it exits 0; returns its stderr."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err.decode()
    return err.decode()


def start_web_run(config: Path, *args: str, who: str = "the daemon") -> tuple[subprocess.Popen[bytes], str, Path]:
    """``gpuwatch run [args] -c config`` as a real process, its stderr in ``daemon.stderr`` next to the
    config; returns (process, page URL, log path) once it says where its web page is (the process
    is killed if it never does)."""
    log = config.parent / "daemon.stderr"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpuwatch", "run", *args, "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    found: list[str] = []

    def announced() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the daemon exited with {proc.returncode}: {log.read_text()}")
        found[:] = re.findall(r"web page at (http://\S+)", log.read_text())
        return bool(found)

    try:
        wait_for(announced, 30, f"{who} to say where its page is")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, found[0], log
