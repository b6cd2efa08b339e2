"""Benchmark: the daemon's idle upkeep, the CPU ``gpuwatch run`` spends when there is nothing to do.

Starts ``python -m gpuwatch run`` (``PYTHONPATH`` = the ``src`` of ``--src``, default this checkout)
with a config of ``--hosts`` hosts that are all down (127.0.0.1 on a closed port, ``connect_timeout:
1s``, ``poll_every: 1d`` (``--poll-every``): each is probed at start, and again only at its own phase
of the interval, most likely not while measured), a fake Feishu
(tests/fakefeishu.py), history on (the default), optionally one report ``every: 1h`` (``--report``)
and an ``alertmanager:`` channel (``--alertmanager``, a local receiver that answers 200 to
anything). After ``--warmup`` seconds it reads the process's CPU (utime + stime of every thread,
``/proc/PID/stat``) over ``--seconds`` and prints CPU ms per second: the fixed cost that runs
whatever the polls do.

``--before REF`` runs the same against ``git archive REF``'s ``src/`` (in a temp dir) at the same
time, side by side, so both see the same machine load. ``--repeat K`` does it K times.

Usage: ``python bench/upkeep.py [--hosts 50] [--seconds 60] [--report] [--alertmanager] [--before main]``.
All traffic stays on 127.0.0.0/8 (nothing listens on port 9).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from poll_fleet import before_tree  # noqa: E402  (one copy for every bench)

from fakefeishu import FakeFeishu  # noqa: E402

#: A port nothing listens on: each probe is refused at once.
CLOSED_PORT = 9


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (every thread), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_counters(pid: int) -> dict[str, tuple[int, int]]:
    """Each live thread's CPU time in ns (``/proc/PID/task/TID/schedstat``, finer than the stat's
    10 ms ticks) and its voluntary context switches (how often it went to sleep, so woke)."""
    counters = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            ns = int((task / "schedstat").read_text().split()[0])
            status = (task / "status").read_text()
            switches = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("voluntary_ctxt"))
            counters[task.name] = (ns, switches)
    return counters


class _Accept(BaseHTTPRequestHandler):
    """Answers 200 to any POST: a stand-in Alertmanager (only firing alerts are posted: none here)."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def alertmanager() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Accept)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def config_doc(
    hosts: int, state_dir: Path, feishu: str, report: bool, am_url: str | None, poll_every: str = "1d"
) -> dict[str, object]:
    doc: dict[str, object] = {
        "hosts": [{"name": f"down{i:04d}", "address": "127.0.0.1", "port": CLOSED_PORT} for i in range(hosts)],
        "ssh": {"user": "bench", "connect_timeout": "1s", "use_ssh_config": False, "host_key_policy": "off"},
        "state_dir": str(state_dir),
        "feishu": {"url": feishu, "keyword": "GPU"},
        "schedule": {"poll_every": poll_every, "reports": [{"report": "overview", "every": "1h"}] if report else []},
    }
    if am_url is not None:
        doc["alertmanager"] = {"url": am_url}
    return doc


@contextlib.contextmanager
def daemon(src: Path, tmp: Path, args: argparse.Namespace) -> Iterator[subprocess.Popen[bytes]]:
    """``gpuwatch run`` of tree ``src`` with the bench's config, stopped on leaving."""
    tmp.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        feishu = stack.enter_context(FakeFeishu(keywords=["GPU"]))
        am_url = stack.enter_context(alertmanager()) if args.alertmanager else None
        path = tmp / "upkeep.yaml"
        path.write_text(
            yaml.safe_dump(config_doc(args.hosts, tmp / "state", feishu.url, args.report, am_url, args.poll_every))
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpuwatch", "run", "-c", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(src)},
        )
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass(frozen=True)
class Upkeep:
    """One daemon's idle upkeep over the measured seconds."""

    cpu_ms_per_s: float  # utime + stime of the process (10 ms ticks)
    sched_ms_per_s: float  # the threads alive at both reads, in ns (finer)
    wakes_per_s: float  # their voluntary context switches


def measure(trees: dict[str, Path], args: argparse.Namespace) -> dict[str, Upkeep]:
    """Each tree's daemon, all at once: its upkeep over ``args.seconds`` after the warm-up."""
    with tempfile.TemporaryDirectory(prefix="gpuwatch-upkeep-") as tmp, contextlib.ExitStack() as stack:
        procs = {label: stack.enter_context(daemon(src, Path(tmp) / label, args)) for label, src in trees.items()}
        time.sleep(args.warmup)
        for label, proc in procs.items():
            if proc.poll() is not None:
                log = Path(tmp) / label / "state" / "gpuwatch.log"
                tail = log.read_text()[-2000:] if log.exists() else "(no log)"
                raise SystemExit(f"{label}: gpuwatch run ended ({proc.returncode}):\n{tail}")
        cpu0 = {label: proc_cpu_seconds(proc.pid) for label, proc in procs.items()}
        threads0 = {label: thread_counters(proc.pid) for label, proc in procs.items()}
        time.sleep(args.seconds)
        result = {}
        for label, proc in procs.items():
            cpu, threads = proc_cpu_seconds(proc.pid) - cpu0[label], thread_counters(proc.pid)
            both = [(threads[t], threads0[label][t]) for t in threads if t in threads0[label]]
            ns = sum(now[0] - then[0] for now, then in both)
            wakes = sum(now[1] - then[1] for now, then in both)
            result[label] = Upkeep(1000 * cpu / args.seconds, ns / 1e6 / args.seconds, wakes / args.seconds)
        return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--hosts", type=int, default=50, help="hosts in the config, all down (default 50)")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to measure (default 60)")
    parser.add_argument("--warmup", type=float, default=15.0, help="wait this long after start (default 15)")
    parser.add_argument(
        "--poll-every",
        default="1d",
        help="each host's poll interval (default 1d: after the first, each host is probed at its own "
        "phase of the interval: with 1h, 50 hosts make a probe about every 72 s)",
    )
    parser.add_argument("--report", action="store_true", help="one report every 1h")
    parser.add_argument("--alertmanager", action="store_true", help="an alertmanager: channel (a local receiver)")
    parser.add_argument("--src", type=Path, default=ROOT / "src", help="the src/ to run (default: this checkout's)")
    parser.add_argument("--before", help="also run this git ref's daemon, side by side (e.g. main)")
    parser.add_argument("--repeat", type=int, default=1, help="measure this many times")
    args = parser.parse_args()
    trees = {"after": args.src.resolve()}
    if args.before:
        trees["before " + args.before] = before_tree(args.before)
    extras = ", ".join(
        what for what, on in (("a report every 1h", args.report), ("alertmanager", args.alertmanager)) if on
    )
    extras = f", {extras}" if extras else ""
    print(f"{args.hosts} hosts down, poll_every {args.poll_every}{extras}; {args.seconds:.0f} s measured")
    try:
        for run in range(1, args.repeat + 1):
            for label, u in measure(trees, args).items():
                print(
                    f"run {run}  {label:<16} CPU {u.cpu_ms_per_s:6.2f} ms/s (utime+stime)  "
                    f"{u.sched_ms_per_s:6.3f} ms/s (schedstat)  {u.wakes_per_s:6.2f} wakes/s",
                    flush=True,
                )
    finally:
        for label, src in trees.items():
            if label != "after":
                shutil.rmtree(src.parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
