"""Host keys: the known_hosts files gpuwatch reads, its own file it writes, and the policy for a key
it does not know (``strict``, ``accept-new``, ``off``; a ``@revoked`` key is refused whatever the
policy, as OpenSSH does)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import paramiko
from paramiko.hostkeys import HostKeyEntry

log = logging.getLogger(__name__)


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

    def install(self, client: paramiko.SSHClient, name: str) -> None:
        """Give a fresh client the keys known now for ``name`` (as known_hosts spells it:
        ``host`` or ``[host]:port``; the only name paramiko looks up), except revoked ones (a
        revoked key then reaches the policy, which refuses it). Only that name's: copying every
        known key into every client costs O(hosts²) per login (minutes of CPU for 1,000 hosts)."""
        with self._lock:
            files = self._files()
            revoked = set().union(*(known.revoked for known in files))
            system = client.get_host_keys()  # we feed both sets; only the policy ever writes
            for known in reversed(files):  # the user's first, ours last
                found = known.keys.lookup(name)
                for ktype, key in (found or {}).items():
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


class UnknownHostKey(paramiko.SSHException):
    def __init__(self, name: str, key: paramiko.PKey) -> None:
        super().__init__(name)
        self.name = name
        self.key = key


class RevokedHostKey(UnknownHostKey):
    pass


class HostKeyPolicy(paramiko.MissingHostKeyPolicy):
    def __init__(self, policy: str, store: HostKeyStore) -> None:
        self.policy = policy
        self.store = store

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        if self.store.is_revoked(key):  # whatever the policy, as OpenSSH does
            raise RevokedHostKey(hostname, key)
        if self.policy == "off":
            log.warning("host_key_policy is off: accepting %s key %s unchecked", hostname, fingerprint(key))
            return
        if self.policy == "accept-new":
            self.store.record(hostname, key)
            return
        raise UnknownHostKey(hostname, key)
