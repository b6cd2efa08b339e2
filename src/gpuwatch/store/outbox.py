"""The outbox: messages waiting for their channel, as rows (pending, in doubt, refused for good).

A message is written to the outbox before it is sent and leaves it only when its channel
accepted it, so an outage, a kill or a restart delays messages and loses none. The outbox keeps
rows only: delivering them (retries, doubt, a worker per channel) is
:mod:`gpuwatch.notify.delivery`, which records each outcome here.

While the disk is full, a message that could not be queued can be held in memory
(:meth:`Outbox.hold`) and is written before anything newer once there is room, and a delivery
that could not be recorded is remembered, so it is not sent again by this process. That memory
is guarded by the database's lock: the main loop and every delivery worker share one Outbox.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .db import Database, StoreError

log = logging.getLogger(__package__)  # "gpuwatch.store", as before the split: log filters keep working


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
        before anything newer by the next :meth:`add` or :meth:`catch_up` (each delivery pass calls
        it) that can write (a newer report held replaces an older one of its scope here too). Lost
        if the process ends first."""
        with self.db.lock:
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

    def catch_up(self) -> str | None:
        """Write what waits in memory (held messages, outcomes not recorded yet); the store's error
        when the disk still cannot take it."""
        with self.db.lock:
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

    def backlog(self) -> list[str]:
        """What waits in memory because the disk could not take it, in words (empty: nothing)."""
        with self.db.lock:
            waiting = [f"{len(self._held)} messages wait in memory to be queued"] if self._held else []
            if self._unrecorded:
                waiting.append(
                    f"{len(self._unrecorded)} sent ones are not marked sent yet (not sent again unless gpuwatch "
                    "restarts first)"
                )
            return waiting

    # -- reading

    def pending(self, channel: str | None = None) -> list[OutboxItem]:
        """Rows still to be sent (for ``channel``, or every channel), oldest first."""
        query = (
            "SELECT id, channel, summary, payload, created_at, attempts, last_error, not_before, in_doubt, kind, scope "
            "FROM outbox WHERE dead = 0"
        )
        args: tuple[str, ...] = ()
        if channel is not None:
            query += " AND channel = ?"
            args = (channel,)
        with self.db.lock:
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

    def channels(self) -> list[str]:
        """The channels that have rows still to be sent."""
        return sorted(self.count_by_channel())

    def count(self) -> int:
        """Messages in the outbox still to be sent (not those held in memory: see :attr:`held`)."""
        with self.db.lock:
            total = int(self.db.query("SELECT COUNT(*) FROM outbox WHERE dead = 0")[0][0])
            return total - len(self._unrecorded)

    def count_by_channel(self) -> dict[str, int]:
        """Messages waiting, per channel (refused-for-good ones not counted)."""
        rows = self.db.query("SELECT channel, COUNT(*) FROM outbox WHERE dead = 0 GROUP BY channel")
        return {str(channel): int(n) for channel, n in rows}

    # -- outcomes

    def delivered(self, item_id: int) -> None:
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM outbox WHERE id = ?", (item_id,))

    def failed(self, item_id: int, error: str, *, dead: bool = False) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ?, dead = ? WHERE id = ?",
                (error, int(dead), item_id),
            )

    def record(self, item_id: int, error: str | None, *, dead: bool = False) -> str | None:
        """Write an outcome (``error`` None: delivered; ``dead``: refused for good); on a full disk
        remember it instead (a delivered message must not go out again every cycle). Returns the
        store's error, if any."""
        with self.db.lock:
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

    def record_doubt(self, item: OutboxItem, error: str, not_before: float) -> str | None:
        """The last try of ``item`` may have been delivered: not tried again before ``not_before``
        (remembered in memory too, so a full disk cannot turn it into an instant re-post), and its
        count of doubtful tries in a row goes up. Returns the store's error, if any."""
        with self.db.lock:
            self._doubt[item.id] = not_before
            try:
                with self.db.transaction() as conn:
                    conn.execute(
                        "UPDATE outbox SET attempts = attempts + 1, last_error = ?, not_before = ?, in_doubt = ? "
                        "WHERE id = ?",
                        (error, not_before, item.in_doubt + 1, item.id),
                    )
            except StoreError as exc:
                return str(exc)
            return None
