"""One experiment from a :class:`~ggans.config.RunConfig` to a run folder.

Plain Python, no Hydra: usable from a notebook as ``run(cfg, "some/folder")``. In parts:
:func:`prepare` checks everything and builds the state (writing nothing), :meth:`Run.train`
loops over rounds, :meth:`Run.record` keeps each round's books, :meth:`Run.finish` writes
the summary. The folder's files are :mod:`ggans.runfolder`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import signal
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from ggans import datasets, impls, memory, protocols, training
from ggans.config import RunConfig
from ggans.data import Images, pad_shards, subsample
from ggans.errors import GGansError
from ggans.gan import GanState
from ggans.partitions import histogram, split_indices
from ggans.progress import log_through, progress_bar
from ggans.replicas import init_replicas, replicas_shape
from ggans.runfolder import NULL_MEANS, RunFolder, describe, write_json
from ggans.sharding import replica_sharding, replicated
from ggans.training import (
    RoundInfo,
    RoundSpec,
    Shards,
    iterate_rounds,
    lower_round,
    message_bytes,
)

log = logging.getLogger("ggans")
TRAIN_SIGNALS = ("g_loss", "d_loss", "wasserstein", "gradient_penalty")


class Logger(Protocol):
    """Where rows go besides metrics.jsonl (W&B, ...)."""

    def log(self, row: dict[str, Any]) -> None: ...

    def finish(self, summary: dict[str, Any]) -> None: ...


def deal(cfg: RunConfig, images: Images) -> list[np.ndarray]:
    """Every machine's training-image indices (``data.fraction`` of them, dealt by
    ``data.split``)."""
    labels = images.train_labels
    pool = subsample(labels, cfg.data.fraction, cfg.seed)
    classes = datasets.classes(cfg.data.name, images)
    return split_indices(labels, cfg.nodes, cfg.data.split, cfg.seed, pool, classes, cfg.data)


def make_shards(cfg: RunConfig, images: Images, parts: list[np.ndarray] | None = None) -> Shards:
    """Every machine's share of the training images (``parts``, default :func:`deal`'s), as
    device arrays."""
    index, size = pad_shards(deal(cfg, images) if parts is None else parts)
    return Shards(jnp.asarray(images.train_images), jnp.asarray(index), jnp.asarray(size))


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


Evaluator = Callable[[Any, jax.Array, int], dict]


def run_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """The training and the scoring keys of a run (the state's is ``key(seed)`` itself)."""
    root = jax.random.key(seed)
    return jax.random.fold_in(root, 1), jax.random.fold_in(root, 2)


def prepare(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    resume: bool | str = "auto",
    mnist=None,
    fit: bool = True,
) -> Run:
    """Lock the folder, check it, the data and the memory, and build (or restore) the state
    and the round. Nothing else is written, and a refused run leaves no trace (a folder it
    made is removed). ``resume``: ``"auto"`` continues from the folder's latest checkpoint when
    there is one, ``True`` requires one, ``False`` refuses a used folder. ``mnist``: the
    dataset's images, when already loaded. ``fit=False`` skips compiling the round (for
    :func:`ggans.seeds.run_seeds`, which compiles one round for all its runs)."""
    folder = RunFolder(out_dir, cfg)
    folder.lock()
    try:
        return _prepare(cfg, folder, resume, mnist, fit)
    except BaseException:
        folder.abandon()
        raise


def _real_stats(images: np.ndarray) -> None:
    from ggans.evaluation import cache_dir
    from ggans.metrics import real_stats

    real_stats(images, cache_dir=cache_dir())


def _prepare(cfg: RunConfig, folder: RunFolder, resume: bool | str, mnist, fit: bool) -> Run:
    done = folder.check(resume)
    summary = folder.summary()
    if done is not None and done >= cfg.rounds and summary is not None:
        return Run(cfg, folder, finished=summary)  # nothing to load, build or compile
    impls.warm_up(cfg.model.impl)  # e.g. the CPU plug-in's kernel build, beside the loading
    mnist = datasets.load(cfg.data.name, cfg.data.dir) if mnist is None else mnist
    if cfg.eval.every:  # the real-data statistics, beside the round's compilation
        impls.in_background(partial(_real_stats, mnist.train_images), "ggans-real-stats")
    shape = tuple(int(d) for d in mnist.train_images.shape[1:])
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, image_shape=shape))
    sharding = replica_sharding(cfg.nodes) if cfg.shard else None
    state_shape = replicas_shape(cfg.model, cfg.nodes, cfg.init)
    memory.check_state_fits(state_shape, mnist.train_images.nbytes, cfg.nodes)
    parts = deal(cfg, mnist)
    shards = make_shards(cfg, mnist, parts)
    classes = datasets.classes(cfg.data.name, mnist)
    labels = histogram(mnist.train_labels, parts, classes)
    state = init_replicas(cfg.model, jax.random.key(cfg.seed), cfg.nodes, cfg.init)
    state = training.with_exchange_memory(cfg.round_spec, state)
    if sharding is not None:
        state = jax.device_put(state, sharding)
        shards = Shards(
            jax.device_put(shards.images, replicated(sharding)),
            jax.device_put(shards.index, sharding),
            jax.device_put(shards.size, sharding),
        )
    train_key = run_keys(cfg.seed)[0]
    spec = dataclasses.replace(cfg.round_spec, sharding=sharding)
    if fit:
        spec = memory.fit_round(spec, partial(lower_round, state, shards, train_key), cfg.nodes)
    return Run(cfg, folder, mnist, shards, state, spec, resumed=done, labels=labels)


@dataclasses.dataclass
class Run:
    """A prepared run: its folder, data, state and round, ready to :meth:`train`."""

    cfg: RunConfig
    folder: RunFolder
    mnist: Any = None
    shards: Shards | None = None
    state: GanState | None = None
    spec: RoundSpec | None = None
    resumed: int | None = None  # rounds of the checkpoint to continue from
    finished: dict[str, Any] | None = None  # the summary of a run that is already done
    labels: np.ndarray | None = None  # [N, classes] each machine's label histogram

    def train(
        self,
        *,
        evaluator: Evaluator | str | None = "auto",
        loggers: Sequence[Logger] = (),
        progress: bool | str = "auto",
    ) -> dict[str, Any]:
        """Train the remaining rounds; return the summary (a finished run is not redone)."""
        cfg = self.cfg
        if self.finished is not None:
            self.folder.close()
            log.info("%s: already finished; outputs in %s", cfg.name, self.folder.path)
            return self.finished
        self.open(evaluator, loggers)
        train_key, _ = run_keys(cfg.seed)
        rounds = iterate_rounds(
            self.spec,
            self.state,
            self.shards,
            train_key,
            cfg.rounds,
            self.start,
            active=lambda: jnp.asarray(~self.excluded),
        )
        bar = progress_bar(cfg.rounds, initial=self.start, enabled=progress, desc=cfg.name)
        try:
            with log_through(bar), stop_on_signals() as stop:
                for r, state, info in rounds:
                    self.state = state
                    row = self.record(r, info)
                    bar.set_postfix(_postfix(row), refresh=False)
                    bar.update(1)
                    if stop.signum and r + 1 < cfg.rounds:
                        self.folder.checkpoint(r + 1, False, self.state, self._meta(), True)
                        raise Interrupted(stop.signum, r + 1, self.folder.path)
            bar.close()
            return self.finish()
        finally:
            bar.close()
            self.folder.close()

    def open(
        self,
        evaluator: Evaluator | str | None = "auto",
        loggers: Sequence[Logger] = (),
        shared: bool = False,
    ):
        """Write the settings, restore the latest checkpoint (if resuming) and set up the
        books: what :meth:`record` and :meth:`finish` need. ``shared``: the run trains in a
        program with others (``seeds=``), which says itself how many machines train at once."""
        cfg = self.cfg
        self.folder.begin()
        self._write_labels()
        self.cum = {
            "sent": np.zeros(cfg.nodes),
            "received": np.zeros(cfg.nodes),
            "server_in": 0.0,
            "server_out": 0.0,
        }
        self.excluded = np.zeros(cfg.nodes, bool)
        rows: list[dict] = []
        self.start = 0
        if self.resumed is not None:
            back = self.folder.restore(self.state)
            self.start, self.state, self.cum, self.excluded = (
                back.round,
                back.state,
                back.cum,
                back.excluded,
            )
            rows = back.rows
            log.info("%s: resuming after round %d of %d", cfg.name, self.start, cfg.rounds)
        self.evaluator = self._evaluator(evaluator)
        self.loggers = loggers
        self.offset = rows[-1]["wall_time"] if rows else 0.0
        self.last: dict[str, Any] = rows[-1] if rows else {}
        self.t0 = time.perf_counter() - self.offset
        sizes = np.asarray(self.shards.size)
        log.info(
            "%s: %d machines, %d rounds of %d steps, shards of %s images; layers %s, "
            "precision %s%s",
            cfg.name,
            cfg.nodes,
            cfg.rounds,
            cfg.local_steps,
            sizes.tolist() if cfg.nodes <= 10 else f"{sizes.min()} to {sizes.max()}",
            cfg.model.impl,
            cfg.model.precision,
            "" if shared else f", {self.spec.chunk or cfg.nodes} machines trained at once",
        )
        self.eval_key = run_keys(cfg.seed)[1]

    def _evaluator(self, evaluator: Evaluator | str | None) -> Evaluator | None:
        if evaluator != "auto":
            return evaluator
        if not self.cfg.eval.every:
            return None
        from ggans.evaluation import Evaluator as Scores

        e = self.cfg.eval
        return Scores(
            self.cfg.model, self.mnist.train_images, e.samples, e.grid_replicas, self.folder.path
        )

    def record(self, r: int, info: RoundInfo) -> dict[str, Any]:
        """Round ``r``'s books: its row (scores when due) to metrics.jsonl and the loggers,
        the checkpoint when due, and the non-finite machines stopped or left out."""
        cfg = self.cfg
        info = jax.device_get(info)
        row = round_row(r, cfg, time.perf_counter() - self.t0, info, self.cum)
        is_last = r + 1 == cfg.rounds
        if (
            self.evaluator is not None
            and cfg.eval.every
            and ((r + 1) % cfg.eval.every == 0 or is_last)
        ):
            row.update(self.evaluator(self.state, jax.random.fold_in(self.eval_key, r), r))
        row["wall_time"] = time.perf_counter() - self.t0
        bad = row["nonfinite_replicas"]
        new = [i for i in bad if not self.excluded[i]]
        self.excluded[bad] = True
        row["excluded_replicas"] = np.flatnonzero(self.excluded).tolist()
        self.folder.record(row)
        for logger in self.loggers:
            logger.log(row)
        self.last = row
        if is_last and getattr(self.evaluator, "last_grid", None) is not None:
            grid = self.evaluator.last_grid  # final.png before the last checkpoint: a resumed
            shutil.copyfile(grid, grid.with_name("final.png"))  # run finds it there
        self.folder.checkpoint(r + 1, is_last, self.state, self._meta())
        log.info(
            "round %d/%d iteration %d %s",
            r + 1,
            cfg.rounds,
            row["iteration"],
            " ".join(f"{k}={v}" for k, v in _postfix(row).items()),
        )
        if new:
            msg = f"round {r + 1}: machine(s) {new} have non-finite losses or parameters"
            if cfg.on_nan == "stop":
                raise GGansError(f"{msg}; stopping (on_nan=skip would leave them out)")
            if self.excluded.all():
                raise GGansError(f"{msg}; every machine has now failed, stopping")
            log.warning("%s; left out of every exchange from now on (on_nan=skip)", msg)
        return row

    def _best_couple(self) -> dict[str, Any]:
        """The paper's closing suggestion, after the last round: every machine takes the G and
        D of the machine with the lowest FID (among those still training), as a mixing; the
        result is scored as in evaluation (samples/best_couple.png). The trained state and its
        checkpoint are left as they are."""
        fid = np.array([np.inf if v is None else v for v in self.last["fid"]], np.float64)
        fid[self.excluded] = np.inf
        best = int(np.argmin(fid))
        mixing = protocols.best_couple(self.cfg.nodes, best)
        couple = training.mix_models(self.state, mixing, mixing)
        key = jax.random.fold_in(self.eval_key, self.cfg.rounds)
        scores = self.evaluator(couple, key, self.cfg.rounds, grid="best_couple")
        g, d = message_bytes(self.state, False)
        return {
            "machine": best,
            "bytes_sent": float(mixing.sent.sum()) * (g + d),
            **{k: v for k, v in scores.items() if k.split("_")[0] in ("fid", "ms")},
        }

    def _write_labels(self) -> None:
        """labels.json, once: each machine's label histogram [N, classes]."""
        path = self.folder.path / "labels.json"
        if path.exists():
            return
        write_json(
            path,
            {"split": self.cfg.data.split, "classes": self.labels.shape[1], "counts": self.labels},
        )

    def _meta(self) -> dict[str, Any]:
        return {"cum": self.cum, "excluded": self.excluded}

    def finish(self) -> dict[str, Any]:
        """summary.json, and the loggers' last word. Idempotent: a run resumed after its last
        round was recorded (killed before finishing) finishes the same way."""
        cfg = self.cfg
        wall = self.last.get("wall_time", time.perf_counter() - self.t0)
        final = {k: v for k, v in self.last.items() if k not in ("round", "iteration", "wall_time")}
        excluded = np.flatnonzero(self.excluded).tolist()
        if excluded:  # means over the machines still training
            final.update(_means_over(final, ~self.excluded))
        summary = {
            "name": cfg.name,
            "rounds": cfg.rounds,
            "iterations": cfg.iterations,
            "nodes": cfg.nodes,
            "protocol": cfg.protocol.name,
            "split": cfg.data.split,
            "local_steps": cfg.local_steps,
            "seed": cfg.seed,
            "impl": impls.resolve(cfg.model.impl),
            "precision": cfg.model.precision,
            "wall_time": wall,
            # every recorded round, across resumes: wall_time is cumulative
            "replica_steps_per_s": cfg.nodes * cfg.iterations / max(wall, 1e-9),
            "excluded_replicas": excluded,
            "final": final,
        }
        if excluded:
            summary["means_over"] = "the machines not excluded; " + NULL_MEANS
        summary["spectral_gap"] = protocols.spectral_gap(
            protocols.expected_mixing(
                cfg.protocol.name, cfg.nodes, cfg.topology, cfg.faults,
                options=cfg.round_spec.protocol_options,
            )
        )  # fmt: skip
        if cfg.protocol.best_couple:
            summary["best_couple"] = self._best_couple()
        summary = self.folder.finish(summary)
        for logger in self.loggers:
            logger.finish(summary)
        return summary


def _means_over(row: dict[str, Any], keep: np.ndarray) -> dict[str, float]:
    """``<key>_mean`` and ``_std`` of every per-machine list in ``row``, over ``keep``."""
    out = {}
    for key, values in row.items():
        if isinstance(values, list | np.ndarray) and len(values) == len(keep):
            if f"{key}_mean" not in row:
                continue
            v = np.asarray([np.nan if x is None else x for x in values], np.float64)[keep]
            out[f"{key}_mean"], out[f"{key}_std"] = float(v.mean()), float(v.std())
    return out


class Interrupted(GGansError):
    """A run stopped by SIGINT or SIGTERM after recording (and checkpointing) a round."""

    def __init__(self, signum: int, rounds: int, folder: Path) -> None:
        name = signal.Signals(signum).name
        super().__init__(
            f"{name}: stopped after round {rounds}, its checkpoint saved; run the same command "
            f"(hydra.run.dir={folder}) to resume"
        )
        self.exit_code = 128 + signum


class _Stop:
    signum: int = 0


@contextlib.contextmanager
def stop_on_signals():
    """SIGINT and SIGTERM ask the run to stop after the round in progress (a second SIGINT
    stops at once); the old handlers come back afterwards. In the main thread only."""
    stop = _Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.signum = signum
        log.warning("%s: stopping after the round in progress", signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    evaluator: Evaluator | str | None = "auto",
    loggers: Sequence[Logger] = (),
    progress: bool | str = "auto",
    resume: bool | str = "auto",
    mnist=None,
) -> dict[str, Any]:
    """Train ``cfg.nodes`` GANs for ``cfg.rounds`` rounds in ``out_dir``; return the summary.

    ``evaluator(state, key, r)`` returns per-round scores to add to the row; ``"auto"``
    builds the MS / FID :class:`~ggans.evaluation.Evaluator` when ``cfg.eval.every > 0``.
    ``resume`` as in :func:`prepare`.
    """
    session = prepare(cfg, out_dir, resume=resume, mnist=mnist)
    return session.train(evaluator=evaluator, loggers=loggers, progress=progress)


def _postfix(row: dict) -> dict[str, str]:
    keys = ("ms_mean", "fid_mean", "g_loss_mean", "d_loss_mean")
    return {k.removesuffix("_mean"): f"{row[k]:.3g}" for k in keys if k in row}
