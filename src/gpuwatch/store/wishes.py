"""The ``wishes`` table: "tell me when" wishes (:mod:`gpuwatch.wishes`), open until they end.

A wish ends once: :meth:`WishStore.end` changes only an open row and says whether it did, so the
daemon queues a wish's message in the transaction that ended it, and a wish cancelled meanwhile
(``--cancel``, from another process) is never said. Ended rows are kept for
:data:`KEEP_ENDED_SECONDS` (``--list --all`` shows them), then pruned.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from ..wishes import Wish
from .db import Database

#: How long an ended wish stays listed (``--list --all``) before it is deleted.
KEEP_ENDED_SECONDS = 7 * 86400.0

_SELECT_OPEN = (
    "SELECT id, kind, user, author, created_at, expires_at, gpus, same_host, model, host, pid, command, started_at,"
    " peak_memory_mib, last_seen_at, gpu_indexes, ended_at, outcome FROM wishes WHERE ended_at IS NULL ORDER BY id"
)
_SELECT_ALL = (
    "SELECT id, kind, user, author, created_at, expires_at, gpus, same_host, model, host, pid, command, started_at,"
    " peak_memory_mib, last_seen_at, gpu_indexes, ended_at, outcome FROM wishes ORDER BY id"
)
_SELECT_ONE = (
    "SELECT id, kind, user, author, created_at, expires_at, gpus, same_host, model, host, pid, command, started_at,"
    " peak_memory_mib, last_seen_at, gpu_indexes, ended_at, outcome FROM wishes WHERE id = ?"
)


def _wish(row: tuple[Any, ...]) -> Wish:
    indexes = tuple(int(i) for i in str(row[15] or "").split(",") if i.strip().isdigit())
    return Wish(
        id=int(row[0]),
        kind=str(row[1]),
        user=row[2],
        author=row[3],
        created_at=float(row[4]),
        expires_at=float(row[5]),
        gpus=int(row[6] or 0),
        same_host=bool(row[7]),
        model=row[8],
        host=row[9],
        pid=row[10],
        command=row[11],
        started_at=row[12],
        peak_memory_mib=row[13],
        last_seen_at=row[14],
        gpu_indexes=indexes,
        ended_at=row[16],
        outcome=row[17],
    )


def _indexes(wish: Wish) -> str:
    return ",".join(str(i) for i in wish.gpu_indexes)


class WishStore:
    """Wishes in the state database: add, read, follow a running process, end, cancel, prune."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def _has_table(self) -> bool:
        """A database of an older schema opened read-only may not have the table yet."""
        return bool(self.db.query("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'wishes'"))

    def add(self, wish: Wish) -> Wish:
        """Keep a new wish (its ``id`` is ignored); returns it with the id it got."""
        with self.db.transaction() as conn:
            cur = conn.execute(
                "INSERT INTO wishes (kind, user, author, created_at, expires_at, gpus, same_host, model, host, pid,"
                " command, started_at, peak_memory_mib, last_seen_at, gpu_indexes)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    wish.kind,
                    wish.user,
                    wish.author,
                    wish.created_at,
                    wish.expires_at,
                    wish.gpus,
                    int(wish.same_host),
                    wish.model,
                    wish.host,
                    wish.pid,
                    wish.command,
                    wish.started_at,
                    wish.peak_memory_mib,
                    wish.last_seen_at,
                    _indexes(wish),
                ),
            )
            wish_id = int(cur.lastrowid or 0)
        return replace(wish, id=wish_id)

    def open(self) -> list[Wish]:
        """The wishes still open, oldest first (one indexed query: the daemon asks every cycle)."""
        if not self._has_table():
            return []
        return [_wish(r) for r in self.db.query(_SELECT_OPEN)]

    def all(self) -> list[Wish]:
        """Every wish kept, open or ended (ended ones until they are pruned), oldest first."""
        if not self._has_table():
            return []
        return [_wish(r) for r in self.db.query(_SELECT_ALL)]

    def get(self, wish_id: int) -> Wish | None:
        if not self._has_table():
            return None
        rows = self.db.query(_SELECT_ONE, (wish_id,))
        return _wish(rows[0]) if rows else None

    def seen(self, wishes: Iterable[Wish]) -> None:
        """Store what following their processes learned (peak memory, last seen, start, GPUs)."""
        rows = [
            (w.peak_memory_mib, w.last_seen_at, w.started_at, w.command, _indexes(w), w.id) for w in wishes if w.open
        ]
        if rows:
            with self.db.transaction() as conn:
                conn.executemany(
                    "UPDATE wishes SET peak_memory_mib = ?, last_seen_at = ?, started_at = ?, command = ?,"
                    " gpu_indexes = ? WHERE id = ? AND ended_at IS NULL",
                    rows,
                )

    def end(self, wish: Wish, outcome: str, at: float) -> bool:
        """End an open wish (with what was last learned of its process); False when it had ended
        already (met, or cancelled meanwhile): then nothing is to be said."""
        with self.db.transaction() as conn:
            cur = conn.execute(
                "UPDATE wishes SET ended_at = ?, outcome = ?, peak_memory_mib = ?, last_seen_at = ?,"
                " started_at = ?, gpu_indexes = ? WHERE id = ? AND ended_at IS NULL",
                (at, outcome, wish.peak_memory_mib, wish.last_seen_at, wish.started_at, _indexes(wish), wish.id),
            )
            return cur.rowcount > 0

    def cancel(self, wish_id: int, at: float) -> bool:
        """``--cancel ID``: end an open wish without a word. False when there is no open wish ``wish_id``."""
        with self.db.transaction() as conn:
            cur = conn.execute(
                "UPDATE wishes SET ended_at = ?, outcome = 'cancelled' WHERE id = ? AND ended_at IS NULL",
                (at, wish_id),
            )
            return cur.rowcount > 0

    def prune(self, now: float) -> int:
        """Delete the wishes that ended over :data:`KEEP_ENDED_SECONDS` ago; how many."""
        with self.db.transaction() as conn:
            cur = conn.execute("DELETE FROM wishes WHERE ended_at < ?", (now - KEEP_ENDED_SECONDS,))
            return cur.rowcount
