"""The whole-site page (``web.peers``) in a real browser: two shard daemons (``run --shard 1/2`` and
``2/2``) over the real sshd fleet with one shared ``web.peers`` list naming both; shard 1's page
shows shard 2's hosts, and once shard 2 is stopped, shows them as not answering (live, without a
reload), with since when and why.

Slow (a browser); skips where chromium/chromedriver/selenium are missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from browser import browser_unavailable_reason, chromium, full_page_screenshot
from fleet import Fleet
from shards import free_port, get, get_json, start_shard, stop_shard, write_shard_config
from waiting import wait_for

pytestmark = pytest.mark.slow


def peer_rows(driver: Any) -> list[tuple[str, str, str]]:
    """(host, state class, state words) of every other shard's host the page shows now."""
    return [
        tuple(row)
        for row in driver.execute_script(
            "return Array.from(document.querySelectorAll('#site tr.peer-host')).map(r =>"
            " [r.querySelector('.name').textContent, r.className.replace('peer-host ', ''),"
            " r.querySelector('.state').textContent])"
        )
    ]


def test_the_whole_site_page_shows_a_stopped_shards_hosts_as_not_answering(
    fleet: Fleet, known_hosts: Path, tmp_path: Path
) -> None:
    reason = browser_unavailable_reason()
    if reason:
        pytest.skip(reason)
    ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{port}/" for port in ports]
    shared = {
        "hosts": [{"name": f"gpu-{i:02d}", "address": a} for i, a in enumerate(fleet.addresses, start=1)],
        "ssh": fleet.gpuwatch_ssh(known_hosts, connect_timeout="2s", command_timeout="5s"),
        "schedule": {"poll_every": "2s", "reports": []},
        "web": {"peers": urls},  # one list for every shard: each page skips itself
    }
    first = start_shard(write_shard_config(tmp_path / "shard-1", shared, ports[0]), "1/2")
    second = start_shard(write_shard_config(tmp_path / "shard-2", shared, ports[1]), "2/2")
    stopped = False
    try:
        own = [h["name"] for h in get_json(urls[0] + "api/v1/snapshot")["hosts"]]
        theirs = [h["name"] for h in get_json(urls[1] + "api/v1/snapshot")["hosts"]]
        assert sorted(own + theirs) == sorted(h["name"] for h in shared["hosts"]) and own and theirs
        wait_for(
            lambda: get(urls[0]).decode().count('class="peer-host ok"') == len(theirs),
            60,
            "shard 1's page to show shard 2's hosts answering",
        )
        with chromium(1280, 900) as driver:
            from selenium.webdriver.common.by import By

            driver.get(urls[0])
            peers = driver.find_elements(By.CSS_SELECTOR, "#site .peer")
            assert len(peers) == 1  # shard 2 only: shard 1 is this page, skipped
            assert "shard 2/2" in peers[0].text and f"answering; {len(theirs)} hosts" in peers[0].text
            assert [r[0] for r in peer_rows(driver)] == theirs
            assert {r[1] for r in peer_rows(driver)} == {"ok"}
            assert driver.find_element(By.CSS_SELECTOR, "#site h2").text == "The whole site (this page: shard 1/2)"
            site = driver.find_element(By.CSS_SELECTOR, "#site .site-summary").text
            assert site.startswith(f"Whole site: 2 shards, {len(own) + len(theirs)} hosts, ")
            full_page_screenshot(driver, tmp_path / "site-both.png")

            stop_shard(second)
            stopped = True
            driver.execute_script("window.notReloaded = true")
            wait_for(
                lambda: {r[1] for r in peer_rows(driver)} == {"not-answering"},
                30,
                "shard 2's hosts shown as not answering",
            )
            rows = peer_rows(driver)
            assert [r[0] for r in rows] == theirs  # kept from its last answer, not dropped
            assert all(r[2] == "not answering: its shard is unreachable" for r in rows)
            state = driver.find_element(By.CSS_SELECTOR, "#site .peer.unreachable .peer-state").text
            assert state.startswith("not answering for ") and " (since " in state and "connection refused" in state
            assert "its hosts as of its last answer at" in state
            summary = driver.find_element(By.CSS_SELECTOR, "#site .site-summary").text
            assert f"shard 2/2 not answering ({len(theirs)} hosts, {4 * len(theirs)} GPUs not known now)" in summary
            assert driver.execute_script("return window.notReloaded") is True  # updated live
            # this shard's own hosts are still shown whole
            names = driver.execute_script(
                "return Array.from(document.querySelectorAll('section.host .name')).map(e => e.textContent)"
            )
            assert sorted(names) == sorted(own)
            full_page_screenshot(driver, tmp_path / "site-one-stopped.png")
    finally:
        if not stopped:
            stop_shard(second)
        stop_shard(first)
    assert (tmp_path / "site-one-stopped.png").stat().st_size > 10_000
    assert f"web.peers: http://127.0.0.1:{ports[1]} does not answer" in first.log.read_text()
