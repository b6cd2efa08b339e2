"""reservation_conflict: someone other than the holder runs a process on a booked GPU (an alert,
one per person and booking), and a booking that starts while its GPUs are still busy (a notice).

The bookings are data the rule is given, never read: those in force on the host at the fleet's
time (``HostSnapshot.reservations``, put there by ``reservation.with_reservations`` from the store),
the same ones that make the page, ``status`` and the reports say "reserved". The alert resolves
when the person's processes leave the booked GPUs, or when the booking ends or is removed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..model import HostSnapshot, Reservation
from ..reservation import gpu_ranges
from ..summary import is_free
from ..text import local_time, quantity
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
from .context import parse_on


def _intruders(host: HostSnapshot, booking: Reservation) -> dict[str, set[int]]:
    """Each person other than the holder with a process on a GPU of ``booking`` -> those GPUs. A
    process whose owner is unknown (ps did not see it: another PID namespace) is no one's: it may
    well be the holder's own container, and an alert must name who."""
    found: dict[str, set[int]] = {}
    for proc in host.processes:
        if proc.gpu_index in booking.gpus and proc.owner is not None and proc.owner != booking.user:
            found.setdefault(proc.owner, set()).add(proc.gpu_index)
    return found


def _facts(booking: Reservation, gpus: set[int]) -> dict[str, Any]:
    return {
        "holder": booking.user,
        "people": [booking.user],  # mentioned beside the key's user: both people hear of it
        "gpus": sorted(gpus),
        "booked_gpus": list(booking.gpus),
        "reservation": booking.id,
        "ends_at": booking.ends_at,
        "comment": booking.comment,
    }


def _busy(host: HostSnapshot, booking: Reservation, ctx: Context) -> list[int]:
    """The GPUs of ``booking`` not idle by their readings (a process, or memory or work above free_gpu)."""
    return [
        g.index for g in host.gpus if g.index in booking.gpus and not is_free(g, host.processes_on(g), ctx.thresholds)
    ]


def reservation_conflict(host: HostSnapshot, cfg: object, ctx: Context) -> CheckResult:
    """Remembers, per host, the bookings seen in force: one that appears while its GPUs are busy is
    a notice, once (the first result of a host only remembers)."""
    findings = []
    for booking in host.reservations:
        for user, gpus in sorted(_intruders(host, booking).items()):
            key = ctx.key(user=user, detail=f"reservation {booking.id}")
            findings.append(Finding(key, len(gpus), None, "GPUs", _facts(booking, gpus)))
    seen: Mapping[str, Any] = ctx.remembered or {}
    before = seen.get("in_force")
    notices = []
    for booking in host.reservations:
        busy = _busy(host, booking, ctx)
        if before is None or booking.id in before or not busy:
            continue
        others = sorted(
            {p.owner for p in host.processes if p.gpu_index in busy and p.owner and p.owner != booking.user}
        )
        facts = {**_facts(booking, set(busy)), "people": others, "starts_at": booking.starts_at}
        notices.append(Notice(NoticeKind.RESERVATION_BUSY, host.name, (booking.user, *others), None, facts, ctx.rule))
    return CheckResult(tuple(findings), tuple(notices), memory={"in_force": sorted(b.id for b in host.reservations)})


def reservation_conflict_words(r: Reading) -> AlertWords:
    f = r.facts
    who = r.key.user
    holder = f.get("holder")
    gpus = gpu_ranges(f.get("gpus", []))
    return AlertWords(
        f"{who} runs processes on {r.key.host} GPU {gpus}, reserved for {holder} until "
        f"{local_time(f.get('ends_at'))} (reservation #{f.get('reservation')})",
        quantity(r.value, "GPUs"),
        f"none but {holder}'s while reserved",
    )


def reservation_busy_words(notice: Notice) -> str:
    f = notice.facts
    others = f.get("people") or []
    on_it = f" ({', '.join(others)} still on it)" if others else ""
    return (
        f"{f.get('holder')}'s reservation #{f.get('reservation')} of {notice.host} GPU "
        f"{gpu_ranges(f.get('booked_gpus', []))} has started, until {local_time(f.get('ends_at'))}, but GPU "
        f"{gpu_ranges(f.get('gpus', []))} {'is' if len(f.get('gpus', [])) == 1 else 'are'} still busy{on_it}"
    )


RESERVATION_CONFLICT = HostRule(
    name="reservation_conflict",
    parse=parse_on,
    check=reservation_conflict,
    needs=Needs.PROCESSES,
    announces=Announces.BOTH,
    words=Words(alert=reservation_conflict_words, notice=reservation_busy_words),
    identity=("user", "detail"),
    memory="reservations",
)
