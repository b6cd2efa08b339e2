"""Benchmark: one gpuwatch daemon against loopback fleets of 50 to 1,000 hosts, beside an ideal client.

Each host is an address 127.0.0.x served by real OpenSSH sshd processes (16 addresses per sshd,
tests/fleet.py); its nvidia-smi is a light ``/bin/sh`` stand-in that sleeps ``--sleep`` seconds and
then ``cat``s output the Python stand-in rendered once from a real capture (bench/poll_fleet.py), so
the fleet's own CPU stays small and the numbers show the client's limits.

In each run, for each fleet size, two clients poll the same hosts on the same per-host clocks
(first probe at once, then each host at its own phase of ``--every``, gpuwatch.poll.phase):

- ``gpuwatch run`` (the daemon: alert rules on, no reports, a fake Feishu), measured from outside:
  its log says when each host connected and each result with its probe time;
- the ideal client: bare paramiko in a process of its own, a thread per host running gpuwatch's own
  probe script (in the same session wrapper, so the host does the same work), handshakes limited
  like gpuwatch's (8 at once), its transports waking as rarely as gpuwatch's, no parsing, no
  rules, no store.

Both run at the same time by default (``--apart``: one after the other): noise from the rest of the
machine then hits both alike, so compare the ratios of one run. Together they double the fleet's
own work: on 2 cores, 33 probes a second (50 hosts every 3 s, or 1,000 every 60 s, times two)
saturate the loopback hosts and every probe slows down; use ``--apart`` there. The loopback
hosts share one kernel, so the session wrapper's ``pkill`` and the probe's ``ps`` are no-ops here
(see NO_PKILL and NO_PS).

For each client it prints: CPU per host-poll in the steady state (from ``2 * every`` on), peak
RSS, threads and file descriptors, the time from start to every host connected and to every host
polled once, the median and p95 probe time (first probes, which include the login, left out), and
the longest gap between two results of one host, and how many gaps were longer than
``every`` + the later probe's time + 1 s (``late``: the issue's bound).

Run as root (it starts sshd and creates test users)::

    python bench/scale.py 50 250 500 1000 --every 60 --seconds 180 --apart
    python bench/scale.py 50 --every 3 --seconds 45 --apart     # the probe time against the ideal

All traffic stays on 127.0.0.0/8.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import paramiko  # noqa: E402
from poll_fleet import light_standin  # noqa: E402

from fakefeishu import FakeFeishu  # noqa: E402
from fleet import Fleet, fleet_unavailable_reason  # noqa: E402
from gpuwatch.poll import phase  # noqa: E402
from gpuwatch.probe import HostProbe, build_script, new_token, snapshot_from_output  # noqa: E402
from gpuwatch.ssh import DEFAULT_MAX_HANDSHAKES, IDLE_WAKE_SECONDS, REMOTE_KILL_GRACE, session_script  # noqa: E402

COMMAND_TIMEOUT = 8.0
FIRST_FAILURES: dict[str, str] = {}  # error kind -> the first message the daemon logged for it
# The loopback hosts share one kernel: the session wrapper's ``pkill -s`` would read the /proc of
# every session of every host (2,000 sshd processes at 1,000 hosts) three times per probe, which a
# real host never does. The bench puts this no-op first on the sessions' PATH (the wrapper then
# ends the probe's process group with kill, as where pkill is missing).
NO_PKILL = """#!/bin/sh
# bench/scale.py: found nothing to signal (see NO_PKILL there)
exit 1
"""
# Likewise procps ``ps -p PIDS`` reads every /proc entry of the machine: with the 3,000 processes of
# a 1,000-host loopback fleet one probe's host-side CPU grows from 65 to 420 ms (measured; 16.7
# probes a second would need 7 cores). The stand-in's GPU pids come from captures of other
# machines, so a real ps finds none of them here anyway: this one says so at once (exit 1, nothing
# printed: the pids are gone, and the owners unknown), for both clients alike.
NO_PS = """#!/bin/sh
# bench/scale.py: none of the pids asked for is running (see NO_PS there)
exit 1
"""
_POLL_LINE = re.compile(r"^(\S+) INFO gpuwatch\.poll: poll: (\S+) (\S+) \((?:.*, )?([\d.]+)s\)$")
_FAILURE_LINE = re.compile(r"^\S+ INFO gpuwatch\.poll: poll: \S+: (\S+): (.*)$")
_CONNECTED_LINE = re.compile(r"^(\S+) INFO gpuwatch\.ssh\.connection: connected to (\S+) ")


def host_name(index: int) -> str:
    return f"h{index:04d}"


@dataclass
class Samples:
    """What /proc says about one process, once a second: (time, cpu seconds, rss KiB, threads, fds)."""

    rows: list[tuple[float, float, int, int, int]] = field(default_factory=list)

    def cpu_at(self, when: float) -> float:
        before = [r for r in self.rows if r[0] <= when]
        return (before[-1] if before else self.rows[0])[1]


def proc_sample(pid: int) -> tuple[float, float, int, int, int] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if "VmRSS" not in fields:  # exited, not yet reaped
        return None
    cpu = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    return (time.time(), cpu, int(fields["VmRSS"].split()[0]), int(fields["Threads"]), fds)


def sample(pids: dict[str, int], out: dict[str, Samples], stop: threading.Event) -> None:
    while not stop.wait(1.0):
        for name, pid in pids.items():
            row = proc_sample(pid)
            if row is not None:
                out[name].rows.append(row)


# -- the ideal client (a process of its own: --ideal SPEC)


def ideal_main(spec_path: str) -> int:
    """Bare paramiko, a thread per host on gpuwatch's per-host clocks; writes its results as JSON."""
    spec = json.loads(Path(spec_path).read_text())
    handshakes = threading.BoundedSemaphore(DEFAULT_MAX_HANDSHAKES)
    stop = threading.Event()
    results: list[list[object]] = []  # [host, finished at (wall), probe seconds, ok]
    connected: dict[str, float] = {}
    lock = threading.Lock()
    every = float(spec["every"])
    learned: list[HostProbe | None] = [None]

    def host_loop(name: str, address: str) -> None:
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())  # loopback test hosts only
        with handshakes:
            client.connect(
                address, port=spec["port"], username=spec["user"], key_filename=spec["key"], timeout=10,
                allow_agent=False, look_for_keys=False,
            )  # fmt: skip
        with lock:
            connected[name] = time.time()
        transport = client.get_transport()
        assert transport is not None
        transport.sock.settimeout(IDLE_WAKE_SECONDS)  # not paramiko's 0.1 s: no busy polling here either
        next_at, probes = time.monotonic(), 0
        while not stop.wait(max(0.0, next_at - time.monotonic())):
            started = time.monotonic()
            token = new_token()
            # gpuwatch's own script: each host's first probe learns the driver's health fields
            # (more nvidia-smi calls), the later ones ask what one parsed output taught (shared)
            script = build_script(
                COMMAND_TIMEOUT, spec["smi"], token=token, probe=learned[0] if probes and learned[0] else HostProbe()
            )
            chan = transport.open_session(window_size=1024 * 1024)
            chan.settimeout(COMMAND_TIMEOUT + 5)
            chan.exec_command("sh -s")
            chan.sendall(session_script(script, int(COMMAND_TIMEOUT) + REMOTE_KILL_GRACE).encode())
            chan.shutdown_write()
            out = b""
            while chunk := chan.recv(65536):
                out += chunk
            status = chan.recv_exit_status()
            chan.close()
            if learned[0] is None and status == 0:
                with lock:
                    if learned[0] is None:
                        teacher = HostProbe()
                        snapshot_from_output(name, address, out.decode(), "", token=token, probe=teacher)
                        learned[0] = teacher if teacher.health_fields is not None else None
            probes += 1
            with lock:
                results.append([name, time.time(), time.monotonic() - started, status == 0 and b"index" in out])
            next_at = started + (every * phase(name) if probes == 1 else every)
        client.close()

    threads = [
        threading.Thread(target=host_loop, args=(host_name(i), a), daemon=True) for i, a in enumerate(spec["addresses"])
    ]
    for t in threads:
        t.start()
    time.sleep(float(spec["seconds"]))
    stop.set()
    with lock:
        Path(spec["out"]).write_text(json.dumps({"results": results, "connected": connected}))
    return 0


# -- the daemon


def daemon_results(state_dir: Path) -> tuple[list[list[object]], dict[str, float]]:
    """Results and connections from the daemon's log (rotated files included)."""
    results: list[list[object]] = []
    connected: dict[str, float] = {}
    for log in sorted(state_dir.glob("gpuwatch.log*"), reverse=True):
        for line in log.read_text(errors="replace").splitlines():
            if m := _POLL_LINE.match(line):
                when = datetime.fromisoformat(m[1]).timestamp()
                results.append([m[2], when, float(m[4]), m[3] == "ok", m[3]])
            elif m := _FAILURE_LINE.match(line):
                FIRST_FAILURES.setdefault(m[1], m[2][:300])
            elif m := _CONNECTED_LINE.match(line):
                connected.setdefault(m[2], datetime.fromisoformat(m[1]).timestamp())
    return results, connected


def daemon_config(fleet: Fleet, addresses: list[str], tmp: Path, smi: Path, every: float, feishu: str) -> Path:
    known = fleet.write_known_hosts(tmp / "known_hosts", addresses)
    doc = {
        "hosts": [{"name": host_name(i), "address": a} for i, a in enumerate(addresses)],
        "ssh": fleet.gpuwatch_ssh(known_hosts=known, nvidia_smi=str(smi), host_key_policy="strict"),
        "state_dir": str(tmp / "state"),
        "feishu": {"url": feishu, "keyword": "GPU"},
        "schedule": {"poll_every": f"{every:g}s", "reports": []},
    }
    path = tmp / "daemon.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


# -- figures


def figures(
    results: list[list[object]],
    connected: dict[str, float],
    samples: Samples,
    t0: float,
    hosts: int,
    every: float,
    stop_at: float,
) -> dict[str, float]:
    """``stop_at``: when the client was told to stop (its shutdown, closing every connection, is no
    steady state: counted in, it cost 50 hosts polled every 60 s about 2 ms per host-poll)."""
    by_host: dict[str, list[tuple[float, float, bool]]] = {}
    for name, when, seconds, ok, *_ in results:
        by_host.setdefault(str(name), []).append((float(when), float(seconds), bool(ok)))  # type: ignore[arg-type]
    later = [s for rows in by_host.values() for _, s, _ in sorted(rows)[1:]]
    gaps = [b[0] - a[0] for rows in by_host.values() for a, b in zip(sorted(rows), sorted(rows)[1:])]
    # the bound: no host more than poll_every + its probe time + 1 s between two results
    late = sum(
        1 for rows in by_host.values() for a, b in zip(sorted(rows), sorted(rows)[1:]) if b[0] - a[0] > every + b[1] + 1
    )
    steady_from = t0 + 2 * every
    steady = [r for r in results if steady_from <= float(r[1]) <= stop_at]  # type: ignore[arg-type]
    cpu = samples.cpu_at(stop_at) - samples.cpu_at(steady_from) if samples.rows else 0.0
    ok = sum(1 for r in results if r[3])
    failed = Counter(str(r[4]) for r in results if not r[3] and len(r) > 4)
    if failed:
        print(f"   failures: {dict(failed.most_common())}")
        for kind in failed:
            print(f"     first {kind}: {FIRST_FAILURES.get(kind, '?')}")
    FIRST_FAILURES.clear()
    first = [min(w for w, _, _ in rows) for rows in by_host.values()]
    return {
        "results": len(results),
        "ok_share": ok / max(len(results), 1),
        "cpu_ms_per_poll": 1000 * cpu / max(len(steady), 1),
        "start_cpu_s": samples.cpu_at(steady_from) if samples.rows else float("nan"),
        "rss_mib": max((r[2] for r in samples.rows), default=0) / 1024,
        "threads": max((r[3] for r in samples.rows), default=0),
        "fds": max((r[4] for r in samples.rows), default=0),
        "all_connected_s": (max(connected.values()) - t0) if len(connected) >= hosts else float("nan"),
        "all_polled_s": (max(first) - t0) if len(by_host) >= hosts else float("nan"),
        "probe_median_s": statistics.median(later) if later else float("nan"),
        "probe_p95_s": statistics.quantiles(later, n=20)[-1] if len(later) >= 20 else float("nan"),
        "max_gap_s": max(gaps, default=float("nan")),
        "late_gaps": late,
    }


def run_size(fleet: Fleet, count: int, args: argparse.Namespace, smi: Path, tmp: Path) -> dict[str, dict[str, float]]:
    addresses = fleet.addresses[:count]
    work = tmp / f"n{count}"
    work.mkdir()
    ideal_spec = work / "ideal.json"
    ideal_out = work / "ideal-results.json"
    ideal_spec.write_text(
        json.dumps(
            {
                "addresses": addresses,
                "port": fleet.port,
                "user": fleet.monitor_user,
                "key": str(fleet.client_key),
                "smi": str(smi),
                "every": args.every,
                "seconds": args.seconds,
                "out": str(ideal_out),
            }
        )
    )
    env = {**os.environ, "PYTHONPATH": args.src or str(ROOT / "src")}
    out: dict[str, dict[str, float]] = {}
    with FakeFeishu(keywords=["GPU"]) as feishu:
        config = daemon_config(fleet, addresses, work, smi, args.every, feishu.url)
        clients = {
            "ideal": [sys.executable, str(Path(__file__).resolve()), "--ideal", str(ideal_spec)],
            "gpuwatch": [sys.executable, "-m", "gpuwatch", "run", "-c", str(config)],
        }
        chosen = [name for name in ("ideal", "gpuwatch") if name in args.clients.split(",")]
        order = [[name] for name in chosen] if args.apart else [chosen]
        for group in order:
            starts, procs, samples = {}, {}, {name: Samples() for name in group}
            stops: dict[str, float] = {}  # when each client was told to stop (the ideal: at --seconds)
            for name in group:
                starts[name] = time.time()
                procs[name] = subprocess.Popen(
                    clients[name], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
                )
            stop = threading.Event()
            sampler = threading.Thread(
                target=sample, args=({n: p.pid for n, p in procs.items()}, samples, stop), daemon=True
            )
            sampler.start()
            if "gpuwatch" in procs:
                spy = None
                if args.py_spy:  # the steady state only: from 2 * every on
                    warm = 0.0 if args.spy_start else min(2 * args.every, args.seconds / 2)
                    time.sleep(warm)
                    pid, length = str(procs["gpuwatch"].pid), str(int(args.seconds - warm))
                    spy_args = [
                        "record",
                        "--nonblocking",
                        "--gil",  # what holds the GIL: the CPU of the Python code
                        "-r",
                        str(args.spy_rate),
                        "-f",
                        "raw",
                        "-o",
                        f"{args.py_spy}-{count}.txt",
                    ]
                    spy = subprocess.Popen(
                        ["py-spy", *spy_args, "--pid", pid, "-d", length],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                time.sleep(max(0.0, args.seconds - (time.time() - starts["gpuwatch"])))
                if spy is not None:
                    try:
                        spy.wait(timeout=args.seconds + 120)
                    except subprocess.TimeoutExpired:
                        spy.kill()
                stops["gpuwatch"] = time.time()
                procs["gpuwatch"].terminate()
            for name, proc in procs.items():
                _, err = proc.communicate(timeout=60 + args.seconds)
                if proc.returncode not in (0, -15):
                    print(f"{name} exited {proc.returncode}: {err[-2000:]}", file=sys.stderr)
            stop.set()
            sampler.join()
            for name in group:
                if name == "ideal":
                    data = json.loads(ideal_out.read_text()) if ideal_out.exists() else {"results": [], "connected": {}}
                    results, connected = data["results"], data["connected"]
                    if args.keep and ideal_out.exists():
                        (Path(args.keep) / str(count)).mkdir(parents=True, exist_ok=True)
                        shutil.copy(ideal_out, Path(args.keep) / str(count) / "ideal-results.json")
                else:
                    results, connected = daemon_results(work / "state")
                    if args.keep:
                        kept = Path(args.keep) / str(count)
                        kept.mkdir(parents=True, exist_ok=True)
                        for log in (work / "state").glob("gpuwatch.log*"):
                            shutil.copy(log, kept / log.name)
                stop_at = stops.get(name, starts[name] + args.seconds)
                out[name] = figures(results, connected, samples[name], starts[name], count, args.every, stop_at)
    return out


COLUMNS = (
    ("client", 8, "{}"),
    ("results", 7, "{:.0f}"),
    ("ok", 5, "{:.0%}"),
    ("CPU/poll", 9, "{:.2f}ms"),
    ("start CPU", 9, "{:.1f}s"),
    ("RSS", 8, "{:.0f}MiB"),
    ("threads", 7, "{:.0f}"),
    ("fds", 5, "{:.0f}"),
    ("connected", 9, "{:.1f}s"),
    ("polled once", 11, "{:.1f}s"),
    ("median", 7, "{:.2f}s"),
    ("p95", 7, "{:.2f}s"),
    ("max gap", 7, "{:.1f}s"),
    ("late", 4, "{:.0f}"),
)
KEYS = (
    "results",
    "ok_share",
    "cpu_ms_per_poll",
    "start_cpu_s",
    "rss_mib",
    "threads",
    "fds",
    "all_connected_s",
    "all_polled_s",
    "probe_median_s",
    "probe_p95_s",
    "max_gap_s",
    "late_gaps",
)


def print_size(count: int, figs: dict[str, dict[str, float]]) -> None:
    print(f"-- {count} hosts")
    for client, values in figs.items():
        cells = [client.rjust(COLUMNS[0][1])]
        for (_, width, fmt), key in zip(COLUMNS[1:], KEYS):
            cells.append(fmt.format(values[key]).rjust(width))
        print("  ".join(cells))
    if "ideal" in figs and "gpuwatch" in figs:
        g, i = figs["gpuwatch"], figs["ideal"]
        print(
            f"   gpuwatch/ideal: median probe {g['probe_median_s'] / i['probe_median_s']:.2f}x, "
            f"CPU per poll {g['cpu_ms_per_poll'] / max(i['cpu_ms_per_poll'], 1e-9):.2f}x"
        )
    sys.stdout.flush()


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--ideal":
        return ideal_main(sys.argv[2])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("counts", nargs="*", type=int, default=[250, 500, 1000])
    parser.add_argument("--every", type=float, default=30.0, help="poll_every of both clients, in seconds")
    parser.add_argument("--seconds", type=float, default=120.0, help="how long each client runs per fleet size")
    parser.add_argument("--sleep", type=float, default=0.5, help="seconds the stand-in nvidia-smi sleeps per call")
    parser.add_argument("--apart", action="store_true", help="run the ideal client first, then gpuwatch")
    parser.add_argument("--src", help="run the daemon from this source tree (default: this checkout's src)")
    parser.add_argument("--clients", default="ideal,gpuwatch", help="which clients to run (default: both)")
    parser.add_argument("--py-spy", metavar="PREFIX", help="profile the daemon's steady state into PREFIX-N.txt")
    parser.add_argument("--spy-rate", type=int, default=20, help="--py-spy samples per second")
    parser.add_argument("--spy-start", action="store_true", help="--py-spy from the start, not the steady state")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--keep", metavar="DIR", help="copy the daemon's logs of each fleet size to DIR/N/")
    args = parser.parse_args()
    reason = fleet_unavailable_reason()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    print(
        f"/bin/sh stand-in nvidia-smi sleeping {args.sleep}s per call; poll every {args.every:g}s; "
        f"{args.seconds:g}s per client; {'apart' if args.apart else 'together'}; "
        f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"
    )
    print("  ".join(name.rjust(width) for name, width, _ in COLUMNS))
    every_size: dict[int, dict[str, dict[str, float]]] = {}
    with Fleet(max(args.counts), startup_timeout=60) as fleet, tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        os.chmod(tmp, 0o755)  # the monitor user runs the stand-in from here
        for name, stub in (("pkill", NO_PKILL), ("ps", NO_PS)):
            (fleet.bin_dir / name).write_text(stub)
            (fleet.bin_dir / name).chmod(0o755)
        (Path(tmp) / "smi").mkdir()
        smi = light_standin(Path(tmp) / "smi", args.sleep)
        for count in args.counts:
            every_size[count] = run_size(fleet, count, args, smi, Path(tmp))
            print_size(count, every_size[count])
    if args.json:
        Path(args.json).write_text(json.dumps(every_size, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
