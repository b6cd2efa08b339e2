"""One network exchange under a total deadline that a stop request can cut short.

Socket timeouts bound each read, not an exchange: a server that trickles one byte every 2 s
keeps a 10 s read timeout happy for ever. :func:`run_guarded` runs the exchange (an HTTP post,
an SMTP session) in a worker thread and waits for it. When the deadline passes, or ``stop`` is
set and a short grace has passed, it gives up: it shuts down the sockets the exchange
registered (so the worker's blocked read returns at once and the worker ends) and returns.

The exchange code cooperates through the thread's :class:`Attempt` (:func:`current_attempt`):
it registers each connection as it opens it (:meth:`Attempt.attach`), which fails once the
attempt was given up, so an abandoned worker never starts a connection or a request; and it
says when its request has gone out in full (:meth:`Attempt.mark_sent`). That last point
decides what a failure means: before it, nothing was delivered; after it, the server may have
acted on the request and only its answer was lost.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

#: How often the waiting thread looks at the stop event.
_POLL_SECONDS = 0.1
#: After giving up, how long to wait for the worker to notice its shut-down sockets.
_JOIN_SECONDS = 0.5

_local = threading.local()


class Abandoned(ConnectionAbortedError):
    """Raised in the worker when its attempt was given up (an OSError, so HTTP/SMTP libraries
    treat it as the connection failure it is)."""


class Attempt:
    """What the waiting thread and the worker share about one exchange (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancelled = False
        self._sent = False
        self._closers: list[Callable[[], None]] = []

    @property
    def cancelled(self) -> bool:
        with self._lock:
            return self._cancelled

    @property
    def sent(self) -> bool:
        """True once the request went out in full: from then on a failure may hide a delivery."""
        with self._lock:
            return self._sent

    def check(self) -> None:
        """Raise :class:`Abandoned` if the attempt was given up (call before opening or sending)."""
        if self.cancelled:
            raise Abandoned("gave up on this attempt")

    def attach(self, close: Callable[[], None]) -> None:
        """Register how to cut a connection; cuts it at once (and raises) if already given up."""
        with self._lock:
            if not self._cancelled:
                self._closers.append(close)
                return
        close()
        raise Abandoned("gave up on this attempt")

    def mark_sent(self) -> None:
        with self._lock:
            if not self._cancelled:
                self._sent = True

    def cancel(self) -> None:
        """Give up: cut every registered connection; later attach() calls fail."""
        with self._lock:
            self._cancelled = True
            closers, self._closers = self._closers, []
        for close in closers:
            close()


def current_attempt() -> Attempt | None:
    """The attempt the calling thread works for, if it is a :func:`run_guarded` worker."""
    attempt: Attempt | None = getattr(_local, "attempt", None)
    return attempt


def shutdown_socket(sock: socket.socket | None) -> None:
    """Wake every thread blocked on ``sock`` (its reads return EOF), without closing it.

    Closing from another thread could free the descriptor number for reuse while the worker
    still uses it; ``shutdown`` cannot. Calls ``socket.socket.shutdown`` directly so that a TLS
    socket is cut at the TCP level (its own ``shutdown`` would also drop its TLS state under
    the worker's feet).
    """
    if sock is None:
        return
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except (OSError, ValueError):  # already closed, never connected, or detached
        pass


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """How an exchange ended: with a value, with an exception, or given up (``abandoned``)."""

    value: T | None
    error: BaseException | None
    abandoned: str | None  # None, "deadline" or "stopped"
    sent: bool  # the request went out in full before it ended
    seconds: float

    @property
    def ok(self) -> bool:
        return self.abandoned is None and self.error is None


def run_guarded(
    work: Callable[[], T],
    *,
    deadline_seconds: float,
    stop: threading.Event | None = None,
    stop_grace_seconds: float = 1.0,
    name: str = "exchange",
) -> Outcome[T]:
    """Run ``work()`` in a worker thread; return when it ends, at the deadline, or soon after stop.

    Once ``stop`` is set the exchange gets at most ``stop_grace_seconds`` more (a healthy server
    answers within that, so a stop rarely leaves a message in doubt). A worker that was given up
    has had its sockets shut down and ends by itself; it is a daemon thread, so it never holds
    up the process's exit either.
    """
    attempt = Attempt()
    box: list[T] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def worker() -> None:
        _local.attempt = attempt
        try:
            box.append(work())
        except BaseException as exc:  # handed to the waiting thread
            errors.append(exc)
        finally:
            _local.attempt = None
            done.set()

    started = time.monotonic()
    deadline = started + deadline_seconds
    reason = "deadline"
    thread = threading.Thread(target=worker, name=name, daemon=True)
    thread.start()
    while True:
        now = time.monotonic()
        if stop is not None and stop.is_set() and reason != "stopped":
            reason = "stopped"
            deadline = min(deadline, now + stop_grace_seconds)
        remaining = deadline - now
        if remaining <= 0:
            break
        if done.wait(min(remaining, _POLL_SECONDS)):
            break
    if not done.is_set():
        attempt.cancel()
        done.wait(_JOIN_SECONDS)
    seconds = time.monotonic() - started
    if attempt.cancelled:
        # Whatever the worker made of it after its sockets were cut (a short read looks like a
        # short answer) is not to be trusted.
        return Outcome(None, None, reason, attempt.sent, seconds)
    if box:
        return Outcome(box[0], None, None, attempt.sent, seconds)
    return Outcome(None, errors[0] if errors else None, None, attempt.sent, seconds)
