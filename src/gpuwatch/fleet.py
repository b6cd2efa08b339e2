"""The one fleet state every reader shares: the latest result of each host, with its age.

Hosts are polled on their own clocks (``poll.Poller.start``) and each result is handed to
:meth:`FleetState.update` as it arrives. Readers (reports, alert rules, ``status``, the web page
and ``/metrics``) call :meth:`FleetState.snapshot` and get an immutable
:class:`~gpuwatch.model.FleetSnapshot`; no reader ever causes a poll. A host whose latest result
is older than ``STALE_AFTER_POLLS`` poll intervals comes back marked ``stale``: shown with its
age, never as current and never as free.

It also remembers what one result cannot say: when each host last answered, since when it has been
failing, how many of its probes failed, by kind (``/metrics`` reads these; a scrape never polls), and
how many GPUs it had when it last answered (the page counts a down host's GPUs as unknown, not gone).

Thread-safe; no I/O; the clock is a parameter.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import replace
from datetime import datetime, timezone

from .model import FleetSnapshot, HostErrorKind, HostSnapshot

STALE_AFTER_POLLS = 3


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def not_polled_yet(name: str, address: str) -> HostSnapshot:
    """The placeholder of a host gpuwatch has not heard from yet (just started or just added)."""
    return HostSnapshot.failed(name, address, HostErrorKind.BUSY, "not polled yet: its first probe is under way")


class FleetState:
    """The latest :class:`HostSnapshot` per configured host, in config order."""

    def __init__(
        self,
        hosts: Iterable[tuple[str, str]],
        poll_every: float,
        now: Callable[[], datetime] = utcnow,
    ) -> None:
        """``hosts``: (name, display address) in config order; ``poll_every`` in seconds."""
        self._lock = threading.Lock()
        self._now = now
        self._poll_every = poll_every
        self._order: list[str] = []
        self._latest: dict[str, HostSnapshot] = {}
        self._version = 0
        self._last_ok: dict[str, datetime] = {}
        self._failing_since: dict[str, datetime] = {}
        self._errors: dict[str, Counter[str]] = {}
        self._gpu_counts: dict[str, int] = {}
        self.set_hosts(hosts, poll_every)

    @property
    def stale_after_seconds(self) -> float:
        return STALE_AFTER_POLLS * self._poll_every

    @property
    def poll_every(self) -> float:
        return self._poll_every

    def set_hosts(self, hosts: Iterable[tuple[str, str]], poll_every: float | None = None) -> list[str]:
        """Follow a new config: keep the results of hosts still configured, forget removed ones,
        add placeholders for new ones. Returns the names removed."""
        pairs = list(hosts)
        with self._lock:
            if poll_every is not None:
                self._poll_every = poll_every
            names = [name for name, _ in pairs]
            removed = [name for name in self._order if name not in names]
            for name in removed:
                self._latest.pop(name, None)
                self._last_ok.pop(name, None)
                self._failing_since.pop(name, None)
                self._errors.pop(name, None)
                self._gpu_counts.pop(name, None)
            for name, address in pairs:
                if name not in self._latest:
                    self._latest[name] = not_polled_yet(name, address)
            self._order = names
            self._version += 1
            return removed

    def update(self, host: HostSnapshot) -> None:
        """Record a host's newest result (stamped now unless it carries its own time). A result
        for a host no longer configured (it finished after a reload removed it) is dropped."""
        if host.taken_at is None:
            host = replace(host, taken_at=self._now())
        with self._lock:
            if host.name not in self._latest:
                return
            assert host.taken_at is not None
            if host.ok:
                self._last_ok[host.name] = host.taken_at
                self._gpu_counts[host.name] = len(host.gpus)
                self._failing_since.pop(host.name, None)
            else:
                self._failing_since.setdefault(host.name, host.taken_at)
                self._errors.setdefault(host.name, Counter())[host.error_name] += 1
            # kept as readers see it (when it last answered, since when it fails), so that a
            # snapshot copies a host only when its staleness changes: building one stays cheap
            # however many hosts there are (it is built for every batch of results)
            last_ok, failing = self._last_ok.get(host.name), self._failing_since.get(host.name)
            if (host.last_ok_at, host.failing_since) != (last_ok, failing):
                host = replace(host, last_ok_at=last_ok, failing_since=failing)
            self._latest[host.name] = host
            self._version += 1

    @property
    def version(self) -> int:
        """Grows with every update: a cheap way for a reader to see that something changed."""
        with self._lock:
            return self._version

    def probe_errors(self) -> dict[tuple[str, str], int]:
        """Failed probes since start (or since the host was added), by (host, error kind)."""
        with self._lock:
            return {(name, kind): n for name, kinds in self._errors.items() for kind, n in kinds.items()}

    def last_gpu_counts(self) -> dict[str, int]:
        """How many GPUs each host had when it last answered (hosts that never answered: absent)."""
        with self._lock:
            return dict(self._gpu_counts)

    def get(self, name: str) -> HostSnapshot | None:
        with self._lock:
            return self._latest.get(name)

    def snapshot(self) -> FleetSnapshot:
        """Every configured host's latest result as of now, stale ones marked."""
        now = self._now()
        limit = self.stale_after_seconds
        with self._lock:
            hosts = [
                (self._latest[name], self._last_ok.get(name), self._failing_since.get(name)) for name in self._order
            ]
        marked = []
        for host, last_ok, failing in hosts:
            age = host.age_seconds(now)
            stale = age is not None and age > limit
            if (stale, last_ok, failing) != (host.stale, host.last_ok_at, host.failing_since):
                host = replace(host, stale=stale, last_ok_at=last_ok, failing_since=failing)
            marked.append(host)
        return FleetSnapshot(taken_at=now, hosts=tuple(marked))
