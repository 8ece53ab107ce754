"""sweeps/*.yaml: each composes with Hydra and expands to the expected jobs; the runner
skips finished jobs, restarts unfinished ones, and runs a tiny sweep end to end."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT
from ggans import sweep as sweep_mod
from ggans.sweep import expand, jobs, load, main, merge, status

SWEEPS = ROOT / "sweeps"
EXPECTED = {  # sweep -> (paper jobs, quick jobs)
    "scalability": (11, 7),
    "non_iid": (4, 4),
    "k_sweep": (6, 6),
    "faults": (14, 10),
}


def test_every_sweep_file_is_known():
    assert {p.stem for p in SWEEPS.glob("*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("quick", [False, True])
def test_sweep_composes_and_expands(name, quick, tmp_path):
    sweep = load(SWEEPS / f"{name}.yaml")
    assert sweep.name == name
    found = jobs(sweep, quick, tmp_path)
    assert len(found) == EXPECTED[name][quick]
    assert len({j.name for j in found}) == len(found)
    variant = "quick" if quick else "paper"
    for job in found:
        assert job.folder == tmp_path / variant / name / job.name
        assert job.config["name"] == job.name or sweep.run_name
        if quick:
            assert job.config["model"]["arch"] == "tiny"
            assert job.config["iterations"] <= 2000
            assert job.config["eval"]["samples"] <= 500
        else:
            assert job.config["model"]["arch"] == "paper"
            assert job.config["iterations"] == 20000
            assert job.config["eval"]["samples"] == 1000


def test_scalability_runs_n1_and_n2_once():
    found = jobs(load(SWEEPS / "scalability.yaml"), False, "out")
    cells = {(j.config["nodes"], j.config["protocol"]["name"]) for j in found}
    assert {c for c in cells if c[0] <= 2} == {
        (1, "standalone"),
        (2, "standalone"),
        (2, "federated"),
    }
    protocols = {"standalone", "federated", "gossip", "gossip_ind"}
    for n in (10, 100):
        assert {p for m, p in cells if m == n} == protocols
    assert all(j.config["local_steps"] == 200 for j in found)
    assert "gossip_ind-N100-iid-s0" in {j.name for j in found}


def test_quick_scalability_keeps_little_data_per_machine():
    """The quick variant's largest N leaves each machine tens of images (60: with 120, the
    quick runs did not separate gossip_ind from standalone), the smallest N hundreds."""
    found = jobs(load(SWEEPS / "scalability.yaml"), True, "out")
    sizes = [60000 * j.config["data"]["fraction"] / j.config["nodes"] for j in found]
    assert 50 <= min(sizes) <= 100 and max(sizes) >= 500


def test_non_iid_and_k_sweep_settings():
    for job in jobs(load(SWEEPS / "non_iid.yaml"), False, "out"):
        assert job.config["data"]["split"] == "non_iid" and job.config["nodes"] == 10
    k_jobs = jobs(load(SWEEPS / "k_sweep.yaml"), False, "out")
    assert {j.config["local_steps"] for j in k_jobs} == {50, 200, 1000}
    assert {j.config["protocol"]["name"] for j in k_jobs} == {"gossip", "federated"}
    assert "gossip-N10-K50-iid-s0" in {j.name for j in k_jobs}
    for job in k_jobs:  # scored every 1,000 iterations whatever K
        assert job.config["local_steps"] * job.config["eval"]["every"] == 1000


def test_expand_is_a_union_of_products():
    grid = [{"nodes": 1, "protocol": "standalone"}, {"nodes": [2, 3], "protocol": ["a", "b"]}]
    assert expand(grid) == [
        ["nodes=1", "protocol=standalone"],
        ["nodes=2", "protocol=a"],
        ["nodes=2", "protocol=b"],
        ["nodes=3", "protocol=a"],
        ["nodes=3", "protocol=b"],
    ]
    assert merge(["a=1", "b=2", "a=3"]) == ["a=3", "b=2"]


def test_extra_overrides_reach_every_job(tmp_path):
    found = jobs(load(SWEEPS / "non_iid.yaml"), True, tmp_path, ["seed=3", "logger=wandb"])
    assert all(j.name.endswith("-s3") and "seed=3" in j.overrides for j in found)
    assert all(j.config["logger"]["name"] == "wandb" for j in found)
    cmd = found[0].command("non_iid-quick")
    assert "++logger.group=non_iid-quick" in cmd
    assert f"hydra.run.dir={found[0].folder}" in cmd


def test_bad_sweep_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ngrid:\n  - {nodes: 0}\n")
    assert main([str(bad), "--out", str(tmp_path)]) == 2
    assert "nodes=0" in capsys.readouterr().err


TINY = """
name: tiny
overrides: [model=tiny, iterations=2, local_steps=1, eval.every=0, data.fraction=0.01]
grid:
  - {nodes: 2, protocol: [standalone, federated]}
"""


def test_runner_skips_finished_and_restarts_unfinished(tmp_path, monkeypatch, capsys):
    """Resumability, with the training replaced by a stub that writes summary.json."""
    (tmp_path / "tiny.yaml").write_text(TINY)
    calls = []

    def fake_call(cmd):
        folder = Path(next(a for a in cmd if a.startswith("hydra.run.dir=")).split("=", 1)[1])
        calls.append(folder.name)
        folder.mkdir(parents=True, exist_ok=True)
        assert not (folder / "stale.txt").exists()
        (folder / "config.yaml").write_text("")
        (folder / "summary.json").write_text("{}")
        return 0

    monkeypatch.setattr(sweep_mod.subprocess, "call", fake_call)
    monkeypatch.setattr(sweep_mod, "status", _status_ignoring_config)
    args = [str(tmp_path / "tiny.yaml"), "--out", str(tmp_path / "out")]
    assert main(args) == 0
    assert calls == ["standalone-N2-iid-s0", "federated-N2-iid-s0"]
    root = tmp_path / "out" / "paper" / "tiny"
    # an interrupted job without checkpoint: started afresh; a finished one: skipped
    (root / "federated-N2-iid-s0" / "summary.json").unlink()
    (root / "federated-N2-iid-s0" / "stale.txt").write_text("old rows")
    calls.clear()
    assert main(args) == 0
    assert calls == ["federated-N2-iid-s0"]
    assert "standalone-N2-iid-s0 (done): finished, skipped" in capsys.readouterr().out
    record = json.loads((root / "sweep.json").read_text())
    assert [j["status"] for j in record["jobs"]] == ["done", "ok"]
    # --list runs nothing
    calls.clear()
    assert main([*args, "--list"]) == 0 and calls == []


def _status_ignoring_config(job):
    if (job.folder / "summary.json").exists():
        return "done"
    return "partial" if job.folder.exists() else "new"


def test_status_notices_changed_settings(tmp_path):
    from omegaconf import OmegaConf

    job = jobs(load(SWEEPS / "non_iid.yaml"), True, tmp_path)[0]
    assert status(job) == "new"
    job.folder.mkdir(parents=True)
    assert status(job) == "partial"
    OmegaConf.save(OmegaConf.create(job.config), job.folder / "config.yaml")
    (job.folder / "summary.json").write_text("{}")
    assert status(job) == "done"
    changed = dict(job.config, iterations=job.config["iterations"] * 2)
    OmegaConf.save(OmegaConf.create(changed), job.folder / "config.yaml")
    assert status(job) == "changed"


@pytest.mark.slow
def test_tiny_sweep_end_to_end(mnist_dir, tmp_path):
    """Two real jobs through ``python -m ggans.sweep``; a rerun redoes neither."""
    (tmp_path / "tiny.yaml").write_text(TINY)
    cmd = ["python", "-m", "ggans.sweep", str(tmp_path / "tiny.yaml"), "--out", str(tmp_path)]
    env = {"GGANS_DATA_DIR": str(mnist_dir)}
    first = _sh(cmd, env)
    assert first.returncode == 0, first.stderr[-3000:]
    runs = sorted(p.parent.name for p in tmp_path.glob("paper/tiny/*/summary.json"))
    assert runs == ["federated-N2-iid-s0", "standalone-N2-iid-s0"]
    second = _sh(cmd, env)
    assert second.returncode == 0 and second.stdout.count("finished, skipped") == 2


def _sh(cmd, env):
    import os
    import sys

    return subprocess.run(
        [sys.executable, *cmd[1:]],
        capture_output=True,
        text=True,
        env=dict(os.environ, **env),
        cwd=ROOT,
        timeout=900,
    )
