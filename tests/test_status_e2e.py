"""`gpuwatch status` end to end: a real sshd per loopback address, a stand-in nvidia-smi replaying
real captures, real processes owned by real users, so SSH, the probe, ps attribution and the
error classification are all the real thing."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from fleet import (
    ERR_NO_DRIVER,
    ERR_VERSION_MISMATCH,
    Fleet,
    scenario_error,
    scenario_hang,
    scenario_mig,
)
from gpuwatch.cli import build_poller, main
from gpuwatch.config.load import load_config


def write_config(tmp_path: Path, doc: dict[str, Any], mode: int = 0o600) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    path.chmod(mode)
    return path


def ssh_defaults(fleet: Fleet, known_hosts: Path | None, **extra: Any) -> dict[str, Any]:
    return fleet.gpuwatch_ssh(known_hosts, **extra)


def run_status(config: Path, *extra: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(["status", "-c", str(config), *extra], out=out)
    return code, out.getvalue()


def status_json(config: Path) -> tuple[int, dict[str, Any]]:
    code, text = run_status(config, "--json")
    return code, json.loads(text)


def by_name(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {h["name"]: h for h in doc["hosts"]}


def test_healthy_host_every_gpu_and_its_real_owners(
    fleet: Fleet, known_hosts: Path, tmp_path: Path, job_pids: dict[str, int]
) -> None:
    address = fleet.addresses[0]
    config = write_config(
        tmp_path,
        {"hosts": [{"name": "gpu-a", "address": address}], "ssh": ssh_defaults(fleet, known_hosts)},
    )
    code, doc = status_json(config)
    assert code == 0
    host = by_name(doc)["gpu-a"]
    assert host["ok"] and host["error"] is None and host["address"] == address
    assert [g["index"] for g in host["gpus"]] == [0, 1, 2, 3]
    gpu0 = host["gpus"][0]
    assert gpu0["name"] == "NVIDIA H100 80GB HBM3"
    # values straight from the real H100 capture under load
    assert (gpu0["utilization_percent"], gpu0["memory_used_mib"], gpu0["memory_total_mib"]) == (100, 19818, 81559)
    assert gpu0["temperature_c"] == 59 and gpu0["power_w"] == 631.95
    assert len({g["uuid"] for g in host["gpus"]}) == 4
    procs = {p["pid"]: p for p in host["processes"]}
    alice, longname = procs[job_pids["alice"]], procs[job_pids["verylongusername"]]
    assert alice["user"] == "alice" and alice["gpu_index"] == 0
    assert longname["user"] == "verylongusername"  # not 'verylon+' nor a UID
    assert "train.py" in (alice["command"] or "")
    assert isinstance(alice["runtime_seconds"], int) and alice["runtime_seconds"] >= 0
    assert alice["used_memory_mib"] == 2566
    # the captured gpu_burn pid exists in no PID namespace we can see: no invented owner
    unseen = procs[11345]
    assert unseen["user"] is None and unseen["command"] is None
    assert unseen["name"] == ""  # names come from ps (nvidia-smi prints them raw, as their owners wrote them)
    assert alice["name"] == fleet.jobs["alice"].argv[0]

    code, table = run_status(config)
    assert code == 0
    assert "verylongusername(" in table and "alice(" in table
    assert "pid 11345 (owner unknown)" in table
    assert table.count("free") >= 3  # GPUs 1-3 replay the idle capture


def test_mixed_fleet_each_failure_has_its_precise_reason(
    fleet: Fleet, known_hosts: Path, tmp_path: Path, refused_address: str
) -> None:
    healthy, mig, nodriver, mismatch, hung = fleet.addresses[:5]
    scenario_mig(fleet.scenario_dir(mig))
    scenario_error(fleet.scenario_dir(nodriver), ERR_NO_DRIVER)
    scenario_error(fleet.scenario_dir(mismatch), ERR_VERSION_MISMATCH)
    scenario_hang(fleet.scenario_dir(hung))
    hosts = [
        {"name": "healthy", "address": healthy},
        {"name": "mig", "address": mig},
        {"name": "nodriver", "address": nodriver},
        {"name": "mismatch", "address": mismatch},
        {"name": "hung", "address": hung, "command_timeout": "4s"},
        {"name": "nothing-listens", "address": refused_address},
    ]
    config = write_config(tmp_path, {"hosts": hosts, "ssh": ssh_defaults(fleet, known_hosts)})
    started = time.monotonic()
    code, doc = status_json(config)
    elapsed = time.monotonic() - started
    assert code == 0
    hosts_out = by_name(doc)
    assert [h["name"] for h in doc["hosts"]] == [h["name"] for h in hosts]  # config order
    assert hosts_out["healthy"]["ok"]
    mig_host = hosts_out["mig"]
    assert mig_host["ok"] and mig_host["gpus"][0]["utilization_percent"] is None
    assert mig_host["gpus"][0]["memory_used_mib"] == 11125
    assert hosts_out["nodriver"]["error_kind"] == "driver_not_loaded"
    assert "driver" in hosts_out["nodriver"]["error"]
    assert hosts_out["mismatch"]["error_kind"] == "driver_mismatch"
    assert "reboot" in hosts_out["mismatch"]["error"].lower()
    assert hosts_out["hung"]["error_kind"] == "probe_timeout"
    assert hosts_out["nothing-listens"]["error_kind"] == "unreachable"
    assert "refused" in hosts_out["nothing-listens"]["error"]
    for name in ("nodriver", "mismatch", "hung", "nothing-listens"):
        assert hosts_out[name]["ok"] is False and hosts_out[name]["gpus"] == []
    # the hung host costs its own timeout, not more, and does not hold the others back
    assert elapsed < 4 + 3
    assert hosts_out["healthy"]["probe_seconds"] < 3

    code, table = run_status(config)
    assert "DOWN probe_timeout" in table and "DOWN unreachable" in table


def test_exit_code_1_when_no_host_answered(tmp_path: Path, refused_address: str, fleet: Fleet) -> None:
    config = write_config(
        tmp_path, {"hosts": [{"name": "x", "address": refused_address}], "ssh": ssh_defaults(fleet, None)}
    )
    code, doc = status_json(config)
    assert code == 1 and doc["hosts"][0]["error_kind"] == "unreachable"


def test_password_auth_from_environment_and_auth_failure(
    fleet: Fleet, known_hosts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPUWATCH_TEST_PW", fleet.monitor_password)
    monkeypatch.setenv("GPUWATCH_WRONG_PW", "not-the-password")
    monkeypatch.setenv("HOME", str(tmp_path))  # no default keys, no agent: only the password
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    ssh = ssh_defaults(fleet, known_hosts, password_env="GPUWATCH_TEST_PW")
    del ssh["key_file"]
    hosts = [
        {"name": "pw-ok", "address": fleet.addresses[0]},
        {"name": "pw-bad", "address": fleet.addresses[1], "password_env": "GPUWATCH_WRONG_PW"},
    ]
    config = write_config(tmp_path, {"hosts": hosts, "ssh": ssh, "state_dir": str(tmp_path / "state")})
    code, doc = status_json(config)
    assert code == 0
    out = by_name(doc)
    assert out["pw-ok"]["ok"], out["pw-ok"]
    assert out["pw-bad"]["error_kind"] == "auth_failed"
    assert "gpuwatch-mon@" in out["pw-bad"]["error"] and "password" in out["pw-bad"]["error"]
    log_text = (tmp_path / "state" / "gpuwatch.log").read_text()
    assert fleet.monitor_password not in log_text and "not-the-password" not in log_text
    assert fleet.monitor_password not in json.dumps(doc)


def test_predecessor_config_file_works_unchanged(fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    legacy = (
        f"ip_list:\n  - {fleet.addresses[0]}\n  - {fleet.addresses[1]}\n"
        f"port: {fleet.port}\nuser: {fleet.monitor_user}\npassword: {fleet.monitor_password}\n"
        "feishu_url: https://open.feishu.cn/open-apis/bot/v2/hook/0123456789abcdef\nfeishu_keyword: GPU\n"
    )
    path = tmp_path / "config.yaml"
    path.write_text(legacy)
    path.chmod(0o644)  # as the predecessor left it: readable by all, password inside
    out = io.StringIO()
    code = main(["status", "--json", "-c", str(path)], out=out)
    assert code == 0
    doc = json.loads(out.getvalue())
    assert [h["ok"] for h in doc["hosts"]] == [True, True]
    assert [h["name"] for h in doc["hosts"]] == fleet.addresses[:2]
    # accept-new recorded both first keys in gpuwatch's own known_hosts under state_dir (./logs)
    recorded = (tmp_path / "logs" / "known_hosts").read_text()
    assert f"[{fleet.addresses[0]}]:{fleet.port}" in recorded
    log_text = (tmp_path / "logs" / "gpuwatch.log").read_text()
    assert "readable by other users" in log_text and fleet.monitor_password not in log_text


def test_changed_host_key_is_refused_with_a_plain_warning(fleet: Fleet, tmp_path: Path) -> None:
    address = "127.0.0.40"
    old_key = fleet.new_host_key("old")
    fleet.add_host(address, host_key=fleet.new_host_key("new"))
    known = fleet.write_known_hosts(tmp_path / "known_hosts", [address], key=old_key)
    config = write_config(
        tmp_path,
        {
            "hosts": [{"name": "moved", "address": address}],
            "ssh": ssh_defaults(fleet, known),
            "feishu": {"url": "http://127.0.0.1:9/open-apis/bot/v2/hook/t0ken"},  # check: a channel is configured
        },
    )
    code, doc = status_json(config)
    host = doc["hosts"][0]
    assert code == 1 and host["error_kind"] == "host_key_changed"
    assert "man-in-the-middle" in host["error"]
    assert f"ssh-keygen -R '[{address}]:{fleet.port}' -f {known}" in host["error"]
    # gpuwatch did not quietly record the new key either
    assert (
        not (tmp_path / "logs" / "known_hosts").exists()
        or address not in (tmp_path / "logs" / "known_hosts").read_text()
    )

    out = io.StringIO()
    assert main(["check", "-c", str(config)], out=out) == 1
    assert "host_key_changed" in out.getvalue() and "hint:" in out.getvalue()


def test_strict_policy_refuses_unknown_keys_and_says_how_to_add_them(fleet: Fleet, tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        {
            "hosts": [{"name": "new", "address": fleet.addresses[0]}],
            "ssh": ssh_defaults(fleet, None, host_key_policy="strict"),
        },
    )
    code, doc = status_json(config)
    host = doc["hosts"][0]
    assert host["error_kind"] == "host_key_unknown"
    assert f"ssh-keyscan -p {fleet.port} -t ssh-ed25519 {fleet.addresses[0]}" in host["error"]
    # following the advice works: the same line, run for real, then a strict poll succeeds
    line = host["error"].split("add it with: ")[1]
    keyscan, target = line.split(" >> ")
    scanned = subprocess.run(keyscan.split(), capture_output=True, text=True, timeout=20, check=True).stdout
    Path(target).write_text(scanned)
    code, doc = status_json(config)
    assert code == 0 and doc["hosts"][0]["ok"]


def test_connections_persist_across_polls_and_come_back_after_a_host_restart(
    fleet: Fleet, known_hosts: Path, tmp_path: Path
) -> None:
    address = "127.0.0.41"
    key = fleet.add_host(address)
    config_path = write_config(
        tmp_path,
        {
            "hosts": [{"name": "steady", "address": fleet.addresses[0]}, {"name": "flaky", "address": address}],
            "ssh": ssh_defaults(fleet, None),
        },
    )
    config = load_config(config_path)
    poller = build_poller(config)
    try:
        first = poller.poll()
        assert all(h.ok for h in first.hosts)
        runners = [poller.prober(h.name).runner for h in config.hosts]
        transports = [r.transport() for r in runners]  # type: ignore[attr-defined]
        second = poller.poll()
        assert all(h.ok for h in second.hosts)
        assert [r.transport() for r in runners] == transports  # type: ignore[attr-defined]  # reused

        fleet.remove_host(address)  # the host goes down: its connection drops
        down = poller.poll()
        flaky = {h.name: h for h in down.hosts}["flaky"]
        assert not flaky.ok and flaky.error_kind is not None
        assert {h.name: h for h in down.hosts}["steady"].ok

        fleet.add_host(address, host_key=key)  # back, same key
        back = poller.poll()
        assert {h.name: h for h in back.hosts}["flaky"].ok
    finally:
        poller.close()


def test_a_host_whose_probe_still_runs_is_not_probed_again(fleet: Fleet, known_hosts: Path, tmp_path: Path) -> None:
    address = fleet.addresses[2]
    scenario_hang(fleet.scenario_dir(address))
    config = load_config(
        write_config(
            tmp_path,
            {
                "hosts": [{"name": "hung", "address": address}, {"name": "ok", "address": fleet.addresses[0]}],
                "ssh": ssh_defaults(fleet, known_hosts, command_timeout="6s", connect_timeout="1s"),
            },
        )
    )
    poller = build_poller(config)
    try:
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(poller.poll)  # its probe of "hung" takes the step timeout
            time.sleep(1.0)
            second = {h.name: h for h in poller.poll().hosts}
            first = {h.name: h for h in in_flight.result(timeout=30).hosts}
        assert second["hung"].error_kind is not None and second["hung"].error_kind.value == "busy"
        assert "still running" in (second["hung"].error or "")
        assert second["ok"].ok
        assert first["hung"].error_kind is not None and first["hung"].error_kind.value == "probe_timeout"
    finally:
        poller.close()


def test_localhost_is_polled_without_ssh(local_standin: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, {"hosts": ["localhost"]})
    code, doc = status_json(config)
    assert code == 0
    host = doc["hosts"][0]
    assert host["name"] == "localhost" and host["address"] == "local" and len(host["gpus"]) == 4


def test_console_script_and_python_dash_m(local_standin: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, {"hosts": ["localhost"]})
    for argv in (["gpuwatch"], [sys.executable, "-m", "gpuwatch"]):
        proc = subprocess.run(
            [*argv, "status", "-c", str(config)], capture_output=True, text=True, timeout=60, env=os.environ.copy()
        )
        assert proc.returncode == 0, proc.stderr
        assert "NVIDIA H100 80GB HBM3" in proc.stdout


def test_bare_name_resolved_through_ssh_config(fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text(
        f"Host gpu-alias\n  HostName {fleet.addresses[1]}\n  Port {fleet.port}\n"
        f"  User {fleet.monitor_user}\n  IdentityFile {fleet.client_key}\n"
    )
    fleet.write_known_hosts(home / ".ssh" / "known_hosts", [fleet.addresses[1]])
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    # `ssh:` gives fleet-wide defaults that the host's own ~/.ssh/config entry overrides
    config = write_config(tmp_path, {"hosts": ["gpu-alias"], "ssh": {"user": "nobody-here", "port": 1}})
    code, doc = status_json(config)
    host = doc["hosts"][0]
    assert code == 0, host
    assert host["name"] == "gpu-alias" and len(host["gpus"]) == 4
    # the key came from ~/.ssh/known_hosts: gpuwatch recorded nothing of its own
    assert not (tmp_path / "logs" / "known_hosts").exists()


def test_proxy_jump_through_a_bastion(fleet: Fleet, known_hosts: Path, tmp_path: Path, refused_address: str) -> None:
    bastion = f"{fleet.monitor_user}@{fleet.addresses[0]}:{fleet.port}"
    hosts = [
        {"name": "behind-bastion", "address": fleet.addresses[3], "proxy_jump": bastion},
        {"name": "bastion-cannot-reach", "address": refused_address, "proxy_jump": bastion},
        {"name": "no-bastion", "address": fleet.addresses[3], "proxy_jump": f"{refused_address}:{fleet.port}"},
    ]
    config = write_config(tmp_path, {"hosts": hosts, "ssh": ssh_defaults(fleet, known_hosts)})
    code, doc = status_json(config)
    out = by_name(doc)
    assert code == 0
    assert out["behind-bastion"]["ok"] and len(out["behind-bastion"]["gpus"]) == 4
    assert out["bastion-cannot-reach"]["error_kind"] == "unreachable"
    assert f"jump host {fleet.addresses[0]} cannot reach {refused_address}" in out["bastion-cannot-reach"]["error"]
    assert out["no-bastion"]["error_kind"] == "unreachable"
    assert "refused" in out["no-bastion"]["error"]


def test_key_from_ssh_agent(fleet: Fleet, known_hosts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    agent_bin = shutil.which("ssh-agent")
    if agent_bin is None or shutil.which("ssh-add") is None:
        pytest.skip("ssh-agent is not installed")
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen([agent_bin, "-D", "-a", str(sock)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if sock.exists():
                break
            time.sleep(0.05)
        env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
        subprocess.run(["ssh-add", str(fleet.client_key)], env=env, check=True, capture_output=True, timeout=20)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        monkeypatch.setenv("HOME", str(tmp_path))  # no key file anywhere: only the agent has it
        ssh = ssh_defaults(fleet, known_hosts)
        del ssh["key_file"]
        config = write_config(tmp_path, {"hosts": [{"name": "via-agent", "address": fleet.addresses[0]}], "ssh": ssh})
        code, doc = status_json(config)
        assert code == 0 and doc["hosts"][0]["ok"], doc["hosts"][0]
        monkeypatch.delenv("SSH_AUTH_SOCK")  # the same config without the agent: refused
        code, doc = status_json(config)
        assert code == 1 and doc["hosts"][0]["error_kind"] == "auth_failed", doc["hosts"][0]
    finally:
        agent.terminate()
        agent.wait(timeout=10)
