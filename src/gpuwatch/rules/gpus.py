"""Rules about one GPU's readings: too hot, or holding memory without doing any work."""

from __future__ import annotations

from dataclasses import dataclass

from ..config.values import check_keys, integer, mapping, optional_int, parse_duration
from ..model import HostSnapshot
from ..text import format_duration, number
from .base import AlertWords, Announces, CheckResult, Context, Finding, HostRule, Needs, Reading, Words

# ---------------------------------------------------------------- temperature_above


@dataclass(frozen=True)
class TemperatureAbove:
    limit_c: int  # in Celsius


def parse_temperature_above(value: object, path: str) -> TemperatureAbove | None:
    limit = optional_int(value, path, 1)
    return None if limit is None else TemperatureAbove(limit)


def temperature_above(host: HostSnapshot, cfg: TemperatureAbove, ctx: Context) -> CheckResult:
    return CheckResult(
        tuple(
            Finding(ctx.key(gpu=gpu.index), gpu.temperature_c, cfg.limit_c, "°C")
            for gpu in host.gpus
            if gpu.temperature_c is not None and gpu.temperature_c > cfg.limit_c
        )
    )


def temperature_above_words(r: Reading) -> AlertWords:
    return AlertWords(
        f"{r.key.host} GPU {r.key.gpu} is at {number(r.value, '°C')}",
        number(r.value, "°C"),
        f"at most {number(r.threshold, '°C')}",
    )


TEMPERATURE_ABOVE = HostRule(
    name="temperature_above",
    parse=parse_temperature_above,
    check=temperature_above,
    needs=Needs.GPU_DATA,
    announces=Announces.ALERTS,
    words=Words(alert=temperature_above_words),
    identity=("gpu",),
)

# ---------------------------------------------------------------- idle_gpu


@dataclass(frozen=True)
class IdleGpu:
    """Memory held, no work done, for ``after`` seconds."""

    after: float = 1800.0
    util_below: int = 5  # percent
    memory_above_mib: int = 1024


def parse_idle_gpu(value: object, path: str) -> IdleGpu | None:
    """``idle_gpu: {after: 30m, util_below: 5, memory_above_mib: 1024}``, ``true`` (these), or off."""
    if value is None or value is False:
        return None
    section = {} if value is True else mapping(value, path)
    check_keys(section, ("after", "util_below", "memory_above_mib"), path)
    default = IdleGpu()
    return IdleGpu(
        after=parse_duration(section["after"], f"{path}.after") if "after" in section else default.after,
        util_below=integer(section.get("util_below", default.util_below), f"{path}.util_below", 0, 101),
        memory_above_mib=integer(
            section.get("memory_above_mib", default.memory_above_mib), f"{path}.memory_above_mib", 0
        ),
    )


def idle_gpu(host: HostSnapshot, cfg: IdleGpu, ctx: Context) -> CheckResult:
    """Below ``util_below`` % with more than ``memory_above_mib`` held; it must hold for ``after``.
    Unknown utilization (MIG mode) is not evidence of idleness."""
    findings = []
    for gpu in host.gpus:
        util, used = gpu.utilization_percent, gpu.memory_used_mib
        if util is None or used is None or util >= cfg.util_below or used <= cfg.memory_above_mib:
            continue
        owners = sorted({p.owner or f"pid {p.pid}" for p in host.processes_on(gpu)})
        facts = {
            "memory_used_mib": used,
            "memory_above_mib": cfg.memory_above_mib,
            "after": cfg.after,
            "owners": owners,
        }
        findings.append(Finding(ctx.key(gpu=gpu.index), util, cfg.util_below, "%", facts, hold_seconds=cfg.after))
    return CheckResult(tuple(findings))


def idle_gpu_words(r: Reading) -> AlertWords:
    used = number(r.facts.get("memory_used_mib"))
    who = ", ".join(r.facts.get("owners", [])) or "no visible process"
    return AlertWords(
        f"{r.key.host} GPU {r.key.gpu} holds {used} MiB at {number(r.value, '%')} utilization ({who})",
        f"{number(r.value, '%')}, {used} MiB",
        f"idle (<{number(r.threshold, '%')}) with >{number(r.facts.get('memory_above_mib'))} MiB "
        f"for {format_duration(r.facts.get('after'))}",
    )


IDLE_GPU = HostRule(
    name="idle_gpu",
    parse=parse_idle_gpu,
    check=idle_gpu,
    needs=Needs.GPU_DATA,
    announces=Announces.ALERTS,
    words=Words(alert=idle_gpu_words),
    identity=("gpu",),
)
