"""ggans.gradsum.merge_kernel_grads: a kernel gradient that autodiff builds as a sum of
products becomes one product on stacked rows, with the same values."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp

from conftest import assert_close
from ggans.cpu import layers
from ggans.cpu.gradsum import merge_kernel_grads
from ggans.gan import GanSpec, _gradient_penalty, init_gan
from ggans.models import kernels_except, l2_penalty


def _kernel_grads(fun, *args, shape) -> list[tuple[int, int]]:
    """(rows of x, rows of y) of each lowered ``x^T @ y`` product giving ``shape``."""
    out = "x".join(map(str, shape))
    found = re.findall(
        r"contracting_dims = \[0\] x \[0\].*\(tensor<(\d+)x\d+xf32>, tensor<(\d+)x\d+xf32>\)"
        rf" -> tensor<{out}xf32>",
        jax.jit(fun).lower(*args).as_text(),
    )
    return [(int(a), int(b)) for a, b in found]


def _uses_three_times(w, x1, x2, x3):
    """A kernel used as ``x @ w``, as ``y @ w^T`` and again as ``x @ w``, plus weight decay."""
    h = jnp.tanh(layers.matmul(x1, w))
    back = layers.matmul_nt(h, w)
    return jnp.sum(back * x2) + jnp.sum(layers.matmul(x3, w) ** 2) + 0.1 * jnp.sum(w**2)


def test_sum_of_products_becomes_one_product_with_equal_values():
    keys = jax.random.split(jax.random.key(0), 4)
    w = jax.random.normal(keys[0], (48, 24))
    x1, x2, x3 = (jax.random.normal(k, (r, 48)) for k, r in zip(keys[1:], (5, 5, 7)))
    grad = jax.grad(_uses_three_times)
    merged = merge_kernel_grads(grad)
    assert sorted(_kernel_grads(grad, w, x1, x2, x3, shape=(48, 24))) == [(5, 5), (5, 5), (7, 7)]
    assert _kernel_grads(merged, w, x1, x2, x3, shape=(48, 24)) == [(17, 17)]
    assert_close(jax.jit(grad)(w, x1, x2, x3), jax.jit(merged)(w, x1, x2, x3), 1e-6)


def test_merged_function_keeps_tree_and_works_under_vmap():
    def f(w, x):
        loss, g = jax.value_and_grad(lambda w: jnp.sum(layers.matmul(x, w) ** 2))(w)
        return {"loss": loss, "grad": g, "twice": layers.matmul_tn(x, x)}

    w = jax.random.normal(jax.random.key(1), (3, 6, 4))
    x = jax.random.normal(jax.random.key(2), (3, 5, 6))
    want = jax.vmap(f)(w, x)
    got = jax.jit(jax.vmap(merge_kernel_grads(f)))(w, x)
    assert_close(want, got, 1e-6)


def test_product_used_twice_is_left_alone():
    def f(x, y):
        p = layers.matmul_tn(x, y)
        return p + p, p * 2.0

    x, y = jnp.ones((4, 3)), jnp.ones((4, 2))
    assert _kernel_grads(merge_kernel_grads(f), x, y, shape=(3, 2)) == [(4, 4)]
    a, b = merge_kernel_grads(f)(x, y)
    assert jnp.array_equal(a, b) and float(a[0, 0]) == 8.0


def test_wgan_gp_discriminator_kernel_gradient_is_one_product():
    """D's hidden dense kernel: three products (real and fake, interpolates, and the penalty's
    input gradient) become one over 2B + B + B rows; every gradient equal to 1e-5; the ops keep
    their names."""
    spec = GanSpec(arch="tiny", loss="wgan_gp", impl="cpu")
    d_params = init_gan(spec, jax.random.key(0)).d_params
    b = spec.batch_size
    real, fake = (
        jax.random.uniform(k, (b, 28, 28, 1), minval=-1)
        for k in jax.random.split(jax.random.key(1))
    )

    def loss(p):
        def d_apply(x):
            return spec.discriminator.apply({"params": p}, x)

        logits = d_apply(jnp.concatenate([real, fake]))
        gp = _gradient_penalty(d_apply, real, fake, jax.random.key(2))
        return (
            jnp.mean(logits[b:])
            - jnp.mean(logits[:b])
            + gp
            + l2_penalty(p, kernels_except("logit"))
        )

    kernel = d_params["Dense_0"]["kernel"].shape
    grad = jax.grad(loss)
    assert sorted(_kernel_grads(grad, d_params, shape=kernel)) == [(b, b), (b, b), (2 * b, 2 * b)]
    assert _kernel_grads(merge_kernel_grads(grad), d_params, shape=kernel) == [(4 * b, 4 * b)]
    assert_close(jax.jit(grad)(d_params), jax.jit(merge_kernel_grads(grad))(d_params), 1e-5)
    # the re-bound ops keep their name stacks (what profiles and HLO dumps show)
    named = [
        jax.jit(f).lower(d_params).as_text(debug_info=True).count("Discriminator")
        for f in (grad, merge_kernel_grads(grad))
    ]
    assert named[1] >= 0.95 * named[0] > 0, named
