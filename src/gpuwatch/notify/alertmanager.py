"""The Alertmanager channel: alerts posted to Prometheus Alertmanager's v2 API, as Prometheus does.

``alertmanager: {url: http://alertmanager:9093}`` (or ``urls:``, every member of an HA cluster:
each gets every post, as Prometheus sends to each). An alert message becomes one
``POST <url>/api/v2/alerts`` of a JSON list of postable alerts, one per alert it carries
(``Message.alerts``)::

    [{"labels": {"alertname": "max_gpus_per_user", "host": "gpu-a", "user": "alice",
                 "severity": "warning", "alert_id": "max_gpus_per_user|gpu-a||alice||"},
      "annotations": {"summary": "alice holds 3 GPUs on gpu-a (GPU 0, 1, 2)",
                      "description": "alice holds 3 GPUs on gpu-a (GPU 0, 1, 2)\\nnow: 3 GPUs; "
                                     "threshold: at most 2 per host"},
      "startsAt": "2026-12-07T09:12:03+00:00", "endsAt": "2026-12-07T09:16:10+00:00",
      "generatorURL": "https://gpu.lab.example/gpuwatch/"}]

* Labels are the alert's identity and nothing else: ``alertname`` (the rule), ``host`` (not for a
  fleet-wide alert), ``gpu``, ``user``, ``pid``, ``detail`` where the rule's key has them,
  ``severity`` (:data:`SEVERITIES`, or ``alertmanager.severity``), ``alert_id`` (gpuwatch's alert
  id) and the config's ``labels``. Two gpuwatch daemons watching the same hosts with the same
  config post identical label sets, so Alertmanager sees one alert (its fingerprint is the labels)
  and notifies once; grouping, inhibition and silences work on these labels.
* ``startsAt`` is when the alert began firing; a resolved alert carries ``endsAt``, when it
  resolved. A firing alert's ``endsAt`` is set when it is posted, :data:`LEASE_RESENDS` times
  ``resend_every`` ahead (Prometheus: ``now + 4 * max(evaluation interval, resendDelay)``), and
  :class:`Resender` posts the whole firing set again every ``resend_every`` (1m): when gpuwatch
  stops, Alertmanager resolves its alerts by itself a few minutes later.
* The transitions (firing, resolved) go through the outbox like every channel's messages (kept
  until accepted, in order); the re-posts do not (they are state, not news, and the next one
  replaces a failed one). A post and a re-post never overlap (one lock per channel), and a
  re-post reads the firing set only once it holds it, so a re-post never undoes a resolution.
* Reports and notices are not alerts: they are not sent here (``prepare`` makes nothing of them),
  and reports are never routed here. ``test-notify`` posts a test alert, ``gpuwatch_test``, that
  ends by itself after :data:`TEST_ALERT_SECONDS`.
* A post is accepted when one Alertmanager of ``urls`` accepted it (the others are said in the
  log, and catch up at the next re-post); HTTP 400 refuses that message only; 401/403 point at
  the credentials (``bearer_token_env``, or ``username`` and ``password_env``).
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from gpuwatch.config.values import (
    ConfigError,
    check_keys,
    from_env,
    http_url,
    mapping,
    positive_duration,
    string,
    string_map,
)
from gpuwatch.message import AlertItem, Message
from gpuwatch.notify import http
from gpuwatch.notify.base import Channel, DeliveryError
from gpuwatch.notify.http import Request, Retry
from gpuwatch.notify.masking import present, redact_url, url_secrets
from gpuwatch.notify.spec import ChannelSpec, Limits, Transport, UrlSettings, env_secret, settings_of
from gpuwatch.text import format_duration, iso_time, plural

log = logging.getLogger(__name__)

API_PATH = "/api/v2/alerts"
#: A firing alert posted now is good for this many ``resend_every`` (Prometheus: 4).
LEASE_RESENDS = 4
#: How long the alert of ``test-notify`` fires before it ends by itself.
TEST_ALERT_SECONDS = 300.0
TEST_ALERT = "gpuwatch_test"
#: Each rule's ``severity`` label, unless ``alertmanager.severity`` says otherwise; other rules: ``warning``.
SEVERITIES = {"host_down": "critical", "gpu_error": "critical", "gpu_missing": "critical", "ecc_errors": "critical"}
DEFAULT_SEVERITY = "warning"
LIMITS = Limits(
    measured="alerts",
    split_unit="not split: one post holds every alert of the message",
    other="alerts only (reports and notices are not sent); firing alerts re-posted every resend_every",
)
KEYS = ("url", "urls", "timeout", "resend_every", "bearer_token_env", "username", "password_env", "severity", "labels")
_RESERVED_LABELS = ("alertname", "host", "gpu", "user", "pid", "detail", "severity", "alert_id")


# ---------------------------------------------------------------- settings


@dataclass(frozen=True, repr=False)
class Target(UrlSettings):
    """One Alertmanager as the sender posts to it: its alerts endpoint and the auth header."""

    SECTION = "alertmanager"
    URL_SHAPE = "an http(s):// Alertmanager address such as http://alertmanager:9093"
    SECRET_SEGMENTS = 0  # the path is no secret; query values and user info are

    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    max_attempts: int = 3

    def url_fits(self, url: str) -> bool:
        return urlsplit(url).scheme in ("http", "https") and bool(urlsplit(url).hostname)

    def own_secrets(self) -> list[str]:
        values = list(self.headers.values())
        return values + [v.split(" ", 1)[1] for v in values if " " in v]  # the token without "Bearer "


def alerts_endpoint(url: str) -> str:
    """``url``'s v2 alerts endpoint: ``http://am:9093`` -> ``http://am:9093/api/v2/alerts`` (a path
    prefix kept; a URL that already names the endpoint as it is)."""
    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    if not path.endswith(API_PATH):
        path += API_PATH
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


@dataclass(frozen=True, repr=False)
class AlertmanagerSettings:
    """``alertmanager:``: where to post (``urls``, each an Alertmanager: ``url`` and ``urls`` together),
    the per-post deadline, how often the firing alerts are posted again, the credentials (read from
    the environment when the channel is built: ``bearer_token`` and ``password`` hold them then; a
    bearer token wins over basic auth), and the labels."""

    urls: tuple[str, ...]
    timeout_seconds: float = 10.0
    resend_every_seconds: float = 60.0
    bearer_token_env: str | None = None
    username: str | None = None
    password_env: str | None = None
    severity: Mapping[str, str] = field(default_factory=dict)  # rule (or "default") -> severity label
    labels: Mapping[str, str] = field(default_factory=dict)  # added to every alert
    bearer_token: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError("alertmanager: needs 'url' or 'urls'")
        if bool(self.username) != bool(self.password_env):
            raise ValueError("alertmanager: username and password_env go together (HTTP basic auth)")
        reserved = sorted(set(self.labels) & set(_RESERVED_LABELS))
        if reserved:
            raise ValueError(f"alertmanager.labels: {', '.join(reserved)} is set by gpuwatch itself")

    def __repr__(self) -> str:
        return f"AlertmanagerSettings(urls={[redact_url(u, path_segments=0) for u in self.urls]!r})"

    @property
    def lease_seconds(self) -> float:
        """How long a firing alert posted now stays firing in Alertmanager without another post."""
        return LEASE_RESENDS * self.resend_every_seconds

    def severity_of(self, rule: str) -> str:
        default = self.severity.get("default", DEFAULT_SEVERITY)
        return self.severity.get(rule) or SEVERITIES.get(rule) or default

    def resolved(self, environ: Mapping[str, str] | None = None) -> AlertmanagerSettings:
        """These settings with the token or password read from the environment (ConfigError naming
        the key when its variable is unset)."""
        token = env_secret(
            from_env(self.bearer_token_env, None, environ), self.bearer_token_env, "alertmanager.bearer_token_env"
        )
        password = env_secret(
            from_env(self.password_env, None, environ), self.password_env, "alertmanager.password_env"
        )
        return replace(self, bearer_token=token, password=password)

    def authorization(self) -> dict[str, str]:
        """The Authorization header of the resolved settings (none without credentials)."""
        if self.bearer_token:
            return {"Authorization": f"Bearer {self.bearer_token}"}
        if self.username and self.password:
            pair = base64.b64encode(f"{self.username}:{self.password}".encode()).decode("ascii")
            return {"Authorization": f"Basic {pair}"}
        return {}

    def targets(self) -> list[Target]:
        """One :class:`Target` per Alertmanager (the resolved settings' credentials in its header)."""
        headers = self.authorization()
        return [
            settings_of(
                functools.partial(Target, alerts_endpoint(u), timeout_seconds=self.timeout_seconds, headers=headers)
            )
            for u in self.urls
        ]


def secrets(settings: AlertmanagerSettings) -> list[str]:
    """The secrets in use: the token or password as set in the environment now, the URLs' user info
    and query values."""
    values = present(from_env(settings.bearer_token_env, None), from_env(settings.password_env, None))
    for url in settings.urls:
        values += url_secrets(url, path_segments=0)
    return values


def parse(raw: object, base: Path) -> AlertmanagerSettings:
    """``alertmanager:`` -> :class:`AlertmanagerSettings` (ConfigError naming the key path)."""
    section = mapping(raw, "alertmanager")
    check_keys(section, KEYS, "alertmanager")
    if "url" not in section and "urls" not in section:
        raise ConfigError("alertmanager: needs 'url' (http://alertmanager:9093) or 'urls' (a list)")
    urls = [http_url(section["url"], "alertmanager.url")] if "url" in section else []
    if "urls" in section:
        listed = section["urls"]
        if not isinstance(listed, list) or not listed:
            raise ConfigError("alertmanager.urls: expected a list of http(s):// addresses")
        urls += [http_url(u, f"alertmanager.urls[{i}]") for i, u in enumerate(listed)]
    values: dict[str, Any] = {"urls": tuple(dict.fromkeys(urls))}
    if section.get("timeout") is not None:
        values["timeout_seconds"] = positive_duration(section["timeout"], "alertmanager.timeout")
    if section.get("resend_every") is not None:
        values["resend_every_seconds"] = positive_duration(section["resend_every"], "alertmanager.resend_every")
    for key in ("bearer_token_env", "username", "password_env"):
        if section.get(key) is not None:
            values[key] = string(section[key], f"alertmanager.{key}")
    for key in ("severity", "labels"):
        if section.get(key) is not None:
            values[key] = string_map(section[key], f"alertmanager.{key}")
    return settings_of(lambda: AlertmanagerSettings(**values))


def describe(settings: AlertmanagerSettings) -> str:
    """What ``check`` says of it: where it posts, with what credentials, how often, and that it
    takes alerts only."""
    where = ", ".join(redact_url(u, path_segments=0) for u in settings.urls)
    auth = "no auth"
    if settings.bearer_token_env:
        auth = "bearer token" + (" (username and password_env unused)" if settings.username else "")
    elif settings.username:
        auth = f"basic auth as {settings.username}"
    return (
        f"{plural(len(settings.urls), 'Alertmanager')} ({where}), {auth}; alerts only (reports and notices "
        f"are not sent there); firing alerts re-posted every {format_duration(settings.resend_every_seconds)}, "
        f"each good for {format_duration(settings.lease_seconds)}"
    )


# ---------------------------------------------------------------- the payload


def labels(item: AlertItem, settings: AlertmanagerSettings) -> dict[str, str]:
    """An alert's labels: its identity only, never a reading or a time (see the module docstring)."""
    found: dict[str, str] = dict(settings.labels)
    found["alertname"] = item.rule
    for name in ("host", "gpu", "user", "pid", "detail"):
        value = getattr(item, name)
        if value is not None:
            found[name] = str(value)
    found["severity"] = settings.severity_of(item.rule)
    found["alert_id"] = item.id
    return found


def postable(item: AlertItem, settings: AlertmanagerSettings, link: str | None) -> dict[str, Any]:
    """One postable alert; a firing one without ``endsAt`` (set when it is posted: :func:`leased`)."""
    alert: dict[str, Any] = {
        "labels": labels(item, settings),
        "annotations": {"summary": item.summary, "description": item.description},
        "startsAt": iso_time(item.started_at),
    }
    if item.resolved_at is not None:
        alert["endsAt"] = iso_time(max(item.resolved_at, item.started_at))
    if link:
        alert["generatorURL"] = link
    return alert


def test_alert(settings: AlertmanagerSettings, now: float, link: str | None) -> dict[str, Any]:
    """The alert ``test-notify`` posts: ``gpuwatch_test``, ending by itself after TEST_ALERT_SECONDS."""
    alert: dict[str, Any] = {
        "labels": {**settings.labels, "alertname": TEST_ALERT, "severity": "none"},
        "annotations": {
            "summary": "gpuwatch test alert",
            "description": f"If this reaches you, gpuwatch can post to Alertmanager; it ends by itself in "
            f"{format_duration(TEST_ALERT_SECONDS)}.",
        },
        "startsAt": iso_time(now),
        "endsAt": iso_time(now + TEST_ALERT_SECONDS),
    }
    if link:
        alert["generatorURL"] = link
    return alert


def leased(alerts: Sequence[Mapping[str, Any]], now: float, lease_seconds: float) -> list[dict[str, Any]]:
    """The alerts as posted now: each firing one (no ``endsAt``) good for ``lease_seconds``."""
    return [dict(a) if "endsAt" in a else {**a, "endsAt": iso_time(now + lease_seconds)} for a in alerts]


# ---------------------------------------------------------------- the sender


class _Poster(http.WebhookChannel[Target]):
    """Posts one list of alerts to one Alertmanager (bounded, retried, secrets masked)."""

    name = "alertmanager"
    service = "Alertmanager"

    def _request(self, payload: Mapping[str, Any]) -> Request:
        return Request(self._url, encode_list(payload["alerts"]), headers=dict(self._settings.headers))

    def _judge(self, answer: http.Answer) -> Retry | None:
        status = answer.status
        if 200 <= status <= 299:
            return None
        said = self.snippet(answer)
        detail = f"HTTP {status} {self._scrub(answer.reason)}".rstrip() + (f": {said!r}" if said else "")
        if status in (401, 403):
            raise self._refused(
                f"{detail}: refused the credentials (check alertmanager.bearer_token_env, username, password_env)"
            )
        if status in (404, 405):
            raise self._refused(f"{detail}: no Alertmanager v2 API there (check alertmanager.url)")
        if 300 <= status <= 399:
            raise self._refused(f"{detail}: a redirect; put the address it points to in alertmanager.url")
        if status in (400, 413, 422):
            raise self._refused(f"{detail}: Alertmanager refused these alerts", message_fault=True)
        raise self._refused(detail)


def encode_list(alerts: Sequence[Mapping[str, Any]]) -> bytes:
    """The body as sent: the JSON list of postable alerts (UTF-8)."""
    return json.dumps(list(alerts), ensure_ascii=False).encode("utf-8")


class AlertmanagerChannel:
    """Posts alert messages to every Alertmanager of ``alertmanager.urls`` (see the module docstring).

    ``clock`` is the wall clock the posts' ``endsAt`` are counted from.
    """

    name = "alertmanager"
    dry_run = False

    def __init__(self, settings: AlertmanagerSettings, transport: Transport, *, clock: Callable[[], float] = time.time):
        self.settings = settings
        self.clock = clock
        self._posters = [_Poster(target, sleep=transport.sleep, stop=transport.stop) for target in settings.targets()]
        self._lock = threading.Lock()  # one post at a time: a re-post never lands after a resolution
        self._last_resend: float | None = None

    def __repr__(self) -> str:
        return f"AlertmanagerChannel({', '.join(repr(p) for p in self._posters)})"

    def close(self) -> None:
        for poster in self._posters:
            poster.close()

    def prepare(self, message: Message) -> list[dict[str, Any]]:
        """One payload holding every alert of an alert message; a test alert for ``test-notify``;
        nothing for a report or a notice (not alerts)."""
        if message.kind == "test":
            return [{"alerts": [test_alert(self.settings, self.clock(), message.link)]}]
        if not message.alerts:
            return []
        return [{"alerts": [postable(item, self.settings, message.link) for item in message.alerts]}]

    def describe(self, payload: dict[str, Any]) -> str:
        lines = []
        for alert in payload.get("alerts", []):
            state = "resolved" if "endsAt" in alert and alert["labels"].get("alertname") != TEST_ALERT else "firing"
            shown = ", ".join(f"{k}={v}" for k, v in alert["labels"].items())
            lines.append(f"{state}: {{{shown}}}: {alert['annotations'].get('summary', '')}")
        return "\n".join(lines)

    def deliver(self, payload: dict[str, Any]) -> None:
        """Post the payload's alerts to every Alertmanager; accepted when one accepted them
        (DeliveryError, the first one's, when none did)."""
        with self._lock:
            self._post(payload["alerts"])

    def _post(self, alerts: Sequence[Mapping[str, Any]]) -> None:
        body = {"alerts": leased(alerts, self.clock(), self.settings.lease_seconds)}
        errors: list[DeliveryError] = []
        for poster in self._posters:
            try:
                poster.deliver(body)
            except DeliveryError as exc:
                errors.append(exc)
        if len(errors) == len(self._posters):
            raise errors[0]
        for error in errors:  # the others have them; this one catches up at the next re-post
            log.warning("%s (the other Alertmanagers accepted them)", error)

    # -- re-posting the firing set

    def resend_due(self, now: float) -> bool:
        """Whether the firing alerts are due to be posted again (``now``: a monotonic clock)."""
        return self._last_resend is None or now - self._last_resend >= self.settings.resend_every_seconds

    def resend_at(self) -> float:
        """When (the monotonic clock's time) the firing alerts are next due to be posted again
        (-inf: never posted yet, so at once)."""
        if self._last_resend is None:
            return -math.inf
        return self._last_resend + self.settings.resend_every_seconds

    def resend(self, firing: Callable[[], Message | None], now: float) -> int:
        """Post the alerts firing now again (``firing`` reads them, called once the channel's lock
        is held, so no post of a resolution can be overtaken); the number posted. Raises
        DeliveryError when no Alertmanager accepted them."""
        self._last_resend = now
        with self._lock:
            message = firing()
            if message is None or not message.alerts:
                return 0
            self._post([postable(item, self.settings, message.link) for item in message.alerts])
            return len(message.alerts)


class Resender:
    """Beside the daemon loop (a :class:`~gpuwatch.daemon.Service`): each Alertmanager channel
    whose ``resend_every`` has passed posts the alerts firing now again (``firing(channel name)``:
    the alerts routed to it, read from the alert store). Not through the outbox: a failed re-post
    is said in the log, and the next one replaces it. Its thread sleeps until the earliest
    channel's re-post is due (at most ``tick_seconds``), and with no Alertmanager channel until
    :meth:`wake` (the daemon calls it when the channels change) or :meth:`stop`."""

    def __init__(
        self,
        channels: Callable[[], Mapping[str, Channel]],
        firing: Callable[[str], Message | None],
        *,
        monotonic: Callable[[], float] = time.monotonic,
        tick_seconds: float = 60.0,
    ) -> None:
        self.channels = channels
        self.firing = firing
        self.monotonic = monotonic
        self.tick_seconds = tick_seconds
        self._done = threading.Event()
        self._woken = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="alertmanager-resend", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Look at the channels again now (they changed: one may be new, or gone)."""
        self._woken.set()

    def stop(self) -> None:
        self._done.set()
        self._woken.set()
        if self._thread is not None:
            self._thread.join(timeout=15)

    def _run(self) -> None:
        while not self._done.is_set():
            self._woken.clear()  # before the look: a wake from now on ends the wait below
            self.tick()
            self._woken.wait(self.wait_seconds())

    def wait_seconds(self) -> float | None:
        """Seconds until the earliest Alertmanager channel's re-post is due, at most
        ``tick_seconds``, at least 0.05 (None: there is no Alertmanager channel, nothing to wait for)."""
        due = [ch.resend_at() for ch in list(self.channels().values()) if isinstance(ch, AlertmanagerChannel)]
        if not due:
            return None
        return min(max(min(due) - self.monotonic(), 0.05), self.tick_seconds)

    def tick(self) -> None:
        """One round: each Alertmanager channel due posts its firing alerts again."""
        for name, channel in list(self.channels().items()):
            if not isinstance(channel, AlertmanagerChannel) or not channel.resend_due(self.monotonic()):
                continue
            try:
                posted = channel.resend(functools.partial(self.firing, name), self.monotonic())
            except DeliveryError as exc:
                log.warning("%s: firing alerts not re-posted: %s; trying again in %s", name, exc, _every(channel))
            except Exception:  # the daemon's loop must go on
                log.exception("%s: re-posting the firing alerts failed", name)
            else:
                if posted:
                    log.debug("%s: re-posted %s", name, plural(posted, "firing alert"))


def _every(channel: AlertmanagerChannel) -> str:
    return format_duration(channel.settings.resend_every_seconds)


def build(settings: AlertmanagerSettings, transport: Transport) -> AlertmanagerChannel:
    """The channel for ``alertmanager:``: its credentials read from the environment now."""
    return AlertmanagerChannel(settings.resolved(transport.environ), transport)


SPEC = ChannelSpec(
    name="alertmanager",
    parse=parse,
    sender=build,
    secrets=secrets,
    inline_secrets=(),  # credentials come from the environment only
    describe=describe,
    carries_reports=False,
    limits=LIMITS,
    alerts_only=True,
)
