"""The page's server under hostile clients (issue 20, E3), as the audit attacked it: the real
server (``WebServer``: waitress hardened by ``webserver.py``) in a process of its own with its own
``TMPDIR``, driven over loopback sockets.

- A request body is refused as soon as its header is read: a 1 GB POST gets its 413 at once and
  no byte of it reaches a temporary file (waitress spools bodies to unnamed files in ``TMPDIR``,
  so the server's open files are what is watched).
- 150 connections trickling a header byte every half second do not keep ``/healthz`` from
  answering within 2 s, and each is closed within the request deadline.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gpuwatch.webserver import REQUEST_DEADLINE_SECONDS
from imports import MODULES, under

SRC = Path(__file__).resolve().parent.parent / "src"
MIB = 1024 * 1024

SERVER = textwrap.dedent("""
    import logging, sys
    from gpuwatch.config.load import parse_config
    from gpuwatch.fleet import FleetState
    from gpuwatch.model import HostSnapshot
    from gpuwatch.web import WebApp, WebServer

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    config = parse_config({"hosts": ["gpu-a"], "state_dir": sys.argv[1], "web": {"listen": "127.0.0.1:0"}})
    state = FleetState([("gpu-a", "gpu-a")], poll_every=60)
    state.update(HostSnapshot("gpu-a", "gpu-a", ok=True, gpus=(), processes=()))
    server = WebServer(WebApp(state, lambda: config, config.web), "127.0.0.1", 0)
    server.start()
    print(server.port, flush=True)
    sys.stdin.readline()
    server.stop()
""")


@dataclass
class Server:
    proc: subprocess.Popen[str]
    port: int
    tmpdir: Path

    def spooled_bytes(self) -> int:
        """Bytes in files the server holds open under its TMPDIR (unnamed ones included)."""
        total = 0
        fds = Path(f"/proc/{self.proc.pid}/fd")
        for fd in fds.iterdir():
            try:
                target = os.readlink(fd)
                if target.startswith(str(self.tmpdir)):
                    total += os.stat(fd).st_size
            except OSError:
                continue  # closed meanwhile
        return total


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = {
        **os.environ,
        "TMPDIR": str(tmpdir),
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    log = open(tmp_path / "server.log", "w", encoding="utf-8")  # closed below
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(tmp_path / "state")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield Server(proc, port, tmpdir)
    finally:
        if proc.poll() is None:
            assert proc.stdin is not None
            proc.stdin.write("\n")
            proc.stdin.flush()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        assert list(tmpdir.iterdir()) == []


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def read_response(sock: socket.socket, limit: float) -> bytes:
    """What the server sent until it closed or ``limit`` seconds passed."""
    sock.settimeout(limit)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def healthz(port: int) -> tuple[float, bytes]:
    started = time.monotonic()
    with connect(port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = read_response(sock, 5.0)
    return time.monotonic() - started, answer


# ---------------------------------------------------------------- no request body


def test_a_1gb_post_is_refused_at_once_and_nothing_is_written(server: Server) -> None:
    with connect(server.port) as sock:
        sock.sendall(b"POST /api/v1/snapshot HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n")
        sock.settimeout(0.05)
        sent, answer, spooled = 0, b"", 0
        started = time.monotonic()
        block = b"x" * 65536
        while sent < 8 * MIB and time.monotonic() - started < 5:  # a few MB, a few seconds at most
            try:
                sent += sock.send(block)
            except (TimeoutError, BlockingIOError):
                pass  # the server stopped reading: its buffers are full
            except (BrokenPipeError, ConnectionResetError):
                break  # the server closed the connection
            spooled = max(spooled, server.spooled_bytes())
            try:
                answer += sock.recv(4096)
            except (TimeoutError, BlockingIOError):
                pass
            if answer:
                break
        answer += read_response(sock, 2.0)
        elapsed = time.monotonic() - started
    assert spooled == 0 and server.spooled_bytes() == 0, f"{spooled} bytes of the body spooled to TMPDIR"
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"takes no request body" in answer
    assert elapsed < 3
    assert sent < 16 * MIB  # the server did not read on


@pytest.mark.parametrize(
    "request_head",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 700000\r\nExpect: 100-continue\r\n\r\n",
    ],
    ids=["get-with-length", "chunked", "expect-continue"],
)
def test_any_request_body_is_refused_before_it_is_read(server: Server, request_head: bytes) -> None:
    with connect(server.port) as sock:
        sock.sendall(request_head + b"5\r\nhello\r\n" + b"y" * 600_000)
        answer = read_response(sock, 3.0)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"100 Continue" not in answer and server.spooled_bytes() == 0
    # and the server is still there for everyone else
    assert healthz(server.port)[1].startswith(b"HTTP/1.1 200 ")


def test_a_request_without_a_body_is_answered_as_before(server: Server) -> None:
    with connect(server.port) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        assert read_response(sock, 3.0).startswith(b"HTTP/1.1 405 ")
    with connect(server.port) as sock:
        sock.sendall(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert read_response(sock, 3.0).count(b"HTTP/1.1 200 ") == 2  # keep-alive and pipelining still work


# ---------------------------------------------------------------- slow clients


def test_150_trickling_connections_do_not_keep_healthz_from_answering(server: Server) -> None:
    head = b"GET / HTTP/1.1\r\nHost: x\r\nUser-Agent: " + b"s" * 200 + b"\r\n\r\n"
    socks: list[socket.socket] = []
    closed_after: list[float] = []
    stop = threading.Event()
    started = time.monotonic()
    for _ in range(150):
        sock = connect(server.port)
        sock.setblocking(False)
        socks.append(sock)

    def trickle() -> None:
        """Each connection sends its header's next byte every 0.5 s until the server closes it."""
        position = 0
        alive = list(socks)
        while alive and not stop.is_set() and position < len(head):
            for sock in list(alive):
                try:
                    sock.send(head[position : position + 1])
                    if sock.recv(1) == b"":
                        raise ConnectionResetError
                except BlockingIOError:
                    continue  # open, nothing to read
                except OSError:
                    alive.remove(sock)
                    closed_after.append(time.monotonic() - started)
            position += 1
            stop.wait(0.5)

    attacker = threading.Thread(target=trickle)
    attacker.start()
    try:
        time.sleep(1.0)  # every connection has begun its request
        times = []
        for _ in range(4):
            elapsed, answer = healthz(server.port)
            assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
            times.append(elapsed)
            time.sleep(1.0)
        assert max(times) < 2.0, times
        # Every trickling connection is closed within the deadline (plus the server's 1 s check),
        # however faithfully it trickles.
        deadline = time.monotonic() + REQUEST_DEADLINE_SECONDS + 6
        while len(closed_after) < 150 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(closed_after) == 150
        assert max(closed_after) < REQUEST_DEADLINE_SECONDS + 4
    finally:
        stop.set()
        attacker.join(10)
        for sock in socks:
            sock.close()
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("module", ["gpuwatch.webserver", "gpuwatch.webauth"])
def test_the_server_and_the_login_guard_read_never_act(module: str) -> None:
    """As test_layers.py asks of web.py: they never poll, connect or send."""
    forbidden = ("gpuwatch.ssh", "gpuwatch.poll", "gpuwatch.notify", "gpuwatch.daemon", "paramiko", "requests")
    assert module in MODULES
    assert not sorted(i for i in MODULES[module] if under(i, forbidden))
