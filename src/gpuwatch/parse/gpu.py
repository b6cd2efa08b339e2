"""``nvidia-smi --query-gpu``: the fields asked, the GPU rows and their health readings, and what a
host's nvidia-smi says it supports (``--help-query-gpu``, ``--version``)."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence

from gpuwatch.model import Gpu, GpuHealth, HostErrorKind, HostIssue

from .errors import classify_nvidia_smi_error
from .table import (
    Query,
    Table,
    duplicate,
    error_issues,
    misfit,
    missing_columns,
    no_columns_issues,
    read_table,
)
from .values import (
    LIMITS,
    SEPARATOR,
    as_int,
    bad_value,
    is_unknown,
    parse_natural,
    parse_text,
    quoted_value,
    reading_in,
    split_lines,
    unknown_text,
)

GPU_QUERY_FIELDS: tuple[str, ...] = (
    "index",
    "uuid",
    "name",
    "pci.bus_id",
    "utilization.gpu",
    "memory.used",
    "memory.total",
    "temperature.gpu",
    "power.draw",
)
"""``nvidia-smi --query-gpu=`` fields, in the order the probe asks for them."""

HEALTH_QUERY_FIELDS: tuple[tuple[str, ...], ...] = (
    ("driver_version",),
    ("persistence_mode",),
    ("ecc.errors.uncorrected.volatile.total",),
    ("ecc.errors.uncorrected.aggregate.total",),
    ("retired_pages.double_bit.count",),
    ("retired_pages.pending",),
    ("remapped_rows.pending",),
    ("remapped_rows.failure",),
    ("clocks_event_reasons.hw_slowdown", "clocks_throttle_reasons.hw_slowdown"),
    ("clocks_event_reasons.hw_thermal_slowdown", "clocks_throttle_reasons.hw_thermal_slowdown"),
    ("clocks_event_reasons.hw_power_brake_slowdown", "clocks_throttle_reasons.hw_power_brake_slowdown"),
)
"""Extra ``--query-gpu`` fields for GPU health and the driver, asked only where the host's
nvidia-smi lists them in ``--help-query-gpu`` (:func:`supported_health_fields`). Each entry is
one reading: its name on current drivers first, then the older name (``clocks_throttle_reasons``
became ``clocks_event_reasons`` in driver 535); the first name a driver lists is asked."""

# Aliases nvidia-smi accepts in a query; its header always prints the canonical name.
_GPU_ALIASES: Mapping[str, str] = {
    "gpu_name": "name",
    "gpu_uuid": "uuid",
    "gpu_bus_id": "pci.bus_id",
    "gpu_serial": "serial",
    "retired_pages.dbe": "retired_pages.double_bit.count",
    **{names[1]: names[0] for names in HEALTH_QUERY_FIELDS if len(names) > 1},
}

GPU_QUERY = Query("--query-gpu", GPU_QUERY_FIELDS, _GPU_ALIASES, "index", "name")


def query_gpu_failure(text: str, exit_code: int | None) -> HostIssue | None:
    """:func:`classify_nvidia_smi_error` for a ``--query-gpu`` output: only the lines that
    are not GPU rows are read as messages."""
    return classify_nvidia_smi_error("\n".join(_gpu_table(text).not_rows), exit_code)


@functools.lru_cache(maxsize=4)
def _gpu_table(text: str) -> Table:
    """A ``--query-gpu`` output's table (with its header), kept for the few latest outputs: the
    probe reads each one twice (:func:`parse_query_gpu`, then :func:`query_gpu_failure`)."""
    return read_table(text, None, GPU_QUERY)


_GPU_READINGS = ("utilization.gpu", "memory.used", "memory.total", "temperature.gpu", "power.draw")


def _gpu_index(values: Mapping[str, str], position: int) -> tuple[int, HostIssue | None]:
    """nvidia-smi's index for the row; its position among the rows when not queried or
    unreadable (with a warning in that case)."""
    if "index" not in values:
        return position, None
    index = parse_natural(values["index"])
    if index is not None and index in LIMITS["index"]:
        return index, None
    message = (
        f"GPU index {quoted_value(values['index'])} is not a GPU index ({LIMITS['index'].range_text}); "
        f"numbered {position} by its row position"
    )
    return position, HostIssue(HostErrorKind.UNPARSEABLE, message)


def _gpu_from_row(values: Mapping[str, str], index: int) -> tuple[Gpu, list[HostIssue]]:
    """One GPU from its cells; readings outside their physical range become unknown."""
    warnings: list[HostIssue] = []
    readings: dict[str, int | float | None] = {}
    for field in _GPU_READINGS:
        value, reason = reading_in(values.get(field), LIMITS[field])
        if reason is not None:
            warnings.append(bad_value(f"GPU {index}", field, values[field], reason))
        readings[field] = value
    used, total = readings["memory.used"], readings["memory.total"]
    if used is not None and total is not None and used > total:
        warnings.append(
            HostIssue(
                HostErrorKind.UNPARSEABLE,
                f"GPU {index}: memory.used {used} MiB is more than memory.total {total} MiB; both taken as unknown",
            )
        )
        readings["memory.used"] = readings["memory.total"] = None
    gpu = Gpu(
        index=index,
        uuid=parse_text(values.get("uuid")),
        name=parse_text(values.get("name")),
        pci_bus_id=parse_text(values.get("pci.bus_id")),
        utilization_percent=as_int(readings["utilization.gpu"]),
        memory_used_mib=as_int(readings["memory.used"]),
        memory_total_mib=as_int(readings["memory.total"]),
        temperature_c=as_int(readings["temperature.gpu"]),
        power_w=None if readings["power.draw"] is None else float(readings["power.draw"]),
        health=_gpu_health(values, index, warnings) if _HEALTH_KEYS & values.keys() else None,
    )
    return gpu, warnings


# ------------------------------------------------------------------------------------
# GPU health (the extra --query-gpu fields)

_HEALTH_KEYS = frozenset(names[0] for names in HEALTH_QUERY_FIELDS)
_HEALTH_COUNTS = {
    "ecc.errors.uncorrected.volatile.total": "ecc_uncorrected_volatile",
    "ecc.errors.uncorrected.aggregate.total": "ecc_uncorrected_aggregate",
    "retired_pages.double_bit.count": "retired_pages_double_bit",
}
_HEALTH_FLAGS = {
    "retired_pages.pending": ("retired_pages_pending", "Yes", "No"),
    "remapped_rows.pending": ("remapped_rows_pending", "Yes", "No"),
    "remapped_rows.failure": ("remapped_rows_failure", "Yes", "No"),
    "clocks_event_reasons.hw_slowdown": ("hw_slowdown", "Active", "Not Active"),
    "clocks_event_reasons.hw_thermal_slowdown": ("hw_thermal_slowdown", "Active", "Not Active"),
    "clocks_event_reasons.hw_power_brake_slowdown": ("hw_power_brake_slowdown", "Active", "Not Active"),
    "persistence_mode": ("persistence_mode", "Enabled", "Disabled"),
}
_VERSION_RE = re.compile(r"^[0-9]{1,4}(?:\.[0-9]{1,4}){0,3}$")


def _gpu_health(values: Mapping[str, str], index: int, warnings: list[HostIssue]) -> GpuHealth:
    """The health fields of one GPU row; ``[N/A]`` and absent fields are unknown, never 0 or "no"."""
    found: dict[str, object] = {}
    for field, attr in _HEALTH_COUNTS.items():
        value, reason = reading_in(values.get(field), LIMITS[field])
        if reason is not None:
            warnings.append(bad_value(f"GPU {index}", field, values[field], reason))
        found[attr] = as_int(value)
    for field, (attr, yes, no) in _HEALTH_FLAGS.items():
        cell = values.get(field)
        if cell is None:
            continue
        text = cell.strip()
        if unknown_text(text):
            continue
        if text in (yes, no):
            found[attr] = text == yes
        else:
            warnings.append(bad_value(f"GPU {index}", field, cell, f"is neither {yes} nor {no}"))
    version = values.get("driver_version")
    if version is not None and not is_unknown(version):
        if _VERSION_RE.match(version.strip()):
            found["driver_version"] = version.strip()
        else:
            warnings.append(bad_value(f"GPU {index}", "driver_version", version, "is not a driver version"))
    return GpuHealth(**found)  # type: ignore[arg-type]


def supported_health_fields(help_text: str) -> tuple[str, ...]:
    """The :data:`HEALTH_QUERY_FIELDS` a host's ``nvidia-smi --help-query-gpu`` lists, one name per
    reading (the current name where both are listed), in that order.

    The probe computes the same list on the host (``probe.gpu.HEALTH_AWK``) so that the poll that
    learns them can already ask for them; only names from the fixed list ever reach a query.
    """
    listed: set[str] = set()
    for line in split_lines(help_text):
        if line.startswith('"'):
            listed.update(re.findall(r'"([^"]*)"', line))
    chosen = []
    for names in HEALTH_QUERY_FIELDS:
        name = next((n for n in names if n in listed), None)
        if name is not None:
            chosen.append(name)
    return tuple(chosen)


def health_fields_from(text: str) -> tuple[str, ...]:
    """A comma-separated list printed by the probe, kept only where it names known health fields
    (anything else is dropped): what the host said it supports."""
    known = {name for names in HEALTH_QUERY_FIELDS for name in names}
    picked = [f.strip() for f in text.split(",") if f.strip() in known]
    return tuple(dict.fromkeys(picked))


_CUDA_RE = re.compile(r"^\s*\|?\s*(?:.*\s)?CUDA (?:UMD )?[Vv]ersion\s*:\s*([0-9]{1,3}(?:\.[0-9]{1,3}){0,2})\b")


def parse_cuda_version(text: str) -> str | None:
    """The CUDA version from ``nvidia-smi --version`` (``CUDA Version        : 13.1``; from driver
    610 ``CUDA UMD version    : 13.3``, its ``CUDA version`` line then says "Deprecated") or the
    default table's header (``CUDA Version: 13.1``, from 610 ``CUDA UMD Version: 13.3``); ``None``
    when neither is there (older drivers have no --version)."""
    for line in split_lines(text):
        match = _CUDA_RE.match(line)
        if match:
            return match.group(1)
    return None


def parse_query_gpu(
    text: str, fields: Sequence[str] | None = None, required: Sequence[str] = ()
) -> tuple[list[Gpu], list[HostIssue]]:
    """Parse ``nvidia-smi --query-gpu=... --format=csv[,noheader][,nounits]`` output.

    With a header, columns are found by name, in any order and among any number of
    other columns. Without one (``noheader``), ``fields`` names the queried fields in
    order. Unknown values become ``None``; so do values outside their physical range
    (:data:`LIMITS`), with a warning. ``index`` comes from nvidia-smi (the row position only
    when ``index`` was not queried or is unreadable); a GPU index or UUID listed twice keeps
    its first row, with a warning. Error lines mixed into the rows (a lost GPU) come back
    as issues beside the GPUs; if the whole output is an error, no GPUs and that one
    classified issue.
    """
    table = _gpu_table(text) if fields is None else read_table(text, fields, GPU_QUERY)
    return _gpus_of(table, required)


def _gpus_of(table: Table, required: Sequence[str]) -> tuple[list[Gpu], list[HostIssue]]:
    """:func:`parse_query_gpu` of an output whose table is read."""
    query = GPU_QUERY
    if table.columns is None:
        issues = no_columns_issues(table, query)
        if not issues:
            issues.append(HostIssue(HostErrorKind.UNPARSEABLE, "nvidia-smi --query-gpu printed nothing"))
        return [], issues

    columns = table.columns
    gpus: list[Gpu] = []
    warnings: list[HostIssue] = missing_columns(query, columns, required)
    seen_uuids: set[str] = set()
    for (position, line), placed in zip(table.rows, table.cells, strict=True):
        # As many cells as columns: read as split (``placed`` is that split, when it fits).
        if line.count(SEPARATOR) + 1 == len(columns):
            cells: Sequence[str] = placed if placed is not None else line.split(SEPARATOR)
        elif placed is not None:
            warnings.append(
                misfit(query, line, len(columns), "read the GPU name with ', ' from", HostErrorKind.UNPARSEABLE)
            )
            cells = placed
        else:
            warnings.append(misfit(query, line, len(columns), "skipped", HostErrorKind.UNPARSEABLE))
            continue
        values = dict(zip(columns, cells))
        index, index_issue = _gpu_index(values, position)
        if index_issue is not None:
            warnings.append(index_issue)
        if any(g.index == index for g in gpus):
            warnings.append(duplicate(f"GPU {index}", line))
            continue
        gpu, value_issues = _gpu_from_row(values, index)
        uuid = gpu.uuid.lower() if gpu.uuid else None
        if uuid is not None and uuid in seen_uuids:
            warnings.append(duplicate(f"the UUID of GPU {index}", line))
            continue
        if uuid is not None:
            seen_uuids.add(uuid)
        warnings += value_issues
        gpus.append(gpu)

    issues = error_issues(table.errors, len(gpus))
    if not gpus and not table.errors:
        if warnings:
            issues.append(
                HostIssue(
                    HostErrorKind.UNPARSEABLE,
                    "nvidia-smi --query-gpu printed no readable GPU row",
                )
            )
        else:
            issues.append(
                HostIssue(
                    HostErrorKind.NO_DEVICES,
                    "nvidia-smi --query-gpu printed a header but no GPU",
                )
            )
    return gpus, [*issues, *warnings]
