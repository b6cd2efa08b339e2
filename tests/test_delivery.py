"""Delivery on a worker per channel, and the daemon's report timetable.

* A real ``python -m gpuwatch run`` against the sshd fleet (tests/fleet.py) with two channels: a
  Feishu-like server that answers after 15 s and a WeCom-like one that answers at once. The fast
  channel's messages, and an alert batch that arises while the slow send is in flight, arrive
  without waiting for the slow one; SIGTERM during the slow send ends the daemon within 1.5 s.
* The daemon's ``every: 1h`` report on an injected clock goes out at each clock hour (as ``--once``
  does, :mod:`gpuwatch.timetable`), and a new daemon on the same state directory does not send it
  again within the hour.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from builders import Recorder
from fakechat import FakeWeCom
from fakefeishu import FakeFeishu
from fleet import ERR_NO_DRIVER, Fleet, scenario_error
from gpuwatch.config import HostConfig
from gpuwatch.config.load import parse_config
from gpuwatch.daemon import Daemon
from gpuwatch.model import HostErrorKind, HostSnapshot
from gpuwatch.notify.delivery import Deliveries
from gpuwatch.store import Outbox, ReportRuns, open_db
from waiting import wait_for

KEYWORD = "GPU"
SLOW_SECONDS = 15


@pytest.fixture
def slow_feishu() -> Iterator[FakeFeishu]:
    with FakeFeishu(keywords=[KEYWORD]) as server:
        server.always(f"slow:{SLOW_SECONDS}")
        yield server


@pytest.fixture
def wecom() -> Iterator[FakeWeCom]:
    with FakeWeCom() as server:
        yield server


def logged_at(log: str, words: str) -> float:
    """When the first log line with ``words`` was written (Unix time)."""
    line = next(line for line in log.splitlines() if words in line)
    return datetime.fromisoformat(line.split(" ", 1)[0]).timestamp()


def bodies(server: FakeWeCom) -> list[str]:
    return [json.dumps(body, ensure_ascii=False) for body in server.accepted]


def test_a_slow_channel_holds_up_neither_the_other_channel_nor_the_next_alerts_and_sigterm_ends_at_once(
    fleet: Fleet, known_hosts: Path, slow_feishu: FakeFeishu, wecom: FakeWeCom, tmp_path: Path
) -> None:
    a = fleet.addresses
    doc = {
        "hosts": [{"name": "gpu-a", "address": a[0]}, {"name": "gpu-b", "address": a[1]}],
        "ssh": fleet.gpuwatch_ssh(known_hosts, connect_timeout="2s", command_timeout="5s"),
        "state_dir": str(tmp_path / "state"),
        "feishu": {"url": slow_feishu.url, "keyword": KEYWORD, "format": "post"},
        "wecom": {"url": wecom.url},
        "schedule": {"poll_every": "1s", "reports": [{"report": "overview", "every": "1h"}]},
        "alerts": {"gpu_error": True},
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(doc), encoding="utf-8")
    config.chmod(0o600)
    daemon = subprocess.Popen(
        [sys.executable, "-m", "gpuwatch", "run", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=os.environ.copy(),
    )
    try:
        # The first overview (never made before: due at once) goes to both channels.
        assert slow_feishu.wait_for_requests(1, timeout=30), "the overview never reached the slow server"
        slow_started = time.monotonic()
        wait_for(lambda: any("GPU overview" in b for b in bodies(wecom)), 5, "the overview on the fast channel")
        assert time.monotonic() - slow_started < 5  # did not wait for the slow answer

        # A new alert batch, arising while the slow send is in flight, reaches the fast channel.
        scenario_error(fleet.scenario_dir(a[1]), ERR_NO_DRIVER)
        wait_for(
            lambda: any("GPU alerts&#58; 1 firing" in b for b in bodies(wecom)), 8, "the alert, on the fast channel"
        )
        assert time.monotonic() - slow_started < 10  # the slow send (10 s client deadline) is still going
        assert not slow_feishu.answers and len(slow_feishu.exchanges) == 1  # still the first send, unanswered

        stopped_at = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=10) == 0
        took = time.monotonic() - stopped_at
        # the whole process, with the interpreter's own teardown (about 0.3 s on a busy machine)
        assert took < 2.5, f"SIGTERM during the slow send took {took:.2f}s"
    finally:
        if daemon.poll() is None:
            daemon.kill()
        daemon.communicate(timeout=10)
    log = (tmp_path / "state" / "gpuwatch.log").read_text(encoding="utf-8")
    # the daemon itself: from the signal to the end of its loop, every send ended, within 1.5 s
    took = logged_at(log, "gpuwatch stopping: ") - logged_at(log, "received SIGTERM")
    assert 0 <= took < 1.5, f"the daemon took {took:.2f}s to stop"
    assert "wecom: delivered message" in log
    assert "feishu: message 1 " in log and "may have been delivered" in log  # the stop cut it: kept, in doubt
    assert "feishu: delivered message" not in log


# ---------------------------------------------------------------------- the timetable


class AnsweringPoller:
    """Every host "answers" as soon as the daemon starts (down: the report only needs a result)."""

    def __init__(self, hosts: tuple[HostConfig, ...]) -> None:
        self.hosts = hosts

    def start(self, every: float, on_result: Callable[[HostSnapshot], None]) -> None:
        for host in self.hosts:
            on_result(HostSnapshot.failed(host.name, host.display_address, HostErrorKind.UNREACHABLE, "test"))

    def close(self) -> None:
        pass


def local(text: str) -> float:
    """Unix time of a local wall-clock time ``YYYY-MM-DD HH:MM:SS``."""
    return time.mktime(time.strptime(text, "%Y-%m-%d %H:%M:%S"))


class Running:
    """A daemon on ``state`` in a thread, its clock set by the test."""

    def __init__(self, state: Path, at: str) -> None:
        self.now = local(at)
        doc = {
            "hosts": [{"name": "gpu-a", "address": "127.0.0.250"}],
            "state_dir": str(state),
            "schedule": {"poll_every": "1m", "reports": [{"report": "overview", "every": "1h"}]},
        }
        self.config = parse_config(doc)
        self.outbox = Outbox(open_db(state))
        self.channel = Recorder("feishu")
        self.daemon = Daemon(
            self.config,
            AnsweringPoller(self.config.hosts),  # type: ignore[arg-type]
            self.outbox,
            {"feishu": self.channel},
            clock=lambda: self.now,
            recheck_seconds=1.0,  # the test's clock jumps without time passing: a real one is seen within 60 s
        )
        self.thread = threading.Thread(target=self.daemon.run_forever, kwargs={"install_signals": False})
        self.thread.start()

    def at(self, text: str) -> None:
        self.now = local(text)

    def sent(self) -> int:
        return sum("GPU overview" in t for t in self.channel.titles)

    def expect(self, count: int) -> None:
        """``count`` overviews so far; none more after two more ticks of the schedule."""
        wait_for(lambda: self.sent() >= count, 5, f"{count} overviews")
        time.sleep(1.5)
        assert self.sent() == count, self.channel.titles

    def stop(self) -> None:
        self.daemon.stop.set()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()
        self.outbox.db.close()


def test_every_1h_reports_follow_the_clock_hours_and_a_restart_does_not_resend(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = Running(state, "2026-11-22 10:59:50")
    try:
        first.expect(1)  # never made: due at once, as a --once run would make it
        first.at("2026-11-22 10:59:59")
        first.expect(1)
        first.at("2026-11-22 11:00:00")  # the clock hour: not an hour after the daemon's start
        first.expect(2)
        first.at("2026-11-22 11:37:00")
        first.expect(2)
        first.at("2026-11-22 12:00:01")
        first.expect(3)
    finally:
        first.stop()
    db = open_db(state)
    try:
        assert ReportRuns(db).last() == {"overview every 1h": local("2026-11-22 12:00:01")}
    finally:
        db.close()

    second = Running(state, "2026-11-22 12:20:00")  # a restart within the hour: nothing again
    try:
        second.expect(0)
        second.at("2026-11-22 12:59:59")
        second.expect(0)
        second.at("2026-11-22 13:00:00")
        second.expect(1)
    finally:
        second.stop()


# ---------------------------------------------------------------------- the workers


class Gate(Recorder):
    """A channel whose sends wait until the test opens the gate."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.gate = threading.Event()

    def deliver(self, payload: dict[str, Any]) -> None:
        assert self.gate.wait(10), "the gate was never opened"
        super().deliver(payload)


def test_each_channel_delivers_on_its_own_worker_in_order_and_once() -> None:
    outbox = Outbox(open_db(None))
    slow, fast = Gate("slow"), Recorder("fast")
    stop = threading.Event()
    deliveries = Deliveries(outbox, {"slow": slow, "fast": fast}, stop)
    for n in range(3):
        for name in ("slow", "fast"):
            outbox.add(name, f"alert {n}", [{"title": f"alert {n}"}], kind="alert")
    deliveries.start()
    try:
        wait_for(lambda: len(fast.titles) == 3, 5, "the fast channel's three messages")
        assert slow.titles == []  # still in its first send
        outbox.add("fast", "alert 3", [{"title": "alert 3"}], kind="alert")  # a new batch
        deliveries.wake()
        wait_for(lambda: len(fast.titles) == 4, 5, "the new batch on the fast channel")
        slow.gate.set()
        wait_for(lambda: len(slow.titles) == 3, 5, "the slow channel's three messages")
        deliveries.wake()
        deliveries.wake()
        time.sleep(0.3)
    finally:
        stop.set()
        deliveries.close()
    assert fast.titles == ["alert 0", "alert 1", "alert 2", "alert 3"]
    assert slow.titles == ["alert 0", "alert 1", "alert 2"]  # in order, each once
    assert outbox.count() == 0
    outbox.db.close()


def test_a_transaction_belongs_to_its_thread() -> None:
    db = open_db(None)
    inside = threading.Event()
    leave = threading.Event()

    def hold() -> None:
        with db.transaction():
            inside.set()
            leave.wait(5)

    other = threading.Thread(target=hold)
    other.start()
    try:
        assert inside.wait(5)
        assert not db.in_transaction  # another thread's transaction is not this one's
    finally:
        leave.set()
        other.join()
    with db.transaction():
        assert db.in_transaction
    db.close()
