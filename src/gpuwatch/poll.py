"""Fan-out over hosts with a bounded pool; a failed host is data, never an exception.

Each host has one runner (a persistent SSH connection, or the local shell) and an in-flight
flag: a host whose previous probe is still running is reported busy instead of probed
again. A poll waits for each host at most that host's own budget (connect + command
timeouts), so one dead or slow host never holds back the others' results.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import datetime, timezone

from .config import HostConfig
from .model import FleetSnapshot, HostErrorKind, HostSnapshot
from .probe import build_script, snapshot_from_output
from .ssh import HostFailure, Runner

log = logging.getLogger(__name__)

# Beyond the timeouts, the margin a host's result may take to come back to the poller.
GRACE_SECONDS = 2.0


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class _HostSlot:
    def __init__(self, host: HostConfig, runner: Runner) -> None:
        self.host = host
        self.runner = runner
        self.busy = threading.Lock()
        self.started_at = 0.0  # when the probe started running (not when it was queued)
        self.running = False
        self.script = build_script(host.ssh.command_timeout, host.ssh.nvidia_smi)

    @property
    def budget(self) -> float:
        ssh = self.host.ssh
        # connect (TCP + banner + auth, and a jump host's) plus the command itself
        connect = 0.0 if self.host.local else ssh.connect_timeout * (3 if ssh.proxy_jump else 2)
        return connect + ssh.command_timeout + GRACE_SECONDS


def probe_host(host: HostConfig, runner: Runner, script: str) -> HostSnapshot:
    """Probe one host; every failure comes back as a failed HostSnapshot."""
    started = time.monotonic()
    address = host.display_address
    try:
        result = runner.run_script(script, host.ssh.command_timeout)
    except HostFailure as failure:
        return HostSnapshot.failed(host.name, address, failure.kind, failure.message, time.monotonic() - started)
    except Exception as exc:  # a bug or an unforeseen library error must cost one host, not the poll
        log.exception("unexpected error while probing %s", host.name)
        return HostSnapshot.failed(
            host.name, address, HostErrorKind.PROBE_FAILED, f"internal error: {exc}", time.monotonic() - started
        )
    return snapshot_from_output(
        host.name,
        address,
        result.stdout,
        result.stderr,
        probe_seconds=round(time.monotonic() - started, 3),
        command_timeout=host.ssh.command_timeout,
    )


def _outcome(host: HostSnapshot) -> str:
    secs = f"{host.probe_seconds:.2f}s" if host.probe_seconds is not None else "?"
    if host.ok:
        return f"{host.name} ok ({len(host.gpus)} GPUs, {secs})"
    return f"{host.name} {host.error_kind.value if host.error_kind else 'failed'} ({secs})"


class Poller:
    """Polls every configured host in parallel; owns the runners and the thread pool."""

    def __init__(
        self,
        hosts: Sequence[HostConfig],
        runner_factory: Callable[[HostConfig], Runner],
        max_parallel: int = 32,
        now: Callable[[], datetime] = utcnow,
    ) -> None:
        self._slots = [_HostSlot(h, runner_factory(h)) for h in hosts]
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, min(max_parallel, len(self._slots))), thread_name_prefix="probe"
        )
        self._now = now

    def _run(self, slot: _HostSlot) -> HostSnapshot:
        slot.started_at, slot.running = time.monotonic(), True
        try:
            return probe_host(slot.host, slot.runner, slot.script)
        finally:
            slot.running = False
            slot.busy.release()

    def _wait(self, slot: _HostSlot, future: Future[HostSnapshot]) -> HostSnapshot:
        """The host's result, waiting at most its budget from when its probe started running: a
        host still queued behind busy workers (a large fleet, many dead hosts) is not timed out."""
        while True:
            if slot.running or future.done():
                remaining = slot.started_at + slot.budget - time.monotonic()
                try:
                    return future.result(timeout=max(remaining, 0.0))
                except FutureTimeout:
                    if future.running():
                        break
                    continue  # it finished (or started) just now: look again
            try:
                return future.result(timeout=0.2)
            except FutureTimeout:
                continue
        return HostSnapshot.failed(
            slot.host.name,
            slot.host.display_address,
            HostErrorKind.PROBE_TIMEOUT,
            f"no result within {slot.budget:.0f}s (connect + command timeouts)",
            time.monotonic() - slot.started_at,
        )

    def poll(self) -> FleetSnapshot:
        taken_at = self._now()
        started = time.monotonic()
        pending: list[tuple[_HostSlot, Future[HostSnapshot] | HostSnapshot]] = []
        for slot in self._slots:
            if not slot.busy.acquire(blocking=False):
                running = time.monotonic() - slot.started_at
                pending.append(
                    (
                        slot,
                        HostSnapshot.failed(
                            slot.host.name,
                            slot.host.display_address,
                            HostErrorKind.BUSY,
                            f"the previous probe is still running ({running:.0f}s); not starting another",
                        ),
                    )
                )
                continue
            try:
                pending.append((slot, self._pool.submit(self._run, slot)))
            except RuntimeError:  # pool shut down while stopping
                slot.busy.release()
                raise
        results = [item if isinstance(item, HostSnapshot) else self._wait(slot, item) for slot, item in pending]
        snapshot = FleetSnapshot(taken_at=taken_at, hosts=tuple(results))
        outcomes = ", ".join(_outcome(h) for h in snapshot.hosts)
        log.info(
            "poll: %d/%d hosts answered in %.2fs: %s",
            len(snapshot.answered),
            len(snapshot.hosts),
            time.monotonic() - started,
            outcomes,
        )
        for host in snapshot.down:
            log.info("poll: %s: %s: %s", host.name, host.error_kind.value if host.error_kind else "?", host.error)
        return snapshot

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for slot in self._slots:
            try:
                slot.runner.close()
            except Exception:  # closing must never stop the others from closing
                log.debug("error closing %s", slot.host.name, exc_info=True)
