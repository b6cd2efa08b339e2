"""Benchmark: wall time and client CPU of polling 1, 10 and 50 loopback SSH hosts.

Each host is a real sshd on 127.0.0.x whose stand-in nvidia-smi sleeps 0.5 s per call (two
calls per probe, so about 1 s of remote work per host). Measures:

- ``gpuwatch status`` as a user runs it (a fresh process: import, connect, probe, print);
- a steady-state poll of every host at once (connections already open), side by side in the
  same run with a bare paramiko client that probes all of them at once (one thread per host, no
  pool, no parsing): the floor any client could reach on this machine;
- the daemon itself (``gpuwatch run``, each host on its own clock, ``--daemon-seconds`` long):
  client CPU per host-poll and its resident memory.

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
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import paramiko  # noqa: E402

from fakefeishu import FakeFeishu  # noqa: E402
from fleet import (  # noqa: E402
    Fleet,
    fleet_unavailable_reason,
    scenario_healthy_multi_gpu,
    scenario_sleep,
    standin_env,
)
from gpuwatch.cli import build_poller  # noqa: E402
from gpuwatch.config.load import load_config  # noqa: E402
from gpuwatch.probe import build_script  # noqa: E402


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


def all_at_once_client(fleet: Fleet, addresses: list[str], script: str, rounds: int) -> float:
    """The floor: bare paramiko connections, opened first; each round runs the same probe script
    on every host at once (a thread per host) and waits for all. Best wall time of ``rounds``."""
    clients = []
    for address in addresses:
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())  # loopback test hosts only
        client.connect(
            address, port=fleet.port, username=fleet.monitor_user, key_filename=str(fleet.client_key), timeout=10
        )
        clients.append(client)

    def probe(client: paramiko.SSHClient, out: list[bytes]) -> None:
        stdin, stdout, _ = client.exec_command("sh -s", timeout=60)
        stdin.write(script)
        stdin.channel.shutdown_write()
        out.append(stdout.read())

    best = float("inf")
    try:
        for _ in range(rounds):
            outputs: list[bytes] = []
            threads = [threading.Thread(target=probe, args=(c, outputs)) for c in clients]
            started = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            best = min(best, time.perf_counter() - started)
            assert len(outputs) == len(clients) and all(b"index" in o for o in outputs)
    finally:
        for client in clients:
            client.close()
    return best


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def before_tree(ref: str) -> Path:
    """``git archive <ref>``'s src/ in a temp dir: the version ``--before`` compares with."""
    target = Path(tempfile.mkdtemp(prefix="gpuwatch-before-"))
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "src"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target / "src"


def daemon_run(
    fleet: Fleet, config_doc: dict[str, object], seconds: float, tmp: Path, src: Path | None = None
) -> dict[str, float]:
    """``gpuwatch run`` for ``seconds`` (polls only, alerts on, no reports): CPU per host-poll, RSS.
    ``src``: run that tree's gpuwatch (``--before``) instead of this checkout's."""
    tmp = tmp / ("before" if src else "after")
    tmp.mkdir(exist_ok=True)
    with FakeFeishu(keywords=["GPU"]) as server:
        doc = {
            **config_doc,
            "state_dir": str(tmp / "state"),
            "feishu": {"url": server.url, "keyword": "GPU"},
            "schedule": {"poll_every": "5s", "reports": []},
        }
        path = tmp / "daemon.yaml"
        path.write_text(yaml.safe_dump(doc))
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpuwatch", "run", "-c", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(src or ROOT / "src")},
        )
        try:
            time.sleep(min(10.0, seconds / 3))  # connected, first round done
            log = tmp / "state" / "gpuwatch.log"
            polls0, cpu0 = log.read_text().count(" ok ("), proc_cpu_seconds(proc.pid)
            time.sleep(seconds)
            polls, cpu = log.read_text().count(" ok (") - polls0, proc_cpu_seconds(proc.pid) - cpu0
            rss = rss_kib(proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return {"daemon_polls": polls, "daemon_cpu_per_poll_ms": 1000 * cpu / max(polls, 1), "daemon_rss_mib": rss / 1024}


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def bench(
    fleet: Fleet,
    count: int,
    sleep: float,
    rounds: int,
    light: Path | None,
    daemon_seconds: float,
    before: Path | None = None,
) -> dict[str, float]:
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
        floor = all_at_once_client(fleet, addresses, build_script(8.0, str(light) if light else "nvidia-smi"), rounds)
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
        daemon: dict[str, float] = {}
        if daemon_seconds:
            doc = yaml.safe_load(config_path.read_text())
            if before is not None:  # the same fleet, one after the other, in this one run
                old = daemon_run(fleet, doc, daemon_seconds, Path(tmp), before)
                daemon.update({f"before_{k}": v for k, v in old.items()})
            daemon.update(daemon_run(fleet, doc, daemon_seconds, Path(tmp)))
    best = min(range(rounds), key=lambda i: walls[i])
    return {
        "hosts": count,
        "status_wall_s": walls[best],
        "status_cpu_s": cpus[best],
        "status_cpu_per_host_ms": 1000 * cpus[best] / count,
        "steady_wall_s": min(steady_walls),
        "steady_cpu_per_host_ms": 1000 * min(steady_cpus) / count,
        "all_at_once_wall_s": floor,
        **daemon,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("counts", nargs="*", type=int, default=[1, 10, 50])
    parser.add_argument("--sleep", type=float, default=0.5, help="seconds the stand-in nvidia-smi sleeps per call")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--light", action="store_true", help="use a /bin/sh stand-in (same output) instead of the Python one"
    )
    parser.add_argument("--daemon-seconds", type=float, default=30, help="how long to measure the daemon (0: skip)")
    parser.add_argument("--before", help="also measure the daemon of this git ref, in the same run (e.g. main~5)")
    args = parser.parse_args()
    before = before_tree(args.before) if args.before else None
    reason = fleet_unavailable_reason()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    kind = "/bin/sh" if args.light else "Python"
    print(f"{kind} stand-in nvidia-smi sleeps {args.sleep}s per call (2 calls per probe); best of {args.rounds}")
    columns = ("hosts", "status wall", "CPU/host", "steady wall", "all-at-once", "ratio", "daemon CPU/poll", "RSS")
    widths = (5, 11, 9, 11, 11, 6, 15, 8)
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    with Fleet(max(args.counts)) as fleet, tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        light = light_standin(Path(tmp), args.sleep) if args.light else None
        for count in args.counts:
            r = bench(fleet, count, args.sleep, args.rounds, light, args.daemon_seconds, before)
            daemon = (
                f"{r['daemon_cpu_per_poll_ms']:>13.1f}ms  {r['daemon_rss_mib']:>5.0f}MiB"
                if "daemon_rss_mib" in r
                else ""
            )
            print(
                f"{count:>5}  {r['status_wall_s']:>10.2f}s  {r['status_cpu_per_host_ms']:>7.1f}ms  "
                f"{r['steady_wall_s']:>10.2f}s  {r['all_at_once_wall_s']:>10.2f}s  "
                f"{r['steady_wall_s'] / r['all_at_once_wall_s']:>5.2f}x  {daemon}"
            )
            if "before_daemon_rss_mib" in r:
                print(
                    f"{'':>5}  {'before ' + args.before:>60}  {r['before_daemon_cpu_per_poll_ms']:>13.1f}ms  "
                    f"{r['before_daemon_rss_mib']:>5.0f}MiB"
                )
    print(f"(machine: {os.cpu_count()} cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
