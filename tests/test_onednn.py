"""ggans.onednn: oneDNN's convolution slots and matrix products equal XLA's, the layers lower to
them on the CPU, and everything falls back to XLA's own when oneDNN is off or missing."""

from __future__ import annotations

import importlib.metadata

import jax
import jax.numpy as jnp
import pytest

from conftest import assert_close, needs_onednn, onednn_off, status_under
from ggans.cpu import layers, onednn

# (input shape [B, H, W, ci], co, kernel, strides, padding)
GEOMETRIES = [
    ((4, 14, 14, 64), 128, (4, 4), (2, 2), ((1, 1), (1, 1))),  # the discriminator's second conv
    ((4, 14, 14, 64), 128, (4, 4), (1, 1), ((2, 1), (2, 1))),  # the generator's first, transposed
    ((4, 28, 28, 32), 64, (4, 4), (1, 1), ((2, 1), (2, 1))),  # the generator's second, transposed
    ((3, 9, 11, 5), 6, (3, 2), (2, 3), ((0, 2), (1, 0))),
    ((2, 10, 7, 3), 4, (5, 3), (3, 1), ((2, 2), (0, 1))),
]


@needs_onednn
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"{g[0]}->{g[1]}s{g[3]}")
def test_slots_equal_xla(geometry):
    """Forward, backward-data and backward-weights equal XLA's convolution and its transposes
    (float32: to 1e-5 of the largest value; sums run over up to 3,136 terms)."""
    shape, co, ks, strides, padding = geometry
    k = jax.random.split(jax.random.key(0), 3)
    u = jax.random.normal(k[0], shape)
    w = jax.random.normal(k[1], (*ks, shape[-1], co))
    kw = dict(strides=strides, padding=padding, precision=jax.lax.Precision.HIGHEST)
    v_ref = layers._conv_impl(u, w, **kw)
    v = jax.random.normal(k[2], v_ref.shape)
    u_ref = layers._convt_impl_xla(v, w, **kw, u_spatial=shape[1:-1])
    w_ref = layers._kgrad_impl_xla(u, v, **kw, k_spatial=ks)
    got = jax.jit(
        lambda u, v, w: (
            onednn.conv(u, w, strides, padding, v_ref.shape[1:-1]),
            onednn.conv_backward_data(v, w, strides, padding, shape[1:-1]),
            onednn.conv_backward_weights(u, v, strides, padding, ks),
        )
    )(u, v, w)
    names = ("forward", "backward data", "backward weights")
    for name, new, ref in zip(names, got, (v_ref, u_ref, w_ref), strict=True):
        assert new.dtype == jnp.float32, name
        assert_close(ref, new, 1e-5, name)


@needs_onednn
@pytest.mark.parametrize("cb", [0, 1], ids=["a @ b", "a @ b.T"])
def test_matmul_equals_xla(cb):
    """oneDNN's product equals XLA's, alone and under vmap (oneDNN's batch axis), also with the
    batch axis of ``b`` not in front (float32: to 1e-5 of the largest value)."""
    k = jax.random.split(jax.random.key(2), 4)
    a = jax.random.normal(k[0], (2, 24, 300))
    b = jax.random.normal(k[1], (2, 300, 40) if cb == 0 else (2, 40, 300))
    ref = jnp.einsum("bmk,bkn->bmn" if cb == 0 else "bmk,bnk->bmn", a, b)
    one = jax.jit(lambda a, b: onednn.matmul(a, b, cb))(a[0], b[0])
    both = jax.jit(jax.vmap(lambda a, b: onednn.matmul(a, b, cb)))(a, b)
    moved = jax.jit(jax.vmap(lambda a, b: onednn.matmul(a, b, cb), in_axes=(0, 2)))(
        a, jnp.moveaxis(b, 0, 2)
    )
    assert one.shape == (24, 40) and both.shape == moved.shape == (2, 24, 40)
    assert_close(ref[0], one, 1e-5, "one")
    assert_close(ref, both, 1e-5, "vmap")
    assert_close(ref, moved, 1e-5, "vmap, batch axis last")


def test_skinny_products_only():
    """Only float32 products of few rows with a large kernel, contracted in the rows' last axis,
    go to oneDNN: the dense layers' forward and input-gradient products, not kernel gradients."""
    ready = onednn.status() == "ready" and jax.default_backend() == "cpu"
    x, w = jnp.ones((32, 6272)), jnp.ones((6272, 1024))
    assert onednn.skinny(x, w, 1, 0) == ready  # x @ W
    assert onednn.skinny(jnp.ones((64, 1024)), w, 1, 1) == ready  # dy @ W.T
    assert not onednn.skinny(jnp.ones((65, 6272)), w, 1, 0)  # more rows: XLA's are as fast
    assert not onednn.skinny(x, jnp.ones((6272, 100)), 1, 0)  # a small kernel
    assert not onednn.skinny(x.T, jnp.ones((32, 1024)), 0, 0)  # a kernel gradient
    with jax.enable_x64(True):
        assert not onednn.skinny(x.astype(jnp.float64), w.astype(jnp.float64), 1, 0)


@needs_onednn
def test_dense_layer_lowers_to_onednn_matmul(monkeypatch):
    """The paper's 6272 -> 1024 layer at batch 32: its forward and input-gradient products of
    every order are oneDNN calls on the CPU, its kernel gradient stays XLA's, and WGAN-GP's
    gradients equal those of the XLA lowering (GGANS_ONEDNN=0)."""
    k = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(k[0], (32, 6272))
    w = 0.01 * jax.random.normal(k[1], (6272, 1024))
    v = jax.random.normal(k[2], (1024,))

    def penalty(w, v, x):  # v: the next layer's kernel, as the critic's logit layer
        gx = jax.grad(lambda x: jnp.sum(jax.nn.leaky_relu(layers.matmul(x, w)) @ v))(x)
        return jnp.mean((jnp.sqrt(jnp.sum(gx**2, axis=1) + 1e-10) - 1.0) ** 2)

    fast = jax.jit(jax.grad(penalty, argnums=(0, 1)))
    text = fast.lower(w, v, x).as_text()
    # forward x @ W, input gradient dy @ W.T and, for v's gradient, its transpose dx @ W
    assert text.count("ggans_onednn_matmul") == 3
    assert "stablehlo.dot_general" in text  # the kernel gradient
    with_onednn = fast(w, v, x)

    with status_under(monkeypatch, onednn_off):
        slow = jax.jit(jax.grad(lambda *a: penalty(*a), argnums=(0, 1)))
        assert "ggans_onednn" not in slow.lower(w, v, x).as_text()
        without = slow(w, v, x)
    assert_close(without, with_onednn, 3e-5, "second-order gradients")


def _wgangp_grads(x, w1, w2):
    """Two wide layers (a conv and a transposed conv), differentiated twice as WGAN-GP does."""

    def critic(x, w1, w2):
        h = jnp.tanh(layers.conv(x, w1, strides=2, padding=((1, 1), (1, 1))))
        return jnp.sum(jnp.sin(layers.conv_transpose(h, w2, strides=2)))

    def penalty(w1, w2):
        gx = jax.grad(critic)(x, w1, w2)
        return jnp.mean((jnp.sqrt(jnp.sum(gx**2, axis=(1, 2, 3)) + 1e-10) - 1.0) ** 2)

    return jax.grad(penalty, argnums=(0, 1))(w1, w2)


@needs_onednn
def test_layers_lower_to_onednn_and_keep_their_gradients(monkeypatch):
    """On the CPU a wide layer's slots of every order are oneDNN calls, not convolutions, and the
    second-order gradients equal those of the XLA lowering (GGANS_ONEDNN=0)."""
    k = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(k[0], (3, 14, 14, 8))
    w1 = 0.2 * jax.random.normal(k[1], (4, 4, 8, 16))
    w2 = 0.2 * jax.random.normal(k[2], (4, 4, 16, 8))
    fast = jax.jit(_wgangp_grads)
    text = fast.lower(x, w1, w2).as_text()
    assert "ggans_onednn_conv_fwd" in text and "ggans_onednn_conv_bwd_weights" in text
    assert "ggans_onednn_conv_bwd_data" in text
    assert "stablehlo.convolution" not in text
    with_onednn = fast(x, w1, w2)

    with status_under(monkeypatch, onednn_off):
        slow = jax.jit(lambda *a: _wgangp_grads(*a))  # a new function: traced afresh
        assert "ggans_onednn" not in slow.lower(x, w1, w2).as_text()
        without = slow(x, w1, w2)
    assert_close(without, with_onednn, 1e-5, "second-order gradients")


def test_missing_wheels_fall_back_to_xla(monkeypatch):
    """Without the oneDNN wheels the status says why, and the layers run XLA's convolutions."""

    def missing(dist, suffix):
        raise importlib.metadata.PackageNotFoundError(dist)

    with status_under(monkeypatch, lambda m: m.setattr(onednn, "_wheel_file", missing)):
        assert onednn.status().startswith("unavailable")
        u, w = jnp.ones((1, 6, 6, 3)), jnp.ones((3, 3, 3, 2))
        assert not onednn.available(u, w, padding=((1, 1), (1, 1)))
        text = jax.jit(lambda u, w: layers.conv(u, w, padding="SAME")).lower(u, w).as_text()
        assert "stablehlo.convolution" in text and "ggans_onednn" not in text


def test_only_float32_2d_non_negative_padding():
    u32, w32 = jnp.ones((1, 6, 6, 3)), jnp.ones((3, 3, 3, 2))
    ready = onednn.status() == "ready"
    assert onednn.available(u32, w32, padding=((1, 1), (0, 2))) == ready
    assert not onednn.available(u32, w32, padding=((1, 1), (-1, 0)))
    assert not onednn.available(jnp.ones((1, 6, 3)), jnp.ones((3, 3, 2)), padding=((1, 1),))
    with jax.enable_x64(True):
        u64 = jnp.ones((1, 6, 6, 3), jnp.float64)
        assert not onednn.available(u64, u64.astype(jnp.float64), padding=((1, 1), (1, 1)))


@needs_onednn
def test_build_is_cached(tmp_path, monkeypatch):
    """The kernels compile once per cache folder; a second build reuses the library."""
    monkeypatch.setenv("GGANS_CACHE_DIR", str(tmp_path))
    first = onednn._build()
    stamp = first.stat().st_mtime_ns
    assert first.parent == tmp_path and first.suffix == ".so"
    assert onednn._build() == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary left behind


# (replica input shape [B, H, W, ci], co, kernel, strides, padding): the tiny model's layers,
# single-channel sides included (stacked replicas send those to oneDNN too)
STACKED_GEOMETRIES = [
    ((6, 28, 28, 1), 8, (4, 4), (2, 2), ((1, 1), (1, 1))),  # D's first conv
    ((6, 14, 14, 8), 16, (4, 4), (2, 2), ((1, 1), (1, 1))),  # D's second
    ((6, 28, 28, 8), 1, (4, 4), (1, 1), ((1, 2), (1, 2))),  # G's output conv
    ((3, 9, 11, 5), 6, (3, 2), (2, 3), ((0, 2), (1, 0))),
]


@needs_onednn
@pytest.mark.parametrize("geometry", STACKED_GEOMETRIES, ids=lambda g: f"{g[0]}->{g[1]}")
def test_stacked_slots_equal_one_replica_at_a_time(geometry):
    """With a leading replica axis, each slot is one call over all replicas and equals the
    replicas' calls one at a time (float32: to 1e-5 of the largest value)."""
    shape, co, ks, strides, padding = geometry
    r = 3
    k = jax.random.split(jax.random.key(4), 3)
    u = jax.random.normal(k[0], (r, *shape))
    w = jax.random.normal(k[1], (r, *ks, shape[-1], co))
    vs = layers.out_spatial(shape[1:-1], ks, strides, padding)
    v = jax.random.normal(k[2], (r, shape[0], *vs, co))

    def slots(u, v, w):
        return (
            onednn.conv(u, w, strides, padding, vs),
            onednn.conv_backward_data(v, w, strides, padding, shape[1:-1]),
            onednn.conv_backward_weights(u, v, strides, padding, ks),
        )

    text = jax.jit(slots).lower(u, v, w).as_text()
    assert text.count("ggans_onednn_conv") == 3 and "stablehlo.while" not in text
    stacked = jax.jit(slots)(u, v, w)
    one_by_one = jax.jit(lambda *a: jax.lax.map(lambda x: slots(*x), a))(u, v, w)
    names = ("forward", "backward data", "backward weights")
    for name, new, ref in zip(names, stacked, one_by_one, strict=True):
        assert new.shape == ref.shape, name
        assert_close(ref, new, 1e-5, name)


def _critic_penalty_grads(x, w1, w2, w3):
    """WGAN-GP's gradients of a small critic (the tiny model's convolutions: one input channel,
    then 8 -> 16, and a transposed conv back onto one channel), for one replica."""

    def critic(x, w1, w2, w3):
        h = jax.nn.leaky_relu(layers.conv(x, w1, strides=2, padding=((1, 1), (1, 1))), 0.01)
        h = jax.nn.leaky_relu(layers.conv(h, w2, strides=2, padding=((1, 1), (1, 1))), 0.01)
        return jnp.sum(jnp.tanh(layers.conv_transpose(h, w3, strides=2)))

    def penalty(w1, w2, w3):
        gx = jax.grad(critic)(x, w1, w2, w3)
        return jnp.mean((jnp.sqrt(jnp.sum(gx**2, axis=(1, 2, 3)) + 1e-10) - 1.0) ** 2)

    return jax.grad(penalty, argnums=(0, 1, 2))(w1, w2, w3)


@needs_onednn
def test_stacked_replicas_lower_to_one_call_per_slot_and_match_a_loop(monkeypatch):
    """Under vmap over stacked replicas (and a second vmap around it, as S runs of N machines),
    a critic's second-order gradients run each slot as one oneDNN call over all replicas, with
    no loop over them, and equal the replicas' gradients one at a time; the same with oneDNN
    off (XLA's forms, single-channel slots batched)."""
    n = 4
    k = jax.random.split(jax.random.key(5), 4)
    x = jax.random.normal(k[0], (n, 3, 28, 28, 1))
    w1 = 0.3 * jax.random.normal(k[1], (n, 4, 4, 1, 8))
    w2 = 0.2 * jax.random.normal(k[2], (n, 4, 4, 8, 16))
    w3 = 0.2 * jax.random.normal(k[3], (n, 4, 4, 16, 1))
    args = (x, w1, w2, w3)
    stacked = jax.jit(jax.vmap(_critic_penalty_grads))
    text = stacked.lower(*args).as_text()
    assert "stablehlo.while" not in text and "stablehlo.convolution" not in text
    assert "tensor<4x3x28x28x1xf32>" in text  # a replica axis on oneDNN's operands
    ref = jax.jit(lambda *a: jax.lax.map(lambda t: _critic_penalty_grads(*t), a))(*args)
    assert_close(ref, stacked(*args), 2e-5, "stacked")
    nested = jax.jit(jax.vmap(jax.vmap(_critic_penalty_grads)))
    halves = [a.reshape(2, n // 2, *a.shape[1:]) for a in args]
    got = tuple(g.reshape(n, *g.shape[2:]) for g in nested(*halves))
    assert_close(ref, got, 2e-5, "nested vmap")
    with status_under(monkeypatch, onednn_off):
        plain = jax.jit(jax.vmap(lambda *a: _critic_penalty_grads(*a)))
        assert "ggans_onednn" not in plain.lower(*args).as_text()
        assert_close(ref, plain(*args), 2e-5, "oneDNN off")


# (replica input shape [B, H, W, ci], kernel, padding) of convolutions onto one channel at
# stride 1: the tiny and paper generators' output layers (row lengths kw * ci of 32 and 128,
# compiled with vector accumulators), a row length of 15 (the scalar loop), no padding, and
# padding wider than the image on one side (border columns only).
ONE_CHANNEL_GEOMETRIES = [
    ((5, 28, 28, 8), (4, 4), ((1, 2), (1, 2))),
    ((3, 28, 28, 32), (4, 4), ((1, 2), (1, 2))),
    ((3, 9, 11, 3), (3, 5), ((0, 2), (2, 1))),
    ((2, 7, 9, 16), (2, 3), ((0, 0), (0, 0))),
    ((2, 5, 3, 16), (4, 4), ((3, 3), (4, 1))),
]


@needs_onednn
@pytest.mark.parametrize("replicas", [0, 3], ids=["one replica", "3 stacked"])
@pytest.mark.parametrize("geometry", ONE_CHANNEL_GEOMETRIES, ids=lambda g: f"{g[0]}k{g[1]}")
def test_one_channel_loops_equal_xla(geometry, replicas):
    """Onto one channel at stride 1, the forward and kernel-gradient slots (direct loops, not
    oneDNN) equal XLA's convolution and its kernel gradient, for one replica (its batch split
    over the threads) and for stacked replicas (float32: to 1e-5 of the largest value)."""
    shape, ks, padding = geometry
    k = jax.random.split(jax.random.key(6), 3)
    lead = (replicas,) if replicas else ()
    u = jax.random.normal(k[0], (*lead, *shape))
    w = jax.random.normal(k[1], (*lead, *ks, shape[-1], 1))
    vs = layers.out_spatial(shape[1:-1], ks, (1, 1), padding)
    v = jax.random.normal(k[2], (*lead, shape[0], *vs, 1))
    kw = dict(strides=(1, 1), padding=padding, precision=jax.lax.Precision.HIGHEST)

    def ref(u, v, w):
        return layers._conv_impl(u, w, **kw), layers._kgrad_impl_xla(u, v, **kw, k_spatial=ks)

    if replicas:
        ref = jax.vmap(ref)
    got = jax.jit(
        lambda u, v, w: (
            onednn.conv(u, w, (1, 1), padding, vs),
            onednn.conv_backward_weights(u, v, (1, 1), padding, ks),
        )
    )(u, v, w)
    for name, new, want in zip(("forward", "kernel gradient"), got, ref(u, v, w), strict=True):
        assert new.shape == want.shape, name
        assert_close(want, new, 1e-5, name)


@needs_onednn
def test_output_layer_lowers_to_the_one_channel_loops():
    """The generator's output layer (8 -> 1 channel, stride 1) runs its forward and kernel
    gradient on the kernels' calls for one replica too, where other single-channel slots stay
    on XLA's forms: its input gradient is one XLA convolution from the one channel."""
    x = jnp.ones((2, 28, 28, 8))
    w = jnp.ones((4, 4, 8, 1))

    def loss(x, w):
        return jnp.sum(jnp.tanh(layers.conv(x, w, strides=1, padding=((1, 2), (1, 2)))))

    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).as_text()
    assert text.count("ggans_onednn_conv_fwd") == text.count("ggans_onednn_conv_bwd_weights") == 1
    assert "ggans_onednn_conv_bwd_data" not in text and text.count("stablehlo.convolution") == 1


# (replica input shape [B, H, W, ci], co, kernel, strides, padding) whose backward data runs on
# the kernels' direct loops (4 kernel rows of kw * ci = 32 or 64 floats, from 8 or more
# channels; or onto one channel, at most 16 taps): the tiny model's transposed convolutions and
# its critic's input gradients, one-sided and no padding, uneven strides, and an input row and
# column no output reaches.
BACKWARD_DATA_GEOMETRIES = [
    ((3, 28, 28, 8), 16, (4, 4), (2, 2), ((1, 1), (1, 1))),
    ((3, 14, 14, 16), 16, (4, 4), (2, 2), ((2, 1), (2, 1))),
    ((5, 14, 14, 8), 16, (4, 4), (1, 1), ((1, 2), (1, 2))),
    ((2, 10, 11, 16), 12, (4, 4), (2, 3), ((0, 2), (1, 0))),
    ((2, 9, 9, 8), 8, (4, 4), (2, 2), ((0, 0), (0, 0))),
    ((3, 28, 28, 1), 8, (4, 4), (2, 2), ((1, 1), (1, 1))),
    ((2, 9, 10, 1), 5, (3, 5), (2, 1), ((0, 2), (2, 1))),
]


@needs_onednn
@pytest.mark.parametrize("replicas", [0, 3], ids=["one replica", "3 stacked"])
@pytest.mark.parametrize("geometry", BACKWARD_DATA_GEOMETRIES, ids=lambda g: f"{g[0]}s{g[3]}")
def test_backward_data_loops_equal_xla(geometry, replicas):
    """The backward data onto few channels (direct loops, not oneDNN) equals XLA's transposed
    convolution, for one replica (its images split over the threads) and for stacked replicas
    (float32: to 1e-5 of the largest value)."""
    shape, co, ks, strides, padding = geometry
    k = jax.random.split(jax.random.key(7), 2)
    lead = (replicas,) if replicas else ()
    w = jax.random.normal(k[0], (*lead, *ks, shape[-1], co))
    vs = layers.out_spatial(shape[1:-1], ks, strides, padding)
    v = jax.random.normal(k[1], (*lead, shape[0], *vs, co))
    kw = dict(strides=strides, padding=padding, precision=jax.lax.Precision.HIGHEST)

    def ref(v, w):
        return layers._convt_impl_xla(v, w, **kw, u_spatial=shape[1:-1])

    want = jax.vmap(ref)(v, w) if replicas else ref(v, w)
    got = jax.jit(lambda v, w: onednn.conv_backward_data(v, w, strides, padding, shape[1:-1]))(v, w)
    assert got.shape == want.shape
    assert_close(want, got, 1e-5, "backward data")


@needs_onednn
def test_critic_input_gradient_lowers_to_the_loops():
    """The input gradient of the critic's first convolution (1 -> 8 channels, stride 2), a
    transposed convolution onto one channel, runs on the kernels' call for one replica and for
    stacked replicas, not on XLA's forms."""
    x = jnp.ones((2, 28, 28, 1))
    w = jnp.ones((4, 4, 1, 8))

    def critic(x, w):
        return jnp.sum(jnp.tanh(layers.conv(x, w, strides=2, padding=((1, 1), (1, 1)))))

    grad = jax.grad(critic)
    stacked = (jnp.stack([x, x]), jnp.stack([w, w]))
    for fn, args in ((grad, (x, w)), (jax.vmap(grad), stacked)):
        text = jax.jit(fn).lower(*args).as_text()
        assert text.count("ggans_onednn_conv_bwd_data") == 1
        assert "stablehlo.dot_general" not in text and "stablehlo.pad" not in text
