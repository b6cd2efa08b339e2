"""The WeCom (企业微信) group-robot channel: markdown or text messages, its answers.

One group robot behind ``https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=KEY``. The key in
the URL is the robot's only secret (WeCom robots do not sign): whoever has it can post to the
group, so it is masked in every log line and error.

* ``format: markdown`` (the default): ``markdown.content`` of at most 4,096 bytes (WeCom counts
  UTF-8 bytes), every value from a host escaped (:func:`gpuwatch.notify.markup.markdown`), free
  GPUs and resolved alerts in ``<font color="info">`` (green), hosts without data and firing
  alerts in ``warning``; mentions as ``<@userid>``;
* ``format: text``: ``text.content`` of at most 2,048 bytes, shown exactly as written (no markup
  at all), mentions in ``mentioned_list`` / ``mentioned_mobile_list``;
* both split between hosts or alerts into numbered parts, like every channel;
* success is ``errcode == 0``; 93000 (the key is wrong or the robot was removed) and 40058
  (content too long) are explained; 45009 (over 20 messages a minute) leaves the message in the
  outbox for a later cycle.

Its config is :class:`WeComSettings` (``wecom:``: ``url`` or ``url_env``, format, mentions),
read and checked once when the config is read, with the limits the sender keeps (WeCom's,
:data:`LIMITS`); :func:`build` only resolves the URL from the environment.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from gpuwatch.config.values import check_keys, choice, mapping
from gpuwatch.message import Message, Section
from gpuwatch.notify import http
from gpuwatch.notify.http import Request, Retry, encode, int_field, json_reply
from gpuwatch.notify.markup import block_line, markdown, markdown_lines, render_parts, text_lines
from gpuwatch.notify.masking import redact_url
from gpuwatch.notify.spec import (
    ChannelSpec,
    Limits,
    Transport,
    UrlSettings,
    settings_of,
    url_and_mentions,
    url_secret_values,
)

FORMATS = ("markdown", "text")
#: WeCom's documented limits: markdown.content at most 4,096 bytes, text.content 2,048; 20 a minute.
MAX_MARKDOWN_BYTES = 4096
MAX_TEXT_BYTES = 2048
PER_MINUTE = 20
LIMITS = Limits(
    max_body_bytes=MAX_MARKDOWN_BYTES,
    per_minute=PER_MINUTE,
    measured="markdown.content (format text: text.content, at most 2,048 bytes)",
)
KEYS = ("url", "url_env", "format", "mentions")


def redact(url: str) -> str:
    """``https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=ab12…(masked)``."""
    return redact_url(url, path_segments=0)


def key_of(url: str) -> str:
    """The robot's key (the ``key`` query value)."""
    return dict(parse_qsl(urlsplit(url).query)).get("key", "")


@dataclass(frozen=True, repr=False)
class WeComSettings(UrlSettings):
    """One WeCom group robot. ``url`` holds its key, a secret."""

    SECTION = "wecom"
    URL_SHAPE = "https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=<key>"
    SECRET_SEGMENTS = 0  # the key is a query value

    format: str = "markdown"
    mentions: Mapping[str, str] = field(default_factory=dict)  # user -> WeCom userid (or a mobile number, text only)
    max_markdown_bytes: int = MAX_MARKDOWN_BYTES
    max_text_bytes: int = MAX_TEXT_BYTES
    per_minute: int | None = PER_MINUTE

    def url_fits(self, url: str) -> bool:
        return urlsplit(url).scheme in ("http", "https") and bool(key_of(url))

    def check(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"wecom.format: expected one of {', '.join(FORMATS)}, got {self.format!r}")

    def __repr__(self) -> str:
        shown = redact(self.url) if self.url else None
        return f"WeComSettings(url={shown!r}, format={self.format!r}, mentions={dict(self.mentions)!r})"


def parse(raw: object, base: Path) -> WeComSettings:
    """``wecom:`` -> :class:`WeComSettings` (ConfigError naming the key path)."""
    section = mapping(raw, "wecom")
    check_keys(section, KEYS, "wecom")
    values: dict[str, Any] = url_and_mentions(
        section, "wecom", "the robot's webhook, https://qyapi.weixin.qq.com/...?key=..."
    )
    if "format" in section:
        values["format"] = choice(section["format"], "wecom.format", FORMATS)
    return settings_of(lambda: WeComSettings(**values))


def describe(settings: WeComSettings) -> str:
    """What ``check`` says of the robot: its format, how many people it can @."""
    return f"format {settings.format}, {len(settings.mentions)} mention(s)"


# ---------------------------------------------------------------- the sender

#: WeCom's documented limits: markdown content 4,096 bytes, text content 2,048 bytes, 20 a minute.

INVALID_KEY = 93000
RATE_LIMITED = 45009
MESSAGE_FAULTS = frozenset({40008, 40058, 44004})  # bad message type, too long, empty

#: ``<font color>`` for a state: WeCom markdown has three colours.
COLOURS = {
    "free": "info",
    "resolved": "info",
    "down": "warning",
    "stale": "warning",
    "firing": "warning",
    "reminder": "warning",
    "warning": "warning",
    "notice": "comment",
}


def explain(code: int) -> str:
    """Plain words for a WeCom ``errcode``: what went wrong and which setting to fix."""
    if code == INVALID_KEY:
        return "invalid webhook URL (93000): the key in wecom.url is wrong, or the robot was removed from the group"
    if code == RATE_LIMITED:
        return (
            "rate limited (45009): more than 20 messages a minute reached this robot (other senders share it); "
            "gpuwatch tries again at a later cycle"
        )
    if code == 40058:
        return "message too long (40058): WeCom takes 4,096 bytes of markdown or 2,048 of text"
    if code in MESSAGE_FAULTS:
        return f"bad request ({code}): WeCom found the message malformed"
    return f"WeCom error code {code} (not one gpuwatch knows; see the robot's documentation)"


class WeComChannel(http.WebhookChannel[WeComSettings]):
    """Delivers messages to one WeCom group through its robot (see the module docstring)."""

    name = "wecom"
    service = "WeCom"

    def __repr__(self) -> str:
        return f"WeComChannel({self._where}, format={self._settings.format!r})"

    # ------------------------------------------------------------------ prepare

    def prepare(self, message: Message) -> list[dict[str, Any]]:
        """Bodies whose content fits WeCom's limit for the format, split between hosts or alerts."""
        text_format = self._settings.format == "text"
        limit = self._settings.max_text_bytes if text_format else self._settings.max_markdown_bytes
        mentions = tuple(message.mentions)

        def render(title: str, part: Sequence[Any], first: bool) -> dict[str, Any]:
            return self._render(title, part, mentions if first else (), message)

        def measure(body: dict[str, Any]) -> int:  # WeCom's limits are on the content, in UTF-8 bytes
            return len(str(body[body["msgtype"]]["content"]).encode("utf-8"))

        what = "wecom.max_text_bytes" if text_format else "wecom.max_markdown_bytes"
        return render_parts(message, message.title, render, measure, limit=limit, what=what)

    def _render(self, title: str, part: Sequence[Any], mentions: Sequence[str], message: Message) -> dict[str, Any]:
        if self._settings.format == "text":
            if message.body is not None:
                sections: Sequence[Section] = part
                blocks = ["\n".join(text_lines([s])) for s in sections]
            else:
                blocks = [str(b) for b in part]
            if message.link:
                blocks.append(message.link)
            content = "\n\n".join((title, *blocks))
            mobiles = [m for m in mentions if m.isdigit()]
            text: dict[str, Any] = {"content": content}
            if mentions:
                text["mentioned_list"] = [m for m in mentions if m not in mobiles]
                text["mentioned_mobile_list"] = mobiles
            return {"msgtype": "text", "text": text}
        if message.body is not None:
            lines = markdown_lines(title, message.body, part, color=_font, link=message.link)
        else:
            lines = [f"#### {markdown(title)}"]
            for block in part:
                lines.append("")
                lines += [block_line(line) for line in str(block).split("\n")]
            if message.link:
                lines += ["", f"[Open the GPU page]({message.link})"]
        if mentions:  # ids from the config (wecom.mentions), never from a host
            lines += ["", " ".join(f"<@{m}>" for m in mentions)]
        return {"msgtype": "markdown", "markdown": {"content": "\n".join(lines)}}

    # ------------------------------------------------------------------ describe

    def describe(self, payload: dict[str, Any]) -> str:
        if payload.get("msgtype") == "text":
            return str(payload.get("text", {}).get("content", ""))
        text = str(payload.get("markdown", {}).get("content", ""))
        text = re.sub(r"</?font[^>]*>", "", text).replace("**", "").replace("#### ", "")
        text = re.sub(r"<@([^>]*)>", r"@\1", text)
        return html.unescape(text)

    # ------------------------------------------------------------------ deliver

    def _request(self, payload: Mapping[str, Any]) -> Request:
        return Request(self._url, encode(payload))

    def _judge(self, answer: http.Answer) -> Retry | None:
        reply = json_reply(answer)
        code = int_field(reply, "errcode")
        if answer.status != 200 or code is None:
            raise self._refused(
                f"HTTP {answer.status}: not a WeCom robot reply (check wecom.url): {self.snippet(answer)!r}"
            )
        if code == 0:
            return None
        assert reply is not None
        # WeCom's errmsg echoes a hint and the caller's IP; the first clause says enough.
        errmsg = self._scrub(str(reply.get("errmsg", "")).split(", hint:")[0])[:200]
        reason = f"{explain(code)} (errmsg {errmsg!r})"
        if code == RATE_LIMITED:
            raise self._refused(reason, code=code, permanent=False)
        raise self._refused(reason, code=code, message_fault=code in MESSAGE_FAULTS)


def _font(text: str, state: str) -> str:
    colour = COLOURS.get(state)
    return f'<font color="{colour}">{text}</font>' if colour else text


def build(settings: WeComSettings, transport: Transport) -> WeComChannel:
    """The channel for ``wecom:``: its URL resolved from the environment now."""
    return WeComChannel(settings.resolved(transport.environ), sleep=transport.sleep, stop=transport.stop)


SPEC = ChannelSpec(
    name="wecom",
    parse=parse,
    sender=build,
    secrets=url_secret_values,
    inline_secrets=("url",),
    describe=describe,
    carries_reports=True,
    limits=LIMITS,
    mentions=lambda settings: settings.mentions,
)
