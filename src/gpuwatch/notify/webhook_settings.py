"""The generic webhook channel as the config and ``check`` see it: ``webhook:``, read and checked once.

:class:`WebhookSettings` is the one record of a URL to POST JSON to: ``url`` or ``url_env``, headers
(values in the file, or read from the variables ``header_env`` names), an optional template file
and the size limit. Building the channel (:func:`gpuwatch.notify.webhook.build`) resolves the URL
and headers from the environment and reads the template (so an edited template applies at the
next build). The URL's token parts and the header values are secrets.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..config.values import ConfigError, check_keys, expand_path, from_env, integer, mapping, string, string_map
from .masking import redact_url
from .spec import ChannelSpec, Limits, UrlSettings, env_secret, settings_of, url_and_mentions, url_secret_values

#: The values a template may place (``{{name}}``).
FIELDS = ("source", "kind", "severity", "title", "summary", "text", "blocks", "part", "parts", "link", "mentions")
PLACEHOLDER = re.compile(r"\{\{\s*([a-z_]+)\s*\}\}")
MAX_BODY_BYTES = 20_000
PER_SECOND = 5
LIMITS = Limits(max_body_bytes=MAX_BODY_BYTES, per_second=PER_SECOND)
KEYS = ("url", "url_env", "headers", "header_env", "template", "max_bytes")


def placeholders(template: object) -> set[str]:
    """Every ``{{name}}`` in a template."""
    if isinstance(template, str):
        return set(PLACEHOLDER.findall(template))
    if isinstance(template, Mapping):
        return {n for k, v in template.items() for n in placeholders(k) | placeholders(v)}
    if isinstance(template, list):
        return {n for item in template for n in placeholders(item)}
    return set()


def load_template(path: str) -> Any:
    """A webhook template: a JSON file (ConfigError naming it when unreadable or not JSON)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"webhook.template: cannot read {path}: {exc.strerror or exc}") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"webhook.template: {path} is not JSON: {exc}") from None


@dataclass(frozen=True, repr=False)
class WebhookSettings(UrlSettings):
    """A URL to POST JSON to. The URL's token parts and the header values are secrets.

    ``template_file`` is the template as configured (an absolute path), ``template`` the document
    read from it when the channel is built (None: the default document).
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
        unknown = placeholders(self.template) - set(FIELDS)
        if unknown:
            raise ValueError(
                f"webhook.template: unknown placeholder(s) {', '.join(sorted(unknown))}; known: {', '.join(FIELDS)}"
            )

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
    if section.get("template") is not None:
        values["template_file"] = expand_path(string(section["template"], "webhook.template"), base)
    if section.get("max_bytes") is not None:
        values["max_body_bytes"] = integer(section["max_bytes"], "webhook.max_bytes", 256, 10_000_000)
    return settings_of(lambda: WebhookSettings(**values))


def describe(settings: WebhookSettings) -> str:
    """What ``check`` says of the webhook: its template and headers."""
    template = f"template {settings.template_file}" if settings.template_file else "the default document"
    headers = len(settings.headers) + len(settings.header_env)
    return f"{template}, {headers} header(s)"


SPEC = ChannelSpec(
    name="webhook",
    parse=parse,
    sender="gpuwatch.notify.webhook",
    secrets=url_secret_values,
    inline_secrets=("url", "headers"),
    describe=describe,
    carries_reports=True,
    limits=LIMITS,
)
