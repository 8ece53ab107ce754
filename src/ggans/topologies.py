"""Who may talk to whom: a topology gives each round's communication graph.

A topology is a function ``(spec, n, r, key) -> Graph`` registered by name; ``r`` is the round
index (a traced int32) and ``key`` that round's topology key, so a graph may change with the
round and repeat with the seed. Protocols draw peers among a machine's neighbours
(:meth:`Graph.draw_peers`). Add one with ``@register("name")`` (and ``conf/topology/name.yaml``
with ``name: name``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import struct


@dataclass(frozen=True)
class TopologySpec:
    """Which graph, and its parameters (static: part of the compiled round)."""

    name: str = "complete"  # the paper's: every machine may talk to every other


class Graph(struct.PyTreeNode):
    """One round's graph: ``adjacency[i, j]`` says machines i and j are neighbours (no self
    loops). ``complete`` marks the complete graph, whose peers are drawn in O(N)."""

    adjacency: jax.Array  # [N, N] bool
    complete: bool = struct.field(pytree_node=False, default=False)

    @property
    def n(self) -> int:
        return self.adjacency.shape[0]

    def has_neighbours(self) -> jax.Array:
        """[N] bool: machines with at least one neighbour."""
        return self.adjacency.any(axis=1)

    def draw_peers(self, key: jax.Array) -> jax.Array:
        """[N] int32: for each machine, one neighbour drawn uniformly (itself if it has none)."""
        n = self.n
        i = jnp.arange(n)
        if self.complete:
            return (i + 1 + jax.random.randint(key, (n,), 0, n - 1)) % n
        logits = jnp.where(self.adjacency, 0.0, -jnp.inf)
        peers = jax.random.categorical(key, jnp.where(self.has_neighbours()[:, None], logits, 0))
        return jnp.where(self.has_neighbours(), peers, i).astype(jnp.int32)


Topology = Callable[[TopologySpec, int, jax.Array, jax.Array], Graph]
TOPOLOGIES: dict[str, Topology] = {}


def register(name: str) -> Callable[[Topology], Topology]:
    """Register ``fn(spec, n, r, key) -> Graph`` as topology ``name``."""

    def add(fn: Topology) -> Topology:
        TOPOLOGIES[name] = fn
        return fn

    return add


def names() -> tuple[str, ...]:
    return tuple(TOPOLOGIES)


def round_graph(spec: TopologySpec, n: int, r: jax.Array, key: jax.Array) -> Graph:
    """The graph of round ``r``."""
    if spec.name not in TOPOLOGIES:
        raise ValueError(f"topology.name={spec.name!r}: must be one of {', '.join(names())}")
    return TOPOLOGIES[spec.name](spec, n, r, key)


@register("complete")
def complete(spec: TopologySpec, n: int, r: jax.Array, key: jax.Array) -> Graph:
    return Graph(~jnp.eye(n, dtype=bool), complete=True)
