"""``gpuwatch status`` and ``gpuwatch check``: poll every host once and say what was seen."""

from __future__ import annotations

import argparse
import getpass
import json
from typing import TextIO

from ..config import Config, HostConfig
from ..model import HostErrorKind, HostSnapshot
from ..render import fleet_table, snapshot_dict
from .common import EXIT_FAILED, EXIT_OK
from .wiring import build_poller


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    status = sub.add_parser("status", parents=[common], help="poll every host once and print the fleet")
    status.add_argument("--json", action="store_true", help="print the snapshot as JSON")
    status.set_defaults(handler=lambda config, args, out: cmd_status(config, args.json, out))
    check = sub.add_parser("check", parents=[common], help="validate the config and try each host once")
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
