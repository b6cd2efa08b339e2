"""``consul: {url, service, tag, token_env}``: the nodes of a service in Consul's catalog, followed live.

``GET <url>/v1/catalog/service/<service>?tag=<tag>`` lists the service's instances; each becomes a
host named by its ``Node``, reached at its ``ServiceAddress`` (else the node's ``Address``); the SSH
port and user are gpuwatch's (``ssh:``, ``match:`` entries). After the first answer every request is
a blocking query (``index=<X-Consul-Index>&wait=<refresh>``): Consul answers as soon as the list
changes, or after the wait with the same list, so a change shows within seconds and nothing is
polled in between. An index that goes backwards (the catalog was restored) starts over from 0, as
Consul's documentation asks. The ACL token comes from the environment variable ``token_env`` names,
read at each request, sent in the ``X-Consul-Token`` header, and never logged. Every request has a
timeout: its wait plus Consul's jitter (wait/16) plus ``timeout``.

:func:`hosts_in_catalog` is the pure part: an answer's body -> hosts, or DiscoveryError saying what
is wrong with it.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping

import requests

from ..config import DiscoverySource
from ..text import quote
from .base import RETRY_SECONDS, DiscoveredHost, DiscoveryError
from .hostlist import HostListError, check_name

MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_WAIT_SECONDS = 600.0  # Consul's own limit for a blocking query


def hosts_in_catalog(body: bytes) -> tuple[DiscoveredHost, ...]:
    """A ``/v1/catalog/service/<service>`` answer -> its hosts, in order, each node once."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        first = body[:80].decode("utf-8", "replace")
        raise DiscoveryError(f"the answer is not JSON (it begins {quote(first)})") from None
    if not isinstance(doc, list):
        raise DiscoveryError(f"expected a JSON list of service instances, got {type(doc).__name__}")
    hosts: dict[str, DiscoveredHost] = {}
    for i, item in enumerate(doc):
        if not isinstance(item, Mapping) or not isinstance(item.get("Node"), str):
            raise DiscoveryError(f"instance {i}: expected an object with a Node name, got {quote(item)}")
        try:
            name = check_name(item["Node"])
        except HostListError as exc:
            raise DiscoveryError(f"instance {i}: Node {exc}") from None
        address = item.get("ServiceAddress") or item.get("Address")
        if address is not None and not isinstance(address, str):
            raise DiscoveryError(f"instance {i} ({name}): the address is not a string: {quote(address)}")
        hosts.setdefault(name, DiscoveredHost(name, address=address or None))
    return tuple(hosts.values())


def next_index(previous: int, header: str | None) -> int:
    """The index for the next blocking query, from the answer's ``X-Consul-Index`` header: 0 (no
    blocking, ask again after the wait) when it is missing or not a positive number, or when it
    went backwards (Consul's advice: the catalog was reset)."""
    try:
        index = int(header or "")
    except ValueError:
        return 0
    if index <= 0 or index < previous:
        return 0
    return index


class ConsulSource:
    """The ``consul`` source: blocking queries on the service's catalog entry."""

    def __init__(
        self,
        spec: DiscoverySource,
        session: requests.Session | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.spec = spec
        self.session = session or requests.Session()
        self.environ = os.environ if environ is None else environ
        self.index = 0  # 0: the next request does not block
        self.url = f"{spec.url}/v1/catalog/service/{spec.service}"

    @property
    def wait_seconds(self) -> float:
        return min(self.spec.refresh, MAX_WAIT_SECONDS)

    def _headers(self) -> dict[str, str]:
        if not self.spec.token_env:
            return {}
        token = self.environ.get(self.spec.token_env)
        if not token:
            raise DiscoveryError(f"the token variable {self.spec.token_env} is not set")
        return {"X-Consul-Token": token}

    def fetch(self) -> tuple[DiscoveredHost, ...]:
        params: dict[str, str] = {}
        if self.spec.tag:
            params["tag"] = self.spec.tag
        wait = 0.0
        if self.index:
            wait = self.wait_seconds
            params.update(index=str(self.index), wait=f"{int(wait)}s")
        timeout = (self.spec.timeout, wait + wait / 16 + self.spec.timeout)
        try:
            with self.session.get(
                self.url, params=params, headers=self._headers(), timeout=timeout, stream=True
            ) as reply:
                body = reply.raw.read(MAX_BODY_BYTES + 1, decode_content=True)
                status, header = reply.status_code, reply.headers.get("X-Consul-Index")
        except requests.RequestException as exc:
            self.index = 0
            raise DiscoveryError(f"{type(exc).__name__}: {exc}") from None
        if len(body) > MAX_BODY_BYTES:
            raise DiscoveryError(f"the answer is larger than {MAX_BODY_BYTES // 2**20} MiB")
        if status != 200:
            self.index = 0
            why = " (the ACL token is missing or not allowed to read the service)" if status == 403 else ""
            text = body[:120].decode("utf-8", "replace").strip()
            raise DiscoveryError(f"HTTP {status}{why}: {quote(text)}")
        try:
            hosts = hosts_in_catalog(body)
        except DiscoveryError:
            self.index = 0
            raise
        self.index = next_index(self.index, header)
        return hosts

    def wait(self, stop: threading.Event, ok: bool) -> None:
        """At once while blocking queries work (Consul itself waits); else ``refresh`` (no index)
        or a retry delay (a failure)."""
        if not ok:
            stop.wait(min(self.spec.refresh, RETRY_SECONDS))
        elif not self.index:
            stop.wait(self.spec.refresh)

    def close(self) -> None:
        self.session.close()
