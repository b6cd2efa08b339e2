"""DingTalk, WeCom, Slack, the generic webhook and the designed Feishu card, against local receivers
that behave like each platform (tests/fakechat.py, tests/fakefeishu.py): real HTTP to 127.0.0.1,
nothing in requests mocked. Reports are built from real nvidia-smi captures (tests/test_rules.py's
builders). Time is faked where waiting would make the suite slow (retries, rate limiters).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import pytest
import requests

from builders import DAY, T0, Engine, FakeTime, Job, alerts_config, alice, down, h100_host, l40s_host
from fakechat import FakeDingTalk, FakeReceiver, FakeSlack, FakeWeCom, dingtalk_sign
from fakefeishu import FakeFeishu, card_problems, seen
from fakehook import FakeHook, Rendered, render_markdown
from gpuwatch.config import ConfigError, FreeGpuConfig
from gpuwatch.config.load import parse_config
from gpuwatch.message import Message
from gpuwatch.model import FleetSnapshot
from gpuwatch.notify import dingtalk, feishu_card
from gpuwatch.notify.base import DeliveryError
from gpuwatch.notify.delivery import flush
from gpuwatch.notify.dingtalk import DingTalkChannel, DingTalkSettings
from gpuwatch.notify.feishu import FeishuChannel, FeishuSettings
from gpuwatch.notify.http import WebhookChannel
from gpuwatch.notify.registry import CHANNELS, channel_spec
from gpuwatch.notify.slack import SlackChannel, SlackSettings
from gpuwatch.notify.webhook import WebhookJsonChannel, WebhookSettings
from gpuwatch.notify.wecom import WeComChannel, WeComSettings
from gpuwatch.report import alert_message, free_report, overview, user_report
from gpuwatch.store import Outbox, open_db

KEYWORD = "GPU"
SECRET = "SEC7f3a9c0e5b-signing-secret-for-tests"
#: A command line that is markup in every chat platform: bold, a link, a mention of everyone, italics.
HOSTILE = "train.py --lr *3e-4* [x](http://a) <at id=all></at> _b_"
UTC = timezone.utc


# ---------------------------------------------------------------------- one kit per channel


@dataclass(frozen=True)
class Kit:
    """A channel and the receiver that behaves like its platform."""

    name: str
    server: Callable[[FakeTime], FakeHook]
    channel: Callable[..., WebhookChannel]  # (url, session, clock, **settings overrides)
    seen: Callable[[dict[str, Any]], Rendered]


def _feishu(fmt: str) -> Kit:
    def channel(url: str, session: requests.Session, clock: FakeTime, **o: Any) -> WebhookChannel:
        settings = FeishuSettings(url=url, keyword=KEYWORD, secret=SECRET, format=fmt, **o)
        return FeishuChannel(settings, session=session, clock=clock.time, monotonic=clock.monotonic, sleep=clock.sleep)

    return Kit(
        f"feishu-{fmt}",
        lambda clock: FakeFeishu(keywords=[KEYWORD], secret=SECRET, monotonic=clock.monotonic),
        channel,
        seen,
    )


def _dingtalk_channel(url: str, session: requests.Session, clock: FakeTime, **o: Any) -> WebhookChannel:
    settings = DingTalkSettings(url=url, secret=SECRET, keyword=KEYWORD, **o)
    return DingTalkChannel(settings, session=session, clock=clock.time, monotonic=clock.monotonic, sleep=clock.sleep)


def _wecom(fmt: str) -> Kit:
    def channel(url: str, session: requests.Session, clock: FakeTime, **o: Any) -> WebhookChannel:
        settings = WeComSettings(url=url, format=fmt, **o)
        return WeComChannel(settings, session=session, clock=clock.time, monotonic=clock.monotonic, sleep=clock.sleep)

    return Kit(f"wecom-{fmt}", lambda clock: FakeWeCom(monotonic=clock.monotonic), channel, FakeWeCom.seen)


def _slack_channel(url: str, session: requests.Session, clock: FakeTime, **o: Any) -> WebhookChannel:
    settings = SlackSettings(url=url, **o)
    return SlackChannel(settings, session=session, clock=clock.time, monotonic=clock.monotonic, sleep=clock.sleep)


def _webhook_channel(url: str, session: requests.Session, clock: FakeTime, **o: Any) -> WebhookChannel:
    settings = WebhookSettings(url=url, **o)
    return WebhookJsonChannel(settings, session=session, clock=clock.time, monotonic=clock.monotonic, sleep=clock.sleep)


def _webhook_seen(body: dict[str, Any]) -> Rendered:
    return Rendered(str(body["text"]), tuple(body.get("mentions", [])), (), ())


KITS = {
    kit.name: kit
    for kit in (
        _feishu("card"),
        _feishu("post"),
        _feishu("text"),
        Kit(
            "dingtalk",
            lambda clock: FakeDingTalk(keywords=[KEYWORD], secret=SECRET, monotonic=clock.monotonic),
            _dingtalk_channel,
            FakeDingTalk.seen,
        ),
        _wecom("markdown"),
        _wecom("text"),
        Kit("slack", lambda clock: FakeSlack(monotonic=clock.monotonic), _slack_channel, FakeSlack.seen),
        Kit("webhook", lambda clock: FakeReceiver(monotonic=clock.monotonic), _webhook_channel, _webhook_seen),
    )
}
NEW_KITS = ["dingtalk", "wecom-markdown", "wecom-text", "slack", "webhook"]


@pytest.fixture
def clock() -> FakeTime:
    return FakeTime()


@pytest.fixture
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        s.trust_env = False  # loopback only, never a proxy from the environment
        yield s


def start(kit: Kit, clock: FakeTime) -> FakeHook:
    return kit.server(clock).start()


def send(channel: WebhookChannel, message: Message) -> list[dict[str, Any]]:
    payloads = channel.prepare(message)  # type: ignore[attr-defined]
    for payload in payloads:
        channel.deliver(payload)
    return payloads


def fleet() -> FleetSnapshot:
    """gpu-a (4 H100, alice on 0-1), gpu-b (an L40S), gpu-c that did not answer."""
    hosts = (h100_host("gpu-a", alice([0, 1])), l40s_host("gpu-b"), down("gpu-c"))
    return FleetSnapshot(datetime.fromtimestamp(T0, UTC), hosts)


def big_fleet(count: int = 60) -> FleetSnapshot:
    hosts = tuple(
        h100_host(f"node{i:03d}", alice(range(i % 8), first_pid=4100 + 10 * i), n_gpus=8) for i in range(count)
    )
    return FleetSnapshot(datetime.fromtimestamp(T0, UTC), hosts)


def hostile_alert() -> Message:
    job = Job("alice", 4100, 0, int(3 * DAY) + 1, HOSTILE)
    transitions = Engine(alerts_config(max_runtime="72h")).step(T0, h100_host("gpu-a", [job]))
    message = alert_message(transitions, [], {}, tz=UTC)
    assert message is not None
    return message


# ---------------------------------------------------------------------- what every channel must do


@pytest.mark.parametrize("name", list(KITS))
def test_an_overview_is_delivered_with_every_host(name: str, clock: FakeTime, session: requests.Session) -> None:
    kit = KITS[name]
    with start(kit, clock) as server:
        send(
            kit.channel(server.url, session, clock),
            replace(overview(fleet(), FreeGpuConfig()), link="https://gpu.lab.example/"),
        )
        assert server.codes and set(server.codes) == {0}, server.exchanges[-1].reason
        shown = "\n".join(kit.seen(body).text for body in server.accepted)
    for host in ("gpu-a", "gpu-b", "gpu-c"):
        assert host in shown
    assert "connection refused by gpu-c:22" in shown  # the host without data says why


@pytest.mark.parametrize("name", list(KITS))
@pytest.mark.parametrize("what", ["alert", "user report"])
def test_a_command_full_of_markup_shows_as_written_and_mentions_no_one(
    name: str, what: str, clock: FakeTime, session: requests.Session
) -> None:
    kit = KITS[name]
    if what == "alert":
        message = hostile_alert()
    else:
        host = h100_host("gpu-a", [Job("alice", 4100, 0, 600, HOSTILE)])
        message = user_report(FleetSnapshot(datetime.fromtimestamp(T0, UTC), (host,)), "alice")
    with start(kit, clock) as server:
        send(kit.channel(server.url, session, clock), message)
        assert set(server.codes) == {0}
        views = [kit.seen(body) for body in server.accepted]
    assert any(HOSTILE in view.text for view in views)  # as written: no bold, no link, no tag eaten
    for view in views:
        assert view.mentions == ()  # and no one mentioned, least of all everyone
        assert "http://a" not in view.links
        assert not any("3e-4" in e or e == "b" for e in view.emphasis)


def test_the_reader_model_would_catch_unescaped_markup() -> None:
    """The check above can fail: the same command, not escaped, is bold, a link and a mention."""
    raw = render_markdown(HOSTILE, __import__("re").compile(r"<at\s+id=([^>\s]*)\s*>"))
    assert raw.mentions == ("all",) and "http://a" in raw.links and "3e-4" in raw.emphasis
    assert HOSTILE not in raw.text


@pytest.mark.parametrize("name", list(KITS))
def test_exactly_once_across_an_outage(name: str, clock: FakeTime, session: requests.Session, tmp_path: Path) -> None:
    kit = KITS[name]
    with start(kit, clock) as server:
        channel = kit.channel(server.url, session, clock)
        outbox = Outbox(open_db(tmp_path / "state"))
        message = overview(fleet(), FreeGpuConfig())
        outbox.add(name, message.title, channel.prepare(message))  # type: ignore[attr-defined]
        server.always(503)  # the platform is down
        assert not flush(outbox, {name: channel}).ok
        assert outbox.count() > 0 and not server.accepted
        assert len(server.exchanges) == 5  # tried with backoff, then kept for the next cycle

        server.always(None)
        server.reset()
        first = flush(outbox, {name: channel})
        again = flush(outbox, {name: channel})
        outbox.db.close()
    assert first.ok and first.sent >= 1 and again.sent == 0
    assert len(server.exchanges) == len(server.accepted) == first.sent  # each part once, none twice


@pytest.mark.parametrize("name", NEW_KITS)
def test_transient_failures_are_retried(name: str, clock: FakeTime, session: requests.Session) -> None:
    kit = KITS[name]
    with start(kit, clock) as server:
        server.fail_next([500, 502])
        send(kit.channel(server.url, session, clock), Message(title="GPU report", blocks=("node01 idle",)))
        assert [e.status for e in server.exchanges] == [500, 502, 200]
        assert len(server.accepted) == 1


# ---------------------------------------------------------------------- splitting at each platform's limit


def _hosts_in(text: str, names: list[str]) -> list[str]:
    return [n for n in names if f"{n} " in text or f"{n}\n" in text or text.endswith(n)]


@pytest.mark.parametrize("name", list(KITS))
def test_a_big_overview_is_split_at_the_limit_every_host_once(
    name: str, clock: FakeTime, session: requests.Session
) -> None:
    kit = KITS[name]
    snapshot = big_fleet()
    names = [h.name for h in snapshot.hosts]
    message = overview(snapshot, FreeGpuConfig())
    with start(kit, clock) as server:
        payloads = send(kit.channel(server.url, session, clock), message)
        assert len(payloads) >= 2 and set(server.codes) == {0}
        bodies = server.accepted
        raws = server.accepted_raw
    total = len(bodies)
    for index, (body, raw) in enumerate(zip(bodies, raws), start=1):
        assert f"({index}/{total})" in kit.seen(body).text  # numbered parts
        if name.startswith("feishu") or name in ("dingtalk", "webhook"):
            assert len(raw) <= 20_000
        if name == "feishu-card":
            assert card_problems(body["card"]) == [] and feishu_card.components(body["card"]) <= 200
        if name == "wecom-markdown":
            assert len(body["markdown"]["content"].encode()) <= 4096
        if name == "wecom-text":
            assert len(body["text"]["content"].encode()) <= 2048
        if name == "slack":
            assert len(body["blocks"]) <= 50
            assert all(len(b["text"]["text"]) <= 3000 for b in body["blocks"] if b["type"] == "section")
    shown = [kit.seen(body).text for body in bodies]
    for host in names:  # every host whole, in exactly one part
        assert sum(1 for text in shown if f"{host}\n" in text or f"{host} " in text) == 1, host


# ---------------------------------------------------------------------- the designed Feishu card


def card_of(message: Message, **overrides: Any) -> list[dict[str, Any]]:
    channel = FeishuChannel(
        FeishuSettings(url="http://127.0.0.1:9/open-apis/bot/v2/hook/tok", keyword=KEYWORD, format="card", **overrides)
    )
    return [p["card"] for p in channel.prepare(message)]


def test_the_overview_card_reads_at_a_glance() -> None:
    message = replace(overview(fleet(), FreeGpuConfig()), link="https://gpu.lab.example/gpuwatch/")
    (card,) = card_of(message)
    assert card_problems(card) == []
    assert card["schema"] == "2.0"
    header = card["header"]
    assert header["template"] == "red"  # a host did not answer
    assert header["subtitle"]["content"] == "3 hosts, 1 down, 5 GPUs, 2 free"
    assert [t["text"]["content"] for t in header["text_tag_list"]] == ["2 free", "1 down"]
    elements = card["body"]["elements"]
    # the host without data first, on a red band, with its reason
    assert elements[0]["tag"] == "column_set" and elements[0]["background_style"] == "red-50"
    assert "gpu&#45;c" in json.dumps(elements[0], ensure_ascii=False)
    # then each host: name in bold, a line per GPU with bars; free GPUs in green
    gpu_a = elements[1]["content"]
    assert gpu_a.startswith("**gpu&#45;a**")
    lines = gpu_a.split("<br>")
    assert len(lines) == 5
    assert lines[1].startswith("**0** · util ▰▰▰▰▰▰▰▰▰▰ 100&#37;".replace("&#37;", "%"))
    assert lines[3].startswith("<font color='green'>**2**") and lines[3].endswith("free</font>")
    # and a button to the page
    button = elements[-1]
    assert button["tag"] == "button"
    assert button["behaviors"] == [{"type": "open_url", "default_url": "https://gpu.lab.example/gpuwatch/"}]


def test_alert_and_free_cards_are_valid_and_coloured() -> None:
    (alert,) = card_of(replace(hostile_alert(), mentions=("ou_alice",)))
    assert card_problems(alert) == []
    assert alert["header"]["template"] == "red"
    first, band = alert["body"]["elements"][:2]
    assert first == {"tag": "markdown", "content": "<at id=ou_alice></at>"}
    assert band["background_style"] == "red-50"
    (free,) = card_of(free_report(fleet(), FreeGpuConfig()))
    assert card_problems(free) == [] and free["header"]["template"] == "green"


def test_the_card_check_follows_the_documented_schema() -> None:
    (card,) = card_of(overview(fleet(), FreeGpuConfig()))
    assert card_problems(card) == []
    broken = json.loads(json.dumps(card))
    broken["body"]["elements"][0]["colour"] = "red"  # 2.0 rejects properties it does not know
    broken["header"]["template"] = "pink"
    broken["body"]["elements"].append({"tag": "action", "actions": []})  # 1.0's button module
    problems = card_problems(broken)
    assert any("unknown property" in p for p in problems)
    assert any("template" in p for p in problems)
    assert any("unsupported tag 'action'" in p for p in problems)


def test_a_card_the_schema_refuses_is_explained_and_kept_apart(clock: FakeTime, session: requests.Session) -> None:
    with FakeFeishu(keywords=[KEYWORD]) as server:
        channel = FeishuChannel(FeishuSettings(url=server.url, keyword=KEYWORD, format="card"), session=session)
        (payload,) = channel.prepare(overview(fleet(), FreeGpuConfig()))
        payload["card"]["body"]["elements"][0]["colour"] = "red"
        with pytest.raises(DeliveryError) as caught:
            channel.deliver(payload)
    assert server.codes == [11246]
    assert caught.value.permanent and caught.value.message_fault  # this message only; later ones still go
    assert "card refused" in str(caught.value) and "format: post avoids cards" in str(caught.value)


def test_the_card_preview_draws_every_host(tmp_path: Path) -> None:
    from cardpreview import page

    (card,) = card_of(replace(overview(fleet(), FreeGpuConfig()), link="https://gpu.lab.example/"))
    drawn = __import__("html").unescape(page([card]))  # as the browser shows it
    for text in ("gpu-a", "gpu-b", "gpu-c", "Open the GPU page", "unsupported component"):
        assert (text in drawn) is (text != "unsupported component")


# ---------------------------------------------------------------------- DingTalk


def test_dingtalk_signature_is_fresh_for_every_attempt_and_url_encoded(
    clock: FakeTime, session: requests.Session
) -> None:
    with FakeDingTalk(keywords=[KEYWORD], secret=SECRET) as server:
        channel = _dingtalk_channel(server.url, session, clock)
        server.fail_next([500])
        send(channel, Message(title="GPU report", blocks=("node01 idle",)))
        first, second = server.exchanges
    assert second.accepted
    stamps = [e.query["timestamp"] for e in (first, second)]
    assert stamps[0] != stamps[1] and all(len(s) == 13 for s in stamps)  # milliseconds, a new one per attempt
    for exchange in (first, second):
        assert exchange.query["sign"] == dingtalk_sign(SECRET, exchange.query["timestamp"])
    # The signature is base64: its +, / and = are URL-encoded in the query, as DingTalk requires.
    ts = next(t for t in range(1_700_000_000_000, 1_700_000_001_000) if "+" in dingtalk_sign(SECRET, t))
    assert dingtalk.sign(SECRET, ts) == quote_plus(dingtalk_sign(SECRET, ts)) and "%2B" in dingtalk.sign(SECRET, ts)


@pytest.mark.parametrize(
    ("setup", "words"),
    [
        ({"secret": "SECnot-the-robots-secret"}, "signature rejected (310000)"),
        ({"keyword": None, "title": "report"}, "keyword missing (310000): set dingtalk.keyword"),
        ({"skew": 7200.0}, "timestamp refused (310000)"),
        ({"ip": True}, "IP not allowed (310000)"),
        ({"token": "removed"}, "invalid access_token (300001)"),
    ],
)
def test_dingtalk_refusals_say_which_setting_to_fix(
    setup: dict[str, Any], words: str, clock: FakeTime, session: requests.Session, caplog: pytest.LogCaptureFixture
) -> None:
    allowed = ["10.9.9.9"] if setup.get("ip") else None
    with FakeDingTalk(keywords=[KEYWORD], secret=SECRET, allowed_ips=allowed) as server:
        url = server.url_for(setup["token"]) if "token" in setup else server.url
        settings = DingTalkSettings(url=url, secret=setup.get("secret", SECRET), keyword=setup.get("keyword", KEYWORD))
        skew = setup.get("skew", 0.0)
        channel = DingTalkChannel(
            settings, session=session, clock=lambda: clock.time() + skew, monotonic=clock.monotonic, sleep=clock.sleep
        )
        message = Message(title=setup.get("title", "GPU report"), blocks=("node01 idle",))
        with pytest.raises(DeliveryError) as caught:
            send(channel, message)
    assert words in str(caught.value)
    assert caught.value.permanent and len(server.exchanges) == 1  # not hammered
    for text in (str(caught.value), caplog.text):
        assert server.token not in text and SECRET not in text


def test_dingtalk_rate_limit_leaves_the_message_for_later(clock: FakeTime, session: requests.Session) -> None:
    with FakeDingTalk(keywords=[KEYWORD], secret=SECRET) as server:
        server.fail_next([130101])
        with pytest.raises(DeliveryError) as caught:
            send(_dingtalk_channel(server.url, session, clock), Message(title="GPU report", blocks=("x",)))
    assert not caught.value.permanent and len(server.exchanges) == 1
    assert "holds its messages for 10 minutes" in str(caught.value)


def test_dingtalk_keeps_under_20_a_minute(clock: FakeTime, session: requests.Session) -> None:
    with FakeDingTalk(keywords=[KEYWORD], secret=SECRET, monotonic=clock.monotonic) as server:
        channel = _dingtalk_channel(server.url, session, clock)
        for i in range(25):
            send(channel, Message(title=f"GPU report {i}", blocks=("x",)))
    assert set(server.codes) == {0} and len(server.accepted) == 25
    assert sum(clock.sleeps) >= 60  # the 21st waited for the minute to pass


def test_dingtalk_mentions_go_in_at_never_at_all(clock: FakeTime, session: requests.Session) -> None:
    with FakeDingTalk(keywords=[KEYWORD], secret=SECRET) as server:
        message = replace(hostile_alert(), mentions=("13800000000", "manager4321"))
        send(_dingtalk_channel(server.url, session, clock), message)
        (body,) = server.accepted
    assert body["at"] == {"atMobiles": ["13800000000"], "atUserIds": ["manager4321"], "isAtAll": False}
    assert "@13800000000 @manager4321" in body["markdown"]["text"]


# ---------------------------------------------------------------------- WeCom


def test_wecom_wrong_key_is_explained_and_masked(
    clock: FakeTime, session: requests.Session, caplog: pytest.LogCaptureFixture
) -> None:
    with FakeWeCom() as server:
        channel = KITS["wecom-markdown"].channel(server.url_for("0bad-key-0000-1111"), session, clock)
        with pytest.raises(DeliveryError) as caught:
            send(channel, Message(title="GPU report", blocks=("x",)))
    assert "invalid webhook URL (93000): the key in wecom.url is wrong" in str(caught.value)
    assert "0bad-key-0000-1111" not in str(caught.value) and "0bad-key-0000-1111" not in caplog.text
    assert "key=…(masked)" in str(caught.value) or "key=0bad…(masked)" in str(caught.value)


@pytest.mark.parametrize(
    ("code", "words", "fault"), [(45009, "rate limited (45009)", False), (40058, "too long", True)]
)
def test_wecom_errcodes(code: int, words: str, fault: bool, clock: FakeTime, session: requests.Session) -> None:
    with FakeWeCom() as server:
        server.fail_next([code])
        with pytest.raises(DeliveryError) as caught:
            send(KITS["wecom-markdown"].channel(server.url, session, clock), Message(title="GPU report", blocks=("x",)))
    assert words in str(caught.value) and caught.value.message_fault is fault
    assert len(server.exchanges) == 1


def test_wecom_mentions(clock: FakeTime, session: requests.Session) -> None:
    with FakeWeCom() as server:
        send(KITS["wecom-markdown"].channel(server.url, session, clock), replace(hostile_alert(), mentions=("alice",)))
        send(KITS["wecom-text"].channel(server.url, session, clock), replace(hostile_alert(), mentions=("alice",)))
        markdown, text = server.accepted
    assert FakeWeCom.seen(markdown).mentions == ("alice",)
    assert text["text"]["mentioned_list"] == ["alice"]


# ---------------------------------------------------------------------- Slack


@pytest.mark.parametrize(
    ("fault", "words", "message_fault"),
    [
        (404, "channel_not_found: the webhook's channel was deleted", False),
        (410, "channel_is_archived", False),
        (403, "action_prohibited: a workspace admin restricted posting", False),
        (400, "invalid_payload: Slack could not read the message", True),
    ],
)
def test_slack_error_codes_are_explained(
    fault: int, words: str, message_fault: bool, clock: FakeTime, session: requests.Session
) -> None:
    with FakeSlack() as server:
        server.fail_next([fault])
        with pytest.raises(DeliveryError) as caught:
            send(_slack_channel(server.url, session, clock), Message(title="GPU report", blocks=("x",)))
    assert words in str(caught.value)
    assert caught.value.permanent and caught.value.message_fault is message_fault
    assert server.token.split("/")[-1] not in str(caught.value)


def test_slack_wrong_url_and_rate_limit(clock: FakeTime, session: requests.Session) -> None:
    with FakeSlack() as server:
        with pytest.raises(DeliveryError) as caught:
            send(_slack_channel(server.url_for("T0/B0/wrong"), session, clock), Message(title="r", blocks=("x",)))
        assert "no_service: the webhook was disabled or removed" in str(caught.value)
        server.reset()
        server.fail_next([429])
        send(_slack_channel(server.url, session, clock), Message(title="r", blocks=("x",)))
    assert [e.status for e in server.exchanges] == [429, 200]
    assert max(clock.sleeps) >= 1.0  # waited for Retry-After


def test_slack_blocks_and_fallback(clock: FakeTime, session: requests.Session) -> None:
    with FakeSlack() as server:
        message = replace(overview(fleet(), FreeGpuConfig()), link="https://gpu.lab.example/")
        send(
            _slack_channel(server.url, session, clock, mentions={"alice": "U0ALICE1"}),
            replace(message, mentions=("U0ALICE1",)),
        )
        (body,) = server.accepted
    assert body["mrkdwn"] is False and body["text"].startswith("GPU overview")
    types = [b["type"] for b in body["blocks"]]
    assert types[0] == "header" and types[-1] == "actions" and "context" in types
    assert FakeSlack.seen(body).mentions == ("U0ALICE1",)
    texts = [b["text"]["text"] for b in body["blocks"] if b["type"] == "section" and b["text"]["type"] == "plain_text"]
    assert texts[0].startswith("🔴 gpu-c · NO DATA (unreachable)")
    assert texts[1].startswith("🟢 gpu-a · 4 × H100 80GB HBM3 · 2 free\n⚫ 0  util ▰▰▰▰▰▰▰▰▰▰ 100%")
    assert "\n🟢 2  util ▱▱▱▱▱▱▱▱▱▱ 0%" in texts[1]


# ---------------------------------------------------------------------- the generic webhook


def test_webhook_default_document(clock: FakeTime, session: requests.Session) -> None:
    with FakeReceiver() as server:
        send(_webhook_channel(server.url, session, clock), replace(hostile_alert(), link="https://gpu.lab.example/"))
        (body,) = server.accepted
    assert {k: body[k] for k in ("source", "kind", "severity", "part", "parts", "link")} == {
        "source": "gpuwatch",
        "kind": "alert",
        "severity": "firing",
        "part": 1,
        "parts": 1,
        "link": "https://gpu.lab.example/",
    }
    assert body["title"] == "GPU alerts: 1 firing" and body["summary"] == "1 firing"
    assert body["text"] == "\n\n".join((body["title"], *body["blocks"])) and HOSTILE in body["text"]


def test_webhook_template_headers_and_secrets(
    clock: FakeTime, session: requests.Session, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    template = tmp_path / "mattermost.json"
    template.write_text('{"text": "{{text}}", "props": {"part": "{{part}}", "card": "part {{part}} of {{parts}}"}}')
    monkeypatch.setenv("HOOK_TOKEN", "Bearer s3cr3t-hook-token")
    with FakeReceiver(required_headers={"Authorization": "Bearer s3cr3t-hook-token"}) as server:
        doc = {
            "hosts": ["a"],
            "webhook": {"url": server.url, "template": str(template), "header_env": {"Authorization": "HOOK_TOKEN"}},
        }
        config = parse_config(doc, tmp_path / "config.yaml")
        spec = channel_spec("webhook")
        assert spec is not None and "Bearer s3cr3t-hook-token" in spec.secrets(config.channels["webhook"])
        channel = spec.build(config.channels["webhook"], clock.sleep, None)
        send(channel, Message(title="GPU report", blocks=("node01 idle",)))  # type: ignore[arg-type]
        (body,) = server.accepted
        assert body == {"text": "GPU report\n\nnode01 idle", "props": {"part": 1, "card": "part 1 of 1"}}

        monkeypatch.setenv("HOOK_TOKEN", "Bearer wrong-token-value")
        refused = spec.build(config.channels["webhook"], clock.sleep, None)
        with pytest.raises(DeliveryError) as caught:
            send(refused, Message(title="GPU report", blocks=("x",)))  # type: ignore[arg-type]
    assert "HTTP 401" in str(caught.value) and "check webhook.headers" in str(caught.value)
    assert "wrong-token-value" not in str(caught.value) and server.token not in str(caught.value)

    template.write_text('{"text": "{{body}}"}')
    with pytest.raises(ConfigError, match=r"webhook.template: unknown placeholder\(s\) body"):
        spec.build(config.channels["webhook"], clock.sleep, None)


# ---------------------------------------------------------------------- config and registry


def test_every_channel_declares_its_limits_and_secrets() -> None:
    names = [spec.name for spec in CHANNELS]
    assert names == ["feishu", "dingtalk", "wecom", "slack", "webhook", "email", "alertmanager"]
    limits = {spec.name: spec.limits for spec in CHANNELS}
    assert [spec.name for spec in CHANNELS if spec.alerts_only] == ["alertmanager"]
    assert (limits["dingtalk"].max_body_bytes, limits["dingtalk"].per_minute) == (20_000, 20)
    assert (limits["wecom"].max_body_bytes, limits["wecom"].per_minute) == (4096, 20)
    assert "2,048" in limits["wecom"].measured
    assert limits["slack"].per_second == 1 and "50 blocks" in limits["slack"].other
    assert (limits["feishu"].max_body_bytes, limits["feishu"].per_second, limits["feishu"].per_minute) == (
        20_000,
        5,
        100,
    )


@pytest.mark.parametrize(
    ("section", "error"),
    [
        ({"dingtalk": {"keyword": "GPU"}}, "dingtalk: needs 'url'"),
        (
            {"wecom": {"url": "https://x/send?key=k", "format": "card"}},
            "wecom.format: 'card' is not one of markdown, text",
        ),
        ({"slack": {"url": "hooks.slack.com/x"}}, "slack.url: expected an http(s):// webhook URL"),
        ({"webhook": {"url": "https://x/h", "max_bytes": 10}}, "webhook.max_bytes"),
        ({"dingtalk": {"url": "https://x/robot/send?access_token=t", "secert": "x"}}, "did you mean 'secret'"),
    ],
)
def test_config_mistakes_name_the_key(section: dict[str, Any], error: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=__import__("re").escape(error)):
        parse_config({"hosts": ["a"], **section}, tmp_path / "config.yaml")


def test_routes_and_secrets_of_the_new_channels(tmp_path: Path) -> None:
    doc = {
        "hosts": ["a"],
        "dingtalk": {
            "url": "https://oapi.dingtalk.com/robot/send?access_token=ding0123456789abcdef",
            "secret": "SECabcdef0123",
        },
        "wecom": {"url": "https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=wecom-0123456789abcdef"},
        "slack": {"url": "https://hooks.slack.com/services/T0000/B0000/slack0123456789abcdef"},
        "alerts": {"routes": {"host_down": ["dingtalk", "slack"], "default": ["wecom"]}},
    }
    config = parse_config(doc, tmp_path / "config.yaml")
    assert config.alerts.routes["host_down"] == ("dingtalk", "slack")
    from gpuwatch.cli.wiring import build_channels, secrets

    values = secrets(config)
    for secret in ("ding0123456789abcdef", "SECabcdef0123", "wecom-0123456789abcdef", "slack0123456789abcdef"):
        assert secret in values
    channels = build_channels(config)
    for channel in channels.values():
        shown = repr(channel)
        assert not any(s in shown for s in values)
        close = getattr(channel, "close", None)
        if close:
            close()
    assert "dingtalk" in repr(channels["dingtalk"]).lower()


def test_logs_of_every_channel_mask_its_secrets(
    clock: FakeTime, session: requests.Session, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="gpuwatch")
    for name in NEW_KITS:
        kit = KITS[name]
        with start(kit, clock) as server:
            server.fail_next([503])
            send(kit.channel(server.url, session, clock), Message(title="GPU report", blocks=("x",)))
            token = server.token
        for part in token.split("/"):
            assert part not in caplog.text, name
    assert "attempt 1/5 failed (HTTP 503" in caplog.text


def test_the_log_masks_webhook_tokens_it_was_not_told_about() -> None:
    from gpuwatch.logsetup import mask_secrets

    line = (
        "POST https://oapi.dingtalk.com/robot/send?access_token=d1n9abcdef0123456789&timestamp=1 "
        "https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=693a91f6-7abc-4bc4 "
        "https://hooks.slack.com/services/T0SL4CK01/B0HOOK0001/aB3dE5fG7hJ9kL1m"
    )
    masked = mask_secrets(line, [])
    for token in ("d1n9abcdef0123456789", "693a91f6-7abc-4bc4", "aB3dE5fG7hJ9kL1m", "B0HOOK0001"):
        assert token not in masked
    assert "access_token=d1n9…(masked)" in masked and "key=693a…(masked)" in masked
