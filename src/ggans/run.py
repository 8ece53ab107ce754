"""One experiment from a :class:`~ggans.config.RunConfig` to a run folder.

Plain Python, no Hydra: usable from a notebook as ``run(cfg, "some/folder")``. Writes
``metrics.jsonl`` (a row per round), ``summary.json`` at the end, and whatever the
evaluator and loggers add.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from ggans.config import RunConfig
from ggans.data import load_mnist, pad_shards, split_indices, subsample
from ggans.errors import GGansError
from ggans.progress import progress_bar
from ggans.records import append_jsonl, describe, write_json
from ggans.replicas import init_replicas
from ggans.training import RoundInfo, Shards, iterate_rounds

log = logging.getLogger("ggans")
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
    row["nonfinite_replicas"] = np.flatnonzero(~np.asarray(info.finite)).tolist()
    return row


def run(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    evaluator: Callable[[Any, jax.Array, int], dict] | str | None = "auto",
    loggers: Sequence[Logger] = (),
    progress: bool | str = "auto",
    mnist=None,
) -> dict[str, Any]:
    """Train ``cfg.nodes`` GANs for ``cfg.rounds`` rounds; return the summary.

    ``evaluator(state, key, r)`` returns per-round scores to add to the row; ``"auto"``
    builds the MS / FID :class:`~ggans.evaluation.Evaluator` when ``cfg.eval.every > 0``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mnist = load_mnist(cfg.data.dir) if mnist is None else mnist
    shards = make_shards(cfg, mnist)
    if evaluator == "auto":
        evaluator = None
        if cfg.eval.every:
            from ggans.evaluation import Evaluator

            evaluator = Evaluator(
                cfg.model, mnist.train_images, cfg.eval.samples, cfg.eval.grid_replicas, out
            )
    init_key, train_key, eval_key = jax.random.split(jax.random.key(cfg.seed), 3)
    initial = init_replicas(cfg.model, init_key, cfg.nodes, cfg.init)
    metrics_path = out / "metrics.jsonl"
    cum = {
        "sent": np.zeros(cfg.nodes),
        "received": np.zeros(cfg.nodes),
        "server_in": 0.0,
        "server_out": 0.0,
    }
    last: dict[str, Any] = {}
    start = time.perf_counter()
    bar = progress_bar(cfg.rounds, enabled=progress, desc=cfg.name)
    log.info(
        "%s: %d machines, %d rounds of %d steps, shards of %s images",
        cfg.name,
        cfg.nodes,
        cfg.rounds,
        cfg.local_steps,
        np.asarray(shards.size).tolist(),
    )
    try:
        for r, state, info in iterate_rounds(
            cfg.round_spec, initial, shards, train_key, cfg.rounds
        ):
            info = jax.device_get(info)
            row = round_row(r, cfg, time.perf_counter() - start, info, cum)
            is_last = r + 1 == cfg.rounds
            if (
                evaluator is not None
                and cfg.eval.every
                and ((r + 1) % cfg.eval.every == 0 or is_last)
            ):
                row.update(evaluator(state, jax.random.fold_in(eval_key, r), r))
            row["wall_time"] = time.perf_counter() - start
            append_jsonl(metrics_path, row)
            for logger in loggers:
                logger.log(row)
            last = row
            bar.update(1)
            bar.set_postfix(_postfix(row), refresh=False)
            log.info(
                "round %d/%d iteration %d %s",
                r + 1,
                cfg.rounds,
                row["iteration"],
                " ".join(f"{k}={v}" for k, v in _postfix(row).items()),
            )
            if row["nonfinite_replicas"]:
                raise GGansError(
                    f"round {r + 1}: replica(s) {row['nonfinite_replicas']} have non-finite "
                    "losses or parameters; stopping"
                )
    finally:
        bar.close()
    grid = getattr(evaluator, "last_grid", None)
    if grid is not None:
        shutil.copyfile(grid, grid.with_name("final.png"))
    summary = {
        "name": cfg.name,
        "rounds": cfg.rounds,
        "iterations": cfg.iterations,
        "nodes": cfg.nodes,
        "protocol": cfg.protocol,
        "wall_time": time.perf_counter() - start,
        "replica_steps_per_s": cfg.nodes * cfg.iterations / (time.perf_counter() - start),
        "final": {k: v for k, v in last.items() if k not in ("round", "iteration", "wall_time")},
    }
    write_json(out / "summary.json", summary)
    for logger in loggers:
        logger.finish(summary)
    return summary


def _postfix(row: dict) -> dict[str, str]:
    keys = ("ms_mean", "fid_mean", "g_loss_mean", "d_loss_mean")
    return {k.removesuffix("_mean"): f"{row[k]:.3g}" for k in keys if k in row}
