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
import os
import pwd
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from fakefeishu import FakeFeishu, seen
from fleet import (
    ERR_VERSION_MISMATCH,
    H100_LOAD_APPS,
    L40S_APPS,
    L40S_QUERY,
    Fleet,
    _stack_gpus,
    capture_pids,
    publish_scenario,
    scenario_error,
    scenario_healthy_multi_gpu,
)
from gpuwatch.cli import main
from gpuwatch.report import silence_command
from gpuwatch.rules import AlertKey
from waiting import wait_for

if TYPE_CHECKING:
    from smtpserver import LocalSMTPServer

# The SMTP fixtures live in tests/smtpserver.py, loaded as a plugin (see tests/test_email.py).
pytest_plugins = ("smtpserver",)

KEYWORD = "GPU"  # what conftest.feishu requires
PASSWORD_ENV = "GPUWATCH_TEST_SMTP_PASSWORD"
CAPTURED = capture_pids(H100_LOAD_APPS)  # [11327, 11328, 11345]


# ---------------------------------------------------------------- helpers


# main() installs log handlers on the root logger: conftest.restore_logging takes them away afterwards.
pytestmark = pytest.mark.usefixtures("restore_logging")


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
    assert "GPU alerts: 1 firing (2 alerts)" in text  # counted as shown: one entry of two alerts
    # the two users' alerts of one rule on one host: one entry, a line each
    assert "FIRING max_gpus_per_user on gpu-a: users alice, verylongusername" in text  # the full name, never cut
    assert "alice holds 3 GPUs on gpu-a (GPU 0, 1, 2)" in text
    assert "verylongusername holds 3 GPUs on gpu-a (GPU 0, 1, 2)" in text
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
    assert "GPU alerts: 1 resolved (2 alerts)" in resolved
    assert "RESOLVED max_gpus_per_user on gpu-a: users alice, verylongusername" in resolved
    assert "was: alice holds 3 GPUs" in resolved and "was: verylongusername holds 3 GPUs" in resolved
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
    pids = sorted(job_pids.values())
    assert f"FIRING max_runtime on gpu-b: users alice, verylongusername; pids {pids[0]}, {pids[1]}" in text
    assert f"alice's process {job_pids['alice']} (" in text
    assert f"verylongusername's process {job_pids['verylongusername']} (" in text
    assert "threshold: at most 1s" in text
    assert str(CAPTURED[2]) not in text  # the process ps cannot see has no known runtime: no alert
    time.sleep(1.1)  # the runtimes grow between the runs: still the same two alerts
    assert once(config) == 0
    assert len(feishu.accepted) == 1

    scenario_healthy_multi_gpu(fleet.scenario_dir(address), 2, busy_gpus=())  # the jobs left the GPUs
    assert once(config) == 0
    assert "GPU alerts: 1 resolved (2 alerts)" in card_text(feishu.accepted[1])


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
    never = f"STALE: no poll has recorded alert state in {tmp_path / 'state'} yet: is gpuwatch running?\n"

    code, out = cli(config, "alerts")
    assert (code, out) == (0, never)  # nothing is known yet, and it says so
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
    assert "FIRING temperature_above on localhost: GPUs 0-2" in dry.getvalue()
    assert feishu.exchanges == []
    assert cli(config, "alerts") == (0, never)

    assert once(config) == 0
    (first,) = feishu.accepted
    text = card_text(first)
    assert "GPU alerts: 1 firing (3 alerts)" in text  # the three hot GPUs, one entry
    assert "max_gpus_per_user" not in text  # silenced: not sent

    code, out = cli(config, "alerts")
    assert code == 1  # alerts fire: for scripts
    lines = out.splitlines()
    assert re.fullmatch(r"as of \d{4}-\d\d-\d\d \d\d:\d\d \S+ \(\d+s ago\)", lines[0])  # the poll it is from
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
    assert [s["author"] for s in data["silences"]] == [ME]  # who added it: the login user
    assert data["stale"] is False and data["taken_at"].startswith("20")  # ISO 8601, not epoch seconds

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
    code, out = cli(config, "alerts")
    assert code == 0 and out.endswith("\nno alerts firing\n")  # pending is not firing: exit 0
    code, out = cli(config, "alerts", "--all")
    assert code == 0 and out.splitlines()[1].startswith(f"PENDING    max_gpus_per_user  {ME} holds 3 GPUs on localhost")
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
    daily = time.strftime("%H:%M", time.localtime(time.time() + 12 * 3600))  # due now, not again in this test
    doc["schedule"]["reports"] = [{"report": "overview", "at": daily}]
    config = write_config(tmp_path / "config.yaml", doc)

    assert once(config, "-v") == 0
    (mail,) = smtp_server.received  # one mail: every alert routed to e-mail, grouped
    assert mail.tls and mail.login == smtp_server.login[0]  # STARTTLS, then AUTH
    assert mail.rcpt_tos == ["ops@example.com"]
    assert mail.message["Subject"] == "[gpuwatch] GPU alerts: 2 firing (4 alerts)"
    assert f"FIRING max_gpus_per_user (localhost, user {ME})" in mail.text
    assert "FIRING temperature_above on localhost: GPUs 0-2" in mail.text and "localhost GPU 2 is at 59°C" in mail.text
    assert "overview" not in mail.message["Subject"].lower()  # reports are not mailed

    bodies = alert_bodies(feishu)
    (alert,) = bodies
    assert "GPU alerts: 1 firing (3 alerts)" in card_text(alert) and "temperature_above" in card_text(alert)
    assert "max_gpus_per_user" not in card_text(alert)  # routed to e-mail only
    assert len(feishu.accepted) == 2  # and the overview report

    assert once(config, "-v") == 0
    assert len(smtp_server.received) == 1 and len(feishu.accepted) == 2  # no alert; the report is not due again

    busy_local()  # fixed: every GPU free
    assert once(config, "-v") == 0
    assert len(smtp_server.received) == 2
    assert smtp_server.received[1].message["Subject"] == "[gpuwatch] GPU alerts: 2 resolved (4 alerts)"

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


# ---------------------------------------------------------------- alerts a person reads once


def held_idle_scenario(directory: Path, n_gpus: int) -> None:
    """``n_gpus`` L40S GPUs, each replaying the real L40S row under a light load (9 %, 1235 MiB held,
    two ffmpeg processes): memory held while doing almost nothing."""
    query, apps, sources = _stack_gpus(directory, [(L40S_QUERY, 0)] * n_gpus, [(L40S_APPS, g) for g in range(n_gpus)])
    publish_scenario(directory, {"query-gpu.csv": query, "compute-apps.csv": apps, "SOURCES": sources})


def paste(line: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a line copied from a message in a real shell, as printed; a bare ``gpuwatch`` is this
    checkout's (the ``gpuwatch`` on this PATH may be another install)."""
    script = f'gpuwatch() {{ "$GPUWATCH_PYTHON" -m gpuwatch "$@"; }}\n{line}\n'
    env = {**os.environ, "GPUWATCH_PYTHON": sys.executable}
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60, cwd=cwd, env=env)


def test_eight_idle_gpus_of_one_host_are_one_entry_and_its_line_acknowledges_them(
    fleet: Fleet, known_hosts: Path, tmp_path: Path, feishu: FakeFeishu
) -> None:
    address = fleet.addresses[0]
    held_idle_scenario(fleet.scenario_dir(address), 8)
    doc = base_config(
        tmp_path,
        feishu,
        [{"name": "gpu01", "address": address}],
        ssh=ssh_defaults(fleet, known_hosts),
        alerts={"idle_gpu": {"after": "0s", "util_below": 10, "memory_above_mib": 1024}, "command_lines": "all"},
    )
    config = write_config(tmp_path / "config.yaml", doc)

    assert once(config) == 0
    (message,) = alert_bodies(feishu)
    text = card_text(message)
    assert "GPU alerts: 1 firing (8 alerts)" in text
    assert text.count("FIRING") == 1 and "FIRING idle_gpu on gpu01: GPUs 0-7" in text  # one entry, not 8
    for gpu in range(8):
        assert f"gpu01 GPU {gpu} holds 1235 MiB at 9% utilization" in text
    assert text.count("threshold: idle (<10%) with >1024 MiB for 0s") == 1
    (line,) = ack_lines(text)  # command_lines: all: the group gets the line too
    assert line.endswith(f" -c {config} ack --rule idle_gpu --host gpu01")

    pasted = paste(line, cwd=tmp_path / "state")  # from anywhere: the line names the config
    assert pasted.returncode == 0, pasted.stderr
    assert pasted.stdout.startswith("ack #1 added by ")
    assert "8 firing alerts (rule=idle_gpu host=gpu01)" in pasted.stdout
    code, out = cli(config, "alerts", "--json")
    alerts = json.loads(out)["alerts"]
    assert len(alerts) == 8 and all([a["id"] for a in x["acknowledged"]] == [1] for x in alerts)
    assert all(x["silenced_by"] == [] for x in alerts)  # acknowledged, not silenced
    assert code == 0  # all acknowledged: nothing fires for a script to act on


def test_a_silence_for_a_firing_alert_mutes_exactly_that_alert_and_its_resolution(
    fleet: Fleet, known_hosts: Path, tmp_path: Path, feishu: FakeFeishu
) -> None:
    """Planned work: the silence line (typed by an admin; messages print the ack line) mutes its
    alert's RESOLVED too, and nothing else."""
    a, b = fleet.addresses[:2]
    owners = fleet.default_owner_map()

    def hot(address: str, *gpus: int) -> None:  # a busy H100 row is at 59 C
        scenario_healthy_multi_gpu(fleet.scenario_dir(address), 4, busy_gpus=gpus, owners_pids=owners)

    hot(a, 0)
    hot(b, 0)
    doc = base_config(
        tmp_path,
        feishu,
        [{"name": "gpu-a", "address": a}, {"name": "gpu-b", "address": b}],
        ssh=ssh_defaults(fleet, known_hosts),
        alerts={"temperature_above": 55},
    )
    config = write_config(tmp_path / "config.yaml", doc)

    assert once(config) == 0
    text = card_text(alert_bodies(feishu)[0])
    assert "FIRING temperature_above (gpu-a, GPU 0)" in text and "FIRING temperature_above (gpu-b, GPU 0)" in text
    assert ack_lines(text) == [] and "silence add" not in text  # a group: no command lines by default
    line = silence_command([AlertKey("temperature_above", "gpu-a", gpu=0)], str(config))
    assert line.endswith("silence add --rule temperature_above --host gpu-a --gpu 0 --for 24h --comment acknowledged")
    pasted = paste(line, cwd=tmp_path)
    assert pasted.returncode == 0, pasted.stderr
    assert pasted.stdout.startswith("silence #1 added: rule=temperature_above host=gpu-a gpu=0 until ")
    assert pasted.stdout.endswith(f" by {ME}\n")

    code, out = cli(config, "alerts", "--json")
    muted = {a["key"]["host"]: a["silenced_by"] for a in json.loads(out)["alerts"]}
    assert muted == {"gpu-a": [1], "gpu-b": []}
    assert code == 1  # gpu-b's still fires, unmuted

    hot(a)
    hot(b)  # both cool down: only gpu-b's resolution is said
    assert once(config) == 0
    resolved = card_text(alert_bodies(feishu)[1])
    assert "GPU alerts: 1 resolved" in resolved and "RESOLVED temperature_above (gpu-b, GPU 0)" in resolved
    hot(a, 0, 1)
    hot(b, 0)  # gpu-a's GPU 0 again, and its GPU 1 (not muted: not that alert), and gpu-b's GPU 0
    assert once(config) == 0
    again = card_text(alert_bodies(feishu)[2])
    assert "GPU alerts: 2 firing" in again
    assert "(gpu-a, GPU 1)" in again and "(gpu-b, GPU 0)" in again and "gpu-a, GPU 0" not in again
    assert len(alert_bodies(feishu)) == 3


def test_the_ack_line_acknowledges_exactly_that_alert_and_resolved_is_still_said(
    fleet: Fleet, known_hosts: Path, tmp_path: Path, feishu: FakeFeishu
) -> None:
    a, b = fleet.addresses[:2]
    owners = fleet.default_owner_map()

    def hot(address: str, *gpus: int) -> None:
        scenario_healthy_multi_gpu(fleet.scenario_dir(address), 4, busy_gpus=gpus, owners_pids=owners)

    hot(a, 0)
    hot(b, 0)
    doc = base_config(
        tmp_path,
        feishu,
        [{"name": "gpu-a", "address": a}, {"name": "gpu-b", "address": b}],
        ssh=ssh_defaults(fleet, known_hosts),
        alerts={"temperature_above": 55, "command_lines": "all"},
    )
    config = write_config(tmp_path / "config.yaml", doc)
    assert once(config) == 0
    lines = ack_lines(card_text(alert_bodies(feishu)[0]))
    assert len(lines) == 2
    (line,) = [x for x in lines if "--host gpu-a" in x]
    pasted = paste(line, cwd=tmp_path)
    assert pasted.returncode == 0, pasted.stderr
    code, out = cli(config, "alerts", "--json", "--host", "gpu-a")
    (only,) = json.loads(out)["alerts"]  # --host: that host's alerts only
    assert only["key"]["host"] == "gpu-a" and only["acknowledged"][0]["author"] == ME
    assert code == 0
    assert cli(config, "alerts", "-q")[0] == 1  # gpu-b's still fires, not acknowledged

    hot(a)
    hot(b)  # both cool down: both resolutions are said (an ack is not a silence)
    assert once(config) == 0
    resolved = card_text(alert_bodies(feishu)[1])
    assert "GPU alerts: 2 resolved" in resolved and "(gpu-a, GPU 0)" in resolved and "(gpu-b, GPU 0)" in resolved
    assert cli(config, "ack", "list") == (0, "no acks in force\n")  # ended with its alert
    hot(a, 0)  # the same alert firing again is news: announced
    assert once(config) == 0
    assert "FIRING temperature_above (gpu-a, GPU 0)" in card_text(alert_bodies(feishu)[2])


def test_a_broken_driver_is_gpu_error_and_not_also_host_down(
    fleet: Fleet, known_hosts: Path, tmp_path: Path, feishu: FakeFeishu, refused_address: str
) -> None:
    """SSH works, the driver does not (a real 'Driver/library version mismatch'): one alert,
    gpu_error. host_down is counted but inhibited, listed as such, never sent: until the host
    stops answering altogether."""
    address = fleet.addresses[2]
    scenario_error(fleet.scenario_dir(address), ERR_VERSION_MISMATCH)
    doc = base_config(
        tmp_path,
        feishu,
        [{"name": "gpu-c", "address": address}],
        ssh=ssh_defaults(fleet, known_hosts),
        alerts={"gpu_error": True, "host_down": {"after": 2}},
    )
    config = write_config(tmp_path / "config.yaml", doc)

    for _ in range(4):
        assert once(config) == 0
    (message,) = alert_bodies(feishu)
    text = card_text(message)
    assert "GPU alerts: 1 firing" in text and "FIRING gpu_error (gpu-c)" in text
    assert "version mismatch" in text
    assert "host_down" not in text and "has not answered" not in text

    code, out = cli(config, "alerts")
    assert code == 1
    assert "FIRING (inhibited by gpu_error) host_down  gpu-c answers, but no GPU data for 4 polls" in out
    data = json.loads(cli(config, "alerts", "--json")[1])
    (down,) = [a for a in data["alerts"] if a["key"]["rule"] == "host_down"]
    assert down["inhibited_by"] == ["gpu_error|gpu-c||||driver_mismatch"] and down["last_sent_at"] is None

    doc["hosts"] = [{"name": "gpu-c", "address": refused_address}]  # now it does not answer at all
    write_config(config, doc)
    assert once(config) == 0
    (_, now_down) = alert_bodies(feishu)
    said = card_text(now_down)
    assert "FIRING host_down (gpu-c)" in said and "has not answered for 5 polls" in said


# ---------------------------------------------------------------- acknowledge versus silence


def ack_lines(text: str) -> list[str]:
    """The command lines under firing entries ("an admin can acknowledge it: <line>")."""
    marks = ("an admin can acknowledge it: ", "an admin can acknowledge them: ")
    return [line.strip().split(": ", 1)[1] for line in text.splitlines() if line.strip().startswith(marks)]


def test_acknowledged_with_the_printed_line_no_reminder_and_the_group_hears_resolved_once(
    fleet: Fleet,
    known_hosts: Path,
    tmp_path: Path,
    feishu: FakeFeishu,
    smtp_server: LocalSMTPServer,
) -> None:
    """A real daemon over SSH, reminders every 8s, alerts to the group (Feishu) and the admins
    (e-mail). FIRING reaches both; only the e-mail carries the ack line (the group is told in
    words). The line, run as printed by a shell whose PATH has no gpuwatch (as under systemd or
    cron), acknowledges the alert: no reminder follows; the fault clears: RESOLVED reaches the
    group exactly once, and the ack ends by itself."""
    assert smtp_server.login is not None
    address = fleet.addresses[0]
    owners = fleet.default_owner_map()

    def hot(*gpus: int) -> None:  # a busy H100 row is at 59 C
        scenario_healthy_multi_gpu(fleet.scenario_dir(address), 4, busy_gpus=gpus, owners_pids=owners)

    hot(0)
    doc = base_config(
        tmp_path,
        feishu,
        [{"name": "gpu-a", "address": address}],
        ssh=ssh_defaults(fleet, known_hosts),
        alerts={"temperature_above": 55, "repeat_every": "8s"},
        email=email_section(smtp_server),
    )
    config = write_config(tmp_path / "config.yaml", doc)
    bare_path = "/usr/sbin:/usr/bin:/sbin:/bin"  # no gpuwatch here (the service's PATH)
    env = {**os.environ, "PATH": bare_path, PASSWORD_ENV: smtp_server.login[1]}
    assert subprocess.run(["bash", "-c", "command -v gpuwatch"], env=env, capture_output=True).returncode != 0
    daemon = subprocess.Popen(
        [sys.executable, "-m", "gpuwatch", "run", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        wait_for(lambda: len(alert_bodies(feishu)) >= 1 and len(smtp_server.received) >= 1, 20, "FIRING")
        fired_at = time.monotonic()
        group = card_text(alert_bodies(feishu)[0])
        assert "FIRING temperature_above (gpu-a, GPU 0)" in group
        assert "An admin can acknowledge these alerts on the gpuwatch host" in group and "ack --rule" not in group
        mail = smtp_server.received[0].text
        (line,) = ack_lines(mail)
        assert line.endswith(f"-c {config} ack --rule temperature_above --host gpu-a --gpu 0")
        assert not line.startswith("gpuwatch ")  # not on that PATH: the absolute path

        acked = subprocess.run(["bash", "-c", line], env=env, capture_output=True, text=True, timeout=60)
        assert acked.returncode == 0, acked.stderr
        assert acked.stdout.startswith("ack #1 added by ")
        assert "1 firing alert (rule=temperature_above host=gpu-a gpu=0): no more reminders" in acked.stdout
        assert time.monotonic() - fired_at < 8, "acknowledged too late to show that no reminder follows"

        code, shown = cli(config, "alerts")
        assert code == 0  # acknowledged: nothing for a script to page about
        assert "FIRING (acknowledged #1) temperature_above" in shown and "acknowledged by " in shown
        wait_for(lambda: time.monotonic() - fired_at > 12, 20, "past the time of a reminder")
        assert len(alert_bodies(feishu)) == 1 and len(smtp_server.received) == 1  # no reminder

        hot()  # the fault clears
        wait_for(lambda: len(alert_bodies(feishu)) >= 2 and len(smtp_server.received) >= 2, 20, "RESOLVED")
        time.sleep(3)  # a few more polls: nothing more
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, err = daemon.communicate(timeout=20)
    assert daemon.returncode == 0, err.decode()
    bodies = [card_text(b) for b in alert_bodies(feishu)]
    assert len(bodies) == 2 and "STILL FIRING" not in "\n".join(bodies)
    assert bodies[1].count("RESOLVED temperature_above (gpu-a, GPU 0)") == 1
    assert "RESOLVED temperature_above (gpu-a, GPU 0)" in smtp_server.received[1].text
    assert cli(config, "ack", "list") == (0, "no acks in force\n")  # it ended with its alert
