"""Partitioners: seeded, disjoint and complete, each with the skew it promises; bad
parameters one line naming the key; each run's label histogram written once."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import tiny_run_config
from ggans.config import DataConfig, from_dict, validate
from ggans.errors import ConfigError
from ggans.partitions import Params, histogram, split_indices

LABELS = np.random.default_rng(0).integers(0, 10, 6000)
POOL = np.sort(np.random.default_rng(1).permutation(6000)[:5000])  # a data.fraction share
NEW = ["dirichlet", "classes", "shards", "quantity"]


def deal(split, nodes=20, seed=0, **kw):
    return split_indices(LABELS, nodes, split, seed, POOL, 10, Params(**kw))


@pytest.mark.parametrize("split", NEW + ["non_iid"])
def test_each_is_seeded_disjoint_and_complete(split):
    parts = deal(split)
    together = np.concatenate(parts)
    assert len(together) == len(np.unique(together)) == len(POOL)  # disjoint, complete
    assert set(together.tolist()) == set(POOL.tolist())
    again, other = deal(split), deal(split, seed=1)
    assert all((a == b).all() for a, b in zip(parts, again, strict=True))
    assert any(len(a) != len(b) or (a != b).any() for a, b in zip(parts, other, strict=True))


def test_dirichlet_concentrates_labels_as_alpha_falls():
    def top_share(alpha):  # mean share of a machine's images in its most common label
        h = histogram(LABELS, deal("dirichlet", alpha=alpha), 10)
        return float((h.max(1) / h.sum(1)).mean())

    shares = [top_share(a) for a in (0.1, 1.0, 10.0)]
    print("dirichlet top-label share at alpha 0.1, 1, 10:", [round(s, 2) for s in shares])
    assert shares[0] > 0.6 > shares[1] > shares[2] and shares[2] < 0.25


def test_classes_gives_each_machine_exactly_k_labels():
    h = histogram(LABELS, deal("classes", classes_per_machine=3), 10)
    assert ((h > 0).sum(1) == 3).all()


def test_shards_deals_equal_label_sorted_pieces():
    parts = deal("shards", shards_per_machine=2)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 2  # 40 near-equal shards, two each
    assert ((histogram(LABELS, parts, 10) > 0).sum(1) <= 4).all()  # a shard spans <= 2 labels


def test_quantity_skews_sizes_not_labels():
    parts = deal("quantity", alpha=0.5)
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() >= 1 and sizes.max() > 4 * np.median(sizes) / 2
    big = parts[int(np.argmax(sizes))]
    share = np.bincount(LABELS[big], minlength=10) / len(big)
    assert share.max() < 0.2  # iid labels within a machine


@pytest.mark.parametrize(
    "data, nodes, message",
    [
        ({"split": "dirichlet", "alpha": 0}, 4, "data.alpha=0: must be a number > 0"),
        ({"split": "quantity", "alpha": -1}, 4, "data.alpha=-1"),
        ({"split": "classes", "classes_per_machine": 0}, 10, "data.classes_per_machine=0"),
        ({"split": "classes", "classes_per_machine": 11}, 10, "must be an integer in 1..10"),
        ({"split": "classes", "classes_per_machine": 2}, 4, "nodes x classes_per_machine"),
        ({"split": "shards", "shards_per_machine": 0}, 4, "data.shards_per_machine=0"),
        ({"split": "zipf"}, 4, "data.split='zipf': must be one of iid, non_iid, dirichlet"),
    ],
)
def test_bad_partitioner_parameters_are_one_line_naming_the_key(data, nodes, message):
    with pytest.raises(ConfigError) as err:
        validate(from_dict({"nodes": nodes, "data": data}))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_run_writes_each_machines_label_histogram_once(mnist, tmp_path):
    from ggans.run import run

    cfg = tiny_run_config(nodes=3, data=DataConfig(fraction=0.02, split="classes",
                                                   classes_per_machine=4))  # fmt: skip
    run(cfg, tmp_path, mnist=mnist, progress=False)
    saved = json.loads((tmp_path / "labels.json").read_text())
    counts = np.array(saved["counts"])
    assert saved["split"] == "classes" and counts.shape == (3, 10)
    assert ((counts > 0).sum(1) == 4).all()
    assert counts.sum() == round(0.02 * len(mnist.train_labels))
