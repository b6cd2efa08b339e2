"""HTTP Basic for the page: the check, and failed logins counted, slowed and logged per peer.

A peer is the address the connection came from (an IPv6 address's /64, which one machine holds
whole). After :data:`FREE_FAILURES` failed logins a peer waits before its next try, twice as long
after each further failure (:data:`FIRST_WAIT_SECONDS` up to :data:`MAX_WAIT_SECONDS`); a try made
while it must wait, or while another try of its is being looked at, is answered 429 without its
credentials being looked at, so guessing gets no faster by asking more often or over more
connections, and no worker thread sleeps for anyone. A peer's failures are forgotten
:data:`FORGET_SECONDS` after its last one. Behind a reverse proxy every browser is the proxy's
address: a guesser there makes everyone behind it wait alike, right passwords too.

Failed logins are logged at most once a minute per peer, with the count since its last line, and
at most :data:`LOG_LINES_PER_MINUTE` such lines a minute in all; what a client sent as user name
or password is never logged.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

FREE_FAILURES = 10  # typos, a stale saved password: no wait before the next try
FIRST_WAIT_SECONDS = 0.5
MAX_WAIT_SECONDS = 10.0
FORGET_SECONDS = 600.0
MAX_PEERS = 10_000  # peers remembered at once; the longest quiet one is forgotten first
LOG_EVERY_SECONDS = 60.0
LOG_LINES_PER_MINUTE = 10


def basic_credentials_match(header: str, user: str, password: str) -> bool:
    """Whether an ``Authorization`` header carries ``user`` and ``password``. Both are compared,
    always, in constant time: the answer's timing says nothing about either."""
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        given_user, _, given_password = base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    user_ok = hmac.compare_digest(given_user.encode(), user.encode())
    password_ok = hmac.compare_digest(given_password.encode(), password.encode())
    return user_ok and password_ok


def peer_of(address: str) -> str:
    """The key a client's failures count under: its IPv4 address, or its IPv6 address's /64."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address[:64] or "unknown"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass
class _Peer:
    failures: int = 0  # since the last quiet FORGET_SECONDS
    last_failure: float = 0.0
    unlogged_failures: int = 0
    unlogged_refusals: int = 0  # tries answered 429 while it had to wait
    logged_at: float | None = None
    in_flight: int = 0  # tries being looked at now


def wait_after(failures: int) -> float:
    """Seconds a peer waits after its ``failures``-th failed login before it may try again."""
    if failures <= FREE_FAILURES:
        return 0.0
    doublings = min(failures - FREE_FAILURES - 1, 30)  # past the cap already; and no float overflow
    return min(MAX_WAIT_SECONDS, FIRST_WAIT_SECONDS * 2.0**doublings)


class LoginGuard:
    """Failed logins per peer: how long each must wait, and the log lines about them. One lock
    guards it (waitress's worker threads share it); ``clock`` is monotonic seconds."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._peers: OrderedDict[str, _Peer] = OrderedDict()
        self._lines: deque[float] = deque()  # when the recent log lines were written
        self._lock = threading.Lock()

    def admit(self, peer: str) -> float:
        """0 when ``peer``'s credentials may be looked at now (then call :meth:`settle`); else the
        seconds it must still wait, and the try is counted as refused. While a peer past its free
        failures has a try being looked at, its other tries wait too: parallel connections guess
        no faster than one."""
        with self._lock:
            state = self._peers.get(peer)
            if state is None:
                return 0.0
            wait = state.last_failure + wait_after(state.failures) - self.clock()
            if wait <= 0 and state.in_flight and state.failures >= FREE_FAILURES:
                wait = FIRST_WAIT_SECONDS
            if wait > 0:
                state.unlogged_refusals += 1
                self._maybe_log(peer, state)
                return wait
            state.in_flight += 1
            return 0.0

    def settle(self, peer: str, ok: bool) -> None:
        """The try :meth:`admit` let through was right (``ok``) or wrong (counted as a failure)."""
        with self._lock:
            state = self._peers.get(peer)
            if state is not None and state.in_flight:
                state.in_flight -= 1
        if not ok:
            self.failed(peer)

    def failed(self, peer: str) -> float:
        """``peer`` sent wrong credentials: count it; returns the wait now due."""
        now = self.clock()
        with self._lock:
            state = self._peers.pop(peer, None) or _Peer()
            if state.failures and now - state.last_failure > FORGET_SECONDS:
                state.failures = 0
            state.failures += 1
            state.last_failure = now
            state.unlogged_failures += 1
            self._peers[peer] = state  # the most recent last
            while len(self._peers) > MAX_PEERS:
                self._peers.popitem(last=False)
            self._maybe_log(peer, state)
            return wait_after(state.failures)

    def _maybe_log(self, peer: str, state: _Peer) -> None:
        now = self.clock()
        if state.logged_at is not None and now - state.logged_at < LOG_EVERY_SECONDS:
            return
        while self._lines and now - self._lines[0] >= 60.0:
            self._lines.popleft()
        if len(self._lines) >= LOG_LINES_PER_MINUTE:
            return  # many peers at once: each one's count waits for its next line
        self._lines.append(now)
        what = []
        if state.unlogged_failures:
            what.append(f"{state.unlogged_failures} failed login(s) (wrong user name or password)")
        if state.unlogged_refusals:
            what.append(f"{state.unlogged_refusals} tries refused unread while it had to wait")
        wait = wait_after(state.failures)
        then = f"; it now waits {wait:g} s between tries" if wait else ""
        log.warning("web: from %s: %s%s", peer, ", ".join(what), then)
        state.unlogged_failures = state.unlogged_refusals = 0
        state.logged_at = now
