"""``gpuwatch status`` and ``gpuwatch check``: poll every host once and say what was seen; ``check``
also checks everything else ``run`` needs (:mod:`.preflight`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import TextIO

from ..config import Config
from ..model import HostSnapshot
from ..render import fleet_table, snapshot_dict
from .common import EXIT_CONFIG, EXIT_FAILED, EXIT_OK
from .preflight import Finding, channel_findings, host_hint, key_file_findings, state_dir_finding
from .wiring import build_poller


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    status = sub.add_parser("status", parents=[common], help="poll every host once and print the fleet")
    status.add_argument("--json", action="store_true", help="print the snapshot as JSON")
    status.set_defaults(handler=lambda config, args, out: cmd_status(config, args.json, out))
    check = sub.add_parser(
        "check",
        parents=[common],
        help="check everything 'run' needs (channels and their secrets, key files, state_dir, each host) "
        "and say whether it is ready",
    )
    check.set_defaults(handler=lambda config, args, out: cmd_check(config, out))


def cmd_status(config: Config, as_json: bool, out: TextIO) -> int:
    poller = build_poller(config)
    try:
        snapshot = poller.poll()
    finally:
        poller.close()
    if as_json:
        json.dump(snapshot_dict(snapshot, config.free_gpu), out, indent=2, ensure_ascii=False, allow_nan=False)
        out.write("\n")
    else:
        out.write(fleet_table(snapshot, config.free_gpu) + "\n")
    return EXIT_OK if snapshot.answered else EXIT_FAILED


def cmd_check(config: Config, out: TextIO) -> int:
    """Everything ``run`` needs: the channels (secrets, URLs, files), the state directory, each
    host's key file and each host; ends with one line: ready or not, and why. Exit 0 when ready,
    2 when a setting is wrong (``run`` would stop with a config error), 1 when only hosts failed."""
    count = len(config.hosts)
    out.write(f"config {config.path}: OK ({count} host{'s' if count != 1 else ''})\n")
    for warning in config.warnings:
        out.write(f"warning: {warning}\n")
    problems: list[str] = []
    for finding in [*channel_findings(config), state_dir_finding(config)]:
        _write_finding(finding, out, problems)
    unusable = key_file_findings(config)
    for finding in dict.fromkeys(unusable.values()):
        _write_finding(finding, out, problems)
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
        snap = polled.get(host.name)
        if snap is None:
            out.write(f"{host.name}: NOT TRIED: {unusable[host.name].problem}\n")
            continue
        if snap.ok:
            procs = len(snap.processes)
            secs = f"{snap.probe_seconds:.2f}s" if snap.probe_seconds is not None else "?"
            out.write(f"{snap.name}: OK: {len(snap.gpus)} GPUs, {procs} GPU processes ({secs})\n")
            for issue in snap.warnings:
                out.write(f"  warning: {issue.message}\n")
            continue
        kind = snap.error_kind.value if snap.error_kind else "error"
        failed.append(f"{snap.name} ({kind})")
        out.write(f"{snap.name}: FAILED ({kind}): {snap.error}\n")
        hint = host_hint(config, host, snap)
        if hint:
            out.write(f"  hint: {hint}\n")
    answered = len(polled) - len(failed)
    out.write(f"{answered}/{count} hosts OK\n")
    settings_wrong = bool(problems)  # run would stop with a config error (exit 2)
    if failed:
        down = f"{len(failed)} of {count} host{'s' if count != 1 else ''} did not answer: {', '.join(failed)}"
        problems.append(down if settings_wrong else f"{down} (gpuwatch run would start and report them as down)")
    if problems:
        out.write(f"not ready: {'; '.join(problems)}\n")
        return EXIT_CONFIG if settings_wrong else EXIT_FAILED
    channels = ", ".join(config.channels) or "the web page only"
    out.write(f"ready: gpuwatch run can start: {count}/{count} hosts answered; sends to {channels}; state_dir OK\n")
    return EXIT_OK


def _write_finding(finding: Finding, out: TextIO, problems: list[str]) -> None:
    out.write(finding.line() + "\n")
    for note in finding.notes:
        out.write(f"  note: {note}\n")
    if not finding.ok:
        problems.append(finding.problem)
