"""Persistent SSH connections (paramiko): connect, run a script, reconnect, host keys.

One :class:`SshConnection` per host lives across polls; its transport sends keepalives and
is reopened with backoff after a failure. Every step is bounded: TCP connect, banner and
authentication by ``connect_timeout``, each command by its own timeout. Failures raise
:class:`HostFailure` carrying a classified kind and a short human message; the poller turns
it into data. Secrets (passwords, key passphrases) never reach a message or a log line.
"""

from __future__ import annotations

import base64
import errno
import getpass
import hashlib
import logging
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import paramiko

from .config import HostConfig, SshSettings
from .model import HostErrorKind

log = logging.getLogger(__name__)


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


class HostKeyStore:
    """Known host keys: the user's known_hosts (read only) beside gpuwatch's own file.

    gpuwatch writes only its own file (``<state_dir>/known_hosts``), under a lock, so
    parallel first connections do not clobber each other.
    """

    def __init__(self, own_file: Path, user_files: tuple[Path, ...] = ()) -> None:
        self.own_file = own_file
        self.user_files = user_files
        self._lock = threading.Lock()
        self._own = paramiko.HostKeys()
        self._user = paramiko.HostKeys()
        for path in user_files:
            self._load(self._user, path)
        self._load(self._own, own_file)

    @staticmethod
    def _load(keys: paramiko.HostKeys, path: Path) -> None:
        try:
            if path.is_file():
                keys.load(str(path))
        except (OSError, paramiko.SSHException) as exc:
            log.warning("cannot read known_hosts file %s: %s", path, exc)

    def install(self, client: paramiko.SSHClient) -> None:
        """Give a fresh client every key known now (user's as system keys, ours as its own)."""
        with self._lock:
            system = client.get_host_keys()  # we feed both sets; only the policy ever writes
            for source in (self._user, self._own):
                for name in source.keys():
                    for ktype, key in source[name].items():
                        system.add(name, ktype, key)

    def where_known(self, name: str) -> Path | None:
        with self._lock:
            if self._own.lookup(name) is not None:
                return self.own_file
        for path in self.user_files:
            keys = paramiko.HostKeys()
            self._load(keys, path)
            if keys.lookup(name) is not None:
                return path
        return None

    def record(self, name: str, key: paramiko.PKey) -> None:
        with self._lock:
            self._own.add(name, key.get_name(), key)
            self.own_file.parent.mkdir(parents=True, exist_ok=True)
            line = f"{name} {key.get_name()} {key.get_base64()}\n"
            with open(self.own_file, "a", encoding="utf-8") as fh:
                fh.write(line)
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


class _Policy(paramiko.MissingHostKeyPolicy):
    def __init__(self, policy: str, store: HostKeyStore) -> None:
        self.policy = policy
        self.store = store

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
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


class SshConnection:
    """One persistent SSH connection to one host, opened on first use and reused."""

    def __init__(
        self,
        host: HostConfig,
        store: HostKeyStore,
        ssh_config: paramiko.SSHConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host = host
        self.store = store
        self.ssh_config = ssh_config
        self.clock = clock
        self._client: paramiko.SSHClient | None = None
        self._jump: SshConnection | None = None
        self._lock = threading.Lock()
        self.failures = 0
        self._retry_at = 0.0
        self._last_failure: HostFailure | None = None

    # -- connecting

    def _target(self) -> Target:
        return resolve_target(self.host.name, self.host.ssh, self.host.explicit, self.ssh_config, self.host.address)

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
        settings = self.host.ssh
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
            if "banner" in text.lower() or "timeout" in text.lower():
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
        """Run ``script`` with ``sh -s`` (whatever the login shell is), bounded by ``timeout``."""
        started = time.monotonic()
        transport = self.transport()
        try:
            return self._exec(transport, script, timeout, started)
        except HostFailure:
            raise
        except (paramiko.SSHException, EOFError, OSError) as first:
            # A connection that died since the last poll: reconnect once and retry.
            log.info("%s: %s; reconnecting once", self.host.name, first or type(first).__name__)
            with self._lock:
                self._drop()
            transport = self.transport()
            try:
                return self._exec(transport, script, timeout - (time.monotonic() - started), started)
            except (paramiko.SSHException, EOFError, OSError) as exc:
                with self._lock:
                    self._drop()
                raise HostFailure(HostErrorKind.SSH_ERROR, f"SSH session failed: {exc or type(exc).__name__}") from None

    def _exec(self, transport: paramiko.Transport, script: str, timeout: float, started: float) -> CommandResult:
        deadline = started + max(timeout, 0.1)
        chan = transport.open_session(timeout=self.host.ssh.connect_timeout)
        try:
            chan.settimeout(max(deadline - time.monotonic(), 0.1))
            chan.exec_command("sh -s")
            chan.sendall(script.encode())
            chan.shutdown_write()
            out = bytearray()
            err = bytearray()
            while True:
                chan.settimeout(max(deadline - time.monotonic(), 0.01))
                data = chan.recv(65536)
                if not data:
                    break
                out += data
            while chan.recv_stderr_ready() or (not chan.closed and not chan.exit_status_ready()):
                chan.settimeout(max(deadline - time.monotonic(), 0.01))
                data = chan.recv_stderr(65536)
                if not data:
                    break
                err += data
            if not chan.status_event.wait(max(deadline - time.monotonic(), 0.01)):
                raise TimeoutError()
            status = chan.exit_status
        except TimeoutError:
            raise HostFailure(
                HostErrorKind.PROBE_TIMEOUT,
                f"the probe did not finish within {timeout:g}s (command_timeout); "
                "the host or its GPU driver may be hung",
            ) from None
        finally:
            chan.close()
        return CommandResult(
            exit_status=None if status == -1 else status,
            stdout=out.decode("utf-8", "replace"),
            stderr=err.decode("utf-8", "replace"),
            seconds=time.monotonic() - started,
        )


class LocalRunner:
    """Runs the probe on this machine, for the ``localhost`` host."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.env = env

    def run_script(self, script: str, timeout: float) -> CommandResult:
        started = time.monotonic()
        try:
            proc = subprocess.run(
                ["sh", "-s"],
                input=script.encode(),
                capture_output=True,
                timeout=timeout,
                env=self.env,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise HostFailure(
                HostErrorKind.PROBE_TIMEOUT, f"the local probe did not finish within {timeout:g}s"
            ) from None
        except OSError as exc:
            raise HostFailure(HostErrorKind.PROBE_FAILED, f"cannot run sh locally: {exc}") from None
        return CommandResult(
            exit_status=proc.returncode,
            stdout=proc.stdout.decode("utf-8", "replace"),
            stderr=proc.stderr.decode("utf-8", "replace"),
            seconds=time.monotonic() - started,
        )

    def close(self) -> None:
        pass
