"""The WeCom (企业微信) channel as the config and ``check`` see it: ``wecom:``, read and checked once.

:class:`WeComSettings` is the one record of a group robot: ``url`` or ``url_env``, format, mentions,
and the limits the sender keeps (WeCom's, :data:`LIMITS`). Building the channel
(:func:`gpuwatch.notify.wecom.build`) only resolves the URL from the environment. The robot's key
(in the URL) is a secret: the repr masks it, :func:`secrets` lists it for every log line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from ..config.values import check_keys, choice, mapping
from .masking import redact_url
from .spec import ChannelSpec, Limits, UrlSettings, settings_of, url_and_mentions, url_secret_values

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


SPEC = ChannelSpec(
    name="wecom",
    parse=parse,
    sender="gpuwatch.notify.wecom",
    secrets=url_secret_values,
    inline_secrets=("url",),
    describe=describe,
    carries_reports=True,
    limits=LIMITS,
    mentions=lambda settings: settings.mentions,
)
