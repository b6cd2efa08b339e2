"""SQLite state under state_dir: the outbox of unsent messages (and, later, alert state).

A message is written to the outbox before it is sent and leaves it only when its channel
accepted it, so a Feishu outage, a kill or a restart delays messages and loses none. What
is pending is sent first, oldest first, on the next cycle or run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .notify.base import Channel, DeliveryError
from .rules import AlertRecord, Memory, Silence

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
)


class Database:
    """The state database: one connection per process, one lock, explicit transactions."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection
        self.lock = threading.RLock()
        self._depth = 0

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All statements inside commit together or not at all (nesting joins the outer one)."""
        with self.lock:
            outer = self._depth == 0
            if outer:
                self.connection.execute("BEGIN IMMEDIATE")
            self._depth += 1
            try:
                yield self.connection
            except BaseException:
                self._depth -= 1
                if outer:
                    self.connection.execute("ROLLBACK")
                raise
            self._depth -= 1
            if outer:
                self.connection.execute("COMMIT")

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self.lock:
            return self.connection.execute(sql, args).fetchall()

    def close(self) -> None:
        with self.lock:
            self.connection.close()


def open_db(state_dir: Path | None) -> Database:
    """Open (creating and migrating) the state database; ``None``: a throw-away one in memory."""
    if state_dir is None:
        db = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
    else:
        state_dir.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(state_dir / DB_NAME, timeout=30, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
    version = db.execute("PRAGMA user_version").fetchone()[0]
    for number, script in enumerate(_MIGRATIONS[version:], start=version + 1):
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in script.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {number}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    return Database(db)


def open_db_readonly(state_dir: Path) -> Database:
    """A second, read-only connection to the state database, for readers in other threads (the web
    page, /metrics): in WAL mode its reads never wait for the daemon's writes, nor block them."""
    path = (state_dir / DB_NAME).resolve()
    db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=5, check_same_thread=False, isolation_level=None)
    return Database(db)


@dataclass(frozen=True)
class OutboxItem:
    id: int
    channel: str
    summary: str
    payload: dict[str, Any]
    created_at: float
    attempts: int
    last_error: str | None


@dataclass(frozen=True)
class FlushResult:
    sent: int
    failed: int  # left in the outbox after a failure this time
    dead: int  # rejected for good (the message itself was bad); kept for inspection
    errors: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.dead == 0


class Outbox:
    """Messages waiting for their channel, in the order they were written."""

    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock

    def add(self, channel: str, summary: str, payloads: Iterable[Mapping[str, Any]]) -> list[int]:
        now = self.clock()
        ids = []
        with self.db.transaction() as conn:
            for payload in payloads:
                cur = conn.execute(
                    "INSERT INTO outbox (channel, summary, payload, created_at) VALUES (?, ?, ?, ?)",
                    (channel, summary, json.dumps(payload, ensure_ascii=False), now),
                )
                ids.append(int(cur.lastrowid or 0))
        return ids

    def pending(self, channel: str | None = None) -> list[OutboxItem]:
        query = "SELECT id, channel, summary, payload, created_at, attempts, last_error FROM outbox WHERE dead = 0"
        args: tuple[str, ...] = ()
        if channel is not None:
            query += " AND channel = ?"
            args = (channel,)
        rows = self.db.query(query + " ORDER BY id", args)
        return [OutboxItem(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5], r[6]) for r in rows]

    def count(self) -> int:
        return int(self.db.query("SELECT COUNT(*) FROM outbox WHERE dead = 0")[0][0])

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

    def flush(self, channels: Mapping[str, Channel]) -> FlushResult:
        """Deliver what is pending, oldest first. A channel that fails stops for this time,
        so its messages keep their order; other channels go on."""
        sent = failed = dead = 0
        errors: list[str] = []
        blocked: set[str] = set()
        for item in self.pending():
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
            try:
                channel.deliver(item.payload)
            except DeliveryError as exc:
                if exc.message_fault:
                    # The message itself was refused (malformed, too large): retrying it would
                    # block every later message forever. Keep it, marked, and go on.
                    self.failed(item.id, str(exc), dead=True)
                    dead += 1
                    log.error("%s refused message %d (%s) for good: %s", item.channel, item.id, item.summary, exc)
                    errors.append(f"{item.channel}: {exc}")
                    continue
                self.failed(item.id, str(exc))
                blocked.add(item.channel)
                failed += 1
                errors.append(f"{item.channel}: {exc}")
                level = logging.ERROR if exc.permanent else logging.WARNING
                log.log(level, "%s: message %d (%s) not delivered: %s", item.channel, item.id, item.summary, exc)
                continue
            self.delivered(item.id)
            sent += 1
            log.info("%s: delivered message %d (%s)", item.channel, item.id, item.summary)
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

    def save(self, records: Mapping[str, AlertRecord], memory: Memory) -> None:
        """Replace the alert state (call inside the transaction that also queues the messages)."""
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM alerts")
            conn.executemany(
                "INSERT INTO alerts (id, record) VALUES (?, ?)",
                [(kid, json.dumps(r.as_dict(), ensure_ascii=False)) for kid, r in records.items()],
            )
            conn.execute(
                "INSERT OR REPLACE INTO rule_memory (id, memory) VALUES (1, ?)",
                (json.dumps(memory.as_dict(), ensure_ascii=False),),
            )

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
    ) -> Silence:
        with self.db.transaction() as conn:
            cur = conn.execute(
                "INSERT INTO silences (rule, host, user, gpu, ends_at, comment, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (rule, host, user, gpu, ends_at, comment, now),
            )
            sid = int(cur.lastrowid or 0)
        return Silence(
            id=sid, ends_at=ends_at, comment=comment, created_at=now, rule=rule, host=host, user=user, gpu=gpu
        )

    def silences(self, now: float | None = None) -> list[Silence]:
        """Silences, oldest first; with ``now``, only those still in force."""
        rows = self.db.query("SELECT id, rule, host, user, gpu, ends_at, comment, created_at FROM silences ORDER BY id")
        found = [
            Silence(id=r[0], rule=r[1], host=r[2], user=r[3], gpu=r[4], ends_at=r[5], comment=r[6], created_at=r[7])
            for r in rows
        ]
        return [s for s in found if now is None or s.ends_at > now]

    def remove_silence(self, silence_id: int) -> bool:
        with self.db.transaction() as conn:
            return conn.execute("DELETE FROM silences WHERE id = ?", (silence_id,)).rowcount > 0


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

    def outbox_counts(self) -> dict[str, int]:
        return self._read(lambda db: Outbox(db).count_by_channel(), {})

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
