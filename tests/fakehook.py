"""A local HTTP server that behaves like a chat platform's webhook, for tests: what every one shares.

Each platform's receiver (tests/fakefeishu.py, tests/fakechat.py) is a :class:`FakeHook` with its
own checks (token, signature, keyword, size, rate, the body's shape) and its own answers; this
module owns the server on 127.0.0.1 (a free port), the records and the scripted faults.

Every request is recorded (thread-safe) with its raw bytes and the answer it got:
``accepted`` (parsed bodies), ``accepted_raw``, ``rejected``, ``exchanges`` and ``codes``.
``fail_next([...])`` scripts the next answers, one per request, before any check: an int
100-599 answers that HTTP status, any other int answers that platform code, ``"drop"`` closes
the connection without an answer, ``"garbage"`` answers HTTP 200 with a non-JSON page,
``"legacy"`` checks as usual but answers in the platform's old shape (where it has one). These
do not count towards the rate limits.

Faults that check the request as usual (so an accepted message reaches "the group" and counts
in ``accepted``) and then misbehave in the answer only, like a webhook that takes a message
and then chokes on the reply:

=================  =========================================================================
``"slow:S"``       answers normally after S seconds
``"trickle:S"``    sends the headers, then the answer one byte every S seconds
``"trickle-head:S"`` sends the status line and headers one byte every S seconds
``"huge"``         answers HTTP 200 with a :data:`HUGE_ANSWER_BYTES` (300 MB) JSON body made
                   on the fly in 64 KiB pieces (never held in memory)
``"silent"``       never answers; waits until the client hangs up (or the server stops)
=================  =========================================================================

How each of these answers ended is in ``answers`` (:class:`AnswerRecord`). ``always(fault)``
applies a fault to every request that no ``fail_next`` entry claims, until ``always(None)``.
``clear_faults()`` forgets both. ``wait_for_requests(n)`` and ``wait_for_answers(n)`` wait (with a
timeout) instead of sleeping.

Also here: :func:`render_markdown`, a model of what a person sees of a chat platform's markdown
(tags gone, links and emphasis shown as their text, character references decoded), used to check
that what gpuwatch escaped shows as written and mentions no one.
"""

from __future__ import annotations

import collections
import html
import json
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

HUGE_ANSWER_BYTES = 300_000_000
_CHUNK = 64 * 1024
_SIMPLE_FAULTS = frozenset({"drop", "garbage", "legacy", "huge", "silent"})
_TIMED_FAULTS = ("slow:", "trickle:", "trickle-head:")  # followed by seconds

Fault = int | str


@dataclass(frozen=True)
class Reply:
    """An answer: HTTP status, body, content type."""

    status: int
    body: bytes
    content_type: str = "application/json; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of_json(cls, value: dict[str, Any], status: int = 200) -> Reply:
        return cls(status, json.dumps(value).encode())


@dataclass(frozen=True)
class AnswerRecord:
    """How a misbehaving answer (slow, trickle, trickle-head, huge, silent) ended."""

    fault: str
    bytes_written: int  # of the answer (status line, headers, body) that reached the socket
    hung_up: bool  # the client closed the connection before the answer was complete
    seconds: float  # from the check of the request to the end of the answer or the hang-up


@dataclass(frozen=True)
class Exchange:
    """One request as received and the answer it got."""

    path: str
    headers: dict[str, str]
    raw: bytes
    body: dict[str, Any] | None  # the parsed JSON object, when it was one
    status: int  # HTTP status answered; 0 when the connection was dropped
    code: int | None  # the platform's code answered (0 = accepted); None for HTTP errors and drops
    reason: str  # why: "accepted", "scripted", or the check that failed
    at: float  # the server's monotonic clock on arrival

    @property
    def accepted(self) -> bool:
        return self.status == 200 and self.code == 0

    @property
    def query(self) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(urlsplit(self.path).query, keep_blank_values=True).items()}


H = TypeVar("H", bound="FakeHook")


class FakeHook:
    """A webhook on 127.0.0.1 (see the module docstring); a platform subclasses :meth:`check`,
    :meth:`answer` and :meth:`scripted` (and ``path_prefix``, ``rate_window``)."""

    path_prefix = "/"
    name = "fakehook"

    def __init__(
        self,
        *,
        token: str,
        keywords: Sequence[str] = (),
        secret: str | None = None,
        allowed_ips: Sequence[str] | None = None,
        max_body_bytes: int = 20_000,
        per_second: int | None = None,
        per_minute: int | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        host: str = "127.0.0.1",
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.token = token
        self.keywords = list(keywords)
        self.secret = secret
        self.allowed_ips = None if allowed_ips is None else set(allowed_ips)
        self.max_body_bytes = max_body_bytes
        self.per_second = per_second
        self.per_minute = per_minute
        self.clock = clock
        self.monotonic = monotonic
        self.host = host
        self.ssl_context = ssl_context  # a server context: serve HTTPS (the URL says https://)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._faults: collections.deque[Fault] = collections.deque()
        self._always: Fault | None = None
        self._exchanges: list[Exchange] = []
        self._answers: list[AnswerRecord] = []
        self._window: collections.deque[float] = collections.deque()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle

    def start(self: H) -> H:
        if self._httpd is not None:
            return self
        self._stopping.clear()
        self._httpd = _Server((self.host, 0), _Handler, self)
        if self.ssl_context is not None:
            self._httpd.socket = self.ssl_context.wrap_socket(self._httpd.socket, server_side=True)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, name=self.name, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._stopping.set()  # ends slow, trickling, huge and silent answers
        self._httpd.shutdown()
        self._httpd.close_connections()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    def __enter__(self: H) -> H:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- addresses

    @property
    def base_url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("FakeFeishu is not started")
        host, port = self._httpd.server_address[:2]
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{host!s}:{port}"

    def url_for(self, token: str) -> str:
        return f"{self.base_url}{self.path_prefix}{token}"

    @property
    def url(self) -> str:
        """The full webhook URL with the valid token."""
        return self.url_for(self.token)

    # -- scripting and records

    def fail_next(self, faults: Iterable[Fault]) -> None:
        """Queue scripted answers for the next requests, in order (see the module docstring)."""
        items = list(faults)
        for fault in items:
            _check_fault(fault)
        with self._lock:
            self._faults.extend(items)

    def always(self, fault: Fault | None) -> None:
        """Answer every request with ``fault`` (after any queued by fail_next); None: behave again."""
        if fault is not None:
            _check_fault(fault)
        with self._lock:
            self._always = fault

    def clear_faults(self) -> None:
        """Forget the faults queued by fail_next and set by always."""
        with self._lock:
            self._faults.clear()
            self._always = None

    def wait_for_requests(self, count: int, timeout: float = 10.0) -> bool:
        """Wait until ``count`` requests have arrived in total; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: len(self._exchanges) >= count, timeout)

    def wait_for_answers(self, count: int, timeout: float = 10.0) -> bool:
        """Wait until ``count`` misbehaving answers have ended (see ``answers``); False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: len(self._answers) >= count, timeout)

    @property
    def exchanges(self) -> list[Exchange]:
        with self._lock:
            return list(self._exchanges)

    @property
    def answers(self) -> list[AnswerRecord]:
        with self._lock:
            return list(self._answers)

    @property
    def accepted(self) -> list[dict[str, Any]]:
        return [e.body for e in self.exchanges if e.accepted and e.body is not None]

    @property
    def accepted_raw(self) -> list[bytes]:
        return [e.raw for e in self.exchanges if e.accepted]

    @property
    def rejected(self) -> list[Exchange]:
        return [e for e in self.exchanges if not e.accepted]

    @property
    def codes(self) -> list[int | None]:
        """The platform's code of every answer in order (None for HTTP errors and drops)."""
        return [e.code for e in self.exchanges]

    def reset(self) -> None:
        with self._lock:
            self._faults.clear()
            self._always = None
            self._exchanges.clear()
            self._answers.clear()
            self._window.clear()

    # -- the checks, called from handler threads

    def _next_fault(self) -> Fault | None:
        with self._lock:
            return self._faults.popleft() if self._faults else self._always

    def _record(self, exchange: Exchange) -> None:
        with self._changed:
            self._exchanges.append(exchange)
            self._changed.notify_all()

    def _record_answer(self, answer: AnswerRecord) -> None:
        with self._changed:
            self._answers.append(answer)
            self._changed.notify_all()

    def _over_rate(self, now: float) -> bool:
        """Sliding windows; every request that reaches this check counts."""
        with self._lock:
            while self._window and self._window[0] <= now - 60.0:
                self._window.popleft()
            in_second = sum(1 for t in self._window if t > now - 1.0)
            if (self.per_second is not None and in_second >= self.per_second) or (
                self.per_minute is not None and len(self._window) >= self.per_minute
            ):
                return True
            self._window.append(now)
            return False

    # -- what a platform says (subclasses)

    def check(self, path: str, client_ip: str, headers: dict[str, str], raw: bytes, now: float) -> tuple[int, str]:
        """The platform's verdict on one request: (code, reason); code 0 is accepted."""
        raise NotImplementedError

    def answer(self, code: int, reason: str, legacy: bool = False) -> Reply:
        """The answer to a request the checks gave ``code``."""
        raise NotImplementedError

    def scripted(self, fault: int) -> Reply:
        """The answer to a scripted int: an HTTP status (100-599) or a platform code."""
        if 100 <= fault <= 599:
            return Reply(fault, f"HTTP {fault}".encode(), "text/plain")
        return self.answer(fault, "scripted")

    def scripted_code(self, fault: int) -> int | None:
        """The code recorded for a scripted int (None: an HTTP status)."""
        return None if 100 <= fault <= 599 else fault


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_fault(fault: Fault) -> None:
    if isinstance(fault, str) and not (
        fault in _SIMPLE_FAULTS or any(fault.startswith(p) and _is_float(fault[len(p) :]) for p in _TIMED_FAULTS)
    ):
        raise ValueError(f"unknown fault {fault!r}")


def _seconds(fault: str) -> float:
    return float(fault.rsplit(":", 1)[1])


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        body = json.loads(raw.decode("utf-8"))
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], fake: FakeHook) -> None:
        self.fake = fake
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, handler)

    def close_connections(self) -> None:
        """Hang up on keep-alive clients so that no handler thread outlives stop()."""
        with self.connections_lock:
            for conn in list(self.connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out (see "slow:") leaves a broken pipe behind: that is the point.
        pass


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive, like the real endpoint
    timeout = 10
    # One write per answer, sent at once: otherwise Nagle + delayed ACK add ~40 ms per request.
    wbufsize = -1
    disable_nagle_algorithm = True

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the path holds the token; tests read the records instead

    def do_POST(self) -> None:
        fake = self.server.fake
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        now = fake.monotonic()
        headers = {k.lower(): v for k, v in self.headers.items()}

        def record(status: int, code: int | None, reason: str) -> None:
            fake._record(Exchange(self.path, headers, raw, _parse(raw), status, code, reason, now))

        fault = fake._next_fault()
        legacy = fault == "legacy"
        misbehave = fault if isinstance(fault, str) and fault not in ("drop", "garbage", "legacy") else None
        if isinstance(fault, str) and fault != "drop" and fault != "garbage":
            fault = None
        if fault == "drop":
            record(0, None, "scripted")
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault == "garbage":
            record(200, None, "scripted")
            self._answer(200, b"<html><body>502 Bad Gateway</body></html>", "text/html")
            return
        if isinstance(fault, int):
            reply = fake.scripted(fault)
            record(reply.status, fake.scripted_code(fault), "scripted")
            self._answer(reply.status, reply.body, reply.content_type, reply.headers)
            return

        if not urlsplit(self.path).path.startswith(fake.path_prefix):
            record(404, None, "path")
            self._answer(404, b"404 page not found", "text/plain")
            return
        code, reason = fake.check(self.path, self.client_address[0], headers, raw, now)
        reply = fake.answer(code, reason, legacy)
        record(reply.status, code, reason)
        if misbehave is not None:
            self._misbehave(misbehave, reply)
            return
        self._answer(reply.status, reply.body, reply.content_type, reply.headers)

    def _misbehave(self, fault: str, reply: Reply) -> None:
        """Answer the checked request badly (see the module docstring); record how it ended."""
        fake = self.server.fake
        stopping = fake._stopping
        started = time.monotonic()
        body = reply.body
        written = 0
        hung_up = False
        self.close_connection = True
        try:
            if fault.startswith("slow:"):
                if not self._pause(_seconds(fault)):
                    hung_up = not stopping.is_set()
                    return
                head = self._head(reply.status, len(body))
                self.connection.sendall(head + body)
                written = len(head) + len(body)
            elif fault.startswith("trickle-head:"):
                data = self._head(reply.status, len(body)) + body
                for i in range(len(data)):
                    self.connection.sendall(data[i : i + 1])
                    written += 1
                    if i + 1 < len(data) and not self._pause(_seconds(fault)):
                        hung_up = not stopping.is_set()
                        return
            elif fault.startswith("trickle:"):
                head = self._head(reply.status, len(body))
                self.connection.sendall(head)
                written = len(head)
                for i in range(len(body)):
                    if not self._pause(_seconds(fault)):
                        hung_up = not stopping.is_set()
                        return
                    self.connection.sendall(body[i : i + 1])
                    written += 1
            elif fault == "huge":
                prefix, suffix = b'{"code": 0, "msg": "', b'", "data": {}}'
                head = self._head(200, HUGE_ANSWER_BYTES)
                self.connection.sendall(head + prefix)
                written = len(head) + len(prefix)
                left = HUGE_ANSWER_BYTES - len(prefix) - len(suffix)
                piece = b"x" * _CHUNK  # the same 64 KiB over and over: the body is never built
                while left > 0 and not stopping.is_set():
                    chunk = piece if left >= _CHUNK else piece[:left]
                    self.connection.sendall(chunk)
                    written += len(chunk)
                    left -= len(chunk)
                if left <= 0:
                    self.connection.sendall(suffix)
                    written += len(suffix)
            elif fault == "silent":
                if self._wait(None) == "stopping":
                    return
                hung_up = True
            else:  # pragma: no cover - _check_fault lets nothing else through
                raise ValueError(fault)
        except OSError:  # broken pipe, reset: the client hung up
            hung_up = True
        finally:
            if not stopping.is_set() or hung_up:
                fake._record_answer(AnswerRecord(fault, written, hung_up, time.monotonic() - started))

    def _wait(self, seconds: float | None) -> str:
        """Wait ``seconds`` (None: for ever) watching the connection: "time", "hung up" or "stopping"."""
        stopping = self.server.fake._stopping
        end = None if seconds is None else time.monotonic() + seconds
        while not stopping.is_set():
            left = 0.05 if end is None else min(0.05, end - time.monotonic())
            if left <= 0:
                return "time"
            readable, _, _ = select.select([self.connection], [], [], left)
            if readable and (
                isinstance(self.connection, ssl.SSLSocket)  # a client sends nothing more but its goodbye
                or not self.connection.recv(1, socket.MSG_PEEK)
            ):
                return "hung up"  # EOF: the client closed or shut down its end
        return "stopping"

    def _pause(self, seconds: float) -> bool:
        """Wait ``seconds``; False when the client hung up or the server is stopping meanwhile."""
        return self._wait(seconds) == "time"

    def _head(self, status: int, length: int) -> bytes:
        return (
            f"HTTP/1.1 {status} {self.responses[status][0]}\r\n"
            "Content-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {length}\r\n"
            "Connection: close\r\n\r\n"
        ).encode("ascii")

    def _answer(self, status: int, data: bytes, content_type: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


# ---------------------------------------------------------------------- what a person sees of markdown

_TAG = re.compile(r"<(/?)([A-Za-z_][\w-]*)([^<>]*)>")
_LINK = re.compile(r"!?\[([^\]]*)\]\(([^)\s]*)\)")
_AUTOLINK = re.compile(r"https?://\S+")
_EMPHASIS = re.compile(r"(\*\*|__|\*|_|~~)(?=\S)(.+?)(?<=\S)\1")


@dataclass(frozen=True)
class Rendered:
    """What a person sees of a markdown text: its text, who it mentions, the links it makes, and
    the spans that came out bold, italic or struck through."""

    text: str
    mentions: tuple[str, ...]
    links: tuple[str, ...]
    emphasis: tuple[str, ...]


def render_markdown(markdown: str, mention: re.Pattern[str] | None = None) -> Rendered:
    """A model of a chat platform's markdown renderer (CommonMark-like, with HTML tags):

    ``mention`` finds the platform's mention syntax (Feishu ``<at id=..>``, WeCom ``<@id>``)
    before anything else; then tags vanish (``<font>``, ``<br>``, any unknown one), ``[t](u)``
    shows as ``t`` (a link to ``u``), a bare ``http://...`` is a link, ``*t*``, ``**t**``,
    ``_t_``, ``~~t~~`` show as ``t`` (emphasis), and last, character references (``&#42;``)
    become their character, which is why they are the escape: they are decoded after the markup
    was read, so they never make any.
    """
    mentions = tuple(m.group(1) for m in mention.finditer(markdown)) if mention else ()
    text = mention.sub("@mention", markdown) if mention else markdown
    text = text.replace("<br>", "\n")
    text = _TAG.sub("", text)
    links = [m.group(2) for m in _LINK.finditer(text)]
    text = _LINK.sub(lambda m: m.group(1), text)
    links += _AUTOLINK.findall(text)
    emphasis: list[str] = []

    def strip(m: re.Match[str]) -> str:
        emphasis.append(m.group(2))
        return m.group(2)

    previous = None
    while previous != text:
        previous, text = text, _EMPHASIS.sub(strip, text)
    return Rendered(html.unescape(text), mentions, tuple(links), tuple(emphasis))


# ---------------------------------------------------------------------- what a person sees in a chat's markdown

#: CommonMark (Mattermost, Rocket.Chat) and Discord: a backslash before ASCII punctuation shows it.
_ESCAPE = re.compile(r"\\([!-/:-@\[-`{-~])")
_HIDDEN = re.compile("\ue000(\\d+)\ue001")
#: Who a message mentions: ``@everyone``, ``@here``, ``@channel``, ``@all``, ``@name``; Slack's
#: ``<!here>``/``<!channel>``/``<!everyone>`` and ``<@U123>`` (Mattermost reads Slack's syntax
#: too); Discord's ``<@123>``, ``<@!123>`` and ``<@&role>``.
_CHAT_MENTION = re.compile(
    r"(?<![\w@])@([A-Za-z0-9][\w.-]*)|<!(here|channel|everyone)(?:\|[^>]*)?>|<@[!&]?([A-Za-z0-9]+)>", re.IGNORECASE
)
#: Links: ``[t](u)``, Slack's ``<url|t>`` and ``<url>``, a bare URL or ``www.``, an e-mail address.
_CHAT_LINKS = (
    re.compile(r"!?\[[^\]]*\]\(([^)\s]*)\)"),
    re.compile(r"<((?:https?|mailto|ftp)://[^>|\s]*|mailto:[^>|\s]*)(?:\|[^>]*)?>", re.IGNORECASE),
    re.compile(r"(?<![\w/])((?:https?|ftp)://[^\s<]+|www\.[^\s<]+)", re.IGNORECASE),
    re.compile(r"([\w.+-]+@[A-Za-z0-9-]+\.[A-Za-z0-9.-]+)"),
)


def render_chat_markdown(markdown: str) -> Rendered:
    """A model of what Mattermost, Rocket.Chat and Discord make of a message's markdown: escaped
    characters (a backslash before punctuation) show as themselves and make no markup; then the
    mentions (:data:`_CHAT_MENTION`), links (:data:`_CHAT_LINKS`) and emphasis are read; a word
    joiner (U+2060) is not seen."""
    escaped: list[str] = []

    def hide(m: re.Match[str]) -> str:
        escaped.append(m.group(1))
        return f"\ue000{len(escaped) - 1}\ue001"

    text = _ESCAPE.sub(hide, markdown)
    mentions = tuple(next(g for g in m.groups() if g) for m in _CHAT_MENTION.finditer(text))
    links = tuple(link for pattern in _CHAT_LINKS for link in pattern.findall(text))
    emphasis = tuple(m.group(2) for m in _EMPHASIS.finditer(text))
    shown = _HIDDEN.sub(lambda m: escaped[int(m.group(1))], text).replace("\u2060", "")
    return Rendered(shown, mentions, links, emphasis)
