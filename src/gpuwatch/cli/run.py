"""``gpuwatch run``: the daemon, ``--once`` for cron, ``--report`` to send one now, ``--dry-run``
that sends nothing.

``--once`` makes a report only when it is due by its own schedule (:mod:`..timetable`), from when
it was last made (kept in the state database), so an hourly cron job keeps a daily report daily.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import TextIO

from ..config import REPORT_KINDS, Config, ConfigError, ReportSchedule
from ..config.load import load_config
from ..config.shard import Shard, in_shard, shard_words
from ..daemon import Daemon, Wiring
from ..logsetup import ANNOUNCE
from ..notify.base import Channel
from ..notify.console import ConsoleChannel, DryRunChannel
from ..notify.registry import channel_spec, names_in_words
from ..ssh import DEFAULT_MAX_HANDSHAKES, HandshakeSlots, fit_open_files
from ..statedir import StateLock, lock_state_dir
from ..store import DB_NAME, AlertStore, Outbox, ReportRuns, open_db, replaces_older
from ..store.history import HistorySettings
from ..store.historywriter import HistoryWriter
from ..text import local_time, plural
from ..timetable import is_due, period_start
from .common import UsageError, add_shard_option, program_words
from .preflight import refuse_unusable_key_files
from .wiring import (
    attach_web,
    build_channels,
    build_discovery,
    build_poller,
    make_runner_factory,
    with_discovered,
)

log = logging.getLogger(__name__)

REPORT_HELP = "send this report now, due or not (implies --once): overview, free, usage or user:NAME; may be repeated"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    run = sub.add_parser("run", parents=[common], help="the daemon (the default command)")
    run.add_argument(
        "--once",
        action="store_true",
        help="poll once, send the alerts and the reports due by their schedule, exit (for cron)",
    )
    run.add_argument("--report", action="append", metavar="NAME", help=REPORT_HELP)
    run.add_argument(
        "--dry-run", action="store_true", help="print the messages that would be sent; send nothing (-v: JSON too)"
    )
    add_shard_option(run, "poll")
    run.set_defaults(handler=handle)


def handle(config: Config, args: argparse.Namespace, out: TextIO, clock: Callable[[], float] = time.time) -> int:
    forced = [*(getattr(args, "report", None) or ()), *(getattr(args, "report_top", None) or ())]
    once = bool(getattr(args, "once", False) or args.once_top or forced)
    dry_run = bool(getattr(args, "dry_run", False) or args.dry_run_top)
    reports = forced_reports(config, forced)  # a typo is said before anything is polled or locked
    with _state_lock(config, once=once, dry_run=dry_run) as lock:
        return cmd_run(
            config,
            once=once,
            dry_run=dry_run,
            verbose=bool(args.verbose),
            out=out,
            lock=lock,
            forced=reports,
            clock=clock,
            shard=getattr(args, "shard", None),
        )


def forced_reports(config: Config, names: Sequence[str]) -> list[ReportSchedule]:
    """``--report overview``, ``--report user:alice``: the reports to send now (the configured
    schedule of that scope if there is one, else the report alone)."""
    configured = {spec.scope: spec for spec in reversed(config.schedule.reports)}
    found = []
    for name in names:
        kind, _, user = name.partition(":")
        if kind not in REPORT_KINDS or (kind == "user") != bool(user):
            listed = ", ".join(dict.fromkeys(spec.scope for spec in config.schedule.reports)) or "none"
            raise UsageError(
                f"--report: {name!r} is not a report; expected overview, free, usage or user:NAME "
                f"(configured: {listed})"
            )
        found.append(configured.get(name) or ReportSchedule(report=kind, user=user or None))
    return found


@contextlib.contextmanager
def _state_lock(config: Config, *, once: bool, dry_run: bool) -> Iterator[StateLock | None]:
    """The daemon and --once send from the state directory: one process at a time (a second one
    exits 1 at once, naming the first). --dry-run sends nothing and needs no lock."""
    if dry_run:
        yield None
        return
    command = "gpuwatch run" + (" --once" if once else "") + (f" -c {config.path}" if config.path else "")
    with lock_state_dir(config.state_dir, command) as lock:
        yield lock


def reports_to_make(
    config: Config,
    *,
    once: bool,
    forced: Sequence[ReportSchedule],
    last: Mapping[str, float],
    now: float,
) -> list[tuple[ReportSchedule, Iterable[str] | None]]:
    """What this run makes, each with the schedule names to record it under: the forced reports
    (recorded for the schedules of their scope, so the next cron run does not repeat them); with
    --once, the reports due by their own schedule; for a bare --dry-run, every configured report."""
    if forced:
        return [(spec, [s.describe() for s in config.schedule.reports if s.scope == spec.scope]) for spec in forced]
    if not once:
        return [(spec, None) for spec in config.schedule.reports]
    due: list[tuple[ReportSchedule, Iterable[str] | None]] = []
    for spec in config.schedule.reports:
        previous = last.get(spec.describe())
        if is_due(spec, previous, now):
            due.append((spec, None))
        else:
            assert previous is not None
            log.info(
                "report %s: not due (last made %s; next in the first run from %s)",
                spec.describe(),
                local_time(previous),
                local_time(_next_period(spec, now)),
            )
    return due


def _next_period(spec: ReportSchedule, now: float) -> float:
    start = period_start(spec, now)
    step = spec.every or 86400.0
    nxt = start + step
    while period_start(spec, nxt) <= start:  # a day with a DST change is not 86400 s long
        nxt += 3600
    return period_start(spec, nxt)


def without_unsendable_reports(config: Config) -> Config:
    """A page-only deployment (a ``web:`` section, no channel) makes no report: there is nobody to
    send one to, so the daemon neither schedules nor announces any (it said it would send the
    default overview before). Nor do channels that take alerts only (Alertmanager). Said once in the log."""
    takes_reports = [n for n in config.channels if not ((spec := channel_spec(n)) and spec.alerts_only)]
    if takes_reports or not config.schedule.reports:
        return config
    reports = ", ".join(spec.describe() for spec in config.schedule.reports)
    if config.channels:
        why = f"{', '.join(config.channels)} takes alerts only"
        log.info("%s: the reports in schedule.reports (%s) are not made", why, reports, extra=ANNOUNCE)
    else:
        log.info(
            "no channel configured: the reports in schedule.reports (%s) are not made; the web page shows the fleet",
            reports,
            extra=ANNOUNCE,
        )
    return replace(config, schedule=replace(config.schedule, reports=()))


def cmd_run(
    config: Config,
    *,
    once: bool,
    dry_run: bool,
    verbose: bool,
    out: TextIO,
    lock: StateLock | None = None,
    forced: Sequence[ReportSchedule] = (),
    clock: Callable[[], float] = time.time,
    shard: Shard | None = None,
) -> int:
    """``shard`` (``--shard``) wins over the config's ``shard:``, on start and on every reload."""
    config = in_shard(config, shard)
    _announce_shard(config)
    refuse_unusable_key_files(config)
    fit_open_files(config.hosts)  # raises the soft limit first; a fleet that cannot fit is refused
    stop = threading.Event()

    def sleep(seconds: float) -> None:
        stop.wait(seconds)  # SIGTERM during a Feishu outage must not wait out the retry backoff

    channels = build_channels(config, sleep, stop)
    now = clock()
    if dry_run:
        real = channels or {"console": ConsoleChannel(out)}
        channels = {name: DryRunChannel(ch, out, verbose) for name, ch in real.items()}
        reports = reports_to_make(config, once=once, forced=forced, last=_real_report_runs(config), now=now)
        _show_pending(config, channels, out, replaced={spec.scope for spec, _ in reports})
        outbox = Outbox(open_db(None))  # a throw-away outbox: the real one is left as it is
        alert_store = AlertStore(outbox.db)
        _copy_alert_state(config, alert_store)
    else:
        if not channels and (config.web is None or once):
            raise ConfigError(
                f"no channel configured ({names_in_words()}), so there is "
                "nowhere to send reports; add one (see config.example.yaml), a web: section for a page-only "
                "deployment, or use --dry-run"
            )
        config = without_unsendable_reports(config)
        outbox = Outbox(open_db(config.state_dir, lock=lock))
        alert_store = AlertStore(outbox.db)
        reports = reports_to_make(config, once=once, forced=forced, last=ReportRuns(outbox.db).last(), now=now)
    handshakes = HandshakeSlots(DEFAULT_MAX_HANDSHAKES)
    discovery = build_discovery(config, handshakes)
    config = with_discovered(config, discovery)
    if discovery is not None:
        fit_open_files(config.hosts)  # the discovered hosts count too
    poller = build_poller(config, handshakes)
    path = config.path
    history = None  # --dry-run records nothing
    if config.history.enabled and not dry_run:
        history = HistoryWriter(config.state_dir, HistorySettings.of(config), config.schedule.poll_every, clock=clock)

    def reload_config() -> Config:
        if path is None:
            return config
        new = in_shard(load_config(path), shard)
        _announce_shard(new)
        refuse_unusable_key_files(new)
        return new if dry_run else without_unsendable_reports(new)

    wiring = Wiring(
        load_config=reload_config,
        runner_factory=lambda new: make_runner_factory(new, handshakes),
        build_channels=lambda new: build_channels(new, sleep, stop),
    )
    daemon = Daemon(
        config,
        poller,
        outbox,
        channels,
        alert_store=alert_store,
        stop=stop,
        wiring=wiring,
        clock=clock,
        program=program_words(),
        discovery=discovery,  # followed by run_forever; --once judges discovery_failed with it
        history=history,
    )
    try:
        if once or dry_run:
            return daemon.run_once(reports)
        attach_web(config, daemon)
        if history is not None:
            daemon.services.append(history)
        return daemon.run_forever()
    finally:
        if discovery is not None:
            discovery.close()
        if history is not None:
            history.stop()
        poller.close()
        outbox.db.close()
        for channel in daemon.channels.values():
            close = getattr(channel, "close", None)
            if callable(close):
                close()


SHARD_NAMES_SHOWN = 10  # the start-up line names this many of a shard's hosts, then counts the rest


def _announce_shard(config: Config) -> None:
    """Say which shard this is (once at start and on each reload); a shard that holds no host is
    worth a warning (a small fleet, or N larger than meant)."""
    if config.shard is None:
        return
    if not config.hosts:
        log.warning("%s: this shard holds no host; it polls nothing until one is added", shard_words(config))
        return
    names = [h.name for h in config.hosts]
    shown = ", ".join(names[:SHARD_NAMES_SHOWN]) + (
        f", +{len(names) - SHARD_NAMES_SHOWN}" if len(names) > SHARD_NAMES_SHOWN else ""
    )
    log.info("%s (%s)", shard_words(config), shown, extra=ANNOUNCE)


def _real_report_runs(config: Config) -> dict[str, float]:
    """--dry-run --once: when the real runs last made each report (read only)."""
    if not (config.state_dir / DB_NAME).exists():
        return {}
    db = open_db(config.state_dir, read_only_ok=True)
    try:
        return ReportRuns(db).last()
    finally:
        db.close()


def _copy_alert_state(config: Config, target: AlertStore) -> None:
    """--dry-run starts from the real alert state, so it shows what a real run would announce."""
    if not (config.state_dir / DB_NAME).exists():
        return
    db = open_db(config.state_dir, read_only_ok=True)
    try:
        real = AlertStore(db)
        target.save(real.records(), real.memory())
        for s in real.silences():
            target.add_silence(
                ends_at=s.ends_at,
                comment=s.comment,
                now=s.created_at,
                rule=s.rule,
                host=s.host,
                user=s.user,
                gpu=s.gpu,
                pid=s.pid,
                author=s.author,
            )
    finally:
        db.close()


def _show_pending(config: Config, channels: dict[str, Channel], out: TextIO, replaced: set[str]) -> None:
    """--dry-run: what the real outbox still holds would go first; show it, touch nothing. A
    waiting report that this run's report of the same scope would replace is only named."""
    if not (config.state_dir / DB_NAME).exists():
        return
    db = open_db(config.state_dir, read_only_ok=True)
    try:
        for item in Outbox(db).pending():
            if replaces_older(item.kind, item.scope) and item.scope in replaced:
                out.write(f"(still in the outbox, replaced by this run's newer one: {item.summary})\n")
                continue
            tries = plural(item.attempts, "failed attempt")
            out.write(f"(still in the outbox since {local_time(item.created_at)}, {tries})\n")
            channel = channels.get(item.channel)
            if channel is not None:
                channel.deliver(item.payload)
    finally:
        db.close()
