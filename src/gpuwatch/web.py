"""The live fleet page, the JSON API and ``/metrics``: a read-only WSGI app over the fleet state.

Routes (under ``web.base_path``), GET and HEAD only:

* ``/``: the page, rendered on the server (readable without JavaScript); its small script
  (``static/gpuwatch.js``) fetches ``/fragment`` with the same query after every poll and swaps it in.
  ``?q=`` filters by user, host or GPU model; ``?free=1`` shows only free GPUs; ``?sort=`` orders
  hosts and GPUs (free, memory, host); ``?view=wall`` is the dense view for a screen on a wall
  (``web.view: wall`` makes it the default). What it shows is made by ``pageview.py``.
* ``/api/v1/snapshot``: :func:`~gpuwatch.render.snapshot_dict`, the ``status --json`` document;
  ``/api/v1/alerts``: :func:`~gpuwatch.render.alerts_dict`, the ``alerts --json`` document;
  ``/api/v1/reservations``: :func:`~gpuwatch.reservation.reservations_dict`, the ``reserve list --json``
  document (the bookings in force and to come; ``?all=1``: past ones too);
  ``/api/v1/usage?since=7d&by=user``: :meth:`~gpuwatch.store.historyread.HistoryReader.usage`, the
  ``usage --json`` document; ``/api/v1/usage/daily?days=7``: per day each person's GPU-hours
  (``historyview.daily_document``);
* ``/usage``: GPU-hours per person over a period (``?days=30``, ``?from=2026-12-01&to=2026-12-07``)
  and by day, from the usage history (``historyview.py``, ``pagehistory.py``); the page's GPUs carry
  a 24-hour sparkline of utilization and memory from the same history;
* ``/healthz``: 200 while hosts are being polled, 503 with the reason when none was for 3 intervals;
* ``/metrics``: Prometheus text (``metrics.py``).

The app reads the fleet state and the store; it never polls and never sends. With ``web.peers`` the
list view also shows the other shards (``siteview.py``) from what :class:`~gpuwatch.peers.PeerWatcher`
last read in its own threads (started and stopped with :class:`WebServer`): a request never waits
for a peer. The bookings in force (``gpuwatch reserve``) are read with each view, so a booked GPU
is "reserved", never "free". Everything from a host is escaped by the templates (Jinja2
autoescape); the Content-Security-Policy allows no inline script.
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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

import jinja2
from prometheus_client.exposition import choose_encoder

from .config import Config, WebConfig
from .config.shard import with_shard
from .fleet import STALE_AFTER_POLLS, FleetState
from .historyview import DayUsage, UsageQuery, daily_document, usage_days, usage_view
from .metrics import build_registry
from .model import FleetSnapshot
from .pagehistory import OFF, Sparklines, SparkSet, usage_by_day
from .pageview import AlertView, PageView, Query, alert_views, page_view
from .peers import PeerWatcher
from .render import alert_rows, alerts_dict, snapshot_dict
from .reservation import reservations_dict, with_reservations
from .siteview import SiteView, site_view
from .store import StoreReader
from .store.history import HistoryError, HistorySettings
from .store.historyread import HistoryReader
from .store.historyseries import SeriesReader
from .summary import totals
from .text import format_duration, parse_duration, plural
from .usage import GROUPINGS, period
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

__all__ = ["Query", "WebApp", "WebServer", "health", "page_view"]  # Query, page_view: from pageview.py


# ---------------------------------------------------------------- /healthz (pure)


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
        peers: PeerWatcher | None = None,
    ) -> None:
        self.state = state
        self.peers = peers  # web.peers: the other shards, read in the background (started by WebServer)
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
        self.history = HistoryReader(config().state_dir)  # opened at the first /api/v1/usage
        self.sparklines = Sparklines(SeriesReader(config().state_dir))  # read at the first page, then a minute apart
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
            "/api/v1/reservations": self.api_reservations,
            "/api/v1/usage": self.api_usage,
            "/usage": self.usage_page,
            "/api/v1/usage/daily": self.api_usage_daily,
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

    def _alerts(self) -> tuple[tuple[AlertView, ...], bool]:
        """The firing alerts for the page's panel, and whether the alert state could be read."""
        if self.store is None:
            return (), False
        records, silences = self.store.alerts()
        now = time.time()
        rows = alert_rows(records, [s for s in silences if s.ends_at > now], now)
        return alert_views(rows, now, self.store.acks()), True

    def _sparks(self) -> SparkSet:
        """The 24-hour sparklines (none when ``history.enabled`` is false)."""
        return self.sparklines.get() if self.config().history.enabled else OFF

    def _snapshot(self) -> FleetSnapshot:
        """The fleet state with the bookings in force on its hosts."""
        snapshot = self.state.snapshot()
        if self.store is None:
            return snapshot
        return with_reservations(snapshot, self.store.reservations(snapshot.taken_at.timestamp()))

    def _view(self, query: Query, sparks: SparkSet) -> tuple[PageView, str]:
        """The page's view for ``query`` and its ETag (changes with the fleet, the alerts, the
        bookings in force, the query, the peers and the sparklines)."""
        version = self.state.version
        snapshot = self._snapshot()
        alerts, alerts_known = self._alerts()
        view = page_view(
            snapshot,
            self.config().free_gpu,
            query,
            last_gpus=self.state.last_gpu_counts(),
            alerts=alerts,
            alerts_known=alerts_known,
            default_view=self.web.view,
            demo=self.web.demo,
        )
        stale = ",".join(h.name for h in snapshot.hosts if h.stale)
        firing = ",".join(f"{a.rule}/{a.host}/{a.summary}/{a.muted}" for a in alerts)
        booked = ",".join(f"{h.name}/{r.id}/{r.ends_at}" for h in snapshot.hosts for r in h.reservations)
        peers = self.peers.version if self.peers is not None else 0
        raw = f"{version}|{stale}|{firing}|{booked}|{query}|{self.config().free_gpu}|{peers}"
        raw += f"|{sparks.version}|{sparks.note}"
        return view, '"' + hashlib.sha256(raw.encode()).hexdigest()[:20] + '"'

    def _site(self) -> SiteView | None:
        """The other shards (``web.peers``) as last read, with the whole site in one line."""
        if self.peers is None:
            return None
        config = self.config()
        snapshot = self.state.snapshot()
        counted = totals(snapshot, config.free_gpu)
        return site_view(
            self.peers.answers(),
            None if config.shard is None else str(config.shard),
            [h.name for h in snapshot.hosts],
            counted.gpus,
            counted.free_gpus,
            time.time(),
            self.peers.started_at,
        )

    def page(self, environ: Mapping[str, Any], query_string: str) -> Response:
        query = Query.parse(query_string)
        sparks = self._sparks()
        view, _ = self._view(query, sparks)
        html = self.templates.get_template("page.html").render(
            site=self._site(),
            view=view,
            sparks=sparks,
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
        sparks = self._sparks()
        view, etag = self._view(query, sparks)
        if environ.get("HTTP_IF_NONE_MATCH") == etag:
            return Response("304 Not Modified", b"", headers=(("ETag", etag),), compress=False)
        template = "wall.html" if view.view == "wall" else "fleet.html"
        html = self.templates.get_template(template).render(view=view, base=self.base, site=self._site(), sparks=sparks)
        return Response("200 OK", html.encode(), "text/html; charset=utf-8", (("ETag", etag),))

    def api_snapshot(self, environ: Mapping[str, Any], query_string: str) -> Response:
        config = self.config()
        return _json(with_shard(snapshot_dict(self._snapshot(), config.free_gpu), config))

    def api_reservations(self, environ: Mapping[str, Any], query_string: str) -> Response:
        if self.store is None:
            return _json({"error": "no bookings in this mode"}, "503 Service Unavailable")
        now = self.state.snapshot().taken_at.timestamp()  # the fleet state's clock, as the page's
        include_past = parse_qs(query_string).get("all", [""])[-1] == "1"
        bookings = [b for b in self.store.reservations() if include_past or b.ends_at > now]
        return _json(reservations_dict(bookings, now))

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

    def api_usage(self, environ: Mapping[str, Any], query_string: str) -> Response:
        """``?since=7d`` (default) and ``?by=user|host|model|gpu``: the ``usage --json`` document."""
        query = parse_qs(query_string)
        by = query.get("by", ["user"])[-1]
        try:
            if by not in GROUPINGS:
                raise ValueError(f"by: expected one of {', '.join(GROUPINGS)}")
            since = parse_duration(query.get("since", ["7d"])[-1])
            start, end = period(time.time(), since=since)
        except ValueError as exc:
            return _json({"error": str(exc)}, "400 Bad Request")
        settings = HistorySettings.of(self.config())
        try:
            doc = self.history.usage(start, end, by, idle_below=settings.idle_below, half_life=settings.half_life)
        except HistoryError as exc:
            return _json({"error": str(exc)}, "503 Service Unavailable")
        return _json(doc)

    def _usage_days(self, query_string: str) -> tuple[UsageQuery, list[DayUsage], str]:
        """The usage by day the query asks for, and why it is empty ("" when it is not). Raises
        ValueError for a period it cannot read."""
        query = UsageQuery.parse(query_string)
        days = usage_days(query, time.time())
        if not self.config().history.enabled:
            return query, [], "The usage history is off (history.enabled: false)."
        try:
            return query, usage_by_day(self.history, days, HistorySettings.of(self.config()).idle_below), ""
        except HistoryError as exc:
            log.warning("web: the usage view cannot read the history: %s", exc)
            return query, [], f"The usage history cannot be read: {exc}"

    def usage_page(self, environ: Mapping[str, Any], query_string: str) -> Response:
        """GPU-hours per person over a period and by day (``?days=30``, ``?from=..&to=..``)."""
        status = "200 OK"
        try:
            query, days, note = self._usage_days(query_string)
        except ValueError as exc:
            status, query, days, note = "400 Bad Request", UsageQuery(), [], f"Cannot show that period: {exc}."
        view = usage_view(query, days, time.time(), has_history=self.history.path.exists(), note=note)
        html = self.templates.get_template("usage.html").render(
            view=view, base=self.base, static_version=self.static_version, demo=self.web.demo
        )
        return Response(status, html.encode(), "text/html; charset=utf-8")

    def api_usage_daily(self, environ: Mapping[str, Any], query_string: str) -> Response:
        """``?days=7`` (default), ``?from=2026-12-01&to=2026-12-07``: per day each person's
        GPU-hours and held-idle GPU-hours (:func:`~gpuwatch.historyview.daily_document`)."""
        try:
            _, days, note = self._usage_days(query_string)
        except ValueError as exc:
            return _json({"error": str(exc)}, "400 Bad Request")
        if note:  # history off or unreadable
            return _json({"error": note}, "503 Service Unavailable")
        return _json(daily_document(days))

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
        if self.app.peers is not None:
            self.app.peers.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listening socket and every connection (in the server's own loop thread), then
        let the worker threads finish what they are doing."""
        server = self._server
        if self.app.peers is not None:
            self.app.peers.stop()

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
        self.app.history.close()
        self.app.sparklines.reader.close()
