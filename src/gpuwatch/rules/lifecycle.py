"""The life of an alert, pure, with explicit time: pending -> firing -> (reminders) -> resolved.

Modelled on Prometheus Alertmanager. An alert waits ``for`` before firing (so a flapping condition
stays quiet), fires once, reminds after ``repeat_every``, and resolves when its rule judged it
again and it no longer holds. An alert its rule could not judge (the host did not answer, or has
no new result) neither fires anew nor resolves. Silences mute by matcher for a time window.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..config import AlertsConfig
from .base import AlertKey
from .engine import Evaluation

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
    cause: str | None = None  # why it resolved when not because the condition cleared: HOST_REMOVED


SilenceCheck = Callable[[AlertKey, float], bool]


def advance(
    records: Mapping[str, AlertRecord],
    evaluation: Evaluation,
    now: float,
    cfg: AlertsConfig,
    silenced: SilenceCheck = lambda key, now: False,
    removed_hosts: frozenset[str] = frozenset(),
) -> tuple[dict[str, AlertRecord], list[Transition]]:
    """Move every alert one step: pending -> firing -> (reminders) -> resolved.

    The alerts about ``removed_hosts`` (removed from the config) resolve now, with the cause
    HOST_REMOVED, whatever the evaluation says about them.
    """
    out: dict[str, AlertRecord] = {}
    transitions: list[Transition] = []
    seen: set[str] = set()
    for finding in evaluation.findings:
        kid = finding.key.id
        if kid in seen or finding.key.host in removed_hosts:
            continue
        seen.add(kid)
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
        if record.state == "firing" and not silenced(record.key, now):
            if record.last_sent_at is None:
                record = replace(record, last_sent_at=now)
                transitions.append(Transition("firing", record, now))
            elif now - record.last_sent_at >= cfg.repeat_every:
                record = replace(record, last_sent_at=now)
                transitions.append(Transition("reminder", record, now))
        out[kid] = record
    for kid, record in records.items():
        if kid in seen:
            continue
        removed = record.key.host in removed_hosts
        if not removed and not evaluation.covers(record.key):
            out[kid] = record  # not judged this time (no new answer): neither fire nor resolve
            continue
        announced = record.state == "firing" and record.last_sent_at is not None
        if announced and cfg.send_resolved and not silenced(record.key, now):
            transitions.append(Transition("resolved", record, now, HOST_REMOVED if removed else None))
    return out, transitions


@dataclass(frozen=True)
class Silence:
    id: int
    ends_at: float
    comment: str
    created_at: float
    rule: str | None = None
    host: str | None = None
    user: str | None = None
    gpu: int | None = None

    def matches(self, key: AlertKey, now: float) -> bool:
        if now >= self.ends_at:
            return False
        return (
            (self.rule is None or self.rule == key.rule)
            and (self.host is None or self.host == key.host)
            and (self.user is None or self.user == key.user)
            and (self.gpu is None or self.gpu == key.gpu)
        )

    def describe(self) -> str:
        parts = [
            f"{k}={v}"
            for k, v in (("rule", self.rule), ("host", self.host), ("user", self.user), ("gpu", self.gpu))
            if v is not None
        ]
        return " ".join(parts) or "everything"


def silence_check(silences: Sequence[Silence]) -> SilenceCheck:
    def check(key: AlertKey, now: float) -> bool:
        return any(s.matches(key, now) for s in silences)

    return check
