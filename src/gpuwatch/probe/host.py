"""The host step: load, memory, uptime, boot time, kernel, CPU count (one ``awk`` over /proc);
``df`` and ``disks``: every local filesystem and the configured paths (``df -P -k -T``). Read by
:mod:`gpuwatch.hostinfo` into the host's context."""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Mapping

from gpuwatch import hostinfo
from gpuwatch.model import Disk, HostErrorKind, HostIssue

from .state import HostProbe, ProbeSettings
from .step import Draft, Step, cut_short

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


def _fill(probe: HostProbe | None) -> Mapping[str, str]:
    settings = probe.settings if probe is not None else ProbeSettings()
    disks = " ".join(shlex.quote(d) for d in settings.host_context.disks) or "/"
    return {"__HOST_AWK__": HOST_AWK, "__DISKS__": disks}


def _read(draft: Draft) -> None:
    """The ``host``, ``df`` and ``disks`` sections -> the host's context; none when the probe had
    no host step (an older probe). Everything here is context: a problem is an ``unparseable``
    warning, never a reason to doubt the GPUs or their processes."""
    host_sec = draft.sections.get("host")
    if host_sec is None:
        return
    settings, warnings = draft.settings, draft.warnings
    readings, issues = hostinfo.parse_host(host_sec.text)
    warnings += issues
    if host_sec.exit_status is None:
        warnings.append(cut_short("the host readings", "some are unknown", HostErrorKind.UNPARSEABLE))
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
        df_sec = draft.sections.get("df")
        if df_sec is not None:
            listed, df_issues = hostinfo.parse_df(df_sec.text)
            warnings += df_issues
            if df_sec.exit_status is None:
                warnings.append(cut_short("df", "some disks are unknown", HostErrorKind.UNPARSEABLE))
            known = df_sec.exit_status is not None and (bool(listed) or df_sec.exit_status == 0)
        by_path: dict[str, Disk] = {}
        paths_sec = draft.sections.get("disks")
        if paths_sec is not None:
            by_path, path_issues = hostinfo.parse_disk_paths(paths_sec.text)
            warnings += path_issues
            if paths_sec.exit_status is None:
                warnings.append(cut_short("df", "some disks are unknown", HostErrorKind.UNPARSEABLE))
                known = False
        disks = hostinfo.pick_disks(listed, by_path, settings.host_context.disks, settings.host_context.full_percent)
    cuda = draft.probe.cuda_version if draft.probe is not None else None
    draft.context = dataclasses.replace(context, disks=disks, disks_known=known, cuda_version=cuda)


STEP = Step("host", _HOST, ("host", "df", "disks"), _fill, _read)
