"""SQLite state under state_dir: rows only (the outbox, alert state and silences, report runs).

* :mod:`.db`: the connection, migrations, corruption handling (moved aside), a schema
  this gpuwatch does not write refused (:class:`SchemaError`), :class:`StoreError`;
* :mod:`.outbox`: messages waiting for their channel (pending, delivered, refused for good, in
  doubt, held in memory, a newer report replacing an older one);
* :mod:`.alerts`: alert records, rule memory, silences; :mod:`.runs`: when each scheduled report
  was last made; :mod:`.reservations`: GPU bookings; :mod:`.reader`: what other threads read,
  read-only.

The store never sends anything: delivering the outbox is :mod:`gpuwatch.notify.delivery`.
"""

from __future__ import annotations

from .alerts import AlertStore
from .db import DB_NAME, Database, SchemaError, StoreError, open_db, open_db_readonly
from .outbox import Outbox, OutboxItem, replaces_older
from .reader import StateDirClosed, StoreReader, open_for_reading
from .reservations import Overlap, ReservationStore
from .runs import ReportRuns

__all__ = [
    "DB_NAME",
    "AlertStore",
    "Database",
    "Outbox",
    "OutboxItem",
    "Overlap",
    "ReportRuns",
    "ReservationStore",
    "SchemaError",
    "StateDirClosed",
    "StoreError",
    "StoreReader",
    "open_db",
    "open_db_readonly",
    "open_for_reading",
    "replaces_older",
]
