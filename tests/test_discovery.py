"""Discovery (``hosts_from:``) piece by piece: Slurm host lists, each source against a real thing
(a real ssh config file with Includes, a real command run by the local runner, a file on disk, an
HTTP server that answers like Consul's catalog API), the merge with ``hosts:``, the grace, the
config's errors, and the ``discovery_failed`` rule. The daemon end to end: test_discovery_e2e.py."""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pytest

from fakeconsul import FakeConsul, Node
from gpuwatch.cli import main
from gpuwatch.config import ConfigError, DiscoverySource, FreeGpuConfig
from gpuwatch.config.load import parse_config
from gpuwatch.config.shard import parse_shard
from gpuwatch.discovery import (
    CommandSource,
    ConsulSource,
    DiscoveredHost,
    Discovery,
    DiscoveryError,
    FileSource,
    HostListError,
    SshConfigSource,
    expand_hostlist,
    hosts_in_catalog,
    hosts_in_ssh_config,
    merge_hosts,
    merged,
    names_from_text,
)
from gpuwatch.discovery.consul import next_index
from gpuwatch.discovery.merge import expire, next_expiry, track
from gpuwatch.model import FleetSnapshot, SourceHealth
from gpuwatch.report import alert_message, alert_words
from gpuwatch.rules import AlertKey, Memory, advance, evaluate
from gpuwatch.rules.lifecycle import AlertRecord, Transition
from gpuwatch.ssh import LocalRunner

# ---------------------------------------------------------------- Slurm host lists


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("gpu01", ["gpu01"]),
        ("gpu[01-04,07]", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"]),
        ("gpu[8-11]", ["gpu8", "gpu9", "gpu10", "gpu11"]),
        ("gpu[08-11]", ["gpu08", "gpu09", "gpu10", "gpu11"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("a[1-2]b[3-4]", ["a1b3", "a1b4", "a2b3", "a2b4"]),
        ("gpu[1-2],login1,cpu[3]", ["gpu1", "gpu2", "login1", "cpu3"]),
        ("rack[1-2]-node[1,3].dc", ["rack1-node1.dc", "rack1-node3.dc", "rack2-node1.dc", "rack2-node3.dc"]),
        ("gpu[1-3],gpu[2-4]", ["gpu1", "gpu2", "gpu3", "gpu4"]),
        ("[1-2]x", ["1x", "2x"]),
    ],
)
def test_slurm_host_lists_expand_as_slurm_does(text: str, names: list[str]) -> None:
    assert expand_hostlist(text) == names


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("gpu[01-04", "'[' without ']'"),
        ("gpu01-04]", "']' without '['"),
        ("gpu[4-1]", "the range 4-1 runs backwards"),
        ("gpu[a-c]", "'a-c' is not a number or a range like 01-04"),
        ("gpu[1-2[3]]", "unbalanced brackets"),
        ("gpu[0-99999999]", "more than 100000 names"),
        ("a[0-999]b[0-999]", "more than 100000 names"),
    ],
)
def test_a_bad_host_list_is_refused_saying_why(text: str, why: str) -> None:
    with pytest.raises(HostListError, match=why.replace("[", r"\[").replace("]", r"\]")):
        expand_hostlist(text)


def test_host_names_from_text_skip_comments_and_blanks_and_name_the_line_of_a_bad_entry() -> None:
    text = "# GPU nodes\n\ngpu[01-02]   # rack 1\ngpu03\ngpu04,gpu05\n  \ngpu01\n"
    assert names_from_text(text) == ["gpu01", "gpu02", "gpu03", "gpu04", "gpu05"]
    with pytest.raises(HostListError, match=r"line 3: '-oProxyCommand=sh': not a host name"):
        names_from_text("gpu01\n\n-oProxyCommand=sh\n")
    with pytest.raises(HostListError, match=r"line 2: 'gpu\$\(reboot\)'"):
        names_from_text("gpu01\ngpu$(reboot)\n")
    with pytest.raises(HostListError, match=r"line 1: .*longer than 253"):
        names_from_text("a" * 300)


# ---------------------------------------------------------------- ssh_config

SSH_CONFIG = """\
# the lab's client config
Host *
    ServerAliveInterval 30
    User nobody

Host gpu-a gpu-b
    HostName 10.0.0.11
    Port 2222

Host gpu-b
    HostName 10.0.0.12

Host gpu-? !gpu-x
    User ops

Host login
    HostName login.example.org

Include conf.d/*.conf
Host=gpu-c
  User alice
"""


def test_ssh_config_gives_the_concrete_host_names_matching_the_pattern_with_their_hostname(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "10-more.conf").write_text("Host gpu-d\n  HostName 10.0.0.14\n")
    (tmp_path / "conf.d" / "20-cpu.conf").write_text("Host cpu-1\n")
    config = tmp_path / "config"
    config.write_text(SSH_CONFIG)
    spec = DiscoverySource("ssh_config", "ssh_config:config", pattern="gpu-*", path=str(config))
    source = SshConfigSource(spec)
    # Include paths are relative to ~/.ssh, as OpenSSH reads them: point it at this folder
    source.include_base = str(tmp_path)
    hosts = {h.name: h for h in source.fetch()}
    assert list(hosts) == ["gpu-a", "gpu-b", "gpu-d", "gpu-c"]
    assert hosts["gpu-a"] == DiscoveredHost("gpu-a", "10.0.0.11", 2222, "nobody")
    assert hosts["gpu-b"] == DiscoveredHost("gpu-b", "10.0.0.11", 2222, "nobody")  # first match wins, as ssh
    assert hosts["gpu-d"].address == "10.0.0.14"
    assert hosts["gpu-c"] == DiscoveredHost("gpu-c", None, None, "nobody")


def test_ssh_config_errors_say_which_file(tmp_path: Path) -> None:
    missing = DiscoverySource("ssh_config", "ssh_config:x", pattern="*", path=str(tmp_path / "nope"))
    with pytest.raises(DiscoveryError, match=r"nope: cannot read: No such file"):
        SshConfigSource(missing).fetch()
    loop = tmp_path / "loop"
    loop.write_text(f"Include {loop}\nHost a\n")
    with pytest.raises(DiscoveryError, match=r"loop: Include nested more than 8 deep"):
        SshConfigSource(DiscoverySource("ssh_config", "x", pattern="*", path=str(loop))).fetch()
    assert hosts_in_ssh_config("Host a b\nHost c*\n", "*") == [DiscoveredHost("a"), DiscoveredHost("b")]


# ---------------------------------------------------------------- file


def test_a_hosts_file_is_read_again_when_it_changes_and_a_bad_one_says_where(tmp_path: Path) -> None:
    path = tmp_path / "hosts.txt"
    path.write_text("# the GPU hosts\ngpu01\ngpu[02-03]\n")
    source = FileSource(DiscoverySource("file", "file:hosts.txt", path=str(path), refresh=60))
    assert [h.name for h in source.fetch()] == ["gpu01", "gpu02", "gpu03"]
    stop = threading.Event()
    threading.Timer(0.3, lambda: path.write_text("gpu01\n")).start()
    started = time.monotonic()
    source.wait(stop, ok=True)  # returns when the file changed, not after refresh (60 s)
    assert time.monotonic() - started < 5
    assert [h.name for h in source.fetch()] == ["gpu01"]
    path.write_text("gpu01\ngpu02;reboot\n")
    with pytest.raises(DiscoveryError, match=r"hosts.txt: line 2: 'gpu02;reboot': not a host name"):
        source.fetch()
    path.unlink()
    with pytest.raises(DiscoveryError, match=r"hosts.txt: cannot read: No such file or directory"):
        source.fetch()
    with pytest.raises(DiscoveryError, match=r"cannot read: Is a directory"):
        FileSource(DiscoverySource("file", "file:x", path=str(tmp_path))).fetch()


# ---------------------------------------------------------------- command

FAKE_SINFO = """\
#!/bin/sh
# prints what `sinfo -h -o %N` prints: compressed Slurm host lists, one partition a line
case "$(cat "$(dirname "$0")/mode")" in
  ok) printf 'gpu[01-03,07]\\ngpu-a[1-2]b[1]\\n' ;;
  fail) echo "sinfo: error: Unable to contact slurm controller (connect failure)" >&2; exit 1 ;;
  hang) sleep 600 ;;
  junk) echo "Welcome to the cluster!" ;;
esac
"""


def fake_sinfo(tmp_path: Path, mode: str) -> Path:
    script = tmp_path / "sinfo"
    script.write_text(FAKE_SINFO)
    script.chmod(0o755)
    (tmp_path / "mode").write_text(mode)
    return script


def test_a_command_prints_slurm_host_lists_and_its_failures_are_said(tmp_path: Path) -> None:
    sinfo = fake_sinfo(tmp_path, "ok")
    spec = DiscoverySource("command", f"command:{sinfo} -h -o %N", command=f"{sinfo} -h -o %N", timeout=2)
    source = CommandSource(spec, LocalRunner())
    assert [h.name for h in source.fetch()] == ["gpu01", "gpu02", "gpu03", "gpu07", "gpu-a1b1", "gpu-a2b1"]
    (tmp_path / "mode").write_text("fail")
    with pytest.raises(DiscoveryError, match=r"run here, it exited with status 1: 'sinfo: error: Unable to contact"):
        source.fetch()
    (tmp_path / "mode").write_text("junk")
    with pytest.raises(DiscoveryError, match=r"it printed line 1: 'Welcome to the cluster!': one host"):
        source.fetch()
    (tmp_path / "mode").write_text("hang")
    started = time.monotonic()
    with pytest.raises(DiscoveryError, match=r"did not finish within 2s"):
        source.fetch()
    assert time.monotonic() - started < 6


# ---------------------------------------------------------------- consul


def consul_spec(server: FakeConsul, **kw: object) -> DiscoverySource:
    fields: dict[str, object] = {"url": server.url, "service": "gpu", "refresh": 30.0, "timeout": 3.0}
    fields.update(kw)
    return DiscoverySource("consul", f"consul:{server.url}/gpu", **fields)  # type: ignore[arg-type]


def test_consul_blocking_queries_see_a_change_at_once_and_send_the_token_in_a_header() -> None:
    with FakeConsul(token="s3cret-token") as server:
        server.set_nodes(
            [
                Node("gpu1", "10.0.0.1", ("ssh",)),
                Node("cpu1", "10.0.0.9"),
                Node("gpu2", "10.0.0.2", ("ssh",), "10.1.0.2"),
            ]
        )
        source = ConsulSource(consul_spec(server, tag="ssh", token_env="TOKEN"), environ={"TOKEN": "s3cret-token"})
        assert source.fetch() == (DiscoveredHost("gpu1", "10.0.0.1"), DiscoveredHost("gpu2", "10.1.0.2"))
        first_index = source.index
        assert first_index == server.index
        threading.Timer(0.5, lambda: server.set_nodes([Node("gpu3", "10.0.0.3", ("ssh",))])).start()
        started = time.monotonic()
        assert source.fetch() == (DiscoveredHost("gpu3", "10.0.0.3"),)  # blocked until the change
        assert 0.3 < time.monotonic() - started < 5
        blocking = server.blocking_requests()
        assert blocking and blocking[-1].query == {"tag": "ssh", "index": str(first_index), "wait": "30s"}
        assert all(r.had_token for r in server.requests)
        assert "s3cret-token" not in repr(source.__dict__.get("spec"))
        source.close()


def test_consul_answers_that_are_no_catalog_are_errors_that_say_so() -> None:
    with FakeConsul(token="t") as server:
        spec = consul_spec(server, token_env="TOKEN")
        with pytest.raises(DiscoveryError, match=r"the token variable TOKEN is not set"):
            ConsulSource(spec, environ={}).fetch()
        with pytest.raises(DiscoveryError, match=r"HTTP 403 \(the ACL token is missing .*'ACL not found'"):
            ConsulSource(spec, environ={"TOKEN": "wrong"}).fetch()
        source = ConsulSource(spec, environ={"TOKEN": "t"})
        server.garbage = True
        with pytest.raises(DiscoveryError, match=r"the answer is not JSON \(it begins '<html>502"):
            source.fetch()
        server.garbage, server.down = False, True
        with pytest.raises(DiscoveryError, match=r"HTTP 500: 'rpc error: No cluster leader'"):
            source.fetch()
        assert source.index == 0  # after a failure, the next query does not block
    with pytest.raises(DiscoveryError, match=r"ConnectionError"):
        ConsulSource(replace(spec, timeout=1.0), environ={"TOKEN": "t"}).fetch()  # the server is gone
    with pytest.raises(DiscoveryError, match=r"instance 0: expected an object with a Node name"):
        hosts_in_catalog(b'[{"Address": "10.0.0.1"}]')
    with pytest.raises(DiscoveryError, match=r"expected a JSON list"):
        hosts_in_catalog(b'{"gpu1": "10.0.0.1"}')
    with pytest.raises(DiscoveryError, match=r"instance 0: Node '-oProxy"):
        hosts_in_catalog(b'[{"Node": "-oProxyCommand=x"}]')
    assert next_index(10, "12") == 12
    assert next_index(10, "3") == 0  # went backwards: the catalog was reset, start over
    assert next_index(10, None) == 0 and next_index(10, "junk") == 0


# ---------------------------------------------------------------- the config


def test_hosts_from_reads_each_source_with_its_defaults_and_names_it(tmp_path: Path) -> None:
    doc = {
        "hosts": ["gpu-static", {"match": "gpu*", "user": "ops", "port": 2222}],
        "hosts_from": [
            {"ssh_config": "gpu*"},
            {"ssh_config": "node-?", "file": "ssh.conf", "refresh": "1m"},
            {"file": "hosts.txt", "grace": "30s"},
            {"command": "sinfo -N -h -o %N", "via": "login1", "timeout": "10s"},
            {"consul": {"url": "http://127.0.0.1:8500/", "service": "gpu", "tag": "ssh", "token_env": "CT"}},
        ],
    }
    config = parse_config(doc, tmp_path / "config.yaml")
    labels = [s.label for s in config.hosts_from]
    assert labels == [
        "ssh_config:~/.ssh/config",
        "ssh_config:ssh.conf",
        "file:hosts.txt",
        "command@login1:sinfo -N -h -o %N",
        "consul:http://127.0.0.1:8500/gpu?tag=ssh",
    ]
    ssh_a, ssh_b, listed, command, consul = config.hosts_from
    assert (ssh_a.refresh, ssh_a.grace, ssh_a.path) == (300.0, 600.0, os.path.expanduser("~/.ssh/config"))
    assert (ssh_b.refresh, ssh_b.path) == (60.0, str(tmp_path / "ssh.conf"))
    assert (listed.grace, listed.path) == (30.0, str(tmp_path / "hosts.txt"))
    assert (command.via, command.timeout) == ("login1", 10.0)
    assert (consul.url, consul.service, consul.tag, consul.token_env) == ("http://127.0.0.1:8500", "gpu", "ssh", "CT")
    assert [h.name for h in config.hosts] == ["gpu-static"]
    assert config.host_patterns[0].pattern == "gpu*"
    assert "discovery_failed" in config.alerts.rules  # on by itself with hosts_from:
    assert parse_config({"hosts_from": [{"file": "h"}]}).hosts == ()  # no hosts: needed


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"hosts_from": {"file": "x"}}, "hosts_from: expected a list of sources (- file: hosts.txt), got a mapping"),
        ({"hosts_from": [{"refresh": "1m"}]}, "hosts_from[0]: name a source: ssh_config:, command:, file:, consul:"),
        ({"hosts_from": [{"command": "a", "consul": {}}]}, "hosts_from[0]: one source per entry; command and consul"),
        ({"hosts_from": [{"file": "a", "via": "x"}]}, "hosts_from[0].via: unknown key; valid keys: file, refresh"),
        ({"hosts_from": [{"file": "a", "refresh": "0s"}]}, "hosts_from[0].refresh: must be longer than 0s"),
        ({"hosts_from": [{"consul": {"service": "gpu"}}]}, "hosts_from[0].consul: needs 'url'"),
        (
            {"hosts_from": [{"consul": {"url": "consul:8500", "service": "gpu"}}]},
            "hosts_from[0].consul.url: expected the agent's http(s):// address",
        ),
        (
            {"hosts_from": [{"consul": {"url": "http://c", "service": "g", "tokn_env": "X"}}]},
            "did you mean 'token_env'",
        ),
        ({"hosts_from": [{"ssh_config": "gpu; rm"}]}, "hosts_from[0].ssh_config: 'gpu; rm' is not a host name pattern"),
        ({"hosts_from": [{"file": "a"}, {"file": "a"}]}, "hosts_from[1]: the same source as hosts_from[0] (file:a)"),
        ({"hosts": [{"match": "gpu*", "user": "x"}]}, "hosts: an entry with match: gives settings to discovered hosts"),
        (
            {"hosts": [], "hosts_from": [{"file": "a"}], "alerts": {"discovery_failed": {"fr": "1m"}}},
            "did you mean 'for'",
        ),
        ({"hosts": [{"match": "g*", "adress": "x"}], "hosts_from": [{"file": "a"}]}, "hosts[0].adress: unknown key"),
        ({"hosts": [], "hosts_from": [{"command": "sinfo\nreboot"}]}, "hosts_from[0].command: one command line"),
    ],
)
def test_a_bad_hosts_from_is_a_config_error_naming_the_key(doc: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(doc)
    assert message in str(caught.value)


# ---------------------------------------------------------------- merging, grace


def test_explicit_hosts_win_then_the_first_source_and_match_settings_apply_to_discovered_hosts() -> None:
    config = parse_config(
        {
            "hosts": [
                {"name": "gpu1", "address": "10.9.9.1"},
                {"match": "gpu*", "user": "ops"},
                {"match": "*", "user": "nobody", "port": 2200},
            ],
            "ssh": {"port": 22, "user": "monitor"},
            "hosts_from": [{"file": "a"}, {"ssh_config": "*"}],
        }
    )
    found = {
        "file:a": [DiscoveredHost("gpu1"), DiscoveredHost("gpu2"), DiscoveredHost("cpu1")],
        "ssh_config:~/.ssh/config": [
            DiscoveredHost("gpu2", "10.0.0.2", 2222, "root"),
            DiscoveredHost("gpu3", "10.0.0.3", 2222),
        ],
    }
    hosts = {h.name: h for h in merge_hosts(config, found)}
    assert list(hosts) == ["gpu1", "gpu2", "cpu1", "gpu3"]
    assert (hosts["gpu1"].source, hosts["gpu1"].address) == ("hosts", "10.9.9.1")  # the explicit entry
    assert hosts["gpu2"].source == "file:a"  # the first source that names it
    assert (hosts["gpu2"].ssh.user, hosts["gpu2"].ssh.port) == ("ops", 2200)  # match: entries, first sets first
    assert (hosts["cpu1"].ssh.user, hosts["cpu1"].ssh.port) == ("nobody", 2200)
    # what the ssh config said (HostName, Port), under what match: entries say (User)
    assert (hosts["gpu3"].address, hosts["gpu3"].ssh.port, hosts["gpu3"].ssh.user) == ("10.0.0.3", 2200, "ops")
    assert merge_hosts(config, {}) == tuple(h for h in config.hosts)
    assert merge_hosts(replace(config, hosts=tuple(hosts.values())), found) == tuple(hosts.values())  # idempotent


def test_discovered_hosts_are_split_between_shards_like_configured_ones_each_polled_once() -> None:
    doc = {"hosts": [f"cfg{i}" for i in range(6)], "hosts_from": [{"file": "a"}]}
    found = {"file:a": [DiscoveredHost(f"node{i:02d}") for i in range(20)] + [DiscoveredHost("cfg1")]}
    everyone = {f"cfg{i}" for i in range(6)} | {f"node{i:02d}" for i in range(20)}
    polled: list[str] = []
    for k in (1, 2, 3):
        shard = parse_shard(f"{k}/3")
        config = merged(parse_config({**doc, "shard": f"{k}/3"}), found)
        assert all(shard.holds(h.name) for h in config.hosts)
        assert {h.name for h in config.all_hosts} == everyone  # check counts the whole fleet
        assert merged(config, found) == config  # merging again (the daemon, on every change) is stable
        polled += [h.name for h in config.hosts]
    assert sorted(polled) == sorted(everyone)  # every host, discovered or not, in exactly one shard
    assert next(h for h in merged(parse_config(doc), found).hosts if h.name == "cfg1").source == "hosts"


def test_a_host_that_left_its_source_stays_for_the_grace_and_comes_back_fresh() -> None:
    a, b = DiscoveredHost("a"), DiscoveredHost("b")
    members = track({}, [a, b], now=100)
    members = track(members, [a], now=110)
    assert members["b"].missing_since == 110
    members = track(members, [a], now=120)
    assert members["b"].missing_since == 110  # missing since its first absence, not the latest
    assert next_expiry(members, grace=30) == 140
    assert set(expire(members, now=139, grace=30)) == {"a", "b"}
    assert set(expire(members, now=140, grace=30)) == {"a"}
    members = track(members, [a, b], now=130)
    assert members["b"].missing_since is None and next_expiry(members, 30) is None


class Flaky:
    """A source that answers what it is told, or fails."""

    def __init__(self, label: str = "file:hosts.txt", grace: float = 60.0) -> None:
        self.spec = DiscoverySource("file", label, path="x", grace=grace)
        self.hosts: tuple[DiscoveredHost, ...] = ()
        self.error: str | None = None

    def fetch(self) -> tuple[DiscoveredHost, ...]:
        if self.error:
            raise DiscoveryError(self.error)
        return self.hosts

    def wait(self, stop: threading.Event, ok: bool) -> None:
        stop.wait(0.05)

    def close(self) -> None:
        pass


def test_a_failing_source_keeps_its_last_good_list_and_says_since_when(caplog: pytest.LogCaptureFixture) -> None:
    now = [1000.0]
    source = Flaky()
    discovery = Discovery([source], clock=lambda: now[0])
    assert discovery.health()["file:hosts.txt"].ok is False  # not asked yet
    source.hosts = (DiscoveredHost("gpu1"), DiscoveredHost("gpu2"))
    discovery.refresh_all()
    assert discovery.health()["file:hosts.txt"] == SourceHealth("file:hosts.txt", True, hosts=2, last_ok_at=1000.0)
    source.error = "hosts.txt: cannot read: Permission denied"
    for t in (1010.0, 1020.0):
        now[0] = t
        assert discovery.refresh(source) is False
    health = discovery.health()["file:hosts.txt"]
    assert (health.ok, health.failing_since, health.hosts, health.last_ok_at) == (False, 1010.0, 2, 1000.0)
    assert [h.name for h in discovery.lists()["file:hosts.txt"]] == ["gpu1", "gpu2"]  # nothing lost
    said = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert said == [
        "discovery: file:hosts.txt failed: hosts.txt: cannot read: Permission denied; "
        "keeping its last good list (2 hosts)"
    ]  # said once, not at every retry
    source.error, source.hosts = None, (DiscoveredHost("gpu1"),)
    now[0] = 1030.0
    assert discovery.refresh(source)
    assert "discovery: file:hosts.txt works again: 1 host" in caplog.text
    assert discovery.leaving() == {"gpu2": "file:hosts.txt"}
    now[0] = 1089.0
    discovery.prune()
    assert [h.name for h in discovery.lists()["file:hosts.txt"]] == ["gpu1", "gpu2"]
    version = discovery.version
    now[0] = 1090.0
    discovery.prune()
    assert [h.name for h in discovery.lists()["file:hosts.txt"]] == ["gpu1"]
    assert discovery.version > version


# ---------------------------------------------------------------- the discovery_failed rule


def test_discovery_failed_fires_after_for_and_resolves_when_the_source_works_again() -> None:
    config = parse_config({"hosts_from": [{"file": "h"}], "alerts": {"discovery_failed": {"for": "5m"}}})
    failing = {"file:h": SourceHealth("file:h", False, "h: cannot read: Permission denied", 0.0, 3)}
    snapshot = FleetSnapshot(taken_at=datetime.now(timezone.utc))
    records: dict[str, AlertRecord] = {}
    memory = evaluate(snapshot, config.alerts, Memory(), FreeGpuConfig()).memory
    said: list[Transition] = []
    for now in (0.0, 120.0, 300.0):
        evaluation = evaluate(snapshot, config.alerts, memory, FreeGpuConfig(), frozenset(), sources=failing)
        records, transitions = advance(records, evaluation, now, config.alerts)
        said += transitions
    assert [(t.kind, t.at, t.record.key.id) for t in said] == [("firing", 300.0, "discovery_failed|*||||file:h")]
    words = alert_words(said[0].record)
    assert words.summary == (
        "discovery source file:h fails: h: cannot read: Permission denied; "
        "still polling the 3 hosts of its last good list"
    )
    ok = {"file:h": SourceHealth("file:h", True, hosts=3)}
    evaluation = evaluate(snapshot, config.alerts, memory, FreeGpuConfig(), frozenset(), sources=ok)
    records, transitions = advance(records, evaluation, 400.0, config.alerts)
    assert [t.kind for t in transitions] == ["resolved"] and not records


def test_a_host_removed_by_discovery_resolves_its_alerts_with_the_reason() -> None:
    config = parse_config({"hosts": ["gpu1"], "alerts": {"host_down": {"after": 1}}})
    key = AlertKey("host_down", "gpu1")
    record = AlertRecord(key, "firing", 0.0, 1, 1, "polls", {"error": "x"}, fired_at=0.0, last_sent_at=0.0)
    snapshot = FleetSnapshot(taken_at=datetime.now(timezone.utc))
    evaluation = evaluate(snapshot, config.alerts, Memory(), FreeGpuConfig(), frozenset())
    cause = "left discovery source file:hosts.txt"
    _, transitions = advance(
        {key.id: record}, evaluation, 10.0, config.alerts, removed_hosts=frozenset({"gpu1"}), causes={"gpu1": cause}
    )
    assert [(t.kind, t.cause) for t in transitions] == [("resolved", cause)]
    message = alert_message(transitions, [], {})
    assert message is not None and "RESOLVED host_down (gpu1): left discovery source file:hosts.txt" in message.text


def test_check_says_a_failing_source_and_is_not_ready(
    local_standin: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hosts_file = tmp_path / "hosts.txt"
    config = tmp_path / "config.yaml"
    config.write_text(
        "hosts: [localhost]\n"
        "hosts_from:\n  - file: hosts.txt\n"
        "feishu: {url: 'http://127.0.0.1:9/hook/x'}\n"
        f"state_dir: {tmp_path / 'state'}\n"
    )
    config.chmod(0o600)
    assert main(["check", "-c", str(config)]) == 1
    out = capsys.readouterr().out
    assert f"hosts_from file:hosts.txt: FAILED: {hosts_file}: cannot read: No such file or directory" in out
    assert "localhost: OK: " in out and "[from" not in out
    assert f"not ready: hosts_from file:hosts.txt failed: {hosts_file}: cannot read" in out
    hosts_file.write_text("localhost\n")  # an explicit entry wins over a source that names the host too
    assert main(["check", "--json", "-c", str(config)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [(h["name"], h["source"]) for h in doc["hosts"]] == [("localhost", "hosts")]
