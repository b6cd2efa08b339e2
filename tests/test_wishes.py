""" "Tell me when": the pure judge of wishes over results built from real captures, with an explicit
clock (no sleeping); the wishes table; the daemon queueing each ending once; the CLI's checks.

Hosts are H100 boxes stacked from the real captures (tests/builders.py): a GPU with jobs replays
the load row (100 %, 19818 MiB) and the captured processes (2566, 1542, 15690 MiB in row order; a
job takes its GPU's next row), the others the idle row (0 %, 0 MiB).
"""

from __future__ import annotations

import io
import json
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from builders import DAY, HOUR, MIN, T0, Job, cli, down, h100_host, write_config
from gpuwatch.cli import build_parser
from gpuwatch.cli.wishes import cmd_wish
from gpuwatch.config import FreeGpuConfig
from gpuwatch.config.load import parse_config
from gpuwatch.daemon import Daemon
from gpuwatch.message import Message
from gpuwatch.model import FleetSnapshot, HostErrorKind, HostIssue, HostSnapshot, Reservation
from gpuwatch.poll import Poller
from gpuwatch.store import Outbox, StoreError, open_db
from gpuwatch.store.wishes import KEEP_ENDED_SECONDS, WishStore
from gpuwatch.wishes import DONE, FREE, Judgement, Wish, judge

FREE_GPU = FreeGpuConfig()
UTC = timezone.utc


def at(host: HostSnapshot, when: float, probe_seconds: float = 0.5) -> HostSnapshot:
    """``host`` as a result taken at ``when`` (epoch seconds)."""
    return replace(host, taken_at=datetime.fromtimestamp(when, UTC), probe_seconds=probe_seconds)


def fleet(when: float, *hosts: HostSnapshot) -> FleetSnapshot:
    return FleetSnapshot(datetime.fromtimestamp(when, UTC), tuple(at(h, when) if h.ok else h for h in hosts))


def free_wish(gpus: int, *, same_host: bool = False, model: str | None = None, wish_id: int = 1) -> Wish:
    return Wish(wish_id, FREE, "alice", "root", T0, T0 + DAY, gpus=gpus, same_host=same_host, model=model)


def done_wish(pid: int = 4100, host: str = "gpu-a", started_at: float | None = None, **extra: Any) -> Wish:
    return Wish(2, DONE, "alice", "root", T0, T0 + 30 * DAY, host=host, pid=pid, started_at=started_at, **extra)


# ---------------------------------------------------------------- notify-when-free


def test_a_free_wish_is_met_on_one_host_with_its_gpu_indexes_and_mentions_only_where_known() -> None:
    """gpu-a: GPU 0 busy, 1-3 free; gpu-b: all busy. Two GPUs on one host: gpu-a GPU 1, 2."""
    busy_all = [Job("bob", 5000 + g, g) for g in range(4)]
    snapshot = fleet(T0 + MIN, h100_host("gpu-b", busy_all), h100_host("gpu-a", [Job("bob", 4000, 0)]))
    result = judge(snapshot, [free_wish(2, same_host=True)], T0 + MIN, FREE_GPU)
    (ending,) = result.ended
    assert ending.outcome == "met" and ending.where == (("gpu-a", (1, 2), "H100 80GB HBM3"),)
    message = ending.message({"alice": "ou_alice", "bob": "ou_bob"})
    assert isinstance(message, Message)
    assert message.title == "2 GPUs free for alice"
    assert message.blocks == (
        "gpu-a GPU 1, 2 (H100 80GB HBM3) are free now (wish #1: 2 GPUs on one host; a notice, not a booking)",
    )
    assert message.mentions == ("ou_alice",)
    assert ending.message({"bob": "ou_bob"}).mentions == ()  # this channel does not know alice


def test_a_free_wish_waits_for_enough_gpus_and_takes_as_few_hosts_as_can_hold_them() -> None:
    two_free = h100_host("gpu-a", [Job("bob", 4000, 0), Job("bob", 4001, 1)])
    three_free = h100_host("gpu-b", [Job("bob", 4100, 0)])
    snapshot = fleet(T0 + MIN, two_free, three_free)
    assert judge(snapshot, [free_wish(4, same_host=True)], T0 + MIN, FREE_GPU) == Judgement()
    (ending,) = judge(snapshot, [free_wish(4)], T0 + MIN, FREE_GPU).ended
    assert [(host, gpus) for host, gpus, _ in ending.where] == [("gpu-b", (1, 2, 3)), ("gpu-a", (2,))]
    assert ending.message({}).blocks[0].startswith("gpu-b GPU 1, 2, 3 (H100 80GB HBM3); gpu-a GPU 2 (H100 80GB")
    assert judge(snapshot, [free_wish(6)], T0 + MIN, FREE_GPU) == Judgement()


def test_the_model_is_a_part_of_the_gpu_name_in_any_case() -> None:
    snapshot = fleet(T0 + MIN, h100_host("gpu-a"))
    assert judge(snapshot, [free_wish(1, model="h100 80gb")], T0 + MIN, FREE_GPU).ended
    assert judge(snapshot, [free_wish(1, model="A100")], T0 + MIN, FREE_GPU) == Judgement()


def test_gpus_booked_for_someone_else_are_not_free_for_a_wish_but_are_for_the_holder() -> None:
    """gpu-a: GPU 0 busy, 1-3 idle, 1-2 booked for bob (gpuwatch reserve): alice's wish for two
    GPUs on one host waits; bob's is met on his booked GPUs."""
    booked = Reservation(7, "bob", "gpu-a", (1, 2), T0, T0 + DAY)
    host = replace(h100_host("gpu-a", [Job("carol", 4000, 0)]), reservations=(booked,))
    snapshot = fleet(T0 + MIN, host)
    assert judge(snapshot, [free_wish(2, same_host=True)], T0 + MIN, FREE_GPU) == Judgement()
    bobs = replace(free_wish(2, same_host=True), user="bob")
    (ending,) = judge(snapshot, [bobs], T0 + MIN, FREE_GPU).ended
    assert [(h, gpus) for h, gpus, _ in ending.where] == [("gpu-a", (1, 2))]


def test_a_host_that_did_not_answer_is_stale_or_lost_its_process_list_frees_nothing() -> None:
    idle = h100_host("gpu-a")
    stale = replace(at(idle, T0), stale=True)
    unknown = replace(idle, warnings=(HostIssue(HostErrorKind.PROBE_FAILED, "ps failed; owners unknown"),))
    for host in (down("gpu-a"), stale, unknown):
        snapshot = FleetSnapshot(datetime.fromtimestamp(T0 + MIN, UTC), (host if host is stale else at(host, T0),))
        if not host.ok:
            snapshot = FleetSnapshot(snapshot.taken_at, (host,))
        assert judge(snapshot, [free_wish(1)], T0 + MIN, FREE_GPU) == Judgement(), host


def test_an_unmet_free_wish_expires_with_one_short_message() -> None:
    snapshot = fleet(T0 + DAY, h100_host("gpu-a", [Job("bob", 4000 + g, g) for g in range(4)]))
    wish = free_wish(2, model="A100")
    assert judge(snapshot, [wish], T0 + DAY - 1, FREE_GPU) == Judgement()
    (ending,) = judge(snapshot, [wish], T0 + DAY, FREE_GPU).ended
    assert ending.outcome == "expired"
    message = ending.message({"alice": "ou_alice"})
    assert message.title == "Wish #1 expired"
    assert message.blocks == ("wish #1: 2 GPUs, model A100 for alice expired unmet after 1d",)
    assert message.mentions == ("ou_alice",)
    free_now = fleet(T0 + 2 * DAY, h100_host("gpu-a"))  # the daemon was stopped past the wish's end
    (late,) = judge(free_now, [free_wish(2)], T0 + 2 * DAY, FREE_GPU).ended
    assert late.outcome == "expired"


def test_an_ended_wish_is_not_judged_again() -> None:
    snapshot = fleet(T0 + MIN, h100_host("gpu-a"))
    wish = replace(free_wish(1), ended_at=T0, outcome="cancelled")
    assert judge(snapshot, [wish], T0 + MIN, FREE_GPU) == Judgement()


# ---------------------------------------------------------------- notify-when-done


def test_a_running_process_is_followed_its_peak_kept_and_its_end_said_with_how_long_it_ran() -> None:
    """alice's 4100 started 600 s before the first result (ps etimes). Its memory: 2566 MiB alone
    on GPU 0, 1542 MiB as GPU 0's second process, 5132 MiB on GPUs 0 and 1; then it is gone."""
    wish = done_wish()
    first = fleet(T0 + MIN, h100_host("gpu-a", [Job("alice", 4100, 0, elapsed=660)]))
    (seen,) = judge(first, [wish], T0 + MIN, FREE_GPU).seen
    assert (seen.peak_memory_mib, seen.last_seen_at, seen.gpu_indexes) == (2566, T0 + MIN, (0,))
    assert seen.started_at == T0 - 10 * MIN
    assert seen.command == "python3 train.py --epochs 90"

    lower = fleet(T0 + 2 * MIN, h100_host("gpu-a", [Job("bob", 4200, 0), Job("alice", 4100, 0, elapsed=720)]))
    (seen,) = judge(lower, [seen], T0 + 2 * MIN, FREE_GPU).seen
    assert seen.peak_memory_mib == 2566 and seen.last_seen_at == T0 + 2 * MIN  # the peak stays

    two = [Job("alice", 4100, 0, elapsed=780), Job("alice", 4100, 1, elapsed=780)]
    (seen,) = judge(fleet(T0 + 3 * MIN, h100_host("gpu-a", two)), [seen], T0 + 3 * MIN, FREE_GPU).seen
    assert seen.peak_memory_mib == 5132 and seen.gpu_indexes == (0, 1)

    # down, then up with the process gone
    assert judge(fleet(T0 + 4 * MIN, down("gpu-a")), [seen], T0 + 4 * MIN, FREE_GPU) == Judgement()
    (ending,) = judge(fleet(T0 + 5 * MIN, h100_host("gpu-a")), [seen], T0 + 5 * MIN + 1, FREE_GPU).ended
    assert ending.outcome == "ended" and ending.at == T0 + 5 * MIN
    message = ending.message({"alice": "ou_alice"})
    assert message.title == "Process 4100 on gpu-a has ended"
    (line,) = message.blocks
    assert line.startswith(
        "alice's process 4100 (python3 train.py --epochs 90) on gpu-a GPU 0, 1 has ended (wish #2): it ran 13m to 15m"
    )
    assert line.endswith("; peak GPU memory 5132 MiB")
    assert message.mentions == ("ou_alice",) and message.severity == "resolved"


def test_a_host_that_is_down_stale_or_without_its_process_list_never_ends_the_process() -> None:
    wish = done_wish(started_at=T0 - 10 * MIN)
    unknown = replace(h100_host("gpu-a"), warnings=(HostIssue(HostErrorKind.PROBE_FAILED, "ps failed"),))
    stale = replace(at(h100_host("gpu-a"), T0 + MIN), stale=True)
    for snapshot in (
        fleet(T0 + MIN, down("gpu-a")),
        fleet(T0 + MIN, unknown),
        FleetSnapshot(datetime.fromtimestamp(T0 + 5 * MIN, UTC), (stale,)),
    ):
        assert judge(snapshot, [wish], T0 + 5 * MIN, FREE_GPU) == Judgement()


def test_a_result_from_before_the_wish_says_nothing_about_the_process() -> None:
    """The daemon's latest result may predate the process: only a probe begun after the wish counts."""
    wish = done_wish(started_at=T0 - 5)
    assert judge(fleet(T0 - 30, h100_host("gpu-a")), [wish], T0 + 1, FREE_GPU) == Judgement()
    snapshot = FleetSnapshot(datetime.fromtimestamp(T0 + 1, UTC), (at(h100_host("gpu-a"), T0 + 0.2, 0.5),))
    assert judge(snapshot, [wish], T0 + 1, FREE_GPU) == Judgement()  # begun at T0 - 0.3


def test_a_reused_pid_is_another_process_by_its_start_time_or_else_its_command() -> None:
    wish = done_wish(started_at=T0 - 10 * MIN, command="python3 train.py --epochs 90")
    reused = fleet(T0 + HOUR, h100_host("gpu-a", [Job("bob", 4100, 0, elapsed=60)]))  # started T0 + 59m
    (ending,) = judge(reused, [wish], T0 + HOUR, FREE_GPU).ended
    assert ending.outcome == "ended"
    same = fleet(T0 + HOUR, h100_host("gpu-a", [Job("alice", 4100, 0, elapsed=70 * 60 + 20)]))  # 20 s off
    assert not judge(same, [wish], T0 + HOUR, FREE_GPU).ended
    no_start = replace(wish, started_at=None)
    other = fleet(T0 + HOUR, h100_host("gpu-a", [Job("bob", 4100, 0, command="bash")]))
    assert judge(other, [no_start], T0 + HOUR, FREE_GPU).ended
    assert not judge(same, [no_start], T0 + HOUR, FREE_GPU).ended


def test_a_done_wish_ends_when_its_host_leaves_the_config_or_it_expires() -> None:
    wish = done_wish(last_seen_at=T0 + DAY, started_at=T0 - MIN, peak_memory_mib=2566)
    (gone,) = judge(fleet(T0 + MIN, h100_host("gpu-b")), [wish], T0 + MIN, FREE_GPU).ended
    assert gone.outcome == "host_removed"
    assert gone.message({}).blocks == ("gpu-a is no longer in the config: wish #2: gpu-a pid 4100 ends unmet",)
    running = fleet(T0 + 30 * DAY, h100_host("gpu-a", [Job("alice", 4100, 0, elapsed=int(30 * DAY + MIN))]))
    (expired,) = judge(running, [wish], T0 + 30 * DAY, FREE_GPU).ended
    assert expired.outcome == "expired"
    assert (
        expired.message({})
        .blocks[0]
        .startswith("wish #2: gpu-a pid 4100 (python3 train.py --epochs 90) for alice expired after 30d; still running")
    )


# ---------------------------------------------------------------- the table


def test_the_store_keeps_wishes_ends_each_once_cancels_and_prunes(tmp_path: Path) -> None:
    db = open_db(tmp_path)
    store = WishStore(db)
    free = store.add(free_wish(2, same_host=True, model="A100"))
    done = store.add(done_wish(started_at=T0 - MIN, gpu_indexes=(0, 1), peak_memory_mib=10))
    assert (free.id, done.id) == (1, 2)
    assert store.open() == [free, done] and store.get(2) == done
    store.seen([replace(done, peak_memory_mib=5132, last_seen_at=T0 + MIN)])
    assert store.get(2) == replace(done, peak_memory_mib=5132, last_seen_at=T0 + MIN)
    assert store.end(free, "met", T0 + MIN) is True
    assert store.end(free, "met", T0 + 2 * MIN) is False  # said once
    assert store.cancel(2, T0 + MIN) is True and store.cancel(2, T0 + MIN) is False
    assert store.end(done, "ended", T0 + 2 * MIN) is False  # cancelled meanwhile: nothing to say
    assert store.open() == []
    assert [(w.id, w.outcome) for w in store.all()] == [(1, "met"), (2, "cancelled")]
    assert store.prune(T0 + MIN + KEEP_ENDED_SECONDS) == 0
    assert store.prune(T0 + 2 * MIN + KEEP_ENDED_SECONDS) == 2 and store.all() == []
    db.close()


# ---------------------------------------------------------------- the daemon


class Recording:
    """A channel that keeps what it was asked to prepare (the daemon queues, the test reads)."""

    dry_run = False

    def __init__(self, name: str) -> None:
        self.name = name

    def prepare(self, message: Message) -> list[dict[str, Any]]:
        return [{"title": message.title, "text": "\n".join(message.blocks), "mentions": list(message.mentions)}]

    def deliver(self, payload: dict[str, Any]) -> None:
        raise AssertionError("nothing is sent in this test")

    def describe(self, payload: dict[str, Any]) -> str:
        return str(payload)


def test_the_daemon_queues_an_ending_once_to_the_report_channels_with_each_channels_mentions(tmp_path: Path) -> None:
    """Feishu and Slack carry reports, e-mail does not: the message goes to the two chats, each
    mentioning alice by its own id; the next cycle says nothing again."""
    config = parse_config(
        {
            "hosts": ["gpu-a"],
            "state_dir": str(tmp_path),
            "feishu": {"url": "https://example.invalid/hook", "mentions": {"alice": "ou_alice"}},
            "slack": {"url": "https://example.invalid/slack", "mentions": {"alice": "U0ALICE"}},
            "email": {"to": ["admins@example.invalid"], "from": "gpuwatch@example.invalid", "smtp_host": "localhost"},
        }
    )
    outbox = Outbox(open_db(tmp_path))
    channels = {name: Recording(name) for name in ("feishu", "slack", "email")}
    clock = [T0 + MIN]
    daemon = Daemon(config, Poller([], lambda h: None), outbox, channels, clock=lambda: clock[0])  # type: ignore[arg-type, return-value]
    assert daemon.wishes(fleet(T0 + MIN, h100_host("gpu-a"))) == []  # no wish: nothing read but the open ones
    WishStore(outbox.db).add(free_wish(2))  # made while the daemon runs

    (said,) = daemon.wishes(fleet(T0 + MIN, h100_host("gpu-a")))
    assert said.outcome == "met"
    queued = [(item.channel, item.payload["mentions"]) for item in outbox.pending()]
    assert queued == [("feishu", ["ou_alice"]), ("slack", ["U0ALICE"])]
    clock[0] += MIN
    assert daemon.wishes(fleet(T0 + 2 * MIN, h100_host("gpu-a"))) == []
    assert len(outbox.pending()) == 2
    outbox.db.close()


# ---------------------------------------------------------------- the command line


FEISHU = {"url": "http://127.0.0.1:9/hook", "mentions": {"alice": "ou_alice"}}  # never sent to here


def test_the_cli_registers_lists_as_json_and_cancels_a_free_wish(tmp_path: Path) -> None:
    config = write_config(tmp_path, feishu=FEISHU)
    code, out = cli(config, "notify-when-free", "--user", "alice", "--gpus", "2", "--same-host", "--model", "A100")
    assert code == 0 and out.startswith("wish #1 added: tell alice when 2 GPUs on one host, model A100 are free;")
    code, out = cli(config, "notify-when-free", "--list", "--json")
    (doc,) = json.loads(out)
    assert code == 0
    assert {k: doc[k] for k in ("id", "kind", "user", "gpus", "same_host", "model", "ended_at")} == {
        "id": 1,
        "kind": "free",
        "user": "alice",
        "gpus": 2,
        "same_host": True,
        "model": "A100",
        "ended_at": None,
    }
    assert doc["author"] and doc["expires_at"] > doc["created_at"]
    assert cli(config, "notify-when-done", "--list") == (0, "no open notify-when-done wishes\n")
    assert cli(config, "notify-when-done", "--cancel", "1") == (
        1,
        "wish #1 is a notify-when-free wish: notify-when-free --cancel 1\n",
    )
    assert cli(config, "notify-when-free", "--cancel", "#1") == (
        0,
        "wish #1 cancelled: 2 GPUs on one host, model A100\n",
    )
    assert cli(config, "notify-when-free", "--cancel", "1")[0] == 1
    code, out = cli(config, "notify-when-free", "--list", "--all")
    assert code == 0 and out.startswith("#1  alice: 2 GPUs on one host, model A100  cancelled ")


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["notify-when-free"], "give --gpus N"),
        (["notify-when-free", "--gpus", "0"], "at least 1"),
        (["notify-when-free", "--gpus", "1", "--for", "soon"], "is not a duration"),
        (["notify-when-free", "--list", "--gpus", "2"], "--gpus cannot go with it"),
        (["notify-when-free", "--gpus", "2", "--json"], "--all and --json go with --list"),
        (["notify-when-free", "--cancel", "1", "--json"], "--cancel: --json cannot go with it"),
        (["notify-when-done", "--list", "--cancel", "1"], "--list: --cancel cannot go with it"),
        (["notify-when-done", "--host", "localhost"], "give --host HOST and --pid PID"),
        (["notify-when-done", "--host", "gpu03", "--pid", "4711"], "'gpu03' is not a configured host"),
        (["notify-when-done", "--cancel", "x"], "'x' is not a wish id"),
    ],
)
def test_the_cli_refuses_what_it_cannot_register(
    tmp_path: Path, argv: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, feishu=FEISHU)
    code, _ = cli(config, *argv)
    assert code == 2
    assert words in capsys.readouterr().err


def test_the_cli_refuses_a_wish_nobody_could_be_told_of_and_notes_a_user_no_channel_mentions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(write_config(tmp_path), "notify-when-free", "--gpus", "1")[0] == 2
    assert "no channel is configured (feishu:, " in capsys.readouterr().err
    alerts_only = write_config(tmp_path, alertmanager={"url": "http://127.0.0.1:9"})
    assert cli(alerts_only, "notify-when-free", "--gpus", "1")[0] == 2  # Alertmanager takes alerts, not wishes
    assert "(alertmanager: alerts only), so there is nobody to tell" in capsys.readouterr().err
    config = write_config(tmp_path, feishu=FEISHU)
    assert cli(config, "notify-when-free", "--gpus", "1", "--user", "bob")[0] == 0
    assert "note: no channel has a mention for 'bob'" in capsys.readouterr().err
    assert cli(config, "notify-when-free", "--gpus", "1", "--user", "alice")[0] == 0
    assert capsys.readouterr().err == ""


def test_a_wish_ends_in_the_transaction_that_queues_its_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that fails (a full disk) keeps the wish open and queues nothing; the next cycle says it once."""
    config = parse_config(
        {"hosts": ["gpu-a"], "state_dir": str(tmp_path), "feishu": {"url": "http://127.0.0.1:9/hook"}}
    )
    outbox = Outbox(open_db(tmp_path))
    daemon = Daemon(config, Poller([], lambda h: None), outbox, {"feishu": Recording("feishu")}, clock=lambda: T0 + MIN)  # type: ignore[arg-type, return-value]
    WishStore(outbox.db).add(free_wish(1))
    snapshot = fleet(T0 + MIN, h100_host("gpu-a"))

    def full(self: WishStore, now: float) -> int:
        raise StoreError("state_dir /x: cannot write gpuwatch.sqlite3: no space left on device", disk_full=True)

    with monkeypatch.context() as patch:
        patch.setattr(WishStore, "prune", full)
        daemon.tell_wishes(snapshot)  # logged, not raised
    assert outbox.pending() == [] and [w.id for w in WishStore(outbox.db).open()] == [1]
    daemon.tell_wishes(snapshot)
    assert [item.summary for item in outbox.pending()] == ["1 GPU free for alice"]
    assert WishStore(outbox.db).open() == []
    outbox.db.close()


def test_notify_when_done_records_the_process_as_the_poll_saw_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The host's poll (a seam: no SSH here) gives the start time, command, GPUs and memory; the
    owner is told unless --user says otherwise; a poll without every owner is said, and registered."""
    config = parse_config(
        {"hosts": ["gpu-a"], "state_dir": str(tmp_path / "state"), "feishu": {"url": "http://127.0.0.1:9/hook"}}
    )
    host = at(h100_host("gpu-a", [Job("carol", 4100, 0, elapsed=3600), Job("carol", 4100, 1, elapsed=3600)]), T0)
    out = io.StringIO()
    args = build_parser().parse_args(["notify-when-done", "--host", "gpu-a", "--pid", "4100"])
    assert cmd_wish(config, args, out, kind=DONE, poll_host=lambda c, h: host, clock=lambda: T0 + 1) == 0
    assert out.getvalue().startswith(
        "wish #1 added: tell carol when gpu-a pid 4100 (python3 train.py --epochs 90) ends (running 1h1s, 5132 MiB of"
        " GPU memory now); until "
    )
    db = open_db(tmp_path / "state")
    (wish,) = WishStore(db).open()
    db.close()
    assert (wish.user, wish.started_at, wish.gpu_indexes, wish.peak_memory_mib) == ("carol", T0 - HOUR, (0, 1), 5132)
    assert (wish.last_seen_at, wish.created_at, wish.expires_at) == (T0, T0 + 1, T0 + 1 + 30 * DAY)
    assert wish.author

    unknown = replace(host, warnings=(HostIssue(HostErrorKind.PROBE_FAILED, "ps failed; owners unknown"),))
    args = build_parser().parse_args(["notify-when-done", "--host", "gpu-a", "--pid", "4100", "--user", "dave"])
    assert cmd_wish(config, args, io.StringIO(), kind=DONE, poll_host=lambda c, h: unknown) == 0
    assert "did not tell every process's owner this time; registered anyway" in capsys.readouterr().err
