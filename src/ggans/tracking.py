"""Experiment trackers beside metrics.jsonl (Weights & Biases), chosen by the ``logger`` group."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ggans.config import RunConfig


def make_loggers(
    logger_cfg: dict[str, Any], run_cfg: RunConfig, out_dir: Path, full_config: dict[str, Any]
) -> list:
    """The loggers named by ``logger_cfg`` (``name: none`` gives none)."""
    name = (logger_cfg or {}).get("name", "none")
    if name == "none":
        return []
    raise ValueError(f"logger={name!r}: must be none")
