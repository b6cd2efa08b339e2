"""A whole config: YAML file -> :class:`~gpuwatch.config.records.Config`, every section checked.

The key names are a public interface (README, config.example.yaml). The predecessor's flat
config (``ip_list``, ``port``, ``user``, ``password``, ``feishu_url``, ``feishu_keyword``)
is accepted unchanged and mapped onto the same structure.

This module sits above the rule and channel registries: each rule family and each channel reads
its own section (with :mod:`gpuwatch.config.values`), and this assembles them. Nothing here opens
a connection or reads a secret from the environment: secrets named by ``*_env`` keys are read when
they are used, so a rotated secret needs no config change.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from ..notify.registry import CHANNELS
from ..notify.spec import ChannelSpec
from ..rules.discovery import DiscoveryFailed
from ..rules.registry import RULE_NAMES, default_rules, parse_rules
from ..text import quote
from .discovery import host_pattern, is_pattern_entry, parse_hosts_from
from .records import (
    CONFIG_ENV,
    DEFAULT_CONFIG_NAME,
    HOST_KEY_POLICIES,
    LOCAL_KEYS,
    LOCAL_NAME,
    LOG_LEVELS,
    REPORT_KINDS,
    SSH_KEYS,
    WEEKDAYS,
    AlertsConfig,
    AttributionConfig,
    Config,
    FreeGpuConfig,
    HistoryConfig,
    HostConfig,
    HostContextConfig,
    HostPattern,
    ReportSchedule,
    ScheduleConfig,
    SshSettings,
    WebAuth,
    WebConfig,
)
from .shard import parse_shard
from .values import (
    ConfigError,
    boolean,
    check_keys,
    choice,
    expand_path,
    integer,
    mapping,
    parse_duration,
    positive_duration,
    recording_keys,
    string,
    type_name,
)
from .yaml import YamlLimitError, explain, load_yaml

_SSH_PARSERS: dict[str, Callable[[object, str], object]] = {
    "user": string,
    "port": lambda v, p: integer(v, p, 1, 65535),
    "key_file": string,
    "password": string,
    "password_env": string,
    "known_hosts": lambda v, p: None if v is None or v is False else string(v, p),
    "host_key_policy": lambda v, p: choice(v, p, HOST_KEY_POLICIES),
    "connect_timeout": positive_duration,
    "command_timeout": positive_duration,
    "keepalive": parse_duration,
    "proxy_jump": string,
    "nvidia_smi": string,
    "use_ssh_config": boolean,
}


def _ssh_overrides(raw: Mapping[str, Any], path: str, base: Path) -> dict[str, object]:
    """Validated ``ssh:`` keys (under ``ssh:`` or on a host), file paths made absolute."""
    values: dict[str, object] = {}
    for key, value in raw.items():
        values[key] = _SSH_PARSERS[key](value, f"{path}.{key}" if path else key)
    for key in ("key_file", "known_hosts"):
        if isinstance(values.get(key), str):
            values[key] = expand_path(str(values[key]), base)
    return values


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
    "shard",
    "hosts_from",
    "history",
)
LEGACY_KEYS = ("ip_list", "port", "user", "password", "feishu_url", "feishu_keyword")
HOST_KEYS = ("name", "address", *SSH_KEYS)


def _parse_ssh(raw: object, base: Path) -> SshSettings:
    section = mapping(raw, "ssh")
    check_keys(section, SSH_KEYS, "ssh")
    values = _ssh_overrides(section, "ssh", base)
    return replace(SshSettings(), **values)  # type: ignore[arg-type]


def _parse_host(raw: object, index: int, defaults: SshSettings, base: Path) -> HostConfig:
    path = f"hosts[{index}]"
    if isinstance(raw, (str, int, float)) and not isinstance(raw, bool):
        name = string(raw, path)
        return HostConfig(name=name, address=None, ssh=defaults, local=name == LOCAL_NAME)
    entry = mapping(raw, path)
    if not entry:
        raise ConfigError(f"{path}: empty host entry; give a name, e.g. '- gpu-a'")
    check_keys(entry, HOST_KEYS, path)
    if "name" not in entry and "address" not in entry:
        raise ConfigError(f"{path}: a host mapping needs 'name' (or 'address')")
    address = string(entry["address"], f"{path}.address") if "address" in entry else None
    name = string(entry["name"], f"{path}.name") if "name" in entry else str(address)
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


def _parse_pattern(raw: object, index: int, base: Path) -> HostPattern:
    """``- {match: "gpu*", user: ops, port: 2222}``: ssh settings for the discovered hosts it matches."""
    path = f"hosts[{index}]"
    entry = mapping(raw, path)
    check_keys(entry, ("match", *SSH_KEYS), path)
    pattern = host_pattern(entry["match"], f"{path}.match")
    return HostPattern(pattern, _ssh_overrides({k: v for k, v in entry.items() if k != "match"}, path, base))


def _parse_hosts(
    raw_hosts: object, discovering: bool, ssh: SshSettings, base: Path
) -> tuple[tuple[HostConfig, ...], tuple[HostPattern, ...]]:
    """``hosts:``: the explicit hosts, and the ``match:`` entries (settings for discovered hosts)."""
    if raw_hosts is None and discovering:
        raw_hosts = []
    if raw_hosts is None:
        raise ConfigError("hosts: missing; list your GPU servers, e.g.\nhosts:\n  - gpu-a\n  - gpu-b")
    if not isinstance(raw_hosts, list):
        raise ConfigError(f"hosts: expected a list of hosts, got {type_name(raw_hosts)}")
    if not raw_hosts and not discovering:
        raise ConfigError("hosts: the list is empty; add at least one GPU server")
    patterns = tuple(_parse_pattern(h, i, base) for i, h in enumerate(raw_hosts) if is_pattern_entry(h))
    if patterns and not discovering:
        raise ConfigError("hosts: an entry with match: gives settings to discovered hosts; add hosts_from:")
    hosts: list[HostConfig] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(raw_hosts):
        if is_pattern_entry(raw):
            continue
        host = _parse_host(raw, i, ssh, base)
        if host.name in seen:
            raise ConfigError(
                f"hosts[{i}]: the name {quote(host.name)} is already used by hosts[{seen[host.name]}]; "
                "give each host its own name"
            )
        seen[host.name] = i
        hosts.append(host)
    return tuple(hosts), patterns


_AT_RE = re.compile(r"([01]?\d|2[0-3]):[0-5]\d")


def _parse_schedule(raw: object) -> ScheduleConfig:
    section = mapping(raw, "schedule")
    check_keys(section, ("poll_every", "reports"), "schedule")
    poll_every = (
        positive_duration(section["poll_every"], "schedule.poll_every")
        if "poll_every" in section
        else ScheduleConfig.poll_every
    )
    if "reports" not in section:
        return ScheduleConfig(poll_every=poll_every)
    raw_reports = section["reports"]
    if raw_reports is None:
        raw_reports = []
    if not isinstance(raw_reports, list):
        raise ConfigError(f"schedule.reports: expected a list, got {type_name(raw_reports)}")
    reports = []
    for i, item in enumerate(raw_reports):
        path = f"schedule.reports[{i}]"
        entry = mapping(item, path)
        check_keys(entry, ("report", "every", "at", "day", "user"), path)
        if "report" not in entry:
            raise ConfigError(f"{path}: needs 'report' ({', '.join(REPORT_KINDS)})")
        kind = choice(entry["report"], f"{path}.report", REPORT_KINDS)
        every = positive_duration(entry["every"], f"{path}.every") if "every" in entry else None
        at = string(entry["at"], f"{path}.at") if "at" in entry else None
        if at is not None and not _AT_RE.fullmatch(at):
            raise ConfigError(f'{path}.at: {quote(at)} is not a time of day like "09:00"')
        if (every is None) == (at is None):
            raise ConfigError(f"{path}: give exactly one of 'every' (e.g. 1h) or 'at' (e.g. \"09:00\")")
        on = _weekday(entry["day"], f"{path}.day") if "day" in entry else None
        if on is not None and at is None:
            raise ConfigError(f"{path}.on: a day of the week goes with 'at' (e.g. day: monday, at: \"09:00\")")
        user = string(entry["user"], f"{path}.user") if "user" in entry else None
        if kind == "user" and not user:
            raise ConfigError(f"{path}: report 'user' needs 'user: <name>'")
        if kind != "user" and user:
            raise ConfigError(f"{path}.user: only report 'user' takes a user")
        reports.append(ReportSchedule(report=kind, every=every, at=at, user=user, on=on))
    return ScheduleConfig(poll_every=poll_every, reports=tuple(reports))


def _weekday(raw: object, path: str) -> int:
    """``monday`` (or ``mon``, any case) -> 0 ... ``sunday`` -> 6."""
    text = string(raw, path).strip().lower()
    for number, day in enumerate(WEEKDAYS):
        if text in (day, day[:3]):
            return number
    raise ConfigError(f"{path}: {quote(text)} is not a day of the week ({', '.join(WEEKDAYS)})")


def _parse_free(raw: object) -> FreeGpuConfig:
    section = mapping(raw, "free_gpu")
    check_keys(section, ("memory_below_mib", "util_below_percent"), "free_gpu")
    values: dict[str, int] = {}
    if "memory_below_mib" in section:
        values["memory_below_mib"] = integer(section["memory_below_mib"], "free_gpu.memory_below_mib", 0)
    if "util_below_percent" in section:
        values["util_below_percent"] = integer(section["util_below_percent"], "free_gpu.util_below_percent", 0, 101)
    return FreeGpuConfig(**values)


#: ``alerts.command_lines``: which channels' alerts carry a shell line (admins: those that reach
#: admins only, e-mail; a group chat gets words instead).
COMMAND_LINES = ("admins", "all", "none")


def _parse_alerts(raw: object, channel_names: tuple[str, ...]) -> AlertsConfig:
    """``alerts:``: each rule's value is parsed by the rule's own parser (rules.registry). Without a
    rule named in it (only ``for``, ``repeat_every``, ``send_resolved``, ``routes``), the default
    rules stay on."""
    if raw is None:
        return AlertsConfig(rules=default_rules())
    section = mapping(raw, "alerts")
    check_keys(section, (*RULE_NAMES, "for", "repeat_every", "send_resolved", "routes", "command_lines"), "alerts")
    # An alerts: section that names a rule lists what the admin wants: rules it leaves out are off.
    # One that only sets for/repeat_every/send_resolved/routes/command_lines keeps the default rules on.
    names_a_rule = any(name in section for name in RULE_NAMES)
    v: dict[str, Any] = {"rules": parse_rules(section, "alerts") if names_a_rule else default_rules()}
    if "send_resolved" in section:
        v["send_resolved"] = boolean(section["send_resolved"], "alerts.send_resolved")
    if "for" in section:
        v["for_seconds"] = parse_duration(section["for"], "alerts.for")
    if "repeat_every" in section:
        v["repeat_every"] = positive_duration(section["repeat_every"], "alerts.repeat_every")
    if "command_lines" in section:
        v["command_lines"] = choice(section["command_lines"], "alerts.command_lines", COMMAND_LINES)
    if "routes" in section:
        routes = mapping(section["routes"], "alerts.routes")
        check_keys(routes, (*RULE_NAMES, "default"), "alerts.routes")
        parsed: dict[str, tuple[str, ...]] = {}
        for name, targets in routes.items():
            items = [targets] if isinstance(targets, str) else targets
            if not isinstance(items, list) or not items:
                raise ConfigError(f"alerts.routes.{name}: expected a list of channels, e.g. [feishu, email]")
            parsed[name] = tuple(choice(t, f"alerts.routes.{name}", channel_names) for t in items)
        v["routes"] = parsed
    return AlertsConfig(**v)


MAX_DISKS = 32


def _parse_host_context(raw: object) -> HostContextConfig:
    """``host_context: {disks: [/, /home, /tmp], full_percent: 90}``."""
    section = mapping(raw, "host_context")
    check_keys(section, ("disks", "full_percent"), "host_context")
    values: dict[str, Any] = {}
    if "disks" in section:
        disks = section["disks"]
        if not isinstance(disks, list) or len(disks) > MAX_DISKS:
            raise ConfigError(
                f"host_context.disks: expected a list of at most {MAX_DISKS} paths, e.g. [/, /home, /data]"
            )
        paths = []
        for i, item in enumerate(disks):
            path = string(item, f"host_context.disks[{i}]")
            if not path.startswith("/") or not path.isprintable() or len(path) > 1024:
                raise ConfigError(f"host_context.disks[{i}]: {quote(path)} is not an absolute path on the host")
            paths.append(path)
        values["disks"] = tuple(dict.fromkeys(paths))
    if "full_percent" in section:
        values["full_percent"] = integer(section["full_percent"], "host_context.full_percent", 1, 101)
    return HostContextConfig(**values)


def _parse_attribution(raw: object) -> AttributionConfig:
    """``attribution: {owner_label: owner, rootless_owner: true}``."""
    section = mapping(raw, "attribution")
    check_keys(section, ("owner_label", "rootless_owner"), "attribution")
    values: dict[str, Any] = {}
    if "owner_label" in section:
        label = section["owner_label"]
        values["owner_label"] = None if label is None or label is False else string(label, "attribution.owner_label")
    if "rootless_owner" in section:
        values["rootless_owner"] = boolean(section["rootless_owner"], "attribution.rootless_owner")
    return AttributionConfig(**values)


#: The shortest ``history.raw_for``: raw polls must outlive the hour they are rolled up after.
MIN_RAW_FOR = 2 * 3600.0


def _parse_history(raw: object) -> HistoryConfig:
    """``history: {enabled, raw_for, five_minutes_for, keep, half_life, idle_below}``."""
    section = mapping(raw, "history")
    check_keys(section, ("enabled", "raw_for", "five_minutes_for", "keep", "half_life", "idle_below"), "history")
    values: dict[str, Any] = {}
    if "enabled" in section:
        values["enabled"] = boolean(section["enabled"], "history.enabled")
    for key in ("raw_for", "five_minutes_for", "keep", "half_life"):
        if key in section:
            values[key] = positive_duration(section[key], f"history.{key}")
    if values.get("raw_for", MIN_RAW_FOR) < MIN_RAW_FOR:
        raise ConfigError("history.raw_for: at least 2h (raw polls are rolled up after their hour ends)")
    if section.get("idle_below") is not None:
        values["idle_below"] = integer(section["idle_below"], "history.idle_below", 0, 101)
    return HistoryConfig(**values)


WEB_VIEWS = ("list", "wall")  # the page's views (web.py); ?view= picks one per visit
_LISTEN_RE = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\[\]]+)):(?P<port>\d+)")


def _parse_web(raw: object) -> WebConfig:
    """``web:`` (present, even empty: serve on the default address)."""
    section = mapping(raw, "web")
    check_keys(section, ("listen", "base_path", "auth", "public_url", "view", "peers"), "web")
    values: dict[str, Any] = {}
    if "listen" in section:
        listen = string(section["listen"], "web.listen")
        if listen.isdigit():
            listen = f"127.0.0.1:{listen}"
        match = _LISTEN_RE.fullmatch(listen)
        if not match:
            raise ConfigError(f"web.listen: {listen!r} is not host:port, e.g. 127.0.0.1:8787 or [::1]:8787")
        values["host"] = match["v6"] or match["host"]
        values["port"] = integer(int(match["port"]), "web.listen (port)", 0, 65535)
    if "base_path" in section:
        base = string(section["base_path"], "web.base_path").rstrip("/")
        if base and (not base.startswith("/") or any(c in base for c in "?#% ")):
            raise ConfigError(f"web.base_path: {base!r} must be a path such as /gpuwatch")
        values["base_path"] = base
    if section.get("auth") is not None:
        auth = mapping(section["auth"], "web.auth")
        check_keys(auth, ("user", "password_env"), "web.auth")
        for key in ("user", "password_env"):
            if key not in auth:
                raise ConfigError(
                    f"web.auth: needs '{key}' (the password is read from the variable password_env names)"
                )
        values["auth"] = WebAuth(
            user=string(auth["user"], "web.auth.user"),
            password_env=string(auth["password_env"], "web.auth.password_env"),
        )
    if section.get("public_url") is not None:
        url = string(section["public_url"], "web.public_url")
        if not re.match(r"https?://[^/\s]+", url):
            raise ConfigError(f"web.public_url: expected an http(s):// address, got {url[:60]!r}")
        values["public_url"] = url
    if section.get("view") is not None:
        view = string(section["view"], "web.view")
        if view not in WEB_VIEWS:
            raise ConfigError(f"web.view: {view!r} is not one of {', '.join(WEB_VIEWS)}")
        values["view"] = view
    if section.get("peers") is not None:
        values["peers"] = _parse_peers(section["peers"])
    return WebConfig(**values)


MAX_PEERS = 100


def _parse_peers(raw: object) -> tuple[str, ...]:
    """``web.peers``: the pages of the other shards (base URLs, as people open them)."""
    if not isinstance(raw, list) or len(raw) > MAX_PEERS:
        raise ConfigError(
            f"web.peers: expected a list of at most {MAX_PEERS} page addresses, e.g. [http://gpu-mon-2:8787/]"
        )
    peers = []
    for i, item in enumerate(raw):
        url = string(item, f"web.peers[{i}]").rstrip("/")
        if not re.fullmatch(r"https?://[^/\s?#@]+(/[^\s?#]*)?", url):
            raise ConfigError(
                f"web.peers[{i}]: expected the http(s):// address of another shard's page (no user or password "
                f"in it: web.auth is used), got {quote(url[:60])}"
            )
        peers.append(url)
    return tuple(dict.fromkeys(peers))


def _merge_legacy(doc: dict[str, Any]) -> dict[str, Any]:
    """Map the predecessor's flat keys onto the structured ones (refusing contradictions)."""
    legacy = {k: doc.pop(k) for k in LEGACY_KEYS if k in doc}
    stray = [k for k in ("port", "user", "password") if k in legacy]
    if stray and "ssh" in doc and not doc["ssh"]:
        # "ssh:" with nothing under it and its keys at the top: a block that lost its indentation
        keys = ", ".join(f"{k}:" for k in stray)
        raise ConfigError(
            f"ssh: is empty, and {keys} stand at the top level: indent them under ssh: (two spaces), "
            "e.g.\nssh:\n  user: gpuwatch"
        )
    if not legacy:
        return doc
    if "ip_list" in legacy:
        if "hosts" in doc:
            raise ConfigError("ip_list and hosts: give one list of hosts, not both")
        doc["hosts"] = legacy.pop("ip_list")
    ssh = dict(mapping(doc.get("ssh"), "ssh"))
    for old in ("port", "user", "password"):
        if old in legacy:
            if old in ssh:
                raise ConfigError(f"{old} and ssh.{old}: set it in one place")
            ssh[old] = legacy.pop(old)
    if ssh:
        doc["ssh"] = ssh
    feishu_old = {k[len("feishu_") :]: legacy.pop(k) for k in ("feishu_url", "feishu_keyword") if k in legacy}
    if feishu_old:
        feishu = dict(mapping(doc.get("feishu"), "feishu"))
        for key, value in feishu_old.items():
            if key in feishu:
                raise ConfigError(f"feishu_{key} and feishu.{key}: set it in one place")
            feishu[key] = value
        doc["feishu"] = feishu
    return doc


def _secret_keys(doc: Mapping[str, Any], channels: tuple[ChannelSpec, ...]) -> list[str]:
    found = []
    ssh = doc.get("ssh")
    if isinstance(ssh, Mapping) and ssh.get("password"):
        found.append("ssh.password")
    hosts = doc.get("hosts")
    if isinstance(hosts, list):
        for i, host in enumerate(hosts):
            if isinstance(host, Mapping) and host.get("password"):
                found.append(f"hosts[{i}].password")
    for spec in channels:
        section = doc.get(spec.name)
        if isinstance(section, Mapping):
            found += [f"{spec.name}.{k}" for k in spec.inline_secrets if section.get(k)]
    return found


def parse_config(doc: object, path: Path | None = None, channels: tuple[ChannelSpec, ...] = CHANNELS) -> Config:
    """Validate a parsed YAML document. Raises ConfigError naming the key path.

    ``channels`` are the channels a config may configure (the registry; a test passes its own)."""
    if doc is None:
        doc = {}
    if not isinstance(doc, Mapping):
        raise ConfigError(f"top level: expected a mapping of keys (hosts:, ssh:, ...), got {type_name(doc)}")
    doc = _merge_legacy(dict(doc))
    if "routes" in doc:
        raise ConfigError("routes: belongs under alerts: (alerts.routes), e.g. alerts: {routes: {default: [feishu]}}")
    channel_names = tuple(spec.name for spec in channels)
    for key in doc:
        if key in SSH_KEYS and key not in TOP_KEYS:  # an ssh: key that lost its indentation
            raise ConfigError(f"{key}: is an ssh: key, not a top-level one; indent it under ssh: (two spaces)")
    check_keys(doc, (*TOP_KEYS, *channel_names), "")
    base = path.parent if path else Path.cwd()
    ssh = _parse_ssh(doc.get("ssh"), base)
    hosts_from = parse_hosts_from(doc.get("hosts_from"), base)
    hosts, patterns = _parse_hosts(doc.get("hosts"), bool(hosts_from), ssh, base)
    state_dir = Path(expand_path(string(doc["state_dir"], "state_dir"), base)) if "state_dir" in doc else base / "logs"
    configured = {spec.name: spec.parse(doc[spec.name], base) for spec in channels if doc.get(spec.name) is not None}
    schedule = _parse_schedule(doc.get("schedule"))
    free_gpu = _parse_free(doc.get("free_gpu"))
    alerts = _parse_alerts(doc.get("alerts"), channel_names)
    if hosts_from and not _names_a_rule(doc.get("alerts")):  # discovery's own alert comes with it
        alerts = replace(alerts, rules={**alerts.rules, "discovery_failed": DiscoveryFailed()})
    for rule, targets in alerts.routes.items():
        for target in targets:
            if target not in configured:
                raise ConfigError(f"alerts.routes.{rule}: routes to {target}, but there is no {target}: section")
    web = _parse_web(doc["web"]) if "web" in doc else None
    max_parallel = integer(doc.get("max_parallel", 256), "max_parallel", 1, 1024)
    host_context = _parse_host_context(doc.get("host_context"))
    attribution = _parse_attribution(doc.get("attribution"))
    history = _parse_history(doc.get("history"))
    log_level = choice(string(doc.get("log_level", "INFO"), "log_level").upper(), "log_level", LOG_LEVELS)
    shard = parse_shard(doc["shard"], "shard") if doc.get("shard") is not None else None
    warnings = _permission_warnings(path, _secret_keys(doc, channels))
    return Config(
        path=path,
        hosts=hosts,
        ssh=ssh,
        state_dir=state_dir,
        schedule=schedule,
        free_gpu=free_gpu,
        alerts=alerts,
        channels=configured,
        max_parallel=max_parallel,
        log_level=log_level,
        warnings=tuple(warnings),
        web=web,
        host_context=host_context,
        attribution=attribution,
        shard=shard,
        hosts_from=hosts_from,
        host_patterns=patterns,
        history=history,
    )


def _names_a_rule(raw: object) -> bool:
    return isinstance(raw, Mapping) and any(name in raw for name in RULE_NAMES)


def _permission_warnings(path: Path | None, secrets: list[str]) -> list[str]:
    """What the config file's mode gives away. Readable by its group is fine (the systemd install:
    0640 root:gpuwatch, read by the service's group); readable by every user is not when it holds
    secrets, and writable by every user never is (whoever writes it picks the hosts and channels)."""
    if path is None:
        return []
    try:
        mode = path.stat().st_mode
    except OSError:
        return []
    warnings: list[str] = []
    if mode & stat.S_IWOTH:
        warnings.append(
            f"{path} is writable by every user: anyone can change where gpuwatch connects and sends; "
            f"run 'chmod o-w {path}'"
        )
    if secrets and mode & stat.S_IROTH:
        warnings.append(
            f"{path} is readable by other users and holds secrets ({', '.join(secrets)}); "
            f"run 'chmod 600 {path}' (or 'chmod 640' with the group the service runs as) "
            "or move them to the environment (password_env, secret_env)"
        )
    return warnings


MAX_CONFIG_BYTES = 1024 * 1024  # a config is a few KB; a fleet of thousands of hosts fits


def accepted_keys(doc: object) -> dict[str, tuple[str, ...]]:
    """Every section the parser checked while reading ``doc`` (key paths as errors name them:
    ``""`` for the top level, ``ssh``, ``hosts[1]``, ``alerts.idle_gpu``), with the keys it accepts
    there. A test reads config.example.yaml with it, so the example documents every key."""
    with recording_keys() as checked:
        parse_config(doc)
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
    except YamlLimitError as exc:
        line = f" line {exc.mark.line + 1}" if exc.mark is not None else ""
        raise ConfigError(f"{path}{line}: {exc.message}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}{explain(exc, text)}") from None
    except RecursionError:  # a limit above should come first; this is the backstop
        raise ConfigError(f"{path}: invalid YAML: nested too deeply") from None
    try:
        return parse_config(doc, path.resolve())
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
