"""A local HTTP server that behaves like a Feishu custom-bot webhook, for tests.

It binds 127.0.0.1 on a free port and checks what Feishu checks, answering like Feishu does
(HTTP 200 with a JSON ``code``) as described in shared/FEISHU.md; the server, the records and the
scripted faults are tests/fakehook.py's (see there):

=====  =============================================================================
code   when
=====  =============================================================================
19001  the path's token is not the bot's token
19022  ``allowed_ips`` is set and the client address is not in it
19036  the body is larger than ``max_body_bytes`` as received (``too_large_code``)
9499   not ``application/json``, not a JSON object, or no valid ``msg_type`` body
11246  a card JSON 2.0 that breaks Feishu's card schema (:func:`card_problems`)
11232  more than ``per_second`` requests in any second or ``per_minute`` in any minute
19021  ``secret`` is set and ``timestamp``/``sign`` are missing, wrong or off by > 1 hour
19024  ``keywords`` are set and no text value (text, post title/text, card title or
       text content; never an href) holds one
=====  =============================================================================

The card check (:func:`card_problems`) follows Feishu's published card JSON 2.0 structure
(open.feishu.cn, "卡片 JSON 2.0 结构" and the 2.0 component pages): the top-level keys, the
header (title, subtitle, template colour, at most 3 text tags), and for each component gpuwatch
uses (``markdown``, ``div``, ``column_set``/``column``, ``button``, ``hr``) its documented
properties and their values; 2.0 rejects properties it does not know, and a card holds at
most 200 components.

Usage::

    with FakeFeishu(keywords=["gpu"], secret="s3cret") as server:
        post_to(server.url)
        assert server.accepted[0]["msg_type"] == "post"
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fakehook import (
    HUGE_ANSWER_BYTES,
    AnswerRecord,
    Exchange,
    FakeHook,
    Rendered,
    Reply,
    _parse,
    render_markdown,
)

__all__ = [
    "DEFAULT_TOKEN",
    "HUGE_ANSWER_BYTES",
    "AnswerRecord",
    "Exchange",
    "FakeFeishu",
    "card_problems",
    "feishu_sign",
    "seen",
    "text_values",
]

HOOK_PREFIX = "/open-apis/bot/v2/hook/"
DEFAULT_TOKEN = "0f5c7e2a-9b41-4d6e-8a3f-5c2d1e0b9a87"

SUCCESS = {"StatusCode": 0, "StatusMessage": "success", "code": 0, "data": {}, "msg": "success"}
MESSAGES = {
    9499: "Bad Request",
    11232: "frequency limited psm[lark.oapi.app_platform_runtime]appID[1]",
    11246: "ErrCode: 200621; ErrMsg: parse card json err, please check whether the card json is correct",
    19001: "param invalid: incoming webhook access token invalid",
    19021: "sign match fail or timestamp is not within one hour from current time",
    19022: "Ip Not Allowed",
    19024: "Key Words Not Found",
    19036: "request body too large",
}
_TEXT_KEYS = frozenset({"text", "title", "content"})  # where keywords count; "href" never does


def feishu_sign(secret: str, timestamp: int | str) -> str:
    """Feishu's signature, written here independently of the code under test."""
    mac = hmac.new(f"{timestamp}\n{secret}".encode(), b"", hashlib.sha256)
    return base64.b64encode(mac.digest()).decode()


def text_values(value: Any, key: str | None = None) -> list[str]:
    """The strings where Feishu looks for keywords: text/title/content values, never hrefs."""
    if isinstance(value, str):
        return [value] if key in _TEXT_KEYS else []
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in text_values(v, k)]
    if isinstance(value, list):
        return [s for item in value for s in text_values(item, key)]
    return []


class FakeFeishu(FakeHook):
    """A Feishu custom-bot webhook on 127.0.0.1 (see the module docstring)."""

    path_prefix = HOOK_PREFIX
    name = "fakefeishu"

    def __init__(
        self,
        *,
        token: str = DEFAULT_TOKEN,
        keywords: Sequence[str] = (),
        secret: str | None = None,
        allowed_ips: Sequence[str] | None = None,
        max_body_bytes: int = 20_000,
        too_large_code: int = 19036,
        per_second: int = 5,
        per_minute: int = 100,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            token=token,
            keywords=keywords,
            secret=secret,
            allowed_ips=allowed_ips,
            max_body_bytes=max_body_bytes,
            per_second=per_second,
            per_minute=per_minute,
            **kwargs,
        )
        self.too_large_code = too_large_code

    def check(self, path: str, client_ip: str, headers: dict[str, str], raw: bytes, now: float) -> tuple[int, str]:
        """Feishu's verdict on one request: (code, reason); code 0 is accepted."""
        if path[len(HOOK_PREFIX) :] != self.token:
            return 19001, "token"
        if self.allowed_ips is not None and client_ip not in self.allowed_ips:
            return 19022, "ip"
        if len(raw) > self.max_body_bytes:
            return self.too_large_code, f"body of {len(raw)} bytes"
        if not headers.get("content-type", "").lower().startswith("application/json"):
            return 9499, "content-type"
        body = _parse(raw)
        if body is None or not _well_formed(body):
            return 9499, "malformed"
        if body.get("msg_type") == "interactive" and body["card"].get("schema") == "2.0":
            problems = card_problems(body["card"])
            if problems:
                return 11246, f"card: {problems[0]}"
        if self._over_rate(now):
            return 11232, "rate"
        if self.secret is not None:
            timestamp, signature = body.get("timestamp"), body.get("sign")
            if not isinstance(timestamp, (str, int)) or not str(timestamp).isdigit() or not isinstance(signature, str):
                return 19021, "signature missing"
            if abs(self.clock() - int(timestamp)) > 3600:
                return 19021, "timestamp off"
            if not hmac.compare_digest(signature, feishu_sign(self.secret, timestamp)):
                return 19021, "signature"
        if self.keywords:
            texts = text_values(body.get("card") if body.get("msg_type") == "interactive" else body.get("content"))
            if not any(k in t for k in self.keywords for t in texts):
                return 19024, "keyword"
        return 0, "accepted"

    def answer(self, code: int, reason: str, legacy: bool = False) -> Reply:
        if legacy:
            message = "success" if code == 0 else MESSAGES.get(code, "error")
            return Reply.of_json({"StatusCode": code, "StatusMessage": message})
        if code == 0:
            return Reply.of_json(SUCCESS)
        message = MESSAGES.get(code, "scripted error")
        if code == 11246 and reason.startswith("card: "):
            message += f"; ErrorValue: {reason[6:]}"
        return Reply.of_json({"code": code, "msg": message, "data": {}})


def _well_formed(body: dict[str, Any]) -> bool:
    msg_type = body.get("msg_type")
    content = body.get("content")
    if msg_type == "text":
        return isinstance(content, dict) and isinstance(content.get("text"), str)
    if msg_type == "post":
        post = content.get("post") if isinstance(content, dict) else None
        return isinstance(post, dict) and bool(post) and all(isinstance(v, dict) for v in post.values())
    if msg_type == "interactive":  # the card goes under "card", not "content"
        return isinstance(body.get("card"), dict)
    return msg_type in ("image", "share_chat")


# ---------------------------------------------------------------------- card JSON 2.0, as documented

# Colour names of Feishu's colour enumeration ("颜色枚举值"): a hue, or a hue with a shade.
_HUES = ("blue", "carmine", "green", "indigo", "lime", "orange", "purple", "red", "sunflower")
_HUES += ("turquoise", "violet", "wathet", "yellow", "grey")
_SHADES = ("50", "100", "200", "300", "350", "400", "500", "600", "700", "800", "900")
COLOURS = frozenset({*_HUES, *(f"{h}-{s}" for h in _HUES for s in _SHADES), "bg-white", "white", "default"})
TEMPLATES = frozenset(
    {"blue", "wathet", "turquoise", "green", "yellow", "orange", "red", "carmine"}
    | {"violet", "purple", "indigo", "grey", "default"}
)
TEXT_TAG_COLOURS = frozenset(
    {"neutral", "blue", "turquoise", "lime", "orange", "violet", "indigo", "wathet", "green"}
    | {"yellow", "red", "purple", "carmine"}
)
BUTTON_TYPES = frozenset(
    {"default", "primary", "danger", "text", "primary_text", "danger_text", "primary_filled", "danger_filled", "laser"}
)
_SPACING = re.compile(r"(small|medium|large|extra_large|default|\d{1,2}px)")
_BOX = re.compile(r"(-?\d{1,2}(px)?)( -?\d{1,2}(px)?){0,3}")  # margin / padding: 1 to 4 values in [-99, 99]
_ELEMENT_ID = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,19}")

_CARD_KEYS = {"schema", "config", "card_link", "header", "body"}
_CONFIG_KEYS = {
    "streaming_mode", "streaming_config", "summary", "locales", "enable_forward", "update_multi",
    "width_mode", "use_custom_translation", "enable_forward_interaction", "style",
}  # fmt: skip
_HEADER_KEYS = {
    "title", "subtitle", "text_tag_list", "i18n_text_tag_list", "template", "icon", "padding",
    "i18n_title", "i18n_subtitle",
}  # fmt: skip
_BODY_KEYS = {
    "direction", "padding", "horizontal_spacing", "horizontal_align", "vertical_spacing", "vertical_align",
    "elements",
}  # fmt: skip
_COMMON = {"tag", "element_id", "margin"}
_COMPONENT_KEYS: dict[str, set[str]] = {
    "markdown": _COMMON | {"content", "text_size", "text_align", "icon", "i18n_content"},
    "div": _COMMON | {"text", "icon", "width"},
    "hr": _COMMON,
    "column_set": _COMMON
    | {"horizontal_spacing", "horizontal_align", "flex_mode", "background_style", "action", "columns"},
    "column": _COMMON
    | {
        "background_style",
        "width",
        "weight",
        "horizontal_spacing",
        "horizontal_align",
        "vertical_align",
        "vertical_spacing",
        "direction",
        "padding",
        "action",
        "elements",
    },
    "button": _COMMON
    | {
        "type",
        "size",
        "width",
        "text",
        "icon",
        "hover_tips",
        "disabled",
        "disabled_tips",
        "confirm",
        "behaviors",
        "name",
        "form_action_type",
    },
}
_PLAIN_TEXT_KEYS = {"tag", "content", "text_size", "text_color", "text_align", "lines", "i18n_content"}


def card_problems(card: Mapping[str, Any]) -> list[str]:
    """What breaks Feishu's card JSON 2.0 structure in ``card`` (empty: none), each with its path."""
    problems: list[str] = []

    def unknown(value: Mapping[str, Any], allowed: set[str], where: str) -> None:
        problems.extend(f"{where}.{k}: unknown property" for k in value if k not in allowed)

    def plain_text(value: object, where: str, *, lark_md: bool = False) -> None:
        if not isinstance(value, Mapping):
            problems.append(f"{where}: expected a text object")
            return
        unknown(value, _PLAIN_TEXT_KEYS, where)
        tags = ("plain_text", "lark_md") if lark_md else ("plain_text",)
        if value.get("tag") not in tags:
            problems.append(f"{where}.tag: expected {' or '.join(tags)}")
        if not isinstance(value.get("content"), str):
            problems.append(f"{where}.content: expected a string")

    def colour(value: object, where: str) -> None:
        if value is not None and value not in COLOURS:
            problems.append(f"{where}: {value!r} is not a card colour")

    def box(value: object, where: str) -> None:
        if value is not None and not (isinstance(value, str) and _BOX.fullmatch(value)):
            problems.append(f"{where}: {value!r} is not a margin/padding")

    def component(element: object, where: str) -> None:
        if not isinstance(element, Mapping):
            problems.append(f"{where}: expected a component object")
            return
        tag = element.get("tag")
        if tag not in _COMPONENT_KEYS:
            problems.append(f"{where}: unsupported tag {tag!r}")
            return
        unknown(element, _COMPONENT_KEYS[str(tag)], f"{where}({tag})")
        box(element.get("margin"), f"{where}.margin")
        if "element_id" in element and not _ELEMENT_ID.fullmatch(str(element["element_id"])):
            problems.append(f"{where}.element_id: letters, digits and _, starting with a letter, at most 20")
        if tag == "markdown" and not isinstance(element.get("content"), str):
            problems.append(f"{where}.content: expected a string")
        elif tag == "div":
            plain_text(element.get("text"), f"{where}.text", lark_md=True)
        elif tag == "column_set":
            colour(element.get("background_style"), f"{where}.background_style")
            if element.get("flex_mode", "none") not in ("none", "stretch", "flow", "bisect", "trisect"):
                problems.append(f"{where}.flex_mode: not one of none, stretch, flow, bisect, trisect")
            columns = element.get("columns")
            if not isinstance(columns, list):
                problems.append(f"{where}.columns: expected a list")
                return
            for i, column in enumerate(columns):
                cwhere = f"{where}.columns[{i}]"
                if not isinstance(column, Mapping) or column.get("tag") != "column":
                    problems.append(f"{cwhere}: expected a column")
                    continue
                unknown(column, _COMPONENT_KEYS["column"], cwhere)
                colour(column.get("background_style"), f"{cwhere}.background_style")
                box(column.get("padding"), f"{cwhere}.padding")
                weight = column.get("weight", 1)
                if not (isinstance(weight, int) and 1 <= weight <= 5):
                    problems.append(f"{cwhere}.weight: a whole number from 1 to 5")
                for j, inner in enumerate(column.get("elements", [])):
                    component(inner, f"{cwhere}.elements[{j}]")
        elif tag == "button":
            plain_text(element.get("text"), f"{where}.text")
            if element.get("type", "default") not in BUTTON_TYPES:
                problems.append(f"{where}.type: not a button type")
            behaviors = element.get("behaviors")
            if not isinstance(behaviors, list) or not behaviors:
                problems.append(f"{where}.behaviors: required")
                return
            for k, behavior in enumerate(behaviors):
                if not isinstance(behavior, Mapping) or behavior.get("type") not in ("open_url", "callback"):
                    problems.append(f"{where}.behaviors[{k}].type: open_url or callback")
                elif behavior["type"] == "open_url" and not re.match(r"https?://", str(behavior.get("default_url"))):
                    problems.append(f"{where}.behaviors[{k}].default_url: an http(s) URL")

    unknown(card, _CARD_KEYS, "card")
    if card.get("schema") != "2.0":
        problems.append("card.schema: expected '2.0'")
    config = card.get("config", {})
    if isinstance(config, Mapping):
        unknown(config, _CONFIG_KEYS, "card.config")
        if config.get("update_multi", True) is not True:
            problems.append("card.config.update_multi: JSON 2.0 cards must be shared (true)")
        if config.get("width_mode", "default") not in ("default", "compact", "fill"):
            problems.append("card.config.width_mode: default, compact or fill")
    header = card.get("header")
    if header is not None:
        if not isinstance(header, Mapping):
            problems.append("card.header: expected an object")
        else:
            unknown(header, _HEADER_KEYS, "card.header")
            plain_text(header.get("title"), "card.header.title", lark_md=True)
            if "subtitle" in header:
                plain_text(header["subtitle"], "card.header.subtitle", lark_md=True)
            if header.get("template", "default") not in TEMPLATES:
                problems.append(f"card.header.template: {header.get('template')!r} is not a header colour")
            for i, tag in enumerate(header.get("text_tag_list", [])):
                if not isinstance(tag, Mapping) or tag.get("tag") != "text_tag":
                    problems.append(f"card.header.text_tag_list[{i}]: expected a text_tag")
                    continue
                plain_text(tag.get("text"), f"card.header.text_tag_list[{i}].text")
                if tag.get("color", "neutral") not in TEXT_TAG_COLOURS:
                    problems.append(f"card.header.text_tag_list[{i}].color: not a tag colour")
            if len(header.get("text_tag_list", [])) > 3:
                problems.append("card.header.text_tag_list: at most 3 tags are shown")
    body = card.get("body", {})
    if not isinstance(body, Mapping):
        problems.append("card.body: expected an object")
    else:
        unknown(body, _BODY_KEYS, "card.body")
        for i, element in enumerate(body.get("elements", [])):
            component(element, f"card.body.elements[{i}]")
    if _components(card) > 200:
        problems.append(f"card: {_components(card)} components; a card holds at most 200")
    return problems


def _components(value: object) -> int:
    if isinstance(value, Mapping):
        return (1 if "tag" in value else 0) + sum(_components(v) for v in value.values())
    if isinstance(value, list):
        return sum(_components(v) for v in value)
    return 0


# ---------------------------------------------------------------------- what the group sees

_AT_CARD = re.compile(r"<at\s+(?:id|ids|user_id|email)=['\"]?([^'\"\s>]*)['\"]?\s*>")


def seen(body: Mapping[str, Any]) -> Rendered:
    """What the group sees of an accepted body: its text as rendered (card markdown through
    :func:`~fakehook.render_markdown`; plain text, post text and plain_text as they are), and
    whom it mentions."""
    texts: list[str] = []
    mentions: list[str] = []
    links: list[str] = []
    emphasis: list[str] = []
    msg_type = body.get("msg_type")

    def add(rendered: Rendered) -> None:
        texts.append(rendered.text)
        mentions.extend(rendered.mentions)
        links.extend(rendered.links)
        emphasis.extend(rendered.emphasis)

    if msg_type == "text":
        text = str(body["content"]["text"])
        mentions += re.findall(r'<at user_id="([^"]*)">', text)
        shown = re.sub(r"<at user_id=\"[^\"]*\">[^<]*</at>", "@mention", text)
        texts.append(shown.replace("\u200b", ""))  # a zero-width space is not seen
    elif msg_type == "post":
        for lang in body["content"]["post"].values():
            texts.append(str(lang.get("title", "")))
            for paragraph in lang.get("content", []):
                for tag in paragraph:
                    if tag.get("tag") == "at":
                        mentions.append(str(tag.get("user_id")))
                    elif tag.get("tag") == "a":
                        links.append(str(tag.get("href")))
                        texts.append(str(tag.get("text", "")))
                    else:
                        texts.append(str(tag.get("text", "")))
    elif msg_type == "interactive":
        card = body["card"]
        header = card.get("header", {})
        texts.append(str(card.get("config", {}).get("summary", {}).get("content", "")))  # the chat list's preview
        texts += [str(header.get(k, {}).get("content", "")) for k in ("title", "subtitle")]
        texts += [str(t.get("text", {}).get("content", "")) for t in header.get("text_tag_list", [])]
        _walk(card.get("body", {}).get("elements", card.get("elements", [])), add, texts, links)
    shown = "\n".join(texts).replace("\u200b", "")  # a zero-width space is not seen, in any format
    return Rendered(shown, tuple(mentions), tuple(links), tuple(emphasis))


def _walk(elements: list[Any], add: Callable[[Rendered], None], texts: list[str], links: list[str]) -> None:
    for element in elements:
        tag = element.get("tag")
        if tag == "markdown":
            add(render_markdown(str(element.get("content", "")), _AT_CARD))
        elif tag == "div":
            text = element.get("text", {})
            if text.get("tag") == "lark_md":
                add(render_markdown(str(text.get("content", "")), _AT_CARD))
            else:
                texts.append(str(text.get("content", "")))
        elif tag == "column_set":
            for column in element.get("columns", []):
                _walk(column.get("elements", []), add, texts, links)
        elif tag == "button":
            texts.append(str(element.get("text", {}).get("content", "")))
            links += [b.get("default_url", "") for b in element.get("behaviors", [])]
