"""One convention for durations, counts, times and the unknown value, in every output people read."""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from gpuwatch.cli import main
from gpuwatch.config import FreeGpuConfig
from gpuwatch.model import FleetSnapshot, HostSnapshot, PsEntry
from gpuwatch.parse import attribute, parse_compute_apps, parse_query_gpu
from gpuwatch.render import fleet_table, snapshot_dict
from gpuwatch.report import overview, user_report
from gpuwatch.rules import AlertKey, AlertRecord
from gpuwatch.store import AlertStore, open_db
from gpuwatch.text import format_duration, iso_time, local_time, number, parse_duration, plural, quantity

FIXTURES = Path(__file__).parent / "fixtures" / "nvidia-smi"
WIN_QUERY = "csv-query-gpu/nvgpuexp-rtx2080super-windows-610.62-load-query-gpu-all-fields.csv"
WIN_APPS = "csv-compute-apps/nvgpuexp-rtx2080super-windows-610.62-load-compute-apps.csv"  # memory [N/A] (WDDM)
TAKEN = datetime(2026, 11, 22, 10, 0, tzinfo=timezone.utc)


@pytest.fixture
def shanghai(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This machine's local zone is China Standard Time (UTC+8, named CST)."""
    monkeypatch.setenv("TZ", "Asia/Shanghai")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_durations() -> None:
    assert [format_duration(s) for s in (0, 5, 90, 3600, 93784, 3 * 86400 + 60)] == [
        "0s",
        "5s",
        "1m30s",
        "1h",
        "1d2h",
        "3d1m",
    ]
    assert format_duration(None) == "N/A"
    assert [parse_duration(v) for v in ("30s", "5m", "1h30m", "2d", 45, "1.5h")] == [30, 300, 5400, 172800, 45, 5400]
    with pytest.raises(ValueError, match="'soon' is not a duration"):
        parse_duration("soon")


def test_counts_and_quantities() -> None:
    assert [plural(1, "host"), plural(3, "GPU"), plural(2, "process"), plural(1, "part"), plural(0, "host")] == [
        "1 host",
        "3 GPUs",
        "2 processes",
        "1 part",
        "0 hosts",
    ]
    assert [quantity(3, "GPUs"), quantity(1, "GPUs"), quantity(1, "polls"), quantity(259260, "s")] == [
        "3 GPUs",
        "1 GPU",
        "1 poll",
        "3d1m",
    ]
    assert [quantity(59, "°C"), quantity(9, "%"), quantity(1235, "MiB"), quantity(None, "GPUs")] == [
        "59°C",
        "9%",
        "1235 MiB",
        "N/A",
    ]
    assert [number(None, " MiB"), number(97.99, " W"), number(7, "%")] == ["N/A", "97.99 W", "7%"]


def test_times_for_people_and_for_programs() -> None:
    cst = timezone(timedelta(hours=8), "CST")
    assert local_time(TAKEN, cst) == "2026-11-22 18:00 CST"
    assert local_time(TAKEN.timestamp(), cst) == "2026-11-22 18:00 CST"
    assert local_time(TAKEN.timestamp(), timezone.utc) == "2026-11-22 10:00 UTC"
    assert local_time(None) == "N/A"
    assert iso_time(TAKEN) == "2026-11-22T10:00:00+00:00"
    assert iso_time(TAKEN.timestamp()) == "2026-11-22T10:00:00+00:00"


def _windows_host() -> HostSnapshot:
    """A real Windows capture: every process's memory is [N/A] (WDDM); ps knows pid 2140's owner."""
    gpus, _ = parse_query_gpu((FIXTURES / WIN_QUERY).read_text())
    apps, _ = parse_compute_apps((FIXTURES / WIN_APPS).read_text())
    processes = attribute(gpus, apps, {2140: PsEntry(2140, "alice", None, "dwm.exe")})
    return HostSnapshot("win-a", "win-a", ok=True, gpus=tuple(gpus), processes=processes)


def test_every_view_says_n_a_for_an_unknown_value() -> None:
    snapshot = FleetSnapshot(TAKEN, (_windows_host(),))
    table = fleet_table(snapshot, FreeGpuConfig())
    assert "alice(N/A)" in table and "(owner unknown)(N/A)" in table
    assert "?" not in table
    mine = user_report(snapshot, "alice").text
    assert "GPU 0: pid 2140 dwm.exe, N/A, up N/A" in mine
    assert "?" not in mine and "?" not in overview(snapshot, FreeGpuConfig()).text
    assert snapshot_dict(snapshot)["hosts"][0]["processes"][0]["used_memory_mib"] is None  # programs: null


def test_times_people_read_are_local_with_their_zone(shanghai: None) -> None:
    snapshot = FleetSnapshot(TAKEN, (_windows_host(),))
    assert "(taken 2026-11-22 18:00 CST)" in fleet_table(snapshot, FreeGpuConfig())
    assert overview(snapshot, FreeGpuConfig()).title.startswith("GPU overview 2026-11-22 18:00 CST: ")
    assert snapshot_dict(snapshot)["taken_at"] == "2026-11-22T10:00:00+00:00"  # programs: ISO 8601


def test_the_alerts_command_says_local_time_with_its_zone(shanghai: None, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"hosts: [gpu-a]\nstate_dir: {tmp_path / 'state'}\n")
    db = open_db(tmp_path / "state")
    try:
        since = TAKEN.timestamp()
        record = AlertRecord(
            AlertKey("max_gpus_per_user", "gpu-a", user="alice"),
            "firing",
            since,
            value=3,
            threshold=2,
            unit="GPUs",
            facts={"gpus": [0, 1, 2]},
            fired_at=since,
            last_sent_at=since,
        )
        store = AlertStore(db)
        store.save({record.key.id: record}, store.memory(), evaluated_at=since)
        until = datetime(2099, 1, 1, 10, 0, tzinfo=timezone.utc).timestamp()  # still in force when the test runs
        store.add_silence(ends_at=until, comment="agreed", now=since, user="alice", author="bob")
    finally:
        db.close()
    out = io.StringIO()
    assert main(["alerts", "-c", str(config)], out=out) == 0  # the one firing alert is silenced
    stale, *lines = out.getvalue().splitlines()
    assert re.fullmatch(
        r"STALE: as of 2026-11-22 18:00 CST, \S+ ago: no poll for over 3 intervals of 1m: is gpuwatch running\?", stale
    )  # no poll updated it since then
    assert lines == [
        "FIRING (silenced by #1) max_gpus_per_user  alice holds 3 GPUs on gpu-a (GPU 0, 1, 2)",
        "           since 2026-11-22 18:00 CST; threshold: at most 2 per host",
        "           silence #1 until 2099-01-01 18:00 CST by bob: agreed",
    ]
    out = io.StringIO()
    assert main(["alerts", "--json", "-c", str(config)], out=out) == 0
    doc = json.loads(out.getvalue())
    (alert,) = doc["alerts"]
    # programs: ISO 8601 with the offset, never epoch seconds
    assert (alert["value"], alert["threshold"], alert["unit"]) == (3, 2, "GPUs")
    assert (alert["since"], alert["fired_at"], alert["last_sent_at"]) == ("2026-11-22T10:00:00+00:00",) * 3
    assert (doc["taken_at"], doc["stale"]) == ("2026-11-22T10:00:00+00:00", True)
    (silence,) = doc["silences"]
    assert (silence["created_at"], silence["ends_at"]) == ("2026-11-22T10:00:00+00:00", "2099-01-01T10:00:00+00:00")
    assert alert["summary"] == "alice holds 3 GPUs on gpu-a (GPU 0, 1, 2)"
