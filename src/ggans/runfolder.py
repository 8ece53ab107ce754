"""The run folder's records: ``metrics.jsonl`` (one row per round) and ``summary.json``.

Each row is appended with a single write and flushed to disk, so a crash or a full disk
leaves at worst a truncated last line, which :func:`read_jsonl` drops (and can repair).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if isinstance(x, np.ndarray | np.generic):
        return x.tolist()
    return x


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """Append one JSON row as one line, in one write, flushed to disk."""
    line = (json.dumps(_plain(row), allow_nan=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: str | os.PathLike, repair: bool = False) -> list[dict]:
    """Rows of a jsonl file, without a truncated last line (removed from disk if ``repair``)."""
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    rows, good = [], 0
    for line in raw.splitlines(keepends=True):
        try:
            if not line.endswith(b"\n"):
                raise ValueError("truncated")
            rows.append(json.loads(line))
        except ValueError:
            break
        good += len(line)
    if repair and good < len(raw):
        with open(path, "r+b") as f:
            f.truncate(good)
    return rows


def write_json(path: str | os.PathLike, obj: dict) -> None:
    """Write a JSON file atomically (write a temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_plain(obj), indent=2, allow_nan=True) + "\n")
    os.replace(tmp, path)


def describe(name: str, values: np.ndarray, extremes: bool = False) -> dict[str, Any]:
    """Per-machine values and their mean and std (and min, max, argmin, argmax if asked)."""
    v = np.asarray(values, np.float64)
    row: dict[str, Any] = {name: v, f"{name}_mean": v.mean(), f"{name}_std": v.std()}
    if extremes:
        row.update({f"{name}_min": v.min(), f"{name}_max": v.max()})
    return row
