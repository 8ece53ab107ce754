"""Runs that cannot fit in memory: the chunk chosen from XLA's memory analysis, or one line."""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial

import jax
import pytest

from conftest import ROOT, synthetic_shards
from ggans import memory
from ggans.errors import ConfigError
from ggans.gan import GanSpec
from ggans.replicas import init_replicas, replicas_shape
from ggans.training import RoundSpec, lower_round

TINY = GanSpec(arch="tiny", noise_dim=16, batch_size=8, impl="patches")
N = 4


@pytest.fixture(scope="module")
def lower():
    state = init_replicas(TINY, jax.random.key(0), N)
    return partial(lower_round, state, synthetic_shards(N, 32), jax.random.key(1))


def _need(lower, chunk):
    stats = lower(RoundSpec(gan=TINY, local_steps=2, chunk=chunk)).compile().memory_analysis()
    resident = stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
    return resident + stats.temp_size_in_bytes


@pytest.mark.slow  # 30 s: three compiles of the round
def test_the_largest_chunk_that_fits_is_chosen(lower):
    spec = RoundSpec(gan=TINY, local_steps=2)
    whole, half, one = _need(lower, None), _need(lower, 2), _need(lower, 1)
    assert whole > half > one  # temporaries grow with the machines trained at once
    assert memory.fit_round(spec, lower, N, budget=whole).chunk is None
    assert memory.fit_round(spec, lower, N, budget=whole - 1).chunk == 2
    assert memory.fit_round(spec, lower, N, budget=half - 1).chunk == 1
    with pytest.raises(
        ConfigError, match=r"^nodes=4: the round needs about .* GiB .* fewer nodes="
    ):
        memory.fit_round(spec, lower, N, budget=one - 1)


@pytest.mark.slow  # 26 s on 2 cores
def test_an_explicit_chunk_is_checked_not_changed(lower):
    spec = RoundSpec(gan=TINY, local_steps=2, chunk=2)
    assert memory.fit_round(spec, lower, N, budget=_need(lower, 2)).chunk == 2
    with pytest.raises(ConfigError, match=r"^chunk=2: the round needs .* a smaller chunk="):
        memory.fit_round(spec, lower, N, budget=_need(lower, 1) + 1)


def test_a_state_too_large_is_refused_before_anything_is_allocated():
    paper = GanSpec(arch="paper")
    shape = replicas_shape(paper, 400)
    per_machine = memory.tree_bytes(shape) / 400
    assert 150e6 < per_machine < 200e6  # 14.1 M parameters and two Adam moments, float32
    budget = 20 * memory.GiB
    with pytest.raises(
        ConfigError, match=r"^nodes=400: the machines' state alone needs 59\.\d GiB"
    ):
        memory.check_state_fits(shape, 0, 400, budget)
    fits = int(budget // per_machine)
    with pytest.raises(ConfigError, match=rf"nodes={fits} or fewer would fit"):
        memory.check_state_fits(shape, 0, 400, budget)
    memory.check_state_fits(shape, 0, 400, 60 * memory.GiB)  # fits: no error


def test_the_headline_command_stops_with_one_line_when_memory_is_short(mnist_dir, tmp_path):
    env = dict(os.environ, GGANS_MEMORY_GIB="8", GGANS_DATA_DIR=str(mnist_dir))
    cmd = [sys.executable, "-m", "ggans", "nodes=100", f"hydra.run.dir={tmp_path}/run"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("ggans: error: nodes=100: the machines' state alone needs 1")
    assert "Traceback" not in out.stderr
