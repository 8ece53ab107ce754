"""Compressed messages: at full precision the plain exchange, bytes by the formula,
quantisation unbiased, top-k carrying what moved most, error feedback keeping the rest."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import synthetic_shards
from ggans.compression import (
    CompressionSpec,
    compress,
    leaf_bytes,
    message_bytes,
    mix_compressed,
)
from ggans.config import from_dict, validate
from ggans.errors import ConfigError
from ggans.gan import GanSpec
from ggans.protocols import tree_bytes
from ggans.replicas import init_replicas
from ggans.training import RoundSpec, exchange, make_round, with_exchange_memory

TINY = GanSpec(arch="tiny", noise_dim=16, batch_size=8, impl="patches")
N = 4


def trained(protocol="gossip", **compression):
    spec = RoundSpec(gan=TINY, protocol=protocol, local_steps=2,
                     compression=CompressionSpec(**compression))  # fmt: skip
    state = with_exchange_memory(spec, init_replicas(TINY, jax.random.key(0), N, "independent"))
    return spec, state


@pytest.mark.parametrize("protocol", ["gossip", "federated", "neighbourhood"])
def test_topk_of_everything_is_the_plain_exchange(protocol):
    spec, state = trained(protocol, name="topk", fraction=1.0)
    plain = dataclasses.replace(spec, compression=CompressionSpec())
    start = jax.tree.map(lambda x: x * 0.5, state)
    key = jax.random.key(3)
    a, ta = exchange(spec, state, key, r=0, start=start)
    b, tb = exchange(plain, state, key, r=0)
    for x, y in zip(jax.tree.leaves(a.g_params), jax.tree.leaves(b.g_params), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    one = jax.tree.map(lambda x: x[0], state)
    # full top-k still sends an index with every value: 8 bytes a float32 value, not 4
    assert message_bytes(spec.compression, state.g_params) == 2 * tree_bytes(one.g_params)


def test_bytes_follow_the_formula():
    topk, quant = CompressionSpec("topk", fraction=0.01), CompressionSpec("quantize", bits=4)
    assert leaf_bytes(topk, 1000, 4) == 10 * 8
    assert leaf_bytes(topk, 50, 4) == 1 * 8  # at least one value
    assert leaf_bytes(quant, 1001, 4) == math.ceil(1001 * 4 / 8) + 8
    spec, state = trained("gossip", name="quantize", bits=4)
    g = message_bytes(spec.compression, (state.g_params, state.g_state))
    leaves = jax.tree.leaves((state.g_params, state.g_state))  # weights and batch statistics
    expected = sum(math.ceil(x[0].size / 2) + 8 for x in leaves)
    assert g == expected
    d = message_bytes(spec.compression, (state.d_params, state.d_state))
    _, info = make_round(spec)(state, synthetic_shards(N), jax.random.key(1), 0)
    sent = np.asarray(info.traffic.sent)  # each gossiping machine sends one G and one D
    np.testing.assert_array_equal(sent, np.full(N, g + d))


def test_quantisation_is_unbiased_and_on_its_levels():
    x = jax.random.normal(jax.random.key(0), (2, 500))
    spec = CompressionSpec("quantize", bits=2)
    draws = jax.vmap(lambda k: compress(spec, x, x, None, k)[0])(
        jax.random.split(jax.random.key(1), 4000)
    )
    lo, hi = x.min(1, keepdims=True), x.max(1, keepdims=True)
    step = (hi - lo) / 3
    # E[m] = x: each mean within 5 standard errors (a rounding's sd is at most step / 2)
    assert (np.abs(draws.mean(0) - x) < 5 * step / 2 / np.sqrt(4000)).all()
    assert abs(float((draws.mean(0) - x).mean())) < 0.005  # and no drift overall
    levels = (draws[0] - lo) / step
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)  # 4 levels


def test_topk_carries_what_moved_most_and_error_feedback_keeps_the_rest():
    start = jnp.zeros((1, 10))
    x = jnp.arange(10.0).reshape(1, 10)
    spec = CompressionSpec("topk", fraction=0.3, error_feedback=True)
    m, mask, residual = compress(spec, x, start, jnp.zeros_like(x), None)
    np.testing.assert_array_equal(np.flatnonzero(mask[0]), [7, 8, 9])
    np.testing.assert_array_equal(residual[0], np.r_[np.arange(7.0), 0, 0, 0])
    # the next round, unsent movement counts: coordinate 6 (6 + 0) beats 9's fresh 1
    x2 = x.at[0, 9].add(1.0)
    _, mask2, _ = compress(spec, x2, x, residual, None)
    assert set(np.flatnonzero(mask2[0])) == {4, 5, 6}


def test_a_receiver_fills_what_a_sparse_message_leaves_out_with_its_own():
    rng = np.random.default_rng(0)
    w = rng.random((3, 3))
    w /= w.sum(1, keepdims=True)
    x, m = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    mask = rng.random((3, 5)) < 0.5
    expected = np.zeros((3, 5))
    for i in range(3):  # the formula, term by term
        expected[i] = w[i, i] * x[i]
        for j in range(3):
            if j != i:
                expected[i] += w[i, j] * np.where(mask[j], m[j], x[i])
    out = mix_compressed(jnp.asarray(w, jnp.float32), jnp.asarray(x, jnp.float32),
                         jnp.asarray(m, jnp.float32), jnp.asarray(mask))  # fmt: skip
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_error_feedback_memory_rides_in_the_state_across_rounds():
    spec, state = trained("gossip", name="topk", fraction=0.05, error_feedback=True)
    assert state.exchange is not None
    round_fn = make_round(spec)
    state, _ = round_fn(state, synthetic_shards(N), jax.random.key(0), 0)
    total = sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(state.exchange))
    assert total > 0  # what top-5% left out of the first messages


@pytest.mark.parametrize(
    "compression, message",
    [
        ({"name": "zip"}, "compression.name='zip': must be one of none, topk, quantize"),
        ({"name": "topk", "fraction": 0}, "compression.fraction=0: must be in (0, 1]"),
        ({"name": "topk", "fraction": 1.5}, "compression.fraction=1.5"),
        ({"name": "quantize", "bits": 0}, "compression.bits=0: must be an integer in 1..16"),
        ({"name": "quantize", "bits": 17}, "compression.bits=17"),
    ],
)
def test_bad_compression_is_one_line_naming_the_key(compression, message):
    with pytest.raises(ConfigError) as err:
        validate(from_dict({"compression": compression}))
    assert message in str(err.value)
