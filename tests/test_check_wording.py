"""``check`` says what it does: it creates no state directory, says the channels were built but
not tried (``test-notify`` tries them), a wrong ``nvidia_smi`` path is "no such file", and a
page-only daemon announces no report it has no channel for."""

from __future__ import annotations

import io
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpuwatch.cli import main


def write_config(tmp_path: Path, **extra: Any) -> Path:
    doc: dict[str, Any] = {
        "hosts": ["localhost"],
        "ssh": {"use_ssh_config": False, "known_hosts": str(tmp_path / "known_hosts")},
        "state_dir": str(tmp_path / "state"),
        **extra,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    path.chmod(0o600)
    return path


def test_check_creates_no_state_directory_and_says_the_channel_was_not_tried(
    local_standin: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPUWATCH_TEST_SLACK", "https://hooks.slack.com/services/T000/B000/wrongtoken")
    config = write_config(tmp_path, slack={"url_env": "GPUWATCH_TEST_SLACK"})
    out = io.StringIO()
    assert main(["check", "-c", str(config)], out=out) == 0
    text = out.getvalue()
    assert text.splitlines()[-1].startswith("ready: ")
    assert "slack: OK: " in text
    assert "  note: not tried: a wrong token or address shows only when sending; 'gpuwatch test-notify'" in text
    assert not (tmp_path / "state").exists()  # no directory, no log, no database


def test_a_wrong_nvidia_smi_path_is_no_such_file(local_standin: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, hosts=[{"name": "localhost", "nvidia_smi": "/opt/nowhere/nvidia-smi"}])
    out = io.StringIO()
    assert main(["status", "-c", str(config)], out=out) == 1
    text = out.getvalue()
    assert "no such file: /opt/nowhere/nvidia-smi" in text and "check the nvidia_smi setting" in text
    assert "not on the PATH" not in text


def test_a_page_only_daemon_announces_no_report(local_standin: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, web={"listen": "127.0.0.1:0"})  # no channel; the default daily overview
    log = tmp_path / "stderr"
    with log.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "gpuwatch", "run", "-c", str(config)], stderr=err)
    try:
        deadline = time.monotonic() + 30
        while "web page at" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    text = log.read_text()
    assert re.search(r"gpuwatch running: 1 host, poll every \S+, reports: none", text), text
    assert "no channel configured: the reports in schedule.reports (overview" in text
    assert proc.returncode == 0 and "Traceback" not in text
