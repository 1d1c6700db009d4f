import json
import math

import pandas as pd
import pytest

from mobalab import cli, snr
from mobalab.experiments import decode_cost as exp
from mobalab.kernels import decode_bytes

K = 1024


@pytest.fixture(scope="module")
def df():
    return exp.run(exp.Config.quick(bench_csv=None))


def test_schema_and_grid(df):
    need = {"experiment", "seq_len", "block_size", "top_k", "n_blocks", "snr", "hit_probability", "target",
            "meets_target", "centroid_bytes", "kv_bytes", "q_out_bytes", "bytes_per_step", "dense_bytes",
            "byte_ratio", "unique_blocks", "useful_flops", "measured_ms", "dense_ms", "cheapest",
            "cheapest_measured", "head_dim", "heads", "kv_heads", "batch", "delta_mu_eff"}
    assert need <= set(df.columns)
    cfg = exp.Config.quick()
    assert len(df) == len(cfg.seq_lens) * len(cfg.block_sizes) * len(cfg.top_ks)
    assert df["hit_probability"].between(0, 1).all() and df["measured_ms"].isna().all()
    assert not df["cheapest_measured"].any()


def test_rows_are_the_models(df):
    r = df[(df["seq_len"] == 512 * K) & (df["block_size"] == 64) & (df["top_k"] == 8)].iloc[0]
    s = snr.snr(128, 64, 3.0)  # Δμ_eff = 0.5 + 5 * 0.5
    assert r["snr"] == pytest.approx(s)
    assert r["hit_probability"] == pytest.approx(snr.causal_hit_probability(s, 512 * K, 64, 8, query_pos=512 * K - 1))
    model = decode_bytes(512 * K, 64, 8, batch=8, heads=32, kv_heads=8, head_dim=128)
    assert r["bytes_per_step"] == model["total_bytes"] and r["dense_bytes"] == model["dense_bytes"]


def test_cheapest_is_the_feasible_minimum(df):
    for _, g in df.groupby("seq_len"):
        feasible = g[g["meets_target"]]
        best = g[g["cheapest"]]
        assert len(best) == (1 if len(feasible) else 0)
        if len(feasible):
            assert best["bytes_per_step"].iloc[0] == feasible["bytes_per_step"].min()
            assert best["hit_probability"].iloc[0] >= best["target"].iloc[0]
    # smaller blocks route better at equal k (SNR ~ 1/sqrt(B)) but read more block sums
    g = df[(df["seq_len"] == 512 * K) & (df["top_k"] == 8)].sort_values("block_size")
    assert g["hit_probability"].is_monotonic_decreasing and g["centroid_bytes"].is_monotonic_decreasing


def test_measured_times_from_a_benchmark_csv(tmp_path, monkeypatch):
    monkeypatch.delenv("MOBALAB_DECODE_KERNEL", raising=False)
    rows = []
    for n in (32 * K, 128 * K):
        for block in (32, 64):
            for top_k in (4, 8):
                rows.append(dict(seq_len=n, batch=8, heads=32, kv_heads=8, head_dim=128, block_size=block,
                                 top_k=top_k, mobalab_ms=0.01 * block / 32 + 0.001 * top_k, dense_best_ms=0.5))
    rows.append(dict(rows[0], batch=1, mobalab_ms=1e-6))  # another batch size: ignored
    for r in rows:  # both decode kernels timed: the rows of the default one (split) count
        r["kernel"] = "split"
    rows += [dict(r, kernel="fused", mobalab_ms=10.0) for r in rows]
    path = tmp_path / "decode.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    df = exp.run(exp.Config.quick(seq_lens=(32 * K, 128 * K), block_sizes=(32, 64), top_ks=(4, 8), target=0.5,
                                  bench_csv=str(path)))
    assert df["measured_ms"].notna().all()
    r = df[(df["seq_len"] == 32 * K) & (df["block_size"] == 32) & (df["top_k"] == 4)].iloc[0]
    assert r["measured_ms"] == pytest.approx(0.014) and r["measured_speedup"] == pytest.approx(0.5 / 0.014)
    for _, g in df.groupby("seq_len"):
        timed = g[g["cheapest_measured"]]
        assert len(timed) == 1
        assert timed["measured_ms"].iloc[0] == g[g["meets_target"]]["measured_ms"].min()
    s = exp.summary(df)
    assert {"measured_block_size", "measured_ms", "measured_speedup"} <= set(s.columns)


def test_input_precision_counts_16_bit_means_and_its_own_timings(tmp_path, monkeypatch):
    """centroid_precision "input": the byte model reads the block means at the cache's itemsize (half the fp32
    sums' bytes, K / V unchanged), and only the benchmark's rows of that routing precision are its timings (a CSV
    without the column holds fp32 rows)."""
    monkeypatch.delenv("MOBALAB_DECODE_KERNEL", raising=False)
    grid = dict(seq_lens=(128 * K,), block_sizes=(64,), top_ks=(8,), bench_csv=None)
    fp32 = exp.run(exp.Config.quick(**grid)).iloc[0]
    half = exp.run(exp.Config.quick(centroid_precision="input", **grid)).iloc[0]
    assert half["centroid_bytes"] * 2 == fp32["centroid_bytes"] and half["kv_bytes"] == fp32["kv_bytes"]
    assert half["centroid_precision"] == "input" and fp32["centroid_precision"] == "fp32"
    row = dict(seq_len=128 * K, batch=8, heads=32, kv_heads=8, head_dim=128, block_size=64, top_k=8,
               dense_best_ms=0.5)
    both = tmp_path / "both.csv"
    pd.DataFrame([dict(row, mobalab_ms=0.08, centroid_precision="fp32"),
                  dict(row, mobalab_ms=0.05, centroid_precision="input")]).to_csv(both, index=False)
    for precision, ms in (("fp32", 0.08), ("input", 0.05)):
        got = exp.run(exp.Config.quick(centroid_precision=precision, **dict(grid, bench_csv=str(both))))
        assert got["measured_ms"].iloc[0] == pytest.approx(ms)
    pd.DataFrame([dict(row, mobalab_ms=0.08)]).to_csv(tmp_path / "old.csv", index=False)  # no column: fp32 rows
    assert exp.run(exp.Config.quick(**dict(grid, bench_csv=str(tmp_path / "old.csv"))))["measured_ms"].iloc[0] == 0.08
    old_input = exp.run(exp.Config.quick(centroid_precision="input", **dict(grid, bench_csv=str(tmp_path / "old.csv"))))
    assert math.isnan(old_input["measured_ms"].iloc[0])


def test_bad_inputs():
    with pytest.raises(ValueError, match="target must be a probability"):
        exp.decode_cost_table(1024, 1.5)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        exp.run(exp.Config.quick(bench_csv="/nonexistent/decode.csv"))
    for grid in ("seq_lens", "block_sizes", "top_ks"):
        with pytest.raises(ValueError, match=f"{grid} must name at least one"):
            exp.run(exp.Config.quick(bench_csv=None, **{grid: ()}))


def test_summary_and_plot(df):
    s = exp.summary(df)
    assert list(s["seq_len"]) == sorted(exp.Config.quick().seq_lens)
    assert (s["x_fewer_bytes"].dropna() > 1).all()
    unreachable = exp.run(exp.Config.quick(delta_mu=0.01, m=1, seq_lens=(512 * K,), target=0.99))
    assert math.isnan(exp.summary(unreachable)["block_size"].iloc[0])
    fig = exp.plot(df)
    labelled = [ax for ax in fig.axes if ax.get_xlabel()]
    assert len(labelled) == len(exp.Config.quick().seq_lens) + 1
    assert all(ax.get_ylabel() for ax in labelled)


def test_cli_quick_writes_outputs(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(exp.ENV_VAR, raising=False)
    out = tmp_path / "dc"
    assert cli.main(["run", "decode-cost", "--quick", "--out", str(out), "--no-progress"]) == 0
    assert "x_fewer_bytes" in capsys.readouterr().out
    df = pd.read_csv(out / "decode-cost.csv")
    assert len(df) == 36 and json.loads((out / "decode-cost.json").read_text())["rows"] == len(df)
    assert (out / "decode-cost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_recorded_means_the_newest_recorded_decode_benchmark():
    """`recorded` names a file of the latest date among the recorded decode benchmarks (file names start with
    the date; a benchmark recorded later must move RECORDED_BENCH along)."""
    from mobalab.bench import recorded_files

    decode = recorded_files("*-decode-*.csv")
    newest_date = max(p.name[:10] for p in decode)
    path = exp.find_bench_csv("recorded")
    assert path.name == exp.RECORDED_BENCH and path in decode
    assert exp.RECORDED_BENCH.startswith(newest_date)
    assert not exp.read_decode_bench(path).empty
    assert exp.find_bench_csv("2026-11-30-h200-decode-bc7caa8").name == "2026-11-30-h200-decode-bc7caa8.csv"
    with pytest.raises(FileNotFoundError, match=r"recorded CSVs: 2026-11-30-h200-decode-.*bench --decode"):
        exp.find_bench_csv("no-such.csv")
    with pytest.raises(TypeError, match="must be a path, 'recorded' or a recorded CSV's name"):
        exp.find_bench_csv(3)


def test_the_environment_variable_takes_the_same_forms(monkeypatch):
    monkeypatch.setenv(exp.ENV_VAR, "recorded")
    df = exp.run(exp.Config.quick())
    assert set(df["bench_csv"]) == {str(exp.find_bench_csv("recorded"))} and df["measured_ms"].notna().any()


def test_plan_names_the_work_and_the_benchmark(tmp_path):
    cfg = exp.Config.quick(bench_csv=None)
    assert exp.plan(cfg).startswith("byte model on the CPU: 3 contexts x 4 block sizes x 3 top-k = 36 points")
    assert "no decode benchmark CSV" in exp.plan(cfg)
    assert exp.plan(exp.Config.quick(bench_csv="recorded")).endswith(
        f"step times from the recorded decode benchmark {exp.RECORDED_BENCH}")
    wrong = tmp_path / "wrong.csv"
    pd.DataFrame({"seq_len": [1]}).to_csv(wrong, index=False)
    with pytest.raises(ValueError, match="lacks the columns"):  # refused before the run, not after
        exp.plan(exp.Config.quick(bench_csv=str(wrong)))


def test_bytes_and_flops_against_a_hand_count():
    """GQA 16 / 4 heads, d 64, B 64, k 4, batch 2 at 8K, heads of a kv head agreeing (shared): per (sequence, kv
    head) the fp32 sums of 127 past blocks, K and V of the own block and 3 past blocks; q and out (bf16) and the
    fp32 lse per query head."""
    r = exp.decode_cost_table(8192, 0.5, head_dim=64, heads=16, kv_heads=4, batch=2, block_sizes=(64,),
                              top_ks=(4,), overlap="shared").iloc[0]
    assert r["centroid_bytes"] == 2 * 4 * 127 * 64 * 4
    assert r["kv_bytes"] == 2 * 4 * 2 * (1 + 3) * 64 * 64 * 2
    assert r["q_out_bytes"] == 2 * 16 * (2 * 64 * 2 + 4)
    assert r["bytes_per_step"] == r["centroid_bytes"] + r["kv_bytes"] + r["q_out_bytes"]
    assert r["dense_bytes"] == 2 * 4 * 2 * 8192 * 64 * 2 + r["q_out_bytes"]
    assert r["useful_flops"] == 2 * 16 * (2 * 127 * 64 + 4 * 4 * 64 * 64)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(head_dim=0), "head_dim must be an integer >= 1, got 0"),
    (dict(mu_noise=2.0), "mu_noise is a cosine and must lie in [-1, 1], got 2.0"),
    (dict(mu_noise=0.8, delta_mu=0.5), "mu_cluster defaults to mu_noise + delta_mu = 0.8 + 0.5 = 1.3, outside [-1, 1]"),
])
def test_table_names_the_input_that_is_out_of_range(kwargs, message):
    with pytest.raises(ValueError) as info:
        exp.decode_cost_table(8192, 0.9, **kwargs)
    assert message in str(info.value)
