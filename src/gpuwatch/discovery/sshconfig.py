"""``ssh_config: "gpu*"``: the concrete ``Host`` names of an OpenSSH client config that match a pattern.

Pure part (:func:`hosts_in_ssh_config`): from the config's text, the names written on ``Host`` lines
that are not patterns themselves (no ``*``, ``?``, ``!``) and match the source's pattern (fnmatch),
in file order, each with its ``HostName``, ``Port`` and ``User`` as the whole config gives them
(paramiko's ``SSHConfig.lookup``). ``Include`` lines are replaced by the files they name (globs,
relative paths under ``~/.ssh``), at most :data:`MAX_INCLUDE_DEPTH` deep; the included text is read
where the line stands, which is what OpenSSH does at the top level (inside a ``Host`` block OpenSSH
applies it only to that block: a simplification here).
"""

from __future__ import annotations

import fnmatch
import glob
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path

import paramiko

from ..config import DiscoverySource
from .base import DiscoveredHost, DiscoveryError, wait_refresh
from .hostlist import HostListError, check_name

MAX_INCLUDE_DEPTH = 8
MAX_BYTES = 4 * 1024 * 1024
_HOST_RE = re.compile(r"\s*host(?:\s*=\s*|\s+)(.*)", re.I)
_INCLUDE_RE = re.compile(r"\s*include(?:\s*=\s*|\s+)(.*)", re.I)

#: Reads an Include pattern -> [(path, text)] of the files it names (sorted, as OpenSSH reads them).
IncludeReader = Callable[[str], list[tuple[str, str]]]


def expand_includes(text: str, read: IncludeReader, depth: int = 0) -> str:
    """``text`` with every ``Include`` line replaced by the text of the files it names."""
    if depth > MAX_INCLUDE_DEPTH:
        raise DiscoveryError(f"Include nested more than {MAX_INCLUDE_DEPTH} deep (a loop?)")
    lines = []
    for line in text.splitlines():
        match = _INCLUDE_RE.fullmatch(line)
        if not match:
            lines.append(line)
            continue
        for pattern in match[1].split():
            for _, included in read(pattern.strip('"')):
                lines.append(expand_includes(included, read, depth + 1))
    return "\n".join(lines)


def host_names(text: str) -> list[str]:
    """The concrete names on ``Host`` lines, in order, each once (patterns and negations left out)."""
    names: list[str] = []
    for line in text.splitlines():
        match = _HOST_RE.fullmatch(line.split("#", 1)[0])
        if not match:
            continue
        for word in match[1].split():
            word = word.strip('"')
            if any(c in word for c in "*?!%") or not word:
                continue
            names.append(word)
    return list(dict.fromkeys(names))


def hosts_in_ssh_config(text: str, pattern: str) -> list[DiscoveredHost]:
    """The hosts of an ssh config (its text, Includes already expanded) whose names match ``pattern``."""
    try:
        config = paramiko.SSHConfig.from_text(text)
    except Exception as exc:  # paramiko's parse errors have no common base worth naming
        raise DiscoveryError(f"not an ssh config: {exc}") from None
    found = []
    for name in host_names(text):
        if not fnmatch.fnmatchcase(name, pattern):
            continue
        try:
            check_name(name)
        except HostListError as exc:
            raise DiscoveryError(f"Host {exc}") from None
        entry = config.lookup(name)
        hostname = str(entry.get("hostname", name))
        port = str(entry.get("port", ""))
        user = entry.get("user")
        found.append(
            DiscoveredHost(
                name=name,
                address=None if hostname == name else hostname,
                port=int(port) if port.isdigit() else None,
                user=str(user) if user else None,
            )
        )
    return found


def read_text(path: str) -> str:
    """A config file's text (at most 4 MiB, UTF-8), or DiscoveryError naming the file."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_BYTES + 1)
    except OSError as exc:
        raise DiscoveryError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_BYTES:
        raise DiscoveryError(f"{path}: larger than {MAX_BYTES // (1024 * 1024)} MiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DiscoveryError(f"{path}: not UTF-8 text (byte {exc.start})") from None


def include_reader(base: str) -> IncludeReader:
    """Reads Include patterns as OpenSSH does: ``~`` expanded, relative ones under ``base`` (~/.ssh)."""

    def read(pattern: str) -> list[tuple[str, str]]:
        full = os.path.expanduser(pattern)
        if not os.path.isabs(full):
            full = os.path.join(base, full)
        return [(path, read_text(path)) for path in sorted(glob.glob(full))]

    return read


class SshConfigSource:
    """The ``ssh_config`` source: the file re-read every ``refresh``."""

    def __init__(self, spec: DiscoverySource) -> None:
        self.spec = spec
        self.path = spec.path or os.path.expanduser("~/.ssh/config")
        self.include_base = str(Path("~/.ssh").expanduser())  # where relative Include paths are, as for ssh

    def fetch(self) -> tuple[DiscoveredHost, ...]:
        text = read_text(self.path)
        try:
            full = expand_includes(text, include_reader(self.include_base))
            return tuple(hosts_in_ssh_config(full, self.spec.pattern or "*"))
        except DiscoveryError as exc:
            raise DiscoveryError(f"{self.path}: {exc}") from None

    def wait(self, stop: threading.Event, ok: bool) -> None:
        wait_refresh(self.spec, stop, ok)

    def close(self) -> None:
        pass
