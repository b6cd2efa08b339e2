"""Mentions and links from a process's command line, end to end: real sshd, the real probe, real
``ps``, a real process of alice's whose argv is built to ping a whole chat (issue 20 E1, E9).

- E1: ``@everyone @here <!here> [click](https://evil.example/x)`` reaches the generic webhook
  through the README's own Mattermost and Discord templates: shown as written, mentioning no one,
  linking nowhere (and Discord told to ping no one).
- E9: Feishu's mention tags in any letter case (``<AT user_id="all">``, ``<At id=all>``,
  ``<at email=..>``) reach Feishu in each format (text, post, card) without a tag Feishu would read.
"""

from __future__ import annotations

import io
import json
import pwd
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fakechat import FakeReceiver
from fakefeishu import FakeFeishu, seen
from fakehook import render_chat_markdown
from fleet import H100_LOAD_APPS, Fleet, capture_pids, scenario_healthy_multi_gpu
from gpuwatch.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"
CHAT_ARGV0 = "@everyone @here <!here> [click](https://evil.example/x)"
FEISHU_ARGV0 = '<AT user_id="all"></AT> <At id=all></At> <at email=all@example.com></at>'
#: Any tag Feishu reads as a mention, in any letter case or spacing.
FEISHU_TAG = re.compile(r"<\s*at\b", re.IGNORECASE)


def readme_template(target: str) -> dict[str, Any]:
    """The template the README's table gives for ``target`` (its first backquoted JSON)."""
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.startswith(f"| {target} |"):
            document: dict[str, Any] = json.loads(line.split("`")[1])
            return document
    raise AssertionError(f"README.md has no template row for {target}")


def start_as_alice(argv0: str) -> subprocess.Popen[bytes]:
    alice = pwd.getpwnam("alice")
    return subprocess.Popen(
        [argv0, "600"],
        executable="/bin/sleep",
        user=alice.pw_uid,
        group=alice.pw_gid,
        extra_groups=[],
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
        start_new_session=True,
    )


@pytest.fixture
def alices_processes(fleet: Fleet) -> Iterator[dict[str, int]]:
    """alice's two processes, one per hostile argv, among the GPU processes of the fleet's first host."""
    procs = {"chat": start_as_alice(CHAT_ARGV0), "feishu": start_as_alice(FEISHU_ARGV0)}
    captured = capture_pids(H100_LOAD_APPS)
    mapping = {captured[0]: procs["chat"].pid, captured[1]: procs["feishu"].pid}
    scenario_healthy_multi_gpu(fleet.scenario_dir(fleet.addresses[0]), 4, owners_pids=mapping)
    try:
        yield {name: proc.pid for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()


def run_once(fleet: Fleet, known_hosts: Path, state: Path, **channel: Any) -> None:
    """``gpuwatch run --once`` with alice's report due (her command lines), to ``channel``."""
    doc = {
        "hosts": [{"name": "gpu-a", "address": fleet.addresses[0]}],
        "ssh": fleet.gpuwatch_ssh(known_hosts),
        "state_dir": str(state),
        "schedule": {"reports": [{"report": "user", "user": "alice", "every": "1h"}]},
        **channel,
    }
    state.mkdir()
    config = state.parent / f"{state.name}.yaml"
    config.write_text(yaml.safe_dump(doc), encoding="utf-8")
    config.chmod(0o600)
    assert main(["run", "--once", "-c", str(config)], out=io.StringIO()) == 0


@pytest.mark.parametrize(("target", "key"), [("Mattermost, Rocket.Chat", "text"), ("Discord", "content")])
def test_a_command_line_mentions_no_one_through_the_readme_templates(
    fleet: Fleet, known_hosts: Path, tmp_path: Path, alices_processes: dict[str, int], target: str, key: str
) -> None:
    template = readme_template(target)
    (tmp_path / "hook.json").write_text(json.dumps(template), encoding="utf-8")
    with FakeReceiver() as receiver:
        webhook = {"url": receiver.url, "template": str(tmp_path / "hook.json"), "max_bytes": 2000}
        run_once(fleet, known_hosts, tmp_path / "state", webhook=webhook)
        documents = list(receiver.accepted)
    assert documents
    shown = [render_chat_markdown(document[key]) for document in documents]
    assert any(CHAT_ARGV0 in view.text for view in shown), [v.text for v in shown]  # it reached the group...
    for view in shown:  # ...as written: no live @everyone/@here/<!here>, no [..](..) link
        assert view.mentions == () and view.links == (), view
    if target == "Discord":
        assert all(document["allowed_mentions"] == {"parse": []} for document in documents)


@pytest.mark.parametrize("fmt", ["text", "post", "card"])
def test_feishu_mention_tags_in_any_case_mention_no_one(
    fleet: Fleet, known_hosts: Path, tmp_path: Path, alices_processes: dict[str, int], fmt: str
) -> None:
    with FakeFeishu() as feishu:
        run_once(fleet, known_hosts, tmp_path / "state", feishu={"url": feishu.url, "format": fmt})
        bodies = list(feishu.accepted)
    assert bodies
    views = [seen(body) for body in bodies]
    assert any(FEISHU_ARGV0 in view.text for view in views), [v.text for v in views]  # shown as written
    for body, view in zip(bodies, views):
        assert view.mentions == ()
        tags = [s for s in _strings(body) if FEISHU_TAG.search(s)]
        assert not tags, f"a mention tag Feishu would read, in {fmt}: {tags}"


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return []
