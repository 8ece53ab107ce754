"""Run one of the paper's sweeps (``sweeps/*.yaml``), one job at a time, resumably.

    python -m ggans.sweep sweeps/scalability.yaml            # the paper's scale
    python -m ggans.sweep sweeps/scalability.yaml --quick    # the quick variant (CPU)
    python -m ggans.sweep sweeps/non_iid.yaml --quick logger=wandb seed=1
    python -m ggans.sweep sweeps/k_sweep.yaml --list         # the jobs and their commands

A sweep file names the sweep, the overrides every job shares, and a ``grid``: a list of
blocks, each the Cartesian product of its keys' values (a list, or one value), the jobs
being the union of the blocks (so "N = 1 and N = 2 once" is three small blocks). A
``quick`` section adds overrides (and may replace the grid) for the CPU-sized variant.

Each job runs ``python -m ggans <overrides> hydra.run.dir=<out>/<variant>/<sweep>/<name>``
(variant: ``paper`` or ``quick``), so every job has one fixed folder: a job whose folder
holds ``summary.json`` is done and skipped; one that stopped part-way resumes from its last
checkpoint when the core left one, and starts afresh otherwise. Extra ``key=value``
arguments go to every job (``logger=wandb``, ``seed=1``, ``data.dir=...``); W&B runs are
grouped by sweep (``<sweep>`` or ``<sweep>-quick``). The exit code is 1 when a job failed.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ggans.errors import GGansError


@dataclass
class Sweep:
    """A parsed sweep file."""

    name: str
    path: Path
    description: str = ""
    overrides: list[str] = field(default_factory=list)
    grid: list[dict[str, Any]] = field(default_factory=list)
    quick_overrides: list[str] = field(default_factory=list)
    quick_grid: list[dict[str, Any]] | None = None
    run_name: str | None = None  # a str.format template over the composed config


@dataclass
class Job:
    """One run of a sweep: its overrides, name and folder."""

    sweep: str
    overrides: list[str]
    name: str = ""
    folder: Path = Path()
    replica_steps: int = 0
    config: dict[str, Any] = field(default_factory=dict)

    def command(self, group: str) -> list[str]:
        """``python -m ggans`` for this job, W&B runs grouped by ``group``."""
        return [
            sys.executable,
            "-m",
            "ggans",
            *self.overrides,
            f"++logger.group={group}",
            f"name={self.name}",
            f"hydra.run.dir={self.folder}",
        ]


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if v is None:
        return "null"
    return str(v)


def merge(overrides: list[str]) -> list[str]:
    """Overrides with one entry per key, the last one winning, in first-seen order."""
    last: dict[str, str] = {}
    for o in overrides:
        last[o.split("=", 1)[0]] = o
    return list(last.values())


def load(path: str | Path) -> Sweep:
    """Parse a sweep file (plain YAML, see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise GGansError(f"sweep file {path} does not exist")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    if not isinstance(raw, dict) or not raw.get("grid"):
        raise GGansError(f"{path}: a sweep file needs a non-empty 'grid'")
    quick = raw.get("quick") or {}
    return Sweep(
        name=str(raw.get("name") or path.stem),
        path=path,
        description=str(raw.get("description") or ""),
        overrides=[str(o) for o in raw.get("overrides") or []],
        grid=list(raw["grid"]),
        quick_overrides=[str(o) for o in quick.get("overrides") or []],
        quick_grid=list(quick["grid"]) if quick.get("grid") else None,
        run_name=raw.get("run_name"),
    )


def expand(grid: list[dict[str, Any]]) -> list[list[str]]:
    """The override lists of a grid: the union over blocks of each block's product."""
    jobs: list[list[str]] = []
    for block in grid:
        keys = list(block)
        values = [v if isinstance(v, list) else [v] for v in block.values()]
        for combo in itertools.product(*values):
            job = [f"{k}={_value(v)}" for k, v in zip(keys, combo, strict=True)]
            if job not in jobs:
                jobs.append(job)
    return jobs


def compose(overrides: list[str]) -> dict[str, Any]:
    """The resolved config ``python -m ggans <overrides>`` would run (hydra section left out)."""
    return compose_many([overrides])[0]


def compose_many(override_lists: list[list[str]]) -> list[dict[str, Any]]:
    """:func:`compose` for several jobs, Hydra initialised once (cached per override list)."""
    missing = [tuple(o) for o in override_lists if tuple(o) not in _COMPOSED]
    if missing:
        from hydra import compose as hydra_compose
        from hydra import initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra

        from ggans.cli import config_dir

        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            for overrides in missing:
                cfg = hydra_compose(config_name="config", overrides=list(overrides))
                _COMPOSED[overrides] = OmegaConf.to_container(cfg, resolve=True)
    return [copy.deepcopy(_COMPOSED[tuple(o)]) for o in override_lists]


_COMPOSED: dict[tuple[str, ...], dict[str, Any]] = {}


def variant(quick: bool) -> str:
    return "quick" if quick else "paper"


def jobs(sweep: Sweep, quick: bool, out: str | Path, extra: list[str] = ()) -> list[Job]:
    """The sweep's jobs, composed and validated, each with its name and folder."""
    from ggans.cli import run_config

    grid = sweep.quick_grid if quick and sweep.quick_grid else sweep.grid
    common = sweep.overrides + (sweep.quick_overrides if quick else [])
    root = Path(out) / variant(quick) / sweep.name
    cells = expand(grid)
    all_overrides = [merge(common + cell + list(extra)) for cell in cells]
    try:
        configs = compose_many(all_overrides)
    except Exception as err:
        raise GGansError(f"{sweep.path}: {err}") from err
    result, names = [], set()
    for cell, overrides, config in zip(cells, all_overrides, configs, strict=True):
        try:
            run_cfg = run_config(config)
        except Exception as err:
            raise GGansError(f"{sweep.path}: job {' '.join(cell)}: {err}") from err
        name = run_cfg.name
        if sweep.run_name:
            name = sweep.run_name.format(
                protocol=run_cfg.protocol.name,
                nodes=run_cfg.nodes,
                split=run_cfg.data.split,
                seed=run_cfg.seed,
                local_steps=run_cfg.local_steps,
                iterations=run_cfg.iterations,
                node_drop=run_cfg.faults.node_drop,
                message_loss=run_cfg.faults.message_loss,
            )
        if name in names:
            raise GGansError(f"{sweep.path}: two jobs are named {name}; set run_name")
        names.add(name)
        result.append(
            Job(
                sweep=sweep.name,
                overrides=overrides,
                name=name,
                folder=root / name,
                replica_steps=run_cfg.nodes * run_cfg.iterations,
                config=config,
            )
        )
    return result


def _comparable(config: dict[str, Any]) -> dict[str, Any] | None:
    """The settings that change what a job computes (None for a config that no longer parses)."""
    from ggans.cli import run_config
    from ggans.config import OPERATIONAL, flat

    try:
        return {k: v for k, v in flat(run_config(config)).items() if k not in OPERATIONAL}
    except GGansError:
        return None


def status(job: Job) -> str:
    """``done``, ``changed`` (done, with other settings), ``partial`` or ``new``."""
    if (job.folder / "summary.json").exists():
        saved = job.folder / "config.yaml"
        if saved.exists():
            old = OmegaConf.to_container(OmegaConf.load(saved), resolve=False)
            if _comparable(old) != _comparable(job.config):
                return "changed"
        return "done"
    return "partial" if job.folder.exists() else "new"


def run_job(job: Job, group: str) -> tuple[int, float]:
    """Run one job in a subprocess; return its exit code and wall time."""
    state = status(job)
    if state == "partial" and not (job.folder / "checkpoints").is_dir():
        shutil.rmtree(job.folder)  # nothing to resume from: start afresh
    cmd = job.command(group)
    start = time.perf_counter()
    code = subprocess.call(cmd)
    return code, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ggans.sweep",
        description="Run sweeps of the paper's experiments; finished jobs are skipped.",
    )
    parser.add_argument("sweeps", nargs="+", help="sweep files, then key=value overrides")
    parser.add_argument("--quick", action="store_true", help="the CPU-sized variant")
    parser.add_argument("--out", default="outputs/sweeps", help="root of the job folders")
    parser.add_argument("--list", action="store_true", help="print the jobs, run nothing")
    parser.add_argument("--redo", action="store_true", help="rerun finished jobs too")
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first failure")
    args = parser.parse_intermixed_args(argv)
    files = [a for a in args.sweeps if "=" not in a]
    extra = [a for a in args.sweeps if "=" in a]
    try:
        plan = [(load(f), None) for f in files]
        plan = [(s, jobs(s, args.quick, args.out, extra)) for s, _ in plan]
    except GGansError as err:
        print(f"ggans.sweep: error: {err}", file=sys.stderr)
        return 2
    failed: list[str] = []
    for sweep, sweep_jobs in plan:
        group = sweep.name + ("-quick" if args.quick else "")
        total = sum(j.replica_steps for j in sweep_jobs)
        print(
            f"== {group}: {len(sweep_jobs)} jobs, {total:,} replica-steps, "
            f"folders in {Path(args.out) / variant(args.quick) / sweep.name}",
            flush=True,
        )
        records = []
        for i, job in enumerate(sweep_jobs, 1):
            state = status(job)
            head = f"[{i}/{len(sweep_jobs)}] {job.name} ({state})"
            if args.list:
                print(head, shlex.join(job.command(group)))
                continue
            if state == "changed" and not args.redo:
                print(f"{head}: finished with other settings; kept (--redo reruns it)")
                records.append({"name": job.name, "status": "changed"})
                continue
            if state in ("done", "changed") and not args.redo:
                print(f"{head}: finished, skipped", flush=True)
                records.append({"name": job.name, "status": "done"})
                continue
            if args.redo and job.folder.exists():
                shutil.rmtree(job.folder)
            print(f"{head}: running", flush=True)
            code, wall = run_job(job, group)
            ok = code == 0 and (job.folder / "summary.json").exists()
            print(f"{head}: {'ok' if ok else f'FAILED (exit {code})'} in {wall:.0f} s", flush=True)
            records.append({"name": job.name, "status": "ok" if ok else "failed", "wall": wall})
            if not ok:
                failed.append(job.name)
                if args.fail_fast:
                    break
        if not args.list:
            root = Path(args.out) / variant(args.quick) / sweep.name
            root.mkdir(parents=True, exist_ok=True)
            (root / "sweep.json").write_text(
                json.dumps(
                    {
                        "sweep": sweep.name,
                        "file": str(sweep.path),
                        "quick": args.quick,
                        "jobs": records,
                    },
                    indent=2,
                )
                + "\n"
            )
        if failed and args.fail_fast:
            break
    if failed:
        print(f"ggans.sweep: {len(failed)} job(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
