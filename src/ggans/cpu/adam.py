"""``optax.adam`` and ``optax.apply_updates`` as one step, in one pass over each large leaf.

On XLA's CPU backend optax's update of a leaf runs as three loop fusions (first moment, second
moment, parameter), each reading the gradient and the moments again. For the paper model's two
6272 x 1024 kernels (25.7 MB each) that memory traffic costs about a tenth of a WGAN-GP step.
:func:`step` computes the same update, and returns optax's own state, but sends every leaf of at
least :data:`FUSED_MIN` elements to a kernel (``csrc/adam_kernel.cc``, built with the oneDNN
kernels by :mod:`ggans.onednn`) that reads ``p, g, m, v`` once and writes ``p, m, v`` once. Other
leaves, other backends, or a machine without the kernels get optax's own update: XLA drops the
part of optax's result that the kernel replaces.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from ggans.cpu import onednn

__all__ = ["FUSED_MIN", "step"]

PyTree = Any

#: Leaves with at least this many elements get the one-pass kernel.
FUSED_MIN = 1 << 20


def _fused(p, g, m, v, coef, *, b1: float, b2: float, eps: float, eps_root: float):
    f32 = np.float32
    out = (jax.ShapeDtypeStruct(p.shape, p.dtype),) * 3
    call = jax.ffi.ffi_call(
        onednn.ADAM_TARGET,
        out,
        vmap_method="broadcast_all",
        input_output_aliases={0: 0, 2: 1, 3: 2},  # p, m, v updated in place
    )
    return call(
        p, g, m, v, coef,
        b1=f32(b1), one_minus_b1=f32(1 - b1), b2=f32(b2), one_minus_b2=f32(1 - b2),
        eps=f32(eps), eps_root=f32(eps_root),
    )  # fmt: skip


def step(
    grads: PyTree,
    state: PyTree,
    params: PyTree,
    *,
    learning_rate: float,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
) -> tuple[PyTree, PyTree]:
    """``optax.adam(learning_rate, b1, b2, eps, eps_root)``'s update applied to ``params``:
    ``(new_params, new_state)``, ``state`` being that optimiser's state."""
    tx = optax.adam(learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root)
    updates, new_state = tx.update(grads, state, params)
    new_params = optax.apply_updates(params, updates)
    if jax.default_backend() != "cpu" or onednn.status() != "ready":
        return new_params, new_state
    old, new = state[0], new_state[0]  # optax.adam's state: (ScaleByAdamState, EmptyState)
    count = new.count
    coef = jnp.stack(
        [jnp.asarray(-learning_rate, jnp.float32), 1 - b1**count, 1 - b2**count]
    ).astype(jnp.float32)
    fused = partial(_fused, b1=b1, b2=b2, eps=eps, eps_root=eps_root)

    def leaf(p, g, m, v, p_new, m_new, v_new):
        if p.size < FUSED_MIN or p.dtype != jnp.float32:
            return p_new, m_new, v_new
        return tuple(
            lax.platform_dependent(
                p, g, m, v, coef, cpu=fused, default=lambda *_: (p_new, m_new, v_new)
            )
        )

    leaves = jax.tree.map(leaf, params, grads, old.mu, old.nu, new_params, new.mu, new.nu)
    outer = jax.tree.structure(params)
    p, m, v = jax.tree.transpose(outer, jax.tree.structure((0, 0, 0)), leaves)
    return p, (new._replace(mu=m, nu=v), *new_state[1:])
