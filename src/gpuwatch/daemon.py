"""The main job: poll on a timetable, turn snapshots into reports, deliver through the outbox.

One thread runs the ``schedule`` loop, so a cycle never overlaps the next. An exception in
one cycle is logged and the loop goes on. SIGINT/SIGTERM set a flag: the current step
finishes, connections close, and :meth:`Daemon.run_forever` returns 0.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from types import FrameType
from typing import Any

import schedule

from .config import Config, ReportSchedule
from .model import FleetSnapshot
from .notify.base import Channel, Message
from .poll import Poller
from .report import alert_message, alert_words, build_report
from .rules import Notice, Transition, advance, evaluate, silence_check
from .store import AlertStore, FlushResult, Outbox
from .text import format_duration

log = logging.getLogger(__name__)


class Daemon:
    """Everything the run modes share: poll, enqueue reports, flush the outbox."""

    def __init__(
        self,
        config: Config,
        poller: Poller,
        outbox: Outbox,
        channels: Mapping[str, Channel],
        *,
        alert_store: AlertStore | None = None,
        clock: Callable[[], float] = time.time,
        stop: threading.Event | None = None,
    ) -> None:
        self.config = config
        self.poller = poller
        self.outbox = outbox
        self.channels = dict(channels)
        self.alert_store = alert_store
        self.clock = clock
        self.stop = stop or threading.Event()
        self.latest: FleetSnapshot | None = None
        self._latest_at = 0.0

    # -- steps

    def poll(self) -> FleetSnapshot:
        started = time.monotonic()
        snapshot = self.poller.poll()
        self.latest, self._latest_at = snapshot, time.monotonic()
        log.info(
            "cycle: polled %d hosts (%d answered) in %.2fs",
            len(snapshot.hosts),
            len(snapshot.answered),
            time.monotonic() - started,
        )
        return snapshot

    def fresh_snapshot(self) -> FleetSnapshot:
        """The latest snapshot when it is recent (within one poll interval), else a new poll."""
        max_age = self.config.schedule.poll_every
        if self.latest is None or time.monotonic() - self._latest_at > max_age:
            return self.poll()
        return self.latest

    def enqueue(self, message: Message, channel_names: Iterable[str] | None = None) -> None:
        """Write a message to the outbox for each channel (default: all), before anything is sent."""
        names = list(self.channels) if channel_names is None else [n for n in channel_names if n in self.channels]
        with self.outbox.db.transaction():
            for name in names:
                payloads = self.channels[name].prepare(message)
                self.outbox.add(name, message.title, payloads)
                log.info("queued %s for %s (%d parts)", message.title, name, len(payloads))

    def routes_for(self, rule: str) -> tuple[str, ...]:
        routes = self.config.alerts.routes
        return routes.get(rule) or routes.get("default") or tuple(self.channels)

    def alerts(self, snapshot: FleetSnapshot) -> list[Transition]:
        """Evaluate the rules, move every alert one step, queue what must be said: atomically,
        so a crash or restart never announces the same thing twice nor loses it."""
        if self.alert_store is None:
            return []
        store = self.alert_store
        now = self.clock()
        evaluation = evaluate(snapshot, self.config.alerts, store.memory(), self.config.free_gpu)
        silences = store.silences(now)
        records, transitions = advance(store.records(), evaluation, now, self.config.alerts, silence_check(silences))
        mentions = self.config.feishu.mentions if self.config.feishu else {}
        by_channel: dict[str, tuple[list[Transition], list[Notice]]] = {}
        for t in transitions:
            for name in self.routes_for(t.record.key.rule):
                by_channel.setdefault(name, ([], []))[0].append(t)
        for notice in evaluation.notices:
            for name in self.routes_for("gpu_freed"):
                by_channel.setdefault(name, ([], []))[1].append(notice)
        with self.outbox.db.transaction():
            store.save(records, evaluation.memory)
            for name, (items, notices) in by_channel.items():
                message = alert_message(items, notices, mentions if name == "feishu" else {})
                if message is not None:
                    self.enqueue(message, [name])
        for t in transitions:
            log.info("alert %s: %s: %s", t.kind, t.record.key.id, alert_words(t.record).summary)
        return transitions

    def flush(self) -> FlushResult:
        result = self.outbox.flush(self.channels)
        if result.sent or not result.ok:
            log.info("outbox: %d sent, %d still waiting, %d refused for good", result.sent, result.failed, result.dead)
        return result

    def report_channels(self) -> list[str]:
        """Scheduled reports go to the chat channels: e-mail carries alerts only (as routed), so an
        inbox gets what the admin asked to be alerted about, not an overview every hour. With
        e-mail as the only channel, reports go there: a configured report is never dropped."""
        chat = [name for name in self.channels if name != "email"]
        return chat or list(self.channels)

    def report(self, spec: ReportSchedule, snapshot: FleetSnapshot | None = None) -> None:
        snapshot = snapshot or self.fresh_snapshot()
        self.enqueue(build_report(spec.report, snapshot, self.config.free_gpu, spec.user), self.report_channels())

    # -- jobs (never raise: one failed cycle must not stop the daemon)

    def _guarded(self, what: str, func: Callable[..., Any], *args: Any) -> Callable[[], None]:
        def job() -> None:
            if self.stop.is_set():
                return
            started = time.monotonic()
            try:
                func(*args)
            except Exception:
                log.exception("%s failed; going on with the next cycle", what)
            log.info("cycle: %s took %.2fs", what, time.monotonic() - started)

        return job

    def poll_cycle(self) -> None:
        snapshot = self.poll()
        self.alerts(snapshot)
        self.flush()

    def report_cycle(self, spec: ReportSchedule) -> None:
        self.report(spec)
        self.flush()

    # -- run modes

    def build_scheduler(self) -> schedule.Scheduler:
        scheduler = schedule.Scheduler()
        every = self.config.schedule.poll_every
        scheduler.every(max(1, round(every))).seconds.do(self._guarded("poll cycle", self.poll_cycle))
        for spec in self.config.schedule.reports:
            job = self._guarded(f"report {spec.describe()}", self.report_cycle, spec)
            if spec.every:
                scheduler.every(max(1, round(spec.every))).seconds.do(job)
            else:
                scheduler.every().day.at(spec.at or "09:00").do(job)
        return scheduler

    def run_forever(self, install_signals: bool = True) -> int:
        """The daemon loop; returns 0 after SIGINT/SIGTERM."""
        if install_signals:
            self._install_signals()
        scheduler = self.build_scheduler()
        reports = ", ".join(s.describe() for s in self.config.schedule.reports) or "none"
        log.warning(
            "gpuwatch running: %d hosts, poll every %s, reports: %s",
            len(self.config.hosts),
            format_duration(self.config.schedule.poll_every),
            reports,
        )
        self._guarded("first poll cycle", self.poll_cycle)()
        while not self.stop.is_set():
            scheduler.run_pending()
            idle = scheduler.idle_seconds
            self.stop.wait(timeout=min(max(idle if idle is not None else 1.0, 0.05), 1.0))
        log.warning("gpuwatch stopping: %d messages still in the outbox", self.outbox.count())
        return 0

    def run_once(self) -> int:
        """Poll once, send what the outbox holds and every configured report; 0 when all delivered."""
        snapshot = self.poll()
        try:
            self.alerts(snapshot)
        except Exception:
            log.exception("alert evaluation failed")
        for spec in self.config.schedule.reports:
            try:
                self.report(spec, snapshot)
            except Exception:
                log.exception("report %s failed", spec.describe())
        result = self.flush()
        left = self.outbox.count()
        if left:
            log.error("%d messages left in the outbox; they go first on the next run", left)
            for error in dict.fromkeys(result.errors):
                log.error("%s", error)
            return 1
        return 0 if result.dead == 0 else 1

    def _install_signals(self) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            log.warning("received %s: finishing the current step", signal.Signals(signum).name)
            self.stop.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
