"""Reading the state database read-only: from other threads (the web page, /metrics), and for
commands that only read (``alerts``, ``silence list``), which may run as a user who cannot write
the state directory, or not even enter it."""

from __future__ import annotations

import getpass
import logging
import pwd
import sqlite3
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ..model import Reservation
from ..rules import Ack, AlertRecord, Silence
from ..statedir import StateError
from .alerts import AlertStore
from .db import DB_NAME, Database, open_db, open_db_readonly
from .outbox import Outbox
from .reservations import ReservationStore

log = logging.getLogger(__package__)  # "gpuwatch.store", as before the split: log filters keep working

T = TypeVar("T")


class StateDirClosed(StateError):
    """This user cannot enter the state directory (the service's 0700 ``/var/lib/gpuwatch`` seen by
    another admin). ``owner``: the user who can, whom the command line to run is for."""

    def __init__(self, message: str, owner: str) -> None:
        super().__init__(message)
        self.owner = owner


def open_for_reading(state_dir: Path) -> Database:
    """The state database for a command that only reads: writable where this user may write it
    (so a corrupt file is moved aside as usual), else read-only; a state directory this user cannot
    enter is one :class:`StateDirClosed` naming its owner, never a traceback."""
    try:
        (state_dir / DB_NAME).lstat()  # tried: os.access ignores capabilities (CAP_DAC_READ_SEARCH)
    except PermissionError:
        raise _closed(state_dir) from None
    except OSError:
        pass  # missing, or state_dir is a file: open_db says so as for any command
    return open_db(state_dir, read_only_ok=True)


def _closed(state_dir: Path) -> StateDirClosed:
    me = getpass.getuser()
    try:
        info = state_dir.stat()
    except OSError:  # a directory above it is closed to this user
        return StateDirClosed(f"state_dir {state_dir}: this user ({me}) cannot reach it: permission denied", "root")
    try:
        owner = pwd.getpwuid(info.st_uid).pw_name
    except KeyError:
        owner = str(info.st_uid)
    return StateDirClosed(
        f"state_dir {state_dir}: this user ({me}) cannot enter it ({stat.filemode(info.st_mode)}, owner {owner}): "
        "permission denied",
        owner,
    )


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

    def reservations(self, now: float | None = None) -> list[Reservation]:
        """Every GPU booking kept (``Reservation.in_force`` says which count now); with ``now``,
        only those not ended by then."""
        if now is None:
            return self._read(lambda db: ReservationStore(db).all(), [])
        return self._read(lambda db: ReservationStore(db).current(now), [])

    def outbox_counts(self) -> dict[str, int]:
        return self._read(lambda db: Outbox(db).count_by_channel(), {})

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
