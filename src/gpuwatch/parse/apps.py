"""``nvidia-smi --query-compute-apps``: the fields asked and the compute processes read back."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from gpuwatch.model import ComputeApp, HostErrorKind, HostIssue

from .errors import classify_nvidia_smi_error
from .table import Query, duplicate, error_issues, misfit, missing_columns, no_columns_issues, read_table, split_row
from .values import (
    LIMITS,
    MAX_TEXT_CHARS,
    as_int,
    bad_value,
    capped,
    excerpt,
    is_unknown,
    normalize_bus_id,
    parse_natural,
    parse_text,
    quoted_value,
    reading_in,
    split_lines,
)

APP_QUERY_FIELDS: tuple[str, ...] = (
    "pid",
    "gpu_uuid",
    "gpu_bus_id",
    "used_gpu_memory",
)
"""``nvidia-smi --query-compute-apps=`` fields: all fixed-format, none written by a user.

``process_name`` is not asked for: it is the process's own argv[0], printed raw (a newline
in it would start a new row). The name comes from ``ps`` instead, which escapes control
characters. :func:`parse_compute_apps` still reads a ``process_name`` column where one is
printed (older probes, the corpus)."""

_APP_ALIASES: Mapping[str, str] = {
    "name": "process_name",
    "used_memory": "used_gpu_memory",
}

APP_QUERY = Query("--query-compute-apps", (*APP_QUERY_FIELDS, "process_name"), _APP_ALIASES, "pid", "process_name")


def compute_apps_failure(text: str, exit_code: int | None) -> HostIssue | None:
    """:func:`classify_nvidia_smi_error` for a ``--query-compute-apps`` output: only the
    lines that are not process rows are read as messages (a process name is never one)."""
    table = read_table(text, None, APP_QUERY)
    return classify_nvidia_smi_error("\n".join(table.not_rows), exit_code)


_RE_NO_PROCESSES = re.compile(r"^No running (?:compute )?processes found", re.IGNORECASE)


def parse_compute_apps(
    text: str, fields: Sequence[str] | None = None, required: Sequence[str] = ()
) -> tuple[list[ComputeApp], list[HostIssue]]:
    """Parse ``nvidia-smi --query-compute-apps=... --format=csv[,noheader][,nounits]`` output.

    Columns by header name (or by ``fields`` without a header). ``process_name``, where
    printed, may hold ``", "``: the other columns are split off from the left and from the
    right and the name keeps the middle exactly. A header without rows, or no output at all,
    means no processes. A row that cannot be read (its pid is no pid, it has too few cells)
    is skipped with a ``probe_failed`` issue: the process list is then incomplete, and who
    runs what is not known. A row seen twice (same pid on the same GPU) is kept once; a memory
    value outside its range is unknown; a field in ``required`` missing from the header is
    unknown; all with an ``unparseable`` warning.
    """
    query = APP_QUERY
    kept = "\n".join(line for line in split_lines(text) if not _RE_NO_PROCESSES.match(line.strip()))
    table = read_table(kept, fields, query)
    if table.columns is None:
        return [], no_columns_issues(table, query)

    columns = table.columns
    free_column = query.free_column(columns)
    apps: list[ComputeApp] = []
    warnings: list[HostIssue] = missing_columns(query, columns, required) if table.rows else []
    seen: set[tuple[int, str | None]] = set()
    for (_position, line), placed in zip(table.rows, table.cells, strict=True):
        cells = placed if placed is not None else split_row(line, len(columns), free_column)
        if cells is None:
            warnings.append(
                misfit(query, line, len(columns), "skipped (process list incomplete)", HostErrorKind.PROBE_FAILED)
            )
            continue
        values = dict(zip(columns, cells))
        pid_text = values.get("pid")
        pid = parse_natural(pid_text)
        if pid is None or pid not in LIMITS["pid"]:
            shown = quoted_value(pid_text) if pid_text is not None else "(none)"
            warnings.append(
                HostIssue(
                    HostErrorKind.PROBE_FAILED,
                    f"skipped a compute process whose pid {shown} is not a pid (process list incomplete): "
                    f"{excerpt(line)}",
                )
            )
            continue
        uuid = parse_text(values.get("gpu_uuid"))
        bus = parse_text(values.get("gpu_bus_id"))
        key = (pid, uuid.lower()) if uuid else (pid, normalize_bus_id(bus))  # a GPU's UUID, else its bus id
        if key in seen:
            warnings.append(duplicate(f"process {pid} on one GPU", line))
            continue
        seen.add(key)
        memory, reason = reading_in(values.get("used_gpu_memory"), LIMITS["used_gpu_memory"])
        if reason is not None:
            warnings.append(bad_value(f"process {pid}", "used_gpu_memory", values["used_gpu_memory"], reason))
        name = values.get("process_name", "")
        apps.append(
            ComputeApp(
                pid=pid,
                gpu_uuid=uuid,
                gpu_bus_id=bus,
                used_memory_mib=as_int(memory),
                process_name="" if is_unknown(name) else capped(name, MAX_TEXT_CHARS),
            )
        )
    return apps, [*error_issues(table.errors, len(apps)), *warnings]
