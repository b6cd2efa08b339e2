"""The one-sender lock on a state directory holds even when its file is deleted under the holder
(issue 20): the directory itself is locked, and a running older gpuwatch that locks only the file
still keeps a new one out."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpuwatch.statedir import LOCK_NAME, StateDirBusy, lock_state_dir

SRC = Path(__file__).resolve().parent.parent / "src"


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding ``tmp_path / "state"`` as a daemon does, until it is told to go."""
    state = tmp_path / "state"
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from gpuwatch.statedir import lock_state_dir
        lock = lock_state_dir(Path({str(state)!r}), "gpuwatch run -c holder.yaml")
        print("locked", flush=True)
        sys.stdin.readline()
        lock.release()
        print("released", flush=True)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_second_gpuwatch_is_refused_even_after_the_lock_file_was_deleted(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    state = tmp_path / "state"
    with pytest.raises(StateDirBusy) as refused:
        lock_state_dir(state, "gpuwatch run -c second.yaml")
    assert f"pid {holder.pid} (gpuwatch run -c holder.yaml)" in str(refused.value)  # the file names it
    (state / LOCK_NAME).unlink()  # an admin's cleanup, a tmp cleaner
    with pytest.raises(StateDirBusy) as refused:
        lock_state_dir(state, "gpuwatch run -c second.yaml", sleep=lambda _: None)
    message = str(refused.value)
    assert "\n" not in message and refused.value.exit_code == 1
    assert message.startswith(f"state_dir {state} is in use by another gpuwatch: a process whose {LOCK_NAME} was")
    assert "deleted" in message and "Stop that one first" in message
    assert not (state / LOCK_NAME).exists()  # the refused one made no file of its own
    # When the holder goes, the directory is free again, file or no file.
    assert holder.stdin is not None and holder.stdout is not None
    holder.stdin.write("go\n")
    holder.stdin.flush()
    assert holder.stdout.readline() == "released\n"
    with lock_state_dir(state, "gpuwatch run -c second.yaml") as lock:
        assert lock.held and (state / LOCK_NAME).exists()


def test_an_older_gpuwatch_that_locks_only_the_file_still_keeps_a_new_one_out(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    with open(state / LOCK_NAME, "w", encoding="utf-8") as older:
        older.write('{"pid": 4242, "host": "", "command": "gpuwatch 0.9 run", "since": 0}\n')
        older.flush()
        fcntl.flock(older.fileno(), fcntl.LOCK_EX)
        with pytest.raises(StateDirBusy) as refused:
            lock_state_dir(state, "gpuwatch run", sleep=lambda _: None)
        assert "pid 4242 (gpuwatch 0.9 run)" in str(refused.value)
    with lock_state_dir(state, "gpuwatch run"):  # and the refusal left the directory free
        with pytest.raises(StateDirBusy):
            lock_state_dir(state, "gpuwatch run again", sleep=lambda _: None)
