"""The README's extension recipes, each done from outside the package as a researcher would:
a protocol and a topology registered by this test module, then used through the config."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from conftest import ROOT, synthetic_shards
from ggans import protocols, topologies
from ggans.config import from_dict
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
