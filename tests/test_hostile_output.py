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
import re
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
from gpuwatch.probe import PROBE_MARKER, build_script, new_token, snapshot_from_output, split_sections
from gpuwatch.ssh import session_script

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


def _probe_output(env: dict[str, str], token: str) -> str:
    script = build_script(30, token=token).encode()
    done = subprocess.run(["sh", "-s"], input=script, env=env, capture_output=True, timeout=60, check=True)
    return done.stdout.decode("utf-8", "replace")


def _run_probe(env: dict[str, str]) -> HostSnapshot:
    token = new_token()
    return snapshot_from_output("local", "local", _probe_output(env, token), token=token)


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


# ------------------------------------------------------------------------------------
# section markers carry a per-poll token


def token_output(host: Host, ps_text: str, args_text: str, token: str) -> str:
    """What the probe script prints with ``token`` (the same layout as build_script's)."""
    parts = [f"{PROBE_MARKER} {token}"]
    for name, body in (("gpu", host.query), ("apps", host.apps), ("ps", ps_text), ("args", args_text)):
        parts += [f"@@begin {name} {token}", body, f"@@end {name} {token} 0"]
    return "\n".join(parts) + "\n"


def owner_lines(pairs: Sequence[tuple[int, str]]) -> str:
    return "".join(f"{pid:>7} {user:<64} {600:>7}\n" for pid, user in pairs)


def test_marker_lines_in_user_text_do_not_change_the_sections() -> None:
    """A ps that printed a command line's newlines raw (procps does not) gives lines that look
    like markers, without this poll's token: they stay data."""
    token = new_token()
    host = Host.h100()
    owners_text = owner_lines([(H100_PIDS[0], "alice"), (H100_PIDS[1], "verylongusername")])
    forged = [
        "@@end args 0",
        f"@@end args {new_token()} 0",
        "@@begin ps",
        f"@@begin ps {new_token()}",
        owner_lines([(H100_PIDS[0], "root")]).rstrip("\n"),
        "@@end ps 0",
        PROBE_MARKER,
    ]
    args_text = f"{H100_PIDS[0]:>7} python3 train.py\n" + "\n".join(forged) + f"\n{H100_PIDS[1]:>7} python3 b.py\n"
    output = token_output(host, owners_text, args_text, token)
    sections = split_sections(output, token)
    assert sections is not None and list(sections) == ["gpu", "apps", "ps", "args"]
    assert all(line in sections["args"].text for line in forged)
    snap = snapshot_from_output("gpu-a", "gpu-a", output, token=token)
    assert snap.ok
    assert owners(snap) == {H100_PIDS[0]: "alice", H100_PIDS[1]: "verylongusername", H100_PIDS[2]: None}
    # The forged lines are no command lines (a warning), and nothing about owners is doubted.
    assert {w.kind for w in snap.warnings} == {HostErrorKind.UNPARSEABLE}
    assert not gpu_error_warnings(snap)


def test_markers_without_this_polls_token_are_not_the_probe() -> None:
    host = Host.h100()
    token = new_token()
    output = token_output(host, owner_lines([(H100_PIDS[0], "alice")]), "", token)
    assert snapshot_from_output("gpu-a", "gpu-a", output, token=token).ok
    other = snapshot_from_output("gpu-a", "gpu-a", output, token=new_token())
    assert other.error_kind is HostErrorKind.UNPARSEABLE
    legacy = snapshot_from_output("gpu-a", "gpu-a", legacy_output(host, ""), token=token)
    assert legacy.error_kind is HostErrorKind.UNPARSEABLE


def test_tokens_are_fresh_and_checked() -> None:
    tokens = {new_token() for _ in range(100)}
    assert len(tokens) == 100 and all(re.fullmatch(r"[0-9a-f]{32}", t) for t in tokens)
    token = tokens.pop()
    script = build_script(30, token=token)
    assert f"@@begin gpu {token}" in script and f"@@end ps {token} %s" in script
    assert 'echo "@@begin gpu"' in build_script(30)  # no token: the markers as before
    for bad in ("short", "with space and more", "semi;colon0", "$(reboot)x"):
        with pytest.raises(ValueError):
            build_script(30, token=bad)


# Records every process's argv and environment, as another user on the host could read the argv,
# then runs the stand-in.
_SCAN_SMI = """\
import os, sys
seen = []
for pid in os.listdir("/proc"):
    for what in ("cmdline", "environ"):
        try:
            with open(f"/proc/{{pid}}/{{what}}", "rb") as handle:
                seen.append(handle.read())
        except OSError:
            pass
with open(os.environ["SCAN_OUT"], "ab") as out:
    out.write(b"\\n".join(seen))
os.execv({standin!r}, [{standin!r}, *sys.argv[1:]])
"""


@pytest.mark.parametrize("wrapped", [False, True], ids=["bare", "in-its-session"])
def test_the_token_is_in_no_process_argv_or_environment(tmp_path: Path, wrapped: bool) -> None:
    """The token reaches the host on sh's stdin and is printed by builtins: while nvidia-smi runs
    (twice) no process on the host shows it in its argv or its environment, also when the probe
    runs wrapped in its own session as the SSH runner sends it (ssh.session_script)."""
    bin_dir = tmp_path / "scan-bin"
    bin_dir.mkdir()
    exe = bin_dir / "nvidia-smi"
    exe.write_text(f"#!{sys.executable}\n" + _SCAN_SMI.format(standin=str(STANDIN_EXE)))
    exe.chmod(0o755)
    scenario_healthy_multi_gpu(tmp_path / "standin" / "local", 2)
    env = standin_env(tmp_path / "standin")
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env["SCAN_OUT"] = str(tmp_path / "scan")
    token = new_token()
    if wrapped:
        script = session_script(build_script(30, token=token), 60).encode()
        done = subprocess.run(["sh", "-s"], input=script, env=env, capture_output=True, timeout=60, check=True)
        output = done.stdout.decode("utf-8", "replace")
    else:
        output = _probe_output(env, token)
    assert snapshot_from_output("local", "local", output, token=token).ok
    seen = (tmp_path / "scan").read_bytes()
    assert b"--query-gpu=" in seen and b"--query-compute-apps=" in seen  # both calls were scanned
    assert token.encode() not in seen


# ------------------------------------------------------------------------------------
# cut short anywhere


def test_output_cut_at_any_byte_is_never_a_silent_ok(tmp_path: Path, hostile_process: object) -> None:
    """A real probe output (the script, the stand-in, real ps) cut after every one of its bytes:
    the host is failed, or warns, or (cut after its last marker) is the whole result; an owner
    it shows is never another than the whole output's."""
    pid = hostile_process("python3")  # type: ignore[operator]
    scenario_healthy_multi_gpu(tmp_path / "standin" / "local", 2, owners_pids={H100_PIDS[0]: pid})
    token = new_token()
    output = _probe_output(standin_env(tmp_path / "standin"), token)
    whole = snapshot_from_output("local", "local", output, token=token)
    assert whole.ok and whole.warnings == () and owners(whole)[pid] == ME
    silent = 0
    for cut in range(len(output)):
        snap = snapshot_from_output("local", "local", output[:cut], token=token)
        assert "gpuwatch bug" not in (snap.error or "")
        if not snap.ok:
            continue
        for process in snap.processes:
            assert process.user in (None, owners(whole)[process.pid])
        if snap != whole and not snap.warnings:
            silent += 1
        if snap.warnings == () and snap.processes and any(p.user is None for p in snap.processes):
            assert owners(snap) == owners(whole)
        if any(p.user is None and owners(whole)[p.pid] is not None for p in snap.processes):
            assert HostErrorKind.PROBE_FAILED in {w.kind for w in snap.warnings}
    assert silent == 0


@pytest.mark.parametrize(
    "text",
    [
        "nul\x00byte in argv",  # no real argv holds NUL; a broken ps or a cut could still print one
        "\x1b[31mred\x1b[0m\x07 bell",
        "\u202eevil \u2028line\x85sep\x0bvt\x0cff",
        "run, \"quoted\", 'single', a,b",
        "y" * 100_000,
        "\ufffd\ufffd non-UTF-8 bytes",
    ],
    ids=["nul", "ansi", "unicode-separators", "commas-quotes", "100KB", "non-utf8"],
)
def test_control_characters_and_long_command_lines_change_nothing(text: str) -> None:
    token = new_token()
    host = Host.h100()
    owners_text = owner_lines([(H100_PIDS[0], "alice"), (H100_PIDS[1], "verylongusername")])
    args_text = f"{H100_PIDS[0]:>7} {text}\n{H100_PIDS[1]:>7} python3 b.py\n"
    snap = snapshot_from_output("gpu-a", "gpu-a", token_output(host, owners_text, args_text, token), token=token)
    assert snap.ok and snap.warnings == ()
    assert owners(snap) == {H100_PIDS[0]: "alice", H100_PIDS[1]: "verylongusername", H100_PIDS[2]: None}
    mine = next(p for p in snap.processes if p.pid == H100_PIDS[0])
    assert mine.command is not None and len(mine.command) <= MAX_COMMAND_CHARS and "\n" not in mine.command
    assert len(mine.name) <= MAX_TEXT_CHARS
    assert_strict_json(snap)


def test_gpu_list_cut_short_is_a_failed_host_not_fewer_gpus() -> None:
    host = Host.h100(4)
    token = new_token()
    full = token_output(host, owner_lines([(H100_PIDS[0], "alice")]), "", token)
    cut = full[: full.index(f"@@end gpu {token}")]  # three GPU rows printed, the connection dropped
    snap = snapshot_from_output("gpu-a", "gpu-a", cut, token=token)
    assert not snap.ok and snap.error_kind is HostErrorKind.PROBE_TIMEOUT and "cut short" in (snap.error or "")


@pytest.mark.parametrize(
    ("drop", "kind"),
    [
        ("ps", HostErrorKind.PROBE_FAILED),  # apps listed processes, the owners listing never came
        ("args", HostErrorKind.UNPARSEABLE),  # owners known, command lines not
    ],
)
def test_missing_listing_is_a_warning(drop: str, kind: HostErrorKind) -> None:
    token = new_token()
    full = token_output(Host.h100(), owner_lines([(H100_PIDS[0], "alice")]), f"{H100_PIDS[0]} x\n", token)
    lines = full.split("\n")
    begin = lines.index(f"@@begin {drop} {token}")
    end = lines.index(f"@@end {drop} {token} 0")
    output = "\n".join(lines[:begin] + lines[end + 1 :])
    snap = snapshot_from_output("gpu-a", "gpu-a", output, token=token)
    assert snap.ok
    assert [w.kind for w in snap.warnings] == [kind]


def test_many_bad_rows_give_a_bounded_list_of_warnings_with_every_kind_kept() -> None:
    host = Host.h100()
    head, row0, row1 = host.query.strip().split("\n")
    bad_rows = [
        f"{i}, GPU-x{i}, name, 00000000:{i % 256:02X}:00.0, 500 %, 1 MiB, 2 MiB, 40, 10 W" for i in range(2, 200)
    ]
    lost = "Unable to determine the device handle for GPU 0000:0B:00.0: Unknown Error"
    query = "\n".join([head, row0, row1, *bad_rows, lost]) + "\n"
    ps = ps_line(H100_PIDS[0], "alice", 600, "x")
    snap = snapshot_from_output("gpu-a", "gpu-a", legacy_output(Host(query, host.apps), ps))
    assert snap.ok and len(snap.gpus) == 200
    assert len(snap.warnings) <= 20 + len(HostErrorKind)
    assert HostErrorKind.GPU_LOST in {w.kind for w in snap.warnings}  # the rules still see the lost GPU
    assert any("more unparseable warnings" in w.message for w in snap.warnings)


def test_a_reader_bug_costs_this_host_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import gpuwatch.parse

    def broken(*args: object, **kwargs: object) -> object:
        raise RecursionError("a bug")

    monkeypatch.setattr(gpuwatch.parse, "parse_query_gpu", broken)
    snap = snapshot_from_output("gpu-a", "gpu-a", legacy_output(Host.h100(), ""))
    assert not snap.ok and snap.error_kind is HostErrorKind.UNPARSEABLE and "gpuwatch bug" in (snap.error or "")
