"""Topologies and the protocols that use them: rows sum to 1, only the round's edges carry
weight, the expected mixing's second eigenvalue against its closed form, time-varying graphs
changing with the round and repeating with the seed, and every unfit graph refused."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ggans import protocols, topologies
from ggans.config import from_dict, validate
from ggans.errors import ConfigError
from ggans.protocols import Faults, expected_mixing, round_mixing, spectral_gap
from ggans.topologies import TopologySpec

STATIC = ["ring", "torus", "hypercube", "exponential", "star", "random_regular",
          "erdos_renyi", "small_world"]  # fmt: skip
TIME_VARYING = ["one_peer_exponential", "dynamic_regular"]


def graph(name: str, n: int, r: int = 0, seed: int = 0, **kw) -> np.ndarray:
    spec = TopologySpec(name, **kw)
    round_key = jax.random.fold_in(jax.random.key(seed), r)  # each round its own key
    key = jax.random.fold_in(round_key, protocols.TOPOLOGY_STREAM)
    return np.asarray(topologies.round_graph(spec, n, jnp.int32(r), key).adjacency)


@pytest.mark.parametrize(
    "name, n, degrees",
    [("ring", 10, {2}), ("torus", 12, {4}), ("hypercube", 16, {4}), ("exponential", 16, {7}),
     ("star", 6, {1, 5}), ("random_regular", 20, {4}), ("small_world", 20, None)],
)  # fmt: skip
def test_static_graphs_are_symmetric_loop_free_with_their_degrees(name, n, degrees):
    a = graph(name, n)
    assert (a == a.T).all() and not a.diagonal().any()
    if degrees is not None:
        assert set(a.sum(1).tolist()) == degrees
    else:  # small world: rewiring keeps the edge count of the ring lattice
        assert a.sum() == n * 4


def test_torus_and_hypercube_neighbours_are_the_grid_and_bit_flips():
    t = graph("torus", 12)  # 3 x 4
    assert sorted(np.flatnonzero(t[5]).tolist()) == [1, 4, 6, 9]
    h = graph("hypercube", 8)
    assert sorted(np.flatnonzero(h[5]).tolist()) == [1, 4, 7]


def test_erdos_renyi_has_about_p_of_the_pairs_and_repeats_with_its_seed():
    a = graph("erdos_renyi", 200, p=0.1)
    assert a.sum() / (200 * 199) == pytest.approx(0.1, abs=0.01)
    assert (a == graph("erdos_renyi", 200, p=0.1)).all()
    b = np.asarray(topologies.erdos_renyi.adjacency(TopologySpec("erdos_renyi", seed=1), 200))
    assert (a != b).any()


def test_from_file_reads_an_edge_list(tmp_path):
    f = tmp_path / "g.txt"
    f.write_text("# a path\n0 1\n1 2\n\n2,3\n")
    a = graph("from_file", 4, file=str(f))
    assert sorted(zip(*np.nonzero(np.triu(a)), strict=True)) == [(0, 1), (1, 2), (2, 3)]


@pytest.mark.parametrize("name", TIME_VARYING)
def test_time_varying_graphs_change_with_the_round_and_repeat_with_the_seed(name):
    rounds = [graph(name, 16, r) for r in range(4)]
    assert any((rounds[0] != g).any() for g in rounds[1:])
    assert all((graph(name, 16, r) == g).all() for r, g in enumerate(rounds))
    if name == "dynamic_regular":  # a fresh 4-regular graph, and another with another seed
        assert all(set(g.sum(1).tolist()) == {4} and (g == g.T).all() for g in rounds)
        assert (graph(name, 16, 0, seed=1) != rounds[0]).any()
    else:  # one peer each, i -> i + 2^(r mod 4)
        for r, g in enumerate(rounds):
            assert (np.argmax(g, 1) == (np.arange(16) + 2**r) % 16).all()


@pytest.mark.parametrize("protocol", ["gossip", "gossip_ind", "neighbourhood", "swap_d"])
@pytest.mark.parametrize("name", STATIC + TIME_VARYING)
def test_rows_sum_to_one_and_only_the_rounds_edges_carry_weight(protocol, name):
    n = 16
    for r in range(3):
        key = jax.random.fold_in(jax.random.key(r), r)
        g, d, _ = round_mixing(protocol, key, n, (10, 10), Faults(0.1, 0.1),
                               topology=TopologySpec(name), r=r)  # fmt: skip
        adj = graph(name, n, r, seed=r)
        for m in (g, d):
            w = np.asarray(m.matrix())
            np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-6)
            assert (w >= 0).all()
            off = w * ~np.eye(n, dtype=bool)
            if protocol != "swap_d":  # swap_d's permutation ignores the graph by design
                assert not (off > 0)[~adj.T].any(), "weight on a pair that is not an edge"


@pytest.mark.parametrize("n", [10, 100])
def test_with_one_peer_a_round_neighbourhood_is_gossips_mixing(n):
    """On the one-peer exponential graph each machine has one in-neighbour a round, so
    Metropolis-Hastings weights and gossip's average with what arrived are both 1/2: the two
    protocols mix identically (REPRODUCTION runs one of them at N = 100)."""
    spec = TopologySpec("one_peer_exponential")
    for r in range(8):
        key = jax.random.fold_in(jax.random.key(3), r)
        gossip = round_mixing("gossip", key, n, (10, 20), topology=spec, r=r)
        neighbourhood = round_mixing("neighbourhood", key, n, (10, 20), topology=spec, r=r)
        for a, b in zip(gossip[:2], neighbourhood[:2], strict=True):
            np.testing.assert_array_equal(np.asarray(a.matrix()), np.asarray(b.matrix()))
        np.testing.assert_array_equal(gossip[2].sent, neighbourhood[2].sent)
        np.testing.assert_array_equal(gossip[2].received, neighbourhood[2].received)


def test_neighbourhood_weights_are_metropolis_hastings():
    n = 6
    g, _, traffic = round_mixing("neighbourhood", jax.random.key(0), n, (3, 5),
                                 topology=TopologySpec("star"))  # fmt: skip
    w = np.asarray(g.matrix())
    assert w[1, 0] == pytest.approx(1 / 6) and w[0, 1] == pytest.approx(1 / 6)
    assert w[0, 0] == pytest.approx(1 / 6) and w[1, 1] == pytest.approx(5 / 6)
    np.testing.assert_allclose(w, w.T)  # doubly stochastic on an undirected graph
    np.testing.assert_array_equal(traffic.sent, [5 * 8] + [8] * 5)  # G + D to each neighbour


def _binomial_mean_inverse(m: int, q: float) -> float:
    """E[1 / (2 + X)], X ~ Binomial(m, q): the exact finite sum."""
    return sum(math.comb(m, x) * q**x * (1 - q) ** (m - x) / (x + 2) for x in range(m + 1))


@pytest.mark.parametrize(
    "protocol, name, closed_form",
    [
        # neighbourhood on a ring: W = (I + S + S^T) / 3, lambda_2 = (1 + 2 cos(2 pi / N)) / 3
        ("neighbourhood", "ring", lambda n: (1 + 2 * math.cos(2 * math.pi / n)) / 3),
        ("neighbourhood", "complete", lambda n: 0.0),  # W = J / N
        # gossip on a ring: a neighbour's model arrives w.p. 1/2 with weight 1/2 or 1/3, so
        # E[W] = 7/12 I + 5/24 (S + S^T), lambda_2 = 7/12 + 5/12 cos(2 pi / N)
        ("gossip", "ring", lambda n: 7 / 12 + 5 / 12 * math.cos(2 * math.pi / n)),
        # gossip on the complete graph: E[W] = a I + b (J - I), lambda_2 = a - b = 1 - N b,
        # b = E[1 / (2 + X)] / (N - 1), X ~ Binomial(N - 2, 1 / (N - 1)) other senders
        ("gossip", "complete", lambda n: 1 - n * _binomial_mean_inverse(n - 2, 1 / (n - 1))
         / (n - 1)),
    ],
)  # fmt: skip
def test_second_eigenvalue_of_the_expected_mixing_matches_its_closed_form(
    protocol, name, closed_form
):
    n = 10
    w = expected_mixing(protocol, n, TopologySpec(name), draws=4000)
    lam = np.sort(np.abs(np.linalg.eigvals(np.asarray(w, np.float64))))[::-1]
    print(f"{protocol} on {name}: lambda_2 {lam[1]:.4f}, closed form {closed_form(n):.4f}")
    assert lam[1] == pytest.approx(closed_form(n), abs=0.02)
    assert spectral_gap(w) == pytest.approx(1 - lam[1])


def test_the_default_draws_see_every_leaf_of_a_star_of_100():
    # Gossip on the star: every leaf sends to the hub, which averages all 100 models; the hub
    # sends to one leaf in 99, which keeps half of its own. So a leaf's expected row is
    # 1 - 1/198 on itself and 1/198 on the hub, and 1 - |lambda_2| = 1/198. At 256 draws a
    # few leaves are never picked and the estimate reads 0; the default draws must not.
    n = 100
    assert spectral_gap(expected_mixing("gossip", n, TopologySpec("star"), draws=256)) < 1e-6
    gap = spectral_gap(expected_mixing("gossip", n, TopologySpec("star")))
    print(f"gossip on the star, N = {n}: gap {gap:.5f}, closed form {1 / 198:.5f}")
    assert 0.6 / 198 < gap < 1.05 / 198


def test_the_estimate_keeps_a_ring_of_100s_small_gap():
    # Neighbourhood on the ring: weights 1/3, 1/3, 1/3 each round, so E[W] is exact and its
    # gap 2/3 (1 - cos(2 pi / N)) = 0.0013 must survive summing thousands of rounds.
    n = 100
    gap = spectral_gap(expected_mixing("neighbourhood", n, TopologySpec("ring")))
    assert gap == pytest.approx(2 / 3 * (1 - np.cos(2 * np.pi / n)), abs=1e-6)


@pytest.mark.parametrize(
    "topology, nodes, key",
    [
        ({"name": "nope"}, 4, "topology.name='nope'"),
        ({"name": "torus"}, 7, "topology.name=torus: nodes=7 is prime"),
        ({"name": "hypercube"}, 12, "topology.name=hypercube: nodes=12 must be a power of two"),
        ({"name": "random_regular", "degree": 3}, 5, "topology.degree=3: nodes x degree"),
        ({"name": "random_regular", "degree": 5}, 5, "topology.degree=5: must be an integer"),
        ({"name": "erdos_renyi", "p": 0}, 5, "topology.p=0: must be in (0, 1]"),
        ({"name": "small_world", "degree": 3}, 10, "topology.degree=3: must be even"),
        ({"name": "from_file"}, 4, "topology.file=null"),
        ({"name": "from_file", "file": "/nonexistent/g.txt"}, 4, "cannot read"),
    ],
)
def test_a_topology_that_does_not_fit_is_one_line_naming_the_key(topology, nodes, key):
    with pytest.raises(ConfigError, match=None) as err:
        validate(from_dict({"nodes": nodes, "topology": topology}))
    assert key in str(err.value) and "\n" not in str(err.value)


def test_a_malformed_edge_list_names_its_line(tmp_path):
    f = tmp_path / "g.txt"
    f.write_text("0 1\n1 x\n")
    with pytest.raises(ConfigError, match="line 2"):
        validate(from_dict({"nodes": 4, "topology": {"name": "from_file", "file": str(f)}}))
    f.write_text("0 9\n")
    with pytest.raises(ConfigError, match="machines are 0..3"):
        validate(from_dict({"nodes": 4, "topology": {"name": "from_file", "file": str(f)}}))
