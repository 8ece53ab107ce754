"""Checkpoint and resume with orbax: the whole stacked state plus the round counter and the
cumulative traffic. Keys need no saving: round r's randomness is ``fold_in(key, r)``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from ggans.gan import GanState


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
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(_jsonable(meta))
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


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, np.ndarray | np.generic):
        return x.tolist()
    return x
