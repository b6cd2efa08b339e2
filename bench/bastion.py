"""Benchmark: a restart against N hosts behind one ProxyJump bastion with OpenSSH's default MaxStartups.

The bastion is a real sshd on 127.0.0.40 with ``MaxStartups 10:30:100`` (OpenSSH's default: past 10
unauthenticated connections it starts dropping new ones). N host entries (default 200; their
addresses cycle over the fleet's sshd hosts, each entry its own connection) are reached through it,
all at once, as ``gpuwatch status`` and a daemon start do. Prints how many hosts answered, how many
were refused, and the wall time. Run as root: ``python bench/bastion.py [--hosts 200]``. Loopback only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fleet import Fleet, fleet_unavailable_reason  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=200)
    args = parser.parse_args()
    reason = fleet_unavailable_reason()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    bastion = "127.0.0.40"
    with Fleet(8) as fleet, tempfile.TemporaryDirectory() as tmp:
        fleet.add_host(bastion, host_key=fleet.host_key, sshd_options=["MaxStartups 10:30:100"])
        known_hosts = fleet.write_known_hosts(Path(tmp) / "known_hosts")
        doc = {
            "hosts": [
                {"name": f"gpu{i:03d}", "address": fleet.addresses[i % len(fleet.addresses)]} for i in range(args.hosts)
            ],
            "ssh": fleet.gpuwatch_ssh(
                known_hosts,
                proxy_jump=f"{fleet.monitor_user}@{bastion}:{fleet.port}",
                connect_timeout="20s",
                command_timeout="30s",
            ),
            "state_dir": str(Path(tmp) / "state"),
        }
        config = Path(tmp) / "config.yaml"
        config.write_text(yaml.safe_dump(doc))
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "gpuwatch", "status", "--json", "-c", str(config)],
            capture_output=True,
            text=True,
            check=False,
        )
        wall = time.perf_counter() - started
        hosts = json.loads(done.stdout)["hosts"] if done.stdout.strip() else []
        answered = sum(1 for h in hosts if h["ok"])
        refused = [h for h in hosts if not h["ok"]]
        kinds: dict[str, int] = {}
        for h in refused:
            kinds[h["error"][:90]] = kinds.get(h["error"][:90], 0) + 1
        print(
            f"{args.hosts} hosts behind one bastion (MaxStartups 10:30:100): {answered} answered, "
            f"{len(refused)} failed, {wall:.1f}s wall"
        )
        for text, count in sorted(kinds.items(), key=lambda kv: -kv[1]):
            print(f"  {count} x {text}")
        return 0 if answered == args.hosts else 1


if __name__ == "__main__":
    sys.exit(main())
