"""Scoring the whole population each evaluation round: sample, classify, MS / FID, grids.

Every machine's generator draws ``samples`` images in one compiled pass over the stacked
state (``lax.map`` over machines, or ``vmap`` in chunks); the classifier then scores all
machines' images in one jitted pass (:func:`ggans.metrics.score_population`).
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ggans.gan import GanSpec, GanState, generate
from ggans.metrics import RealStats, real_stats, score_population
from ggans.runfolder import describe

SCORES = {"ms": "max", "fid": "min", "fid_pool": "min", "kid": "min"}  # which end is best


def cache_dir() -> Path:
    """Where real-data statistics are cached: $GGANS_CACHE_DIR or ~/.cache/ggans."""
    return Path(os.environ.get("GGANS_CACHE_DIR") or Path.home() / ".cache" / "ggans")


@partial(jax.jit, static_argnums=(0, 3, 4))
def sample_population(
    spec: GanSpec, state: GanState, key: jax.Array, samples: int, chunk: int | None = None
) -> jax.Array:
    """Images [N, samples, H, W, C] from every machine's generator (eval-mode batch norm).

    Machine i draws its noise from ``split(key, N)[i]``. ``chunk`` machines are vmapped at a
    time (``None``: all at once); XLA's CPU backend prefers 1, accelerators prefer all.
    """
    n = jax.tree.leaves(state.g_params)[0].shape[0]
    keys = jax.random.split(key, n)

    def one(args):
        params, stats, k = args
        z = jax.random.normal(k, (samples, spec.noise_dim))
        return generate(spec, GanState(params, stats, None, None, None, None), z)

    return jax.lax.map(one, (state.g_params, state.g_state, keys), batch_size=chunk or n)


def save_grid(images: np.ndarray, path: Path, columns: int = 8) -> None:
    """A PNG grid: one row per machine, ``columns`` samples each (images in [-1, 1])."""
    from PIL import Image

    rows = images[:, :columns]  # [R, C, H, W, channels]
    pixels = np.clip((rows + 1.0) * 127.5, 0, 255).astype(np.uint8)
    r, c, h, w, channels = pixels.shape
    canvas = np.full((r * (h + 2) + 2, c * (w + 2) + 2, channels), 255, np.uint8)
    for i in range(r):
        for j in range(c):
            y, x = 2 + i * (h + 2), 2 + j * (w + 2)
            canvas[y : y + h, x : x + w] = pixels[i, j]
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = Image.fromarray(canvas[..., 0] if channels == 1 else canvas)
    picture.resize((canvas.shape[1] * 2, canvas.shape[0] * 2), 0).save(path)


class Evaluator:
    """Per-round scores of all machines, and sample grids in ``out_dir/samples``."""

    def __init__(
        self,
        spec: GanSpec,
        train_images: np.ndarray,
        samples: int = 1000,
        grid_replicas: int = 8,
        out_dir: str | Path | None = None,
        chunk: int | None = None,
    ) -> None:
        self.spec, self.samples, self.grid_replicas = spec, samples, grid_replicas
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.chunk = chunk if chunk is not None else (1 if jax.default_backend() == "cpu" else None)
        self.real: RealStats = real_stats(train_images, cache_dir=cache_dir())
        self.last_grid: Path | None = None

    def __call__(
        self, state: GanState, key: jax.Array, r: int, grid: str | None = None
    ) -> dict[str, Any]:
        """Scores of every machine after round ``r`` (0-based); the sample grid goes to
        ``samples/<grid>.png`` (default ``round_<r + 1>``)."""
        images = sample_population(self.spec, state, key, self.samples, self.chunk)
        scores = score_population(images, self.real)
        row: dict[str, Any] = {}
        for name, best in SCORES.items():
            values = scores[name]
            row.update(describe(name, values, extremes=True))
            row[f"{name}_best_replica"] = int(
                np.argmax(values) if best == "max" else np.argmin(values)
            )
        row.update({k: float(scores[k]) for k in ("fid_pooled", "kid_pooled") if k in scores})
        if self.out_dir is not None and self.grid_replicas:
            shown = np.asarray(images[: self.grid_replicas, :8])
            self.last_grid = self.out_dir / "samples" / f"{grid or f'round_{r + 1:05d}'}.png"
            save_grid(shown, self.last_grid)
        return row
