"""Command line: ``main(argv) -> exit code``.

Each command group lives in its own module beside its output (``status``, ``run``, ``alerts``,
``notify``) and registers its subcommands; :mod:`.wiring` is the one place that builds the parts
(runners, poller, channels) from a config. ``main`` parses, loads the config, sets up logging and
calls the command's handler.

Exit codes: 0 success, 1 the work failed (no host answered, a message left unsent, another
gpuwatch holds the state directory; ``alerts``: an alert fires), 2 bad config or usage, or a
state directory that cannot be used (read-only, full, not a directory), 130 Ctrl-C, 141 the
reader of the output went away (``gpuwatch status --json | head -1``: ended quietly, as a C
program killed by SIGPIPE would). Errors are one clear line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from .. import __version__
from ..config import ConfigError, find_config_path
from ..config.load import load_config
from ..logsetup import setup_logging
from ..statedir import StateError
from . import alerts, completion, demo, notify, reserve, run, status, usage, wishes
from .common import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, UsageError
from .manpage import render_manpage
from .wiring import attach_web, build_channels, build_poller, make_runner_factory, secrets

__all__ = [
    "EXIT_CONFIG",
    "EXIT_FAILED",
    "EXIT_OK",
    "UsageError",
    "attach_web",
    "build_channels",
    "build_parser",
    "build_poller",
    "main",
    "main_entry",
    "make_runner_factory",
]

log = logging.getLogger(__name__)

# The command groups, in the order --help lists them.
COMMAND_GROUPS = (run, status, alerts, usage, reserve, notify, wishes, demo, completion)
EXIT_BROKEN_PIPE = 128 + 13  # SIGPIPE


def build_parser() -> argparse.ArgumentParser:
    # -c and -v are accepted before or after the command; the command's copies default to
    # SUPPRESS so that they never overwrite a value given before the command.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-c", "--config", default=argparse.SUPPRESS, help="config file (default: $GPUWATCH_CONFIG, else ./config.yaml)"
    )
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log more to stderr")

    parser = argparse.ArgumentParser(
        prog="gpuwatch",
        description="Watch a fleet of NVIDIA GPU servers over SSH and report to Feishu.",
    )
    parser.add_argument("-c", "--config", help="config file (default: $GPUWATCH_CONFIG, else ./config.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more to stderr")
    parser.add_argument("-V", "--version", action="version", version=f"gpuwatch {__version__}")
    parser.add_argument("--once", dest="once_top", action="store_true", help="same as 'run --once'")
    parser.add_argument("--dry-run", dest="dry_run_top", action="store_true", help="same as 'run --dry-run'")
    parser.add_argument(
        "--report", dest="report_top", action="append", metavar="NAME", help="same as 'run --report NAME'"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", help="what to do (default: run, the daemon)")
    for group in COMMAND_GROUPS:
        group.register(sub, common)
    man = sub.add_parser(
        "man",
        help="print the manual page (roff), made from this parser: gpuwatch man | man -l -",
        description="Print the manual page for gpuwatch, every command and option as --help shows them, "
        "with the exit codes, environment and files. Read it with: gpuwatch man | man -l -; install it with: "
        "gpuwatch man | sudo tee /usr/local/share/man/man1/gpuwatch.1",
    )
    man.set_defaults(handler=None, standalone=_cmd_man)
    parser.set_defaults(handler=run.handle)  # bare `gpuwatch` is the daemon
    return parser


def _cmd_man(args: argparse.Namespace, out: TextIO) -> int:
    out.write(render_manpage(build_parser(), __version__))
    return EXIT_OK


# Commands that record nothing in the state directory: a user who may not write it (a read-only
# mount, the service's directory seen by an admin) can still run them; the log file is optional.
READ_ONLY_COMMANDS = frozenset({"status", "check", "alerts", "test-notify", "usage"})


def _only_reads(command: str, args: argparse.Namespace) -> bool:
    if command == "silence":
        return getattr(args, "silence_command", None) == "list"
    if command == "ack":
        return getattr(args, "action", None) == "list"
    if command == "reserve":
        return getattr(args, "reserve_command", None) == "list"
    if command == "run":
        return bool(getattr(args, "dry_run", False) or args.dry_run_top)
    if command in wishes.COMMANDS.values():
        return wishes.only_reads(args)
    return command in READ_ONLY_COMMANDS


def _log_dir(command: str, state_dir: Path) -> Path | None:
    """Where the command logs: ``check`` creates nothing (it adds to the log of a state directory
    that exists, and logs to stderr alone before the first ``run`` made one)."""
    if command == "check" and not state_dir.is_dir():
        return None
    return state_dir


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    parser = build_parser()
    args = parser.parse_args(argv)
    command = args.command or "run"
    if command != "run" and (args.once_top or args.dry_run_top or args.report_top):
        parser.error(f"--once, --report and --dry-run go with 'run', not '{command}'")
    standalone = getattr(args, "standalone", None)
    if standalone is not None:  # a command that needs no config file (demo)
        try:
            code: int = standalone(args, out)
            return code
        except ConfigError as exc:
            print(f"gpuwatch: error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        except KeyboardInterrupt:
            return 130
    try:
        config = load_config(find_config_path(args.config))
    except ConfigError as exc:
        print(f"gpuwatch: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    unlogged: list[StateError] = []  # a command that only reads goes on without its log file
    try:
        setup_logging(
            _log_dir(command, config.state_dir),
            level="DEBUG" if args.verbose else config.log_level,
            stderr_level="INFO" if args.verbose else "WARNING",
            secrets=secrets(config),
            on_file_error=unlogged.append if _only_reads(command, args) else None,
        )
    except StateError as exc:
        print(f"gpuwatch: error: {exc}", file=sys.stderr)
        return exc.exit_code
    if not getattr(args, "shows_warnings", False):  # check prints them in its own report: said once
        for warning in config.warnings:
            log.warning("%s", warning)
    try:
        result: int = args.handler(config, args, out)
        for problem in unlogged:  # said after its output (an error instead is said alone, in one line)
            print(f"gpuwatch: note: nothing was logged to a file: {problem.problem}", file=sys.stderr)
        return result
    except ConfigError as exc:
        kind = "error" if isinstance(exc, UsageError) else "config error"
        print(f"gpuwatch: {kind}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except StateError as exc:
        print(f"gpuwatch: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def main_entry() -> None:
    """The console script. When the reader of the output goes away (``| head -1``), it ends
    quietly with 141, as a C program killed by SIGPIPE would: no traceback."""
    try:
        try:
            code: int | str | None = main()
        except SystemExit as exc:  # argparse: --help, --version, a usage error
            code = exc.code if isinstance(exc.code, (int, str)) or exc.code is None else 1
        sys.stdout.flush()
    except BrokenPipeError:
        # Whatever is still buffered for stdout can never be written; point stdout at /dev/null
        # so that the interpreter's own flush at exit does not complain about it either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        code = EXIT_BROKEN_PIPE
    sys.exit(code)
