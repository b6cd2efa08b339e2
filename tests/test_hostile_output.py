"""What a user on a GPU host, a broken nvidia-smi or a cut connection can make gpuwatch report.

Output from a host is data written by its users: a process name or a command line is whatever its
owner chose. These tests try every way in we could think of (error texts, newlines, section markers,
commas, quotes, 100 KB names, NUL, ANSI escapes, non-UTF-8 bytes) and check that none of them changes
a host's classification, another process's owner, or the structure of the probe output; and that
whatever one host prints (huge, negative, duplicate or cut-short values) comes back as that host's
snapshot, with a warning for what was dropped or made unknown, never as an exception.

Every output is built from the real captures in tests/fixtures (stacked into multi-GPU hosts by
tests/fleet.py, which rewrites only index/uuid/bus-id cells); each test says which cells it edits.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

from fleet import (
    H100_IDLE_QUERY,
    H100_LOAD_APPS,
    H100_LOAD_QUERY,
    STANDIN_EXE,
    _stack_gpus,
    capture_pids,
    scenario_healthy_multi_gpu,
    standin_env,
)
from gpuwatch.model import HostErrorKind, HostSnapshot
from gpuwatch.parse import APP_QUERY_FIELDS, GPU_QUERY_FIELDS, MAX_COMMAND_CHARS, MAX_TEXT_CHARS, parse_compute_apps
from gpuwatch.probe import build_script, snapshot_from_output

FIXTURES = Path(__file__).parent / "fixtures" / "nvidia-smi"
ERROR_LINES = sorted(
    {
        line.strip()
        for path in (FIXTURES / "errors").iterdir()
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip()
    }
)
# Texts the error classifier also knows, from the issue and FIELD_NOTES (no capture holds them).
KNOWN_ERROR_TEXTS = [
    "GPU has fallen off the bus",
    "nvidia-smi: command not found",
    "libnvidia-ml.so.1: cannot open shared object file: No such file or directory",
    "NVML library not found",
    "infoROM is corrupted at gpu 0000:0B:00.0",
    "Insufficient Permissions",
    "timeout: failed to run command 'nvidia-smi': No such file or directory",
]
H100_PIDS = capture_pids(H100_LOAD_APPS)  # [11327, 11328, 11345]
ME = pwd.getpwuid(os.getuid()).pw_name


# ------------------------------------------------------------------------------------
# outputs built from real captures


def _project(text: str, order: Sequence[str]) -> str:
    """A capture's columns picked by header name in ``order`` (cells byte for byte)."""
    lines = [line for line in text.split("\n") if line.strip()]
    head = lines[0].split(", ")
    names = [cell.split(" [", 1)[0] for cell in head]
    picks = [names.index(field) for field in order]
    out = [", ".join(head[i] for i in picks)]
    out += [", ".join(line.split(", ")[i] for i in picks) for line in lines[1:]]
    return "\n".join(out) + "\n"


@dataclass(frozen=True)
class Host:
    """Two H100s stacked from the real load/idle rows, the load capture's 3 processes on GPU 0."""

    query: str  # the probe's --query-gpu output
    apps: str  # the probe's --query-compute-apps output

    @classmethod
    def h100(cls, n_gpus: int = 2) -> Host:
        rows = [(H100_LOAD_QUERY, 0)] + [(H100_IDLE_QUERY, 0)] * (n_gpus - 1)
        query, apps, _ = _stack_gpus(Path("gpu-a"), rows, [(H100_LOAD_APPS, 0)])
        return cls(_project(query, GPU_QUERY_FIELDS), _project(apps, APP_QUERY_FIELDS))


def ps_line(pid: int, user: str, elapsed: int, args: str = "") -> str:
    """One line as ``ps -o pid=,user:64=,etimes=,args=`` lays it out."""
    return f"{pid:>7} {user:<64} {elapsed:>7} {args}".rstrip() + "\n"


def legacy_output(host: Host, ps_text: str, *, apps: str | None = None) -> str:
    """What the probe printed before per-poll tokens (markers without a token)."""
    return (
        "@@gpuwatch-probe 1\n@@begin gpu\n"
        + host.query
        + "\n@@end gpu 0\n@@begin apps\n"
        + (host.apps if apps is None else apps)
        + "\n@@end apps 0\n@@begin ps\n"
        + ps_text
        + "\n@@end ps 0\n"
    )


def owners(snap: HostSnapshot) -> dict[int, str | None]:
    return {p.pid: p.user for p in snap.processes}


def gpu_error_warnings(snap: HostSnapshot) -> list[str]:
    lost = (HostErrorKind.GPU_LOST, HostErrorKind.DRIVER_NOT_LOADED, HostErrorKind.DRIVER_MISMATCH)
    return [w.message for w in snap.warnings if w.kind in lost]


def assert_strict_json(snap: HostSnapshot) -> None:
    json.dumps(asdict(snap), allow_nan=False)


# ------------------------------------------------------------------------------------
# user-controlled text in the legacy process_name column never classifies the host


@pytest.mark.parametrize("error_line", ERROR_LINES + KNOWN_ERROR_TEXTS)
def test_error_text_in_a_process_name_is_data(error_line: str) -> None:
    # The probe's own column order, process_name last (older probes asked for it): the real
    # H100 rows with pid 11327's name replaced by a path holding a real error line.
    host = Host.h100()
    header, *rows = host.apps.strip().split("\n")
    header += ", process_name"
    hostile = f"/tmp/x/{error_line}/python3"
    rows = [rows[0] + ", " + hostile, *(row + ", /root/tools/memhog" for row in rows[1:])]
    apps_text = "\n".join([header, *rows]) + "\n"
    apps, issues = parse_compute_apps(apps_text)
    assert issues == []
    assert apps[0].process_name == hostile

    ps = ps_line(H100_PIDS[0], "alice", 600, hostile + " --epochs 90")
    snap = snapshot_from_output("gpu-a", "gpu-a", legacy_output(host, ps, apps=apps_text))
    assert snap.ok, snap.error
    assert snap.warnings == ()
    assert owners(snap)[H100_PIDS[0]] == "alice"


# ------------------------------------------------------------------------------------
# one host's values: huge, negative, impossible, duplicate


def _with_cell(host: Host, gpu: int, field: str, value: str) -> Host:
    lines = host.query.strip().split("\n")
    column = GPU_QUERY_FIELDS.index(field)
    cells = lines[1 + gpu].split(", ")
    cells[column] = value
    lines[1 + gpu] = ", ".join(cells)
    return Host("\n".join(lines) + "\n", host.apps)


HUGE = "1" + "0" * 400


def _value_id(value: object) -> str:
    text = str(value)
    return text if len(text) < 20 else f"{text[:8]}...({len(text)} chars)"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("memory.used", f"{HUGE} MiB"),  # 1 and 400 zeros
        ("memory.used", f"{HUGE}.5 MiB"),
        ("memory.used", "1" + "0" * 5000 + " MiB"),
        ("memory.total", f"{HUGE} MiB"),
        ("power.draw", f"{HUGE} W"),
        ("power.draw", f"{HUGE}.25 W"),
        ("temperature.gpu", HUGE),
        ("utilization.gpu", f"{HUGE} %"),
        ("memory.used", "-5 MiB"),
        ("memory.total", "-81559 MiB"),
        ("temperature.gpu", "-40"),
        ("power.draw", "-631.95 W"),
        ("utilization.gpu", "101 %"),
        ("utilization.gpu", "-1 %"),
        ("memory.used", "81560 MiB"),  # more than the GPU's 81559 MiB total
        ("memory.used", "19818 W"),  # a value in another field's unit (columns swapped)
        ("power.draw", "nan W"),
        ("power.draw", "inf W"),
        ("memory.used", "1e400 MiB"),
        ("memory.used", "\ufffd\ufffd MiB"),  # non-UTF-8 bytes, decoded with errors="replace"
    ],
    ids=_value_id,
)
def test_impossible_value_is_unknown_with_a_warning(field: str, value: str) -> None:
    ps = ps_line(H100_PIDS[0], "alice", 600, "x")
    baseline = snapshot_from_output("gpu-a", "gpu-a", legacy_output(Host.h100(), ps))
    host = _with_cell(Host.h100(), 0, field, value)
    snap = snapshot_from_output("gpu-a", "gpu-a", legacy_output(host, ps))
    assert snap.ok, snap.error
    assert [g.index for g in snap.gpus] == [0, 1]
    gpu = snap.gpus[0]
    attribute = {
        "memory.used": "memory_used_mib",
        "memory.total": "memory_total_mib",
        "power.draw": "power_w",
        "temperature.gpu": "temperature_c",
        "utilization.gpu": "utilization_percent",
    }[field]
    assert getattr(gpu, attribute) is None
    assert snap.gpus[1] == baseline.gpus[1]
    (warning,) = [w for w in snap.warnings if field in w.message]
    assert warning.kind is HostErrorKind.UNPARSEABLE
    assert "GPU 0" in warning.message
    assert len(warning.message) < 300  # the value is quoted, at most about 80 characters of it
    assert_strict_json(snap)


def test_duplicate_gpu_rows_are_dropped_with_a_warning() -> None:
    ps = ps_line(H100_PIDS[0], "alice", 600, "x")
    host = Host.h100(3)
    head, row0, row1, row2 = host.query.strip().split("\n")
    same_index = row0.replace(row0.split(", ")[1], row2.split(", ")[1])  # GPU 0 again, other UUID
    same_uuid = "2" + row1[1:]  # index 2, GPU 1's UUID
    for rows, expected in (
        ([row0, row1, row0], [0, 1]),  # a line printed twice
        ([row0, row1, same_index], [0, 1]),
        ([row0, row1, same_uuid], [0, 1]),
    ):
        text = "\n".join([head, *rows]) + "\n"
        snap = snapshot_from_output("gpu-a", "gpu-a", legacy_output(Host(text, host.apps), ps))
        assert snap.ok
        assert [g.index for g in snap.gpus] == expected
        assert len({g.uuid for g in snap.gpus}) == len(snap.gpus)
        assert any("twice" in w.message for w in snap.warnings), snap.warnings


def test_duplicate_process_row_is_dropped_with_a_warning() -> None:
    host = Host.h100()
    head, first, *rest = host.apps.strip().split("\n")
    apps = "\n".join([head, first, *rest, first]) + "\n"
    ps = ps_line(H100_PIDS[0], "alice", 600, "x")
    snap = snapshot_from_output("gpu-a", "gpu-a", legacy_output(host, ps, apps=apps))
    assert snap.ok
    assert sorted(p.pid for p in snap.processes) == sorted(H100_PIDS)
    assert any("twice" in w.message for w in snap.warnings)


def test_ps_cut_short_makes_processes_unknown_not_silently_ownerless() -> None:
    """The connection dropped while ps was printing: no end marker. Owners are unknown, and the
    rules must see it (a probe_failed warning), not an ok host whose every owner is unknown."""
    host = Host.h100()
    output = legacy_output(host, "").rsplit("@@end ps", 1)[0]
    snap = snapshot_from_output("gpu-a", "gpu-a", output)
    assert snap.ok
    assert {p.user for p in snap.processes} == {None}
    assert [w.kind for w in snap.warnings] == [HostErrorKind.PROBE_FAILED]
    assert "ps" in snap.warnings[0].message


def test_ps_line_for_another_users_pid_makes_that_owner_unknown() -> None:
    """A ps that printed a newline of a command line raw would give a second line for a pid; the
    later line must not win (it may be a user's forgery): the owner becomes unknown, with a warning
    that the rules read as 'processes not known'."""
    host = Host.h100()
    forged = "train.py\n" + ps_line(H100_PIDS[0], "bob", 5, "x").rstrip("\n")
    ps = ps_line(H100_PIDS[0], "alice", 600, "python3 train.py") + ps_line(H100_PIDS[1], "bob", 600, forged)
    snap = snapshot_from_output("gpu-a", "gpu-a", legacy_output(host, ps))
    assert snap.ok
    assert owners(snap)[H100_PIDS[0]] != "bob"
    assert HostErrorKind.PROBE_FAILED in {w.kind for w in snap.warnings}


# ------------------------------------------------------------------------------------
# the real probe script, a real process with a hostile argv, and an nvidia-smi that reports
# process names as the real one does


# Wraps the stand-in (tests/standin/nvidia-smi): when process_name is queried, each row's name is the
# real argv[0] of the process with that pid, as nvidia-smi reports it (raw: newlines, commas, ...).
_REAL_NAMES_SMI = """\
import subprocess, sys
args = sys.argv[1:]
done = subprocess.run([{standin!r}, *args], capture_output=True)
query = next((a.split("=", 1)[1] for a in args if a.startswith("--query-compute-apps=")), "")
fields = query.split(",")
if done.returncode or "process_name" not in fields:
    sys.stdout.buffer.write(done.stdout)
    sys.stderr.buffer.write(done.stderr)
    sys.exit(done.returncode)
out = []
for line in done.stdout.split(b"\\n"):
    cells = line.split(b", ")  # the H100 capture's names hold no ", "
    if len(cells) == len(fields) and cells[fields.index("pid")].isdigit():
        try:
            with open(b"/proc/" + cells[fields.index("pid")] + b"/cmdline", "rb") as handle:
                cells[fields.index("process_name")] = handle.read().split(b"\\0")[0]
        except OSError:
            pass
    out.append(b", ".join(cells))
sys.stdout.buffer.write(b"\\n".join(out))
"""


@pytest.fixture
def real_names_smi(tmp_path: Path) -> Path:
    """A directory whose ``nvidia-smi`` reports real process names (see _REAL_NAMES_SMI)."""
    bin_dir = tmp_path / "real-names-bin"
    bin_dir.mkdir()
    exe = bin_dir / "nvidia-smi"
    exe.write_text(f"#!{sys.executable}\n" + _REAL_NAMES_SMI.format(standin=str(STANDIN_EXE)))
    exe.chmod(0o755)
    return bin_dir


@pytest.fixture
def hostile_process() -> Iterator[object]:
    """Starts ``/bin/sleep`` with a chosen argv[0]; killed at the end of the test."""
    started: list[subprocess.Popen[bytes]] = []

    def start(argv0: str) -> int:
        proc = subprocess.Popen([argv0, "600"], executable="/bin/sleep", start_new_session=True)
        started.append(proc)
        return proc.pid

    yield start
    for proc in started:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


FAKE_ROW = "1, GPU-00000000-0000-0000-0000-000000000000, 00000000:19:00.0, 80000 MiB, /sbin/init"
HOSTILE_NAMES = [
    "/tmp/x/GPU has fallen off the bus/python3",
    f"train\n{FAKE_ROW}",  # a fake compute-app row: root's pid 1 on GPU 0
    "x\n@@end apps 0\n@@begin ps\n      1 root 5 /sbin/init\n@@end ps 0\n@@begin apps",
    "run, \"quoted\", 'single', a,b",
    "\x1b[31mred\x1b[0m\ttab\rcr\x7f",
    "n" * 100_000,
    *(f"x\n{line}" for line in ERROR_LINES + KNOWN_ERROR_TEXTS),  # each error text alone on a line
]


def _run_probe(env: dict[str, str]) -> HostSnapshot:
    done = subprocess.run(["sh", "-s"], input=build_script(30).encode(), env=env, capture_output=True, timeout=60)
    return snapshot_from_output("local", "local", done.stdout.decode("utf-8", "replace"))


@pytest.mark.parametrize("argv0", HOSTILE_NAMES, ids=[f"name{i}" for i in range(len(HOSTILE_NAMES))])
def test_a_process_named_to_attack_changes_nothing(
    argv0: str, tmp_path: Path, real_names_smi: Path, hostile_process: object
) -> None:
    pid = hostile_process(argv0)  # type: ignore[operator]
    scenario_healthy_multi_gpu(tmp_path / "standin" / "local", 2, owners_pids={H100_PIDS[0]: pid})
    env = standin_env(tmp_path / "standin")
    env["PATH"] = f"{real_names_smi}{os.pathsep}{env['PATH']}"
    snap = _run_probe(env)
    assert snap.ok, snap.error
    assert snap.warnings == ()
    assert [g.index for g in snap.gpus] == [0, 1]
    assert sorted(owners(snap)) == sorted([pid, *H100_PIDS[1:]])  # no fake row, nothing lost
    mine = next(p for p in snap.processes if p.pid == pid)
    assert (mine.user, mine.gpu_index) == (ME, 0)
    assert mine.name and "\n" not in mine.name
    assert mine.command is not None and "\n" not in mine.command
    assert mine.command.endswith(" 600") or len(mine.command) == MAX_COMMAND_CHARS  # a 100 KB one is cut
    assert len(mine.name) <= MAX_TEXT_CHARS
