"""Rules about a host's health: it stopped answering, a GPU vanished, the driver or a GPU failed."""

from __future__ import annotations

from dataclasses import dataclass

from ..config.values import boolean, check_keys, integer, mapping
from ..model import HostSnapshot
from ..text import UNKNOWN, number, quantity
from .base import (
    GPU_ERROR_KINDS,
    AlertWords,
    Announces,
    CheckResult,
    Context,
    Finding,
    HostRule,
    Inhibit,
    Needs,
    Reading,
    Words,
)

# The names of the host failures that are about its GPUs (HostSnapshot.error_name).
_GPU_ERROR_VALUES = frozenset(kind.value for kind in GPU_ERROR_KINDS)

# ---------------------------------------------------------------- host_down


@dataclass(frozen=True)
class HostDown:
    after: int = 3  # consecutive failed polls of the host


def parse_host_down(value: object, path: str) -> HostDown | None:
    """``host_down: {after: 3}``, ``true`` (after 3), or ``false``/empty (off)."""
    if value is None or value is False:
        return None
    if value is True:
        return HostDown()
    section = mapping(value, path)
    check_keys(section, ("after",), path)
    return HostDown(after=integer(section.get("after", HostDown.after), f"{path}.after", 1))


def host_down(host: HostSnapshot, cfg: HostDown, ctx: Context) -> CheckResult:
    """Counts the host's failed polls in a row (each new result once); an answer starts it over.

    A failure that is about the GPUs (the driver, a lost GPU) counts too, so a broken driver is
    never silent when gpu_error is off; while gpu_error fires for the host, it inhibits this alert
    (:data:`GPU_ERROR_INHIBITS_HOST_DOWN`)."""
    if host.ok:
        return CheckResult(memory=None)
    failures = int(ctx.remembered or 0) + 1
    findings: tuple[Finding, ...] = ()
    if failures >= cfg.after:
        facts = {"error": host.error, "error_kind": host.error_name}
        findings = (Finding(ctx.key(), failures, cfg.after, "polls", facts),)
    return CheckResult(findings, memory=failures)


def host_down_words(r: Reading) -> AlertWords:
    if r.facts.get("error_kind") in _GPU_ERROR_VALUES:  # it answered; its GPUs did not (gpu_error is off)
        summary = f"{r.key.host} answers, but no GPU data for {quantity(r.value, 'polls')}: {r.facts.get('error')}"
    else:
        summary = f"{r.key.host} has not answered for {quantity(r.value, 'polls')}: {r.facts.get('error')}"
    return AlertWords(
        summary,
        quantity(r.value, "failed polls"),
        f"alert after {number(r.threshold)}",
    )


HOST_DOWN = HostRule(
    name="host_down",
    parse=parse_host_down,
    check=host_down,
    needs=Needs.RESULT,
    announces=Announces.ALERTS,
    words=Words(alert=host_down_words),
    default=HostDown(),
    memory="failures",
    learn_when_off=True,
)

# ---------------------------------------------------------------- gpu_missing


@dataclass(frozen=True)
class GpuMissing:
    pass


def parse_gpu_missing(value: object, path: str) -> GpuMissing | None:
    return GpuMissing() if boolean(value, path) else None


def gpu_missing(host: HostSnapshot, cfg: GpuMissing, ctx: Context) -> CheckResult:
    """Fewer GPUs than the most this host has reported (the baseline is remembered)."""
    count = len(host.gpus)
    baseline = int(ctx.remembered or 0)
    findings: tuple[Finding, ...] = ()
    if baseline and count < baseline:
        findings = (Finding(ctx.key(), count, baseline, "GPUs"),)
    return CheckResult(findings, memory=max(baseline, count))


def gpu_missing_words(r: Reading) -> AlertWords:
    fewer = UNKNOWN if r.value is None or r.threshold is None else number(r.threshold - r.value)
    return AlertWords(
        f"{r.key.host} reports {quantity(r.value, 'GPUs')}, {fewer} fewer than the {number(r.threshold)} it had",
        quantity(r.value, "GPUs"),
        f"{quantity(r.threshold, 'GPUs')} seen before",
    )


GPU_MISSING = HostRule(
    name="gpu_missing",
    parse=parse_gpu_missing,
    check=gpu_missing,
    needs=Needs.GPU_DATA,
    announces=Announces.ALERTS,
    words=Words(alert=gpu_missing_words),
    default=GpuMissing(),
    memory="gpu_counts",
    learn_when_off=True,
)

# ---------------------------------------------------------------- gpu_error


@dataclass(frozen=True)
class GpuError:
    pass


def parse_gpu_error(value: object, path: str) -> GpuError | None:
    return GpuError() if boolean(value, path) else None


def gpu_error(host: HostSnapshot, cfg: GpuError, ctx: Context) -> CheckResult:
    """The driver or a GPU failed: the whole host's failure, or a warning beside good rows.
    One alert per kind of error; it resolves only on a result that says what the GPUs are doing."""
    issues = [(host.error_kind, host.error)] if not host.ok else [(w.kind, w.message) for w in host.warnings]
    findings = tuple(
        Finding(ctx.key(detail=kind.value), None, None, "", {"error": message})
        for kind, message in issues
        if kind is not None and kind in GPU_ERROR_KINDS
    )
    return CheckResult(findings)


def gpu_error_words(r: Reading) -> AlertWords:
    return AlertWords(f"{r.key.host}: {r.facts.get('error')}", r.key.detail or "error", "no GPU error")


GPU_ERROR = HostRule(
    name="gpu_error",
    parse=parse_gpu_error,
    check=gpu_error,
    needs=Needs.GPU_STATE,
    announces=Announces.ALERTS,
    words=Words(alert=gpu_error_words),
    identity=("detail",),
    default=GpuError(),
)

# A host that answers over SSH but whose driver is broken is one alert, gpu_error, not also
# host_down ("has not answered" would be untrue): while the host's gpu_error fires, its host_down
# is kept but not announced, as long as host_down's latest failure is itself a GPU error. Should
# the host stop answering altogether, host_down is said again.
GPU_ERROR_INHIBITS_HOST_DOWN = Inhibit(
    source="gpu_error",
    target="host_down",
    equal=("host",),
    applies=lambda facts: facts.get("error_kind") in _GPU_ERROR_VALUES,
)
