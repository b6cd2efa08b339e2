"""GPU bookings, pure: reading what ``gpuwatch reserve add`` is given, overlaps, which bookings are in
force, and the fleet as seen with them.

Conventions: times are epoch seconds; a booking is in force on ``[starts_at, ends_at)``; a time a
person types is in this machine's zone unless ``tz`` is given (a test's explicit zone) or the text
carries an offset. The one place a booking takes a GPU away from "free" is
:func:`with_reservations`: it puts the bookings in force at the fleet's ``taken_at`` on each host
(``HostSnapshot.reservations``), and ``summary.gpu_free`` reads them there, so the page,
``status``, the reports, ``/metrics`` and the rules (``reservation_conflict``, ``gpu_freed``) agree.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import replace
from datetime import datetime, tzinfo
from typing import Any

from .model import FleetSnapshot, HostSnapshot, Reservation
from .text import iso_time, local_time

MAX_GPU_INDEX = 1023  # a typo such as 0-30000 is refused, not stored
_RANGE = re.compile(r"([0-9]{1,5})(?:\s*-\s*([0-9]{1,5}))?")
TIME_FORMATS = "'2026-12-01 09:00', '2026-12-01' (midnight) or '2026-12-01T09:00+08:00'"


def parse_gpus(text: str) -> tuple[int, ...]:
    """``0-3``, ``0,2,5``, ``1-2,5`` -> the GPU indices, sorted, each once; ValueError in words."""
    found: set[int] = set()
    for part in text.split(","):
        match = _RANGE.fullmatch(part.strip())
        if not match:
            raise ValueError(f"{text!r} is not a list of GPU indices; e.g. 0-3, or 0,2,5")
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        if high < low:
            raise ValueError(f"{part.strip()!r}: a range goes from the lower index to the higher, e.g. 0-3")
        if high > MAX_GPU_INDEX:
            raise ValueError(f"{part.strip()!r}: GPU indices go up to {MAX_GPU_INDEX}")
        found.update(range(low, high + 1))
    return tuple(sorted(found))


def gpu_ranges(gpus: Iterable[int]) -> str:
    """``0-3, 5``: runs of consecutive indices as ranges."""
    ordered = sorted(set(gpus))
    parts = []
    for _, run in itertools.groupby(enumerate(ordered), key=lambda pair: pair[1] - pair[0]):
        values = [n for _, n in run]
        parts.append(str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}")
    return ", ".join(parts)


def parse_time(text: str, tz: tzinfo | None = None) -> float:
    """A moment a person typed -> epoch seconds: ``2026-12-01 09:00`` (seconds optional, ``T``
    or a space), ``2026-12-01`` (its midnight), each in ``tz`` (None: this machine's zone) unless
    it carries an offset. ValueError in words for anything else."""
    cleaned = " ".join(text.split())
    try:
        when = datetime.fromisoformat(cleaned)
    except ValueError:
        raise ValueError(f"{text!r} is not a time; give one as {TIME_FORMATS}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=tz) if tz is not None else when.astimezone()
    return when.timestamp()


def overlapping(
    bookings: Iterable[Reservation], host: str, gpus: Sequence[int], starts_at: float, ends_at: float
) -> list[Reservation]:
    """The bookings that take any of these GPUs of ``host`` for any moment of [starts_at, ends_at)."""
    wanted = set(gpus)
    return [
        b
        for b in bookings
        if b.host == host and wanted.intersection(b.gpus) and b.starts_at < ends_at and starts_at < b.ends_at
    ]


def in_force(bookings: Iterable[Reservation], now: float) -> tuple[Reservation, ...]:
    return tuple(b for b in bookings if b.in_force(now))


def booking_state(booking: Reservation, now: float) -> str:
    """``in force``, ``future`` or ``past`` at ``now``."""
    if booking.in_force(now):
        return "in force"
    return "future" if booking.starts_at > now else "past"


def with_reservations(snapshot: FleetSnapshot, bookings: Iterable[Reservation]) -> FleetSnapshot:
    """The fleet with, on each host, the bookings in force at its ``taken_at``: the single input
    that takes a booked GPU out of "free" everywhere (``summary.gpu_free``)."""
    now = snapshot.taken_at.timestamp()
    live = in_force(bookings, now)
    if not live and not any(h.reservations for h in snapshot.hosts):
        return snapshot
    hosts = tuple(_on_host(h, live) for h in snapshot.hosts)
    return replace(snapshot, hosts=hosts)


def _on_host(host: HostSnapshot, live: Sequence[Reservation]) -> HostSnapshot:
    mine = tuple(b for b in live if b.host == host.name)
    return host if mine == host.reservations else replace(host, reservations=mine)


def reserved_words(booking: Reservation, tz: tzinfo | None = None) -> str:
    """``reserved for bob until 2026-12-03 18:00 CST``."""
    return f"reserved for {booking.user} until {local_time(booking.ends_at, tz)}"


def describe(booking: Reservation, tz: tzinfo | None = None) -> str:
    """``#3 bob: gpu03 GPU 0-3, 2026-12-01 09:00 CST until 2026-12-03 18:00 CST``."""
    return (
        f"#{booking.id} {booking.user}: {booking.host} GPU {gpu_ranges(booking.gpus)}, "
        f"{local_time(booking.starts_at, tz)} until {local_time(booking.ends_at, tz)}"
    )


def reservation_dict(booking: Reservation, now: float | None = None) -> dict[str, Any]:
    """One booking for programs (times in ISO 8601 with their offset; ``state`` at ``now``)."""
    doc: dict[str, Any] = {
        "id": booking.id,
        "user": booking.user,
        "host": booking.host,
        "gpus": list(booking.gpus),
        "from": iso_time(booking.starts_at),
        "until": iso_time(booking.ends_at),
        "comment": booking.comment,
        "author": booking.author,
        "created_at": iso_time(booking.created_at),
    }
    if now is not None:
        doc["state"] = booking_state(booking, now)
    return doc


def reservations_dict(bookings: Iterable[Reservation], now: float) -> dict[str, Any]:
    """The ``reserve list --json`` document (and ``/api/v1/reservations``)."""
    return {
        "now": iso_time(now),
        "reservations": [reservation_dict(b, now) for b in bookings],
    }
