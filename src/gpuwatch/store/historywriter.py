"""The history's writer thread: each host's result in, one transaction every few seconds out.

:class:`HistoryWriter` takes a host's result from the thread that polled it (cheap: a sample is
made and queued), and a thread of its own writes the queue to the history file
(:class:`~.history.HistoryStore`) :data:`FLUSH_SECONDS` after the first poll of a batch came in,
then rolls up (when a 5-minute boundary has passed since the last rollup, or a poll landed in a
bucket that could be rolled up already) and, once an hour, deletes what has aged out. With
nothing queued and nothing due, the thread sleeps (at most :data:`IDLE_SECONDS`). Nothing it does
raises into the poller or the daemon: a failure is logged once per kind and that batch is
dropped; a corrupt history file is moved aside.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..model import HostErrorKind, HostSnapshot
from ..usage import MAX_GAP_POLLS, GpuReading, HostSample, readings_of, stands_for
from .history import (
    FIVE_MINUTES,
    HOUR,
    ROLLUP_GRACE_SECONDS,
    CorruptHistory,
    HistoryError,
    HistorySettings,
    HistoryStore,
    connect,
    history_path,
    rollup_horizon,
)

log = logging.getLogger(__name__)

#: The writer commits what it gathered once per this many seconds.
FLUSH_SECONDS = 2.0
#: At most this many polls wait for the writer; beyond, the oldest are dropped (said in the log).
MAX_QUEUED = 20000
#: With nothing queued, the writer looks at the (wall) clock at least this often, for a rollup due.
IDLE_SECONDS = 60.0
#: The most buckets one rollup pass rolls up (:meth:`~.history.HistoryStore.rollup`'s ``limit``).
ROLLUP_LIMIT = 10_000


class HistoryWriter:
    """Takes each host's result (:meth:`record`, from any thread, cheap) and writes them from a
    thread of its own, one transaction per :data:`FLUSH_SECONDS` at most, then rolls up and deletes
    what has aged out (each only when due). A failure (full disk, locked or corrupt file) is
    logged once per kind and the samples of that batch are dropped; nothing it does raises into
    the caller."""

    def __init__(
        self,
        state_dir: Path,
        settings: HistorySettings,
        poll_every: float,
        *,
        clock: Callable[[], float] = time.time,
        flush_every: float | None = None,
    ) -> None:
        self.path = history_path(state_dir)
        self.settings = settings
        self.poll_every = poll_every
        self.clock = clock
        self.flush_every = FLUSH_SECONDS if flush_every is None else flush_every
        self._queue: queue.Queue[HostSample] = queue.Queue(MAX_QUEUED)
        self._store: HistoryStore | None = None
        self._last: dict[str, float] = {}
        self._gpus: dict[str, tuple[int, ...]] = {}
        self._lock = threading.Lock()
        self._flushing = threading.Lock()  # the writer thread, and a report that wants all written
        self._stop = threading.Event()
        self._queued = threading.Event()  # a poll was queued (or stop): the thread's wake
        self._rolled: float | None = None  # rollup_horizon of the last complete rollup (None: roll up)
        self._thread: threading.Thread | None = None
        self._said: str | None = None
        self._retained_at = 0.0
        self.dropped = 0
        self.written = 0

    def sample_of(self, host: HostSnapshot) -> HostSample | None:
        """The sample a host's result makes (``None``: never polled)."""
        if host.taken_at is None:
            return None
        t = round(host.taken_at.timestamp())
        ok = host.ok and host.error_kind is not HostErrorKind.BUSY
        with self._lock:
            dt = stands_for(t, self._last.get(host.name), self.poll_every)
            self._last[host.name] = max(t, self._last.get(host.name, t))
            if ok:
                self._gpus[host.name] = tuple(g.index for g in host.gpus)
            known = self._gpus.get(host.name, ())
        gpus = readings_of(host) if ok else tuple(GpuReading(i) for i in known)
        return HostSample(host.name, t, dt, ok, gpus)

    def record(self, host: HostSnapshot) -> None:
        """Queue a host's new result for writing (from its poll thread); never blocks, never raises."""
        try:
            sample = self.sample_of(host)
            if sample is None:
                return
            try:
                self._queue.put_nowait(sample)
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self._queue.get_nowait()
                self._queue.put_nowait(sample)
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 1000 == 0:
                    log.warning("history: the writer is behind; dropped %d polls so far", self.dropped)
            self._queued.set()
        except Exception:
            log.exception("history: cannot record %s's result", host.name)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="history-writer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Write what is queued and end the thread (the daemon's services are stopped so)."""
        self._stop.set()
        self._queued.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        elif not self._queue.empty():
            self.flush()
        with self._flushing:
            if self._store is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._store.conn.close()
                self._store = None

    close = stop

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._queued.wait(self.idle_seconds()):  # polls came: gather those of the next seconds too
                self._stop.wait(self.flush_every)
            self._queued.clear()
            self.flush()
        self.flush()

    def idle_seconds(self) -> float:
        """How long the thread may sleep with nothing queued: until the next rollup or deletion is
        due, at least ``flush_every`` (also what a failed write waits), at most :data:`IDLE_SECONDS`."""
        if self._store is None or self._said is not None or self._rolled is None:
            return self.flush_every
        now = self.clock()
        due = min(self._rolled + FIVE_MINUTES + ROLLUP_GRACE_SECONDS, self._retained_at + HOUR)
        return min(max(due - now, self.flush_every), IDLE_SECONDS)

    def _open(self) -> HistoryStore:
        if self._store is None:
            try:
                conn = connect(self.path)
            except CorruptHistory as exc:
                aside = self.path.with_name(f"{self.path.name}.corrupt-{int(self.clock())}")
                for suffix in ("", "-wal", "-shm"):
                    with contextlib.suppress(FileNotFoundError):
                        os.rename(f"{self.path}{suffix}", f"{aside}{suffix}")
                log.error(
                    "history: %s was corrupt (%s): moved it aside to %s, starting afresh", self.path, exc, aside.name
                )
                conn = connect(self.path)
            self._store = HistoryStore(conn, self.settings)
            last = self._store.last_polls(self.clock() - MAX_GAP_POLLS * self.poll_every)
            known = self._store.known_gpus()
            with self._lock:
                for name, t in last.items():
                    self._last.setdefault(name, t)
                for name, gpus in known.items():
                    self._gpus.setdefault(name, gpus)
        return self._store

    def flush(self) -> None:
        """Write what is queued (one transaction), then roll up (when a bucket may be ready: see the
        module docstring) and, once an hour, delete what has aged out; with none of these to do,
        nothing. Logs and drops on failure."""
        with self._flushing:
            self._flush()

    def _flush(self) -> None:
        batch: list[HostSample] = []
        with contextlib.suppress(queue.Empty):
            while True:
                batch.append(self._queue.get_nowait())
        now = self.clock()
        horizon, rolled = rollup_horizon(now), self._rolled
        if not batch and self._store is not None and self._said is None and horizon == rolled:
            if now - self._retained_at < HOUR:
                return  # nothing to write, nothing to roll up, nothing to delete
        try:
            store = self._open()
            if batch:
                self.written += store.write(batch)
            # a poll before the horizon of the last rollup lands in a bucket that may be rolled up already
            if rolled is None or horizon != rolled or any(sample.t < rolled for sample in batch):
                self._rolled = None  # until this pass is done
                if store.rollup(now, limit=ROLLUP_LIMIT) < ROLLUP_LIMIT:
                    self._rolled = horizon
            if now - self._retained_at >= HOUR:
                store.retain(now)
                self._retained_at = now
            if self._said is not None:
                log.info("history: writing again to %s", self.path)
                self._said = None
        except (sqlite3.Error, HistoryError, OSError) as exc:
            self._failed(exc, len(batch))
        except Exception:
            log.exception("history: writing %d polls failed; dropped them", len(batch))

    def _failed(self, exc: BaseException, lost: int) -> None:
        why = str(exc)
        if why != self._said:
            log.error("history: cannot write %s: %s; dropped %d polls (polling and alerts go on)", self.path, why, lost)
            self._said = why
        if isinstance(exc, sqlite3.DatabaseError) and "malformed" in why.lower() and self._store is not None:
            with contextlib.suppress(sqlite3.Error):
                self._store.conn.close()
            self._store = None
