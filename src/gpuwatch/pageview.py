"""What the fleet page shows, as plain records: pure functions of a snapshot, the alert state and a query.

:mod:`gpuwatch.web` renders these with its templates (the list view for people, the wall view for a
screen across a room) and serves them; nothing here reads a clock, a file or the network.

Conventions: every string people read is made here (with ``text.py``); "free" is
:func:`gpuwatch.summary.gpu_free` (idle and not booked), as in ``status``, chat and ``gpuwatch_gpu_free``; the person
behind a process is its owner as ``status`` names it (``summary.who``: containers and Slurm jobs
included). A host without current data is never free: its GPUs are *unknown* (counted from its last
answer) and it is listed with the reason; a host not polled yet is *waiting*, which is no fault.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from urllib.parse import parse_qs, urlencode

from .config import FreeGpuConfig
from .model import FleetSnapshot, Gpu, GpuProcess, HostSnapshot
from .render import AlertRow
from .report import alert_words
from .reservation import reserved_words
from .rules import Ack, AlertRecord
from .summary import gpu_free, process_context, users_on, who
from .text import UNKNOWN, format_duration, local_time, number, plural

COMMAND_TITLE_CHARS = 2000  # a command line longer than this is cut in the hover text (shown whole on expand)
VIEWS = ("list", "wall")
#: ?sort= -> its name on the page; "" keeps the config's order.
SORTS = {"": "config order", "free": "free first", "memory": "most memory free", "host": "host name"}
HELD_REASON = (
    "no process listed: likely one in another container or PID namespace than gpuwatch's login, "
    "a graphics process (such as Xorg), or memory not released yet"
)
CGROUP_NOT_READ = "cgroup not read"  # summary.process_context's words when a cgroup told nothing
UNSEEN_REASON = "ps could not see it: another PID namespace (a container), or it just ended"


@dataclass(frozen=True)
class Query:
    """The page's filter, sort and view, as in its URL: ``?q=alice h100&free=1&sort=free&view=wall``.
    ``view`` "" is the configured default (``web.view``)."""

    text: str = ""
    free_only: bool = False
    sort: str = ""
    view: str = ""

    @classmethod
    def parse(cls, query_string: str) -> Query:
        params = parse_qs(query_string, keep_blank_values=False)

        def last(name: str) -> str:
            return params.get(name, [""])[-1]

        text = " ".join(last("q").split())[:200]
        return cls(
            text=text,
            free_only=last("free") in ("1", "on", "true", "yes"),
            sort=last("sort") if last("sort") in SORTS else "",
            view=last("view") if last("view") in VIEWS else "",
        )

    @property
    def terms(self) -> list[str]:
        return self.text.lower().split()

    @property
    def active(self) -> bool:
        """Does it leave GPUs out? (A sort or a view leaves none out.)"""
        return bool(self.text) or self.free_only

    def url_query(self) -> str:
        pairs = (("q", self.text), ("free", "1" if self.free_only else ""), ("sort", self.sort), ("view", self.view))
        params = {k: v for k, v in pairs if v}
        return f"?{urlencode(params)}" if params else ""


@dataclass(frozen=True)
class ProcView:
    key: str  # stable across refreshes: keeps an expanded command open
    owner: str  # the person behind it, as ``status`` and chat name them (``summary.who``'s owner)
    context: str  # where it runs: container, Slurm job, another user's session; why ps did not see it
    ps_user: str  # "run as root" when ps saw another account than the owner; else empty
    memory: str
    runtime: str
    name: str  # the executable's name (not the first word of a path with blanks)
    command: str
    title: str


@dataclass(frozen=True)
class GpuView:
    index: int
    model: str
    util: str
    util_value: int | None
    memory: str
    memory_percent: float | None
    memory_value: int | None
    memory_total: int | None
    temperature: str
    power: str
    free: bool
    processes: tuple[ProcView, ...]
    state: str = "busy"  # free | busy | held (memory in use, no process listed) | reserved (idle, booked)
    note: str = ""  # why memory is held with no process, in words
    people: str = ""  # the owners on it, for the wall: "alice, bob" ("?": only processes ps did not see)
    memory_free_mib: int = 0  # for sorting: 0 when unknown
    first_person: str = ""  # the wall's cell: the owner with the most memory (the others in its title)
    reserved: str = ""  # a booking in force: "reserved for bob until 2026-12-03 18:00 CST (comment)"
    reserved_for: str = ""  # its holder, for the wall's cell


@dataclass(frozen=True)
class HostView:
    name: str
    address: str
    gpus: tuple[GpuView, ...]
    gpu_count: int
    free_count: int
    taken_at: float | None  # epoch seconds: the page counts its age
    age: str
    probe: str
    warnings: tuple[str, ...]
    models: str = ""  # the GPU models, once per host: "8 × NVIDIA H100 80GB HBM3"
    state: str = "ok"  # ok | down | stale | waiting (the wall shows every host in its grid)
    kind: str = ""  # down: the error's name; stale, waiting: the state
    unknown: int = 0  # GPUs without current data (a down or stale host's, from its last answer)


@dataclass(frozen=True)
class ProblemView:
    name: str
    address: str
    state: str  # down | stale | waiting
    kind: str
    reason: str
    since: str
    since_ts: float | None
    since_age: str
    last_ok: str


@dataclass(frozen=True)
class PersonView:
    """One person's share of the GPUs shown: containers and Slurm jobs under their owner."""

    name: str
    gpus: int
    memory: str
    hosts: str  # "gpu-a, gpu-b" (at most a few, then "+3")
    where: str  # the contexts: "docker train-llm, pytorch:24.01; slurm 748468"
    unknown: bool = False  # processes ps could not see, grouped as one row


@dataclass(frozen=True)
class AlertView:
    rule: str
    host: str
    summary: str
    since: str
    since_ts: float
    since_age: str
    muted: str  # "silenced" | "inhibited" | ""
    acknowledged: str = ""  # "acknowledged by bob: on it", "" when no one did


@dataclass(frozen=True)
class PageView:
    summary: tuple[tuple[str, str], ...]  # (text, css class)
    problems: tuple[ProblemView, ...]
    hosts: tuple[HostView, ...]  # the hosts that answered (list view); every host (wall view)
    shown: str  # "showing 5 of 30 GPUs" when a filter is on
    empty: str  # what to say when the filter leaves nothing
    query: Query
    now: float
    newest: float | None
    newest_age: str
    view: str = "list"
    waiting: str = ""  # "waiting for the first answer from h1, h2"
    people: tuple[PersonView, ...] = ()
    alerts: tuple[AlertView, ...] = ()
    alerts_known: bool = False  # the alert state was read (a daemon's page): say "no alert firing"
    sorts: tuple[tuple[str, str], ...] = tuple(SORTS.items())
    other_view: str = ""  # the URL query of the same page in the other view (filter and sort kept)
    demo: bool = False


def _ts(when: datetime | None) -> float | None:
    return None if when is None else when.timestamp()


def _ago(when: datetime | None, now: datetime) -> str:
    if when is None:
        return UNKNOWN
    return f"{format_duration(max(0.0, (now - when).total_seconds()))} ago"


def _mib(value: int | None) -> str:
    return number(value, " MiB")


def _gib(mib: int) -> str:
    return f"{mib / 1024:.1f} GiB" if mib >= 1024 else f"{mib} MiB"


def program_name(proc: GpuProcess) -> str:
    """The executable's name: the last part of nvidia-smi's process name (a path, blanks and all),
    else of the command's first word; never the first word of a path with blanks."""
    name = (proc.name or "").strip()
    if not name and proc.command:
        name = proc.command.split()[0]
    short = name.rstrip("/").rsplit("/", 1)[-1]
    return short or UNKNOWN


def proc_view(host: HostSnapshot, proc: GpuProcess) -> ProcView:
    """A process as the page shows it: the owner and context that ``status`` and chat show
    (``summary.who``), the ``ps`` user only as detail when it is another account."""
    owner = proc.owner if proc.owner is not None else f"pid {proc.pid} (owner unknown)"
    ps_user = f"run as {proc.user}" if proc.user is not None and proc.user != proc.owner else ""
    command = proc.command or proc.name or UNKNOWN
    title = command if len(command) <= COMMAND_TITLE_CHARS else command[:COMMAND_TITLE_CHARS] + "…"
    run_as = f", {ps_user}" if ps_user else ""
    return ProcView(
        key=f"{host.name}/{proc.gpu_index}/{proc.pid}",
        owner=owner,
        context=process_context(proc) if proc.owner is not None else UNSEEN_REASON,
        ps_user=ps_user,
        memory=_mib(proc.used_memory_mib),
        runtime=format_duration(proc.runtime_seconds),
        name=program_name(proc),
        command=command,
        title=f"pid {proc.pid}{run_as}: {title}",
    )


def gpu_view(host: HostSnapshot, gpu: Gpu, free: bool, held_from_mib: int = 1) -> GpuView:
    """A GPU as the page shows it; ``held_from_mib``: from this much memory in use with no process
    listed, the GPU is *held* (``free_gpu.memory_below_mib``: the memory that makes it not free)."""
    used, total = gpu.memory_used_mib, gpu.memory_total_mib
    percent = round(100 * used / total, 1) if used is not None and total else None
    procs = sorted(host.processes_on(gpu), key=lambda p: (p.owner is None, -(p.used_memory_mib or 0), p.pid))
    held = not free and not procs and used is not None and used >= held_from_mib
    booking = host.reservation_on(gpu)
    reserved = "" if booking is None else reserved_words(booking) + (f" ({booking.comment})" if booking.comment else "")
    owners = dict.fromkeys(p.owner for p in procs if p.owner is not None) or ({"?": None} if procs else {})
    return GpuView(
        index=gpu.index,
        model=gpu.name or UNKNOWN,
        util=number(gpu.utilization_percent, "%"),
        util_value=gpu.utilization_percent,
        memory=f"{number(used)} / {_mib(total)}" if total is not None else _mib(used),
        memory_percent=percent,
        memory_value=used,
        memory_total=total,
        temperature=number(gpu.temperature_c, "°C"),
        power=UNKNOWN if gpu.power_w is None else f"{gpu.power_w:.0f} W",
        free=free,
        processes=tuple(proc_view(host, p) for p in procs),
        state="free" if free else "held" if held else "busy" if procs or booking is None else "reserved",
        note=f"{_mib(used)} in use, {HELD_REASON}" if held else "",
        people=", ".join(owners),
        first_person=next(iter(owners), ""),
        memory_free_mib=max(0, total - used) if total is not None and used is not None else 0,
        reserved=reserved,
        reserved_for="" if booking is None else booking.user,
    )


def models_text(gpus: Sequence[Gpu]) -> str:
    """The host's GPU models once: ``8 × NVIDIA H100 80GB HBM3``; mixed: ``2 × A, 1 × B``."""
    counts: dict[str, int] = {}
    for gpu in gpus:
        counts[gpu.name or UNKNOWN] = counts.get(gpu.name or UNKNOWN, 0) + 1
    return ", ".join(f"{n} × {name}" for name, n in counts.items())


def _gpu_matches(host: HostSnapshot, gpu: Gpu, terms: Sequence[str]) -> bool:
    """Every term is found in the host's name, the GPU's model or who is on it: the owner and
    context of each process as ``status`` says them (``summary.who``), not the ``ps`` user."""
    people = " ".join(who(p) for p in host.processes_on(gpu))
    haystack = f"{host.name} {gpu.name or ''} {people}".lower()
    return all(term in haystack for term in terms)


def problem_view(host: HostSnapshot, now: datetime) -> ProblemView:
    if host.taken_at is None:
        return ProblemView(host.name, host.address, "waiting", "waiting", host.error or "", UNKNOWN, None, "", UNKNOWN)
    last_ok = local_time(host.last_ok_at) if host.last_ok_at else "never since gpuwatch started"
    if host.stale:
        age = format_duration(host.age_seconds(now))
        last = plural(len(host.gpus), "GPU") if host.ok else f"{host.error}"
        return ProblemView(
            name=host.name,
            address=host.address,
            state="stale",
            kind="stale",
            reason=f"no new result for {age} (last: {last})",
            since=local_time(host.taken_at),
            since_ts=_ts(host.taken_at),
            since_age=_ago(host.taken_at, now),
            last_ok=last_ok,
        )
    since = host.failing_since or host.taken_at
    return ProblemView(
        name=host.name,
        address=host.address,
        state="down",
        kind=host.error_name,
        reason=host.error or "",
        since=local_time(since),
        since_ts=_ts(since),
        since_age=_ago(since, now),
        last_ok=last_ok,
    )


def _natural(name: str) -> tuple[object, ...]:
    """node-2 before node-10."""
    return tuple(int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name))


def sort_hosts(hosts: list[HostView], sort: str) -> list[HostView]:
    """Hosts and their GPUs in the order ``sort`` asks (``SORTS``); hosts without data last, except by name."""
    if sort == "host":
        return sorted(hosts, key=lambda h: _natural(h.name))
    if sort == "free":
        ordered = [_with_gpus(h, sorted(h.gpus, key=lambda g: (not g.free, g.index))) for h in hosts]
        return sorted(ordered, key=lambda h: (h.state != "ok", -h.free_count))
    if sort == "memory":
        ordered = [_with_gpus(h, sorted(h.gpus, key=lambda g: (-g.memory_free_mib, g.index))) for h in hosts]
        return sorted(ordered, key=lambda h: (h.state != "ok", -max((g.memory_free_mib for g in h.gpus), default=0)))
    return hosts


def _with_gpus(host: HostView, gpus: Iterable[GpuView]) -> HostView:
    return replace(host, gpus=tuple(gpus))


def people_view(snapshot: FleetSnapshot, shown: Mapping[str, set[int]]) -> tuple[PersonView, ...]:
    """GPUs and memory per person over the GPUs shown (``shown``: host -> GPU indices), most GPUs
    first; processes ps could not see in one row of their own, last."""
    gpus: dict[str | None, int] = {}
    memory: dict[str | None, int] = {}
    hosts: dict[str | None, dict[str, None]] = {}
    where: dict[str | None, dict[str, None]] = {}
    for host in snapshot.hosts:
        if not host.current or host.name not in shown:
            continue
        for gpu in host.gpus:
            if gpu.index not in shown[host.name]:
                continue
            for usage in users_on(host.processes_on(gpu)):
                gpus[usage.user] = gpus.get(usage.user, 0) + 1
                memory[usage.user] = memory.get(usage.user, 0) + (usage.memory_mib or 0)
                hosts.setdefault(usage.user, {})[host.name] = None
                places = (c for c in usage.contexts if c != CGROUP_NOT_READ)  # a note, not a place
                where.setdefault(usage.user, {}).update(dict.fromkeys(places))
    order = sorted(gpus, key=lambda u: (u is None, -gpus[u], -memory[u], u or ""))
    views = []
    for user in order:
        names = list(hosts[user])
        listed = ", ".join(names[:3]) + (f" +{len(names) - 3}" if len(names) > 3 else "")
        views.append(
            PersonView(
                name=user if user is not None else "owner unknown",
                gpus=gpus[user],
                memory=_gib(memory[user]),
                hosts=listed,
                where="; ".join(where[user]) if user is not None else UNSEEN_REASON,
                unknown=user is None,
            )
        )
    return tuple(views)


def _acknowledged(record: AlertRecord, acks: Sequence[Ack], now: float) -> str:
    """Who acknowledged this firing of the alert, in words (the newest ack), or ""."""
    found = [a for a in acks if a.covers(record, now)]
    if not found:
        return ""
    ack = max(found, key=lambda a: a.created_at)
    by = f" by {ack.author}" if ack.author else ""
    return f"acknowledged{by}" + (f": {ack.comment}" if ack.comment else "")


def alert_views(rows: Iterable[AlertRow], now: float, acks: Sequence[Ack] = ()) -> tuple[AlertView, ...]:
    """The firing alerts (``render.alert_rows``) as the page lists them, with the rule's own words
    and who acknowledged them (``gpuwatch ack``)."""
    views = []
    for row in rows:
        record = row.record
        if record.state != "firing":
            continue
        since = record.fired_at or record.since
        views.append(
            AlertView(
                rule=record.key.rule,
                host=record.key.host,
                summary=alert_words(record).summary,
                since=local_time(datetime.fromtimestamp(since).astimezone()),
                since_ts=since,
                since_age=f"{format_duration(max(0.0, now - since))} ago",
                muted="silenced" if row.silenced_by else "inhibited" if row.inhibited_by else "",
                acknowledged=_acknowledged(record, acks, now),
            )
        )
    return tuple(views)


def _host_view(host: HostSnapshot, thresholds: FreeGpuConfig, query: Query) -> tuple[HostView, int]:
    """A host that answered, with the GPUs the query keeps; and how many of its GPUs are free."""
    views = []
    free_count = 0
    for gpu in host.gpus:
        free = gpu_free(host, gpu, thresholds)
        free_count += free
        if (query.free_only and not free) or not _gpu_matches(host, gpu, query.terms):
            continue
        views.append(gpu_view(host, gpu, free, thresholds.memory_below_mib))
    view = HostView(
        name=host.name,
        address=host.address,
        gpus=tuple(views),
        gpu_count=len(host.gpus),
        free_count=free_count,
        taken_at=_ts(host.taken_at),
        age="",
        probe=UNKNOWN if host.probe_seconds is None else f"{host.probe_seconds:.2f}s",
        warnings=tuple(w.message for w in host.warnings),
        models=models_text(host.gpus),
    )
    return view, free_count


def _absent_host(host: HostSnapshot, problem: ProblemView, unknown: int) -> HostView:
    """A host without current data, as a tile of the wall: its GPUs unknown."""
    return HostView(
        name=host.name,
        address=host.address,
        gpus=(),
        gpu_count=unknown,
        free_count=0,
        taken_at=problem.since_ts,
        age=problem.since_age,
        probe="",
        warnings=(problem.reason,) if problem.reason and problem.state != "waiting" else (),
        models=models_text(host.gpus) if host.gpus else "",
        state=problem.state,
        kind=problem.kind,
        unknown=unknown,
    )


def summary_items(
    hosts: int, answered: int, down: int, stale: int, waiting: int, gpus: int, free: int, unknown: int
) -> tuple[tuple[str, str], ...]:
    """The summary line: (text, css class) pairs. Hosts not polled yet are waiting, not down."""
    items: list[tuple[str, str]] = [(plural(hosts, "host"), "")]
    if waiting == hosts:
        return (*items, ("waiting for the first answer", "wait"))
    items.append((f"{answered} answered", ""))
    if down:
        items.append((f"{down} down", "bad"))
    if stale:
        items.append((f"{stale} stale", "warn"))
    if waiting:
        items.append((f"{waiting} waiting for the first answer", "wait"))
    items.append((plural(gpus + unknown, "GPU"), ""))
    items.append((f"{free} free", "good" if free else ""))
    if unknown:
        items.append((f"{unknown} unknown (no current data)", "warn"))
    return tuple(items)


def page_view(
    snapshot: FleetSnapshot,
    thresholds: FreeGpuConfig,
    query: Query,
    *,
    last_gpus: Mapping[str, int] | None = None,
    alerts: tuple[AlertView, ...] = (),
    alerts_known: bool = False,
    default_view: str = "list",
    demo: bool = False,
) -> PageView:
    """What the page shows for this snapshot and query: firing alerts and problems first, then the
    hosts. ``last_gpus`` (host -> GPUs at its last answer, ``FleetState.last_gpu_counts``) counts a
    down host's GPUs as unknown instead of dropping them from the total."""
    now = snapshot.taken_at
    view = query.view or default_view
    known = last_gpus or {}
    problems, hosts, shown = [], [], {}
    gpus = free = unknown = down = stale = waiting = 0
    for host in snapshot.hosts:
        if not host.current:
            problem = problem_view(host, now)
            count = len(host.gpus) if host.stale and host.ok else known.get(host.name, 0)
            waiting += problem.state == "waiting"
            down += problem.state == "down"
            stale += problem.state == "stale"
            unknown += count
            if all(term in host.name.lower() for term in query.terms):
                problems.append(problem)
                if view == "wall":
                    hosts.append(_absent_host(host, problem, count))
            continue
        host_view, host_free = _host_view(host, thresholds, query)
        gpus += host_view.gpu_count
        free += host_free
        shown[host.name] = {g.index for g in host_view.gpus}
        if host_view.gpus or not query.active:
            hosts.append(replace(host_view, age=_ago(host.taken_at, now)))
    taken = [h.taken_at for h in snapshot.hosts if h.taken_at is not None]
    newest = max(taken) if taken else None
    shown_gpus = sum(len(s) for s in shown.values())
    names = [p.name for p in problems if p.state == "waiting"]
    return PageView(
        summary=summary_items(len(snapshot.hosts), len(snapshot.answered), down, stale, waiting, gpus, free, unknown),
        problems=tuple(p for p in problems if p.state != "waiting"),
        hosts=tuple(sort_hosts(hosts, query.sort)),
        shown=f"showing {shown_gpus} of {plural(gpus, 'GPU')}" if query.active else "",
        empty="no GPU matches the filter" if query.active and not any(h.gpus for h in hosts) else "",
        query=query,
        now=now.timestamp(),
        newest=_ts(newest),
        newest_age=_ago(newest, now),
        view=view,
        other_view=replace(query, view="list" if view == "wall" else "wall").url_query(),
        waiting=f"Waiting for the first answer from {', '.join(names)}" if names else "",
        people=people_view(snapshot, shown),
        alerts=alerts,
        alerts_known=alerts_known,
        demo=demo,
    )
