"""``gpuwatch alerts``, ``ack`` and ``silence``: read the alert state, acknowledge, mute.

``alerts`` exits 1 while an alert fires that no one acknowledged, no silence mutes and no other
alert inhibits (for scripts: ``gpuwatch alerts -q || page-someone``), and says when a poll last
updated what it shows. ``ack`` is for someone on it: the alerts firing now get no more reminders,
and everyone who heard FIRING still hears RESOLVED (the ack ends then). ``silence`` is for planned
work: neither FIRING nor RESOLVED is said while it lasts.
"""

from __future__ import annotations

import argparse
import difflib
import getpass
import re
import sys
import time
from collections.abc import Mapping
from typing import TextIO

from ..config import Config, ConfigError, parse_duration
from ..render import AlertRow, ack_dict, alert_rows, alert_state_stale, alerts_dict, silence_dict
from ..report import alert_words
from ..rules import RULE_NAMES, Ack, AlertRecord, Silence, matching_firing
from ..store import AlertStore, open_db
from ..text import format_duration, local_time, plural
from .common import EXIT_FAILED, EXIT_OK, UsageError, read_state, write_json


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    alerts = sub.add_parser(
        "alerts",
        parents=[common],
        help="list firing and silenced alerts (exit 1 while one fires unmuted)",
        description="The alert state as the last poll of the daemon (or of a --once run) left it. Exits 1 while "
        "an alert fires that no silence mutes and no other alert inhibits, 0 otherwise.",
    )
    alerts.add_argument("--json", action="store_true", help="print them as one JSON document")
    alerts.add_argument("--all", action="store_true", help="include pending alerts (waiting for 'for')")
    alerts.add_argument("-q", "--quiet", action="store_true", help="print nothing; only the exit status tells")
    alerts.add_argument("--rule", choices=RULE_NAMES, help="only the alerts of this rule")
    alerts.add_argument("--host", help="only the alerts about this host")
    alerts.set_defaults(
        handler=lambda config, args, out: cmd_alerts(
            config,
            as_json=args.json,
            include_pending=args.all,
            out=out,
            quiet=args.quiet,
            rule=args.rule,
            host=args.host,
        )
    )
    _register_ack(sub, common)
    silence = sub.add_parser("silence", parents=[common], help="mute alerts for a while: add, list, remove")
    silence_sub = silence.add_subparsers(dest="silence_command", metavar="ACTION", required=True, help="what to do")
    add = silence_sub.add_parser(
        "add",
        parents=[common],
        help="mute the alerts that match every given field",
        description="Mute the alerts that match every given field, for a while, for planned work: neither "
        "FIRING nor RESOLVED is said while it lasts. To stop only the reminders of an alert someone is on, "
        "use 'gpuwatch ack' (the line under a firing alert).",
    )
    add.add_argument("--rule", choices=RULE_NAMES, help="alert rule")
    add.add_argument("--host", help="host name as in the config")
    add.add_argument("--user", help="user name")
    add.add_argument("--gpu", type=int, help="GPU index")
    add.add_argument("--pid", type=int, help="process id (max_runtime alerts are one per process)")
    add.add_argument("--for", dest="duration", required=True, help="how long, e.g. 2h, 24h, 7d")
    add.add_argument("--comment", required=True, help="why (shown in 'gpuwatch alerts' and 'silence list')")
    add.add_argument("--author", help="who adds it (default: your login name)")
    listing = silence_sub.add_parser("list", parents=[common], help="silences in force")
    listing.add_argument("--json", action="store_true", help="print them as a JSON list")
    remove = silence_sub.add_parser("remove", parents=[common], help="end silences now")
    remove.add_argument("ids", nargs="+", metavar="ID", help="a silence's id as 'silence list' shows it: 3 or #3")
    silence.set_defaults(handler=cmd_silence)


def _register_ack(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    ack = sub.add_parser(
        "ack",
        parents=[common],
        help="acknowledge firing alerts: no more reminders, RESOLVED still said; ack list, ack remove ID",
        description="Acknowledge the alerts firing now that match every given field: they get no more "
        "reminders (repeat_every), and everyone who heard FIRING still hears RESOLVED; the ack ends when "
        "they resolve (or after --for). 'ack list' shows the acks in force, 'ack remove ID' ends one. "
        "For planned work, where nothing at all should be said, use 'gpuwatch silence add'.",
    )
    ack.add_argument("action", nargs="?", choices=("list", "remove"), help="list or remove acks (default: add one)")
    ack.add_argument("ids", nargs="*", metavar="ID", help="for remove: an ack's id as 'ack list' shows it: 3 or #3")
    ack.add_argument("--rule", choices=RULE_NAMES, help="alert rule")
    ack.add_argument("--host", help="host name as in the config")
    ack.add_argument("--user", help="user name")
    ack.add_argument("--gpu", type=int, help="GPU index")
    ack.add_argument("--pid", type=int, help="process id (max_runtime alerts are one per process)")
    ack.add_argument("--comment", default="", help="what is being done (shown in 'gpuwatch alerts')")
    ack.add_argument("--for", dest="duration", help="end it after this long even if the alerts still fire, e.g. 8h")
    ack.add_argument("--author", help="who acknowledges (default: your login name)")
    ack.add_argument("--json", action="store_true", help="for list: print the acks as a JSON list")
    ack.set_defaults(handler=cmd_ack)


def _state_line(taken_at: float | None, now: float, poll_every: float, where: str) -> str:
    """When a poll last updated the alert state, and whether that is too long ago."""
    if taken_at is None:
        return f"STALE: no poll has recorded alert state in {where} yet: is gpuwatch running?"
    age = format_duration(max(0.0, now - taken_at))
    if alert_state_stale(taken_at, now, poll_every):
        return (
            f"STALE: as of {local_time(taken_at)}, {age} ago: no poll for over 3 intervals of "
            f"{format_duration(poll_every)}: is gpuwatch running?"
        )
    return f"as of {local_time(taken_at)} ({age} ago)"


def _firing_unhandled(rows: list[AlertRow], acked: Mapping[str, list[Ack]]) -> bool:
    """Whether an alert fires that nothing mutes and no one acknowledged."""
    return any(row.record.state == "firing" and not row.muted and not acked.get(row.record.key.id) for row in rows)


def _wanted(record: AlertRecord, rule: str | None, host: str | None) -> bool:
    return (rule is None or record.key.rule == rule) and (host is None or record.key.host == host)


def _acked_by(acks: list[Ack], records: Mapping[str, AlertRecord], now: float) -> dict[str, list[Ack]]:
    """Alert id -> the acks in force that acknowledge it."""
    return {kid: found for kid, r in records.items() if (found := [a for a in acks if a.covers(r, now)])}


def cmd_alerts(
    config: Config,
    *,
    as_json: bool,
    include_pending: bool,
    out: TextIO,
    quiet: bool = False,
    rule: str | None = None,
    host: str | None = None,
) -> int:
    """What the alert state says now (as of the last poll of a daemon or --once run); with
    ``rule``/``host``, only those alerts (the exit status too)."""
    db = read_state(config, ["alerts"])
    try:
        store = AlertStore(db)
        now = time.time()
        records, silences, taken_at = store.records(), store.silences(now), store.evaluated_at()
        acks = store.acks()
    finally:
        db.close()
    acked = _acked_by(acks, records, now)
    rows = [row for row in alert_rows(records, silences, now, include_pending) if _wanted(row.record, rule, host)]
    code = EXIT_FAILED if _firing_unhandled(rows, acked) else EXIT_OK
    if quiet:
        return code
    poll_every = config.schedule.poll_every
    if as_json:
        doc = alerts_dict(records, silences, now, include_pending, taken_at=taken_at, poll_every=poll_every, acks=acks)
        doc["alerts"] = [a for a in doc["alerts"] if _wanted(records[a["id"]], rule, host)]
        write_json(doc, out)
        return code
    out.write(_state_line(taken_at, now, poll_every, str(config.state_dir)) + "\n")
    if not rows and (taken_at is not None or records):
        out.write("no alerts firing\n" if rule is None and host is None else "no such alerts firing\n")
    by_id = {s.id: s for s in silences}
    for row in rows:
        _write_row(row, acked.get(row.record.key.id, []), by_id, out)
    return code


def _write_row(row: AlertRow, acks: list[Ack], silences: Mapping[int, Silence], out: TextIO) -> None:
    record = row.record
    marks = [f"acknowledged #{', #'.join(str(a.id) for a in acks)}"] if acks else []
    marks += [f"silenced by #{', #'.join(map(str, row.silenced_by))}"] if row.silenced_by else []
    marks += [f"inhibited by {', '.join(i.split('|', 1)[0] for i in row.inhibited_by)}"] if row.inhibited_by else []
    state = record.state.upper() + (f" ({'; '.join(marks)})" if marks else "")
    words = alert_words(record)
    out.write(f"{state:<10} {record.key.rule}  {words.summary}\n")
    out.write(f"           since {local_time(record.since)}; threshold: {words.threshold}\n")
    for a in acks:
        comment = f": {a.comment}" if a.comment else ""
        out.write(f"           acknowledged{_by(a)} at {local_time(a.created_at)} (ack #{a.id}){comment}\n")
    for sid in row.silenced_by:
        s = silences[sid]
        out.write(f"           silence #{sid} until {local_time(s.ends_at)}{_by(s)}: {s.comment}\n")


def _by(item: Silence | Ack) -> str:
    return f" by {item.author}" if item.author else ""


_ID = re.compile(r"#?([0-9]{1,18})")


def _silence_id(text: str, what: str = "silence") -> int:
    """``3`` or ``#3`` (as ``silence list``, ``ack list`` and ``alerts`` print it)."""
    match = _ID.fullmatch(text.strip())
    if not match:
        raise UsageError(
            f"{what} remove: {text!r} is not {'an' if what == 'ack' else 'a'} {what} id; "
            f"give one as '{what} list' shows it: 3 or #3"
        )
    return int(match.group(1))


def cmd_silence(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    if args.silence_command == "remove":
        ids = [_silence_id(text) for text in args.ids]  # all checked before any is removed
    db = read_state(config, ["silence", "list"]) if args.silence_command == "list" else open_db(config.state_dir)
    try:
        store = AlertStore(db)
        now = time.time()
        if args.silence_command == "add":
            return _add(config, store, args, now, out)
        if args.silence_command == "list":
            silences = store.silences(now)
            if args.json:
                write_json([silence_dict(s) for s in silences], out)
                return EXIT_OK
            if not silences:
                out.write("no silences in force\n")
            for s in silences:
                out.write(f"#{s.id}  {s.describe()}  until {local_time(s.ends_at)}{_by(s)}  ({s.comment})\n")
            return EXIT_OK
        code = EXIT_OK
        for sid in ids:
            if store.remove_silence(sid):
                out.write(f"silence #{sid} removed\n")
            else:
                out.write(f"no silence #{sid}\n")
                code = EXIT_FAILED
        return code
    finally:
        db.close()


def _check_matchers(config: Config, args: argparse.Namespace, what: str) -> None:
    if not any((args.rule, args.host, args.user, args.gpu is not None, args.pid is not None)):
        raise UsageError(f"{what}: give at least one of --rule, --host, --user, --gpu, --pid")
    names = [h.name for h in config.hosts]
    if args.host and args.host not in names:
        close = difflib.get_close_matches(args.host, names, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UsageError(f"{what} --host: {args.host!r} is not a configured host{hint}")


def _seconds(text: str, what: str) -> float:
    try:
        seconds = parse_duration(text, f"{what} --for")
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    if seconds <= 0:
        raise UsageError(f"{what} --for: must be longer than 0s, e.g. 2h, 24h, 7d")
    return seconds


def _unseen_user(store: AlertStore, user: str) -> str | None:
    """A warning when no host has shown ``user`` (a typo mutes nothing): with the closest names seen."""
    seen = store.users_seen()
    if user in seen:
        return None
    close = difflib.get_close_matches(user, seen, n=3)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return f"warning: no host has shown a user {user!r} yet; {hint}the silence is added anyway\n"


def _add(config: Config, store: AlertStore, args: argparse.Namespace, now: float, out: TextIO) -> int:
    _check_matchers(config, args, "silence add")
    seconds = _seconds(args.duration, "silence add")
    silence = store.add_silence(
        ends_at=now + seconds,
        comment=args.comment,
        now=now,
        rule=args.rule,
        host=args.host,
        user=args.user,
        gpu=args.gpu,
        pid=args.pid,
        author=args.author or _login_name(),
    )
    out.write(f"silence #{silence.id} added: {silence.describe()} until {local_time(silence.ends_at)}{_by(silence)}\n")
    warning = _unseen_user(store, args.user) if args.user else None
    if warning:
        sys.stderr.write(warning + f"  (if it is a typo: gpuwatch silence remove {silence.id})\n")
    return EXIT_OK


def cmd_ack(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    """``ack`` (add), ``ack list``, ``ack remove ID...``."""
    if args.action != "remove" and args.ids:
        raise UsageError(f"ack: unexpected {' '.join(args.ids)!r}; ids go with 'ack remove ID'")
    if args.action == "remove":
        if not args.ids:
            raise UsageError("ack remove: give the id of an ack as 'ack list' shows it: 3 or #3")
        ids = [_silence_id(text, "ack") for text in args.ids]
    elif args.action is None:
        _check_matchers(config, args, "ack")
        seconds = _seconds(args.duration, "ack") if args.duration else None
    db = read_state(config, ["ack", "list"]) if args.action == "list" else open_db(config.state_dir)
    try:
        store = AlertStore(db)
        now = time.time()
        if args.action == "list":
            return _list_acks(store, now, args.json, out)
        if args.action == "remove":
            code = EXIT_OK
            for aid in ids:
                found = store.remove_ack(aid)
                out.write(f"ack #{aid} removed: reminders start again\n" if found else f"no ack #{aid}\n")
                code = code if found else EXIT_FAILED
            return code
        return _add_ack(store, args, now, seconds, out)
    finally:
        db.close()


def _add_ack(store: AlertStore, args: argparse.Namespace, now: float, seconds: float | None, out: TextIO) -> int:
    fields = {"rule": args.rule, "host": args.host, "user": args.user, "gpu": args.gpu, "pid": args.pid}
    matched = matching_firing(store.records(), **fields)
    wanted = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
    if not matched:
        out.write(f"no firing alert matches {wanted}: nothing acknowledged ('gpuwatch alerts' lists what fires)\n")
        return EXIT_FAILED
    ack = store.add_ack(
        alerts={r.key.id: r.since for r in matched},
        now=now,
        comment=args.comment,
        ends_at=None if seconds is None else now + seconds,
        author=args.author or _login_name(),
        **fields,
    )
    until = "they resolve" if ack.ends_at is None else f"they resolve or {local_time(ack.ends_at)}"
    out.write(
        f"ack #{ack.id} added{_by(ack)}: {plural(len(matched), 'firing alert')} ({wanted}): no more reminders "
        f"until {until}; RESOLVED is still sent\n"
    )
    return EXIT_OK


def _list_acks(store: AlertStore, now: float, as_json: bool, out: TextIO) -> int:
    records = store.records()
    acks = [a for a in store.acks() if a.live(records, now)]
    if as_json:
        write_json([ack_dict(a) for a in acks], out)
        return EXIT_OK
    if not acks:
        out.write("no acks in force\n")
    for a in acks:
        covered = sum(a.covers(r, now) for r in records.values())
        ends = "" if a.ends_at is None else f", ends {local_time(a.ends_at)}"
        comment = f"  ({a.comment})" if a.comment else ""
        out.write(
            f"#{a.id}  {a.describe()}  {plural(covered, 'alert')} firing{ends}{_by(a)} at "
            f"{local_time(a.created_at)}{comment}\n"
        )
    return EXIT_OK


def _login_name() -> str | None:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no name for this uid (a container), no environment: no author
        return None
