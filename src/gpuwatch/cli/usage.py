"""``gpuwatch usage``: GPU-hours per person, host, model or GPU over a period, from the usage
history the daemon writes (``<state_dir>/history.sqlite3``). It only reads.

``--since 7d`` (the default) or ``--from``/``--to``; bounds other than now are whole hours (the
hourly roll-ups' grain). ``--json`` is the ``/api/v1/usage`` document; ``--csv`` one line per group.
"""

from __future__ import annotations

import argparse
import csv
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, TextIO

from ..config import Config, ConfigError, parse_duration
from ..store.history import HistoryError, HistorySettings, history_path
from ..store.historyread import HistoryReader
from ..text import local_time
from ..usage import GROUPINGS, period
from .common import EXIT_OK, UsageError, write_json

COLUMNS = (
    "gpu_hours",
    "held_idle_gpu_hours",
    "known_gpu_hours",
    "unknown_gpu_hours",
    "utilization_percent",
    "ewma_gpus",
)
_TIME_FORMATS = ("%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    usage = sub.add_parser(
        "usage",
        parents=[common],
        help="GPU-hours per person, host, model or GPU over a period (from the usage history)",
        description="GPU-hours (a shared GPU split by each person's share of its memory), held-idle GPU-hours "
        "(memory held under the idle threshold) and unknown time (hosts that did not answer), from the "
        "history the daemon keeps in the state directory. Bounds other than now are whole hours.",
    )
    when = usage.add_mutually_exclusive_group()
    when.add_argument("--since", metavar="DURATION", help="this long back from now (default 7d)")
    when.add_argument("--from", dest="start", metavar="TIME", help='from this local time, e.g. "2026-12-01 09:00"')
    usage.add_argument("--to", dest="end", metavar="TIME", help="until this local time (default now; with --from)")
    usage.add_argument("--by", choices=GROUPINGS, default="user", help="one line per (default: user)")
    output = usage.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print one JSON document (as /api/v1/usage)")
    output.add_argument("--csv", action="store_true", help="print CSV, one line per group")
    usage.set_defaults(handler=handle)


def parse_time(text: str, flag: str) -> float:
    """A local date and time as people write it (``2026-12-01 09:00``, ``2026-12-01``) -> Unix time."""
    for fmt in _TIME_FORMATS:
        try:
            return datetime.strptime(text.strip(), fmt).astimezone().timestamp()
        except ValueError:
            continue
    raise UsageError(f'{flag}: {text[:40]!r} is not a time like "2026-12-01 09:00"')


def period_of(args: Any, now: float) -> tuple[float, float]:
    """The period the arguments ask for (``since``, ``start``, ``end``: strings or None)."""
    if args.end is not None and args.start is None:
        raise UsageError("--to goes with --from")
    try:
        since = parse_duration(args.since) if args.since is not None else None
    except ConfigError as exc:
        raise UsageError(f"--since: {exc}") from None
    start = parse_time(args.start, "--from") if args.start is not None else None
    end = parse_time(args.end, "--to") if args.end is not None else None
    try:
        return period(now, since=since, start=start, end=end)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def usage_doc(config: Config, by: str, start: float, end: float) -> dict[str, object]:
    """The usage document for ``config``'s history (empty when there is none yet)."""
    settings = HistorySettings.of(config)
    reader = HistoryReader(config.state_dir)
    try:
        return reader.usage(start, end, by, idle_below=settings.idle_below, half_life=settings.half_life)
    except HistoryError as exc:
        raise ConfigError(str(exc)) from None
    finally:
        reader.close()


def handle(config: Config, args: argparse.Namespace, out: TextIO, clock: Callable[[], float] = time.time) -> int:
    start, end = period_of(args, clock())
    doc = usage_doc(config, args.by, start, end)
    if args.json:
        write_json(doc, out)
    elif args.csv:
        write_csv(doc, out)
    else:
        write_text(doc, out, history_path(config.state_dir).exists())
    return EXIT_OK


def write_csv(doc: Mapping[str, Any], out: TextIO) -> None:
    by = str(doc["by"])
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([by, *COLUMNS])
    for group in doc["groups"]:
        writer.writerow([group[by], *(group.get(c, "") for c in COLUMNS)])


def _cell(value: object) -> str:
    return "" if value is None else f"{value:.1f}" if isinstance(value, float) else str(value)


def write_text(doc: Mapping[str, Any], out: TextIO, exists: bool) -> None:
    by, fleet = str(doc["by"]), doc["fleet"]
    start, end = (datetime.fromisoformat(str(doc[k])) for k in ("from", "to"))
    out.write(f"Usage from {local_time(start)} to {local_time(end)}, by {by}\n")
    if not exists:
        out.write("No usage history yet: the daemon (gpuwatch run) records it as it polls.\n")
        return
    columns = [c for c in COLUMNS if any(c in g for g in doc["groups"])]
    rows = [[by, *(c.replace("_gpu_hours", "").replace("_", " ") for c in columns)]]
    rows += [[str(g[by]), *(_cell(g.get(c)) for c in columns)] for g in doc["groups"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
        out.write("\n")
    out.write(
        f"Fleet: {fleet['gpu_hours']:.1f} GPU-hours used of {fleet['known_gpu_hours']:.1f} known, "
        f"{fleet['held_idle_gpu_hours']:.1f} held idle, "
        f"{fleet['unknown_gpu_hours']:.1f} unknown (hosts not answering)\n"
    )
    if doc["never_used"]:
        out.write(f"Never used: {', '.join(doc['never_used'])}\n")
