"""The compiled round: K local steps for all N machines (vmap over machines, scan over steps),
then the protocol's exchange; and the loop over rounds.

Keys: round r uses ``fold_in(train_key, r)``, split into one key per machine (then one per
step) and one for the exchange, so a round's randomness depends only on (seed, r) and
resuming from round r reproduces an uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
from flax import struct

from ggans import compression, impls, protocols
from ggans.compression import CompressionSpec
from ggans.data import to_model_range
from ggans.gan import GanSpec, GanState, StepMetrics, train_step
from ggans.protocols import Faults, Traffic
from ggans.topologies import TopologySpec


class Shards(struct.PyTreeNode):
    """The training images, once on the device, and each machine's share of them."""

    images: jax.Array  # [M, 28, 28, 1] uint8, all machines' images
    index: jax.Array  # [N, S] int32, machine i's image indices (rows padded by repetition)
    size: jax.Array  # [N] int32, machine i's true shard size


@dataclass(frozen=True)
class RoundSpec:
    """Everything static about a round."""

    gan: GanSpec = field(default_factory=GanSpec)
    protocol: str = "gossip"  # a name in ggans.protocols.PROTOCOLS
    topology: TopologySpec = field(default_factory=TopologySpec)
    local_steps: int = 200
    faults: Faults = field(default_factory=Faults)
    form: str = "auto"  # mixing form: auto | dense | gather
    mix_optimizer: bool = False
    protocol_options: tuple[tuple[str, object], ...] = ()  # protocol.<name> settings
    compression: CompressionSpec = field(default_factory=CompressionSpec)
    sharding: jax.sharding.Sharding | None = None  # of the replica axis, when sharded
    chunk: int | None = None  # machines trained at once (vmapped); None: all N
    runs: int = 1  # S independent runs (seeds) stacked: S x N replicas, block-diagonal mixing


def stack_shards(parts: list[Shards]) -> Shards:
    """Several runs' shards as one population's: images concatenated, each run's indices
    offset into them, rows padded (by repeating their last index) to the widest."""
    width = max(p.index.shape[1] for p in parts)
    offsets = [0]
    for p in parts[:-1]:
        offsets.append(offsets[-1] + p.images.shape[0])
    index = [
        jnp.pad(p.index, ((0, 0), (0, width - p.index.shape[1])), mode="edge") + o
        for p, o in zip(parts, offsets, strict=True)
    ]
    return Shards(
        jnp.concatenate([p.images for p in parts]),
        jnp.concatenate(index),
        jnp.concatenate([p.size for p in parts]),
    )


class RoundInfo(struct.PyTreeNode):
    """What a round reports: per-machine means over its K steps, traffic, health."""

    metrics: StepMetrics  # each [N]
    traffic: Traffic
    finite: jax.Array  # [N] bool: losses and parameters all finite


def sample_batch(
    images: jax.Array, index: jax.Array, size: jax.Array, key: jax.Array, batch: int
) -> jax.Array:
    """A minibatch drawn uniformly (with replacement) from one machine's shard."""
    j = jax.random.randint(key, (batch,), 0, size)
    return to_model_range(images[index[j]])


def local_steps(
    spec: GanSpec, steps: int, state: GanState, key: jax.Array, images, index, size
) -> tuple[GanState, StepMetrics]:
    """``steps`` local iterations of one machine, as a ``lax.scan``; metrics are [steps]."""

    def body(s, k):
        batch_key, step_key = jax.random.split(k)
        real = sample_batch(images, index, size, batch_key, spec.batch_size)
        return train_step(spec, s, step_key, real)

    return jax.lax.scan(body, state, jax.random.split(key, steps))


def round_keys(train_key: jax.Array, r: int | jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """Per-machine keys [N] and the exchange key of round ``r``."""
    local_key, mix_key = jax.random.split(jax.random.fold_in(train_key, r))
    return jax.random.split(local_key, n), mix_key


def message_bytes(
    state: GanState,
    mix_optimizer: bool,
    compressed: CompressionSpec = CompressionSpec(),  # noqa: B008 (frozen, immutable)
) -> tuple[int, int]:
    """Bytes of one G message and one D message (one machine's mixed leaves, as sent)."""
    if compressed.active:
        return (
            compression.message_bytes(compressed, (state.g_params, state.g_state)),
            compression.message_bytes(compressed, (state.d_params, state.d_state)),
        )
    one = jax.tree.map(lambda x: x[0], state)
    g = protocols.tree_bytes((one.g_params, one.g_state))
    d = protocols.tree_bytes((one.d_params, one.d_state))
    if mix_optimizer:
        g, d = g + protocols.tree_bytes(one.g_opt), d + protocols.tree_bytes(one.d_opt)
    return g, d


def exchange(
    spec: RoundSpec,
    state: GanState,
    key: jax.Array,
    active: jax.Array | None = None,
    r: jax.Array | int = 0,
    start: GanState | None = None,
) -> tuple[GanState, Traffic]:
    """Round ``r``'s exchange on the stacked state; inactive machines are left out.
    ``start``: the state as the round began (what compressed messages are measured from)."""
    n = jax.tree.leaves(state)[0].shape[0]
    g_mix, d_mix, traffic = protocols.round_mixing(
        spec.protocol,
        key,
        n,
        message_bytes(state, spec.mix_optimizer, spec.compression),
        spec.faults,
        active,
        spec.topology,
        r,
        spec.protocol_options,
    )
    if not protocols.get(spec.protocol).mixes or n == 1:
        return state, traffic
    if spec.compression.active:
        mixed = _mix_compressed(spec.compression, state, start, g_mix, d_mix, key)
    else:
        mixed = mix_models(state, g_mix, d_mix, spec.form, spec.mix_optimizer)
    if spec.sharding is not None:  # keep the mixed state sharded like its input
        mixed = jax.lax.with_sharding_constraint(mixed, spec.sharding)
    return mixed, traffic


def mix_models(
    state: GanState,
    g_mix: protocols.Mixing,
    d_mix: protocols.Mixing,
    form: str = "auto",
    mix_optimizer: bool = False,
) -> GanState:
    """G's parameters and collections mixed by ``g_mix``, D's by ``d_mix`` (and the Adam
    states too if ``mix_optimizer``); everything else kept."""
    mix = partial(protocols.mix, form=form)
    g_opt, d_opt = state.g_opt, state.d_opt
    if mix_optimizer:
        g_opt, d_opt = mix(g_mix, g_opt), mix(d_mix, d_opt)
    return state.replace(
        g_params=mix(g_mix, state.g_params),
        g_state=mix(g_mix, state.g_state),
        d_params=mix(d_mix, state.d_params),
        d_state=mix(d_mix, state.d_state),
        g_opt=g_opt,
        d_opt=d_opt,
    )


# Compression's random draws (stochastic rounding) come from the exchange key folded with this.
COMPRESSION_STREAM = 0xC0DE


def _mix_compressed(cspec, state, start, g_mix, d_mix, key) -> GanState:
    """G and D mixed with compressed messages (see :mod:`ggans.compression`)."""
    start = state if start is None else start
    g_key, d_key = jax.random.split(jax.random.fold_in(key, COMPRESSION_STREAM))
    memory = state.exchange or {"g": None, "d": None}
    (g_params, g_state), g_res = compression.mix_tree(
        cspec, g_mix.matrix(), (state.g_params, state.g_state),
        (start.g_params, start.g_state), memory["g"], g_key,
    )  # fmt: skip
    (d_params, d_state), d_res = compression.mix_tree(
        cspec, d_mix.matrix(), (state.d_params, state.d_state),
        (start.d_params, start.d_state), memory["d"], d_key,
    )  # fmt: skip
    return state.replace(
        g_params=g_params,
        g_state=g_state,
        d_params=d_params,
        d_state=d_state,
        exchange={"g": g_res, "d": d_res} if cspec.error_feedback else state.exchange,
    )


def with_exchange_memory(spec: RoundSpec, state: GanState) -> GanState:
    """The state with the zero memory its exchange keeps (error feedback), if any."""
    if not (spec.compression.active and spec.compression.error_feedback):
        return state
    return state.replace(
        exchange={
            "g": compression.residual_like((state.g_params, state.g_state)),
            "d": compression.residual_like((state.d_params, state.d_state)),
        }
    )


def _all_finite(tree) -> jax.Array:
    """[N] bool: every float leaf of machine i finite. ``x - x`` is 0 where ``x`` is finite and
    NaN where not, so one fused pass per leaf decides it (no boolean array, or broadcast zeros,
    of the state's size; no overflow from large finite values)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    per_leaf = [jnp.isfinite(jnp.sum(x - x, axis=tuple(range(1, x.ndim)))) for x in leaves]
    return jnp.stack(per_leaf).all(axis=0)


def train_machines(spec: RoundSpec, state: GanState, keys: jax.Array, shards: Shards):
    """K local steps on every machine: one vmap over all N, or over chunks of ``spec.chunk``
    machines in turn (a ``fori_loop`` updating the stacked state in place), which bounds the
    memory of temporaries at large N (and on XLA's CPU backend, chunks of one machine are the
    fastest). Returns the state and per-machine mean metrics [N]."""
    local = jax.vmap(partial(local_steps, spec.gan, spec.local_steps), in_axes=(0, 0, None, 0, 0))
    n = keys.shape[0]
    c = spec.chunk or n
    if c >= n:
        state, steps = local(state, keys, shards.images, shards.index, shards.size)
        return state, jax.tree.map(lambda x: x.mean(axis=1), steps)
    if n % c:
        raise ValueError(f"chunk={c}: must divide nodes={n}")

    def body(i, carry):
        state, metrics = carry

        def part(x):
            return jax.lax.dynamic_slice_in_dim(x, i * c, c)

        def put(x, y):
            return jax.lax.dynamic_update_slice_in_dim(x, y, i * c, 0)

        new, steps = local(
            jax.tree.map(part, state),
            part(keys),
            shards.images,
            part(shards.index),
            part(shards.size),
        )
        means = jax.tree.map(lambda x: x.mean(axis=1), steps)
        return jax.tree.map(put, state, new), jax.tree.map(put, metrics, means)

    zeros = StepMetrics(*(jnp.zeros(n) for _ in range(4)))
    return jax.lax.fori_loop(0, n // c, body, (state, zeros))


def _round(spec: RoundSpec, state: GanState, shards: Shards, train_key, r, active):
    if spec.runs > 1:
        return _runs_round(spec, state, shards, train_key, r, active)
    n = shards.size.shape[0]
    keys, mix_key = round_keys(train_key, r, n)
    start = state if spec.compression.name == "topk" else None
    state, metrics = train_machines(spec, state, keys, shards)
    finite = _all_finite(state) & _all_finite(metrics)
    state, traffic = exchange(spec, state, mix_key, active & finite, r, start)
    return state, RoundInfo(metrics, traffic, finite)


def _runs_round(spec: RoundSpec, state: GanState, shards: Shards, train_keys, r, active):
    """S runs in one round: their S x N machines train as one stacked population (run s holds
    replicas s N .. s N + N - 1, each with its own round keys), then each run exchanges within
    itself (the block-diagonal mixing), under its own exchange key. The info has a leading
    [S] axis."""
    s = spec.runs
    n = shards.size.shape[0] // s
    keys, mix_keys = jax.vmap(round_keys, in_axes=(0, None, None))(train_keys, r, n)
    start = state if spec.compression.name == "topk" else None
    state, metrics = train_machines(spec, state, keys.reshape(s * n), shards)
    finite = _all_finite(state) & _all_finite(metrics)

    def blocks(x):
        return x.reshape((s, n) + x.shape[1:])

    def one_run(state, key, ok, start):
        return exchange(spec, state, key, ok, r, start)

    mixed, traffic = jax.vmap(one_run)(
        jax.tree.map(blocks, state),
        mix_keys,
        blocks(active & finite),
        None if start is None else jax.tree.map(blocks, start),
    )
    state = jax.tree.map(lambda x: x.reshape((s * n,) + x.shape[2:]), mixed)
    return state, RoundInfo(jax.tree.map(blocks, metrics), traffic, blocks(finite))


# One jitted function per set of compiler options, shared by every run in the process (and one
# compiled program per RoundSpec and shapes).
_jitted: dict[tuple, Callable] = {}


def compiled_round(spec: RoundSpec | None = None) -> Callable:
    """The jitted ``_round(spec, state, shards, train_key, r, active)``, with the compiler
    options of ``spec``'s layer set on its platform; its ``.lower`` is for profiling."""
    options: dict = {}
    if spec is not None:
        impl = impls.get(spec.gan.impl)
        if impl.platforms is None or jax.default_backend() in impl.platforms:
            options = dict(impl.compiler_options)
    key = tuple(sorted(options.items()))
    if key not in _jitted:
        _jitted[key] = jax.jit(
            _round, static_argnums=0, donate_argnums=1, compiler_options=options or None
        )
    return _jitted[key]


def lower_round(state: GanState, shards: Shards, train_key: jax.Array, spec: RoundSpec):
    """The round for ``spec`` lowered for these arguments; ``.compile()`` fills the cache that
    :func:`make_round`'s calls then hit."""
    active = jnp.ones(shards.size.shape, bool)
    return compiled_round(spec).lower(spec, state, shards, train_key, jnp.int32(0), active)


def make_round(spec: RoundSpec):
    """The jitted round ``(state, shards, train_key, r[, active]) -> (state, RoundInfo)``.

    ``active`` [N] bool (default all) marks the machines allowed in the exchange; a machine
    whose parameters or losses turn non-finite is left out of it too. The state's buffers
    are donated: a round updates them in place.
    """

    compiled = compiled_round(spec)

    def round_fn(state, shards, train_key, r, active=None):
        if active is None:
            active = jnp.ones(shards.size.shape, bool)
        return compiled(spec, state, shards, train_key, jnp.asarray(r, jnp.int32), active)

    return round_fn


def iterate_rounds(
    spec: RoundSpec,
    state: GanState,
    shards: Shards,
    train_key: jax.Array,
    rounds: int,
    start: int = 0,
    active: Callable[[], jax.Array | None] = lambda: None,
) -> Iterator[tuple[int, GanState, RoundInfo]]:
    """Run rounds ``start .. rounds - 1``, yielding ``(r, state, info)`` after each.

    The only Python loop of training: it iterates over rounds, never over machines.
    ``active()`` is asked before each round for the machines allowed in the exchange.
    """
    round_fn = make_round(spec)
    for r in range(start, rounds):
        state, info = round_fn(state, shards, train_key, r, active())
        yield r, state, info
