"""The DingTalk (钉钉) channel as the config and ``check`` see it: ``dingtalk:``, read and checked once.

:class:`DingTalkSettings` is the one record of a group robot: the section's values as read
(``url`` or ``url_env``, ``secret`` or ``secret_env``, keyword, mentions) and the limits the sender
keeps (DingTalk's, :data:`LIMITS`). Building the channel (:func:`gpuwatch.notify.dingtalk.build`)
only resolves the secrets from the environment. The access token (in the URL) and the signing
secret are secrets: the repr masks them, :func:`secrets` lists them for every log line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from ..config.values import ConfigError, check_keys, from_env, mapping, string
from .masking import present, query_values, redact_url
from .spec import ChannelSpec, Limits, env_secret, require_positive, settings_of, url_and_mentions

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
class DingTalkSettings:
    """One DingTalk group robot. ``url`` (its access token) and ``secret`` are secrets.

    ``url`` is None when ``url_env`` names the variable that holds it (resolved by :meth:`resolved`).
    """

    url: str | None = None
    secret: str | None = field(default=None, repr=False)
    keyword: str | None = None
    mentions: Mapping[str, str] = field(default_factory=dict)  # user -> mobile number or DingTalk userId
    url_env: str | None = None
    secret_env: str | None = None
    timeout_seconds: float = 10.0
    max_body_bytes: int = MAX_BODY_BYTES
    per_minute: int = PER_MINUTE
    max_attempts: int = 5

    def __post_init__(self) -> None:
        if self.url is None and not self.url_env:
            raise ValueError("dingtalk: needs 'url' (the robot's webhook) or 'url_env'")
        if self.url is not None and (urlsplit(self.url).scheme not in ("http", "https") or not token_of(self.url)):
            raise ValueError("dingtalk.url: expected https://oapi.dingtalk.com/robot/send?access_token=<token>")
        if self.keyword is not None and not self.keyword.strip():
            raise ValueError("dingtalk.keyword: must not be empty (leave it out if the robot has no keyword)")
        require_positive(self, ("timeout_seconds", "max_body_bytes", "per_minute", "max_attempts"), "dingtalk")

    def __repr__(self) -> str:
        return (
            f"DingTalkSettings(url={redact(self.url) if self.url else None!r}, "
            f"secret={'set' if self.secret else 'unset'}, keyword={self.keyword!r}, mentions={dict(self.mentions)!r})"
        )

    def resolve_url(self, environ: Mapping[str, str] | None = None) -> str | None:
        return from_env(self.url_env, self.url, environ)

    def resolve_secret(self, environ: Mapping[str, str] | None = None) -> str | None:
        return from_env(self.secret_env, self.secret, environ)

    def resolved(self, environ: Mapping[str, str] | None = None) -> DingTalkSettings:
        """These settings with the URL and secret read from the environment (ConfigError naming the
        key when a variable is unset)."""
        url = self.resolve_url(environ)
        if not url:
            raise ConfigError(f"dingtalk.url_env: ${self.url_env} is not set in the environment")
        secret = env_secret(self.resolve_secret(environ), self.secret_env, "dingtalk.secret_env")
        resolved: DingTalkSettings = settings_of(lambda: replace(self, url=url, secret=secret))
        return resolved


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
    settings: DingTalkSettings = settings_of(lambda: DingTalkSettings(**values))
    return settings


def secrets(settings: DingTalkSettings) -> list[str]:
    """The secret values in use (the URL, its access token, the signing secret), to mask in logs."""
    url = settings.resolve_url()
    return present(settings.resolve_secret(), url, *query_values(url))


def describe(settings: DingTalkSettings) -> str:
    """What ``check`` says of the robot: signed or not, its keyword, how many people it can @."""
    signed = "signed" if settings.resolve_secret() else "not signed"
    keyword = f"keyword {settings.keyword!r}" if settings.keyword else "no keyword"
    return f"{signed}, {keyword}, {len(settings.mentions)} mention(s)"


SPEC = ChannelSpec(
    name="dingtalk",
    parse=parse,
    sender="gpuwatch.notify.dingtalk",
    secrets=secrets,
    inline_secrets=("secret", "url"),
    describe=describe,
    carries_reports=True,
    limits=LIMITS,
    mentions=lambda settings: settings.mentions,
)
