"""Surviving: kill and resume, determinism, non-finite machines, sharding over devices."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, synthetic_shards, tiny_run_config
from ggans.errors import GGansError
from ggans.gan import GanSpec
from ggans.protocols import Faults
from ggans.replicas import init_replicas
from ggans.run import run
from ggans.runfolder import Checkpointer, append_jsonl, read_jsonl
from ggans.training import RoundSpec, make_round

TINY = GanSpec(arch="tiny", noise_dim=16, batch_size=8)
ARGS = [
    "model=tiny",
    "model.noise_dim=16",
    "model.batch_size=8",
    "nodes=3",
    "protocol=gossip",
    "iterations=12",
    "local_steps=2",
    "eval.every=0",
    "data.fraction=0.01",
    "checkpoint.every=1",
]


def rows_without_time(path):
    return [{k: v for k, v in r.items() if k != "wall_time"} for r in read_jsonl(path)]


def final_state(folder):
    like = init_replicas(TINY, jax.random.key(0), 3)
    ckpt = Checkpointer(folder / "checkpoints")
    step, state, meta = ckpt.restore(like)
    ckpt.close()
    return step, state


def cli(folder, mnist_dir):
    env = dict(os.environ, GGANS_DATA_DIR=str(mnist_dir))
    cmd = [sys.executable, "-m", "ggans", *ARGS, f"hydra.run.dir={folder}"]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.slow  # 40 s; test_faults kills at each write point in CI
def test_killed_run_resumes_to_the_same_result(mnist_dir, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert cli(whole, mnist_dir).wait(timeout=600) == 0
    proc = cli(killed, mnist_dir)
    deadline = time.time() + 600
    while len(read_jsonl(killed / "metrics.jsonl")) < 3 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # a real kill, mid-run
    proc.wait()
    rows_at_kill = len(read_jsonl(killed / "metrics.jsonl"))
    assert 3 <= rows_at_kill < 6, "the kill should land part-way"
    assert not (killed / "summary.json").exists()
    resumed = cli(killed, mnist_dir)
    log, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-2000:]
    assert "resuming after round" in log + err
    a, b = rows_without_time(whole / "metrics.jsonl"), rows_without_time(killed / "metrics.jsonl")
    assert [r["round"] for r in b] == [1, 2, 3, 4, 5, 6]  # no duplicated or missing rounds
    assert a == b
    (sa, state_a), (sb, state_b) = final_state(whole), final_state(killed)
    assert sa == sb == 6
    for x, y in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b), strict=True):
        np.testing.assert_array_equal(x, y)


def small_cfg(**kw):
    return tiny_run_config(**{"model": TINY, **kw})


def test_same_config_and_seed_give_identical_metrics(mnist, tmp_path):
    run(small_cfg(), tmp_path / "a", mnist=mnist, progress=False)
    run(small_cfg(), tmp_path / "b", mnist=mnist, progress=False)
    run(small_cfg(seed=1), tmp_path / "c", mnist=mnist, progress=False)
    a, b = (
        rows_without_time(tmp_path / "a/metrics.jsonl"),
        rows_without_time(tmp_path / "b/metrics.jsonl"),
    )
    assert a == b and len(a) == 2
    assert a != rows_without_time(tmp_path / "c/metrics.jsonl")


def test_nonfinite_machine_stops_the_run_or_is_skipped(mnist, tmp_path):
    blow_up = GanSpec(arch="tiny", noise_dim=16, batch_size=8, g_lr=1e38, d_lr=1e38)
    with pytest.raises(GGansError, match=r"round 1: machine\(s\) \[0, 1\] have non-finite"):
        run(small_cfg(model=blow_up), tmp_path / "stop", mnist=mnist, progress=False)
    row = read_jsonl(tmp_path / "stop/metrics.jsonl")[0]
    assert row["nonfinite_replicas"] == [0, 1]


def test_nonfinite_machine_is_left_out_of_the_exchange():
    n = 4
    shards = synthetic_shards(n, images=16)
    state = init_replicas(TINY, jax.random.key(0), n)
    poisoned = state.replace(d_params=jax.tree.map(lambda x: x.at[2].set(jnp.nan), state.d_params))
    out, info = make_round(RoundSpec(gan=TINY, protocol="federated", local_steps=1))(
        poisoned, shards, jax.random.key(1), 0
    )
    assert np.asarray(info.finite).tolist() == [True, True, False, True]
    kernel = np.asarray(out.d_params["logit"]["kernel"])
    assert np.isfinite(kernel[[0, 1, 3]]).all()  # the NaN machine did not leak into the mean
    np.testing.assert_allclose(kernel[0], kernel[3], rtol=1e-6)


SHARDED = textwrap.dedent("""
    import jax, numpy as np
    from conftest import synthetic_shards
    from ggans.gan import GanSpec
    from ggans.replicas import init_replicas
    from ggans.sharding import replica_sharding, replicated
    from ggans.training import RoundSpec, Shards, make_round
    assert jax.device_count() == 8
    tiny = GanSpec(arch="tiny", noise_dim=16, batch_size=8)
    shards = synthetic_shards(8, images=64)
    sharding = replica_sharding(8)
    outs = {}
    for form in ("dense", "gather"):
        for sharded in (False, True):
            spec = RoundSpec(gan=tiny, protocol="gossip_ind", local_steps=2, form=form,
                             sharding=sharding if sharded else None)
            state = init_replicas(tiny, jax.random.key(0), 8)
            sh = shards
            if sharded:
                state = jax.device_put(state, sharding)
                sh = Shards(jax.device_put(shards.images, replicated(sharding)),
                            jax.device_put(shards.index, sharding),
                            jax.device_put(shards.size, sharding))
            out, info = make_round(spec)(state, sh, jax.random.key(1), 0)
            leaf = out.g_params["Dense_0"]["kernel"]
            if sharded:
                assert len(leaf.sharding.device_set) == 8, leaf.sharding
                assert leaf.addressable_shards[0].data.shape[0] == 1, "not split by machine"
            outs[form, sharded] = (leaf, info.metrics.g_loss)
    for form in ("dense", "gather"):
        for a, b in zip(outs[form, False], outs[form, True]):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    try:
        replica_sharding(12)
    except Exception as err:
        assert "multiple of the 8 devices" in str(err)
    else:
        raise AssertionError("replica_sharding(12) on 8 devices did not fail")
    print("SHARDED-OK")
""")


@pytest.mark.slow  # 45 s: an 8-device host platform in a subprocess
def test_replica_axis_sharded_over_devices():
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT / "src")]),
    )
    out = subprocess.run(
        [sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=600
    )
    assert "SHARDED-OK" in out.stdout, out.stderr[-3000:]


def test_summary_records_the_run(mnist, tmp_path):
    summary = run(small_cfg(), tmp_path / "s", mnist=mnist, progress=False)
    saved = json.loads((tmp_path / "s/summary.json").read_text())
    assert saved["rounds"] == summary["rounds"] == 2
    assert len(saved["final"]["g_loss"]) == 2


def test_faults_are_logged_every_round(mnist, tmp_path):
    """Each row counts the machines that missed the exchange and the messages lost."""
    almost = 1 - 1e-7  # every machine drops out, every round
    run(small_cfg(faults=Faults(node_drop=almost)), tmp_path / "d", mnist=mnist, progress=False)
    rows = read_jsonl(tmp_path / "d/metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["machines_dropped"] == 2 and r["messages_lost"] == 0 for r in rows)
    assert all(r["bytes_sent_total"] == 0 for r in rows)
    run(small_cfg(), tmp_path / "c", mnist=mnist, progress=False)
    clean = read_jsonl(tmp_path / "c/metrics.jsonl")
    assert all(r["machines_dropped"] == 0 and r["messages_lost"] == 0 for r in clean)


def test_truncated_metrics_line_is_repaired(tmp_path):
    """A write cut short (crash, full disk) leaves a partial last line: reading drops it,
    repairing removes it from disk, and the next append starts on a clean line."""
    path = tmp_path / "metrics.jsonl"
    for r in (1, 2):
        append_jsonl(path, {"round": r, "fid_mean": 100.0 / r})
    whole = path.read_bytes()
    with open(path, "ab") as f:
        f.write(b'{"round": 3, "fid_me')
    assert [row["round"] for row in read_jsonl(path)] == [1, 2]
    assert path.read_bytes() != whole  # reading alone leaves the file as it is
    assert [row["round"] for row in read_jsonl(path, repair=True)] == [1, 2]
    assert path.read_bytes() == whole
    append_jsonl(path, {"round": 3, "fid_mean": 33.3})
    assert [row["round"] for row in read_jsonl(path)] == [1, 2, 3]
