"""The Feishu (Lark) custom-bot channel: payloads, signing, size splitting, rate limits, retries.

It owns everything specific to one Feishu group bot behind a webhook URL:

* turning a :class:`~gpuwatch.notify.base.Message` into ``text``, ``post`` or ``card`` bodies
  that each carry the bot's keyword and fit the 20 KB body limit (split between blocks into
  numbered parts, never inside a block unless one block alone is too big);
* signing every attempt afresh (``timestamp`` + ``sign``), posting, telling transient failures
  (network, 5xx, 429, code 11232) from permanent ones (a bot setting to fix);
* bounding every post: one total deadline from connect to the last byte of the answer (however
  slowly a server trickles), an answer of at most :data:`MAX_ANSWER_BYTES` (never read whole
  into memory), and an end within about a second of a stop request;
* telling "the post went out but no verdict came back" (a lost answer) apart from a failure:
  the message may have been delivered, so it is not posted again at once;
* keeping one bot under Feishu's 5/s and 100/min limits on the client side.

The webhook token (last path segment of the URL) and the signing secret are secrets: they never
appear in a log line, an error message or a repr; :func:`redact_url` masks the token.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import hmac
import json
import logging
import math
import random
import re
import threading
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http.client import HTTPException
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
import requests.adapters
import urllib3.exceptions
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.poolmanager import PoolManager

from gpuwatch.notify.base import DeliveryError, Message
from gpuwatch.notify.deadline import current_attempt, run_guarded, shutdown_socket

logger = logging.getLogger(__name__)

FORMATS = ("text", "post", "card")

#: Feishu reply codes that no retry can fix: each needs a change to the bot or the config.
PERMANENT_CODES = frozenset({9499, 19001, 19021, 19022, 19024, 19036})
#: "frequency limited": the bot went over 5/s or 100/min (other senders share the budget).
RATE_LIMITED_CODE = 11232
#: Codes that condemn one message, not the bot's settings.
MESSAGE_FAULT_CODES = frozenset({9499, 19036})

_EXPLANATIONS = {
    0: "accepted",
    9499: "bad request: Feishu found the message malformed or too large (the body limit is 20 KB)",
    11232: (
        "rate limited: more than 5 messages per second or 100 per minute reached this bot "
        "(other senders to the same bot share the budget)"
    ),
    19001: "invalid webhook token: the bot was removed or the URL is wrong",
    19021: (
        "signature rejected: the bot's signing secret differs from feishu.secret / $FEISHU_SECRET, "
        "or this machine's clock is off by more than an hour"
    ),
    19022: (
        "IP not allowed: add this machine's public IP address to the bot's IP allow-list "
        "(or remove the allow-list from the bot's security settings)"
    ),
    19024: "keyword missing: set feishu.keyword to one of the bot's keywords",
    19036: "message too large: Feishu refused the body size (the limit is 20 KB); lower feishu.max_body_bytes",
}

_SEVERITY_TEMPLATE = {"firing": "red", "resolved": "green", "info": "blue"}

# Backoff between attempts: base * 2**(attempt-1), capped, with jitter in [50 %, 100 %].
_BACKOFF_BASE_SECONDS = 1.0
_BACKOFF_CAP_SECONDS = 30.0
_RATE_LIMITED_FLOOR_SECONDS = 1.0
_RETRY_AFTER_CAP_SECONDS = 60.0
# The limiter's windows are this much longer than 1 s / 60 s, so that network jitter between
# our clock and Feishu's arrival times cannot squeeze a sixth request into Feishu's second.
_WINDOW_MARGIN_SECONDS = 0.05

# Stand-ins for the fields deliver() adds, at their widest: a 10-digit timestamp (good until
# the year 2286) and a base64 SHA-256 digest (always 44 characters).
_TIMESTAMP_PLACEHOLDER = "9" * 10
_SIGN_PLACEHOLDER = "A" * 44

_CONTINUED = "(continued)"
_MAX_REPLY_MSG_CHARS = 200

#: The most of an answer gpuwatch reads. Feishu's replies are about 100 bytes; anything larger
#: is not a webhook reply, and is never read whole into memory.
MAX_ANSWER_BYTES = 64 * 1024
#: HTTP statuses that say a gateway passed the post on and then lost the answer: it may have
#: been delivered.
_LOST_ANSWER_STATUSES = frozenset({504})
#: After a stop request, how long a post in flight may still take to get its answer.
_STOP_GRACE_SECONDS = 1.0


def explain(code: int) -> str:
    """Plain words for a Feishu reply code: what went wrong and which setting to fix."""
    try:
        return _EXPLANATIONS[code]
    except KeyError:
        return f"Feishu error code {code} (not one gpuwatch knows; see the bot's documentation)"


def sign(secret: str, timestamp: int) -> str:
    """Feishu's webhook signature: base64(HMAC-SHA256(key=f"{timestamp}\\n{secret}", msg=b"")).

    Note the unusual order: the secret is part of the *key* and the message is empty.
    """
    key = f"{timestamp}\n{secret}".encode()
    digest = hmac.new(key, b"", hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def _token_of(url: str) -> str:
    path = urlsplit(url).path
    return path.rstrip("/").rsplit("/", 1)[-1] if path.strip("/") else ""


def redact_url(url: str) -> str:
    """The webhook URL with its token (last path segment) masked, safe for logs and errors.

    ``https://open.feishu.cn/open-apis/bot/v2/hook/ab12cd...`` becomes
    ``https://open.feishu.cn/open-apis/bot/v2/hook/ab12…(masked)``. Short tokens are masked
    whole; user info, query and fragment are dropped (they may hold secrets too).
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    path = parts.path.rstrip("/")
    head, _, token = path.rpartition("/")
    if token:
        shown = token[:4] if len(token) >= 16 else ""
        path = f"{head}/{shown}…(masked)"
    return urlunsplit((parts.scheme, host, path, "", ""))


@dataclass(frozen=True, repr=False)
class FeishuSettings:
    """One Feishu group bot. ``url`` and ``secret`` are secrets: the repr masks them."""

    url: str
    keyword: str | None = None
    secret: str | None = field(default=None, repr=False)  # never in repr or logs
    format: str = "post"  # text | post | card
    mentions: Mapping[str, str] = field(default_factory=dict)  # user name -> open_id (for alerts)
    timeout_seconds: float = 10.0  # the most one post may take: connect, send, and the whole answer
    max_body_bytes: int = 20_000  # Feishu's documented limit is 20 KB: UTF-8 bytes as sent
    per_second: int = 5
    per_minute: int = 100
    max_attempts: int = 5

    def __post_init__(self) -> None:
        if urlsplit(self.url).scheme not in ("http", "https") or not _token_of(self.url):
            raise ValueError("feishu.url: expected https://open.feishu.cn/open-apis/bot/v2/hook/<token>")
        if self.format not in FORMATS:
            raise ValueError(f"feishu.format: expected one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.keyword is not None and not self.keyword.strip():
            raise ValueError("feishu.keyword: must not be empty (leave it out if the bot has no keyword)")
        for name in ("timeout_seconds", "max_body_bytes", "per_second", "per_minute", "max_attempts"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):  # NaN compares false both ways
                raise ValueError(f"feishu.{name}: must be a positive number")

    def __repr__(self) -> str:
        return (
            f"FeishuSettings(url={redact_url(self.url)!r}, keyword={self.keyword!r}, "
            f"secret={'set' if self.secret else 'unset'}, format={self.format!r}, "
            f"mentions={dict(self.mentions)!r}, timeout_seconds={self.timeout_seconds!r}, "
            f"max_body_bytes={self.max_body_bytes!r}, per_second={self.per_second!r}, "
            f"per_minute={self.per_minute!r}, max_attempts={self.max_attempts!r})"
        )


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


class FeishuChannel:
    """Delivers messages to one Feishu group through its custom-bot webhook.

    Implements :class:`gpuwatch.notify.base.Channel`. All I/O comes in as parameters: the HTTP
    session, the wall clock (for signatures), the monotonic clock and sleep (for the rate
    limiter and backoff), and ``stop``, the event that ends a send early (SIGTERM).

    One instance shares its rate limiter between all ``deliver`` calls, from any thread. Every
    post goes out on a fresh connection (so a failure after the body went out always means
    "Feishu may have it", never "a kept-alive connection had gone stale") and is bounded by
    ``timeout_seconds`` in total (see :mod:`gpuwatch.notify.deadline`); the channel mounts its
    own transport adapter on the session for the webhook's origin to do that.

    Delivery is at-least-once, with the doubt made explicit: when the post went out in full and
    no verdict came back (no answer in time, the connection cut, an answer too large, a 504
    from a gateway, or a stop before the answer), ``deliver`` raises at once with
    ``DeliveryError.maybe_delivered`` set instead of posting again; whoever sends it again
    later (the outbox, after a longer wait) may make the group see it twice.
    """

    name = "feishu"

    def __init__(
        self,
        settings: FeishuSettings,
        *,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        """``sleep`` defaults to ``stop.wait`` when ``stop`` is given (a stop cuts backoff
        short), else ``time.sleep``."""
        self._settings = settings
        self._own_session = session is None
        self._session = session if session is not None else requests.Session()
        self._session.mount(_origin(settings.url), _GuardedAdapter())
        self._clock = clock
        self._stop = stop
        if sleep is None:
            sleep = _waiter(stop) if stop is not None else time.sleep
        self._sleep = sleep
        self._limiter = RateLimiter(
            settings.per_second, settings.per_minute, monotonic=monotonic, sleep=self._sleep, stop=stop
        )
        self._where = redact_url(settings.url)
        self._secrets = tuple(s for s in (_token_of(settings.url), settings.secret) if s)

    def __repr__(self) -> str:
        return f"FeishuChannel({self._where}, format={self._settings.format!r})"

    def close(self) -> None:
        """Close the HTTP session if this channel created it."""
        if self._own_session:
            self._session.close()

    # ------------------------------------------------------------------ prepare

    def prepare(self, message: Message) -> list[dict[str, Any]]:
        """Unsigned payloads for ``message``, in order; each fits ``max_body_bytes`` once signed.

        Blocks stay whole; a message too big for one body is split between blocks into parts
        numbered ``(1/3)``, ``(2/3)``, ... in the title. Only a block too big on its own is cut,
        at line boundaries (a single overlong line at character boundaries), its later pieces
        starting with "(continued)". Mentions go into the first part only. Every part carries
        the keyword: when the title and the part's blocks lack it, the title is prefixed with
        ``【keyword】``.
        """
        keyword = self._settings.keyword
        mentions = tuple(message.mentions)
        severity = message.severity
        marker = f"【{keyword}】" if keyword and keyword not in message.title else ""
        title = self._fit_title(marker + message.title, mentions, severity)

        parts = self._split(title, list(message.blocks), mentions, severity)
        if keyword and marker and all(any(keyword in b for b in part) for part in parts):
            # Every part already carries the keyword in its text: keep the title as written.
            # (Dropping the prefix only shrinks the bodies, so the split still holds.)
            title = title.removeprefix(marker)
        total = len(parts)
        payloads = []
        for index, part in enumerate(parts, start=1):
            part_title = title if total == 1 else f"{title} ({index}/{total})"
            body = self._render(part_title, part, mentions if index == 1 else (), severity)
            size = self._signed_size(body)
            if size > self._settings.max_body_bytes:  # pragma: no cover - the split guarantees it
                raise AssertionError(f"feishu part {index}/{total} is {size} bytes")
            payloads.append(body)
        return payloads

    def _signed_size(self, body: Mapping[str, Any]) -> int:
        if self._settings.secret:
            body = {"timestamp": _TIMESTAMP_PLACEHOLDER, "sign": _SIGN_PLACEHOLDER, **body}
        return len(_encode(body))

    def _fits(
        self, title: str, blocks: Sequence[str], mentions: Sequence[str], severity: str, budget: int | None = None
    ) -> bool:
        body = self._render(title, blocks, mentions, severity)
        return self._signed_size(body) <= (self._settings.max_body_bytes if budget is None else budget)

    def _fit_title(self, title: str, mentions: Sequence[str], severity: str) -> str:
        """Shorten an absurdly long title: title and mentions may take at most half a body."""
        budget = self._settings.max_body_bytes // 2
        if self._fits(f"{title} (999/999)", [], mentions, severity, budget):
            return title

        def shortened_fits(n: int) -> bool:
            return self._fits(f"{title[:n]}… (999/999)", [], mentions, severity, budget)

        keep = _largest(len(title), shortened_fits)
        if keep == 0:
            raise ValueError(
                f"feishu.max_body_bytes={self._settings.max_body_bytes} cannot hold the message "
                "skeleton (title and mentions) in half a body"
            )
        logger.warning("feishu: a title of %d characters was shortened to %d", len(title), keep)
        return title[:keep] + "…"

    def _split(self, title: str, blocks: list[str], mentions: tuple[str, ...], severity: str) -> list[list[str]]:
        if self._fits(title, blocks, mentions, severity):
            return [blocks]
        # Reserve room for the " (i/n)" suffix; widen it if the count needs more digits.
        digits = 1
        while True:
            parts = self._pack(title, blocks, mentions, severity, digits)
            if len(parts) < 10**digits:
                return parts
            digits += 1

    def _pack(
        self, title: str, blocks: list[str], mentions: tuple[str, ...], severity: str, digits: int
    ) -> list[list[str]]:
        worst_title = f"{title} ({'9' * digits}/{'9' * digits})"

        def fits_alone(block: str) -> bool:
            # Worst case: the block alone in the first part, which also carries the mentions.
            return self._fits(worst_title, [block], mentions, severity)

        pieces: list[str] = []
        for block in blocks:
            if fits_alone(block):
                pieces.append(block)
            else:
                cut = _cut_block(block, fits_alone)
                logger.debug("feishu: one block of %d characters cut into %d pieces", len(block), len(cut))
                pieces.extend(cut)

        # Greedy: each part takes as many pieces as fit (found by galloping, so a long report
        # costs O(parts * log(blocks)) renders of at most about two bodies' size).
        parts: list[list[str]] = []
        start = 0
        while start < len(pieces):
            rest = pieces[start:]
            part_mentions = mentions if not parts else ()

            def fits_first(count: int, rest: list[str] = rest, part_mentions: Sequence[str] = part_mentions) -> bool:
                return self._fits(worst_title, rest[:count], part_mentions, severity)

            count = max(1, _largest(len(rest), fits_first))  # every piece fits alone
            parts.append(rest[:count])
            start += count
        return parts or [[]]

    def _render(self, title: str, blocks: Sequence[str], mentions: Sequence[str], severity: str) -> dict[str, Any]:
        fmt = self._settings.format
        if fmt == "text":
            head = title
            if mentions:
                head += "\n" + " ".join(f'<at user_id="{m}"></at>' for m in mentions)
            return {"msg_type": "text", "content": {"text": "\n\n".join((head, *blocks))}}
        if fmt == "post":
            paragraphs: list[list[dict[str, str]]] = []
            if mentions:
                paragraphs.append([{"tag": "at", "user_id": m} for m in mentions])
            paragraphs.extend([{"tag": "text", "text": block}] for block in blocks)
            return {"msg_type": "post", "content": {"post": {"zh_cn": {"title": title, "content": paragraphs}}}}
        elements: list[dict[str, Any]] = []
        if mentions:
            ats = " ".join(f"<at id={m}></at>" for m in mentions)
            elements.append({"tag": "div", "text": {"tag": "lark_md", "content": ats}})
        elements.extend({"tag": "div", "text": {"tag": "lark_md", "content": block}} for block in blocks)
        card = {
            "config": {"wide_screen_mode": True},
            "header": {
                "title": {"tag": "plain_text", "content": title},
                "template": _SEVERITY_TEMPLATE.get(severity, "blue"),
            },
            "elements": elements,
        }
        return {"msg_type": "interactive", "card": card}

    # ------------------------------------------------------------------ describe

    def describe(self, payload: dict[str, Any]) -> str:
        """The payload as a person reads it: title, then blocks separated by blank lines."""
        msg_type = payload.get("msg_type")
        if msg_type == "text":
            return _at_names(str(payload["content"]["text"]))
        if msg_type == "post":
            post = payload["content"]["post"]
            lang = post.get("zh_cn") or next(iter(post.values()))
            paragraphs = ["".join(_tag_text(tag) for tag in para) for para in lang.get("content", [])]
            return "\n\n".join((str(lang.get("title", "")), *paragraphs))
        if msg_type == "interactive":
            card = payload["card"]
            texts = [str(card.get("header", {}).get("title", {}).get("content", ""))]
            for element in card.get("elements", []):
                text = element.get("text", {}).get("content") if element.get("tag") == "div" else element.get("content")
                if isinstance(text, str):
                    texts.append(_at_names(text))
            return "\n\n".join(texts)
        return json.dumps(payload, ensure_ascii=False, indent=2)

    # ------------------------------------------------------------------ deliver

    def deliver(self, payload: dict[str, Any]) -> None:
        """Sign and post one payload; retry transient failures; raise DeliveryError when not accepted.

        Every attempt waits for the rate limiter and is signed afresh (new timestamp and sign).
        A post that may have been delivered is never retried here (``maybe_delivered``), and
        nothing is posted once ``stop`` is set.
        """
        payload = self._with_keyword(payload)
        attempts = self._settings.max_attempts
        last_reason = "no attempt made"
        last_code: int | None = None
        for attempt in range(1, attempts + 1):
            self._check_stop(attempt)
            self._limiter.acquire()
            self._check_stop(attempt)
            outcome = self._attempt(payload)
            if outcome is None:
                logger.debug("feishu %s: %s accepted (attempt %d)", self._where, payload.get("msg_type"), attempt)
                return
            last_reason, last_code, floor = outcome
            if attempt == attempts:
                break
            delay = max(_backoff(attempt), floor)
            logger.warning(
                "feishu %s: attempt %d/%d failed (%s); retrying in %.1f s",
                self._where,
                attempt,
                attempts,
                last_reason,
                delay,
            )
            self._sleep(delay)
        raise DeliveryError(
            f"feishu {self._where}: not accepted after {attempts} attempts; last: {last_reason}",
            permanent=False,
            code=last_code,
        )

    def _check_stop(self, attempt: int) -> None:
        if self._stop is not None and self._stop.is_set():
            tried = f" after {attempt - 1} failed attempts" if attempt > 1 else ""
            raise DeliveryError(f"feishu {self._where}: not sent{tried}: gpuwatch is stopping", permanent=False)

    def _attempt(self, payload: Mapping[str, Any]) -> tuple[str, int | None, float] | None:
        """One signed POST. None when accepted; (reason, code, minimum delay) when transient.

        Raises DeliveryError(permanent=True) for failures that no retry can fix, and
        DeliveryError(maybe_delivered=True) when the post went out but no verdict came back.
        """
        data = _encode(self._signed(payload))
        timeout = self._settings.timeout_seconds
        outcome = run_guarded(
            lambda: self._post(data),
            deadline_seconds=timeout,
            stop=self._stop,
            stop_grace_seconds=_STOP_GRACE_SECONDS,
            name="feishu-post",
        )
        if outcome.abandoned is not None:
            if outcome.sent:
                why = (
                    "gpuwatch is stopping and Feishu had not answered yet"
                    if outcome.abandoned == "stopped"
                    else f"Feishu did not answer within {timeout:g} s"
                )
                raise self._maybe_delivered(why)
            if outcome.abandoned == "stopped":
                raise DeliveryError(f"feishu {self._where}: not sent: gpuwatch is stopping", permanent=False)
            return f"network error: could not connect and send within {timeout:g} s", None, 0.0
        error = outcome.error
        if isinstance(error, _UnreadableAnswer):
            raise self._maybe_delivered(f"Feishu answered HTTP 200, but {error}", permanent=True)
        if error is not None and _is_network_error(error):
            reason = self._scrub(_network_reason(error, timeout))
            if outcome.sent:
                raise self._maybe_delivered(f"the answer was lost ({reason})")
            return f"network error: {reason}", None, 0.0
        if isinstance(error, requests.RequestException):
            raise DeliveryError(
                f"feishu {self._where}: request could not be made: {type(error).__name__}: {self._scrub(str(error))}",
                permanent=True,
            ) from None
        if error is not None:
            raise error
        answer = outcome.value
        assert answer is not None

        status = answer.status
        if status == 429:
            floor = max(_RATE_LIMITED_FLOOR_SECONDS, _retry_after(answer.retry_after))
            return "HTTP 429 Too Many Requests", None, floor
        if status in _LOST_ANSWER_STATUSES:
            raise self._maybe_delivered(f"a gateway answered HTTP {status} {self._scrub(answer.reason)}".rstrip())
        if 500 <= status <= 599:
            return f"HTTP {status} {self._scrub(answer.reason)}".rstrip(), None, 0.0
        if status != 200:
            raise DeliveryError(
                f"feishu {self._where}: HTTP {status} {self._scrub(answer.reason)}: "
                "not a Feishu bot webhook reply (check feishu.url)",
                permanent=True,
            )
        try:
            reply = json.loads(answer.body)
        except ValueError:
            reply = None
        code = _reply_code(reply)
        if code is None:
            snippet = self._scrub(answer.body[: _MAX_REPLY_MSG_CHARS * 4].decode("utf-8", "replace"))
            raise DeliveryError(
                f"feishu {self._where}: reply is not a Feishu JSON answer (check feishu.url): "
                f"{snippet[:_MAX_REPLY_MSG_CHARS]!r}",
                permanent=True,
            )
        if code == 0:
            return None
        assert isinstance(reply, dict)
        server_msg = self._scrub(str(reply.get("msg") or reply.get("StatusMessage") or ""))[:_MAX_REPLY_MSG_CHARS]
        reason = f"{explain(code)} (code {code}: {server_msg!r})"
        if code == RATE_LIMITED_CODE:
            return reason, code, _RATE_LIMITED_FLOOR_SECONDS
        raise DeliveryError(
            f"feishu {self._where}: {reason}",
            permanent=True,
            code=code,
            # malformed or too large: this message can never pass, the next ones still can
            message_fault=code in MESSAGE_FAULT_CODES,
        )

    def _post(self, data: bytes) -> _Answer:
        """The HTTP exchange itself (runs in a :func:`run_guarded` worker): post, read a bounded answer."""
        timeout = self._settings.timeout_seconds
        response = self._session.post(
            self._settings.url,
            data=data,
            headers={
                "Content-Type": "application/json; charset=utf-8",
                "Connection": "close",  # a fresh connection per post (see the class docstring)
                "Accept-Encoding": "identity",  # the answer's size as sent is its size in memory
            },
            timeout=(timeout, timeout),  # per socket operation; run_guarded bounds the total
            allow_redirects=False,
            stream=True,  # the body is read here, bounded, not by requests
        )
        try:
            body = _read_answer(response) if response.status_code == 200 else b""
            return _Answer(response.status_code, response.reason or "", response.headers.get("Retry-After"), body)
        finally:
            response.close()

    def _maybe_delivered(self, why: str, *, permanent: bool = False) -> DeliveryError:
        return DeliveryError(
            f"feishu {self._where}: {why}; the message may have been delivered, so it is not posted "
            "again now (a duplicate is possible when it is)",
            permanent=permanent,
            maybe_delivered=True,
        )

    def _with_keyword(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The payload carrying ``feishu.keyword`` as it is now.

        A payload kept in the outbox was prepared with the config of its day: one queued before
        the keyword was set (or changed) after Feishu refused it with 19024 would be refused
        again forever, and hold back every later message. Such a payload gets the keyword
        prefixed to its title, as :meth:`prepare` does.
        """
        keyword = self._settings.keyword
        if not keyword or any(keyword in text for text in _text_values(payload)):
            return payload
        marker = f"【{keyword}】"
        body: dict[str, Any] = json.loads(json.dumps(payload))  # a deep copy: the stored payload stays as it is
        msg_type = body.get("msg_type")
        if msg_type == "text" and isinstance(body.get("content"), dict):
            body["content"]["text"] = marker + str(body["content"].get("text", ""))
        elif msg_type == "post" and isinstance(body.get("content"), dict):
            for lang in body["content"].get("post", {}).values():
                lang["title"] = marker + str(lang.get("title", ""))
        elif msg_type == "interactive" and isinstance(body.get("card"), dict):
            title = body["card"].setdefault("header", {}).setdefault("title", {"tag": "plain_text", "content": ""})
            title["content"] = marker + str(title.get("content", ""))
        return body

    def _signed(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        # Drop any stale signature (a payload kept in an outbox) before adding a fresh one.
        body = {k: v for k, v in payload.items() if k not in ("timestamp", "sign")}
        secret = self._settings.secret
        if not secret:
            return body
        timestamp = int(self._clock())
        return {"timestamp": str(timestamp), "sign": sign(secret, timestamp), **body}

    def _scrub(self, text: str) -> str:
        """Mask the token and the secret wherever a library echoed them (e.g. in an URL)."""
        for secret in self._secrets:
            if len(secret) >= 4:  # masking a 1-3 character "secret" would garble every word holding it
                text = text.replace(secret, "…(masked)")
        return text


# ---------------------------------------------------------------------- the bounded HTTP exchange


@dataclass(frozen=True)
class _Answer:
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
        return isinstance(
            exc, (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)
        )
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


def _waiter(stop: threading.Event) -> Callable[[float], None]:
    """A sleep that a stop request cuts short."""

    def sleep(seconds: float) -> None:
        stop.wait(seconds)

    return sleep


def _origin(url: str) -> str:
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


def _encode(body: Mapping[str, Any]) -> bytes:
    """The body exactly as sent (and as measured against the size limit)."""
    return json.dumps(body, ensure_ascii=False).encode("utf-8")


def _text_values(value: object, key: str | None = None) -> list[str]:
    """The strings where Feishu looks for a keyword: text, title and content values (never an href)."""
    if isinstance(value, str):
        return [value] if key in ("text", "title", "content") else []
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in _text_values(v, k)]
    if isinstance(value, list):
        return [s for item in value for s in _text_values(item, key)]
    return []


def _reply_code(reply: object) -> int | None:
    """Feishu's ``code`` (new replies) or ``StatusCode`` (old replies); None if there is neither."""
    if not isinstance(reply, dict):
        return None
    code = reply.get("code")
    if code is None:
        code = reply.get("StatusCode")
    if isinstance(code, bool) or not isinstance(code, int):
        return None
    return code


def _retry_after(header: str | None) -> float:
    try:
        seconds = float(header or 0)
    except ValueError:
        return 0.0
    if seconds != seconds:  # NaN
        return 0.0
    return min(max(seconds, 0.0), _RETRY_AFTER_CAP_SECONDS)


def _backoff(attempt: int) -> float:
    """Exponential backoff with jitter: 50-100 % of base * 2**(attempt-1), capped."""
    ceiling = min(_BACKOFF_CAP_SECONDS, _BACKOFF_BASE_SECONDS * 2.0 ** (attempt - 1))
    return ceiling * (0.5 + random.random() / 2)


def _largest(limit: int, fits: Callable[[int], bool]) -> int:
    """The largest n in [0, limit] with fits(n), for a fits() that stays false once false.

    Gallops 1, 2, 4, ... then bisects, so it never tries much more than the answer.
    """
    if limit <= 0 or not fits(1):
        return 0
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit + 1)  # fits(low) holds; fits(high) fails or high is past the limit
    while high - low > 1:
        mid = (low + high) // 2
        if fits(mid):
            low = mid
        else:
            high = mid
    return low


def _cut_block(block: str, fits_alone: Callable[[str], bool]) -> list[str]:
    """Cut a block that cannot fit any body into pieces that each can: the last resort.

    Cuts at line boundaries; a single line too long for a body is cut between characters
    (Python strings index code points, so no UTF-8 sequence is ever split). Pieces after the
    first start with "(continued)".
    """
    lines = block.split("\n")
    pieces: list[str] = []

    def piece(chunk: Sequence[str], index: int) -> str:
        text = "\n".join(chunk)
        return f"{_CONTINUED}\n{text}" if index else text

    start = 0
    while start < len(lines):
        index = len(pieces)
        rest = lines[start:]

        def lines_fit(n: int, rest: list[str] = rest, index: int = index) -> bool:
            return fits_alone(piece(rest[:n], index))

        count = _largest(len(rest), lines_fit)
        if count:
            pieces.append(piece(rest[:count], index))
            start += count
            continue
        line = lines[start]  # one line too long on its own

        def chars_fit(n: int, line: str = line, index: int = index) -> bool:
            return fits_alone(piece([line[:n]], index))

        keep = _largest(len(line), chars_fit)
        if keep == 0:
            raise ValueError("feishu.max_body_bytes is too small to hold a single character of a block")
        pieces.append(piece([line[:keep]], index))
        lines[start] = line[keep:]
    return pieces


_AT_CARD = re.compile(r"<at id=([^>]*)></at>")
_AT_TEXT = re.compile(r'<at user_id="([^"]*)">([^<]*)</at>')


def _at_names(text: str) -> str:
    text = _AT_CARD.sub(lambda m: f"@{m.group(1)}", text)
    return _AT_TEXT.sub(lambda m: f"@{m.group(2) or m.group(1)}", text)


def _tag_text(tag: Mapping[str, Any]) -> str:
    if tag.get("tag") == "at":
        return f"@{tag.get('user_name') or tag.get('user_id', '')}"
    if tag.get("tag") == "a":
        return f"{tag.get('text', '')} <{tag.get('href', '')}>"
    return str(tag.get("text", ""))
