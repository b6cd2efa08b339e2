"""Owner first, context after, everywhere people read (status, the overview, the user report), and
the host's context: a line per host in ``status``, only what is wrong in the overview, every field in
``--json`` (added beside the existing ones, none renamed)."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timezone

from builders import CONTEXT, T0, Job, h100_host
from gpuwatch.config import FreeGpuConfig
from gpuwatch.model import Container, Disk, FleetSnapshot, HostErrorKind, HostSnapshot, SlurmJob
from gpuwatch.render import fleet_table, snapshot_dict
from gpuwatch.report import overview, user_report

JUPYTER = Container(
    "docker",
    "3a73d078dfe897882443cb09785b9ac896a989cc4b8c721c61e08596ae642b4a",
    "dazzling_wiles",
    "jupyterhub/singleuser:latest",
)


def attributed() -> HostSnapshot:
    """root's two processes on GPU 0 and 1: alice's container and bob's Slurm job (v1: its uid)."""
    host = h100_host("gpu-a", [Job("root", 4100, 0), Job("root", 4101, 1)])
    who = {
        4100: dict(container=JUPYTER, attributed_owner="alice", owner_source="label"),
        4101: dict(slurm_job=SlurmJob("48213", "0", 1004, "bob"), attributed_owner="bob", owner_source="slurm"),
    }
    processes = tuple(replace(p, **who.get(p.pid, {})) for p in host.processes)  # type: ignore[arg-type]
    return replace(host, processes=processes, context=CONTEXT)


def fleet(*hosts: HostSnapshot) -> FleetSnapshot:
    return FleetSnapshot(datetime.fromtimestamp(T0, timezone.utc), hosts)


def test_owner_first_and_context_after_in_status_and_the_overview() -> None:
    snap = fleet(attributed())
    table = fleet_table(snap, FreeGpuConfig())
    assert "alice (docker dazzling_wiles, jupyterhub/singleuser:latest)(2566M)" in table
    assert "bob (slurm 48213)(2566M)" in table
    assert "root" not in table.split("\n\n")[0]  # nobody reads "root holds 2 GPUs"
    text = "\n".join(overview(snap, FreeGpuConfig()).blocks)
    assert "alice (docker dazzling_wiles, jupyterhub/singleuser:latest) 2566 MiB" in text
    assert "bob (slurm 48213) 2566 MiB" in text
    mine = "\n".join(user_report(snap, "bob").blocks)
    assert "pid 4101 python3 train.py --epochs 90 (slurm 48213), 2566 MiB" in mine


def test_status_has_a_context_line_per_host() -> None:
    table = fleet_table(fleet(attributed()), FreeGpuConfig())
    assert (
        "gpu-a: load 1/1/1 on 8 CPUs, mem 16.0 GiB/64.0 GiB, disk / 40%, up 1h, kernel 6.8.0-45-generic, "
        "driver 590.48.01, persistence on"
    ) in table


def test_the_overview_shows_only_what_is_wrong() -> None:
    healthy = attributed()
    assert "disk" not in "\n".join(overview(fleet(healthy), FreeGpuConfig()).blocks)
    full = replace(
        healthy,
        context=replace(
            CONTEXT,
            disks=(*CONTEXT.disks, Disk("/scratch", "xfs", 1024 * 1024 * 100, 1024 * 1024 * 97, 1024 * 1024 * 3, 97)),
            memory_available_kib=1024 * 1024,
        ),
    )
    block = overview(fleet(full), FreeGpuConfig()).blocks[0]
    assert "    disk /scratch 97% full (3.0 GiB free)" in block
    assert "    memory 98% used (63.0 GiB of 64.0 GiB)" in block
    assert "disk / " not in block  # 40 %: nothing to say
    # A host whose GPUs failed still says its disk is full.
    failed = replace(
        HostSnapshot.failed("gpu-b", "gpu-b", HostErrorKind.DRIVER_MISMATCH, "driver mismatch"),
        context=full.context,
    )
    block = overview(fleet(healthy, failed), FreeGpuConfig()).blocks[0]
    assert block.startswith("gpu-b: NO DATA") and "disk /scratch 97% full" in block


def test_json_adds_owner_container_job_health_and_context() -> None:
    doc = snapshot_dict(fleet(attributed()))
    json.dumps(doc, allow_nan=False)  # strict JSON
    host = doc["hosts"][0]
    first = {p["pid"]: p for p in host["processes"]}
    assert first[4100]["user"] == "root" and first[4100]["owner"] == "alice"  # user: still ps's
    assert first[4100]["owner_source"] == "label"
    assert first[4100]["container"] == {
        "runtime": "docker",
        "id": JUPYTER.id,
        "name": "dazzling_wiles",
        "image": "jupyterhub/singleuser:latest",
        "pod": None,
        "namespace": None,
        "pod_uid": None,
        "rootless_uid": None,
    }
    assert first[4101]["slurm_job"] == {"job_id": "48213", "step": "0", "uid": 1004, "user": "bob"}
    unseen = [p for p in host["processes"] if p["user"] is None]
    assert unseen and all(p["owner"] is None and p["container"] is None for p in unseen)
    gpu = host["gpus"][0]
    assert gpu["health"]["ecc_uncorrected_volatile"] == 0 and gpu["health"]["retired_pages_pending"] is None
    context = host["context"]
    assert context["disks"] == [
        {"mount": "/", "fs_type": "ext4", "size_kib": 1000, "used_kib": 400, "available_kib": 600, "use_percent": 40,
         "paths": ["/", "/home", "/tmp"]}
    ]  # fmt: skip
    assert context["boot_time"] == "2027-01-15T07:00:00+00:00" and context["memory_used_kib"] == 16 * 1024 * 1024
    # the existing keys stay as they were
    assert set(doc["hosts"][0]) >= {"name", "address", "ok", "error", "error_kind", "gpus", "processes", "warnings"}
