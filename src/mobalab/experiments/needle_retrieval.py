r"""needle-retrieval: RULER's needle tasks at the attention level, run through ``moba_attention``.

Each trial is one (batch row, head) sequence of N tokens with head dim d (batch and heads are independent
trials). Haystack keys and values are i.i.d. uniform on the unit sphere :math:`S^{d-1}`; a codebook of
``codebook`` random unit vectors holds the answers. A *needle* for a query direction :math:`\hat u` is
``needle_tokens`` = m keys :math:`k = \mu\hat u + \sqrt{1-\mu^2}\,\xi` (:func:`mobalab.simulate.planted_keys`,
cosine :math:`\mu` = ``needle_cosine``) at distinct random positions of one aligned window of
W = min(block_sizes) tokens (so the m tokens lie in one block for every block size of the sweep, the
generator of :func:`mobalab.snr.generator_block_model`), all carrying the same value code. The window is
uniform over the windows that end before the first query row (needle depth uniform in [0, 1)). Tasks (RULER's
``niah_single``, ``niah_multikey``, ``niah_multiquery``):

* ``single``: one query at t = N-1 with direction :math:`\hat q`, one needle for it;
* ``multi-key``: as single, plus ``distractors`` needles planted for other query directions
  :math:`\hat u = \rho\hat q + \sqrt{1-\rho^2}\,\xi_\perp` (cosine :math:`\rho` = ``distractor_cosine``
  to the query, like RULER's needles that share the template but not the key), each with another code;
* ``multi-query``: ``queries`` queries at t = N-Q .. N-1, each with its own independent direction, needle
  and code (each needle is a distractor for the other queries); every query is a trial, so the score is
  RULER's ``string_match_all`` averaged over sequences.

Logit scale. Attention uses ``softmax_scale = logit_scale`` = β on unit vectors, so a haystack logit is
:math:`\beta\,\hat q\cdot k` with standard deviation :math:`\beta/\sqrt d` and a needle logit is about
:math:`\beta\mu`. With the default β = 32, d = 128, μ = 0.5 the haystack logits spread like a trained head's
(sd 2.8) and each needle token sits ≈ 5.7 sd above them: m·e^{βμ} outweighs the N·e^{β²/2d} of the whole
haystack up to N ≈ 10⁶, so dense attention retrieves the needle and MoBA retrieves it when (and only
when) routing selects its block. The default 1/√d would leave every logit below 0.1 and nothing could
concentrate.

Metrics per (task, N, B, k), each a fraction with a 95% Wilson interval:

* ``routing recall``: the needle's block is among the query row's selected blocks (``moba_topk``, causal,
  on the same inputs);
* ``retrieval accuracy``: the MoBA output at the query row decodes (nearest code by cosine) to the needle's
  code; ``dense retrieval accuracy`` is the same for dense causal attention (the ceiling);
* ``mass kept``: the dense softmax mass MoBA keeps, :math:`e^{\mathrm{lse}_{\rm MoBA} - \mathrm{lse}_{\rm dense}}`
  (≤ 1; lse_dense is the log-sum-exp of β q·k over keys ≤ t for the query rows only). Its interval is the
  Wilson interval of the mean of a [0, 1] variable, conservative since Var X ≤ E X (1 - E X).

The analytic prediction (recall and accuracy panels) is causal routing theory at the generator's exact
SNR: :func:`mobalab.snr.generator_block_model` (m planted tokens of cosine μ in a B-token block) and
:func:`mobalab.snr.causal_hit_probability` at query_pos = t and needle_pos = p, averaged over the trials'
(t, p). It models a single needle: in ``multi-key`` the distractor blocks score higher than noise, so
recall there may fall below it. Retrieval accuracy is at most recall plus chance (1/``codebook``).

Backends: CUDA tensors run the CUDA kernels (fp16 by default), CPU tensors the torch reference (fp32);
every row names its ``backend`` ("cuda-kernel" or "torch-reference") and ``device``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from mobalab import snr
from mobalab.stats import interval_units, wilson_interval

from ._checks import check_seed
from ._columns import check_table
from ._devices import kernel_backend

__all__ = ["Config", "run", "plot", "summary", "plan", "TASKS", "METRICS", "needle_batch"]

NAME = "needle-retrieval"

#: columns of the tidy table that plot and summary read (check_table names the missing ones)
_PLOT_COLUMNS = ("backend", "block_size", "ci_high", "ci_low", "device", "estimate", "head_dim", "logit_scale",
                 "metric", "needle_cosine", "needle_tokens", "prediction", "seqlen", "snr", "task", "top_k")
_SUMMARY_COLUMNS = ("backend", "block_size", "estimate", "interval_units", "metric", "prediction", "seqlen", "task",
                    "top_k", "trials")
TASKS = ("single", "multi-key", "multi-query")
METRICS = ("routing recall", "retrieval accuracy", "dense retrieval accuracy", "mass kept")


@dataclass(frozen=True)
class Config:
    """The sweep. Full default: the GPU run (about 3 minutes on an H200); ``quick()``: CPU reference.

    Trials per (task, N): ``min(trials, max(min_trials, trial_tokens // N))`` sequences, generated in
    calls of ``max(1, call_tokens // N)`` sequences laid out as (batch, N, heads, d), heads =
    min(``heads``, sequences). In ``multi-query`` every sequence holds ``queries`` trials.
    """

    tasks: tuple[str, ...] = TASKS
    seqlens: tuple[int, ...] = (4096, 16384, 65536, 262144, 1048576)
    block_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    top_ks: tuple[int, ...] = (2, 4, 8, 16)
    head_dim: int = 128
    heads: int = 16
    trials: int = 128
    min_trials: int = 16
    trial_tokens: int = 1 << 24
    call_tokens: int = 1 << 21
    needle_tokens: int = 8
    needle_cosine: float = 0.5
    planted: str = "isotropic"
    distractors: int = 3
    distractor_cosine: float = 0.5
    queries: int = 4
    codebook: int = 64
    logit_scale: float = 32.0
    device: str = "auto"  # "auto" (CUDA kernels when a GPU is usable), "cpu", "cuda", "cuda:N"
    dtype: str = "auto"  # "auto" (float16 on CUDA, float32 on CPU), "float16", "bfloat16", "float32"
    seed: int = 0

    @classmethod
    def quick(cls, **overrides) -> Config:
        """Reference backend at small N: a few seconds per task on a 2-core CPU."""
        base = dict(seqlens=(256, 1024), block_sizes=(16, 64), top_ks=(2, 8), head_dim=64, heads=8, trials=16,
                    min_trials=16, needle_tokens=4, device="cpu")
        base.update(overrides)
        return cls(**base)


# ---------------------------------------------------------------------------------------------------
# validation and set-up


def _check(config: Config) -> None:
    c = config
    check_seed(c.seed)
    bad = [t for t in c.tasks if t not in TASKS]
    if not c.tasks or bad:
        raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {c.tasks!r}")
    for name in ("seqlens", "block_sizes", "top_ks"):
        vals = getattr(c, name)
        if not vals or any(isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1 for v in vals):
            raise ValueError(f"{name} must be a non-empty tuple of integers >= 1, got {vals!r}")
    for name in ("head_dim", "heads", "trials", "min_trials", "trial_tokens", "call_tokens", "needle_tokens",
                 "queries", "codebook"):
        v = getattr(c, name)
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    window = min(c.block_sizes)
    if any(b % window for b in c.block_sizes):
        raise ValueError(f"every block size must be a multiple of the smallest ({window}) so that a needle "
                         f"window lies in one block for all of them, got {c.block_sizes}")
    if c.needle_tokens > window:
        raise ValueError(f"needle_tokens = {c.needle_tokens} do not fit in the smallest block ({window})")
    if not 0.0 < c.needle_cosine <= 1.0 or not -1.0 <= c.distractor_cosine <= 1.0:
        raise ValueError(f"needle_cosine must be in (0, 1] and distractor_cosine in [-1, 1], got "
                         f"{c.needle_cosine}, {c.distractor_cosine}")
    if c.planted not in ("isotropic", "exact"):
        raise ValueError(f"planted must be 'isotropic' or 'exact', got {c.planted!r}")
    if not (math.isfinite(c.logit_scale) and c.logit_scale > 0):
        raise ValueError(f"logit_scale must be a positive finite number, got {c.logit_scale!r}")
    if c.dtype not in ("auto", "float16", "bfloat16", "float32"):
        raise ValueError(f"dtype must be 'auto', 'float16', 'bfloat16' or 'float32', got {c.dtype!r}")
    for n in c.seqlens:
        if max(c.block_sizes) > n:
            raise ValueError(f"block size {max(c.block_sizes)} exceeds seqlen {n}")
        for task in c.tasks:
            if (n - _n_queries(task, c)) // window < _needles(task, c):
                raise ValueError(f"seqlen {n} has too few {window}-token windows for the {_needles(task, c)} "
                                 f"needles of task {task!r}")


def plan(config: Config = Config()) -> str:
    """What :func:`run` will do, said before it starts (the CLI prints it): backend, device, trials.

    Examples
    --------
    >>> from mobalab.experiments import needle_retrieval
    >>> print(needle_retrieval.plan(needle_retrieval.Config.quick()))  # doctest: +ELLIPSIS
    torch-reference on cpu (...), float32: 3 tasks x N in (256, 1024) x 4 (B, k) pairs, 16 sequences each
    """
    _check(config)
    _, _, backend, device_name, dtype_name = _resolve(config)
    grid = len(config.block_sizes) * len(config.top_ks)
    trials = sorted({_trial_sequences(n, config)[0] * _trial_sequences(n, config)[3] for n in config.seqlens})
    each = f"{trials[0]}" if len(trials) == 1 else f"{trials[0]}-{trials[-1]}"
    return (f"{backend} on {device_name}, {dtype_name}: {len(config.tasks)} tasks x N in {tuple(config.seqlens)} "
            f"x {grid} (B, k) pairs, {each} sequences each")


def _n_queries(task: str, config: Config) -> int:
    return config.queries if task == "multi-query" else 1


def _needles(task: str, config: Config) -> int:
    return {"single": 1, "multi-key": 1 + config.distractors, "multi-query": config.queries}[task]


def _resolve(config: Config):
    import torch

    device, backend, name, default_dtype = kernel_backend(config.device, setting="device")
    dtype_name = config.dtype if config.dtype != "auto" else str(default_dtype).removeprefix("torch.")
    return device, getattr(torch, dtype_name), backend, name, dtype_name


def _trial_sequences(n: int, config: Config) -> tuple[int, int, int, int]:
    """(calls, batch, heads, sequences per call) for seqlen n."""
    want = min(config.trials, max(config.min_trials, config.trial_tokens // n))
    per_call = max(1, min(want, config.call_tokens // n))
    heads = min(config.heads, per_call)
    batch = per_call // heads
    per_call = batch * heads
    return math.ceil(want / per_call), batch, heads, per_call


# ---------------------------------------------------------------------------------------------------
# inputs


def needle_batch(task: str, config: Config, batch: int, heads: int, seqlen: int, rng: np.random.Generator,
                 gen, dtype):
    """Inputs of one call, a dict: q, k, v (batch, seqlen, heads, d) in ``dtype`` on ``gen``'s device;
    ``query_pos`` (Q,) int64; ``needle_pos`` (batch, heads, J, m) int64 positions of each needle's tokens;
    ``codes`` (batch, heads, J) codebook index of each needle; ``codebook`` (C, d) fp32; ``own`` (Q,) the
    needle index each query seeks. J counts needles (distractors included), Q query rows. Positions are
    drawn with the numpy ``rng``, vectors with the torch Generator ``gen`` (see the module docstring).
    """
    import torch

    from mobalab.simulate import planted_keys, random_unit_vectors

    c = config
    d, m, window = c.head_dim, c.needle_tokens, min(c.block_sizes)
    n_q, n_needles = _n_queries(task, c), _needles(task, c)
    if c.codebook < n_needles:
        raise ValueError(f"codebook of {c.codebook} codes cannot give {n_needles} needles distinct codes")
    query_pos = np.arange(seqlen - n_q, seqlen, dtype=np.int64)
    n_windows = (seqlen - n_q) // window  # windows that end before the first query row
    win = np.argsort(rng.random((batch, heads, n_windows)), axis=-1)[..., :n_needles]
    offsets = np.argsort(rng.random((batch, heads, n_needles, window)), axis=-1)[..., :m]
    needle_pos = win[..., None] * window + offsets
    codes = np.argsort(rng.random((batch, heads, c.codebook)), axis=-1)[..., :n_needles]

    device = gen.device
    f32 = torch.float32
    q = random_unit_vectors(gen, (batch, seqlen, heads), d, f32)
    k = random_unit_vectors(gen, (batch, seqlen, heads), d, f32)
    v = random_unit_vectors(gen, (batch, seqlen, heads), d, f32)
    codebook = random_unit_vectors(gen, (c.codebook,), d, f32)
    q_dirs = random_unit_vectors(gen, (batch, heads, n_q), d, f32)
    if task == "multi-key":
        others = planted_keys(gen, q_dirs.expand(batch, heads, c.distractors, d).contiguous(),
                              c.distractor_cosine, "exact")
        dirs = torch.cat([q_dirs, others], dim=2)
    else:
        dirs = q_dirs
    planted = planted_keys(gen, dirs[..., None, :].expand(batch, heads, n_needles, m, d).contiguous(),
                           c.needle_cosine, c.planted)
    bi = torch.arange(batch, device=device).view(batch, 1, 1, 1)
    hi = torch.arange(heads, device=device).view(1, heads, 1, 1)
    pos_t = torch.as_tensor(needle_pos, device=device)
    codes_t = torch.as_tensor(codes, device=device)
    k[bi, pos_t, hi] = planted
    v[bi, pos_t, hi] = codebook[codes_t][..., None, :].expand(batch, heads, n_needles, m, d)
    qp = torch.as_tensor(query_pos, device=device).view(1, 1, n_q)
    q[bi[..., 0], qp, hi[..., 0]] = q_dirs
    own = np.arange(n_q) if task == "multi-query" else np.zeros(n_q, dtype=np.int64)
    return dict(q=q.to(dtype), k=k.to(dtype), v=v.to(dtype), query_pos=query_pos, needle_pos=needle_pos,
                codes=codes, codebook=codebook, own=own)


def _decode(out, codebook):
    """Nearest code by cosine: out (..., d) -> (...) code indices (numpy)."""
    return (out.float() @ codebook.T).argmax(dim=-1).cpu().numpy()


# ---------------------------------------------------------------------------------------------------
# run


def run(config: Config = Config(), progress: bool = False) -> pd.DataFrame:
    """Every (task, N, B, k): recall, retrieval accuracy (MoBA and dense), mass kept; one row per metric."""
    import torch

    from mobalab.kernels import moba_attention, moba_topk
    from mobalab.kernels.reference import dense_attention

    _check(config)
    c = config
    device, dtype, backend, device_name, dtype_name = _resolve(c)
    grid = [(b, k) for b in c.block_sizes for k in c.top_ks]
    jobs = [(task, n) for task in c.tasks for n in c.seqlens]
    seeds = np.random.SeedSequence(c.seed).spawn(len(jobs))
    total_calls = sum(_trial_sequences(n, c)[0] for _, n in jobs)
    bar = tqdm(total=total_calls, desc=NAME, disable=not progress)
    rows = []
    for (task, n), seq in zip(jobs, seeds, strict=True):
        calls, batch, heads, _ = _trial_sequences(n, c)
        acc = {key: dict(recall=0, correct=0, mass=0.0, trials=0, pred=0.0, seconds=0.0) for key in grid}
        dense_correct = trials = 0
        for call_seq in seq.spawn(calls):
            rng = np.random.default_rng(call_seq)
            gen = torch.Generator(device=device).manual_seed(int(rng.integers(2**62)))
            with torch.no_grad():
                x = needle_batch(task, c, batch, heads, n, rng, gen, dtype)
                qpos, own = x["query_pos"], x["own"]
                want = x["codes"][:, :, own]  # (b, h, Q) code each query row should decode to
                first = x["needle_pos"][:, :, own, 0]  # (b, h, Q) a position of each query's needle
                d_out, d_lse = dense_attention(x["q"], x["k"], x["v"], causal=True, softmax_scale=c.logit_scale,
                                               query_positions=qpos)
                d_out, d_lse = d_out.permute(0, 2, 1, 3), d_lse.permute(0, 2, 1)  # (b, h, Q, ...) like `want`
                dense_correct += int((_decode(d_out, x["codebook"]) == want).sum())
                trials += want.size
                t_pos = np.broadcast_to(qpos, want.shape)
                for bsz, top_k in grid:
                    a = acc[(bsz, top_k)]
                    t0 = time.perf_counter()
                    sel = moba_topk(x["q"], x["k"], bsz, top_k, causal=True)
                    out, lse = moba_attention(x["q"], x["k"], x["v"], bsz, top_k, causal=True,
                                              softmax_scale=c.logit_scale, return_lse=True)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    a["seconds"] += time.perf_counter() - t0
                    picked = sel[:, torch.as_tensor(qpos, device=device)].permute(0, 2, 1, 3).cpu().numpy()
                    a["recall"] += int((picked == (first // bsz)[..., None]).any(-1).sum())
                    rows_out = out[:, torch.as_tensor(qpos, device=device)].permute(0, 2, 1, 3)
                    a["correct"] += int((_decode(rows_out, x["codebook"]) == want).sum())
                    kept = torch.exp(lse[:, torch.as_tensor(qpos, device=device)].permute(0, 2, 1).float() - d_lse)
                    a["mass"] += float(kept.clamp(max=1.0).sum())
                    a["trials"] += want.size
                    model = snr.generator_block_model(c.head_dim, bsz, c.needle_cosine, m=c.needle_tokens,
                                                      mu_cluster=c.needle_cosine, planted=c.planted)
                    a["pred"] += float(np.sum(snr.causal_hit_probability(
                        model.snr, n, bsz, top_k, query_pos=t_pos, needle_pos=first, sd_ratio=model.sd_ratio)))
                del x
            bar.update(1)
        for (bsz, top_k), a in acc.items():
            model = snr.generator_block_model(c.head_dim, bsz, c.needle_cosine, m=c.needle_tokens,
                                              mu_cluster=c.needle_cosine, planted=c.planted)
            common = dict(task=task, backend=backend, device=device_name, dtype=dtype_name, seqlen=n,
                          block_size=bsz, top_k=top_k, n_blocks=math.ceil(n / bsz),
                          dense_equivalent=n <= top_k * bsz, head_dim=c.head_dim, needle_tokens=c.needle_tokens,
                          needle_cosine=c.needle_cosine, logit_scale=c.logit_scale, snr=float(model.snr),
                          sd_ratio=float(model.sd_ratio), batch=batch, heads=heads, seconds=a["seconds"])
            pred = a["pred"] / a["trials"]
            for metric, hits, prediction in (("routing recall", a["recall"], pred),
                                             ("retrieval accuracy", a["correct"], pred),
                                             ("dense retrieval accuracy", dense_correct, np.nan),
                                             ("mass kept", a["mass"], np.nan)):
                lo, hi = wilson_interval(hits, a["trials"])
                rows.append(dict(common, metric=metric, hits=hits, trials=a["trials"], estimate=hits / a["trials"],
                                 ci_low=float(lo), ci_high=float(hi), prediction=prediction))
    bar.close()
    df = pd.DataFrame(rows)
    rec = df["metric"] == "routing recall"
    df["interval_units"] = np.nan
    df.loc[rec, "interval_units"] = interval_units(df.loc[rec, "prediction"], df.loc[rec, "hits"],
                                                   df.loc[rec, "trials"])
    df.insert(0, "experiment", NAME)
    df.insert(1, "run_seed", c.seed)
    return df


# ---------------------------------------------------------------------------------------------------
# reading


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """One line per (task, N, B, k): recall vs prediction (in interval units), accuracy, dense, mass kept."""
    check_table(df, NAME, "summary", _SUMMARY_COLUMNS)
    keys = ["task", "seqlen", "block_size", "top_k"]
    wide = df.pivot_table(index=keys, columns="metric", values="estimate", sort=False).reset_index()
    rec = df[df["metric"] == "routing recall"].set_index(keys)
    wide = wide.set_index(keys)
    wide["trials"] = rec["trials"]
    wide["predicted"] = rec["prediction"]
    wide["units"] = rec["interval_units"]
    wide["backend"] = rec["backend"]
    cols = ["trials", "routing recall", "predicted", "units", "retrieval accuracy", "dense retrieval accuracy",
            "mass kept", "backend"]
    return wide[cols].rename(columns={"routing recall": "recall", "retrieval accuracy": "accuracy",
                                      "dense retrieval accuracy": "dense_acc", "mass kept": "mass"}).reset_index()


def _tokens(x, _pos=None) -> str:
    """Axis label for a token count: 512, 4K, 1M."""
    for unit, div in (("M", 1 << 20), ("K", 1 << 10)):
        if x >= div:
            return f"{x / div:g}{unit}"
    return f"{x:g}"


_LABELS = {"routing recall": "routing recall\n(needle block selected)",
           "retrieval accuracy": "retrieval accuracy\n(decodes to needle)",
           "dense retrieval accuracy": "dense attention's\nretrieval accuracy",
           "mass kept": "dense softmax\nmass kept"}


def plot(df: pd.DataFrame, tasks=None, metrics=("routing recall", "retrieval accuracy", "mass kept")):
    """Rows: task × metric; columns: block size B; x: context N (log), one colour per top-k.

    Measured points carry 95% Wilson intervals; the dashed line of each colour is the analytic causal
    routing prediction at the generator's exact SNR; the grey dotted line is dense attention's accuracy.
    ``tasks`` (default: every task of ``df``) and ``metrics`` (drawn from :data:`METRICS`) choose the rows;
    a task that ``df`` does not hold or an unknown metric is a ValueError.
    """
    check_table(df, NAME, "plot", _PLOT_COLUMNS)
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, NullLocator

    present = list(dict.fromkeys(df["task"]))
    if tasks is None:
        tasks = [t for t in TASKS if t in present]
    else:
        tasks = [tasks] if isinstance(tasks, str) else list(tasks)
        # a task asked for by name and absent would otherwise vanish from the figure without a word
        missing = [t for t in tasks if t not in present]
        if not tasks or missing:
            raise ValueError(f"tasks must name tasks of this result, {present}, got {tasks!r}")
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if not metrics or unknown:
        raise ValueError(f"metrics must be drawn from {METRICS}, got {tuple(metrics)!r}")
    blocks = sorted(df["block_size"].unique())
    ks = sorted(df["top_k"].unique())
    seqlens = sorted(df["seqlen"].unique())
    colors = dict(zip(ks, plt.cm.viridis(np.linspace(0.0, 0.85, len(ks))), strict=True))
    pairs = [(t, m) for t in tasks for m in metrics]
    fig, axes = plt.subplots(len(pairs), len(blocks), figsize=(max(3.1 * len(blocks) + 1.0, 9.5), 2.35 * len(pairs)),
                             squeeze=False, sharex=True, sharey=True, layout="constrained")
    for r, (task, metric) in enumerate(pairs):
        for col, bsz in enumerate(blocks):
            ax = axes[r, col]
            d = df[(df["task"] == task) & (df["block_size"] == bsz)]
            for k in ks:
                pts = d[(d["top_k"] == k) & (d["metric"] == metric)].sort_values("seqlen")
                if pts.empty:
                    continue
                err = np.vstack([pts["estimate"] - pts["ci_low"], pts["ci_high"] - pts["estimate"]])
                ax.errorbar(pts["seqlen"], pts["estimate"], yerr=err, color=colors[k], marker="o", ms=3.5,
                            lw=1.2, capsize=2)
                if metric != "mass kept":
                    ax.plot(pts["seqlen"], pts["prediction"], color=colors[k], ls="--", lw=1.0, alpha=0.9)
            if metric == "retrieval accuracy":
                dense = d[d["metric"] == "dense retrieval accuracy"].groupby("seqlen")["estimate"].first()
                ax.plot(dense.index, dense.values, color="0.45", ls=":", lw=1.6)
            ax.set_xscale("log", base=2)
            ax.set_xticks(seqlens)
            ax.xaxis.set_major_formatter(FuncFormatter(_tokens))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_ylim(-0.04, 1.04)
            ax.grid(alpha=0.3)
            if r == 0:
                snr_b = d["snr"].iloc[0] if not d.empty else float("nan")
                ax.set_title(f"B = {bsz}  (SNR {snr_b:.2f})", fontsize=10)
            if col == 0:
                ax.set_ylabel(f"{task}\n{_LABELS[metric]}", fontsize=9)
            if r == len(pairs) - 1:
                ax.set_xlabel("context N (tokens)")
    handles = [Line2D([], [], color=colors[k], marker="o", lw=1.2, label=f"top-k = {k}") for k in ks]
    handles += [Line2D([], [], color="0.2", ls="--", label="analytic causal routing prediction"),
                Line2D([], [], color="0.45", ls=":", lw=1.6, label="dense attention accuracy"),
                Line2D([], [], color="0.2", marker="|", ls="none", ms=8, label="95% Wilson interval")]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 3), frameon=False)
    first = df.iloc[0]
    fig.suptitle(f"Needle retrieval through moba_attention: {first['backend']} on {first['device']}\n"
                 f"d = {first['head_dim']}, needle = {first['needle_tokens']} tokens of cosine "
                 f"{first['needle_cosine']}, logit scale {first['logit_scale']:g}, causal, queries at the end",
                 fontsize=10)
    return fig
