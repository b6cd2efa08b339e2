"""The Slack channel as the config and ``check`` see it: ``slack:``, read and checked once.

:class:`SlackSettings` is the one record of an incoming webhook: ``url`` or ``url_env``, mentions,
and the limits the sender keeps (Slack's, :data:`LIMITS`). Building the channel
(:func:`gpuwatch.notify.slack.build`) only resolves the URL from the environment. The URL is a
secret (its last three path segments): the repr masks it, :func:`secrets` lists it for logs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..config.values import check_keys, mapping
from .masking import redact_url, url_secrets
from .spec import ChannelSpec, Limits, UrlSettings, settings_of, url_and_mentions, url_secret_values

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


SPEC = ChannelSpec(
    name="slack",
    parse=parse,
    sender="gpuwatch.notify.slack",
    secrets=url_secret_values,
    inline_secrets=("url",),
    describe=describe,
    carries_reports=True,
    limits=LIMITS,
    mentions=lambda settings: settings.mentions,
)
