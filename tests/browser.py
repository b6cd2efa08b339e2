"""A real headless browser for the page tests: Debian's chromium driven by chromedriver through selenium.

:func:`browser_unavailable_reason` says why a browser cannot run here (tests then skip, saying so);
:func:`chromium` starts one with a fresh profile and the flags that keep it off the network (this
machine has none but loopback: without them Chromium tries Google's hosts at every start).
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--disable-dev-shm-usage",
)


def browser_unavailable_reason() -> str | None:
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install -e '.[test]')"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not Path(path).exists() and not shutil.which(Path(path).name):
            return f"{path} not found (as root: apt-get install -y {package}; scripts/test does it)"
    return None


def _executable(path: str) -> str:
    return path if Path(path).exists() else str(shutil.which(Path(path).name))


@contextlib.contextmanager
def chromium(width: int = 1280, height: int = 900, dark: bool = False) -> Iterator[Any]:
    """A selenium WebDriver for a fresh headless Chromium with a window of ``width`` x ``height`` CSS px."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    with tempfile.TemporaryDirectory(prefix="gpuwatch-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = _executable(CHROMIUM)
        for flag in FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={profile}")
        options.add_argument(f"--window-size={width},{height}")
        driver = webdriver.Chrome(service=Service(executable_path=_executable(CHROMEDRIVER)), options=options)
        try:
            driver.set_page_load_timeout(30)
            # The window size includes no browser chrome in headless mode, but set the viewport exactly.
            driver.execute_cdp_cmd(
                "Emulation.setDeviceMetricsOverride",
                {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 500},
            )
            if dark:
                driver.execute_cdp_cmd(
                    "Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark"}]}
                )
            yield driver
        finally:
            driver.quit()


def full_page_screenshot(driver: Any, path: Path) -> Path:
    """The whole page (not just the viewport) as a PNG."""
    import base64

    width, viewport = driver.execute_script("return [window.innerWidth, window.innerHeight]")
    height = driver.execute_script("return document.documentElement.scrollHeight")

    def metrics(h: int) -> None:
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": h, "deviceScaleFactor": 1, "mobile": width < 500},
        )

    metrics(height)
    try:
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png"})
    finally:
        metrics(viewport)
    path.write_bytes(base64.b64decode(shot["data"]))
    return path
