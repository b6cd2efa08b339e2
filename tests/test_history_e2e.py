"""The usage history as an admin runs it: real ``gpuwatch run`` processes polling the real sshd
fleet (tests/fleet.py: 4 H100s per host, GPU 0 busy with alice's, verylongusername's and an unseen
process), then ``gpuwatch usage``; and a kill -9 while the history is being written."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from fakefeishu import FakeFeishu, text_values
from fleet import Fleet, capture_bytes
from gpuwatch.cli import main
from waiting import wait_for

KEYWORD = "GPU"  # what conftest.feishu requires
H100_APPS = "csv-compute-apps/nvgpuexp-h100-80gb-hbm3-linux-590.48.01-load-compute-apps.csv"


def write_config(tmp_path: Path, fleet: Fleet, known_hosts: Path, feishu: FakeFeishu, **extra: Any) -> Path:
    doc = {
        "hosts": [{"name": f"gpu-{c}", "address": fleet.addresses[i]} for i, c in enumerate("abc")],
        "ssh": fleet.gpuwatch_ssh(known_hosts, connect_timeout="2s", command_timeout="5s"),
        "state_dir": str(tmp_path / "state"),
        "feishu": {"url": feishu.url, "keyword": KEYWORD, "format": "post"},
        "schedule": {"poll_every": "1s", "reports": []},
        **extra,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    path.chmod(0o600)
    return path


def start(config: Path, preamble: str = "") -> subprocess.Popen[bytes]:
    code = f"{preamble}\nimport sys\nfrom gpuwatch.cli import main\nsys.exit(main())"
    return subprocess.Popen(
        [sys.executable, "-c", code, "run", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=os.environ.copy(),
    )


def raw_polls(config: Path) -> int:
    path = config.parent / "state" / "history.sqlite3"
    if not path.exists():
        return 0
    with contextlib.closing(sqlite3.connect(path, timeout=10)) as db:
        try:
            return int(db.execute("SELECT COUNT(*) FROM raw WHERE ok = 1").fetchone()[0])
        except sqlite3.OperationalError:  # not migrated yet
            return 0


def usage(config: Path, *argv: str) -> dict[str, Any]:
    out = io.StringIO()
    assert main(["usage", "--json", "-c", str(config), *argv], out=out) == 0
    doc: dict[str, Any] = json.loads(out.getvalue())
    return doc


def captured_memory() -> dict[int, int]:
    """pid -> used_gpu_memory of the H100 capture the fleet replays on GPU 0."""
    lines = capture_bytes(H100_APPS).decode().splitlines()[1:]
    return {int(cells[5]): int(cells[7].split()[0]) for cells in (line.split(", ") for line in lines)}


def test_usage_shows_the_fleets_people_with_hours_that_match_their_gpus_and_the_time(
    fleet: Fleet, known_hosts: Path, feishu: FakeFeishu, tmp_path: Path
) -> None:
    config = write_config(tmp_path, fleet, known_hosts, feishu)
    started = time.time()
    daemon = start(config)
    try:
        wait_for(lambda: raw_polls(config) >= 3 * 6, 40, "six answered polls of each host in the history")
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, err = daemon.communicate(timeout=30)
    elapsed = time.time() - started
    assert daemon.returncode == 0, err.decode()
    people = {g["user"]: g for g in usage(config, "--since", "1h")["groups"]}
    assert {"alice", "verylongusername", "?"} <= set(people)  # "?": the process ps cannot see
    hosts = {g["host"]: g for g in usage(config, "--since", "1h", "--by", "host")["groups"]}
    assert set(hosts) == {"gpu-a", "gpu-b", "gpu-c"}
    used = sum(h["gpu_hours"] for h in hosts.values())
    mem = captured_memory()  # 11327 -> alice, 11328 -> verylongusername, 11345 unseen
    # GPU 0 of each host, split by the memory each one's processes hold. (A poll whose ps step timed
    # out on a busy machine names no owner: its whole GPU counts for "?" then, so the two people
    # keep the ratio of their memory, and at most their share.)
    alice, other = people["alice"]["gpu_hours"], people["verylongusername"]["gpu_hours"]
    assert alice / other == pytest.approx(mem[11327] / mem[11328], rel=3e-3)
    assert alice <= used * mem[11327] / sum(mem.values()) + 1e-5
    assert alice + other + people["?"]["gpu_hours"] == pytest.approx(used, abs=1e-5)
    assert people["alice"]["held_idle_gpu_hours"] == 0  # GPU 0 replays 100 % utilization
    assert sum(p["gpu_hours"] for p in people.values()) == pytest.approx(used, abs=1e-3)
    for name, host in hosts.items():
        # one busy GPU of four, for the time it was polled: at most the run's length (+1 poll, +rounding)
        assert host["known_gpu_hours"] == pytest.approx(4 * host["gpu_hours"], abs=1e-5), name
        assert 5 / 3600 <= host["gpu_hours"] <= (elapsed + 2) / 3600, name
        # a poll that failed (a busy test machine) is unknown time: never use, never lost
        assert host["known_gpu_hours"] + host["unknown_gpu_hours"] <= 4 * (elapsed + 2) / 3600, name
    gpus = usage(config, "--since", "1h", "--by", "gpu")
    assert sorted(gpus["never_used"]) == [f"gpu-{c}:{i}" for c in "abc" for i in (1, 2, 3)]

    # the usage report, made now, says the same
    out = io.StringIO()
    assert main(["run", "--report", "usage", "-c", str(config)], out=out) == 0
    (body,) = feishu.accepted
    text = "\n".join(text_values(body.get("content")))
    assert "GPU usage, last 1d" in text and "alice:" in text and "verylongusername:" in text
    assert "Never used (9 GPUs): gpu-a GPU 1, 2, 3" in text


# The killed daemon writes the history continuously (no pause between its transactions) and
# retries Feishu quickly, so that a kill lands in the middle of history writes with messages queued.
BUSY_WRITER = (
    "import gpuwatch.store.historywriter as writer\nwriter.FLUSH_SECONDS = 0.005\n"
    "import gpuwatch.notify.http as http\nhttp._BACKOFF_BASE_SECONDS = 0.02"
)


def outbox(config: Path) -> list[tuple[str, str]]:
    with contextlib.closing(sqlite3.connect(config.parent / "state" / "gpuwatch.sqlite3", timeout=10)) as db:
        return [(str(s), str(p)) for s, p in db.execute("SELECT summary, payload FROM outbox ORDER BY id")]


def integrity(path: Path) -> str:
    with contextlib.closing(sqlite3.connect(path, timeout=10)) as db:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])


def test_a_kill_during_history_writes_corrupts_nothing_and_every_message_goes_once(
    fleet: Fleet, known_hosts: Path, feishu: FakeFeishu, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path,
        fleet,
        known_hosts,
        feishu,
        hosts=[
            *({"name": f"gpu-{c}", "address": fleet.addresses[i]} for i, c in enumerate("abcdef")),
            {"name": "gpu-gone", "address": fleet.refused_address()},
        ],
        alerts={"host_down": {"after": 1}},
        schedule={"poll_every": "0.5s", "reports": [{"report": "overview", "every": "1s"}]},
    )
    feishu.always(503)  # refused outright: the messages wait in the outbox
    state = tmp_path / "state"
    daemon = start(config, BUSY_WRITER)
    try:

        def queued() -> bool:
            titles = {s.split(" 20")[0] for s, _ in outbox(config)} if (state / "gpuwatch.sqlite3").exists() else set()
            return {"GPU alerts: 1 firing", "GPU overview"} <= titles and raw_polls(config) >= 30

        wait_for(queued, 40, "an alert and an overview queued, and history written")
        before = raw_polls(config)
        time.sleep(0.3)  # in the middle of the writer's back-to-back transactions
        daemon.send_signal(signal.SIGKILL)
        assert daemon.wait(timeout=10) == -signal.SIGKILL
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        if daemon.stderr is not None:
            daemon.stderr.close()
    assert (state / "history.sqlite3-wal").stat().st_size > 0  # killed with its log of recent writes open
    assert integrity(state / "history.sqlite3") == "ok"
    assert integrity(state / "gpuwatch.sqlite3") == "ok"
    assert raw_polls(config) >= before  # what was committed stays; at most the write in flight is lost
    queued_alert = [p for s, p in outbox(config) if s.startswith("GPU alerts")]
    assert len(queued_alert) == 1

    feishu.reset()
    feishu.always(None)
    out = io.StringIO()
    assert main(["run", "--once", "-c", str(config)], out=out) == 0
    titles = sorted(json.dumps(b, ensure_ascii=False).split(" 20")[0].split('"')[-1] for b in feishu.accepted)
    assert len(feishu.accepted) == 2, titles  # the alert once, and one overview (the newest replaced the waiting one)
    alerts = [b for b in feishu.accepted if "GPU alerts: 1 firing" in json.dumps(b, ensure_ascii=False)]
    assert len(alerts) == 1
    assert outbox(config) == []
    assert integrity(state / "history.sqlite3") == "ok"
    assert raw_polls(config) > before  # the history goes on in the same file
    assert usage(config, "--since", "1h")["groups"]
