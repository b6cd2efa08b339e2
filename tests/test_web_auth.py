"""Failed logins to the page (issue 20): counted per peer, slowed without a worker thread sleeping,
and logged a line a minute per peer at most, never with what the client sent."""

from __future__ import annotations

import base64
import io
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from builders import Clock, config, fleet
from gpuwatch.web import WebApp
from gpuwatch.webauth import FREE_FAILURES, MAX_WAIT_SECONDS, LoginGuard, peer_of, wait_after

PASSWORD = "s3cret-pass"


class Monotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[WebApp, Monotonic]:
    monkeypatch.setenv("GPUWATCH_WEB_PASSWORD", PASSWORD)
    cfg = config(tmp_path, auth={"user": "lab", "password_env": "GPUWATCH_WEB_PASSWORD"})
    clock = Monotonic()
    return WebApp(fleet(Clock()), lambda: cfg, cfg.web, clock=clock), clock


def call_from(app: WebApp, path: str, peer: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    """One request as from ``peer`` (the socket's address: waitress's ``REMOTE_ADDR``)."""
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": "", "wsgi.input": io.BytesIO()}
    environ.update({"HTTP_" + k.upper(): v for k, v in headers.items()}, REMOTE_ADDR=peer)
    seen: dict[str, Any] = {}

    def start_response(status: str, header_list: list[tuple[str, str]]) -> None:
        seen["status"], seen["headers"] = status, dict(header_list)

    body = b"".join(app(environ, start_response))
    return int(seen["status"].split()[0]), seen["headers"], body


def attempt(app: WebApp, password: str, peer: str = "203.0.113.7") -> tuple[int, dict[str, str], bytes]:
    return call_from(app, "/api/v1/snapshot", peer, Authorization=basic("lab", password))


def test_guessing_is_slowed_per_peer_and_the_right_password_waits_its_turn(
    app: tuple[WebApp, Monotonic], caplog: pytest.LogCaptureFixture
) -> None:
    web, clock = app
    caplog.set_level(logging.WARNING, logger="gpuwatch.webauth")
    for _ in range(FREE_FAILURES):  # typos cost nothing
        assert attempt(web, "wrong")[0] == 401
    assert attempt(web, PASSWORD)[0] == 200
    assert attempt(web, "wrong")[0] == 401  # one failure past the free ones: now it must wait
    status, headers, body = attempt(web, PASSWORD)
    assert status == 429 and headers["Retry-After"] == "1" and b"too many failed logins" in body
    assert PASSWORD.encode() not in body
    assert attempt(web, PASSWORD, peer="198.51.100.2")[0] == 200  # another peer is not held up
    assert call_from(web, "/healthz", "203.0.113.7")[0] == 200  # nor is /healthz
    assert call_from(web, "/", "203.0.113.7")[0] == 401  # a first request without credentials
    clock.now += wait_after(FREE_FAILURES + 1)
    assert attempt(web, PASSWORD)[0] == 200  # its turn: looked at, and right


def test_a_guesser_gets_a_try_every_few_seconds_not_thousands_and_the_log_a_line_a_minute(
    app: tuple[WebApp, Monotonic], caplog: pytest.LogCaptureFixture
) -> None:
    web, clock = app
    caplog.set_level(logging.WARNING, logger="gpuwatch.webauth")
    looked_at = refused = 0
    started = time.monotonic()
    for i in range(12_000):  # the audit's 2,400 guesses a second, for 5 minutes of the clock
        status = attempt(web, f"guess-{i}")[0]
        looked_at += status == 401
        refused += status == 429
        clock.now += 1 / 2400 * 60  # 40 guesses a second of the test clock: 5 minutes in all
    assert time.monotonic() - started < 20  # no request waited in its thread
    assert refused > 11_000
    # 10 free, then 0.5 + 1 + 2 + 4 + 8 s, then one every 10 s: about 38 in 5 minutes
    assert FREE_FAILURES + 5 <= looked_at <= FREE_FAILURES + 5 + 300 / MAX_WAIT_SECONDS + 1
    lines = [r.getMessage() for r in caplog.records]
    assert 5 <= len(lines) <= 7, lines  # one at the first failure, then one a minute
    assert lines[0] == "web: from 203.0.113.7: 1 failed login(s) (wrong user name or password)"
    assert "tries refused unread while it had to wait" in lines[-1] and "it now waits 10 s between tries" in lines[-1]
    assert not any("guess" in line or PASSWORD in line for line in lines)  # what was sent is never logged
    assert attempt(web, PASSWORD, peer="2001:db8::1")[0] == 200


def test_many_peers_at_once_log_at_most_ten_lines_a_minute() -> None:
    clock = Monotonic()
    guard = LoginGuard(clock)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("gpuwatch.webauth")
    logger.addHandler(handler)
    try:
        for n in range(500):
            guard.failed(f"10.0.{n // 250}.{n % 250}")
        assert len(records) == 10
        clock.now += 61
        guard.failed("10.0.0.1")  # its second failure, logged with the count kept meanwhile
        assert records[-1].getMessage().startswith("web: from 10.0.0.1: 1 failed login(s)")
    finally:
        logger.removeHandler(handler)


def test_a_peer_is_its_address_or_its_ipv6_64() -> None:
    assert peer_of("203.0.113.7") == "203.0.113.7"
    assert peer_of("2001:db8:1:2:aaaa::1") == peer_of("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert peer_of("::ffff:203.0.113.7") == "203.0.113.7"
    assert [wait_after(FREE_FAILURES + n) for n in range(7)] == [0, 0.5, 1, 2, 4, 8, MAX_WAIT_SECONDS]
    assert wait_after(10**9) == MAX_WAIT_SECONDS


def test_parallel_connections_guess_no_faster_than_one() -> None:
    clock = Monotonic()
    guard = LoginGuard(clock)
    peer = "203.0.113.7"
    assert [guard.admit(peer) for _ in range(4)] == [0, 0, 0, 0]  # no failure yet: all looked at at once
    for _ in range(4):
        guard.settle(peer, ok=False)
    for _ in range(FREE_FAILURES - 4):
        assert guard.admit(peer) == 0
        guard.settle(peer, ok=False)
    clock.now += 1
    assert guard.admit(peer) == 0  # past the free failures: one try at a time ...
    assert guard.admit(peer) > 0 and guard.admit(peer) > 0  # ... the others wait for its verdict
    guard.settle(peer, ok=False)
    assert guard.admit(peer) == wait_after(FREE_FAILURES + 1)  # and then for the wait it earned
    clock.now += wait_after(FREE_FAILURES + 1)
    assert guard.admit(peer) == 0
    guard.settle(peer, ok=True)
    assert guard.admit(peer) == 0  # a right password sets no wait
