"""The nvidia-smi CSV table reader shared by ``--query-gpu`` and ``--query-compute-apps``.

It separates the header, the data rows and the error lines mixed into them: a line that fits as a
row is data, whatever it says (a process name may hold any text, an error message's included); only
the other lines are classified as errors (:mod:`.errors`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gpuwatch.model import HostErrorKind, HostIssue

from .errors import RANK_VERSION, LineError, classify_line, merge_line_errors, mismatch_message
from .values import SEPARATOR, excerpt, parse_natural, split_lines

_UNIT_SUFFIX_RE = re.compile(r"\s*\[[^\]]*\]\s*$")
# A header cell: a field name and maybe its unit ("[MiB]", "[%]", "[W/s]", "[seconds]"): plain
# ASCII, so a damaged line is never taken for a header (its columns would be shifted).
_HEADER_CELL_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*(?: \[[A-Za-z%/]{1,16}\])?$")


def _bare_name(cell: str) -> str:
    return _UNIT_SUFFIX_RE.sub("", cell).strip().lower()


_known_name = functools.lru_cache(maxsize=512)(_bare_name)
""":func:`_bare_name` kept for short cells: every header prints the same few."""


def field_name(cell: str, aliases: Mapping[str, str]) -> str:
    """``memory.used [MiB]`` -> ``memory.used``; an alias becomes the canonical name."""
    name = _known_name(cell) if len(cell) <= 80 else _bare_name(cell)
    return aliases.get(name, name)


def _looks_like_header(line: str, vocabulary: Sequence[str], aliases: Mapping[str, str]) -> bool:
    first = line.lstrip()[:1]
    if not (first.isascii() and (first.isalpha() or first == "_")):
        return False  # a header's first cell starts with a letter or "_" (the rows with a digit)
    cells = line.strip().split(SEPARATOR)
    if not all(_HEADER_CELL_RE.match(cell.strip()) for cell in cells):
        return False
    return any(field_name(cell, aliases) in vocabulary for cell in cells)


def split_row(line: str, width: int, free_column: int | None) -> list[str] | None:
    """Split one unquoted CSV row into ``width`` cells.

    Extra ``", "`` are taken to belong to ``free_column``: the cells left of it are split
    from the left, the cells right of it from the right, and it gets the middle, rejoined
    exactly. ``None`` when the row cannot be placed.
    """
    cells = line.split(SEPARATOR)
    if len(cells) == width:
        return cells
    if len(cells) < width or free_column is None:
        return None
    right = width - free_column - 1
    end = len(cells) - right
    return [*cells[:free_column], SEPARATOR.join(cells[free_column:end]), *cells[end:]]


@dataclass(frozen=True)
class Query:
    """What distinguishes the two nvidia-smi queries for the table reader."""

    label: str  # for messages: "--query-gpu"
    vocabulary: tuple[str, ...]  # known field names, to recognise a header
    aliases: Mapping[str, str]
    key: str  # an integer column every row has, when queried
    free: str  # the column that may hold ", "

    def free_column(self, columns: Sequence[str]) -> int | None:
        return columns.index(self.free) if self.free in columns else None

    def place(self, line: str, columns: Sequence[str]) -> list[str] | None:
        """The row's cells, or ``None`` when the line does not fit as a row."""
        cells = split_row(line, len(columns), self.free_column(columns))
        if cells is None:
            return None
        if self.key in columns and parse_natural(cells[columns.index(self.key)]) is None:
            return None
        return cells


@dataclass(frozen=True)
class Table:
    columns: tuple[str, ...] | None  # None: no header and no field list
    rows: tuple[tuple[int, str], ...]  # (position among data lines, line as printed)
    errors: tuple[LineError, ...]
    first_data_line: str | None
    not_rows: tuple[str, ...]  # every line that is no data row: where nvidia-smi writes errors
    cells: tuple[tuple[str, ...] | None, ...]  # each row's cells as placed (None: it does not fit)


def read_table(text: str, fields: Sequence[str] | None, query: Query) -> Table:
    """Separate the header, the data rows and the nvidia-smi error lines.

    A line that fits as a row is data, whatever it says: a process name may hold any text,
    an error message's included. Only the other lines are classified as errors.
    """
    columns: tuple[str, ...] | None = None
    if fields is not None:
        columns = tuple(field_name(field, query.aliases) for field in fields)
    header_seen = False
    rows: list[tuple[int, str]] = []
    row_cells: list[tuple[str, ...] | None] = []
    errors: list[LineError] = []
    not_rows: list[str] = []
    first_data_line: str | None = None
    for line in split_lines(text):
        if not line.strip():
            continue
        if _looks_like_header(line, query.vocabulary, query.aliases):
            if not header_seen and not rows:
                cells = line.strip().split(SEPARATOR)
                columns = tuple(field_name(cell, query.aliases) for cell in cells)
                header_seen = True
            continue  # a repeated header (two outputs concatenated) is no row either
        placed = query.place(line, columns) if columns is not None else None
        if placed is None:
            not_rows.append(line)
            error = classify_line(line, generic=True)
            if error is not None:
                errors.append(error)
                continue
        if first_data_line is None:
            first_data_line = line
        rows.append((len(rows), line))
        row_cells.append(tuple(placed) if placed is not None else None)
    return Table(columns, tuple(rows), tuple(errors), first_data_line, tuple(not_rows), tuple(row_cells))


def error_issues(errors: Sequence[LineError], rows_found: int) -> list[HostIssue]:
    """Issues for error lines: the one cause if nothing else was read, else one each."""
    if not errors:
        return []
    if rows_found == 0:
        merged = merge_line_errors(errors)
        return [merged] if merged is not None else []
    versions = [e.message for e in errors if e.rank == RANK_VERSION]
    issues: list[HostIssue] = []
    for error in errors:
        if error.rank == RANK_VERSION:
            continue
        if error.kind is HostErrorKind.DRIVER_MISMATCH:
            issue = HostIssue(error.kind, mismatch_message(versions[0] if versions else None))
        else:
            issue = HostIssue(error.kind, error.message)
        if issue not in issues:
            issues.append(issue)
    return issues


def no_columns_issues(table: Table, query: Query) -> list[HostIssue]:
    """Issues for an output with neither header nor field list."""
    issues = error_issues(table.errors, 0)
    if table.first_data_line is not None:
        issues.append(
            HostIssue(
                HostErrorKind.UNPARSEABLE,
                f"nvidia-smi {query.label} printed no header and no field list was given: "
                f"{excerpt(table.first_data_line)}",
            )
        )
    return issues


def misfit(query: Query, line: str, width: int, action: str, kind: HostErrorKind) -> HostIssue:
    count = len(line.split(SEPARATOR))
    return HostIssue(
        kind,
        f"{action} a {query.label} row with {count} fields where {width} were expected: {excerpt(line)}",
    )


def missing_columns(query: Query, columns: Sequence[str], required: Sequence[str]) -> list[HostIssue]:
    """A warning naming the asked-for fields the header does not have."""
    absent = [field for field in required if field_name(field, query.aliases) not in columns]
    if not absent:
        return []
    return [
        HostIssue(
            HostErrorKind.UNPARSEABLE,
            f"nvidia-smi {query.label} printed no {', '.join(absent)} column; taken as unknown",
        )
    ]


def duplicate(what: str, line: str) -> HostIssue:
    return HostIssue(
        HostErrorKind.UNPARSEABLE, f"nvidia-smi listed {what} twice; kept the first row, dropped: {excerpt(line)}"
    )
