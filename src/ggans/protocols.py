"""Communication protocols as row-stochastic mixing of the stacked replicas.

A round's exchange is a list of messages, ``src -> dst`` with a weight, self-messages
included, so that every machine's weights into it sum to 1. The same list gives the dense
form (an N x N matrix applied with einsum) and the gather form (gather senders, weight,
``segment_sum`` into receivers): O(N^2 P) against O(E P) work for P parameters.

Faults are part of the mixing: a dropped machine neither sends nor receives this round,
and a lost message is sent but not received. Both leave rows summing to 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

PROTOCOLS = ("standalone", "federated", "gossip", "gossip_ind")
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
        return jnp.zeros((self.n, self.n), jnp.float32).at[self.dst, self.src].add(self.weight)


class Traffic(struct.PyTreeNode):
    """Bytes moved in one round: per machine sent / received [N], and the server's totals."""

    sent: jax.Array
    received: jax.Array
    server_in: jax.Array
    server_out: jax.Array
    dropped: jax.Array  # machines that missed this exchange
    lost: jax.Array  # messages sent but not received


def _normalise(src, dst, valid, sent, n) -> Mixing:
    counts = jax.ops.segment_sum(valid.astype(jnp.float32), dst, n)
    weight = valid.astype(jnp.float32) / counts[dst]
    return Mixing(src.astype(jnp.int32), dst.astype(jnp.int32), weight, sent, n)


def _alive(key: jax.Array, n: int, faults: Faults) -> jax.Array:
    return jax.random.uniform(key, (n,)) >= faults.node_drop


def identity(n: int) -> Mixing:
    i = jnp.arange(n)
    return _normalise(i, i, jnp.ones(n, bool), jnp.zeros(n, bool), n)


def gossip_mixing(key: jax.Array, n: int, alive: jax.Array, faults: Faults) -> Mixing:
    """Every machine sends to one uniformly drawn other machine; receivers average what
    arrived with their own model (equal weights). Senders keep their own."""
    if n == 1:
        return identity(n)
    peer_key, loss_key = jax.random.split(key)
    i = jnp.arange(n)
    target = (i + 1 + jax.random.randint(peer_key, (n,), 0, n - 1)) % n
    sent = alive
    delivered = sent & alive[target] & (jax.random.uniform(loss_key, (n,)) >= faults.message_loss)
    return _normalise(
        jnp.concatenate([i, i]),
        jnp.concatenate([i, target]),
        jnp.concatenate([jnp.ones(n, bool), delivered]),
        jnp.concatenate([jnp.zeros(n, bool), sent]),
        n,
    )


def federated_mixing(key: jax.Array, n: int, alive: jax.Array, faults: Faults):
    """A server averages the models it received and sends the average back.

    Returns the mixing (receiver j gets the server's average iff its download arrived) and
    the per-machine masks of uploads and downloads that arrived, for accounting.
    """
    up_key, down_key = jax.random.split(key)
    up = alive & (jax.random.uniform(up_key, (n,)) >= faults.message_loss)
    down = alive & (jax.random.uniform(down_key, (n,)) >= faults.message_loss) & up.any()
    src = jnp.tile(jnp.arange(n), n)  # e = j * n + i: j receives i
    dst = jnp.repeat(jnp.arange(n), n)
    valid = jnp.where(down[dst], up[src], src == dst)
    return _normalise(src, dst, valid, jnp.zeros(n * n, bool), n), up, down


def round_mixing(
    protocol: str,
    key: jax.Array,
    n: int,
    model_bytes: tuple[int, int],
    faults: Faults = Faults(),  # noqa: B008 (frozen, immutable)
    active: jax.Array | None = None,
) -> tuple[Mixing, Mixing, Traffic]:
    """The G mixing, the D mixing and the traffic of one round.

    ``model_bytes``: bytes of one G and of one D message (everything that is mixed).
    ``active`` [N] bool: machines taking part at all (others are treated as dropped).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r}: must be one of {', '.join(PROTOCOLS)}")
    drop_key, g_key, d_key = jax.random.split(key, 3)
    alive = _alive(drop_key, n, faults)
    if active is not None:
        alive = alive & active
    g_bytes, d_bytes = model_bytes
    zeros = jnp.zeros(n, jnp.float32)
    none = jnp.zeros((), jnp.int32)
    if protocol == "standalone" or n == 1:
        return identity(n), identity(n), Traffic(zeros, zeros, none, none, none, none)
    dropped = (~alive).sum()
    if protocol == "federated":
        mixing, uploaded, downloaded = federated_mixing(g_key, n, alive, faults)
        both = float(g_bytes + d_bytes)
        traffic = Traffic(
            sent=alive * both,
            received=downloaded * both,
            server_in=uploaded.sum() * both,
            server_out=downloaded.sum() * both,
            dropped=dropped,
            lost=alive.sum() - uploaded.sum() + (alive & uploaded.any()).sum() - downloaded.sum(),
        )
        return mixing, mixing, traffic
    g_mix = gossip_mixing(g_key, n, alive, faults)
    d_mix = gossip_mixing(d_key if protocol == "gossip_ind" else g_key, n, alive, faults)

    def per_machine(mix: Mixing, nbytes: int):
        sent = jax.ops.segment_sum(mix.sent * float(nbytes), mix.src, n)
        arrived = (mix.weight > 0) & (mix.src != mix.dst)
        return sent, jax.ops.segment_sum(arrived * float(nbytes), mix.dst, n)

    (gs, gr), (ds, dr) = per_machine(g_mix, g_bytes), per_machine(d_mix, d_bytes)
    lost = sum((m.sent & (m.weight == 0)).sum() for m in (g_mix, d_mix))
    return g_mix, d_mix, Traffic(gs + ds, gr + dr, none, none, dropped, lost)


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
