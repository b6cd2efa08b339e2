"""What an install as the README writes it relies on (issue 19 items 1, 3, 6): the config's
permissions that the systemd install uses are not warned about, the printed command lines run
where ``gpuwatch`` is not on the PATH, and ``check`` says when the page's port is taken."""

from __future__ import annotations

import io
import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpuwatch.cli import main
from gpuwatch.cli.common import program_words
from gpuwatch.cli.preflight import home_notes, port_problem, state_dir_finding, web_port_finding
from gpuwatch.config.load import load_config, parse_config
from gpuwatch.report import silence_command
from gpuwatch.rules import AlertKey
from gpuwatch.statedir import Holder

ROOT = Path(__file__).resolve().parent.parent


# main() installs log handlers on the root logger: conftest.restore_logging takes them away afterwards.
pytestmark = pytest.mark.usefixtures("restore_logging")


def write(tmp_path: Path, text: str, mode: int) -> Path:
    path = tmp_path / f"config-{mode:o}.yaml"
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


SECRET_CONFIG = "hosts: [a]\nfeishu: {url: 'https://open.feishu.cn/open-apis/bot/v2/hook/x', secret: s3cret}\n"


def test_a_config_readable_by_its_group_is_not_warned_about(tmp_path: Path) -> None:
    """0640 root:gpuwatch, as the systemd install makes it: the service's group reads it."""
    assert load_config(write(tmp_path, SECRET_CONFIG, 0o640)).warnings == ()
    assert load_config(write(tmp_path, SECRET_CONFIG, 0o600)).warnings == ()


def test_a_config_readable_or_writable_by_everyone_is(tmp_path: Path) -> None:
    (readable,) = load_config(write(tmp_path, SECRET_CONFIG, 0o644)).warnings
    assert (
        "readable by other users and holds secrets (feishu.secret, feishu.url)" in readable
        and "s3cret'" not in readable
    )
    assert "chmod 600" in readable and "'chmod 640' with the group the service runs as" in readable
    (writable,) = load_config(write(tmp_path, "hosts: [a]\n", 0o602)).warnings
    assert writable.endswith(
        f"is writable by every user: anyone can change where gpuwatch connects and sends; "
        f"run 'chmod o-w {tmp_path / 'config-602.yaml'}'"
    )
    assert load_config(write(tmp_path, "hosts: [a]\n", 0o644)).warnings == ()  # no secrets: nothing to hide


# ---------------------------------------------------------------- the printed command line


def test_the_printed_program_is_gpuwatch_only_where_that_name_runs_this_one(tmp_path: Path) -> None:
    venv = tmp_path / "opt" / "bin"
    venv.mkdir(parents=True)
    program = venv / "gpuwatch"
    program.write_text("#!/bin/sh\n")
    link = tmp_path / "usr-local-bin-gpuwatch"
    link.symlink_to(program)
    other = tmp_path / "other-gpuwatch"
    other.write_text("#!/bin/sh\n")

    # systemd or cron: the venv is not on the PATH: the absolute path, which runs as printed
    assert program_words(str(program), lambda name: None) == (str(program),)
    # the README's symlink step: /usr/local/bin/gpuwatch is this one
    assert program_words(str(program), lambda name: str(link)) == ("gpuwatch",)
    # another gpuwatch first on the PATH: it is not this one, so the path
    assert program_words(str(program), lambda name: str(other)) == (str(program),)
    # run as `gpuwatch` from the PATH
    assert program_words("gpuwatch", lambda name: str(link)) == ("gpuwatch",)
    # python -m gpuwatch with none on the PATH
    main_py = "/x/site-packages/gpuwatch/__main__.py"
    assert program_words(main_py, lambda name: None, "/usr/bin/python3") == ("/usr/bin/python3", "-m", "gpuwatch")
    assert program_words(main_py, lambda name: str(link)) == ("gpuwatch",)


def test_the_mute_line_with_an_absolute_program_runs_as_printed(tmp_path: Path) -> None:
    key = AlertKey(rule="host_down", host="gpu-a")
    config = "/etc/gpu watch/config.yaml"
    line = silence_command([key], config, ("/opt/gpuwatch/bin/gpuwatch",))
    assert line == (
        "/opt/gpuwatch/bin/gpuwatch -c '/etc/gpu watch/config.yaml' silence add --rule host_down --host gpu-a "
        "--for 24h --comment acknowledged"
    )
    assert silence_command([key], None, (sys.executable, "-m", "gpuwatch")).startswith(
        f"{sys.executable} -m gpuwatch silence add --rule host_down"
    )


def test_run_prints_the_absolute_path_when_gpuwatch_is_not_on_the_path(tmp_path: Path) -> None:
    """As under systemd or cron: the venv's bin/gpuwatch started by its path, PATH without it. The
    console (--dry-run) prints the alert with its ack line, and that line runs as printed."""
    bin_dir = Path(sys.executable).parent
    program = bin_dir / "gpuwatch"
    if not program.exists():
        pytest.skip(f"no gpuwatch script beside {sys.executable} (bash scripts/test installs one in .venv)")
    doc: dict[str, Any] = {
        "hosts": [{"name": "dead", "address": "127.0.0.1", "port": 9, "connect_timeout": "2s"}],
        "state_dir": str(tmp_path / "state"),
        "feishu": {"url": "http://127.0.0.1:9/hook/x"},
        "schedule": {"reports": []},
        "alerts": {"host_down": {"after": 1}, "command_lines": "all"},
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(doc), encoding="utf-8")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    run = subprocess.run(
        [str(program), "--once", "--dry-run", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    marker = "an admin can acknowledge it: "
    acks = [line.split(marker, 1)[1] for line in run.stdout.splitlines() if marker in line]
    assert acks == [f"{program} -c {config} ack --rule host_down --host dead"]
    # the same run for real keeps the alert state (a dry run keeps nothing); then the line, pasted
    subprocess.run([str(program), "--once", "-c", str(config)], capture_output=True, timeout=60, env=env, cwd=tmp_path)
    pasted = subprocess.run(["sh", "-c", acks[0]], capture_output=True, text=True, timeout=60, env=env, cwd="/")
    assert pasted.returncode == 0, pasted.stdout + pasted.stderr
    assert pasted.stdout.startswith("ack #1 added")


# ---------------------------------------------------------------- check: the web port


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_check_says_the_web_port_is_in_use_and_run_exits_2(busy_port: int, tmp_path: Path) -> None:
    assert port_problem("127.0.0.1", busy_port) == (
        f"port {busy_port} is in use by another process (`ss -ltnp 'sport = :{busy_port}'` names it)"
    )
    web = parse_config({"hosts": ["a"], "web": {"listen": f"127.0.0.1:{busy_port}"}}).web
    assert web is not None
    finding = web_port_finding(web, None)
    assert not finding.ok and finding.line().startswith(
        f"web: FAILED: cannot listen on 127.0.0.1:{busy_port}: port {busy_port} is in use by another process"
    )
    holder = Holder(pid=4242, host="", command="gpuwatch run", since=None)
    assert web_port_finding(web, holder).ok  # the running gpuwatch's own page

    doc = {
        "hosts": [{"name": "dead", "address": "127.0.0.1", "port": 9, "connect_timeout": "1s"}],
        "state_dir": str(tmp_path / "state"),
        "web": {"listen": f"127.0.0.1:{busy_port}"},
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(doc), encoding="utf-8")
    config.chmod(0o600)
    out = io.StringIO()
    assert main(["check", "-c", str(config)], out=out) == 2
    assert f"web: FAILED: cannot listen on 127.0.0.1:{busy_port}: port {busy_port} is in use" in out.getvalue()
    run = subprocess.run(
        [sys.executable, "-m", "gpuwatch", "run", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert run.returncode == 2
    assert f"port {busy_port} is in use by another process; stop it or set web.listen to a free port" in run.stderr
    assert "Traceback" not in run.stderr


def test_check_says_a_free_web_port_is_free(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    web = parse_config({"hosts": ["a"], "web": {"listen": f"127.0.0.1:{port}"}}).web
    assert web is not None
    assert web_port_finding(web, None).line() == f"web: OK: the page will listen on 127.0.0.1:{port} (the port is free)"


def test_check_says_when_a_key_path_with_a_tilde_is_not_the_service_users(tmp_path: Path) -> None:
    """root checks the service's config: ``~`` is root's home, not that of the state_dir's owner."""
    if os.geteuid() != 0:
        pytest.skip("needs root (a state_dir owned by another user)")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, pwd.getpwnam("nobody").pw_uid, -1)
    nobody_home = pwd.getpwnam("nobody").pw_dir
    doc = {"hosts": ["a", "b"], "ssh": {"key_file": "~/.ssh/id_ed25519"}, "state_dir": str(state)}
    config = parse_config(doc)
    (note,) = home_notes(config)
    assert note == (
        f"ssh.key_file {os.path.expanduser('~/.ssh/id_ed25519')} is in the home of this user (root), not of nobody "
        f"(the owner of state_dir, home {nobody_home}): '~' in the config is the home of whoever runs gpuwatch; "
        "write the absolute path of the service's key"
    )
    assert note in state_dir_finding(config).notes  # said by check
    absolute = parse_config({**doc, "ssh": {"key_file": "/var/lib/gpuwatch/.ssh/id_ed25519"}})
    assert home_notes(absolute) == []
    os.chown(state, 0, -1)
    assert home_notes(config) == []  # this user's own state_dir: ~ is the service's home


# ---------------------------------------------------------------- the test command on a stock Debian/Ubuntu

SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def test_the_test_command_runs_everything_from_its_own_environment() -> None:
    """CI runs the README's command; that command runs pytest, ruff (lint and format) and mypy
    with the interpreter of the environment scripts/venv.sh made, never the system's."""
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("exec bash scripts/test")
    script = (ROOT / "scripts" / "test").read_text()
    code = [line for line in script.splitlines() if not line.lstrip().startswith("#")]
    assert ". scripts/venv.sh" in script and not any("pip install" in line for line in code)
    runs = [line for line in code if " -m " in line]
    assert runs == [
        '"$python" -m pytest "$@"',
        '"$python" -m ruff check src tests bench',
        '"$python" -m ruff format --check src tests bench',
        '"$python" -m mypy src/',
    ]
    assert "/.venv/" in (ROOT / ".gitignore").read_text().splitlines() or ".venv/" in (ROOT / ".gitignore").read_text()


@pytest.mark.slow
def test_the_environment_is_made_from_the_system_python_and_reused(tmp_path: Path) -> None:
    """As on a stock Debian 12 (PATH without pyenv: /usr/bin/python3, which refuses pip install):
    a fresh copy makes its .venv from it and installs into it; a second run reuses it at once."""
    system_python = Path("/usr/bin/python3")
    if not system_python.exists() or shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs /usr/bin/python3 and the project's git checkout")
    clone = copy_tracked_files(tmp_path / "clone")
    env = ["env", "-i", f"PATH={SYSTEM_PATH}", f"HOME={Path.home()}"]  # HOME: pip's own settings (its index)
    first = subprocess.run([*env, "bash", "scripts/venv.sh"], cwd=clone, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    lines = first.stdout.splitlines()
    assert lines[0] == f"making the virtual environment {clone}/.venv (from /usr/bin/python3)"
    assert lines[-1] == f"{clone}/.venv/bin/python"
    probe = subprocess.run(
        [*env, f"{clone}/.venv/bin/python", "-c", "import sys, gpuwatch, pytest, ruff, mypy; "
         "print(sys.base_prefix, gpuwatch.__file__)"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert probe.stdout.split() == ["/usr", f"{clone}/src/gpuwatch/__init__.py"], probe.stderr
    started = time.monotonic()
    again = subprocess.run([*env, "bash", "scripts/venv.sh"], cwd=clone, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout == f"{clone}/.venv/bin/python\n", again.stdout + again.stderr
    assert time.monotonic() - started < 30  # nothing installed again


def copy_tracked_files(target: Path) -> Path:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60)
    for name in filter(None, listed.stdout.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target
