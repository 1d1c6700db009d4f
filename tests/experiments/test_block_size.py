import json
import math

import numpy as np
import pandas as pd
import pytest

from mobalab import cli, snr
from mobalab.experiments import block_size as exp

TINY = exp.Config(seq_len=1024, block_sizes=(128, 64, 32), fixed_top_k=4, head_dims=(32, 128), head_dim_block_size=64,
                  head_dim_top_k=2, clt_block_sizes=(8, 1), clt_head_dims=(16,), clt_blocks=64, clt_trials=300,
                  score_trials=4000, vector_trials=120, device="cpu", seed=7)


@pytest.fixture(scope="module")
def df():
    return exp.run(TINY)


def test_schema_and_counts(df):
    need = {"experiment", "sweep", "method", "backend", "head_dim", "block_size", "seq_len", "n_blocks", "top_k",
            "delta_mu_eff", "paper_snr", "snr", "sd_ratio", "estimate", "prediction", "paper_prediction",
            "interval_units", "paper_interval_units", "snr_measured", "excess_kurtosis"}
    assert need <= set(df.columns)
    counts = df.groupby(["sweep", "method"]).size().unstack()
    assert list(counts.columns.sort_values()) == ["generator", "paper", "score-level", "vector-level"]
    assert (counts.loc["fixed k/n"] == 3).all() and (counts.loc["fixed k"] == 3).all()
    assert (counts.loc["head dim"] == 2).all() and (counts.loc["clt"] == 2).all()
    assert df["estimate"].notna().all() and df["prediction"].between(0, 1).all()
    mc = df[df["method"].isin(["score-level", "vector-level"])]
    assert mc[["hits", "trials", "ci_low", "ci_high", "interval_units"]].notna().all().all()
    assert ((mc["ci_low"] <= mc["estimate"]) & (mc["estimate"] <= mc["ci_high"])).all()
    # sparsity sweep: k/n held at 1/8
    fk = df[(df["sweep"] == "fixed k/n") & (df["method"] == "paper")]
    np.testing.assert_allclose(fk["top_k"] / fk["n_blocks"], 0.125)


def test_sqrt_d_over_b_law(df):
    a = df[(df["sweep"] == "fixed k/n") & (df["method"] == "paper")].sort_values("block_size")
    # halving B multiplies the paper's SNR by sqrt(2)
    np.testing.assert_allclose(a["paper_snr"].to_numpy()[:-1] / a["paper_snr"].to_numpy()[1:], math.sqrt(2))
    h = df[(df["sweep"] == "head dim") & (df["method"] == "paper")].sort_values("head_dim")
    np.testing.assert_allclose(h["paper_snr"].iloc[1] / h["paper_snr"].iloc[0], 2.0)  # d x4 -> SNR x2
    # at constant sparsity the threshold is the same, so smaller B must be predicted (and found) more often
    assert np.all(np.diff(a["estimate"].to_numpy()) < 0)
    v = df[(df["sweep"] == "fixed k/n") & (df["method"] == "vector-level")].sort_values("block_size")
    assert v["estimate"].iloc[0] > v["ci_high"].iloc[-1]


def test_generator_rows_match_snr_module(df):
    g = df[(df["method"] == "generator") & (df["sweep"] != "clt")].iloc[0]
    model = snr.generator_block_model(g["head_dim"], g["block_size"], g["mu_signal"], m=g["m"],
                                      mu_cluster=g["mu_cluster"])
    assert g["snr"] == pytest.approx(model.snr) and g["snr"] > g["paper_snr"]  # planted tokens: less variance
    assert g["estimate"] == pytest.approx(snr.hit_probability(model.snr, g["n_blocks"], g["top_k"], model.sd_ratio))
    clt = df[(df["sweep"] == "clt") & (df["method"] == "generator")]
    np.testing.assert_allclose(clt["snr"], TINY.clt_snr, rtol=1e-9)


def test_monte_carlo_agrees_with_gaussian_model(df):
    mc = df[df["method"].isin(["score-level", "vector-level"])]
    assert mc["interval_units"].abs().max() < 3.0, mc[["sweep", "method", "block_size", "estimate", "prediction"]]


def test_measured_snr_inverts_prediction():
    assert exp.measured_snr(snr.hit_probability(1.3, 64, 8), 64, 8) == pytest.approx(1.3, abs=1e-7)
    assert exp.measured_snr(1.0, 64, 8) == math.inf and exp.measured_snr(0.0, 64, 8) == -math.inf
    assert math.isnan(exp.measured_snr(0.5, 8, 8))


def test_summary_and_plot(df):
    s = exp.summary(df)
    assert list(s["sweep"]) == ["fixed k/n", "fixed k", "head dim", "clt (d=16)"]
    assert s.loc[s["sweep"] == "fixed k/n", "paper_snr_slope"].iloc[0] == pytest.approx(-0.5)
    assert s.loc[s["sweep"] == "head dim", "paper_snr_slope"].iloc[0] == pytest.approx(0.5)
    fig = exp.plot(df)
    visible = [ax for ax in fig.axes if ax.get_visible() and ax.get_ylabel()]
    assert len(visible) == 9
    for ax in visible:
        assert ax.get_xlabel() and ax.get_ylabel()
    assert any("P(hit)" in ax.get_ylabel() for ax in visible) and any("SNR" in ax.get_ylabel() for ax in visible)


def test_bad_config():
    with pytest.raises(ValueError, match="m = 40"):
        exp.run(exp.Config(m=40, block_sizes=(32,)))


def test_cli_quick_writes_outputs(tmp_path, capsys):
    out = tmp_path / "bs"
    assert cli.main(["run", "block-size", "--quick", "--out", str(out), "--no-progress"]) == 0
    assert "measured_snr_slope" in capsys.readouterr().out
    df = pd.read_csv(out / "block-size.csv")
    assert set(df["sweep"]) == set(exp.SWEEPS)
    assert (df["run_seed"] == 0).all() and df["run_seed"].dtype.kind == "i"
    text = pd.read_csv(out / "block-size.csv", dtype=str, keep_default_na=False)
    assert text["trials"].str.fullmatch(r"\d*").all() and text["hits"].str.fullmatch(r"\d*").all()  # no "20000.0"
    mc = df[df["method"].isin(["score-level", "vector-level"])]
    assert mc["hits"].notna().all() and df.loc[df["method"] == "paper", "hits"].isna().all()
    assert json.loads((out / "block-size.json").read_text())["rows"] == len(df)
    assert (out / "block-size.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
