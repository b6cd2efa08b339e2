"""Persistent SSH connections (paramiko): connect (directly or through a jump host), run a script,
reconnect with backoff. Every step is bounded: the wait for a handshake slot, TCP connect, banner
and authentication by ``connect_timeout``, each command by its own timeout and its output caps."""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import paramiko

from gpuwatch.config import HostConfig
from gpuwatch.model import HostErrorKind

from .alarms import shared_alarms
from .hostkeys import HostKeyPolicy, HostKeyStore, RevokedHostKey, UnknownHostKey, fingerprint
from .output import PROBE_WINDOW_BYTES, BoundedOutput, read_channel
from .runner import CommandResult, HostFailure
from .session import session_script
from .target import Target, parse_jump, resolve_target

log = logging.getLogger(__name__)

# On the host, the probe's session is ended this many seconds after the client's own deadline:
# the client reports the timeout first, the host cleans up just after.
REMOTE_KILL_GRACE = 1

# SSH handshakes (TCP connect to the end of authentication, a jump host's included) in flight at
# once, over all hosts: OpenSSH's default `MaxStartups 10:30:100` starts refusing connections
# beyond 10 unauthenticated ones, which a restart against many hosts behind one ProxyJump bastion
# would exceed. A host waits for a slot at most HANDSHAKE_WAIT_FACTOR * connect_timeout; that
# wait does not count against its connect_timeout.
DEFAULT_MAX_HANDSHAKES = 8
HANDSHAKE_WAIT_FACTOR = 3

# How often the transport thread of a live connection wakes when nothing arrives. paramiko wakes
# it every 0.1 s (its socket timeout) to look at whether the connection was closed and to send a
# keepalive when one is due: 0.5 ms of CPU per host per second, half a core at 1,000 hosts. Data
# from the host, its end of the connection and a cut (EOF, reset) wake it at once whatever this
# is; what waits for the next wake: a keepalive (so at most this much late), a rekey gpuwatch
# asks for. Closing shuts the socket down first (_close_client), which ends the thread at once.
# The handshake keeps paramiko's timeout: its own deadlines are checked at each wake.
IDLE_WAKE_SECONDS = 30.0


def _classify_socket_error(exc: BaseException, target: Target, timeout: float) -> HostFailure:
    where = f"{target.hostname}:{target.port}"
    if isinstance(exc, socket.gaierror):
        return HostFailure(HostErrorKind.UNREACHABLE, f"name not resolved: {target.hostname} ({exc.strerror})")
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return HostFailure(
            HostErrorKind.UNREACHABLE, f"no answer from {where} within {timeout:g}s (host down or firewalled?)"
        )
    if isinstance(exc, ConnectionRefusedError) or getattr(exc, "errno", None) == errno.ECONNREFUSED:
        return HostFailure(HostErrorKind.UNREACHABLE, f"connection refused by {where} (is sshd running on that port?)")
    if getattr(exc, "errno", None) in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return HostFailure(HostErrorKind.UNREACHABLE, f"no route to {where}")
    return HostFailure(HostErrorKind.UNREACHABLE, f"cannot connect to {where}: {exc}")


class HandshakeSlots:
    """At most ``limit`` SSH handshakes in flight at once over all hosts (see
    :data:`DEFAULT_MAX_HANDSHAKES`). A host waits for a slot while the line moves: it gives up
    only when no handshake ended for ``timeout`` seconds (every slot held by logins that do not
    finish), so 1,000 hosts logging in at start all get their turn instead of failing after a
    fixed wait. Same ``acquire``/``release`` as a semaphore."""

    def __init__(self, limit: int = DEFAULT_MAX_HANDSHAKES) -> None:
        self._cond = threading.Condition()
        self._free = max(1, limit)
        self._ended = 0  # handshakes ended so far: the line moved when this grows

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        with self._cond:
            seen = self._ended
            deadline = None if timeout is None else time.monotonic() + timeout
            while self._free == 0:
                if not blocking:
                    return False
                if deadline is None:
                    self._cond.wait()
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if self._ended == seen:
                        return False
                    seen, deadline = self._ended, time.monotonic() + (timeout or 0.0)
                    continue
                self._cond.wait(remaining)
            self._free -= 1
            return True

    def release(self) -> None:
        with self._cond:
            self._free += 1
            self._ended += 1
            self._cond.notify()


class _NoHandshakeSlot(HostFailure):
    """Every handshake slot stayed taken: says nothing about this host, so no backoff for it."""


class SshConnection:
    """One persistent SSH connection to one host, opened on first use and reused.

    ``handshakes``, shared by all connections of a poller, bounds the SSH handshakes in flight
    at once (see :data:`DEFAULT_MAX_HANDSHAKES`); None: no bound.
    """

    def __init__(
        self,
        host: HostConfig,
        store: HostKeyStore,
        ssh_config: paramiko.SSHConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        handshakes: threading.Semaphore | HandshakeSlots | None = None,
    ) -> None:
        self.host = host
        self.store = store
        self.ssh_config = ssh_config
        self.clock = clock
        self.handshakes = handshakes
        self._client: paramiko.SSHClient | None = None
        self._jump: SshConnection | None = None
        self._lock = threading.Lock()
        self._closed = False  # closed for good (gpuwatch stops, the host was removed): no new connection
        self._queued_since: float | None = None  # waiting for a handshake slot since (monotonic)
        self._queued = 0.0  # seconds the current run waited for a handshake slot before
        self.failures = 0
        self._retry_at = 0.0
        self._last_failure: HostFailure | None = None

    # -- connecting

    def _target(self) -> Target:
        return resolve_target(self.host.name, self.host.ssh, self.host.explicit, self.ssh_config, self.host.address)

    @contextlib.contextmanager
    def _handshake_slot(self) -> Iterator[None]:
        """Hold one of the shared handshake slots (if any) from TCP connect to the end of authentication."""
        if self.handshakes is None:
            yield
            return
        wait = self.host.ssh.connect_timeout * HANDSHAKE_WAIT_FACTOR
        self._queued_since = time.monotonic()
        try:
            got = self.handshakes.acquire(timeout=wait)
        finally:
            self._queued += time.monotonic() - self._queued_since
            self._queued_since = None
        if not got:
            moving = " while none ended" if isinstance(self.handshakes, HandshakeSlots) else ""
            raise _NoHandshakeSlot(
                HostErrorKind.UNREACHABLE,
                f"waited {wait:g}s{moving} for a free SSH handshake slot: other hosts are slow to log in "
                "(gpuwatch runs at most a few SSH handshakes at a time); trying again next poll",
            )
        try:
            yield
        finally:
            self.handshakes.release()

    def _open_socket(self, target: Target) -> socket.socket | paramiko.Channel:
        timeout = self.host.ssh.connect_timeout
        if target.proxy_jump:
            user, jump_host, jump_port = parse_jump(target.proxy_jump)
            overrides: dict[str, object] = {}
            explicit = set()
            if user:
                overrides["user"] = user
                explicit.add("user")
            if jump_port:
                overrides["port"] = jump_port
                explicit.add("port")
            jump_cfg = HostConfig(
                name=jump_host,
                address=None,
                ssh=replace(self.host.ssh, proxy_jump=None, **overrides),  # type: ignore[arg-type]
                explicit=frozenset(explicit),
            )
            if self._jump is None or self._jump.host != jump_cfg:
                if self._jump is not None:
                    self._jump.close()
                # No handshake slots of its own: this connection holds one for both handshakes
                # (taking a second one while holding the first could deadlock when all are taken).
                self._jump = SshConnection(jump_cfg, self.store, self.ssh_config, self.clock)
            transport = self._jump.transport()
            try:
                return transport.open_channel(
                    "direct-tcpip", (target.hostname, target.port), ("127.0.0.1", 0), timeout=timeout
                )
            except paramiko.ChannelException as exc:
                raise HostFailure(
                    HostErrorKind.UNREACHABLE,
                    f"jump host {jump_host} cannot reach {target.hostname}:{target.port}: {exc.text}",
                ) from None
            except (paramiko.SSHException, OSError) as exc:
                raise HostFailure(HostErrorKind.UNREACHABLE, f"via jump host {jump_host}: {exc}") from None
        try:
            return socket.create_connection((target.hostname, target.port), timeout=timeout)
        except OSError as exc:
            raise _classify_socket_error(exc, target, timeout) from None

    def _connect(self) -> paramiko.SSHClient:
        target = self._target()
        with self._handshake_slot():
            return self._handshake(target)

    def _handshake(self, target: Target) -> paramiko.SSHClient:
        settings = self.host.ssh
        self._check_key_files(target)
        sock = self._open_socket(target)
        client = paramiko.SSHClient()
        self.store.install(client, target.known_hosts_name)
        client.set_missing_host_key_policy(HostKeyPolicy(settings.host_key_policy, self.store))
        timeout = settings.connect_timeout
        try:
            client.connect(
                target.hostname,
                port=target.port,
                username=target.user,
                password=target.password,
                key_filename=list(target.key_files) or None,  # type: ignore[arg-type]
                look_for_keys=not target.key_files,
                allow_agent=True,
                timeout=timeout,
                banner_timeout=timeout,
                auth_timeout=timeout,
                channel_timeout=timeout,
                sock=sock,
            )
        except (paramiko.SSHException, OSError) as exc:
            # paramiko ends its wait for the handshake at ``timeout`` without an error and then
            # fails to log in ("No existing session"): a server that never sent its banner
            transport = client.get_transport()
            banner = transport is not None and bool(transport.remote_version)
            client.close()
            raise self._login_failure(target, exc, banner_seen=banner) from None
        transport = client.get_transport()
        if transport is not None:
            if settings.keepalive > 0:
                transport.set_keepalive(int(settings.keepalive))
            wake = min(IDLE_WAKE_SECONDS, settings.keepalive) if settings.keepalive > 0 else IDLE_WAKE_SECONDS
            transport.sock.settimeout(max(wake, 0.1))
        log.info("connected to %s (%s)", self.host.name, target.label())
        return client

    def _check_key_files(self, target: Target) -> None:
        """Each key file must be readable: paramiko would fail with a bare OSError, read as "unreachable"."""
        for path in target.key_files:
            try:
                os.close(os.open(path, os.O_RDONLY))
            except OSError as exc:
                where = "this host's key_file" if "key_file" in self.host.explicit else "ssh.key_file"
                why = "does not exist" if not os.path.lexists(path) else f"cannot be read: {exc.strerror or exc}"
                raise HostFailure(HostErrorKind.AUTH_FAILED, f"the key file {path} ({where}) {why}") from None

    def _login_failure(
        self, target: Target, exc: paramiko.SSHException | OSError, *, banner_seen: bool = True
    ) -> HostFailure:
        """What a failed ``connect`` (handshake, host key, authentication) means, classified;
        ``banner_seen``: whether the server sent its SSH banner at all."""
        timeout = self.host.ssh.connect_timeout
        if isinstance(exc, paramiko.BadHostKeyException):
            return HostFailure(HostErrorKind.HOST_KEY_CHANGED, self._changed_key_message(target, exc))
        if isinstance(exc, RevokedHostKey):
            return HostFailure(HostErrorKind.HOST_KEY_CHANGED, self._revoked_key_message(exc))
        if isinstance(exc, UnknownHostKey):
            return HostFailure(HostErrorKind.HOST_KEY_UNKNOWN, self._unknown_key_message(target, exc))
        if isinstance(exc, paramiko.AuthenticationException):
            return self._auth_failure(target)
        if isinstance(exc, OSError):  # TimeoutError included
            return _classify_socket_error(exc, target, timeout)
        text = str(exc) or type(exc).__name__
        lowered = text.lower()
        if "no authentication methods available" in lowered:
            return HostFailure(
                HostErrorKind.AUTH_FAILED,
                f"no way to log in to {target.user}@{target.hostname}: no key file, no key in ssh-agent "
                "or ~/.ssh, and no password; set ssh.key_file, or password_env",
            )
        if "banner" in lowered and isinstance(exc.__context__, (EOFError, ConnectionError)):  # closed, not silent
            return HostFailure(
                HostErrorKind.UNREACHABLE,
                f"{target.hostname}:{target.port} closed the connection before the SSH handshake "
                "(sshd refuses new connections: too many at once (MaxStartups), or a firewall rule)",
            )
        if "banner" in lowered or "timeout" in lowered or not banner_seen:
            return HostFailure(
                HostErrorKind.UNREACHABLE,
                f"{target.hostname}:{target.port} accepted TCP but sent no SSH banner within {timeout:g}s",
            )
        return HostFailure(HostErrorKind.SSH_ERROR, f"SSH error with {target.hostname}: {text}")

    def _auth_failure(self, target: Target) -> HostFailure:
        """Authentication refused: which ways were tried."""
        tried = []
        if target.key_files:
            tried.append("key " + ", ".join(target.key_files))
        else:
            tried.append("default keys in ~/.ssh")
        tried.append("ssh-agent")
        if target.password:
            tried.append("password")
        elif self.host.ssh.password_env:
            tried.append(f"no password (${self.host.ssh.password_env} is not set)")
        return HostFailure(
            HostErrorKind.AUTH_FAILED,
            f"authentication failed for {target.user}@{target.hostname} (tried {'; '.join(tried)})",
        )

    def _changed_key_message(self, target: Target, exc: paramiko.BadHostKeyException) -> str:
        name = target.known_hosts_name
        where = self.store.where_known(name) or self.store.own_file
        return (
            f"HOST KEY CHANGED for {name}: it offered {exc.key.get_name()} {fingerprint(exc.key)}, "
            f"but {where} has {fingerprint(exc.expected_key)}. This may be a man-in-the-middle "
            f"attack, so gpuwatch refuses to connect. If the host was legitimately reinstalled, "
            f"remove the old key with: ssh-keygen -R '{name}' -f {where}"
        )

    def _revoked_key_message(self, exc: RevokedHostKey) -> str:
        where = self.store.revoked_in(exc.key) or "a known_hosts file"
        return (
            f"host key of {exc.name} ({exc.key.get_name()} {fingerprint(exc.key)}) is marked @revoked in "
            f"{where}, so gpuwatch refuses to connect: the host must get a new key"
        )

    def _unknown_key_message(self, target: Target, exc: UnknownHostKey) -> str:
        port = f"-p {target.port} " if target.port != 22 else ""
        return (
            f"host key of {exc.name} is not known and host_key_policy is strict; check its "
            f"fingerprint ({exc.key.get_name()} {fingerprint(exc.key)}) and add it with: "
            f"ssh-keyscan {port}-t {exc.key.get_name()} {target.hostname} >> {self.store.own_file}"
        )

    def queued_seconds(self) -> float:
        """How long the run in progress (or the last one) has waited in line for a handshake slot:
        time that counts against no timeout of the host's own (the poller adds it to the budget)."""
        since = self._queued_since
        return self._queued + (time.monotonic() - since if since is not None else 0.0)

    def connected(self) -> bool:
        """Whether the connection is open now (a probe then needs no login first)."""
        client = self._client
        transport = client.get_transport() if client is not None else None
        return transport is not None and transport.is_active()

    def transport(self) -> paramiko.Transport:
        """The live transport, connecting (or reconnecting after backoff) when needed."""
        with self._lock:
            if self._closed:
                self._drop()
                raise HostFailure(HostErrorKind.SSH_ERROR, "the connection was closed (gpuwatch is stopping)")
            client = self._client
            if client is not None:
                transport = client.get_transport()
                if transport is not None and transport.is_active():
                    return transport
                log.info("connection to %s was lost; reconnecting", self.host.name)
                self._drop()
            now = self.clock()
            if self._last_failure is not None and now < self._retry_at:
                failure = self._last_failure
                raise HostFailure(failure.kind, f"{failure.message} (next try in {self._retry_at - now:.0f}s)")
            try:
                self._client = self._connect()
            except _NoHandshakeSlot:
                raise
            except HostFailure as failure:
                self.failures += 1
                self._last_failure = failure
                self._retry_at = now + min(300.0, 2.0 ** min(self.failures - 1, 9)) if self.failures > 1 else now
                raise
            self.failures = 0
            self._last_failure = None
            if self._closed:  # closed while this connection was being made
                self._drop()
                raise HostFailure(HostErrorKind.SSH_ERROR, "the connection was closed (gpuwatch is stopping)")
            transport = self._client.get_transport()
            assert transport is not None
            return transport

    def _drop(self) -> None:
        if self._client is not None:
            self._close_client(self._client)
        self._client = None

    def _close_client(self, client: paramiko.SSHClient) -> None:
        """Close ``client``; its transport thread, asleep in a read for up to IDLE_WAKE_SECONDS,
        is woken by shutting the socket down first (paramiko only closes it), so it ends now."""
        try:
            transport = client.get_transport()
            if transport is not None and isinstance(transport.sock, socket.socket):
                with contextlib.suppress(OSError):
                    transport.sock.shutdown(socket.SHUT_RDWR)
            client.close()
        except Exception:  # closing a dead connection must not raise
            log.debug("error closing the connection to %s", self.host.name, exc_info=True)

    def close(self) -> None:
        """Close the connection for good, without waiting for one being made (that one is closed
        by the thread making it as soon as it is made): stopping 1,000 hosts must not wait out
        the logins still under way one after the other."""
        self._closed = True  # set before the client is read: one being made now is dropped by its maker
        client = self._client
        if client is not None:
            self._close_client(client)
        if self._jump is not None:
            self._jump.close()

    # -- running

    def run_script(self, script: str, timeout: float) -> CommandResult:
        """Run ``script`` with ``sh -s`` (whatever the login shell is), in a session of its own on
        the host (:func:`session_script`).

        ``timeout`` runs from when the connection is ready (connecting has its own bounds); at
        that deadline the run ends whatever the host does, and the host ends the script's session
        a moment later. Output beyond :data:`MAX_STDOUT_BYTES` / :data:`MAX_STDERR_BYTES` ends
        the run as ``unparseable``.
        """
        entered = time.monotonic()
        self._queued = 0.0
        transport = self.transport()
        deadline = time.monotonic() + max(timeout, 0.1)
        try:
            return self._exec(transport, script, timeout, deadline, entered)
        except HostFailure:
            raise
        except (paramiko.SSHException, EOFError, OSError) as first:
            if time.monotonic() >= deadline:
                raise _timeout_failure(timeout) from None
            # A connection that died since the last poll: reconnect once and retry.
            log.info("%s: %s; reconnecting once", self.host.name, first or type(first).__name__)
            with self._lock:
                self._drop()
            transport = self.transport()
            try:
                return self._exec(transport, script, timeout, deadline, entered)
            except (paramiko.SSHException, EOFError, OSError) as exc:
                with self._lock:
                    self._drop()
                raise HostFailure(HostErrorKind.SSH_ERROR, f"SSH session failed: {exc or type(exc).__name__}") from None

    def _exec(
        self, transport: paramiko.Transport, script: str, timeout: float, deadline: float, entered: float
    ) -> CommandResult:
        chan = transport.open_session(window_size=PROBE_WINDOW_BYTES, timeout=self.host.ssh.connect_timeout)
        expired = threading.Event()

        def expire() -> None:  # exec_command waits for the server's reply without a timeout of its own
            expired.set()
            # closing sends a message, which can block on a host that stopped reading: not on the
            # alarms' thread that every probe's deadline shares (a thread only in this rare case)
            threading.Thread(target=chan.close, name=f"expire-{self.host.name}", daemon=True).start()

        guard = shared_alarms().at(deadline, expire)  # one thread for every probe's deadline
        try:
            chan.settimeout(max(deadline - time.monotonic(), 0.1))
            limit = math.ceil(max(deadline - time.monotonic(), 0.0)) + REMOTE_KILL_GRACE
            chan.exec_command("sh -s")
            chan.sendall(session_script(script, limit).encode())
            chan.shutdown_write()
            output = BoundedOutput()
            read_channel(chan, output, deadline)
            if not chan.status_event.wait(max(deadline - time.monotonic(), 0.0)):
                raise TimeoutError()
            if expired.is_set():
                raise TimeoutError()
            # No exit status (paramiko's exit_status_ready() is also true for a closed channel:
            # -1 is "none came"), and the host never ended its side (no EOF) or the connection is
            # gone: the session was cut (the host went down mid-probe), not ended. paramiko wakes
            # this thread when it closes the channels of a dead connection, a moment before it
            # marks the connection inactive, so is_active() alone can still say "live".
            if chan.exit_status == -1 and (not chan.eof_received or not transport.is_active()):
                raise paramiko.SSHException(f"the connection to {self.host.name} was lost during the probe")
            status = chan.exit_status
        except (TimeoutError, paramiko.SSHException, EOFError, OSError):
            if expired.is_set() or time.monotonic() >= deadline:
                raise _timeout_failure(timeout) from None
            raise
        finally:
            guard.cancel()
            chan.close()
        return output.result(None if status == -1 else status, time.monotonic() - entered)


def _timeout_failure(timeout: float) -> HostFailure:
    return HostFailure(
        HostErrorKind.PROBE_TIMEOUT,
        f"the probe did not finish within {timeout:g}s (command_timeout); the host or its GPU driver may be hung",
    )
