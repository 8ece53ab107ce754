"""W&B logging: disabled and offline modes with a tiny run, the offline fallback, labels."""

from __future__ import annotations

import logging
import subprocess
import sys
import time

import pytest

from ggans.config import DataConfig, EvalConfig, ProtocolConfig, RunConfig
from ggans.gan import GanSpec
from ggans.tracking import WandbLogger, make_loggers, wandb_labels


def tiny_cfg(mnist_dir, **kw) -> RunConfig:
    base = dict(
        nodes=2,
        protocol=ProtocolConfig("federated"),  # the round test_report.py compiles too
        local_steps=2,
        iterations=4,
        model=GanSpec(arch="tiny", noise_dim=32),
        data=DataConfig(dir=str(mnist_dir), fraction=0.01),
        eval=EvalConfig(every=1, samples=16, grid_replicas=2),
        name="federated-N2-iid-s0",
    )
    base.update(kw)
    return RunConfig(**base)


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """No API key, and W&B's own folders inside the test's tmp_path."""
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    return tmp_path


def test_none_gives_no_logger(tmp_path):
    assert make_loggers({"name": "none"}, RunConfig(), tmp_path, {}) == []
    assert make_loggers(None, RunConfig(), tmp_path, {}) == []
    with pytest.raises(ValueError, match="must be one of none, wandb"):
        make_loggers({"name": "tensorboard"}, RunConfig(), tmp_path, {})


def test_labels_group_by_sweep_and_protocol():
    cfg = RunConfig(nodes=100, protocol=ProtocolConfig("gossip_ind"), name="gossip_ind-N100-iid-s0")
    labels = wandb_labels({"group": "scalability", "tags": ["extra", "N100"]}, cfg)
    assert labels["name"] == "gossip_ind-N100-iid-s0"
    assert labels["group"] == "scalability"
    assert labels["job_type"] == "gossip_ind"
    assert labels["tags"] == ["gossip_ind", "N100", "iid", "K200", "paper", "extra"]
    assert wandb_labels({}, cfg)["group"] == "adhoc"


def _run(cfg, out, loggers, mnist):
    from ggans.run import run

    return run(cfg, out, loggers=loggers, progress=False, mnist=mnist)


def test_disabled_mode_tiny_run(mnist_dir, mnist, wandb_env):
    out = wandb_env / "run"
    cfg = tiny_cfg(mnist_dir)
    loggers = make_loggers({"name": "wandb", "mode": "disabled"}, cfg, out, {"nodes": 2})
    assert len(loggers) == 1 and isinstance(loggers[0], WandbLogger)
    summary = _run(cfg, out, loggers, mnist)
    assert summary["nodes"] == 2
    assert not loggers[0].broken
    assert not list(out.glob("wandb/offline-run-*")) and not list(out.glob("wandb/run-*"))


def test_offline_fallback_tiny_run_is_syncable(mnist_dir, mnist, wandb_env, caplog):
    """Online without an API key: one warning, offline; the run folder is one wandb sync takes."""
    out = wandb_env / "run"
    cfg = tiny_cfg(mnist_dir)
    with caplog.at_level(logging.WARNING, logger="ggans"):
        loggers = make_loggers(
            {"name": "wandb", "mode": "online", "group": "test-sweep"},
            cfg,
            out,
            {"nodes": 2, "protocol": {"name": "federated"}},
        )
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "offline" in warnings[0].getMessage() and "API key" in warnings[0].getMessage()
    _run(cfg, out, loggers, mnist)
    assert not loggers[0].broken
    runs = list(out.glob("wandb/offline-run-*"))
    assert len(runs) == 1
    records = list(runs[0].glob("run-*.wandb"))
    assert len(records) == 1
    needles = (b"g_loss_mean", b"fid_mean", b"iteration", b"test-sweep", b"federated-N2-iid-s0")
    # wandb's service process may still be flushing its log when finish() returns (seen on a
    # loaded machine): wait for it, up to a minute
    deadline = time.monotonic() + 60
    while True:
        blob = records[0].read_bytes()
        if all(n in blob for n in needles) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for needle in needles:
        assert needle in blob, needle
    assert (runs[0] / "files" / "media").is_dir()  # the sample grids
    assert (out / "wandb_run_id").read_text().strip() in runs[0].name
    sync = subprocess.run(
        [sys.executable, "-m", "wandb", "sync", "--dry-run", str(runs[0])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert sync.returncode == 0 and "Would sync 1 run" in sync.stdout + sync.stderr, sync


def test_logging_errors_never_stop_training(tmp_path, caplog):
    class Broken:
        def log(self, data):
            raise RuntimeError("network down")

        def finish(self):
            raise RuntimeError("network down")

    logger = WandbLogger(None, Broken(), tmp_path)
    with caplog.at_level(logging.WARNING, logger="ggans"):
        logger.log({"round": 1, "iteration": 2, "g_loss_mean": 0.5})
        logger.log({"round": 2, "iteration": 4, "g_loss_mean": 0.5})
        logger.finish({"final": {}})
    assert logger.broken
    assert len([r for r in caplog.records if "W&B" in r.getMessage()]) == 1
