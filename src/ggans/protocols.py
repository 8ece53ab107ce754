"""Communication protocols as row-stochastic mixing of the stacked replicas.

A round's exchange is a list of messages, ``src -> dst`` with a weight, self-messages
included, so that every machine's weights into it sum to 1. The same list gives the dense
form (an N x N matrix applied with einsum) and the gather form (gather senders, weight,
``segment_sum`` into receivers): O(N^2 P) against O(E P) work for P parameters.

Faults are part of the mixing: a dropped machine neither sends nor receives this round,
and a lost message is sent but not received. Both leave rows summing to 1.

A protocol is a function of the round's :class:`Exchange` (keys, round index, the machines
taking part, the round's graph from :mod:`ggans.topologies`) returning the G and D mixings and
their traffic, registered by name with ``@register("name")``; its byte accounting sits beside
it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ggans.topologies import Graph, TopologySpec, round_graph

FORMS = ("auto", "dense", "gather")
PyTree = Any


@dataclass(frozen=True)
class Faults:
    """Per round: each machine misses the exchange w.p. ``node_drop``; each message is lost
    w.p. ``message_loss``."""

    node_drop: float = 0.0
    message_loss: float = 0.0


class Mixing(struct.PyTreeNode):
    """Messages of one round for one model kind (G or D), E of them.

    ``weight[e]`` is 0 for a lost message; the weights arriving at each machine sum to 1.
    ``sent[e]`` says whether the sender transmitted (for byte accounting).
    """

    src: jax.Array  # [E] int32
    dst: jax.Array  # [E] int32
    weight: jax.Array  # [E] float32
    sent: jax.Array  # [E] bool; self-messages are never counted as sent
    n: int = struct.field(pytree_node=False)

    def matrix(self) -> jax.Array:
        """Dense form: W [N, N] with new_i = sum_j W[i, j] old_j."""
        return self.add_to(jnp.zeros((self.n, self.n), jnp.float32))

    def add_to(self, w: jax.Array) -> jax.Array:
        """``w`` [N, N] plus this round's dense form (summing rounds without N x N copies)."""
        return w.at[self.dst, self.src].add(self.weight)


class Traffic(struct.PyTreeNode):
    """Bytes moved in one round: per machine sent / received [N], and the server's totals."""

    sent: jax.Array
    received: jax.Array
    server_in: jax.Array
    server_out: jax.Array
    dropped: jax.Array  # machines that missed this exchange
    lost: jax.Array  # messages sent but not received


class Exchange(struct.PyTreeNode):
    """What a protocol sees of one round: its random keys, the round index, the machines
    taking part, the round's graph, the faults and the bytes of one G and one D message."""

    g_key: jax.Array  # for G's draws (and shared draws)
    d_key: jax.Array  # for D's draws, where they are independent of G's
    r: jax.Array  # int32 round index
    alive: jax.Array  # [N] bool: not dropped this round, and allowed in
    graph: Graph
    faults: Faults = struct.field(pytree_node=False)
    model_bytes: tuple[int, int] = struct.field(pytree_node=False)
    options: tuple[tuple[str, Any], ...] = struct.field(pytree_node=False, default=())

    @property
    def n(self) -> int:
        return self.alive.shape[0]

    def option(self, name: str, default: Any = None) -> Any:
        """A protocol setting from the ``protocol`` config group (``protocol.<name>``)."""
        return dict(self.options).get(name, default)


@dataclass(frozen=True)
class Protocol:
    """A protocol: ``mixing(exchange) -> (G's mixing, D's mixing, traffic)``; ``mixes=False``
    for one that never changes a model (the exchange is then skipped)."""

    mixing: Callable[[Exchange], tuple[Mixing, Mixing, Traffic]]
    mixes: bool = True


PROTOCOLS: dict[str, Protocol] = {}


def register(name: str, mixes: bool = True):
    """Register ``fn(exchange) -> (g_mixing, d_mixing, traffic)`` as protocol ``name``."""

    def add(fn):
        PROTOCOLS[name] = Protocol(fn, mixes)
        return fn

    return add


def names() -> tuple[str, ...]:
    return tuple(PROTOCOLS)


def get(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"protocol.name={name!r}: must be one of {', '.join(names())}")
    return PROTOCOLS[name]


def normalise(src, dst, valid, sent, n) -> Mixing:
    """Messages ``src -> dst`` (``valid`` ones arrive), weights equal among the arrivals at
    each receiver, its own included."""
    counts = jax.ops.segment_sum(valid.astype(jnp.float32), dst, n)
    weight = valid.astype(jnp.float32) / counts[dst]
    return Mixing(src.astype(jnp.int32), dst.astype(jnp.int32), weight, sent, n)


def identity(n: int) -> Mixing:
    i = jnp.arange(n)
    return normalise(i, i, jnp.ones(n, bool), jnp.zeros(n, bool), n)


def no_traffic(n: int, dropped=None) -> Traffic:
    zeros, none = jnp.zeros(n, jnp.float32), jnp.zeros((), jnp.int32)
    return Traffic(zeros, zeros, none, none, none if dropped is None else dropped, none)


def peer_traffic(ex: Exchange, g_mix: Mixing, d_mix: Mixing) -> Traffic:
    """Bytes of machine-to-machine messages: sent by their senders, received where they
    arrived; each G message is ``model_bytes[0]`` bytes, each D message ``model_bytes[1]``."""
    n = ex.n

    def per_machine(mix: Mixing, nbytes: int):
        sent = jax.ops.segment_sum(mix.sent * float(nbytes), mix.src, n)
        arrived = (mix.weight > 0) & (mix.src != mix.dst)
        return sent, jax.ops.segment_sum(arrived * float(nbytes), mix.dst, n)

    (gs, gr), (ds, dr) = (
        per_machine(g_mix, ex.model_bytes[0]),
        per_machine(d_mix, ex.model_bytes[1]),
    )
    lost = sum((m.sent & (m.weight == 0)).sum() for m in (g_mix, d_mix))
    none = jnp.zeros((), jnp.int32)
    return Traffic(gs + ds, gr + dr, none, none, (~ex.alive).sum(), lost)


def gossip_mixing(key: jax.Array, ex: Exchange) -> Mixing:
    """Every machine sends to one neighbour drawn uniformly; receivers average what arrived
    with their own model (equal weights). Senders keep their own."""
    peer_key, loss_key = jax.random.split(key)
    n, alive = ex.n, ex.alive
    i = jnp.arange(n)
    target = ex.graph.draw_peers(peer_key)
    sent = alive & ex.graph.has_neighbours()
    lost = jax.random.uniform(loss_key, (n,)) < ex.faults.message_loss
    delivered = sent & alive[target] & ~lost
    return normalise(
        jnp.concatenate([i, i]),
        jnp.concatenate([i, target]),
        jnp.concatenate([jnp.ones(n, bool), delivered]),
        jnp.concatenate([jnp.zeros(n, bool), sent]),
        n,
    )


@register("standalone", mixes=False)
def standalone(ex: Exchange):
    """No communication: every machine trains alone."""
    return identity(ex.n), identity(ex.n), no_traffic(ex.n)


@register("gossip")
def gossip(ex: Exchange):
    """The paper's gossip: G and D travel together to one peer drawn per machine and round."""
    mixing = gossip_mixing(ex.g_key, ex)
    return mixing, mixing, peer_traffic(ex, mixing, mixing)


@register("gossip_ind")
def gossip_ind(ex: Exchange):
    """Gossip with independent peers for G and D (the paper's 'gossip_ind')."""
    g_mix, d_mix = gossip_mixing(ex.g_key, ex), gossip_mixing(ex.d_key, ex)
    return g_mix, d_mix, peer_traffic(ex, g_mix, d_mix)


def server_average(ex: Exchange, key: jax.Array, nbytes: float) -> tuple[Mixing, Traffic]:
    """A server averages the models it received and sends the average back: receiver j gets
    it iff its download arrived. The server's traffic is counted on its side; each message is
    ``nbytes``."""
    n, alive, loss = ex.n, ex.alive, ex.faults.message_loss
    up_key, down_key = jax.random.split(key)
    up = alive & (jax.random.uniform(up_key, (n,)) >= loss)
    down = alive & (jax.random.uniform(down_key, (n,)) >= loss) & up.any()
    src, dst = all_pairs(n)
    valid = jnp.where(down[dst], up[src], src == dst)
    mixing = normalise(src, dst, valid, jnp.zeros(n * n, bool), n)
    traffic = Traffic(
        sent=alive * nbytes,
        received=down * nbytes,
        server_in=up.sum() * nbytes,
        server_out=down.sum() * nbytes,
        dropped=(~alive).sum(),
        lost=alive.sum() - up.sum() + (alive & up.any()).sum() - down.sum(),
    )
    return mixing, traffic


def all_pairs(n: int) -> tuple[jax.Array, jax.Array]:
    """Messages ``src -> dst`` for every ordered pair, self pairs included: e = dst * n + src."""
    return jnp.tile(jnp.arange(n), n), jnp.repeat(jnp.arange(n), n)


@register("federated")
def federated(ex: Exchange):
    """The paper's federated averaging: a server averages G and D and sends them back."""
    mixing, traffic = server_average(ex, ex.g_key, float(sum(ex.model_bytes)))
    return mixing, mixing, traffic


@register("g_only")
def g_only(ex: Exchange):
    """Federated averaging of the generators only; every discriminator stays local."""
    mixing, traffic = server_average(ex, ex.g_key, float(ex.model_bytes[0]))
    return mixing, identity(ex.n), traffic


@register("d_only")
def d_only(ex: Exchange):
    """Federated averaging of the discriminators only; every generator stays local."""
    mixing, traffic = server_average(ex, ex.d_key, float(ex.model_bytes[1]))
    return identity(ex.n), mixing, traffic


def metropolis_hastings(ex: Exchange, key: jax.Array) -> Mixing:
    """Each machine averages with all its neighbours in the round's graph, neighbour j's model
    weighted 1 / (1 + max(d_i, d_j)) (d: in-degrees), its own taking the rest; a message
    lost, or a machine dropped, moves that weight to the receiver's own model."""
    n, adj = ex.n, ex.graph.adjacency
    src, dst = all_pairs(n)
    deg = adj.sum(axis=0).astype(jnp.float32)  # adj[j, i]: j sends to i
    edge = adj[src, dst]
    sent = edge & ex.alive[src]
    lost = jax.random.uniform(key, src.shape) < ex.faults.message_loss
    arrived = sent & ex.alive[dst] & ~lost
    w = jnp.where(arrived, 1.0 / (1.0 + jnp.maximum(deg[src], deg[dst])), 0.0)
    own = 1.0 - jax.ops.segment_sum(w, dst, n)
    return Mixing(
        src.astype(jnp.int32), dst.astype(jnp.int32), jnp.where(src == dst, own[dst], w), sent, n
    )


@register("neighbourhood")
def neighbourhood(ex: Exchange):
    """D-PSGD style: G and D averaged with every neighbour, Metropolis-Hastings weights."""
    mixing = metropolis_hastings(ex, ex.g_key)
    return mixing, mixing, peer_traffic(ex, mixing, mixing)


@register("swap_d")
def swap_d(ex: Exchange):
    """MD-GAN style: the discriminators move along a random permutation each round (machine
    j's D goes to machine perm[j]); a machine whose incoming D is lost, or that is dropped,
    keeps its own. Generators stay local, or with ``protocol.average_g=true`` are averaged
    by a server as in federated."""
    n, alive = ex.n, ex.alive
    perm_key, loss_key = jax.random.split(ex.d_key)
    i = jnp.arange(n)
    target = jax.random.permutation(perm_key, n)
    lost = jax.random.uniform(loss_key, (n,)) < ex.faults.message_loss
    sent = alive & (target != i)
    delivered = sent & alive[target] & ~lost
    receives = jnp.zeros(n, bool).at[target].set(delivered)
    d_mix = normalise(
        jnp.concatenate([i, i]),
        jnp.concatenate([i, target]),
        jnp.concatenate([~receives, delivered]),
        jnp.concatenate([jnp.zeros(n, bool), sent]),
        n,
    )
    if ex.option("average_g", False):
        g_mix, server = server_average(ex, ex.g_key, float(ex.model_bytes[0]))
        peer = peer_traffic(ex, identity(n), d_mix)
        traffic = server.replace(
            sent=server.sent + peer.sent, received=server.received + peer.received
        )
        return g_mix, d_mix, traffic.replace(lost=server.lost + peer.lost)
    return identity(n), d_mix, peer_traffic(ex, identity(n), d_mix)


def best_couple(n: int, best: int | jax.Array) -> Mixing:
    """The paper's closing suggestion as a mixing: every machine takes machine ``best``'s
    model (W's column ``best`` all ones); ``best`` sends it to the N - 1 others."""
    src = jnp.full((n,), best, jnp.int32)
    dst = jnp.arange(n, dtype=jnp.int32)
    return Mixing(src, dst, jnp.ones(n, jnp.float32), src != dst, n)


def round_mixing(
    protocol: str,
    key: jax.Array,
    n: int,
    model_bytes: tuple[int, int],
    faults: Faults = Faults(),  # noqa: B008 (frozen, immutable)
    active: jax.Array | None = None,
    topology: TopologySpec = TopologySpec(),  # noqa: B008 (frozen, immutable)
    r: jax.Array | int = 0,
    options: tuple[tuple[str, Any], ...] = (),
) -> tuple[Mixing, Mixing, Traffic]:
    """The G mixing, the D mixing and the traffic of round ``r``.

    ``model_bytes``: bytes of one G and of one D message (everything that is mixed).
    ``active`` [N] bool: machines taking part at all (others are treated as dropped).
    """
    proto = get(protocol)
    drop_key, g_key, d_key = jax.random.split(key, 3)
    alive = jax.random.uniform(drop_key, (n,)) >= faults.node_drop
    if active is not None:
        alive = alive & active
    if not proto.mixes or n == 1:
        return identity(n), identity(n), no_traffic(n)
    r = jnp.asarray(r, jnp.int32)
    graph = round_graph(topology, n, r, jax.random.fold_in(key, TOPOLOGY_STREAM))
    ex = Exchange(g_key, d_key, r, alive, graph, faults, tuple(model_bytes), tuple(options))
    return proto.mixing(ex)


def gap_draws(n: int) -> int:
    """Rounds drawn to estimate E[W] at N machines, 64 N within [256, 8192]: a choice of
    probability 1/N each round (the star's hub picking one leaf) is then seen about 64 times
    up to N = 128 (at 256 draws and N = 100 a few leaves are never picked, their rows look
    like no mixing, and the gap reads 0); the cap bounds the cost at large N."""
    return min(max(256, 64 * n), 8192)


def expected_mixing(
    protocol: str,
    n: int,
    topology: TopologySpec = TopologySpec(),  # noqa: B008 (frozen, immutable)
    faults: Faults = Faults(),  # noqa: B008 (frozen, immutable)
    draws: int | None = None,
    key: jax.Array | None = None,
    options: tuple[tuple[str, Any], ...] = (),
) -> np.ndarray:
    """E[W] [N, N] (float64) of G's mixing, averaged over ``draws`` rounds (their keys and
    indices; default :func:`gap_draws`). Chunks of rounds are summed into one [N, N] float32
    sum each, and the chunks in float64, so that a gap of 1e-3 is not lost to rounding."""
    key = jax.random.key(0) if key is None else key
    draws = gap_draws(n) if draws is None else draws
    chunk = min(draws, 64)

    @jax.jit
    def chunk_sum(start):
        def add(r, acc):
            k = jax.random.fold_in(key, r)
            g_mix, _, _ = round_mixing(protocol, k, n, (1, 1), faults, None, topology, r, options)
            return g_mix.add_to(acc)

        stop = jnp.minimum(start + chunk, draws)
        return jax.lax.fori_loop(start, stop, add, jnp.zeros((n, n), jnp.float32))

    total = np.zeros((n, n), np.float64)
    for start in range(0, draws, chunk):
        total += np.asarray(chunk_sum(jnp.int32(start)), np.float64)
    return total / draws


def spectral_gap(w) -> float:
    """1 - |lambda_2| of a mixing matrix: how fast repeated mixing reaches consensus (1 for
    an exact average, 0 for none)."""
    moduli = np.sort(np.abs(np.linalg.eigvals(np.asarray(w, np.float64))))[::-1]
    return float(1.0 - moduli[1]) if len(moduli) > 1 else 1.0


# The topology's draws come from the exchange key folded with this constant, apart from the
# protocol's own (drop, G, D) split.
TOPOLOGY_STREAM = 0x7090


# Leaves with more values per machine than this are mixed block by block (see mix_dense).
MIX_BLOCK = 1 << 20


def mix_dense(mixing: Mixing, tree: PyTree, block: int = MIX_BLOCK) -> PyTree:
    """new_i = sum_j W[i, j] old_j for every float leaf, with einsums.

    A zero weight never lets a non-finite model in (0 * nan would), and a machine that only
    keeps its own model keeps it exactly. A leaf larger than ``block`` values per machine is
    mixed in place, a block of its second axis at a time: block b of the result needs only
    block b of every machine, so the temporaries are one block, not a copy of the leaf. The
    product is exact float32 on every backend (TF32 would round every model at every exchange).
    """
    w = mixing.matrix()
    keep = jnp.diagonal(w) == 1.0

    def mixed(x):
        finite = jnp.where(jnp.isfinite(x), x, 0)
        y = jnp.einsum("ij,j...->i...", w, finite, precision=jax.lax.Precision.HIGHEST)
        y = y.astype(x.dtype)
        return jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x, y)

    def leaf(x):
        if not _is_float(x):
            return x
        if x.ndim < 2 or x[0].size <= block:
            return mixed(x)
        a, rest = x.shape[1], x[0, 0].size
        rows = max([d for d in range(1, a + 1) if a % d == 0 and d * rest <= block] or [1])

        def body(b, x):
            part = jax.lax.dynamic_slice_in_dim(x, b * rows, rows, axis=1)
            return jax.lax.dynamic_update_slice_in_dim(x, mixed(part), b * rows, axis=1)

        return jax.lax.fori_loop(0, x.shape[1] // rows, body, x)

    return jax.tree.map(leaf, tree)


def mix_gather(mixing: Mixing, tree: PyTree) -> PyTree:
    """The same mixing in gather form: gather senders, weight, sum into receivers."""

    def leaf(x):
        if not _is_float(x):
            return x
        w = mixing.weight.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
        sent = jnp.where(w > 0, w * x[mixing.src], 0)  # a lost message carries nothing, not nan
        return jax.ops.segment_sum(sent, mixing.dst, mixing.n)

    return jax.tree.map(leaf, tree)


# Up to this N, ``auto`` mixes in dense form. Its 2N flops per parameter stay far below a
# round's (the paper model: about 1,350 per parameter per step, so under 1% of a K = 200
# round up to N = 1,000), and XLA writes its einsum leaf by leaf into the donated buffers,
# while the gather form's [E, ...] messages of the largest leaf (2 GiB at N = 100) do not.
DENSE_MAX_N = 512


def mix(mixing: Mixing, tree: PyTree, form: str = "auto") -> PyTree:
    """Apply a mixing in the requested form; ``auto`` is dense up to ``DENSE_MAX_N``
    machines, and gathers above it when there are few messages (gossip)."""
    if form == "auto":
        few = mixing.src.shape[0] <= 2 * mixing.n
        form = "gather" if few and mixing.n > DENSE_MAX_N else "dense"
    return mix_dense(mixing, tree) if form == "dense" else mix_gather(mixing, tree)


def _is_float(x) -> bool:
    return jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)


def tree_bytes(tree: PyTree) -> int:
    """Bytes of the float leaves of one machine's tree (what a message carries)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if _is_float(x))
