"""Rules about the rest of a host: a full disk, memory, load; a reboot and a driver change (notices).

They judge the host's context (``model.HostContext``), read in the same probe as its GPUs: a host
whose GPUs failed (a driver mismatch) still says how full its disks are, and a host whose context
was not read (unreachable, an older probe, a damaged section) is not judged: nothing resolves.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..config.values import ConfigError, boolean, check_keys, integer, mapping, parse_duration
from ..model import HostErrorKind, HostSnapshot
from ..text import format_duration, local_time, number, size_kib
from .base import (
    AlertWords,
    Announces,
    CheckResult,
    Context,
    Finding,
    HostRule,
    Needs,
    Notice,
    NoticeKind,
    Reading,
    Words,
)

# ---------------------------------------------------------------- threshold settings


@dataclass(frozen=True)
class Threshold:
    """A limit and how long it must be crossed before the alert fires."""

    limit: float
    for_seconds: float = 0.0


def _threshold(value: object, path: str, key: str, low: float, high: float, whole: bool) -> Threshold | None:
    """``rule: 90`` or ``rule: {<key>: 90, for: 10m}``; off when empty or false."""
    if value is None or value is False:
        return None
    section: Mapping[str, Any] = {key: value} if not isinstance(value, Mapping) else mapping(value, path)
    check_keys(section, (key, "for"), path)
    if key not in section:
        raise ConfigError(f"{path}: needs '{key}', e.g. {{{key}: {int(high * 0.9) if whole else 2}}}")
    where = f"{path}.{key}" if isinstance(value, Mapping) else path
    raw = section[key]
    if whole:
        limit: float = integer(raw, where, int(low), int(high))
    else:
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not low < raw <= high:
            raise ConfigError(f"{where}: expected a number above {low:g} and at most {high:g}, got {raw!r:.40}")
        limit = float(raw)
    hold = parse_duration(section["for"], f"{path}.for") if "for" in section else 0.0
    return Threshold(limit, hold)


# ---------------------------------------------------------------- disk_above


def parse_disk_above(value: object, path: str) -> Threshold | None:
    return _threshold(value, path, "percent", 1, 100, whole=True)


def disk_above(host: HostSnapshot, cfg: Threshold, ctx: Context) -> CheckResult:
    """One alert per mount point above the limit (the disks the host context shows)."""
    assert host.context is not None  # Needs.DISKS
    return CheckResult(
        tuple(
            Finding(
                ctx.key(detail=disk.mount),
                disk.use_percent,
                cfg.limit,
                "%",
                {
                    "mount": disk.mount,
                    "paths": list(disk.paths),
                    "used_kib": disk.used_kib,
                    "size_kib": disk.size_kib,
                    "available_kib": disk.available_kib,
                },
                hold_seconds=cfg.for_seconds,
            )
            for disk in host.context.disks
            if disk.use_percent > cfg.limit
        )
    )


def disk_above_words(r: Reading) -> AlertWords:
    paths = [p for p in r.facts.get("paths", []) if p != r.key.detail]
    on = f" (holds {', '.join(paths)})" if paths else ""
    return AlertWords(
        f"{r.key.host} disk {r.key.detail}{on} is {number(r.value, '%')} full, "
        f"{size_kib(r.facts.get('available_kib'))} free of {size_kib(r.facts.get('size_kib'))}",
        number(r.value, "%"),
        f"at most {number(r.threshold, '%')}",
    )


DISK_ABOVE = HostRule(
    name="disk_above",
    parse=parse_disk_above,
    check=disk_above,
    needs=Needs.DISKS,
    announces=Announces.ALERTS,
    words=Words(alert=disk_above_words),
    identity=("detail",),
)

# ---------------------------------------------------------------- memory_above


def parse_memory_above(value: object, path: str) -> Threshold | None:
    return _threshold(value, path, "percent", 1, 100, whole=True)


def memory_above(host: HostSnapshot, cfg: Threshold, ctx: Context) -> CheckResult:
    context = host.context
    assert context is not None  # Needs.HOST_CONTEXT
    percent = context.memory_percent
    if percent is None or percent <= cfg.limit:
        return CheckResult()
    facts = {
        "used_kib": context.memory_used_kib,
        "total_kib": context.memory_total_kib,
        "swap_used_kib": context.swap_used_kib,
        "swap_total_kib": context.swap_total_kib,
    }
    return CheckResult((Finding(ctx.key(), round(percent, 1), cfg.limit, "%", facts, hold_seconds=cfg.for_seconds),))


def memory_above_words(r: Reading) -> AlertWords:
    return AlertWords(
        f"{r.key.host} memory is {number(r.value, '%')} used "
        f"({size_kib(r.facts.get('used_kib'))} of {size_kib(r.facts.get('total_kib'))}; "
        f"swap {size_kib(r.facts.get('swap_used_kib'))} of {size_kib(r.facts.get('swap_total_kib'))})",
        number(r.value, "%"),
        f"at most {number(r.threshold, '%')}",
    )


MEMORY_ABOVE = HostRule(
    name="memory_above",
    parse=parse_memory_above,
    check=memory_above,
    needs=Needs.HOST_CONTEXT,
    announces=Announces.ALERTS,
    words=Words(alert=memory_above_words),
)

# ---------------------------------------------------------------- load_above


def parse_load_above(value: object, path: str) -> Threshold | None:
    return _threshold(value, path, "per_cpu", 0, 1000, whole=False)


def load_above(host: HostSnapshot, cfg: Threshold, ctx: Context) -> CheckResult:
    """The 5-minute load average per CPU above the limit."""
    context = host.context
    assert context is not None  # Needs.HOST_CONTEXT
    per_cpu = context.load_per_cpu
    if per_cpu is None or per_cpu <= cfg.limit:
        return CheckResult()
    facts = {"load_5m": context.load_5m, "cpus": context.cpus}
    finding = Finding(ctx.key(), round(per_cpu, 2), cfg.limit, "per CPU", facts, hold_seconds=cfg.for_seconds)
    return CheckResult((finding,))


def load_above_words(r: Reading) -> AlertWords:
    return AlertWords(
        f"{r.key.host} load is {number(r.facts.get('load_5m'))} on {number(r.facts.get('cpus'))} CPUs "
        f"({number(r.value)} per CPU, 5-minute average)",
        f"{number(r.value)} per CPU",
        f"at most {number(r.threshold)} per CPU",
    )


LOAD_ABOVE = HostRule(
    name="load_above",
    parse=parse_load_above,
    check=load_above,
    needs=Needs.HOST_CONTEXT,
    announces=Announces.ALERTS,
    words=Words(alert=load_above_words),
)

# ---------------------------------------------------------------- host_rebooted


@dataclass(frozen=True)
class On:
    pass


def parse_on(value: object, path: str) -> On | None:
    return On() if boolean(value, path) else None


REBOOT_SLACK_SECONDS = 120  # /proc/stat btime moves by a second or so as the clock is adjusted


def host_rebooted(host: HostSnapshot, cfg: On, ctx: Context) -> CheckResult:
    """A notice, once, when the host's boot time moved: it rebooted (perhaps silently, between two
    polls). The first boot time seen is only remembered."""
    context = host.context
    assert context is not None  # Needs.HOST_CONTEXT
    boot = context.boot_time
    if boot is None:
        return CheckResult(memory=ctx.remembered)
    before = ctx.remembered
    notices: tuple[Notice, ...] = ()
    if isinstance(before, int) and abs(boot - before) > REBOOT_SLACK_SECONDS:
        facts = {"boot_time": boot, "previous_boot_time": before, "uptime_seconds": context.uptime_seconds}
        notices = (Notice(NoticeKind.HOST_REBOOTED, host.name, (), None, facts, rule=ctx.rule),)
    elif isinstance(before, int):
        boot = before  # the same boot: keep the first reading, so slow drift never adds up
    return CheckResult(notices=notices, memory=boot)


def host_rebooted_words(notice: Notice) -> str:
    f = notice.facts
    return (
        f"{notice.host} rebooted at {local_time(f.get('boot_time'))} "
        f"(up {format_duration(f.get('uptime_seconds'))}; "
        f"the boot before was {local_time(f.get('previous_boot_time'))}): jobs running then were lost"
    )


HOST_REBOOTED = HostRule(
    name="host_rebooted",
    parse=parse_on,
    check=host_rebooted,
    needs=Needs.HOST_CONTEXT,
    announces=Announces.NOTICES,
    words=Words(notice=host_rebooted_words),
    memory="boot_times",
)

# ---------------------------------------------------------------- driver_changed

_NVML_VERSION = re.compile(r"NVML library version: ([0-9][0-9.]{0,30})")


def driver_version(host: HostSnapshot) -> str | None:
    """The driver version the host shows now: nvidia-smi's ``driver_version``, or, when the driver
    and its library disagree, the library's (the version just installed)."""
    if host.context is not None and host.context.driver_version:
        return host.context.driver_version
    if host.error_kind is HostErrorKind.DRIVER_MISMATCH and host.error:
        match = _NVML_VERSION.search(host.error)
        if match:
            return match.group(1).rstrip(".")
    return None


def driver_changed(host: HostSnapshot, cfg: On, ctx: Context) -> CheckResult:
    """A notice, once, when the NVIDIA driver version changed; and a hint, once, when the host then
    shows a driver/library mismatch (the new library with the old kernel module: reboot)."""
    seen: Mapping[str, Any] = ctx.remembered or {}
    before = seen.get("version")
    hinted = bool(seen.get("hinted"))
    now = driver_version(host)
    mismatch = host.error_kind is HostErrorKind.DRIVER_MISMATCH
    notices = []
    if before and now and now != before:
        facts = {"from": before, "to": now, "mismatch": mismatch}
        notices.append(Notice(NoticeKind.DRIVER_CHANGED, host.name, (), None, facts, rule=ctx.rule))
        hinted = mismatch
    elif mismatch and before and not hinted:
        facts = {"from": before, "to": now, "mismatch": True}
        notices.append(Notice(NoticeKind.DRIVER_MISMATCH, host.name, (), None, facts, rule=ctx.rule))
        hinted = True
    if host.ok:
        hinted = False
    return CheckResult(
        notices=tuple(notices), memory={"version": now or before, "hinted": hinted} if (now or before) else None
    )


def driver_changed_words(notice: Notice) -> str:
    f = notice.facts
    if notice.kind is NoticeKind.DRIVER_MISMATCH:
        return (
            f"{notice.host} shows a driver/library mismatch after running driver {f.get('from')}: the driver was "
            "upgraded while the old kernel module is still loaded; reboot the host (jobs on its GPUs have stopped)"
        )
    text = f"{notice.host}: the NVIDIA driver changed from {f.get('from')} to {f.get('to')}"
    if f.get("mismatch"):
        text += "; the host now shows a driver/library mismatch: the old kernel module is still loaded, reboot it"
    return text


DRIVER_CHANGED = HostRule(
    name="driver_changed",
    parse=parse_on,
    check=driver_changed,
    needs=Needs.RESULT,
    announces=Announces.NOTICES,
    words=Words(notice=driver_changed_words),
    memory="driver_versions",
)
