"""Day one and day two, end to end: ``check`` before the first run, cron runs that keep each
report on its own schedule, and a webhook outage that ends with news, not history.

The hosts are the real sshd fleet (tests/fleet.py; root only) replaying real nvidia-smi captures;
Feishu is tests/fakefeishu.py over real HTTP. ``--once`` runs go through the CLI's own run handler
with a stepped clock where the time of day matters (reports follow the clock's hours), and through
``gpuwatch.cli.main`` elsewhere.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from fakefeishu import FakeFeishu
from fleet import ERR_VERSION_MISMATCH, Fleet, scenario_error, scenario_idle
from gpuwatch.cli import build_parser, main, run
from gpuwatch.config.load import load_config

KEYWORD = "GPU"
SECRET = "s3cret-for-the-ops-tests"
SECRET_ENV = "GPUWATCH_OPS_TEST_SECRET"


# main() installs log handlers on the root logger: conftest.restore_logging takes them away afterwards.
pytestmark = pytest.mark.usefixtures("restore_logging")


@pytest.fixture
def feishu() -> Iterator[FakeFeishu]:
    with FakeFeishu(keywords=[KEYWORD], secret=SECRET) as server:
        yield server


def write_config(tmp_path: Path, doc: dict[str, Any]) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    path.chmod(0o600)
    return path


def fleet_config(
    tmp_path: Path, fleet: Fleet, known_hosts: Path, feishu: FakeFeishu, hosts: int = 2, **extra: Any
) -> Path:
    doc: dict[str, Any] = {
        "hosts": [{"name": f"gpu-{chr(97 + i)}", "address": fleet.addresses[i]} for i in range(hosts)],
        "ssh": fleet.gpuwatch_ssh(known_hosts),
        "state_dir": str(tmp_path / "state"),
        "feishu": {"url": feishu.url, "keyword": KEYWORD, "secret_env": SECRET_ENV},
        "schedule": {"poll_every": "1m", "reports": [{"report": "overview", "every": "1h"}]},
    }
    doc.update(extra)
    return write_config(tmp_path, doc)


def cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    return main(list(argv), out=out), out.getvalue()


def cron_run(config: Path, at: str, *extra: str) -> int:
    """One ``gpuwatch --once`` as cron starts it, at the local time ``at`` ("2026-11-22 10:00:05")."""
    args = build_parser().parse_args(["run", "--once", *extra, "-c", str(config)])
    now = datetime.strptime(at, "%Y-%m-%d %H:%M:%S").timestamp()
    return run.handle(load_config(config), args, io.StringIO(), clock=lambda: now)


def titles(feishu: FakeFeishu) -> list[str]:
    return [str(b["content"]["post"]["zh_cn"]["title"]) for b in feishu.accepted]


# ---------------------------------------------------------------- check


def test_check_fails_with_an_unset_secret_naming_it_and_says_ready_once_it_is_set(
    fleet: Fleet, known_hosts: Path, tmp_path: Path, feishu: FakeFeishu, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = fleet_config(tmp_path, fleet, known_hosts, feishu)
    monkeypatch.delenv(SECRET_ENV, raising=False)

    code, out = cli("check", "-c", str(config))

    assert code == 2, out
    lines = out.splitlines()
    assert f"feishu: FAILED: feishu.secret_env: ${SECRET_ENV} is not set in the environment" in lines
    assert "gpu-a: OK: 4 GPUs, 3 GPU processes" in out and "gpu-b: OK: 4 GPUs" in out  # still checked
    assert lines[-1] == f"not ready: feishu.secret_env: ${SECRET_ENV} is not set in the environment"
    assert feishu.exchanges == []  # check sends nothing
    assert cli("run", "--once", "-c", str(config))[0] == 2  # what check said: run stops there too

    monkeypatch.setenv(SECRET_ENV, SECRET)
    code, out = cli("check", "-c", str(config))
    assert code == 0, out
    assert "feishu: OK: signed, keyword 'GPU', format post" in out
    assert f"state_dir {tmp_path / 'state'}: OK: writable" in out
    assert out.splitlines()[-1] == "ready: gpuwatch run can start: 2/2 hosts answered; sends to feishu; state_dir OK"
    assert feishu.exchanges == []


def test_a_missing_key_file_is_a_config_error_naming_the_key_not_unreachable(
    fleet: Fleet,
    known_hosts: Path,
    tmp_path: Path,
    feishu: FakeFeishu,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    missing = tmp_path / "no-such-key"
    config = fleet_config(tmp_path, fleet, known_hosts, feishu)
    doc = yaml.safe_load(config.read_text())
    doc["hosts"][1]["key_file"] = str(missing)  # on gpu-b's own entry
    config = write_config(tmp_path, doc)

    code, out = cli("check", "-c", str(config))

    assert code == 2, out
    assert f"hosts[1].key_file: FAILED: {missing} does not exist" in out
    assert f"gpu-b: NOT TRIED: hosts[1].key_file: {missing} does not exist" in out
    assert "unreachable" not in out and "gpu-a: OK" in out
    assert out.splitlines()[-1] == f"not ready: hosts[1].key_file: {missing} does not exist"

    capsys.readouterr()
    code, _ = cli("run", "--once", "-c", str(config))
    assert code == 2 and feishu.exchanges == []  # run refuses it as it refuses an unset secret
    assert capsys.readouterr().err == (
        f"gpuwatch: config error: hosts[1].key_file: {missing} does not exist; "
        "set it to the private key this user logs in with\n"
    )

    code, out = cli("status", "-c", str(config))  # status shows what it can, and why not the rest
    assert code == 0
    assert f"auth_failed: the key file {missing} (this host's key_file) does not exist" in out


def test_check_hints_name_the_setting_that_is_wrong(
    fleet: Fleet,
    known_hosts: Path,
    tmp_path: Path,
    feishu: FakeFeishu,
    refused_address: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    config = fleet_config(tmp_path, fleet, known_hosts, feishu)
    doc = yaml.safe_load(config.read_text())
    doc["hosts"].append({"name": "gpu-x", "address": refused_address})
    doc["hosts"].append({"name": "gpu-y", "address": fleet.addresses[2], "user": "nobody-here"})
    config = write_config(tmp_path, doc)

    code, out = cli("check", "-c", str(config))

    assert code == 1, out  # every setting is well-formed; two hosts did not answer
    port = fleet.port
    assert f"  hint: check hosts[2].address ({refused_address}) and ssh.port ({port}); " in out
    assert "  hint: check hosts[3].user (nobody-here) and ssh.key_file (" in out
    assert out.splitlines()[-1] == (
        "not ready: 2 of 4 hosts did not answer: gpu-x (unreachable), gpu-y (auth_failed) "
        "(gpuwatch run would start and report them as down)"
    )


# ---------------------------------------------------------------- cron


def test_two_once_runs_in_an_hour_send_the_hourly_overview_once_and_report_forces_one(
    fleet: Fleet, known_hosts: Path, tmp_path: Path, feishu: FakeFeishu, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    reports = [{"report": "overview", "every": "1h"}, {"report": "user", "user": "alice", "at": "09:00"}]
    config = fleet_config(tmp_path, fleet, known_hosts, feishu, schedule={"poll_every": "1m", "reports": reports})

    assert cron_run(config, "2026-11-22 10:00:04") == 0
    assert [t.split(" 20")[0] for t in titles(feishu)] == ["GPU overview", "GPU processes of alice"]

    assert cron_run(config, "2026-11-22 10:30:02") == 0  # cron every 30 minutes: nothing is due
    assert len(feishu.accepted) == 2

    assert cron_run(config, "2026-11-22 11:00:01") == 0  # a new hour: the overview, not the daily one
    assert [t.split(" 20")[0] for t in titles(feishu)][2:] == ["GPU overview"]

    assert cron_run(config, "2026-11-22 11:20:00", "--report", "user:alice") == 0  # forced
    assert [t.split(" 20")[0] for t in titles(feishu)][3:] == ["GPU processes of alice"]

    assert cron_run(config, "2026-11-23 09:00:03") == 0  # the next morning: both are due
    assert [t.split(" 20")[0] for t in titles(feishu)][4:] == ["GPU overview", "GPU processes of alice"]

    code, _ = cli("--report", "nonsense", "-c", str(config))
    assert code == 2 and len(feishu.accepted) == 6


# ---------------------------------------------------------------- an outage


def test_an_outage_of_three_runs_ends_with_every_alert_in_order_and_only_the_newest_overview(
    fleet: Fleet, known_hosts: Path, tmp_path: Path, feishu: FakeFeishu, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    monkeypatch.setattr("gpuwatch.notify.http._BACKOFF_BASE_SECONDS", 0.001)  # the retries, not their waits
    config = fleet_config(tmp_path, fleet, known_hosts, feishu, hosts=3)
    b, c = fleet.addresses[1], fleet.addresses[2]
    feishu.always(503)  # the webhook is down for three hourly runs

    scenario_error(fleet.scenario_dir(b), ERR_VERSION_MISMATCH)
    assert cron_run(config, "2026-11-22 10:00:04") == 1  # gpu-b: gpu_error fires
    fleet.set_default_scenario(b)
    assert cron_run(config, "2026-11-22 11:00:03") == 1  # gpu-b: resolved
    scenario_error(fleet.scenario_dir(c), ERR_VERSION_MISMATCH)
    assert cron_run(config, "2026-11-22 12:00:02") == 1  # gpu-c: gpu_error fires
    assert feishu.accepted == []
    tried = len(feishu.exchanges)

    feishu.always(None)  # back, and meanwhile gpu-a's jobs ended
    scenario_idle(fleet.scenario_dir(fleet.addresses[0]))
    assert cron_run(config, "2026-11-22 13:00:05") == 0

    sent = titles(feishu)
    assert len(feishu.exchanges) - tried == len(sent) == 4
    assert sent[0].startswith("GPU alerts: 1 firing")
    assert sent[1].startswith("GPU alerts: 1 resolved")
    assert sent[2].startswith("GPU alerts: 1 firing")
    bodies = [str(b["content"]) for b in feishu.accepted]
    assert "gpu-b" in bodies[0] and "gpu-b" in bodies[1] and "gpu-c" in bodies[2]
    # one overview: this run's (gpu-a all free, gpu-c still down), none of the three made during the outage
    assert sent[3].startswith("GPU overview ") and sent[3].endswith(": 3 hosts, 1 down, 8 GPUs, 7 free")
    assert cli("alerts", "-c", str(config))[1].count("FIRING") == 1  # gpu-c's, as announced
