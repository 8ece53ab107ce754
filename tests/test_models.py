"""The paper, small and tiny models: shapes, ranges, parameter counts, state layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ggans.gan import GanSpec, generate, init_gan
from ggans.replicas import init_replicas, num_replicas, take


def n_params(tree):
    return sum(x.size for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("arch", ["tiny", "small", "paper"])
def test_shapes_and_ranges(arch):
    spec = GanSpec(arch=arch)
    state = init_gan(spec, jax.random.key(0))
    z = jax.random.normal(jax.random.key(1), (5, spec.noise_dim)) * 10
    images = generate(spec, state, z)
    assert images.shape == (5, 28, 28, 1) and images.dtype == jnp.float32
    assert float(jnp.abs(images).max()) <= 1.0
    logits = spec.discriminator.apply({"params": state.d_params}, images)
    assert logits.shape == (5,)


def test_paper_model_matches_the_reference_layers():
    spec = GanSpec(arch="paper")
    s = init_gan(spec, jax.random.key(0))
    g = jax.tree.map(jnp.shape, s.g_params)
    assert g["Dense_0"]["kernel"] == (128, 1024)
    assert g["Dense_1"]["kernel"] == (1024, 6272)
    assert g["ConvTranspose_0"]["kernel"] == (4, 4, 128, 64)
    assert g["ConvTranspose_1"]["kernel"] == (4, 4, 64, 32)
    assert g["out"] == {"kernel": (4, 4, 32, 1), "bias": (1,)}
    assert "bias" not in g["Dense_0"]  # batch norm follows: no bias
    # batch norm: centre only (no scale), running mean and variance
    assert set(s.g_state["batch_stats"]["BatchNorm_0"]) == {"mean", "var"}
    assert set(s.g_params["BatchNorm_0"]) == {"bias"}
    d = jax.tree.map(jnp.shape, s.d_params)
    assert d["Conv_0"]["kernel"] == (4, 4, 1, 64)
    assert d["Conv_1"]["kernel"] == (4, 4, 64, 128)
    assert d["Dense_0"]["kernel"] == (6272, 1024)
    assert d["logit"]["kernel"] == (1024, 1)
    assert (
        n_params(s.g_params)
        == 128 * 1024
        + 1024 * 6272
        + 16 * 128 * 64
        + 16 * 64 * 32
        + (16 * 32 + 1)
        + 1024
        + 6272
        + 64
        + 32
    )


@pytest.mark.parametrize("init", ["shared", "independent"])
def test_stacked_replicas(init):
    spec = GanSpec(arch="tiny")
    state = init_replicas(spec, jax.random.key(0), 4, init)
    assert num_replicas(state) == 4
    for leaf in jax.tree.leaves(state):
        assert leaf.shape[0] == 4
    k0, k1 = take(state, 0).g_params, take(state, 1).g_params
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(k0), jax.tree.leaves(k1)))
    assert same == (init == "shared")


def test_gan_spec_refuses_an_unknown_loss():
    """The step tests for ``wgan_gp``: a misspelt loss must not silently train ``nonsat``."""
    with pytest.raises(ValueError, match="loss='wgan-gp': must be one of wgan_gp, nonsat"):
        GanSpec(loss="wgan-gp")
    assert GanSpec(loss="nonsat").loss == "nonsat"
