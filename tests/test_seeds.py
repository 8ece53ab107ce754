"""Seeds in one program: S runs of N machines as S x N stacked replicas with a
block-diagonal exchange give, run by run, what each run gives alone."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import synthetic_shards
from ggans import protocols
from ggans.gan import GanSpec
from ggans.protocols import Faults
from ggans.replicas import init_replicas
from ggans.topologies import TopologySpec
from ggans.training import RoundSpec, make_round, stack_shards

TINY = GanSpec(arch="tiny", noise_dim=16, batch_size=8, impl="patches")
N, SEEDS, ROUNDS = 3, (0, 1, 2), 2


def alone_and_together(spec: RoundSpec):
    shards = [synthetic_shards(N, images=48 + 12 * s, seed=s) for s in SEEDS]
    states = [init_replicas(TINY, jax.random.key(s), N, "independent") for s in SEEDS]
    keys = [jax.random.fold_in(jax.random.key(s), 1) for s in SEEDS]
    alone = []
    for state, part, key in zip(states, shards, keys, strict=True):
        round_fn, infos = make_round(spec), []
        state = jax.tree.map(jnp.copy, state)
        for r in range(ROUNDS):
            state, info = round_fn(state, part, key, r)
            infos.append(info)
        alone.append((state, infos))
    # in chunks of N machines the population trains each run with the very program it
    # trains alone with (all S x N at once, XLA may sum the stacked convolutions in
    # another order, and Adam's first steps turn that into up to one step of 1e-3)
    joint_spec = dataclasses.replace(spec, runs=len(SEEDS), chunk=N)
    state = jax.tree.map(lambda *xs: jnp.concatenate(xs), *states)
    round_fn, infos = make_round(joint_spec), []
    for r in range(ROUNDS):
        state, info = round_fn(state, stack_shards(shards), jnp.stack(keys), r)
        infos.append(info)
    return alone, (state, infos)


# 45 s a case on 2 cores: gossip under faults in CI, the others slow
CASES = [pytest.param(p, Faults(), marks=pytest.mark.slow) for p in protocols.names()] + [
    pytest.param("gossip", Faults(0.3, 0.3)),
    pytest.param("federated", Faults(0.3, 0.3), marks=pytest.mark.slow),
]


@pytest.mark.parametrize("protocol, faults", CASES)
def test_each_seeds_block_equals_that_seed_trained_alone(protocol, faults):
    spec = RoundSpec(gan=TINY, protocol=protocol, local_steps=2, faults=faults,
                     topology=TopologySpec("ring"))  # fmt: skip
    alone, (joint, infos) = alone_and_together(spec)
    for s, (state, own_infos) in enumerate(alone):  # bit for bit
        block = jax.tree.map(lambda x, s=s: x[s * N : (s + 1) * N], joint)
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(block), strict=True):
            np.testing.assert_array_equal(a, b)
        for own, info in zip(own_infos, infos, strict=True):
            mine = jax.tree.map(lambda x, s=s: x[s], info)
            for a, b in zip(jax.tree.leaves(own), jax.tree.leaves(mine), strict=True):
                np.testing.assert_array_equal(a, b)


def test_no_message_crosses_runs():
    """Federated averages all N of a run: were the runs mixed, every machine would hold the
    average of S x N; instead each run's machines agree among themselves only."""
    spec = RoundSpec(gan=TINY, protocol="federated", local_steps=2, runs=len(SEEDS))
    shards = stack_shards([synthetic_shards(N, images=48, seed=s) for s in SEEDS])
    states = [init_replicas(TINY, jax.random.key(s), N, "independent") for s in SEEDS]
    state = jax.tree.map(lambda *xs: jnp.concatenate(xs), *states)
    keys = jnp.stack([jax.random.fold_in(jax.random.key(s), 1) for s in SEEDS])
    state, info = make_round(spec)(state, shards, keys, 0)
    w = jax.tree.leaves(state.g_params)[0].reshape(len(SEEDS), N, -1)
    for s in range(len(SEEDS)):
        np.testing.assert_allclose(w[s], np.broadcast_to(w[s, 0], w[s].shape), rtol=1e-6)
    assert not np.allclose(w[0, 0], w[1, 0])
    assert info.traffic.server_in.shape == (len(SEEDS),)  # each run's own books


def test_run_seeds_writes_each_seeds_folder_as_a_run_alone_would(mnist, tmp_path):
    from conftest import tiny_run_config
    from ggans.config import EvalConfig, ProtocolConfig
    from ggans.run import run
    from ggans.runfolder import read_jsonl
    from ggans.seeds import run_seeds

    cfg = tiny_run_config(nodes=2, chunk=2, protocol=ProtocolConfig("gossip"),
                          eval=EvalConfig(every=2, samples=16, grid_replicas=2))  # fmt: skip
    together = run_seeds(cfg, [0, 1], [tmp_path / "s0", tmp_path / "s1"], mnist=mnist,
                         progress=False)  # fmt: skip
    for seed in (0, 1):
        alone = run(dataclasses.replace(cfg, seed=seed), tmp_path / f"alone{seed}", mnist=mnist,
                    progress=False)  # fmt: skip

        def rows(folder):
            return [{k: v for k, v in r.items() if k != "wall_time"}
                    for r in read_jsonl(folder / "metrics.jsonl")]  # fmt: skip

        assert rows(tmp_path / f"s{seed}") == rows(tmp_path / f"alone{seed}")
        assert together[seed]["final"] == alone["final"] and together[seed]["seed"] == seed
        assert together[seed]["name"] == f"{cfg.name}-s{seed}"
        assert (tmp_path / f"s{seed}" / "samples" / "final.png").exists()
    assert together[0]["final"]["fid"] != together[1]["final"]["fid"]
    again = run_seeds(cfg, [0, 1], [tmp_path / "s0", tmp_path / "s1"], mnist=mnist,
                      progress=False)  # fmt: skip
    assert again == together  # finished runs are not redone


@pytest.mark.slow  # 20 s; run_seeds itself is tested above
def test_the_command_line_writes_one_folder_per_seed(mnist_dir, tmp_path):
    import json

    from conftest import ggans

    first = tmp_path / "federated-N2-iid-s0"
    out = ggans("model=tiny", "model.noise_dim=16", "model.batch_size=8", "nodes=2",
                "iterations=4", "local_steps=2", "eval.every=0", "data.fraction=0.01",
                "protocol=federated", "seeds=2", f"hydra.run.dir={first}",
                data_dir=mnist_dir)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    for seed in (0, 1):
        folder = tmp_path / f"federated-N2-iid-s{seed}"
        assert json.loads((folder / "run_config.json").read_text())["seed"] == seed
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["seed"] == seed and summary["name"] == folder.name
    bad = ggans("seeds=0", f"hydra.run.dir={tmp_path / 'bad'}", data_dir=mnist_dir)
    assert bad.returncode == 2 and "seeds=0: must be an integer >= 1" in bad.stderr


@pytest.fixture(autouse=True)
def _release_programs():
    """Each case compiles two rounds; release them (XLA CPU's memory maps, see conftest)."""
    yield
    jax.clear_caches()


def test_a_signal_under_seeds_names_the_first_seeds_folder_to_resume(mnist, tmp_path, caplog):
    """``hydra.run.dir`` is the first seed's folder; the others are named from it. Only the
    shared program's line says how many machines train at once."""
    import logging
    import os
    import signal

    from conftest import tiny_run_config
    from ggans.run import Interrupted
    from ggans.runfolder import read_jsonl
    from ggans.seeds import run_seeds

    class SignalAfterRound1:
        def log(self, row):
            if row["round"] == 1:
                os.kill(os.getpid(), signal.SIGTERM)

        def finish(self, summary):
            pass

    folders = [tmp_path / "run-s0", tmp_path / "run-s1"]
    caplog.set_level(logging.INFO, logger="ggans")
    with pytest.raises(Interrupted) as stopped:
        run_seeds(tiny_run_config(), [0, 1], folders, mnist=mnist, progress=False,
                  loggers=lambda run: [SignalAfterRound1()])  # fmt: skip
    assert f"(hydra.run.dir={folders[0]})" in str(stopped.value)
    assert [[r["round"] for r in read_jsonl(f / "metrics.jsonl")] for f in folders] == [[1], [1]]
    at_once = [r.getMessage() for r in caplog.records if "trained at once" in r.getMessage()]
    assert len(at_once) == 1 and "x2: 4 machines in one program, 4 trained at once" in at_once[0]
