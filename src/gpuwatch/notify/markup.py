"""Pure: each chat platform's markup, and what every value from a host must go through to show as written.

A process's command line, a user or host name, an error message: all of it comes from the hosts and
is shown as written, never read as markup. A command such as ``train.py --lr *3e-4* [x](http://a)
<at id=all></at> _b_`` must neither turn bold nor into a link, and above all mention no one. Each
platform needs its own escape:

* Feishu card markdown (``lark_md`` / JSON 2.0 ``markdown``), DingTalk and WeCom markdown: every
  character that has a meaning in their syntax becomes an HTML numeric character reference
  (``*`` -> ``&#42;``), the escape Feishu documents for card markdown and the one CommonMark
  renders as the character itself; ``<`` is always escaped, so no ``<at>``, ``<@id>`` or
  ``<font>`` tag can come from a host;
* Slack: host text goes in ``plain_text`` objects (never parsed), and the ``mrkdwn`` fallback
  text only needs ``&``, ``<`` and ``>`` escaped (Slack's documented rule; ``<!channel>`` and
  ``<@U123>`` need a ``<``);
* Feishu ``text`` and ``post`` text, and card ``plain_text``: every Feishu mention tag (``<at
  user_id=..>``, ``<at id=..>``, ``<at email=..>``, in any letter case) is broken with a
  zero-width space after its ``<`` (they show everything else as written, and have no escape);
* chat markdown for the generic webhook (Mattermost, Rocket.Chat, Discord): CommonMark's and
  Discord's markup characters get a backslash (both show the character alone), and a word
  joiner (U+2060, invisible) follows every ``@`` and ``<`` and splits every ``://`` and ``www.``,
  so no ``@everyone``, ``@here``, ``@channel``, ``<!here>``, ``<@id>``, ``[t](url)``, ``<url|t>``,
  bare URL or e-mail address can mention anyone or make a link, whatever the platform's escapes.

Also here: the markdown layout DingTalk and WeCom share (one line per row, colour by state), and
cutting a :class:`~gpuwatch.message.Section` too big for any part between its rows.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from ..message import Body, Message, Row, Section
from .split import CONTINUED, cut_text, largest, numbered, split

#: Characters with a meaning in Feishu card markdown (the table in Feishu's rich-text component
#: documentation, plus ``&`` so that a literal ``&#42;`` stays literal, ``|`` for tables and
#: ``{}`` for card variables).
LARK_MD_SPECIAL = frozenset("\\`*_~[]()<>#+-!:|{}\"'$&/")
#: CommonMark's punctuation that can start or end markup, plus ``<``, ``>`` and ``&`` (HTML and
#: entities) and ``:`` (emoji codes); DingTalk and WeCom markdown are CommonMark dialects.
MARKDOWN_SPECIAL = frozenset("\\`*_~[]()<>#+-!:|{}&@")

ZERO_WIDTH_SPACE = "\u200b"
#: Invisible and unbreakable: ``@\u2060here`` reads as "@here" and mentions no one.
WORD_JOINER = "\u2060"
#: Characters with a meaning in CommonMark (Mattermost, Rocket.Chat) or Discord markdown: each gets
#: a backslash, which both show as the character itself.
CHAT_MARKDOWN_SPECIAL = frozenset("\\`*_~[]()<>#|!&")
#: Where a link starts: a scheme's ``://`` and ``www.`` (any case).
_LINK_START = re.compile(r"(?i)(?<=[a-z0-9+.-])(?=\\?:\\?/\\?/)|(?<=\bwww)(?=\.)")
#: Feishu's mention tags, in any letter case and spacing: ``<at user_id=..>``, ``<AT id=..>``, ``< At email=..>``.
_FEISHU_AT = re.compile(r"<(?=\s*/?\s*at\b)", re.IGNORECASE)


def entities(text: str, special: frozenset[str]) -> str:
    """``text`` with each character of ``special`` as ``&#N;``, and line breaks as spaces (a value
    is shown on the line it was put on)."""
    text = text.replace("\r", " ").replace("\n", " ")
    return "".join(f"&#{ord(c)};" if c in special else c for c in text)


def lark_md(text: str) -> str:
    """A value from a host, for Feishu card markdown."""
    return entities(text, LARK_MD_SPECIAL)


def markdown(text: str) -> str:
    """A value from a host, for DingTalk and WeCom markdown."""
    return entities(text, MARKDOWN_SPECIAL)


def slack_escape(text: str) -> str:
    """Slack's three control characters, escaped as Slack documents (for ``mrkdwn`` text)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def feishu_text(text: str) -> str:
    """Text from a host for Feishu's text, post text or card ``plain_text``: every mention tag
    (``<at ...>`` in any letter case, with any attribute) broken so that it mentions no one."""
    return _FEISHU_AT.sub(f"<{ZERO_WIDTH_SPACE}", text)


def chat_markdown(text: str) -> str:
    """Text from a host for the markdown of Mattermost, Rocket.Chat or Discord: shown as written,
    mentioning no one and linking nowhere (see the module docstring). Line breaks are kept."""
    escaped = "".join(f"\\{c}" if c in CHAT_MARKDOWN_SPECIAL else c for c in text)
    escaped = escaped.replace("@", f"@{WORD_JOINER}").replace("<", f"<{WORD_JOINER}")
    return _LINK_START.sub(WORD_JOINER, escaped)


# ---------------------------------------------------------------------- sections too big alone


def cut_section(section: Section, fits_alone: Callable[[Section], bool]) -> list[Section]:
    """Cut a section that cannot fit any part into pieces that can, between its rows; the pieces
    after the first are titled "... (continued)". A row too big on its own has its last cell
    shortened (with "…"). Empty when not even the title fits."""
    pieces: list[Section] = []
    rows = list(section.rows)
    start = 0
    while True:
        index = len(pieces)
        title = section.title if index == 0 else f"{section.title} {CONTINUED}"
        head = replace(section, title=title, note=section.note if index == 0 else "", rows=())
        rest = rows[start:]

        def rows_fit(n: int, head: Section = head, rest: list[Row] = rest) -> bool:
            return fits_alone(replace(head, rows=tuple(rest[:n])))

        if not rest:
            if index == 0:
                return [head] if fits_alone(head) else []
            return pieces
        count = largest(len(rest), rows_fit)
        if count:
            pieces.append(replace(head, rows=tuple(rest[:count])))
            start += count
            continue
        if not fits_alone(head):
            return []
        row = rest[0]
        last = row.cells[-1] if row.cells else ""

        def chars_fit(n: int, head: Section = head, row: Row = row, last: str = last) -> bool:
            shortened = replace(row, cells=(*row.cells[:-1], last[:n] + "…"))
            return fits_alone(replace(head, rows=(shortened,)))

        keep = largest(len(last), chars_fit)
        pieces.append(replace(head, rows=(replace(row, cells=(*row.cells[:-1], last[:keep] + "…")),)))
        start += 1


# ---------------------------------------------------------------------- markdown for DingTalk and WeCom


def markdown_lines(
    title: str,
    body: Body | None,
    sections: Sequence[Section],
    *,
    color: Callable[[str, str], str],
    escape: Callable[[str], str] = markdown,
    link: str | None = None,
) -> list[str]:
    """A designed message as markdown lines (a channel joins them with its own line break).

    ``color(text, state)`` wraps already-escaped text in the platform's colour for a state (or
    returns it as it is). Host values are escaped; the markup around them is gpuwatch's own.
    """
    lines = [f"#### {escape(title)}"]
    if body is not None and body.summary:
        lines.append(color(escape(body.summary), body.state))
    for section in sections:
        head = f"**{color(escape(section.title), section.state)}**"
        if section.note:
            head += f" · {color(escape(section.note), section.state)}"
        lines.append("")
        lines.append(head)
        for row in section.rows:
            text = " · ".join(escape(cell) for cell in row.cells if cell)
            lines.append(color(text, row.state) if row.state in _COLOURED_ROWS else text)
    if link:
        lines += ["", f"[Open the GPU page]({link})"]
    return lines


#: Row states worth a colour in a line of markdown (a busy GPU stays in the default colour).
_COLOURED_ROWS = frozenset({"free", "down", "stale", "warning", "firing", "reminder", "resolved"})


def block_line(line: str, escape: Callable[[str], str] = markdown) -> str:
    """A line of a plain text block as markdown: escaped, its indentation kept (as no-break
    spaces, which markdown neither strips nor reads as a code block)."""
    stripped = line.lstrip(" ")
    return "&#160;" * (len(line) - len(stripped)) + escape(stripped)


def text_lines(sections: Sequence[Section]) -> list[str]:
    """A designed message's sections as plain lines (Slack's plain text, previews)."""
    lines: list[str] = []
    for section in sections:
        head = section.title + (f" · {section.note}" if section.note else "")
        lines.append(head)
        lines += ["    " + "  ".join(c for c in row.cells if c) for row in section.rows]
    return lines


def state_colour(palette: Mapping[str, str], state: str, default: str = "") -> str:
    return palette.get(state, default)


def render_parts(
    message: Message,
    title: str,
    render: Callable[[str, Sequence[Any], bool], dict[str, Any]],
    measure: Callable[[dict[str, Any]], int],
    *,
    limit: int,
    what: str,
) -> list[dict[str, Any]]:
    """``message`` as a channel's bodies, in order: its structure's sections (or, without one, its
    text blocks) packed into parts that each measure at most ``limit`` once rendered, titled
    ``title (i/n)``; a unit too big on its own is cut (:func:`cut_section`, :func:`cut_text`).
    ``render(title, units, first)`` makes one body (mentions go in the first); ``what`` names the
    setting in errors."""
    units: Sequence[Any] = message.body.sections if message.body is not None else message.blocks
    cut: Callable[[Any, Callable[[Any], bool]], list[Any]] = cut_section if message.body is not None else cut_text

    def size(part_title: str, part: Sequence[Any], first: bool) -> int:
        return measure(render(part_title, part, first))

    head, parts = split(title, units, size=size, limit=limit, cut=cut, what=what)
    total = len(parts)
    return [render(numbered(head, i, total), part, i == 1) for i, part in enumerate(parts, start=1)]
