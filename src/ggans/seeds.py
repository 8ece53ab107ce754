"""Several seeds in one program: S runs of N machines trained as S x N stacked replicas.

Each run keeps its own folder, data split, initialisation, keys, scores, checkpoints and
loggers, exactly as when run alone (:func:`ggans.run.run`); only the round is shared: one
compile and one program whose exchange is block-diagonal (``RoundSpec.runs``), so no message
crosses runs. On an accelerator this is what fills the device at small N; on a CPU it saves
S - 1 compiles. Trained in chunks of N machines a run's numbers are bit for bit those of the
run alone; with all S x N at once (``chunk=null`` when they fit), XLA may sum the stacked
convolutions in another order, which float rounding and Adam's first steps make visible.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ggans import memory
from ggans.config import RunConfig
from ggans.errors import GGansError
from ggans.progress import log_through, progress_bar
from ggans.run import Interrupted, Logger, Run, _postfix, prepare, run_keys, stop_on_signals
from ggans.training import lower_round, make_round, stack_shards

log = logging.getLogger("ggans")


def run_seeds(
    cfg: RunConfig,
    seeds: Sequence[int],
    out_dirs: Sequence[str | Path],
    *,
    loggers: Callable[[Run], Sequence[Logger]] = lambda run: (),
    evaluator: Any = "auto",
    progress: bool | str = "auto",
    resume: bool | str = "auto",
    mnist=None,
    names: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Train ``cfg`` once per seed, run ``seeds[i]`` named ``names[i]`` (default
    ``{cfg.name}-s{seed}``) in ``out_dirs[i]``, all in one program; return the summaries.
    ``loggers(run)`` gives each run its loggers. Runs already finished are not redone; the
    others must resume from the same round."""
    names = [f"{cfg.name}-s{seed}" for seed in seeds] if names is None else names
    runs: list[Run] = []
    try:
        for seed, out, name in zip(seeds, out_dirs, names, strict=True):
            run = prepare(dataclasses.replace(cfg, seed=seed, name=name), out, resume=resume,
                          mnist=mnist, fit=False)  # fmt: skip
            mnist = run.mnist if run.mnist is not None else mnist
            runs.append(run)
    except BaseException:
        for run in runs:
            run.folder.abandon()
        raise
    todo = [run for run in runs if run.finished is None]
    done = {id(run): run.finished for run in runs if run.finished is not None}
    try:
        if todo:
            for run in todo:
                run.open(evaluator, loggers(run), shared=True)
            done.update(_train_together(todo, progress))
    finally:
        for run in runs:
            run.folder.close()
    return [done[id(run)] for run in runs]


def _train_together(runs: list[Run], progress: bool | str) -> dict[int, dict[str, Any]]:
    starts = {run.start for run in runs}
    if len(starts) > 1:
        raise GGansError(
            f"seeds={len(runs)}: the runs' folders stopped at different rounds "
            f"({sorted(starts)}); resume them one seed at a time (seeds=1)"
        )
    (start,) = starts
    first, s, n = runs[0], len(runs), runs[0].cfg.nodes
    cfg = first.cfg
    state = jax.tree.map(lambda *xs: jnp.concatenate(xs), *[run.state for run in runs])
    shards = stack_shards([run.shards for run in runs])
    keys = jnp.stack([run_keys(run.cfg.seed)[0] for run in runs])
    spec = dataclasses.replace(first.spec, runs=s, sharding=None)
    spec = memory.fit_round(spec, partial(lower_round, state, shards, keys), s * n)
    round_fn = make_round(spec)
    log.info("%s x%d: %d machines in one program, %s trained at once", cfg.name, s, s * n,
             spec.chunk or s * n)  # fmt: skip
    for run in runs:
        run.state = None  # the population holds them now
    bar = progress_bar(cfg.rounds, initial=start, enabled=progress, desc=f"{cfg.name} x{s}")
    try:
        with log_through(bar), stop_on_signals() as stop:
            for r in range(start, cfg.rounds):
                active = jnp.asarray(np.concatenate([~run.excluded for run in runs]))
                state, info = round_fn(state, shards, keys, r, active)
                for i, run in enumerate(runs):
                    run.state = jax.tree.map(lambda x, i=i: x[i * n : (i + 1) * n], state)
                    row = run.record(r, jax.tree.map(lambda x, i=i: x[i], info))
                bar.set_postfix(_postfix(row), refresh=False)
                bar.update(1)
                if stop.signum and r + 1 < cfg.rounds:
                    for run in runs:
                        run.folder.checkpoint(r + 1, False, run.state, run._meta(), True)
                    raise Interrupted(stop.signum, r + 1, first.folder.path)  # hydra.run.dir
        bar.close()
        return {id(run): run.finish() for run in runs}
    finally:
        bar.close()
