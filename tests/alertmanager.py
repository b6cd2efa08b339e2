"""A real Prometheus Alertmanager on loopback for tests, and the webhook receiver behind it.

:class:`Alertmanager` starts Debian's ``prometheus-alertmanager`` (``ALERTMANAGER`` below; tests
skip, saying so, without it) on 127.0.0.1 with a temp config (one route to :class:`Receiver`,
``group_wait``/``group_interval`` of 1 s, a long ``repeat_interval``), its own ``--storage.path``
and clustering off (``--cluster.listen-address=``). It is stopped, and its log kept in the temp
directory, at the end of the ``with``.

:class:`Receiver` is a small real HTTP server that records each notification Alertmanager sends
(its webhook JSON: ``status``, ``alerts`` with their ``labels``, ``startsAt``, ``endsAt``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

ALERTMANAGER = "prometheus-alertmanager"  # Debian's name for the binary (upstream: alertmanager)


def alertmanager_path() -> str | None:
    return shutil.which(ALERTMANAGER) or shutil.which("alertmanager")


def missing_reason() -> str:
    return (
        "prometheus-alertmanager not found (as root: apt-get install -y prometheus-alertmanager; scripts/test does it)"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class Receiver:
    """Alertmanager's webhook receiver: records every notification (``notifications``), and each
    request's path and headers (``requests``). It answers ``status`` (200), so it can also stand in
    for an Alertmanager that refuses."""

    def __init__(self) -> None:
        self.notifications: list[Any] = []
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.status = 200
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                with receiver._lock:
                    receiver.notifications.append(body)
                    receiver.requests.append((self.path, dict(self.headers.items())))
                    status = receiver.status
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def seen(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.notifications)

    def alerts(self, status: str) -> list[dict[str, Any]]:
        """Every alert of every notification with this ``status`` (firing or resolved), in order."""
        return [a for n in self.seen() if n.get("status") == status for a in n["alerts"]]


class Alertmanager:
    """A real Alertmanager routing every alert to ``receiver`` (see the module docstring)."""

    def __init__(self, directory: Path, receiver: Receiver, *, group_by: tuple[str, ...] = ("alertname", "host")):
        path = alertmanager_path()
        if path is None:
            raise RuntimeError(missing_reason())
        self.path = path
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "route": {
                "receiver": "hook",
                "group_by": list(group_by),
                "group_wait": "1s",
                "group_interval": "1s",
                "repeat_interval": "1h",
            },
            "receivers": [{"name": "hook", "webhook_configs": [{"url": receiver.url, "send_resolved": True}]}],
        }
        (directory / "alertmanager.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
        self.log_path = directory / "alertmanager.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Alertmanager:
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                [
                    self.path,
                    f"--config.file={self.directory / 'alertmanager.yml'}",
                    f"--storage.path={self.directory / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--cluster.listen-address=",
                    "--log.level=debug",
                ],
                stdout=log,
                stderr=log,
                cwd=self.directory,
                env={**os.environ, "HOME": str(self.directory)},
            )
        self._wait_ready()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"alertmanager exited:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"alertmanager not ready within {timeout:g}s:\n{self.log()}")

    def api(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"{self.url}/api/v2/{path}", data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            text = answer.read()
        return json.loads(text) if text else None

    def alerts(self, active_only: bool = False) -> list[dict[str, Any]]:
        """The alerts Alertmanager holds now (``GET /api/v2/alerts``)."""
        found: list[dict[str, Any]] = self.api("GET", "alerts")
        return [a for a in found if a["status"]["state"] == "active"] if active_only else found

    def silence(self, matchers: dict[str, str], *, seconds: float = 3600, comment: str = "maintenance") -> str:
        """Create a silence of every alert with these label values; its id."""
        now = time.time()
        body = {
            "matchers": [{"name": k, "value": v, "isRegex": False, "isEqual": True} for k, v in matchers.items()],
            "startsAt": _iso(now - 1),
            "endsAt": _iso(now + seconds),
            "createdBy": "gpuwatch tests",
            "comment": comment,
        }
        answer: dict[str, str] = self.api("POST", "silences", body)
        return answer["silenceID"]


def _iso(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def settle(condition: Callable[[], bool], seconds: float) -> bool:
    """Whether ``condition`` holds at any time within ``seconds`` (to show that something did NOT happen)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()
