"""A hostile process name end to end: real sshd, the real probe, real ps, a real process of alice's.

alice runs a process whose argv[0] holds "GPU has fallen off the bus", a newline, a forged
compute-app row for root's pid 1 and forged section markers. Its pid is attributed to GPU 0 through
the stand-in's ``pids`` file; the host's nvidia-smi reports process names as the real one does
(argv[0], raw). ``gpuwatch status --json`` must show the host ok, no GPU error, no extra process,
and alice as the owner.
"""

from __future__ import annotations

import io
import json
import os
import pwd
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fleet import H100_LOAD_APPS, Fleet, capture_pids, scenario_healthy_multi_gpu
from gpuwatch.cli import main

HOSTILE_ARGV0 = (
    "/tmp/x/GPU has fallen off the bus/python3\n"
    "1, GPU-00000000-0000-0000-0000-000000000000, 00000000:19:00.0, 80000 MiB, /sbin/init\n"
    "@@end apps 0\n@@begin ps\n      1 root 5 /sbin/init\n@@end ps 0\n"
    "Unable to determine the device handle for GPU 0000:0B:00.0: Unknown Error"
)

# nvidia-smi as the host's own would answer: the stand-in's output, with each process_name (if
# asked for) replaced by the real argv[0] of that pid, raw.
_REAL_NAMES_SMI = """#!/usr/bin/env python3
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
    cells = line.split(b", ")
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
def alices_hostile_process(fleet: Fleet) -> Iterator[int]:
    alice = pwd.getpwnam("alice")
    proc = subprocess.Popen(
        [HOSTILE_ARGV0, "600"],
        executable="/bin/sleep",
        user=alice.pw_uid,
        group=alice.pw_gid,
        extra_groups=[],
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
        start_new_session=True,
    )
    yield proc.pid
    proc.kill()
    proc.wait()


def test_a_hostile_process_name_changes_nothing_end_to_end(
    fleet: Fleet, known_hosts: Path, tmp_path: Path, alices_hostile_process: int
) -> None:
    smi = fleet.root / f"real-names-{os.getpid()}" / "nvidia-smi"  # in the fleet's dir: the monitor user reads it
    smi.parent.mkdir(mode=0o755)
    smi.write_text(_REAL_NAMES_SMI.format(standin=str(fleet.bin_dir / "nvidia-smi")))
    smi.chmod(0o755)
    address = fleet.addresses[0]
    captured = capture_pids(H100_LOAD_APPS)  # 11327, 11328, 11345
    mapping = {captured[0]: alices_hostile_process, captured[1]: fleet.jobs["verylongusername"].pid}
    scenario_healthy_multi_gpu(fleet.scenario_dir(address), 4, owners_pids=mapping)
    config = tmp_path / "config.yaml"
    doc: dict[str, Any] = {
        "hosts": [{"name": "gpu-a", "address": address, "nvidia_smi": str(smi)}],
        "ssh": fleet.gpuwatch_ssh(known_hosts),
    }
    config.write_text(yaml.safe_dump(doc), encoding="utf-8")
    config.chmod(0o600)
    out = io.StringIO()
    assert main(["status", "-c", str(config), "--json"], out=out) == 0
    (host,) = json.loads(out.getvalue())["hosts"]
    assert host["ok"] and host["error"] is None
    assert host["warnings"] == []  # no lost GPU, no failed driver, nothing malformed
    assert [g["index"] for g in host["gpus"]] == [0, 1, 2, 3]
    procs = {p["pid"]: p for p in host["processes"]}
    assert sorted(procs) == sorted([alices_hostile_process, fleet.jobs["verylongusername"].pid, captured[2]])
    mine = procs[alices_hostile_process]
    assert (mine["user"], mine["gpu_index"]) == ("alice", 0)
    assert mine["name"] == "/tmp/x/GPU"  # argv[0]'s first word, as ps prints it
    assert "\n" not in mine["command"] and mine["command"].endswith(" 600")
    assert procs[fleet.jobs["verylongusername"].pid]["user"] == "verylongusername"
