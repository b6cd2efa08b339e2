"""``gpuwatch status`` and ``gpuwatch check``: poll the hosts and say what was seen; ``check``
also checks everything else ``run`` needs (:mod:`.preflight`).

``status`` polls once, or every N seconds with ``--watch N`` (one set of connections kept across
polls; on a terminal the table is redrawn in place, with ``--json`` each poll is one document on
its own line). ``HOST ...``, ``--user`` and ``--free`` narrow what is shown, context lines
included, while the summary still counts the whole fleet; a host that did not answer is always
shown, with its reason. ``-p -C -r -P`` add gpustat's columns; colour on a terminal unless
``NO_COLOR`` is set. Ctrl-C ends a watch with exit 0 at any moment.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import io
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, TextIO

from ..config import Config, ConfigError, HostConfig, parse_duration
from ..config.shard import in_shard, shard_doc, shard_words, with_shard
from ..model import FleetSnapshot, HostSnapshot
from ..render import TableOptions, fleet_table, no_data_text, snapshot_dict
from ..reservation import with_reservations
from ..summary import select
from ..text import COLOR_CHOICES, UNKNOWN, format_duration, plural, wants_color
from .common import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, UsageError, add_shard_option, write_json
from .preflight import CheckLine, channel_findings, host_hint, key_file_findings, state_dir_finding
from .reserve import read_bookings
from .wiring import build_discovery, build_poller, with_discovered

MIN_WATCH_SECONDS = 0.5
# Home and clear the screen: the table is redrawn in place, as watch(1) and gpustat --watch do.
CLEAR = "\x1b[H\x1b[2J"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    status = sub.add_parser(
        "status",
        parents=[common],
        help="poll the hosts and print the fleet (once, or every N seconds)",
        description="Poll every host (or the HOSTs named) and print one line per GPU. A host that did not "
        "answer is always listed, with its reason. Exits 1 when no host answered, or --user has no GPU process "
        "on a host that did. Colour on a terminal, unless NO_COLOR is set.",
    )
    status.add_argument("hosts", nargs="*", metavar="HOST", help="only these hosts (names as in the config)")
    status.add_argument("--json", action="store_true", help="print the snapshot as JSON (with --watch: one per line)")
    status.add_argument(
        "--user", metavar="USER", help="only the GPUs this user has a process on (exit 1 when the user has none)"
    )
    status.add_argument("--free", action="store_true", help="only the free GPUs (free_gpu: in the config)")
    status.add_argument(
        "--watch",
        metavar="N",
        help="poll again every N seconds (e.g. 2, 5s, 1m) until Ctrl-C (exit 0); the SSH connections are kept",
    )
    add_shard_option(status, "show")
    shown = status.add_argument_group("columns (as gpustat's -p, -c, -P)")
    # -c is --config everywhere in gpuwatch: the command is -C (gpustat's -c)
    shown.add_argument("-p", "--pid", action="store_true", help="each process on its own, with its pid")
    shown.add_argument(
        "-C", "--command", dest="show_command", action="store_true", help="each process with its command (python3)"
    )
    shown.add_argument("-r", "--runtime", action="store_true", help="each process with how long it has run")
    shown.add_argument("-P", "--power", action="store_true", help="a POWER column (power.draw, watts)")
    shown.add_argument("-a", "--all", action="store_true", help="all of -p -C -r -P")
    shown.add_argument("--no-context", action="store_true", help="no context line per host (load, memory, disks)")
    shown.add_argument(
        "--color",
        metavar="WHEN",
        default="auto",
        choices=COLOR_CHOICES,
        help="colour: auto (the default: on a terminal, unless NO_COLOR is set), always or never",
    )
    shown.add_argument("--no-color", dest="color", action="store_const", const="never", help="same as --color=never")
    status.set_defaults(handler=cmd_status)
    check = sub.add_parser(
        "check",
        parents=[common],
        help="check everything 'run' needs (channels and their secrets, key files, state_dir, each host) "
        "and say whether it is ready",
        description="Check everything 'run' needs and say whether it is ready. Sends nothing and creates "
        "nothing: no state directory, no database; it logs to gpuwatch.log only in a state directory that "
        "exists already, and a host reached for the first time has its key recorded in "
        "known_hosts as 'run' would (ssh.host_key_policy: accept-new). The channels are built, not tried: "
        "'gpuwatch test-notify' sends a test message.",
    )
    check.add_argument("--json", action="store_true", help="print the result as one JSON document")
    add_shard_option(check, "check")
    # check prints the config's warnings itself (said once, not also on stderr)
    check.set_defaults(
        handler=lambda config, args, out: cmd_check(in_shard(config, args.shard), out, as_json=args.json),
        shows_warnings=True,
    )


def _pick_hosts(config: Config, names: list[str]) -> tuple[HostConfig, ...]:
    if not names:
        return config.hosts
    known = {h.name: h for h in config.hosts}
    for name in names:
        if name not in known and any(h.name == name for h in config.all_hosts):
            raise UsageError(f"status: {name!r} is in another shard than this one ({shard_words(config)})")
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; the hosts are: {', '.join(known)}"
            raise UsageError(f"status: {name!r} is not a configured host{hint}")
    wanted = set(names)
    return tuple(h for h in config.hosts if h.name in wanted)


def _watch_seconds(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        seconds = parse_duration(text, "status --watch")
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    if seconds < MIN_WATCH_SECONDS:
        raise UsageError(f"status --watch: at least {MIN_WATCH_SECONDS:g}s between polls, got {text!r}")
    return seconds


def _table_options(args: argparse.Namespace, out: TextIO, environ: Mapping[str, str]) -> TableOptions:
    every = bool(getattr(args, "all", False))
    return TableOptions(
        pids=every or bool(getattr(args, "pid", False)),
        commands=every or bool(getattr(args, "show_command", False)),
        runtime=every or bool(getattr(args, "runtime", False)),
        power=every or bool(getattr(args, "power", False)),
        context=not getattr(args, "no_context", False),
        color=wants_color(getattr(args, "color", None) or "auto", out.isatty(), environ),
    )


def has_processes_of(snapshot: FleetSnapshot, user: str) -> bool:
    """Is ``user`` the person behind a GPU process (its owner) on a host that answered?"""
    return any(p.owner == user for host in snapshot.answered for p in host.processes)


def _nobody_text(snapshot: FleetSnapshot, user: str) -> str:
    """What ``--user`` says when the user has no GPU process: that, and the hosts it could not ask."""
    answered, count = len(snapshot.answered), len(snapshot.hosts)
    lines = [f"no processes of {user} ({answered} of {plural(count, 'host')} answered)"]
    lines += [f"{h.name}: {no_data_text(h, snapshot.taken_at)}" for h in snapshot.down]
    return "\n".join(lines)


def cmd_status(
    config: Config,
    args: argparse.Namespace,
    out: TextIO,
    *,
    wait: Callable[[float], Any] | None = None,
    max_polls: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    """``wait`` (default: sleep until Ctrl-C), ``max_polls`` (default: until Ctrl-C) and ``environ``
    (``NO_COLOR``, ``TERM``; default: the process's) are for tests. Exit 1 when no host answered, or
    ``--user`` has no GPU process on any host that did. ``--shard`` (or the config's ``shard:``): only
    that shard's hosts, said under the table and as ``shard`` in the JSON."""
    config, _ = discovered(in_shard(config, getattr(args, "shard", None)))
    sources = {h.name: h.source for h in config.hosts}
    hosts = _pick_hosts(config, list(getattr(args, "hosts", None) or []))
    every = _watch_seconds(getattr(args, "watch", None))
    as_json = bool(getattr(args, "json", False))
    user, free_only = getattr(args, "user", None), bool(getattr(args, "free", False))
    options = _table_options(args, out, os.environ if environ is None else environ)
    only = ", ".join([f"user {user}"] * bool(user) + ["free GPUs"] * free_only)

    def show(snapshot: FleetSnapshot) -> bool:
        """Print one poll; False when ``--user`` has no process on any host that answered."""
        snapshot = with_reservations(snapshot, read_bookings(config, ["status"]))
        found = user is None or has_processes_of(snapshot, user)
        shown = select(snapshot, config.free_gpu, user=user, free_only=free_only)
        if as_json:
            document = snapshot_dict(shown, config.free_gpu)
            for host in document["hosts"]:  # where each host came from: "hosts" or a hosts_from: source
                host["source"] = sources.get(host["name"], "hosts")
            write_json(with_shard(document, config), out, one_line=every is not None)
            if not found and every is None:
                print(f"gpuwatch: no processes of {user}", file=sys.stderr)
            return found
        if not found:
            text = _nobody_text(snapshot, str(user)) + "\n"
        else:
            whole = snapshot if only else None
            table = fleet_table(shown, config.free_gpu, options, whole=whole)
            text = table + (f"\nshowing only: {only}" if only else "") + _shard_line(config) + "\n"
        if every is not None:
            if out.isatty():
                text = f"{CLEAR}gpuwatch status, every {format_duration(every)} (Ctrl-C stops)\n\n{text}"
            else:
                text += "\n"
        out.write(text)
        out.flush()
        return found

    if every is not None:
        return _watch(replace(config, hosts=hosts), every, show, wait, max_polls)
    poller = build_poller(replace(config, hosts=hosts))
    try:
        snapshot = poller.poll()
    finally:
        poller.close()
    found = show(snapshot)
    return EXIT_OK if snapshot.answered and found else EXIT_FAILED


def _shard_line(config: Config) -> str:
    words = shard_words(config)
    return f"\n{words}" if words else ""


def _watch(
    config: Config,
    every: float,
    show: Callable[[FleetSnapshot], object],
    wait: Callable[[float], Any] | None,
    max_polls: int | None,
) -> int:
    """Poll and show every ``every`` seconds until Ctrl-C, then exit 0 whatever moment it came at.

    In the main thread Ctrl-C only sets a flag that every step looks at (a KeyboardInterrupt raised
    in the middle of closing the connections, or between the last poll and the exit, made it exit
    130 now and then). Once it came, Ctrl-C is ignored until the process ends: a second one cannot
    turn the clean end into an interrupted one (not even while the interpreter shuts down, when
    Python's own handlers are gone: hence SIG_IGN, which outlives them)."""
    stop = threading.Event()
    wait = wait or stop.wait
    previous = _catch_ctrl_c(stop)
    try:
        poller = build_poller(config)
        try:
            polls = 0
            while not stop.is_set() and (max_polls is None or polls < max_polls):
                started = time.monotonic()
                snapshot = poller.poll(stop)
                if stop.is_set():
                    break  # a poll cut short by Ctrl-C is not shown
                show(snapshot)
                polls += 1
                if max_polls is None or polls < max_polls:
                    wait(max(0.0, every - (time.monotonic() - started)))
        finally:
            poller.close()
    except KeyboardInterrupt:
        pass  # not the main thread: Ctrl-C arrives as the exception, and is still how a watch ends
    if previous is not None and not stop.is_set():
        signal.signal(signal.SIGINT, previous)
    return EXIT_OK


def _catch_ctrl_c(stop: threading.Event) -> Any:
    """Make the next SIGINT set ``stop`` and ignore the ones after it; the handler it replaced, or
    None when signals cannot be caught here."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def on_ctrl_c(signum: int, frame: object) -> None:
        stop.set()
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    return signal.signal(signal.SIGINT, on_ctrl_c)


def discovered(config: Config) -> tuple[Config, list[CheckLine]]:
    """``config`` with the hosts its ``hosts_from:`` sources give now (each asked once), and a
    ``check`` line per source: how many hosts it gave, or why it failed."""
    discovery = build_discovery(config)
    if discovery is None:
        return config, []
    try:
        lines = [
            CheckLine(f"hosts_from {h.label}", h.ok, plural(h.hosts, "host") if h.ok else str(h.error))
            for h in discovery.health().values()
        ]
        return with_discovered(config, discovery), lines
    finally:
        discovery.close()


def cmd_check(config: Config, out: TextIO, *, as_json: bool = False) -> int:
    """Everything ``run`` needs: the channels (secrets, URLs, files), the state directory, each
    host's key file and each host; ends with one line: ready or not, and why. Exit 0 when ready,
    2 when a setting is wrong (``run`` would stop with a config error), 1 when only hosts failed.
    ``as_json``: the same as one JSON document (``ready``, ``problems``, ``findings``, ``hosts``)."""
    config, sources = discovered(config)
    count = len(config.hosts)
    text = io.StringIO()
    real_out, out = out, text
    out.write(f"config {config.path}: OK ({plural(count, 'host')})\n")
    if config.shard is not None:
        out.write(f"{shard_words(config)} (this daemon polls only these)\n")
    for warning in config.warnings:
        out.write(f"warning: {warning}\n")
    findings: list[CheckLine] = []
    problems: list[str] = []
    for finding in [*channel_findings(config), state_dir_finding(config)]:
        _write_finding(finding, out, problems)
        findings.append(finding)
    for finding in sources:  # a failing source is said, but is no setting run would stop on
        _write_finding(finding, out, [])
        findings.append(finding)
    unusable = key_file_findings(config)
    for finding in dict.fromkeys(unusable.values()):
        _write_finding(finding, out, problems)
        findings.append(finding)
    pollable = tuple(h for h in config.hosts if h.name not in unusable)
    polled: dict[str, HostSnapshot] = {}
    if pollable:
        poller = build_poller(dataclasses.replace(config, hosts=pollable))
        try:
            polled = {snap.name: snap for snap in poller.poll().hosts}
        finally:
            poller.close()
    failed: list[str] = []
    for host in config.hosts:
        origin = f" [from {host.source}]" if host.source != "hosts" else ""
        snap = polled.get(host.name)
        if snap is None:
            out.write(f"{host.name}: NOT TRIED: {unusable[host.name].problem}{origin}\n")
            continue
        if snap.ok:
            secs = f"{snap.probe_seconds:.2f}s" if snap.probe_seconds is not None else UNKNOWN
            counts = f"{plural(len(snap.gpus), 'GPU')}, {plural(len(snap.processes), 'GPU process')}"
            out.write(f"{snap.name}: OK: {counts} ({secs}){origin}\n")
            for issue in snap.warnings:
                out.write(f"  warning: {issue.message}\n")
            continue
        kind = snap.error_name
        failed.append(f"{snap.name} ({kind})")
        out.write(f"{snap.name}: FAILED ({kind}): {snap.error}{origin}\n")
        hint = host_hint(config, host, snap)
        if hint:
            out.write(f"  hint: {hint}\n")
    answered = len(polled) - len(failed)
    out.write(f"{answered}/{count} hosts OK\n")
    hosts_doc = [_host_doc(config, host, polled.get(host.name), unusable) for host in config.hosts]
    settings_wrong = bool(problems)  # run would stop with a config error (exit 2)
    problems += [f"{f.subject} failed: {f.detail}" for f in sources if not f.ok]
    if failed:
        down = f"{len(failed)} of {plural(count, 'host')} did not answer: {', '.join(failed)}"
        problems.append(down if settings_wrong else f"{down} (gpuwatch run would start and report them as down)")
    if problems:
        out.write(f"not ready: {'; '.join(problems)}\n")
        code = EXIT_CONFIG if settings_wrong else EXIT_FAILED
    else:
        channels = ", ".join(config.channels) or "the web page only"
        out.write(f"ready: gpuwatch run can start: {count}/{count} hosts answered; sends to {channels}; state_dir OK\n")
        code = EXIT_OK
    if as_json:
        document = {
            "config": None if config.path is None else str(config.path),
            "ready": code == EXIT_OK,
            "problems": problems,
            "warnings": list(config.warnings),
            "shard": shard_doc(config),
            "findings": [
                {"subject": f.subject, "ok": f.ok, "detail": f.detail, "notes": list(f.notes)} for f in findings
            ],
            "hosts": hosts_doc,
        }
        write_json(document, real_out)
    else:
        real_out.write(text.getvalue())
    return code


def _host_doc(
    config: Config, host: HostConfig, snap: HostSnapshot | None, unusable: dict[str, CheckLine]
) -> dict[str, Any]:
    if snap is None:
        return {
            "name": host.name,
            "source": host.source,
            "ok": False,
            "tried": False,
            "error": unusable[host.name].problem,
        }
    hint = None if snap.ok else host_hint(config, host, snap)
    return {
        "name": snap.name,
        "source": host.source,
        "ok": snap.ok,
        "tried": True,
        "error_kind": None if snap.ok else snap.error_name,
        "error": snap.error,
        "hint": hint or None,
        "gpus": len(snap.gpus),
        "processes": len(snap.processes),
        "probe_seconds": None if snap.probe_seconds is None else round(snap.probe_seconds, 3),
        "warnings": [{"kind": w.kind.value, "message": w.message} for w in snap.warnings],
    }


def _write_finding(finding: CheckLine, out: TextIO, problems: list[str]) -> None:
    out.write(finding.line() + "\n")
    for note in finding.notes:
        out.write(f"  note: {note}\n")
    if not finding.ok:
        problems.append(finding.problem)
