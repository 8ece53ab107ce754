"""The benchmark's plumbing on the tiny model (it asserts no timings: speed is not tested)."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench  # noqa: E402  (benchmarks/bench.py)


@pytest.mark.slow
def test_bench_records_round_naive_and_torch(tmp_path, capsys):
    """One run of ``main`` spawns a round and a naive job and merges a yardstick's output
    (a stand-in script printing what torch_replicas.py prints) into its JSON and table."""
    fake = tmp_path / "fake_torch.py"
    fake.write_text(
        "import json, sys\n"
        "print(json.dumps({'n': 10, 'mode': 'loop', 'replica_steps_per_s_median': 2.5}))\n"
    )
    out = tmp_path / "bench.json"
    bench.main(
        ["--models", "tiny", "--losses", "nonsat", "--nodes", "2", "--steps", "2"]
        + ["--repeats", "1", "--exchange", "", "--eval", "", "--out", str(out)]
        + ["--torch-python", sys.executable, "--torch-script", str(fake)]
    )
    records = {r["kind"]: r for r in json.loads(out.read_text())}
    assert set(records) == {"round", "naive", "torch"}
    assert not any("error" in r for r in records.values()), records
    assert records["round"]["n"] == 2 and records["round"]["round_rate_median"] > 0
    assert records["naive"]["naive_rate_median"] > 0
    assert records["torch"] == {
        "n": 10,
        "mode": "loop",
        "replica_steps_per_s_median": 2.5,
        "kind": "torch",
        "loss": "nonsat",
    }
    assert "| tiny | nonsat | 2 |" in capsys.readouterr().out


def test_a_killed_job_is_reported_with_its_signal(monkeypatch):
    class Killed:
        returncode, stdout, stderr = -9, "", ""

    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: Killed())
    job = {"kind": "naive", "n": 100}
    assert bench._spawn(job, 1.0) == {"kind": "naive", "n": 100, "error": "killed by signal 9"}


def test_table_shows_the_torch_rate_and_dashes_for_what_was_not_run(capsys):
    rnd = {"arch": "paper", "loss": "nonsat", "n": 10, "kind": "round", "round_rate_min": 6.0}
    rnd |= {"round_rate_median": 6.5, "compile_s": 5.0, "peak_memory_gib": 3.75, "peak_share": 0.3}
    rnd |= {"impl": "patches", "precision": "bf16"}
    bench.print_table([rnd], {"nonsat": {"replica_steps_per_s_median": 8.125}})
    row = capsys.readouterr().out.splitlines()[2]
    expected = "| paper | nonsat | 10 | patches | bf16 | 6.00 / 6.50 | - | - | 8.12 | 0.80x | 5.0 |"
    assert row == expected + " 3.75 | 30% |"
