"""95% intervals over seeds, with machines nested within seeds (a two-stage bootstrap).

A run's machines are not independent replicates of a protocol: they share a data split, an
initialisation and (through the exchange) their models, so the unit of replication is the
seed. Each bootstrap draw resamples seeds with replacement, then each drawn seed's machines
with replacement, and takes the mean over seeds of the mean over machines; the interval is
the draws' 2.5th to 97.5th percentiles. With one seed it reflects the machines only, so it
says nothing about seed-to-seed variation (the report marks such rows).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

DRAWS = 4000
LEVEL = 0.95


def _padded(groups: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    sizes = np.array([len(g) for g in groups])
    values = np.full((len(groups), max(sizes)), np.nan)
    for i, g in enumerate(groups):
        values[i, : len(g)] = g
    return values, sizes


def _resampled_means(groups, seeds_idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[D] mean over the drawn seeds ``seeds_idx`` [D, S] of the mean of resampled machines."""
    values, sizes = _padded(groups)
    d, s = seeds_idx.shape
    m = values.shape[1]
    machines = np.floor(rng.random((d, s, m)) * sizes[seeds_idx][..., None]).astype(int)
    picked = values[seeds_idx[..., None], machines]  # [D, S, M]
    within = np.arange(m)[None, None, :] < sizes[seeds_idx][..., None]
    per_seed = np.where(within, picked, 0).sum(-1) / sizes[seeds_idx]
    return per_seed.mean(-1)


def nested_mean(
    groups: Sequence[Sequence[float]], draws: int = DRAWS, seed: int = 0
) -> tuple[float, float, float]:
    """(mean over seeds of the machines' mean, interval low, high) of per-seed lists of
    per-machine values."""
    groups = [list(g) for g in groups if len(g)]
    if not groups:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    point = float(np.mean([np.mean(g) for g in groups]))
    seeds_idx = rng.integers(0, len(groups), (draws, len(groups)))
    means = _resampled_means(groups, seeds_idx, rng)
    lo, hi = np.quantile(means, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return point, float(lo), float(hi)


def paired_difference(
    a: Mapping[int, Sequence[float]],
    b: Mapping[int, Sequence[float]],
    draws: int = DRAWS,
    seed: int = 0,
) -> dict[str, float | int | bool]:
    """A minus B, paired by seed (same seed: same data split and initialisation), over the
    seeds both have: the mean of per-seed differences of machine means, its interval (seeds
    resampled together for A and B, machines within each), and whether it excludes 0."""
    common = sorted(set(a) & set(b))
    if not common:
        nan = float("nan")
        return {"difference": nan, "low": nan, "high": nan, "seeds": 0, "excludes_0": False}
    ga, gb = [list(a[s]) for s in common], [list(b[s]) for s in common]
    rng = np.random.default_rng(seed)
    seeds_idx = rng.integers(0, len(common), (draws, len(common)))
    diffs = _resampled_means(ga, seeds_idx, rng) - _resampled_means(gb, seeds_idx, rng)
    lo, hi = np.quantile(diffs, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    point = float(np.mean([np.mean(x) - np.mean(y) for x, y in zip(ga, gb, strict=True)]))
    return {
        "difference": point,
        "low": float(lo),
        "high": float(hi),
        "seeds": len(common),
        "excludes_0": bool(lo > 0 or hi < 0),
    }
