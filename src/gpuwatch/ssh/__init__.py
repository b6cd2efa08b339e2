"""Running the probe on a host: persistent SSH connections (paramiko), host keys, the local runner.

One :class:`SshConnection` per host lives across polls; its transport sends keepalives and
is reopened with backoff after a failure. Every step is bounded: the wait for a handshake
slot (:data:`DEFAULT_MAX_HANDSHAKES`), TCP connect, banner and authentication by
``connect_timeout``, each command by its own timeout and by what it may print
(:data:`MAX_STDOUT_BYTES`, :data:`MAX_STDERR_BYTES`). On the host, a command runs in a
session of its own that is ended when it exits or at its deadline, so nothing it started
outlives the poll (:func:`session_script`). Failures raise :class:`HostFailure` carrying a
classified kind and a short human message; the poller turns it into data. Secrets
(passwords, key passphrases) never reach a message or a log line.

Where each part lives: :mod:`.runner` (the ``Runner`` seam, ``CommandResult``, ``HostFailure``),
:mod:`.target` (who and where, ~/.ssh/config, ProxyJump), :mod:`.hostkeys` (known_hosts files,
gpuwatch's own, the policy), :mod:`.connection` (``SshConnection``), :mod:`.session` (the wrapper
script on the host), :mod:`.output` (the output caps), :mod:`.local` (``LocalRunner``),
:mod:`.limits` (the open files a fleet needs, and the process limit on them).
"""

from __future__ import annotations

from .connection import (
    DEFAULT_MAX_HANDSHAKES,
    HANDSHAKE_WAIT_FACTOR,
    IDLE_WAKE_SECONDS,
    REMOTE_KILL_GRACE,
    HandshakeSlots,
    SshConnection,
)
from .hostkeys import HostKeyPolicy, HostKeyStore, KnownHostsFile, fingerprint, read_known_hosts
from .limits import (
    FDS_BASE,
    FDS_PER_HOST,
    FDS_PER_JUMP,
    OpenFilesLimitError,
    fds_needed,
    fit_open_files,
    raise_open_files_limit,
)
from .local import LocalRunner
from .output import MAX_STDERR_BYTES, MAX_STDOUT_BYTES, PROBE_WINDOW_BYTES
from .runner import CommandResult, HostFailure, Runner
from .session import session_script
from .target import Target, load_ssh_config, parse_jump, resolve_target

__all__ = [
    "DEFAULT_MAX_HANDSHAKES",
    "FDS_BASE",
    "FDS_PER_HOST",
    "FDS_PER_JUMP",
    "HANDSHAKE_WAIT_FACTOR",
    "IDLE_WAKE_SECONDS",
    "MAX_STDERR_BYTES",
    "MAX_STDOUT_BYTES",
    "PROBE_WINDOW_BYTES",
    "REMOTE_KILL_GRACE",
    "CommandResult",
    "HandshakeSlots",
    "HostFailure",
    "HostKeyPolicy",
    "HostKeyStore",
    "KnownHostsFile",
    "LocalRunner",
    "OpenFilesLimitError",
    "Runner",
    "SshConnection",
    "Target",
    "fds_needed",
    "fingerprint",
    "fit_open_files",
    "load_ssh_config",
    "parse_jump",
    "raise_open_files_limit",
    "read_known_hosts",
    "resolve_target",
    "session_script",
]
