"""Who owns a GPU process: the cgroup paths of real hosts (tests/fixtures/cgroup, every runtime and
cgroup version), docker/crictl inspect output (tests/fixtures/container), and the owner decided from
them. Text a user controls (their own cgroup subtree, a container's labels) never speaks for anyone
but that user."""

from __future__ import annotations

import csv
import json
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from gpuwatch.attribution import (
    AttributionSettings,
    CgroupRead,
    ContainerInfo,
    attribute_owners,
    classify,
    parse_cgroups,
    parse_crictl_inspect,
    parse_docker_inspect,
    parse_passwd,
)
from gpuwatch.model import Container, GpuProcess, HostErrorKind, SlurmJob
from gpuwatch.summary import who

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CGROUP = FIXTURES / "cgroup"
CONTAINER = FIXTURES / "container"
STANDIN = Path(__file__).resolve().parent / "standin"

DOCKER_ID = "3a73d078dfe897882443cb09785b9ac896a989cc4b8c721c61e08596ae642b4a"  # the jupyterhub capture
CRI_ID = "6dce0bc1e1ec1a0c55db8d43097b1091a12e9160c5c2a06f3b2175f89d7c0154"  # the fluentd-gcp capture


def lines(name: str) -> list[str]:
    return (CGROUP / name).read_text(encoding="utf-8").splitlines()


# ---------------------------------------------------------------- every capture, as the runtime wrote it

EXPECTED = {
    "docker-v1-cgroupfs-ubuntu.txt": ("docker", "31cb02944da7", None, None, None),
    "docker-v1-systemd-centos.txt": ("docker", "9ec39b91f3d7", None, None, None),
    "docker-v1-hybrid-ctrsploit.txt": ("docker", "2403ccfe427f", None, None, None),
    # RancherOS: the user's Docker runs inside system-docker's container; the host's runtime knows the outer one.
    "docker-in-docker-v1-rancheros.txt": ("docker", "a9a5ad238e59", None, None, None),
    "k8s-v1-cgroupfs-docker.txt": ("kubernetes", "cb1eadb7abe3", "74ba62da-1a3d-11e7-bb11-080027cb0e22", None, None),
    "k8s-v1-systemd-docker.txt": ("docker", "b5b6f2da8008", "045b1e35-7f13-11e7-ac42-0050568ffca0", None, None),
    "k8s-v1-cgroupfs-merged-controllers.txt": (
        "kubernetes",
        "da31e536c8d6",
        "1fe19bf5-e8ef-11e8-900c-52daee5a874d",
        None,
        None,
    ),
    "k8s-hybrid-systemd-containerd-bottlerocket.txt": (
        "containerd",
        "f45298cd514d",
        "dd1bf9d1-241d-47f5-8e25-12de83135812",
        None,
        None,
    ),
    "k8s-v1-systemd-crio-1.17.txt": ("cri-o", "7a1fd6fe8cdf", "487a0dc6dccaeefbcfedba7a7ce1ca18", None, None),
    "k8s-v1-cgroupfs-containerd-1.2.13.txt": (
        "kubernetes",
        "5dd96d5394ca",
        "a36d0c1d-0b26-4451-8d80-9c195e004afa",
        None,
        None,
    ),
    "k8s-v1-containerd-1.4.4-colon-form.txt": (
        "containerd",
        "d3d8ccf5cca9",
        "2105e389-7471-476e-a50f-6074cef29bbd",
        None,
        None,
    ),
    "podman-rootless-v2-rocky9.txt": ("podman", "6e341326175b", None, None, 1001),
    "podman-root-in-user-session-v2-fedora38.txt": ("podman", "cf21d19260ac", None, None, 0),
    "slurm-v1-ex3-slurm21.txt": (None, None, None, SlurmJob("748468", "0", 7319), None),
    "slurm-v1-devices-line.txt": (None, None, None, SlurmJob("280678", "interactive", 2101171), None),
    "slurm-v2-task.txt": (None, None, None, SlurmJob("4", "0"), None),
    "slurm-v2-fox.txt": (None, None, None, SlurmJob("1392969", "0"), None),
    "slurmstepd-v2-system.txt": (None, None, None, None, None),  # slurmstepd itself: no job
    "host-process-v1.txt": (None, None, None, None, None),
    "user-session-v1-old-systemd.txt": (None, None, None, None, 1000),
    "user-session-v2.txt": (None, None, None, None, 20821),
}


def test_every_capture_has_its_source() -> None:
    with (CGROUP / "SOURCES.tsv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    listed = {row["saved_name"] for row in rows}
    assert listed == {p.name for p in CGROUP.glob("*.txt")} == set(EXPECTED)
    assert all(row["repo"] and row["path"] and row["license"] for row in rows)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_cgroup_paths_of_each_runtime_and_version(name: str) -> None:
    runtime, short, pod_uid, job, uid = EXPECTED[name]
    facts = classify(lines(name))
    assert facts.note is None
    if runtime is None:
        assert facts.container is None
    else:
        assert facts.container is not None
        assert (facts.container.runtime, facts.container.short_id, facts.container.pod_uid) == (runtime, short, pod_uid)
        assert len(facts.container.id) == 64
    assert facts.slurm_job == job
    if name.startswith("podman"):
        assert facts.container is not None and facts.container.rootless_uid == uid  # started by that user
    elif name.startswith("user-session"):
        assert facts.session_uid == uid


# ---------------------------------------------------------------- what a user can name


USER_SUBTREE = "0::/user.slice/user-1002.slice/user@1002.service/app.slice/"


@pytest.mark.parametrize(
    "path",
    [
        f"{USER_SUBTREE}docker-{DOCKER_ID}.scope",  # a user's own cgroup named like a Docker scope
        f"{USER_SUBTREE}slurm/uid_0/job_1/step_0",  # ... like another user's Slurm job
        f"{USER_SUBTREE}system.slice/slurmstepd.scope/job_7/step_0",
        f"{USER_SUBTREE}kubepods.slice/kubepods-burstable-pod6925b67a_f505_11e7_b364_42010a800002.slice/"
        f"cri-containerd-{CRI_ID}.scope",
        f"{USER_SUBTREE}machine.slice/libpod-{DOCKER_ID}.scope",
    ],
)
def test_names_below_a_users_own_subtree_speak_only_for_that_user(path: str) -> None:
    """systemd delegates user@<uid>.service to the user: anything there is theirs to name. It is
    never a Slurm job nor a system container; a rootless-looking container there is theirs."""
    facts = classify([path])
    assert facts.slurm_job is None
    assert facts.session_uid == 1002
    if facts.container is not None:
        assert facts.container.rootless_uid == 1002  # the user who runs it, whatever it is called
    process = GpuProcess(1, 0, None, "alice", "python3", "python3 x.py", 100, 5)
    inspected = {DOCKER_ID: ContainerInfo(name="theirs", labels={"owner": "root"}), CRI_ID: None}
    (result,), _ = attribute_owners(
        [process], {1: CgroupRead(lines=(path,))}, {1002: "alice"}, inspected, AttributionSettings()
    )
    assert result.owner == "alice"  # a label of a real container cannot be borrowed from a user's subtree


def test_a_path_inside_a_container_does_not_change_the_container() -> None:
    """Below the container's own cgroup is the container's to name (its root may run systemd)."""
    inner = f"0::/system.slice/docker-{DOCKER_ID}.scope/kubepods/besteffort/pod{'1' * 32}/{'f' * 64}"
    facts = classify([inner, f"1:name=systemd:/system.slice/docker-{DOCKER_ID}.scope/slurm/uid_0/job_9"])
    assert facts.container is not None and facts.container.id == DOCKER_ID and facts.slurm_job is None


def test_two_containers_or_two_jobs_in_one_process_are_unknown() -> None:
    mixed = lines("docker-v1-cgroupfs-ubuntu.txt")[:3] + lines("k8s-v1-systemd-crio-1.17.txt")[3:5]  # 12-10, 9-8
    facts = classify(mixed)
    assert facts.container is None and facts.note == "its cgroups name 2 different containers"
    jobs = classify([*lines("slurm-v1-ex3-slurm21.txt"), *lines("slurm-v2-fox.txt")])
    assert jobs.slurm_job is None and "2 different Slurm jobs" in (jobs.note or "")


def test_the_cgroup_section_keeps_each_pid_to_itself() -> None:
    text = "\n".join(
        [
            *(f"cg 101 {line}" for line in lines("slurm-v1-ex3-slurm21.txt")),
            "gone 102",
            "unreadable 103",
            "cg 104 0::/",
            "unreadable 104",  # listed and unreadable: a damaged or forged listing
            "cg notapid 0::/",
            *(f"cg 105 {i}:cpu:/" for i in range(65)),  # more lines than any real file
        ]
    )
    reads, issues = parse_cgroups(text)
    assert reads[101].lines == tuple(lines("slurm-v1-ex3-slurm21.txt"))
    assert reads[102].note == "the process had exited"
    assert reads[103].note == "its cgroup could not be read"
    assert reads[104].note and reads[104].lines == ()
    assert reads[105].note and reads[105].lines == ()
    assert [i.kind for i in issues] == [HostErrorKind.UNPARSEABLE]


# ---------------------------------------------------------------- uids and runtimes


def test_getent_lines_give_uid_names_and_nothing_else() -> None:
    text = "alice:x:1002:1002::/home/alice:/bin/sh\nverylongusername:x:1003:1003::/home/v:/bin/sh\n" + (
        "root:x:0:0:root:/root:/bin/bash\nbad line\nevil\nname:x:1004:1:a:b:c\nother:x:1004:1:a:b:c\n"
    )
    names, issues = parse_passwd(text)
    assert names == {1002: "alice", 1003: "verylongusername", 0: "root"}  # 1004: two names, neither
    assert len(issues) == 1


def test_getent_names_from_a_directory_keep_their_blanks_and_letters() -> None:
    """AD/LDAP names (through sssd or winbind) may hold blanks and any letter: each is one name."""
    text = (
        "john doe:*:1004:1004::/home/john doe:/bin/sh\njos\u00e9:x:1005:1005::/home/j:/bin/sh\n"
        "CORP\\\u5f20\u4e09:*:1006:1:a:b:c\n\t:x:1007:1:a:b:c\n :x:1008:1:a:b:c\n"
    )
    names, issues = parse_passwd(text)
    assert names == {1004: "john doe", 1005: "jos\u00e9", 1006: "CORP\\\u5f20\u4e09"}
    assert len(issues) == 1  # a control character or nothing but a blank is no name


def _standin(tool: str, argv: list[str], scenario: Path, fixture: str, key: str) -> str:
    data = json.loads((CONTAINER / fixture).read_text(encoding="utf-8"))
    (scenario / "local").mkdir(parents=True, exist_ok=True)
    (scenario / "local" / key).write_text(json.dumps([data]), encoding="utf-8")
    done = subprocess.run(
        [str(STANDIN / tool), *argv], env={"GPUWATCH_STANDIN_DIR": str(scenario)}, capture_output=True, text=True
    )
    return done.stdout + done.stderr


def test_docker_inspect_of_a_real_container(tmp_path: Path) -> None:
    fmt = "{{json .Id}} {{json .Name}} {{json .Config.Image}} {{json .Config.Labels}}"
    argv = ["inspect", "--type", "container", "--format", fmt, DOCKER_ID, "f" * 64]
    output = _standin("docker", argv, tmp_path, "docker-inspect-jupyterhub-singleuser.json", "docker-inspect.json")
    found, issues = parse_docker_inspect(output)
    assert issues == []  # "Error: No such container" is an id Docker does not have, not a problem
    assert found == {
        DOCKER_ID: ContainerInfo(
            name="dazzling_wiles",
            image="jupyterhub/singleuser:latest",
            labels={"maintainer": "Jupyter Project <jupyter@googlegroups.com>"},
        )
    }
    damaged, issues = parse_docker_inspect(output.replace('"/dazzling_wiles"', '"/dazz'))
    assert damaged == {} and [i.kind for i in issues] == [HostErrorKind.UNPARSEABLE]


def test_crictl_inspect_of_a_real_container(tmp_path: Path) -> None:
    argv = ["--runtime-endpoint", "unix:///x", "inspect", "-o", "go-template", "--template", "{{json .status}}"]
    output = _standin(
        "crictl", [*argv, CRI_ID], tmp_path, "crictl-inspect-status-fluentd-gcp.json", "crictl-status.json"
    )
    found, issues = parse_crictl_inspect(output)
    assert issues == []
    info = found[CRI_ID]
    assert (info.name, info.pod, info.namespace, info.image) == (
        "fluentd-gcp",
        "fluentd-gcp-v2.0.11-7f9jb",
        "kube-system",
        "gcr.io/google-containers/fluentd-gcp:2.0.11",
    )


# ---------------------------------------------------------------- the owner


def _proc(pid: int, user: str | None) -> GpuProcess:
    return GpuProcess(pid, 0, "GPU-0", user, "python3", "python3 train.py", 2566, 600)


def _attribute(
    cgroup_lines: list[str],
    user: str | None = "root",
    inspected: dict[str, ContainerInfo | None] | None = None,
    users: dict[int, str] | None = None,
    settings: AttributionSettings | None = None,
) -> GpuProcess:
    (result,), issues = attribute_owners(
        [_proc(7, user)],
        {7: CgroupRead(lines=tuple(cgroup_lines))},
        users or {},
        inspected or {},
        settings or AttributionSettings(),
    )
    assert issues == []
    return result


JUPYTER = ContainerInfo(
    name="dazzling_wiles",
    image="jupyterhub/singleuser:latest",
    labels={"maintainer": "Jupyter Project <jupyter@googlegroups.com>"},
)


def test_a_slurm_jobs_process_belongs_to_the_jobs_user() -> None:
    proc = _attribute(lines("slurm-v1-ex3-slurm21.txt"), user="root", users={7319: "bob"})
    assert (proc.owner, proc.owner_source, proc.user) == ("bob", "slurm", "root")
    assert proc.slurm_job == SlurmJob("748468", "0", 7319, "bob")
    assert who(proc) == "bob (slurm 748468)"
    nameless = _attribute(lines("slurm-v1-ex3-slurm21.txt"), user="root")
    assert nameless.owner == "root" and "uid 7319 has no name" in (nameless.cgroup_note or "")
    v2 = _attribute(lines("slurm-v2-fox.txt"), user="carol")  # v2 names no uid: the task runs as its user
    assert (v2.owner, v2.owner_source, who(v2)) == ("carol", None, "carol (slurm 1392969)")


def test_a_container_shows_its_name_and_image_and_its_owner_label() -> None:
    docker = lines("docker-v1-systemd-centos.txt")
    ident = "9ec39b91f3d70e1beff50a308f77067065ea6be0d91a3378375056cd4422cf3d"
    proc = _attribute(docker, user="alice", inspected={ident: JUPYTER})
    assert who(proc) == "alice (docker dazzling_wiles, jupyterhub/singleuser:latest)"
    assert proc.owner_source is None  # no owner label: the ps user stands
    # The real capture's labels with an owner label added (what a lab's launcher sets).
    labelled = replace(JUPYTER, labels={**(JUPYTER.labels or {}), "owner": "alice"})
    proc = _attribute(docker, user="root", inspected={ident: labelled})
    assert (proc.owner, proc.owner_source, proc.user) == ("alice", "label", "root")
    # A label that is no user name (the capture's maintainer) never becomes an owner.
    settings = AttributionSettings(owner_label="maintainer")
    proc = _attribute(docker, user="root", inspected={ident: JUPYTER}, settings=settings)
    assert proc.owner == "root" and "is no user name" in (proc.cgroup_note or "")
    # Without inspect (the login user may not run docker): the short id.
    assert who(_attribute(docker, user="alice")) == "alice (docker 9ec39b91f3d7)"


def test_a_kubernetes_container_names_its_pod() -> None:
    path = (
        "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod6925b67a_f505_11e7_b364_42010a800002.slice/"
        f"cri-containerd-{CRI_ID}.scope"
    )
    info = ContainerInfo(
        "fluentd-gcp", "gcr.io/google-containers/fluentd-gcp:2.0.11", "fluentd-gcp-v2.0.11-7f9jb", "kube-system"
    )
    proc = _attribute([path], user="root", inspected={CRI_ID: info})
    assert who(proc) == "root (k8s kube-system/fluentd-gcp-v2.0.11-7f9jb, gcr.io/google-containers/fluentd-gcp:2.0.11)"
    assert proc.container == Container(
        "containerd",
        CRI_ID,
        "fluentd-gcp",
        "gcr.io/google-containers/fluentd-gcp:2.0.11",
        "fluentd-gcp-v2.0.11-7f9jb",
        "kube-system",
        "6925b67a-f505-11e7-b364-42010a800002",
    )


def test_a_rootless_container_belongs_to_the_user_who_runs_it() -> None:
    proc = _attribute(lines("podman-rootless-v2-rocky9.txt"), user="100999", users={1001: "dave"})
    assert (proc.owner, proc.owner_source) == ("dave", "rootless")  # ps shows the namespace's mapped uid
    off = _attribute(
        lines("podman-rootless-v2-rocky9.txt"),
        user="100999",
        users={1001: "dave"},
        settings=AttributionSettings(rootless_owner=False),
    )
    assert off.owner == "100999"


def test_a_process_in_another_users_session_says_whose() -> None:
    proc = _attribute(lines("user-session-v2.txt"), user="root", users={20821: "erin"})
    assert proc.owner == "root" and who(proc) == "root (session of erin)"
    own = _attribute(lines("user-session-v2.txt"), user="erin", users={20821: "erin"})
    assert who(own) == "erin"


def test_a_process_whose_cgroup_cannot_be_read_keeps_its_ps_user_and_says_so() -> None:
    (proc, gone), _ = attribute_owners(
        [_proc(7, "alice"), _proc(8, None)],
        {7: CgroupRead(note="its cgroup could not be read"), 8: CgroupRead(note="the process had exited")},
        {},
        {},
        AttributionSettings(),
    )
    assert (proc.owner, proc.cgroup_note) == ("alice", "its cgroup could not be read")
    assert who(proc) == "alice (cgroup not read)"
    assert gone.owner is None and who(gone) == "pid 8 (owner unknown)"
    # An older probe (no cgroup step): processes as ps saw them.
    assert attribute_owners([_proc(7, "alice")], None, {}, {}, AttributionSettings())[0][0] == _proc(7, "alice")


def test_a_line_damaged_on_the_way_makes_that_process_unknown_never_someone_elses() -> None:
    """Found by the fuzzer (tests/fuzzing.py): a byte that was no UTF-8 in the root-made part of a
    path, a line lost between two processes, a line printed twice."""
    slurm = lines("slurm-v1-ex3-slurm21.txt")
    damaged = [line.replace("/slurm/", "/sl\ufffdrm/") for line in slurm]
    assert classify(damaged).slurm_job is None and classify(damaged).note
    assert classify([*slurm, slurm[0]]).note  # hierarchy 13 twice
    # Junk below a recognised prefix is a name a user or a container chose: the job stands.
    assert classify([line + "/\ufffd\x00" if "job_" in line else line for line in slurm]).slurm_job is not None
    # Two processes of one host list the same hierarchies; one that lost a line is unknown.
    reads = {1: CgroupRead(lines=tuple(slurm)), 2: CgroupRead(lines=tuple(slurm[1:]))}
    one, two = attribute_owners([_proc(1, "root"), _proc(2, "root")], reads, {7319: "bob"}, {}, AttributionSettings())[
        0
    ]
    assert one.owner == "bob" and two.owner == "root" and "other hierarchies" in (two.cgroup_note or "")
