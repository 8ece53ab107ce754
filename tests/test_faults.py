"""Nothing lost: each failure a demanding user hit (a busy folder, short writes, damaged rows,
records without a checkpoint, a refused resume, a kill before the final writes, signals, bad
data, diverging machines) and what ggans does about it, against an uninterrupted run."""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import os
import shutil
import signal
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, ggans, tiny_run_config
from ggans import run as run_mod
from ggans.config import CheckpointConfig, RunConfig
from ggans.errors import DataError, GGansError
from ggans.gan import GanSpec
from ggans.run import Interrupted, prepare, run
from ggans.runfolder import FolderBusy, FolderLock, append_jsonl, read_jsonl

TINY = GanSpec(arch="tiny", noise_dim=16, batch_size=8, impl="patches")


def cfg(**kw) -> RunConfig:
    return tiny_run_config(
        **{"iterations": 6, "model": TINY, "checkpoint": CheckpointConfig(1), **kw}
    )


def rows_without_time(path):
    return [{k: v for k, v in r.items() if k != "wall_time"} for r in read_jsonl(path)]


@pytest.fixture(scope="module")
def whole(mnist, tmp_path_factory):
    """The uninterrupted run every other run here is compared with."""
    out = tmp_path_factory.mktemp("whole")
    run(cfg(), out, mnist=mnist, progress=False)
    return out


def test_a_busy_folder_is_refused_at_once_naming_the_holder(mnist, tmp_path):
    holder = FolderLock(tmp_path)
    holder.acquire()  # a live run
    try:
        with pytest.raises(FolderBusy, match=rf"another run \(pid {os.getpid()}\)"):
            prepare(cfg(), tmp_path, mnist=mnist)
        assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]  # nothing written
    finally:
        holder.release()
    # a dead run's lock (the file is left, the OS lock is gone) is taken over
    (tmp_path / ".lock").write_text("999999\n")
    session = prepare(cfg(iterations=2), tmp_path, mnist=mnist)
    assert session.train(progress=False)["rounds"] == 1


def test_a_short_write_is_undone_and_stops_with_one_line(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"round": 1})
    before = path.read_bytes()
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, data[:7]) and 0)
    with pytest.raises(GGansError, match="cannot write a row .*the rows before it are kept"):
        append_jsonl(path, {"round": 2, "x": [1.0] * 100})
    assert path.read_bytes() == before


def test_a_damaged_middle_row_is_kept_aside_and_later_rows_survive(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    for r in (1, 2, 3, 4):
        append_jsonl(path, {"round": r})
    lines = path.read_bytes().splitlines(keepends=True)
    lines[1] = b'{"round": 2, "x": [1, 2' + b"\x00" * 8 + b"\n"
    path.write_bytes(b"".join(lines) + b'{"round": 5')  # and a partial last line
    with caplog.at_level(logging.WARNING, logger="ggans"):
        rows = read_jsonl(path, repair=True)
    assert [r["round"] for r in rows] == [1, 3, 4]
    assert [json.loads(x)["round"] for x in path.read_bytes().splitlines()] == [1, 3, 4]
    assert (tmp_path / "metrics.jsonl.corrupt").read_bytes().startswith(b'{"round": 2')
    assert "1 damaged line(s) moved to metrics.jsonl.corrupt" in caplog.text


def test_rows_without_a_checkpoint_are_never_deleted(mnist, tmp_path):
    no_ckpt = cfg(iterations=2, checkpoint=CheckpointConfig(5))
    append_jsonl(tmp_path / "metrics.jsonl", {"round": 1, "note": "an earlier run's"})
    with pytest.raises(GGansError, match="holds rows of a run with no checkpoint"):
        prepare(no_ckpt, tmp_path, mnist=mnist)
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"round": 1, "note": "an earlier run's"}]
    run(no_ckpt, tmp_path, mnist=mnist, progress=False, resume=False)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("metrics.jsonl.")]
    assert len(aside) == 1 and "an earlier run's" in aside[0].read_text()
    assert [r["round"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1]


def test_a_run_killed_before_finishing_finishes_the_same_on_resume(mnist, whole, tmp_path):
    shutil.copytree(whole, tmp_path / "run")
    (tmp_path / "run" / "summary.json").unlink()  # killed after the last checkpoint
    summary = run(cfg(), tmp_path / "run", mnist=mnist, progress=False)
    first = json.loads((whole / "summary.json").read_text())
    assert summary["final"] == first["final"]
    wall = read_jsonl(whole / "metrics.jsonl")[-1]["wall_time"]
    assert summary["replica_steps_per_s"] == pytest.approx(2 * 6 / wall)


class _SignalAfter:
    """A logger that sends this process ``signum`` after round ``r`` is recorded."""

    def __init__(self, signum: int, r: int) -> None:
        self.signum, self.r = signum, r

    def log(self, row):
        if row["round"] == self.r:
            os.kill(os.getpid(), self.signum)

    def finish(self, summary):
        pass


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)]
)
def test_a_signal_stops_after_the_round_with_its_checkpoint_and_resumes_exactly(
    signum, mnist, whole, tmp_path
):
    with pytest.raises(Interrupted) as stopped:
        run(cfg(), tmp_path, mnist=mnist, progress=False, loggers=[_SignalAfter(signum, 1)])
    assert stopped.value.exit_code == 128 + signum
    assert "stopped after round 1, its checkpoint saved" in str(stopped.value)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers given back
    assert [r["round"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1]
    run(cfg(), tmp_path, mnist=mnist, progress=False)
    assert rows_without_time(tmp_path / "metrics.jsonl") == rows_without_time(
        whole / "metrics.jsonl"
    )


def test_a_refused_resume_leaves_every_file_as_it_was(mnist_dir, tmp_path):
    args = ["model=tiny", "iterations=2", "local_steps=2", "eval.every=0", "data.fraction=0.01"]
    first = ggans(f"hydra.run.dir={tmp_path}", "nodes=2", *args, data_dir=mnist_dir)
    assert first.returncode == 0, first.stderr[-2000:]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    again = ggans(f"hydra.run.dir={tmp_path}", "nodes=3", *args, data_dir=mnist_dir)
    assert again.returncode == 2
    assert (
        again.stderr.strip()
        .splitlines()[-1]
        .startswith(f"ggans: error: nodes=3: the run folder {tmp_path} holds a run with nodes=2")
    )
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}

    def kept(files):  # the log and the lock (its holder's pid) are the refused run's own
        return {k: v for k, v in files.items() if not k.endswith(".log") and k != ".lock"}

    assert kept(after) == kept(before) and "config.yaml" in kept(after)


def test_a_corrupt_gzip_is_one_data_error(mnist_dir, tmp_path):
    from ggans.data import load_idx

    for p in mnist_dir.iterdir():
        shutil.copy(p, tmp_path / p.name)
    gz = tmp_path / "train-labels-idx1-ubyte.gz"
    raw = bytearray(gz.read_bytes())
    raw[1000] ^= 0xFF
    gz.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="data.dir: cannot read .*train-labels-idx1-ubyte.gz"):
        load_idx(tmp_path)
    assert gzip  # the files are gzip, as shipped


def test_on_nan_skip_warns_once_and_writes_strict_json(mnist, tmp_path, monkeypatch, caplog):
    real = run_mod.iterate_rounds

    def machine_0_diverges(*args, **kwargs):
        for r, state, info in real(*args, **kwargs):
            metrics = dataclasses.replace(
                info.metrics, g_loss=info.metrics.g_loss.at[0].set(jnp.nan)
            )
            yield r, state, info.replace(metrics=metrics, finite=info.finite.at[0].set(False))

    monkeypatch.setattr(run_mod, "iterate_rounds", machine_0_diverges)
    with caplog.at_level(logging.WARNING, logger="ggans"):
        summary = run(cfg(nodes=3, on_nan="skip"), tmp_path, mnist=mnist, progress=False)
    assert caplog.text.count("left out of every exchange") == 1
    assert "round 1: machine(s) [0]" in caplog.text

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))

    saved = strict((tmp_path / "summary.json").read_text())
    rows = [strict(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["g_loss"][0] is None and rows[-1]["excluded_replicas"] == [0]
    assert saved["excluded_replicas"] == [0] == summary["excluded_replicas"]
    assert np.isfinite(saved["final"]["g_loss_mean"])
    assert saved["final"]["g_loss_mean"] == pytest.approx(np.mean(rows[-1]["g_loss"][1:]))
    assert "null: a non-finite value" in saved["means_over"]


@pytest.mark.parametrize(
    "damage", ["flipped bytes", pytest.param("a missing file", marks=pytest.mark.slow)]
)
def test_a_damaged_checkpoint_is_set_aside_and_the_one_before_resumes(
    damage, mnist, whole, tmp_path, caplog
):
    shutil.copytree(whole, tmp_path / "run")
    (tmp_path / "run" / "summary.json").unlink()
    latest = tmp_path / "run" / "checkpoints" / "3"
    files = sorted((p for p in latest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest = files[-1]
    if damage == "flipped bytes":
        raw = bytearray(biggest.read_bytes())
        mid = len(raw) // 2
        raw[mid : mid + 16] = bytes(b ^ 0x5A for b in raw[mid : mid + 16])
        biggest.write_bytes(bytes(raw))
    else:
        biggest.unlink()
    with caplog.at_level(logging.WARNING, logger="ggans"):
        run(cfg(), tmp_path / "run", mnist=mnist, progress=False)
    assert "checkpoint of round 3 is damaged" in caplog.text
    assert [p.name.split(".")[0] for p in (tmp_path / "run" / "checkpoints").glob("3.corrupt-*")]
    assert rows_without_time(tmp_path / "run" / "metrics.jsonl") == rows_without_time(
        whole / "metrics.jsonl"
    )


def test_no_whole_checkpoint_is_one_line_and_deletes_nothing(mnist, whole, tmp_path):
    shutil.copytree(whole, tmp_path / "run")
    (tmp_path / "run" / "summary.json").unlink()
    for step in (tmp_path / "run" / "checkpoints").iterdir():
        for f in step.rglob("*"):
            if f.is_file() and f.stat().st_size > 1000:
                f.write_bytes(b"\0" * f.stat().st_size)
    with pytest.raises(GGansError, match="no whole checkpoint left"):
        run(cfg(), tmp_path / "run", mnist=mnist, progress=False)
    assert len(list((tmp_path / "run" / "checkpoints").glob("*.corrupt-*"))) == 2
    assert [r["round"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]


@pytest.fixture(scope="module")
def scored_whole(mnist, tmp_path_factory):
    """kill_at.py's run, uninterrupted: the killed runs, resumed, must end exactly like it."""
    from kill_at import config

    out = tmp_path_factory.mktemp("scored_whole")
    run(config(), out, mnist=mnist, progress=False)
    return out


@pytest.mark.parametrize(
    "point",
    [
        "metrics",
        pytest.param("checkpoint_tmp", marks=pytest.mark.slow),
        pytest.param("checkpoint_finalize", marks=pytest.mark.slow),
        pytest.param("final_grid", marks=pytest.mark.slow),
        pytest.param("summary", marks=pytest.mark.slow),
    ],
)
def test_kill_9_at_each_write_point_resumes_to_the_uninterrupted_run(
    point, mnist, mnist_dir, scored_whole, tmp_path
):
    from kill_at import config

    env = dict(os.environ, GGANS_DATA_DIR=str(mnist_dir))
    killed = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "kill_at.py"), point, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "summary.json").exists()
    summary = run(config(), tmp_path, mnist=mnist, progress=False)
    assert rows_without_time(tmp_path / "metrics.jsonl") == rows_without_time(
        scored_whole / "metrics.jsonl"
    )
    first = json.loads((scored_whole / "summary.json").read_text())
    assert summary["final"] == first["final"]
    assert summary["replica_steps_per_s"] > 0
    grid = "samples/final.png"
    assert (tmp_path / grid).read_bytes() == (scored_whole / grid).read_bytes()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "3"]
