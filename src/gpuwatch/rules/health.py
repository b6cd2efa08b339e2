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
from .base import Context, Finding, HostRule, Needs, Outcome

# ---------------------------------------------------------------- ecc_errors


@dataclass(frozen=True)
class EccErrors:
    pass


def parse_ecc_errors(value: object, path: str) -> EccErrors | None:
    return EccErrors() if boolean(value, path) else None


def _gpu_key(gpu: Gpu) -> str:
    return (gpu.uuid or f"index {gpu.index}").lower()


def ecc_errors(host: HostSnapshot, cfg: EccErrors, ctx: Context) -> Outcome:
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
    return Outcome(tuple(findings), memory=baselines or None)


ECC_ERRORS = HostRule(
    name="ecc_errors",
    parse=parse_ecc_errors,
    check=ecc_errors,
    needs=Needs.GPU_HEALTH,
    identity=("gpu",),
    memory="ecc_baselines",
)

# ---------------------------------------------------------------- row_remap_pending


def row_remap_pending(host: HostSnapshot, cfg: EccErrors, ctx: Context) -> Outcome:
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
    return Outcome(tuple(findings))


ROW_REMAP_PENDING = HostRule(
    name="row_remap_pending",
    parse=parse_ecc_errors,
    check=row_remap_pending,
    needs=Needs.GPU_HEALTH,
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


def gpu_throttled(host: HostSnapshot, cfg: GpuThrottled, ctx: Context) -> Outcome:
    """The hardware slows a GPU down (HW slowdown, thermal, power brake) for ``for`` or longer."""
    findings = []
    for gpu in host.gpus:
        if gpu.health is None:
            continue
        active = [r for r in gpu.health.throttle_reasons if r in cfg.reasons]
        if active:
            facts = {"reasons": active, "for": cfg.for_seconds, "gpu_name": gpu.name}
            findings.append(Finding(ctx.key(gpu=gpu.index), None, None, "", facts, hold_seconds=cfg.for_seconds))
    return Outcome(tuple(findings))


GPU_THROTTLED = HostRule(
    name="gpu_throttled",
    parse=parse_gpu_throttled,
    check=gpu_throttled,
    needs=Needs.GPU_HEALTH,
    identity=("gpu",),
)
