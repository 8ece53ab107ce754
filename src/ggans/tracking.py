"""Experiment trackers beside metrics.jsonl (Weights & Biases), chosen by the ``logger`` group.

``logger=none`` (the default) logs nothing besides the run folder. ``logger=wandb`` logs,
per run: the resolved config, every round's row (scalars against ``iteration``, with
``round`` as a second x-axis; per-machine values as histograms), the latest sample grid on
evaluation rounds, and the summary at the end. Runs are named after the run (e.g.
``gossip_ind-N100-iid-s0``), grouped by experiment (``logger.group``: by default the experiment),
with the protocol as job type and tags for protocol, N, split and K, so that a dashboard
grouped by job type compares protocols per N at a glance.

The mode comes from ``logger.mode`` (default: ``$WANDB_MODE``, else ``online``). Online
without an API key, or without a route to the W&B server, falls back to ``offline`` with
one warning; an offline run is a folder ``<run>/wandb/offline-run-*`` that ``wandb sync``
uploads later. W&B never stops training: any error it raises is reported once and W&B is
left out for the rest of the run.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ggans.config import RunConfig

log = logging.getLogger("ggans")

MODES = ("online", "offline", "disabled")
# Quantities whose per-machine values are logged as a histogram (the rest: summary stats).
PER_MACHINE = ("ms", "fid", "fid_pool", "g_loss", "d_loss", "wasserstein", "bytes_sent")
ID_FILE = "wandb_run_id"


def make_loggers(
    logger_cfg: dict[str, Any], run_cfg: RunConfig, out_dir: Path, full_config: dict[str, Any]
) -> list:
    """The loggers named by ``logger_cfg`` (``name: none`` gives none)."""
    cfg = dict(logger_cfg or {})
    name = cfg.get("name", "none")
    if name == "none":
        return []
    if name == "wandb":
        logger = WandbLogger.start(cfg, run_cfg, Path(out_dir), full_config)
        return [] if logger is None else [logger]
    raise ValueError(f"logger={name!r}: must be one of none, wandb")


def wandb_labels(cfg: dict[str, Any], run_cfg: RunConfig) -> dict[str, Any]:
    """``wandb.init``'s project, group, job type, tags and name for this run."""
    k = run_cfg.local_steps
    tags = [
        run_cfg.protocol.name,
        f"N{run_cfg.nodes}",
        run_cfg.data.split,
        f"K{k}",
        run_cfg.model.arch,
    ]
    tags += [str(t) for t in cfg.get("tags") or [] if str(t) not in tags]
    return {
        "project": cfg.get("project") or "ggans",
        "entity": cfg.get("entity") or None,
        "group": cfg.get("group") or "adhoc",
        "job_type": cfg.get("job_type") or run_cfg.protocol.name,
        "tags": tags,
        "name": run_cfg.name,
    }


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``url``'s host opens within ``timeout`` seconds."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def _online_problem(wandb) -> str | None:
    """Why online mode cannot work here (no API key, no route to the server), or None."""
    try:
        if not wandb.login(prompt=False, verify=False):
            return "no API key (set WANDB_API_KEY or run `wandb login`)"
    except Exception as err:  # noqa: BLE001 - any failure means: go offline
        return f"W&B login failed ({err})"
    base = os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url
    if not _reachable(base):
        return f"cannot reach the W&B server {base}"
    return None


def _settings(wandb, init_timeout: float):
    """Quiet settings; the thread start method where this wandb still has one (< 0.19)."""
    common = dict(init_timeout=init_timeout, console="off", silent=True)
    try:
        return wandb.Settings(start_method="thread", **common)
    except Exception:  # noqa: BLE001 - newer wandb: no start_method (always a service)
        return wandb.Settings(**common)


def _plain_value(value: Any) -> bool:
    """A scalar, None, or a list of numbers (per-machine values)."""
    if isinstance(value, list):
        return all(isinstance(v, int | float) for v in value)
    return value is None or isinstance(value, bool | int | float | str)


def _flat_scalars(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat_scalars(value, f"{prefix}{key}/"))
        elif _plain_value(value):
            out[f"{prefix}{key}"] = value
    return out


class WandbLogger:
    """One W&B run per ggans run; implements the Logger protocol of :mod:`ggans.run`."""

    def __init__(self, wandb, run, out_dir: Path) -> None:
        self.wandb, self.run, self.out_dir = wandb, run, out_dir
        self.broken = False

    @classmethod
    def start(
        cls, cfg: dict[str, Any], run_cfg: RunConfig, out_dir: Path, full_config: dict[str, Any]
    ) -> WandbLogger | None:
        """Open the run (falling back to offline, or to no W&B, with one warning)."""
        try:
            import wandb
        except ImportError:
            log.warning("logger=wandb: wandb is not installed; logging to the run folder only")
            return None
        mode = str(cfg.get("mode") or os.environ.get("WANDB_MODE") or "online")
        if mode == "dryrun":
            mode = "offline"
        if mode not in MODES:
            log.warning("logger.mode=%r: must be one of %s; using offline", mode, MODES)
            mode = "offline"
        if mode == "online":
            problem = _online_problem(wandb)
            if problem:
                log.warning(
                    "W&B: %s; logging offline to %s/wandb (upload later: wandb sync %s/wandb)",
                    problem,
                    out_dir,
                    out_dir,
                )
                mode = "offline"
        out_dir.mkdir(parents=True, exist_ok=True)
        id_file = out_dir / ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else None
        config = {k: v for k, v in full_config.items() if k != "hydra"}
        kwargs = dict(
            dir=str(out_dir),
            config=config,
            notes=cfg.get("notes"),
            id=run_id,
            resume="allow" if run_id else None,
            settings=_settings(wandb, float(cfg.get("init_timeout", 60))),
            **wandb_labels(cfg, run_cfg),
        )
        try:
            run = wandb.init(mode=mode, **kwargs)
        except Exception as err:  # noqa: BLE001 - W&B must never stop training
            if mode != "online":
                log.warning("W&B: %s; logging to the run folder only", err)
                return None
            log.warning("W&B: online start failed (%s); logging offline to %s", err, out_dir)
            try:
                run = wandb.init(mode="offline", **kwargs)
            except Exception as err2:  # noqa: BLE001
                log.warning("W&B: %s; logging to the run folder only", err2)
                return None
        if mode != "disabled" and run.id:
            id_file.write_text(run.id + "\n")
        run.define_metric("iteration")
        run.define_metric("round")
        run.define_metric("*", step_metric="iteration")
        return cls(wandb, run, out_dir)

    def _guard(self, what: str, fn, *args) -> None:
        if self.broken:
            return
        try:
            fn(*args)
        except Exception as err:  # noqa: BLE001 - W&B must never stop training
            self.broken = True
            log.warning("W&B: %s failed (%s); W&B is left out for the rest of the run", what, err)

    def log(self, row: dict[str, Any]) -> None:
        self._guard("log", self._log, row)

    def _log(self, row: dict[str, Any]) -> None:
        wandb = self.wandb
        data: dict[str, Any] = {}
        for key, value in row.items():
            if isinstance(value, list):
                if key in PER_MACHINE and value:
                    data[f"{key}/machines"] = wandb.Histogram(value)
            elif isinstance(value, bool | int | float):
                data[key] = value
        data["nonfinite_count"] = len(row.get("nonfinite_replicas", []))
        if "ms_mean" in row or "fid_mean" in row:
            grid = self.out_dir / "samples" / f"round_{int(row['round']):05d}.png"
            if grid.exists():
                data["samples"] = wandb.Image(str(grid), caption=f"iteration {row['iteration']}")
        self.run.log(data)

    def finish(self, summary: dict[str, Any]) -> None:
        self._guard("finish", self._finish, summary)

    def _finish(self, summary: dict[str, Any]) -> None:
        final = self.out_dir / "samples" / "final.png"
        if final.exists():
            self.run.summary["samples/final"] = self.wandb.Image(str(final))
        self.run.summary.update(_flat_scalars(summary))
        self.run.finish()
