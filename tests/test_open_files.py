"""The open files a fleet needs, and the process limit on them: raised at start, and a fleet that
cannot fit refused in one line (exit 2), before anything is polled. Real processes with real
limits (``resource.setrlimit`` in the child), no mocks."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from gpuwatch.config.load import parse_config
from gpuwatch.ssh import FDS_BASE, FDS_PER_HOST, FDS_PER_JUMP, fds_needed

SRC = str(Path(__file__).resolve().parent.parent / "src")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _limited(soft: int, hard: int) -> object:
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return preexec


def _hard_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def test_fds_needed_counts_each_ssh_host_and_its_jump_connection() -> None:
    config = parse_config(
        {
            "hosts": [
                {"name": "a"},
                {"name": "b", "proxy_jump": "bastion"},
                "localhost",
            ],
        }
    )
    assert fds_needed(config.hosts) == FDS_BASE + 2 * FDS_PER_HOST + FDS_PER_JUMP


@pytest.mark.skipif(_hard_limit() < 2048, reason="needs a hard open files limit of 2048 or more")
def test_the_soft_limit_is_raised_to_the_hard_limit() -> None:
    code = textwrap.dedent(
        """
        import resource
        from gpuwatch.ssh import raise_open_files_limit
        print(raise_open_files_limit(), resource.getrlimit(resource.RLIMIT_NOFILE))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=_env(),
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=_limited(256, 2048),
    )
    assert done.stdout.strip() == "(2048, 2048) (2048, 2048)"


def test_run_refuses_a_fleet_that_cannot_fit_in_one_line_with_the_fix(tmp_path: Path) -> None:
    hosts = [{"name": f"gpu{i:03d}", "address": f"127.0.3.{i}"} for i in range(1, 201)]
    config = tmp_path / "gpuwatch.yaml"
    config.write_text(
        yaml.safe_dump(
            {"hosts": hosts, "state_dir": str(tmp_path / "state"), "feishu": {"url": "http://127.0.0.1:9/x"}}
        )
    )
    config.chmod(0o600)
    done = subprocess.run(
        [sys.executable, "-m", "gpuwatch", "run", "-c", str(config)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=_limited(300, 300),
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    needed = FDS_BASE + 200 * FDS_PER_HOST
    assert lines == [
        f"gpuwatch: config error: 200 hosts need up to {needed} open files, but this process may open only 300 "
        "(ulimit -n; hard limit 300): raise it, e.g. LimitNOFILE=4096 in the systemd unit, or "
        "'ulimit -Hn 4096; ulimit -n 4096' as root before starting gpuwatch"
    ]
    assert not (tmp_path / "state" / "gpuwatch.db").exists()  # refused before anything was opened
