"""Where a compiled round spends its time on XLA's CPU backend, op by op.

Traces one round of K = ``--steps`` local steps of N stacked replicas plus the gossip exchange
(``ggans.training``'s compiled round, on ``benchmarks/bench.py``'s synthetic shards) with
``jax.profiler`` (a Perfetto trace, no TensorBoard needed), matches every traced op to the
compiled HLO, and prints the self time of each kind of op (batched dense dots, per-replica
convolutions, everything else) and the slowest ops with their shapes and GFLOP/s.

    PYTHONPATH=src python benchmarks/profile_step.py [--n 10] [--loss wgan_gp] [--arch paper]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile

import jax
import jax.numpy as jnp
from bench import _synthetic, timed_round

from ggans.gan import GanSpec
from ggans.replicas import init_replicas
from ggans.training import RoundSpec, compiled_round, make_round


def _shape(text: str) -> list[int]:
    return [int(x) for x in re.match(r"f32\[([\d,]*)\]", text).group(1).split(",") if x]


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


CONV = (
    r"%(\S+) = (f32\[[\d,]*\])\S* convolution\(%(\S+), %(\S+)\), "
    r"window=\{size=([\dx]+)[^}]*\}, dim_labels=(\S+)"
)
DOT = (
    r"%(\S+) = (f32\[[\d,]*\])\S* dot\(%(\S+), %(\S+)\), "
    r"(?:lhs_batch_dims=\{[\d,]*\}, )?lhs_contracting_dims=\{([\d,]*)\}"
)


def hlo_index(hlo: str) -> tuple[dict, dict]:
    """Per instruction: (shape, opcode, op_name), and the FLOPs of its dots and convolutions
    (a fusion's are those of the computation it calls)."""
    info = {}
    pattern = r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+) (\w+)\(.*?op_name=\"([^\"]+)\""
    for m in re.finditer(pattern, hlo, re.M):
        info[m.group(1)] = (m.group(2), m.group(3), m.group(4).split("closed_call/")[-1])
    shapes = {m.group(1): m.group(2) for m in re.finditer(r"%(\S+) = (f32\[[\d,]*\])", hlo)}
    own = {}
    for c in re.finditer(CONV, hlo):
        rhs, labels = _shape(shapes[c.group(4)]), c.group(6)
        cin = rhs[labels.split("_")[1].split("->")[0].index("i")]
        window = _prod(int(d) for d in c.group(5).split("x"))
        own[c.group(1)] = 2 * _prod(_shape(c.group(2))) * window * cin
    for d in re.finditer(DOT, hlo):
        lhs = _shape(shapes[d.group(3)])
        contracted = _prod(lhs[int(i)] for i in d.group(5).split(","))
        own[d.group(1)] = 2 * _prod(_shape(d.group(2))) * contracted
    flops = dict(own)
    bodies = {
        m.group(1).lstrip("%"): m.group(2)
        for m in re.finditer(r"^%?(\S+) \(.*?\) -> .*? \{\n(.*?)\n\}", hlo, re.S | re.M)
    }
    for m in re.finditer(r"%(\S+) = \S+ fusion\(.*?calls=%([\w.\-]+)", hlo):
        names = re.findall(r"%(\S+) = ", bodies.get(m.group(2), ""))
        flops[m.group(1)] = sum(own.get(n, 0) for n in names)
    return info, flops


def self_times(trace_file: str) -> tuple[collections.Counter, collections.Counter]:
    """Self time (microseconds) and call count of every traced event name."""
    with gzip.open(trace_file) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    by_thread = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X":
            by_thread[(e["pid"], e["tid"])].append(e)
    own, calls = collections.Counter(), collections.Counter()
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e["ts"], -e.get("dur", 0)))
        stack = []
        for e in evs:
            while stack and stack[-1]["ts"] + stack[-1].get("dur", 0) <= e["ts"]:
                stack.pop()
            if stack:
                own[stack[-1]["name"]] -= e.get("dur", 0)
            own[e["name"]] += e.get("dur", 0)
            calls[e["name"]] += 1
            stack.append(e)
    return own, calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--loss", default="wgan_gp")
    ap.add_argument("--arch", default="paper")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    n, steps = args.n, args.steps
    gan = GanSpec(arch=args.arch, loss=args.loss)
    spec = RoundSpec(gan=gan, protocol="gossip", local_steps=steps)
    round_fn = make_round(spec)
    shards = _synthetic(n)
    state = init_replicas(gan, jax.random.key(0), n)
    times = []
    for r in range(4):  # the first call compiles
        state, seconds = timed_round(round_fn, state, shards, r)
        times.append(seconds)
    best = min(times[1:])
    print(
        f"{args.arch} {args.loss}, N = {n}: {best / steps * 1e3:.0f} ms a step, "
        f"{n * steps / best:.2f} replica-steps/s"
    )
    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir, create_perfetto_trace=True):
            state, _ = round_fn(state, shards, jax.random.key(1), 4)
            jax.block_until_ready(state)
        own, calls = self_times(glob.glob(f"{log_dir}/**/*.json.gz", recursive=True)[0])
    active = jnp.ones((n,), bool)
    lowered = compiled_round(spec).lower(
        spec, state, shards, jax.random.key(1), jnp.asarray(0, jnp.int32), active
    )
    info, flops = hlo_index(lowered.compile().as_text())
    kinds: collections.Counter = collections.Counter()
    kind_flops: collections.Counter = collections.Counter()
    for name, us in own.items():
        if name not in info:
            continue
        op = info[name][2]
        if "conv_general_dilated" in op:
            kind = "convolutions (per replica)"
        elif "dot_general" in op or info[name][1] == "dot":
            kind = "dense dots (batched over replicas)"
        elif name.startswith("while"):
            kind = "loop bookkeeping"
        else:
            kind = "elementwise, reductions, copies"
        kinds[kind] += us
        kind_flops[kind] += flops.get(name, 0) * calls[name]
    total = sum(kinds.values())
    print("\n| kind of op | ms a step | share | GFLOP/s |\n| --- | ---: | ---: | ---: |")
    for kind, us in kinds.most_common():
        rate = f"{kind_flops[kind] / us / 1e3:.0f}" if kind_flops[kind] else ""
        print(f"| {kind} | {us / 1e3 / steps:.0f} | {us / total:.0%} | {rate} |")
    print("\n| ms a step | GFLOP/s | op | shape | what |\n| ---: | ---: | --- | --- | --- |")
    ranked = sorted((us, name) for name, us in own.items() if name in info)[::-1]
    for us, name in ranked[: args.top]:
        shape, _, op = info[name]
        rate = f"{flops[name] * calls[name] / us / 1e3:.0f}" if flops.get(name) else ""
        print(f"| {us / 1e3 / steps:.1f} | {rate} | {name} | {shape.split('{')[0]} | {op[-80:]} |")


if __name__ == "__main__":
    main()
