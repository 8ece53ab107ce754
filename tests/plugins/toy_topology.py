"""A plugin module as a researcher's package would ship it: imported by ``python -m ggans``
through $GGANS_PLUGINS (or a ``ggans.plugins`` entry point), it registers a topology."""

import jax.numpy as jnp

from ggans import topologies


@topologies.register("toy_ring")
def toy_ring(spec, n, r, key):
    i = jnp.arange(n)
    adjacency = jnp.zeros((n, n), bool).at[i, (i + 1) % n].set(True).at[(i + 1) % n, i].set(True)
    return topologies.Graph(adjacency & ~jnp.eye(n, dtype=bool))
