"""Alert records, rule memory, silences and acknowledgements in the state database."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping

from ..rules import Ack, AlertRecord, Memory, Silence
from .db import Database


class AlertStore:
    """Alert records, rule memory and silences: what makes a restart announce nothing twice.

    The records and the memory are kept in memory as last committed (this store is the only writer
    of theirs in a process, and one process evaluates a state directory at a time): each cycle of
    the daemon reads them without parsing the whole set again, and :meth:`save` writes only the
    records that changed, and the memory only when it changed. A rolled back transaction drops
    what is kept, so the next read is from the database again."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._records: dict[str, AlertRecord] | None = None  # as committed; None: read the database
        self._memory: Memory | None = None

    def records(self) -> dict[str, AlertRecord]:
        if self._records is None:
            self._records = {
                row[0]: AlertRecord.from_dict(json.loads(row[1]))
                for row in self.db.query("SELECT id, record FROM alerts")
            }
        return dict(self._records)

    def memory(self) -> Memory:
        if self._memory is None:
            rows = self.db.query("SELECT memory FROM rule_memory WHERE id = 1")
            self._memory = Memory.from_dict(json.loads(rows[0][0])) if rows else Memory()
        return self._memory

    def save(self, records: Mapping[str, AlertRecord], memory: Memory, evaluated_at: float | None = None) -> None:
        """Replace the alert state (call inside the transaction that also queues the messages):
        the records that changed, and the memory if it changed. ``evaluated_at``: when the poll
        it comes from was evaluated (None: keep the time saved)."""
        before = self._records if self._records is not None else self.records()
        old_memory = self._memory if self._memory is not None else self.memory()
        records = dict(records)
        gone = [(kid,) for kid in before if kid not in records]
        changed = [
            (kid, json.dumps(r.as_dict(), ensure_ascii=False)) for kid, r in records.items() if before.get(kid) != r
        ]
        with self.db.transaction() as conn:
            conn.executemany("DELETE FROM alerts WHERE id = ?", gone)
            conn.executemany("INSERT OR REPLACE INTO alerts (id, record) VALUES (?, ?)", changed)
            if memory.slots != old_memory.slots or not self._memory_saved(conn):
                conn.execute(
                    "INSERT INTO rule_memory (id, memory, evaluated_at) VALUES (1, ?, ?) ON CONFLICT (id) DO UPDATE"
                    " SET memory = excluded.memory, evaluated_at = coalesce(excluded.evaluated_at, evaluated_at)",
                    (json.dumps(memory.as_dict(), ensure_ascii=False), evaluated_at),
                )
            elif evaluated_at is not None:
                conn.execute("UPDATE rule_memory SET evaluated_at = ? WHERE id = 1", (evaluated_at,))
            self._records, self._memory = records, memory
            self.db.after_transaction(lambda: None, self._forget)

    def _memory_saved(self, conn: sqlite3.Connection) -> bool:
        return conn.execute("SELECT 1 FROM rule_memory WHERE id = 1").fetchone() is not None

    def _forget(self) -> None:
        """The transaction rolled back: what is kept may be ahead of the database."""
        self._records = self._memory = None

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

    def add_ack(
        self,
        *,
        alerts: Mapping[str, float],
        now: float,
        comment: str = "",
        ends_at: float | None = None,
        rule: str | None = None,
        host: str | None = None,
        user: str | None = None,
        gpu: int | None = None,
        pid: int | None = None,
        author: str | None = None,
    ) -> Ack:
        """Acknowledge ``alerts`` (alert id -> its ``since``), matched by the fields given."""
        with self.db.transaction() as conn:
            cur = conn.execute(
                "INSERT INTO acks (rule, host, user, gpu, pid, author, comment, created_at, ends_at, alerts)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (rule, host, user, gpu, pid, author, comment, now, ends_at, json.dumps(dict(alerts))),
            )
            aid = int(cur.lastrowid or 0)
        return Ack(aid, now, dict(alerts), comment, ends_at, rule, host, user, gpu, pid, author)

    def _has(self, table: str) -> bool:
        """Whether the database has this table: a database of an older schema opened read-only
        (an admin reading the service's state before the daemon upgraded it) may not."""
        return bool(self.db.query("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)))

    def acks(self) -> list[Ack]:
        """Every acknowledgement kept, oldest first (``Ack.live`` says which still count); none in
        a database of an older schema opened read-only."""
        if not self._has("acks"):
            return []
        rows = self.db.query(
            "SELECT id, created_at, alerts, comment, ends_at, rule, host, user, gpu, pid, author FROM acks ORDER BY id"
        )
        return [Ack(r[0], r[1], {str(k): float(v) for k, v in json.loads(r[2]).items()}, *r[3:]) for r in rows]

    def remove_ack(self, ack_id: int) -> bool:
        with self.db.transaction() as conn:
            return conn.execute("DELETE FROM acks WHERE id = ?", (ack_id,)).rowcount > 0

    def prune_acks(self, records: Mapping[str, AlertRecord], now: float) -> int:
        """Forget the acks that no longer acknowledge anything (their alerts resolved, or they
        ended): call inside the transaction that saves ``records``. Returns how many."""
        ended = [a.id for a in self.acks() if not a.live(records, now)]
        if ended:
            with self.db.transaction() as conn:
                conn.executemany("DELETE FROM acks WHERE id = ?", [(i,) for i in ended])
        return len(ended)

    def saw_users(self, names: Iterable[str], now: float) -> None:
        """Remember that a host showed these users (process owners) at ``now``."""
        rows = [(name, now) for name in set(names) if name]
        if rows:
            with self.db.transaction() as conn:
                conn.executemany(
                    "INSERT INTO users_seen (name, last_seen) VALUES (?, ?)"
                    " ON CONFLICT (name) DO UPDATE SET last_seen = excluded.last_seen",
                    rows,
                )

    def users_seen(self) -> list[str]:
        """Every user a host has shown since this state directory began, by name."""
        if not self._has("users_seen"):
            return []
        return [str(r[0]) for r in self.db.query("SELECT name FROM users_seen ORDER BY name")]
