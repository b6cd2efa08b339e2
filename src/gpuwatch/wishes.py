""" "Tell me when": one-shot wishes judged against the latest results, and what each ending says.

Two kinds (``gpuwatch notify-when-free`` / ``notify-when-done``):

* ``free``: ``gpus`` GPUs free at once (on one host with ``same_host``; of a model whose name holds
  ``model``, compared without case). Free means what it means everywhere (:func:`.summary.is_free`),
  and only on a host that answered with current data and every GPU process known: a host that did
  not answer frees nothing. When the fleet has them, the wish is *met*: one message names the hosts
  and GPU indexes, and the wish ends. It is a notice, not a booking: two wishes met in the same
  cycle may be told of the same GPUs.
* ``done``: process ``pid`` on ``host``, seen there when the wish was made. It has *ended* only
  when that host answers with every GPU process known and the pid is not among them, or is another
  process by now (its start time, the probe's time minus ``ps`` etimes, differs by more than
  :data:`START_SLACK_SECONDS` plus the probe's own duration; or, without start times, its command
  line differs): a host that is down or did not answer says nothing about the process. While it
  runs, each result updates its peak GPU memory (the sum over its GPUs at one moment) and when it
  was last seen; the message says how long it ran (from its start to when it was last seen, and to
  when it was found gone) and that peak. A process that frees its GPUs but goes on running has
  ended as far as the GPUs are concerned: nvidia-smi no longer lists it.

Every wish ends at ``expires_at`` (``--for``), with one short message that it expired unmet; a
``done`` wish whose host left the config ends at once, said the same way.

Pure: (snapshot, wishes, now) -> :class:`Judgement`; the daemon stores it and queues the messages
in one transaction (:mod:`.store.wishes`, :meth:`gpuwatch.daemon.Daemon.wishes`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import tzinfo

from .config import FreeGpuConfig
from .message import Message
from .model import FleetSnapshot, Gpu, GpuProcess, HostSnapshot, Reservation
from .rules import processes_known
from .summary import is_free
from .text import format_duration, local_time, plural

FREE, DONE = "free", "done"
KINDS = (FREE, DONE)
#: How an ended wish ended: ``met`` (free), ``ended`` (done), ``expired``, ``host_removed`` (done),
#: ``cancelled`` (``--cancel``).
OUTCOMES = ("met", "ended", "expired", "host_removed", "cancelled")
#: How far two readings of one process's start time may differ: ``etimes`` counts whole seconds and
#: the probe's time is when it finished, not when ps ran (its duration is added on top).
START_SLACK_SECONDS = 30.0


@dataclass(frozen=True)
class Wish:
    """One wish as the store keeps it. ``user`` is the person to tell (mentioned where a channel
    knows them), ``author`` the login name of whoever registered it. Times are epoch seconds."""

    id: int
    kind: str  # FREE | DONE
    user: str | None
    author: str | None
    created_at: float
    expires_at: float
    # notify-when-free
    gpus: int = 0
    same_host: bool = False
    model: str | None = None  # a part of the GPU's name, any case
    # notify-when-done
    host: str | None = None
    pid: int | None = None
    command: str | None = None  # its command line as ps printed it when the wish was made
    started_at: float | None = None  # when it started: the probe's time minus its ps etimes
    peak_memory_mib: int | None = None  # the most GPU memory it held at one moment, as seen
    last_seen_at: float | None = None  # the time of the last result that listed it
    gpu_indexes: tuple[int, ...] = ()  # the GPUs it was last seen on
    # once ended
    ended_at: float | None = None
    outcome: str | None = None  # one of OUTCOMES

    @property
    def open(self) -> bool:
        return self.ended_at is None

    def describe(self) -> str:
        """``2 GPUs on one host, model A100`` or ``gpu03 pid 4711 (python train.py)``."""
        if self.kind == FREE:
            what = plural(self.gpus, "GPU") + (" on one host" if self.same_host else "")
            return what + (f", model {self.model}" if self.model else "")
        command = f" ({_short(self.command)})" if self.command else ""
        return f"{self.host} pid {self.pid}{command}"


@dataclass(frozen=True)
class Ending:
    """A wish that ends now, and why: what its one message says."""

    wish: Wish
    outcome: str  # met | ended | expired | host_removed
    at: float  # when it was found to end (the result's time for met/ended; now otherwise)
    where: tuple[tuple[str, tuple[int, ...], str], ...] = ()  # met: (host, GPU indexes, model) each

    def message(self, mentions: Mapping[str, str], tz: tzinfo | None = None) -> Message:
        """The one message, with ``mentions`` (user -> this channel's id for them) of the wish's user."""
        wish = self.wish
        title, line = _words(self, tz)
        mentioned = (mentions[wish.user],) if wish.user is not None and wish.user in mentions else ()
        severity = "resolved" if self.outcome in ("met", "ended") else "info"
        return Message(title=title, blocks=(line,), severity=severity, mentions=mentioned, kind="alert")


@dataclass(frozen=True)
class Judgement:
    """What one look at the fleet changes: wishes that end (each said once), and running processes
    seen again (their new peak and last-seen time, to store)."""

    ended: tuple[Ending, ...] = ()
    seen: tuple[Wish, ...] = ()


def judge(snapshot: FleetSnapshot, wishes: Sequence[Wish], now: float, thresholds: FreeGpuConfig) -> Judgement:
    """Each open wish against the latest result of every host in ``snapshot`` (the configured hosts)."""
    ended: list[Ending] = []
    seen: list[Wish] = []
    hosts = {h.name: h for h in snapshot.hosts}
    for wish in wishes:
        if not wish.open:
            continue
        if wish.kind == FREE:  # GPUs free after the wish expired (the daemon was stopped) are not for it
            where = None if now >= wish.expires_at else placement(wish, snapshot, thresholds)
            if where is not None:
                ended.append(Ending(wish, "met", now, where))
            elif now >= wish.expires_at:
                ended.append(Ending(wish, "expired", now))
            continue
        host = hosts.get(wish.host or "")
        if host is None:
            ended.append(Ending(wish, "host_removed", now))
            continue
        gone, update = follow(wish, host)
        if gone:
            ended.append(Ending(update, "ended", _epoch(host) or now))
        elif now >= wish.expires_at:
            ended.append(Ending(update, "expired", now))
        elif update != wish:
            seen.append(update)
    return Judgement(tuple(ended), tuple(seen))


# ---------------------------------------------------------------- notify-when-free


def model_matches(gpu: Gpu, model: str | None) -> bool:
    """``--model a100`` matches ``NVIDIA A100-SXM4-80GB``; no model matches every GPU."""
    return model is None or model.casefold() in (gpu.name or "").casefold()


def free_gpus(
    host: HostSnapshot, thresholds: FreeGpuConfig, model: str | None = None, user: str | None = None
) -> list[Gpu]:
    """The free GPUs of ``model`` on a host that answered, now, with every process known; else none.
    A GPU booked for someone (``gpuwatch reserve``, in force) is free only for that ``user``."""
    if not host.current or not processes_known(host):
        return []
    return [
        g
        for g in host.gpus
        if is_free(g, host.processes_on(g), thresholds)
        and model_matches(g, model)
        and _bookable(host.reservation_on(g), user)
    ]


def _bookable(booking: Reservation | None, user: str | None) -> bool:
    return booking is None or (user is not None and booking.user == user)


def placement(
    wish: Wish, snapshot: FleetSnapshot, thresholds: FreeGpuConfig
) -> tuple[tuple[str, tuple[int, ...], str], ...] | None:
    """Where a ``free`` wish can be met now, as (host, GPU indexes, model) each; None: not yet.
    On one host: the first host in config order with enough. Across hosts: as few hosts as can
    hold them (the hosts with the most free GPUs first)."""
    if wish.gpus < 1:
        return None
    free = [(h.name, gpus) for h in snapshot.hosts if (gpus := free_gpus(h, thresholds, wish.model, wish.user))]
    if wish.same_host:
        one = next(((name, gpus) for name, gpus in free if len(gpus) >= wish.gpus), None)
        free = [one] if one is not None else []
    if sum(len(gpus) for _, gpus in free) < wish.gpus:
        return None
    picked: list[tuple[str, tuple[int, ...], str]] = []
    need = wish.gpus
    for name, gpus in sorted(free, key=lambda item: -len(item[1])):
        taken = gpus[:need]
        picked.append((name, tuple(g.index for g in taken), _model_names(taken)))
        need -= len(taken)
        if need == 0:
            break
    return tuple(picked)


def _model_names(gpus: Sequence[Gpu]) -> str:
    return ", ".join(dict.fromkeys((g.name or "GPU").removeprefix("NVIDIA ").strip() or "GPU" for g in gpus))


# ---------------------------------------------------------------- notify-when-done


def process_start(host: HostSnapshot, process: GpuProcess) -> float | None:
    """When ``process`` started, by the host's clock as this result saw it: the result's time
    minus ps's ``etimes``; None when either is unknown."""
    taken = _epoch(host)
    if taken is None or process.runtime_seconds is None:
        return None
    return taken - process.runtime_seconds


def same_process(wish: Wish, host: HostSnapshot, process: GpuProcess) -> bool:
    """Whether the pid listed now is still the process the wish was made for (not a reused pid)."""
    start = process_start(host, process)
    if wish.started_at is not None and start is not None:
        return abs(start - wish.started_at) <= START_SLACK_SECONDS + (host.probe_seconds or 0.0)
    if wish.command and process.command:
        return process.command == wish.command
    return True


def follow(wish: Wish, host: HostSnapshot) -> tuple[bool, Wish]:
    """(whether the process has ended, the wish with its peak and last-seen time brought up to
    date). Only a result that lists every GPU process, from a probe begun after the wish was made,
    can say it ended (an older one may predate the process)."""
    taken = _epoch(host)
    if not host.current or not processes_known(host) or taken is None:
        return False, wish
    if taken - (host.probe_seconds or 0.0) < wish.created_at:
        return False, wish
    mine = [p for p in host.processes if p.pid == wish.pid and same_process(wish, host, p)]
    if not mine:
        return True, wish
    return False, observed(wish, host, mine)


def observed(wish: Wish, host: HostSnapshot, processes: Sequence[GpuProcess]) -> Wish:
    """The wish after seeing its process (one entry per GPU it uses) in ``host``'s result."""
    known = [p.used_memory_mib for p in processes if p.used_memory_mib is not None]
    memory = sum(known) if known else None
    peak = wish.peak_memory_mib
    if memory is not None and (peak is None or memory > peak):
        peak = memory
    started = wish.started_at
    if started is None:
        started = next((s for p in processes if (s := process_start(host, p)) is not None), None)
    gpus = tuple(sorted({p.gpu_index for p in processes if p.gpu_index is not None}))
    command = wish.command or next((p.command for p in processes if p.command), None)
    return replace(
        wish,
        peak_memory_mib=peak,
        last_seen_at=_epoch(host),
        gpu_indexes=gpus or wish.gpu_indexes,
        started_at=started,
        command=command,
    )


def _epoch(host: HostSnapshot) -> float | None:
    return host.taken_at.timestamp() if host.taken_at is not None else None


# ---------------------------------------------------------------- words

COMMAND_CHARS = 80


def _short(command: str | None) -> str:
    text = " ".join((command or "").split())
    return text if len(text) <= COMMAND_CHARS else text[: COMMAND_CHARS - 1] + "…"


def _for_whom(wish: Wish) -> str:
    return f" for {wish.user}" if wish.user else ""


def _words(ending: Ending, tz: tzinfo | None) -> tuple[str, str]:
    """The title and the one line of an ending's message."""
    wish = ending.wish
    asked = f"wish #{wish.id}: {wish.describe()}"
    if ending.outcome == "met":
        where = "; ".join(f"{host} GPU {', '.join(map(str, gpus))} ({model})" for host, gpus, model in ending.where)
        title = f"{plural(wish.gpus, 'GPU')} free{_for_whom(wish)}"
        return title, f"{where} {'is' if wish.gpus == 1 else 'are'} free now ({asked}; a notice, not a booking)"
    if ending.outcome == "ended":
        return f"Process {wish.pid} on {wish.host} has ended", _ended_line(ending, tz)
    lasted = format_duration(max(0.0, ending.at - wish.created_at))
    if ending.outcome == "host_removed":
        return f"Wish #{wish.id} ended", f"{wish.host} is no longer in the config: {asked} ends unmet"
    if wish.kind == FREE:
        return f"Wish #{wish.id} expired", f"{asked}{_for_whom(wish)} expired unmet after {lasted}"
    seen = f"; still running when last seen at {local_time(wish.last_seen_at, tz)}" if wish.last_seen_at else ""
    return f"Wish #{wish.id} expired", f"{asked}{_for_whom(wish)} expired after {lasted}{seen}"


def _ended_line(ending: Ending, tz: tzinfo | None) -> str:
    """``alice's process 4711 (python train.py) on gpu03 GPU 0 has ended (wish #4): it ran 2h13m
    (started ..., last seen ..., gone at ...); peak GPU memory 19818 MiB``."""
    wish = ending.wish
    owner = f"{wish.user}'s process" if wish.user else "process"
    command = f" ({_short(wish.command)})" if wish.command else ""
    gpus = f" GPU {', '.join(map(str, wish.gpu_indexes))}" if wish.gpu_indexes else ""
    head = f"{owner} {wish.pid}{command} on {wish.host}{gpus} has ended (wish #{wish.id})"
    if wish.started_at is not None and wish.last_seen_at is not None:
        least = format_duration(max(0.0, wish.last_seen_at - wish.started_at))
        most = format_duration(max(0.0, ending.at - wish.started_at))
        ran = f"it ran {least}" if least == most else f"it ran {least} to {most}"
        ran += (
            f" (started {local_time(wish.started_at, tz)}, last seen {local_time(wish.last_seen_at, tz, seconds=True)},"
            f" gone at {local_time(ending.at, tz, seconds=True)})"
        )
    else:
        ran = f"how long it ran is not known (gone at {local_time(ending.at, tz, seconds=True)})"
    peak = "not known" if wish.peak_memory_mib is None else f"{wish.peak_memory_mib} MiB"
    return f"{head}: {ran}; peak GPU memory {peak}"
