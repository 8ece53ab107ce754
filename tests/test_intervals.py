"""Intervals over seeds with machines nested: they cover the truth at about their level,
widen with seed-to-seed variation that machine counts cannot hide, and a paired difference
excludes 0 exactly when the made-up protocols differ."""

from __future__ import annotations

import numpy as np
import pytest

from ggans.intervals import nested_mean, paired_difference


def sweep(rng, mean, seeds=5, machines=10, seed_sd=2.0, machine_sd=1.0):
    """Per-seed lists of per-machine values: a seed effect shared by its machines."""
    return {s: list(mean + rng.normal(0, seed_sd) + rng.normal(0, machine_sd, machines))
            for s in range(seeds)}  # fmt: skip


def test_the_interval_covers_the_true_mean_at_about_95_percent():
    rng = np.random.default_rng(0)
    hits = 0
    trials = 200
    for t in range(trials):
        groups = list(sweep(rng, 50.0, seeds=8).values())
        _, lo, hi = nested_mean(groups, draws=1000, seed=t)
        hits += lo <= 50.0 <= hi
    print(f"\ncoverage of the nested bootstrap, 8 seeds x 10 machines: {hits / trials:.2f}")
    assert 0.85 <= hits / trials <= 0.99  # percentile intervals run a little narrow at 8 seeds


def test_more_machines_do_not_shrink_the_interval_below_the_seed_variation():
    rng = np.random.default_rng(1)
    few = nested_mean(list(sweep(rng, 0, machines=10).values()))
    many = nested_mean(list(sweep(rng, 0, machines=1000).values()))
    naive = 1.0 / np.sqrt(5 * 1000) * 2 * 1.96  # if machines were independent replicates
    assert many[2] - many[1] > 10 * naive  # the seed effect (sd 2) dominates
    assert many[2] - many[1] > 0.5 * (few[2] - few[1])


def test_a_paired_difference_excludes_0_only_for_a_real_difference():
    rng = np.random.default_rng(2)
    base = sweep(rng, 100.0)
    better = {s: [v - 5.0 + rng.normal(0, 1) for v in vs] for s, vs in base.items()}
    same = {s: [v + rng.normal(0, 1) for v in vs] for s, vs in base.items()}
    real = paired_difference(better, base)
    null = paired_difference(same, base)
    print(f"\npaired: -5 made up -> {real['difference']:.2f} [{real['low']:.2f}, "
          f"{real['high']:.2f}]; 0 made up -> {null['difference']:.2f} [{null['low']:.2f}, "
          f"{null['high']:.2f}]")  # fmt: skip
    assert (
        real["excludes_0"] and real["high"] < 0 and real["difference"] == pytest.approx(-5, abs=1)
    )
    assert not null["excludes_0"] and null["low"] < 0 < null["high"]
    assert real["seeds"] == 5


def test_pairing_by_seed_removes_the_shared_seed_effect():
    rng = np.random.default_rng(3)
    base = sweep(rng, 100.0, seed_sd=10.0)
    better = {s: [v - 3.0 for v in vs] for s, vs in base.items()}
    paired = paired_difference(better, base)
    assert paired["excludes_0"]  # unpaired, a seed sd of 10 would swamp a difference of 3
    _, lo_a, hi_a = nested_mean(list(better.values()))
    _, lo_b, hi_b = nested_mean(list(base.values()))
    assert lo_b < hi_a  # the two unpaired intervals overlap


def test_no_common_seed_is_no_comparison():
    out = paired_difference({0: [1.0, 2.0]}, {1: [1.0]})
    assert out["seeds"] == 0 and not out["excludes_0"] and np.isnan(out["difference"])
