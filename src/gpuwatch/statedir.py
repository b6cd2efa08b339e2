"""The state directory: private to its user, used by one sending process at a time, and its
errors said in one line.

``state_dir`` holds the outbox and alert state (SQLite), the log and gpuwatch's own
known_hosts: messages about the fleet, user names, host keys. It is created 0700 and every
file gpuwatch creates in it 0600, whatever the umask (an existing directory keeps its mode;
gpuwatch's files in it are made 0600 when opened).

Two processes that send from one state directory would each deliver the same outbox rows and
each announce every alert, so the daemon and ``--once`` hold an exclusive ``flock`` on the state
directory itself for as long as they run: a directory cannot be deleted and created anew under
a running daemon the way a lock file can (``rm gpuwatch.lock`` would let a second one lock a new
file of the same name). They also lock ``<state_dir>/gpuwatch.lock``, which keeps a running older
gpuwatch (that locks only the file) and a new one apart, and names the holder (pid, host, command,
start time) for the one that is refused. The kernel drops both locks when the holder dies, even
by SIGKILL: a stale file never blocks anyone. Where the directory cannot be locked (some network
file systems refuse ``flock`` on a directory) the file's lock alone is taken, as before.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType

DIR_MODE = 0o700
FILE_MODE = 0o600
LOCK_NAME = "gpuwatch.lock"

_FIX_SPACE = "free some space there, or point state_dir at another disk"
_FIX_WRITE = "make it writable for this user, or point state_dir at a directory this user may write"


class StateError(Exception):
    """The state directory or its database cannot be used; the message says what, where and
    what to do, in one line. The CLI prints it and exits with ``exit_code``."""

    exit_code = 2

    @property
    def problem(self) -> str:
        """What is wrong, without what to do about it (messages read "what, where; fix")."""
        return str(self).split("; ", 1)[0]


class StateDirBusy(StateError):
    """Another gpuwatch process holds the state directory (exit 1: nothing is wrong with the
    config; this run did not do its work)."""

    exit_code = 1

    def __init__(self, message: str, holder: Holder | None) -> None:
        super().__init__(message)
        self.holder = holder


def reason(exc: OSError) -> str:
    """A few words for an OS error: what the operator must change."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on device"
    if exc.errno == errno.EROFS:
        return "read-only file system"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.ENOTDIR:
        return "a path component is a file, not a directory"
    return exc.strerror or str(exc)


def fix_for(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return _FIX_SPACE
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return _FIX_WRITE
    return "check the path given as state_dir"


def os_error(exc: OSError, state_dir: Path, doing: str) -> StateError:
    """``state_dir /x: cannot create gpuwatch.lock: no space left on device; free some space ...``"""
    return StateError(f"state_dir {state_dir}: cannot {doing}: {reason(exc)}; {fix_for(exc)}")


def disk_full(path: Path) -> bool:
    """Whether the file system holding ``path`` has (next to) no room left: SQLite reports a
    failed write to its shared-memory file as a plain I/O error, so this tells which it was."""
    try:
        return shutil.disk_usage(path).free < 64 * 1024
    except OSError:
        return False


def ensure_state_dir(state_dir: Path) -> Path:
    """Create ``state_dir`` (and its parents) if needed; the directory itself 0700."""
    try:
        state_dir.mkdir(parents=True, mode=DIR_MODE)
    except FileExistsError:
        if not state_dir.is_dir():
            raise StateError(
                f"state_dir {state_dir}: is a file, not a directory; point state_dir at a directory "
                "(it is created if missing)"
            ) from None
        return state_dir
    except OSError as exc:
        raise os_error(exc, state_dir, "create the directory") from None
    try:
        os.chmod(state_dir, DIR_MODE)  # mkdir's mode is narrowed by the umask, never widened; set it exactly
    except OSError as exc:
        raise os_error(exc, state_dir, "set the directory's mode") from None
    return state_dir


def make_private(path: Path) -> None:
    """Make an existing file of ours 0600 (an older gpuwatch created it with the umask's mode)."""
    with contextlib.suppress(FileNotFoundError, PermissionError):
        if path.stat().st_mode & 0o777 != FILE_MODE:
            os.chmod(path, FILE_MODE)


def open_private(path: Path, flags: int) -> int:
    """``os.open`` creating the file 0600 whatever the umask (an existing one is made 0600)."""
    fd = os.open(path, flags | os.O_CREAT, FILE_MODE)
    try:
        if os.fstat(fd).st_mode & 0o777 != FILE_MODE:
            os.fchmod(fd, FILE_MODE)
    except PermissionError:
        pass  # not our file (another user's state_dir): leave its mode to its owner
    except BaseException:
        os.close(fd)
        raise
    return fd


# ---------------------------------------------------------------- the lock


@dataclass(frozen=True)
class Holder:
    """Who holds the lock, as it wrote itself into the lock file."""

    pid: int | None
    host: str
    command: str
    since: float | None

    def describe(self) -> str:
        pid = f"pid {self.pid}" if self.pid is not None else "pid unknown"
        where = f" on {self.host}" if self.host and self.host != socket.gethostname() else ""
        since = (
            f", since {datetime.fromtimestamp(self.since, timezone.utc):%Y-%m-%d %H:%M:%S} UTC"
            if self.since is not None
            else ""
        )
        command = f" ({self.command})" if self.command else ""
        return f"{pid}{where}{command}{since}"

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        try:
            data = json.loads(text)
        except ValueError:
            return None
        if not isinstance(data, dict):
            return None
        pid, since = data.get("pid"), data.get("since")
        return cls(
            pid=pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
            host=str(data.get("host", ""))[:100],
            command=str(data.get("command", ""))[:300],
            since=float(since) if isinstance(since, (int, float)) and not isinstance(since, bool) else None,
        )


class StateLock:
    """An exclusive hold on a state directory; :meth:`release` (or leaving the ``with``) ends it."""

    def __init__(self, state_dir: Path, fd: int, holder: Holder, dir_fd: int | None = None) -> None:
        self.state_dir = state_dir
        self.holder = holder
        self._fd: int | None = fd
        self._dir_fd = dir_fd  # the directory's own lock; None where the file system refused it

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # still locked: nobody reads a half-cleared file
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
            dir_fd, self._dir_fd = self._dir_fd, None
            if dir_fd is not None:
                os.close(dir_fd)  # closing drops the directory's lock

    def __enter__(self) -> StateLock:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _read_holder(fd: int, sleep: Callable[[float], None]) -> Holder | None:
    # The holder writes its name right after it takes the lock: give a racing start a moment.
    for _ in range(10):
        try:
            text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        except OSError:
            return None
        holder = Holder.parse(text)
        if holder is not None:
            return holder
        sleep(0.05)
    return None


def _holder_by_name(path: Path, sleep: Callable[[float], None]) -> tuple[Holder | None, bool]:
    """Who wrote ``path`` (the lock file of a directory another process has locked), and whether
    the file is gone (deleted under its holder; a racing start creates it a moment later)."""
    for _ in range(10):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            sleep(0.05)
            continue
        except OSError:
            return None, False
        try:
            return _read_holder(fd, sleep), False
        finally:
            os.close(fd)
    return None, True


def _busy(state_dir: Path, holder: Holder | None, deleted: bool = False) -> StateDirBusy:
    if holder is not None:
        who = holder.describe()
    elif deleted:
        who = f"a process whose {LOCK_NAME} was deleted, so it cannot say which (`lsof {state_dir}` names it)"
    else:
        who = "a process that has not written its pid yet"
    return StateDirBusy(
        f"state_dir {state_dir} is in use by another gpuwatch: {who}; two would send every message twice. "
        "Stop that one first, or give this config its own state_dir",
        holder,
    )


def _lock_directory(state_dir: Path, sleep: Callable[[float], None]) -> int | None:
    """An fd of ``state_dir`` holding its exclusive lock; None where the file system cannot lock
    a directory. Raises :class:`StateDirBusy` when another process holds it."""
    try:
        dir_fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise os_error(exc, state_dir, "open the directory") from None
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(dir_fd)
        raise _busy(state_dir, *_holder_by_name(state_dir / LOCK_NAME, sleep)) from None
    except OSError:
        os.close(dir_fd)  # e.g. NFS: flock on a directory opened read-only; the file's lock stands alone
        return None
    return dir_fd


def lock_state_dir(
    state_dir: Path,
    command: str,
    *,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> StateLock:
    """Take the state directory for this process, or raise :class:`StateDirBusy` at once
    naming the process that has it. ``command`` says what this process is (shown to others)."""
    ensure_state_dir(state_dir)
    dir_fd = _lock_directory(state_dir, sleep)
    path = state_dir / LOCK_NAME
    try:
        fd = open_private(path, os.O_RDWR)
    except OSError as exc:
        _close(dir_fd)
        raise os_error(exc, state_dir, f"open {LOCK_NAME}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd, sleep)  # an older gpuwatch, which locks only the file
        _close(fd, dir_fd)
        raise _busy(state_dir, holder) from None
    except OSError as exc:
        _close(fd, dir_fd)
        raise os_error(exc, state_dir, f"lock {LOCK_NAME}") from None
    holder = Holder(pid=os.getpid(), host=socket.gethostname(), command=command, since=clock())
    data = json.dumps({"pid": holder.pid, "host": holder.host, "command": command, "since": holder.since}) + "\n"
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, data.encode("utf-8"), 0)
    except OSError as exc:
        _close(fd, dir_fd)  # closing drops the locks
        raise os_error(exc, state_dir, f"write {LOCK_NAME}") from None
    return StateLock(state_dir, fd, holder, dir_fd)


def _close(*fds: int | None) -> None:
    for fd in fds:
        if fd is not None:
            os.close(fd)
