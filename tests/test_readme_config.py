"""The README's minimal config, near its top, is short and a real config: the hosts, SSH, one
channel and a daily overview, with the default alert rules on."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from gpuwatch.config.load import parse_config
from gpuwatch.rules.registry import default_rules

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def test_the_readme_shows_a_minimal_config_near_its_top() -> None:
    titles = re.findall(r"^## (.+)$", README, re.M)
    assert titles[:4] == ["Quick start", "A minimal config", "Running it", "Commands"], titles
    start = README.index("\n## A minimal config\n")
    section = README[start : README.index("\n## ", start + 1)]
    (block,) = re.findall(r"```yaml\n(.*?)```", section, re.S)
    assert len(block.splitlines()) <= 10
    config = parse_config(yaml.safe_load(block), Path("/etc/gpuwatch/config.yaml"))
    assert [h.name for h in config.hosts] == ["gpu-a", "gpu-b"]
    assert list(config.channels) == ["feishu"]
    assert [(r.report, r.at) for r in config.schedule.reports] == [("overview", "09:00")]
    assert set(config.alerts.rules) == set(default_rules())
