"""The wall view, the alerts panel, the per-person summary and the sorts in a real browser, for a
20 x 8 lab (160 GPUs) on a 1920 x 1080 screen.

The fleet is built from real captures (tests/builders.py stacks the H100 load and idle rows into
8-GPU hosts, owners from ``ps`` entries), kept in a real :class:`FleetState` and served by the real
:class:`WebApp` on a :class:`WebServer` on 127.0.0.1: 20 sshd hosts are not needed to fill a wall.
Screenshots are written to the test's tmp directory (and to ``$GPUWATCH_SCREENSHOTS`` when set).

Slow (a browser): ``-m "not slow"`` leaves them out; they skip, saying why, without chromium.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from browser import browser_unavailable_reason, chromium, full_page_screenshot
from builders import Job, down, h100_host
from gpuwatch.config.load import parse_config
from gpuwatch.fleet import FleetState
from gpuwatch.model import HostSnapshot
from gpuwatch.rules import AlertKey, AlertRecord
from gpuwatch.store import AlertStore, StoreReader, open_db
from gpuwatch.web import WebApp, WebServer
from waiting import wait_for

pytestmark = pytest.mark.slow

HOSTS = [f"lab-{i:02d}" for i in range(1, 21)]
GPUS = 8
PEOPLE = ("alice", "bob", "carol", "dmitri", "erin", "verylongusername", "fatima", "gao")
DOWN = "lab-07"  # answered once, then unreachable: its 8 GPUs are unknown
HELD = "lab-13"  # GPU 0 holds memory with no process listed


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(timezone.utc)

    def __call__(self) -> datetime:
        return self.now


def lab_host(n: int, name: str) -> HostSnapshot:
    """Host ``n``: (n * 5) % 9 of its 8 GPUs busy, each with two people's jobs (the capture's third
    process row keeps its pid, which ps does not see)."""
    busy = (n * 5) % 9
    jobs = []
    for gpu in range(busy):
        for k in range(2):
            person = PEOPLE[(n + gpu + k) % len(PEOPLE)]
            jobs.append(Job(person, 10_000 + n * 100 + gpu * 10 + k, gpu, 3600 * (gpu + 1), "python3 train.py"))
    return h100_host(name, jobs, n_gpus=GPUS)


def lab_fleet(clock: Clock) -> FleetState:
    state = FleetState([(n, n) for n in HOSTS], poll_every=5, now=clock)
    for n, name in enumerate(HOSTS, start=1):
        snap = lab_host(n, name)
        if name == HELD:
            snap = replace(snap, processes=tuple(p for p in snap.processes if p.gpu_index != 0))
        state.update(snap)
    clock.now += timedelta(seconds=5)
    state.update(down(DOWN))
    return state


def firing_state(state_dir: Path, now: float) -> None:
    db = open_db(state_dir)
    records = {}
    for key, value, threshold, unit, facts in (
        (AlertKey("host_down", DOWN), 3, 3, "polls", {"error": "connection refused"}),
        (AlertKey("gpu_temperature", "lab-03", gpu=2), 91, 85, "°C", {}),
    ):
        records[key.id] = AlertRecord(
            key, "firing", now - 600, value=value, threshold=threshold, unit=unit, fired_at=now - 300, facts=facts
        )
    AlertStore(db).save(records, AlertStore(db).memory())
    db.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    reason = browser_unavailable_reason()
    if reason:
        pytest.skip(reason)
    clock = Clock()
    state = lab_fleet(clock)
    firing_state(tmp_path / "state", clock.now.timestamp())
    cfg = parse_config({"hosts": HOSTS, "state_dir": str(tmp_path / "state"), "web": {"listen": "127.0.0.1:0"}})
    assert cfg.web is not None
    server = WebServer(WebApp(state, lambda: cfg, cfg.web, StoreReader(tmp_path / "state")), "127.0.0.1", 0)
    server.start()
    try:
        yield server.url()
    finally:
        server.stop()


def keep(shot: Path) -> Path:
    """Copy a screenshot to $GPUWATCH_SCREENSHOTS (for people to look at), when set."""
    target = os.environ.get("GPUWATCH_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(target) / shot.name)
    return shot


def screenshot(driver: Any, path: Path) -> Path:
    """The viewport as a PNG: what a screen on the wall shows."""
    assert driver.save_screenshot(str(path))
    return keep(path)


def rects(driver: Any, selector: str) -> list[dict[str, float]]:
    return list(
        driver.execute_script(
            "return Array.from(document.querySelectorAll(arguments[0])).map(e => {"
            " const r = e.getBoundingClientRect();"
            " return {top: r.top, left: r.left, bottom: r.bottom, right: r.right,"
            " width: r.width, height: r.height}; })",
            selector,
        )
    )


def no_horizontal_scroll(driver: Any) -> None:
    widths = driver.execute_script(
        "return [document.documentElement.scrollWidth, document.documentElement.clientWidth]"
    )
    wide = driver.execute_script(
        "return Array.from(document.querySelectorAll('body *')).filter(e =>"
        " e.getBoundingClientRect().right > document.documentElement.clientWidth + 0.5)"
        ".slice(0, 5).map(e => e.tagName + '.' + e.className + ': ' + e.textContent.slice(0, 60))"
    )
    assert widths[0] <= widths[1], f"horizontal scroll: {widths}, too wide: {wide}"


def test_the_wall_shows_a_20x8_lab_on_one_1920x1080_screen(served: str, tmp_path: Path) -> None:
    with chromium(1920, 1080) as driver:
        driver.get(served + "?view=wall")
        width, height = driver.execute_script("return [window.innerWidth, window.innerHeight]")
        assert (width, height) == (1920, 1080)
        screenshot(driver, tmp_path / "wall-1920x1080.png")
        cells = rects(driver, ".tile .cell")
        assert len(cells) == len(HOSTS) * GPUS  # the down host's 8 as unknown cells
        outside = [c for c in cells if c["top"] < 0 or c["left"] < 0 or c["bottom"] > height or c["right"] > width]
        assert not outside, f"{len(outside)} GPUs outside the screen, e.g. {outside[:2]}"
        assert min(c["height"] for c in cells) >= 60 and min(c["width"] for c in cells) >= 60  # big, not specks
        scroll = driver.execute_script("return [document.documentElement.scrollHeight, window.innerHeight]")
        assert scroll[0] <= scroll[1], f"the wall scrolls: {scroll}"
        assert len(driver.find_elements("css selector", f".tile.down[data-host='{DOWN}'] .cell.unknown")) == GPUS
        assert len(driver.find_elements("css selector", f".tile[data-host='{HELD}'] .cell.held")) == 1
        # free GPUs stand out: a bright fill with a big FREE
        free = driver.find_element("css selector", ".cell.free")
        assert free.find_element("css selector", ".st").text == "FREE"
        assert float(free.find_element("css selector", ".st").value_of_css_property("font-size")[:-2]) >= 20
        # the alerts panel and who uses the GPUs are on the wall too, on the same screen
        alerts = driver.find_element("css selector", "#alerts")
        assert "2 alerts firing" in alerts.text and "lab-07" in alerts.text
        assert alerts.rect["y"] + alerts.rect["height"] <= height
        people = driver.find_element("css selector", "#people")
        assert "alice" in people.text and people.rect["y"] < height
        # it refreshes like the list page: /fragment with the same query, the view kept
        driver.execute_script("window.notReloaded = true; document.querySelector('.tiles').dataset.old = '1'")
        wait_for(lambda: driver.execute_script("return !document.querySelector('.tiles[data-old]')"), 15, "a refresh")
        assert driver.execute_script("return window.notReloaded") is True
        assert len(rects(driver, ".tile .cell")) == len(HOSTS) * GPUS
    with chromium(1920, 1080, dark=True) as driver:
        driver.get(served + "?view=wall")
        assert driver.execute_script("return getComputedStyle(document.body).backgroundColor") == "rgb(20, 23, 28)"
        scroll = driver.execute_script("return [document.documentElement.scrollHeight, window.innerHeight]")
        assert scroll[0] <= scroll[1], f"the dark wall scrolls: {scroll}"
        screenshot(driver, tmp_path / "wall-1920x1080-dark.png")
    for dark in (False, True):
        with chromium(390, 844, dark=dark) as phone:
            phone.get(served + "?view=wall")
            no_horizontal_scroll(phone)
            screenshot(phone, tmp_path / f"wall-390px-{'dark' if dark else 'light'}-top.png")
            keep(full_page_screenshot(phone, tmp_path / f"wall-390px-{'dark' if dark else 'light'}.png"))


def host_order(driver: Any) -> list[str]:
    return list(
        driver.execute_script(
            "return Array.from(document.querySelectorAll('section.host .name')).map(e => e.textContent)"
        )
    )


def test_the_list_page_alerts_people_and_sorts_in_a_real_browser(served: str, tmp_path: Path) -> None:
    from selenium.webdriver.support.ui import Select

    with chromium(1920, 1080) as driver:
        driver.get(served)
        assert host_order(driver) == [h for h in HOSTS if h != DOWN]
        alerts = driver.find_element("css selector", "section.alerts")
        assert "2 alerts firing" in alerts.text and "gpu_temperature" in alerts.text.lower()
        people = driver.find_element("css selector", "#people")
        rows = people.find_elements("css selector", "tbody tr")
        assert rows[0].find_element("css selector", "th").text.split()[0] in PEOPLE
        assert rows[-1].text.startswith("owner unknown")
        summary = driver.find_element("css selector", ".summary").text
        assert "160 GPUs" in summary and "8 unknown" in summary
        keep(full_page_screenshot(driver, tmp_path / "page-1920.png"))
        screenshot(driver, tmp_path / "page-1920x1080.png")

        # sorts: without a reload, kept in the URL, and surviving a reload
        driver.execute_script("window.notReloaded = true")
        Select(driver.find_element("id", "sort")).select_by_value("free")
        wait_for(lambda: "sort=free" in driver.current_url, 10, "sort=free in the URL")

        def most_free_first() -> bool:
            counts = driver.execute_script(
                "return Array.from(document.querySelectorAll('section.host')).map(s =>"
                " s.querySelectorAll('.gpu.free').length)"
            )
            return bool(counts) and counts == sorted(counts, reverse=True) and counts != []

        wait_for(most_free_first, 10, "hosts with the most free GPUs first")
        assert host_order(driver) != [h for h in HOSTS if h != DOWN]
        assert driver.execute_script("return window.notReloaded") is True
        Select(driver.find_element("id", "sort")).select_by_value("host")
        wait_for(lambda: "sort=host" in driver.current_url, 10, "sort=host in the URL")
        wait_for(lambda: host_order(driver) == sorted(h for h in HOSTS if h != DOWN), 10, "hosts by name")
        Select(driver.find_element("id", "sort")).select_by_value("memory")
        wait_for(lambda: "sort=memory" in driver.current_url, 10, "sort=memory in the URL")
        wait_for(lambda: host_order(driver)[-1] == "lab-16", 10, "the fullest host last")  # 8 of 8 GPUs busy
        link = driver.find_element("id", "viewlink").get_attribute("href")
        assert link.endswith("?sort=memory&view=wall"), link  # the wall view with the same sort
        driver.refresh()
        assert Select(driver.find_element("id", "sort")).first_selected_option.get_attribute("value") == "memory"
        assert host_order(driver)[-1] == "lab-16"
    for dark in (False, True):
        with chromium(390, 844, dark=dark) as phone:
            phone.get(served)
            no_horizontal_scroll(phone)
            screenshot(phone, tmp_path / f"page-390px-{'dark' if dark else 'light'}-top.png")
            keep(full_page_screenshot(phone, tmp_path / f"page-390px-{'dark' if dark else 'light'}.png"))
