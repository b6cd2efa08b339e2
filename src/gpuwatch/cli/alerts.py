"""``gpuwatch alerts`` and ``gpuwatch silence``: read the alert state, mute alerts for a while."""

from __future__ import annotations

import argparse
import difflib
import json
import time
from typing import TextIO

from ..config import Config, ConfigError, parse_duration
from ..render import alert_rows, alerts_dict
from ..report import alert_words
from ..rules import RULE_NAMES
from ..store import AlertStore, open_db
from ..text import local_time
from .common import EXIT_FAILED, EXIT_OK, UsageError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    alerts = sub.add_parser("alerts", parents=[common], help="list firing and silenced alerts")
    alerts.add_argument("--json", action="store_true", help="print them as JSON")
    alerts.add_argument("--all", action="store_true", help="include pending alerts (waiting for 'for')")
    alerts.set_defaults(
        handler=lambda config, args, out: cmd_alerts(config, as_json=args.json, include_pending=args.all, out=out)
    )
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
    silence.set_defaults(handler=cmd_silence)


def cmd_alerts(config: Config, *, as_json: bool, include_pending: bool, out: TextIO) -> int:
    """What the alert state says now (as of the last poll of a daemon or --once run)."""
    db = open_db(config.state_dir, read_only_ok=True)
    try:
        store = AlertStore(db)
        now = time.time()
        records, silences = store.records(), store.silences(now)
    finally:
        db.close()
    if as_json:
        json.dump(alerts_dict(records, silences, now, include_pending), out, indent=2, ensure_ascii=False)
        out.write("\n")
        return EXIT_OK
    rows = alert_rows(records, silences, now, include_pending)
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
