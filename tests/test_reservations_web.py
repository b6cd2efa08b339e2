"""Bookings on the page and the API: the WSGI app over a fleet state with an explicit clock and a
real state database; and the page in a real headless browser, with a screenshot (slow)."""

from __future__ import annotations

import io
import json
import urllib.request
from pathlib import Path

import pytest

from browser import browser_unavailable_reason, chromium, full_page_screenshot
from builders import WEB_T0, Clock, config, fleet
from gpuwatch.cli import main
from gpuwatch.store import ReservationStore, StoreReader, open_db
from gpuwatch.web import WebApp, WebServer

T0 = WEB_T0.timestamp()
HOUR = 3600.0


def booked_state(tmp_path: Path) -> StoreReader:
    """gpu-f's GPU 0 (idle) booked for bob now, gpu-a's GPU 0 (busy) for carol, and one far ahead."""
    db = open_db(tmp_path / "state")
    store = ReservationStore(db)
    store.add(user="bob", host="gpu-f", gpus=(0,), starts_at=T0 - HOUR, ends_at=T0 + 120, now=T0, comment="ICML")
    store.add(user="carol", host="gpu-a", gpus=(0,), starts_at=T0 - HOUR, ends_at=T0 + HOUR, now=T0)
    store.add(user="dave", host="gpu-f", gpus=(0,), starts_at=T0 + DAY, ends_at=T0 + 2 * DAY, now=T0)
    db.close()
    return StoreReader(tmp_path / "state")


DAY = 24 * HOUR


def app_with(tmp_path: Path, clock: Clock) -> tuple[WebApp, StoreReader]:
    store = booked_state(tmp_path)
    cfg = config(tmp_path)
    return WebApp(fleet(clock), lambda: cfg, cfg.web, store), store


def get(app: WebApp, path: str) -> tuple[int, bytes]:
    path, _, query = path.partition("?")
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": query, "wsgi.input": io.BytesIO()}
    seen: dict[str, str] = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        seen["status"] = status

    body = b"".join(app(environ, start_response))
    return int(seen["status"].split()[0]), body


def test_the_page_and_the_snapshot_api_show_a_booked_gpu_as_reserved_until_the_booking_ends(tmp_path: Path) -> None:
    clock = Clock()
    app, store = app_with(tmp_path, clock)
    status, body = get(app, "/")
    html = body.decode()
    assert status == 200
    assert html.count("reserved for bob until 2026-11-28 10:02 UTC (ICML)") == 1
    assert 'class="gpu reserved"' in html and "RESERVED" in html
    assert "reserved for carol until 2026-11-28 11:00 UTC" in html  # on a busy GPU too
    doc = json.loads(get(app, "/api/v1/snapshot")[1])
    gpu_f = next(h for h in doc["hosts"] if h["name"] == "gpu-f")
    assert gpu_f["gpus"][0]["free"] is False and gpu_f["gpus"][0]["reserved_for"]["user"] == "bob"
    assert doc["summary"]["free_gpus"] == 0  # gpu-f's only GPU is bob's
    wall = get(app, "/?view=wall")[1].decode()
    assert "&#9873;bob" in wall or "\u2691bob" in wall
    # bob's booking has ended (the hosts' results are not stale yet): the GPU is free again, page and API alike
    clock.step(120)
    html = get(app, "/")[1].decode()
    assert "reserved for bob" not in html and html.count("RESERVED") == 1  # carol's, still in force
    assert json.loads(get(app, "/api/v1/snapshot")[1])["summary"]["free_gpus"] == 1
    store.close()


def test_the_reservations_api_is_the_reserve_list_json_document(tmp_path: Path) -> None:
    app, store = app_with(tmp_path, Clock())
    status, body = get(app, "/api/v1/reservations")
    doc = json.loads(body)
    assert status == 200 and doc["now"] == "2026-11-28T10:00:00+00:00"
    assert [(r["id"], r["user"], r["state"]) for r in doc["reservations"]] == [
        (1, "bob", "in force"),
        (2, "carol", "in force"),
        (3, "dave", "future"),
    ]
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(f"hosts: [gpu-a, gpu-f]\nstate_dir: {tmp_path / 'state'}\n")
    out = io.StringIO()
    assert main(["reserve", "list", "--json", "--all", "-c", str(cfg_file)], out=out) == 0
    listed = json.loads(out.getvalue())["reservations"]
    assert [{k: v for k, v in r.items() if k != "state"} for r in listed] == [
        {k: v for k, v in r.items() if k != "state"} for r in doc["reservations"]
    ]
    store.close()


@pytest.mark.slow
def test_the_booking_on_the_page_in_a_real_browser(tmp_path: Path) -> None:
    reason = browser_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    from selenium.webdriver.common.by import By

    app, _ = app_with(tmp_path, Clock())  # server.stop() closes its store
    server = WebServer(app, "127.0.0.1", 0)
    server.start()
    try:
        with urllib.request.urlopen(server.url(), timeout=10) as answer:  # the server answers before the browser asks
            assert answer.status == 200
        with chromium(1280, 900) as driver:
            driver.get(server.url())
            reserved = driver.find_element(By.CSS_SELECTOR, ".gpu.reserved")
            assert "RESERVED" in reserved.text and "reserved for bob until 2026-11-28 10:02 UTC (ICML)" in reserved.text
            assert reserved.value_of_css_property("border-left-color") != "rgba(0, 0, 0, 0)"
            full_page_screenshot(driver, tmp_path / "page-reserved.png")
            driver.get(server.url() + "?view=wall")
            cell = driver.find_element(By.CSS_SELECTOR, ".cell.reserved")
            assert "bob" in cell.text
            full_page_screenshot(driver, tmp_path / "wall-reserved.png")
    finally:
        server.stop()
