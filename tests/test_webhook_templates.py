"""Webhook templates: checked when the config is read (one ConfigError naming the file and the
place), host text escaped per target (the ``_markdown`` fields), and a channel that cannot
prepare its message costs that channel only (issue 20 E1, E6)."""

from __future__ import annotations

import io
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import yaml

from fakechat import FakeReceiver
from fakefeishu import FakeFeishu, seen
from fakehook import render_chat_markdown
from gpuwatch.cli import main
from gpuwatch.config.load import parse_config
from gpuwatch.config.values import ConfigError
from gpuwatch.message import Message
from gpuwatch.notify.markup import WORD_JOINER, chat_markdown
from gpuwatch.notify.spec import Transport
from gpuwatch.notify.webhook import build, parse

HOSTILE = "@everyone @here <!here> [click](https://evil.example/x)"


# ---------------------------------------------------------------------- the _markdown fields


@pytest.mark.parametrize(
    "hostile",
    [
        HOSTILE,
        "@channel @all @alice <!channel> <!everyone|all> <@U0123ABCD> <@!80351110224678912> <@&165511591545143296>",
        "<https://evil.example/x|click> <https://evil.example/y> https://evil.example/z www.evil.example",
        "mail bob@evil.example, HTTPS://EVIL.EXAMPLE/x, ftp://evil.example/f",
        "train.py --lr *3e-4* _b_ ~~s~~ `code` ||spoiler|| # head > quote \\[x\\](y) &lt;!here&gt;",
        "[a]\n(https://evil.example/split) [b] (https://evil.example/space) ![img](https://evil.example/i.png)",
    ],
)
def test_chat_markdown_shows_host_text_as_written_and_mentions_no_one(hostile: str) -> None:
    rendered = render_chat_markdown(chat_markdown(hostile))
    assert rendered.mentions == () and rendered.links == () and rendered.emphasis == ()
    assert rendered.text == hostile  # as written: the escapes and word joiners are not seen
    assert render_chat_markdown(hostile).mentions or render_chat_markdown(hostile).links or "`" in hostile


def test_chat_markdown_keeps_lines_and_plain_words() -> None:
    text = "gpu-a, 1 GPU\n    GPU 0: pid 4100 python train.py, 1024 MiB, up 2h"
    assert chat_markdown(text) == text
    assert chat_markdown("a@b") == f"a@{WORD_JOINER}b"


def _channel(tmp_path: Path, template: object, **section: Any) -> Any:
    settings = parse({"url": "http://127.0.0.1:9/hooks/x", "template": template, **section}, tmp_path)
    return build(settings, Transport())


def test_templates_place_the_markdown_fields_and_write_keys_as_they_are(tmp_path: Path) -> None:
    template = {
        "text": "{{text_markdown}}",
        "title": "{{ title_markdown }}",
        "summary": "{{summary_markdown}}",
        "blocks": "{{blocks_markdown}}",
        "raw": "{{text}}",
        "{not a placeholder}": "{{part}}/{{parts}}",
    }
    message = Message(title="GPU report", blocks=(HOSTILE, "gpu-b idle"), kind="report")
    (document,) = _channel(tmp_path, template).prepare(message)
    assert document["raw"] == f"GPU report\n\n{HOSTILE}\n\ngpu-b idle"  # raw, for JSON consumers
    assert document["text"] == chat_markdown(document["raw"]) and document["title"] == "GPU report"
    assert document["blocks"] == [chat_markdown(HOSTILE), "gpu-b idle"]
    assert document["{not a placeholder}"] == "1/1"
    assert render_chat_markdown(document["text"]).mentions == ()


# ---------------------------------------------------------------------- checked when the config is read


@pytest.mark.parametrize(
    ("document", "error"),
    [
        ({"{{blocks}}": 1}, r"a placeholder in a key \('\{\{blocks\}\}'\) at \$\[\"\{\{blocks\}\}\"\] in .*hook\.json"),
        ({"a": [{"b": {"x {{text}}": 1}}]}, r"a placeholder in a key .* at \$\.a\[0\]\.b\[\"x \{\{text\}\}\"\]"),
        ({"text": "{{body}}"}, r"unknown placeholder\(s\) body at \$\.text in .*hook\.json; known: source"),
        ({"text": "{{ Text }} {{text}}"}, r"unknown placeholder\(s\) Text at \$\.text"),
        ({"a": {"b": ["{{text}}", "{{txt}}"]}}, r"unknown placeholder\(s\) txt at \$\.a\.b\[1\]"),
        ({"n": float("nan")}, r"a document that does not render to JSON"),
    ],
)
def test_a_bad_template_file_is_one_config_error_naming_the_file_and_the_place(
    tmp_path: Path, document: object, error: str
) -> None:
    path = tmp_path / "hook.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    doc = {"hosts": ["a"], "webhook": {"url": "https://chat.lab.example/hooks/x", "template": "hook.json"}}
    with pytest.raises(ConfigError, match=rf"^webhook\.template: {error}"):
        parse_config(doc, tmp_path / "config.yaml")


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (None, r"webhook\.template: cannot read .*hook\.json: No such file"),
        ('{"text": ', r"webhook\.template: .*hook\.json is not JSON"),
    ],
)
def test_an_unreadable_template_fails_when_the_config_is_read(tmp_path: Path, content: str | None, error: str) -> None:
    if content is not None:
        (tmp_path / "hook.json").write_text(content, encoding="utf-8")
    doc = {"hosts": ["a"], "webhook": {"url": "https://chat.lab.example/hooks/x", "template": "hook.json"}}
    with pytest.raises(ConfigError, match=error):
        parse_config(doc, tmp_path / "config.yaml")


def test_a_template_written_in_the_config_is_checked_the_same(tmp_path: Path) -> None:
    doc: dict[str, Any] = {"hosts": ["a"], "webhook": {"url": "https://chat.lab.example/hooks/x"}}
    doc["webhook"]["template"] = {"text": "{{text_markdown}}", "allowed_mentions": {"parse": []}}
    config = parse_config(doc, tmp_path / "config.yaml")
    assert config.channels["webhook"].template == doc["webhook"]["template"]
    doc["webhook"]["template"] = {"{{blocks}}": 1}
    with pytest.raises(
        ConfigError, match=r"^webhook\.template: a placeholder in a key .* at \$\[\"\{\{blocks\}\}\"\];"
    ):
        parse_config(doc, tmp_path / "config.yaml")


def _config(tmp_path: Path, **sections: Any) -> Path:
    doc = {"hosts": ["localhost"], "state_dir": str(tmp_path / "state"), **sections}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    path.chmod(0o600)
    return path


@pytest.mark.parametrize("command", [["check"], ["run", "--once"], ["run"]])
def test_check_and_run_refuse_a_placeholder_in_a_key_with_exit_2(
    tmp_path: Path, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "hook.json").write_text('{"{{blocks}}": 1}', encoding="utf-8")
    config = _config(tmp_path, webhook={"url": "https://chat.lab.example/hooks/x", "template": "hook.json"})
    assert main([*command, "-c", str(config)], out=io.StringIO()) == 2
    err = capsys.readouterr().err
    assert "webhook.template: a placeholder in a key ('{{blocks}}')" in err and str(tmp_path / "hook.json") in err
    assert "Traceback" not in err


# ---------------------------------------------------------------------- one channel's failure


def test_a_channel_that_cannot_prepare_its_message_costs_that_channel_only(
    tmp_path: Path, local_standin: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A template whose fixed text alone is over max_bytes passes the checks, and the webhook can
    make no part of any message: Feishu still gets every message, the webhook's are kept in the
    outbox as refused for good, each said in one line and no traceback."""
    (tmp_path / "hook.json").write_text(json.dumps({"text": "{{text}}", "pad": "x" * 400}), encoding="utf-8")
    with FakeFeishu() as feishu, FakeReceiver() as hook:
        config = _config(
            tmp_path,
            feishu={"url": feishu.url, "format": "post"},
            webhook={"url": hook.url, "max_bytes": 256, "template": "hook.json"},
            alerts={"temperature_above": 50},
            schedule={"reports": [{"report": "overview", "every": "1h"}]},
        )
        code = main(["run", "--once", "-c", str(config)], out=io.StringIO())
        err = capsys.readouterr().err
        views = [seen(body).text for body in feishu.accepted]
        assert hook.accepted == [] and hook.exchanges == []
    assert any("GPU overview" in v for v in views) and any("GPU alerts" in v for v in views)
    log = (tmp_path / "state" / "gpuwatch.log").read_text(encoding="utf-8")
    failures = [line for line in log.splitlines() if "not sent to webhook" in line]
    assert len(failures) == 2, failures  # the overview and the alerts: one line each
    assert all("webhook.max_body_bytes=256 cannot hold" in line for line in failures)
    assert "Traceback" not in log and "Traceback" not in err
    with sqlite3.connect(tmp_path / "state" / "gpuwatch.sqlite3") as db:
        rows = db.execute("SELECT channel, summary, dead, last_error FROM outbox ORDER BY id").fetchall()
    assert [(r[0], r[2]) for r in rows] == [("webhook", 1), ("webhook", 1)]
    assert {r[1].split(" ")[1] for r in rows} == {"overview", "alerts:"}
    assert all("ValueError: webhook.max_body_bytes=256" in r[3] for r in rows)
    assert code == 1  # a message left unsent (for the webhook)


def test_test_notify_says_which_channel_cannot_prepare_and_tries_the_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "hook.json").write_text(json.dumps({"text": "{{text}}", "pad": "x" * 400}), encoding="utf-8")
    with FakeFeishu() as feishu, FakeReceiver() as hook:
        config = _config(
            tmp_path,
            webhook={"url": hook.url, "max_bytes": 256, "template": "hook.json"},
            feishu={"url": feishu.url},
        )
        out = io.StringIO()
        assert main(["test-notify", "-c", str(config)], out=out) == 1
        assert len(feishu.accepted) == 1 and hook.exchanges == []
    lines = out.getvalue().splitlines()
    assert "feishu: accepted" in lines
    assert "webhook: NOT prepared: ValueError: webhook.max_body_bytes=256 cannot hold" in out.getvalue()
    assert "Traceback" not in capsys.readouterr().err
