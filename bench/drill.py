"""Fault drill: the daemon against a loopback fleet and a Feishu-like server while things break.

The daemon (the real CLI, ``gpuwatch run``, in a subprocess) polls every second and sends a
per-user report for each of the fleet's two job owners every 3 s (these differ from one report
to the next by the processes' run times, so two equal bodies are two copies of one message).
The drill goes through phases (``S`` is ``--seconds``, default 180):

* faults (S/2): every few seconds something breaks at random: a host's driver fails or hangs,
  a host goes down and comes back with the same key, Feishu answers 5xx, rate-limits or drops
  connections;
* slow webhook (30 s or S/6): Feishu takes every message and answers after 15 s (the client's
  deadline is 10 s), as in issue 8;
* trickling webhook (30 s or S/6): Feishu takes every message and answers one byte every 2 s;
* streaming host (15 s or S/12): one host's nvidia-smi prints without end (``yes``);
* calm (S/4): everything healthy.

Before each webhook phase and after the last one, a "recover" phase keeps everything healthy
until the outbox is empty (``--drain`` seconds at most), so that each phase starts afresh (a
message in doubt may rightly wait a minute or more before it is posted again). At the end it
lets a few healthy cycles pass, makes Feishu silent, and sends SIGTERM while a post waits for
its answer.

It checks what a lab would: the daemon never died and exited 0 after SIGTERM within a few
seconds, sending nothing after it; no traceback and no secret in the log; nothing lost (the
outbox drained, nothing refused for good); no message reached the group more than twice
(equal bodies, the signature left out; alert messages are counted too, although a flapping
alert can legitimately say the same thing twice within a minute); every host_down alert fired
and resolved; memory flat (the daemon's RSS over the calm second half, and its peak while the
host streamed).

Run as root: ``python bench/drill.py [--hosts 8] [--seconds 180]``. Loopback only.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fakefeishu import FakeFeishu  # noqa: E402
from fleet import (  # noqa: E402
    ERR_GPU_LOST,
    ERR_NO_DRIVER,
    Fleet,
    fleet_unavailable_reason,
    publish_scenario,
    scenario_error,
    scenario_hang,
)

SECRET = "drill-secret"
REPORT_USERS = ("alice", "verylongusername")  # the fleet's job owners

def phases(seconds: float) -> list[tuple[str, float]]:
    """(name, seconds); "recover" phases last until the outbox is empty (at most --drain)."""
    webhook = max(30.0, seconds / 6)
    return [
        ("faults", seconds / 2),
        ("recover", 0.0),
        ("slow webhook", webhook),
        ("recover", 0.0),
        ("trickling webhook", webhook),
        ("recover", 0.0),
        ("streaming host", max(15.0, seconds / 12)),
        ("calm", seconds / 4),
        ("recover", 0.0),
    ]

# The stand-in wrapper for the streaming phase: a host whose scenario directory holds a file
# named "stream" runs `yes` instead of nvidia-smi (the stand-in itself ignores unknown files).
_STREAM_WRAPPER = """#!/bin/sh
# bench/drill.py: a host whose scenario holds "stream" prints without end, like a runaway tool.
addr=$(echo "$SSH_CONNECTION" | cut -d' ' -f3)
if [ -n "$addr" ] && [ -e "$GPUWATCH_STANDIN_DIR/$addr/stream" ]; then
    exec yes "GPU 0: 100 %, streaming output that never ends"
fi
exec "{real}" "$@"
"""


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def install_stream_wrapper(fleet: Fleet) -> None:
    real = fleet.bin_dir / "nvidia-smi.standin"
    shutil.move(fleet.bin_dir / "nvidia-smi", real)
    wrapper = fleet.bin_dir / "nvidia-smi"
    wrapper.write_text(_STREAM_WRAPPER.format(real=real))
    wrapper.chmod(0o755)


def start_streaming(fleet: Fleet, address: str) -> None:
    publish_scenario(fleet.scenario_dir(address), {"stream": "", "SOURCES": "stream: `yes` for ever\n"})


def identity(body: dict[str, Any]) -> str:
    """A posted body as the group sees it: without the per-attempt signature fields."""
    return json.dumps({k: v for k, v in body.items() if k not in ("timestamp", "sign")}, ensure_ascii=False)


def title_of(body: dict[str, Any]) -> str:
    post = body.get("content", {}).get("post", {})
    lang = post.get("zh_cn") or next(iter(post.values()), {})
    return str(lang.get("title", "?"))


class RssWatch(threading.Thread):
    """Samples the daemon's RSS every 0.2 s, labelled with the phase; can call for help."""

    def __init__(self, pid: int, phase: Callable[[], str], limit_kib: int, over: Callable[[], None]) -> None:
        super().__init__(daemon=True)
        self.pid, self.phase, self.limit_kib, self.over = pid, phase, limit_kib, over
        self.samples: list[tuple[float, str, int]] = []
        self.done = threading.Event()
        self.tripped = False

    def run(self) -> None:
        while not self.done.wait(0.2):
            kib = rss_kib(self.pid)
            if not kib:
                continue
            self.samples.append((time.monotonic(), self.phase(), kib))
            if kib > self.limit_kib and not self.tripped:
                self.tripped = True
                self.over()

    def peak(self, phase: str) -> int:
        return max((kib for _, p, kib in self.samples if p == phase), default=0)


def outbox_count(db_path: Path) -> int:
    try:
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
        try:
            return int(db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        finally:
            db.close()
    except sqlite3.Error:
        return -1


def keep(directory: Path, exchanges: list[Any], bounds: list[tuple[str, float, float]], log: str, stderr: str) -> None:
    """Write the evidence of a run: each post (when, phase, answer, title, body as the group sees it)
    and the daemon's log and stderr."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "exchanges.jsonl", "w", encoding="utf-8") as out:
        for e in exchanges:
            phase = next((name for name, begin, end in bounds if begin <= e.at < end), "after")
            row = {"at": round(e.at, 3), "phase": phase, "status": e.status, "code": e.code, "reason": e.reason}
            if e.body is not None:
                row |= {"title": title_of(e.body), "identity": identity(e.body)}
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    (directory / "phases.json").write_text(json.dumps(bounds))
    (directory / "gpuwatch.log").write_text(log)
    (directory / "stderr.txt").write_text(stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--drain", type=float, default=300, help="the most to wait for the outbox to empty")
    parser.add_argument("--rss-limit-mib", type=int, default=2048, help="end the streaming phase above this")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--record", type=Path, help="a directory to keep the evidence in: every post (exchanges.jsonl) and the log"
    )
    args = parser.parse_args()
    reason = fleet_unavailable_reason()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    problems: list[str] = []
    with (
        Fleet(args.hosts) as fleet,
        FakeFeishu(keywords=["GPU"], secret=SECRET) as feishu,
        tempfile.TemporaryDirectory() as tmp,
    ):
        install_stream_wrapper(fleet)
        extra = "127.0.0.60"
        extra_key = fleet.add_host(extra)
        addresses = [*fleet.addresses, extra]
        streamer = fleet.addresses[-1]
        state = Path(tmp) / "state"
        config = Path(tmp) / "config.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "hosts": [{"name": f"gpu-{i:02d}", "address": a} for i, a in enumerate(addresses)],
                    "ssh": fleet.gpuwatch_ssh(connect_timeout="2s", command_timeout="5s"),
                    "state_dir": str(state),
                    "feishu": {"url": feishu.url, "keyword": "GPU", "secret_env": "DRILL_FEISHU_SECRET"},
                    "schedule": {
                        "poll_every": "1s",
                        "reports": [{"report": "user", "user": u, "every": "3s"} for u in REPORT_USERS],
                    },
                    "alerts": {"host_down": {"after": 2}, "gpu_error": True, "gpu_missing": True},
                }
            )
        )
        config.chmod(0o600)
        env = {**os.environ, "DRILL_FEISHU_SECRET": SECRET}
        daemon = subprocess.Popen(
            [sys.executable, "-m", "gpuwatch", "run", "-c", str(config)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        stderr_chunks: list[bytes] = []

        def drain_stderr() -> None:  # so that a chatty daemon never blocks on a full pipe
            assert daemon.stderr is not None
            for chunk in iter(lambda: daemon.stderr.read1(65536), b""):  # type: ignore[union-attr]
                stderr_chunks.append(chunk)

        threading.Thread(target=drain_stderr, daemon=True).start()

        db_path = state / "gpuwatch.sqlite3"
        bounds: list[tuple[str, float, float]] = []  # the phases as they ran
        current = {"phase": "start"}
        watch = RssWatch(
            daemon.pid,
            lambda: current["phase"],
            args.rss_limit_mib * 1024,
            lambda: fleet.reset_scenarios(),  # the streaming host stops streaming
        )
        watch.start()
        events = 0
        host_removed = False
        stop_seconds = -1.0
        posts_after_sigterm = -1
        recoveries: list[float] = []
        code = -1
        try:
            for name, seconds in phases(args.seconds):
                current["phase"] = name
                begin = time.monotonic()
                fleet.reset_scenarios()
                feishu.clear_faults()
                if host_removed:
                    fleet.add_host(extra, host_key=extra_key)
                    host_removed = False
                if name == "recover":
                    while outbox_count(db_path) != 0:
                        if time.monotonic() - begin > args.drain:
                            problems.append(f"the outbox did not empty within {args.drain:.0f} s of healthy running")
                            break
                        if daemon.poll() is not None:
                            raise RuntimeError(f"the daemon died with code {daemon.returncode}")
                        time.sleep(1)
                    recoveries.append(time.monotonic() - begin)
                    bounds.append((name, begin, time.monotonic()))
                    continue
                if name == "slow webhook":
                    feishu.always("slow:15")
                elif name == "trickling webhook":
                    feishu.always("trickle:2")
                elif name == "streaming host" and not watch.tripped:
                    start_streaming(fleet, streamer)
                end = begin + seconds
                while time.monotonic() < end:
                    time.sleep(min(2.0, max(end - time.monotonic(), 0.0)))
                    if daemon.poll() is not None:
                        raise RuntimeError(f"the daemon died with code {daemon.returncode}")
                    if name != "faults" or time.monotonic() >= end:
                        continue
                    events += 1
                    action = rng.choice(["driver", "hang", "lost", "down", "feishu-5xx", "feishu-limit", "heal"])
                    target = rng.choice(fleet.addresses)
                    if action == "driver":
                        scenario_error(fleet.scenario_dir(target), ERR_NO_DRIVER)
                    elif action == "lost":
                        scenario_error(fleet.scenario_dir(target), ERR_GPU_LOST)
                    elif action == "hang":
                        scenario_hang(fleet.scenario_dir(target))
                    elif action == "down" and not host_removed:
                        fleet.remove_host(extra)
                        host_removed = True
                    elif action == "feishu-5xx":
                        feishu.fail_next([500, 503, "drop"])
                    elif action == "feishu-limit":
                        feishu.fail_next([11232, 11232])
                    else:
                        fleet.reset_scenarios()
                        if host_removed:
                            fleet.add_host(extra, host_key=extra_key)
                            host_removed = False
                bounds.append((name, begin, time.monotonic()))

            current["phase"] = "healthy"
            time.sleep(5)  # a few healthy cycles

            # SIGTERM while a post waits for an answer that never comes.
            current["phase"] = "stop"
            feishu.always("silent")
            seen = len(feishu.exchanges)
            if not feishu.wait_for_requests(seen + 1, timeout=30):
                problems.append("no post reached the silent webhook within 30 s (stop not tested mid-post)")
            time.sleep(0.5)
            sigterm_at = time.monotonic()
            daemon.send_signal(signal.SIGTERM)
            try:
                code = daemon.wait(timeout=60)
            except subprocess.TimeoutExpired:
                daemon.kill()
                code = -9
                problems.append("the daemon did not stop within 60 s of SIGTERM")
            stop_seconds = time.monotonic() - sigterm_at
            posts_after_sigterm = sum(1 for e in feishu.exchanges if e.at > sigterm_at)
        except RuntimeError as exc:
            problems.append(str(exc))
        finally:
            watch.done.set()
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
                try:
                    code = daemon.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    code = -9
            feishu.always(None)
        stderr = b"".join(stderr_chunks).decode(errors="replace")

        # ------------------------------------------------------------------ what a lab checks
        if code != 0:
            problems.append(f"exit code {code} after SIGTERM")
        if stop_seconds > 5:
            problems.append(f"the stop took {stop_seconds:.1f} s (more than 5 s)")
        if posts_after_sigterm > 0:
            problems.append(f"{posts_after_sigterm} posts after SIGTERM")
        log = (state / "gpuwatch.log").read_text(errors="replace")
        if args.record is not None:
            keep(args.record, feishu.exchanges, bounds, log, stderr)
        if "Traceback" in log or "Traceback" in stderr:
            problems.append("a traceback was logged")
        if SECRET in log or SECRET in stderr or feishu.url.rsplit("/", 1)[1] in log:
            problems.append("a secret reached the log")
        db = sqlite3.connect(state / "gpuwatch.sqlite3")
        left = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        dead = db.execute("SELECT COUNT(*) FROM outbox WHERE dead = 1").fetchone()[0]
        firing = [json.loads(r[0]) for r in db.execute("SELECT record FROM alerts")]
        db.close()
        if dead:
            problems.append(f"{dead} messages refused for good")
        still = [r["key"]["rule"] + "@" + r["key"]["host"] for r in firing if r["state"] == "firing"]
        if still:
            problems.append(f"alerts still firing after everything healed: {still}")

        exchanges = feishu.exchanges
        received = [e for e in exchanges if e.code == 0 and e.body is not None]  # what reached the group
        copies = collections.Counter(identity(e.body) for e in received if e.body is not None)
        worst = max(copies.values(), default=0)
        twice = sum(1 for n in copies.values() if n == 2)
        more = [b for b, n in copies.items() if n > 2]
        if more:
            titles = ", ".join(sorted({title_of(json.loads(b))[:60] for b in more}))
            problems.append(f"{len(more)} messages reached the group more than twice (worst: {worst} copies): {titles}")
        texts = [identity(e.body) for e in received if e.body is not None]
        down_fired = sum(t.count("FIRING host_down") for t in texts)
        down_resolved = sum(t.count("RESOLVED host_down") for t in texts)
        cycles = len(re.findall(r"poll: \S+ (?:ok|\w+) \(", log))
        # lines, not occurrences: each such line also quotes the channel's own "the message may have
        # been delivered" (counting both said 56 for 28 sends in doubt)
        doubt = sum(1 for line in log.splitlines() if "may have been delivered" in line)

        rss = watch.samples
        calm_begin = next((begin for name, begin, _ in bounds if name == "calm"), float("inf"))
        calm = [kib for at, p, kib in rss if at >= calm_begin and p != "stop"]  # calm, recover, healthy
        half = calm[len(calm) // 2 :]
        growth = (max(half) - half[0]) if len(half) > 4 else 0
        stream_peak = watch.peak("streaming host")
        base_peak = max((kib for _, p, kib in rss if p in ("faults", "slow webhook", "trickling webhook")), default=0)
        if watch.tripped:
            problems.append(
                f"the daemon's RSS passed {args.rss_limit_mib} MiB while a host streamed output "
                "(the streaming phase was ended early)"
            )
        if growth > 20 * 1024:
            problems.append(f"RSS grew {growth // 1024} MiB over the calm second half")

        print(f"drill: {args.seconds:.0f}s, {len(addresses)} hosts, {events} faults injected, {cycles} host polls")
        print(f"feishu: {len(exchanges)} requests, {len(received)} messages reached the group")
        for name, begin, end in bounds:
            posts = [e for e in exchanges if begin <= e.at < end]
            peak = max((kib for at, _, kib in rss if begin <= at < end), default=0)
            phase_copies = collections.Counter(identity(e.body) for e in posts if e.code == 0 and e.body is not None)
            print(
                f"  {name:18s} {end - begin:5.0f}s: {len(posts):3d} posts, "
                f"{sum(phase_copies.values()):3d} reached the group "
                f"(most copies of one: {max(phase_copies.values(), default=0)}), "
                f"daemon RSS peak {peak // 1024} MiB"
            )
        print(
            f"messages: {len(copies)} distinct reached the group; twice: {twice}; more than twice: {len(more)} "
            f"(worst {worst} copies); log lines 'may have been delivered': {doubt}"
        )
        recovered = ", ".join(f"{t:.0f}s" for t in recoveries)
        print(f"outbox: emptied in recover phases after {recovered}; {left} left after the stop (in doubt)")
        print(f"host_down alerts: {down_fired} fired, {down_resolved} resolved")
        print(
            f"daemon RSS: peak before streaming {base_peak // 1024} MiB, while streaming {stream_peak // 1024} MiB, "
            f"growth over the calm second half {growth} KiB"
        )
        print(
            f"stop: SIGTERM mid-post -> exit code {code} after {stop_seconds:.1f}s, "
            f"{posts_after_sigterm} posts after it"
        )
        if problems:
            print("PROBLEMS:\n  " + "\n  ".join(problems))
            return 1
        print("OK")
        return 0


if __name__ == "__main__":
    sys.exit(main())
