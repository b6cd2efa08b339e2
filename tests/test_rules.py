"""The alert rules and their lifecycle as pure timelines: snapshots in, transitions out.

Every snapshot is built from real captures: GPU rows and compute-app rows come from the files in
tests/fixtures/ (stacked into multi-GPU hosts by the helpers of tests/fleet.py, which rewrite only
the index/uuid/bus-id cells), error output from the real error captures, and the owners are the
``PsEntry`` records a test gives (what ``ps`` on the host would say), joined by ``parse.attribute``.
The clock is explicit: each step says what time it is.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import replace
from datetime import timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

from builders import (
    DAY,
    H100_PIDS,
    HOUR,
    MIN,
    T0,
    Engine,
    Job,
    alerts_config,
    alice,
    down,
    error_host,
    h100_host,
    h100_stack,
    kinds,
    l40s_host,
    mig_host,
    probe_output,
)
from fakefeishu import seen
from fleet import (
    ERR_GPU_LOST,
    ERR_NO_DRIVER,
    ERR_UNKNOWN_SPACE,
    ERR_VERSION_MISMATCH,
    ERR_VERSION_MISMATCH_NVML,
    H100_IDLE_QUERY,
    H100_LOAD_QUERY,
    _stack_gpus,
    capture_bytes,
)
from gpuwatch.config import ConfigError
from gpuwatch.config.load import parse_config
from gpuwatch.model import HostErrorKind, HostSnapshot
from gpuwatch.notify.feishu import FeishuChannel, FeishuSettings
from gpuwatch.parse import classify_nvidia_smi_error, parse_query_gpu
from gpuwatch.probe import snapshot_from_output
from gpuwatch.report import AlertWords, alert_message, alert_words, notice_text
from gpuwatch.rules import (
    HOST_REMOVED,
    AlertKey,
    AlertRecord,
    Evaluation,
    Memory,
    Notice,
    Silence,
    Transition,
    advance,
    inhibited,
    silence_check,
)
from gpuwatch.rules.freed import GpuFreed
from gpuwatch.rules.gpus import IdleGpu, TemperatureAbove
from gpuwatch.rules.hosts import GpuError, GpuMissing, HostDown
from gpuwatch.rules.users import GpuLimit, MaxRuntime
from gpuwatch.store import AlertStore, open_db

FIXTURES = Path(__file__).parent / "fixtures" / "nvidia-smi"
UNRELATED_FAILURE = "errors/nvgpuexp-h100-mig-linux-590.48.01-nvlink-s-mig-not-supported.txt"


def said(record: AlertRecord) -> AlertWords:
    """The words of an alert: its rule's, from the numbers and facts its check gave."""
    return alert_words(record)


# ---------------------------------------------------------------- the builders themselves


def test_builders_replay_real_rows_and_the_given_owners() -> None:
    host = h100_host("gpu-a", [Job("alice", 4100, 0, 90), Job("bob", 4200, 0, 30), Job("alice", 4102, 2)])
    assert [g.index for g in host.gpus] == [0, 1, 2, 3]
    assert (host.gpus[0].utilization_percent, host.gpus[0].memory_used_mib, host.gpus[0].temperature_c) == (
        100,
        19818,
        59,
    )
    assert (host.gpus[1].utilization_percent, host.gpus[1].memory_used_mib) == (0, 0)
    on0 = {p.pid: p for p in host.processes_on(host.gpus[0])}
    assert on0[4100].user == "alice" and on0[4100].used_memory_mib == 2566 and on0[4100].runtime_seconds == 90
    assert on0[4200].user == "bob" and on0[4200].used_memory_mib == 1542
    assert on0[H100_PIDS[2]].user is None  # the captured gpu_burn: ps does not see it
    assert host.processes_on(host.gpus[1]) == ()
    assert {p.pid for p in host.processes_on(host.gpus[2])} == {4102, H100_PIDS[1], H100_PIDS[2]}


# ---------------------------------------------------------------- fire once, remind, resolve


def test_fires_once_reminds_exactly_after_repeat_every_and_resolves_once() -> None:
    engine = Engine(alerts_config(max_gpus_per_user=2, max_runtime="72h", repeat_every="4h"))
    over = h100_host("gpu-a", alice([0, 1, 2]))
    fired = engine.step(T0, over)
    assert kinds(fired) == [("firing", "max_gpus_per_user|gpu-a||alice||")]
    (t,) = fired
    assert (t.record.value, t.record.threshold, t.record.unit) == (3, 2, "GPUs")
    assert said(t.record).value == "3 GPUs" and said(t.record).threshold == "at most 2 per host"
    assert "alice holds 3 GPUs on gpu-a (GPU 0, 1, 2)" in said(t.record).summary

    # every minute for 4 hours minus one poll: nothing at all
    for minute in range(1, 240):
        assert engine.step(T0 + minute * MIN, over) == [], minute
    reminded = engine.step(T0 + 4 * HOUR, over)
    assert kinds(reminded) == [("reminder", "max_gpus_per_user|gpu-a||alice||")]
    assert reminded[0].record.since == T0  # the alert's age, not the reminder's
    assert engine.step(T0 + 4 * HOUR + MIN, over) == []
    assert engine.step(T0 + 8 * HOUR - MIN, over) == []
    assert kinds(engine.step(T0 + 8 * HOUR, over)) == [("reminder", "max_gpus_per_user|gpu-a||alice||")]

    fixed = h100_host("gpu-a", alice([0, 1]))  # the admin's rule is kept again
    resolved = engine.step(T0 + 9 * HOUR, fixed)
    assert kinds(resolved) == [("resolved", "max_gpus_per_user|gpu-a||alice||")]
    assert resolved[0].record.fired_at == T0
    assert engine.records == {}
    for minute in range(1, 30):
        assert engine.step(T0 + 9 * HOUR + minute * MIN, fixed) == []


def test_send_resolved_false_says_nothing_when_it_clears() -> None:
    engine = Engine(alerts_config(max_gpus_per_user=2, send_resolved=False))
    assert len(engine.step(T0, h100_host("gpu-a", alice([0, 1, 2])))) == 1
    assert engine.step(T0 + MIN, h100_host("gpu-a", alice([0]))) == []
    assert engine.records == {}


def test_identity_ignores_values_that_change_from_poll_to_poll() -> None:
    engine = Engine(alerts_config(max_gpus_per_user=2, max_runtime="72h", temperature_above=55))
    three_days = int(3 * DAY)
    first = engine.step(T0, h100_host("gpu-a", alice([0, 1, 2], elapsed=three_days + 1)))
    assert kinds(first) == [
        ("firing", "max_gpus_per_user|gpu-a||alice||"),
        ("firing", "max_runtime|gpu-a||alice|4100|"),
        ("firing", "max_runtime|gpu-a||alice|4101|"),
        ("firing", "max_runtime|gpu-a||alice|4102|"),
        ("firing", "temperature_above|gpu-a|0|||"),
        ("firing", "temperature_above|gpu-a|1|||"),
        ("firing", "temperature_above|gpu-a|2|||"),
    ]
    # The runtimes grow, alice takes a fourth GPU (with a young job), the readings move: the same
    # alerts, nothing new, except the new GPU's own temperature, which is a new alert.
    second = engine.step(
        T0 + MIN, h100_host("gpu-a", [*alice([0, 1, 2], elapsed=three_days + 61), Job("alice", 4103, 3, 5)])
    )
    assert kinds(second) == [("firing", "temperature_above|gpu-a|3|||")]
    for minute in range(2, 20):
        jobs = [*alice([0, 1, 2], elapsed=three_days + 1 + minute * 60), Job("alice", 4103, 3, minute * 60)]
        assert engine.step(T0 + minute * MIN, h100_host("gpu-a", jobs)) == []
    record = engine.records["max_gpus_per_user|gpu-a||alice||"]
    assert said(record).value == "4 GPUs" and "GPU 0, 1, 2, 3" in said(record).summary  # the text follows the readings
    assert record.since == T0 and record.last_sent_at == T0
    assert said(engine.records["max_runtime|gpu-a||alice|4100|"]).value == "3d19m"


def test_max_runtime_is_one_alert_per_process_and_a_new_job_is_a_new_alert() -> None:
    engine = Engine(alerts_config(max_runtime="72h"))
    old = Job("alice", 4100, 0, int(3 * DAY) + 5)
    young = Job("alice", 4101, 1, 3600)
    assert kinds(engine.step(T0, h100_host("gpu-a", [old, young]))) == [("firing", "max_runtime|gpu-a||alice|4100|")]
    # alice restarts the long job under a new pid: the old alert resolves, a new one fires only when
    # the new process has run too long itself.
    restarted = Job("alice", 4300, 0, 60)
    assert kinds(engine.step(T0 + MIN, h100_host("gpu-a", [restarted, young]))) == [
        ("resolved", "max_runtime|gpu-a||alice|4100|")
    ]
    assert engine.step(T0 + 2 * MIN, h100_host("gpu-a", [replace(restarted, elapsed=int(3 * DAY)), young])) == []
    assert kinds(engine.step(T0 + 3 * MIN, h100_host("gpu-a", [replace(restarted, elapsed=int(3 * DAY) + 1)]))) == [
        ("firing", "max_runtime|gpu-a||alice|4300|")
    ]


# ---------------------------------------------------------------- `for`: flapping is held back


def test_for_holds_back_a_flapping_condition_and_fires_once_it_held() -> None:
    engine = Engine(alerts_config(max_gpus_per_user=2, **{"for": "5m"}))
    over, ok = h100_host("gpu-a", alice([0, 1, 2])), h100_host("gpu-a", alice([0]))
    for minute in range(30):  # true / false / true / ... at one-minute polls
        assert engine.step(T0 + minute * MIN, over if minute % 2 == 0 else ok) == []
    assert engine.firing() == []
    start = T0 + 30 * MIN
    for minute in range(5):  # now it holds: pending from `start`
        assert engine.step(start + minute * MIN, over) == []
        assert engine.records["max_gpus_per_user|gpu-a||alice||"].state == "pending"
    fired = engine.step(start + 5 * MIN, over)
    assert kinds(fired) == [("firing", "max_gpus_per_user|gpu-a||alice||")]
    assert fired[0].record.since == start and fired[0].record.fired_at == start + 5 * MIN


def test_a_pending_alert_that_clears_is_forgotten_silently() -> None:
    engine = Engine(alerts_config(max_gpus_per_user=2, **{"for": "5m"}))
    assert engine.step(T0, h100_host("gpu-a", alice([0, 1, 2]))) == []
    assert engine.step(T0 + MIN, h100_host("gpu-a", alice([0]))) == []
    assert engine.records == {}


# ---------------------------------------------------------------- hosts that do not answer


def test_host_down_after_n_failed_polls_and_resolved_when_back() -> None:
    engine = Engine(alerts_config(host_down={"after": 3}))
    assert engine.step(T0, h100_host("gpu-a"), h100_host("gpu-b")) == []
    assert engine.step(T0 + MIN, h100_host("gpu-a"), down("gpu-b")) == []
    assert engine.step(T0 + 2 * MIN, h100_host("gpu-a"), down("gpu-b")) == []
    fired = engine.step(T0 + 3 * MIN, h100_host("gpu-a"), down("gpu-b"))
    assert kinds(fired) == [("firing", "host_down|gpu-b||||")]
    assert "connection refused" in said(fired[0].record).summary and said(fired[0].record).threshold == "alert after 3"
    for minute in range(4, 30):
        assert engine.step(T0 + minute * MIN, h100_host("gpu-a"), down("gpu-b")) == []
    assert kinds(engine.step(T0 + 30 * MIN, h100_host("gpu-a"), h100_host("gpu-b"))) == [
        ("resolved", "host_down|gpu-b||||")
    ]
    # the count starts again from zero after the host answered
    assert engine.step(T0 + 31 * MIN, h100_host("gpu-a"), down("gpu-b")) == []
    assert engine.step(T0 + 32 * MIN, h100_host("gpu-a"), down("gpu-b")) == []


def test_a_failed_poll_resolves_nothing() -> None:
    cfg = alerts_config(
        max_gpus_per_user=2,
        max_gpus_per_user_fleet=4,
        max_runtime="72h",
        temperature_above=55,
        idle_gpu={"after": "0s", "util_below": 10, "memory_above_mib": 1024},
        host_down={"after": 3},
    )
    engine = Engine(cfg)
    old = int(3 * DAY) + 60
    a_over = h100_host("gpu-a", alice([0, 1, 2], elapsed=old))
    b_over = h100_host("gpu-b", alice([0, 1], first_pid=5100))
    c_idle = l40s_host("gpu-c", [Job("bob", 6100, 0)])
    fired = engine.step(T0, a_over, b_over, c_idle)
    before = engine.firing()
    assert "max_gpus_per_user_fleet|*||alice||" in before  # 5 GPUs in the fleet
    assert {"idle_gpu|gpu-c|0|||", "max_gpus_per_user|gpu-a||alice||", "max_runtime|gpu-a||alice|4100|"} <= set(before)
    assert len(fired) == len(before)

    # gpu-a stops answering: its GPU alerts stay, and so does the fleet-wide alert (alice's GPUs on
    # gpu-a are not known to be free); nothing resolves, nothing fires again.
    for minute in range(1, 3):
        assert engine.step(T0 + minute * MIN, down("gpu-a"), b_over, c_idle) == []
    assert engine.firing() == before
    # gpu-c fails with a GPU error instead: its idle alert stays too (the GPU error is its own alert)
    steps = engine.step(T0 + 3 * MIN, down("gpu-a"), b_over, error_host("gpu-c", ERR_NO_DRIVER))
    assert kinds(steps) == [("firing", "host_down|gpu-a||||")]
    assert set(before) < set(engine.firing())

    # back, unchanged: no duplicate of anything; only host_down resolves
    back = engine.step(T0 + 4 * MIN, a_over, b_over, c_idle)
    assert kinds(back) == [("resolved", "host_down|gpu-a||||")]
    assert engine.firing() == before
    # back and fixed: now they resolve
    fixed = engine.step(T0 + 5 * MIN, h100_host("gpu-a", alice([0])), b_over, l40s_host("gpu-c"))
    assert kinds(fixed) == [
        ("resolved", "max_gpus_per_user_fleet|*||alice||"),
        ("resolved", "max_gpus_per_user|gpu-a||alice||"),
        ("resolved", "max_runtime|gpu-a||alice|4100|"),
        ("resolved", "max_runtime|gpu-a||alice|4101|"),
        ("resolved", "max_runtime|gpu-a||alice|4102|"),
        ("resolved", "temperature_above|gpu-a|1|||"),
        ("resolved", "temperature_above|gpu-a|2|||"),
    ]  # still true, still firing: gpu-a GPU 0 and gpu-b's heat, gpu-c's idle memory


def test_a_host_whose_ps_or_process_query_failed_resolves_no_process_alert() -> None:
    """A host that answers but whose process list or owners are unknown (the ps or compute-apps
    step failed or timed out) is, for the process rules, a failed poll: nothing about who runs
    what may resolve, and no job has 'ended'."""
    cfg = alerts_config(
        max_gpus_per_user=2, max_gpus_per_user_fleet=2, max_runtime="72h", gpu_freed={"users": ["alice"]}
    )
    engine = Engine(cfg)
    over = h100_stack("gpu-a", alice([0, 1, 2], elapsed=int(3 * DAY) + 60))
    real = snapshot_from_output("gpu-a", "gpu-a", probe_output(over))
    assert real == replace(over.snapshot(), probe_seconds=None)  # the probe's reading of it: the same
    assert real.ok and real.warnings == () and {p.user for p in real.processes} == {"alice", None}
    fired = engine.step(T0, real)
    assert len(fired) == 5  # per host, fleet-wide, three runtimes
    before = engine.firing()

    ps_timed_out = snapshot_from_output("gpu-a", "gpu-a", probe_output(over, ps_exit=124, ps_text=""))
    assert ps_timed_out.ok and {p.user for p in ps_timed_out.processes} == {None}
    assert [w.kind for w in ps_timed_out.warnings] == [HostErrorKind.PROBE_FAILED]
    apps_failed = snapshot_from_output("gpu-a", "gpu-a", probe_output(over, apps_exit=124, ps_text=""))
    assert apps_failed.ok and apps_failed.processes == ()
    for minute, partial in enumerate([ps_timed_out, apps_failed, ps_timed_out], start=1):
        assert engine.step(T0 + minute * MIN, partial) == []
        assert engine.notices == []  # alice's jobs have not "ended", her GPUs are not "free"
        assert engine.firing() == before
    assert engine.step(T0 + 5 * MIN, real) == []
    gone = engine.step(T0 + 6 * MIN, snapshot_from_output("gpu-a", "gpu-a", probe_output(h100_stack("gpu-a"))))
    assert {k for k, _ in kinds(gone)} == {"resolved"} and len(gone) == 5
    assert len([n for n in engine.notices if "has ended" in notice_text(n)]) == 3


# ---------------------------------------------------------------- GPUs: missing, errors, idle, MIG, heat


def test_gpu_missing_when_a_host_reports_fewer_gpus() -> None:
    engine = Engine(alerts_config(gpu_missing=True))
    assert engine.step(T0, h100_host("gpu-a", n_gpus=4)) == []
    fired = engine.step(T0 + MIN, h100_host("gpu-a", n_gpus=3))
    assert kinds(fired) == [("firing", "gpu_missing|gpu-a||||")]
    assert said(fired[0].record).value == "3 GPUs" and said(fired[0].record).threshold == "4 GPUs seen before"
    assert engine.step(T0 + 2 * MIN, down("gpu-a")) == []  # neither resolved nor a new baseline
    assert engine.step(T0 + 3 * MIN, h100_host("gpu-a", n_gpus=2)) == []  # the same alert, worse
    assert kinds(engine.step(T0 + 4 * MIN, h100_host("gpu-a", n_gpus=4))) == [("resolved", "gpu_missing|gpu-a||||")]


@pytest.mark.parametrize(
    ("capture", "kind"),
    [
        (ERR_GPU_LOST, "gpu_lost"),
        (ERR_VERSION_MISMATCH, "driver_mismatch"),
        (ERR_VERSION_MISMATCH_NVML, "driver_mismatch"),
        (ERR_NO_DRIVER, "driver_not_loaded"),
    ],
)
def test_gpu_error_from_a_real_error_capture(capture: str, kind: str) -> None:
    engine = Engine(alerts_config(gpu_error=True))
    assert engine.step(T0, h100_host("gpu-a")) == []
    broken = error_host("gpu-a", capture)
    fired = engine.step(T0 + MIN, broken)
    assert kinds(fired) == [("firing", f"gpu_error|gpu-a||||{kind}")]
    assert broken.error and broken.error in said(fired[0].record).summary
    assert engine.step(T0 + 2 * MIN, broken) == []
    assert engine.step(T0 + 3 * MIN, down("gpu-a")) == []  # unreachable says nothing about the GPUs
    # nor does nvidia-smi failing for another reason (a real capture of an unrelated failure)
    other = classify_nvidia_smi_error((FIXTURES / UNRELATED_FAILURE).read_text(), 255)
    assert other is not None and other.kind is HostErrorKind.PROBE_FAILED
    assert engine.step(T0 + 3 * MIN + 30, HostSnapshot.failed("gpu-a", "gpu-a", other.kind, other.message)) == []
    assert engine.firing() == [f"gpu_error|gpu-a||||{kind}"]
    assert kinds(engine.step(T0 + 4 * MIN, h100_host("gpu-a"))) == [("resolved", f"gpu_error|gpu-a||||{kind}")]


def test_a_broken_driver_is_gpu_error_and_its_host_down_is_inhibited() -> None:
    """SSH works, the driver does not: one alert (gpu_error), not also host_down ('has not
    answered' would be untrue). Should the host then stop answering, host_down is said."""
    engine = Engine(alerts_config(gpu_error=True, host_down={"after": 3}))
    assert engine.step(T0, h100_host("gpu-a")) == []
    broken = error_host("gpu-a", ERR_VERSION_MISMATCH)
    assert kinds(engine.step(T0 + MIN, broken)) == [("firing", "gpu_error|gpu-a||||driver_mismatch")]
    for minute in range(2, 10):
        assert engine.step(T0 + minute * MIN, broken) == []  # no host_down, ever, while the driver is the cause
    host_down = engine.records["host_down|gpu-a||||"]  # kept (it counts), never announced
    assert host_down.state == "firing" and host_down.last_sent_at is None
    assert inhibited(engine.records.values()) == {"host_down|gpu-a||||": ["gpu_error|gpu-a||||driver_mismatch"]}
    # the host stops answering altogether: that is news, and host_down says it
    fired = engine.step(T0 + 10 * MIN, down("gpu-a"))
    assert kinds(fired) == [("firing", "host_down|gpu-a||||")]
    assert "has not answered for 10 polls: connection refused" in said(fired[0].record).summary
    assert inhibited(engine.records.values()) == {}
    back = engine.step(T0 + 11 * MIN, h100_host("gpu-a"))  # rebooted: both are over
    assert kinds(back) == [("resolved", "gpu_error|gpu-a||||driver_mismatch"), ("resolved", "host_down|gpu-a||||")]


def test_with_gpu_error_off_a_broken_driver_is_still_said_by_host_down_in_true_words() -> None:
    engine = Engine(alerts_config(host_down={"after": 2}))
    broken = error_host("gpu-a", ERR_VERSION_MISMATCH)
    assert engine.step(T0, broken) == []
    (fired,) = engine.step(T0 + MIN, broken)
    assert fired.record.key.id == "host_down|gpu-a||||"
    summary = said(fired.record).summary
    assert summary.startswith("gpu-a answers, but no GPU data for 2 polls: ") and "mismatch" in summary
    assert "has not answered" not in summary


def test_the_silence_line_of_an_alert_mutes_exactly_it_and_quotes_what_a_host_printed() -> None:
    from gpuwatch.cli import build_parser
    from gpuwatch.report import silence_command

    hostile = "x;touch /tmp/pwned"  # a user name is what the host's ps printed
    keys = [
        AlertKey("max_runtime", "gpu-a", user=hostile, pid=4100),
        AlertKey("max_runtime", "gpu-a", user=hostile, pid=4101),
        AlertKey("max_runtime", "gpu-b", user=hostile, pid=4100),
        AlertKey("idle_gpu", "gpu-a", gpu=3),
        AlertKey("idle_gpu", "gpu-a", gpu=4),
        AlertKey("max_gpus_per_user_fleet", "*", user="alice"),
        AlertKey("max_gpus_per_user_fleet", "*", user="bob"),
    ]

    def mutes(line: str) -> list[AlertKey]:
        argv = shlex.split(line)
        assert argv[0] == "gpuwatch"
        args = build_parser().parse_args(argv[1:])
        assert args.duration == "24h" and args.comment == "acknowledged"
        fields = {k: getattr(args, k) for k in ("rule", "host", "user", "gpu", "pid")}
        silence = Silence(1, T0 + DAY, "c", T0, **fields)
        return [k for k in keys if silence.matches(k, T0)]

    for key in keys:
        line = silence_command([key], "/etc/gpu watch/config.yaml")
        assert line.startswith("gpuwatch -c '/etc/gpu watch/config.yaml' silence add --rule ")
        assert mutes(line) == [key]
    assert "'x;touch /tmp/pwned'" in silence_command([keys[0]])
    assert mutes(silence_command(keys[:2])) == keys[:2]  # one entry: the rule on one host, that user
    assert mutes(silence_command(keys[3:5])) == keys[3:5]


def test_gpu_error_from_a_lost_gpu_beside_good_rows() -> None:
    # Derived from real lines: two stacked H100 rows with the real "unknown error" line of a
    # lost GPU printed between them, as nvidia-smi does (cf. test_parse).
    query, _, _ = _stack_gpus(Path("gpu-a"), [(H100_LOAD_QUERY, 0), (H100_IDLE_QUERY, 0)], [])
    header, row0, row1 = query.strip().split("\n")
    lost_line = capture_bytes(ERR_UNKNOWN_SPACE).decode().strip()
    gpus, issues = parse_query_gpu("\n".join([header, row0, lost_line, row1]) + "\n")
    assert [g.index for g in gpus] == [0, 1] and [i.kind for i in issues] == [HostErrorKind.GPU_LOST]
    lost = HostSnapshot("gpu-a", "gpu-a", ok=True, gpus=tuple(gpus), warnings=tuple(issues))

    engine = Engine(alerts_config(gpu_error=True, gpu_missing=True))
    assert engine.step(T0, h100_host("gpu-a", n_gpus=3)) == []
    fired = engine.step(T0 + MIN, lost)
    assert kinds(fired) == [("firing", "gpu_error|gpu-a||||gpu_lost"), ("firing", "gpu_missing|gpu-a||||")]
    assert engine.step(T0 + 2 * MIN, lost) == []
    assert [k for k, _ in kinds(engine.step(T0 + 3 * MIN, h100_host("gpu-a", n_gpus=3)))] == ["resolved", "resolved"]


def test_idle_gpu_fires_after_its_after() -> None:
    cfg = alerts_config(idle_gpu={"after": "30m", "util_below": 10, "memory_above_mib": 1024})
    engine = Engine(cfg)
    idle = l40s_host("gpu-c", [Job("bob", 6100, 0, command="ffmpeg -i in.mp4 out.mkv")])
    assert (idle.gpus[0].utilization_percent, idle.gpus[0].memory_used_mib) == (9, 1235)  # the real reading
    for minute in range(30):
        assert engine.step(T0 + minute * MIN, idle) == []
    fired = engine.step(T0 + 30 * MIN, idle)
    assert kinds(fired) == [("firing", "idle_gpu|gpu-c|0|||")]
    assert "bob" in said(fired[0].record).summary and "pid 20038" in said(fired[0].record).summary  # who holds it
    assert said(fired[0].record).threshold == "idle (<10%) with >1024 MiB for 30m"
    # busy again for one poll: resolved, and the 30 minutes start over
    assert kinds(engine.step(T0 + 31 * MIN, h100_host("gpu-c", alice([0]), n_gpus=1))) == [
        ("resolved", "idle_gpu|gpu-c|0|||")
    ]
    assert engine.step(T0 + 32 * MIN, idle) == []
    assert engine.step(T0 + 61 * MIN, idle) == []
    assert len(engine.step(T0 + 62 * MIN, idle)) == 1


def test_a_mig_gpu_is_never_idle() -> None:
    engine = Engine(alerts_config(idle_gpu={"after": "0s", "util_below": 101, "memory_above_mib": 0}))
    mig = mig_host("gpu-m", [Job("alice", 7100, 0)])
    assert mig.gpus[0].utilization_percent is None and mig.gpus[0].memory_used_mib == 11125
    for hour in range(48):
        assert engine.step(T0 + hour * HOUR, mig) == []
    assert engine.records == {}


def test_temperature_above() -> None:
    engine = Engine(alerts_config(temperature_above=55))
    fired = engine.step(T0, h100_host("gpu-a", alice([1])))
    assert kinds(fired) == [("firing", "temperature_above|gpu-a|1|||")]  # 59 C under load; idle ones 41 C
    assert (fired[0].record.value, fired[0].record.threshold, fired[0].record.unit) == (59, 55, "°C")
    assert said(fired[0].record).value == "59°C" and said(fired[0].record).threshold == "at most 55°C"
    assert kinds(engine.step(T0 + MIN, h100_host("gpu-a"))) == [("resolved", "temperature_above|gpu-a|1|||")]


def test_fleet_wide_limit_counts_gpus_on_every_host() -> None:
    engine = Engine(alerts_config(max_gpus_per_user=2, max_gpus_per_user_fleet=3))
    a, b = h100_host("gpu-a", alice([0, 1])), h100_host("gpu-b", alice([2, 3], first_pid=5100))
    fired = engine.step(T0, a, b)
    assert kinds(fired) == [("firing", "max_gpus_per_user_fleet|*||alice||")]
    assert "4 GPUs across the fleet (gpu-a, gpu-b)" in said(fired[0].record).summary
    assert kinds(engine.step(T0 + MIN, a, h100_host("gpu-b", alice([2], first_pid=5100)))) == [
        ("resolved", "max_gpus_per_user_fleet|*||alice||")
    ]


# ---------------------------------------------------------------- gpu_freed notices


def test_gpu_freed_tells_the_watched_users_and_never_when_the_host_is_down() -> None:
    engine = Engine(alerts_config(gpu_freed={"users": ["alice", "carol"]}))
    job = Job("alice", 4101, 1, 7200, "python3 train.py --lr 3e-4")
    bobs = Job("bob", 4200, 2)
    assert engine.step(T0, h100_host("gpu-a", [job, bobs])) == [] and engine.notices == []
    engine.step(T0 + MIN, h100_host("gpu-a", [job, bobs]))
    assert engine.notices == []
    engine.step(T0 + 2 * MIN, down("gpu-a"))  # a failed poll is not "all GPUs free"
    assert engine.notices == []
    engine.step(T0 + 3 * MIN, h100_host("gpu-a", [replace(job, elapsed=7380), bobs]))
    assert engine.notices == []
    engine.step(T0 + 4 * MIN, h100_host("gpu-a", [bobs]))
    texts = sorted(notice_text(n) for n in engine.notices)
    assert texts == [
        "alice's job 4101 (python3 train.py --lr 3e-4) on gpu-a GPU 1 has ended (ran at least 2h3m)",
        "gpu-a GPU 1 (NVIDIA H100 80GB HBM3) is free now",
    ]
    by_text = {notice_text(n): n for n in engine.notices}
    assert by_text[texts[0]].users == ("alice",)
    assert by_text[texts[1]].users == ("alice", "carol")
    engine.step(T0 + 5 * MIN, h100_host("gpu-a", [bobs]))
    assert engine.notices == []  # said once
    engine.step(T0 + 6 * MIN, h100_host("gpu-a"))
    assert [notice_text(n) for n in engine.notices] == [
        "gpu-a GPU 2 (NVIDIA H100 80GB HBM3) is free now"
    ]  # bob's: no job notice


# ---------------------------------------------------------------- silences


def test_a_silenced_alert_is_not_sent_stays_in_state_and_is_announced_after_the_silence() -> None:
    engine = Engine(alerts_config(max_runtime="72h", max_gpus_per_user=2))
    engine.silences = [
        Silence(
            id=1,
            ends_at=T0 + DAY,
            comment="long run agreed",
            created_at=T0,
            rule="max_runtime",
            host="gpu-a",
            user="alice",
        ),
    ]
    old = int(3 * DAY) + 60
    over = h100_host("gpu-a", [*alice([0, 1, 2], elapsed=old), Job("bob", 4200, 3, old)])
    fired = engine.step(T0, over)
    assert kinds(fired) == [
        ("firing", "max_gpus_per_user|gpu-a||alice||"),  # another rule: not silenced
        ("firing", "max_runtime|gpu-a||bob|4200|"),  # another user: not silenced
    ]
    for pid in (4100, 4101, 4102):
        record = engine.records[f"max_runtime|gpu-a||alice|{pid}|"]
        assert record.state == "firing" and record.last_sent_at is None  # in state, never sent
    assert silence_check(engine.silences)(engine.records["max_runtime|gpu-a||alice|4100|"].key, T0)
    # no reminder for silenced alerts either
    assert kinds(engine.step(T0 + 4 * HOUR, over)) == [
        ("reminder", "max_gpus_per_user|gpu-a||alice||"),
        ("reminder", "max_runtime|gpu-a||bob|4200|"),
    ]
    # the silence ends with the condition still there: announced now, once, with its real age
    after = engine.step(T0 + DAY, over)
    assert kinds(after) == [
        ("firing", "max_runtime|gpu-a||alice|4100|"),
        ("firing", "max_runtime|gpu-a||alice|4101|"),
        ("firing", "max_runtime|gpu-a||alice|4102|"),
        ("reminder", "max_gpus_per_user|gpu-a||alice||"),
        ("reminder", "max_runtime|gpu-a||bob|4200|"),
    ]
    assert {t.record.since for t in after} == {T0}
    assert engine.step(T0 + DAY + MIN, over) == []


def test_an_alert_that_clears_while_silenced_and_was_never_announced_says_nothing() -> None:
    engine = Engine(alerts_config(max_gpus_per_user=2))
    engine.silences = [Silence(id=3, ends_at=T0 + HOUR, comment="maintenance", created_at=T0, host="gpu-a")]
    assert engine.step(T0, h100_host("gpu-a", alice([0, 1, 2]))) == []
    assert engine.firing() == ["max_gpus_per_user|gpu-a||alice||"]
    assert engine.step(T0 + MIN, h100_host("gpu-a", alice([0]))) == []
    assert engine.records == {}
    assert engine.step(T0 + 2 * HOUR, h100_host("gpu-a", alice([0]))) == []


def test_silence_matching() -> None:
    s = Silence(id=1, ends_at=T0 + HOUR, comment="c", created_at=T0, rule="temperature_above", gpu=2)
    engine = Engine(alerts_config(temperature_above=55))
    engine.step(T0, h100_host("gpu-a", alice([1, 2])), h100_host("gpu-b", alice([2], first_pid=5100)))
    keys = {r.key.id: r.key for r in engine.records.values()}
    assert sorted(k for k, key in keys.items() if s.matches(key, T0)) == [
        "temperature_above|gpu-a|2|||",
        "temperature_above|gpu-b|2|||",
    ]
    assert not s.matches(keys["temperature_above|gpu-a|2|||"], T0 + HOUR)  # over at ends_at
    assert s.describe() == "rule=temperature_above gpu=2"


# ---------------------------------------------------------------- state across restarts


def test_no_duplicate_across_a_restart(tmp_path: Path) -> None:
    """State goes through SQLite after every poll, and each poll opens it afresh (a cron --once run,
    or a daemon restarted): what was announced is not announced again."""
    cfg = alerts_config(max_gpus_per_user=2, max_runtime="72h", gpu_freed={"users": ["alice"]}, host_down={"after": 2})
    over = h100_host("gpu-a", alice([0, 1, 2], elapsed=int(3 * DAY) + 1))
    said: list[Transition] = []
    notices: list[Notice] = []

    def run_once(now: float, *hosts: HostSnapshot) -> list[Transition]:
        db = open_db(tmp_path)
        try:
            engine = Engine(cfg, store=AlertStore(db))
            out = engine.step(now, *hosts)
            notices.extend(engine.notices)
        finally:
            db.close()
        said.extend(out)
        return out

    assert len(run_once(T0, over, down("gpu-b"))) == 4  # gpu-b: first failure
    assert kinds(run_once(T0 + HOUR, over, down("gpu-b"))) == [("firing", "host_down|gpu-b||||")]
    for hour in range(2, 4):
        assert run_once(T0 + hour * HOUR, over, down("gpu-b")) == []
    assert {k for k, _ in kinds(run_once(T0 + 4 * HOUR, over, down("gpu-b")))} == {"reminder"}
    assert kinds(run_once(T0 + 5 * HOUR, over, down("gpu-b"))) == [("reminder", "host_down|gpu-b||||")]
    assert [t.kind for t in said].count("firing") == 5  # each announced once, whatever the restarts
    resolved = run_once(T0 + 6 * HOUR, h100_host("gpu-a"), h100_host("gpu-b"))
    assert {k for k, _ in kinds(resolved)} == {"resolved"} and len(resolved) == 5
    assert len([n for n in notices if "has ended" in notice_text(n)]) == 3
    assert run_once(T0 + 7 * HOUR, h100_host("gpu-a"), h100_host("gpu-b")) == []
    # stored as JSON a person can read
    db = open_db(tmp_path)
    try:
        assert AlertStore(db).records() == {}
        stored = json.loads(db.query("SELECT memory FROM rule_memory")[0][0])
        assert stored["gpu_counts"] == {"gpu-a": 4, "gpu-b": 4}
    finally:
        db.close()


def test_records_and_memory_survive_json() -> None:
    engine = Engine(alerts_config(max_runtime="72h", gpu_freed={"users": ["alice"]}, host_down={"after": 1}))
    engine.step(T0, h100_host("gpu-a", alice([0, 1], elapsed=int(3 * DAY) + 1)), down("gpu-b"))
    for record in engine.records.values():
        assert AlertRecord.from_dict(json.loads(json.dumps(record.as_dict()))) == record
    assert Memory.from_dict(json.loads(json.dumps(engine.memory.as_dict()))) == engine.memory


# ---------------------------------------------------------------- messages


def one_cycle_of_everything() -> tuple[list[Transition], list[Notice]]:
    engine = Engine(
        alerts_config(max_gpus_per_user=2, temperature_above=55, host_down={"after": 1}, gpu_freed={"users": ["alice"]})
    )
    engine.step(T0 - HOUR, h100_host("gpu-a", [Job("bob", 4200, 3)]), h100_host("gpu-b"))
    transitions = engine.step(T0, h100_host("gpu-a", alice([0, 1, 2])), down("gpu-b"))
    return transitions, engine.notices


def test_new_and_resolved_alerts_of_one_cycle_go_out_in_one_message() -> None:
    transitions, notices = one_cycle_of_everything()
    assert {t.kind for t in transitions} == {"firing", "resolved"}
    message = alert_message(transitions, notices, {"alice": "ou_alice", "bob": "ou_bob"}, tz=timezone.utc)
    assert message is not None
    assert message.kind == "alert" and message.severity == "firing"
    # counted as shown: 3 entries (the three hot GPUs of gpu-a are one) holding 5 alerts
    assert message.title == "GPU alerts: 3 firing (5 alerts), 1 resolved, 1 notice"
    text = message.text
    # what, where, who, since when, the threshold
    assert "FIRING max_gpus_per_user (gpu-a, user alice)" in text
    assert "alice holds 3 GPUs on gpu-a (GPU 0, 1, 2)" in text
    assert "now: 3 GPUs; threshold: at most 2 per host; since 2027-01-15 08:00:00 UTC" in text
    assert "FIRING host_down (gpu-b)" in text and "connection refused" in text
    # the three hot GPUs of gpu-a: one entry, a line each, one threshold, one ack line
    hot = next(b for b in message.blocks if "temperature_above" in b and "FIRING" in b)
    assert hot.splitlines() == [
        "FIRING temperature_above on gpu-a: GPUs 0-2",
        "    gpu-a GPU 0 is at 59°C",
        "    gpu-a GPU 1 is at 59°C",
        "    gpu-a GPU 2 is at 59°C",
        "    threshold: at most 55°C; since 2027-01-15 08:00:00 UTC",
        "    an admin can acknowledge them: gpuwatch ack --rule temperature_above --host gpu-a",
    ]
    assert "RESOLVED temperature_above (gpu-a, GPU 3)" in text
    assert "fired 2027-01-15 07:00:00 UTC, resolved 2027-01-15 08:00:00 UTC (lasted 1h)" in text
    assert "NOTICE gpu-a GPU 3 (NVIDIA H100 80GB HBM3) is free now" in text
    # firing first, then resolved, then notices; one entry per kind, rule and host
    assert text.index("FIRING") < text.index("RESOLVED") < text.index("NOTICE")
    assert len(message.blocks) == 3 + 1 + len(notices)
    assert message.mentions == ("ou_alice",)  # bob is not in any of them


def test_severity_colours_the_card_and_mentions_the_responsible_user() -> None:
    transitions, notices = one_cycle_of_everything()
    channel = FeishuChannel(FeishuSettings(url="http://127.0.0.1:9/open-apis/bot/v2/hook/x", format="card"))
    firing = alert_message(transitions, notices, {"alice": "ou_alice"})
    resolved = alert_message([t for t in transitions if t.kind == "resolved"], [], {"alice": "ou_alice"})
    assert firing is not None and resolved is not None
    assert resolved.severity == "resolved" and resolved.mentions == ()
    (red,) = channel.prepare(firing)
    (green,) = channel.prepare(resolved)
    assert red["card"]["header"]["template"] == "red"
    assert green["card"]["header"]["template"] == "green"
    assert "ou_alice" in json.dumps(red, ensure_ascii=False)
    post = FeishuChannel(FeishuSettings(url="http://127.0.0.1:9/open-apis/bot/v2/hook/x", format="post"))
    (body,) = post.prepare(firing)
    assert {"tag": "at", "user_id": "ou_alice"} in body["content"]["post"]["zh_cn"]["content"][0]
    assert alert_message([], [], {}) is None


def test_a_big_cycle_is_split_under_the_limit_never_inside_an_entry() -> None:
    engine = Engine(alerts_config(max_runtime="72h"))
    hosts = [h100_host(f"gpu-{i:02d}", alice(range(8), elapsed=int(3 * DAY) + 1), n_gpus=8) for i in range(40)]
    transitions = engine.step(T0, *hosts)
    assert len(transitions) == 320
    message = alert_message(transitions, [], {"alice": "ou_alice"})
    assert message is not None
    assert message.title == "GPU alerts: 40 firing (320 alerts)" and len(message.blocks) == 40  # one entry per host
    channel = FeishuChannel(FeishuSettings(url="http://127.0.0.1:9/open-apis/bot/v2/hook/x", format="card"))
    payloads = channel.prepare(message)
    assert len(payloads) > 1
    sizes = [len(json.dumps(p, ensure_ascii=False, separators=(",", ":")).encode()) for p in payloads]
    assert max(sizes) < 20_000
    joined = "\n".join(seen(p).text for p in payloads)  # as the group reads them (escapes decoded)
    for host in hosts:
        pids = sorted(t.record.key.pid or 0 for t in transitions if t.record.key.host == host.name)
        head = f"FIRING max_runtime on {host.name}: user alice; pids {', '.join(map(str, pids))}"
        assert joined.count(head) == 1  # each entry whole, in exactly one part
        ack = f"gpuwatch ack --rule max_runtime --host {host.name} --user alice"
        assert joined.count(ack) == 1
    for t in transitions:
        assert joined.count(f"alice's process {t.record.key.pid} ") == 40  # the same pids on every host
    assert all(p["card"]["header"]["template"] == "red" for p in payloads)


def test_ordering_of_blocks_never_compares_none_with_a_value() -> None:
    # Keys of one rule and host may differ in which fields are set (a process ps saw or not).
    r1 = AlertRecord(AlertKey("max_runtime", "gpu-a", user=None, pid=5), "firing", T0, fired_at=T0, last_sent_at=T0)
    r2 = AlertRecord(AlertKey("max_runtime", "gpu-a", user="alice", pid=4), "firing", T0, fired_at=T0, last_sent_at=T0)
    message = alert_message([Transition("firing", r1, T0), Transition("firing", r2, T0)], [], {})
    assert message is not None and len(message.blocks) == 1
    (entry,) = message.blocks
    assert entry.startswith("FIRING max_runtime on gpu-a: users alice, an unknown user; pids 4, 5\n")
    assert entry.endswith("an admin can acknowledge them: gpuwatch ack --rule max_runtime --host gpu-a")


# ---------------------------------------------------------------- the alerts:, email: and routes: keys

ISSUE_EXAMPLE = """
hosts: [gpu-a]
alerts:
  max_gpus_per_user: 2
  max_gpus_per_user_fleet: 6
  max_runtime: 72h
  idle_gpu: {after: 30m, util_below: 5, memory_above_mib: 1024}
  host_down: {after: 3}
  gpu_missing: true
  gpu_error: true
  temperature_above: 90
  gpu_freed: {users: [alice]}
  for: 0s
  repeat_every: 4h
  send_resolved: true
"""


def test_the_documented_alerts_section() -> None:
    alerts = parse_config(yaml.safe_load(ISSUE_EXAMPLE)).alerts
    assert alerts.rules == {
        "max_gpus_per_user": GpuLimit(2),
        "max_gpus_per_user_fleet": GpuLimit(6),
        "max_runtime": MaxRuntime(3 * DAY),
        "idle_gpu": IdleGpu(after=1800, util_below=5, memory_above_mib=1024),
        "host_down": HostDown(after=3),
        "gpu_missing": GpuMissing(),
        "gpu_error": GpuError(),
        "temperature_above": TemperatureAbove(90),
        "gpu_freed": GpuFreed(("alice",)),
    }
    assert (alerts.for_seconds, alerts.repeat_every, alerts.send_resolved) == (0, 4 * HOUR, True)
    # no alerts: section: the alerts every admin wants; an alerts: section lists all that is wanted
    default = parse_config({"hosts": ["a"]}).alerts
    assert default.rules == {"host_down": HostDown(after=3), "gpu_missing": GpuMissing(), "gpu_error": GpuError()}
    only = alerts_config(max_gpus_per_user=2, max_runtime="72h")
    assert only.rules == {"max_gpus_per_user": GpuLimit(2), "max_runtime": MaxRuntime(3 * DAY)}


def _uncommented_example() -> str:
    """config.example.yaml with its commented-out routes: and email: blocks switched on."""
    lines = (Path(__file__).resolve().parent.parent / "config.example.yaml").read_text().splitlines()
    out, prefix = [], None
    for line in lines:
        stripped = line.lstrip()
        indent = line[: len(line) - len(stripped)]
        if stripped.startswith(("# routes:", "# email:")):
            prefix = indent + "# "
        if prefix is not None and line.startswith(prefix):
            line = indent + line[len(prefix) :]
        elif prefix is not None:
            prefix = None
        out.append(line)
    return "\n".join(out) + "\n"


def test_the_example_config_with_email_and_routes_switched_on(tmp_path: Path) -> None:
    text = _uncommented_example()
    assert re.search(r"^email: ", text, re.M) and re.search(r"^  routes: ", text, re.M)
    config = parse_config(yaml.safe_load(text), tmp_path / "config.yaml")
    assert config.email is not None
    assert (config.email.smtp_host, config.email.smtp_port, config.email.tls) == ("smtp.example.com", 587, "starttls")
    assert config.email.password_env == "GPUWATCH_SMTP_PASSWORD" and config.email.ca_file is None
    assert config.alerts.routes == {
        "max_runtime": ("email",),
        "host_down": ("feishu", "email"),
        "default": ("feishu",),
    }


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({"alerts": {"routes": {"max_runtime": ["email"]}}}, "alerts.routes.max_runtime: routes to email, but there"),
        ({"alerts": {"routes": {"max_runtim": ["feishu"]}}}, "alerts.routes.max_runtim: unknown key; did you mean"),
        (
            {"alerts": {"routes": {"default": ["sms"]}}},
            "alerts.routes.default: 'sms' is not one of feishu, dingtalk, wecom, slack, webhook, email",
        ),
        ({"routes": {"default": ["feishu"]}}, "routes: belongs under alerts: (alerts.routes)"),
        ({"alerts": {"max_gpus_per_user": 0}}, "alerts.max_gpus_per_user: 0 is out of range"),
        ({"alerts": {"idle_gpu": {"afterr": "5m"}}}, "alerts.idle_gpu.afterr: unknown key; did you mean 'after'?"),
        ({"alerts": {"gpu_freed": {"users": []}}}, "alerts.gpu_freed.users: expected a list of user names"),
        ({"alerts": {"repeat_every": "0s"}}, "alerts.repeat_every: must be longer than 0s"),
        (
            {"email": {"to": ["a@b.c"], "from": "x@b.c", "smtp_host": "mail", "tls": "none", "password_env": "P"}},
            "email.tls: 'none' would send the SMTP password in clear text",
        ),
        ({"email": {"to": ["nobody"], "from": "x@b.c", "smtp_host": "mail"}}, "email.to[0]: 'nobody' is not an e-mail"),
    ],
)
def test_alert_config_mistakes_name_the_key(doc: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"hosts": ["gpu-a"], "feishu": {"url": "https://example.com/hook/x"}, **doc})
    assert expected in str(info.value)


# ---------------------------------------------------------------- hosts on their own clocks: fresh results


def test_a_host_without_a_new_result_neither_fires_nor_resolves() -> None:
    """Results arrive host by host: an evaluation judges only the hosts with a new result."""
    engine = Engine(alerts_config(max_gpus_per_user=2, temperature_above=55))
    a_over, a_fixed = h100_host("gpu-a", alice([0, 1, 2])), h100_host("gpu-a")
    b_fine, b_over = h100_host("gpu-b"), h100_host("gpu-b", alice([1, 2, 3], first_pid=5100))
    first = engine.step(T0, a_over, b_fine)
    assert kinds(first) == [
        ("firing", "max_gpus_per_user|gpu-a||alice||"),
        ("firing", "temperature_above|gpu-a|0|||"),
        ("firing", "temperature_above|gpu-a|1|||"),
        ("firing", "temperature_above|gpu-a|2|||"),
    ]
    a_alerts = engine.firing()
    # gpu-b has a new result; gpu-a's latest is fixed but not new to this evaluation: only gpu-b fires
    second = engine.step(T0 + 10, a_fixed, b_over, fresh={"gpu-b"})
    assert kinds(second) == [
        ("firing", "max_gpus_per_user|gpu-b||alice||"),
        ("firing", "temperature_above|gpu-b|1|||"),
        ("firing", "temperature_above|gpu-b|2|||"),
        ("firing", "temperature_above|gpu-b|3|||"),
    ]
    assert set(a_alerts) < set(engine.firing())
    # no new result at all: nothing moves
    assert engine.step(T0 + 20, a_fixed, b_over, fresh=()) == []
    # gpu-a's new result: its alerts resolve; gpu-b's (not fresh) stay as they are
    third = engine.step(T0 + 30, a_fixed, b_fine, fresh={"gpu-a"})
    assert kinds(third) == [("resolved", key) for key in a_alerts]
    b_alerts = [key for _, key in kinds(second)]
    assert engine.firing() == b_alerts
    assert kinds(engine.step(T0 + 40, a_fixed, b_fine, fresh={"gpu-b"})) == [("resolved", key) for key in b_alerts]


def test_the_failure_counter_counts_polls_of_the_host_not_evaluations() -> None:
    engine = Engine(alerts_config(host_down={"after": 3}))
    assert engine.step(T0, h100_host("gpu-a"), down("gpu-b")) == []  # gpu-b's first failed poll
    # gpu-a answers every 10 s; each of its results is an evaluation, gpu-b's failure is not new
    for i in range(1, 20):
        assert engine.step(T0 + i * 10, h100_host("gpu-a"), down("gpu-b"), fresh={"gpu-a"}) == [], i
    assert engine.memory.get("failures", "gpu-b") == 1
    assert engine.step(T0 + 60, h100_host("gpu-a"), down("gpu-b"), fresh={"gpu-b"}) == []  # its second
    fired = engine.step(T0 + 120, h100_host("gpu-a"), down("gpu-b"), fresh={"gpu-b"})  # its third
    assert kinds(fired) == [("firing", "host_down|gpu-b||||")]
    assert (fired[0].record.value, fired[0].record.threshold, fired[0].record.unit) == (3, 3, "polls")
    assert said(fired[0].record).value == "3 failed polls"
    # gpu-a's results do not resolve it: only a new result of gpu-b does
    assert engine.step(T0 + 130, h100_host("gpu-a"), h100_host("gpu-b"), fresh={"gpu-a"}) == []
    assert kinds(engine.step(T0 + 180, h100_host("gpu-a"), h100_host("gpu-b"), fresh={"gpu-b"})) == [
        ("resolved", "host_down|gpu-b||||")
    ]


def test_only_a_new_result_moves_a_baseline_or_a_users_jobs() -> None:
    engine = Engine(alerts_config(gpu_missing=True, gpu_freed={"users": ["alice"]}))
    job = Job("alice", 4101, 1, 7200, "python3 train.py --lr 3e-4")
    assert engine.step(T0, h100_host("gpu-a", [job]), h100_host("gpu-b", n_gpus=4)) == []
    # gpu-b's latest result (what the state holds) is not new: no baseline, no alert, no notice
    for i in range(1, 5):
        assert engine.step(T0 + i * 10, h100_host("gpu-a", [job]), h100_host("gpu-b", n_gpus=8), fresh={"gpu-a"}) == []
    assert engine.memory.get("gpu_counts", "gpu-b") == 4
    # gpu-a's job has ended in its latest result, but that result is not new: not "ended" yet
    engine.step(T0 + 50, h100_host("gpu-a"), h100_host("gpu-b"), fresh={"gpu-b"})
    assert engine.notices == []
    engine.step(T0 + 60, h100_host("gpu-a"), h100_host("gpu-b"), fresh={"gpu-a"})
    assert sorted(notice_text(n) for n in engine.notices) == [
        "alice's job 4101 (python3 train.py --lr 3e-4) on gpu-a GPU 1 has ended (ran at least 2h)",
        "gpu-a GPU 1 (NVIDIA H100 80GB HBM3) is free now",
    ]
    fired = engine.step(T0 + 70, h100_host("gpu-a"), h100_host("gpu-b", n_gpus=3), fresh={"gpu-b"})
    assert kinds(fired) == [("firing", "gpu_missing|gpu-b||||")]
    assert (fired[0].record.value, fired[0].record.threshold) == (3, 4)


def test_a_fleet_wide_rule_counts_every_latest_result_and_resolves_only_when_all_are_known() -> None:
    engine = Engine(alerts_config(max_gpus_per_user_fleet=3))
    a, b = h100_host("gpu-a", alice([0, 1])), h100_host("gpu-b", alice([2, 3], first_pid=5100))
    # only gpu-a's result is new, but the fleet-wide count uses gpu-b's latest one too
    fired = engine.step(T0, a, b, fresh={"gpu-a"})
    assert kinds(fired) == [("firing", "max_gpus_per_user_fleet|*||alice||")]
    assert (fired[0].record.value, fired[0].record.threshold, fired[0].record.facts["hosts"]) == (
        4,
        3,
        ["gpu-a", "gpu-b"],
    )
    # gpu-b's latest result is stale (older than 3 poll intervals): not an answer; nothing resolves
    b_stale = replace(h100_host("gpu-b"), stale=True)
    for i in range(1, 4):
        assert engine.step(T0 + i * MIN, a, b_stale, fresh={"gpu-a"}) == []
    # nor while gpu-b is down
    assert engine.step(T0 + 5 * MIN, a, down("gpu-b")) == []
    assert engine.firing() == ["max_gpus_per_user_fleet|*||alice||"]
    # every host's latest result answered and known again: now it resolves
    assert kinds(engine.step(T0 + 6 * MIN, a, h100_host("gpu-b"), fresh={"gpu-b"})) == [
        ("resolved", "max_gpus_per_user_fleet|*||alice||")
    ]


def test_a_stale_host_is_never_judged_even_when_called_fresh() -> None:
    engine = Engine(alerts_config(host_down={"after": 1}, temperature_above=55))
    assert kinds(engine.step(T0, h100_host("gpu-a", alice([0])))) == [("firing", "temperature_above|gpu-a|0|||")]
    stale = replace(h100_host("gpu-a"), stale=True)
    for i in range(1, 4):
        assert engine.step(T0 + i * MIN, stale) == []  # fresh=None: every host, but a stale one has nothing new
    assert engine.firing() == ["temperature_above|gpu-a|0|||"]


# ---------------------------------------------------------------- hosts removed from the config


def test_the_alerts_of_a_removed_host_resolve_once_with_the_reason() -> None:
    engine = Engine(alerts_config(max_gpus_per_user=2, host_down={"after": 1}, **{"for": "5m"}))
    a_over = h100_host("gpu-a", alice([0, 1, 2]))
    c_over = h100_host("gpu-c", alice([0, 1, 2], first_pid=6100))
    assert engine.step(T0, a_over, down("gpu-b"), c_over) == []  # pending: held back by `for`
    fired = engine.step(T0 + 5 * MIN, a_over, down("gpu-b"), c_over)
    assert kinds(fired) == [
        ("firing", "host_down|gpu-b||||"),
        ("firing", "max_gpus_per_user|gpu-a||alice||"),
        ("firing", "max_gpus_per_user|gpu-c||alice||"),
    ]
    c_new = h100_host("gpu-c", alice([0, 1, 2, 3], first_pid=6100))
    assert engine.step(T0 + 6 * MIN, a_over, down("gpu-b"), c_new) == []
    assert engine.records["max_gpus_per_user|gpu-c||alice||"].state == "firing"
    a_new = h100_host("gpu-a", alice([0, 1, 2, 3]))
    assert engine.step(T0 + 7 * MIN, a_new, down("gpu-b"), c_new, fresh={"gpu-a"}) == []  # a pending? no: firing
    # a reload removes gpu-b and gpu-c; the fleet state no longer holds them, nothing is fresh
    gone = engine.step(T0 + 8 * MIN, a_new, fresh=(), removed={"gpu-b", "gpu-c"})
    assert kinds(gone) == [("resolved", "host_down|gpu-b||||"), ("resolved", "max_gpus_per_user|gpu-c||alice||")]
    assert engine.firing() == ["max_gpus_per_user|gpu-a||alice||"]
    assert engine.memory.get("failures", "gpu-b") is None  # its memory goes too
    message = alert_message(gone, [], {}, tz=timezone.utc)
    assert message is not None and message.title == "GPU alerts: 2 resolved"
    assert "RESOLVED host_down (gpu-b): removed from the config\n    was: gpu-b has not answered for" in message.text
    assert "RESOLVED max_gpus_per_user (gpu-c, user alice): removed from the config" in message.text
    # said once: the next evaluations know nothing of them
    assert engine.step(T0 + 9 * MIN, a_new) == []
    assert engine.step(T0 + 10 * MIN, a_new, removed={"gpu-b", "gpu-c"}) == []


def test_a_removed_host_resolves_with_nothing_evaluated_and_a_pending_alert_goes_quietly() -> None:
    cfg = alerts_config(max_gpus_per_user=2, host_down={"after": 1}, **{"for": "5m"})
    engine = Engine(cfg)
    assert engine.step(T0, down("gpu-b")) == []
    fired = engine.step(T0 + 5 * MIN, down("gpu-b"), h100_host("gpu-d", alice([0, 1, 2])))
    assert kinds(fired) == [("firing", "host_down|gpu-b||||")]
    assert engine.records["max_gpus_per_user|gpu-d||alice||"].state == "pending"
    # an evaluation that judged nothing changes nothing...
    nothing = Evaluation(findings=(), notices=(), memory=engine.memory)
    assert advance(engine.records, nothing, T0 + 6 * MIN, cfg) == (engine.records, [])
    # ...but the daemon's reload between two evaluations resolves what was said about removed hosts
    removed = frozenset({"gpu-b", "gpu-d"})
    records, transitions = advance(engine.records, nothing, T0 + 6 * MIN, cfg, removed_hosts=removed)
    assert [(t.kind, t.record.key.id, t.cause) for t in transitions] == [
        ("resolved", "host_down|gpu-b||||", HOST_REMOVED)
    ]  # gpu-d's alert was only pending: never announced, so nothing to take back
    assert records == {}


# ---------------------------------------------------------------- state saved by gpuwatch 0.1.0


def _old_state(tmp_path: Path) -> AlertStore:
    """An alert store holding the state gpuwatch 0.1.0 saved (tests/fixtures/alert-state)."""
    saved = json.loads((Path(__file__).parent / "fixtures" / "alert-state" / "gpuwatch-0.1.0.json").read_text())
    db = open_db(tmp_path)
    with db.transaction() as conn:
        conn.executemany(
            "INSERT INTO alerts (id, record) VALUES (?, ?)",
            [(kid, json.dumps(record)) for kid, record in saved["alerts"].items()],
        )
        conn.execute("INSERT INTO rule_memory (id, memory) VALUES (1, ?)", (json.dumps(saved["rule_memory"]),))
    return AlertStore(db)


def test_a_daemon_upgraded_in_place_reads_the_old_alert_state(tmp_path: Path) -> None:
    store = _old_state(tmp_path)
    cfg = alerts_config(
        max_gpus_per_user=2, max_runtime="72h", gpu_missing=True, host_down={"after": 1}, gpu_freed={"users": ["alice"]}
    )
    records = store.records()
    assert sorted(records) == [
        "gpu_missing|gpu-c||||",
        "host_down|gpu-b||||",
        "max_gpus_per_user|gpu-a||alice||",
        "max_runtime|gpu-a||alice|4100|",
        "max_runtime|gpu-a||alice|4101|",
        "max_runtime|gpu-a||alice|4102|",
    ]
    old = records["max_gpus_per_user|gpu-a||alice||"]
    assert (old.state, old.since, old.fired_at, old.last_sent_at) == ("firing", T0, T0, T0)
    assert said(old) == AlertWords("alice holds 3 GPUs on gpu-a (GPU 0, 1, 2)", "3 GPUs", "at most 2 per host")
    assert AlertRecord.from_dict(json.loads(json.dumps(old.as_dict()))) == old  # saved again as it was read

    engine = Engine(cfg, store=store)
    # An hour later: alice's job on gpu-a's GPU 2 has ended (the old memory knew her jobs), so she
    # holds 2 GPUs; gpu-b is still down, gpu-c still has one GPU fewer than the old baseline of 4.
    later = T0 + HOUR
    a = h100_host("gpu-a", alice([0, 1], elapsed=int(3 * DAY) + 3660))
    steps = engine.step(later, a, down("gpu-b"), h100_host("gpu-c", n_gpus=3))
    assert kinds(steps) == [
        ("resolved", "max_gpus_per_user|gpu-a||alice||"),
        ("resolved", "max_runtime|gpu-a||alice|4102|"),
    ]  # and nothing announced twice
    message = alert_message(steps, [], {}, tz=timezone.utc)
    assert message is not None
    assert (
        "RESOLVED max_runtime (gpu-a, user alice, pid 4102)\n"
        "    was: alice's process 4102 (python3 train.py --epochs 90) on gpu-a GPU 2 has run 3d1m\n"
        "    threshold: at most 3d; fired 2027-01-15 08:00:00 UTC, resolved 2027-01-15 09:00:00 UTC (lasted 1h)"
    ) in message.text  # the old record's own words, as 0.1.0 saved them
    assert "was: alice holds 3 GPUs on gpu-a (GPU 0, 1, 2)\n    threshold: at most 2 per host;" in message.text
    assert sorted(notice_text(n) for n in engine.notices) == [
        "alice's job 4102 (python3 train.py --epochs 90) on gpu-a GPU 2 has ended (ran at least 3d1m)",
        "gpu-a GPU 2 (NVIDIA H100 80GB HBM3) is free now",  # the old memory knew it was busy
    ]
    now = store.records()
    assert sorted(now) == [
        "gpu_missing|gpu-c||||",
        "host_down|gpu-b||||",
        "max_runtime|gpu-a||alice|4100|",
        "max_runtime|gpu-a||alice|4101|",
    ]
    assert all(r.words is None and r.since <= T0 + MIN and r.last_sent_at is not None for r in now.values())
    assert (now["gpu_missing|gpu-c||||"].value, now["gpu_missing|gpu-c||||"].threshold) == (3, 4)
    assert now["host_down|gpu-b||||"].value == 2  # the old count of failures goes on
