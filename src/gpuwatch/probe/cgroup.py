"""The cgroup step: each GPU process's /proc/PID/cgroup; ``passwd``, ``docker``, ``crictl``: the
uids and containers those name (``getent``, ``docker inspect``, ``crictl inspect`` where the login
user may run them). Read by :mod:`gpuwatch.attribution` into each process's container, Slurm job
and owner."""

from __future__ import annotations

import shlex
from collections.abc import Mapping

from gpuwatch import attribution
from gpuwatch.attribution import ContainerInfo
from gpuwatch.model import GpuProcess, HostErrorKind, HostIssue

from .state import HostProbe
from .step import Draft, Step, cut_short

MAX_CRICTL_IDS = 8  # crictl stops at the first unknown id, so it is asked one id at a time

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
  CG=$( (
    oifs=$IFS; IFS=,; set -f; set -- $pids; set +f; IFS=$oifs
    files=
    for p in "$@"; do
      if [ ! -d "/proc/$p" ]; then printf 'gone %s\n' "$p"
      elif [ -r "/proc/$p/cgroup" ]; then files="$files /proc/$p/cgroup"
      else printf 'unreadable %s\n' "$p"; fi
    done
    if [ -n "$files" ]; then quick awk '{ split(FILENAME, a, "/"); print "cg", a[3], $0 }' $files 2>/dev/null; fi
  ) | head -c $((C + 1)))
  if [ "${#CG}" -gt "$C" ]; then got=$CG; CG=; took "the cgroup listing"; fi
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


def _fill(probe: HostProbe | None) -> Mapping[str, str]:
    known = probe.known() if probe is not None else " "
    return {
        "__KNOWN__": shlex.quote(known),
        "__MAX_IDS__": str(attribution.MAX_INSPECT_IDS),
        "__IDS_AWK__": IDS_AWK,
        "__MAX_CRICTL__": str(MAX_CRICTL_IDS),
    }


def _read(draft: Draft) -> None:
    """The processes with their containers, Slurm jobs and owners (``attribution``)."""
    processes, sections, warnings = draft.processes, draft.sections, draft.warnings
    if "host" not in sections:
        return  # an older probe: no cgroup step, owners as ps saw them
    cgroup_sec = sections.get("cgroup")
    if cgroup_sec is None or cgroup_sec.exit_status is None:
        if processes:
            warnings.append(
                cut_short("the cgroups", "who is behind each process is unknown")
                if cgroup_sec is not None
                else HostIssue(
                    HostErrorKind.PROBE_FAILED, "the cgroup step did not run; who is behind each process is unknown"
                )
            )
        return
    cgroups, issues = attribution.parse_cgroups(cgroup_sec.text)
    warnings += issues
    probe = draft.probe
    users: dict[int, str] = dict(probe.users) if probe is not None else {}
    passwd_sec = sections.get("passwd")
    if passwd_sec is not None:
        found, passwd_issues = attribution.parse_passwd(passwd_sec.text)
        warnings += passwd_issues
        users.update(found)
    inspected, answered = _inspected(draft)
    result, attribution_issues = attribution.attribute_owners(
        processes, cgroups, users, inspected, draft.settings.attribution
    )
    warnings += attribution_issues
    if probe is not None:
        probe.remember(_still_seen(result, inspected, answered), users)
    draft.processes = result


def _inspected(draft: Draft) -> tuple[dict[str, ContainerInfo | None], set[str]]:
    """The containers known (from earlier polls and this one's inspect sections), and the runtimes
    asked to completion this poll."""
    inspected: dict[str, ContainerInfo | None] = dict(draft.probe.containers) if draft.probe is not None else {}
    answered: set[str] = set()
    for runtime, reader in (("docker", attribution.parse_docker_inspect), ("crictl", attribution.parse_crictl_inspect)):
        sec = draft.sections.get(runtime)
        if sec is None:
            continue
        info, inspect_issues = reader(sec.text)
        draft.warnings += inspect_issues
        if sec.exit_status is None:
            draft.warnings.append(
                cut_short(f"{runtime} inspect", "some containers are shown by id", HostErrorKind.UNPARSEABLE)
            )
        else:
            answered.add(runtime)
        inspected.update(info)
    return inspected, answered


def _still_seen(
    processes: tuple[GpuProcess, ...], inspected: dict[str, ContainerInfo | None], answered: set[str]
) -> dict[str, ContainerInfo | None]:
    """The containers to remember: those still seen, with what their runtime said (``None``: the
    runtime does not know it, so it is not asked again)."""
    seen = {p.container.id: p.container.runtime for p in processes if p.container is not None}
    kept: dict[str, ContainerInfo | None] = {}
    for ident, runtime in seen.items():
        if ident in inspected:
            kept[ident] = inspected[ident]
        elif _asked(runtime) & answered:
            kept[ident] = None
    return kept


def _asked(runtime: str) -> set[str]:
    """Which inspect sections a container of this runtime is asked of."""
    if runtime == "docker":
        return {"docker"}
    if runtime in ("containerd", "cri-o"):
        return {"crictl"}
    if runtime == "kubernetes":
        return {"docker", "crictl"}
    return set()


STEP = Step("cgroup", _CGROUP, ("cgroup", "passwd", "docker", "crictl"), _fill, _read)
