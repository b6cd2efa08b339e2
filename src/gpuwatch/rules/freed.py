"""gpu_freed: not an alert but a notice, once, to the users who asked: a busy GPU is free now, or
one of their jobs has ended. It remembers, per host, the GPUs that were busy and the users' jobs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..config.values import ConfigError, check_keys, mapping, string
from ..model import HostSnapshot
from ..summary import gpu_free
from ..text import format_duration, number
from .base import Announces, CheckResult, Context, HostRule, Needs, Notice, NoticeKind, Words

COMMAND_CHARS = 120


@dataclass(frozen=True)
class GpuFreed:
    users: tuple[str, ...]


def parse_gpu_freed(value: object, path: str) -> GpuFreed | None:
    """``gpu_freed: {users: [alice, bob]}``, or off."""
    if value is None or value is False:
        return None
    section = mapping(value, path)
    check_keys(section, ("users",), path)
    users = section.get("users") or []
    if not isinstance(users, list) or not users:
        raise ConfigError(f"{path}.users: expected a list of user names, e.g. [alice]")
    return GpuFreed(tuple(string(u, f"{path}.users[{i}]") for i, u in enumerate(users)))


def gpu_freed(host: HostSnapshot, cfg: GpuFreed, ctx: Context) -> CheckResult:
    """Runs only when every process and owner is known: unknown processes are neither freed nor ended."""
    seen: Mapping[str, Any] = ctx.remembered or {}
    was_busy: list[int] | None = seen.get("busy")
    old_jobs: Mapping[str, Mapping[str, Any]] = seen.get("jobs") or {}
    notices = []
    if was_busy is not None:  # the first result of a host frees nothing
        for gpu in host.gpus:
            if gpu.index in was_busy and gpu_free(host, gpu, ctx.thresholds):
                notices.append(Notice(NoticeKind.GPU_FREE, host.name, cfg.users, gpu.index, {"gpu_name": gpu.name}))
    live = {str(p.pid) for p in host.processes}
    for pid, job in sorted(old_jobs.items()):
        if pid not in live and job.get("user"):
            facts = {
                "user": job["user"],
                "pid": int(pid),
                "command": job.get("command", ""),
                "runtime": job.get("runtime"),
            }
            notices.append(Notice(NoticeKind.JOB_ENDED, host.name, (str(job["user"]),), job.get("gpu"), facts))
    memory = {
        "busy": [g.index for g in host.gpus if not gpu_free(host, g, ctx.thresholds)],  # a booked GPU too
        "jobs": {
            str(p.pid): {
                "user": p.owner,
                "gpu": p.gpu_index,
                "command": (p.command or p.name)[:COMMAND_CHARS],
                "runtime": p.runtime_seconds,
            }
            for p in host.processes
            if p.owner in cfg.users
        },
    }
    return CheckResult(notices=tuple(notices), memory=memory)


def gpu_freed_words(notice: Notice) -> str:
    f = notice.facts
    if notice.kind is NoticeKind.GPU_FREE:
        return f"{notice.host} GPU {notice.gpu} ({f.get('gpu_name') or 'GPU'}) is free now"
    runtime = f.get("runtime")
    ran = "" if runtime is None else f" (ran at least {format_duration(runtime)})"
    job = f"{f.get('user')}'s job {f.get('pid')} ({f.get('command', '')})"
    return f"{job} on {notice.host} GPU {number(notice.gpu)} has ended{ran}"


GPU_FREED = HostRule(
    name="gpu_freed",
    parse=parse_gpu_freed,
    check=gpu_freed,
    needs=Needs.PROCESSES,
    announces=Announces.NOTICES,
    words=Words(notice=gpu_freed_words),
    memory="gpu_freed",
)
