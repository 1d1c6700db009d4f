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
# # 01 — The MoBA design space: d, B, k, N, Δμ and m
#
# Will the MoBA router find the block that holds the needle? This notebook walks the design space with
# the analytic model (`mobalab.snr`) and checks one point with a quick Monte Carlo (`mobalab.simulate`).
# SNR = Δμ_eff·sqrt(d / 2B) with Δμ in cosine units; Δμ_eff = Δμ + (m - 1)(μ_cluster - μ_noise).

# %% tags=["parameters"]
import os

QUICK = os.environ.get("MOBALAB_QUICK", "1") == "1"  # CI runs the quick configuration
# ruff: noqa: E402  (imports follow the parameters cell)
TRIALS = 300 if QUICK else 5_000

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from mobalab import experiments, simulate, snr
from mobalab._design_command import decode_cost, design, format_decode_cost, format_design

pd.set_option("display.width", 140)

# %% [markdown]
# ## SNR and hit probability across block sizes and contexts
# d = 64, k = 8, Δμ_eff = 2 (e.g. a needle and 3 companions of cosine 0.5). The exact non-causal top-k
# probability drops as the context grows (more competing blocks) and rises as B shrinks (higher SNR).

# %%
block_sizes = [16, 32, 64, 128, 256, 512]
contexts = [8192, 32768, 131072, 524288]
grid = np.array([[snr.hit_probability(snr.snr(64, B, 2.0), -(-N // B), 8) for B in block_sizes] for N in contexts])
fig, ax = plt.subplots(figsize=(7, 3.8))
im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
ax.set_xticks(range(len(block_sizes)), [str(b) for b in block_sizes])
ax.set_yticks(range(len(contexts)), [f"{n // 1024}K" for n in contexts])
ax.set_xlabel("block size B (tokens)")
ax.set_ylabel("context N (tokens)")
for i in range(len(contexts)):
    for j in range(len(block_sizes)):
        ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", color="w" if grid[i, j] < 0.6 else "k")
fig.colorbar(im, label="P(hit), non-causal top-8")
ax.set_title("d = 64, k = 8, Δμ_eff = 2 (cosine units)")
plt.show()

# %% [markdown]
# ## Head dim and clustering
# Doubling d multiplies the SNR by sqrt(2), like halving B; m clustered keys multiply Δμ_eff by
# 1 + (m-1)ρ, which would take a B smaller by that factor squared.

# %%
rows = []
for d in (32, 64, 128, 256):
    for m in (1, 2, 4, 8):
        dmu = snr.delta_mu_eff(0.5, m=m, mu_cluster=0.5)
        s = snr.snr(d, 128, dmu)
        rows.append({"d": d, "m": m, "Δμ_eff": dmu, "SNR": s,
                     "P(hit) N=64K": snr.hit_probability(s, 512, 8),
                     "causal P(hit) N=64K": snr.causal_hit_probability(s, 65536, 128, 8)})
table = pd.DataFrame(rows)
print(table.pivot(index="m", columns="d", values="P(hit) N=64K").round(3))
print("causal (a needle uniform before the newest token):")
print(table.pivot(index="m", columns="d", values="causal P(hit) N=64K").round(3))

# %% [markdown]
# ## One point checked by Monte Carlo
# Vector-level: real unit vectors, centroids, exact MoBA top-k; the exact generator variance gives the
# prediction (planted keys have variance (1 - μ²)/d).

# %%
d, B, N, k, mu, m = 64, 32, 2048, 4, 0.5, 2
model = snr.generator_block_model(d, B, mu, m=m, mu_cluster=mu)
mc = simulate.vector_level_router(d, N, B, k, mu, m=m, mu_cluster=mu, trials=TRIALS, seed=0)
pred = snr.hit_probability(model.snr, N // B, k, sd_ratio=model.sd_ratio)
est, lo, hi = mc[["estimate", "ci_low", "ci_high"]].iloc[0]
print(f"predicted P(hit) = {pred:.3f}; vector-level MC = {est:.3f} [{lo:.3f}, {hi:.3f}] "
      f"({'inside' if lo <= pred <= hi else 'OUTSIDE'} the 95% interval, {TRIALS} trials)")

# %% [markdown]
# ## Inverse design
# Which block sizes reach 99% at 128K context with d = 64, k = 8, for a needle with 7 companions?

# %%
print(format_design(design(64, 131072, 8, 0.99, delta_mu=0.3, m=8)))

# %% [markdown]
# ## Inference cost next to routing accuracy
# A decode step reads the block sums (N / B of them, d fp32 each) and the K/V of the selected blocks instead of
# the whole cache: small B sharpens routing but costs more sums, large B makes every selected block dearer.
# For a target P(hit) of the newest token, which (B, k) reads the fewest bytes? (`mobalab run decode-cost`
# sweeps the same grid and, given a decode benchmark CSV, adds measured step times.)

# %%
decode = experiments.get("decode-cost")
cost = decode.run(decode.Config.quick() if QUICK else decode.Config())
print(decode.summary(cost).round(3).to_string(index=False))
decode.plot(cost)
plt.show()

# %% [markdown]
# The same needle at a 90% target: the design's recommended (B, k), costed at a 128K-token decode step
# (batch 8, 32 query / 8 kv heads, the recommended top-k):

# %%
print(format_decode_cost(decode_cost(design(64, 131072, 8, 0.9, delta_mu=0.3, m=8), 131072)))
