r"""trained-routing: the routing theory against small transformers trained from scratch.

The paper's two claims come from trained models: (1) at equal sparsity (k·B fixed) smaller blocks route
better, because SNR = Δμ_eff/(σ sqrt(2B)); (2) a short key convolution raises Δμ_eff (more related keys m in
the needle's block, higher μ_cluster). Fixed filters do not raise it (the key-conv experiment), so if (2)
holds the gain must come from *training* the filter. This experiment tests both on models it trains.

Task (:class:`mobalab.training.RecallTask`): key-value needles scattered over filler, queries at the end
asking for a needle's value; one attention hop from query to needle. Each needle is a run of
``needle_len`` copies of its token: a single-token needle gives a block score an excess of Δμ/B, and
training stops raising Δμ once attention is saturated on the needle (Δμ/σ about 5), far short of what a
top-k slot needs at B = 32-128, so MoBA models never learn to route to it (on the GPU: dense 0.996,
MoBA 0.26-0.33); a run of r copies gives the block r·Δμ (the paper's Δμ_eff with m = r), and the block
sizes then differ in SNR as the theory says (see :class:`mobalab.training.RecallTask`). Models
(:class:`mobalab.training.RecallTransformer`, RoPE, pre-norm, ``n_layers`` layers of ``n_heads`` heads of
``head_dim``) are trained from scratch with identical initial weights and batches per seed (a length
curriculum, :class:`mobalab.training.TrainConfig`: ``curriculum`` stages at 512 and 1024 tokens first, the
first of them dense for every variant, then ``seq_len``), one per ``variants`` entry and seed:

* ``dense``: causal softmax attention (torch SDPA);
* ``moba-<B>``: MoBA with block size B and top-k = ``budget``/B (equal sparsity: every query attends
  ``budget`` keys), through :func:`mobalab.kernels.moba_attention` (CUDA kernels on a GPU, the reference on
  the CPU);
* ``moba-<B>-kconv<W>``: the same with the paper's trainable key convolution of width W
  (:class:`mobalab.training.KeyConv`, zero-initialised: it starts as the identity);
* any of these with ``-nope``: no position encoding, as the paper's MoBA layers (its RoPE lives in separate
  sliding-window layers). With RoPE in the routed layer the scores of noise blocks carry a component that is
  coherent within a block (the keys' shared directions rotate with position), so a block score's variance is
  several times σ²/B and routing is worse than the token model says; without it the keys behave as
  independent tokens. The default list measures both, the paper's claims in each setting.

Per model, layer and head (:func:`mobalab.training.evaluate`, same evaluation sequences for every model): the
statistics the theory takes, measured on the post-RoPE q / k the router saw (μ_signal, μ_noise, σ, Δμ,
m, μ_cluster, Δμ_eff; also on cosines), three predictions of the needle block's routing recall (the
token model at the measured σ, the paper's formula on cosines, the Gaussian model with the measured
block-score moments; all causal), the observed recall (:func:`mobalab.kernels.moba_topk` on the same q / k)
and the model's retrieval accuracy. A dense model is measured at every MoBA variant's (B, k) as if it were
routed (``routed`` False): the same vectors under two block sizes, a paired test of claim (1).

The *retrieval head* of a model is the (layer, head) that puts the most dense-softmax weight on the needle
(``needle_mass``); :func:`summary` and :func:`claims` compare models there. In :func:`summary` recall and
accuracy are pooled over seeds with 95% Wilson intervals and continuous statistics carry t intervals over
seeds; the differences in :func:`claims` all take Welch t intervals over seeds (one value per model).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as sps

from mobalab.stats import wilson_interval

from ._checks import check_counts, check_seed, is_count
from ._columns import check_table, integer_columns

__all__ = ["Config", "run", "plot", "summary", "plan", "claims", "retrieval_heads", "model_config", "gpu_estimate"]

NAME = "trained-routing"
#: columns of the tidy table that summary and plot read first (check_table names the missing ones)
_SUMMARY_COLUMNS = ("variant", "replicate", "layer", "head", "block_size", "top_k", "needle_mass", "correct", "answers",
                    "recall_hits", "recall_trials")
_PLOT_COLUMNS = (*_SUMMARY_COLUMNS, "n_values")
#: Training rate (FLOP/s) assumed for sizing a run on a CPU: about what two cores reach on the full-size dense
#: model at 4K tokens (the MoBA reference runs slower still), so the estimate errs short.
CPU_FLOPS_PER_S = 20e9
_VARIANT = re.compile(r"^(dense|moba-(\d+))(?:-kconv(\d+))?(-nope)?$")


@dataclass(frozen=True)
class Config:
    """Task, architecture, variants, seeds and optimisation. ``budget`` = k·B keys per query for every MoBA
    variant; ``device``: 'auto' (CUDA when usable), 'cpu' or 'cuda[:N]'; ``cpu_threads``: torch's intra-op
    threads during the run (None: unchanged; tiny CPU models run several times faster on one thread, where
    thread hand-offs cost more than they save); ``checkpoint_dir``: when set, every trained model's weights
    are saved there (a few MB each; nothing is written by default); ``first_replicate``: train only replicates
    ``first_replicate .. n_seeds - 1`` (a later run adding seeds to a study: replicate r is the same model
    whichever run trains it, so the rows of both runs concatenate into one study); ``routes``: the (B, k) at
    which dense models' attention is routed for the statistics (None: those of the MoBA variants; a run of
    dense models alone names them)."""

    seq_len: int = 4096
    n_pairs: int = 32
    n_queries: int = 16
    n_keys: int = 256
    n_values: int = 64
    n_filler: int = 256
    needle_len: int = 8
    d_model: int = 256
    n_layers: int = 2
    n_heads: int = 4
    head_dim: int = 64
    budget: int = 512
    variants: tuple[str, ...] = ("dense", "moba-32", "moba-128", "moba-128-kconv3", "moba-128-kconv5",
                                 "moba-32-nope", "moba-128-nope", "moba-128-kconv5-nope")
    n_seeds: int = 3
    first_replicate: int = 0
    routes: tuple[tuple[int, int], ...] | None = None
    steps: int = 600
    curriculum: tuple[tuple[int, int], ...] = ((512, 150), (1024, 100))
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 25
    eval_sequences: int = 64
    eval_batch_size: int = 16
    device: str = "auto"
    cpu_threads: int | None = None
    checkpoint_dir: str | None = None
    seed: int = 0

    @classmethod
    def quick(cls, **overrides) -> Config:
        """A tiny CPU run (seconds): N = 128, blocks 8 and 16 at budget 32, 2 seeds, 20 steps (8 at N = 64)."""
        base = dict(seq_len=128, n_pairs=6, n_queries=6, n_keys=16, n_values=8, n_filler=16, needle_len=2, d_model=32,
                    n_layers=2, n_heads=2, head_dim=16, budget=32,
                    variants=("dense", "moba-8", "moba-16", "moba-16-kconv3", "moba-16-kconv5", "moba-16-nope"),
                    n_seeds=2,
                    steps=20, curriculum=((64, 8),), batch_size=4, lr=3e-3, warmup=5,
                    eval_sequences=8, eval_batch_size=8, device="cpu", cpu_threads=1)
        base.update(overrides)
        return cls(**base)


def task(config: Config):
    """The :class:`mobalab.training.RecallTask` of ``config``."""
    from mobalab.training import RecallTask

    return RecallTask(seq_len=config.seq_len, n_pairs=config.n_pairs, n_queries=config.n_queries,
                      n_keys=config.n_keys, n_values=config.n_values, n_filler=config.n_filler,
                      needle_len=config.needle_len)


def model_config(config: Config, variant: str):
    """:class:`mobalab.training.ModelConfig` of a variant label ('dense', 'moba-<B>', '...-kconv<W>', '...-nope').

    Examples
    --------
    >>> mc = model_config(Config(), "moba-32-kconv3")
    >>> mc.attention, mc.block_size, mc.top_k, mc.key_conv
    ('moba', 32, 16, 3)
    """
    from mobalab.training import ModelConfig

    match = _VARIANT.match(variant) if isinstance(variant, str) else None
    if match is None:
        raise ValueError(f"variant must look like 'dense' or 'moba-<B>', optionally followed by '-kconv<W>' and "
                         f"'-nope', got {variant!r}")
    width = int(match.group(3) or 0)
    common = dict(d_model=config.d_model, n_layers=config.n_layers, n_heads=config.n_heads,
                  head_dim=config.head_dim, key_conv=width, rope=match.group(4) is None)
    if match.group(1) == "dense":
        mc = ModelConfig(attention="dense", **common)
    else:
        bsz = int(match.group(2))
        if bsz < 1 or config.budget % bsz:
            raise ValueError(f"variant {variant!r}: block size {bsz} must divide budget = {config.budget} "
                             "(k = budget/B)")
        mc = ModelConfig(attention="moba", block_size=bsz, top_k=config.budget // bsz, **common)
    # claims() pairs variants by these names ('moba-16' with 'moba-16-kconv3'): 'moba-016' or '-kconv0' would
    # train a model that no comparison finds, or a second copy of one under another name
    if mc.label != variant:
        raise ValueError(f"variant {variant!r} names the model {mc.label!r}: write it that way")
    return mc


def _routes(config: Config) -> list[tuple[int, int]]:
    if config.routes is not None:
        from mobalab.training._evaluation import check_routes

        # checked here, not only by evaluate(): that runs after the first model has trained
        return list(dict.fromkeys(check_routes(config.routes, prefix="")))
    out = []
    for v in config.variants:
        mc = model_config(config, v)
        if mc.attention == "moba":
            out.append((mc.block_size, mc.top_k))
    return list(dict.fromkeys(out))


def _check(config: Config) -> None:
    check_seed(config.seed)
    if isinstance(config.variants, str) or not config.variants:
        raise ValueError(f"variants must be a sequence naming at least one model ('dense', 'moba-<B>', ...), got "
                         f"{config.variants!r}")
    check_counts(config, "budget", "n_seeds")
    for v in config.variants:
        model_config(config, v)
    if len(set(config.variants)) != len(config.variants):
        raise ValueError(f"variants must be distinct, got {config.variants}")
    if (isinstance(config.first_replicate, bool) or not isinstance(config.first_replicate, numbers.Integral)
            or not 0 <= config.first_replicate < config.n_seeds):
        raise ValueError(f"first_replicate must be an integer in [0, n_seeds) = [0, {config.n_seeds}), "
                         f"got {config.first_replicate!r}")
    # evaluate() checks these too, but only after the first model has trained (minutes at full size)
    for name in ("eval_sequences", "eval_batch_size"):
        v = getattr(config, name)
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if config.cpu_threads is not None and not is_count(config.cpu_threads):
        raise ValueError(f"cpu_threads must be None or an integer >= 1, got {config.cpu_threads!r}")
    if config.checkpoint_dir is not None and not isinstance(config.checkpoint_dir, str | os.PathLike):
        raise ValueError(f"checkpoint_dir must be None or a folder's path, got {config.checkpoint_dir!r}")
    if not _routes(config):
        raise ValueError("variants need at least one MoBA model, or routes=((B, k), ...): the routing statistics "
                         "are taken at those (B, k)")
    task(config)


def _model_seeds(config: Config) -> list[int]:
    states = np.random.SeedSequence(int(config.seed)).generate_state(config.n_seeds + 1, dtype=np.uint32)
    return [int(s) for s in states]


def _train_config(config: Config, seed: int):
    from mobalab.training import TrainConfig

    return TrainConfig(steps=config.steps, batch_size=config.batch_size, lr=config.lr, warmup=config.warmup,
                       seed=seed, device=config.device, log_every=max(1, config.steps // 50),
                       curriculum=config.curriculum)


def gpu_estimate(config: Config = Config()) -> pd.DataFrame:
    """Estimated H200 seconds per variant (all seeds) from a CPU-side FLOP count
    (:func:`mobalab.training.training_cost`), plus evaluation (10% of training) and one-off costs (process and
    CUDA start, kernel compilation: 60 s) in a final ``total`` row.

    Examples
    --------
    >>> est = gpu_estimate(Config())
    >>> int(est["models"].iloc[-1]), round(float(est["seconds"].iloc[-1]) / 60, 1)
    (24, 14.0)
    """
    from mobalab.training import training_cost

    _check(config)
    t = task(config)
    rows = []
    for v in config.variants:
        mc = model_config(config, v)
        c = training_cost(mc, t, _train_config(config, 0))
        rows.append({"variant": v, "models": config.n_seeds, "tflop_per_model": c["flops_total"] / 1e12,
                     "seconds_per_step": c["seconds_per_step"],
                     "seconds": config.n_seeds * c["seconds"] * 1.1})
    df = pd.DataFrame(rows)
    total = {"variant": "total (+60 s start-up and compilation)", "models": int(df["models"].sum()),
             "tflop_per_model": math.nan, "seconds_per_step": math.nan, "seconds": float(df["seconds"].sum()) + 60.0}
    return pd.concat([df, pd.DataFrame([total])], ignore_index=True)


def plan(config: Config = Config()) -> str:
    """What :func:`run` will do, said before it starts (the CLI prints it): the models, where they train and,
    on a CPU, whether the run is sized for a GPU (the full study is: about 14 minutes on an H200, days on a
    CPU; ``--quick`` trains the same study small, in well under a minute on a CPU).

    Examples
    --------
    >>> from mobalab.experiments.trained_routing import Config, plan
    >>> print(plan(Config.quick()))
    6 variants x 2 seeds = 12 models trained on cpu (N = 128, 20 steps each, 0.021 TFLOP in all)
    >>> print(plan(Config(device="cpu")))  # doctest: +NORMALIZE_WHITESPACE
    8 variants x 3 seeds = 24 models trained on cpu (N = 4096, 600 steps each, 12.3 PFLOP in all); sized for
    a GPU: about 14 min on an H200 (gpu_estimate), about 7.1 days on a CPU at 20 GFLOP/s; `--quick` trains the
    study small on a CPU in under a minute
    """
    from mobalab.training import resolve_device

    _check(config)
    seeds = config.n_seeds - config.first_replicate
    models = len(config.variants) * seeds
    any_moba = any(model_config(config, v).attention == "moba" for v in config.variants)
    device = resolve_device(config.device, "moba" if any_moba else "dense")
    est = gpu_estimate(config).iloc[:-1]  # per variant, over all n_seeds; the last row is the total
    share = seeds / config.n_seeds  # first_replicate > 0 trains only the later seeds
    tflop = float((est["tflop_per_model"] * seeds).sum())
    gpu_s = float(est["seconds"].sum()) * share + 60.0  # + start-up and compilation, as gpu_estimate
    work = (f"{tflop / 1e3:.1f} PFLOP" if tflop >= 1e3 else f"{tflop:.0f} TFLOP" if tflop >= 10
            else f"{tflop:.2g} TFLOP")
    text = (f"{len(config.variants)} variants x {seeds} seed{'s' if seeds > 1 else ''} = {models} models trained "
            f"on {device} (N = {config.seq_len}, {config.steps} steps each, {work} in all)")
    if device.type == "cuda":
        return text + f"; about {gpu_s / 60:.0f} min on an H200 (gpu_estimate)"
    cpu_s = tflop * 1e12 / CPU_FLOPS_PER_S
    if cpu_s < 600:
        return text
    amount, unit = (cpu_s / 86400, "days") if cpu_s >= 86400 else (cpu_s / 3600, "hours")
    cpu = f"{amount:.1f} {unit}" if amount < 10 else f"{amount:.0f} {unit}"
    return text + (f"; sized for a GPU: about {gpu_s / 60:.0f} min on an H200 (gpu_estimate), about {cpu} on a "
                   f"CPU at {CPU_FLOPS_PER_S / 1e9:.0f} GFLOP/s; `--quick` trains the study small on a CPU in "
                   "under a minute")


def run(config: Config = Config(), progress: bool = False) -> pd.DataFrame:
    """Train every variant × seed, evaluate each, and return one row per (model, layer, head, route);
    ``run_seed`` is the config's seed, from which every model's seed derives."""
    import torch

    _check(config)
    if config.cpu_threads is None:
        return _run(config, progress)
    previous = torch.get_num_threads()
    torch.set_num_threads(config.cpu_threads)
    try:
        return _run(config, progress)
    finally:
        torch.set_num_threads(previous)


def _run(config: Config, progress: bool) -> pd.DataFrame:
    import torch
    from tqdm.auto import tqdm

    from mobalab.training import evaluate, resolve_device, save_checkpoint, train, training_cost

    t = task(config)
    any_moba = any(model_config(config, v).attention == "moba" for v in config.variants)
    device = resolve_device(config.device, "moba" if any_moba else "dense")
    config_dev = dataclasses.replace(config, device=str(device))
    seeds = _model_seeds(config)
    eval_seed, model_seeds = seeds[0], seeds[1:]
    routes = _routes(config)
    if config.checkpoint_dir:  # a path that cannot be a folder fails here, not after the first model has trained
        Path(config.checkpoint_dir).mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        _compile_kernels(config, device)
    frames = []
    bar = tqdm(total=len(config.variants) * (config.n_seeds - config.first_replicate), desc=NAME,
               disable=not progress, unit="model")
    for replicate, mseed in enumerate(model_seeds):
        if replicate < config.first_replicate:
            continue
        for v in config.variants:
            mc = model_config(config, v)
            tc = _train_config(config_dev, mseed)
            trained = train(mc, t, tc, progress=progress)  # a model's steps: minutes each at full size
            ev = evaluate(trained, sequences=config.eval_sequences, batch_size=config.eval_batch_size,
                          seed=eval_seed, routes=None if mc.attention == "moba" else routes)
            hist = trained.history
            tail = hist.iloc[-max(1, len(hist) // 10):]
            ev.insert(0, "experiment", NAME)
            ev.insert(1, "variant", v)
            ev.insert(2, "attention", mc.attention)
            ev.insert(3, "model_block_size", mc.block_size if mc.attention == "moba" else 0)
            ev.insert(4, "model_top_k", mc.top_k if mc.attention == "moba" else 0)
            ev.insert(5, "key_conv", mc.key_conv)
            ev.insert(6, "rope", mc.rope)
            ev.insert(7, "replicate", replicate)
            ev.insert(8, "model_seed", mseed)
            ev["final_train_loss"] = float(tail["loss"].mean())
            ev["final_train_accuracy"] = float(tail["accuracy"].mean())
            # by step: a stage's length may recur later (a stage at the full seq_len, or two at one length)
            first = hist[hist["step"] < config.curriculum[0][1]] if config.curriculum else hist.iloc[:0]
            # did attention learn the lookup in the first, short stage? (NaN without a curriculum)
            ev["first_stage_train_accuracy"] = (float(first["accuracy"].iloc[-max(1, len(first) // 5):].mean())
                                                if len(first) else math.nan)
            ev["train_seconds"] = trained.seconds
            ev["est_h200_seconds"] = training_cost(mc, t, tc)["seconds"]
            ev["params"] = sum(p.numel() for p in trained.model.parameters())
            ev["steps"] = config.steps
            ev["budget"] = config.budget
            ev["n_values"] = config.n_values
            ev["device"] = str(device)
            ev["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
            if mc.key_conv:
                w = torch.cat([layer.key_conv.weight.detach().float().abs().mean(1)
                               for layer in trained.model.layers]).cpu().numpy()
                ev["kconv_mean_abs_weight"] = float(w.mean())
            else:
                ev["kconv_mean_abs_weight"] = math.nan
            frames.append(ev)
            if config.checkpoint_dir:
                save_checkpoint(trained, Path(config.checkpoint_dir) / f"{v}-seed{replicate}.pt")
            del trained
            bar.update(1)
    bar.close()
    df = pd.concat(frames, ignore_index=True)
    df.insert(1, "run_seed", config.seed)
    return integer_columns(df, ("run_seed",))


def _compile_kernels(config: Config, device) -> None:
    """One MoBA forward + backward per (B, k) before any timing, so that ``train_seconds`` does not include
    the one-off NVRTC compilation of the kernels."""
    import torch

    from mobalab.kernels import moba_attention

    g = torch.Generator(device=device).manual_seed(0)
    for bsz, top_k in _routes(config):
        shape = (1, 4 * bsz * top_k, config.n_heads, config.head_dim)
        q, k, v = (torch.randn(shape, device=device, generator=g, dtype=torch.bfloat16).requires_grad_()
                   for _ in range(3))
        moba_attention(q, k, v, bsz, top_k, causal=True).float().sum().backward()
    torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------
# reading the result


def retrieval_heads(df: pd.DataFrame) -> pd.DataFrame:
    """Rows at each model's retrieval head: the (layer, head) with the largest ``needle_mass`` (one row per
    model and route)."""
    keys = ["variant", "replicate"]
    # positional labels: studies concatenated from several runs repeat index labels, which idxmax then conflates
    first_route = df.drop_duplicates(["variant", "replicate", "layer", "head"]).reset_index(drop=True)
    best = first_route.loc[first_route.groupby(keys)["needle_mass"].idxmax(), keys + ["layer", "head"]]
    return df.merge(best, on=keys + ["layer", "head"]).reset_index(drop=True)


def _t_interval(x) -> tuple[float, float, float]:
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if x.size < 2:
        return mean, math.nan, math.nan
    half = float(sps.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half


def _welch(a, b) -> tuple[float, float, float]:
    """Mean difference a - b with a 95% Welch t interval (NaN bounds with fewer than 2 values per side)."""
    a, b = (np.asarray(x, dtype=float) for x in (a, b))
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if a.size == 0 or b.size == 0:
        return math.nan, math.nan, math.nan
    diff = float(a.mean() - b.mean())
    if a.size < 2 or b.size < 2:
        return diff, math.nan, math.nan
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = math.sqrt(va + vb)
    if se == 0:
        return diff, diff, diff
    dof = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    half = float(sps.t.ppf(0.975, dof) * se)
    return diff, diff - half, diff + half


def _models(df: pd.DataFrame) -> pd.DataFrame:
    """One row per model (variant, replicate) with its accuracy counts."""
    return df.drop_duplicates(["variant", "replicate"])[["variant", "replicate", "correct", "answers", "accuracy",
                                                         "final_train_loss", "train_seconds", "est_h200_seconds"]]


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per (variant, route) at the retrieval heads: accuracy and recall pooled over seeds (Wilson), the three
    predictions (mean over seeds, and in units of the pooled recall interval), Δμ/σ, Δμ_eff/σ, m, the SNRs,
    the block-variance ratio and the RoPE factor (measured, and the RoPE model's) with t intervals over seeds,
    and ``<kind>_resid``: observed minus predicted recall model by model (each prediction takes that model's
    own statistics), mean with a t interval over seeds -- the comparison that carries the seed-to-seed spread,
    which the pooled interval does not."""
    from mobalab.stats import interval_units

    check_table(df, NAME, "summary", _SUMMARY_COLUMNS)
    rh = retrieval_heads(df)
    models = _models(df)
    rows = []
    for (variant, bsz, top_k), g in rh.groupby(["variant", "block_size", "top_k"], sort=False):
        m = models[models["variant"] == variant]
        c, a = int(m["correct"].sum()), int(m["answers"].sum())
        hits, trials = int(g["recall_hits"].sum()), int(g["recall_trials"].sum())
        acc_lo, acc_hi = wilson_interval(c, a)
        rec_lo, rec_hi = wilson_interval(hits, trials)
        row = {"variant": variant, "routed": bool(g["routed"].iloc[0]), "block_size": bsz, "top_k": top_k,
               "seeds": len(g), "accuracy": c / a, "acc_low": float(acc_lo), "acc_high": float(acc_hi),
               "recall": hits / trials, "recall_low": float(rec_lo), "recall_high": float(rec_hi)}
        for kind in ("paper", "block", "cosine"):
            pred = float(g[f"pred_{kind}"].mean())
            row[f"pred_{kind}"] = pred
            row[f"{kind}_units"] = float(interval_units(pred, hits, trials)) if math.isfinite(pred) else math.nan
            resid = g["recall_hits"] / g["recall_trials"] - g[f"pred_{kind}"]
            row[f"{kind}_resid"], row[f"{kind}_resid_low"], row[f"{kind}_resid_high"] = _t_interval(resid)
        for col in ("z_needle", "z_eff", "m", "snr_paper", "block_snr", "block_var_ratio", "cos_delta_mu_eff",
                    "rope_factor", "rope_factor_theory"):
            # (the RoPE factor columns are absent from studies recorded before they were measured)
            mean, lo, hi = _t_interval(g[col] if col in g else [])
            row[col], row[f"{col}_low"], row[f"{col}_high"] = mean, lo, hi
        row["retrieval_layers"] = " ".join(str(x) for x in g["layer"])
        row["train_seconds"] = float(m["train_seconds"].sum())
        rows.append(row)
    return pd.DataFrame(rows)


def _verdict(lo: float, hi: float) -> str:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "not resolved (too few seeds)"
    if lo > 0:
        return "holds"
    if hi < 0:
        return "opposite"
    return "not resolved (interval contains 0)"


def claims(df: pd.DataFrame) -> pd.DataFrame:
    """The paper's two claims as differences with 95% intervals and a verdict computed from them.

    1. smaller blocks route better at equal sparsity: the smallest-B MoBA model minus the largest-B one
       (no kconv; with RoPE, and again without): recall at the retrieval head, accuracy and
       Δμ_eff/(σ sqrt(2B)) = SNR; and the dense model's own vectors routed at both block sizes (same q / k).
    2. a trained key convolution raises Δμ_eff: each ``moba-<B>-kconv<W>[-nope]`` minus ``moba-<B>[-nope]``:
       Δμ_eff/σ, m, recall and accuracy.

    Every interval is a Welch t interval over seeds (one value per trained model: a rate, or a measured
    statistic), so a verdict needs at least two seeds on each side and accounts for how much models trained
    from different seeds differ.
    """
    rh = retrieval_heads(df)
    models = _models(df)
    out = []

    def prop(metric, a_rows, b_rows, hit_col, n_col):
        # over seeds, not pooled answers: models trained from different seeds differ far more than the
        # binomial spread of one model's answers (B 128 recall 0.24-0.49 over three seeds at 1024 queries each)
        ra, rb = (rows[hit_col] / rows[n_col] for rows in (a_rows, b_rows))
        d, lo, hi = _welch(ra, rb)
        return {"metric": metric, "a": float(ra.mean()), "b": float(rb.mean()), "difference": d, "low": lo,
                "high": hi}

    def cont(metric, a_vals, b_vals):
        d, lo, hi = _welch(a_vals, b_vals)
        return {"metric": metric, "a": float(np.nanmean(a_vals)), "b": float(np.nanmean(b_vals)), "difference": d,
                "low": lo, "high": hi}

    routed = rh[rh["routed"]]
    for rope, suffix in ((True, ""), (False, "-nope")):
        group = routed[(routed["rope"] == rope) & (routed["key_conv"] == 0)]
        plain = sorted({int(b) for b in group["model_block_size"]})
        if len(plain) < 2:
            continue
        small, large = plain[0], plain[-1]
        va, vb = f"moba-{small}{suffix}", f"moba-{large}{suffix}"
        a, b = routed[routed["variant"] == va], routed[routed["variant"] == vb]
        comp = f"{va} vs {vb}"
        for r in (prop("recall", a, b, "recall_hits", "recall_trials"),
                  prop("accuracy", models[models["variant"] == va], models[models["variant"] == vb], "correct",
                       "answers"),
                  cont("SNR (token model)", a["snr_paper"], b["snr_paper"])):
            out.append({"claim": "1: smaller B routes better (equal k·B)", "comparison": comp, **r})
        dense = rh[(rh["attention"] == "dense") & (rh["rope"] == rope) & (rh["key_conv"] == 0)]
        da, db = dense[dense["block_size"] == small], dense[dense["block_size"] == large]
        if len(da) and len(db):
            comp = f"dense{suffix} model's q/k routed at B={small} vs B={large}"
            for r in (prop("recall", da, db, "recall_hits", "recall_trials"),
                      cont("SNR (token model)", da["snr_paper"], db["snr_paper"])):
                out.append({"claim": "1: smaller B routes better (equal k·B)", "comparison": comp, **r})
    for v in dict.fromkeys(routed.loc[routed["key_conv"] > 0, "variant"]):
        g = routed[routed["variant"] == v]
        base = f"moba-{int(g['model_block_size'].iloc[0])}" + ("" if bool(g["rope"].iloc[0]) else "-nope")
        b = routed[routed["variant"] == base]
        if b.empty:
            continue
        comp = f"{v} vs {base}"
        for r in (cont("Δμ_eff/σ", g["z_eff"], b["z_eff"]), cont("m", g["m"], b["m"]),
                  prop("recall", g, b, "recall_hits", "recall_trials"),
                  prop("accuracy", models[models["variant"] == v], models[models["variant"] == base], "correct",
                       "answers")):
            out.append({"claim": "2: trained kconv raises Δμ_eff", "comparison": comp, **r})
    res = pd.DataFrame(out, columns=["claim", "comparison", "metric", "a", "b", "difference", "low", "high"])
    res["verdict"] = [_verdict(lo, hi) for lo, hi in zip(res["low"], res["high"], strict=True)]
    return res


def _seed_range(df: pd.DataFrame) -> str:
    per = df.drop_duplicates(["variant", "replicate"]).groupby("variant").size()
    return str(per.min()) if per.min() == per.max() else f"{per.min()}-{per.max()}"


def plot(df: pd.DataFrame):
    """(a) accuracy per variant, (b) recall at the retrieval head with the three predictions, (c) predicted
    against observed recall for every layer / head, (d) Δμ/σ and Δμ_eff/σ at the retrieval heads."""
    check_table(df, NAME, "plot", _PLOT_COLUMNS)
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    s = summary(df)
    models = _models(df)
    variants = list(dict.fromkeys(df["variant"]))
    colors = dict(zip(variants, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    fig, axes = plt.subplots(2, 2, figsize=(17, 10))

    ax = axes[0, 0]
    for i, v in enumerate(variants):
        r = s[s["variant"] == v].iloc[0]
        ax.bar(i, r["accuracy"], color=colors[v], alpha=0.6)
        ax.errorbar(i, r["accuracy"], yerr=[[r["accuracy"] - r["acc_low"]], [r["acc_high"] - r["accuracy"]]],
                    color="k", capsize=4)
        per = models[models["variant"] == v]["accuracy"].to_numpy()
        ax.plot(np.full(per.size, i) + np.linspace(-0.15, 0.15, per.size), per, "o", color="k", ms=4)
    ax.axhline(1.0 / df["n_values"].iloc[0], color="0.5", ls=":", lw=1,
               label=f"chance (1 / {df['n_values'].iloc[0]} values)")
    ax.set_xticks(range(len(variants)))
    ax.set_xticklabels(variants, rotation=20)
    ax.set_ylabel("retrieval accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title("(a) accuracy: pooled over seeds (95% Wilson), dots = seeds", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3, axis="y")

    ax = axes[0, 1]
    labels = []
    for i, (_, r) in enumerate(s.iterrows()):
        col = colors[r["variant"]]
        ax.errorbar(i, r["recall"], yerr=[[r["recall"] - r["recall_low"]], [r["recall_high"] - r["recall"]]],
                    fmt="s", color=col, capsize=4, mfc=col if r["routed"] else "white")
        ax.plot(i + 0.18, r["pred_paper"], "x", color="k")
        ax.plot(i + 0.18, r["pred_block"], "^", color="k", mfc="none")
        ax.plot(i + 0.18, r["pred_cosine"], "d", color="0.5", mfc="none")
        labels.append(f"{r['variant']}\nB={r['block_size']}, k={r['top_k']}")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("routing recall of the needle block")
    ax.set_title("(b) recall at the retrieval head (hollow: dense model's q/k routed as if MoBA)", fontsize=10)
    ax.legend(handles=[Line2D([], [], marker="s", ls="none", color="0.3", label="observed (95% Wilson)"),
                       Line2D([], [], marker="x", ls="none", color="k", label="token model, measured σ"),
                       Line2D([], [], marker="^", ls="none", color="k", mfc="none", label="block-score moments"),
                       Line2D([], [], marker="d", ls="none", color="0.5", mfc="none",
                              label="paper formula on cosines")], fontsize=8, loc="lower left")
    ax.grid(alpha=0.3, axis="y")

    ax = axes[1, 0]
    for v in variants:
        g = df[df["variant"] == v]
        for kind, marker in (("pred_paper", "x"), ("pred_block", "^")):
            ax.plot(g[kind], g["recall"], marker, color=colors[v], ms=5, alpha=0.7,
                    mfc="none" if marker == "^" else None)
    ax.plot([0, 1], [0, 1], color="0.4", lw=1)
    ax.set_xlabel("predicted recall (x: token model, ^: block-score moments)")
    ax.set_ylabel("observed recall")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("(c) every layer and head of every model", fontsize=10)
    ax.legend(handles=[Line2D([], [], marker="o", ls="none", color=colors[v], label=v) for v in variants],
              fontsize=8)
    ax.grid(alpha=0.3)

    ax = axes[1, 1]
    for i, (_, r) in enumerate(s.iterrows()):
        col = colors[r["variant"]]
        for off, key, marker in ((-0.12, "z_needle", "o"), (0.12, "z_eff", "s")):
            lo, hi = r[f"{key}_low"], r[f"{key}_high"]
            err = None if not (math.isfinite(lo) and math.isfinite(hi)) else [[r[key] - lo], [hi - r[key]]]
            ax.errorbar(i + off, r[key], yerr=err, fmt=marker, color=col, capsize=3,
                        mfc=col if r["routed"] else "white")
        ax.annotate(f"m={r['m']:.1f}", (i, r["z_eff"]), textcoords="offset points", xytext=(8, 6), fontsize=8)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("signal in noise standard deviations")
    ax.set_title("(d) Δμ/σ (o, needle alone) and Δμ_eff/σ (s, needle block), t intervals over seeds", fontsize=10)
    ax.grid(alpha=0.3, axis="y")

    r0 = df.iloc[0]
    fig.suptitle(f"trained-routing: N = {r0['seq_len']}, d = {r0['head_dim']}, k·B = {r0['budget']}, "
                 f"{r0['steps']} steps, {_seed_range(df)} seeds, {r0['answers']} answers per model",
                 fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return fig
