"""``gpuwatch demo`` as a newcomer runs it: no config, no servers, no SSH, no root; a URL to open."""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from waiting import wait_for

SRC = Path(__file__).resolve().parents[1] / "src"


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def test_demo_serves_a_replayed_fleet_and_prints_what_it_would_send(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpuwatch", "demo", "--listen", "127.0.0.1:0", "--poll-every", "1s", "--for", "60s"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        env=env,
    )
    assert proc.stdout is not None
    output = b""
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)

    def read_more() -> str:
        nonlocal output
        for _ in selector.select(timeout=0.05):
            output += os.read(proc.stdout.fileno(), 65536)  # type: ignore[union-attr]
        return output.decode()

    try:
        wait_for(lambda: "Open http://" in read_more(), 30, "the demo to say its URL")
        match = re.search(r"Open (http://127\.0\.0\.1:\d+/)", read_more())
        assert match, read_more()
        url = match.group(1)
        wait_for(lambda: all(h["taken_at"] for h in get(url + "api/v1/snapshot")["hosts"]), 30, "every host polled")
        doc = get(url + "api/v1/snapshot")
        hosts = {h["name"]: h for h in doc["hosts"]}
        assert len(hosts) == 6
        down = [h for h in hosts.values() if not h["ok"]]
        assert [(h["name"], h["error_kind"]) for h in down] == [("old-f", "driver_mismatch")]
        assert hosts["mig-c"]["gpus"][0]["utilization_percent"] is None  # MIG mode
        assert doc["summary"]["free_gpus"] >= 3 and doc["summary"]["gpus"] >= 12
        users = {p["user"] for h in hosts.values() for p in h["processes"]}
        assert {"alice", "bob", "verylongusername"} <= users
        wait_for(lambda: "FIRING gpu_error (old-f)" in read_more(), 30, "the gpu_error alert printed")
        assert "----- would send to console -----" in read_more()
        # the printed ack line runs as printed (from another shell, while the demo runs)
        wait_for(lambda: "an admin can acknowledge it: " in read_more(), 10, "the ack line")
        line = re.search(r"an admin can acknowledge it: (.+)", read_more())
        assert line, read_more()
        acked = subprocess.run(["bash", "-c", line.group(1)], capture_output=True, text=True, timeout=60, env=env)
        assert acked.returncode == 0, acked.stdout + acked.stderr
        assert "1 firing alert (rule=gpu_error host=old-f): no more reminders" in acked.stdout
        with urllib.request.urlopen(url, timeout=10) as response:
            assert b"old-f" in response.read()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, proc.stderr.read().decode() if proc.stderr else ""
