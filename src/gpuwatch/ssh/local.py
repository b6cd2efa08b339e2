"""The local runner (the ``localhost`` host): the probe in a new session on this machine, with the
same bounds as over SSH, and the helpers that end that session."""

from __future__ import annotations

import contextlib
import os
import select
import selectors
import signal
import subprocess
import time

from gpuwatch.model import HostErrorKind

from .output import CHUNK_BYTES, BoundedOutput
from .runner import CommandResult, HostFailure


def _exited(proc: subprocess.Popen[bytes]) -> bool:
    """Whether ``proc`` has exited, without reaping it: while it is a zombie its pid (the session
    id of everything it started) cannot be reused, so ending that session is safe."""
    if proc.returncode is not None:
        return True
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


def _session_members(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid``, from /proc."""
    members: list[int] = []
    try:
        entries = list(os.scandir("/proc"))
    except OSError:
        return members
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            with open(os.path.join(entry.path, "stat"), "rb") as fh:
                stat = fh.read()
            # after "pid (comm) ": state ppid pgrp session ... (comm may hold spaces and parentheses)
            fields = stat.rsplit(b")", 1)[1].split()
            if int(fields[3]) == sid and fields[0] not in (b"Z", b"X"):
                members.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return members


def _end_session(sid: int) -> None:
    """SIGKILL every process of session ``sid``, whatever its process group, pass after pass while
    some are found (one may have been forking during the previous pass); where there is no /proc,
    the process group ``sid``."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(sid, signal.SIGKILL)
    for _ in range(5):
        members = _session_members(sid)
        if not members:
            return
        for pid in members:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


class LocalRunner:
    """Runs the probe on this machine, for the ``localhost`` host.

    Same bounds as over SSH: the probe runs in a new session, which is ended (SIGKILL to every
    process in it) when the probe exits or at the deadline; output past the caps ends the run.
    """

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.env = env

    def run_script(self, script: str, timeout: float) -> CommandResult:
        started = time.monotonic()
        deadline = started + max(timeout, 0.1)
        try:
            proc = subprocess.Popen(
                ["sh", "-s"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self.env,
                start_new_session=True,
            )
        except OSError as exc:
            raise HostFailure(HostErrorKind.PROBE_FAILED, f"cannot run sh locally: {exc}") from None
        output = BoundedOutput()
        try:
            _read_process(proc, script.encode(), output, deadline)
        except TimeoutError:
            raise HostFailure(
                HostErrorKind.PROBE_TIMEOUT, f"the local probe did not finish within {timeout:g}s"
            ) from None
        finally:
            _end_session(proc.pid)
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)  # after SIGKILL: only a process stuck in the kernel takes longer
        return output.result(proc.returncode, time.monotonic() - started)

    def close(self) -> None:
        pass


def _read_process(proc: subprocess.Popen[bytes], script: bytes, output: BoundedOutput, deadline: float) -> None:
    """Feed ``script`` to ``proc`` and read its stdout and stderr until both end, within
    ``deadline`` and the caps; once ``proc`` exits, what it left behind is ended so that a child
    holding the output open does not hold the run."""
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    pending = memoryview(script)
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ, False)
        selector.register(proc.stderr, selectors.EVENT_READ, True)
        if pending:
            selector.register(proc.stdin, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        exited = False
        while any(key.events & selectors.EVENT_READ for key in selector.get_map().values()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError()
            if not exited and _exited(proc):
                exited = True
                _end_session(proc.pid)
            # while it runs, look again now and then: it may exit while a child holds the output
            for key, _ in selector.select(remaining if exited else min(remaining, 0.1)):
                if key.fileobj is proc.stdin:
                    try:
                        written = os.write(proc.stdin.fileno(), pending[: select.PIPE_BUF])
                    except BrokenPipeError:
                        written = len(pending)
                    pending = pending[written:]
                    if not pending:
                        selector.unregister(proc.stdin)
                        proc.stdin.close()
                    continue
                data = os.read(key.fd, CHUNK_BYTES)
                if not data:
                    selector.unregister(key.fileobj)
                    continue
                output.add(data, stderr=key.data)
