"""Discovery as an admin uses it: real ``python -m gpuwatch`` processes, the real sshd fleet
(tests/fleet.py) for the polled hosts, the Feishu-like server for what the group is told, and each
source against a real thing: a hosts file edited while the daemon runs, a ``~/.ssh/config`` (a HOME
of the test's own), a fake ``sinfo`` printing Slurm host lists (locally, and a command run on a
``via:`` host over SSH), and an HTTP server that answers like Consul's catalog API with blocking
queries (tests/fakeconsul.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from builders import write_yaml
from fakeconsul import FakeConsul, Node
from fakefeishu import FakeFeishu, text_values
from fleet import ERR_VERSION_MISMATCH, Fleet, scenario_error
from waiting import wait_for

KEYWORD = "GPU"  # what conftest.feishu requires
TOKEN = "consul-acl-4f1c9e"  # a test ACL token: it must never show in the log


def replace_text(path: Path, text: str) -> None:
    """As an editor saves: a new file renamed over the old one (a reader never sees half of it)."""
    new = path.with_suffix(".new")
    new.write_text(text, encoding="utf-8")
    new.replace(path)


def base_doc(tmp_path: Path, fleet: Fleet, known_hosts: Path, feishu: FakeFeishu, **ssh: object) -> dict[str, Any]:
    return {
        "ssh": fleet.gpuwatch_ssh(known_hosts, connect_timeout="3s", command_timeout="10s", **ssh),
        "state_dir": str(tmp_path / "state"),
        "feishu": {"url": feishu.url, "keyword": KEYWORD, "format": "post"},
        "schedule": {"poll_every": "2s", "reports": []},
    }


def environment(home: Path | None = None, **extra: str) -> dict[str, str]:
    env = os.environ.copy()
    if home is not None:
        env["HOME"] = str(home)
    env.update(extra)
    return env


def start(config: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "gpuwatch", "run", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env or os.environ.copy(),
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()


def log_of(tmp_path: Path) -> str:
    path = tmp_path / "state" / "gpuwatch.log"
    return path.read_text(encoding="utf-8") if path.exists() else ""


def texts(feishu: FakeFeishu) -> list[str]:
    return ["\n".join(text_values(b.get("content") or b.get("card"))) for b in feishu.accepted]


def said(feishu: FakeFeishu, words: str) -> bool:
    return any(words in t for t in texts(feishu))


def ssh_home(tmp_path: Path, fleet: Fleet) -> Path:
    """A HOME whose ~/.ssh/config names the fleet's hosts as a lab's would."""
    a = fleet.addresses
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text(
        "# the lab's hosts\n"
        "Host *\n    ServerAliveInterval 30\n\n"
        f"Host node01\n    HostName {a[0]}\n\n"
        f"Host node02\n    HostName {a[1]}\n\n"
        "Include lab.d/*.conf\n\n"
        f"Host login\n    HostName {a[2]}\n\n"
        "Host node0? !node09\n    IdentitiesOnly yes\n"
    )
    (home / ".ssh" / "lab.d").mkdir()
    (home / ".ssh" / "lab.d" / "spare.conf").write_text(f"Host node03\n    HostName {a[3]}\n")
    return home


FAKE_SINFO = """\
#!/bin/sh
# what `sinfo -h -o %N` prints: a compressed Slurm host list
case "$(cat "$(dirname "$0")/mode")" in
  ok) echo 'node[01-02]' ;;
  fail) echo "sinfo: error: Unable to contact slurm controller (connect failure)" >&2; exit 1 ;;
esac
"""


def test_a_hosts_file_edited_while_the_daemon_runs_adds_and_drops_hosts(
    fleet: Fleet, known_hosts: Path, feishu: FakeFeishu, tmp_path: Path
) -> None:
    a = fleet.addresses
    hosts_file = tmp_path / "hosts.txt"
    hosts_file.write_text(f"# GPU hosts\n{a[0]}\n")
    doc = base_doc(tmp_path, fleet, known_hosts, feishu)
    doc["hosts_from"] = [{"file": str(hosts_file), "refresh": "10m", "grace": "3s"}]
    doc["alerts"] = {"gpu_error": True}
    daemon = start(write_yaml(tmp_path / "config.yaml", doc))
    try:
        wait_for(lambda: f"poll: {a[0]} ok" in log_of(tmp_path), 20, "the first host")
        scenario_error(fleet.scenario_dir(a[1]), ERR_VERSION_MISMATCH)

        added_at = time.monotonic()
        replace_text(hosts_file, f"# GPU hosts\n{a[0]}\n{a[1]}   # new this week\n")
        wait_for(lambda: f"1 added ({a[1]})" in log_of(tmp_path), 20, "the added host started")
        took = time.monotonic() - added_at
        wait_for(lambda: f"poll: {a[1]} " in log_of(tmp_path), 20, "the added host polled")
        wait_for(lambda: said(feishu, f"FIRING gpu_error ({a[1]}"), 20, "its alert")

        removed_at = time.monotonic()
        replace_text(hosts_file, f"{a[0]}\n")
        wait_for(lambda: f"1 removed ({a[1]})" in log_of(tmp_path), 20, "the removed host dropped")
        dropped_after = time.monotonic() - removed_at
        wait_for(lambda: said(feishu, f"RESOLVED gpu_error ({a[1]}"), 20, "its alert resolved")
        assert daemon.poll() is None
    finally:
        stop(daemon)
    assert took < 5, f"the new host started {took:.1f}s after the file changed"
    assert 3 <= dropped_after < 8, f"dropped {dropped_after:.1f}s after it left the file (grace: 3s)"
    resolved = next(t for t in texts(feishu) if f"RESOLVED gpu_error ({a[1]}" in t)
    assert f"left discovery source file:{hosts_file}" in resolved
    log = log_of(tmp_path)
    assert f"discovery: hosts: 1 added ({a[1]}), 0 removed, 0 changed and reconnected, 1 kept" in log
    assert "Traceback" not in log


def test_ssh_config_and_a_command_on_a_via_host_say_where_each_host_came_from(
    fleet: Fleet, known_hosts: Path, feishu: FakeFeishu, tmp_path: Path
) -> None:
    home = ssh_home(tmp_path, fleet)
    doc = base_doc(tmp_path, fleet, known_hosts, feishu, use_ssh_config=True)
    doc["hosts"] = [{"match": "node0*", "command_timeout": "6s"}]
    doc["hosts_from"] = [
        {"ssh_config": "node01"},
        # run on the login node over SSH, as `sinfo` is on a Slurm cluster; gives node01 again, and node02
        {"command": "echo 'node[01-02]'", "via": "login", "timeout": "5s"},
    ]
    config = write_yaml(tmp_path / "config.yaml", doc)
    run = subprocess.run(
        [sys.executable, "-m", "gpuwatch", "check", "--json", "-c", str(config)],
        capture_output=True,
        env=environment(home),
        timeout=120,
    )
    assert run.returncode == 0, run.stdout.decode() + run.stderr.decode()
    report = json.loads(run.stdout)
    assert {h["name"]: (h["source"], h["ok"]) for h in report["hosts"]} == {
        "node01": ("ssh_config:~/.ssh/config", True),
        "node02": ("command@login:echo 'node[01-02]'", True),
    }
    findings = report["findings"]
    sources = {f["subject"]: (f["ok"], f["detail"]) for f in findings if f["subject"].startswith("hosts_from")}
    assert sources == {
        "hosts_from ssh_config:~/.ssh/config": (True, "1 host"),
        "hosts_from command@login:echo 'node[01-02]'": (True, "2 hosts"),
    }
    status = subprocess.run(
        [sys.executable, "-m", "gpuwatch", "status", "--json", "-c", str(config)],
        capture_output=True,
        env=environment(home),
        timeout=120,
    )
    assert status.returncode == 0, status.stderr.decode()
    hosts = {h["name"]: h for h in json.loads(status.stdout)["hosts"]}
    assert hosts["node01"]["source"] == "ssh_config:~/.ssh/config"
    assert hosts["node02"]["source"] == "command@login:echo 'node[01-02]'"
    assert hosts["node02"]["address"] == "node02" and hosts["node02"]["ok"]  # reached through ~/.ssh/config
    text = subprocess.run(
        [sys.executable, "-m", "gpuwatch", "check", "-c", str(config)],
        capture_output=True,
        env=environment(home),
        timeout=120,
        text=True,
    )
    assert "hosts_from ssh_config:~/.ssh/config: OK: 1 host" in text.stdout
    assert "node02: OK: " in text.stdout and "[from command@login:echo 'node[01-02]']" in text.stdout


def test_a_failing_command_keeps_its_last_good_list_and_discovery_failed_fires_after_for(
    fleet: Fleet, known_hosts: Path, feishu: FakeFeishu, tmp_path: Path
) -> None:
    home = ssh_home(tmp_path, fleet)
    tools = tmp_path / "slurm"
    tools.mkdir()
    sinfo = tools / "sinfo"
    sinfo.write_text(FAKE_SINFO)
    sinfo.chmod(0o755)
    (tools / "mode").write_text("ok")
    doc = base_doc(tmp_path, fleet, known_hosts, feishu, use_ssh_config=True)
    doc["hosts_from"] = [{"command": f"{sinfo} -h -o %N", "refresh": "1s", "timeout": "5s"}]
    doc["alerts"] = {"discovery_failed": {"for": "3s"}}
    daemon = start(write_yaml(tmp_path / "config.yaml", doc), environment(home))
    try:
        wait_for(lambda: all(f"poll: node0{i} ok" in log_of(tmp_path) for i in (1, 2)), 20, "both nodes polled")
        failed_at = time.monotonic()
        (tools / "mode").write_text("fail")
        wait_for(lambda: "keeping its last good list (2 hosts)" in log_of(tmp_path), 10, "the failure said")
        polls = log_of(tmp_path).count("poll: node02 ok")
        wait_for(lambda: said(feishu, "FIRING discovery_failed"), 20, "the discovery_failed alert")
        fired_after = time.monotonic() - failed_at
        still = lambda: log_of(tmp_path).count("poll: node02 ok") > polls  # noqa: E731
        wait_for(still, 20, "node02 still polled while its source fails: nothing lost")
        (tools / "mode").write_text("ok")
        wait_for(lambda: said(feishu, "RESOLVED discovery_failed"), 20, "resolved once sinfo works again")
    finally:
        stop(daemon)
    assert fired_after >= 3, f"fired {fired_after:.1f}s after the first failure (for: 3s)"
    firing = next(t for t in texts(feishu) if "FIRING discovery_failed" in t)
    assert "Unable to contact slurm controller" in firing
    assert "still polling the 2 hosts of its last good list" in firing
    log = log_of(tmp_path)
    assert "works again: 2 hosts" in log
    assert log.count("failed: ") >= 1 and log.count("keeping its last good list") == 1  # said once
    assert "Traceback" not in log


def test_consul_blocking_queries_bring_a_new_node_within_seconds_and_garbage_loses_nothing(
    fleet: Fleet, known_hosts: Path, feishu: FakeFeishu, tmp_path: Path
) -> None:
    a = fleet.addresses
    with FakeConsul(service="gpu", token=TOKEN) as consul:
        consul.set_nodes([Node("gpu-c1", a[0], ("ssh",)), Node("web-1", a[2], ("http",))])
        doc = base_doc(tmp_path, fleet, known_hosts, feishu)
        doc["hosts_from"] = [
            {
                "consul": {"url": consul.url, "service": "gpu", "tag": "ssh", "token_env": "CONSUL_HTTP_TOKEN"},
                "refresh": "20s",  # the blocking queries' wait, and the retry after a failure
                "grace": "2s",
                "timeout": "3s",
            }
        ]
        doc["alerts"] = {"discovery_failed": {"for": "0s"}}
        daemon = start(write_yaml(tmp_path / "config.yaml", doc), environment(CONSUL_HTTP_TOKEN=TOKEN))
        try:
            wait_for(lambda: "poll: gpu-c1 ok" in log_of(tmp_path), 20, "the first node polled")
            wait_for(consul.held, 10, "a blocking query held")
            added_at = time.monotonic()
            consul.set_nodes([Node("gpu-c1", a[0], ("ssh",)), Node("gpu-c2", a[1], ("ssh",))])
            wait_for(lambda: "1 added (gpu-c2)" in log_of(tmp_path), 20, "the new node started")
            took = time.monotonic() - added_at
            wait_for(lambda: "poll: gpu-c2 ok" in log_of(tmp_path), 30, "the new node polled")

            consul.garbage = True
            consul.set_nodes([Node("gpu-c1", a[0], ("ssh",))])  # answered with garbage: nothing changes
            wait_for(lambda: said(feishu, "FIRING discovery_failed"), 20, "discovery_failed")
            polls = log_of(tmp_path).count("poll: gpu-c2 ok")
            wait_for(lambda: log_of(tmp_path).count("poll: gpu-c2 ok") > polls, 10, "gpu-c2 still polled")

            consul.garbage = False  # the retry sees the catalog without gpu-c2
            wait_for(lambda: "1 removed (gpu-c2)" in log_of(tmp_path), 45, "gpu-c2 dropped after its grace")
            wait_for(lambda: said(feishu, "RESOLVED discovery_failed"), 20, "resolved")
        finally:
            stop(daemon)
    assert took < 5, f"a node added to Consul started {took:.1f}s later"
    assert all(r.had_token for r in consul.requests)
    blocking = consul.blocking_requests()
    assert blocking and all(r.query["wait"] == "20s" and r.query["tag"] == "ssh" for r in blocking)
    firing = next(t for t in texts(feishu) if "FIRING discovery_failed" in t)
    assert "the answer is not JSON" in firing and "still polling the 2 hosts" in firing
    log = log_of(tmp_path)
    assert "web-1" not in log  # another tag
    assert TOKEN not in log
    assert "Traceback" not in log
