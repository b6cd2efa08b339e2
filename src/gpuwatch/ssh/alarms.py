"""Functions called at a given time by one thread for the whole process: a probe's deadline
without a thread of its own per probe (1,000 hosts every minute would start 17 a second).

An alarm's function runs on the alarms' thread, so it must be quick and must not block (closing a
channel is). The thread starts with the first alarm, not at import.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Alarm:
    """One booked call; :meth:`cancel` before its time and it never runs."""

    __slots__ = ("cancelled", "func")

    def __init__(self, func: Callable[[], None]) -> None:
        self.func = func
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Alarms:
    """A heap of (time, function) served by one daemon thread; times are ``time.monotonic()``."""

    def __init__(self, name: str = "alarms") -> None:
        self._name = name
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Alarm]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def at(self, when: float, func: Callable[[], None]) -> Alarm:
        """Call ``func`` at ``when`` (monotonic), unless the returned alarm is cancelled first."""
        alarm = Alarm(func)
        with self._cond:
            order = next(self._order)
            heapq.heappush(self._heap, (when, order, alarm))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
                self._thread.start()
            elif self._heap[0][1] == order:
                self._cond.notify()
        return alarm

    def pending(self) -> int:
        """Alarms booked and neither run nor cancelled."""
        with self._cond:
            return sum(1 for _, _, alarm in self._heap if not alarm.cancelled)

    def _serve(self) -> None:
        while True:
            with self._cond:
                while True:
                    while self._heap and self._heap[0][2].cancelled:  # cancelled ones leave at once
                        heapq.heappop(self._heap)
                    now = time.monotonic()
                    if self._heap and self._heap[0][0] <= now:
                        alarm = heapq.heappop(self._heap)[2]
                        break
                    self._cond.wait(self._heap[0][0] - now if self._heap else None)
            if alarm.cancelled:
                continue
            try:
                alarm.func()
            except Exception:  # one alarm's failure must not end the others
                log.exception("an alarm failed")


_shared: Alarms | None = None
_shared_lock = threading.Lock()


def shared_alarms() -> Alarms:
    """The process's one :class:`Alarms` (made on first use)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Alarms()
        return _shared
