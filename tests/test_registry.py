"""The rule registry: every place that names rules finds them there, and a rule added the way the
registry asks (a function, its config, its words, its entry) runs end to end with nothing else changed."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from builders import DAY, MIN, T0, alice, h100_host, kinds, switched_on
from gpuwatch.cli import build_parser
from gpuwatch.config import AlertsConfig, FreeGpuConfig
from gpuwatch.config.load import parse_config
from gpuwatch.config.values import ConfigError, optional_int
from gpuwatch.model import FleetSnapshot, HostSnapshot
from gpuwatch.report import alert_message, alert_words
from gpuwatch.rules import (
    RULE_NAMES,
    RULES,
    AlertKey,
    AlertRecord,
    AlertWords,
    Announces,
    Memory,
    Needs,
    Reading,
    Scope,
    Transition,
    Words,
    advance,
    evaluate,
)
from gpuwatch.rules.base import CheckResult, Context, Finding, HostRule
from gpuwatch.rules.registry import default_rules
from gpuwatch.text import number

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_alerts_table_lists_the_registry_in_its_order() -> None:
    section = README.read_text().split("## Alerts", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| `([a-z_]+)[:`]", section, re.M)
    assert documented == list(RULE_NAMES)


def test_the_readme_alerts_table_says_what_each_rule_announces() -> None:
    section = README.read_text().split("## Alerts", 1)[1].split("\n## ", 1)[0]
    documented = dict(re.findall(r"^\| `([a-z_]+)[:`][^|]*\| (alerts|notices|both) \|", section, re.M))
    assert documented == {r.name: r.announces.value for r in RULES}


def test_every_rule_has_words_for_what_it_announces() -> None:
    for rule in RULES:
        assert (rule.words.alert is not None) == rule.announces.alerts, rule.name
        assert (rule.words.notice is not None) == rule.announces.notices, rule.name
    with pytest.raises(ValueError, match="rule mute: announces alerts but has words for nothing"):
        HostRule(
            name="mute",
            parse=parse_power_above,
            check=power_above,
            needs=Needs.GPU_DATA,
            announces=Announces.ALERTS,
            words=Words(),
        )
    with pytest.raises(ValueError, match=r"rule hot: identity field\(s\) uuid not among"):
        HostRule(
            name="hot",
            parse=parse_power_above,
            check=power_above,
            needs=Needs.GPU_DATA,
            announces=Announces.ALERTS,
            words=Words(alert=power_above_words),
            identity=("uuid",),
        )


def test_the_example_config_documents_every_rule_of_the_registry(tmp_path: Path) -> None:
    """The example is minimal (issue 19): as shipped it switches on the default rules only, and
    every other rule of the registry is there commented out: switched on, all of them parse."""
    text = (README.parent / "config.example.yaml").read_text()
    shipped = parse_config(yaml.safe_load(text), tmp_path / "config.yaml").alerts.rules
    assert set(shipped) == set(default_rules())
    documented = parse_config(yaml.safe_load(switched_on(text)), tmp_path / "config.yaml").alerts.rules
    assert tuple(documented) == RULE_NAMES


def test_silences_and_routes_take_every_rule_of_the_registry() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    silence = sub.choices["silence"]
    silence_sub = next(a for a in silence._actions if isinstance(a, argparse._SubParsersAction))
    rule_flag = next(a for a in silence_sub.choices["add"]._actions if a.dest == "rule")
    assert tuple(rule_flag.choices or ()) == RULE_NAMES
    routes = {name: ["feishu"] for name in (*RULE_NAMES, "default")}
    config = parse_config({"hosts": ["a"], "feishu": {"url": "https://example.com/h"}, "alerts": {"routes": routes}})
    assert set(config.alerts.routes) == {*RULE_NAMES, "default"}


def test_each_rule_declares_what_it_needs_and_what_its_alerts_are_about() -> None:
    declared = {r.name: (r.scope, r.needs, r.identity) for r in RULES}
    assert declared == {
        "max_gpus_per_user": (Scope.HOST, Needs.PROCESSES, ("user",)),
        "max_gpus_per_user_fleet": (Scope.FLEET, Needs.PROCESSES, ("user",)),
        "max_runtime": (Scope.HOST, Needs.PROCESSES, ("user", "pid")),
        "idle_gpu": (Scope.HOST, Needs.GPU_DATA, ("gpu",)),
        "host_down": (Scope.HOST, Needs.RESULT, ()),
        "gpu_missing": (Scope.HOST, Needs.GPU_DATA, ()),
        "gpu_error": (Scope.HOST, Needs.GPU_STATE, ("detail",)),
        "discovery_failed": (Scope.FLEET, Needs.SOURCES, ("detail",)),
        "temperature_above": (Scope.HOST, Needs.GPU_DATA, ("gpu",)),
        "ecc_errors": (Scope.HOST, Needs.GPU_HEALTH, ("gpu",)),
        "row_remap_pending": (Scope.HOST, Needs.GPU_HEALTH, ("gpu",)),
        "gpu_throttled": (Scope.HOST, Needs.GPU_HEALTH, ("gpu",)),
        "disk_above": (Scope.HOST, Needs.DISKS, ("detail",)),
        "memory_above": (Scope.HOST, Needs.HOST_CONTEXT, ()),
        "load_above": (Scope.HOST, Needs.HOST_CONTEXT, ()),
        "host_rebooted": (Scope.HOST, Needs.HOST_CONTEXT, ()),
        "driver_changed": (Scope.HOST, Needs.RESULT, ()),
        "gpu_freed": (Scope.HOST, Needs.PROCESSES, ()),
        "reservation_conflict": (Scope.HOST, Needs.PROCESSES, ("user", "detail")),
    }


def test_a_rule_keys_its_alerts_only_by_the_fields_it_declared() -> None:
    ctx = Context("max_gpus_per_user", "gpu-a", ("user",), FreeGpuConfig())
    assert ctx.key(user="alice").id == "max_gpus_per_user|gpu-a||alice||"
    with pytest.raises(ValueError, match=r"rule max_gpus_per_user: key field\(s\) gpu not in its identity"):
        ctx.key(user="alice", gpu=3)  # would make one alert per GPU out of one per user


# ---------------------------------------------------------------- a rule added the registry's way


@dataclass(frozen=True)
class PowerAbove:
    limit_w: int


def parse_power_above(value: object, path: str) -> PowerAbove | None:
    limit = optional_int(value, path, 1)
    return None if limit is None else PowerAbove(limit)


def power_above(host: HostSnapshot, cfg: PowerAbove, ctx: Context) -> CheckResult:
    return CheckResult(
        tuple(
            Finding(ctx.key(gpu=gpu.index), gpu.power_w, cfg.limit_w, "W")
            for gpu in host.gpus
            if gpu.power_w is not None and gpu.power_w > cfg.limit_w
        )
    )


def power_above_words(r: Reading) -> AlertWords:
    return AlertWords(
        f"{r.key.host} GPU {r.key.gpu} draws {number(r.value, ' W')}",
        number(r.value, " W"),
        f"at most {number(r.threshold, ' W')}",
    )


POWER_ABOVE = HostRule(
    name="power_above",
    parse=parse_power_above,
    check=power_above,
    needs=Needs.GPU_DATA,
    announces=Announces.ALERTS,
    words=Words(alert=power_above_words),
    identity=("gpu",),
)


def test_a_new_rule_is_a_function_its_config_its_words_and_its_entry() -> None:
    registry = (*RULES, POWER_ABOVE)
    assert POWER_ABOVE.parse(600, "alerts.power_above") == PowerAbove(600)
    with pytest.raises(ConfigError, match=r"alerts\.power_above: 0 is out of range"):
        POWER_ABOVE.parse(0, "alerts.power_above")
    cfg = AlertsConfig(rules={"power_above": PowerAbove(600)})
    records: dict = {}
    memory = Memory()

    def step(now: float, host: HostSnapshot) -> list:
        nonlocal records, memory
        snapshot = FleetSnapshot(datetime.fromtimestamp(now, timezone.utc), (host,))
        evaluation = evaluate(snapshot, cfg, memory, FreeGpuConfig(), rules=registry)
        records, transitions = advance(records, evaluation, now, cfg)
        memory = evaluation.memory
        return transitions

    busy = h100_host("gpu-a", alice([0], elapsed=int(DAY)))  # the real load row: 631.95 W on GPU 0
    fired = step(T0, busy)
    assert kinds(fired) == [("firing", "power_above|gpu-a|0|||")]
    assert (fired[0].record.value, fired[0].record.threshold, fired[0].record.unit) == (631.95, 600, "W")
    message = alert_message(fired, [], {}, tz=timezone.utc, rules=registry)
    assert message is not None  # its own words, without any change to report.py
    assert message.text.endswith(
        "FIRING power_above (gpu-a, GPU 0)\n"
        "    gpu-a GPU 0 draws 631.95 W\n"
        "    now: 631.95 W; threshold: at most 600 W; since 2027-01-15 08:00:00 UTC\n"
        "    an admin can acknowledge it: gpuwatch ack --rule power_above --host gpu-a --gpu 0"
    )
    assert step(T0 + MIN, busy) == []
    assert kinds(step(T0 + 2 * MIN, h100_host("gpu-a"))) == [("resolved", "power_above|gpu-a|0|||")]


def test_an_alert_of_a_rule_this_gpuwatch_does_not_know_is_said_by_its_name_where_and_numbers() -> None:
    """E.g. a record stored by a newer gpuwatch, read after a downgrade: never lost for want of words."""
    record = AlertRecord(AlertKey("power_above", "gpu-a", gpu=0), "firing", T0, 631.95, 600, "W", fired_at=T0)
    said = alert_words(record)
    assert said == AlertWords("power_above (gpu-a, GPU 0): 631.95 W", "631.95 W", "limit 600 W")
    message = alert_message([Transition("firing", record, T0)], [], {}, tz=timezone.utc)
    assert message is not None and "    power_above (gpu-a, GPU 0): 631.95 W\n" in message.text
