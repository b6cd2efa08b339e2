"""Discovery: host lists from where clusters already keep them (``hosts_from:``).

- ``hostlist``: pure text -> host names (Slurm host lists such as ``gpu[01-04,07]`` expanded);
- ``sshconfig``, ``files``, ``command``, ``consul``: one module per source, each a pure reader of
  what the source says and a small class that asks it (its I/O passed in: a runner, an HTTP session);
- ``merge``: pure, the one function that makes the polled host list (:func:`merge_hosts`), and the
  grace a host that left its source keeps;
- ``watcher``: :class:`Discovery`, the sources at work, each with its last good list and its health.

The sources are built by the CLI's wiring (``cli.wiring.build_discovery``); the daemon follows
:class:`Discovery` and hands the merged list to the poller (``Poller.reload``).
"""

from __future__ import annotations

from .base import RETRY_SECONDS, DiscoveredHost, DiscoveryError, Source
from .command import CommandSource
from .consul import ConsulSource, hosts_in_catalog
from .files import FileSource
from .hostlist import HostListError, expand_hostlist, names_from_text
from .merge import merge_hosts, merged
from .sshconfig import SshConfigSource, hosts_in_ssh_config
from .watcher import Discovery

__all__ = [
    "RETRY_SECONDS",
    "CommandSource",
    "ConsulSource",
    "DiscoveredHost",
    "Discovery",
    "DiscoveryError",
    "FileSource",
    "HostListError",
    "Source",
    "SshConfigSource",
    "expand_hostlist",
    "hosts_in_catalog",
    "hosts_in_ssh_config",
    "merge_hosts",
    "merged",
    "names_from_text",
]
