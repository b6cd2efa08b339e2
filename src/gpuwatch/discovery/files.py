"""``file: hosts.txt``: one host per line (``#`` comments, Slurm host lists expanded), re-read when it changes.

The file is looked at every :data:`LOOK_SECONDS` (its modification time, size and inode: an editor
that writes a new file and renames it is seen too) and read again when any of them changed, and in
any case every ``refresh``.
"""

from __future__ import annotations

import os
import threading
import time

from ..config import DiscoverySource
from .base import RETRY_SECONDS, DiscoveredHost, DiscoveryError
from .hostlist import HostListError, names_from_text
from .sshconfig import read_text

LOOK_SECONDS = 1.0

Signature = tuple[int, int, int]


def signature(path: str) -> Signature | None:
    """What tells that a file changed: (mtime in ns, size, inode); None when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def hosts_in_text(text: str) -> tuple[DiscoveredHost, ...]:
    """A hosts file's text -> its hosts (HostListError naming the line of a bad entry)."""
    return tuple(DiscoveredHost(name) for name in names_from_text(text))


class FileSource:
    """The ``file`` source."""

    def __init__(self, spec: DiscoverySource) -> None:
        self.spec = spec
        self.path = spec.path or ""
        self._read_as: Signature | None = None

    def fetch(self) -> tuple[DiscoveredHost, ...]:
        before = signature(self.path)
        text = read_text(self.path)
        self._read_as = before
        try:
            return hosts_in_text(text)
        except HostListError as exc:
            raise DiscoveryError(f"{self.path}: {exc}") from None

    def wait(self, stop: threading.Event, ok: bool) -> None:
        """Until ``refresh`` passed (a failed read: at most RETRY_SECONDS) or the file changed."""
        deadline = time.monotonic() + (self.spec.refresh if ok else min(self.spec.refresh, RETRY_SECONDS))
        while not stop.wait(max(0.0, min(LOOK_SECONDS, deadline - time.monotonic()))):
            if time.monotonic() >= deadline or signature(self.path) != self._read_as:
                return

    def close(self) -> None:
        pass
