"""``gpuwatch demo``: the daemon and its page on a replayed fleet, without servers, SSH or root.

Each demo host is polled by the real probe (``probe.build_script``, run with ``sh -s`` by a
:class:`~gpuwatch.ssh.LocalRunner`) with small stand-ins for ``nvidia-smi`` and ``ps`` first on its
PATH (``standin.py``) that replay that host's scenario: GPU rows and processes stacked from the real
captures in ``captures/`` (see its README and SOURCES.tsv), owners and command lines from
:data:`DEMO_JOBS` (invented: the corpus has no ``ps`` output). So the demo goes through the same
probe, parser, fleet state, rules and page as a real fleet, whatever the probe script looks like.

One host is down (a captured driver/library version mismatch), one is in MIG mode, some are busy,
and every ``TOGGLE_EVERY`` seconds a job on one GPU ends or starts again, so the page and the
console show changes. Messages are printed (the dry-run console channel), never sent.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import threading
import uuid
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

from ..config import Config, HostConfig
from ..config.load import parse_config
from ..ssh import LocalRunner, Runner

log = logging.getLogger(__name__)

TOGGLE_EVERY = 45.0

H100_LOAD = "csv-query-gpu/nvgpuexp-h100-80gb-hbm3-linux-590.48.01-load-query-gpu-all-fields.csv"
H100_IDLE = "csv-query-gpu/nvgpuexp-h100-80gb-hbm3-linux-590.48.01-idle-query-gpu-all-fields.csv"
H100_APPS = "csv-compute-apps/nvgpuexp-h100-80gb-hbm3-linux-590.48.01-load-compute-apps.csv"
H200_LOAD = "csv-query-gpu/nvgpuexp-h200-linux-590.48.01-load-query-gpu-all-fields.csv"
H200_APPS = "csv-compute-apps/nvgpuexp-h200-linux-590.48.01-load-compute-apps.csv"
MIG_LOAD = "csv-query-gpu/nvgpuexp-h100-mig-linux-590.48.01-load-query-gpu-all-fields.csv"
MIG_APPS = "csv-compute-apps/nvgpuexp-h100-mig-linux-590.48.01-load-compute-apps.csv"
L40S_LOAD = "csv-query-gpu/nvgpuexp-l40s-linux-595.80-load-query-gpu-all-fields.csv"
L40S_APPS = "csv-compute-apps/nvgpuexp-l40s-linux-595.80-load-compute-apps.csv"
RTX4080_LOAD = "csv-query-gpu/nvgpuexp-rtx4080super-linux-595.71.05-load-query-gpu-all-fields.csv"
RTX4080_APPS = "csv-compute-apps/nvgpuexp-rtx4080super-linux-595.71.05-load-compute-apps.csv"
APPS_HEADER = "csv-compute-apps/nvgpuexp-h100-mig-linux-590.48.01-idle-compute-apps-header-only.csv"
ERR_MISMATCH = "errors/issue-nvml-driver-library-version-mismatch.txt"

# PCI bus ids of a real 8x H100 box (corpus table/gpud-h100-80gb-x8-550.90.07-default-table.txt).
BUS_IDS = (
    "00000000:19:00.0",
    "00000000:3B:00.0",
    "00000000:4C:00.0",
    "00000000:5D:00.0",
    "00000000:9B:00.0",
    "00000000:BB:00.0",
    "00000000:CB:00.0",
    "00000000:DB:00.0",
)

Job = tuple[str, int, str]  # (user, seconds running, command line): invented, one per captured process row

# Who runs the captured processes on each busy GPU. INVENTED for the demo (see captures/README.md).
DEMO_JOBS: Mapping[str, Sequence[Job]] = {
    "vit": (
        ("alice", 26 * 3600, "python3 train.py --config configs/vit-l16.yaml --batch-size 256 --amp"),
        ("alice", 26 * 3600, "python3 -m torch.utils.data.worker --shard 3"),
        ("alice", 26 * 3600 - 40, "python3 eval.py --ckpt runs/vit-l16/last.pt --every 1000"),
    ),
    "llm": (
        ("bob", 3 * 86400 + 7200, "torchrun --nproc-per-node 1 finetune.py --model llama-3-8b --lora-r 16"),
        ("bob", 3 * 86400 + 7200, "python3 -c from datasets import load_dataset; ...  # tokenizer"),
        ("bob", 3 * 86400 + 7100, "torchrun --nproc-per-node 1 finetune.py --model llama-3-8b --lora-r 16 --resume"),
    ),
    "diffusion": (
        ("verylongusername", 5400, "python3 sample.py --model sdxl --steps 50 --n 64 --out /data/samples"),
        ("verylongusername", 5400, "python3 sample.py --model sdxl --steps 50 --n 64 --out /data/samples"),
        ("chen", 610, "./gpu_burn 3600"),
    ),
    "erin": (
        ("erin", 1200, "python3 rl/ppo.py --env Humanoid-v4 --num-envs 4096 --seed 7"),
        ("erin", 1200, "python3 rl/ppo.py --env Humanoid-v4 --num-envs 4096 --seed 8"),
        ("erin", 1180, "python3 rl/ppo.py --env Humanoid-v4 --num-envs 4096 --seed 9"),
    ),
    "mig": (
        ("dana", 7 * 3600, "jupyter-lab --no-browser --port 8890"),
        ("frank", 2 * 3600, "python3 infer.py --model whisper-large-v3 --batch 8"),
        ("frank", 2 * 3600, "python3 infer.py --model whisper-large-v3 --batch 8"),
    ),
    "render": (
        ("render", 980, "ffmpeg -hwaccel cuda -i /media/in/lecture-07.mkv -c:v h264_nvenc /media/out/lecture-07.mp4"),
        ("render", 975, "ffmpeg -hwaccel cuda -i /media/in/lecture-08.mkv -c:v h264_nvenc /media/out/lecture-08.mp4"),
    ),
    "desktop": (
        ("gina", 9 * 86400, "/usr/bin/kwin_wayland --wayland-fd 7 --socket wayland-0 --xwayland"),
        ("gina", 300, "ffmpeg -f x11grab -i :0 -c:v hevc_nvenc /home/gina/screencast.mkv"),
        ("gina", 300, "ffmpeg -f pulse -i default -c:a aac /home/gina/screencast-audio.m4a"),
    ),
}


@dataclass(frozen=True)
class GpuSpec:
    capture: str  # query-gpu capture (its first row)
    apps: str | None = None  # compute-apps capture whose rows run on this GPU
    jobs: str | None = None  # DEMO_JOBS key: the owners of those rows


@dataclass(frozen=True)
class HostSpec:
    name: str
    gpus: tuple[GpuSpec, ...] = ()
    error: str | None = None  # an error capture printed instead (the host is down)
    exit_code: int = 255


def _idle() -> GpuSpec:
    return GpuSpec(H100_IDLE)


ERIN_GPU = 6  # the GPU of dgx-a whose job comes and goes


def demo_hosts(erin_running: bool = True) -> tuple[HostSpec, ...]:
    """The demo fleet: 6 hosts, 16 GPUs; one down, one in MIG mode, some free."""
    dgx = [
        GpuSpec(H100_LOAD, H100_APPS, "vit"),
        GpuSpec(H100_LOAD, H100_APPS, "llm"),
        _idle(),
        GpuSpec(H100_LOAD, H100_APPS, "diffusion"),
        _idle(),
        _idle(),
        GpuSpec(H100_LOAD, H100_APPS, "erin") if erin_running else _idle(),
        _idle(),
    ]
    return (
        HostSpec("dgx-a", tuple(dgx)),
        HostSpec("h200-b", tuple(GpuSpec(H200_LOAD, H200_APPS, "llm") for _ in range(2))),
        HostSpec("mig-c", (GpuSpec(MIG_LOAD, MIG_APPS, "mig"),)),
        HostSpec("render-d", (GpuSpec(L40S_LOAD, L40S_APPS, "render"),)),
        HostSpec("ws-e", (GpuSpec(RTX4080_LOAD, RTX4080_APPS, "desktop"),)),
        HostSpec("old-f", error=ERR_MISMATCH, exit_code=255),
    )


# ---------------------------------------------------------------- building scenarios from captures


def capture_text(relative: str) -> str:
    return (resources.files(__package__) / "captures" / relative).read_bytes().decode("utf-8", "surrogateescape")


def _split(relative: str, free: str | None = None) -> tuple[list[str], list[list[str]]]:
    lines = capture_text(relative).splitlines()
    header = lines[0].split(", ")
    names = [cell.split(" [", 1)[0] for cell in header]
    free_col = names.index(free) if free in names else None
    rows = []
    for line in filter(None, lines[1:]):
        cells = line.split(", ")
        if len(cells) > len(header) and free_col is not None:
            tail = len(header) - free_col - 1
            cells = [*cells[:free_col], ", ".join(cells[free_col : len(cells) - tail]), *cells[len(cells) - tail :]]
        if len(cells) != len(header):
            raise ValueError(f"{relative}: a row has {len(cells)} cells, the header {len(header)}")
        rows.append(cells)
    return header, rows


def _col(header: Sequence[str], name: str) -> int:
    return [cell.split(" [", 1)[0] for cell in header].index(name)


def gpu_uuid(host: str, index: int) -> str:
    return f"GPU-{zlib.crc32(host.encode()):08x}-0000-0000-0000-{index:012x}"


def scenario_files(host: HostSpec) -> dict[str, str]:
    """The stand-in's files for one host: stacked query-gpu rows, their processes, ps lines, SOURCES."""
    if host.error is not None:
        return {
            "error.txt": capture_text(host.error),
            "exit_code": f"{host.exit_code}\n",
            "SOURCES": f"error.txt: captures/{host.error}, byte for byte\n",
        }
    header: list[str] | None = None
    gpu_lines: list[str] = []
    app_header, _ = _split(APPS_HEADER)
    app_lines: list[str] = []
    ps_lines: list[str] = []
    sources = [f"Built by gpuwatch.demo for {host.name} from gpuwatch/demo/captures (see SOURCES.tsv there)."]
    for index, spec in enumerate(host.gpus):
        cap_header, rows = _split(spec.capture)
        header = header or cap_header
        if cap_header != header:
            raise ValueError(f"{spec.capture}: another header than the host's first GPU; cannot stack")
        row = list(rows[0])
        row[_col(header, "index")] = str(index)
        row[_col(header, "uuid")] = gpu_uuid(host.name, index)
        row[_col(header, "pci.bus_id")] = BUS_IDS[index]
        row[_col(header, "count")] = str(len(host.gpus))
        gpu_lines.append(", ".join(row))
        sources.append(f"query-gpu.csv GPU {index}: {spec.capture} row 1")
        if spec.apps is None:
            continue
        app_header, app_rows = _split(spec.apps, free="process_name")
        jobs = DEMO_JOBS[spec.jobs or ""]
        for n, app in enumerate(app_rows):
            app = list(app)
            pid = int(app[_col(app_header, "pid")]) + 100 * index  # each GPU's processes have their own pids
            app[_col(app_header, "pid")] = str(pid)
            app[_col(app_header, "gpu_uuid")] = gpu_uuid(host.name, index)
            app[_col(app_header, "gpu_bus_id")] = BUS_IDS[index]
            app_lines.append(", ".join(app))
            user, seconds, command = jobs[n % len(jobs)]
            ps_lines.append(f"{pid}\t{user}\t{seconds}\t{command}")
        sources.append(f"compute-apps.csv rows on GPU {index}: {spec.apps}; owners: DEMO_JOBS[{spec.jobs!r}]")
    assert header is not None
    sources.append(
        "REWRITTEN cells: query-gpu index, uuid, pci.bus_id, count; compute-apps gpu_uuid, gpu_bus_id and pid "
        "(+100 per GPU index). Bus ids from a real 8x H100 box. Every other byte is as captured."
    )
    return {
        "query-gpu.csv": ", ".join(header) + "\n" + "".join(line + "\n" for line in gpu_lines),
        "compute-apps.csv": ", ".join(app_header) + "\n" + "".join(line + "\n" for line in app_lines),
        "ps.tsv": "".join(line + "\n" for line in ps_lines),
        "SOURCES": "\n".join(sources) + "\n",
    }


def publish(directory: Path, files: Mapping[str, str]) -> None:
    """Make ``directory`` (a symlink) point at a fresh directory holding ``files``, atomically: a
    probe in flight sees the old scenario or the new one, never half of each."""
    target = Path(tempfile.mkdtemp(prefix=f"{directory.name}-", dir=directory.parent))
    for name, content in files.items():
        (target / name).write_bytes(content.encode("utf-8", "surrogateescape"))
    link = directory.parent / f".{directory.name}.{uuid.uuid4().hex}"
    link.symlink_to(target.name)
    old = directory.resolve() if directory.is_symlink() else None
    os.replace(link, directory)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class DemoFleet:
    """The scenarios on disk, the stand-ins' bin directory and a runner per host."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bin = root / "bin"
        self.scenarios = root / "scenarios"
        self.bin.mkdir(parents=True, exist_ok=True)
        self.scenarios.mkdir(exist_ok=True)
        standin = Path(str(resources.files(__package__) / "standin.py"))
        for tool in ("nvidia-smi", "ps"):
            wrapper = self.bin / tool
            wrapper.write_text(f"#!/bin/sh\nexec '{sys.executable}' -I -S '{standin}' {tool} \"$@\"\n")
            wrapper.chmod(0o755)
        self.erin_running = True
        self.publish_all()

    def publish_all(self) -> None:
        for host in demo_hosts(self.erin_running):
            publish(self.scenarios / host.name, scenario_files(host))

    def toggle(self) -> None:
        """A job ends (its GPU becomes free), or starts again."""
        self.erin_running = not self.erin_running
        dgx = demo_hosts(self.erin_running)[0]
        publish(self.scenarios / dgx.name, scenario_files(dgx))
        log.info("demo: erin's job on %s GPU %d %s", dgx.name, ERIN_GPU, "started" if self.erin_running else "ended")

    def env(self, host: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("SSH_CONNECTION", "LD_PRELOAD")}
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
        env["GPUWATCH_DEMO_SCENARIO"] = str(self.scenarios / host)
        return env

    def runner_factory(self) -> Callable[[HostConfig], Runner]:
        def factory(host: HostConfig) -> Runner:
            return LocalRunner(env=self.env(host.name))

        return factory


def demo_config(state_dir: Path, listen: str, poll_every: float) -> Config:
    """The demo's config: its hosts, the default alerts plus a notice when erin's GPU is free, the page
    (which says it is a demo: ``web.demo``)."""
    doc = {
        "hosts": [h.name for h in demo_hosts()],
        "state_dir": str(state_dir),
        "schedule": {"poll_every": poll_every, "reports": []},
        "ssh": {"command_timeout": "20s"},
        "alerts": {"host_down": {"after": 3}, "gpu_missing": True, "gpu_error": True, "gpu_freed": {"users": ["erin"]}},
        "web": {"listen": listen},
    }
    config = parse_config(doc)
    assert config.web is not None
    return replace(config, web=replace(config.web, demo=True))


class Toggler:
    """Ends or restarts one job every ``every`` seconds (a Daemon service)."""

    def __init__(self, fleet: DemoFleet, every: float = TOGGLE_EVERY) -> None:
        self.fleet = fleet
        self.every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-toggle", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.fleet.toggle()
            except OSError:
                log.exception("demo: could not change the scenario")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
