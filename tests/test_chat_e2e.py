"""One ``gpuwatch run --once`` delivering a fleet overview and alerts to Feishu, DingTalk, WeCom and
Slack together, over real HTTP to receivers that behave like each platform; ``test-notify`` and
``--dry-run`` across all of them. The ``localhost`` host replays real nvidia-smi captures through
the stand-in; a second host at a loopback address where nothing listens did not answer.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fakechat import FakeDingTalk, FakeSlack, FakeWeCom
from fakefeishu import FakeFeishu, card_problems, seen
from fakehook import FakeHook, Rendered
from gpuwatch.cli import main

KEYWORD = "GPU"
FEISHU_SECRET = "feishu-Lq7w-signing-key"
DINGTALK_SECRET = "SECd1n9-7a1k-signing-key"
DEAD_ADDRESS = "127.0.0.250"  # nothing listens on port 1 there: connection refused
PUBLIC_URL = "https://gpu.lab.example/gpuwatch/"


@pytest.fixture
def platforms() -> Iterator[dict[str, FakeHook]]:
    servers: dict[str, FakeHook] = {
        "feishu": FakeFeishu(keywords=[KEYWORD], secret=FEISHU_SECRET),
        "dingtalk": FakeDingTalk(keywords=[KEYWORD], secret=DINGTALK_SECRET),
        "wecom": FakeWeCom(),
        "slack": FakeSlack(),
    }
    for server in servers.values():
        server.start()
    try:
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def seen_by(name: str, body: dict[str, Any]) -> Rendered:
    return {"feishu": seen, "dingtalk": FakeDingTalk.seen, "wecom": FakeWeCom.seen, "slack": FakeSlack.seen}[name](body)


def write_config(tmp_path: Path, servers: dict[str, FakeHook], monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GPUWATCH_TEST_FEISHU_SECRET", FEISHU_SECRET)
    monkeypatch.setenv("GPUWATCH_TEST_DINGTALK_SECRET", DINGTALK_SECRET)
    monkeypatch.setenv("GPUWATCH_TEST_SLACK_URL", servers["slack"].url)
    doc = {
        "hosts": ["localhost", {"name": "dead", "address": DEAD_ADDRESS, "port": 1, "connect_timeout": "2s"}],
        "ssh": {"use_ssh_config": False, "known_hosts": str(tmp_path / "known_hosts")},
        "state_dir": str(tmp_path / "state"),
        "feishu": {
            "url": servers["feishu"].url,
            "keyword": KEYWORD,
            "secret_env": "GPUWATCH_TEST_FEISHU_SECRET",
            "format": "card",
        },
        "dingtalk": {
            "url": servers["dingtalk"].url,
            "keyword": KEYWORD,
            "secret_env": "GPUWATCH_TEST_DINGTALK_SECRET",
        },
        "wecom": {"url": servers["wecom"].url},
        "slack": {"url_env": "GPUWATCH_TEST_SLACK_URL"},
        "schedule": {"poll_every": "1s", "reports": [{"report": "overview", "every": "1h"}]},
        "alerts": {"host_down": {"after": 1}, "temperature_above": 50},
        "web": {"listen": "127.0.0.1:0", "public_url": PUBLIC_URL},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    path.chmod(0o600)
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue(), capsys.readouterr().err


def test_once_delivers_overview_and_alerts_to_every_chat_platform(
    tmp_path: Path,
    local_standin: Path,
    platforms: dict[str, FakeHook],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = write_config(tmp_path, platforms, monkeypatch)

    code, out, err = run(capsys, "run", "--once", "-c", str(config))

    assert code == 0, err
    for name, server in platforms.items():
        assert server.codes and set(server.codes) == {0}, (name, server.exchanges[-1].reason)
        views = [seen_by(name, body).text for body in server.accepted]
        alerts = [v for v in views if "GPU alerts" in v]
        overviews = [v for v in views if "GPU overview" in v]
        assert alerts and overviews, name
        everything = "\n".join(views)
        for host in ("localhost", "dead"):  # every host present, in the overview of each platform
            assert any(host in v for v in overviews), (name, host)
        assert "connection refused" in everything  # the dead host says why
        assert "FIRING host_down (dead)" in everything and "FIRING temperature_above (localhost, GPU 0)" in everything
        assert "localhost GPU 0 is at 59°C" in everything
        assert all(seen_by(name, body).mentions == () for body in server.accepted)
        assert any(PUBLIC_URL in seen_by(name, body).links for body in server.accepted), name
    for body in platforms["feishu"].accepted:
        assert card_problems(body["card"]) == []
    assert not (tmp_path / "state").joinpath("outbox").exists()
    secrets = [FEISHU_SECRET, DINGTALK_SECRET, *(s.token for s in platforms.values())]
    log = (tmp_path / "state" / "gpuwatch.log").read_text(encoding="utf-8")
    for secret in secrets:
        for piece in secret.split("/"):
            assert piece not in out and piece not in err and piece not in log


def test_test_notify_and_dry_run_cover_every_channel(
    tmp_path: Path,
    local_standin: Path,
    platforms: dict[str, FakeHook],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = write_config(tmp_path, platforms, monkeypatch)
    code, out, err = run(capsys, "test-notify", "-c", str(config))
    assert code == 0, err
    assert out == "feishu: accepted\ndingtalk: accepted\nwecom: accepted\nslack: accepted\n"
    for server in platforms.values():
        assert len(server.accepted) == 1
        server.reset()

    code, out, err = run(capsys, "run", "--dry-run", "-c", str(config))
    assert code == 0, err
    assert all(not server.exchanges for server in platforms.values())  # nothing sent
    for name in platforms:
        assert f"----- would send to {name} -----" in out
    assert out.count("dead · NO DATA (unreachable)") == 4  # each channel shows the dead host

    # a wrong DingTalk secret: that channel says what to fix, the others are still accepted
    monkeypatch.setenv("GPUWATCH_TEST_DINGTALK_SECRET", "SECnot-the-robots")
    code, out, err = run(capsys, "test-notify", "-c", str(config))
    assert code == 1
    assert "dingtalk: NOT accepted: " in out and "signature rejected (310000)" in out
    assert "feishu: accepted" in out and "wecom: accepted" in out and "slack: accepted" in out
    assert "SECnot-the-robots" not in out and platforms["dingtalk"].token not in out
