"""``python -m ggans``: clear one-line errors, and an end-to-end multirun of all protocols."""

import json

import pytest

from conftest import ggans
from ggans.cli import check_group_choices, check_override_keys, config_dir, known_keys
from ggans.errors import GGansError


def _one_error_line(out, message):
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    errors = [line for line in out.stderr.splitlines() if line.startswith("ggans: error")]
    assert len(errors) == 1 and message in errors[0], out.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nodes=0"], "nodes=0: must be an integer >= 1"),
        (["nodes=ten"], "nodes='ten': must be of type integer"),
        (["model.g_lr=fast"], "model.g_lr='fast': must be of type float"),
        (["local_steps=0"], "local_steps=0: must be an integer >= 1"),
        (["local_steps=300", "iterations=200"], "local_steps=300: must be <= iterations"),
        (["local_steps=30", "iterations=100"], "iterations=100: must be a multiple of local_steps"),
        (
            ["protocol=telepathy"],
            "protocol='telepathy': must be one of d_only, federated, g_only, gossip",
        ),
        (["data.split=zipf"], "data.split='zipf': must be one of iid, non_iid, dirichlet"),
        (["model.loss=hinge"], "model.loss='hinge': must be one of wgan_gp, nonsat"),
        (["chunk=3", "nodes=4"], "chunk=3: must divide nodes (4)"),
        (["-m", "nodes=2,0"], "nodes=0: must be an integer >= 1"),
        (["nodes=[1"], "overrides: no viable alternative"),
    ],
)
def test_bad_config_is_one_line_exit_2_and_writes_nothing(args, message, tmp_path):
    """Config-only checks: no data needed, no folder made (each job of a multirun checked)."""
    run_dir = tmp_path / "run"
    out = ggans("model=tiny", f"hydra.run.dir={run_dir}", f"hydra.sweep.dir={run_dir}", *args)
    _one_error_line(out, message)
    assert not run_dir.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["data.dir=/nonexistent/mnist"], "data.dir: folder /nonexistent/mnist does not exist"),
        (["nodes=700", "data.fraction=0.01"], "nodes=700: more machines than training images"),
    ],
)
def test_bad_data_is_one_line_exit_2_and_leaves_nothing(args, message, mnist_dir, tmp_path):
    run_dir = tmp_path / "runs" / "name" / "time"
    out = ggans("model=tiny", f"hydra.run.dir={run_dir}", *args, data_dir=mnist_dir)
    _one_error_line(out, message)
    assert not (tmp_path / "runs" / "name").exists()


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("node=10", "node: unknown key; did you mean nodes?"),
        ("model.gp_wieght=2", "model.gp_wieght: unknown key; did you mean model.gp_weight?"),
        ("foo=1", "foo: unknown key; see python -m ggans --help"),
    ],
)
def test_an_unknown_key_is_one_line_with_the_nearest_key(arg, message, tmp_path):
    """Checked before Hydra composes anything: no data needed, nothing written."""
    out = ggans(f"hydra.run.dir={tmp_path}/run", arg, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == f"ggans: error: {message}"
    assert not (tmp_path / "run").exists()


def test_every_documented_key_is_known():
    keys = known_keys(config_dir())
    for key in ("nodes", "model.impl", "model.precision", "chunk", "logger.mode", "eval.every"):
        assert key in keys
    check_override_keys(
        ["nodes=3", "model.impl=patches", "+extra=1", "hydra.run.dir=x"], config_dir()
    )


def test_group_choices_are_checked_before_hydra():
    conf = config_dir()
    check_group_choices(["protocol=gossip,federated", "model=tiny", "nodes=3"], conf)
    with pytest.raises(
        GGansError,
        match="experiment='slow': must be one of compression, faults, k_sweep, non_iid, partition",
    ):
        check_group_choices(["experiment=slow"], conf)


@pytest.mark.slow  # 50 s: eight runs end to end
def test_multirun_all_protocols_nodes_1_2(mnist_dir, tmp_path):
    """The README's sweep in miniature: 4 protocols x N in {1, 2}, tiny model."""
    out = ggans(
        "-m",
        "protocol=standalone,federated,gossip,gossip_ind",
        "nodes=1,2",
        "model=tiny",
        "iterations=4",
        "local_steps=2",
        "eval.every=0",
        "data.fraction=0.01",
        f"hydra.sweep.dir={tmp_path}",
        data_dir=mnist_dir,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    runs = sorted(p.parent for p in tmp_path.glob("*/metrics.jsonl"))
    names = sorted(p.name for p in runs)
    assert names == sorted(
        f"{p}-N{n}-iid-s0"
        for p in ("standalone", "federated", "gossip", "gossip_ind")
        for n in (1, 2)
    )
    for run in runs:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        n = int(run.name.split("-N")[1].split("-")[0])
        assert [r["round"] for r in rows] == [1, 2]
        assert [r["iteration"] for r in rows] == [2, 4]
        assert len(rows[-1]["g_loss"]) == n
        collaborative = not run.name.startswith("standalone") and n > 1
        assert (rows[-1]["bytes_sent_total"] > 0) == collaborative
        summary = json.loads((run / "summary.json").read_text())
        assert summary["rounds"] == 2 and summary["nodes"] == n


def test_help_says_what_ggans_is_and_names_every_key():
    out = ggans("--help", timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ggans: many GANs on emulated machines")
    groups, rest = out.stdout.split("== Configuration groups ==", 1)[1].split("== Config ==", 1)
    footer = rest.split("Keys (defaults below", 1)[1]
    words = {w.strip(",") for line in footer.splitlines() for w in line.split()}
    documented = {w for w in words if w}
    documented |= {line.split(":")[0].strip() for line in groups.splitlines() if ":" in line}
    wildcards = {w[:-1] for w in documented if w.endswith(".*")}
    keys = known_keys(config_dir())
    leaves = {k for k in keys if not any(other.startswith(f"{k}.") for other in keys)}
    missing = [
        k for k in leaves if k not in documented and not any(k.startswith(w) for w in wildcards)
    ]
    assert sorted(missing) == []
