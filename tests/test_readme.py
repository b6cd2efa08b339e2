"""The README's first commands and its cron line work as written, in a fresh setting.

A copy of the project (its tracked files) stands in for a fresh clone; the README's first
command creates a new virtual environment there and installs gpuwatch into it with pip (from the
package index, as a user's would), then runs the demo; the second writes a config (the editor is
a script here) and runs ``check``. The cron line runs under ``env -i`` with only what cron gives
a job, against a local Feishu-like server. Marked ``slow`` (a pip install, a few seconds).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from fakefeishu import FakeFeishu

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
CRON_HOME = "/home/monitor/gpuwatch"  # where the README's cron line assumes the clone is
DEAD_ADDRESS = "127.0.0.250"  # nothing listens on port 1 there

pytestmark = pytest.mark.slow


def section(title: str) -> str:
    start = README.index(f"\n{title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def fresh_clone(target: Path) -> Path:
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60
    ).stdout.split(b"\0")
    for name in filter(None, files):
        source = ROOT / name.decode()
        if source.is_file():
            (target / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name.decode())
    return target


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """The clone after the README's first command (the demo run for a few seconds): (clone, output)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the project's git checkout (to copy its tracked files)")
    clone = fresh_clone(tmp_path_factory.mktemp("clone"))
    (first,) = blocks(section("## Quick start"), "sh")[:1]
    command = first.strip()
    assert command.endswith("gpuwatch demo"), command
    command += " --for 3s --listen 127.0.0.1:0"  # the demo runs until Ctrl-C otherwise
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"  # this python3
    result = subprocess.run(["bash", "-ec", command], cwd=clone, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    yield clone, result.stdout


def test_the_first_command_installs_into_a_new_venv_and_runs_the_demo(installed: tuple[Path, str]) -> None:
    clone, out = installed
    assert (clone / ".venv" / "bin" / "gpuwatch").is_file()
    assert "gpuwatch demo: 6 hosts replayed from real nvidia-smi captures" in out
    assert "----- would send to console -----" in out  # it ran: the alerts it would send


def test_the_second_command_writes_a_config_and_checks_it(
    installed: tuple[Path, str], local_standin: Path, tmp_path: Path
) -> None:
    clone, _ = installed
    second = blocks(section("## Quick start"), "sh")[1].strip()
    assert "${EDITOR:-vi} config.yaml" in second and second.endswith(".venv/bin/gpuwatch check")
    with FakeFeishu() as server:
        config = {"hosts": ["localhost"], "feishu": {"url": server.url}, "state_dir": str(tmp_path / "state")}
        editor = tmp_path / "editor"
        editor.write_text(f"#!/bin/sh\ncat > \"$1\" <<'EOF'\n{yaml.safe_dump(config)}EOF\n", encoding="utf-8")
        editor.chmod(0o755)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["EDITOR"] = str(editor)
        result = subprocess.run(
            ["bash", "-ec", second], cwd=clone, env=env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.splitlines()[-1].startswith("ready: gpuwatch run can start: 1/1 hosts answered")
        assert server.exchanges == []


def test_the_cron_line_works_in_crons_environment(installed: tuple[Path, str], tmp_path: Path) -> None:
    clone, _ = installed
    text = blocks(section("## Running it"), "cron")[0]
    variables = dict(line.split("=", 1) for line in text.splitlines() if re.match(r"^[A-Z_]+=", line))
    (job,) = [line for line in text.splitlines() if re.match(r"^[0-9*]", line)]
    command = job.split(None, 5)[5].replace(CRON_HOME, str(clone))
    assert command.startswith(f"{clone}/.venv/bin/gpuwatch --once -c {clone}/config.yaml")
    with FakeFeishu(secret="the-bots-secret") as server:
        doc = {
            "hosts": [{"name": "dead", "address": DEAD_ADDRESS, "port": 1, "connect_timeout": "2s"}],
            "feishu": {"url": server.url, "secret_env": "FEISHU_SECRET"},
            "schedule": {"reports": [{"report": "overview", "every": "1h"}]},
        }
        (clone / "config.yaml").write_text(yaml.safe_dump(doc), encoding="utf-8")
        (clone / "config.yaml").chmod(0o600)
        assert set(variables) == {"FEISHU_SECRET"}
        cron_env = {
            "HOME": str(tmp_path),
            "LOGNAME": "monitor",
            "SHELL": "/bin/sh",
            "PATH": "/usr/bin:/bin",
            "FEISHU_SECRET": "the-bots-secret",  # as the crontab sets it
        }
        result = subprocess.run(
            ["env", "-i", *(f"{k}={v}" for k, v in cron_env.items()), "/bin/sh", "-c", command],
            cwd="/",
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, (clone / "cron.log").read_text()
        assert result.stdout == result.stderr == ""  # all of it went to the file the line names
        assert (clone / "cron.log").read_text() == ""  # nothing to say when all went well
        (overview,) = server.accepted
        assert "GPU overview" in str(overview) and "dead: NO DATA (unreachable)" in str(overview)
        assert "delivered message" in (clone / "logs" / "gpuwatch.log").read_text()  # the log: state_dir
