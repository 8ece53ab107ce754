"""Every layer set's Conv / ConvTranspose / Dense against flax.linen: values, gradients of first
and second order (WGAN-GP style), single and under vmap over stacked params, float32 and float64;
then what the CPU plug-in's layers (``ggans.cpu.layers``) emit."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from conftest import assert_close
from ggans import impls
from ggans.cpu import layers

# the layer sets compared with Flax's own ("flax" itself is the reference)
LAYER_SETS = ["patches", "cpu"]

# (name, kind, input shape without batch, kwargs); the first five are the TF MNIST GAN's layers
GAN_CASES = [
    ("D_conv1", "conv", (28, 28, 1), dict(features=64, kernel_size=(4, 4), strides=(2, 2))),
    ("D_conv2", "conv", (14, 14, 64), dict(features=128, kernel_size=(4, 4), strides=(2, 2))),
    (
        "G_convT1",
        "convT",
        (7, 7, 128),
        dict(features=64, kernel_size=(4, 4), strides=(2, 2), use_bias=False),
    ),
    (
        "G_convT2",
        "convT",
        (14, 14, 64),
        dict(features=32, kernel_size=(4, 4), strides=(2, 2), use_bias=False),
    ),
    ("G_conv", "conv", (28, 28, 32), dict(features=1, kernel_size=(4, 4), strides=(1, 1))),
]
# the GAN's dense layers (G's two, D's hidden one and its logit)
DENSE_CASES = [
    ("G_dense0", "dense", (128,), dict(features=1024, use_bias=False)),
    ("G_dense1", "dense", (1024,), dict(features=6272, use_bias=False)),
    ("D_dense", "dense", (6272,), dict(features=1024)),
    ("D_logit", "dense", (1024,), dict(features=1)),
]
ODD_CASES = [
    ("conv_k3s1_valid", "conv", (9, 9, 3), dict(features=5, kernel_size=(3, 3), padding="VALID")),
    ("conv_k3s2_odd", "conv", (9, 10, 3), dict(features=4, kernel_size=(3, 3), strides=2)),
    (
        "conv_k5x3_s3x2_explicit",
        "conv",
        (11, 8, 2),
        dict(features=3, kernel_size=(5, 3), strides=(3, 2), padding=((2, 1), (0, 2))),
    ),
    ("conv_1d", "conv", (12, 3), dict(features=4, kernel_size=(3,), strides=2)),
    ("convT_k3s2", "convT", (5, 4, 3), dict(features=4, kernel_size=(3, 3), strides=(2, 2))),
    (
        "convT_k3s2_valid",
        "convT",
        (5, 5, 3),
        dict(features=2, kernel_size=(3, 3), strides=(2, 2), padding="VALID"),
    ),
    ("convT_k2s3", "convT", (4, 4, 3), dict(features=2, kernel_size=(2, 2), strides=(3, 3))),
    ("convT_k5s3_s1", "convT", (4, 5, 2), dict(features=3, kernel_size=(5, 3), strides=(3, 1))),
    (
        "convT_explicit",
        "convT",
        (5, 5, 2),
        dict(features=3, kernel_size=(4, 4), strides=(2, 2), padding=((1, 2), (3, 0))),
    ),
]
# the GAN's layer geometries (kernel, stride, padding, spatial size) with few channels
GAN_SMALL = [
    (
        name + "_small",
        kind,
        (*shape[:-1], min(shape[-1], 3)),
        {**kw, "features": min(kw["features"], 4)},
    )
    for name, kind, shape, kw in GAN_CASES
]
DENSE_SMALL = [
    ("dense_small", "dense", (5,), dict(features=3)),
    ("dense_nobias_small", "dense", (3,), dict(features=4, use_bias=False)),
]
ALL_CASES = GAN_CASES + ODD_CASES
FULL_SIZE = GAN_CASES + DENSE_CASES  # the GAN's own layers, at full width
SMALL_CASES = GAN_SMALL + ODD_CASES + DENSE_SMALL
# the patches layers on the GAN's geometries in the fast suite, on the odd ones in the slow one
PATCHES_SLOW = {c[0] for c in ODD_CASES + DENSE_SMALL}
VMAP_CASES = [GAN_SMALL[0], GAN_SMALL[2], DENSE_SMALL[0], ODD_CASES[6]]


def _modules(kind, kw, dtype=jnp.float32, impl="cpu"):
    new = impls.get(impl)
    if kind == "dense":
        return nn.Dense(param_dtype=dtype, **kw), new.dense(param_dtype=dtype, **kw)
    if kind == "conv":
        return nn.Conv(param_dtype=dtype, **kw), new.conv(param_dtype=dtype, **kw)
    return nn.ConvTranspose(param_dtype=dtype, **kw), new.conv_transpose(param_dtype=dtype, **kw)


def _setup(kind, shape, kw, batch=4, dtype=jnp.float32, seed=0, impl="cpu"):
    ref, new = _modules(kind, kw, dtype, impl)
    kx, kp, kn = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (batch, *shape), dtype)
    params = ref.init(kp, x)
    # non-zero bias, so that it is checked too
    params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(kn, a.shape, a.dtype), params)
    return ref, new, params, x


def _first_order(m):
    def f(p, x):
        return jax.grad(lambda p, x: jnp.sum(jnp.sin(m.apply(p, x))), argnums=(0, 1))(p, x)

    return f


def _second_order(m):
    """WGAN-GP's pattern: grad wrt params and input of a function of |grad_x D|."""

    def f(p, x):
        def penalty(p, x):
            gx = jax.grad(lambda x: jnp.sum(jnp.tanh(m.apply(p, x))))(x)
            norms = jnp.sqrt(jnp.sum(gx**2, axis=tuple(range(1, gx.ndim))) + 1e-10)
            return jnp.mean((norms - 1.0) ** 2)

        return jax.grad(penalty, argnums=(0, 1))(p, x)

    return f


def _all_orders(m):
    """Values, first-order and second-order gradients, in one jitted function."""
    first, second = _first_order(m), _second_order(m)
    return jax.jit(lambda p, x: (m.apply(p, x), first(p, x), second(p, x)))


FLOAT64_PARAMS = [
    pytest.param(
        *case,
        impl,
        id=f"{case[0]}-{impl}",
        marks=[pytest.mark.slow] if impl == "patches" and case[0] in PATCHES_SLOW else [],
    )
    for case in SMALL_CASES
    for impl in LAYER_SETS
]


@pytest.mark.parametrize("name,kind,shape,kw,impl", FLOAT64_PARAMS)
def test_gradients_float64(name, kind, shape, kw, impl):
    with jax.enable_x64(True):
        ref, new, params, x = _setup(kind, shape, kw, batch=2, dtype=jnp.float64, impl=impl)
        x = x.astype(jnp.float64)
        assert jax.tree.leaves(params)[0].dtype == jnp.float64
        key = jax.random.key(3)
        assert_close(ref.init(key, x), new.init(key, x), 0.0, "init")  # same initialisers
        out_ref = _all_orders(ref)(params, x)
        out_new = _all_orders(new)(params, x)
        for i, what in enumerate(["values", "grad", "second order"]):
            assert_close(out_ref[i], out_new[i], 1e-11, what)


# the paper's layers at full width: patches' (the float64 tests above cover its algebra) are slow
@pytest.mark.parametrize("impl", ["cpu", pytest.param("patches", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name,kind,shape,kw", FULL_SIZE, ids=[c[0] for c in FULL_SIZE])
def test_gradients_float32(name, kind, shape, kw, impl):
    ref, new, params, x = _setup(kind, shape, kw, batch=2, impl=impl)
    key = jax.random.key(3)
    assert_close(ref.init(key, x), new.init(key, x), 0.0, "init")  # same initialisers
    out_ref = _all_orders(ref)(params, x)
    out_new = _all_orders(new)(params, x)
    # On the CPU the wide layers' products run on oneDNN, which sums in another order than XLA
    # (over up to 6272 terms): a few float32 roundings, 1e-5 of the largest gradient at most.
    for i, (what, tol) in enumerate([("values", 2e-6), ("grad", 3e-5), ("second order", 1e-4)]):
        assert_close(out_ref[i], out_new[i], tol, what)


def _stack(trees):
    return jax.tree.map(lambda *a: jnp.stack(a), *trees)


@pytest.mark.parametrize("impl", LAYER_SETS)
@pytest.mark.parametrize("name,kind,shape,kw", VMAP_CASES, ids=[c[0] for c in VMAP_CASES])
def test_vmap_over_stacked_params(name, kind, shape, kw, impl):
    """Replicas: params and inputs both batched; also shared params / shared inputs (these
    take other batching rules), and nested vmap with the batch axis not in front."""
    with jax.enable_x64(True):
        n = 3
        setups = [
            _setup(kind, shape, kw, batch=2, dtype=jnp.float64, seed=s, impl=impl) for s in range(n)
        ]
        ref, new = setups[0][0], setups[0][1]
        P = _stack([s[2] for s in setups])
        X = jnp.stack([s[3] for s in setups]).astype(jnp.float64)
        p0, x0 = setups[0][2], X[0]

        def both(m):
            second = _second_order(m)
            return lambda p, x: (m.apply(p, x), second(p, x))

        modes = [((0, 0), (P, X), "vmap both")]
        if name != VMAP_CASES[-1][0]:
            modes += [((None, 0), (p0, X), "vmap inputs only"), ((0, None), (P, x0), "params only")]
        for axes, args, what in modes:
            out_ref = jax.jit(jax.vmap(both(ref), in_axes=axes))(*args)
            out_new = jax.jit(jax.vmap(both(new), in_axes=axes))(*args)
            assert_close(out_ref, out_new, 1e-11, what)
        if name == VMAP_CASES[0][0]:
            f_ref = jax.jit(jax.vmap(jax.vmap(_second_order(ref)), in_axes=(None, 1)))
            f_new = jax.jit(jax.vmap(jax.vmap(_second_order(new)), in_axes=(None, 1)))
            X2 = jnp.stack([X, X * 0.5], axis=1)
            assert_close(f_ref(P, X2), f_new(P, X2), 1e-11, "nested vmap")


def test_vmap_unrolled_replicas(monkeypatch):
    """The unrolled per-replica path (``UNROLL_MAX`` >= N) computes the same as the loop."""
    name, kind, shape, kw = GAN_SMALL[2]
    with jax.enable_x64(True):
        setups = [_setup(kind, shape, kw, batch=2, dtype=jnp.float64, seed=s) for s in range(3)]
        new = setups[0][1]
        P = _stack([s[2] for s in setups])
        X = jnp.stack([s[3] for s in setups]).astype(jnp.float64)
        looped = jax.vmap(_second_order(new))(P, X)
        monkeypatch.setattr(layers, "UNROLL_MAX", 8)
        unrolled = jax.vmap(_second_order(new))(P, X)
        assert_close(looped, unrolled, 1e-13, "unrolled")


@pytest.mark.parametrize("impl", LAYER_SETS)
def test_batch_dims_like_flax(impl):
    cases = (GAN_CASES[1], GAN_CASES[2], DENSE_CASES[0])
    for kind, shape, kw in [(c[1], c[2], c[3]) for c in cases]:
        ref, new, params, x = _setup(kind, shape, kw, batch=2, impl=impl)
        x3 = jnp.stack([x, 2 * x])  # two leading batch dims
        assert_close(ref.apply(params, x3), new.apply(params, x3), 2e-6, "2 batch dims")
        assert_close(ref.apply(params, x[0]), new.apply(params, x[0]), 2e-6, "no batch dim")


@pytest.mark.parametrize("impl", LAYER_SETS)
def test_vmap_float32_wgangp_discriminator(impl):
    """The TF MNIST GAN's discriminator with WGAN-GP, vmapped over 2 replicas."""

    class D(nn.Module):
        impl: str

        @nn.compact
        def __call__(self, x):
            conv = impls.get(self.impl).conv
            x = nn.leaky_relu(conv(64, (4, 4), strides=(2, 2))(x), 0.01)
            x = nn.leaky_relu(conv(128, (4, 4), strides=(2, 2))(x), 0.01)
            x = nn.Dense(64)(x.reshape(x.shape[0], -1))
            return nn.Dense(1)(nn.leaky_relu(nn.LayerNorm()(x), 0.01))

    def d_grad(d):
        def f(p, real, fake, eps):
            def loss(p):
                x_hat = eps * real + (1 - eps) * fake
                gx = jax.grad(lambda x: jnp.sum(d.apply(p, x)))(x_hat)
                slopes = jnp.sqrt(jnp.sum(gx**2, axis=(1, 2, 3)) + 1e-10)
                gp = jnp.mean((slopes - 1.0) ** 2)
                return jnp.mean(d.apply(p, fake)) - jnp.mean(d.apply(p, real)) + gp

            return jax.grad(loss)(p)

        return jax.jit(jax.vmap(f))

    k = jax.random.split(jax.random.key(0), 5)
    n, b = 2, 8
    real = jax.random.uniform(k[0], (n, b, 28, 28, 1), minval=-1, maxval=1)
    fake = jax.random.uniform(k[1], (n, b, 28, 28, 1), minval=-1, maxval=1)
    eps = jax.random.uniform(k[2], (n, b, 1, 1, 1))
    params = jax.vmap(D("flax").init)(jax.random.split(k[3], n), real)
    assert_close(
        d_grad(D("flax"))(params, real, fake, eps),
        d_grad(D(impl))(params, real, fake, eps),
        1e-4,
        "D grad",
    )


def _conv_ops(hlo_text):
    return [line for line in hlo_text.splitlines() if "convolution" in line]


@pytest.mark.parametrize("name,kind,shape,kw", GAN_CASES, ids=[c[0] for c in GAN_CASES])
def test_no_slow_convolutions_emitted(name, kind, shape, kw):
    """Under vmap and second order, only ungrouped, input-undilated convolutions are emitted
    (grouped ones and input-dilated ones are the slow cases of XLA's CPU backend), if any: on
    the CPU a wide layer's slots are oneDNN calls instead (``ggans.onednn``)."""
    _, new, params, x = _setup(kind, shape, kw, batch=2)
    P = _stack([params, params])
    X = jnp.stack([x, x])
    text = jax.jit(jax.vmap(_second_order(new))).lower(P, X).as_text()
    convs = _conv_ops(text)
    assert convs or "ggans_onednn_conv" in text
    for line in convs:
        m = re.search(r"lhs_dilate = \[([\d, ]+)\]", line)
        assert m is None or set(m.group(1).replace(" ", "").split(",")) == {"1"}, line
        m = re.search(r"feature_group_count = (\d+)", line)
        assert m is None or m.group(1) == "1", line
        m = re.search(r"batch_group_count = (\d+)", line)
        assert m is None or m.group(1) == "1", line


def test_dense_gradients_need_no_transposes():
    """Every product in a dense layer's first and second-order gradients comes out in the layout
    it is used in (flax's kernel gradient is a product followed by a transpose, which XLA's CPU
    backend may fuse into the optimizer's passes as a slow column-wise read)."""
    ref, new, params, x = _setup("dense", (12,), dict(features=5), batch=2)
    P, X = _stack([params, params]), jnp.stack([x, x])
    for fn, args in [(_second_order, (params, x)), (lambda m: jax.vmap(_second_order(m)), (P, X))]:
        assert "stablehlo.transpose" in jax.jit(fn(ref)).lower(*args).as_text()
        assert "stablehlo.transpose" not in jax.jit(fn(new)).lower(*args).as_text()


# (input shape [B, *U, ci], co, kernel, strides, padding): one channel on either side
NARROW_GEOMETRIES = [
    ((3, 28, 28, 1), 5, (4, 4), (2, 2), ((1, 2), (1, 2))),  # the discriminator's first conv
    ((3, 28, 28, 6), 1, (4, 4), (1, 1), ((1, 2), (1, 2))),  # the generator's last conv
    ((2, 9, 11, 1), 3, (3, 2), (2, 3), ((0, 1), (2, 1))),
    ((2, 9, 11, 4), 1, (5, 3), (3, 2), ((2, 0), (1, 1))),
    ((2, 12, 1), 4, (3,), (2,), ((1, 1),)),
]


@pytest.mark.parametrize("geometry", NARROW_GEOMETRIES, ids=lambda g: f"{g[0]}->{g[1]}")
def test_narrow_slots_equal_xla(geometry):
    """The per-tap matmul forms of the three slots equal XLA's convolution and its transposes."""
    shape, co, ks, strides, padding = geometry
    with jax.enable_x64(True):
        k = jax.random.split(jax.random.key(0), 3)
        u = jax.random.normal(k[0], shape, jnp.float64)
        w = jax.random.normal(k[1], (*ks, shape[-1], co), jnp.float64)
        kw = dict(strides=strides, padding=padding, precision=None)
        v_ref = layers._conv_impl(u, w, **kw)
        v = jax.random.normal(k[2], v_ref.shape, jnp.float64)
        u_ref = layers._convt_impl_xla(v, w, **kw, u_spatial=shape[1:-1])
        w_ref = layers._kgrad_impl_xla(u, v, **kw, k_spatial=ks)
        if co == 1:
            assert_close(v_ref, layers._narrow_conv(u, w, **kw), 1e-13, "conv")
        else:
            u_new = layers._narrow_convt(v, w, **kw, u_spatial=shape[1:-1])
            assert_close(u_ref, u_new, 1e-13, "transposed conv")
        assert_close(w_ref, layers._narrow_kgrad(u, v, **kw, k_spatial=ks), 1e-13, "kernel grad")


def test_single_channel_layers_run_as_matmuls():
    """The generator's last conv (one output channel): its value and kernel gradient lower to
    products, not convolutions; the discriminator's first (one input channel): its input and
    kernel gradients do."""
    x = jax.random.normal(jax.random.key(0), (2, 28, 28, 6))
    w = jax.random.normal(jax.random.key(1), (4, 4, 6, 1))
    f = jax.grad(lambda w: jnp.sum(jnp.sin(layers.conv(x, w))))
    assert not _conv_ops(jax.jit(f).lower(w).as_text())
    img = jax.random.normal(jax.random.key(2), (2, 28, 28, 1))
    w = jax.random.normal(jax.random.key(3), (4, 4, 1, 5))
    g = jax.grad(lambda x, w: jnp.sum(jnp.sin(layers.conv(x, w, strides=2))), argnums=(0, 1))
    text = jax.jit(lambda x, w: g(x, w)).lower(img, w).as_text()
    assert len(_conv_ops(text)) == 1  # the forward convolution only
