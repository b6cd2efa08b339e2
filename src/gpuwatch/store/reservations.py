"""GPU bookings (``gpuwatch reserve``) in the state database: rows only; what they mean
(overlaps, which are in force, what they take out of "free") is :mod:`gpuwatch.reservation`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ..model import Reservation
from ..reservation import overlapping
from .db import Database


class Overlap(Exception):
    """A booking was refused: it takes a GPU that ``existing`` bookings take at the same time."""

    def __init__(self, existing: Sequence[Reservation]) -> None:
        super().__init__(f"{len(existing)} overlapping booking(s)")
        self.existing = tuple(existing)


def _row(r: Sequence[Any]) -> Reservation:
    return Reservation(
        id=int(r[0]),
        user=str(r[1]),
        host=str(r[2]),
        gpus=tuple(int(g) for g in json.loads(r[3])),
        starts_at=float(r[4]),
        ends_at=float(r[5]),
        comment=str(r[6] or ""),
        author=r[7],
        created_at=float(r[8]),
    )


class ReservationStore:
    """The bookings kept: add (refusing an overlap, checked and written in one transaction, so two
    ``reserve add`` at once cannot both take a GPU), list, remove."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def _has_table(self) -> bool:
        """A database of an older schema opened read-only has no bookings table: no bookings."""
        return bool(self.db.query("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'reservations'"))

    def all(self) -> list[Reservation]:
        """Every booking kept, by start time (then id)."""
        if not self._has_table():
            return []
        rows = self.db.query(
            "SELECT id, user, host, gpus, starts_at, ends_at, comment, author, created_at"
            " FROM reservations ORDER BY starts_at, id"
        )
        return [_row(r) for r in rows]

    def current(self, now: float) -> list[Reservation]:
        """The bookings in force at ``now`` or later (not yet ended): what every view of the fleet
        reads on each cycle or request, so ended bookings (kept for ``list --all``) cost nothing."""
        if not self._has_table():
            return []
        rows = self.db.query(
            "SELECT id, user, host, gpus, starts_at, ends_at, comment, author, created_at"
            " FROM reservations WHERE ends_at > ? ORDER BY starts_at, id",
            (now,),
        )
        return [_row(r) for r in rows]

    def add(
        self,
        *,
        user: str,
        host: str,
        gpus: Sequence[int],
        starts_at: float,
        ends_at: float,
        now: float,
        comment: str = "",
        author: str | None = None,
    ) -> Reservation:
        """Keep a booking; :class:`Overlap` (nothing written) when another takes any of these GPUs
        of ``host`` for any moment of [starts_at, ends_at)."""
        if not gpus or ends_at <= starts_at:
            raise ValueError("a booking needs at least one GPU and must end after it starts")
        with self.db.transaction() as conn:
            rows = conn.execute(
                "SELECT id, user, host, gpus, starts_at, ends_at, comment, author, created_at"
                " FROM reservations WHERE host = ? AND ends_at > ? AND starts_at < ?",
                (host, starts_at, ends_at),
            ).fetchall()
            clash = overlapping((_row(r) for r in rows), host, gpus, starts_at, ends_at)
            if clash:
                raise Overlap(clash)
            cur = conn.execute(
                "INSERT INTO reservations (user, host, gpus, starts_at, ends_at, comment, author, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (user, host, json.dumps(sorted(set(gpus))), starts_at, ends_at, comment, author, now),
            )
            rid = int(cur.lastrowid or 0)
        return Reservation(rid, user, host, tuple(sorted(set(gpus))), starts_at, ends_at, comment, author, now)

    def get(self, reservation_id: int) -> Reservation | None:
        if not self._has_table():
            return None
        rows = self.db.query(
            "SELECT id, user, host, gpus, starts_at, ends_at, comment, author, created_at"
            " FROM reservations WHERE id = ?",
            (reservation_id,),
        )
        return _row(rows[0]) if rows else None

    def remove(self, reservation_id: int) -> bool:
        with self.db.transaction() as conn:
            return conn.execute("DELETE FROM reservations WHERE id = ?", (reservation_id,)).rowcount > 0
