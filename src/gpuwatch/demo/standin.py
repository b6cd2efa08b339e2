"""Stand-ins for ``nvidia-smi`` and ``ps`` that replay one demo host's scenario (``gpuwatch demo``).

Run as a script by the same Python as gpuwatch (``python -I -S standin.py nvidia-smi ARGS...`` or
``... ps ARGS...``) from the small wrappers the demo puts first on the probe's PATH; standard library
only, imports nothing of gpuwatch.
The scenario is the directory named by ``$GPUWATCH_DEMO_SCENARIO``, read on every call (the demo may
rewrite it between polls):

    query-gpu.csv      an all-fields ``--query-gpu`` capture: ``--query-gpu=F,... --format=csv[,noheader][,nounits]``
                       prints the requested columns of it, header cells and values byte for byte
    compute-apps.csv   the same for ``--query-compute-apps``
    error.txt          printed instead, with exit status ``exit_code`` (default 255)
    ps.tsv             ``pid<TAB>user<TAB>seconds running<TAB>command line`` per process: what ``ps -o ... -p``
                       prints for those pids (pids not listed are not printed, and ps exits 1, as ps does)

Any other nvidia-smi invocation prints nothing and exits 0.
"""

from __future__ import annotations

import os
import sys


def _fail(message: str) -> int:
    sys.stderr.write(f"demo stand-in: {message}\n")
    return 255


def _read(directory: str, name: str) -> bytes | None:
    try:
        with open(os.path.join(directory, name), "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        return None


def _option(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _split_row(line: str, n_columns: int, free_column: int | None) -> list[str]:
    """An unquoted nvidia-smi CSV row; the free column (process_name) may itself contain ', '."""
    parts = line.split(", ")
    if len(parts) == n_columns or free_column is None:
        return parts
    tail = n_columns - free_column - 1
    return [*parts[:free_column], ", ".join(parts[free_column : len(parts) - tail]), *parts[len(parts) - tail :]]


def _project(capture: bytes, fields: list[str], formats: set[str], free_name: str | None) -> tuple[bytes, str | None]:
    lines = capture.decode("utf-8", "surrogateescape").splitlines()
    header = lines[0].split(", ")
    names = [cell.split(" [", 1)[0] for cell in header]
    for field in fields:
        if field not in names:
            return b"", field
    columns = [names.index(field) for field in fields]
    free_column = names.index(free_name) if free_name in names else None
    nounits = "nounits" in formats
    out = []
    if "noheader" not in formats:
        out.append(", ".join(header[c].split(" [", 1)[0] if nounits else header[c] for c in columns))
    for line in lines[1:]:
        if not line:
            continue
        row = _split_row(line, len(header), free_column)
        cells = []
        for c in columns:
            value = row[c]
            unit = header[c][header[c].index(" [") + 2 : -1] if " [" in header[c] else None
            if nounits and unit and value.endswith(" " + unit):
                value = value[: -len(unit) - 1]
            cells.append(value)
        out.append(", ".join(cells))
    return "".join(line + "\n" for line in out).encode("utf-8", "surrogateescape"), None


def nvidia_smi(directory: str, argv: list[str]) -> int:
    error = _read(directory, "error.txt")
    if error is not None:
        sys.stdout.buffer.write(error)
        code = (_read(directory, "exit_code") or b"255").decode().strip()
        return int(code or "255")
    for option, name, free in (
        ("--query-gpu", "query-gpu.csv", None),
        ("--query-compute-apps", "compute-apps.csv", "process_name"),
    ):
        value = _option(argv, option)
        if value is None:
            continue
        capture = _read(directory, name)
        if capture is None:
            return _fail(f"scenario {directory} has no {name}")
        fields = [f.strip() for f in value.split(",") if f.strip()]
        formats = {f.strip() for f in (_option(argv, "--format") or "").split(",")}
        text, bad = _project(capture, fields, formats, free)
        if bad is not None:  # as the real nvidia-smi says it
            sys.stdout.write(f'Field "{bad}" is not a valid field to query.\n\n')
            return 2
        sys.stdout.buffer.write(text)
        return 0
    return 0


def ps(directory: str, argv: list[str]) -> int:
    wanted: set[str] = set()
    for chunk in (_option(argv, "-p") or "").replace(" ", ",").split(","):
        if chunk.strip().isdigit():
            wanted.add(chunk.strip())
    spec = _option(argv, "-o") or "pid,user,etimes,args"
    columns = [part.split("=", 1)[0].split(":", 1)[0] for part in spec.split(",")]
    table: dict[str, dict[str, str]] = {}
    for line in (_read(directory, "ps.tsv") or b"").decode().splitlines():
        cells = line.split("\t")
        if len(cells) == 4:
            table[cells[0]] = {"pid": cells[0], "user": cells[1], "etimes": cells[2], "args": cells[3]}
    found = 0
    for pid in sorted(wanted, key=int):
        row = table.get(pid)
        if row is None:
            continue
        found += 1
        sys.stdout.write(" ".join(row.get(column, "-") for column in columns) + "\n")
    return 0 if found == len(wanted) else 1


def main(argv: list[str]) -> int:
    directory = os.environ.get("GPUWATCH_DEMO_SCENARIO")
    if not directory or not argv:
        return _fail("GPUWATCH_DEMO_SCENARIO is not set, or no tool named")
    directory = os.path.realpath(directory)  # one scenario for the whole call, even if it is replaced meanwhile
    tool, args = argv[0], argv[1:]
    if tool == "nvidia-smi":
        return nvidia_smi(directory, args)
    if tool == "ps":
        return ps(directory, args)
    return _fail(f"unknown tool {tool!r}")


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BrokenPipeError:
        sys.exit(141)
