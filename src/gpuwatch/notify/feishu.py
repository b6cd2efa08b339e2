"""The Feishu (Lark) custom-bot channel: its messages (text, post, a designed card), signing, its answers.

It owns what is specific to one Feishu group bot behind a webhook URL; the delivery itself (one
bounded post, retries, the rate limiter, "maybe delivered") is :mod:`gpuwatch.notify.http`'s:

* turning a :class:`~gpuwatch.notify.base.Message` into ``text``, ``post`` or ``card`` bodies
  that each carry the bot's keyword and fit the 20 KB body limit (split between blocks into
  numbered parts, never inside a block unless one block alone is too big; see
  :mod:`gpuwatch.notify.split`). A message with structure becomes a designed card
  (:mod:`gpuwatch.notify.feishu_card`), split between its sections;
* signing every attempt afresh (``timestamp`` + ``sign``), and telling Feishu's answers apart:
  accepted (``code 0``), rate limited (11232, tried again), or refused for a reason a person must
  fix (a bot setting, said in plain words by :func:`explain`).

The webhook token (last path segment of the URL) and the signing secret are secrets: they never
appear in a log line, an error message or a repr; :func:`redact_url` masks the token.

Its config is :class:`FeishuSettings` (``feishu:``: ``url`` or ``url_env``, ``secret`` or
``secret_env``, keyword, format, mentions), read and checked once when the config is read, with
the limits the sender keeps (Feishu's, :data:`LIMITS`); :func:`build` only resolves the secrets
from the environment.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gpuwatch.config.values import ConfigError, check_keys, choice, from_env, mapping, string
from gpuwatch.message import Message, Section
from gpuwatch.notify import feishu_card, http, masking
from gpuwatch.notify.http import RateLimiter, Request, Retry, encode, int_field, json_reply
from gpuwatch.notify.markup import cut_section, feishu_text
from gpuwatch.notify.masking import present
from gpuwatch.notify.spec import (
    ChannelSpec,
    Limits,
    Transport,
    UrlSettings,
    env_secret,
    settings_of,
    url_and_mentions,
    url_secret_values,
)
from gpuwatch.notify.split import cut_text, numbered, split

__all__ = ["FORMATS", "FeishuChannel", "FeishuSettings", "RateLimiter", "explain", "redact_url", "sign"]

logger = logging.getLogger(__name__)

FORMATS = ("text", "post", "card")
KEYS = ("url", "url_env", "keyword", "secret", "secret_env", "format", "mentions")
MAX_BODY_BYTES = 20_000  # Feishu's documented limit is 20 KB
PER_SECOND = 5
PER_MINUTE = 100
LIMITS = Limits(
    max_body_bytes=MAX_BODY_BYTES,
    per_second=PER_SECOND,
    per_minute=PER_MINUTE,
    measured="request body, signature fields included",
    other="a card holds at most 200 components",
)
_URL_SHAPE = "https://open.feishu.cn/open-apis/bot/v2/hook/<token>"


def token_of(url: str) -> str:
    """The bot's token: the URL's last path segment."""
    path = urlsplit(url).path
    return path.rstrip("/").rsplit("/", 1)[-1] if path.strip("/") else ""


def redact_url(url: str) -> str:
    """The webhook URL with its token (last path segment) masked, safe for logs and errors.

    ``https://open.feishu.cn/open-apis/bot/v2/hook/ab12cd...`` becomes
    ``https://open.feishu.cn/open-apis/bot/v2/hook/ab12…(masked)``. Short tokens are masked
    whole; user info, query and fragment are dropped (they may hold secrets too).
    """
    return masking.redact_url(url, query=False)


def _webhook_url(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.hostname) and bool(parts.path.strip("/"))


@dataclass(frozen=True, repr=False)
class FeishuSettings(UrlSettings):
    """One Feishu group bot. ``url`` (its token) and ``secret`` are secrets: the repr masks them."""

    SECTION = "feishu"
    URL_SHAPE = _URL_SHAPE

    keyword: str | None = None
    secret: str | None = field(default=None, repr=False)  # never in repr or logs
    secret_env: str | None = None
    format: str = "post"  # text | post | card
    mentions: Mapping[str, str] = field(default_factory=dict)  # user name -> open_id (for alerts)
    max_body_bytes: int = MAX_BODY_BYTES  # UTF-8 bytes as sent, signature fields included
    per_second: int | None = PER_SECOND
    per_minute: int | None = PER_MINUTE

    def url_fits(self, url: str) -> bool:
        return urlsplit(url).scheme in ("http", "https") and bool(token_of(url))

    def check(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"feishu.format: expected one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.keyword is not None and not self.keyword.strip():
            raise ValueError("feishu.keyword: must not be empty (leave it out if the bot has no keyword)")

    def redact(self, url: str) -> str:
        return redact_url(url)

    def __repr__(self) -> str:
        return (
            f"FeishuSettings(url={redact_url(self.url) if self.url else None!r}, keyword={self.keyword!r}, "
            f"secret={'set' if self.secret else 'unset'}, format={self.format!r}, "
            f"mentions={dict(self.mentions)!r}, timeout_seconds={self.timeout_seconds!r}, "
            f"max_body_bytes={self.max_body_bytes!r}, per_second={self.per_second!r}, "
            f"per_minute={self.per_minute!r}, max_attempts={self.max_attempts!r})"
        )

    def resolve_secret(self, environ: Mapping[str, str] | None = None) -> str | None:
        return from_env(self.secret_env, self.secret, environ)

    def own_secrets(self) -> list[str]:
        return present(self.resolve_secret())

    def resolved_extra(self, environ: Mapping[str, str] | None) -> dict[str, Any]:
        url = self.resolve_url(environ)
        if self.url_env and url != self.url and not _webhook_url(url or ""):  # the file's url was checked when read
            raise ConfigError(f"feishu.url_env: ${self.url_env} does not hold a webhook URL (expected {_URL_SHAPE})")
        return {"secret": env_secret(self.resolve_secret(environ), self.secret_env, "feishu.secret_env")}


def parse(raw: object, base: Path) -> FeishuSettings:
    """``feishu:`` -> :class:`FeishuSettings` (ConfigError naming the key path)."""
    section = mapping(raw, "feishu")
    check_keys(section, KEYS, "feishu")
    values: dict[str, Any] = {}
    for key in ("keyword", "secret", "secret_env"):
        if section.get(key) is not None:
            values[key] = string(section[key], f"feishu.{key}")
    if "format" in section:
        values["format"] = choice(section["format"], "feishu.format", FORMATS)
    values.update(url_and_mentions(section, "feishu", "the bot's webhook"))
    return settings_of(lambda: FeishuSettings(**values))


def describe(settings: FeishuSettings) -> str:
    """What ``check`` says of the bot: signed or not, its keyword, its format."""
    signed = "signed" if settings.resolve_secret() else "not signed"
    keyword = f"keyword {settings.keyword!r}" if settings.keyword else "no keyword"
    return f"{signed}, {keyword}, format {settings.format}"


# ---------------------------------------------------------------- the sender


#: Feishu reply codes that no retry can fix: each needs a change to the bot or the config.
PERMANENT_CODES = frozenset({9499, 11246, 19001, 19021, 19022, 19024, 19036})
#: "frequency limited": the bot went over 5/s or 100/min (other senders share the budget).
RATE_LIMITED_CODE = 11232
#: Codes that condemn one message, not the bot's settings.
MESSAGE_FAULT_CODES = frozenset({9499, 11246, 19036})

_EXPLANATIONS = {
    0: "accepted",
    9499: "bad request: Feishu found the message malformed or too large (the body limit is 20 KB)",
    11232: (
        "rate limited: more than 5 messages per second or 100 per minute reached this bot "
        "(other senders to the same bot share the budget)"
    ),
    11246: (
        "card refused: Feishu found the card's content invalid (its reply says where); this message "
        "cannot be sent as a card, later ones still can (format: post avoids cards)"
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

_RATE_LIMITED_FLOOR_SECONDS = 1.0
# Stand-ins for the fields deliver() adds, at their widest: a 10-digit timestamp (good until
# the year 2286) and a base64 SHA-256 digest (always 44 characters).
_TIMESTAMP_PLACEHOLDER = "9" * 10
_SIGN_PLACEHOLDER = "A" * 44
_MAX_REPLY_MSG_CHARS = 200


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


class FeishuChannel(http.WebhookChannel[FeishuSettings]):
    """Delivers messages to one Feishu group through its custom-bot webhook.

    Implements :class:`gpuwatch.notify.base.Channel`; delivery, with its deadline, doubt and
    retries, is :class:`gpuwatch.notify.http.WebhookChannel`'s. All I/O comes in as parameters:
    the HTTP session, the wall clock (for signatures), the monotonic clock and sleep (for the
    rate limiter and backoff), and ``stop``, the event that ends a send early (SIGTERM).
    """

    name = "feishu"
    service = "Feishu"
    rate_limited_floor = _RATE_LIMITED_FLOOR_SECONDS

    def __repr__(self) -> str:
        return f"FeishuChannel({self._where}, format={self._settings.format!r})"

    # ------------------------------------------------------------------ prepare

    def prepare(self, message: Message) -> list[dict[str, Any]]:
        """Unsigned payloads for ``message``, in order; each fits ``max_body_bytes`` once signed.

        Blocks (or, for a designed card, sections) stay whole; a message too big for one body is
        split between them into parts numbered ``(1/3)``, ``(2/3)``, ... in the title. Only a
        block too big on its own is cut, at line boundaries (a single overlong line at character
        boundaries), its later pieces starting with "(continued)"; a section, between its rows.
        Mentions go into the first part only. Every part carries the keyword: when the title and
        the part's text lack it, the title is prefixed with ``【keyword】``.
        """
        keyword = self._settings.keyword
        mentions = tuple(message.mentions)
        marker = f"【{keyword}】" if keyword and keyword not in message.title else ""
        designed = self._settings.format == "card" and message.body is not None
        units: Sequence[Any] = message.body.sections if designed and message.body else message.blocks
        limit = self._settings.max_body_bytes

        def render(title: str, part: Sequence[Any], first: bool) -> dict[str, Any]:
            return self._render(title, part, mentions if first else (), message)

        def size(title: str, part: Sequence[Any], first: bool) -> int:
            body = render(title, part, first)
            if body["msg_type"] == "interactive" and feishu_card.components(body["card"]) > feishu_card.MAX_COMPONENTS:
                return limit + 1
            return self._signed_size(body)

        cut: Callable[[Any, Callable[[Any], bool]], list[Any]] = cut_section if designed else cut_text
        title, parts = split(
            marker + message.title, units, size=size, limit=limit, cut=cut, what="feishu.max_body_bytes"
        )
        total = len(parts)
        bodies = [render(numbered(title, i, total), part, i == 1) for i, part in enumerate(parts, start=1)]
        if keyword and marker:
            # Every part already carries the keyword in its text: keep the title as written.
            # (Dropping the prefix only shrinks the bodies, so the split still holds.)
            plain = title.removeprefix(marker)
            unmarked = [render(numbered(plain, i, total), part, i == 1) for i, part in enumerate(parts, start=1)]
            if all(any(keyword in text for text in _text_values(body)) for body in unmarked):
                bodies = unmarked
        for index, body in enumerate(bodies, start=1):
            if self._signed_size(body) > limit:  # pragma: no cover - the split guarantees it
                raise AssertionError(f"feishu part {index}/{total} is {self._signed_size(body)} bytes")
        return bodies

    def _signed_size(self, body: Mapping[str, Any]) -> int:
        if self._settings.secret:
            body = {"timestamp": _TIMESTAMP_PLACEHOLDER, "sign": _SIGN_PLACEHOLDER, **body}
        return len(encode(body))

    def _render(self, title: str, part: Sequence[Any], mentions: Sequence[str], message: Message) -> dict[str, Any]:
        fmt = self._settings.format
        if fmt == "card":
            if message.body is not None:
                sections: Sequence[Section] = part
                card = feishu_card.designed(title, message.body, sections, mentions, message.link)
            else:
                card = feishu_card.plain(title, part, mentions, message.severity, message.link)
            return {"msg_type": "interactive", "card": card}
        blocks: Sequence[str] = part
        if fmt == "text":
            head = feishu_text(title)
            if mentions:
                head += "\n" + " ".join(f'<at user_id="{m}"></at>' for m in mentions)
            text = "\n\n".join((head, *(feishu_text(b) for b in blocks)))
            if message.link:
                text += f"\n\n{message.link}"
            return {"msg_type": "text", "content": {"text": text}}
        paragraphs: list[list[dict[str, str]]] = []
        if mentions:
            paragraphs.append([{"tag": "at", "user_id": m} for m in mentions])
        paragraphs.extend([{"tag": "text", "text": feishu_text(block)}] for block in blocks)
        if message.link:
            paragraphs.append([{"tag": "a", "text": feishu_card.BUTTON_TEXT, "href": message.link}])
        post = {"title": feishu_text(title), "content": paragraphs}
        return {"msg_type": "post", "content": {"post": {"zh_cn": post}}}

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
            if card.get("schema") == "2.0":
                return "\n\n".join(_readable(text) for text in feishu_card.texts(card))
            texts = [str(card.get("header", {}).get("title", {}).get("content", ""))]
            for element in card.get("elements", []):
                text = element.get("text", {}).get("content") if element.get("tag") == "div" else element.get("content")
                if isinstance(text, str):
                    texts.append(_at_names(text))
            return "\n\n".join(texts)
        return json.dumps(payload, ensure_ascii=False, indent=2)

    # ------------------------------------------------------------------ deliver (see http.WebhookChannel)

    def _before_delivery(self, payload: dict[str, Any]) -> dict[str, Any]:
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

    def _request(self, payload: Mapping[str, Any]) -> Request:
        return Request(self._url, encode(self._signed(payload)))

    def _signed(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        # Drop any stale signature (a payload kept in an outbox) before adding a fresh one.
        body = {k: v for k, v in payload.items() if k not in ("timestamp", "sign")}
        secret = self._settings.secret
        if not secret:
            return body
        timestamp = int(self._clock())
        return {"timestamp": str(timestamp), "sign": sign(secret, timestamp), **body}

    def _judge(self, answer: http.Answer) -> Retry | None:
        if answer.status != 200:
            raise self._refused(
                f"HTTP {answer.status} {self._scrub(answer.reason)}: not a Feishu bot webhook reply (check feishu.url)"
            )
        reply = json_reply(answer)
        code = int_field(reply, "code", "StatusCode") if reply is not None and "code" in reply else None
        if code is None:
            code = int_field(reply, "StatusCode")  # old replies have only StatusCode
        if code is None:
            raise self._refused(f"reply is not a Feishu JSON answer (check feishu.url): {self.snippet(answer)!r}")
        if code == 0:
            return None
        assert reply is not None
        server_msg = self._scrub(str(reply.get("msg") or reply.get("StatusMessage") or ""))[:_MAX_REPLY_MSG_CHARS]
        reason = f"{explain(code)} (code {code}: {server_msg!r})"
        if code == RATE_LIMITED_CODE:
            return Retry(reason, code, _RATE_LIMITED_FLOOR_SECONDS)
        # malformed or too large: this message can never pass, the next ones still can
        raise self._refused(reason, code=code, message_fault=code in MESSAGE_FAULT_CODES)


# ---------------------------------------------------------------------- helpers


_TAGS = re.compile(r"</?(?:font|text_tag)[^>]*>")


def _readable(markdown: str) -> str:
    """Card markdown as a person reads it (for --dry-run): mentions by id, tags and bold gone,
    character references decoded."""
    text = _at_names(markdown).replace("<br>", "\n")
    text = _TAGS.sub("", text).replace("**", "")
    return html.unescape(text)


def _text_values(value: object, key: str | None = None) -> list[str]:
    """The strings where Feishu looks for a keyword: text, title and content values (never an href)."""
    if isinstance(value, str):
        return [value] if key in ("text", "title", "content") else []
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in _text_values(v, k)]
    if isinstance(value, list):
        return [s for item in value for s in _text_values(item, key)]
    return []


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


def build(settings: FeishuSettings, transport: Transport) -> FeishuChannel:
    """The channel for ``feishu:``: its URL and secret resolved from the environment now."""
    return FeishuChannel(settings.resolved(transport.environ), sleep=transport.sleep, stop=transport.stop)


SPEC = ChannelSpec(
    name="feishu",
    parse=parse,
    sender=build,
    secrets=url_secret_values,
    inline_secrets=("secret", "url"),
    describe=describe,
    carries_reports=True,
    limits=LIMITS,
    mentions=lambda settings: settings.mentions,
)
