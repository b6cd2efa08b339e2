"""A small real HTTP server on 127.0.0.1 that answers like Consul's catalog API, for tests.

``GET /v1/catalog/service/<service>[?tag=T][&index=N&wait=Ws]`` answers the service's instances as
Consul does (a JSON list of ``{"Node", "Address", "ServiceAddress", "ServiceTags", "ServicePort"}``)
with an ``X-Consul-Index`` header. A request whose ``index`` equals the current index is a blocking
query: it is held until the catalog changes (:meth:`FakeConsul.set_nodes` raises the index) or its
``wait`` passes, as Consul does. ``token``: the ``X-Consul-Token`` every request must carry (else
403 "ACL not found"). ``garbage``: the next answers are 200 with a body that is not JSON; ``down``:
the next requests are answered 500. Every request is recorded (path, query, whether the token came).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

MAX_WAIT = 600.0


@dataclass(frozen=True)
class Request:
    path: str
    query: dict[str, str]
    had_token: bool
    answered_after: float  # seconds the server held it


@dataclass(frozen=True)
class Node:
    name: str
    address: str
    tags: tuple[str, ...] = ()
    service_address: str = ""


class FakeConsul:
    def __init__(self, service: str = "gpu", token: str | None = None) -> None:
        self.service = service
        self.token = token
        self.index = 7
        self.nodes: list[Node] = []
        self.garbage = False
        self.down = False
        self.requests: list[Request] = []  # answered
        self.arrived: list[dict[str, str]] = []  # every request's query as it arrived (a held one too)
        self._changed = threading.Condition()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeConsul:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        with self._changed:
            self.index += 1
            self._changed.notify_all()
        self._server.shutdown()
        self._server.server_close()

    def set_nodes(self, nodes: Sequence[Node]) -> None:
        """A catalog change: the index grows and every blocking query held is answered."""
        with self._changed:
            self.nodes = list(nodes)
            self.index += 1
            self._changed.notify_all()

    def held(self) -> bool:
        """Whether a blocking query has arrived (it may still be held)."""
        return any("index" in query for query in self.arrived)

    def blocking_requests(self) -> list[Request]:
        return [r for r in self.requests if "index" in r.query]

    def _answer(self, service: str, query: dict[str, str]) -> tuple[int, bytes]:
        wanted_tag = query.get("tag")
        if self.down:
            return 500, b"rpc error: No cluster leader"
        if self.garbage:
            return 200, b"<html>502 Bad Gateway from the proxy</html>"
        nodes = [n for n in self.nodes if service == self.service and (wanted_tag is None or wanted_tag in n.tags)]
        body = [
            {
                "Node": n.name,
                "Address": n.address,
                "ServiceAddress": n.service_address,
                "ServiceTags": list(n.tags),
                "ServicePort": 22,
            }
            for n in nodes
        ]
        return 200, json.dumps(body).encode()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                started = time.monotonic()
                parts = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(parts.query).items()}
                fake.arrived.append(query)
                match = re.fullmatch(r"/v1/catalog/service/([^/]+)", parts.path)
                had_token = fake.token is not None and self.headers.get("X-Consul-Token") == fake.token
                if match is None:
                    self._send(404, b"not found", None)
                    return
                if fake.token is not None and not had_token:
                    fake.requests.append(Request(parts.path, query, False, 0.0))
                    self._send(403, b"ACL not found", None)
                    return
                if "index" in query:
                    wait = min(MAX_WAIT, float(query.get("wait", "300s").rstrip("s") or 300))
                    deadline = started + wait
                    with fake._changed:
                        while fake.index == int(query["index"]) and time.monotonic() < deadline:
                            fake._changed.wait(max(0.0, deadline - time.monotonic()))
                with fake._changed:
                    status, body = fake._answer(match[1], query)
                    index = fake.index
                fake.requests.append(Request(parts.path, query, had_token, time.monotonic() - started))
                self._send(status, body, index)

            def _send(self, status: int, body: bytes, index: int | None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if index is not None:
                    self.send_header("X-Consul-Index", str(index))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:
                    pass

        return Handler
