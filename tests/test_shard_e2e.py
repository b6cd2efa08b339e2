"""Two shards over the real sshd fleet cover every host exactly once: in ``status --json``, in the
daemons' ``/api/v1/snapshot`` and in one real Prometheus scraping both (with the README's scrape
config), and in a central Prometheus federating it (the README's federation config). Every PromQL
expression of the Grafana dashboard (deploy/grafana/gpuwatch.json) returns data there.

The Prometheus test is slow (``-m "not slow"`` leaves it out) and skips where promtool/prometheus
are missing (scripts/test installs them as root).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml

from fleet import Fleet
from shards import (
    dashboard_expressions,
    get_json,
    prometheus,
    query,
    readme_scrape_configs,
    start_shard,
    stop_shard,
    write_shard_config,
)
from waiting import wait_for

POLL = "2s"


def shared_config(fleet: Fleet, known_hosts: Path, refused_address: str) -> dict[str, Any]:
    """The config every shard shares: the 8 fleet hosts and one where nothing listens (down)."""
    hosts = [{"name": f"gpu-{i:02d}", "address": a} for i, a in enumerate(fleet.addresses, start=1)]
    hosts.append({"name": "gpu-gone", "address": refused_address})
    return {
        "hosts": hosts,
        "ssh": fleet.gpuwatch_ssh(known_hosts, connect_timeout="2s", command_timeout="5s"),
        "schedule": {"poll_every": POLL, "reports": []},
        "web": {},
    }


def names(doc: dict[str, Any]) -> list[str]:
    return [h["name"] for h in doc["hosts"]]


def test_two_shards_cover_every_host_exactly_once_in_status_json(
    fleet: Fleet, known_hosts: Path, tmp_path: Path, refused_address: str
) -> None:
    shared = shared_config(fleet, known_hosts, refused_address)
    config = write_shard_config(tmp_path, shared)
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "gpuwatch", "status", "--json", "--shard", shard, "-c", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for shard in ("1/2", "2/2")
    ]
    docs = []
    for run in runs:
        out, err = run.communicate(timeout=60)
        assert run.returncode == 0, err.decode()
        docs.append(json.loads(out))
    every = [h["name"] for h in shared["hosts"]]
    first, second = names(docs[0]), names(docs[1])
    assert first and second, "both shards hold hosts (9 names over 2 shards)"
    assert sorted(first + second) == sorted(every)  # each host in exactly one shard
    assert docs[0]["shard"] == {"shard": "1/2", "hosts": len(first), "of": 9}
    assert docs[1]["shard"] == {"shard": "2/2", "hosts": len(second), "of": 9}
    for doc in docs:
        for host in doc["hosts"]:
            assert host["ok"] == (host["name"] != "gpu-gone"), host


@pytest.mark.slow
def test_two_shard_daemons_in_one_prometheus_federated_and_the_dashboard_returns_data(
    fleet: Fleet, known_hosts: Path, tmp_path: Path, refused_address: str
) -> None:
    promtool = shutil.which("promtool")
    if not promtool or not shutil.which("prometheus"):
        pytest.skip("promtool/prometheus not found (as root: apt-get install -y prometheus; scripts/test does it)")
    site_config, central_config = readme_scrape_configs()
    for n, text in enumerate((site_config, central_config)):
        path = tmp_path / f"readme-{n}.yml"
        path.write_text(text, encoding="utf-8")
        checked = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=30)
        assert checked.returncode == 0, checked.stdout + checked.stderr

    shared = shared_config(fleet, known_hosts, refused_address)
    every = sorted(h["name"] for h in shared["hosts"])
    daemons = [start_shard(write_shard_config(tmp_path / f"shard-{k}", shared), f"{k}/2") for k in (1, 2)]
    try:
        docs = [get_json(d.url + "api/v1/snapshot") for d in daemons]
        assert sorted(names(docs[0]) + names(docs[1])) == every
        assert [d["shard"]["shard"] for d in docs] == ["1/2", "2/2"]

        site = yaml.safe_load(site_config)
        site["scrape_configs"][0].pop("scrape_interval")  # every second, for the test
        targets = [urllib.parse.urlsplit(d.url).netloc for d in daemons]
        site["scrape_configs"][0]["static_configs"] = [{"targets": targets}]
        with prometheus(tmp_path / "prom-site", site) as site_url:
            central = yaml.safe_load(central_config)
            central["scrape_configs"][0].pop("scrape_interval")
            central["scrape_configs"][0]["static_configs"] = [{"targets": [urllib.parse.urlsplit(site_url).netloc]}]
            with prometheus(tmp_path / "prom-central", central) as central_url:
                for base in (site_url, central_url):
                    wait_for(
                        lambda base=base: len(query(base, "gpuwatch_host_up")) == len(every),
                        60,
                        f"{base} to have every host",
                    )
                    per_host = query(base, "count by (host) (gpuwatch_host_up)")
                    assert sorted(r["metric"]["host"] for r in per_host) == every
                    assert {r["value"][1] for r in per_host} == {"1"}  # each host once: one shard holds it
                    assert query(base, "sum(gpuwatch_shard_hosts)")[0]["value"][1] == str(len(every))
                    shards = {r["metric"]["shard"]: r["value"][1] for r in query(base, "gpuwatch_shard_hosts")}
                    assert shards == {d["shard"]["shard"]: str(d["shard"]["hosts"]) for d in docs}
                wait_for(
                    lambda: [r["metric"]["host"] for r in query(central_url, "gpuwatch_host_up == 0")] == ["gpu-gone"],
                    60,
                    "only gpu-gone down (at most a moment of stale data on a loaded machine)",
                )
                _every_dashboard_expression_returns_data(central_url)
    finally:
        for daemon in daemons:
            stop_shard(daemon)


def _every_dashboard_expression_returns_data(base: str) -> None:
    """Each expression of the dashboard, as Grafana would send it, returns at least one series
    (``increase`` needs two samples of the counter: waited for)."""
    exprs = dashboard_expressions()
    assert len(exprs) >= 15
    empty: list[str] = exprs
    deadline = time.monotonic() + 60
    while empty and time.monotonic() < deadline:
        empty = [e for e in exprs if not query(base, e)]
        time.sleep(0.5)
    assert not empty, f"dashboard expressions without data: {empty}"
    users = {r["metric"]["user"] for r in query(base, "sum by (user) (gpuwatch_user_gpus)")}
    assert {"alice", "verylongusername"} <= users
