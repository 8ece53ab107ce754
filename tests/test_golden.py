"""Regression guard for refactors: a tiny fixed-seed run of each protocol gives the rows recorded
in ``tests/golden/`` (wall times aside). Record again, deliberately, with
``GGANS_RECORD_GOLDEN=1 pytest tests/test_golden.py`` when a change is meant to alter results."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from ggans.config import from_dict
from ggans.run import run

GOLDEN = Path(__file__).parent / "golden"
PROTOCOLS = ("standalone", "federated", "gossip", "gossip_ind")
TIMES = ("wall_time",)


def golden_settings(protocol: str) -> dict:
    """The YAML tree of the run (the shape users write), so schema refactors keep it."""
    return {
        "nodes": 3,
        "protocol": {"name": protocol},
        "local_steps": 3,
        "iterations": 6,
        "seed": 7,
        "model": {"arch": "tiny", "noise_dim": 16, "batch_size": 8},
        "data": {"fraction": 0.01},
        "faults": {"node_drop": 0.2, "message_loss": 0.2},
        "eval": {"samples": 64, "grid_replicas": 0},
        "checkpoint": {"every": 0},
    }


def rows(path: Path) -> list[dict]:
    return [
        {k: v for k, v in json.loads(line).items() if k not in TIMES}
        for line in path.read_text().splitlines()
    ]


def assert_rows_close(got, want, rtol: float = 1e-4) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert sorted(g) == sorted(w)
        for key, value in w.items():
            assert _close(g[key], value, rtol), (w["round"], key, g[key], value)


def _close(got, want, rtol: float) -> bool:
    """Floats (alone or in per-machine lists) to ``rtol``; everything else exactly."""
    if isinstance(want, list):
        return (
            isinstance(got, list)
            and len(got) == len(want)
            and all(_close(a, b, rtol) for a, b in zip(got, want, strict=True))
        )
    if isinstance(want, float) and not math.isnan(want):
        return isinstance(got, float) and got == pytest.approx(want, rel=rtol, abs=1e-6)
    return got == want


@pytest.mark.parametrize(
    "protocol",
    [pytest.param(p, marks=() if p == "gossip_ind" else pytest.mark.slow) for p in PROTOCOLS],
)
def test_tiny_run_gives_the_recorded_rows(protocol, mnist, tmp_path):
    run(from_dict(golden_settings(protocol)), tmp_path, mnist=mnist, progress=False)
    got = rows(tmp_path / "metrics.jsonl")
    golden = GOLDEN / f"{protocol}.jsonl"
    if os.environ.get("GGANS_RECORD_GOLDEN"):
        golden.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in got))
    assert_rows_close(got, rows(golden))
