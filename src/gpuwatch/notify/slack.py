"""The Slack incoming-webhook channel: Block Kit messages with a text fallback, its answers.

One incoming webhook (``https://hooks.slack.com/services/T.../B.../...``; the whole path is the
secret, masked in every log line and error):

* a :class:`~gpuwatch.notify.base.Message` becomes ``blocks`` (a header, the summary, one section
  per host or alert with a line per GPU, a button to the page) and a ``text`` fallback for
  notifications; within Slack's limits (50 blocks, 3,000 characters a section, 150 a header),
  split between hosts or alerts into numbered parts;
* host values go in ``plain_text`` objects, which Slack never parses, with ``emoji`` off (a
  ``:fire:`` in a command stays text); the fallback goes with ``mrkdwn: false`` and ``&``, ``<``,
  ``>`` escaped, so no ``<!channel>`` or ``<@U...>`` can come from a host. Mentions are
  ``<@U...>`` member ids from ``slack.mentions`` only;
* success is HTTP 200 with the body ``ok``; Slack's text error codes (``invalid_payload``,
  ``channel_not_found``, ``no_service``, ...) are explained; 429 waits for ``Retry-After``;
  about one message a second, as Slack asks.

Its config is :class:`SlackSettings` (``slack:``: ``url`` or ``url_env``, mentions), read and
checked once when the config is read, with the limits the sender keeps (Slack's, :data:`LIMITS`);
:func:`build` only resolves the URL from the environment.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gpuwatch.config.values import check_keys, mapping
from gpuwatch.message import Message, Section
from gpuwatch.notify import http
from gpuwatch.notify.http import Request, Retry, encode
from gpuwatch.notify.markup import render_parts, slack_escape
from gpuwatch.notify.masking import redact_url, url_secrets
from gpuwatch.notify.spec import (
    ChannelSpec,
    Limits,
    Transport,
    UrlSettings,
    settings_of,
    url_and_mentions,
    url_secret_values,
)

MAX_BODY_BYTES = 40_000
PER_SECOND = 1
LIMITS = Limits(
    max_body_bytes=MAX_BODY_BYTES,
    per_second=PER_SECOND,
    other="at most 50 blocks, 3,000 characters a section, 150 a header",
)
KEYS = ("url", "url_env", "mentions")
_MEMBER_ID = re.compile(r"[UW][A-Z0-9]{2,}")


def redact(url: str) -> str:
    """``https://hooks.slack.com/services/…(masked)/…(masked)/…(masked)``."""
    return redact_url(url, path_segments=3)


def secret_parts(url: str) -> list[str]:
    """The webhook's secret path segments (team, bot, token)."""
    return url_secrets(url, path_segments=3)


@dataclass(frozen=True, repr=False)
class SlackSettings(UrlSettings):
    """One Slack incoming webhook. ``url`` is a secret (its last three path segments)."""

    SECTION = "slack"
    URL_SHAPE = "https://hooks.slack.com/services/T.../B.../..."
    SECRET_SEGMENTS = 3

    mentions: Mapping[str, str] = field(default_factory=dict)  # user -> Slack member id (U...)
    max_body_bytes: int = MAX_BODY_BYTES
    per_second: int | None = PER_SECOND

    def url_fits(self, url: str) -> bool:
        return urlsplit(url).scheme in ("http", "https") and bool(urlsplit(url).path.strip("/"))

    def check(self) -> None:
        for user, member in self.mentions.items():
            if not _MEMBER_ID.fullmatch(member):
                raise ValueError(f"slack.mentions.{user}: {member!r} is not a Slack member id (like U0123ABCD)")

    def __repr__(self) -> str:
        shown = redact(self.url) if self.url else None
        return f"SlackSettings(url={shown!r}, mentions={dict(self.mentions)!r})"


def parse(raw: object, base: Path) -> SlackSettings:
    """``slack:`` -> :class:`SlackSettings` (ConfigError naming the key path)."""
    section = mapping(raw, "slack")
    check_keys(section, KEYS, "slack")
    values: dict[str, Any] = url_and_mentions(
        section, "slack", "the incoming webhook, https://hooks.slack.com/services/..."
    )
    return settings_of(lambda: SlackSettings(**values))


def describe(settings: SlackSettings) -> str:
    """What ``check`` says of the webhook: how many people it can @."""
    return f"incoming webhook, {len(settings.mentions)} mention(s)"


# ---------------------------------------------------------------- the sender

MAX_BLOCKS = 50
MAX_SECTION_CHARS = 3000
MAX_HEADER_CHARS = 150
MAX_FALLBACK_CHARS = 3000  # the notification text; Slack truncates long ones anyway

#: A state's mark at the start of a line (Unicode, so that it needs no emoji parsing).
MARKS = {
    "free": "🟢",
    "resolved": "🟢",
    "ok": "🟢",
    "down": "🔴",
    "stale": "🔴",
    "firing": "🔴",
    "reminder": "🟠",
    "warning": "🟠",
    "notice": "🔵",
    "busy": "⚫",
}
_EXPLANATIONS = {
    "invalid_payload": "Slack could not read the message (malformed JSON or blocks)",
    "invalid_blocks": "Slack refused the message's blocks",
    "invalid_blocks_format": "Slack refused the message's blocks",
    "no_text": "the message had no text",
    "too_many_attachments": "the message had too many attachments",
    "msg_too_long": "the message is too long for Slack",
    "channel_not_found": "the webhook's channel was deleted or the app lost access to it: make a new webhook",
    "channel_is_archived": "the webhook's channel is archived: unarchive it or make a webhook for another channel",
    "action_prohibited": "a workspace admin restricted posting to this channel",
    "posting_to_general_channel_denied": "only admins may post to this channel: use another channel's webhook",
    "no_service": "the webhook was disabled or removed (or slack.url is wrong): make a new one in the app's settings",
    "no_service_id": "slack.url is not a complete webhook URL",
    "no_team": "the workspace of this webhook is gone, or slack.url is wrong",
    "team_disabled": "the workspace of this webhook is disabled",
    "invalid_token": "the webhook's token is no longer valid: make a new webhook",
    "user_not_found": "the user the webhook posts as is gone: make a new webhook",
}
MESSAGE_FAULTS = frozenset(
    {"invalid_payload", "invalid_blocks", "invalid_blocks_format", "no_text", "too_many_attachments", "msg_too_long"}
)


def explain(error: str) -> str:
    """Plain words for a Slack webhook error code."""
    unknown = f"Slack error {error!r} (not one gpuwatch knows; see Slack's webhook documentation)"
    return _EXPLANATIONS.get(error, unknown)


def _plain(text: str) -> dict[str, Any]:
    return {"type": "plain_text", "text": text, "emoji": False}


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def section_text(section: Section) -> str:
    head = f"{MARKS.get(section.state, '')} {section.title}".strip()
    if section.note:
        head += f" · {section.note}"
    lines = [head]
    for row in section.rows:
        mark = MARKS.get(row.state, "")
        lines.append(f"{mark} " + "  ".join(c for c in row.cells if c) if mark else "  ".join(c for c in row.cells))
    return "\n".join(lines)


class SlackChannel(http.WebhookChannel[SlackSettings]):
    """Delivers messages to one Slack channel through an incoming webhook (see the module docstring)."""

    name = "slack"
    service = "Slack"

    # ------------------------------------------------------------------ prepare

    def prepare(self, message: Message) -> list[dict[str, Any]]:
        """Block Kit bodies within Slack's limits, split between hosts or alerts."""
        mentions = tuple(message.mentions)
        limit = self._settings.max_body_bytes

        def render(title: str, part: Sequence[Any], first: bool) -> dict[str, Any]:
            return self._render(title, part, mentions if first else (), message)

        def measure(body: dict[str, Any]) -> int:
            blocks = body["blocks"]
            too_long = any(
                len(b.get("text", {}).get("text", "")) > MAX_SECTION_CHARS for b in blocks if b["type"] == "section"
            )
            if len(blocks) > MAX_BLOCKS or too_long:  # Slack's other limits count as too big
                return limit + 1
            return len(encode(body))

        return render_parts(message, message.title, render, measure, limit=limit, what="slack.max_body_bytes")

    def _render(self, title: str, part: Sequence[Any], mentions: Sequence[str], message: Message) -> dict[str, Any]:
        blocks: list[dict[str, Any]] = [{"type": "header", "text": _plain(_clip(title, MAX_HEADER_CHARS))}]
        if mentions:  # member ids from the config, checked to be ids: the only markup gpuwatch writes
            ats = " ".join(f"<@{m}>" for m in mentions)
            blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": ats}})
        body = message.body
        if body is not None:
            if body.summary:
                summary = _plain(f"{MARKS.get(body.state, '')} {body.summary}")
                blocks.append({"type": "context", "elements": [summary]})
            texts = [section_text(section) for section in part]
        else:
            texts = [str(block) for block in part]
        blocks += [{"type": "section", "text": _plain(text)} for text in texts if text]
        if message.link:
            button = {"type": "button", "text": _plain("Open the GPU page"), "url": message.link}
            blocks.append({"type": "actions", "elements": [button]})
        fallback = title
        if body is not None and body.summary and body.summary not in title:
            fallback += f": {body.summary}"
        return {"text": slack_escape(_clip(fallback, MAX_FALLBACK_CHARS)), "mrkdwn": False, "blocks": blocks}

    # ------------------------------------------------------------------ describe

    def describe(self, payload: dict[str, Any]) -> str:
        texts = []
        for block in payload.get("blocks", []):
            if block.get("type") in ("header", "section"):
                texts.append(str(block.get("text", {}).get("text", "")))
            elif block.get("type") == "context":
                texts += [str(e.get("text", "")) for e in block.get("elements", [])]
            elif block.get("type") == "actions":
                texts += [f"{e['text']['text']} <{e.get('url', '')}>" for e in block.get("elements", [])]
        return "\n\n".join(texts) if texts else str(payload.get("text", ""))

    # ------------------------------------------------------------------ deliver

    def _request(self, payload: Mapping[str, Any]) -> Request:
        return Request(self._url, encode(payload))

    def _judge(self, answer: http.Answer) -> Retry | None:
        said = self.snippet(answer)
        if answer.status == 200 and said == "ok":
            return None
        error = said if re.fullmatch(r"[a-z_]{2,64}", said or "") else ""
        if not error:
            raise self._refused(
                f"HTTP {answer.status}: not a Slack webhook reply (check slack.url): {said!r}",
            )
        raise self._refused(f"HTTP {answer.status} {error}: {explain(error)}", message_fault=error in MESSAGE_FAULTS)


def build(settings: SlackSettings, transport: Transport) -> SlackChannel:
    """The channel for ``slack:``: its URL resolved from the environment now."""
    return SlackChannel(settings.resolved(transport.environ), sleep=transport.sleep, stop=transport.stop)


SPEC = ChannelSpec(
    name="slack",
    parse=parse,
    sender=build,
    secrets=url_secret_values,
    inline_secrets=("url",),
    describe=describe,
    carries_reports=True,
    limits=LIMITS,
    mentions=lambda settings: settings.mentions,
)
