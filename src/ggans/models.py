"""GAN architectures by name (``model.arch``), and the TF MNIST GAN (reference-notes section 1)
in Flax.

An :class:`Architecture` builds the generator and the discriminator of a
:class:`~ggans.gan.GanSpec`, says which of their parameters take weight decay, and which
variable collections besides ``params`` each keeps (the generator's batch statistics here; a
discriminator with spectral norm or batch norm would name its own). Register one with
``@register("name")`` on a function returning it.

``paper`` is the published model; ``small`` keeps its shapes at a quarter of its width (the
quick scale's) and ``tiny`` narrower still (tests, ``experiment=quick``). The layers come
from the layer set named by ``impl`` (:mod:`ggans.impls`): each computes the same function
with the same parameters. ``precision`` sets how the layers' matrix products run
(:data:`PRECISIONS`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ggans import impls

# TF1 layer defaults: Glorot-uniform weights, zero biases.
_init = nn.initializers.glorot_uniform()


@dataclass(frozen=True)
class Arch:
    """Layer widths of one GAN: generator dense, 7x7 base channels and conv widths; D widths."""

    g_dense: int = 1024
    g_base: int = 128
    g_convs: tuple[int, int] = (64, 32)
    d_convs: tuple[int, int] = (64, 128)
    d_dense: int = 1024


def kernels_except(layer: str) -> Callable[[tuple[str, ...]], bool]:
    """Weight decay on every ``kernel`` except those of the layer named ``layer`` (TF's
    l2_regularizer on all layers but the output one, as in the reference)."""
    return lambda path: path[-1] == "kernel" and layer not in path


@dataclass(frozen=True)
class Architecture:
    """A GAN's two networks, built from a GanSpec, and what the GAN step needs to know of them.

    ``generator(spec)`` is a module called as ``(z, train=...)`` returning images [B, H, W, C]
    in [-1, 1]; ``discriminator(spec)`` one called as ``(images)`` returning logits [B].
    ``g_decays`` / ``d_decays`` say, from a parameter's path of names, whether it takes weight
    decay; ``g_collections`` / ``d_collections`` name the variable collections each keeps and
    updates in training besides ``params`` (mixed with the parameters by every protocol).
    """

    generator: Callable[[Any], nn.Module]
    discriminator: Callable[[Any], nn.Module]
    g_decays: Callable[[tuple[str, ...]], bool] = kernels_except("out")
    d_decays: Callable[[tuple[str, ...]], bool] = kernels_except("logit")
    g_collections: tuple[str, ...] = ("batch_stats",)
    d_collections: tuple[str, ...] = ()


ARCHITECTURES: dict[str, Architecture] = {}


def register(name: str):
    """Register ``fn() -> Architecture`` as ``model.arch=name``."""

    def add(fn: Callable[[], Architecture]):
        ARCHITECTURES[name] = fn()
        return fn

    return add


def get(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise ValueError(f"model.arch={name!r}: must be one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def tf_mnist_gan(widths: Arch) -> Architecture:
    """The reference's generator and discriminator with these layer widths."""
    return Architecture(
        generator=lambda s: Generator(widths, s.bn_momentum, s.impl, s.precision, s.image_shape),
        discriminator=lambda s: Discriminator(widths, s.impl, s.precision),
    )


@register("paper")
def paper() -> Architecture:
    return tf_mnist_gan(Arch())


@register("tiny")
def tiny() -> Architecture:
    return tf_mnist_gan(Arch(g_dense=64, g_base=16, g_convs=(16, 8), d_convs=(8, 16), d_dense=64))


@register("small")
def small() -> Architecture:
    return tf_mnist_gan(
        Arch(g_dense=256, g_base=32, g_convs=(32, 16), d_convs=(16, 32), d_dense=256)
    )


#: How the layers' products run: ``default`` is JAX's own (exact float32 on a CPU; TF32 on
#: recent NVIDIA GPUs), ``highest`` exact float32 everywhere, ``bf16`` bfloat16 operands and
#: outputs of the products, with float32 parameters and every other operation.
PRECISIONS = ("default", "highest", "bf16")


def _layers(impl: str, precision: str):
    """Dense, Conv and ConvTranspose of layer set ``impl`` at ``precision``: each a function of
    the layer's arguments returning float32 outputs."""
    if precision not in PRECISIONS:
        raise ValueError(f"model.precision={precision!r}: must be one of {', '.join(PRECISIONS)}")
    kinds = impls.get(impl)
    extra = {
        "default": {},
        "highest": {"precision": lax.Precision.HIGHEST},
        "bf16": {"dtype": jnp.bfloat16},
    }[precision]

    def wrap(layer):
        def make(*args, **kwargs):
            module = layer(*args, **kwargs, **extra)
            if precision != "bf16":
                return module
            return lambda x: module(x).astype(jnp.float32)

        return make

    return wrap(kinds.dense), wrap(kinds.conv), wrap(kinds.conv_transpose)


class Generator(nn.Module):
    """z [B, noise] -> images [B, H, W, C] in [-1, 1] (MNIST: 28, 28, 1), from an H/4 x W/4
    base upsampled twice.

    Batch norm as TF1's defaults in the reference: decay 0.999, epsilon 1e-3, no scale.
    """

    arch: Arch = Arch()
    bn_momentum: float = 0.999
    impl: str = "auto"
    precision: str = "default"
    image_shape: tuple[int, int, int] = (28, 28, 1)

    @nn.compact
    def __call__(self, z: jax.Array, train: bool = True) -> jax.Array:
        dense, conv, conv_t = _layers(self.impl, self.precision)

        def bn(x):
            return nn.BatchNorm(
                use_running_average=not train,
                momentum=self.bn_momentum,
                epsilon=1e-3,
                use_scale=False,
            )(x)

        a = self.arch
        h, w, channels = self.image_shape
        base = (h // 2 ** len(a.g_convs), w // 2 ** len(a.g_convs))
        x = nn.relu(bn(dense(a.g_dense, use_bias=False, kernel_init=_init)(z)))
        x = nn.relu(bn(dense(base[0] * base[1] * a.g_base, use_bias=False, kernel_init=_init)(x)))
        x = x.reshape(x.shape[:-1] + (*base, a.g_base))
        for width in a.g_convs:
            x = conv_t(
                width, (4, 4), strides=(2, 2), padding="SAME", use_bias=False, kernel_init=_init
            )(x)
            x = nn.relu(bn(x))
        x = conv(channels, (4, 4), strides=(1, 1), padding="SAME", kernel_init=_init, name="out")(x)
        return jnp.tanh(x)


class Discriminator(nn.Module):
    """images [B, H, W, C] -> logits [B] (a critic value under WGAN-GP)."""

    arch: Arch = Arch()
    impl: str = "auto"
    precision: str = "default"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense, conv, _ = _layers(self.impl, self.precision)
        a = self.arch
        for width in a.d_convs:
            x = conv(width, (4, 4), strides=(2, 2), padding="SAME", kernel_init=_init)(x)
            x = nn.leaky_relu(x, 0.01)
        x = x.reshape(x.shape[:-3] + (-1,))
        x = nn.leaky_relu(nn.LayerNorm()(dense(a.d_dense, kernel_init=_init)(x)), 0.01)
        return dense(1, kernel_init=_init, name="logit")(x)[..., 0]


def l2_penalty(params, decays: Callable[[tuple[str, ...]], bool]) -> jax.Array:
    """TF's l2_regularizer: sum(w**2) / 2 over the parameters whose path ``decays``."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    total = jnp.zeros((), jnp.float32)
    for path, leaf in leaves:
        if decays(tuple(str(getattr(p, "key", "")) for p in path)):
            total = total + 0.5 * jnp.sum(jnp.square(leaf))
    return total
