"""The DingTalk (钉钉) custom-robot channel: markdown messages, signing, its answers.

One group robot behind ``https://oapi.dingtalk.com/robot/send?access_token=...``:

* a :class:`~gpuwatch.notify.base.Message` becomes ``markdown`` bodies of at most 20,000 bytes
  (DingTalk's limit, UTF-8 bytes as sent), split between hosts or alerts into numbered parts;
  every value from a host is escaped (:func:`gpuwatch.notify.markup.markdown`); each carries the
  robot's keyword; mentions go in ``at.atMobiles`` / ``at.atUserIds`` (and as ``@id`` in the
  text, where DingTalk wants them), never ``isAtAll``;
* with signing (加签) on, every attempt carries a fresh millisecond ``timestamp`` and
  ``sign = urlencode(base64(HMAC-SHA256(key=secret, msg=timestamp + "\\n" + secret)))`` as URL
  query parameters;
* success is ``errcode == 0`` only; 310000 (the robot's security settings: keyword, signature,
  timestamp, IP range) is explained as the setting to fix; 130101 (over 20 messages a minute:
  DingTalk then throttles the robot for 10 minutes) leaves the message in the outbox for a later
  cycle instead of hammering.

The access token (in the URL) and the signing secret are secrets: masked in every log line and
error.

Its config is :class:`DingTalkSettings` (``dingtalk:``: ``url`` or ``url_env``, ``secret`` or
``secret_env``, keyword, mentions), read and checked once when the config is read, with the limits
the sender keeps (DingTalk's, :data:`LIMITS`); :func:`build` only resolves the secrets from the
environment.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote_plus, urlsplit

from gpuwatch.config.values import check_keys, from_env, mapping, string
from gpuwatch.message import Message, Section
from gpuwatch.notify import http
from gpuwatch.notify.http import Request, Retry, encode, int_field, json_reply
from gpuwatch.notify.markup import block_line, markdown, markdown_lines, render_parts
from gpuwatch.notify.masking import present, redact_url
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

#: DingTalk's documented limits: 20,000 bytes a message, 20 messages a minute per robot.
MAX_BODY_BYTES = 20_000
PER_MINUTE = 20
LIMITS = Limits(max_body_bytes=MAX_BODY_BYTES, per_minute=PER_MINUTE)
KEYS = ("url", "url_env", "secret", "secret_env", "keyword", "mentions")


def redact(url: str) -> str:
    """``https://oapi.dingtalk.com/robot/send?access_token=ab12…(masked)``."""
    return redact_url(url, path_segments=0)


def token_of(url: str) -> str:
    """The robot's access token (the ``access_token`` query value)."""
    return dict(parse_qsl(urlsplit(url).query)).get("access_token", "")


@dataclass(frozen=True, repr=False)
class DingTalkSettings(UrlSettings):
    """One DingTalk group robot. ``url`` (its access token) and ``secret`` are secrets."""

    SECTION = "dingtalk"
    URL_SHAPE = "https://oapi.dingtalk.com/robot/send?access_token=<token>"
    SECRET_SEGMENTS = 0  # the access token is a query value

    secret: str | None = field(default=None, repr=False)
    secret_env: str | None = None
    keyword: str | None = None
    mentions: Mapping[str, str] = field(default_factory=dict)  # user -> mobile number or DingTalk userId
    max_body_bytes: int = MAX_BODY_BYTES
    per_minute: int | None = PER_MINUTE

    def url_fits(self, url: str) -> bool:
        return urlsplit(url).scheme in ("http", "https") and bool(token_of(url))

    def check(self) -> None:
        if self.keyword is not None and not self.keyword.strip():
            raise ValueError("dingtalk.keyword: must not be empty (leave it out if the robot has no keyword)")

    def __repr__(self) -> str:
        return (
            f"DingTalkSettings(url={redact(self.url) if self.url else None!r}, "
            f"secret={'set' if self.secret else 'unset'}, keyword={self.keyword!r}, mentions={dict(self.mentions)!r})"
        )

    def resolve_secret(self, environ: Mapping[str, str] | None = None) -> str | None:
        return from_env(self.secret_env, self.secret, environ)

    def own_secrets(self) -> list[str]:
        return present(self.resolve_secret())

    def resolved_extra(self, environ: Mapping[str, str] | None) -> dict[str, Any]:
        return {"secret": env_secret(self.resolve_secret(environ), self.secret_env, "dingtalk.secret_env")}


def parse(raw: object, base: Path) -> DingTalkSettings:
    """``dingtalk:`` -> :class:`DingTalkSettings` (ConfigError naming the key path)."""
    section = mapping(raw, "dingtalk")
    check_keys(section, KEYS, "dingtalk")
    values: dict[str, Any] = url_and_mentions(
        section, "dingtalk", "the robot's webhook, https://oapi.dingtalk.com/robot/send?..."
    )
    for key in ("secret", "secret_env", "keyword"):
        if section.get(key) is not None:
            values[key] = string(section[key], f"dingtalk.{key}")
    return settings_of(lambda: DingTalkSettings(**values))


def describe(settings: DingTalkSettings) -> str:
    """What ``check`` says of the robot: signed or not, its keyword, how many people it can @."""
    signed = "signed" if settings.resolve_secret() else "not signed"
    keyword = f"keyword {settings.keyword!r}" if settings.keyword else "no keyword"
    return f"{signed}, {keyword}, {len(settings.mentions)} mention(s)"


# ---------------------------------------------------------------- the sender

RATE_LIMITED = 130101
SECURITY = 310000
MESSAGE_FAULTS = frozenset({40035, 43004, 460101})  # malformed, wrong content type, too long

#: ``<font color>`` for a state, from the colours Feishu and DingTalk clients share.
COLOURS = {
    "free": "#1A7526",
    "resolved": "#1A7526",
    "down": "#C02A26",
    "stale": "#C02A26",
    "firing": "#C02A26",
    "reminder": "#A44904",
    "warning": "#A44904",
    "notice": "#1456F0",
}


def sign(secret: str, timestamp_ms: int) -> str:
    """DingTalk's signature, URL-encoded as it goes in the query:
    ``urlencode(base64(HMAC-SHA256(key=secret, msg=f"{timestamp}\\n{secret}")))``."""
    digest = hmac.new(secret.encode(), f"{timestamp_ms}\n{secret}".encode(), hashlib.sha256).digest()
    return quote_plus(base64.b64encode(digest).decode("ascii"))


def explain(code: int, errmsg: str = "") -> str:
    """Plain words for a DingTalk ``errcode``: what went wrong and which setting to fix."""
    said = errmsg.lower()
    if code == SECURITY:
        if "keyword" in said:
            return "keyword missing (310000): set dingtalk.keyword to one of the robot's custom keywords (自定义关键词)"
        if "timestamp" in said:
            return (
                "timestamp refused (310000): this machine's clock is off by more than an hour from DingTalk's; "
                "fix the clock (NTP)"
            )
        if "sign" in said or "签名" in errmsg:
            return (
                "signature rejected (310000): the robot's signing secret (加签, SEC...) differs from dingtalk.secret / "
                "the variable dingtalk.secret_env names, or the robot does not sign"
            )
        if "ip" in said or "whitelist" in said:
            return (
                "IP not allowed (310000): add this machine's public IP address to the robot's IP range (IP地址段), "
                "or use a keyword or signing instead"
            )
        return (
            "refused by the robot's security settings (310000): check dingtalk.keyword against its custom "
            "keywords, dingtalk.secret against its signing secret, and its IP range"
        )
    if code == RATE_LIMITED:
        return (
            "rate limited (130101): more than 20 messages a minute reached this robot; DingTalk holds its "
            "messages for 10 minutes, so gpuwatch tries again at a later cycle"
        )
    if code in (300001, 300005):
        return f"invalid access_token ({code}): the robot was removed or dingtalk.url is wrong"
    if code == 460101:
        return "message too long (460101): DingTalk takes at most 20,000 bytes"
    if code in MESSAGE_FAULTS:
        return f"bad request ({code}): DingTalk found the message malformed"
    return f"DingTalk error code {code} (not one gpuwatch knows; see the robot's documentation)"


class DingTalkChannel(http.WebhookChannel[DingTalkSettings]):
    """Delivers messages to one DingTalk group through its custom robot (see the module docstring)."""

    name = "dingtalk"
    service = "DingTalk"

    # ------------------------------------------------------------------ prepare

    def prepare(self, message: Message) -> list[dict[str, Any]]:
        """Markdown bodies of at most ``max_body_bytes``, split between hosts or alerts."""
        keyword = self._settings.keyword
        marker = f"【{keyword}】" if keyword and keyword not in message.title else ""
        mentions = tuple(message.mentions)

        def render(title: str, part: Sequence[Any], first: bool) -> dict[str, Any]:
            return self._render(title, marker, part, mentions if first else (), message)

        return render_parts(
            message,
            marker + message.title,
            render,
            lambda body: len(encode(body)),
            limit=self._settings.max_body_bytes,
            what="dingtalk.max_body_bytes",
        )

    def _render(
        self, title: str, marker: str, part: Sequence[Any], mentions: Sequence[str], message: Message
    ) -> dict[str, Any]:
        # The keyword goes in as configured (DingTalk looks for it in the text as sent); the rest
        # of the title is escaped like any other value.
        heading = marker + markdown(title.removeprefix(marker))
        if message.body is not None:
            sections: Sequence[Section] = part
            lines = markdown_lines(title, message.body, sections, color=_font, link=message.link)
            lines[0] = f"#### {heading}"
        else:
            lines = [f"#### {heading}"]
            for block in part:
                lines.append("")
                lines += [block_line(line) for line in str(block).split("\n")]
            if message.link:
                lines += ["", f"[Open the GPU page]({message.link})"]
        if mentions:
            lines.append(" ".join(f"@{m}" for m in mentions))
        text = "\n\n".join(line for line in lines if line)
        mobiles = [m for m in mentions if m.isdigit()]
        return {
            "msgtype": "markdown",
            "markdown": {"title": title, "text": text},
            "at": {"atMobiles": mobiles, "atUserIds": [m for m in mentions if m not in mobiles], "isAtAll": False},
        }

    # ------------------------------------------------------------------ describe

    def describe(self, payload: dict[str, Any]) -> str:
        text = str(payload.get("markdown", {}).get("text", ""))
        text = re.sub(r"</?font[^>]*>", "", text).replace("**", "").replace("#### ", "")
        return html.unescape(text.replace("\n\n", "\n"))

    # ------------------------------------------------------------------ deliver

    def _request(self, payload: Mapping[str, Any]) -> Request:
        url = self._url
        secret = self._settings.secret
        if secret:
            timestamp = int(self._clock() * 1000)
            # sign() already URL-encodes: appended as is, not encoded a second time
            separator = "&" if urlsplit(url).query else "?"
            url = f"{_without_signature(url)}{separator}timestamp={timestamp}&sign={sign(secret, timestamp)}"
        return Request(url, encode(payload))

    def _judge(self, answer: http.Answer) -> Retry | None:
        reply = json_reply(answer)
        code = int_field(reply, "errcode")
        if answer.status != 200 or code is None:
            raise self._refused(
                f"HTTP {answer.status}: not a DingTalk robot reply (check dingtalk.url): {self.snippet(answer)!r}"
            )
        if code == 0:
            return None
        assert reply is not None
        errmsg = self._scrub(str(reply.get("errmsg", "")))[:200]
        reason = f"{explain(code, errmsg)} (errmsg {errmsg!r})"
        if code == RATE_LIMITED:
            raise self._refused(reason, code=code, permanent=False)
        raise self._refused(reason, code=code, message_fault=code in MESSAGE_FAULTS)


def _without_signature(url: str) -> str:
    """The configured URL without a timestamp/sign of its own (a URL pasted with them)."""
    parts = urlsplit(url)
    kept = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in ("timestamp", "sign")]
    query = "&".join(f"{k}={quote_plus(v)}" for k, v in kept)
    return parts._replace(query=query).geturl()


def _font(text: str, state: str) -> str:
    colour = COLOURS.get(state)
    return f"<font color={colour}>{text}</font>" if colour else text


def build(settings: DingTalkSettings, transport: Transport) -> DingTalkChannel:
    """The channel for ``dingtalk:``: its URL and secret resolved from the environment now."""
    return DingTalkChannel(settings.resolved(transport.environ), sleep=transport.sleep, stop=transport.stop)


SPEC = ChannelSpec(
    name="dingtalk",
    parse=parse,
    sender=build,
    secrets=url_secret_values,
    inline_secrets=("secret", "url"),
    describe=describe,
    carries_reports=True,
    limits=LIMITS,
    mentions=lambda settings: settings.mentions,
)
