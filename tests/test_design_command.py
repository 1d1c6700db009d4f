import pandas as pd
import pytest

from mobalab import cli, snr
from mobalab._design_command import automatic_variant, design, format_design, kernel_cost
from mobalab.experiments.kernel_speed import find_bench_csv

DESIGN = ["design", "--head-dim", "64", "--seq-len", "8192", "--top-k", "8", "--target", "0.9"]


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
    assert df["kernel_ms"].isna().all() and (df["bench_rows"] == 0).all()


def _bench_rows():
    """Forward rows like `mobalab bench` writes: two kernels and two workloads at one configuration."""
    base = dict(seqlen=8192, head_dim=64, top_k=8)
    return pd.DataFrame([
        dict(base, workload="random", block=64, variant="resident", mobalab_ms=1.0),
        dict(base, workload="random", block=64, variant="streaming", mobalab_ms=3.0),
        dict(base, workload="clustered", block=64, variant="resident", mobalab_ms=0.5),
        dict(base, workload="random", block=512, variant="streaming", mobalab_ms=2.0),
    ])


def test_kernel_cost_takes_the_automatic_kernel_and_the_random_workload():
    bench = _bench_rows()
    assert automatic_variant(64, 64) == "resident" and automatic_variant(64, 512) == "streaming"
    assert kernel_cost(bench, 64, 8192, 64, top_k=8) == {"ms": 1.0, "kernel": "resident", "workload": "random",
                                                         "rows": 1}
    # only the non-automatic kernel measured: taken, and named
    only = bench[bench["variant"] == "streaming"]
    assert kernel_cost(only, 64, 8192, 64)["kernel"] == "streaming"
    assert kernel_cost(bench, 128, 8192, 64)["rows"] == 0
    with pytest.raises(ValueError, match="lacks column"):
        kernel_cost(bench.drop(columns="mobalab_ms"), 64, 8192, 64)


def test_design_reports_which_kernel(tmp_path):
    csv = tmp_path / "bench.csv"
    _bench_rows().to_csv(csv, index=False)
    df = design(64, 8192, 8, 0.5, delta_mu=0.5, m=4, causal=False, block_sizes=(64, 128, 512), bench_csv=csv)
    assert list(df["kernel_ms"].fillna(-1)) == [2.0, -1, 1.0]
    assert list(df["kernel"].fillna("-")) == ["streaming", "-", "resident"]
    text = format_design(df)
    assert "kernel ms" in text and "resident" in text and "streaming" in text
    assert "cheapest feasible: B = 64 at 1.000 ms (resident kernel, random workload)" in text


def test_design_reads_the_recorded_benchmark_csvs():
    fwd = pd.read_csv(find_bench_csv("recorded"))
    # 64K, d 128, B 128: resident (automatic) and streaming rows, random and clustered workloads
    assert len(fwd[(fwd["seqlen"] == 65536) & (fwd["block"] == 128) & (fwd["head_dim"] == 128)]) == 3
    cost = kernel_cost(fwd, 128, 65536, 128, top_k=8)
    want = fwd[(fwd["seqlen"] == 65536) & (fwd["block"] == 128) & (fwd["head_dim"] == 128)
               & (fwd["workload"] == "random") & (fwd["variant"] == "resident")]["mobalab_ms"]
    assert cost == {"ms": float(want.iloc[0]), "kernel": "resident", "workload": "random", "rows": 1}
    df = design(128, 65536, 8, 0.9, delta_mu=0.3, m=4, block_sizes=(32, 128), bench_csv="recorded")
    assert (df["bench_rows"] > 0).all() and df["kernel_ms"].notna().all()
    assert "RECORDED forward benchmark" in format_design(df)
    bwd = design(128, 65536, 8, 0.9, delta_mu=0.3, m=4, block_sizes=(128,),
                 bench_csv="2026-11-22-h200-moba-fwdbwd-e4ca8e1.csv")
    assert bwd["kernel"].iloc[0] == "forward+backward" and bwd["kernel_ms"].iloc[0] == pytest.approx(33.2437744)


def test_cli_design(capsys):
    assert cli.main(["design", "--head-dim", "64", "--seq-len", "131072", "--top-k", "8", "--target", "0.99",
                     "--delta-mu", "0.3", "--m", "8", "--block-sizes", "16,32,64"]) == 0
    out = capsys.readouterr().out
    assert "no benchmark data" in out and "Δμ_eff = 2.4" in out and "causal" in out
    lines = [line.split() for line in out.splitlines() if line.strip()[:2] in ("16", "32", "64")]
    assert [int(x[0]) for x in lines] == [64, 32, 16]


def test_cli_design_non_causal(capsys):
    assert cli.main([*DESIGN, "--delta-mu", "0.5", "--m", "4", "--non-causal"]) == 0
    assert "non-causal" in capsys.readouterr().out


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--m", "2.5", "argument --m: must be an integer >= 1, got '2.5'"),
    ("--m", "0", "argument --m: must be an integer >= 1, got '0'"),
    ("--mu-cluster", "5", "argument --mu-cluster: a cosine lies in [-1, 1], got '5'"),
    ("--mu-noise", "-1.5", "argument --mu-noise: a cosine lies in [-1, 1], got '-1.5'"),
    ("--delta-mu", "nan", "argument --delta-mu: must be a finite number, got 'nan'"),
    ("--delta-mu", "3", "argument --delta-mu: a difference of two cosines lies in [-2, 2], got '3'"),
    ("--target", "1.5", "argument --target: a target probability lies strictly between 0 and 1, got '1.5'"),
    ("--head-dim", "-64", "argument --head-dim: must be an integer >= 1, got '-64'"),
    ("--bench-csv", "no-such.csv", "argument --bench-csv: benchmark CSV 'no-such.csv' does not exist"),
])
def test_cli_design_refuses_bad_input_at_argparse_level(flag, value, message, capsys):
    argv = [a for a in DESIGN]
    if flag in argv:
        i = argv.index(flag)
        argv[i + 1] = value
    else:
        argv += [flag, value]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: mobalab design") and message in err


def test_cli_design_needle_cosine_out_of_range(capsys):
    assert cli.main([*DESIGN, "--mu-noise", "0.9", "--delta-mu", "0.3"]) == 2
    assert "--mu-noise + --delta-mu = 1.2 lies outside [-1, 1]" in capsys.readouterr().err


def test_cli_design_help_names_the_real_columns(capsys):
    assert cli.main(["design", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "seqlen, head_dim, block, top_k, workload, variant, mobalab_ms" in text
    assert "impl" not in text and "seq_len," not in text


def test_design_takes_block_sizes_as_a_numpy_array():
    import numpy as np

    df = design(64, 8192, 8, 0.8, delta_mu=0.5, m=4, causal=False, block_sizes=np.array([32, 128]))
    assert list(df["block_size"]) == [128, 32]
    with pytest.raises(ValueError, match=r"block_sizes must name at least one block size, got array\(\[\]"):
        design(64, 8192, 8, 0.8, block_sizes=np.array([], dtype=int))


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(mu_noise=2.0), "mu_noise is a cosine and must lie in [-1, 1], got 2.0"),
    (dict(mu_noise=0.9, delta_mu=0.3), "mu_cluster defaults to mu_noise + delta_mu = 0.9 + 0.3 = 1.2, outside"),
])
def test_design_names_the_signal_input_that_is_out_of_range(kwargs, message):
    with pytest.raises(ValueError) as info:
        design(64, 8192, 8, 0.8, **kwargs)
    assert message in str(info.value)


def test_design_decode_cost_takes_a_numpy_integer_context():
    import numpy as np

    from mobalab._design_command import decode_cost

    df = design(128, 32768, 8, 0.5, delta_mu=0.5, m=4, block_sizes=(64, 128))
    cost = decode_cost(df, np.int64(32768))
    assert int(cost["seq_len"].iloc[0]) == 32768 and cost.attrs["bench_csv"] is None
    with pytest.raises(ValueError, match="decode context must be an integer >= 2 tokens, got True"):
        decode_cost(df, True)


def test_cli_design_names_a_bench_csv_of_another_kind(tmp_path, capsys):
    csv = tmp_path / "decode.csv"
    pd.DataFrame(dict(seq_len=[8192], block_size=[64], top_k=[8], mobalab_ms=[0.1])).to_csv(csv, index=False)
    assert cli.main([*DESIGN, "--bench-csv", str(csv)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"mobalab design: {csv}: benchmark CSV lacks column(s)" in captured.err
