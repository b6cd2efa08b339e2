"""The two ``ps`` listings: owners (``pid=,etimes=,uid=,user:64=``; older probes ``pid=,user:64=,etimes=``)
and command lines (``pid=,args=``)."""

from __future__ import annotations

from collections.abc import Callable

from gpuwatch.model import HostErrorKind, HostIssue, PsEntry

from .values import LIMITS, MAX_COMMAND_CHARS, MAX_TEXT_CHARS, bad_value, capped, excerpt, parse_natural, split_lines

PS_FORMAT = "pid=,user:64=,etimes="
"""``ps -ww -o`` format for owners as older probes asked it (read by :func:`parse_ps`): a name with a
blank in it (``john doe``, from a directory) cannot be read from it."""

OWNERS_FORMAT = "pid=,etimes=,uid=,user:64="
"""``ps -ww -o`` format for owners (read by :func:`parse_owners`): no header; the numbers first and
the user last, so a name with blanks is one name; the numeric uid beside it, which the probe looks
up with ``getent`` (whose bytes survive the probe's ``C`` locale, where ps prints ``?`` for every
non-ASCII byte of a name). No user-written text, so no command line can forge an owner."""

ARGS_FORMAT = "pid=,args="
"""``ps -ww -o`` format for command lines (ps escapes newlines and control characters)."""


def _first_bad(count: int, line: str) -> str:
    more = f" and {count - 1} more" if count > 1 else ""
    return f"{excerpt(line)}{more}"


_ETIMES_RANGE = LIMITS["etimes"].range_text


def parse_ps(text: str) -> tuple[dict[int, PsEntry], list[HostIssue]]:
    """Parse ``ps -ww -o pid=,user:64=,etimes=`` output (owners, as older probes asked), keyed by pid.

    The user is kept as printed (a name, or a UID when the name is unknown). A fourth
    column, when printed (older probes asked for ``args`` there), is the command line.

    Every line must be an owner: a line that is not (an error message, a fragment) and a pid
    printed twice (one of the two lines is not ps's own) are ``probe_failed`` issues, and a
    pid printed twice gets no owner: owners are then not known. A run time out of range is
    unknown, with an ``unparseable`` warning.
    """

    def split(raw: str) -> tuple[str, str, str, str, str] | None:
        parts = raw.strip().split(maxsplit=3)
        if len(parts) < 3:
            return None
        return parts[0], parts[2], "", parts[1], parts[3] if len(parts) > 3 else ""

    entries, _, issues = _read_owners(text, split)
    return entries, issues


def parse_owners(text: str) -> tuple[dict[int, PsEntry], dict[int, int], list[HostIssue]]:
    """Parse ``ps -ww -o pid=,etimes=,uid=,user:64=`` output: the owners keyed by pid, and each
    pid's uid (where ps printed one; ``-`` is none).

    The user is the rest of the line after the uid (blanks inside it included), as ps printed it
    under the probe's ``LC_ALL=C``: printable ASCII (a line with anything else is not ps's, e.g. two
    lines run together); the caller puts the name ``getent`` gave for the uid in its place. The same rules as
    :func:`parse_ps` otherwise: a line that is no owner and a pid printed twice are
    ``probe_failed`` issues (the pid then has no owner).
    """

    def split(raw: str) -> tuple[str, str, str, str, str] | None:
        parts = raw.strip().split(maxsplit=3)
        if len(parts) < 4 or not (parts[2] == "-" or parse_natural(parts[2]) is not None):
            return None
        user = parts[3].strip()
        if not (user.isascii() and user.isprintable()):
            return None  # not ps's: under LC_ALL=C it prints "?" for every other byte
        return parts[0], parts[1], parts[2], user, ""

    return _read_owners(text, split)


_Split = Callable[[str], "tuple[str, str, str, str, str] | None"]
"""One line -> (pid, etimes, uid, user, command) as printed, or None when it is no owner line."""


def _read_owners(text: str, split: _Split) -> tuple[dict[int, PsEntry], dict[int, int], list[HostIssue]]:
    entries: dict[int, PsEntry] = {}
    uids: dict[int, int] = {}
    twice: set[int] = set()
    unreadable: list[str] = []
    issues: list[HostIssue] = []
    for raw in split_lines(text):
        if not raw.strip():
            continue
        cells = split(raw)
        pid = parse_natural(cells[0]) if cells is not None else None
        elapsed_text = cells[1] if cells is not None else ""
        elapsed = parse_natural(elapsed_text)
        if cells is None or pid is None or pid not in LIMITS["pid"] or (elapsed is None and elapsed_text != "-"):
            unreadable.append(raw)
            continue
        if elapsed is not None and elapsed not in LIMITS["etimes"]:
            issues.append(bad_value(f"process {pid}", "etimes", elapsed_text, f"is out of range ({_ETIMES_RANGE})"))
            elapsed = None
        if pid in entries or pid in twice:
            twice.add(pid)
            entries.pop(pid, None)
            uids.pop(pid, None)
            continue
        _, _, uid_text, user, command = cells
        entries[pid] = PsEntry(
            pid=pid,
            user=capped(user, MAX_TEXT_CHARS),
            elapsed_seconds=elapsed,
            command=capped(command.rstrip(), MAX_COMMAND_CHARS),
        )
        uid = parse_natural(uid_text)
        if uid is not None:
            uids[pid] = uid
    if unreadable:
        issues.append(
            HostIssue(
                HostErrorKind.PROBE_FAILED,
                f"ps printed a line that is no process owner: {_first_bad(len(unreadable), unreadable[0])}; "
                "owners may be missing",
            )
        )
    if twice:
        shown = ", ".join(str(pid) for pid in sorted(twice)[:5])
        issues.append(
            HostIssue(
                HostErrorKind.PROBE_FAILED,
                f"ps printed process {shown} more than once; its owner is unknown",
            )
        )
    return entries, uids, issues


def parse_ps_args(text: str) -> tuple[dict[int, str], list[HostIssue]]:
    """Parse ``ps -ww -o pid=,args=`` output: {pid: command line}.

    ps escapes newlines and control characters in command lines, so each line is one
    process. A line that does not start with a pid, or a pid printed twice (that pid's
    command becomes unknown), is an ``unparseable`` warning: command lines are only shown,
    never used to decide who owns what.
    """
    commands: dict[int, str] = {}
    twice: set[int] = set()
    unreadable: list[str] = []
    for raw in split_lines(text):
        if not raw.strip():
            continue
        parts = raw.strip().split(maxsplit=1)
        pid = parse_natural(parts[0])
        if pid is None or pid not in LIMITS["pid"]:
            unreadable.append(raw)
            continue
        if pid in commands or pid in twice:
            twice.add(pid)
            commands.pop(pid, None)
            continue
        commands[pid] = capped(parts[1].rstrip(), MAX_COMMAND_CHARS) if len(parts) > 1 else ""
    issues: list[HostIssue] = []
    if unreadable:
        issues.append(
            HostIssue(
                HostErrorKind.UNPARSEABLE,
                f"ps printed a line that is no command line: {_first_bad(len(unreadable), unreadable[0])}",
            )
        )
    if twice:
        shown = ", ".join(str(pid) for pid in sorted(twice)[:5])
        issues.append(
            HostIssue(HostErrorKind.UNPARSEABLE, f"ps printed the command of process {shown} more than once; unknown")
        )
    return commands, issues
