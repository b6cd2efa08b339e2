"""The one remote command per poll, and the turn of its output into a HostSnapshot.

A single ``sh -s`` exec runs a small POSIX script made of steps (:data:`STEPS`), each a module
holding its shell snippet (printing its sections) and the reader of those sections:

- ``host`` (:mod:`.host`): load, memory, uptime, boot time, kernel, CPU count (one ``awk`` over
  /proc); ``df`` and ``disks``: every local filesystem and the configured paths (``df -P -k -T``);
- ``gpu`` (:mod:`.gpu`): ``nvidia-smi --query-gpu`` with the health fields the host supports;
  ``health`` says which were asked; once per host (and after a driver change) ``learn`` reads them
  from ``--help-query-gpu`` and the CUDA version from ``--version``, and ``gpuhealth`` asks them;
- ``apps`` (:mod:`.apps`): ``nvidia-smi --query-compute-apps``;
- ``ps``, ``uids`` and ``args`` (:mod:`.ps`): owners (with their uids, named by ``getent``) and
  command lines, joined to the apps and GPUs;
- ``cgroup`` (:mod:`.cgroup`): each GPU process's /proc/PID/cgroup; ``passwd``, ``docker``,
  ``crictl``: the uids and containers those name (``getent``, ``docker inspect``, ``crictl
  inspect`` where the login user may run them).

Each step is bounded on the host by ``timeout`` (in time) and by ``grab`` (:mod:`.overflow`: in
memory, no captured output past the client's cap; one that would be ends the probe with an
``overflow`` section) and reports its own exit status between section markers that carry a
per-poll token::

    @@gpuwatch-probe 1 <token>
    @@begin gpu <token>
    <nvidia-smi output, stderr merged>
    @@end gpu <token> <exit status>
    ...

A marker only counts with the token of this poll (:mod:`.output`).

A :class:`HostProbe` is one host's probe across polls: its settings (the disks to show, how owners
are found) and what its probes learned (the health fields the driver supports, the CUDA version,
the containers and uids already looked up), so that the next poll asks only what is new.

Whatever a host prints, :func:`snapshot_from_output` gives that host's snapshot and never
raises (:mod:`.snapshot`: a loop over the steps' readers). A new step is a module ending in its
``STEP`` and one line in :data:`STEPS` (:mod:`.script`).
"""

from __future__ import annotations

from .cgroup import IDS_AWK, MAX_CRICTL_IDS
from .gpu import HEALTH_AWK, wanted_health_fields
from .host import HOST_AWK
from .output import PROBE_MARKER, ProbeOutput, new_token, read_output
from .script import SECTIONS, STEPS, build_script
from .snapshot import MAX_WARNINGS, assemble_snapshot, snapshot_from_output, split_sections
from .state import HostProbe, ProbeSettings
from .step import QUICK_SECONDS, TIMEOUT_EXITS, Draft, Step, StepOutput, step_timeout

__all__ = [
    "HEALTH_AWK",
    "HOST_AWK",
    "IDS_AWK",
    "MAX_CRICTL_IDS",
    "MAX_WARNINGS",
    "PROBE_MARKER",
    "QUICK_SECONDS",
    "SECTIONS",
    "STEPS",
    "TIMEOUT_EXITS",
    "Draft",
    "HostProbe",
    "ProbeOutput",
    "ProbeSettings",
    "Step",
    "StepOutput",
    "assemble_snapshot",
    "build_script",
    "new_token",
    "read_output",
    "snapshot_from_output",
    "split_sections",
    "step_timeout",
    "wanted_health_fields",
]
