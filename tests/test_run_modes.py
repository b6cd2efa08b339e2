"""Reports to Feishu, and the three ways to run (daemon, ``--once``, ``--dry-run``), end to end.

Everything goes over real HTTP to tests/fakefeishu.py (which checks the signature, the keyword,
the 20 KB limit and the rate limits like Feishu does); nothing in requests is mocked. The
``localhost`` host replays real nvidia-smi captures through the stand-in (no root needed); a
second host at a loopback address where nothing listens shows how a host that did not answer
is reported. gpuwatch runs in-process through ``gpuwatch.cli.main`` where that suffices, and as
a real subprocess (``python -m gpuwatch``) where a kill or a signal is involved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import io
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from fakefeishu import Exchange, FakeFeishu, feishu_sign
from fleet import ensure_user, scenario_healthy_multi_gpu, scenario_idle
from gpuwatch.cli import build_channels, build_poller, main
from gpuwatch.config.load import load_config
from gpuwatch.daemon import Daemon
from gpuwatch.logsetup import setup_logging
from gpuwatch.message import Message
from gpuwatch.model import FleetSnapshot
from gpuwatch.notify.delivery import flush
from gpuwatch.notify.feishu import FeishuChannel, FeishuSettings
from gpuwatch.poll import probe_host, utcnow
from gpuwatch.report import host_block, overview
from gpuwatch.ssh import LocalRunner
from gpuwatch.store import AlertStore, Outbox, open_db
from waiting import wait_for

TOKEN = "7d1f0c9e-4b2a-4c55-9e31-a8b6f2d40c17"
SECRET = "sEcr3t-Lq7w-signing-key"
KEYWORD = "GPU"
SECRET_ENV = "GPUWATCH_TEST_FEISHU_SECRET"
DEAD_ADDRESS = "127.0.0.250"  # nothing listens on port 1 there: connection refused
REPORTS = [
    {"report": "overview", "every": "1h"},
    {"report": "user", "user": "alice", "every": "1h"},
    {"report": "free", "every": "1h"},
]
DB = "gpuwatch.sqlite3"


# ---------------------------------------------------------------------- helpers


@pytest.fixture
def server() -> Iterator[FakeFeishu]:
    with FakeFeishu(token=TOKEN, keywords=[KEYWORD], secret=SECRET) as srv:
        yield srv


@pytest.fixture
def env_secret(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """Sets the variable named by ``secret_env`` (the right secret unless told otherwise)."""

    def set_secret(value: str = SECRET) -> None:
        monkeypatch.setenv(SECRET_ENV, value)

    set_secret()
    return set_secret


@pytest.fixture
def owner(local_standin: Path) -> Iterator[tuple[str, int]]:
    """A real process on GPU 0 of the local stand-in: captured pid 11327 (2566 MiB) is mapped to
    it. As root it runs as ``alice`` (created like the fleet does), else as the current user."""
    kwargs: dict[str, Any] = {}
    name = getpass.getuser()
    if os.geteuid() == 0:
        ensure_user("alice")
        kwargs["user"] = name = "alice"
    child = subprocess.Popen(["sleep", "300"], **kwargs)
    try:
        scenario_healthy_multi_gpu(local_standin, owners_pids={11327: child.pid})
        yield name, child.pid
    finally:
        child.kill()
        child.wait()


def far_daily(*reports: str) -> list[dict[str, Any]]:
    """Daily reports at a time of day 12 hours from now: due in a test's first run, and not again
    while it runs (``every`` reports follow the clock's hours and could fall due between two runs)."""
    at = time.strftime("%H:%M", time.localtime(time.time() + 12 * 3600))
    return [{"report": r, "at": at} if ":" not in r else {"report": "user", "user": r[5:], "at": at} for r in reports]


def write_config(
    tmp_path: Path,
    url: str,
    *,
    reports: list[dict[str, Any]] | None = None,
    dead_host: bool = True,
    poll_every: str = "1s",
    name: str = "config.yaml",
    alerts: dict[str, Any] | None = None,
    **feishu: Any,
) -> Path:
    hosts: list[Any] = ["localhost"]
    if dead_host:
        hosts.append({"name": "dead", "address": DEAD_ADDRESS, "port": 1, "connect_timeout": "2s"})
    doc = {
        "hosts": hosts,
        "ssh": {"use_ssh_config": False, "known_hosts": str(tmp_path / "known_hosts")},
        "state_dir": str(tmp_path / "state"),
        "feishu": {"url": url, "keyword": KEYWORD, "secret_env": SECRET_ENV, **feishu},
        "schedule": {"poll_every": poll_every, "reports": REPORTS if reports is None else reports},
    }
    doc["feishu"] = {k: v for k, v in doc["feishu"].items() if v is not None}
    if alerts is not None:
        doc["alerts"] = alerts
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    path.chmod(0o600)
    return path


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``gpuwatch ARGV`` in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue(), capsys.readouterr().err


def state_log(config: Path) -> str:
    return (config.parent / "state" / "gpuwatch.log").read_text(encoding="utf-8")


WRONG_SECRET = "not-the-bots-secret"
REMOVED_TOKEN = "b0t-that-was-removed-1234"


def assert_no_secrets(*texts: str) -> None:
    for text in texts:
        for secret in (TOKEN, SECRET, WRONG_SECRET, REMOVED_TOKEN):
            assert secret not in text


def outbox_rows(config: Path) -> list[dict[str, Any]]:
    """The real outbox, read straight from SQLite (pending and dead rows), oldest first."""
    path = config.parent / "state" / DB
    if not path.exists():
        return []
    with contextlib.closing(sqlite3.connect(path, timeout=10)) as db:
        rows = db.execute("SELECT id, summary, payload, attempts, dead FROM outbox ORDER BY id").fetchall()
    return [{"id": r[0], "summary": r[1], "payload": json.loads(r[2]), "attempts": r[3], "dead": r[4]} for r in rows]


def unsigned(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in ("timestamp", "sign")}


def post_title(body: dict[str, Any]) -> str:
    return str(body["content"]["post"]["zh_cn"]["title"])


def post_blocks(body: dict[str, Any]) -> list[str]:
    return ["".join(tag.get("text", "") for tag in para) for para in body["content"]["post"]["zh_cn"]["content"]]


def post_text(body: dict[str, Any]) -> str:
    return "\n\n".join([post_title(body), *post_blocks(body)])


def assert_signed_with_keyword(exchange: Exchange) -> None:
    body = exchange.body
    assert body is not None and exchange.accepted, exchange.reason
    assert body["sign"] == feishu_sign(SECRET, body["timestamp"])
    assert abs(int(body["timestamp"]) - time.time()) < 120
    assert KEYWORD in post_title(body)


def gpuwatch_process(
    argv: list[str], tmp_path: Path, preamble: str = "", name: str = "daemon"
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """A real ``gpuwatch`` process (stdout, stderr to files). ``preamble`` is Python run first."""
    out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    if preamble:
        command = [sys.executable, "-c", f"{preamble}\nimport sys\nfrom gpuwatch.cli import main\nsys.exit(main())"]
    else:
        command = [sys.executable, "-m", "gpuwatch"]
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen([*command, *argv], stdout=stdout, stderr=stderr, cwd=tmp_path)
    return proc, out, err


# ---------------------------------------------------------------------- 1. delivery


def test_once_delivers_each_report_signed_with_keyword(
    tmp_path: Path,
    server: FakeFeishu,
    env_secret: Callable[[str], None],
    owner: tuple[str, int],
    capsys: pytest.CaptureFixture[str],
) -> None:
    user, pid = owner
    config = write_config(tmp_path, server.url)

    code, out, err = run_cli(capsys, "--once", "-c", str(config))

    assert code == 0, err
    exchanges = server.exchanges
    assert len(exchanges) == 3 and [e.code for e in exchanges] == [0, 0, 0]
    for exchange in exchanges:
        assert_signed_with_keyword(exchange)
        assert exchange.headers["content-type"].startswith("application/json")
    bodies = [e.body for e in exchanges if e.body is not None]
    titles = [post_title(b) for b in bodies]
    assert titles[0].startswith("GPU overview ") and titles[0].endswith(": 2 hosts, 1 down, 4 GPUs, 3 free")
    assert titles[1].startswith("GPU processes of alice ")
    assert titles[2].startswith("Free GPUs ") and titles[2].endswith(": 3 of 4")

    # overview: the host that did not answer comes first, with its reason, then the real capture
    dead, local = post_blocks(bodies[0])
    assert (
        dead == f"dead: NO DATA (unreachable): connection refused by {DEAD_ADDRESS}:1 (is sshd running on that port?)"
    )
    lines = local.split("\n")
    assert lines[0] == "GPU for localhost"
    assert lines[1] == "0: 100%, Mem=19818/81559 MiB"
    # who is on GPU 0: the real owner of the mapped pid, then the pids ps cannot see
    # (the other two captured pids are not ours: ps may not see them, so no owner is asserted)
    assert lines[2].startswith(f"    {user} 2566 MiB; ")
    assert lines[3:5] == ["1: 0%, Mem=0/81559 MiB", "    free"]
    # this machine's own full disk or memory may add a line of what is wrong with it: not counted here
    assert len([line for line in lines if not re.match(r"    (disk|memory) ", line)]) == 9

    alice = post_text(bodies[1])
    if user == "alice":
        assert titles[1].endswith(": 1 process")
        assert f"localhost (1 GPU)\n    GPU 0: pid {pid} sleep 300, 2566 MiB, up " in alice
    else:
        assert "alice has no GPU processes on the 1 hosts that answered." in alice
    assert "Not known (no data): dead: NO DATA (unreachable)" in alice  # never silently left out

    free = post_blocks(bodies[2])
    assert free[0] == (
        "localhost: 3 free of 4 NVIDIA H100 80GB HBM3: GPU 1 (0/81559 MiB), 2 (0/81559 MiB), 3 (0/81559 MiB)"
    )
    assert free[1].startswith("Not known (no data): dead: NO DATA (unreachable)")

    assert outbox_rows(config) == []
    assert_no_secrets(out, err, state_log(config))


# ---------------------------------------------------------------------- 2. splitting


def test_large_fleet_overview_split_into_whole_host_blocks(
    tmp_path: Path, local_standin: Path, server: FakeFeishu
) -> None:
    scenario_healthy_multi_gpu(local_standin, 8, busy_gpus=range(8))
    config = load_config(write_config(tmp_path, server.url, dead_host=False))
    local = config.hosts[0]
    polled = probe_host(local, LocalRunner())
    assert polled.ok and len(polled.gpus) == 8
    names = [f"h{i}" for i in range(80)]
    snapshot = FleetSnapshot(taken_at=utcnow(), hosts=tuple(dataclasses.replace(polled, name=n) for n in names))
    message = overview(snapshot, config.free_gpu)
    expected_blocks = [host_block(h, config.free_gpu) for h in snapshot.hosts]
    assert len("\n\n".join(expected_blocks).encode()) > 2 * 20_000  # needs at least three parts

    with requests.Session() as session:
        session.trust_env = False
        channel = FeishuChannel(FeishuSettings(url=server.url, keyword=KEYWORD, secret=SECRET), session=session)
        for payload in channel.prepare(message):
            channel.deliver(payload)

    exchanges = server.exchanges
    total = len(exchanges)
    assert total >= 3 and all(e.accepted for e in exchanges)
    assert total <= len("\n\n".join(expected_blocks).encode()) // 15_000 + 1  # parts are well filled
    received_blocks: list[str] = []
    for index, exchange in enumerate(exchanges, start=1):
        assert len(exchange.raw) <= 20_000  # as received, signature included
        assert_signed_with_keyword(exchange)
        assert exchange.body is not None
        assert post_title(exchange.body) == f"{message.title} ({index}/{total})"
        blocks = post_blocks(exchange.body)
        assert blocks and all(b.startswith("GPU for h") for b in blocks)
        received_blocks += blocks
    # every host's block whole, in exactly one part, all of them, in order
    assert received_blocks == expected_blocks
    for name in names:
        holding = [e for e in exchanges if f"GPU for {name}\n" in post_text(e.body or {})]
        assert len(holding) == 1


# ---------------------------------------------------------------------- 3. retry


def test_transient_failures_are_retried_and_each_message_delivered_once(
    tmp_path: Path,
    local_standin: Path,
    server: FakeFeishu,
    env_secret: Callable[[str], None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = write_config(tmp_path, server.url)
    server.fail_next([11232, 500])

    code, out, err = run_cli(capsys, "--once", "-v", "-c", str(config))

    assert code == 0, err
    assert [(e.status, e.code) for e in server.exchanges] == [(200, 11232), (500, None)] + [(200, 0)] * 3
    accepted = server.accepted
    assert [post_title(b).split(" 20")[0] for b in accepted] == ["GPU overview", "GPU processes of alice", "Free GPUs"]
    assert len({json.dumps(unsigned(b)) for b in accepted}) == 3
    assert outbox_rows(config) == []
    log = state_log(config)
    for text in (err, log):  # -v: the retries are on stderr too
        assert "attempt 1/5 failed (rate limited" in text and "attempt 2/5 failed (HTTP 500" in text
    assert_no_secrets(out, err, log)


# ---------------------------------------------------------------------- 4. permanent errors


@pytest.mark.parametrize(
    ("fault", "hint"),
    [
        ("wrong_secret", "signature rejected: the bot's signing secret differs from feishu.secret"),
        ("no_keyword", "keyword missing: set feishu.keyword to one of the bot's keywords"),
    ],
)
def test_permanent_error_keeps_messages_until_config_fixed(
    tmp_path: Path,
    local_standin: Path,
    env_secret: Callable[[str], None],
    capsys: pytest.CaptureFixture[str],
    fault: str,
    hint: str,
) -> None:
    bot_keyword = "gpu-team"  # a word no report carries by itself
    reports = far_daily("overview", "user:alice", "free")
    with FakeFeishu(token=TOKEN, keywords=[bot_keyword], secret=SECRET) as server:
        good = write_config(tmp_path, server.url, keyword=bot_keyword, reports=reports)
        if fault == "wrong_secret":
            env_secret(WRONG_SECRET)
            bad = good
        else:
            bad = write_config(tmp_path, server.url, keyword=None, name="config-bad.yaml", reports=reports)

        code, out, err = run_cli(capsys, "--once", "-c", str(bad))

        assert code == 1
        assert hint in err  # says plainly which bot setting to fix
        assert "3 messages left in the outbox" in err
        assert len(server.exchanges) == 1 and not server.accepted  # a permanent error is not hammered
        kept = outbox_rows(good)
        assert [r["dead"] for r in kept] == [0, 0, 0]
        assert [r["summary"].split(" 20")[0] for r in kept] == ["GPU overview", "GPU processes of alice", "Free GPUs"]
        assert_no_secrets(out, err, state_log(good))

        # fixed, and the fleet changed meanwhile: the kept messages go, in order; the daily reports
        # are not due again; one forced now shows the fleet as it is
        env_secret(SECRET)
        scenario_idle(local_standin)
        server.reset()
        code, out, err = run_cli(capsys, "--once", "-c", str(good))

        assert code == 0, err
        accepted = server.accepted
        assert len(server.exchanges) == len(accepted) == 3
        assert [post_blocks(b) for b in accepted] == [post_blocks(r["payload"]) for r in kept]
        assert post_title(accepted[0]).endswith("3 free") and post_title(accepted[2]).endswith("3 of 4")

        code, out, err = run_cli(capsys, "--report", "overview", "--report", "free", "-c", str(good))
        assert code == 0, err
        # (the third poll of the dead host also fires host_down: an alert beside the reports)
        forced = [post_title(b) for b in server.accepted[3:] if "GPU alerts" not in post_title(b)]
        assert len(forced) == 2
        assert "GPU overview" in forced[0] and forced[0].endswith("4 free")
        assert "Free GPUs" in forced[1] and forced[1].endswith("4 of 4")
        for body in accepted:
            assert body["sign"] == feishu_sign(SECRET, body["timestamp"])
            assert bot_keyword in post_text(body)
        assert outbox_rows(good) == []
        assert_no_secrets(out, err, state_log(good))


@pytest.mark.parametrize("fmt", ["text", "post", "card"])
def test_message_queued_before_the_keyword_was_set_carries_it_when_sent(tmp_path: Path, fmt: str) -> None:
    """What the outbox keeps was prepared with the config of its day; the keyword of today goes in."""
    bot_keyword = "gpu-team"
    message = Message(title="GPU overview", blocks=("GPU for h1\n0: 0%, Mem=0/81559 MiB\n    free",))
    with FakeFeishu(token=TOKEN, keywords=[bot_keyword], secret=SECRET) as server, requests.Session() as session:
        session.trust_env = False
        before = FeishuChannel(FeishuSettings(url=server.url, secret=SECRET, format=fmt), session=session)
        outbox = Outbox(open_db(tmp_path / "state"))
        outbox.add("feishu", message.title, before.prepare(message))
        assert not flush(outbox, {"feishu": before}).ok
        assert server.codes == [19024]

        after = FeishuChannel(
            FeishuSettings(url=server.url, secret=SECRET, format=fmt, keyword=bot_keyword), session=session
        )
        stored = outbox.pending()[0].payload
        result = flush(outbox, {"feishu": after})

        assert result.sent == 1 and outbox.count() == 0
        assert server.codes == [19024, 0]
        (body,) = server.accepted
        assert unsigned(body) != stored and after.describe(body) == f"【{bot_keyword}】{before.describe(stored)}"
        outbox.db.close()


# ---------------------------------------------------------------------- 5. kill -9


# Feishu's backoff between attempts (1 s, 2 s, 4 s, 8 s: up to 15 s per message) is shortened in
# the killed daemon, so that it queues several messages in a few seconds; nothing else changes.
FAST_BACKOFF = "import gpuwatch.notify.http as http\nhttp._BACKOFF_BASE_SECONDS = 0.02"


def test_nothing_lost_or_repeated_across_sigkill(
    tmp_path: Path,
    local_standin: Path,
    server: FakeFeishu,
    env_secret: Callable[[str], None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = write_config(
        tmp_path,
        server.url,
        reports=[{"report": "overview", "every": "1s"}, {"report": "free", "every": "2s"}],
        alerts={"host_down": {"after": 1}},
    )
    server.fail_next([503, 500] * 500)  # refused outright (a dropped answer would be "maybe delivered")
    daemon, out, err = gpuwatch_process(["run", "-c", str(config)], tmp_path, preamble=FAST_BACKOFF)

    def queued_all() -> bool:
        titles = [r["summary"].split(" 20")[0] for r in outbox_rows(config)]
        return {"GPU alerts: 1 firing", "GPU overview", "Free GPUs"} <= set(titles)

    try:
        wait_for(queued_all, 20, "the daemon to queue an alert, an overview and a free report")
        daemon.send_signal(signal.SIGKILL)
        assert daemon.wait(timeout=5) == -signal.SIGKILL
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    queued = outbox_rows(config)
    titles = [r["summary"].split(" 20")[0] for r in queued]
    # each newer report replaced the one still waiting: one of each, however many were made
    assert sorted(titles) == ["Free GPUs", "GPU alerts: 1 firing", "GPU overview"]
    assert not any(r["dead"] for r in queued)
    assert any(r["attempts"] > 0 for r in queued)  # they were tried and refused, not just queued
    assert not server.accepted

    server.reset()  # healthy again
    code, restart_out, restart_err = run_cli(capsys, "--report", "overview", "--report", "free", "-c", str(config))

    assert code == 0, restart_err
    accepted = server.accepted
    assert len(server.exchanges) == len(accepted) == 3
    # the alert exactly as it was queued, once; the waiting reports replaced by this run's newer ones
    (alert,) = [r for r in queued if r["summary"].startswith("GPU alerts")]
    assert unsigned(accepted[0]) == alert["payload"]
    assert [post_title(b).split(" 20")[0] for b in accepted[1:]] == ["GPU overview", "Free GPUs"]
    assert outbox_rows(config) == []
    assert_no_secrets(out.read_text(), err.read_text(), restart_out, restart_err, state_log(config))


# ---------------------------------------------------------------------- 6. --dry-run


@pytest.mark.parametrize("argv", [["run", "--dry-run"], ["--once", "--dry-run", "-v"]])
def test_dry_run_prints_and_sends_nothing(
    tmp_path: Path,
    local_standin: Path,
    server: FakeFeishu,
    env_secret: Callable[[str], None],
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
) -> None:
    config = write_config(tmp_path, server.url, reports=far_daily("overview", "user:alice", "free"))
    # Leave something in the real outbox first (a wrong secret: refused, kept).
    env_secret("wrong")
    assert run_cli(capsys, "--once", "-c", str(config))[0] == 1
    env_secret(SECRET)
    before = outbox_rows(config)
    assert len(before) == 3
    server.reset()

    code, out, err = run_cli(capsys, *argv, "-c", str(config))

    assert code == 0, err
    assert server.exchanges == []  # nothing sent
    assert outbox_rows(config) == before  # the real outbox untouched: no new rows, no attempts counted
    assert out.count("----- would send to feishu -----") == 3
    assert "GPU for localhost\n0: 100%, Mem=19818/81559 MiB\n" in out
    assert "dead: NO DATA (unreachable): connection refused" in out
    once = "--once" in argv
    if once:  # what --once would send now: the 3 waiting; the daily reports are not due again
        assert out.count("(still in the outbox since ") == 3
    else:  # a preview of every report: each replaces the one of its kind still waiting
        assert out.count("(still in the outbox, replaced by this run's newer one: ") == 3
        assert out.count("(still in the outbox since ") == 0
    verbose = "-v" in argv
    assert out.count("----- JSON body for feishu -----") == (3 if verbose else 0)
    if verbose:
        bodies = re.findall(r"----- JSON body for feishu -----\n(\{.*?\n\})\n", out, re.S)
        parsed = [json.loads(b) for b in bodies]
        assert [b["msg_type"] for b in parsed] == ["post"] * 3
        assert parsed == [r["payload"] for r in before]
    assert_no_secrets(out, err, state_log(config))


# ---------------------------------------------------------------------- 7. the daemon


def test_daemon_sigterm_exits_0_and_logs_each_cycle(
    tmp_path: Path, local_standin: Path, server: FakeFeishu, env_secret: Callable[[str], None]
) -> None:
    config = write_config(tmp_path, server.url, reports=[{"report": "overview", "every": "1s"}])
    daemon, out, err = gpuwatch_process(["run", "-c", str(config)], tmp_path)
    try:
        wait_for(lambda: len(server.accepted) >= 2, 15, "two overviews from the daemon")
        wait_for(lambda: state_log(config).count("poll: localhost ok") >= 2, 10, "two polls of each host")
        wait_for(lambda: state_log(config).count("poll: dead unreachable") >= 2, 10, "two polls of each host")
        assert daemon.poll() is None
        stopped_at = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=5) == 0
        assert time.monotonic() - stopped_at < 5
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    assert server._httpd is not None
    # One connection per post (see FeishuChannel): none is left open after the stop.
    wait_for(lambda: not server._httpd.connections, 3, "the daemon's HTTP connections to close")

    for exchange in server.exchanges:
        assert_signed_with_keyword(exchange)
    log = state_log(config)
    assert "gpuwatch running: 2 hosts, poll every 1s, reports: overview every 1s" in log
    assert "received SIGTERM: finishing the current step" in log
    assert re.search(r"gpuwatch stopping: \d+ messages still in the outbox", log)
    # each host on its own clock: every result logged with its duration, and what happened
    assert re.search(r"poll: localhost ok \(4 GPUs, \d+\.\d\ds\)", log)
    assert re.search(r"poll: dead unreachable \(\d+\.\d\ds\)", log)
    assert re.search(r"cycle: new results from [12] hosts \([01] answered\)", log)
    assert f"poll: dead: unreachable: connection refused by {DEAD_ADDRESS}:1" in log  # and why
    assert_no_secrets(out.read_text(), err.read_text(), log)


def test_daemon_survives_a_failing_cycle(
    tmp_path: Path, local_standin: Path, server: FakeFeishu, env_secret: Callable[[str], None]
) -> None:
    config_path = write_config(tmp_path, server.url, dead_host=False, reports=[{"report": "overview", "every": "1s"}])
    config = load_config(config_path)
    setup_logging(config.state_dir, secrets=[SECRET, server.url])
    poller = build_poller(config)
    outbox = Outbox(open_db(config.state_dir))
    daemon = Daemon(config, poller, outbox, build_channels(config), alert_store=AlertStore(outbox.db))
    real_alerts, real_report = daemon.alerts, daemon.report
    calls: dict[str, int] = {"alerts": 0, "report": 0}

    def alerts_failing_once(*args: Any) -> Any:
        calls["alerts"] += 1
        if calls["alerts"] == 1:
            raise RuntimeError("the first alert evaluation broke")
        return real_alerts(*args)

    def report_failing_once(*args: Any) -> None:
        calls["report"] += 1
        if calls["report"] == 1:
            raise RuntimeError("the first report broke")
        real_report(*args)

    daemon.alerts = alerts_failing_once  # type: ignore[method-assign]
    daemon.report = report_failing_once  # type: ignore[method-assign]
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(daemon.run_forever(install_signals=False)))
    thread.start()
    try:
        wait_for(lambda: len(server.accepted) >= 2 and calls["alerts"] >= 3, 15, "cycles after the failing ones")
    finally:
        daemon.stop.set()
        thread.join(timeout=10)
        outbox.db.close()
    assert result == [0]
    log = state_log(config_path)
    assert "alerts failed; going on with the next cycle" in log
    assert "RuntimeError: the first alert evaluation broke" in log  # with its traceback
    assert "report overview every 1s failed; going on with the next cycle" in log
    after = log.split("RuntimeError: the first report broke", 1)[1]
    assert "poll: localhost ok" in after and "feishu: delivered message" in after
    assert all("GPU for localhost" in post_text(b) for b in server.accepted)
    assert_no_secrets(log)


# ---------------------------------------------------------------------- 8. test-notify


def test_test_notify_accepted(
    tmp_path: Path,
    local_standin: Path,
    server: FakeFeishu,
    env_secret: Callable[[str], None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = write_config(tmp_path, server.url)
    code, out, err = run_cli(capsys, "test-notify", "-c", str(config))
    assert code == 0, err
    assert out == "feishu: accepted\n"
    (exchange,) = server.exchanges
    assert_signed_with_keyword(exchange)
    assert "gpuwatch test message" in post_title(exchange.body or {})
    assert_no_secrets(out, err, state_log(config))


@pytest.mark.parametrize(
    ("fault", "what_to_change"),
    [
        ("wrong_secret", "the bot's signing secret differs from feishu.secret / $FEISHU_SECRET"),
        ("no_keyword", "keyword missing: set feishu.keyword to one of the bot's keywords"),
        ("removed_bot", "invalid webhook token: the bot was removed or the URL is wrong"),
    ],
)
def test_test_notify_not_accepted_says_what_to_change(
    tmp_path: Path,
    local_standin: Path,
    server: FakeFeishu,
    env_secret: Callable[[str], None],
    capsys: pytest.CaptureFixture[str],
    fault: str,
    what_to_change: str,
) -> None:
    if fault == "wrong_secret":
        env_secret(WRONG_SECRET)
        config = write_config(tmp_path, server.url)
    elif fault == "no_keyword":
        config = write_config(tmp_path, server.url, keyword=None)
    else:
        config = write_config(tmp_path, server.url_for(REMOVED_TOKEN))
    code, out, err = run_cli(capsys, "test-notify", "-c", str(config))
    assert code == 1
    assert out.startswith("feishu: NOT accepted: ")
    assert what_to_change in out
    assert len(server.exchanges) == 1 and not server.accepted
    assert_no_secrets(out, err, state_log(config))
