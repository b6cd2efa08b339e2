"""Who owns a GPU process, and the rest of the host, end to end: the real sshd fleet, real processes of
real users moved into real cgroups made on this machine (named as Docker, Kubernetes and Slurm name
theirs, in the unified hierarchy and a v1 one), docker/crictl stand-ins replaying real inspect
captures, and a real tmpfs filled and emptied. ``status --json`` and the overview must attribute each
process to the right runtime, id, job and owner; the host's disks, memory and load must be what
``df``, ``free`` and /proc/loadavg say here."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pwd
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fakefeishu import FakeFeishu, text_values
from fleet import (
    H100_HELP_QUERY_GPU,
    H100_LOAD_APPS,
    H100_LOAD_QUERY,
    H100_VERSION,
    MIG_APPS,
    Fleet,
    _stack_gpus,
    capture_bytes,
    capture_pids,
    publish_scenario,
)
from gpuwatch.cli import main
from processes import kill_marked, new_marker

ROOT = Path("/sys/fs/cgroup")
UNIFIED = ROOT / "unified" if (ROOT / "unified" / "cgroup.procs").exists() else ROOT
FREEZER = ROOT / "freezer"  # a v1 hierarchy, as Slurm's task/cgroup used it (tests/fixtures/cgroup/slurm-v1-*)
CONTAINERS = Path(__file__).resolve().parent / "fixtures" / "container"
DOCKER_ID = "3a73d078dfe897882443cb09785b9ac896a989cc4b8c721c61e08596ae642b4a"  # docker-inspect-jupyterhub-singleuser
CRI_ID = "6dce0bc1e1ec1a0c55db8d43097b1091a12e9160c5c2a06f3b2175f89d7c0154"  # crictl-inspect-status-fluentd-gcp
POD_UID = "6925b67a_f505_11e7_b364_42010a800002"  # that container's pod (io.kubernetes.pod.uid)
KEYWORD = "GPU"


def _cgroups_usable() -> str | None:
    if os.geteuid() != 0:
        return "making cgroups needs root"
    if not (UNIFIED / "cgroup.procs").exists():
        return "no cgroup v2 hierarchy mounted"
    if not (FREEZER / "cgroup.procs").exists():
        return "no v1 freezer hierarchy mounted"
    return None


class Cgroups:
    """Cgroups this test makes: each directory made is removed afterwards (leaves first), after every
    process in it was moved back to the hierarchy's root."""

    def __init__(self) -> None:
        self.made: list[Path] = []
        self.moved: list[tuple[Path, int]] = []

    def put(self, root: Path, relative: str, pid: int) -> None:
        path = root
        for part in relative.strip("/").split("/"):
            path = path / part
            if not path.exists():
                path.mkdir()
                self.made.append(path)
        (path / "cgroup.procs").write_text(f"{pid}\n")
        self.moved.append((root, pid))

    def undo(self) -> None:
        for root, pid in self.moved:
            with contextlib.suppress(OSError):
                (root / "cgroup.procs").write_text(f"{pid}\n")
        for path in reversed(self.made):
            with contextlib.suppress(OSError):
                path.rmdir()


@pytest.fixture
def cgroups() -> Iterator[Cgroups]:
    reason = _cgroups_usable()
    if reason:
        pytest.skip(reason)
    made = Cgroups()
    yield made
    made.undo()
    assert all(not p.exists() for p in made.made), "a test cgroup was left behind"


@pytest.fixture
def marker() -> Iterator[str]:
    value = new_marker()
    yield value
    kill_marked(value)


def start(user: str, marker: str) -> int:
    entry = pwd.getpwnam(user)
    proc = subprocess.Popen(
        ["sleep", marker], user=entry.pw_uid, group=entry.pw_gid, extra_groups=[], start_new_session=True
    )
    return proc.pid


@contextlib.contextmanager
def unreadable_cgroup(pid: int, tmp: Path) -> Iterator[None]:
    """/proc/PID/cgroup made unreadable to everyone but root (as a security module may make it):
    a file without permissions bind-mounted over it."""
    blank = tmp / "no-access"
    blank.write_text("")
    blank.chmod(0)
    subprocess.run(["mount", "--bind", str(blank), f"/proc/{pid}/cgroup"], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", f"/proc/{pid}/cgroup"], check=False)


@contextlib.contextmanager
def runtime_sockets(fleet: Fleet) -> Iterator[None]:
    """The monitor user may ask Docker and containerd (their sockets writable by it)."""
    made = []
    for name in ("docker.sock", "containerd.sock"):
        path = fleet.runtime_dir / name
        path.write_text("")
        path.chmod(0o666)
        made.append(path)
    try:
        yield
    finally:
        for path in made:
            path.unlink(missing_ok=True)


def scenario_of(fleet: Fleet, address: str, real: list[int]) -> None:
    """Two H100s replaying the load capture; the H100 and MIG compute-apps captures' six pids run on
    them, the first five mapped to ``real``; docker and crictl know the two captured containers."""
    directory = fleet.scenario_dir(address)
    query, apps, sources = _stack_gpus(directory, [(H100_LOAD_QUERY, 0), (H100_LOAD_QUERY, 0)],
                                       [(H100_LOAD_APPS, 0), (MIG_APPS, 1)])  # fmt: skip
    captured = capture_pids(H100_LOAD_APPS) + capture_pids(MIG_APPS)
    docker = json.loads((CONTAINERS / "docker-inspect-jupyterhub-singleuser.json").read_text(encoding="utf-8"))
    crictl = json.loads((CONTAINERS / "crictl-inspect-status-fluentd-gcp.json").read_text(encoding="utf-8"))
    publish_scenario(
        directory,
        {
            "query-gpu.csv": query,
            "compute-apps.csv": apps,
            "help-query-gpu.txt": capture_bytes(H100_HELP_QUERY_GPU),
            "version.txt": capture_bytes(H100_VERSION),
            "pids": "".join(f"{cap} {pid}\n" for cap, pid in zip(captured, real)),
            "docker-inspect.json": json.dumps([docker]),
            "crictl-status.json": json.dumps([crictl]),
            "SOURCES": sources + "docker-inspect.json, crictl-status.json: tests/fixtures/container (as captured)\n",
        },
    )


def write_config(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    path.chmod(0o600)
    return path


def cli(config: Path, *args: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main([*args, "-c", str(config)], out=out)
    return code, out.getvalue()


def test_status_and_the_overview_name_the_person_behind_each_process(
    fleet: Fleet, known_hosts: Path, tmp_path: Path, cgroups: Cgroups, marker: str
) -> None:
    address = fleet.addresses[0]
    alice, bob = pwd.getpwnam("alice"), pwd.getpwnam("verylongusername")
    in_docker = start("alice", marker)
    in_pod = start("root", marker)
    in_slurm_v1 = start("root", marker)  # root runs it; the job is alice's (its uid in the v1 path)
    in_slurm_v2 = start("verylongusername", marker)
    hidden = start("alice", marker)
    cgroups.put(UNIFIED, f"system.slice/docker-{DOCKER_ID}.scope", in_docker)
    cgroups.put(
        UNIFIED,
        f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_UID}.slice/cri-containerd-{CRI_ID}.scope",
        in_pod,
    )
    cgroups.put(FREEZER, f"slurm/uid_{alice.pw_uid}/job_48213/step_0/task_0", in_slurm_v1)
    cgroups.put(UNIFIED, "system.slice/slurmstepd.scope/job_48214/step_0/user/task_0", in_slurm_v2)
    scenario_of(fleet, address, [in_docker, in_pod, in_slurm_v1, in_slurm_v2, hidden])
    feishu = FakeFeishu(keywords=[KEYWORD])
    with feishu, runtime_sockets(fleet), unreadable_cgroup(hidden, tmp_path):
        config = write_config(
            tmp_path / "config.yaml",
            {
                "hosts": [{"name": "gpu-a", "address": address}],
                "ssh": fleet.gpuwatch_ssh(known_hosts),
                "state_dir": str(tmp_path / "state"),
                "feishu": {"url": feishu.url, "keyword": KEYWORD, "format": "text"},
                "schedule": {"reports": [{"report": "overview", "every": "1h"}]},
            },
        )
        code, text = cli(config, "status", "--json")
        assert code == 0
        (host,) = json.loads(text)["hosts"]
        code, table = cli(config, "status")
        assert code == 0
        assert cli(config, "run", "--once")[0] == 0
        overview = "\n".join(text_values(feishu.accepted[-1]))
    assert host["ok"], host["error"]
    procs = {p["pid"]: p for p in host["processes"]}

    docker = procs[in_docker]
    assert (docker["user"], docker["owner"], docker["owner_source"]) == ("alice", "alice", None)
    assert docker["container"] == {
        "runtime": "docker",
        "id": DOCKER_ID,
        "name": "dazzling_wiles",  # from docker inspect (the stand-in replays the real capture)
        "image": "jupyterhub/singleuser:latest",
        "pod": None,
        "namespace": None,
        "pod_uid": None,
        "rootless_uid": None,
    }
    pod = procs[in_pod]
    assert (pod["user"], pod["owner"]) == ("root", "root")
    assert pod["container"]["runtime"] == "containerd" and pod["container"]["id"] == CRI_ID
    assert (pod["container"]["pod"], pod["container"]["namespace"]) == ("fluentd-gcp-v2.0.11-7f9jb", "kube-system")
    assert pod["container"]["pod_uid"] == POD_UID.replace("_", "-")
    v1 = procs[in_slurm_v1]
    assert (v1["user"], v1["owner"], v1["owner_source"]) == ("root", "alice", "slurm")
    assert v1["slurm_job"] == {"job_id": "48213", "step": "0", "uid": alice.pw_uid, "user": "alice"}
    v2 = procs[in_slurm_v2]
    assert (v2["owner"], v2["slurm_job"]["job_id"], v2["slurm_job"]["uid"]) == ("verylongusername", "48214", None)
    assert bob.pw_name == v2["user"]
    unread = procs[hidden]
    assert (unread["user"], unread["owner"], unread["container"], unread["slurm_job"]) == ("alice", "alice", None, None)
    assert unread["cgroup_note"] == "its cgroup could not be read"
    gone = [p for p in host["processes"] if p["pid"] not in procs or p["user"] is None]
    assert len(gone) == 1 and gone[0]["owner"] is None  # the sixth captured pid: no process here

    # People read the owner first, the context after: in status and in the overview.
    # GPU 0 runs the H100 capture's three pids (docker, pod, Slurm v1), GPU 1 the MIG capture's.
    gpu0, gpu1 = overview.split("\n0: ", 1)[1].split("\n1: ", 1)
    assert (
        "alice (docker dazzling_wiles, jupyterhub/singleuser:latest; slurm 48213) 18256 MiB, 2 procs; "
        "root (k8s kube-system/fluentd-gcp-v2.0.11-7f9jb, gcr.io/google-containers/fluentd-gcp:2.0.11) 1542 MiB"
    ) in gpu0
    assert (
        "verylongusername (slurm 48214) 2296 MiB; alice (cgroup not read) 1272 MiB; pid 21198 (owner unknown) 7484 MiB"
    ) in gpu1
    assert "alice (docker dazzling_wiles, jupyterhub/singleuser:latest; slurm 48213)(18256M)" in table
    assert "alice (cgroup not read)(1272M)" in table
    # GPU health from the fields the driver lists (learned in this one poll): the capture's own.
    assert host["gpus"][0]["health"]["ecc_uncorrected_volatile"] == 0
    assert host["context"]["driver_version"] == "590.48.01" and host["context"]["cuda_version"] == "13.1"


def _df_line(path: str) -> list[str]:
    return (
        subprocess.run(["df", "-P", "-k", "-T", path], capture_output=True, text=True, check=True)
        .stdout.split("\n")[1]
        .split(None, 6)
    )


def _meminfo() -> dict[str, int]:
    return {
        k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    }


@pytest.fixture
def small_disk() -> Iterator[Path]:
    """A 4 MiB tmpfs mounted where the monitor user can reach it; unmounted and removed after."""
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    path = Path(f"/tmp/gpuwatch-disk-{uuid.uuid4().hex[:8]}")
    path.mkdir(mode=0o755)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "gpuwatch-test", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)
        shutil.rmtree(path, ignore_errors=True)


def test_disks_memory_and_load_are_this_machines_and_disk_above_fires_and_resolves(
    fleet: Fleet, known_hosts: Path, tmp_path: Path, small_disk: Path
) -> None:
    address = fleet.addresses[1]
    feishu = FakeFeishu(keywords=[KEYWORD])
    with feishu:
        config = write_config(
            tmp_path / "config.yaml",
            {
                "hosts": [{"name": "gpu-b", "address": address}],
                "ssh": fleet.gpuwatch_ssh(known_hosts),
                "state_dir": str(tmp_path / "state"),
                "feishu": {"url": feishu.url, "keyword": KEYWORD, "format": "text"},
                "schedule": {"reports": []},
                "host_context": {"disks": ["/", str(small_disk)]},
                "alerts": {"disk_above": 90},
            },
        )
        load_before = [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
        mem_before, df_before = _meminfo(), _df_line("/")
        code, text = cli(config, "status", "--json")
        mem_after, df_after = _meminfo(), _df_line("/")
        load_after = [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
        assert code == 0
        (host,) = json.loads(text)["hosts"]
        context = host["context"]
        for got, before, after in zip(
            (context["load_1m"], context["load_5m"], context["load_15m"]), load_before, load_after
        ):
            assert min(before, after) <= got <= max(before, after)
        free = subprocess.run(["free", "-k"], capture_output=True, text=True, check=True).stdout.split("\n")[1].split()
        assert context["memory_total_kib"] == int(free[1]) == mem_before["MemTotal"]
        low, high = sorted((mem_before["MemAvailable"], mem_after["MemAvailable"]))
        assert low - 65536 <= context["memory_available_kib"] <= high + 65536  # within 64 MiB of what changed
        assert context["cpus"] == os.sysconf("SC_NPROCESSORS_ONLN")
        disks = {d["mount"]: d for d in context["disks"]}
        root = disks["/"]
        assert root["size_kib"] == int(df_before[2]) == int(df_after[2]) and root["fs_type"] == df_before[1]
        assert (
            min(int(df_before[3]), int(df_after[3])) - 1024
            <= root["used_kib"]
            <= max(int(df_before[3]), int(df_after[3])) + 1024
        )
        small = disks[str(small_disk)]
        assert (small["size_kib"], small["fs_type"], small["use_percent"]) == (4096, "tmpfs", 0)

        # Fill it: over 90 % -> disk_above fires for that mount; empty it -> resolved.
        filler = small_disk / "fill"
        filler.write_bytes(b"\0" * (3900 * 1024))
        assert cli(config, "run", "--once")[0] == 0
        fired = "\n".join(text_values(feishu.accepted[-1]))
        assert "FIRING disk_above (gpu-b)" in fired and f"gpu-b disk {small_disk} is 96% full" in fired
        filler.unlink()
        assert cli(config, "run", "--once")[0] == 0
        resolved = "\n".join(text_values(feishu.accepted[-1]))
        assert "RESOLVED disk_above (gpu-b)" in resolved and len(feishu.accepted) == 2
