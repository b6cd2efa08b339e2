"""The live fleet page, the JSON API and ``/metrics``: a read-only WSGI app over the fleet state.

Routes (under ``web.base_path``), GET and HEAD only:

* ``/``: the page, rendered on the server (readable without JavaScript); its small script
  (``static/gpuwatch.js``) fetches ``/fragment`` with the same query after every poll and swaps it in.
  ``?q=`` filters by user, host or GPU model; ``?free=1`` shows only free GPUs.
* ``/api/v1/snapshot``: :func:`~gpuwatch.render.snapshot_dict`, the ``status --json`` document;
  ``/api/v1/alerts``: :func:`~gpuwatch.render.alerts_dict`, the ``alerts --json`` document;
* ``/healthz``: 200 while hosts are being polled, 503 with the reason when none was for 3 intervals;
* ``/metrics``: Prometheus text (``metrics.py``).

The app reads the fleet state and the store; it never polls and never sends. Everything from a host
is escaped by the templates (Jinja2 autoescape); the Content-Security-Policy allows no inline script.
Every string people read is made here, with ``text.py``, and the templates only place it.
:class:`WebServer` serves the app with waitress in a daemon thread, hardened against slow and huge
clients by ``webserver.py``; with ``web.auth`` failed logins are slowed per peer (``webauth.py``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlencode

import jinja2
from prometheus_client.exposition import choose_encoder

from .config import Config, FreeGpuConfig, WebConfig
from .fleet import STALE_AFTER_POLLS, FleetState
from .metrics import build_registry
from .model import FleetSnapshot, Gpu, GpuProcess, HostSnapshot
from .render import alerts_dict, snapshot_dict
from .store import StoreReader
from .summary import is_free, process_context, totals, who
from .text import UNKNOWN, format_duration, local_time, number, plural
from .webauth import LoginGuard, basic_credentials_match, peer_of
from .webserver import guarded_server

log = logging.getLogger(__name__)

StartResponse = Callable[[str, list[tuple[str, str]]], Any]

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = (
    ("Content-Security-Policy", CSP),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
)
STATIC_FILES = {"gpuwatch.css": "text/css; charset=utf-8", "gpuwatch.js": "text/javascript; charset=utf-8"}
GZIP_ABOVE_BYTES = 1024
COMMAND_TITLE_CHARS = 2000  # a command line longer than this is cut in the hover text (shown whole on expand)


# ---------------------------------------------------------------- what the page shows (pure)


@dataclass(frozen=True)
class Query:
    """The page's filter, as in its URL: ``?q=alice h100&free=1``."""

    text: str = ""
    free_only: bool = False

    @classmethod
    def parse(cls, query_string: str) -> Query:
        params = parse_qs(query_string, keep_blank_values=False)
        text = " ".join(params.get("q", [""])[-1].split())[:200]
        return cls(text=text, free_only=params.get("free", [""])[-1] in ("1", "on", "true", "yes"))

    @property
    def terms(self) -> list[str]:
        return self.text.lower().split()

    @property
    def active(self) -> bool:
        return bool(self.text) or self.free_only

    def url_query(self) -> str:
        params = {k: v for k, v in (("q", self.text), ("free", "1" if self.free_only else "")) if v}
        return f"?{urlencode(params)}" if params else ""


@dataclass(frozen=True)
class ProcView:
    key: str  # stable across refreshes: keeps an expanded command open
    owner: str  # the person behind it, as ``status`` and chat name them (``summary.who``'s owner)
    context: str  # where it runs: container, Slurm job, another user's session (may be empty)
    ps_user: str  # "run as root" when ps saw another account than the owner; else empty
    memory: str
    runtime: str
    name: str
    command: str
    title: str


@dataclass(frozen=True)
class GpuView:
    index: int
    model: str
    util: str
    util_value: int | None
    memory: str
    memory_percent: float | None
    memory_value: int | None
    memory_total: int | None
    temperature: str
    power: str
    free: bool
    processes: tuple[ProcView, ...]


@dataclass(frozen=True)
class HostView:
    name: str
    address: str
    gpus: tuple[GpuView, ...]
    gpu_count: int
    free_count: int
    taken_at: float | None  # epoch seconds: the page counts its age
    age: str
    probe: str
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class ProblemView:
    name: str
    address: str
    state: str  # down | stale | waiting
    kind: str
    reason: str
    since: str
    since_ts: float | None
    since_age: str
    last_ok: str


@dataclass(frozen=True)
class PageView:
    summary: tuple[tuple[str, str], ...]  # (text, css class)
    problems: tuple[ProblemView, ...]
    hosts: tuple[HostView, ...]
    shown: str  # "showing 5 of 30 GPUs" when a filter is on
    empty: str  # what to say when the filter leaves nothing
    query: Query
    now: float
    newest: float | None
    newest_age: str


def _ts(when: datetime | None) -> float | None:
    return None if when is None else when.timestamp()


def _ago(when: datetime | None, now: datetime) -> str:
    if when is None:
        return UNKNOWN
    return f"{format_duration(max(0.0, (now - when).total_seconds()))} ago"


def _mib(value: int | None) -> str:
    return number(value, " MiB")


def proc_view(host: HostSnapshot, proc: GpuProcess) -> ProcView:
    """A process as the page shows it: the owner and context that ``status`` and chat show
    (``summary.who``), the ``ps`` user only as detail when it is another account."""
    owner = proc.owner if proc.owner is not None else f"pid {proc.pid} (owner unknown)"
    ps_user = f"run as {proc.user}" if proc.user is not None and proc.user != proc.owner else ""
    command = proc.command or proc.name or UNKNOWN
    words = command.split()
    short = words[0].rsplit("/", 1)[-1] if words else UNKNOWN
    title = command if len(command) <= COMMAND_TITLE_CHARS else command[:COMMAND_TITLE_CHARS] + "…"
    run_as = f", {ps_user}" if ps_user else ""
    return ProcView(
        key=f"{host.name}/{proc.gpu_index}/{proc.pid}",
        owner=owner,
        context=process_context(proc) if proc.owner is not None else "",
        ps_user=ps_user,
        memory=_mib(proc.used_memory_mib),
        runtime=format_duration(proc.runtime_seconds),
        name=short,
        command=command,
        title=f"pid {proc.pid}{run_as}: {title}",
    )


def gpu_view(host: HostSnapshot, gpu: Gpu, free: bool) -> GpuView:
    used, total = gpu.memory_used_mib, gpu.memory_total_mib
    percent = round(100 * used / total, 1) if used is not None and total else None
    procs = sorted(host.processes_on(gpu), key=lambda p: (p.owner is None, -(p.used_memory_mib or 0), p.pid))
    return GpuView(
        index=gpu.index,
        model=gpu.name or UNKNOWN,
        util=number(gpu.utilization_percent, "%"),
        util_value=gpu.utilization_percent,
        memory=f"{number(used)} / {_mib(total)}" if total is not None else _mib(used),
        memory_percent=percent,
        memory_value=used,
        memory_total=total,
        temperature=number(gpu.temperature_c, "°C"),
        power=UNKNOWN if gpu.power_w is None else f"{gpu.power_w:.0f} W",
        free=free,
        processes=tuple(proc_view(host, p) for p in procs),
    )


def _gpu_matches(host: HostSnapshot, gpu: Gpu, terms: Sequence[str]) -> bool:
    """Every term is found in the host's name, the GPU's model or who is on it: the owner and
    context of each process as ``status`` says them (``summary.who``), not the ``ps`` user."""
    people = " ".join(who(p) for p in host.processes_on(gpu))
    haystack = f"{host.name} {gpu.name or ''} {people}".lower()
    return all(term in haystack for term in terms)


def problem_view(host: HostSnapshot, now: datetime) -> ProblemView:
    if host.taken_at is None:
        return ProblemView(host.name, host.address, "waiting", "waiting", host.error or "", UNKNOWN, None, "", UNKNOWN)
    last_ok = local_time(host.last_ok_at) if host.last_ok_at else "never since gpuwatch started"
    if host.stale:
        age = format_duration(host.age_seconds(now))
        last = plural(len(host.gpus), "GPU") if host.ok else f"{host.error}"
        return ProblemView(
            name=host.name,
            address=host.address,
            state="stale",
            kind="stale",
            reason=f"no new result for {age} (last: {last})",
            since=local_time(host.taken_at),
            since_ts=_ts(host.taken_at),
            since_age=_ago(host.taken_at, now),
            last_ok=last_ok,
        )
    since = host.failing_since or host.taken_at
    return ProblemView(
        name=host.name,
        address=host.address,
        state="down",
        kind=host.error_name,
        reason=host.error or "",
        since=local_time(since),
        since_ts=_ts(since),
        since_age=_ago(since, now),
        last_ok=last_ok,
    )


def page_view(snapshot: FleetSnapshot, thresholds: FreeGpuConfig, query: Query) -> PageView:
    """What the page shows for this snapshot and filter: problems first, then the hosts that answered."""
    now = snapshot.taken_at
    terms = query.terms
    t = totals(snapshot, thresholds)
    problems = []
    hosts = []
    shown_gpus = 0
    for host in snapshot.hosts:
        if not host.current:
            if all(term in host.name.lower() for term in terms):
                problems.append(problem_view(host, now))
            continue
        views = []
        free_count = 0
        for gpu in host.gpus:
            free = is_free(gpu, host.processes_on(gpu), thresholds)
            free_count += free
            if (query.free_only and not free) or not _gpu_matches(host, gpu, terms):
                continue
            views.append(gpu_view(host, gpu, free))
        shown_gpus += len(views)
        if not views and query.active:
            continue
        hosts.append(
            HostView(
                name=host.name,
                address=host.address,
                gpus=tuple(views),
                gpu_count=len(host.gpus),
                free_count=free_count,
                taken_at=_ts(host.taken_at),
                age=_ago(host.taken_at, now),
                probe=UNKNOWN if host.probe_seconds is None else f"{host.probe_seconds:.2f}s",
                warnings=tuple(w.message for w in host.warnings),
            )
        )
    down = t.hosts_down
    summary: list[tuple[str, str]] = [
        (plural(t.hosts, "host"), ""),
        (f"{t.hosts - down - t.hosts_stale} answered", ""),
    ]
    if down:
        summary.append((f"{down} down", "bad"))
    if t.hosts_stale:
        summary.append((f"{t.hosts_stale} stale", "warn"))
    summary.append((plural(t.gpus, "GPU"), ""))
    summary.append((f"{t.free_gpus} free", "good" if t.free_gpus else ""))
    taken = [h.taken_at for h in snapshot.hosts if h.taken_at is not None]
    newest = max(taken) if taken else None
    return PageView(
        summary=tuple(summary),
        problems=tuple(problems),
        hosts=tuple(hosts),
        shown=f"showing {shown_gpus} of {plural(t.gpus, 'GPU')}" if query.active else "",
        empty="no GPU matches the filter" if query.active and not hosts else "",
        query=query,
        now=now.timestamp(),
        newest=_ts(newest),
        newest_age=_ago(newest, now),
    )


def health(snapshot: FleetSnapshot, poll_every: float, started: datetime) -> tuple[bool, str]:
    """Is the daemon polling? Unhealthy when no host has a result newer than 3 poll intervals."""
    now = snapshot.taken_at
    limit = STALE_AFTER_POLLS * poll_every
    taken = [h.taken_at for h in snapshot.hosts if h.taken_at is not None]
    answered = len(snapshot.answered)
    if not taken:
        waited = (now - started).total_seconds()
        if waited <= limit:
            return True, f"starting: no result yet ({format_duration(waited)} since start)"
        return False, f"no host has been polled since start, {format_duration(waited)} ago ({STALE_AFTER_POLLS} polls)"
    age = (now - max(taken)).total_seconds()
    if age > limit:
        return False, (
            f"no host has been polled for {format_duration(age)} "
            f"({STALE_AFTER_POLLS} poll intervals of {format_duration(poll_every)})"
        )
    return (
        True,
        f"ok: {answered} of {plural(len(snapshot.hosts), 'host')} answered; newest result {format_duration(age)} ago",
    )


# ---------------------------------------------------------------- the WSGI app


@dataclass(frozen=True)
class Response:
    status: str
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()
    compress: bool = True


def _text(status: str, text: str, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return Response(status, (text + "\n").encode(), headers=headers)


def _json(doc: Mapping[str, Any], status: str = "200 OK") -> Response:
    body = json.dumps(doc, ensure_ascii=False, allow_nan=False, indent=1).encode()
    return Response(status, body, "application/json; charset=utf-8")


def _unauthorized() -> Response:
    return _text(
        "401 Unauthorized",
        "this gpuwatch page needs a user name and password",
        (("WWW-Authenticate", 'Basic realm="gpuwatch", charset="UTF-8"'),),
    )


def _load_static() -> dict[str, tuple[bytes, str]]:
    files = resources.files("gpuwatch") / "static"
    return {name: ((files / name).read_bytes(), ctype) for name, ctype in STATIC_FILES.items()}


class WebApp:
    """The WSGI application. ``config`` gives the daemon's current config (it changes on SIGHUP);
    ``web`` is fixed for the server's life (a new address or password needs a restart); ``clock``
    (monotonic seconds) times the waits after failed logins."""

    def __init__(
        self,
        state: FleetState,
        config: Callable[[], Config],
        web: WebConfig,
        store: StoreReader | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.state = state
        self.config = config
        self.web = web
        self.store = store
        self.base = web.base_path
        self.started = state.snapshot().taken_at
        self.registry = build_registry(state, config, store)
        self.static = _load_static()
        self.static_version = hashlib.sha256(b"".join(b for b, _ in self.static.values())).hexdigest()[:12]
        self.templates = jinja2.Environment(
            loader=jinja2.PackageLoader("gpuwatch", "templates"),
            autoescape=True,  # every template, whatever its name: host data is never trusted
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.logins = LoginGuard(clock)
        self._auth_user = web.auth.user if web.auth else None
        self._auth_password = web.auth.resolve_password() if web.auth else None
        if web.auth and not self._auth_password:
            raise ValueError(f"web.auth.password_env: ${web.auth.password_env} is not set in the environment")

    # -- plumbing

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        try:
            response = self.respond(environ)
        except Exception:
            log.exception("web: %s %s failed", method, environ.get("PATH_INFO", ""))
            response = _text("500 Internal Server Error", "internal error; see the gpuwatch log")
        body = response.body
        headers = [("Content-Type", response.content_type), *SECURITY_HEADERS, *response.headers]
        if not any(name == "Cache-Control" for name, _ in response.headers):
            headers.append(("Cache-Control", "no-store"))
        if response.compress and len(body) > GZIP_ABOVE_BYTES and "gzip" in environ.get("HTTP_ACCEPT_ENCODING", ""):
            body = gzip.compress(body, compresslevel=5, mtime=0)
            headers.append(("Content-Encoding", "gzip"))
        headers.append(("Vary", "Accept-Encoding, Authorization"))
        headers.append(("Content-Length", str(len(body))))
        start_response(response.status, headers)
        return [b""] if method == "HEAD" else [body]

    def _login(self, environ: Mapping[str, Any]) -> Response | None:
        """None when the request may see the page; else the 401 (or, for a peer that must wait
        after failed logins, the 429) to answer. Failed logins are counted, slowed and logged per
        peer by :class:`~gpuwatch.webauth.LoginGuard`: no thread sleeps."""
        if self._auth_user is None or self._auth_password is None:
            return None
        header = environ.get("HTTP_AUTHORIZATION")
        if header is None:  # a browser's first request: not a failed login
            return _unauthorized()
        peer = peer_of(str(environ.get("REMOTE_ADDR", "")))
        wait = self.logins.admit(peer)
        if wait > 0:
            return _text(
                "429 Too Many Requests",
                f"too many failed logins from {peer}; try again in {math.ceil(wait)} s",
                (("Retry-After", str(math.ceil(wait))),),
            )
        ok = False
        try:
            ok = basic_credentials_match(str(header), self._auth_user, self._auth_password)
        finally:
            self.logins.settle(peer, ok)
        return None if ok else _unauthorized()

    def respond(self, environ: Mapping[str, Any]) -> Response:
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            return _text("405 Method Not Allowed", "only GET and HEAD", (("Allow", "GET, HEAD"),))
        path = str(environ.get("PATH_INFO", "") or "/")
        # Behind a proxy that forwards the prefix, and behind one that strips it, alike.
        if self.base and (path == self.base or path.startswith(self.base + "/")):
            path = path[len(self.base) :] or "/"
        query = str(environ.get("QUERY_STRING", ""))
        if path == "/healthz":
            healthy, reason = health(self.state.snapshot(), self.state.poll_every, self.started)
            return _text("200 OK" if healthy else "503 Service Unavailable", reason)
        route = self._routes().get(path)
        if route is None and not path.startswith("/static/"):
            return _text("404 Not Found", f"no page {path}; try {self.base}/")
        refused = self._login(environ)
        if refused is not None:
            return refused
        if route is None:
            return self.static_file(path[len("/static/") :])
        return route(environ, query)

    def _routes(self) -> dict[str, Callable[[Mapping[str, Any], str], Response]]:
        return {
            "/": self.page,
            "/fragment": self.fragment,
            "/api/v1/snapshot": self.api_snapshot,
            "/api/v1/alerts": self.api_alerts,
            "/metrics": self.metrics,
        }

    # -- routes

    def static_file(self, name: str) -> Response:
        found = self.static.get(name)
        if found is None:
            return _text("404 Not Found", f"no file {name}")
        body, ctype = found
        return Response("200 OK", body, ctype, (("Cache-Control", "public, max-age=86400"),))

    def _refresh_ms(self) -> int:
        """How often the page asks for news: twice per poll interval, between 1 s and 10 s."""
        return int(1000 * min(10.0, max(1.0, self.state.poll_every / 2)))

    def _etag(self, snapshot: FleetSnapshot, version: int, query: Query) -> str:
        stale = ",".join(h.name for h in snapshot.hosts if h.stale)
        raw = f"{version}|{stale}|{query.text}|{query.free_only}|{self.config().free_gpu}"
        return '"' + hashlib.sha256(raw.encode()).hexdigest()[:20] + '"'

    def _view(self, query: Query) -> tuple[PageView, str]:
        version = self.state.version
        snapshot = self.state.snapshot()
        return page_view(snapshot, self.config().free_gpu, query), self._etag(snapshot, version, query)

    def page(self, environ: Mapping[str, Any], query_string: str) -> Response:
        query = Query.parse(query_string)
        view, _ = self._view(query)
        html = self.templates.get_template("page.html").render(
            view=view,
            base=self.base,
            static_version=self.static_version,
            refresh_ms=self._refresh_ms(),
            noscript_refresh=max(10, round(self.state.poll_every)),
            poll_every=format_duration(self.state.poll_every),
        )
        return Response("200 OK", html.encode(), "text/html; charset=utf-8")

    def fragment(self, environ: Mapping[str, Any], query_string: str) -> Response:
        """The live part of the page, for its script: 304 when nothing changed."""
        query = Query.parse(query_string)
        view, etag = self._view(query)
        if environ.get("HTTP_IF_NONE_MATCH") == etag:
            return Response("304 Not Modified", b"", headers=(("ETag", etag),), compress=False)
        html = self.templates.get_template("fleet.html").render(view=view, base=self.base)
        return Response("200 OK", html.encode(), "text/html; charset=utf-8", (("ETag", etag),))

    def api_snapshot(self, environ: Mapping[str, Any], query_string: str) -> Response:
        return _json(snapshot_dict(self.state.snapshot(), self.config().free_gpu))

    def api_alerts(self, environ: Mapping[str, Any], query_string: str) -> Response:
        if self.store is None:
            return _json({"error": "no alert state in this mode"}, "503 Service Unavailable")
        include_pending = parse_qs(query_string).get("all", [""])[-1] == "1"
        records, silences = self.store.alerts()
        taken_at = self.store.alerts_evaluated_at()
        poll_every = self.config().schedule.poll_every
        return _json(
            alerts_dict(
                records,
                silences,
                time.time(),
                include_pending,
                taken_at=taken_at,
                poll_every=poll_every,
                acks=self.store.acks(),
            )
        )

    def metrics(self, environ: Mapping[str, Any], query_string: str) -> Response:
        encoder, content_type = choose_encoder(str(environ.get("HTTP_ACCEPT", "")))
        return Response("200 OK", encoder(self.registry), content_type)


# ---------------------------------------------------------------- serving it


class WebServer:
    """The app on a waitress server hardened against slow and huge clients (``webserver.py``). The
    socket is bound at construction (so a busy port is a start-up error, said at once); :meth:`start`
    serves in a daemon thread; :meth:`stop` closes it."""

    def __init__(self, app: WebApp, host: str, port: int, threads: int = 4) -> None:
        self.app = app
        # A burst of requests queues for a moment: normal, not a warning worth a log line each time.
        logging.getLogger("waitress.queue").setLevel(logging.ERROR)
        self._server: Any = guarded_server(app, host, port, threads)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.effective_port)

    @property
    def host(self) -> str:
        return str(self._server.effective_host)

    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{self.app.base}/"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.run, name="web", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listening socket and every connection (in the server's own loop thread), then
        let the worker threads finish what they are doing."""
        server = self._server

        def close_all() -> None:
            for channel in list(server._map.values()):
                channel.close()

        if self._thread is not None and self._thread.is_alive():
            server.trigger.pull_trigger(close_all)
            self._thread.join(timeout)
        else:
            server.close()
        server.task_dispatcher.shutdown(timeout=timeout)
        if self.app.store is not None:
            self.app.store.close()
