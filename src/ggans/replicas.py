"""N machines' GANs as one pytree whose leaves carry a leading machine axis of size N."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ggans.gan import GanSpec, GanState, init_gan

INITS = ("shared", "independent")


def init_replicas(spec: GanSpec, key: jax.Array, n: int, init: str = "shared") -> GanState:
    """Stacked states of ``n`` machines from one root key.

    ``shared``: every machine starts from the same weights (as federated averaging usually
    does); ``independent``: machine i is initialised from ``split(key, n)[i]``.
    """
    if init not in INITS:
        raise ValueError(f"init={init!r}: must be one of {', '.join(INITS)}")
    return _jitted_init(jax.default_backend())(spec, key, n, init)


def replicas_shape(spec: GanSpec, n: int, init: str = "shared") -> GanState:
    """The stacked state's shapes and dtypes (``jax.ShapeDtypeStruct`` leaves), nothing run."""
    return jax.eval_shape(lambda k: _init_replicas(spec, k, n, init), jax.random.key(0))


@functools.cache
def _jitted_init(backend: str):
    """Initialisation as one program (eagerly, every initialiser op is compiled on its own:
    seconds), compiled on a CPU without LLVM's optimisations (6 s less for the tiny model)."""
    options = {"xla_backend_optimization_level": 0} if backend == "cpu" else None
    return jax.jit(_init_replicas, static_argnums=(0, 2, 3), compiler_options=options)


def _init_replicas(spec: GanSpec, key: jax.Array, n: int, init: str) -> GanState:
    if init == "shared":
        one = init_gan(spec, key)
        return jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), one)
    return jax.vmap(lambda k: init_gan(spec, k))(jax.random.split(key, n))


def num_replicas(state: GanState) -> int:
    """N, the size of the leading machine axis."""
    return jax.tree.leaves(state)[0].shape[0]


def take(state: GanState, i: int) -> GanState:
    """Machine i's state, without the machine axis."""
    return jax.tree.map(lambda x: x[i], state)


def stack(states: list[GanState]) -> GanState:
    """Inverse of :func:`take` over all machines."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)
