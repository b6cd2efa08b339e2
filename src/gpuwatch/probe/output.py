"""The probe output's frame: the marker lines that carry a per-poll token, and the split of one
output into its sections.

Output from a host is data written by its users (a command line is whatever its owner typed), so
a marker only counts with the token of this poll: :func:`new_token` gives 128 unguessable bits,
which reach the host inside the script on ``sh -s``'s stdin and are printed only by shell builtins
(``echo``, ``printf``), so they are in no process's argv for another user to read. With
``token=""`` the markers have no token (tests, older outputs).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
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


def read_output(output: str, token: str, names: Sequence[str]) -> ProbeOutput | None:
    """Probe output -> its sections (among ``names``); None when the probe marker (with ``token``)
    is missing.

    Only whole lines equal to a marker with this poll's token count. A section whose end
    marker never came (the connection dropped, the output was cut) has ``exit_status=None``;
    when the output ended inside a line, that partial line is dropped. (After the last
    newline, ``split`` leaves "" or the partial line: either way not a line.)
    """
    suffix = token_suffix(token)
    lines = [line.removesuffix("\r") for line in output.split("\n")]
    # Output cut inside a line: that line is partial (a marker's exit status may be cut to
    # another number), so it is no line at all.
    lines.pop()
    try:
        start = lines.index(PROBE_MARKER + suffix)
    except ValueError:
        return None
    begins = {f"@@begin {name}{suffix}": name for name in names}
    end_re = re.compile(rf"@@end ({'|'.join(names)}){re.escape(suffix)} ([0-9]{{1,3}})")
    sections: dict[str, StepOutput] = {}
    problems: list[str] = []
    name: str | None = None
    skipping = False  # inside a section printed a second time
    outside = 0
    body: list[str] = []

    def close(status: int | None) -> None:
        assert name is not None
        if not skipping:
            sections[name] = StepOutput("\n".join(body).strip("\n"), status)

    for line in lines[start + 1 :]:
        begin = begins.get(line)
        if begin is not None:
            if name is not None:
                close(None)
                problems.append(f"section {name} has no end marker")
            name, body = begin, []
            skipping = begin in sections
            if skipping:
                problems.append(f"section {begin} was printed twice")
            continue
        end = end_re.fullmatch(line) if name is not None else None
        if end is not None and end[1] == name:
            close(int(end[2]))
            name = None
        elif name is not None:
            body.append(line)
        elif line.strip():
            outside += 1  # the script prints nothing between its sections: a line lost its section
    if name is not None:
        close(None)
    if outside:
        problems.append(f"{outside} line{'s' if outside != 1 else ''} outside the sections")
    if not output.endswith("\n"):
        problems.append("it ends inside a line")  # the script's last byte is a newline
    return ProbeOutput(sections, tuple(problems))
