"""Who really owns a GPU process: its container, its Slurm job, its login session, from its cgroups.

This module owns reading the probe's ``cgroup`` section (each GPU process's /proc/PID/cgroup, v1
and v2 lines alike), ``passwd`` (``getent passwd`` for the uids those paths name), ``docker``
(``docker inspect``) and ``crictl`` (``crictl inspect``) sections, recognising the real path
formats (tests/fixtures/cgroup has captures of each), and deciding each process's owner: the
Slurm job's user; a container's owner label (``attribution.owner_label``) or, for a rootless
container, the user who runs it; else the ``ps`` user. Pure functions returning
``(records, issues)``; nothing runs at import time.

Path formats (``<id>`` is 64 hex digits, ``<uid>`` a pod UID):

- Docker: ``/docker/<id>`` (cgroupfs driver), ``/system.slice/docker-<id>.scope`` (systemd);
- Kubernetes: ``/kubepods[.slice]/[<qos>/]pod<uid>/<id>`` and the systemd spelling
  ``kubepods-<qos>-pod<uid>.slice/{cri-containerd,crio,docker}-<id>.scope``, also under
  ``/kubelet.slice/kubelet-kubepods.slice`` and containerd's ``...pod<uid>.slice:cri-containerd:<id>``;
- Podman: ``/machine.slice/libpod-<id>.scope``; rootless Podman or Docker below
  ``/user.slice/user-<n>.slice/user@<n>.service/``;
- Slurm: ``/slurm/uid_<n>/job_<j>/step_<s>/...`` (v1), ``/system.slice/slurmstepd.scope/job_<j>/step_<s>/...`` (v2);
- login sessions: ``/user.slice/user-<n>.slice/...``.

What a host prints is data: a user can create cgroups below their own ``user@<n>.service`` (and a
container's root below the container's own cgroup), and name them anything, ``docker-<id>.scope``
or ``job_1`` included. So every format is recognised only where it starts at the root of the
hierarchy, in directories only root creates; what lies below a user's own subtree only ever speaks
for that user (a rootless container is theirs, never someone else's). Container names, images and
labels are shown, and a label names an owner only when it is a plain user name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from .config import AttributionConfig
from .model import Container, GpuProcess, HostErrorKind, HostIssue, SlurmJob
from .parse import MAX_TEXT_CHARS, excerpt

__all__ = [
    "MAX_INSPECT_IDS",
    "AttributionSettings",
    "CgroupFacts",
    "CgroupRead",
    "ContainerInfo",
    "attribute_owners",
    "classify",
    "parse_cgroups",
    "parse_crictl_inspect",
    "parse_docker_inspect",
    "parse_passwd",
    "valid_directory_name",
    "valid_user_name",
]

MAX_INSPECT_IDS = 32
"""Container ids asked of ``docker inspect`` / ``crictl inspect`` in one poll, at most."""
MAX_CGROUP_LINES = 64  # per process: a real file has one per hierarchy (about 13)
_MAX_LINE = 4096

_HEX64 = r"[0-9a-f]{64}"
_ID = re.compile(_HEX64)
_DOCKER = (
    re.compile(rf"^/docker/(?P<id>{_HEX64})(?:/|$)"),
    re.compile(rf"^/system\.slice/docker-(?P<id>{_HEX64})\.scope(?:/|$)"),
)
_PODMAN = re.compile(
    rf"^/machine\.slice/(?:machine-libpod_pod_[0-9a-f]{{64}}\.slice/)?libpod-(?P<id>{_HEX64})\.scope(?:/|$)"
)
_POD_UID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}|[0-9a-f]{32}"
_POD_SEG = re.compile(rf"^(?:[a-z-]*-)?pod(?P<uid>{_POD_UID})(?:\.slice)?$")
_CTR_SEG = re.compile(rf"^(?:(?P<rt>cri-containerd|crio|docker)-)?(?P<id>{_HEX64})(?:\.scope)?$")
_COLON_SEG = re.compile(
    rf"^(?:[a-z-]*-)?pod(?P<uid>{_POD_UID})\.slice:(?P<rt>cri-containerd|crio|docker):(?P<id>{_HEX64})$"
)
_QOS_SEG = re.compile(r"^(?:besteffort|burstable|(?:kubelet-)?kubepods-(?:besteffort|burstable)\.slice)$")
_K8S_RUNTIMES = {"cri-containerd": "containerd", "crio": "cri-o", "docker": "docker", None: "kubernetes"}
_USER_MANAGER = re.compile(r"^/user\.slice/user-(?P<uid>[0-9]{1,10})\.slice/user@(?P=uid)\.service/(?P<rest>.*)$")
_ROOTLESS_SEG = re.compile(rf"^(?P<rt>libpod|docker)-(?P<id>{_HEX64})\.scope$")
_SLURM_V1 = re.compile(
    r"^/slurm(?:_[^/]+)?/uid_(?P<uid>[0-9]{1,10})/job_(?P<job>[0-9]{1,12})(?:/step_(?P<step>[A-Za-z0-9_]{1,32}))?(?:/|$)"
)
_SLURM_V2 = re.compile(
    r"^/system\.slice/(?:[^/]+_)?slurmstepd\.scope/job_(?P<job>[0-9]{1,12})"
    r"(?:/step_(?P<step>[A-Za-z0-9_]{1,32}))?(?:/|$)"
)
_SESSION = (
    re.compile(r"^/user\.slice/user-(?P<uid>[0-9]{1,10})\.slice(?:/|$)"),
    re.compile(r"^/user/(?P<uid>[0-9]{1,10})\.user(?:/|$)"),  # systemd before 205 (cgroup v1)
)
_LINE = re.compile(r"^(?P<hierarchy>[0-9]{1,4}):(?P<controllers>[^:]*):(?P<path>/.*)$")
_USER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._@-]{0,63}\$?$")
_MAX_UID = 2**32 - 2


def valid_user_name(text: str) -> bool:
    """A plain user name (letters, digits, ``._@-``), nothing more: what a container's owner label
    must be. A directory may hold others (:func:`valid_directory_name`)."""
    return bool(_USER_NAME.match(text))


MAX_DIRECTORY_NAME_CHARS = 256
"""The longest user name taken from ``getent`` (glibc's LOGIN_NAME_MAX)."""


def valid_directory_name(text: str) -> bool:
    """A user name as ``getent passwd`` may print it: from /etc/passwd a plain name, from a directory
    (AD/LDAP through sssd or winbind) also blanks and any letter (``john doe``, ``josé``). One line
    of printable text without the ``:`` that ends the name, at most 256 characters, not blank."""
    return 0 < len(text) <= MAX_DIRECTORY_NAME_CHARS and text.isprintable() and ":" not in text and bool(text.strip())


AttributionSettings = AttributionConfig
"""How an owner is found beyond ``ps`` (``attribution:`` in the config)."""


# ------------------------------------------------------------------------------------
# the cgroup section


@dataclass(frozen=True)
class CgroupRead:
    """One process's /proc/PID/cgroup as the probe read it: its lines, or why there are none."""

    lines: tuple[str, ...] = ()
    note: str | None = None  # "gone", "unreadable", ...: the lines are then not known


def parse_cgroups(text: str) -> tuple[dict[int, CgroupRead], list[HostIssue]]:
    """The ``cgroup`` section: ``cg <pid> <line>`` per line of a process's /proc/PID/cgroup,
    ``gone <pid>`` or ``unreadable <pid>`` when it could not be read.

    The kernel refuses line breaks in cgroup names, so each line is one line of the file. A pid
    said to be both read and unreadable, or with more lines than any real file, gets no cgroup.
    """
    lines: dict[int, list[str]] = {}
    notes: dict[int, str] = {}
    bad: list[str] = []
    for raw in text.split("\n"):
        if not raw.strip():
            continue
        parts = raw.split(" ", 2)
        pid = _pid(parts[1]) if len(parts) >= 2 else None
        if pid is None:
            bad.append(raw)
        elif parts[0] == "cg" and len(parts) == 3:
            lines.setdefault(pid, []).append(parts[2][:_MAX_LINE])
        elif parts[0] in ("gone", "unreadable") and len(parts) == 2:
            notes[pid] = "the process had exited" if parts[0] == "gone" else "its cgroup could not be read"
        else:
            bad.append(raw)
    reads: dict[int, CgroupRead] = {}
    for pid in {*lines, *notes}:
        found = lines.get(pid, [])
        if pid in notes and found:
            reads[pid] = CgroupRead(note="its cgroup was listed and said unreadable at once; unknown")
        elif len(found) > MAX_CGROUP_LINES:
            reads[pid] = CgroupRead(note=f"its cgroup has {len(found)} lines; unknown")
        elif pid in notes:
            reads[pid] = CgroupRead(note=notes[pid])
        else:
            reads[pid] = CgroupRead(lines=tuple(found))
    issues = []
    if bad:
        issues.append(
            HostIssue(
                HostErrorKind.UNPARSEABLE, f"the cgroup listing holds a line that is no cgroup: {excerpt(bad[0])}"
            )
        )
    return reads, issues


def _pid(text: str) -> int | None:
    if not (text.isascii() and text.isdigit()) or len(text) > 10:
        return None
    value = int(text)
    return value if 1 <= value <= 2**31 - 1 else None


# ------------------------------------------------------------------------------------
# recognising a path


@dataclass(frozen=True)
class CgroupFacts:
    """What the cgroup lines of one process say, where they agree."""

    container: Container | None = None
    slurm_job: SlurmJob | None = None
    session_uid: int | None = None
    note: str | None = None  # lines that disagreed (two containers, two jobs)


def _kubernetes(path: str) -> Container | None:
    segments = path.strip("/").split("/")
    if not segments or not segments[0]:
        return None
    start = 0
    if segments[0] in ("kubepods", "kubepods.slice"):
        start = 1
    elif segments[0] == "kubelet.slice" and len(segments) > 1 and segments[1].startswith("kubelet-kubepods"):
        start = 2
    elif len(segments) > 2 and segments[:2] == ["system.slice", "containerd.service"]:
        start = 2  # containerd's own spelling under cgroupfs: ...pod<uid>.slice:cri-containerd:<id>
    else:
        colon = _COLON_SEG.match(segments[0])
        return _colon_container(colon) if colon else None
    rest = segments[start:]
    if rest and _COLON_SEG.match(rest[0]):
        return _colon_container(_COLON_SEG.match(rest[0]))
    if start == 2 and segments[0] == "system.slice":
        return None
    if rest and _QOS_SEG.match(rest[0]):
        rest = rest[1:]
    if len(rest) < 2:
        return None
    pod, ctr = _POD_SEG.match(rest[0]), _CTR_SEG.match(rest[1])
    if pod is None or ctr is None:
        return None
    return Container(_K8S_RUNTIMES[ctr["rt"]], ctr["id"], pod_uid=pod["uid"].replace("_", "-"))


def _colon_container(match: re.Match[str] | None) -> Container | None:
    if match is None:
        return None
    return Container(_K8S_RUNTIMES[match["rt"]], match["id"], pod_uid=match["uid"].replace("_", "-"))


def _container(path: str) -> Container | None:
    for pattern in _DOCKER:
        match = pattern.match(path)
        if match:
            return Container("docker", match["id"])
    match = _PODMAN.match(path)
    if match:
        return Container("podman", match["id"])
    found = _kubernetes(path)
    if found is not None:
        return found
    manager = _USER_MANAGER.match(path)
    if manager:
        uid = int(manager["uid"])
        segments = manager["rest"].split("/")
        for i, segment in enumerate(segments):
            rootless = _ROOTLESS_SEG.match(segment)
            if rootless:
                runtime = "podman" if rootless["rt"] == "libpod" else "docker"
                return Container(runtime, rootless["id"], rootless_uid=uid if uid <= _MAX_UID else None)
            if segment == "docker" and i + 1 < len(segments) and _ID.fullmatch(segments[i + 1]):
                return Container("docker", segments[i + 1], rootless_uid=uid if uid <= _MAX_UID else None)
    return None


def _slurm(path: str) -> SlurmJob | None:
    v1 = _SLURM_V1.match(path)
    if v1:
        uid = int(v1["uid"])
        return SlurmJob(v1["job"], v1["step"], uid if uid <= _MAX_UID else None)
    v2 = _SLURM_V2.match(path)
    if v2:
        return SlurmJob(v2["job"], v2["step"])
    return None


def _session_uid(path: str) -> int | None:
    for pattern in _SESSION:
        session = pattern.match(path)
        if session and int(session["uid"]) <= _MAX_UID:
            return int(session["uid"])
    return None


def classify(lines: Iterable[str]) -> CgroupFacts:
    """What the lines of one /proc/PID/cgroup say: its container, Slurm job and login session.

    Every hierarchy's line is read (v1 hierarchies and the v2 ``0::`` line); they must agree: two
    different containers or jobs leave both unknown, with a note. Where hierarchies differ in
    depth (Slurm puts a task in ``job_<j>`` in one and ``job_<j>/step_0`` in another) the most
    specific step wins.
    """
    containers: dict[str, Container] = {}
    jobs: dict[str, SlurmJob] = {}
    sessions: set[int] = set()
    malformed = 0
    hierarchies: set[str] = set()
    for line in lines:
        match = _LINE.match(line)
        if match is None or match["hierarchy"] in hierarchies:
            malformed += 1  # the kernel writes every line so, once per hierarchy: damaged on the way
            continue
        hierarchies.add(match["hierarchy"])
        path = match["path"]
        container, job = _container(path), _slurm(path)
        if ("\ufffd" in path or "\x00" in path) and container is None and job is None and not _session_uid(path):
            # A byte that was no UTF-8 (or a NUL, which no cgroup name holds) where nothing was
            # recognised may stand for a letter of a root-made name: damaged. After a recognised
            # prefix it is only a name a user or a container chose below their own cgroup.
            malformed += 1
            continue
        if container is not None:
            known = containers.get(container.id)
            if known is None or (known.runtime == "kubernetes" and container.runtime != "kubernetes"):
                containers[container.id] = container
        if job is not None:
            known_job = jobs.get(job.job_id)
            jobs[job.job_id] = SlurmJob(
                job.job_id,
                (known_job.step if known_job else None) or job.step,
                (known_job.uid if known_job else None) if job.uid is None else job.uid,
            )
        uid = _session_uid(path)
        if uid is not None:
            sessions.add(uid)
    notes = []
    if malformed:
        return CgroupFacts(note=f"{malformed} of its cgroup lines are not the kernel's format; its cgroups are unknown")
    if len(containers) > 1:
        notes.append(f"its cgroups name {len(containers)} different containers")
    if len(jobs) > 1:
        notes.append(f"its cgroups name {len(jobs)} different Slurm jobs")
    return CgroupFacts(
        container=next(iter(containers.values())) if len(containers) == 1 else None,
        slurm_job=next(iter(jobs.values())) if len(jobs) == 1 else None,
        session_uid=next(iter(sessions)) if len(sessions) == 1 else None,
        note="; ".join(notes) or None,
    )


# ------------------------------------------------------------------------------------
# uids, docker inspect, crictl inspect


def parse_passwd(text: str) -> tuple[dict[int, str], list[HostIssue]]:
    """``getent passwd <uid>...`` output -> {uid: name}; a uid with two names gets neither."""
    names: dict[int, str] = {}
    twice: set[int] = set()
    bad: list[str] = []
    for raw in text.split("\n"):
        if not raw.strip():
            continue
        parts = raw.split(":")
        uid = _pid(parts[2]) if len(parts) == 7 else None
        if uid is None and len(parts) == 7 and parts[2] == "0":
            uid = 0
        if uid is None or not valid_directory_name(parts[0]):
            bad.append(raw)
            continue
        if uid in names and names[uid] != parts[0]:
            twice.add(uid)
        names.setdefault(uid, parts[0])
    for uid in twice:
        names.pop(uid, None)
    issues = []
    if bad:
        issues.append(HostIssue(HostErrorKind.UNPARSEABLE, f"getent printed a line that is no user: {excerpt(bad[0])}"))
    return names, issues


@dataclass(frozen=True)
class ContainerInfo:
    """What the runtime says about a container id (absent values are unknown)."""

    name: str | None = None
    image: str | None = None
    pod: str | None = None
    namespace: str | None = None
    labels: Mapping[str, str] | None = None


def _text(value: object) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    if not text.isprintable() or len(text) > MAX_TEXT_CHARS:
        return excerpt(text)
    return text


def _labels(value: object) -> dict[str, str] | None:
    if not isinstance(value, dict):
        return None
    return {str(k)[:MAX_TEXT_CHARS]: v for k, v in list(value.items())[:256] if isinstance(v, str)}


def parse_docker_inspect(text: str) -> tuple[dict[str, ContainerInfo], list[HostIssue]]:
    """``docker inspect --format '{{json .Id}} {{json .Name}} {{json .Config.Image}}
    {{json .Config.Labels}}'`` output: one line per container (Go's JSON escapes every control
    character, so a label cannot break a line). ``Error: No such container`` lines are ids that
    are not Docker's."""
    found: dict[str, ContainerInfo] = {}
    bad: list[str] = []
    decoder = json.JSONDecoder()
    for raw in text.split("\n"):
        line = raw.strip()
        if not line or line.startswith("Error: No such container") or line.startswith("Error: No such object"):
            continue
        values: list[Any] = []
        at = 0
        try:
            while at < len(line) and len(values) < 5:
                value, at = decoder.raw_decode(line, at)
                values.append(value)
                while at < len(line) and line[at] == " ":
                    at += 1
        except ValueError:
            bad.append(raw)
            continue
        if len(values) != 4 or at != len(line) or not isinstance(values[0], str) or not _ID.fullmatch(values[0]):
            bad.append(raw)
            continue
        name = values[1].lstrip("/") if isinstance(values[1], str) else None
        found[values[0]] = ContainerInfo(name=_text(name), image=_text(values[2]), labels=_labels(values[3]))
    return found, _inspect_issues("docker inspect", bad)


def parse_crictl_inspect(text: str) -> tuple[dict[str, ContainerInfo], list[HostIssue]]:
    """``crictl inspect -o go-template --template '{{json .status}}'`` output: one JSON object per
    container (the CRI ContainerStatus), whose labels name the pod and its namespace."""
    found: dict[str, ContainerInfo] = {}
    bad: list[str] = []
    for raw in text.split("\n"):
        line = raw.strip()
        if not line:
            continue
        try:
            status = json.loads(line)
        except ValueError:
            bad.append(raw)
            continue
        ident = status.get("id") if isinstance(status, dict) else None
        if not isinstance(ident, str) or not _ID.fullmatch(ident):
            bad.append(raw)
            continue
        labels = _labels(status.get("labels")) or {}
        metadata = status.get("metadata") if isinstance(status.get("metadata"), dict) else {}
        image = status.get("image") if isinstance(status.get("image"), dict) else {}
        found[ident] = ContainerInfo(
            name=_text(metadata.get("name")) or _text(labels.get("io.kubernetes.container.name")),
            image=_text(image.get("image")),
            pod=_text(labels.get("io.kubernetes.pod.name")),
            namespace=_text(labels.get("io.kubernetes.pod.namespace")),
            labels=labels,
        )
    return found, _inspect_issues("crictl inspect", bad)


def _inspect_issues(what: str, bad: Sequence[str]) -> list[HostIssue]:
    if not bad:
        return []
    more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
    return [
        HostIssue(
            HostErrorKind.UNPARSEABLE,
            f"{what} printed a line gpuwatch cannot read: {excerpt(bad[0])}{more}; those containers are shown by id",
        )
    ]


# ------------------------------------------------------------------------------------
# deciding the owner


def attribute_owners(
    processes: Sequence[GpuProcess],
    cgroups: Mapping[int, CgroupRead] | None,
    users: Mapping[int, str],
    inspected: Mapping[str, ContainerInfo | None],
    settings: AttributionSettings,
) -> tuple[tuple[GpuProcess, ...], list[HostIssue]]:
    """Each process with its container, Slurm job, session and owner.

    ``cgroups`` is None when the probe did not read them (an older probe): processes are then as
    ``ps`` saw them. A process whose cgroup was not read keeps its ps user, with a note saying why.
    ``users``: {uid: name} on the host; ``inspected``: {container id: what the runtime said, or
    None when it did not know the id}.
    """
    if cgroups is None:
        return tuple(processes), []
    issues: list[HostIssue] = []
    odd = _odd_ones(cgroups)
    classified: dict[int, CgroupFacts] = {}  # a process on 8 GPUs is listed 8 times: read once
    out = []
    for proc in processes:
        read = cgroups.get(proc.pid)
        if read is not None and proc.pid in odd:
            read = CgroupRead(
                note="its cgroup file lists other hierarchies than the other processes' (damaged); unknown"
            )
        if read is None or read.note is not None:
            note = read.note if read is not None else "its cgroup was not listed"
            out.append(replace(proc, cgroup_note=note) if proc.user is not None else proc)
            continue
        facts = classified.get(proc.pid)
        if facts is None:
            facts = classified[proc.pid] = classify(read.lines)
        container = facts.container
        if container is not None and container.rootless_uid is None:
            # Only a system container is the system runtime's to describe: a user names their own
            # subtree, so an id there may be another container's, whose labels are not theirs.
            info = inspected.get(container.id)
            if info is not None:
                container = replace(container, name=info.name, image=info.image, pod=info.pod, namespace=info.namespace)
        job = facts.slurm_job
        if job is not None and job.uid is not None:
            job = replace(job, user=users.get(job.uid))
        owner, source, note = _owner(proc, container, job, inspected, users, settings)
        session = users.get(facts.session_uid) if facts.session_uid is not None else None
        out.append(
            replace(
                proc,
                container=container,
                slurm_job=job,
                session_user=session if session is not None and session != (owner or proc.user) else None,
                attributed_owner=owner,
                owner_source=source,
                cgroup_note="; ".join(n for n in (facts.note, note) if n) or None,
            )
        )
    return tuple(out), issues


def _hierarchies(lines: Iterable[str]) -> frozenset[str]:
    found = set()
    for line in lines:
        match = _LINE.match(line)
        if match is not None:
            found.add(f"{match['hierarchy']}:{match['controllers']}")
    return frozenset(found)


def _odd_ones(cgroups: Mapping[int, CgroupRead]) -> set[int]:
    """Every process of a host is in every hierarchy the host mounts, so each /proc/PID/cgroup
    lists the same hierarchies: a process listing only some of another's lost a line on the way."""
    sets = {pid: _hierarchies(read.lines) for pid, read in cgroups.items() if read.note is None and read.lines}
    return {pid for pid, found in sets.items() if any(found < other for other in sets.values())}


def _owner(
    proc: GpuProcess,
    container: Container | None,
    job: SlurmJob | None,
    inspected: Mapping[str, ContainerInfo | None],
    users: Mapping[int, str],
    settings: AttributionSettings,
) -> tuple[str | None, str | None, str | None]:
    """(owner, where it came from, a note): the Slurm job's user, a container's owner label, a
    rootless container's user; (None, None, None) when the ps user stands."""
    if job is not None and job.uid is not None:
        if job.user is not None:
            return job.user, "slurm", None
        return None, None, f"Slurm job {job.job_id}'s uid {job.uid} has no name on the host"
    if container is None:
        return None, None, None
    info = inspected.get(container.id) if container.rootless_uid is None else None
    if settings.owner_label and info is not None and info.labels:
        value = info.labels.get(settings.owner_label)
        if value is not None:
            if valid_user_name(value.strip()):
                return value.strip(), "label", None
            return None, None, f"the container's {settings.owner_label} label {excerpt(value, 40)} is no user name"
    if settings.rootless_owner and container.rootless_uid is not None:
        name = users.get(container.rootless_uid)
        if name is not None:
            return name, "rootless", None
        return None, None, f"the rootless container's uid {container.rootless_uid} has no name on the host"
    return None, None, None
