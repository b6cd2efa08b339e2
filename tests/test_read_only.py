"""Commands that only read (``status``, ``check``, ``alerts``) work for a user who cannot write the
state directory: they say what they could not record (the log file), and go on.

Two such users, as real processes (``python -m gpuwatch``; root needed, skipped otherwise):

* the owner, with the state directory on a read-only bind mount;
* ``nobody``, given only the capability to read any file (``setpriv --ambient-caps
  +dac_read_search``: it can read the interpreter under /root and the 0600 state, as an admin in
  the service's group could, and can write nothing of root's).

The hosts are ``localhost`` replaying real captures through the stand-in nvidia-smi, and a
loopback address where nothing listens (``host_down`` fires for it, so ``alerts`` has news).
"""

from __future__ import annotations

import contextlib
import grp
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from fakefeishu import FakeFeishu

DEAD_ADDRESS = "127.0.0.250"


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (a bind mount, another user)")


@pytest.fixture
def state_with_an_alert(tmp_path: Path, local_standin: Path) -> Iterator[Path]:
    """A config whose state_dir a first ``--once`` (as root) has filled: a firing host_down."""
    needs_root()
    with FakeFeishu() as server:
        doc = {
            "hosts": ["localhost", {"name": "dead", "address": DEAD_ADDRESS, "port": 1, "connect_timeout": "2s"}],
            "ssh": {"use_ssh_config": False, "known_hosts": str(tmp_path / "known_hosts")},
            "state_dir": str(tmp_path / "state"),
            "feishu": {"url": server.url},
            "schedule": {"poll_every": "1m", "reports": []},
            "alerts": {"host_down": {"after": 1}},
        }
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump(doc), encoding="utf-8")
        config.chmod(0o600)
        first = gpuwatch([], "--once", "-c", str(config), cwd=tmp_path)
        assert first.returncode == 0, first.stderr
        assert len(server.accepted) == 1  # the host_down alert
        yield config


def gpuwatch(prefix: list[str], *argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "gpuwatch", *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


@contextlib.contextmanager
def read_only_mount(directory: Path) -> Iterator[None]:
    subprocess.run(["mount", "--bind", str(directory), str(directory)], check=True, capture_output=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(directory)], check=True, capture_output=True)
        yield
    finally:
        subprocess.run(["umount", str(directory)], check=False)


NOBODY = [
    "setpriv",
    "--reuid=nobody",
    "--regid=nogroup",
    "--clear-groups",
    "--inh-caps=+dac_read_search",
    "--ambient-caps=+dac_read_search",
]


def _check_the_three(config: Path, prefix: list[str], user: str, why: str) -> None:
    state = config.parent / "state"
    log_before = (state / "gpuwatch.log").read_bytes()
    note = f"gpuwatch: note: nothing was logged to a file: state_dir {state}: cannot open gpuwatch.log: {why}\n"

    status = gpuwatch(prefix, "status", "-c", str(config), cwd=config.parent)
    assert status.returncode == 0, status.stderr
    assert "localhost  0    NVIDIA H100 80GB HBM3" in status.stdout
    assert "dead" in status.stdout and "DOWN unreachable" in status.stdout
    assert status.stderr.endswith(note) and "Traceback" not in status.stderr

    alerts = gpuwatch(prefix, "alerts", "-c", str(config), cwd=config.parent)
    assert alerts.returncode in (0, 1), alerts.stderr  # (1: "something fires", for scripts)
    assert "FIRING" in alerts.stdout and "host_down" in alerts.stdout, alerts.stdout
    assert alerts.stderr == note

    check = gpuwatch(prefix, "check", "-c", str(config), cwd=config.parent)
    assert check.returncode == 2, check.stdout + check.stderr
    lines = check.stdout.splitlines()
    assert f"state_dir {state}: FAILED: this user ({user}) cannot write it: {why}; " in check.stdout
    assert any(line.startswith("localhost: OK: 4 GPUs") for line in lines)  # it went on
    assert lines[-1] == (
        f"not ready: state_dir {state}: this user ({user}) cannot write it: {why}; "
        "1 of 2 hosts did not answer: dead (unreachable)"
    )
    assert check.stderr == note
    assert (state / "gpuwatch.log").read_bytes() == log_before  # nothing written, nothing broken


def test_read_only_commands_on_a_read_only_mount(state_with_an_alert: Path) -> None:
    state = state_with_an_alert.parent / "state"
    with read_only_mount(state):
        _check_the_three(state_with_an_alert, [], "root", "read-only file system")


def test_read_only_commands_as_a_user_who_may_not_write_the_state_dir(state_with_an_alert: Path) -> None:
    _check_the_three(state_with_an_alert, NOBODY, "nobody", "permission denied")


def test_a_state_dir_this_user_cannot_create(tmp_path: Path, local_standin: Path) -> None:
    needs_root()
    doc = {"hosts": ["localhost"], "state_dir": str(tmp_path / "srv" / "state"), "feishu": {"url": "http://x/hook/t"}}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(doc), encoding="utf-8")
    status = gpuwatch(NOBODY, "status", "-c", str(config), cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert "localhost  0    NVIDIA H100 80GB HBM3" in status.stdout
    check = gpuwatch(NOBODY, "check", "-c", str(config), cwd=tmp_path)
    assert check.returncode == 2
    assert check.stdout.splitlines()[-1] == (
        f"not ready: state_dir {tmp_path / 'srv' / 'state'}: does not exist, and this user (nobody) cannot create "
        f"it in {tmp_path}: permission denied"
    )
    assert not (tmp_path / "srv").exists()


# ---------------------------------------------------------------- a state directory this user cannot enter

NOBODY_PLAIN = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]  # no capability at all


@pytest.fixture
def closed_state(local_standin: Path) -> Iterator[Path]:
    """As the systemd install leaves it for another admin: a config the admin's group may read
    (0640) in a directory anyone may enter, and beside it a 0700 state_dir of another user (root)
    holding a firing host_down. Yields the config."""
    needs_root()
    probe = subprocess.run([*NOBODY_PLAIN, sys.executable, "-m", "gpuwatch", "-V"], capture_output=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"nobody cannot run {sys.executable} with gpuwatch (bash scripts/test runs from a .venv it can)")
    top = Path(tempfile.mkdtemp(prefix="gpuwatch-closed-", dir="/tmp"))
    top.chmod(0o755)
    try:
        with FakeFeishu() as server:
            doc = {
                "hosts": ["localhost", {"name": "dead", "address": DEAD_ADDRESS, "port": 1, "connect_timeout": "2s"}],
                "ssh": {"use_ssh_config": False},
                "state_dir": str(top / "state"),
                "feishu": {"url": server.url},
                "schedule": {"poll_every": "1m", "reports": []},
                "alerts": {"host_down": {"after": 1}},
            }
            config = top / "config.yaml"
            config.write_text(yaml.safe_dump(doc), encoding="utf-8")
            config.chmod(0o640)
            os.chown(config, 0, grp.getgrnam("nogroup").gr_gid)
            first = gpuwatch([], "--once", "-c", str(config), cwd=top)
            assert first.returncode == 0, first.stderr
            assert (top / "state").stat().st_mode & 0o777 == 0o700
            yield config
    finally:
        shutil.rmtree(top)


@pytest.mark.parametrize("words", [["alerts"], ["silence", "list"]], ids=" ".join)
def test_a_state_dir_this_user_cannot_enter_is_one_line_with_the_command_that_works(
    closed_state: Path, words: list[str]
) -> None:
    state = closed_state.parent / "state"
    done = gpuwatch(NOBODY_PLAIN, *words, "-c", str(closed_state), cwd=Path("/"))
    assert done.returncode == 2 and done.stdout == "", done.stdout + done.stderr
    prefix = (
        f"gpuwatch: error: state_dir {state}: this user (nobody) cannot enter it (drwx------, owner root): "
        "permission denied; run it as root: "
    )
    assert done.stderr.startswith(prefix) and done.stderr.count("\n") == 1, done.stderr  # one line, no traceback
    command = done.stderr[len(prefix) :].strip()
    assert command.endswith(f"{shlex.join(words)} -c {closed_state}")
    # the command it names works (as root: no sudo here; its PATH finds the gpuwatch it names)
    works = subprocess.run(
        ["bash", "-c", command.removeprefix("sudo ")], capture_output=True, text=True, timeout=60, cwd="/"
    )
    assert works.returncode in (0, 1) and works.stderr == "", works.stderr
    assert ("host_down" in works.stdout) if words == ["alerts"] else works.stdout == "no silences in force\n"


def test_status_works_where_the_state_dir_cannot_be_entered(closed_state: Path) -> None:
    state = closed_state.parent / "state"
    status = gpuwatch(NOBODY_PLAIN, "status", "-c", str(closed_state), cwd=Path("/"))
    # (nobody cannot run the stand-in nvidia-smi under root's pytest folder: localhost is down for it)
    assert status.stdout.startswith("HOST ") and "dead" in status.stdout and "localhost" in status.stdout
    note = f"gpuwatch: note: nothing was logged to a file: state_dir {state}: cannot open gpuwatch.log: "
    note += "permission denied\n"
    assert status.stderr.endswith(note) and "Traceback" not in status.stderr, status.stderr
    assert "readable by other users" not in status.stderr  # the 0640 config: its group may read it


def test_silence_list_reads_a_read_only_copy(state_with_an_alert: Path) -> None:
    """A readable state_dir this user may not write: ``silence list`` reads it as ``alerts`` does."""
    added = gpuwatch(
        [],
        "silence",
        "add",
        "--host",
        "dead",
        "--for",
        "1h",
        "--comment",
        "planned",
        "-c",
        str(state_with_an_alert),
        cwd=Path("/"),
    )
    assert added.returncode == 0, added.stderr
    for prefix in ([], NOBODY):
        state = state_with_an_alert.parent / "state"
        with read_only_mount(state) if not prefix else contextlib.nullcontext():
            listed = gpuwatch(prefix, "silence", "list", "-c", str(state_with_an_alert), cwd=state_with_an_alert.parent)
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.startswith("#1  host=dead  until "), listed.stdout
        assert "Traceback" not in listed.stderr and "cannot open gpuwatch.log" in listed.stderr
