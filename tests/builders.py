"""Builders the test modules share: hosts from real captures, the alert engine with an explicit
clock, a host context, a fake clock for the channels, a fleet state and a clock for the web app,
the example config with its settings switched on. Test modules import them from here (fixtures
from tests/conftest.py), never from each other.

Every snapshot is built from real captures: GPU rows and compute-app rows come from the files in
tests/fixtures/ (stacked into multi-GPU hosts by the helpers of tests/fleet.py, which rewrite only
the index/uuid/bus-id cells), error output from the real error captures, and the owners are the
``PsEntry`` records a test gives (what ``ps`` on the host would say), joined by ``parse.attribute``.
"""

from __future__ import annotations

import getpass
import io
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import yaml

from fleet import (
    CAPTURES,
    ERROR_EXIT_CODES,
    H100_IDLE_QUERY,
    H100_LOAD_APPS,
    H100_LOAD_QUERY,
    L40S_APPS,
    L40S_QUERY,
    MIG_APPS,
    MIG_QUERY,
    Fleet,
    _stack_gpus,
    capture_bytes,
    capture_pids,
    gpu_uuid,
)
from gpuwatch.cli import main
from gpuwatch.config import AlertsConfig, FreeGpuConfig
from gpuwatch.config.load import parse_config
from gpuwatch.fleet import FleetState
from gpuwatch.message import Message
from gpuwatch.model import Disk, FleetSnapshot, HostContext, HostErrorKind, HostSnapshot, PsEntry
from gpuwatch.parse import attribute, classify_nvidia_smi_error, parse_compute_apps, parse_query_gpu
from gpuwatch.probe import PROBE_MARKER
from gpuwatch.rules import AlertRecord, Memory, Notice, Silence, Transition, advance, evaluate, silence_check
from gpuwatch.store import AlertStore

T0 = 1_800_000_000.0  # 2027-01-15 08:00 UTC
MIN, HOUR, DAY = 60.0, 3600.0, 86400.0
H100_PIDS = capture_pids(H100_LOAD_APPS)  # [11327, 11328, 11345]: two memhog, one gpu_burn


# ---------------------------------------------------------------- snapshots from real captures


@dataclass(frozen=True)
class Job:
    """A process ps would report: it takes the next captured compute-app row of its GPU."""

    user: str
    pid: int
    gpu: int
    elapsed: int = 600
    command: str = "python3 train.py --epochs 90"

    def ps(self) -> PsEntry:
        return PsEntry(pid=self.pid, user=self.user, elapsed_seconds=self.elapsed, command=self.command)


@dataclass(frozen=True)
class Stacked:
    """A host's nvidia-smi output stacked from capture rows, and what ps says about its pids."""

    name: str
    query: str  # --query-gpu CSV
    apps: str  # --query-compute-apps CSV
    ps: dict[int, PsEntry]

    def snapshot(self) -> HostSnapshot:
        gpus, issues = parse_query_gpu(self.query)
        assert issues == []
        apps, issues = parse_compute_apps(self.apps)
        assert issues == []
        processes = attribute(gpus, apps, self.ps)
        return HostSnapshot(name=self.name, address=self.name, ok=True, gpus=tuple(gpus), processes=processes)


def _stack(name: str, rows: Sequence[tuple[str, int]], apps: Sequence[tuple[str, int]], jobs: Iterable[Job]) -> Stacked:
    """GPUs and compute apps stacked from capture rows (tests/fleet.py). Job k of a GPU takes that
    GPU's k-th captured process row: its pid cell is rewritten, as the stand-in's ``pids`` file does.
    Rows no job takes keep their captured pid, which ps does not see (owner unknown)."""
    query, compute_apps, _ = _stack_gpus(Path(name), rows, apps)
    header, *lines = compute_apps.splitlines()
    columns = [cell.split(" [", 1)[0] for cell in header.split(", ")]
    pid_col, uuid_col = columns.index("pid"), columns.index("gpu_uuid")
    by_uuid = {gpu_uuid(Path(name), i): i for i in range(len(rows))}
    per_gpu: dict[int, list[Job]] = {}
    for job in jobs:
        per_gpu.setdefault(job.gpu, []).append(job)
    taken: dict[int, int] = {}
    out, ps = [header], {}
    for line in lines:
        cells = line.split(", ")  # pid and gpu_uuid come before process_name in these captures
        gpu = by_uuid[cells[uuid_col]]
        k = taken[gpu] = taken.get(gpu, -1) + 1
        mine = per_gpu.get(gpu, [])
        if k < len(mine):
            cells[pid_col] = str(mine[k].pid)
            ps[mine[k].pid] = mine[k].ps()
        out.append(", ".join(cells))
    return Stacked(name, query, "\n".join(out) + "\n", ps)


def h100_stack(name: str, jobs: Iterable[Job] = (), n_gpus: int = 4) -> Stacked:
    """An H100 box: a GPU with jobs replays the real *load* rows (100 %, 19818 MiB, 59 C, and the
    capture's three processes), the others the real *idle* row (0 %, 0 MiB, 41 C, no process)."""
    jobs = list(jobs)
    busy = sorted({j.gpu for j in jobs})
    rows = [((H100_LOAD_QUERY if i in busy else H100_IDLE_QUERY), 0) for i in range(n_gpus)]
    return _stack(name, rows, [(H100_LOAD_APPS, g) for g in busy], jobs)


def h100_host(name: str, jobs: Iterable[Job] = (), n_gpus: int = 4) -> HostSnapshot:
    return h100_stack(name, jobs, n_gpus).snapshot()


def l40s_host(name: str, jobs: Iterable[Job] = ()) -> HostSnapshot:
    """One L40S under a light load (9 %, 1235 MiB held, two ffmpeg processes)."""
    return _stack(name, [(L40S_QUERY, 0)], [(L40S_APPS, 0)], jobs).snapshot()


def mig_host(name: str, jobs: Iterable[Job] = ()) -> HostSnapshot:
    """One H100 in MIG mode: utilization [N/A], 11125 MiB held, three processes."""
    return _stack(name, [(MIG_QUERY, 0)], [(MIG_APPS, 0)], jobs).snapshot()


def error_host(name: str, capture: str) -> HostSnapshot:
    """A host whose nvidia-smi printed a real error capture (classified as the probe does)."""
    issue = classify_nvidia_smi_error(capture_bytes(capture).decode(), ERROR_EXIT_CODES.get(capture, 255))
    assert issue is not None
    return HostSnapshot.failed(name, name, issue.kind, issue.message)


def down(name: str) -> HostSnapshot:
    return HostSnapshot.failed(
        name, name, HostErrorKind.UNREACHABLE, f"connection refused by {name}:22 (is sshd running on that port?)"
    )


def probe_output(host: Stacked, *, apps_exit: int = 0, ps_exit: int | None = 0, ps_text: str | None = None) -> str:
    """What the probe script prints for ``host``, with the exit status of its compute-apps and ps
    steps chosen: to make a host that answers, but only in part (probe.snapshot_from_output reads it)."""
    apps = "" if apps_exit != 0 else host.apps
    if ps_text is None:
        ps_text = "".join(f"{e.pid:>7} {e.user:<64} {e.elapsed_seconds:>8} {e.command}\n" for e in host.ps.values())
    lines = [PROBE_MARKER, "@@begin gpu", host.query, "@@end gpu 0", "@@begin apps", apps, f"@@end apps {apps_exit}"]
    lines += ["@@begin ps", ps_text]
    if ps_exit is not None:
        lines.append(f"@@end ps {ps_exit}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the engine with an explicit clock


def alerts_config(**alerts: Any) -> AlertsConfig:
    """AlertsConfig exactly as the config file's ``alerts:`` section would give it."""
    return parse_config({"hosts": ["gpu-a"], "alerts": alerts}).alerts


class Engine:
    """evaluate() + advance() poll after poll, as the daemon runs them, with persistence optional."""

    def __init__(self, cfg: AlertsConfig, *, free: FreeGpuConfig = FreeGpuConfig(), store: AlertStore | None = None):
        self.cfg = cfg
        self.free = free
        self.store = store
        self.records: dict[str, AlertRecord] = {}
        self.memory = Memory()
        self.silences: list[Silence] = []
        self.notices: list[Notice] = []
        self.acknowledged: frozenset[str] = frozenset()  # alert ids an ack covers (no reminders)

    def step(
        self,
        now: float,
        *hosts: HostSnapshot,
        fresh: Iterable[str] | None = None,
        removed: Iterable[str] = (),
    ) -> list[Transition]:
        """One evaluation of the fleet state ``hosts``; ``fresh``: the hosts with a new result (all
        when None); ``removed``: hosts just removed from the config."""
        if self.store is not None:
            self.records, self.memory = self.store.records(), self.store.memory()
            self.silences = self.store.silences(now)
        snapshot = FleetSnapshot(taken_at=datetime.fromtimestamp(now, timezone.utc), hosts=hosts)
        new = None if fresh is None else frozenset(fresh)
        evaluation = evaluate(snapshot, self.cfg, self.memory, self.free, new)
        gone = frozenset(removed)
        self.records, transitions = advance(
            self.records,
            evaluation,
            now,
            self.cfg,
            silence_check(self.silences),
            removed_hosts=gone,
            acknowledged=self.acknowledged,
        )
        self.memory = evaluation.memory.forget(gone)
        self.notices = list(evaluation.notices)
        if self.store is not None:
            self.store.save(self.records, self.memory)
        return transitions

    def firing(self) -> list[str]:
        return sorted(k for k, r in self.records.items() if r.state == "firing")


def kinds(transitions: Iterable[Transition]) -> list[tuple[str, str]]:
    return sorted((t.kind, t.record.key.id) for t in transitions)


def alice(gpus: Iterable[int], elapsed: int = 600, first_pid: int = 4100) -> list[Job]:
    return [Job("alice", first_pid + g, g, elapsed) for g in gpus]


# ---------------------------------------------------------------- a host's context (load, memory, disks, boot)

CONTEXT = HostContext(
    load_1m=1.0,
    load_5m=1.0,
    load_15m=1.0,
    cpus=8,
    memory_total_kib=64 * 1024 * 1024,
    memory_available_kib=48 * 1024 * 1024,
    swap_total_kib=0,
    swap_free_kib=0,
    uptime_seconds=3600.0,
    boot_time=1_799_996_400,
    kernel="6.8.0-45-generic",
    driver_version="590.48.01",
    disks=(Disk("/", "ext4", 1000, 400, 600, 40, ("/", "/home", "/tmp")),),
    disks_known=True,
)


# ---------------------------------------------------------------- a fake clock for the channels


class FakeTime:
    """A monotonic clock, a wall clock and a sleep that only moves them (and records delays)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.wall_start = float(int(time.time()))
        self.sleeps: list[float] = []
        self._lock = threading.Lock()

    def monotonic(self) -> float:
        with self._lock:
            return self.now

    def time(self) -> float:
        with self._lock:
            return self.wall_start + (self.now - 1000.0)

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)
            self.now += seconds


# ---------------------------------------------------------------- a fleet state for the web app (tests/test_web*.py)

XSS = "<img src=x onerror=alert(1)>"
WEB_T0 = datetime(2026, 11, 28, 10, 0, tzinfo=timezone.utc)


class Clock:
    """A wall clock for the fleet state and the web app that moves only when told."""

    def __init__(self) -> None:
        self.now = WEB_T0

    def __call__(self) -> datetime:
        return self.now

    def step(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def host(name: str, query: Path, apps: Path | None = None, ps: Mapping[int, PsEntry] | None = None) -> HostSnapshot:
    """A host's result from a real query-gpu capture (and its compute-apps capture), owners from ``ps``."""
    gpus, _ = parse_query_gpu(query.read_text())
    procs = attribute(gpus, parse_compute_apps(apps.read_text())[0], ps or {}) if apps else ()
    return HostSnapshot(name, name, ok=True, gpus=tuple(gpus), processes=procs, probe_seconds=0.31)


def busy_host(name: str = "gpu-a") -> HostSnapshot:
    """H100 under load: alice runs a process whose command line is an XSS attempt, 11345 is unseen by ps."""
    ps = {
        11327: PsEntry(11327, "alice", 7200, XSS),
        11328: PsEntry(11328, "verylongusername", 600, "python3 train.py --lr 3e-4"),
    }
    return host(name, CAPTURES / H100_LOAD_QUERY, CAPTURES / H100_LOAD_APPS, ps)


def fleet(clock: Clock) -> FleetState:
    """gpu-a busy (H100), gpu-f free (idle H100), gpu-m in MIG mode, gpu-d down."""
    state = FleetState([(n, n) for n in ("gpu-a", "gpu-f", "gpu-m", "gpu-d")], poll_every=60, now=clock)
    state.update(busy_host())
    state.update(host("gpu-f", CAPTURES / H100_IDLE_QUERY))
    state.update(
        host("gpu-m", CAPTURES / MIG_QUERY, CAPTURES / MIG_APPS, {21180: PsEntry(21180, "bob", 60, "jupyter-lab")})
    )
    state.update(HostSnapshot.failed("gpu-d", "gpu-d", HostErrorKind.UNREACHABLE, "connection refused by 10.9.9.9:22"))
    return state


def config(tmp_path: Path, **web: Any) -> Any:
    return parse_config({"hosts": ["gpu-a"], "state_dir": str(tmp_path / "state"), "web": web})


# ---------------------------------------------------------------- the command line (test_cli, test_status_view)

ME = getpass.getuser()
GONE = {"name": "gpu-gone", "address": "127.0.0.1", "port": 9, "connect_timeout": "2s"}  # nothing listens


def write_yaml(path: Path, doc: dict[str, Any]) -> Path:
    """``doc`` as YAML at ``path``, readable by its owner only (as gpuwatch wants a config)."""
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    path.chmod(0o600)
    return path


def write_web_config(tmp_path: Path, fleet: Fleet, known_hosts: Path, hosts: list[Any], poll: float) -> Path:
    """``tmp_path/config.yaml`` for a daemon polling ``hosts`` on the fleet every ``poll`` seconds,
    its web page on a free port of 127.0.0.1, no reports, its state in ``tmp_path/state``."""
    doc = {
        "hosts": hosts,
        "ssh": fleet.gpuwatch_ssh(known_hosts, connect_timeout="2s", command_timeout="5s"),
        "state_dir": str(tmp_path / "state"),
        "schedule": {"poll_every": f"{poll:g}s", "reports": []},
        "web": {"listen": "127.0.0.1:0"},
    }
    return write_yaml(tmp_path / "config.yaml", doc)


def write_config(tmp_path: Path, hosts: list[Any] | None = None, mode: int = 0o600, **extra: Any) -> Path:
    doc: dict[str, Any] = {
        "hosts": hosts or ["localhost"],
        "ssh": {"use_ssh_config": False, "known_hosts": str(tmp_path / "known_hosts")},
        "state_dir": str(tmp_path / "state"),
        **extra,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    path.chmod(mode)
    return path


def cli(config: Path, *argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main([*argv, "-c", str(config)], out=out)
    return code, out.getvalue()


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


# ---------------------------------------------------------------- the example config


def switched_on(text: str) -> str:
    """The example with its commented-out settings (``# key: value``, ``#   - item``) switched on;
    prose comments stay comments."""
    lines = []
    for line in text.splitlines():
        for _ in range(2):  # "#   # ca_file:" is a commented-out line inside a commented-out section
            line = re.sub(r"^(\s*)# ?(?=\s*(?:# ?\s*)?(?:[a-z_]+:|- ))", r"\1", line)
        lines.append(line)
    return "\n".join(lines) + "\n"


class Recorder:
    """A channel that keeps the titles of what it delivered (from its worker thread)."""

    dry_run = False

    def __init__(self, name: str = "feishu") -> None:
        self.name = name
        self.titles: list[str] = []

    def prepare(self, message: Message) -> list[dict[str, Any]]:
        return [{"title": message.title}]

    def deliver(self, payload: dict[str, Any]) -> None:
        self.titles.append(str(payload["title"]))

    def describe(self, payload: dict[str, Any]) -> str:
        return str(payload["title"])
