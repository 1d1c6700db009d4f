import pandas as pd
import pytest

from mobalab.bench import monte_carlo
from mobalab.snr import causal_hit_probability, hit_probability
from mobalab.stats import interval_units


def test_measure_score_level_rows():
    df = monte_carlo.measure(backends=[], min_seconds=0.0, max_trials=20_000)
    assert list(df["implementation"]) == ["binomial", "binomial", "explicit", "explicit"]
    assert list(df["causal"]) == [False, True, False, True]
    assert (df["trials"] <= 20_000).all() and (df["trials_per_s"] > 0).all()
    # each estimate is the router's hit rate at the stated design point, so it sits near the exact model
    exact = {
        False: hit_probability(monte_carlo.SCORE_SNR, monte_carlo.N // monte_carlo.B, monte_carlo.K),
        True: causal_hit_probability(monte_carlo.SCORE_SNR, monte_carlo.N, monte_carlo.B, monte_carlo.K),
    }
    for row in df.itertuples():
        hits = round(row.estimate * row.trials)
        assert abs(interval_units(exact[row.causal], hits, row.trials, confidence=0.999)) < 1, row


def test_measure_checks_its_input():
    with pytest.raises(ValueError, match="backends must be drawn from"):
        monte_carlo.measure(backends=["tpu"])
    with pytest.raises(ValueError, match="max_trials"):
        monte_carlo.measure(backends=[], max_trials=0)


def test_main_prints_the_environment_record_and_writes_the_csv(tmp_path, capsys):
    csv = tmp_path / "mc.csv"
    assert monte_carlo.main(["--backends", "--min-seconds", "0", "--max-trials", "2000", "--csv", str(csv)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# Monte Carlo throughput (") and "logical cores" in out
    assert "| score-level | binomial | False |" in out
    df = pd.read_csv(csv)
    assert len(df) == 4 and {"date", "machine", "gpu", "git_commit"} <= set(df.columns)


def test_runs_as_a_module():
    # `python -m mobalab.bench.monte_carlo` (scripts/gpu_check.sh, step mc) finds the module and its main
    import importlib.util

    spec = importlib.util.find_spec("mobalab.bench.monte_carlo")
    assert spec is not None and 'if __name__ == "__main__":' in open(spec.origin).read()
    script = open(__import__("pathlib").Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.sh").read()
    assert "python3 -m mobalab.bench.monte_carlo" in script and "benchmarks/" not in script
