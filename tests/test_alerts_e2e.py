"""Alerts end to end: the CLI, the state database, Feishu over real HTTP, e-mail over real SMTP.

gpuwatch runs in-process (``gpuwatch.cli.main``) for ``--once`` runs and the ``alerts`` and
``silence`` commands, and as a real subprocess for the daemon restart. Hosts are the real sshd
fleet (root only; its GPU processes are real processes of the users alice and verylongusername)
or ``localhost`` replaying the same captures through the stand-in nvidia-smi, with the captured
pids mapped to real processes this test starts (no root needed). Feishu is tests/fakefeishu.py,
e-mail is tests/smtpserver.py (aiosmtpd with STARTTLS and AUTH, a private CA made at test time).
"""

from __future__ import annotations

import io
import json
import logging
import os
import pwd
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from fakefeishu import FakeFeishu, seen
from fleet import H100_LOAD_APPS, Fleet, capture_pids, scenario_healthy_multi_gpu
from gpuwatch.cli import main
from waiting import wait_for

if TYPE_CHECKING:
    from smtpserver import LocalSMTPServer

# The SMTP fixtures live in tests/smtpserver.py, loaded as a plugin (see tests/test_email.py).
pytest_plugins = ("smtpserver",)

KEYWORD = "GPU"
PASSWORD_ENV = "GPUWATCH_TEST_SMTP_PASSWORD"
CAPTURED = capture_pids(H100_LOAD_APPS)  # [11327, 11328, 11345]


# ---------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """gpuwatch.cli.main installs its own log handlers on the root logger (stderr as captured for
    this test, the state_dir's file); take them away afterwards, so that the SMTP server's thread,
    still logging after the test, never writes to a closed stream."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


@pytest.fixture
def feishu() -> Iterator[FakeFeishu]:
    with FakeFeishu(keywords=[KEYWORD]) as server:
        yield server


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A real process of this user that the stand-in reports as a GPU process (via its pids file)."""
    proc = subprocess.Popen(["sleep", "300"])
    yield proc
    proc.kill()
    proc.wait()


def write_config(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    path.chmod(0o600)
    return path


def base_config(tmp_path: Path, feishu: FakeFeishu | None, hosts: list[Any], **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "hosts": hosts,
        "state_dir": str(tmp_path / "state"),
        "schedule": {"poll_every": "1s", "reports": []},  # only alerts: what an admin must act on
    }
    if feishu is not None:
        doc["feishu"] = {"url": feishu.url, "keyword": KEYWORD, "format": "card"}
    doc.update(extra)
    return doc


def cli(config: Path, *args: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main([*args, "-c", str(config)], out=out)
    return code, out.getvalue()


def once(config: Path, *extra: str) -> int:
    out = io.StringIO()
    return main(["run", "--once", "-c", str(config), *extra], out=out)


def card_text(body: dict[str, Any]) -> str:
    """What the group reads of a body (card markdown rendered, escapes decoded)."""
    return seen(body).text


def alert_bodies(feishu: FakeFeishu) -> list[dict[str, Any]]:
    return [b for b in feishu.accepted if "GPU alerts" in card_text(b)]


def ssh_defaults(fleet: Fleet, known_hosts: Path) -> dict[str, Any]:
    return fleet.gpuwatch_ssh(known_hosts)


# ---------------------------------------------------------------- the admin's story, over real SSH


def test_at_most_two_gpus_per_user_one_message_when_broken_one_when_fixed(
    fleet: Fleet, known_hosts: Path, tmp_path: Path, feishu: FakeFeishu
) -> None:
    """'At most 2 GPUs per user, jobs at most 3 days': alice and verylongusername each run on
    GPUs 0-2 of gpu-a. Exactly one message when the rule is broken, none while it stays broken,
    one when it is fixed: over two (and more) consecutive cron runs."""
    address = fleet.addresses[0]
    owners = fleet.default_owner_map()
    scenario_healthy_multi_gpu(fleet.scenario_dir(address), 4, busy_gpus=(0, 1, 2), owners_pids=owners)
    doc = base_config(
        tmp_path,
        feishu,
        [{"name": "gpu-a", "address": address}],
        ssh=ssh_defaults(fleet, known_hosts),
        alerts={"max_gpus_per_user": 2, "max_runtime": "72h"},
    )
    doc["feishu"]["mentions"] = {"alice": "ou_alice"}
    config = write_config(tmp_path / "config.yaml", doc)

    assert once(config) == 0
    (first,) = feishu.accepted
    text = card_text(first)
    assert first["card"]["header"]["template"] == "red"
    assert "GPU alerts: 2 firing" in text
    assert "FIRING max_gpus_per_user (gpu-a, user alice)" in text
    assert "alice holds 3 GPUs on gpu-a (GPU 0, 1, 2)" in text
    assert "FIRING max_gpus_per_user (gpu-a, user verylongusername)" in text  # the full name, never cut
    assert "threshold: at most 2 per host" in text and "since " in text
    assert seen(first).mentions == ("ou_alice",)  # @-mentioned as <at id=ou_alice></at>
    assert "max_runtime" not in text  # the jobs are minutes old, not days

    assert once(config) == 0  # the next cron run: still broken, nothing to say
    assert once(config) == 0
    assert len(feishu.accepted) == 1

    scenario_healthy_multi_gpu(fleet.scenario_dir(address), 4, busy_gpus=(0, 1), owners_pids=owners)
    assert once(config) == 0
    assert len(feishu.accepted) == 2
    resolved = card_text(feishu.accepted[1])
    assert feishu.accepted[1]["card"]["header"]["template"] == "green"
    assert "GPU alerts: 2 resolved" in resolved
    assert "RESOLVED max_gpus_per_user (gpu-a, user alice)" in resolved
    assert "RESOLVED max_gpus_per_user (gpu-a, user verylongusername)" in resolved
    assert once(config) == 0
    assert len(feishu.accepted) == 2


def _age_seconds(pid: int) -> int:
    out = subprocess.run(["ps", "-o", "etimes=", "-p", str(pid)], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def test_max_runtime_with_real_processes_keyed_by_pid_not_by_their_growing_runtime(
    fleet: Fleet, known_hosts: Path, tmp_path: Path, feishu: FakeFeishu, job_pids: dict[str, int]
) -> None:
    address = fleet.addresses[1]
    scenario_healthy_multi_gpu(fleet.scenario_dir(address), 2, busy_gpus=(0,), owners_pids=fleet.default_owner_map())
    doc = base_config(
        tmp_path,
        feishu,
        [{"name": "gpu-b", "address": address}],
        ssh=ssh_defaults(fleet, known_hosts),
        alerts={"max_runtime": "1s"},
    )
    config = write_config(tmp_path / "config.yaml", doc)
    wait_for(lambda: min(_age_seconds(p) for p in job_pids.values()) >= 2, 5, "the jobs to run 2s")

    assert once(config) == 0
    (first,) = feishu.accepted
    text = card_text(first)
    assert f"FIRING max_runtime (gpu-b, user alice, pid {job_pids['alice']})" in text
    assert f"FIRING max_runtime (gpu-b, user verylongusername, pid {job_pids['verylongusername']})" in text
    assert "threshold: at most 1s" in text
    assert str(CAPTURED[2]) not in text  # the process ps cannot see has no known runtime: no alert
    time.sleep(1.1)  # the runtimes grow between the runs: still the same two alerts
    assert once(config) == 0
    assert len(feishu.accepted) == 1

    scenario_healthy_multi_gpu(fleet.scenario_dir(address), 2, busy_gpus=())  # the jobs left the GPUs
    assert once(config) == 0
    assert "GPU alerts: 2 resolved" in card_text(feishu.accepted[1])


# ---------------------------------------------------------------- localhost: no root needed


@pytest.fixture
def busy_local(local_standin: Path, sleeper: subprocess.Popen[bytes]) -> Callable[..., None]:
    """Set the local host's GPUs: this user's real process on ``busy_gpus`` (captured pid 11327)."""

    def set_busy(*busy_gpus: int) -> None:
        scenario_healthy_multi_gpu(local_standin, 4, busy_gpus=busy_gpus, owners_pids={CAPTURED[0]: sleeper.pid})

    set_busy(0, 1, 2)
    return set_busy


ME = pwd.getpwuid(os.getuid()).pw_name  # what ps on this machine calls this test's user


def test_silence_add_list_remove_and_the_alerts_command(
    busy_local: Callable[..., None], tmp_path: Path, feishu: FakeFeishu
) -> None:
    doc = base_config(
        tmp_path, feishu, ["localhost"], alerts={"max_gpus_per_user": 2, "temperature_above": 55, "repeat_every": "4h"}
    )
    config = write_config(tmp_path / "config.yaml", doc)

    code, out = cli(config, "alerts")
    assert (code, out) == (0, "no alerts firing\n")
    code, out = cli(
        config, "silence", "add", "--rule", "max_gpus_per_user", "--host", "localhost", "--user", ME,
        "--for", "24h", "--comment", "agreed: a 3-GPU run until Friday",
    )  # fmt: skip
    assert code == 0
    assert out.startswith(f"silence #1 added: rule=max_gpus_per_user host=localhost user={ME} until ")
    code, out = cli(config, "silence", "list")
    assert code == 0 and out.startswith(f"#1  rule=max_gpus_per_user host=localhost user={ME}  until ")
    assert "(agreed: a 3-GPU run until Friday)" in out

    # --dry-run shows what a run would say, and touches neither Feishu nor the state
    dry = io.StringIO()
    assert main(["run", "--dry-run", "-c", str(config)], out=dry) == 0
    assert "FIRING temperature_above (localhost, GPU 0)" in dry.getvalue()
    assert feishu.exchanges == []
    assert cli(config, "alerts") == (0, "no alerts firing\n")

    assert once(config) == 0
    (first,) = feishu.accepted
    text = card_text(first)
    assert "GPU alerts: 3 firing" in text  # the three hot GPUs
    assert "max_gpus_per_user" not in text  # silenced: not sent

    code, out = cli(config, "alerts")
    assert code == 0
    lines = out.splitlines()
    silenced = [line for line in lines if "max_gpus_per_user" in line]
    assert len(silenced) == 1 and "silenced by #1" in silenced[0]  # still shown, with its silence
    assert f"{ME} holds 3 GPUs on localhost" in silenced[0]
    assert "agreed: a 3-GPU run until Friday" in out
    assert sum("temperature_above" in line for line in lines) == 3

    code, out = cli(config, "alerts", "--json")
    data = json.loads(out)
    by_rule: dict[str, list[dict[str, Any]]] = {}
    for alert in data["alerts"]:
        by_rule.setdefault(alert["key"]["rule"], []).append(alert)
    (quiet,) = by_rule["max_gpus_per_user"]
    assert quiet["silenced_by"] == [1] and quiet["state"] == "firing" and quiet["last_sent_at"] is None
    assert quiet["key"]["user"] == ME and quiet["key"]["host"] == "localhost"
    assert [a["silenced_by"] for a in by_rule["temperature_above"]] == [[], [], []]
    assert [s["comment"] for s in data["silences"]] == ["agreed: a 3-GPU run until Friday"]

    assert once(config) == 0
    assert len(feishu.accepted) == 1  # nothing new

    assert cli(config, "silence", "remove", "1") == (0, "silence #1 removed\n")
    assert cli(config, "silence", "remove", "1") == (1, "no silence #1\n")
    assert cli(config, "silence", "list") == (0, "no silences in force\n")
    assert once(config) == 0
    assert len(feishu.accepted) == 2
    announced = card_text(feishu.accepted[1])
    assert "GPU alerts: 1 firing" in announced and f"FIRING max_gpus_per_user (localhost, user {ME})" in announced


def test_a_pending_alert_is_listed_only_with_all(
    busy_local: Callable[..., None], tmp_path: Path, feishu: FakeFeishu
) -> None:
    doc = base_config(tmp_path, feishu, ["localhost"], alerts={"max_gpus_per_user": 2, "for": "1h"})
    config = write_config(tmp_path / "config.yaml", doc)
    assert once(config) == 0 and once(config) == 0
    assert feishu.exchanges == []  # held back by `for`
    assert cli(config, "alerts") == (0, "no alerts firing\n")
    code, out = cli(config, "alerts", "--all")
    assert code == 0 and out.startswith(f"PENDING    max_gpus_per_user  {ME} holds 3 GPUs on localhost")
    (pending,) = json.loads(cli(config, "alerts", "--all", "--json")[1])["alerts"]
    assert pending["state"] == "pending" and pending["fired_at"] is None


def test_silence_add_refuses_what_would_mute_nothing_or_everything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path / "config.yaml", base_config(tmp_path, None, ["gpu-alpha", "gpu-beta"]))
    code, _ = cli(config, "silence", "add", "--host", "gpu-alpa", "--for", "1h", "--comment", "typo")
    assert code == 2 and "'gpu-alpa' is not a configured host; did you mean 'gpu-alpha'?" in capsys.readouterr().err
    code, _ = cli(config, "silence", "add", "--for", "1h", "--comment", "all of it")
    assert code == 2 and "give at least one of --rule, --host, --user, --gpu" in capsys.readouterr().err
    code, _ = cli(config, "silence", "add", "--host", "gpu-beta", "--for", "0s", "--comment", "nothing")
    assert code == 2 and "--for" in capsys.readouterr().err
    assert cli(config, "silence", "list") == (0, "no silences in force\n")


def test_daemon_restart_announces_nothing_twice(
    busy_local: Callable[..., None], tmp_path: Path, feishu: FakeFeishu
) -> None:
    doc = base_config(tmp_path, feishu, ["localhost"], alerts={"max_gpus_per_user": 2})
    config = write_config(tmp_path / "config.yaml", doc)
    log_file = tmp_path / "state" / "gpuwatch.log"

    def polls() -> int:
        return log_file.read_text().count("poll: localhost ok") if log_file.exists() else 0

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "gpuwatch", "run", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=os.environ.copy(),
        )

    def stop(proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err.decode()

    daemon = start()
    try:
        wait_for(lambda: len(feishu.accepted) >= 1, 15, "the first alert")
        seen = polls()
        wait_for(lambda: polls() >= seen + 1, 10, "one more poll")
    finally:
        stop(daemon)
    assert len(feishu.accepted) == 1
    assert f"FIRING max_gpus_per_user (localhost, user {ME})" in card_text(feishu.accepted[0])

    daemon = start()  # restarted: the alert is still firing, and was already announced
    try:
        seen = polls()
        wait_for(lambda: polls() >= seen + 2, 15, "two polls after the restart")
        assert len(feishu.accepted) == 1
        busy_local(0, 1)  # fixed
        wait_for(lambda: len(feishu.accepted) >= 2, 15, "the resolved message")
        seen = polls()
        wait_for(lambda: polls() >= seen + 1, 10, "one more poll")
    finally:
        stop(daemon)
    assert len(feishu.accepted) == 2
    assert f"RESOLVED max_gpus_per_user (localhost, user {ME})" in card_text(feishu.accepted[1])


# ---------------------------------------------------------------- e-mail and routes


def email_section(server: LocalSMTPServer) -> dict[str, Any]:
    assert server.certs is not None and server.login is not None
    return {
        "to": ["ops@example.com"],
        "from": "GPU watch <gpuwatch@example.com>",
        "smtp_host": server.host,
        "smtp_port": server.port,
        "username": server.login[0],
        "password_env": PASSWORD_ENV,
        "tls": "starttls",
        "ca_file": str(server.certs.ca_file),
    }


def test_routes_send_a_rule_by_email_only_and_the_default_to_both(
    busy_local: Callable[..., None],
    tmp_path: Path,
    feishu: FakeFeishu,
    smtp_server: LocalSMTPServer,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    assert smtp_server.login is not None
    password = smtp_server.login[1]
    monkeypatch.setenv(PASSWORD_ENV, password)
    doc = base_config(
        tmp_path,
        feishu,
        ["localhost"],
        alerts={
            "max_gpus_per_user": 2,
            "temperature_above": 55,
            "routes": {"max_gpus_per_user": ["email"], "default": ["feishu", "email"]},
        },
        email=email_section(smtp_server),
    )
    doc["schedule"]["reports"] = [{"report": "overview", "every": "1h"}]
    config = write_config(tmp_path / "config.yaml", doc)

    assert once(config, "-v") == 0
    (mail,) = smtp_server.received  # one mail: every alert routed to e-mail, grouped
    assert mail.tls and mail.login == smtp_server.login[0]  # STARTTLS, then AUTH
    assert mail.rcpt_tos == ["ops@example.com"]
    assert mail.message["Subject"] == "[gpuwatch] GPU alerts: 4 firing"
    assert f"FIRING max_gpus_per_user (localhost, user {ME})" in mail.text
    assert "FIRING temperature_above (localhost, GPU 2)" in mail.text
    assert "overview" not in mail.message["Subject"].lower()  # reports are not mailed

    bodies = alert_bodies(feishu)
    (alert,) = bodies
    assert "GPU alerts: 3 firing" in card_text(alert) and "temperature_above" in card_text(alert)
    assert "max_gpus_per_user" not in card_text(alert)  # routed to e-mail only
    assert len(feishu.accepted) == 2  # and the overview report

    assert once(config, "-v") == 0
    assert len(smtp_server.received) == 1 and len(feishu.accepted) == 3  # the next report, no alert

    busy_local()  # fixed: every GPU free
    assert once(config, "-v") == 0
    assert len(smtp_server.received) == 2
    assert smtp_server.received[1].message["Subject"] == "[gpuwatch] GPU alerts: 4 resolved"

    captured = capfd.readouterr()
    logged = (tmp_path / "state" / "gpuwatch.log").read_text()
    assert "queued GPU alerts" in logged  # -v: the debug log was written
    for text in (logged, captured.out, captured.err, config.read_text()):
        assert password not in text


def test_email_that_cannot_be_sent_waits_in_the_outbox(
    busy_local: Callable[..., None],
    tmp_path: Path,
    smtp_server: LocalSMTPServer,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    wrong = "wrong-Pa55-Qv8u-e2e"
    monkeypatch.setenv(PASSWORD_ENV, wrong)
    doc = base_config(tmp_path, None, ["localhost"], alerts={"max_gpus_per_user": 2}, email=email_section(smtp_server))
    config = write_config(tmp_path / "config.yaml", doc)

    assert once(config, "-v") == 1  # the login was refused: left in the outbox, exit 1
    assert smtp_server.received == [] and smtp_server.failed_logins > 0
    assert smtp_server.connections == 1  # a refused login is not retried within the run
    err = capfd.readouterr().err
    assert "refused the login" in err
    assert once(config) == 1  # still refused; the alert itself is not queued twice
    assert smtp_server.connections == 2

    assert smtp_server.login is not None
    monkeypatch.setenv(PASSWORD_ENV, smtp_server.login[1])  # the admin fixes the password
    assert once(config) == 0
    (mail,) = smtp_server.received
    assert f"FIRING max_gpus_per_user (localhost, user {ME})" in mail.text
    assert once(config) == 0 and len(smtp_server.received) == 1
    logged = (tmp_path / "state" / "gpuwatch.log").read_text() + capfd.readouterr().err
    assert wrong not in logged and smtp_server.login[1] not in logged


def test_email_password_variable_missing_is_a_config_error(
    tmp_path: Path, smtp_server: LocalSMTPServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    doc = base_config(tmp_path, None, ["localhost"], alerts={"max_gpus_per_user": 2}, email=email_section(smtp_server))
    config = write_config(tmp_path / "config.yaml", doc)
    assert once(config) == 2
    assert f"email.password_env: ${PASSWORD_ENV} is not set in the environment" in capsys.readouterr().err
