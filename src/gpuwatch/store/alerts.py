"""Alert records, rule memory and silences in the state database."""

from __future__ import annotations

import json
from collections.abc import Mapping

from ..rules import AlertRecord, Memory, Silence
from .db import Database


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
