"""The rest of the host in the same probe: /proc readings and disks (hostinfo), the GPU health fields
learned once per host from ``--help-query-gpu`` (probe.HostProbe), read from real outputs: this
machine's /proc and df, and real nvidia-smi captures replayed by the stand-in."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fleet import (
    CAPTURES,
    H100_HELP_QUERY_GPU,
    L40S_HELP_QUERY_GPU,
    MIG_HELP_QUERY_GPU,
    publish_scenario,
    scenario_healthy_multi_gpu,
    scenario_l40s,
    scenario_mig,
    standin_env,
)
from gpuwatch import hostinfo, parse, probe
from gpuwatch.model import Disk, HostErrorKind, HostSnapshot

CORPUS_RAW_465 = Path("/work/shared/nvidia-smi-corpus/raw/nvgpuexp-2021-rtx2080super-linux-465.27-list-query-help.txt")


def run_awk(program: str, *files: str, variables: dict[str, str] | None = None, stdin: str = "") -> str:
    """The probe's own awk program, run here as the host runs it (this machine's default awk)."""
    argv = ["awk"]
    for name, value in (variables or {}).items():
        argv += ["-v", f"{name}={value}"]
    done = subprocess.run([*argv, program, *files], input=stdin, capture_output=True, text=True, check=True)
    return done.stdout


# ---------------------------------------------------------------- /proc


def test_the_host_awk_reads_this_machines_proc() -> None:
    before = Path("/proc/loadavg").read_text().split()[:3]
    text = run_awk(probe.HOST_AWK, "/proc/loadavg", "/proc/uptime", "/proc/stat", "/proc/meminfo",
                   "/proc/sys/kernel/osrelease", "/proc/self/mountinfo")  # fmt: skip
    after = Path("/proc/loadavg").read_text().split()[:3]
    readings, issues = hostinfo.parse_host(text)
    assert issues == []
    assert readings.load is not None and [f"{v:.2f}" for v in readings.load] in (before, after)
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    assert readings.memory is not None
    assert readings.memory["MemTotal"] == int(meminfo["MemTotal"].split()[0])
    assert readings.cpus == os.sysconf("SC_NPROCESSORS_ONLN")
    btime = next(
        int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
    )
    assert readings.boot_time == btime
    assert readings.kernel == os.uname().release
    assert not readings.mount_with_newline


def test_damaged_host_readings_are_unknown_not_wrong() -> None:
    text = "\n".join(
        [
            "loadavg 0.5 0.6",  # two numbers
            "uptime 12.5",
            "uptime 99",  # twice: one of them is not the kernel's
            "mem MemTotal: 1000",
            "mem MemAvailable: 2000",  # more available than there is
            "cpus 0",
            "kernel 6.1\x1b[31m",
            "hello world",
        ]
    )
    readings, issues = hostinfo.parse_host(text)
    assert readings.load is None and readings.uptime_seconds is None and readings.cpus is None
    assert readings.memory is None or "MemAvailable" not in readings.memory
    assert readings.kernel is not None and "\x1b" not in readings.kernel
    assert issues and all(i.kind is HostErrorKind.UNPARSEABLE for i in issues)


# ---------------------------------------------------------------- df


def _df(*args: str) -> str:
    return subprocess.run(["df", "-P", "-k", "-T", *args], capture_output=True, text=True, check=True).stdout


def test_df_of_this_machine() -> None:
    text = _df("-l")
    disks, issues = hostinfo.parse_df(text)
    assert issues == []
    rows = [line.split(None, 6) for line in text.splitlines()[1:]]
    assert [(d.mount, d.size_kib, d.use_percent) for d in disks] == [(r[6], int(r[2]), int(r[5][:-1])) for r in rows]
    by_path, issues = hostinfo.parse_disk_paths(
        f"path /\n{_df('/')}path /nonexistent\ndf: /nonexistent: No such file or directory\n"
    )
    assert issues == [] and list(by_path) == ["/"]


def test_a_mount_listed_twice_or_a_line_that_is_no_filesystem_is_not_used() -> None:
    line = _df("/").splitlines()[1]
    forged = line.rsplit("%", 1)[0][:-3] + " 99% /"
    disks, issues = hostinfo.parse_df(
        f"{_df('/')}{forged}\nrandom text\ndf: /run/user/1000/doc: Operation not permitted\n"
    )
    assert disks == [] and len(issues) == 2  # "/" is unknown, not the forged 99 %


def test_the_disks_that_matter() -> None:
    def disk(mount: str, percent: int, fs: str = "ext4") -> Disk:
        return Disk(mount, fs, 1000, 10 * percent, 1000 - 10 * percent, percent)

    listed = [disk("/", 40), disk("/data", 93), disk("/snap/core/1", 100, "squashfs"), disk("/scratch", 89)]
    by_path = {"/": disk("/", 40), "/home": disk("/", 40), "/tmp": disk("/", 40)}
    picked = hostinfo.pick_disks(listed, by_path, ("/", "/home", "/tmp"))
    assert [(d.mount, d.paths) for d in picked] == [("/", ("/", "/home", "/tmp")), ("/data", ())]


def test_a_mount_point_with_a_line_break_hides_the_disks_for_that_poll() -> None:
    output = "\n".join(
        [
            probe.PROBE_MARKER,
            "@@begin host",
            "loadavg 0.1 0.2 0.3\ncpus 2\nmem MemTotal: 100\nmem MemAvailable: 50\nmount-with-newline",
            "@@end host 0",
            "@@begin df",
            _df("/") + "evil tmpfs 100 99 1 99% /home",  # what an old df prints for a label "x\n...%/home"
            "@@end df 0",
            "@@begin gpu",
            "No devices were found",
            "@@end gpu 6",
            "",
        ]
    )
    snap = probe.snapshot_from_output("gpu-a", "gpu-a", output)
    assert snap.context is not None and snap.context.disks == () and not snap.context.disks_known
    assert snap.context.load_5m == 0.2  # the rest of the host is still known


# ---------------------------------------------------------------- health fields, learned once


@pytest.mark.parametrize("capture", [H100_HELP_QUERY_GPU, MIG_HELP_QUERY_GPU, L40S_HELP_QUERY_GPU, "raw-465"])
def test_the_learning_awk_reads_help_query_gpu_as_the_parser_does(capture: str) -> None:
    if capture == "raw-465":
        if not CORPUS_RAW_465.exists():
            pytest.skip("the shared corpus is not on this machine")
        text = CORPUS_RAW_465.read_text(encoding="utf-8").split("# nvidia-smi --help-query-gpu", 1)[1]
    else:
        text = (CAPTURES / capture).read_text(encoding="utf-8")
    shell = run_awk(probe.HEALTH_AWK, variables={"want": probe.wanted_health_fields()}, stdin=text).strip()
    assert tuple(shell.split(",")) == parse.supported_health_fields(text)
    if capture == "raw-465":  # driver 465 knows only the older clocks_throttle_reasons names
        assert "clocks_throttle_reasons.hw_slowdown" in shell and "remapped_rows.pending" not in shell


_COUNTING_SMI = """#!{python}
import os, sys
with open(os.environ["SMI_LOG"], "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\\n")
os.execv({standin!r}, [{standin!r}, *sys.argv[1:]])
"""


@pytest.fixture
def counting(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """The stand-in behind a wrapper that logs every nvidia-smi call; the ``local`` scenario dir."""
    from fleet import STANDIN_EXE

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "nvidia-smi"
    exe.write_text(_COUNTING_SMI.format(python=sys.executable, standin=str(STANDIN_EXE)))
    exe.chmod(0o755)
    env = standin_env(tmp_path / "standin")
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env["SMI_LOG"] = str(tmp_path / "smi.log")
    return env, tmp_path / "standin" / "local"


def poll(host_probe: probe.HostProbe, env: dict[str, str]) -> HostSnapshot:
    token = probe.new_token()
    script = probe.build_script(30, token=token, probe=host_probe)
    done = subprocess.run(["sh", "-s"], input=script, env=env, capture_output=True, text=True, timeout=60)
    return probe.snapshot_from_output("local", "local", done.stdout, token=token, probe=host_probe)


def test_health_fields_are_learned_once_per_host(counting: tuple[dict[str, str], Path]) -> None:
    env, scenario = counting
    scenario_healthy_multi_gpu(scenario, 2)
    host_probe = probe.HostProbe()
    snaps = [poll(host_probe, env) for _ in range(3)]
    calls = Path(env["SMI_LOG"]).read_text().splitlines()
    assert sum(c == "--help-query-gpu" for c in calls) == 1 and sum(c == "--version" for c in calls) == 1
    assert sum(c.startswith("--query-gpu=") for c in calls) == 4  # 3 polls + the learning poll's health query
    for snap in snaps:
        assert snap.ok and snap.warnings == ()
        health = snap.gpus[0].health
        assert health is not None and (health.ecc_uncorrected_volatile, health.remapped_rows_pending) == (0, False)
        assert health.retired_pages_pending is None  # [N/A] in the capture: unknown, never "no"
        assert snap.context is not None and snap.context.driver_version == "590.48.01"
    assert [s.context.cuda_version for s in snaps if s.context] == ["13.1"] * 3
    assert host_probe.health_fields == parse.supported_health_fields(
        (CAPTURES / H100_HELP_QUERY_GPU).read_text(encoding="utf-8")
    )
    assert probe.build_script(30, probe=host_probe).count("--help-query-gpu") == 1  # only inside `if [ 0 = 1 ]`
    assert "if [ 0 = 1 ]" in probe.build_script(30, probe=host_probe)


def test_na_health_fields_are_absent_never_zero(counting: tuple[dict[str, str], Path]) -> None:
    env, scenario = counting
    scenario_mig(scenario)
    snap = poll(probe.HostProbe(), env)
    health = snap.gpus[0].health
    assert health is not None
    assert (health.remapped_rows_pending, health.remapped_rows_failure) == (None, None)  # [N/A] in MIG mode
    assert health.ecc_uncorrected_volatile == 0


def test_a_driver_change_or_a_refused_field_learns_again(counting: tuple[dict[str, str], Path]) -> None:
    env, scenario = counting
    scenario_healthy_multi_gpu(scenario, 1)
    host_probe = probe.HostProbe()
    assert poll(host_probe, env).context.cuda_version == "13.1"  # type: ignore[union-attr]
    scenario_l40s(scenario)  # the driver went from 590.48.01 to 595.80
    changed = poll(host_probe, env)
    assert changed.ok and changed.context is not None and changed.context.driver_version == "595.80"
    assert host_probe.health_fields is None  # forgotten: asked again next poll
    again = poll(host_probe, env)
    assert again.context is not None and again.context.cuda_version == "13.2"
    assert host_probe.health_fields
    # A field the driver refuses (here an older name this capture has no column for): the GPUs
    # still answer without it, health is unknown for that poll, and the fields are learned again.
    host_probe.health_fields = ("clocks_throttle_reasons.hw_slowdown",)
    refused = poll(host_probe, env)
    assert refused.ok and [g.health for g in refused.gpus] == [None]
    assert any("refused a GPU health field" in w.message for w in refused.warnings)
    assert host_probe.health_fields is None
    assert poll(host_probe, env).gpus[0].health is not None


def test_without_a_host_probe_no_health_field_is_asked(counting: tuple[dict[str, str], Path]) -> None:
    env, scenario = counting
    publish_scenario(scenario, {})  # nothing but what scenario_healthy_multi_gpu writes below
    scenario_healthy_multi_gpu(scenario, 1)
    token = probe.new_token()
    done = subprocess.run(
        ["sh", "-s"], input=probe.build_script(30, token=token), env=env, capture_output=True, text=True
    )
    snap = probe.snapshot_from_output("local", "local", done.stdout, token=token)
    assert snap.ok and snap.gpus[0].health is None
    assert Path(env["SMI_LOG"]).read_text().count("--help-query-gpu") == 0


# ---------------------------------------------------------------- driver 610: CUDA UMD version

VERSION_610 = (
    "other/nvgpuexp-rtx2080super-linux-610.57.04-version.txt",
    "other/nvgpuexp-rtx2080super-windows-610.62-version.txt",
)
TABLE_610 = (
    "table/nvgpuexp-rtx2080super-linux-610.57.04-load-default-table.txt",
    "table/nvgpuexp-rtx2080super-windows-610.62-load-default-table.txt",
)


@pytest.mark.parametrize("capture", VERSION_610 + TABLE_610)
def test_driver_610_says_the_cuda_version_as_cuda_umd_version(capture: str) -> None:
    """From driver 610 ``--version`` says ``CUDA version : Deprecated, ...`` and ``CUDA UMD version :
    13.3``, and the table's banner ``CUDA UMD Version: 13.3`` (real RTX 2080 SUPER captures)."""
    text = (CAPTURES / capture).read_text(encoding="utf-8")
    assert "CUDA UMD" in text
    assert parse.parse_cuda_version(text) == "13.3"


def test_a_610_host_reports_its_cuda_version(counting: tuple[dict[str, str], Path]) -> None:
    env, scenario = counting
    scenario_healthy_multi_gpu(scenario, 1)
    files = {p.name: p.read_bytes() for p in scenario.resolve().iterdir() if p.is_file()}
    files["version.txt"] = (CAPTURES / VERSION_610[0]).read_bytes()
    publish_scenario(scenario, files)
    snap = poll(probe.HostProbe(), env)
    assert snap.ok and snap.context is not None and snap.context.cuda_version == "13.3"


_DROP_ROW_SMI = """#!{python}
import os, subprocess, sys
done = subprocess.run([{standin!r}, *sys.argv[1:]], capture_output=True, text=True)
out = done.stdout
if sys.argv[1].startswith("--query-gpu=") and "memory.total" not in sys.argv[1]:  # the health query
    out = "".join(out.splitlines(keepends=True)[:-1])  # its last GPU row is missing
sys.stdout.write(out)
sys.exit(done.returncode)
"""


def test_a_gpu_missing_from_the_learning_polls_health_rows_is_a_warning(tmp_path: Path) -> None:
    from fleet import STANDIN_EXE

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "nvidia-smi"
    exe.write_text(_DROP_ROW_SMI.format(python=sys.executable, standin=str(STANDIN_EXE)))
    exe.chmod(0o755)
    env = standin_env(tmp_path / "standin")
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    scenario_healthy_multi_gpu(tmp_path / "standin" / "local", 2)
    snap = poll(probe.HostProbe(), env)
    assert snap.ok and snap.gpus[0].health is not None and snap.gpus[1].health is None
    assert [w.message for w in snap.warnings] == [
        "the GPU health query gave no row for GPU 1; its health is unknown this poll"
    ]
    assert snap.warnings[0].kind is HostErrorKind.UNPARSEABLE
