"""A run's settings as plain, validated dataclasses: the core never sees Hydra.

:func:`from_dict` turns a resolved Hydra config (or any nested dict) into a :class:`RunConfig`,
raising :class:`~ggans.errors.ConfigError` with one line naming the bad key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ggans import impls
from ggans.data import SPLITS
from ggans.errors import ConfigError
from ggans.gan import LOSSES, GanSpec
from ggans.models import ARCHS, PRECISIONS
from ggans.protocols import FORMS, PROTOCOLS, Faults
from ggans.replicas import INITS
from ggans.training import RoundSpec


@dataclass(frozen=True)
class DataConfig:
    split: str = "iid"
    dir: str | None = None
    fraction: float = 1.0


@dataclass(frozen=True)
class EvalConfig:
    every: int = 1
    samples: int = 1000
    grid_replicas: int = 8


@dataclass(frozen=True)
class RunConfig:
    """One experiment: N machines, a protocol, K and I, data, model, evaluation."""

    nodes: int = 10
    protocol: str = "gossip"
    local_steps: int = 200
    iterations: int = 20000
    seed: int = 0
    init: str = "shared"
    mix_optimizer: bool = False
    mixing_form: str = "auto"
    model: GanSpec = field(default_factory=GanSpec)
    data: DataConfig = field(default_factory=DataConfig)
    faults: Faults = field(default_factory=Faults)
    eval: EvalConfig = field(default_factory=EvalConfig)
    name: str = "run"
    checkpoint_every: int = 10  # rounds between checkpoints (and always at the end); 0: end only
    on_nan: str = "stop"  # stop | skip (leave a non-finite machine out of every exchange)
    shard: bool = True  # split the machine axis over all devices when there are several
    chunk: int | None = None  # machines trained at once; None: all (bounds memory at large N)

    @property
    def rounds(self) -> int:
        return self.iterations // self.local_steps

    @property
    def round_spec(self) -> RoundSpec:
        return RoundSpec(
            gan=self.model,
            protocol=self.protocol,
            local_steps=self.local_steps,
            faults=self.faults,
            form=self.mixing_form,
            mix_optimizer=self.mix_optimizer,
            chunk=self.chunk,
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


def _build(cls, key: str, values: dict | None):
    values = dict(values or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}: unknown key (allowed: {', '.join(sorted(names))})")
    return cls(**values)


def validate(cfg: RunConfig) -> RunConfig:
    """Check every value and combination; return ``cfg`` unchanged or raise ConfigError."""
    _int("nodes", cfg.nodes, 1)
    _choice("protocol", cfg.protocol, PROTOCOLS)
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
    _choice("mixing.form", cfg.mixing_form, FORMS)
    _choice("data.split", cfg.data.split, SPLITS)
    if not isinstance(cfg.data.fraction, int | float) or not 0 < cfg.data.fraction <= 1:
        raise ConfigError(f"data.fraction={cfg.data.fraction!r}: must be in (0, 1]")
    m = cfg.model
    _choice("model.arch", m.arch, tuple(ARCHS))
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
    _int("checkpoint.every", cfg.checkpoint_every, 0)
    _choice("on_nan", cfg.on_nan, ("stop", "skip"))
    if cfg.chunk is not None and (_int("chunk", cfg.chunk, 1) and cfg.nodes % cfg.chunk):
        raise ConfigError(f"chunk={cfg.chunk}: must divide nodes ({cfg.nodes}), or be null")
    return cfg


def from_dict(d: dict) -> RunConfig:
    """A validated RunConfig from a resolved config dict (Hydra's, as a plain container)."""
    d = dict(d)
    protocol = dict(d.pop("protocol", {}) or {})
    mixing = dict(d.pop("mixing", {}) or {})
    checkpoint = dict(d.pop("checkpoint", {}) or {})
    for key in ("logger", "progress", "hydra", "resume", "distributed"):
        d.pop(key, None)
    try:
        cfg = RunConfig(
            nodes=d.pop("nodes", 10),
            protocol=protocol.get("name", "gossip"),
            local_steps=d.pop("local_steps", 200),
            iterations=d.pop("iterations", 20000),
            seed=d.pop("seed", 0),
            init=d.pop("init", "shared"),
            mix_optimizer=bool(protocol.get("mix_optimizer", False)),
            mixing_form=mixing.get("form", "auto"),
            model=_build(GanSpec, "model", d.pop("model", None)),
            data=_build(DataConfig, "data", d.pop("data", None)),
            faults=_build(Faults, "faults", d.pop("faults", None)),
            eval=_build(EvalConfig, "eval", d.pop("eval", None)),
            name=d.pop("name", "run"),
            checkpoint_every=checkpoint.get("every", 10),
            on_nan=d.pop("on_nan", "stop"),
            shard=d.pop("shard", True),
            chunk=d.pop("chunk", None),
        )
    except TypeError as err:
        raise ConfigError(f"config: {err}") from None
    if d:
        raise ConfigError(f"{sorted(d)[0]}: unknown key")
    cfg = validate(cfg)
    model = dataclasses.replace(cfg.model, impl=impls.resolve(cfg.model.impl))
    return dataclasses.replace(cfg, model=model)
