"""What a channel declares: its :class:`ChannelSpec`, its :class:`Limits`, and the :class:`Transport`
it is built with.

Light on purpose (no HTTP or SMTP library): the config reads every channel's section through its
spec, and reading a config must not load a sender. A spec names its sender module instead
(``sender``); :func:`gpuwatch.notify.registry.build` loads that module when a channel is built.
Also here: the checks every channel's settings share (a positive number, a secret that must be
set in the environment, ``url``/``url_env``/``mentions``).
"""

from __future__ import annotations

import importlib
import math
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config.values import ConfigError, string, string_map
from .base import Channel

Sleep = Callable[[float], None]


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
    path); ``sender`` is the module whose ``build(settings, transport) -> Channel`` makes the
    channel, resolving secrets from the environment (ConfigError when one is unset); ``secrets``
    lists the secret values in use (masked in every log line); ``inline_secrets`` the keys that
    put a secret in the file itself; ``describe`` says what ``check`` found in words.
    """

    name: str
    parse: Callable[[object, Path], Any]
    sender: str
    secrets: Callable[[Any], list[str]]
    inline_secrets: tuple[str, ...]
    describe: Callable[[Any], str]
    carries_reports: bool  # scheduled reports go here (chat), or only the alerts routed to it
    limits: Limits
    mentions: Callable[[Any], Mapping[str, str]] = _no_mentions  # user -> the channel's id for @

    def build(self, settings: Any, sleep: Sleep = time.sleep, stop: threading.Event | None = None) -> Channel:
        """The channel from its parsed settings, secrets read from the environment now (ConfigError
        naming the key when one is unset). The sender module is loaded here, not when the config is
        read: that is what keeps HTTP and SMTP libraries out of a config check."""
        module = importlib.import_module(self.sender)
        channel: Channel = module.build(settings, Transport(sleep=sleep, stop=stop))
        return channel


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


def settings_of(make: Callable[[], Any]) -> Any:
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
