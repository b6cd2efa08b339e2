"""Config mistakes a new admin makes, each said as what is probably wrong: YAML indentation and tab
mistakes with line and column, an ``ssh:`` block whose keys lost their indentation, and an
``alerts:`` section that only tunes timing keeping the default rules on."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpuwatch.config import ConfigError
from gpuwatch.config.load import load_config, parse_config
from gpuwatch.rules.registry import default_rules


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    return path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hosts:\n\t- gpu-a\n", "line 2, column 1: invalid YAML: a tab is not allowed for indentation"),
        (
            "hosts: [a]\nssh:\n  user: x\n\tport: 22\n",
            "line 4, column 1: invalid YAML: a tab is not allowed for indentation",
        ),
        (
            "hosts: [a]\nssh:\n  user: x\n    port: 22\n",
            "line 4, column 9: invalid YAML: the key on line 4 is indented wrongly (further in than the key above it)",
        ),
        (
            "hosts: [a]\nssh:\n    user: x\n  port: 22\n",
            "line 4, column 3: invalid YAML: the key on line 4 is indented wrongly: it lines up with none of the keys",
        ),
        (
            "hosts: [a]\nfeishu:\n  keyword: GPU: alert\n",
            "line 3, column 15: invalid YAML: a value holds ': '; put the value in quotes",
        ),
        ("hosts:\n  - a\n - b\n", "line 3, column 2: invalid YAML: the list item on line 3 is indented wrongly"),
        ("hosts:\n  - a\nssh\n", "line 3, column 1: invalid YAML: line 3 has no ':' after its key"),
    ],
)
def test_yaml_mistakes_say_what_is_probably_wrong(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path} {expected}"), message
    assert "mapping values are not allowed here" not in message and "<block end>" not in message
    assert "(the line reads: " in message and "\n" not in message


def test_an_ssh_block_that_lost_its_indentation_is_refused() -> None:
    # "ssh:" with its keys at the top level used to pass as the predecessor's flat keys
    with pytest.raises(ConfigError, match=r"ssh: is empty, and port:, user: stand at the top level: indent them"):
        parse_config({"hosts": ["a"], "ssh": None, "user": "gpuwatch", "port": 2222})
    with pytest.raises(ConfigError, match=r"key_file: is an ssh: key, not a top-level one; indent it under ssh:"):
        parse_config({"hosts": ["a"], "ssh": None, "key_file": "/etc/gpuwatch/id_ed25519"})
    # the predecessor's flat file (no ssh: at all) still reads as before
    old = parse_config({"ip_list": ["a"], "user": "gpuwatch", "port": 2222})
    assert (old.ssh.user, old.ssh.port) == ("gpuwatch", 2222)


@pytest.mark.parametrize("key", ["repeat_every", "for", "send_resolved", "routes"])
def test_alerts_that_only_tune_timing_keep_the_default_rules(key: str) -> None:
    value = {"repeat_every": "2h", "for": "1m", "send_resolved": False, "routes": {"default": ["slack"]}}[key]
    doc = {"hosts": ["a"], "slack": {"url_env": "SLACK_URL"}, "alerts": {key: value}}
    config = parse_config(doc)
    assert set(config.alerts.rules) == set(default_rules()) == {"gpu_error", "gpu_missing", "host_down"}
    # naming a rule still lists what is wanted: the rules left out are off
    named = parse_config({**doc, "alerts": {key: value, "idle_gpu": {"after": "2h"}}})
    assert set(named.alerts.rules) == {"idle_gpu"}
