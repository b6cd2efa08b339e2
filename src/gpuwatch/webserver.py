"""The page's HTTP server: waitress, hardened against clients that never finish a request.

The app answers GET and HEAD only, so no request has a body worth reading. waitress as shipped
spools a request's body to a temporary file before the app sees it (a 1 GB POST writes 1 GB),
keeps a connection whose header arrives a byte at a time open for as long as each byte comes
within ``channel_timeout``, and stops accepting at ``connection_limit``: 100 trickling clients
shut everyone else out. Here:

* a request with a body (``Content-Length`` above 0, or ``Transfer-Encoding``) is answered
  ``413`` as soon as its header is read, and the connection closed; no byte of the body is
  stored (:class:`BodylessParser`);
* a request must arrive whole within :data:`REQUEST_DEADLINE_SECONDS` of its first byte,
  however it trickles (:class:`GuardedChannel`, checked by :meth:`GuardedServer.maintenance`);
  a connection that sends nothing is closed after ``channel_timeout`` as before;
* at the connection limit a new connection is still accepted, and the connection that has
  waited longest without a request being served gives way to it: a slow or stuck client can
  delay no one (:meth:`GuardedServer.handle_accept`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import TcpWSGIServer
from waitress.utilities import Error

log = logging.getLogger(__name__)

REQUEST_DEADLINE_SECONDS = 5.0  # from a request's first byte to its last header line
IDLE_SECONDS = 30  # a connection with no request in flight is closed after this (waitress's channel_timeout)
CONNECTION_LIMIT = 100  # open connections; past it the longest-waiting idle or incomplete one is closed
LOG_EVERY_SECONDS = 60.0  # dropped connections are summed up in one line at most this often


class BodyRefused(Error):
    code = 413
    reason = "Content Too Large"

    def to_response(self, ident: str | None = None) -> Any:  # waitress writes the body as bytes (its stub says str)
        status = f"{self.code} {self.reason}"
        headers = [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("X-Content-Type-Options", "nosniff"),
            ("Cache-Control", "no-store"),
        ]
        return status, headers, f"{self.body}\n".encode()


class BodylessParser(HTTPRequestParser):
    """waitress's request parser, refusing any body once the header is read: nothing of the body
    reaches a buffer, a temporary file or the app."""

    def received(self, data: bytes) -> int:
        consumed: int = super().received(data)
        if self.headers_finished and self.body_rcv is not None:
            self.body_rcv.getbuf().close()  # created empty by the header's parse: nothing was written
            self.body_rcv = None
            self.error = BodyRefused("this server takes no request body: it answers GET and HEAD only")
            self.completed = True
            self.expect_continue = False  # never invite the body with "100 Continue"
            self.connection_close = True
            return len(data)  # the rest of what arrived is body: dropped, not parsed as a request
        return consumed


class GuardedChannel(HTTPChannel):
    """One connection: notes when its current request began, so a trickle cannot hold it open."""

    parser_class = BodylessParser

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.opened = time.monotonic()
        self.request_started: float | None = None  # first byte of the request being read

    def received(self, data: bytes) -> bool:
        before = self.request
        started = time.monotonic()
        result: bool = super().received(data)
        if self.request is None:
            self.request_started = None  # every request that arrived is whole
        elif self.request is not before or self.request_started is None:
            self.request_started = started
        return result

    def waiting_since(self) -> float | None:
        """Since when this connection holds a place without a request being served (None: one is
        being served or queued, or it is already closing)."""
        if self.requests or self.will_close or self.close_when_flushed:
            return None
        return self.request_started if self.request_started is not None else self.opened


class GuardedServer(TcpWSGIServer):
    """waitress's TCP server with a deadline per request and a connection limit that gives way."""

    channel_class = GuardedChannel
    deadline_seconds = REQUEST_DEADLINE_SECONDS
    clock: Callable[[], float] = staticmethod(time.monotonic)
    dropped = 0  # connections closed for the deadline or the limit since the last log line
    logged_at = -LOG_EVERY_SECONDS

    def readable(self) -> bool:
        # As waitress's, but never stops accepting at the limit: handle_accept makes room instead.
        now = time.time()
        if now >= self.next_channel_cleanup:
            self.next_channel_cleanup = now + self.adj.cleanup_interval  # type: ignore[assignment]
            self.maintenance(now)
        return bool(self.accepting)

    def maintenance(self, now: float) -> None:
        super().maintenance(int(now))  # connections idle past channel_timeout
        cutoff = self.clock() - self.deadline_seconds
        for channel in self._channels():
            started = channel.request_started
            if started is not None and started < cutoff and not channel.requests and not channel.will_close:
                channel.will_close = True  # the loop closes it
                self._dropped(f"a request not complete within {self.deadline_seconds:g} s of its first byte")

    def handle_accept(self) -> None:
        super().handle_accept()
        open_channels = [c for c in self._channels() if not c.will_close]
        if len(open_channels) <= self.adj.connection_limit:
            return
        waiting = [(since, c) for c in open_channels if (since := c.waiting_since()) is not None]
        if not waiting:
            return
        _, oldest = min(waiting, key=lambda pair: pair[0])
        oldest.will_close = True  # the newest one when every other has a request in service
        self._dropped(f"the connection limit of {self.adj.connection_limit} (it waited longest)")

    def _channels(self) -> list[GuardedChannel]:
        channels: dict[int, GuardedChannel] = self.active_channels  # type: ignore[assignment]  # the stub says one
        return list(channels.values())

    def _dropped(self, why: str) -> None:
        self.dropped += 1
        now = self.clock()
        if now - self.logged_at >= LOG_EVERY_SECONDS:
            log.warning(
                "web: closed %d connection(s) since the last such line, the latest for %s (a slow or stuck client?)",
                self.dropped,
                why,
            )
            self.dropped = 0
            self.logged_at = now


def guarded_server(app: Callable[..., Any], host: str, port: int, threads: int) -> GuardedServer:
    """A bound (not yet running) :class:`GuardedServer` for ``app`` on ``host:port``."""
    adjustments = Adjustments(
        host=host,
        port=port,
        threads=threads,
        ident="gpuwatch",
        clear_untrusted_proxy_headers=True,
        channel_timeout=IDLE_SECONDS,
        cleanup_interval=1,
        connection_limit=CONNECTION_LIMIT,
        max_request_body_size=1,  # waitress's own refusal too, should a request slip past the parser's
        asyncore_use_poll=True,
    )
    return GuardedServer(app, adj=adjustments)
