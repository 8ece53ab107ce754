"""Figures and a table of final scores from run folders, without W&B.

    python -m ggans.report outputs/sweeps/quick/scalability [more folders] [--out DIR]

Every run folder below the given folders (one holding ``metrics.jsonl``; its
``config.yaml`` and ``summary.json`` are read when present) is collected, and PNGs are
drawn for whatever the runs cover (default folder: ``<first folder>/figures``):

- ``fig2_scores.png``: MS and FID against iterations, one panel per N, one line per
  protocol: the mean over machines, with a band of +- one std across machines (iid runs);
- ``fig3_samples.png``: the final sample grid of each protocol at the largest N (iid);
- ``fig4_final_scores.png``: box plots of the final per-machine MS and FID, per protocol
  and N (iid);
- ``fig5_non_iid.png``: MS and FID curves of the non-iid runs;
- ``fig_bytes.png``: FID against the bytes sent, per machine and on the whole network
  (the communication accounting), one panel per N;
- ``fig_k.png``: final MS and FID against K, when the runs use several K;
- ``fig_faults.png``: final MS and FID against the node-drop and message-loss rates, when
  some runs have faults (figures 2 to 5 then use the fault-free runs only);
- ``results.md`` (and ``results.json``): final scores, mean and std across machines, per
  split, N, K and protocol. Several seeds of one setting are pooled; runs that differ in any
  other setting that changes a result (``run_config.json``) are labelled apart, never pooled.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ggans import intervals as intervals_mod
from ggans.runfolder import read_jsonl

PROTOCOL_ORDER = ("central", "standalone", "federated", "gossip", "gossip_ind")
COLORS = {
    "central": "black",
    "standalone": "tab:red",
    "federated": "tab:blue",
    "gossip": "tab:green",
    "gossip_ind": "tab:orange",
}
# Protocols beyond the paper's (neighbourhood, swap_d, a user's own) get the rest, in a fixed
# order by name, so that no two protocols of one figure share a colour.
SPARE_COLORS = ("tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")


def color_of(protocol: str) -> str:
    """The protocol's colour: the paper's protocols fixed, any other by its registered name."""
    if protocol in COLORS:
        return COLORS[protocol]
    from ggans import protocols

    others = sorted(n for n in protocols.names() if n not in COLORS)
    index = others.index(protocol) if protocol in others else len(others)
    return SPARE_COLORS[index % len(SPARE_COLORS)]


LINESTYLES = ("-", "--", ":", "-.")
METRICS = (("ms", "MS (higher is better)"), ("fid", "FID (lower is better)"))


@dataclass
class Run:
    """One run folder's settings, rows and summary."""

    folder: Path
    name: str
    protocol: str
    nodes: int
    split: str
    local_steps: int
    iterations: int
    seed: int
    arch: str
    node_drop: float = 0.0
    message_loss: float = 0.0
    rows: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # run_config.json's
    variant: str = ""  # the settings besides the figures' axes in which runs differ

    @property
    def finished(self) -> bool:
        return self.summary is not None

    @property
    def faulty(self) -> bool:
        return self.node_drop > 0 or self.message_loss > 0

    @property
    def competitor(self) -> str:
        """The protocol, or ``central`` for N = 1 (where every protocol is the same), with the
        run's variant when runs differ in more than the figures show."""
        base = "central" if self.nodes == 1 else self.protocol
        return f"{base} [{self.variant}]" if self.variant else base

    def final(self, metric: str) -> list[float]:
        """The last evaluated per-machine values of ``metric`` (empty when never scored)."""
        if self.summary and isinstance(self.summary.get("final", {}).get(metric), list):
            return [float(v) for v in self.summary["final"][metric]]
        for row in reversed(self.rows):
            if isinstance(row.get(metric), list):
                return [float(v) for v in row[metric]]
        return []

    def last(self, key: str, default: float = float("nan")) -> float:
        for row in reversed(self.rows):
            if isinstance(row.get(key), int | float):
                return float(row[key])
        return default

    def curve(self, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Iterations, mean and std across machines of ``metric`` on evaluation rows."""
        rows = [r for r in self.rows if f"{metric}_mean" in r]
        it = np.array([r["iteration"] for r in rows], float)
        mean = np.array([r[f"{metric}_mean"] for r in rows], float)
        std = np.array([r.get(f"{metric}_std", 0.0) for r in rows], float)
        return it, mean, std


# Settings the figures and the table show (as axes, panels or series) or pool (seeds): runs that
# differ in any other key of run_config.json are never pooled, and are labelled apart.
SHOWN = frozenset(
    {"seed", "protocol.name", "nodes", "local_steps", "data.split", "eval.every"}
    | {"faults.node_drop", "faults.message_loss"}
)


def mark_variants(runs: list[Run]) -> list[str]:
    """Label each run with the values of the keys, outside :data:`SHOWN` and the keys that
    do not change a result, in which the runs differ; return those keys."""
    keys = sorted({k for r in runs for k in r.settings} - SHOWN)
    varying = [k for k in keys if len({json.dumps(r.settings.get(k)) for r in runs}) > 1]
    for run in runs:
        run.variant = ", ".join(f"{k}={run.settings.get(k)}" for k in varying)
    return varying


def _base(competitor: str) -> str:
    return competitor.split(" [")[0]


def _load_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.yaml"
    if not path.exists():
        return {}
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    except Exception:  # noqa: BLE001 - an unreadable config: fall back on the summary
        return {}


def load_run(folder: Path) -> Run:
    """A run folder's record: settings from run_config.json (else config.yaml, else
    summary.json), rows and summary."""
    settings = _load_settings(folder)
    cfg = _load_config(folder)
    summary = None
    if (folder / "summary.json").exists():
        summary = json.loads((folder / "summary.json").read_text())
    s = summary or {}
    proto = cfg.get("protocol")
    protocol = proto.get("name") if isinstance(proto, dict) else (proto or s.get("protocol"))
    data = cfg.get("data") or {}
    model = cfg.get("model") or {}
    faults = cfg.get("faults") or {}

    def get(key: str, fallback):
        return settings.get(key, fallback)

    return Run(
        folder=folder,
        name=str(cfg.get("name") or s.get("name") or folder.name),
        protocol=str(get("protocol.name", protocol) or "unknown"),
        nodes=int(get("nodes", cfg.get("nodes") or s.get("nodes") or 0)),
        split=str(get("data.split", data.get("split") or s.get("split") or "iid")),
        local_steps=int(get("local_steps", cfg.get("local_steps") or s.get("local_steps") or 0)),
        iterations=int(get("iterations", cfg.get("iterations") or s.get("iterations") or 0)),
        seed=int(get("seed", cfg.get("seed", s.get("seed", 0))) or 0),
        arch=str(get("model.arch", model.get("arch") or "?")),
        node_drop=float(get("faults.node_drop", faults.get("node_drop") or 0.0)),
        message_loss=float(get("faults.message_loss", faults.get("message_loss") or 0.0)),
        rows=read_jsonl(folder / "metrics.jsonl"),
        summary=summary,
        settings=settings,
    )


def _load_settings(folder: Path) -> dict[str, Any]:
    from ggans.config import OPERATIONAL

    path = folder / "run_config.json"
    if not path.exists():
        return {}
    saved = json.loads(path.read_text())
    return {k: v for k, v in saved.items() if k not in OPERATIONAL}


def find_runs(roots: Iterable[str | Path]) -> list[Run]:
    """Every run folder (one with metrics.jsonl) below ``roots``, sorted by name."""
    folders: set[Path] = set()
    for root in roots:
        root = Path(root)
        if (root / "metrics.jsonl").exists():
            folders.add(root.resolve())
        folders.update(p.parent.resolve() for p in root.rglob("metrics.jsonl"))
    runs = [load_run(f) for f in sorted(folders)]
    return [r for r in runs if r.rows]


# --- grouping -------------------------------------------------------------------------------


def _order(competitor: str) -> int:
    base = _base(competitor)
    return PROTOCOL_ORDER.index(base) if base in PROTOCOL_ORDER else 99


def series_key(run: Run, several_k: bool) -> tuple[str, int]:
    return (run.competitor, run.local_steps if several_k else 0)


def series_label(key: tuple[str, int], short: bool = False) -> str:
    """``gossip [topology.name=ring] K=100``; ``short``: the setting's values only, as tick
    labels (``gossip ring K=100``)."""
    competitor, k = key
    label = "central (N=1)" if competitor == "central" else competitor
    if short and label.endswith("]") and " [" in label:
        base, settings = label[:-1].split(" [", 1)
        label = " ".join([base, *(kv.split("=", 1)[-1] for kv in settings.split(", "))])
    return f"{label} K={k}" if k else label


def _style(key: tuple[str, int], ks: list[int]) -> dict[str, Any]:
    competitor, k = key
    style = {"color": color_of(_base(competitor))}
    if k and k in ks:
        style["linestyle"] = LINESTYLES[ks.index(k) % len(LINESTYLES)]
    return style


def group_runs(runs: list[Run]) -> dict[tuple, list[Run]]:
    """Runs by (split, N, K, competitor, faults): several seeds of one setting share a key."""
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        key = (
            run.split,
            run.nodes,
            run.local_steps,
            run.competitor,
            run.node_drop,
            run.message_loss,
        )
        groups[key].append(run)
    return dict(groups)


def pooled_curve(runs: list[Run], metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over seeds of the per-iteration mean and std across machines."""
    curves = [r.curve(metric) for r in runs]
    curves = [c for c in curves if len(c[0])]
    if not curves:
        return np.array([]), np.array([]), np.array([])
    common = sorted(set.intersection(*(set(c[0].tolist()) for c in curves)))
    it = np.array(common, float)
    means = [np.interp(it, c[0], c[1]) for c in curves]
    stds = [np.interp(it, c[0], c[2]) for c in curves]
    return it, np.mean(means, axis=0), np.mean(stds, axis=0)


# --- figures --------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, title: str) -> Path:
    """Give a figure its title, write it to ``path`` and free it."""
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def _series(runs: list[Run]) -> tuple[dict[tuple[str, int], list[Run]], list[int], bool]:
    ks = sorted({r.local_steps for r in runs if r.nodes > 1})
    several_k = len(ks) > 1
    by: dict[tuple[str, int], list[Run]] = defaultdict(list)
    for run in runs:
        by[series_key(run, several_k)].append(run)
    ordered = dict(sorted(by.items(), key=lambda kv: (_order(kv[0][0]), kv[0][1])))
    return ordered, ks, several_k


def _by_nodes(runs: list[Run]) -> dict[int, list[Run]]:
    out: dict[int, list[Run]] = defaultdict(list)
    for run in runs:
        out[run.nodes].append(run)
    return dict(sorted(out.items()))


def plot_curves(runs: list[Run], path: Path, title: str) -> Path | None:
    """MS and FID against iterations: one column per N, one line per protocol, +-std band."""
    scored = [r for r in runs if r.curve("fid")[0].size]
    if not scored:
        return None
    plt = _plt()
    nodes = _by_nodes(scored)
    fig, axes = plt.subplots(
        2, len(nodes), figsize=(4.2 * len(nodes), 6.4), squeeze=False, sharex="col"
    )
    for col, (n, group) in enumerate(nodes.items()):
        series, ks, _ = _series(group)
        for key, members in series.items():
            for row, (metric, ylabel) in enumerate(METRICS):
                it, mean, std = pooled_curve(members, metric)
                if not it.size:
                    continue
                ax = axes[row, col]
                style = _style(key, ks)
                ax.plot(it, mean, label=series_label(key), marker=".", **style)
                ax.fill_between(it, mean - std, mean + std, alpha=0.15, color=style["color"])
                if col == 0:
                    ax.set_ylabel(ylabel)
        axes[0, col].set_title(f"N = {n}")
        axes[1, col].set_xlabel("iterations")
        axes[1, col].set_yscale("log")
        axes[0, col].legend(fontsize=7)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    return _save(fig, path, title)


def plot_samples(runs: list[Run], path: Path, title: str) -> Path | None:
    """The final sample grid of each protocol at the largest N."""
    with_grid = [r for r in runs if (r.folder / "samples" / "final.png").exists()]
    if not with_grid:
        return None
    largest = max(r.nodes for r in with_grid)
    series, _, _ = _series([r for r in with_grid if r.nodes == largest])
    plt = _plt()
    from PIL import Image

    fig, axes = plt.subplots(1, len(series), figsize=(3.6 * len(series), 4.2), squeeze=False)
    for ax, (key, members) in zip(axes[0], series.items(), strict=True):
        run = sorted(members, key=lambda r: r.seed)[0]
        ax.imshow(np.asarray(Image.open(run.folder / "samples" / "final.png")), cmap="gray")
        ax.set_title(f"{series_label(key)}\nN = {largest}, {run.iterations:,} it.", fontsize=9)
        ax.axis("off")
    return _save(fig, path, f"{title}: final samples (one row per machine)")


def plot_boxes(runs: list[Run], path: Path, title: str) -> Path | None:
    """Box plots of the final per-machine MS and FID, per protocol (boxes) and N (panels)."""
    scored = [r for r in runs if r.final("fid")]
    if not scored:
        return None
    plt = _plt()
    nodes = _by_nodes(scored)
    boxes = max(len(_series(group)[0]) for group in nodes.values())
    width = max(3.8, 0.4 * boxes)  # room for every box's tick label
    fig, axes = plt.subplots(
        2, len(nodes), figsize=(width * len(nodes), 6.4 + 0.08 * boxes), squeeze=False,
        sharey="row",
    )  # fmt: skip
    for col, (n, group) in enumerate(nodes.items()):
        series, ks, _ = _series(group)
        labels = [series_label(k, short=True) for k in series]
        for row, (metric, ylabel) in enumerate(METRICS):
            ax = axes[row, col]
            data = [sum((r.final(metric) for r in members), []) for members in series.values()]
            box = ax.boxplot(data, patch_artist=True, widths=0.6)
            for patch, key in zip(box["boxes"], series, strict=True):
                patch.set_facecolor(_style(key, ks)["color"])
                patch.set_alpha(0.5)
            ax.set_xticks(range(1, len(labels) + 1), labels, rotation=30 if boxes <= 6 else 90,
                          ha="right" if boxes <= 6 else "center", fontsize=8)  # fmt: skip
            ax.grid(alpha=0.3, axis="y")
            if col == 0:
                ax.set_ylabel(ylabel)
        axes[0, col].set_title(f"N = {n}")
    axes[1, 0].set_yscale("log")
    return _save(fig, path, f"{title}: final scores of every machine")


def _bytes_curve(runs: list[Run], key: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for run in runs:
        rows = [r for r in run.rows if "fid_mean" in r]
        if key == "network":
            x = [r.get("bytes_sent_total", 0.0) + r.get("server_bytes_out", 0.0) for r in rows]
        else:
            x = [r.get("bytes_sent_mean", 0.0) for r in rows]
        xs.append(np.array(x, float))
        ys.append(np.array([r["fid_mean"] for r in rows], float))
    n = min(len(x) for x in xs)
    return np.mean([x[:n] for x in xs], axis=0), np.mean([y[:n] for y in ys], axis=0)


def plot_bytes(runs: list[Run], path: Path, title: str) -> Path | None:
    """FID against cumulative bytes sent per machine and on the whole network, per N."""
    scored = [r for r in runs if r.curve("fid")[0].size and r.nodes > 1]
    if not scored:
        return None
    plt = _plt()
    nodes = _by_nodes(scored)
    fig, axes = plt.subplots(2, len(nodes), figsize=(4.2 * len(nodes), 6.4), squeeze=False)
    xlabels = (
        "MB sent per machine (mean)",
        "MB on the network (machines + server)",
    )
    for col, (n, group) in enumerate(nodes.items()):
        series, ks, _ = _series(group)
        for key, members in series.items():
            for row, which in enumerate(("machine", "network")):
                x, y = _bytes_curve(members, which)
                if not x.size:
                    continue
                ax = axes[row, col]
                if not x.any():  # no traffic (standalone): its final FID as a reference
                    ax.axhline(
                        y[-1],
                        ls="--",
                        lw=1,
                        label=f"{series_label(key)} (final, no traffic)",
                        color=_style(key, ks)["color"],
                    )
                    continue
                ax.plot(x / 1e6, y, marker=".", label=series_label(key), **_style(key, ks))
        for row in range(2):
            axes[row, col].set_xlabel(xlabels[row])
            axes[row, col].set_yscale("log")
            axes[row, col].grid(alpha=0.3)
            if col == 0:
                axes[row, col].set_ylabel("FID")
        axes[0, col].set_title(f"N = {n}")
        axes[0, col].legend(fontsize=7)
    return _save(fig, path, f"{title}: quality against communication (standalone sends nothing)")


def _final_against(ax, runs: list[Run], setting: str, metric: str) -> None:
    """One line per protocol: final ``metric`` (mean +- std over machines, seeds pooled)
    against the run attribute ``setting`` (K, a fault rate)."""
    by: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        by[run.competitor][getattr(run, setting)] += run.final(metric)
    for competitor in sorted(by, key=_order):
        xs = sorted(by[competitor])
        ax.errorbar(
            xs,
            [np.mean(by[competitor][x]) for x in xs],
            yerr=[np.std(by[competitor][x]) for x in xs],
            marker="o",
            capsize=3,
            label=competitor,
            color=color_of(_base(competitor)),
        )
    ax.grid(alpha=0.3)


def plot_k(runs: list[Run], path: Path, title: str) -> Path | None:
    """Final MS and FID (mean +- std across machines) against K, per protocol and N."""
    scored = [r for r in runs if r.final("fid") and r.nodes > 1]
    nodes = {
        n: group
        for n, group in _by_nodes(scored).items()
        if len({r.local_steps for r in group}) > 1
    }
    if not nodes:
        return None
    plt = _plt()
    fig, axes = plt.subplots(2, len(nodes), figsize=(4.2 * len(nodes), 6.4), squeeze=False)
    for col, (n, group) in enumerate(nodes.items()):
        ks = sorted({r.local_steps for r in group})
        for metric_row, (metric, ylabel) in enumerate(METRICS):
            ax = axes[metric_row, col]
            _final_against(ax, group, "local_steps", metric)
            ax.set_xscale("log")
            ax.set_xticks(ks, [str(k) for k in ks])  # the K values run, not log-scale decades
            ax.minorticks_off()
            ax.set_xlabel("K, local iterations per round")
            if col == 0:
                ax.set_ylabel(ylabel)
        axes[0, col].set_title(f"N = {n}")
        axes[0, col].legend(fontsize=7)
    return _save(fig, path, f"{title}: final scores against K")


def plot_faults(runs: list[Run], path: Path, title: str) -> Path | None:
    """Final MS and FID (mean +- std across machines) against the fault rates, per protocol.

    One column per kind of fault; fault-free runs are the rate-0 point of both.
    """
    scored = [r for r in runs if r.final("fid") and r.nodes > 1]
    if not any(r.faulty for r in scored):
        return None
    kinds = (("node_drop", "node-drop rate"), ("message_loss", "message-loss rate"))
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(8.4, 6.4), squeeze=False, sharey="row")
    for col, (kind, xlabel) in enumerate(kinds):
        other = kinds[1 - col][0]
        group = [r for r in scored if getattr(r, other) == 0]
        for row, (metric, ylabel) in enumerate(METRICS):
            ax = axes[row, col]
            _final_against(ax, group, kind, metric)
            ax.set_xlabel(xlabel)
            if col == 0:
                ax.set_ylabel(ylabel)
        axes[0, col].legend(fontsize=7)
    nodes = ", ".join(map(str, sorted({r.nodes for r in scored})))
    return _save(fig, path, f"{title}: final scores under faults (N = {nodes})")


def plot_final_against(
    runs: list[Run],
    x_of: Callable[[Run], float | None],
    xlabel: str,
    path: Path,
    title: str,
    label_of: Callable[[Run], str] | None = None,
    log: bool = False,
) -> Path | None:
    """Final FID and MS (mean +- std over machines, seeds pooled) of every run that
    ``x_of`` places (a setting or a measured quantity), one series per protocol, each point
    labelled by ``label_of`` when given. None when fewer than two distinct x."""
    placed = [(x_of(r), r) for r in runs if r.final("fid") and r.nodes > 1]
    placed = [(x, r) for x, r in placed if x is not None and np.isfinite(x)]
    if len({x for x, _ in placed}) < 2:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), squeeze=False)
    for col, (metric, ylabel) in enumerate(reversed(METRICS)):
        ax = axes[0, col]
        by: dict[str, dict[tuple[float, str], list[float]]] = defaultdict(lambda: defaultdict(list))
        for x, run in placed:
            by[run.protocol][(x, label_of(run) if label_of else "")] += run.final(metric)
        for protocol in sorted(by, key=_order):
            points = sorted(by[protocol])
            ax.errorbar(
                [x for x, _ in points],
                [np.mean(by[protocol][p]) for p in points],
                yerr=[np.std(by[protocol][p]) for p in points],
                marker="o",
                linestyle="" if label_of else "-",
                capsize=3,
                label=protocol,
                color=color_of(protocol),
            )
            for x, label in points if label_of else ():
                ax.annotate(label, (x, np.mean(by[protocol][(x, label)])), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")  # fmt: skip
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path, f"{title}: final scores against {xlabel}")


def spectral_gap(run: Run) -> float | None:
    return (run.summary or {}).get("spectral_gap")


def dirichlet_alpha(run: Run) -> float | None:
    return run.settings.get("data.alpha") if run.split == "dirichlet" else None


def mb_sent(run: Run) -> float | None:
    sent = run.last("bytes_sent_mean")
    return sent / 1e6 if np.isfinite(sent) and sent > 0 else None


def _compression_label(run: Run) -> str:
    name = run.settings.get("compression.name", "none")
    if name == "topk":
        return f"top-{run.settings.get('compression.fraction', 0.1):g}"
    if name == "quantize":
        return f"{run.settings.get('compression.bits', 8)}-bit"
    return "full"


def plot_labels(runs: list[Run], path: Path, title: str, most: int = 6) -> Path | None:
    """Each machine's label histogram (labels.json) for up to ``most`` runs of distinct splits,
    as heat maps: machines down, labels across."""
    shown: dict[str, np.ndarray] = {}
    for run in runs:
        f = run.folder / "labels.json"
        if not f.exists():
            continue
        key = f"{run.split} {run.variant}".strip() if run.split != "iid" else "iid"
        if key not in shown and len(shown) < most:
            shown[key] = np.asarray(json.loads(f.read_text())["counts"], float)
    if not shown or set(shown) == {"iid"}:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.6), squeeze=False)
    for ax, (key, counts) in zip(axes[0], shown.items(), strict=True):
        share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        ax.imshow(share, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_title(key, fontsize=7)
        ax.set_xlabel("label")
        ax.set_ylabel("machine")
    return _save(fig, path, f"{title}: each machine's share of each label")


# --- table ----------------------------------------------------------------------------------


def _ms(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return float(np.mean(values)), float(np.std(values))


def results(runs: list[Run]) -> list[dict[str, Any]]:
    """One record per (split, N, K, competitor): final scores pooled over machines and seeds."""
    out = []
    groups = group_runs(runs)
    for (split, n, k, competitor, drop, loss), members in sorted(
        groups.items(),
        key=lambda kv: (*kv[0][:3], _order(kv[0][3]), *kv[0][4:]),
    ):
        ms = sum((r.final("ms") for r in members), [])
        fid = sum((r.final("fid") for r in members), [])
        intervals = {
            metric: intervals_mod.nested_mean(list(_by_seed(members, metric).values()))
            for metric in ("ms", "fid", "kid")
        }
        per_run_best = [min(r.final("fid")) for r in members if r.final("fid")]
        out.append(
            {
                "split": split,
                "nodes": n,
                "local_steps": k,
                "protocol": competitor,
                "node_drop": drop,
                "message_loss": loss,
                "iterations": members[0].iterations,
                "runs": len(members),
                "finished": sum(r.finished for r in members),
                "seeds": sorted({r.seed for r in members}),
                "ms_mean": _ms(ms)[0],
                "ms_std": _ms(ms)[1],
                "fid_mean": _ms(fid)[0],
                "fid_std": _ms(fid)[1],
                "fid_best": float(np.mean(per_run_best)) if per_run_best else float("nan"),
                **{
                    f"{metric}_{part}": value
                    for metric, triple in intervals.items()
                    for part, value in zip(("seeds_mean", "ci_low", "ci_high"), triple, strict=True)
                },
                "mb_sent_per_machine": float(
                    np.mean([r.last("bytes_sent_mean", 0.0) for r in members]) / 1e6
                ),
                "mb_server": float(
                    np.mean(
                        [
                            r.last("server_bytes_in", 0.0) + r.last("server_bytes_out", 0.0)
                            for r in members
                        ]
                    )
                    / 1e6
                ),
                "wall_time_s": float(np.mean([r.last("wall_time", 0.0) for r in members])),
            }
        )
    return out


def _by_seed(members: list[Run], metric: str) -> dict[int, list[float]]:
    """Per seed, the final per-machine values of ``metric`` (one run per seed)."""
    out: dict[int, list[float]] = {}
    for run in members:
        if run.final(metric):
            out.setdefault(run.seed, []).extend(run.final(metric))
    return out


def pair_table(runs: list[Run]) -> list[dict[str, Any]]:
    """For each setting (split, N, K, faults) and each pair of competitors run in it: the
    difference of final FID and MS, paired by seed, with its 95% interval
    (:func:`ggans.intervals.paired_difference`)."""
    cells: dict[tuple, dict[str, list[Run]]] = defaultdict(dict)
    for (split, n, k, competitor, drop, loss), members in group_runs(runs).items():
        cells[(split, n, k, drop, loss)][competitor] = members
    out = []
    for (split, n, k, drop, loss), by in sorted(cells.items()):
        names = sorted(by, key=_order)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                row = {"split": split, "nodes": n, "local_steps": k, "node_drop": drop,
                       "message_loss": loss, "a": a, "b": b}  # fmt: skip
                for metric in ("fid", "ms"):
                    diff = intervals_mod.paired_difference(
                        _by_seed(by[a], metric), _by_seed(by[b], metric)
                    )
                    row.update({f"{metric}_{key}": value for key, value in diff.items()})
                if row["fid_seeds"]:
                    out.append(row)
    return out


def pairs_markdown(pairs: list[dict[str, Any]]) -> str:
    """The pair table: A - B of final FID and MS, mean over seeds with 95% intervals."""
    head = (
        "| split | N | K | A | B | seeds | FID A - B [95% CI] | excludes 0 "
        "| MS A - B [95% CI] | excludes 0 |\n"
        "| --- | ---: | ---: | --- | --- | ---: | --- | --- | --- | --- |\n"
    )
    lines = [
        f"| {p['split']} | {p['nodes']} | {p['local_steps']} | {p['a']} | {p['b']} "
        f"| {p['fid_seeds']} | {_fmt(p['fid_difference'])} [{_fmt(p['fid_low'])}, "
        f"{_fmt(p['fid_high'])}] | {'yes' if p['fid_excludes_0'] else 'no'} "
        f"| {_fmt(p['ms_difference'])} [{_fmt(p['ms_low'])}, {_fmt(p['ms_high'])}] "
        f"| {'yes' if p['ms_excludes_0'] else 'no'} |"
        for p in pairs
    ]
    return head + "\n".join(lines) + "\n"


def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


def markdown_table(records: list[dict[str, Any]]) -> str:
    """The final scores as a markdown table (mean +- std across machines).

    Node-drop and message-loss columns appear when some run has faults.
    """
    faulty = any(r.get("node_drop") or r.get("message_loss") for r in records)
    head = (
        "| split | N | K | protocol | "
        + ("node drop | message loss | " if faulty else "")
        + "I | runs | MS (mean ± std) | FID (mean ± std) | FID [95% CI over seeds] "
        "| best machine's FID | MB sent / machine | MB via server | wall (s) |\n"
        "| --- | ---: | ---: | --- | "
        + ("---: | ---: | " if faulty else "")
        + "---: | ---: | --- | --- | --- | ---: | ---: | ---: | ---: |\n"
    )
    lines = []
    for r in records:
        runs = f"{r['finished']}/{r['runs']}" if r["finished"] < r["runs"] else str(r["runs"])
        faults = f"| {r['node_drop']:g} | {r['message_loss']:g} " if faulty else ""
        lines.append(
            f"| {r['split']} | {r['nodes']} | {r['local_steps']} | {r['protocol']} {faults}"
            f"| {r['iterations']:,} | {runs} "
            f"| {_fmt(r['ms_mean'])} ± {_fmt(r['ms_std'], 2)} "
            f"| {_fmt(r['fid_mean'])} ± {_fmt(r['fid_std'], 2)} "
            f"| [{_fmt(r['fid_ci_low'])}, {_fmt(r['fid_ci_high'])}]"
            f"{'' if len(r['seeds']) > 1 else ' (1 seed)'} | {_fmt(r['fid_best'])} "
            f"| {_fmt(r['mb_sent_per_machine'])} | {_fmt(r['mb_server'])} "
            f"| {r['wall_time_s']:.0f} |"
        )
    return head + "\n".join(lines) + "\n"


# --- the command ----------------------------------------------------------------------------


def report(
    roots: Iterable[str | Path], out: str | Path | None = None, title: str | None = None
) -> dict[str, Path]:
    """Draw every figure the runs below ``roots`` allow, and the table; return the files."""
    roots = [Path(r) for r in roots]
    runs = find_runs(roots)
    if not runs:
        raise FileNotFoundError(f"no run folders (with metrics.jsonl) under {roots}")
    mark_variants(runs)
    out = Path(out) if out else roots[0] / "figures"
    out.mkdir(parents=True, exist_ok=True)
    title = title or ", ".join(r.name for r in roots)
    clean = [r for r in runs if not r.faulty]  # the faults figure alone shows faulty runs
    iid = [r for r in clean if r.split == "iid"]
    non_iid = [r for r in clean if r.split != "iid"]
    drawn: dict[str, Path | None] = {
        "fig2": plot_curves(iid, out / "fig2_scores.png", f"{title} (iid)"),
        "fig3": plot_samples(iid, out / "fig3_samples.png", f"{title} (iid)"),
        "fig4": plot_boxes(iid, out / "fig4_final_scores.png", f"{title} (iid)"),
        "fig5": plot_curves(non_iid, out / "fig5_non_iid.png", f"{title} (non-iid)"),
        "bytes": plot_bytes(iid or non_iid, out / "fig_bytes.png", title),
        "k": plot_k(clean, out / "fig_k.png", title),
        "faults": plot_faults(runs, out / "fig_faults.png", title),
        "spectral_gap": plot_final_against(
            clean,
            spectral_gap,
            "spectral gap of the expected mixing",
            out / "fig_spectral_gap.png",
            title,
            label_of=lambda r: r.settings.get("topology.name", "complete"),
        ),
        "alpha": plot_final_against(
            clean, dirichlet_alpha, "Dirichlet alpha", out / "fig_alpha.png", title, log=True
        ),
        "compression": plot_final_against(
            [r for r in clean if "compression.name" in r.settings],
            mb_sent,
            "MB sent per machine",
            out / "fig_compression.png",
            title,
            label_of=_compression_label,
            log=True,
        ),
        "labels": plot_labels(clean, out / "fig_labels.png", title),
    }
    if non_iid and not iid:  # a non-iid sweep alone: its box plots and samples too
        drawn["fig4"] = plot_boxes(non_iid, out / "fig4_final_scores.png", f"{title} (non-iid)")
        drawn["fig3"] = plot_samples(non_iid, out / "fig3_samples.png", f"{title} (non-iid)")
    records = results(runs)
    table = markdown_table(records)
    (out / "results.json").write_text(json.dumps(records, indent=2) + "\n")
    pairs = pair_table(runs)
    (out / "pairs.json").write_text(json.dumps(pairs, indent=2) + "\n")
    (out / "pairs.md").write_text(pairs_markdown(pairs))
    figures = {k: v for k, v in drawn.items() if v is not None}
    lines = [f"# {title}\n", f"{len(runs)} runs from {', '.join(map(str, roots))}.\n"]
    lines.append(
        "Final scores: mean ± std across machines (and seeds); MS higher is better, FID lower. "
        "`central (N=1)` is one machine with all the data.\n"
    )
    lines.append(table)
    if pairs:
        lines.append(
            "Protocol pairs, final scores A - B paired by seed, with 95% intervals over seeds "
            "(machines nested within seeds):\n"
        )
        lines.append(pairs_markdown(pairs))
    lines += [f"![{k}]({v.name})\n" for k, v in figures.items()]
    (out / "results.md").write_text(table)
    (out / "report.md").write_text("\n".join(lines))
    files = dict(figures)
    files.update(
        table=out / "results.md",
        json=out / "results.json",
        pairs=out / "pairs.md",
        report=out / "report.md",
    )
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ggans.report",
        description="Figures 2-5, quality against bytes, and a table of final scores "
        "from run folders (metrics.jsonl, summary.json), without W&B.",
    )
    parser.add_argument("folders", nargs="+", help="sweep output folders (searched recursively)")
    parser.add_argument("--out", help="where to write (default: <first folder>/figures)")
    parser.add_argument("--title", help="figure title (default: the folder names)")
    args = parser.parse_args(argv)
    try:
        files = report(args.folders, args.out, args.title)
    except FileNotFoundError as err:
        print(f"ggans.report: error: {err}", file=sys.stderr)
        return 2
    for kind, path in files.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
