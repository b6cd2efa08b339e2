"""The records a config is read into: frozen dataclasses, one per section, and the whole :class:`Config`.

Plain data with their defaults and a few derived properties; nothing here reads YAML or the
environment except where a method says so (``resolve_password``). :mod:`gpuwatch.config.load` fills
them; the rest of gpuwatch reads them.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..text import format_duration
from .shard import Shard
from .values import from_env

DEFAULT_CONFIG_NAME = "config.yaml"
CONFIG_ENV = "GPUWATCH_CONFIG"
HOST_KEY_POLICIES = ("accept-new", "strict", "off")
REPORT_KINDS = ("overview", "user", "free", "usage")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# The one host entry polled on this machine without SSH: the name ``localhost``, bare or as a mapping
# with no key but these. An address, or any key about the connection (port, user, proxy_jump, ...),
# makes it an SSH host like any other: an SSH tunnel to 127.0.0.1:2222 is another machine.
LOCAL_NAME = "localhost"
LOCAL_KEYS = frozenset({"name", "nvidia_smi", "command_timeout"})


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
    source: str = "hosts"  # where it came from: "hosts", or a discovery source's label (DiscoverySource.label)

    @property
    def display_address(self) -> str:
        return "local" if self.local else (self.address or self.name)


DISCOVERY_KINDS = ("ssh_config", "command", "file", "consul")


@dataclass(frozen=True)
class DiscoverySource:
    """One entry of ``hosts_from:``: where host names come from and how often to ask.

    ``label`` names it wherever gpuwatch says where a host came from (``check``, ``status --json``,
    the ``discovery_failed`` alert): ``ssh_config:~/.ssh/config``, ``file:/etc/gpuwatch/hosts.txt``,
    ``command:sinfo -N -h -o %N``, ``consul:http://127.0.0.1:8500/gpu``. Times are in seconds."""

    kind: str  # one of DISCOVERY_KINDS
    label: str
    pattern: str | None = None  # ssh_config: which Host names (fnmatch, e.g. "gpu*")
    path: str | None = None  # ssh_config: the file (None: ~/.ssh/config); file: the file
    command: str | None = None  # command: a shell command line printing host names
    via: str | None = None  # command: run on this host over SSH (None: on this machine)
    url: str | None = None  # consul: the agent's address, e.g. http://127.0.0.1:8500
    service: str | None = None  # consul: the service whose nodes to poll
    tag: str | None = None  # consul: only the service's instances with this tag
    token_env: str | None = None  # consul: the environment variable holding the ACL token
    refresh: float = 300.0
    grace: float = 600.0  # a host that left the source is dropped this long after
    timeout: float = 30.0  # one command or HTTP call (a Consul blocking query: on top of its wait)


@dataclass(frozen=True)
class HostPattern:
    """A ``hosts:`` entry with ``match:``: ssh settings for the discovered hosts whose names match."""

    pattern: str  # fnmatch, e.g. "gpu*"
    overrides: Mapping[str, object] = field(default_factory=dict)  # ssh keys -> values, checked


@dataclass(frozen=True)
class ReportSchedule:
    report: str  # overview | user | free | usage
    every: float | None = None  # seconds
    at: str | None = None  # "HH:MM", daily (or weekly with ``on``)
    user: str | None = None  # for report: user
    on: int | None = None  # ``day:`` with ``at``: the day of the week (0 Monday ... 6 Sunday), weekly

    def describe(self) -> str:
        if self.every:
            when = f"every {format_duration(self.every)}"
        elif self.on is not None:
            when = f"weekly on {WEEKDAYS[self.on].capitalize()} at {self.at}"
        else:
            when = f"daily at {self.at}"
        who = f" for {self.user}" if self.user else ""
        return f"{self.report}{who} {when}"

    @property
    def scope(self) -> str:
        """What the report covers: ``overview``, ``free``, ``user:alice`` (its name for ``--report``;
        a newer report of one scope replaces an older one still waiting to be sent)."""
        return f"{self.report}:{self.user}" if self.user else self.report


WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
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
    command_lines: str = "admins"  # which channels' alerts carry the ack line: admins (e-mail) | all | none


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
class HistoryConfig:
    """``history:``: the usage history kept in ``<state_dir>/history.sqlite3`` (durations in seconds).

    ``idle_below`` None: the ``idle_gpu`` rule's ``util_below`` when that rule is on, else 5 %."""

    enabled: bool = True
    raw_for: float = 48 * 3600.0  # every poll, as it was
    five_minutes_for: float = 7 * 86400.0  # 5-minute means and maxima per GPU (charts)
    keep: float = 400 * 86400.0  # hourly sums per GPU and per person (usage, reports)
    half_life: float = 7 * 86400.0  # of the per-person weighted average (ewma_gpus)
    idle_below: int | None = None  # percent: a GPU held under this utilization is "held idle"


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
    view: str = "list"  # the page's default view: list (for people) or wall (dense, for a screen on a wall)
    demo: bool = False  # set by ``gpuwatch demo`` (no key): the page says it shows an invented fleet
    peers: tuple[str, ...] = ()  # the other shards' pages (base URLs): the page shows the whole site

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
    shard: Shard | None = None  # ``shard: K/N`` (or ``--shard``): this daemon polls only its part of ``hosts``
    all_hosts: tuple[HostConfig, ...] = ()  # with a shard: every configured host (``hosts`` holds the shard's)
    hosts_from: tuple[DiscoverySource, ...] = ()  # discovery (gpuwatch.discovery); hosts holds the merged list
    host_patterns: tuple[HostPattern, ...] = ()  # hosts: entries with match:, for discovered hosts
    history: HistoryConfig = HistoryConfig()

    def host_index(self, host: HostConfig) -> int:
        """Where ``host`` stands in the config's ``hosts:`` list (``hosts[7]``), a shard's or not."""
        return (self.all_hosts or self.hosts).index(host)

    @property
    def feishu(self) -> Any:
        """The ``feishu:`` settings (:class:`gpuwatch.notify.feishu.FeishuSettings`), or None."""
        return self.channels.get("feishu")

    @property
    def email(self) -> Any:
        """The ``email:`` settings (:class:`gpuwatch.notify.email.EmailSettings`), or None."""
        return self.channels.get("email")


def find_config_path(explicit: str | None, environ: Mapping[str, str] | None = None) -> Path:
    """``-c FILE``, else ``$GPUWATCH_CONFIG``, else ``./config.yaml``."""
    env = os.environ if environ is None else environ
    if explicit:
        return Path(explicit)
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV])
    return Path(DEFAULT_CONFIG_NAME)
