"""Usage history: its own SQLite file beside the state database, written apart from it.

``history.sqlite3`` (0600, WAL) holds what each poll of each host saw, bounded like an RRD:

* ``raw``: one row per host poll (``t``, ``dt``, answered or not, and a packed blob of its GPUs'
  utilization and memory and the people on each with their memory and process count), kept for
  ``history.raw_for``;
* ``gpu_5m``: per GPU and 5 minutes, the known/unknown seconds and the mean and max of utilization
  and memory, kept for ``history.five_minutes_for`` (for charts);
* ``gpu_hour`` and ``person_hour``: per GPU and hour, and per person, host and hour, the seconds
  :mod:`gpuwatch.usage` accounts (known, down, used, held idle; a person's share), with means and
  maxima, kept for ``history.keep``; ``gpu_day`` and ``person_day`` (per person, all hosts), their
  sums per UTC day (so a month or a year is read from few rows), kept as long.

Its own file, connection and writer thread (:mod:`.historywriter`): a big batch, a roll-up or a
retention delete never holds the lock the outbox is delivered under, and a full disk or a
locked, corrupt or unwritable history file is logged and dropped, while polling and delivery go
on. Schema versions work as in :mod:`.db` (``PRAGMA user_version``; a newer one is refused).
Reading is :mod:`.historyread`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sqlite3
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..statedir import ensure_state_dir, make_private, open_private
from ..usage import (
    GpuReading,
    GpuTally,
    HostSample,
    PersonOnGpu,
    PersonTally,
    account,
)

log = logging.getLogger(__name__)

HISTORY_NAME = "history.sqlite3"
FIVE_MINUTES = 300
HOUR = 3600
DAY = 86400
#: A bucket is rolled up this long after it ended: results of slow hosts still come in.
ROLLUP_GRACE_SECONDS = 120
#: Percent: a GPU held under this utilization is held idle, unless the config says otherwise.
DEFAULT_IDLE_BELOW = 5

_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE hosts (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
    CREATE TABLE gpus (
        id INTEGER PRIMARY KEY,
        host_id INTEGER NOT NULL,
        gpu_index INTEGER NOT NULL,
        uuid TEXT,
        model TEXT,
        memory_total_mib INTEGER,
        UNIQUE (host_id, gpu_index)
    );
    CREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
    CREATE TABLE raw (
        t INTEGER NOT NULL,
        host_id INTEGER NOT NULL,
        ok INTEGER NOT NULL,
        dt INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (t, host_id)
    ) WITHOUT ROWID;
    CREATE TABLE gpu_5m (
        t INTEGER NOT NULL,
        gpu_id INTEGER NOT NULL,
        known_s INTEGER NOT NULL,
        down_s INTEGER NOT NULL,
        util_mean REAL,
        util_max INTEGER,
        mem_mean INTEGER,
        mem_max INTEGER,
        PRIMARY KEY (t, gpu_id)
    ) WITHOUT ROWID;
    CREATE TABLE gpu_hour (
        t INTEGER NOT NULL,
        gpu_id INTEGER NOT NULL,
        known_s INTEGER NOT NULL,
        down_s INTEGER NOT NULL,
        used_s INTEGER NOT NULL,
        idle_s INTEGER NOT NULL,
        util_s INTEGER NOT NULL,
        util_sum INTEGER NOT NULL,
        util_max INTEGER,
        mem_mean INTEGER,
        mem_max INTEGER,
        PRIMARY KEY (t, gpu_id)
    ) WITHOUT ROWID;
    CREATE TABLE person_hour (
        t INTEGER NOT NULL,
        person_id INTEGER NOT NULL,
        host_id INTEGER NOT NULL,
        gpu_ms INTEGER NOT NULL,
        idle_ms INTEGER NOT NULL,
        mem_max INTEGER NOT NULL,
        gpus_max INTEGER NOT NULL,
        PRIMARY KEY (t, person_id, host_id)
    ) WITHOUT ROWID
    """,
    # daily sums of the hourly rows (UTC days): a month's usage reads 30 rows per GPU, not 720;
    # a person's over all hosts (mem_max, gpus_max: the most on one host in one hour)
    """
    CREATE TABLE gpu_day (
        t INTEGER NOT NULL,
        gpu_id INTEGER NOT NULL,
        known_s INTEGER NOT NULL,
        down_s INTEGER NOT NULL,
        used_s INTEGER NOT NULL,
        idle_s INTEGER NOT NULL,
        util_s INTEGER NOT NULL,
        util_sum INTEGER NOT NULL,
        util_max INTEGER,
        mem_mean INTEGER,
        mem_max INTEGER,
        PRIMARY KEY (t, gpu_id)
    ) WITHOUT ROWID;
    CREATE TABLE person_day (
        t INTEGER NOT NULL,
        person_id INTEGER NOT NULL,
        gpu_ms INTEGER NOT NULL,
        idle_ms INTEGER NOT NULL,
        mem_max INTEGER NOT NULL,
        gpus_max INTEGER NOT NULL,
        PRIMARY KEY (t, person_id)
    ) WITHOUT ROWID
    """,
)

# raw.data: per GPU (gpu id, utilization or 255, memory used or 2**32-1, people), then per person
# (person id, memory or 2**32-1, processes).
_GPU = struct.Struct("<IBIB")
_PERSON = struct.Struct("<IIH")
_NO_UTIL, _NO_MEM = 0xFF, 0xFFFFFFFF


class HistoryError(Exception):
    """The history file could not be opened, read or written (said in one line, never fatal)."""


class CorruptHistory(HistoryError):
    """The history file is not an SQLite database, or has damaged pages."""


@dataclass(frozen=True)
class HistorySettings:
    """What the writer needs of ``history:`` (seconds and percent)."""

    raw_for: float = 48 * HOUR
    five_minutes_for: float = 7 * 86400.0
    keep: float = 400 * 86400.0
    idle_below: float = 5.0
    half_life: float = 7 * 86400.0

    @classmethod
    def of(cls, config: Config) -> HistorySettings:
        """From ``history:``; the idle threshold defaults to the ``idle_gpu`` rule's ``util_below``
        when that rule is on, else :data:`DEFAULT_IDLE_BELOW`."""
        h = config.history
        rule = config.alerts.rules.get("idle_gpu")
        idle = h.idle_below if h.idle_below is not None else getattr(rule, "util_below", DEFAULT_IDLE_BELOW)
        return cls(h.raw_for, h.five_minutes_for, h.keep, float(idle), h.half_life)


def rollup_horizon(now: float, step: int = FIVE_MINUTES) -> float:
    """The end of the last ``step`` bucket that :meth:`HistoryStore.rollup` may roll up at ``now``
    (it ended at least :data:`ROLLUP_GRACE_SECONDS` before). It moves only on a 5-minute boundary."""
    return float(math.floor((now - ROLLUP_GRACE_SECONDS) / step) * step)


def history_path(state_dir: Path) -> Path:
    return state_dir / HISTORY_NAME


def connect(path: Path, *, read_only: bool = False) -> sqlite3.Connection:
    """The history file (created 0600, WAL, migrated); ``read_only``: an existing one, read only.
    Anything that stops it is a :class:`HistoryError`."""
    try:
        if read_only:
            conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5, check_same_thread=False)
        else:
            ensure_state_dir(path.parent)
            os.close(open_private(path, os.O_RDWR))
            conn = sqlite3.connect(path, timeout=10, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            if conn.execute("PRAGMA quick_check(1)").fetchone()[0] != "ok":
                conn.close()
                raise CorruptHistory("damaged pages")
            _migrate(conn, path)
            for suffix in ("-wal", "-shm"):
                make_private(Path(f"{path}{suffix}"))
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        if any(words in str(exc).lower() for words in ("not a database", "malformed")):
            raise CorruptHistory(str(exc)) from None
        raise HistoryError(f"cannot open {path}: {exc}") from None
    except OSError as exc:
        raise HistoryError(f"cannot open {path}: {exc}") from None
    if version > len(_MIGRATIONS):
        conn.close()
        raise HistoryError(f"{path} was written by a newer gpuwatch (schema {version}); move it aside")
    return conn


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    if conn.execute("PRAGMA user_version").fetchone()[0] >= len(_MIGRATIONS):
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        for script in _MIGRATIONS[version:]:
            for statement in script.split(";"):
                if statement.strip():
                    conn.execute(statement)
        if version < len(_MIGRATIONS):
            conn.execute(f"PRAGMA user_version = {len(_MIGRATIONS)}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _pack(gpus: Iterable[tuple[int, GpuReading]], person_id: Callable[[str], int]) -> bytes:
    parts = []
    for gpu_id, g in gpus:
        util = _NO_UTIL if g.utilization_percent is None else max(0, min(254, g.utilization_percent))
        mem = _NO_MEM if g.memory_used_mib is None else max(0, min(_NO_MEM - 1, g.memory_used_mib))
        people = g.people[:255]
        parts.append(_GPU.pack(gpu_id, util, mem, len(people)))
        for p in people:
            pmem = _NO_MEM if p.memory_mib is None else max(0, min(_NO_MEM - 1, p.memory_mib))
            parts.append(_PERSON.pack(person_id(p.person), pmem, min(p.processes, 0xFFFF)))
    return b"".join(parts)


@dataclass(frozen=True)
class GpuInfo:
    id: int
    host: str
    index: int
    model: str | None
    memory_total_mib: int | None


def unpack(data: bytes, gpus: dict[int, GpuInfo], people: dict[int, str]) -> list[tuple[int, GpuReading]]:
    """A raw row's blob as (gpu id, reading) pairs."""
    out, at = [], 0
    while at < len(data):
        gpu_id, util, mem, count = _GPU.unpack_from(data, at)
        at += _GPU.size
        on = []
        for _ in range(count):
            pid, pmem, procs = _PERSON.unpack_from(data, at)
            at += _PERSON.size
            on.append(PersonOnGpu(people.get(pid, "?"), None if pmem == _NO_MEM else pmem, procs))
        info = gpus.get(gpu_id)
        reading = GpuReading(
            index=info.index if info else -1,
            model=info.model if info else None,
            utilization_percent=None if util == _NO_UTIL else util,
            memory_used_mib=None if mem == _NO_MEM else mem,
            memory_total_mib=info.memory_total_mib if info else None,
            people=tuple(on),
        )
        out.append((gpu_id, reading))
    return out


class HistoryStore:
    """The history file's writes, on one connection used by one thread at a time: samples,
    roll-ups, retention. Times are parameters (``now``); every method is one transaction."""

    def __init__(self, conn: sqlite3.Connection, settings: HistorySettings) -> None:
        self.conn = conn
        self.settings = settings
        self._hosts: dict[str, int] = {}
        self._gpus: dict[tuple[int, int], tuple[int, str | None, str | None, int | None]] = {}
        self._people: dict[str, int] = {}
        self._load_ids()

    def _load_ids(self) -> None:
        self._hosts = {str(n): int(i) for i, n in self.conn.execute("SELECT id, name FROM hosts")}
        self._people = {str(n): int(i) for i, n in self.conn.execute("SELECT id, name FROM people")}
        rows = self.conn.execute("SELECT id, host_id, gpu_index, uuid, model, memory_total_mib FROM gpus")
        self._gpus = {(h, x): (i, u, m, t) for i, h, x, u, m, t in rows}

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
            self.conn.execute("COMMIT")
        except BaseException:
            if self.conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self.conn.execute("ROLLBACK")
            self._load_ids()  # ids made in the rolled-back transaction are gone
            raise

    def _host_id(self, name: str) -> int:
        found = self._hosts.get(name)
        if found is None:
            found = int(self.conn.execute("INSERT INTO hosts (name) VALUES (?)", (name,)).lastrowid or 0)
            self._hosts[name] = found
        return found

    def _person_id(self, name: str) -> int:
        found = self._people.get(name)
        if found is None:
            found = int(self.conn.execute("INSERT INTO people (name) VALUES (?)", (name,)).lastrowid or 0)
            self._people[name] = found
        return found

    def _gpu_id(self, host_id: int, g: GpuReading) -> int:
        known = self._gpus.get((host_id, g.index))
        facts = (g.uuid, g.model, g.memory_total_mib)
        if known is None:
            cur = self.conn.execute(
                "INSERT INTO gpus (host_id, gpu_index, uuid, model, memory_total_mib) VALUES (?, ?, ?, ?, ?)",
                (host_id, g.index, *facts),
            )
            known = (int(cur.lastrowid or 0), *facts)
        elif known[1:] != facts and g.model is not None:  # a replaced card, a new driver's name
            self.conn.execute(
                "UPDATE gpus SET uuid = ?, model = ?, memory_total_mib = ? WHERE id = ?", (*facts, known[0])
            )
            known = (known[0], *facts)
        self._gpus[(host_id, g.index)] = known
        return known[0]

    def write(self, samples: Iterable[HostSample]) -> int:
        """Write samples (one transaction); returns how many."""
        count = 0
        with self.transaction() as conn:
            for s in samples:
                host_id = self._host_id(s.host)
                if s.ok:
                    pairs = [(self._gpu_id(host_id, g), g) for g in s.gpus]
                else:  # the last GPUs it showed (no readings), else those written before
                    pairs = [(self._gpu_id(host_id, g), GpuReading(g.index)) for g in s.gpus]
                    pairs = pairs or [(i, GpuReading(x)) for (h, x), (i, *_) in self._gpus.items() if h == host_id]
                conn.execute(
                    "INSERT OR REPLACE INTO raw (t, host_id, ok, dt, data) VALUES (?, ?, ?, ?, ?)",
                    (round(s.t), host_id, int(s.ok), round(s.dt), _pack(pairs, self._person_id)),
                )
                count += 1
        return count

    def last_polls(self, since: float) -> dict[str, float]:
        """Each host's latest sample time from ``since`` on (for the first ``dt`` after a restart;
        an older one would not count, and only the newest rows are read)."""
        rows = self.conn.execute(
            "SELECT h.name, MAX(r.t) FROM raw r JOIN hosts h ON h.id = r.host_id WHERE r.t >= ? GROUP BY h.name",
            (int(since),),
        )
        return {str(n): float(t) for n, t in rows}

    def known_gpus(self) -> dict[str, tuple[int, ...]]:
        """Each host's GPU indexes as last written."""
        names = {i: n for n, i in self._hosts.items()}
        out: dict[str, list[int]] = {}
        for host_id, index in sorted(self._gpus):
            out.setdefault(names.get(host_id, "?"), []).append(index)
        return {k: tuple(v) for k, v in out.items()}

    # -- roll-ups and retention

    def _meta(self, key: str) -> float | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return float(row[0]) if row else None

    def rollup(self, now: float, *, limit: int = 10_000) -> int:
        """Roll up every 5-minute and hourly bucket that ended at least :data:`ROLLUP_GRACE_SECONDS`
        before ``now``, and every UTC day whose hours are all rolled up, not rolled up yet (each
        bucket one transaction); returns how many."""
        done = 0
        for key, step in (("rolled_5m", FIVE_MINUTES), ("rolled_hour", HOUR), ("rolled_day", DAY)):
            horizon = rollup_horizon(now, step)
            if step == DAY:
                horizon = min(horizon, self._meta("rolled_hour") or 0)
            while done < limit:
                start = self._next_bucket(key, step, horizon, "gpu_hour" if step == DAY else "raw")
                if start is None:
                    break
                with self.transaction():
                    if step == DAY:
                        self._roll_day(start)
                    else:
                        self._roll(start, step)
                    self.conn.execute(
                        "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, str(start + step))
                    )
                done += 1
        return done

    def _next_bucket(self, key: str, step: int, horizon: float, source: str) -> int | None:
        rolled = self._meta(key)
        row = self.conn.execute(f"SELECT MIN(t) FROM {source} WHERE t >= ?", (rolled or 0,)).fetchone()  # noqa: S608
        if row[0] is None:
            return None
        start = int(row[0]) // step * step
        return start if start + step <= horizon else None

    def _roll_day(self, start: int) -> None:
        """A UTC day's sums, from its hourly rows."""
        span = (start, start, start + DAY)
        self.conn.execute(
            "INSERT OR REPLACE INTO gpu_day SELECT ?, gpu_id, SUM(known_s), SUM(down_s), SUM(used_s), SUM(idle_s), "
            "SUM(util_s), SUM(util_sum), MAX(util_max), CAST(ROUND(SUM(mem_mean * known_s) * 1.0 / "
            "NULLIF(SUM(CASE WHEN mem_mean IS NULL THEN 0 ELSE known_s END), 0)) AS INTEGER), MAX(mem_max) "
            "FROM gpu_hour WHERE t >= ? AND t < ? GROUP BY gpu_id",
            span,
        )
        self.conn.execute(
            "INSERT OR REPLACE INTO person_day SELECT ?, person_id, SUM(gpu_ms), SUM(idle_ms), MAX(mem_max), "
            "MAX(gpus_max) FROM person_hour WHERE t >= ? AND t < ? GROUP BY person_id",
            span,
        )

    def _roll(self, start: int, step: int) -> None:
        gpus = self.gpu_infos()
        people = {i: n for n, i in self._people.items()}
        gpu_tally: dict[int, GpuTally] = {}
        person_tally: dict[tuple[str, int], PersonTally] = {}
        rows = self.conn.execute(
            "SELECT t, host_id, ok, dt, data FROM raw WHERE t >= ? AND t < ?", (start, start + step)
        )
        for t, host_id, ok, dt, data in rows.fetchall():
            pairs = unpack(data, gpus, people)
            ids = {g.index: gid for gid, g in pairs}
            result = account(HostSample("", t, dt, bool(ok), tuple(g for _, g in pairs)), self.settings.idle_below)
            for index, tally in result.gpus.items():
                gpu_tally.setdefault(ids[index], GpuTally()).add(tally)
            for name, ptally in result.people.items():
                person_tally.setdefault((name, host_id), PersonTally()).add(ptally)
        if step == FIVE_MINUTES:
            self.conn.executemany(
                "INSERT OR REPLACE INTO gpu_5m VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        start,
                        gid,
                        round(t.known_s),
                        round(t.down_s),
                        _round(t.utilization_percent, 1),
                        t.util_max,
                        _round(t.memory_mean_mib, None),
                        t.mem_max,
                    )
                    for gid, t in gpu_tally.items()
                ],
            )
            return
        self.conn.executemany(
            "INSERT OR REPLACE INTO gpu_hour VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    start,
                    gid,
                    round(t.known_s),
                    round(t.down_s),
                    round(t.used_s),
                    round(t.idle_s),
                    round(t.util_s),
                    round(t.util_sum),
                    t.util_max,
                    _round(t.memory_mean_mib, None),
                    t.mem_max,
                )
                for gid, t in gpu_tally.items()
            ],
        )
        self.conn.executemany(
            "INSERT OR REPLACE INTO person_hour VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    start,
                    self._person_id(name),
                    host_id,
                    round(p.gpu_s * 1000),
                    round(p.idle_s * 1000),
                    p.mem_max,
                    p.gpus_max,
                )
                for (name, host_id), p in person_tally.items()
            ],
        )

    def gpu_infos(self) -> dict[int, GpuInfo]:
        names = {i: n for n, i in self._hosts.items()}
        return {i: GpuInfo(i, names.get(h, "?"), x, m, t) for (h, x), (i, _u, m, t) in self._gpus.items()}

    def retain(self, now: float) -> dict[str, int]:
        """Delete what is older than its table keeps (one transaction); rows deleted per table.
        Raw samples not rolled up yet are kept whatever their age."""
        s = self.settings
        rolled = min(self._meta("rolled_5m") or 0.0, self._meta("rolled_hour") or 0.0)
        cuts = {
            "raw": min(now - s.raw_for, rolled),
            "gpu_5m": now - s.five_minutes_for,
            "gpu_hour": now - s.keep,
            "person_hour": now - s.keep,
            "gpu_day": now - s.keep,
            "person_day": now - s.keep,
        }
        deleted = {}
        with self.transaction() as conn:
            for table, cut in cuts.items():
                deleted[table] = conn.execute(f"DELETE FROM {table} WHERE t < ?", (int(cut),)).rowcount  # noqa: S608
        return deleted


def _round(value: float | None, digits: int | None) -> float | int | None:
    return None if value is None else round(value, digits) if digits is not None else round(value)
