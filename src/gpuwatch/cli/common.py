"""What every command shares: exit codes, the command-line error, JSON output, how a printed
command line names gpuwatch, and the state database opened for a command that only reads."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from ..config import Config, ConfigError
from ..config.shard import Shard, parse_shard
from ..statedir import StateError
from ..store import Database, StateDirClosed, open_for_reading

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


class UsageError(ConfigError):
    """A command-line mistake (not the config file's); exit 2 like a config error."""


def write_json(document: Any, out: TextIO, *, one_line: bool = False) -> None:
    """One JSON document for programs: UTF-8 as is, no NaN or infinity (not JSON), then a newline.
    ``one_line``: compact, one document per line (a stream of them, as ``status --watch --json``)."""
    if one_line:
        out.write(json.dumps(document, ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n")
    else:
        json.dump(document, out, indent=2, ensure_ascii=False, allow_nan=False)
        out.write("\n")
    out.flush()


def program_words(
    argv0: str | None = None,
    which: Callable[[str], str | None] = shutil.which,
    executable: str | None = None,
) -> tuple[str, ...]:
    """How a command line that gpuwatch prints (the ack line under an alert, the command that
    works as another user) must start to run as printed: ``gpuwatch`` when that name on the PATH
    is this very program; otherwise the absolute path of the running one (a venv's
    ``bin/gpuwatch`` under systemd or cron, whose PATH does not hold it), or ``<python> -m
    gpuwatch`` when this runs as a module with no ``gpuwatch`` on the PATH. ``argv0`` (default
    ``sys.argv[0]``), ``which`` and ``executable`` (default ``sys.executable``) are parameters for
    tests."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    on_path = which("gpuwatch")
    if os.path.basename(argv0) == "gpuwatch":
        running = os.path.abspath(argv0) if os.sep in argv0 else which(argv0) or argv0
        if on_path is not None and os.path.realpath(on_path) == os.path.realpath(running):
            return ("gpuwatch",)
        return (running,)
    if on_path is not None:
        return ("gpuwatch",)  # python -m gpuwatch, or main() called by a program: the one on the PATH
    return (executable or sys.executable, "-m", "gpuwatch")


def as_user_command(owner: str, config: Config, words: Sequence[str]) -> str:
    """How to run ``gpuwatch <words> -c <config>`` as ``owner``, in words a shell takes after the
    colon: ``runuser`` for root, ``sudo -u`` for another user where sudo is installed (Debian 12
    has none by default), else the ``runuser`` line for root to run."""
    command = [*program_words(), *words]
    if config.path is not None:
        command += ["-c", str(config.path.resolve())]
    if owner == "root":
        return f"run it as root: {shlex.join(['sudo', *command]) if shutil.which('sudo') else shlex.join(command)}"
    if os.geteuid() == 0:
        return f"run it as {owner}: {shlex.join(['runuser', '-u', owner, '--', *command])}"
    if shutil.which("sudo") is not None:
        return f"run it as {owner}: {shlex.join(['sudo', '-u', owner, *command])}"
    return f"run it as {owner} (as root: {shlex.join(['runuser', '-u', owner, '--', *command])})"


def read_state(config: Config, words: Sequence[str]) -> Database:
    """The state database for a command that only reads (``words``: the command, e.g. ``alerts``);
    where this user cannot enter the state directory, one line with the command that works."""
    try:
        return open_for_reading(config.state_dir)
    except StateDirClosed as exc:
        raise StateError(f"{exc}; {as_user_command(exc.owner, config, words)}") from None


def shard_option(value: str) -> Shard:
    """``--shard K/N`` (argparse's ``type``): a bad value is argparse's usage error, exit 2."""
    try:
        return parse_shard(value, "--shard")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--shard: ")) from None


def add_shard_option(parser: argparse.ArgumentParser, what: str) -> None:
    """``--shard K/N`` on ``run``, ``status`` and ``check`` (it wins over the config's ``shard:``)."""
    parser.add_argument(
        "--shard",
        type=shard_option,
        metavar="K/N",
        help=f"{what} only the hosts of shard K of N (a stable hash of each host's name; 1/1: all); "
        "wins over the config's shard:",
    )
