import json

import numpy as np
import pandas as pd
import pytest

from mobalab import cli, snr
from mobalab.experiments import rope as exp


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``mobalab run rope --quick`` once; the tests read what it wrote."""
    out = tmp_path_factory.mktemp("rope")
    assert cli.main(["run", "rope", "--quick", "--out", str(out), "--seed", "3", "--no-progress"]) == 0
    return out


def test_quick_run_writes_csv_json_png(quick_run, capsys):
    df = pd.read_csv(quick_run / "rope.csv")
    meta = json.loads((quick_run / "rope.json").read_text())
    assert meta["experiment"] == "rope" and meta["config"]["seed"] == 3 and meta["rows"] == len(df)
    assert "torch" in meta["environment"]
    png = (quick_run / "rope.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    quick = exp.Config.quick()
    assert set(df["sweep"]) == set(exp.SWEEPS)
    per_sweep = df[df["method"] == "vector-level-rope"].groupby("sweep").size()
    assert per_sweep["span m"] == len(quick.span_lengths) and per_sweep["RoPE base"] == len(quick.bases)
    assert set(df["method"]) == {"vector-level-rope", "kernel"}  # every quick N <= 2048: CPU reference


def test_rows_are_consistent(quick_run):
    df = pd.read_csv(quick_run / "rope.csv")
    assert ((df["ci_low"] <= df["estimate"]) & (df["estimate"] <= df["ci_high"])).all()
    assert np.isfinite(df[["rope_units", "blind_units", "rope_prediction", "blind_prediction"]]).all().all()
    for _, r in df.drop_duplicates("point").iterrows():
        mod = snr.rope_block_model(int(r.head_dim), int(r.block_size), r.mu, m=int(r.m), mu_cluster=r.mu,
                                   base=r.rope_base, needle_index=int(r.needle_index))
        assert r.rope_prediction == pytest.approx(snr.hit_probability(mod.snr, r.n_blocks, r.top_k,
                                                                      sd_ratio=mod.sd_ratio), abs=1e-9)
        if not r.mu_capped:  # μ is set so that the RoPE-blind theory predicts the design target
            assert r.blind_prediction == pytest.approx(exp.Config.quick().design_target, abs=1e-6)
    # fixed seeds: the RoPE-aware theory holds to every leg; the blind one misses the long spans
    assert df["rope_units"].abs().max() < 2.5, df[["sweep", "value", "method", "estimate", "rope_prediction"]]
    long_spans = df[(df["method"] == "vector-level-rope") & (df["m"] >= 16)]
    assert (long_spans["blind_units"] > 2).all()
    lone = df[df["m"] == 1]
    np.testing.assert_allclose(lone["rope_prediction"], lone["blind_prediction"], atol=1e-12)


def test_summary_and_verdict(quick_run):
    df = pd.read_csv(quick_run / "rope.csv")
    s = exp.summary(df)
    assert len(s) == len(df.drop_duplicates(["sweep", "value"]))
    assert {"mc", "mc_rope_u", "mc_blind_u", "kernel", "kernel_rope_u", "mult_blind", "mult_rope"} <= set(s.columns)
    text = s.attrs["verdict"]
    assert text.startswith("RoPE-aware theory inside the 95% interval at") and "m in {" in text
    assert "\n" not in text


@pytest.mark.parametrize("d, B, m, base", [(64, 64, 16, 1e4), (32, 16, 16, 500.0)])
def test_design_point_hits_the_blind_target(d, B, m, base):
    mu, capped, mod = exp.design_point(d, B, m, base, 16, 2, 0.9, (m - 1) // 2)
    assert not capped and 0 < mu < 1
    assert snr.hit_probability(mod.blind_snr, 16, 2, sd_ratio=mod.blind_sd_ratio) == pytest.approx(0.9, abs=1e-9)
    mu1, capped1, _ = exp.design_point(d, B, 1, base, 16, 2, 0.9, 0)
    assert capped1 and mu1 == 1.0  # one needle of cosine <= 1 cannot reach the target at these B, d


def test_config_validation():
    with pytest.raises(ValueError, match="needle_at"):
        exp.run(exp.Config.quick(needle_at="middle"))
    with pytest.raises(ValueError, match="span_lengths"):
        exp.run(exp.Config.quick(span_lengths=(1, 128)))
    # at or below chance (k/n = 2/16) no cosine is the design point; named before any work, not by the solver
    for target in (0.1, 0.125):
        with pytest.raises(ValueError, match=r"design_target must exceed chance, top_k / n_blocks = 2/16 = 0.125"):
            exp.plan(exp.Config.quick(design_target=target))
    with pytest.raises(ValueError, match="kernel_device must be 'auto', 'cpu' or a CUDA device, got 'tpu'"):
        exp.plan(exp.Config.quick(kernel_device="tpu"))


@pytest.mark.gpu
def test_kernel_leg_on_the_gpu():
    cfg = exp.Config.quick(kernel_device="cuda", device="cuda", head_dims=(64, 128), kernel_trials=2048,
                           trials=2000)
    df = exp.run(cfg)
    ker = df[df["method"] == "kernel"]
    assert set(ker["backend"]) == {"cuda-kernel"} and len(ker.drop_duplicates("point")) == df["point"].nunique()
    assert ker["rope_units"].abs().max() < 3, ker[["sweep", "value", "estimate", "rope_prediction"]]
    assert set(df.loc[df["method"] == "vector-level-rope", "backend"]) == {"torch-cuda"}


def test_plan_says_the_points_devices_and_trials(quick_run):
    df = pd.read_csv(quick_run / "rope.csv")
    quick = exp.Config.quick()
    text = exp.plan(quick)
    along = len(df.drop_duplicates(["sweep", "value"]))
    assert text.startswith(f"{df['point'].nunique()} distinct points ({along} along the sweeps)")
    device = df.loc[df["method"] == "vector-level-rope", "device"].iloc[0]
    assert f"vector-level Monte Carlo on {device}: {quick.trials} trials per point" in text
    kernel = df[df["method"] == "kernel"]
    if (kernel["backend"] == "torch-reference").all():
        assert f"torch-reference on {kernel['device'].iloc[0]}, float32, {quick.kernel_cpu_trials} trials" in text
    assert exp.plan(exp.Config.quick(kernel=False)).endswith("; kernel leg off")
