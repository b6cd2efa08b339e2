"""Acknowledge versus silence, and the alert messages a person reads (issue 19 items 3, 4, 9).

An ack stops the reminders of the alerts firing when it is made; RESOLVED is still said and the
ack ends with its alerts. The ack line is printed where ``alerts.command_lines`` allows it (by
default: channels that reach admins, e-mail); a group is told in words. Titles count entries as
shown. ``silence add --user`` warns of a user no host has shown.
"""

from __future__ import annotations

import io
import json
import os
import stat
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from builders import HOUR, MIN, T0, Engine, alerts_config, alice, down, error_host, h100_host, kinds
from fleet import ERR_VERSION_MISMATCH
from gpuwatch.cli import main
from gpuwatch.config import ConfigError
from gpuwatch.config.load import parse_config
from gpuwatch.config.records import FreeGpuConfig
from gpuwatch.daemon import Daemon
from gpuwatch.message import Body
from gpuwatch.model import FleetSnapshot
from gpuwatch.notify.feishu_card import designed
from gpuwatch.report import ACK_WORDS, alert_message, free_report, overview
from gpuwatch.rules import Ack, AlertKey, AlertRecord, Transition, acknowledged_ids
from gpuwatch.store import AlertStore, Outbox, open_db

KEY = "max_gpus_per_user|gpu-a||alice||"


# ---------------------------------------------------------------- the lifecycle


def test_an_acknowledged_alert_gets_no_reminder_and_still_resolves() -> None:
    engine = Engine(alerts_config(max_gpus_per_user=2, repeat_every="1h"))
    over = h100_host("gpu-a", alice([0, 1, 2]))
    assert kinds(engine.step(T0, over)) == [("firing", KEY)]
    ack = Ack(1, T0 + MIN, {KEY: engine.records[KEY].since})
    engine.acknowledged = acknowledged_ids([ack], engine.records, T0 + MIN)
    assert engine.acknowledged == {KEY}
    for hour in range(1, 5):
        assert engine.step(T0 + hour * HOUR, over) == []  # no reminder while acknowledged
    assert kinds(engine.step(T0 + 5 * HOUR, h100_host("gpu-a", alice([0])))) == [("resolved", KEY)]
    assert not ack.live(engine.records, T0 + 5 * HOUR)  # its alert resolved: it ends


def test_without_the_ack_the_same_alert_is_reminded() -> None:
    engine = Engine(alerts_config(max_gpus_per_user=2, repeat_every="1h"))
    over = h100_host("gpu-a", alice([0, 1, 2]))
    engine.step(T0, over)
    assert kinds(engine.step(T0 + HOUR, over)) == [("reminder", KEY)]


def test_an_ack_covers_one_firing_of_an_alert_and_ends_at_its_time() -> None:
    record = AlertRecord(AlertKey("max_gpus_per_user", "gpu-a", user="alice"), "firing", T0, fired_at=T0)
    ack = Ack(1, T0, {KEY: T0}, ends_at=T0 + HOUR)
    assert ack.covers(record, T0 + MIN) and not ack.covers(record, T0 + HOUR)
    again = AlertRecord(record.key, "firing", T0 + 2 * HOUR)  # resolved and fired again: news
    assert not Ack(2, T0, {KEY: T0}).covers(again, T0 + 2 * HOUR)


# ---------------------------------------------------------------- the store


def test_the_store_keeps_acks_prunes_those_whose_alerts_resolved_and_users_seen(tmp_path: Path) -> None:
    db = open_db(tmp_path)
    store = AlertStore(db)
    record = AlertRecord(AlertKey("max_gpus_per_user", "gpu-a", user="alice"), "firing", T0, fired_at=T0)
    ack = store.add_ack(alerts={KEY: T0}, now=T0, comment="on it", rule="max_gpus_per_user", author="bob")
    (kept,) = store.acks()
    assert kept == ack and kept.describe() == "rule=max_gpus_per_user" and kept.comment == "on it"
    assert store.prune_acks({KEY: record}, T0) == 0
    assert store.prune_acks({}, T0) == 1 and store.acks() == []
    again = store.add_ack(alerts={KEY: T0}, now=T0)
    assert store.remove_ack(again.id) and not store.remove_ack(again.id)
    store.saw_users(["alice", "bob", "alice"], T0)
    assert store.users_seen() == ["alice", "bob"]
    db.close()


# ---------------------------------------------------------------- what the messages say


def _firing(*gpus: int) -> list[Transition]:
    engine = Engine(alerts_config(temperature_above=55))
    return engine.step(T0, h100_host("gpu-a", alice(list(gpus))))


def test_a_group_message_says_in_words_how_to_acknowledge_and_prints_no_command() -> None:
    message = alert_message(_firing(0, 1), [], {}, tz=timezone.utc, command=None)
    assert message is not None
    assert "ack --rule" not in message.text and "silence add" not in message.text
    assert message.text.count(ACK_WORDS) == 1 and message.blocks[-1] == ACK_WORDS


def test_an_admin_message_prints_the_ack_line_with_the_command_given() -> None:
    message = alert_message(_firing(0), [], {}, config_path="/etc/gpuwatch/config.yaml", command="/opt/gw/bin/gpuwatch")
    assert message is not None and ACK_WORDS not in message.text
    assert message.blocks[0].endswith(
        "    an admin can acknowledge it: /opt/gw/bin/gpuwatch -c /etc/gpuwatch/config.yaml ack "
        "--rule temperature_above --host gpu-a --gpu 0"
    )


def test_the_title_counts_entries_and_the_card_says_the_count_once() -> None:
    message = alert_message(_firing(0, 1, 2), [], {}, command=None)
    assert message is not None and message.body is not None
    assert message.title == "GPU alerts: 1 firing (3 alerts)"
    assert message.body.tags == (("1 firing (3 alerts)", "firing"),)  # coloured as firing
    card = designed(message.title, message.body, message.body.sections, (), None)
    assert card["header"]["title"]["content"] == "GPU alerts" and "subtitle" not in card["header"]
    assert [t["text"]["content"] for t in card["header"]["text_tag_list"]] == ["1 firing (3 alerts)"]
    overview = Body("4 hosts, 32 GPUs, 3 free", "free", (), (("3 free", "free"),))
    assert designed("GPU overview", overview, (), (), None)["header"]["subtitle"]["content"] == overview.summary


def test_a_code_word_as_the_value_reads_as_words() -> None:
    key = AlertKey("gpu_error", "gpu-c", detail="driver_mismatch")
    record = AlertRecord(key, "firing", T0, facts={"error": "NVIDIA driver/library version mismatch"}, fired_at=T0)
    message = alert_message([Transition("firing", record, T0)], [], {})
    assert message is not None
    assert "now: driver mismatch; threshold: no GPU error" in message.text


# ---------------------------------------------------------------- the command that runs as printed


def _script(directory: Path) -> Path:
    script = directory / "gpuwatch"
    script.write_text("#!/bin/sh\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_alerts_command_lines_is_admins_all_or_none() -> None:
    assert parse_config({"hosts": ["a"]}).alerts.command_lines == "admins"
    cfg = parse_config({"hosts": ["a"], "alerts": {"host_down": True, "command_lines": "none"}})
    assert cfg.alerts.command_lines == "none"
    with pytest.raises(ConfigError, match=r"alerts\.command_lines: 'some' is not one of admins, all, none"):
        parse_config({"hosts": ["a"], "alerts": {"host_down": True, "command_lines": "some"}})


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    doc = {"hosts": ["gpu-a", "gpu-b"], "state_dir": str(tmp_path / "state")}
    path.write_text(yaml.safe_dump(doc))
    os.chmod(path, 0o600)
    return path


def _cli(config: Path, *args: str) -> tuple[int, str]:
    out = io.StringIO()
    return main([*args, "-c", str(config)], out=out), out.getvalue()


def _seed(tmp_path: Path) -> None:
    db = open_db(tmp_path / "state")
    store = AlertStore(db)
    now = time.time()
    records = {
        r.key.id: r
        for r in (
            AlertRecord(AlertKey("temperature_above", "gpu-a", gpu=0), "firing", now - 60, 59, 55, "°C", fired_at=now),
            AlertRecord(AlertKey("temperature_above", "gpu-b", gpu=1), "firing", now - 60, 60, 55, "°C", fired_at=now),
        )
    }
    store.save(records, store.memory(), now)
    store.saw_users(["alice"], now)
    db.close()


def test_ack_alerts_filters_list_and_remove(tmp_path: Path) -> None:
    config = _config(tmp_path)
    _seed(tmp_path)
    assert _cli(config, "ack", "--rule", "gpu_error", "--host", "gpu-a")[0] == 1  # nothing fires there
    code, said = _cli(config, "ack", "--host", "gpu-a", "--comment", "cooling fixed at 3pm", "--author", "bob")
    assert code == 0 and said.startswith("ack #1 added by bob: 1 firing alert (host=gpu-a): no more reminders")
    assert _cli(config, "alerts")[0] == 1  # gpu-b's is not acknowledged
    code, shown = _cli(config, "alerts", "--host", "gpu-a")
    assert code == 0 and "gpu-b" not in shown
    assert "FIRING (acknowledged #1) temperature_above" in shown
    assert "acknowledged by bob at " in shown and "(ack #1): cooling fixed at 3pm" in shown
    doc = json.loads(_cli(config, "alerts", "--json", "--rule", "temperature_above", "--host", "gpu-b")[1])
    assert [a["key"]["host"] for a in doc["alerts"]] == ["gpu-b"] and doc["alerts"][0]["acknowledged"] == []
    (ack,) = doc["acks"]
    assert ack["author"] == "bob" and ack["comment"] == "cooling fixed at 3pm" and ack["host"] == "gpu-a"
    code, shown = _cli(config, "alerts", "--rule", "gpu_error")
    assert code == 0 and "no such alerts firing" in shown
    code, listed = _cli(config, "ack", "list")
    assert code == 0 and listed.startswith("#1  host=gpu-a  1 alert firing by bob at ")
    assert _cli(config, "ack", "remove", "#1") == (0, "ack #1 removed: reminders start again\n")
    assert _cli(config, "ack", "remove", "1") == (1, "no ack #1\n")


def test_silence_add_for_a_user_never_seen_warns_with_the_closest_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path)
    _seed(tmp_path)
    code, said = _cli(config, "silence", "add", "--user", "alcie", "--for", "1h", "--comment", "x")
    assert code == 0 and said.startswith("silence #1 added: user=alcie")
    err = capsys.readouterr().err
    assert "no host has shown a user 'alcie' yet; did you mean 'alice'?" in err
    assert "gpuwatch silence remove 1" in err
    assert _cli(config, "silence", "add", "--user", "alice", "--for", "1h", "--comment", "x")[0] == 0
    assert "warning" not in capsys.readouterr().err


def test_a_long_reason_shared_by_hosts_is_said_once_per_report() -> None:
    broken = [error_host(name, ERR_VERSION_MISMATCH) for name in ("gpu-c", "gpu-d", "gpu-e")]
    hosts = (h100_host("gpu-a"), *broken, down("gpu-f"))
    snapshot = FleetSnapshot(taken_at=datetime.fromtimestamp(T0, timezone.utc), hosts=hosts)
    explanation = broken[0].error
    assert explanation and len(explanation) > 150
    for message in (overview(snapshot, FreeGpuConfig()), free_report(snapshot, FreeGpuConfig())):
        assert message.text.count(explanation) == 1
        assert "gpu-d: NO DATA (driver_mismatch): the same as gpu-c" in message.text
        assert "connection refused by gpu-f:22" in message.text  # another reason: said as it is
        assert message.body is not None
        said = [s.note for s in message.body.sections if s.title in ("gpu-d", "gpu-e")]
        assert said == ["NO DATA (driver_mismatch): the same as gpu-c"] * 2


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("admins", {"feishu": False, "email": True, "console": True}),
        ("all", dict.fromkeys(("feishu", "email", "console"), True)),
        ("none", dict.fromkeys(("feishu", "email", "console"), False)),
    ],
)
def test_which_channels_get_the_command_line(setting: str, expected: dict[str, bool]) -> None:
    doc = {"hosts": ["gpu-a"], "alerts": {"host_down": True, "command_lines": setting}}
    config = parse_config(doc)
    db = open_db(None)
    daemon = Daemon(config, None, Outbox(db), {}, alert_store=AlertStore(db))  # type: ignore[arg-type]
    assert {name: daemon.command_lines(name) for name in expected} == expected
    db.close()


def test_a_database_of_the_schema_before_acks_read_only_has_no_acks(tmp_path: Path) -> None:
    """An admin reading the service's state (read-only) before the daemon brought it up to date."""
    db = open_db(None)
    db.connection.execute("DROP TABLE acks")
    db.connection.execute("DROP TABLE users_seen")
    store = AlertStore(db)
    assert store.acks() == [] and store.users_seen() == []
    db.close()
