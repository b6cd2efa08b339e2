"""The seam between polling and the hosts: a :class:`Runner` runs the probe script on one host and
gives a :class:`CommandResult`, or raises :class:`HostFailure` with a classified kind."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from gpuwatch.model import HostErrorKind


class HostFailure(Exception):
    """A host could not be polled; ``kind`` says why, the message says it to a person."""

    def __init__(self, kind: HostErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class CommandResult:
    exit_status: int | None
    stdout: str
    stderr: str
    seconds: float


class Runner(Protocol):
    """Runs the probe script on one host (over SSH, or locally)."""

    def run_script(self, script: str, timeout: float) -> CommandResult: ...

    def close(self) -> None: ...
