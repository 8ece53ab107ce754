"""Convolutions as patches and one matrix product: the replica axis becomes a batch dimension.

Under ``jax.vmap`` over stacked parameters, ``flax.linen.Conv`` becomes a grouped convolution
(``feature_group_count = N``), which accelerators run far below their matrix rate. Here a strided
convolution is written as its taps gathered with strided slices (``patches``, im2col) followed by
one ``dot_general`` over taps and input channels; ``vmap`` turns that product into a batched
matrix product with the N replicas as its batch dimension, and so do its derivatives of every
order (WGAN-GP's double backward included): the transposes of a product are products, the
transpose of gathering taps is adding them back (col2im), both of which batch trivially.

``Conv`` and ``ConvTranspose`` are parameter-compatible with Flax's (kernel ``[*k, cin, cout]``,
``bias``; same initialisers, same outputs for the same parameters). A transposed convolution is
the transpose, in its input, of the strided convolution with the kernel flipped and its channel
axes swapped, so it is one product followed by col2im, with no multiplications by the zeros of a
dilated input.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen.dtypes import promote_dtype
from flax.typing import Array, Dtype, Initializer, PrecisionLike
from jax import lax

__all__ = ["Conv", "ConvTranspose", "conv", "conv_transpose", "patches"]

Pads = tuple[tuple[int, int], ...]


def as_tuple(x: int | Sequence[int] | None, n: int) -> tuple[int, ...]:
    """A per-dimension setting (strides, dilation) as ``n`` integers; None is all ones."""
    if x is None:
        return (1,) * n
    return (x,) * n if isinstance(x, int) else tuple(x)


def out_spatial(u_spatial, k_spatial, strides, pads) -> tuple[int, ...]:
    """The output size of a strided convolution with explicit ``pads``."""
    return tuple(
        (n + lo + hi - k) // s + 1 for n, k, s, (lo, hi) in zip(u_spatial, k_spatial, strides, pads)
    )


def patches(x: Array, k_spatial: Sequence[int], strides: Sequence[int], pads: Pads) -> Array:
    """``x [B, *U, c] -> [B, *V, K * c]``: entry ``(o, t, c)`` is ``x[s*o + t - lo, c]`` (zero
    outside ``x``), taps ``t`` in the row-major order of a kernel ``[*k, c, ...]``."""
    b, c = x.shape[0], x.shape[-1]
    v_spatial = out_spatial(x.shape[1:-1], k_spatial, strides, pads)
    # Pad so that tap t of output o reads padded index s*o + t; a negative high pad crops.
    cfg = [(0, 0, 0)]
    for n, m, k, s, (lo, _) in zip(x.shape[1:-1], v_spatial, k_spatial, strides, pads):
        cfg.append((lo, s * (m - 1) + k - n - lo, 0))
    xp = lax.pad(x, jnp.zeros((), x.dtype), [*cfg, (0, 0, 0)])
    cols = []
    for t in itertools.product(*map(range, k_spatial)):
        limit = [tt + s * (m - 1) + 1 for tt, s, m in zip(t, strides, v_spatial)]
        cols.append(lax.slice(xp, (0, *t, 0), (b, *limit, c), (1, *strides, 1)))
    return jnp.stack(cols, axis=-2).reshape((b, *v_spatial, len(cols) * c))


def _product(p: Array, w: Array, precision: PrecisionLike) -> Array:
    """``p [..., K*ci] @ w [*k, ci, co] -> [..., co]``."""
    w2 = w.reshape(-1, w.shape[-1])
    return lax.dot_general(p, w2, (((p.ndim - 1,), (0,)), ((), ())), precision=precision)


def conv(
    x: Array, kernel: Array, strides: Sequence[int], pads: Pads, precision: PrecisionLike = None
) -> Array:
    """``lax.conv_general_dilated(x, kernel, strides, pads)``, channels last."""
    return _product(patches(x, kernel.shape[:-2], strides, pads), kernel, precision)


def conv_transpose(
    x: Array,
    kernel: Array,
    strides: Sequence[int],
    padding: str | Pads,
    precision: PrecisionLike = None,
) -> Array:
    """``lax.conv_transpose(x, kernel, strides, padding)`` (``transpose_kernel=False``).

    That is the transpose in ``u`` of ``conv(u, w, strides, pads)`` with ``w`` the kernel
    flipped with its channel axes swapped: one product onto every tap of ``u``, then col2im.
    """
    nsp = x.ndim - 2
    k_spatial = kernel.shape[:nsp]
    u_spatial, pads = transpose_geometry(x.shape[1:-1], k_spatial, strides, padding)
    w = jnp.swapaxes(jnp.flip(kernel, axis=tuple(range(nsp))), -1, -2)  # [*k, cout, cin]
    k, cout, cin = math.prod(k_spatial), w.shape[-2], w.shape[-1]
    # y[b, o, t, c] = sum_j x[b, o, j] w[t, c, j]
    y = lax.dot_general(
        x, w.reshape(k * cout, cin), (((x.ndim - 1,), (1,)), ((), ())), precision=precision
    )
    u_aval = jax.ShapeDtypeStruct((x.shape[0], *u_spatial, cout), y.dtype)
    col2im = jax.linear_transpose(
        partial(patches, k_spatial=k_spatial, strides=tuple(strides), pads=tuple(pads)), u_aval
    )
    return col2im(y.reshape(*y.shape[:-1], k * cout))[0]


def transpose_geometry(
    x_spatial: Sequence[int], k_spatial: Sequence[int], strides: Sequence[int], padding: str | Pads
) -> tuple[tuple[int, ...], Pads]:
    """``lax.conv_transpose``'s output size ``u_spatial`` and the ``pads`` of the strided
    convolution ``u -> x`` whose transpose it is."""
    if isinstance(padding, str):
        tpads = [_transpose_padding(k, s, padding) for k, s in zip(k_spatial, strides)]
    else:
        tpads = [tuple(p) for p in padding]
    u_spatial, pads = [], []
    for n, k, s, (a, b) in zip(x_spatial, k_spatial, strides, tpads):
        un = s * (n - 1) + 1 + a + b - k + 1  # lax.conv_transpose's output size
        if un <= 0:
            raise ValueError(f"empty output: input {tuple(x_spatial)}, kernel {tuple(k_spatial)}")
        lo = k - 1 - a
        u_spatial.append(un)
        pads.append((lo, s * (n - 1) + k - un - lo))
    return tuple(u_spatial), tuple(pads)


def _transpose_padding(k: int, s: int, padding: str) -> tuple[int, int]:
    """Padding of the dilated input, as ``lax.conv_transpose`` computes it."""
    if padding == "SAME":
        pad_len = k + s - 2
        pad_a = k - 1 if s > k - 1 else math.ceil(pad_len / 2)
    elif padding == "VALID":
        pad_len = k + s - 2 + max(k - s, 0)
        pad_a = k - 1
    else:
        raise ValueError(f"padding must be SAME, VALID or pairs; got {padding!r}")
    return pad_a, pad_len - pad_a


def flatten_batch(x: Array, nsp: int) -> tuple[Array, tuple[int, ...] | None]:
    """As Flax: merge all leading batch dims into one (adding one if there is none)."""
    nbatch = x.ndim - (nsp + 1)
    if nbatch == 1:
        return x, None
    return x.reshape((-1, *x.shape[nbatch:])), x.shape[:nbatch]


class _Linear(nn.Module):
    """The fields the two convolutions share with Flax's (no dilation, groups or mask)."""

    features: int
    kernel_size: int | Sequence[int]
    strides: int | Sequence[int] | None = 1
    padding: str | Sequence[tuple[int, int]] = "SAME"
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros_init()

    def _apply(self, inputs: Array, op) -> Array:
        """``op(x, kernel, strides)`` on the inputs' flattened batch, plus the bias."""
        ks = self.kernel_size
        k_spatial = (ks,) if isinstance(ks, int) else tuple(ks)
        x, batch_shape = flatten_batch(inputs, len(k_spatial))
        shape = (*k_spatial, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        bias = None
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = op(x, kernel, as_tuple(self.strides, len(k_spatial)))
        if bias is not None:
            y = y + bias
        return y if batch_shape is None else y.reshape((*batch_shape, *y.shape[1:]))


class Conv(_Linear):
    """``flax.linen.Conv`` (padding 'SAME', 'VALID' or pairs) as patches and one product."""

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        def op(x, kernel, strides):
            pads = self.padding
            if isinstance(pads, str):
                pads = lax.padtype_to_pads(x.shape[1:-1], kernel.shape[:-2], strides, pads)
            pads = tuple((int(lo), int(hi)) for lo, hi in pads)
            return conv(x, kernel, strides, pads, self.precision)

        return self._apply(inputs, op)


class ConvTranspose(_Linear):
    """``flax.linen.ConvTranspose`` (``transpose_kernel=False``) as one product and col2im."""

    strides: Sequence[int] | None = None

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        def op(x, kernel, strides):
            return conv_transpose(x, kernel, strides, self.padding, self.precision)

        return self._apply(inputs, op)
