"""Pure: Feishu interactive cards in card JSON 2.0, designed from a message's structure.

Why 2.0 (``"schema": "2.0"``) and not 1.0: 2.0 cards take standard markdown with ``<font color>``,
``<text_tag>`` and ``<br>`` in one ``markdown`` component, a header with a subtitle and coloured
count tags, background colours on a ``column_set``, and a ``button`` straight in the body (1.0
needs an ``action`` module for it); Feishu documents HTML character references as the escape for
its card markdown. The cost: clients older than Feishu 7.20 (2024) show a 2.0 card's title and an
"upgrade" notice instead of its body; groups on such clients keep ``format: post``.

The layout, made to read at a glance and to stay small (Feishu takes 200 components per card and
20 KB per request):

* the header: the title, the summary as its subtitle, up to three coloured count tags (``3 free``,
  ``1 down``), and a colour for the whole (red when a host is down or an alert fires);
* @-mentions first, as ``<at id=...></at>``;
* one section per host or alert: a host's name in bold with its GPUs' model and count, then one
  line per GPU (index, model, a utilization and a memory bar made of characters, who is on it),
  free GPUs in green; a host that did not answer is a red band with its reason (the report puts
  those first); an alert is a band coloured by its state;
* a button to the page when ``web.public_url`` is set.

Every value from a host goes through :func:`~gpuwatch.notify.markup.lark_md` (markdown) or
:func:`~gpuwatch.notify.markup.feishu_text` (plain text).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..message import Body, Section
from .markup import feishu_text, lark_md

#: The card's header colour for a message's state.
HEADER = {
    "firing": "red",
    "down": "red",
    "stale": "red",
    "reminder": "orange",
    "warning": "orange",
    "resolved": "green",
    "ok": "green",
    "free": "green",
    "notice": "wathet",
    "info": "blue",
    "busy": "blue",
}
#: Text colour (``<font color>``, ``text_tag``) for a row's or a section's state.
TEXT = {
    "free": "green",
    "down": "red",
    "stale": "red",
    "firing": "red",
    "reminder": "orange",
    "warning": "orange",
    "resolved": "green",
    "notice": "blue",
}
#: Background of a section's band (``column_set.background_style``) for its state.
BAND = {
    "down": "red-50",
    "stale": "red-50",
    "firing": "red-50",
    "reminder": "orange-50",
    "warning": "orange-50",
    "resolved": "green-50",
    "notice": "blue-50",
}
#: Header tag colours (``text_tag.color`` takes fewer names than ``<font>``).
TAG = {"free": "green", "down": "red", "stale": "red", "firing": "red", "resolved": "green", "reminder": "orange"}

MAX_COMPONENTS = 200  # Feishu: "a card holds at most 200 elements or components"
BUTTON_TEXT = "Open the GPU page"


def designed(
    title: str, body: Body, sections: Sequence[Section], mentions: Sequence[str], link: str | None
) -> dict[str, Any]:
    """A 2.0 card of ``sections`` (one part of ``body``) under ``title``."""
    elements: list[dict[str, Any]] = []
    if mentions:
        elements.append(_mentions(mentions))
    elements += [element for section in sections for element in _section(section)]
    if link:
        elements.append(_button(link))
    header: dict[str, Any] = {
        # The summary is the subtitle: said once, and the tags stay on the title's line.
        "title": _plain(title.replace(f": {body.summary}", "") if body.summary else title),
        "template": HEADER.get(body.state, "blue"),
    }
    shown = body.tags[:3]
    # A subtitle that only repeats the tags ("2 firing" twice, as an alert's counts are) is left out.
    if body.summary and body.summary != ", ".join(text for text, _ in shown):
        header["subtitle"] = _plain(body.summary)
    tags = [{"tag": "text_tag", "text": _plain(text), "color": TAG.get(state, "neutral")} for text, state in shown]
    if tags:
        header["text_tag_list"] = tags
    return _card(title, header, elements)


def plain(
    title: str, blocks: Sequence[str], mentions: Sequence[str], severity: str, link: str | None
) -> dict[str, Any]:
    """A 2.0 card of plain text blocks (a message without structure, e.g. a test message): each
    block a ``plain_text`` component, shown as written (a mention tag from a host broken)."""
    elements: list[dict[str, Any]] = []
    if mentions:
        elements.append(_mentions(mentions))
    elements += [{"tag": "div", "text": _plain(block)} for block in blocks]
    if link:
        elements.append(_button(link))
    header = {"title": _plain(title), "template": HEADER.get(severity, "blue")}
    return _card(title, header, elements)


def _card(title: str, header: dict[str, Any], elements: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "schema": "2.0",
        "config": {"update_multi": True, "width_mode": "fill", "summary": {"content": feishu_text(title)}},
        "header": header,
        "body": {"elements": elements},
    }


def _plain(text: str) -> dict[str, str]:
    """Text from a host as a ``plain_text`` object: shown as written, a mention tag broken (Feishu
    documents no mentions in plain text; this does not rely on it)."""
    return {"tag": "plain_text", "content": feishu_text(text)}


def _mentions(mentions: Sequence[str]) -> dict[str, Any]:
    # The ids come from the config (feishu.mentions), never from a host.
    return {"tag": "markdown", "content": " ".join(f"<at id={m}></at>" for m in mentions)}


def _button(link: str) -> dict[str, Any]:
    return {
        "tag": "button",
        "text": {"tag": "plain_text", "content": BUTTON_TEXT},
        "type": "primary",
        "behaviors": [{"type": "open_url", "default_url": link}],
    }


def _font(text: str, state: str) -> str:
    colour = TEXT.get(state)
    return f"<font color='{colour}'>{text}</font>" if colour else text


def _section(section: Section) -> list[dict[str, Any]]:
    head = f"**{_font(lark_md(section.title), section.state)}**"
    if section.note:
        head += f" <font color='grey'>· {lark_md(section.note)}</font>"
    lines = [head]
    for row in section.rows:
        cells = [lark_md(cell) for cell in row.cells if cell]
        if len(cells) > 1:
            cells[0] = f"**{cells[0]}**"  # a row's key: a GPU's index
        lines.append(_font(" · ".join(cells), row.state))
    content = "<br>".join(lines)
    band = BAND.get(section.state)
    if band is None:
        return [{"tag": "markdown", "content": content, "margin": "8px 0 0 0"}]
    return [
        {
            "tag": "column_set",
            "flex_mode": "none",
            "background_style": band,
            "margin": "8px 0 0 0",
            "columns": [
                {
                    "tag": "column",
                    "width": "weighted",
                    "weight": 1,
                    "padding": "4px 8px 4px 8px",
                    "elements": [{"tag": "markdown", "content": content}],
                }
            ],
        }
    ]


def components(value: object) -> int:
    """How many components and text elements a card holds, as Feishu counts toward its 200."""
    if isinstance(value, Mapping):
        own = 1 if "tag" in value else 0
        return own + sum(components(v) for v in value.values())
    if isinstance(value, list):
        return sum(components(v) for v in value)
    return 0


def texts(card: Mapping[str, Any]) -> list[str]:
    """The card's text as a person reads it, in order: title, subtitle, then each component's."""
    header = card.get("header", {})
    found = [str(header.get("title", {}).get("content", ""))]
    subtitle = header.get("subtitle", {}).get("content")
    if subtitle:
        found.append(str(subtitle))
    elements = card.get("body", {}).get("elements") if "body" in card else card.get("elements")
    for element in elements or []:
        found += _element_texts(element)
    return found


def _element_texts(element: Mapping[str, Any]) -> list[str]:
    tag = element.get("tag")
    if tag == "column_set":
        inner = [e for column in element.get("columns", []) for e in column.get("elements", [])]
        return [t for e in inner for t in _element_texts(e)]
    if tag == "div":
        text = element.get("text", {}).get("content")
        return [str(text)] if isinstance(text, str) else []
    if tag == "markdown":
        return [str(element.get("content", ""))]
    if tag == "button":
        behaviors = element.get("behaviors", [])
        url = behaviors[0].get("default_url", "") if behaviors else ""
        return [f"{element.get('text', {}).get('content', '')} <{url}>"]
    return []
