"""``gpuwatch alerts`` and ``gpuwatch silence``: read the alert state, mute alerts for a while.

``alerts`` exits 1 while an alert fires that no silence mutes and no other alert inhibits (for
scripts: ``gpuwatch alerts -q || page-someone``), and says when a poll last updated what it shows.
"""

from __future__ import annotations

import argparse
import difflib
import getpass
import re
import time
from typing import TextIO

from ..config import Config, ConfigError, parse_duration
from ..render import AlertRow, alert_rows, alert_state_stale, alerts_dict, silence_dict
from ..report import alert_words
from ..rules import RULE_NAMES, Silence
from ..store import AlertStore, open_db
from ..text import format_duration, local_time
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
    alerts.set_defaults(
        handler=lambda config, args, out: cmd_alerts(
            config, as_json=args.json, include_pending=args.all, out=out, quiet=args.quiet
        )
    )
    silence = sub.add_parser("silence", parents=[common], help="mute alerts for a while: add, list, remove")
    silence_sub = silence.add_subparsers(dest="silence_command", metavar="ACTION", required=True, help="what to do")
    add = silence_sub.add_parser(
        "add",
        parents=[common],
        help="mute the alerts that match every given field",
        description="Mute the alerts that match every given field, for a while. Each firing alert in a message "
        "ends with the 'gpuwatch silence add' line that mutes exactly it.",
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


def _firing_unmuted(rows: list[AlertRow]) -> bool:
    return any(row.record.state == "firing" and not row.muted for row in rows)


def cmd_alerts(config: Config, *, as_json: bool, include_pending: bool, out: TextIO, quiet: bool = False) -> int:
    """What the alert state says now (as of the last poll of a daemon or --once run)."""
    db = read_state(config, ["alerts"])
    try:
        store = AlertStore(db)
        now = time.time()
        records, silences, taken_at = store.records(), store.silences(now), store.evaluated_at()
    finally:
        db.close()
    rows = alert_rows(records, silences, now, include_pending)
    code = EXIT_FAILED if _firing_unmuted(rows) else EXIT_OK
    if quiet:
        return code
    poll_every = config.schedule.poll_every
    if as_json:
        doc = alerts_dict(records, silences, now, include_pending, taken_at=taken_at, poll_every=poll_every)
        write_json(doc, out)
        return code
    out.write(_state_line(taken_at, now, poll_every, str(config.state_dir)) + "\n")
    if not rows and (taken_at is not None or records):
        out.write("no alerts firing\n")
    by_id = {s.id: s for s in silences}
    for row in rows:
        record = row.record
        marks = [f"silenced by #{', #'.join(map(str, row.silenced_by))}"] if row.silenced_by else []
        marks += [f"inhibited by {', '.join(i.split('|', 1)[0] for i in row.inhibited_by)}"] if row.inhibited_by else []
        state = record.state.upper() + (f" ({'; '.join(marks)})" if marks else "")
        words = alert_words(record)
        out.write(f"{state:<10} {record.key.rule}  {words.summary}\n")
        out.write(f"           since {local_time(record.since)}; threshold: {words.threshold}\n")
        for sid in row.silenced_by:
            s = by_id[sid]
            out.write(f"           silence #{sid} until {local_time(s.ends_at)}{_by(s)}: {s.comment}\n")
    return code


def _by(silence: Silence) -> str:
    return f" by {silence.author}" if silence.author else ""


_ID = re.compile(r"#?([0-9]{1,18})")


def _silence_id(text: str) -> int:
    """``3`` or ``#3`` (as ``silence list`` and ``alerts`` print it)."""
    match = _ID.fullmatch(text.strip())
    if not match:
        raise UsageError(f"silence remove: {text!r} is not a silence id; give one as 'silence list' shows it: 3 or #3")
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


def _add(config: Config, store: AlertStore, args: argparse.Namespace, now: float, out: TextIO) -> int:
    if not any((args.rule, args.host, args.user, args.gpu is not None, args.pid is not None)):
        raise UsageError("silence add: give at least one of --rule, --host, --user, --gpu, --pid")
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
        pid=args.pid,
        author=args.author or _login_name(),
    )
    out.write(f"silence #{silence.id} added: {silence.describe()} until {local_time(silence.ends_at)}{_by(silence)}\n")
    return EXIT_OK


def _login_name() -> str | None:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no name for this uid (a container), no environment: no author
        return None
