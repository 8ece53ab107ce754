"""Layers that stay fast on XLA's CPU backend under ``jax.vmap`` and double backward.

``Conv``, ``ConvTranspose`` and ``Dense`` are drop-in, parameter-compatible replacements for
Flax's (``Dense`` is described at its definition). ``Conv`` and ``ConvTranspose`` replace
``flax.linen.Conv`` and ``flax.linen.ConvTranspose`` (channels last, kernel ``[*k, cin, cout]``,
param names ``kernel`` and ``bias``, same initialisers, same outputs for the same params).

Why. On the CPU backend XLA runs a plain convolution, its input gradient and its kernel gradient
at close to matmul speed, but

* the kernel gradient of a *transposed* (input-dilated) convolution, which is what autodiff
  produces for ``ConvTranspose`` and for the second-order terms of a gradient penalty, is
  30-50x slower;
* under ``jax.vmap`` over stacked params every convolution becomes a grouped convolution
  (``feature_group_count = N``), which it runs at a small fraction of matmul speed.

How. A strided convolution defines a trilinear form ``T(u, v, W) = <conv(u, W), v>`` between a
"high-resolution" activation ``u [B, *U, ci]``, a "low-resolution" one ``v [B, *V, co]`` and a
kernel ``W [*k, ci, co]``. Its three bilinear slots are three primitives defined here:

* ``conv_p(u, W) -> v``     the convolution;
* ``convt_p(v, W) -> u``    its transpose in ``u`` (a transposed convolution);
* ``kgrad_p(u, v) -> W``    its transpose in ``W`` (the kernel gradient).

The set is closed under differentiation: each one's JVP and transposes are members of the set,
so gradients of any order (WGAN-GP's double backward included) only ever run these three, each
lowered to the XLA convolution that is fast for it (the forward conv, and XLA's own first-order
transposes of it). ``ConvTranspose`` is ``convt_p`` with the kernel flipped and its channel axes
swapped. Under ``jax.vmap`` the batching rules never emit a grouped convolution: a batched
activation with shared weights is folded into the batch axis, a shared activation with batched
weights into the channel axis, and when both are batched (stacked replicas) the slot is bound
with ``stacked=True``: on the CPU one oneDNN call over all replicas, split over the threads
(single-channel slots included, all but the transposed convolution onto one channel; the
kernels run the slots oneDNN is slow at as direct loops, and the slots onto one channel that
XLA's forms are slow at go to them stacked or not: see ``_direct_conv`` and its siblings);
otherwise a single-channel slot's XLA forms under ``vmap`` and a wide one's N ordinary
convolutions in a ``lax.map`` (or unrolled; see ``UNROLL_MAX``).

Where one side has a single channel (MNIST's image layers), the slots that ran slowly as
convolutions (the product onto the single channel, and the kernel gradient) are matmuls over
the kernel's taps instead (see ``NARROW_MAX``).

On the CPU, the wide slots lower instead to oneDNN's forward, backward-data and backward-weights
convolutions, as XLA FFI calls (:mod:`ggans.onednn`), when those kernels are available.

The lowerings spell out the layouts XLA's CPU backend runs fast (its YNNPACK convolutions):
XLA only rewrites the kernel-gradient convolution that autodiff emits into such a form at the
top level of a program, not inside a loop body (``lax.scan``/``fori_loop``/``lax.map``), where it
is 30-50x slower; the forms here are fast in both places.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import initializers
from flax.linen.dtypes import promote_dtype
from flax.linen.linear import PaddingLike, PrecisionLike, canonicalize_padding
from flax.linen.module import Module, compact
from flax.typing import Array, Dtype, Initializer
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from ggans.cpu import onednn
from ggans.patches import as_tuple, flatten_batch, out_spatial, transpose_geometry

__all__ = [
    "Conv",
    "ConvTranspose",
    "Dense",
    "conv",
    "conv_transpose",
    "conv_p",
    "convt_p",
    "kgrad_p",
    "matmul",
    "matmul_nt",
    "matmul_tn",
    "UNROLL_MAX",
]

default_kernel_init = initializers.lecun_normal()

#: Under vmap with both operands batched (stacked replicas) and no oneDNN, the N per-replica
#: convolutions of a wide slot are unrolled in the HLO when N <= UNROLL_MAX, else run one after
#: another in a ``lax.map``. The loop measured as fast or faster per layer (N = 10: 0.6-0.9x the
#: time; intermediates are reused, outputs written in place, no oversubscription) and halves
#: compile time.
UNROLL_MAX = 1


# ----------------------------------------------------------------------------- helpers


def _dn(nsp: int) -> lax.ConvDimensionNumbers:
    """Channels-last dimension numbers: lhs/out ``[B, *sp, C]``, rhs ``[*k, I, O]``."""
    io = (0, nsp + 1, *range(1, nsp + 1))
    return lax.ConvDimensionNumbers(io, (nsp + 1, nsp, *range(nsp)), io)


def _conv_impl(u, w, *, strides, padding, precision):
    return lax.conv_general_dilated(
        u, w, strides, padding, dimension_numbers=_dn(u.ndim - 2), precision=precision
    )


def _convt_impl_xla(v, w, *, strides, padding, precision, u_spatial):
    """XLA's own transpose of the convolution (an input-dilated convolution)."""
    u_aval = jax.ShapeDtypeStruct((v.shape[0], *u_spatial, w.shape[-2]), v.dtype)
    f = partial(_conv_impl, w=w, strides=strides, padding=padding, precision=precision)
    return jax.linear_transpose(f, u_aval)(v)[0]


def _convt_impl(v, w, *, strides, padding, precision, u_spatial, conv=None):
    """Transposed convolution as ``prod(strides)`` stride-1 convolutions (``conv``, default
    XLA's), one per output phase, whose results are interleaved.

    Per spatial dim, ``u[i] = sum_{o, t: s*o + t - lo = i} v[o] W[t]^T``. For the output phase
    ``i = s*m + p``, with ``p + lo = s*c + r``: ``u[s*m + p] = sum_j v[m + c - j] W[r + s*j]^T``,
    a stride-1 correlation of (padded) ``v`` with the flipped taps ``r, r+s, ...`` of the kernel.
    """
    nsp = v.ndim - 2
    ksize = w.shape[:nsp]
    batch, cin = v.shape[0], w.shape[-2]
    vsp = v.shape[1:-1]
    nm = [-(-un // s) for un, s in zip(u_spatial, strides)]  # outputs per phase
    conv = conv or _conv_impl

    def phase(ps):
        rs = [(p + lo) % s for p, (lo, _), s in zip(ps, padding, strides)]
        cs = [(p + lo) // s for p, (lo, _), s in zip(ps, padding, strides)]
        taps = [-(-(k - r) // s) for k, r, s in zip(ksize, rs, strides)]
        if min(taps) <= 0:
            return jnp.zeros((batch, *nm, cin), v.dtype)
        sub = w[tuple(slice(r, None, s) for r, s in zip(rs, strides))]  # [*J, ci, co]
        sub = jnp.swapaxes(jnp.flip(sub, axis=tuple(range(nsp))), -1, -2)  # [*J, co, ci]
        pads = [(j - 1 - c, m + c - n) for j, c, m, n in zip(taps, cs, nm, vsp)]
        return conv(v, sub, strides=(1,) * nsp, padding=pads, precision=precision)

    def build(d, ps):
        if d == nsp:
            return phase(ps)
        return jnp.stack([build(d + 1, (*ps, p)) for p in range(strides[d])], axis=d + 2)

    full = build(0, ())  # [B, M0, s0, M1, s1, ..., ci]
    full = full.reshape((batch, *[m * s for m, s in zip(nm, strides)], cin))
    if full.shape[1:-1] != tuple(u_spatial):
        full = lax.slice(full, (0,) * full.ndim, (batch, *u_spatial, cin))
    return full


def _kgrad_impl_xla(u, v, *, strides, padding, precision, k_spatial):
    """XLA's own transpose of the convolution in the kernel."""
    w_aval = jax.ShapeDtypeStruct((*k_spatial, u.shape[-1], v.shape[-1]), u.dtype)
    f = partial(_conv_impl, u, strides=strides, padding=padding, precision=precision)
    return jax.linear_transpose(f, w_aval)(v)[0]


def _kgrad_impl(u, v, *, strides, padding, precision, k_spatial):
    """Kernel gradient ``W[t] = sum_{b, o} u[b, s*o + t - lo]^T v[b, o]`` as one convolution
    with the example axis as the contracted feature axis and ``ci`` as its batch axis, laid out
    explicitly channels-last (XLA's CPU backend runs this form fast also inside loops, where it
    does not rewrite the form that autodiff emits)."""
    nsp = u.ndim - 2
    perm_u = (nsp + 1, *range(1, nsp + 1), 0)  # [ci, *U, B]
    perm_v = (*range(1, nsp + 1), 0, nsp + 1)  # [*V, B, co]
    pads = []
    for n, m, k, s, (lo, _) in zip(u.shape[1:-1], v.shape[1:-1], k_spatial, strides, padding):
        pads.append((lo, k + s * (m - 1) - n - lo))
    o = lax.conv_general_dilated(
        jnp.transpose(u, perm_u),
        jnp.transpose(v, perm_v),
        (1,) * nsp,
        pads,
        rhs_dilation=strides,
        dimension_numbers=_dn(nsp),
        precision=precision,
    )  # [ci, *k, co]
    return jnp.moveaxis(o, 0, -2)


# A layer with a single channel on one side (MNIST's image layers: the discriminator's first
# convolution and the generator's last) runs two of its slots slowly as convolutions: the
# product onto the single channel and the kernel gradient (8-40 GFLOP/s in place). These run
# as products over the ``K = prod(k)`` taps instead: the narrow side's taps are gathered (or
# scattered) with strided slices, and the contraction over the wide side's channels is one
# matmul (alone, 2-4x faster). The product from the single channel stays a convolution.
def _tap_bounds(t, strides, v_spatial):
    return [tt + s * (m - 1) + 1 for tt, s, m in zip(t, strides, v_spatial)]


def _tap_pads(u_spatial, v_spatial, k_spatial, strides, padding):
    """Pads of ``u`` such that tap ``t`` of output ``o`` reads padded index ``s*o + t`` (a
    negative high pad crops)."""
    return [
        (lo, s * (m - 1) + k - n - lo, 0)
        for n, m, k, s, (lo, _) in zip(u_spatial, v_spatial, k_spatial, strides, padding)
    ]


def _patches(x, v_spatial, k_spatial, strides, padding):
    """``x [B, *U, c] -> [B, *V, K, c]``, tap ``t`` of output ``o`` being ``x[b, s*o + t - lo]``
    (zero outside ``x``)."""
    b, c = x.shape[0], x.shape[-1]
    pads = _tap_pads(x.shape[1:-1], v_spatial, k_spatial, strides, padding)
    xp = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), *pads, (0, 0, 0)])
    taps = itertools.product(*map(range, k_spatial))
    cols = [
        lax.slice(xp, (0, *t, 0), (b, *_tap_bounds(t, strides, v_spatial), c), (1, *strides, 1))
        for t in taps
    ]
    return jnp.stack(cols, axis=-2)


def _tap_sum(z, v_spatial, k_spatial, strides, padding, tap_axis):
    """``sum_t z[..., s*o + t - lo, ...]`` at tap ``t`` of axis ``tap_axis`` (dropped): the
    narrow side's per-tap products added into each output. ``z`` is ``[B, *U, K, c]``
    (``tap_axis=-2``) or ``[K, c, B, *U]`` (``tap_axis=0``)."""
    nsp = len(v_spatial)
    first = 1 if tap_axis == -2 else 3  # first spatial axis
    u_spatial = z.shape[first : first + nsp]
    pads = _tap_pads(u_spatial, v_spatial, k_spatial, strides, padding)
    cfg = [(0, 0, 0)] * z.ndim
    cfg[first : first + nsp] = pads
    zp = lax.pad(z, jnp.zeros((), z.dtype), cfg)
    axis = tap_axis % z.ndim
    out = None
    for j, t in enumerate(itertools.product(*map(range, k_spatial))):
        start, limit, step = [0] * z.ndim, list(zp.shape), [1] * z.ndim
        start[first : first + nsp] = t
        limit[first : first + nsp] = _tap_bounds(t, strides, v_spatial)
        step[first : first + nsp] = strides
        start[axis], limit[axis] = j, j + 1
        piece = lax.slice(zp, start, limit, step)
        out = piece if out is None else out + piece
    return out.squeeze(axis)


def _dot(a, b, ca: int, cb: int, precision):
    def xla(a, b):
        return lax.dot_general(a, b, (((ca,), (cb,)), ((), ())), precision=precision)

    if onednn.skinny(a, b, ca, cb):  # only the CPU's lowering calls oneDNN
        return lax.platform_dependent(a, b, cpu=partial(onednn.matmul, cb=cb), default=xla)
    return xla(a, b)


def _narrow_conv(u, w, *, strides, padding, precision):
    """The convolution with one output channel: per-tap products of ``u`` (one matmul, laid
    out tap-major), added up tap by tap."""
    nsp = u.ndim - 2
    ks, (ci, co) = w.shape[:nsp], w.shape[-2:]
    k = math.prod(ks)
    vs = out_spatial(u.shape[1:-1], ks, strides, padding)
    wt = jnp.swapaxes(w.reshape(k, ci, co), 1, 2).reshape(k * co, ci)
    z = _dot(wt, u.reshape(-1, ci), 1, 1, precision).reshape(k, co, *u.shape[:-1])
    return jnp.moveaxis(_tap_sum(z, vs, ks, strides, padding, tap_axis=0), 0, -1)


def _narrow_convt(v, w, *, strides, padding, precision, u_spatial):
    """The transposed convolution onto one channel: per-tap products of ``v`` (one matmul),
    scattered back to the taps' pixels (the transpose of :func:`_patches`)."""
    nsp = v.ndim - 2
    ks, (ci, co) = w.shape[:nsp], w.shape[-2:]
    k, b, vs = math.prod(ks), v.shape[0], v.shape[1:-1]
    y = _dot(v.reshape(-1, co), w.reshape(k * ci, co), 1, 1, precision)
    u_aval = jax.ShapeDtypeStruct((b, *u_spatial, ci), v.dtype)
    scatter = jax.linear_transpose(
        partial(_patches, v_spatial=vs, k_spatial=ks, strides=strides, padding=padding), u_aval
    )
    return scatter(y.reshape(b, *vs, k, ci))[0]


def _narrow_kgrad(u, v, *, strides, padding, precision, k_spatial):
    """The kernel gradient with one channel on either side: the narrow side's taps gathered
    (``u``'s patches) or scattered (``v`` at each tap's pixels), then one matmul over pixels."""
    (ci, co), k, vs = (u.shape[-1], v.shape[-1]), math.prod(k_spatial), v.shape[1:-1]
    if ci <= co:
        p = _patches(u, vs, k_spatial, strides, padding).reshape(-1, k * ci)
        return _dot(p, v.reshape(-1, co), 0, 0, precision).reshape(*k_spatial, ci, co)
    z_aval = jax.ShapeDtypeStruct((*u.shape[:-1], k, co), v.dtype)
    add = partial(
        _tap_sum, v_spatial=vs, k_spatial=k_spatial, strides=strides, padding=padding, tap_axis=-2
    )
    z = jax.linear_transpose(add, z_aval)(v)[0]
    w = _dot(u.reshape(-1, ci), z.reshape(-1, k * co), 0, 0, precision).reshape(ci, k, co)
    return jnp.swapaxes(w, 0, 1).reshape(*k_spatial, ci, co)


#: A side with at most this many channels is narrow (the comment above :func:`_tap_bounds`).
NARROW_MAX = 1


def _on_onednn(a, b, ci: int, co: int, params, stacked: bool, narrow: bool) -> bool:
    """On the CPU, wide 2-d float32 slots run on oneDNN, with or without a leading replica axis
    (``stacked``). A single-channel side stays on the forms above (D's first forward
    convolution: 0.2-0.3 ms on XLA, 2.0 ms in PyTorch's oneDNN) unless ``narrow``: stacked
    replicas, where oneDNN's calls split over the threads win, or a slot the kernels run as
    direct loops (``_direct_*``)."""
    wide = narrow or min(ci, co) > NARROW_MAX
    return wide and onednn.available(a, b, padding=params["padding"], stacked=stacked)


def _conv_one_channel(u, w, *, strides, padding, precision):
    """The convolution from one input channel as ``u``'s patches times the kernel: under
    ``vmap`` a batched product, where XLA's convolution would become a grouped one."""
    nsp = u.ndim - 2
    ks, co = w.shape[:nsp], w.shape[-1]
    vs = out_spatial(u.shape[1:-1], ks, strides, padding)
    p = _patches(u, vs, ks, strides, padding)  # [B, *V, K, 1]
    y = _dot(p.reshape(-1, math.prod(ks)), w.reshape(-1, co), 1, 0, precision)
    return y.reshape(*p.shape[: nsp + 1], co)


def _conv_xla(u, w, *, vmapped: bool = False, **params):
    if vmapped and w.shape[-2] <= NARROW_MAX:
        return _conv_one_channel(u, w, **params)
    return _conv_impl(u, w, **params)


# Each slot's lowering: ``dnn`` is oneDNN's call (operands with or without a replica axis),
# ``xla`` the forms on XLA's own operations (one replica).
def _conv_dnn(u, w, *, strides, padding, **_):
    vs = out_spatial(u.shape[-3:-1], w.shape[-4:-2], strides, padding)
    return onednn.conv(u, w, strides, padding, vs)


def _conv_xla_forms(u, w, *, vmapped: bool = False, **params):
    if w.shape[-1] <= NARROW_MAX < w.shape[-2]:
        return _narrow_conv(u, w, **params)
    return _conv_xla(u, w, vmapped=vmapped, **params)


def _convt_dnn(v, w, *, strides, padding, u_spatial, **_):
    return onednn.conv_backward_data(v, w, strides, padding, u_spatial)


def _convt_xla_forms(v, w, *, vmapped: bool = False, **params):
    if w.shape[-2] <= NARROW_MAX < w.shape[-1]:
        return _narrow_convt(v, w, **params)
    return _convt_impl(v, w, conv=partial(_conv_xla, vmapped=vmapped), **params)


def _kgrad_dnn(u, v, *, strides, padding, k_spatial, **_):
    return onednn.conv_backward_weights(u, v, strides, padding, k_spatial)


def _kgrad_xla_forms(u, v, *, vmapped: bool = False, **params):
    if min(u.shape[-1], v.shape[-1]) <= NARROW_MAX:
        return _narrow_kgrad(u, v, **params)
    return _kgrad_impl(u, v, **params)


# Slots onto one channel that run on the kernels' direct loops (``csrc/one_channel.h``,
# ``csrc/backward_data.h``), stacked or not, where oneDNN and XLA's forms are 3-8x slower: a
# convolution's forward and kernel gradient at stride 1 (the generator's output layer), and a
# transposed convolution of at most 16 taps (the critic's input gradient).
def _direct_conv(u, w, params) -> bool:
    return w.shape[-1] == 1 and all(s == 1 for s in params["strides"])


def _direct_kgrad(u, v, params) -> bool:
    return v.shape[-1] == 1 and all(s == 1 for s in params["strides"])


def _direct_convt(v, w, params) -> bool:
    return w.shape[-2] == 1 and math.prod(w.shape[-4:-2]) <= 16


def _slot_lowering(dnn, xla, widths, narrow_dnn, direct):
    """A slot's lowering, given its oneDNN call, its XLA forms, its (ci, co) from its operands,
    whether a narrow slot of two or more stacked replicas goes to oneDNN (measured per slot:
    all but the transposed convolution onto one channel, 2-4x slower there) and whether its
    operands run the kernels' direct loops, with or without stacking (``_direct_*`` above).

    One replica: wide slots on oneDNN (on the CPU), the rest on the XLA forms. Stacked replicas
    (``stacked=True``, a leading replica axis on both operands): on the CPU one oneDNN call over
    all of them (split over the threads); otherwise a narrow slot's XLA forms under ``vmap``
    (batched products and slices), a wide one's replica by replica (under ``vmap`` XLA's
    convolution would be a grouped one, slow on the CPU).
    """

    def lower(a, b, *, cpu: bool = False, stacked: bool = False, **params):
        ci, co = widths(a, b)
        narrow = (stacked and a.shape[0] > 1 and narrow_dnn(ci, co)) or direct(a, b, params)
        if cpu and _on_onednn(a, b, ci, co, params, stacked, narrow):
            return dnn(a, b, **params)
        if not stacked:
            return xla(a, b, **params)
        if min(ci, co) <= NARROW_MAX:
            return jax.vmap(partial(xla, vmapped=True, **params))(a, b)
        return _per_replica(partial(xla, **params), a, b)

    return lower


_conv_lowering = _slot_lowering(
    _conv_dnn, _conv_xla_forms, lambda u, w: w.shape[-2:], lambda i, o: True, _direct_conv
)
_convt_lowering = _slot_lowering(
    _convt_dnn,
    _convt_xla_forms,
    lambda v, w: w.shape[-2:],
    lambda i, o: i > NARROW_MAX,
    _direct_convt,
)
_kgrad_lowering = _slot_lowering(
    _kgrad_dnn,
    _kgrad_xla_forms,
    lambda u, v: (u.shape[-1], v.shape[-1]),
    lambda i, o: True,
    _direct_kgrad,
)


# ----------------------------------------------------------------------------- primitives
conv_p = Primitive("ggans_conv")
convt_p = Primitive("ggans_conv_transpose")
kgrad_p = Primitive("ggans_conv_kernel_grad")


def _check_dtypes(a, b):
    if a.dtype != b.dtype:
        raise TypeError(f"ggans.layers: operand dtypes differ: {a.dtype} vs {b.dtype}")
    return a.dtype


# ``stacked``: every operand and the result have a leading replica axis (the batching rules'
# form for stacked replicas, lowered as one call over all of them where it can be).
def _conv_abstract(u, w, *, strides, padding, precision, stacked=False):
    dt = _check_dtypes(u, w)
    nsp, lead = len(strides), u.shape[: 1 + stacked]
    vs = out_spatial(u.shape[1 + stacked : -1], w.shape[stacked : stacked + nsp], strides, padding)
    return jax.core.ShapedArray((*lead, *vs, w.shape[-1]), dt)


def _convt_abstract(v, w, *, strides, padding, precision, u_spatial, stacked=False):
    dt = _check_dtypes(v, w)
    return jax.core.ShapedArray((*v.shape[: 1 + stacked], *u_spatial, w.shape[-2]), dt)


def _kgrad_abstract(u, v, *, strides, padding, precision, k_spatial, stacked=False):
    dt = _check_dtypes(u, v)
    return jax.core.ShapedArray((*u.shape[:stacked], *k_spatial, u.shape[-1], v.shape[-1]), dt)


conv_p.def_abstract_eval(_conv_abstract)
convt_p.def_abstract_eval(_convt_abstract)
kgrad_p.def_abstract_eval(_kgrad_abstract)
for _p, _lowering in [
    (conv_p, _conv_lowering),
    (convt_p, _convt_lowering),
    (kgrad_p, _kgrad_lowering),
]:
    _p.def_impl(_lowering)
    mlir.register_lowering(_p, mlir.lower_fun(_lowering, multiple_results=False))
    _cpu_lowering = mlir.lower_fun(partial(_lowering, cpu=True), multiple_results=False)
    mlir.register_lowering(_p, _cpu_lowering, platform="cpu")


# --- transposes (each slot's transpose is another slot) ---
def _spatial(x, stacked: bool) -> tuple[int, ...]:
    """An activation's spatial shape."""
    return tuple(x.aval.shape[1 + stacked : -1])


def _k_spatial(w, nsp: int, stacked: bool) -> tuple[int, ...]:
    return tuple(w.aval.shape[stacked : stacked + nsp])


def _conv_t_u(ct, u, w, **params):
    return convt_p.bind(ct, w, **params, u_spatial=_spatial(u, params["stacked"]))


def _conv_t_w(ct, u, w, **params):
    ks = _k_spatial(w, len(params["strides"]), params["stacked"])
    return kgrad_p.bind(u, ct, **params, k_spatial=ks)


def _convt_t_v(ct, v, w, *, u_spatial, **params):
    return conv_p.bind(ct, w, **params)


def _convt_t_w(ct, v, w, *, u_spatial, **params):
    ks = _k_spatial(w, len(params["strides"]), params["stacked"])
    return kgrad_p.bind(ct, v, **params, k_spatial=ks)


def _kgrad_t_u(ct, u, v, *, k_spatial, **params):
    return convt_p.bind(v, ct, **params, u_spatial=_spatial(u, params["stacked"]))


def _kgrad_t_v(ct, u, v, *, k_spatial, **params):
    return conv_p.bind(u, ct, **params)


ad.defbilinear(conv_p, _conv_t_u, _conv_t_w)
ad.defbilinear(convt_p, _convt_t_v, _convt_t_w)
ad.defbilinear(kgrad_p, _kgrad_t_u, _kgrad_t_v)


# --- batching ---
def _per_replica(fn, a, b):
    """``stack([fn(a[i], b[i]) for i])`` for operands batched on axis 0."""
    n = a.shape[0]
    if n <= UNROLL_MAX:
        return jnp.stack([fn(a[i], b[i]) for i in range(n)])
    return lax.map(lambda ab: fn(*ab), (a, b))


def _fold_batch(x, bd):
    """Move batch dim ``bd`` to the front and merge it with the example axis."""
    x = jnp.moveaxis(x, bd, 0)
    return x.reshape((-1, *x.shape[2:])), x.shape[0]


def _unfold_batch(y, n):
    return y.reshape((n, -1, *y.shape[1:]))


def _fold_channels(x, bd, axis):
    """Move batch dim ``bd`` next to (before) channel axis ``axis`` (of the unbatched array,
    negative) and merge them."""
    x = jnp.moveaxis(x, bd, axis - 1)
    shp = x.shape
    return x.reshape((*shp[: axis - 1 + x.ndim], -1, *shp[x.ndim + axis + 1 :])), shp[axis - 1]


def _unfold_channels(y, n, axis):
    """Split channel axis ``axis`` (negative) into ``[n, c]`` and move ``n`` to the front."""
    shp = y.shape
    a = y.ndim + axis
    y = y.reshape((*shp[:a], n, shp[a] // n, *shp[a + 1 :]))
    return jnp.moveaxis(y, a, 0)


def _stack(prim, a, b, bda, bdb, params):
    """Both operands batched (stacked replicas): one stacked slot over them. Batched again (runs
    of stacked replicas, or a vmap around the round), the new axis merges with the replica
    axis; an unbatched operand is broadcast along it."""
    n = a.shape[bda] if bda is not None else b.shape[bdb]
    a = jnp.moveaxis(a, bda, 0) if bda is not None else jnp.broadcast_to(a, (n, *a.shape))
    b = jnp.moveaxis(b, bdb, 0) if bdb is not None else jnp.broadcast_to(b, (n, *b.shape))
    if not params["stacked"]:
        return prim.bind(a, b, **{**params, "stacked": True}), 0
    r = a.shape[1]
    y = prim.bind(a.reshape(n * r, *a.shape[2:]), b.reshape(n * r, *b.shape[2:]), **params)
    return y.reshape(n, r, *y.shape[1:]), 0


def _weight_batcher(prim, w_channels: int):
    """The batching rule of a slot whose second operand is a kernel (convolution, transposed
    convolution). One kernel for N inputs folds the inputs into the batch; N kernels for one
    input fold into the kernel's output channels (axis `w_channels`), N*c output channels."""

    def rule(args, dims, **params):
        x, w = args
        bx, bw = dims
        if params["stacked"] or (bx is not None and bw is not None):
            return _stack(prim, x, w, bx, bw, params)
        if bw is None:
            xf, n = _fold_batch(x, bx)
            return _unfold_batch(prim.bind(xf, w, **params), n), 0
        wf, n = _fold_channels(w, bw, w_channels)
        return _unfold_channels(prim.bind(x, wf, **params), n, -1), 0

    return rule


def _kgrad_batch(args, dims, **params):
    u, v = args
    bu, bv = dims
    if params["stacked"] or (bu is not None and bv is not None):
        return _stack(kgrad_p, u, v, bu, bv, params)
    if bv is None:  # N inputs u, shared v: N*ci kernel input channels
        uf, n = _fold_channels(u, bu, -1)
        return _unfold_channels(kgrad_p.bind(uf, v, **params), n, -2), 0
    vf, n = _fold_channels(v, bv, -1)
    return _unfold_channels(kgrad_p.bind(u, vf, **params), n, -1), 0


batching.primitive_batchers[conv_p] = _weight_batcher(conv_p, -1)
batching.primitive_batchers[convt_p] = _weight_batcher(convt_p, -2)
batching.primitive_batchers[kgrad_p] = _kgrad_batch


# ----------------------------------------------------------------------------- functions
def conv(
    x: Array,
    kernel: Array,
    strides: Sequence[int] | int = 1,
    padding: str | Sequence[tuple[int, int]] = "SAME",
    *,
    precision: PrecisionLike = None,
) -> Array:
    """``lax.conv_general_dilated(x, kernel, strides, padding)``, channels last
    (``x [B, *sp, cin]``, ``kernel [*k, cin, cout]``), with the fast derivative/vmap rules."""
    nsp = x.ndim - 2
    strides = as_tuple(strides, nsp)
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(x.shape[1:-1], kernel.shape[:nsp], strides, padding)
    else:
        pads = padding
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    return conv_p.bind(x, kernel, strides=strides, padding=pads, precision=precision, stacked=False)


def conv_transpose(
    x: Array,
    kernel: Array,
    strides: Sequence[int] | int = 1,
    padding: str | Sequence[tuple[int, int]] = "SAME",
    *,
    precision: PrecisionLike = None,
) -> Array:
    """``lax.conv_transpose(x, kernel, strides, padding)`` (``transpose_kernel=False``),
    channels last, with the fast derivative/vmap rules.

    ``lax.conv_transpose`` correlates the ``strides``-dilated input, padded by ``(a, b)``, with
    the unflipped kernel. That is the transpose, in its input, of the strided convolution with
    the kernel flipped and its channel axes swapped and padding ``(k-1-a, ...)``.
    """
    nsp = x.ndim - 2
    strides = as_tuple(strides, nsp)
    u_spatial, pads = transpose_geometry(x.shape[1:-1], kernel.shape[:nsp], strides, padding)
    w = jnp.swapaxes(jnp.flip(kernel, axis=tuple(range(nsp))), -1, -2)
    return convt_p.bind(
        x,
        w,
        strides=strides,
        padding=tuple(pads),
        precision=precision,
        u_spatial=tuple(u_spatial),
        stacked=False,
    )


# ----------------------------------------------------------------------------- modules


def _kernel_size(ks: int | Sequence[int]) -> tuple[int, ...]:
    return (ks,) if isinstance(ks, int) else tuple(ks)


class Conv(Module):
    """Drop-in replacement for ``flax.linen.Conv`` (no groups, dilation or mask), with fast
    gradients (any order) and fast ``vmap`` over stacked params. See the module docstring."""

    features: int
    kernel_size: int | Sequence[int]
    strides: None | int | Sequence[int] = 1
    padding: PaddingLike = "SAME"
    input_dilation: None | int | Sequence[int] = 1
    kernel_dilation: None | int | Sequence[int] = 1
    feature_group_count: int = 1
    use_bias: bool = True
    mask: Array | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = initializers.zeros_init()

    @compact
    def __call__(self, inputs: Array) -> Array:
        kernel_size = _kernel_size(self.kernel_size)
        nsp = len(kernel_size)
        if (
            as_tuple(self.input_dilation, nsp) != (1,) * nsp
            or as_tuple(self.kernel_dilation, nsp) != (1,) * nsp
            or self.feature_group_count != 1
            or self.mask is not None
        ):
            raise NotImplementedError("ggans.layers.Conv: no dilation, groups or mask")
        padding = canonicalize_padding(self.padding, nsp)
        inputs, batch_shape = flatten_batch(inputs, nsp)
        if padding in ("CIRCULAR", "REFLECT"):  # as flax does it
            pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in kernel_size] + [(0, 0)]
            mode = {"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding]
            inputs = jnp.pad(inputs, pads, mode=mode)
            padding = "VALID"
        elif padding == "CAUSAL":
            if nsp != 1:
                raise ValueError("Causal padding is only implemented for 1D convolutions.")
            inputs = jnp.pad(inputs, [(0, 0), (kernel_size[0] - 1, 0), (0, 0)])
            padding = "VALID"

        kernel = self.param(
            "kernel",
            self.kernel_init,
            (*kernel_size, inputs.shape[-1], self.features),
            self.param_dtype,
        )
        bias = None
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        inputs, kernel, bias = promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        y = conv(inputs, kernel, as_tuple(self.strides, nsp), padding, precision=self.precision)
        if bias is not None:
            y = y + bias
        if batch_shape is not None:
            y = y.reshape((*batch_shape, *y.shape[1:]))
        return y


class ConvTranspose(Module):
    """Drop-in replacement for ``flax.linen.ConvTranspose`` (``transpose_kernel=False``, no
    dilation or mask; padding 'SAME', 'VALID' or explicit pairs), with fast gradients (any
    order) and fast ``vmap`` over stacked params. See the module docstring."""

    features: int
    kernel_size: int | Sequence[int]
    strides: Sequence[int] | None = None
    padding: PaddingLike = "SAME"
    kernel_dilation: Sequence[int] | None = None
    use_bias: bool = True
    mask: Array | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = initializers.zeros_init()
    transpose_kernel: bool = False

    @compact
    def __call__(self, inputs: Array) -> Array:
        kernel_size = _kernel_size(self.kernel_size)
        nsp = len(kernel_size)
        if (
            as_tuple(self.kernel_dilation, nsp) != (1,) * nsp
            or self.mask is not None
            or self.transpose_kernel
        ):
            raise NotImplementedError(
                "ggans.layers.ConvTranspose: no dilation, mask or transpose_kernel"
            )
        padding = canonicalize_padding(self.padding, nsp)
        if padding == "CIRCULAR":
            raise NotImplementedError("ggans.layers.ConvTranspose: padding 'CIRCULAR'")
        inputs, batch_shape = flatten_batch(inputs, nsp)

        kernel = self.param(
            "kernel",
            self.kernel_init,
            (*kernel_size, inputs.shape[-1], self.features),
            self.param_dtype,
        )
        bias = None
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        inputs, kernel, bias = promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        y = conv_transpose(
            inputs, kernel, as_tuple(self.strides, nsp), padding, precision=self.precision
        )
        if bias is not None:
            y = y + bias
        if batch_shape is not None:
            y = y.reshape((*batch_shape, *y.shape[1:]))
        return y


# ----------------------------------------------------------------------------- dense
# A dense layer's product ``y = x @ W`` has, like a convolution, three bilinear slots:
# ``matmul(x, W) -> y``, ``matmul_nt(y, W) -> x`` and ``matmul_tn(x, y) -> W``. Autodiff's own
# kernel gradient is ``dot(dy, x)`` laid out ``[out, in]`` and then transposed; inside a loop
# body over a single replica XLA's CPU backend fuses that transpose into the optimizer's
# elementwise passes, which then read the kernel gradient (25.7 MB for the paper's big layers)
# column by column, 8-15x slower. Each slot's VJP here is another slot, so gradients of every
# order are products written in the layout they are used in.
@partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x: Array, w: Array, precision: PrecisionLike = None) -> Array:
    """``x [B, i] @ w [i, o] -> [B, o]``."""
    return _dot(x, w, 1, 0, precision)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul_nt(y: Array, w: Array, precision: PrecisionLike = None) -> Array:
    """``y [B, o] @ w[i, o]^T -> [B, i]`` (the input gradient)."""
    return _dot(y, w, 1, 1, precision)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul_tn(x: Array, y: Array, precision: PrecisionLike = None) -> Array:
    """``x [B, i]^T @ y [B, o] -> [i, o]`` (the kernel gradient)."""
    return _dot(x, y, 0, 0, precision)


def _save_fwd(f):
    return lambda a, b, precision: (f(a, b, precision), (a, b))


matmul.defvjp(
    _save_fwd(matmul),
    lambda p, r, g: (matmul_nt(g, r[1], p), matmul_tn(r[0], g, p)),
)
matmul_nt.defvjp(
    _save_fwd(matmul_nt),
    lambda p, r, g: (matmul(g, r[1], p), matmul_tn(g, r[0], p)),
)
matmul_tn.defvjp(
    _save_fwd(matmul_tn),
    lambda p, r, g: (matmul_nt(r[1], g, p), matmul(r[0], g, p)),
)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """The ``dot_general`` that ``flax.linen.Dense`` calls (contract the last axis of ``lhs``
    with the first of a 2-d ``rhs``), as a :func:`matmul` over the flattened leading axes."""
    (lc, rc), (lb, rb) = dimension_numbers
    if tuple(lc) != (lhs.ndim - 1,) or tuple(rc) != (0,) or lb or rb or rhs.ndim != 2:
        raise ValueError(f"ggans.layers.Dense: unsupported dimension_numbers {dimension_numbers}")
    if preferred_element_type is not None:
        raise ValueError("ggans.layers.Dense: preferred_element_type is not supported")
    x = lhs.reshape(-1, lhs.shape[-1])
    return matmul(x, rhs, precision).reshape(*lhs.shape[:-1], rhs.shape[1])


class Dense(nn.Dense):
    """``flax.linen.Dense`` (same parameters, same outputs) whose product and its gradients of
    every order are :func:`matmul`, :func:`matmul_nt` and :func:`matmul_tn`."""

    dot_general: Any = dense_dot_general
