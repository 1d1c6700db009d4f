import json

import numpy as np
import pandas as pd
import pytest

from mobalab import cli
from mobalab.experiments import key_conv as exp

TINY = exp.Config(seq_len=512, block_size=32, top_k=2, span_lengths=(1, 8), widths=(1, 5), trials=160, seed=5)


@pytest.fixture(scope="module")
def df():
    return exp.run(TINY)


def test_schema_and_counts(df):
    need = {"experiment", "pattern", "span", "conv", "form", "width", "estimate", "ci_low", "ci_high", "delta_mu_eff",
            "m", "mu_cluster", "multiplier", "paper_prediction", "moments_prediction", "exact_prediction",
            "paper_units", "moments_units", "exact_units", "change_vs_none"}
    assert need <= set(df.columns)
    # 3 patterns x 2 spans x (none + 2 forms at W=5)
    assert len(df) == 3 * 2 * 3
    assert set(df["conv"]) == {"none (W=1)", "averaging W=5", "residual SiLU W=5"}
    assert ((df["ci_low"] <= df["estimate"]) & (df["estimate"] <= df["ci_high"])).all()
    cols = ["estimate", "delta_mu_eff", "m", "multiplier", "paper_prediction", "moments_prediction"]
    assert df[cols].notna().all().all()
    lin = df["form"].isin(["none", "linear"])
    assert df.loc[lin, "exact_prediction"].notna().all() and df.loc[~lin, "exact_prediction"].isna().all()


def test_offsets():
    np.testing.assert_array_equal(exp.relevant_offsets("cut", 4, 32, 5), [30, 31, 32, 33])
    np.testing.assert_array_equal(exp.relevant_offsets("cut", 1, 32, 5), [31])
    np.testing.assert_array_equal(exp.relevant_offsets("scattered", 4, 32, 5), [4, 12, 20, 28])
    ins = exp.relevant_offsets("inside", 8, 32, 5)
    assert len(ins) == 8 and ins[-1] + 4 < 32
    with pytest.raises(ValueError, match="pattern"):
        exp.relevant_offsets("diagonal", 2, 32, 3)


def test_measured_clustering_without_conv(df):
    none = df[(df["form"] == "none") & (df["pattern"] == "inside")].set_index("span")
    # no convolution: a span of L tokens of cosine mu is m = L tokens of mu_cluster = mu
    assert none.loc[8, "m"] == pytest.approx(8, rel=0.1)
    assert none.loc[8, "mu_cluster"] == pytest.approx(TINY.mu, abs=0.05)
    assert none.loc[1, "delta_mu_eff"] == pytest.approx(TINY.mu, abs=0.06)


def test_physics(df):
    # the averaging filter spreads a needle over W keys: more elevated keys, a larger measured Delta mu_eff
    ins = df[df["pattern"] == "inside"].set_index(["span", "conv"])
    assert ins.loc[(1, "averaging W=5"), "m"] > 3 and ins.loc[(1, "averaging W=5"), "multiplier"] > 1.8
    # ... a gain the paper's formula believes but the router does not show (same vectors, same hits +- noise)
    assert ins.loc[(1, "averaging W=5"), "paper_prediction"] > ins.loc[(1, "averaging W=5"), "ci_high"]
    # a span cut by the block's end loses signal to the next block: the convolution hurts
    cut = df[df["pattern"] == "cut"].set_index(["span", "conv"])
    assert cut.loc[(8, "averaging W=5"), "ci_high"] < cut.loc[(8, "none (W=1)"), "ci_low"]
    # the exact linear model and the measured moments hold to the estimate
    assert df["exact_units"].abs().max() < 3.0
    assert df["moments_units"].abs().max() < 3.0


def test_summary_and_plot(df):
    s = exp.summary(df)
    assert list(s["conv"]) == ["none (W=1)", "averaging W=5", "residual SiLU W=5"]
    assert "cut L=8" in s.set_index("conv").loc["averaging W=5", "hurts"]
    fig = exp.plot(df)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 6
    for ax in axes:
        assert ax.get_xlabel() and ax.get_ylabel()
    assert fig.legends


def test_bad_config():
    with pytest.raises(ValueError, match="multiple of block_size"):
        exp.run(exp.Config(seq_len=500))


@pytest.mark.parametrize("overrides, message", [
    (dict(top_k=8), r"top_k must be an integer from 1 to n_blocks - 1 = 7, got 8"),
    (dict(trials=0), "trials must be an integer >= 1, got 0"),
    (dict(batch_size=0), "batch_size must be an integer >= 1, got 0"),
    (dict(span_lengths=()), "span_lengths must not be empty"),
    (dict(span_lengths=(0, 2)), r"span_lengths must hold integers >= 1, got \(0, 2\)"),
    (dict(patterns=()), "patterns must not be empty"),
    (dict(widths=()), "widths must not be empty"),
    (dict(widths=(0, 3)), "widths must hold integers >= 1"),
])
def test_bad_settings_are_named_before_any_work(overrides, message):
    cfg = exp.Config(**{"seq_len": 256, "block_size": 32, "top_k": 2, "trials": 8, **overrides})
    with pytest.raises(ValueError, match=message):
        exp.plan(cfg)
    with pytest.raises(ValueError, match=message):
        exp.run(cfg)


def test_cli_quick_writes_outputs(tmp_path, capsys):
    out = tmp_path / "kc"
    assert cli.main(["run", "key-conv", "--quick", "--out", str(out), "--no-progress", "--seed", "2"]) == 0
    assert "hurts" in capsys.readouterr().out
    df = pd.read_csv(out / "key-conv.csv")
    assert len(df) == 3 * 4 * 5 and (df["run_seed"] == 2).all() and df["run_seed"].dtype.kind == "i"
    meta = json.loads((out / "key-conv.json").read_text())
    assert meta["config"]["seed"] == 2
    assert (out / "key-conv.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
