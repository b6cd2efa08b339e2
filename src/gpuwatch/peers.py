"""The other shards' pages (``web.peers``), read in the background for the whole-site page.

:class:`PeerWatcher` runs one thread per peer beside the web server (started and stopped with it):
each asks its peer's ``/api/v1/snapshot`` every ``every`` seconds, with a short timeout, and keeps
the last good answer. The page only reads what is kept (:meth:`PeerWatcher.answers`): a page view
never waits for a peer. A peer that stops answering keeps its last answer, with since when and why
it fails, so its hosts can be shown as not answering rather than dropped.

With ``web.auth``, the peers are asked with the same user and password (one shared config gives
every shard the same ``web:``); the password is never logged. An answer is read up to
:data:`MAX_ANSWER_BYTES`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import requests

from .siteview import PeerAnswer

log = logging.getLogger(__name__)

EVERY_SECONDS = 5.0
TIMEOUT_SECONDS = 3.0
MAX_ANSWER_BYTES = 32 * 1024 * 1024  # a snapshot of a thousand 8-GPU hosts is a few MB
SNAPSHOT_PATH = "/api/v1/snapshot"

Fetch = Callable[[str], Mapping[str, Any]]


class PeerError(Exception):
    """Why a peer's answer could not be used, in words for the page."""


def http_fetch(auth: tuple[str, str] | None, timeout: float = TIMEOUT_SECONDS) -> Fetch:
    """A fetch over HTTP(S): GET ``url`` + ``/api/v1/snapshot`` with ``auth`` (HTTP Basic) within
    ``timeout`` seconds to connect and between bytes, the JSON document or :class:`PeerError`."""

    def fetch(url: str) -> Mapping[str, Any]:
        try:
            with requests.get(url + SNAPSHOT_PATH, auth=auth, timeout=timeout, stream=True) as response:
                if response.status_code == 401:
                    raise PeerError("refused our login (HTTP 401): is its web.auth the same as ours?")
                if response.status_code != 200:
                    raise PeerError(f"answered HTTP {response.status_code}")
                body = b""
                deadline = time.monotonic() + 4 * timeout  # a peer trickling its answer is cut off too
                for chunk in response.iter_content(64 * 1024):
                    body += chunk
                    if time.monotonic() > deadline:
                        raise PeerError(f"took more than {4 * timeout:g}s to answer")
                    if len(body) > MAX_ANSWER_BYTES:
                        raise PeerError(f"answered more than {MAX_ANSWER_BYTES // (1024 * 1024)} MB")
        except requests.Timeout:
            raise PeerError(f"no answer within {timeout:g}s") from None
        except requests.ConnectionError as exc:
            raise PeerError(_connection_words(exc)) from None
        except requests.RequestException as exc:
            raise PeerError(type(exc).__name__) from None
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise PeerError("answered something that is not JSON: is this a gpuwatch page?") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("hosts"), list):
            raise PeerError("answered JSON without hosts: is this a gpuwatch page?")
        return doc

    return fetch


def _connection_words(exc: Exception) -> str:
    text = str(exc)
    if "Connection refused" in text:
        return "connection refused (is gpuwatch running there?)"
    if "Name or service not known" in text or "Failed to resolve" in text:
        return "its name does not resolve"
    return "cannot connect"


class PeerWatcher:
    """Each peer asked in a thread of its own; the answers kept for the page (thread-safe)."""

    def __init__(
        self,
        urls: Sequence[str],
        fetch: Fetch,
        *,
        every: float = EVERY_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.urls = tuple(urls)
        self.fetch = fetch
        self.every = every
        self.clock = clock
        self._lock = threading.Lock()
        self._answers = {url: PeerAnswer(url) for url in self.urls}
        self._version = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.started_at = clock()

    def answers(self) -> tuple[PeerAnswer, ...]:
        with self._lock:
            return tuple(self._answers[url] for url in self.urls)

    @property
    def version(self) -> int:
        """Changes whenever an answer changes (the page's ETag)."""
        with self._lock:
            return self._version

    def ask(self, url: str) -> None:
        """Ask ``url`` once and keep what it said (the threads call this; a test may too)."""
        try:
            doc = self.fetch(url)
        except PeerError as exc:
            self._failed(url, str(exc))
            return
        except Exception as exc:  # a bug in reading one peer must not end its thread
            log.exception("web.peers: asking %s failed", url)
            self._failed(url, type(exc).__name__)
            return
        with self._lock:
            before = self._answers[url]
            if before.failing_since is not None:
                log.info("web.peers: %s answers again", url)
            self._answers[url] = PeerAnswer(url, doc, self.clock(), None, "", True)
            self._version += 1

    def _failed(self, url: str, why: str) -> None:
        with self._lock:
            before = self._answers[url]
            if before.failing_since is None:
                log.warning("web.peers: %s does not answer: %s", url, why)
            since = before.failing_since if before.failing_since is not None else self.clock()
            self._answers[url] = replace(before, failing_since=since, error=why, tried=True)
            self._version += 1

    def _run(self, url: str) -> None:
        while not self._stop.is_set():
            self.ask(url)
            self._stop.wait(self.every)

    def start(self) -> None:
        for url in self.urls:
            thread = threading.Thread(target=self._run, args=(url,), name=f"peer {url}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = TIMEOUT_SECONDS + 2) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)
