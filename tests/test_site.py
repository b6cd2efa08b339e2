"""The whole-site page (``web.peers``): the peers read in the background and kept (their last answer,
since when one fails and why), asked over real HTTP with the page's own ``web.auth``, and shown
below the shard's own hosts, a page view never waiting for a peer.

Peers are real gpuwatch web servers on loopback (WebApp + WebServer over a fleet state of real
captures) or a port where nothing listens; the browser test with two shard daemons is
test_site_e2e.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from builders import Clock, fleet
from gpuwatch.cli.wiring import peer_watcher
from gpuwatch.config import ConfigError
from gpuwatch.config.load import parse_config
from gpuwatch.config.shard import Shard, in_shard
from gpuwatch.peers import PeerError, PeerWatcher, http_fetch
from gpuwatch.render import snapshot_dict
from gpuwatch.siteview import PeerAnswer, site_view
from gpuwatch.web import WebApp, WebServer
from shards import free_port, get

PASSWORD = "correct horse battery staple"


def peer_doc(shard: str | None, *names: str, ok: bool = True) -> dict[str, Any]:
    gpus = [{"index": 0, "free": True}, {"index": 1, "free": False}]
    procs = [{"gpu_index": 1, "owner": "alice", "user": "root"}]
    hosts = [{"name": n, "ok": ok, "stale": False, "gpus": gpus, "processes": procs} for n in names]
    doc: dict[str, Any] = {"hosts": hosts}
    if shard:
        doc["shard"] = {"shard": shard, "hosts": len(names), "of": 9}
    return doc


def test_the_site_view_skips_itself_and_keeps_a_silent_peers_hosts_as_not_answering() -> None:
    answers = [
        PeerAnswer("http://a", peer_doc("1/3", "a1"), 100.0, None, "", True),  # this daemon itself
        PeerAnswer("http://b", peer_doc("2/3", "b1", "b2"), 100.0, None, "", True),
        PeerAnswer("http://c", peer_doc("3/3", "c1"), 100.0, 130.0, "connection refused", True),
        PeerAnswer("http://d"),
    ]
    site = site_view(answers, "1/3", ["a1"], 2, 1, now=190.0, started_at=90.0)
    assert site is not None
    assert [p.title for p in site.peers] == ["shard 2/3", "shard 3/3", "http://d"]
    b, c, d = site.peers
    assert b.state == "ok" and b.words == "answering; 2 hosts"
    assert [(h.name, h.state, h.words, h.people) for h in b.hosts] == [
        ("b1", "ok", "1 of 2 GPUs free", "alice 1"),
        ("b2", "ok", "1 of 2 GPUs free", "alice 1"),
    ]
    assert c.state == "unreachable" and c.since_ts == 130.0
    assert c.words.startswith("not answering for 1m (since ") and ": connection refused; its hosts as of" in c.words
    assert [(h.name, h.state, h.free) for h in c.hosts] == [("c1", "not-answering", 0)]
    assert d.state == "waiting" and d.words == "not asked yet (1m40s since start)" and d.hosts == ()
    assert site.own == "this page: shard 1/3"
    assert site.summary == (
        "Whole site: 4 shards, 4 hosts, 6 GPUs with current data, 3 free; "
        "shard 3/3 not answering (1 host, 2 GPUs not known now)"
    )
    never = PeerAnswer("http://e", None, None, 150.0, "its name does not resolve", True)
    (e,) = site_view([never], None, [], 0, 0, 200.0, 100.0).peers  # type: ignore[union-attr]
    assert e.words.endswith("its name does not resolve; it never answered, so its hosts are not known")
    assert site_view([], None, [], 0, 0, 1.0, 0.0) is None
    # a peer's document is another machine's data: anything malformed counts as unknown
    odd = PeerAnswer(
        "http://f", {"hosts": [{"name": 3, "gpus": "x", "processes": [None]}, "junk"]}, 1.0, None, "", True
    )
    (f,) = site_view([odd], None, [], 0, 0, 2.0, 0.0).peers  # type: ignore[union-attr]
    assert [(h.name, h.state, h.gpus) for h in f.hosts] == [("3", "down", 0)]


def test_the_watcher_keeps_the_last_answer_and_since_when_a_peer_fails() -> None:
    now = [1000.0]
    said: dict[str, Any] = {"http://b": peer_doc("2/2", "b1")}

    def fetch(url: str) -> Mapping[str, Any]:
        answer = said[url]
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[no-any-return]

    watcher = PeerWatcher(["http://b"], fetch, clock=lambda: now[0])
    assert watcher.answers() == (PeerAnswer("http://b"),)
    watcher.ask("http://b")
    (answer,) = watcher.answers()
    assert answer.answering and answer.answered_at == 1000.0 and answer.document == peer_doc("2/2", "b1")
    version = watcher.version
    said["http://b"] = PeerError("connection refused (is gpuwatch running there?)")
    now[0] = 1010.0
    watcher.ask("http://b")
    now[0] = 1020.0
    said["http://b"] = RuntimeError("a bug")
    watcher.ask("http://b")
    (answer,) = watcher.answers()
    assert not answer.answering and answer.failing_since == 1010.0 and answer.error == "RuntimeError"
    assert answer.document == peer_doc("2/2", "b1") and answer.answered_at == 1000.0  # kept
    assert watcher.version > version
    said["http://b"] = peer_doc("2/2", "b1", "b2")
    watcher.ask("http://b")
    assert watcher.answers()[0].answering and watcher.answers()[0].failing_since is None


@pytest.fixture
def peer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A real gpuwatch page with web.auth, as shard 2/2: its base URL."""
    monkeypatch.setenv("GPUWATCH_WEB_PASSWORD", PASSWORD)
    raw = {
        "hosts": ["gpu-a", "gpu-f", "gpu-m", "gpu-d"],
        "state_dir": str(tmp_path / "peer-state"),
        "web": {"auth": {"user": "lab", "password_env": "GPUWATCH_WEB_PASSWORD"}},
    }
    cfg = in_shard(parse_config(raw), Shard(2, 2))
    assert cfg.web is not None
    server = WebServer(WebApp(fleet(Clock()), lambda: cfg, cfg.web), "127.0.0.1", 0)
    server.start()
    try:
        yield server.url().rstrip("/")
    finally:
        server.stop()


def test_a_peer_is_asked_over_http_with_the_pages_own_login(peer: str) -> None:
    doc = http_fetch(("lab", PASSWORD))(peer)
    assert doc["shard"]["shard"] == "2/2" and [h["name"] for h in doc["hosts"]] == ["gpu-a", "gpu-f", "gpu-m", "gpu-d"]
    with pytest.raises(PeerError, match=r"refused our login \(HTTP 401\): is its web.auth the same as ours\?"):
        http_fetch(("lab", "wrong"))(peer)
    with pytest.raises(PeerError, match=r"answered HTTP 404"):
        http_fetch(("lab", PASSWORD))(peer + "/nothing")
    with pytest.raises(PeerError, match=r"connection refused \(is gpuwatch running there\?\)"):
        http_fetch(None)(f"http://127.0.0.1:{free_port()}")


def test_a_peer_that_never_answers_costs_the_page_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUWATCH_WEB_PASSWORD", PASSWORD)
    hung = threading.Event()

    def fetch(url: str) -> Mapping[str, Any]:
        hung.wait(30)  # a peer that accepts and never answers (the thread's own timeout aside)
        raise PeerError("no answer within 3s")

    cfg = parse_config({"hosts": ["gpu-a"], "state_dir": str(tmp_path / "s"), "web": {"peers": ["http://x:1"]}})
    assert cfg.web is not None and cfg.web.peers == ("http://x:1",)
    watcher = PeerWatcher(cfg.web.peers, fetch)
    server = WebServer(WebApp(fleet(Clock()), lambda: cfg, cfg.web, peers=watcher), "127.0.0.1", 0)
    server.start()
    try:
        started = time.monotonic()
        html = get(server.url()).decode()
        assert time.monotonic() - started < 2
        assert 'id="site"' in html and "not asked yet" in html and "http://x:1" in html
    finally:
        hung.set()
        server.stop()


def test_web_peers_in_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    web = parse_config(
        {"hosts": ["a"], "web": {"peers": ["http://m1:8787/", "https://m2/gpuwatch/", "http://m1:8787"]}}
    )
    assert web.web is not None and web.web.peers == ("http://m1:8787", "https://m2/gpuwatch")
    for bad in (["ftp://m1"], ["http://lab:pw@m1:8787/"], "http://m1", ["http://m1/?x=1"]):
        with pytest.raises(ConfigError, match=r"web.peers"):
            parse_config({"hosts": ["a"], "web": {"peers": bad}})
    monkeypatch.setenv("PW", PASSWORD)
    with_auth = parse_config(
        {"hosts": ["a"], "web": {"peers": ["http://m1"], "auth": {"user": "u", "password_env": "PW"}}}
    )
    assert with_auth.web is not None and peer_watcher(with_auth.web) is not None
    assert peer_watcher(parse_config({"hosts": ["a"], "web": {}}).web) is None  # type: ignore[arg-type]


def test_the_snapshot_document_read_back_is_what_the_view_reads() -> None:
    """The keys the site view reads are those snapshot_dict writes (so the two cannot drift)."""
    doc = snapshot_dict(fleet(Clock()).snapshot())
    answer = PeerAnswer("http://p", doc, 1.0, None, "", True)
    (p,) = site_view([answer], "9/9", [], 0, 0, 2.0, 0.0).peers  # type: ignore[union-attr]
    states = {h.name: (h.state, h.gpus, h.free) for h in p.hosts}
    assert states["gpu-d"][0] == "down" and states["gpu-f"] == ("ok", 1, 1)
    assert states["gpu-a"][0] == "ok" and states["gpu-a"][1] >= 1
    assert any(h.people for h in p.hosts)
    unseen = {"gpu_index": 0, "owner": None, "user": None}
    mixed = {"name": "x", "ok": True, "gpus": [{"index": 0}], "processes": [unseen, {"gpu_index": 0, "owner": "bob"}]}
    (x,) = site_view([PeerAnswer("u", {"hosts": [mixed]}, 1.0, None, "", True)], "1/2", [], 0, 0, 2, 0).peers  # type: ignore[union-attr]
    assert x.hosts[0].people == "bob 1, owner unknown 1"
