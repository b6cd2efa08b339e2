"""The WeCom (企业微信) channel as the config and ``check`` see it: ``wecom:``, read and checked once.

:class:`WeComSettings` is the one record of a group robot: ``url`` or ``url_env``, format, mentions,
and the limits the sender keeps (WeCom's, :data:`LIMITS`). Building the channel
(:func:`gpuwatch.notify.wecom.build`) only resolves the URL from the environment. The robot's key
(in the URL) is a secret: the repr masks it, :func:`secrets` lists it for every log line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from ..config.values import ConfigError, check_keys, choice, from_env, mapping
from .masking import present, query_values, redact_url
from .spec import ChannelSpec, Limits, require_positive, settings_of, url_and_mentions

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
class WeComSettings:
    """One WeCom group robot. ``url`` holds its key, a secret; None when ``url_env`` names it."""

    url: str | None = field(default=None, repr=False)
    format: str = "markdown"
    mentions: Mapping[str, str] = field(default_factory=dict)  # user -> WeCom userid (or a mobile number, text only)
    url_env: str | None = None
    timeout_seconds: float = 10.0
    max_markdown_bytes: int = MAX_MARKDOWN_BYTES
    max_text_bytes: int = MAX_TEXT_BYTES
    per_minute: int = PER_MINUTE
    max_attempts: int = 5

    def __post_init__(self) -> None:
        if self.url is None and not self.url_env:
            raise ValueError("wecom: needs 'url' (the robot's webhook) or 'url_env'")
        if self.url is not None and (urlsplit(self.url).scheme not in ("http", "https") or not key_of(self.url)):
            raise ValueError("wecom.url: expected https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=<key>")
        if self.format not in FORMATS:
            raise ValueError(f"wecom.format: expected one of {', '.join(FORMATS)}, got {self.format!r}")
        names = ("timeout_seconds", "max_markdown_bytes", "max_text_bytes", "per_minute", "max_attempts")
        require_positive(self, names, "wecom")

    def __repr__(self) -> str:
        shown = redact(self.url) if self.url else None
        return f"WeComSettings(url={shown!r}, format={self.format!r}, mentions={dict(self.mentions)!r})"

    def resolve_url(self, environ: Mapping[str, str] | None = None) -> str | None:
        return from_env(self.url_env, self.url, environ)

    def resolved(self, environ: Mapping[str, str] | None = None) -> WeComSettings:
        """These settings with the URL read from the environment (ConfigError when it is unset)."""
        url = self.resolve_url(environ)
        if not url:
            raise ConfigError(f"wecom.url_env: ${self.url_env} is not set in the environment")
        resolved: WeComSettings = settings_of(lambda: replace(self, url=url))
        return resolved


def parse(raw: object, base: Path) -> WeComSettings:
    """``wecom:`` -> :class:`WeComSettings` (ConfigError naming the key path)."""
    section = mapping(raw, "wecom")
    check_keys(section, KEYS, "wecom")
    values: dict[str, Any] = url_and_mentions(
        section, "wecom", "the robot's webhook, https://qyapi.weixin.qq.com/...?key=..."
    )
    if "format" in section:
        values["format"] = choice(section["format"], "wecom.format", FORMATS)
    settings: WeComSettings = settings_of(lambda: WeComSettings(**values))
    return settings


def secrets(settings: WeComSettings) -> list[str]:
    """The secret values in use (the URL and its key), to mask in logs."""
    url = settings.resolve_url()
    return present(url, *query_values(url))


def describe(settings: WeComSettings) -> str:
    """What ``check`` says of the robot: its format, how many people it can @."""
    return f"format {settings.format}, {len(settings.mentions)} mention(s)"


SPEC = ChannelSpec(
    name="wecom",
    parse=parse,
    sender="gpuwatch.notify.wecom",
    secrets=secrets,
    inline_secrets=("url",),
    describe=describe,
    carries_reports=True,
    limits=LIMITS,
    mentions=lambda settings: settings.mentions,
)
