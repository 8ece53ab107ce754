"""``python benchmarks/bench.py``: replica-steps per second of the compiled round, against the
naive alternative (a Python loop over per-replica jitted steps with plain Flax layers).

Each configuration runs in its own subprocess, so its compile time and peak memory are its
own. Reported per (model, loss, N): replica-steps/s of the compiled round (min and median
over repeats, steady state), compile time, peak memory (host RSS on a CPU, device peak on an
accelerator), the share of the float32 matmul peak measured in the same process, and the
naive loop's rate with the ratio. Also: the cost of the exchange (dense and gather mixing)
and of one evaluation (1,000 samples per machine), next to a K = 200 round.

Needs only jax, flax, optax, numpy and an importable ggans (installed, or
``PYTHONPATH=src``): no Hydra, W&B or tfds. Synthetic data; no downloads. Not a test:
nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

FLOPS_PAPER = {"wgan_gp": 16758734848, "nonsat": 12583763968}  # per replica-step, yardstick's


def _peak_memory_gib() -> float:
    import jax

    dev = jax.devices()[0]
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def matmul_peak_gflops(
    size: int | None = None, seconds: float = 1.0, precision: str = "default"
) -> float:
    """Matmul GFLOP/s of this process's default device at a layer precision (``default``:
    float32 at JAX's default, TF32 on recent GPUs; ``highest``; ``bf16``)."""
    import jax
    import jax.numpy as jnp

    size = size or (2048 if jax.default_backend() == "cpu" else 8192)
    dtype = jnp.bfloat16 if precision == "bf16" else jnp.float32
    x = jnp.ones((size, size), dtype)
    prec = jax.lax.Precision.HIGHEST if precision == "highest" else None
    f = jax.jit(lambda a: jnp.matmul(a, a, precision=prec, preferred_element_type=jnp.float32))
    f(x).block_until_ready()
    k, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        f(x).block_until_ready()
        k += 1
    return 2 * size**3 * k / (time.perf_counter() - t0) / 1e9


def _synthetic(n: int, per_machine: int = 64):
    import jax.numpy as jnp
    import numpy as np

    from ggans.training import Shards

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n * per_machine, 28, 28, 1), dtype=np.uint8)
    index = np.arange(n * per_machine, dtype=np.int32).reshape(n, per_machine)
    return Shards(jnp.asarray(images), jnp.asarray(index), jnp.full((n,), per_machine, jnp.int32))


def _flops_per_step(gan) -> float:
    import dataclasses

    import jax

    from ggans.gan import init_gan, train_step

    if gan.arch == "paper":
        return float(FLOPS_PAPER[gan.loss])
    flax_gan = dataclasses.replace(gan, impl="flax")
    state = init_gan(flax_gan, jax.random.key(0))
    real = jax.numpy.zeros((gan.batch_size, 28, 28, 1))
    compiled = (
        jax.jit(partial(train_step, flax_gan)).lower(state, jax.random.key(0), real).compile()
    )
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", 0.0))


def timed_round(round_fn, state, shards, r: int):
    """Round ``r`` of ``training.make_round``'s ``round_fn`` (train key 1), run to completion:
    ``(state, seconds)``."""
    import jax

    t0 = time.perf_counter()
    state, _ = round_fn(state, shards, jax.random.key(1), r)
    jax.block_until_ready(state)
    return state, time.perf_counter() - t0


def bench_round(
    arch: str,
    loss: str,
    n: int,
    steps: int,
    repeats: int,
    chunk: int | None,
    impl: str = "auto",
    precision: str = "default",
):
    """The compiled round: K = ``steps`` local steps for N machines, then gossip."""
    import jax

    from ggans.gan import GanSpec
    from ggans.replicas import init_replicas
    from ggans.training import RoundSpec, make_round

    gan = GanSpec(arch=arch, loss=loss, impl=impl, precision=precision)
    spec = RoundSpec(gan=gan, protocol="gossip", local_steps=steps, chunk=chunk)
    shards = _synthetic(n)
    state = init_replicas(gan, jax.random.key(0), n)
    round_fn = make_round(spec)
    state, first = timed_round(round_fn, state, shards, 0)
    times = []
    for r in range(repeats):
        state, seconds = timed_round(round_fn, state, shards, r + 1)
        times.append(seconds)
    rates = [n * steps / t for t in times]
    return {
        "round_rate_min": min(rates),
        "round_rate_median": statistics.median(rates),
        "compile_s": max(first - statistics.median(times), 0.0),
        "flops_per_replica_step": _flops_per_step(gan),
    }


def bench_naive(arch: str, loss: str, n: int, steps: int, repeats: int):
    """A Python loop over machines, each a jitted single-replica step with flax.linen layers."""
    import jax

    from ggans.gan import GanSpec, init_gan, train_step
    from ggans.training import sample_batch

    gan = GanSpec(arch=arch, loss=loss, impl="flax")
    shards = _synthetic(n)

    # The state is donated, as the round's is: without it 100 paper-model states outgrow 24 GiB.
    @partial(jax.jit, donate_argnums=0)
    def step(state, key, index, size):
        batch_key, step_key = jax.random.split(key)
        real = sample_batch(shards.images, index, size, batch_key, gan.batch_size)
        return train_step(gan, state, step_key, real)[0]

    states = [init_gan(gan, jax.random.key(i)) for i in range(n)]
    states[0] = step(states[0], jax.random.key(0), shards.index[0], shards.size[0])
    jax.block_until_ready(states[0])
    rates = []
    for r in range(repeats):
        t0 = time.perf_counter()
        for s in range(steps):
            for i in range(n):
                key = jax.random.key(r * 1000003 + s * 1009 + i)
                states[i] = step(states[i], key, shards.index[i], shards.size[i])
        jax.block_until_ready(states)
        rates.append(n * steps / (time.perf_counter() - t0))
    return {"naive_rate_min": min(rates), "naive_rate_median": statistics.median(rates)}


def bench_exchange(arch: str, n: int, repeats: int = 3):
    """Seconds for one gossip exchange of G and D, in dense and in gather form."""
    import jax
    import jax.numpy as jnp

    from ggans import protocols
    from ggans.gan import GanSpec, init_gan
    from ggans.training import message_bytes

    gan = GanSpec(arch=arch)
    one = init_gan(gan, jax.random.key(0))
    g_mix, _, _ = protocols.round_mixing(
        "gossip", jax.random.key(1), n, message_bytes(jax.tree.map(lambda x: x[None], one), False)
    )
    # What is mixed (parameters and batch-norm statistics, no optimiser state), donated and
    # updated in place as in the round.
    tree = jax.tree.map(
        lambda x: jnp.broadcast_to(x, (n, *x.shape)).copy(),
        (one.g_params, one.g_state, one.d_params),
    )
    del one
    out = {}
    for form in ("dense", "gather"):
        f = jax.jit(partial(protocols.mix, form=form), donate_argnums=1)
        tree = f(g_mix, tree)
        jax.block_until_ready(tree)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            tree = f(g_mix, tree)
            jax.block_until_ready(tree)
            times.append(time.perf_counter() - t0)
        out[f"mix_{form}_s"] = min(times)
    return out


def bench_eval(arch: str, n: int, samples: int):
    """Seconds for one evaluation of N machines (sampling + classifier + MS/FID), warm."""
    import jax
    import numpy as np

    from ggans.classifier import load_classifier
    from ggans.evaluation import sample_population
    from ggans.gan import GanSpec
    from ggans.metrics import KID_REAL, Gaussian, RealStats, score_population
    from ggans.replicas import init_replicas

    gan = GanSpec(arch=arch)
    state = init_replicas(gan, jax.random.key(0), n)
    clf = load_classifier()
    eye10, eye128 = np.eye(10), np.eye(128)
    kid_real = np.random.default_rng(0).standard_normal((KID_REAL, 128)).astype(np.float32)
    real = RealStats(
        Gaussian(np.zeros(10), eye10),
        Gaussian(np.zeros(128), eye128),
        clf.sha256,
        "synthetic",
        0,
        kid_real,
    )
    chunk = 1 if jax.default_backend() == "cpu" else None

    def once():
        images = sample_population(gan, state, jax.random.key(2), samples, chunk)
        return score_population(images, real, clf)

    once()
    t0 = time.perf_counter()
    once()
    return {"eval_s": time.perf_counter() - t0}


def run_one(job: dict) -> dict:
    kind = job.pop("kind")
    out = dict(job, kind=kind)
    if kind == "round":
        precision = job.get("precision", "default")
        out.update(
            bench_round(
                job["arch"],
                job["loss"],
                job["n"],
                job["steps"],
                job["repeats"],
                job.get("chunk"),
                job.get("impl", "auto"),
                precision,
            )
        )
        out["matmul_gflops"] = matmul_peak_gflops(precision=precision)
        out["peak_share"] = (
            out["round_rate_median"] * out["flops_per_replica_step"] / 1e9 / out["matmul_gflops"]
        )
    elif kind == "naive":
        out.update(bench_naive(job["arch"], job["loss"], job["n"], job["steps"], job["repeats"]))
    elif kind == "exchange":
        out.update(bench_exchange(job["arch"], job["n"]))
    elif kind == "eval":
        out.update(bench_eval(job["arch"], job["n"], job["samples"]))
    out["peak_memory_gib"] = _peak_memory_gib()
    import jax

    out["device"] = str(jax.devices()[0].device_kind)
    out["jax"] = jax.__version__
    if kind == "round":
        from ggans import impls

        out["impl"] = impls.resolve(job.get("impl", "auto"))
    if jax.default_backend() == "cpu":
        from ggans.cpu import onednn

        out["onednn"] = onednn.status()
    return out


def _spawn(job: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(job)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(job, error=f"timeout after {timeout:.0f} s")
    if p.returncode < 0:  # SIGKILL here is most often the kernel's out-of-memory killer
        return dict(job, error=f"killed by signal {-p.returncode}")
    if p.returncode:
        return dict(job, error=p.stderr.strip().splitlines()[-1] if p.stderr else "failed")
    return json.loads(p.stdout.strip().splitlines()[-1])


def torch_yardstick(python: str, script: str, n: int, loss: str) -> dict:
    """The PyTorch loop of ../shared/bench, run beside ours."""
    torch_loss = {"wgan_gp": "wgangp", "nonsat": "nonsat"}[loss]
    cmd = [
        python,
        script,
        "--mode",
        "loop",
        "--n",
        str(n),
        "--loss",
        torch_loss,
        "--repeats",
        "3",
        "--min-time",
        "8",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        return {"error": p.stderr[-500:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="paper,tiny")
    ap.add_argument("--losses", default="wgan_gp,nonsat")
    ap.add_argument("--nodes", default="1,10,100")
    ap.add_argument("--impls", default="auto", help="layer sets (model.impl), comma-separated")
    ap.add_argument("--precisions", default="default", help="default, highest, bf16")
    ap.add_argument("--steps", type=int, default=5, help="local steps per timed round")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=None, help="machines per vmapped chunk")
    ap.add_argument(
        "--naive-max-replica-steps",
        type=int,
        default=100,
        help="cap on the naive loop's steps x N per repeat",
    )
    ap.add_argument("--no-naive", action="store_true")
    ap.add_argument("--exchange", default="10,100", help="N for the mixing cost (paper model)")
    ap.add_argument("--eval", default="10,100", help="N for the evaluation cost (paper model)")
    ap.add_argument("--torch-python", default=None, help="python with torch for the yardstick")
    ap.add_argument("--torch-script", default="../shared/bench/torch_replicas.py")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--out", default="bench.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(run_one(json.loads(a.one))))
        return
    results = []

    def record(res):
        results.append(res)
        print(json.dumps(res), file=sys.stderr, flush=True)
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)

    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    combos = [(i, p) for i in a.impls.split(",") for p in a.precisions.split(",")]
    for arch in a.models.split(","):
        for loss in a.losses.split(","):
            for n in ints(a.nodes):
                chunk = a.chunk if a.chunk and n > a.chunk else None
                # Never one step: a chunked round of K = 1 keeps a second copy of the state.
                steps = a.steps if n <= 10 else max(2, a.steps // 2)
                reps = a.repeats if n <= 10 else 2
                for impl, precision in combos:
                    job = dict(kind="round", arch=arch, loss=loss, n=n, steps=steps)
                    job.update(repeats=reps, chunk=chunk, impl=impl, precision=precision)
                    record(_spawn(job, a.timeout))
                if not a.no_naive:
                    nsteps = max(1, min(a.steps, a.naive_max_replica_steps // n))
                    record(
                        _spawn(
                            dict(kind="naive", arch=arch, loss=loss, n=n, steps=nsteps, repeats=2),
                            a.timeout,
                        )
                    )
    for n in ints(a.exchange):
        record(_spawn(dict(kind="exchange", arch="paper", n=n), a.timeout))
    for n in ints(a.eval):
        record(_spawn(dict(kind="eval", arch="paper", n=n, samples=1000), a.timeout))
    torch = {}
    if a.torch_python:
        for loss in a.losses.split(","):
            torch[loss] = torch_yardstick(a.torch_python, a.torch_script, 10, loss)
            record({**torch[loss], "kind": "torch", "loss": loss, "n": 10})
    print_table(results, torch)


def _rate(x: float | None) -> str:
    return f"{x:.2f}" if x else "-"


def print_table(results: list[dict], torch: dict) -> None:
    """The summary table: rates, ratios, compile time, memory, share of the matmul peak."""

    def key(r):
        return r["arch"], r["loss"], r["n"]

    rounds = [r for r in results if r.get("kind") == "round"]
    naive = {key(r): r for r in results if r.get("kind") == "naive"}
    print(
        "| model | loss | N | layers | precision | round r-steps/s (min / median) | naive loop "
        "| ratio | torch loop | vs torch | compile s | peak GiB | matmul peak share |"
    )
    print("| --- " * 13 + "|")
    for r in rounds:
        k = key(r)
        head = f"| {k[0]} | {k[1]} | {k[2]} | {r.get('impl', '-')} | {r.get('precision', '-')} |"
        if "error" in r:
            print(f"{head} error: {r['error']} |")
            continue
        nv = naive.get(k, {})
        nrate = nv.get("naive_rate_median")
        ratio = f"{r['round_rate_median'] / nrate:.2f}x" if nrate else "-"
        t = torch.get(k[1], {}) if k[0] == "paper" and k[2] == 10 else {}
        trate = t.get("replica_steps_per_s_median")
        vs = f"{r['round_rate_median'] / trate:.2f}x" if trate else "-"
        print(
            f"{head} {r['round_rate_min']:.2f} / "
            f"{r['round_rate_median']:.2f} | {_rate(nrate)} | {ratio} | {_rate(trate)} | {vs} | "
            f"{r['compile_s']:.1f} | {r['peak_memory_gib']:.2f} | {r['peak_share']:.0%} |"
        )
    for r in results:
        if r.get("kind") in ("exchange", "eval") and "error" not in r:
            print(
                f"{r['kind']} N={r['n']}: "
                + ", ".join(f"{k}={v:.3f}" for k, v in r.items() if k.endswith("_s"))
            )


if __name__ == "__main__":
    main()
