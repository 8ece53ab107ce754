"""A run's settings as plain, validated dataclasses: the core never sees Hydra.

:func:`from_dict` turns a resolved Hydra config (or any nested dict) into a :class:`RunConfig`,
raising :class:`~ggans.errors.ConfigError` with one line naming the bad key.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from ggans import compression, datasets, impls, partitions, protocols, topologies
from ggans.compression import CompressionSpec
from ggans.errors import ConfigError
from ggans.gan import LOSSES, GanSpec
from ggans.models import ARCHITECTURES, PRECISIONS
from ggans.protocols import FORMS, Faults
from ggans.replicas import INITS
from ggans.topologies import TopologySpec
from ggans.training import RoundSpec


@dataclass(frozen=True)
class ProtocolConfig:
    name: str = "gossip"  # a registered protocol (ggans.protocols): standalone | federated | ...
    mix_optimizer: bool = False  # also mix Adam states (the paper mixes weights only)
    average_g: bool = False  # swap_d: average the generators (else they stay local)
    best_couple: bool = False  # after the last round every machine takes the best G and D


@dataclass(frozen=True)
class MixingConfig:
    form: str = "auto"  # auto | dense | gather: how the mixing matrix is applied


@dataclass(frozen=True)
class DataConfig(partitions.Params):
    """The dataset, its share used, and how it is dealt (the partitioner's parameters are
    :class:`ggans.partitions.Params`'s)."""

    name: str = (
        "mnist"  # a registered dataset (ggans.datasets): mnist | fashion_mnist | tfds:<name>
    )
    split: str = "iid"  # iid | non_iid (digit i mod 10) | dirichlet | classes | shards | quantity
    dir: str | None = None  # folder of the IDX files; None: $GGANS_DATA_DIR, else tfds
    fraction: float = 1.0  # share of the training images used (before splitting)


@dataclass(frozen=True)
class EvalConfig:
    every: int = 1  # score every this many rounds (and always the last); 0: never
    samples: int = 1000  # generated images per machine
    grid_replicas: int = 8  # machines shown in the sample grid


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 10  # rounds between checkpoints (and always at the end); 0: end only


@dataclass(frozen=True)
class RunConfig:
    """One experiment: N machines, a protocol, K and I, data, model, evaluation.

    The schema of every setting: ``conf/`` and the command line only override these defaults.
    """

    nodes: int = 10  # N, emulated machines
    local_steps: int = 200  # K, local iterations between two exchanges (one round)
    iterations: int = 20000  # I, local iterations per machine; a multiple of K
    seed: int = 0
    init: str = "shared"  # shared | independent: one set of initial weights, or one each
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    topology: TopologySpec = field(default_factory=TopologySpec)
    mixing: MixingConfig = field(default_factory=MixingConfig)
    compression: CompressionSpec = field(default_factory=CompressionSpec)
    model: GanSpec = field(default_factory=GanSpec)
    data: DataConfig = field(default_factory=DataConfig)
    faults: Faults = field(default_factory=Faults)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    name: str = "run"
    on_nan: str = "stop"  # stop | skip (leave a non-finite machine out of every exchange)
    shard: bool = True  # split the machine axis over all devices when there are several
    chunk: int | None = None  # machines trained at once; None: all that fit in memory

    @property
    def rounds(self) -> int:
        return self.iterations // self.local_steps

    @property
    def round_spec(self) -> RoundSpec:
        return RoundSpec(
            gan=self.model,
            protocol=self.protocol.name,
            topology=self.topology,
            local_steps=self.local_steps,
            faults=self.faults,
            form=self.mixing.form,
            mix_optimizer=self.protocol.mix_optimizer,
            protocol_options=(("average_g", self.protocol.average_g),),
            compression=self.compression,
            chunk=self.chunk,
        )


# Keys that do not change what a run computes: they may differ on resume, and runs that differ
# only in them are the same setting to the report and the experiments.
OPERATIONAL = frozenset(
    {"name", "checkpoint.every", "on_nan", "shard", "chunk", "model.impl", "data.dir"}
)


def _choice(key: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: must be one of {', '.join(map(str, allowed))}")


def _int(key: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{key}={value!r}: must be an integer >= {low}")
    return value


def _prob(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ConfigError(f"{key}={value!r}: must be a probability in [0, 1)")
    return float(value)


def validate(cfg: RunConfig) -> RunConfig:
    """Check every value and combination; return ``cfg`` unchanged or raise ConfigError."""
    _int("nodes", cfg.nodes, 1)
    _choice("protocol.name", cfg.protocol.name, protocols.names())
    _int("topology.seed", cfg.topology.seed, 0)
    topologies.check(cfg.topology, cfg.nodes)
    _int("local_steps", cfg.local_steps, 1)
    _int("iterations", cfg.iterations, 1)
    if cfg.local_steps > cfg.iterations:
        raise ConfigError(
            f"local_steps={cfg.local_steps}: must be <= iterations ({cfg.iterations})"
        )
    if cfg.iterations % cfg.local_steps:
        raise ConfigError(
            f"iterations={cfg.iterations}: must be a multiple of local_steps ({cfg.local_steps})"
        )
    _int("seed", cfg.seed, 0)
    _choice("init", cfg.init, INITS)
    _choice("mixing.form", cfg.mixing.form, FORMS)
    compression.check(cfg.compression)
    if cfg.compression.active and cfg.protocol.mix_optimizer:
        raise ConfigError(
            f"compression.name={cfg.compression.name}: compresses models only; set "
            "protocol.mix_optimizer=false"
        )
    if cfg.compression.active and cfg.mixing.form == "gather":
        raise ConfigError(
            f"compression.name={cfg.compression.name}: mixes in dense form; set "
            "mixing.form=auto or dense"
        )
    _choice("data.split", cfg.data.split, partitions.names())
    partitions.check(
        cfg.data.split, cfg.nodes, datasets.get(cfg.data.name).classes or None, cfg.data
    )
    if cfg.protocol.best_couple and not cfg.eval.every:
        raise ConfigError(
            "protocol.best_couple=true: needs scores to pick the best machine; set eval.every >= 1"
        )
    if cfg.eval.every and not datasets.get(cfg.data.name).scored:
        raise ConfigError(
            f"eval.every={cfg.eval.every}: data.name={cfg.data.name!r} has no classifier for MS "
            "and FID; set eval.every=0 to train without scores"
        )
    if not isinstance(cfg.data.fraction, int | float) or not 0 < cfg.data.fraction <= 1:
        raise ConfigError(f"data.fraction={cfg.data.fraction!r}: must be in (0, 1]")
    m = cfg.model
    _choice("model.arch", m.arch, tuple(ARCHITECTURES))
    _choice("model.loss", m.loss, LOSSES)
    _choice("model.impl", m.impl, impls.names())
    impls.check(m.impl)
    _choice("model.precision", m.precision, PRECISIONS)
    _int("model.batch_size", m.batch_size, 1)
    _int("model.noise_dim", m.noise_dim, 1)
    _prob("faults.node_drop", cfg.faults.node_drop)
    _prob("faults.message_loss", cfg.faults.message_loss)
    _int("eval.every", cfg.eval.every, 0)
    _int("eval.samples", cfg.eval.samples, 2)
    _int("eval.grid_replicas", cfg.eval.grid_replicas, 0)
    _int("checkpoint.every", cfg.checkpoint.every, 0)
    _choice("on_nan", cfg.on_nan, ("stop", "skip"))
    if cfg.chunk is not None and (_int("chunk", cfg.chunk, 1) and cfg.nodes % cfg.chunk):
        raise ConfigError(f"chunk={cfg.chunk}: must divide nodes ({cfg.nodes}), or be null")
    return cfg


def build(cls, values: dict | None, key: str = ""):
    """A ``cls`` from a nested dict, its nested dataclasses built the same way; an unknown key
    is one ConfigError naming it and the keys allowed."""
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{key}{unknown[0]}: unknown key (allowed: {', '.join(sorted(names))})")
    for name, value in values.items():
        if dataclasses.is_dataclass(hints[name]) and isinstance(value, dict | None):
            values[name] = build(hints[name], value, f"{key}{name}.")
    try:
        return cls(**values)
    except ValueError as e:  # a dataclass's own check ("loss='x': must be ..."), keyed here
        raise ConfigError(f"{key}{e}") from None


def from_dict(d: dict) -> RunConfig:
    """A validated RunConfig from a nested dict shaped like it (Hydra's, as a plain container;
    ``run_config.json``'s unflattened), the layer set resolved."""
    cfg = validate(build(RunConfig, d))
    model = dataclasses.replace(cfg.model, impl=impls.resolve(cfg.model.impl))
    return dataclasses.replace(cfg, model=model)


def flat(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Every setting under its dotted key (``model.arch``), tuples as lists; fields derived
    from others (``metadata={"derived": True}``, e.g. the image shape) are left out."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        if f.metadata.get("derived"):
            continue
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out.update(flat(v, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = list(v) if isinstance(v, tuple) else v
    return out
