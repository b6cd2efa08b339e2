"""The one remote command per poll, and the turn of its output into a HostSnapshot.

A single ``sh -s`` exec runs a small POSIX script made of steps (:data:`STEPS`), each a shell
snippet printing its sections and a parser reading them back:

- ``host``: load, memory, uptime, boot time, kernel, CPU count (one ``awk`` over /proc);
  ``df`` and ``disks``: every local filesystem and the configured paths (``df -P -k -T``);
- ``gpu``: ``nvidia-smi --query-gpu`` with the health fields the host supports; ``health`` says
  which were asked; once per host (and after a driver change) ``learn`` reads them from
  ``--help-query-gpu`` and the CUDA version from ``--version``, and ``gpuhealth`` asks them;
- ``apps``: ``nvidia-smi --query-compute-apps``; ``ps`` and ``args``: owners and command lines;
- ``cgroup``: each GPU process's /proc/PID/cgroup; ``passwd``, ``docker``, ``crictl``: the uids and
  containers those name (``getent``, ``docker inspect``, ``crictl inspect`` where the login user
  may run them).

Each step is bounded on the host by ``timeout`` and reports its own exit status between section
markers that carry a per-poll token::

    @@gpuwatch-probe 1 <token>
    @@begin gpu <token>
    <nvidia-smi output, stderr merged>
    @@end gpu <token> <exit status>
    ...

Output from a host is data written by its users (a command line is whatever its owner
typed), so a marker only counts with the token of this poll: :func:`new_token` gives 128
unguessable bits, which reach the host inside the script on ``sh -s``'s stdin and are
printed only by shell builtins (``echo``, ``printf``), so they are in no process's argv for
another user to read. With ``token=""`` the markers have no token (tests, older outputs).

A :class:`HostProbe` is one host's probe across polls: its settings (the disks to show, how owners
are found) and what its probes learned (the health fields the driver supports, the CUDA version,
the containers and uids already looked up), so that the next poll asks only what is new.

Whatever a host prints, :func:`snapshot_from_output` gives that host's snapshot and never
raises: a section cut short is a warning (or, for the GPU list, a failure), never a silent
"ok" with its data missing.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import secrets
import shlex
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from . import attribution, hostinfo, parse
from .attribution import ContainerInfo
from .config import AttributionConfig, Config, HostContextConfig
from .model import ComputeApp, Disk, Gpu, GpuProcess, HostContext, HostErrorKind, HostIssue, HostSnapshot, PsEntry

log = logging.getLogger(__name__)

PROBE_MARKER = "@@gpuwatch-probe 1"
TIMEOUT_EXITS = (124, 137)
MAX_WARNINGS = 20
"""Warnings kept per host; the rest are counted in one warning per kind."""
QUICK_SECONDS = 3
"""Bound of the steps that only read the host (df, docker/crictl inspect, getent): a hung NFS
mount or a stuck container runtime costs this, never the poll."""
MAX_CRICTL_IDS = 8  # crictl stops at the first unknown id, so it is asked one id at a time

_TOKEN_RE = re.compile(r"[0-9A-Za-z]{8,128}")


@dataclass(frozen=True)
class Step:
    """One step of the probe: its shell snippet and the sections it prints (read by the parser
    named in :data:`STEPS`' docs)."""

    name: str
    shell: str
    sections: tuple[str, ...]


_PRELUDE = r"""# gpuwatch probe: one exec per poll; every step bounded by timeout(1)
LC_ALL=C; export LC_ALL
PATH="$PATH:/usr/bin:/bin:/usr/sbin:/sbin:/usr/local/bin:/usr/local/nvidia/bin"; export PATH
T=__STEP__
Q=__QUICK__
SMI=__SMI__
run() { if command -v timeout >/dev/null 2>&1; then timeout -k 2 "$T" "$@"; else "$@"; fi; }
quick() { if command -v timeout >/dev/null 2>&1; then timeout -k 1 "$Q" "$@"; else "$@"; fi; }
# The token (__K__) is printed by the builtins echo and printf only: never in an argv.
echo "@@gpuwatch-probe 1__K__"
"""

HOST_AWK = r"""FILENAME == "/proc/loadavg" { print "loadavg", $1, $2, $3; next }
FILENAME == "/proc/uptime" { print "uptime", $1; next }
FILENAME == "/proc/stat" { if ($1 == "btime") print "btime", $2; else if ($1 ~ /^cpu[0-9]+$/) n++; next }
FILENAME == "/proc/meminfo" {
  if ($1 ~ /^(MemTotal|MemAvailable|SwapTotal|SwapFree):$/) print "mem", $1, $2; next }
FILENAME == "/proc/sys/kernel/osrelease" { print "kernel", $1; next }
FILENAME == "/proc/self/mountinfo" { if ($5 ~ /\\012/) nl = 1; next }
END { if (n) print "cpus", n; if (nl) print "mount-with-newline" }"""
"""The host step's awk: one exec reads every /proc file (``mount-with-newline``: some mount point
holds a line break, which /proc/self/mountinfo shows escaped as ``\012``)."""

_HOST = r"""echo "@@begin host__K__"
quick awk '__HOST_AWK__' /proc/loadavg /proc/uptime /proc/stat /proc/meminfo /proc/sys/kernel/osrelease \
  /proc/self/mountinfo 2>/dev/null
printf '\n@@end host__K__ %s\n' "$?"
echo "@@begin df__K__"
quick df -P -k -T -l -x squashfs -x overlay -x iso9660 -x devtmpfs 2>&1
printf '\n@@end df__K__ %s\n' "$?"
echo "@@begin disks__K__"
for p in __DISKS__; do printf 'path %s\n' "$p"; quick df -P -k -T -- "$p" 2>&1; done
printf '\n@@end disks__K__ 0\n'
"""

HEALTH_AWK = r"""BEGIN { n = split(want, w, ",") }
/^"/ { s = $0
  while (match(s, /"[^"]*"/)) { have[substr(s, RSTART + 1, RLENGTH - 2)] = 1; s = substr(s, RSTART + RLENGTH) } }
END { for (i = 1; i <= n; i++) {
    split(w[i], p, "=")
    if ((p[1] in have) && !(p[2] in done)) { done[p[2]] = 1; printf "%s%s", c, p[1]; c = "," } }
  print "" }"""
"""The learning step's awk over ``--help-query-gpu``: the wanted fields (``name=reading``, current
names first) the driver lists, one per reading; :func:`parse.supported_health_fields` in shell."""

_GPU = r"""echo "@@begin gpu__K__"
if ! command -v "$SMI" >/dev/null 2>&1; then
  echo "$SMI: command not found"
  printf '\n@@end gpu__K__ 127\n'
  exit 0
fi
X=__HEALTH__
out=$(run "$SMI" --query-gpu=__GPU_FIELDS__${X:+,$X} --format=csv 2>&1)
rc=$?
refused=
if [ "$rc" != 0 ] && [ -n "$X" ]; then
  case "$out" in
    *"is not a valid field"*) refused=1; out=$(run "$SMI" --query-gpu=__GPU_FIELDS__ --format=csv 2>&1); rc=$? ;;
  esac
fi
printf '%s\n' "$out"
printf '\n@@end gpu__K__ %s\n' "$rc"
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then exit 0; fi
echo "@@begin health__K__"
printf 'asked %s\n' "$X"
if [ -n "$refused" ]; then echo refused; fi
printf '\n@@end health__K__ 0\n'
if [ __LEARN__ = 1 ] && [ "$rc" = 0 ]; then
  echo "@@begin learn__K__"
  L=$(run "$SMI" --help-query-gpu 2>/dev/null | awk -v want=__WANT__ '__HEALTH_AWK__')
  printf 'fields %s\n' "$L"
  run "$SMI" --version 2>&1 | head -n 20
  printf '\n@@end learn__K__ %s\n' "$?"
  if [ -n "$L" ]; then
    echo "@@begin gpuhealth__K__"
    run "$SMI" --query-gpu=index,uuid,"$L" --format=csv 2>&1
    printf '\n@@end gpuhealth__K__ %s\n' "$?"
  fi
fi
"""

_APPS = r"""apps=$(run "$SMI" --query-compute-apps=__APP_FIELDS__ --format=csv 2>&1)
rc=$?
echo "@@begin apps__K__"
printf '%s\n' "$apps"
printf '\n@@end apps__K__ %s\n' "$rc"
pids=$(printf '%s\n' "$apps" | awk -F', ' 'NR > 1 && $1 ~ /^[0-9]+$/ { printf "%s%s", s, $1; s = "," }')
"""

_PS = r"""echo "@@begin ps__K__"
if [ -n "$pids" ]; then
  run ps -ww -o __PS_FORMAT__ -p "$pids" 2>&1
  printf '\n@@end ps__K__ %s\n' "$?"
  echo "@@begin args__K__"
  run ps -ww -o __ARGS_FORMAT__ -p "$pids" 2>&1
  printf '\n@@end args__K__ %s\n' "$?"
else
  printf '\n@@end ps__K__ 0\n'
fi
"""

IDS_AWK = r"""function add(kind, v) {
  if (index(known, " " kind v " ") || seen[kind v]++ || count[kind]++ >= max) return; out[kind] = out[kind] " " v }
{ s = $0
  while (match(s, /(docker-|docker\/|cri-containerd-|crio-|:cri-containerd:|:crio:|:docker:)[0-9a-f]+/)) {
    t = substr(s, RSTART, RLENGTH); s = substr(s, RSTART + RLENGTH)
    match(t, /[-\/:][0-9a-f]+$/); v = substr(t, RSTART + 1)
    if (length(v) == 64) add(t ~ /cri|crio/ ? "c" : "d", v) }
  s = $0
  if (match(s, /\/pod[0-9a-f_-]+(\.slice)?\/[0-9a-f]+(\/|$)/)) {
    t = substr(s, RSTART, RLENGTH); sub(/\/$/, "", t); match(t, /\/[0-9a-f]+$/); v = substr(t, RSTART + 1)
    if (length(v) == 64) { add("c", v); add("d", v) } }
  s = $0
  while (match(s, /(\/uid_|\/user-)[0-9]+/)) {
    t = substr(s, RSTART, RLENGTH); s = substr(s, RSTART + RLENGTH); sub(/^[^0-9]*/, "", t)
    if (length(t) <= 10) add("u", t) } }
END { print "d" out["d"]; print "c" out["c"]; print "u" out["u"] }"""
"""The cgroup step's awk: the container ids and uids the cgroup lines name, not yet known to this
host's :class:`HostProbe` (``known``), at most ``max`` of each: what docker, crictl and getent
are asked. Loose on purpose (which path position counts is decided by ``attribution``): an id
asked for nothing costs only its line."""

_CGROUP = r"""if [ -n "$pids" ]; then
  CG=$(
    oifs=$IFS; IFS=,; set -f; set -- $pids; set +f; IFS=$oifs
    files=
    for p in "$@"; do
      if [ ! -d "/proc/$p" ]; then printf 'gone %s\n' "$p"
      elif [ -r "/proc/$p/cgroup" ]; then files="$files /proc/$p/cgroup"
      else printf 'unreadable %s\n' "$p"; fi
    done
    if [ -n "$files" ]; then quick awk '{ split(FILENAME, a, "/"); print "cg", a[3], $0 }' $files 2>/dev/null; fi
  )
  echo "@@begin cgroup__K__"
  printf '%s\n' "$CG"
  printf '\n@@end cgroup__K__ 0\n'
  ids=$(printf '%s\n' "$CG" | awk -v known=__KNOWN__ -v max=__MAX_IDS__ '__IDS_AWK__')
  D=; C=; U=
  while read -r k v; do case "$k" in d) D=$v ;; c) C=$v ;; u) U=$v ;; esac; done <<EOF
$ids
EOF
  if [ -n "$U" ]; then
    echo "@@begin passwd__K__"
    quick getent passwd $U 2>&1
    printf '\n@@end passwd__K__ %s\n' "$?"
  fi
  if [ -n "$D" ] && command -v docker >/dev/null 2>&1; then
    s=/var/run/docker.sock
    case "${DOCKER_HOST:-}" in unix://*) s=${DOCKER_HOST#unix://} ;; ?*) s= ;; esac
    if [ -n "$s" ] && [ -w "$s" ]; then
      echo "@@begin docker__K__"
      quick docker inspect --type container \
        --format '{{json .Id}} {{json .Name}} {{json .Config.Image}} {{json .Config.Labels}}' $D 2>&1
      printf '\n@@end docker__K__ %s\n' "$?"
    fi
  fi
  if [ -n "$C" ] && command -v crictl >/dev/null 2>&1; then
    e=
    for c in "${CONTAINER_RUNTIME_ENDPOINT:-}" unix:///run/containerd/containerd.sock unix:///var/run/crio/crio.sock; do
      case "$c" in unix://*) if [ -e "${c#unix://}" ]; then e=$c; break; fi ;; esac
    done
    if [ -n "$e" ] && [ -w "${e#unix://}" ]; then
      echo "@@begin crictl__K__"
      n=0
      for c in $C; do
        n=$((n + 1)); if [ "$n" -gt __MAX_CRICTL__ ]; then break; fi
        quick crictl --runtime-endpoint "$e" inspect -o go-template --template '{{json .status}}' "$c" 2>&1
      done
      printf '\n@@end crictl__K__ 0\n'
    fi
  fi
fi
"""

STEPS: tuple[Step, ...] = (
    Step("host", _HOST, ("host", "df", "disks")),  # hostinfo.parse_host, parse_df, parse_disk_paths
    Step("gpu", _GPU, ("gpu", "health", "learn", "gpuhealth")),  # parse.parse_query_gpu (+ health)
    Step("apps", _APPS, ("apps",)),  # parse.parse_compute_apps
    Step("ps", _PS, ("ps", "args")),  # parse.parse_ps, parse.parse_ps_args
    Step("cgroup", _CGROUP, ("cgroup", "passwd", "docker", "crictl")),  # attribution.*
)
"""The probe's steps in the order they run; a new source is a new step here and its parser."""
SECTIONS = tuple(name for step in STEPS for name in step.sections)


@dataclass(frozen=True)
class ProbeSettings:
    """What a probe shows beyond the GPUs (``host_context:`` and ``attribution:`` in the config)."""

    host_context: HostContextConfig = dataclasses.field(default_factory=HostContextConfig)
    attribution: AttributionConfig = dataclasses.field(default_factory=AttributionConfig)

    @classmethod
    def of(cls, config: Config) -> ProbeSettings:
        return cls(config.host_context, config.attribution)


class HostProbe:
    """One host's probe across polls: its settings and what its probes learned.

    What is learned: the health fields the host's nvidia-smi supports and its CUDA version (asked
    once, again after the driver changes or refuses a field), and the containers and uids already
    looked up (kept while they are seen, so each is asked of the runtime once). A host has at most
    one probe in flight (``poll.HostProber``), so one script and one reading alternate; a lock
    keeps a late reading from mixing with the next script anyway.
    """

    def __init__(self, settings: ProbeSettings | None = None) -> None:
        self.settings = settings or ProbeSettings()
        self.health_fields: tuple[str, ...] | None = None  # None: not learned yet
        self.cuda_version: str | None = None
        self.driver_version: str | None = None
        self.containers: dict[str, ContainerInfo | None] = {}
        self.users: dict[int, str] = {}
        self._lock = threading.Lock()

    def forget_learned(self) -> None:
        """Ask the driver again on the next poll (it changed, or refused a field)."""
        with self._lock:
            self.health_fields = None
            self.cuda_version = None

    def known(self) -> str:
        """The ids and uids looked up already, as the cgroup step's awk reads them."""
        with self._lock:
            words = [f"d{i}" for i in self.containers] + [f"c{i}" for i in self.containers]
            words += [f"u{u}" for u in self.users]
        return " " + " ".join(words) + " "


def step_timeout(command_timeout: float) -> int:
    """Each step gets 40% of the command budget, so a hung first step still leaves time to report."""
    return max(1, int(command_timeout * 0.4))


def new_token() -> str:
    """A fresh marker token for one poll: 128 random bits, in hex."""
    return secrets.token_hex(16)


def _suffix(token: str) -> str:
    if token and not _TOKEN_RE.fullmatch(token):
        raise ValueError("a probe token is 8 to 128 letters and digits (use new_token())")
    return f" {token}" if token else ""


def _want() -> str:
    """HEALTH_QUERY_FIELDS as the learning awk reads them: ``name=reading,...``, current names first."""
    return ",".join(f"{name}={names[0]}" for names in parse.HEALTH_QUERY_FIELDS for name in names)


def build_script(
    command_timeout: float,
    nvidia_smi: str = "nvidia-smi",
    token: str = "",
    probe: HostProbe | None = None,
) -> str:
    """The probe script for one host (``nvidia_smi`` may be a full path); ``token`` goes into
    every section marker (see :func:`new_token`). ``probe``: the host's :class:`HostProbe`, whose
    learned health fields are asked (or learned this poll) and whose known containers are not asked
    again; without one, no health field is asked and the default disks are shown."""
    settings = probe.settings if probe is not None else ProbeSettings()
    health = ""
    learn = "0"
    known = " "
    if probe is not None:
        fields = probe.health_fields
        health = ",".join(fields) if fields else ""
        learn = "1" if fields is None else "0"
        known = probe.known()
    disks = " ".join(shlex.quote(d) for d in settings.host_context.disks) or "/"
    script = _PRELUDE + "".join(step.shell for step in STEPS)
    return (
        script.replace("__HOST_AWK__", HOST_AWK)
        .replace("__HEALTH_AWK__", HEALTH_AWK)
        .replace("__IDS_AWK__", IDS_AWK)
        .replace("__STEP__", str(step_timeout(command_timeout)))
        .replace("__QUICK__", str(min(QUICK_SECONDS, step_timeout(command_timeout))))
        .replace("__SMI__", shlex.quote(nvidia_smi))
        .replace("__DISKS__", disks)
        .replace("__HEALTH__", shlex.quote(health) if health else "")
        .replace("__LEARN__", learn)
        .replace("__WANT__", shlex.quote(_want()))
        .replace("__KNOWN__", shlex.quote(known))
        .replace("__MAX_IDS__", str(attribution.MAX_INSPECT_IDS))
        .replace("__MAX_CRICTL__", str(MAX_CRICTL_IDS))
        .replace("__GPU_FIELDS__", ",".join(parse.GPU_QUERY_FIELDS))
        .replace("__APP_FIELDS__", ",".join(parse.APP_QUERY_FIELDS))
        .replace("__PS_FORMAT__", parse.PS_FORMAT)
        .replace("__ARGS_FORMAT__", parse.ARGS_FORMAT)
        .replace("__K__", _suffix(token))
    )


@dataclass(frozen=True)
class Section:
    text: str
    exit_status: int | None  # None: the step never reported (the probe was cut short)


@dataclass(frozen=True)
class _Read:
    sections: dict[str, Section]
    problems: tuple[str, ...]  # structure that the script never prints


def _read_sections(output: str, token: str) -> _Read | None:
    """Probe output -> its sections; None when the probe marker (with ``token``) is missing.

    Only whole lines equal to a marker with this poll's token count. A section whose end
    marker never came (the connection dropped, the output was cut) has ``exit_status=None``;
    when the output ended inside a line, that partial line is dropped. (After the last
    newline, ``split`` leaves "" or the partial line: either way not a line.)
    """
    suffix = _suffix(token)
    lines = [line.removesuffix("\r") for line in output.split("\n")]
    # Output cut inside a line: that line is partial (a marker's exit status may be cut to
    # another number), so it is no line at all.
    lines.pop()
    try:
        start = lines.index(PROBE_MARKER + suffix)
    except ValueError:
        return None
    begins = {f"@@begin {name}{suffix}": name for name in SECTIONS}
    end_re = re.compile(rf"@@end ({'|'.join(SECTIONS)}){re.escape(suffix)} ([0-9]{{1,3}})")
    sections: dict[str, Section] = {}
    problems: list[str] = []
    name: str | None = None
    skipping = False  # inside a section printed a second time
    outside = 0
    body: list[str] = []

    def close(status: int | None) -> None:
        assert name is not None
        if not skipping:
            sections[name] = Section("\n".join(body).strip("\n"), status)

    for line in lines[start + 1 :]:
        begin = begins.get(line)
        if begin is not None:
            if name is not None:
                close(None)
                problems.append(f"section {name} has no end marker")
            name, body = begin, []
            skipping = begin in sections
            if skipping:
                problems.append(f"section {begin} was printed twice")
            continue
        end = end_re.fullmatch(line) if name is not None else None
        if end is not None and end[1] == name:
            close(int(end[2]))
            name = None
        elif name is not None:
            body.append(line)
        elif line.strip():
            outside += 1  # the script prints nothing between its sections: a line lost its section
    if name is not None:
        close(None)
    if outside:
        problems.append(f"{outside} line{'s' if outside != 1 else ''} outside the sections")
    if not output.endswith("\n"):
        problems.append("it ends inside a line")  # the script's last byte is a newline
    return _Read(sections, tuple(problems))


def split_sections(output: str, token: str = "") -> dict[str, Section] | None:
    """Probe output -> {section name: Section}; None when the probe marker is missing."""
    read = _read_sections(output, token)
    return read.sections if read is not None else None


def _first_line(text: str) -> str:
    for line in text.split("\n"):
        if line.strip():
            return parse.excerpt(line)
    return "(no output)"


def snapshot_from_output(
    name: str,
    address: str,
    stdout: str,
    stderr: str = "",
    probe_seconds: float | None = None,
    command_timeout: float = 30.0,
    token: str = "",
    probe: HostProbe | None = None,
) -> HostSnapshot:
    """Everything one probe printed -> the host's snapshot (never raises).

    ``token`` is the one the script was built with (:func:`build_script`). ``probe``, the same
    :class:`HostProbe` the script was built with, learns from the output (health fields, CUDA
    version, containers, uids): the only state this function changes."""
    try:
        return _snapshot(name, address, stdout, stderr, probe_seconds, command_timeout, token, probe)
    except Exception as exc:  # a parser bug must cost this host's data, never the poll
        log.exception("could not read the probe output of %s", name)
        return HostSnapshot.failed(
            name,
            address,
            HostErrorKind.UNPARSEABLE,
            f"gpuwatch could not read this host's output ({type(exc).__name__}: {parse.excerpt(str(exc))}); "
            "this is a gpuwatch bug, please report it with the output of gpuwatch status --json",
            probe_seconds,
        )


def _cut_short(step: str, consequence: str, kind: HostErrorKind = HostErrorKind.PROBE_FAILED) -> HostIssue:
    return HostIssue(
        kind,
        f"the probe output ended while {step} was printing (the connection dropped or the output was cut "
        f"short); {consequence}",
    )


def _snapshot(
    name: str,
    address: str,
    stdout: str,
    stderr: str,
    probe_seconds: float | None,
    command_timeout: float,
    token: str,
    probe: HostProbe | None = None,
) -> HostSnapshot:
    read = _read_sections(stdout, token)
    if read is None or "gpu" not in read.sections:
        shown = _first_line(stdout) if stdout.strip() else _first_line(stderr)
        failed = HostSnapshot.failed(
            name, address, HostErrorKind.UNPARSEABLE, f"unexpected probe output: {shown!r}", probe_seconds
        )
        if read is not None:
            failed = dataclasses.replace(failed, context=_host_context(read.sections, probe, []))
        return failed
    sections = read.sections
    warnings: list[HostIssue] = []
    context = _host_context(sections, probe, warnings)

    def fail(kind: HostErrorKind, message: str) -> HostSnapshot:
        snap = HostSnapshot.failed(name, address, kind, message, probe_seconds)
        return dataclasses.replace(snap, context=context)

    gpu_sec = sections["gpu"]
    if gpu_sec.exit_status in TIMEOUT_EXITS:
        return fail(
            HostErrorKind.PROBE_TIMEOUT,
            f"nvidia-smi did not answer within {step_timeout(command_timeout)}s and was killed; "
            "the driver may be hung or a GPU may have fallen off the bus",
        )
    if gpu_sec.exit_status is None:
        # Some GPUs may be missing from a list cut short: no GPU data is better than a wrong count.
        return fail(
            HostErrorKind.PROBE_TIMEOUT,
            "the probe was cut short before nvidia-smi finished listing the GPUs "
            "(the connection dropped or the output was cut)",
        )
    gpus, issues = parse.parse_query_gpu(gpu_sec.text, required=parse.GPU_QUERY_FIELDS)
    failure = parse.query_gpu_failure(gpu_sec.text, gpu_sec.exit_status)
    if not gpus:
        issue = failure or (issues[0] if issues else None)
        if issue is None:
            issue = HostIssue(HostErrorKind.NO_DEVICES, "nvidia-smi listed no GPUs")
        return fail(issue.kind, issue.message)
    warnings += issues
    if failure is not None and failure not in warnings:
        warnings.append(failure)
    for structure in read.problems:
        warnings.append(
            HostIssue(HostErrorKind.PROBE_FAILED, f"the probe output is malformed ({structure}); processes unknown")
        )
    gpus = _with_health(gpus, sections, probe, warnings)
    version = _driver_version(gpus, warnings)
    if probe is not None and version is not None:
        if probe.driver_version is not None and version != probe.driver_version:
            probe.forget_learned()  # a new driver may know other fields, and another CUDA version
        probe.driver_version = version
    if context is not None:
        cuda = probe.cuda_version if probe is not None else None
        context = dataclasses.replace(context, driver_version=version, cuda_version=cuda)

    apps: list[ComputeApp] = []
    apps_sec = sections.get("apps")
    if apps_sec is None:
        warnings.append(HostIssue(HostErrorKind.PROBE_FAILED, "the process query did not run; processes unknown"))
    else:
        apps, app_issues = parse.parse_compute_apps(apps_sec.text, required=parse.APP_QUERY_FIELDS)
        warnings += app_issues
        if apps_sec.exit_status is None:
            warnings.append(_cut_short("nvidia-smi --query-compute-apps", "processes unknown"))
        elif apps_sec.exit_status != 0 and not apps:
            problem = parse.compute_apps_failure(apps_sec.text, apps_sec.exit_status)
            text = problem.message if problem else _first_line(apps_sec.text)
            warnings.append(HostIssue(HostErrorKind.PROBE_FAILED, f"process query failed: {text}"))

    ps_entries: dict[int, PsEntry] = {}
    ps_sec = sections.get("ps")
    if ps_sec is not None:
        ps_entries, ps_issues = parse.parse_ps(ps_sec.text)
        # ps exits 1 when some PIDs are gone: normal. Anything else means owners are unknown.
        if ps_sec.exit_status not in (0, 1, None) and not ps_entries:
            warnings.append(
                HostIssue(HostErrorKind.PROBE_FAILED, f"ps failed ({_first_line(ps_sec.text)}); owners unknown")
            )
        else:
            warnings += ps_issues
            if ps_sec.exit_status is None:
                warnings.append(_cut_short("ps", "owners unknown"))
    elif apps:
        warnings.append(HostIssue(HostErrorKind.PROBE_FAILED, "ps did not run; owners unknown"))

    commands = _commands(sections.get("args"), ps_entries, warnings)
    processes = _checked(parse.attribute(gpus, apps, ps_entries, commands), gpus, warnings)
    processes = _attributed(processes, sections, probe, warnings)
    return HostSnapshot(
        name=name,
        address=address,
        ok=True,
        probe_seconds=probe_seconds,
        gpus=tuple(sorted(gpus, key=lambda g: g.index)),
        processes=processes,
        warnings=_bounded(warnings),
        context=context,
    )


def _host_context(
    sections: dict[str, Section], probe: HostProbe | None, warnings: list[HostIssue]
) -> HostContext | None:
    """The ``host``, ``df`` and ``disks`` sections -> the host's context; None when the probe had
    no host step (an older probe). Everything here is context: a problem is an ``unparseable``
    warning, never a reason to doubt the GPUs or their processes."""
    host_sec = sections.get("host")
    if host_sec is None:
        return None
    settings = probe.settings if probe is not None else ProbeSettings()
    readings, issues = hostinfo.parse_host(host_sec.text)
    warnings += issues
    if host_sec.exit_status is None:
        warnings.append(_cut_short("the host readings", "some are unknown", HostErrorKind.UNPARSEABLE))
    context = readings.context()
    disks: tuple[Disk, ...] = ()
    known = False
    if readings.mount_with_newline:
        warnings.append(
            HostIssue(
                HostErrorKind.UNPARSEABLE,
                "a mount point on this host has a line break in its name (a user can name one), which an "
                "older df prints raw; the disks are not shown this poll",
            )
        )
    else:
        listed: list[Disk] = []
        df_sec = sections.get("df")
        if df_sec is not None:
            listed, df_issues = hostinfo.parse_df(df_sec.text)
            warnings += df_issues
            if df_sec.exit_status is None:
                warnings.append(_cut_short("df", "some disks are unknown", HostErrorKind.UNPARSEABLE))
            known = df_sec.exit_status is not None and (bool(listed) or df_sec.exit_status == 0)
        by_path: dict[str, Disk] = {}
        paths_sec = sections.get("disks")
        if paths_sec is not None:
            by_path, path_issues = hostinfo.parse_disk_paths(paths_sec.text)
            warnings += path_issues
            if paths_sec.exit_status is None:
                warnings.append(_cut_short("df", "some disks are unknown", HostErrorKind.UNPARSEABLE))
                known = False
        disks = hostinfo.pick_disks(listed, by_path, settings.host_context.disks, settings.host_context.full_percent)
    cuda = probe.cuda_version if probe is not None else None
    return dataclasses.replace(context, disks=disks, disks_known=known, cuda_version=cuda)


def _with_health(
    gpus: list[Gpu], sections: dict[str, Section], probe: HostProbe | None, warnings: list[HostIssue]
) -> list[Gpu]:
    """The GPUs with their health readings, and what the probe learned about the driver.

    Normally the health fields come in the GPU rows themselves; in the poll that learns them they
    come from the ``gpuhealth`` section, matched to the GPUs by index and UUID."""
    health_sec = sections.get("health")
    if health_sec is not None:
        foreign = [line for line in health_sec.text.split("\n") if line.strip() and not line.startswith("asked ")]
        foreign = [line for line in foreign if line != "refused"]
        if foreign or health_sec.exit_status is None:
            warnings.append(
                HostIssue(
                    HostErrorKind.UNPARSEABLE,
                    f"the probe's health step printed what it never prints: {_first_line(chr(10).join(foreign))}",
                )
            )
    if health_sec is not None and "refused" in health_sec.text.split("\n"):
        warnings.append(
            HostIssue(
                HostErrorKind.UNPARSEABLE,
                "nvidia-smi refused a GPU health field it had listed as supported; health is unknown this poll "
                "and the fields are learned again",
            )
        )
        if probe is not None:
            probe.forget_learned()
    learn_sec = sections.get("learn")
    if learn_sec is not None and probe is not None:
        if learn_sec.exit_status is None:
            warnings.append(_cut_short("the driver's field list", "learned next poll", HostErrorKind.UNPARSEABLE))
        else:
            lines = learn_sec.text.split("\n")
            listed = next((line[len("fields ") :] for line in lines if line.startswith("fields ")), "")
            with probe._lock:
                probe.health_fields = parse.health_fields_from(listed)
                probe.cuda_version = parse.parse_cuda_version(learn_sec.text)
    extra_sec = sections.get("gpuhealth")
    if extra_sec is not None:
        if extra_sec.exit_status is None:
            warnings.append(_cut_short("the GPU health query", "health unknown", HostErrorKind.UNPARSEABLE))
        extra, extra_issues = parse.parse_query_gpu(extra_sec.text)
        by_index = {g.index: g for g in extra if g.health is not None}
        merged = []
        for gpu in gpus:
            found = by_index.get(gpu.index)
            if found is not None and (found.uuid or "").lower() == (gpu.uuid or "").lower():
                gpu = dataclasses.replace(gpu, health=found.health)
            merged.append(gpu)
        gpus = merged
        warnings += [i for i in extra_issues if i.kind is HostErrorKind.UNPARSEABLE]
    return gpus


def _driver_version(gpus: Sequence[Gpu], warnings: list[HostIssue]) -> str | None:
    """The driver version the GPUs report (all the same on one host); a change makes the probe
    learn the driver's fields again."""
    versions = {g.health.driver_version for g in gpus if g.health is not None and g.health.driver_version}
    if len(versions) > 1:
        warnings.append(
            HostIssue(
                HostErrorKind.UNPARSEABLE, f"the GPUs report different driver versions: {', '.join(sorted(versions))}"
            )
        )
        return None
    return next(iter(versions), None)


def _attributed(
    processes: tuple[GpuProcess, ...],
    sections: dict[str, Section],
    probe: HostProbe | None,
    warnings: list[HostIssue],
) -> tuple[GpuProcess, ...]:
    """The processes with their containers, Slurm jobs and owners (``attribution``)."""
    if "host" not in sections:
        return processes  # an older probe: no cgroup step, owners as ps saw them
    cgroup_sec = sections.get("cgroup")
    if cgroup_sec is None or cgroup_sec.exit_status is None:
        if processes:
            warnings.append(
                _cut_short("the cgroups", "who is behind each process is unknown")
                if cgroup_sec is not None
                else HostIssue(
                    HostErrorKind.PROBE_FAILED, "the cgroup step did not run; who is behind each process is unknown"
                )
            )
        return processes
    settings = probe.settings if probe is not None else ProbeSettings()
    cgroups, issues = attribution.parse_cgroups(cgroup_sec.text)
    warnings += issues
    users: dict[int, str] = dict(probe.users) if probe is not None else {}
    passwd_sec = sections.get("passwd")
    if passwd_sec is not None:
        found, passwd_issues = attribution.parse_passwd(passwd_sec.text)
        warnings += passwd_issues
        users.update(found)
    inspected: dict[str, ContainerInfo | None] = dict(probe.containers) if probe is not None else {}
    answered: set[str] = set()  # the runtimes asked to completion this poll
    for runtime, reader in (("docker", attribution.parse_docker_inspect), ("crictl", attribution.parse_crictl_inspect)):
        sec = sections.get(runtime)
        if sec is None:
            continue
        info, inspect_issues = reader(sec.text)
        warnings += inspect_issues
        if sec.exit_status is None:
            warnings.append(
                _cut_short(f"{runtime} inspect", "some containers are shown by id", HostErrorKind.UNPARSEABLE)
            )
        else:
            answered.add(runtime)
        inspected.update(info)
    result, attribution_issues = attribution.attribute_owners(
        processes, cgroups, users, inspected, settings.attribution
    )
    warnings += attribution_issues
    if probe is not None:
        seen = {p.container.id: p.container.runtime for p in result if p.container is not None}
        with probe._lock:
            kept: dict[str, ContainerInfo | None] = {}
            for ident, runtime in seen.items():
                if ident in inspected:
                    kept[ident] = inspected[ident]
                elif _asked(runtime) & answered:
                    kept[ident] = None  # the runtime does not know it: not asked again
            probe.containers = kept
            probe.users.update(users)
    return result


def _asked(runtime: str) -> set[str]:
    """Which inspect sections a container of this runtime is asked of."""
    if runtime == "docker":
        return {"docker"}
    if runtime in ("containerd", "cri-o"):
        return {"crictl"}
    if runtime == "kubernetes":
        return {"docker", "crictl"}
    return set()


def _commands(args_sec: Section | None, entries: dict[int, PsEntry], warnings: list[HostIssue]) -> dict[int, str]:
    """Command lines: from the ``args`` listing, or (older probes) from the owners listing."""
    if args_sec is None:
        commands = {pid: entry.command for pid, entry in entries.items() if entry.command}
        if entries and not commands:
            warnings.append(HostIssue(HostErrorKind.UNPARSEABLE, "the command lines were not listed; unknown"))
        return commands
    commands, issues = parse.parse_ps_args(args_sec.text)
    warnings += issues
    if args_sec.exit_status is None:
        cut = _cut_short("ps", "some command lines unknown")
        warnings.append(HostIssue(HostErrorKind.UNPARSEABLE, cut.message))
    return commands


def _checked(processes: tuple[GpuProcess, ...], gpus: list[Gpu], warnings: list[HostIssue]) -> tuple[GpuProcess, ...]:
    """A process cannot hold more memory than its GPU has: such a reading is unknown."""
    totals = {g.index: g.memory_total_mib for g in gpus}
    checked: list[GpuProcess] = []
    for process in processes:
        total = totals.get(process.gpu_index) if process.gpu_index is not None else None
        if process.used_memory_mib is not None and total is not None and process.used_memory_mib > total:
            warnings.append(
                HostIssue(
                    HostErrorKind.UNPARSEABLE,
                    f"process {process.pid}: used_gpu_memory {process.used_memory_mib} MiB is more than its GPU "
                    f"{process.gpu_index}'s memory.total {total} MiB; taken as unknown",
                )
            )
            process = dataclasses.replace(process, used_memory_mib=None)
        checked.append(process)
    return tuple(checked)


def _bounded(warnings: list[HostIssue]) -> tuple[HostIssue, ...]:
    """At most MAX_WARNINGS distinct warnings; the rest become one count per kind, so the
    kinds the rules read (gpu_lost, probe_failed, ...) all survive."""
    unique = list(dict.fromkeys(warnings))
    if len(unique) <= MAX_WARNINGS:
        return tuple(unique)
    kept = unique[: MAX_WARNINGS - 1]
    rest: dict[HostErrorKind, int] = {}
    for warning in unique[MAX_WARNINGS - 1 :]:
        rest[warning.kind] = rest.get(warning.kind, 0) + 1
    for kind, count in rest.items():
        kept.append(HostIssue(kind, f"... and {count} more {kind.value} warning{'s' if count != 1 else ''}"))
    return tuple(kept)
