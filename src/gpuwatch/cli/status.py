"""``gpuwatch status`` and ``gpuwatch check``: poll the hosts and say what was seen.

``status`` polls once, or every N seconds with ``--watch N`` (one set of connections kept across
polls; on a terminal the table is redrawn in place, with ``--json`` each poll is one document on
its own line). ``HOST ...``, ``--user`` and ``--free`` narrow what is shown; a host that did not
answer is always shown, with its reason.
"""

from __future__ import annotations

import argparse
import difflib
import getpass
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TextIO

from ..config import Config, ConfigError, HostConfig, parse_duration
from ..model import FleetSnapshot, HostErrorKind, HostSnapshot
from ..render import fleet_table, snapshot_dict
from ..summary import select
from ..text import format_duration, plural
from .common import EXIT_FAILED, EXIT_OK, UsageError, write_json
from .wiring import build_poller

MIN_WATCH_SECONDS = 0.5
# Home and clear the screen: the table is redrawn in place, as watch(1) and gpustat --watch do.
CLEAR = "\x1b[H\x1b[2J"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    status = sub.add_parser(
        "status",
        parents=[common],
        help="poll the hosts and print the fleet (once, or every N seconds)",
        description="Poll every host (or the HOSTs named) and print one line per GPU. A host that did not "
        "answer is always listed, with its reason. Exits 1 when no host answered.",
    )
    status.add_argument("hosts", nargs="*", metavar="HOST", help="only these hosts (names as in the config)")
    status.add_argument("--json", action="store_true", help="print the snapshot as JSON (with --watch: one per line)")
    status.add_argument("--user", metavar="USER", help="only the GPUs this user has a process on")
    status.add_argument("--free", action="store_true", help="only the free GPUs (free_gpu: in the config)")
    status.add_argument(
        "--watch",
        metavar="N",
        help="poll again every N seconds (e.g. 2, 5s, 1m) until Ctrl-C; the SSH connections are kept",
    )
    status.set_defaults(handler=cmd_status)
    check = sub.add_parser("check", parents=[common], help="validate the config and try each host once")
    check.add_argument("--json", action="store_true", help="print the result as one JSON document")
    # check prints the config's warnings itself (said once, not also on stderr)
    check.set_defaults(handler=lambda config, args, out: cmd_check(config, out, as_json=args.json), shows_warnings=True)


def _pick_hosts(config: Config, names: list[str]) -> tuple[HostConfig, ...]:
    if not names:
        return config.hosts
    known = {h.name: h for h in config.hosts}
    for name in names:
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


def cmd_status(
    config: Config,
    args: argparse.Namespace,
    out: TextIO,
    *,
    wait: Callable[[float], Any] | None = None,
    max_polls: int | None = None,
) -> int:
    """``wait`` (default: sleep) and ``max_polls`` (default: until Ctrl-C) are for tests."""
    hosts = _pick_hosts(config, list(getattr(args, "hosts", None) or []))
    every = _watch_seconds(getattr(args, "watch", None))
    as_json = bool(getattr(args, "json", False))
    user, free_only = getattr(args, "user", None), bool(getattr(args, "free", False))
    wait = wait or threading.Event().wait  # Ctrl-C ends it at once
    only = ", ".join([f"user {user}"] * bool(user) + ["free GPUs"] * free_only)

    def show(snapshot: FleetSnapshot) -> None:
        shown = select(snapshot, config.free_gpu, user=user, free_only=free_only)
        if as_json:
            write_json(snapshot_dict(shown, config.free_gpu), out, one_line=every is not None)
            return
        text = fleet_table(shown, config.free_gpu) + (f"\nshowing only: {only}" if only else "") + "\n"
        if every is not None:
            if out.isatty():
                text = f"{CLEAR}gpuwatch status, every {format_duration(every)} (Ctrl-C stops)\n\n{text}"
            else:
                text += "\n"
        out.write(text)
        out.flush()

    poller = build_poller(replace(config, hosts=hosts))
    try:
        if every is None:
            snapshot = poller.poll()
            show(snapshot)
            return EXIT_OK if snapshot.answered else EXIT_FAILED
        polls = 0
        try:
            while max_polls is None or polls < max_polls:
                started = time.monotonic()
                show(poller.poll())
                polls += 1
                if max_polls is None or polls < max_polls:
                    wait(max(0.0, every - (time.monotonic() - started)))
        except KeyboardInterrupt:
            pass  # Ctrl-C is how a watch ends
        return EXIT_OK
    finally:
        poller.close()


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


def _check_dict(config: Config, snapshot: FleetSnapshot) -> dict[str, Any]:
    by_name = {h.name: h for h in config.hosts}
    return {
        "config": None if config.path is None else str(config.path),
        "warnings": list(config.warnings),
        "hosts": [
            {
                "name": snap.name,
                "ok": snap.ok,
                "error_kind": snap.error_kind.value if snap.error_kind else None,
                "error": snap.error,
                "hint": _hint(by_name[snap.name], snap) or None,
                "gpus": len(snap.gpus),
                "processes": len(snap.processes),
                "probe_seconds": None if snap.probe_seconds is None else round(snap.probe_seconds, 3),
                "warnings": [{"kind": w.kind.value, "message": w.message} for w in snap.warnings],
            }
            for snap in snapshot.hosts
        ],
        "ok": not snapshot.down,
    }


def cmd_check(config: Config, out: TextIO, *, as_json: bool = False) -> int:
    if not as_json:
        out.write(f"config {config.path}: OK ({plural(len(config.hosts), 'host')})\n")
        for warning in config.warnings:
            out.write(f"warning: {warning}\n")
        out.flush()
    poller = build_poller(config)
    try:
        snapshot = poller.poll()
    finally:
        poller.close()
    if as_json:
        write_json(_check_dict(config, snapshot), out)
        return EXIT_OK if not snapshot.down else EXIT_FAILED
    by_name = {h.name: h for h in config.hosts}
    for snap in snapshot.hosts:
        if snap.ok:
            procs = plural(len(snap.processes), "GPU process")
            secs = f"{snap.probe_seconds:.2f}s" if snap.probe_seconds is not None else "N/A"
            out.write(f"{snap.name}: OK: {plural(len(snap.gpus), 'GPU')}, {procs} ({secs})\n")
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
