"""A run folder and its bookkeeping: settings, records, checkpoints, resume and summary.

``run_config.json``: the settings that change what the run computes (a resume must match).
``metrics.jsonl``: one row per round, each appended with a single write and flushed, so a
crash or a full disk leaves at worst a truncated last line, which :func:`read_jsonl` drops
(and can repair). ``checkpoints/``: orbax checkpoints of the whole stacked state with the
round counter and the cumulative traffic; keys need no saving, since round r's randomness is
``fold_in(key, r)``. ``summary.json``: written last.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from ggans.config import OPERATIONAL, RunConfig, flat
from ggans.errors import ConfigError, GGansError
from ggans.gan import GanState


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


class Checkpointer:
    """Saves every ``every`` rounds (and when asked), keeps the last two, restores the latest."""

    def __init__(self, directory: str | Path, every: int = 1) -> None:
        self.every = every
        options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)

    def latest_round(self) -> int | None:
        """Rounds completed by the latest checkpoint, or None."""
        return self.manager.latest_step()

    def due(self, rounds_done: int, last: bool) -> bool:
        return last or (self.every > 0 and rounds_done % self.every == 0)

    def save(self, rounds_done: int, state: GanState, meta: dict[str, Any]) -> None:
        """Save after ``rounds_done`` rounds; ``meta`` is JSON (cumulative traffic, ...)."""
        self.manager.save(
            rounds_done,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(_plain(meta))
            ),
        )
        self.manager.wait_until_finished()

    def restore(self, like: GanState) -> tuple[int, GanState, dict[str, Any]]:
        """The latest checkpoint, restored with the shapes, dtypes and shardings of ``like``."""
        step = self.manager.latest_step()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        return step, out["state"], dict(out["meta"])

    def close(self) -> None:
        self.manager.close()


# run_config.json keys of folders written before the config tree took the dataclasses' shape
_RENAMED = {
    "protocol": "protocol.name",
    "mix_optimizer": "protocol.mix_optimizer",
    "mixing_form": "mixing.form",
    "checkpoint_every": "checkpoint.every",
}


@dataclasses.dataclass
class Resumed:
    """Where a resumed run stands: rounds done, state, cumulative traffic, excluded machines,
    and the rows up to that round."""

    round: int
    state: GanState
    cum: dict[str, Any]
    excluded: np.ndarray
    rows: list[dict]


class RunFolder:
    """One run's folder: checks before anything is written, then records as the run goes."""

    def __init__(self, path: str | Path, cfg: RunConfig) -> None:
        self.path = Path(path)
        self.cfg = cfg
        self.metrics = self.path / "metrics.jsonl"
        self.settings = {k: v for k, v in flat(cfg).items() if k not in OPERATIONAL}
        self._ckpt: Checkpointer | None = None

    @property
    def checkpoints(self) -> Checkpointer:
        if self._ckpt is None:
            self.path.mkdir(parents=True, exist_ok=True)
            self._ckpt = Checkpointer(self.path / "checkpoints", self.cfg.checkpoint.every)
        return self._ckpt

    def done_rounds(self) -> int | None:
        """Rounds of the latest checkpoint, or None (reads only: makes no folder)."""
        if not (self.path / "checkpoints").is_dir():
            return None
        return self.checkpoints.latest_round()

    def check(self, resume: bool | str) -> int | None:
        """Refuse a resume that cannot be (``resume`` true without a checkpoint, false with
        one, other settings than the folder's); return the rounds to resume after, or None."""
        done = self.done_rounds()
        if done is None and resume is True:
            raise GGansError(f"resume=true: no checkpoint in {self.path / 'checkpoints'}")
        if done is not None and resume is False:
            raise GGansError(
                f"resume=false: {self.path} already holds a run (checkpoint after round "
                f"{done}); use another folder, or resume=auto to continue it"
            )
        saved = self.path / "run_config.json"
        if saved.exists():
            old = {_RENAMED.get(k, k): v for k, v in json.loads(saved.read_text()).items()}
            # a key added since the folder was written counts as saved with its default
            old = {**flat(RunConfig()), **old}
            old = {k: v for k, v in old.items() if k not in OPERATIONAL}
            for key in sorted(set(old) | set(self.settings)):
                if old.get(key) != self.settings.get(key):
                    raise ConfigError(
                        f"{key}={self.settings.get(key)!r}: the run folder {self.path} holds a "
                        f"run with {key}={old.get(key)!r}; use another folder or the same "
                        "settings"
                    )
        return done

    def begin(self) -> None:
        """Write the settings, and drop rows of a run that never reached a checkpoint."""
        self.path.mkdir(parents=True, exist_ok=True)
        if not (self.path / "run_config.json").exists():
            write_json(self.path / "run_config.json", self.settings)
        if self.done_rounds() is None:
            self.metrics.unlink(missing_ok=True)

    def restore(self, like: GanState) -> Resumed:
        """The latest checkpoint, and metrics.jsonl cut back to its round."""
        start, state, meta = self.checkpoints.restore(like)
        cum = {k: np.asarray(v) if isinstance(v, list) else v for k, v in meta["cum"].items()}
        rows = [r for r in read_jsonl(self.metrics, repair=True) if r["round"] <= start]
        _rewrite_jsonl(self.metrics, rows)
        return Resumed(start, state, cum, np.asarray(meta["excluded"], bool), rows)

    def summary(self) -> dict[str, Any] | None:
        path = self.path / "summary.json"
        return json.loads(path.read_text()) if path.exists() else None

    def record(self, row: dict[str, Any]) -> None:
        append_jsonl(self.metrics, row)

    def checkpoint(self, rounds_done: int, last: bool, state: GanState, meta: dict) -> None:
        if self.checkpoints.due(rounds_done, last):
            self.checkpoints.save(rounds_done, state, meta)

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Write summary.json; return it as saved (plain lists)."""
        write_json(self.path / "summary.json", summary)
        return json.loads((self.path / "summary.json").read_text())

    def close(self) -> None:
        if self._ckpt is not None:
            self._ckpt.close()


def _rewrite_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.unlink(missing_ok=True)
    for row in rows:
        append_jsonl(tmp, row)
    if rows:
        tmp.replace(path)
    else:
        path.unlink(missing_ok=True)
