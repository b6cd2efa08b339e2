"""The discovery sources at work: each on its own thread, its last good list kept, its health known.

:class:`Discovery` owns one thread per source (a fetch, then the source's own wait: ``refresh``, a
file's change, a Consul blocking query) and, per source, its members (:func:`.merge.track`) and its
:class:`~gpuwatch.model.SourceHealth`. A failed fetch changes nothing but the health: the source's
last good list stays in use, said in the log (once when it starts failing, once when it works
again). :attr:`Discovery.version` grows with every change to the lists or the health, so the daemon
knows when to merge again; :meth:`Discovery.prune` drops the members whose grace has passed. The
clock is a parameter; nothing here builds a source (the CLI's wiring does).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from ..model import SourceHealth
from ..text import plural
from .base import DiscoveredHost, DiscoveryError, Source
from .merge import Member, expire, next_expiry, track

log = logging.getLogger(__name__)


class Discovery:
    """Every ``hosts_from:`` source, its members and its health. Thread-safe."""

    def __init__(self, sources: Sequence[Source], clock: Callable[[], float] = time.time) -> None:
        self.sources = list(sources)
        self.clock = clock
        self._lock = threading.Lock()
        self._members: dict[str, dict[str, Member]] = {s.spec.label: {} for s in self.sources}
        self._health = {s.spec.label: SourceHealth(s.spec.label, ok=False, error="not asked yet") for s in self.sources}
        self._version = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._on_change: Callable[[], None] = lambda: None

    @property
    def version(self) -> int:
        with self._lock:
            return self._version

    def health(self) -> dict[str, SourceHealth]:
        with self._lock:
            return dict(self._health)

    def lists(self) -> dict[str, tuple[DiscoveredHost, ...]]:
        """Each source's hosts now: its last good list and the hosts still in their grace."""
        with self._lock:
            return {label: tuple(m.host for m in members.values()) for label, members in self._members.items()}

    def leaving(self) -> dict[str, str]:
        """The hosts that left their source and are polled until their grace ends: name -> source label."""
        with self._lock:
            return {n: label for label, ms in self._members.items() for n, m in ms.items() if m.missing_since}

    def refresh(self, source: Source) -> bool:
        """Ask ``source`` once and record the answer; True when it worked."""
        label = source.spec.label
        try:
            hosts = source.fetch()
        except DiscoveryError as exc:
            self._failed(label, str(exc))
            return False
        except Exception as exc:  # a bug must cost this source its refresh, not the daemon
            log.exception("discovery: %s: unexpected error", label)
            self._failed(label, f"internal error: {type(exc).__name__}: {exc}")
            return False
        now = self.clock()
        with self._lock:
            before = self._members[label]
            self._members[label] = track(before, hosts, now)
            was = self._health[label]
            self._health[label] = SourceHealth(label, ok=True, hosts=len(hosts), last_ok_at=now)
            self._version += 1
        if not was.ok and was.failing_since is not None:
            log.warning("discovery: %s works again: %s", label, plural(len(hosts), "host"))
        elif set(before) != {h.name for h in hosts}:
            log.info("discovery: %s: %s", label, plural(len(hosts), "host"))
        return True

    def _failed(self, label: str, error: str) -> None:
        now = self.clock()
        with self._lock:
            was = self._health[label]
            kept = len(self._members[label])
            since = was.failing_since if not was.ok and was.failing_since is not None else now
            self._health[label] = SourceHealth(label, False, error, since, kept, was.last_ok_at)
            self._version += 1
        if was.ok or was.failing_since is None or was.error != error:
            log.warning("discovery: %s failed: %s; keeping its last good list (%s)", label, error, plural(kept, "host"))

    def refresh_all(self) -> None:
        """Ask every source once, in parallel, and wait for all (each is bounded by its timeout)."""
        threads = [threading.Thread(target=self.refresh, args=(s,), daemon=True) for s in self.sources]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def prune(self) -> None:
        """Drop the members whose grace has passed (the version grows when any was)."""
        now = self.clock()
        with self._lock:
            for source in self.sources:
                label = source.spec.label
                due = next_expiry(self._members[label], source.spec.grace)
                if due is not None and due <= now:
                    self._members[label] = expire(self._members[label], now, source.spec.grace)
                    self._version += 1

    # -- the daemon: each source on its own thread

    def start(self, on_change: Callable[[], None]) -> None:
        """Follow every source on its own thread; ``on_change`` (from that thread) after each refresh."""
        self._on_change = on_change
        for source in self.sources:
            thread = threading.Thread(
                target=self._loop, args=(source,), name=f"discovery-{source.spec.kind}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def _loop(self, source: Source) -> None:
        ok = self.health()[source.spec.label].ok
        while not self._stop.is_set():
            source.wait(self._stop, ok)
            if self._stop.is_set():
                break
            ok = self.refresh(source)
            try:
                self._on_change()
            except Exception:
                log.exception("discovery: handling a refresh of %s failed", source.spec.label)

    def close(self) -> None:
        """Stop the threads (a Consul query in flight ends by its timeout) and close the sources."""
        self._stop.set()
        for source in self.sources:
            try:
                source.close()
            except Exception:  # closing one must not keep the others open
                log.debug("closing %s failed", source.spec.label, exc_info=True)
