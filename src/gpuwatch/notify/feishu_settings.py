"""The Feishu (飞书) channel as the config and ``check`` see it: ``feishu:``, read and checked once.

:class:`FeishuSettings` is the one record of a Feishu bot: the section's values as read (``url`` or
``url_env``, ``secret`` or ``secret_env``, keyword, format, mentions) and the limits the sender
keeps (Feishu's, from :data:`LIMITS`). Building the channel (:func:`gpuwatch.notify.feishu.build`)
only resolves the secrets from the environment. The bot's token (in the URL) and the signing
secret are secrets: the repr masks them, :func:`secrets` lists them for every log line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..config.values import ConfigError, check_keys, choice, from_env, mapping, string
from .masking import present, redact_url
from .spec import ChannelSpec, Limits, UrlSettings, env_secret, settings_of, url_and_mentions, url_secret_values

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


def redact(url: str) -> str:
    """The webhook URL with its token (last path segment) masked, safe for logs and errors.

    ``https://open.feishu.cn/open-apis/bot/v2/hook/ab12cd...`` becomes
    ``https://open.feishu.cn/open-apis/bot/v2/hook/ab12…(masked)``. Short tokens are masked
    whole; user info, query and fragment are dropped (they may hold secrets too).
    """
    return redact_url(url, query=False)


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
        return redact(url)

    def __repr__(self) -> str:
        return (
            f"FeishuSettings(url={redact(self.url) if self.url else None!r}, keyword={self.keyword!r}, "
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


SPEC = ChannelSpec(
    name="feishu",
    parse=parse,
    sender="gpuwatch.notify.feishu",
    secrets=url_secret_values,
    inline_secrets=("secret", "url"),
    describe=describe,
    carries_reports=True,
    limits=LIMITS,
    mentions=lambda settings: settings.mentions,
)
