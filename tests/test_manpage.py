"""The man page is made from the parser and ``docs/gpuwatch.1`` is current: every command and
option of ``--help`` is in it, and ``man`` reads it without complaint."""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpuwatch import __version__
from gpuwatch.cli import build_parser, main
from gpuwatch.cli.manpage import render_manpage, roff

PAGE = Path(__file__).resolve().parent.parent / "docs" / "gpuwatch.1"


def parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from parsers(sub)


def test_docs_gpuwatch_1_is_the_page_the_parser_makes() -> None:
    out = io.StringIO()
    assert main(["man"], out=out) == 0
    assert out.getvalue() == render_manpage(build_parser(), __version__)
    assert PAGE.read_text(encoding="utf-8") == out.getvalue(), (
        "docs/gpuwatch.1 is out of date: run  python3 -m gpuwatch man > docs/gpuwatch.1"
    )


def test_every_command_and_option_is_in_the_page() -> None:
    page = render_manpage(build_parser(), __version__)
    for parser in parsers(build_parser()):
        assert f'.SS "{roff(parser.prog)}"' in page or parser.prog == "gpuwatch", parser.prog
        for action in parser._actions:
            for flag in action.option_strings:
                assert roff(flag) in page, f"{parser.prog} {flag}"
    for section in ("NAME", "SYNOPSIS", "OPTIONS", "COMMANDS", "EXIT STATUS", "ENVIRONMENT", "FILES"):
        assert f".SH {section}\n" in page
    assert "\\fBNO_COLOR\\fR" in page and "\\fB130\\fR" in page


def test_roff_escapes_what_roff_would_read_as_markup() -> None:
    assert roff("a-b \\x") == "a\\-b \\ex"
    assert roff(".not a request\n'nor this") == "\\&.not a request\n\\&'nor this"


@pytest.mark.skipif(shutil.which("man") is None, reason="no man(1) here")
def test_man_reads_the_page_without_errors() -> None:
    done = subprocess.run(
        ["man", "-l", str(PAGE)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"MANWIDTH": "100", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0
    assert "gpuwatch status" in done.stdout and "EXIT STATUS" in done.stdout
    errors = [line for line in done.stderr.splitlines() if "cannot adjust line" not in line]
    assert errors == []
