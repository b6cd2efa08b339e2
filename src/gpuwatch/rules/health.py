"""Rules about a GPU's health, from the extra ``--query-gpu`` fields its driver supports:
uncorrectable ECC errors, memory rows waiting for a remap (or out of spares), hardware slowdown.

A reading the driver does not give (``[N/A]``, an older driver) is unknown, never "healthy" or
"broken"; the rules judge only results whose GPUs all carry their health readings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..config.values import ConfigError, boolean, check_keys, mapping, parse_duration
from ..model import Gpu, HostSnapshot
from ..text import format_duration, number, quantity
from .base import AlertWords, Announces, CheckResult, Context, Finding, HostRule, Needs, Reading, Words

# ---------------------------------------------------------------- ecc_errors


@dataclass(frozen=True)
class EccErrors:
    pass


def parse_ecc_errors(value: object, path: str) -> EccErrors | None:
    return EccErrors() if boolean(value, path) else None


def _gpu_key(gpu: Gpu) -> str:
    return (gpu.uuid or f"index {gpu.index}").lower()


def ecc_errors(host: HostSnapshot, cfg: EccErrors, ctx: Context) -> CheckResult:
    """Uncorrectable ECC errors rose: some since the driver loaded (volatile), or more in the GPU's
    lifetime (aggregate) than when gpuwatch first saw it. A reset or reboot that clears the
    volatile count takes the lifetime count as the new baseline, so the alert resolves."""
    baselines: dict[str, Any] = dict(ctx.remembered or {})
    findings = []
    for gpu in host.gpus:
        health = gpu.health
        if health is None:
            continue
        volatile, aggregate = health.ecc_uncorrected_volatile, health.ecc_uncorrected_aggregate
        key = _gpu_key(gpu)
        base = baselines.get(key)
        if aggregate is not None and (base is None or volatile == 0):
            base = aggregate
        if base is not None:
            baselines[key] = base
        risen = aggregate - base if aggregate is not None and base is not None else 0
        if (volatile or 0) > 0 or risen > 0:
            value = volatile if volatile else risen
            facts = {"volatile": volatile, "aggregate": aggregate, "baseline": base, "gpu_name": gpu.name}
            findings.append(Finding(ctx.key(gpu=gpu.index), value, 0, "errors", facts))
    return CheckResult(tuple(findings), memory=baselines or None)


def _gpu_named(r: Reading) -> str:
    name = r.facts.get("gpu_name")
    return f"{r.key.host} GPU {r.key.gpu}" + (f" ({name})" if name else "")


def ecc_errors_words(r: Reading) -> AlertWords:
    volatile, aggregate = r.facts.get("volatile"), r.facts.get("aggregate")
    return AlertWords(
        f"{_gpu_named(r)} has uncorrectable ECC errors: {number(volatile)} since the driver loaded, "
        f"{number(aggregate)} in its lifetime (was {number(r.facts.get('baseline'))}); its memory may be "
        "failing: drain it and reset the GPU or reboot",
        quantity(r.value, "errors"),
        "no new uncorrectable error",
    )


ECC_ERRORS = HostRule(
    name="ecc_errors",
    parse=parse_ecc_errors,
    check=ecc_errors,
    needs=Needs.GPU_HEALTH,
    announces=Announces.ALERTS,
    words=Words(alert=ecc_errors_words),
    identity=("gpu",),
    memory="ecc_baselines",
)

# ---------------------------------------------------------------- row_remap_pending


def row_remap_pending(host: HostSnapshot, cfg: EccErrors, ctx: Context) -> CheckResult:
    """Memory rows (or, on older GPUs, pages) wait for a remap that needs a GPU reset, or the GPU
    has no spare rows left (``remapped_rows.failure``): its memory is no longer reliable."""
    findings = []
    for gpu in host.gpus:
        health = gpu.health
        if health is None:
            continue
        pending = [
            name
            for name, flag in (
                ("remapped_rows", health.remapped_rows_pending),
                ("retired_pages", health.retired_pages_pending),
            )
            if flag
        ]
        if pending or health.remapped_rows_failure:
            facts = {"pending": pending, "failure": bool(health.remapped_rows_failure), "gpu_name": gpu.name}
            findings.append(Finding(ctx.key(gpu=gpu.index), None, None, "", facts))
    return CheckResult(tuple(findings))


def row_remap_pending_words(r: Reading) -> AlertWords:
    if r.facts.get("failure"):
        what = "has no spare memory rows left (remapped_rows.failure): the GPU needs service"
    else:
        pending = " and ".join(str(p).replace("_", " ") for p in r.facts.get("pending", []))
        what = f"has {pending} waiting to be remapped: reset the GPU (or reboot) when it is free"
    return AlertWords(f"{_gpu_named(r)} {what}", "pending" if not r.facts.get("failure") else "failure", "none")


ROW_REMAP_PENDING = HostRule(
    name="row_remap_pending",
    parse=parse_ecc_errors,
    check=row_remap_pending,
    needs=Needs.GPU_HEALTH,
    announces=Announces.ALERTS,
    words=Words(alert=row_remap_pending_words),
    identity=("gpu",),
)

# ---------------------------------------------------------------- gpu_throttled

THROTTLE_REASONS = ("hw_slowdown", "thermal", "power_brake")


@dataclass(frozen=True)
class GpuThrottled:
    for_seconds: float = 300.0
    reasons: tuple[str, ...] = THROTTLE_REASONS


def parse_gpu_throttled(value: object, path: str) -> GpuThrottled | None:
    """``gpu_throttled: {for: 5m, reasons: [hw_slowdown, thermal, power_brake]}``, ``true`` (these), or off."""
    if value is None or value is False:
        return None
    section: Mapping[str, Any] = {} if value is True else mapping(value, path)
    check_keys(section, ("for", "reasons"), path)
    default = GpuThrottled()
    hold = parse_duration(section["for"], f"{path}.for") if "for" in section else default.for_seconds
    reasons = default.reasons
    if "reasons" in section:
        raw = section["reasons"]
        if not isinstance(raw, list) or not raw or any(r not in THROTTLE_REASONS for r in raw):
            raise ConfigError(f"{path}.reasons: expected a list of {', '.join(THROTTLE_REASONS)}")
        reasons = tuple(dict.fromkeys(raw))
    return GpuThrottled(hold, reasons)


def gpu_throttled(host: HostSnapshot, cfg: GpuThrottled, ctx: Context) -> CheckResult:
    """The hardware slows a GPU down (HW slowdown, thermal, power brake) for ``for`` or longer."""
    findings = []
    for gpu in host.gpus:
        if gpu.health is None:
            continue
        active = [r for r in gpu.health.throttle_reasons if r in cfg.reasons]
        if active:
            facts = {"reasons": active, "for": cfg.for_seconds, "gpu_name": gpu.name}
            findings.append(Finding(ctx.key(gpu=gpu.index), None, None, "", facts, hold_seconds=cfg.for_seconds))
    return CheckResult(tuple(findings))


def gpu_throttled_words(r: Reading) -> AlertWords:
    reasons = ", ".join(str(x).replace("_", " ") for x in r.facts.get("reasons", []))
    return AlertWords(
        f"{_gpu_named(r)} is slowed down by the hardware ({reasons}): check cooling and power",
        reasons,
        f"no hardware slowdown for {format_duration(r.facts.get('for'))}",
    )


GPU_THROTTLED = HostRule(
    name="gpu_throttled",
    parse=parse_gpu_throttled,
    check=gpu_throttled,
    needs=Needs.GPU_HEALTH,
    announces=Announces.ALERTS,
    words=Words(alert=gpu_throttled_words),
    identity=("gpu",),
)
