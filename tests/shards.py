"""Shard daemons and a real Prometheus for the end-to-end tests of shards, the whole-site page and
the Grafana dashboard: each daemon is ``python -m gpuwatch run --shard K/N`` over the loopback sshd
fleet (tests/fleet.py) with a page on a free port and a state directory of its own (on one machine
two shards cannot share one: each holds its lock); Prometheus is Debian's ``/usr/bin/prometheus``.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import socket
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from processes import start_web_run
from waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DASHBOARD = ROOT / "deploy" / "grafana" / "gpuwatch.json"


@dataclass
class ShardDaemon:
    proc: subprocess.Popen[bytes]
    url: str  # the page's base URL, ending in /
    config: Path
    log: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str, timeout: float = 10) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return bytes(response.read())


def get_json(url: str) -> Any:
    return json.loads(get(url))


def write_shard_config(directory: Path, doc: dict[str, Any], port: int = 0) -> Path:
    """The shared config ``doc`` with this shard's own state directory and page port."""
    directory.mkdir(parents=True, exist_ok=True)
    web = {**doc.get("web", {}), "listen": f"127.0.0.1:{port}"}
    own = {**doc, "state_dir": str(directory / "state"), "web": web}
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(own), encoding="utf-8")
    path.chmod(0o600)
    return path


def start_shard(config: Path, shard: str) -> ShardDaemon:
    """``gpuwatch run --shard K/N``, once its page answers."""
    proc, url, log = start_web_run(config, "--shard", shard, who=f"shard {shard}")
    return ShardDaemon(proc, url, config, log)


def stop_shard(daemon: ShardDaemon) -> None:
    if daemon.proc.poll() is None:
        daemon.proc.send_signal(signal.SIGTERM)
    daemon.proc.wait(timeout=20)
    assert daemon.proc.returncode == 0, daemon.log.read_text()
    assert "Traceback" not in daemon.log.read_text()


def readme_scrape_configs() -> list[str]:
    """The Prometheus configs of the README's shard section, as written there."""
    start = README.read_text(encoding="utf-8").index("## Shards: one fleet, several daemons")
    text = README.read_text(encoding="utf-8")[start:]
    text = text[: text.index("\n## ", 1)]
    return [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "scrape_configs" in b]


def dashboard_expressions() -> list[str]:
    """Every PromQL expression of the Grafana dashboard (each panel's targets)."""
    doc = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = []
    for panel in doc["panels"]:
        for target in panel.get("targets", []):
            exprs.append(target["expr"])
    return list(dict.fromkeys(exprs))


@contextlib.contextmanager
def prometheus(directory: Path, config: dict[str, Any]) -> Iterator[str]:
    """Debian's Prometheus running ``config`` (scraping every second); yields its base URL."""
    binary = shutil.which("prometheus")
    assert binary is not None
    directory.mkdir(parents=True, exist_ok=True)
    config = {**config, "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}}
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    port = free_port()
    log_path = directory / "prometheus.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={directory / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=log,
            cwd=directory,
        )
    base = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(log_path.read_text())
            try:
                return get(base + "/-/ready", timeout=2) is not None
            except OSError:
                return False

        wait_for(ready, 60, "Prometheus to start")
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def query(base: str, expr: str) -> list[dict[str, Any]]:
    """The result of an instant query (``status`` must be success)."""
    doc = get_json(f"{base}/api/v1/query?query={urllib.parse.quote(expr)}")
    assert doc["status"] == "success", doc
    return list(doc["data"]["result"])
