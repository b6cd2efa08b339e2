"""YAML config -> frozen dataclasses, with one ConfigError that names the key path.

The key names are a public interface (README, config.example.yaml). The predecessor's flat
config (``ip_list``, ``port``, ``user``, ``password``, ``feishu_url``, ``feishu_keyword``)
is accepted unchanged and mapped onto the same structure.

Nothing here opens a connection or reads a secret from the environment: secrets named by
``*_env`` keys are read when they are used, so a rotated secret needs no config change.
"""

from __future__ import annotations

import contextvars
import difflib
import ipaddress
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from . import text
from .text import QUOTE_LIMIT, format_duration, quote

DEFAULT_CONFIG_NAME = "config.yaml"
CONFIG_ENV = "GPUWATCH_CONFIG"
HOST_KEY_POLICIES = ("accept-new", "strict", "off")
FEISHU_FORMATS = ("text", "post", "card")
REPORT_KINDS = ("overview", "user", "free")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# The one host entry polled on this machine without SSH: the name ``localhost``, bare or as a mapping
# with no key but these. An address, or any key about the connection (port, user, proxy_jump, ...),
# makes it an SSH host like any other: an SSH tunnel to 127.0.0.1:2222 is another machine.
LOCAL_NAME = "localhost"
LOCAL_KEYS = frozenset({"name", "nvidia_smi", "command_timeout"})


class ConfigError(Exception):
    """A config problem, said once, with the file and key path. The CLI exits 2 on it."""


def from_env(name: str | None, fallback: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """A secret: the environment variable ``name`` when it is set and not empty, else ``fallback``."""
    env = os.environ if environ is None else environ
    if name and env.get(name):
        return env[name]
    return fallback


@dataclass(frozen=True)
class SshSettings:
    """How to reach a host. Every key can be set under ``ssh:`` and overridden per host."""

    user: str | None = None  # None: ~/.ssh/config's User, else the local user
    port: int | None = None  # None: ~/.ssh/config's Port, else 22
    key_file: str | None = None
    password: str | None = field(default=None, repr=False)
    password_env: str | None = None
    known_hosts: str | None = "~/.ssh/known_hosts"
    host_key_policy: str = "accept-new"
    connect_timeout: float = 10.0
    command_timeout: float = 30.0
    keepalive: float = 30.0
    proxy_jump: str | None = None
    nvidia_smi: str = "nvidia-smi"
    use_ssh_config: bool = True

    def resolve_password(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The password: from ``password_env`` when it is set in the environment, else ``password``."""
        return from_env(self.password_env, self.password, environ)


SSH_KEYS = tuple(f for f in SshSettings.__dataclass_fields__)


@dataclass(frozen=True)
class HostConfig:
    """One configured host. ``explicit`` holds the ssh keys set on this host's own entry."""

    name: str
    address: str | None  # None: resolve ``name`` through ~/.ssh/config, then DNS
    ssh: SshSettings
    explicit: frozenset[str] = frozenset()
    local: bool = False  # polled on this machine, without SSH

    @property
    def display_address(self) -> str:
        return "local" if self.local else (self.address or self.name)


@dataclass(frozen=True)
class FeishuConfig:
    url: str | None = field(default=None, repr=False)  # the token in it is a secret
    url_env: str | None = None
    keyword: str | None = None
    secret: str | None = field(default=None, repr=False)
    secret_env: str | None = None
    format: str = "post"
    mentions: Mapping[str, str] = field(default_factory=dict)

    def resolve_url(self, environ: Mapping[str, str] | None = None) -> str | None:
        return from_env(self.url_env, self.url, environ)

    def resolve_secret(self, environ: Mapping[str, str] | None = None) -> str | None:
        return from_env(self.secret_env, self.secret, environ)


@dataclass(frozen=True)
class ReportSchedule:
    report: str  # overview | user | free
    every: float | None = None  # seconds
    at: str | None = None  # "HH:MM", daily
    user: str | None = None  # for report: user

    def describe(self) -> str:
        when = f"every {format_duration(self.every)}" if self.every else f"daily at {self.at}"
        who = f" for {self.user}" if self.user else ""
        return f"{self.report}{who} {when}"

    @property
    def scope(self) -> str:
        """What the report covers: ``overview``, ``free``, ``user:alice`` (its name for ``--report``;
        a newer report of one scope replaces an older one still waiting to be sent)."""
        return f"{self.report}:{self.user}" if self.user else self.report


DEFAULT_REPORTS = (ReportSchedule(report="overview", every=3600.0),)


@dataclass(frozen=True)
class ScheduleConfig:
    poll_every: float = 60.0
    reports: tuple[ReportSchedule, ...] = DEFAULT_REPORTS


@dataclass(frozen=True)
class FreeGpuConfig:
    """When a GPU counts as free: both below their thresholds."""

    memory_below_mib: int = 1024
    util_below_percent: int = 10


@dataclass(frozen=True)
class AlertsConfig:
    """The alert rules switched on, each with its own settings, and the Alertmanager-style
    lifecycle settings.

    ``rules`` maps a rule's name (see ``rules.registry``) to its parsed config. The parser fills
    it: without an ``alerts:`` section, the alerts admins want most are on (a host down for 3
    polls, a GPU missing, a GPU error); an ``alerts:`` section lists every rule wanted.
    """

    rules: Mapping[str, object] = field(default_factory=dict)
    for_seconds: float = 0.0
    repeat_every: float = 4 * 3600.0
    send_resolved: bool = True
    routes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # rule (or "default") -> channels


@dataclass(frozen=True)
class HostContextConfig:
    """What the probe shows of the rest of the host (``host_context:``)."""

    disks: tuple[str, ...] = ("/", "/home", "/tmp")  # noqa: S108 (paths on the host, whose disks are shown)
    full_percent: int = 90  # any other local mount at least this full is shown too


@dataclass(frozen=True)
class AttributionConfig:
    """How the person behind a GPU process is found beyond ``ps`` (``attribution:``)."""

    owner_label: str | None = "owner"  # a container label naming its owner; None: labels are not used
    rootless_owner: bool = True  # a rootless container belongs to the user who runs it


@dataclass(frozen=True)
class EmailConfig:
    to: tuple[str, ...]
    sender: str
    smtp_host: str
    smtp_port: int = 587
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    password_env: str | None = None
    tls: str = "starttls"
    ca_file: str | None = None

    def resolve_password(self, environ: Mapping[str, str] | None = None) -> str | None:
        return from_env(self.password_env, self.password, environ)


@dataclass(frozen=True)
class DingTalkConfig:
    """``dingtalk:``: a DingTalk group robot (access token in the URL, optional signing secret)."""

    url: str | None = field(default=None, repr=False)  # the access_token in it is a secret
    url_env: str | None = None
    secret: str | None = field(default=None, repr=False)
    secret_env: str | None = None
    keyword: str | None = None
    mentions: Mapping[str, str] = field(default_factory=dict)  # user -> mobile number or DingTalk userId

    def resolve_url(self, environ: Mapping[str, str] | None = None) -> str | None:
        return from_env(self.url_env, self.url, environ)

    def resolve_secret(self, environ: Mapping[str, str] | None = None) -> str | None:
        return from_env(self.secret_env, self.secret, environ)


@dataclass(frozen=True)
class WeComConfig:
    """``wecom:``: a WeCom group robot (its key, in the URL, is the secret)."""

    url: str | None = field(default=None, repr=False)
    url_env: str | None = None
    format: str = "markdown"
    mentions: Mapping[str, str] = field(default_factory=dict)  # user -> WeCom userid

    def resolve_url(self, environ: Mapping[str, str] | None = None) -> str | None:
        return from_env(self.url_env, self.url, environ)


@dataclass(frozen=True)
class SlackConfig:
    """``slack:``: a Slack incoming webhook (the URL is the secret)."""

    url: str | None = field(default=None, repr=False)
    url_env: str | None = None
    mentions: Mapping[str, str] = field(default_factory=dict)  # user -> Slack member id (U...)

    def resolve_url(self, environ: Mapping[str, str] | None = None) -> str | None:
        return from_env(self.url_env, self.url, environ)


@dataclass(frozen=True)
class WebhookConfig:
    """``webhook:``: JSON POSTed to any URL, in the default document or a template's shape."""

    url: str | None = field(default=None, repr=False)
    url_env: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)  # values are secrets
    header_env: Mapping[str, str] = field(default_factory=dict)  # header -> variable holding its value
    template: str | None = None  # a JSON file (absolute path)
    max_bytes: int | None = None

    def resolve_url(self, environ: Mapping[str, str] | None = None) -> str | None:
        return from_env(self.url_env, self.url, environ)

    def resolve_headers(self, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """The headers, those of ``header_env`` read from the environment (unset ones left out)."""
        values = dict(self.headers)
        for header, name in self.header_env.items():
            value = from_env(name, None, environ)
            if value:
                values[header] = value
        return values


@dataclass(frozen=True)
class WebAuth:
    """HTTP Basic for the page, the API and /metrics; the password comes from the environment."""

    user: str
    password_env: str

    def resolve_password(self, environ: Mapping[str, str] | None = None) -> str | None:
        return from_env(self.password_env, None, environ)


@dataclass(frozen=True)
class WebConfig:
    """``web:``: the live page, the JSON API and /metrics, served by the daemon."""

    host: str = "127.0.0.1"
    port: int = 8787  # 0: any free port (the log says which)
    base_path: str = ""  # "" or "/gpuwatch": the path prefix behind a reverse proxy
    auth: WebAuth | None = None
    public_url: str | None = None  # the page's address as people reach it (printed at start)

    @property
    def listen(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


@dataclass(frozen=True)
class Config:
    path: Path | None
    hosts: tuple[HostConfig, ...]
    ssh: SshSettings = SshSettings()
    state_dir: Path = Path("logs")
    schedule: ScheduleConfig = ScheduleConfig()
    free_gpu: FreeGpuConfig = FreeGpuConfig()
    alerts: AlertsConfig = AlertsConfig()
    # name -> settings of every configured channel, in registry order (notify.registry)
    channels: Mapping[str, Any] = field(default_factory=dict)
    max_parallel: int = 256
    log_level: str = "INFO"
    warnings: tuple[str, ...] = ()
    web: WebConfig | None = None  # None: the daemon serves nothing
    host_context: HostContextConfig = HostContextConfig()
    attribution: AttributionConfig = AttributionConfig()

    @property
    def feishu(self) -> FeishuConfig | None:
        settings = self.channels.get("feishu")
        return settings if isinstance(settings, FeishuConfig) else None

    @property
    def email(self) -> EmailConfig | None:
        settings = self.channels.get("email")
        return settings if isinstance(settings, EmailConfig) else None


# ---------------------------------------------------------------- durations


def parse_duration(value: object, path: str = "duration") -> float:
    """``30s``, ``5m``, ``1h``, ``2d``, ``1h30m`` or plain seconds -> seconds (text.parse_duration),
    or a ConfigError naming ``path``."""
    try:
        return text.parse_duration(value)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None


# ---------------------------------------------------------------- checking helpers


def _type_name(value: object) -> str:
    return {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        int: "a number",
        float: "a number",
        bool: "true/false",
        type(None): "empty",
    }.get(type(value), type(value).__name__)


# While :func:`accepted_keys` reads a document: each section checked -> the keys it accepts.
_CHECKED: contextvars.ContextVar[dict[str, tuple[str, ...]] | None] = contextvars.ContextVar(
    "gpuwatch_checked_keys", default=None
)


def _check_keys(raw: Mapping[str, Any], allowed: tuple[str, ...], path: str) -> None:
    checked = _CHECKED.get()
    if checked is not None:
        checked[path] = tuple(allowed)
    for key in raw:
        if not isinstance(key, str):
            raise ConfigError(f"{path or 'top level'}: key {quote(key)} must be a string")
        if key not in allowed:
            shown = key if len(key) <= QUOTE_LIMIT else quote(key)
            where = f"{path}.{shown}" if path else shown
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6) if len(key) <= QUOTE_LIMIT else []
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(allowed)}"
            raise ConfigError(f"{where}: unknown key{hint}")


def _mapping(value: object, path: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path}: expected a mapping (key: value lines), got {_type_name(value)}")
    return value


def _str(value: object, path: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(f"{path}: expected a string, got {_type_name(value)}")
    text = str(value).strip()
    if not text:
        raise ConfigError(f"{path}: must not be empty")
    return text


def _int(value: object, path: str, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str) and re.fullmatch(r"[0-9]{1,30}", value.strip()):
            value = int(value.strip())
        else:
            raise ConfigError(f"{path}: expected a whole number, got {quote(value)}")
    assert isinstance(value, int)
    if low is not None and value < low:
        limit = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ConfigError(f"{path}: {quote(value)} is out of range; it must be {limit}")
    if high is not None and value > high:
        limit = f"between {low} and {high}" if low is not None else f"at most {high}"
        raise ConfigError(f"{path}: {quote(value)} is out of range; it must be {limit}")
    return value


def _bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{path}: expected true or false, got {quote(value)}")
    return value


def _choice(value: object, path: str, choices: tuple[str, ...]) -> str:
    text = _str(value, path)
    if text not in choices:
        raise ConfigError(f"{path}: {quote(text)} is not one of {', '.join(choices)}")
    return text


def _positive_duration(value: object, path: str) -> float:
    seconds = parse_duration(value, path)
    if seconds <= 0:
        raise ConfigError(f"{path}: must be longer than 0s")
    return seconds


_SSH_PARSERS: dict[str, Callable[[object, str], object]] = {
    "user": _str,
    "port": lambda v, p: _int(v, p, 1, 65535),
    "key_file": _str,
    "password": _str,
    "password_env": _str,
    "known_hosts": lambda v, p: None if v is None or v is False else _str(v, p),
    "host_key_policy": lambda v, p: _choice(v, p, HOST_KEY_POLICIES),
    "connect_timeout": _positive_duration,
    "command_timeout": _positive_duration,
    "keepalive": parse_duration,
    "proxy_jump": _str,
    "nvidia_smi": _str,
    "use_ssh_config": _bool,
}


def _ssh_overrides(raw: Mapping[str, Any], path: str, base: Path) -> dict[str, object]:
    """Validated ``ssh:`` keys (under ``ssh:`` or on a host), file paths made absolute."""
    values: dict[str, object] = {}
    for key, value in raw.items():
        values[key] = _SSH_PARSERS[key](value, f"{path}.{key}" if path else key)
    for key in ("key_file", "known_hosts"):
        if isinstance(values.get(key), str):
            values[key] = _expand_path(str(values[key]), base)
    return values


def _expand_path(value: str, base: Path) -> str:
    p = Path(os.path.expanduser(value))
    return str(p if p.is_absolute() else base / p)


# ---------------------------------------------------------------- sections

TOP_KEYS = (
    "hosts",
    "ssh",
    "state_dir",
    "schedule",
    "free_gpu",
    "alerts",
    "max_parallel",
    "log_level",
    "web",
    "host_context",
    "attribution",
)
LEGACY_KEYS = ("ip_list", "port", "user", "password", "feishu_url", "feishu_keyword")
HOST_KEYS = ("name", "address", *SSH_KEYS)
FEISHU_KEYS = ("url", "url_env", "keyword", "secret", "secret_env", "format", "mentions")


def _parse_ssh(raw: object, base: Path) -> SshSettings:
    section = _mapping(raw, "ssh")
    _check_keys(section, SSH_KEYS, "ssh")
    values = _ssh_overrides(section, "ssh", base)
    return replace(SshSettings(), **values)  # type: ignore[arg-type]


def _parse_host(raw: object, index: int, defaults: SshSettings, base: Path) -> HostConfig:
    path = f"hosts[{index}]"
    if isinstance(raw, (str, int, float)) and not isinstance(raw, bool):
        name = _str(raw, path)
        return HostConfig(name=name, address=None, ssh=defaults, local=name == LOCAL_NAME)
    entry = _mapping(raw, path)
    if not entry:
        raise ConfigError(f"{path}: empty host entry; give a name, e.g. '- gpu-a'")
    _check_keys(entry, HOST_KEYS, path)
    if "name" not in entry and "address" not in entry:
        raise ConfigError(f"{path}: a host mapping needs 'name' (or 'address')")
    address = _str(entry["address"], f"{path}.address") if "address" in entry else None
    name = _str(entry["name"], f"{path}.name") if "name" in entry else str(address)
    overrides = _ssh_overrides({k: v for k, v in entry.items() if k in SSH_KEYS}, path, base)
    settings = replace(defaults, **overrides)  # type: ignore[arg-type]
    local = name == LOCAL_NAME and set(entry) <= LOCAL_KEYS
    return HostConfig(
        name=name,
        address=address,
        ssh=settings,
        explicit=frozenset(overrides),
        local=local,
    )


def parse_feishu_section(raw: object) -> FeishuConfig:
    section = _mapping(raw, "feishu")
    _check_keys(section, FEISHU_KEYS, "feishu")
    values: dict[str, Any] = {}
    for key in ("url", "url_env", "keyword", "secret", "secret_env"):
        if section.get(key) is not None:
            values[key] = _str(section[key], f"feishu.{key}")
    if "format" in section:
        values["format"] = _choice(section["format"], "feishu.format", FEISHU_FORMATS)
    if "mentions" in section:
        mentions = _mapping(section["mentions"], "feishu.mentions")
        values["mentions"] = {_str(k, "feishu.mentions"): _str(v, f"feishu.mentions.{k}") for k, v in mentions.items()}
    if "url" in values and not re.match(r"https?://", values["url"]):
        raise ConfigError(f"feishu.url: expected an http(s):// webhook URL, got {values['url'][:40]!r}")
    if "url" not in values and "url_env" not in values:
        raise ConfigError("feishu: needs 'url' (the bot's webhook) or 'url_env'")
    return FeishuConfig(**values)


_AT_RE = re.compile(r"([01]?\d|2[0-3]):[0-5]\d")


def _parse_schedule(raw: object) -> ScheduleConfig:
    section = _mapping(raw, "schedule")
    _check_keys(section, ("poll_every", "reports"), "schedule")
    poll_every = (
        _positive_duration(section["poll_every"], "schedule.poll_every")
        if "poll_every" in section
        else ScheduleConfig.poll_every
    )
    if "reports" not in section:
        return ScheduleConfig(poll_every=poll_every)
    raw_reports = section["reports"]
    if raw_reports is None:
        raw_reports = []
    if not isinstance(raw_reports, list):
        raise ConfigError(f"schedule.reports: expected a list, got {_type_name(raw_reports)}")
    reports = []
    for i, item in enumerate(raw_reports):
        path = f"schedule.reports[{i}]"
        entry = _mapping(item, path)
        _check_keys(entry, ("report", "every", "at", "user"), path)
        if "report" not in entry:
            raise ConfigError(f"{path}: needs 'report' ({', '.join(REPORT_KINDS)})")
        kind = _choice(entry["report"], f"{path}.report", REPORT_KINDS)
        every = _positive_duration(entry["every"], f"{path}.every") if "every" in entry else None
        at = _str(entry["at"], f"{path}.at") if "at" in entry else None
        if at is not None and not _AT_RE.fullmatch(at):
            raise ConfigError(f'{path}.at: {quote(at)} is not a time of day like "09:00"')
        if (every is None) == (at is None):
            raise ConfigError(f"{path}: give exactly one of 'every' (e.g. 1h) or 'at' (e.g. \"09:00\")")
        user = _str(entry["user"], f"{path}.user") if "user" in entry else None
        if kind == "user" and not user:
            raise ConfigError(f"{path}: report 'user' needs 'user: <name>'")
        if kind != "user" and user:
            raise ConfigError(f"{path}.user: only report 'user' takes a user")
        reports.append(ReportSchedule(report=kind, every=every, at=at, user=user))
    return ScheduleConfig(poll_every=poll_every, reports=tuple(reports))


def _parse_free(raw: object) -> FreeGpuConfig:
    section = _mapping(raw, "free_gpu")
    _check_keys(section, ("memory_below_mib", "util_below_percent"), "free_gpu")
    values: dict[str, int] = {}
    if "memory_below_mib" in section:
        values["memory_below_mib"] = _int(section["memory_below_mib"], "free_gpu.memory_below_mib", 0)
    if "util_below_percent" in section:
        values["util_below_percent"] = _int(section["util_below_percent"], "free_gpu.util_below_percent", 0, 101)
    return FreeGpuConfig(**values)


def _optional_int(value: object, path: str, low: int = 0) -> int | None:
    if value is None or value is False:
        return None
    return _int(value, path, low)


def _parse_alerts(raw: object, channel_names: tuple[str, ...]) -> AlertsConfig:
    """``alerts:``: each rule's value is parsed by the rule's own parser (rules.registry)."""
    # Imported here, not at the top: the rules import this module's helpers to parse their values.
    from .rules.registry import RULE_NAMES, default_rules, parse_rules

    if raw is None:
        return AlertsConfig(rules=default_rules())
    section = _mapping(raw, "alerts")
    _check_keys(section, (*RULE_NAMES, "for", "repeat_every", "send_resolved", "routes"), "alerts")
    # An alerts: section lists what the admin wants: rules it leaves out are off.
    v: dict[str, Any] = {"rules": parse_rules(section, "alerts")}
    if "send_resolved" in section:
        v["send_resolved"] = _bool(section["send_resolved"], "alerts.send_resolved")
    if "for" in section:
        v["for_seconds"] = parse_duration(section["for"], "alerts.for")
    if "repeat_every" in section:
        v["repeat_every"] = _positive_duration(section["repeat_every"], "alerts.repeat_every")
    if "routes" in section:
        routes = _mapping(section["routes"], "alerts.routes")
        _check_keys(routes, (*RULE_NAMES, "default"), "alerts.routes")
        parsed: dict[str, tuple[str, ...]] = {}
        for name, targets in routes.items():
            items = [targets] if isinstance(targets, str) else targets
            if not isinstance(items, list) or not items:
                raise ConfigError(f"alerts.routes.{name}: expected a list of channels, e.g. [feishu, email]")
            parsed[name] = tuple(_choice(t, f"alerts.routes.{name}", channel_names) for t in items)
        v["routes"] = parsed
    return AlertsConfig(**v)


MAX_DISKS = 32


def _parse_host_context(raw: object) -> HostContextConfig:
    """``host_context: {disks: [/, /home, /tmp], full_percent: 90}``."""
    section = _mapping(raw, "host_context")
    _check_keys(section, ("disks", "full_percent"), "host_context")
    values: dict[str, Any] = {}
    if "disks" in section:
        disks = section["disks"]
        if not isinstance(disks, list) or len(disks) > MAX_DISKS:
            raise ConfigError(
                f"host_context.disks: expected a list of at most {MAX_DISKS} paths, e.g. [/, /home, /data]"
            )
        paths = []
        for i, item in enumerate(disks):
            path = _str(item, f"host_context.disks[{i}]")
            if not path.startswith("/") or not path.isprintable() or len(path) > 1024:
                raise ConfigError(f"host_context.disks[{i}]: {quote(path)} is not an absolute path on the host")
            paths.append(path)
        values["disks"] = tuple(dict.fromkeys(paths))
    if "full_percent" in section:
        values["full_percent"] = _int(section["full_percent"], "host_context.full_percent", 1, 101)
    return HostContextConfig(**values)


def _parse_attribution(raw: object) -> AttributionConfig:
    """``attribution: {owner_label: owner, rootless_owner: true}``."""
    section = _mapping(raw, "attribution")
    _check_keys(section, ("owner_label", "rootless_owner"), "attribution")
    values: dict[str, Any] = {}
    if "owner_label" in section:
        label = section["owner_label"]
        values["owner_label"] = None if label is None or label is False else _str(label, "attribution.owner_label")
    if "rootless_owner" in section:
        values["rootless_owner"] = _bool(section["rootless_owner"], "attribution.rootless_owner")
    return AttributionConfig(**values)


def parse_email_section(raw: object, base: Path) -> EmailConfig:
    section = _mapping(raw, "email")
    keys = ("to", "from", "smtp_host", "smtp_port", "username", "password", "password_env", "tls", "ca_file")
    _check_keys(section, keys, "email")
    for required in ("to", "from", "smtp_host"):
        if required not in section:
            raise ConfigError(f"email: needs '{required}'")
    to = section["to"]
    to_list = [to] if isinstance(to, str) else to
    if not isinstance(to_list, list) or not to_list:
        raise ConfigError("email.to: expected a list of addresses")
    addresses = tuple(_str(a, f"email.to[{i}]") for i, a in enumerate(to_list))
    for i, address in enumerate(addresses):
        if "@" not in address:
            raise ConfigError(f"email.to[{i}]: {quote(address)} is not an e-mail address")
    tls = _choice(section.get("tls", "starttls"), "email.tls", ("starttls", "tls", "none"))
    port_default = 465 if tls == "tls" else 587
    values: dict[str, Any] = {
        "to": addresses,
        "sender": _str(section["from"], "email.from"),
        "smtp_host": _str(section["smtp_host"], "email.smtp_host"),
        "smtp_port": _int(section.get("smtp_port", port_default), "email.smtp_port", 1, 65535),
        "tls": tls,
    }
    for key in ("username", "password", "password_env"):
        if section.get(key) is not None:
            values[key] = _str(section[key], f"email.{key}")
    if section.get("ca_file") is not None:
        values["ca_file"] = _expand_path(_str(section["ca_file"], "email.ca_file"), base)
    if tls == "none" and (values.get("password") or values.get("password_env")):
        raise ConfigError("email.tls: 'none' would send the SMTP password in clear text; use starttls or tls")
    return EmailConfig(**values)


def _url_and_mentions(section: Mapping[str, Any], name: str, example: str) -> dict[str, Any]:
    """``url`` / ``url_env`` (one is needed) and ``mentions`` of a chat channel's section."""
    values: dict[str, Any] = {}
    for key in ("url", "url_env"):
        if section.get(key) is not None:
            values[key] = _str(section[key], f"{name}.{key}")
    if "url" in values and not re.match(r"https?://", values["url"]):
        raise ConfigError(f"{name}.url: expected an http(s):// webhook URL, got {values['url'][:40]!r}")
    if "url" not in values and "url_env" not in values:
        raise ConfigError(f"{name}: needs 'url' ({example}) or 'url_env'")
    if section.get("mentions") is not None:
        mentions = _mapping(section["mentions"], f"{name}.mentions")
        values["mentions"] = {
            _str(k, f"{name}.mentions"): _str(v, f"{name}.mentions.{k}") for k, v in mentions.items()
        }
    return values


def parse_dingtalk_section(raw: object) -> DingTalkConfig:
    section = _mapping(raw, "dingtalk")
    _check_keys(section, ("url", "url_env", "secret", "secret_env", "keyword", "mentions"), "dingtalk")
    values = _url_and_mentions(section, "dingtalk", "the robot's webhook, https://oapi.dingtalk.com/robot/send?...")
    for key in ("secret", "secret_env", "keyword"):
        if section.get(key) is not None:
            values[key] = _str(section[key], f"dingtalk.{key}")
    return DingTalkConfig(**values)


def parse_wecom_section(raw: object) -> WeComConfig:
    section = _mapping(raw, "wecom")
    _check_keys(section, ("url", "url_env", "format", "mentions"), "wecom")
    values = _url_and_mentions(section, "wecom", "the robot's webhook, https://qyapi.weixin.qq.com/...?key=...")
    if "format" in section:
        values["format"] = _choice(section["format"], "wecom.format", ("markdown", "text"))
    return WeComConfig(**values)


def parse_slack_section(raw: object) -> SlackConfig:
    section = _mapping(raw, "slack")
    _check_keys(section, ("url", "url_env", "mentions"), "slack")
    return SlackConfig(**_url_and_mentions(section, "slack", "the incoming webhook, https://hooks.slack.com/services/..."))


def parse_webhook_section(raw: object, base: Path) -> WebhookConfig:
    section = _mapping(raw, "webhook")
    _check_keys(section, ("url", "url_env", "headers", "header_env", "template", "max_bytes"), "webhook")
    values = _url_and_mentions(section, "webhook", "where to POST the JSON")
    for key in ("headers", "header_env"):
        if section.get(key) is not None:
            table = _mapping(section[key], f"webhook.{key}")
            values[key] = {_str(k, f"webhook.{key}"): _str(v, f"webhook.{key}.{k}") for k, v in table.items()}
    if section.get("template") is not None:
        values["template"] = _expand_path(_str(section["template"], "webhook.template"), base)
    if section.get("max_bytes") is not None:
        values["max_bytes"] = _int(section["max_bytes"], "webhook.max_bytes", 256, 10_000_000)
    return WebhookConfig(**values)


_LISTEN_RE = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\[\]]+)):(?P<port>\d+)")


def _parse_web(raw: object) -> WebConfig:
    """``web:`` (present, even empty: serve on the default address)."""
    section = _mapping(raw, "web")
    _check_keys(section, ("listen", "base_path", "auth", "public_url"), "web")
    values: dict[str, Any] = {}
    if "listen" in section:
        listen = _str(section["listen"], "web.listen")
        if listen.isdigit():
            listen = f"127.0.0.1:{listen}"
        match = _LISTEN_RE.fullmatch(listen)
        if not match:
            raise ConfigError(f"web.listen: {listen!r} is not host:port, e.g. 127.0.0.1:8787 or [::1]:8787")
        values["host"] = match["v6"] or match["host"]
        values["port"] = _int(int(match["port"]), "web.listen (port)", 0, 65535)
    if "base_path" in section:
        base = _str(section["base_path"], "web.base_path").rstrip("/")
        if base and (not base.startswith("/") or any(c in base for c in "?#% ")):
            raise ConfigError(f"web.base_path: {base!r} must be a path such as /gpuwatch")
        values["base_path"] = base
    if section.get("auth") is not None:
        auth = _mapping(section["auth"], "web.auth")
        _check_keys(auth, ("user", "password_env"), "web.auth")
        for key in ("user", "password_env"):
            if key not in auth:
                raise ConfigError(
                    f"web.auth: needs '{key}' (the password is read from the variable password_env names)"
                )
        values["auth"] = WebAuth(
            user=_str(auth["user"], "web.auth.user"), password_env=_str(auth["password_env"], "web.auth.password_env")
        )
    if section.get("public_url") is not None:
        url = _str(section["public_url"], "web.public_url")
        if not re.match(r"https?://[^/\s]+", url):
            raise ConfigError(f"web.public_url: expected an http(s):// address, got {url[:60]!r}")
        values["public_url"] = url
    return WebConfig(**values)


def _merge_legacy(doc: dict[str, Any]) -> dict[str, Any]:
    """Map the predecessor's flat keys onto the structured ones (refusing contradictions)."""
    legacy = {k: doc.pop(k) for k in LEGACY_KEYS if k in doc}
    if not legacy:
        return doc
    if "ip_list" in legacy:
        if "hosts" in doc:
            raise ConfigError("ip_list and hosts: give one list of hosts, not both")
        doc["hosts"] = legacy.pop("ip_list")
    ssh = dict(_mapping(doc.get("ssh"), "ssh"))
    for old in ("port", "user", "password"):
        if old in legacy:
            if old in ssh:
                raise ConfigError(f"{old} and ssh.{old}: set it in one place")
            ssh[old] = legacy.pop(old)
    if ssh:
        doc["ssh"] = ssh
    feishu_old = {k[len("feishu_") :]: legacy.pop(k) for k in ("feishu_url", "feishu_keyword") if k in legacy}
    if feishu_old:
        feishu = dict(_mapping(doc.get("feishu"), "feishu"))
        for key, value in feishu_old.items():
            if key in feishu:
                raise ConfigError(f"feishu_{key} and feishu.{key}: set it in one place")
            feishu[key] = value
        doc["feishu"] = feishu
    return doc


def _secret_keys(doc: Mapping[str, Any]) -> list[str]:
    found = []
    ssh = doc.get("ssh")
    if isinstance(ssh, Mapping) and ssh.get("password"):
        found.append("ssh.password")
    hosts = doc.get("hosts")
    if isinstance(hosts, list):
        for i, host in enumerate(hosts):
            if isinstance(host, Mapping) and host.get("password"):
                found.append(f"hosts[{i}].password")
    from .notify.registry import CHANNELS  # the channel modules use this module's helpers

    for spec in CHANNELS:
        section = doc.get(spec.name)
        if isinstance(section, Mapping):
            found += [f"{spec.name}.{k}" for k in spec.inline_secrets if section.get(k)]
    return found


def parse_config(doc: object, path: Path | None = None) -> Config:
    """Validate a parsed YAML document. Raises ConfigError naming the key path."""
    if doc is None:
        doc = {}
    if not isinstance(doc, Mapping):
        raise ConfigError(f"top level: expected a mapping of keys (hosts:, ssh:, ...), got {_type_name(doc)}")
    doc = _merge_legacy(dict(doc))
    if "routes" in doc:
        raise ConfigError("routes: belongs under alerts: (alerts.routes), e.g. alerts: {routes: {default: [feishu]}}")
    # Channels come from their registry (notify.registry), imported here because the channel
    # modules use this module's helpers.
    from .notify.registry import CHANNEL_NAMES, CHANNELS

    _check_keys(doc, (*TOP_KEYS, *CHANNEL_NAMES), "")
    base = path.parent if path else Path.cwd()
    ssh = _parse_ssh(doc.get("ssh"), base)
    raw_hosts = doc.get("hosts")
    if raw_hosts is None:
        raise ConfigError("hosts: missing; list your GPU servers, e.g.\nhosts:\n  - gpu-a\n  - gpu-b")
    if not isinstance(raw_hosts, list):
        raise ConfigError(f"hosts: expected a list of hosts, got {_type_name(raw_hosts)}")
    if not raw_hosts:
        raise ConfigError("hosts: the list is empty; add at least one GPU server")
    hosts = tuple(_parse_host(h, i, ssh, base) for i, h in enumerate(raw_hosts))
    seen: dict[str, int] = {}
    for i, host in enumerate(hosts):
        if host.name in seen:
            raise ConfigError(
                f"hosts[{i}]: the name {quote(host.name)} is already used by hosts[{seen[host.name]}]; "
                "give each host its own name"
            )
        seen[host.name] = i
    state_dir = Path(_expand_path(_str(doc["state_dir"], "state_dir"), base)) if "state_dir" in doc else base / "logs"
    channels = {spec.name: spec.parse(doc[spec.name], base) for spec in CHANNELS if doc.get(spec.name) is not None}
    schedule = _parse_schedule(doc.get("schedule"))
    free_gpu = _parse_free(doc.get("free_gpu"))
    alerts = _parse_alerts(doc.get("alerts"), CHANNEL_NAMES)
    for rule, targets in alerts.routes.items():
        for target in targets:
            if target not in channels:
                raise ConfigError(f"alerts.routes.{rule}: routes to {target}, but there is no {target}: section")
    web = _parse_web(doc["web"]) if "web" in doc else None
    max_parallel = _int(doc.get("max_parallel", 256), "max_parallel", 1, 1024)
    host_context = _parse_host_context(doc.get("host_context"))
    attribution = _parse_attribution(doc.get("attribution"))
    log_level = _choice(_str(doc.get("log_level", "INFO"), "log_level").upper(), "log_level", LOG_LEVELS)
    warnings = []
    secrets = _secret_keys(doc)
    if secrets and path is not None and _readable_by_others(path):
        warnings.append(
            f"{path} is readable by other users and holds secrets ({', '.join(secrets)}); "
            f"run 'chmod 600 {path}' or move them to the environment (password_env, secret_env)"
        )
    return Config(
        path=path,
        hosts=hosts,
        ssh=ssh,
        state_dir=state_dir,
        schedule=schedule,
        free_gpu=free_gpu,
        alerts=alerts,
        channels=channels,
        max_parallel=max_parallel,
        log_level=log_level,
        warnings=tuple(warnings),
        web=web,
        host_context=host_context,
        attribution=attribution,
    )


def _readable_by_others(path: Path) -> bool:
    try:
        return bool(path.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH))
    except OSError:
        return False


def find_config_path(explicit: str | None, environ: Mapping[str, str] | None = None) -> Path:
    """``-c FILE``, else ``$GPUWATCH_CONFIG``, else ``./config.yaml``."""
    env = os.environ if environ is None else environ
    if explicit:
        return Path(explicit)
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV])
    return Path(DEFAULT_CONFIG_NAME)


# ---------------------------------------------------------------- reading the file

MAX_CONFIG_BYTES = 1024 * 1024  # a config is a few KB; a fleet of thousands of hosts fits
MAX_ALIAS_NODES = 100_000  # nodes that aliases may add to a document, all expansions counted
MAX_DEPTH = 64  # nesting; a config needs 5


class _YamlLimit(yaml.YAMLError):
    """A document past a limit of :class:`_BoundedLoader`, with where it went past."""

    def __init__(self, mark: yaml.Mark | None, message: str) -> None:
        super().__init__(message)
        self.mark = mark
        self.message = message


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a document whose aliases expand past
    :data:`MAX_ALIAS_NODES` nodes ("billion laughs": 300 bytes that stand for a billion
    values, which any code that walks or prints the value pays for), an alias inside its own
    anchor (a recursive value), nesting deeper than :data:`MAX_DEPTH` (Python's recursion
    limit), and values Python cannot build (a date like 2024-13-45, a 5,000-digit number),
    each as a YAML error with its line."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._sizes: dict[int, int] = {}  # id(node) -> its size with every alias expanded
        self._expanded = 0
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            node = super().compose_node(parent, index)
            size = self._sizes.get(id(node))
            if size is None:
                raise _YamlLimit(
                    event.start_mark, f"the alias *{quote(event.anchor)[1:-1]} is inside its own anchor (a loop)"
                )
            self._expanded += size
            if self._expanded > MAX_ALIAS_NODES:
                raise _YamlLimit(
                    event.start_mark,
                    f"too many YAML aliases (they expand the document past {MAX_ALIAS_NODES} nodes)",
                )
            return node
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise _YamlLimit(mark, f"nested more than {MAX_DEPTH} levels deep")
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        size = 1
        if isinstance(node, yaml.SequenceNode):
            size += sum(self._sizes.get(id(child), 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            size += sum(self._sizes.get(id(k), 1) + self._sizes.get(id(v), 1) for k, v in node.value)
        self._sizes[id(node)] = size
        return node

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as exc:
            text = str(exc)
            why = "a number with too many digits" if "integer string conversion" in text else quote(text)[1:-1]
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read this value ({why})", node.start_mark
            ) from None


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with :class:`_BoundedLoader`'s limits."""
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def accepted_keys(doc: object) -> dict[str, tuple[str, ...]]:
    """Every section the parser checked while reading ``doc`` (key paths as errors name them:
    ``""`` for the top level, ``ssh``, ``hosts[1]``, ``alerts.idle_gpu``), with the keys it accepts
    there. A test reads config.example.yaml with it, so the example documents every key."""
    checked: dict[str, tuple[str, ...]] = {}
    token = _CHECKED.set(checked)
    try:
        parse_config(doc)
    finally:
        _CHECKED.reset(token)
    return checked


def load_config(path: Path) -> Config:
    """Read and validate a config file. Every failure is a ConfigError naming the file."""
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such file; copy config.example.yaml to {path} and list your hosts, "
            f"or pass -c FILE / set ${CONFIG_ENV}"
        ) from None
    except IsADirectoryError:
        raise ConfigError(
            f"{path}: is a directory, not a config file; pass the file, e.g. -c {path / DEFAULT_CONFIG_NAME}"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{path}: larger than {MAX_CONFIG_BYTES // (1024 * 1024)} MB, so not a gpuwatch config "
            "(one is a few KB); check the path"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not a text file (byte {exc.start} is not UTF-8); check the path, or save the file as UTF-8"
        ) from None
    try:
        doc = load_yaml(text)
    except _YamlLimit as exc:
        line = f" line {exc.mark.line + 1}" if exc.mark is not None else ""
        raise ConfigError(f"{path}{line}: {exc.message}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{where}: invalid YAML: {problem}") from None
    except RecursionError:  # a limit above should come first; this is the backstop
        raise ConfigError(f"{path}: invalid YAML: nested too deeply") from None
    try:
        return parse_config(doc, path.resolve())
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
