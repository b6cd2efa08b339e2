"""ssh.py against the real sshd fleet: what a host can do to a poll (flood it, hang it, leave
processes behind), odd known_hosts files, a bastion that refuses too many handshakes at once, and
``localhost`` versus an SSH tunnel to a loopback address."""

from __future__ import annotations

import io
import json
import os
import resource
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fleet import Fleet, scenario_hang, scenario_l40s
from gpuwatch.cli import main
from gpuwatch.config.load import parse_config
from gpuwatch.model import HostErrorKind
from gpuwatch.poll import probe_host
from gpuwatch.ssh import DEFAULT_MAX_HANDSHAKES, HostFailure, HostKeyStore, SshConnection
from processes import kill_marked, marked, new_marker
from waiting import wait_for


def connection(fleet: Fleet, address: str, known_hosts: Path, tmp_path: Path, **ssh: Any) -> SshConnection:
    host = parse_config({"hosts": [{"name": address, "address": address}], "ssh": fleet.gpuwatch_ssh(**ssh)}).hosts[0]
    return SshConnection(host, HostKeyStore(tmp_path / "own_known_hosts", (known_hosts,)))


@pytest.fixture
def marker() -> Iterator[str]:
    """A unique ``sleep`` argument to find what one test started; whatever still has it is killed after."""
    value = new_marker()
    yield value
    kill_marked(value)


def write_config(tmp_path: Path, doc: dict[str, Any]) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    path.chmod(0o600)
    return path


def status_json(config: Path) -> tuple[int, dict[str, Any]]:
    out = io.StringIO()
    code = main(["status", "--json", "-c", str(config)], out=out)
    return code, json.loads(out.getvalue())


# ---------------------------------------------------------------- what a host prints and leaves behind


def test_a_host_that_floods_its_output_is_cut_at_the_cap(fleet: Fleet, known_hosts: Path, tmp_path: Path) -> None:
    conn = connection(fleet, fleet.addresses[0], known_hosts, tmp_path)
    try:
        with pytest.raises(HostFailure) as info:
            conn.run_script("yes gpuwatch-flood | head -c 50000000\n", 30)
        assert info.value.kind is HostErrorKind.UNPARSEABLE
        assert "more than 4 MiB on stdout (it begins 'gpuwatch-flood')" in info.value.message
        with pytest.raises(HostFailure) as info:
            conn.run_script("head -c 1000000 /dev/zero >&2\n", 30)
        assert info.value.kind is HostErrorKind.UNPARSEABLE and "64 KiB on stderr" in info.value.message
        # the connection is still good for the next poll
        assert conn.run_script("echo fine\n", 10).stdout == "fine\n"
    finally:
        conn.close()


def test_a_probe_past_its_deadline_leaves_no_process_on_the_host(
    fleet: Fleet, known_hosts: Path, tmp_path: Path, marker: str
) -> None:
    """Children that ignore SIGTERM and hold stdout, one in its own process group (as timeout(1)
    makes), one hung in the foreground: the run ends at its deadline, the host's processes just after."""
    script = (
        f"sh -c 'trap \"\" TERM HUP INT; exec sleep {marker}' &\n"
        f"timeout 1000 sleep {marker} &\n"
        "echo started\n"
        f"sleep {marker}\n"
    )
    conn = connection(fleet, fleet.addresses[0], known_hosts, tmp_path)
    try:
        with pytest.raises(HostFailure) as info:
            conn.run_script(script, 2)
        assert info.value.kind is HostErrorKind.PROBE_TIMEOUT
        assert "did not finish within 2s" in info.value.message
        wait_for(lambda: not marked(marker), 5, "the probe's processes on the host to be gone")
        assert conn.run_script("echo fine\n", 10).stdout == "fine\n"
    finally:
        conn.close()


def test_a_probe_that_ends_but_leaves_a_child_holding_its_output(
    fleet: Fleet, known_hosts: Path, tmp_path: Path, marker: str
) -> None:
    conn = connection(fleet, fleet.addresses[0], known_hosts, tmp_path)
    try:
        result = conn.run_script(f"sh -c 'trap \"\" TERM HUP; exec sleep {marker}' &\necho done; exit 3\n", 10)
    finally:
        conn.close()
    assert (result.stdout, result.stderr, result.exit_status) == ("done\n", "", 3)
    wait_for(lambda: not marked(marker), 5, "the leftover child to be gone")


def test_a_hung_gpu_whose_helper_holds_the_output_is_reported_and_cleaned_up(
    fleet: Fleet, known_hosts: Path, tmp_path: Path, marker: str
) -> None:
    """The whole probe: nvidia-smi hangs (killed by timeout(1) on the host) and a helper it started
    ignores SIGTERM and keeps stdout open. The host is reported as probe_timeout, and nothing the
    poll started remains on the host."""
    address = fleet.addresses[1]
    scenario_hang(fleet.scenario_dir(address))
    tools = fleet.root / f"tools-{uuid.uuid4().hex[:8]}"
    tools.mkdir(mode=0o755)
    wrapper = tools / "nvidia-smi"
    wrapper.write_text(
        f'#!/bin/sh\nsh -c \'trap "" TERM HUP; exec sleep {marker}\' &\nexec {fleet.bin_dir}/nvidia-smi "$@"\n'
    )
    wrapper.chmod(0o755)
    doc = {
        "hosts": [{"name": "hung", "address": address, "nvidia_smi": str(wrapper)}],
        "ssh": fleet.gpuwatch_ssh(command_timeout="3s"),
    }
    host = parse_config(doc).hosts[0]
    conn = SshConnection(host, HostKeyStore(tmp_path / "own", (known_hosts,)))
    try:
        snapshot = probe_host(host, conn)
    finally:
        conn.close()
    assert not snapshot.ok and snapshot.error_kind is HostErrorKind.PROBE_TIMEOUT
    wait_for(lambda: not marked(marker), 5, "the helper to be gone")


# ---------------------------------------------------------------- known_hosts


def test_unreadable_known_hosts_lines_cost_nothing_but_a_warning(
    fleet: Fleet, known_hosts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert fleet.host_key is not None
    user_file = tmp_path / "user_known_hosts"
    user_file.write_text(
        f"@cert-authority *.example.com {fleet.host_key.key_type} {fleet.host_key.base64}\n"
        + known_hosts.read_text()
        + "[gpu-z]:22 ssh-ed25519 AAAAC3Nza\n"
    )
    state = tmp_path / "state"
    state.mkdir()
    (state / "known_hosts").write_text("[cut-off]:22 ssh-ed25")
    address = fleet.addresses[0]
    doc = {
        "hosts": [{"name": "gpu-a", "address": address}],
        "ssh": fleet.gpuwatch_ssh(user_file, host_key_policy="strict"),
        "state_dir": str(state),
    }
    code, status = status_json(write_config(tmp_path, doc))
    assert code == 0 and status["hosts"][0]["ok"], status
    warnings = capsys.readouterr().err  # the command's log on stderr
    assert f"{user_file}: skipped 2 line(s)" in warnings and "line 1 (@cert-authority" in warnings
    assert f"{state / 'known_hosts'}: skipped 1 line(s)" in warnings


def test_a_host_offering_a_revoked_key_is_refused_whatever_the_policy(
    fleet: Fleet, known_hosts: Path, tmp_path: Path
) -> None:
    assert fleet.host_key is not None
    address = fleet.addresses[2]
    revoked = f"@revoked * {fleet.host_key.key_type} {fleet.host_key.base64}\n"
    listed = tmp_path / "listed"
    listed.write_text(known_hosts.read_text() + revoked)  # the key is also listed as the host's: revoked wins
    unlisted = tmp_path / "unlisted"
    unlisted.write_text(revoked)
    for user_file, policy in ((listed, "strict"), (unlisted, "accept-new"), (unlisted, "off")):
        host = parse_config({"hosts": [address], "ssh": fleet.gpuwatch_ssh(user_file, host_key_policy=policy)}).hosts[0]
        own = tmp_path / f"own-{policy}"
        conn = SshConnection(host, HostKeyStore(own, (user_file,)))
        try:
            with pytest.raises(HostFailure) as info:
                conn.run_script("echo reached\n", 5)
        finally:
            conn.close()
        assert info.value.kind is HostErrorKind.HOST_KEY_CHANGED
        assert f"is marked @revoked in {user_file}" in info.value.message
        assert not own.exists()  # accept-new did not record it


# ---------------------------------------------------------------- handshakes through one bastion


def connect_all(conns: list[SshConnection]) -> list[HostFailure | None]:
    """Connect every connection at once (one thread each, released together)."""
    results: list[HostFailure | None] = [None] * len(conns)
    start = threading.Barrier(len(conns))

    def run(i: int) -> None:
        start.wait()
        try:
            conns[i].run_script("echo reached\n", 20)
        except HostFailure as failure:
            results[i] = failure

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(conns))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_many_hosts_behind_one_bastion_all_connect_with_the_handshake_limit(fleet: Fleet, tmp_path: Path) -> None:
    """A bastion with OpenSSH's default MaxStartups (10:30:100) and 30 hosts behind it, connecting at
    once as on a daemon restart: without a limit some are refused; with the default limit, none."""
    bastion = "127.0.0.40"
    fleet.add_host(bastion, host_key=fleet.host_key, sshd_options=["MaxStartups 10:30:100"])
    known_hosts = fleet.write_known_hosts(tmp_path / "known_hosts")
    hosts = parse_config(
        {
            "hosts": [{"name": f"gpu{i:02d}", "address": fleet.addresses[i % len(fleet.addresses)]} for i in range(30)],
            "ssh": fleet.gpuwatch_ssh(
                known_hosts, proxy_jump=f"{fleet.monitor_user}@{bastion}:{fleet.port}", connect_timeout="10s"
            ),
        }
    ).hosts
    store = HostKeyStore(tmp_path / "own", (known_hosts,))

    unlimited = [SshConnection(h, store) for h in hosts]
    try:
        refused = [f for f in connect_all(unlimited) if f is not None]
    finally:
        for conn in unlimited:
            conn.close()
    assert refused, "expected the bastion to refuse some of 30 simultaneous handshakes"
    assert {f.kind for f in refused} == {HostErrorKind.UNREACHABLE}
    assert all(f"{bastion}:{fleet.port} closed the connection before the SSH handshake" in f.message for f in refused)

    slots = threading.BoundedSemaphore(DEFAULT_MAX_HANDSHAKES)
    limited = [SshConnection(h, store, handshakes=slots) for h in hosts]
    try:
        failures = connect_all(limited)
    finally:
        for conn in limited:
            conn.close()
    assert failures == [None] * len(hosts), [f.message for f in failures if f is not None]


# ---------------------------------------------------------------- localhost or a tunnel


def test_a_tunnel_to_127_0_0_1_is_polled_over_ssh(
    fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An SSH server on 127.0.0.1 (as a tunnel's local end would be) is another machine: its GPUs
    are not this machine's, whether the entry says ``address: 127.0.0.1`` or ``name: localhost``
    with a port."""
    fleet.add_host("127.0.0.1", host_key=fleet.host_key)
    scenario_l40s(fleet.scenario_dir("127.0.0.1"))  # 1 L40S there; this machine's ``local`` scenario: 4 H100
    known_hosts = fleet.write_known_hosts(tmp_path / "known_hosts")
    for name, value in fleet.local_env().items():
        monkeypatch.setenv(name, value)
    doc: dict[str, Any] = {
        "hosts": ["localhost", {"name": "tunnel", "address": "127.0.0.1", "port": fleet.port}],
        "ssh": fleet.gpuwatch_ssh(known_hosts),
        "state_dir": str(tmp_path / "state"),
    }
    code, status = status_json(write_config(tmp_path, doc))
    assert code == 0
    here, tunnelled = status["hosts"]
    assert here["ok"] and here["address"] == "local" and len(here["gpus"]) == 4
    assert tunnelled["ok"] and tunnelled["address"] == "127.0.0.1"
    assert [g["name"] for g in tunnelled["gpus"]] == ["NVIDIA L40S"]

    doc["hosts"] = [{"name": "localhost", "port": fleet.port}]
    code, status = status_json(write_config(tmp_path, doc))
    assert code == 0
    (ssh_localhost,) = status["hosts"]
    assert ssh_localhost["ok"] and ssh_localhost["address"] == "localhost"
    assert [g["name"] for g in ssh_localhost["gpus"]] == ["NVIDIA L40S"]


def test_a_probe_reads_its_output_when_descriptors_run_past_1023(
    fleet: Fleet, known_hosts: Path, tmp_path: Path
) -> None:
    """1,000 hosts hold more than 1,024 descriptors: reading a probe's channel must not use
    select(), which refuses those ("filedescriptor out of range in select()")."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip("needs a hard open files limit of 2048 or more")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    conn = connection(fleet, fleet.addresses[0], known_hosts, tmp_path)
    try:
        result = conn.run_script("echo fine\n", 10)
    finally:
        conn.close()
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert result.stdout == "fine\n"
