"""A round's cost split into a per-step part and a fixed part (the exchange, the finite check).

Rounds of two lengths (``--short`` and ``--long`` local steps, chunks of one machine) run
alternately in one process, so that both see the same machine; the difference of their median
times gives the cost of a step, and what is left of the short round the fixed cost per round.

    PYTHONPATH=src python benchmarks/round_cost.py --loss nonsat --n 100 --short 4 --long 8
"""

from __future__ import annotations

import argparse
import statistics

import jax
from bench import _synthetic, timed_round

from ggans.gan import GanSpec
from ggans.replicas import init_replicas
from ggans.training import RoundSpec, make_round


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--loss", default="wgan_gp")
    ap.add_argument("--arch", default="paper")
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--short", type=int, default=8)
    ap.add_argument("--long", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds of each length")
    args = ap.parse_args()
    gan = GanSpec(arch=args.arch, loss=args.loss)
    shards = _synthetic(args.n)
    state = init_replicas(gan, jax.random.key(0), args.n)
    lengths = (args.short, args.long)
    rounds = {k: make_round(RoundSpec(gan=gan, local_steps=k, chunk=1)) for k in lengths}
    times: dict[int, list[float]] = {k: [] for k in lengths}
    for r in range(args.rounds + 1):  # round 0 compiles
        for k, round_fn in rounds.items():
            state, seconds = timed_round(round_fn, state, shards, r)
            if r:
                times[k].append(seconds)
    short, long = (statistics.median(times[k]) for k in lengths)
    step = (long - short) / (args.long - args.short)
    fixed = short - args.short * step
    print(f"{args.arch} {args.loss}, N = {args.n}; rounds (s): {times}")
    print(
        f"a step: {step:.2f} s, {args.n / step:.2f} replica-steps/s; fixed per round: "
        f"{fixed:.2f} s, {fixed / (fixed + 200 * step):.2%} of a K = 200 round"
    )


if __name__ == "__main__":
    main()
