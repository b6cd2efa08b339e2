"""Usage accounting: who used which GPUs for how long, as pure functions over samples and sums.

Conventions (the store's history and every usage figure follow them):

* A **sample** is one poll of one host (:class:`HostSample`), taken at ``t`` (Unix seconds, the
  time the host's probe finished) and standing for the ``dt`` seconds before it: the state a poll
  sees is taken to have held since the previous poll of that host. ``dt`` is the time since that
  previous poll, or one poll interval for a host's first poll or after a gap of more than
  :data:`MAX_GAP_POLLS` intervals (the time between is not known, so it is not counted).
* A sample counts whole in the period its ``t`` falls in (``start <= t < end``): an hour's
  roll-up holds exactly the samples taken in that hour, so raw samples and roll-ups add up to the
  same figures.
* **GPU-hours** of a person: each GPU sample with processes counts its ``dt`` once, split among
  the people with a process on it by their share of the memory those processes hold (equally
  when a share is unknown or all hold nothing). A GPU's own ``used`` time is its ``dt`` when
  anyone is on it.
* **Held idle**: the same split, counted only while the GPU's utilization is known and below the
  idle threshold (memory held, no work done). Unknown utilization (MIG) is not idleness.
* **Unknown** time: a host that did not answer (``ok`` False) has its last known GPUs counted as
  ``down`` for ``dt``: never as zero use, and never in anyone's hours.
* A process whose owner nobody could tell (``ps`` did not see it) counts for :data:`UNKNOWN_PERSON`.

Nothing here reads a clock: every time is a parameter.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .model import HostSnapshot
from .text import iso_time

UNKNOWN_PERSON = "?"
#: A previous poll longer ago than this many poll intervals does not stretch ``dt``.
MAX_GAP_POLLS = 3
#: The groupings ``gpuwatch usage --by`` offers.
GROUPINGS = ("user", "host", "model", "gpu")


@dataclass(frozen=True)
class PersonOnGpu:
    """One person's processes on one GPU at one poll."""

    person: str
    memory_mib: int | None  # the sum of their processes' used_gpu_memory; None: some unknown
    processes: int


@dataclass(frozen=True)
class GpuReading:
    """One GPU at one poll (``utilization_percent`` None: unknown, as in MIG mode)."""

    index: int
    model: str | None = None
    uuid: str | None = None
    utilization_percent: int | None = None
    memory_used_mib: int | None = None
    memory_total_mib: int | None = None
    people: tuple[PersonOnGpu, ...] = ()


@dataclass(frozen=True)
class HostSample:
    """One poll of one host. A failed poll (``ok`` False) carries the host's last known GPUs,
    without readings, so that their time counts as unknown."""

    host: str
    t: float
    dt: float
    ok: bool
    gpus: tuple[GpuReading, ...] = ()


def stands_for(t: float, previous: float | None, poll_every: float) -> float:
    """The seconds a poll at ``t`` stands for, after the host's previous poll at ``previous``."""
    if previous is None or t <= previous or t - previous > MAX_GAP_POLLS * poll_every:
        return poll_every
    return t - previous


def readings_of(host: HostSnapshot) -> tuple[GpuReading, ...]:
    """A host's GPUs as readings, with the people on each (by ``GpuProcess.owner``)."""
    readings = []
    for gpu in host.gpus:
        people: dict[str, list[int | None]] = {}
        for proc in host.processes_on(gpu):
            people.setdefault(proc.owner or UNKNOWN_PERSON, []).append(proc.used_memory_mib)
        on = tuple(
            PersonOnGpu(name, None if None in mems else sum(m for m in mems if m is not None), len(mems))
            for name, mems in sorted(people.items())
        )
        readings.append(
            GpuReading(
                index=gpu.index,
                model=gpu.name,
                uuid=gpu.uuid,
                utilization_percent=gpu.utilization_percent,
                memory_used_mib=gpu.memory_used_mib,
                memory_total_mib=gpu.memory_total_mib,
                people=on,
            )
        )
    return tuple(readings)


def shares(gpu: GpuReading) -> dict[str, float]:
    """Each person's share of a GPU (summing to 1 when anyone is on it): by the memory their
    processes hold, equally when a memory is unknown or nobody holds any."""
    if not gpu.people:
        return {}
    memories = [p.memory_mib for p in gpu.people]
    total = sum(m for m in memories if m is not None)
    if None in memories or total <= 0:
        return {p.person: 1.0 / len(gpu.people) for p in gpu.people}
    return {p.person: (p.memory_mib or 0) / total for p in gpu.people}


@dataclass(slots=True)
class GpuTally:
    """What one GPU added up over some samples (seconds; ``*_sum`` are value x seconds, for means)."""

    known_s: float = 0.0  # the host answered
    down_s: float = 0.0  # the host did not answer: unknown time
    used_s: float = 0.0  # someone had a process on it
    idle_s: float = 0.0  # someone held it while its utilization was under the idle threshold
    util_s: float = 0.0  # seconds with a known utilization
    util_sum: float = 0.0
    util_max: int | None = None
    mem_s: float = 0.0  # seconds with a known memory use
    mem_sum: float = 0.0
    mem_max: int | None = None

    def add(self, other: GpuTally) -> None:
        # spelled out: a roll-up adds about 100,000 of these per hour of a 200-host fleet
        self.known_s += other.known_s
        self.down_s += other.down_s
        self.used_s += other.used_s
        self.idle_s += other.idle_s
        self.util_s += other.util_s
        self.util_sum += other.util_sum
        self.mem_s += other.mem_s
        self.mem_sum += other.mem_sum
        if other.util_max is not None and (self.util_max is None or other.util_max > self.util_max):
            self.util_max = other.util_max
        if other.mem_max is not None and (self.mem_max is None or other.mem_max > self.mem_max):
            self.mem_max = other.mem_max

    @property
    def utilization_percent(self) -> float | None:
        return self.util_sum / self.util_s if self.util_s else None

    @property
    def memory_mean_mib(self) -> float | None:
        return self.mem_sum / self.mem_s if self.mem_s else None


@dataclass(slots=True)
class PersonTally:
    """What one person added up on one host over some samples."""

    gpu_s: float = 0.0
    idle_s: float = 0.0
    mem_max: int = 0  # the most GPU memory they held on the host at one poll, in MiB
    gpus_max: int = 0  # the most GPUs they were on at one poll

    def add(self, other: PersonTally) -> None:
        self.gpu_s += other.gpu_s
        self.idle_s += other.idle_s
        self.mem_max = max(self.mem_max, other.mem_max)
        self.gpus_max = max(self.gpus_max, other.gpus_max)


@dataclass
class SampleAccount:
    """One sample accounted: per GPU index, per person (on this sample's host)."""

    gpus: dict[int, GpuTally] = field(default_factory=dict)
    people: dict[str, PersonTally] = field(default_factory=dict)


def account(sample: HostSample, idle_below: float) -> SampleAccount:
    """What a sample adds: each GPU's known/down/used/held-idle seconds and readings, and each
    person's GPU-seconds and held-idle GPU-seconds (see the module's conventions)."""
    result = SampleAccount()
    dt = sample.dt
    for gpu in sample.gpus:
        if not sample.ok:
            result.gpus[gpu.index] = GpuTally(down_s=dt)
            continue
        util, mem = gpu.utilization_percent, gpu.memory_used_mib
        idle = util is not None and util < idle_below
        split = shares(gpu)
        result.gpus[gpu.index] = GpuTally(
            known_s=dt,
            used_s=dt if split else 0.0,
            idle_s=dt if split and idle else 0.0,
            util_s=dt if util is not None else 0.0,
            util_sum=util * dt if util is not None else 0.0,
            util_max=util,
            mem_s=dt if mem is not None else 0.0,
            mem_sum=mem * dt if mem is not None else 0.0,
            mem_max=mem,
        )
        for person in gpu.people:
            tally = result.people.setdefault(person.person, PersonTally())
            share = split[person.person] * dt
            tally.gpu_s += share
            tally.idle_s += share if idle else 0.0
            tally.mem_max += person.memory_mib or 0
            tally.gpus_max += 1
    return result


# ---------------------------------------------------------------- figures for people and reports


@dataclass(frozen=True)
class UsageRecord:
    """One group's usage over a period (``key``: the person, host, model or ``host:index``).

    For a person, ``gpu_hours`` is their share of the GPUs they were on; for a host, model or GPU,
    the hours anyone was on its GPUs. ``known``/``unknown`` (host, model, GPU only): GPU-hours
    the hosts answered / did not answer. ``ewma_gpus`` (people only): how many GPUs they used on
    average, recent hours weighing more (``history.half_life``).
    """

    key: str
    gpu_hours: float
    held_idle_gpu_hours: float
    known_gpu_hours: float | None = None
    unknown_gpu_hours: float | None = None
    utilization_percent: float | None = None
    ewma_gpus: float | None = None


def decay_weight(age_seconds: float, half_life_seconds: float) -> float:
    """The weight of something ``age_seconds`` old with that half-life."""
    return math.pow(0.5, max(0.0, age_seconds) / half_life_seconds)


def ewma_gpus(
    buckets: Mapping[float, float], spans: Sequence[tuple[float, float]], end: float, half_life_seconds: float
) -> float:
    """The exponentially weighted mean of the GPUs in use over the ``spans`` (``(start, seconds)``:
    the hours, or whole days, that make up a period ending at ``end``), from ``buckets`` (span
    start -> GPU-seconds in it; spans absent count as 0). Each span weighs ``0.5 ** (age /
    half_life)`` per second it lasts, its age taken at its end."""
    weights = [(s, n, decay_weight(end - (s + n), half_life_seconds)) for s, n in spans]
    total = sum(w * n for _, n, w in weights)
    return sum(w * buckets.get(s, 0.0) for s, _, w in weights) / total if total else 0.0


def spans(start: float, end: float, days: tuple[float, float] | None = None) -> list[tuple[float, float]]:
    """The hours of ``[start, end)`` (the first and last may be partial), with ``days``
    (``[first, last)``, whole days) as one span per day: how a period is read from the roll-ups."""
    out: list[tuple[float, float]] = []
    cuts = [(start, end)] if days is None else [(start, days[0]), (days[1], end)]
    for a, b in cuts:
        hour = math.floor(a / 3600) * 3600.0
        while hour < b:
            out.append((hour, 3600.0))
            hour += 3600.0
    if days is not None:
        out += [(float(d), 86400.0) for d in range(int(days[0]), int(days[1]), 86400)]
    return sorted(out)


def person_records(
    tallies: Mapping[str, PersonTally],
    buckets: Mapping[str, Mapping[float, float]],
    period_spans: Sequence[tuple[float, float]],
    end: float,
    half_life_seconds: float,
) -> list[UsageRecord]:
    """People's usage, most GPU-hours first (``buckets``: person -> span start -> GPU-seconds, over
    ``period_spans``, for the EWMA)."""
    records = [
        UsageRecord(
            key=name,
            gpu_hours=t.gpu_s / 3600.0,
            held_idle_gpu_hours=t.idle_s / 3600.0,
            ewma_gpus=ewma_gpus(buckets.get(name, {}), period_spans, end, half_life_seconds),
        )
        for name, t in tallies.items()
    ]
    return sorted(records, key=lambda r: (-r.gpu_hours, r.key))


def gpu_records(tallies: Mapping[str, GpuTally]) -> list[UsageRecord]:
    """Hosts', models' or GPUs' usage (``tallies``: key -> the sum of its GPUs), by key."""
    return [
        UsageRecord(
            key=key,
            gpu_hours=t.used_s / 3600.0,
            held_idle_gpu_hours=t.idle_s / 3600.0,
            known_gpu_hours=t.known_s / 3600.0,
            unknown_gpu_hours=t.down_s / 3600.0,
            utilization_percent=t.utilization_percent,
        )
        for key, t in sorted(tallies.items())
    ]


def group_key(by: str, host: str, index: int, model: str | None) -> str:
    """A GPU's group for ``--by host|model|gpu``."""
    if by == "host":
        return host
    if by == "model":
        return model or "unknown model"
    return f"{host}:{index}"


def usage_document(
    records: Sequence[UsageRecord], by: str, start: float, end: float, fleet: GpuTally, never_used: Iterable[str]
) -> dict[str, object]:
    """The ``usage --json`` and ``/api/v1/usage`` document: the period, one record per group
    (its key under the group's name: ``user``, ``host``, ``model``, ``gpu``), the fleet's totals
    and the GPUs nobody used in the period. Times are ISO 8601, as in every JSON gpuwatch prints."""
    groups = []
    for r in records:
        item: dict[str, object] = {
            by: r.key,
            "gpu_hours": round(r.gpu_hours, 6),
            "held_idle_gpu_hours": round(r.held_idle_gpu_hours, 6),
        }
        for name in ("known_gpu_hours", "unknown_gpu_hours", "utilization_percent", "ewma_gpus"):
            value = getattr(r, name)
            if value is not None:
                item[name] = round(value, 6)
        groups.append(item)
    return {
        "from": iso_time(start),
        "to": iso_time(end),
        "by": by,
        "groups": groups,
        "fleet": {
            "gpu_hours": round(fleet.used_s / 3600.0, 6),
            "held_idle_gpu_hours": round(fleet.idle_s / 3600.0, 6),
            "known_gpu_hours": round(fleet.known_s / 3600.0, 6),
            "unknown_gpu_hours": round(fleet.down_s / 3600.0, 6),
            "utilization_percent": None if fleet.utilization_percent is None else round(fleet.utilization_percent, 2),
        },
        "never_used": sorted(never_used),
    }


# ---------------------------------------------------------------- periods


def hour_floor(t: float) -> float:
    return math.floor(t / 3600) * 3600.0


def period(
    now: float, since: float | None = None, start: float | None = None, end: float | None = None
) -> tuple[float, float]:
    """``[start, end)`` for a usage question: ``since`` seconds back from ``now`` (default 7
    days), or from ``start`` to ``end`` (default now). Bounds other than now are aligned down to
    whole hours, the hourly roll-ups' grain. Raises ValueError for an empty or future period."""
    if since is not None and start is not None:
        raise ValueError("give either a duration back from now (since) or a start (from), not both")
    end_at = now if end is None else min(hour_floor(end), now)
    start_at = hour_floor(start if start is not None else now - (7 * 86400.0 if since is None else since))
    if start_at >= end_at:
        raise ValueError("the period is empty: its start is not before its end")
    return start_at, end_at
