"""Mutation fuzzing of the probe output reader over the whole nvidia-smi corpus (tests and bench).

What this module owns
---------------------
* :func:`seeds`: every capture under tests/fixtures/nvidia-smi, raw (for the parsers) and built
  into whole probe outputs (for ``probe.snapshot_from_output``): each GPU capture with the
  compute-apps capture of the same machine, in the probe's own format (per-poll token, the probe's
  fields) and in the older format (no token, ``process_name`` asked, one ps listing with args); a
  4-GPU host stacked by tests/fleet.py; each error capture as nvidia-smi's whole answer; a
  streaming nvidia-smi cut on the host (the ``overflow`` section). The ps listings name the compute
  apps' pids (owners alice, verylongusername, root, a UID; in the probe's own format also ``john
  doe`` and ``josé``, named by the ``uids`` section; one pid unseen).
  One H100 output carries every other step too, from real captures: the host readings and df of
  tests/fixtures/host, the health fields of the all-fields capture, the cgroups of a Docker container
  and a Slurm v1 job (tests/fixtures/cgroup), getent, and docker inspect of a real container
  (tests/fixtures/container, its id set to the cgroup capture's: the one composed value).
* :func:`mutate`: 1 to 3 mutations per case: truncation; duplicated and swapped lines; swapped,
  duplicated and dropped cells (", " or blank separated); bracketed tokens; huge, negative and
  non-numbers; non-UTF-8 bytes (decoded with errors="replace", as the SSH layer does); and
  injections into text a user writes (command lines; names in the older format; below a container's
  cgroup, a container label: those without line breaks, which neither the kernel nor Go's JSON allow
  there): section markers, newlines with forged rows and owner lines, error texts, NUL, ANSI escapes,
  100 KB.
* :class:`Fuzz`: runs cases and counts what the issue asks for: exceptions escaping the reader,
  impossible or duplicate values accepted, and losses (a GPU, a reading, a process or an owner
  the unmutated output had) without a warning; plus, for injections into user text, any change
  to the host's classification, its GPUs, its processes or their owners.

Pure and in-process (no subprocess): 10,000 cases take seconds. ``python bench/fuzz.py`` runs more.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from fleet import H100_IDLE_QUERY, H100_LOAD_APPS, H100_LOAD_QUERY, _stack_gpus
from gpuwatch import parse, probe
from gpuwatch.model import Gpu, HostErrorKind, HostIssue, HostSnapshot

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "nvidia-smi"
HOST_FIXTURES = FIXTURES.parent / "host"
CGROUP_FIXTURES = FIXTURES.parent / "cgroup"
CONTAINER_FIXTURES = FIXTURES.parent / "container"
TOKEN = "0123456789abcdef0123456789abcdef"  # fixed, so a seed replays exactly
LEGACY_APP_FIELDS = (*parse.APP_QUERY_FIELDS, "process_name")
USERS = ("alice", "verylongusername", "root", "1001")
# The probe's own owners listing: (uid, the name getent gives or None, what ps prints under LC_ALL=C).
OWNERS = (
    (1002, "alice", "alice"),
    (1003, "verylongusername", "verylongusername"),
    (0, "root", "root"),
    (1001, None, "1001"),
    (1004, "john doe", "john doe"),
    (1005, "jos\u00e9", "jos??"),
)
MAX_MESSAGE = 600  # a warning quotes at most ~80 characters of what the host printed

# Exit status per error capture (FIELD_NOTES; as tests/fleet.py gives them).
ERROR_EXITS = {
    "issue-couldnt-communicate-with-driver.txt": 9,
    "issue-device-handle-gpu-is-lost.txt": 15,
    "issue-no-devices-were-found.txt": 6,
}


@dataclass(frozen=True)
class Seed:
    """One unmutated input: a whole probe output (``kind="probe"``) or one capture for a parser."""

    name: str
    kind: str  # "probe", "query-gpu", "compute-apps", "error"
    text: str
    token: str = ""
    fields: tuple[str, ...] | None = None  # noheader captures: the fields their command asked
    exit_code: int | None = None
    user_lines: tuple[int, ...] = ()  # line numbers holding user-written text (command lines)
    legacy: bool = False
    inline_lines: tuple[int, ...] = ()  # user-written text that cannot hold a line break (cgroups, labels)


# ------------------------------------------------------------------------------------
# seeds


def _cells(text: str) -> tuple[list[str], list[list[str]]]:
    lines = [line for line in text.split("\n") if line.strip()]
    head = lines[0].split(", ")
    names = [cell.split(" [", 1)[0] for cell in head]
    rows = []
    for line in lines[1:]:
        cells = line.split(", ")
        if len(cells) > len(head) and "process_name" in names:  # a name holding ", "
            free = names.index("process_name")
            tail = len(head) - free - 1
            cells = [*cells[:free], ", ".join(cells[free : len(cells) - tail]), *cells[len(cells) - tail :]]
        rows.append(cells)
    return head, rows


def _project(text: str, order: Iterable[str]) -> str:
    head, rows = _cells(text)
    names = [cell.split(" [", 1)[0] for cell in head]
    picks = [names.index(f) for f in order]
    out = [", ".join(head[i] for i in picks)] + [", ".join(row[i] for i in picks) for row in rows]
    return "\n".join(out) + "\n"


def _pids(apps_text: str) -> list[int]:
    head, rows = _cells(apps_text)
    column = [cell.split(" [", 1)[0] for cell in head].index("pid")
    return [int(row[column]) for row in rows]


def _commands(pids: list[int]) -> dict[int, str]:
    base = ("python3 train.py --epochs 90", "/root/tools/memhog 2560", "./gpu_burn 60", "ffmpeg -i in.mp4 out.mp4")
    return {pid: base[i % len(base)] for i, pid in enumerate(pids)}


def probe_text(gpu: str, apps: str, pids: list[int], *, token: str, legacy: bool) -> tuple[str, tuple[int, ...]]:
    """A probe output as the script prints it, and the numbers of its command-line lines."""
    seen = pids[:-1] if len(pids) > 1 else pids  # the last pid: one ps cannot see
    owners = {pid: USERS[i % len(USERS)] for i, pid in enumerate(seen)}
    commands = _commands(seen)
    suffix = f" {token}" if token else ""
    lines = [f"{probe.PROBE_MARKER}{suffix}", f"@@begin gpu{suffix}", *gpu.strip("\n").split("\n")]
    lines += ["", f"@@end gpu{suffix} 0", f"@@begin apps{suffix}", *apps.strip("\n").split("\n")]
    lines += ["", f"@@end apps{suffix} 0", f"@@begin ps{suffix}"]
    user_lines: list[int] = []
    if legacy:
        for pid, user in owners.items():
            user_lines.append(len(lines))
            lines.append(f"{pid:>7} {user:<64} {600 + pid % 1000:>7} {commands[pid]}")
        lines += ["", f"@@end ps{suffix} 0"]
    else:
        lines += _owners(list(owners), suffix)
    if not legacy and owners:
        lines.append(f"@@begin args{suffix}")
        for pid in owners:
            user_lines.append(len(lines))
            lines.append(f"{pid:>7} {commands[pid]}")
        lines += ["", f"@@end args{suffix} 0"]
    return "\n".join(lines) + "\n", tuple(user_lines)


def _owners(pids: list[int], suffix: str) -> list[str]:
    """The ps section as the probe prints it (``format`` line, ``pid etimes uid user``) and the
    ``uids`` section (``getent passwd`` of those uids)."""
    if not pids:
        return ["", f"@@end ps{suffix} 0"]
    lines = [f"format {parse.OWNERS_FORMAT}"]
    named: dict[int, str] = {}
    for i, pid in enumerate(pids):
        uid, name, shown = OWNERS[i % len(OWNERS)]
        lines.append(f"{pid:>7} {600 + pid % 1000:>7} {uid:>5} {shown}")
        if name is not None:
            named[uid] = name
    lines += ["", f"@@end ps{suffix} 0", f"@@begin uids{suffix}"]
    lines += [f"{name}:x:{uid}:{uid}::/home/{name}:/bin/sh" for uid, name in named.items()]
    return [*lines, "", f"@@end uids{suffix} {2 if len(named) < len(set(pids)) else 0}"]


def _command_fields(name: str) -> tuple[str, ...] | None:
    sources = (FIXTURES / "SOURCES.tsv").read_text(encoding="utf-8")
    for row in sources.split("\n"):
        if row.startswith(name + "\t") and "noheader" in row:
            match = re.search(r'--query-(?:gpu|compute-apps)="?([^" ]+)"?', row)
            return tuple(match.group(1).split(",")) if match else None
    return None


def seeds() -> list[Seed]:
    """Every capture of the corpus, raw and as probe outputs."""
    out: list[Seed] = []
    apps_dir, gpu_dir = FIXTURES / "csv-compute-apps", FIXTURES / "csv-query-gpu"
    header_only = (apps_dir / "nvgpuexp-h100-mig-linux-590.48.01-idle-compute-apps-header-only.csv").read_text()
    for path in sorted(gpu_dir.iterdir()):
        text = path.read_text(encoding="utf-8")
        fields = _command_fields(f"csv-query-gpu/{path.name}")
        out.append(Seed(path.name, "query-gpu", text, fields=fields))
        if fields is not None:
            continue  # no header: the probe always asks for one
        apps_path = apps_dir / path.name.replace("-query-gpu-all-fields.csv", "-compute-apps.csv")
        apps = apps_path.read_text(encoding="utf-8") if apps_path.exists() else header_only
        pids = _pids(apps)
        gpu = _project(text, parse.GPU_QUERY_FIELDS)
        own, user_lines = probe_text(gpu, _project(apps, parse.APP_QUERY_FIELDS), pids, token=TOKEN, legacy=False)
        out.append(Seed(f"probe:{path.name}", "probe", own, token=TOKEN, user_lines=user_lines))
        old, user_lines = probe_text(text, apps, pids, token="", legacy=True)  # all fields, capture order
        out.append(Seed(f"legacy:{path.name}", "probe", old, user_lines=user_lines, legacy=True))
    for path in sorted(apps_dir.iterdir()):
        out.append(Seed(path.name, "compute-apps", path.read_text(encoding="utf-8")))
    for path in sorted((FIXTURES / "errors").iterdir()):
        text = path.read_text(encoding="utf-8")
        code = ERROR_EXITS.get(path.name, 255)
        out.append(Seed(path.name, "error", text, exit_code=code))
        suffix = f" {TOKEN}"
        body = f"{probe.PROBE_MARKER}{suffix}\n@@begin gpu{suffix}\n{text.strip()}\n\n@@end gpu{suffix} {code}\n"
        out.append(Seed(f"probe:{path.name}", "probe", body, token=TOKEN))
    out.append(attributed_seed())
    # A 4-GPU H100 host (tests/fleet.py stacks real rows with distinct UUIDs and bus ids).
    rows = [(H100_LOAD_QUERY, 0), (H100_IDLE_QUERY, 0), (H100_LOAD_QUERY, 0), (H100_IDLE_QUERY, 0)]
    query, apps, _ = _stack_gpus(Path("fuzz-host"), rows, [(H100_LOAD_APPS, 0), (H100_LOAD_APPS, 2)])
    gpu = _project(query, parse.GPU_QUERY_FIELDS)
    own, user_lines = probe_text(gpu, _project(apps, parse.APP_QUERY_FIELDS), _pids(apps), token=TOKEN, legacy=False)
    out.append(Seed("probe:stacked-4xH100", "probe", own, token=TOKEN, user_lines=user_lines))
    # A streaming nvidia-smi, cut on the host: the GPU section closed with 141 and the overflow section.
    head = "\n".join(gpu.split("\n")[:2])
    cut = [f"{probe.PROBE_MARKER} {TOKEN}", *_section("gpu", head + "\ny\ny", 141)]
    cut += _section("overflow", "nvidia-smi --query-gpu\n" + "y\n" * 100)
    out.append(Seed("probe:overflow", "probe", "\n".join(cut) + "\n", token=TOKEN))
    return out


def _section(name: str, body: str, status: int | None = 0) -> list[str]:
    suffix = f" {TOKEN}"
    end = [f"@@end {name}{suffix} {status}"] if status is not None else []
    return [f"@@begin {name}{suffix}", *body.strip("\n").split("\n"), "", *end]


def attributed_seed() -> Seed:
    """The probe's whole output for an H100 whose processes run in a Docker container (alice's ps
    user) and a Slurm v1 job (root's ps user, uid 7319), with the host readings and health fields."""
    gpu_capture = FIXTURES / "csv-query-gpu" / "nvgpuexp-h100-80gb-hbm3-linux-590.48.01-load-query-gpu-all-fields.csv"
    apps_capture = FIXTURES / "csv-compute-apps" / "nvgpuexp-h100-80gb-hbm3-linux-590.48.01-load-compute-apps.csv"
    text = gpu_capture.read_text(encoding="utf-8")
    apps = apps_capture.read_text(encoding="utf-8")
    health = [names[0] for names in parse.HEALTH_QUERY_FIELDS]
    gpu = _project(text, (*parse.GPU_QUERY_FIELDS, *health))
    pids = _pids(apps)
    base, user_lines = probe_text(gpu, _project(apps, parse.APP_QUERY_FIELDS), pids, token=TOKEN, legacy=False)
    lines = base.rstrip("\n").split("\n")
    lines += _section("host", (HOST_FIXTURES / "host-section.txt").read_text(encoding="utf-8"))
    lines += _section("df", (HOST_FIXTURES / "df-l.txt").read_text(encoding="utf-8"))
    lines += _section("disks", (HOST_FIXTURES / "disks-section.txt").read_text(encoding="utf-8"))
    lines += _section("health", "asked " + ",".join(health))
    docker = (CGROUP_FIXTURES / "docker-v1-systemd-centos.txt").read_text(encoding="utf-8").split("\n")
    slurm = (CGROUP_FIXTURES / "slurm-v1-ex3-slurm21.txt").read_text(encoding="utf-8").split("\n")
    cgroup = [f"cg {pids[0]} {line}" for line in docker if line]
    cgroup += [f"cg {pids[1]} {line}" for line in slurm if line]
    cgroup += [f"gone {pids[2]}"]
    start = len(lines) + 1
    lines += _section("cgroup", "\n".join(cgroup))
    # Below a container's or a job's own cgroup is theirs to name: the end of each line.
    inline = [start + i for i, line in enumerate(cgroup) if ".scope" in line or "/step_0" in line]
    lines += _section("passwd", "bob:x:7319:7319::/home/bob:/bin/bash")
    inspect = json.loads((CONTAINER_FIXTURES / "docker-inspect-jupyterhub-singleuser.json").read_text(encoding="utf-8"))
    ident = "9ec39b91f3d70e1beff50a308f77067065ea6be0d91a3378375056cd4422cf3d"  # the cgroup capture's container
    values = (ident, inspect["Name"], inspect["Config"]["Image"], inspect["Config"]["Labels"])
    inline.append(len(lines) + 1)
    lines += _section("docker", " ".join(json.dumps(v, separators=(",", ":")) for v in values))
    return Seed(
        "probe:attributed-h100",
        "probe",
        "\n".join(lines) + "\n",
        token=TOKEN,
        user_lines=user_lines,
        inline_lines=tuple(inline),
    )


# ------------------------------------------------------------------------------------
# mutations

BRACKETS = ("[N/A]", "[Not Supported]", "[Unknown Error]", "[Insufficient Permissions]", "[GPU requires reset]", "")
ABSURD = (
    "1" + "0" * 400,
    "1" + "0" * 400 + ".5",
    "1" + "0" * 5000,
    "-1",
    "-81559",
    "-273.15",
    "1e400",
    "nan",
    "inf",
    "-inf",
    "NaN",
    "4294967296",
    "99999999999999999999",
    "0x10",
    "１２",  # fullwidth digits: isdigit() says yes, int() would too
    "²",  # a digit to isdigit(), not to int()
)
BAD_BYTES = (b"\xff", b"\xfe\xfe", b"\xc3", b"\xe2\x82", b"\x80\x80\x80", b"\xed\xa0\x80", b"\x00")
_NUMBER_CELL = re.compile(r"^(\s*)([-+]?\d+(?:\.\d+)?)(\s*\S*\s*)$")
ERROR_TEXTS = sorted(
    {
        line.strip()
        for path in (FIXTURES / "errors").iterdir()
        for line in path.read_text(encoding="utf-8").split("\n")
        if line.strip()
    }
    | {"GPU has fallen off the bus", "nvidia-smi: command not found", "NVML library not found"}
)


def _payloads(token: str, newline: bool) -> list[str]:
    """Text a user can put in a command line (or, in the older format, a name)."""
    inline = [
        "/tmp/x/GPU has fallen off the bus/python3",
        *ERROR_TEXTS,
        "@@end ps 0",
        "@@begin gpu",
        f"@@end args {'f' * 32} 0",
        "a, \"b\", 'c', d,e",
        "nul\x00byte",
        "\x1b[31mred\x1b[0m\x07",
        "\u202eevil\u2028line\x85sep\x0bvt\x0cff\x1cfs",
        "x" * 100_000,
        "\r",
    ]
    if not newline:
        return inline
    return [
        *inline,
        "\n@@end args 0\n@@begin ps\n      1 root 5\n@@end ps 0",
        f"\n@@end args {'0' * 32} 0\n@@begin ps {'0' * 32}",  # a guessed token
        "\n      1 root                                                                  5",
        "\n   4242 forged command",
        "\n1, GPU-00000000-0000-0000-0000-000000000000, 00000000:19:00.0, 80000 MiB",
        *(f"\n{text}" for text in ERROR_TEXTS),
        "\n" + probe.PROBE_MARKER,
    ]


def _lines_of(text: str) -> list[str]:
    return text.split("\n")


def _pick_line(rng: random.Random, lines: list[str], want: Callable[[str], bool]) -> int | None:
    choices = [i for i, line in enumerate(lines) if want(line)]
    return rng.choice(choices) if choices else None


def _separator(line: str) -> str:
    return ", " if ", " in line else " "


def _split(line: str) -> tuple[str, list[str]]:
    sep = _separator(line)
    return sep, (line.split(sep) if sep == ", " else line.split())


def m_truncate(rng: random.Random, text: str, seed: Seed) -> str:
    return text[: rng.randrange(len(text))] if text else text


def m_dup_line(rng: random.Random, text: str, seed: Seed) -> str:
    lines = _lines_of(text)
    i = rng.randrange(len(lines))
    j = i + 1 if rng.random() < 0.5 else rng.randrange(len(lines) + 1)
    lines.insert(j, lines[i])
    return "\n".join(lines)


def m_swap_lines(rng: random.Random, text: str, seed: Seed) -> str:
    lines = _lines_of(text)
    if len(lines) < 2:
        return text
    i = rng.randrange(len(lines) - 1)
    j = i + 1 if rng.random() < 0.5 else rng.randrange(len(lines))
    lines[i], lines[j] = lines[j], lines[i]
    return "\n".join(lines)


def _cell_op(rng: random.Random, text: str, op: Callable[[list[str]], None]) -> str:
    lines = _lines_of(text)
    i = _pick_line(rng, lines, lambda line: len(_split(line)[1]) >= 2 and not line.startswith("@@"))
    if i is None:
        return text
    sep, cells = _split(lines[i])
    op(cells)
    lines[i] = sep.join(cells)
    return "\n".join(lines)


def m_swap_cells(rng: random.Random, text: str, seed: Seed) -> str:
    def op(cells: list[str]) -> None:
        i, j = rng.randrange(len(cells)), rng.randrange(len(cells))
        cells[i], cells[j] = cells[j], cells[i]

    return _cell_op(rng, text, op)


def m_dup_cell(rng: random.Random, text: str, seed: Seed) -> str:
    def op(cells: list[str]) -> None:
        i = rng.randrange(len(cells))
        cells.insert(i, cells[i])

    return _cell_op(rng, text, op)


def m_drop_cell(rng: random.Random, text: str, seed: Seed) -> str:
    return _cell_op(rng, text, lambda cells: cells.pop(rng.randrange(len(cells))))


def _number_cells(lines: list[str]) -> list[tuple[int, int]]:
    found = []
    for i, line in enumerate(lines):
        if line.startswith("@@"):
            continue
        _, cells = _split(line)
        found += [(i, k) for k, cell in enumerate(cells) if _NUMBER_CELL.match(cell)]
    return found


def _replace_cell(rng: random.Random, text: str, make: Callable[[str], str], numbers_only: bool) -> str:
    lines = _lines_of(text)
    if numbers_only:
        targets = _number_cells(lines)
    else:
        targets = [
            (i, k)
            for i, line in enumerate(lines)
            if ", " in line and not line.startswith("@@")
            for k in range(len(line.split(", ")))
        ]
    if not targets:
        return text
    i, k = rng.choice(targets)
    sep, cells = _split(lines[i])
    cells[k] = make(cells[k])
    lines[i] = sep.join(cells)
    return "\n".join(lines)


def m_bracket(rng: random.Random, text: str, seed: Seed) -> str:
    return _replace_cell(rng, text, lambda cell: rng.choice(BRACKETS), numbers_only=False)


def m_number(rng: random.Random, text: str, seed: Seed) -> str:
    def make(cell: str) -> str:
        match = _NUMBER_CELL.match(cell)
        assert match
        return match.group(1) + rng.choice(ABSURD) + match.group(3)

    return _replace_cell(rng, text, make, numbers_only=True)


def m_bytes(rng: random.Random, text: str, seed: Seed) -> str:
    data = bytearray(text.encode("utf-8"))
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(data) + 1)
        bad = rng.choice(BAD_BYTES)
        if rng.random() < 0.5 and at < len(data):
            data[at : at + len(bad)] = bad
        else:
            data[at:at] = bad
    return bytes(data).decode("utf-8", "replace")


def m_inject(rng: random.Random, text: str, seed: Seed) -> str:
    """User-written text into a command line (older format: also a process name, no newline:
    nvidia-smi's raw name is why the probe stopped asking for it)."""
    lines = _lines_of(text)
    if seed.legacy and rng.random() < 0.5:
        head = lines.index("@@begin apps") + 1  # the capture's header, process_name in the middle
        rows = range(head + 1, lines.index("@@end apps 0") - 1)
        if rows:
            i = rng.choice(rows)
            column = lines[head].split(", ").index("process_name")
            cells = lines[i].split(", ")
            cells[column] += rng.choice(_payloads(seed.token, newline=False))
            lines[i] = ", ".join(cells)
            return "\n".join(lines)
    if seed.inline_lines and rng.random() < 0.5:
        i = rng.choice(seed.inline_lines)
        payload = rng.choice(_payloads(seed.token, newline=False))
        if lines[i].startswith("{") or lines[i].startswith('"'):  # docker inspect: inside a label's JSON string
            escaped = json.dumps(payload)[1:-1]
            lines[i] = lines[i].replace('"Jupyter Project', f'"{escaped}Jupyter Project', 1)
        else:
            lines[i] += "/" + payload
        return "\n".join(lines)
    if not seed.user_lines:
        return text
    i = rng.choice(seed.user_lines)
    # The older format's command lines share the owners' listing: it relied on ps escaping
    # newlines (procps does); the probe's own format does not, so it gets raw newlines too.
    lines[i] += rng.choice(_payloads(seed.token, newline=not seed.legacy))
    return "\n".join(lines)


MUTATIONS: dict[str, Callable[[random.Random, str, Seed], str]] = {
    "truncate": m_truncate,
    "dup_line": m_dup_line,
    "swap_lines": m_swap_lines,
    "swap_cells": m_swap_cells,
    "dup_cell": m_dup_cell,
    "drop_cell": m_drop_cell,
    "bracket": m_bracket,
    "number": m_number,
    "bytes": m_bytes,
    "inject": m_inject,
}


def loss_must_warn(names: tuple[str, ...], seed: Seed) -> bool:
    """Must a loss after these mutations come with a warning?

    Not after a bracketed token or an empty cell (nvidia-smi's own "unknown"), nor after cells
    swapped, or two cells added or removed (a header and its row both one short: cells
    shifted): that can make a plausible row (GPU 0 at 41 C read as GPU 41 at 0 C); only the
    range and uniqueness checks apply then. A parser given one capture cannot see a line or a column that is not there
    (only the probe's markers can), so for it only damaged values must warn. In the older
    format (and raw compute-apps captures) a replaced newline merges two rows into the free
    ``process_name`` column: undetectable, and why the probe no longer asks for it; the same
    in a capture with no header and no index ("[N/A], [N/A]" rows).
    """
    shifts = sum(name in ("dup_cell", "drop_cell") for name in names)
    if "bracket" in names or "swap_cells" in names or shifts >= 2:
        return False
    if "bytes" in names and (seed.legacy or seed.kind == "compute-apps" or seed.fields is not None):
        return False
    if seed.kind != "probe":
        return set(names) <= {"number", "bytes", "dup_line", "swap_lines"}
    return True


def mutate(rng: random.Random, seed: Seed) -> tuple[str, tuple[str, ...]]:
    """1 to 3 mutations of ``seed``: (the mutated text, their names). An injection is alone."""
    if (seed.user_lines or seed.inline_lines) and rng.random() < 0.15:
        return m_inject(rng, seed.text, seed), ("inject",)
    names = tuple(rng.choice([n for n in MUTATIONS if n != "inject"]) for _ in range(rng.choice((1, 1, 2, 3))))
    text = seed.text
    for name in names:
        text = MUTATIONS[name](rng, text, seed)
    return text, names


# ------------------------------------------------------------------------------------
# checks


def _message_ok(issue: HostIssue | str | None) -> bool:
    text = issue.message if isinstance(issue, HostIssue) else issue
    return text is None or ("\n" not in text and len(text) <= MAX_MESSAGE)


def gpu_violations(gpus: Iterable[Gpu]) -> list[str]:
    """Impossible or duplicate values among GPUs a reader accepted."""
    found: list[str] = []
    limits = parse.LIMITS
    indices: set[int] = set()
    uuids: set[str] = set()
    for gpu in gpus:
        if gpu.index not in limits["index"]:
            found.append(f"GPU index {gpu.index} out of range")
        if gpu.index in indices:
            found.append(f"GPU index {gpu.index} twice")
        indices.add(gpu.index)
        if gpu.uuid is not None:
            if gpu.uuid.lower() in uuids:
                found.append(f"GPU UUID {gpu.uuid} twice")
            uuids.add(gpu.uuid.lower())
        for attr, name in (
            ("utilization_percent", "utilization.gpu"),
            ("memory_used_mib", "memory.used"),
            ("memory_total_mib", "memory.total"),
            ("temperature_c", "temperature.gpu"),
            ("power_w", "power.draw"),
        ):
            value = getattr(gpu, attr)
            if value is not None and (not math.isfinite(value) or value not in limits[name]):
                found.append(f"GPU {gpu.index} {name} {value!r} out of range")
        if gpu.memory_used_mib is not None and gpu.memory_total_mib is not None:
            if gpu.memory_used_mib > gpu.memory_total_mib:
                found.append(f"GPU {gpu.index} memory used > total")
        for text in (gpu.uuid, gpu.name, gpu.pci_bus_id):
            if text is not None and ("\n" in text or len(text) > parse.MAX_TEXT_CHARS):
                found.append(f"GPU {gpu.index} text field not one bounded line")
    return found


def snapshot_violations(snap: HostSnapshot) -> list[str]:
    found: list[str] = []
    try:
        json.dumps(asdict(snap), allow_nan=False)
    except ValueError as exc:
        found.append(f"not strict JSON: {exc}")
    if not _message_ok(snap.error) or not all(_message_ok(w) for w in snap.warnings):
        found.append("a message is not one bounded line")
    if len(snap.warnings) > probe.MAX_WARNINGS + len(HostErrorKind):
        found.append(f"{len(snap.warnings)} warnings")
    if not snap.ok:
        if snap.gpus or snap.processes:
            found.append("a failed host with data")
        return found
    found += gpu_violations(snap.gpus)
    totals = {g.index: g.memory_total_mib for g in snap.gpus}
    keys: set[tuple[int, str]] = set()
    for proc in snap.processes:
        if proc.pid not in parse.LIMITS["pid"]:
            found.append(f"pid {proc.pid} out of range")
        if proc.gpu_uuid is not None:
            key = (proc.pid, proc.gpu_uuid.lower())
            if key in keys:
                found.append(f"process {proc.pid} twice on {proc.gpu_uuid}")
            keys.add(key)
        memory = proc.used_memory_mib
        if memory is not None and memory not in parse.LIMITS["used_gpu_memory"]:
            found.append(f"process {proc.pid} memory {memory} out of range")
        total = totals.get(proc.gpu_index) if proc.gpu_index is not None else None
        if memory is not None and total is not None and memory > total:
            found.append(f"process {proc.pid} holds more memory than its GPU has")
        if proc.runtime_seconds is not None and proc.runtime_seconds not in parse.LIMITS["etimes"]:
            found.append(f"process {proc.pid} runtime out of range")
        for text in (proc.user, proc.name, proc.command):
            if text is not None and "\n" in text:
                found.append(f"process {proc.pid} has a newline in a text field")
    return found


def _gpu_readings(snap: HostSnapshot) -> dict[tuple[int, str], object]:
    return {
        (g.index, attr): getattr(g, attr)
        for g in snap.gpus
        for attr in ("utilization_percent", "memory_used_mib", "memory_total_mib", "temperature_c", "power_w")
    }


def losses(before: HostSnapshot, after: HostSnapshot) -> list[str]:
    """What ``before`` knew that ``after`` (also ok) does not: GPUs, readings, processes, owners."""
    lost: list[str] = []
    now = _gpu_readings(after)
    indices = {g.index for g in after.gpus}
    for (index, attr), value in _gpu_readings(before).items():
        if index not in indices:
            lost.append(f"GPU {index}")
        elif value is not None and now[(index, attr)] is None:
            lost.append(f"GPU {index} {attr}")
    owners: dict[int, set[str | None]] = {}
    attributed: dict[int, set[str | None]] = {}
    for proc in after.processes:
        owners.setdefault(proc.pid, set()).add(proc.user)
        if proc.cgroup_note is None:  # a process whose cgroup was not used says so
            attributed.setdefault(proc.pid, set()).add(proc.owner)
    for proc in before.processes:
        if proc.pid not in owners:
            lost.append(f"process {proc.pid}")
        elif proc.user is not None and owners[proc.pid] == {None}:
            lost.append(f"owner of {proc.pid}")
        elif proc.owner_source is not None and proc.pid in attributed and proc.owner not in attributed[proc.pid]:
            lost.append(f"the person behind {proc.pid}")
    if before.context is not None and before.context.disks and after.context is not None and not after.context.disks:
        lost.append("disks")
    return sorted(set(lost))


def injection_changes(before: HostSnapshot, after: HostSnapshot) -> list[str]:
    """User-written text may add a warning about command lines, and change nothing else."""
    changed = []
    if (before.ok, before.error_kind, before.gpus) != (after.ok, after.error_kind, after.gpus):
        changed.append("the host's state or GPUs")
    if sorted((p.pid, p.gpu_index, p.user, p.owner, p.owner_source) for p in before.processes) != sorted(
        (p.pid, p.gpu_index, p.user, p.owner, p.owner_source) for p in after.processes
    ):
        changed.append("processes or owners")
    if [(c.container.runtime, c.container.id) for c in before.processes if c.container] != [
        (c.container.runtime, c.container.id) for c in after.processes if c.container
    ] or [p.slurm_job for p in before.processes] != [p.slurm_job for p in after.processes]:
        changed.append("containers or jobs")
    if (before.context is None) != (after.context is None) or (
        before.context is not None and after.context is not None and before.context.disks != after.context.disks
    ):
        changed.append("the host's context")
    kinds = {w.kind for w in after.warnings} - {w.kind for w in before.warnings}
    if kinds - {HostErrorKind.UNPARSEABLE}:
        changed.append(f"warnings of kind {sorted(k.value for k in kinds)}")
    return changed


# ------------------------------------------------------------------------------------
# running


@dataclass
class Fuzz:
    """Counts over many cases; ``examples`` keeps the first few of each violation."""

    cases: int = 0
    exceptions: int = 0
    impossible: int = 0  # cases with an impossible or duplicate value accepted
    silent_losses: int = 0  # cases that lost data without a warning or a failure
    injections: int = 0
    injection_changes: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    mutations: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def _example(self, what: str, seed: Seed, names: tuple[str, ...], case_seed: int) -> None:
        if len(self.examples) < 20:
            self.examples.append(f"{what}: seed {seed.name}, mutations {names}, case seed {case_seed}")

    def run(self, cases: int, seed: int, corpus: list[Seed] | None = None) -> Fuzz:
        corpus = corpus if corpus is not None else seeds()
        baselines = {s.name: _read(s)[0] for s in corpus}
        master = random.Random(seed)
        for _ in range(cases):
            case_seed = master.randrange(2**32)
            rng = random.Random(case_seed)
            chosen = rng.choice(corpus)
            text, names = mutate(rng, chosen)
            self.cases += 1
            self.mutations.update(names)
            try:
                result, problems = _read(replace(chosen, text=text))
            except Exception as exc:  # what the issue counts: nothing may escape the reader
                self.exceptions += 1
                self._example(f"exception {type(exc).__name__}: {exc}"[:200], chosen, names, case_seed)
                continue
            if problems:
                self.impossible += 1
                self._example(f"accepted {problems[:3]}", chosen, names, case_seed)
            baseline = baselines[chosen.name]
            if isinstance(result, HostSnapshot) and isinstance(baseline, HostSnapshot):
                self.outcomes[_outcome(result)] += 1
                if "inject" in names:
                    self.injections += 1
                    changed = injection_changes(baseline, result)
                    if changed:
                        self.injection_changes += 1
                        self._example(f"injection changed {changed}", chosen, names, case_seed)
                if baseline.ok and result.ok and not result.warnings and loss_must_warn(names, chosen):
                    lost = losses(baseline, result)
                    if lost:
                        self.silent_losses += 1
                        self._example(f"lost without a warning {lost[:3]}", chosen, names, case_seed)
            else:
                self.outcomes[f"{chosen.kind}"] += 1
                if isinstance(result, tuple) and isinstance(baseline, tuple) and not result[1]:
                    if loss_must_warn(names, chosen) and _parsed_losses(baseline[0], result[0]):
                        self.silent_losses += 1
                        self._example("parser lost records without an issue", chosen, names, case_seed)
        return self

    def summary(self) -> str:
        lines = [
            f"cases: {self.cases}",
            f"exceptions escaping the reader: {self.exceptions}",
            f"impossible or duplicate values accepted: {self.impossible}",
            f"data lost without a warning: {self.silent_losses}",
            f"injections into user text: {self.injections}, that changed the host's report: {self.injection_changes}",
            "outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items())),
            "mutations: " + ", ".join(f"{k} {v}" for k, v in sorted(self.mutations.items())),
        ]
        return "\n".join(lines + [f"  e.g. {e}" for e in self.examples])


def _outcome(snap: HostSnapshot) -> str:
    if not snap.ok:
        return f"failed:{snap.error_kind.value if snap.error_kind else '?'}"
    kinds = sorted({w.kind.value for w in snap.warnings})
    return "ok:" + ("+".join(kinds) if kinds else "clean")


def _parsed_losses(before: list[object], after: list[object]) -> bool:
    """Raw parser runs: fewer records, or a reading that became unknown."""
    if len(after) < len(before):
        return True
    for old, new in zip(before, after):
        for attr, value in vars(old).items():
            if value is not None and getattr(new, attr, None) is None:
                return True
    return False


_Result = HostSnapshot | tuple[list[object], list[HostIssue]] | HostIssue | None


def _read(seed: Seed) -> tuple[_Result, list[str]]:
    """Run the reader a seed is for (unguarded: an exception here is a finding) and check it."""
    if seed.kind == "probe":
        snap = probe.assemble_snapshot("fuzz", "fuzz", seed.text, "", None, 30.0, seed.token)
        return snap, snapshot_violations(snap)
    if seed.kind == "query-gpu":
        gpus, issues = parse.parse_query_gpu(seed.text, seed.fields)
        bad = gpu_violations(gpus) + [i.message[:80] for i in issues if not _message_ok(i)]
        return (list(gpus), issues), bad
    if seed.kind == "compute-apps":
        apps, issues = parse.parse_compute_apps(seed.text, seed.fields)
        memory = parse.LIMITS["used_gpu_memory"]
        bad = [f"pid {a.pid} out of range" for a in apps if a.pid not in parse.LIMITS["pid"]]
        bad += [
            f"process {a.pid} memory" for a in apps if a.used_memory_mib is not None and a.used_memory_mib not in memory
        ]
        keys = [(a.pid, a.gpu_uuid.lower() if a.gpu_uuid else parse.normalize_bus_id(a.gpu_bus_id)) for a in apps]
        if len(set(keys)) != len(keys):
            bad.append("a process twice")
        bad += [i.message[:80] for i in issues if not _message_ok(i)]
        return (list(apps), issues), bad
    issue = parse.classify_nvidia_smi_error(seed.text, seed.exit_code)
    return issue, ([] if _message_ok(issue) else ["a message is not one bounded line"])
