r"""What training a :class:`RecallTransformer` costs: FLOPs per step and an H200 time estimate, from the CPU.

Per step, with T = batch·N tokens, L layers, H heads of dimension D, width :math:`d_m`, MLP ratio r:

.. math::
    F_{\rm lin} = 3\cdot 2T\,L\,(3HD\,d_m + HD\,d_m + 2 r d_m^2),\qquad
    F_{\rm attn} = 3.5\cdot 4\,H D\,L\cdot \mathrm{batch}\sum_{t<N} a_t ,

(forward + backward = 3x the forward for matmuls; 3.5x for attention, whose backward does 2.5x the forward's
work), where :math:`a_t` is the number of keys query t attends: t + 1 for dense causal attention,
:math:`\min(t+1,\ t - cB + 1 + (k-1)B)` for MoBA (own block up to t, at most k - 1 full past blocks), plus
MoBA's routing, :math:`3\cdot 2\,H D L\cdot\mathrm{batch}\cdot N\,n/2` (scores against the centroids of
the past blocks; counted with the forward only, it has no backward, so the factor 3 is generous).

A length curriculum (:class:`TrainConfig`) is costed stage by stage. Time = FLOPs / rate + a fixed cost per
step. The rates and fixed costs are assumptions read off this project's recorded H200 runs (RESULTS.md: MoBA
forward+backward reaches 60-85 useful TFLOP/s at 8K, bf16 dense SDPA several hundred; small matmuls of width
256 run far below the GPU's peak; a small MoBA model's step is dominated by the fixed cost of its launches,
calibrated on the recorded training run) and are meant to size a run, not to replace a measurement:
:data:`H200_ASSUMPTIONS`. A MoBA stage whose top-k covers every block (k·B >= N) runs, and is costed, as
dense attention.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping

from ._recall_task import RecallTask
from ._training import TrainConfig
from ._transformer import ModelConfig

__all__ = ["training_cost", "H200_ASSUMPTIONS"]

#: effective rates (FLOP/s) and fixed costs (seconds) assumed for a small model on one H200, bf16
H200_ASSUMPTIONS = {
    "linear_flops_per_s": 100e12,  # d_model 256-512 matmuls: far from the 990 TFLOP/s peak
    "dense_attention_flops_per_s": 150e12,  # torch SDPA (flash) forward + backward, d = 64, causal, 4K-8K
    "moba_attention_flops_per_s": 50e12,  # useful FLOP/s of the MoBA kernels, small B at 4K-8K
    # Fixed costs calibrated on two recorded runs of the trained-routing study (H200, 2-layer d_model 256 models,
    # 600 steps with the 512/1024-token curriculum then 4K, batch 16), whose hosts differed: dense 36.6 / 13.0 s,
    # MoBA B 32 52.3 / 17.8 s, B 128 52.6 / 16.4 s per model, where the FLOP terms alone give ~6 s. Set between
    # them (each run within 1.8x): a step costs ~25 ms of optimizer, batch and host work whatever the attention,
    # and a MoBA layer ~11 ms more of routing, list, plan and merge launches.
    "step_overhead_s": 25e-3,  # optimizer, batch transfer, Python per step
    "dense_layer_overhead_s": 0.3e-3,  # launches per layer, forward + backward
    "moba_layer_overhead_s": 11e-3,  # routing, list, plan and merge launches per layer, forward + backward
}


def _attended_keys(n: int, block_size: int | None, top_k: int | None) -> float:
    """Σ_t a_t over t = 0..n-1 (module docstring)."""
    if block_size is None:
        return n * (n + 1) / 2
    total = 0.0
    for c in range(math.ceil(n / block_size)):
        lo, hi = c * block_size, min(n, (c + 1) * block_size)
        past = min(c, top_k - 1) * block_size
        length = hi - lo
        total += length * past + length * (length + 1) / 2
    return total


def training_cost(model_config: ModelConfig, task: RecallTask, train_config: TrainConfig,
                  assumptions: dict | None = None) -> dict:
    """FLOPs of one training step and of the whole run, and the estimated H200 seconds (module docstring).

    Returns a dict: ``flops_linear``, ``flops_attention``, ``flops_routing`` and ``seconds_per_step`` (one
    step at the full length), ``flops_total`` and ``seconds`` (the whole run, curriculum steps included,
    training only). ``assumptions``: the rates and fixed costs, a dict with the keys of
    :data:`H200_ASSUMPTIONS` (None: those).

    Examples
    --------
    >>> task = RecallTask(seq_len=4096)
    >>> c = training_cost(ModelConfig(attention="moba", block_size=128, top_k=4), task, TrainConfig())
    >>> round(c["flops_total"] / 1e15, 2), round(c["seconds"], 1)
    (0.33, 22.9)
    """
    for name, value, cls in (("model_config", model_config, ModelConfig), ("task", task, RecallTask),
                             ("train_config", train_config, TrainConfig)):
        if not isinstance(value, cls):
            raise TypeError(f"training_cost: {name} must be a {cls.__name__}, got {type(value).__name__}")
    a = _check_assumptions(assumptions)
    tc = train_config
    for seq_len, _ in tc.curriculum:
        if seq_len > task.seq_len:  # as train() refuses it: the stage's batch factor would be 0, its cost 0
            raise ValueError(f"training_cost: curriculum stage seq_len {seq_len} must be <= the task's seq_len "
                             f"({task.seq_len})")
        try:  # as train() refuses it: the stage's task cannot be drawn
            dataclasses.replace(task, seq_len=seq_len)
        except ValueError as exc:
            raise ValueError(f"training_cost: curriculum stage seq_len {seq_len} is too short for the task: "
                             f"{exc}") from None
    phases = [(task.seq_len, tc.batch_size, tc.steps - sum(k for _, k in tc.curriculum))]
    phases += [(n, tc.batch_size * (task.seq_len // n), k) for n, k in tc.curriculum]
    out = {"flops_total": 0.0, "seconds": 0.0}
    for i, (n, bsz, steps) in enumerate(phases):
        step = _step_cost(model_config, n, bsz, a)
        if i == 0:  # per-step numbers are those of the full-length phase
            out.update({k: v for k, v in step.items() if k != "flops_step"})
        out["flops_total"] += step["flops_step"] * steps
        out["seconds"] += step["seconds_per_step"] * steps
    return out


def _check_assumptions(assumptions) -> dict:
    """``assumptions`` (None: :data:`H200_ASSUMPTIONS`) as a dict with every key of :data:`H200_ASSUMPTIONS`:
    finite rates > 0 and fixed costs >= 0."""
    if assumptions is None:
        return dict(H200_ASSUMPTIONS)
    if not isinstance(assumptions, Mapping):
        raise TypeError(f"training_cost: assumptions must be a dict like H200_ASSUMPTIONS, got "
                        f"{type(assumptions).__name__}")
    missing = [key for key in H200_ASSUMPTIONS if key not in assumptions]
    if missing:
        raise ValueError(f"training_cost: assumptions lack {missing}; give every key of H200_ASSUMPTIONS "
                         f"({sorted(H200_ASSUMPTIONS)})")
    for key in H200_ASSUMPTIONS:
        v = assumptions[key]
        rate = key.endswith("_per_s")
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0 or (
                rate and v == 0):
            raise ValueError(f"training_cost: assumptions[{key!r}] must be a finite number "
                             f"{'> 0' if rate else '>= 0'}, got {v!r}")
    return dict(assumptions)


def _step_cost(mc: ModelConfig, n: int, bsz: int, a: dict) -> dict:
    width = mc.n_heads * mc.head_dim
    tokens = bsz * n
    per_token = 3 * width * mc.d_model + width * mc.d_model + 2 * mc.mlp_ratio * mc.d_model ** 2
    lin = 3 * 2 * tokens * mc.n_layers * per_token
    # a MoBA layer whose top_k covers every block runs as dense attention (RecallTransformer)
    moba = mc.attention == "moba" and mc.top_k < math.ceil(n / mc.block_size)
    keys = _attended_keys(n, mc.block_size if moba else None, mc.top_k if moba else None)
    attn = 3.5 * 4 * width * mc.n_layers * bsz * keys
    routing = 3 * 2 * width * mc.n_layers * bsz * n * math.ceil(n / mc.block_size) / 2 if moba else 0.0
    rate = a["moba_attention_flops_per_s"] if moba else a["dense_attention_flops_per_s"]
    layer_fixed = a["moba_layer_overhead_s"] if moba else a["dense_layer_overhead_s"]
    per_step = lin / a["linear_flops_per_s"] + (attn + routing) / rate + a["step_overhead_s"] + \
        mc.n_layers * layer_fixed
    return {"flops_linear": lin, "flops_attention": attn, "flops_routing": routing, "flops_step": lin + attn + routing,
            "seconds_per_step": per_step}
