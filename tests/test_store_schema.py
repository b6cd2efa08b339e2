"""A state database that SQLite reads but whose tables are not the ones this gpuwatch writes (issue 20 E7).

Two ways it happens: a table recreated without its columns (a hand "repair", another tool), and a
file a newer gpuwatch brought to a schema this one does not know (a downgrade). Either is refused
when the database is opened, in one line (exit 2, so systemd does not restart in a loop), for the
commands that write and for those that only read; the file is left where it is, untouched: it
is readable, and may hold what someone wants back.
"""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from fakefeishu import FakeFeishu
from gpuwatch import __version__
from gpuwatch.store import DB_NAME, AlertStore, Outbox, StoreError, open_db, open_db_readonly
from gpuwatch.store.db import _MIGRATIONS

CURRENT = len(_MIGRATIONS)


def write_config(tmp_path: Path, url: str) -> Path:
    doc: dict[str, Any] = {
        "hosts": ["localhost"],
        "ssh": {"use_ssh_config": False, "known_hosts": str(tmp_path / "known_hosts")},
        "state_dir": str(tmp_path / "state"),
        "feishu": {"url": url},
        "schedule": {"poll_every": "1s", "reports": [{"report": "overview", "every": "1s"}]},
        "alerts": {"host_down": {"after": 1}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    path.chmod(0o600)
    return path


def gpuwatch(*argv: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpuwatch", *argv], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    return lines[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_state(state: Path) -> None:
    """A database as a daemon leaves it: a message waiting, a silence."""
    db = open_db(state)
    Outbox(db).add("feishu", "an old message", [{"text": "GPU"}])
    AlertStore(db).add_silence(ends_at=2e9, comment="kept", now=1e9, host="a")
    db.close()


def damage_outbox(state: Path) -> None:
    """The outbox recreated without its columns, as a hand "repair" leaves it."""
    conn = sqlite3.connect(state / DB_NAME)
    conn.executescript("DROP TABLE outbox; CREATE TABLE outbox (id INTEGER PRIMARY KEY);")
    conn.close()


def set_user_version(state: Path, version: int) -> None:
    conn = sqlite3.connect(state / DB_NAME)
    conn.execute(f"PRAGMA user_version = {version}")
    conn.close()


def left_alone(state: Path) -> None:
    assert sorted(p.name for p in state.glob(f"{DB_NAME}*") if not p.name.endswith(("-wal", "-shm"))) == [DB_NAME]


# ---------------------------------------------------------------------- a damaged schema


@pytest.mark.parametrize("argv", [["run", "--once"], ["run"]], ids=["once", "daemon"])
def test_a_table_recreated_without_its_columns_stops_run_in_one_line(
    tmp_path: Path, local_standin: Path, argv: list[str]
) -> None:
    """Before: a traceback in every cycle ("no such column: channel") and nothing sent."""
    with FakeFeishu() as server:
        config = write_config(tmp_path, server.url)
        state = tmp_path / "state"
        make_state(state)
        damage_outbox(state)
        before = digest(state / DB_NAME)

        started = time.monotonic()
        result = gpuwatch(*argv, "-c", str(config), cwd=tmp_path, timeout=30)

        assert result.returncode == 2, result.stderr
        assert time.monotonic() - started < 20  # refused at the start, not after cycles
        line = one_line(result.stderr)
        assert line.startswith(f"gpuwatch: error: state_dir {state}: {DB_NAME} does not have the tables ")
        assert "table outbox has no column channel, summary, payload, created_at, " in line
        assert "move it aside" in line and "restore it from a backup" in line
        assert server.exchanges == []
        log = (state / "gpuwatch.log").read_text(encoding="utf-8")
        assert "Traceback" not in log
        assert digest(state / DB_NAME) == before  # untouched, still where it was
        left_alone(state)


def test_read_only_commands_say_a_damaged_schema_in_one_line(tmp_path: Path) -> None:
    """Before: ``alerts`` said "STALE: no poll has recorded alert state" over a damaged file."""
    with FakeFeishu() as server:
        config = write_config(tmp_path, server.url)
        state = tmp_path / "state"
        make_state(state)
        damage_outbox(state)

        alerts = gpuwatch("alerts", "-c", str(config), cwd=tmp_path)
        check = gpuwatch("check", "-c", str(config), cwd=tmp_path)

        assert alerts.returncode == 2 and alerts.stdout == ""
        line = one_line(alerts.stderr)
        assert line.startswith(f"gpuwatch: error: state_dir {state}: {DB_NAME} does not have the tables ")
        assert "Traceback" not in check.stdout + check.stderr
        assert f"cannot read {DB_NAME}: state_dir {state}: {DB_NAME} does not have the tables " in check.stdout
        left_alone(state)


def test_a_missing_table_and_a_column_without_a_default_are_damage_too(tmp_path: Path) -> None:
    state = tmp_path / "state"
    make_state(state)
    conn = sqlite3.connect(state / DB_NAME)
    conn.executescript(
        "DROP TABLE report_runs;"
        "CREATE TABLE new_alerts (id TEXT PRIMARY KEY, record TEXT NOT NULL, owner TEXT NOT NULL);"
        "INSERT INTO new_alerts (id, record, owner) SELECT id, record, '' FROM alerts;"
        "DROP TABLE alerts; ALTER TABLE new_alerts RENAME TO alerts;"
    )
    conn.close()

    with pytest.raises(StoreError) as raised:
        open_db(state)

    assert "no table report_runs" in str(raised.value)
    assert "table alerts has a column gpuwatch does not fill: owner" in str(raised.value)


def test_an_older_database_whose_migration_cannot_run_is_one_line(tmp_path: Path) -> None:
    """A schema-2 file whose outbox lost its columns: the migration to 3 alters that table."""
    state = tmp_path / "state"
    make_state(state)
    damage_outbox(state)
    set_user_version(state, 2)

    with pytest.raises(StoreError) as raised:
        open_db(state)

    message = str(raised.value)
    assert message.startswith(f"state_dir {state}: {DB_NAME} does not have the tables ")
    assert "cannot be brought up to date" in message and "\n" not in message
    assert "PRAGMA user_version" not in message
    assert sqlite3.connect(state / DB_NAME).execute("PRAGMA user_version").fetchone()[0] == 2  # rolled back


def test_the_web_page_reader_is_refused_too(tmp_path: Path) -> None:
    state = tmp_path / "state"
    make_state(state)
    damage_outbox(state)

    with pytest.raises(StoreError, match="does not have the tables"):
        open_db_readonly(state)


def test_a_reader_takes_an_older_schema_as_it_is(tmp_path: Path) -> None:
    """A read-only open does not migrate: a file an older gpuwatch left is checked against its own
    version's tables (here: from before the meta table)."""
    state = tmp_path / "state"
    make_state(state)
    before_meta = next(i for i, script in enumerate(_MIGRATIONS) if "CREATE TABLE meta" in script)
    conn = sqlite3.connect(state / DB_NAME)
    for table in ("meta", "acks", "users_seen", "wishes", "reservations"):  # that migration's tables and later ones
        conn.execute(f"DROP TABLE {table}")
    conn.execute(f"PRAGMA user_version = {before_meta}")
    conn.close()

    db = open_db_readonly(state)
    assert [item.summary for item in Outbox(db).pending()] == ["an old message"]
    db.close()


def test_extra_tables_and_columns_with_defaults_are_fine(tmp_path: Path) -> None:
    """What a person may add for their own use does not stop gpuwatch."""
    state = tmp_path / "state"
    make_state(state)
    conn = sqlite3.connect(state / DB_NAME)
    conn.executescript("CREATE TABLE notes (text TEXT); ALTER TABLE outbox ADD COLUMN note TEXT DEFAULT 'x';")
    conn.close()

    db = open_db(state)
    assert [item.summary for item in Outbox(db).pending()] == ["an old message"]
    db.close()


# ---------------------------------------------------------------------- a newer gpuwatch's database


def test_a_database_of_a_newer_schema_is_refused_saying_what_to_do(tmp_path: Path) -> None:
    """Before: used silently (a newer gpuwatch may have changed what its rows mean)."""
    with FakeFeishu() as server:
        config = write_config(tmp_path, server.url)
        state = tmp_path / "state"
        make_state(state)
        conn = sqlite3.connect(state / DB_NAME)
        conn.execute("DROP TABLE IF EXISTS meta")  # a newer gpuwatch that did not say who it was
        conn.close()
        set_user_version(state, CURRENT + 1)
        before = digest(state / DB_NAME)

        results = [gpuwatch(*argv, "-c", str(config), cwd=tmp_path) for argv in (["run", "--once"], ["alerts"])]

        for result in results:
            assert result.returncode == 2, result.stderr
            line = one_line(result.stderr)
            assert line == (
                f"gpuwatch: error: state_dir {state}: {DB_NAME} was written by a newer gpuwatch "
                f"(schema version {CURRENT + 1}, this gpuwatch {__version__} knows up to {CURRENT}); "
                "run that newer gpuwatch (or newer) on it, or move the file aside to start afresh with this one "
                "(its outbox, alert state and silences stay in the moved file)"
            )
        assert server.exchanges == []
        assert digest(state / DB_NAME) == before
        left_alone(state)


def test_the_refusal_names_the_gpuwatch_that_wrote_the_newer_schema(tmp_path: Path) -> None:
    state = tmp_path / "state"
    make_state(state)
    conn = sqlite3.connect(state / DB_NAME)
    conn.execute("UPDATE meta SET value = '9.4.0' WHERE key = 'schema_written_by'")
    conn.commit()
    conn.close()
    set_user_version(state, CURRENT + 3)

    for opener in (open_db, open_db_readonly):
        with pytest.raises(StoreError) as raised:
            opener(state)
        assert f"{DB_NAME} was written by gpuwatch 9.4.0 (schema version {CURRENT + 3}, " in str(raised.value)
        assert "run gpuwatch 9.4.0 (or newer) on it" in str(raised.value)


def test_the_database_says_which_gpuwatch_brought_its_schema_up_to_date(tmp_path: Path) -> None:
    state = tmp_path / "state"
    make_state(state)
    conn = sqlite3.connect(state / DB_NAME)
    assert conn.execute("SELECT value FROM meta WHERE key = 'schema_written_by'").fetchall() == [(__version__,)]
    conn.execute("UPDATE meta SET value = '0.0.1'")
    conn.commit()
    conn.close()

    open_db(state).close()  # up to date already: opening writes nothing
    conn = sqlite3.connect(state / DB_NAME)
    assert conn.execute("SELECT value FROM meta").fetchall() == [("0.0.1",)]
    conn.close()
