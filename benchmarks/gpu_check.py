"""The GPU check (``scripts/gpu_check.sh``): which layer set and precision train N machines at
once fastest on this accelerator, against the PyTorch loop on the same device, and whether each
precision trains as well as exact float32.

Within a deadline (default 330 s) and in order of priority, each job in its own process:

1. replica-steps/s of the paper model's round (WGAN-GP, then the non-saturating loss) for each
   candidate layer set (``patches``, ``flax``) at N in {1, 10, 100, 400}, with compile time, peak
   memory and the share of the matmul rate measured in the same process;
2. the ``highest`` and ``bf16`` precisions at N = 100;
3. the PyTorch loop (``benchmarks/torch_replicas.py --device cuda``) at N = 1 and 10;
4. a short paper-model run (N = 10, 5 rounds of K = 100) per precision with MS and FID, when
   ``GGANS_DATA_DIR`` holds MNIST.

Writes ``gpu_check.json`` and ``gpu_check.md`` to the folder given (default ``$OUT`` or ``.``).
Needs jax, flax, optax, orbax-checkpoint, numpy, pillow and torch: no Hydra, W&B or tfds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = ("patches", "flax")
NODES = (1, 10, 100, 400)


def _jobs() -> list[dict]:
    rounds = []
    for loss in ("wgan_gp", "nonsat"):
        for impl in CANDIDATES:
            for n in NODES:
                rounds.append(dict(loss=loss, impl=impl, n=n, precision="default"))
        if loss == "wgan_gp":
            for precision in ("highest", "bf16"):
                for impl in CANDIDATES:
                    rounds.append(dict(loss=loss, impl=impl, n=100, precision=precision))
    jobs = [dict(kind="round", arch="paper", steps=20, repeats=3, chunk=None, **r) for r in rounds]
    jobs.insert(4, dict(kind="torch", n=1, loss="wgan_gp"))
    jobs.insert(5, dict(kind="torch", n=10, loss="wgan_gp"))
    return jobs


def _run(cmd: list[str], timeout: float, env=None) -> dict:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    if p.returncode:
        return {"error": (p.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_job(job: dict, timeout: float) -> dict:
    if job["kind"] == "torch":
        loss = {"wgan_gp": "wgangp", "nonsat": "nonsat"}[job["loss"]]
        cmd = [sys.executable, str(ROOT / "benchmarks" / "torch_replicas.py"), "--device", "cuda"]
        cmd += ["--mode", "loop", "--n", str(job["n"]), "--loss", loss]
        cmd += ["--repeats", "2", "--min-time", "3"]
        return {**job, **_run(cmd, timeout)}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--one", json.dumps(job)]
    return {**job, **_run(cmd, timeout)}


QUALITY = """
import json, os, sys
from ggans.config import from_dict
from ggans.run import run
precision, impl, out = sys.argv[1:4]
cfg = from_dict({"nodes": 10, "local_steps": 100, "iterations": 500, "protocol": {"name": "gossip"},
                 "model": {"arch": "paper", "impl": impl, "precision": precision},
                 "eval": {"samples": 500}, "checkpoint": {"every": 0}, "name": precision,
                 "data": {"dir": os.environ["GGANS_DATA_DIR"]}})
s = run(cfg, out, progress=False)
f = s["final"]
print(json.dumps({k: f.get(k) for k in ("ms_mean", "ms_std", "fid_mean", "fid_std")}
                 | {"wall_time": s["wall_time"]}))
"""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default=os.environ.get("OUT", "."))
    ap.add_argument("--deadline", type=float, default=330.0, help="seconds for everything")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    results: list[dict] = []

    def left() -> float:
        return a.deadline - (time.monotonic() - t0)

    def save() -> None:
        (out / "gpu_check.json").write_text(json.dumps(results, indent=1))
        (out / "gpu_check.md").write_text(table(results))

    quality_reserve = 100.0 if os.environ.get("GGANS_DATA_DIR") else 0.0
    for job in _jobs():
        if left() - quality_reserve < 25:
            results.append({**job, "error": "skipped: deadline"})
            continue
        res = run_job(job, min(150.0, left() - quality_reserve))
        results.append(res)
        print(json.dumps(res), file=sys.stderr, flush=True)
        save()
    best = _fastest(results)
    for precision in ("highest", "default", "bf16"):
        if not quality_reserve or left() < 20:
            break
        cmd = [sys.executable, "-c", QUALITY, precision, best, str(out / "runs" / precision)]
        res = {"kind": "quality", "precision": precision, "impl": best}
        res.update(_run(cmd, left() - 5))
        results.append(res)
        print(json.dumps(res), file=sys.stderr, flush=True)
        save()
    save()
    print(table(results))


def _fastest(results: list[dict]) -> str:
    """The candidate with the highest WGAN-GP rate at the largest N both reached."""
    ok = [r for r in results if r.get("kind") == "round" and "round_rate_median" in r]
    ok = [r for r in ok if r["loss"] == "wgan_gp" and r["precision"] == "default"]
    if not ok:
        return CANDIDATES[0]
    top = max(r["n"] for r in ok)
    return max((r for r in ok if r["n"] == top), key=lambda r: r["round_rate_median"])["impl"]


def table(results: list[dict]) -> str:
    """The markdown report: rounds, the PyTorch loop and the quality runs."""
    torch = {r["n"]: r.get("replica_steps_per_s_median") for r in results if r["kind"] == "torch"}
    one = {
        (r["loss"], r["impl"], r["precision"]): r["round_rate_median"]
        for r in results
        if r["kind"] == "round" and r["n"] == 1 and "round_rate_median" in r
    }
    lines = [
        "| loss | layers | precision | N | replica-steps/s | vs N = 1, per machine "
        "| vs PyTorch loop (N = 10) | compile s | peak GiB | matmul share |",
        "| --- " * 10 + "|",
    ]
    for r in (r for r in results if r["kind"] == "round"):
        head = f"| {r['loss']} | {r['impl']} | {r['precision']} | {r['n']} |"
        if "round_rate_median" not in r:
            lines.append(f"{head} {r.get('error', '?')} | | | | | |")
            continue
        rate = r["round_rate_median"]
        base = one.get((r["loss"], r["impl"], r["precision"]))
        vs_one = f"{rate / base:.1f}x" if base else "-"
        vs_torch = f"{rate / torch[10]:.0f}x" if torch.get(10) else "-"
        lines.append(
            f"{head} {rate:,.0f} | {vs_one} | {vs_torch} | {r['compile_s']:.0f} "
            f"| {r['peak_memory_gib']:.1f} | {r['peak_share']:.0%} |"
        )
    lines.append("")
    for n, rate in sorted(torch.items()):
        lines.append(f"PyTorch loop, N = {n}: {rate or 'failed'} replica-steps/s")
    quality = [r for r in results if r["kind"] == "quality"]
    if quality:
        lines += ["", "| precision | layers | final MS (mean, sd) | final FID (mean, sd) |"]
        lines.append("| --- | --- | --- | --- |")
        for r in quality:
            if "ms_mean" not in r:
                lines.append(f"| {r['precision']} | {r['impl']} | {r.get('error')} | |")
                continue
            lines.append(
                f"| {r['precision']} | {r['impl']} | {r['ms_mean']:.2f} ({r['ms_std']:.2f}) "
                f"| {r['fid_mean']:.1f} ({r['fid_std']:.1f}) |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
