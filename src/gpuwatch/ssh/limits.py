"""How many open files a fleet needs, and the process limit on them (``RLIMIT_NOFILE``).

Each SSH host holds one socket for its persistent connection, plus a pipe (two descriptors) while
a probe reads its channel (paramiko's ``Channel.fileno``); a host behind a ProxyJump holds its own
connection to the jump host too. The daemon also keeps its log, the state database, the web
server and the sends in flight open. The soft limit is often 1,024 while the hard limit is far
higher: :func:`fit_open_files` raises the soft limit to the hard one, and refuses to start, in
one line that says how to raise the limit, a fleet that still cannot fit.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

from gpuwatch.config import ConfigError, HostConfig

try:
    import resource
except ImportError:  # not POSIX: no limit to raise or read
    resource = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

# Per host: the connection's socket, and the pipe (2 descriptors) of the probe reading its channel.
FDS_PER_HOST = 3
# A host behind a ProxyJump also holds its own connection to the jump host.
FDS_PER_JUMP = 1
# Everything else: Python itself, the log files, the state database, the web server and its
# clients, the notification channels' connections, a margin.
FDS_BASE = 128


class OpenFilesLimitError(ConfigError):
    """The fleet needs more open files than this process may have (exit 2, said in one line)."""


def fds_needed(hosts: Iterable[HostConfig]) -> int:
    """File descriptors the daemon needs for ``hosts`` at most (every host mid-probe at once)."""
    total = FDS_BASE
    for host in hosts:
        if host.local:
            continue
        total += FDS_PER_HOST + (FDS_PER_JUMP if host.ssh.proxy_jump else 0)
    return total


def raise_open_files_limit() -> tuple[int, int] | None:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; the (soft, hard) limits after it (None
    where the limit cannot be read). A limit that cannot be raised is left as it was."""
    if resource is None:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and (soft == resource.RLIM_INFINITY or soft >= hard):
        return soft, hard
    # macOS refuses RLIM_INFINITY for this limit: aim at a finite value there
    wanted = hard if hard != resource.RLIM_INFINITY or sys.platform != "darwin" else 10_240
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError) as exc:
        log.warning("could not raise the open files limit from %d to %d: %s", soft, wanted, exc)
        return soft, hard
    if wanted != soft:
        log.info("open files limit raised from %d to %d", soft, wanted)
    return wanted, hard


def fit_open_files(hosts: Iterable[HostConfig]) -> int:
    """Raise the open files limit as far as it goes and check that ``hosts`` fit under it; the
    descriptors needed. Raises :class:`OpenFilesLimitError` when they do not."""
    hosts = list(hosts)
    needed = fds_needed(hosts)
    limits = raise_open_files_limit()
    if limits is None:
        return needed
    soft, hard = limits
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return needed
    target = max(needed, 4096)
    raise OpenFilesLimitError(
        f"{len(hosts)} hosts need up to {needed} open files, but this process may open only {soft} "
        f"(ulimit -n; hard limit {'unlimited' if hard == resource.RLIM_INFINITY else hard}): raise it, "
        f"e.g. LimitNOFILE={target} in the systemd unit, or 'ulimit -Hn {target}; ulimit -n {target}' "
        "as root before starting gpuwatch"
    )
