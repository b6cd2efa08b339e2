"""ssh.py without a fleet: which setting wins, ProxyJump specs, reconnect backoff, the probe script,
the bounds on a local probe, known_hosts files, the handshake slots and which host is this machine."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest

from gpuwatch.config import HostConfig, SshSettings
from gpuwatch.config.load import parse_config
from gpuwatch.model import HostErrorKind
from gpuwatch.probe import build_script, split_sections
from gpuwatch.ssh import (
    MAX_STDERR_BYTES,
    MAX_STDOUT_BYTES,
    HandshakeSlots,
    HostFailure,
    HostKeyStore,
    LocalRunner,
    SshConnection,
    parse_jump,
    resolve_target,
    session_script,
)
from processes import kill_marked, marked, new_marker
from waiting import wait_for


def ssh_config(text: str) -> paramiko.SSHConfig:
    return paramiko.SSHConfig.from_text(text)


SSH_CONFIG = """
Host gpu-a
  HostName 10.1.2.3
  User alice
  Port 2200
  ProxyJump bastion-user@bastion:2022
Host *
  User everyone
"""


def test_ssh_config_beats_fleet_defaults_and_host_entry_beats_both() -> None:
    config = parse_config(
        {
            "hosts": ["gpu-a", {"name": "gpu-a2", "address": "gpu-a", "user": "bob"}, "other"],
            "ssh": {"user": "monitor", "port": 22},
        }
    )
    bare, overridden, other = config.hosts
    parsed = ssh_config(SSH_CONFIG)
    t = resolve_target(bare.name, bare.ssh, bare.explicit, parsed, bare.address)
    assert (t.hostname, t.user, t.port, t.proxy_jump) == ("10.1.2.3", "alice", 2200, "bastion-user@bastion:2022")
    t = resolve_target("gpu-a", overridden.ssh, overridden.explicit, parsed, None)
    assert (t.user, t.port) == ("bob", 2200)  # the host's own 'user' wins; Port still from ~/.ssh/config
    t = resolve_target(other.name, other.ssh, other.explicit, parsed, other.address)
    assert (t.hostname, t.user, t.port, t.proxy_jump) == ("other", "everyone", 22, None)
    t = resolve_target(other.name, other.ssh, other.explicit, None, other.address)
    assert (t.user, t.port) == ("monitor", 22)


def test_use_ssh_config_false_ignores_it() -> None:
    config = parse_config({"hosts": ["gpu-a"], "ssh": {"user": "monitor", "use_ssh_config": False}})
    host = config.hosts[0]
    t = resolve_target(host.name, host.ssh, host.explicit, ssh_config(SSH_CONFIG), host.address)
    assert (t.hostname, t.user, t.port, t.proxy_jump) == ("gpu-a", "monitor", 22, None)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("bastion", (None, "bastion", None)),
        ("me@bastion", ("me", "bastion", None)),
        ("me@bastion:2022", ("me", "bastion", 2022)),
        ("ssh://me@bastion:2022", ("me", "bastion", 2022)),
        ("me@[::1]:2022", ("me", "::1", 2022)),
        ("first:22,second:23", (None, "first", 22)),
    ],
)
def test_jump_specs(spec: str, expected: tuple[str | None, str, int | None]) -> None:
    assert parse_jump(spec) == expected


def refused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again: nothing listens there


def test_reconnect_backs_off_after_repeated_failures(tmp_path: Path) -> None:
    now = [1000.0]
    host = HostConfig(
        name="down",
        address="127.0.0.1",
        ssh=SshSettings(port=refused_port(), connect_timeout=2, use_ssh_config=False),
        explicit=frozenset({"port"}),
    )
    conn = SshConnection(host, HostKeyStore(tmp_path / "known_hosts"), clock=lambda: now[0])

    def attempt() -> str:
        with pytest.raises(HostFailure) as info:
            conn.transport()
        assert info.value.kind is HostErrorKind.UNREACHABLE
        return info.value.message

    assert "next try" not in attempt()  # first failure: the next poll tries again at once
    assert "next try" not in attempt()  # second failure: now it backs off
    assert "next try in 2s" in attempt()  # within the backoff: no connection attempt at all
    now[0] += 2.5
    assert "next try" not in attempt()  # tried again: third failure, 4 s
    now[0] += 1
    assert "next try in 3s" in attempt()
    assert conn.failures == 3


def test_a_server_that_accepts_tcp_but_never_speaks_ssh_is_unreachable_with_why(tmp_path: Path) -> None:
    """A port that answers TCP and then says nothing (a hung sshd, the wrong service): paramiko
    gives up waiting for the handshake and then fails to log in ("No existing session"); the
    host is unreachable because no SSH banner came, said as such."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        port = silent.getsockname()[1]
        host = HostConfig(
            name="silent",
            address="127.0.0.1",
            ssh=SshSettings(port=port, connect_timeout=1.5, use_ssh_config=False),
            explicit=frozenset({"port"}),
        )
        conn = SshConnection(host, HostKeyStore(tmp_path / "known_hosts"))
        started = time.monotonic()
        with pytest.raises(HostFailure) as info:
            conn.transport()
    assert time.monotonic() - started < 10
    assert info.value.kind is HostErrorKind.UNREACHABLE, info.value.message
    assert info.value.message == f"127.0.0.1:{port} accepted TCP but sent no SSH banner within 1.5s"


def test_probe_script_is_posix_sh_and_reports_each_step(tmp_path: Path) -> None:
    """The script runs under dash (Debian's /bin/sh) and reports a missing nvidia-smi as data."""
    script = build_script(30, nvidia_smi="/nonexistent/nvidia-smi")
    for shell in ("sh", "dash", "bash"):
        try:
            out = subprocess.run([shell, "-s"], input=script, capture_output=True, text=True, timeout=20).stdout
        except FileNotFoundError:
            continue
        sections = split_sections(out)
        assert sections is not None and sections["gpu"].exit_status == 127
    hung = tmp_path / "nvidia-smi"
    hung.write_text("#!/bin/sh\nexec sleep 60\n")
    hung.chmod(0o755)
    started = time.monotonic()
    out = subprocess.run(["sh", "-s"], input=build_script(3, str(hung)), capture_output=True, text=True, timeout=30)
    sections = split_sections(out.stdout)
    assert sections is not None and sections["gpu"].exit_status == 124  # killed by timeout(1) on the host
    assert "apps" not in sections  # a hung driver is not asked a second question
    assert time.monotonic() - started < 3  # 40% of the 3 s budget, not the 60 s hang


# ---------------------------------------------------------------- a local probe is bounded


@pytest.fixture
def marker() -> Iterator[str]:
    """A unique ``sleep`` argument to find what one test started; whatever still has it is killed after."""
    value = new_marker()
    yield value
    kill_marked(value)


def test_local_probe_that_floods_its_output_is_cut_at_the_cap() -> None:
    runner = LocalRunner()
    with pytest.raises(HostFailure) as info:
        runner.run_script("yes gpuwatch | head -c 50000000\n", 30)
    assert info.value.kind is HostErrorKind.UNPARSEABLE
    assert "more than 4 MiB" in info.value.message and "'gpuwatch'" in info.value.message
    with pytest.raises(HostFailure) as info:
        runner.run_script("head -c 1000000 /dev/zero >&2\n", 30)
    assert info.value.kind is HostErrorKind.UNPARSEABLE and "64 KiB" in info.value.message
    # below the caps, everything arrives
    fill = "head -c {} /dev/zero | tr '\\0' {}"
    result = runner.run_script(f"{fill.format(MAX_STDOUT_BYTES, 'x')}; {fill.format(MAX_STDERR_BYTES, 'e')} >&2\n", 30)
    assert result.stdout == "x" * MAX_STDOUT_BYTES and result.stderr == "e" * MAX_STDERR_BYTES


def test_local_probe_past_its_deadline_leaves_no_process_behind(marker: str) -> None:
    """A child that ignores SIGTERM and holds stdout, and one in its own process group (as timeout(1)
    makes one): the run ends at its deadline and nothing it started lives on."""
    script = f"sh -c 'trap \"\" TERM HUP INT; exec sleep {marker}' &\ntimeout 1000 sleep {marker} &\nsleep {marker}\n"
    with pytest.raises(HostFailure) as info:
        LocalRunner().run_script(script, 1.0)
    assert info.value.kind is HostErrorKind.PROBE_TIMEOUT
    wait_for(lambda: not marked(marker), 5, "the probe's processes to be gone")


def test_local_probe_that_ends_but_leaves_a_child_holding_its_output(marker: str) -> None:
    result = LocalRunner().run_script(f"sleep {marker} &\necho done\n", 5)
    assert result.stdout == "done\n" and result.exit_status == 0
    wait_for(lambda: not marked(marker), 5, "the leftover child to be gone")


@pytest.mark.parametrize("shell", ["sh", "dash", "bash"])
def test_the_session_wrapper_ends_everything_its_script_started(shell: str, marker: str) -> None:
    """What an SSH host runs (``sh -s`` reading the wrapped script), here under each POSIX shell:
    the script's output and status come through, and nothing it started outlives it or its deadline."""
    if shutil.which(shell) is None:
        pytest.skip(f"no {shell} here")
    script = (
        f"sh -c 'trap \"\" TERM HUP; exec sleep {marker}' &\n"
        f"timeout 1000 sleep {marker} &\n"
        "echo out; echo err >&2; exit 3\n"
    )
    done = subprocess.run([shell, "-s"], input=session_script(script, 30), capture_output=True, text=True, timeout=20)
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")
    wait_for(lambda: not marked(marker), 5, "the script's children to be gone")
    hung = session_script(f"sh -c 'trap \"\" TERM HUP; exec sleep {marker}' &\necho started\nsleep {marker}\n", 1)
    done = subprocess.run([shell, "-s"], input=hung, capture_output=True, text=True, timeout=20)
    assert (done.returncode, done.stdout, done.stderr) == (137, "started\n", "")  # SIGKILL at the deadline
    wait_for(lambda: not marked(marker), 5, "the script's children to be gone")


# ---------------------------------------------------------------- known_hosts files


def public_line(name: str, key: paramiko.PKey) -> str:
    return f"{name} {key.get_name()} {key.get_base64()}"


def test_known_hosts_lines_gpuwatch_cannot_read_are_skipped_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good, revoked, ca, own_key = (paramiko.ECDSAKey.generate() for _ in range(4))
    user_file = tmp_path / "user_known_hosts"
    user_file.write_text(
        "# a comment\n"
        f"@cert-authority *.example.com {ca.get_name()} {ca.get_base64()}\n"
        f"{public_line('good.example.com,10.0.0.1', good)}\n"
        f"@revoked {public_line('*', revoked)}\n"
        "this is not a known_hosts line\n"
        f"{public_line('cut.example.com', good)[:60]}\n"
    )
    own_file = tmp_path / "state" / "known_hosts"
    own_file.parent.mkdir()
    own_file.write_text(f"{public_line('[gpu-b]:2222', own_key)}\n[gpu-c]:2222 ssh-ed25519 AAAAC3Nza")
    caplog.set_level(logging.WARNING, logger="gpuwatch")
    store = HostKeyStore(own_file, (user_file,))
    assert store.where_known("good.example.com") == user_file and store.where_known("10.0.0.1") == user_file
    assert store.where_known("[gpu-b]:2222") == own_file
    assert store.where_known("cut.example.com") is None
    assert store.is_revoked(revoked) and not store.is_revoked(good)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    user_warning, own_warning = warnings
    assert str(user_file) in user_warning and "line 2 (@cert-authority" in user_warning
    assert "line 5" in user_warning and "line 6" in user_warning and "line 4" not in user_warning
    assert str(own_file) in own_warning and "line 2" in own_warning


def test_recorded_host_keys_are_written_whole_private_and_kept(tmp_path: Path) -> None:
    first, second, kept = (paramiko.ECDSAKey.generate() for _ in range(3))
    old_umask = os.umask(0o002)
    try:
        own_file = tmp_path / "new" / "state" / "known_hosts"
        HostKeyStore(own_file).record("[gpu-a]:22", first)
        assert stat.S_IMODE(own_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(own_file.parent.stat().st_mode) == 0o700

        # a file cut off by an earlier crash, readable by others: kept, completed, made private
        cut = tmp_path / "old" / "known_hosts"
        cut.parent.mkdir(mode=0o755)
        cut.write_text(f"{public_line('kept', kept)}\n[gpu-c]:22 ssh-ed25519 AAAAC3Nza")
        cut.chmod(0o644)
        HostKeyStore(cut).record("gpu-b", second)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(cut.stat().st_mode) == 0o600
    assert stat.S_IMODE(cut.parent.stat().st_mode) == 0o755  # an existing directory is left as it is
    reread = HostKeyStore(cut)
    assert reread.where_known("kept") == cut and reread.where_known("gpu-b") == cut
    assert cut.read_text().splitlines()[1] == "[gpu-c]:22 ssh-ed25519 AAAAC3Nza"
    assert sorted(p.name for p in cut.parent.iterdir()) == ["known_hosts"]  # no temp file left over


def test_parallel_first_connections_record_every_key(tmp_path: Path) -> None:
    own_file = tmp_path / "known_hosts"
    store = HostKeyStore(own_file)
    keys = {f"gpu-{i}": paramiko.ECDSAKey.generate() for i in range(20)}
    threads = [threading.Thread(target=store.record, args=(name, key)) for name, key in keys.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    reread = HostKeyStore(own_file)
    assert all(reread.where_known(name) == own_file for name in keys)


# ---------------------------------------------------------------- handshake slots


def test_waiting_for_a_handshake_slot_is_bounded(tmp_path: Path) -> None:
    host = HostConfig(
        name="queued",
        address="127.0.0.1",
        ssh=SshSettings(port=refused_port(), connect_timeout=0.2, use_ssh_config=False),
        explicit=frozenset({"port"}),
    )
    slots = threading.BoundedSemaphore(1)
    slots.acquire()  # another host holds the only slot for longer than this host may wait
    conn = SshConnection(host, HostKeyStore(tmp_path / "known_hosts"), handshakes=slots)
    with pytest.raises(HostFailure) as info:
        conn.transport()
    assert info.value.kind is HostErrorKind.UNREACHABLE
    assert "free SSH handshake slot" in info.value.message
    slots.release()
    with pytest.raises(HostFailure) as info:
        conn.transport()
    assert "connection refused" in info.value.message  # with a slot, it really tries
    assert slots.acquire(blocking=False)  # and gave the slot back


def test_a_host_waits_for_a_handshake_slot_while_the_line_moves() -> None:
    """1,000 hosts logging in at start: a host in line keeps waiting as long as handshakes end
    (past its own bound), and gives up only when none ends for that long."""
    slots = HandshakeSlots(1)
    assert slots.acquire(timeout=0.1)  # a login that takes 0.3 s
    got: list[tuple[str, bool, float]] = []
    started = time.monotonic()

    def login(name: str) -> None:
        ok = slots.acquire(timeout=0.4)
        got.append((name, ok, time.monotonic() - started))
        if ok:
            time.sleep(0.3)
            slots.release()

    waiting = [threading.Thread(target=login, args=(n,)) for n in ("first", "second")]
    for t in waiting:
        t.start()
    time.sleep(0.3)
    slots.release()
    for t in waiting:
        t.join(5)
    assert [ok for _, ok, _ in got] == [True, True]
    assert got[-1][2] >= 0.55  # waited past its 0.4 s: the line moved at 0.3 s

    stalled = HandshakeSlots(1)
    assert stalled.acquire()
    before = time.monotonic()
    assert not stalled.acquire(timeout=0.2)  # nothing ends: gives up after its bound
    assert 0.15 <= time.monotonic() - before < 1.0


# ---------------------------------------------------------------- this machine or an SSH host


@pytest.mark.parametrize(
    ("entry", "local"),
    [
        ("localhost", True),
        ({"name": "localhost"}, True),
        ({"name": "localhost", "nvidia_smi": "/opt/nvidia/bin/nvidia-smi", "command_timeout": "5s"}, True),
        ("127.0.0.1", False),
        ("::1", False),
        ("local", False),
        ({"name": "localhost", "port": 2222}, False),
        ({"name": "localhost", "user": "bob"}, False),
        ({"name": "localhost", "proxy_jump": "bastion"}, False),
        ({"name": "localhost", "address": "127.0.0.1"}, False),
        ({"name": "tunnel", "address": "127.0.0.1", "port": 2222}, False),
        ({"name": "tunnel", "address": "localhost"}, False),
        ({"address": "localhost"}, False),
    ],
)
def test_only_the_bare_name_localhost_is_this_machine(entry: Any, local: bool) -> None:
    host = parse_config({"hosts": [entry], "ssh": {"port": 2200, "user": "monitor"}}).hosts[0]
    assert host.local is local
