"""Microbenchmark: flax.linen convolutions vs ggans.layers (XLA CPU), single replica and vmapped.

Times (ms, best of --repeats after warm-up) of jitted
  * per layer, fwd+bwd: gradient of sum(y * ct) wrt params and input, for the conv layers of the
    TF MNIST GAN at batch 32;
  * per non-conv layer (Dense, BatchNorm, LayerNorm), fwd+bwd, to see whether they matter;
  * whole models: D WGAN-GP gradient (double backward), G-step gradient through D, and a full
    WGAN-GP step (D and G gradients, no optimiser);
for a single replica and vmapped over N stacked replicas (``--n``).

  PYTHONPATH=src python benchmarks/layer_bench.py [--n 10] [--repeats 5] [--only layers|models]
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from ggans.cpu import layers as fast

B, ZDIM = 32, 128


def timeit(fn, *args, repeats=5, min_time=0.3):
    out = fn(*args)
    jax.block_until_ready(out)
    best = float("inf")
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while True:
            jax.block_until_ready(fn(*args))
            n += 1
            dt = time.perf_counter() - t0
            if dt >= min_time:
                break
        best = min(best, dt / n)
    return best * 1e3


def mods(impl):
    return (nn.Conv, nn.ConvTranspose) if impl == "flax" else (fast.Conv, fast.ConvTranspose)


# --------------------------------------------------------------------------- layers
def layer_cases():
    # name, kind, in shape (no batch), kwargs
    return [
        ("D conv1 1->64 s2", "conv", (28, 28, 1), dict(features=64, strides=(2, 2))),
        ("D conv2 64->128 s2", "conv", (14, 14, 64), dict(features=128, strides=(2, 2))),
        ("G convT1 128->64 s2", "convT", (7, 7, 128), dict(features=64, strides=(2, 2))),
        ("G convT2 64->32 s2", "convT", (14, 14, 64), dict(features=32, strides=(2, 2))),
        ("G conv 32->1 s1", "conv", (28, 28, 32), dict(features=1, strides=(1, 1))),
    ]


def bench_layers(n, repeats):
    print(f"\n## per-layer fwd+bwd (grad wrt params and input), batch {B}, ms")
    print(f"| layer | flax x1 | fast x1 | flax vmap N={n} | fast vmap N={n} |")
    print("|---|---|---|---|---|")
    key = jax.random.key(0)
    for name, kind, shp, kw in layer_cases():
        row = []
        for nv in (1, n):
            for impl in ("flax", "fast"):
                conv_cls, convt_cls = mods(impl)
                cls = conv_cls if kind == "conv" else convt_cls
                m = cls(kernel_size=(4, 4), padding="SAME", use_bias=kind == "conv", **kw)
                x = jax.random.normal(key, (B, *shp))
                p = m.init(key, x)
                y = m.apply(p, x)
                ct = jax.random.normal(key, y.shape)

                def f(p, x, ct, m=m):
                    return jax.grad(lambda p, x: jnp.sum(m.apply(p, x) * ct), argnums=(0, 1))(p, x)

                row.append(_time_grad(f, p, x, ct, nv, repeats))
        print(f"| {name} | " + " | ".join(f"{t:.2f}" for t in row) + " |")


def _time_grad(f, p, x, ct, nv, repeats):
    """ms of the jitted gradient ``f(p, x, ct)``, vmapped over ``nv`` stacked copies if > 1."""
    if nv > 1:
        p = jax.tree.map(lambda a: jnp.stack([a] * nv), p)
        x, ct = jnp.stack([x] * nv), jnp.stack([ct] * nv)
        f = jax.vmap(f)
    return timeit(jax.jit(f), p, x, ct, repeats=repeats)


def bench_other_layers(n, repeats):
    print(f"\n## other layers fwd+bwd, batch {B}, ms")
    print(f"| layer | x1 | vmap N={n} |")
    print("|---|---|---|")
    key = jax.random.key(0)
    cases = [
        ("Dense 128->1024", nn.Dense(1024, use_bias=False), (ZDIM,), False),
        ("Dense 1024->6272", nn.Dense(6272, use_bias=False), (1024,), False),
        ("Dense 6272->1024 (D)", nn.Dense(1024), (6272,), False),
        ("BatchNorm 6272", nn.BatchNorm(use_running_average=False, use_scale=False), (6272,), True),
        (
            "BatchNorm 14x14x64",
            nn.BatchNorm(use_running_average=False, use_scale=False),
            (14, 14, 64),
            True,
        ),
        (
            "BatchNorm 28x28x32",
            nn.BatchNorm(use_running_average=False, use_scale=False),
            (28, 28, 32),
            True,
        ),
        ("LayerNorm 1024", nn.LayerNorm(), (1024,), False),
    ]
    for name, m, shp, bn in cases:
        row = []
        for nv in (1, n):
            x = jax.random.normal(key, (B, *shp))
            p = m.init(key, x)
            ct = jax.random.normal(key, jax.eval_shape(m.init_with_output, key, x)[0].shape)

            def f(p, x, ct, m=m, bn=bn):
                def loss(p, x):  # linear in y: measures the layer, not the loss
                    if bn:
                        y, _ = m.apply(p, x, mutable=["batch_stats"])
                    else:
                        y = m.apply(p, x)
                    return jnp.sum(y * ct)

                return jax.grad(loss, argnums=(0, 1))(p, x)

            row.append(_time_grad(f, p, x, ct, nv, repeats))
        print(f"| {name} | " + " | ".join(f"{t:.2f}" for t in row) + " |")


# --------------------------------------------------------------------------- models
class Generator(nn.Module):
    impl: str = "flax"

    @nn.compact
    def __call__(self, z, train=True):
        conv, convt = mods(self.impl)
        bn = lambda: nn.BatchNorm(  # noqa: E731
            use_running_average=not train, momentum=0.999, epsilon=1e-3, use_scale=False
        )
        x = nn.relu(bn()(nn.Dense(1024, use_bias=False)(z)))
        x = nn.relu(bn()(nn.Dense(7 * 7 * 128, use_bias=False)(x)))
        x = x.reshape(x.shape[0], 7, 7, 128)
        x = nn.relu(bn()(convt(64, (4, 4), strides=(2, 2), padding="SAME", use_bias=False)(x)))
        x = nn.relu(bn()(convt(32, (4, 4), strides=(2, 2), padding="SAME", use_bias=False)(x)))
        return jnp.tanh(conv(1, (4, 4), strides=(1, 1), padding="SAME")(x))


class Discriminator(nn.Module):
    impl: str = "flax"

    @nn.compact
    def __call__(self, x):
        conv, _ = mods(self.impl)
        lrelu = lambda v: nn.leaky_relu(v, 0.01)  # noqa: E731
        x = lrelu(conv(64, (4, 4), strides=(2, 2), padding="SAME")(x))
        x = lrelu(conv(128, (4, 4), strides=(2, 2), padding="SAME")(x))
        x = x.reshape(x.shape[0], -1)
        x = lrelu(nn.LayerNorm()(nn.Dense(1024)(x)))
        return nn.Dense(1)(x)


def wgangp_d_loss(d, dp, real, fake, eps):
    logits_real = d.apply(dp, real)
    logits_fake = d.apply(dp, fake)
    x_hat = eps * real + (1 - eps) * fake
    gx = jax.grad(lambda x: jnp.sum(d.apply(dp, x)))(x_hat)
    slopes = jnp.sqrt(jnp.sum(gx**2, axis=(1, 2, 3)) + 1e-10)
    gp = jnp.mean((slopes - 1.0) ** 2)
    return jnp.mean(logits_fake) - jnp.mean(logits_real) + gp


SCAN_STEPS = 3


def bench_models(n, repeats, fns_filter=None):
    print(f"\n## whole models, batch {B}, ms (compile s in brackets for the steps)")
    print(f"| function | flax x1 | fast x1 | flax vmap N={n} | fast vmap N={n} |")
    print("|---|---|---|---|---|")
    key = jax.random.key(0)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    results = {}
    for nv in (1, n):
        for impl in ("flax", "fast"):
            g, d = Generator(impl), Discriminator(impl)
            z = jax.random.normal(k1, (B, ZDIM))
            real = jax.random.uniform(k2, (B, 28, 28, 1), minval=-1, maxval=1)
            eps = jax.random.uniform(k3, (B, 1, 1, 1))
            gv = g.init(k4, z)
            dp = d.init(k4, real)

            def d_fwd(dp, real, d=d):
                return d.apply(dp, real)

            def g_fwd(gv, z, g=g):
                return g.apply(gv, z, mutable=["batch_stats"])[0]

            def g_fwd_bwd(gv, z, g=g):
                def loss(gp_):
                    y, _ = g.apply({**gv, "params": gp_}, z, mutable=["batch_stats"])
                    return jnp.sum(jnp.sin(y))

                return jax.grad(loss)(gv["params"])

            def d_gp_grad(dp, real, fake, eps, d=d):
                return jax.grad(lambda dp: wgangp_d_loss(d, dp, real, fake, eps))(dp)

            def g_step_grad(gv, dp, z, g=g, d=d):
                def loss(gp_):
                    y, _ = g.apply({**gv, "params": gp_}, z, mutable=["batch_stats"])
                    return -jnp.mean(d.apply(dp, y))

                return jax.grad(loss)(gv["params"])

            def full_step(
                gv, dp, z, real, eps, g_fwd=g_fwd, d_gp_grad=d_gp_grad, g_step_grad=g_step_grad
            ):
                fake = jax.lax.stop_gradient(g_fwd(gv, z))
                return d_gp_grad(dp, real, fake, eps), g_step_grad(gv, dp, z)

            def scan_steps(gv, dp, z, real, eps, full_step=full_step):
                """SCAN_STEPS plain-SGD WGAN-GP steps in a lax.scan (as a training round)."""

                def body(carry, i):
                    gv, dp = carry
                    gd, gg = full_step(gv, dp, z + 0.01 * i, real, eps)
                    dp = jax.tree.map(lambda p, q: p - 1e-4 * q, dp, gd)
                    gv = {**gv, "params": jax.tree.map(lambda p, q: p - 1e-3 * q, gv["params"], gg)}
                    return (gv, dp), None

                return jax.lax.scan(body, (gv, dp), jnp.arange(SCAN_STEPS, dtype=z.dtype))[0]

            fake = g_fwd(gv, z)
            fns = [
                ("D fwd", d_fwd, (dp, real)),
                ("G fwd (train BN)", g_fwd, (gv, z)),
                ("G fwd+bwd (alone)", g_fwd_bwd, (gv, z)),
                ("D WGAN-GP grad", d_gp_grad, (dp, real, fake, eps)),
                ("G-step grad (through D)", g_step_grad, (gv, dp, z)),
                ("WGAN-GP step grads (D+G)", full_step, (gv, dp, z, real, eps)),
                (
                    f"per step of {SCAN_STEPS} SGD steps in lax.scan",
                    scan_steps,
                    (gv, dp, z, real, eps),
                ),
            ]
            for name, f, args in fns:
                if fns_filter and not any(w in name for w in fns_filter):
                    continue
                if nv > 1:
                    args = jax.tree.map(lambda a, nv=nv: jnp.stack([a] * nv), args)
                    f = jax.vmap(f)
                t0 = time.perf_counter()
                fj = jax.jit(f).lower(*args).compile()
                tc = time.perf_counter() - t0
                t = timeit(fj, *args, repeats=repeats)
                if "scan" in name:
                    t /= SCAN_STEPS
                cell = f"{t:.1f}" + (f" [{tc:.0f}s]" if "step" in name else "")
                results.setdefault(name, []).append(cell)
                print(f"  {name} impl={impl} n={nv}: {cell}", flush=True)
    for name, row in results.items():
        print(f"| {name} | " + " | ".join(row) + " |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", choices=["layers", "other", "models"], default=None)
    ap.add_argument("--fns", nargs="*", help="model functions to run (substrings of names)")
    a = ap.parse_args()
    print(jax.devices(), jax.__version__)
    if a.only in (None, "layers"):
        bench_layers(a.n, a.repeats)
    if a.only in (None, "other"):
        bench_other_layers(a.n, a.repeats)
    if a.only in (None, "models"):
        bench_models(a.n, a.repeats, a.fns)


if __name__ == "__main__":
    main()
