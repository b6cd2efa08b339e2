"""The sparklines and the usage view in a real headless browser, served by a real daemon
(``python -m gpuwatch run``) polling the real sshd fleet (tests/fleet.py), whose usage history
holds a recorded week of the same hosts (tests/history_fill.py) before it starts: the daemon
reads it, adds its own polls, and serves the page from it.

Screenshots are written to the test's tmp directory (and to ``$GPUWATCH_SCREENSHOTS`` when set).
Slow (a browser): ``-m "not slow"`` leaves them out; they skip, saying why, without chromium.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from browser import browser_unavailable_reason, chromium, full_page_screenshot
from builders import write_web_config
from fleet import Fleet
from history_fill import HOSTILE, fill_week
from processes import start_web_run
from waiting import wait_for

pytestmark = pytest.mark.slow

POLL = 2.0
GPUS = 4


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def keep(shot: Path) -> Path:
    """Copy a screenshot to $GPUWATCH_SCREENSHOTS (for people to look at), when set."""
    target = os.environ.get("GPUWATCH_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(target) / shot.name)
    return shot


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


@pytest.fixture
def daemon(fleet: Fleet, known_hosts: Path, tmp_path: Path) -> Iterator[Daemon]:
    reason = browser_unavailable_reason()
    if reason:
        pytest.skip(reason)
    hosts = [{"name": f"h{i}", "address": a} for i, a in enumerate(fleet.addresses[:3], start=2)]
    fill_week(tmp_path / "state", [h["name"] for h in hosts], time.time())
    config = write_web_config(tmp_path, fleet, known_hosts, hosts, POLL)
    proc, url, log = start_web_run(config)
    try:
        wait_for(
            lambda: all(h["taken_at"] for h in get_json(url + "api/v1/snapshot")["hosts"]), 30, "every host polled"
        )
        yield Daemon(proc, url, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0, log.read_text()
    assert "Traceback" not in log.read_text()


def spark_labels(driver: Any, selector: str) -> dict[str, str]:
    """host/GPU -> the title of its sparkline (its accessible name; list view rows or wall cells)."""
    return dict(
        driver.execute_script(
            "return Array.from(document.querySelectorAll(arguments[0])).map(s => {"
            " const host = s.closest('section').querySelector('.name').textContent;"
            " const row = s.closest('.gpu, .cell');"
            " const gpu = row.dataset.gpu || row.querySelector('.gid b').textContent.replace('GPU ', '');"
            " return [host + '/' + gpu, s.querySelector('title').textContent]; })",
            selector,
        )
    )


def test_the_sparklines_in_the_list_and_wall_views_of_a_real_daemon(daemon: Daemon, tmp_path: Path) -> None:
    with chromium(1920, 1080) as driver:
        driver.get(daemon.url)
        keep(full_page_screenshot(driver, tmp_path / "sparklines-list-1920.png"))
        labels = spark_labels(driver, ".gpu svg.spark")
        assert set(labels) == {f"h{h}/{g}" for h in (2, 3, 4) for g in range(GPUS)}
        assert all(label.startswith("last 24 h: utilization mean") for label in labels.values())
        assert "2h unknown (host did not answer)" in labels["h3/0"]
        assert "unknown" not in labels["h2/0"]
        # the silent hours are a band, drawn where they were: 5 to 3 hours before now, of 24 h
        band = driver.execute_script(
            "const svg = document.querySelectorAll('section.host')[1].querySelector('svg.spark');"
            " const r = svg.querySelector('rect.sd').getBoundingClientRect(), s = svg.getBoundingClientRect();"
            " return [(r.left - s.left) / s.width, r.width / s.width, s.width, s.height];"
        )
        assert band[0] == pytest.approx(19 / 24, abs=0.02) and band[1] == pytest.approx(2 / 24, abs=0.02), band
        assert band[2] >= 150 and band[3] >= 20  # readable, not a speck
        assert driver.find_elements("css selector", "img") == []
        driver.get(daemon.url + "?view=wall")
        cells = driver.execute_script(
            "return Array.from(document.querySelectorAll('.cell svg.wallspark')).map(s =>"
            " s.closest('section').dataset.host + '/' + s.closest('.cell').dataset.gpu)"
        )
        assert sorted(cells) == sorted(labels)
        title = driver.find_element("css selector", "section[data-host=h3] .cell[data-gpu='0']").get_attribute("title")
        assert "2h unknown (host did not answer)" in title  # the cell's own title says the sparkline's words
        scroll = driver.execute_script("return [document.documentElement.scrollHeight, window.innerHeight]")
        assert scroll[0] <= scroll[1], f"the wall scrolls: {scroll}"
        assert driver.save_screenshot(str(tmp_path / "sparklines-wall-1920x1080.png"))
        keep(tmp_path / "sparklines-wall-1920x1080.png")
    for dark in (False, True):
        with chromium(390, 844, dark=dark) as phone:
            phone.get(daemon.url)
            no_horizontal_scroll(phone)
            assert len(phone.find_elements("css selector", ".gpu svg.spark")) == 3 * GPUS
            keep(full_page_screenshot(phone, tmp_path / f"sparklines-390px-{'dark' if dark else 'light'}.png"))


def test_the_usage_view_of_a_real_daemon_by_person_and_day(daemon: Daemon, tmp_path: Path) -> None:
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    def unseen_counted() -> bool:  # the daemon's own polls written (its writer commits every 2 s)
        today = get_json(daemon.url + "api/v1/usage/daily?days=1")["days"][-1]
        return any(p["user"] == "?" for p in today["people"])

    wait_for(unseen_counted, 30, "the daemon's polls of the fleet in the history")
    with chromium(1920, 1080) as driver:
        driver.get(daemon.url)
        driver.find_element(By.ID, "usagelink").click()
        wait_for(lambda: driver.current_url.endswith("/usage"), 10, "the usage view")
        rows = driver.find_elements(By.CSS_SELECTOR, "#people tbody tr")
        names = [r.find_element(By.CSS_SELECTOR, "th").text for r in rows]
        # the recorded week's people, and the fleet's own (its unseen process as "?") the daemon added
        assert names[:2] == ["alice", "bob"]
        assert {"alice", "bob", HOSTILE, "verylongusername", "carol", "?"} == set(names)
        hours = {r.find_element(By.CSS_SELECTOR, "th").text: r.find_elements(By.CSS_SELECTOR, "td") for r in rows}
        # alice's GPU 0 on 3 hosts since midnight 6 days ago (today is the 7th day), less h3's two
        # silent hours (the daemon's few seconds of her real job on top)
        today = datetime.now().replace(hour=0, minute=0, second=0, microsecond=0)
        hours_since = (time.time() - (today - timedelta(days=6)).timestamp()) / 3600
        assert float(hours["alice"][0].text) == pytest.approx(3 * hours_since - 2, abs=0.3)
        idle = re.fullmatch(r"[\d.]+ \((\d+) %\)", hours[HOSTILE][1].text)
        assert idle and 45 <= int(idle.group(1)) <= 75  # GPU 1 idled before noon each day (today: so far)
        assert driver.find_elements(By.TAG_NAME, "img") == [] and driver.find_elements(By.TAG_NAME, "script") == []
        with pytest.raises(NoAlertPresentException):
            driver.switch_to.alert
        days = driver.find_elements(By.CSS_SELECTOR, "#days li.day")
        assert len(days) == 7 and "today" in (days[0].get_attribute("class") or "")
        assert all(d.find_elements(By.CSS_SELECTOR, "svg.stack rect") for d in days)
        widths = [
            float(
                driver.execute_script("return arguments[0].querySelector('svg.stack').getBoundingClientRect().width", d)
            )
            for d in days
        ]
        assert min(widths) >= 300
        held = driver.find_elements(By.CSS_SELECTOR, "#days svg.stack rect.idle")
        assert held and float(held[0].value_of_css_property("fill-opacity")) < 1
        keep(full_page_screenshot(driver, tmp_path / "usage-1920.png"))

        # 30 days, then a period of our own through the form
        driver.find_element(By.LINK_TEXT, "30 days").click()
        wait_for(lambda: "days=30" in driver.current_url, 10, "30 days")
        assert len(driver.find_elements(By.CSS_SELECTOR, "#days li.day")) == 30
        assert driver.find_elements(By.CSS_SELECTOR, "#days li.day")[-1].text.count("no data") == 1
        first = time.strftime("%Y-%m-%d", time.localtime(time.time() - 2 * 86400))
        driver.execute_script("document.querySelector('input[name=from]').value = arguments[0]", first)
        driver.execute_script("document.querySelector('input[name=to]').value = ''")
        driver.find_element(By.CSS_SELECTOR, ".range button").click()
        wait_for(lambda: f"from={first}" in driver.current_url, 10, "the chosen period")
        assert len(driver.find_elements(By.CSS_SELECTOR, "#days li.day")) == 3
        title = driver.find_element(By.CSS_SELECTOR, ".ptitle").text
        assert title.endswith(time.strftime("%Y", time.localtime())) and " to " in title
        daily = get_json(daemon.url + f"api/v1/usage/daily?from={first}")
        assert daily["days"][0]["day"] == first and len(daily["days"]) == 3
    for dark in (False, True):
        with chromium(390, 844, dark=dark) as phone:
            phone.get(daemon.url + "usage")
            no_horizontal_scroll(phone)
            assert phone.find_element(By.CSS_SELECTOR, "#people").is_displayed()
            keep(full_page_screenshot(phone, tmp_path / f"usage-390px-{'dark' if dark else 'light'}.png"))
