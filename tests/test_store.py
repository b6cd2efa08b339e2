"""The state directory and its database: one sender at a time, safe to create in parallel,
private files, and every way the disk under it can fail said in one line.

The lock is tried with real processes (``python -m gpuwatch`` against the local stand-in and
tests/fakefeishu.py). Disks that fail are real: a full one is a small tmpfs, a read-only one a
read-only bind mount, a directory the user may not write is tried as ``nobody`` (all need root;
skipped otherwise).
"""

from __future__ import annotations

import contextlib
import errno
import json
import multiprocessing
import os
import random
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fakefeishu import FakeFeishu
from gpuwatch.notify.base import DeliveryError
from gpuwatch.notify.delivery import flush
from gpuwatch.rules import AlertKey, AlertRecord, Memory
from gpuwatch.store import DB_NAME, AlertStore, Outbox, StoreError, open_db
from gpuwatch.store.db import _MIGRATIONS
from waiting import wait_for

SRC = Path(__file__).resolve().parent.parent / "src"


# ---------------------------------------------------------------------- helpers


def write_config(tmp_path: Path, url: str, *, state_dir: Path | None = None, name: str = "config.yaml") -> Path:
    doc: dict[str, Any] = {
        "hosts": ["localhost"],
        "ssh": {"use_ssh_config": False, "known_hosts": str(tmp_path / "known_hosts")},
        "state_dir": str(state_dir or tmp_path / "state"),
        "feishu": {"url": url},
        "schedule": {"poll_every": "1s", "reports": [{"report": "overview", "every": "1s"}]},
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    path.chmod(0o600)
    return path


def gpuwatch(*argv: str, cwd: Path, timeout: float = 60, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """``python -m gpuwatch ARGV`` as a separate process, to the end."""
    return subprocess.run(
        [sys.executable, "-m", "gpuwatch", *argv], cwd=cwd, capture_output=True, text=True, timeout=timeout, **kwargs
    )


def start_daemon(config: Path, tmp_path: Path, **kwargs: Any) -> subprocess.Popen[bytes]:
    err = (tmp_path / "daemon.err").open("wb")
    with err:
        return subprocess.Popen(
            [sys.executable, "-m", "gpuwatch", "run", "-c", str(config)],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=err,
            **kwargs,
        )


@contextlib.contextmanager
def running(proc: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def log_text(state: Path) -> str:
    path = state / "gpuwatch.log"
    return path.read_text(encoding="utf-8") if path.exists() else ""


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    return lines[0]


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (mounts)")


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MB tmpfs, unmounted afterwards."""
    needs_root()
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        _run("mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(mount))
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot mount a tmpfs: {exc.stderr.decode(errors='replace').strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Take every free byte of ``disk`` (with one file, removed to make room again)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            try:
                os.write(fd, b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
    finally:
        os.close(fd)
    return filler


@contextlib.contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """``directory`` made read-only by a read-only bind mount of itself."""
    needs_root()
    _run("mount", "--bind", str(directory), str(directory))
    try:
        _run("mount", "-o", "remount,bind,ro", str(directory))
        yield
    finally:
        subprocess.run(["umount", str(directory)], check=False)


class Recorder:
    """A channel that accepts everything and remembers it."""

    dry_run = False

    def __init__(self) -> None:
        self.delivered: list[dict[str, Any]] = []

    def prepare(self, message: Any) -> list[dict[str, Any]]:
        return [{"text": str(message)}]

    def deliver(self, payload: dict[str, Any]) -> None:
        self.delivered.append(payload)

    def describe(self, payload: dict[str, Any]) -> str:
        return str(payload.get("text", ""))


# ---------------------------------------------------------------------- one sender per state_dir


def test_second_sender_on_one_state_dir_exits_at_once_naming_the_first(tmp_path: Path, local_standin: Path) -> None:
    with FakeFeishu() as server:
        config = write_config(tmp_path, server.url)
        state = tmp_path / "state"
        with running(start_daemon(config, tmp_path)) as daemon:
            wait_for(lambda: "gpuwatch running" in log_text(state), 20, "the daemon to start")
            wait_for(lambda: len(server.accepted) >= 1, 20, "the daemon's first overview")

            for argv in (["run", "--once"], ["run"], ["--once"]):
                second = gpuwatch(*argv, "-c", str(config), cwd=tmp_path, timeout=30)
                assert second.returncode == 1, second.stderr
                line = one_line_error(second.stderr)
                assert line.startswith(f"gpuwatch: error: state_dir {state} is in use by another gpuwatch: ")
                assert f"pid {daemon.pid} (gpuwatch run -c {config}), since 20" in line
                assert "Stop that one first, or give this config its own state_dir" in line
            assert daemon.poll() is None  # the first one runs on, undisturbed

            # what only reads, and what writes in short transactions, needs no lock
            alerts = gpuwatch("alerts", "-c", str(config), cwd=tmp_path)
            assert alerts.returncode == 0, alerts.stderr
            assert re.fullmatch(r"as of .* \(\d+s ago\)\nno alerts firing\n", alerts.stdout)
            silence = gpuwatch(
                "silence",
                "add",
                "--host",
                "localhost",
                "--for",
                "1h",
                "--comment",
                "test",
                "-c",
                str(config),
                cwd=tmp_path,
            )
            assert silence.returncode == 0, silence.stderr
            # each outbox row went out once: the refused runs sent nothing of it
            delivered = re.findall(r"feishu: delivered message (\d+) ", log_text(state))
            assert delivered and len(delivered) == len(set(delivered))
            dry = gpuwatch("run", "--dry-run", "-c", str(config), cwd=tmp_path)
            assert dry.returncode == 0, dry.stderr
            assert "----- would send to feishu -----" in dry.stdout
        assert daemon.returncode == 0

        # stopped: the next one may go
        after = gpuwatch("run", "--once", "-c", str(config), cwd=tmp_path)
        assert after.returncode == 0, after.stderr


def test_a_killed_daemon_leaves_no_lock_behind(tmp_path: Path, local_standin: Path) -> None:
    with FakeFeishu() as server:
        config = write_config(tmp_path, server.url)
        state = tmp_path / "state"
        with running(start_daemon(config, tmp_path)) as daemon:
            wait_for(lambda: "gpuwatch running" in log_text(state), 20, "the daemon to start")
            daemon.kill()
            daemon.wait()
        assert json.loads((state / "gpuwatch.lock").read_text())["pid"] == daemon.pid  # the file stays ...
        again = gpuwatch("run", "--once", "-c", str(config), cwd=tmp_path)
        assert again.returncode == 0, again.stderr  # ... but the lock died with its process


# ---------------------------------------------------------------------- creating the database


def _open_at_once(state_dir: str, barrier: Any, results: Any) -> None:
    barrier.wait()
    try:
        db = open_db(Path(state_dir))
        Outbox(db).add("feishu", "hello", [{"n": os.getpid()}])
        db.close()
        results.put("ok")
    except BaseException as exc:
        results.put(f"{type(exc).__name__}: {exc}")


def test_many_processes_creating_the_database_at_once(tmp_path: Path) -> None:
    """Each opens a state_dir nobody created yet at the same moment: no "table already exists", no
    "database is locked", the schema made once, every message kept."""
    context = multiprocessing.get_context("fork")
    workers, rounds = 6, 4
    for round_ in range(rounds):
        state = tmp_path / f"state{round_}"
        barrier, results = context.Barrier(workers), context.Queue()
        procs = [context.Process(target=_open_at_once, args=(str(state), barrier, results)) for _ in range(workers)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout=60)
        outcomes = sorted(results.get(timeout=5) for _ in procs)
        assert outcomes == ["ok"] * workers
        with contextlib.closing(sqlite3.connect(state / DB_NAME)) as db:
            assert db.execute("PRAGMA user_version").fetchone()[0] == len(_MIGRATIONS)
            assert db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == workers


def test_many_threads_creating_the_database_at_once(tmp_path: Path) -> None:
    """The same within one process: each thread its own connection, as each command has."""
    for round_ in range(4):
        state = tmp_path / f"state{round_}"
        barrier = threading.Barrier(6)
        outcomes: list[str] = []

        def open_and_add() -> None:
            barrier.wait()
            try:
                db = open_db(state)
                Outbox(db).add("feishu", "hello", [{"n": 1}])
                db.close()
                outcomes.append("ok")
            except BaseException as exc:
                outcomes.append(f"{type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=open_and_add) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert outcomes == ["ok"] * 6


# ---------------------------------------------------------------------- a corrupt database


def _garbage_pages(path: Path) -> None:
    data = bytearray(path.read_bytes())
    noise = random.Random(8)
    for i in range(4096 * 2, min(len(data), 4096 * 6)):
        data[i] = noise.randrange(256)
    path.write_bytes(bytes(data))


def test_a_file_that_is_not_sqlite_is_moved_aside(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gpuwatch.cli import main

    with FakeFeishu() as server:
        config = write_config(tmp_path, server.url)
        state = tmp_path / "state"
        state.mkdir()
        garbage = random.Random(3).randbytes(10_000)
        (state / DB_NAME).write_bytes(garbage)
        (state / f"{DB_NAME}-wal").write_bytes(b"left over")

        code = main(["alerts", "-c", str(config)])

        err = capsys.readouterr().err
        assert code == 0, err
        line = one_line_error(err)
        assert line.startswith(
            f"gpuwatch: ERROR: state database {state / DB_NAME} was corrupt (file is not a database)"
        )
        (aside,) = state.glob(f"{DB_NAME}.corrupt-*Z")
        assert sorted(p.name for p in state.glob("*.corrupt-*")) == [aside.name, f"{aside.name}-wal"]
        assert f"moved it aside to {aside.name} and started a fresh one" in line
        assert aside.read_bytes() == garbage
        assert Path(f"{aside}-wal").read_bytes() == b"left over"
        assert line in "gpuwatch: ERROR: " + log_text(state).split(" ERROR gpuwatch.store: ")[1]
        db = open_db(state)  # the fresh one works
        assert Outbox(db).count() == 0
        db.close()


def test_a_database_with_garbage_pages_is_moved_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "state"
    db = open_db(state)
    outbox = Outbox(db)
    for n in range(20):
        outbox.add("feishu", f"message {n}", [{"text": "x" * 3000}])
    AlertStore(db).add_silence(ends_at=2e9, comment="kept?", now=1e9, host="a")
    db.close()
    _garbage_pages(state / DB_NAME)

    db = open_db(state)

    assert Outbox(db).pending() == [] and AlertStore(db).silences() == []
    db.close()
    (aside,) = state.glob(f"{DB_NAME}.corrupt-*Z")
    (record,) = [r for r in caplog.records if r.name == "gpuwatch.store"]
    assert record.levelname == "ERROR"
    assert "was corrupt" in record.getMessage() and aside.name in record.getMessage()


def test_a_corrupt_database_another_gpuwatch_holds_is_left_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gpuwatch.cli import main

    with FakeFeishu() as server:
        config = write_config(tmp_path, server.url)
        state = tmp_path / "state"
        state.mkdir()
        (state / DB_NAME).write_bytes(b"not a database" * 100)
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                textwrap.dedent(f"""
                    import sys, time
                    from pathlib import Path
                    from gpuwatch.statedir import lock_state_dir
                    lock = lock_state_dir(Path({str(state)!r}), "gpuwatch run -c holder.yaml")
                    print("locked", flush=True)
                    time.sleep(60)
                """),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
            code = main(["alerts", "-c", str(config)])
        finally:
            holder.kill()
            holder.wait()
        line = one_line_error(capsys.readouterr().err)
        assert code == 2
        assert line.startswith(f"gpuwatch: error: state_dir {state}: {DB_NAME} is corrupt (file is not a database)")
        assert f"pid {holder.pid} (gpuwatch run -c holder.yaml)" in line and "stop that one" in line
        assert list(state.glob("*.corrupt-*")) == []


# ---------------------------------------------------------------------- private files


@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_state_dir_is_private_whatever_the_umask(tmp_path: Path, local_standin: Path, umask: int) -> None:
    with FakeFeishu() as server:
        config = write_config(tmp_path, server.url, state_dir=tmp_path / "var" / "state")
        state = tmp_path / "var" / "state"
        with running(start_daemon(config, tmp_path, umask=umask)):
            wait_for(lambda: len(server.accepted) >= 1, 20, "the daemon's first overview")
            names = {p.name for p in state.iterdir()}
            assert {"gpuwatch.log", "gpuwatch.lock", DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm"} <= names
            modes = {name: stat.S_IMODE((state / name).stat().st_mode) for name in names}
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        assert modes == dict.fromkeys(names, 0o600)


def test_files_an_older_version_left_readable_are_made_private(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gpuwatch.cli import main

    with FakeFeishu() as server:
        config = write_config(tmp_path, server.url)
        state = tmp_path / "state"
        state.mkdir(mode=0o755)
        db = open_db(state)
        db.close()
        for name in (DB_NAME, "gpuwatch.log", "gpuwatch.log.1"):
            (state / name).touch()
            (state / name).chmod(0o644)

        assert main(["alerts", "-c", str(config)]) == 0, capsys.readouterr().err

        for name in (DB_NAME, "gpuwatch.log", "gpuwatch.log.1"):
            assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
        assert stat.S_IMODE(state.stat().st_mode) == 0o755  # an existing directory is the admin's choice


def test_rotated_log_files_are_private(tmp_path: Path) -> None:
    import logging

    from gpuwatch.logsetup import PrivateRotatingFileHandler

    old = os.umask(0)
    try:
        handler = PrivateRotatingFileHandler(tmp_path / "gpuwatch.log", maxBytes=200, backupCount=3)
        record = logging.LogRecord("t", logging.INFO, __file__, 1, "x" * 150, None, None)
        for _ in range(6):
            handler.emit(record)
        handler.close()
    finally:
        os.umask(old)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["gpuwatch.log", "gpuwatch.log.1", "gpuwatch.log.2", "gpuwatch.log.3"]
    assert {stat.S_IMODE((tmp_path / n).stat().st_mode) for n in names} == {0o600}


# ---------------------------------------------------------------------- a disk that fails


def test_state_dir_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gpuwatch.cli import main

    with FakeFeishu() as server:
        config = write_config(tmp_path, server.url)
        (tmp_path / "state").write_text("oops")
        for argv in (["alerts"], ["run", "--once"]):
            assert main([*argv, "-c", str(config)]) == 2
            line = one_line_error(capsys.readouterr().err)
            assert line == (
                f"gpuwatch: error: state_dir {tmp_path / 'state'}: is a file, not a directory; "
                "point state_dir at a directory (it is created if missing)"
            )


@pytest.mark.parametrize(
    "argv", [["run", "--once"], ["silence", "add", "--host", "localhost", "--for", "1h", "--comment", "test"]]
)
def test_read_only_state_dir(tmp_path: Path, local_standin: Path, argv: list[str]) -> None:
    """Commands that write stop in one line; those that only read go on (tests/test_read_only.py)."""
    with FakeFeishu() as server:
        config = write_config(tmp_path, server.url)
        state = tmp_path / "state"
        assert gpuwatch("run", "--once", "-c", str(config), cwd=tmp_path).returncode == 0
        with read_only(state):
            result = gpuwatch(*argv, "-c", str(config), cwd=tmp_path)
        assert result.returncode == 2
        line = one_line_error(result.stderr)
        assert line.startswith(f"gpuwatch: error: state_dir {state}: cannot ")
        assert "read-only file system; " in line


def test_state_dir_this_user_may_not_write(tmp_path: Path) -> None:
    """The log file is still writable, the directory is not: SQLite cannot make its -shm file, so
    a command that writes stops in one line, and one that only reads reads it read-only.
    (Run as root without the capability to override file modes: root's modes apply to it.)"""
    needs_root()
    with FakeFeishu() as server:
        config = write_config(tmp_path, server.url)
        state = tmp_path / "state"
        db = open_db(state)
        db.close()
        (state / "gpuwatch.log").touch()
        state.chmod(0o500)

        def as_root_without_override(*argv: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-m", "gpuwatch", *argv],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=60,
            )

        try:
            writer = as_root_without_override(
                "silence", "add", "--rule", "host_down", "--for", "1h", "--comment", "x", "-c", str(config)
            )
            reader = as_root_without_override("alerts", "-c", str(config))
        finally:
            state.chmod(0o700)
        assert writer.returncode == 2, writer.stderr
        line = one_line_error(writer.stderr)
        assert line.startswith(f"gpuwatch: error: state_dir {state}: cannot open {DB_NAME}: permission denied; ")
        assert reader.returncode == 0, reader.stderr
        # it read what it could: no poll has run, said so, without a traceback or a write
        assert reader.stdout.startswith("STALE: no poll has recorded alert state") and reader.stderr == ""


def test_full_disk_at_start_is_one_line_exit_2(tmp_path: Path, local_standin: Path, small_disk: Path) -> None:
    with FakeFeishu() as server:
        state = small_disk / "state"
        config = write_config(tmp_path, server.url, state_dir=state)
        fill(small_disk)
        result = gpuwatch("run", "--once", "-c", str(config), cwd=tmp_path)
        assert result.returncode == 2
        line = one_line_error(result.stderr)
        assert line.startswith(f"gpuwatch: error: state_dir {state}: cannot ")
        assert "no space left on device; free some space there, or point state_dir at another disk" in line
        assert server.exchanges == []


def test_full_disk_while_running_holds_messages_and_sends_each_once(small_disk: Path) -> None:
    state = small_disk / "state"
    db = open_db(state)
    outbox = Outbox(db)
    channel = Recorder()
    outbox.add("feishu", "before", [{"text": "before"}])
    filler = fill(small_disk)

    big = [{"text": "x" * 200_000}]  # far more than the write-ahead log has room for
    with pytest.raises(StoreError) as info:
        outbox.add("feishu", "report 1", big)
    assert info.value.disk_full
    assert str(info.value) == (
        f"state_dir {state}: cannot write {DB_NAME}: no space left on device; "
        "free some space there, or point state_dir at another disk"
    )
    assert not outbox.add_or_hold("feishu", "report 1", big)
    assert outbox.held == 1 and outbox.count() == 1  # nothing half-written

    # sending goes on; what was sent but could not be marked sent is not sent again
    first = flush(outbox, {"feishu": channel})  # type: ignore[dict-item]
    second = flush(outbox, {"feishu": channel})  # type: ignore[dict-item]
    assert [p["text"] for p in channel.delivered] == ["before"]
    assert first.sent == 1 and second.sent == 0 and outbox.count() == 0
    assert any("no space left on device" in e for e in first.errors)

    filler.unlink()  # room again: the held message is queued before anything newer, and sent
    outbox.add("feishu", "report 2", [{"text": "after"}])
    assert outbox.held == 0
    assert [i.summary for i in outbox.pending()] == ["report 1", "report 2"]
    result = flush(outbox, {"feishu": channel})  # type: ignore[dict-item]
    assert result.sent == 2 and outbox.count() == 0
    assert [p["text"][:5] for p in channel.delivered] == ["befor", "xxxxx", "after"]
    db.close()
    with contextlib.closing(sqlite3.connect(state / DB_NAME)) as raw:
        assert raw.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0  # "before" marked sent at last


def test_full_disk_rolls_back_the_alert_state_with_its_messages(small_disk: Path) -> None:
    """Alert state and the messages it causes commit together: on a full disk neither is written,
    so the next cycle computes the same transitions again (nothing announced twice, nothing lost)."""
    state = small_disk / "state"
    db = open_db(state)
    outbox = Outbox(db)
    alerts = AlertStore(db)
    filler = fill(small_disk)
    with pytest.raises(StoreError), db.transaction():
        alerts.add_silence(ends_at=2e9, comment="y" * 50_000, now=1e9, host="a")
        outbox.add("feishu", "alert", [{"text": "z" * 200_000}])
    assert alerts.silences() == [] and outbox.count() == 0
    filler.unlink()
    outbox.add("feishu", "next", [{"text": "ok"}])
    assert [i.summary for i in outbox.pending()] == ["next"]
    db.close()


def test_log_file_on_a_full_disk_is_said_once(small_disk: Path, capfd: pytest.CaptureFixture[str]) -> None:
    import logging

    from gpuwatch.logsetup import setup_logging

    state = small_disk / "state"
    setup_logging(state, level="INFO")
    log = logging.getLogger("gpuwatch.test")
    filler = fill(small_disk)
    try:
        for n in range(200):
            log.info("line %d %s", n, "x" * 200)
        err = capfd.readouterr().err
        assert "Traceback" not in err and "Logging error" not in err
        assert err == (
            f"gpuwatch: cannot write the log file {state / 'gpuwatch.log'}: No space left on device "
            "(said once; it resumes when it can)\n"
        )
        filler.unlink()
        log.info("room again")
        assert capfd.readouterr().err == f"gpuwatch: the log file {state / 'gpuwatch.log'} can be written again\n"
        assert "room again" in log_text(state)
    finally:
        setup_logging(None)


def test_delivery_error_marking_survives_a_full_disk(small_disk: Path) -> None:
    """A message refused for good while the disk is full is not retried every cycle."""
    state = small_disk / "state"
    db = open_db(state)
    outbox = Outbox(db)
    outbox.add("feishu", "bad", [{"text": "b" * 100_000}])
    outbox.add("feishu", "good", [{"text": "g"}])

    class Refusing(Recorder):
        def deliver(self, payload: dict[str, Any]) -> None:
            if payload["text"].startswith("b"):
                self.delivered.append({"text": "refused"})
                raise DeliveryError("too large", permanent=True, message_fault=True)
            super().deliver(payload)

    channel = Refusing()
    filler = fill(small_disk)
    flush(outbox, {"feishu": channel})  # type: ignore[dict-item]
    flush(outbox, {"feishu": channel})  # type: ignore[dict-item]
    assert [p["text"] for p in channel.delivered] == ["refused", "g"]
    filler.unlink()
    flush(outbox, {"feishu": channel})  # type: ignore[dict-item]
    db.close()
    with contextlib.closing(sqlite3.connect(state / DB_NAME)) as raw:
        assert raw.execute("SELECT summary, dead FROM outbox").fetchall() == [("bad", 1)]


def test_daemon_keeps_reporting_through_a_full_disk(tmp_path: Path, local_standin: Path, small_disk: Path) -> None:
    """The daemon's state on a disk that fills up while it runs: no traceback, polling goes on, and
    the overviews it made meanwhile are delivered once there is room again."""
    state = small_disk / "state"
    with FakeFeishu() as server:
        config = write_config(tmp_path, server.url, state_dir=state)
        err_file = tmp_path / "daemon.err"
        with err_file.open("wb") as err:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "gpuwatch", "run", "-c", str(config)],
                cwd=tmp_path,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env={**os.environ, "PYTHONPATH": str(SRC)},
            )
        try:
            wait_for(lambda: len(server.accepted) >= 1, 20, "a first overview")
            filler = fill(small_disk)
            wait_for(lambda: "not queued" in err_file.read_text(), 20, "a report that could not be queued")
            held_at = len(server.accepted)
            filler.unlink()
            wait_for(lambda: len(server.accepted) >= held_at + 2, 30, "overviews after the disk freed")
            assert daemon.poll() is None
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=20)
    assert daemon.returncode == 0
    err_text = err_file.read_text()
    assert "Traceback" not in err_text, err_text
    assert "not queued" in err_text and "kept in memory until it can be" in err_text


class DoubtfulChannel:
    """A channel whose sends may or may not have arrived: it raises maybe_delivered until told not to."""

    name = "feishu"
    dry_run = False

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.doubtful = True

    def prepare(self, message: Any) -> list[dict[str, Any]]:
        return [{"text": message}]

    def deliver(self, payload: dict[str, Any]) -> None:
        self.calls.append(payload)
        if self.doubtful:
            reason = "no answer within 10s (it may have been delivered)"
            raise DeliveryError(reason, permanent=False, maybe_delivered=True)

    def describe(self, payload: dict[str, Any]) -> str:
        return str(payload)


def test_a_send_that_may_have_been_delivered_waits_60s_then_120s_and_keeps_the_order(tmp_path: Path) -> None:
    now = [1000.0]
    outbox = Outbox(open_db(tmp_path / "state"), clock=lambda: now[0])
    outbox.add("feishu", "first", [{"n": 1}])
    outbox.add("feishu", "second", [{"n": 2}])
    channel = DoubtfulChannel()
    result = flush(outbox, {"feishu": channel})
    assert channel.calls == [{"n": 1}]  # one post, then nothing behind it: no instant re-post
    assert result.failed == 2 and any("may have been delivered" in e for e in result.errors), result.errors
    now[0] += 59
    flush(outbox, {"feishu": channel})
    assert len(channel.calls) == 1  # still waiting
    now[0] += 2
    flush(outbox, {"feishu": channel})
    assert len(channel.calls) == 2  # tried again after 60 s, in doubt again: now 120 s
    now[0] += 119
    flush(outbox, {"feishu": channel})
    assert len(channel.calls) == 2
    now[0] += 2
    channel.doubtful = False
    result = flush(outbox, {"feishu": channel})
    assert channel.calls[2:] == [{"n": 1}, {"n": 2}] and result.sent == 2
    assert outbox.count() == 0


def test_the_wait_survives_a_restart_and_a_stop_sends_nothing(tmp_path: Path) -> None:
    now = [1000.0]
    outbox = Outbox(open_db(tmp_path / "state"), clock=lambda: now[0])
    outbox.add("feishu", "first", [{"n": 1}])
    channel = DoubtfulChannel()
    flush(outbox, {"feishu": channel})
    outbox.db.close()
    again = Outbox(open_db(tmp_path / "state"), clock=lambda: now[0] + 30)
    flush(again, {"feishu": channel})
    assert len(channel.calls) == 1  # the restarted process also waits
    stop = threading.Event()
    stop.set()
    channel.doubtful = False
    assert flush(Outbox(again.db, clock=lambda: now[0] + 100), {"feishu": channel}, stop=stop).sent == 0
    assert len(channel.calls) == 1


# ---------------------------------------------------------------------- a backlog is news, not history


class Refusing(Recorder):
    """Refuses everything (an outage), remembering what it was offered."""

    def __init__(self) -> None:
        super().__init__()
        self.offered: list[dict[str, Any]] = []

    def deliver(self, payload: dict[str, Any]) -> None:
        self.offered.append(payload)
        raise DeliveryError("HTTP 503", permanent=False)


def test_a_newer_report_replaces_the_waiting_one_of_its_scope_and_alerts_keep_their_order(tmp_path: Path) -> None:
    outbox = Outbox(open_db(tmp_path / "state"))
    down = Refusing()
    for run in range(1, 4):  # three runs during an outage
        outbox.add("feishu", f"alert {run}", [{"alert": run}], kind="alert")
        outbox.add(
            "feishu",
            f"overview {run}",
            [{"overview": run, "part": 1}, {"overview": run, "part": 2}],
            kind="report",
            scope="overview",
        )
        outbox.add("feishu", f"alice {run}", [{"alice": run}], kind="report", scope="user:alice")
        outbox.add("feishu", f"bob {run}", [{"bob": run}], kind="report", scope="user:bob")
        outbox.add("email", f"overview by mail {run}", [{"mail": run}], kind="report", scope="overview")
        assert not flush(outbox, {"feishu": down, "email": down}).ok
    up = Recorder()
    assert flush(outbox, {"feishu": up, "email": up}).ok
    assert up.delivered == [
        {"alert": 1},
        {"alert": 2},
        {"alert": 3},
        {"overview": 3, "part": 1},  # every part of the newest one, none of the older ones
        {"overview": 3, "part": 2},
        {"alice": 3},
        {"bob": 3},  # another user's report is another scope
        {"mail": 3},  # each channel its own
    ]


def test_replacement_spares_messages_refused_for_good_and_those_of_an_older_gpuwatch(tmp_path: Path) -> None:
    outbox = Outbox(open_db(tmp_path / "state"))
    outbox.add("feishu", "old row", [{"old": 1}])  # no kind: as migrated from an older version
    (bad,) = outbox.add("feishu", "overview 1", [{"overview": 1}], kind="report", scope="overview")
    outbox.failed(bad, "too large", dead=True)
    outbox.add("feishu", "overview 2", [{"overview": 2}], kind="report", scope="overview")
    outbox.add("feishu", "test", [{"test": 1}], kind="test", scope="overview")  # only reports replace
    outbox.add("feishu", "overview 3", [{"overview": 3}], kind="report", scope="overview")
    assert [i.payload for i in outbox.pending()] == [{"old": 1}, {"test": 1}, {"overview": 3}]
    dead = outbox.db.query("SELECT payload FROM outbox WHERE dead = 1")
    assert [json.loads(r[0]) for r in dead] == [{"overview": 1}]


def test_reports_held_in_memory_on_a_full_disk_are_replaced_too(tmp_path: Path) -> None:
    outbox = Outbox(open_db(tmp_path / "state"))
    outbox.hold("feishu", "alert", [{"alert": 1}], kind="alert")
    outbox.hold("feishu", "overview 1", [{"overview": 1}], kind="report", scope="overview")
    outbox.hold("feishu", "overview 2", [{"overview": 2}], kind="report", scope="overview")
    assert outbox.held == 2
    outbox.add("feishu", "overview 3", [{"overview": 3}], kind="report", scope="overview")
    assert [i.payload for i in outbox.pending()] == [{"alert": 1}, {"overview": 3}]


def test_the_alert_state_kept_in_memory_is_what_the_database_holds_and_a_rollback_forgets_it(tmp_path: Path) -> None:
    """The daemon reads the alert records and memory from its store each cycle without parsing them
    again, and writes only what changed: a new store (a restart) must read exactly the same, and a
    transaction that fails must leave the store reading the database again."""
    db = open_db(tmp_path)
    store = AlertStore(db)
    alice = AlertRecord(AlertKey("max_gpus_per_user", "gpu-a", user="alice"), "firing", 1000.0, fired_at=1000.0)
    bob = AlertRecord(AlertKey("idle_gpu", "gpu-b", gpu=3), "pending", 1010.0)
    store.save({alice.key.id: alice, bob.key.id: bob}, Memory({"failures": {"gpu-a": 1}}), 1020.0)
    assert AlertStore(db).records() == store.records() == {alice.key.id: alice, bob.key.id: bob}

    resent = AlertRecord(alice.key, "firing", 1000.0, fired_at=1000.0, last_sent_at=1100.0)
    store.save({alice.key.id: resent}, Memory({"failures": {"gpu-a": 1}}), 1100.0)  # bob resolved; memory same
    fresh = AlertStore(db)
    assert fresh.records() == store.records() == {alice.key.id: resent}
    assert fresh.memory().slots == {"failures": {"gpu-a": 1}}
    assert fresh.evaluated_at() == 1100.0  # the time moves on even when the memory did not change

    with pytest.raises(RuntimeError), db.transaction():
        store.save({}, Memory({"failures": {}}), 1200.0)
        raise RuntimeError("the messages could not be queued")
    assert store.records() == {alice.key.id: resent}  # read from the database again, not what was rolled back
    assert store.memory().slots == {"failures": {"gpu-a": 1}}
    db.close()
