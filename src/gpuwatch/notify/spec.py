"""What a channel declares: its :class:`ChannelSpec`, its :class:`Limits`, and the :class:`Transport`
it is built with.

Each channel module (``notify/<name>.py``) ends in one ``SPEC``: how its section is read and
checked, the function that builds its sender, its secrets, its limits and how ``check`` describes
it. Also here: the checks every channel's settings share (a positive number, a secret that must be
set in the environment, ``url``/``url_env``/``mentions``) and :class:`UrlSettings`, the settings
every webhook channel extends.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from ..config.values import ConfigError, from_env, string, string_map
from .base import Channel
from .masking import present, redact_url, url_secrets

Sleep = Callable[[float], None]
U = TypeVar("U", bound="UrlSettings")
T = TypeVar("T")


@dataclass(frozen=True)
class Limits:
    """What the service accepts: at most ``max_body_bytes`` of ``measured`` (UTF-8 bytes as sent),
    sends per second and per minute (``None``: no limit of its own), and what a message too big
    for one is split between (``split_unit``), into numbered parts. A channel's settings take
    their defaults from these, and its sender enforces its settings."""

    max_body_bytes: int | None = None
    per_second: int | None = None
    per_minute: int | None = None
    measured: str = "request body"
    split_unit: str = "a host's block or an alert (never cut unless one alone is too big)"
    other: str = ""  # further limits the channel keeps (a card's components, Slack's blocks)


@dataclass(frozen=True)
class Transport:
    """The I/O a channel is built with: ``sleep`` paces retries and rate limits, ``stop`` ends a
    send in flight within about a second (SIGTERM), ``environ`` is where secrets are read from
    (``None``: the process environment)."""

    sleep: Sleep = time.sleep
    stop: threading.Event | None = None
    environ: Mapping[str, str] | None = None


def _no_mentions(settings: Any) -> Mapping[str, str]:
    return {}


@dataclass(frozen=True)
class ChannelSpec:
    """One channel, as the config, the CLI and the daemon see it.

    ``parse`` reads its YAML section into its settings (checked once, ConfigError naming the key
    path); ``sender`` makes the channel from those settings and a :class:`Transport`, only
    resolving secrets from the environment (ConfigError when one is unset); ``secrets``
    lists the secret values in use (masked in every log line); ``inline_secrets`` the keys that
    put a secret in the file itself; ``describe`` says what ``check`` found in words.
    """

    name: str
    parse: Callable[[object, Path], Any]
    sender: Callable[[Any, Transport], Channel]
    secrets: Callable[[Any], list[str]]
    inline_secrets: tuple[str, ...]
    describe: Callable[[Any], str]
    carries_reports: bool  # scheduled reports go here (chat), or only the alerts routed to it
    limits: Limits
    mentions: Callable[[Any], Mapping[str, str]] = _no_mentions  # user -> the channel's id for @
    alerts_only: bool = False  # takes alerts only: never a report, even as the only channel (Alertmanager)

    def build(self, settings: Any, sleep: Sleep = time.sleep, stop: threading.Event | None = None) -> Channel:
        """The channel from its parsed settings, secrets read from the environment now (ConfigError
        naming the key when one is unset)."""
        return self.sender(settings, Transport(sleep=sleep, stop=stop))


# ---------------------------------------------------------------- shared checks


def require_positive(settings: object, names: tuple[str, ...], section: str) -> None:
    """Each of ``names`` on ``settings`` is a positive, finite number; else ValueError naming it."""
    for name in names:
        value = getattr(settings, name)
        if not (value > 0 and math.isfinite(value)):  # NaN compares false both ways
            raise ValueError(f"{section}.{name}: must be a positive number")


def env_secret(value: str | None, env: str | None, key: str) -> str | None:
    """``value``, or a ConfigError when the variable ``env`` (named at ``key``) should give it and is unset."""
    if env and not value:
        raise ConfigError(f"{key}: ${env} is not set in the environment")
    return value


def settings_of(make: Callable[[], T]) -> T:
    """``make()``, a settings check's ValueError said as a ConfigError (its text names the key)."""
    try:
        return make()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def url_and_mentions(section: Mapping[str, Any], name: str, example: str) -> dict[str, Any]:
    """``url`` / ``url_env`` (one is needed) and ``mentions`` of a chat channel's section."""
    values: dict[str, Any] = {}
    for key in ("url", "url_env"):
        if section.get(key) is not None:
            values[key] = string(section[key], f"{name}.{key}")
    if "url" in values and not re.match(r"https?://", values["url"]):
        raise ConfigError(f"{name}.url: expected an http(s):// webhook URL, got {values['url'][:40]!r}")
    if "url" not in values and "url_env" not in values:
        raise ConfigError(f"{name}: needs 'url' ({example}) or 'url_env'")
    if section.get("mentions") is not None:
        values["mentions"] = string_map(section["mentions"], f"{name}.mentions")
    return values


# ---------------------------------------------------------------- what the webhook channels share


@dataclass(frozen=True)
class Endpoint:
    """What a webhook sender needs of its settings: the URL (resolved), how logs show it
    (``where``), the secrets to scrub, the rate limits, the per-post deadline and the attempts."""

    url: str
    where: str
    secrets: Sequence[str]
    per_second: int | None = None
    per_minute: int | None = None
    timeout_seconds: float = 10.0
    max_attempts: int = 5


@dataclass(frozen=True, repr=False)
class UrlSettings:
    """The settings every webhook channel shares: the URL (a secret), or ``url_env``, the variable
    that holds it; the per-post deadline, the attempts, and the rate limits (None: none of the
    channel's own). A channel's settings extend it with their own fields and say, in class
    attributes, their section, the URL's shape and where its secret is; :meth:`check` adds their
    own checks. Every number field must be positive."""

    SECTION: ClassVar[str] = "webhook"
    URL_SHAPE: ClassVar[str] = "an http(s):// URL"
    SECRET_SEGMENTS: ClassVar[int] = 1  # the URL's last path segments that are secret (0: its query values)

    url: str | None = field(default=None, repr=False)
    url_env: str | None = None
    timeout_seconds: float = 10.0  # the most one post may take: connect, send, and the whole answer
    max_attempts: int = 5
    per_second: int | None = None
    per_minute: int | None = None

    def __post_init__(self) -> None:
        if self.url is None and not self.url_env:
            raise ValueError(f"{self.SECTION}: needs 'url' or 'url_env'")
        if self.url is not None and not self.url_fits(self.url):
            raise ValueError(f"{self.SECTION}.url: expected {self.URL_SHAPE}")
        self.check()
        numbers = [
            f.name
            for f in fields(self)
            if f.type in ("int", "float", "int | None") and getattr(self, f.name) is not None
        ]
        require_positive(self, tuple(numbers), self.SECTION)

    def url_fits(self, url: str) -> bool:
        """Whether ``url`` has the shape of this channel's webhook (its token where expected)."""
        raise NotImplementedError

    def check(self) -> None:
        """The channel's own checks (ValueError naming the key)."""

    def redact(self, url: str) -> str:
        """``url`` as logs and errors may show it, its secret parts masked."""
        return redact_url(url, path_segments=self.SECRET_SEGMENTS)

    def own_secrets(self) -> list[str]:
        """The channel's secrets beyond the URL (a signing secret, header values), as set now."""
        return []

    def resolve_url(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The URL: from ``url_env`` when it is set in the environment, else ``url``."""
        return from_env(self.url_env, self.url, environ)

    def resolved_extra(self, environ: Mapping[str, str] | None) -> dict[str, Any]:
        """The channel's other values read from the environment when it is built (ConfigError)."""
        return {}

    def resolved(self: U, environ: Mapping[str, str] | None = None) -> U:
        """These settings with the URL (and the channel's other secrets) read from the environment:
        ConfigError naming the key when a variable is unset."""
        url = self.resolve_url(environ)
        if not url:
            raise ConfigError(f"{self.SECTION}.url_env: ${self.url_env} is not set in the environment")
        changes = {"url": url, **self.resolved_extra(environ)}
        return settings_of(lambda: replace(self, **changes))

    def secret_values(self) -> list[str]:
        """Every secret value in use (the URL, its secret parts, the others), to mask in logs."""
        url = self.resolve_url()
        return present(url, *url_secrets(url or "", path_segments=self.SECRET_SEGMENTS), *self.own_secrets())

    def endpoint(self) -> Endpoint:
        """Where and how fast the sender posts (the settings resolved: see :meth:`resolved`)."""
        url = self.url
        if not url:
            raise ValueError(f"{self.SECTION}.url: not resolved; build the channel from its settings with build()")
        return Endpoint(
            url,
            where=self.redact(url),
            secrets=present(*url_secrets(url, path_segments=self.SECRET_SEGMENTS), *self.own_secrets()),
            per_second=self.per_second,
            per_minute=self.per_minute,
            timeout_seconds=self.timeout_seconds,
            max_attempts=self.max_attempts,
        )


def url_secret_values(settings: UrlSettings) -> list[str]:
    """A spec's ``secrets`` for a webhook channel."""
    return settings.secret_values()
