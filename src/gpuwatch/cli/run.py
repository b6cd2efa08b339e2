"""``gpuwatch run``: the daemon, ``--once`` for cron, ``--dry-run`` that sends nothing."""

from __future__ import annotations

import argparse
import contextlib
import threading
from collections.abc import Iterator
from typing import TextIO

from ..config import Config, ConfigError, load_config
from ..daemon import Daemon, Wiring
from ..notify.base import Channel
from ..notify.console import ConsoleChannel, DryRunChannel
from ..ssh import DEFAULT_MAX_HANDSHAKES
from ..statedir import StateLock, lock_state_dir
from ..store import DB_NAME, AlertStore, Outbox, open_db
from .wiring import attach_web, build_channels, build_poller, make_runner_factory


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    run = sub.add_parser("run", parents=[common], help="the daemon (the default command)")
    run.add_argument("--once", action="store_true", help="poll once, send the reports now, exit (for cron)")
    run.add_argument(
        "--dry-run", action="store_true", help="print the messages that would be sent; send nothing (-v: JSON too)"
    )
    run.set_defaults(handler=handle)


def handle(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    once = bool(getattr(args, "once", False) or args.once_top)
    dry_run = bool(getattr(args, "dry_run", False) or args.dry_run_top)
    with _state_lock(config, once=once, dry_run=dry_run) as lock:
        return cmd_run(config, once=once, dry_run=dry_run, verbose=bool(args.verbose), out=out, lock=lock)


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


def cmd_run(
    config: Config, *, once: bool, dry_run: bool, verbose: bool, out: TextIO, lock: StateLock | None = None
) -> int:
    stop = threading.Event()

    def sleep(seconds: float) -> None:
        stop.wait(seconds)  # SIGTERM during a Feishu outage must not wait out the retry backoff

    channels = build_channels(config, sleep, stop)
    if dry_run:
        real = channels or {"console": ConsoleChannel(out)}
        channels = {name: DryRunChannel(ch, out, verbose) for name, ch in real.items()}
        _show_pending(config, channels, out)
        outbox = Outbox(open_db(None))  # a throw-away outbox: the real one is left as it is
        alert_store = AlertStore(outbox.db)
        _copy_alert_state(config, alert_store)
    else:
        if not channels and (config.web is None or once):
            raise ConfigError(
                "no channel configured (feishu:, dingtalk:, wecom:, slack:, webhook: or email:), so there is "
                "nowhere to send reports; add one (see config.example.yaml), a web: section for a page-only "
                "deployment, or use --dry-run"
            )
        outbox = Outbox(open_db(config.state_dir, lock=lock))
        alert_store = AlertStore(outbox.db)
    handshakes = threading.BoundedSemaphore(DEFAULT_MAX_HANDSHAKES)
    poller = build_poller(config, handshakes)
    path = config.path

    def reload_config() -> Config:
        return load_config(path) if path is not None else config

    wiring = Wiring(
        load_config=reload_config,
        runner_factory=lambda new: make_runner_factory(new, handshakes),
        build_channels=lambda new: build_channels(new, sleep, stop),
    )
    daemon = Daemon(config, poller, outbox, channels, alert_store=alert_store, stop=stop, wiring=wiring)
    try:
        if once or dry_run:
            return daemon.run_once()
        attach_web(config, daemon)
        return daemon.run_forever()
    finally:
        poller.close()
        outbox.db.close()
        for channel in daemon.channels.values():
            close = getattr(channel, "close", None)
            if callable(close):
                close()


def _copy_alert_state(config: Config, target: AlertStore) -> None:
    """--dry-run starts from the real alert state, so it shows what a real run would announce."""
    if not (config.state_dir / DB_NAME).exists():
        return
    db = open_db(config.state_dir)
    try:
        real = AlertStore(db)
        target.save(real.records(), real.memory())
        for s in real.silences():
            target.add_silence(
                ends_at=s.ends_at, comment=s.comment, now=s.created_at, rule=s.rule, host=s.host, user=s.user, gpu=s.gpu
            )
    finally:
        db.close()


def _show_pending(config: Config, channels: dict[str, Channel], out: TextIO) -> None:
    """--dry-run: what the real outbox still holds would go first; show it, touch nothing."""
    if not (config.state_dir / DB_NAME).exists():
        return
    db = open_db(config.state_dir)
    try:
        for item in Outbox(db).pending():
            out.write(f"(still in the outbox since {item.created_at:.0f}, {item.attempts} failed attempts)\n")
            channel = channels.get(item.channel)
            if channel is not None:
                channel.deliver(item.payload)
    finally:
        db.close()
