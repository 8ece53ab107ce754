"""Hydra launchers: joblib runs two jobs in parallel; the SLURM one composes."""

import json
from datetime import datetime
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from conftest import ggans
from ggans.cli import config_dir


def test_slurm_launcher_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.gpus_per_node == 1 and launcher.timeout_min == 240


def _span(log: Path) -> tuple[datetime, datetime]:
    """First and last timestamps of a job's log (Hydra's ``[2026-12-02 01:10:27,405]``)."""
    stamps = [line[1:24] for line in log.read_text().splitlines() if line.startswith("[20")]
    first, last = (datetime.strptime(t, "%Y-%m-%d %H:%M:%S,%f") for t in (stamps[0], stamps[-1]))
    return first, last


@pytest.mark.slow  # 30 s: two jobs end to end in joblib workers
def test_joblib_launcher_runs_an_experiment_two_jobs_side_by_side(mnist_dir, tmp_path):
    """The faults experiment through hydra-joblib-launcher: its jobs overlap in time, each in
    its fixed folder; a rerun finds both finished and redoes neither."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    args = (
        "-m",
        "experiment=faults",
        "scale=quick",
        "hydra/launcher=parallel",
        "protocol=federated",
        "faults={node_drop:0.0},{node_drop:0.5}",
        "nodes=2",
        "iterations=4",
        "local_steps=2",
        "eval.every=0",
        f"hydra.sweep.dir={tmp_path}",
    )
    out = ggans(*args, data_dir=mnist_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Joblib.Parallel" in out.stdout + out.stderr
    names = ["federated-N2-drop0.0-loss0.0-s0", "federated-N2-drop0.5-loss0.0-s0"]
    spans = []
    for name in names:
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["nodes"] == 2 and summary["rounds"] == 2
        spans.append(_span(tmp_path / name / "cli.log"))
    (a0, a1), (b0, b1) = spans
    assert a0 < b1 and b0 < a1, spans  # side by side, not one after the other
    again = ggans(*args, data_dir=mnist_dir)
    assert again.returncode == 0 and (again.stdout + again.stderr).count("already finished") == 2
