"""ssh.py without a fleet: which setting wins, ProxyJump specs, reconnect backoff, the probe script."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import paramiko
import pytest

from gpuwatch.config import HostConfig, SshSettings, parse_config
from gpuwatch.model import HostErrorKind
from gpuwatch.probe import build_script, split_sections
from gpuwatch.ssh import HostFailure, HostKeyStore, SshConnection, parse_jump, resolve_target


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
