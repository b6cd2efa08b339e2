"""Messages in doubt (a post that got no verdict) over long runs: issue 20 E11.

The fault drill (bench/drill.py --seconds 720) counted messages that reached the group three times.
These tests pin down what a message in doubt may cost: each wait runs from the try that left it in
doubt, and a webhook that takes a message and hangs up before answering gets it at most twice
before it is answered.
"""

from __future__ import annotations

from typing import Any

from gpuwatch.notify.base import DeliveryError
from gpuwatch.notify.delivery import MAYBE_DELIVERED_WAIT_SECONDS, flush
from gpuwatch.store import Outbox, open_db


class SlowThenDoubtful:
    """The first payload takes ``seconds`` of the clock and is accepted; the others are in doubt
    until ``doubtful`` is cleared."""

    name = "feishu"
    dry_run = False

    def __init__(self, now: list[float], seconds: float) -> None:
        self.now = now
        self.seconds = seconds
        self.calls: list[dict[str, Any]] = []
        self.doubtful = True

    def prepare(self, message: Any) -> list[dict[str, Any]]:
        return [{"text": message}]

    def deliver(self, payload: dict[str, Any]) -> None:
        self.calls.append(payload)
        if payload["n"] == 1:
            self.now[0] += self.seconds  # rate limits and retries of its own: a long send
            return
        if self.doubtful:
            raise DeliveryError("no answer within 10s", permanent=False, maybe_delivered=True)

    def describe(self, payload: dict[str, Any]) -> str:
        return str(payload)


def test_the_wait_after_a_doubtful_try_runs_from_that_try_not_from_the_start_of_the_pass(tmp_path: Any) -> None:
    """Before: the wait ran from the start of the pass, so a pass that spent 70 s on earlier
    messages (rate limits, retries) posted a message in doubt again at once."""
    now = [1000.0]
    outbox = Outbox(open_db(tmp_path / "state"), clock=lambda: now[0])
    outbox.add("feishu", "first", [{"n": 1}])
    outbox.add("feishu", "second", [{"n": 2}])
    channel = SlowThenDoubtful(now, seconds=70)

    flush(outbox, {"feishu": channel})  # 1 sent (70 s), 2 in doubt at 1070
    assert [c["n"] for c in channel.calls] == [1, 2]
    flush(outbox, {"feishu": channel})
    assert [c["n"] for c in channel.calls] == [1, 2]  # not posted again at once
    now[0] += MAYBE_DELIVERED_WAIT_SECONDS - 1
    flush(outbox, {"feishu": channel})
    assert [c["n"] for c in channel.calls] == [1, 2]  # 59 s after its try: still waiting
    now[0] += 2
    channel.doubtful = False
    assert flush(outbox, {"feishu": channel}).sent == 1
    assert [c["n"] for c in channel.calls] == [1, 2, 2] and outbox.count() == 0
