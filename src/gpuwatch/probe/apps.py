"""The apps step: ``nvidia-smi --query-compute-apps``; the pids it lists are what the ps and
cgroup steps ask about."""

from __future__ import annotations

from collections.abc import Mapping

from gpuwatch import parse
from gpuwatch.model import ComputeApp, HostErrorKind, HostIssue

from .state import HostProbe
from .step import Draft, Step, cut_short, first_line

_APPS = r"""got=$(grab run "$SMI" --query-compute-apps=__APP_FIELDS__ --format=csv)
took "nvidia-smi --query-compute-apps"
echo "@@begin apps__K__"
printf '%s\n' "$out"
printf '\n@@end apps__K__ %s\n' "$rc"
# Each pid once: a process on several GPUs has a row per GPU, and its cgroup file read once per
# row would look longer than any real one.
pids=$(printf '%s\n' "$out" | awk -F', ' 'NR > 1 && $1 ~ /^[0-9]+$/ && !seen[$1]++ { printf "%s%s", s, $1; s = "," }')
out=
"""


def _fill(probe: HostProbe | None) -> Mapping[str, str]:
    return {"__APP_FIELDS__": ",".join(parse.APP_QUERY_FIELDS)}


def _read(draft: Draft) -> None:
    """The compute processes; a missing, failed or cut-short query is a warning (processes unknown)."""
    apps: list[ComputeApp] = []
    apps_sec = draft.sections.get("apps")
    if apps_sec is None:
        draft.warnings.append(HostIssue(HostErrorKind.PROBE_FAILED, "the process query did not run; processes unknown"))
        return
    apps, app_issues = parse.parse_compute_apps(apps_sec.text, required=parse.APP_QUERY_FIELDS)
    draft.warnings += app_issues
    if apps_sec.exit_status is None:
        draft.warnings.append(cut_short("nvidia-smi --query-compute-apps", "processes unknown"))
    elif apps_sec.exit_status != 0 and not apps:
        problem = parse.compute_apps_failure(apps_sec.text, apps_sec.exit_status)
        text = problem.message if problem else first_line(apps_sec.text)
        draft.warnings.append(HostIssue(HostErrorKind.PROBE_FAILED, f"process query failed: {text}"))
    draft.apps = apps


STEP = Step("apps", _APPS, ("apps",), _fill, _read)
