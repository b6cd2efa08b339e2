"""Turn the text a probe brought back from a host into records (the package of parsers).

This package owns: reading ``nvidia-smi --query-gpu`` and ``--query-compute-apps`` CSV
output; classifying nvidia-smi's error messages and exit codes into ``HostErrorKind``;
reading the two ``ps`` listings (``pid=,etimes=,uid=,user:64=`` for owners, older probes'
``pid=,user:64=,etimes=``; ``pid=,args=`` for command lines); joining compute apps to their GPU
and their ps owner; the physical range of every reading. It also owns the field lists the probe
queries (``GPU_QUERY_FIELDS``, ``APP_QUERY_FIELDS``, ``OWNERS_FORMAT``, ``ARGS_FORMAT``), so what is
asked and what is read cannot drift.

Pure functions over text: no I/O, nothing runs at import time. The parsers never raise
on odd input; what they cannot use becomes a ``HostIssue``.

Output from a host is data written by its users: a process name or a command line is
whatever its owner chose. So error messages are recognised only on lines that are not data
rows (a row that fits the header is data, whatever it says), one line is one record, a value
outside its physical range is unknown with a warning, and a record seen twice is kept once
with a warning. Owners are read from a listing that holds no user-written text at all.

What nvidia-smi CSV looks like (real captures in tests/fixtures/nvidia-smi):

- not quoted; cells are separated by ``", "``; ``process_name`` may contain ``", "``;
- the header names each column, with the unit in brackets: ``memory.used [MiB]``;
- values carry units unless ``nounits`` was given: ``11125 MiB``, ``45 %``, ``433.78 W``;
- missing values are bracketed tokens (``[N/A]``, ``[Not Supported]``,
  ``[Unknown Error]``, ...); a few fields print a bare ``N/A`` or nothing at all;
- error lines for one GPU can be mixed into the rows of the others (stderr is merged).

Where each part lives: :mod:`.values` (unknown tokens, numbers, ranges, bus ids, excerpts of bad
text), :mod:`.errors` (nvidia-smi's messages and exit codes), :mod:`.table` (the CSV table reader),
:mod:`.gpu` (``--query-gpu`` and health), :mod:`.apps` (``--query-compute-apps``), :mod:`.ps` (the
two ps listings), :mod:`.join` (apps to GPUs and owners). Host readings are read by
:mod:`gpuwatch.hostinfo`, cgroups and containers by :mod:`gpuwatch.attribution`.
"""

from __future__ import annotations

from .apps import APP_QUERY_FIELDS, compute_apps_failure, parse_compute_apps
from .errors import classify_nvidia_smi_error
from .gpu import (
    GPU_QUERY_FIELDS,
    HEALTH_QUERY_FIELDS,
    health_fields_from,
    parse_cuda_version,
    parse_query_gpu,
    query_gpu_failure,
    supported_health_fields,
)
from .join import attribute
from .ps import ARGS_FORMAT, OWNERS_FORMAT, PS_FORMAT, parse_owners, parse_ps, parse_ps_args
from .values import (
    LIMITS,
    MAX_COMMAND_CHARS,
    MAX_TEXT_CHARS,
    Limit,
    excerpt,
    is_unknown,
    normalize_bus_id,
    parse_float,
    parse_int,
    parse_text,
)

__all__ = [
    "APP_QUERY_FIELDS",
    "ARGS_FORMAT",
    "GPU_QUERY_FIELDS",
    "HEALTH_QUERY_FIELDS",
    "LIMITS",
    "MAX_COMMAND_CHARS",
    "MAX_TEXT_CHARS",
    "OWNERS_FORMAT",
    "PS_FORMAT",
    "Limit",
    "attribute",
    "classify_nvidia_smi_error",
    "compute_apps_failure",
    "excerpt",
    "health_fields_from",
    "is_unknown",
    "normalize_bus_id",
    "parse_compute_apps",
    "parse_cuda_version",
    "parse_float",
    "parse_int",
    "parse_owners",
    "parse_ps",
    "parse_ps_args",
    "parse_query_gpu",
    "parse_text",
    "query_gpu_failure",
    "supported_health_fields",
]
