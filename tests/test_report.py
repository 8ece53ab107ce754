"""``python -m ggans.report``: every figure and the table from a tiny two-protocol sweep."""

from __future__ import annotations

import json
import shutil

import pytest
from omegaconf import OmegaConf

from ggans import protocols
from ggans.config import DataConfig, EvalConfig, ProtocolConfig, RunConfig
from ggans.gan import GanSpec
from ggans.report import color_of, find_runs, main, report, series_label

FIGURES = (
    "fig2_scores.png",
    "fig3_samples.png",
    "fig4_final_scores.png",
    "fig5_non_iid.png",
    "fig_bytes.png",
    "fig_k.png",
    "fig_faults.png",
)


def _save_config(folder, protocol, split, k, node_drop=0.0, message_loss=0.0):
    """Relabel a run folder: its run_config.json (what the report reads) and config.yaml."""
    settings = json.loads((folder / "run_config.json").read_text())
    settings.update(
        {
            "protocol.name": protocol,
            "data.split": split,
            "local_steps": k,
            "faults.node_drop": node_drop,
            "faults.message_loss": message_loss,
        }
    )
    (folder / "run_config.json").write_text(json.dumps(settings))
    OmegaConf.save(
        OmegaConf.create(
            {
                "nodes": 2,
                "protocol": {"name": protocol},
                "local_steps": k,
                "iterations": 4,
                "seed": 0,
                "name": folder.name,
                "data": {"split": split, "fraction": 0.01},
                "model": {"arch": "tiny"},
                "faults": {"node_drop": node_drop, "message_loss": message_loss},
            }
        ),
        folder / "config.yaml",
    )


@pytest.fixture(scope="module")
def tiny_sweep(mnist_dir, mnist, tmp_path_factory):
    """standalone and federated at N = 2, K = 2, iid: two real tiny runs.

    To reach every figure without more compiles, each run folder is also copied and
    relabelled as a non-iid run and as a K = 4 run, and the federated one as runs with
    node drops and with message loss (the report reads only the folders).
    """
    from ggans.run import run

    root = tmp_path_factory.mktemp("sweep")
    for protocol in ("standalone", "federated"):
        cfg = RunConfig(
            nodes=2,
            protocol=ProtocolConfig(protocol),
            local_steps=2,
            iterations=4,
            model=GanSpec(arch="tiny", noise_dim=32),
            data=DataConfig(dir=str(mnist_dir), fraction=0.01),
            eval=EvalConfig(every=1, samples=16, grid_replicas=2),
            name=f"{protocol}-N2-K2-iid-s0",
        )
        out = root / cfg.name
        run(cfg, out, progress=False, mnist=mnist)
        _save_config(out, protocol, "iid", 2)
        for split, k in (("non_iid", 2), ("iid", 4)):
            copy = root / f"{protocol}-N2-K{k}-{split}-s0"
            shutil.copytree(out, copy)
            _save_config(copy, protocol, split, k)
    for drop, loss in ((0.3, 0.0), (0.0, 0.5)):
        copy = root / f"federated-N2-K2-iid-drop{drop}-loss{loss}-s0"
        shutil.copytree(root / "federated-N2-K2-iid-s0", copy)
        _save_config(copy, "federated", "iid", 2, node_drop=drop, message_loss=loss)
    return root


def test_report_draws_every_figure_and_the_table(tiny_sweep, tmp_path):
    runs = find_runs([tiny_sweep])
    assert len(runs) == 8 and all(r.finished for r in runs)
    assert sorted((r.node_drop, r.message_loss) for r in runs if r.faulty) == [
        (0.0, 0.5),
        (0.3, 0.0),
    ]
    assert {r.split for r in runs} == {"iid", "non_iid"}
    out = tmp_path / "figures"
    files = report([tiny_sweep], out, title="tiny")
    for name in FIGURES:
        path = out / name
        assert path.exists() and path.stat().st_size > 5000, name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {p.name for p in files.values()} >= set(FIGURES)
    table = (out / "results.md").read_text()
    assert table.startswith("| split | N | K | protocol | node drop | message loss |")
    assert table.count("| standalone |") == 3 and table.count("| federated |") == 5
    assert "| federated | 0.3 | 0 |" in table and "| federated | 0 | 0.5 |" in table
    records = json.loads((out / "results.json").read_text())
    fed = [r for r in records if r["protocol"] == "federated" and r["split"] == "iid"]
    assert len(fed) == 4 and all(r["ms_mean"] >= 1.0 for r in fed)
    assert all(r["mb_sent_per_machine"] > 0 for r in fed)
    assert all(r["mb_sent_per_machine"] == 0 for r in records if r["protocol"] == "standalone")
    assert "![fig2](fig2_scores.png)" in (out / "report.md").read_text()


def test_report_command(tiny_sweep, capsys):
    assert main([str(tiny_sweep / "standalone-N2-K2-iid-s0")]) == 0
    printed = capsys.readouterr().out
    assert "fig2:" in printed and "table:" in printed
    assert (tiny_sweep / "standalone-N2-K2-iid-s0" / "figures" / "results.md").exists()


def test_report_without_runs_is_an_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no run folders" in capsys.readouterr().err


def test_runs_that_differ_in_another_setting_are_labelled_apart_not_pooled(tiny_sweep, tmp_path):
    root = tmp_path / "two_losses"
    for seed, loss in ((0, "wgan_gp"), (1, "wgan_gp"), (0, "nonsat")):
        copy = root / f"standalone-{loss}-s{seed}"
        shutil.copytree(tiny_sweep / "standalone-N2-K2-iid-s0", copy)
        settings = json.loads((copy / "run_config.json").read_text())
        (copy / "run_config.json").write_text(
            json.dumps(dict(settings, **{"model.loss": loss, "seed": seed}))
        )
    report([root], tmp_path / "figures")
    records = json.loads((tmp_path / "figures" / "results.json").read_text())
    by = {r["protocol"]: r for r in records}
    assert set(by) == {"standalone [model.loss=nonsat]", "standalone [model.loss=wgan_gp]"}
    assert by["standalone [model.loss=wgan_gp]"]["seeds"] == [0, 1]
    assert by["standalone [model.loss=nonsat]"]["seeds"] == [0]


def test_beyond_the_paper_figures_place_runs_by_gap_alpha_and_bytes(tiny_sweep, tmp_path):
    from ggans.report import dirichlet_alpha, mb_sent, spectral_gap

    root, src = tmp_path / "beyond", tiny_sweep / "federated-N2-K2-iid-s0"

    def variant(name, settings=None, summary=None, labels=None):
        copy = root / name
        shutil.copytree(src, copy)
        saved = json.loads((copy / "run_config.json").read_text())
        (copy / "run_config.json").write_text(json.dumps(dict(saved, **(settings or {}))))
        done = json.loads((copy / "summary.json").read_text())
        (copy / "summary.json").write_text(json.dumps(dict(done, **(summary or {}))))
        if labels is not None:
            (copy / "labels.json").write_text(json.dumps({"counts": labels}))

    for topology, gap in (("ring", 0.2), ("complete", 1.0)):
        variant(f"gossip-{topology}", {"topology.name": topology}, {"spectral_gap": gap})
    for alpha in (0.1, 10):
        variant(f"dirichlet-{alpha}", {"data.split": "dirichlet", "data.alpha": alpha},
                labels=[[9, 1], [1, 9]])  # fmt: skip
    variant("topk", {"compression.name": "topk", "compression.fraction": 0.01})
    variant("full", {"compression.name": "none"})
    runs = {r.folder.name: r for r in find_runs([root])}
    assert spectral_gap(runs["gossip-ring"]) == 0.2
    assert dirichlet_alpha(runs["dirichlet-10"]) == 10 and dirichlet_alpha(runs["full"]) is None
    assert mb_sent(runs["topk"]) == pytest.approx(runs["topk"].last("bytes_sent_mean") / 1e6)
    files = report([root], tmp_path / "figures")
    for kind in ("spectral_gap", "alpha", "labels"):
        assert files[kind].stat().st_size > 5000, kind
    assert "compression" not in files  # both compression runs sent the same bytes: one x


def test_intervals_and_the_pair_table_on_a_made_up_sweep(tiny_sweep, tmp_path):
    """Five seeds of two protocols whose final FIDs are made up: federated 5 below standalone
    in every seed (a seed effect shared by both), MS equal in distribution."""
    import numpy as np

    from ggans.report import pair_table

    root = tmp_path / "made_up"
    rng = np.random.default_rng(0)
    for seed in range(5):
        offset = rng.normal(0, 10)
        for protocol, shift in (("standalone", 0.0), ("federated", -5.0)):
            copy = root / f"{protocol}-s{seed}"
            shutil.copytree(tiny_sweep / f"{protocol}-N2-K2-iid-s0", copy)
            settings = json.loads((copy / "run_config.json").read_text())
            (copy / "run_config.json").write_text(json.dumps(dict(settings, seed=seed)))
            summary = json.loads((copy / "summary.json").read_text())
            fid = [100 + offset + shift + rng.normal(0, 0.5) for _ in range(2)]
            summary["final"].update(fid=fid, ms=[5 + rng.normal(0, 0.5) for _ in range(2)])
            (copy / "summary.json").write_text(json.dumps(summary))
    runs = find_runs([root])
    (pair,) = pair_table(runs)
    assert (pair["a"], pair["b"], pair["fid_seeds"]) == ("standalone", "federated", 5)
    assert pair["fid_difference"] == pytest.approx(5.0, abs=0.5)
    assert pair["fid_excludes_0"] and pair["fid_low"] > 3 and pair["fid_high"] < 7
    assert not pair["ms_excludes_0"]
    files = report([root], tmp_path / "figures")
    records = {r["protocol"]: r for r in json.loads(files["json"].read_text())}
    fed = records["federated"]
    assert fed["fid_ci_low"] < fed["fid_seeds_mean"] < fed["fid_ci_high"]
    assert fed["fid_ci_high"] - fed["fid_ci_low"] > 5  # the seed effect (sd 10) shows
    assert "| iid | 2 | 2 | standalone | federated | 5 | 4.85 [" in files["pairs"].read_text()
    assert "Protocol pairs" in files["report"].read_text()


def test_every_registered_protocol_has_its_own_colour():
    # neighbourhood once fell back to matplotlib's first colour, federated's blue.
    colours = [color_of(name) for name in (*protocols.names(), "central")]
    assert len(set(colours)) == len(colours)
    assert color_of("federated") == "tab:blue"


def test_tick_labels_keep_the_settings_values_only():
    assert series_label(("gossip [topology.name=ring]", 100), short=True) == "gossip ring K=100"
    assert series_label(("gossip [compression.bits=4, compression.name=quantize]", 0),
                        short=True) == "gossip 4 quantize"  # fmt: skip
    assert series_label(("gossip [topology.name=ring]", 0)) == "gossip [topology.name=ring]"
    assert series_label(("central", 0), short=True) == "central (N=1)"
