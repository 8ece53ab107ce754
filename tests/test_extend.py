"""The README's extension recipes, each done from outside the package as a researcher would:
a protocol, a topology, a dataset and a model registered by this test module, then used
through the config."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from conftest import ROOT, synthetic_shards
from ggans import datasets, models, protocols, topologies
from ggans.config import from_dict
from ggans.data import Images
from ggans.errors import ConfigError
from ggans.replicas import init_replicas
from ggans.topologies import Graph
from ggans.training import make_round, message_bytes, round_keys

BYTES = (1000, 3000)


# --- recipe: a topology ----------------------------------------------------------------------
@topologies.register("pairs_shifting")
def pairs_shifting(spec, n, r, key):
    """Machines in pairs (i, i + 1 + r mod 2 ...): partners change every round."""
    i = jnp.arange(n)
    partner = jnp.where((i + r) % 2 == 0, i + 1, i - 1) % n
    return Graph(jnp.zeros((n, n), bool).at[i, partner].set(True).at[partner, i].set(True))


# --- recipe: a protocol ----------------------------------------------------------------------
@protocols.register("keep_half")
def keep_half(ex: protocols.Exchange):
    """Each machine keeps half its model and takes half of one neighbour's (G and D alike)."""
    n = ex.n
    i = jnp.arange(n)
    peer = ex.graph.draw_peers(ex.g_key)
    sent = ex.alive & ex.alive[peer]
    mixing = protocols.Mixing(
        src=jnp.concatenate([i, peer]).astype(jnp.int32),
        dst=jnp.concatenate([i, i]).astype(jnp.int32),
        weight=jnp.concatenate([jnp.where(sent, 0.5, 1.0), jnp.where(sent, 0.5, 0.0)]),
        sent=jnp.concatenate([jnp.zeros(n, bool), sent]),
        n=n,
    )
    return mixing, mixing, protocols.peer_traffic(ex, mixing, mixing)


def test_a_registered_topology_carries_the_round_and_only_its_edges_carry_weight():
    n = 6
    for r in range(3):
        g, d, traffic = protocols.round_mixing(
            "gossip",
            jax.random.key(r),
            n,
            BYTES,
            topology=from_dict({"topology": {"name": "pairs_shifting"}}).topology,
            r=r,
        )
        w = np.asarray(g.matrix())
        i = np.arange(n)
        partner = np.where((i + r) % 2 == 0, i + 1, i - 1) % n
        allowed = np.eye(n, dtype=bool)
        allowed[i, partner] = allowed[partner, i] = True
        assert (w[~allowed] == 0).all() and (w[i, partner] > 0).all(), r
        np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-6)
        assert float(traffic.sent.sum()) == n * sum(BYTES)


def test_a_registered_protocol_runs_in_the_compiled_round_from_the_config():
    cfg = from_dict(
        {
            "nodes": 4,
            "local_steps": 1,
            "protocol": {"name": "keep_half"},
            "topology": {"name": "pairs_shifting"},
            "model": {"arch": "tiny", "noise_dim": 8, "batch_size": 4, "impl": "patches"},
        }
    )
    state = init_replicas(cfg.model, jax.random.key(0), 4, "independent")
    shards, key = synthetic_shards(4, 16), jax.random.key(1)
    alone = dataclasses.replace(cfg.round_spec, protocol="standalone")
    trained, _ = make_round(alone)(jax.tree.map(jnp.copy, state), shards, key, 0)
    mixed, info = make_round(cfg.round_spec)(state, shards, key, 0)
    # the same local steps, then the toy protocol's mixing of round 0
    _, mix_key = round_keys(key, 0, 4)
    g_mix, _, _ = protocols.round_mixing(
        "keep_half", mix_key, 4, message_bytes(trained, False), topology=cfg.topology
    )
    w = np.asarray(g_mix.matrix())
    np.testing.assert_allclose(np.diag(w), 0.5)
    for got, alone_leaf in zip(
        jax.tree.leaves(mixed.g_params), jax.tree.leaves(trained.g_params), strict=True
    ):
        want = np.einsum("ij,j...->i...", w, np.asarray(alone_leaf))
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    assert float(info.traffic.sent.sum()) == 4 * sum(message_bytes(trained, False))


def test_the_command_line_loads_plugins_named_in_ggans_plugins(tmp_path):
    env = dict(
        os.environ,
        GGANS_PLUGINS="toy_topology",
        PYTHONPATH=os.pathsep.join(
            [str(ROOT / "tests" / "plugins"), os.environ.get("PYTHONPATH", "")]
        ),
    )
    cmd = [sys.executable, "-m", "ggans", f"hydra.run.dir={tmp_path}/run"]
    shown = subprocess.run(
        [*cmd, "topology.name=toy_ring", "--cfg", "job"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert shown.returncode == 0, shown.stderr
    assert "name: toy_ring" in shown.stdout
    hint = subprocess.run(
        [*cmd, "topology=toy_ring"], env=env, capture_output=True, text=True, timeout=300
    )
    assert hint.returncode == 2
    assert hint.stderr.strip().endswith("use topology.name=toy_ring")
    env["GGANS_PLUGINS"] = "no_such_plugin"
    bad = subprocess.run(
        [*cmd, "--cfg", "job"], env=env, capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith(
        "ggans: error: GGANS_PLUGINS: cannot import no_such_plugin"
    )


# --- recipe: a dataset -----------------------------------------------------------------------
@datasets.register("toy_colour_squares", classes=4)
def toy_colour_squares(data_dir):
    """16 x 16 RGB images: class c is a bright square in quadrant c on noise."""
    rng = np.random.default_rng(0)

    def make(n):
        labels = rng.integers(0, 4, n)
        x = rng.integers(0, 64, (n, 16, 16, 3), dtype=np.uint8)
        for i, c in enumerate(labels):
            r, q = divmod(int(c), 2)
            x[i, 8 * r : 8 * r + 8, 8 * q : 8 * q + 8, c % 3] = 255
        return x, labels.astype(np.int32)

    return Images(*make(64), *make(16))


def test_a_registered_dataset_sets_the_image_shape_and_the_classes(tmp_path):
    from ggans.run import run

    settings = {
        "nodes": 4,
        "local_steps": 2,
        "iterations": 4,
        "protocol": {"name": "gossip"},
        "data": {"name": "toy_colour_squares", "split": "non_iid"},
        "model": {"arch": "tiny", "noise_dim": 8, "batch_size": 4, "impl": "patches"},
        "eval": {"every": 0},
        "checkpoint": {"every": 0},
    }
    summary = run(from_dict(settings), tmp_path, progress=False)
    assert summary["rounds"] == 2 and summary["final"]["nonfinite_replicas"] == []
    # four classes over four machines: machine i holds class i only
    images = toy_colour_squares(None)
    from ggans.run import make_shards

    shards = make_shards(from_dict(settings), images)
    for i in range(4):
        held = images.train_labels[np.asarray(shards.index[i, : shards.size[i]])]
        assert set(held.tolist()) == {i}
    # the generator draws the dataset's shape
    from ggans.gan import generate

    cfg = from_dict(settings)
    spec = dataclasses.replace(cfg.model, image_shape=(16, 16, 3))
    state = init_replicas(spec, jax.random.key(0), 1)
    one = jax.tree.map(lambda x: x[0], state)
    assert generate(spec, one, jax.random.normal(jax.random.key(1), (2, 8))).shape == (2, 16, 16, 3)


def test_scores_on_a_dataset_without_a_classifier_are_one_clear_error():
    settings = {"data": {"name": "toy_colour_squares"}, "model": {"arch": "tiny"}}
    try:
        from_dict(settings)
    except ConfigError as err:
        assert str(err) == (
            "eval.every=1: data.name='toy_colour_squares' has no classifier for MS and FID; "
            "set eval.every=0 to train without scores"
        )
    else:
        raise AssertionError("expected a ConfigError")


# --- recipe: a model -------------------------------------------------------------------------
class NormedCritic(nn.Module):
    """A discriminator with state: batch norm after its conv (running statistics in training)."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (4, 4), strides=(2, 2))(x)
        x = nn.BatchNorm(use_running_average=False, momentum=0.9)(x)
        return nn.Dense(1, name="logit")(nn.leaky_relu(x.reshape(x.shape[:-3] + (-1,))))[..., 0]


@models.register("normed_critic")
def normed_critic() -> models.Architecture:
    reference = models.get("tiny")
    return models.Architecture(
        generator=reference.generator,
        discriminator=lambda spec: NormedCritic(),
        d_decays=lambda path: False,  # no weight decay on this critic
        d_collections=("batch_stats",),
    )


def test_a_registered_model_keeps_its_discriminator_state_and_mixes_it():
    cfg = from_dict(
        {
            "nodes": 2,
            "local_steps": 2,
            "protocol": {"name": "federated"},
            "model": {"arch": "normed_critic", "noise_dim": 8, "batch_size": 4},
        }
    )
    state = init_replicas(cfg.model, jax.random.key(0), 2, "independent")
    assert set(state.d_state) == {"batch_stats"}
    before = np.asarray(jax.tree.leaves(state.d_state)[0])
    np.testing.assert_array_equal(before[0], 0.0)  # running means start at zero
    state, info = make_round(cfg.round_spec)(state, synthetic_shards(2, 16), jax.random.key(1), 0)
    after = [np.asarray(x) for x in jax.tree.leaves(state.d_state)]
    assert not np.allclose(after[0], before) and bool(info.finite.all())
    for leaf in after:  # federated averaged the critics' statistics too
        np.testing.assert_allclose(leaf[0], leaf[1], rtol=1e-6)
    g_bytes, d_bytes = message_bytes(state, False)
    d_params = sum(x[0].nbytes for x in jax.tree.leaves(state.d_params))
    assert d_bytes == d_params + sum(x[0].nbytes for x in after)
    # the penalty follows the architecture: none on this critic
    one = jax.tree.map(lambda x: x[0], state.d_params)
    assert float(models.l2_penalty(one, cfg.model.architecture.d_decays)) == 0.0
