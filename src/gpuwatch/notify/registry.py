"""The channels gpuwatch can send to: one entry each, the one place that names them.

A :class:`ChannelSpec` declares a channel's name (its config section and its name in
``alerts.routes``), how its section is read, how the channel is built from it (secrets resolved
from the environment here, never in the config), which of its values are secrets (masked in every
log line), whether it carries the scheduled reports or only alerts, and its limits. The config
parser, the CLI and the daemon's routing find channels here; adding one (DingTalk, WeCom, Slack, a
generic webhook) is a module with its channel class and one entry in :data:`CHANNELS`.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..config import ConfigError, EmailConfig, FeishuConfig, parse_email_section, parse_feishu_section
from .base import Channel
from .email import EmailChannel, EmailSettings
from .feishu import FeishuChannel, FeishuSettings

Sleep = Callable[[float], None]


@dataclass(frozen=True)
class Limits:
    """What the service accepts: at most this many bytes per body, sends per second and per minute
    (``None``: no limit of its own)."""

    max_body_bytes: int | None = None
    per_second: int | None = None
    per_minute: int | None = None


@dataclass(frozen=True)
class ChannelSpec:
    name: str
    parse: Callable[[object, Path], Any]  # the YAML section -> its settings (ConfigError naming the key)
    build: Callable[[Any, Sleep, threading.Event | None], Channel]  # settings -> channel (ConfigError)
    secrets: Callable[[Any], list[str]]  # the secret values in use, to mask in logs
    inline_secrets: tuple[str, ...]  # keys that put a secret in the file itself
    carries_reports: bool  # scheduled reports go here (chat), or only the alerts routed to it
    limits: Limits
    mentions: Callable[[Any], Mapping[str, str]] = lambda settings: {}  # user -> the channel's id for @


def _env_secret(value: str | None, env: str | None, key: str) -> str | None:
    if env and not value:
        raise ConfigError(f"{key}: ${env} is not set in the environment")
    return value


FEISHU_LIMITS = Limits(max_body_bytes=20_000, per_second=5, per_minute=100)


def _build_feishu(cfg: FeishuConfig, sleep: Sleep, stop: threading.Event | None) -> Channel:
    url = cfg.resolve_url()
    if not url:
        raise ConfigError(f"feishu.url_env: ${cfg.url_env} is not set in the environment")
    if cfg.url_env and url != cfg.url and not _webhook_url(url):  # the config's own url is checked when read
        raise ConfigError(
            f"feishu.url_env: ${cfg.url_env} does not hold a webhook URL "
            "(expected https://open.feishu.cn/open-apis/bot/v2/hook/<token>)"
        )
    secret = _env_secret(cfg.resolve_secret(), cfg.secret_env, "feishu.secret_env")
    assert FEISHU_LIMITS.max_body_bytes and FEISHU_LIMITS.per_second and FEISHU_LIMITS.per_minute
    try:
        settings = FeishuSettings(
            url=url,
            keyword=cfg.keyword,
            secret=secret,
            format=cfg.format,
            mentions=dict(cfg.mentions),
            max_body_bytes=FEISHU_LIMITS.max_body_bytes,
            per_second=FEISHU_LIMITS.per_second,
            per_minute=FEISHU_LIMITS.per_minute,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return FeishuChannel(settings, sleep=sleep, stop=stop)


def _webhook_url(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.hostname) and bool(parts.path.strip("/"))


def _build_email(cfg: EmailConfig, sleep: Sleep, stop: threading.Event | None) -> Channel:
    password = _env_secret(cfg.resolve_password(), cfg.password_env, "email.password_env")
    if cfg.ca_file:
        try:  # read at the first send otherwise: say it now, not when an alert is due
            ssl.create_default_context().load_verify_locations(cafile=cfg.ca_file)
        except (OSError, ssl.SSLError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not a PEM file of certificates"
            raise ConfigError(f"email.ca_file: {cfg.ca_file} cannot be read: {why}") from None
    try:
        settings = EmailSettings(
            to=cfg.to,
            sender=cfg.sender,
            smtp_host=cfg.smtp_host,
            smtp_port=cfg.smtp_port,
            username=cfg.username,
            password=password,
            tls=cfg.tls,
            ca_file=cfg.ca_file,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return EmailChannel(settings, sleep=sleep, stop=stop)


def _values(*values: str | None) -> list[str]:
    return [v for v in values if v]


FEISHU = ChannelSpec(
    name="feishu",
    parse=lambda raw, base: parse_feishu_section(raw),
    build=_build_feishu,
    secrets=lambda cfg: _values(cfg.resolve_secret(), cfg.resolve_url()),
    inline_secrets=("secret", "url"),
    carries_reports=True,
    limits=FEISHU_LIMITS,
    mentions=lambda cfg: cfg.mentions,
)
EMAIL = ChannelSpec(
    name="email",
    parse=parse_email_section,
    build=_build_email,
    secrets=lambda cfg: _values(cfg.resolve_password()),
    inline_secrets=("password",),
    carries_reports=False,  # an inbox gets the alerts routed to it, not an overview every hour
    limits=Limits(),
)

CHANNELS: tuple[ChannelSpec, ...] = (FEISHU, EMAIL)
CHANNEL_NAMES: tuple[str, ...] = tuple(spec.name for spec in CHANNELS)
_BY_NAME = {spec.name: spec for spec in CHANNELS}


def channel_spec(name: str) -> ChannelSpec | None:
    """The spec of a configured channel; ``None`` for one of gpuwatch's own (the console)."""
    return _BY_NAME.get(name)
