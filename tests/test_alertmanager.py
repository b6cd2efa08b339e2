"""The Alertmanager channel: its payload (labels, annotations, times), its config and ``check`` line,
its posts (to a local HTTP server, and to a real Alertmanager where one is installed), its re-posts,
and the daemon's routing (alerts only: never a report nor a notice).

The end-to-end case, two daemons behind a real Alertmanager, is tests/test_alertmanager_e2e.py.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from alertmanager import Alertmanager, Receiver, alertmanager_path, free_port, missing_reason
from gpuwatch.cli import main
from gpuwatch.cli.preflight import channel_findings
from gpuwatch.config.load import parse_config
from gpuwatch.config.values import ConfigError
from gpuwatch.daemon import Daemon
from gpuwatch.message import Message
from gpuwatch.notify.alertmanager import (
    AlertmanagerChannel,
    AlertmanagerSettings,
    Resender,
    alerts_endpoint,
    build,
)
from gpuwatch.notify.base import DeliveryError
from gpuwatch.notify.spec import Transport
from gpuwatch.report import alert_message, firing_alerts
from gpuwatch.rules import FLEET, AlertKey, AlertRecord, Memory, Notice, NoticeKind, Transition
from gpuwatch.store import AlertStore, Outbox, open_db
from waiting import wait_for

T0 = 1_765_000_000.0  # 2025-12-06T05:46:40Z
STARTED = "2025-12-06T05:46:40+00:00"


def record(key: AlertKey, fired_at: float = T0, since: float = T0 - 120, **facts: Any) -> AlertRecord:
    value, threshold, unit = (3.0, 2.0, "GPUs") if key.rule == "max_gpus_per_user" else (5.0, 3.0, "polls")
    if key.rule == "host_down":
        facts = {"error": "connection refused", "error_kind": "unreachable", **facts}
    return AlertRecord(key, "firing", since, value, threshold, unit, facts or {"gpus": [0, 1, 2]}, fired_at, fired_at)


ALICE = AlertKey("max_gpus_per_user", "gpu-a", user="alice")
DOWN = AlertKey("host_down", "gpu-b")
FLEET_WIDE = AlertKey("max_gpus_per_user_fleet", FLEET, user="bob")


def channel(urls: tuple[str, ...] = ("http://127.0.0.1:9/",), clock: float = T0 + 60, **settings: Any) -> Any:
    no_wait = Transport(sleep=lambda seconds: None)  # no backoff between attempts
    return AlertmanagerChannel(AlertmanagerSettings(urls=urls, **settings), no_wait, clock=lambda: clock)


# ---------------------------------------------------------------- the payload


def test_an_alert_message_becomes_one_post_of_its_alerts_labelled_by_identity_only() -> None:
    transitions = [
        Transition("firing", record(ALICE), T0 + 60),
        Transition("resolved", record(DOWN, fired_at=T0 - 600), T0),
    ]
    message = alert_message(transitions, [], {})
    assert message is not None
    (payload,) = channel(labels={"site": "lab-3"}).prepare(message)
    firing, resolved = payload["alerts"]
    assert firing["labels"] == {
        "site": "lab-3",
        "alertname": "max_gpus_per_user",
        "host": "gpu-a",
        "user": "alice",
        "severity": "warning",
        "alert_id": "max_gpus_per_user|gpu-a||alice||",
    }
    assert firing["startsAt"] == STARTED and "endsAt" not in firing  # set when posted
    # the words of the chat message
    summary = firing["annotations"]["summary"]
    assert summary and any(summary in block for block in message.blocks)
    assert firing["annotations"]["description"] == f"{summary}\nnow: 3 GPUs; threshold: at most 2 per host"
    assert resolved["labels"]["severity"] == "critical" and resolved["labels"]["host"] == "gpu-b"
    assert resolved["startsAt"] == "2025-12-06T05:36:40+00:00" and resolved["endsAt"] == STARTED
    assert resolved["annotations"]["description"].startswith("was: gpu-b has not answered for 5 polls")
    assert "generatorURL" not in firing


def test_two_daemons_label_the_same_alert_alike_whatever_their_times_and_readings() -> None:
    """Two HA daemons saw the condition start at different polls and read different values: their
    posts differ in times and words, never in labels (Alertmanager's fingerprint)."""
    one = alert_message([Transition("firing", record(ALICE), T0)], [], {})
    other_record = AlertRecord(ALICE, "firing", T0 - 7, 4.0, 2.0, "GPUs", {"gpus": [0, 1, 2, 3]}, T0 + 3, T0 + 3)
    two = alert_message([Transition("firing", other_record, T0 + 3)], [], {})
    assert one is not None and two is not None
    (first,) = channel().prepare(one)[0]["alerts"]
    (second,) = channel().prepare(two)[0]["alerts"]
    assert first["labels"] == second["labels"]
    assert first["startsAt"] != second["startsAt"] and first["annotations"] != second["annotations"]


def test_a_fleet_wide_alert_has_no_host_label_and_severity_is_configurable() -> None:
    message = alert_message([Transition("firing", record(FLEET_WIDE), T0)], [], {})
    assert message is not None
    ch = channel(severity={"default": "info", "host_down": "page"})
    (alert,) = ch.prepare(message)[0]["alerts"]
    assert "host" not in alert["labels"] and alert["labels"]["user"] == "bob"
    assert alert["labels"]["severity"] == "info"
    assert ch.settings.severity_of("host_down") == "page" and ch.settings.severity_of("gpu_error") == "critical"


def test_reports_and_notices_are_not_alerts_and_test_notify_posts_a_test_alert() -> None:
    ch = channel()
    assert ch.prepare(Message(title="GPU overview", blocks=("gpu-a: 4 free",))) == []
    notice = Notice(NoticeKind.GPU_FREE, "gpu-a", ("alice",), gpu=0, facts={"gpus": [0]})
    notice_only = alert_message([], [notice], {})
    assert notice_only is not None and notice_only.alerts == () and ch.prepare(notice_only) == []
    # a notice beside an alert: only the alert is posted
    both = alert_message([Transition("firing", record(ALICE), T0)], [notice], {})
    assert both is not None and len(ch.prepare(both)[0]["alerts"]) == 1
    test = Message(title="gpuwatch test message", blocks=("hi",), kind="test", link="https://gpu.lab.example/")
    (alert,) = ch.prepare(test)[0]["alerts"]
    assert alert["labels"] == {"alertname": "gpuwatch_test", "severity": "none"}
    assert alert["startsAt"] == "2025-12-06T05:47:40+00:00" and alert["endsAt"] == "2025-12-06T05:52:40+00:00"
    assert alert["generatorURL"] == "https://gpu.lab.example/"


def test_the_endpoint_is_the_v2_alerts_api_under_any_path_prefix() -> None:
    assert alerts_endpoint("http://am:9093") == "http://am:9093/api/v2/alerts"
    assert alerts_endpoint("https://ops.example/alertmanager/") == "https://ops.example/alertmanager/api/v2/alerts"
    assert alerts_endpoint("http://am:9093/api/v2/alerts") == "http://am:9093/api/v2/alerts"


# ---------------------------------------------------------------- config and check


def config_with(tmp_path: Path, section: object) -> Any:
    return parse_config({"hosts": ["a"], "alertmanager": section}, tmp_path / "config.yaml")


@pytest.mark.parametrize(
    ("section", "error"),
    [
        ({}, r"^alertmanager: needs 'url'"),
        ({"url": "am:9093"}, r"^alertmanager\.url: expected an http\(s\)://"),
        ({"urls": []}, r"^alertmanager\.urls: expected a list"),
        ({"urls": ["http://a:9093", 5]}, r"^alertmanager\.urls\[1\]: expected an http"),
        ({"url": "http://a:9093", "resend_every": "0s"}, r"^alertmanager\.resend_every: must be longer than 0s"),
        ({"url": "http://a:9093", "username": "gw"}, r"^alertmanager: username and password_env go together"),
        ({"url": "http://a:9093", "labels": {"host": "x"}}, r"^alertmanager\.labels: host is set by gpuwatch"),
        ({"url": "http://a:9093", "sevrity": {}}, r"^alertmanager\.sevrity: unknown key; did you mean 'severity'"),
    ],
)
def test_config_mistakes_name_their_key(tmp_path: Path, section: object, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        config_with(tmp_path, section)


def test_check_says_where_it_posts_and_that_it_takes_alerts_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = config_with(
        tmp_path,
        {
            "url": "http://am1:9093",
            "urls": ["http://am2:9093"],
            "bearer_token_env": "GW_AM_TOKEN",
            "resend_every": "30s",
        },
    )
    assert config.channels["alertmanager"].urls == ("http://am1:9093", "http://am2:9093")
    monkeypatch.delenv("GW_AM_TOKEN", raising=False)
    (line,) = channel_findings(config)
    assert (line.subject, line.ok) == ("alertmanager", False)
    assert line.detail == "alertmanager.bearer_token_env: $GW_AM_TOKEN is not set in the environment"
    monkeypatch.setenv("GW_AM_TOKEN", "am-token-0123456789")
    (line,) = channel_findings(config)
    assert line.ok and line.line() == (
        "alertmanager: OK: 2 Alertmanagers (http://am1:9093, http://am2:9093), bearer token; alerts only "
        "(reports and notices are not sent there); firing alerts re-posted every 30s, each good for 2m"
    )
    assert "am-token" not in repr(config.channels["alertmanager"])


# ---------------------------------------------------------------- posting


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as server:
        yield server


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}/"  # nothing listens there: connection refused


def test_a_post_carries_the_alerts_their_lease_and_the_credentials(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GW_AM_PASSWORD", "s3cret-pass")
    settings = AlertmanagerSettings(urls=(receiver.url,), username="gw", password_env="GW_AM_PASSWORD")
    ch = build(settings, Transport(sleep=lambda s: None))
    message = alert_message([Transition("firing", record(ALICE), T0)], [], {})
    assert message is not None
    before = time.time()
    for payload in ch.prepare(message):
        ch.deliver(payload)
    ((path, headers),) = receiver.requests
    assert path == "/api/v2/alerts"
    assert headers["Authorization"] == "Basic Z3c6czNjcmV0LXBhc3M="  # gw:s3cret-pass
    (alert,) = receiver.notifications[0]
    ends = datetime.fromisoformat(alert["endsAt"]).timestamp()
    assert before + 240 - 1 <= ends <= time.time() + 240  # 4 x resend_every (1m) ahead


def test_one_alertmanager_accepting_is_enough_none_is_a_failure(receiver: Receiver) -> None:
    message = alert_message([Transition("firing", record(ALICE), T0)], [], {})
    assert message is not None
    ch = channel((dead_url(), receiver.url), timeout_seconds=2)
    (payload,) = ch.prepare(message)
    ch.deliver(payload)  # the first is down; the second has it
    assert len(receiver.notifications) == 1
    ch = channel((dead_url(), dead_url()), timeout_seconds=2)
    with pytest.raises(DeliveryError, match=r"^alertmanager http://127\.0\.0\.1:\d+/api/v2/alerts: not accepted"):
        ch.deliver(payload)


def test_a_refused_alert_list_is_that_message_only(receiver: Receiver) -> None:
    receiver.status = 400
    ch = channel((receiver.url,))
    with pytest.raises(DeliveryError) as caught:
        ch.deliver({"alerts": [{"labels": {}}]})
    assert caught.value.message_fault and caught.value.permanent
    assert "Alertmanager refused these alerts" in str(caught.value)


def test_the_resender_posts_the_firing_set_every_resend_every(receiver: Receiver) -> None:
    ch = channel((receiver.url,), resend_every_seconds=30)
    firing = {"now": firing_alerts([record(ALICE), record(DOWN)], T0, lambda rule: rule != "host_down")}
    clock = [100.0]
    channels: dict[str, Any] = {"alertmanager": ch, "feishu": object()}  # only Alertmanager channels re-post
    resender = Resender(lambda: channels, lambda name: firing["now"], monotonic=lambda: clock[0])
    resender.tick()
    assert [a["labels"]["alertname"] for a in receiver.notifications[0]] == ["max_gpus_per_user"]  # routed
    clock[0] += 29
    resender.tick()
    assert len(receiver.notifications) == 1  # not due yet
    clock[0] += 1
    firing["now"] = None  # resolved since: nothing to post
    resender.tick()
    assert len(receiver.notifications) == 1


def test_a_resend_never_lands_after_a_resolution_posted_meanwhile(receiver: Receiver) -> None:
    """The re-post reads the firing set only once it holds the channel: a resolution posted while
    it waits goes first, and the re-post then finds the alert no longer firing."""
    ch = channel((receiver.url,))
    state = {"firing": True}
    message = alert_message([Transition("resolved", record(ALICE), T0 + 60)], [], {})
    assert message is not None
    (resolution,) = ch.prepare(message)

    def read() -> Message | None:
        return firing_alerts([record(ALICE)], T0, lambda rule: True) if state["firing"] else None

    with ch._lock:  # a post in flight
        resend = threading.Thread(target=ch.resend, args=(read, 0.0))
        resend.start()
        time.sleep(0.2)
        state["firing"] = False  # the alert resolves; its resolution is queued ...
        deliver = threading.Thread(target=ch.deliver, args=(resolution,))
        deliver.start()
    resend.join(10)
    deliver.join(10)
    # whichever got the channel first, Alertmanager got one post: the resolution
    ((alert,),) = receiver.notifications
    assert alert["labels"]["alertname"] == "max_gpus_per_user"
    assert datetime.fromisoformat(alert["endsAt"]).timestamp() == T0 + 60


# ---------------------------------------------------------------- a real Alertmanager


@pytest.fixture
def real_alertmanager(tmp_path: Path, receiver: Receiver) -> Iterator[Alertmanager]:
    if alertmanager_path() is None:
        pytest.skip(missing_reason())
    with Alertmanager(tmp_path / "am", receiver) as am:
        yield am


def test_a_real_alertmanager_takes_every_shape_gpuwatch_posts(real_alertmanager: Alertmanager) -> None:
    now = time.time()
    ch = channel((real_alertmanager.url,), clock=now)
    transitions = [
        Transition("firing", record(ALICE, fired_at=now - 30), now),
        Transition("firing", record(FLEET_WIDE, fired_at=now - 30), now),
        Transition("resolved", record(DOWN, fired_at=now - 90), now - 1),
    ]
    message = alert_message(transitions, [], {})
    assert message is not None
    for payload in [*ch.prepare(message), *ch.prepare(Message(title="t", blocks=(), kind="test"))]:
        ch.deliver(payload)
    held = {a["labels"]["alertname"]: a for a in real_alertmanager.alerts()}
    assert {"max_gpus_per_user", "max_gpus_per_user_fleet", "gpuwatch_test"} <= set(held)
    assert held["max_gpus_per_user"]["status"]["state"] == "active"
    assert held["max_gpus_per_user"]["annotations"]["summary"] == message.alerts[0].summary


# ---------------------------------------------------------------- the daemon's routing


def test_once_posts_alerts_never_reports_and_a_later_run_posts_the_firing_set_again(
    tmp_path: Path, local_standin: Path, receiver: Receiver, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = {
        "hosts": ["localhost"],
        "state_dir": str(tmp_path / "state"),
        "alertmanager": {"url": receiver.url},
        "schedule": {"poll_every": "1s", "reports": [{"report": "overview", "every": "1h"}]},
        "alerts": {"temperature_above": 50, "gpu_freed": {"users": ["alice"]}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    out = io.StringIO()
    assert main(["run", "--once", "-c", str(path)], out=out) == 0, capsys.readouterr().err
    # the overview is not made: Alertmanager takes alerts only
    log = (tmp_path / "state" / "gpuwatch.log").read_text(encoding="utf-8")
    assert "alertmanager takes alerts only: the reports in schedule.reports (overview every 1h) are not made" in log
    assert all(isinstance(body, list) for body in receiver.notifications)
    posted = [a["labels"] for body in receiver.notifications for a in body]
    assert posted and {p["alertname"] for p in posted} == {"temperature_above"}
    assert {(p["host"], p["gpu"]) for p in posted} == {("localhost", "0")}
    first = len(receiver.notifications)  # the firing post, and the run's re-post of what fires
    assert first == 2

    assert main(["run", "--once", "-c", str(path)], out=out) == 0
    assert len(receiver.notifications) == first + 1  # no news: only the re-post of what still fires
    (again,) = receiver.notifications[-1]
    assert again["labels"] == posted[0] and again["startsAt"] == receiver.notifications[0][0]["startsAt"]

    assert main(["test-notify", "-c", str(path)], out=out) == 0
    assert out.getvalue().endswith("alertmanager: accepted\n")
    assert receiver.notifications[-1][0]["labels"]["alertname"] == "gpuwatch_test"


@pytest.mark.slow
def test_re_posts_keep_an_alert_firing_past_its_lease_and_it_ends_by_itself_once_they_stop(
    real_alertmanager: Alertmanager, receiver: Receiver
) -> None:
    """resend_every 1s: each post is good for 4 s. While the resender runs the alert stays firing
    well past that; once gpuwatch stops, Alertmanager resolves it by itself and says so."""
    ch = AlertmanagerChannel(
        AlertmanagerSettings(urls=(real_alertmanager.url,), resend_every_seconds=1), Transport(sleep=lambda s: None)
    )
    now = time.time()
    firing = firing_alerts([record(ALICE, fired_at=now)], now, lambda rule: True)
    resender = Resender(lambda: {"alertmanager": ch}, lambda name: firing, tick_seconds=0.2)
    resender.start()
    try:
        wait_for(lambda: bool(receiver.alerts("firing")), 20, "the firing notification")
        time.sleep(7)  # longer than one post's lease
        assert [a["status"]["state"] for a in real_alertmanager.alerts()] == ["active"]
        assert not receiver.alerts("resolved")
    finally:
        resender.stop()
    wait_for(lambda: bool(receiver.alerts("resolved")), 20, "Alertmanager resolving it by itself")
    assert len(receiver.alerts("firing")) == 1


def test_the_daemon_sends_alertmanager_no_report_nor_notice_and_re_posts_what_was_announced() -> None:
    doc = {
        "hosts": ["gpu-a", "gpu-b"],
        "alertmanager": {"url": dead_url()},
        "alerts": {"host_down": True, "max_gpus_per_user": 2, "routes": {"max_gpus_per_user": ["alertmanager"]}},
    }
    config = parse_config(doc)
    db = open_db(None)
    store = AlertStore(db)
    daemon = Daemon(config, None, Outbox(db), {"alertmanager": channel()}, alert_store=store)  # type: ignore[arg-type]
    assert daemon.report_channels() == []  # the only channel takes alerts only: the report goes nowhere
    notice = alert_message([], [Notice(NoticeKind.GPU_FREE, "gpu-a", ("alice",), gpu=0, facts={"gpus": [0]})], {})
    assert notice is not None
    daemon.enqueue(notice)
    assert daemon.outbox.count() == 0  # nothing for Alertmanager in a notice: nothing queued

    pending = AlertRecord(DOWN, "pending", T0)
    held_back = replace(record(AlertKey("max_gpus_per_user", "gpu-b", user="bob")), last_sent_at=None)  # silenced
    store.save({r.key.id: r for r in (record(ALICE), pending, held_back)}, Memory(), T0)
    firing = daemon.firing_for("alertmanager")
    assert firing is not None and [a.id for a in firing.alerts] == [ALICE.id]
    assert daemon.firing_for("feishu") is None  # not routed there
    db.close()
