"""The rules about the rest of a host and about GPU health (disk_above, memory_above, load_above,
host_rebooted, driver_changed, ecc_errors, row_remap_pending, gpu_throttled), and "GPUs per user"
counted by the person behind each process. Same lifecycle, silences and routes as the other rules.

GPU rows are the real captures (tests/builders.py; their health fields are the captures'
own); a reading a capture cannot show (an ECC error, a full disk) is set on the parsed record, and
the end-to-end tests (tests/test_attribution_e2e.py) fill a real disk."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from builders import CONTEXT, DAY, MIN, T0, Engine, Job, alice, error_host, h100_host, kinds
from fleet import ERR_VERSION_MISMATCH, ERR_VERSION_MISMATCH_NVML, capture_bytes
from gpuwatch import probe
from gpuwatch.config import AlertsConfig, ConfigError
from gpuwatch.config.load import parse_config
from gpuwatch.daemon import Daemon
from gpuwatch.message import Message
from gpuwatch.model import Container, Disk, FleetSnapshot, HostSnapshot, SlurmJob
from gpuwatch.poll import Poller
from gpuwatch.report import alert_message, notice_text
from gpuwatch.rules import BY_NAME
from gpuwatch.rules.context import Threshold
from gpuwatch.rules.health import EccErrors, GpuThrottled
from gpuwatch.rules.users import GpuLimit
from gpuwatch.store import AlertStore, Outbox, open_db


def with_context(host: HostSnapshot, **changes: object) -> HostSnapshot:
    return replace(host, context=replace(CONTEXT, **changes))


def engine(**rules: object) -> Engine:
    return Engine(AlertsConfig(rules=rules))


def test_the_new_rules_parse_their_settings() -> None:
    assert BY_NAME["disk_above"].parse(90, "alerts.disk_above") == Threshold(90)
    assert BY_NAME["disk_above"].parse({"percent": 95, "for": "10m"}, "alerts.disk_above") == Threshold(95, 600)
    assert BY_NAME["load_above"].parse(2.5, "alerts.load_above") == Threshold(2.5)
    assert BY_NAME["gpu_throttled"].parse(True, "alerts.gpu_throttled") == GpuThrottled()
    assert BY_NAME["gpu_throttled"].parse({"for": "1m", "reasons": ["thermal"]}, "x") == GpuThrottled(60, ("thermal",))
    for name, bad in (
        ("disk_above", 101),
        ("memory_above", "lots"),
        ("load_above", -1),
        ("gpu_throttled", {"reasons": ["x"]}),
    ):
        with pytest.raises(ConfigError, match=f"alerts.{name}"):
            BY_NAME[name].parse(bad, f"alerts.{name}")


# ---------------------------------------------------------------- disks, memory, load


def test_disk_above_fires_per_mount_and_resolves_only_when_disks_are_known() -> None:
    e = engine(disk_above=Threshold(90))
    host = h100_host("gpu-a")
    full = (Disk("/", "ext4", 1000, 400, 600, 40, ("/",)), Disk("/scratch", "xfs", 1000, 970, 30, 97))
    fired = e.step(T0, with_context(host, disks=full))
    assert kinds(fired) == [("firing", "disk_above|gpu-a||||/scratch")]
    message = alert_message(fired, [], {}, tz=timezone.utc)
    assert message is not None and "gpu-a disk /scratch is 97% full, 30 KiB free of 1000 KiB" in message.blocks[0]
    assert e.step(T0 + MIN, with_context(host, disks=(), disks_known=False)) == []  # df failed: nothing resolves
    assert e.step(T0 + 2 * MIN, replace(host, context=None)) == []  # an older probe: not judged either
    assert kinds(e.step(T0 + 3 * MIN, with_context(host))) == [("resolved", "disk_above|gpu-a||||/scratch")]


def test_memory_and_load_above_hold_for_their_for() -> None:
    e = engine(memory_above=Threshold(90, 10 * MIN), load_above=Threshold(2.0))
    busy = with_context(h100_host("gpu-a"), memory_available_kib=1024 * 1024, load_5m=24.0)
    assert kinds(e.step(T0, busy)) == [("firing", "load_above|gpu-a||||")]  # 3.0 per CPU
    assert e.step(T0 + 5 * MIN, busy) == []
    assert kinds(e.step(T0 + 10 * MIN, busy)) == [("firing", "memory_above|gpu-a||||")]
    record = e.records["memory_above|gpu-a||||"]
    assert (record.value, record.threshold, record.unit) == (98.4, 90, "%")
    # A host whose GPUs failed still says how busy it is.
    mismatch = replace(error_host("gpu-a", ERR_VERSION_MISMATCH), context=busy.context)
    assert e.step(T0 + 11 * MIN, mismatch) == []
    assert len(e.firing()) == 2


# ---------------------------------------------------------------- notices


def test_host_rebooted_is_one_notice() -> None:
    e = engine(host_rebooted=BY_NAME["host_rebooted"].parse(True, "x"))
    host = h100_host("gpu-a")
    assert e.step(T0, with_context(host)) == [] and e.notices == []  # the first boot time is remembered
    e.step(T0 + MIN, with_context(host, boot_time=CONTEXT.boot_time + 1))  # the clock moved a second
    assert e.notices == []
    e.step(T0 + 2 * MIN, with_context(host, boot_time=CONTEXT.boot_time + 4000, uptime_seconds=30.0))
    (notice,) = e.notices
    assert (notice.kind, notice.rule, notice.users) == ("host_rebooted", "host_rebooted", ())
    assert "gpu-a rebooted at" in notice_text(notice) and "up 30s" in notice_text(notice)
    e.step(T0 + 3 * MIN, with_context(host, boot_time=CONTEXT.boot_time + 4000))
    assert e.notices == []  # once


def test_driver_changed_then_a_mismatch_gives_a_hint_once() -> None:
    e = engine(driver_changed=BY_NAME["driver_changed"].parse(True, "x"))
    ok = with_context(h100_host("gpu-a"))
    e.step(T0, ok)
    assert e.notices == []
    # An unattended upgrade: the library is new, the kernel module old (the real message, with its version).
    mismatch = error_host("gpu-a", ERR_VERSION_MISMATCH_NVML)
    e.step(T0 + MIN, mismatch)
    (notice,) = e.notices
    assert notice.kind == "driver_changed" and notice.facts["from"] == "590.48.01" and notice.facts["mismatch"]
    assert "reboot" in notice_text(notice)
    e.step(T0 + 2 * MIN, mismatch)
    assert e.notices == []
    # Another host's mismatch message names no version: the hint comes once, with what it ran before.
    other = engine(driver_changed=BY_NAME["driver_changed"].parse(True, "x"))
    other.step(T0, ok)
    plain = error_host("gpu-a", ERR_VERSION_MISMATCH)
    other.step(T0 + MIN, plain)
    (hint,) = other.notices
    assert hint.kind == "driver_mismatch" and "after running driver 590.48.01" in notice_text(hint)
    other.step(T0 + 2 * MIN, plain)
    assert other.notices == []
    # Rebooted on the new driver: a change, no mismatch.
    other.step(T0 + 3 * MIN, with_context(h100_host("gpu-a"), driver_version="595.80"))
    (change,) = other.notices
    assert (change.facts["from"], change.facts["to"], change.facts["mismatch"]) == ("590.48.01", "595.80", False)
    assert "mismatch" not in notice_text(change)


def test_the_mismatch_capture_names_the_new_library() -> None:
    assert "NVML library version" in capture_bytes(ERR_VERSION_MISMATCH_NVML).decode()


# ---------------------------------------------------------------- GPU health


def sick(host: HostSnapshot, gpu: int, **health: object) -> HostSnapshot:
    gpus = list(host.gpus)
    assert gpus[gpu].health is not None  # the capture's own health fields
    gpus[gpu] = replace(gpus[gpu], health=replace(gpus[gpu].health, **health))
    return replace(host, gpus=tuple(gpus))


def test_ecc_errors_fire_when_uncorrectable_errors_rise_and_resolve_after_a_reset() -> None:
    e = engine(ecc_errors=EccErrors())
    healthy = h100_host("gpu-a")  # the capture: 0 volatile, 0 aggregate
    assert e.step(T0, healthy) == []
    errors = sick(healthy, 1, ecc_uncorrected_volatile=2, ecc_uncorrected_aggregate=2)
    fired = e.step(T0 + MIN, errors)
    assert kinds(fired) == [("firing", "ecc_errors|gpu-a|1|||")]
    assert "2 since the driver loaded, 2 in its lifetime (was 0)" in alert_message(fired, [], {}).blocks[0]  # type: ignore[union-attr]
    reset = sick(healthy, 1, ecc_uncorrected_volatile=0, ecc_uncorrected_aggregate=2)  # after a GPU reset
    assert kinds(e.step(T0 + 2 * MIN, reset)) == [("resolved", "ecc_errors|gpu-a|1|||")]
    again = sick(healthy, 1, ecc_uncorrected_volatile=1, ecc_uncorrected_aggregate=3)
    assert kinds(e.step(T0 + 3 * MIN, again)) == [("firing", "ecc_errors|gpu-a|1|||")]
    assert e.step(T0 + 3 * MIN + 1, reset := sick(healthy, 1, ecc_uncorrected_volatile=0, ecc_uncorrected_aggregate=3))
    # Where only the lifetime count is reported, its rise above the last baseline fires.
    lifetime = sick(healthy, 1, ecc_uncorrected_volatile=None, ecc_uncorrected_aggregate=4)
    fired = e.step(T0 + 3 * MIN + 2, lifetime)
    assert kinds(fired) == [("firing", "ecc_errors|gpu-a|1|||")] and fired[0].record.value == 1
    assert reset
    # A poll without health readings (the driver refused a field) judges nothing.
    unknown = replace(again, gpus=tuple(replace(g, health=None) for g in again.gpus))
    assert e.step(T0 + 4 * MIN, unknown) == []


def test_row_remap_pending_and_failure() -> None:
    e = engine(row_remap_pending=EccErrors())
    host = h100_host("gpu-a")
    assert e.step(T0, host) == []
    fired = e.step(T0 + MIN, sick(host, 2, remapped_rows_pending=True))
    assert kinds(fired) == [("firing", "row_remap_pending|gpu-a|2|||")]
    assert "remapped rows waiting to be remapped: reset the GPU" in alert_message(fired, [], {}).blocks[0]  # type: ignore[union-attr]
    assert kinds(e.step(T0 + 2 * MIN, host)) == [("resolved", "row_remap_pending|gpu-a|2|||")]


def test_gpu_throttled_holds_for_its_for() -> None:
    e = engine(gpu_throttled=GpuThrottled(5 * MIN))
    hot = sick(h100_host("gpu-a"), 0, hw_thermal_slowdown=True)
    assert e.step(T0, hot) == []
    assert e.step(T0 + 4 * MIN, hot) == []
    fired = e.step(T0 + 5 * MIN, hot)
    assert kinds(fired) == [("firing", "gpu_throttled|gpu-a|0|||")]
    assert "slowed down by the hardware (thermal)" in alert_message(fired, [], {}).blocks[0]  # type: ignore[union-attr]


# ---------------------------------------------------------------- GPUs per user, by owner


def test_gpus_per_user_count_the_person_behind_each_process() -> None:
    """root runs three containers on three GPUs; they are alice's (two) and bob's (one Slurm job)."""
    host = h100_host("gpu-a", [Job("root", 4100, 0), Job("root", 4101, 1), Job("root", 4102, 2)])
    jupyter = Container("docker", "3a73d078dfe897882443cb09785b9ac896a989cc4b8c721c61e08596ae642b4a", "dazzling_wiles")
    owners = {
        4100: dict(container=jupyter, attributed_owner="alice", owner_source="label"),
        4101: dict(container=jupyter, attributed_owner="alice", owner_source="label"),
        4102: dict(slurm_job=SlurmJob("48213", "0", 1004, "bob"), attributed_owner="bob", owner_source="slurm"),
    }
    host = replace(host, processes=tuple(replace(p, **owners.get(p.pid, {})) for p in host.processes))  # type: ignore[arg-type]
    e = Engine(AlertsConfig(rules={"max_gpus_per_user": GpuLimit(1)}))
    assert kinds(e.step(T0, host)) == [("firing", "max_gpus_per_user|gpu-a||alice||")]  # not "root holds 3"
    assert e.records["max_gpus_per_user|gpu-a||alice||"].facts["gpus"] == [0, 1]


def test_max_runtime_names_the_owner_and_where_it_runs() -> None:
    host = h100_host("gpu-a", alice([0], elapsed=int(4 * DAY)))
    job = SlurmJob("48213", "0")
    host = replace(host, processes=tuple(replace(p, slurm_job=job) for p in host.processes))
    e = Engine(AlertsConfig(rules={"max_runtime": BY_NAME["max_runtime"].parse("3d", "x")}))
    (fired,) = e.step(T0, host)
    assert (
        "alice's process 4100 (python3 train.py --epochs 90; slurm 48213)" in alert_message([fired], [], {}).blocks[0]
    )  # type: ignore[union-attr]


def test_a_probe_without_the_host_step_leaves_the_context_rules_unjudged() -> None:
    """An older probe's output (no host section): no context, so no disk alert fires or resolves."""
    output = f"{probe.PROBE_MARKER}\n@@begin gpu\nNo devices were found\n\n@@end gpu 6\n"
    snap = probe.snapshot_from_output("gpu-a", "gpu-a", output)
    assert snap.context is None
    assert not BY_NAME["disk_above"].needs.met_by(snap) and not BY_NAME["memory_above"].needs.met_by(snap)


# ---------------------------------------------------------------- routes


class Recording:
    """A channel that keeps what it was asked to prepare (the daemon queues, the test reads)."""

    dry_run = False

    def __init__(self, name: str) -> None:
        self.name = name

    def prepare(self, message: Message) -> list[dict[str, Any]]:
        return [{"title": message.title, "text": "\n".join(message.blocks)}]

    def deliver(self, payload: dict[str, Any]) -> None:
        raise AssertionError("nothing is sent in this test")

    def describe(self, payload: dict[str, Any]) -> str:
        return str(payload)


def test_a_notice_goes_where_its_rule_is_routed(tmp_path: Path) -> None:
    """host_rebooted routed to e-mail, gpu_freed (the default) to Feishu: the notice of a reboot is
    queued for e-mail only."""
    config = parse_config(
        {
            "hosts": ["gpu-a"],
            "state_dir": str(tmp_path),
            "feishu": {"url": "https://example.invalid/hook"},
            "email": {"to": ["admins@example.invalid"], "from": "gpuwatch@example.invalid", "smtp_host": "localhost"},
            "alerts": {"host_rebooted": True, "routes": {"host_rebooted": ["email"], "default": ["feishu"]}},
        }
    )
    outbox = Outbox(open_db(tmp_path))
    channels = {"feishu": Recording("feishu"), "email": Recording("email")}
    daemon = Daemon(config, Poller([], lambda h: None), outbox, channels, alert_store=AlertStore(outbox.db))  # type: ignore[arg-type, return-value]
    host = with_context(h100_host("gpu-a"))

    def fleet(snap: HostSnapshot) -> FleetSnapshot:
        return FleetSnapshot(datetime.fromtimestamp(T0, timezone.utc), (snap,))

    daemon.alerts(fleet(host))
    daemon.alerts(fleet(with_context(h100_host("gpu-a"), boot_time=CONTEXT.boot_time + 4000)))
    queued = outbox.pending()
    assert [(item.channel, "rebooted" in json.dumps(item.payload)) for item in queued] == [("email", True)]
    outbox.db.close()
