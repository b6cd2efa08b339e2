"""Reading the state database from other threads (the web page, /metrics), read-only."""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ..rules import Ack, AlertRecord, Silence
from .alerts import AlertStore
from .db import DB_NAME, Database, open_db_readonly
from .outbox import Outbox

log = logging.getLogger(__package__)  # "gpuwatch.store", as before the split: log filters keep working

T = TypeVar("T")


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

    def acks(self) -> list[Ack]:
        """Every acknowledgement kept (``Ack.live`` says which still count)."""
        return self._read(lambda db: AlertStore(db).acks(), [])

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
