"""Every rule gpuwatch knows, in the order the README lists them.

The config parser (the keys under ``alerts:`` and ``alerts.routes``), the engine, the silences'
``--rule`` choices, the messages (each rule's ``words``) and ``/metrics`` (what each rule
``announces``) find rules here. Adding a rule is a check, its config, its words and its
``HostRule``/``FleetRule`` entry in a family module, plus one line below (and its README row).
"""

from __future__ import annotations

from collections.abc import Mapping

from .base import Inhibit, Rule
from .context import DISK_ABOVE, DRIVER_CHANGED, HOST_REBOOTED, LOAD_ABOVE, MEMORY_ABOVE
from .discovery import DISCOVERY_FAILED
from .freed import GPU_FREED
from .gpus import IDLE_GPU, TEMPERATURE_ABOVE
from .health import ECC_ERRORS, GPU_THROTTLED, ROW_REMAP_PENDING
from .hosts import GPU_ERROR, GPU_ERROR_INHIBITS_HOST_DOWN, GPU_MISSING, HOST_DOWN
from .reservations import RESERVATION_CONFLICT
from .users import MAX_GPUS_PER_USER, MAX_GPUS_PER_USER_FLEET, MAX_RUNTIME

RULES: tuple[Rule, ...] = (
    MAX_GPUS_PER_USER,
    MAX_GPUS_PER_USER_FLEET,
    MAX_RUNTIME,
    IDLE_GPU,
    HOST_DOWN,
    GPU_MISSING,
    GPU_ERROR,
    DISCOVERY_FAILED,
    TEMPERATURE_ABOVE,
    ECC_ERRORS,
    ROW_REMAP_PENDING,
    GPU_THROTTLED,
    DISK_ABOVE,
    MEMORY_ABOVE,
    LOAD_ABOVE,
    HOST_REBOOTED,
    DRIVER_CHANGED,
    GPU_FREED,
    RESERVATION_CONFLICT,
)
RULE_NAMES: tuple[str, ...] = tuple(r.name for r in RULES)
BY_NAME: Mapping[str, Rule] = {r.name: r for r in RULES}
# Which firing alerts keep which others from being announced (Alertmanager's inhibit rules).
INHIBITS: tuple[Inhibit, ...] = (GPU_ERROR_INHIBITS_HOST_DOWN,)


def default_rules() -> dict[str, object]:
    """The rules on when the config has no ``alerts:`` section, with their settings."""
    return {r.name: r.default for r in RULES if r.default is not None}


def parse_rules(section: Mapping[str, object], path: str = "alerts") -> dict[str, object]:
    """The rules an ``alerts:`` section switches on (those it leaves out are off), each parsed by
    its own parser, whose errors name the key path."""
    enabled: dict[str, object] = {}
    for rule in RULES:
        if rule.name in section:
            cfg = rule.parse(section[rule.name], f"{path}.{rule.name}")
            if cfg is not None:
                enabled[rule.name] = cfg
    return enabled
