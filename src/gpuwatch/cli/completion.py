"""``gpuwatch completion bash|zsh``: a shell completion script, made from the parser itself.

It uses shtab (https://github.com/tqdm/shtab), which writes a static script from the
argparse parser: every command, option and choice (rule names, shells) completes, ``-c`` completes
file names, and pressing TAB never starts Python (argcomplete, the other well-kept choice, runs
the program on every TAB, which here means importing paramiko and friends: a noticeable pause).
"""

from __future__ import annotations

import argparse
from typing import TextIO

import shtab

from .common import EXIT_OK

SHELLS = ("bash", "zsh")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    completion = sub.add_parser(
        "completion",
        help="print a shell completion script (bash or zsh)",
        description="Print a completion script for your shell. Bash: gpuwatch completion bash | sudo tee "
        "/etc/bash_completion.d/gpuwatch (or source it from ~/.bashrc). Zsh: gpuwatch completion zsh > "
        '"${fpath[1]}/_gpuwatch", then start a new shell.',
    )
    completion.add_argument("shell", choices=SHELLS, help="the shell to complete in")
    completion.set_defaults(handler=None, standalone=cmd_completion)


def cmd_completion(args: argparse.Namespace, out: TextIO) -> int:
    from . import build_parser

    parser = build_parser()
    _complete_files(parser, shtab.FILE)
    out.write(shtab.complete(parser, shell=args.shell))
    return EXIT_OK


def _complete_files(parser: argparse.ArgumentParser, files: object) -> None:
    """``-c/--config`` takes a file name, everywhere it is accepted."""
    for action in parser._actions:
        if action.dest == "config":
            action.complete = files  # type: ignore[attr-defined]  # shtab reads this attribute
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _complete_files(sub, files)
