""" "Tell me when" end to end: the CLI registers against the real sshd fleet (tests/fleet.py), ``--once``
runs and a real daemon process judge the wishes, the Feishu-like server (tests/fakefeishu.py) shows
what the group reads.

The process a ``notify-when-done`` wish waits for is a real process this test starts, which the
stand-in nvidia-smi reports as a GPU process (its ``pids`` file maps a captured pid to it); the
process "ends" as it does on a real host: it is killed, and nvidia-smi no longer lists it.
"""

from __future__ import annotations

import io
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from fakefeishu import FakeFeishu, seen
from fleet import ERR_GPU_LOST, H100_LOAD_APPS, Fleet, capture_pids, scenario_error, scenario_healthy_multi_gpu
from gpuwatch.cli import main
from processes import start_run, stop_run
from waiting import wait_for

KEYWORD = "GPU"  # what conftest.feishu requires
CAPTURED = capture_pids(H100_LOAD_APPS)  # [11327, 11328, 11345]


# main() installs log handlers on the root logger: conftest.restore_logging takes them away afterwards.
pytestmark = pytest.mark.usefixtures("restore_logging")


def write_config(tmp_path: Path, fleet: Fleet, known_hosts: Path, feishu: FakeFeishu, hosts: list[Any]) -> Path:
    doc = {
        "hosts": hosts,
        "ssh": fleet.gpuwatch_ssh(known_hosts),
        "state_dir": str(tmp_path / "state"),
        "feishu": {"url": feishu.url, "keyword": KEYWORD, "format": "card", "mentions": {"alice": "ou_alice"}},
        "schedule": {"poll_every": "1s", "reports": []},
        "alerts": {"host_down": {"after": 100}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    path.chmod(0o600)
    return path


def cli(config: Path, *args: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main([*args, "-c", str(config)], out=out)
    return code, out.getvalue()


def wish_texts(feishu: FakeFeishu, words: str) -> list[str]:
    return [text for text in (seen(b).text for b in feishu.accepted) if words in text]


def test_a_done_wish_sends_one_message_when_its_process_is_stopped_and_none_while_its_host_is_down(
    fleet: Fleet,
    known_hosts: Path,
    tmp_path: Path,
    feishu: FakeFeishu,
    sleeper: subprocess.Popen[bytes],
    refused_address: str,
) -> None:
    address = fleet.addresses[0]
    scenario_healthy_multi_gpu(fleet.scenario_dir(address), 4, owners_pids={CAPTURED[0]: sleeper.pid})
    hosts = [{"name": "gpu-a", "address": address}, {"name": "gpu-off", "address": refused_address}]
    config = write_config(tmp_path, fleet, known_hosts, feishu, hosts)

    # refused: a pid that is no GPU process there; a host that does not answer; a host not configured
    code, out = cli(config, "notify-when-done", "--host", "gpu-a", "--pid", "4242")
    assert code == 1 and out.startswith("process 4242 is not a GPU process on gpu-a now (its GPU processes: ")
    assert f"{sleeper.pid} (" in out and out.endswith("; nothing registered\n")
    code, out = cli(config, "notify-when-done", "--host", "gpu-off", "--pid", str(sleeper.pid))
    assert code == 1 and out.startswith("gpu-off did not answer (unreachable: ")
    assert cli(config, "notify-when-done", "--list") == (0, "no open notify-when-done wishes\n")

    code, out = cli(config, "notify-when-done", "--host", "gpu-a", "--pid", str(sleeper.pid), "--user", "alice")
    assert code == 0, out
    assert re.match(
        rf"wish #1 added: tell alice when gpu-a pid {sleeper.pid} \(sleep 300\) ends \(running \d+s, 2566 MiB of "
        r"GPU memory now\); until ",
        out,
    ), out
    assert cli(config, "run", "--once")[0] == 0
    assert feishu.accepted == []  # it runs

    scenario_error(fleet.scenario_dir(address), ERR_GPU_LOST)  # the host answers, without GPU data
    assert cli(config, "run", "--once")[0] == 0
    assert wish_texts(feishu, "has ended") == []  # a host without data says nothing about the process

    sleeper.kill()
    sleeper.wait()
    scenario_healthy_multi_gpu(fleet.scenario_dir(address), 4, busy_gpus=())  # nvidia-smi lists it no more
    assert cli(config, "run", "--once")[0] == 0
    (text,) = wish_texts(feishu, "has ended")
    assert f"alice's process {sleeper.pid} (sleep 300) on gpu-a GPU 0 has ended (wish #1): it ran " in text
    assert "peak GPU memory 2566 MiB" in text
    (body,) = [b for b in feishu.accepted if "has ended" in seen(b).text]
    assert seen(body).mentions == ("ou_alice",)

    assert cli(config, "run", "--once")[0] == 0
    assert len(wish_texts(feishu, "has ended")) == 1  # once
    assert cli(config, "notify-when-done", "--list") == (0, "no open notify-when-done wishes\n")
    code, out = cli(config, "notify-when-done", "--list", "--all")
    assert code == 0 and out.startswith(f"#1  alice: gpu-a pid {sleeper.pid} (sleep 300), peak 2566 MiB, last seen ")
    assert " ended " in out


def polls(tmp_path: Path) -> int:
    path = tmp_path / "state" / "gpuwatch.log"
    return path.read_text(encoding="utf-8").count("poll: gpu-a ok") if path.exists() else 0


def test_the_running_daemon_picks_up_wishes_and_says_each_once(
    fleet: Fleet, known_hosts: Path, tmp_path: Path, feishu: FakeFeishu, sleeper: subprocess.Popen[bytes]
) -> None:
    """Wishes made while the daemon runs count without a restart: a free wish is met when GPUs
    free up, and said once; a done wish once when its process is stopped."""
    address = fleet.addresses[1]
    every_gpu = (0, 1, 2, 3)
    owners = {CAPTURED[0]: sleeper.pid}
    scenario_healthy_multi_gpu(fleet.scenario_dir(address), 4, busy_gpus=every_gpu, owners_pids=owners)
    config = write_config(tmp_path, fleet, known_hosts, feishu, [{"name": "gpu-a", "address": address}])
    daemon = start_run(config)
    try:
        wait_for(lambda: polls(tmp_path) >= 1, 20, "the first poll")
        code, out = cli(config, "notify-when-free", "--user", "alice", "--gpus", "2", "--same-host", "--model", "h100")
        assert code == 0 and out.startswith("wish #1 added: tell alice when 2 GPUs on one host, model h100 are free")
        code, out = cli(config, "notify-when-done", "--host", "gpu-a", "--pid", str(sleeper.pid))
        assert code == 0 and out.startswith(f"wish #2 added: tell {_me()} when gpu-a pid {sleeper.pid} ")
        seen_polls = polls(tmp_path)
        wait_for(lambda: polls(tmp_path) >= seen_polls + 3, 20, "three more polls")
        assert feishu.accepted == []  # every GPU busy, the process runs

        scenario_healthy_multi_gpu(fleet.scenario_dir(address), 4, busy_gpus=(0,), owners_pids=owners)
        wait_for(lambda: bool(wish_texts(feishu, "are free now")), 20, "the free wish's message")
        (text,) = wish_texts(feishu, "are free now")
        assert "gpu-a GPU 1, 2 (H100 80GB HBM3) are free now (wish #1: 2 GPUs on one host, model h100;" in text

        sleeper.kill()
        sleeper.wait()
        scenario_healthy_multi_gpu(fleet.scenario_dir(address), 4, busy_gpus=())
        wait_for(lambda: bool(wish_texts(feishu, "has ended")), 20, "the done wish's message")
        seen_polls = polls(tmp_path)
        wait_for(lambda: polls(tmp_path) >= seen_polls + 3, 20, "three more polls")
    finally:
        err = stop_run(daemon)
    assert len(wish_texts(feishu, "are free now")) == 1
    (ended,) = wish_texts(feishu, "has ended")
    assert f"process {sleeper.pid} (sleep 300) on gpu-a GPU 0 has ended (wish #2)" in ended
    assert "Traceback" not in err
    assert len(feishu.accepted) == 2


def _me() -> str:
    return subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
