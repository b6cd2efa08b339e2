"""The channels gpuwatch can send to: one entry each, the one place that names them.

A :class:`ChannelSpec` declares a channel's name (its config section and its name in
``alerts.routes``), how its section is read, how the channel is built from it (secrets resolved
from the environment here, never in the config), which of its values are secrets (masked in every
log line), whether it carries the scheduled reports or only alerts, and its limits (as data: what
is measured against how many bytes, the sending rate, what a message is split between). The
config parser, the CLI and the daemon's routing find channels here; adding one is a module with
its channel class and one entry in :data:`CHANNELS`. Every channel goes through the same outbox,
retries, routes, silences, ``test-notify`` and ``--dry-run``.
"""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from ..config import (
    ConfigError,
    DingTalkConfig,
    EmailConfig,
    FeishuConfig,
    SlackConfig,
    WebhookConfig,
    WeComConfig,
    from_env,
    parse_dingtalk_section,
    parse_email_section,
    parse_feishu_section,
    parse_slack_section,
    parse_webhook_section,
    parse_wecom_section,
)
from . import dingtalk, slack, webhook, wecom
from .base import Channel
from .dingtalk import DingTalkChannel, DingTalkSettings
from .email import EmailChannel, EmailSettings
from .feishu import FeishuChannel, FeishuSettings
from .http import url_secrets
from .slack import SlackChannel, SlackSettings
from .webhook import WebhookJsonChannel, WebhookSettings
from .wecom import WeComChannel, WeComSettings

Sleep = Callable[[float], None]


@dataclass(frozen=True)
class Limits:
    """What the service accepts: at most ``max_body_bytes`` of ``measured`` (UTF-8 bytes as sent),
    sends per second and per minute (``None``: no limit of its own), and what a message too big
    for one is split between (``split_unit``), into numbered parts."""

    max_body_bytes: int | None = None
    per_second: int | None = None
    per_minute: int | None = None
    measured: str = "request body"
    split_unit: str = "a host's block or an alert (never cut unless one alone is too big)"
    other: str = ""  # further limits the channel keeps (a card's components, Slack's blocks)


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


FEISHU_LIMITS = Limits(
    max_body_bytes=20_000,
    per_second=5,
    per_minute=100,
    measured="request body, signature fields included",
    other="a card holds at most 200 components",
)
DINGTALK_LIMITS = Limits(max_body_bytes=dingtalk.MAX_BODY_BYTES, per_minute=dingtalk.PER_MINUTE)
WECOM_LIMITS = Limits(
    max_body_bytes=wecom.MAX_MARKDOWN_BYTES,
    per_minute=wecom.PER_MINUTE,
    measured="markdown.content (format text: text.content, at most 2,048 bytes)",
)
SLACK_LIMITS = Limits(
    max_body_bytes=slack.MAX_BODY_BYTES,
    per_second=slack.PER_SECOND,
    other="at most 50 blocks, 3,000 characters a section, 150 a header",
)
WEBHOOK_LIMITS = Limits(max_body_bytes=webhook.MAX_BODY_BYTES, per_second=webhook.PER_SECOND)


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


def _url(cfg: Any, name: str) -> str:
    url = cfg.resolve_url()
    if not url:
        raise ConfigError(f"{name}.url_env: ${cfg.url_env} is not set in the environment")
    return str(url)


def _settings(make: Callable[[], Any]) -> Any:
    try:
        return make()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _build_dingtalk(cfg: DingTalkConfig, sleep: Sleep, stop: threading.Event | None) -> Channel:
    url = _url(cfg, "dingtalk")
    secret = _env_secret(cfg.resolve_secret(), cfg.secret_env, "dingtalk.secret_env")
    settings = _settings(
        lambda: DingTalkSettings(url=url, secret=secret, keyword=cfg.keyword, mentions=dict(cfg.mentions))
    )
    return DingTalkChannel(settings, sleep=sleep, stop=stop)


def _build_wecom(cfg: WeComConfig, sleep: Sleep, stop: threading.Event | None) -> Channel:
    url = _url(cfg, "wecom")
    settings = _settings(lambda: WeComSettings(url=url, format=cfg.format, mentions=dict(cfg.mentions)))
    return WeComChannel(settings, sleep=sleep, stop=stop)


def _build_slack(cfg: SlackConfig, sleep: Sleep, stop: threading.Event | None) -> Channel:
    url = _url(cfg, "slack")
    settings = _settings(lambda: SlackSettings(url=url, mentions=dict(cfg.mentions)))
    return SlackChannel(settings, sleep=sleep, stop=stop)


def load_template(path: str) -> Any:
    """A webhook template: a JSON file (ConfigError naming it when unreadable or not JSON)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"webhook.template: cannot read {path}: {exc.strerror or exc}") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"webhook.template: {path} is not JSON: {exc}") from None


def _build_webhook(cfg: WebhookConfig, sleep: Sleep, stop: threading.Event | None) -> Channel:
    url = _url(cfg, "webhook")
    for header, name in cfg.header_env.items():
        _env_secret(from_env(name, None), name, f"webhook.header_env.{header}")
    template = load_template(cfg.template) if cfg.template else None
    max_bytes = cfg.max_bytes or webhook.MAX_BODY_BYTES
    settings = _settings(
        lambda: WebhookSettings(url=url, headers=cfg.resolve_headers(), template=template, max_body_bytes=max_bytes)
    )
    return WebhookJsonChannel(settings, sleep=sleep, stop=stop)


def _query_values(url: str | None) -> list[str]:
    return [v for _, v in parse_qsl(urlsplit(url or "").query) if v]


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
DINGTALK = ChannelSpec(
    name="dingtalk",
    parse=lambda raw, base: parse_dingtalk_section(raw),
    build=_build_dingtalk,
    secrets=lambda cfg: _values(cfg.resolve_secret(), cfg.resolve_url(), *_query_values(cfg.resolve_url())),
    inline_secrets=("secret", "url"),
    carries_reports=True,
    limits=DINGTALK_LIMITS,
    mentions=lambda cfg: cfg.mentions,
)
WECOM = ChannelSpec(
    name="wecom",
    parse=lambda raw, base: parse_wecom_section(raw),
    build=_build_wecom,
    secrets=lambda cfg: _values(cfg.resolve_url(), *_query_values(cfg.resolve_url())),
    inline_secrets=("url",),
    carries_reports=True,
    limits=WECOM_LIMITS,
    mentions=lambda cfg: cfg.mentions,
)
SLACK = ChannelSpec(
    name="slack",
    parse=lambda raw, base: parse_slack_section(raw),
    build=_build_slack,
    secrets=lambda cfg: _values(cfg.resolve_url(), *url_secrets(cfg.resolve_url() or "", path_segments=3)),
    inline_secrets=("url",),
    carries_reports=True,
    limits=SLACK_LIMITS,
    mentions=lambda cfg: cfg.mentions,
)
WEBHOOK = ChannelSpec(
    name="webhook",
    parse=parse_webhook_section,
    build=_build_webhook,
    secrets=lambda cfg: _values(
        cfg.resolve_url(), *url_secrets(cfg.resolve_url() or ""), *cfg.resolve_headers().values()
    ),
    inline_secrets=("url", "headers"),
    carries_reports=True,
    limits=WEBHOOK_LIMITS,
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

CHANNELS: tuple[ChannelSpec, ...] = (FEISHU, DINGTALK, WECOM, SLACK, WEBHOOK, EMAIL)
CHANNEL_NAMES: tuple[str, ...] = tuple(spec.name for spec in CHANNELS)
_BY_NAME = {spec.name: spec for spec in CHANNELS}


def channel_spec(name: str) -> ChannelSpec | None:
    """The spec of a configured channel; ``None`` for one of gpuwatch's own (the console)."""
    return _BY_NAME.get(name)
