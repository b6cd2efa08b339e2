"""Splitting a message into parts that each fit a channel's limit: whole units, numbered parts.

Pure. A channel gives the units of a message (a host's block, an alert; or a card section), how
big a part would be once rendered (``size``: bytes as sent, or anything past ``limit`` when the
part breaks another of the service's limits, such as a card's element count), and how to cut a
unit that cannot fit any part on its own. Units stay whole and in order; parts are numbered
``(1/3)``, ``(2/3)``, ... in the title; only a unit too big alone is cut, its later pieces marked
"(continued)". The first part carries the mentions, and is measured with them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

logger = logging.getLogger(__name__)

U = TypeVar("U")
#: size(title, units, first): how big the part would be; ``first``: it carries the mentions
Size = Callable[[str, Sequence[U], bool], int]

CONTINUED = "(continued)"


def numbered(title: str, index: int, total: int) -> str:
    """The title of part ``index`` of ``total`` (a single part keeps its title)."""
    return title if total == 1 else f"{title} ({index}/{total})"


def split(
    title: str,
    units: Sequence[U],
    *,
    size: Size[U],
    limit: int,
    cut: Callable[[U, Callable[[U], bool]], list[U]],
    what: str,
) -> tuple[str, list[list[U]]]:
    """The title to use (an absurdly long one shortened) and the units of each part, in order.

    Every part, with its title numbered, has ``size <= limit``. ``what`` names the setting in
    errors (``feishu.max_body_bytes``).
    """
    title = fit_title(title, size=size, limit=limit, what=what)
    if size(title, units, True) <= limit:
        return title, [list(units)]
    # Reserve room for the " (i/n)" suffix; widen it if the count needs more digits.
    digits = 1
    while True:
        parts = _pack(title, units, size, limit, cut, digits, what)
        if len(parts) < 10**digits:
            return title, parts
        digits += 1


def fit_title(title: str, *, size: Size[U], limit: int, what: str) -> str:
    """Shorten an absurdly long title: title and mentions may take at most half a part."""
    budget = limit // 2
    if size(f"{title} (999/999)", [], True) <= budget:
        return title

    def shortened_fits(n: int) -> bool:
        return size(f"{title[:n]}… (999/999)", [], True) <= budget

    keep = largest(len(title), shortened_fits)
    if keep == 0:
        raise ValueError(f"{what}={limit} cannot hold the message skeleton (title and mentions) in half a part")
    logger.warning("%s: a title of %d characters was shortened to %d", what.split(".")[0], len(title), keep)
    return title[:keep] + "…"


def _pack(
    title: str,
    units: Sequence[U],
    size: Size[U],
    limit: int,
    cut: Callable[[U, Callable[[U], bool]], list[U]],
    digits: int,
    what: str,
) -> list[list[U]]:
    worst_title = f"{title} ({'9' * digits}/{'9' * digits})"

    def fits_alone(unit: U) -> bool:
        # Worst case: the unit alone in the first part, which also carries the mentions.
        return size(worst_title, [unit], True) <= limit

    pieces: list[U] = []
    for unit in units:
        if fits_alone(unit):
            pieces.append(unit)
        else:
            cut_up = cut(unit, fits_alone)
            if not cut_up:
                raise ValueError(f"{what}={limit} is too small to hold a single line of a message")
            logger.debug("%s: one unit cut into %d pieces", what.split(".")[0], len(cut_up))
            pieces.extend(cut_up)

    # Greedy: each part takes as many pieces as fit (found by galloping, so a long report
    # costs O(parts * log(units)) renders of at most about two parts' size).
    parts: list[list[U]] = []
    start = 0
    while start < len(pieces):
        rest = pieces[start:]
        first = not parts

        def fits_first(count: int, rest: list[U] = rest, first: bool = first) -> bool:
            return size(worst_title, rest[:count], first) <= limit

        count = max(1, largest(len(rest), fits_first))  # every piece fits alone
        parts.append(rest[:count])
        start += count
    return parts or [[]]


def largest(limit: int, fits: Callable[[int], bool]) -> int:
    """The largest n in [0, limit] with fits(n), for a fits() that stays false once false.

    Gallops 1, 2, 4, ... then bisects, so it never tries much more than the answer.
    """
    if limit <= 0 or not fits(1):
        return 0
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit + 1)  # fits(low) holds; fits(high) fails or high is past the limit
    while high - low > 1:
        mid = (low + high) // 2
        if fits(mid):
            low = mid
        else:
            high = mid
    return low


def cut_text(block: str, fits_alone: Callable[[str], bool]) -> list[str]:
    """Cut a text block that cannot fit any part into pieces that each can: the last resort.

    Cuts at line boundaries; a single line too long for a part is cut between characters
    (Python strings index code points, so no UTF-8 sequence is ever split). Pieces after the
    first start with "(continued)". Empty when not even one character fits.
    """
    lines = block.split("\n")
    pieces: list[str] = []

    def piece(chunk: Sequence[str], index: int) -> str:
        text = "\n".join(chunk)
        return f"{CONTINUED}\n{text}" if index else text

    start = 0
    while start < len(lines):
        index = len(pieces)
        rest = lines[start:]

        def lines_fit(n: int, rest: list[str] = rest, index: int = index) -> bool:
            return fits_alone(piece(rest[:n], index))

        count = largest(len(rest), lines_fit)
        if count:
            pieces.append(piece(rest[:count], index))
            start += count
            continue
        line = lines[start]  # one line too long on its own

        def chars_fit(n: int, line: str = line, index: int = index) -> bool:
            return fits_alone(piece([line[:n]], index))

        keep = largest(len(line), chars_fit)
        if keep == 0:
            return []
        pieces.append(piece([line[:keep]], index))
        lines[start] = line[keep:]
    return pieces
