"""Two gpuwatch daemons watching the same hosts, for high availability, behind a real Alertmanager.

Real ``python -m gpuwatch run`` processes (separate state directories, one config each but the
same hosts and ``alertmanager:``) against the real sshd fleet (tests/fleet.py), posting to Debian's
``prometheus-alertmanager`` (tests/alertmanager.py), which routes to a small webhook receiver:
Alertmanager dedupes the two daemons' alerts into one notification, says once that it resolved,
and a silence made in Alertmanager mutes an alert. Slow (a real Alertmanager, hosts going down);
skipped, saying why, without the binary.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from alertmanager import Alertmanager, Receiver, alertmanager_path, missing_reason, settle
from fleet import Fleet
from processes import start_run, stop_run
from waiting import wait_for

pytestmark = pytest.mark.slow

HOST_A = "127.0.0.61"
HOST_B = "127.0.0.62"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as server:
        yield server


@pytest.fixture
def alertmanager(tmp_path: Path, receiver: Receiver) -> Iterator[Alertmanager]:
    if alertmanager_path() is None:
        pytest.skip(missing_reason())
    with Alertmanager(tmp_path / "alertmanager", receiver) as am:
        yield am


def write_config(tmp_path: Path, name: str, fleet: Fleet, am: Alertmanager) -> Path:
    doc: dict[str, Any] = {
        "hosts": [{"name": "gpu-a", "address": HOST_A}, {"name": "gpu-b", "address": HOST_B}],
        "ssh": fleet.gpuwatch_ssh(None, connect_timeout="1s", command_timeout="5s"),
        "state_dir": str(tmp_path / name),
        # No re-post within the test: one that the daemon still seeing the host down made just after
        # the other's resolution would have Alertmanager hold the alert a second more (and, with a
        # group_interval of 1 s, say so). The re-posts are tested in test_alertmanager.py.
        "alertmanager": {"url": am.url, "resend_every": "1h"},
        "schedule": {"poll_every": "1s"},
        "alerts": {"host_down": {"after": 1}},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    path.chmod(0o600)
    return path


def log_of(tmp_path: Path, name: str) -> str:
    path = tmp_path / name / "gpuwatch.log"
    return path.read_text(encoding="utf-8") if path.exists() else ""


def hosts_of(alerts: list[dict[str, Any]]) -> list[str]:
    return [a["labels"].get("host", "") for a in alerts]


def test_two_daemons_make_one_notification_one_resolution_and_a_silence_mutes(
    fleet: Fleet, tmp_path: Path, alertmanager: Alertmanager, receiver: Receiver
) -> None:
    keys = {address: fleet.add_host(address) for address in (HOST_A, HOST_B)}
    alertmanager.silence({"alertname": "host_down", "host": "gpu-b"})
    names = ("one", "two")
    daemons = [start_run(write_config(tmp_path, name, fleet, alertmanager)) for name in names]
    try:
        for name in names:
            wait_for(lambda: all(f"poll: gpu-{c} ok" in log_of(tmp_path, name) for c in "ab"), 30, f"{name} polls")

        for address in (HOST_A, HOST_B):
            fleet.remove_host(address)  # both hosts go down
        for name in names:
            for host in ("gpu-a", "gpu-b"):
                wait_for(lambda: f"alert firing: host_down|{host}|" in log_of(tmp_path, name), 30, f"{name}: {host}")
                wait_for(lambda: "outbox: alertmanager: " in log_of(tmp_path, name), 30, f"{name} posting")
        wait_for(lambda: bool(receiver.alerts("firing")), 20, "Alertmanager's notification")
        settle(lambda: len(receiver.seen()) > 1, 4)  # a second notification would come within 2 s

        # Alertmanager holds one alert per host although two daemons post each; gpu-b's is silenced.
        held = {a["labels"]["host"]: a for a in alertmanager.alerts()}
        assert sorted(held) == ["gpu-a", "gpu-b"], alertmanager.alerts()
        assert held["gpu-a"]["status"]["state"] == "active"
        assert held["gpu-b"]["status"]["state"] == "suppressed" and held["gpu-b"]["status"]["silencedBy"]
        assert held["gpu-a"]["labels"] == {
            "alertname": "host_down",
            "host": "gpu-a",
            "severity": "critical",
            "alert_id": "host_down|gpu-a||||",
        }
        # One notification, of gpu-a only.
        assert len(receiver.seen()) == 1, receiver.seen()
        (firing,) = receiver.alerts("firing")
        assert firing["labels"]["host"] == "gpu-a" and "gpu-a" in firing["annotations"]["summary"]

        for address in (HOST_A, HOST_B):
            fleet.add_host(address, host_key=keys[address])  # both come back
        for name in names:  # each daemon reconnects after its backoff (1 s, 2 s, 4 s, ... since the host went down)
            for host in ("gpu-a", "gpu-b"):
                wait_for(lambda: f"alert resolved: host_down|{host}|" in log_of(tmp_path, name), 90, f"{name}: {host}")
        wait_for(lambda: bool(receiver.alerts("resolved")), 20, "the resolved notification")
        settle(lambda: len(receiver.seen()) > 2, 4)
        assert len(receiver.seen()) == 2, receiver.seen()
        (resolved,) = receiver.alerts("resolved")
        assert resolved["labels"] == firing["labels"] and resolved["endsAt"] > resolved["startsAt"]
        assert "gpu-b" not in hosts_of(receiver.alerts("firing") + receiver.alerts("resolved"))
    finally:
        for daemon in daemons:
            stop_run(daemon, timeout=30)
    for name in names:
        log = log_of(tmp_path, name)
        assert "Traceback" not in log and "refused for good" not in log.replace("0 refused for good", "")
