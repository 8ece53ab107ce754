"""One experiment from a :class:`~ggans.config.RunConfig` to a run folder.

Plain Python, no Hydra: usable from a notebook as ``run(cfg, "some/folder")``. Writes
``metrics.jsonl`` (a row per round), ``summary.json`` at the end, and whatever the
evaluator and loggers add.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from ggans import impls, memory
from ggans.checkpoint import Checkpointer
from ggans.config import RunConfig
from ggans.data import load_mnist, pad_shards, split_indices, subsample
from ggans.errors import ConfigError, GGansError
from ggans.progress import progress_bar
from ggans.records import append_jsonl, describe, read_jsonl, write_json
from ggans.replicas import init_replicas, replicas_shape
from ggans.sharding import replica_sharding, replicated
from ggans.training import RoundInfo, Shards, iterate_rounds, lower_round

log = logging.getLogger("ggans")
# may change when a run is resumed (model.impl: the layer set, same function to float rounding)
OPERATIONAL = ("checkpoint_every", "on_nan", "shard", "chunk", "model.impl")
TRAIN_SIGNALS = ("g_loss", "d_loss", "wasserstein", "gradient_penalty")


class Logger(Protocol):
    """Where rows go besides metrics.jsonl (W&B, ...)."""

    def log(self, row: dict[str, Any]) -> None: ...

    def finish(self, summary: dict[str, Any]) -> None: ...


def make_shards(cfg: RunConfig, mnist) -> Shards:
    """Every machine's share of the training images, as device arrays."""
    pool = subsample(mnist.train_labels, cfg.data.fraction, cfg.seed)
    parts = split_indices(mnist.train_labels, cfg.nodes, cfg.data.split, cfg.seed, pool)
    index, size = pad_shards(parts)
    return Shards(jnp.asarray(mnist.train_images), jnp.asarray(index), jnp.asarray(size))


def round_row(r: int, cfg: RunConfig, wall: float, info: RoundInfo, cum: dict) -> dict:
    """metrics.jsonl's row for round ``r`` (0-based; the row says round r + 1)."""
    row: dict[str, Any] = {
        "round": r + 1,
        "iteration": (r + 1) * cfg.local_steps,
        "wall_time": wall,
    }
    for name in TRAIN_SIGNALS:
        row.update(describe(name, getattr(info.metrics, name)))
    cum["sent"] += np.asarray(info.traffic.sent, np.float64)
    cum["received"] += np.asarray(info.traffic.received, np.float64)
    cum["server_in"] += float(info.traffic.server_in)
    cum["server_out"] += float(info.traffic.server_out)
    row.update(describe("bytes_sent", cum["sent"]))
    row.update(describe("bytes_received", cum["received"]))
    row["bytes_sent_total"] = float(cum["sent"].sum())
    row["server_bytes_in"] = cum["server_in"]
    row["server_bytes_out"] = cum["server_out"]
    row["machines_dropped"] = int(info.traffic.dropped)
    row["messages_lost"] = int(info.traffic.lost)
    row["nonfinite_replicas"] = np.flatnonzero(~np.asarray(info.finite)).tolist()
    return row


def _check_same_config(path: Path, cfg: RunConfig) -> None:
    """Refuse to continue a run folder whose saved config differs from ``cfg``."""
    now = {k: v for k, v in _flat(dataclasses.asdict(cfg)).items() if k not in OPERATIONAL}
    if path.exists():
        saved = json.loads(path.read_text())
        for key in sorted(set(saved) | set(now)):
            if saved.get(key) != now.get(key):
                raise ConfigError(
                    f"{key}={now.get(key)!r}: the run folder {path.parent} holds a run with "
                    f"{key}={saved.get(key)!r}; use another folder or the same settings"
                )
    else:
        write_json(path, now)


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def run(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    evaluator: Callable[[Any, jax.Array, int], dict] | str | None = "auto",
    loggers: Sequence[Logger] = (),
    progress: bool | str = "auto",
    resume: bool | str = "auto",
    mnist=None,
) -> dict[str, Any]:
    """Train ``cfg.nodes`` GANs for ``cfg.rounds`` rounds in ``out_dir``; return the summary.

    ``evaluator(state, key, r)`` returns per-round scores to add to the row; ``"auto"``
    builds the MS / FID :class:`~ggans.evaluation.Evaluator` when ``cfg.eval.every > 0``.
    ``resume``: ``"auto"`` continues from the folder's latest checkpoint when there is one
    (a finished run is not redone), ``True`` requires one, ``False`` refuses a used folder.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(out / "checkpoints", cfg.checkpoint_every)
    done = ckpt.latest_round()
    if done is None and resume is True:
        raise GGansError(f"resume=true: no checkpoint in {out / 'checkpoints'}")
    if done is not None and resume is False:
        raise GGansError(
            f"resume=false: {out} already holds a run (checkpoint after round {done}); "
            "use another folder, or resume=auto to continue it"
        )
    _check_same_config(out / "run_config.json", cfg)
    mnist = load_mnist(cfg.data.dir) if mnist is None else mnist
    sharding = replica_sharding(cfg.nodes) if cfg.shard else None
    state_shape = replicas_shape(cfg.model, cfg.nodes, cfg.init)
    memory.check_state_fits(state_shape, mnist.train_images.nbytes, cfg.nodes)
    shards = make_shards(cfg, mnist)
    state = init_replicas(cfg.model, jax.random.key(cfg.seed), cfg.nodes, cfg.init)
    if sharding is not None:
        state = jax.device_put(state, sharding)
        shards = Shards(
            jax.device_put(shards.images, replicated(sharding)),
            jax.device_put(shards.index, sharding),
            jax.device_put(shards.size, sharding),
        )
    train_key = jax.random.fold_in(jax.random.key(cfg.seed), 1)
    eval_key = jax.random.fold_in(jax.random.key(cfg.seed), 2)
    metrics_path = out / "metrics.jsonl"
    cum = {
        "sent": np.zeros(cfg.nodes),
        "received": np.zeros(cfg.nodes),
        "server_in": 0.0,
        "server_out": 0.0,
    }
    excluded = np.zeros(cfg.nodes, bool)
    rows: list[dict] = []
    start = 0
    if done is not None:
        start, state, meta = ckpt.restore(state)
        cum = {k: np.asarray(v) if isinstance(v, list) else v for k, v in meta["cum"].items()}
        excluded = np.asarray(meta["excluded"], bool)
        rows = [r for r in read_jsonl(metrics_path, repair=True) if r["round"] <= start]
        _rewrite_jsonl(metrics_path, rows)
        log.info("%s: resuming after round %d of %d", cfg.name, start, cfg.rounds)
        if start >= cfg.rounds and (out / "summary.json").exists():
            ckpt.close()
            log.info("%s: already finished", cfg.name)
            return json.loads((out / "summary.json").read_text())
    elif metrics_path.exists():
        metrics_path.unlink()  # rows of a run that never reached a checkpoint
    if evaluator == "auto":
        evaluator = None
        if cfg.eval.every:
            from ggans.evaluation import Evaluator

            evaluator = Evaluator(
                cfg.model, mnist.train_images, cfg.eval.samples, cfg.eval.grid_replicas, out
            )
    offset = rows[-1]["wall_time"] if rows else 0.0
    last: dict[str, Any] = rows[-1] if rows else {}
    t0 = time.perf_counter() - offset
    bar = progress_bar(cfg.rounds, initial=start, enabled=progress, desc=cfg.name)
    sizes = np.asarray(shards.size)
    log.info(
        "%s: %d machines, %d rounds of %d steps, shards of %s images",
        cfg.name,
        cfg.nodes,
        cfg.rounds,
        cfg.local_steps,
        sizes.tolist() if cfg.nodes <= 10 else f"{sizes.min()} to {sizes.max()}",
    )
    spec = dataclasses.replace(cfg.round_spec, sharding=sharding)
    spec = memory.fit_round(spec, partial(lower_round, state, shards, train_key), cfg.nodes)
    log.info(
        "%s: layers %s, precision %s, %s machines trained at once",
        cfg.name,
        cfg.model.impl,
        cfg.model.precision,
        spec.chunk or cfg.nodes,
    )
    rounds = iterate_rounds(
        spec, state, shards, train_key, cfg.rounds, start, active=lambda: jnp.asarray(~excluded)
    )
    try:
        for r, state, info in rounds:
            info = jax.device_get(info)
            row = round_row(r, cfg, time.perf_counter() - t0, info, cum)
            is_last = r + 1 == cfg.rounds
            if (
                evaluator is not None
                and cfg.eval.every
                and ((r + 1) % cfg.eval.every == 0 or is_last)
            ):
                row.update(evaluator(state, jax.random.fold_in(eval_key, r), r))
            row["wall_time"] = time.perf_counter() - t0
            bad = row["nonfinite_replicas"]
            excluded[bad] = True
            row["excluded_replicas"] = np.flatnonzero(excluded).tolist()
            append_jsonl(metrics_path, row)
            for logger in loggers:
                logger.log(row)
            last = row
            if ckpt.due(r + 1, is_last):
                ckpt.save(r + 1, state, {"cum": cum, "excluded": excluded})
            bar.update(1)
            bar.set_postfix(_postfix(row), refresh=False)
            log.info(
                "round %d/%d iteration %d %s",
                r + 1,
                cfg.rounds,
                row["iteration"],
                " ".join(f"{k}={v}" for k, v in _postfix(row).items()),
            )
            if bad:
                msg = f"round {r + 1}: machine(s) {bad} have non-finite losses or parameters"
                if cfg.on_nan == "stop" or excluded.all():
                    raise GGansError(f"{msg}; stopping (on_nan=skip would leave them out)")
                log.warning("%s; left out of every exchange from now on (on_nan=skip)", msg)
    finally:
        bar.close()
        ckpt.close()
    grid = getattr(evaluator, "last_grid", None)
    if grid is not None:
        shutil.copyfile(grid, grid.with_name("final.png"))
    wall = time.perf_counter() - t0
    summary = {
        "name": cfg.name,
        "rounds": cfg.rounds,
        "iterations": cfg.iterations,
        "nodes": cfg.nodes,
        "protocol": cfg.protocol,
        "split": cfg.data.split,
        "local_steps": cfg.local_steps,
        "seed": cfg.seed,
        "impl": impls.resolve(cfg.model.impl),
        "precision": cfg.model.precision,
        "wall_time": wall,
        "replica_steps_per_s": cfg.nodes
        * (cfg.iterations - start * cfg.local_steps)
        / max(wall - offset, 1e-9),
        "final": {k: v for k, v in last.items() if k not in ("round", "iteration", "wall_time")},
    }
    write_json(out / "summary.json", summary)
    summary = json.loads((out / "summary.json").read_text())  # plain lists, as saved
    for logger in loggers:
        logger.finish(summary)
    return summary


def _rewrite_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.unlink(missing_ok=True)
    for row in rows:
        append_jsonl(tmp, row)
    if rows:
        tmp.replace(path)
    else:
        path.unlink(missing_ok=True)


def _postfix(row: dict) -> dict[str, str]:
    keys = ("ms_mean", "fid_mean", "g_loss_mean", "d_loss_mean")
    return {k.removesuffix("_mean"): f"{row[k]:.3g}" for k in keys if k in row}
