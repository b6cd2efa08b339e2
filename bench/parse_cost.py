"""Benchmark: the client CPU of building one probe script and reading one probe output.

The outputs are real: the probe script runs here (``sh -s``, no SSH) against the stand-in
nvidia-smi replaying corpus captures (tests/fleet.py scenarios), twice per scenario with one
:class:`~gpuwatch.probe.HostProbe` (the first poll learns the health fields, the second is a
steady-state poll). Scenarios:

- ``h100x8``: 8 H100 under load, 3 compute processes on each (24 rows; pids mapped to real
  ``sleep`` processes, so ps, args and cgroup sections are filled);
- ``idle1``: 1 idle H100, no compute process;
- ``mig``: 1 H100 in MIG mode (``utilization.gpu`` is ``[N/A]``), 3 processes.

Timed per scenario on the steady-state output: ``build_script(30, token=..., probe=...)`` and
``snapshot_from_output(...)``, as CPU time (``time.process_time``) and wall time
(``time.perf_counter``) per call, the median of ``--repeats`` runs of ``--number`` calls each.
``--before REF`` times the same outputs with ``git archive REF``'s gpuwatch too, each version in a
child process of its own, alternating.

    python bench/parse_cost.py [--before main] [--number 300] [--repeats 7]
    python bench/parse_cost.py --save DIR   # the outputs and this gpuwatch's snapshots, as JSON
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from poll_fleet import before_tree  # noqa: E402  (one copy for every bench)

from probe_json import probe_json, snapshot_json  # noqa: E402

SCENARIOS = ("h100x8", "idle1", "mig")
COMMAND_TIMEOUT = 30.0


# --- capture (this checkout's gpuwatch and tests/fleet.py) ------------------------------------------


@contextmanager
def _sleepers(count: int) -> Iterator[list[int]]:
    """``count`` real processes for the captured pids to point at (their ps and cgroup lines)."""
    procs = [subprocess.Popen(["sleep", "600"]) for _ in range(count)]
    try:
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()


def _scenario(name: str, directory: Path, pids: list[int]) -> None:
    import fleet  # the test harness: scenarios built from the corpus captures

    if name == "h100x8":
        owners = dict(zip((11327, 11328, 11345), pids))
        fleet.scenario_healthy_multi_gpu(directory, 8, busy_gpus=range(8), owners_pids=owners)
    elif name == "idle1":
        fleet.scenario_idle(directory, 1)
    elif name == "mig":
        fleet.scenario_mig(directory, owners_pids=dict(zip((21180, 21181, 21198), pids)))
    else:
        raise ValueError(name)


def capture(name: str) -> list[dict[str, str]]:
    """Two polls of scenario ``name`` run here: [{token, stdout, stderr}, ...] (learning, steady)."""
    import fleet
    from gpuwatch.probe import HostProbe, build_script, new_token, snapshot_from_output

    polls: list[dict[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="parse-cost-") as tmp, _sleepers(3) as pids:
        _scenario(name, Path(tmp) / "standin" / "local", pids)
        env = fleet.standin_env(Path(tmp) / "standin")
        probe = HostProbe()
        for _ in range(2):
            token = new_token()
            script = build_script(COMMAND_TIMEOUT, token=token, probe=probe)
            done = subprocess.run(["sh", "-s"], input=script, env=env, capture_output=True, text=True, timeout=60)
            snap = snapshot_from_output(name, name, done.stdout, done.stderr, token=token, probe=probe)
            assert snap.ok, (name, snap.error)
            polls.append({"token": token, "stdout": done.stdout, "stderr": done.stderr})
    return polls


# --- reading (whatever gpuwatch is on sys.path: this checkout's or --before's) ---------------------


def read_polls(name: str, polls: list[dict[str, str]]) -> tuple[list[Any], Any]:
    """Each poll's snapshot, read in order with one HostProbe; and that probe."""
    from gpuwatch.probe import HostProbe, snapshot_from_output

    probe = HostProbe()
    snaps = [snapshot_from_output(name, name, p["stdout"], p["stderr"], token=p["token"], probe=probe) for p in polls]
    return snaps, probe


def _per_call(fn: Callable[[int], object], number: int, repeats: int) -> dict[str, float]:
    cpu: list[float] = []
    wall: list[float] = []
    for r in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        for i in range(r * number, (r + 1) * number):
            fn(i)
        cpu.append((time.process_time() - c0) / number * 1e6)
        wall.append((time.perf_counter() - w0) / number * 1e6)
    return {"cpu_us": statistics.median(cpu), "wall_us": statistics.median(wall)}


def time_all(captures: dict[str, list[dict[str, str]]], number: int, repeats: int) -> dict[str, Any]:
    """µs per call of build_script and snapshot_from_output for each scenario's steady-state poll.

    Every call has a token of its own, as every poll does (the output is the steady poll's with its
    token replaced), so nothing keyed by the token is reused from one call to the next; nor is
    anything keyed by the GPU rows' text."""
    import gpuwatch.parse.gpu
    from gpuwatch.probe import build_script, snapshot_from_output

    # A cache keyed by a section's text would hit here (the same GPU rows every call) where a
    # host's next poll differs: emptied before each call.
    table_cache = getattr(gpuwatch.parse.gpu, "_gpu_table", None)
    forget: Callable[[], None] = getattr(table_cache, "cache_clear", lambda: None)

    results: dict[str, Any] = {}
    for name, polls in captures.items():
        _, probe = read_polls(name, polls[:1])  # learned, as after a host's first poll
        steady = polls[-1]
        err = steady["stderr"]
        tokens = [f"{i:032x}" for i in range(number * repeats)]
        outs = [steady["stdout"].replace(steady["token"], t) for t in tokens]

        def build(i: int) -> object:
            return build_script(COMMAND_TIMEOUT, token=tokens[i], probe=probe)  # noqa: B023

        def read(i: int) -> object:
            forget()
            return snapshot_from_output(name, name, outs[i], err, token=tokens[i], probe=probe)  # noqa: B023

        results[name] = {
            "build_script": _per_call(build, number, repeats),
            "snapshot": _per_call(read, number, repeats),
        }
        results[name]["bytes"] = len(steady["stdout"])
    return results


# --- driver ----------------------------------------------------------------------------------------


def child(src: Path, captures_file: Path, number: int, repeats: int) -> dict[str, Any]:
    """:func:`time_all` in a fresh process with ``src`` first on its path."""
    env = dict(os.environ, PYTHONPATH=str(src))
    cmd = [sys.executable, __file__, "--child", str(captures_file), "--number", str(number), "--repeats", str(repeats)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def save(directory: Path, captures: dict[str, list[dict[str, str]]]) -> None:
    """Each scenario's outputs and this gpuwatch's reading of them: ``<scenario>.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, polls in captures.items():
        snaps, probe = read_polls(name, polls)
        doc = {
            "scenario": name,
            "polls": polls,
            "snapshots": [snapshot_json(s) for s in snaps],
            "probe": probe_json(probe),
        }
        (directory / f"{name}.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", help="also time this git ref's gpuwatch on the same outputs (e.g. main)")
    parser.add_argument("--number", type=int, default=300, help="calls per timed run")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs; the median is shown")
    parser.add_argument("--rounds", type=int, default=2, help="children per version, alternating (with --before)")
    parser.add_argument("--save", type=Path, help="write the outputs and their snapshots here, and stop")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        captures = json.loads(args.child.read_text())
        print(json.dumps(time_all(captures, args.number, args.repeats)))
        return 0
    sys.path.insert(0, str(ROOT / "src"))
    captures = {name: capture(name) for name in SCENARIOS}
    if args.save:
        save(args.save, captures)
        return 0
    versions = {"after": ROOT / "src"}
    if args.before:
        versions = {f"before {args.before}": before_tree(args.before), **versions}
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in versions}
    with tempfile.NamedTemporaryFile("w", suffix=".json") as handle:
        json.dump(captures, handle)
        handle.flush()
        for _ in range(args.rounds if args.before else 1):
            for label, src in versions.items():
                runs[label].append(child(src, Path(handle.name), args.number, args.repeats))
    print(f"µs per call, CPU (wall), median of {args.repeats} x {args.number} calls, best of {len(runs['after'])}")
    print(f"{'scenario':<8} {'bytes':>6}  {'call':<14}" + "".join(f"{label:>24}" for label in versions))
    for name in SCENARIOS:
        for call in ("build_script", "snapshot"):
            cells = []
            for label in versions:
                best = min(runs[label], key=lambda r: r[name][call]["cpu_us"])[name][call]
                cells.append(f"{best['cpu_us']:>12.1f} ({best['wall_us']:>7.1f})")
            size = runs["after"][0][name]["bytes"]
            print(f"{name:<8} {size:>6}  {call:<14}" + "".join(f"{c:>24}" for c in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
