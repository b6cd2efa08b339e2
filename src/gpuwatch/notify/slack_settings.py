"""The Slack channel as the config and ``check`` see it: ``slack:``, read and checked once.

:class:`SlackSettings` is the one record of an incoming webhook: ``url`` or ``url_env``, mentions,
and the limits the sender keeps (Slack's, :data:`LIMITS`). Building the channel
(:func:`gpuwatch.notify.slack.build`) only resolves the URL from the environment. The URL is a
secret (its last three path segments): the repr masks it, :func:`secrets` lists it for logs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..config.values import ConfigError, check_keys, from_env, mapping
from .masking import present, redact_url, url_secrets
from .spec import ChannelSpec, Limits, require_positive, settings_of, url_and_mentions

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
class SlackSettings:
    """One Slack incoming webhook. ``url`` is a secret; None when ``url_env`` names it."""

    url: str | None = field(default=None, repr=False)
    mentions: Mapping[str, str] = field(default_factory=dict)  # user -> Slack member id (U...)
    url_env: str | None = None
    timeout_seconds: float = 10.0
    max_body_bytes: int = MAX_BODY_BYTES
    per_second: int = PER_SECOND
    max_attempts: int = 5

    def __post_init__(self) -> None:
        if self.url is None and not self.url_env:
            raise ValueError("slack: needs 'url' (the incoming webhook) or 'url_env'")
        if self.url is not None and (
            urlsplit(self.url).scheme not in ("http", "https") or not urlsplit(self.url).path.strip("/")
        ):
            raise ValueError("slack.url: expected https://hooks.slack.com/services/T.../B.../...")
        for user, member in self.mentions.items():
            if not _MEMBER_ID.fullmatch(member):
                raise ValueError(f"slack.mentions.{user}: {member!r} is not a Slack member id (like U0123ABCD)")
        require_positive(self, ("timeout_seconds", "max_body_bytes", "per_second", "max_attempts"), "slack")

    def __repr__(self) -> str:
        shown = redact(self.url) if self.url else None
        return f"SlackSettings(url={shown!r}, mentions={dict(self.mentions)!r})"

    def resolve_url(self, environ: Mapping[str, str] | None = None) -> str | None:
        return from_env(self.url_env, self.url, environ)

    def resolved(self, environ: Mapping[str, str] | None = None) -> SlackSettings:
        """These settings with the URL read from the environment (ConfigError when it is unset)."""
        url = self.resolve_url(environ)
        if not url:
            raise ConfigError(f"slack.url_env: ${self.url_env} is not set in the environment")
        resolved: SlackSettings = settings_of(lambda: replace(self, url=url))
        return resolved


def parse(raw: object, base: Path) -> SlackSettings:
    """``slack:`` -> :class:`SlackSettings` (ConfigError naming the key path)."""
    section = mapping(raw, "slack")
    check_keys(section, KEYS, "slack")
    values: dict[str, Any] = url_and_mentions(
        section, "slack", "the incoming webhook, https://hooks.slack.com/services/..."
    )
    settings: SlackSettings = settings_of(lambda: SlackSettings(**values))
    return settings


def secrets(settings: SlackSettings) -> list[str]:
    """The secret values in use (the URL and its secret segments), to mask in logs."""
    url = settings.resolve_url()
    return present(url, *secret_parts(url or ""))


def describe(settings: SlackSettings) -> str:
    """What ``check`` says of the webhook: how many people it can @."""
    return f"incoming webhook, {len(settings.mentions)} mention(s)"


SPEC = ChannelSpec(
    name="slack",
    parse=parse,
    sender="gpuwatch.notify.slack",
    secrets=secrets,
    inline_secrets=("url",),
    describe=describe,
    carries_reports=True,
    limits=LIMITS,
    mentions=lambda settings: settings.mentions,
)
