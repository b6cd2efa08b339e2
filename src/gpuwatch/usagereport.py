"""Pure: two usage documents (this period and the one before, :func:`gpuwatch.usage.usage_document`
grouped by user) -> the ``usage`` report, a channel-neutral :class:`~gpuwatch.message.Message`.

What it says: the fleet's use of the period (GPU-hours used of those known, mean utilization,
held idle, unknown time when hosts did not answer), the people with the most GPU-hours with their
held-idle hours and the change since the period before, and the GPUs nobody used. One block per
part, so a channel that splits it never cuts a list in half; at most :data:`TOP_PEOPLE` people
and :data:`MAX_NEVER_USED` GPUs are named (the rest are counted).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from .message import Body, Message, Row, Section
from .text import format_duration, local_time, plural

TOP_PEOPLE = 10
MAX_NEVER_USED = 40


def _people_count(count: int, more: str = "") -> str:
    return f"{count} {more}{'person' if count == 1 else 'people'}"


def _hours(value: float) -> str:
    return f"{value:.1f}" if value < 1000 else f"{value:,.0f}"


def _change(now: float, before: float | None) -> str:
    if before is None:
        return "new"
    delta = now - before
    if abs(delta) < 0.05:
        return "same as before"
    percent = f", {delta / before:+.0%}" if before >= 0.05 else ""
    return f"{delta:+.1f} h{percent}"


def _people(doc: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {str(g["user"]): g for g in doc.get("groups", [])}


def _fleet_line(fleet: Mapping[str, Any], before: Mapping[str, Any]) -> str:
    used, known = float(fleet["gpu_hours"]), float(fleet["known_gpu_hours"])
    share = f" ({used / known:.0%} of the {_hours(known)} GPU-hours the hosts answered)" if known else ""
    util = fleet.get("utilization_percent")
    parts = [
        f"Fleet: {_hours(used)} GPU-hours used{share}, {_change(used, float(before.get('gpu_hours', 0.0)))}",
        f"mean utilization {util:.0f}%" if util is not None else "utilization unknown",
        f"held idle {_hours(float(fleet['held_idle_gpu_hours']))} GPU-hours",
    ]
    unknown = float(fleet.get("unknown_gpu_hours", 0.0))
    if unknown:
        parts.append(f"{_hours(unknown)} GPU-hours unknown (hosts did not answer)")
    return "; ".join(parts)


def _never_used(names: Sequence[str]) -> str:
    by_host: dict[str, list[str]] = {}
    for name in names:
        host, _, index = name.rpartition(":")
        by_host.setdefault(host, []).append(index)
    listed = [
        f"{host} GPU {', '.join(sorted(ix, key=lambda i: int(i) if i.isdigit() else 0))}"
        for host, ix in by_host.items()
    ]
    shown = listed[:MAX_NEVER_USED]
    more = f" and {plural(len(listed) - len(shown), 'more host')}" if len(listed) > len(shown) else ""
    return f"Never used ({plural(len(names), 'GPU')}): " + "; ".join(shown) + more


def usage_report(current: Mapping[str, Any], previous: Mapping[str, Any]) -> Message:
    """The ``usage`` report for ``current`` (compared with ``previous``, the period before it)."""
    start, end = (datetime.fromisoformat(str(current[k])).timestamp() for k in ("from", "to"))
    span = format_duration(end - start)
    fleet, before_fleet = current["fleet"], previous.get("fleet", {})
    people, before = _people(current), _people(previous)
    top = list(people.values())[:TOP_PEOPLE]
    lines = [
        f"{g['user']}: {_hours(float(g['gpu_hours']))} GPU-hours, held idle {_hours(float(g['held_idle_gpu_hours']))}"
        f" ({_change(float(g['gpu_hours']), _before(before, str(g['user'])))})"
        for g in top
    ]
    if len(people) > len(top):
        lines.append(f"and {_people_count(len(people) - len(top), 'more ')}")
    never = [str(n) for n in current.get("never_used", [])]
    blocks = [
        f"From {local_time(start)} to {local_time(end)}.\n{_fleet_line(fleet, before_fleet)}",
        "\n".join(["Most GPU-hours:", *lines]) if lines else "Nobody ran a GPU process in this period.",
    ]
    if never:
        blocks.append(_never_used(never))
    title = f"GPU usage, last {span}: {_hours(float(fleet['gpu_hours']))} GPU-hours, {_people_count(len(people))}"
    return Message(title=title, blocks=tuple(blocks), kind="report", body=_body(title, blocks, lines, never))


def _before(before: Mapping[str, Mapping[str, Any]], name: str) -> float | None:
    found = before.get(name)
    return None if found is None else float(found["gpu_hours"])


def _body(title: str, blocks: Sequence[str], people: Sequence[str], never: Sequence[str]) -> Body:
    sections = [Section(title="Fleet", rows=tuple(Row((line,)) for line in blocks[0].split("\n")))]
    if people:
        sections.append(Section(title="Most GPU-hours", rows=tuple(Row((line,), "busy") for line in people)))
    if never:
        sections.append(Section(title="Never used", state="free", rows=(Row((blocks[-1],), "free"),)))
    return Body(summary=title, state="info", sections=tuple(sections))
