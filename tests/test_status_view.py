"""``gpuwatch status`` beside gpustat and nvitop: the ``-p/-C/-r/-P`` columns, colour on a terminal
(``NO_COLOR`` respected), ``--no-context``, filters that also filter the context lines and the summary,
``--user nobody`` saying so with exit 1, and Ctrl-C at any moment of ``--watch`` ending with exit 0.

The host is ``localhost`` replaying a real H100 capture through the stand-in nvidia-smi, with a real
process of this user on GPUs 0 and 1; plus a loopback port where nothing listens.
"""

from __future__ import annotations

import dataclasses
import io
import json
import random
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from builders import T0, Job, h100_host
from gpuwatch.cli import build_parser
from gpuwatch.cli import status as status_cli
from gpuwatch.cli.status import has_processes_of
from gpuwatch.config import FreeGpuConfig
from gpuwatch.config.load import load_config
from gpuwatch.model import FleetSnapshot
from gpuwatch.summary import select
from gpuwatch.text import paint, wants_color
from test_cli import GONE, ME, Terminal, cli, mine, write_config  # noqa: F401 (mine: the fixture below uses it)

ESC = "\x1b["


@pytest.fixture
def job(mine: int) -> int:  # noqa: F811 (the fixture of test_cli)
    """A real process of this user on GPUs 0 and 1 of the local 4-GPU host: its pid."""
    return mine


def rows(out: str, host: str = "localhost") -> list[str]:
    return [line for line in out.splitlines() if line.startswith(f"{host} ")]


def test_pid_command_runtime_and_power_columns_as_gpustat_writes_them(job: int, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    code, out = cli(config, "status", "-p", "-C", "-r", "-P")
    assert code == 0
    header = out.splitlines()[0].split()
    assert header[-3:] == ["POWER", "PROCESSES", "FREE"]
    first = rows(out)[0]
    assert "632W" in first  # power.draw 631.95 in the capture
    # owner:command/pid(memory, runtime), one entry per process
    assert re.search(rf"\b{ME}:sleep/{job}\(2566M, [0-9]+s\)", first), first
    assert "N/A:" in first  # pids ps could not see: the owner is unknown, never invented
    # -C/--command is not the subcommand's own "command" (a read-only status must stay "status")
    assert build_parser().parse_args(["status", "-C"]).command == "status"
    code, out = cli(config, "status", "-p")
    assert re.search(rf"\b{ME}/{job}\(2566M\)", rows(out)[0]) and "POWER" not in out
    code, out = cli(config, "status", "-a")
    assert re.search(rf"\b{ME}:sleep/{job}\(2566M, [0-9]+s\)", rows(out)[0]) and "POWER" in out
    code, out = cli(config, "status")  # the default is unchanged: one entry per owner
    assert f"{ME} (cgroup not read)(2566M)" in rows(out)[0] or f" {ME}(2566M)" in rows(out)[0]


def test_colour_on_a_terminal_never_with_no_color_or_when_piped(job: int, tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path))

    def status(*argv: str, out: io.StringIO, environ: dict[str, str]) -> str:
        args = build_parser().parse_args(["status", *argv])
        status_cli.cmd_status(config, args, out, environ=environ)
        return out.getvalue()

    coloured = status(out=Terminal(), environ={"TERM": "xterm"})
    assert f"{ESC}32mfree" in coloured and f"{ESC}1mlocalhost" in coloured
    assert ESC not in status(out=Terminal(), environ={"TERM": "xterm", "NO_COLOR": "1"})
    assert ESC not in status(out=Terminal(), environ={"TERM": "dumb"})
    assert ESC not in status(out=io.StringIO(), environ={"TERM": "xterm"})  # piped
    assert ESC not in status("--no-color", out=Terminal(), environ={"TERM": "xterm"})
    assert ESC not in status("--color=never", out=Terminal(), environ={"TERM": "xterm"})
    forced = status("--color=always", out=io.StringIO(), environ={"NO_COLOR": "1"})  # the flag wins
    assert ESC in forced
    # escape codes take no width: without them the columns line up exactly as uncoloured
    plain = re.sub(r"\x1b\[[0-9]+m", "", forced)
    assert [len(line) for line in rows(plain)] == [len(line) for line in rows(status(out=io.StringIO(), environ={}))]


def test_wants_color_and_paint() -> None:
    assert wants_color("auto", True, {"TERM": "xterm"}) is True
    assert wants_color("auto", True, {"TERM": "xterm", "NO_COLOR": ""}) is True  # empty: not set
    assert wants_color("auto", True, {"NO_COLOR": "yes"}) is False
    assert wants_color("auto", False, {}) is False
    assert wants_color("always", False, {"NO_COLOR": "1"}) is True
    assert wants_color("never", True, {}) is False
    assert paint("free", "green", True) == "\x1b[32mfree\x1b[0m"
    assert paint("free", "green", False) == "free" and paint("", "green", True) == ""


def test_no_context_drops_the_context_lines(job: int, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    _, out = cli(config, "status")
    assert re.search(r"^localhost: load ", out, re.M)
    _, out = cli(config, "status", "--no-context")
    assert not re.search(r"^localhost: load ", out, re.M) and len(rows(out)) == 4


def test_filters_filter_the_context_lines_and_the_summary_counts_the_fleet(job: int, tmp_path: Path) -> None:
    config = write_config(tmp_path, ["localhost", GONE])
    code, out = cli(config, "status", "--user", ME)
    assert code == 0 and len(rows(out)) == 2
    # the fleet's GPUs and free GPUs, then how many are shown ("4 GPUs, 0 free" was wrong: 2 are free)
    assert "1 of 2 hosts answered, 4 GPUs, 2 free; 2 GPUs shown" in out
    assert re.search(r"^localhost: load ", out, re.M)  # a host with a GPU shown keeps its context
    code, out = cli(config, "status", "--user", ME, "--free")
    assert code == 0 and rows(out) == []
    assert "4 GPUs, 2 free; 0 GPUs shown" in out
    assert not re.search(r"^localhost: load ", out, re.M)  # nothing of it shown: nor its context
    code, out = cli(config, "status", "--free")
    assert "4 GPUs, 2 free; 2 GPUs shown" in out and len(rows(out)) == 2


def test_user_without_processes_says_so_and_exits_1(job: int, tmp_path: Path) -> None:
    config = write_config(tmp_path, ["localhost", GONE])
    code, out = cli(config, "status", "--user", "nobody")
    assert code == 1
    assert out.splitlines()[0] == "no processes of nobody (1 of 2 hosts answered)"
    assert "gpu-gone: DOWN unreachable" in out and "HOST" not in out
    code, out = cli(config, "status", "--user", "nobody", "--json")
    assert code == 1 and json.loads(out)["hosts"][0]["gpus"] == []  # still one JSON document


def _watch_and_interrupt(config: Path, seed: int) -> tuple[int | None, str]:
    """Start ``status --watch 0.5``, wait for its first table, then Ctrl-C at a random moment
    (sometimes twice in quick succession, as an impatient person does)."""
    chance = random.Random(seed)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpuwatch", "status", "--watch", "0.5", "-c", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        proc.stdout.readline()  # the first table has begun: the watch runs
        time.sleep(chance.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGINT)
        if chance.random() < 0.5:
            time.sleep(chance.uniform(0.0, 0.1))
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    return proc.returncode, err


def test_ctrl_c_at_any_moment_of_watch_exits_0(job: int, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda seed: _watch_and_interrupt(config, seed), range(20)))
    for code, err in results:
        assert code == 0 and "Traceback" not in err, (code, err)


def test_user_filter_names_the_person_behind_a_process_not_the_ps_user() -> None:
    """bob's container run by alice's account is bob's (as the page, chat and the rules say)."""
    host = h100_host("gpu-a", [Job("alice", 5000, 0)])
    proc = host.processes[0]
    bobs = dataclasses.replace(proc, attributed_owner="bob", owner_source="label")
    snapshot = FleetSnapshot(hosts=(dataclasses.replace(host, processes=(bobs,)),), taken_at=T0)
    kept = select(snapshot, FreeGpuConfig(), user="bob")
    assert [g.index for g in kept.hosts[0].gpus] == [0]
    assert [p.owner for p in kept.hosts[0].processes] == ["bob"]
    assert select(snapshot, FreeGpuConfig(), user="alice").hosts[0].gpus == ()
    assert has_processes_of(snapshot, "bob") and not has_processes_of(snapshot, "alice")
