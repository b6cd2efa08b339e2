"""Owners named as a directory names them, end to end over the real sshd fleet (issue 20 E5 and
its note): ``john doe`` (a blank, from AD/LDAP) is one owner, and ``josé`` and ``josè`` stay two
under the probe's ``LC_ALL=C`` (where ps prints both as ``jos??``). Their processes are real
processes of those local users (created with ``useradd --badname``, see tests/fleet.py)."""

from __future__ import annotations

import io
import json
import pwd
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fakefeishu import FakeFeishu, seen
from fleet import DIRECTORY_USERS, H100_LOAD_APPS, Fleet, capture_pids, ensure_user, scenario_healthy_multi_gpu
from gpuwatch.cli import main
from processes import kill_marked, new_marker

KEYWORD = "GPU"


@pytest.fixture
def owners(fleet: Fleet) -> Iterator[dict[str, int]]:
    """{user: pid} of a real process each of :data:`DIRECTORY_USERS` runs."""
    marker = new_marker()
    pids = {}
    for user in DIRECTORY_USERS:
        entry = ensure_user(user)
        proc = subprocess.Popen(
            ["sleep", marker], user=entry.pw_uid, group=entry.pw_gid, extra_groups=[], start_new_session=True
        )
        pids[user] = proc.pid
    yield pids
    kill_marked(marker)


def cli(config: Path, *args: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main([*args, "-c", str(config)], out=out)
    return code, out.getvalue()


def write_config(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    path.chmod(0o600)
    return path


def test_names_with_blanks_and_beyond_ascii_are_each_one_owner_and_fire_and_resolve(
    fleet: Fleet, known_hosts: Path, tmp_path: Path, owners: dict[str, int]
) -> None:
    address = fleet.addresses[2]
    # The H100 capture's three pids, one per directory user, on GPUs 0 and 1 (then on GPU 0 only).
    mapping = dict(zip(capture_pids(H100_LOAD_APPS), owners.values()))
    scenario_healthy_multi_gpu(fleet.scenario_dir(address), 4, busy_gpus=(0, 1), owners_pids=mapping)
    with FakeFeishu(keywords=[KEYWORD]) as feishu:
        config = write_config(
            tmp_path / "config.yaml",
            {
                "hosts": [{"name": "gpu-n", "address": address}],
                "ssh": fleet.gpuwatch_ssh(known_hosts),
                "state_dir": str(tmp_path / "state"),
                "feishu": {"url": feishu.url, "keyword": KEYWORD, "format": "text"},
                "schedule": {"poll_every": "1s", "reports": []},
                "alerts": {"max_gpus_per_user": 1},
            },
        )
        code, text = cli(config, "status", "--json")
        assert code == 0
        (host,) = json.loads(text)["hosts"]
        assert host["ok"], host["error"]
        assert not [w for w in host["warnings"] if "owner" in w["message"]], host["warnings"]
        users = {p["pid"]: (p["user"], p["owner"]) for p in host["processes"]}
        assert {users[pid] for pid in owners.values()} == {(name, name) for name in DIRECTORY_USERS}

        assert cli(config, "run", "--once")[0] == 0
        (fired,) = feishu.accepted
        text = seen(fired).text
        for name in DIRECTORY_USERS:
            assert f"{name} holds 2 GPUs on gpu-n (GPU 0, 1)" in text, text
        assert "jos??" not in text

        scenario_healthy_multi_gpu(fleet.scenario_dir(address), 4, busy_gpus=(0,), owners_pids=mapping)
        assert cli(config, "run", "--once")[0] == 0
        assert len(feishu.accepted) == 2
        resolved = seen(feishu.accepted[1]).text
        assert "1 resolved (3 alerts)" in resolved, resolved  # one entry of three alerts
        for name in DIRECTORY_USERS:
            assert f"was: {name} holds 2 GPUs" in resolved, resolved


def test_the_directory_users_exist_as_getent_gives_them(owners: dict[str, int]) -> None:
    for name in DIRECTORY_USERS:
        assert pwd.getpwnam(name).pw_name == name
