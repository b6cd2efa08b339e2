"""Benchmark: what the host context, GPU health and cgroup attribution steps add to one probe.

Polls a loopback fleet of real sshd hosts (tests/fleet.py, the default scenario: 4 H100 GPUs, three
processes, two of them real processes of alice and verylongusername) with two versions of gpuwatch
side by side: ``before`` (``git archive`` of the ref given by ``--before``; by default where this
branch left main, ``git merge-base main HEAD``) and ``after`` (this checkout). Each runs in a child
process of its own, polls every host at once
``--rounds`` times over open connections, and reports per host-poll:

- client CPU (user + system seconds of the gpuwatch process, divided by hosts x rounds), and the
  same without the first round (steady state: connections open, health fields learned);
- wall time of a round (all hosts at once), and of the first round alone (it connects, and the
  ``after`` version learns each host's health fields there);
- bytes of probe output per host.

Still one exec per host per poll in both. Run as root: ``python bench/probe_cost.py --hosts 10 --rounds 20``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import gpuwatch, gpuwatch.ssh
from gpuwatch.cli import build_poller
try:
    from gpuwatch.config.load import parse_config
except ImportError:  # a gpuwatch from before config became a package
    from gpuwatch.config import parse_config

doc = json.loads(sys.argv[2])
rounds = int(sys.argv[3])
config = parse_config(doc, Path(doc["state_dir"]) / "config.yaml")
sizes = []
real_run = gpuwatch.ssh.SshConnection.run_script
def counting(self, *args, **kwargs):
    result = real_run(self, *args, **kwargs)
    sizes.append(len(result.stdout))
    return result
gpuwatch.ssh.SshConnection.run_script = counting
poller = build_poller(config)
walls = []
cpu0 = resource.getrusage(resource.RUSAGE_SELF)
def used(a, b):
    return (b.ru_utime - a.ru_utime) + (b.ru_stime - a.ru_stime)
try:
    for i in range(rounds):
        started = time.perf_counter()
        snapshot = poller.poll()
        walls.append(time.perf_counter() - started)
        assert all(h.ok for h in snapshot.hosts), [h.error for h in snapshot.hosts if not h.ok]
        if i == 0:
            after_first = resource.getrusage(resource.RUSAGE_SELF)
finally:
    poller.close()
cpu1 = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({
    "gpuwatch": gpuwatch.__file__,
    "cpu": used(cpu0, cpu1),
    "steady_cpu": used(after_first, cpu1),
    "walls": walls,
    "bytes": sizes,
}))
"""


def before_tree(ref: str) -> Path:
    """``git archive <ref>``'s src/ in a temp dir (the version to compare with)."""
    target = Path(tempfile.mkdtemp(prefix="gpuwatch-before-"))
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "src"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target / "src"


def measure(src: Path, doc: dict[str, object], rounds: int) -> dict[str, object]:
    env = dict(os.environ, PYTHONPATH=str(src))
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(src), json.dumps(doc), str(rounds)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=600,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hosts", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--before", default=None, help="git ref to compare with (default: git merge-base main HEAD)")
    args = parser.parse_args(argv)
    from fleet import fleet_unavailable_reason

    reason = fleet_unavailable_reason()
    if reason:
        print(f"cannot run: {reason}")
        return 2
    ref = (
        args.before
        or subprocess.run(
            ["git", "-C", str(ROOT), "merge-base", "main", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    versions = {"before": before_tree(ref), "after": ROOT / "src"}
    try:
        return _run(args, versions)
    finally:
        shutil.rmtree(versions["before"].parent, ignore_errors=True)


def _run(args: argparse.Namespace, versions: dict[str, Path]) -> int:
    from fleet import Fleet

    with Fleet(args.hosts) as fleet, tempfile.TemporaryDirectory() as tmp:
        known = fleet.write_known_hosts(Path(tmp) / "known_hosts")
        doc = {
            "hosts": [{"name": f"h{i}", "address": a} for i, a in enumerate(fleet.addresses)],
            "ssh": fleet.gpuwatch_ssh(known),
            "state_dir": tmp,
            "max_parallel": 256,
        }
        results = {}
        for name in ("before", "after", "before", "after"):  # alternate: the machine's load drifts
            result = measure(versions[name], doc, args.rounds)
            results.setdefault(name, []).append(result)
    polls = args.hosts * args.rounds
    print(f"{args.hosts} hosts x {args.rounds} rounds, each version run twice (alternating); per host-poll:")
    print(
        f"{'version':8} {'client CPU ms':>14} {'steady CPU ms':>14} {'round wall ms (median)':>23} "
        f"{'first round ms':>15} {'bytes':>7}"
    )
    for name, runs in results.items():
        cpu = statistics.mean(r["cpu"] for r in runs) / polls * 1000  # type: ignore[operator]
        # without the first round (connecting, learning each host's health fields)
        steady_cpu = statistics.mean(r["steady_cpu"] for r in runs) / (polls - args.hosts) * 1000  # type: ignore[operator]
        steady = statistics.median(w for r in runs for w in r["walls"][1:])  # type: ignore[index]
        first = statistics.mean(r["walls"][0] for r in runs)  # type: ignore[index]
        size = statistics.median(b for r in runs for b in r["bytes"][args.hosts :])  # type: ignore[index]
        print(f"{name:8} {cpu:14.2f} {steady_cpu:14.2f} {steady * 1000:23.1f} {first * 1000:15.1f} {size:7.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
