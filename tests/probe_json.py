"""A snapshot and what a HostProbe learned, as plain JSON data: what the same-reading test compares
(tests/test_probe_same_reading.py) and bench/parse_cost.py stores (tests/fixtures/probe-output)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any


def snapshot_json(snap: Any) -> Any:
    """A HostSnapshot as plain JSON data (tuples become lists, enums their values)."""
    return json.loads(json.dumps(dataclasses.asdict(snap), default=str))


def probe_json(probe: Any) -> Any:
    """What a HostProbe learned (health fields, CUDA and driver versions, containers, users)."""
    learned = {
        "health_fields": probe.health_fields,
        "cuda_version": probe.cuda_version,
        "driver_version": probe.driver_version,
        "containers": {k: None if v is None else dataclasses.asdict(v) for k, v in probe.containers.items()},
        "users": {str(k): v for k, v in probe.users.items()},
    }
    return json.loads(json.dumps(learned, default=str))
