"""One thread for every probe's deadline: alarms run at their time, cancelled ones never."""

from __future__ import annotations

import threading
import time

from gpuwatch.ssh.alarms import Alarms


def test_alarms_run_in_time_order_on_one_thread_and_cancelled_ones_never() -> None:
    alarms = Alarms(name="test-alarms")
    ran: list[tuple[str, str]] = []
    done = threading.Event()
    start = time.monotonic()

    def note(label: str) -> None:
        ran.append((label, threading.current_thread().name))
        if label == "last":
            done.set()

    alarms.at(start + 0.3, lambda: note("second"))
    alarms.at(start + 0.1, lambda: note("first"))
    cancelled = alarms.at(start + 0.2, lambda: note("cancelled"))
    alarms.at(start + 0.5, lambda: note("last"))
    cancelled.cancel()
    assert done.wait(5)
    assert [label for label, _ in ran] == ["first", "second", "last"]
    assert {name for _, name in ran} == {"test-alarms"}
    assert time.monotonic() - start >= 0.5
    assert alarms.pending() == 0
    assert len([t for t in threading.enumerate() if t.name == "test-alarms"]) == 1


def test_a_failing_alarm_does_not_stop_the_next() -> None:
    alarms = Alarms(name="test-alarms-2")
    done = threading.Event()

    def fail() -> None:
        raise RuntimeError("boom")

    now = time.monotonic()
    alarms.at(now + 0.05, fail)
    alarms.at(now + 0.1, done.set)
    assert done.wait(5)


def test_an_earlier_alarm_booked_later_still_runs_first() -> None:
    alarms = Alarms(name="test-alarms-3")
    ran: list[str] = []
    done = threading.Event()
    now = time.monotonic()
    alarms.at(now + 2.0, lambda: (ran.append("late"), done.set()))
    time.sleep(0.05)  # the thread now sleeps until the late one
    alarms.at(now + 0.1, lambda: ran.append("early"))
    time.sleep(0.5)
    assert ran == ["early"]  # woken for it, not after the late one
    assert done.wait(5)
    assert ran == ["early", "late"]
