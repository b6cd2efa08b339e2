"""Where and as whom to connect: the gpuwatch config merged with ~/.ssh/config, and ProxyJump specs."""

from __future__ import annotations

import getpass
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import paramiko

from gpuwatch.config import SshSettings

log = logging.getLogger(__name__)


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
    try:
        if not full.is_file():  # raises where this user may not enter the home (HOME kept under another user)
            return None
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
