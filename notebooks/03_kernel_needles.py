# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · Needles through the kernel
#
# An attention-level version of RULER's needle-in-a-haystack tasks, run through `mobalab.kernels.moba_attention`
# (the `needle-retrieval` experiment). Each (batch row, head) is one sequence: a haystack of random unit keys
# and values, a *needle* of m tokens whose keys have cosine μ with the query and whose values carry a code from
# a random codebook, and queries at the end of the sequence (causal). We measure
#
# * **routing recall**: the needle's block is among the blocks MoBA selects for the query row;
# * **retrieval accuracy**: the attention output decodes (nearest code by cosine) to the needle's code;
# * **mass kept**: the fraction of dense attention's softmax mass MoBA keeps, exp(lse_MoBA − lse_dense);
#
# and hold recall to the analytic causal routing prediction at the generator's exact SNR.
#
# The GPU cells run only when `mobalab.kernels.gpu_available()`; otherwise the CPU reference runs at small N.
# `MOBALAB_QUICK=1` (the default) keeps everything small; `MOBALAB_QUICK=0` on a GPU runs the full sweep
# (N = 4K … 1M, B = 32 … 512, k = 2 … 16, about three minutes on an H200).

# %%
import os

import pandas as pd

from mobalab.experiments import kernel_speed, needle_retrieval
from mobalab.kernels import gpu_available

try:  # inside Jupyter; as a plain script (python 03_kernel_needles.py) tables are printed
    from IPython.display import display
except ImportError:
    display = print

QUICK = os.environ.get("MOBALAB_QUICK", "1") != "0"
GPU = gpu_available()
pd.set_option("display.width", 160, "display.max_columns", 20, "display.precision", 3)
print(f"quick mode: {QUICK}; usable GPU: {GPU}")

# %% [markdown]
# ## The configuration
#
# On a GPU the CUDA kernels run in fp16; on a CPU the torch reference runs in fp32. Every row of the result says
# which backend and device produced it. The logit scale β multiplies q·k of unit vectors (it is passed as the
# softmax scale), so haystack logits spread with standard deviation β/√d and a needle token sits near βμ.

# %%
if GPU and not QUICK:
    config = needle_retrieval.Config()
elif GPU:
    config = needle_retrieval.Config(seqlens=(4096, 16384, 65536), block_sizes=(32, 128), top_ks=(2, 8),
                                     trials=64)
else:
    config = needle_retrieval.Config.quick()
display(config)

# %%
df = needle_retrieval.run(config, progress=False)
table = needle_retrieval.summary(df)
display(table)

# %% [markdown]
# ## Recall, retrieval and mass kept against context length
#
# Points: measured, with 95% Wilson intervals. Dashed: the analytic causal routing prediction at the same SNR
# (`snr.generator_block_model` + `snr.causal_hit_probability` at the trials' query and needle positions).
# Dotted grey: dense attention's retrieval accuracy (the ceiling).

# %%
fig = needle_retrieval.plot(df)

# %% [markdown]
# How far is the single-needle recall from theory, in units of the 95% interval (|u| ≤ 1: inside)?
# The multi-key task is expected to fall below the prediction when k is small: the distractor needles' blocks
# score above noise blocks, which the single-needle model does not include.

# %%
recall = df[df["metric"] == "routing recall"].copy()
recall["abs_units"] = recall["interval_units"].abs()
recall.groupby("task")["abs_units"].agg(["max", "median", lambda u: (u <= 1).mean()]).rename(
    columns={"<lambda_0>": "share inside 95% CI"})

# %% [markdown]
# Retrieval follows routing: when the needle's block is selected the output decodes to the needle's code;
# when it is not, it decodes to the needle only by chance (1 / codebook size).

# %%
wide = table.assign(gap=table["recall"] - table["accuracy"])
wide[["task", "seqlen", "block_size", "top_k", "recall", "accuracy", "gap", "mass"]].sort_values("gap").tail(8)

# %% [markdown]
# ## GPU only: the CUDA kernels against the reference on the same inputs
#
# One batch of single-needle inputs drawn on the CPU, then routed and attended twice: by the fp32 torch
# reference on the CPU and by the CUDA kernels on fp16 copies on the GPU. The selections may differ only
# where fp16 rounding flips a near-tie between two block scores; the outputs of the query rows differ by
# fp16 rounding.

# %%
if GPU:
    import numpy as np
    import torch

    from mobalab.kernels import moba_attention, moba_topk

    small = needle_retrieval.Config(tasks=("single",), seqlens=(2048,), block_sizes=(32, 128), top_ks=(2, 8),
                                    heads=8, seed=7)
    x = needle_retrieval.needle_batch("single", small, 4, small.heads, 2048, np.random.default_rng(7),
                                      torch.Generator().manual_seed(7), torch.float32)
    q, k, v = x["q"], x["k"], x["v"]
    rows_q = torch.as_tensor(x["query_pos"])
    compare = []
    for block in small.block_sizes:
        for top_k in small.top_ks:
            ref_sel = moba_topk(q, k, block, top_k)
            gpu_sel = moba_topk(q.cuda().half(), k.cuda().half(), block, top_k).cpu()
            ref_out = moba_attention(q, k, v, block, top_k, softmax_scale=small.logit_scale)[:, rows_q]
            gpu_out = moba_attention(q.cuda().half(), k.cuda().half(), v.cuda().half(), block, top_k,
                                     softmax_scale=small.logit_scale)[:, rows_q].float().cpu()
            compare.append(dict(block_size=block, top_k=top_k,
                                identical_selections=float((ref_sel == gpu_sel).all(-1).float().mean()),
                                identical_slots=float((ref_sel == gpu_sel).float().mean()),
                                max_abs_out_diff_query_rows=float((ref_out - gpu_out).abs().max())))
    display(pd.DataFrame(compare))
else:
    print("no usable GPU: kernel-vs-reference comparison skipped")

# %% [markdown]
# ## Kernel speed
#
# When a benchmark CSV is present (`python -m mobalab.bench.attention --out runs/bench`, or `$MOBALAB_BENCH_CSV`),
# the `kernel-speed` experiment draws latency, speedup over FlashAttention-2 and cuDNN, useful TFLOP/s and memory.

# %%
bench_csv = kernel_speed.default_bench_csv() or "recorded"  # else the recorded H200 CSV shipped with mobalab
if bench_csv:
    speed = kernel_speed.run(kernel_speed.Config(bench_csv=bench_csv, run_bench=False))
    display(kernel_speed.summary(speed))
    fig_speed = kernel_speed.plot(speed)
else:
    print("no benchmark CSV found: run `python -m mobalab.bench.attention --out runs/bench` on a GPU")

# %% [markdown]
# ## MoBA inside a Hugging Face model
#
# `mobalab.integrations.transformers.register()` makes `attn_implementation="moba"` available to transformers
# (`pip install "mobalab[hf]"`); every attention layer then runs MoBA with the block size and top-k of the model
# config, read at every call. A tiny randomly initialised Llama built in code, on the CPU (torch reference, fp32):
# with top-k covering all 16 key blocks MoBA is dense causal attention, so logits and gradients equal SDPA's up
# to rounding; with a smaller top-k it is sparse and the logits differ. On a GPU the same model in bf16 runs the
# CUDA kernels (head dims 32, 64, 96, 128, 256).

# %%
import torch  # noqa: E402  (this section's own imports: it alone needs transformers)
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from mobalab.integrations.transformers import register  # noqa: E402

register()
seqlen, block = 256, 16  # 16 key blocks


def tiny_llama(attn):
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, attn_implementation=attn,
                         moba_block_size=block, moba_top_k=seqlen // block)
    torch.manual_seed(0)  # the same weights for both
    return LlamaForCausalLM(config)


sdpa, moba = tiny_llama("sdpa"), tiny_llama("moba")
ids = torch.randint(0, 256, (2, seqlen), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    reference = sdpa(ids).logits
    for top_k in (16, 4, 2):
        moba.config.moba_top_k = top_k
        rel = ((moba(ids).logits - reference).norm() / reference.norm()).item()
        print(f"top_k {top_k:2d} of {seqlen // block} blocks: logits differ from SDPA's by {rel:.1e} (relative)")

moba.config.moba_top_k = 16  # a training step through MoBA: loss, backward, gradients against SDPA's
moba(ids, labels=ids).loss.backward()
sdpa(ids, labels=ids).loss.backward()
pairs = zip(moba.parameters(), sdpa.parameters(), strict=True)
worst = max(((p.grad - s.grad).norm() / s.grad.norm()).item() for p, s in pairs)
print(f"top_k 16: gradients equal SDPA's up to {worst:.1e} (relative, worst parameter)")
