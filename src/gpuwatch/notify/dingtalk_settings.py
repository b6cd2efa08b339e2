"""The DingTalk (钉钉) channel as the config and ``check`` see it: ``dingtalk:``, read and checked once.

:class:`DingTalkSettings` is the one record of a group robot: the section's values as read
(``url`` or ``url_env``, ``secret`` or ``secret_env``, keyword, mentions) and the limits the sender
keeps (DingTalk's, :data:`LIMITS`). Building the channel (:func:`gpuwatch.notify.dingtalk.build`)
only resolves the secrets from the environment. The access token (in the URL) and the signing
secret are secrets: the repr masks them, :func:`secrets` lists them for every log line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from ..config.values import check_keys, from_env, mapping, string
from .masking import present, redact_url
from .spec import ChannelSpec, Limits, UrlSettings, env_secret, settings_of, url_and_mentions, url_secret_values

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


SPEC = ChannelSpec(
    name="dingtalk",
    parse=parse,
    sender="gpuwatch.notify.dingtalk",
    secrets=url_secret_values,
    inline_secrets=("secret", "url"),
    describe=describe,
    carries_reports=True,
    limits=LIMITS,
    mentions=lambda settings: settings.mentions,
)
