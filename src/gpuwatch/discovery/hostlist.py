"""Host names from text, pure: Slurm host lists expanded, one-name-a-line files read.

Conventions:

* A Slurm host list (``sinfo -h -o %N``, ``scontrol show hostnames``) is names separated by commas
  at the top level (a comma inside ``[...]`` separates ranges); each ``[...]`` holds numbers and
  ranges (``gpu[01-04,07]``). Several brackets in one name multiply (``a[1-2]b[3-4]`` is a1b3, a1b4,
  a2b3, a2b4), in Slurm's order. A range keeps the zero padding of its lower bound as written
  (``[08-10]`` is 08, 09, 10; ``[8-10]`` is 8, 9, 10).
* A line holds one name or one host list (names separated by top-level commas); ``#`` starts a
  comment (a whole line, or the rest of one). Blank lines are skipped. A line with a blank inside
  (``Welcome to the cluster``: a login banner) is an error, not three host names.
* A name is what a host name may be: letters, digits, ``.``, ``-``, ``_``, at most 253 characters,
  not starting with ``-`` (an SSH option). Anything else is a :class:`HostListError` that names the
  line and quotes the text: a list with a bad entry is refused whole, never read in part.
* At most :data:`MAX_HOSTS` names come out of one text: ``gpu[0-99999999]`` is refused, not expanded.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from ..text import quote

MAX_HOSTS = 100_000
MAX_NAME = 253
_NAME_RE = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]*")
_RANGE_RE = re.compile(r"(\d+)(?:-(\d+))?")


class HostListError(ValueError):
    """Text that is not a list of host names; the message says what and where."""


def split_top_level(text: str) -> list[str]:
    """``a[1,2],b`` -> ``["a[1,2]", "b"]``: split at commas outside brackets (empty parts dropped)."""
    parts: list[str] = []
    depth = 0
    current: list[str] = []
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise HostListError(f"{quote(text)}: ']' without '['")
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    if depth:
        raise HostListError(f"{quote(text)}: '[' without ']'")
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _bracket_values(body: str, whole: str) -> list[str]:
    """``01-04,07`` -> ``["01", "02", "03", "04", "07"]``."""
    values: list[str] = []
    for item in body.split(","):
        match = _RANGE_RE.fullmatch(item.strip())
        if not match:
            raise HostListError(f"{quote(whole)}: {quote(item)} is not a number or a range like 01-04")
        low_text, high_text = match[1], match[2]
        low = int(low_text)
        high = low if high_text is None else int(high_text)
        if high < low:
            raise HostListError(f"{quote(whole)}: the range {item.strip()} runs backwards")
        if len(values) + high - low + 1 > MAX_HOSTS:
            raise HostListError(f"{quote(whole)}: more than {MAX_HOSTS} names")
        width = len(low_text)
        values += [str(n).zfill(width) for n in range(low, high + 1)]
    return values


def expand_one(pattern: str) -> list[str]:
    """One host-list entry (no top-level comma) -> its names, in Slurm's order."""
    pieces: list[list[str]] = []
    rest = pattern
    while "[" in rest:
        head, _, tail = rest.partition("[")
        body, closed, rest = tail.partition("]")
        if not closed or "[" in body:
            raise HostListError(f"{quote(pattern)}: unbalanced brackets")
        pieces += [[head], _bracket_values(body, pattern)]
    if "]" in rest:
        raise HostListError(f"{quote(pattern)}: ']' without '['")
    pieces.append([rest])
    names = [""]
    for options in pieces:
        if len(names) * len(options) > MAX_HOSTS:
            raise HostListError(f"{quote(pattern)}: more than {MAX_HOSTS} names")
        names = [n + o for n in names for o in options]
    return names


def expand_hostlist(text: str) -> list[str]:
    """A Slurm host list (``gpu[01-04,07],login1``) -> the names, in order, each once."""
    names: list[str] = []
    for entry in split_top_level(text):
        names += expand_one(entry)
        if len(names) > MAX_HOSTS:
            raise HostListError(f"{quote(text)}: more than {MAX_HOSTS} names")
    return list(dict.fromkeys(names))


def check_name(name: str) -> str:
    """``name`` when it is a usable host name, else a HostListError saying why."""
    if len(name) > MAX_NAME:
        raise HostListError(f"{quote(name)}: longer than {MAX_NAME} characters, not a host name")
    if not _NAME_RE.fullmatch(name):
        raise HostListError(f"{quote(name)}: not a host name (letters, digits, '.', '-', '_')")
    return name


def _entries(text: str) -> Iterator[tuple[int, str]]:
    for number, line in enumerate(text.splitlines(), 1):
        content = line.split("#", 1)[0].strip()
        if content:
            yield number, content


def names_from_text(text: str, *, hostlists: bool = True) -> list[str]:
    """Every host name in ``text`` (a file, a command's output), in order, each once.

    ``hostlists``: expand Slurm host lists (``gpu[01-04]``); without it, a bracket is an error.
    Raises HostListError naming the line of the first bad entry."""
    names: list[str] = []
    for number, word in _entries(text):
        try:
            if any(c.isspace() for c in word):
                raise HostListError(f"{quote(word)}: one host (or host list) a line, without blanks")
            expanded = expand_hostlist(word) if hostlists else split_top_level(word)
            names += [check_name(n) for n in expanded]
        except HostListError as exc:
            raise HostListError(f"line {number}: {exc}") from None
        if len(names) > MAX_HOSTS:
            raise HostListError(f"line {number}: more than {MAX_HOSTS} host names")
    return list(dict.fromkeys(names))
