"""The rest of the host, as the probe's ``host``, ``df`` and ``disks`` sections print it.

This module owns reading those sections into a :class:`~gpuwatch.model.HostContext`: load
average, CPU count, memory and swap, uptime and boot time, kernel (one ``awk`` over /proc), and
the disks that matter: the configured paths (``host_context.disks``) and every local mount over
:data:`FULL_PERCENT` (``df -P -k -T``). Pure functions over text returning ``(records, issues)``;
nothing runs at import time.

What a host prints is data: a mount point can be named by a user (a USB stick's label under
/media), and an old ``df`` prints a line break in it raw, which would start a forged line. The
probe's awk says when any mount point holds a line break (``mount-with-newline``, from the
escaped /proc/self/mountinfo); the disk listing of that poll is then not used, with a warning, so
no name can invent a full disk. A mount point listed twice is dropped (one of the lines is not
df's own).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .config import HostContextConfig
from .model import Disk, HostContext, HostErrorKind, HostIssue
from .parse import excerpt

__all__ = [
    "DEFAULT_DISKS",
    "EXCLUDED_FS_TYPES",
    "FULL_PERCENT",
    "HostReadings",
    "parse_df",
    "parse_disk_paths",
    "parse_host",
    "pick_disks",
]

DEFAULT_DISKS: tuple[str, ...] = HostContextConfig.disks
"""The paths whose filesystems are always shown (``host_context.disks`` replaces them)."""
FULL_PERCENT = HostContextConfig.full_percent
"""A local mount at least this full is shown even when it is not configured."""
EXCLUDED_FS_TYPES = frozenset(
    {"squashfs", "iso9660", "udf", "erofs", "cramfs", "overlay", "devtmpfs", "fuse.snapfuse", "nsfs"}
)
"""Filesystems never listed as "full": read-only images (snaps, CDs) are always 100 % full, and a
container's overlay root mirrors the disk under /var/lib/docker, which is listed itself."""

_MAX_KIB = 2**60  # an exabyte: above any filesystem; larger numbers are no reading
_MAX_DISKS = 64  # a host with more full mounts than this is listed by its first ones
_TEXT = 512


@dataclass(frozen=True)
class HostReadings:
    """What the ``host`` section held (before the disks and the driver are added)."""

    load: tuple[float, float, float] | None = None
    cpus: int | None = None
    memory: dict[str, int] | None = None  # MemTotal, MemAvailable, SwapTotal, SwapFree (KiB)
    uptime_seconds: float | None = None
    boot_time: int | None = None
    kernel: str | None = None
    mount_with_newline: bool = False

    def context(self) -> HostContext:
        mem = self.memory or {}
        load = self.load or (None, None, None)
        return HostContext(
            load_1m=load[0],
            load_5m=load[1],
            load_15m=load[2],
            cpus=self.cpus,
            memory_total_kib=mem.get("MemTotal"),
            memory_available_kib=mem.get("MemAvailable"),
            swap_total_kib=mem.get("SwapTotal"),
            swap_free_kib=mem.get("SwapFree"),
            uptime_seconds=self.uptime_seconds,
            boot_time=self.boot_time,
            kernel=self.kernel,
        )


_DECIMAL_RE = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def _number(text: str, high: float) -> float | None:
    if len(text) > 24 or not _DECIMAL_RE.fullmatch(text):
        return None
    value = float(text)
    return value if math.isfinite(value) and 0 <= value <= high else None


def _integer(text: str, high: int) -> int | None:
    if len(text) > 20 or not text.isascii() or not text.isdigit():
        return None
    value = int(text)
    return value if value <= high else None


def parse_host(text: str) -> tuple[HostReadings, list[HostIssue]]:
    """The ``host`` section: ``key values`` lines from the probe's awk over /proc.

    A key seen twice, or a value that is no number in its range, is unknown (with a warning):
    these files are the kernel's, so either means the output was damaged.
    """
    fields, memory, newline_mount, issues = _host_lines(text)

    def one(key: str, count: int) -> list[str] | None:
        values = fields.get(key)
        if values is None:
            return None
        if len(values) != count:
            issues.append(_issue(f"the host reading {key} is not {count} value(s): {excerpt(' '.join(values))}"))
            return None
        return values

    load: tuple[float, float, float] | None = None
    if (values := one("loadavg", 3)) is not None:
        numbers = [_number(v, 1e6) for v in values]
        if all(n is not None for n in numbers):
            load = (numbers[0], numbers[1], numbers[2])  # type: ignore[assignment]
        else:
            issues.append(_issue(f"the load average is not three numbers: {excerpt(' '.join(values))}"))
    uptime = None
    if (values := one("uptime", 1)) is not None:
        uptime = _number(values[0], 100 * 366 * 86_400)
        if uptime is None:
            issues.append(_issue(f"the uptime is not a number of seconds: {excerpt(values[0])}"))
    boot = None
    if (values := one("btime", 1)) is not None:
        boot = _integer(values[0], 2**40)
        if boot is None:
            issues.append(_issue(f"the boot time is not a time: {excerpt(values[0])}"))
    cpus = None
    if (values := one("cpus", 1)) is not None:
        cpus = _integer(values[0], 1 << 20)
        if not cpus:
            cpus = None
            issues.append(_issue(f"the CPU count is not a count: {excerpt(values[0])}"))
    kernel = None
    if (values := one("kernel", 1)) is not None:
        kernel = values[0][:_TEXT] if values[0].isprintable() else excerpt(values[0])
    if memory.get("MemAvailable") is not None and memory.get("MemTotal") is not None:
        if memory["MemAvailable"] > memory["MemTotal"]:
            issues.append(_issue("MemAvailable is more than MemTotal; memory taken as unknown"))
            memory.pop("MemAvailable")
            memory.pop("MemTotal")
    readings = HostReadings(
        load=load,
        cpus=cpus,
        memory=memory or None,
        uptime_seconds=uptime,
        boot_time=boot,
        kernel=kernel,
        mount_with_newline=newline_mount,
    )
    return readings, issues


def _host_lines(text: str) -> tuple[dict[str, list[str]], dict[str, int], bool, list[HostIssue]]:
    """The ``host`` section's lines by key: {key: values}, the memory readings (KiB), whether a
    mount point holds a line break, and warnings for keys seen twice (dropped) and unknown lines."""
    fields: dict[str, list[str]] = {}
    memory: dict[str, int] = {}
    twice: set[str] = set()
    bad: list[str] = []
    newline_mount = False
    for raw in text.split("\n"):
        parts = raw.split()
        if not parts:
            continue
        key = parts[0]
        if key == "mount-with-newline" and len(parts) == 1:
            newline_mount = True
            continue
        if key == "mem" and len(parts) == 3 and parts[1].endswith(":"):
            name = parts[1][:-1]
            value = _integer(parts[2], _MAX_KIB)
            if name not in ("MemTotal", "MemAvailable", "SwapTotal", "SwapFree") or value is None:
                bad.append(raw)
            elif name in memory:
                twice.add(name)
            else:
                memory[name] = value
            continue
        if key not in ("loadavg", "uptime", "btime", "cpus", "kernel"):
            bad.append(raw)
            continue
        if key in fields:
            twice.add(key)
        fields[key] = parts[1:]
    issues: list[HostIssue] = []
    for key in sorted(twice):
        fields.pop(key, None)
        memory.pop(key, None)
    if twice:
        issues.append(_issue(f"the host readings listed {', '.join(sorted(twice))} twice; taken as unknown"))
    if bad:
        issues.append(_issue(f"the host readings hold a line gpuwatch does not know: {excerpt(bad[0])}"))
    return fields, memory, newline_mount, issues


def _issue(message: str) -> HostIssue:
    return HostIssue(HostErrorKind.UNPARSEABLE, message)


_DF_HEADER = re.compile(r"^Filesystem\s+Type\s+1024-blocks\s+Used\s+Available\s+Capacity\s+Mounted on\s*$")


def _df_line(line: str) -> Disk | None:
    """One data line of ``df -P -k -T``: device, type, size, used, available, capacity, mount."""
    parts = line.split(None, 6)
    if len(parts) != 7:
        return None
    _device, fs_type, size, used, available, capacity, mount = parts
    numbers = [_integer(v, _MAX_KIB) for v in (size, used, available)]
    percent = _integer(capacity[:-1], 100) if capacity.endswith("%") else None
    if any(n is None for n in numbers) or percent is None:
        if capacity == "-" and all(n is not None for n in numbers):
            percent = 0  # a filesystem with no blocks (df prints "-")
        else:
            return None
    mount = mount.rstrip()
    if not mount.startswith("/") or not mount.isprintable() or len(mount) > 4096:
        return None
    size_kib, used_kib, available_kib = (int(n) for n in numbers)  # type: ignore[arg-type]
    return Disk(
        mount=mount,
        fs_type=fs_type if fs_type.isprintable() else None,
        size_kib=size_kib,
        used_kib=used_kib,
        available_kib=available_kib,
        use_percent=percent,
    )


def parse_df(text: str) -> tuple[list[Disk], list[HostIssue]]:
    """The ``df`` section (``df -P -k -T -l``, every local filesystem): one :class:`Disk` per
    mount point. A mount point listed twice is dropped (one of its lines is not df's), a line that
    is no filesystem is skipped, both with a warning."""
    disks: dict[str, Disk] = {}
    twice: set[str] = set()
    bad: list[str] = []
    for line in text.split("\n"):
        if not line.strip() or _DF_HEADER.match(line) or line.startswith("df: "):
            continue  # df's own complaints about a mount it may not read (a user's FUSE mount)
        disk = _df_line(line)
        if disk is None:
            bad.append(line)
            continue
        if disk.mount in disks or disk.mount in twice:
            twice.add(disk.mount)
            disks.pop(disk.mount, None)
            continue
        disks[disk.mount] = disk
    issues = []
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        issues.append(_issue(f"df printed a line that is no filesystem: {excerpt(bad[0])}{more}"))
    if twice:
        shown = ", ".join(excerpt(m, 40) for m in sorted(twice)[:3])
        issues.append(_issue(f"df listed the mount point {shown} twice; its use is unknown"))
    return list(disks.values()), issues


def parse_disk_paths(text: str) -> tuple[dict[str, Disk], list[HostIssue]]:
    """The ``disks`` section: for each configured path a ``path <path>`` line, then what
    ``df -P -k -T <path>`` printed (its header and one line). A path that does not exist on the
    host is left out silently (``/home`` is often not there); one df could not read is a warning."""
    found: dict[str, Disk] = {}
    issues: list[HostIssue] = []
    path: str | None = None
    lines: list[str] = []

    def close() -> None:
        if path is None:
            return
        data = [line for line in lines if line.strip() and not _DF_HEADER.match(line)]
        disks = [d for d in (_df_line(line) for line in data) if d is not None]
        if len(disks) == 1 and len(data) == 1:
            found[path] = disks[0]
        elif data and not any("No such file or directory" in line for line in data):
            issues.append(_issue(f"df {excerpt(path, 60)}: {excerpt(data[0])}"))

    for line in text.split("\n"):
        if line.startswith("path "):
            close()
            path, lines = line[5:], []
        else:
            lines.append(line)
    close()
    return found, issues


def pick_disks(
    listed: Sequence[Disk],
    by_path: dict[str, Disk],
    configured: Sequence[str],
    full_percent: int = FULL_PERCENT,
) -> tuple[Disk, ...]:
    """The disks that matter: the filesystems of the configured paths, in their order (each with
    the paths on it), then every other local mount at least ``full_percent`` full."""
    picked: dict[str, Disk] = {}
    paths: dict[str, list[str]] = {}
    for path in configured:
        disk = by_path.get(path)
        if disk is None:
            continue
        picked.setdefault(disk.mount, disk)
        paths.setdefault(disk.mount, []).append(path)
    for disk in listed:
        if disk.mount in picked or disk.fs_type in EXCLUDED_FS_TYPES:
            continue
        if disk.use_percent >= full_percent and len(picked) < _MAX_DISKS:
            picked[disk.mount] = disk
    return tuple(
        Disk(
            mount=d.mount,
            fs_type=d.fs_type,
            size_kib=d.size_kib,
            used_kib=d.used_kib,
            available_kib=d.available_kib,
            use_percent=d.use_percent,
            paths=tuple(paths.get(d.mount, ())),
        )
        for d in picked.values()
    )
