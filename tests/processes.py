"""Finding the processes one test started (on this machine or on the loopback fleet's hosts, which
are this machine): each test marks them with a unique ``sleep`` argument."""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path


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
