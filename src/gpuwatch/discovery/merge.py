"""The one host list gpuwatch polls, pure: the explicit ``hosts:`` and every source's, merged.

:func:`merge_hosts` is the only place the list is made; :func:`merged` then cuts it to the config's
shard (``shard: K/N``), so discovered hosts are split between shards like configured ones.

Order: the explicit hosts as the config lists them, then each source's hosts in
``hosts_from:`` order, each in the source's own order. A name is polled once: an explicit entry wins
over any source, an earlier source over a later one. A discovered host gets the ``ssh:`` defaults,
then what its source knows of it (ssh_config's ``HostName``, ``Port``, ``User``; Consul's address),
then, winning over both, the settings of every ``hosts:`` entry with ``match:`` whose pattern
(fnmatch) its name matches (the first entry that sets a key wins for that key).

:func:`track` and :func:`expire` keep a source's members with the time each went missing, so a host
that left its source is still polled for the source's ``grace`` and dropped after it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from ..config import Config, HostConfig
from .base import DiscoveredHost


@dataclass(frozen=True)
class Member:
    """A host of one source: as last given, and since when it has been missing (None: it is there)."""

    host: DiscoveredHost
    missing_since: float | None = None


def track(members: Mapping[str, Member], fetched: Sequence[DiscoveredHost], now: float) -> dict[str, Member]:
    """A source's members after a good fetch at ``now``: the hosts given, and those missing from it
    since their first fetch without them (still there until :func:`expire`)."""
    out = {host.name: Member(host) for host in fetched}
    for name, member in members.items():
        if name not in out:
            out[name] = member if member.missing_since is not None else replace(member, missing_since=now)
    return out


def expire(members: Mapping[str, Member], now: float, grace: float) -> dict[str, Member]:
    """Without the members missing for ``grace`` seconds or more."""
    return {n: m for n, m in members.items() if m.missing_since is None or now - m.missing_since < grace}


def next_expiry(members: Mapping[str, Member], grace: float) -> float | None:
    """When the first missing member is due to be dropped (None: none is missing)."""
    times = [m.missing_since + grace for m in members.values() if m.missing_since is not None]
    return min(times) if times else None


def discovered_host(config: Config, found: DiscoveredHost, label: str) -> HostConfig:
    """One discovered host as the poller takes it (settings merged as the module says)."""
    values: dict[str, object] = {}
    for entry in config.host_patterns:
        if fnmatch.fnmatchcase(found.name, entry.pattern):
            for key, value in entry.overrides.items():
                values.setdefault(key, value)
    if found.port is not None:
        values.setdefault("port", found.port)
    if found.user:
        values.setdefault("user", found.user)
    return HostConfig(
        name=found.name,
        address=found.address,
        ssh=replace(config.ssh, **values),  # type: ignore[arg-type]
        explicit=frozenset(values),
        source=label,
    )


def merge_hosts(config: Config, discovered: Mapping[str, Sequence[DiscoveredHost]]) -> tuple[HostConfig, ...]:
    """The hosts to poll: ``config.hosts`` (the explicit ones), then each source's in ``hosts_from``
    order (``discovered``: source label -> its current hosts; a source not in it gives none)."""
    hosts = [h for h in config.hosts if h.source == "hosts"]
    seen = {h.name for h in hosts}
    for source in config.hosts_from:
        for found in discovered.get(source.label, ()):
            if found.name not in seen:
                seen.add(found.name)
                hosts.append(discovered_host(config, found, source.label))
    return tuple(hosts)


def merged(config: Config, discovered: Mapping[str, Sequence[DiscoveredHost]]) -> Config:
    """``config`` with the hosts to poll: :func:`merge_hosts` over the whole fleet, then, with a shard,
    only the shard's (``all_hosts`` keeps the whole merged list, for ``check``'s count)."""
    whole = replace(config, hosts=config.all_hosts or config.hosts, all_hosts=())
    hosts = merge_hosts(whole, discovered)
    if config.shard is None:
        return replace(config, hosts=hosts)
    return replace(config, hosts=config.shard.select(hosts), all_hosts=hosts)
