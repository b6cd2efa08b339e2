"""What every probe step is made of: its shell snippet, the placeholders it fills, and its reader.

A step's reader reads its sections of one probe output into a :class:`Draft`, the snapshot being
assembled; the steps run in order, and the first failure (only the GPU step sets one) ends the
assembly. Also the small things the steps share: how a cut-short section and an odd first line are
said.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from gpuwatch import parse
from gpuwatch.model import ComputeApp, Gpu, GpuProcess, HostContext, HostErrorKind, HostIssue

from .state import HostProbe, ProbeSettings

TIMEOUT_EXITS = (124, 137)
"""Exit statuses of a step killed by ``timeout`` (124; 137 after its ``-k`` KILL)."""
MAX_CAPTURE_BYTES = 4 * 1024 * 1024
"""The most of one command's output the probe's shell holds on the host (``grab`` in the script's
prelude): the client's own cap on the whole output (``gpuwatch.ssh.MAX_STDOUT_BYTES``), so a
command that prints more would fail the poll anyway. Past it the probe stops and says so in its
``overflow`` section."""
QUICK_SECONDS = 3
"""Bound of the steps that only read the host (df, docker/crictl inspect, getent): a hung NFS
mount or a stuck container runtime costs this, never the poll."""


def step_timeout(command_timeout: float) -> int:
    """Each step gets 40% of the command budget, so a hung first step still leaves time to report."""
    return max(1, int(command_timeout * 0.4))


@dataclass(frozen=True)
class StepOutput:
    """One section of a probe output: what the step printed there, and how it exited."""

    text: str
    exit_status: int | None  # None: the step never reported (the probe was cut short)


@dataclass
class Draft:
    """A host's snapshot while the steps read their sections into it.

    ``probe`` (the host's :class:`HostProbe`, or ``None``) is where the steps keep what they learn.
    ``failure`` is set by the GPU step when the host's GPUs are not known: the snapshot is then a
    failure carrying only the host's context.
    """

    sections: Mapping[str, StepOutput]
    problems: tuple[str, ...]  # structure the script never prints (lines outside sections, ...)
    probe: HostProbe | None
    command_timeout: float
    stdout: str  # the whole output, shown (its first line) when it holds no GPU section
    stderr: str
    warnings: list[HostIssue] = field(default_factory=list)
    context: HostContext | None = None
    failure: HostIssue | None = None
    gpus: list[Gpu] = field(default_factory=list)
    apps: list[ComputeApp] = field(default_factory=list)
    processes: tuple[GpuProcess, ...] = ()

    @property
    def settings(self) -> ProbeSettings:
        return self.probe.settings if self.probe is not None else ProbeSettings()

    def unexpected(self) -> str:
        """The output's first line (stderr's when stdout is blank), for "unexpected probe output"."""
        return first_line(self.stdout) if self.stdout.strip() else first_line(self.stderr)

    def fail(self, kind: HostErrorKind, message: str) -> None:
        self.failure = HostIssue(kind, message)


@dataclass(frozen=True)
class Step:
    """One step of the probe: its shell snippet (``__NAME__`` placeholders, plus ``__K__`` for the
    marker token), the sections it prints, the placeholder values for one host's script, and the
    reader of its sections."""

    name: str
    shell: str
    sections: tuple[str, ...]
    fill: Callable[[HostProbe | None], Mapping[str, str]]
    read: Callable[[Draft], None]


def cut_short(step: str, consequence: str, kind: HostErrorKind = HostErrorKind.PROBE_FAILED) -> HostIssue:
    """The warning for a section whose end marker never came."""
    return HostIssue(
        kind,
        f"the probe output ended while {step} was printing (the connection dropped or the output was cut "
        f"short); {consequence}",
    )


def first_line(text: str) -> str:
    """The first non-blank line of ``text``, as an excerpt for a message."""
    for line in text.split("\n"):
        if line.strip():
            return parse.excerpt(line)
    return "(no output)"
