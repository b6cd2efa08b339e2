"""What every discovery source gives and how it fails: :class:`DiscoveredHost`, :class:`DiscoveryError`."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol

from ..config import DiscoverySource


@dataclass(frozen=True)
class DiscoveredHost:
    """A host a source named, with what the source knows of where to reach it (None: not said)."""

    name: str
    address: str | None = None  # ssh_config's HostName, Consul's service or node address
    port: int | None = None  # ssh_config's Port
    user: str | None = None  # ssh_config's User


class DiscoveryError(Exception):
    """A source could not give its list this time; the message says what and where, for people
    (never a secret), after the source's label (which it does not repeat). The source's last good
    list stays in use."""


class Source(Protocol):
    """One ``hosts_from:`` entry at work: asked for its list, then waited on until it should be asked again."""

    spec: DiscoverySource

    def fetch(self) -> tuple[DiscoveredHost, ...]:
        """The source's hosts now; raises DiscoveryError. Bounded in time (its ``timeout``)."""
        ...

    def wait(self, stop: threading.Event, ok: bool) -> None:
        """Return when the next fetch is due (``ok``: whether the last one worked), or ``stop`` is set."""
        ...

    def close(self) -> None: ...


#: After a failed fetch, a source is asked again after at most this long (its refresh if shorter).
RETRY_SECONDS = 30.0


def wait_refresh(spec: DiscoverySource, stop: threading.Event, ok: bool) -> None:
    """The plain schedule: ``refresh`` after a good fetch, ``min(refresh, RETRY_SECONDS)`` after a failed one."""
    stop.wait(spec.refresh if ok else min(spec.refresh, RETRY_SECONDS))
