"""Local receivers that behave like DingTalk, WeCom and Slack webhooks, and a generic one, for tests.

Each is a tests/fakehook.py :class:`~fakehook.FakeHook` (the server, records and scripted faults
are shared with tests/fakefeishu.py) with its platform's checks and answers, from the platforms'
documentation and the answers seen in public reports:

DingTalk custom robot (``/robot/send?access_token=T``), answers ``{"errcode": N, "errmsg": ...}``:

======  ==========================================================================
300001  the access_token is not the robot's ("token is not exist")
310000  ``allowed_ips`` set and the client not in it ("ip X not in whitelist"); ``secret``
        set and ``timestamp`` (milliseconds, in the query) more than an hour off ("invalid
        timestamp") or ``sign`` not ``base64(HMAC-SHA256(secret, ts + "\\n" + secret))``
        once URL-decoded ("sign not match"); ``keywords`` set and none in the text
        ("keywords not in content")
460101  the body is over ``max_body_bytes`` (20,000) ("message too long, exceed 20000 bytes")
43004   not ``application/json``; 40035 not a markdown/text body
130101  more than ``per_minute`` (20) in a minute ("send too fast, exceed 20 times per minute")
======  ==========================================================================

WeCom group robot (``/cgi-bin/webhook/send?key=K``), answers ``{"errcode": N, "errmsg": ...}``:
93000 wrong key ("invalid webhook url"), 40058 ``markdown.content`` over 4,096 bytes or
``text.content`` over 2,048 ("... exceed max length ..."), 40008 unknown ``msgtype``, 44004 empty
content, 45009 more than 20 a minute ("api freq out of limit").

Slack incoming webhook (``/services/T/B/X``): HTTP 200 ``ok``; errors as HTTP status and a text
code: 404 ``no_service`` (wrong path), 400 ``invalid_payload`` (not JSON), ``no_text``,
``invalid_blocks`` (over 50 blocks, a header over 150 or a section over 3,000 characters, an
unknown block or text type), 429 ``rate_limited`` with ``Retry-After`` over ``per_second``.

Each has ``seen(body)``: what the group sees of an accepted body, and whom it mentions.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

from fakehook import FakeHook, Rendered, Reply, _parse, render_markdown

WECOM_HELP = "https://open.work.weixin.qq.com/devtool/query?e="


def dingtalk_sign(secret: str, timestamp_ms: int | str) -> str:
    """DingTalk's signature (before URL-encoding), written here independently of the code under test."""
    mac = hmac.new(secret.encode(), f"{timestamp_ms}\n{secret}".encode(), hashlib.sha256)
    return base64.b64encode(mac.digest()).decode()


def _query(path: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(path).query, keep_blank_values=True).items()}


class FakeDingTalk(FakeHook):
    """A DingTalk custom robot on 127.0.0.1 (see the module docstring)."""

    path_prefix = "/robot/send"
    name = "fakedingtalk"
    MESSAGES: ClassVar[dict[int, str]] = {
        0: "ok",
        300001: "token is not exist",
        43004: "无效的HTTP HEADER Content-Type",
        40035: "缺少参数 json",
        460101: "message too long, exceed 20000 bytes",
        130101: "send too fast, exceed 20 times per minute",
    }

    def __init__(self, *, token: str = "d1n9-7a1k-robot-token-0123456789abcdef", **kwargs: Any) -> None:
        kwargs.setdefault("per_minute", 20)
        super().__init__(token=token, **kwargs)

    def url_for(self, token: str) -> str:
        return f"{self.base_url}{self.path_prefix}?access_token={token}"

    def check(self, path: str, client_ip: str, headers: dict[str, str], raw: bytes, now: float) -> tuple[int, str]:
        query = _query(path)
        if query.get("access_token") != self.token:
            return 300001, "token"
        if self.allowed_ips is not None and client_ip not in self.allowed_ips:
            return 310000, f"ip {client_ip} not in whitelist"
        if len(raw) > self.max_body_bytes:
            return 460101, f"body of {len(raw)} bytes"
        if not headers.get("content-type", "").lower().startswith("application/json"):
            return 43004, "content-type"
        body = _parse(raw)
        if body is None or not _dingtalk_body(body):
            return 40035, "malformed"
        if self._over_rate(now):
            return 130101, "rate"
        if self.secret is not None:
            timestamp, signature = query.get("timestamp", ""), query.get("sign")
            if not timestamp.isdigit() or signature is None:
                return 310000, "sign not match"
            if abs(self.clock() * 1000 - int(timestamp)) > 3600 * 1000:
                return 310000, "invalid timestamp"
            if not hmac.compare_digest(signature, dingtalk_sign(self.secret, timestamp)):
                return 310000, "sign not match"
        if self.keywords:
            text = body.get("markdown", {}).get("text") or body.get("text", {}).get("content") or ""
            if not any(k in text for k in self.keywords):
                return 310000, "keywords not in content"
        return 0, "accepted"

    def answer(self, code: int, reason: str, legacy: bool = False) -> Reply:
        message = reason if code == 310000 else self.MESSAGES.get(code, "scripted error")
        return Reply.of_json({"errcode": code, "errmsg": message})

    @staticmethod
    def seen(body: Mapping[str, Any]) -> Rendered:
        at = body.get("at", {})
        mentions = [*at.get("atMobiles", []), *at.get("atUserIds", [])] + (["all"] if at.get("isAtAll") else [])
        if body.get("msgtype") == "text":
            return Rendered(str(body["text"]["content"]), tuple(mentions), (), ())
        rendered = render_markdown(str(body["markdown"]["text"]))
        return Rendered(rendered.text, tuple(mentions), rendered.links, rendered.emphasis)


def _dingtalk_body(body: Mapping[str, Any]) -> bool:
    if body.get("msgtype") == "markdown":
        markdown = body.get("markdown")
        return isinstance(markdown, dict) and all(isinstance(markdown.get(k), str) for k in ("title", "text"))
    if body.get("msgtype") == "text":
        return isinstance(body.get("text"), dict) and isinstance(body["text"].get("content"), str)
    return False


class FakeWeCom(FakeHook):
    """A WeCom group robot on 127.0.0.1 (see the module docstring)."""

    path_prefix = "/cgi-bin/webhook/send"
    name = "fakewecom"
    MAX_MARKDOWN = 4096
    MAX_TEXT = 2048

    def __init__(self, *, token: str = "693a91f6-7xxx-4bc4-97a0-0ec2sifa5aaa", **kwargs: Any) -> None:
        kwargs.setdefault("per_minute", 20)
        super().__init__(token=token, **kwargs)

    def url_for(self, token: str) -> str:
        return f"{self.base_url}{self.path_prefix}?key={token}"

    def check(self, path: str, client_ip: str, headers: dict[str, str], raw: bytes, now: float) -> tuple[int, str]:
        if _query(path).get("key") != self.token:
            return 93000, "invalid webhook url"
        body = _parse(raw)
        if body is None:
            return 40035, "invalid Request Parameter"
        msgtype = body.get("msgtype")
        if msgtype not in ("markdown", "text") or not isinstance(body.get(msgtype), dict):
            return 40008, "invalid message type"
        content = body[msgtype].get("content")
        if not isinstance(content, str) or not content:
            return 44004, "empty content"
        limit = self.MAX_MARKDOWN if msgtype == "markdown" else self.MAX_TEXT
        if len(content.encode("utf-8")) > limit:
            return 40058, f"{msgtype}.content exceed max length {limit}"
        if self._over_rate(now):
            return 45009, "api freq out of limit"
        return 0, "ok"

    def answer(self, code: int, reason: str, legacy: bool = False) -> Reply:
        if code == 0:
            return Reply.of_json({"errcode": 0, "errmsg": "ok"})
        hint = f", hint: [1704540159128593240839785], from ip: 127.0.0.1, more info at {WECOM_HELP}{code}"
        return Reply.of_json({"errcode": code, "errmsg": f"{reason}{hint}"})

    @staticmethod
    def seen(body: Mapping[str, Any]) -> Rendered:
        if body.get("msgtype") == "text":
            text = body["text"]
            mentions = [*text.get("mentioned_list", []), *text.get("mentioned_mobile_list", [])]
            return Rendered(str(text["content"]), tuple(mentions), (), ())
        return render_markdown(str(body["markdown"]["content"]), re.compile(r"<@([^>]*)>"))


class FakeSlack(FakeHook):
    """A Slack incoming webhook on 127.0.0.1 (see the module docstring)."""

    path_prefix = "/services/"
    name = "fakeslack"
    STATUS_ERRORS: ClassVar[dict[int, str]] = {
        400: "invalid_payload",
        403: "action_prohibited",
        404: "channel_not_found",
        410: "channel_is_archived",
        429: "rate_limited",
        500: "rollup_error",
    }

    def __init__(self, *, token: str = "T0SL4CK01/B0HOOK0001/aB3dE5fG7hJ9kL1mN3pQ5rS7", **kwargs: Any) -> None:
        kwargs.setdefault("per_second", 1)
        kwargs.setdefault("max_body_bytes", 1_000_000)
        super().__init__(token=token, **kwargs)
        self.errors: dict[int, str] = {}  # the text code of each answer that was not ok, by status

    def check(self, path: str, client_ip: str, headers: dict[str, str], raw: bytes, now: float) -> tuple[int, str]:
        if urlsplit(path).path[len(self.path_prefix) :] != self.token:
            return 404, "no_service"
        body = _parse(raw)
        if body is None:
            return 400, "invalid_payload"
        blocks = body.get("blocks")
        if not body.get("text") and not blocks:
            return 400, "no_text"
        if blocks is not None and not _slack_blocks_ok(blocks):
            return 400, "invalid_blocks"
        if self._over_rate(now):
            return 429, "rate_limited"
        return 0, "ok"

    def answer(self, code: int, reason: str, legacy: bool = False) -> Reply:
        if code == 0:
            return Reply(200, b"ok", "text/html")
        headers = (("Retry-After", "1"),) if code == 429 else ()
        return Reply(code, reason.encode(), "text/html", headers)

    def scripted(self, fault: int) -> Reply:
        return self.answer(fault, self.STATUS_ERRORS.get(fault, "internal_error"))

    def scripted_code(self, fault: int) -> int | None:
        return fault

    @staticmethod
    def seen(body: Mapping[str, Any]) -> Rendered:
        """Blocks as shown (plain_text as written; mrkdwn's ``<@U>`` / ``<!channel>`` mentions),
        with the ``text`` fallback read as a notification: its ``<...>`` sequences too."""
        texts: list[str] = []
        mentions: list[str] = []
        links: list[str] = []
        control = re.compile(r"<([@!#])([^>|]*)(?:\|[^>]*)?>|<(https?://[^>|]*)(?:\|([^>]*))?>")

        def read(text: str, kind: str) -> None:
            if kind == "plain_text":
                texts.append(text)
                return
            for m in control.finditer(text):
                if m.group(1) in ("@", "!"):
                    mentions.append(m.group(2))
                elif m.group(3):
                    links.append(m.group(3))
            texts.append(control.sub("", text).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))

        for block in body.get("blocks", []):
            for obj in [block.get("text"), *block.get("elements", [])]:
                if isinstance(obj, Mapping) and "text" in obj:
                    inner = obj["text"] if isinstance(obj["text"], Mapping) else obj
                    read(str(inner.get("text", "")), str(inner.get("type", "plain_text")))
                    if obj.get("url"):
                        links.append(str(obj["url"]))
        read(str(body.get("text", "")), "mrkdwn")  # the notification: parsed even with mrkdwn off
        return Rendered("\n".join(texts), tuple(mentions), tuple(links), ())


def _slack_blocks_ok(blocks: object) -> bool:
    if not isinstance(blocks, list) or len(blocks) > 50:
        return False
    for block in blocks:
        if not isinstance(block, Mapping):
            return False
        kind = block.get("type")
        text = block.get("text")
        if kind == "header":
            if not _text_ok(text, ("plain_text",), 150):
                return False
        elif kind == "section":
            if not _text_ok(text, ("plain_text", "mrkdwn"), 3000):
                return False
        elif kind == "context":
            if not all(_text_ok(e, ("plain_text", "mrkdwn"), 3000) for e in block.get("elements", [])):
                return False
        elif kind == "actions":
            for element in block.get("elements", []):
                if element.get("type") != "button" or not _text_ok(element.get("text"), ("plain_text",), 75):
                    return False
        elif kind != "divider":
            return False
    return True


def _text_ok(text: object, kinds: Sequence[str], limit: int) -> bool:
    return (
        isinstance(text, Mapping)
        and text.get("type") in kinds
        and isinstance(text.get("text"), str)
        and 0 < len(str(text["text"])) <= limit
    )


class FakeReceiver(FakeHook):
    """Any JSON webhook (a generic ``webhook:``): accepts JSON at ``/hooks/TOKEN`` with 200 ``{}``;
    ``required_headers`` must be present with their values (else 401)."""

    path_prefix = "/hooks/"
    name = "fakereceiver"

    def __init__(
        self, *, token: str = "rcv-0a1b2c3d4e5f6789", required_headers: Mapping[str, str] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(token=token, **kwargs)
        self.required_headers = dict(required_headers or {})

    def check(self, path: str, client_ip: str, headers: dict[str, str], raw: bytes, now: float) -> tuple[int, str]:
        if urlsplit(path).path[len(self.path_prefix) :] != self.token:
            return 404, "no such hook"
        if any(headers.get(k.lower()) != v for k, v in self.required_headers.items()):
            return 401, "unauthorized"
        if len(raw) > self.max_body_bytes:
            return 413, "payload too large"
        try:
            json.loads(raw)
        except ValueError:
            return 400, "not JSON"
        return 0, "ok"

    def answer(self, code: int, reason: str, legacy: bool = False) -> Reply:
        if code == 0:
            return Reply.of_json({})
        return Reply(code, reason.encode(), "text/plain")

    def scripted_code(self, fault: int) -> int | None:
        return fault
