"""The probe's steps in the order they run, and the one script they make for a host.

The script is ``sh -s``'s stdin: a prelude (the locale, the PATH, the ``run``/``quick`` bounds and
the probe marker) and each step's shell snippet, with every ``__NAME__`` placeholder filled in one
pass (a value is never read again for placeholders, whatever a configured path holds).
"""

from __future__ import annotations

import functools
import re
import shlex
from collections.abc import Sequence

from . import apps, cgroup, gpu, host, overflow, ps
from .output import token_suffix
from .state import HostProbe
from .step import QUICK_SECONDS, Step, step_timeout

STEPS: tuple[Step, ...] = (host.STEP, overflow.STEP, gpu.STEP, apps.STEP, ps.STEP, cgroup.STEP)
"""The probe's steps in the order they run; a new source is a new step module and a line here."""
SECTIONS = tuple(name for step in STEPS for name in step.sections)

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

_PLACEHOLDER_RE = re.compile(r"(__[A-Z_]+__)")


@functools.lru_cache(maxsize=8)
def _template(steps: tuple[Step, ...]) -> tuple[str, ...]:
    """The script of these steps split at its placeholders: text, placeholder, text, ... (the
    placeholders at the odd positions); the same for every host, so split once."""
    return tuple(_PLACEHOLDER_RE.split(_PRELUDE + "".join(step.shell for step in steps)))


def build_script(
    command_timeout: float,
    nvidia_smi: str = "nvidia-smi",
    token: str = "",
    probe: HostProbe | None = None,
    steps: Sequence[Step] = STEPS,
) -> str:
    """The probe script for one host (``nvidia_smi`` may be a full path); ``token`` goes into
    every section marker (see :func:`~gpuwatch.probe.output.new_token`). ``probe``: the host's
    :class:`HostProbe`, whose learned health fields are asked (or learned this poll) and whose known
    containers are not asked again; without one, no health field is asked and the default disks are
    shown. ``steps``: :data:`STEPS` (another list only in tests)."""
    values = {
        "__STEP__": str(step_timeout(command_timeout)),
        "__QUICK__": str(min(QUICK_SECONDS, step_timeout(command_timeout))),
        "__SMI__": shlex.quote(nvidia_smi),
        "__K__": token_suffix(token),
    }
    for step in steps:
        values.update(step.fill(probe))
    parts = list(_template(tuple(steps)))
    parts[1::2] = [values[name] for name in parts[1::2]]
    return "".join(parts)
