"""Messages in doubt (a post that got no verdict) over long runs: issue 20 E11.

The fault drill (bench/drill.py --seconds 720) counted messages that reached the group three times.
What it counted were equal bodies: the extra host went down and came back several times within
one minute, and each episode's "FIRING host_down (gpu-08) ... since 14:32" read the same, to the
minute. Each episode now says when it started to the second. And a message in doubt waits from
the try that left it in doubt.
"""

from __future__ import annotations

from datetime import timezone
from typing import Any

from builders import T0, Engine, alerts_config, down, h100_host
from gpuwatch.notify.base import DeliveryError
from gpuwatch.notify.delivery import MAYBE_DELIVERED_WAIT_SECONDS, flush
from gpuwatch.report import alert_message
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


def test_each_episode_of_a_flapping_alert_is_its_own_message() -> None:
    """Before: three episodes of host_down within one minute were three equal messages ("since
    2027-01-15 08:00 UTC"), which the group, and the drill, could not tell from one sent three times."""
    engine = Engine(alerts_config(host_down={"after": 1}))
    texts: dict[str, list[str]] = {"firing": [], "resolved": []}
    for n in range(3):  # down for 5 s, up for 15 s, three times: all within 08:00
        for at, host in ((T0 + 20 * n, down("gpu-b")), (T0 + 20 * n + 5, h100_host("gpu-b"))):
            transitions = engine.step(at, host)
            message = alert_message(transitions, [], {}, tz=timezone.utc)
            assert message is not None
            texts[transitions[0].kind].append(message.text)
    assert len(set(texts["firing"])) == 3 and len(set(texts["resolved"])) == 3
    assert "since 2027-01-15 08:00:20 UTC" in texts["firing"][1]
    assert "fired 2027-01-15 08:00:40 UTC, resolved 2027-01-15 08:00:45 UTC (lasted 5s)" in texts["resolved"][2]
