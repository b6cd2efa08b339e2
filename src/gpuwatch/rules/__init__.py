"""Alert rules and their lifecycle, pure: (fleet state, fresh hosts, memory, state, now) -> transitions.

- ``base``: what a rule declares (what it needs, what it announces, its words) and what its check
  returns (AlertKey, Finding with numbers, Notice of a NoticeKind);
- ``users``, ``gpus``, ``hosts``, ``health``, ``context``, ``freed``: the rules by family, each a
  check, its config, its words and its declaration;
- ``registry``: every rule, found by name (config, engine, silences, routes);
- ``engine``: ``evaluate`` runs the registry over the fleet state; ``Memory``;
- ``lifecycle``: ``advance`` moves each alert pending -> firing -> resolved; silences; inhibition
  (``registry.INHIBITS``: a firing gpu_error keeps its host's host_down from being announced).

A failed poll never resolves an alert about that host's GPUs and never reads as "all GPUs free".
"""

from __future__ import annotations

from .base import (
    FLEET,
    GPU_ERROR_KINDS,
    AlertKey,
    AlertWords,
    Announces,
    CheckResult,
    Finding,
    FleetRule,
    HostRule,
    Inhibit,
    Needs,
    Notice,
    NoticeKind,
    Reading,
    Rule,
    Scope,
    Words,
    processes_known,
)
from .engine import Evaluation, Memory, evaluate
from .lifecycle import (
    HOST_REMOVED,
    Ack,
    AlertRecord,
    Silence,
    SilenceCheck,
    Transition,
    acknowledged_ids,
    advance,
    inhibited,
    matching_firing,
    silence_check,
)
from .registry import BY_NAME, INHIBITS, RULE_NAMES, RULES

__all__ = [
    "BY_NAME",
    "FLEET",
    "GPU_ERROR_KINDS",
    "HOST_REMOVED",
    "INHIBITS",
    "RULES",
    "RULE_NAMES",
    "Ack",
    "AlertKey",
    "AlertRecord",
    "AlertWords",
    "Announces",
    "CheckResult",
    "Evaluation",
    "Finding",
    "FleetRule",
    "HostRule",
    "Inhibit",
    "Memory",
    "Needs",
    "Notice",
    "NoticeKind",
    "Reading",
    "Rule",
    "Scope",
    "Silence",
    "SilenceCheck",
    "Transition",
    "Words",
    "acknowledged_ids",
    "advance",
    "evaluate",
    "inhibited",
    "matching_firing",
    "processes_known",
    "silence_check",
]
