"""Delivering the outbox: the :class:`DeliveryError` policy, and a worker thread per channel.

The store keeps the rows (:class:`~gpuwatch.store.Outbox`); this module decides what to do with
each one and records the outcome there:

* a channel's messages go out one at a time, oldest first. A failure stops that channel for this
  pass, so its messages keep their order; a message refused for good (``message_fault``) is kept,
  marked, and the next one goes on;
* a send that may have been delivered (``maybe_delivered``: no verdict came back) is never marked
  refused: it waits (60 s, doubling with each doubtful try in a row, at most 15 min), and its
  channel's later messages wait behind it;
* a dry-run channel (:attr:`Channel.dry_run`) prints; the logs say so and never say "delivered".

:func:`flush_channel` is one pass over one channel: :func:`flush` runs it for every channel in
turn (``--once``, ``--dry-run``, tests), and :class:`Deliveries` runs it on a thread per channel
(the daemon), so a slow or retrying channel delays neither another channel nor the next alert
batch.

Threads and SQLite: every worker and the daemon's main loop share one :class:`~gpuwatch.store.Outbox`
and its one connection; the :class:`~gpuwatch.store.Database` lock serializes each read and
each transaction (milliseconds), and no lock is held while a payload is sent. The connection is
shared rather than one per worker because the outbox keeps memory beside its rows (messages held
while the disk is full, outcomes not recorded yet, doubtful tries) that must stay one, because a
transaction of the main loop (alert state and its messages) must never wait on SQLite's file lock
behind a worker, and because the throw-away in-memory database of ``--dry-run`` has one connection.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from ..store import Outbox, OutboxItem
from ..text import format_duration, local_time
from .base import Channel, DeliveryError

log = logging.getLogger(__name__)

#: After a send that may have been delivered (no verdict came back), the wait before the next try:
#: 60 s, doubling with each doubtful try in a row, at most 15 min. Posting again at once is what
#: flooded a group whose slow webhook accepted every post but answered too late.
MAYBE_DELIVERED_WAIT_SECONDS = 60.0
MAYBE_DELIVERED_WAIT_CAP_SECONDS = 900.0

#: How long :meth:`Deliveries.close` waits for the workers (a channel ends a send within about a
#: second of its ``stop``).
JOIN_SECONDS = 2.0


@dataclass(frozen=True)
class FlushResult:
    sent: int
    failed: int  # left in the outbox after a failure this time
    dead: int  # rejected for good (the message itself was bad); kept for inspection
    errors: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.dead == 0

    def __add__(self, other: FlushResult) -> FlushResult:
        return FlushResult(
            self.sent + other.sent, self.failed + other.failed, self.dead + other.dead, self.errors + other.errors
        )


NOTHING = FlushResult(0, 0, 0)


class Stop(Protocol):
    """What ends a pass early: a :class:`threading.Event`, or anything that says whether it is set."""

    def is_set(self) -> bool: ...


def doubt_wait(doubts: int) -> float:
    """The wait after the ``doubts``-th doubtful try in a row (1: the first)."""
    return min(MAYBE_DELIVERED_WAIT_CAP_SECONDS, MAYBE_DELIVERED_WAIT_SECONDS * 2.0 ** (doubts - 1))


@dataclass
class _Pass:
    """What one pass over a channel did so far."""

    sent: int = 0
    failed: int = 0
    dead: int = 0
    store_error: str | None = None

    def result(self, errors: list[str]) -> FlushResult:
        return FlushResult(self.sent, self.failed, self.dead, tuple(errors))


def _refused(outbox: Outbox, item: OutboxItem, exc: DeliveryError, now: float, done: _Pass) -> bool:
    """Record a refused send; whether the channel's later messages must wait (its order kept)."""
    if exc.maybe_delivered:  # never marked dead: it may be in the group already, or not
        wait = doubt_wait(item.in_doubt + 1)
        done.store_error = outbox.record_doubt(item, str(exc), now + wait) or done.store_error
        log.log(
            logging.ERROR if exc.permanent else logging.WARNING,
            "%s: message %d (%s) may have been delivered; next try in %s: %s",
            item.channel,
            item.id,
            item.summary,
            format_duration(wait),
            exc,
        )
        return True
    if exc.message_fault:
        # The message itself was refused (malformed, too large): retrying it would block every
        # later message forever. Keep it, marked, and go on.
        done.store_error = outbox.record(item.id, str(exc), dead=True) or done.store_error
        done.dead += 1
        log.error("%s refused message %d (%s) for good: %s", item.channel, item.id, item.summary, exc)
        return False
    done.store_error = outbox.record(item.id, str(exc)) or done.store_error
    level = logging.ERROR if exc.permanent else logging.WARNING
    log.log(level, "%s: message %d (%s) not delivered: %s", item.channel, item.id, item.summary, exc)
    return True


def _one_pass(
    outbox: Outbox, name: str, channel: Channel, stop: Stop | None, clock: Callable[[], float]
) -> tuple[_Pass, list[str]]:
    done = _Pass(store_error=outbox.catch_up())
    errors: list[str] = []
    now = clock()
    pending = outbox.pending(name)
    for n, item in enumerate(pending):
        if stop is not None and stop.is_set():
            break
        if item.not_before > now:  # its later messages wait behind it: their order is kept
            done.failed += len(pending) - n
            errors.append(
                f"{name}: message {item.id} may have been delivered; next try at {local_time(item.not_before)}"
            )
            break
        try:
            channel.deliver(item.payload)
        except DeliveryError as exc:
            errors.append(f"{name}: {exc}")
            # The wait runs from this try, not from the start of the pass: the earlier messages'
            # sends (rate limits, retries) may have taken longer than the wait itself.
            if _refused(outbox, item, exc, clock(), done):
                done.failed += len(pending) - n
                break
            continue
        done.store_error = outbox.record(item.id, None) or done.store_error
        done.sent += 1
        if channel.dry_run:  # printed: a log must never say it was sent
            log.info("%s: message %d (%s) printed, not sent (dry run)", name, item.id, item.summary)
        else:
            log.info("%s: delivered message %d (%s)", name, item.id, item.summary)
    return done, errors


def _said(outbox: Outbox, store_error: str | None, errors: list[str]) -> None:
    """The store's trouble, said once per flush (not once per message)."""
    if store_error:
        waiting = outbox.backlog()
        log.error("outbox: %s%s", f"{'; '.join(waiting)}: " if waiting else "", store_error)
        errors.append(store_error)


def flush_channel(
    outbox: Outbox,
    name: str,
    channel: Channel,
    stop: Stop | None = None,
    clock: Callable[[], float] | None = None,
) -> FlushResult:
    """Deliver what is pending for one channel, oldest first, until a failure (the rest waits for
    the next pass, in order) or ``stop`` (nothing more is sent: the rest goes first next time). A
    message that may have been delivered waits, and the channel's later messages behind it, until
    its ``not_before``. ``clock``: the outbox's unless given."""
    done, errors = _one_pass(outbox, name, channel, stop, clock or outbox.clock)
    _said(outbox, done.store_error, errors)
    return done.result(errors)


def flush(
    outbox: Outbox,
    channels: Mapping[str, Channel],
    stop: Stop | None = None,
    clock: Callable[[], float] | None = None,
) -> FlushResult:
    """Every channel's pass in turn (:func:`flush_channel`), in this thread: for ``--once``,
    ``--dry-run`` and tests. Messages of a channel no longer configured stay in the outbox."""
    clock = clock or outbox.clock
    total = NOTHING
    store_error = outbox.catch_up()  # held messages are written even when no channel is left
    errors: list[str] = []
    for name in outbox.channels():
        if name not in channels:
            errors.append(f"{name}: not configured any more; its messages stay in the outbox")
            total += FlushResult(0, len(outbox.pending(name)), 0)
    for name, channel in channels.items():
        if stop is not None and stop.is_set():
            break
        done, said = _one_pass(outbox, name, channel, stop, clock)
        store_error = done.store_error or store_error
        total += done.result(said)
    errors.extend(total.errors)
    _said(outbox, store_error, errors)
    return FlushResult(total.sent, total.failed, total.dead, tuple(errors))


class _Worker:
    """One channel's thread: a pass over its pending messages each time it is woken."""

    def __init__(self, deliveries: Deliveries, name: str, channel: Channel, after: threading.Thread | None) -> None:
        self.deliveries = deliveries
        self.name = name
        self.channel = channel
        self.after = after  # the thread of an earlier worker for this channel, still ending
        self.wake = threading.Event()
        self.quit = threading.Event()
        self.removed = False  # taken out by a reload: this thread closes its channel at the end
        self.retired: list[Channel] = []  # replaced channels, closed by this thread between passes
        self.thread = threading.Thread(target=self.run, name=f"deliver-{name}", daemon=True)

    def is_set(self) -> bool:
        """Whether the pass must end (a :class:`Stop`): the daemon stops, or this worker ends."""
        return self.quit.is_set() or self.deliveries.stop.is_set()

    def run(self) -> None:
        deliveries = self.deliveries
        if self.after is not None:
            self.after.join()  # one sender per channel at any time: exactly once, in order
        while True:
            self.wake.wait()
            if self.is_set():
                break
            with deliveries.lock:
                self.wake.clear()
                channel, retired, self.retired = self.channel, self.retired, []
            _close_all(retired)
            try:
                result = flush_channel(deliveries.outbox, self.name, channel, self, deliveries.clock)
            except Exception:  # one failed pass must not end the channel's deliveries
                log.exception("%s: delivering the outbox failed; trying again on the next wake", self.name)
                result = FlushResult(0, 1, 0, (f"{self.name}: delivery failed",))
            if deliveries.on_pass is not None:
                deliveries.on_pass(self.name, result)
        with deliveries.lock:
            retired, self.retired = self.retired, []
        _close_all([*retired, self.channel] if self.removed else retired)


class Deliveries:
    """The daemon's delivery: a worker thread per channel, each delivering its own channel's messages
    in order (:func:`flush_channel`), so one channel's slow send or backoff never holds up another
    channel, nor the main loop that evaluates the next alert batch.

    The main loop only queues messages and calls :meth:`wake`. ``stop`` (SIGTERM) is the same
    event the channels were built with: it cuts a send in flight short (within about a second), a
    worker sends nothing more once it is set, and :meth:`close` waits for the workers. A channel's
    messages are only ever sent by its one worker, one at a time: exactly once per channel, in order.
    """

    def __init__(
        self,
        outbox: Outbox,
        channels: Mapping[str, Channel],
        stop: threading.Event,
        clock: Callable[[], float] | None = None,
        on_pass: Callable[[str, FlushResult], None] | None = None,
    ) -> None:
        """``clock``: the outbox's unless given; ``on_pass``: told each pass's result (from the
        worker's thread)."""
        self.outbox = outbox
        self.stop = stop
        self.clock = clock or outbox.clock
        self.on_pass = on_pass
        self.lock = threading.Lock()
        self._workers: dict[str, _Worker] = {}
        self._leaving: dict[str, threading.Thread] = {}  # workers of removed channels, still ending
        self._channels = dict(channels)
        self._started = False

    def start(self) -> None:
        """Start a worker for each channel (and deliver what is already pending)."""
        with self.lock:
            self._started = True
            for name, channel in self._channels.items():
                self._add(name, channel)
        self.wake()

    def _add(self, name: str, channel: Channel) -> None:
        worker = _Worker(self, name, channel, self._leaving.pop(name, None))
        self._workers[name] = worker
        worker.thread.start()

    def wake(self) -> None:
        """Have every channel deliver what is pending (a worker busy with a pass starts another one
        after it)."""
        with self.lock:
            for worker in self._workers.values():
                worker.wake.set()

    def set_channels(self, channels: Mapping[str, Channel]) -> None:
        """Follow a reload: a removed channel's worker ends (closing its channel after the send in
        flight), a new one starts, a rebuilt channel is used from its worker's next pass on."""
        with self.lock:
            self._channels = dict(channels)
            for name in [n for n in self._workers if n not in channels]:
                worker = self._workers.pop(name)
                self._leaving[name] = worker.thread
                worker.removed = True
                worker.quit.set()
                worker.wake.set()
            for name, channel in channels.items():
                worker_now = self._workers.get(name)
                if worker_now is None:
                    if self._started:
                        self._add(name, channel)
                elif worker_now.channel is not channel:
                    worker_now.retired.append(worker_now.channel)
                    worker_now.channel = channel
        self.wake()

    def close(self, timeout: float = JOIN_SECONDS) -> None:
        """End every worker: the caller sets ``stop`` first to cut sends in flight short; without
        it, each worker finishes its pass. Waits at most ``timeout`` in all."""
        with self.lock:
            workers = list(self._workers.values())
            self._workers.clear()
            for worker in workers:
                worker.quit.set()
                worker.wake.set()
        deadline = time.monotonic() + timeout
        for worker in workers:
            worker.thread.join(max(0.0, deadline - time.monotonic()))
            if worker.thread.is_alive():
                log.warning("%s: a send was still in flight at the stop; it goes again next time", worker.name)


def _close_all(channels: list[Channel]) -> None:
    for channel in channels:
        close = getattr(channel, "close", None)
        if callable(close):
            try:
                close()
            except Exception:
                log.exception("closing the %s channel failed", channel.name)
