"""Bookings end to end over the real sshd fleet (root only): ``gpuwatch reserve``, ``run --once``
against hosts replaying real captures through the stand-in nvidia-smi (GPU 0's processes are real
processes of alice and verylongusername), Feishu over real HTTP (tests/fakefeishu.py).

A booking of GPUs 0-1 for verylongusername while alice runs on GPU 0: ``reservation_conflict``
fires once (one message naming both, mentioning both), says nothing more on the next runs, and
resolves when the booking is removed; the free report lists the idle booked GPU 1 as reserved,
not free; ``status --json`` says so too.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from fakefeishu import FakeFeishu, seen
from fleet import Fleet, scenario_healthy_multi_gpu
from gpuwatch.cli import main

KEYWORD = "GPU"  # what conftest.feishu requires


# main() installs log handlers on the root logger: conftest.restore_logging takes them away afterwards.
pytestmark = pytest.mark.usefixtures("restore_logging")


def cli(config: Path, *args: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main([*args, "-c", str(config)], out=out)
    return code, out.getvalue()


def fleet_config(tmp_path: Path, fleet: Fleet, known_hosts: Path, feishu: FakeFeishu, address: str) -> Path:
    doc: dict[str, Any] = {
        "hosts": [{"name": "gpu-a", "address": address}],
        "ssh": fleet.gpuwatch_ssh(known_hosts),
        "state_dir": str(tmp_path / "state"),
        "schedule": {"poll_every": "1s", "reports": []},
        "feishu": {
            "url": feishu.url,
            "keyword": KEYWORD,
            "format": "card",
            "mentions": {"alice": "ou_alice", "verylongusername": "ou_vlu", "carol": "ou_carol"},
        },
        "alerts": {"reservation_conflict": True},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    path.chmod(0o600)
    return path


def alert_texts(feishu: FakeFeishu) -> list[str]:
    return [seen(b).text for b in feishu.accepted if "GPU alerts" in seen(b).text]


def test_someone_on_a_booked_gpu_fires_once_naming_both_and_resolves_when_the_booking_is_removed(
    fleet: Fleet, known_hosts: Path, tmp_path: Path, feishu: FakeFeishu
) -> None:
    address = fleet.addresses[2]
    scenario_healthy_multi_gpu(fleet.scenario_dir(address), 4, busy_gpus=(0,), owners_pids=fleet.default_owner_map())
    config = fleet_config(tmp_path, fleet, known_hosts, feishu, address)
    code, out = cli(
        config, "reserve", "add", "--user", "verylongusername", "--host", "gpu-a", "--gpus", "0-1", "--for", "2h"
    )
    assert code == 0 and out.startswith("reservation #1 added: verylongusername: gpu-a GPU 0-1, ")

    assert cli(config, "run", "--once")[0] == 0
    (first,) = feishu.accepted
    text = seen(first).text
    assert "FIRING reservation_conflict (gpu-a, user alice)" in text
    assert "alice runs processes on gpu-a GPU 0, reserved for verylongusername until " in text
    assert "(reservation #1)" in text
    assert set(seen(first).mentions) == {"ou_alice", "ou_vlu"}  # both people; no one else
    assert "unknown" not in text  # gpu_burn (pid 11345, not seen by ps) is nobody's conflict

    assert cli(config, "run", "--once")[0] == 0  # still there: nothing more to say
    assert cli(config, "run", "--once")[0] == 0
    assert len(feishu.accepted) == 1

    code, out = cli(config, "alerts")
    assert code == 1 and "reservation_conflict" in out

    assert cli(config, "reserve", "remove", "1")[0] == 0
    assert cli(config, "run", "--once")[0] == 0
    assert len(feishu.accepted) == 2
    resolved = alert_texts(feishu)[1]
    assert "RESOLVED reservation_conflict (gpu-a, user alice)" in resolved
    assert "was: alice runs processes on gpu-a GPU 0, reserved for verylongusername" in resolved
    assert cli(config, "run", "--once")[0] == 0
    assert len(feishu.accepted) == 2


def test_the_free_report_and_status_show_a_booked_idle_gpu_as_reserved(
    fleet: Fleet, known_hosts: Path, tmp_path: Path, feishu: FakeFeishu
) -> None:
    address = fleet.addresses[3]
    scenario_healthy_multi_gpu(fleet.scenario_dir(address), 4, busy_gpus=(0,), owners_pids=fleet.default_owner_map())
    config = fleet_config(tmp_path, fleet, known_hosts, feishu, address)
    assert cli(config, "reserve", "add", "--user", "carol", "--host", "gpu-a", "--gpus", "1", "--for", "3h")[0] == 0

    assert cli(config, "run", "--once", "--report", "free")[0] == 0
    (report,) = feishu.accepted  # carol is on no GPU: no conflict, only the report
    text = seen(report).text
    assert "Free GPUs " in text and ": 2 of 4" in text
    assert "\n1 · H100 80GB HBM3 · idle, reserved for carol until " in text  # GPU 1, on the card
    assert "reservation_conflict" not in text

    code, out = cli(config, "status", "--json")
    assert code == 0
    gpus = json.loads(out)["hosts"][0]["gpus"]
    assert [g["free"] for g in gpus] == [False, False, True, True]
    assert gpus[1]["reserved_for"]["user"] == "carol" and gpus[1]["reserved_for"]["id"] == 1
    code, out = cli(config, "status", "--free", "--color", "never")
    assert "gpu-a" in out and "reserved for carol" not in out  # --free: only GPUs 2 and 3
    code, out = cli(config, "status", "--color", "never")
    assert "reserved for carol until " in out


def test_a_booking_that_starts_while_its_gpu_is_busy_is_said_once(
    fleet: Fleet, known_hosts: Path, tmp_path: Path, feishu: FakeFeishu
) -> None:
    address = fleet.addresses[4]
    scenario_healthy_multi_gpu(fleet.scenario_dir(address), 4, busy_gpus=(0,), owners_pids=fleet.default_owner_map())
    config = fleet_config(tmp_path, fleet, known_hosts, feishu, address)
    assert cli(config, "run", "--once")[0] == 0  # the host's first result: nothing booked, nothing said
    assert feishu.accepted == []

    assert cli(config, "reserve", "add", "--user", "carol", "--host", "gpu-a", "--gpus", "0-1", "--for", "1h")[0] == 0
    assert cli(config, "run", "--once")[0] == 0
    (message,) = feishu.accepted
    text = seen(message).text
    assert "NOTICE carol's reservation #1 of gpu-a GPU 0-1 has started, until " in text
    assert "but GPU 0 is still busy (alice, verylongusername still on it)" in text
    assert "FIRING reservation_conflict on gpu-a: users alice, verylongusername" in text
    assert set(seen(message).mentions) == {"ou_alice", "ou_vlu", "ou_carol"}
    assert cli(config, "run", "--once")[0] == 0
    assert len(feishu.accepted) == 1  # said once
