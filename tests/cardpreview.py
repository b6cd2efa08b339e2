"""Draw a Feishu card (JSON 2.0) as HTML, to look at it: the structure as Feishu lays it out.

Not Feishu's renderer: a small drawing of the components gpuwatch sends (header with template
colour, subtitle and tags; markdown with ``**``, ``<font>``, ``<br>``, ``<at>``; ``column_set``
bands with their background; ``div`` plain text; ``button``), with the colours of Feishu's
published colour enumeration. Markdown is drawn the way CommonMark does it: character references
(``&#42;``) show as the character, so what gpuwatch escaped shows as written.

``python3 tests/cardpreview.py OUT.png`` renders a sample overview and alert card from real
nvidia-smi captures and takes a headless-chromium screenshot of it (the README's picture).
"""

from __future__ import annotations

import html
import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# Feishu's colour enumeration (light theme), the names gpuwatch uses.
COLOURS = {
    "red": "#C02A26",
    "green": "#1A7526",
    "orange": "#A44904",
    "blue": "#1456F0",
    "grey": "#646a73",
    "wathet": "#076A94",
    "red-50": "#FEF0F0",
    "green-50": "#E4FAE1",
    "orange-50": "#FFF3E5",
    "blue-50": "#F0F4FF",
    "neutral": "#646a73",
}
HEADERS = {  # header template -> (background, title colour)
    "red": ("#FEE3E2", "#A11C17"),
    "green": ("#D0F5CE", "#0B6017"),
    "orange": ("#FEE7CD", "#853A05"),
    "blue": ("#E0E9FF", "#0442D2"),
    "wathet": ("#CAEFFC", "#0F587A"),
    "grey": ("#eff0f1", "#1f2329"),
}


def markdown_html(content: str) -> str:
    """Card markdown as HTML: the few constructs gpuwatch sends; everything else is text."""
    out = content
    out = re.sub(r"<at id=([^>]*)></at>", lambda m: f"<span class=at>@{m.group(1)}</span>", out)
    out = re.sub(
        r"<font color='([a-z0-9-]+)'>",
        lambda m: f'<span style="color:{COLOURS.get(m.group(1), m.group(1))}">',
        out,
    )
    out = out.replace("</font>", "</span>")
    out = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", out)
    # Character references stay as they are: the browser shows &#42; as *, as Feishu does.
    return out.replace("\n", "<br>")


def element_html(element: Mapping[str, Any]) -> str:
    tag = element.get("tag")
    if tag == "markdown":
        return f"<div class=md>{markdown_html(str(element.get('content', '')))}</div>"
    if tag == "div":
        text = html.escape(str(element.get("text", {}).get("content", "")))
        return f"<div class=plain>{text}</div>"
    if tag == "column_set":
        background = COLOURS.get(str(element.get("background_style", "")), "transparent")
        columns = ""
        for column in element.get("columns", []):
            inner = "".join(element_html(e) for e in column.get("elements", []))
            columns += f'<div class=col style="flex:{column.get("weight", 1)}">{inner}</div>'
        return f'<div class=band style="background:{background}">{columns}</div>'
    if tag == "button":
        url = html.escape(element.get("behaviors", [{}])[0].get("default_url", ""))
        text = html.escape(str(element.get("text", {}).get("content", "")))
        return f'<div><a class=button href="{url}">{text}</a></div>'
    if tag == "hr":
        return "<hr>"
    return f"<div class=unknown>unsupported component {html.escape(str(tag))}</div>"


def card_html(card: Mapping[str, Any]) -> str:
    """One card as an HTML fragment."""
    header = card.get("header", {})
    background, colour = HEADERS.get(str(header.get("template", "blue")), HEADERS["blue"])
    title = html.escape(str(header.get("title", {}).get("content", "")))
    subtitle = html.escape(str(header.get("subtitle", {}).get("content", "")))
    tags = "".join(
        f'<span class=tag style="color:{COLOURS.get(t.get("color"), "#646a73")}">'
        f"{html.escape(str(t.get('text', {}).get('content', '')))}</span>"
        for t in header.get("text_tag_list", [])
    )
    body = "".join(element_html(e) for e in card.get("body", {}).get("elements", []))
    return (
        f'<div class=card><div class=header style="background:{background}">'
        f'<div class=title style="color:{colour}">{title} {tags}</div>'
        f"<div class=subtitle>{subtitle}</div></div><div class=body>{body}</div></div>"
    )


STYLE = """
body { font-family: "Noto Sans CJK SC", "DejaVu Sans", sans-serif; background: #f2f3f5; margin: 0; padding: 16px; }
.card { width: 640px; background: #fff; border-radius: 8px; box-shadow: 0 1px 4px #0002; margin-bottom: 16px;
        overflow: hidden; font-size: 13px; color: #1f2329; }
.header { padding: 10px 14px; }
.title { font-weight: 600; font-size: 15px; }
.subtitle { color: #646a73; font-size: 12px; margin-top: 2px; }
.tag { font-size: 11px; font-weight: 500; background: #fff9; border-radius: 4px; padding: 1px 5px; margin-left: 4px; }
.body { padding: 6px 14px 12px 14px; }
.md { line-height: 1.6; margin-top: 8px; }
.plain { white-space: pre-wrap; margin-top: 8px; }
.band { display: flex; border-radius: 6px; margin-top: 8px; padding: 2px 8px; }
.band .md { margin-top: 2px; }
.at { color: #1456F0; }
.button { display: inline-block; margin-top: 12px; padding: 5px 14px; border: 1px solid #1456F0; border-radius: 6px;
          color: #1456F0; text-decoration: none; }
"""


def page(cards: Sequence[Mapping[str, Any]]) -> str:
    return (
        "<!doctype html><html><head><meta charset=utf-8><style>"
        + STYLE
        + "</style></head><body>"
        + "".join(card_html(c) for c in cards)
        + "</body></html>"
    )


def screenshot(html_text: str, out: Path, *, width: int = 680, height: int = 705) -> None:
    """A headless-chromium screenshot of ``html_text``."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "card.html"
        source.write_text(html_text, encoding="utf-8")
        subprocess.run(
            [
                "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--window-size={width},{height}",
                f"--screenshot={out}",
                source.as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )


def sample_cards() -> list[dict[str, Any]]:
    """An overview and an alert card of a small fleet made of real captures (the README's example)."""
    from datetime import datetime, timezone

    from builders import DAY, T0, Engine, Job, alerts_config, alice, down, h100_host, l40s_host
    from gpuwatch.config import FreeGpuConfig
    from gpuwatch.message import Message
    from gpuwatch.model import FleetSnapshot
    from gpuwatch.notify.feishu import FeishuChannel, FeishuSettings
    from gpuwatch.report import alert_message, overview

    snapshot = FleetSnapshot(
        datetime(2026, 11, 22, 2, 0, tzinfo=timezone.utc),
        (h100_host("gpu-a", alice([0, 1])), l40s_host("gpu-b"), down("gpu-c")),
    )
    url = "https://open.feishu.cn/open-apis/bot/v2/hook/0123456789abcdef"
    channel = FeishuChannel(FeishuSettings(url=url, keyword="GPU", format="card"))
    report = overview(snapshot, FreeGpuConfig())
    report = Message(
        title=report.title,
        blocks=report.blocks,
        body=report.body,
        link="https://gpu.lab.example/gpuwatch/",
    )
    (card,) = channel.prepare(report)
    engine = Engine(alerts_config(max_runtime="72h", host_down={"after": 1}))
    job = Job("alice", 4100, 0, int(3 * DAY) + 7200, "python3 train.py --lr *3e-4* --data /data/imagenet")
    transitions = engine.step(T0, h100_host("gpu-a", [job]), down("gpu-c"))
    alerts = alert_message(transitions, [], {}, tz=timezone.utc)
    assert alerts is not None
    (alert,) = channel.prepare(Message(title=alerts.title, blocks=alerts.blocks, body=alerts.body, severity="firing"))
    return [card["card"], alert["card"]]


def main(argv: list[str]) -> int:
    out = Path(argv[1] if len(argv) > 1 else "feishu-card.png")
    cards = sample_cards()
    if len(argv) > 2:
        cards += [json.loads(Path(p).read_text())["card"] for p in argv[2:]]
    screenshot(page(cards), out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main(sys.argv))
