"""The command line behaves like its peers (gpustat, nvitop, amtool, the Prometheus tools):
``-V``, ``--help`` for every option, shell completion, ``status`` filters and ``--watch``, ``--json``
on every listing, silences by id as printed, by pid and with an author, log lines with their zone,
start-up at INFO, each warning once, and every command ending quietly when its reader goes away.

Hosts are ``localhost`` replaying real captures through the stand-in nvidia-smi (no root needed),
plus, where a host that does not answer matters, a loopback port where nothing listens.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from builders import GONE, ME, Terminal, cli, write_config
from fleet import scenario_healthy_multi_gpu
from gpuwatch import __version__
from gpuwatch.cli import build_parser, main
from gpuwatch.cli import status as status_cli
from gpuwatch.config.load import load_config
from gpuwatch.daemon import Daemon
from gpuwatch.logsetup import setup_logging
from gpuwatch.store import AlertStore, Outbox, open_db

# main() installs log handlers on the root logger: conftest.restore_logging takes them away afterwards.
pytestmark = pytest.mark.usefixtures("restore_logging")


def gpuwatch(*argv: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpuwatch", *argv], capture_output=True, text=True, timeout=60, **kwargs
    )


# ---------------------------------------------------------------- -V, --help, completion


def test_version_short_and_long(capsys: pytest.CaptureFixture[str]) -> None:
    for flag in ("-V", "--version"):
        with pytest.raises(SystemExit) as exited:
            main([flag])
        assert exited.value.code == 0
        assert capsys.readouterr().out == f"gpuwatch {__version__}\n"


def _parsers(parser: argparse.ArgumentParser, name: str = "gpuwatch") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_help_covers_every_option_of_every_command() -> None:
    seen = []
    for name, parser in _parsers(build_parser()):
        text = parser.format_help()
        for action in parser._actions:
            assert action.help and action.help != argparse.SUPPRESS, f"{name}: {action.dest} has no help"
            for option in action.option_strings:
                assert option in text, f"{name} --help does not show {option}"
        seen.append(name)
    assert {"gpuwatch status", "gpuwatch silence add", "gpuwatch completion"} <= set(seen)


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_scripts_for_bash_and_zsh(shell: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["completion", shell])
    script = capsys.readouterr().out
    assert code == 0
    for word in ("status", "silence", "--watch", "--pid", "--free", "idle_gpu", "completion"):
        assert word in script, word
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed: the script was made but not syntax-checked")
    checked = subprocess.run([shell, "-n"], input=script, capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr


# ---------------------------------------------------------------- the reader goes away


@pytest.mark.parametrize(
    "argv",
    [
        ["status", "--json"],
        ["status", "--watch", "0.5", "--json"],
        ["alerts", "--json"],
        ["silence", "list", "--json"],
        ["check"],
        ["run", "--dry-run"],
        ["--help"],
        ["completion", "bash"],
    ],
    ids=" ".join,
)
def test_every_command_ends_quietly_when_its_reader_goes_away(argv: list[str], mine: int, tmp_path: Path) -> None:
    """``gpuwatch ... | head -1`` when head has gone: no BrokenPipeError traceback, exit 141 (as a
    C program killed by SIGPIPE), whatever the command."""
    config = write_config(tmp_path)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte
    try:
        done = subprocess.run(
            [sys.executable, "-m", "gpuwatch", "-c", str(config), *argv],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr
    assert "BrokenPipe" not in done.stderr
    # argparse itself ignores a failed write of its --help (and so exits 0) in newer Pythons; older
    # ones (Debian 12's 3.11.2) let it reach gpuwatch, which exits 141 as for any other command
    assert done.returncode == (0 if argv == ["--help"] and _argparse_ignores_failed_writes() else 141)


def _argparse_ignores_failed_writes() -> bool:
    class Gone(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError

    try:
        argparse.ArgumentParser()._print_message("x", Gone())
    except OSError:
        return False
    return True


def test_status_json_piped_into_head_ends_quietly(mine: int, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    done = subprocess.run(
        ["bash", "-c", f'set -o pipefail; "$0" -m gpuwatch status --json -c {config} | head -c 10', sys.executable],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout == '{\n  "taken'
    assert done.stderr == ""
    assert done.returncode in (0, 141)  # 141 when head left before gpuwatch wrote all


# ---------------------------------------------------------------- status: filters and --watch


def test_status_shows_only_the_hosts_users_and_free_gpus_asked_for(mine: int, tmp_path: Path) -> None:
    config = write_config(tmp_path, ["localhost", GONE])
    code, out = cli(config, "status", "localhost")
    assert code == 0 and "gpu-gone" not in out  # not even polled
    assert "1 of 1 host answered, 4 GPUs" in out

    code, out = cli(config, "status", "--user", ME)
    rows = [line.split()[:2] for line in out.splitlines() if line.startswith("localhost ")]
    assert rows == [["localhost", "0"], ["localhost", "1"]]  # the GPUs this user is on
    assert re.search(r"^gpu-gone\s+-\s+DOWN unreachable", out, re.M)  # a host that did not answer stays
    assert out.rstrip().endswith(f"showing only: user {ME}")

    code, doc_text = cli(config, "status", "--free", "--json")
    doc = json.loads(doc_text)
    local, gone = doc["hosts"]
    assert [g["index"] for g in local["gpus"]] == [2, 3] and all(g["free"] for g in local["gpus"])
    assert local["processes"] == []
    assert gone["name"] == "gpu-gone" and gone["ok"] is False and gone["error_kind"] == "unreachable"
    assert doc["summary"]["free_gpus"] == doc["summary"]["gpus"] == 2

    code, out = cli(config, "status", "--user", ME, "--free")
    assert code == 0 and not [line for line in out.splitlines() if line.startswith("localhost ")]


def test_status_names_a_host_it_does_not_know(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, ["gpu-alpha", "gpu-beta"])
    code, _ = cli(config, "status", "gpu-alpa")
    assert code == 2
    assert "'gpu-alpa' is not a configured host; did you mean 'gpu-alpha'?" in capsys.readouterr().err
    code, _ = cli(config, "status", "--watch", "0.1")
    assert code == 2 and "at least 0.5s" in capsys.readouterr().err


def _watch(config: Path, out: io.StringIO, *extra: str) -> tuple[int, list[float], int]:
    """``status --watch 2`` for 3 polls, waiting nowhere: (exit code, the waits asked for, pollers built)."""
    built = []
    real_build = status_cli.build_poller

    def counting_build(*args: Any, **kwargs: Any) -> Any:
        built.append(1)
        return real_build(*args, **kwargs)

    waits: list[float] = []
    args = build_parser().parse_args(["status", "--watch", "2", *extra, "-c", str(config)])
    status_cli.build_poller = counting_build  # type: ignore[assignment]
    try:
        code = status_cli.cmd_status(load_config(config), args, out, wait=waits.append, max_polls=3)
    finally:
        status_cli.build_poller = real_build  # type: ignore[assignment]
    return code, waits, len(built)


def test_status_watch_redraws_in_place_on_a_terminal_with_one_set_of_connections(mine: int, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    screen = Terminal()
    code, waits, pollers = _watch(config, screen)
    assert (code, pollers, len(waits)) == (0, 1, 2)  # 3 polls, one poller: connections kept
    assert all(0 <= w <= 2 for w in waits)
    frames = screen.getvalue().split(status_cli.CLEAR)
    assert frames[0] == "" and len(frames) == 4  # each poll homes and clears the screen first
    for frame in frames[1:]:
        assert frame.startswith("gpuwatch status, every 2s (Ctrl-C stops)\n\nHOST ")
        assert "1 of 1 host answered, 4 GPUs, 2 free" in frame

    piped = io.StringIO()  # not a terminal: no escape codes, the tables one after another
    _watch(config, piped)
    assert "\x1b" not in piped.getvalue() and piped.getvalue().count("HOST ") == 3


def test_status_watch_json_is_one_document_per_poll(mine: int, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    out = io.StringIO()
    _watch(config, out, "--json")
    docs = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(docs) == 3 and all(d["summary"]["gpus"] == 4 for d in docs)


def test_status_watch_ends_with_ctrl_c_and_exit_0(mine: int, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpuwatch", "status", "--watch", "0.5", "--json", "-c", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first, second = proc.stdout.readline(), proc.stdout.readline()
        assert json.loads(first)["taken_at"] <= json.loads(second)["taken_at"]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "Traceback" not in err, err


# ---------------------------------------------------------------- silences, check --json


def test_silences_by_pid_with_an_author_removed_by_the_id_as_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, ["gpu-a"])
    code, out = cli(config, "silence", "add", "--host", "gpu-a", "--pid", "4100", "--for", "2h", "--comment", "ok")
    assert code == 0 and out.startswith("silence #1 added: host=gpu-a pid=4100 until ") and out.endswith(f" by {ME}\n")
    code, out = cli(
        config, "silence", "add", "--rule", "max_runtime", "--for", "1h", "--comment", "x", "--author", "bob"
    )
    assert code == 0
    code, out = cli(config, "silence", "list")
    first, second = out.splitlines()
    assert first.startswith("#1  host=gpu-a pid=4100  until ") and first.endswith(f" by {ME}  (ok)")
    assert second.startswith("#2  rule=max_runtime  until ") and " by bob  (x)" in second
    code, out = cli(config, "silence", "list", "--json")
    listed = json.loads(out)
    assert [(s["id"], s["pid"], s["author"]) for s in listed] == [(1, 4100, ME), (2, None, "bob")]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", listed[0]["ends_at"])  # ISO 8601, not epoch

    assert cli(config, "silence", "remove", "#1", "2") == (0, "silence #1 removed\nsilence #2 removed\n")
    assert cli(config, "silence", "remove", "#1") == (1, "no silence #1\n")
    capsys.readouterr()
    code, _ = cli(config, "silence", "remove", "#one")
    assert code == 2 and "give one as 'silence list' shows it: 3 or #3" in capsys.readouterr().err


def test_check_json_and_its_warnings_said_once(mine: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, mode=0o644, feishu={"url": "http://127.0.0.1:9/hook/x", "secret": "s3cret-value"})
    capsys.readouterr()
    code, out = cli(config, "check")
    err = capsys.readouterr().err
    assert code == 0
    assert out.count("is readable by other users") == 1 and "readable" not in err  # said once, in the report
    assert "localhost: OK: 4 GPUs, 6 GPU processes (" in out

    code, out = cli(config, "check", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["ready"] is True and doc["problems"] == [] and doc["config"] == str(config)
    (host,) = doc["hosts"]
    assert (host["name"], host["ok"], host["gpus"], host["processes"]) == ("localhost", True, 4, 6)
    assert len(doc["warnings"]) == 1 and "readable by other users" in doc["warnings"][0]


def test_counts_read_right(local_standin: Path, tmp_path: Path) -> None:
    scenario_healthy_multi_gpu(local_standin, 1, busy_gpus=())
    config = write_config(tmp_path)
    _, out = cli(config, "check")
    assert "localhost: OK: 1 GPU, 0 GPU processes (" in out
    assert cli(config, "run", "--dry-run", "-v")[0] == 0
    log = (tmp_path / "state" / "gpuwatch.log").read_text()
    assert re.search(r"queued GPU overview .* for console \(1 part\)", log), log


# ---------------------------------------------------------------- logging


@pytest.fixture
def shanghai(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "Asia/Shanghai")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_log_lines_say_their_time_zone(shanghai: None, mine: int, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    cli(config, "status")
    lines = (tmp_path / "state" / "gpuwatch.log").read_text().splitlines()
    assert lines and all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+08:00 INFO ", line) for line in lines)


def test_start_up_is_info_and_still_on_stderr_while_each_poll_is_not(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = load_config(write_config(tmp_path))
    setup_logging(config.state_dir, level="INFO", stderr_level="WARNING")
    db = open_db(None)
    try:
        daemon = Daemon(config, None, Outbox(db), {}, alert_store=AlertStore(db))  # type: ignore[arg-type]
        daemon._announce()
        logging.getLogger("gpuwatch.poll").info("poll: localhost ok (4 GPUs, 0.05s)")
    finally:
        db.close()
    err = capsys.readouterr().err
    assert "gpuwatch: INFO: gpuwatch running: 1 host, poll every 1m, reports: overview every 1h" in err
    assert "poll: localhost" not in err  # the file has every poll; stderr (the journal) does not
    log = (tmp_path / "state" / "gpuwatch.log").read_text()
    assert " INFO gpuwatch.daemon: gpuwatch running: 1 host" in log and "WARNING" not in log
    assert " INFO gpuwatch.poll: poll: localhost ok" in log


def test_dry_run_never_says_delivered(mine: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, feishu={"url": "http://127.0.0.1:9/open-apis/bot/v2/hook/x", "keyword": "GPU"})
    capsys.readouterr()
    code, out = cli(config, "run", "--dry-run", "-v")
    err = capsys.readouterr().err
    log = (tmp_path / "state" / "gpuwatch.log").read_text()
    assert code == 0 and "----- would send to feishu -----" in out
    for text in (err, log):
        assert "delivered" not in text and " sent," not in text
        assert "printed, not sent (dry run)" in text
