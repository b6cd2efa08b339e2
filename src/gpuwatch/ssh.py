"""Persistent SSH connections (paramiko): connect, run a script, reconnect, host keys.

One :class:`SshConnection` per host lives across polls; its transport sends keepalives and
is reopened with backoff after a failure. Every step is bounded: the wait for a handshake
slot (:data:`DEFAULT_MAX_HANDSHAKES`), TCP connect, banner and authentication by
``connect_timeout``, each command by its own timeout and by what it may print
(:data:`MAX_STDOUT_BYTES`, :data:`MAX_STDERR_BYTES`). On the host, a command runs in a
session of its own that is ended when it exits or at its deadline, so nothing it started
outlives the poll (:func:`session_script`). Failures raise :class:`HostFailure` carrying a
classified kind and a short human message; the poller turns it into data. Secrets
(passwords, key passphrases) never reach a message or a log line.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import getpass
import hashlib
import logging
import math
import os
import select
import selectors
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import paramiko
from paramiko.hostkeys import HostKeyEntry

from .config import HostConfig, SshSettings
from .model import HostErrorKind

log = logging.getLogger(__name__)

# What one probe may print before gpuwatch stops reading and ends it. A real probe prints a few
# hundred bytes per GPU and one line per GPU process; 4 MiB is far beyond any real host, and far
# below what a host that streams output (a login script running `yes`) would otherwise cost the
# daemon (1.66 GB in 2 s, measured). paramiko holds at most one channel window
# (PROBE_WINDOW_BYTES) on top of it. stderr carries only the shell's own complaints (the probe
# merges nvidia-smi's into stdout), hence the smaller cap.
MAX_STDOUT_BYTES = 4 * 1024 * 1024
MAX_STDERR_BYTES = 64 * 1024
PROBE_WINDOW_BYTES = 1024 * 1024
_CHUNK = 65536

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


# ---------------------------------------------------------------- resolving the target


@dataclass(frozen=True)
class Target:
    """Where and as whom to connect, after ~/.ssh/config and the gpuwatch config are merged."""

    hostname: str
    port: int
    user: str
    key_files: tuple[str, ...] = ()
    proxy_jump: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def known_hosts_name(self) -> str:
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"

    def label(self) -> str:
        return f"{self.user}@{self.hostname}:{self.port}"


def load_ssh_config(path: str = "~/.ssh/config") -> paramiko.SSHConfig | None:
    full = Path(os.path.expanduser(path))
    if not full.is_file():
        return None
    try:
        return paramiko.SSHConfig.from_path(str(full))
    except Exception as exc:  # a broken ssh config must not stop the poll of other hosts
        log.warning("cannot read %s: %s; ignoring it", full, exc)
        return None


def resolve_target(
    alias: str,
    settings: SshSettings,
    explicit: frozenset[str],
    ssh_config: paramiko.SSHConfig | None,
    address: str | None = None,
) -> Target:
    """Merge: keys on the host's entry > ~/.ssh/config for the alias > ``ssh:`` defaults > built-ins.

    ``ssh:`` defaults are fleet-wide, ~/.ssh/config entries are host-specific, so the latter
    wins over the former; a key set on the host entry itself wins over both.
    """
    found: dict[str, object] = {}
    if ssh_config is not None and settings.use_ssh_config:
        found = dict(ssh_config.lookup(alias))

    def pick(key: str, ssh_key: str, default: object) -> object:
        value = getattr(settings, key)
        if key in explicit and value is not None:
            return value
        if ssh_key in found:
            return found[ssh_key]
        return value if value is not None else default

    hostname = address or str(found.get("hostname", alias))
    port = int(str(pick("port", "port", 22)))
    user = str(pick("user", "user", getpass.getuser()))
    key_files: list[str] = []
    if settings.key_file:
        key_files.append(os.path.expanduser(settings.key_file))
    identity = found.get("identityfile") or []
    for extra in identity if isinstance(identity, list) else [identity]:
        path = os.path.expanduser(str(extra))
        if path not in key_files and os.path.exists(path):
            key_files.append(path)
    proxy_value = pick("proxy_jump", "proxyjump", None)
    proxy = None if proxy_value is None or str(proxy_value).lower() == "none" else str(proxy_value)
    return Target(
        hostname=hostname,
        port=port,
        user=user,
        key_files=tuple(key_files),
        proxy_jump=proxy,
        password=settings.resolve_password(),
    )


def parse_jump(spec: str) -> tuple[str | None, str, int | None]:
    """``user@host:port`` -> (user, host, port); the first hop of a comma list."""
    user = None
    hop = spec.split(",")[0].strip()
    hop = hop.removeprefix("ssh://")
    if "@" in hop:
        user, hop = hop.rsplit("@", 1)
    port = None
    if hop.startswith("[") and "]" in hop:
        host, _, rest = hop[1:].partition("]")
        if rest.startswith(":"):
            port = int(rest[1:])
    elif hop.count(":") == 1:
        host, port_text = hop.split(":")
        port = int(port_text)
    else:
        host = hop
    return user, host, port


# ---------------------------------------------------------------- host keys


def fingerprint(key: paramiko.PKey) -> str:
    digest = key.fingerprint if hasattr(key, "fingerprint") else None
    if isinstance(digest, str) and digest.startswith("SHA256:"):
        return digest
    raw = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(raw).decode().rstrip("=")


@dataclass
class KnownHostsFile:
    """What gpuwatch could read of one known_hosts file."""

    path: Path
    keys: paramiko.HostKeys = field(default_factory=paramiko.HostKeys)
    revoked: set[tuple[str, str]] = field(default_factory=set)  # (key type, base64) marked @revoked
    skipped: list[str] = field(default_factory=list)  # "line N (why)" for each line not understood


def _entry(line: str, lineno: int) -> tuple[HostKeyEntry | None, str]:
    """One known_hosts entry, or None and why not."""
    try:
        entry = HostKeyEntry.from_line(line, lineno)
    except Exception:  # bad base64 (InvalidHostKey), or a corrupt key blob failing deep in the crypto library
        return None, "not a known_hosts entry"
    if entry is None:
        fields = line.split()
        if len(fields) < 3:
            return None, "not a known_hosts entry"
        return None, f"key type {fields[1][:40]!r} not supported"
    return entry, ""


def read_known_hosts(path: Path) -> KnownHostsFile:
    """Read a known_hosts file line by line, keeping every entry gpuwatch understands.

    ``@revoked`` keys are remembered (a host that offers one is refused); ``@cert-authority``
    lines and lines that cannot be read are skipped and listed in ``skipped``, so that one odd
    line costs that line, not every host. A missing file is an empty one.
    """
    known = KnownHostsFile(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return known
    for lineno, raw in enumerate(data.splitlines(), 1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            known.skipped.append(f"line {lineno} (not UTF-8 text)")
            continue
        if not line or line.startswith("#"):
            continue
        marker = ""
        if line.startswith("@"):
            marker, _, line = line.partition(" ")
            line = line.strip()
            if marker == "@cert-authority":
                known.skipped.append(f"line {lineno} (@cert-authority: host certificates are not supported)")
                continue
            if marker != "@revoked":
                known.skipped.append(f"line {lineno} (unknown marker {marker[:40]!r})")
                continue
        entry, why = _entry(line, lineno)
        if entry is None:
            known.skipped.append(f"line {lineno} ({why})")
        elif marker == "@revoked":
            known.revoked.add((entry.key.get_name(), entry.key.get_base64()))
        else:
            for name in entry.hostnames:
                known.keys.add(name, entry.key.get_name(), entry.key)
    return known


def _make_private_dir(directory: Path) -> None:
    """Create ``directory`` (and missing parents) with mode 0700 whatever the umask; an existing
    directory is left as it is."""
    missing = []
    current = directory
    while not current.exists():
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)
            os.chmod(path, 0o700)


def _replace_file(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all (temp file in the same directory, fsync, rename), mode 0600."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o600)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable where the platform allows
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class HostKeyStore:
    """Known host keys: the user's known_hosts (read only) beside gpuwatch's own file.

    gpuwatch writes only its own file (``<state_dir>/known_hosts``), under a lock, so parallel
    first connections do not clobber each other, and atomically (mode 0600), so a crash never
    leaves half a line. Lines it cannot read are skipped with one warning per file.
    """

    def __init__(self, own_file: Path, user_files: tuple[Path, ...] = ()) -> None:
        self.own_file = own_file
        self.user_files = user_files
        self._lock = threading.Lock()
        self._user = [self._load(path) for path in user_files]
        self._own = self._load(own_file)

    @staticmethod
    def _load(path: Path) -> KnownHostsFile:
        try:
            known = read_known_hosts(path)
        except OSError as exc:
            log.warning("cannot read known_hosts file %s: %s; ignoring it", path, exc.strerror or exc)
            return KnownHostsFile(path)
        if known.skipped:
            shown = "; ".join(known.skipped[:5])
            more = f" and {len(known.skipped) - 5} more" if len(known.skipped) > 5 else ""
            log.warning(
                "%s: skipped %d line(s) gpuwatch cannot read: %s%s; the other entries are used "
                "(fix or delete those lines to silence this)",
                path,
                len(known.skipped),
                shown,
                more,
            )
        return known

    def _files(self) -> list[KnownHostsFile]:
        return [self._own, *self._user]

    def is_revoked(self, key: paramiko.PKey) -> bool:
        """True when a known_hosts file marks ``key`` ``@revoked``."""
        wanted = (key.get_name(), key.get_base64())
        with self._lock:
            return any(wanted in known.revoked for known in self._files())

    def revoked_in(self, key: paramiko.PKey) -> Path | None:
        wanted = (key.get_name(), key.get_base64())
        with self._lock:
            return next((known.path for known in self._files() if wanted in known.revoked), None)

    def install(self, client: paramiko.SSHClient) -> None:
        """Give a fresh client every key known now, except revoked ones (a revoked key then
        reaches the policy, which refuses it)."""
        with self._lock:
            files = self._files()
            revoked = set().union(*(known.revoked for known in files))
            system = client.get_host_keys()  # we feed both sets; only the policy ever writes
            for known in reversed(files):  # the user's first, ours last
                for name in known.keys.keys():
                    for ktype, key in known.keys[name].items():
                        if (ktype, key.get_base64()) not in revoked:
                            system.add(name, ktype, key)

    def where_known(self, name: str) -> Path | None:
        with self._lock:
            return next((known.path for known in self._files() if known.keys.lookup(name) is not None), None)

    def record(self, name: str, key: paramiko.PKey) -> None:
        """Remember ``name``'s first key, in memory and in gpuwatch's own file (existing lines kept)."""
        line = f"{name} {key.get_name()} {key.get_base64()}\n"
        with self._lock:
            self._own.keys.add(name, key.get_name(), key)
            try:
                _make_private_dir(self.own_file.parent)
                try:
                    old = self.own_file.read_bytes()  # read again: another gpuwatch may have added keys
                except FileNotFoundError:
                    old = b""
                if old and not old.endswith(b"\n"):
                    old += b"\n"  # a line cut off by an old crash stays on its own line
                _replace_file(self.own_file, old + line.encode())
            except OSError as exc:
                log.warning(
                    "cannot record the host key of %s in %s: %s; it is trusted for this run only",
                    name,
                    self.own_file,
                    exc.strerror or exc,
                )
                return
        log.warning(
            "recorded the first host key of %s (%s %s) in %s",
            name,
            key.get_name(),
            fingerprint(key),
            self.own_file,
        )


class _UnknownHostKey(paramiko.SSHException):
    def __init__(self, name: str, key: paramiko.PKey) -> None:
        super().__init__(name)
        self.name = name
        self.key = key


class _RevokedHostKey(_UnknownHostKey):
    pass


class _Policy(paramiko.MissingHostKeyPolicy):
    def __init__(self, policy: str, store: HostKeyStore) -> None:
        self.policy = policy
        self.store = store

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        if self.store.is_revoked(key):  # whatever the policy, as OpenSSH does
            raise _RevokedHostKey(hostname, key)
        if self.policy == "off":
            log.warning("host_key_policy is off: accepting %s key %s unchecked", hostname, fingerprint(key))
            return
        if self.policy == "accept-new":
            self.store.record(hostname, key)
            return
        raise _UnknownHostKey(hostname, key)


# ---------------------------------------------------------------- connections


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
        handshakes: threading.Semaphore | None = None,
    ) -> None:
        self.host = host
        self.store = store
        self.ssh_config = ssh_config
        self.clock = clock
        self.handshakes = handshakes
        self._client: paramiko.SSHClient | None = None
        self._jump: SshConnection | None = None
        self._lock = threading.Lock()
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
        if not self.handshakes.acquire(timeout=wait):
            raise _NoHandshakeSlot(
                HostErrorKind.UNREACHABLE,
                f"waited {wait:g}s for a free SSH handshake slot: other hosts are slow to log in "
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
        for path in target.key_files:  # paramiko would fail with a bare OSError, read as "unreachable"
            try:
                os.close(os.open(path, os.O_RDONLY))
            except OSError as exc:
                where = "this host's key_file" if "key_file" in self.host.explicit else "ssh.key_file"
                why = "does not exist" if not os.path.lexists(path) else f"cannot be read: {exc.strerror or exc}"
                raise HostFailure(HostErrorKind.AUTH_FAILED, f"the key file {path} ({where}) {why}") from None
        sock = self._open_socket(target)
        client = paramiko.SSHClient()
        self.store.install(client)
        client.set_missing_host_key_policy(_Policy(settings.host_key_policy, self.store))
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
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise HostFailure(HostErrorKind.HOST_KEY_CHANGED, self._changed_key_message(target, exc)) from None
        except _RevokedHostKey as exc:
            client.close()
            raise HostFailure(HostErrorKind.HOST_KEY_CHANGED, self._revoked_key_message(exc)) from None
        except _UnknownHostKey as exc:
            client.close()
            raise HostFailure(HostErrorKind.HOST_KEY_UNKNOWN, self._unknown_key_message(target, exc)) from None
        except paramiko.AuthenticationException:
            client.close()
            tried = []
            if target.key_files:
                tried.append("key " + ", ".join(target.key_files))
            else:
                tried.append("default keys in ~/.ssh")
            tried.append("ssh-agent")
            if target.password:
                tried.append("password")
            elif settings.password_env:
                tried.append(f"no password (${settings.password_env} is not set)")
            raise HostFailure(
                HostErrorKind.AUTH_FAILED,
                f"authentication failed for {target.user}@{target.hostname} (tried {'; '.join(tried)})",
            ) from None
        except TimeoutError as exc:
            client.close()
            raise _classify_socket_error(exc, target, timeout) from None
        except paramiko.SSHException as exc:
            client.close()
            text = str(exc) or type(exc).__name__
            if "no authentication methods available" in text.lower():
                raise HostFailure(
                    HostErrorKind.AUTH_FAILED,
                    f"no way to log in to {target.user}@{target.hostname}: no key file, no key in ssh-agent "
                    "or ~/.ssh, and no password; set ssh.key_file, or password_env",
                ) from None
            lowered = text.lower()
            if "banner" in lowered and isinstance(exc.__context__, (EOFError, ConnectionError)):  # closed, not silent
                raise HostFailure(
                    HostErrorKind.UNREACHABLE,
                    f"{target.hostname}:{target.port} closed the connection before the SSH handshake "
                    "(sshd refuses new connections: too many at once (MaxStartups), or a firewall rule)",
                ) from None
            if "banner" in lowered or "timeout" in lowered:
                raise HostFailure(
                    HostErrorKind.UNREACHABLE,
                    f"{target.hostname}:{target.port} accepted TCP but sent no SSH banner within {timeout:g}s",
                ) from None
            raise HostFailure(HostErrorKind.SSH_ERROR, f"SSH error with {target.hostname}: {text}") from None
        except OSError as exc:
            client.close()
            raise _classify_socket_error(exc, target, timeout) from None
        transport = client.get_transport()
        if transport is not None and settings.keepalive > 0:
            transport.set_keepalive(int(settings.keepalive))
        log.info("connected to %s (%s)", self.host.name, target.label())
        return client

    def _changed_key_message(self, target: Target, exc: paramiko.BadHostKeyException) -> str:
        name = target.known_hosts_name
        where = self.store.where_known(name) or self.store.own_file
        return (
            f"HOST KEY CHANGED for {name}: it offered {exc.key.get_name()} {fingerprint(exc.key)}, "
            f"but {where} has {fingerprint(exc.expected_key)}. This may be a man-in-the-middle "
            f"attack, so gpuwatch refuses to connect. If the host was legitimately reinstalled, "
            f"remove the old key with: ssh-keygen -R '{name}' -f {where}"
        )

    def _revoked_key_message(self, exc: _RevokedHostKey) -> str:
        where = self.store.revoked_in(exc.key) or "a known_hosts file"
        return (
            f"host key of {exc.name} ({exc.key.get_name()} {fingerprint(exc.key)}) is marked @revoked in "
            f"{where}, so gpuwatch refuses to connect: the host must get a new key"
        )

    def _unknown_key_message(self, target: Target, exc: _UnknownHostKey) -> str:
        port = f"-p {target.port} " if target.port != 22 else ""
        return (
            f"host key of {exc.name} is not known and host_key_policy is strict; check its "
            f"fingerprint ({exc.key.get_name()} {fingerprint(exc.key)}) and add it with: "
            f"ssh-keyscan {port}-t {exc.key.get_name()} {target.hostname} >> {self.store.own_file}"
        )

    def transport(self) -> paramiko.Transport:
        """The live transport, connecting (or reconnecting after backoff) when needed."""
        with self._lock:
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
            transport = self._client.get_transport()
            assert transport is not None
            return transport

    def _drop(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except Exception:  # closing a dead connection must not raise
                log.debug("error closing the connection to %s", self.host.name, exc_info=True)
        self._client = None

    def close(self) -> None:
        with self._lock:
            self._drop()
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
            chan.close()

        guard = threading.Timer(max(deadline - time.monotonic(), 0.0), expire)
        guard.daemon = True
        guard.start()
        try:
            chan.settimeout(max(deadline - time.monotonic(), 0.1))
            limit = math.ceil(max(deadline - time.monotonic(), 0.0)) + REMOTE_KILL_GRACE
            chan.exec_command("sh -s")
            chan.sendall(session_script(script, limit).encode())
            chan.shutdown_write()
            output = _BoundedOutput()
            _read_channel(chan, output, deadline)
            if not chan.status_event.wait(max(deadline - time.monotonic(), 0.0)):
                raise TimeoutError()
            if expired.is_set():
                raise TimeoutError()
            if not chan.exit_status_ready() and not transport.is_active():
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


def _size(n: int) -> str:
    return f"{n // (1024 * 1024)} MiB" if n % (1024 * 1024) == 0 else f"{n // 1024} KiB"


class _BoundedOutput:
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


def _read_channel(chan: paramiko.Channel, output: _BoundedOutput, deadline: float) -> None:
    """Read stdout and stderr together (a full stderr must not stall stdout) until the end of
    both, within ``deadline`` and the output caps."""
    ready = chan.fileno()  # readable while either stream has data, and for ever after EOF or close
    while True:
        finished = chan.eof_received or chan.closed  # looked at first: nothing arrives after it
        while chan.recv_ready():
            output.add(chan.recv(_CHUNK))
        while chan.recv_stderr_ready():
            output.add(chan.recv_stderr(_CHUNK), stderr=True)
        if finished:
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError()
        select.select([ready], [], [], remaining)


# The wrapper every script runs in on a host. sshd gives each exec a session, but nothing ends
# it: closing the channel signals nobody (without a pty), `timeout` kills only its own process
# group, and a child that ignores SIGTERM or sits in another group keeps running, holding the
# output open. So the script runs in a new session (setsid) that the wrapper ends with SIGKILL
# as soon as the script exits (children it left behind included), and a watchdog, in a session
# of its own, ends it at the deadline whatever happens to the connection. K ends a session:
# pkill -s finds its processes whatever their process group, pass after pass while it finds
# some (one may have been forking during the previous pass); without pkill, kill -<pgid> ends
# the script's own process group. The watchdog is killed by pid, then by process group, so it
# cannot outlive the wrapper. Without setsid (not Linux), the script runs as it is.
_PROBE_END = "__GPUWATCH_PROBE_END__"
_SESSION_SCRIPT = """\
# gpuwatch: the probe runs in a session of its own, ended when it exits or after __LIMIT__ s.
# The probe reaches its shell through a file only the login user can read, never through an argv:
# its section markers carry a per-poll secret that other users on the host must not see.
PATH="$PATH:/usr/bin:/bin"; export PATH
umask 077
if ! f=$(mktemp "${TMPDIR:-/tmp}/gpuwatch-probe.XXXXXXXXXX" 2>/dev/null); then
  f="${TMPDIR:-/tmp}/gpuwatch-probe.$$"  # no mktemp: created exclusively (O_EXCL), mode 0600
  if ! (set -C; : > "$f") 2>/dev/null; then
    echo "gpuwatch: cannot create a private file for the probe in ${TMPDIR:-/tmp}" >&2
    exit 125
  fi
fi
cat > "$f" <<'__PROBE_END__'
__SCRIPT__
__PROBE_END__
if command -v setsid >/dev/null 2>&1; then
  exec 3>&2 2>/dev/null  # the probe's stderr on 3; the shell's own notes ("Killed") to /dev/null
  K='n=0; while [ "$n" -lt 3 ] && pkill -KILL -s "$1"; do n=$((n + 1)); done; kill -KILL -"$1"'
  setsid sh "$f" </dev/null 2>&3 3>&- &
  s=$!
  setsid sh -c 'sleep "$1"; sh -c "$2" end "$3"' gpuwatch-deadline __LIMIT__ "$K" "$s" \\
    </dev/null >/dev/null 2>&1 3>&- &
  w=$!
  wait "$s"
  rc=$?
  kill -KILL "$w"; kill -KILL -"$w"
  sh -c "$K" end "$s" 3>&-
  rm -f "$f"
  exit "$rc"
fi
sh "$f" </dev/null
rc=$?
rm -f "$f"
exit "$rc"
"""


def session_script(script: str, limit_seconds: int) -> str:
    """``script`` wrapped so that it runs in a session of its own (POSIX sh), which is ended with
    SIGKILL when the script exits or ``limit_seconds`` after it started; its exit status is the
    script's. Runs as ``sh -s`` input, so it works whatever the login shell is. The script is
    handed over in a private temporary file (removed afterwards), so no argv on the host holds it."""
    if _PROBE_END in script.splitlines():
        raise ValueError("the probe script must not contain its own end marker")
    return (
        _SESSION_SCRIPT.replace("__LIMIT__", str(max(1, int(limit_seconds))))
        .replace("__PROBE_END__", _PROBE_END)
        .replace("__SCRIPT__", script.rstrip("\n"))
    )


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
        output = _BoundedOutput()
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


def _read_process(proc: subprocess.Popen[bytes], script: bytes, output: _BoundedOutput, deadline: float) -> None:
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
                data = os.read(key.fd, _CHUNK)
                if not data:
                    selector.unregister(key.fileobj)
                    continue
                output.add(data, stderr=key.data)
