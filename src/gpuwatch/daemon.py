"""The main job: hosts polled on their own clocks, alerts as results arrive, reports on a timetable.

Three run modes share one :class:`Daemon`:

* ``run_forever`` (the daemon): the poller probes each host every ``poll_every`` on its own timer
  and hands each result to the fleet state. The main thread wakes when results arrive, gathers
  them for a moment (``BATCH_SECONDS``), evaluates the alert rules for exactly those hosts,
  queues what must be said and wakes the delivery workers (one thread per channel,
  :class:`~.notify.delivery.Deliveries`). Reports follow the timetable (:mod:`.timetable`, the
  same periods as ``--once``): the times each was last made are read from the ``report_runs``
  table at start and after each report, and the loop sleeps until the next one is due
  (:func:`~.timetable.next_due`); reports read the fleet state, they never poll. ``schedule``
  jobs wake the delivery workers every ``poll_every`` (to retry what the outbox holds) and, with
  ``hosts_from:``, follow discovery every second. With nothing to do the loop sleeps until the
  earliest of these, at most :data:`CLOCK_RECHECK_SECONDS` (a wall clock set forward or back is
  noticed then). A thread re-posts the firing alerts to Alertmanager channels
  (:class:`~.notify.alertmanager.Resender`). SIGHUP re-reads the config; SIGINT/SIGTERM finish the
  current step, cut the sends in flight short and return 0.
* ``run_once`` (cron, ``--dry-run``): poll every host once, evaluate, queue the reports it is
  given (the CLI picks those due by their schedule, :mod:`.timetable`), flush the outbox in
  this thread (the same per-channel passes the workers run), then re-post the firing alerts to
  Alertmanager channels.

With ``hosts_from:`` the daemon also follows the discovery sources (:class:`~.discovery.Discovery`,
each on its own thread): after a source's refresh, and every second for the hosts whose grace
ended, the host list is merged again (:func:`~.discovery.merged`, cut to the shard) and handed to the poller
(``Poller.reload``): new hosts start at once, the others keep their connections, and the alerts of
a host dropped resolve with the source it left. The sources' health goes to the rules
(``discovery_failed``).

An exception in one step is logged and the loop goes on.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shlex
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any, Protocol

import schedule

from .config import Config, ConfigError, HostConfig, ReportSchedule
from .discovery import Discovery, merged
from .fleet import FleetState
from .logsetup import ANNOUNCE
from .message import Message
from .model import FleetSnapshot, HostSnapshot
from .notify.alertmanager import Resender
from .notify.base import Channel
from .notify.delivery import Deliveries, FlushResult, flush
from .notify.registry import channel_spec
from .poll import Poller
from .probe import ProbeSettings
from .report import alert_message, alert_words, build_report, firing_alerts
from .reservation import with_reservations
from .rules import Notice, Transition, acknowledged_ids, advance, evaluate, silence_check
from .ssh import Runner
from .statedir import StateError
from .store import AlertStore, Outbox, ReportRuns, ReservationStore, StoreError
from .store.history import HistoryError, HistorySettings
from .store.historyread import HistoryReader
from .store.historywriter import HistoryWriter
from .store.wishes import WishStore
from .text import format_duration, plural
from .timetable import is_due, next_due
from .usage import period
from .usagereport import usage_report
from .wishes import Ending, judge

log = logging.getLogger(__name__)

# Results that arrive within this long of each other are evaluated together: one alert message,
# not one per host, when many hosts change at once (a switch failed, a reboot wave).
BATCH_SECONDS = 0.5
#: The longest the daemon's loop sleeps without looking at the clock: a report due after the wall
#: clock was set forward or back is made within this long.
CLOCK_RECHECK_SECONDS = 60.0
#: The timetable is first asked this long after the loop starts (or a reload changes the reports):
#: the first results' alerts go out before the first reports.
REPORT_FIRST_LOOK_SECONDS = 1
#: After the times reports were last made could not be read (a locked or full disk): read again this soon.
REPORT_RETRY_SECONDS = 1.0


@dataclass(frozen=True)
class Wiring:
    """What the daemon needs to follow a new config on SIGHUP (built by the CLI)."""

    load_config: Callable[[], Config]
    runner_factory: Callable[[Config], Callable[[HostConfig], Runner]]
    build_channels: Callable[[Config], dict[str, Channel]]


class Service(Protocol):
    """Something that runs beside the daemon loop (the web server): started with it, stopped with it."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


def host_pairs(config: Config) -> list[tuple[str, str]]:
    return [(h.name, h.display_address) for h in config.hosts]


class Daemon:
    """Everything the run modes share: the fleet state, alerts, reports, the outbox."""

    def __init__(
        self,
        config: Config,
        poller: Poller,
        outbox: Outbox,
        channels: Mapping[str, Channel],
        *,
        alert_store: AlertStore | None = None,
        state: FleetState | None = None,
        wiring: Wiring | None = None,
        clock: Callable[[], float] = time.time,
        stop: threading.Event | None = None,
        program: Sequence[str] = ("gpuwatch",),
        discovery: Discovery | None = None,
        history: HistoryWriter | None = None,
        recheck_seconds: float = CLOCK_RECHECK_SECONDS,
    ) -> None:
        self.config = config
        self.program = tuple(program)  # how printed command lines start (cli.common.program_words)
        self.poller = poller
        self.outbox = outbox
        self.report_runs = ReportRuns(outbox.db)
        self.wish_store = WishStore(outbox.db)
        self.channels = dict(channels)
        self.alert_store = alert_store
        self.state = state or FleetState(host_pairs(config), config.schedule.poll_every)
        self.wiring = wiring
        self.clock = clock
        self.stop = stop or threading.Event()
        self._fresh: set[str] = set()
        self._fresh_lock = threading.Lock()
        self._wake = threading.Event()
        self._reload_requested = threading.Event()
        self._removed: set[str] = set()
        self._causes: dict[str, str] = {}  # removed host -> why, when not "removed from the config"
        self.discovery = discovery  # hosts_from: followed while run_forever runs
        self._discovered = -1  # the Discovery.version the host list was last merged from
        self._discovery_news = threading.Event()  # a source refreshed: merge, and judge discovery_failed
        self.services: list[Service] = []  # started by run_forever, stopped when it returns
        self.resender = Resender(lambda: self.channels, self.firing_for)  # Alertmanager's re-posts, in run_forever
        self.deliveries: Deliveries | None = None  # the channels' workers, while run_forever runs
        self._started_at: float | None = None  # when run_forever began (the clock's time)
        self._answered: set[str] = set()  # hosts with a result since then
        self._made: dict[str, float] = {}  # report name -> when this process last made (or tried) it
        self._last_made: dict[str, float] | None = None  # report_runs and _made; None: read it again
        self._reports_due_at = math.inf  # the clock's time the next report is due (inf: not asked yet)
        self._reports_looked_at: float | None = None  # when the timetable was last asked (a clock set back?)
        self.recheck_seconds = recheck_seconds  # the longest sleep of run_forever's loop
        self.unprepared = 0  # messages a channel could not prepare (kept as refused for good)
        self.command = shlex.join(self.program)  # how the printed ack lines run gpuwatch from a shell
        self.history = history  # where each result is also recorded (None: no usage history)

    # -- the fleet state

    def on_result(self, host: HostSnapshot) -> None:
        """A host's new result (from the worker that ran its probe, or the clocks thread): record it,
        wake the main loop."""
        self.state.update(host)
        if self.history is not None:
            self.history.record(host)
        with self._fresh_lock:
            self._fresh.add(host.name)
            self._answered.add(host.name)
        self._wake.set()

    def take_fresh(self) -> frozenset[str]:
        with self._fresh_lock:
            self._wake.clear()  # before the take: a result that comes after it wakes the loop again
            fresh, self._fresh = frozenset(self._fresh), set()
        return fresh

    def snapshot(self) -> FleetSnapshot:
        """What every reader sees: each host's latest result, stale ones marked, with the bookings
        in force on it (so the rules and the reports agree on which GPUs are reserved)."""
        snapshot = self.state.snapshot()
        try:
            return with_reservations(snapshot, ReservationStore(self.outbox.db).current(snapshot.taken_at.timestamp()))
        except StoreError as exc:
            log.error("cannot read the bookings (%s): going on as if there were none", exc)
            return snapshot

    # -- steps

    def linked(self, message: Message) -> Message:
        """The message with the page's address (``web.public_url``), for a card's button."""
        web = self.config.web
        if message.link is None and web is not None and web.public_url:
            return dataclasses.replace(message, link=web.public_url)
        return message

    def enqueue(self, message: Message, channel_names: Iterable[str] | None = None, scope: str = "") -> None:
        """Write a message to the outbox for each channel (default: all), before anything is sent.
        A report (``scope``: what it covers) replaces the older one of its scope still waiting."""
        message = self.linked(message)
        names = list(self.channels) if channel_names is None else [n for n in channel_names if n in self.channels]
        with self.outbox.db.transaction():
            for name in names:
                payloads = self.prepared(name, message)
                if not payloads:  # None: it could not; []: nothing for it (a notice for Alertmanager)
                    continue
                self.outbox.add(name, message.title, payloads, kind=message.kind, scope=scope)
                log.info("queued %s for %s (%s)", message.title, name, plural(len(payloads), "part"))

    def prepared(self, name: str, message: Message) -> list[dict[str, Any]] | None:
        """``message`` as channel ``name``'s payloads, or None when that channel cannot make them
        (its renderer failed): said in one line, and the message kept in the outbox for that
        channel as refused for good (``check`` counts those), never lost silently. One channel's
        failure costs that channel only: the others still get the message, and the alerts move on."""
        try:
            return self.channels[name].prepare(message)
        except Exception as exc:  # the channel's fault, not the message's: no traceback every cycle
            error = f"{name} could not prepare it: {type(exc).__name__}: {exc}"
            log.error("%s not sent to %s: %s; kept in the outbox, refused for good", message.title, name, error)
            self.unprepared += 1
            for item_id in self.outbox.add(name, message.title, [{"unprepared": message.text}], kind=message.kind):
                self.outbox.failed(item_id, error, dead=True)
            return None

    def routes_for(self, rule: str) -> tuple[str, ...]:
        routes = self.config.alerts.routes
        return routes.get(rule) or routes.get("default") or tuple(self.channels)

    def alerts(self, snapshot: FleetSnapshot, fresh: frozenset[str] | None = None) -> list[Transition]:
        """Evaluate the rules for the hosts with a new result (``None``: all), move every alert one
        step, queue what must be said: atomically, so a crash or restart never announces the same
        thing twice nor loses it."""
        if self.alert_store is None:
            return []
        store = self.alert_store
        now = self.clock()
        removed = frozenset(self._removed)
        causes = {name: self._causes[name] for name in removed if name in self._causes}
        sources = self.discovery.health() if self.discovery is not None else None
        evaluation = evaluate(
            snapshot, self.config.alerts, store.memory(), self.config.free_gpu, fresh, sources=sources
        )
        silences = store.silences(now)
        before = store.records()
        records, transitions = advance(
            before,
            evaluation,
            now,
            self.config.alerts,
            silence_check(silences),
            removed_hosts=removed,
            acknowledged=acknowledged_ids(store.acks(), before, now),
            causes=causes,
        )
        by_channel: dict[str, tuple[list[Transition], list[Notice]]] = {}
        for t in transitions:
            for name in self.routes_for(t.record.key.rule):
                by_channel.setdefault(name, ([], []))[0].append(t)
        for notice in evaluation.notices:
            for name in self.routes_for(notice.rule):
                by_channel.setdefault(name, ([], []))[1].append(notice)
        config_path = str(self.config.path.resolve()) if self.config.path is not None else None
        with self.outbox.db.transaction():
            store.save(records, evaluation.memory.forget(removed) if removed else evaluation.memory, now)
            store.prune_acks(records, now)  # an ack ends when its alerts resolve
            seen = (h for h in snapshot.answered if fresh is None or h.name in fresh)  # the others: seen already
            store.saw_users((p.owner for h in seen for p in h.processes if p.owner), now)
            for name, (items, notices) in by_channel.items():
                command = self.command if self.command_lines(name) else None
                message = alert_message(items, notices, self.mentions(name), config_path=config_path, command=command)
                if message is not None:
                    self.enqueue(message, [name])
        self._removed -= removed
        for name in removed:
            self._causes.pop(name, None)
        for t in transitions:
            log.info("alert %s: %s: %s", t.kind, t.record.key.id, alert_words(t.record).summary)
        return transitions

    def wishes(self, snapshot: FleetSnapshot) -> list[Ending]:
        """Judge the open wishes (``notify-when-free``/``-done``, read afresh each cycle, so one made
        while the daemon runs counts at once) against the latest results. Each wish that ends is
        said once, to the channels that carry reports, mentioning its user: queued in the
        transaction that ends it (:mod:`.wishes`)."""
        wishes = self.wish_store.open()
        if not wishes:
            return []
        now = self.clock()
        judgement = judge(snapshot, wishes, now, self.config.free_gpu)
        said = []
        with self.outbox.db.transaction():
            self.wish_store.seen(judgement.seen)
            for ending in judgement.ended:
                if self.wish_store.end(ending.wish, ending.outcome, ending.at):
                    for name in self.report_channels():
                        self.enqueue(ending.message(self.mentions(name)), [name])
                    said.append(ending)
            self.wish_store.prune(now)
        for ending in said:
            log.info("wish #%d (%s): %s", ending.wish.id, ending.wish.describe(), ending.outcome)
        return said

    def tell_wishes(self, snapshot: FleetSnapshot) -> None:
        """:meth:`wishes`, whose failure (a full disk) costs only this cycle's wishes: tried again next time."""
        try:
            self.wishes(snapshot)
        except StateError as exc:
            log.error("wishes: %s; trying again next cycle", exc)
        except Exception:
            log.exception("wishes failed; trying again next cycle")

    def firing_for(self, channel: str) -> Message | None:
        """The alerts firing now that are routed to ``channel``, for a channel told the whole firing
        set again and again (Alertmanager, :class:`~.notify.alertmanager.Resender`)."""
        if self.alert_store is None:
            return None
        records = self.alert_store.records().values()
        message = firing_alerts(records, self.clock(), lambda rule: channel in self.routes_for(rule))
        return self.linked(message) if message is not None else None

    def command_lines(self, channel: str) -> bool:
        """Whether channel ``channel``'s alerts carry the ``gpuwatch ack`` line (``alerts.command_lines``):
        by default only a channel that reaches admins, not a group: e-mail (which carries no
        reports), and gpuwatch's own console (the terminal of whoever runs it: ``demo``, no channel)."""
        setting = self.config.alerts.command_lines
        if setting != "admins":
            return setting == "all"
        spec = channel_spec(channel)
        return spec is None or not spec.carries_reports

    @property
    def dry_run(self) -> bool:
        """Every channel prints instead of sending (--dry-run, the demo)."""
        return bool(self.channels) and all(ch.dry_run for ch in self.channels.values())

    def flush(self) -> FlushResult:
        """Deliver what the outbox holds, every channel in turn, in this thread (``--once``)."""
        result = flush(self.outbox, self.channels, stop=self.stop)
        self._said(result, dry_run=self.dry_run)
        return result

    def deliver(self) -> None:
        """Have the outbox delivered: by waking the channels' workers when they run (the daemon),
        else at once in this thread."""
        if self.deliveries is not None:
            self.deliveries.wake()
        else:
            self.flush()

    def _passed(self, name: str, result: FlushResult) -> None:
        """A worker's pass over its channel (from that worker's thread)."""
        channel = self.channels.get(name)
        self._said(result, dry_run=channel is not None and channel.dry_run, name=f"{name}: ")

    @staticmethod
    def _said(result: FlushResult, *, dry_run: bool, name: str = "") -> None:
        if dry_run:
            if result.sent:
                log.info("dry run: %s%s printed, none sent", name, plural(result.sent, "message"))
        elif result.sent or not result.ok:
            sent, failed, dead = result.sent, result.failed, result.dead
            log.info("outbox: %s%d sent, %d still waiting, %d refused for good", name, sent, failed, dead)

    def mentions(self, channel: str) -> Mapping[str, str]:
        """Who to @-mention in that channel's alerts: user -> the channel's id for them."""
        spec = channel_spec(channel)
        settings = self.config.channels.get(channel)
        return spec.mentions(settings) if spec is not None and settings is not None else {}

    def report_channels(self) -> list[str]:
        """Scheduled reports go to the chat channels: e-mail carries alerts only (as routed), so an
        inbox gets what the admin asked to be alerted about, not an overview every hour. With
        e-mail as the only channel, reports go there: a configured report is never dropped. Never to
        a channel that takes alerts only (Alertmanager)."""
        chat = [name for name in self.channels if (spec := channel_spec(name)) is None or spec.carries_reports]
        return chat or [name for name in self.channels if not ((spec := channel_spec(name)) and spec.alerts_only)]

    def report(
        self, spec: ReportSchedule, snapshot: FleetSnapshot | None = None, *, record: Iterable[str] | None = None
    ) -> None:
        """Make ``spec``'s report and queue it; remember when, under ``record`` (default: the
        schedule's own name), in the same transaction: what ``--once`` asks to know if it is due."""
        snapshot = snapshot or self.snapshot()
        now = self.clock()
        if spec.report == "usage":
            message = self.linked(self.usage_report(spec, now))
        else:
            message = self.linked(build_report(spec.report, snapshot, self.config.free_gpu, spec.user))
        try:
            with self.outbox.db.transaction():
                self.enqueue(message, self.report_channels(), scope=spec.scope)
                for name in (spec.describe(),) if record is None else record:
                    self.report_runs.record(name, now)
        except StoreError as exc:  # made once: kept until the disk has room (alerts are recomputed next time)
            for name in self.report_channels():
                self.outbox.hold(
                    name, message.title, self.channels[name].prepare(message), kind=message.kind, scope=spec.scope
                )
            log.error("%s not queued: %s; kept in memory until it can be", message.title, exc)

    def usage_report(self, spec: ReportSchedule, now: float) -> Message:
        """The ``usage`` report over the schedule's period (``every``, a week with ``day:``, else a day) up to ``now``,
        compared with the period before, from the history file (:mod:`.store.historyread`)."""
        if self.history is not None:
            self.history.flush()  # what the writer still holds counts too
        settings = HistorySettings.of(self.config)
        span = spec.every or (7 * 86400.0 if spec.on is not None else 86400.0)
        start, end = period(now, since=span)
        reader = HistoryReader(self.config.state_dir)
        try:
            kw = {"idle_below": settings.idle_below, "half_life": settings.half_life}
            current = reader.usage(start, end, "user", **kw)
            previous = reader.usage(start - span, start, "user", **kw) if start - span >= 0 else {}
        except HistoryError as exc:
            raise StateError(f"usage report: {exc}") from None
        finally:
            reader.close()
        return usage_report(current, previous)

    # -- jobs (never raise: one failed step must not stop the daemon)

    def _guarded(self, what: str, func: Callable[..., Any], *args: Any) -> Callable[[], None]:
        def job() -> None:
            if self.stop.is_set():
                return
            started = time.monotonic()
            try:
                func(*args)
            except StateError as exc:  # a full disk, a vanished state_dir: one line, not a traceback
                log.error("%s failed: %s; going on with the next cycle", what, exc)
            except Exception:
                log.exception("%s failed; going on with the next cycle", what)
            log.info("cycle: %s took %.2fs", what, time.monotonic() - started)

        return job

    def results_cycle(self) -> None:
        """Alerts for the hosts whose results arrived since the last time, then the outbox."""
        fresh = self.take_fresh()
        news = self._discovery_news.is_set()
        self._discovery_news.clear()
        if not fresh and not self._removed and not news:
            return
        snapshot = self.snapshot()
        answered = sum(1 for h in snapshot.hosts if h.name in fresh and h.ok)
        log.info("cycle: new results from %d hosts (%d answered)", len(fresh), answered)
        try:
            self.alerts(snapshot, fresh)
        finally:
            self.tell_wishes(snapshot)
            self.deliver()

    def report_cycle(self, spec: ReportSchedule) -> None:
        self.report(spec)
        self.deliver()

    # -- reload

    def request_reload(self) -> None:
        self._reload_requested.set()
        self._wake.set()

    def reload(self) -> bool:
        """Re-read the config (SIGHUP). A config with an error is refused and the old one runs on."""
        if self.wiring is None:
            log.error("reload: not supported in this mode")
            return False
        old = self.config
        try:
            new = self.wiring.load_config()
            if new.state_dir.resolve() != old.state_dir.resolve():
                raise ConfigError(f"state_dir: cannot change from {old.state_dir} while running; restart gpuwatch")
            channels = self.wiring.build_channels(new) if _channels_changed(old, new) else self.channels
            if not channels and new.web is None:
                raise ConfigError("no channel configured (nor web:), so there is nowhere to send reports")
        except ConfigError as exc:
            log.error("reload refused, still running the previous config: config error: %s", exc)
            return False
        if new.hosts_from != old.hosts_from:
            log.warning("hosts_from: the changes to this section take effect when gpuwatch restarts")
            new = dataclasses.replace(new, hosts_from=old.hosts_from)
        if self.discovery is not None:
            new = merged(new, self.discovery.lists())
        result = self.poller.reload(
            new.hosts, self.wiring.runner_factory(new), new.schedule.poll_every, settings=ProbeSettings.of(new)
        )
        removed = self.state.set_hosts(host_pairs(new), new.schedule.poll_every)
        self._removed.update(removed)
        if channels is not self.channels:
            if self.deliveries is not None:  # each worker closes its old channel after its send in flight
                self.deliveries.set_channels(channels)
            else:
                for name, channel in self.channels.items():
                    if channels.get(name) is not channel:
                        _close(channel)
            self.channels = dict(channels)
            self.resender.wake()  # an Alertmanager channel added, changed or gone
        self.config = new
        log.info("reloaded %s: hosts: %s", new.path, result.describe(), extra=ANNOUNCE)
        if new.web != old.web:
            log.warning("web: the changes to this section take effect when gpuwatch restarts")
        for warning in new.warnings:
            if warning not in old.warnings:  # said at start (or at an earlier reload) already
                log.warning("%s", warning)
        return True

    # -- discovery (hosts_from:)

    def discovery_changed(self) -> None:
        """A source refreshed (from its thread): merge on the main loop, and judge discovery_failed."""
        self._discovery_news.set()
        self._wake.set()

    def follow_discovery(self) -> None:
        """Poll the hosts the sources give now: new ones start at once, those whose grace ended stop,
        and their alerts resolve saying which source they left. Cheap when nothing changed."""
        if self.discovery is None:
            return
        self.discovery.prune()
        version = self.discovery.version
        if version == self._discovered:
            return
        self._discovered = version
        old = self.config
        new = merged(old, self.discovery.lists())
        if new.hosts == old.hosts:
            return
        if self.wiring is None:
            log.error("discovery: the host list changed, but this mode cannot add or remove hosts")
            return
        result = self.poller.reload(new.hosts, self.wiring.runner_factory(new))
        removed = self.state.set_hosts(host_pairs(new))
        sources = {h.name: h.source for h in old.hosts}
        for name in removed:
            if sources.get(name, "hosts") != "hosts":
                self._causes[name] = f"left discovery source {sources[name]}"
        self._removed.update(removed)
        self.config = new
        self._wake.set()
        log.info("discovery: hosts: %s", result.describe(), extra=ANNOUNCE)

    def _discovery_tick(self) -> None:
        try:
            self.follow_discovery()
        except Exception:  # a job that raises would end the daemon's loop
            log.exception("discovery: following the sources failed; trying again")

    # -- run modes

    def build_scheduler(self) -> schedule.Scheduler:
        """The daemon's periodic jobs: every ``poll_every``, a wake of the delivery workers, to retry
        what the outbox still holds even when no result brings news; with ``hosts_from:``, every
        second, the discovery's hosts whose grace ended; once, a second after start, the first look
        at the timetable (after it, :meth:`report_tick` knows when the next report is due)."""
        scheduler = schedule.Scheduler()
        every = self.config.schedule.poll_every
        scheduler.every(max(1, round(every))).seconds.do(self.deliver)
        if self.discovery is not None:  # a host whose grace ended is dropped within a second
            scheduler.every(1).seconds.do(self._discovery_tick)
        if self.config.schedule.reports:  # once; then report_tick knows when to look again
            scheduler.every(REPORT_FIRST_LOOK_SECONDS).seconds.do(self._first_report_look)
        return scheduler

    def _first_report_look(self) -> type[schedule.CancelJob]:
        self._reports_due_at = -math.inf
        self.report_tick()
        return schedule.CancelJob

    def due_reports(self, now: float) -> list[ReportSchedule]:
        """The reports due at ``now`` by the timetable that ``--once`` follows (:mod:`.timetable`):
        a report's period follows the clock (``every: 1h``: each clock hour), and one made in its
        period already, by this process or an earlier one (the ``report_runs`` table, read when
        not read since the last report was made), is not due."""
        last = self.last_made()
        return [spec for spec in self.config.schedule.reports if is_due(spec, last.get(spec.describe()), now)]

    def last_made(self) -> dict[str, float]:
        """When each report was last made: the ``report_runs`` table (read once, and again after a
        report), and what this process made or tried (also what a full disk kept out of the table)."""
        if self._last_made is None:
            last = self.report_runs.last()
            for name, at in self._made.items():
                last[name] = max(at, last.get(name, at))
            self._last_made = last
        return self._last_made

    def next_report_at(self, now: float) -> float:
        """The clock's time the earliest configured report is due (``now`` or before: due now)."""
        last = self.last_made()
        return min(
            (next_due(spec, last.get(spec.describe()), now) for spec in self.config.schedule.reports),
            default=math.inf,
        )

    def warmed_up(self, now: float) -> bool:
        """Whether reports may be made: every host has a first result since the start, or one
        ``poll_every`` has passed (a report made before would show hosts not polled yet)."""
        if self._started_at is None:
            return True
        with self._fresh_lock:
            answered = set(self._answered)
        waited = now - self._started_at >= self.config.schedule.poll_every
        return waited or all(h.name in answered for h in self.config.hosts)

    def report_tick(self) -> None:
        """Make and deliver each report due now, then note when the next one is due: before then
        (and unless the clock was set back since the last look) this does nothing, reads nothing.
        A report that failed is tried again in its next period, as the schedule's timers did."""
        if self.stop.is_set() or not self.config.schedule.reports:
            return
        now = self.clock()
        looked, self._reports_looked_at = self._reports_looked_at, now
        set_back = looked is not None and now < looked
        if self._reports_due_at == math.inf or (now < self._reports_due_at and not set_back):
            return  # not asked yet (the first look is a job), or nothing due before the next
        if not self.warmed_up(now):
            return
        try:
            due = self.due_reports(now)
        except StateError as exc:
            log.error("reports: cannot read when each was last made: %s; trying again", exc)
            self._reports_due_at = now + REPORT_RETRY_SECONDS
            return
        except Exception:  # a job that raises would end the daemon's loop
            log.exception("reports: cannot tell which are due; trying again")
            self._reports_due_at = now + REPORT_RETRY_SECONDS
            return
        for spec in due:
            self._made[spec.describe()] = now
            self._guarded(f"report {spec.describe()}", self.report_cycle, spec)()
        if due:
            self._last_made = None  # what the reports wrote: read back now
        try:
            self._reports_due_at = self.next_report_at(now)
        except Exception as exc:  # StateError, or worse: look again soon
            log.error("reports: cannot tell when the next is due: %s; trying again", exc)
            self._reports_due_at = now + REPORT_RETRY_SECONDS

    def report_wait(self, now: float) -> float | None:
        """Seconds until :meth:`report_tick` has something to do (None: no report configured);
        while the hosts' first results are awaited, until one ``poll_every`` has passed (a result
        wakes the loop anyway)."""
        if not self.config.schedule.reports:
            return None
        due_at = self._reports_due_at
        if due_at <= now and self._started_at is not None and not self.warmed_up(now):
            due_at = self._started_at + self.config.schedule.poll_every
        return max(due_at - now, 0.0)

    def sleep_seconds(self, scheduler: schedule.Scheduler) -> float:
        """How long the loop may sleep: until the next ``schedule`` job or report, at most
        ``recheck_seconds`` (at least 0.05 s)."""
        waits = [self.recheck_seconds, scheduler.idle_seconds, self.report_wait(self.clock())]
        return max(min(w for w in waits if w is not None), 0.05)

    def run_forever(self, install_signals: bool = True) -> int:
        """The daemon loop; returns 0 after SIGINT/SIGTERM."""
        if install_signals:
            self._install_signals()
        scheduler = self.build_scheduler()
        self._announce()
        self._started_at = self.clock()
        self.deliveries = Deliveries(self.outbox, self.channels, self.stop, on_pass=self._passed)
        self.deliveries.start()
        self.poller.start(self.config.schedule.poll_every, self.on_result)
        if self.discovery is not None:
            self.discovery.start(self.discovery_changed)
        for service in (*self.services, self.resender):
            service.start()
        try:
            while not self.stop.is_set():
                if self._reload_requested.is_set():
                    self._reload_requested.clear()
                    old_reports = self.config.schedule
                    if self.reload() and self.config.schedule != old_reports:
                        scheduler = self.build_scheduler()
                        self._reports_due_at = math.inf  # the timetable changed: its first look is a job
                        self._announce()
                if self._discovery_news.is_set():
                    self._discovery_tick()
                if self._wake.is_set() and not self.stop.wait(BATCH_SECONDS):
                    self._guarded("alerts", self.results_cycle)()
                scheduler.run_pending()
                self.report_tick()
                # A stop or reload asked while this ran (its wake cleared by take_fresh) must not wait.
                # Linux hands a signal sent to the process to its main thread, blocked here: the wait ends.
                if not (self.stop.is_set() or self._reload_requested.is_set()):
                    self._wake.wait(timeout=self.sleep_seconds(scheduler))
        finally:
            for service in (*self.services, self.resender):
                try:
                    service.stop()
                except Exception:  # one that fails to stop must not keep the hosts' connections open
                    log.exception("stopping %s failed", type(service).__name__)
            if self.discovery is not None:
                self.discovery.close()
            self.poller.close()
            self.stop.set()  # a stop of any kind ends the sends in flight
            self.deliveries.close()
            self.deliveries = None
        log.info("gpuwatch stopping: %s still in the outbox", plural(self.outbox.count(), "message"), extra=ANNOUNCE)
        return 0

    def _announce(self) -> None:
        reports = ", ".join(s.describe() for s in self.config.schedule.reports) or "none"
        log.info(
            "gpuwatch running: %s, poll every %s, reports: %s",
            plural(len(self.config.hosts), "host"),
            format_duration(self.config.schedule.poll_every),
            reports,
            extra=ANNOUNCE,
        )

    def run_once(self, reports: Sequence[tuple[ReportSchedule, Iterable[str] | None]] | None = None) -> int:
        """Poll once, evaluate the alerts, make ``reports`` (each with the names to record it
        under; default: every configured report), send what the outbox holds; 0 when all delivered
        (1 also when a channel could not prepare a message)."""
        polled = self.poller.poll(self.stop)
        for host in polled.hosts:
            self.state.update(host)
            if self.history is not None:
                self.history.record(host)
        snapshot = self.snapshot()
        try:
            self.alerts(snapshot)
        except Exception:
            log.exception("alert evaluation failed")
        self.tell_wishes(snapshot)
        for spec, record in [(s, None) for s in self.config.schedule.reports] if reports is None else reports:
            try:
                self.report(spec, snapshot, record=record)
            except Exception:
                log.exception("report %s failed", spec.describe())
        result = self.flush()
        self.resender.tick()  # a run from cron is also Alertmanager's re-post of what still fires
        left, held = self.outbox.count(), self.outbox.held
        if held:
            log.error("%d messages could not be written to the outbox (the disk is full) and are lost", held)
        if left or held:
            log.error("%d messages left in the outbox; they go first on the next run", left)
            for error in dict.fromkeys(result.errors):
                log.error("%s", error)
            return 1
        return 0 if result.dead == 0 and not self.unprepared else 1

    def _install_signals(self) -> None:
        def stop(signum: int, frame: FrameType | None) -> None:
            log.info("received %s: finishing the current step", signal.Signals(signum).name, extra=ANNOUNCE)
            self.stop.set()
            self._wake.set()

        def hup(signum: int, frame: FrameType | None) -> None:
            log.info("received SIGHUP: reloading the config", extra=ANNOUNCE)
            self.request_reload()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, hup)


def _channels_changed(old: Config, new: Config) -> bool:
    return old.channels != new.channels


def _close(channel: Channel) -> None:
    close = getattr(channel, "close", None)
    if callable(close):
        close()
