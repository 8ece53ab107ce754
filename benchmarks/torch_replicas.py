"""Baseline: N replicas of TF-GAN's unconditional MNIST GAN in PyTorch (CPU, or --device cuda).

A copy of ../shared/bench/torch_replicas.py (the PyTorch yardstick) with one addition, --device,
so that scripts/gpu_check.sh can run it on a GPU machine, where ../shared is absent.

Modes
  loop : N independent (G, D, Adam_G, Adam_D) trained one after another in a
         Python loop (what a naive emulation does).
  func : torch.func: stacked params (stack_module_state) + functional_call +
         vmap(grad(...)); Adam (elementwise) runs on the stacked tensors, which
         is exactly per-replica Adam.

Losses (--loss)
  nonsat : (default) TF-GAN's modified (non-saturating) GAN loss, sigmoid cross-entropy.
  wgangp : WGAN-GP as TF-GAN computes it with gradient_penalty_weight=1.0 (loop mode only):
           D loss = mean D(fake) - mean D(real) + 1.0 * mean_i (sqrt(|grad_x D(x_hat_i)|^2
           + 1e-10) - 1)^2, x_hat = eps*real + (1-eps)*fake, eps ~ U(0,1) per sample
           (TF-GAN writes real + alpha*(fake-real), the same with eps = 1-alpha);
           G loss = -mean D(G(z)).

Data are synthetic (uniform in [-1, 1]); each replica has its own batch & noise.
D params are frozen (requires_grad False) during the G update, as JAX only
differentiates w.r.t. G there.

Usage
  python torch_replicas.py --mode loop --n 10 [--no-bn] [--loss wgangp]
  python torch_replicas.py --sweep [--loss wgangp --modes loop]
"""

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

B, ZDIM = 32, 128
LR_G, LR_D, BETAS = 1e-3, 1e-4, (0.5, 0.999)
FLOPS_PER_REPLICA_STEP = 12583763968  # see jax_replicas.flops_per_replica_step()
# WGAN-GP adds 5 D forwards per sample: D(x_hat), grad wrt x_hat, ~3 for the double backward
FLOPS_PER_REPLICA_STEP_WGANGP = 16758734848  # jax_replicas.flops_per_replica_step('wgangp')
GP_WEIGHT, GP_EPS = 1.0, 1e-10  # TF-GAN: gradient_penalty_weight, epsilon


class Generator(nn.Module):
    def __init__(self, bn=True):
        super().__init__()
        norm = (
            (
                lambda c, d: (
                    nn.BatchNorm1d(c, momentum=0.01) if d == 1 else nn.BatchNorm2d(c, momentum=0.01)
                )
            )
            if bn
            else (lambda c, d: nn.Identity())
        )
        nb = not bn
        self.fc = nn.Sequential(
            nn.Linear(ZDIM, 1024, bias=nb),
            norm(1024, 1),
            nn.ReLU(),
            nn.Linear(1024, 7 * 7 * 128, bias=nb),
            norm(7 * 7 * 128, 1),
            nn.ReLU(),
        )
        self.conv = nn.Sequential(
            nn.ConvTranspose2d(128, 64, 4, 2, 1, bias=nb),
            norm(64, 2),
            nn.ReLU(),
            nn.ConvTranspose2d(64, 32, 4, 2, 1, bias=nb),
            norm(32, 2),
            nn.ReLU(),
            nn.Conv2d(32, 1, 4, 1, padding="same"),
            nn.Tanh(),
        )

    def forward(self, z):
        return self.conv(self.fc(z).view(-1, 128, 7, 7))


class Discriminator(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 64, 4, 2, 1),
            nn.LeakyReLU(0.01),
            nn.Conv2d(64, 128, 4, 2, 1),
            nn.LeakyReLU(0.01),
            nn.Flatten(),
            nn.Linear(128 * 7 * 7, 1024),
            nn.LeakyReLU(0.01),
            nn.Linear(1024, 1),
        )

    def forward(self, x):
        return self.net(x)


def bce(logits, target):
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def wgangp_d_loss(d, real, fake):
    """TF-GAN's wasserstein_discriminator_loss + 1.0 * wasserstein_gradient_penalty."""
    logits = d(torch.cat([real, fake]))
    eps = torch.rand(real.shape[0], 1, 1, 1)
    x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
    (gx,) = torch.autograd.grad(d(x_hat).sum(), x_hat, create_graph=True)
    slopes = torch.sqrt(gx.pow(2).flatten(1).sum(1) + GP_EPS)
    gp = ((slopes - 1.0) ** 2).mean()
    return logits[B:].mean() - logits[:B].mean() + GP_WEIGHT * gp


def make_loop(n, bn, loss="nonsat"):
    wgan = loss == "wgangp"
    reps = []
    for _ in range(n):
        g, d = Generator(bn), Discriminator()
        reps.append(
            (
                g,
                d,
                torch.optim.Adam(g.parameters(), LR_G, BETAS),
                torch.optim.Adam(d.parameters(), LR_D, BETAS),
            )
        )

    def step(real):  # real: (n, B, 1, 28, 28)
        for j, (g, d, og, od) in enumerate(reps):
            with torch.no_grad():
                fake = g(torch.randn(B, ZDIM))
            if wgan:
                dl = wgangp_d_loss(d, real[j], fake)
            else:
                logits = d(torch.cat([real[j], fake]))
                dl = bce(logits[:B], 1.0) + bce(logits[B:], 0.0)
            od.zero_grad(set_to_none=True)
            dl.backward()
            od.step()
            d.requires_grad_(False)
            gout = d(g(torch.randn(B, ZDIM)))
            gl = -gout.mean() if wgan else bce(gout, 1.0)
            og.zero_grad(set_to_none=True)
            gl.backward()
            og.step()
            d.requires_grad_(True)
        return dl.item(), gl.item()

    return step


def make_func(n, bn):
    from torch.func import functional_call, grad_and_value, stack_module_state, vmap

    gs = [Generator(bn) for _ in range(n)]
    ds = [Discriminator() for _ in range(n)]
    gp, gb = stack_module_state(gs)
    dp, _ = stack_module_state(ds)
    gbase = copy.deepcopy(gs[0]).to("meta")
    dbase = copy.deepcopy(ds[0]).to("meta")
    og = torch.optim.Adam(list(gp.values()), LR_G, BETAS)
    od = torch.optim.Adam(list(dp.values()), LR_D, BETAS)

    def g_fwd(p, b, z):
        return functional_call(gbase, (p, b), (z,))

    def d_loss(p, real, fake):
        logits = functional_call(dbase, p, (torch.cat([real, fake]),))
        return bce(logits[:B], 1.0) + bce(logits[B:], 0.0)

    def g_loss(p, b, d_p, z):
        return bce(functional_call(dbase, d_p, (g_fwd(p, b, z),)), 1.0)

    d_grad = vmap(grad_and_value(d_loss))
    g_grad = vmap(grad_and_value(g_loss))
    g_fwd_v = vmap(g_fwd)

    def step(real):
        with torch.no_grad():
            fake = g_fwd_v(gp, gb, torch.randn(n, B, ZDIM))
        grads, dl = d_grad(dp, real, fake)
        for k, v in dp.items():
            v.grad = grads[k]
        od.step()
        dpd = {k: v.detach() for k, v in dp.items()}
        grads, gl = g_grad(gp, gb, dpd, torch.randn(n, B, ZDIM))
        for k, v in gp.items():
            v.grad = grads[k]
        og.step()
        return dl.mean().item(), gl.mean().item()

    return step


def canary_gflops(seconds=1.0):
    """2048^3 f32 matmul GFLOP/s right before the run: flags a slowed-down machine."""
    x = torch.ones(2048, 2048)
    x @ x
    k, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x @ x
        k += 1
    return 2 * 2048**3 * k / (time.perf_counter() - t0) / 1e9


def run_one(mode, n, bn, repeats, min_time, max_steps, loss="nonsat"):
    if loss != "nonsat" and mode != "loop":
        raise SystemExit(f"--loss {loss} is implemented for --mode loop only")
    canary = canary_gflops()
    torch.manual_seed(0)
    real = [torch.rand(n, B, 1, 28, 28) * 2 - 1 for _ in range(2)]
    step = make_loop(n, bn, loss) if mode == "loop" else make_func(n, bn)
    t0 = time.perf_counter()
    step(real[0])
    first_s = time.perf_counter() - t0
    step(real[1])
    times, steps_done, i = [], [], 0
    for _ in range(repeats):
        t0, k = time.perf_counter(), 0
        while True:
            out = step(real[i % 2])
            i += 1
            k += 1
            el = time.perf_counter() - t0
            if el >= min_time or k >= max_steps:
                break
        times.append(el / k)
        steps_done.append(k)
    sps = [1 / t for t in times]
    flops = FLOPS_PER_REPLICA_STEP_WGANGP if loss == "wgangp" else FLOPS_PER_REPLICA_STEP
    return dict(
        framework="torch",
        mode=mode,
        n=n,
        bn=bn,
        loss=loss,
        first_step_s=first_s,
        step_s=times,
        steps_per_repeat=steps_done,
        steps_per_s_min=min(sps),
        steps_per_s_median=statistics.median(sps),
        replica_steps_per_s_min=n * min(sps),
        replica_steps_per_s_median=n * statistics.median(sps),
        flops_per_replica_step=flops,
        achieved_gflops_median=n * statistics.median(sps) * flops / 1e9,
        peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        losses=list(out),
        torch=torch.__version__,
        device=str(torch.get_default_device()),
        canary_matmul_gflops=canary,
        threads=torch.get_num_threads(),
        omp=os.environ.get("OMP_NUM_THREADS", "unset"),
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["loop", "func"], default="loop")
    ap.add_argument("--n", type=int, default=1)
    ap.add_argument("--no-bn", action="store_true")
    ap.add_argument("--loss", choices=["nonsat", "wgangp"], default="nonsat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--min-time", type=float, default=4.0)
    ap.add_argument("--max-steps", type=int, default=1000)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--ns", default="1,10")
    ap.add_argument("--modes", default="loop,func")
    ap.add_argument("--bns", default="1,0")
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
    a = ap.parse_args()
    torch.set_default_device(a.device)
    if not a.sweep:
        print(
            json.dumps(
                run_one(a.mode, a.n, not a.no_bn, a.repeats, a.min_time, a.max_steps, a.loss)
            )
        )
        return
    for bn in [int(x) for x in a.bns.split(",")]:
        for n in [int(x) for x in a.ns.split(",")]:
            for mode in a.modes.split(","):
                args = [
                    "--mode",
                    mode,
                    "--n",
                    str(n),
                    "--repeats",
                    str(a.repeats),
                    "--min-time",
                    str(a.min_time),
                    "--max-steps",
                    str(a.max_steps),
                    "--loss",
                    a.loss,
                ]
                if not bn:
                    args.append("--no-bn")
                p = subprocess.run(
                    [sys.executable, __file__] + args, capture_output=True, text=True
                )
                if p.returncode:
                    line = json.dumps(
                        dict(args=args, error=f"rc={p.returncode}", stderr=p.stderr[-1500:])
                    )
                else:
                    line = p.stdout.strip().splitlines()[-1]
                print(line, flush=True)
                if a.out:
                    with open(a.out, "a") as fh:
                        fh.write(line + "\n")


if __name__ == "__main__":
    main()
