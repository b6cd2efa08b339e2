"""Probing hosts: once for all of them (``status``, ``check``, ``--once``), or each on its own clock.

Each host has one runner (a persistent SSH connection, or the local shell) and at most one probe
in flight: a host whose previous probe is still running is reported ``busy`` instead of probed
again. Probes run on a pool of worker threads (:class:`Workers`, at most ``max_parallel``, kept
between probes rather than one new thread per probe, and ended after a minute without work), so
waiting on one host's network or hung driver costs no other host anything; a probe is waited for
at most its host's budget (connect + command timeouts) from when a worker took it, then reported
as ``probe_timeout``.

In the daemon (:meth:`Poller.start`) every host is probed every ``poll_every`` on its own clock:
the first probe at once, later ones at a per-host phase spread over the interval (so 200 hosts do
not all run ``nvidia-smi`` in the same second), each result handed to a callback as it arrives.
The clocks are entries in one heap served by one thread (:class:`_Clocks`), not a thread per
host: it starts each probe when due and reports a probe over its budget; the worker that ran a
probe hands its result over and books the host's next one. :meth:`Poller.reload` follows a new
config: added hosts start, removed ones stop and close, and unchanged hosts keep their open
connection.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Protocol

from .config import HostConfig
from .model import FleetSnapshot, HostErrorKind, HostSnapshot
from .probe import HostProbe, ProbeSettings, build_script, new_token, snapshot_from_output
from .ssh import HANDSHAKE_WAIT_FACTOR, HostFailure, Runner
from .text import plural

log = logging.getLogger(__name__)

# Beyond the timeouts, the margin a host's result may take to come back to the poller.
GRACE_SECONDS = 2.0
# A worker thread with no job for this long ends (a new one starts when all are busy): the burst
# of first probes at start does not keep hundreds of idle threads for the daemon's whole life.
WORKER_IDLE_SECONDS = 60.0

ResultCallback = Callable[[HostSnapshot], None]


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def budget_seconds(host: HostConfig) -> float:
    """How long one probe of ``host`` may take: connect (TCP, banner, auth, and a jump host's)
    plus the command itself, plus a small grace."""
    ssh = host.ssh
    if host.local:
        return ssh.command_timeout + GRACE_SECONDS
    # waiting for a free handshake slot, then TCP + banner + auth (and the jump host's)
    connect = ssh.connect_timeout * (HANDSHAKE_WAIT_FACTOR + (3 if ssh.proxy_jump else 2))
    return connect + ssh.command_timeout + GRACE_SECONDS


def probe_host(host: HostConfig, runner: Runner, probe: HostProbe | None = None) -> HostSnapshot:
    """Probe one host; every failure, whatever the host printed, comes back as a HostSnapshot.

    Each probe's section markers carry a fresh secret token, so no text a user on the host
    controls (a process's command line) can pass for the probe's own structure. ``probe`` is the
    host's :class:`~gpuwatch.probe.HostProbe` (settings, and what earlier probes learned)."""
    started = time.monotonic()
    address = host.display_address
    token = new_token()
    script = build_script(host.ssh.command_timeout, host.ssh.nvidia_smi, token=token, probe=probe)
    try:
        result = runner.run_script(script, host.ssh.command_timeout)
    except HostFailure as failure:
        return HostSnapshot.failed(host.name, address, failure.kind, failure.message, time.monotonic() - started)
    except Exception as exc:  # a bug or an unforeseen library error must cost one host, not the poll
        log.exception("unexpected error while probing %s", host.name)
        return HostSnapshot.failed(
            host.name, address, HostErrorKind.PROBE_FAILED, f"internal error: {exc}", time.monotonic() - started
        )
    seconds = round(time.monotonic() - started, 3)
    try:
        return snapshot_from_output(
            host.name,
            address,
            result.stdout,
            result.stderr,
            probe_seconds=seconds,
            command_timeout=host.ssh.command_timeout,
            token=token,
            probe=probe,
        )
    except Exception as exc:  # whatever one host prints costs that host only, never the fleet
        log.exception("could not read the probe output of %s", host.name)
        return HostSnapshot.failed(
            host.name, address, HostErrorKind.UNPARSEABLE, f"output gpuwatch could not read ({exc})", seconds
        )


def outcome(host: HostSnapshot) -> str:
    """One host's result in a few words, for the log."""
    secs = f"{host.probe_seconds:.2f}s" if host.probe_seconds is not None else "?"
    if host.ok:
        return f"{host.name} ok ({plural(len(host.gpus), 'GPU')}, {secs})"
    return f"{host.name} {host.error_name} ({secs})"


def phase(name: str) -> float:
    """A host's fixed place in the poll interval, in [0, 1): spread by name, stable across reloads."""
    return (zlib.crc32(name.encode()) % 10_000) / 10_000


class Workers:
    """At most ``limit`` daemon threads that run jobs in turn; a thread is started only when every
    one is busy, kept for the next jobs, and ended after ``idle_seconds`` without one. A job waits
    in line while all ``limit`` are busy (``max_parallel``: a hung probe holds its worker until it
    ends). Jobs submitted ``first`` (a host already connected: its probe is quick) go before the
    others (hosts still to log in, which wait for an SSH handshake slot on their worker): at the
    start of 1,000 hosts, the hosts already connected keep their clocks while the rest log in."""

    def __init__(self, limit: int, name: str = "probe", idle_seconds: float = WORKER_IDLE_SECONDS) -> None:
        self._limit = max(1, limit)
        self._name = name
        self._idle_seconds = idle_seconds
        self._cond = threading.Condition()
        self._first: collections.deque[Callable[[], None]] = collections.deque()
        self._later: collections.deque[Callable[[], None]] = collections.deque()
        self._threads = 0
        self._idle = 0  # workers waiting for a job
        self._closed = False
        self._names = itertools.count(1)

    @property
    def threads(self) -> int:
        """Worker threads alive now."""
        with self._cond:
            return self._threads

    def submit(self, job: Callable[[], None], first: bool = False) -> None:
        with self._cond:
            if self._closed:
                return
            (self._first if first else self._later).append(job)
            if self._idle > len(self._first) + len(self._later) - 1:
                self._cond.notify()
            elif self._threads < self._limit:
                self._threads += 1
                name = f"{self._name}-{next(self._names)}"
                threading.Thread(target=self._work, name=name, daemon=True).start()

    def _take(self) -> Callable[[], None] | None:
        """The next job, waiting for one at most ``idle_seconds``; None: end this worker."""
        with self._cond:
            self._idle += 1
            try:
                while not self._first and not self._later:
                    if self._closed or not self._cond.wait(self._idle_seconds):
                        if self._closed or not (self._first or self._later):
                            self._threads -= 1
                            return None
                return self._first.popleft() if self._first else self._later.popleft()
            finally:
                self._idle -= 1

    def _work(self) -> None:
        while (job := self._take()) is not None:
            try:
                job()
            except Exception:  # a job's own error costs that job only
                log.exception("a probe failed outside its own error handling")

    def close(self) -> None:
        """End the idle workers (busy ones end after their job); nothing submitted afterwards runs."""
        with self._cond:
            self._closed = True
            self._first.clear()
            self._later.clear()
            self._cond.notify_all()


class ProbeHooks(Protocol):
    """Told by a worker when one of a host's probes starts and when it ends (the daemon's clocks)."""

    def started(self, prober: HostProber, run: int) -> None: ...

    def finished(self, prober: HostProber, run: int, result: HostSnapshot | None) -> None: ...


class HostProber:
    """One host: its runner, and its one probe in flight (never two)."""

    def __init__(
        self,
        host: HostConfig,
        runner: Runner,
        workers: Workers,
        now: Callable[[], datetime] = utcnow,
        settings: ProbeSettings | None = None,
    ) -> None:
        self.host = host
        self.runner = runner
        self.probe_state = HostProbe(settings)  # what this host's probes learned (health fields, containers)
        self._workers = workers
        self._now = now
        self._lock = threading.Lock()
        self._running = False  # a probe submitted and not yet finished
        self._runs = 0  # probes submitted so far: the number of the latest
        self._started = threading.Event()
        self._done = threading.Event()
        self._started_at = 0.0
        self._result: HostSnapshot | None = None

    @property
    def budget(self) -> float:
        return budget_seconds(self.host)

    @property
    def started_at(self) -> float:
        """When a worker took the latest probe (monotonic)."""
        return self._started_at

    def queued_seconds(self) -> float:
        """How long the probe in flight waited in line for an SSH handshake slot (1,000 hosts
        logging in at start): no fault of this host, so it does not count against its budget."""
        queued = getattr(self.runner, "queued_seconds", None)
        return float(queued()) if callable(queued) else 0.0

    def busy_result(self) -> HostSnapshot:
        running = time.monotonic() - self._started_at if self._started.is_set() else 0.0
        return HostSnapshot.failed(
            self.host.name,
            self.host.display_address,
            HostErrorKind.BUSY,
            f"the previous probe is still running ({running:.0f}s); not starting another",
            taken_at=self._now(),
        )

    def timeout_result(self) -> HostSnapshot:
        return HostSnapshot.failed(
            self.host.name,
            self.host.display_address,
            HostErrorKind.PROBE_TIMEOUT,
            f"no result within {self.budget:.0f}s (connect + command timeouts); the probe goes on in the "
            "background and the host is not probed again until it ends",
            time.monotonic() - self._started_at,
            taken_at=self._now(),
        )

    def start(self, hooks: ProbeHooks | None = None) -> int | None:
        """Hand a probe to the workers: its number, or None when the previous one is still running.
        ``hooks`` are told (from the worker) when it starts and when it ends."""
        with self._lock:
            if self._running:
                return None
            self._running = True
            self._runs += 1
            run = self._runs
            self._started.clear()
            self._done.clear()
            self._result = None
        connected = getattr(self.runner, "connected", None)
        self._workers.submit(lambda: self._run(run, hooks), first=bool(connected()) if callable(connected) else True)
        return run

    def _run(self, run: int, hooks: ProbeHooks | None) -> None:
        # max_parallel: a probe waiting for a worker has not started, its budget neither
        self._started_at = time.monotonic()
        self._started.set()
        if hooks is not None:
            hooks.started(self, run)
        try:
            result = probe_host(self.host, self.runner, self.probe_state)
            self._result = replace(result, taken_at=self._now())
        finally:
            with self._lock:  # both at once: a start() in between would clear the new done flag
                self._running = False
                self._done.set()
            if hooks is not None:
                hooks.finished(self, run, self._result)

    def wait(self, stop: threading.Event | None = None) -> HostSnapshot:
        """The running probe's result, waiting at most its budget from when it started."""
        while not self._started.wait(0.2):
            if stop is not None and stop.is_set():
                break
        while True:
            # time spent in line for an SSH handshake slot is no fault of this host
            extra = self.queued_seconds()
            remaining = self._started_at + self.budget + extra - time.monotonic() if self._started.is_set() else 0.0
            if self._done.wait(timeout=max(0.0, min(remaining, 0.5))):
                if self._result is not None:
                    return self._result
                break  # the probe ended without a result (an error outside probe_host's own handling)
            if remaining <= 0 or (stop is not None and stop.is_set()):
                break
        return self.timeout_result()

    def close(self) -> None:
        try:
            self.runner.close()
        except Exception:  # closing must never stop the others from closing
            log.debug("error closing %s", self.host.name, exc_info=True)


@dataclass(eq=False)
class _Clock:
    """One host's place on the daemon's clocks."""

    prober: HostProber
    next_at: float | None  # when its next probe is due (None: one is in flight, booked when it ends)
    probes: int = 0  # probes started (or found busy) so far
    last_start: float = 0.0
    run: int | None = None  # the probe in flight whose result is still awaited
    deadline: float | None = None  # when that probe's budget ends (None: no worker took it yet)
    stopped: bool = False


_PROBE, _DEADLINE = 0, 1


class _Clocks:
    """Every host's clock in one heap, served by one thread: it starts each host's probe when due
    and reports a probe still running at the end of its budget (``probe_timeout``; its late result
    is dropped, and the host is ``busy`` until it ends). The worker that ran a probe hands the
    result to ``on_result`` and books the host's next probe: the first probe at once, the second
    at the host's own place in the interval (within one interval of the first: never a longer gap
    than ``every``), and from then on every ``every``, so the probes of a fleet spread evenly.
    A probe longer than the interval is followed by the next at once, never a pile-up."""

    def __init__(self, every: float, on_result: ResultCallback) -> None:
        self.every = every
        self.on_result = on_result
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, int, _Clock]] = []  # (when, order, what, clock)
        self._order = itertools.count()
        self._clocks: dict[str, _Clock] = {}
        self._closing = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="clocks", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._cond:
            self._closing = True
            for clock in self._clocks.values():
                clock.stopped = True
            self._clocks.clear()
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def add(self, prober: HostProber, first_delay: float = 0.0) -> None:
        """Start ``prober``'s host on the clocks (replacing its old clock, if any)."""
        with self._cond:
            old = self._clocks.get(prober.host.name)
            if old is not None:
                old.stopped = True
            clock = _Clock(prober, next_at=time.monotonic() + first_delay)
            self._clocks[prober.host.name] = clock
            self._push(clock.next_at, _PROBE, clock)  # type: ignore[arg-type]

    def remove(self, name: str) -> None:
        with self._cond:
            clock = self._clocks.pop(name, None)
            if clock is not None:
                clock.stopped = True

    def set_every(self, every: float) -> None:
        """A new interval (a reload): it counts from each host's last probe, so a shorter one
        takes effect at once, not after the old wait."""
        with self._cond:
            self.every = every
            now = time.monotonic()
            for clock in self._clocks.values():
                if clock.next_at is not None and clock.probes > 0:
                    clock.next_at = max(now, self._next(clock))
                    self._push(clock.next_at, _PROBE, clock)

    # -- the thread

    def _push(self, when: float, kind: int, clock: _Clock) -> None:
        """Book ``kind`` for ``clock`` at ``when``; wake the thread when it is the earliest now.
        Entries are not removed: one that no longer matches its clock is skipped when it comes."""
        order = next(self._order)
        heapq.heappush(self._heap, (when, order, kind, clock))
        if self._heap[0][1] == order:
            self._cond.notify()

    def _due(self) -> list[tuple[int, _Clock]] | None:
        """What is due now (taken off the heap), after waiting for it; None: closing."""
        with self._cond:
            while not self._closing:
                now = time.monotonic()
                due = []
                while self._heap and self._heap[0][0] <= now:
                    when, _, kind, clock = heapq.heappop(self._heap)
                    if clock.stopped:
                        continue
                    if kind == _PROBE and clock.next_at == when:
                        clock.next_at = None
                        due.append((kind, clock))
                    elif kind == _DEADLINE and clock.deadline == when:
                        clock.deadline = None
                        due.append((kind, clock))
                if due:
                    return due
                self._cond.wait(self._heap[0][0] - now if self._heap else None)
            return None

    def _serve(self) -> None:
        while (due := self._due()) is not None:
            for kind, clock in due:
                try:
                    if kind == _PROBE:
                        self._launch(clock)
                    else:
                        self._overdue(clock)
                except Exception:  # one host's trouble must not stop every clock
                    log.exception("the clock of %s failed", clock.prober.host.name)

    def _launch(self, clock: _Clock) -> None:
        with self._cond:  # held while submitting, so the worker's hooks see the run booked
            if clock.stopped:
                return
            clock.probes += 1
            clock.last_start = time.monotonic()
            clock.run = clock.prober.start(self)
            launched = clock.run is not None
        if not launched:
            self._deliver(clock, clock.prober.busy_result())

    def _overdue(self, clock: _Clock) -> None:
        """The budget of ``clock``'s probe ended: report it timed out, unless the time it queued
        for an SSH handshake slot (no fault of the host) gives it longer."""
        prober = clock.prober
        with self._cond:
            if clock.stopped or clock.run is None:
                return
            deadline = prober.started_at + prober.budget + prober.queued_seconds()
            if deadline > time.monotonic():
                clock.deadline = deadline
                self._push(deadline, _DEADLINE, clock)
                return
            clock.run = None  # its result, if it ever comes, is dropped
        self._deliver(clock, prober.timeout_result())

    # -- the hooks (from the worker threads)

    def started(self, prober: HostProber, run: int) -> None:
        with self._cond:
            clock = self._clocks.get(prober.host.name)
            if clock is None or clock.prober is not prober or clock.run != run:
                return
            clock.deadline = prober.started_at + prober.budget
            self._push(clock.deadline, _DEADLINE, clock)

    def finished(self, prober: HostProber, run: int, result: HostSnapshot | None) -> None:
        with self._cond:
            clock = self._clocks.get(prober.host.name)
            if clock is None or clock.prober is not prober or clock.run != run:
                return  # timed out already, or the host was removed or changed meanwhile
            clock.run = clock.deadline = None
        # the probe ended without a result: an error outside probe_host's own handling
        self._deliver(clock, result if result is not None else prober.timeout_result())

    def _deliver(self, clock: _Clock, result: HostSnapshot) -> None:
        """Hand ``result`` over (said in the log), then book the host's next probe."""
        name = clock.prober.host.name
        if clock.stopped:
            return
        log.info("poll: %s", outcome(result))
        if not result.ok:
            log.info("poll: %s: %s: %s", name, result.error_name, result.error)
        try:
            self.on_result(result)
        except Exception:
            log.exception("handling the result of %s failed", name)
        with self._cond:
            if clock.stopped:
                return
            clock.next_at = max(time.monotonic(), self._next(clock))
            self._push(clock.next_at, _PROBE, clock)

    def _next(self, clock: _Clock) -> float:
        if clock.probes == 1:
            return clock.last_start + self.every * phase(clock.prober.host.name)
        return clock.last_start + self.every


class Poller:
    """Owns one :class:`HostProber` per configured host, and in the daemon their clocks."""

    def __init__(
        self,
        hosts: Sequence[HostConfig],
        runner_factory: Callable[[HostConfig], Runner],
        max_parallel: int = 256,
        now: Callable[[], datetime] = utcnow,
        settings: ProbeSettings | None = None,
    ) -> None:
        self._factory = runner_factory
        self._now = now
        self._settings = settings
        self._workers = Workers(max_parallel)
        self._lock = threading.Lock()
        self._probers = {h.name: HostProber(h, runner_factory(h), self._workers, now, settings) for h in hosts}
        self._order = [h.name for h in hosts]
        self._clocks: _Clocks | None = None  # the daemon's, from start()

    @property
    def hosts(self) -> list[HostConfig]:
        with self._lock:
            return [self._probers[name].host for name in self._order]

    def prober(self, name: str) -> HostProber:
        return self._probers[name]

    def poll(self, stop: threading.Event | None = None) -> FleetSnapshot:
        """Probe every host at once and wait for all (each at most its own budget)."""
        taken_at = self._now()
        started = time.monotonic()
        with self._lock:
            probers = [self._probers[name] for name in self._order]
        launched = [(p, p.start() is not None) for p in probers]
        results = [p.wait(stop) if ok else p.busy_result() for p, ok in launched]
        snapshot = FleetSnapshot(taken_at=taken_at, hosts=tuple(results))
        log.info(
            "poll: %d/%d hosts answered in %.2fs: %s",
            len(snapshot.answered),
            len(snapshot.hosts),
            time.monotonic() - started,
            ", ".join(outcome(h) for h in snapshot.hosts),
        )
        for host in snapshot.down:
            log.info("poll: %s: %s: %s", host.name, host.error_name, host.error)
        return snapshot

    # -- the daemon: each host on its own clock

    def start(self, every: float, on_result: ResultCallback) -> None:
        """Probe every host every ``every`` seconds on its own clock; results go to ``on_result``
        as they arrive (from the worker that ran the probe, or the clocks' thread for ``busy`` and
        ``probe_timeout``; one host's results one at a time, in order)."""
        with self._lock:
            self._clocks = _Clocks(every, on_result)
            for name in self._order:
                self._clocks.add(self._probers[name])
            self._clocks.start()

    def reload(
        self,
        hosts: Sequence[HostConfig],
        runner_factory: Callable[[HostConfig], Runner],
        every: float | None = None,
        *,
        settings: ProbeSettings | None = None,
    ) -> ReloadResult:
        """Follow a new host list (and poll interval). A host whose settings did not change keeps
        its runner (its open connection) and its clock; a changed one is closed and started anew;
        removed ones stop. ``settings`` (the disks shown, how owners are found) apply to every
        host's next probe."""
        new = {h.name: h for h in hosts}
        with self._lock:
            if every is not None and self._clocks is not None and every != self._clocks.every:
                self._clocks.set_every(every)
            if settings is not None:
                self._settings = settings
                for prober in self._probers.values():
                    prober.probe_state.settings = settings
            removed = [n for n in self._order if n not in new]
            changed = [n for n in self._order if n in new and self._probers[n].host != new[n]]
            added = [h.name for h in hosts if h.name not in self._probers]
            kept = [n for n in self._order if n in new and n not in changed]
            for name in removed + changed:
                if self._clocks is not None:
                    self._clocks.remove(name)
                self._probers.pop(name).close()
            self._factory = runner_factory
            for name in changed + added:
                self._probers[name] = HostProber(
                    new[name], runner_factory(new[name]), self._workers, self._now, self._settings
                )
                if self._clocks is not None:
                    self._clocks.add(self._probers[name])
            self._order = [h.name for h in hosts]
        return ReloadResult(added=tuple(added), removed=tuple(removed), changed=tuple(changed), kept=tuple(kept))

    def close(self) -> None:
        with self._lock:
            clocks, self._clocks = self._clocks, None
            probers = list(self._probers.values())
        if clocks is not None:
            clocks.close()
        self._workers.close()
        for prober in probers:
            prober.close()


@dataclass(frozen=True)
class ReloadResult:
    """What a reload did to the host list, by name."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]
    kept: tuple[str, ...]

    def describe(self) -> str:
        def names(items: tuple[str, ...]) -> str:
            return f" ({', '.join(items)})" if items else ""

        return (
            f"{len(self.added)} added{names(self.added)}, {len(self.removed)} removed{names(self.removed)}, "
            f"{len(self.changed)} changed and reconnected{names(self.changed)}, "
            f"{len(self.kept)} kept with their connections"
        )
