"""GAN-specific protocols as mixings: swap_d moves discriminators along a permutation,
g_only / d_only average one of the pair, best_couple hands every machine the best G and D;
each with its bytes."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_run_config
from ggans import protocols
from ggans.config import EvalConfig, ProtocolConfig, from_dict, validate
from ggans.errors import ConfigError
from ggans.protocols import Faults, round_mixing

BYTES = (300, 500)  # one G message, one D message
N = 8


def matrices(protocol, key=0, faults=Faults(), **options):  # noqa: B008 (frozen)
    g, d, traffic = round_mixing(protocol, jax.random.key(key), N, BYTES, faults,
                                 options=tuple(options.items()))  # fmt: skip
    return np.asarray(g.matrix()), np.asarray(d.matrix()), traffic


@pytest.mark.parametrize("key", range(4))
def test_swap_d_moves_every_discriminator_along_a_permutation(key):
    g, d, traffic = matrices("swap_d", key)
    np.testing.assert_array_equal(g, np.eye(N))  # generators stay
    assert set(np.unique(d).tolist()) <= {0.0, 1.0}
    np.testing.assert_array_equal(d.sum(0), 1)  # every D lands on exactly one machine
    np.testing.assert_array_equal(d.sum(1), 1)
    moved = ~np.isclose(np.diagonal(d), 1)
    np.testing.assert_array_equal(traffic.sent, moved * BYTES[1])
    np.testing.assert_array_equal(traffic.received, moved * BYTES[1])


def test_swap_d_permutations_change_every_round_and_average_g_averages_generators():
    perms = {matrices("swap_d", k)[1].tobytes() for k in range(6)}
    assert len(perms) == 6
    g, d, traffic = matrices("swap_d", 0, average_g=True)
    np.testing.assert_allclose(g, np.full((N, N), 1 / N), rtol=1e-6)
    assert traffic.server_in == N * BYTES[0]
    moved = ~np.isclose(np.diagonal(d), 1)
    np.testing.assert_array_equal(traffic.sent, BYTES[0] + moved * BYTES[1])


def test_swap_d_under_faults_keeps_rows_stochastic_and_an_unreceived_d_at_home():
    for k in range(10):
        _, d, _ = matrices("swap_d", k, Faults(0.3, 0.3))
        np.testing.assert_allclose(d.sum(1), 1)
        no_arrival = np.isclose(d - np.diag(np.diagonal(d)), 0).all(1)
        assert (np.diagonal(d)[no_arrival] == 1).all()


@pytest.mark.parametrize("protocol, averaged", [("g_only", 0), ("d_only", 1)])
def test_g_only_and_d_only_average_one_of_the_pair(protocol, averaged):
    g, d, traffic = matrices(protocol)
    mats = (g, d)
    np.testing.assert_allclose(mats[averaged], np.full((N, N), 1 / N), rtol=1e-6)
    np.testing.assert_array_equal(mats[1 - averaged], np.eye(N))
    np.testing.assert_array_equal(traffic.sent, np.full(N, BYTES[averaged]))
    assert traffic.server_out == N * BYTES[averaged]


def test_best_couple_gives_every_machine_the_best_models():
    tree = {"w": jnp.arange(N * 3, dtype=jnp.float32).reshape(N, 3)}
    mixing = protocols.best_couple(N, 5)
    out = protocols.mix(mixing, tree)["w"]
    np.testing.assert_array_equal(out, np.tile(tree["w"][5], (N, 1)))
    assert int(mixing.sent.sum()) == N - 1


def test_best_couple_needs_scores():
    with pytest.raises(ConfigError, match="protocol.best_couple=true: needs scores"):
        validate(from_dict({"protocol": {"best_couple": True}, "eval": {"every": 0}}))


def test_a_run_with_best_couple_scores_the_best_machines_models(mnist, tmp_path):
    from ggans.run import run

    cfg = tiny_run_config(nodes=3, protocol=ProtocolConfig("gossip", best_couple=True),
                          eval=EvalConfig(every=2, samples=64, grid_replicas=3))  # fmt: skip
    summary = run(cfg, tmp_path, mnist=mnist, progress=False)
    couple, final = summary["best_couple"], summary["final"]
    assert couple["machine"] == int(np.argmin(final["fid"]))
    assert couple["bytes_sent"] > 0 and (tmp_path / "samples" / "best_couple.png").exists()
    assert len(couple["fid"]) == 3
    # three copies of one model: their FIDs differ only by their samples, far less than
    # the three trained machines' spread
    assert np.std(couple["fid"]) < max(np.std(final["fid"]), 1.0)
    assert json.loads((tmp_path / "summary.json").read_text())["best_couple"] == couple
