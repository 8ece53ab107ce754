"""Compressed messages: what a machine sends is top-k sparsified or quantised to b bits.

A receiver mixes what arrived in place of the sender's model, keeping its own model exact:
``new_i = w_ii x_i + sum_{j != i} w_ij (M_j * m_j + (1 - M_j) * x_i)``, where ``m_j`` is
the message of sender j and ``M_j`` the coordinates it carries (all of them for
quantisation). So a receiver fills the coordinates a sparse message leaves out with its own
values, and at full precision (``topk`` with ``fraction=1``) this is the plain exchange.

- ``topk``: per leaf, the ``ceil(fraction * size)`` coordinates that moved most since the
  round began (its model right after the previous exchange), values and int32 indices;
- ``quantize``: per leaf, stochastic rounding onto ``2^bits`` levels between the leaf's min
  and max (unbiased: E[m] = x), the two bounds sent as float32.

With ``error_feedback`` each machine keeps what its messages left out (the unsent movement
for top-k, the rounding error for quantisation) and adds it to the next round's message, in
``GanState.exchange``. Bytes are counted as sent: values, indices and bounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from ggans.errors import ConfigError

PyTree = Any
NAMES = ("none", "topk", "quantize")


@dataclass(frozen=True)
class CompressionSpec:
    name: str = "none"  # none | topk | quantize
    fraction: float = 0.1  # topk: share of each leaf's values sent, in (0, 1]
    bits: int = 8  # quantize: bits per value, 1..16
    error_feedback: bool = False  # carry what a message left out into the next one

    @property
    def active(self) -> bool:
        return self.name != "none"


def check(spec: CompressionSpec) -> None:
    if spec.name not in NAMES:
        raise ConfigError(f"compression.name={spec.name!r}: must be one of {', '.join(NAMES)}")
    f = spec.fraction
    if isinstance(f, bool) or not isinstance(f, int | float) or not 0 < f <= 1:
        raise ConfigError(f"compression.fraction={f!r}: must be in (0, 1]")
    b = spec.bits
    if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 16:
        raise ConfigError(f"compression.bits={b!r}: must be an integer in 1..16")


def _is_float(x) -> bool:
    return jnp.issubdtype(x.dtype, jnp.floating)


def kept(spec: CompressionSpec, size: int) -> int:
    """Values of a leaf of ``size`` that a top-k message carries."""
    return max(1, math.ceil(spec.fraction * size))


def leaf_bytes(spec: CompressionSpec, size: int, itemsize: int) -> int:
    """Bytes of one machine's message for a leaf of ``size`` values."""
    if spec.name == "topk":
        return kept(spec, size) * (itemsize + 4)  # values and int32 indices
    if spec.name == "quantize":
        return math.ceil(size * spec.bits / 8) + 8  # packed levels, float32 min and max
    return size * itemsize


def message_bytes(spec: CompressionSpec, tree: PyTree) -> int:
    """Bytes of one machine's compressed message of ``tree`` (stacked: the leading axis is
    the machines')."""
    return sum(
        leaf_bytes(spec, math.prod(x.shape[1:]), x.dtype.itemsize)
        for x in jax.tree.leaves(tree)
        if _is_float(x)
    )


def residual_like(tree: PyTree) -> PyTree:
    """Zero error-feedback memory for a stacked tree."""
    return jax.tree.map(lambda x: jnp.zeros_like(x) if _is_float(x) else None, tree)


def compress(
    spec: CompressionSpec, x: jax.Array, start: jax.Array, residual: jax.Array | None, key
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Every machine's message of leaf ``x`` [N, ...]: (values m, carried coordinates M,
    the new residual or None)."""
    n = x.shape[0]
    flat = x.reshape(n, -1)
    e = 0.0 if residual is None else residual.reshape(n, -1)
    if spec.name == "topk":
        moved = flat - start.reshape(n, -1) + e
        _, index = jax.lax.top_k(jnp.abs(moved), kept(spec, flat.shape[1]))
        mask = jnp.zeros(flat.shape, bool).at[jnp.arange(n)[:, None], index].set(True)
        new_e = jnp.where(mask, 0.0, moved)
        m = flat
    else:
        v = flat + e
        lo, hi = v.min(axis=1, keepdims=True), v.max(axis=1, keepdims=True)
        step = (hi - lo) / (2**spec.bits - 1)
        safe = jnp.where(step > 0, step, 1.0)
        u = (v - lo) / safe
        level = jnp.floor(u) + (jax.random.uniform(key, u.shape) < u - jnp.floor(u))
        m = jnp.where(step > 0, lo + level * step, v)
        mask = jnp.ones(flat.shape, bool)
        new_e = v - m
    out_e = new_e.reshape(x.shape).astype(x.dtype) if spec.error_feedback else None
    return m.reshape(x.shape).astype(x.dtype), mask.reshape(x.shape), out_e


def mix_compressed(w: jax.Array, x: jax.Array, m: jax.Array, mask: jax.Array) -> jax.Array:
    """``new_i = w_ii x_i + sum_{j != i} w_ij (M_j m_j + (1 - M_j) x_i)`` for one leaf, with
    the dense mixing matrix ``w`` [N, N]; a row that keeps only its own model keeps it
    exactly, and a zero weight never lets a non-finite message in."""
    own = jnp.diagonal(w)
    off = w - jnp.diag(own)
    shape = (-1,) + (1,) * (x.ndim - 1)
    hi = jax.lax.Precision.HIGHEST
    carried = jnp.where(mask & jnp.isfinite(m), m, 0)
    arrived = jnp.einsum("ij,j...->i...", off, carried, precision=hi)
    missing = jnp.einsum("ij,j...->i...", off, (~mask).astype(x.dtype), precision=hi)
    y = (own.reshape(shape) * x + arrived + missing * x).astype(x.dtype)
    return jnp.where((own == 1.0).reshape(shape), x, y)


def mix_tree(
    spec: CompressionSpec,
    w: jax.Array,
    tree: PyTree,
    start: PyTree,
    residual: PyTree | None,
    key: jax.Array,
) -> tuple[PyTree, PyTree | None]:
    """Mix a stacked tree with compressed messages; returns it and its new residual."""
    leaves, treedef = jax.tree.flatten(tree)
    starts = jax.tree.leaves(start)
    residuals = [None] * len(leaves) if residual is None else treedef.flatten_up_to(residual)
    keys = jax.random.split(key, max(len(leaves), 1))
    out, new_res = [], []
    for x, x0, e, k in zip(leaves, starts, residuals, keys, strict=True):
        if not _is_float(x):
            out.append(x)
            new_res.append(e)
            continue
        m, mask, e2 = compress(spec, x, x0, e, k)
        out.append(mix_compressed(w, x, m, mask))
        new_res.append(e2)
    res = jax.tree.unflatten(treedef, new_res) if spec.error_feedback else None
    return jax.tree.unflatten(treedef, out), res
