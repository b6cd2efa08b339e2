"""``gpuwatch man``: the manual page (roff, section 1), made from the argparse parser itself.

Every command, option and help text comes from the parser, so the page cannot drift from
``--help``; the sections the parser does not hold (exit status, environment, files) are written
here. ``docs/gpuwatch.1`` is this output, checked by a test to be current; ``man ./docs/gpuwatch.1``
reads it. The output has no date and does not depend on the terminal's width, so it is the same
on every machine. (``argparse-manpage`` from PyPI would do the option lists too, but it is one
more dependency, reads the parser through a setup.cfg/pyproject entry, and has nowhere for the
exit codes; this is about a hundred lines.)
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

EXIT_STATUS = (
    ("0", "success (check: ready; alerts: nothing fires; status --watch: ended by Ctrl-C)"),
    (
        "1",
        "the work failed: no host answered, a message was left unsent, another gpuwatch holds the state "
        "directory; status --user: the user has no GPU process; alerts: an alert fires",
    ),
    ("2", "a bad config or usage, or a state directory that cannot be used"),
    ("130", "interrupted by Ctrl-C (except status --watch, which ends with 0)"),
    ("141", "the reader of the output went away (gpuwatch status --json | head -1)"),
)
ENVIRONMENT = (
    ("GPUWATCH_CONFIG", "the config file when -c is not given (else ./config.yaml)"),
    ("NO_COLOR", "set to anything but the empty string: status prints no colour unless --color=always"),
    ("TZ", "the zone of the times printed for people"),
)
FILES = (
    ("config.yaml", "the config; config.example.yaml documents every key"),
    ("STATE_DIR/gpuwatch.log", "the log (state_dir: in the config; default ./logs beside the config)"),
    ("STATE_DIR/gpuwatch.db", "alert state, silences and the outbox of unsent messages (SQLite)"),
)


def roff(text: str) -> str:
    """Text as roff shows it as written: backslashes, hyphens, and a leading dot or quote escaped."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    lines = [("\\&" + line) if line.startswith((".", "'")) else line for line in text.splitlines()]
    return "\n".join(lines)


def _usage(parser: argparse.ArgumentParser) -> str:
    """The usage line at a fixed width (``--help`` wraps at the terminal's)."""
    formatter = argparse.HelpFormatter(parser.prog, width=10_000)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups, prefix="")
    return " ".join(formatter.format_help().split())


def _invocation(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"\\fI{roff(action.metavar if isinstance(action.metavar, str) else action.dest)}\\fR"
    names = ", ".join(f"\\fB{roff(name)}\\fR" for name in action.option_strings)
    if action.nargs == 0:
        return names
    metavar = action.metavar if isinstance(action.metavar, str) else action.dest.upper()
    if action.choices is not None and action.metavar is None:
        metavar = "{" + ",".join(str(c) for c in action.choices) + "}"
    return f"{names} \\fI{roff(metavar)}\\fR"


def _options(parser: argparse.ArgumentParser, top: bool) -> Iterator[str]:
    """Each option as a tagged paragraph; below the top, without ``-h`` and the common ``-c``/``-v``
    (said once, under OPTIONS)."""
    formatter = argparse.HelpFormatter(parser.prog, width=10_000)
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction):
            continue
        common = isinstance(action, argparse._HelpAction) or action.default == argparse.SUPPRESS
        if not top and common:
            continue
        yield ".TP"
        yield _invocation(action)
        yield roff(formatter._expand_help(action) if action.help else "")


def _subcommands(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser, str]]:
    """(name, parser, one-line help) of each subcommand, nested ones after their parent."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
        for name, sub in action.choices.items():
            yield name, sub, helps.get(name, "")
            yield from _subcommands(sub)


def render_manpage(parser: argparse.ArgumentParser, version: str) -> str:
    """The whole page for ``parser`` (the ``gpuwatch`` parser) as roff."""
    lines = [
        f'.TH GPUWATCH 1 "" "gpuwatch {roff(version)}" "User Commands"',
        ".SH NAME",
        f"gpuwatch \\- {roff(parser.description or '')}",
        ".SH SYNOPSIS",
        roff(_usage(parser)),
        ".SH DESCRIPTION",
        roff(
            "gpuwatch polls NVIDIA GPU servers over SSH (one nvidia-smi and ps probe per host and poll), "
            "says who uses which GPU, raises alerts on transitions and sends reports to chat channels, "
            "e-mail, a web page, a JSON API and /metrics. Without a command it runs the daemon. "
            "Every command takes -c FILE and -v, before or after the command."
        ),
        ".SH OPTIONS",
        *_options(parser, top=True),
        ".SH COMMANDS",
    ]
    for _, sub, summary in _subcommands(parser):
        lines.append(f'.SS "{roff(sub.prog)}"')
        lines.append(roff(summary))
        lines.append(".PP")
        lines.append(f"\\fBUsage:\\fR {roff(_usage(sub))}")
        if sub.description:
            lines.append(".PP")
            lines.append(roff(sub.description))
        lines.extend(_options(sub, top=False))
    for title, rows in (("EXIT STATUS", EXIT_STATUS), ("ENVIRONMENT", ENVIRONMENT), ("FILES", FILES)):
        lines.append(f".SH {title}")
        for key, text in rows:
            lines += [".TP", f"\\fB{roff(key)}\\fR", roff(text)]
    lines += [".SH SEE ALSO", "README.md and config.example.yaml in the gpuwatch sources; ssh_config(5)"]
    return "\n".join(lines) + "\n"
