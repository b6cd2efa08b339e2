"""The engine, pure: (fleet state, which hosts have a new result, memory) -> findings, notices,
updated memory, and which alerts this evaluation could judge.

Hosts are polled on their own clocks and the engine runs as results arrive, so it is told which
hosts are *fresh* (a new result since the last evaluation). A per-host rule runs only on a fresh
host's result, and only that result updates what the rule remembers about the host: a failure
counter counts polls of the host, not evaluations. A fleet-wide rule runs over every host's latest
result. An alert resolves only when its rule actually judged it again (``Evaluation.covers``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..config import AlertsConfig, FreeGpuConfig
from ..model import FleetSnapshot, HostSnapshot, SourceHealth
from .base import FLEET, AlertKey, Context, Finding, HostRule, Needs, Notice, Rule
from .registry import RULES


@dataclass(frozen=True)
class Memory:
    """What rules remember between results (persisted): slot -> host -> a JSON value.

    A rule that remembers declares its slot (``HostRule.memory``): e.g. ``failures`` (host_down),
    ``gpu_counts`` (gpu_missing), ``ecc_baselines``, ``boot_times``, ``driver_versions``,
    ``gpu_freed``. Only the rules running (switched on, or learning while off) keep their slots.
    """

    slots: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def get(self, slot: str, host: str) -> Any:
        return self.slots.get(slot, {}).get(host)

    def forget(self, hosts: frozenset[str]) -> Memory:
        """Without these hosts (removed from the config)."""
        return Memory({s: {h: v for h, v in by_host.items() if h not in hosts} for s, by_host in self.slots.items()})

    def as_dict(self) -> dict[str, Any]:
        return {slot: dict(by_host) for slot, by_host in self.slots.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Memory:
        slots = {str(s): dict(by_host) for s, by_host in data.items() if s not in ("busy", "jobs")}
        # Before the rule registry, gpu_freed kept two slots of its own: "busy" and "jobs".
        if "busy" in data and "gpu_freed" not in data:
            jobs = data.get("jobs", {})
            slots["gpu_freed"] = {
                str(h): {"busy": [int(i) for i in busy], "jobs": {str(p): dict(j) for p, j in jobs.get(h, {}).items()}}
                for h, busy in data["busy"].items()
            }
        return cls(slots)


@dataclass(frozen=True)
class Evaluation:
    findings: tuple[Finding, ...]
    notices: tuple[Notice, ...]
    memory: Memory
    judged: frozenset[tuple[str, str]] = frozenset()  # (rule, host) a rule ran on; host FLEET: fleet-wide
    enabled: frozenset[str] = frozenset()  # the rules switched on
    answered: frozenset[str] = frozenset()  # fresh hosts that answered
    all_answered: bool = False  # every host's latest result answered (none stale)

    def covers(self, key: AlertKey) -> bool:
        """Was this alert's condition actually judged? Only then may its absence resolve it."""
        if key.rule in self.enabled:
            return (key.rule, key.host) in self.judged
        # A rule switched off (or unknown to this version): its alerts resolve once their host answers.
        return self.all_answered if key.host == FLEET else key.host in self.answered


def evaluate(
    snapshot: FleetSnapshot,
    cfg: AlertsConfig,
    memory: Memory,
    thresholds: FreeGpuConfig,
    fresh: frozenset[str] | None = None,
    *,
    rules: Sequence[Rule] = RULES,
    sources: Mapping[str, SourceHealth] | None = None,
) -> Evaluation:
    """Every enabled rule over the fleet state -> the conditions that hold now, and updated memory.

    ``fresh``: the hosts with a new result since the last evaluation (None: every host in the
    snapshot, as after a poll of all of them). A stale host (its latest result too old) is never
    fresh, and counts as not answered for the fleet-wide rules. ``rules``: the registry (a test
    may add one). ``sources``: the discovery sources' health (label -> SourceHealth), for the
    fleet rules that judge it (``Needs.SOURCES``: judged every time, whatever the hosts).
    """
    fresh_hosts = [h for h in snapshot.hosts if not h.stale and (fresh is None or h.name in fresh)]
    running: list[tuple[Rule, object]] = [(r, cfg.rules[r.name]) for r in rules if r.name in cfg.rules]
    running += [
        (r, r.default)
        for r in rules
        if r.name not in cfg.rules and isinstance(r, HostRule) and r.learn_when_off and r.default is not None
    ]
    # Any other rule switched off remembers nothing: switched on again, it starts afresh.
    slots = {r.memory: dict(memory.slots.get(r.memory, {})) for r, _ in running if r.memory}
    findings: list[Finding] = []
    notices: list[Notice] = []
    judged: set[tuple[str, str]] = set()
    for rule, rule_cfg in running:
        on = rule.name in cfg.rules
        if isinstance(rule, HostRule):
            for host in fresh_hosts:
                if not rule.needs.met_by(host):
                    continue
                slot = slots[rule.memory] if rule.memory else None
                ctx = Context(rule.name, host.name, rule.identity, thresholds, slot.get(host.name) if slot else None)
                result = rule.check(host, rule_cfg, ctx)
                _remember(slot, host, result.memory)
                if on:
                    findings += result.findings
                    notices += result.notices
                    judged.add((rule.name, host.name))
        else:
            usable = [h for h in snapshot.hosts if not h.stale and rule.needs.met_by(h)]
            ctx = Context(rule.name, FLEET, rule.identity, thresholds, sources=dict(sources or {}))
            result = rule.check(usable, rule_cfg, ctx)
            findings += result.findings
            notices += result.notices
            if rule.needs is Needs.SOURCES or len(usable) == len(snapshot.hosts):
                judged.add((rule.name, FLEET))
    hold = cfg.for_seconds
    return Evaluation(
        findings=tuple(replace(f, hold_seconds=max(hold, f.hold_seconds)) for f in findings),
        notices=tuple(notices),
        memory=Memory(slots),
        judged=frozenset(judged),
        enabled=frozenset(cfg.rules),
        answered=frozenset(h.name for h in fresh_hosts if h.ok),
        all_answered=all(h.ok and not h.stale for h in snapshot.hosts),
    )


def _remember(slot: dict[str, Any] | None, host: HostSnapshot, value: Any) -> None:
    if slot is None:
        return
    if value is None:
        slot.pop(host.name, None)
    else:
        slot[host.name] = value
