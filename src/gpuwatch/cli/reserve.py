"""``gpuwatch reserve``: book GPUs for someone (add), see the bookings (list), end one (remove).

While a booking is in force its GPUs are free for no one else: the page, ``status``, the reports,
the API and ``gpuwatch_gpu_free`` say "reserved for bob until ...", and the rule
``reservation_conflict`` (when switched on) fires when someone else runs a process on them. A
booking that overlaps another on the same GPU is refused, naming the one it overlaps (exit 1).
Times are this machine's local time. ``reserve list`` only reads (any user who may read the state
directory can run it).
"""

from __future__ import annotations

import argparse
import difflib
import getpass
import logging
import re
import sys
import time
from datetime import tzinfo
from typing import TextIO

from ..config import Config, ConfigError, parse_duration
from ..model import Reservation
from ..reservation import TIME_FORMATS, booking_state, describe, gpu_ranges, parse_gpus, parse_time, reservations_dict
from ..statedir import StateError
from ..store import DB_NAME, AlertStore, Overlap, ReservationStore, open_db
from ..text import local_time
from .common import EXIT_FAILED, EXIT_OK, UsageError, read_state, write_json

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    reserve = sub.add_parser(
        "reserve",
        parents=[common],
        help="book GPUs for someone for a while: add, list, remove",
        description="Book GPUs of a host for someone for a while. While a booking is in force its GPUs are "
        "free for no one else: the page, status, the reports and the API say 'reserved for USER until ...', "
        "and the rule reservation_conflict fires when someone else runs a process on them. A booking that "
        "overlaps another on the same GPU is refused (exit 1). Times are local time.",
    )
    actions = reserve.add_subparsers(dest="reserve_command", metavar="ACTION", required=True, help="what to do")
    add = actions.add_parser(
        "add",
        parents=[common],
        help="book GPUs of a host for a user, from a time (default: now) until a time or for a while",
        description=f"Book GPUs of a host for a user. Times are local time: {TIME_FORMATS}.",
    )
    add.add_argument("--user", required=True, help="who the GPUs are for (as the hosts name the person)")
    add.add_argument("--host", required=True, help="host name as in the config")
    add.add_argument("--gpus", required=True, help="GPU indices: 0-3, 0,2,5 or 1-2,5")
    add.add_argument("--from", dest="starts", metavar="TIME", help="when it starts (default: now)")
    ends = add.add_mutually_exclusive_group(required=True)
    ends.add_argument("--until", dest="ends", metavar="TIME", help="when it ends, e.g. '2026-12-03 18:00'")
    ends.add_argument("--for", dest="duration", metavar="DURATION", help="how long from --from (or now), e.g. 48h, 3d")
    add.add_argument("--comment", default="", help="what it is for (shown wherever the booking is)")
    add.add_argument("--author", help="who adds it (default: your login name)")
    listing = actions.add_parser("list", parents=[common], help="the bookings in force and to come")
    listing.add_argument("--json", action="store_true", help="print them as one JSON document")
    listing.add_argument("--all", action="store_true", help="include the bookings that have ended")
    remove = actions.add_parser("remove", parents=[common], help="end bookings now (or drop future ones)")
    remove.add_argument("ids", nargs="+", metavar="ID", help="a booking's id as 'reserve list' shows it: 3 or #3")
    reserve.set_defaults(handler=cmd_reserve)


def cmd_reserve(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    """``reserve add``, ``reserve list``, ``reserve remove ID...``."""
    if args.reserve_command == "list":
        return _list(config, args.json, args.all, out)
    if args.reserve_command == "remove":
        ids = [_reservation_id(text) for text in args.ids]  # all checked before any is removed
        db = open_db(config.state_dir)
        try:
            return _remove(ReservationStore(db), ids, out)
        finally:
            db.close()
    return _add(config, args, out)


def _add(config: Config, args: argparse.Namespace, out: TextIO) -> int:
    """``reserve add``: checked before the database is opened; an overlap refused, naming it."""
    now = time.time()
    user, host, gpus, starts_at, ends_at = _booking(config, args, now)
    db = open_db(config.state_dir)
    try:
        try:
            booking = ReservationStore(db).add(
                user=user,
                host=host,
                gpus=gpus,
                starts_at=starts_at,
                ends_at=ends_at,
                now=now,
                comment=args.comment,
                author=args.author or _login_name(),
            )
        except Overlap as clash:
            taken = "; ".join(f"reservation {describe(b)}{_comment(b)}" for b in clash.existing)
            print(
                f"gpuwatch: reserve add: refused: {host} GPU {gpu_ranges(gpus)} overlaps {taken} "
                "(reserve list shows the bookings; reserve remove ID ends one)",
                file=sys.stderr,
            )
            return EXIT_FAILED
        seen = AlertStore(db).users_seen()
    finally:
        db.close()
    out.write(f"reservation #{booking.id} added: {describe(booking)[len(f'#{booking.id} ') :]}{_comment(booking)}\n")
    if seen and user not in seen:  # a typo books for no one: said, the booking kept
        close = difflib.get_close_matches(user, seen, n=3)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        print(
            f"warning: no host has shown a user {user!r} yet; {hint}the booking is added anyway "
            f"(if it is a typo: gpuwatch reserve remove {booking.id})",
            file=sys.stderr,
        )
    return EXIT_OK


_ID = re.compile(r"#?([0-9]{1,18})")


def _reservation_id(text: str) -> int:
    """``3`` or ``#3``, as ``reserve list`` prints it."""
    match = _ID.fullmatch(text.strip())
    if not match:
        raise UsageError(
            f"reserve remove: {text!r} is not a reservation id; give one as 'reserve list' shows it: 3 or #3"
        )
    return int(match.group(1))


def _login_name() -> str | None:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no name for this uid (a container), no environment: no author
        return None


def _comment(booking: Reservation) -> str:
    return f" ({booking.comment})" if booking.comment else ""


def _booking(
    config: Config, args: argparse.Namespace, now: float, tz: tzinfo | None = None
) -> tuple[str, str, tuple[int, ...], float, float]:
    """The booking ``reserve add`` was given, checked: a configured host, GPU indices, a time span
    that ends after it starts and after now. A :class:`UsageError` in words for anything else."""
    names = [h.name for h in config.hosts]
    if args.host not in names:
        close = difflib.get_close_matches(args.host, names, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise UsageError(
            f"reserve add --host: {args.host!r} is not a configured host; {hint}the hosts are: {', '.join(names)}"
        )
    if not args.user.strip():
        raise UsageError("reserve add --user: give the name of the person the GPUs are for")
    try:
        gpus = parse_gpus(args.gpus)
    except ValueError as exc:
        raise UsageError(f"reserve add --gpus: {exc}") from None
    starts_at = _time(args.starts, "--from", tz) if args.starts else now
    if args.duration is not None:
        try:
            seconds = parse_duration(args.duration, "reserve add --for")
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
        if seconds <= 0:
            raise UsageError("reserve add --for: must be longer than 0s, e.g. 2h, 48h, 3d")
        ends_at = starts_at + seconds
    else:
        ends_at = _time(args.ends, "--until", tz)
    if ends_at <= starts_at:
        raise UsageError(
            f"reserve add: --until {local_time(ends_at, tz)} is not after --from {local_time(starts_at, tz)}"
        )
    if ends_at <= now:
        raise UsageError(f"reserve add: the booking would end at {local_time(ends_at, tz)}, which has passed")
    return args.user.strip(), args.host, gpus, starts_at, ends_at


def _time(text: str, option: str, tz: tzinfo | None) -> float:
    try:
        return parse_time(text, tz)
    except ValueError as exc:
        raise UsageError(f"reserve add {option}: {exc}") from None


def _list(config: Config, as_json: bool, include_past: bool, out: TextIO) -> int:
    now = time.time()
    bookings = [b for b in read_bookings(config, ["reserve", "list"], quiet=False) if include_past or b.ends_at > now]
    if as_json:
        write_json(reservations_dict(bookings, now), out)
        return EXIT_OK
    if not bookings:
        out.write("no reservations in force or to come\n" if not include_past else "no reservations\n")
    for b in bookings:
        by = f" by {b.author}" if b.author else ""
        out.write(f"{describe(b)}  [{booking_state(b, now)}]{by}{_comment(b)}\n")
    return EXIT_OK


def _remove(store: ReservationStore, ids: list[int], out: TextIO) -> int:
    code = EXIT_OK
    for rid in ids:
        booking = store.get(rid)
        if booking is not None and store.remove(rid):
            out.write(f"reservation #{rid} removed: {describe(booking)[len(f'#{rid} ') :]}\n")
        else:
            out.write(f"no reservation #{rid}\n")
            code = EXIT_FAILED
    return code


def read_bookings(config: Config, words: list[str], *, quiet: bool = True) -> list[Reservation]:
    """Every booking kept in the state directory, for a command that only reads (``words``: the
    command, named in the line to run as another user). No database yet: none. ``quiet`` (for
    ``status``, which polls the hosts whatever the state directory says): a state directory that
    cannot be read is a warning and no bookings, not an error."""
    try:
        (config.state_dir / DB_NAME).lstat()
    except FileNotFoundError:
        return []  # nothing booked yet (and nothing created by asking)
    except OSError:
        pass  # a state directory this user cannot enter: read_state says so, with the command that works
    try:
        db = read_state(config, words)
    except StateError as exc:
        if not quiet:
            raise
        log.warning("the bookings (gpuwatch reserve) were not read: %s", exc)
        return []
    try:
        return ReservationStore(db).all()
    finally:
        db.close()
