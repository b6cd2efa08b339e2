"""Tests of the test harness itself (tests/fleet.py, tests/standin/nvidia-smi), driven with paramiko.

They do not import gpuwatch: they prove that the fleet behaves like real GPU servers over real SSH.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from pathlib import Path

import paramiko
import pytest

from fleet import (
    CAPTURES,
    ERR_NO_DRIVER,
    H100_IDLE_QUERY,
    H100_LOAD_APPS,
    H100_LOAD_QUERY,
    MIG_QUERY,
    Fleet,
    FleetError,
    _descendants,
    _proc_table,
    capture_bytes,
    fleet_unavailable_reason,
    gpu_bus_id,
    gpu_uuid,
    publish_scenario,
    scenario_error,
    scenario_hang,
    scenario_healthy_multi_gpu,
    scenario_mig,
    scenario_sleep,
)
from waiting import wait_for

GPU_FIELDS = "index,uuid,name,pci.bus_id,utilization.gpu,memory.used,memory.total,temperature.gpu,power.draw"
APP_FIELDS = "pid,gpu_uuid,gpu_bus_id,used_gpu_memory,process_name"


def connect(
    fleet: Fleet,
    address: str,
    known_hosts: Path,
    *,
    password: str | None = None,
    sock: paramiko.Channel | None = None,
) -> paramiko.SSHClient:
    """An SSHClient that trusts only ``known_hosts`` (RejectPolicy), by key unless ``password``."""
    client = paramiko.SSHClient()
    client.load_host_keys(str(known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(
        address,
        port=fleet.port,
        username=fleet.monitor_user,
        password=password,
        key_filename=None if password else str(fleet.client_key),
        look_for_keys=False,
        allow_agent=False,
        timeout=5,
        banner_timeout=5,
        auth_timeout=5,
        sock=sock,
    )
    return client


def run_script(client: paramiko.SSHClient, script: str, timeout: float = 10) -> tuple[int, str, str]:
    """``sh -s`` with ``script`` on stdin, the way gpuwatch's probe runs: (status, stdout, stderr)."""
    stdin, stdout, stderr = client.exec_command("sh -s", timeout=timeout)
    stdin.write(script)
    stdin.channel.shutdown_write()
    out = stdout.read().decode()
    err = stderr.read().decode()
    return stdout.channel.recv_exit_status(), out, err


def capture_cells(relative: str) -> dict[str, str]:
    """{field name: value} of the first row of an all-fields capture."""
    header, row = capture_bytes(relative).decode().splitlines()[:2]
    return {h.split(" [", 1)[0]: v for h, v in zip(header.split(", "), row.split(", "), strict=True)}


def test_key_and_password_logins_on_two_addresses(fleet: Fleet, known_hosts: Path) -> None:
    by_key = connect(fleet, fleet.addresses[0], known_hosts)
    by_password = connect(fleet, fleet.addresses[1], known_hosts, password=fleet.monitor_password)
    try:
        for client, address in ((by_key, fleet.addresses[0]), (by_password, fleet.addresses[1])):
            status, out, _ = run_script(client, 'echo "$USER $SSH_CONNECTION"; echo "$PATH"; command -v nvidia-smi\n')
            assert status == 0
            who, path, standin = out.splitlines()
            user, _, _, server, port = who.split()
            assert (user, server, int(port)) == (fleet.monitor_user, address, fleet.port)
            # sshd_config SetEnv overrides sshd's default PATH in non-interactive sessions
            assert path == f"{fleet.bin_dir}:/usr/local/bin:/usr/bin:/bin"
            assert standin == f"{fleet.bin_dir}/nvidia-smi"
    finally:
        by_key.close()
        by_password.close()


def test_probe_script_replays_real_capture(fleet: Fleet, known_hosts: Path, job_pids: dict[str, int]) -> None:
    address = fleet.addresses[2]
    pids = ",".join(str(p) for p in job_pids.values())
    script = (
        f"nvidia-smi --query-gpu={GPU_FIELDS} --format=csv\n"
        "echo @@\n"
        f"nvidia-smi --query-compute-apps={APP_FIELDS} --format=csv\n"
        "echo @@\n"
        f"ps -ww -o pid=,user:64=,etimes=,args= -p {pids}\n"
    )
    client = connect(fleet, address, known_hosts)
    try:
        status, out, err = run_script(client, script)
    finally:
        client.close()
    assert status == 0, err
    gpus, apps, ps = out.split("@@\n")

    load, idle = capture_cells(H100_LOAD_QUERY), capture_cells(H100_IDLE_QUERY)
    lines = gpus.splitlines()
    assert lines[0] == (
        "index, uuid, name, pci.bus_id, utilization.gpu [%], memory.used [MiB], memory.total [MiB], "
        "temperature.gpu, power.draw [W]"
    )
    assert len(lines) == 5  # header + 4 GPUs
    fields = GPU_FIELDS.split(",")[4:]
    busy = lines[1].split(", ")
    assert busy[:4] == ["0", gpu_uuid(Path(address), 0), "NVIDIA H100 80GB HBM3", "00000000:19:00.0"]
    assert busy[4:] == [load[f] for f in fields]  # 100 %, 19818 MiB, 81559 MiB, 59, 631.95 W
    assert busy[4:6] == ["100 %", "19818 MiB"]
    for index, line in enumerate(lines[2:], start=1):
        cells = line.split(", ")
        assert cells[0] == str(index)
        assert cells[4:] == [idle[f] for f in fields]  # 0 %, 0 MiB, 81559 MiB, 41, 69.85 W

    app_lines = apps.splitlines()
    assert app_lines[0] == "pid, gpu_uuid, gpu_bus_id, used_gpu_memory [MiB], process_name"
    rows = [line.split(", ") for line in app_lines[1:]]
    assert [r[0] for r in rows] == [str(job_pids["alice"]), str(job_pids["verylongusername"]), "11345"]
    assert [r[3] for r in rows] == ["2566 MiB", "1542 MiB", "15690 MiB"]
    assert [r[4] for r in rows] == ["/root/tools/memhog", "/root/tools/memhog", "./gpu_burn"]
    assert {r[1] for r in rows} == {gpu_uuid(Path(address), 0)}

    owners = {int(line.split()[0]): line.split()[1] for line in ps.splitlines()}
    assert owners == {job_pids["alice"]: "alice", job_pids["verylongusername"]: "verylongusername"}
    assert "train.py --model resnet50 --epochs 90" in ps


def test_standin_formats_and_invalid_field_locally(local_standin: Path) -> None:
    """No SSH: the ``local`` scenario, nounits/noheader projection, and nvidia-smi's invalid-field error."""
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.used,utilization.gpu,index", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.splitlines() == ["19818, 100, 0", "0, 0, 1", "0, 0, 2", "0, 0, 3"]
    bad = subprocess.run(
        ["nvidia-smi", "--query-gpu=index,bogus.field", "--format=csv"], capture_output=True, text=True, check=False
    )
    assert (bad.returncode, bad.stdout) == (2, 'Field "bogus.field" is not a valid field to query.\n\n')
    table = subprocess.run(["nvidia-smi"], capture_output=True, check=True).stdout
    assert table == b""  # multi-GPU scenarios carry no table capture


def test_process_name_with_comma_space_is_split_from_both_ends(local_standin: Path) -> None:
    # Harness self-test: a real compute-apps row whose process_name is edited to contain ", "
    # (as FIELD_NOTES reports for real paths); never stored as a fixture.
    header, row = capture_bytes(H100_LOAD_APPS).decode().splitlines()[:2]
    edited = row.replace("/root/tools/memhog", "/data/run 3, final/train")
    publish_scenario(
        local_standin,
        {
            "query-gpu.csv": capture_bytes(H100_LOAD_QUERY),
            "compute-apps.csv": f"{header}\n{edited}\n",
        },
    )
    out = subprocess.run(
        ["nvidia-smi", f"--query-compute-apps={APP_FIELDS}", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert (
        out == "11327, GPU-00000000-0000-0000-0000-000000000000, 00000000:00:09.0, 2566 MiB, /data/run 3, final/train\n"
    )


def test_error_hang_and_sleep_scenarios(fleet: Fleet, known_hosts: Path) -> None:
    err_host, hang_host, slow_host = fleet.addresses[3:6]
    scenario_error(fleet.scenario_dir(err_host), ERR_NO_DRIVER)
    scenario_hang(fleet.scenario_dir(hang_host))
    scenario_sleep(fleet.scenario_dir(slow_host), 0.5)
    query = f"nvidia-smi --query-gpu={GPU_FIELDS} --format=csv"

    client = connect(fleet, err_host, known_hosts)
    try:
        status, out, _ = run_script(client, f"{query}\n")
    finally:
        client.close()
    assert status == 9
    assert out.encode() == capture_bytes(ERR_NO_DRIVER)

    client = connect(fleet, hang_host, known_hosts)
    try:
        started = time.monotonic()
        status, out, _ = run_script(client, f"timeout 1 {query}\necho rc=$?\n")
        elapsed = time.monotonic() - started
    finally:
        client.close()
    assert out == "rc=124\n"
    assert 0.9 < elapsed < 3

    client = connect(fleet, slow_host, known_hosts)
    try:
        started = time.monotonic()
        status, out, _ = run_script(client, f"{query}\n")
        elapsed = time.monotonic() - started
    finally:
        client.close()
    assert status == 0 and "19818 MiB" in out
    assert elapsed >= 0.5


def test_scenario_rewritten_between_polls_on_one_connection(fleet: Fleet, known_hosts: Path) -> None:
    address = fleet.addresses[6]
    script = "nvidia-smi --query-gpu=index,utilization.gpu,memory.used,mig.mode.current --format=csv,noheader\n"
    client = connect(fleet, address, known_hosts)
    try:
        _, first, _ = run_script(client, script)
        scenario_mig(fleet.scenario_dir(address))
        _, second, _ = run_script(client, script)
    finally:
        client.close()
    assert first.splitlines()[0] == "0, 100 %, 19818 MiB, Disabled"
    mig = capture_cells(MIG_QUERY)
    assert second == f"0, [N/A], {mig['memory.used']}, Enabled\n"


def test_proxyjump_through_a_fleet_host(fleet: Fleet, known_hosts: Path) -> None:
    bastion_address, target_address = fleet.addresses[0], fleet.addresses[7]
    scenario_mig(fleet.scenario_dir(target_address))
    bastion = connect(fleet, bastion_address, known_hosts)
    try:
        transport = bastion.get_transport()
        assert transport is not None
        channel = transport.open_channel("direct-tcpip", (target_address, fleet.port), ("127.0.0.1", 0), timeout=5)
        target = connect(fleet, target_address, known_hosts, sock=channel)
        try:
            _, out, _ = run_script(target, "nvidia-smi --query-gpu=uuid,utilization.gpu --format=csv,noheader\n")
        finally:
            target.close()
    finally:
        bastion.close()
    assert out == f"{gpu_uuid(Path(target_address), 0)}, [N/A]\n"


def test_added_host_with_another_key_is_rejected_then_goes_down(fleet: Fleet, tmp_path: Path) -> None:
    address = "127.0.0.40"
    fleet.add_host(address)  # fresh host key, differs from the fleet's
    stale = fleet.write_known_hosts(tmp_path / "stale", [address], key=fleet.host_key)
    with pytest.raises(paramiko.BadHostKeyException):
        connect(fleet, address, stale)
    good = fleet.write_known_hosts(tmp_path / "good", [address])
    client = connect(fleet, address, good)
    try:
        assert run_script(client, "echo up\n")[1] == "up\n"
        fleet.remove_host(address)
        with pytest.raises((paramiko.SSHException, EOFError, OSError)):
            run_script(client, "echo still-up\n", timeout=3)
    finally:
        client.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((address, fleet.port), timeout=2).close()


def test_a_host_removed_mid_command_drops_the_connection_before_its_commands_end(
    fleet: Fleet, tmp_path: Path
) -> None:
    """A host going down cuts its connections: the client never hears how a command it was running
    ended. (Before: the command was sent SIGTERM first while sshd still forwarded, so the client got
    "killed: 143" and a clean exit status, as if someone had killed nvidia-smi on a live host; the
    web page then said "probe failed (exit 143)" instead of "unreachable", 1 run in 5.)"""
    address = "127.0.0.41"
    fleet.add_host(address)
    known = fleet.write_known_hosts(tmp_path / "known", [address])
    client = connect(fleet, address, known)
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(run_script(client, "echo started; sleep 20; echo ended by $?\n", timeout=15))
        except (paramiko.SSHException, EOFError, OSError) as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run)
    root = fleet._extra[address].proc.pid  # the sshd's reaper: every session process is under it
    try:
        worker.start()
        wait_for(lambda: "sleep 20" in _commands_under(root), 10, "the sleep")
        fleet.remove_host(address)
        worker.join(20)
    finally:
        client.close()
    assert not worker.is_alive()
    (result,) = outcome
    if isinstance(result, tuple):  # the channel closed with the transport: no exit status (-1)
        status, out, _ = result
        assert status == -1 and "ended by" not in out, result
    assert _commands_under(root) == []  # and nothing of the session is left


def _commands_under(root: int) -> list[str]:
    """Command lines of the processes under ``root``."""
    lines = []
    for pid in _descendants(root, _proc_table()):
        try:
            lines.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip())
        except OSError:
            continue
    return lines


def test_refused_address(refused_address: str, fleet_port: int) -> None:
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((refused_address, fleet_port), timeout=2).close()


def test_multi_gpu_scenario_is_consistent(fleet: Fleet) -> None:
    a, b = fleet.addresses[:2]
    scenario_healthy_multi_gpu(fleet.scenario_dir(a), 8, busy_gpus=(2, 5))
    scenario_healthy_multi_gpu(fleet.scenario_dir(b), 8, busy_gpus=(2, 5))
    uuids = {}
    for address in (a, b):
        directory = fleet.scenario_dir(address)
        query = (directory / "query-gpu.csv").read_text().splitlines()
        header = [h.split(" [")[0] for h in query[0].split(", ")]
        rows = [dict(zip(header, line.split(", "), strict=True)) for line in query[1:]]
        assert [r["index"] for r in rows] == [str(i) for i in range(8)]
        assert {r["count"] for r in rows} == {"8"}
        assert len({r["pci.bus_id"] for r in rows}) == 8
        uuids[address] = {r["uuid"]: r for r in rows}
        apps = (directory / "compute-apps.csv").read_text().splitlines()[1:]
        used = {(line.split(", ")[4], line.split(", ")[2]) for line in apps}
        assert used == {(r["uuid"], r["pci.bus_id"]) for r in rows if r["index"] in ("2", "5")}
        assert "REWRITTEN" in (directory / "SOURCES").read_text()
    assert not set(uuids[a]) & set(uuids[b])  # GPU UUIDs are unique across the fleet


def test_fixture_captures_match_their_sources() -> None:
    lines = (CAPTURES / "SOURCES.tsv").read_text().splitlines()
    listed = {line.split("\t")[0] for line in lines[1:]}
    present = {
        str(p.relative_to(CAPTURES))
        for p in CAPTURES.rglob("*")
        if p.is_file() and p.name not in ("SOURCES.tsv", "README.md")
    }
    assert listed == present
    table = capture_bytes("table/gpud-h100-80gb-x8-550.90.07-default-table.txt").decode()
    assert all(f" {gpu_bus_id(i)} " in table for i in range(8))  # multi-GPU bus ids are real ones
    corpus = CAPTURES.parents[2].parent / "shared" / "nvidia-smi-corpus"
    if corpus.is_dir():  # optional: byte-compare with the shared corpus where it is available
        for name in listed:
            if (corpus / name).exists():
                assert (corpus / name).read_bytes() == (CAPTURES / name).read_bytes(), name


def _sshd_pids_for(root: Path) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"sshd .*{root}"], capture_output=True, text=True, check=False).stdout
    return [int(p) for p in out.split()]


@pytest.mark.fleet
def test_17_host_fleet_uses_two_sshd_and_cleans_up(tmp_path: Path) -> None:
    reason = fleet_unavailable_reason()
    if reason:
        pytest.skip(reason)
    started = time.monotonic()
    with Fleet(17, first_address="127.0.1.2", job_owners=()) as big:
        startup = time.monotonic() - started
        assert len(big.sshd_pids) == 2  # ceil(17 / 16)
        assert set(big.sshd_pids) <= set(_sshd_pids_for(big.root))
        last = big.addresses[-1]
        assert last == "127.0.1.18"
        known = big.write_known_hosts(tmp_path / "known_hosts")
        client = connect(big, last, known)
        run_script(client, "echo ok\n")
        scenario_hang(big.scenario_dir(last))
        # leave a session hanging and the connection open: stop() must still clean everything up
        client.exec_command("nvidia-smi")
        time.sleep(0.3)
        root = big.root
    client.close()
    assert startup < 3
    assert _sshd_pids_for(root) == []
    assert not root.exists()
    leftovers = subprocess.run(["pgrep", "-u", "gpuwatch-mon", "-a"], capture_output=True, text=True, check=False)
    assert str(root) not in leftovers.stdout


def test_fleet_start_failure_is_clear() -> None:
    if fleet_unavailable_reason():
        with pytest.raises(FleetError):
            Fleet(1).start()
        return
    with pytest.raises(FleetError, match=r"leave 127\.0\.0\.0/8"):
        Fleet(3, first_address="127.255.255.254")


def test_local_scenario_without_ssh(fleet: Fleet, job_pids: dict[str, int]) -> None:
    """gpuwatch's ``localhost`` host runs the probe without SSH: the ``local`` scenario answers."""
    out = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,process_name", "--format=csv,noheader"],
        env=fleet.local_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.splitlines() == [
        f"{job_pids['alice']}, /root/tools/memhog",
        f"{job_pids['verylongusername']}, /root/tools/memhog",
        "11345, ./gpu_burn",
    ]
