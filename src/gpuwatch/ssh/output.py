"""Bounded output reading: what one probe may print before gpuwatch stops reading and ends it."""

from __future__ import annotations

import math
import select
import time

import paramiko

from gpuwatch.model import HostErrorKind

from .runner import CommandResult, HostFailure

# What one probe may print before gpuwatch stops reading and ends it. A real probe prints a few
# hundred bytes per GPU and one line per GPU process; 4 MiB is far beyond any real host, and far
# below what a host that streams output (a login script running `yes`) would otherwise cost the
# daemon (1.66 GB in 2 s, measured). paramiko holds at most one channel window
# (PROBE_WINDOW_BYTES) on top of it. stderr carries only the shell's own complaints (the probe
# merges nvidia-smi's into stdout), hence the smaller cap.
MAX_STDOUT_BYTES = 4 * 1024 * 1024
MAX_STDERR_BYTES = 64 * 1024
PROBE_WINDOW_BYTES = 1024 * 1024
CHUNK_BYTES = 65536


def _size(n: int) -> str:
    return f"{n // (1024 * 1024)} MiB" if n % (1024 * 1024) == 0 else f"{n // 1024} KiB"


class BoundedOutput:
    """stdout and stderr of one run, each capped; going past a cap raises HostFailure."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.err = bytearray()

    def add(self, data: bytes, stderr: bool = False) -> None:
        buf, cap, stream = (self.err, MAX_STDERR_BYTES, "stderr") if stderr else (self.out, MAX_STDOUT_BYTES, "stdout")
        buf += data
        if len(buf) > cap:
            first = bytes(buf[:200]).split(b"\n", 1)[0][:80].decode("utf-8", "replace")
            raise HostFailure(
                HostErrorKind.UNPARSEABLE,
                f"the probe printed more than {_size(cap)} on {stream} (it begins {first!r}); gpuwatch stopped "
                "reading and ended it. Something on the host writes endless output: check the login "
                "user's shell startup files (~/.bashrc) and the nvidia-smi on its PATH",
            )

    def result(self, exit_status: int | None, seconds: float) -> CommandResult:
        return CommandResult(
            exit_status=exit_status,
            stdout=self.out.decode("utf-8", "replace"),
            stderr=self.err.decode("utf-8", "replace"),
            seconds=seconds,
        )


def read_channel(chan: paramiko.Channel, output: BoundedOutput, deadline: float) -> None:
    """Read stdout and stderr together (a full stderr must not stall stdout) until the end of
    both, within ``deadline`` and the output caps."""
    # chan.fileno(): a pipe readable while either stream has data, and for ever after EOF or close.
    # poll(), not select(): select() refuses descriptors above 1023, which 1,000 hosts reach.
    ready = select.poll()
    ready.register(chan.fileno(), select.POLLIN)
    while True:
        finished = chan.eof_received or chan.closed  # looked at first: nothing arrives after it
        while chan.recv_ready():
            output.add(chan.recv(CHUNK_BYTES))
        while chan.recv_stderr_ready():
            output.add(chan.recv_stderr(CHUNK_BYTES), stderr=True)
        if finished:
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError()
        ready.poll(math.ceil(remaining * 1000))
