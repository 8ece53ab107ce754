"""Who may talk to whom: a topology gives each round's communication graph.

A topology is a function ``(spec, n, r, key) -> Graph`` registered by name; ``r`` is the round
index (a traced int32) and ``key`` that round's topology key, so a graph may change with the
round and repeat with the seed. Protocols draw peers among a machine's neighbours
(:meth:`Graph.draw_peers`). Add one with ``@register("name")``, or a fixed graph built with
NumPy with ``@static("name")`` (and ``conf/topology/name.yaml`` with ``name: name``).

Fixed random graphs (random_regular, erdos_renyi, small_world) are drawn once from
``topology.seed``, not from the run's seed: the graph is part of the setting, the same for
every seed of a sweep, so seeds measure training noise, not graph noise.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ggans.errors import ConfigError


@dataclass(frozen=True)
class TopologySpec:
    """Which graph, and its parameters (static: part of the compiled round)."""

    name: str = "complete"  # the paper's: every machine may talk to every other
    degree: int = 4  # random_regular, dynamic_regular: k; small_world: ring-lattice degree
    p: float = 0.1  # erdos_renyi: edge probability; small_world: rewiring probability
    seed: int = 0  # of the fixed random graphs (random_regular, erdos_renyi, small_world)
    file: str | None = None  # from_file: an edge list, one "i j" (0-based) per line


class Graph(struct.PyTreeNode):
    """One round's graph: ``adjacency[i, j]`` says machine i may send to machine j (no self
    loops; symmetric except for directed schedules such as one_peer_exponential). ``complete``
    marks the complete graph, whose peers are drawn in O(N)."""

    adjacency: jax.Array  # [N, N] bool
    complete: bool = struct.field(pytree_node=False, default=False)

    @property
    def n(self) -> int:
        return self.adjacency.shape[0]

    def has_neighbours(self) -> jax.Array:
        """[N] bool: machines with at least one neighbour to send to."""
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
CHECKS: dict[str, Callable[[TopologySpec, int], None]] = {}
TIME_VARYING: set[str] = set()


def register(
    name: str,
    check: Callable[[TopologySpec, int], None] | None = None,
    time_varying: bool = False,
) -> Callable[[Topology], Topology]:
    """Register ``fn(spec, n, r, key) -> Graph`` as topology ``name``; ``check(spec, n)``
    raises ConfigError for a spec or N it cannot serve."""

    def add(fn: Topology) -> Topology:
        TOPOLOGIES[name] = fn
        CHECKS[name] = check or (lambda spec, n: None)
        if time_varying:
            TIME_VARYING.add(name)
        return fn

    return add


def static(name: str):
    """Register ``build(spec, n) -> np.ndarray [n, n] bool`` as a fixed topology: built once
    on the host (where its ConfigErrors surface before a run starts), a constant of the
    compiled round."""

    def add(build):
        cached = functools.lru_cache(maxsize=64)(build)

        def topology(spec: TopologySpec, n: int, r: jax.Array, key: jax.Array) -> Graph:
            return Graph(jnp.asarray(cached(spec, n)))

        register(name, check=lambda spec, n: cached(spec, n) is None)(topology)
        build.adjacency = cached
        return build

    return add


def names() -> tuple[str, ...]:
    return tuple(TOPOLOGIES)


def check(spec: TopologySpec, n: int) -> None:
    """ConfigError (one line naming the key) if ``spec`` cannot give a graph of ``n``."""
    if spec.name not in TOPOLOGIES:
        raise ConfigError(f"topology.name={spec.name!r}: must be one of {', '.join(names())}")
    CHECKS[spec.name](spec, n)


def round_graph(spec: TopologySpec, n: int, r: jax.Array, key: jax.Array) -> Graph:
    """The graph of round ``r``."""
    if spec.name not in TOPOLOGIES:
        raise ValueError(f"topology.name={spec.name!r}: must be one of {', '.join(names())}")
    return TOPOLOGIES[spec.name](spec, n, r, key)


def _from_edges(n: int, i, j) -> np.ndarray:
    a = np.zeros((n, n), bool)
    a[np.asarray(i) % n, np.asarray(j) % n] = True
    a |= a.T
    np.fill_diagonal(a, False)
    return a


@register("complete")
def complete(spec: TopologySpec, n: int, r: jax.Array, key: jax.Array) -> Graph:
    return Graph(~jnp.eye(n, dtype=bool), complete=True)


@static("ring")
def ring(spec: TopologySpec, n: int) -> np.ndarray:
    """Machine i talks to i - 1 and i + 1 (mod N)."""
    i = np.arange(n)
    return _from_edges(n, i, i + 1)


@static("torus")
def torus(spec: TopologySpec, n: int) -> np.ndarray:
    """A 2D torus of a x b = N machines, a the largest divisor of N at most sqrt(N); each
    talks to its four grid neighbours (wrapping around)."""
    a = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    if a == 1 and n > 3:
        raise ConfigError(
            f"topology.name=torus: nodes={n} is prime, so no a x b grid with a, b >= 2; "
            "use a composite nodes or another topology"
        )
    b = n // a
    x, y = np.divmod(np.arange(n), b)
    right, down = x * b + (y + 1) % b, ((x + 1) % a) * b + y
    return _from_edges(n, np.r_[np.arange(n), np.arange(n)], np.r_[right, down])


@static("hypercube")
def hypercube(spec: TopologySpec, n: int) -> np.ndarray:
    """Machines i and j talk when their indices differ in one bit (N a power of two)."""
    if n < 2 or n & (n - 1):
        raise ConfigError(
            f"topology.name=hypercube: nodes={n} must be a power of two (2, 4, 8, ...)"
        )
    i = np.arange(n)
    bits = [1 << b for b in range(n.bit_length() - 1)]
    return _from_edges(n, np.tile(i, len(bits)), np.concatenate([i ^ b for b in bits]))


@static("exponential")
def exponential(spec: TopologySpec, n: int) -> np.ndarray:
    """Machine i talks to i +- 2^t (mod N) for every 2^t < N (BlueFog's power-of-two ring)."""
    i = np.arange(n)
    hops = [1 << t for t in range(max(n - 1, 1).bit_length()) if 1 << t < n]
    return _from_edges(n, np.tile(i, len(hops)), np.concatenate([i + h for h in hops]))


@static("star")
def star(spec: TopologySpec, n: int) -> np.ndarray:
    """Machine 0 talks to every other; the others only to machine 0."""
    return _from_edges(n, np.zeros(n - 1, int), np.arange(1, n))


def _check_degree(spec: TopologySpec, n: int, even: bool = False) -> int:
    k = spec.degree
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < n:
        raise ConfigError(f"topology.degree={k!r}: must be an integer in 1..nodes-1 ({n - 1})")
    if even and k % 2:
        raise ConfigError(f"topology.degree={k}: must be even for {spec.name}")
    if (n * k) % 2:
        raise ConfigError(
            f"topology.degree={k}: nodes x degree ({n} x {k}) must be even for a {k}-regular graph"
        )
    return k


def _check_p(spec: TopologySpec, low_open: bool) -> float:
    p = spec.p
    ok = isinstance(p, int | float) and not isinstance(p, bool)
    ok = ok and ((0 < p <= 1) if low_open else (0 <= p <= 1))
    if not ok:
        raise ConfigError(f"topology.p={p!r}: must be in {'(0, 1]' if low_open else '[0, 1]'}")
    return float(p)


@static("random_regular")
def random_regular(spec: TopologySpec, n: int) -> np.ndarray:
    """A random k-regular graph (k = topology.degree), drawn from topology.seed by random
    pairing, restarted when stuck (Steger and Wormald's algorithm)."""
    k = _check_degree(spec, n)
    rng = np.random.default_rng(spec.seed)
    for _ in range(1000):
        a = np.zeros((n, n), bool)
        stubs = np.repeat(np.arange(n), k)
        while len(stubs):
            u, v = rng.choice(len(stubs), 2, replace=False)
            x, y = stubs[u], stubs[v]
            if x == y or a[x, y]:
                free = [
                    (s, t)
                    for s in np.unique(stubs)
                    for t in np.unique(stubs)
                    if s < t and not a[s, t]
                ]
                if not free:
                    break
                continue
            a[x, y] = a[y, x] = True
            stubs = np.delete(stubs, [u, v])
        else:
            return a
    raise ConfigError(f"topology.degree={k}: no {k}-regular graph of {n} machines found")


@static("erdos_renyi")
def erdos_renyi(spec: TopologySpec, n: int) -> np.ndarray:
    """Each pair of machines linked with probability topology.p (drawn from topology.seed);
    a machine with no link keeps its own model."""
    p = _check_p(spec, low_open=True)
    upper = np.triu(np.random.default_rng(spec.seed).random((n, n)) < p, 1)
    return upper | upper.T


@static("small_world")
def small_world(spec: TopologySpec, n: int) -> np.ndarray:
    """Watts and Strogatz: a ring lattice of even degree k (each talks to the k/2 nearest on
    either side), each edge rewired with probability topology.p to a random machine."""
    k = _check_degree(spec, n, even=True)
    p = _check_p(spec, low_open=False)
    rng = np.random.default_rng(spec.seed)
    i = np.arange(n)
    a = _from_edges(n, np.tile(i, k // 2), np.concatenate([i + h for h in range(1, k // 2 + 1)]))
    for h in range(1, k // 2 + 1):
        for u in range(n):
            v = (u + h) % n
            if a[u, v] and rng.random() < p:
                free = np.flatnonzero(~a[u] & (i != u))
                if len(free):
                    w = rng.choice(free)
                    a[u, v] = a[v, u] = False
                    a[u, w] = a[w, u] = True
    return a


@static("from_file")
def from_file(spec: TopologySpec, n: int) -> np.ndarray:
    """The undirected graph of an edge list (``topology.file``): one ``i j`` per line,
    machines numbered 0..N-1; blank lines and ``#`` comments skipped."""
    if not spec.file:
        raise ConfigError("topology.file=null: from_file needs the path of an edge list")
    path = Path(spec.file).expanduser()
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"topology.file={spec.file}: cannot read ({err})") from None
    src, dst = [], []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#")[0].strip()
        if not line:
            continue
        parts = line.replace(",", " ").split()
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ConfigError(
                f"topology.file={spec.file}: line {number} ({line!r}) must be two machine "
                "numbers, 'i j'"
            )
        i, j = map(int, parts)
        if max(i, j) >= n or i == j:
            raise ConfigError(
                f"topology.file={spec.file}: line {number} links {i} and {j}; machines are "
                f"0..{n - 1} (nodes={n}) and no machine links to itself"
            )
        src.append(i)
        dst.append(j)
    return _from_edges(n, src, dst)


def _one_peer_check(spec: TopologySpec, n: int) -> None:
    if n < 2:
        raise ConfigError("topology.name=one_peer_exponential: needs nodes >= 2")


@register("one_peer_exponential", check=_one_peer_check, time_varying=True)
def one_peer_exponential(spec: TopologySpec, n: int, r: jax.Array, key: jax.Array) -> Graph:
    """BlueFog's dynamic exponential graph: in round r machine i sends to i + 2^t (mod N),
    t = r mod ceil(log2 N); one peer each, every machine receiving from exactly one."""
    hops = max(1, (n - 1).bit_length())
    target = (jnp.arange(n) + jnp.left_shift(1, r % hops)) % n
    return Graph(jax.nn.one_hot(target, n, dtype=bool))


def _dynamic_regular_check(spec: TopologySpec, n: int) -> None:
    random_regular.adjacency(spec, n)


@register("dynamic_regular", check=_dynamic_regular_check, time_varying=True)
def dynamic_regular(spec: TopologySpec, n: int, r: jax.Array, key: jax.Array) -> Graph:
    """A fresh random k-regular graph each round: random_regular's graph with its machines
    relabelled by a permutation drawn from the round's key."""
    base = jnp.asarray(random_regular.adjacency(spec, n))
    inverse = jnp.argsort(jax.random.permutation(key, n))
    return Graph(base[inverse][:, inverse])
