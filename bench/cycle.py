"""Benchmark: the daemon's cycle (rules, alert state, outbox) over a big fleet, without SSH.

With every host on its own clock, the daemon's main loop gathers the results that arrived in the
last half second and evaluates them in one cycle (``Daemon.results_cycle``): at 1,000 hosts
polled every minute, about 1.6 cycles a second of 10 fresh hosts each. What a cycle costs beyond
the fresh hosts' own rules grows with the fleet; this bench measures it on its own.

One real probe output (the stand-in nvidia-smi replaying a corpus capture, run locally through
gpuwatch's own script, as tests/test_poll.py does) is read into a HostSnapshot and given to N
hosts; the default rules run with the state database on disk (``state_dir`` in a temp dir), as
the daemon runs them. It prints the median and mean CPU per cycle (``time.process_time``) and per
host-poll, for each fleet size; ``--before REF`` runs the same with another commit's code (a
``git archive`` of REF), side by side::

    python bench/cycle.py 50 250 1000 --before HEAD~3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from poll_fleet import before_tree  # noqa: E402  (one copy for every bench)


def measure(counts: list[int], cycles: int, fresh: int) -> dict[int, dict[str, float]]:
    """In this process: the cycle's CPU for each fleet size (the code on sys.path)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from fleet import scenario_healthy_multi_gpu, standin_env  # the code measured comes from PYTHONPATH
    from gpuwatch.config.load import parse_config
    from gpuwatch.daemon import Daemon
    from gpuwatch.probe import HostProbe, build_script, new_token, snapshot_from_output
    from gpuwatch.store import AlertStore, Outbox, open_db

    out: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        scenario_healthy_multi_gpu(Path(tmp) / "standin" / "local")
        token = new_token()
        script = build_script(30, token=token, probe=HostProbe())
        env = standin_env(Path(tmp) / "standin")
        done = subprocess.run(["sh", "-s"], input=script, env=env, capture_output=True, text=True, timeout=60)
        base = snapshot_from_output("h", "h", done.stdout, done.stderr, token=token, probe=HostProbe())
        for count in counts:
            names = [f"h{i:04d}" for i in range(count)]
            state = Path(tmp) / f"state-{count}"
            doc = {"hosts": names, "state_dir": str(state), "schedule": {"poll_every": "60s"}}
            config = parse_config(doc)
            state.mkdir()
            db = open_db(state)
            daemon = Daemon(config, None, Outbox(db), {}, alert_store=AlertStore(db))  # type: ignore[arg-type]
            for name in names:  # every host answered once: the state of a running daemon
                daemon.on_result(replace(base, name=name, address=name, taken_at=None))
            daemon.results_cycle()
            costs = []
            for c in range(cycles):
                for k in range(fresh):
                    name = names[(c * fresh + k) % count]
                    daemon.on_result(replace(base, name=name, address=name, taken_at=None))
                started = time.process_time()
                daemon.results_cycle()
                costs.append(time.process_time() - started)
            db.close()
            out[count] = {
                "median_ms": 1000 * statistics.median(costs),
                "mean_ms": 1000 * statistics.fmean(costs),
                "per_poll_ms": 1000 * statistics.fmean(costs) / fresh,
            }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("counts", nargs="*", type=int, default=[50, 250, 1000])
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--fresh", type=int, default=10, help="hosts with a new result per cycle")
    parser.add_argument("--before", metavar="REF", help="also measure the code of this commit")
    parser.add_argument("--json-out", help=argparse.SUPPRESS)  # a child run: write the figures here
    args = parser.parse_args()
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(measure(args.counts, args.cycles, args.fresh)))
        return 0
    runs: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"now": ROOT / "src"}
        if args.before:
            trees = {args.before: before_tree(args.before), "now": ROOT / "src"}
        for label, src in trees.items():
            out = Path(tmp) / f"{len(runs)}.json"
            env = {**os.environ, "PYTHONPATH": str(src)}
            argv = [sys.executable, __file__, *map(str, args.counts), "--cycles", str(args.cycles)]
            subprocess.run([*argv, "--fresh", str(args.fresh), "--json-out", str(out)], env=env, check=True)
            runs[label] = json.loads(out.read_text())
    print(f"CPU of one cycle of {args.fresh} fresh hosts (median of {args.cycles}), and per host-poll")
    for count in args.counts:
        cells = [
            f"{label}: {f[str(count)]['median_ms']:.2f} ms ({f[str(count)]['per_poll_ms']:.2f} ms/poll)"
            for label, f in runs.items()
        ]
        print(f"{count:5d} hosts  " + "   ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
