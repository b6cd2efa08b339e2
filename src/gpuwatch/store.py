"""SQLite state under state_dir: the outbox of unsent messages, alert state and silences.

A message is written to the outbox before it is sent and leaves it only when its channel
accepted it, so a Feishu outage, a kill or a restart delays messages and loses none. What
is pending is sent first, oldest first, on the next cycle or run.

The place it lives in can fail: a corrupt file is moved aside at open and a fresh one started;
a full or read-only disk is one :class:`StoreError` naming the directory. While the disk is
full, a message that could not be queued can be held in memory (:meth:`Outbox.hold`) and is
written before anything newer once there is room, and a delivery that could not be recorded
is remembered, so it is not sent again by this process.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pwd
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from .notify.base import Channel, DeliveryError
from .rules import AlertRecord, Memory, Silence
from .statedir import (
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
from .text import format_duration, local_time

log = logging.getLogger(__name__)

DB_NAME = "gpuwatch.sqlite3"

T = TypeVar("T")

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
)
#: After a send that may have been delivered (no verdict came back), the wait before the next try:
#: 60 s, doubling with each doubtful try in a row, at most 15 min. Posting again at once is what
#: flooded a group whose slow webhook accepted every post but answered too late.
MAYBE_DELIVERED_WAIT_SECONDS = 60.0
MAYBE_DELIVERED_WAIT_CAP_SECONDS = 900.0


class StoreError(StateError):
    """The state database could not be read or written (a full disk, a read-only or vanished
    directory, a corrupt file): one line saying what, where and what to do. Nothing of the
    failed transaction was written."""

    def __init__(self, message: str, *, disk_full: bool = False) -> None:
        super().__init__(message)
        self.disk_full = disk_full


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
        self._after: list[tuple[Callable[[], None], Callable[[], None]]] = []

    @property
    def in_transaction(self) -> bool:
        return self._depth > 0

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


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring the schema up to date. The version is read again under the write lock, so processes
    that open a new database at once run each migration exactly once."""
    if conn.execute("PRAGMA user_version").fetchone()[0] >= len(_MIGRATIONS):
        return  # the common case: no write lock needed (read-only commands stay read-only)
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        for script in _MIGRATIONS[version:]:
            for statement in script.split(";"):
                if statement.strip():
                    conn.execute(statement)
        if version < len(_MIGRATIONS):
            conn.execute(f"PRAGMA user_version = {len(_MIGRATIONS)}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise


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
            _migrate(conn)
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
            _migrate(conn)
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
        _migrate(memory)
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
    for commands that only read, run by a user who may not write the state directory.

    SQLite opens a WAL database read-only only when its -shm file exists or can be made. Where it
    can be neither (a read-only mount after the daemon stopped), every committed change is in the
    main file (no -wal left), so that file is read as it is (``immutable``)."""
    path = (state_dir / DB_NAME).resolve()
    uri = path.as_uri()
    try:
        db = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=5, check_same_thread=False, isolation_level=None)
        db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()  # the open is lazy: fail here, not later
        return Database(db, path)
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


@dataclass(frozen=True)
class OutboxItem:
    id: int
    channel: str
    summary: str
    payload: dict[str, Any]
    created_at: float
    attempts: int
    last_error: str | None
    not_before: float = 0.0  # not tried again before this time (a try that may have been delivered)
    in_doubt: int = 0  # doubtful tries in a row
    kind: str = ""  # report | alert | test ("" for rows of an older gpuwatch)
    scope: str = ""  # what a report covers: overview, free, user:alice


@dataclass(frozen=True)
class FlushResult:
    sent: int
    failed: int  # left in the outbox after a failure this time
    dead: int  # rejected for good (the message itself was bad); kept for inspection
    errors: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.dead == 0


@dataclass(frozen=True)
class _Held:
    """A message that could not be queued (the disk was full), waiting in memory."""

    channel: str
    summary: str
    payloads: tuple[Mapping[str, Any], ...]
    created_at: float
    kind: str = ""
    scope: str = ""


def replaces_older(kind: str, scope: str) -> bool:
    """Whether a message makes an older one of the same kind and scope still waiting for its
    channel obsolete: a report does (a backlog of reports is news, not history: only the newest
    overview is worth sending); an alert, a resolution or a test message never does."""
    return kind == "report" and bool(scope)


class Outbox:
    """Messages waiting for their channel, in the order they were written.

    A report replaces the older report of the same scope (``"overview"``, ``"user:alice"``) still
    waiting for the same channel (:func:`replaces_older`); alerts are never dropped and keep their
    order."""

    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock
        self._held: list[_Held] = []
        self._writing_held = False
        # Outcomes that could not be written (full disk): id -> None (delivered) or the error
        # that refused it for good. Such a row is never sent again by this process.
        self._unrecorded: dict[int, str | None] = {}
        # Rows whose last try may have been delivered: id -> not before (also in the row, unless
        # the disk was full when it was written).
        self._doubt: dict[int, float] = {}

    # -- writing

    def add(
        self,
        channel: str,
        summary: str,
        payloads: Iterable[Mapping[str, Any]],
        *,
        kind: str = "",
        scope: str = "",
    ) -> list[int]:
        """Queue a message's parts (held messages first, to keep the order); a report replaces the
        older one of its scope still waiting (:func:`replaces_older`). Raises :class:`StoreError`
        when the disk cannot take it; nothing is queued (nor replaced) then."""
        now = self.clock()
        with self.db.transaction() as conn:
            self._write_held(conn)
            return self._insert(conn, _Held(channel, summary, tuple(payloads), now, kind, scope))

    def _insert(self, conn: sqlite3.Connection, message: _Held) -> list[int]:
        if replaces_older(message.kind, message.scope):
            self._replace_older(conn, message)
        ids = []
        for payload in message.payloads:
            cur = conn.execute(
                "INSERT INTO outbox (channel, summary, payload, created_at, kind, scope) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    message.channel,
                    message.summary,
                    json.dumps(payload, ensure_ascii=False),
                    message.created_at,
                    message.kind,
                    message.scope,
                ),
            )
            ids.append(int(cur.lastrowid or 0))
        return ids

    def _replace_older(self, conn: sqlite3.Connection, message: _Held) -> None:
        """Drop the parts of older messages of the same kind and scope still waiting for the channel
        (not those refused for good: they stay for inspection)."""
        rows = conn.execute(
            "SELECT id, summary FROM outbox WHERE channel = ? AND kind = ? AND scope = ? AND dead = 0 ORDER BY id",
            (message.channel, message.kind, message.scope),
        ).fetchall()
        if not rows:
            return
        ids = [int(r[0]) for r in rows]
        conn.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])
        replaced = list(dict.fromkeys(str(r[1]) for r in rows))

        def committed() -> None:
            for item_id in ids:  # forgotten with the row (a delivery not yet recorded, a wait)
                self._unrecorded.pop(item_id, None)
                self._doubt.pop(item_id, None)
            log.info(
                "outbox: %s replaces the older %s still waiting for %s (%d part%s dropped)",
                message.summary,
                ", ".join(replaced),
                message.channel,
                len(ids),
                "" if len(ids) == 1 else "s",
            )

        self.db.after_transaction(committed, lambda: None)

    def hold(
        self, channel: str, summary: str, payloads: Iterable[Mapping[str, Any]], *, kind: str = "", scope: str = ""
    ) -> None:
        """Keep a message that :meth:`add` could not queue (a full disk) in memory: it is written
        before anything newer by the next :meth:`add` or :meth:`flush` that can write (a newer
        report held replaces an older one of its scope here too). Lost if the process ends first."""
        if replaces_older(kind, scope):
            self._held = [h for h in self._held if (h.channel, h.kind, h.scope) != (channel, kind, scope)]
        self._held.append(_Held(channel, summary, tuple(payloads), self.clock(), kind, scope))

    def add_or_hold(
        self, channel: str, summary: str, payloads: Iterable[Mapping[str, Any]], *, kind: str = "", scope: str = ""
    ) -> bool:
        """:meth:`add`, or :meth:`hold` when the disk cannot take it: False then. Only outside a
        transaction (inside one, the caller's other writes would be lost with it)."""
        parts = tuple(payloads)
        try:
            self.add(channel, summary, parts, kind=kind, scope=scope)
        except StoreError:
            if self.db.in_transaction:
                raise
            self.hold(channel, summary, parts, kind=kind, scope=scope)
            return False
        return True

    @property
    def held(self) -> int:
        """Messages waiting in memory for room on the disk."""
        return len(self._held)

    def _write_held(self, conn: sqlite3.Connection) -> None:
        if not self._held or self._writing_held:
            return
        held = list(self._held)
        for message in held:
            self._insert(conn, message)
        self._writing_held = True

        def committed() -> None:
            self._writing_held = False
            del self._held[: len(held)]
            log.warning("outbox: queued %d messages that waited in memory for room on the disk", len(held))

        def rolled_back() -> None:
            self._writing_held = False

        self.db.after_transaction(committed, rolled_back)

    def _catch_up(self) -> str | None:
        """Write what waits in memory; the error when the disk still cannot take it."""
        if not self._held and not self._unrecorded:
            return None
        try:
            with self.db.transaction() as conn:
                self._write_held(conn)
                for item_id, error in list(self._unrecorded.items()):
                    if error is None:
                        conn.execute("DELETE FROM outbox WHERE id = ?", (item_id,))
                    else:
                        conn.execute(
                            "UPDATE outbox SET attempts = attempts + 1, last_error = ?, dead = 1 WHERE id = ?",
                            (error, item_id),
                        )
                done = dict(self._unrecorded)
        except StoreError as exc:
            return str(exc)
        for item_id in done:
            self._unrecorded.pop(item_id, None)
        return None

    # -- reading

    def pending(self, channel: str | None = None) -> list[OutboxItem]:
        query = (
            "SELECT id, channel, summary, payload, created_at, attempts, last_error, not_before, in_doubt, kind, scope "
            "FROM outbox WHERE dead = 0"
        )
        args: tuple[str, ...] = ()
        if channel is not None:
            query += " AND channel = ?"
            args = (channel,)
        rows = self.db.query(query + " ORDER BY id", args)
        return [
            OutboxItem(
                r[0],
                r[1],
                r[2],
                json.loads(r[3]),
                r[4],
                r[5],
                r[6],
                max(r[7], self._doubt.get(r[0], 0)),
                r[8],
                r[9],
                r[10],
            )
            for r in rows
            if r[0] not in self._unrecorded
        ]

    def count(self) -> int:
        """Messages in the outbox still to be sent (not those held in memory: see :attr:`held`)."""
        total = int(self.db.query("SELECT COUNT(*) FROM outbox WHERE dead = 0")[0][0])
        return total - len(self._unrecorded)

    # -- outcomes

    def count_by_channel(self) -> dict[str, int]:
        """Messages waiting, per channel (refused-for-good ones not counted)."""
        rows = self.db.query("SELECT channel, COUNT(*) FROM outbox WHERE dead = 0 GROUP BY channel")
        return {str(channel): int(n) for channel, n in rows}

    def delivered(self, item_id: int) -> None:
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM outbox WHERE id = ?", (item_id,))

    def failed(self, item_id: int, error: str, *, dead: bool = False) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ?, dead = ? WHERE id = ?",
                (error, int(dead), item_id),
            )

    def _record(self, item_id: int, error: str | None, *, dead: bool = False) -> str | None:
        """Write an outcome; on a full disk remember it instead (a delivered message must not go
        out again every cycle). Returns the store's error, if any."""
        try:
            if error is None:
                self.delivered(item_id)
            else:
                self.failed(item_id, error, dead=dead)
        except StoreError as exc:
            if error is None or dead:
                self._unrecorded[item_id] = error
            return str(exc)  # a failed attempt's count and error can wait for the next failure
        return None

    def _record_doubt(self, item: OutboxItem, error: str, now: float) -> tuple[float, str | None]:
        """The send may have been delivered: wait before the next try (remembered in memory too,
        so a full disk cannot turn it into an instant re-post). Returns (wait, store error)."""
        doubts = item.in_doubt + 1
        wait = min(MAYBE_DELIVERED_WAIT_CAP_SECONDS, MAYBE_DELIVERED_WAIT_SECONDS * 2 ** (doubts - 1))
        self._doubt[item.id] = now + wait
        try:
            with self.db.transaction() as conn:
                conn.execute(
                    "UPDATE outbox SET attempts = attempts + 1, last_error = ?, not_before = ?, in_doubt = ? "
                    "WHERE id = ?",
                    (error, now + wait, doubts, item.id),
                )
        except StoreError as exc:
            return wait, str(exc)
        return wait, None

    def flush(self, channels: Mapping[str, Channel], stop: threading.Event | None = None) -> FlushResult:
        """Deliver what is pending, oldest first. A channel that fails stops for this time,
        so its messages keep their order; other channels go on. A message that may have been
        delivered waits (and its channel's later messages behind it) until its ``not_before``.
        With ``stop`` set, nothing more is sent: the rest goes first next time."""
        sent = failed = dead = 0
        errors: list[str] = []
        blocked: set[str] = set()
        store_error = self._catch_up()
        now = self.clock()
        for item in self.pending():
            if stop is not None and stop.is_set():
                break
            channel = channels.get(item.channel)
            if channel is None:
                if item.channel not in blocked:
                    errors.append(f"{item.channel}: not configured any more; its messages stay in the outbox")
                    blocked.add(item.channel)
                failed += 1
                continue
            if item.channel in blocked:
                failed += 1
                continue
            if item.not_before > now:
                blocked.add(item.channel)  # its later messages wait behind it: their order is kept
                failed += 1
                when = local_time(item.not_before)
                errors.append(f"{item.channel}: message {item.id} may have been delivered; next try at {when}")
                continue
            try:
                channel.deliver(item.payload)
            except DeliveryError as exc:
                if exc.maybe_delivered:  # never marked dead: it may be in the group already, or not
                    wait, problem = self._record_doubt(item, str(exc), now)
                    store_error = problem or store_error
                    blocked.add(item.channel)
                    failed += 1
                    errors.append(f"{item.channel}: {exc}")
                    log.log(
                        logging.ERROR if exc.permanent else logging.WARNING,
                        "%s: message %d (%s) may have been delivered; next try in %s: %s",
                        item.channel,
                        item.id,
                        item.summary,
                        format_duration(wait),
                        exc,
                    )
                    continue
                if exc.message_fault:
                    # The message itself was refused (malformed, too large): retrying it would
                    # block every later message forever. Keep it, marked, and go on.
                    store_error = self._record(item.id, str(exc), dead=True) or store_error
                    dead += 1
                    log.error("%s refused message %d (%s) for good: %s", item.channel, item.id, item.summary, exc)
                    errors.append(f"{item.channel}: {exc}")
                    continue
                store_error = self._record(item.id, str(exc)) or store_error
                blocked.add(item.channel)
                failed += 1
                errors.append(f"{item.channel}: {exc}")
                level = logging.ERROR if exc.permanent else logging.WARNING
                log.log(level, "%s: message %d (%s) not delivered: %s", item.channel, item.id, item.summary, exc)
                continue
            store_error = self._record(item.id, None) or store_error
            sent += 1
            if getattr(channel, "dry_run", False):  # --dry-run: printed; a log must never say it was sent
                log.info("%s: message %d (%s) printed, not sent (dry run)", item.channel, item.id, item.summary)
            else:
                log.info("%s: delivered message %d (%s)", item.channel, item.id, item.summary)
        if store_error:
            # Said once per flush, not once per message.
            waiting = [f"{len(self._held)} messages wait in memory to be queued"] if self._held else []
            if self._unrecorded:
                waiting.append(
                    f"{len(self._unrecorded)} sent ones are not marked sent yet (not sent again unless gpuwatch "
                    "restarts first)"
                )
            log.error("outbox: %s%s", f"{'; '.join(waiting)}: " if waiting else "", store_error)
            errors.append(store_error)
        return FlushResult(sent=sent, failed=failed, dead=dead, errors=tuple(errors))


class AlertStore:
    """Alert records, rule memory and silences: what makes a restart announce nothing twice."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def records(self) -> dict[str, AlertRecord]:
        return {
            row[0]: AlertRecord.from_dict(json.loads(row[1])) for row in self.db.query("SELECT id, record FROM alerts")
        }

    def memory(self) -> Memory:
        rows = self.db.query("SELECT memory FROM rule_memory WHERE id = 1")
        return Memory.from_dict(json.loads(rows[0][0])) if rows else Memory()

    def save(self, records: Mapping[str, AlertRecord], memory: Memory, evaluated_at: float | None = None) -> None:
        """Replace the alert state (call inside the transaction that also queues the messages).
        ``evaluated_at``: when the poll it comes from was evaluated (None: keep the time saved)."""
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM alerts")
            conn.executemany(
                "INSERT INTO alerts (id, record) VALUES (?, ?)",
                [(kid, json.dumps(r.as_dict(), ensure_ascii=False)) for kid, r in records.items()],
            )
            conn.execute(
                "INSERT INTO rule_memory (id, memory, evaluated_at) VALUES (1, ?, ?) ON CONFLICT (id) DO UPDATE"
                " SET memory = excluded.memory, evaluated_at = coalesce(excluded.evaluated_at, evaluated_at)",
                (json.dumps(memory.as_dict(), ensure_ascii=False), evaluated_at),
            )

    def evaluated_at(self) -> float | None:
        """When a poll last updated the alert state (epoch seconds); None if never."""
        rows = self.db.query("SELECT evaluated_at FROM rule_memory WHERE id = 1")
        return float(rows[0][0]) if rows and rows[0][0] is not None else None

    def add_silence(
        self,
        *,
        ends_at: float,
        comment: str,
        now: float,
        rule: str | None = None,
        host: str | None = None,
        user: str | None = None,
        gpu: int | None = None,
        pid: int | None = None,
        author: str | None = None,
    ) -> Silence:
        with self.db.transaction() as conn:
            cur = conn.execute(
                "INSERT INTO silences (rule, host, user, gpu, pid, author, ends_at, comment, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (rule, host, user, gpu, pid, author, ends_at, comment, now),
            )
            sid = int(cur.lastrowid or 0)
        return Silence(
            id=sid,
            ends_at=ends_at,
            comment=comment,
            created_at=now,
            rule=rule,
            host=host,
            user=user,
            gpu=gpu,
            pid=pid,
            author=author,
        )

    def silences(self, now: float | None = None) -> list[Silence]:
        """Silences, oldest first; with ``now``, only those still in force."""
        rows = self.db.query(
            "SELECT id, rule, host, user, gpu, pid, author, ends_at, comment, created_at FROM silences ORDER BY id"
        )
        found = [
            Silence(
                id=r[0],
                rule=r[1],
                host=r[2],
                user=r[3],
                gpu=r[4],
                pid=r[5],
                author=r[6],
                ends_at=r[7],
                comment=r[8],
                created_at=r[9],
            )
            for r in rows
        ]
        return [s for s in found if now is None or s.ends_at > now]

    def remove_silence(self, silence_id: int) -> bool:
        with self.db.transaction() as conn:
            return conn.execute("DELETE FROM silences WHERE id = ?", (silence_id,)).rowcount > 0


class ReportRuns:
    """When each scheduled report was last made (queued for sending), by its schedule's name
    (``ReportSchedule.describe()``: "overview every 1h"): how a ``--once`` run from cron knows
    whether a report is due by its own schedule (:mod:`gpuwatch.timetable`)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def last(self) -> dict[str, float]:
        return {str(name): float(at) for name, at in self.db.query("SELECT name, last_at FROM report_runs")}

    def record(self, name: str, at: float) -> None:
        """Remember that ``name`` was made at ``at`` (call inside the transaction that queues it)."""
        with self.db.transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO report_runs (name, last_at) VALUES (?, ?)", (name, at))


class StoreReader:
    """What other threads (the web page, /metrics) read from the state database, through their own
    read-only connection: the alert state and the outbox, never a write, never a wait on the daemon.

    The database may not exist yet (a daemon just started); then there is nothing to read. A
    connection that failed is reopened on the next read.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._lock = threading.Lock()
        self._db: Database | None = None

    def _database(self) -> Database | None:
        with self._lock:
            if self._db is None and (self.state_dir / DB_NAME).exists():
                self._db = open_db_readonly(self.state_dir)
            return self._db

    def _read(self, read: Callable[[Database], T], empty: T) -> T:
        db = self._database()
        if db is None:
            return empty
        try:
            return read(db)
        except sqlite3.Error:
            log.warning("reading the state database failed; reopening it on the next read", exc_info=True)
            with self._lock:
                if self._db is db:
                    self._db = None
            db.close()
            raise

    def alerts(self) -> tuple[dict[str, AlertRecord], list[Silence]]:
        """Every alert record and every silence (the caller picks those in force)."""
        empty: tuple[dict[str, AlertRecord], list[Silence]] = ({}, [])
        return self._read(lambda db: (AlertStore(db).records(), AlertStore(db).silences()), empty)

    def alerts_evaluated_at(self) -> float | None:
        """When a poll last updated the alert state; None if never (or no database yet)."""
        return self._read(lambda db: AlertStore(db).evaluated_at(), None)

    def outbox_counts(self) -> dict[str, int]:
        return self._read(lambda db: Outbox(db).count_by_channel(), {})

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
