"""The daemon as an admin runs it: each host on its own clock, alerts as results arrive, SIGHUP.

Real ``python -m gpuwatch run`` processes against the real sshd fleet (tests/fleet.py) and the
Feishu-like server (tests/fakefeishu.py). What is checked is what the group and the log show.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path
from typing import Any

from builders import write_yaml
from fakefeishu import FakeFeishu, text_values
from fleet import ERR_VERSION_MISMATCH, Fleet, scenario_error, scenario_hang
from processes import start_run, stop_run
from waiting import wait_for

KEYWORD = "GPU"  # what conftest.feishu requires


def config_doc(tmp_path: Path, fleet: Fleet, known_hosts: Path, feishu: FakeFeishu, hosts: list[Any]) -> dict[str, Any]:
    return {
        "hosts": hosts,
        "ssh": fleet.gpuwatch_ssh(known_hosts, connect_timeout="2s", command_timeout="5s"),
        "state_dir": str(tmp_path / "state"),
        "feishu": {"url": feishu.url, "keyword": KEYWORD, "format": "post"},
        "schedule": {"poll_every": "2s", "reports": [{"report": "overview", "every": "2s"}]},
        "alerts": {"gpu_error": True, "host_down": {"after": 3}},
    }


def log_of(tmp_path: Path) -> str:
    path = tmp_path / "state" / "gpuwatch.log"
    return path.read_text(encoding="utf-8") if path.exists() else ""


def texts(body: dict[str, Any]) -> str:
    return "\n".join(text_values(body.get("content") or body.get("card")))


def overviews(feishu: FakeFeishu) -> list[str]:
    return [t for t in (texts(b) for b in feishu.accepted) if "GPU overview" in t]


def test_a_hung_host_holds_up_nobody_and_a_driver_mismatch_is_announced_within_one_interval(
    fleet: Fleet, known_hosts: Path, feishu: FakeFeishu, tmp_path: Path
) -> None:
    a = fleet.addresses
    scenario_hang(fleet.scenario_dir(a[4]))  # nvidia-smi never answers on gpu-e
    hosts = [{"name": f"gpu-{c}", "address": a[i]} for i, c in enumerate("abcde")]
    config = write_yaml(tmp_path / "config.yaml", config_doc(tmp_path, fleet, known_hosts, feishu, hosts))
    daemon = start_run(config)
    try:
        # Every healthy host reports within its first seconds, although gpu-e's probe hangs
        # for 2 s (40% of the 5 s command timeout) each time.
        wait_for(lambda: all(f"poll: gpu-{c} ok" in log_of(tmp_path) for c in "abcd"), 20, "the healthy hosts")
        wait_for(lambda: "poll: gpu-e probe_timeout" in log_of(tmp_path), 20, "gpu-e's probe timing out")
        wait_for(lambda: any("gpu-e: NO DATA (probe_timeout)" in o for o in overviews(feishu)), 20, "overview")

        # gpu-b's driver is upgraded under its loaded kernel module.
        changed_at = time.monotonic()
        scenario_error(fleet.scenario_dir(a[1]), ERR_VERSION_MISMATCH)

        def mismatch_alert() -> bool:
            return any("FIRING gpu_error (gpu-b" in texts(b) for b in feishu.accepted)

        wait_for(mismatch_alert, 30, "the gpu_error alert for gpu-b")
        took = time.monotonic() - changed_at
    finally:
        stop_run(daemon)
    # poll_every (2 s) + 5 s, whatever gpu-e is doing.
    assert took <= 2 + 5, f"the alert took {took:.1f}s"
    alert = next(texts(b) for b in feishu.accepted if "FIRING gpu_error (gpu-b" in texts(b))
    assert "version mismatch" in alert
    # gpu-b stayed reachable: it is a GPU error, and no host_down is ever said about it
    assert not any("host_down (gpu-b" in texts(b) for b in feishu.accepted)
    log = log_of(tmp_path)
    # each host on its own clock: gpu-a got several results while gpu-e kept timing out
    assert log.count("poll: gpu-a ok") >= 3
    assert "Traceback" not in log


def test_sighup_adds_a_host_keeps_the_others_connected_and_refuses_a_broken_config(
    fleet: Fleet, known_hosts: Path, feishu: FakeFeishu, tmp_path: Path
) -> None:
    a = fleet.addresses
    doc = config_doc(tmp_path, fleet, known_hosts, feishu, [{"name": "gpu-a", "address": a[0]}])
    doc["hosts"].append({"name": "gpu-b", "address": a[1]})
    config = write_yaml(tmp_path / "config.yaml", doc)
    daemon = start_run(config)
    try:
        wait_for(lambda: any("GPU for gpu-b" in o for o in overviews(feishu)), 20, "a first overview")
        assert log_of(tmp_path).count("connected to gpu-a ") == 1

        doc["hosts"].append({"name": "gpu-c", "address": a[2]})
        write_yaml(config, doc)
        daemon.send_signal(signal.SIGHUP)
        wait_for(lambda: "reloaded" in log_of(tmp_path), 10, "the reload")
        before = len(feishu.accepted)
        wait_for(lambda: any("GPU for gpu-c" in o for o in overviews(feishu)[before:]), 20, "an overview listing gpu-c")
        log = log_of(tmp_path)
        assert re.search(r"reloaded .*config\.yaml: hosts: 1 added \(gpu-c\), 0 removed, .*2 kept", log), log
        assert log.count("connected to gpu-a ") == 1  # not reconnected
        assert log.count("connected to gpu-b ") == 1
        assert log.count("connected to gpu-c ") == 1

        # A typo: refused with the one-line message of a start, the old config runs on.
        broken = config.read_text().replace("poll_every", "pol_every")
        config.write_text(broken)
        daemon.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload refused" in log_of(tmp_path), 10, "the refusal")
        refusal = next(line for line in log_of(tmp_path).splitlines() if "reload refused" in line)
        assert "schedule.pol_every: unknown key; did you mean 'poll_every'?" in refusal
        before = len(feishu.accepted)
        wait_for(lambda: any("GPU for gpu-c" in o for o in overviews(feishu)[before:]), 20, "overviews going on")
        assert daemon.poll() is None

        # Removing a host: it stops being polled, leaves the reports, and its alerts resolve.
        scenario_error(fleet.scenario_dir(a[0]), ERR_VERSION_MISMATCH)
        wait_for(lambda: any("FIRING gpu_error (gpu-a" in texts(b) for b in feishu.accepted), 20, "gpu-a's alert")
        del doc["hosts"][0]
        write_yaml(config, doc)
        daemon.send_signal(signal.SIGHUP)
        wait_for(lambda: "1 removed (gpu-a)" in log_of(tmp_path), 10, "the second reload")
        before = len(feishu.accepted)
        wait_for(lambda: len(overviews(feishu)[before:]) >= 2, 20, "two overviews after it")
        assert all("gpu-a" not in o for o in overviews(feishu)[before:][1:])
        resolved = [texts(b) for b in feishu.accepted if "RESOLVED gpu_error (gpu-a" in texts(b)]
        assert len(resolved) == 1 and "removed from the config" in resolved[0], resolved
    finally:
        stop_run(daemon)
