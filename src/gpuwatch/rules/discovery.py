"""The rule about where hosts come from: a discovery source (``hosts_from:``) that keeps failing.

Pure like every rule: the sources' health comes in through the check's context
(:attr:`Context.sources`, filled by the daemon from :mod:`gpuwatch.discovery`); a failing source
keeps its last good list, so the alert says how many hosts are still polled from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..config.values import check_keys, mapping, parse_duration
from ..model import HostSnapshot
from ..text import format_duration, plural
from .base import AlertWords, Announces, CheckResult, Context, Finding, FleetRule, Needs, Reading, Words


@dataclass(frozen=True)
class DiscoveryFailed:
    for_seconds: float = 600.0  # how long a source must keep failing before the alert fires


def parse_discovery_failed(value: object, path: str) -> DiscoveryFailed | None:
    """``discovery_failed: {for: 10m}``, ``true`` (for 10m), or ``false``/empty (off)."""
    if value is None or value is False:
        return None
    if value is True:
        return DiscoveryFailed()
    section = mapping(value, path)
    check_keys(section, ("for",), path)
    if "for" not in section:
        return DiscoveryFailed()
    return DiscoveryFailed(for_seconds=parse_duration(section["for"], f"{path}.for"))


def discovery_failed(hosts: Sequence[HostSnapshot], cfg: DiscoveryFailed, ctx: Context) -> CheckResult:
    """One alert per source whose latest refresh failed; it resolves at the source's next good refresh."""
    findings = tuple(
        Finding(
            ctx.key(detail=health.label),
            None,
            cfg.for_seconds,
            "",
            {"error": health.error or "", "hosts_kept": health.hosts},
            hold_seconds=cfg.for_seconds,
        )
        for health in ctx.sources.values()
        if not health.ok
    )
    return CheckResult(findings)


def discovery_failed_words(r: Reading) -> AlertWords:
    kept = int(r.facts.get("hosts_kept") or 0)
    return AlertWords(
        f"discovery source {r.key.detail} fails: {r.facts.get('error')}; "
        f"still polling the {plural(kept, 'host')} of its last good list",
        "failing",
        f"alert after {format_duration(r.threshold or 0)}",
    )


DISCOVERY_FAILED = FleetRule(
    name="discovery_failed",
    parse=parse_discovery_failed,
    check=discovery_failed,
    needs=Needs.SOURCES,
    announces=Announces.ALERTS,
    words=Words(alert=discovery_failed_words),
    identity=("detail",),
)
