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
part as plain text (title, then blocks, separated by blank lines), as written: command lines,
container names, user and host names and error texts come from the hosts, so ``title``,
``summary``, ``text`` and ``blocks`` are for JSON consumers, never for a chat's markdown.

A template (``webhook.template``: a JSON file, or the document written in the config) gives
another shape: every string in it that is
exactly ``"{{name}}"`` becomes that field's value (a number, a list or null as it is), and
``{{name}}`` inside a longer string becomes its text; keys are written as they are. The names
are the default document's keys and, for chat platforms that read markdown, ``title_markdown``,
``summary_markdown``, ``text_markdown`` and ``blocks_markdown``: the same text escaped by
:func:`gpuwatch.notify.markup.chat_markdown`, so it mentions no one and makes no link on
Mattermost, Rocket.Chat or Discord. Mattermost and Rocket.Chat take
``{"text": "{{text_markdown}}"}``; Discord ``{"content": "{{text_markdown}}", "allowed_mentions":
{"parse": []}}`` (with ``max_bytes: 2000``). A template is checked when the config is read and
again when the channel is built (:func:`template_problem`): an unknown placeholder, a
placeholder in a key or a document that does not render to JSON is a ConfigError naming the
file and the place.

Any 2xx answer is success. 408, 429 and 5xx are tried again; other answers are refused for a
reason said plainly (a 401 or 403: the credentials in ``webhook.headers``). The URL's last path
segment and query values, and every header value, are treated as secrets.

Its config is :class:`WebhookSettings` (``webhook:``: ``url`` or ``url_env``, headers or
``header_env``, ``template``, ``max_bytes``), read and checked once when the config is read;
:func:`build` resolves the URL and headers from the environment and reads the template again (so
an edited template applies at the next build, checked as when the config is read).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gpuwatch.config.values import ConfigError, check_keys, expand_path, from_env, integer, mapping, string, string_map
from gpuwatch.message import Message
from gpuwatch.notify import http
from gpuwatch.notify.http import Request, Retry, encode
from gpuwatch.notify.markup import chat_markdown
from gpuwatch.notify.masking import redact_url
from gpuwatch.notify.spec import (
    ChannelSpec,
    Limits,
    Transport,
    UrlSettings,
    env_secret,
    settings_of,
    url_and_mentions,
    url_secret_values,
)
from gpuwatch.notify.split import cut_text, numbered, split

#: The values a template may place (``{{name}}``): the default document's keys ...
FIELDS = ("source", "kind", "severity", "title", "summary", "text", "blocks", "part", "parts", "link", "mentions")
#: ... and the text fields escaped for a chat's markdown (:func:`~gpuwatch.notify.markup.chat_markdown`).
MARKDOWN_FIELDS = ("title_markdown", "summary_markdown", "text_markdown", "blocks_markdown")
PLACEHOLDER = re.compile(r"\{\{\s*([a-z_]+)\s*\}\}")
#: Anything written like a placeholder, known or not (``{{ Text }}``, ``{{body}}``).
ANY_PLACEHOLDER = re.compile(r"\{\{(.*?)\}\}", re.S)
MAX_BODY_BYTES = 20_000
PER_SECOND = 5
LIMITS = Limits(max_body_bytes=MAX_BODY_BYTES, per_second=PER_SECOND)
KEYS = ("url", "url_env", "headers", "header_env", "template", "max_bytes")
#: Values of every field's type, to render a template once when it is checked.
_SAMPLE: dict[str, Any] = {
    **dict.fromkeys(("source", "kind", "severity", "title", "summary", "text", "link"), "x"),
    **dict.fromkeys(("title_markdown", "summary_markdown", "text_markdown"), "x"),
    "blocks": ["x"],
    "blocks_markdown": ["x"],
    "part": 1,
    "parts": 1,
    "mentions": [],
}


@dataclass(frozen=True)
class TemplateProblem:
    """What is wrong with a template, where (``$.attachments[0].text``), and what to do instead."""

    what: str
    where: str
    hint: str = ""

    def said(self, file: str | None) -> str:
        """One line for a ConfigError: ``webhook.template: ... at $.text in FILE; hint``."""
        source = f" in {file}" if file else ""
        return f"webhook.template: {self.what} at {self.where}{source}" + (f"; {self.hint}" if self.hint else "")


def _place(path: str, key: object) -> str:
    if isinstance(key, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        return f"{path}.{key}"
    return f"{path}[{json.dumps(key, ensure_ascii=False)}]"


def template_problem(template: object, path: str = "$") -> TemplateProblem | None:
    """The first thing wrong with a template document, or None: an unknown placeholder, a
    placeholder in a key (keys are written as they are), a value JSON cannot hold."""
    if isinstance(template, str):
        unknown = sorted({name.strip() for name in ANY_PLACEHOLDER.findall(template)} - {*FIELDS, *MARKDOWN_FIELDS})
        if unknown:
            known = f"known: {', '.join((*FIELDS, *MARKDOWN_FIELDS))}"
            return TemplateProblem(f"unknown placeholder(s) {', '.join(unknown)}", path, known)
        return None
    if isinstance(template, Mapping):
        for key, value in template.items():
            where = _place(path, key)
            if not isinstance(key, str):
                return TemplateProblem("a key that is not a string", where)
            if ANY_PLACEHOLDER.search(key):
                hint = "keys are written as they are: put the placeholder in a value"
                return TemplateProblem(f"a placeholder in a key ({key!r})", where, hint)
            problem = template_problem(value, where)
            if problem:
                return problem
        return None
    if isinstance(template, list):
        for index, item in enumerate(template):
            problem = template_problem(item, f"{path}[{index}]")
            if problem:
                return problem
        return None
    if template is None or isinstance(template, (bool, int, float)):
        return None
    return TemplateProblem(f"a value JSON cannot hold ({type(template).__name__})", path)


def check_template(template: object) -> TemplateProblem | None:
    """:func:`template_problem`, then the template rendered once and encoded as JSON."""
    problem = template_problem(template)
    if problem:
        return problem
    try:
        json.dumps(fill(template, _SAMPLE), allow_nan=False)
    except (TypeError, ValueError) as exc:  # NaN or infinity in the file, for one
        return TemplateProblem(f"a document that does not render to JSON ({exc})", "$")
    return None


def load_template(path: str) -> Any:
    """A webhook template: a JSON file (ConfigError naming it when unreadable or not JSON)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"webhook.template: cannot read {path}: {why}") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"webhook.template: {path} is not JSON: {exc}") from None


@dataclass(frozen=True, repr=False)
class WebhookSettings(UrlSettings):
    """A URL to POST JSON to. The URL's token parts and the header values are secrets.

    ``template_file`` is the template as configured (an absolute path), ``template`` the document
    read from it, when the config is read and again when the channel is built (None: the default
    document). The document is checked (:func:`check_template`) whenever these settings are made.
    """

    SECTION = "webhook"
    URL_SHAPE = "an http(s):// URL"

    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    header_env: Mapping[str, str] = field(default_factory=dict)  # header -> variable holding its value
    template: Any = None
    template_file: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    per_second: int | None = PER_SECOND

    def url_fits(self, url: str) -> bool:
        return urlsplit(url).scheme in ("http", "https") and bool(urlsplit(url).hostname)

    def check(self) -> None:
        problem = check_template(self.template) if self.template is not None else None
        if problem:
            raise ValueError(problem.said(self.template_file))

    def __repr__(self) -> str:
        return (
            f"WebhookSettings(url={redact_url(self.url) if self.url else None!r}, headers={sorted(self.headers)!r}, "
            f"template={'set' if self.template is not None or self.template_file else 'default'})"
        )

    def resolve_headers(self, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """The headers, those of ``header_env`` read from the environment (unset ones left out)."""
        values = dict(self.headers)
        for header, name in self.header_env.items():
            value = from_env(name, None, environ)
            if value:
                values[header] = value
        return values

    def own_secrets(self) -> list[str]:
        return list(self.resolve_headers().values())

    def resolved_extra(self, environ: Mapping[str, str] | None) -> dict[str, Any]:
        """The headers from the environment (each variable header_env names must be set) and the
        template read from its file."""
        for header, name in self.header_env.items():
            env_secret(from_env(name, None, environ), name, f"webhook.header_env.{header}")
        template = load_template(self.template_file) if self.template_file else self.template
        return {"headers": self.resolve_headers(environ), "header_env": {}, "template": template}


def parse(raw: object, base: Path) -> WebhookSettings:
    """``webhook:`` -> :class:`WebhookSettings` (ConfigError naming the key path)."""
    section = mapping(raw, "webhook")
    check_keys(section, KEYS, "webhook")
    values = url_and_mentions(section, "webhook", "where to POST the JSON")
    for key in ("headers", "header_env"):
        if section.get(key) is not None:
            values[key] = string_map(section[key], f"webhook.{key}")
    template = section.get("template")
    if isinstance(template, (dict, list)):  # the document itself, written in the config
        values["template"] = template
    elif template is not None:
        values["template_file"] = expand_path(string(template, "webhook.template"), base)
        values["template"] = load_template(values["template_file"])  # checked now, not at the first send
    if section.get("max_bytes") is not None:
        values["max_body_bytes"] = integer(section["max_bytes"], "webhook.max_bytes", 256, 10_000_000)
    return settings_of(lambda: WebhookSettings(**values))


def describe(settings: WebhookSettings) -> str:
    """What ``check`` says of the webhook: its template and headers."""
    if settings.template_file:
        template = f"template {settings.template_file}"
    else:
        template = "a template in the config" if settings.template is not None else "the default document"
    headers = len(settings.headers) + len(settings.header_env)
    return f"{template}, {headers} header(s)"


# ---------------------------------------------------------------- the sender


def fill(template: object, values: Mapping[str, Any]) -> Any:
    """The template with the placeholders in its values replaced (see the module docstring); its
    keys are written as they are."""
    if isinstance(template, str):
        whole = PLACEHOLDER.fullmatch(template.strip())
        if whole:
            return values[whole.group(1)]
        return PLACEHOLDER.sub(lambda m: _as_text(values[m.group(1)]), template)
    if isinstance(template, Mapping):
        return {k: fill(v, values) for k, v in template.items()}
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
        values.update(
            title_markdown=chat_markdown(title),
            summary_markdown=chat_markdown(values["summary"]),
            text_markdown=chat_markdown(values["text"]),
            blocks_markdown=[chat_markdown(block) for block in blocks],
        )
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


SPEC = ChannelSpec(
    name="webhook",
    parse=parse,
    sender=build,
    secrets=url_secret_values,
    inline_secrets=("url", "headers"),
    describe=describe,
    carries_reports=True,
    limits=LIMITS,
)
