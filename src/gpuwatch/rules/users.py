"""Rules about who runs what: too many GPUs for one user (per host, across the fleet), a process
running too long. They need every GPU process and its owner: an unknown owner is never "nobody".
A user is the person behind a process (``GpuProcess.owner``: a Slurm job's user, a container's
owner), so "root holds 6 GPUs" never stands for six people's containers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..config.values import optional_int, positive_duration
from ..model import HostSnapshot
from ..summary import process_context
from ..text import format_duration, number, quantity
from .base import AlertWords, Announces, CheckResult, Context, Finding, FleetRule, HostRule, Needs, Reading, Words

COMMAND_CHARS = 120  # of a command kept in an alert's facts (it is stored)


def gpus_by_user(host: HostSnapshot) -> dict[str, set[int]]:
    """The GPU indices each known owner (the person behind a process: its Slurm job's user, its
    container's owner, else its ps user) has a process on."""
    held: dict[str, set[int]] = {}
    for proc in host.processes:
        if proc.owner is not None and proc.gpu_index is not None:
            held.setdefault(proc.owner, set()).add(proc.gpu_index)
    return held


@dataclass(frozen=True)
class GpuLimit:
    limit: int  # GPUs one user may hold


def parse_gpu_limit(value: object, path: str) -> GpuLimit | None:
    limit = optional_int(value, path, 1)
    return None if limit is None else GpuLimit(limit)


# ---------------------------------------------------------------- max_gpus_per_user


def max_gpus_per_user(host: HostSnapshot, cfg: GpuLimit, ctx: Context) -> CheckResult:
    return CheckResult(
        tuple(
            Finding(ctx.key(user=user), len(gpus), cfg.limit, "GPUs", {"gpus": sorted(gpus)})
            for user, gpus in sorted(gpus_by_user(host).items())
            if len(gpus) > cfg.limit
        )
    )


def max_gpus_per_user_words(r: Reading) -> AlertWords:
    gpus = ", ".join(str(g) for g in r.facts.get("gpus", []))
    return AlertWords(
        f"{r.key.user} holds {quantity(r.value, 'GPUs')} on {r.key.host} (GPU {gpus})",
        quantity(r.value, "GPUs"),
        f"at most {number(r.threshold)} per host",
    )


MAX_GPUS_PER_USER = HostRule(
    name="max_gpus_per_user",
    parse=parse_gpu_limit,
    check=max_gpus_per_user,
    needs=Needs.PROCESSES,
    announces=Announces.ALERTS,
    words=Words(alert=max_gpus_per_user_words),
    identity=("user",),
)

# ---------------------------------------------------------------- max_gpus_per_user_fleet


def max_gpus_per_user_fleet(hosts: Sequence[HostSnapshot], cfg: GpuLimit, ctx: Context) -> CheckResult:
    placed: dict[str, set[tuple[str, int]]] = {}
    for host in hosts:
        for user, gpus in gpus_by_user(host).items():
            placed.setdefault(user, set()).update((host.name, g) for g in gpus)
    return CheckResult(
        tuple(
            Finding(ctx.key(user=user), len(where), cfg.limit, "GPUs", {"hosts": sorted({h for h, _ in where})})
            for user, where in sorted(placed.items())
            if len(where) > cfg.limit
        )
    )


def max_gpus_per_user_fleet_words(r: Reading) -> AlertWords:
    hosts = ", ".join(r.facts.get("hosts", []))
    return AlertWords(
        f"{r.key.user} holds {quantity(r.value, 'GPUs')} across the fleet ({hosts})",
        quantity(r.value, "GPUs"),
        f"at most {number(r.threshold)} in the fleet",
    )


MAX_GPUS_PER_USER_FLEET = FleetRule(
    name="max_gpus_per_user_fleet",
    parse=parse_gpu_limit,
    check=max_gpus_per_user_fleet,
    needs=Needs.PROCESSES,
    announces=Announces.ALERTS,
    words=Words(alert=max_gpus_per_user_fleet_words),
    identity=("user",),
)

# ---------------------------------------------------------------- max_runtime


@dataclass(frozen=True)
class MaxRuntime:
    limit_seconds: float


def parse_max_runtime(value: object, path: str) -> MaxRuntime | None:
    if value is None or value is False:
        return None
    return MaxRuntime(positive_duration(value, path))


def max_runtime(host: HostSnapshot, cfg: MaxRuntime, ctx: Context) -> CheckResult:
    """One alert per process: a job restarted under a new pid is a new alert."""
    return CheckResult(
        tuple(
            Finding(
                ctx.key(user=proc.owner, pid=proc.pid),
                proc.runtime_seconds,
                cfg.limit_seconds,
                "s",
                {
                    "gpu": proc.gpu_index,
                    "command": (proc.command or proc.name)[:COMMAND_CHARS],
                    "context": process_context(proc),
                },
            )
            for proc in host.processes
            if proc.runtime_seconds is not None and proc.runtime_seconds > cfg.limit_seconds
        )
    )


def max_runtime_words(r: Reading) -> AlertWords:
    who = r.key.user or "an unknown user"
    command = str(r.facts.get("command", ""))[:80]
    if r.facts.get("context"):
        command += f"; {r.facts['context']}"
    return AlertWords(
        f"{who}'s process {r.key.pid} ({command}) on {r.key.host} GPU {number(r.facts.get('gpu'))} "
        f"has run {format_duration(r.value)}",
        format_duration(r.value),
        f"at most {format_duration(r.threshold)}",
    )


MAX_RUNTIME = HostRule(
    name="max_runtime",
    parse=parse_max_runtime,
    check=max_runtime,
    needs=Needs.PROCESSES,
    announces=Announces.ALERTS,
    words=Words(alert=max_runtime_words),
    identity=("user", "pid"),
)
