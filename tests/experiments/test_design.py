import pandas as pd
import pytest

from mobalab import cli, snr
from mobalab.experiments.design import design, format_design, kernel_cost


def test_design_table_matches_snr():
    df = design(64, 8192, 8, 0.9, delta_mu=0.5, m=4, causal=False)
    assert list(df["block_size"]) == [512, 256, 128, 64, 32, 16]
    assert (df["delta_mu_eff"] == 2.0).all()
    ref = snr.design_table(64, 8192, 8, 2.0, (512, 256, 128, 64, 32, 16), causal=False, target=0.9)
    pd.testing.assert_series_equal(df["hit_probability"], ref["hit_probability"])
    ok = df[df["meets_target"].astype(bool)]
    assert int(ok["block_size"].max()) == snr.largest_block_size(0.9, 64, 8192, 8, 2.0, causal=False)
    # the smallest top-k reaches the target, one fewer does not
    for _, r in df.dropna(subset=["smallest_top_k"]).iterrows():
        k = int(r["smallest_top_k"])
        n = r["n_blocks"]
        assert snr.hit_probability(r["snr"], n, k) >= 0.9
        if k > 1:
            assert snr.hit_probability(r["snr"], n, k - 1) < 0.9
    assert df["kernel_ms"].isna().all()


def test_bench_cost(tmp_path):
    csv = tmp_path / "bench.csv"
    pd.DataFrame({"impl": ["mobalab", "mobalab", "fa2", "mobalab"], "block_size": [64, 64, 64, 128],
                  "seq_len": [8192] * 4, "head_dim": [64] * 4, "ms": [1.0, 3.0, 9.0, 2.0]}).to_csv(csv, index=False)
    bench = pd.read_csv(csv)
    assert kernel_cost(bench, 64, 8192, 64) == (2.0, 2)
    df = design(64, 8192, 8, 0.5, delta_mu=0.5, m=4, causal=False, block_sizes=(64, 128, 256), bench_csv=csv)
    assert list(df["kernel_ms"].fillna(-1)) == [-1, 2.0, 2.0]
    text = format_design(df)
    assert "kernel ms" in text and "cheapest feasible" in text
    with pytest.raises(ValueError, match="lacks column"):
        kernel_cost(bench.drop(columns="ms"), 64, 8192, 64)


def test_cli_design(capsys):
    assert cli.main(["design", "--head-dim", "64", "--seq-len", "131072", "--top-k", "8", "--target", "0.99",
                     "--delta-mu", "0.3", "--m", "8", "--block-sizes", "16,32,64"]) == 0
    out = capsys.readouterr().out
    assert "no benchmark data" in out and "Δμ_eff = 2.4" in out and "causal" in out
    lines = [line.split() for line in out.splitlines() if line.strip()[:2] in ("16", "32", "64")]
    assert [int(x[0]) for x in lines] == [64, 32, 16]


def test_cli_design_non_causal_and_bad_input(capsys):
    assert cli.main(["design", "--head-dim", "64", "--seq-len", "8192", "--top-k", "8", "--target", "0.9",
                     "--delta-mu", "0.5", "--m", "4", "--non-causal"]) == 0
    assert "non-causal" in capsys.readouterr().out
    assert cli.main(["design", "--head-dim", "64", "--seq-len", "8192", "--top-k", "8", "--target", "1.5"]) == 2
    assert "target" in capsys.readouterr().err


def test_bench_cost_reads_the_benchmark_csv():
    from pathlib import Path

    csv = sorted((Path(__file__).resolve().parents[2] / "benchmarks" / "results").glob("*moba-forward*.csv"))[-1]
    bench = pd.read_csv(csv)
    ms, rows = kernel_cost(bench, 128, 65536, 128, top_k=8)
    want = bench[(bench["seqlen"] == 65536) & (bench["block"] == 128) & (bench["head_dim"] == 128)]["mobalab_ms"]
    assert rows == len(want) >= 1 and ms == want.median()
    df = design(128, 65536, 8, 0.9, delta_mu=0.3, m=4, block_sizes=(32, 128), bench_csv=csv)
    assert (df["bench_rows"] > 0).all() and df["kernel_ms"].notna().all()
