"""Tests for gpuwatch.parse against real nvidia-smi captures.

The fixtures in tests/fixtures/nvidia-smi/ are byte-for-byte copies of the shared corpus
(/work/shared/nvidia-smi-corpus); their SOURCES.tsv says where each came from and which
command produced it. Cases that no real capture shows (a ", " in a process name, another
column order, a lost GPU beside a good one) are derived from real lines, never typed in
from scratch; each says so where it is built.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import pwd
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from gpuwatch.model import ComputeApp, Gpu, GpuHealth, HostErrorKind, PsEntry
from gpuwatch.parse import (
    APP_QUERY_FIELDS,
    ARGS_FORMAT,
    GPU_QUERY_FIELDS,
    OWNERS_FORMAT,
    PS_FORMAT,
    attribute,
    classify_nvidia_smi_error,
    is_unknown,
    parse_compute_apps,
    parse_float,
    parse_int,
    parse_owners,
    parse_ps,
    parse_ps_args,
    parse_query_gpu,
)

FIXTURES = Path(__file__).parent / "fixtures" / "nvidia-smi"
# What older probes asked for: the probe's fields and process_name last (the parser still reads it).
LEGACY_APP_FIELDS = (*APP_QUERY_FIELDS, "process_name")
FOLDERS = ("csv-query-gpu", "csv-compute-apps", "errors")

H100_MIG_GPU = "csv-query-gpu/nvgpuexp-h100-mig-linux-590.48.01-load-query-gpu-all-fields.csv"
H100_GPU = "csv-query-gpu/nvgpuexp-h100-80gb-hbm3-linux-590.48.01-load-query-gpu-all-fields.csv"
RTX2080_LINUX_GPU = "csv-query-gpu/nvgpuexp-rtx2080super-linux-595.71.05-load-query-gpu-all-fields.csv"
WIN2021_GPU = "csv-query-gpu/nvgpuexp-2021-rtx2080super-windows-471.11-query-gpu-115-fields.csv"
QUADRO_NOHEADER = "csv-query-gpu/issue-quadro-rtx5000-x2-windows-memory-na-noheader-nounits.csv"
I3_NA_NOHEADER = "csv-query-gpu/issue-i3pystatus-fan-na-noheader-nounits.csv"
I3_NOT_SUPPORTED_NOHEADER = "csv-query-gpu/issue-i3pystatus-fan-not-supported-noheader-nounits.csv"

H100_APPS = "csv-compute-apps/nvgpuexp-h100-80gb-hbm3-linux-590.48.01-load-compute-apps.csv"
RTX2080_LINUX_APPS = "csv-compute-apps/nvgpuexp-rtx2080super-linux-595.71.05-load-compute-apps.csv"
HEADER_ONLY_APPS = "csv-compute-apps/nvgpuexp-h100-mig-linux-590.48.01-idle-compute-apps-header-only.csv"
WIN_591_APPS = "csv-compute-apps/nvgpuexp-rtx2080super-windows-591.86-load-compute-apps.csv"
WIN_610_APPS = "csv-compute-apps/nvgpuexp-rtx2080super-windows-610.62-load-compute-apps.csv"

LOST_SPACE = "errors/issue-device-handle-unknown-error-space.txt"

EXPECTED_ERROR_KINDS: dict[str, HostErrorKind] = {
    "errors/issue-couldnt-communicate-with-driver.txt": HostErrorKind.DRIVER_NOT_LOADED,
    "errors/issue-device-handle-gpu-is-lost.txt": HostErrorKind.GPU_LOST,
    "errors/issue-device-handle-unknown-error-nospace.txt": HostErrorKind.GPU_LOST,
    "errors/issue-device-handle-unknown-error-space.txt": HostErrorKind.GPU_LOST,
    "errors/issue-no-devices-were-found.txt": HostErrorKind.NO_DEVICES,
    "errors/issue-nvml-driver-library-version-mismatch-with-nvml-version.txt": HostErrorKind.DRIVER_MISMATCH,
    "errors/issue-nvml-driver-library-version-mismatch.txt": HostErrorKind.DRIVER_MISMATCH,
    "errors/issue-nvml-unknown-error-in-container.txt": HostErrorKind.DRIVER_NOT_LOADED,
    "errors/nvgpuexp-h100-mig-linux-590.48.01-nvlink-s-mig-not-supported.txt": HostErrorKind.PROBE_FAILED,
    "errors/nvgpuexp-rtx2080super-windows-591.86-topo-m-error.txt": HostErrorKind.PROBE_FAILED,
}


# ------------------------------------------------------------------------------------
# fixture helpers


def _sources() -> dict[str, dict[str, str]]:
    with (FIXTURES / "SOURCES.tsv").open(encoding="utf-8", newline="") as handle:
        return {row["saved_name"]: row for row in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)}


SOURCES = _sources()
ALL_FILES = sorted(str(p.relative_to(FIXTURES)) for folder in FOLDERS for p in (FIXTURES / folder).iterdir())


def _read(name: str) -> str:
    return (FIXTURES / name).read_bytes().decode("utf-8")


def _command(name: str) -> str:
    return SOURCES[name]["command"]


def _query_fields(name: str) -> list[str]:
    """The field list of the --query-* option in the file's SOURCES command."""
    match = re.search(r'--query-(?:gpu|compute-apps)="?([^" ]+)"?', _command(name))
    assert match, _command(name)
    return match.group(1).split(",")


def _fields_if_noheader(name: str) -> list[str] | None:
    return _query_fields(name) if "noheader" in _command(name) else None


def _exit_code(name: str) -> int | None:
    match = re.search(r"exit code (\d+)", SOURCES[name]["gpu_model_and_what_it_shows"])
    return int(match.group(1)) if match else None


def _data_lines(text: str) -> list[str]:
    return [line for line in text.split("\n") if line.strip()]


def _project(text: str, order: tuple[str, ...], *, header: bool = True, nounits: bool = False) -> str:
    """A capture's columns picked by header name and put in ``order`` (a derived output).

    ``nounits`` also drops the unit from each value, as ``--format=csv,nounits`` prints it.
    Only for captures whose values hold no ", " (true of every capture in the corpus).
    """
    lines = _data_lines(text)
    head = lines[0].split(", ")
    names = [re.sub(r" \[[^\]]*\]$", "", cell) for cell in head]
    picks = [names.index(field) for field in order]
    out = [", ".join(head[i] for i in picks)] if header else []
    for line in lines[1:]:
        cells = line.split(", ")
        assert len(cells) == len(head)
        values = [cells[i] for i in picks]
        if nounits:
            values = [re.sub(r"^(-?[\d.]+) (MiB|W|%)$", r"\1", value) for value in values]
        out.append(", ".join(values))
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------
# the fixtures themselves


def test_fixtures_cover_the_corpus_folders_and_sources() -> None:
    corpus = Path("/work/shared/nvidia-smi-corpus")
    for name in ALL_FILES:
        assert name in SOURCES, f"{name} has no SOURCES.tsv line"
        original = corpus / name
        if original.exists():  # the shared corpus is not needed to run the tests
            assert original.read_bytes() == (FIXTURES / name).read_bytes(), name
    assert set(EXPECTED_ERROR_KINDS) == {n for n in ALL_FILES if n.startswith("errors/")}


@pytest.mark.parametrize("name", ALL_FILES)
def test_every_capture_parses_or_is_classified(name: str) -> None:
    text = _read(name)
    folder = name.split("/")[0]
    if folder == "csv-query-gpu":
        gpus, issues = parse_query_gpu(text, _fields_if_noheader(name))
        assert issues == []
        has_header = _fields_if_noheader(name) is None
        assert len(gpus) == len(_data_lines(text)) - (1 if has_header else 0)
        assert len({g.index for g in gpus}) == len(gpus)
    elif folder == "csv-compute-apps":
        apps, issues = parse_compute_apps(text)
        assert issues == []
        assert len(apps) == len(_data_lines(text)) - 1
        assert all(app.pid > 0 and app.process_name for app in apps)
    else:
        issue = classify_nvidia_smi_error(text, _exit_code(name))
        assert issue is not None
        assert issue.kind is EXPECTED_ERROR_KINDS[name]
        assert issue.message
        # The same text reaching the CSV parsers gives no records and the same diagnosis.
        by_text = classify_nvidia_smi_error(text, None)
        gpus, gpu_issues = parse_query_gpu(text)
        apps, app_issues = parse_compute_apps(text)
        assert gpus == [] and apps == []
        assert gpu_issues[0] == by_text
        assert app_issues[0] == by_text


# ------------------------------------------------------------------------------------
# --query-gpu


def test_h100_mig_values() -> None:
    gpus, issues = parse_query_gpu(_read(H100_MIG_GPU))
    assert issues == []
    assert gpus == [
        Gpu(
            index=0,
            uuid="GPU-00000000-0000-0000-0000-000000000000",
            name="NVIDIA H100 80GB HBM3",
            pci_bus_id="00000000:00:09.0",
            utilization_percent=None,  # [N/A] in MIG mode
            memory_used_mib=11125,
            memory_total_mib=81559,
            temperature_c=53,
            power_w=433.78,
            # The all-fields capture holds the health fields too; remapped rows are [N/A] in MIG mode.
            health=GpuHealth(
                ecc_uncorrected_volatile=0,
                ecc_uncorrected_aggregate=0,
                hw_slowdown=False,
                hw_thermal_slowdown=False,
                hw_power_brake_slowdown=False,
                persistence_mode=True,
                driver_version="590.48.01",
            ),
        )
    ]


# The health fields of the all-fields captures (unknown where they print [N/A]: never 0 or "no").
_HEALTHY = dict(hw_slowdown=False, hw_thermal_slowdown=False, hw_power_brake_slowdown=False)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            H100_GPU,
            Gpu(
                0,
                "GPU-00000000-0000-0000-0000-000000000000",
                "NVIDIA H100 80GB HBM3",
                "00000000:00:09.0",
                100,
                19818,
                81559,
                59,
                631.95,
                GpuHealth(
                    0, 0, None, None, False, False, **_HEALTHY, persistence_mode=True, driver_version="590.48.01"
                ),
            ),
        ),
        (
            "csv-query-gpu/nvgpuexp-l40s-linux-595.80-load-query-gpu-all-fields.csv",
            Gpu(
                0,
                "GPU-00000000-0000-0000-0000-000000000000",
                "NVIDIA L40S",
                "00000000:01:00.0",
                9,
                1235,
                46068,
                54,
                110.23,
                GpuHealth(0, 0, None, None, False, False, **_HEALTHY, persistence_mode=False, driver_version="595.80"),
            ),
        ),
        (
            WIN2021_GPU,  # old field names, 115 columns, real (unmasked) UUID
            Gpu(
                0,
                "GPU-df6e7a7c-7314-46f8-abc4-b88b36dcf3aa",
                "NVIDIA GeForce RTX 2080 SUPER",
                "00000000:0C:00.0",
                2,
                876,
                8192,
                36,
                32.70,
                GpuHealth(**_HEALTHY, driver_version="471.11"),  # clocks_throttle_reasons.*: the older names
            ),
        ),
    ],
)
def test_all_fields_captures_by_header_name(name: str, expected: Gpu) -> None:
    gpus, issues = parse_query_gpu(_read(name))
    assert issues == []
    assert gpus == [expected]


def test_noheader_captures_with_their_field_lists() -> None:
    quadro, issues = parse_query_gpu(_read(QUADRO_NOHEADER), _query_fields(QUADRO_NOHEADER))
    assert issues == []
    # Two GPUs, both kept, numbered by row position because index was not queried.
    assert [g.index for g in quadro] == [0, 1]
    assert all(g.memory_total_mib is None and g.memory_used_mib is None for g in quadro)

    for name in (I3_NA_NOHEADER, I3_NOT_SUPPORTED_NOHEADER):
        gpus, issues = parse_query_gpu(_read(name), _query_fields(name))
        assert issues == []
        (gpu,) = gpus
        assert (gpu.memory_total_mib, gpu.memory_used_mib, gpu.temperature_c, gpu.utilization_percent) == (
            2004,
            0,
            44,
            0,
        )


def test_noheader_without_field_list_is_unparseable() -> None:
    gpus, issues = parse_query_gpu(_read(QUADRO_NOHEADER))
    assert gpus == []
    assert [i.kind for i in issues] == [HostErrorKind.UNPARSEABLE]
    assert "[N/A], [N/A]" in issues[0].message


def test_empty_query_gpu_output_is_an_issue_not_zero_gpus() -> None:
    gpus, issues = parse_query_gpu("")
    assert gpus == []
    assert [i.kind for i in issues] == [HostErrorKind.UNPARSEABLE]
    header_only = _data_lines(_project(_read(H100_GPU), GPU_QUERY_FIELDS))[0] + "\n"
    gpus, issues = parse_query_gpu(header_only)
    assert gpus == []
    assert [i.kind for i in issues] == [HostErrorKind.NO_DEVICES]


@pytest.mark.parametrize("name", [H100_MIG_GPU, H100_GPU, WIN2021_GPU, RTX2080_LINUX_GPU])
def test_query_gpu_field_order_independence(name: str) -> None:
    text = _read(name)
    expected, _ = parse_query_gpu(text)
    expected = [dataclasses.replace(g, health=None) for g in expected]  # the projections below have none
    # The probe's own query: same capture, projected to GPU_QUERY_FIELDS by header name.
    own = _project(text, GPU_QUERY_FIELDS)
    assert own.split("\n")[0].startswith("index, uuid, name, pci.bus_id, utilization.gpu [%], memory.used [MiB]")
    assert parse_query_gpu(own) == (expected, [])
    # Reversed order, noheader (fields given), and nounits all read the same records.
    reverse = tuple(reversed(GPU_QUERY_FIELDS))
    assert parse_query_gpu(_project(text, reverse)) == (expected, [])
    assert parse_query_gpu(_project(text, reverse, header=False), reverse) == (expected, [])
    assert parse_query_gpu(_project(text, GPU_QUERY_FIELDS, nounits=True)) == (expected, [])
    # CRLF line endings (a Windows host) change nothing.
    assert parse_query_gpu(own.replace("\n", "\r\n")) == (expected, [])


def test_lost_gpu_line_between_rows_is_an_issue_not_a_row() -> None:
    # Derived: the probe's own projection of the real H100 capture, with the real
    # "Unable to determine the device handle for GPU 0000:0B:00.0: Unknown Error" line
    # (errors/) printed before the good GPU's row, as nvidia-smi does for a lost GPU.
    own = _data_lines(_project(_read(H100_GPU), GPU_QUERY_FIELDS))
    lost = _read(LOST_SPACE).strip()
    text = "\n".join([own[0], lost, own[1]]) + "\n"
    gpus, issues = parse_query_gpu(text)
    assert [g.index for g in gpus] == [0]
    assert gpus[0].memory_used_mib == 19818
    assert [i.kind for i in issues] == [HostErrorKind.GPU_LOST]
    assert "0000:0B:00.0" in issues[0].message
    assert issues[0] == classify_nvidia_smi_error(lost, None)


def test_row_with_wrong_field_count_is_skipped_with_a_warning_others_kept() -> None:
    # Derived from the real H100 row: three GPUs, indexes 0-2; the middle row lost a field.
    head, row = _data_lines(_project(_read(H100_GPU), GPU_QUERY_FIELDS))
    uuid = row.split(", ")[1]
    rows = [row, "1" + row[1:].replace(uuid, uuid[:-1] + "1"), "2" + row[1:].replace(uuid, uuid[:-1] + "2")]
    rows[1] = rows[1].rsplit(", ", 1)[0]  # drop power.draw
    gpus, issues = parse_query_gpu("\n".join([head, *rows]) + "\n")
    assert [g.index for g in gpus] == [0, 2]  # never renumbered
    assert [i.kind for i in issues] == [HostErrorKind.UNPARSEABLE]
    assert rows[1][:40] in issues[0].message


def test_gpu_name_with_comma_is_placed_with_a_warning() -> None:
    # Derived from the real H100 row; no real GPU name holds ", ", but it must not crash.
    head, row = _data_lines(_project(_read(H100_GPU), GPU_QUERY_FIELDS))
    text = head + "\n" + row.replace("NVIDIA H100 80GB HBM3", "NVIDIA H100, 80GB HBM3") + "\n"
    gpus, issues = parse_query_gpu(text)
    assert [(g.index, g.name, g.memory_used_mib, g.power_w) for g in gpus] == [
        (0, "NVIDIA H100, 80GB HBM3", 19818, 631.95)
    ]
    assert [i.kind for i in issues] == [HostErrorKind.UNPARSEABLE]


# ------------------------------------------------------------------------------------
# --query-compute-apps


def test_windows_compute_apps_keep_paths_and_unknown_memory() -> None:
    apps, issues = parse_compute_apps(_read(WIN_610_APPS))
    assert issues == []
    assert len(apps) == 21
    assert all(app.used_memory_mib is None for app in apps)  # [N/A] on WDDM
    by_pid = {app.pid: app for app in apps}
    assert (
        by_pid[17840].process_name
        == r"C:\Program Files (x86)\Microsoft\EdgeWebView\Application\149.0.4022.80\msedgewebview2.exe"
    )
    assert by_pid[17648].process_name == r"C:\Program Files\NVIDIA Corporation\NVIDIA App\CEF\NVIDIA Overlay.exe"
    assert by_pid[2140] == ComputeApp(
        pid=2140,
        gpu_uuid="GPU-00000000-0000-0000-0000-000000000000",
        gpu_bus_id="00000000:0C:00.0",
        used_memory_mib=None,
        process_name=r"C:\Windows\System32\dwm.exe",
    )
    older, issues = parse_compute_apps(_read(WIN_591_APPS))
    assert issues == []
    assert {app.pid: app.process_name for app in older}[20372] == r"C:\Program Files\NZXT CAM\NZXT CAM.exe"


def test_linux_compute_apps_values() -> None:
    apps, issues = parse_compute_apps(_read(H100_APPS))
    assert issues == []
    assert [(a.pid, a.process_name, a.used_memory_mib) for a in apps] == [
        (11327, "/root/tools/memhog", 2566),
        (11328, "/root/tools/memhog", 1542),
        (11345, "./gpu_burn", 15690),
    ]
    assert {a.gpu_bus_id for a in apps} == {"00000000:00:09.0"}


def test_header_only_compute_apps_means_no_processes() -> None:
    assert parse_compute_apps(_read(HEADER_ONLY_APPS)) == ([], [])
    assert parse_compute_apps("") == ([], [])  # noheader and no process prints nothing


COMMA_PATH = r"C:\Users\x\My Stuff, Old\run.exe"


def test_process_name_with_comma_comes_back_exactly() -> None:
    # No real capture has ", " in a process name. Derived from the real Windows row of
    # pid 17840 (windows-610.62) by replacing its path; everything else is as captured.
    text = _read(WIN_610_APPS)
    header = _data_lines(text)[0]
    real = next(line for line in _data_lines(text) if ", 17840, " in line)
    path = r"C:\Program Files (x86)\Microsoft\EdgeWebView\Application\149.0.4022.80\msedgewebview2.exe"
    assert path in real
    derived = real.replace(path, COMMA_PATH)
    expected = ComputeApp(17840, "GPU-00000000-0000-0000-0000-000000000000", "00000000:0C:00.0", None, COMMA_PATH)

    # Capture order: process_name in the middle, fixed fields on both sides.
    assert parse_compute_apps(header + "\n" + derived + "\n") == ([expected], [])
    # The order older probes asked for: process_name last.
    own = _project(header + "\n" + real + "\n", LEGACY_APP_FIELDS).replace(path, COMMA_PATH)
    assert own.split("\n")[0] == "pid, gpu_uuid, gpu_bus_id, used_gpu_memory [MiB], process_name"
    assert parse_compute_apps(own) == ([expected], [])
    # ... and without a header.
    noheader = own.split("\n", 1)[1]
    assert parse_compute_apps(noheader, LEGACY_APP_FIELDS) == ([expected], [])


@pytest.mark.parametrize("name", [WIN_610_APPS, WIN_591_APPS, H100_APPS, RTX2080_LINUX_APPS])
def test_compute_apps_field_order_independence(name: str) -> None:
    text = _read(name)
    expected, _ = parse_compute_apps(text)
    assert expected
    assert parse_compute_apps(_project(text, LEGACY_APP_FIELDS)) == (expected, [])
    assert parse_compute_apps(_project(text, LEGACY_APP_FIELDS, header=False), LEGACY_APP_FIELDS) == (expected, [])
    assert parse_compute_apps(_project(text, LEGACY_APP_FIELDS, nounits=True)) == (expected, [])
    # The probe's own fields (no process_name): the same records, nameless.
    nameless = [dataclasses.replace(app, process_name="") for app in expected]
    assert parse_compute_apps(_project(text, APP_QUERY_FIELDS)) == (nameless, [])
    assert parse_compute_apps(_project(text, APP_QUERY_FIELDS, header=False), APP_QUERY_FIELDS) == (nameless, [])


def test_compute_app_row_with_bad_pid_is_skipped_with_a_warning() -> None:
    # Derived from the real RTX 2080 Linux capture: one row's pid replaced by [N/A]. The process
    # list is then incomplete, which the rules must know (probe_failed: processes not known).
    lines = _data_lines(_read(RTX2080_LINUX_APPS))
    lines[1] = lines[1].replace(", 5268, ", ", [N/A], ")
    apps, issues = parse_compute_apps("\n".join(lines) + "\n")
    assert [a.pid for a in apps] == [5267]
    assert [i.kind for i in issues] == [HostErrorKind.PROBE_FAILED]
    assert "[N/A]" in issues[0].message


# ------------------------------------------------------------------------------------
# nvidia-smi errors


def test_error_messages_name_the_cause() -> None:
    lost = classify_nvidia_smi_error(_read("errors/issue-device-handle-gpu-is-lost.txt"), None)
    assert lost is not None and "0000:03:00.0" in lost.message and "reboot" in lost.message
    nospace = classify_nvidia_smi_error(_read("errors/issue-device-handle-unknown-error-nospace.txt"), None)
    assert nospace is not None and "GPU 0000:07:00.0" in nospace.message
    space = classify_nvidia_smi_error(_read(LOST_SPACE), 0)
    assert space is not None and "GPU 0000:0B:00.0" in space.message

    with_version = _read("errors/issue-nvml-driver-library-version-mismatch-with-nvml-version.txt")
    mismatch = classify_nvidia_smi_error(with_version, 18)
    assert mismatch is not None
    assert mismatch.kind is HostErrorKind.DRIVER_MISMATCH
    assert "NVML library version: 570.124" in mismatch.message
    assert "unattended" in mismatch.message and "reboot" in mismatch.message

    container = classify_nvidia_smi_error(_read("errors/issue-nvml-unknown-error-in-container.txt"), None)
    assert container is not None and "daemon-reload" in container.message


@pytest.mark.parametrize(
    ("text", "exit_code", "kind"),
    [
        ("", 127, HostErrorKind.NVIDIA_SMI_NOT_FOUND),
        # The shells' own wording for a missing command (dash, bash).
        ("sh: 1: nvidia-smi: not found\n", 127, HostErrorKind.NVIDIA_SMI_NOT_FOUND),
        ("bash: nvidia-smi: command not found\n", None, HostErrorKind.NVIDIA_SMI_NOT_FOUND),
        (
            "timeout: failed to run command ‘nvidia-smi’: No such file or directory\n",
            127,
            HostErrorKind.NVIDIA_SMI_NOT_FOUND,
        ),
        ("", 126, HostErrorKind.NVIDIA_SMI_NOT_FOUND),
        ("", 124, HostErrorKind.PROBE_TIMEOUT),
        ("", 137, HostErrorKind.PROBE_TIMEOUT),
        ("", 4, HostErrorKind.PERMISSION_DENIED),
        ("", 9, HostErrorKind.DRIVER_NOT_LOADED),
        ("", 12, HostErrorKind.DRIVER_NOT_LOADED),
        ("", 15, HostErrorKind.GPU_LOST),
        ("", 6, HostErrorKind.PROBE_FAILED),
        ("", 14, HostErrorKind.PROBE_FAILED),
        ("", 255, HostErrorKind.PROBE_FAILED),
        ("", 2, HostErrorKind.PROBE_FAILED),
    ],
)
def test_exit_codes(text: str, exit_code: int | None, kind: HostErrorKind) -> None:
    issue = classify_nvidia_smi_error(text, exit_code)
    assert issue is not None
    assert issue.kind is kind


def test_no_error_gives_none() -> None:
    good = _read(H100_GPU)
    assert classify_nvidia_smi_error(good, 0) is None
    assert classify_nvidia_smi_error(good, None) is None
    assert classify_nvidia_smi_error("", None) is None
    assert classify_nvidia_smi_error(_read(HEADER_ONLY_APPS), 0) is None


def test_unknown_failure_quotes_the_first_line_trimmed() -> None:
    topo = _read("errors/nvgpuexp-rtx2080super-windows-591.86-topo-m-error.txt")
    issue = classify_nvidia_smi_error(topo, 255)
    assert issue is not None and "Option -m is missing its value" in issue.message
    long_line = "x" * 1000
    issue = classify_nvidia_smi_error("\n\n" + long_line + "\nsecond line\n", 3)
    assert issue is not None
    assert issue.kind is HostErrorKind.PROBE_FAILED
    assert "exit 3" in issue.message and "xxxx" in issue.message
    assert len(issue.message) < 260 and "second line" not in issue.message


def test_timeout_keeps_what_was_printed() -> None:
    issue = classify_nvidia_smi_error(_read(LOST_SPACE), 124)
    assert issue is not None
    assert issue.kind is HostErrorKind.PROBE_TIMEOUT
    assert "0000:0B:00.0" in issue.message


def test_several_lost_gpus_are_named_in_one_issue() -> None:
    text = _read(LOST_SPACE) + _read("errors/issue-device-handle-gpu-is-lost.txt")
    issue = classify_nvidia_smi_error(text, 15)
    assert issue is not None and issue.kind is HostErrorKind.GPU_LOST
    assert "0000:0B:00.0" in issue.message and "0000:03:00.0" in issue.message


# ------------------------------------------------------------------------------------
# values


@pytest.mark.parametrize(
    ("value", "as_int", "as_float", "unknown"),
    [
        ("11125 MiB", 11125, 11125.0, False),
        ("45 %", 45, 45.0, False),
        ("433.78 W", 434, 433.78, False),
        ("53", 53, 53.0, False),
        ("[N/A]", None, None, True),
        ("[Not Supported]", None, None, True),
        ("[Unknown Error]", None, None, True),
        ("[Insufficient Permissions]", None, None, True),
        ("[Requested functionality has been deprecated]", None, None, True),
        ("[Function Not Found]", None, None, True),
        ("N/A", None, None, True),
        ("", None, None, True),
        ("0x1E81", None, None, False),
        ("Default", None, None, False),
        # Number text too long to be a reading: never an infinity, never an exception.
        ("1" + "0" * 400 + " MiB", None, None, False),
        ("1" + "0" * 400 + ".5", None, None, False),
        ("1" + "0" * 5000, None, None, False),
        ("nan", None, None, False),
        ("inf W", None, None, False),
    ],
    ids=lambda v: v if not isinstance(v, str) or len(v) < 20 else f"{v[:6]}...({len(v)})",
)
def test_values(value: str, as_int: int | None, as_float: float | None, unknown: bool) -> None:
    assert parse_int(value) == as_int
    assert parse_float(value) == as_float
    assert is_unknown(value) is unknown


# ------------------------------------------------------------------------------------
# ps


def _ps_line(pid: int, user: str, etimes: int | str, args: str | None = None) -> str:
    """One line as ``ps -o pid=,user:64=,etimes=`` lays it out (older probes: ``,args=`` too)."""
    line = f"{pid:>7} {user:<64} {etimes:>7}"
    return line if args is None else f"{line} {args}"


def test_parse_ps_wide_user_column() -> None:
    text = "\n".join(
        [
            _ps_line(4242, "verylongusername", 93784),
            _ps_line(2, "root", 8123456),
            _ps_line(777, "1001", 5),
            _ps_line(888, "alice", 0),
            "",
        ]
    )
    entries, issues = parse_ps(text)
    assert issues == []
    assert entries == {
        4242: PsEntry(4242, "verylongusername", 93784, ""),
        2: PsEntry(2, "root", 8123456, ""),
        777: PsEntry(777, "1001", 5, ""),  # a UID stays as printed
        888: PsEntry(888, "alice", 0, ""),
    }


def test_parse_ps_with_args_as_older_probes_asked() -> None:
    text = "\n".join(
        [
            _ps_line(4242, "verylongusername", 93784, "python train.py --name 'run  two' --lr 0.1"),
            _ps_line(2, "root", 8123456, "[kthreadd]"),
            _ps_line(888, "alice", 0, ""),
        ]
    )
    entries, issues = parse_ps(text)
    assert issues == []
    assert entries[4242] == PsEntry(4242, "verylongusername", 93784, "python train.py --name 'run  two' --lr 0.1")
    assert entries[2].command == "[kthreadd]"
    assert entries[888] == PsEntry(888, "alice", 0, "")


@pytest.mark.parametrize(
    "bad",
    ["garbage", "    PID USER ELAPSED COMMAND", "    999 bob notanumber", "error: process ID list syntax error"],
)
def test_parse_ps_line_that_is_no_owner_is_a_probe_failure(bad: str) -> None:
    entries, issues = parse_ps(_ps_line(4242, "alice", 5) + "\n" + bad + "\n")
    assert set(entries) == {4242}
    assert [i.kind for i in issues] == [HostErrorKind.PROBE_FAILED]  # owners may be missing
    assert bad.strip()[:20] in issues[0].message


def test_parse_ps_pid_twice_has_no_owner() -> None:
    entries, issues = parse_ps(_ps_line(4242, "alice", 5) + "\n" + _ps_line(4242, "bob", 5) + "\n")
    assert entries == {}
    assert [i.kind for i in issues] == [HostErrorKind.PROBE_FAILED]


def test_parse_ps_args() -> None:
    text = "   4242 python train.py --name 'run  two'\n      2 [kthreadd]\n    888\n"
    commands, issues = parse_ps_args(text)
    assert issues == []
    assert commands == {4242: "python train.py --name 'run  two'", 2: "[kthreadd]", 888: ""}
    commands, issues = parse_ps_args(text + "   4242 forged\ncontinued line\n")
    assert commands == {2: "[kthreadd]", 888: ""}
    assert [i.kind for i in issues] == [HostErrorKind.UNPARSEABLE, HostErrorKind.UNPARSEABLE]


@pytest.mark.skipif(shutil.which("ps") is None, reason="no ps here")
def test_parse_ps_real_output() -> None:
    pid = str(os.getpid())
    owners = subprocess.run(["ps", "-ww", "-o", PS_FORMAT, "-p", pid], capture_output=True, text=True, check=False)
    args = subprocess.run(["ps", "-ww", "-o", ARGS_FORMAT, "-p", pid], capture_output=True, text=True, check=False)
    if owners.returncode != 0 or args.returncode != 0:
        pytest.skip(f"ps does not support {PS_FORMAT} / {ARGS_FORMAT}: {owners.stderr.strip()} {args.stderr.strip()}")
    entries, issues = parse_ps(owners.stdout)
    assert issues == []
    entry = entries[os.getpid()]
    assert entry.user == pwd.getpwuid(os.getuid()).pw_name
    assert entry.elapsed_seconds is not None and entry.elapsed_seconds >= 0
    commands, issues = parse_ps_args(args.stdout)
    assert issues == []
    assert "py" in commands[os.getpid()]


@pytest.mark.skipif(shutil.which("ps") is None, reason="no ps here")
def test_real_ps_escapes_newlines_and_control_characters_in_command_lines() -> None:
    """Why the probe can take command lines (and names) from ps: procps prints each process on
    one line whatever its argv holds (under the probe's LC_ALL=C, non-ASCII too is escaped)."""
    argv0 = "/tmp/x/GPU has fallen off the bus/python3\n   1 root 5 /sbin/init\n@@end ps 0\x1b[31m\u202e"
    proc = subprocess.Popen([argv0, "600"], executable="/bin/sleep")
    try:
        env = {**os.environ, "LC_ALL": "C"}
        args = subprocess.run(
            ["ps", "-ww", "-o", ARGS_FORMAT, "-p", str(proc.pid)], capture_output=True, env=env, check=False
        ).stdout.decode("utf-8", "replace")
    finally:
        proc.kill()
        proc.wait()
    assert args.count("\n") == 1 and args.endswith(" 600\n")
    assert "\x1b" not in args and "\u202e" not in args and "\r" not in args
    commands, issues = parse_ps_args(args)
    assert issues == [] and list(commands) == [proc.pid]


# ------------------------------------------------------------------------------------
# attribution


def _gpu(name: str) -> Gpu:
    (gpu,) = parse_query_gpu(_read(name))[0]
    return gpu


def test_attribute_by_uuid() -> None:
    # Two real GPUs, each given its own UUID (the corpus masked them to one value).
    h100 = dataclasses.replace(_gpu(H100_GPU), index=1)
    other = dataclasses.replace(_gpu(RTX2080_LINUX_GPU), index=0, uuid="GPU-11111111-1111-1111-1111-111111111111")
    apps, _ = parse_compute_apps(_read(H100_APPS))
    ps = {11327: PsEntry(11327, "verylongusername", 600, "/root/tools/memhog 2560")}
    processes = attribute([other, h100], apps, ps)
    assert [p.gpu_index for p in processes] == [1, 1, 1]
    first = processes[0]
    assert (first.pid, first.user, first.command, first.runtime_seconds) == (
        11327,
        "verylongusername",
        "/root/tools/memhog 2560",
        600,
    )
    assert first.name == "/root/tools/memhog" and first.used_memory_mib == 2566
    assert first.gpu_uuid == "GPU-00000000-0000-0000-0000-000000000000"
    assert first.seen_by_ps


def test_attribute_by_bus_id_when_uuids_are_masked() -> None:
    # Both real captures carry the same masked UUID: the bus id must decide.
    rtx = dataclasses.replace(_gpu(RTX2080_LINUX_GPU), index=0)
    h100 = dataclasses.replace(_gpu(H100_GPU), index=1)
    assert rtx.uuid == h100.uuid
    rtx_apps, _ = parse_compute_apps(_read(RTX2080_LINUX_APPS))
    h100_apps, _ = parse_compute_apps(_read(H100_APPS))
    processes = attribute([rtx, h100], [*rtx_apps, *h100_apps], {})
    assert [(p.pid, p.gpu_index) for p in processes] == [
        (5268, 0),
        (5267, 0),
        (11327, 1),
        (11328, 1),
        (11345, 1),
    ]


def test_attribute_bus_id_spellings_and_no_match() -> None:
    rtx = _gpu(RTX2080_LINUX_GPU)  # pci.bus_id 00000000:0C:00.0
    short_domain = ComputeApp(
        pid=5268, gpu_uuid=None, gpu_bus_id="0000:0c:00.0", used_memory_mib=370, process_name="ffmpeg"
    )
    elsewhere = ComputeApp(pid=5267, gpu_uuid="GPU-2", gpu_bus_id="00000000:0D:00.0", process_name="ffmpeg")
    processes = attribute([rtx], [short_domain, elsewhere], {})
    assert [p.gpu_index for p in processes] == [0, None]


def test_attribute_names_from_the_command_line_when_nvidia_smi_gave_none() -> None:
    # The probe's own query has no process_name: the name is the first word of ps's command line.
    nameless, _ = parse_compute_apps(_project(_read(RTX2080_LINUX_APPS), APP_QUERY_FIELDS))
    ps = {5268: PsEntry(5268, "alice", 120, "")}
    commands = {5268: "/usr/bin/ffmpeg -i in.mp4 out.mp4", 5267: "ffmpeg -i b.mp4"}
    seen, unseen = attribute([_gpu(RTX2080_LINUX_GPU)], nameless, ps, commands)
    assert (seen.user, seen.name, seen.command) == ("alice", "/usr/bin/ffmpeg", "/usr/bin/ffmpeg -i in.mp4 out.mp4")
    # a pid the owners listing did not show gets no command either (it may be another process by now)
    assert (unseen.user, unseen.name, unseen.command) == (None, "", None)


def test_attribute_never_invents_an_owner() -> None:
    apps, _ = parse_compute_apps(_read(RTX2080_LINUX_APPS))
    ps = {5268: PsEntry(5268, "alice", 120, "ffmpeg -i in.mp4 out.mp4")}
    processes = attribute([_gpu(RTX2080_LINUX_GPU)], apps, ps)
    seen, unseen = processes
    assert seen.user == "alice" and seen.seen_by_ps
    assert unseen.pid == 5267
    assert (unseen.user, unseen.command, unseen.runtime_seconds) == (None, None, None)
    assert not unseen.seen_by_ps
    assert unseen.name == "ffmpeg" and unseen.gpu_index == 0


def test_a_damaged_header_is_no_header_rather_than_shifted_columns() -> None:
    # Found by bench/fuzz.py (seed 3): the real 115-field Windows capture with one ", " in the
    # header and one in the row each replaced by non-UTF-8 bytes (decoded as U+FFFD): as wide as
    # each other again, with every column after the damage shifted by one.
    header, row = _data_lines(_read(WIN2021_GPU))
    expected, _ = parse_query_gpu(header + "\n" + row + "\n")
    damaged_header = header.replace(" [MHz], ", " [MHz\ufffd\ufffd", 1)
    damaged_row = row.replace("[N/A], [N/A]", "[N/A],\ufffd\ufffd/A]", 1)
    assert len(damaged_header.split(", ")) == len(damaged_row.split(", "))
    gpus, issues = parse_query_gpu(damaged_header + "\n" + damaged_row + "\n")
    assert gpus == [] and issues and issues[0].kind is HostErrorKind.UNPARSEABLE
    assert expected and expected[0].power_w is not None


def test_parse_owners_keeps_a_name_with_blanks_whole_and_gives_each_uid() -> None:
    """``ps -o pid=,etimes=,uid=,user:64=``: the user last, so ``john doe`` is one name."""
    text = (
        "   4242   93784  1004 john doe                                                        \n"
        "      2 8123456     0 root\n"
        "    777       5  1001 1001\n"
        "    888       - 70000 jos??\n"
    )
    entries, uids, issues = parse_owners(text)
    assert issues == []
    assert entries == {
        4242: PsEntry(4242, "john doe", 93784, ""),
        2: PsEntry(2, "root", 8123456, ""),
        777: PsEntry(777, "1001", 5, ""),
        888: PsEntry(888, "jos??", None, ""),
    }
    assert uids == {4242: 1004, 2: 0, 777: 1001, 888: 70000}
    entries, uids, issues = parse_owners("   4242   93784  1004 john doe\n   4242 5 1005 mallory\n  99 5 x y\n")
    assert entries == {} and uids == {}
    assert [i.kind for i in issues] == [HostErrorKind.PROBE_FAILED, HostErrorKind.PROBE_FAILED]
    assert "99 5 x y" in issues[0].message


@pytest.mark.skipif(shutil.which("ps") is None, reason="no ps here")
def test_parse_owners_real_output() -> None:
    pid = str(os.getpid())
    done = subprocess.run(["ps", "-ww", "-o", OWNERS_FORMAT, "-p", pid], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"ps does not support {OWNERS_FORMAT}: {done.stderr.strip()}")
    entries, uids, issues = parse_owners(done.stdout)
    assert issues == []
    assert entries[os.getpid()].user == pwd.getpwuid(os.getuid()).pw_name
    assert uids == {os.getpid(): os.getuid()}


def test_parse_owners_refuses_a_user_ps_cannot_print_under_the_c_locale() -> None:
    """Two lines run together (a line break lost to a bad byte) are no owner line: the user would
    swallow the next line, whose process would lose its owner without a word."""
    text = "  15076     676  1003 verylongusername\ufffd   2056     656     0 root\n   12 5 0 root\n"
    entries, uids, issues = parse_owners(text)
    assert set(entries) == {12} and uids == {12: 0}
    assert [i.kind for i in issues] == [HostErrorKind.PROBE_FAILED]
