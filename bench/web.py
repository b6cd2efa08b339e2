"""Benchmark: the web page, the JSON API and /metrics under load, and polling on time meanwhile.

1. Requests per second (and latency) for ``/``, ``/api/v1/snapshot`` and ``/metrics`` served by the
   daemon's waitress server (4 threads) over a fleet state of 100 hosts x 8 GPUs built from real
   captures (H100 under load and idle, with the captured processes), ``--seconds`` per endpoint,
   from a separate load-generator process with ``--connections`` keep-alive connections.
2. Polling on time while the page is hammered: ``--hosts`` stand-in hosts (the demo's replayed
   scenarios, probed by the real probe script through ``sh``, no SSH) polled every 1 s, first
   quietly, then while the load generator hits ``/`` as fast as it can. Lateness of a poll = the
   time between two results of one host minus the interval.

Run: ``python bench/web.py`` (no root needed; everything on 127.0.0.1, bounded in time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from gpuwatch.config import HostConfig  # noqa: E402
from gpuwatch.config.load import parse_config  # noqa: E402
from gpuwatch.demo import H100_APPS, H100_IDLE, H100_LOAD, DemoFleet, capture_text, demo_hosts  # noqa: E402
from gpuwatch.fleet import FleetState  # noqa: E402
from gpuwatch.model import HostSnapshot, PsEntry  # noqa: E402
from gpuwatch.parse import attribute, parse_compute_apps, parse_query_gpu  # noqa: E402
from gpuwatch.poll import Poller  # noqa: E402
from gpuwatch.ssh import LocalRunner, Runner  # noqa: E402
from gpuwatch.web import WebApp, WebServer  # noqa: E402


def synthetic_state(hosts: int = 100, gpus: int = 8) -> FleetState:
    """``hosts`` x ``gpus`` from the real H100 captures: the first half of each host's GPUs busy."""
    load, _ = parse_query_gpu(capture_text(H100_LOAD))
    idle, _ = parse_query_gpu(capture_text(H100_IDLE))
    apps, _ = parse_compute_apps(capture_text(H100_APPS))
    names = [f"node-{i:03d}" for i in range(hosts)]
    state = FleetState([(n, f"10.1.{i // 250}.{i % 250 + 1}") for i, n in enumerate(names)], poll_every=60)
    for name in names:
        rows = [replace(load[0] if i < gpus // 2 else idle[0], index=i, uuid=f"GPU-{name}-{i}") for i in range(gpus)]
        procs = []
        for i in range(gpus // 2):
            moved = [replace(a, pid=a.pid + 100 * i, gpu_uuid=f"GPU-{name}-{i}") for a in apps]
            ps = {a.pid: PsEntry(a.pid, f"user{(a.pid + i) % 7}", 3600, f"python3 train.py --run {i}") for a in moved}
            procs.extend(attribute(rows, moved, ps))
        state.update(HostSnapshot(name, name, ok=True, gpus=tuple(rows), processes=tuple(procs), probe_seconds=0.2))
    return state


def serve(state: FleetState) -> WebServer:
    config = parse_config({"hosts": ["x"], "state_dir": tempfile.mkdtemp(prefix="gpuwatch-bench-"), "web": {}})
    assert config.web is not None
    server = WebServer(WebApp(state, lambda: config, config.web), "127.0.0.1", 0)
    server.start()
    return server


# ---------------------------------------------------------------- the load generator (its own process)

LOADGEN = r"""
import http.client, json, sys, threading, time
port, path, seconds = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
connections, gzip = int(sys.argv[4]), sys.argv[5] == "1"
latencies, sizes, errors = [], [], [0]
lock = threading.Lock()
deadline = time.monotonic() + seconds
def worker():
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    mine = []
    while time.monotonic() < deadline:
        started = time.monotonic()
        try:
            conn.request("GET", path, headers={"Accept-Encoding": "gzip"} if gzip else {})
            response = conn.getresponse()
            body = response.read()
            if response.status != 200:
                raise OSError(response.status)
        except (OSError, http.client.HTTPException):
            with lock:
                errors[0] += 1
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            continue
        mine.append(time.monotonic() - started)
        size = len(body)
    with lock:
        latencies.extend(mine)
        if mine:
            sizes.append(size)
threads = [threading.Thread(target=worker) for _ in range(connections)]
started = time.monotonic()
for t in threads: t.start()
for t in threads: t.join()
took = time.monotonic() - started
latencies.sort()
print(json.dumps({"requests": len(latencies), "seconds": took, "errors": errors[0], "bytes": max(sizes or [0]),
                  "p50": latencies[len(latencies) // 2] if latencies else None,
                  "p99": latencies[int(len(latencies) * 0.99)] if latencies else None}))
"""


def hammer(port: int, path: str, seconds: float, connections: int, gzip: bool = False) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", LOADGEN, str(port), path, str(seconds), str(connections), "1" if gzip else "0"],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    )
    return dict(json.loads(done.stdout))


def requests_per_second(seconds: float, connections: int) -> None:
    state = synthetic_state()
    server = serve(state)
    print(f"## 100 hosts x 8 GPUs, {connections} keep-alive connections, {seconds:g}s per endpoint")
    print("| endpoint | requests/s | p50 ms | p99 ms | body bytes | errors |")
    print("|---|---|---|---|---|---|")
    try:
        for path, gzip in (("/", False), ("/", True), ("/api/v1/snapshot", False), ("/metrics", False)):
            r = hammer(server.port, path, seconds, connections, gzip)
            label = f"`{path}`" + (" (gzip)" if gzip else "")
            print(
                f"| {label} | {r['requests'] / r['seconds']:.1f} | {1000 * r['p50']:.1f} | {1000 * r['p99']:.1f} "
                f"| {int(r['bytes'])} | {int(r['errors'])} |"
            )
    finally:
        server.stop()


# ---------------------------------------------------------------- polling on time under load


def lateness(hosts: int, seconds: float, connections: int) -> None:
    every = 1.0
    scenarios = [h.name for h in demo_hosts() if h.error is None]
    with tempfile.TemporaryDirectory(prefix="gpuwatch-bench-") as tmp:
        fleet = DemoFleet(Path(tmp) / "fleet")
        names = [f"s{i:02d}" for i in range(hosts)]
        config = parse_config(
            {"hosts": names, "state_dir": str(Path(tmp) / "state"), "ssh": {"command_timeout": "10s"}}
        )

        def factory(host: HostConfig) -> Runner:
            """Host s07 replays the demo's scenario number 7 % 5 (the demo hosts that answer)."""
            return LocalRunner(env=fleet.env(scenarios[names.index(host.name) % len(scenarios)]))

        state = FleetState([(n, n) for n in names], poll_every=every)
        arrivals: dict[str, list[float]] = {n: [] for n in names}
        lock = threading.Lock()

        def on_result(result: HostSnapshot) -> None:
            with lock:
                arrivals[result.name].append(time.monotonic())
            state.update(result)

        poller = Poller(config.hosts, factory)
        server = serve(state)
        poller.start(every, on_result)
        try:
            time.sleep(3)  # first probes and the phase spread
            phases = []
            for label, load in (("quiet", False), ("page hammered", True)):
                with lock:
                    for n in names:
                        arrivals[n].clear()
                if load:
                    result = hammer(server.port, "/", seconds, connections)
                    served = f"{result['requests'] / result['seconds']:.0f} req/s of / meanwhile"
                else:
                    time.sleep(seconds)
                    served = "-"
                with lock:
                    late = [b - a - every for n in names for a, b in zip(arrivals[n], arrivals[n][1:])]
                phases.append((label, late, served))
        finally:
            poller.close()
            server.stop()
    print(f"\n## {hosts} stand-in hosts polled every {every:g}s (real probe script via sh), {seconds:g}s per phase")
    print("| phase | polls | lateness p50 ms | p95 ms | max ms | load |")
    print("|---|---|---|---|---|---|")
    for label, late, served in phases:
        late.sort()
        p95 = late[int(len(late) * 0.95)] if late else float("nan")
        print(
            f"| {label} | {len(late)} | {1000 * statistics.median(late):.0f} | {1000 * p95:.0f} "
            f"| {1000 * max(late):.0f} | {served} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per endpoint and per phase (default 10)")
    parser.add_argument("--connections", type=int, default=4, help="load generator connections (default 4)")
    parser.add_argument("--hosts", type=int, default=10, help="stand-in hosts polled every 1 s (default 10)")
    args = parser.parse_args()
    requests_per_second(args.seconds, args.connections)
    lateness(args.hosts, args.seconds, args.connections)


if __name__ == "__main__":
    main()
