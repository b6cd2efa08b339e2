"""The probe's frame and parsers read whole real probe outputs into the same snapshots as before.

tests/fixtures/probe-output holds real outputs of the probe script (run against the stand-in
replaying corpus captures: 8 busy H100s with 24 processes, one idle H100, one MIG H100 with
``[N/A]`` readings) and the snapshots the code before the parse-cost work read from them (see
SOURCES.md there). Reading them again, with this poll's token or another, must give the same.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gpuwatch.probe import HostProbe, snapshot_from_output
from probe_json import probe_json, snapshot_json

FIXTURES = Path(__file__).parent / "fixtures" / "probe-output"
SCENARIOS = ("h100x8", "idle1", "mig")


def _load(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    return doc


@pytest.mark.parametrize("name", SCENARIOS)
def test_each_poll_reads_into_the_snapshot_it_gave_before(name: str) -> None:
    doc = _load(name)
    probe = HostProbe()
    for poll, expected in zip(doc["polls"], doc["snapshots"], strict=True):
        snap = snapshot_from_output(name, name, poll["stdout"], poll["stderr"], token=poll["token"], probe=probe)
        assert snap.ok
        assert snapshot_json(snap) == expected
    assert probe_json(probe) == doc["probe"]


@pytest.mark.parametrize("name", SCENARIOS)
def test_the_same_output_under_another_token_is_no_probe_output(name: str) -> None:
    doc = _load(name)
    poll = doc["polls"][-1]
    other = "0123456789abcdef" * 2
    snap = snapshot_from_output(name, name, poll["stdout"], poll["stderr"], token=other, probe=HostProbe())
    assert not snap.ok and snap.error is not None and "unexpected probe output" in snap.error


def test_the_fixtures_hold_what_they_say() -> None:
    h100 = _load("h100x8")["snapshots"][-1]
    assert len(h100["gpus"]) == 8 and len(h100["processes"]) == 24
    assert _load("idle1")["snapshots"][-1]["processes"] == []
    mig = _load("mig")["snapshots"][-1]
    assert mig["gpus"][0]["utilization_percent"] is None and len(mig["processes"]) == 3
