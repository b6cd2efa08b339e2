"""Secrets in webhook URLs, masked for people: what a log line, an error or a repr may show.

Pure and light (no HTTP library): a channel's settings use it in their repr, the senders in every
error they raise.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit, urlunsplit

MASK = "…(masked)"


def masked(value: str) -> str:
    """A secret for people: its first 4 characters when it is long enough to keep them safe."""
    return (value[:4] if len(value) >= 16 else "") + MASK


def redact_url(url: str, *, path_segments: int = 1, query: bool = True) -> str:
    """``url`` safe for logs and errors: its last ``path_segments`` path segments (where webhook
    tokens live) and every query value masked (``query=False``: the query dropped); user info and
    fragment dropped (they may hold secrets too)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    segments = parts.path.rstrip("/").split("/")
    for i in range(max(1, len(segments) - path_segments), len(segments)):
        if segments[i]:
            segments[i] = masked(segments[i])
    shown_query = ""
    if query and parts.query:
        shown_query = "&".join(f"{k}={masked(v)}" for k, v in parse_qsl(parts.query, keep_blank_values=True))
    return urlunsplit((parts.scheme, host, "/".join(segments) if path_segments else parts.path, shown_query, ""))


def url_secrets(url: str, *, path_segments: int = 1) -> list[str]:
    """The secret parts of a webhook URL (last path segments, query values, user info), to scrub
    wherever a library echoed them."""
    parts = urlsplit(url)
    found = [s for s in parts.path.rstrip("/").split("/")[-path_segments:] if s] if path_segments else []
    found += [v for _, v in parse_qsl(parts.query, keep_blank_values=True) if v]
    found += [s for s in (parts.username, parts.password) if s]
    return [s for s in found if len(s) >= 4]  # masking 1-3 characters would garble every word holding them


def query_values(url: str | None) -> list[str]:
    """Every non-empty query value of ``url`` (access tokens, keys)."""
    return [v for _, v in parse_qsl(urlsplit(url or "").query) if v]


def present(*values: str | None) -> list[str]:
    """The values that are set."""
    return [v for v in values if v]
