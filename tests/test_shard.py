"""Shards (``--shard K/N``, ``shard:``): a stable split of the fleet by host name, refused clearly when
the value is wrong, said by ``check`` and ``status`` (table and JSON) and in ``/metrics``.

Hosts are ``localhost`` replaying real captures through the stand-in nvidia-smi (no root needed) and
loopback addresses where nothing listens; the two-daemon test over the real sshd fleet is in
test_shard_e2e.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from builders import cli, write_config
from gpuwatch.config import ConfigError
from gpuwatch.config.load import parse_config
from gpuwatch.config.shard import Shard, in_shard, parse_shard, shard_doc, shard_number, shard_words
from gpuwatch.metrics import shard_metric
from waiting import wait_for


def gone(name: str) -> dict[str, Any]:
    """A host where nothing listens (connection refused at once)."""
    return {"name": name, "address": "127.0.0.1", "port": 9, "connect_timeout": "2s"}


# localhost and gone-1 are in shard 1 of 2; gone-2 in shard 2 (pinned below: the hash is stable).
HOSTS = ["localhost", gone("gone-1"), gone("gone-2")]


def test_the_hash_is_sha256_of_the_name_the_same_in_every_process() -> None:
    names = [f"gpu-{i:03d}" for i in range(300)]
    for count in (1, 2, 3, 7):
        for name in names:
            expected = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % count + 1
            assert shard_number(name, count) == expected
        # every host in exactly one shard
        held = [name for k in range(1, count + 1) for name in names if Shard(k, count).holds(name)]
        assert sorted(held) == sorted(names)
    assert [shard_number(n, 2) for n in ("localhost", "gone-1", "gone-2")] == [1, 1, 2]
    # not Python's hash(): another process with another hash seed puts each host in the same shard
    code = "from gpuwatch.config.shard import shard_number; print([shard_number(f'gpu-{i}', 5) for i in range(50)])"
    runs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "2", "random")
    }
    assert runs == {str([shard_number(f"gpu-{i}", 5) for i in range(50)]) + "\n"}


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("0/2", "shard: 0/2: the shard K must be 1 to 2, the number of shards"),
        ("3/2", "shard: 3/2: the shard K must be 1 to 2, the number of shards"),
        ("a/b", "shard: 'a/b' is not a shard K/N (e.g. 1/2 for the first of two shards)"),
        ("2", "shard: '2' is not a shard K/N"),
        ("1/0", "shard: 1/0: the number of shards N must be 1 to 1000"),
        ("-1/2", "shard: '-1/2' is not a shard K/N"),
        (True, "shard: True is not a shard K/N"),
    ],
)
def test_bad_shards_are_refused_naming_what_is_wrong(value: object, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_shard(value)
    assert str(caught.value).startswith(words)
    with pytest.raises(ConfigError) as in_config:
        parse_config({"hosts": ["a"], "shard": value})
    assert str(in_config.value).startswith(words)


def test_a_good_shard_and_its_words() -> None:
    assert parse_shard(" 2 / 3 ") == Shard(2, 3) and str(Shard(2, 3)) == "2/3"
    config = parse_config({"hosts": ["localhost", "gone-1", "gone-2"], "shard": "2/2"})
    assert config.shard == Shard(2, 2) and len(config.hosts) == 3  # read, not applied: the command applies it
    mine = in_shard(config, None)
    assert [h.name for h in mine.hosts] == ["gone-2"] and len(mine.all_hosts) == 3
    assert shard_words(mine) == "shard 2/2: 1 of 3 hosts"
    assert shard_doc(mine) == {"shard": "2/2", "hosts": 1, "of": 3}
    # the flag wins over the config, and a cut config is cut again from the whole list
    flagged = in_shard(mine, Shard(1, 2))
    assert [h.name for h in flagged.hosts] == ["localhost", "gone-1"] and flagged.shard == Shard(1, 2)
    whole = parse_config({"hosts": ["a"]})
    assert in_shard(whole, None) is whole and shard_doc(whole) is None and shard_words(whole) == ""
    metric = shard_metric(mine)
    assert [(s.name, s.labels, s.value) for s in metric.samples] == [("gpuwatch_shard_hosts", {"shard": "2/2"}, 1.0)]
    assert [s.labels for s in shard_metric(whole).samples] == [{"shard": "1/1"}]


@pytest.mark.parametrize("command", ["run", "status", "check"])
def test_a_bad_shard_on_the_command_line_is_a_usage_error(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, HOSTS)
    with pytest.raises(SystemExit) as exited:
        cli(config, command, "--shard", "3/2")
    assert exited.value.code == 2
    assert "argument --shard: 3/2: the shard K must be 1 to 2, the number of shards" in capsys.readouterr().err


def test_check_says_which_shard_it_is_and_names_settings_as_the_config_does(
    local_standin: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, ["localhost", {**gone("gone-1"), "key_file": str(tmp_path / "missing")}, "gone-2"])
    code, out = cli(config, "check", "--shard", "1/2")
    assert code == 2, out  # the missing key file of a host of this shard
    assert "shard 1/2: 2 of 3 hosts (this daemon polls only these)" in out
    assert f"hosts[1].key_file: FAILED: {tmp_path / 'missing'} does not exist" in out  # its place in the config
    assert "gone-2" not in out and "1/2 hosts OK" in out
    code, out = cli(config, "check", "--json", "--shard", "2/2")
    doc = json.loads(out)
    assert doc["shard"] == {"shard": "2/2", "hosts": 1, "of": 3}
    assert [h["name"] for h in doc["hosts"]] == ["gone-2"]


def test_status_says_its_shard_in_the_table_and_the_json(
    local_standin: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, HOSTS, shard="2/2")
    code, out = cli(config, "status", "--shard", "1/2", "--no-color")  # the flag wins over shard: 2/2
    assert code == 0, out
    assert out.rstrip().endswith("shard 1/2: 2 of 3 hosts") and "gone-2" not in out
    code, out = cli(config, "status", "--json")  # the config's shard
    doc = json.loads(out)
    assert code == 1 and doc["shard"] == {"shard": "2/2", "hosts": 1, "of": 3}
    assert [h["name"] for h in doc["hosts"]] == ["gone-2"]
    code, out = cli(config, "status", "localhost")
    assert code == 2
    assert "'localhost' is in another shard than this one (shard 2/2: 1 of 3 hosts)" in capsys.readouterr().err
    code, out = cli(write_config(tmp_path, ["localhost"]), "status", "--json")
    assert "shard" not in json.loads(out)  # the whole fleet: the document as before


def test_the_flag_still_holds_after_a_reload_and_the_daemon_says_its_shard(tmp_path: Path) -> None:
    """``run --shard 2/2`` with ``shard: 1/2`` in the config: the flag wins at start and after SIGHUP,
    when a new host of shard 2 starts polling and one of shard 1 does not."""
    config = write_config(tmp_path, [gone("gone-1"), gone("gone-2")], shard="1/2", web={"listen": "127.0.0.1:0"})
    log = tmp_path / "daemon.stderr"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpuwatch", "run", "-v", "--shard", "2/2", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        found: list[str] = []

        def started() -> bool:
            assert proc.poll() is None, log.read_text()
            found[:] = re.findall(r"web page at (http://\S+)", log.read_text())
            return bool(found)

        wait_for(started, 30, "the daemon's page")

        def hosts() -> list[str]:
            with urllib.request.urlopen(found[0] + "api/v1/snapshot", timeout=10) as response:
                doc = json.loads(response.read())
            assert doc["shard"]["shard"] == "2/2"
            return [h["name"] for h in doc["hosts"]]

        assert hosts() == ["gone-2"]
        assert "shard 2/2: 1 of 2 hosts (gone-2)" in log.read_text()
        more = [gone("gone-1"), gone("gone-2"), gone("gone-3"), gone("gpu-a")]
        write_config(tmp_path, more, shard="1/2", web={"listen": "127.0.0.1:0"})
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: hosts() == ["gone-2", "gpu-a"], 30, "the reload to add gpu-a (shard 2) and not gone-3")
        assert "shard 2/2: 2 of 4 hosts (gone-2, gpu-a)" in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    assert proc.returncode == 0 and "Traceback" not in log.read_text()
