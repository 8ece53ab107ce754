"""conf/experiment/: the paper's experiments as Hydra multiruns. Each composes at both scales
into the expected jobs, with unique fixed folders; a W&B sweep drives the same command."""

from __future__ import annotations

import itertools

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from conftest import ROOT
from ggans.cli import check_config, config_dir, known_keys, run_config

EXPECTED = {  # experiment -> (paper jobs, quick jobs)
    "scalability": (16, 12),
    "non_iid": (4, 4),
    "k_sweep": (6, 6),
    "faults": (14, 10),
    "topology": (36, 36),
    "partition": (12, 12),
    "compression": (5, 5),
}


def sweep_jobs(experiment: str, scale: str) -> tuple[dict, list[dict]]:
    """The hydra config and every job's composed config, as the basic sweeper expands them."""
    base = [f"experiment={experiment}", f"scale={scale}"]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        hydra_cfg = compose("config", overrides=base, return_hydra_config=True).hydra
        params = OmegaConf.to_container(hydra_cfg.sweeper.params)
        parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
        axes = [[f"{o.key_or_group}={v}" for v in o.sweep_string_iterator()] for o in parsed]
        jobs = [
            OmegaConf.to_container(compose("config", overrides=base + list(cell)), resolve=True)
            for cell in itertools.product(*axes)
        ]
    return hydra_cfg, jobs


def test_every_experiment_file_is_known():
    assert {p.stem for p in (config_dir() / "experiment").glob("*.yaml")} == set(EXPECTED) | {
        "quick"
    }


@pytest.mark.parametrize("experiment", sorted(EXPECTED))
@pytest.mark.parametrize("scale", ["paper", "quick"])
def test_experiment_expands_to_its_jobs_in_fixed_folders(experiment, scale):
    hydra_cfg, jobs = sweep_jobs(experiment, scale)
    assert len(jobs) == EXPECTED[experiment][scale == "quick"]
    assert str(hydra_cfg.sweep.dir) == f"outputs/experiments/{scale}/{experiment}"
    names = [job["name"] for job in jobs]
    assert len(set(names)) == len(names), names  # one folder per job
    for job in jobs:
        cfg = run_config(job)  # valid
        if scale == "quick":
            assert cfg.model.arch == "small" and cfg.iterations == 1200
            assert cfg.eval.samples == 200
        else:
            assert cfg.model.arch == "paper" and cfg.iterations == 20000
            assert cfg.eval.samples == 1000


def test_scalability_and_non_iid_grids():
    _, jobs = sweep_jobs("scalability", "paper")
    cells = {(j["nodes"], j["protocol"]["name"]) for j in jobs}
    assert cells == set(
        itertools.product((1, 2, 10, 100), ("standalone", "federated", "gossip", "gossip_ind"))
    )
    _, quick = sweep_jobs("scalability", "quick")
    assert {j["nodes"] for j in quick} == {1, 2, 10}
    assert {j["data"]["fraction"] for j in quick} == {0.01}
    _, non_iid = sweep_jobs("non_iid", "quick")
    assert {(j["nodes"], j["data"]["split"], j["data"]["fraction"]) for j in non_iid} == {
        (10, "non_iid", 0.05)
    }


@pytest.mark.parametrize(("scale", "every_iterations"), [("paper", 1000), ("quick", 400)])
def test_k_sweep_scores_every_so_many_iterations_whatever_k(scale, every_iterations):
    _, jobs = sweep_jobs("k_sweep", scale)
    for job in jobs:
        assert job["eval"]["every"] * job["local_steps"] == every_iterations
    ks = {j["local_steps"] for j in jobs}
    assert ks == ({50, 200, 1000} if scale == "paper" else {20, 100, 400})


def test_beyond_the_paper_grids():
    _, jobs = sweep_jobs("topology", "quick")
    assert {(j["protocol"]["name"], j["nodes"]) for j in jobs} == set(
        itertools.product(("gossip", "neighbourhood"), (10, 100))
    )
    assert len({j["topology"]["name"] for j in jobs}) == 9
    _, jobs = sweep_jobs("partition", "paper")
    assert {j["data"]["alpha"] for j in jobs} == {0.1, 1, 10}
    assert {j["data"]["split"] for j in jobs} == {"dirichlet"}
    _, jobs = sweep_jobs("compression", "quick")
    sent = {(j["compression"]["name"], j["compression"]["fraction"], j["compression"]["bits"])
            for j in jobs}  # fmt: skip
    assert sent == {("none", 0.1, 8), ("topk", 0.01, 8), ("topk", 0.1, 8), ("quantize", 0.1, 8),
                    ("quantize", 0.1, 4)}  # fmt: skip


def test_faults_vary_one_kind_at_a_time():
    _, jobs = sweep_jobs("faults", "paper")
    rates = {(j["faults"]["node_drop"], j["faults"]["message_loss"]) for j in jobs}
    assert all(0.0 in pair for pair in rates) and len(rates) == 7


def test_a_wandb_sweep_drives_the_same_command():
    sweep = yaml.safe_load((ROOT / "sweeps" / "wandb_scalability.yaml").read_text())
    command = sweep["command"]
    assert command[1:4] == ["python", "-m", "ggans"] and command[-1] == "${args_no_hyphens}"
    fixed = [c for c in command[4:-1]]
    keys = known_keys(config_dir())
    assert set(sweep["parameters"]) <= keys
    grid = [[f"{k}={v}" for v in spec["values"]] for k, spec in sweep["parameters"].items()]
    for cell in itertools.product(*grid):  # each agent run's overrides compose and validate
        check_config([*fixed, *cell], config_dir())
