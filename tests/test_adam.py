"""ggans.adam.step: optax.adam's update and apply_updates, with large leaves in one pass, equal to
optax's in values and state, per replica under vmap, in place, and optax's own when the kernel is
off."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import optax
import pytest

from conftest import assert_close, needs_onednn, onednn_off, status_under
from ggans.cpu import adam, onednn
from ggans.gan import GanSpec, train_step
from ggans.replicas import init_replicas

HYPER = {"learning_rate": 1e-3, "b1": 0.5, "b2": 0.999}
N = 3


@pytest.fixture
def small_fused_min(monkeypatch):
    """Leaves of 2,000 elements count as large, so the tests stay small."""
    monkeypatch.setattr(adam, "FUSED_MIN", 2000)


def _params(key):
    k1, k2 = jax.random.split(key)
    return {
        "big": jax.random.normal(k1, (N, 40, 50)),
        "small": {"b": jax.random.normal(k2, (N, 7))},
    }


def _optax_step(grads, state, params):
    updates, state = optax.adam(**HYPER).update(grads, state, params)
    return optax.apply_updates(params, updates), state


def _run(step, params, state, steps: int = 6):
    """``steps`` updates of N replicas in one jitted scan, with fresh gradients each step."""

    def body(carry, key):
        p, s = carry
        grads = jax.tree.map(lambda x: jax.random.normal(key, x.shape), p)
        return jax.vmap(step)(grads, s, p), None

    run = jax.jit(
        lambda p, s: jax.lax.scan(body, (p, s), jax.random.split(jax.random.key(9), steps))[0]
    )
    return run(params, state)


def _state(params, counts):
    """optax.adam's stacked state, replica i having taken ``counts[i]`` steps already."""
    state = jax.vmap(optax.adam(**HYPER).init)(params)
    moments = jax.tree.map(lambda x: jnp.abs(x) * 0.01, params)
    first = state[0]._replace(count=jnp.asarray(counts, jnp.int32), mu=moments, nu=moments)
    return (first, *state[1:])


def _step(grads, state, params):
    return adam.step(grads, state, params, **HYPER)


def _kernel_calls(lowered) -> int:
    """How many calls of the one-pass kernel a lowered program makes."""
    return lowered.as_text().count(f"@{onednn.ADAM_TARGET}(")


@needs_onednn
@pytest.mark.usefixtures("small_fused_min")
def test_large_leaves_run_one_kernel_and_equal_optax():
    params = _params(jax.random.key(0))
    state = _state(params, [0, 5, 1000])  # per-replica bias corrections differ
    ours = _run(_step, params, state)
    ref = _run(_optax_step, params, state)
    assert_close(ref, ours, 1e-6, "params and state")
    assert jnp.array_equal(ours[1][0].count, ref[1][0].count)
    assert not jnp.allclose(ours[0]["big"], params["big"], atol=1e-4)  # it did move
    grads = jax.tree.map(jnp.ones_like, params)
    lowered = jax.jit(jax.vmap(_step)).lower(grads, state, params)
    assert _kernel_calls(lowered) == 1  # the big leaf only
    # p, m and v are the outputs' buffers: updated in place
    assert "output_operand_aliases" in lowered.as_text()


@needs_onednn
@pytest.mark.usefixtures("small_fused_min")
def test_each_replica_uses_its_own_step_count():
    """Replica i's update equals optax's for replica i alone (its own bias corrections)."""
    params = _params(jax.random.key(1))
    state = _state(params, [0, 3, 70])
    grads = jax.tree.map(lambda x: jnp.cos(x), params)
    ours = jax.jit(jax.vmap(_step))(grads, state, params)
    for i in range(N):
        one = jax.tree.map(lambda x, i=i: x[i], (grads, state, params))
        assert_close(_optax_step(*one), jax.tree.map(lambda x, i=i: x[i], ours), 1e-6, f"{i}")


@pytest.mark.usefixtures("small_fused_min")
def test_without_the_kernel_it_is_optax(monkeypatch):
    params = _params(jax.random.key(2))
    state = _state(params, [1, 1, 1])
    with status_under(monkeypatch, onednn_off):
        grads = jax.tree.map(jnp.ones_like, params)
        assert _kernel_calls(jax.jit(jax.vmap(_step)).lower(grads, state, params)) == 0
        ours = _run(_step, params, state)
    ref = _run(_optax_step, params, state)
    assert_close(ref, ours, 0.0, "params and state")


@needs_onednn
def test_a_gan_step_with_the_kernel_equals_optaxs(monkeypatch):
    """A WGAN-GP step of two tiny GANs, with every leaf of 1,000+ elements on the kernel, equals
    the same step on optax's update: D's parameters and moments, and G's moments. G's parameters
    are left out: G's gradient is taken through D's new parameters, which may differ in the last
    bit, and Adam's first step, g / (|g| + eps), turns that into a difference of up to the
    learning rate where g is near eps."""
    spec = GanSpec(arch="tiny", noise_dim=16, batch_size=4)
    state0 = init_replicas(spec, jax.random.key(0), 2, init="independent")
    keys = jax.random.split(jax.random.key(1), 2)
    real = jax.random.uniform(jax.random.key(3), (2, 4, 28, 28, 1), minval=-1.0, maxval=1.0)

    def one_step():
        """(kernel calls, the two GANs after one step), under the current FUSED_MIN."""
        lowered = jax.jit(jax.vmap(partial(train_step, spec))).lower(state0, keys, real)
        return _kernel_calls(lowered), lowered.compile()(state0, keys, real)[0]

    monkeypatch.setattr(adam, "FUSED_MIN", 1000)
    calls, ours = one_step()
    monkeypatch.setattr(adam, "FUSED_MIN", 1 << 62)
    none, ref = one_step()
    assert (calls, none) == (6, 0)  # six leaves of 1,000+ elements: G's 4, D's 2
    for part in ("d_params", "d_opt", "g_opt"):
        assert_close(getattr(ref, part), getattr(ours, part), 1e-6, part)
