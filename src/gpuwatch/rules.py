"""Alert rules and their lifecycle, pure: (snapshot, memory, state, now) -> transitions.

Modelled on Prometheus Alertmanager. An alert is identified by what it is about (rule, host,
and GPU, user or pid as the rule needs), never by values that change from poll to poll. It
waits ``for`` before firing (so a flapping condition stays quiet), fires once, reminds after
``repeat_every``, and resolves when its condition clears on a host that answered. A failed
poll never resolves an alert about that host's GPUs and never reads as "all GPUs free".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .config import AlertsConfig, FreeGpuConfig, format_duration
from .model import FleetSnapshot, HostErrorKind, HostSnapshot
from .summary import is_free

FLEET = "*"  # the host of fleet-wide alerts

# A host whose failure says something about its GPUs, not about the network.
GPU_ERROR_KINDS = frozenset(
    {
        HostErrorKind.DRIVER_MISMATCH,
        HostErrorKind.GPU_LOST,
        HostErrorKind.DRIVER_NOT_LOADED,
        HostErrorKind.NO_DEVICES,
    }
)
# Failures that still say what state the GPUs are in (a GPU error replaces an earlier one). Any
# other failure (unreachable, a timeout, nvidia-smi failing for another reason, no permission)
# says nothing about them: it must not resolve a GPU error.
REACHED_KINDS = GPU_ERROR_KINDS
# Rules about who runs what: they need the host's full process list and every owner.
PROCESS_RULES = frozenset({"max_gpus_per_user", "max_gpus_per_user_fleet", "max_runtime"})


def processes_known(host: HostSnapshot) -> bool:
    """Did this poll learn every GPU process and its owner? Not when the host did not answer, nor
    when its process query or ps failed (a ``probe_failed`` warning beside the GPU rows): then who
    runs what is unknown, which must never read as "nobody"."""
    return host.ok and not any(w.kind is HostErrorKind.PROBE_FAILED for w in host.warnings)


@dataclass(frozen=True, order=True)
class AlertKey:
    rule: str
    host: str
    gpu: int | None = None
    user: str | None = None
    pid: int | None = None
    detail: str | None = None  # a stable qualifier, e.g. the kind of GPU error

    @property
    def id(self) -> str:
        parts = [self.rule, self.host, self.gpu, self.user, self.pid, self.detail]
        return "|".join("" if p is None else str(p) for p in parts)

    def as_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "host": self.host,
            "gpu": self.gpu,
            "user": self.user,
            "pid": self.pid,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class Finding:
    """A rule's condition holding in this poll."""

    key: AlertKey
    summary: str  # what, where, who, in words
    value: str  # the reading now, e.g. "3 GPUs"
    threshold: str  # e.g. "at most 2"
    hold_seconds: float = 0.0  # how long it must hold before it fires


@dataclass(frozen=True)
class Notice:
    """A one-off event for the users who asked (gpu_freed): not an alert, no lifecycle."""

    text: str
    users: tuple[str, ...]
    host: str


@dataclass(frozen=True)
class Memory:
    """What rules remember between polls (persisted): counts, baselines, last seen jobs."""

    failures: Mapping[str, int] = field(default_factory=dict)  # host -> consecutive failed polls
    gpu_counts: Mapping[str, int] = field(default_factory=dict)  # host -> most GPUs it has reported
    busy: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # host -> GPUs not free last time
    jobs: Mapping[str, Mapping[str, Mapping[str, Any]]] = field(default_factory=dict)  # host -> pid -> job

    def as_dict(self) -> dict[str, Any]:
        return {
            "failures": dict(self.failures),
            "gpu_counts": dict(self.gpu_counts),
            "busy": {h: list(v) for h, v in self.busy.items()},
            "jobs": {h: {p: dict(j) for p, j in v.items()} for h, v in self.jobs.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Memory:
        return cls(
            failures={str(k): int(v) for k, v in data.get("failures", {}).items()},
            gpu_counts={str(k): int(v) for k, v in data.get("gpu_counts", {}).items()},
            busy={str(k): tuple(int(i) for i in v) for k, v in data.get("busy", {}).items()},
            jobs={str(h): {str(p): dict(j) for p, j in v.items()} for h, v in data.get("jobs", {}).items()},
        )


@dataclass(frozen=True)
class Evaluation:
    findings: tuple[Finding, ...]
    notices: tuple[Notice, ...]
    memory: Memory
    answered: frozenset[str]
    reached: frozenset[str]
    all_answered: bool
    known_processes: frozenset[str] = frozenset()  # hosts whose processes and owners are all known
    all_processes_known: bool = False

    def covers(self, key: AlertKey) -> bool:
        """Was this alert's condition actually evaluated? Only then may its absence resolve it."""
        if key.rule == "host_down":
            return True
        if key.host == FLEET:
            return self.all_processes_known if key.rule in PROCESS_RULES else self.all_answered
        if key.rule == "gpu_error":
            return key.host in self.reached
        if key.rule in PROCESS_RULES:
            return key.host in self.known_processes
        return key.host in self.answered


def _gpus_by_user(host: HostSnapshot) -> dict[str, set[int]]:
    held: dict[str, set[int]] = {}
    for proc in host.processes:
        if proc.user is not None and proc.gpu_index is not None:
            held.setdefault(proc.user, set()).add(proc.gpu_index)
    return held


def _gpu_list(indices: set[int]) -> str:
    return ", ".join(str(i) for i in sorted(indices))


def evaluate(snapshot: FleetSnapshot, cfg: AlertsConfig, memory: Memory, thresholds: FreeGpuConfig) -> Evaluation:
    """Every rule over one snapshot -> the conditions that hold now, and updated memory."""
    findings: list[Finding] = []
    notices: list[Notice] = []
    hold = cfg.for_seconds
    failures = dict(memory.failures)
    gpu_counts = dict(memory.gpu_counts)
    busy = dict(memory.busy)
    jobs = {h: dict(v) for h, v in memory.jobs.items()}
    answered = frozenset(h.name for h in snapshot.hosts if h.ok)
    reached = answered | {h.name for h in snapshot.hosts if h.error_kind in REACHED_KINDS}
    fleet_held: dict[str, set[tuple[str, int]]] = {}

    for host in snapshot.hosts:
        name = host.name
        if not host.ok:
            failures[name] = failures.get(name, 0) + 1
            if cfg.host_down_after and failures[name] >= cfg.host_down_after:
                findings.append(
                    Finding(
                        AlertKey("host_down", name),
                        f"{name} has not answered for {failures[name]} poll{'s' if failures[name] != 1 else ''}: "
                        f"{host.error}",
                        f"{failures[name]} failed polls",
                        f"alert after {cfg.host_down_after}",
                        hold,
                    )
                )
            if cfg.gpu_error and host.error_kind in GPU_ERROR_KINDS:
                kind = host.error_kind.value if host.error_kind else "error"
                findings.append(
                    Finding(
                        AlertKey("gpu_error", name, detail=kind), f"{name}: {host.error}", kind, "no GPU error", hold
                    )
                )
            continue
        failures.pop(name, None)

        if cfg.gpu_error:
            for warning in host.warnings:
                if warning.kind in GPU_ERROR_KINDS:
                    findings.append(
                        Finding(
                            AlertKey("gpu_error", name, detail=warning.kind.value),
                            f"{name}: {warning.message}",
                            warning.kind.value,
                            "no GPU error",
                            hold,
                        )
                    )

        count = len(host.gpus)
        baseline = gpu_counts.get(name, 0)
        if cfg.gpu_missing and baseline and count < baseline:
            findings.append(
                Finding(
                    AlertKey("gpu_missing", name),
                    f"{name} reports {count} GPUs, {baseline - count} fewer than the {baseline} it had",
                    f"{count} GPUs",
                    f"{baseline} GPUs seen before",
                    hold,
                )
            )
        gpu_counts[name] = max(baseline, count)

        held = _gpus_by_user(host)
        if cfg.max_gpus_per_user is not None:
            for user, gpus in sorted(held.items()):
                if len(gpus) > cfg.max_gpus_per_user:
                    findings.append(
                        Finding(
                            AlertKey("max_gpus_per_user", name, user=user),
                            f"{user} holds {len(gpus)} GPUs on {name} (GPU {_gpu_list(gpus)})",
                            f"{len(gpus)} GPUs",
                            f"at most {cfg.max_gpus_per_user} per host",
                            hold,
                        )
                    )
        for user, gpus in held.items():
            fleet_held.setdefault(user, set()).update((name, g) for g in gpus)

        if cfg.max_runtime is not None:
            for proc in host.processes:
                if proc.runtime_seconds is not None and proc.runtime_seconds > cfg.max_runtime:
                    who = proc.user or "an unknown user"
                    findings.append(
                        Finding(
                            AlertKey("max_runtime", name, user=proc.user, pid=proc.pid),
                            f"{who}'s process {proc.pid} ({(proc.command or proc.name)[:80]}) on {name} "
                            f"GPU {proc.gpu_index if proc.gpu_index is not None else '?'} has run "
                            f"{format_duration(proc.runtime_seconds)}",
                            format_duration(proc.runtime_seconds),
                            f"at most {format_duration(cfg.max_runtime)}",
                            hold,
                        )
                    )

        for gpu in host.gpus:
            if cfg.temperature_above is not None and gpu.temperature_c is not None:
                if gpu.temperature_c > cfg.temperature_above:
                    findings.append(
                        Finding(
                            AlertKey("temperature_above", name, gpu=gpu.index),
                            f"{name} GPU {gpu.index} is at {gpu.temperature_c}°C",
                            f"{gpu.temperature_c}°C",
                            f"at most {cfg.temperature_above}°C",
                            hold,
                        )
                    )
            idle = cfg.idle_gpu
            if (
                idle is not None
                and gpu.utilization_percent is not None  # unknown (MIG) is not evidence of idleness
                and gpu.memory_used_mib is not None
                and gpu.utilization_percent < idle.util_below
                and gpu.memory_used_mib > idle.memory_above_mib
            ):
                owners = sorted({p.user or f"pid {p.pid}" for p in host.processes_on(gpu)})
                who = ", ".join(owners) or "no visible process"
                findings.append(
                    Finding(
                        AlertKey("idle_gpu", name, gpu=gpu.index),
                        f"{name} GPU {gpu.index} holds {gpu.memory_used_mib} MiB at {gpu.utilization_percent}% "
                        f"utilization ({who})",
                        f"{gpu.utilization_percent}%, {gpu.memory_used_mib} MiB",
                        f"idle (<{idle.util_below}%) with >{idle.memory_above_mib} MiB "
                        f"for {format_duration(idle.after)}",
                        max(hold, idle.after),
                    )
                )

        if cfg.gpu_freed_users and processes_known(host):  # unknown processes: neither freed nor ended
            notices += _freed_notices(host, cfg.gpu_freed_users, busy.get(name), jobs.get(name), thresholds)
            busy[name] = tuple(g.index for g in host.gpus if not is_free(g, host.processes_on(g), thresholds))
            jobs[name] = {
                str(p.pid): {
                    "user": p.user,
                    "gpu": p.gpu_index,
                    "command": (p.command or p.name)[:120],
                    "runtime": p.runtime_seconds,
                }
                for p in host.processes
                if p.user in cfg.gpu_freed_users
            }

    if cfg.max_gpus_per_user_fleet is not None:
        for user, placed in sorted(fleet_held.items()):
            if len(placed) > cfg.max_gpus_per_user_fleet:
                hosts = sorted({h for h, _ in placed})
                findings.append(
                    Finding(
                        AlertKey("max_gpus_per_user_fleet", FLEET, user=user),
                        f"{user} holds {len(placed)} GPUs across the fleet ({', '.join(hosts)})",
                        f"{len(placed)} GPUs",
                        f"at most {cfg.max_gpus_per_user_fleet} in the fleet",
                        hold,
                    )
                )

    return Evaluation(
        findings=tuple(findings),
        notices=tuple(notices),
        memory=Memory(failures=failures, gpu_counts=gpu_counts, busy=busy, jobs=jobs),
        answered=answered,
        reached=frozenset(reached),
        all_answered=len(answered) == len(snapshot.hosts),
        known_processes=frozenset(h.name for h in snapshot.hosts if processes_known(h)),
        all_processes_known=all(processes_known(h) for h in snapshot.hosts),
    )


def _freed_notices(
    host: HostSnapshot,
    users: Sequence[str],
    was_busy: tuple[int, ...] | None,
    old_jobs: Mapping[str, Mapping[str, Any]] | None,
    thresholds: FreeGpuConfig,
) -> list[Notice]:
    notices = []
    if was_busy is not None:
        for gpu in host.gpus:
            if gpu.index in was_busy and is_free(gpu, host.processes_on(gpu), thresholds):
                notices.append(
                    Notice(
                        f"{host.name} GPU {gpu.index} ({gpu.name or 'GPU'}) is free now",
                        tuple(users),
                        host.name,
                    )
                )
    live = {str(p.pid) for p in host.processes}
    for pid, job in sorted((old_jobs or {}).items()):
        if pid not in live and job.get("user"):
            ran = format_duration(job["runtime"]) if job.get("runtime") is not None else "?"
            index = job.get("gpu")
            notices.append(
                Notice(
                    f"{job['user']}'s job {pid} ({job.get('command', '')}) on {host.name} GPU "
                    f"{index if index is not None else '?'} has ended (ran at least {ran})",
                    (str(job["user"]),),
                    host.name,
                )
            )
    return notices


# ---------------------------------------------------------------- lifecycle


@dataclass(frozen=True)
class AlertRecord:
    """The state of one alert, persisted between polls and runs. Times are epoch seconds."""

    key: AlertKey
    state: str  # pending | firing
    since: float  # first seen (pending from)
    summary: str
    value: str
    threshold: str
    fired_at: float | None = None
    last_sent_at: float | None = None  # None while firing: not announced yet (silenced)

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key.as_dict(),
            "state": self.state,
            "since": self.since,
            "summary": self.summary,
            "value": self.value,
            "threshold": self.threshold,
            "fired_at": self.fired_at,
            "last_sent_at": self.last_sent_at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AlertRecord:
        return cls(
            key=AlertKey(**data["key"]),
            state=data["state"],
            since=float(data["since"]),
            summary=data["summary"],
            value=data["value"],
            threshold=data["threshold"],
            fired_at=data.get("fired_at"),
            last_sent_at=data.get("last_sent_at"),
        )


@dataclass(frozen=True)
class Transition:
    kind: str  # firing | reminder | resolved
    record: AlertRecord
    at: float


SilenceCheck = Callable[[AlertKey, float], bool]


def advance(
    records: Mapping[str, AlertRecord],
    evaluation: Evaluation,
    now: float,
    cfg: AlertsConfig,
    silenced: SilenceCheck = lambda key, now: False,
) -> tuple[dict[str, AlertRecord], list[Transition]]:
    """Move every alert one step: pending -> firing -> (reminders) -> resolved."""
    out: dict[str, AlertRecord] = {}
    transitions: list[Transition] = []
    seen: set[str] = set()
    for finding in evaluation.findings:
        kid = finding.key.id
        if kid in seen:
            continue
        seen.add(kid)
        record = records.get(kid) or AlertRecord(
            finding.key, "pending", now, finding.summary, finding.value, finding.threshold
        )
        record = replace(record, summary=finding.summary, value=finding.value, threshold=finding.threshold)
        if record.state == "pending" and now - record.since >= finding.hold_seconds:
            record = replace(record, state="firing", fired_at=now)
        if record.state == "firing" and not silenced(record.key, now):
            if record.last_sent_at is None:
                record = replace(record, last_sent_at=now)
                transitions.append(Transition("firing", record, now))
            elif now - record.last_sent_at >= cfg.repeat_every:
                record = replace(record, last_sent_at=now)
                transitions.append(Transition("reminder", record, now))
        out[kid] = record
    for kid, record in records.items():
        if kid in seen:
            continue
        if not evaluation.covers(record.key):
            out[kid] = record  # not evaluated this time (host down): neither fire nor resolve
            continue
        announced = record.state == "firing" and record.last_sent_at is not None
        if announced and cfg.send_resolved and not silenced(record.key, now):
            transitions.append(Transition("resolved", record, now))
    return out, transitions


@dataclass(frozen=True)
class Silence:
    id: int
    ends_at: float
    comment: str
    created_at: float
    rule: str | None = None
    host: str | None = None
    user: str | None = None
    gpu: int | None = None

    def matches(self, key: AlertKey, now: float) -> bool:
        if now >= self.ends_at:
            return False
        return (
            (self.rule is None or self.rule == key.rule)
            and (self.host is None or self.host == key.host)
            and (self.user is None or self.user == key.user)
            and (self.gpu is None or self.gpu == key.gpu)
        )

    def describe(self) -> str:
        parts = [
            f"{k}={v}"
            for k, v in (("rule", self.rule), ("host", self.host), ("user", self.user), ("gpu", self.gpu))
            if v is not None
        ]
        return " ".join(parts) or "everything"


def silence_check(silences: Sequence[Silence]) -> SilenceCheck:
    def check(key: AlertKey, now: float) -> bool:
        return any(s.matches(key, now) for s in silences)

    return check
