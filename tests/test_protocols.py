"""Protocols as mixing: stochastic rows, exact protocol semantics, dense == gather, faults."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ggans import protocols
from ggans.protocols import Faults, mix, mix_dense, mix_gather, round_mixing

PROTOCOLS = ("standalone", "federated", "gossip", "gossip_ind")

BYTES = (1000, 3000)


def matrices(protocol, n, seed=0, faults=None):
    faults = faults or Faults()
    g, d, traffic = round_mixing(protocol, jax.random.key(seed), n, BYTES, faults)
    return np.asarray(g.matrix()), np.asarray(d.matrix()), traffic


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("n", [1, 2, 3, 10, 100])
@pytest.mark.parametrize("faults", [Faults(), Faults(0.3, 0.3)])
def test_rows_sum_to_one_and_weights_nonnegative(protocol, n, faults):
    for seed in range(3):
        for w in matrices(protocol, n, seed, faults)[:2]:
            assert w.shape == (n, n)
            np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-6)
            assert (w >= 0).all()


def test_standalone_is_identity():
    g, d, traffic = matrices("standalone", 10)
    np.testing.assert_array_equal(g, np.eye(10))
    np.testing.assert_array_equal(d, np.eye(10))
    assert float(traffic.sent.sum()) == 0.0


def test_federated_leaves_every_replica_at_the_mean():
    n = 10
    g, _, _ = round_mixing("federated", jax.random.key(0), n, BYTES)
    tree = {"w": jax.random.normal(jax.random.key(1), (n, 5, 3))}
    out = mix(g, tree)["w"]
    np.testing.assert_allclose(out, jnp.broadcast_to(tree["w"].mean(0), out.shape), atol=1e-6)


@pytest.mark.parametrize("protocol", ["gossip", "gossip_ind"])
def test_gossip_each_sender_reaches_exactly_one_other_machine(protocol):
    n = 10
    for seed in range(20):
        for w in matrices(protocol, n, seed)[:2]:
            off = w - np.diag(np.diag(w))
            # column i: who received machine i's model; exactly one machine, never itself
            assert ((off > 0).sum(axis=0) == 1).all()
            # a receiver averages what arrived with its own model, equal weights
            for i in range(n):
                nz = w[i][w[i] > 0]
                np.testing.assert_allclose(nz, 1.0 / len(nz), rtol=1e-6)
                assert w[i, i] > 0


def test_two_machines_collaborative_protocols_coincide():
    ws = [matrices(p, 2, seed=3)[0] for p in ("federated", "gossip", "gossip_ind")]
    for w in ws:
        np.testing.assert_allclose(w, np.full((2, 2), 0.5))


def test_gossip_ind_draws_g_and_d_independently_gossip_does_not():
    differs = [not np.array_equal(*matrices("gossip_ind", 10, s)[:2]) for s in range(20)]
    same = [np.array_equal(*matrices("gossip", 10, s)[:2]) for s in range(20)]
    assert all(same)
    assert sum(differs) >= 18  # equal draws have probability (1/9)^10 per round


def test_gossip_peers_are_uniform_over_other_machines():
    n, counts = 5, np.zeros((5, 5))
    for s in range(400):
        g = matrices("gossip", n, s)[0]
        counts += (g - np.diag(np.diag(g))) > 0
    # column i counts where machine i's model went: each of the 4 others about 100 times
    off = counts[~np.eye(n, dtype=bool)]
    assert np.diag(counts).sum() == 0
    assert off.min() > 60 and off.max() < 140


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("faults", [Faults(), Faults(0.2, 0.2)])
def test_dense_and_gather_forms_agree(protocol, faults):
    n = 12
    g, d, _ = round_mixing(protocol, jax.random.key(7), n, BYTES, faults)
    tree = {"a": jax.random.normal(jax.random.key(2), (n, 4, 3)), "step": jnp.arange(n)}
    for m in (g, d):
        dense, gather = mix_dense(m, tree), mix_gather(m, tree)
        np.testing.assert_allclose(dense["a"], gather["a"], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(dense["step"], tree["step"])  # ints are never mixed


@pytest.mark.parametrize("block", [1, 6, 12, 35])
def test_blockwise_dense_mixing_equals_one_einsum(block):
    """Large leaves are mixed in place a block of axis 1 at a time: the same numbers as one
    einsum. Leaf [n, 6, 2, 3], 6 values a row: blocks of 1 row (block 1, smaller than a row,
    and block 6), 2 rows (block 12) or 3 (block 35: the most rows that divide 6 and fit)."""
    n = 10
    g, _, _ = round_mixing("gossip", jax.random.key(3), n, BYTES, Faults(0.3, 0.0))
    x = jax.random.normal(jax.random.key(4), (n, 6, 2, 3))
    x = x.at[2, 1, 0, 0].set(jnp.nan)  # a non-finite model never leaks into another
    w = np.asarray(g.matrix())
    want = np.einsum("ij,j...->i...", w, np.nan_to_num(np.asarray(x), nan=0.0))
    keep = np.diag(w) == 1.0
    want[keep] = np.asarray(x)[keep]
    got = np.asarray(mix_dense(g, {"x": x}, block=block)["x"])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert keep.any() and not keep.all()


def test_auto_form_is_dense_up_to_dense_max_n():
    """``auto`` mixes gossip densely (temporaries of one block) up to DENSE_MAX_N machines,
    and in gather form above."""

    def program(f, n):
        g, _, _ = round_mixing("gossip", jax.random.key(0), n, BYTES)
        return str(jax.make_jaxpr(lambda t: f(g, t))({"x": jnp.ones((n, 3))}))

    big = protocols.DENSE_MAX_N + 1
    assert program(mix, 4) == program(mix_dense, 4) != program(mix_gather, 4)
    assert program(mix, big) == program(mix_gather, big) != program(mix_dense, big)


def test_same_seed_same_mixing():
    a, b = matrices("gossip_ind", 10, 5), matrices("gossip_ind", 10, 5)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], matrices("gossip_ind", 10, 6)[0])


@pytest.mark.parametrize("protocol", ["federated", "gossip", "gossip_ind"])
def test_dropped_machine_neither_sends_nor_receives(protocol):
    n, faults = 10, Faults(node_drop=0.4)
    seen_drop = False
    for seed in range(10):
        g, d, traffic = matrices(protocol, n, seed, faults)
        silent = np.asarray(traffic.sent) == 0
        for w in (g, d):
            for i in np.flatnonzero(silent):
                seen_drop = True
                np.testing.assert_array_equal(w[i], np.eye(n)[i])  # keeps its own model
                assert (np.delete(w[:, i], i) == 0).all()  # and its model goes nowhere
    assert seen_drop


def test_message_loss_keeps_receiver_model_and_counts_bytes():
    n, faults = 10, Faults(message_loss=1 - 1e-7)
    g, d, traffic = matrices("gossip", n, 0, faults)
    np.testing.assert_array_equal(g, np.eye(n))
    np.testing.assert_allclose(traffic.sent, sum(BYTES))  # sent, though lost
    np.testing.assert_allclose(traffic.received, 0.0)
    assert int(traffic.lost) == 2 * n and int(traffic.dropped) == 0


@pytest.mark.parametrize("protocol", ["federated", "gossip"])
def test_fault_counts_match_the_mixing(protocol):
    n = 20
    g, _, t = matrices(protocol, n, 3, Faults(node_drop=0.25, message_loss=0.25))
    silent = np.asarray(t.sent) == 0
    assert int(t.dropped) == silent.sum() > 0
    assert int(t.lost) > 0


def test_traffic_accounting():
    n = 10
    _, _, t = matrices("gossip_ind", n)
    np.testing.assert_allclose(t.sent, sum(BYTES))
    assert float(t.received.sum()) == float(t.sent.sum())
    _, _, t = matrices("federated", n)
    np.testing.assert_allclose(t.sent, sum(BYTES))
    np.testing.assert_allclose(t.received, sum(BYTES))
    assert float(t.server_in) == float(t.server_out) == n * sum(BYTES)


@pytest.mark.parametrize("form", ["dense", "gather"])
def test_exchange_mixes_in_place_in_both_forms(form):
    """The mixed models are written into the donated buffers (XLA aliases every byte of the
    input to the output), as the bench and the round donate them."""
    n = 4
    tree = {"w": jnp.ones((n, 512, 256)), "b": jnp.ones((n, 8))}
    g_mix, _, _ = protocols.round_mixing("gossip", jax.random.key(1), n, (1, 1))
    nbytes = sum(x.nbytes for x in jax.tree.leaves(tree))
    mix = partial(protocols.mix, form=form)
    donated = jax.jit(mix, donate_argnums=1).lower(g_mix, tree).compile().memory_analysis()
    kept = jax.jit(mix).lower(g_mix, tree).compile().memory_analysis()
    assert donated.alias_size_in_bytes == nbytes and kept.alias_size_in_bytes == 0


def test_a_large_leaf_is_mixed_block_by_block_with_one_block_of_temporaries():
    n, block = 4, 4096
    tree = {"w": jnp.ones((n, 512, 256))}
    g_mix, _, _ = protocols.round_mixing("gossip", jax.random.key(1), n, (1, 1))

    def temp(b):
        mix = partial(protocols.mix_dense, block=b)
        compiled = jax.jit(mix, donate_argnums=1).lower(g_mix, tree).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    whole, blocked = temp(1 << 20), temp(block)
    assert whole >= tree["w"].nbytes  # a temporary copy of the leaf (and more)
    assert blocked < 2 * n * block * 4 * 4  # a few blocks, not the leaf (2 MiB)
