"""The probe output's frame: the marker lines that carry a per-poll token, and the split of one
output into its sections.

Output from a host is data written by its users (a command line is whatever its owner typed), so
a marker only counts with the token of this poll: :func:`new_token` gives 128 unguessable bits,
which reach the host inside the script on ``sh -s``'s stdin and are printed only by shell builtins
(``echo``, ``printf``), so they are in no process's argv for another user to read. With
``token=""`` the markers have no token (tests, older outputs).
"""

from __future__ import annotations

import functools
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .step import StepOutput

PROBE_MARKER = "@@gpuwatch-probe 1"

_TOKEN_RE = re.compile(r"[0-9A-Za-z]{8,128}")


def new_token() -> str:
    """A fresh marker token for one poll: 128 random bits, in hex."""
    return secrets.token_hex(16)


def token_suffix(token: str) -> str:
    """What follows a marker for this token (``" <token>"``, or nothing without one)."""
    if token and not _TOKEN_RE.fullmatch(token):
        raise ValueError("a probe token is 8 to 128 letters and digits (use new_token())")
    return f" {token}" if token else ""


@dataclass(frozen=True)
class ProbeOutput:
    """One probe output, split: each section the steps printed, and the structure no step prints."""

    sections: dict[str, StepOutput]
    problems: tuple[str, ...]


@functools.lru_cache(maxsize=16)
def _markers(names: tuple[str, ...]) -> tuple[Mapping[str, str], Mapping[str, str]]:
    """{"@@begin NAME": NAME} and {"@@end NAME": NAME} for these section names: the markers without
    their token, the same for every poll (the token is checked apart, as a suffix). Shared by every
    call: only read."""
    return {f"@@begin {name}": name for name in names}, {f"@@end {name}": name for name in names}


def _marker(line: str, suffix: str, markers: Mapping[str, str]) -> str | None:
    """The section ``line`` is the marker of, when it is one of ``markers`` followed by exactly
    this poll's ``suffix`` (``" <token>"``, or ``""``)."""
    if not line.endswith(suffix):
        return None
    return markers.get(line[: len(line) - len(suffix)])


def _status(text: str) -> int | None:
    """An end marker's exit status: 1 to 3 ASCII digits, else the line is no end marker."""
    if 0 < len(text) <= 3 and text.isascii() and text.isdigit():
        return int(text)
    return None


def read_output(output: str, token: str, names: Sequence[str]) -> ProbeOutput | None:
    """Probe output -> its sections (among ``names``); None when the probe marker (with ``token``)
    is missing.

    Only whole lines equal to a marker with this poll's token count: ``@@begin NAME <token>`` and
    ``@@end NAME <token> STATUS`` (STATUS: 1 to 3 digits). A section whose end marker never came
    (the connection dropped, the output was cut) has ``exit_status=None``; when the output ended
    inside a line, that partial line is dropped. (After the last newline, ``split`` leaves "" or
    the partial line: either way not a line.)
    """
    suffix = token_suffix(token)
    lines = output.split("\n")
    if "\r" in output:
        lines = [line.removesuffix("\r") for line in lines]
    # Output cut inside a line: that line is partial (a marker's exit status may be cut to
    # another number), so it is no line at all.
    lines.pop()
    try:
        start = lines.index(PROBE_MARKER + suffix)
    except ValueError:
        return None
    begins, ends = _markers(tuple(names))
    sections: dict[str, StepOutput] = {}
    problems: list[str] = []
    name: str | None = None
    skipping = False  # inside a section printed a second time
    outside = 0
    first = 0  # the open section's first line (an index into lines)

    for i in range(start + 1, len(lines)):
        line = lines[i]
        if line.startswith("@@"):  # every marker does; the other lines are read without a lookup
            begin = _marker(line, suffix, begins)
            if begin is not None:
                if name is not None:
                    if not skipping:
                        sections[name] = StepOutput("\n".join(lines[first:i]).strip("\n"), None)
                    problems.append(f"section {name} has no end marker")
                name, first = begin, i + 1
                skipping = begin in sections
                if skipping:
                    problems.append(f"section {begin} was printed twice")
                continue
            if name is not None:
                head, _, tail = line.rpartition(" ")
                status = _status(tail)
                if status is not None and _marker(head, suffix, ends) == name:
                    if not skipping:
                        sections[name] = StepOutput("\n".join(lines[first:i]).strip("\n"), status)
                    name = None
                    continue
        if name is None and line.strip():
            outside += 1  # the script prints nothing between its sections: a line lost its section
    if name is not None and not skipping:
        sections[name] = StepOutput("\n".join(lines[first:]).strip("\n"), None)
    if outside:
        problems.append(f"{outside} line{'s' if outside != 1 else ''} outside the sections")
    if not output.endswith("\n"):
        problems.append("it ends inside a line")  # the script's last byte is a newline
    return ProbeOutput(sections, tuple(problems))
