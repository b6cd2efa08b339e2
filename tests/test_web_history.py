"""The page's sparklines, the usage view (/usage) and /api/v1/usage/daily, called as a WSGI app over
a fleet state from real captures and a usage history recorded for the last hours (no server, no
browser: those are in test_web_history_e2e.py). Hostile names stay text; no history, a history
switched off and an unreadable one each leave a working page that says so."""

from __future__ import annotations

import base64
import gzip
import io
import json
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from builders import Clock, config, fleet
from gpuwatch.config.load import parse_config
from gpuwatch.store.historyread import HistoryReader
from gpuwatch.store.historywriter import HistoryWriter
from gpuwatch.web import WebApp
from timeline import SETTINGS, answered, failed, proc
from timeline import Clock as WallClock

HOSTILE = '<script>alert("usage")</script>'
HOURS = 4


def record(state_dir: Path, now: float) -> float:
    """gpu-a polled every minute for the last ``HOURS`` hours up to ``now``: GPU 0 alice's at 60 %,
    GPU 1 shared by the hostile name (3000 MiB) and bob (1000 MiB) at 2 % (held idle); the host
    silent for 20 minutes an hour in. Returns when it began."""
    began = now - HOURS * 3600
    clock = WallClock(began)
    writer = HistoryWriter(state_dir, SETTINGS, poll_every=60, clock=clock)
    jobs = [proc(10, 0, "alice", 20000), proc(11, 1, HOSTILE, 3000), proc(12, 1, "bob", 1000)]
    for k in range(HOURS * 60):
        t = began + 60 * k
        clock.now = t + 1
        writer.record(failed(t) if 60 <= k < 80 else answered(t, [60, 2], jobs))
        if k % 30 == 0:
            writer.flush()
    writer.stop()
    return began


def app_for(tmp_path: Path, **extra: Any) -> WebApp:
    cfg = parse_config({"hosts": ["gpu-a"], "state_dir": str(tmp_path / "state"), "web": {}, **extra})
    assert cfg.web is not None
    return WebApp(fleet(Clock()), lambda: cfg, cfg.web, None)


def call(app: WebApp, path: str, **headers: str) -> tuple[int, dict[str, str], str]:
    path, _, query = path.partition("?")
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": query, "wsgi.input": io.BytesIO()}
    environ.update({"HTTP_" + k.upper(): v for k, v in headers.items()})
    seen: dict[str, Any] = {}

    def start_response(status: str, header_list: list[tuple[str, str]]) -> None:
        seen["status"], seen["headers"] = status, dict(header_list)

    body = b"".join(app(environ, start_response))
    if seen["headers"].get("Content-Encoding") == "gzip":
        body = gzip.decompress(body)
    return int(seen["status"].split()[0]), seen["headers"], body.decode()


def gpu_rows(html: str) -> dict[str, str]:
    """host/GPU n -> the HTML of its row in the list view."""
    rows = {}
    for section in re.findall(r'<section class="host".*?</section>', html, re.S):
        host = re.search(r'<span class="name">(.*?)</span>', section)
        assert host is not None
        for index, row in re.findall(r"<b>GPU (\d+)</b>(.*?)</ul>", section, re.S):
            rows[f"{host.group(1)}/{index}"] = row
    return rows


def now_crosses_midnight() -> bool:
    """Did the recorded hours begin yesterday (then each day's figures are parts of the whole)?"""
    return time.localtime(time.time() - HOURS * 3600 - 60).tm_mday != time.localtime().tm_mday


@pytest.fixture
def recorded(tmp_path: Path) -> WebApp:
    record(tmp_path / "state", time.time())
    return app_for(tmp_path)


def test_each_gpu_with_history_has_a_24_hour_sparkline_and_the_others_say_no_history_yet(recorded: WebApp) -> None:
    status, _, html = call(recorded, "/")
    assert status == 200
    rows = gpu_rows(html)
    spark = re.search(r'<svg class="spark" viewBox="0 0 96 24".*?</svg>', rows["gpu-a/0"], re.S)
    assert spark is not None, rows["gpu-a/0"]
    label = re.search(r"<title>([^<]*)</title>", spark.group(0))
    assert label is not None
    assert label.group(1).startswith("last 24 h: utilization mean 60 %, peak 60 %; memory mean 25 %")
    assert "20m unknown (host did not answer)" in label.group(1)
    assert '<rect class="sd"' in spark.group(0)  # the silent time, as a band
    path = re.search(r'<path class="su" d="([^"]*)"', spark.group(0))
    assert path is not None and set(re.findall(r"V(\d+)", path.group(1))) <= {"10", "24"}  # 60 % of 24 up: y 10
    for other in ("gpu-f/0", "gpu-m/0"):  # polled now, never recorded
        assert '<span class="nohist">no history yet</span>' in rows[other]
    assert 'class="ku">util</span> <span class="km">mem</span>' in rows["gpu-a/0"]
    # the live part the page's script fetches carries them too, and the wall view
    _, _, fragment = call(recorded, "/fragment")
    assert '<svg class="spark"' in gpu_rows(fragment)["gpu-a/0"]
    _, _, wall = call(recorded, "/?view=wall")
    cell = re.search(r'<div class="cell [a-z]+" data-gpu="0" title="([^"]*)">(.*?)</div>', wall, re.S)
    assert cell is not None and "last 24 h: utilization mean 60 %" in cell.group(1)
    assert '<svg class="spark wallspark"' in cell.group(2)
    assert 'href="/usage"' in html  # the usage view is linked from the page


def test_the_usage_view_shows_gpu_hours_per_person_and_day_with_hostile_names_as_text(recorded: WebApp) -> None:
    status, headers, html = call(recorded, "/usage")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert HOSTILE not in html and "<script" not in html and " style=" not in html
    escaped = "&lt;script&gt;alert(&#34;usage&#34;)&lt;/script&gt;"
    assert escaped in html
    people = re.findall(
        r'<tr><th scope="row" class="user"><i class="sw (p\d)"></i>(.*?)</th><td class="n">([\d.]+)', html
    )
    # alice: GPU 0 for the 3 h 40 min it answered; GPU 1 split 3:1 between the hostile name and bob
    assert people == [("p0", "alice", "3.7"), ("p1", escaped, "2.8"), ("p2", "bob", "0.9")]
    held = re.findall(r'<td class="n idle">([\d.]+) <span class="pct">\((\d+) %\)</span>', html)
    assert held == [("0.0", "0"), ("2.8", "100"), ("0.9", "100")]  # GPU 1 idled at 2 % all along
    assert html.count('<li class="day') == 7 and '<li class="day today"' in html
    assert f"<title>{escaped}: 2.8 GPU-hours, 2.8 held idle</title>" in html or now_crosses_midnight()
    assert "Last 7 days" in html and 'class="chosen" aria-current="page">7 days</a>' in html
    status, _, month = call(recorded, "/usage?days=30")
    assert status == 200 and month.count('<li class="day') == 30 and "Last 30 days" in month


def test_the_daily_document_adds_up_to_the_usage_of_the_same_period(recorded: WebApp, tmp_path: Path) -> None:
    status, headers, body = call(recorded, "/api/v1/usage/daily?days=2")
    assert status == 200 and headers["Content-Type"] == "application/json; charset=utf-8"
    doc = json.loads(body)
    assert len(doc["days"]) == 2 and doc["days"][-1]["day"] == time.strftime("%Y-%m-%d")
    per_person: dict[str, list[float]] = {}
    for day in doc["days"]:
        for p in day["people"]:
            per_person.setdefault(p["user"], [0.0, 0.0])
            per_person[p["user"]][0] += p["gpu_hours"]
            per_person[p["user"]][1] += p["held_idle_gpu_hours"]
    start = doc["days"][0]["from"]
    reader = HistoryReader(tmp_path / "state")
    usage = reader.usage(
        datetime.fromisoformat(start).timestamp(),
        datetime.fromisoformat(doc["to"]).timestamp(),
        "user",
        idle_below=5,
        half_life=7 * 86400,
    )
    reader.close()
    expected = {g["user"]: (g["gpu_hours"], g["held_idle_gpu_hours"]) for g in usage["groups"]}
    assert set(per_person) == set(expected) == {"alice", "bob", HOSTILE}
    for name, (hours, idle) in per_person.items():
        assert hours == pytest.approx(expected[name][0], abs=1e-5) and idle == pytest.approx(
            expected[name][1], abs=1e-5
        )
    assert sum(d["fleet"]["unknown_gpu_hours"] for d in doc["days"]) == pytest.approx(2 * 20 / 60, abs=1e-5)


def test_no_history_yet_leaves_every_view_working_and_saying_so(tmp_path: Path) -> None:
    app = app_for(tmp_path)
    status, _, html = call(app, "/")
    assert status == 200 and html.count('<span class="nohist">no history yet</span>') == 3
    status, _, usage = call(app, "/usage")
    assert status == 200 and "No history yet: the daemon writes it as it polls." in usage
    assert 'id="people"' not in usage
    status, _, body = call(app, "/api/v1/usage/daily")
    assert status == 200 and all(d["people"] == [] for d in json.loads(body)["days"])
    assert not (tmp_path / "state" / "history.sqlite3").exists()  # reading made no file


def test_a_history_switched_off_shows_no_sparkline_row_and_the_usage_view_says_it_is_off(tmp_path: Path) -> None:
    record(tmp_path / "state", time.time())
    app = app_for(tmp_path, history={"enabled": False})
    _, _, html = call(app, "/")
    assert "sparkrow" not in html and '<svg class="spark' not in html
    _, _, wall = call(app, "/?view=wall")
    assert "wallspark" not in wall
    status, _, usage = call(app, "/usage")
    assert status == 200 and "The usage history is off (history.enabled: false)." in usage
    status, _, body = call(app, "/api/v1/usage/daily")
    assert status == 503 and "history is off" in json.loads(body)["error"]


def test_an_unreadable_history_is_said_on_the_page_not_an_error_page(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir(mode=0o700)
    (tmp_path / "state" / "history.sqlite3").write_bytes(b"this is not a database" * 100)
    app = app_for(tmp_path)
    status, _, html = call(app, "/")
    assert status == 200 and "history not readable" in html
    status, _, usage = call(app, "/usage")
    assert status == 200 and "The usage history cannot be read" in usage
    assert call(app, "/api/v1/usage/daily")[0] == 503


def test_a_period_the_usage_view_cannot_read_is_a_400_that_says_why_in_escaped_words(tmp_path: Path) -> None:
    app = app_for(tmp_path)
    status, _, html = call(app, "/usage?from=<script>x</script>")
    assert status == 400 and "Cannot show that period: from: " in html and "<script>x" not in html
    assert "&lt;script&gt;x" in html
    status, _, body = call(app, "/api/v1/usage/daily?days=0")
    assert status == 400 and "days: a whole number" in json.loads(body)["error"]


def test_the_usage_view_needs_the_same_login_as_the_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUWATCH_WEB_PASSWORD", "s3cret-pass")
    cfg = config(tmp_path, auth={"user": "lab", "password_env": "GPUWATCH_WEB_PASSWORD"})
    app = WebApp(fleet(Clock()), lambda: cfg, cfg.web, None)
    for path in ("/usage", "/api/v1/usage/daily"):
        assert call(app, path)[0] == 401
        good = "Basic " + base64.b64encode(b"lab:s3cret-pass").decode()
        assert call(app, path, authorization=good)[0] == 200
