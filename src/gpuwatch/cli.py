"""Command line: ``main(argv) -> exit code``. Builds everything and passes it down.

Exit codes: 0 success, 1 the work failed (no host answered, a message left unsent, another
gpuwatch holds the state directory), 2 bad config or usage, or a state directory that cannot
be used (read-only, full, not a directory). Errors are one clear line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import getpass
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TextIO

from . import __version__
from .config import (
    Config,
    ConfigError,
    HostConfig,
    find_config_path,
    load_config,
    parse_duration,
)
from .daemon import Daemon, Wiring
from .logsetup import setup_logging
from .model import HostErrorKind, HostSnapshot
from .notify.base import Channel, DeliveryError, Message
from .notify.console import ConsoleChannel, DryRunChannel
from .notify.email import EmailChannel, EmailSettings
from .notify.feishu import FeishuChannel, FeishuSettings
from .poll import Poller
from .probe import ProbeSettings
from .render import fleet_table, snapshot_dict
from .report import alert_words
from .rules import RULE_NAMES
from .ssh import DEFAULT_MAX_HANDSHAKES, HostKeyStore, LocalRunner, Runner, SshConnection, load_ssh_config
from .statedir import StateError, StateLock, lock_state_dir
from .store import DB_NAME, AlertStore, Outbox, open_db
from .text import local_time

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


class UsageError(ConfigError):
    """A command-line mistake (not the config file's); exit 2 like a config error."""


def build_parser() -> argparse.ArgumentParser:
    # -c and -v are accepted before or after the command; the command's copies default to
    # SUPPRESS so that they never overwrite a value given before the command.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-c", "--config", default=argparse.SUPPRESS, help="config file (default: $GPUWATCH_CONFIG, else ./config.yaml)"
    )
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log more to stderr")

    parser = argparse.ArgumentParser(
        prog="gpuwatch",
        description="Watch a fleet of NVIDIA GPU servers over SSH and report to Feishu.",
    )
    parser.add_argument("-c", "--config", help="config file (default: $GPUWATCH_CONFIG, else ./config.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more to stderr")
    parser.add_argument("--version", action="version", version=f"gpuwatch {__version__}")
    parser.add_argument("--once", dest="once_top", action="store_true", help="same as 'run --once'")
    parser.add_argument("--dry-run", dest="dry_run_top", action="store_true", help="same as 'run --dry-run'")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", parents=[common], help="the daemon (the default command)")
    run.add_argument("--once", action="store_true", help="poll once, send the reports now, exit (for cron)")
    run.add_argument(
        "--dry-run", action="store_true", help="print the messages that would be sent; send nothing (-v: JSON too)"
    )
    status = sub.add_parser("status", parents=[common], help="poll every host once and print the fleet")
    status.add_argument("--json", action="store_true", help="print the snapshot as JSON")
    sub.add_parser("check", parents=[common], help="validate the config and try each host once")
    sub.add_parser("test-notify", parents=[common], help="send one test message through each channel")
    alerts = sub.add_parser("alerts", parents=[common], help="list firing and silenced alerts")
    alerts.add_argument("--json", action="store_true", help="print them as JSON")
    alerts.add_argument("--all", action="store_true", help="include pending alerts (waiting for 'for')")
    silence = sub.add_parser("silence", parents=[common], help="mute alerts for a while: add, list, remove")
    silence_sub = silence.add_subparsers(dest="silence_command", metavar="ACTION", required=True)
    add = silence_sub.add_parser("add", parents=[common], help="mute the alerts that match every given field")
    add.add_argument("--rule", choices=RULE_NAMES, help="alert rule")
    add.add_argument("--host", help="host name as in the config")
    add.add_argument("--user", help="user name")
    add.add_argument("--gpu", type=int, help="GPU index")
    add.add_argument("--for", dest="duration", required=True, help="how long, e.g. 2h, 24h, 7d")
    add.add_argument("--comment", required=True, help="why (shown in 'gpuwatch alerts')")
    silence_sub.add_parser("list", parents=[common], help="silences in force")
    remove = silence_sub.add_parser("remove", parents=[common], help="end a silence now")
    remove.add_argument("id", type=int, help="the silence's id (see 'silence list')")
    return parser


def _secrets(config: Config) -> list[str]:
    values = [config.ssh.resolve_password() or ""]
    values += [h.ssh.resolve_password() or "" for h in config.hosts]
    if config.email is not None:
        values.append(config.email.resolve_password() or "")
    if config.feishu is not None:
        values += [config.feishu.resolve_secret() or "", config.feishu.resolve_url() or ""]
    return [v for v in values if v]


def make_runner_factory(
    config: Config, handshakes: threading.Semaphore | None = None
) -> Callable[[HostConfig], Runner]:
    """Runners for each host: one persistent SSH connection, or the local shell. ``handshakes``
    limits SSH handshakes in flight across the fleet (one per process, kept across reloads)."""
    if handshakes is None:
        handshakes = threading.BoundedSemaphore(DEFAULT_MAX_HANDSHAKES)
    user_files = tuple(
        dict.fromkeys(Path(os.path.expanduser(h.ssh.known_hosts)) for h in config.hosts if h.ssh.known_hosts)
    )
    store = HostKeyStore(config.state_dir / "known_hosts", user_files)
    ssh_config = load_ssh_config()

    def factory(host: HostConfig) -> Runner:
        if host.local:
            return LocalRunner()
        return SshConnection(host, store, ssh_config, handshakes=handshakes)

    return factory


def build_poller(config: Config, handshakes: threading.Semaphore | None = None) -> Poller:
    return Poller(
        config.hosts,
        make_runner_factory(config, handshakes),
        max_parallel=config.max_parallel,
        settings=ProbeSettings.of(config),
    )


def cmd_status(config: Config, as_json: bool, out: TextIO) -> int:
    poller = build_poller(config)
    try:
        snapshot = poller.poll()
    finally:
        poller.close()
    if as_json:
        json.dump(snapshot_dict(snapshot), out, indent=2, ensure_ascii=False, allow_nan=False)
        out.write("\n")
    else:
        out.write(fleet_table(snapshot, config.free_gpu) + "\n")
    return EXIT_OK if snapshot.answered else EXIT_FAILED


_HINTS = {
    HostErrorKind.UNREACHABLE: "check the address and port; try it by hand: ssh -p {port} {user}@{address}",
    HostErrorKind.AUTH_FAILED: "check ssh.user and ssh.key_file (or the host's), or set the password variable "
    "named by password_env",
    HostErrorKind.HOST_KEY_UNKNOWN: "verify the fingerprint with the host's admin, then run the ssh-keyscan line above",
    HostErrorKind.HOST_KEY_CHANGED: "ask the host's admin whether it was reinstalled before removing the old key",
    HostErrorKind.NVIDIA_SMI_NOT_FOUND: "install the NVIDIA driver there, or set 'nvidia_smi: /path/to/nvidia-smi' "
    "for this host",
    HostErrorKind.DRIVER_MISMATCH: "the driver was upgraded under a running kernel module: reboot the host",
    HostErrorKind.DRIVER_NOT_LOADED: "check 'lsmod | grep nvidia' and 'dmesg' on the host",
    HostErrorKind.GPU_LOST: "a GPU fell off the bus: reboot the host; if it recurs, check cooling and power",
    HostErrorKind.NO_DEVICES: "no GPU visible to the driver: check 'lspci | grep -i nvidia' and 'dmesg'",
    HostErrorKind.PROBE_TIMEOUT: "raise ssh.command_timeout if the host is just slow; a hung nvidia-smi needs a reboot",
    HostErrorKind.PERMISSION_DENIED: "the login user may not query the GPUs: check /dev/nvidia* permissions",
}


def _hint(host: HostConfig, snap: HostSnapshot) -> str:
    template = _HINTS.get(snap.error_kind) if snap.error_kind else None
    if not template:
        return ""
    return template.format(
        port=host.ssh.port or 22, user=host.ssh.user or getpass.getuser(), address=host.address or host.name
    )


def cmd_check(config: Config, out: TextIO) -> int:
    count = len(config.hosts)
    out.write(f"config {config.path}: OK ({count} host{'s' if count != 1 else ''})\n")
    for warning in config.warnings:
        out.write(f"warning: {warning}\n")
    poller = build_poller(config)
    try:
        snapshot = poller.poll()
    finally:
        poller.close()
    by_name = {h.name: h for h in config.hosts}
    for snap in snapshot.hosts:
        if snap.ok:
            procs = len(snap.processes)
            secs = f"{snap.probe_seconds:.2f}s" if snap.probe_seconds is not None else "?"
            out.write(f"{snap.name}: OK: {len(snap.gpus)} GPUs, {procs} GPU processes ({secs})\n")
            for issue in snap.warnings:
                out.write(f"  warning: {issue.message}\n")
        else:
            kind = snap.error_kind.value if snap.error_kind else "error"
            out.write(f"{snap.name}: FAILED ({kind}): {snap.error}\n")
            hint = _hint(by_name[snap.name], snap)
            if hint:
                out.write(f"  hint: {hint}\n")
    failed = len(snapshot.down)
    out.write(f"{len(snapshot.hosts) - failed}/{len(snapshot.hosts)} hosts OK\n")
    return EXIT_OK if failed == 0 else EXIT_FAILED


def build_channels(config: Config, sleep: Callable[[float], None] = time.sleep) -> dict[str, Channel]:
    """The configured channels, keyed by name (the outbox remembers each message's channel).

    ``sleep`` paces retries and rate limits; the daemon passes one that a stop request cuts short.
    """
    channels: dict[str, Channel] = {}
    if config.feishu is not None:
        url = config.feishu.resolve_url()
        if not url:
            raise ConfigError(f"feishu.url_env: ${config.feishu.url_env} is not set in the environment")
        secret = config.feishu.resolve_secret()
        if config.feishu.secret_env and not secret:
            raise ConfigError(f"feishu.secret_env: ${config.feishu.secret_env} is not set in the environment")
        try:
            feishu = FeishuSettings(
                url=url,
                keyword=config.feishu.keyword,
                secret=secret,
                format=config.feishu.format,
                mentions=dict(config.feishu.mentions),
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        channels["feishu"] = FeishuChannel(feishu, sleep=sleep)
    if config.email is not None:
        email = config.email
        password = email.resolve_password()
        if email.password_env and not password:
            raise ConfigError(f"email.password_env: ${email.password_env} is not set in the environment")
        try:
            settings = EmailSettings(
                to=email.to,
                sender=email.sender,
                smtp_host=email.smtp_host,
                smtp_port=email.smtp_port,
                username=email.username,
                password=password,
                tls=email.tls,
                ca_file=email.ca_file,
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        channels["email"] = EmailChannel(settings, sleep=sleep)
    return channels


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

    channels = build_channels(config, sleep)
    if dry_run:
        real = channels or {"console": ConsoleChannel(out)}
        channels = {name: DryRunChannel(ch, out, verbose) for name, ch in real.items()}
        _show_pending(config, channels, out)
        outbox = Outbox(open_db(None))  # a throw-away outbox: the real one is left as it is
        alert_store = AlertStore(outbox.db)
        _copy_alert_state(config, alert_store)
    else:
        if not channels:
            raise ConfigError(
                "feishu: not configured (nor email:), so there is nowhere to send reports; add a feishu: section "
                "(see config.example.yaml) or use --dry-run"
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
        build_channels=lambda new: build_channels(new, sleep),
    )
    daemon = Daemon(config, poller, outbox, channels, alert_store=alert_store, stop=stop, wiring=wiring)
    try:
        if once or dry_run:
            return daemon.run_once()
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


def cmd_alerts(config: Config, *, as_json: bool, include_pending: bool, out: TextIO) -> int:
    """What the alert state says now (as of the last poll of a daemon or --once run)."""
    db = open_db(config.state_dir)
    try:
        store = AlertStore(db)
        now = time.time()
        silences = store.silences(now)
        rows = []
        for record in sorted(store.records().values(), key=lambda r: (r.state != "firing", r.since)):
            if record.state != "firing" and not include_pending:
                continue
            by = [s.id for s in silences if s.matches(record.key, now)]
            rows.append((record, by))
    finally:
        db.close()
    if as_json:
        data = [{**r.as_dict(), "summary": alert_words(r).summary, "silenced_by": by} for r, by in rows]
        json.dump({"alerts": data, "silences": [asdict(s) for s in silences]}, out, indent=2, ensure_ascii=False)
        out.write("\n")
        return EXIT_OK
    if not rows:
        out.write("no alerts firing\n")
    by_id = {s.id: s for s in silences}
    for record, by in rows:
        state = record.state.upper() + (f" (silenced by #{', #'.join(map(str, by))})" if by else "")
        words = alert_words(record)
        out.write(f"{state:<10} {record.key.rule}  {words.summary}\n")
        out.write(f"           since {local_time(record.since)}; threshold: {words.threshold}\n")
        for sid in by:
            silence = by_id[sid]
            out.write(f"           silence #{sid} until {local_time(silence.ends_at)}: {silence.comment}\n")
    return EXIT_OK


def cmd_silence(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    db = open_db(config.state_dir)
    try:
        store = AlertStore(db)
        now = time.time()
        if args.silence_command == "add":
            if not any((args.rule, args.host, args.user, args.gpu is not None)):
                raise UsageError("silence add: give at least one of --rule, --host, --user, --gpu")
            names = [h.name for h in config.hosts]
            if args.host and args.host not in names:
                close = difflib.get_close_matches(args.host, names, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise UsageError(f"silence add --host: {args.host!r} is not a configured host{hint}")
            try:
                seconds = parse_duration(args.duration, "silence add --for")
            except ConfigError as exc:
                raise UsageError(str(exc)) from None
            if seconds <= 0:
                raise UsageError("silence add --for: must be longer than 0s, e.g. 2h, 24h, 7d")
            silence = store.add_silence(
                ends_at=now + seconds,
                comment=args.comment,
                now=now,
                rule=args.rule,
                host=args.host,
                user=args.user,
                gpu=args.gpu,
            )
            out.write(f"silence #{silence.id} added: {silence.describe()} until {local_time(silence.ends_at)}\n")
            return EXIT_OK
        if args.silence_command == "list":
            silences = store.silences(now)
            if not silences:
                out.write("no silences in force\n")
            for s in silences:
                out.write(f"#{s.id}  {s.describe()}  until {local_time(s.ends_at)}  ({s.comment})\n")
            return EXIT_OK
        if store.remove_silence(args.id):
            out.write(f"silence #{args.id} removed\n")
            return EXIT_OK
        out.write(f"no silence #{args.id}\n")
        return EXIT_FAILED
    finally:
        db.close()


def cmd_test_notify(config: Config, out: TextIO) -> int:
    channels = build_channels(config)
    if not channels:
        raise ConfigError("feishu: not configured; add a feishu: section with the bot's webhook url")
    message = Message(
        title="gpuwatch test message",
        blocks=(
            f"If you can read this, gpuwatch on {socket.gethostname()} can post to this group.",
            f"config: {config.path}",
        ),
        kind="test",
    )
    failures = 0
    for name, channel in channels.items():
        try:
            for payload in channel.prepare(message):
                channel.deliver(payload)
        except DeliveryError as exc:
            failures += 1
            out.write(f"{name}: NOT accepted: {exc}\n")
            continue
        out.write(f"{name}: accepted\n")
    return EXIT_OK if failures == 0 else EXIT_FAILED


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    parser = build_parser()
    args = parser.parse_args(argv)
    command = args.command or "run"
    once = bool(getattr(args, "once", False) or args.once_top)
    dry_run = bool(getattr(args, "dry_run", False) or args.dry_run_top)
    if command != "run" and (args.once_top or args.dry_run_top):
        parser.error(f"--once and --dry-run go with 'run', not '{command}'")
    try:
        config = load_config(find_config_path(args.config))
    except ConfigError as exc:
        print(f"gpuwatch: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        setup_logging(
            config.state_dir,
            level="DEBUG" if args.verbose else config.log_level,
            stderr_level="INFO" if args.verbose else "WARNING",
            secrets=_secrets(config),
        )
    except StateError as exc:
        print(f"gpuwatch: error: {exc}", file=sys.stderr)
        return exc.exit_code
    for warning in config.warnings:
        log.warning("%s", warning)
    try:
        if command == "status":
            return cmd_status(config, args.json, out)
        if command == "check":
            return cmd_check(config, out)
        if command == "run":
            with _state_lock(config, once=once, dry_run=dry_run) as lock:
                return cmd_run(config, once=once, dry_run=dry_run, verbose=args.verbose, out=out, lock=lock)
        if command == "test-notify":
            return cmd_test_notify(config, out)
        if command == "alerts":
            return cmd_alerts(config, as_json=args.json, include_pending=args.all, out=out)
        if command == "silence":
            return cmd_silence(config, args, out)
    except ConfigError as exc:
        kind = "error" if isinstance(exc, UsageError) else "config error"
        print(f"gpuwatch: {kind}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except StateError as exc:
        print(f"gpuwatch: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {command}")
    return EXIT_CONFIG


def main_entry() -> None:
    """The console script."""
    sys.exit(main())
