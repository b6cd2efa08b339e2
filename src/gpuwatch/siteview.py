"""The whole site on one shard's page: the other shards' hosts, as plain records (pure).

:mod:`gpuwatch.web` gives :func:`site_view` what :class:`~gpuwatch.peers.PeerWatcher` keeps (each
peer's last ``/api/v1/snapshot`` document and whether it answers now) and renders the result below
the shard's own hosts. Nothing here reads a clock, a file or the network: ``now`` is a parameter.

Conventions: a peer that does not answer now is *unreachable*, with since when and why; the hosts
of its last answer are listed as *not answering* (never dropped, never counted free); a peer never
heard from is *waiting* (just after start) or *unreachable* (after its first failed try). A peer
that reports this daemon's own shard is this daemon (one shared config lists every shard) and is
left out. What a peer's document holds is data from another machine: read defensively, a field
missing or of the wrong type counts as unknown.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .text import format_duration, local_time, plural

NOT_ANSWERING = "not answering"
OWNER_UNKNOWN = "owner unknown"  # as the page's people panel says it


@dataclass(frozen=True)
class PeerAnswer:
    """What is known of one peer: its last good snapshot document and whether it answers now."""

    url: str  # the peer's page, as configured (no trailing /)
    document: Mapping[str, Any] | None = None  # its last good /api/v1/snapshot (None: never answered)
    answered_at: float | None = None  # when that answer came (Unix time)
    failing_since: float | None = None  # since when it does not answer (None: it answers, or not asked yet)
    error: str = ""  # why the last try failed
    tried: bool = False

    @property
    def answering(self) -> bool:
        return self.tried and self.failing_since is None


@dataclass(frozen=True)
class PeerHostView:
    name: str
    state: str  # ok | down | stale | not-answering
    words: str  # "3 of 4 GPUs free", "down: unreachable", "not answering: its shard is unreachable"
    gpus: int
    free: int
    people: str  # "alice 2, bob 1, owner unknown 1" (GPUs per person)


@dataclass(frozen=True)
class PeerView:
    url: str
    title: str  # "shard 2/2" or the URL when the peer is not sharded
    state: str  # ok | unreachable | waiting
    words: str  # "answering; 4 hosts" / "not answering for 3m (since 10:02): connection refused; ..."
    since_ts: float | None
    hosts: tuple[PeerHostView, ...]


@dataclass(frozen=True)
class SiteView:
    peers: tuple[PeerView, ...]
    own: str  # "this page: shard 1/3" ("" when this daemon is not a shard)
    summary: str  # "Whole site: 3 shards, 9 hosts, 20 GPUs with current data, 12 free; shard 2/3 not answering (...)"


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _shard_of(doc: Mapping[str, Any] | None) -> str | None:
    if doc is None:
        return None
    shard = doc.get("shard")
    return str(shard.get("shard")) if isinstance(shard, Mapping) and shard.get("shard") else None


def _people(host: Mapping[str, Any]) -> str:
    """GPUs per person on the host, most first: "alice 2, bob 1"."""
    gpus_of: dict[str, set[int]] = {}
    for proc in host.get("processes") or ():
        if not isinstance(proc, Mapping):
            continue
        who = proc.get("owner") or proc.get("user") or OWNER_UNKNOWN
        gpus_of.setdefault(str(who), set()).add(_int(proc.get("gpu_index")))
    # processes ps could not see come last, named as the page names them
    ranked = sorted(gpus_of.items(), key=lambda kv: (kv[0] == OWNER_UNKNOWN, -len(kv[1]), kv[0]))
    return ", ".join(f"{who} {len(gpus)}" for who, gpus in ranked)


def host_view(host: Mapping[str, Any], answering: bool) -> PeerHostView:
    """One host of a peer's document; ``answering``: whether the peer answers now."""
    name = str(host.get("name") or "?")
    gpus = [g for g in host.get("gpus") or () if isinstance(g, Mapping)]
    free = sum(1 for g in gpus if g.get("free") is True)
    if not answering:
        return PeerHostView(name, "not-answering", f"{NOT_ANSWERING}: its shard is unreachable", len(gpus), 0, "")
    if host.get("ok") is not True:
        kind = str(host.get("error_kind") or "unknown")
        return PeerHostView(name, "down", f"down: {kind}", len(gpus), 0, "")
    if host.get("stale") is True:
        return PeerHostView(name, "stale", "stale: no new answer for 3 polls", len(gpus), 0, "")
    return PeerHostView(name, "ok", f"{free} of {plural(len(gpus), 'GPU')} free", len(gpus), free, _people(host))


def peer_view(answer: PeerAnswer, now: float, started_at: float) -> PeerView:
    doc = answer.document
    shard = _shard_of(doc)
    title = f"shard {shard}" if shard else answer.url
    hosts_doc = [h for h in (doc or {}).get("hosts") or () if isinstance(h, Mapping)]
    hosts = tuple(host_view(h, answer.answering) for h in hosts_doc)
    if answer.answering:
        return PeerView(answer.url, title, "ok", f"answering; {plural(len(hosts), 'host')}", None, hosts)
    if not answer.tried:
        waited = format_duration(max(0.0, now - started_at))
        return PeerView(answer.url, title, "waiting", f"not asked yet ({waited} since start)", None, hosts)
    since = answer.failing_since if answer.failing_since is not None else now
    last = (
        f"; its hosts as of its last answer at {local_time(answer.answered_at)}"
        if answer.answered_at is not None
        else "; it never answered, so its hosts are not known"
    )
    for_how_long = format_duration(max(0.0, now - since))
    words = f"not answering for {for_how_long} (since {local_time(since)}): {answer.error}{last}"
    return PeerView(answer.url, title, "unreachable", words, since, hosts)


def site_view(
    answers: Sequence[PeerAnswer],
    own_shard: str | None,
    own_hosts: Sequence[str],
    own_gpus: int,
    own_free: int,
    now: float,
    started_at: float,
) -> SiteView | None:
    """The other shards, and the whole site in one line (this shard's ``own_*`` counted in); None
    without peers."""
    if not answers:
        return None
    own = set(own_hosts)
    peers = []
    for answer in answers:
        shard = _shard_of(answer.document)
        names = {str(h.get("name")) for h in (answer.document or {}).get("hosts") or () if isinstance(h, Mapping)}
        same = shard == own_shard if own_shard is not None else (shard is None and names == own)
        if answer.document is not None and same:
            continue  # this daemon itself
        peers.append(peer_view(answer, now, started_at))
    hosts = len(own) + sum(len(p.hosts) for p in peers)
    gpus = own_gpus + sum(h.gpus for p in peers for h in p.hosts if h.state == "ok")
    free = own_free + sum(h.free for p in peers for h in p.hosts)
    shards = 1 + len(peers)
    parts = [
        f"Whole site: {plural(shards, 'shard')}, {plural(hosts, 'host')}, {plural(gpus, 'GPU')} with current data, "
        f"{free} free"
    ]
    for p in peers:
        if p.state == "unreachable":
            unknown = sum(h.gpus for h in p.hosts)
            parts.append(
                f"{p.title} not answering ({plural(len(p.hosts), 'host')}, {plural(unknown, 'GPU')} not known now)"
            )
    own_words = f"this page: shard {own_shard}" if own_shard else ""
    return SiteView(tuple(peers), own_words, "; ".join(parts))
