"""The page in a real browser and /metrics scraped by a real Prometheus, against a real daemon
(``python -m gpuwatch run``) polling the real sshd fleet (tests/fleet.py) with a ``web:`` section
and no channel: a page-only deployment.

Slow (a browser, a Prometheus): ``-m "not slow"`` leaves them out. They skip, saying why, where
chromium/chromedriver/selenium or promtool/prometheus are missing (scripts/test installs them as root).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from browser import browser_unavailable_reason, chromium, full_page_screenshot
from builders import write_web_config
from fleet import Fleet, scenario_healthy_multi_gpu
from processes import start_web_run
from waiting import wait_for

pytestmark = pytest.mark.slow
T = TypeVar("T")

POLL = 2.0  # seconds; the page asks for news every second
XSS = "<img src=x onerror=alert(1)>"
GPUS_PER_HOST = 4


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    url: str
    config: Path
    log: Path


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return bytes(response.read())


def get_json(url: str) -> Any:
    return json.loads(get(url))


def start_daemon(tmp_path: Path, fleet: Fleet, known_hosts: Path, hosts: list[dict[str, str]]) -> Daemon:
    config = write_web_config(tmp_path, fleet, known_hosts, hosts, POLL)
    proc, url, log = start_web_run(config)
    daemon = Daemon(proc, url, config, log)
    names = [h["name"] for h in hosts]
    wait_for(
        lambda: all(h["taken_at"] for h in get_json(daemon.url + "api/v1/snapshot")["hosts"] if h["name"] in names),
        30,
        "every host polled once",
    )
    return daemon


def stop_daemon(daemon: Daemon) -> None:
    if daemon.proc.poll() is None:
        daemon.proc.send_signal(signal.SIGTERM)
    daemon.proc.wait(timeout=20)
    assert daemon.proc.returncode == 0, daemon.log.read_text()
    assert "Traceback" not in daemon.log.read_text()


@pytest.fixture
def xss_process(fleet: Fleet) -> Iterator[int]:
    """A real process of alice's whose whole command line is an XSS attempt (cat, waiting on its stdin)."""
    import pwd

    alice = pwd.getpwnam("alice")
    proc = subprocess.Popen(
        [XSS], executable="/bin/cat", stdin=subprocess.PIPE, user=alice.pw_uid, group=alice.pw_gid, extra_groups=[]
    )
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def hosts_of(fleet: Fleet) -> list[dict[str, str]]:
    return [{"name": f"h{i}", "address": address} for i, address in enumerate(fleet.addresses, start=2)]


@pytest.fixture
def browser_ok() -> None:
    reason = browser_unavailable_reason()
    if reason:
        pytest.skip(reason)


def shown_gpus(driver: Any) -> list[str]:
    """'host/GPU n' of every GPU row the page shows now."""
    return list(
        driver.execute_script(
            "return Array.from(document.querySelectorAll('section.host')).flatMap(s =>"
            " Array.from(s.querySelectorAll('.gpu .gid b')).map(b =>"
            " s.querySelector('.name').textContent + '/' + b.textContent))"
        )
    )


T = TypeVar("T")


def between_updates(read: Callable[[], T], timeout: float = 10.0) -> T:
    """``read()`` the page, again when the page's live update (each poll, it replaces what ``#fleet``
    holds, keeping open details open) made an element it found stale before it was used."""
    from selenium.common.exceptions import StaleElementReferenceException

    deadline = time.monotonic() + timeout
    while True:
        try:
            return read()
        except StaleElementReferenceException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_the_page_in_a_real_browser(
    fleet: Fleet, known_hosts: Path, tmp_path: Path, xss_process: int, browser_ok: None
) -> None:
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    first = fleet.addresses[0]
    # h2's alice runs the XSS process; verylongusername's real job stays as in the default scenario
    owners = {11327: xss_process, 11328: fleet.job_pids["verylongusername"]}
    scenario_healthy_multi_gpu(fleet.scenario_dir(first), GPUS_PER_HOST, owners_pids=owners)
    extra = "127.0.0.40"
    fleet.add_host(extra)
    fleet.write_known_hosts(known_hosts)
    hosts = [*hosts_of(fleet), {"name": "extra", "address": extra}]
    daemon = start_daemon(tmp_path, fleet, known_hosts, hosts)
    try:
        with chromium(1280, 900) as driver:
            driver.get(daemon.url)
            # every host, every GPU and every user
            gpus = shown_gpus(driver)
            assert len(gpus) == len(hosts) * GPUS_PER_HOST
            assert {g.split("/")[0] for g in gpus} == {h["name"] for h in hosts}
            text = driver.find_element(By.TAG_NAME, "body").text
            assert "alice" in text and "verylongusername" in text and "pid 11345 (owner unknown)" in text
            assert f"{len(hosts)} hosts" in text and f"{len(hosts) * GPUS_PER_HOST} GPUs" in text

            # the XSS command is text: no image, no alert, shown as written when expanded
            def expand_xss() -> str:
                if not driver.find_elements(By.CSS_SELECTOR, "details[data-key^='h2/0/'][open]"):
                    driver.find_element(By.CSS_SELECTOR, "details[data-key^='h2/0/'] summary[title*='<img']").click()
                return str(driver.find_element(By.CSS_SELECTOR, "details[data-key^='h2/0/'][open] code").text)

            assert between_updates(expand_xss) == XSS
            assert driver.find_elements(By.TAG_NAME, "img") == []
            with pytest.raises(NoAlertPresentException):
                driver.switch_to.alert
            full_page_screenshot(driver, tmp_path / "page-desktop.png")

            # the filter works without a reload and lives in the URL
            driver.execute_script("window.notReloaded = true")
            box = driver.find_element(By.ID, "q")
            box.send_keys("verylong")
            wait_for(lambda: "q=verylong" in driver.current_url, 10, "the filter in the URL")
            wait_for(lambda: len(shown_gpus(driver)) == len(hosts), 10, "only GPUs with verylongusername")
            assert all(g.endswith("GPU 0") for g in shown_gpus(driver))
            box.clear()
            driver.find_element(By.ID, "free").click()
            wait_for(lambda: "free=1" in driver.current_url and "q=" not in driver.current_url, 10, "free=1 only")
            free = len(hosts) * (GPUS_PER_HOST - 1)
            wait_for(lambda: len(shown_gpus(driver)) == free, 10, "only the free GPUs")
            assert len(driver.find_elements(By.CSS_SELECTOR, ".gpu.free")) == free
            assert driver.execute_script("return window.notReloaded") is True
            driver.refresh()  # survives a reload
            assert driver.find_element(By.ID, "free").is_selected()
            assert len(shown_gpus(driver)) == free
            driver.get(daemon.url + "?q=h3")
            assert driver.find_element(By.ID, "q").get_attribute("value") == "h3"
            assert {g.split("/")[0] for g in shown_gpus(driver)} == {"h3"}

            # a host going down shows as down within 2 polls, without a reload
            driver.get(daemon.url)
            driver.execute_script("window.notReloaded = true")
            assert driver.find_elements(By.CSS_SELECTOR, ".problems") == []
            fleet.remove_host(extra)
            gone = time.monotonic()

            def extra_down() -> bool:
                return between_updates(
                    lambda: any("extra" in p.text for p in driver.find_elements(By.CSS_SELECTOR, ".problems li"))
                )

            wait_for(extra_down, 30, "the page to show the removed host as down")
            took = time.monotonic() - gone
            assert driver.execute_script("return window.notReloaded") is True
            problem = between_updates(lambda: str(driver.find_element(By.CSS_SELECTOR, ".problems li").text))
            assert "unreachable" in problem.lower() and "since" in problem
            assert took <= 2 * POLL + 1.0 + 1.0, f"shown as down after {took:.1f}s"  # + a page refresh + slack
            full_page_screenshot(driver, tmp_path / "page-desktop-host-down.png")

        for dark in (False, True):
            with chromium(390, 844, dark=dark) as phone:
                phone.get(daemon.url)
                widths = phone.execute_script(
                    "return [document.documentElement.scrollWidth, document.documentElement.clientWidth]"
                )
                wide = phone.execute_script(
                    "return Array.from(document.querySelectorAll('body *')).filter(e =>"
                    " e.getBoundingClientRect().right > document.documentElement.clientWidth + 0.5)"
                    ".slice(0, 5).map(e => e.tagName + '.' + e.className + ': ' + e.textContent.slice(0, 60))"
                )
                assert widths[0] <= widths[1] == 390, f"horizontal scroll at 390 px: {widths}, too wide: {wide}"
                shot = full_page_screenshot(phone, tmp_path / f"page-390px-{'dark' if dark else 'light'}.png")
                assert shot.stat().st_size > 10_000
        with chromium(1280, 900, dark=True) as driver:
            driver.get(daemon.url)
            background = driver.execute_script("return getComputedStyle(document.body).backgroundColor")
            assert background == "rgb(20, 23, 28)"  # the dark palette
            full_page_screenshot(driver, tmp_path / "page-desktop-dark.png")
    finally:
        stop_daemon(daemon)
    assert (tmp_path / "page-desktop.png").stat().st_size > 10_000


# ---------------------------------------------------------------- Prometheus


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_prometheus_scrapes_the_daemon_and_agrees_with_status_json(
    fleet: Fleet, known_hosts: Path, tmp_path: Path
) -> None:
    promtool, prometheus = shutil.which("promtool"), shutil.which("prometheus")
    if not promtool or not prometheus:
        pytest.skip("promtool/prometheus not found (as root: apt-get install -y prometheus; scripts/test does it)")
    hosts = hosts_of(fleet)
    daemon = start_daemon(tmp_path, fleet, known_hosts, hosts)
    prom: subprocess.Popen[bytes] | None = None
    try:
        metrics = get(daemon.url + "metrics")
        check = subprocess.run([promtool, "check", "metrics"], input=metrics, capture_output=True, timeout=30)
        assert check.returncode == 0, (check.stdout + check.stderr).decode()
        free_samples = {
            sample.labels["gpu"]: sample.value
            for family in text_string_to_metric_families(metrics.decode())
            for sample in family.samples
            if sample.name == "gpuwatch_gpu_free" and sample.labels["host"] == "h2"
        }
        assert free_samples, metrics.decode()[:2000]

        target = urllib.parse.urlsplit(daemon.url).netloc
        port = _free_port()
        (tmp_path / "prometheus.yml").write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                    "scrape_configs": [{"job_name": "gpuwatch", "static_configs": [{"targets": [target]}]}],
                }
            )
        )
        with open(tmp_path / "prometheus.log", "wb") as log:
            prom = subprocess.Popen(
                [
                    prometheus,
                    f"--config.file={tmp_path / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=log,
                stderr=log,
                cwd=tmp_path,
            )
        api = f"http://127.0.0.1:{port}/api/v1/query?query="
        query = urllib.parse.quote('gpuwatch_gpu_memory_used_bytes{host="h2",gpu="0"}')
        result: list[Any] = []

        def answered() -> bool:
            if prom is not None and prom.poll() is not None:
                raise AssertionError((tmp_path / "prometheus.log").read_text())
            try:
                result[:] = get_json(api + query)["data"]["result"]
            except OSError:
                return False
            return bool(result)

        wait_for(answered, 60, "Prometheus to scrape the daemon")
        up = get_json(api + urllib.parse.quote('up{job="gpuwatch"}'))["data"]["result"]
        assert up[0]["value"][1] == "1"
    finally:
        if prom is not None:
            prom.terminate()
            prom.wait(timeout=30)
        stop_daemon(daemon)

    status = subprocess.run(
        [sys.executable, "-m", "gpuwatch", "status", "--json", "-c", str(daemon.config)],
        capture_output=True,
        timeout=60,
        env=os.environ.copy(),
    )
    doc = json.loads(status.stdout)
    h2 = next(h for h in doc["hosts"] if h["name"] == "h2")
    gpu0 = next(g for g in h2["gpus"] if g["index"] == 0)
    assert float(result[0]["value"][1]) == gpu0["memory_used_mib"] * 1024 * 1024
    assert result[0]["metric"]["uuid"] == gpu0["uuid"] and result[0]["metric"]["model"] == gpu0["name"]
    # gpuwatch_gpu_free says what the page and status call free
    assert {int(k): float(v) for k, v in free_samples.items()} == {g["index"]: float(g["free"]) for g in h2["gpus"]}
