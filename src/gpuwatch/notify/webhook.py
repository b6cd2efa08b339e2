"""The generic webhook channel: a JSON document POSTed to any URL (Mattermost, Rocket.Chat,
Discord, a ticket system, your own script).

The default document, one per part (the message split between its blocks like every channel,
each document at most ``max_body_bytes``)::

    {"source": "gpuwatch", "kind": "alert", "severity": "firing",
     "title": "GPU alerts: 1 firing", "summary": "1 firing",
     "text": "GPU alerts: 1 firing\\n\\nFIRING max_gpus_per_user (gpu-a, user alice)\\n    ...",
     "blocks": ["FIRING max_gpus_per_user (gpu-a, user alice)\\n    ..."],
     "part": 1, "parts": 1, "link": "https://gpu.lab.example/" or null, "mentions": []}

``kind`` is report, alert or test; ``severity`` info, firing or resolved; ``text`` is the whole
part as plain text (title, then blocks, separated by blank lines); the text is plain words,
never markup. A template (``webhook.template``, a JSON file) gives another shape: every string
in it that is exactly ``"{{name}}"`` becomes that field's value (a number, a list or null as it
is), and ``{{name}}`` inside a longer string becomes its text; the names are the default
document's keys. Mattermost and Rocket.Chat take ``{"text": "{{text}}"}``, Discord
``{"content": "{{text}}"}`` (with ``max_body_bytes: 2000``).

Any 2xx answer is success. 408, 429 and 5xx are tried again; other answers are refused for a
reason said plainly (a 401 or 403: the credentials in ``webhook.headers``). The URL's last path
segment and query values, and every header value, are treated as secrets.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from gpuwatch.message import Message
from gpuwatch.notify import http
from gpuwatch.notify.http import Request, Retry, encode
from gpuwatch.notify.spec import Transport
from gpuwatch.notify.split import cut_text, numbered, split
from gpuwatch.notify.webhook_settings import (
    PLACEHOLDER,
    WebhookSettings,
)


def fill(template: object, values: Mapping[str, Any]) -> Any:
    """The template with its placeholders replaced (see the module docstring)."""
    if isinstance(template, str):
        whole = PLACEHOLDER.fullmatch(template.strip())
        if whole:
            return values[whole.group(1)]
        return PLACEHOLDER.sub(lambda m: _as_text(values[m.group(1)]), template)
    if isinstance(template, Mapping):
        return {fill(k, values): fill(v, values) for k, v in template.items()}
    if isinstance(template, list):
        return [fill(item, values) for item in template]
    return template


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return "\n\n".join(str(v) for v in value)
    return str(value)


class WebhookJsonChannel(http.WebhookChannel[WebhookSettings]):
    """POSTs one JSON document per part to ``webhook.url`` (see the module docstring)."""

    name = "webhook"
    service = "the webhook"

    def prepare(self, message: Message) -> list[dict[str, Any]]:
        """One document per part, each at most ``max_body_bytes`` as sent."""
        limit = self._settings.max_body_bytes

        def size(title: str, part: Sequence[str], first: bool) -> int:
            return len(encode(self._document(message, title, part, 999, 999, first)))

        title, parts = split(
            message.title, message.blocks, size=size, limit=limit, cut=cut_text, what="webhook.max_body_bytes"
        )
        total = len(parts)
        return [
            self._document(message, numbered(title, i, total), part, i, total, i == 1)
            for i, part in enumerate(parts, start=1)
        ]

    def _document(
        self, message: Message, title: str, blocks: Sequence[str], part: int, parts: int, first: bool
    ) -> dict[str, Any]:
        values: dict[str, Any] = {
            "source": "gpuwatch",
            "kind": message.kind,
            "severity": message.severity,
            "title": title,
            "summary": message.body.summary if message.body is not None else "",
            "text": "\n\n".join((title, *blocks)),
            "blocks": list(blocks),
            "part": part,
            "parts": parts,
            "link": message.link,
            "mentions": list(message.mentions) if first else [],
        }
        if self._settings.template is None:
            return values
        document = fill(self._settings.template, values)
        # The outbox keeps JSON objects; a template that is a list or a value is wrapped, and
        # unwrapped again when sent.
        return document if isinstance(document, dict) else {"__document__": document}

    def describe(self, payload: dict[str, Any]) -> str:
        text = payload.get("text")
        if isinstance(text, str) and payload.get("source") == "gpuwatch":
            return text
        return json.dumps(payload.get("__document__", payload), ensure_ascii=False, indent=2)

    def _request(self, payload: Mapping[str, Any]) -> Request:
        document = payload["__document__"] if set(payload) == {"__document__"} else payload
        return Request(self._url, encode_any(document), headers=dict(self._settings.headers))

    def _judge(self, answer: http.Answer) -> Retry | None:
        status = answer.status
        if 200 <= status <= 299:
            return None
        said = self.snippet(answer)
        detail = f"HTTP {status} {self._scrub(answer.reason)}".rstrip() + (f": {said!r}" if said else "")
        if status == 408:
            return Retry(detail)
        if status in (401, 403):
            raise self._refused(f"{detail}: the receiver refused the credentials (check webhook.headers)")
        if status in (404, 405, 410):
            raise self._refused(f"{detail}: there is no webhook at webhook.url (check it)")
        if 300 <= status <= 399:
            raise self._refused(f"{detail}: a redirect; put the address it points to in webhook.url")
        if status in (400, 413, 422):
            raise self._refused(
                f"{detail}: the receiver refused this document (check webhook.template and webhook.max_body_bytes)",
                message_fault=True,
            )
        raise self._refused(detail)


def encode_any(document: Any) -> bytes:
    """Any JSON value as sent (UTF-8)."""
    return json.dumps(document, ensure_ascii=False).encode("utf-8")


def build(settings: WebhookSettings, transport: Transport) -> WebhookJsonChannel:
    """The channel for ``webhook:``: its URL and headers resolved from the environment and its
    template read now."""
    return WebhookJsonChannel(settings.resolved(transport.environ), sleep=transport.sleep, stop=transport.stop)
