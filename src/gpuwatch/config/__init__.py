"""The config: YAML -> frozen records, with one ConfigError that names the key path.

- ``values``: the value readers every section uses (durations, whole numbers, mappings, key
  checks with "did you mean") and :class:`ConfigError`; imports nothing of gpuwatch but ``text``;
- ``yaml``: the bounded YAML loader;
- ``records``: the frozen records (:class:`Config`, :class:`HostConfig`, :class:`SshSettings`, ...);
- ``load``: the whole config read and checked (:func:`load_config`, :func:`parse_config`), above
  the rule and channel registries whose sections it reads.

This package's namespace holds the records and the value readers, which the rules and the
channels import; it does not import ``load`` (that would import the registries, which import
this package): import ``load_config`` and ``parse_config`` from :mod:`gpuwatch.config.load`.
"""

from __future__ import annotations

from .records import (
    CONFIG_ENV,
    DEFAULT_CONFIG_NAME,
    DEFAULT_REPORTS,
    DISCOVERY_KINDS,
    HOST_KEY_POLICIES,
    LOCAL_KEYS,
    LOCAL_NAME,
    LOG_LEVELS,
    REPORT_KINDS,
    SSH_KEYS,
    AlertsConfig,
    AttributionConfig,
    Config,
    DiscoverySource,
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
    find_config_path,
)
from .values import ConfigError, from_env, parse_duration

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CONFIG_NAME",
    "DEFAULT_REPORTS",
    "DISCOVERY_KINDS",
    "HOST_KEY_POLICIES",
    "LOCAL_KEYS",
    "LOCAL_NAME",
    "LOG_LEVELS",
    "REPORT_KINDS",
    "SSH_KEYS",
    "AlertsConfig",
    "AttributionConfig",
    "Config",
    "ConfigError",
    "DiscoverySource",
    "FreeGpuConfig",
    "HistoryConfig",
    "HostConfig",
    "HostContextConfig",
    "HostPattern",
    "ReportSchedule",
    "ScheduleConfig",
    "SshSettings",
    "WebAuth",
    "WebConfig",
    "find_config_path",
    "from_env",
    "parse_duration",
]
