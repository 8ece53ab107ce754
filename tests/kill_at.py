"""Run the fault tests' tiny scored run and kill -9 this process at one write point.

``python tests/kill_at.py POINT OUT`` trains :func:`config` into OUT and sends itself SIGKILL
at POINT, the moment a power cut or the OOM killer could land there:

- ``metrics``: half of round 2's row written to metrics.jsonl;
- ``checkpoint_tmp``: round 2's checkpoint written in orbax's temporary folder, not committed;
- ``checkpoint_finalize``: round 2's checkpoint renamed into place, nothing after it done;
- ``final_grid``: half of samples/final.png copied;
- ``summary``: summary.json written to its temporary file, not renamed into place.

It exits 0 without a kill only if POINT was never reached (the test then fails).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

POINTS = ("metrics", "checkpoint_tmp", "checkpoint_finalize", "final_grid", "summary")


def config():
    """Three rounds of two steps, three gossiping machines, scored on 64 samples each round
    (a sample grid of two machines), a checkpoint every round."""
    from conftest import tiny_run_config
    from ggans.config import CheckpointConfig, EvalConfig, ProtocolConfig

    return tiny_run_config(
        nodes=3,
        protocol=ProtocolConfig("gossip"),
        iterations=6,
        eval=EvalConfig(every=1, samples=64, grid_replicas=2),
        checkpoint=CheckpointConfig(1),
    )


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str) -> None:
    """Patch the write at ``point`` to kill this process there."""
    import orbax.checkpoint._src.path.async_path as async_path

    import ggans.run

    if point == "metrics":
        write, rows = os.write, []

        def cut_write(fd, data):
            if os.readlink(f"/proc/self/fd/{fd}").endswith("metrics.jsonl"):
                rows.append(data)
                if len(rows) == 2:
                    write(fd, data[: len(data) // 2])
                    os.fsync(fd)
                    die()
            return write(fd, data)

        os.write = cut_write
    elif point in ("checkpoint_tmp", "checkpoint_finalize"):
        rename = async_path.rename

        async def cut_rename(src, dst):
            if Path(dst).name == "2":  # round 2's checkpoint committed
                if point == "checkpoint_tmp":
                    die()
                await rename(src, dst)
                die()
            return await rename(src, dst)

        async_path.rename = cut_rename
    elif point == "final_grid":

        def cut_copy(src, dst):
            data = Path(src).read_bytes()
            Path(dst).write_bytes(data[: len(data) // 2])
            die()

        ggans.run.shutil = type("shutil", (), {"copyfile": staticmethod(cut_copy)})
    elif point == "summary":
        replace = os.replace

        def cut_replace(src, dst):
            if Path(dst).name == "summary.json":
                die()
            return replace(src, dst)

        os.replace = cut_replace
    else:
        raise SystemExit(f"point must be one of {', '.join(POINTS)}")


if __name__ == "__main__":
    from ggans.run import run

    point, out = sys.argv[1], sys.argv[2]
    arm(point)
    run(config(), out, progress=False)
