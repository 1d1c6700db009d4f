import subprocess
import sys

import pytest

from mobalab.bench import monte_carlo


def test_measure_score_level_rows():
    df = monte_carlo.measure(backends=[], min_seconds=0.0, max_trials=4_000)
    assert list(df["implementation"]) == ["binomial", "binomial", "explicit", "explicit"]
    assert list(df["causal"]) == [False, True, False, True]
    assert (df["trials"] <= 4_000).all() and (df["trials_per_s"] > 0).all()
    assert df["estimate"].between(0, 1).all()


def test_measure_checks_its_input():
    with pytest.raises(ValueError, match="backends must be drawn from"):
        monte_carlo.measure(backends=["tpu"])
    with pytest.raises(ValueError, match="max_trials"):
        monte_carlo.measure(backends=[], max_trials=0)


def test_runs_as_a_module_with_the_environment_record(tmp_path):
    csv = tmp_path / "mc.csv"
    out = subprocess.run([sys.executable, "-m", "mobalab.bench.monte_carlo", "--backends", "--min-seconds", "0",
                          "--max-trials", "2000", "--csv", str(csv)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("# Monte Carlo throughput (") and "logical cores" in out.stdout
    assert "| score-level | binomial | False |" in out.stdout
    import pandas as pd

    df = pd.read_csv(csv)
    assert len(df) == 4 and {"date", "machine", "gpu", "git_commit"} <= set(df.columns)
