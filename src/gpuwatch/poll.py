"""Probing hosts: once for all of them (``status``, ``check``, ``--once``), or each on its own clock.

Each host has one runner (a persistent SSH connection, or the local shell) and at most one probe
in flight: a host whose previous probe is still running is reported ``busy`` instead of probed
again. Probes run on a pool of worker threads (:class:`Workers`, at most ``max_parallel``, kept
between probes rather than one new thread per probe), so waiting on one host's network or hung
driver costs no other host anything; a probe is waited for at most its host's budget (connect +
command timeouts) from when a worker took it, then reported as ``probe_timeout``.

In the daemon (:meth:`Poller.start`) every host is probed every ``poll_every`` on its own timer:
the first probe at once, later ones at a per-host phase spread over the interval (so 200 hosts do
not all run ``nvidia-smi`` in the same second), each result handed to a callback as it arrives.
:meth:`Poller.reload` follows a new config: added hosts start, removed ones stop and close, and
unchanged hosts keep their open connection.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone

from .config import HostConfig
from .model import FleetSnapshot, HostErrorKind, HostSnapshot
from .probe import HostProbe, ProbeSettings, build_script, new_token, snapshot_from_output
from .ssh import HANDSHAKE_WAIT_FACTOR, HostFailure, Runner
from .text import plural

log = logging.getLogger(__name__)

# Beyond the timeouts, the margin a host's result may take to come back to the poller.
GRACE_SECONDS = 2.0

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
    one is busy, and kept for the next jobs. A job waits in line while all ``limit`` are busy
    (``max_parallel``: a hung probe holds its worker until it ends)."""

    def __init__(self, limit: int, name: str = "probe") -> None:
        self._limit = max(1, limit)
        self._name = name
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0  # workers waiting for a job
        self._waiting = 0  # jobs no worker has taken yet

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            self._waiting += 1
            self._jobs.put(job)
            if self._waiting > self._idle and self._threads < self._limit:
                self._threads += 1
                threading.Thread(target=self._work, name=f"{self._name}-{self._threads}", daemon=True).start()

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            job = self._jobs.get()
            with self._lock:
                self._idle -= 1
                if job is not None:
                    self._waiting -= 1
            if job is None:
                return
            try:
                job()
            except Exception:  # a job's own error costs that job only
                log.exception("a probe failed outside its own error handling")

    def close(self) -> None:
        """End the idle workers (busy ones end after their job); nothing submitted afterwards runs."""
        with self._lock:
            count, self._threads, self._limit = self._threads, 0, 0
        for _ in range(count):
            self._jobs.put(None)


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
        self._started = threading.Event()
        self._done = threading.Event()
        self._started_at = 0.0
        self._result: HostSnapshot | None = None

    @property
    def budget(self) -> float:
        return budget_seconds(self.host)

    def busy_result(self) -> HostSnapshot:
        running = time.monotonic() - self._started_at if self._started.is_set() else 0.0
        return HostSnapshot.failed(
            self.host.name,
            self.host.display_address,
            HostErrorKind.BUSY,
            f"the previous probe is still running ({running:.0f}s); not starting another",
            taken_at=self._now(),
        )

    def start(self) -> bool:
        """Hand a probe to the workers; False when the previous one is still running."""
        with self._lock:
            if self._running:
                return False
            self._running = True
            self._started.clear()
            self._done.clear()
            self._result = None
        self._workers.submit(self._run)
        return True

    def _run(self) -> None:
        # max_parallel: a probe waiting for a worker has not started, its budget neither
        self._started_at = time.monotonic()
        self._started.set()
        try:
            result = probe_host(self.host, self.runner, self.probe_state)
            self._result = replace(result, taken_at=self._now())
        finally:
            with self._lock:  # both at once: a start() in between would clear the new done flag
                self._running = False
                self._done.set()

    def wait(self, stop: threading.Event | None = None) -> HostSnapshot:
        """The running probe's result, waiting at most its budget from when it started."""
        while not self._started.wait(0.2):
            if stop is not None and stop.is_set():
                break
        while True:
            # time spent in line for an SSH handshake slot (1,000 hosts logging in at start) is
            # no fault of this host: it does not count against its budget
            queued = getattr(self.runner, "queued_seconds", None)
            extra = queued() if callable(queued) else 0.0
            remaining = self._started_at + self.budget + extra - time.monotonic() if self._started.is_set() else 0.0
            if self._done.wait(timeout=max(0.0, min(remaining, 0.5))):
                if self._result is not None:
                    return self._result
                break  # the probe ended without a result (an error outside probe_host's own handling)
            if remaining <= 0 or (stop is not None and stop.is_set()):
                break
        return HostSnapshot.failed(
            self.host.name,
            self.host.display_address,
            HostErrorKind.PROBE_TIMEOUT,
            f"no result within {self.budget:.0f}s (connect + command timeouts); the probe goes on in the "
            "background and the host is not probed again until it ends",
            time.monotonic() - self._started_at,
            taken_at=self._now(),
        )

    def probe(self, stop: threading.Event | None = None) -> HostSnapshot:
        """Start a probe and wait for it; ``busy`` when the previous one still runs."""
        if not self.start():
            return self.busy_result()
        return self.wait(stop)

    def close(self) -> None:
        try:
            self.runner.close()
        except Exception:  # closing must never stop the others from closing
            log.debug("error closing %s", self.host.name, exc_info=True)


class _Clock:
    """The timer thread of one host in the daemon: probe, hand over the result, sleep, repeat."""

    def __init__(self, prober: HostProber, every: float, on_result: ResultCallback, first_delay: float) -> None:
        self.prober = prober
        self.every = every
        self.on_result = on_result
        self.first_delay = first_delay
        self.stopped = threading.Event()
        self._wake = threading.Event()  # a stop or a new interval: look at the time again
        self.thread = threading.Thread(target=self._loop, name=f"clock-{prober.host.name}", daemon=True)

    def stop(self) -> None:
        self.stopped.set()
        self._wake.set()

    def set_every(self, every: float) -> None:
        """A new interval (a reload): it counts from this host's last probe, so a shorter one
        takes effect at once, not after the old wait."""
        self.every = every
        self._wake.set()

    def _next(self, last_start: float, first: bool) -> float:
        # The first probe runs at once; the second at the host's own place in the interval (within
        # one interval of the first: never a longer gap than ``every``), and from then on every
        # ``every``, so the probes of a fleet spread evenly over the interval.
        if first:
            return last_start + self.every * phase(self.prober.host.name)
        return last_start + self.every

    def _loop(self) -> None:
        name = self.prober.host.name
        next_at = time.monotonic() + self.first_delay
        last_start: float | None = None
        probes = 0
        while not self.stopped.is_set():
            if self._wake.wait(max(0.0, next_at - time.monotonic())):
                self._wake.clear()
                if last_start is not None:
                    next_at = self._next(last_start, probes == 1)
                continue
            last_start = time.monotonic()
            result = self.prober.probe(self.stopped)
            probes += 1
            if self.stopped.is_set():
                break
            log.info("poll: %s", outcome(result))
            if not result.ok:
                log.info("poll: %s: %s: %s", name, result.error_name, result.error)
            try:
                self.on_result(result)
            except Exception:
                log.exception("handling the result of %s failed", name)
            next_at = self._next(last_start, probes == 1)
            if next_at < time.monotonic():  # a probe longer than the interval: go on, don't pile up
                next_at = time.monotonic()


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
        self._clocks: dict[str, _Clock] = {}
        self._every = 0.0
        self._on_result: ResultCallback | None = None

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
        launched = [(p, p.start()) for p in probers]
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
        """Probe every host every ``every`` seconds on its own timer; results go to ``on_result``
        (from the host's timer thread) as they arrive."""
        with self._lock:
            self._every, self._on_result = every, on_result
            for name in self._order:
                self._start_clock(name, first_delay=0.0)

    def _start_clock(self, name: str, first_delay: float) -> None:
        assert self._on_result is not None
        clock = _Clock(self._probers[name], self._every, self._on_result, first_delay)
        self._clocks[name] = clock
        clock.thread.start()

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
            if every is not None and every != self._every:
                self._every = every
                for clock in self._clocks.values():
                    clock.set_every(every)
            if settings is not None:
                self._settings = settings
                for prober in self._probers.values():
                    prober.probe_state.settings = settings
            removed = [n for n in self._order if n not in new]
            changed = [n for n in self._order if n in new and self._probers[n].host != new[n]]
            added = [h.name for h in hosts if h.name not in self._probers]
            kept = [n for n in self._order if n in new and n not in changed]
            for name in removed + changed:
                stopping = self._clocks.pop(name, None)
                if stopping is not None:
                    stopping.stop()
                self._probers.pop(name).close()
            self._factory = runner_factory
            for name in changed + added:
                self._probers[name] = HostProber(
                    new[name], runner_factory(new[name]), self._workers, self._now, self._settings
                )
                if self._on_result is not None:
                    self._start_clock(name, first_delay=0.0)
            self._order = [h.name for h in hosts]
        return ReloadResult(added=tuple(added), removed=tuple(removed), changed=tuple(changed), kept=tuple(kept))

    def close(self) -> None:
        with self._lock:
            for clock in self._clocks.values():
                clock.stop()
            self._clocks.clear()
            probers = list(self._probers.values())
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
