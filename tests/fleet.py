"""A real fleet of SSH "GPU hosts" on loopback, for tests: OpenSSH sshd + a replaying nvidia-smi.

What this module owns
---------------------
* :class:`Fleet` starts real OpenSSH ``sshd -D -e -f <tmp>/sshd-N.config`` processes (as root) that listen
  on 127.0.0.2, 127.0.0.3, ... (one address per host) on one shared free port.  OpenSSH accepts at most 16
  ``ListenAddress`` per process, so N hosts use ceil(N/16) sshd processes.  Host keys, the monitor's
  client key, the authorized_keys file, configs, logs (``sshd-N.log``, LogLevel VERBOSE; quoted in every
  start-up error, see :meth:`Fleet.logs`) and scenarios live in a fresh temp dir (0755 so the monitor
  user can read scenarios), removed at :meth:`Fleet.stop` (kept with ``GPUWATCH_FLEET_KEEP=1``).
  :meth:`Fleet.stop` kills every sshd with its connections and sessions, leaves first.  Each sshd runs
  under a tiny reaper (a child subreaper, so no ``[sshd] <defunct>`` outlives a test) that gets SIGTERM
  if the test process dies; the job processes exit by themselves then too.
* Users (created with ``useradd -m`` when missing, kept afterwards): the login user ``gpuwatch-mon``
  (password :data:`MONITOR_PASSWORD`, locked again by the last running fleet at stop; plus a per-fleet
  ed25519 key) and the GPU job owners ``alice`` and ``verylongusername`` (longer than 8 characters, which
  is what breaks ``ps -o user``); :data:`DIRECTORY_USERS` (``john doe``, ``josé``, ``josè``: names a
  directory may give, made with ``useradd --badname``) when a test asks :func:`ensure_user` for them.
  Each job owner runs one real long-lived process (``fleet.jobs``,
  ``fleet.job_pids``); it also exits by itself if the test process dies.
* Sessions get ``PATH=<fleet bin>:/usr/local/bin:/usr/bin:/bin`` and ``GPUWATCH_STANDIN_DIR=<scenarios>``
  through sshd_config ``SetEnv`` (verified by tests/test_fleet_harness.py: SetEnv overrides sshd's default
  PATH for non-interactive ``ssh host sh -s`` sessions).  ``<fleet bin>`` holds a copy of
  tests/standin/nvidia-smi, so the stand-in runs even when the checkout is not readable by other users.
* ``<fleet bin>`` also holds tests/standin/docker and tests/standin/crictl, which replay real ``docker
  inspect`` / ``crictl inspect`` captures from a scenario's ``docker-inspect.json`` / ``crictl-status.json``.
  Sessions get ``DOCKER_HOST`` and ``CONTAINER_RUNTIME_ENDPOINT`` pointing into ``fleet.runtime_dir``
  (empty: no runtime the monitor may ask), where a test puts a socket file writable by the monitor user.
* The stand-in chooses a host's scenario by the server address in ``$SSH_CONNECTION``:
  ``<scenarios>/<address>/``; ``<scenarios>/local/`` when run without SSH (see :func:`standin_env`).

Scenarios
---------
A scenario is a directory of small files (documented in tests/standin/nvidia-smi).  Build one with the
``scenario_*`` functions below, e.g. ``scenario_error(fleet.scenario_dir("127.0.0.3"), ERR_GPU_LOST)``.
``scenario_stream`` makes nvidia-smi print without end (a streaming nvidia-smi, on every call or for one
query kind).  The stand-in reads the scenario on every call, so a test may rewrite a host's scenario
between polls.
Builders publish a scenario atomically (a fresh directory behind a symlink), so a poll in flight sees
either the old or the new scenario, never half of one.  Captures come byte for byte from
tests/fixtures/standin/ (copied from the shared nvidia-smi corpus; see SOURCES.tsv there).  Multi-GPU
scenarios stack real rows and rewrite exactly the cells named in the scenario's ``SOURCES`` file.

Hosts that behave differently
-----------------------------
* :meth:`Fleet.add_host` starts an extra sshd for one more address (same port) with its own host key
  (fresh by default, or a given :class:`HostKey`); :meth:`Fleet.remove_host` kills it and all its
  connections (a host that goes down: the connections drop before any command of theirs ends).
  "Host key changed": write a known_hosts entry for that address with the fleet's key
  (:meth:`Fleet.known_hosts_text`) and serve it with another key, or remove the host and add it back
  with ``host_key=fleet.new_host_key()``.
* :meth:`Fleet.refused_address` is an address in 127/8 where nothing listens on the fleet port.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import ipaddress
import logging
import math
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

logger = logging.getLogger(__name__)

TESTS_DIR = Path(__file__).resolve().parent
STANDIN_BIN_DIR = TESTS_DIR / "standin"
STANDIN_EXE = STANDIN_BIN_DIR / "nvidia-smi"
CAPTURES = TESTS_DIR / "fixtures" / "standin"

MONITOR_USER = "gpuwatch-mon"
# Fixed on purpose: concurrent test sessions on one machine share the user; a random password per fleet
# would let one session break another's password logins.  The last fleet to stop locks it again.
MONITOR_PASSWORD = "gpuwatch-mon-loopback-test-only"
JOB_OWNERS = ("alice", "verylongusername")
SSHD_MAX_LISTEN = 16  # OpenSSH MAX_LISTEN_SOCKS
SESSION_PATH_TAIL = "/usr/local/bin:/usr/bin:/bin"
_REGISTRY = Path("/run/gpuwatch-fleet")

# --- captures (relative to CAPTURES) ---------------------------------------------------------------
H100_LOAD_QUERY = "csv-query-gpu/nvgpuexp-h100-80gb-hbm3-linux-590.48.01-load-query-gpu-all-fields.csv"
H100_IDLE_QUERY = "csv-query-gpu/nvgpuexp-h100-80gb-hbm3-linux-590.48.01-idle-query-gpu-all-fields.csv"
H100_LOAD_APPS = "csv-compute-apps/nvgpuexp-h100-80gb-hbm3-linux-590.48.01-load-compute-apps.csv"
H100_LOAD_TABLE = "table/nvgpuexp-h100-80gb-hbm3-linux-590.48.01-load-default-table.txt"
MIG_QUERY = "csv-query-gpu/nvgpuexp-h100-mig-linux-590.48.01-load-query-gpu-all-fields.csv"
MIG_APPS = "csv-compute-apps/nvgpuexp-h100-mig-linux-590.48.01-load-compute-apps.csv"
MIG_TABLE = "table/nvgpuexp-h100-mig-linux-590.48.01-load-default-table.txt"
APPS_HEADER_ONLY = "csv-compute-apps/nvgpuexp-h100-mig-linux-590.48.01-idle-compute-apps-header-only.csv"
L40S_QUERY = "csv-query-gpu/nvgpuexp-l40s-linux-595.80-load-query-gpu-all-fields.csv"
L40S_APPS = "csv-compute-apps/nvgpuexp-l40s-linux-595.80-load-compute-apps.csv"
L40S_TABLE = "table/nvgpuexp-l40s-linux-595.80-load-default-table.txt"

H100_HELP_QUERY_GPU = "other/nvgpuexp-h100-80gb-hbm3-linux-590.48.01-help-query-gpu.txt"
H100_VERSION = "other/nvgpuexp-h100-80gb-hbm3-linux-590.48.01-version.txt"
MIG_HELP_QUERY_GPU = "other/nvgpuexp-h100-mig-linux-590.48.01-help-query-gpu.txt"
MIG_VERSION = "other/nvgpuexp-h100-mig-linux-590.48.01-version.txt"
L40S_HELP_QUERY_GPU = "other/nvgpuexp-l40s-linux-595.80-help-query-gpu.txt"
L40S_VERSION = "other/nvgpuexp-l40s-linux-595.80-version.txt"

ERR_NO_DRIVER = "errors/issue-couldnt-communicate-with-driver.txt"
ERR_GPU_LOST = "errors/issue-device-handle-gpu-is-lost.txt"
ERR_UNKNOWN_SPACE = "errors/issue-device-handle-unknown-error-space.txt"
ERR_UNKNOWN_NOSPACE = "errors/issue-device-handle-unknown-error-nospace.txt"
ERR_NO_DEVICES = "errors/issue-no-devices-were-found.txt"
ERR_VERSION_MISMATCH = "errors/issue-nvml-driver-library-version-mismatch.txt"
ERR_VERSION_MISMATCH_NVML = "errors/issue-nvml-driver-library-version-mismatch-with-nvml-version.txt"
ERR_NVML_UNKNOWN = "errors/issue-nvml-unknown-error-in-container.txt"

# Exit status per error capture, from FIELD_NOTES (4 no permission, 6 query failed, 9 driver not
# loaded, 12 NVML not found, 14 infoROM, 15 GPU fallen off the bus, 255 other).
ERROR_EXIT_CODES: dict[str, int] = {
    ERR_NO_DRIVER: 9,
    ERR_GPU_LOST: 15,
    ERR_UNKNOWN_SPACE: 255,
    ERR_UNKNOWN_NOSPACE: 255,
    ERR_NO_DEVICES: 6,
    ERR_VERSION_MISMATCH: 255,
    ERR_VERSION_MISMATCH_NVML: 255,
    ERR_NVML_UNKNOWN: 255,
}

# Bus ids of a real 8x H100 box (table/gpud-h100-80gb-x8-550.90.07-default-table.txt), used for the
# stacked rows of multi-GPU scenarios; GPUs 8..39 get 00000000:E0:00.0 .. 00000000:FF:00.0.
H100_X8_BUS_IDS = (
    "00000000:19:00.0",
    "00000000:3B:00.0",
    "00000000:4C:00.0",
    "00000000:5D:00.0",
    "00000000:9B:00.0",
    "00000000:BB:00.0",
    "00000000:CB:00.0",
    "00000000:DB:00.0",
)


class FleetError(RuntimeError):
    """The fleet could not be started or driven; the message carries the sshd log where useful."""


class FleetUnavailable(FleetError):
    """This machine cannot run a fleet (not root, no sshd, ...): tests should skip, not fail."""


def fleet_unavailable_reason() -> str | None:
    """Why a fleet cannot run here, or None when it can."""
    if not sys.platform.startswith("linux"):
        return "the SSH fleet needs Linux"
    if os.geteuid() != 0:
        return "the SSH fleet needs root (it runs sshd and creates local users)"
    if _sshd_path() is None:
        return "OpenSSH sshd not found (install openssh-server)"
    for tool in ("ssh-keygen", "useradd", "chpasswd", "usermod"):
        if shutil.which(tool, path=_tool_path()) is None:
            return f"{tool} not found"
    return None


def _tool_path() -> str:
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin", "/bin"])


def _sshd_path() -> str | None:
    found = shutil.which("sshd", path=_tool_path())
    return os.path.abspath(found) if found else None  # sshd re-exec needs an absolute path


def _run(argv: Sequence[str], *, input_text: str | None = None, retries: int = 0) -> None:
    """Run an admin command; retry (lock contention on /etc/passwd etc.) and raise with its output."""
    for attempt in range(retries + 1):
        done = subprocess.run(argv, input=input_text, capture_output=True, text=True, check=False)
        if done.returncode == 0:
            return
        if attempt < retries:
            time.sleep(0.1 * (attempt + 1))
    raise FleetError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")


DIRECTORY_USERS = ("john doe", "jos\u00e9", "jos\u00e8")
"""Users named as a directory (AD/LDAP) may name them: a blank inside, letters beyond ASCII (which
``ps`` prints as ``?`` under ``LC_ALL=C``, so the last two would look alike). Created by
:func:`ensure_user` (``useradd --badname``) for the tests that need them; no fleet runs their jobs."""


def ensure_user(name: str) -> pwd.struct_passwd:
    """Create local user ``name`` (home dir, /bin/sh) unless it exists; idempotent and race tolerant.
    A name useradd calls bad (a blank, a letter beyond ASCII: see :data:`DIRECTORY_USERS`) is created
    with ``--badname``."""
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(name)
    plain = name.isascii() and name.replace("-", "").replace("_", "").replace(".", "").isalnum()
    argv = ["useradd", "-m", "-s", "/bin/sh", *([] if plain else ["--badname"]), name]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise FleetError(f"useradd {name} failed ({done.returncode}): {done.stderr.strip()}") from None


# --- scenarios ---------------------------------------------------------------------------------------


def capture_bytes(relative: str) -> bytes:
    """Bytes of a capture under tests/fixtures/standin (e.g. ``ERR_GPU_LOST``)."""
    path = CAPTURES / relative
    if not path.is_file():
        raise FleetError(f"no capture {relative} in {CAPTURES}")
    return path.read_bytes()


def _split_capture(relative: str, free: str | None = None) -> tuple[list[str], list[list[str]]]:
    """Header cells and rows of an (unquoted) nvidia-smi CSV capture.

    Rows must have as many ``", "``-separated cells as the header, except that column ``free``
    (``process_name``) may itself contain ``", "``: the fixed cells are then taken from both ends.
    """
    lines = capture_bytes(relative).decode().splitlines()
    header = lines[0].split(", ")
    names = [cell.split(" [", 1)[0] for cell in header]
    free_col = names.index(free) if free in names else None
    rows = []
    for line in filter(None, lines[1:]):
        cells = line.split(", ")
        if len(cells) > len(header) and free_col is not None:
            tail = len(header) - free_col - 1
            middle = ", ".join(cells[free_col : len(cells) - tail])
            cells = [*cells[:free_col], middle, *cells[len(cells) - tail :]]
        if len(cells) != len(header):
            raise FleetError(f"{relative}: row has {len(cells)} cells, header {len(header)}")
        rows.append(cells)
    return header, rows


def _column(header: Sequence[str], name: str) -> int:
    names = [cell.split(" [", 1)[0] for cell in header]
    return names.index(name)


def capture_pids(relative: str) -> list[int]:
    """PIDs in a compute-apps capture, in row order."""
    header, rows = _split_capture(relative, free="process_name")
    col = _column(header, "pid")
    return [int(row[col]) for row in rows]


def _uuid_prefix(directory: Path) -> str:
    """First UUID group for a host's GPUs: the IPv4 address in hex, so GPU UUIDs differ across hosts."""
    try:
        return f"{int(ipaddress.IPv4Address(directory.name)):08x}"
    except ValueError:
        return f"{uuid.uuid5(uuid.NAMESPACE_URL, directory.name).int & 0xFFFFFFFF:08x}"


def gpu_uuid(directory: Path, index: int) -> str:
    """UUID given to GPU ``index`` of the scenario at ``directory`` (the captures' UUIDs are masked)."""
    return f"GPU-{_uuid_prefix(directory)}-0000-0000-0000-{index:012x}"


def gpu_bus_id(index: int) -> str:
    """PCI bus id given to GPU ``index`` of a stacked scenario."""
    if index < len(H100_X8_BUS_IDS):
        return H100_X8_BUS_IDS[index]
    if index < len(H100_X8_BUS_IDS) + 32:
        return f"00000000:{0xE0 + index - len(H100_X8_BUS_IDS):02X}:00.0"
    raise ValueError(f"no bus id for GPU {index}: at most 40 GPUs per scenario")


def publish_scenario(directory: Path, files: Mapping[str, bytes | str]) -> Path:
    """Make ``directory`` hold exactly ``files``.

    When ``directory`` is a symlink or absent, a fresh sibling directory is filled and the symlink swapped
    atomically (old versions stay until the fleet's temp dir is removed).  A real directory is rewritten
    in place.  Everything is made readable for the monitor user.
    """
    directory = Path(directory)
    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    if directory.is_dir() and not directory.is_symlink():
        for child in directory.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        target = directory
    else:
        versions = parent / ".versions"
        versions.mkdir(exist_ok=True)
        os.chmod(versions, 0o755)
        target = Path(tempfile.mkdtemp(prefix=f"{directory.name}-", dir=versions))
    os.chmod(target, 0o755)
    for name, content in files.items():
        data = content.encode() if isinstance(content, str) else content
        path = target / name
        path.write_bytes(data)
        os.chmod(path, 0o644)
    if target != directory:
        link = parent / f".{directory.name}.{uuid.uuid4().hex}"
        link.symlink_to(os.path.relpath(target, parent))
        os.replace(link, directory)
    return directory


def _pids_file(owners_pids: Mapping[int, int] | None) -> dict[str, str]:
    if not owners_pids:
        return {}
    return {"pids": "".join(f"{cap} {real}\n" for cap, real in owners_pids.items())}


def _stack_gpus(
    directory: Path, gpu_rows: Sequence[tuple[str, int]], apps: Sequence[tuple[str, int]]
) -> tuple[str, str, str]:
    """query-gpu.csv, compute-apps.csv and SOURCES text for GPUs stacked from capture rows.

    ``gpu_rows``: (capture, row number) per GPU, in GPU index order.  ``apps``: (compute-apps capture,
    GPU index) whose rows run on that GPU.  Rewritten cells: query-gpu ``index``, ``uuid``,
    ``pci.bus_id``, ``count``; compute-apps ``gpu_uuid`` and ``gpu_bus_id``.
    """
    header: list[str] | None = None
    out_rows: list[str] = []
    n = len(gpu_rows)
    for index, (capture, row_no) in enumerate(gpu_rows):
        cap_header, rows = _split_capture(capture)
        if header is None:
            header = cap_header
        elif cap_header != header:
            raise FleetError(f"{capture}: header differs from {gpu_rows[0][0]}; cannot stack")
        row = list(rows[row_no])
        row[_column(header, "index")] = str(index)
        row[_column(header, "uuid")] = gpu_uuid(directory, index)
        row[_column(header, "pci.bus_id")] = gpu_bus_id(index)
        row[_column(header, "count")] = str(n)
        out_rows.append(", ".join(row))
    assert header is not None
    query = ", ".join(header) + "\n" + "".join(r + "\n" for r in out_rows)

    apps_header, _ = _split_capture(APPS_HEADER_ONLY)
    app_lines: list[str] = []
    for capture, gpu in apps:
        cap_header, rows = _split_capture(capture, free="process_name")
        apps_header = cap_header
        for row in rows:
            row = list(row)
            row[_column(cap_header, "gpu_uuid")] = gpu_uuid(directory, gpu)
            row[_column(cap_header, "gpu_bus_id")] = gpu_bus_id(gpu)
            app_lines.append(", ".join(row))
    compute_apps = ", ".join(apps_header) + "\n" + "".join(r + "\n" for r in app_lines)

    sources = ["Built by tests/fleet.py from captures in tests/fixtures/standin (see SOURCES.tsv there)."]
    for index, (capture, row_no) in enumerate(gpu_rows):
        sources.append(f"query-gpu.csv GPU {index}: {capture} row {row_no + 1}")
    for capture, gpu in apps:
        sources.append(f"compute-apps.csv rows on GPU {gpu}: {capture}")
    if not apps:
        sources.append(f"compute-apps.csv: header of {APPS_HEADER_ONLY}")
    sources.append(
        "REWRITTEN cells (the captures' UUIDs were masked to one zero UUID): query-gpu index, uuid, "
        "pci.bus_id and count; compute-apps gpu_uuid and gpu_bus_id (to point at the scenario's GPU). "
        "Bus ids are those of a real 8x H100 box (table/gpud-h100-80gb-x8-550.90.07-default-table.txt). "
        "Every other byte is as captured; a 'pids' file, if any, remaps pids at replay time."
    )
    return query, compute_apps, "\n".join(sources) + "\n"


def scenario_healthy_multi_gpu(
    directory: Path,
    n_gpus: int = 4,
    *,
    busy_gpus: Sequence[int] = (0,),
    owners_pids: Mapping[int, int] | None = None,
) -> Path:
    """A healthy H100 box: GPUs in ``busy_gpus`` replay the H100 *load* capture (100 %, 19818 MiB) and
    run the 3 processes of the H100 compute-apps capture (pids 11327, 11328 memhog; 11345 gpu_burn; the
    same pids on every busy GPU), the others replay the H100 *idle* capture (0 %, 0 MiB).

    ``owners_pids`` maps captured pids to real pids (see :meth:`Fleet.default_owner_map`).  A single-GPU
    scenario also answers plain ``nvidia-smi`` with the matching table capture.
    """
    if n_gpus < 1:
        raise ValueError("n_gpus must be >= 1")
    bad = [g for g in busy_gpus if not 0 <= g < n_gpus]
    if bad:
        raise ValueError(f"busy_gpus {bad} outside 0..{n_gpus - 1}")
    rows = [((H100_LOAD_QUERY if i in busy_gpus else H100_IDLE_QUERY), 0) for i in range(n_gpus)]
    apps = [(H100_LOAD_APPS, g) for g in sorted(set(busy_gpus))]
    query, compute_apps, sources = _stack_gpus(Path(directory), rows, apps)
    files: dict[str, bytes | str] = {
        "query-gpu.csv": query,
        "compute-apps.csv": compute_apps,
        "help-query-gpu.txt": capture_bytes(H100_HELP_QUERY_GPU),
        "version.txt": capture_bytes(H100_VERSION),
        "SOURCES": sources + f"help-query-gpu.txt: {H100_HELP_QUERY_GPU}; version.txt: {H100_VERSION}\n",
        **_pids_file(owners_pids),
    }
    if n_gpus == 1 and list(busy_gpus) == [0]:
        files["table.txt"] = capture_bytes(H100_LOAD_TABLE)
    return publish_scenario(Path(directory), files)


def scenario_idle(directory: Path, n_gpus: int = 4) -> Path:
    """All GPUs idle (H100 idle capture), no compute processes (header-only compute-apps capture)."""
    return scenario_healthy_multi_gpu(directory, n_gpus, busy_gpus=())


def scenario_mig(directory: Path, *, owners_pids: Mapping[int, int] | None = None) -> Path:
    """One H100 in MIG mode under load: utilization ``[N/A]``; 3 processes (pids 21180, 21181, 21198)
    reported on the parent GPU's UUID, as nvidia-smi does in MIG mode."""
    query, apps, sources = _stack_gpus(Path(directory), [(MIG_QUERY, 0)], [(MIG_APPS, 0)])
    files: dict[str, bytes | str] = {
        "query-gpu.csv": query,
        "compute-apps.csv": apps,
        "table.txt": capture_bytes(MIG_TABLE),
        "help-query-gpu.txt": capture_bytes(MIG_HELP_QUERY_GPU),
        "version.txt": capture_bytes(MIG_VERSION),
        "SOURCES": sources,
        **_pids_file(owners_pids),
    }
    return publish_scenario(Path(directory), files)


def scenario_l40s(directory: Path, *, owners_pids: Mapping[int, int] | None = None) -> Path:
    """One L40S under load (9 %, 1235 MiB; two ffmpeg processes, pids 20037 and 20038)."""
    query, apps, sources = _stack_gpus(Path(directory), [(L40S_QUERY, 0)], [(L40S_APPS, 0)])
    files: dict[str, bytes | str] = {
        "query-gpu.csv": query,
        "compute-apps.csv": apps,
        "table.txt": capture_bytes(L40S_TABLE),
        "help-query-gpu.txt": capture_bytes(L40S_HELP_QUERY_GPU),
        "version.txt": capture_bytes(L40S_VERSION),
        "SOURCES": sources,
        **_pids_file(owners_pids),
    }
    return publish_scenario(Path(directory), files)


def scenario_error(directory: Path, corpus_error_file: str, exit_code: int | None = None) -> Path:
    """Every call prints the error capture (e.g. ``ERR_NO_DRIVER``) and exits with ``exit_code``
    (default: :data:`ERROR_EXIT_CODES`, else 255)."""
    relative = corpus_error_file if "/" in corpus_error_file else f"errors/{corpus_error_file}"
    code = exit_code if exit_code is not None else ERROR_EXIT_CODES.get(relative, 255)
    return publish_scenario(
        Path(directory),
        {
            "error.txt": capture_bytes(relative),
            "exit_code": f"{code}\n",
            "SOURCES": f"error.txt: {relative} (byte for byte); exit_code {code} chosen per FIELD_NOTES\n",
        },
    )


def scenario_hang(directory: Path) -> Path:
    """Every call hangs (like nvidia-smi on a GPU that fell off the bus) until killed, e.g. by
    ``timeout``; it gives up by itself when the scenario is replaced or the fleet stops."""
    return publish_scenario(Path(directory), {"hang": "", "SOURCES": "hang: no output, never exits\n"})


def scenario_stream(
    directory: Path,
    data: bytes = b"y\n",
    *,
    on: str | None = None,
    base: Callable[[Path], object] = scenario_healthy_multi_gpu,
) -> Path:
    """``base(directory)``, except that nvidia-smi prints ``data`` again and again without end (a
    streaming nvidia-smi), on every call or only for query kind ``on`` (``query-gpu``,
    ``query-compute-apps``); it stops when killed, when its reader goes away, or when the scenario is
    replaced or the fleet stops."""
    directory = Path(directory)
    base(directory)
    resolved = directory.resolve()
    files = {p.name: p.read_bytes() for p in resolved.iterdir() if p.is_file()}
    files["stream"] = data
    if on is not None:
        files["stream-on"] = f"{on}\n".encode()
    return publish_scenario(directory, files)


def scenario_sleep(
    directory: Path,
    seconds: float,
    base: Callable[[Path], object] = scenario_healthy_multi_gpu,
) -> Path:
    """``base(directory)`` delayed by ``seconds`` on every call (a slow nvidia-smi; benchmark: 0.5)."""
    directory = Path(directory)
    base(directory)
    resolved = directory.resolve()
    files = {p.name: p.read_bytes() for p in resolved.iterdir() if p.is_file()}
    files["sleep"] = f"{seconds}\n".encode()
    return publish_scenario(directory, files)


def standin_env(standin_dir: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for running the stand-in without SSH (scenario ``<standin_dir>/local``)."""
    env = dict(os.environ if base is None else base)
    env.pop("SSH_CONNECTION", None)
    env["PATH"] = f"{STANDIN_BIN_DIR}{os.pathsep}{env.get('PATH', SESSION_PATH_TAIL)}"
    env["GPUWATCH_STANDIN_DIR"] = str(standin_dir)
    return env


# --- processes -------------------------------------------------------------------------------------


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, state) for every process."""
    table: dict[int, tuple[int, str]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as handle:
                stat = handle.read().decode(errors="replace")
        except OSError:
            continue
        rest = stat.rsplit(")", 1)[1].split()
        table[int(entry.name)] = (int(rest[1]), rest[0])
    return table


def _descendants(root: int, table: Mapping[int, tuple[int, str]]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: list[int] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _kill_tree(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """Stop ``proc`` and every descendant, leaves first, so that each is reaped by its live parent
    (sshd connection children call setsid, so a process group kill would miss them, and orphaned
    zombies may linger: this machine's init reaps slowly)."""
    start = time.monotonic()
    while (elapsed := time.monotonic() - start) < timeout:
        table = _proc_table()
        descendants = _descendants(proc.pid, table)
        if not descendants:
            break
        live = [p for p in descendants if table[p][1] != "Z"]
        if not live and elapsed > timeout / 2:
            break
        parents = {table[p][0] for p in descendants}  # a parent of a zombie is waiting to reap it
        if elapsed < timeout / 2:
            targets, sig = [p for p in live if p not in parents], signal.SIGTERM
        else:
            targets, sig = live, signal.SIGKILL
        for pid in targets:
            _signal(pid, sig)
        time.sleep(0.01)
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=max(1.0, timeout - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _is_sshd(pid: int) -> bool:
    """The listener or a connection's process (``sshd``, OpenSSH 9.8+ ``sshd-session``, ``sshd-auth``)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().startswith("sshd")
    except OSError:
        return False


def _cut_connections(root: int, timeout: float = 5.0) -> None:
    """SIGKILL the listening sshd under ``root`` (the reaper), so that no new connection is taken,
    then every other sshd process under it (each connection's), until none is left: each
    connection closes there and then, before any command of its session ends. The sessions'
    processes are orphaned to the reaper (a child subreaper) and ended by :func:`_kill_tree`."""
    deadline = time.monotonic() + timeout
    table = _proc_table()
    listeners = [p for p, (ppid, _) in table.items() if ppid == root and _is_sshd(p)]
    for pid in listeners:
        _signal(pid, signal.SIGKILL)
    while time.monotonic() < deadline and any(_proc_table().get(p, (0, "Z"))[1] != "Z" for p in listeners):
        time.sleep(0.005)  # a client reconnecting now is refused, never served by a dying sshd
    while time.monotonic() < deadline:
        table = _proc_table()
        found = [p for p in _descendants(root, table) if table[p][1] != "Z" and _is_sshd(p)]
        if not found:
            return
        for pid in reversed(found):  # the deepest first: the process holding the socket goes at once
            _signal(pid, signal.SIGKILL)
        time.sleep(0.01)


def _kill_by_environ(marker: bytes) -> list[int]:
    """Kill leftover processes whose environment contains ``marker`` (our sessions' orphans)."""
    killed = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as handle:
                env = handle.read()
        except OSError:
            continue
        if marker in env.split(b"\0"):
            _signal(int(entry.name), signal.SIGKILL)
            killed.append(int(entry.name))
    return killed


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> Callable[[], None] | None:
    """preexec_fn: SIGTERM the child when the test process dies (so a killed pytest leaks no sshd).

    Linux delivers it when the *thread* that forked exits, so it is only used from the main thread.
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


# sshd runs under this small reaper: a child subreaper that adopts and reaps at once the session
# processes sshd orphans (OpenSSH's privsep monitor may exit before reaping its child, and the init of
# some containers reaps orphans only every few seconds, leaving "[sshd] <defunct>" behind).  It passes
# SIGTERM on to sshd and exits with sshd's status once it has no children left.
_REAPER = """\
import ctypes, os, signal, sys
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGTERM))
code = 0
while True:
    try:
        done, status = os.waitpid(-1, 0)
    except ChildProcessError:
        break
    if done == pid:
        code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def _world_executable(path: str) -> bool:
    """True if ``path`` and all its parent directories allow others to execute/search."""
    p = Path(path).resolve()
    if not p.is_file() or not os.stat(p).st_mode & 0o001:
        return False
    return all(os.stat(parent).st_mode & 0o001 for parent in p.parents)


def _python_for_everyone() -> str | None:
    candidates = [shutil.which("python3", path=SESSION_PATH_TAIL), sys.executable]
    for candidate in candidates:
        if candidate and _world_executable(candidate):
            return candidate
    return None


# The job owners' processes: idle forever, but exit when the test process (their parent) goes away.
_JOB_SCRIPT = """\
import os, time
parent = os.getppid()
while os.getppid() == parent:
    time.sleep(0.5)
"""


@dataclass(frozen=True)
class Job:
    user: str
    pid: int
    argv: tuple[str, ...]


@dataclass(frozen=True)
class HostKey:
    """An ed25519 host key: ``private`` key file and ``public`` (``ssh-ed25519 AAAA...``)."""

    private: Path
    public: str

    @property
    def key_type(self) -> str:
        return self.public.split()[0]

    @property
    def base64(self) -> str:
        return self.public.split()[1]


@dataclass
class _Sshd:
    """One sshd process (``proc`` is its reaper wrapper, see ``_REAPER``)."""

    addresses: tuple[str, ...]
    config: Path
    log: Path
    proc: subprocess.Popen[bytes]
    host_key: HostKey


def _keygen(path: Path, comment: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _finish_keygen(proc: subprocess.Popen[bytes], path: Path) -> HostKey:
    out, _ = proc.communicate(timeout=30)
    if proc.returncode != 0:
        raise FleetError(f"ssh-keygen {path} failed: {out.decode(errors='replace')}")
    return HostKey(private=path, public=path.with_suffix(".pub").read_text().strip())


def _addresses(first: str, count: int) -> list[str]:
    out: list[str] = []
    current = ipaddress.IPv4Address(first)
    loopback = ipaddress.IPv4Network("127.0.0.0/8")
    while len(out) < count:
        if current not in loopback:
            raise FleetError(f"{count} hosts from {first} leave 127.0.0.0/8")
        if int(current) & 0xFF not in (0, 255):
            out.append(str(current))
        current += 1
    return out


def _port_free(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # as sshd binds: connections of a host just stopped may linger in TIME_WAIT
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, port))
        except OSError:
            return False
    return True


def _pick_port(addresses: Sequence[str]) -> int:
    for _ in range(20):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((addresses[0], 0))
            port = int(sock.getsockname()[1])
        if all(_port_free(a, port) for a in addresses):
            return port
    raise FleetError(f"no port free on all of {addresses[0]}..{addresses[-1]}")


def _read_pid(path: Path) -> int | None:
    """The pid in an sshd PidFile, or None while it is missing or not completely written."""
    try:
        text = path.read_text()
    except OSError:
        return None
    return int(text) if text.endswith("\n") and text.strip().isdigit() else None


def _accepts_tcp(address: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


class Fleet:
    """N SSH hosts on 127.0.0.2.. (one port) backed by real sshd; see the module docstring.

    Use as a context manager or call :meth:`start` / :meth:`stop`.  Attributes after start: ``addresses``,
    ``port``, ``root`` (temp dir), ``standin_dir`` (scenarios), ``bin_dir``, ``host_key``,
    ``client_key`` (private key path of the monitor user), ``monitor_user``, ``monitor_password``,
    ``jobs`` / ``job_pids``.
    """

    def __init__(
        self,
        n_hosts: int = 8,
        *,
        first_address: str = "127.0.0.2",
        job_owners: Sequence[str] = JOB_OWNERS,
        startup_timeout: float = 10.0,
        keep_dir: bool | None = None,
    ) -> None:
        if n_hosts < 1:
            raise ValueError("n_hosts must be >= 1")
        self.addresses: list[str] = _addresses(first_address, n_hosts)
        self.job_owners = tuple(job_owners)
        self.startup_timeout = startup_timeout
        self.keep_dir = bool(os.environ.get("GPUWATCH_FLEET_KEEP")) if keep_dir is None else keep_dir
        self.monitor_user = MONITOR_USER
        self.monitor_password = MONITOR_PASSWORD
        self.port = 0
        self.root = Path()
        self.standin_dir = Path()
        self.bin_dir = Path()
        self.runtime_dir = Path()
        self.client_key = Path()
        self.host_key: HostKey | None = None
        self.jobs: dict[str, Job] = {}
        self._job_procs: list[subprocess.Popen[bytes]] = []
        self._sshds: list[_Sshd] = []
        self._extra: dict[str, _Sshd] = {}
        self._registry_entry: Path | None = None
        self._started = False
        self._sshd = ""

    # -- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> Fleet:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> Fleet:
        if self._started:
            return self
        reason = fleet_unavailable_reason()
        if reason:
            raise FleetUnavailable(reason)
        self._sshd = _sshd_path() or "sshd"
        self._started = True
        atexit.register(self.stop)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        t0 = time.monotonic()
        self.root = Path(tempfile.mkdtemp(prefix="gpuwatch-fleet-"))
        os.chmod(self.root, 0o755)  # the monitor user reads scenarios and authorized_keys here
        private = self.root / "private"
        private.mkdir(mode=0o700)
        keygens = {
            "host": _keygen(private / "ssh_host_ed25519_key", "gpuwatch-fleet-host"),
            "client": _keygen(private / "id_ed25519", f"{MONITOR_USER}@gpuwatch-fleet"),
        }
        self._register_and_prepare_users()
        Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
        self.host_key = _finish_keygen(keygens["host"], private / "ssh_host_ed25519_key")
        client = _finish_keygen(keygens["client"], private / "id_ed25519")
        self.client_key = client.private

        auth = self.root / "authorized_keys"
        auth.mkdir(mode=0o755)
        (auth / MONITOR_USER).write_text(client.public + "\n")
        os.chmod(auth / MONITOR_USER, 0o644)

        self.bin_dir = self.root / "bin"
        self.bin_dir.mkdir(mode=0o755)
        shutil.copyfile(STANDIN_EXE, self.bin_dir / "nvidia-smi")
        os.chmod(self.bin_dir / "nvidia-smi", 0o755)
        for tool in ("docker", "crictl"):  # replay docker/crictl inspect (tests/standin)
            shutil.copyfile(STANDIN_BIN_DIR / tool, self.bin_dir / tool)
            os.chmod(self.bin_dir / tool, 0o755)
        self.runtime_dir = self.root / "run"  # where a test puts docker.sock / containerd.sock
        self.runtime_dir.mkdir(mode=0o755)
        self.standin_dir = self.root / "standin"
        self.standin_dir.mkdir(mode=0o755)

        self._start_jobs()
        self.reset_scenarios()

        self.port = _pick_port(self.addresses)
        groups = [
            tuple(self.addresses[i : i + SSHD_MAX_LISTEN]) for i in range(0, len(self.addresses), SSHD_MAX_LISTEN)
        ]
        assert len(groups) == math.ceil(len(self.addresses) / SSHD_MAX_LISTEN)
        for number, group in enumerate(groups):
            self._sshds.append(self._spawn_sshd(f"sshd-{number}", group, self.host_key))
        self._wait_ready(self._sshds)
        logger.info(
            "fleet of %d hosts on port %d ready in %.2fs (%s)",
            len(self.addresses),
            self.port,
            time.monotonic() - t0,
            self.root,
        )

    def stop(self) -> None:
        """Kill sshd (with all connections and sessions) and the job processes; remove the temp dir."""
        if not self._started:
            return
        self._started = False
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        for sshd in [*self._extra.values(), *self._sshds]:
            _kill_tree(sshd.proc)
            sshd.proc.wait()
            if sshd.proc.stdout:
                sshd.proc.stdout.close()
        self._extra.clear()
        self._sshds.clear()
        for proc in self._job_procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._job_procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._job_procs.clear()
        if self.standin_dir != Path():
            leftovers = _kill_by_environ(f"GPUWATCH_STANDIN_DIR={self.standin_dir}".encode())
            if leftovers:
                logger.warning("killed leftover session processes %s", leftovers)
        self._unregister()
        if self.root != Path() and self.root.exists():
            if self.keep_dir:
                logger.warning("keeping fleet directory %s", self.root)
            else:
                shutil.rmtree(self.root, ignore_errors=True)

    # -- users and jobs -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _registry_lock(self) -> Iterator[None]:
        _REGISTRY.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(_REGISTRY / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _register_and_prepare_users(self) -> None:
        with self._registry_lock():
            self._registry_entry = _REGISTRY / f"{os.getpid()}.{uuid.uuid4().hex}"
            self._registry_entry.write_text(str(self.root))
            for user in (MONITOR_USER, *self.job_owners):
                ensure_user(user)
            _run(["chpasswd"], input_text=f"{MONITOR_USER}:{MONITOR_PASSWORD}\n", retries=5)

    def _unregister(self) -> None:
        """Drop this fleet from the registry; the last live fleet locks the monitor's password."""
        if self._registry_entry is None:
            return
        with self._registry_lock():
            self._registry_entry.unlink(missing_ok=True)
            self._registry_entry = None
            alive = False
            for entry in _REGISTRY.glob("*.*"):
                pid = int(entry.name.split(".", 1)[0])
                if Path(f"/proc/{pid}").exists():
                    alive = True
                else:
                    entry.unlink(missing_ok=True)
            if not alive:
                with contextlib.suppress(FleetError):
                    _run(["usermod", "-L", MONITOR_USER], retries=5)

    def _start_jobs(self) -> None:
        python = _python_for_everyone()
        jobs_dir = self.root / "jobs"
        jobs_dir.mkdir(mode=0o755)
        script = jobs_dir / "train.py"
        script.write_text(_JOB_SCRIPT)
        os.chmod(script, 0o644)
        for user in self.job_owners:
            entry = pwd.getpwnam(user)
            if python:
                argv: tuple[str, ...] = (python, str(script), "--model", "resnet50", "--epochs", "90")
            else:  # no python3 other users may run: a plain sleep (cannot notice the test dying)
                argv = ("/bin/sleep", "1000000")
            proc = subprocess.Popen(
                argv,
                user=entry.pw_uid,
                group=entry.pw_gid,
                extra_groups=[],
                cwd="/",
                env={"PATH": SESSION_PATH_TAIL, "HOME": entry.pw_dir, "USER": user},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            self._job_procs.append(proc)
            self.jobs[user] = Job(user=user, pid=proc.pid, argv=argv)

    @property
    def job_pids(self) -> dict[str, int]:
        """{job owner: pid of the real process that user runs}."""
        return {user: job.pid for user, job in self.jobs.items()}

    # -- sshd -----------------------------------------------------------------------------------
    def _sshd_config(
        self, name: str, addresses: Sequence[str], host_key: HostKey, options: Sequence[str] = ()
    ) -> str:
        session_path = f"{self.bin_dir}:{SESSION_PATH_TAIL}"
        lines = [
            f"# gpuwatch test fleet: {name}",
            f"Port {self.port}",
            "AddressFamily inet",
            *(f"ListenAddress {a}" for a in addresses),
            f"HostKey {host_key.private}",
            f"PidFile {self.root / (name + '.pid')}",
            f"AuthorizedKeysFile {self.root}/authorized_keys/%u",
            "StrictModes no",
            "UsePAM no",
            "PasswordAuthentication yes",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "PermitRootLogin no",
            "PermitEmptyPasswords no",
            f"AllowUsers {MONITOR_USER}",
            "AllowTcpForwarding yes",
            "X11Forwarding no",
            "PrintMotd no",
            "PrintLastLog no",
            "UseDNS no",
            "MaxStartups 200:30:300",
            "MaxSessions 50",
            "LoginGraceTime 30",
            "LogLevel VERBOSE",
            f'SetEnv "PATH={session_path}" "GPUWATCH_STANDIN_DIR={self.standin_dir}" '
            f'"DOCKER_HOST=unix://{self.runtime_dir}/docker.sock" '
            f'"CONTAINER_RUNTIME_ENDPOINT=unix://{self.runtime_dir}/containerd.sock"',
            "Subsystem sftp internal-sftp",
        ]
        # an option replaces the fleet's line for its keyword (sshd keeps the first value of most
        # keywords but the last of some, such as MaxStartups)
        replaced = {option.split()[0].lower() for option in options}
        lines = [line for line in lines if line.split()[0].lower() not in replaced]
        return "\n".join([*lines, *options]) + "\n"

    def _spawn_sshd(
        self, name: str, addresses: Sequence[str], host_key: HostKey, options: Sequence[str] = ()
    ) -> _Sshd:
        config = self.root / f"{name}.config"
        config.write_text(self._sshd_config(name, addresses, host_key, options))
        log = self.root / f"{name}.log"
        reaper = self.root / "sshd-reaper.py"
        if not reaper.exists():
            reaper.write_text(_REAPER)
        with open(log, "ab") as log_handle:
            proc = subprocess.Popen(
                [sys.executable, "-S", "-E", str(reaper), self._sshd, "-D", "-e", "-f", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log_handle,
                stderr=log_handle,
                start_new_session=True,
                preexec_fn=_die_with_parent(),
            )
        return _Sshd(tuple(addresses), config, log, proc, host_key)

    def _wait_ready(self, sshds: Sequence[_Sshd]) -> None:
        deadline = time.monotonic() + self.startup_timeout
        for sshd in sshds:
            for address in sshd.addresses:
                wanted = f"Server listening on {address} port {self.port}."
                while True:
                    log = sshd.log.read_text(errors="replace")
                    if "Bind to port" in log and "failed" in log:
                        raise FleetError(f"sshd could not bind {sshd.addresses}:\n{log}")
                    pid_written = _read_pid(sshd.config.with_suffix(".pid")) is not None
                    if wanted in log and pid_written and _accepts_tcp(address, self.port):
                        break
                    if sshd.proc.poll() is not None:
                        raise FleetError(f"sshd for {address} exited with {sshd.proc.returncode}:\n{log}")
                    if time.monotonic() > deadline:
                        raise FleetError(
                            f"sshd for {address}:{self.port} not ready after {self.startup_timeout}s:\n{log}"
                        )
                    time.sleep(0.01)

    def new_host_key(self, name: str | None = None) -> HostKey:
        """A fresh ed25519 host key in this fleet's directory."""
        path = self.root / "private" / f"host_{name or uuid.uuid4().hex[:8]}_ed25519_key"
        return _finish_keygen(_keygen(path, "gpuwatch-fleet-extra-host"), path)

    def add_host(
        self, address: str, host_key: HostKey | None = None, sshd_options: Sequence[str] = ()
    ) -> HostKey:
        """Serve one more host on ``address`` (127/8, fleet port) with its own sshd and host key
        (fresh unless given); its scenario starts as the default.  ``sshd_options`` are sshd_config
        lines that win over the fleet's (e.g. ``"MaxStartups 2:100:2"``).  Returns the host key used."""
        self._require_started()
        if ipaddress.IPv4Address(address) not in ipaddress.IPv4Network("127.0.0.0/8"):
            raise ValueError(f"{address} is not a loopback address")
        if address in self.addresses or address in self._extra:
            raise FleetError(f"{address} is already served by this fleet")
        if not _port_free(address, self.port):
            raise FleetError(f"{address}:{self.port} is in use")
        key = host_key or self.new_host_key()
        if not self.scenario_dir(address).exists():
            self.set_default_scenario(address)
        name = f"sshd-extra-{address}-{uuid.uuid4().hex[:6]}"
        sshd = self._spawn_sshd(name, [address], key, sshd_options)
        self._extra[address] = sshd
        try:
            self._wait_ready([sshd])
        except FleetError:
            self.remove_host(address)
            raise
        return key

    def remove_host(self, address: str) -> None:
        """Stop a host added with :meth:`add_host`, dropping its open connections (a host going down).

        The connections go first, all at once: a client never hears how a command it was running
        ended (as when a machine loses power or its network). Ending the sessions' commands first
        would let sshd forward "killed: exit 143" and a clean exit status, which is what a command
        killed on a live host looks like, not a host going down."""
        sshd = self._extra.pop(address, None)
        if sshd is None:
            raise FleetError(f"{address} was not added with add_host")
        _cut_connections(sshd.proc.pid)
        _kill_tree(sshd.proc)
        if sshd.proc.stdout:
            sshd.proc.stdout.close()

    @property
    def sshd_pids(self) -> list[int]:
        """PIDs of the listening sshd processes (fleet groups first, then added hosts)."""
        pids = [_read_pid(sshd.config.with_suffix(".pid")) for sshd in [*self._sshds, *self._extra.values()]]
        return [pid for pid in pids if pid is not None]

    @property
    def all_addresses(self) -> list[str]:
        return [*self.addresses, *self._extra]

    def host_key_of(self, address: str) -> HostKey:
        if address in self._extra:
            return self._extra[address].host_key
        assert self.host_key is not None
        return self.host_key

    def refused_address(self) -> str:
        """A loopback address where nothing accepts connections on the fleet port."""
        self._require_started()
        taken = set(self.all_addresses)
        for last in range(250, 1, -1):
            candidate = f"127.0.0.{last}"
            if candidate in taken:
                continue
            try:
                with socket.create_connection((candidate, self.port), timeout=0.5):
                    continue
            except ConnectionRefusedError:
                return candidate
            except OSError:
                continue
        raise FleetError("no refusing loopback address found")

    # -- client-side files ------------------------------------------------------------------------
    def known_hosts_text(self, addresses: Sequence[str] | None = None, key: HostKey | None = None) -> str:
        """known_hosts lines (``[addr]:port type base64``) for ``addresses`` (default: all), with each
        host's own key or with ``key`` for all of them."""
        lines = []
        for address in addresses if addresses is not None else self.all_addresses:
            host_key = key or self.host_key_of(address)
            lines.append(f"[{address}]:{self.port} {host_key.key_type} {host_key.base64}")
        return "\n".join(lines) + "\n"

    def write_known_hosts(
        self,
        path: Path,
        addresses: Sequence[str] | None = None,
        key: HostKey | None = None,
    ) -> Path:
        path = Path(path)
        path.write_text(self.known_hosts_text(addresses, key))
        return path

    def logs(self) -> str:
        """All sshd logs of this fleet (for assertion messages)."""
        parts = []
        for sshd in [*self._sshds, *self._extra.values()]:
            with contextlib.suppress(OSError):
                parts.append(f"== {sshd.log.name}\n{sshd.log.read_text(errors='replace')}")
        return "\n".join(parts)

    # -- scenarios ----------------------------------------------------------------------------------
    def gpuwatch_ssh(self, known_hosts: Path | None = None, **overrides: object) -> dict[str, object]:
        """The ``ssh:`` section of a gpuwatch config that logs in to this fleet as the monitor
        user with the fleet's client key (``~/.ssh/config`` ignored); ``overrides`` win."""
        ssh: dict[str, object] = {
            "user": self.monitor_user,
            "port": self.port,
            "key_file": str(self.client_key),
            "known_hosts": str(known_hosts) if known_hosts else None,
            "connect_timeout": "3s",
            "command_timeout": "8s",
            "use_ssh_config": False,
        }
        ssh.update(overrides)
        return ssh

    def scenario_dir(self, address: str) -> Path:
        """Where the stand-in looks for ``address``'s scenario (``"local"`` for runs without SSH)."""
        return self.standin_dir / address

    def default_owner_map(self) -> dict[int, int]:
        """Captured H100 pids -> real pids: 11327 -> alice's job, 11328 -> verylongusername's job;
        11345 (gpu_burn) stays unmapped, i.e. a process ``ps`` cannot see (another PID namespace)."""
        captured = capture_pids(H100_LOAD_APPS)
        owners = [self.jobs[u].pid for u in self.job_owners if u in self.jobs]
        return dict(zip(captured[: len(owners)], owners))

    def set_default_scenario(self, address: str) -> Path:
        """4 H100 GPUs, GPU 0 busy with the captured processes mapped by :meth:`default_owner_map`."""
        return scenario_healthy_multi_gpu(self.scenario_dir(address), 4, owners_pids=self.default_owner_map())

    def reset_scenarios(self) -> None:
        """Give every host (and ``local``) the default scenario."""
        for address in [*self.all_addresses, "local"]:
            self.set_default_scenario(address)

    def local_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment to run the stand-in here without SSH, replaying this fleet's ``local`` scenario."""
        env = dict(os.environ if base is None else base)
        env.pop("SSH_CONNECTION", None)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', SESSION_PATH_TAIL)}"
        env["GPUWATCH_STANDIN_DIR"] = str(self.standin_dir)
        return env

    def _require_started(self) -> None:
        if not self._started:
            raise FleetError("fleet is not started")

    def __repr__(self) -> str:
        state = "started" if self._started else "stopped"
        return f"<Fleet {state} {len(self.addresses)} hosts port {self.port} root {self.root}>"
