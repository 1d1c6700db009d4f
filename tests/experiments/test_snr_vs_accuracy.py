import numpy as np
import pytest

from mobalab import snr
from mobalab.experiments import snr_vs_accuracy as exp

TINY = exp.Config(panels=((64, 8), (16, 2)), mc_snr=(0.0, 1.5, 3.0), score_trials=5000, vector_trials=300,
                  curve_points=21, device="cpu", kernel_device="cpu", kernel_cpu_trials=64, seed=3)


@pytest.fixture(scope="module")
def df():
    return exp.run(TINY)


def test_schema_and_methods(df):
    need = {"experiment", "panel", "method", "backend", "snr", "sd_ratio", "estimate", "prediction", "n_blocks",
            "top_k", "paper_threshold"}
    assert need <= set(df.columns)
    assert set(df["method"]) == {"analytic", "score-level", "vector-level", "kernel"}
    assert set(df["panel"]) == {"n=64, k=8", "n=16, k=2"}
    # one analytic row per curve point, one MC row per SNR point and leg, per panel
    counts = df.groupby(["panel", "method"]).size()
    assert (counts.xs("analytic", level="method") == TINY.curve_points).all()
    assert (counts.xs("score-level", level="method") == len(TINY.mc_snr)).all()
    assert (counts.xs("vector-level", level="method") == len(TINY.mc_snr)).all()
    assert (counts.xs("kernel", level="method") == len(TINY.mc_snr)).all()  # n·B <= 2048: CPU reference
    assert df["estimate"].notna().all() and df["prediction"].between(0, 1).all()


def test_analytic_rows_are_the_model(df):
    a = df[(df["method"] == "analytic") & (df["panel"] == "n=64, k=8")]
    np.testing.assert_allclose(a["estimate"], snr.hit_probability(a["snr"].to_numpy(), 64, 8), atol=1e-12)
    assert a["paper_threshold"].iloc[0] == pytest.approx(snr.paper_threshold(64, 8))


def test_monte_carlo_rows_carry_intervals_and_agree(df):
    mc = df[df["method"] != "analytic"]
    assert (mc["ci_low"] <= mc["estimate"]).all() and (mc["estimate"] <= mc["ci_high"]).all()
    assert np.isfinite(mc["interval_units"]).all()
    # fixed seeds: deterministic; theory and simulation of the same model must not be far apart
    assert mc["interval_units"].abs().max() < 2.5, mc[["panel", "method", "snr", "estimate", "prediction"]]


def test_vector_points_sit_at_their_exact_snr(df):
    v = df[df["method"] == "vector-level"]
    np.testing.assert_allclose(v["snr"], v["target_snr"], atol=1e-9)


@pytest.mark.parametrize("target", [0.5, 2.0, 4.0])
def test_vector_point_solves_for_target(target):
    m, mu, model = exp.vector_point(target, 64, 16)
    assert 0 < mu <= 0.8 and 1 <= m <= 16
    assert model.snr == pytest.approx(target, rel=1e-12)
    if m > 1:  # fewest clustered tokens: one fewer would need a cosine above the cap
        fewer = m - 1
        mu_fewer = target * np.sqrt(2 * 16 / (fewer * fewer * 64 + fewer * target**2))
        assert mu_fewer > 0.8


def test_summary_and_plot(df):
    s = exp.summary(df)
    assert set(s["method"]) == {"score-level", "vector-level", "kernel"}
    assert (s["points"] == len(TINY.mc_snr)).all()
    fig = exp.plot(df)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 2
    for ax in visible:
        assert "SNR" in ax.get_xlabel() and "P(hit)" in ax.get_ylabel()
        assert len(ax.lines) >= 2  # analytic curve + threshold line (+ error bars)


def test_plot_names_the_legs_a_panel_skipped():
    cfg = exp.Config(panels=((16, 2), (64, 8)), mc_snr=(1.0,), score_trials=500, vector_trials=20, curve_points=3,
                     vector_max_seq_len=512, device="cpu", kernel_device="cpu", kernel_cpu_trials=8,
                     kernel_cpu_max_seq_len=256, seed=0)
    df = exp.run(cfg)  # n·B = 256 runs every leg; 1024 is above both the vector and the kernel limit
    fig = exp.plot(df)
    notes = [[t.get_text() for t in ax.texts] for ax in fig.axes if ax.get_visible()]
    assert notes[0] == []
    assert len(notes[1]) == 1 and "vector-level" in notes[1][0] and "kernel" in notes[1][0]


TINY_BAD = dict(mc_snr=(1.0,), score_trials=100, vector_trials=10, curve_points=3, device="cpu", kernel=False)


@pytest.mark.parametrize("overrides, message", [
    (dict(panels=((16, 32),)), "1 <= top_k <= n_blocks"),
    (dict(panels=()), "panels must be a non-empty"),
    (dict(mc_snr=(-1.0,)), "mc_snr must be .* >= 0"),
    (dict(mc_snr=()), "mc_snr must be a non-empty"),
    (dict(curve_points=0), "curve_points must be an integer >= 2"),
    (dict(snr_max=-1.0), "snr_max must be a finite number > 0"),
    (dict(kernel=True, kernel_device="tpu"), "kernel_device must be 'auto', 'cpu' or a CUDA device, got 'tpu'"),
    (dict(mc_snr=(1.0, 4.0), vector_max_mu=0.05), "SNR 4.0 is out of reach for d=64, B=16 with cosines <= 0.05"),
])
def test_bad_config_is_refused_by_name(overrides, message):
    cfg = exp.Config(**{"panels": ((16, 2),), **TINY_BAD, **overrides})
    with pytest.raises(ValueError, match=message):
        exp.plan(cfg)
    with pytest.raises(ValueError, match=message):
        exp.run(cfg)


def test_reproducible():
    cfg = exp.Config(panels=((32, 4),), mc_snr=(1.0,), score_trials=2000, vector_trials=50, curve_points=5,
                     device="cpu", kernel_device="cpu", kernel_cpu_trials=32, seed=11)
    a, b = exp.run(cfg), exp.run(cfg)
    assert a.equals(b)


def test_kernel_leg_rows(df):
    ker = df[df["method"] == "kernel"]
    assert (ker["backend"] == "torch-reference").all() and ker["device"].str.startswith("cpu").all()
    assert (ker["trials"] >= TINY.kernel_cpu_trials).all()
    # the kernel sees the same generator as the vector leg: same exact SNR at each target
    vec = df[df["method"] == "vector-level"].set_index(["panel", "target_snr"])["snr"]
    np.testing.assert_allclose(ker.set_index(["panel", "target_snr"])["snr"], vec.loc[ker.set_index(
        ["panel", "target_snr"]).index], rtol=1e-12)
    # recall rises with SNR: chance level (k/n) at SNR 0, near 1 at SNR 3
    for panel, g in ker.groupby("panel"):
        g = g.sort_values("snr")
        assert g["estimate"].iloc[-1] > g["estimate"].iloc[0] + 0.4, panel
        assert g["estimate"].iloc[-1] >= 0.9


def test_kernel_leg_can_be_left_out_and_respects_the_cpu_limit():
    cfg = exp.Config(panels=((64, 8),), mc_snr=(1.0,), score_trials=1000, vector_trials=20, curve_points=3,
                     device="cpu", kernel_device="cpu", kernel_cpu_max_seq_len=512, seed=1)
    assert "kernel" not in set(exp.run(cfg)["method"])  # n·B = 1024 > 512
    import dataclasses

    cfg = dataclasses.replace(cfg, kernel_cpu_max_seq_len=4096, kernel=False)
    assert "kernel" not in set(exp.run(cfg)["method"])


def test_kernel_point_k_at_least_n_always_hits():
    import torch

    hits, trials = exp.kernel_point(4, 4, 64, 16, 0.0, 1, 10, 0, torch.device("cpu"), torch.float32, heads=4)
    assert hits == trials == 12  # 10 trials rounded up to whole (batch, heads) calls


def test_cpu_vector_trials_follow_the_key_budget():
    # on the CPU a point draws at most ~vector_cpu_tokens keys: long panels get fewer trials, never < the floor
    cfg = exp.Config(panels=((16, 2), (64, 8)), mc_snr=(1.0,), score_trials=1000, vector_trials=400,
                     vector_cpu_tokens=102_400, vector_cpu_min_trials=50, curve_points=3, device="cpu", kernel=False,
                     seed=4)
    assert exp.vector_trials(cfg, 16 * 16) == 400 and exp.vector_trials(cfg, 64 * 16) == 100
    import dataclasses

    assert exp.vector_trials(dataclasses.replace(cfg, vector_cpu_min_trials=150), 64 * 16) == 150
    assert exp.vector_trials(cfg, 64 * 16, "cuda") == 400  # a GPU draws them all
    df = exp.run(cfg)
    vec = df[df["method"] == "vector-level"].set_index("n_blocks")
    assert vec.loc[16, "trials"] == 400 and vec.loc[64, "trials"] == 100
    s = exp.summary(df).set_index(["panel", "method"])
    assert s["trials"].dtype.kind == "i" and s.loc[("n=64, k=8", "vector-level"), "trials"] == 100
    # the interval width that fewer trials cost is reported
    wide = (vec.loc[64, "ci_high"] - vec.loc[64, "ci_low"]) / 2
    assert s.loc[("n=64, k=8", "vector-level"), "max_half_width"] == pytest.approx(wide)
    assert "cpu: 400, 100 trials per point" in exp.plan(cfg)


def test_full_configuration_on_a_cpu_is_bounded():
    # what the full run draws on a 2-core CPU (measured: minutes, see the README): the vector leg's keys
    cfg = exp.Config(device="cpu", kernel=False)
    keys = sum(exp.vector_trials(cfg, n * cfg.vector_block_size) * n * cfg.vector_block_size
               for n, _ in cfg.panels) * len(cfg.mc_snr)
    assert keys <= 2.2e8  # was 1.4e9 with 2000 trials everywhere: 49 s and more per point on 2 cores
    assert "vector level on cpu" in exp.plan(cfg) and f"{keys:.2g} keys" in exp.plan(cfg)


def test_run_seed_and_integer_columns(df):
    assert (df["run_seed"] == TINY.seed).all()
    for c in ("run_seed", "seed", "hits", "trials"):
        assert str(df[c].dtype) == "Int64", c
    mc = df[df["method"].isin(["score-level", "vector-level"])]
    assert mc["seed"].notna().all() and df.loc[df["method"] == "analytic", "seed"].isna().all()
