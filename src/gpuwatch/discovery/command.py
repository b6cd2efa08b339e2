"""``command: "sinfo -N -h -o %N"``: a command that prints host names, on this machine or on a ``via:`` host.

The command is a shell command line, as in a crontab: it runs with ``sh -s`` (the text is fed on
stdin, never pasted into another command line), through the same runners as the probe: locally by
:class:`~gpuwatch.ssh.LocalRunner`, on the ``via:`` host over its persistent SSH connection. Only the
config's own text is ever run; nothing a source returns reaches a shell. It gets the source's
``timeout``, after which everything it started is killed (its own session), and the same output caps
as a probe. Its output is read by :func:`~.hostlist.names_from_text` (Slurm host lists expanded); an
exit status other than 0 is a failure that quotes the first line of stderr.
"""

from __future__ import annotations

import threading

from ..config import DiscoverySource
from ..ssh import HostFailure, Runner
from ..text import quote
from .base import DiscoveredHost, DiscoveryError, wait_refresh
from .hostlist import HostListError, names_from_text


class CommandSource:
    """The ``command`` source, run by ``runner`` (local, or the ``via:`` host's connection)."""

    def __init__(self, spec: DiscoverySource, runner: Runner) -> None:
        self.spec = spec
        self.runner = runner
        self.where = f"on {spec.via}" if spec.via else "here"

    def fetch(self) -> tuple[DiscoveredHost, ...]:
        command = self.spec.command or ""
        try:
            result = self.runner.run_script(command + "\n", self.spec.timeout)
        except HostFailure as failure:
            raise DiscoveryError(f"run {self.where}: {failure.message}") from None
        if result.exit_status != 0:
            first = (result.stderr.strip().splitlines() or [""])[0]
            said = f": {quote(first)}" if first else ""
            raise DiscoveryError(f"run {self.where}, it exited with status {result.exit_status}{said}")
        try:
            return tuple(DiscoveredHost(name) for name in names_from_text(result.stdout))
        except HostListError as exc:
            raise DiscoveryError(f"run {self.where}, it printed {exc}") from None

    def wait(self, stop: threading.Event, ok: bool) -> None:
        wait_refresh(self.spec, stop, ok)

    def close(self) -> None:
        self.runner.close()
