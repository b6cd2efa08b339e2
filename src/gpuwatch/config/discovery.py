"""``hosts_from:``: the discovery sources of a config, read into :class:`DiscoverySource` records.

Each entry names one source by its key (``ssh_config``, ``command``, ``consul``, else ``file``) and
may set ``refresh`` (how often it is asked, default 5m), ``grace`` (how long a host that left it is
still polled, default 10m) and, for ``command`` and ``consul``, ``timeout`` (one call, default 30s).
Errors name the key path (``hosts_from[1].consul.url``). Nothing here reads a file or the network.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..text import quote
from .records import DISCOVERY_KINDS, DiscoverySource
from .values import ConfigError, check_keys, expand_path, mapping, positive_duration, string, type_name

MAX_SOURCES = 32
MAX_REFRESH_SECONDS = 7 * 24 * 3600.0  # refresh, grace, timeout: at most a week
_COMMON = ("refresh", "grace")
_KEYS: Mapping[str, tuple[str, ...]] = {
    "ssh_config": ("ssh_config", "file", *_COMMON),
    "command": ("command", "via", "timeout", *_COMMON),
    "consul": ("consul", "timeout", *_COMMON),
    "file": ("file", *_COMMON),
}
_URL_RE = re.compile(r"https?://[^/\s?#]+/?")
_PATTERN_RE = re.compile(r"[A-Za-z0-9_.*?\[\]!-]+")


def is_pattern_entry(raw: object) -> bool:
    """A ``hosts:`` entry with ``match:`` gives settings to discovered hosts; it is no host itself."""
    return isinstance(raw, Mapping) and "match" in raw


def host_pattern(value: object, path: str) -> str:
    """A host-name pattern (``gpu*``, ``node-[0-9]*``, fnmatch)."""
    pattern = string(value, path)
    if not _PATTERN_RE.fullmatch(pattern):
        raise ConfigError(f"{path}: {quote(pattern)} is not a host name pattern such as gpu* or node-?")
    return pattern


def _kind(entry: Mapping[str, Any], path: str) -> str:
    named = [k for k in ("ssh_config", "command", "consul") if k in entry]
    if len(named) > 1:
        raise ConfigError(f"{path}: one source per entry; {' and '.join(named)} are two: give each its own '- '")
    if named:
        return named[0]
    if "file" in entry:
        return "file"
    raise ConfigError(f"{path}: name a source: {', '.join(f'{k}:' for k in DISCOVERY_KINDS)}")


def _times(entry: Mapping[str, Any], path: str, kind: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key in ("refresh", "grace", "timeout"):
        if key in entry:
            seconds = positive_duration(entry[key], f"{path}.{key}")
            if seconds > MAX_REFRESH_SECONDS:
                raise ConfigError(f"{path}.{key}: at most 7d")
            values[key] = seconds
    if kind == "consul" and values.get("refresh", 0.0) > 600:
        values["refresh"] = 600.0  # Consul caps a blocking query's wait at 10m; a change still shows at once
    return values


def _consul(raw: object, path: str) -> dict[str, Any]:
    section = mapping(raw, path)
    check_keys(section, ("url", "service", "tag", "token_env"), path)
    for key in ("url", "service"):
        if key not in section:
            raise ConfigError(f"{path}: needs '{key}', e.g. consul: {{url: http://127.0.0.1:8500, service: gpu}}")
    url = string(section["url"], f"{path}.url").rstrip("/")
    if not _URL_RE.fullmatch(url + "/"):
        raise ConfigError(f"{path}.url: expected the agent's http(s):// address, e.g. http://127.0.0.1:8500")
    service = string(section["service"], f"{path}.service")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", service):
        raise ConfigError(f"{path}.service: {quote(service)} is not a Consul service name")
    tag = string(section["tag"], f"{path}.tag") if section.get("tag") is not None else None
    token_env = string(section["token_env"], f"{path}.token_env") if section.get("token_env") is not None else None
    return {"url": url, "service": service, "tag": tag, "token_env": token_env}


def parse_source(raw: object, path: str, base: Path) -> DiscoverySource:
    """One ``hosts_from:`` entry."""
    entry = mapping(raw, path)
    kind = _kind(entry, path)
    check_keys(entry, _KEYS[kind], path)
    times = _times(entry, path, kind)
    if kind == "ssh_config":
        pattern = host_pattern(entry["ssh_config"], f"{path}.ssh_config")
        written = string(entry["file"], f"{path}.file") if "file" in entry else "~/.ssh/config"
        return DiscoverySource(kind, f"ssh_config:{written}", pattern=pattern, path=expand_path(written, base), **times)
    if kind == "file":
        written = string(entry["file"], f"{path}.file")
        return DiscoverySource(kind, f"file:{written}", path=expand_path(written, base), **times)
    if kind == "command":
        command = string(entry["command"], f"{path}.command")
        if "\n" in command or "\0" in command:
            raise ConfigError(f"{path}.command: one command line, without line breaks")
        via = string(entry["via"], f"{path}.via") if entry.get("via") is not None else None
        label = f"command@{via}:{command}" if via else f"command:{command}"
        return DiscoverySource(kind, label, command=command, via=via, **times)
    consul = _consul(entry["consul"], f"{path}.consul")
    label = f"consul:{consul['url']}/{consul['service']}" + (f"?tag={consul['tag']}" if consul["tag"] else "")
    return DiscoverySource(kind, label, **consul, **times)


def parse_hosts_from(raw: object, base: Path) -> tuple[DiscoverySource, ...]:
    """``hosts_from:``: a list of sources, each said once."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(f"hosts_from: expected a list of sources (- file: hosts.txt), got {type_name(raw)}")
    if len(raw) > MAX_SOURCES:
        raise ConfigError(f"hosts_from: at most {MAX_SOURCES} sources")
    sources = tuple(parse_source(item, f"hosts_from[{i}]", base) for i, item in enumerate(raw))
    seen: dict[str, int] = {}
    for i, source in enumerate(sources):
        if source.label in seen:
            raise ConfigError(f"hosts_from[{i}]: the same source as hosts_from[{seen[source.label]}] ({source.label})")
        seen[source.label] = i
    return sources
