"""The Feishu (飞书) channel as the config and ``check`` see it: ``feishu:``, read and checked once.

:class:`FeishuSettings` is the one record of a Feishu bot: the section's values as read (``url`` or
``url_env``, ``secret`` or ``secret_env``, keyword, format, mentions) and the limits the sender
keeps (Feishu's, from :data:`LIMITS`). Building the channel (:func:`gpuwatch.notify.feishu.build`)
only resolves the secrets from the environment. The bot's token (in the URL) and the signing
secret are secrets: the repr masks them, :func:`secrets` lists them for every log line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..config.values import ConfigError, check_keys, choice, from_env, mapping, string
from .masking import present, redact_url
from .spec import ChannelSpec, Limits, env_secret, require_positive, settings_of, url_and_mentions

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
class FeishuSettings:
    """One Feishu group bot. ``url`` and ``secret`` are secrets: the repr masks them.

    ``url`` is None when ``url_env`` names the variable that holds it (resolved by :meth:`resolved`).
    """

    url: str | None = None
    keyword: str | None = None
    secret: str | None = field(default=None, repr=False)  # never in repr or logs
    format: str = "post"  # text | post | card
    mentions: Mapping[str, str] = field(default_factory=dict)  # user name -> open_id (for alerts)
    url_env: str | None = None
    secret_env: str | None = None
    timeout_seconds: float = 10.0  # the most one post may take: connect, send, and the whole answer
    max_body_bytes: int = MAX_BODY_BYTES  # UTF-8 bytes as sent, signature fields included
    per_second: int = PER_SECOND
    per_minute: int = PER_MINUTE
    max_attempts: int = 5

    def __post_init__(self) -> None:
        if self.url is None and not self.url_env:
            raise ValueError("feishu: needs 'url' (the bot's webhook) or 'url_env'")
        if self.url is not None and (urlsplit(self.url).scheme not in ("http", "https") or not token_of(self.url)):
            raise ValueError(f"feishu.url: expected {_URL_SHAPE}")
        if self.format not in FORMATS:
            raise ValueError(f"feishu.format: expected one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.keyword is not None and not self.keyword.strip():
            raise ValueError("feishu.keyword: must not be empty (leave it out if the bot has no keyword)")
        require_positive(
            self, ("timeout_seconds", "max_body_bytes", "per_second", "per_minute", "max_attempts"), "feishu"
        )

    def __repr__(self) -> str:
        return (
            f"FeishuSettings(url={redact(self.url) if self.url else None!r}, keyword={self.keyword!r}, "
            f"secret={'set' if self.secret else 'unset'}, format={self.format!r}, "
            f"mentions={dict(self.mentions)!r}, timeout_seconds={self.timeout_seconds!r}, "
            f"max_body_bytes={self.max_body_bytes!r}, per_second={self.per_second!r}, "
            f"per_minute={self.per_minute!r}, max_attempts={self.max_attempts!r})"
        )

    def resolve_url(self, environ: Mapping[str, str] | None = None) -> str | None:
        return from_env(self.url_env, self.url, environ)

    def resolve_secret(self, environ: Mapping[str, str] | None = None) -> str | None:
        return from_env(self.secret_env, self.secret, environ)

    def resolved(self, environ: Mapping[str, str] | None = None) -> FeishuSettings:
        """These settings with the URL and secret read from the environment (ConfigError naming the
        key when a variable is unset or does not hold a webhook URL)."""
        url = self.resolve_url(environ)
        if not url:
            raise ConfigError(f"feishu.url_env: ${self.url_env} is not set in the environment")
        if self.url_env and url != self.url and not _webhook_url(url):  # the file's own url was checked when read
            raise ConfigError(f"feishu.url_env: ${self.url_env} does not hold a webhook URL (expected {_URL_SHAPE})")
        secret = env_secret(self.resolve_secret(environ), self.secret_env, "feishu.secret_env")
        resolved: FeishuSettings = settings_of(lambda: replace(self, url=url, secret=secret))
        return resolved


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
    settings: FeishuSettings = settings_of(lambda: FeishuSettings(**values))
    return settings


def secrets(settings: FeishuSettings) -> list[str]:
    """The secret values in use (the URL, its token, the signing secret), to mask in logs."""
    url = settings.resolve_url()
    return present(settings.resolve_secret(), url, token_of(url or ""))


def describe(settings: FeishuSettings) -> str:
    """What ``check`` says of the bot: signed or not, its keyword, its format."""
    signed = "signed" if settings.resolve_secret() else "not signed"
    keyword = f"keyword {settings.keyword!r}" if settings.keyword else "no keyword"
    return f"{signed}, {keyword}, format {settings.format}"


SPEC = ChannelSpec(
    name="feishu",
    parse=parse,
    sender="gpuwatch.notify.feishu",
    secrets=secrets,
    inline_secrets=("secret", "url"),
    describe=describe,
    carries_reports=True,
    limits=LIMITS,
    mentions=lambda settings: settings.mentions,
)
