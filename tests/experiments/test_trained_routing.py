import json

import numpy as np
import pandas as pd
import pytest

from mobalab import cli
from mobalab.experiments import trained_routing as exp


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    assert cli.main(["run", "trained-routing", "--quick", "--out", str(out), "--no-progress"]) == 0
    return out, pd.read_csv(out / "trained-routing.csv")


def test_quick_writes_csv_json_png(quick_run):
    out, df = quick_run
    meta = json.loads((out / "trained-routing.json").read_text())
    assert meta["config"]["variants"] == list(exp.Config.quick().variants) and meta["rows"] == len(df)
    png = (out / "trained-routing.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert not list(out.glob("*.pt"))  # no checkpoints unless asked for


def test_schema_and_counts(quick_run):
    _, df = quick_run
    cfg = exp.Config.quick()
    # MoBA models: one row per (seed, layer, head); the dense model: one per route (B = 8 and 16) as well
    per_model = cfg.n_layers * cfg.n_heads
    assert len(df) == cfg.n_seeds * per_model * (len(cfg.variants) - 1 + 2)
    assert set(df["variant"]) == set(cfg.variants)
    moba = df[df["attention"] == "moba"]
    assert moba["routed"].all() and not df.loc[df["attention"] == "dense", "routed"].any()
    assert (moba["block_size"] == moba["model_block_size"]).all()
    assert (moba["top_k"] * moba["block_size"] == cfg.budget).all()
    assert ((df["recall_low"] <= df["recall"]) & (df["recall"] <= df["recall_high"])).all()
    for col in ("accuracy", "recall", "pred_paper", "pred_block", "pred_cosine", "sigma", "delta_mu_eff", "m",
                "z_eff", "block_var_ratio", "needle_mass", "train_seconds", "est_h200_seconds"):
        assert df[col].notna().all(), col
    for col in ("accuracy", "recall", "pred_paper", "pred_block", "needle_mass"):
        assert df[col].between(0, 1).all(), col
    assert (df["answers"] == cfg.eval_sequences * cfg.n_queries).all()
    # the paper's identity holds for every row with clustering
    c = df[df["m"] > 1.01]
    np.testing.assert_allclose(c["delta_mu"] + (c["m"] - 1) * (c["mu_cluster"] - c["mu_noise"]),
                               c["delta_mu_eff"], rtol=1e-6, atol=1e-9)
    # the RoPE model's factor for the run is defined wherever the keys carry RoPE (needle runs of 2), never else
    assert df.loc[df["rope"], "rope_factor_theory"].between(0, 1).all()
    assert df.loc[~df["rope"], ["rope_factor", "rope_factor_theory"]].isna().all().all()
    kc = df[df["key_conv"] > 0]
    assert (kc["kconv_mean_abs_weight"] > 0).all() and df.loc[df["key_conv"] == 0, "kconv_mean_abs_weight"].isna().all()


def test_summary_and_claims(quick_run):
    _, df = quick_run
    s = exp.summary(df)
    assert len(s) == len(exp.Config.quick().variants) + 1  # the dense model at both block sizes
    assert (s["seeds"] == exp.Config.quick().n_seeds).all()
    # the residual is observed minus predicted model by model, averaged over seeds
    rh = exp.retrieval_heads(df)
    for _, r in s.iterrows():
        g = rh[(rh["variant"] == r["variant"]) & (rh["block_size"] == r["block_size"])]
        want = (g["recall_hits"] / g["recall_trials"] - g["pred_block"]).mean()
        assert r["block_resid"] == pytest.approx(want)
        assert r["block_resid_low"] <= r["block_resid"] <= r["block_resid_high"]
    c = exp.claims(df)
    assert set(c["claim"]) == {"1: smaller B routes better (equal k·B)", "2: trained kconv raises Δμ_eff"}
    assert set(c["comparison"]) >= {"moba-8 vs moba-16", "moba-16-kconv3 vs moba-16", "moba-16-kconv5 vs moba-16"}
    assert ((c["low"] <= c["difference"]) & (c["difference"] <= c["high"])).all()


def test_claims_verdicts_follow_the_numbers(quick_run):
    _, df = quick_run
    df = df.copy()
    rt = df["recall_trials"]
    # make B = 8 route far better than B = 16 everywhere: claim 1 must hold on recall
    df.loc[df["variant"] == "moba-8", "recall_hits"] = rt * 9 // 10
    df.loc[df["variant"] == "moba-16", "recall_hits"] = rt * 2 // 10
    c = exp.claims(df).set_index(["comparison", "metric"])
    assert c.loc[("moba-8 vs moba-16", "recall"), "verdict"] == "holds"
    # and the reverse
    df.loc[df["variant"] == "moba-8", "recall_hits"] = 0
    c = exp.claims(df).set_index(["comparison", "metric"])
    assert c.loc[("moba-8 vs moba-16", "recall"), "verdict"] == "opposite"


@pytest.mark.parametrize("name", ["eval_sequences", "eval_batch_size"])
def test_evaluation_settings_are_checked_before_any_model_trains(name, monkeypatch):
    import mobalab.training

    def no_training(*args, **kwargs):
        raise AssertionError("a model was trained before the evaluation settings were checked")

    monkeypatch.setattr(mobalab.training, "train", no_training)
    cfg = exp.Config.quick(**{name: 0})
    with pytest.raises(ValueError, match=f"{name} must be an integer >= 1, got 0"):
        exp.plan(cfg)
    with pytest.raises(ValueError, match=f"{name} must be an integer >= 1, got 0"):
        exp.run(cfg)


def test_accuracy_panel_shows_what_its_chance_line_is(quick_run):
    import matplotlib.pyplot as plt

    _, df = quick_run
    fig = exp.plot(df)
    legend = fig.axes[0].get_legend()
    assert legend is not None
    assert [t.get_text() for t in legend.get_texts()] == [f"chance (1 / {df['n_values'].iloc[0]} values)"]
    plt.close(fig)


def test_variants_parse_and_validate():
    mc = exp.model_config(exp.Config(), "moba-128-kconv5")
    assert (mc.attention, mc.block_size, mc.top_k, mc.key_conv) == ("moba", 128, 4, 5)
    assert exp.model_config(exp.Config(), "dense").attention == "dense"
    nope = exp.model_config(exp.Config(), "moba-32-kconv3-nope")
    assert (nope.rope, nope.key_conv, nope.label) == (False, 3, "moba-32-kconv3-nope")
    with pytest.raises(ValueError, match="variant"):
        exp.model_config(exp.Config(), "moba128")
    with pytest.raises(ValueError, match="divide"):
        exp.model_config(exp.Config(), "moba-96")
    with pytest.raises(ValueError, match="MoBA"):
        exp.run(exp.Config.quick(variants=("dense",)))


def test_full_run_fits_the_gpu_budget():
    est = exp.gpu_estimate(exp.Config())
    total = est.iloc[-1]
    assert total["models"] == 24
    # every configuration (all its seeds) within 5 minutes of H200 time (FLOPs + the calibrated launch cost)
    per_config = est["seconds"].iloc[:-1]
    assert (per_config > 10).all() and (per_config < 300).all(), per_config.tolist()
    assert total["seconds"] == pytest.approx(per_config.sum() + 60.0)


def test_full_recipe_task_has_needle_runs():
    # single-token needles are not routable at B = 32-128 (see RecallTask): the study's task uses runs
    t = exp.task(exp.Config())
    assert t.needle_len > 1 and t.seq_len == 4096
    assert exp.task(exp.Config.quick()).needle_len > 1


def test_study_split_over_runs_summarises_as_one(quick_run):
    """Rows of one study written by several runs (one per variant, as on several GPUs) and concatenated give the
    same summary as the study itself: replicate r is the same model whichever run trained it."""
    _, df = quick_run
    moba = [v for v in exp.Config.quick().variants if v != "dense"]
    parts = [df[df["variant"] == v].reset_index(drop=True) for v in moba]  # each run numbers its rows from 0
    joined = pd.concat(parts)
    whole = exp.summary(df[df["variant"].isin(moba)].reset_index(drop=True))
    split = exp.summary(joined)
    assert list(split["seeds"]) == [exp.Config.quick().n_seeds] * len(moba)
    pd.testing.assert_frame_equal(split.sort_values("variant").reset_index(drop=True),
                                  whole.sort_values("variant").reset_index(drop=True))


def test_a_later_run_adds_the_same_replicates(quick_run):
    """first_replicate trains replicate r from the study's seed sequence: the rows equal the full run's."""
    _, df = quick_run
    later = exp.run(exp.Config.quick(variants=("moba-8",), first_replicate=1))
    assert set(later["replicate"]) == {1}
    full = df[(df["variant"] == "moba-8") & (df["replicate"] == 1)].reset_index(drop=True)
    assert list(later["model_seed"].unique()) == list(full["model_seed"].unique())
    np.testing.assert_allclose(later["accuracy"], full["accuracy"])
    np.testing.assert_allclose(later["recall"], full["recall"])
    with pytest.raises(ValueError, match="first_replicate"):
        exp.run(exp.Config.quick(variants=("moba-8",), first_replicate=2))


def test_a_dense_only_run_takes_the_routes_it_is_given(quick_run):
    _, df = quick_run
    with pytest.raises(ValueError, match="routes"):
        exp.run(exp.Config.quick(variants=("dense",)))
    routes = tuple(exp._routes(exp.Config.quick()))
    later = exp.run(exp.Config.quick(variants=("dense",), routes=routes, first_replicate=1))
    full = df[(df["variant"] == "dense") & (df["replicate"] == 1)].reset_index(drop=True)
    assert later[["block_size", "top_k"]].values.tolist() == full[["block_size", "top_k"]].values.tolist()
    np.testing.assert_allclose(later["recall"], full["recall"])


def test_plan_says_where_the_models_train_and_what_a_cpu_run_costs():
    quick = exp.plan(exp.Config.quick())
    assert quick.startswith("6 variants x 2 seeds = 12 models trained on cpu (N = 128, 20 steps each")
    assert "sized for a GPU" not in quick
    full = exp.plan(exp.Config(device="cpu"))
    assert full.startswith("8 variants x 3 seeds = 24 models trained on cpu (N = 4096, 600 steps each")
    minutes = round((exp.gpu_estimate(exp.Config())["seconds"].iloc[-1]) / 60)
    assert f"sized for a GPU: about {minutes} min on an H200" in full and "days on a CPU" in full
    assert "`--quick`" in full
    later = exp.plan(exp.Config(device="cpu", first_replicate=2))  # one seed of three left to train
    assert later.startswith("8 variants x 1 seed = 8 models")



@pytest.mark.parametrize("overrides, match", [
    (dict(variants=("dense",), routes=((0, 4),)), "routes must be a non-empty sequence"),
    (dict(variants=("dense",), routes=((8.5, 4),)), r"routes must be .*got \(\(8.5, 4\),\)"),  # not read as 8
    (dict(n_seeds=1.5), "n_seeds must be an integer >= 1, got 1.5"),
    (dict(first_replicate=1.0), "first_replicate must be an integer in"),
    (dict(budget=0), "budget must be an integer >= 1, got 0"),
    (dict(cpu_threads=1.5), "cpu_threads must be None or an integer >= 1, got 1.5"),
    (dict(checkpoint_dir=3), "checkpoint_dir must be None or a folder's path, got 3"),
    (dict(variants="dense"), "variants must be a sequence"),
    (dict(variants=("dense", "moba-016")), "variant 'moba-016' names the model 'moba-16': write it that way"),
    (dict(variants=("moba-8-kconv0",)), "variant 'moba-8-kconv0' names the model 'moba-8'"),
])
def test_settings_are_checked_before_any_model_trains(overrides, match, monkeypatch):
    import mobalab.training

    def no_training(*args, **kwargs):
        raise AssertionError("a model was trained before the settings were checked")

    monkeypatch.setattr(mobalab.training, "train", no_training)
    with pytest.raises(ValueError, match=match):
        exp.run(exp.Config.quick(**overrides))


def test_a_checkpoint_folder_that_cannot_be_made_fails_before_training(tmp_path, monkeypatch):
    import mobalab.training

    def no_training(*args, **kwargs):
        raise AssertionError("a model was trained before the checkpoint folder was made")

    monkeypatch.setattr(mobalab.training, "train", no_training)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError):
        exp.run(exp.Config.quick(checkpoint_dir=str(blocker / "ckpt")))


def test_first_stage_accuracy_is_read_from_the_first_stage_steps(monkeypatch):
    # a stage at the full length shares its seq_len with the steps after it: the first stage is its steps
    import mobalab.training

    real_train = mobalab.training.train

    def marked(*args, **kwargs):
        trained = real_train(*args, **kwargs)
        trained.history["accuracy"] = trained.history["step"] / 100.0
        return trained

    monkeypatch.setattr(mobalab.training, "train", marked)
    df = exp.run(exp.Config.quick(variants=("moba-16",), n_seeds=1, steps=6, curriculum=((128, 2),),
                                  eval_sequences=2, eval_batch_size=2))
    assert df["first_stage_train_accuracy"].iloc[0] == pytest.approx(0.01)  # step 1, the stage's last
