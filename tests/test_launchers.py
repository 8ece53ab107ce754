"""Hydra launchers: joblib runs two jobs in parallel; the SLURM one composes."""

import json

import pytest
from hydra import compose, initialize_config_dir

from ggans.cli import config_dir
from test_cli import ggans


def test_slurm_launcher_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.gpus_per_node == 1 and launcher.timeout_min == 240


def test_joblib_launcher_runs_two_jobs(mnist_dir, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    out = ggans(
        "-m",
        "hydra/launcher=parallel",
        "protocol=federated",
        "nodes=1,2",
        "model=tiny",
        "iterations=2",
        "local_steps=1",
        "eval.every=0",
        "data.fraction=0.01",
        f"hydra.sweep.dir={tmp_path}",
        data_dir=mnist_dir,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Joblib.Parallel" in out.stdout + out.stderr
    for n in (1, 2):
        summary = json.loads((tmp_path / f"federated-N{n}-iid-s0" / "summary.json").read_text())
        assert summary["nodes"] == n and summary["rounds"] == 2
