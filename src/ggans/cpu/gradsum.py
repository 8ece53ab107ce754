"""One product for a kernel gradient that autodiff builds as a sum of products.

A dense layer used at several points of a loss (WGAN-GP's discriminator: on real and fake
images, on the interpolates, and in the penalty's input gradient) gets one kernel-gradient
product ``x_i^T @ dy_i`` per use, which autodiff then adds up: for the paper's 6272 x 1024
layer, three 25.7 MB products, each written out and read again by every pass of the
optimiser. Since ``sum_i x_i^T dy_i = [x_1; x_2; ...]^T [dy_1; dy_2; ...]``,
:func:`merge_kernel_grads` computes such a sum as a single product over the stacked rows.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.extend import core, source_info_util
from jax.extend.core import primitives

from ggans.cpu import layers

_TN = (((0,), (0,)), ((), ()))  # contract the rows of both operands: x^T @ y


class _Sum(NamedTuple):
    """``sum_i xs[i]^T @ ys[i] + rest``, not yet computed."""

    xs: tuple[jax.Array, ...]
    ys: tuple[jax.Array, ...]
    precision: object
    rest: jax.Array | None = None

    def value(self) -> jax.Array:
        x, y = self.xs[0], self.ys[0]
        if len(self.xs) > 1:
            x, y = jnp.concatenate(self.xs), jnp.concatenate(self.ys)
        out = layers.matmul_tn(x, y, self.precision)
        return out if self.rest is None else out + self.rest

    def plus(self, other: _Sum | jax.Array) -> _Sum:
        if isinstance(other, _Sum):
            both = _Sum(self.xs + other.xs, self.ys + other.ys, self.precision, self.rest)
            return both if other.rest is None else both.plus(other.rest)
        return self._replace(rest=other if self.rest is None else self.rest + other)

    def joins(self, other: _Sum) -> bool:
        """Whether ``other``'s products can share this one's (same precision and dtypes)."""
        same = {x.dtype for x in self.xs + other.xs}, {y.dtype for y in self.ys + other.ys}
        return self.precision == other.precision and all(len(d) == 1 for d in same)


def _is_kernel_grad(eqn: core.JaxprEqn) -> bool:
    """Whether ``eqn`` calls :func:`ggans.layers.matmul_tn`: a custom-VJP function whose primal
    is one ``x^T @ y`` product of its two arguments."""
    if eqn.primitive.name != "custom_vjp_call" or len(eqn.invars) != 2:
        return False
    inner = eqn.params["call_jaxpr"].jaxpr
    return (
        len(inner.eqns) == 1
        and inner.eqns[0].primitive is primitives.dot_general_p
        and inner.eqns[0].params["dimension_numbers"] == _TN
        and list(inner.eqns[0].invars) == list(inner.invars)
        and list(inner.eqns[0].outvars) == list(inner.outvars)
    )


def _eval(jaxpr: core.Jaxpr, consts, args) -> list:
    """``jax.core.eval_jaxpr`` (each equation bound under its own name stack, traceback and
    context), except that kernel-gradient products used once are kept as :class:`_Sum` terms,
    which ``add_any`` (autodiff's accumulation) joins."""
    uses = Counter(v for e in jaxpr.eqns for v in e.invars if not isinstance(v, core.Literal))
    uses.update(v for v in jaxpr.outvars if not isinstance(v, core.Literal))
    env: dict = {}

    def get(v):  # a value or a pending _Sum
        return v.val if isinstance(v, core.Literal) else env[v]

    def read(v):
        x = get(v)
        return x.value() if isinstance(x, _Sum) else x

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        if _is_kernel_grad(eqn) and uses[eqn.outvars[0]] == 1:
            x, y = map(read, eqn.invars)
            precision = eqn.params["call_jaxpr"].jaxpr.eqns[0].params["precision"]
            env[eqn.outvars[0]] = _Sum((x,), (y,), precision)
            continue
        if eqn.primitive is primitives.add_jaxvals_p and uses[eqn.outvars[0]] == 1:
            a, b = map(get, eqn.invars)
            if isinstance(b, _Sum) and not isinstance(a, _Sum):
                a, b = b, a
            if isinstance(a, _Sum) and (not isinstance(b, _Sum) or a.joins(b)):
                env[eqn.outvars[0]] = a.plus(b)
                continue
        name_stack = source_info_util.current_name_stack() + eqn.source_info.name_stack
        with (
            source_info_util.user_context(eqn.source_info.traceback, name_stack=name_stack),
            eqn.ctx.manager,
        ):
            out = eqn.primitive.bind(
                *map(read, eqn.invars), **eqn.primitive.get_bind_params(eqn.params)
            )
        outs = out if eqn.primitive.multiple_results else [out]
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


def merge_kernel_grads(fun: Callable) -> Callable:
    """``fun`` with every sum of :func:`ggans.layers.matmul_tn` products (each used only in
    that sum) computed as one product on the concatenated rows; same values up to float
    rounding, same output tree."""

    @functools.wraps(fun)
    def merged(*args):
        closed, out_shape = jax.make_jaxpr(fun, return_shape=True)(*args)
        out = _eval(closed.jaxpr, closed.consts, jax.tree.leaves(args))
        return jax.tree.unflatten(jax.tree.structure(out_shape), out)

    return merged
