"""The Feishu channel against a local server that checks what Feishu checks (tests/fakefeishu.py).

No mocking of requests: every delivery is a real HTTP POST to 127.0.0.1. Time is faked where
waiting would make the suite slow (retries, the rate limiter); the fake clock is shared with
the server so that its rate-limit windows see the same time as the client.
"""

from __future__ import annotations

import logging
import re
import resource
import socket
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from builders import FakeTime
from fakefeishu import DEFAULT_TOKEN, HUGE_ANSWER_BYTES, FakeFeishu, feishu_sign
from gpuwatch.message import Message
from gpuwatch.notify.base import DeliveryError
from gpuwatch.notify.feishu import FeishuChannel, FeishuSettings, RateLimiter, explain, redact_url, sign

SECRET = "s3cret-Xq9v-signing-key"
KEYWORD = "gpuwatch"
OPEN_FEISHU_VECTOR = "l1N0gAcBjdwBvGm1xMjOF0XSyaLRpR7tuO5dHfhAYc8="
SWAPPED_VECTOR = "DkEDUyVoOOJ539qBvUgMyzkzIdRWlf4e/V3Rq+ONJnQ="
FORMATS = ("text", "post", "card")


@pytest.fixture
def clock() -> FakeTime:
    return FakeTime()


@pytest.fixture
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        s.trust_env = False  # never through a proxy from the environment: loopback only
        yield s


@pytest.fixture
def server(clock: FakeTime) -> Iterator[FakeFeishu]:
    with FakeFeishu(keywords=[KEYWORD], secret=SECRET, monotonic=clock.monotonic) as srv:
        yield srv


def make_channel(
    url: str, session: requests.Session, clock: FakeTime, **overrides: Any
) -> tuple[FeishuChannel, FeishuSettings]:
    options: dict[str, Any] = {"keyword": KEYWORD, "secret": SECRET, **overrides}
    settings = FeishuSettings(url=url, **options)
    channel = FeishuChannel(settings, session=session, clock=clock.time, monotonic=clock.monotonic, sleep=clock.sleep)
    return channel, settings


def send(channel: FeishuChannel, message: Message) -> list[dict[str, Any]]:
    payloads = channel.prepare(message)
    for payload in payloads:
        channel.deliver(payload)
    return payloads


def title_of(body: dict[str, Any]) -> str:
    if body["msg_type"] == "text":
        return str(body["content"]["text"]).split("\n", 1)[0]
    if body["msg_type"] == "post":
        return str(body["content"]["post"]["zh_cn"]["title"])
    return str(body["card"]["header"]["title"]["content"])


def blocks_of(body: dict[str, Any]) -> list[str]:
    """The message blocks carried by an accepted body (mentions left out)."""
    if body["msg_type"] == "text":
        return [c for c in str(body["content"]["text"]).split("\n\n")[1:]]
    if body["msg_type"] == "post":
        paragraphs = body["content"]["post"]["zh_cn"]["content"]
        return [p[0]["text"] for p in paragraphs if p and p[0]["tag"] == "text"]
    elements = body["card"]["body"]["elements"]  # card JSON 2.0; a message without structure: plain text
    return [e["text"]["content"] for e in elements if e["tag"] == "div"]


def closed_port_url(token: str = DEFAULT_TOKEN) -> str:
    """A webhook URL on 127.0.0.1 where nothing listens: connection refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/open-apis/bot/v2/hook/{token}"


def fleet_blocks(count: int = 200) -> list[str]:
    """~300-byte blocks like a report's per-host blocks; every third one in Chinese."""
    blocks = []
    for i in range(count):
        if i % 3 == 0:
            lines = [f"节点 node{i:03d}：在线 12 天，负载 3.2"] + [
                f"  GPU{g} 显存 61234/81920 MiB 利用率 {50 + g}% 温度 72°C 用户 张伟 训练任务" for g in range(4)
            ]
        else:
            lines = [f"node{i:03d}.cluster  up 12d  load 3.2"] + [
                f"  GPU{g} A100-SXM4-80GB util {50 + g}% mem 61234/81920 MiB 72C alice python train.py"
                for g in range(3)
            ]
        blocks.append("\n".join(lines))
    return blocks


# ---------------------------------------------------------------------- signing and plain words


@pytest.mark.parametrize(
    ("secret", "timestamp", "expected"),
    [
        ("demo", 1599360473, OPEN_FEISHU_VECTOR),  # FEISHU.md's test vector
        (SECRET, 1700000000, feishu_sign(SECRET, 1700000000)),
        ("密钥", 1, feishu_sign("密钥", 1)),
    ],
)
def test_sign_matches_feishu(secret: str, timestamp: int, expected: str) -> None:
    assert sign(secret, timestamp) == expected


def test_sign_is_not_the_swapped_key_and_message() -> None:
    assert sign("demo", 1599360473) != SWAPPED_VECTOR


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (19021, "signing secret differs from feishu.secret / $FEISHU_SECRET"),
        (19021, "clock is off by more than an hour"),
        (19024, "set feishu.keyword to one of the bot's keywords"),
        (19001, "the bot was removed or the URL is wrong"),
        (19022, "IP"),
        (9499, "malformed or too large"),
        (19036, "too large"),
        (11232, "rate limited"),
        (4242, "4242"),
    ],
)
def test_explain(code: int, words: str) -> None:
    assert words in explain(code)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "https://open.feishu.cn/open-apis/bot/v2/hook/ab12cd34-ef56-7890-abcd-ef1234567890",
            "https://open.feishu.cn/open-apis/bot/v2/hook/ab12…(masked)",
        ),
        ("http://127.0.0.1:8080/open-apis/bot/v2/hook/short/", "http://127.0.0.1:8080/open-apis/bot/v2/hook/…(masked)"),
        ("https://user:pw@proxy.example/hook/ab12cd34ef567890ab?key=zz#f", "https://proxy.example/hook/ab12…(masked)"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_settings_repr_masks_secrets_and_validates() -> None:
    settings = FeishuSettings(url=f"https://open.feishu.cn/open-apis/bot/v2/hook/{DEFAULT_TOKEN}", secret=SECRET)
    assert DEFAULT_TOKEN not in repr(settings)
    assert SECRET not in repr(settings)
    assert "secret='set'" not in repr(settings) and "secret=set" in repr(settings)
    with pytest.raises(ValueError, match=r"feishu\.format"):
        FeishuSettings(url=settings.url, format="markdown")
    with pytest.raises(ValueError, match=r"feishu\.url"):
        FeishuSettings(url="open.feishu.cn/hook")
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"feishu\.timeout_seconds: must be a positive number"):
            FeishuSettings(url=settings.url, timeout_seconds=bad)


# ---------------------------------------------------------------------- formats and keyword


@pytest.mark.parametrize(
    ("fmt", "severity", "msg_type", "template"),
    [
        ("text", "info", "text", None),
        ("post", "firing", "post", None),
        ("card", "info", "interactive", "blue"),
        ("card", "firing", "interactive", "red"),
        ("card", "resolved", "interactive", "green"),
    ],
)
def test_each_format_is_accepted(
    server: FakeFeishu,
    session: requests.Session,
    clock: FakeTime,
    fmt: str,
    severity: str,
    msg_type: str,
    template: str | None,
) -> None:
    channel, _ = make_channel(server.url, session, clock, format=fmt)
    message = Message(
        title="gpuwatch: GPU report", blocks=("node01: 8 GPUs idle", "node02: 显存 90%"), severity=severity
    )
    payloads = send(channel, message)

    assert len(payloads) == 1
    assert "timestamp" not in payloads[0] and "sign" not in payloads[0]  # prepare() leaves them to deliver()
    assert server.codes == [0]
    (body,) = server.accepted
    assert body["msg_type"] == msg_type
    assert title_of(body) == "gpuwatch: GPU report"
    assert blocks_of(body) == ["node01: 8 GPUs idle", "node02: 显存 90%"]
    assert body["sign"] == feishu_sign(SECRET, body["timestamp"])
    if template is not None:
        assert body["card"]["header"]["template"] == template
        assert body["card"]["header"]["title"]["tag"] == "plain_text"
        assert body["card"]["schema"] == "2.0"
        assert all(e["tag"] == "div" and e["text"]["tag"] == "plain_text" for e in body["card"]["body"]["elements"])
    (exchange,) = server.exchanges
    assert exchange.headers["content-type"] == "application/json; charset=utf-8"
    assert "显存".encode() in exchange.raw  # UTF-8 on the wire, not \\u escapes


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    ("title", "blocks", "expected_title"),
    [
        ("GPU report", ("node01 idle",), f"【{KEYWORD}】GPU report"),  # keyword nowhere: prefixed
        (f"{KEYWORD} GPU report", ("node01 idle",), f"{KEYWORD} GPU report"),  # in the title
        ("GPU report", (f"sent by {KEYWORD}",), "GPU report"),  # in the text of the only part
        ("Resolved: node01 cool again", (), f"【{KEYWORD}】Resolved: node01 cool again"),  # title only
    ],
)
def test_keyword_is_always_carried(
    server: FakeFeishu,
    session: requests.Session,
    clock: FakeTime,
    fmt: str,
    title: str,
    blocks: tuple[str, ...],
    expected_title: str,
) -> None:
    channel, _ = make_channel(server.url, session, clock, format=fmt)
    send(channel, Message(title=title, blocks=blocks))
    assert server.codes == [0]
    assert title_of(server.accepted[0]) == expected_title


def test_keyword_only_in_an_href_would_not_count(server: FakeFeishu, session: requests.Session) -> None:
    body = {
        "msg_type": "post",
        "content": {
            "post": {
                "zh_cn": {"title": "report", "content": [[{"tag": "a", "text": "x", "href": f"https://{KEYWORD}/"}]]}
            }
        },
    }
    ts = int(time.time())
    reply = session.post(server.url, json={"timestamp": str(ts), "sign": feishu_sign(SECRET, ts), **body}, timeout=5)
    assert reply.json()["code"] == 19024


@pytest.mark.parametrize(
    ("fmt", "marker"),
    [
        ("text", '<at user_id="ou_alice"></at>'),
        ("post", '"tag": "at", "user_id": "ou_alice"'),
        ("card", "<at id=ou_alice></at>"),
    ],
)
def test_mentions(server: FakeFeishu, session: requests.Session, clock: FakeTime, fmt: str, marker: str) -> None:
    channel, _ = make_channel(server.url, session, clock, format=fmt)
    message = Message(title="node01 GPU3 at 91°C", blocks=("GPU3 91°C",), severity="firing", mentions=("ou_alice",))
    (payload,) = send(channel, message)
    (body,) = server.accepted
    assert marker in (body["content"]["text"] if fmt == "text" else server.exchanges[0].raw.decode())
    assert "@ou_alice" in channel.describe(payload)


@pytest.mark.parametrize("fmt", FORMATS)
def test_describe_reads_like_the_message(session: requests.Session, clock: FakeTime, fmt: str) -> None:
    channel, _ = make_channel(f"http://127.0.0.1:9/open-apis/bot/v2/hook/{DEFAULT_TOKEN}", session, clock, format=fmt)
    (payload,) = channel.prepare(Message(title="Daily report", blocks=("node01\n  GPU0 idle", "node02 down")))
    assert channel.describe(payload) == f"【{KEYWORD}】Daily report\n\nnode01\n  GPU0 idle\n\nnode02 down"


def test_old_style_reply_with_status_code_only_is_success(
    server: FakeFeishu, session: requests.Session, clock: FakeTime
) -> None:
    channel, _ = make_channel(server.url, session, clock)
    server.fail_next(["legacy"])
    send(channel, Message(title="gpuwatch test", blocks=()))
    assert server.codes == [0]
    assert clock.sleeps == []


# ---------------------------------------------------------------------- size and splitting


@pytest.mark.parametrize("fmt", FORMATS)
def test_long_report_splits_into_whole_numbered_parts(
    server: FakeFeishu, session: requests.Session, clock: FakeTime, fmt: str
) -> None:
    blocks = fleet_blocks(200)
    assert sum(len(b.encode()) for b in blocks) >= 60_000
    channel, _ = make_channel(server.url, session, clock, format=fmt)
    payloads = send(channel, Message(title="GPU 日报", blocks=tuple(blocks)))

    total = len(payloads)
    assert total >= 3
    assert server.codes == [0] * total
    assert all(len(raw) <= 20_000 for raw in server.accepted_raw)
    assert all("显存".encode() in raw for raw in server.accepted_raw)  # ensure_ascii=False
    titles = [title_of(body) for body in server.accepted]
    assert titles == [f"【{KEYWORD}】GPU 日报 ({i}/{total})" for i in range(1, total + 1)]
    received = [block for body in server.accepted for block in blocks_of(body)]
    assert received == blocks  # every block whole, once, in order


def test_parts_are_measured_with_the_signature_fields(
    server: FakeFeishu, session: requests.Session, clock: FakeTime
) -> None:
    # Small blocks fill each part to within ~50 bytes of the limit, so a split that forgot the
    # ~80 bytes of timestamp/sign fields would overflow the server's limit.
    server.max_body_bytes = 2_000
    channel, _ = make_channel(server.url, session, clock, max_body_bytes=2_000)
    blocks = tuple(f"node{i:03d} GPU0 空闲 0 MiB" for i in range(120))
    payloads = send(channel, Message(title="GPU 日报", blocks=blocks))
    assert len(payloads) > 1
    assert set(server.codes) == {0}
    assert all(len(raw) > 2_000 - 60 for raw in server.accepted_raw[:-1])  # parts are filled, not timid
    assert [b for body in server.accepted for b in blocks_of(body)] == list(blocks)


@pytest.mark.parametrize("fmt", FORMATS)
def test_one_block_too_big_alone_is_cut_at_lines(
    server: FakeFeishu, session: requests.Session, clock: FakeTime, fmt: str
) -> None:
    lines = [f"process {i:04d} 用户 bob python train.py --lr 0.001 --batch 64" for i in range(1200)]
    big = "\n".join(lines)
    assert len(big.encode()) > 60_000
    channel, _ = make_channel(server.url, session, clock, format=fmt)
    payloads = send(channel, Message(title="GPU 日报", blocks=("head", big, "tail")))

    assert len(payloads) >= 4
    assert set(server.codes) == {0}
    assert all(len(raw) <= 20_000 for raw in server.accepted_raw)
    pieces = [b for body in server.accepted for b in blocks_of(body)]
    assert pieces[0] == "head" and pieces[-1] == "tail"
    middle = pieces[1:-1]
    assert not middle[0].startswith("(continued)")
    assert all(p.startswith("(continued)\n") for p in middle[1:])
    rejoined = [line for p in middle for line in p.split("\n") if line != "(continued)"]
    assert rejoined == lines  # cut between lines only


def test_one_overlong_line_is_cut_between_characters(
    server: FakeFeishu, session: requests.Session, clock: FakeTime
) -> None:
    line = "温度过高🔥" * 3000  # 45,000 bytes on one line, with 4-byte characters
    channel, _ = make_channel(server.url, session, clock, format="post")
    send(channel, Message(title="GPU 日报", blocks=(line,)))
    assert set(server.codes) == {0}
    pieces = [b for body in server.accepted for b in blocks_of(body)]
    assert len(pieces) >= 3
    assert "".join(p.removeprefix("(continued)\n") for p in pieces) == line


def test_split_alert_mentions_only_in_the_first_part(
    server: FakeFeishu, session: requests.Session, clock: FakeTime
) -> None:
    channel, _ = make_channel(server.url, session, clock, format="post")
    send(channel, Message(title="GPU 告警", blocks=tuple(fleet_blocks(120)), severity="firing", mentions=("ou_bob",)))
    assert len(server.accepted) > 1 and set(server.codes) == {0}
    assert ["ou_bob" in raw.decode() for raw in server.accepted_raw] == [True] + [False] * (len(server.accepted) - 1)


def test_absurd_title_is_shortened_not_fatal(server: FakeFeishu, session: requests.Session, clock: FakeTime) -> None:
    channel, _ = make_channel(server.url, session, clock, format="card")
    send(channel, Message(title="过热" * 20_000, blocks=tuple(fleet_blocks(40))))
    assert set(server.codes) == {0}
    assert all(len(raw) <= 20_000 for raw in server.accepted_raw)
    assert [b for body in server.accepted for b in blocks_of(body)] == fleet_blocks(40)


# ---------------------------------------------------------------------- retries


@pytest.mark.parametrize(
    ("faults", "floors"),
    [
        ([11232], [1.0]),
        ([500], [0.5]),
        ([502, 503], [0.5, 1.0]),
        ([429], [1.0]),
        ([500, 11232, 503], [0.5, 1.0, 2.0]),
    ],
)
def test_transient_failures_are_retried(
    server: FakeFeishu, session: requests.Session, clock: FakeTime, faults: list[int | str], floors: list[float]
) -> None:
    channel, _ = make_channel(server.url, session, clock)
    server.fail_next(faults)
    send(channel, Message(title="GPU report", blocks=("node01 idle",)))

    assert len(server.exchanges) == len(faults) + 1
    assert server.exchanges[-1].accepted and len(server.accepted) == 1
    assert len(clock.sleeps) == len(faults)
    for delay, floor in zip(clock.sleeps, floors):
        assert floor <= delay <= 30.0
    # Every attempt was signed afresh: each signature matches its own timestamp.
    for exchange in server.exchanges:
        if exchange.body is not None:
            assert exchange.body["sign"] == feishu_sign(SECRET, exchange.body["timestamp"])


def test_each_attempt_gets_a_fresh_timestamp(server: FakeFeishu, session: requests.Session, clock: FakeTime) -> None:
    channel, _ = make_channel(server.url, session, clock)
    server.fail_next([11232, 11232])
    send(channel, Message(title="GPU report", blocks=("node01 idle",)))
    stamps = [int(e.body["timestamp"]) for e in server.exchanges if e.body is not None]
    assert len(stamps) == 3
    assert stamps[0] < stamps[1] < stamps[2]  # 11232 backs off at least 1 s each time


def test_gives_up_after_max_attempts(server: FakeFeishu, session: requests.Session, clock: FakeTime) -> None:
    channel, _ = make_channel(server.url, session, clock, max_attempts=4)
    server.fail_next([500, 503, 502, 11232])
    (payload,) = channel.prepare(Message(title="GPU report", blocks=("node01 idle",)))
    with pytest.raises(DeliveryError) as caught:
        channel.deliver(payload)
    assert caught.value.permanent is False
    assert caught.value.code == 11232
    assert "after 4 attempts" in str(caught.value)
    assert len(server.exchanges) == 4
    assert len(clock.sleeps) == 3  # no sleep after the last attempt
    for attempt, delay in enumerate(clock.sleeps, start=1):
        assert 0.5 * 2 ** (attempt - 1) <= delay <= 2 ** (attempt - 1)


# ---------------------------------------------------------------------- permanent failures


@pytest.mark.parametrize(
    ("case", "code", "words"),
    [
        ("wrong secret", 19021, "signature rejected: the bot's signing secret differs"),
        ("no secret", 19021, "signature rejected"),
        ("clock two hours slow", 19021, "clock is off by more than an hour"),
        ("wrong keyword", 19024, "keyword missing: set feishu.keyword"),
        ("wrong token", 19001, "invalid webhook token: the bot was removed or the URL is wrong"),
        ("ip not allowed", 19022, "allow-list"),
        ("too large for the server", 19036, "too large"),
        ("scripted 9499", 9499, "malformed or too large"),
        ("http 404", None, "HTTP 404"),
        ("not json", None, "not a Feishu JSON answer"),
    ],
)
def test_permanent_failures_stop_at_once(
    server: FakeFeishu, session: requests.Session, clock: FakeTime, case: str, code: int | None, words: str
) -> None:
    url = server.url
    overrides: dict[str, Any] = {}
    message = Message(title="GPU report", blocks=("node01 idle",))
    if case == "wrong secret":
        overrides["secret"] = "not-the-bot-secret"
    elif case == "no secret":
        overrides["secret"] = None
    elif case == "clock two hours slow":
        clock.wall_start -= 7200
    elif case == "wrong keyword":
        overrides["keyword"] = "alerts"
    elif case == "wrong token":
        url = server.url_for("deadbeef-0000-1111-2222-333344445555")
    elif case == "ip not allowed":
        server.allowed_ips = {"10.1.2.3"}
    elif case == "too large for the server":
        overrides["max_body_bytes"] = 100_000
        message = Message(title="GPU report", blocks=tuple(fleet_blocks(100)))
    elif case == "scripted 9499":
        server.fail_next([9499])
    elif case == "http 404":
        server.fail_next([404])
    elif case == "not json":
        server.fail_next(["garbage"])
    channel, _ = make_channel(url, session, clock, **overrides)
    (payload,) = channel.prepare(message)

    with pytest.raises(DeliveryError) as caught:
        channel.deliver(payload)
    error = caught.value
    assert error.permanent is True
    assert error.code == code
    assert words in str(error)
    assert len(server.exchanges) == 1  # exactly one request: no hammering
    assert clock.sleeps == []
    assert DEFAULT_TOKEN not in str(error) and "deadbeef-0000" not in str(error)
    assert SECRET not in str(error)


# ---------------------------------------------------------------------- secrets stay secret


def test_secret_and_token_never_logged_or_raised(
    server: FakeFeishu, session: requests.Session, clock: FakeTime, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="gpuwatch")
    channel, settings = make_channel(server.url, session, clock, max_attempts=3)
    message = Message(title="GPU report", blocks=("node01 idle",))

    server.fail_next([500, 503])  # logged retries
    send(channel, message)
    errors: list[DeliveryError] = []
    server.fail_next(["drop"])  # the answer lost: requests' own error text in the error
    with pytest.raises(DeliveryError) as lost:
        send(channel, message)
    errors.append(lost.value)
    refused, _ = make_channel(closed_port_url(), session, clock, max_attempts=2)
    with pytest.raises(DeliveryError) as gave_up:  # logged retries and an error that quote requests' text
        send(refused, message)
    errors.append(gave_up.value)
    bad, _ = make_channel(server.url, session, clock, secret="wrong-secret-value")
    with pytest.raises(DeliveryError) as rejected:
        send(bad, message)
    errors.append(rejected.value)

    assert "…(masked)" in caplog.text  # the logs do say where
    texts = [caplog.text, repr(settings), repr(channel)]
    texts += [str(e) for e in errors] + [repr(e) for e in errors]
    texts += ["".join(traceback.format_exception(type(e), e, e.__traceback__)) for e in errors]
    for text in texts:
        assert DEFAULT_TOKEN not in text
        assert SECRET not in text
        assert "wrong-secret-value" not in text


# ---------------------------------------------------------------------- rate limits


@pytest.mark.parametrize(
    ("count", "per_second", "per_minute"),
    [
        (12, 5, 100),  # a burst of 12 reports: 5 + 5 + 2 over three seconds
        (23, 5, 10),  # the minute window too (server and client both at 10/min)
    ],
)
def test_rate_limiter_keeps_a_burst_under_the_limits(
    session: requests.Session, clock: FakeTime, count: int, per_second: int, per_minute: int
) -> None:
    with FakeFeishu(
        keywords=[KEYWORD], secret=SECRET, per_second=per_second, per_minute=per_minute, monotonic=clock.monotonic
    ) as srv:
        channel, _ = make_channel(srv.url, session, clock, per_second=per_second, per_minute=per_minute)
        for i in range(count):
            send(channel, Message(title=f"alert {i}", blocks=("GPU hot",)))
        assert srv.codes == [0] * count  # no 11232, no retries
        arrivals = [e.at for e in srv.exchanges]
    assert all(b - a >= 1.0 for a, b in zip(arrivals, arrivals[per_second:]))
    assert all(b - a >= 60.0 for a, b in zip(arrivals, arrivals[per_minute:]))


def test_without_the_limiter_the_server_does_limit(session: requests.Session, clock: FakeTime) -> None:
    # The control for the test above: the fake server really enforces 5/s.
    with FakeFeishu(keywords=[KEYWORD], secret=SECRET, monotonic=clock.monotonic) as srv:
        channel, _ = make_channel(srv.url, session, clock, per_second=1000, per_minute=1000)
        for i in range(7):
            send(channel, Message(title=f"alert {i}", blocks=("GPU hot",)))
        assert 11232 in srv.codes
        assert len(srv.accepted) == 7  # and the client recovered by backing off


def test_rate_limiter_is_shared_between_threads_in_real_time(session: requests.Session) -> None:
    with FakeFeishu(keywords=[KEYWORD], secret=SECRET) as srv:
        channel = FeishuChannel(FeishuSettings(url=srv.url, keyword=KEYWORD, secret=SECRET), session=session)
        payloads = [channel.prepare(Message(title=f"alert {i}", blocks=("GPU hot",)))[0] for i in range(7)]
        errors: list[BaseException] = []

        def deliver(payload: dict[str, Any]) -> None:
            try:
                channel.deliver(payload)
            except BaseException as exc:
                errors.append(exc)

        started = time.monotonic()
        threads = [threading.Thread(target=deliver, args=(p,)) for p in payloads]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
        elapsed = time.monotonic() - started
        assert errors == []
        assert srv.codes == [0] * 7
        assert elapsed >= 1.0  # the 6th and 7th waited for the next second
        assert sorted(title_of(b) for b in srv.accepted) == sorted(f"【{KEYWORD}】alert {i}" for i in range(7))


def test_log_lines_name_the_masked_url(
    server: FakeFeishu, session: requests.Session, clock: FakeTime, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gpuwatch")
    channel, _ = make_channel(server.url, session, clock)
    server.fail_next([503])
    send(channel, Message(title="GPU report", blocks=("node01 idle",)))
    (record,) = caplog.records
    assert re.search(r"/open-apis/bot/v2/hook/0f5c…\(masked\)", record.getMessage())
    assert "HTTP 503" in record.getMessage()


def test_network_errors_are_said_in_a_few_words() -> None:
    """Not urllib3's whole chain (which also echoes the URL): the cause, plainly."""
    from gpuwatch.notify.http import _network_reason

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: connection refused
    with pytest.raises(requests.RequestException) as refused:
        requests.post(f"http://127.0.0.1:{port}/open-apis/bot/v2/hook/tok", timeout=2)
    assert _network_reason(refused.value, 2) == "Connection refused"
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        with pytest.raises(requests.RequestException) as timed_out:
            requests.post(f"http://127.0.0.1:{silent.getsockname()[1]}/x", timeout=0.3)
    assert _network_reason(timed_out.value, 0.3) == "no answer within 0.3s"


# ---------------------------------------------------------------------- a slow or broken answer: sent once, in doubt
#
# Bounds on elapsed time below are generous (10x the design) so that a loaded machine cannot fail
# them; the real figures are measured by bench/drill.py.

SLOW_DEADLINE = 0.5  # feishu timeout_seconds in these tests: the most one post may take


@pytest.mark.parametrize(
    ("fault", "words"),
    [
        ("slow:5", "Feishu did not answer within 0.5 s"),  # takes the message, answers after 5 s
        ("silent", "Feishu did not answer within 0.5 s"),  # takes the message, never answers
        ("trickle:0.2", "Feishu did not answer within 0.5 s"),  # each byte well within a read timeout
        ("trickle-head:0.2", "Feishu did not answer within 0.5 s"),  # the status line itself trickles
        ("huge", "larger than 64 KiB"),  # 300 MB of answer
        ("drop", "the answer was lost"),  # hangs up after reading the post
        (504, "a gateway answered HTTP 504"),  # a proxy passed it on and lost the answer
    ],
)
def test_a_post_without_a_verdict_is_sent_once_and_reported_as_maybe_delivered(
    server: FakeFeishu,
    session: requests.Session,
    clock: FakeTime,
    caplog: pytest.LogCaptureFixture,
    fault: str | int,
    words: str,
) -> None:
    channel, _ = make_channel(server.url, session, clock, timeout_seconds=SLOW_DEADLINE)
    server.fail_next([fault])
    (payload,) = channel.prepare(Message(title="GPU report", blocks=("node01 idle",)))

    started = time.monotonic()
    with pytest.raises(DeliveryError) as caught:
        channel.deliver(payload)
    elapsed = time.monotonic() - started

    error = caught.value
    assert error.maybe_delivered is True
    assert words in str(error)
    assert "the message may have been delivered" in str(error) and "a duplicate is possible" in str(error)
    assert len(server.exchanges) == 1  # posted once: the group has at most one copy
    assert len(server.accepted) <= 1
    assert clock.sleeps == []  # and no backoff inside deliver(): the caller decides when to try again
    assert elapsed < 10 * SLOW_DEADLINE
    assert DEFAULT_TOKEN not in str(error) and DEFAULT_TOKEN not in caplog.text


@pytest.mark.parametrize("fault", ["silent", "trickle:0.2", "trickle-head:0.2", "huge"])
def test_the_connection_of_a_post_given_up_is_cut(
    server: FakeFeishu, session: requests.Session, clock: FakeTime, fault: str
) -> None:
    """Not left for the server to trickle into for minutes: the server sees the client hang up."""
    channel, _ = make_channel(server.url, session, clock, timeout_seconds=SLOW_DEADLINE)
    server.fail_next([fault])
    with pytest.raises(DeliveryError):
        send(channel, Message(title="GPU report", blocks=("node01 idle",)))
    assert server.wait_for_answers(1, timeout=10)
    (answer,) = server.answers
    assert answer.hung_up is True
    assert answer.seconds < 10 * SLOW_DEADLINE


def test_a_huge_answer_is_not_read_into_memory(server: FakeFeishu, session: requests.Session, clock: FakeTime) -> None:
    before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    channel, _ = make_channel(server.url, session, clock, timeout_seconds=10)
    server.fail_next(["huge"])
    with pytest.raises(DeliveryError) as caught:
        send(channel, Message(title="GPU report", blocks=("node01 idle",)))
    assert "larger than 64 KiB" in str(caught.value) and caught.value.permanent
    assert server.wait_for_answers(1, timeout=10)
    (answer,) = server.answers
    assert answer.hung_up and answer.bytes_written < HUGE_ANSWER_BYTES // 10  # socket buffers, not 300 MB
    growth_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_kib) / 1024
    assert growth_mib < 64  # reading it whole would take 300 MB or more


def test_a_slow_answer_within_the_deadline_is_fine(
    server: FakeFeishu, session: requests.Session, clock: FakeTime
) -> None:
    channel, _ = make_channel(server.url, session, clock, timeout_seconds=5)
    server.fail_next(["slow:0.3"])
    send(channel, Message(title="GPU report", blocks=("node01 idle",)))
    assert server.codes == [0] and clock.sleeps == []


def test_connection_refused_is_retried_and_never_in_doubt(session: requests.Session, clock: FakeTime) -> None:
    channel, _ = make_channel(closed_port_url(), session, clock, max_attempts=3)
    with pytest.raises(DeliveryError) as caught:
        send(channel, Message(title="GPU report", blocks=("node01 idle",)))
    assert caught.value.maybe_delivered is False and caught.value.permanent is False
    assert "Connection refused" in str(caught.value) and "after 3 attempts" in str(caught.value)
    assert len(clock.sleeps) == 2


# ---------------------------------------------------------------------- stopping (SIGTERM) during a send


class Sender(threading.Thread):
    """deliver() in a thread, so that the test can stop it from outside."""

    def __init__(self, channel: FeishuChannel, payload: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.channel = channel
        self.payload = payload
        self.error: DeliveryError | None = None
        self.finished = threading.Event()

    def run(self) -> None:
        try:
            self.channel.deliver(self.payload)
        except DeliveryError as exc:
            self.error = exc
        finally:
            self.finished.set()


def stoppable_channel(url: str, session: requests.Session, stop: threading.Event, **overrides: Any) -> FeishuChannel:
    settings = FeishuSettings(url=url, **{"keyword": KEYWORD, "secret": SECRET, **overrides})
    return FeishuChannel(settings, session=session, stop=stop)  # real time: sleep is stop.wait


@pytest.mark.parametrize("fault", ["silent", "slow:60", "trickle:1"])
def test_stop_ends_a_post_waiting_for_its_answer(session: requests.Session, fault: str) -> None:
    stop = threading.Event()
    with FakeFeishu(keywords=[KEYWORD], secret=SECRET) as srv:
        channel = stoppable_channel(srv.url, session, stop, timeout_seconds=60)
        (payload,) = channel.prepare(Message(title="GPU report", blocks=("node01 idle",)))
        srv.fail_next([fault])
        sender = Sender(channel, payload)
        sender.start()
        assert srv.wait_for_requests(1, timeout=10)
        stopped_at = time.monotonic()
        stop.set()
        assert sender.finished.wait(timeout=10), "deliver() still running 10 s after the stop"
        took = time.monotonic() - stopped_at
        assert srv.wait_for_answers(1, timeout=10) and srv.answers[0].hung_up  # the connection was cut
    assert took < 5  # the design is about 1 s (a grace for an answer on its way)
    assert sender.error is not None and sender.error.maybe_delivered
    assert "gpuwatch is stopping and Feishu had not answered yet" in str(sender.error)
    assert len(srv.exchanges) == 1


def test_stop_lets_an_answer_on_its_way_arrive(session: requests.Session) -> None:
    stop = threading.Event()
    with FakeFeishu(keywords=[KEYWORD], secret=SECRET) as srv:
        channel = stoppable_channel(srv.url, session, stop, timeout_seconds=60)
        (payload,) = channel.prepare(Message(title="GPU report", blocks=("node01 idle",)))
        srv.fail_next(["slow:0.2"])
        sender = Sender(channel, payload)
        sender.start()
        assert srv.wait_for_requests(1, timeout=10)
        stop.set()
        assert sender.finished.wait(timeout=10)
    assert sender.error is None  # accepted within the grace: recorded as delivered, not in doubt
    assert srv.codes == [0]


def test_stop_ends_the_retries_at_once(session: requests.Session) -> None:
    stop = threading.Event()
    with FakeFeishu(keywords=[KEYWORD], secret=SECRET) as srv:
        srv.always(503)
        channel = stoppable_channel(srv.url, session, stop, max_attempts=10)
        (payload,) = channel.prepare(Message(title="GPU report", blocks=("node01 idle",)))
        sender = Sender(channel, payload)
        sender.start()
        assert srv.wait_for_requests(1, timeout=10)
        stop.set()
        assert sender.finished.wait(timeout=5), "still retrying 5 s after the stop"
        posts = len(srv.exchanges)
    assert sender.error is not None and not sender.error.maybe_delivered
    assert "gpuwatch is stopping" in str(sender.error)
    assert posts <= 2  # the one in flight, at most one more that was already on its way


def test_nothing_is_posted_once_stopped(server: FakeFeishu, session: requests.Session) -> None:
    stop = threading.Event()
    stop.set()
    channel = stoppable_channel(server.url, session, stop)
    with pytest.raises(DeliveryError) as caught:
        send(channel, Message(title="GPU report", blocks=("node01 idle",)))
    assert "not sent: gpuwatch is stopping" in str(caught.value) and not caught.value.maybe_delivered
    assert server.exchanges == []


def test_stop_ends_a_wait_for_the_rate_limiter() -> None:
    """With the daemon's sleep (stop.wait), a stop makes every wait return at once: the limiter
    must not spin until its window opens."""
    stop = threading.Event()
    limiter = RateLimiter(1, 100, monotonic=lambda: 0.0, sleep=lambda seconds: None, stop=stop)
    limiter.acquire()
    stop.set()
    done = threading.Event()
    threading.Thread(target=lambda: (limiter.acquire(), done.set()), daemon=True).start()
    assert done.wait(timeout=5)


# ---------------------------------------------------------------------- the same over HTTPS (as the real Feishu)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from smtpserver import certificates_unavailable_reason, make_certificates

    reason = certificates_unavailable_reason()
    if reason:
        pytest.skip(reason)
    return make_certificates(tmp_path_factory.mktemp("feishu-tls"))


@pytest.fixture
def https_server(tls_files: Any) -> Iterator[FakeFeishu]:
    with FakeFeishu(keywords=[KEYWORD], secret=SECRET, ssl_context=tls_files.server_context()) as srv:
        yield srv


@pytest.fixture
def https_session(tls_files: Any) -> Iterator[requests.Session]:
    with requests.Session() as s:
        s.trust_env = False
        s.verify = str(tls_files.ca_file)
        yield s


def test_https_post_is_delivered(https_server: FakeFeishu, https_session: requests.Session, clock: FakeTime) -> None:
    assert https_server.url.startswith("https://")
    channel, _ = make_channel(https_server.url, https_session, clock)
    for i in range(3):  # one fresh connection per post
        send(channel, Message(title=f"GPU report {i}", blocks=("node01 idle",)))
    assert https_server.codes == [0, 0, 0]


@pytest.mark.parametrize("fault", ["silent", "trickle:0.2", "huge"])
def test_https_post_without_a_verdict_is_cut_at_the_deadline(
    https_server: FakeFeishu, https_session: requests.Session, clock: FakeTime, fault: str
) -> None:
    channel, _ = make_channel(https_server.url, https_session, clock, timeout_seconds=SLOW_DEADLINE)
    https_server.fail_next([fault])
    started = time.monotonic()
    with pytest.raises(DeliveryError) as caught:
        send(channel, Message(title="GPU report", blocks=("node01 idle",)))
    assert time.monotonic() - started < 10 * SLOW_DEADLINE
    assert caught.value.maybe_delivered and len(https_server.exchanges) == 1
    assert https_server.wait_for_answers(1, timeout=10) and https_server.answers[0].hung_up


def test_https_stop_ends_a_post_waiting_for_its_answer(
    https_server: FakeFeishu, https_session: requests.Session
) -> None:
    stop = threading.Event()
    channel = stoppable_channel(https_server.url, https_session, stop, timeout_seconds=60)
    (payload,) = channel.prepare(Message(title="GPU report", blocks=("node01 idle",)))
    https_server.fail_next(["silent"])
    sender = Sender(channel, payload)
    sender.start()
    assert https_server.wait_for_requests(1, timeout=10)
    stop.set()
    assert sender.finished.wait(timeout=5), "deliver() still running 5 s after the stop"
    assert sender.error is not None and sender.error.maybe_delivered
