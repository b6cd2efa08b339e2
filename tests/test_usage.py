"""``gpuwatch usage`` (text, --json, --csv), ``/api/v1/usage`` and the ``usage`` report, over a
recorded timeline (tests/test_history.py) written to a state directory with an explicit clock."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from builders import cli, write_config
from gpuwatch.config import ReportSchedule, WebConfig
from gpuwatch.config.load import load_config
from gpuwatch.fleet import FleetState
from gpuwatch.store.history import HOUR, HistorySettings
from gpuwatch.text import iso_time
from gpuwatch.usage import period
from gpuwatch.usagereport import TOP_PEOPLE, usage_report
from gpuwatch.web import WebApp
from timeline import ALICE, ALICE_IDLE, BOB, T0, two_hours


def local(t: float) -> str:
    return datetime.fromtimestamp(t).astimezone().strftime("%Y-%m-%d %H:%M")


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    path = write_config(tmp_path, hosts=["gpu-a"], alerts={"idle_gpu": {"util_below": 3}})
    writer, _ = two_hours(tmp_path / "state")
    writer.stop()
    return path


def test_the_idle_threshold_is_the_idle_gpu_rules_unless_history_sets_one(tmp_path: Path) -> None:
    path = write_config(tmp_path, alerts={"idle_gpu": {"util_below": 3}})
    assert HistorySettings.of(load_config(path)).idle_below == 3
    path = write_config(tmp_path, alerts={"idle_gpu": {"util_below": 3}}, history={"idle_below": 20, "keep": "30d"})
    settings = HistorySettings.of(load_config(path))
    assert (settings.idle_below, settings.keep) == (20, 30 * 86400)
    assert HistorySettings.of(load_config(write_config(tmp_path))).idle_below == 5


def test_usage_json_has_one_record_per_person_with_their_hours(config_path: Path) -> None:
    code, out = cli(config_path, "usage", "--json", "--from", local(T0), "--to", local(T0 + 2 * HOUR))
    assert code == 0
    doc = json.loads(out)
    people = {g["user"]: g for g in doc["groups"]}
    assert people["alice"]["gpu_hours"] == pytest.approx(ALICE, abs=1e-3)
    assert people["alice"]["held_idle_gpu_hours"] == pytest.approx(ALICE_IDLE, abs=1e-3)
    assert people["bob"]["gpu_hours"] == pytest.approx(BOB, abs=1e-3)
    assert doc["fleet"]["unknown_gpu_hours"] == pytest.approx(0.5)
    assert [g["user"] for g in doc["groups"]] == ["alice", "bob"]  # most GPU-hours first


def test_usage_csv_and_text_by_gpu(config_path: Path) -> None:
    code, out = cli(config_path, "usage", "--csv", "--by", "gpu", "--from", local(T0), "--to", local(T0 + 2 * HOUR))
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["gpu"] for r in rows] == ["gpu-a:0", "gpu-a:1"]
    assert float(rows[0]["gpu_hours"]) == pytest.approx(1.75)
    assert float(rows[1]["unknown_gpu_hours"]) == pytest.approx(0.25)
    code, text = cli(config_path, "usage", "--by", "host", "--from", local(T0), "--to", local(T0 + 2 * HOUR))
    assert code == 0 and "gpu-a" in text and "3.5" in text and "Fleet: 3.5 GPU-hours used" in text


def test_usage_without_history_says_so_and_a_bad_period_is_a_usage_error(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    code, out = cli(path, "usage")
    assert code == 0 and "No usage history yet" in out
    assert not (tmp_path / "state" / "history.sqlite3").exists()  # reading creates nothing
    assert cli(path, "usage", "--to", "2026-12-01")[0] == 2
    assert cli(path, "usage", "--from", "yesterday")[0] == 2
    assert cli(path, "usage", "--since", "soon")[0] == 2


def test_a_period_is_whole_hours_but_for_now() -> None:
    now = T0 + 5 * HOUR + 123
    assert period(now) == (T0 + 5 * HOUR - 7 * 86400, now)
    assert period(now, since=2 * HOUR) == (T0 + 3 * HOUR, now)
    assert period(now, start=T0 + 10, end=T0 + HOUR + 10) == (T0, T0 + HOUR)
    with pytest.raises(ValueError):
        period(now, start=T0 + 10, end=T0 + 20)


def test_the_api_serves_the_same_document(config_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config(config_path)
    monkeypatch.setattr("gpuwatch.web.time.time", lambda: T0 + 2 * HOUR)
    app = WebApp(FleetState([("gpu-a", "gpu-a")], 60), lambda: config, config.web or WebConfig())
    response = app.respond({"PATH_INFO": "/api/v1/usage", "QUERY_STRING": "since=2h&by=user"})
    assert response.status == "200 OK"
    doc = json.loads(response.body)
    assert {g["user"] for g in doc["groups"]} == {"alice", "bob"}
    _, out = cli(config_path, "usage", "--json", "--from", local(T0), "--to", local(T0 + 2 * HOUR))
    assert doc["groups"] == json.loads(out)["groups"]
    bad = app.respond({"PATH_INFO": "/api/v1/usage", "QUERY_STRING": "by=nobody"})
    assert bad.status == "400 Bad Request"


def doc(people: dict[str, float], *, never: list[str] | None = None) -> dict[str, Any]:
    groups = [{"user": n, "gpu_hours": h, "held_idle_gpu_hours": h / 4} for n, h in people.items()]
    used = sum(people.values())
    fleet = {
        "gpu_hours": used,
        "held_idle_gpu_hours": used / 4,
        "known_gpu_hours": 100.0,
        "unknown_gpu_hours": 2.0,
        "utilization_percent": 41.0,
    }
    return {
        "from": iso_time(T0),
        "to": iso_time(T0 + 7 * 86400),
        "by": "user",
        "groups": groups,
        "fleet": fleet,
        "never_used": never or [],
    }


def test_the_usage_report_names_the_top_people_the_change_and_the_gpus_never_used() -> None:
    current = doc({"alice": 40.0, "bob": 10.0, "carol": 2.0}, never=["gpu-b:3", "gpu-b:1", "gpu-c:0"])
    previous = doc({"alice": 20.0, "bob": 10.0})
    message = usage_report(current, previous)
    assert message.title == "GPU usage, last 7d: 52.0 GPU-hours, 3 people"
    text = message.text
    assert "Fleet: 52.0 GPU-hours used (52% of the 100.0 GPU-hours the hosts answered), +22.0 h, +73%" in text
    assert "mean utilization 41%" in text and "2.0 GPU-hours unknown (hosts did not answer)" in text
    assert "alice: 40.0 GPU-hours, held idle 10.0 (+20.0 h, +100%)" in text
    assert "bob: 10.0 GPU-hours, held idle 2.5 (same as before)" in text
    assert "carol: 2.0 GPU-hours, held idle 0.5 (new)" in text
    assert "Never used (3 GPUs): gpu-b GPU 1, 3; gpu-c GPU 0" in text
    assert message.body is not None and [s.title for s in message.body.sections] == [
        "Fleet",
        "Most GPU-hours",
        "Never used",
    ]
    many = usage_report(doc({f"u{i:02}": 50.0 - i for i in range(TOP_PEOPLE + 3)}), {})
    assert "and 3 more people" in many.text and "u12" not in many.text


def test_the_usage_report_is_a_report_kind_the_schedule_and_run_report_accept(tmp_path: Path) -> None:
    path = write_config(tmp_path, schedule={"reports": [{"report": "usage", "every": "7d"}]})
    assert load_config(path).schedule.reports == (ReportSchedule(report="usage", every=7 * 86400.0),)
