"""Pure: snapshots and alert transitions -> channel-neutral messages (the words of gpuwatch).

Reports: the overview, one user's processes, the free GPUs. Each host is one block, so a channel
that splits a long report never cuts a host in half. A host that did not answer is always listed
with its reason: a report never lets a dead host look like an idle one.

Alerts: the rules give numbers and facts (rules.Finding) and declare their words (rules.Words);
here they are laid out. The alerts of one rule on one host in one message are one entry ("FIRING idle_gpu on gpu01: GPUs
0-7"), counted as one in the title. Where the channel shows command lines (``alerts.command_lines``),
each firing entry ends with the ``gpuwatch ack`` line that acknowledges exactly it (no more
reminders; RESOLVED is still said); elsewhere (a group chat) the message says in words how to.

Every message also carries its content as structure (``Message.body``: a section per host or
alert, a row per GPU with character bars, a state per row) for the channels that lay it out (a
Feishu card, Slack, DingTalk, WeCom); those are built by the ``*_body`` functions at the end,
from the same facts and words as the text blocks.
"""

from __future__ import annotations

import itertools
import re
import shlex
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, tzinfo

from .config import FreeGpuConfig
from .message import AlertItem, Body, Message, Row, Section
from .model import FleetSnapshot, Gpu, GpuProcess, HostSnapshot
from .reservation import reserved_words
from .rules import FLEET, HOST_REMOVED, RULES, AlertKey, AlertRecord, AlertWords, Notice, Rule, Transition
from .summary import free_gpus, gpu_free, host_problems, process_context, reserved_idle, totals, users_on
from .text import UNKNOWN, format_duration, local_time, number, plural, quantity

MAX_COMMAND_CHARS = 120


# A silence line in an alert mutes for this long, with this comment (both can be edited before running it).
SILENCE_FOR = "24h"
SILENCE_COMMENT = "acknowledged"
# At most this many alerts are listed in one entry; the rest are counted (gpuwatch alerts lists all).
MAX_ENTRY_LINES = 20


def _stamp(snapshot: FleetSnapshot, tz: tzinfo | None = None) -> str:
    """The poll's time in the reader's zone: this machine's local time unless ``tz`` is given."""
    return local_time(snapshot.taken_at, tz)


def _down_line(host: HostSnapshot, now: datetime | None = None, same_as: str | None = None) -> str:
    """Why a host has no current data; ``same_as``: a host this report already gave the same
    reason for (a long explanation, such as a driver mismatch's, is said once per report)."""
    kind = host.error_name
    if host.stale and now is not None:
        last = plural(len(host.gpus), "GPU") if host.ok else f"{kind}: {host.error}"
        return f"{host.name}: STALE, no new result for {format_duration(host.age_seconds(now))} (last: {last})"
    if same_as is not None:
        return f"{host.name}: NO DATA ({kind}): the same as {same_as}"
    return f"{host.name}: NO DATA ({kind}): {host.error}"


def _said_before(hosts: Iterable[HostSnapshot]) -> dict[str, str]:
    """Host -> the first host in ``hosts`` that failed with the very same words (not stale)."""
    first: dict[str, str] = {}
    same: dict[str, str] = {}
    for host in hosts:
        if host.current or host.stale or not host.error:
            continue
        said = first.setdefault(f"{host.error_name}\0{host.error}", host.name)
        if said != host.name:
            same[host.name] = said
    return same


def _no_data_block(snapshot: FleetSnapshot) -> list[str]:
    """Hosts that did not answer, said plainly: what they run is not known, not "nothing"."""
    if not snapshot.down:
        return []
    same = _said_before(snapshot.down)
    lines = [_down_line(h, snapshot.taken_at, same.get(h.name)) for h in snapshot.down]
    return ["Not known (no data): " + "; ".join(lines)]


def _gpu_line(gpu: Gpu) -> str:
    util = number(gpu.utilization_percent, "%")
    return f"{gpu.index}: {util}, Mem={number(gpu.memory_used_mib)}/{number(gpu.memory_total_mib)} MiB"


def _who(processes: Iterable[GpuProcess]) -> str:
    parts = []
    for usage in users_on(processes):
        mem = number(usage.memory_mib, " MiB")
        count = f", {len(usage.pids)} procs" if len(usage.pids) > 1 else ""
        parts.append(f"{usage.label()} {mem}{count}")
    return "; ".join(parts)


def host_block(
    host: HostSnapshot, thresholds: FreeGpuConfig, now: datetime | None = None, same_as: str | None = None
) -> str:
    """The predecessor's familiar lines for one host, each GPU followed by who is on it
    (``same_as``: see :func:`_down_line`)."""
    if not host.current:
        # A host whose GPUs failed may still say what else is wrong (its disk is full).
        problems = [] if host.stale else host_problems(host)
        return "\n".join([_down_line(host, now, same_as), *(f"    {p}" for p in problems)])
    lines = [f"GPU for {host.name}"]
    for gpu in host.gpus:
        procs = host.processes_on(gpu)
        lines.append(_gpu_line(gpu))
        booking = host.reservation_on(gpu)
        if procs:
            lines.append(f"    {_who(procs)}")
        elif gpu_free(host, gpu, thresholds):
            lines.append("    free")
        if booking is not None:
            lines.append(f"    {reserved_words(booking)}")
    stray = [p for p in host.processes if p.gpu_index is None]
    if stray:
        lines.append(f"    on an unlisted GPU: {_who(stray)}")
    lines += [f"    warning: {w.message}" for w in host.warnings]
    lines += [f"    {problem}" for problem in host_problems(host)]
    return "\n".join(lines)


def overview(snapshot: FleetSnapshot, thresholds: FreeGpuConfig) -> Message:
    t = totals(snapshot, thresholds)
    down = f", {t.hosts_down} down" if t.hosts_down else ""
    down += f", {t.hosts_stale} stale" if t.hosts_stale else ""
    summary = f"{plural(t.hosts, 'host')}{down}, {plural(t.gpus, 'GPU')}, {t.free_gpus} free"
    # Hosts without data first: they are what someone must act on.
    hosts = sorted(snapshot.hosts, key=lambda h: h.current)
    same = _said_before(hosts)
    return Message(
        title=f"GPU overview {_stamp(snapshot)}: {summary}",
        blocks=tuple(host_block(h, thresholds, snapshot.taken_at, same.get(h.name)) for h in hosts),
        kind="report",
        body=overview_body(snapshot, thresholds),
    )


def _process_line(proc: GpuProcess) -> str:
    mem = number(proc.used_memory_mib, " MiB")
    command = proc.command or proc.name
    if len(command) > MAX_COMMAND_CHARS:
        command = command[: MAX_COMMAND_CHARS - 1] + "…"
    context = process_context(proc)
    where = f" ({context})" if context else ""
    return (
        f"    GPU {number(proc.gpu_index)}: pid {proc.pid} {command}{where}, {mem}, "
        f"up {format_duration(proc.runtime_seconds)}"
    )


def user_report(snapshot: FleetSnapshot, user: str) -> Message:
    """One user's GPU processes across the fleet, grouped by host and GPU index."""
    blocks = []
    count = 0
    for host in snapshot.answered:
        mine = sorted(
            (p for p in host.processes if p.owner == user),
            key=lambda p: (p.gpu_index is None, p.gpu_index or 0, p.pid),
        )
        if not mine:
            continue
        count += len(mine)
        gpus = {p.gpu_index for p in mine}
        blocks.append("\n".join([f"{host.name} ({plural(len(gpus), 'GPU')})", *(_process_line(p) for p in mine)]))
    if not blocks:
        blocks.append(f"{user} has no GPU processes on the {plural(len(snapshot.answered), 'host')} that answered.")
    blocks += _no_data_block(snapshot)
    return Message(
        title=f"GPU processes of {user} {_stamp(snapshot)}: {plural(count, 'process')}",
        blocks=tuple(blocks),
        kind="report",
    )


def free_report(snapshot: FleetSnapshot, thresholds: FreeGpuConfig) -> Message:
    """The GPUs free right now, by host; an idle GPU booked for someone (``gpuwatch reserve``) is
    listed under its host as reserved, never as free."""
    t = totals(snapshot, thresholds)
    blocks = [] if t.free_gpus else ["No GPU is free right now."]
    for host in snapshot.answered:
        free = free_gpus(host, thresholds)
        booked = reserved_idle(host, thresholds)
        if not free and not booked:
            continue
        head = f"{host.name}: {len(free)} free of {len(host.gpus)}"
        if free:
            listed = ", ".join(
                f"{g.index} ({number(g.memory_used_mib)}/{number(g.memory_total_mib)} MiB)" for g in free
            )
            head += f" {free[0].name or 'GPU'}: GPU {listed}"
        lines = [head, *(f"    GPU {g.index} is idle but {reserved_words(r)}" for g, r in booked)]
        blocks.append("\n".join(lines))
    blocks += _no_data_block(snapshot)
    return Message(
        title=f"Free GPUs {_stamp(snapshot)}: {t.free_gpus} of {t.gpus}",
        blocks=tuple(blocks),
        kind="report",
        body=free_body(snapshot, thresholds),
    )


def build_report(kind: str, snapshot: FleetSnapshot, thresholds: FreeGpuConfig, user: str | None = None) -> Message:
    if kind == "overview":
        return overview(snapshot, thresholds)
    if kind == "free":
        return free_report(snapshot, thresholds)
    if kind == "user" and user:
        return user_report(snapshot, user)
    raise ValueError(f"unknown report {kind!r}")


# ---------------------------------------------------------------- alerts

_LABELS = {"firing": "FIRING", "reminder": "STILL FIRING", "resolved": "RESOLVED"}
_CAUSES = {HOST_REMOVED: "removed from the config"}


def _any_rule(r: AlertRecord) -> AlertWords:
    """A rule without words of its own: its name, where, and its numbers."""
    return AlertWords(
        f"{r.key.rule} ({_where(r.key)}): {quantity(r.value, r.unit)}",
        quantity(r.value, r.unit),
        f"limit {quantity(r.threshold, r.unit)}",
    )


def _rule(name: str, rules: Sequence[Rule]) -> Rule | None:
    return next((r for r in rules if r.name == name), None)


def alert_words(record: AlertRecord, rules: Sequence[Rule] = RULES) -> AlertWords:
    """The words of an alert, said by its rule (``rules``: the registry; a test may add one) from
    its numbers and facts; for a record saved by an older gpuwatch, the words it saved; for a rule
    this gpuwatch does not know, its name, where, and its numbers."""
    if record.words is not None:
        return AlertWords(
            record.words.get("summary", ""), record.words.get("value", ""), record.words.get("threshold", "")
        )
    rule = _rule(record.key.rule, rules)
    say = rule.words.alert if rule is not None else None
    return say(record) if say is not None else _any_rule(record)


def notice_text(notice: Notice, rules: Sequence[Rule] = RULES) -> str:
    """The words of a notice, said by the rule that sent it."""
    rule = _rule(notice.rule, rules)
    say = rule.words.notice if rule is not None else None
    return say(notice) if say is not None else f"{notice.kind.value} on {notice.host}"


def _where(key: AlertKey) -> str:
    parts = ["fleet" if key.host == FLEET else key.host]
    if key.gpu is not None:
        parts.append(f"GPU {key.gpu}")
    if key.user is not None:
        parts.append(f"user {key.user}")
    if key.pid is not None:
        parts.append(f"pid {key.pid}")
    return ", ".join(parts)


def _key_order(key: AlertKey) -> tuple[str, str, int, str, int, str]:
    """Rule, host, GPU, user, pid: never comparing an unset field with a set one (None < 1 fails)."""
    gpu = -1 if key.gpu is None else key.gpu
    pid = -1 if key.pid is None else key.pid
    return (key.rule, key.host, gpu, key.user or "", pid, key.detail or "")


def _ranges(numbers: Iterable[int]) -> str:
    """``0-3, 5, 7``: runs of consecutive numbers as ranges."""
    ordered = sorted(set(numbers))
    parts = []
    for _, run in itertools.groupby(enumerate(ordered), key=lambda pair: pair[1] - pair[0]):
        values = [n for _, n in run]
        parts.append(str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}")
    return ", ".join(parts)


def _members(keys: Sequence[AlertKey]) -> str:
    """What tells the alerts of one entry apart: ``GPUs 0-7``, ``users alice, bob``, ``pids 4100, 4101``."""
    parts = []
    gpus = [k.gpu for k in keys if k.gpu is not None]
    if gpus:
        parts.append(f"GPU{'s' if len(set(gpus)) > 1 else ''} {_ranges(gpus)}")
    users = list(dict.fromkeys(k.user for k in keys if k.user is not None))
    if users and any(k.user is None for k in keys):
        users.append("an unknown user")
    if users:
        parts.append(f"user{'s' if len(users) > 1 else ''} {', '.join(users)}")
    pids = sorted({k.pid for k in keys if k.pid is not None})
    if pids:
        shown = ", ".join(map(str, pids[:10])) + (f" and {len(pids) - 10} more" if len(pids) > 10 else "")
        parts.append(f"pid{'s' if len(pids) > 1 else ''} {shown}")
    details = list(dict.fromkeys(k.detail for k in keys if k.detail is not None))
    if details and not parts:
        parts.append(", ".join(details))
    return "; ".join(parts) or plural(len(keys), "alert")


def silence_command(
    keys: Sequence[AlertKey], config_path: str | None = None, program: Sequence[str] = ("gpuwatch",)
) -> str:
    """The ``gpuwatch silence add`` line that mutes exactly these alerts (one alert, or one entry:
    the alerts of one rule on one host): every field they all share. Values are shell-quoted: a
    user name comes from the host's ``ps``, and pasting it must never run anything. ``program``:
    how the line starts (the absolute path where ``gpuwatch`` is not on the PATH)."""
    first = keys[0]
    args = list(program)
    if config_path:
        args += ["-c", config_path]
    args += ["silence", "add", "--rule", first.rule]
    if first.host != FLEET:
        args += ["--host", first.host]
    for name in ("gpu", "user", "pid"):
        values = {getattr(k, name) for k in keys}
        if len(values) == 1 and (value := values.pop()) is not None:
            args += [f"--{name}", str(value)]
    args += ["--for", SILENCE_FOR, "--comment", SILENCE_COMMENT]
    return shlex.join(args)


def ack_command(keys: Sequence[AlertKey], config_path: str | None = None, command: str = "gpuwatch") -> str:
    """The ``gpuwatch ack`` line that acknowledges exactly these alerts (one alert, or one entry):
    every field they all share, shell-quoted. ``command``: how gpuwatch is run from a shell
    (:func:`~gpuwatch.cli.common.program_words`, joined and quoted), so the line runs as printed."""
    first = keys[0]
    args = ["-c", config_path] if config_path else []
    args += ["ack", "--rule", first.rule]
    if first.host != FLEET:
        args += ["--host", first.host]
    for name in ("gpu", "user", "pid"):
        values = {getattr(k, name) for k in keys}
        if len(values) == 1 and (value := values.pop()) is not None:
            args += [f"--{name}", str(value)]
    return f"{command} {shlex.join(args)}"


#: What a message without command lines (a group chat) says about acknowledging, once.
ACK_WORDS = (
    "An admin can acknowledge these alerts on the gpuwatch host ('gpuwatch ack') to stop the reminders; "
    "everyone here still hears when they resolve."
)


def _entry_key(t: Transition) -> tuple[str, str, str, str]:
    return (t.kind, t.record.key.rule, t.record.key.host, t.cause or "")


def alert_entry(
    entry: Sequence[Transition],
    tz: tzinfo | None = None,
    config_path: str | None = None,
    *,
    rules: Sequence[Rule] = RULES,
    command: str | None = "gpuwatch",
) -> str:
    """The transitions of one kind, rule and host (and cause) as one entry of a message: a head
    saying what and where, a line per alert in its rule's words, the threshold and times, and for
    firing ones the line that acknowledges them (``command``: how gpuwatch is run from a shell;
    None: no command line)."""
    t = entry[0]
    r = t.record
    label = _LABELS.get(t.kind, t.kind.upper())
    if len(entry) == 1:
        head = f"{label} {r.key.rule} ({_where(r.key)})"
    else:
        where = "the fleet" if r.key.host == FLEET else r.key.host
        head = f"{label} {r.key.rule} on {where}: {_members([x.record.key for x in entry])}"
    if t.cause is not None:
        head += f": {_CAUSES.get(t.cause, t.cause)}"
    said = [alert_words(x.record, rules) for x in entry]
    threshold = "; ".join(dict.fromkeys(w.threshold for w in said))
    prefix = "was: " if t.kind == "resolved" else ""
    lines = [head, *(f"    {prefix}{w.summary}" for w in said[:MAX_ENTRY_LINES])]
    if len(said) > MAX_ENTRY_LINES:
        lines.append(f"    ... and {len(said) - MAX_ENTRY_LINES} more ('gpuwatch alerts' lists them all)")
    if t.kind == "resolved":
        fired = min((x.record.fired_at or x.record.since) for x in entry)
        lasted = format_duration(t.at - fired)
        when = f"fired {local_time(fired, tz, seconds=True)}, resolved {local_time(t.at, tz, seconds=True)}"
        when += f" (lasted {lasted})"
        lines.append(f"    threshold: {threshold}; {when}")
        return "\n".join(lines)
    # To the second: each episode of a flapping alert is its own message, never a copy of the last.
    since = local_time(min(x.record.since for x in entry), tz, seconds=True)
    if len(entry) == 1:
        lines.append(f"    now: {_reading(said[0].value)}; threshold: {threshold}; since {since}")
    else:
        lines.append(f"    threshold: {threshold}; since {since}")
    if command is not None:
        ack = ack_command([x.record.key for x in entry], config_path, command)
        lines.append(f"    an admin can acknowledge {'it' if len(entry) == 1 else 'them'}: {ack}")
    return "\n".join(lines)


def _reading(value: str) -> str:
    """A value as a person reads it: a code word such as ``driver_mismatch`` in words."""
    return value.replace("_", " ") if re.fullmatch(r"[a-z]+(_[a-z]+)+", value) else value


def _counted(word: str, entries: Sequence[Sequence[Transition]]) -> list[str]:
    """``2 firing``, counting entries as the message shows them; with the alerts they hold when
    an entry holds several: ``2 firing (9 alerts)``."""
    if not entries:
        return []
    alerts = sum(len(e) for e in entries)
    return [f"{len(entries)} {word}" + (f" ({plural(alerts, 'alert')})" if alerts != len(entries) else "")]


def alert_message(
    transitions: Sequence[Transition],
    notices: Sequence[Notice],
    mentions: Mapping[str, str],
    tz: tzinfo | None = None,
    config_path: str | None = None,
    *,
    rules: Sequence[Rule] = RULES,
    command: str | None = "gpuwatch",
) -> Message | None:
    """New, reminded and resolved alerts and notices of one cycle, grouped in one message: the
    alerts of one rule on one host are one entry, and the title counts entries. ``config_path``:
    the config file the daemon runs with, named in the ack lines (so they work from any
    directory). ``command``: how gpuwatch is run from a shell, for the ack line under each firing
    entry; None: no command lines, the message says once in words how to acknowledge (a group
    chat). ``rules``: the registry whose words say them (a test may add a rule)."""
    if not transitions and not notices:
        return None
    order = {"firing": 0, "reminder": 1, "resolved": 2}
    ordered = sorted(transitions, key=lambda t: (order.get(t.kind, 3), t.cause or "", _key_order(t.record.key)))
    entries = [list(group) for _, group in itertools.groupby(ordered, key=_entry_key)]
    firing = [e for e in entries if e[0].kind != "resolved"]
    resolved = [e for e in entries if e[0].kind == "resolved"]
    counts = _counted("firing", firing) + _counted("resolved", resolved)
    counts += [plural(len(notices), "notice")] if notices else []
    blocks = [alert_entry(entry, tz, config_path, rules=rules, command=command) for entry in entries]
    if firing and command is None:
        blocks.append(ACK_WORDS)
    blocks += [f"NOTICE {notice_text(n, rules)}" for n in notices]
    users: list[str] = [t.record.key.user for t in ordered if t.record.key.user]
    # The others an alert concerns (reservation_conflict: the booking's holder), from its facts.
    users += [str(u) for t in ordered for u in t.record.facts.get("people") or ()]
    users += [u for n in notices for u in n.users]
    open_ids = tuple(dict.fromkeys(mentions[u] for u in users if u in mentions))
    severity = "firing" if firing else ("resolved" if resolved else "info")
    return Message(
        title=f"GPU alerts: {', '.join(counts)}",
        blocks=tuple(blocks),
        severity=severity,
        mentions=open_ids,
        kind="alert",
        body=alert_body(blocks, counts, severity),
        alerts=tuple(alert_item(t, rules) for t in ordered),
    )


def alert_item(t: Transition, rules: Sequence[Rule] = RULES) -> AlertItem:
    """One transition as data (:class:`~gpuwatch.message.AlertItem`), in the words of its entry in
    the chat message: its summary, then the reading and threshold (``was:`` once resolved, with why
    when it is not that the condition cleared)."""
    r, key = t.record, t.record.key
    words = alert_words(r, rules)
    if t.kind == "resolved":
        cause = f" ({_CAUSES.get(t.cause, t.cause)})" if t.cause is not None else ""
        description = f"was: {words.summary}{cause}\nthreshold: {words.threshold}"
    else:
        description = f"{words.summary}\nnow: {_reading(words.value)}; threshold: {words.threshold}"
    return AlertItem(
        kind=t.kind,
        id=key.id,
        rule=key.rule,
        host=None if key.host == FLEET else key.host,
        started_at=r.fired_at if r.fired_at is not None else r.since,
        summary=words.summary,
        description=description,
        gpu=key.gpu,
        user=key.user,
        pid=key.pid,
        detail=key.detail,
        resolved_at=t.at if t.kind == "resolved" else None,
    )


def firing_alerts(
    records: Iterable[AlertRecord], now: float, wanted: Callable[[str], bool], rules: Sequence[Rule] = RULES
) -> Message | None:
    """The alerts firing now that were announced (not pending, not held back by a silence or an
    inhibition before they were ever said), of the rules ``wanted`` takes, as one alert message
    of data (``Message.alerts``), for a channel that is told the whole firing set again and again
    (Alertmanager); None when there are none."""
    items = tuple(
        alert_item(Transition("firing", r, now), rules)
        for r in sorted(records, key=lambda r: _key_order(r.key))
        if r.state == "firing" and r.last_sent_at is not None and wanted(r.key.rule)
    )
    if not items:
        return None
    return Message(
        title=f"GPU alerts: {plural(len(items), 'alert')} firing",
        blocks=tuple(f"FIRING {i.rule}: {i.summary}" for i in items),
        severity="firing",
        kind="alert",
        alerts=items,
    )


# ---------------------------------------------------------------- structure (Message.body)

BAR_CELLS = 10


def bar(value: float | None, total: float | None = 100.0) -> str:
    """``value`` of ``total`` as a bar of characters, ``▰▰▰▱▱▱▱▱▱▱`` (unknown: ``N/A``)."""
    if value is None or total is None or total <= 0:
        return UNKNOWN
    filled = round(BAR_CELLS * min(max(value / total, 0.0), 1.0))
    return "▰" * filled + "▱" * (BAR_CELLS - filled)


def _model(name: str | None) -> str:
    return (name or "GPU").removeprefix("NVIDIA ").strip() or "GPU"


def gpu_row(host: HostSnapshot, gpu: Gpu, thresholds: FreeGpuConfig) -> Row:
    """One GPU as a row: index, model (when the host mixes models; else its section says it),
    utilization bar, memory bar, who is on it (or free)."""
    procs = host.processes_on(gpu)
    free = gpu_free(host, gpu, thresholds)
    booking = host.reservation_on(gpu)
    util = f"util {bar(gpu.utilization_percent)} {number(gpu.utilization_percent, '%')}"
    memory = (
        f"mem {bar(gpu.memory_used_mib, gpu.memory_total_mib)} "
        f"{number(gpu.memory_used_mib)}/{number(gpu.memory_total_mib)} MiB"
    )
    who = _who(procs) if procs else ("free" if free else "no process")
    if booking is not None:
        who = reserved_words(booking) if not procs else f"{who}; {reserved_words(booking)}"
    mixed = len({_model(g.name) for g in host.gpus}) > 1
    model = (_model(gpu.name),) if mixed else ()
    return Row((str(gpu.index), *model, util, memory, who), "free" if free else "busy")


def _host_note(host: HostSnapshot, thresholds: FreeGpuConfig) -> str:
    models = dict.fromkeys(_model(g.name) for g in host.gpus)
    kinds = " + ".join(f"{sum(1 for g in host.gpus if _model(g.name) == m)} × {m}" for m in models)
    free = len(free_gpus(host, thresholds))
    return f"{kinds or '0 GPUs'} · {free} free"


def _down_section(host: HostSnapshot, now: datetime | None, same_as: str | None = None) -> Section:
    words = _down_line(host, now, same_as).removeprefix(f"{host.name}: ")
    return Section(host.name, "stale" if host.stale else "down", words)


def host_section(
    host: HostSnapshot, thresholds: FreeGpuConfig, now: datetime | None = None, same_as: str | None = None
) -> Section:
    """A host as a section: its GPUs as rows; a host without current data, its reason
    (``same_as``: see :func:`_down_line`)."""
    if not host.current:
        return _down_section(host, now, same_as)
    rows = [gpu_row(host, gpu, thresholds) for gpu in host.gpus]
    stray = [p for p in host.processes if p.gpu_index is None]
    if stray:
        rows.append(Row(("on an unlisted GPU", _who(stray)), "warning"))
    rows += [Row((f"warning: {w.message}",), "warning") for w in host.warnings]
    return Section(host.name, "ok", _host_note(host, thresholds), tuple(rows))


def overview_body(snapshot: FleetSnapshot, thresholds: FreeGpuConfig) -> Body:
    """The overview as structure: hosts without data first (red), then each host's GPUs."""
    t = totals(snapshot, thresholds)
    down = f", {t.hosts_down} down" if t.hosts_down else ""
    down += f", {t.hosts_stale} stale" if t.hosts_stale else ""
    summary = f"{plural(t.hosts, 'host')}{down}, {plural(t.gpus, 'GPU')}, {t.free_gpus} free"
    hosts = sorted(snapshot.hosts, key=lambda h: h.current)
    same = _said_before(hosts)
    tags = [(f"{t.free_gpus} free", "free")]
    tags += [(f"{t.hosts_down} down", "down")] if t.hosts_down else []
    tags += [(f"{t.hosts_stale} stale", "stale")] if t.hosts_stale else []
    state = "down" if snapshot.down else ("free" if t.free_gpus else "busy")
    return Body(
        summary=summary,
        state=state,
        sections=tuple(host_section(h, thresholds, snapshot.taken_at, same.get(h.name)) for h in hosts),
        tags=tuple(tags),
    )


def free_body(snapshot: FleetSnapshot, thresholds: FreeGpuConfig) -> Body:
    """The free GPUs as structure: a section per host with free GPUs, then the hosts without data."""
    t = totals(snapshot, thresholds)
    sections = []
    for host in snapshot.answered:
        free = free_gpus(host, thresholds)
        booked = tuple(
            Row((str(g.index), _model(g.name), f"idle, {reserved_words(r)}"), "busy")
            for g, r in reserved_idle(host, thresholds)
        )
        if free or booked:
            rows = tuple(
                Row(
                    (
                        str(g.index),
                        _model(g.name),
                        f"mem {bar(g.memory_used_mib, g.memory_total_mib)} "
                        f"{number(g.memory_used_mib)}/{number(g.memory_total_mib)} MiB",
                    ),
                    "free",
                )
                for g in free
            )
            state = "free" if free else "busy"
            sections.append(Section(host.name, state, f"{len(free)} free of {len(host.gpus)}", rows + booked))
    if not t.free_gpus:
        sections.insert(0, Section("No GPU is free right now.", "busy"))
    same = _said_before(snapshot.down)
    sections += [_down_section(h, snapshot.taken_at, same.get(h.name)) for h in snapshot.down]
    tags = [(f"{t.free_gpus} free", "free")] + ([(f"{len(snapshot.down)} no data", "down")] if snapshot.down else [])
    return Body(
        summary=f"{t.free_gpus} of {plural(t.gpus, 'GPU')} free",
        state="free" if t.free_gpus else ("down" if snapshot.down else "busy"),
        sections=tuple(sections),
        tags=tuple(tags),
    )


#: The first word(s) of an alert block -> the state of its section.
_BLOCK_STATES = (("STILL FIRING", "reminder"), ("FIRING", "firing"), ("RESOLVED", "resolved"), ("NOTICE", "notice"))


def alert_body(blocks: Sequence[str], counts: Sequence[str], severity: str) -> Body:
    """Alerts as structure, from their blocks: the first line of a block is its section's title
    (coloured by the label it starts with), each further line a row."""
    sections = []
    for block in blocks:
        head, *rest = block.split("\n")
        state = next((s for label, s in _BLOCK_STATES if head.startswith(label)), "info")
        sections.append(Section(head, state, "", tuple(Row((line.strip(),)) for line in rest if line.strip())))
    tags = []
    for count in counts:
        word = count.split(" ")[1]  # "2 firing (9 alerts)": firing
        tags.append((count, {"firing": "firing", "resolved": "resolved"}.get(word, "notice")))
    return Body(
        summary=", ".join(counts),
        state={"firing": "firing", "resolved": "resolved"}.get(severity, "notice"),
        sections=tuple(sections),
        tags=tuple(tags),
    )
