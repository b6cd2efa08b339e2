"""``gpuwatch notify-when-free`` and ``notify-when-done``: "tell me when", one message, once.

Each command registers a one-shot wish in the state database (the daemon, or the next ``--once``
run, reads the open wishes every cycle: no restart), lists them (``--list``, ``--json``, ``--all``
with the ended ones) or cancels one (``--cancel ID``). What a wish waits for and what its message
says is :mod:`gpuwatch.wishes`; who registered it (the login name) is kept with it.

``notify-when-done`` polls that one host first: a process it does not list as a GPU process there
is refused (nothing to wait for), as is a host that does not answer (nothing can be told of it).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import getpass
import re
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from ..config import Config, ConfigError, HostConfig, parse_duration
from ..model import HostSnapshot
from ..notify.registry import CHANNELS, channel_spec, names_in_words
from ..rules import processes_known
from ..store import open_db
from ..store.wishes import WishStore
from ..text import format_duration, iso_time, local_time
from ..wishes import DONE, FREE, Wish, observed, process_start
from .common import EXIT_FAILED, EXIT_OK, UsageError, read_state, write_json
from .wiring import build_poller

COMMANDS = {FREE: "notify-when-free", DONE: "notify-when-done"}
#: How long a wish waits when ``--for`` is not given.
DEFAULT_FOR = {FREE: "1d", DONE: "30d"}

#: Polls one host once: what ``notify-when-done`` sees of the process before it registers the wish.
PollHost = Callable[[Config, HostConfig], HostSnapshot]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    free = sub.add_parser(
        COMMANDS[FREE],
        parents=[common],
        help="one message when N GPUs are free (on one host, of a model): --list, --cancel ID",
        description="Register a one-shot wish: when N GPUs (--gpus) are free at once (on one host with --same-host; "
        "with --model, GPUs whose name holds that text, any case), one message to the channels that carry "
        "reports names the hosts and GPU indexes, @-mentioning the user where the channel knows them, and the "
        f"wish ends. Unmet after --for (default {DEFAULT_FOR[FREE]}), it ends with a short message saying so. "
        "The running daemon (or the next --once run) picks it up; no restart.",
    )
    free.add_argument("--user", help="who is told, and mentioned (default: your login name)")
    free.add_argument("--gpus", type=int, metavar="N", help="how many GPUs must be free at once")
    free.add_argument("--same-host", action="store_true", help="all of them on one host")
    free.add_argument("--model", help="only GPUs whose name holds this text, any case (e.g. A100, h100 80gb)")
    _common_options(free, FREE)
    done = sub.add_parser(
        COMMANDS[DONE],
        parents=[common],
        help="one message when a GPU process ends (how long it ran, its peak GPU memory): --list, --cancel ID",
        description="Register a one-shot wish: when process PID on HOST ends (a poll of that host lists every "
        "GPU process and it is not among them, or the pid now belongs to another process), one message to the "
        "channels that carry reports says how long it ran and its peak GPU memory (as the polls saw it), "
        "@-mentioning the user where the channel knows them. A host that is down says nothing about the process. "
        "The host is polled first: a pid that is not a GPU process there is refused.",
    )
    done.add_argument("--host", help="the host, as named in the config")
    done.add_argument("--pid", type=int, help="the process id on that host")
    done.add_argument("--user", help="who is told, and mentioned (default: the process's owner)")
    _common_options(done, DONE)


def _common_options(parser: argparse.ArgumentParser, kind: str) -> None:
    parser.add_argument(
        "--for", dest="duration", help=f"give up after this long, e.g. 12h, 2d (default {DEFAULT_FOR[kind]})"
    )
    parser.add_argument("--list", action="store_true", help="list the open wishes of this kind instead")
    parser.add_argument("--all", action="store_true", help="with --list: also those ended in the last 7 days")
    parser.add_argument("--json", action="store_true", help="with --list: one JSON list")
    parser.add_argument("--cancel", metavar="ID", help="cancel an open wish: its id as --list shows it, 3 or #3")
    parser.set_defaults(handler=lambda config, args, out: cmd_wish(config, args, out, kind=kind))


def only_reads(args: argparse.Namespace) -> bool:
    """Whether this invocation only reads the state (``--list``)."""
    return bool(getattr(args, "list", False))


def cmd_wish(
    config: Config,
    args: argparse.Namespace,
    out: TextIO,
    *,
    kind: str,
    poll_host: PollHost | None = None,
    clock: Callable[[], float] = time.time,
) -> int:
    """Register, list or cancel a wish of ``kind``."""
    command = COMMANDS[kind]
    given = _given(args, kind)
    if args.list or args.cancel is not None:
        mode = "--list" if args.list else "--cancel"
        if args.list:
            given += ["cancel"] if args.cancel is not None else []
        else:
            given += [name for name in ("all", "json") if getattr(args, name)]
        clash = [f"--{name.replace('_', '-')}" for name in given]
        if clash:
            raise UsageError(f"{command} {mode}: {', '.join(clash)} cannot go with it")
        if args.list:
            return _list(config, kind, args, out, clock())
        return _cancel(config, kind, args.cancel, out, clock())
    if args.all or args.json:
        raise UsageError(f"{command}: --all and --json go with --list")
    tellers = [name for name in config.channels if not ((spec := channel_spec(name)) and spec.alerts_only)]
    if not tellers:  # Alertmanager takes alerts only: a wish's message would reach no one
        carriers = names_in_words(tuple(spec for spec in CHANNELS if not spec.alerts_only))
        only = f" ({', '.join(config.channels)}: alerts only)" if config.channels else ""
        raise UsageError(
            f"{command}: no channel is configured ({carriers}){only}, so there is nobody to tell; nothing registered"
        )
    seconds = _seconds(args.duration or DEFAULT_FOR[kind], command)
    if kind == FREE:
        return _add_free(config, args, out, seconds, clock)
    return _add_done(config, args, out, seconds, poll_host or poll_one, clock)


def _given(args: argparse.Namespace, kind: str) -> list[str]:
    names = ["user", "gpus", "model", "duration"] if kind == FREE else ["host", "pid", "user", "duration"]
    given = [n for n in names if getattr(args, n, None) is not None]
    if kind == FREE and args.same_host:
        given.append("same_host")
    return ["for" if n == "duration" else n for n in given]


def _seconds(text: str, command: str) -> float:
    try:
        seconds = parse_duration(text, f"{command} --for")
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    if seconds <= 0:
        raise UsageError(f"{command} --for: must be longer than 0s, e.g. 12h, 2d")
    return seconds


def _login_name() -> str | None:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no name for this uid (a container), no environment: no author
        return None


def _add_free(config: Config, args: argparse.Namespace, out: TextIO, seconds: float, clock: Callable[[], float]) -> int:
    command = COMMANDS[FREE]
    if args.gpus is None:
        raise UsageError(f"{command}: give --gpus N (how many GPUs must be free at once), or --list / --cancel ID")
    if args.gpus < 1:
        raise UsageError(f"{command} --gpus: at least 1, got {args.gpus}")
    model = args.model.strip() if args.model else None
    if args.model is not None and not model:
        raise UsageError(f"{command} --model: give a part of the GPU's name, e.g. A100")
    user = args.user or _login_name()
    now = clock()
    wish = Wish(0, FREE, user, _login_name(), now, now + seconds, gpus=args.gpus, same_host=args.same_host, model=model)
    return _added(config, wish, out)


def _added(config: Config, wish: Wish, out: TextIO, seen: str = "") -> int:
    db = open_db(config.state_dir)
    try:
        wish = WishStore(db).add(wish)
    finally:
        db.close()
    whom = wish.user or "the channels"
    what = f"{wish.describe()} {'is' if wish.gpus == 1 else 'are'} free" if wish.kind == FREE else ""
    if wish.kind == DONE:
        what = f"{wish.describe()} ends{seen}"
    out.write(f"wish #{wish.id} added: tell {whom} when {what}; until {local_time(wish.expires_at)}\n")
    if wish.user and not _mentioned_anywhere(config, wish.user):
        sys.stderr.write(
            f"note: no channel has a mention for {wish.user!r} (e.g. feishu.mentions): the message names them "
            "without an @\n"
        )
    return EXIT_OK


def _mentioned_anywhere(config: Config, user: str) -> bool:
    for name, settings in config.channels.items():
        spec = channel_spec(name)
        if spec is not None and user in spec.mentions(settings):
            return True
    return False


def poll_one(config: Config, host: HostConfig) -> HostSnapshot:
    """Poll ``host`` once, as ``status HOST`` does."""
    poller = build_poller(dataclasses.replace(config, hosts=(host,)))
    try:
        return poller.poll().hosts[0]
    finally:
        poller.close()


def _host(config: Config, name: str) -> HostConfig:
    for host in config.hosts:
        if host.name == name:
            return host
    names = [h.name for h in config.hosts]
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise UsageError(
        f"{COMMANDS[DONE]} --host: {name!r} is not a configured host; {hint}configured: {', '.join(names) or 'none'}"
    )


def _add_done(
    config: Config,
    args: argparse.Namespace,
    out: TextIO,
    seconds: float,
    poll_host: PollHost,
    clock: Callable[[], float],
) -> int:
    command = COMMANDS[DONE]
    if args.host is None or args.pid is None:
        raise UsageError(f"{command}: give --host HOST and --pid PID, or --list / --cancel ID")
    host = _host(config, args.host)
    snapshot = poll_host(config, host)
    if not snapshot.ok:
        out.write(
            f"{host.name} did not answer ({snapshot.error_name}: {snapshot.error}): cannot tell whether process "
            f"{args.pid} runs there; nothing registered, try again when it answers\n"
        )
        return EXIT_FAILED
    mine = [p for p in snapshot.processes if p.pid == args.pid]
    if not mine:
        others = ", ".join(sorted({f"{p.pid} ({p.owner or 'owner unknown'})" for p in snapshot.processes}))
        out.write(
            f"process {args.pid} is not a GPU process on {host.name} now (its GPU processes: {others or 'none'}); "
            "nothing registered\n"
        )
        return EXIT_FAILED
    if not processes_known(snapshot):
        sys.stderr.write(f"warning: {host.name} did not tell every process's owner this time; registered anyway\n")
    now = clock()
    user = args.user or next((p.owner for p in mine if p.owner), None) or _login_name()
    wish = Wish(0, DONE, user, _login_name(), now, now + seconds, host=host.name, pid=args.pid)
    wish = observed(wish, snapshot, mine)
    start = next((s for p in mine if (s := process_start(snapshot, p)) is not None), None)
    facts = [f"running {format_duration(now - start)}"] if start is not None else []
    facts += [f"{wish.peak_memory_mib} MiB of GPU memory now"] if wish.peak_memory_mib is not None else []
    return _added(config, wish, out, f" ({', '.join(facts)})" if facts else "")


# ---------------------------------------------------------------- --list, --cancel


def wish_dict(wish: Wish) -> dict[str, Any]:
    """A wish for programs (``--list --json``): the fields of its kind, times in ISO 8601."""
    doc: dict[str, Any] = {
        "id": wish.id,
        "kind": wish.kind,
        "user": wish.user,
        "author": wish.author,
        "created_at": iso_time(wish.created_at),
        "expires_at": iso_time(wish.expires_at),
    }
    if wish.kind == FREE:
        doc.update(gpus=wish.gpus, same_host=wish.same_host, model=wish.model)
    else:
        doc.update(
            host=wish.host,
            pid=wish.pid,
            command=wish.command,
            started_at=_iso(wish.started_at),
            peak_memory_mib=wish.peak_memory_mib,
            last_seen_at=_iso(wish.last_seen_at),
            gpu_indexes=list(wish.gpu_indexes),
        )
    doc.update(ended_at=_iso(wish.ended_at), outcome=wish.outcome)
    return doc


def _iso(when: float | None) -> str | None:
    return iso_time(when) if when is not None else None


def _list(config: Config, kind: str, args: argparse.Namespace, out: TextIO, now: float) -> int:
    db = read_state(config, [COMMANDS[kind], "--list"])
    try:
        store = WishStore(db)
        wishes = [w for w in (store.all() if args.all else store.open()) if w.kind == kind]
    finally:
        db.close()
    if args.json:
        write_json([wish_dict(w) for w in wishes], out)
        return EXIT_OK
    if not wishes:
        out.write(f"no {'' if args.all else 'open '}{COMMANDS[kind]} wishes\n")
    for w in wishes:
        out.write(_line(w, now) + "\n")
    return EXIT_OK


def _line(wish: Wish, now: float) -> str:
    whom = f"{wish.user}: " if wish.user else ""
    what = wish.describe()
    if wish.kind == DONE and wish.peak_memory_mib is not None:
        what += f", peak {wish.peak_memory_mib} MiB"
    if wish.kind == DONE and wish.last_seen_at is not None:
        what += f", last seen {local_time(wish.last_seen_at)}"
    state = f"until {local_time(wish.expires_at)}" if wish.open else f"{wish.outcome} {local_time(wish.ended_at)}"
    by = f"by {wish.author}, " if wish.author else ""
    return f"#{wish.id}  {whom}{what}  {state}  ({by}{local_time(wish.created_at)})"


_ID = re.compile(r"#?([0-9]{1,18})")


def _cancel(config: Config, kind: str, text: str, out: TextIO, now: float) -> int:
    command = COMMANDS[kind]
    match = _ID.fullmatch(text.strip())
    if not match:
        raise UsageError(f"{command} --cancel: {text!r} is not a wish id; give one as --list shows it: 3 or #3")
    wish_id = int(match.group(1))
    db = open_db(config.state_dir)
    try:
        store = WishStore(db)
        wish = store.get(wish_id)
        if wish is not None and wish.kind != kind:
            out.write(f"wish #{wish_id} is a {COMMANDS[wish.kind]} wish: {COMMANDS[wish.kind]} --cancel {wish_id}\n")
            return EXIT_FAILED
        if wish is None or not store.cancel(wish_id, now):
            out.write(f"no open wish #{wish_id} ({command} --list shows them)\n")
            return EXIT_FAILED
    finally:
        db.close()
    out.write(f"wish #{wish_id} cancelled: {wish.describe()}\n")
    return EXIT_OK
