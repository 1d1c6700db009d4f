# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 — The theory meets trained models
#
# The paper's two claims come from trained models: at equal sparsity (k·B fixed) **smaller blocks route
# better**, because SNR = Δμ_eff/(σ·sqrt(2B)); and a **short key convolution raises Δμ_eff** (more related keys m
# in the needle's block, higher μ_cluster). The key-conv experiment showed that a *fixed* filter never raises
# the router's signal, so if the second claim holds, the gain must come from *training* the filter.
#
# Here small decoder-only transformers (MoBA or dense attention) are trained from scratch on key-value
# recall with distractors (`mobalab.training.RecallTask`, each needle a run of 8 copies of its token: a
# single-token needle raises its block's score by only Δμ/B, and training stops raising Δμ once attention is
# saturated on the needle, so MoBA never learns to route to it; a run gives the block m = 8 related keys, as
# a phrase in real text does): dense, MoBA with B = 32 and 128 at k·B = 512, and
# MoBA-128 with the paper's trainable kconv of width 3 and 5, all with RoPE; and MoBA-32, MoBA-128 and
# MoBA-128-kconv5 without position encoding (`-nope`), as the paper's MoBA layers are. Three seeds each,
# identical initial weights and batches per seed. From each model, per layer and head,
# `mobalab.training.evaluate` measures on the post-RoPE q/k the router saw: μ_signal, μ_noise, σ, m,
# μ_cluster, Δμ_eff; the causal P(hit) these predict (`mobalab.snr.causal_hit_probability`); the observed
# recall of the needle's block (`mobalab.kernels.moba_topk` on the same q/k); and the retrieval accuracy.
#
# `MOBALAB_QUICK=1` (the default, what CI runs) trains tiny models for 20 steps on the CPU: the pipeline runs,
# but the models learn little and the verdicts below mean nothing. `MOBALAB_QUICK=0` on a GPU runs the full
# experiment (`mobalab run trained-routing`); a recorded result (`$MOBALAB_TRAINED_ROUTING_CSV`, or the newest
# `*trained-routing*.csv` recorded with the package, `mobalab.bench.recorded_files`) is shown at the end.

# %% tags=["parameters"]
import os

QUICK = os.environ.get("MOBALAB_QUICK", "1") != "0"  # CI runs the quick configuration
RECORDED = os.environ.get("MOBALAB_TRAINED_ROUTING_CSV", "")
# ruff: noqa: E402  (imports follow the parameters cell)

# %%
import importlib.util

import matplotlib.pyplot as plt
import pandas as pd
import torch

from mobalab.experiments import trained_routing as tr

try:  # inside Jupyter; as a plain script tables are printed
    from IPython.display import display
except ImportError:
    display = print

GPU = torch.cuda.is_available() and importlib.util.find_spec("cupy") is not None
pd.set_option("display.width", 160, "display.max_columns", 24, "display.precision", 3)
config = tr.Config() if (GPU and not QUICK) else tr.Config.quick()
print(f"quick mode: {QUICK}; usable GPU: {GPU}; sequence length {config.seq_len}, {len(config.variants)} variants "
      f"x {config.n_seeds} seeds, {config.steps} steps")

# %% [markdown]
# ## What the full run costs
#
# A FLOP count of every model's training (linear layers, attention over the keys each query really attends,
# MoBA routing) at rates read off this project's recorded H200 kernel runs, plus a fixed launch cost per MoBA
# layer and step calibrated on the recorded training run: the full experiment's expected GPU time, computed
# here on the CPU.

# %%
estimate = tr.gpu_estimate(tr.Config())
display(estimate.round(2))
print(f"expected H200 time of the full run: {estimate['seconds'].iloc[-1] / 60:.1f} min")

# %% [markdown]
# ## Train and measure

# %%
df = tr.run(config)
models = df.drop_duplicates(["variant", "replicate"])
display(models.groupby("variant", sort=False)[["accuracy", "first_stage_train_accuracy", "final_train_loss",
                                               "train_seconds", "est_h200_seconds"]].mean())


# %% [markdown]
# ## Theory against observation
#
# (a) accuracy; (b) the needle block's routing recall at each model's retrieval head (the head that puts the
# most attention on the needle) against three predictions: the token model with the measured σ, the block-score
# moments, and the paper's formula taken literally on cosines (σ = 1/√d); (c) every layer and head; (d) the
# signal in noise standard deviations, needle alone (Δμ/σ) and whole block (Δμ_eff/σ): the gap is clustering.
# `block_var_ratio` is the noise blocks' score variance over σ²/B: 1 when keys act as independent tokens, as
# the paper's model assumes; RoPE makes part of the noise coherent within a block and the ratio large.

# %%
def show(frame):
    fig = tr.plot(frame)
    plt.show()
    table = tr.summary(frame)
    display(table[["variant", "block_size", "top_k", "accuracy", "acc_low", "acc_high", "recall", "recall_low",
                   "recall_high", "pred_paper", "paper_units", "pred_block", "block_units", "block_resid",
                   "block_resid_low", "block_resid_high", "z_needle", "z_eff", "m", "block_var_ratio"]])
    routed = table[table["routed"]]
    worst = routed[["paper_units", "block_units"]].abs().max()
    print(f"Verdict (theory predicts the observed recall): token model within {worst['paper_units']:.1f}, "
          f"block-score moments within {worst['block_units']:.1f} Wilson half-widths of the observed recall "
          f"(|u| <= 1: inside the 95% interval) across the routed models.")
    c = tr.claims(frame)
    display(c)
    for claim, metric in (("1: smaller B routes better (equal k·B)", "recall"),
                          ("2: trained kconv raises Δμ_eff", "Δμ_eff/σ")):
        rows = c[(c["claim"] == claim) & (c["metric"] == metric) & ~c["comparison"].str.startswith("dense")]
        for _, r in rows.iterrows():
            print(f"Verdict (claim {claim}): {r['verdict'].upper()} for {r['comparison']}: {metric} "
                  f"{r['a']:.3f} vs {r['b']:.3f}, difference {r['difference']:+.3f} "
                  f"[{r['low']:+.3f}, {r['high']:+.3f}]")
    return fig


fig = show(df)
if config == tr.Config.quick():
    print("(quick run: tiny models trained for a few steps on the CPU; the verdicts above are not evidence)")

# %% [markdown]
# ## Recorded result
#
# The full experiment's CSV, when one was recorded (`mobalab run trained-routing --out DIR` on a GPU, or the
# study split over GPUs by `scripts/train_variants.py`). The one recorded with the package (H200, 2026-11-30)
# holds dense attention (3 seeds), MoBA B 32 and B 128 (5 seeds each) and the two key-convolution variants (3 seeds
# each), all with RoPE (the `-nope` variants were not trained for it). There, claim 1 holds on recall, accuracy and
# SNR; the block-moment prediction is within 2-3 points of the observed recall for every routed MoBA model, 2
# points for dense attention's q / k routed at B 32 and 7 at B 128 (`block_resid`: observed minus predicted with a t
# interval over seeds); claim 2 is not reproduced: the trained filter raises m
# but not Δμ_eff/σ, recall or accuracy (see RESULTS.md).

# %%
from mobalab.bench import recorded_files

found = [RECORDED] if RECORDED else [str(p) for p in recorded_files("*trained-routing*.csv")]
if found:
    recorded = pd.read_csv(found[-1])
    print(f"recorded result: {found[-1]} ({recorded['device_name'].iloc[0]}, {len(recorded)} rows)")
    fig_recorded = show(recorded)
else:
    print("no recorded trained-routing result found")
