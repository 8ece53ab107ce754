"""The GPU check's pieces that a CPU can test: it imports without Hydra, W&B or tfds (absent on
the GPU machine), and its report reads the right ratios from its results."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


def test_bench_and_runs_import_without_hydra_wandb_or_tfds():
    code = """
import sys
for m in ("hydra", "omegaconf", "wandb", "tensorflow_datasets"):
    sys.modules[m] = None  # importing them now raises ImportError
sys.path.insert(0, "benchmarks")
import bench, ggans.config, ggans.run, ggans.evaluation
print("OK")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]


def _round(impl, n, rate, precision="default", loss="wgan_gp"):
    return dict(
        kind="round", impl=impl, n=n, loss=loss, precision=precision, round_rate_median=rate,
        compile_s=10.0, peak_memory_gib=1.0, peak_share=0.1,
    )  # fmt: skip


def test_report_ratios_and_the_fastest_candidate():
    results = [
        _round("patches", 1, 500.0),
        _round("patches", 100, 12000.0),
        _round("flax", 1, 600.0),
        _round("flax", 100, 900.0),
        {"kind": "torch", "n": 10, "loss": "wgan_gp", "replica_steps_per_s_median": 200.0},
        {"kind": "round", "impl": "flax", "n": 400, "loss": "wgan_gp", "precision": "default",
         "error": "killed by signal 9"},
    ]  # fmt: skip
    assert gpu_check._fastest(results) == "patches"
    text = gpu_check.table(results)
    assert "| wgan_gp | patches | default | 100 | 12,000 | 24.0x | 60x |" in text
    assert "| wgan_gp | flax | default | 100 | 900 | 1.5x | 4x |" in text
    assert "killed by signal 9" in text
    assert "PyTorch loop, N = 10: 200.0 replica-steps/s" in text


@pytest.mark.slow  # 50 s: runs until its 40 s deadline
def test_gpu_reproduce_runs_its_plan_and_packs_small_archives(mnist_dir, tmp_path):
    """The GPU reproduction's driver on a CPU (--smoke: tiny model, 4 iterations), without
    Hydra, OmegaConf or W&B, stopped by its deadline part-way."""
    import json
    import os
    import tarfile

    code = f"""
import sys, runpy
for m in ("hydra", "omegaconf", "wandb", "tensorflow_datasets"):
    sys.modules[m] = None
sys.argv = ["gpu_reproduce.py", {str(tmp_path)!r}, "--smoke", "--seeds", "2", "--deadline", "40"]
runpy.run_path("benchmarks/gpu_reproduce.py", run_name="__main__")
"""
    env = dict(os.environ, GGANS_DATA_DIR=str(mnist_dir), PYTHONPATH=str(ROOT / "src"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    plan = json.loads((tmp_path / "plan.json").read_text())
    status = [c["status"] for c in plan["cells"]]
    assert status[0] == "finished" and len(status) == 17
    assert any(s == "not reached" or s.startswith("stopped") for s in status)  # the deadline
    with tarfile.open(tmp_path / "non_iid.tar.gz") as tar:
        names = tar.getnames()
    assert "non_iid/standalone-N10-non_iid-s1/summary.json" in names
    assert not any("checkpoints" in n for n in names)
