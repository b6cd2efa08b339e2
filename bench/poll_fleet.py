"""Benchmark: wall time and client CPU of polling 1, 10 and 50 loopback SSH hosts.

Each host is a real sshd on 127.0.0.x whose stand-in nvidia-smi sleeps 0.5 s per call (two
calls per probe, so about 1 s of remote work per host). Measures:

- ``gpuwatch status`` as a user runs it (a fresh process: import, connect, probe, print);
- a steady-state poll of the daemon (connections already open), which is what a 60 s poll
  interval costs.

Run as root (it starts sshd and creates test users): ``python bench/poll_fleet.py [N ...]``.
All traffic stays on 127.0.0.0/8.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fleet import (  # noqa: E402
    Fleet,
    fleet_unavailable_reason,
    scenario_healthy_multi_gpu,
    scenario_sleep,
    standin_env,
)
from gpuwatch.cli import build_poller  # noqa: E402
from gpuwatch.config import load_config  # noqa: E402


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


LIGHT_SMI = """#!/bin/sh
# Replays the stand-in's output, pre-rendered from a real capture, after a fixed sleep:
# a stand-in that costs the 2-core test machine almost no CPU, so that the wall time shows
# gpuwatch's fan-out rather than 100 Python start-ups competing for the cores.
sleep __SLEEP__
case "$*" in
  *--query-gpu=*) cat __DIR__/gpu.csv ;;
  *--query-compute-apps=*) cat __DIR__/apps.csv ;;
esac
"""


def light_standin(directory: Path, sleep: float) -> Path:
    """A /bin/sh stand-in: the real stand-in's output for the default scenario, after ``sleep``."""
    scenario_healthy_multi_gpu(directory / "scenarios" / "local")
    env = standin_env(directory / "scenarios")
    from gpuwatch import parse

    for name, query in (
        ("gpu.csv", f"--query-gpu={','.join(parse.GPU_QUERY_FIELDS)}"),
        ("apps.csv", f"--query-compute-apps={','.join(parse.APP_QUERY_FIELDS)}"),
    ):
        out = subprocess.run(["nvidia-smi", query, "--format=csv"], env=env, capture_output=True, check=True)
        (directory / name).write_bytes(out.stdout)
    script = directory / "nvidia-smi"
    script.write_text(LIGHT_SMI.replace("__SLEEP__", str(sleep)).replace("__DIR__", str(directory)))
    script.chmod(0o755)
    directory.chmod(0o755)
    for item in directory.iterdir():
        item.chmod(item.stat().st_mode | 0o055)
    return script


def bench(fleet: Fleet, count: int, sleep: float, rounds: int, light: Path | None) -> dict[str, float]:
    addresses = fleet.addresses[:count]
    for address in addresses:
        scenario_sleep(fleet.scenario_dir(address), sleep)
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "config.yaml"
        config_path.write_text(
            yaml.safe_dump(
                {
                    "hosts": [{"name": f"h{i:02d}", "address": a} for i, a in enumerate(addresses)],
                    "ssh": fleet.gpuwatch_ssh(**({"nvidia_smi": str(light)} if light else {})),
                    "max_parallel": 64,
                }
            )
        )
        walls, cpus = [], []
        for _ in range(rounds):
            before = children_cpu()
            started = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-m", "gpuwatch", "status", "-c", str(config_path)],
                capture_output=True,
                text=True,
                check=False,
            )
            walls.append(time.perf_counter() - started)
            cpus.append(children_cpu() - before)
            answered = proc.stdout.count("NVIDIA")
            if proc.returncode != 0 or answered < count:
                raise SystemExit(f"status failed ({proc.returncode}): {proc.stdout[-500:]} {proc.stderr[-500:]}")
        # steady state: the daemon's connections stay open between polls
        config = load_config(config_path)
        poller = build_poller(config)
        try:
            poller.poll()  # connect
            steady_walls, steady_cpus = [], []
            for _ in range(rounds):
                cpu0, t0 = time.process_time(), time.perf_counter()
                snapshot = poller.poll()
                steady_walls.append(time.perf_counter() - t0)
                steady_cpus.append(time.process_time() - cpu0)
                assert len(snapshot.answered) == count, [h.error for h in snapshot.down]
        finally:
            poller.close()
    best = min(range(rounds), key=lambda i: walls[i])
    return {
        "hosts": count,
        "status_wall_s": walls[best],
        "status_cpu_s": cpus[best],
        "status_cpu_per_host_ms": 1000 * cpus[best] / count,
        "steady_wall_s": min(steady_walls),
        "steady_cpu_per_host_ms": 1000 * min(steady_cpus) / count,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("counts", nargs="*", type=int, default=[1, 10, 50])
    parser.add_argument("--sleep", type=float, default=0.5, help="seconds the stand-in nvidia-smi sleeps per call")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--light", action="store_true", help="use a /bin/sh stand-in (same output) instead of the Python one"
    )
    args = parser.parse_args()
    reason = fleet_unavailable_reason()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    kind = "/bin/sh" if args.light else "Python"
    print(f"{kind} stand-in nvidia-smi sleeps {args.sleep}s per call (2 calls per probe); best of {args.rounds}")
    columns = ("hosts", "status wall", "status CPU", "CPU/host", "steady wall", "CPU/host")
    widths = (5, 11, 10, 9, 11, 9)
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    with Fleet(max(args.counts)) as fleet, tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        light = light_standin(Path(tmp), args.sleep) if args.light else None
        for count in args.counts:
            r = bench(fleet, count, args.sleep, args.rounds, light)
            print(
                f"{count:>5}  {r['status_wall_s']:>10.2f}s  {r['status_cpu_s']:>9.2f}s  "
                f"{r['status_cpu_per_host_ms']:>7.1f}ms  {r['steady_wall_s']:>10.2f}s  "
                f"{r['steady_cpu_per_host_ms']:>7.1f}ms"
            )
    print(f"(machine: {os.cpu_count()} cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
