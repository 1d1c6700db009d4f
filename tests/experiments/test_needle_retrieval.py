import json

import numpy as np
import pandas as pd
import pytest
import torch

from mobalab.experiments import needle_retrieval as exp

TINY = exp.Config(seqlens=(256,), block_sizes=(16, 64), top_ks=(2, 4), head_dim=64, heads=4, trials=8,
                  min_trials=8, needle_tokens=4, distractors=2, queries=3, device="cpu", seed=2)


@pytest.fixture(scope="module")
def df():
    return exp.run(TINY)


def test_schema_and_row_counts(df):
    need = {"experiment", "task", "backend", "device", "dtype", "seqlen", "block_size", "top_k", "n_blocks", "metric",
            "hits", "trials", "estimate", "ci_low", "ci_high", "prediction", "snr", "sd_ratio", "interval_units"}
    assert need <= set(df.columns)
    assert len(df) == len(exp.TASKS) * 1 * 2 * 2 * len(exp.METRICS)
    assert set(df["metric"]) == set(exp.METRICS)
    assert (df["backend"] == "torch-reference").all() and (df["dtype"] == "float32").all()
    trials = df.groupby("task")["trials"].first()
    assert trials["single"] == trials["multi-key"] == 8 and trials["multi-query"] == 8 * 3


def test_intervals_contain_estimates(df):
    assert ((df["ci_low"] <= df["estimate"]) & (df["estimate"] <= df["ci_high"])).all()
    assert df["estimate"].between(0, 1).all()
    routed = df[df["metric"].isin(["routing recall", "retrieval accuracy"])]
    assert routed["prediction"].between(0, 1).all()
    assert np.isfinite(df.loc[df["metric"] == "routing recall", "interval_units"]).all()


def test_dense_equivalent_configs_are_dense(df):
    # N = 256 <= k·B = 4·64: causal MoBA attends every past key, so the needle is always routed, MoBA keeps
    # all of dense attention's softmax mass, and it retrieves exactly what dense attention retrieves.
    d = df[(df["block_size"] == 64) & (df["top_k"] == 4)]
    assert d["dense_equivalent"].all()
    by = d.set_index(["task", "metric"])
    for task in exp.TASKS:
        assert by.loc[(task, "routing recall"), "estimate"] == 1.0
        assert by.loc[(task, "routing recall"), "prediction"] == pytest.approx(1.0)
        assert by.loc[(task, "mass kept"), "estimate"] > 0.999
        assert by.loc[(task, "retrieval accuracy"), "hits"] == by.loc[(task, "dense retrieval accuracy"), "hits"]


def test_recall_follows_needle_strength():
    common = dict(tasks=("single",), seqlens=(512,), block_sizes=(16,), top_ks=(2,), head_dim=64, heads=8,
                  trials=32, min_trials=32, device="cpu", seed=5)
    strong = exp.run(exp.Config(needle_tokens=8, needle_cosine=0.9, **common)).set_index("metric")
    weak = exp.run(exp.Config(needle_tokens=1, needle_cosine=0.05, **common)).set_index("metric")
    assert strong.loc["routing recall", "snr"] > 5 > 0.5 > weak.loc["routing recall", "snr"]
    assert strong.loc["routing recall", "estimate"] == 1.0
    assert strong.loc["retrieval accuracy", "estimate"] == 1.0
    assert strong.loc["mass kept", "estimate"] > 0.9
    # k - 1 = 1 free slot among 31 past blocks: a weak needle is found little more often than by chance
    assert weak.loc["routing recall", "estimate"] < 0.4
    assert weak.loc["routing recall", "prediction"] < 0.2


def test_needle_batch_layout():
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    cfg = exp.Config(block_sizes=(32, 64), head_dim=64, needle_tokens=6, distractors=3, distractor_cosine=0.6,
                     needle_cosine=0.5, planted="exact")
    x = exp.needle_batch("multi-key", cfg, 2, 3, 512, rng, gen, torch.float32)
    pos = x["needle_pos"]
    assert pos.shape == (2, 3, 4, 6)
    assert (pos // 32 == pos[..., :1] // 32).all()  # each needle inside one 32-token window
    assert pos.max() < 512 - 1  # before the query row
    assert all(len(set(row)) == 4 for row in (pos[..., 0] // 32).reshape(-1, 4))  # distinct windows
    assert all(len(set(row)) == 4 for row in x["codes"].reshape(-1, 4))  # distinct codes
    q, k, v = x["q"], x["k"], x["v"]
    bi, hi = np.arange(2)[:, None, None, None], np.arange(3)[None, :, None, None]
    qrow = q[:, 511]  # (b, h, d)
    cos = torch.einsum("bhjmd,bhd->bhjm", k[bi, pos, hi], qrow)
    np.testing.assert_allclose(cos[:, :, 0], 0.5, atol=1e-5)  # exact planting: needle cosine μ
    # distractor keys are planted around their own direction u (cosine ρ to q): q·k has mean μ·ρ
    assert float(cos[:, :, 1:].mean()) == pytest.approx(0.5 * 0.6, abs=0.04)
    assert float(cos[:, :, 1:].std()) > 0.02
    np.testing.assert_allclose(v[bi, pos, hi], x["codebook"][x["codes"]][..., None, :].expand(2, 3, 4, 6, 64))


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of the smallest"):
        exp.run(exp.Config.quick(block_sizes=(16, 24)))
    with pytest.raises(ValueError, match="tasks"):
        exp.run(exp.Config.quick(tasks=("haystack",)))
    with pytest.raises(ValueError, match="exceeds seqlen"):
        exp.run(exp.Config.quick(seqlens=(32,)))
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu' or a CUDA device, got 'tpu'"):
        exp.plan(exp.Config.quick(device="tpu"))


def test_plot_refuses_tasks_and_metrics_it_cannot_draw(df):
    with pytest.raises(ValueError, match=r"tasks must name tasks of this result.*'multikey'"):
        exp.plot(df, tasks=("single", "multikey"))  # a misspelt task is not silently left out
    with pytest.raises(ValueError, match=r"metrics must be drawn from .*'recall'"):
        exp.plot(df, metrics=("recall",))
    import matplotlib.pyplot as plt

    fig = exp.plot(df, tasks=("single",), metrics=("dense retrieval accuracy",))
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 2 and "dense" in axes[0].get_ylabel()
    plt.close(fig)


def test_summary_and_plot(df):
    s = exp.summary(df)
    assert len(s) == 3 * 2 * 2 and {"recall", "predicted", "units", "accuracy", "dense_acc", "mass"} <= set(s.columns)
    fig = exp.plot(df)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 3 * 3 * 2
    assert all(ax.get_ylabel() for ax in axes[::2]) and "tokens" in axes[-1].get_xlabel()
    assert any(len(ax.lines) >= 4 for ax in axes)  # measured + analytic per k


@pytest.mark.slow
def test_cli_quick_writes_csv_json_png(tmp_path):
    from mobalab.cli import main

    out = tmp_path / "nr"
    assert main(["run", "needle-retrieval", "--quick", "--out", str(out), "--no-progress"]) == 0
    df = pd.read_csv(out / "needle-retrieval.csv")
    assert set(df["task"]) == set(exp.TASKS) and (df["backend"] == "torch-reference").all()
    meta = json.loads((out / "needle-retrieval.json").read_text())
    assert meta["rows"] == len(df) and meta["config"]["logit_scale"] == exp.Config().logit_scale
    assert (out / "needle-retrieval.png").read_bytes()[:4] == b"\x89PNG"
