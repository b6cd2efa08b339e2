"""What a rule is: its declaration (name, config, scope, the data it needs, what its alerts are
about, what it announces and its words) and the plain records its check returns (findings with
numbers, notices, what it remembers).

A rule's check makes no words: a finding carries the reading, the limit and the unit as numbers,
and the facts the words need, so the same finding can feed /metrics or history. The words are
declared beside the check (``Words``, as a Prometheus alerting rule carries its annotations
beside its expression): functions of those numbers and facts, which ``report.py`` lays out.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Protocol, TypeAlias, TypeVar

from ..config import FreeGpuConfig
from ..model import HostErrorKind, HostSnapshot, SourceHealth

FLEET = "*"  # the host of fleet-wide alerts

# A host whose failure says something about its GPUs, not about the network.
GPU_ERROR_KINDS = frozenset(
    {
        HostErrorKind.DRIVER_MISMATCH,
        HostErrorKind.GPU_LOST,
        HostErrorKind.DRIVER_NOT_LOADED,
        HostErrorKind.NO_DEVICES,
    }
)

# The AlertKey fields a rule may use to tell its alerts apart, besides the rule and the host.
KEY_FIELDS = ("gpu", "user", "pid", "detail")


def processes_known(host: HostSnapshot) -> bool:
    """Did this poll learn every GPU process and its owner? Not when the host did not answer, nor
    when its process query or ps failed (a ``probe_failed`` warning beside the GPU rows): then who
    runs what is unknown, which must never read as "nobody"."""
    return host.ok and not any(w.kind is HostErrorKind.PROBE_FAILED for w in host.warnings)


class Scope(str, enum.Enum):
    HOST = "host"  # judged on each new result of one host; its alerts are about that host
    FLEET = "fleet"  # judged over every host's latest result; its alerts' host is FLEET


class Needs(str, enum.Enum):
    """Which results a rule can judge. A rule runs only on those, and only they can resolve its
    alerts: a result that cannot say whether the condition holds must not say that it stopped."""

    RESULT = "result"  # any result, failed or not (host_down)
    GPU_STATE = "gpu_state"  # GPU data, or a failure that is itself about the GPUs (gpu_error)
    GPU_DATA = "gpu_data"  # the host answered with its GPUs
    PROCESSES = "processes"  # ... and every GPU process and its owner are known
    GPU_HEALTH = "gpu_health"  # ... and every GPU's health fields were read (where the driver has them)
    HOST_CONTEXT = "host_context"  # the host's load and memory were read (even when its GPUs failed)
    DISKS = "disks"  # ... and df listed its filesystems
    SOURCES = "sources"  # no host result: the discovery sources' health (a fleet rule, judged every time)

    def met_by(self, host: HostSnapshot) -> bool:
        if self in (Needs.RESULT, Needs.SOURCES):
            return True
        if self is Needs.GPU_STATE:
            return host.ok or host.error_kind in GPU_ERROR_KINDS
        if self is Needs.GPU_DATA:
            return host.ok
        if self is Needs.GPU_HEALTH:
            return host.ok and all(g.health is not None for g in host.gpus)
        if self in (Needs.HOST_CONTEXT, Needs.DISKS):
            context = host.context
            if context is None or context.memory_total_kib is None or context.load_5m is None:
                return False
            return self is Needs.HOST_CONTEXT or context.disks_known
        return processes_known(host)


@dataclass(frozen=True, order=True)
class AlertKey:
    """What an alert is about: never a value that changes from poll to poll."""

    rule: str
    host: str
    gpu: int | None = None
    user: str | None = None
    pid: int | None = None
    detail: str | None = None  # a stable qualifier, e.g. the kind of GPU error

    @property
    def id(self) -> str:
        parts = [self.rule, self.host, self.gpu, self.user, self.pid, self.detail]
        return "|".join("" if p is None else str(p) for p in parts)

    def as_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "host": self.host,
            "gpu": self.gpu,
            "user": self.user,
            "pid": self.pid,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class Finding:
    """A rule's condition holding in this result: the reading, the limit it crossed, in ``unit``.

    ``facts`` holds what the words need beyond the key (an error message, a command, the GPUs a
    user holds); JSON values only, since an alert's record is stored.
    """

    key: AlertKey
    value: float | None  # the reading now, e.g. 3 (GPUs)
    threshold: float | None  # the limit, e.g. 2 (GPUs)
    unit: str  # "GPUs", "s", "°C", "%", "polls", or "" when there is no number
    facts: Mapping[str, Any] = field(default_factory=dict)
    hold_seconds: float = 0.0  # how long it must hold before it fires (at least alerts.for)


@dataclass(frozen=True)
class Inhibit:
    """While an alert of rule ``source`` fires, the alerts of rule ``target`` that agree with it on
    every field in ``equal`` (and whose facts ``applies`` accepts) are inhibited: kept, listed,
    never announced. Alertmanager's inhibit rules: one cause, one message.

    E.g. gpu_error inhibits host_down on the same host while host_down counts GPU failures: the
    host answers over SSH, its driver is broken, and that is one alert, not two.
    """

    source: str
    target: str
    equal: tuple[str, ...] = ("host",)
    applies: Callable[[Mapping[str, Any]], bool] = lambda facts: True

    def inhibits(self, source: AlertKey, target: AlertKey, target_facts: Mapping[str, Any]) -> bool:
        return (
            source.rule == self.source
            and target.rule == self.target
            and all(getattr(source, f) == getattr(target, f) for f in self.equal)
            and self.applies(target_facts)
        )


class NoticeKind(str, enum.Enum):
    """What a notice says happened; the rule that sends it has the words for it."""

    GPU_FREE = "gpu_free"  # gpu_freed: a busy GPU is free now
    JOB_ENDED = "job_ended"  # gpu_freed: a watched user's job has ended
    HOST_REBOOTED = "host_rebooted"  # host_rebooted: the boot time moved
    DRIVER_CHANGED = "driver_changed"  # driver_changed: the NVIDIA driver version changed
    DRIVER_MISMATCH = "driver_mismatch"  # driver_changed: the hint to reboot after a driver upgrade
    RESERVATION_BUSY = "reservation_busy"  # reservation_conflict: a booking started while its GPUs are busy


@dataclass(frozen=True)
class Notice:
    """A one-off event (a GPU freed, a reboot, a driver change): not an alert, no lifecycle."""

    kind: NoticeKind
    host: str
    users: tuple[str, ...]  # who is told (mentioned); () for a notice about the host
    gpu: int | None = None
    facts: Mapping[str, Any] = field(default_factory=dict)  # what its rule's words need
    rule: str = "gpu_freed"  # the rule that made it: its words, and its alerts.routes entry decides where it goes


class Announces(str, enum.Enum):
    """What a rule's check sends: alerts (with a lifecycle, exported by /metrics), one-off
    notices, or both. A rule has words for each of them (``Words``)."""

    ALERTS = "alerts"
    NOTICES = "notices"
    BOTH = "both"

    @property
    def alerts(self) -> bool:
        return self is not Announces.NOTICES

    @property
    def notices(self) -> bool:
        return self is not Announces.ALERTS


@dataclass(frozen=True)
class AlertWords:
    """An alert said for people: what, where and who; the reading now; the limit."""

    summary: str
    value: str
    threshold: str


class Reading(Protocol):
    """What alert words are made of: an alert's key and its latest numbers and facts (a
    ``Finding``, or the ``AlertRecord`` that keeps them)."""

    @property
    def key(self) -> AlertKey: ...

    @property
    def value(self) -> float | None: ...

    @property
    def threshold(self) -> float | None: ...

    @property
    def unit(self) -> str: ...

    @property
    def facts(self) -> Mapping[str, Any]: ...


@dataclass(frozen=True)
class Words:
    """A rule's words: ``alert`` says one of its alerts, ``notice`` one of its notices (each set
    when the rule announces them)."""

    alert: Callable[[Reading], AlertWords] | None = None
    notice: Callable[[Notice], str] | None = None

    def says(self) -> str:
        """What these are words for: ``alerts``, ``notices``, ``alerts and notices`` or ``nothing``."""
        return " and ".join(w for w, f in (("alerts", self.alert), ("notices", self.notice)) if f) or "nothing"


def _check_declaration(name: str, identity: tuple[str, ...], announces: Announces, words: Words) -> None:
    """A rule's declaration holds together: its key fields are AlertKey's, and it has words for
    exactly what it announces. Raises ValueError (a programming error, found when it is declared)."""
    unknown = sorted(set(identity) - set(KEY_FIELDS))
    if unknown:
        raise ValueError(f"rule {name}: identity field(s) {', '.join(unknown)} not among {KEY_FIELDS}")
    if announces.alerts != (words.alert is not None) or announces.notices != (words.notice is not None):
        raise ValueError(f"rule {name}: announces {announces.value} but has words for {words.says()}")


@dataclass(frozen=True)
class CheckResult:
    """What one rule's check found in one result (alert findings, notices), and what it remembers
    about the host for next time."""

    findings: tuple[Finding, ...] = ()
    notices: tuple[Notice, ...] = ()
    memory: Any = None  # JSON; None forgets (only for rules that declare a memory slot)


@dataclass(frozen=True)
class Context:
    """What a rule's check is given besides the result and its config."""

    rule: str
    host: str  # FLEET for a fleet-wide rule
    identity: tuple[str, ...]
    thresholds: FreeGpuConfig  # when a GPU counts as free
    remembered: Any = None  # this rule's memory of this host from its last run, or None
    sources: Mapping[str, SourceHealth] = field(default_factory=dict)  # discovery: label -> health

    def key(self, **fields: Any) -> AlertKey:
        """This rule's alert key about this host; only the fields the rule declared may be set."""
        extra = sorted(k for k, v in fields.items() if v is not None and k not in self.identity)
        if extra:
            raise ValueError(f"rule {self.rule}: key field(s) {', '.join(extra)} not in its identity {self.identity}")
        return AlertKey(self.rule, self.host, **fields)


C = TypeVar("C")


@dataclass(frozen=True)
class HostRule(Generic[C]):
    """A rule judged on each new result of one host."""

    name: str  # its key under alerts: (and in alerts.routes, silence add --rule)
    parse: Callable[[object, str], C | None]  # the YAML value at alerts.<name>, its key path -> config; None: off
    check: Callable[[HostSnapshot, C, Context], CheckResult]
    needs: Needs
    announces: Announces  # alerts, notices or both
    words: Words  # how each of them is said
    identity: tuple[str, ...] = ()  # the AlertKey fields (KEY_FIELDS) that tell its alerts on one host apart
    default: C | None = None  # its config when the file has no alerts: section; None: off
    memory: str | None = None  # its slot in Memory, when it remembers something per host
    # Keep its memory current while it is switched off (run with ``default``, nothing reported): a
    # baseline such as the most GPUs a host has had is then right the moment it is switched on.
    learn_when_off: bool = False
    scope: ClassVar[Scope] = Scope.HOST

    def __post_init__(self) -> None:
        _check_declaration(self.name, self.identity, self.announces, self.words)


@dataclass(frozen=True)
class FleetRule(Generic[C]):
    """A rule judged over every host's latest result (the hosts that meet ``needs``)."""

    name: str
    parse: Callable[[object, str], C | None]
    check: Callable[[Sequence[HostSnapshot], C, Context], CheckResult]
    needs: Needs
    announces: Announces
    words: Words
    identity: tuple[str, ...] = ()
    default: C | None = None
    memory: ClassVar[str | None] = None
    scope: ClassVar[Scope] = Scope.FLEET

    def __post_init__(self) -> None:
        _check_declaration(self.name, self.identity, self.announces, self.words)


Rule: TypeAlias = HostRule[Any] | FleetRule[Any]
