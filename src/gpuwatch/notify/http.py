"""What every chat webhook channel shares: one bounded HTTP post, retries, a rate limiter.

A webhook channel (Feishu, DingTalk, WeCom, Slack, a generic webhook) is a :class:`WebhookChannel`
with three things of its own: how a payload becomes a request on each attempt (signing afresh),
how the service's answer is judged (accepted, worth another try, or refused for a reason a person
must fix), and its words. This module owns the rest, the same for all of them:

* one total deadline per post, from connect to the last byte of the answer (however slowly a server
  trickles), an answer of at most :data:`MAX_ANSWER_BYTES` (never read whole into memory), and an
  end within about a second of a stop request (see :mod:`gpuwatch.notify.deadline`);
* "the post went out but no verdict came back" told apart from a failure: the message may have been
  delivered, so it is not posted again at once (``DeliveryError.maybe_delivered``);
* retries of transient failures (network, HTTP 5xx, 429, a service's own rate-limit code) with
  backoff, and a client-side :class:`RateLimiter` under the service's limits;
* secrets (tokens in URLs, signing secrets, header values) masked in every error and log line.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import random
import re
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.client import HTTPException
from typing import Any, Generic, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import requests
import requests.adapters
import urllib3.exceptions
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.poolmanager import PoolManager

from gpuwatch.notify.base import DeliveryError
from gpuwatch.notify.deadline import current_attempt, run_guarded, shutdown_socket
from gpuwatch.notify.masking import MASK
from gpuwatch.notify.spec import UrlSettings

logger = logging.getLogger(__name__)
S = TypeVar("S", bound=UrlSettings)  # a channel's settings

# Backoff between attempts: base * 2**(attempt-1), capped, with jitter in [50 %, 100 %].
_BACKOFF_BASE_SECONDS = 1.0
_BACKOFF_CAP_SECONDS = 30.0
_RETRY_AFTER_CAP_SECONDS = 60.0
# The limiter's windows are this much longer than 1 s / 60 s, so that network jitter between
# our clock and the service's arrival times cannot squeeze one more request into its window.
_WINDOW_MARGIN_SECONDS = 0.05
_MAX_REPLY_CHARS = 200

#: The most of an answer gpuwatch reads. Webhook replies are about 100 bytes; anything larger
#: is not a webhook reply, and is never read whole into memory.
MAX_ANSWER_BYTES = 64 * 1024
#: HTTP statuses that say a gateway passed the post on and then lost the answer: it may have
#: been delivered.
_LOST_ANSWER_STATUSES = frozenset({504})
#: After a stop request, how long a post in flight may still take to get its answer.
_STOP_GRACE_SECONDS = 1.0


class RateLimiter:
    """Sliding windows: at most ``per_second`` sends in any second and ``per_minute`` in any minute.

    Thread-safe; waits with the injected ``sleep`` (outside the lock) until a send is allowed.
    Once ``stop`` is set it stops waiting: :meth:`acquire` returns without taking a slot (a
    ``sleep`` cut short by the stop would otherwise spin until the window opens).
    """

    def __init__(
        self,
        per_second: int,
        per_minute: int,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        margin: float = _WINDOW_MARGIN_SECONDS,
        stop: threading.Event | None = None,
    ) -> None:
        self._limits = ((per_second, 1.0 + margin), (per_minute, 60.0 + margin))
        self._monotonic = monotonic
        self._sleep = sleep
        self._stop = stop
        self._sent: collections.deque[float] = collections.deque()
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Block until a send is allowed and record it. Returns the seconds spent waiting.

        Returns early, without recording a send, once ``stop`` is set: the caller must check it.
        """
        waited = 0.0
        while True:
            if self._stop is not None and self._stop.is_set():
                return waited
            with self._lock:
                now = self._monotonic()
                longest = max(window for _, window in self._limits)
                while self._sent and self._sent[0] <= now - longest:
                    self._sent.popleft()
                wait = 0.0
                for limit, window in self._limits:
                    if len(self._sent) >= limit:
                        # The limit-th most recent send must leave the window first.
                        wait = max(wait, self._sent[-limit] + window - now)
                if wait <= 1e-6:  # not 0: a fake clock's float sums may never quite get there
                    self._sent.append(now)
                    return waited
            self._sleep(wait)
            waited += wait


@dataclass(frozen=True)
class Answer:
    """What came back from one post: the status line, and the body of a 200 answer."""

    status: int
    reason: str
    retry_after: str | None
    body: bytes


class _UnreadableAnswer(Exception):
    """A 200 answer whose body could not be read whole within the limits (too large, an
    encoding not asked for, not decompressible)."""


def _is_network_error(exc: BaseException) -> bool:
    """Whether ``exc`` is the network failing (retry or doubt), not a request that cannot be made.

    ``requests``' own errors all derive from OSError, so its classes are told apart first.
    """
    if isinstance(exc, requests.RequestException):
        return isinstance(exc, (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError))
    # Raised while reading the body from urllib3 directly (cut short, reset, shut down).
    return isinstance(exc, (urllib3.exceptions.HTTPError, HTTPException, OSError))


def _read_answer(response: requests.Response) -> bytes:
    """At most MAX_ANSWER_BYTES of the answer, decoded; _UnreadableAnswer beyond that.

    Reads the raw bytes (``decode_content=False``) and decompresses them here with a bound, so
    a small compressed answer cannot expand into a large one in memory either.
    """
    limit = MAX_ANSWER_BYTES
    data = response.raw.read(limit + 1, decode_content=False)
    if len(data) > limit:
        raise _UnreadableAnswer(f"its answer is larger than {limit // 1024} KiB (not read)")
    length = response.headers.get("Content-Length", "")
    if length.isdigit() and len(data) < int(length):
        # A network failure, not a strange answer: the verdict was on its way and got lost.
        raise urllib3.exceptions.ProtocolError(f"the answer was cut short ({len(data)} of {length} bytes)")
    encoding = (response.headers.get("Content-Encoding") or "identity").strip().lower()
    if encoding == "identity":
        return bytes(data)
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise _UnreadableAnswer(f"its answer is in the {encoding!r} encoding, which gpuwatch did not ask for")
    decoder = zlib.decompressobj(wbits=47)  # 32 + 15: a gzip or zlib header, detected
    try:
        text = decoder.decompress(data, limit + 1)
    except zlib.error as exc:
        raise _UnreadableAnswer(f"its {encoding} answer cannot be decompressed ({exc})") from None
    if len(text) > limit or decoder.unconsumed_tail:
        raise _UnreadableAnswer(f"its answer is larger than {limit // 1024} KiB once decompressed (not read)")
    return text


def waiter(stop: threading.Event) -> Callable[[float], None]:
    """A sleep that a stop request cuts short."""

    def sleep(seconds: float) -> None:
        stop.wait(seconds)

    return sleep


def origin(url: str) -> str:
    """The ``scheme://host:port/`` prefix of ``url`` as requests matches adapters (prepared)."""
    prepared = requests.Request("POST", url).prepare().url or url
    parts = urlsplit(prepared)
    return f"{parts.scheme}://{parts.netloc}/"


def _before_connect() -> None:
    attempt = current_attempt()
    if attempt is not None:
        attempt.check()  # given up while waiting (e.g. for DNS): open nothing


def _watch(conn: HTTPConnection) -> None:
    """Let the attempt's watchdog cut this connection (fails, cutting it, if already given up).

    The socket itself is kept: http.client drops ``conn.sock`` once it hands the socket over to
    a response that will close the connection, and the watchdog must still reach it then.
    """
    attempt = current_attempt()
    sock = conn.sock
    if attempt is not None and sock is not None:
        attempt.attach(lambda: shutdown_socket(sock))


def _sent() -> None:
    attempt = current_attempt()
    if attempt is not None:
        attempt.mark_sent()


class _GuardedHTTPConnection(HTTPConnection):
    """urllib3's connection, registered with the running :class:`~gpuwatch.notify.deadline.Attempt`:
    the watchdog can cut it, and it says when the request went out in full. It carries one
    request only: a kept-alive connection that the server closes just as it is reused fails
    after the request went out, which would read as "maybe delivered" for nothing."""

    _used = False

    def connect(self) -> None:
        _before_connect()
        super().connect()
        _watch(self)

    def request(self, *args: Any, **kwargs: Any) -> None:
        if self._used:
            self.close()  # reconnects (through connect() above) on the way out
        self._used = True
        _watch(self)
        super().request(*args, **kwargs)
        _sent()


class _GuardedHTTPSConnection(HTTPSConnection):
    """:class:`_GuardedHTTPConnection` for TLS."""

    _used = False

    def connect(self) -> None:
        _before_connect()
        super().connect()
        _watch(self)

    def request(self, *args: Any, **kwargs: Any) -> None:
        if self._used:
            self.close()
        self._used = True
        _watch(self)
        super().request(*args, **kwargs)
        _sent()


class _GuardedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


_GUARDED_POOLS: dict[type[HTTPConnectionPool], type[HTTPConnectionPool]] = {
    HTTPConnectionPool: _GuardedHTTPPool,
    HTTPSConnectionPool: _GuardedHTTPSPool,
}


def _guard_pools(manager: PoolManager) -> None:
    """Make ``manager`` open guarded connections (plain and TLS, direct or through an HTTP proxy;
    other pool kinds, such as SOCKS, are left as they are)."""
    manager.pool_classes_by_scheme = {
        scheme: _GUARDED_POOLS.get(cls, cls) for scheme, cls in manager.pool_classes_by_scheme.items()
    }


class _GuardedAdapter(requests.adapters.HTTPAdapter):
    """requests' adapter with guarded connections (see :class:`_GuardedHTTPConnection`)."""

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any) -> None:
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
        _guard_pools(self.poolmanager)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if isinstance(manager, PoolManager):
            _guard_pools(manager)
        return manager


# ---------------------------------------------------------------------- helpers


def _network_reason(exc: BaseException, timeout: float) -> str:
    """What went wrong on the wire, in a few words, from the innermost cause of a requests error
    (``connection refused``, ``name not resolved``, ``no answer within 10s``), not urllib3's
    whole chain with the URL in it."""
    deepest: BaseException = exc
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        deepest = current
        reason = getattr(current, "reason", None)
        nested = [a for a in current.args if isinstance(a, BaseException)]
        current = (
            reason
            if isinstance(reason, BaseException)
            else (nested[0] if nested else current.__cause__ or current.__context__)
        )
    text = str(deepest)
    if isinstance(exc, requests.Timeout) or "timed out" in text.lower():
        return f"no answer within {timeout:g}s"
    if "Failed to establish a new connection:" in text:
        text = text.split("Failed to establish a new connection:", 1)[1]
    text = re.sub(r"\[Errno -?\d+\]\s*", "", text).strip().strip("\"')(").strip()
    if "Name or service not known" in text or "nodename nor servname" in text or "Temporary failure in name" in text:
        return "the webhook's host name could not be resolved"
    return text[:200] or type(deepest).__name__


def _retry_after(header: str | None) -> float:
    try:
        seconds = float(header or 0)
    except ValueError:
        return 0.0
    if seconds != seconds:  # NaN
        return 0.0
    return min(max(seconds, 0.0), _RETRY_AFTER_CAP_SECONDS)


def backoff(attempt: int) -> float:
    """Exponential backoff with jitter: 50-100 % of base * 2**(attempt-1), capped."""
    ceiling = min(_BACKOFF_CAP_SECONDS, _BACKOFF_BASE_SECONDS * 2.0 ** (attempt - 1))
    return ceiling * (0.5 + random.random() / 2)


# ---------------------------------------------------------------------- secrets in URLs


def with_query(url: str, extra: Mapping[str, str]) -> str:
    """``url`` with ``extra`` query parameters set (replacing any of the same name: a payload kept
    in an outbox never carries yesterday's signature)."""
    parts = urlsplit(url)
    kept = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in extra]
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode([*kept, *extra.items()]), parts.fragment))


# ---------------------------------------------------------------------- the channel base


@dataclass(frozen=True)
class Request:
    """One attempt's request, made afresh for every attempt (a signature is only good once)."""

    url: str
    data: bytes
    content_type: str = "application/json; charset=utf-8"
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class Retry:
    """A refusal worth another try: why, the service's code, the least wait before the next try."""

    reason: str
    code: int | None = None
    floor: float = 0.0


class WebhookChannel(Generic[S]):
    """The delivery half of a chat webhook channel (see the module docstring).

    A subclass sets :attr:`name` (its config section) and :attr:`service` (its name in sentences),
    and implements :meth:`_request` and :meth:`_judge`; its settings (a
    :class:`~gpuwatch.notify.spec.UrlSettings`, resolved) say where and how fast to post
    (:meth:`~gpuwatch.notify.spec.UrlSettings.endpoint`). All I/O comes in as parameters: the HTTP
    session, the wall clock (for signatures), the monotonic clock and sleep (for the rate limiter
    and backoff), and ``stop``, the event that ends a send early (SIGTERM).

    One instance shares its rate limiter between all ``deliver`` calls, from any thread. Every
    post goes out on a fresh connection (so a failure after the body went out always means "the
    service may have it", never "a kept-alive connection had gone stale") and is bounded by
    ``timeout_seconds`` in total; the channel mounts its own transport adapter on the session for
    the webhook's origin to do that.

    Delivery is at-least-once, with the doubt made explicit: when the post went out in full and
    no verdict came back (no answer in time, the connection cut, an answer too large, a 504 from
    a gateway, or a stop before the answer), ``deliver`` raises at once with
    ``DeliveryError.maybe_delivered`` set instead of posting again.
    """

    name = "webhook"
    dry_run = False
    service = "the webhook"
    #: after HTTP 429 or the service's rate-limit answer, wait at least this long
    rate_limited_floor = 1.0

    def __init__(
        self,
        settings: S,
        *,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        """``settings`` are the channel's own (its :meth:`endpoint` says where and how fast to post);
        ``sleep`` defaults to ``stop.wait`` when ``stop`` is given (a stop cuts backoff short), else
        ``time.sleep``."""
        endpoint = settings.endpoint()
        self._settings = settings
        self._url = endpoint.url
        self._own_session = session is None
        self._session = session if session is not None else requests.Session()
        self._session.mount(origin(endpoint.url), _GuardedAdapter())
        self._clock = clock
        self._stop = stop
        if sleep is None:
            sleep = waiter(stop) if stop is not None else time.sleep
        self._sleep = sleep
        self._limiter = RateLimiter(
            endpoint.per_second or 1_000_000,
            endpoint.per_minute or 1_000_000,
            monotonic=monotonic,
            sleep=self._sleep,
            stop=stop,
        )
        self._where = endpoint.where
        self._secrets = tuple(sorted({s for s in endpoint.secrets if s and len(s) >= 4}, key=len, reverse=True))
        self._timeout = endpoint.timeout_seconds
        self._max_attempts = endpoint.max_attempts

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._where})"

    def close(self) -> None:
        """Close the HTTP session if this channel created it."""
        if self._own_session:
            self._session.close()

    # ------------------------------------------------------------------ what a subclass says

    def _request(self, payload: Mapping[str, Any]) -> Request:
        """The request for one attempt at ``payload`` (signed afresh)."""
        raise NotImplementedError

    def _judge(self, answer: Answer) -> Retry | None:
        """The service's verdict on an answer that is not 429, 5xx nor a lost answer: None when
        accepted, a :class:`Retry` when worth another try; raise :meth:`_refused` otherwise."""
        raise NotImplementedError

    def _before_delivery(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The payload as it must go out today (e.g. carrying today's keyword)."""
        return payload

    # ------------------------------------------------------------------ deliver

    def deliver(self, payload: dict[str, Any]) -> None:
        """Post one payload; retry transient failures; raise DeliveryError when not accepted.

        Every attempt waits for the rate limiter and is made afresh (a new signature). A post
        that may have been delivered is never retried here (``maybe_delivered``), and nothing
        is posted once ``stop`` is set.
        """
        payload = self._before_delivery(payload)
        attempts = self._max_attempts
        last = Retry("no attempt made")
        for attempt in range(1, attempts + 1):
            self._check_stop(attempt)
            self._limiter.acquire()
            self._check_stop(attempt)
            outcome = self._attempt(payload)
            if outcome is None:
                logger.debug("%s %s: accepted (attempt %d)", self.name, self._where, attempt)
                return
            last = outcome
            if attempt == attempts:
                break
            delay = max(backoff(attempt), outcome.floor)
            logger.warning(
                "%s %s: attempt %d/%d failed (%s); retrying in %.1f s",
                self.name,
                self._where,
                attempt,
                attempts,
                last.reason,
                delay,
            )
            self._sleep(delay)
        raise DeliveryError(
            f"{self.name} {self._where}: not accepted after {attempts} attempts; last: {last.reason}",
            permanent=False,
            code=last.code,
        )

    def _check_stop(self, attempt: int) -> None:
        if self._stop is not None and self._stop.is_set():
            tried = f" after {attempt - 1} failed attempts" if attempt > 1 else ""
            raise DeliveryError(f"{self.name} {self._where}: not sent{tried}: gpuwatch is stopping", permanent=False)

    def _attempt(self, payload: Mapping[str, Any]) -> Retry | None:
        """One POST. None when accepted; a Retry when transient.

        Raises DeliveryError(permanent=True) for failures that no retry can fix, and
        DeliveryError(maybe_delivered=True) when the post went out but no verdict came back.
        """
        request = self._request(payload)
        timeout = self._timeout
        outcome = run_guarded(
            lambda: self._post(request),
            deadline_seconds=timeout,
            stop=self._stop,
            stop_grace_seconds=_STOP_GRACE_SECONDS,
            name=f"{self.name}-post",
        )
        if outcome.abandoned is not None:
            if outcome.sent:
                why = (
                    f"gpuwatch is stopping and {self.service} had not answered yet"
                    if outcome.abandoned == "stopped"
                    else f"{self.service} did not answer within {timeout:g} s"
                )
                raise self._maybe_delivered(why)
            if outcome.abandoned == "stopped":
                raise DeliveryError(f"{self.name} {self._where}: not sent: gpuwatch is stopping", permanent=False)
            return Retry(f"network error: could not connect and send within {timeout:g} s")
        error = outcome.error
        if isinstance(error, _UnreadableAnswer):
            raise self._maybe_delivered(f"{self.service} answered HTTP 200, but {error}", permanent=True)
        if error is not None and _is_network_error(error):
            reason = self._scrub(_network_reason(error, timeout))
            if outcome.sent:
                raise self._maybe_delivered(f"the answer was lost ({reason})")
            return Retry(f"network error: {reason}")
        if isinstance(error, requests.RequestException):
            raise DeliveryError(
                f"{self.name} {self._where}: request could not be made: {type(error).__name__}: "
                f"{self._scrub(str(error))}",
                permanent=True,
            ) from None
        if error is not None:
            raise error
        answer = outcome.value
        assert answer is not None

        status = answer.status
        if status == 429:
            floor = max(self.rate_limited_floor, _retry_after(answer.retry_after))
            said = self.snippet(answer)
            return Retry(f"HTTP 429 Too Many Requests{f': {said}' if said else ''}", None, floor)
        if status in _LOST_ANSWER_STATUSES:
            raise self._maybe_delivered(f"a gateway answered HTTP {status} {self._scrub(answer.reason)}".rstrip())
        if 500 <= status <= 599:
            return Retry(f"HTTP {status} {self._scrub(answer.reason)}".rstrip())
        return self._judge(answer)

    def _post(self, request: Request) -> Answer:
        """The HTTP exchange itself (runs in a :func:`run_guarded` worker): post, read a bounded answer."""
        timeout = self._timeout
        response = self._session.post(
            request.url,
            data=request.data,
            headers={
                **request.headers,
                "Content-Type": request.content_type,
                "Connection": "close",  # a fresh connection per post (see the class docstring)
                "Accept-Encoding": "identity",  # the answer's size as sent is its size in memory
            },
            timeout=(timeout, timeout),  # per socket operation; run_guarded bounds the total
            allow_redirects=False,
            stream=True,  # the body is read here, bounded, not by requests
        )
        try:
            if 200 <= response.status_code <= 299:
                body = _read_answer(response)
            else:
                try:  # an error page says why (Slack's `channel_not_found`); a strange one is dropped
                    body = _read_answer(response)
                except _UnreadableAnswer:
                    body = b""
            return Answer(response.status_code, response.reason or "", response.headers.get("Retry-After"), body)
        finally:
            response.close()

    # ------------------------------------------------------------------ words

    def _maybe_delivered(self, why: str, *, permanent: bool = False) -> DeliveryError:
        return DeliveryError(
            f"{self.name} {self._where}: {why}; the message may have been delivered, so it is not posted "
            "again now (a duplicate is possible when it is)",
            permanent=permanent,
            maybe_delivered=True,
        )

    def _refused(
        self, why: str, *, code: int | None = None, message_fault: bool = False, permanent: bool = True
    ) -> DeliveryError:
        """A refusal that no retry now can fix (``message_fault``: this message can never pass, the next
        ones still can; ``permanent=False``: give up for now, the outbox tries again later)."""
        return DeliveryError(
            f"{self.name} {self._where}: {why}", permanent=permanent, code=code, message_fault=message_fault
        )

    def snippet(self, answer: Answer) -> str:
        """The start of an answer's body, as text, secrets masked."""
        text = answer.body[: _MAX_REPLY_CHARS * 4].decode("utf-8", "replace").strip()
        return self._scrub(text)[:_MAX_REPLY_CHARS]

    def _scrub(self, text: str) -> str:
        """Mask the tokens and secrets wherever a library or a server echoed them (e.g. in an URL)."""
        for secret in self._secrets:
            text = text.replace(secret, MASK)
        return text


def json_reply(answer: Answer) -> dict[str, Any] | None:
    """The answer's JSON object, or None when it is not one."""
    try:
        reply = json.loads(answer.body)
    except ValueError:
        return None
    return reply if isinstance(reply, dict) else None


def int_field(reply: Mapping[str, Any] | None, *names: str) -> int | None:
    """The first of ``names`` that holds a whole number in ``reply`` (never a bool)."""
    if reply is None:
        return None
    for name in names:
        value = reply.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def encode(body: Mapping[str, Any]) -> bytes:
    """A JSON body exactly as sent (and as measured against a size limit): UTF-8, not \\u escapes."""
    return json.dumps(body, ensure_ascii=False).encode("utf-8")
