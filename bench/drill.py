"""Fault drill: the daemon against a loopback fleet and a Feishu-like server while things break.

For ``--seconds`` (default 90) the daemon polls every second; every few seconds the drill
breaks something: a host's driver fails or hangs, a host goes down and comes back with the
same key, Feishu answers 5xx or rate-limits or drops connections. At the end everything is
healthy again for a while, then SIGTERM. It checks what a lab would: the daemon never died,
exited 0, logged no unexpected traceback, delivered every queued message exactly once (the
outbox is empty), each host_down alert fired and resolved, and its memory did not keep
growing. Run as root: ``python bench/drill.py [--hosts 8] [--seconds 90]``. Loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fakefeishu import FakeFeishu  # noqa: E402
from fleet import (  # noqa: E402
    ERR_GPU_LOST,
    ERR_NO_DRIVER,
    Fleet,
    fleet_unavailable_reason,
    scenario_error,
    scenario_hang,
)

SECRET = "drill-secret"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=90)
    parser.add_argument("--seed", type=int, default=1)
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
        extra = "127.0.0.60"
        extra_key = fleet.add_host(extra)
        addresses = [*fleet.addresses, extra]
        state = Path(tmp) / "state"
        config = Path(tmp) / "config.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "hosts": [{"name": f"gpu-{i:02d}", "address": a} for i, a in enumerate(addresses)],
                    "ssh": fleet.gpuwatch_ssh(connect_timeout="2s", command_timeout="5s"),
                    "state_dir": str(state),
                    "feishu": {"url": feishu.url, "keyword": "GPU", "secret_env": "DRILL_FEISHU_SECRET"},
                    "schedule": {"poll_every": "1s", "reports": [{"report": "overview", "every": "3s"}]},
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
        started = time.monotonic()
        rss: list[int] = []
        events = 0
        host_removed = False
        calm_after = args.seconds * 0.7  # the last 30%: everything healthy, the outbox drains
        try:
            while time.monotonic() - started < args.seconds:
                time.sleep(2)
                if daemon.poll() is not None:
                    problems.append(f"the daemon died with code {daemon.returncode}")
                    break
                rss.append(rss_kib(daemon.pid))
                elapsed = time.monotonic() - started
                if elapsed >= calm_after:
                    fleet.reset_scenarios()
                    if host_removed:
                        fleet.add_host(extra, host_key=extra_key)
                        host_removed = False
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
            time.sleep(5)  # a few healthy cycles
        finally:
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
            try:
                code = daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                code = -9
                problems.append("the daemon did not stop within 30 s of SIGTERM")
        stderr = daemon.stderr.read().decode(errors="replace") if daemon.stderr else ""
        if code != 0:
            problems.append(f"exit code {code} after SIGTERM")
        log = (state / "gpuwatch.log").read_text(errors="replace")
        if "Traceback" in log or "Traceback" in stderr:
            problems.append("a traceback was logged")
        if SECRET in log or SECRET in stderr or feishu.url.rsplit("/", 1)[1] in log:
            problems.append("a secret reached the log")
        db = sqlite3.connect(state / "gpuwatch.sqlite3")
        left = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        firing = [json.loads(r[0]) for r in db.execute("SELECT record FROM alerts")]
        db.close()
        if left:
            problems.append(f"{left} messages still in the outbox")
        still = [r["key"]["rule"] + "@" + r["key"]["host"] for r in firing if r["state"] == "firing"]
        if still:
            problems.append(f"alerts still firing after everything healed: {still}")
        titles = [json.dumps(b, ensure_ascii=False) for b in feishu.accepted]
        duplicates = len(titles) - len(set(titles))
        down_fired = sum(t.count("FIRING host_down") for t in titles)
        down_resolved = sum(t.count("RESOLVED host_down") for t in titles)
        cycles = log.count("cycle: polled")
        growth = (max(rss[len(rss) // 2 :]) - rss[len(rss) // 2]) if len(rss) > 4 else 0
        print(f"drill: {args.seconds:.0f}s, {len(addresses)} hosts, {events} faults injected, {cycles} poll cycles")
        print(f"feishu: {len(feishu.accepted)} messages accepted, {len(feishu.rejected)} requests refused/failed")
        print(f"host_down alerts: {down_fired} fired, {down_resolved} resolved; identical bodies: {duplicates}")
        print(
            f"daemon RSS: start {rss[0] if rss else 0} KiB, end {rss[-1] if rss else 0} KiB, "
            f"growth over the second half {growth} KiB"
        )
        print(f"exit code {code}")
        if problems:
            print("PROBLEMS:\n  " + "\n  ".join(problems))
            return 1
        print("OK")
        return 0


if __name__ == "__main__":
    sys.exit(main())
