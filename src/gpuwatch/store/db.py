"""The state database under state_dir: the connection, its migrations and what the disk does to it.

A corrupt file is moved aside at open and a fresh one started; a full or read-only disk is one
:class:`StoreError` naming the directory. A file SQLite reads whole but whose tables are not the
ones this gpuwatch writes (a table recreated without its columns, or a schema a newer gpuwatch
made) is refused at open, read-only opens included, as one :class:`SchemaError` (exit 2), and left
where it is: unlike a corrupt file it may hold what someone wants back (a newer gpuwatch's state,
a change made on purpose), and a service that moved it aside at each start would lose it silently.

:class:`Database` serializes every use of its one connection through one lock, so threads (the
daemon's main loop, each channel's delivery worker) share it safely; readers in other threads (the
web page) open their own read-only connection (:func:`open_db_readonly`).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import pwd
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import __version__
from ..statedir import (
    StateDirBusy,
    StateError,
    StateLock,
    disk_full,
    ensure_state_dir,
    lock_state_dir,
    make_private,
    open_private,
    os_error,
)

log = logging.getLogger(__package__)  # "gpuwatch.store", as before the split: log filters keep working

DB_NAME = "gpuwatch.sqlite3"

_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        channel TEXT NOT NULL,
        summary TEXT NOT NULL,
        payload TEXT NOT NULL,
        created_at REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        dead INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX outbox_pending ON outbox (channel, dead, id);
    """,
    """
    CREATE TABLE alerts (
        id TEXT PRIMARY KEY,
        record TEXT NOT NULL
    );
    CREATE TABLE rule_memory (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        memory TEXT NOT NULL
    );
    CREATE TABLE silences (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        rule TEXT,
        host TEXT,
        user TEXT,
        gpu INTEGER,
        ends_at REAL NOT NULL,
        comment TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    """,
    """
    ALTER TABLE outbox ADD COLUMN not_before REAL NOT NULL DEFAULT 0;
    ALTER TABLE outbox ADD COLUMN in_doubt INTEGER NOT NULL DEFAULT 0
    """,
    # What a queued message is (report, alert, test) and, for a report, what it covers
    # ("overview", "free", "user:alice"): a newer report of the same kind and scope replaces the
    # one still waiting. When each scheduled report was last made, for --once runs from cron.
    """
    ALTER TABLE outbox ADD COLUMN kind TEXT NOT NULL DEFAULT '';
    ALTER TABLE outbox ADD COLUMN scope TEXT NOT NULL DEFAULT '';
    CREATE TABLE report_runs (
        name TEXT PRIMARY KEY,
        last_at REAL NOT NULL
    )
    """,
    # silences by pid and with their author; when the alert state was last evaluated (a poll)
    """
    ALTER TABLE silences ADD COLUMN pid INTEGER;
    ALTER TABLE silences ADD COLUMN author TEXT;
    ALTER TABLE rule_memory ADD COLUMN evaluated_at REAL
    """,
    # which gpuwatch last brought the schema up to date (an older one refusing the file names it)
    """
    CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    )
    """,
    # acknowledgements: stop the reminders of the alerts firing when made (``alerts``: JSON
    # {alert id: since}), until those resolve (or ``ends_at``, when given); the users the hosts
    # have shown (``silence add --user`` warns of a name never seen)
    """
    CREATE TABLE acks (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        rule TEXT,
        host TEXT,
        user TEXT,
        gpu INTEGER,
        pid INTEGER,
        author TEXT,
        comment TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL,
        ends_at REAL,
        alerts TEXT NOT NULL
    );
    CREATE TABLE users_seen (
        name TEXT PRIMARY KEY,
        last_seen REAL NOT NULL
    )
    """,
    # "tell me when": one-shot wishes (notify-when-free, notify-when-done), open until ended_at;
    # a running process's peak GPU memory and when it was last seen are kept up to date in its row
    """
    CREATE TABLE wishes (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        user TEXT,
        author TEXT,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        gpus INTEGER NOT NULL DEFAULT 0,
        same_host INTEGER NOT NULL DEFAULT 0,
        model TEXT,
        host TEXT,
        pid INTEGER,
        command TEXT,
        started_at REAL,
        peak_memory_mib INTEGER,
        last_seen_at REAL,
        gpu_indexes TEXT NOT NULL DEFAULT '',
        ended_at REAL,
        outcome TEXT
    );
    CREATE INDEX wishes_open ON wishes (ended_at)
    """,
    # GPU bookings (gpuwatch reserve): ``gpus`` a JSON list of indices; in force on [starts_at, ends_at)
    """
    CREATE TABLE reservations (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        user TEXT NOT NULL,
        host TEXT NOT NULL,
        gpus TEXT NOT NULL,
        starts_at REAL NOT NULL,
        ends_at REAL NOT NULL,
        comment TEXT NOT NULL DEFAULT '',
        author TEXT,
        created_at REAL NOT NULL
    );
    CREATE INDEX reservations_by_host ON reservations (host, ends_at)
    """,
)


class StoreError(StateError):
    """The state database could not be read or written (a full disk, a read-only or vanished
    directory, a corrupt file): one line saying what, where and what to do. Nothing of the
    failed transaction was written."""

    def __init__(self, message: str, *, disk_full: bool = False) -> None:
        super().__init__(message)
        self.disk_full = disk_full


class SchemaError(StoreError):
    """SQLite reads the file, but its tables are not the ones this gpuwatch writes: damaged (a table
    recreated without its columns), or made by a newer gpuwatch. Nothing was written to it."""


# SQLite's primary result codes (the low byte of an extended code).
_PERM, _BUSY, _LOCKED, _READONLY, _IOERR, _CORRUPT, _FULL, _CANTOPEN, _NOTADB = 3, 5, 6, 8, 10, 11, 13, 14, 26
_BY_MESSAGE = (  # Python 3.10 has no sqlite_errorcode: the texts SQLite gives for these codes
    ("file is not a database", _NOTADB),
    ("malformed", _CORRUPT),
    ("is locked", _BUSY),
    ("disk is full", _FULL),
    ("readonly database", _READONLY),
    ("unable to open", _CANTOPEN),
    ("disk i/o error", _IOERR),
)
_STORE_CODES = frozenset({_PERM, _BUSY, _LOCKED, _READONLY, _IOERR, _CORRUPT, _FULL, _CANTOPEN, _NOTADB})


def _code(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF
    text = str(exc).lower()
    return next((c for words, c in _BY_MESSAGE if words in text), None)


def _is_store_error(exc: BaseException) -> bool:
    """An error of the place the database lives in, not of gpuwatch's SQL (a bug stays a bug)."""
    if type(exc) not in (sqlite3.OperationalError, sqlite3.DatabaseError):
        return False
    assert isinstance(exc, sqlite3.Error)
    return _code(exc) in _STORE_CODES


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _explain(exc: sqlite3.Error, path: Path, doing: str) -> StoreError:
    """``state_dir /x: cannot write gpuwatch.sqlite3: no space left on device; free some space ...``"""
    state_dir, code = path.parent, _code(exc)
    full = code == _FULL or (code in (_IOERR, _CANTOPEN) and disk_full(state_dir))
    if full:
        why, fix = "no space left on device", "free some space there, or point state_dir at another disk"
    elif code in (_CORRUPT, _NOTADB):
        why, fix = f"the file is corrupt ({exc})", "restart gpuwatch: it moves the file aside and starts afresh"
    elif code in (_READONLY, _CANTOPEN, _PERM, _IOERR) and _read_only_fs(state_dir):
        why, fix = "read-only file system", "mount it read-write, or point state_dir at a writable directory"
    elif code in (_READONLY, _CANTOPEN, _PERM) and not (
        os.access(state_dir, os.W_OK) and (not path.exists() or os.access(path, os.W_OK))
    ):
        why, fix = "permission denied", "make it writable for this user, or point state_dir at another directory"
    elif code in (_BUSY, _LOCKED):
        why, fix = "another process kept it locked for too long", "see which gpuwatch holds it (fuser that file)"
    else:
        why, fix = str(exc), "check the disk and the directory"
    return StoreError(f"state_dir {state_dir}: cannot {doing} {path.name}: {why}; {fix}", disk_full=full)


class Database:
    """The state database: one connection per process, one lock, explicit transactions.

    A failure of the disk or directory under it (full, read-only, corrupt) comes out as one
    :class:`StoreError`, with the transaction rolled back; an SQL mistake stays a ``sqlite3`` error.
    """

    def __init__(self, connection: sqlite3.Connection, path: Path | None = None) -> None:
        self.connection = connection
        self.path = path
        self.lock = threading.RLock()
        self._depth = 0
        self._owner: int | None = None  # the thread inside the transaction
        self._after: list[tuple[Callable[[], None], Callable[[], None]]] = []

    @property
    def in_transaction(self) -> bool:
        """Whether the calling thread is inside a transaction (another thread's does not count)."""
        return self._depth > 0 and self._owner == threading.get_ident()

    def after_transaction(self, committed: Callable[[], None], rolled_back: Callable[[], None]) -> None:
        """Call ``committed`` once the outermost transaction commits, else ``rolled_back``."""
        with self.lock:
            self._after.append((committed, rolled_back))

    def _store_error(self, exc: BaseException, doing: str) -> StoreError | None:
        if _is_store_error(exc) and isinstance(exc, sqlite3.Error):
            return _explain(exc, self.path or Path(":memory:"), doing)
        return None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All statements inside commit together or not at all (nesting joins the outer one)."""
        with self.lock:
            outer = self._depth == 0
            if outer:
                try:
                    self.connection.execute("BEGIN IMMEDIATE")
                except sqlite3.Error as exc:
                    error = self._store_error(exc, "write")
                    if error is None:
                        raise
                    raise error from exc
            self._depth += 1
            self._owner = threading.get_ident()
            try:
                yield self.connection
                if outer:
                    self.connection.execute("COMMIT")
            except BaseException as exc:
                self._depth -= 1
                if outer:
                    self._end(committed=False)
                    error = self._store_error(exc, "write")
                    if error is not None:
                        raise error from exc
                raise
            self._depth -= 1
            if outer:
                self._end(committed=True)

    def _end(self, *, committed: bool) -> None:
        self._owner = None
        if not committed and self.connection.in_transaction:
            # SQLite may have rolled back by itself already (a full disk does that).
            with contextlib.suppress(sqlite3.Error):
                self.connection.execute("ROLLBACK")
        after, self._after = self._after, []
        for on_commit, on_rollback in after:
            (on_commit if committed else on_rollback)()

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self.lock:
            try:
                return self.connection.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                error = self._store_error(exc, "read")
                if error is None:
                    raise
                raise error from exc

    def close(self) -> None:
        with self.lock:
            self.connection.close()


class _Corrupt(Exception):
    """The file is not an SQLite database, or one with damaged pages."""


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Bring the schema up to date. The version is read again under the write lock, so processes
    that open a new database at once run each migration exactly once. A schema newer than this
    gpuwatch knows, or one a migration cannot alter, is a :class:`SchemaError` (nothing written)."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version >= len(_MIGRATIONS):
        _refuse_newer(conn, path, version)
        return  # the common case: no write lock needed (read-only commands stay read-only)
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        _refuse_newer(conn, path, version)
        for script in _MIGRATIONS[version:]:
            for statement in script.split(";"):
                if statement.strip():
                    _alter(conn, statement, path)
        if version < len(_MIGRATIONS):
            conn.execute(f"PRAGMA user_version = {len(_MIGRATIONS)}")
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_written_by', ?)", (__version__,))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise


def _alter(conn: sqlite3.Connection, statement: str, path: Path) -> None:
    """One statement of a migration; a table it cannot alter (dropped, or recreated without its
    columns) is a :class:`SchemaError` rather than a traceback."""
    try:
        conn.execute(statement)
    except sqlite3.OperationalError as exc:
        if _is_store_error(exc):
            raise
        raise _schema_error(path, f"it cannot be brought up to date ({exc})") from None


def _refuse_newer(conn: sqlite3.Connection, path: Path, version: int) -> None:
    """A schema a newer gpuwatch made: its rows may mean what this one does not know."""
    if version <= len(_MIGRATIONS):
        return
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_written_by'").fetchone()
    except sqlite3.OperationalError:
        row = None
    writer = f"gpuwatch {row[0]}" if row and isinstance(row[0], str) and row[0] else "a newer gpuwatch"
    run = f"run {writer} (or newer) on it" if row else "run that newer gpuwatch (or newer) on it"
    raise SchemaError(
        f"state_dir {path.parent}: {path.name} was written by {writer} (schema version {version}, "
        f"this gpuwatch {__version__} knows up to {len(_MIGRATIONS)}); {run}, or move the file aside "
        "to start afresh with this one (its outbox, alert state and silences stay in the moved file)"
    )


def _schema_error(path: Path, why: str) -> SchemaError:
    return SchemaError(
        f"state_dir {path.parent}: {path.name} does not have the tables gpuwatch {__version__} writes: {why}; "
        f"move it aside (mv {path} {path}.damaged) to start afresh, or restore it from a backup"
    )


@functools.cache
def _expected_tables(version: int) -> dict[str, tuple[str, ...]]:
    """Table -> its column names in order, as the first ``version`` migrations make them (built in
    memory when first needed, once per version)."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        for script in _MIGRATIONS[:version]:
            conn.executescript(script)
        return {table: tuple(str(c[1]) for c in _columns(conn, table)) for table in _tables(conn)}
    finally:
        conn.close()


def _tables(conn: sqlite3.Connection) -> list[str]:
    rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
    return [str(r[0]) for r in rows.fetchall()]


def _columns(conn: sqlite3.Connection, table: str) -> list[tuple[Any, ...]]:
    """``PRAGMA table_info``: (cid, name, type, notnull, default, pk) per column."""
    return conn.execute(f'PRAGMA table_info("{table}")').fetchall()


def _check_schema(conn: sqlite3.Connection, path: Path) -> None:
    """Every table and column that the file's schema version has is there (a read-only open leaves
    an older version as it is), and no other column needs a value gpuwatch does not give (NOT NULL
    without a default); tables and columns a person added are fine."""
    version = min(conn.execute("PRAGMA user_version").fetchone()[0], len(_MIGRATIONS))
    present = set(_tables(conn))
    problems: list[str] = []
    for table, wanted in _expected_tables(version).items():
        if table not in present:
            problems.append(f"no table {table}")
            continue
        columns = _columns(conn, table)
        have = {str(c[1]) for c in columns}
        missing = [name for name in wanted if name not in have]
        if missing:
            problems.append(f"table {table} has no column {', '.join(missing)}")
        unfilled = [str(c[1]) for c in columns if c[1] not in wanted and c[3] and c[4] is None and not c[5]]
        if unfilled:
            problems.append(f"table {table} has a column gpuwatch does not fill: {', '.join(unfilled)}")
    if problems:
        raise _schema_error(path, ", ".join(problems))


_HEADER = b"SQLite format 3\x00"


def _check_header(path: Path) -> None:
    """Refuse a file that is not SQLite before SQLite opens it: SQLite would delete the -wal
    beside it on close, and with it what could still be read of the state."""
    try:
        with path.open("rb") as fh:
            head = fh.read(len(_HEADER))
    except OSError:
        return  # SQLite says what is wrong with it
    if head and head != _HEADER:
        raise _Corrupt("file is not a database")


def _connect(path: Path, monotonic: Callable[[], float], sleep: Callable[[float], None]) -> sqlite3.Connection:
    """Open, switch to WAL, check the pages, migrate. Retries what another process opening the
    same new file at the same moment can cause ("database is locked" outside the busy timeout)."""
    deadline = monotonic() + _OPEN_DEADLINE_SECONDS
    delay = 0.01
    while True:
        conn = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            problems = [str(row[0]) for row in conn.execute("PRAGMA quick_check(5)").fetchall()]
            if problems != ["ok"]:
                raise _Corrupt("; ".join(problems)[:200])
            _migrate(conn, path)
            _check_schema(conn, path)
            return conn
        except sqlite3.Error as exc:
            conn.close()
            code = _code(exc)
            if code in (_CORRUPT, _NOTADB):
                raise _Corrupt(str(exc)) from None
            if code in (_BUSY, _LOCKED) and monotonic() < deadline:
                sleep(delay)
                delay = min(delay * 2, 0.5)
                continue
            raise _explain(exc, path, "open") from None
        except BaseException:
            conn.close()
            raise


_OPEN_DEADLINE_SECONDS = 60.0


def _create(path: Path) -> None:
    """Make a new database whole beside ``path`` (0600, WAL, every migration) and link it into
    place: another process never sees it half made (an empty file has no tables), and of
    several that create it at once, the first link wins and the others use it."""
    if path.exists():
        return
    temp = path.with_name(f"{path.name}.new-{os.getpid()}-{threading.get_ident()}")
    try:
        os.close(open_private(temp, os.O_RDWR | os.O_TRUNC))  # SQLite gives -wal and -shm its mode
        conn = sqlite3.connect(temp, timeout=30, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")  # kept in the file
            _migrate(conn, temp)
        finally:
            conn.close()  # checkpoints: everything is in the main file now
        try:
            os.link(temp, path)
        except FileExistsError:
            pass  # another process made it first: use theirs
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            # No hard links on this file system: SQLite creates it in place (migrations are
            # still made once, under its write lock).
    except OSError as exc:
        raise os_error(exc, path.parent, f"create {path.name}") from None
    except sqlite3.Error as exc:
        raise _explain(exc, path, "create") from None
    finally:
        for suffix in ("", "-wal", "-shm", "-journal"):
            with contextlib.suppress(OSError):
                os.unlink(f"{temp}{suffix}")


def _aside_name(path: Path, now: float) -> Path:
    stamp = datetime.fromtimestamp(now, timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while aside.exists():
        aside = path.with_name(f"{path.name}.corrupt-{stamp}.{n}")
        n += 1
    return aside


def _move_aside(path: Path, problem: str, lock: StateLock | None, clock: Callable[[], float]) -> Path:
    """Rename the corrupt file (with its -wal and -shm, so it can still be inspected as a whole)
    out of the way. Only the process that holds the state directory may: another one may have
    the file open and would go on writing to the renamed one."""
    state_dir = path.parent
    try:
        held = lock if lock is not None and lock.held else lock_state_dir(state_dir, "gpuwatch (moving a corrupt file)")
    except StateDirBusy as busy:
        who = busy.holder.describe() if busy.holder is not None else "another gpuwatch"
        raise StoreError(
            f"state_dir {state_dir}: {path.name} is corrupt ({problem}) and {who} has it open; "
            "stop that one, then run gpuwatch again: it moves the file aside and starts afresh"
        ) from None
    try:
        aside = _aside_name(path, clock())
        try:
            for suffix in ("", "-wal", "-shm"):
                source = Path(f"{path}{suffix}")
                if source.exists():
                    source.rename(f"{aside}{suffix}")
        except OSError as exc:
            raise os_error(exc, state_dir, f"move the corrupt {path.name} aside") from None
        return aside
    finally:
        if held is not lock:
            held.release()


def open_db(
    state_dir: Path | None,
    *,
    lock: StateLock | None = None,
    clock: Callable[[], float] = time.time,
    monotonic: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    read_only_ok: bool = False,
) -> Database:
    """Open (creating and migrating) the state database; ``None``: a throw-away one in memory.

    The file and its -wal/-shm are 0600. A corrupt file is moved aside as
    ``gpuwatch.sqlite3.corrupt-<UTC time>`` (said in one ERROR line) and a fresh one started:
    by the process holding the state directory (``lock``), or by this one if it can take the
    lock for the moment. Anything else that stops it is a :class:`StoreError` saying what and where.

    ``read_only_ok`` (commands that only read, such as ``gpuwatch alerts``): when this user may not
    write the state directory (a read-only mount, another user's directory it may read), the
    existing database is opened read-only instead; a write to it then fails with a StoreError.
    """
    if state_dir is None:
        memory = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
        _migrate(memory, Path(":memory:"))
        return Database(memory)
    if not read_only_ok:
        return _open_writable(state_dir, lock, clock, monotonic, sleep)
    try:
        return _open_writable(state_dir, lock, clock, monotonic, sleep)
    except StateError as exc:
        writable = os.access(state_dir, os.W_OK) and not _read_only_fs(state_dir)
        if writable or not (state_dir / DB_NAME).exists():
            raise  # not a matter of permissions: there is nothing to read, or something else is wrong
        try:
            db = open_db_readonly(state_dir)
        except StateError:
            raise exc from None
        log.info("state_dir %s cannot be written (%s): reading %s read-only", state_dir, exc, DB_NAME)
        return db


def _open_writable(
    state_dir: Path,
    lock: StateLock | None,
    clock: Callable[[], float],
    monotonic: Callable[[], float],
    sleep: Callable[[float], None],
) -> Database:
    ensure_state_dir(state_dir)
    path = state_dir / DB_NAME
    _create(path)
    try:
        os.close(open_private(path, os.O_RDWR))  # an older gpuwatch made it with the umask's mode
    except OSError as exc:
        raise os_error(exc, state_dir, f"open {DB_NAME}") from None
    for suffix in ("-wal", "-shm"):
        make_private(Path(f"{path}{suffix}"))
    try:
        _check_header(path)
        return Database(_connect(path, monotonic, sleep), path)
    except _Corrupt as exc:
        problem = str(exc)
    aside = _move_aside(path, problem, lock, clock)
    log.error(
        "state database %s was corrupt (%s): moved it aside to %s and started a fresh one "
        "(the outbox and alert state start empty)",
        path,
        problem,
        aside.name,
    )
    _create(path)
    try:
        return Database(_connect(path, monotonic, sleep), path)
    except _Corrupt as exc:  # a brand-new file cannot be corrupt unless the disk is failing
        raise StoreError(f"state_dir {state_dir}: a new {DB_NAME} is corrupt at once ({exc}); check the disk") from None


def open_db_readonly(state_dir: Path) -> Database:
    """A read-only connection to the state database: for readers in other threads (the web page,
    /metrics), where in WAL mode its reads never wait for the daemon's writes, nor block them; and
    for commands that only read, run by a user who may not write the state directory. A schema
    this gpuwatch does not write is a :class:`SchemaError`, as for :func:`open_db`.

    SQLite opens a WAL database read-only only when its -shm file exists or can be made. Where it
    can be neither (a read-only mount after the daemon stopped), every committed change is in the
    main file (no -wal left), so that file is read as it is (``immutable``)."""
    path = (state_dir / DB_NAME).resolve()
    uri = path.as_uri()
    try:
        db = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=5, check_same_thread=False, isolation_level=None)
        db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()  # the open is lazy: fail here, not later
    except sqlite3.Error as exc:
        wal = Path(f"{path}-wal")
        no_shm = _code(exc) in (_CANTOPEN, _READONLY)  # READONLY_DIRECTORY: no -shm, none can be made
        readable = _readable(path)
        if not no_shm or not readable or (wal.exists() and wal.stat().st_size > 0):
            if not readable:
                raise StoreError(
                    f"state_dir {state_dir}: cannot read {DB_NAME}: permission denied; run this as the user "
                    f"that owns it ({_owner(path)})"
                ) from None
            raise _explain(exc, path, "read") from None
        db = sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, check_same_thread=False, isolation_level=None)
    try:
        _refuse_newer(db, path, db.execute("PRAGMA user_version").fetchone()[0])
        _check_schema(db, path)
    except sqlite3.Error as exc:
        db.close()
        raise _explain(exc, path, "read") from None
    except BaseException:
        db.close()
        raise
    return Database(db, path)


def _readable(path: Path) -> bool:
    """Whether this process may read ``path`` (tried: ``os.access`` ignores capabilities such as
    CAP_DAC_READ_SEARCH for users other than root)."""
    try:
        os.close(os.open(path, os.O_RDONLY))
    except OSError:
        return False
    return True


def _owner(path: Path) -> str:
    try:
        return pwd.getpwuid(path.stat().st_uid).pw_name
    except (KeyError, OSError):
        return "the owner of the file"
