"""Shards: N daemons split one fleet, read from one shared config, without talking to each other.

``--shard K/N`` (or ``shard: 'K/N'`` in the config; the flag wins) makes a daemon poll only the hosts
whose *stable* hash falls in shard K: the first 8 bytes of the SHA-256 of the host's name (as in
the config), as a big-endian number, modulo N, plus 1. The same name lands in the same shard on
every machine, in every Python process and version (Python's own ``hash()`` of a string changes
with every process, so it would not do). ``1/1`` is the whole fleet.

:func:`in_shard` is the one place a host list is cut to a shard: it runs after the host list is
known (the configured one today, a discovered one where hosts come from a source), so any list can
go through it. Nothing here reads a file or the network.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol, TypeVar

from .values import ConfigError

if TYPE_CHECKING:  # records imports this module: the names are for annotations only
    from .records import Config

MAX_SHARDS = 1000
_SHARD_RE = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


class Named(Protocol):
    @property
    def name(self) -> str: ...


N = TypeVar("N", bound=Named)


def shard_number(name: str, count: int) -> int:
    """The shard (1..``count``) that holds the host called ``name``: stable across machines and runs."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count + 1


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (both from 1): ``Shard(1, 2)`` is ``1/2``."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def holds(self, name: str) -> bool:
        """Is the host called ``name`` polled by this shard?"""
        return shard_number(name, self.count) == self.index

    def select(self, hosts: Iterable[N]) -> tuple[N, ...]:
        """The hosts of ``hosts`` this shard polls, in their order."""
        return tuple(h for h in hosts if self.holds(h.name))


def parse_shard(value: object, path: str = "shard") -> Shard:
    """``'1/2'`` -> ``Shard(1, 2)``. A ConfigError naming ``path`` for anything else: ``0/2`` and
    ``3/2`` (K runs from 1 to N), ``a/b``, ``2`` (both numbers are needed)."""
    text = str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else None
    match = _SHARD_RE.fullmatch(text) if text is not None else None
    example = "e.g. 1/2 for the first of two shards"
    if match is None:
        shown = repr(value) if text is None else repr(text[:40])
        raise ConfigError(f"{path}: {shown} is not a shard K/N ({example})")
    index, count = int(match[1]), int(match[2])
    if not 1 <= count <= MAX_SHARDS:
        raise ConfigError(f"{path}: {index}/{count}: the number of shards N must be 1 to {MAX_SHARDS} ({example})")
    if not 1 <= index <= count:
        raise ConfigError(f"{path}: {index}/{count}: the shard K must be 1 to {count}, the number of shards")
    return Shard(index, count)


def in_shard(config: Config, shard: Shard | None) -> Config:
    """``config`` with only the hosts ``shard`` polls (``shard`` None: the config's own ``shard:``,
    else the whole fleet, unchanged). The full list stays in ``all_hosts`` (for ``check``'s count and
    the names of settings, ``hosts[7].key_file``); cutting an already cut config starts again from it."""
    chosen = shard or config.shard
    if chosen is None:
        return config
    every = config.all_hosts or config.hosts
    return replace(config, hosts=chosen.select(every), shard=chosen, all_hosts=every)


def shard_doc(config: Config) -> dict[str, object] | None:
    """The shard for programs (``status --json``, ``/api/v1/snapshot``): ``{"shard": "1/2",
    "hosts": 4, "of": 9}``; None when the daemon polls the whole fleet."""
    if config.shard is None:
        return None
    return {"shard": str(config.shard), "hosts": len(config.hosts), "of": len(config.all_hosts or config.hosts)}


def with_shard(document: dict[str, object], config: Config) -> dict[str, object]:
    """``document`` (a snapshot for programs) with ``"shard"`` (:func:`shard_doc`) when the daemon polls
    a shard; the whole fleet's document is left as it is."""
    doc = shard_doc(config)
    return document if doc is None else {**document, "shard": doc}


def shard_words(config: Config) -> str:
    """``shard 1/2: 4 of 9 hosts`` (``check``, ``status``, the log); "" for the whole fleet."""
    if config.shard is None:
        return ""
    every = len(config.all_hosts or config.hosts)
    return f"shard {config.shard}: {len(config.hosts)} of {every} host{'s' if every != 1 else ''}"
