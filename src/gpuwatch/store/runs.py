"""When each scheduled report was last made, in the state database."""

from __future__ import annotations

from .db import Database


class ReportRuns:
    """When each scheduled report was last made (queued for sending), by its schedule's name
    (``ReportSchedule.describe()``: "overview every 1h"): how a ``--once`` run from cron, and a
    daemon after a restart, know whether a report is due by its own schedule
    (:mod:`gpuwatch.timetable`)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def last(self) -> dict[str, float]:
        return {str(name): float(at) for name, at in self.db.query("SELECT name, last_at FROM report_runs")}

    def record(self, name: str, at: float) -> None:
        """Remember that ``name`` was made at ``at`` (call inside the transaction that queues it)."""
        with self.db.transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO report_runs (name, last_at) VALUES (?, ?)", (name, at))
