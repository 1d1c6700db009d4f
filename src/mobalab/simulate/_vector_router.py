r"""Vector-level Monte Carlo router: real planted-needle vectors through exact MoBA routing.

Each trial draws (see :func:`mobalab.simulate.planted_needle`) a unit query q, noise keys uniform on
:math:`S^{d-1}`, the needle key with cosine ``mu_signal`` and ``m - 1`` clustered keys with cosine
``mu_cluster`` at distinct random positions of the needle's block; optionally applies a key convolution;
forms block centroids (mean of the keys that exist in each block), scores :math:`s_j = q\cdot\bar k_j`
and applies the MoBA rules of :func:`mobalab.simulate.block_hit` (docs/design.md, "MoBA semantics"). A
trial is a hit iff the needle's block is selected.

* non-causal: needle uniform on {0..N-1} (or ``needle_pos``); plain top-k over n = ceil(N/B) blocks;
* causal: query t uniform on {0..N-1} and needle p uniform on {0..t} (or given, see
  :func:`mobalab.simulate.score_level_router_causal`); the own block c = t // B is forced and
  counts toward k; the top k-1 complete past blocks are added; ties go to the higher block index.

Trials whose outcome the rules fix without any score (causal: needle in the own block, or c <= k - 1 past
blocks, all of which are taken; non-causal: k >= n) are counted as hits without drawing vectors. In causal
mode only the keys of the c complete past blocks are drawn (the convolution is causal, so later keys
cannot change them), and trials are grouped by c so that a batch pads little.

Backends: numpy on CPU (``device="cpu"``, the default), or torch (``device="cuda"``, ``"cuda:1"``, a
torch CUDA device, or ``"torch-cpu"``) with a ``torch.Generator`` seeded from ``seed``. Positions are
always drawn with numpy. Same seed, backend and batch_size => bit-identical results; backends agree only
statistically.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .._validate import check_memory, choice, flag, scalar_cosine, scalar_count
from ._block_routing import block_hit, block_scores
from ._key_convolution import as_key_conv
from ._outcome_columns import outcome_columns
from ._planted_needle import PLANTED_KINDS, _plant_into, random_cluster_positions, random_unit_vectors
from ._score_router import check_causal_positions, draw_causal_positions
from ._seeding import seed_record, spawn_generators, torch_generator

__all__ = ["vector_level_router", "resolve_backend"]

# Key elements (trials x tokens x head_dim) per batch when batch_size is None: bounded memory, fixed
# numbers (not memory-dependent) so that a seed reproduces on every machine of a backend.
_BATCH_ELEMENTS = {"numpy": 1 << 22, "torch-cpu": 1 << 22, "torch-cuda": 1 << 27}
# Key-sized arrays alive at once while a batch is drawn and routed, without / with a key convolution
# (which adds its accumulator, the shifted copy and the SiLU temporaries).
_KEY_COPIES, _KEY_COPIES_CONV = 2, 6


def resolve_backend(device):
    """``(backend name, torch device or None)`` for ``device``.

    None, "cpu", "numpy" -> numpy; "torch-cpu" / "torch:cpu" / ``torch.device("cpu")`` -> torch on CPU;
    "cuda", "cuda:N", ``torch.device("cuda", N)`` -> torch on that GPU (ValueError if CUDA is missing).
    """
    if device is None or (isinstance(device, str) and device in ("cpu", "numpy")):
        return "numpy", None
    if isinstance(device, str) and device in ("torch-cpu", "torch:cpu"):
        import torch

        return "torch-cpu", torch.device("cpu")
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device must be 'cpu'/'numpy', 'torch-cpu', 'cuda', 'cuda:N' or a torch.device, got {device!r}"
        ) from None
    if dev.type == "cpu":
        return "torch-cpu", dev
    if dev.type != "cuda":
        raise ValueError(f"device must be a CPU or CUDA device, got {device!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asks for CUDA, but torch sees no CUDA device here")
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return "torch-cuda", dev


def _batches(lengths: np.ndarray, per_trial: int, budget: int, batch_size: int | None):
    """Split trials sorted by ascending ``lengths`` into consecutive batches: (start, stop) pairs.

    A batch pads every trial to its longest (last) length; it holds as many trials as keep
    ``count * max_length * per_trial`` within ``budget`` (at least one), and at most ``batch_size``.
    """
    out, start, total = [], 0, len(lengths)
    while start < total:
        # lengths ascend, so no batch from here can hold more than budget // (first length) trials.
        window = min(total - start, budget // max(int(lengths[start]) * per_trial, 1) + 1)
        if batch_size is not None:
            window = min(window, batch_size)
        cost = np.arange(1, window + 1) * lengths[start : start + window] * per_trial
        stop = start + max(1, int(np.searchsorted(cost, budget, side="right")))
        out.append((start, stop))
        start = stop
    return out


def _check_trial_memory(d, n_tok, block_size, top_k, causal, kconv, dev) -> None:
    """A batch holds at least one whole trial's keys: refuse a trial that cannot fit in memory."""
    if causal:  # only the complete past blocks of the last query's block are drawn
        longest = (n_tok - 1) // block_size * block_size if (n_tok - 1) // block_size > top_k - 1 else 0
    else:
        longest = n_tok if top_k < -(-n_tok // block_size) else 0
    copies = _KEY_COPIES if kconv is None else _KEY_COPIES_CONV
    check_memory(
        f"vector_level_router with {longest} keys of head_dim {d} per trial (float32"
        f"{', key convolution' if kconv is not None else ''})",
        longest * d * 4 * copies,
        "use a shorter seq_len, or score_level_router(_causal) at the snr and sd_ratio of "
        "mobalab.snr.generator_block_model, which samples the block scores without drawing vectors",
        device=dev,
    )


def _batch_hits(
    vec_rng, backend, dev, *, d, n_tok, block_size, top_k, mu_signal, mu_cluster, planted, p, cpos, c, kconv
) -> int:
    """Draw one batch of sequences of ``n_tok`` keys, plant, convolve, route; number of hits."""
    b = len(p)
    if backend == "numpy":
        p_a, cpos_a, c_a = p, cpos, c
    else:
        import torch

        p_a = torch.as_tensor(p, device=dev)
        cpos_a = torch.as_tensor(cpos, device=dev)
        c_a = None if c is None else torch.as_tensor(c, device=dev)
    q = random_unit_vectors(vec_rng, (b,), d)
    keys = random_unit_vectors(vec_rng, (b, n_tok), d)
    _plant_into(vec_rng, q, keys, p_a, cpos_a, mu_signal, mu_cluster, planted)
    if kconv is not None:
        keys = kconv.apply(keys)
    scores = block_scores(q, keys, block_size)
    hit = block_hit(scores, p_a // block_size, top_k, c_a)
    return int(hit.sum())


def _model_columns(d, n_tok, block_size, mu_signal, m, mu_cluster, planted, kconv, causal, needle_pos) -> dict:
    """snr and sd_ratio of the block-score model of the trials, NaN where no single model describes them.

    The router's candidates are blocks of B keys except, non-causally, a partial last block of L < B keys:
    a needle there is scored against a mean of L keys (mean difference and variance of an L-key block,
    against B-key noise blocks), and as a noise block it has variance 1/(dL) instead of 1/(dB), which no
    (snr, sd_ratio) of equal noise blocks describes. A key convolution has no model here either.
    """
    nan = {"snr": math.nan, "sd_ratio": math.nan}
    if kconv is not None:
        return nan
    from mobalab.snr import generator_block_model

    last = (n_tok - 1) // block_size
    last_len = n_tok - last * block_size
    if causal or last_len == block_size:
        model = generator_block_model(d, block_size, mu_signal, m=m, mu_cluster=mu_cluster, planted=planted)
        return {"snr": float(model.snr), "sd_ratio": float(model.sd_ratio)}
    if last > 0 and (needle_pos is None or needle_pos // block_size != last):
        return nan
    signal = generator_block_model(d, last_len, mu_signal, m=m, mu_cluster=mu_cluster, planted=planted)
    var_noise = 1.0 / (d * block_size)
    return {
        "snr": float(signal.mean_diff / math.sqrt(signal.var_signal + var_noise)),
        "sd_ratio": float(math.sqrt(signal.var_signal / var_noise)),
    }


def vector_level_router(
    head_dim: int,
    seq_len: int,
    block_size: int,
    top_k: int,
    mu_signal: float,
    *,
    m: int = 1,
    mu_cluster: float = 0.0,
    causal: bool = False,
    trials: int,
    seed,
    planted: str = "isotropic",
    key_conv=None,
    query_pos: int | None = None,
    needle_pos: int | None = None,
    device="cpu",
    batch_size: int | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    r"""Monte Carlo hit rate of MoBA routing on planted-needle vectors (see the module doc); one row.

    .. math::
        s_j = \Big\langle q, \frac{1}{|K_j|}\sum_{i \in K_j} k'_i \Big\rangle,\qquad
        \hat P = \frac{\#\{\text{trials whose needle block is selected}\}}{\text{trials}}

    with the keys k' of :func:`planted_needle` (after the key convolution, if any) and the selection of
    :func:`block_hit`.

    ``key_conv``: None, a :class:`~mobalab.simulate.KeyConv`, or a dict / object with ``weights``
    ((W,) or (W, d)) and ``form``; applied to the keys before routing. ``query_pos`` (causal only) and
    ``needle_pos`` fix the positions. ``batch_size``: most trials per batch (default: a fixed memory
    budget per backend). ``seed``: an int or a numpy Generator.

    Columns: method="vector-level", backend ("numpy", "torch-cpu", "torch-cuda"), causal, snr and
    sd_ratio (the block-score model of the trials, see below), n_blocks, top_k,
    head_dim, seq_len, block_size, mu_signal, m, mu_cluster, planted, key_conv ("none" or its label),
    query_pos, needle_pos, batch_size, hits, trials, estimate, ci_low, ci_high (95% Wilson), seed.

    ``snr`` and ``sd_ratio`` are those of ``mobalab.snr.generator_block_model(head_dim, block_size, ...)``
    (for ``snr.hit_probability`` or ``snr.causal_hit_probability``) when every candidate block holds B
    keys: causal routing (only complete past blocks compete), or seq_len a multiple of block_size.
    Non-causal with a partial last block of L = seq_len - (n - 1)·B < B keys, no such model describes the
    trials: a needle there is scored against a mean of L keys, and as a noise block it varies sqrt(B/L)
    times more than the others, so it takes slots a complete block would not. The columns then describe the
    trials only when the needle is sure to lie in that block (``needle_pos`` there, or n = 1): a needle
    block of L keys (mean_diff and var_signal of ``generator_block_model(head_dim, L, ...)``) against
    n - 1 noise blocks of B keys (var_noise 1/(dB)); otherwise they are NaN, as with a key convolution.

    Examples
    --------
    A needle and one companion of cosine 0.5 in blocks of 16 at head dim 64, top 8 of 64 blocks: the
    estimate agrees with the exact theory at the generator's SNR and sd_ratio:

    >>> from mobalab import simulate, snr
    >>> from mobalab.stats import interval_units
    >>> df = simulate.vector_level_router(64, 1024, 16, 8, mu_signal=0.5, m=2, mu_cluster=0.5, trials=300, seed=0)
    >>> row = df.iloc[0]
    >>> theory = snr.hit_probability(row["snr"], row["n_blocks"], 8, sd_ratio=row["sd_ratio"])
    >>> print(f"snr {row['snr']:.3f}, theory {theory:.3f}")
    snr 1.425, theory 0.794
    >>> print(bool(abs(interval_units(theory, row["hits"], row["trials"], confidence=0.999)) <= 1))
    True
    """
    d = scalar_count("head_dim", head_dim)
    n_tok = scalar_count("seq_len", seq_len)
    bs = scalar_count("block_size", block_size)
    top_k = scalar_count("top_k", top_k)
    mu_signal = scalar_cosine("mu_signal", mu_signal)
    mu_cluster = scalar_cosine("mu_cluster", mu_cluster)
    m = scalar_count("m", m)
    trials = scalar_count("trials", trials)
    choice("planted", planted, PLANTED_KINDS)
    progress = flag("progress", progress)
    causal = flag("causal", causal)
    if batch_size is not None:
        batch_size = scalar_count("batch_size", batch_size)
    if planted == "exact" and d < 2:
        raise ValueError("planted='exact' needs head_dim >= 2 (a direction orthogonal to q), got 1")
    if m > bs:
        raise ValueError(f"m = {m} planted keys do not fit in a block of block_size = {bs}")
    kconv = as_key_conv(key_conv)
    if kconv is not None:
        kconv.check_head_dim(d)
    if causal:
        query_pos, needle_pos = check_causal_positions(n_tok, query_pos, needle_pos)
    else:
        if query_pos is not None:
            raise ValueError("query_pos only applies to causal routing (causal=True)")
        if needle_pos is not None:
            needle_pos = scalar_count("needle_pos", needle_pos, 0)
            if needle_pos >= n_tok:
                raise ValueError(f"needle_pos must be in [0, seq_len = {n_tok}), got {needle_pos}")
        # A needle may land in the partial last block; its cluster must fit there.
        last_len = n_tok - (n_tok - 1) // bs * bs
        reachable = needle_pos is None or needle_pos // bs == (n_tok - 1) // bs
        if reachable and m > last_len:
            raise ValueError(
                f"m = {m} planted keys do not fit in the partial last block of {last_len} positions "
                f"(seq_len = {n_tok}, block_size = {bs}); fix needle_pos elsewhere or use a smaller m"
            )
    backend, dev = resolve_backend(device)
    n_blocks = -(-n_tok // bs)
    _check_trial_memory(d, n_tok, bs, top_k, causal, kconv, dev)
    model_cols = _model_columns(d, n_tok, bs, mu_signal, m, mu_cluster, planted, kconv, causal, needle_pos)

    pos_rng, vec_np_rng = spawn_generators(seed, 2)
    vec_rng = vec_np_rng if backend == "numpy" else torch_generator(vec_np_rng, dev)
    hits = 0
    with tqdm(total=trials, disable=not progress, desc=f"vector-level {backend}", unit="trial") as bar:
        if causal:
            t, p = draw_causal_positions(pos_rng, n_tok, trials, query_pos, needle_pos)
            c = t // bs
            # Needle in the own block, or every past block taken: a hit whatever the scores.
            decided = ((p // bs) == c) | (c <= top_k - 1)
            hits = int(np.count_nonzero(decided))
            bar.update(hits)
            order = np.argsort(c[~decided], kind="stable")
            p_open, c_open = p[~decided][order], c[~decided][order]
            lengths = c_open * bs
        else:
            if top_k >= n_blocks:
                hits, p_open, c_open = trials, np.zeros(0, dtype=np.int64), None
                bar.update(trials)
            else:
                p_open = (
                    pos_rng.integers(0, n_tok, size=trials, dtype=np.int64)
                    if needle_pos is None
                    else np.full(trials, needle_pos, dtype=np.int64)
                )
                c_open = None
            lengths = np.full(len(p_open), n_tok, dtype=np.int64)
        for start, stop in _batches(lengths, d, _BATCH_ELEMENTS[backend], batch_size):
            p_b = p_open[start:stop]
            cpos = random_cluster_positions(pos_rng, p_b, bs, n_tok, m - 1)
            hits += _batch_hits(
                vec_rng,
                backend,
                dev,
                d=d,
                n_tok=int(lengths[stop - 1]),
                block_size=bs,
                top_k=top_k,
                mu_signal=mu_signal,
                mu_cluster=mu_cluster,
                planted=planted,
                p=p_b,
                cpos=cpos,
                c=None if c_open is None else c_open[start:stop],
                kconv=kconv,
            )
            bar.update(stop - start)

    row = {
        "method": "vector-level",
        "backend": backend,
        "causal": causal,
        **model_cols,
        "n_blocks": n_blocks,
        "top_k": top_k,
        "head_dim": d,
        "seq_len": n_tok,
        "block_size": bs,
        "mu_signal": mu_signal,
        "m": m,
        "mu_cluster": mu_cluster,
        "planted": planted,
        "key_conv": "none" if kconv is None else kconv.label,
        "query_pos": query_pos,
        "needle_pos": needle_pos,
        "batch_size": batch_size,
        **outcome_columns(hits, trials),
        "seed": seed_record(seed),
    }
    return pd.DataFrame([row])
