"""The life of an alert, pure, with explicit time: pending -> firing -> (reminders) -> resolved.

Modelled on Prometheus Alertmanager. An alert waits ``for`` before firing (so a flapping condition
stays quiet), fires once, reminds after ``repeat_every``, and resolves when its rule judged it
again and it no longer holds. An alert its rule could not judge (the host did not answer, or has
no new result) neither fires anew nor resolves. Silences mute by matcher for a time window (no
FIRING, no RESOLVED: planned work). An acknowledgement (:class:`Ack`) stops only the reminders of
the alerts firing when it was made: RESOLVED is still said to everyone who heard FIRING, and the
ack ends when those alerts resolve.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..config import AlertsConfig
from .base import AlertKey, Inhibit
from .engine import Evaluation
from .registry import INHIBITS

HOST_REMOVED = "host_removed"  # Transition.cause: the host was removed from the config


@dataclass(frozen=True)
class AlertRecord:
    """The state of one alert, persisted between evaluations and runs. Times are epoch seconds.

    ``value``, ``threshold``, ``unit`` and ``facts`` are its latest finding's. ``words`` is only set
    on a record saved by a gpuwatch from before the rule registry, which stored the summary, value
    and threshold as text instead: read as such until the rule finds the condition again.
    """

    key: AlertKey
    state: str  # pending | firing
    since: float  # first seen (pending from)
    value: float | None = None
    threshold: float | None = None
    unit: str = ""
    facts: Mapping[str, Any] = field(default_factory=dict)
    fired_at: float | None = None
    last_sent_at: float | None = None  # None while firing: not announced yet (silenced)
    words: Mapping[str, str] | None = None  # {"summary", "value", "threshold"} of an old record

    def as_dict(self) -> dict[str, Any]:
        data = {
            "key": self.key.as_dict(),
            "state": self.state,
            "since": self.since,
            "value": self.value,
            "threshold": self.threshold,
            "unit": self.unit,
            "facts": dict(self.facts),
            "fired_at": self.fired_at,
            "last_sent_at": self.last_sent_at,
        }
        if self.words is not None:
            data["words"] = dict(self.words)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AlertRecord:
        common: dict[str, Any] = {
            "key": AlertKey(**data["key"]),
            "state": data["state"],
            "since": float(data["since"]),
            "fired_at": data.get("fired_at"),
            "last_sent_at": data.get("last_sent_at"),
        }
        if "unit" not in data:  # saved before the registry: words, not numbers
            words = {k: str(data.get(k, "")) for k in ("summary", "value", "threshold")}
            return cls(**common, words=words)
        return cls(
            **common,
            value=data.get("value"),
            threshold=data.get("threshold"),
            unit=data["unit"],
            facts=dict(data.get("facts") or {}),
            words=data.get("words"),
        )


@dataclass(frozen=True)
class Transition:
    kind: str  # firing | reminder | resolved
    record: AlertRecord
    at: float
    cause: str | None = None  # why it resolved when not because the condition cleared: HOST_REMOVED, or words


SilenceCheck = Callable[[AlertKey, float], bool]


def advance(
    records: Mapping[str, AlertRecord],
    evaluation: Evaluation,
    now: float,
    cfg: AlertsConfig,
    silenced: SilenceCheck = lambda key, now: False,
    removed_hosts: frozenset[str] = frozenset(),
    inhibits: Sequence[Inhibit] = INHIBITS,
    acknowledged: frozenset[str] = frozenset(),
    causes: Mapping[str, str] | None = None,
) -> tuple[dict[str, AlertRecord], list[Transition]]:
    """Move every alert one step: pending -> firing -> (reminders) -> resolved.

    The alerts in ``acknowledged`` (alert ids, :func:`acknowledged_ids`) get no reminders; they
    still resolve and say so.

    The alerts about ``removed_hosts`` (removed from the config) resolve now, with the cause
    HOST_REMOVED (or the host's own in ``causes``, e.g. "left discovery source file:hosts.txt"),
    whatever the evaluation says about them. A firing alert that another firing
    alert inhibits (``inhibits``) is kept but not announced, like a silenced one.
    """
    out: dict[str, AlertRecord] = {}
    found: list[str] = []  # the alerts found this time, in the order of the findings
    for finding in evaluation.findings:
        kid = finding.key.id
        if kid in out or finding.key.host in removed_hosts:
            continue
        found.append(kid)
        record = records.get(kid) or AlertRecord(finding.key, "pending", now)
        record = replace(
            record,
            value=finding.value,
            threshold=finding.threshold,
            unit=finding.unit,
            facts=finding.facts,
            words=None,
        )
        if record.state == "pending" and now - record.since >= finding.hold_seconds:
            record = replace(record, state="firing", fired_at=now)
        out[kid] = record
    ending: list[tuple[AlertRecord, bool]] = []
    for kid, record in records.items():
        if kid in out:
            continue
        removed = record.key.host in removed_hosts
        if not removed and not evaluation.covers(record.key):
            out[kid] = record  # not judged this time (no new answer): neither fire nor resolve
            continue
        ending.append((record, removed))
    muted = inhibited(out.values(), inhibits)
    transitions: list[Transition] = []
    for kid in found:
        record = out[kid]
        if record.state != "firing" or silenced(record.key, now) or kid in muted:
            continue
        if record.last_sent_at is None:
            record = out[kid] = replace(record, last_sent_at=now)
            transitions.append(Transition("firing", record, now))
        elif now - record.last_sent_at >= cfg.repeat_every and kid not in acknowledged:
            record = out[kid] = replace(record, last_sent_at=now)
            transitions.append(Transition("reminder", record, now))
    for record, removed in ending:
        announced = record.state == "firing" and record.last_sent_at is not None
        if announced and cfg.send_resolved and not silenced(record.key, now):
            cause = (causes or {}).get(record.key.host, HOST_REMOVED) if removed else None
            transitions.append(Transition("resolved", record, now, cause))
    return out, transitions


def inhibited(records: Iterable[AlertRecord], inhibits: Sequence[Inhibit] = INHIBITS) -> dict[str, list[str]]:
    """The alerts that a firing alert inhibits: alert id -> the ids of the alerts inhibiting it."""
    everything = list(records)
    sources = [r for r in everything if r.state == "firing" and any(i.source == r.key.rule for i in inhibits)]
    by: dict[str, list[str]] = {}
    if not sources:
        return by
    for target in everything:
        for source in sources:
            if source is not target and any(i.inhibits(source.key, target.key, target.facts) for i in inhibits):
                by.setdefault(target.key.id, []).append(source.key.id)
    return by


@dataclass(frozen=True)
class Silence:
    """Mutes the alerts that match every field it sets, until ``ends_at`` (epoch seconds)."""

    id: int
    ends_at: float
    comment: str
    created_at: float
    rule: str | None = None
    host: str | None = None
    user: str | None = None
    gpu: int | None = None
    pid: int | None = None
    author: str | None = None  # who added it (None: added by a gpuwatch before authors were kept)

    def matchers(self) -> list[tuple[str, str | int]]:
        """The fields it matches on, in the order ``silence add`` takes them."""
        fields = (("rule", self.rule), ("host", self.host), ("user", self.user), ("gpu", self.gpu), ("pid", self.pid))
        return [(k, v) for k, v in fields if v is not None]

    def matches(self, key: AlertKey, now: float) -> bool:
        if now >= self.ends_at:
            return False
        return (
            (self.rule is None or self.rule == key.rule)
            and (self.host is None or self.host == key.host)
            and (self.user is None or self.user == key.user)
            and (self.gpu is None or self.gpu == key.gpu)
            and (self.pid is None or self.pid == key.pid)
        )

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.matchers()) or "everything"


def silence_check(silences: Sequence[Silence]) -> SilenceCheck:
    def check(key: AlertKey, now: float) -> bool:
        return any(s.matches(key, now) for s in silences)

    return check


@dataclass(frozen=True)
class Ack:
    """An acknowledgement: someone is on it. Stops the reminders of ``alerts``, the alerts that
    matched its fields and fired when it was made (alert id -> its ``since``, so the same alert
    firing again later is a new one, not acknowledged), until they resolve or ``ends_at``."""

    id: int
    created_at: float
    alerts: Mapping[str, float]
    comment: str = ""
    ends_at: float | None = None  # None: until its alerts resolve
    rule: str | None = None
    host: str | None = None
    user: str | None = None
    gpu: int | None = None
    pid: int | None = None
    author: str | None = None

    def matchers(self) -> list[tuple[str, str | int]]:
        """The fields it was given, in the order ``ack`` takes them."""
        fields = (("rule", self.rule), ("host", self.host), ("user", self.user), ("gpu", self.gpu), ("pid", self.pid))
        return [(k, v) for k, v in fields if v is not None]

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.matchers()) or "everything"

    def in_force(self, now: float) -> bool:
        return self.ends_at is None or now < self.ends_at

    def covers(self, record: AlertRecord, now: float) -> bool:
        """Whether it acknowledges this alert now (the same firing of it, and not ended)."""
        return self.in_force(now) and self.alerts.get(record.key.id) == record.since

    def live(self, records: Mapping[str, AlertRecord], now: float) -> bool:
        """Whether it still acknowledges any alert: an ack ends by itself when its alerts resolve."""
        return any(self.covers(r, now) for r in records.values())


def matching_firing(records: Mapping[str, AlertRecord], **fields: str | int | None) -> list[AlertRecord]:
    """The firing alerts whose key has every given field (``rule``, ``host``, ``user``, ``gpu``, ``pid``)."""
    wanted = {k: v for k, v in fields.items() if v is not None}
    return [
        r for r in records.values() if r.state == "firing" and all(getattr(r.key, k) == v for k, v in wanted.items())
    ]


def acknowledged_ids(acks: Iterable[Ack], records: Mapping[str, AlertRecord], now: float) -> frozenset[str]:
    """The ids of the alerts an ack in force covers."""
    return frozenset(kid for kid, r in records.items() if any(a.covers(r, now) for a in acks))
