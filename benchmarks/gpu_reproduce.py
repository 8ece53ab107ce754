"""The paper's two experiments at the paper's settings, as far as one GPU window allows.

``python benchmarks/gpu_reproduce.py OUT --deadline SECONDS [--seeds S] [--smoke]``

Runs, in this order, each protocol's runs of a cell together (``ggans.seeds.run_seeds``: S
seeds in one program): non-iid at N = 10; scalability at N = 10, 2, 1 (central: one
protocol, since at N = 1 they are the same) and 100. I = 20,000, K = 200, the paper model,
scored every round on 1,000 images a machine. At the deadline the run in progress stops after
its round (SIGTERM, as ``ggans`` handles it), and the cells not reached are listed. Every
run's metrics.jsonl, summary.json and final grid go into one ``<experiment>.tar.gz`` per
experiment (checkpoints left out), at most 16 MiB each, and ``plan.json`` says what ran.
Needs no Hydra, OmegaConf, W&B or tfds; MNIST from $GGANS_DATA_DIR. ``--smoke``: the tiny
model for 4 iterations on 1% of MNIST (to test the script on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tarfile
import threading
import time
from pathlib import Path

PROTOCOLS = ("standalone", "federated", "gossip", "gossip_ind")
MAX_TAR = 16 << 20


def cells() -> list[tuple[str, int, str, str]]:
    """(experiment, N, split, protocol) in the order they run."""
    out = [("non_iid", 10, "non_iid", p) for p in PROTOCOLS]
    for n in (10, 2):
        out += [("scalability", n, "iid", p) for p in PROTOCOLS]
    out.append(("scalability", 1, "iid", "standalone"))
    out += [("scalability", 100, "iid", p) for p in PROTOCOLS]
    return out


def settings(n: int, split: str, protocol: str, smoke: bool) -> dict:
    base = {
        "nodes": n,
        "protocol": {"name": protocol},
        "data": {"split": split},
        "eval": {"every": 1, "samples": 1000},
        "checkpoint": {"every": 10},
    }
    if smoke:
        base.update(iterations=4, local_steps=2, model={"arch": "tiny", "noise_dim": 16})
        base["data"]["fraction"] = 0.01
        base["eval"] = {"every": 1, "samples": 16}
    return base


def pack(out: Path, experiment: str) -> Path | None:
    """``<experiment>.tar.gz`` of every run's records and final grid, no checkpoints."""
    root = out / "runs" / experiment
    if not root.is_dir():
        return None
    path = out / f"{experiment}.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for run in sorted(p for p in root.iterdir() if p.is_dir()):
            for name in ("metrics.jsonl", "summary.json", "run_config.json", "labels.json",
                         "samples/final.png"):  # fmt: skip
                if (run / name).exists():
                    tar.add(run / name, arcname=f"{experiment}/{run.name}/{name}")
    if path.stat().st_size > MAX_TAR:
        raise SystemExit(f"{path}: {path.stat().st_size} bytes, above 16 MiB")
    return path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", nargs="?", default=os.environ.get("OUT", "."))
    parser.add_argument("--deadline", type=float, default=540.0, help="seconds for training")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from ggans.config import from_dict
    from ggans.errors import GGansError
    from ggans.run import Interrupted
    from ggans.seeds import run_seeds

    t0 = time.monotonic()
    late, over = threading.Event(), threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: late.set())  # between runs' loops

    def ring() -> None:
        """From the deadline on, SIGTERM every few seconds until the cells are over: a
        signal that lands while a run compiles (outside its loop's handler) must not let
        that run train to the end."""
        if not over.wait(args.deadline):
            while not over.is_set():
                os.kill(os.getpid(), signal.SIGTERM)
                over.wait(5.0)

    threading.Thread(target=ring, daemon=True).start()
    plan: list[dict] = []
    stopped = False
    for experiment, n, split, protocol in cells():
        entry = {"experiment": experiment, "nodes": n, "protocol": protocol, "seeds": args.seeds}
        stopped = stopped or late.is_set()
        if stopped:
            plan.append(dict(entry, status="not reached"))
            continue
        cfg = from_dict(settings(n, split, protocol, args.smoke))
        names = [f"{protocol}-N{n}-{split}-s{s}" for s in range(args.seeds)]
        folders = [out / "runs" / experiment / name for name in names]
        try:
            run_seeds(cfg, list(range(args.seeds)), folders, progress=False, names=names)
            entry["status"] = "finished"
        except Interrupted as err:
            entry["status"] = f"stopped at the deadline ({err})"
            stopped = True
        except GGansError as err:
            entry["status"] = f"refused: {err}"
        entry["elapsed_s"] = round(time.monotonic() - t0, 1)
        plan.append(entry)
        print(json.dumps(entry), flush=True)
    over.set()
    packed = [str(p) for e in ("non_iid", "scalability") if (p := pack(out, e))]
    (out / "plan.json").write_text(json.dumps({"cells": plan, "packed": packed}, indent=2) + "\n")
    print("packed:", ", ".join(packed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
