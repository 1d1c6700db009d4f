r"""Score-level Monte Carlo router: samples the Gaussian block-score model exactly.

See docs/design.md, "Exact top-k hit probability".

Model (the one :func:`mobalab.snr.hit_probability` integrates): n - 1 noise blocks with scores i.i.d.
:math:`\mathcal N(0, \sigma_n^2)` and one signal block with score :math:`\mathcal N(\Delta, \sigma_s^2)`,
:math:`r = \sigma_s/\sigma_n` (``sd_ratio``), :math:`\mathrm{SNR} = \Delta/\sqrt{\sigma_s^2+\sigma_n^2}`.
Scaling by :math:`\sigma_n`: signal score :math:`S = \mathrm{SNR}\sqrt{1+r^2} + r Z`, noise scores
:math:`\mathcal N(0,1)`. The signal block is routed (top-k) iff fewer than k noise blocks score above S
(ties have probability 0).

Two samplers, both exact in distribution:

* ``method="explicit"``: draws all n - 1 noise scores per trial (in chunks that bound memory);
* ``method="binomial"``: given S, the count of noise blocks above it is
  :math:`\mathrm{Binomial}(n-1, \bar q)` with :math:`\bar q = 1 - \Phi(S)`, so one normal and one binomial
  draw per trial, whatever n.

Causal routing (:func:`score_level_router_causal`): a trial draws the query t uniform on {0..N-1} and the
needle p uniform on {0..t} (or takes them as given). The own block c = t // B is forced: a needle in it is
always found; otherwise the needle's block competes with the c - 1 other complete past blocks for k - 1
slots (hit iff fewer than k - 1 of them score above it; all of them are taken when c <= k - 1).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.special import ndtr
from tqdm.auto import tqdm

from .._validate import broadcast, check_memory, choice, count, flag, real, scalar_count
from ..snr._topk_hit import _signal_scale
from ._outcome_columns import outcome_columns
from ._seeding import seed_record, spawn_generators

__all__ = ["SCORE_METHODS", "score_level_router", "score_level_router_causal"]

SCORE_METHODS = ("binomial", "explicit")

# Trials per vectorised step of the binomial sampler, and noise scores per step of the explicit one:
# fixed numbers (not memory-dependent) so that a seed reproduces the same draws on every machine.
_BINOMIAL_CHUNK = 1 << 18
_EXPLICIT_ELEMENTS = 1 << 22
_EXPLICIT_BYTES_PER_SCORE = 24  # float64 score, comparison masks and the per-trial length mask


def _configs(**columns: np.ndarray) -> dict[str, np.ndarray]:
    """Validated configuration arguments broadcast to one flat shape: one entry per output row."""
    flat = [a.ravel() for a in broadcast(**columns)]
    if flat[0].size == 0:
        names = ", ".join(columns)
        raise ValueError(
            f"{names} broadcast to an empty shape {np.broadcast_shapes(*(c.shape for c in columns.values()))}: "
            f"there is no configuration to simulate; give at least one value for each"
        )
    return dict(zip(columns, flat, strict=True))


def _check_explicit_memory(method: str, n_noise_max: int) -> None:
    """The explicit sampler holds one trial's noise scores at once: refuse what cannot fit."""
    if method == "explicit":
        check_memory(
            f"method='explicit' with up to {n_noise_max} noise-block scores per trial (all drawn at once)",
            n_noise_max * _EXPLICIT_BYTES_PER_SCORE,
            "use method='binomial', which samples the same law exactly with O(1) memory per trial",
        )


def _signal_scores(rng, snr: float, r: float, size: int) -> np.ndarray:
    delta = snr * _signal_scale(r)
    return delta + r * rng.standard_normal(size)


def _beaten_by_binomial(rng, s: np.ndarray, n_noise) -> np.ndarray:
    """Number of noise scores above each signal score: Binomial(n_noise, 1 - Phi(s))."""
    return rng.binomial(n_noise, ndtr(-s))


def _beaten_by_explicit(rng, s: np.ndarray, n_noise) -> np.ndarray:
    """Number of noise scores above each signal score, drawing the ``n_noise`` (per trial) scores."""
    n_noise = np.broadcast_to(np.asarray(n_noise, dtype=np.int64), s.shape)
    width = int(n_noise.max(initial=0))
    if width == 0:
        return np.zeros(s.shape, dtype=np.int64)
    noise = rng.standard_normal((s.shape[0], width))
    above = noise > s[:, None]
    if np.any(n_noise < width):
        above &= np.arange(width)[None, :] < n_noise[:, None]
    return above.sum(axis=1)


def _chunk_size(method: str, width: int) -> int:
    if method == "binomial":
        return _BINOMIAL_CHUNK
    return max(1, _EXPLICIT_ELEMENTS // max(width, 1))


def _non_causal_hits(rng, snr, r, n_blocks, top_k, trials, method, bar) -> int:
    if top_k >= n_blocks:
        bar.update(trials)
        return trials
    chunk = _chunk_size(method, n_blocks - 1)
    beaten_by = _beaten_by_binomial if method == "binomial" else _beaten_by_explicit
    hits = 0
    for start in range(0, trials, chunk):
        size = min(chunk, trials - start)
        s = _signal_scores(rng, snr, r, size)
        hits += int(np.count_nonzero(beaten_by(rng, s, n_blocks - 1) < top_k))
        bar.update(size)
    return hits


def score_level_router(
    snr,
    n_blocks,
    top_k,
    *,
    trials: int,
    seed,
    sd_ratio=1.0,
    method: str = "binomial",
    progress: bool = False,
) -> pd.DataFrame:
    r"""Monte Carlo top-k hit rate of the signal block under the Gaussian block-score model (non-causal).

    .. math::
        S = \mathrm{SNR}\sqrt{1+r^2} + rZ,\quad \text{hit} \iff \#\{i < n-1 : N_i > S\} < k,\quad
        N_i, Z \sim \mathcal N(0, 1)\ \text{i.i.d.};\qquad
        \#\{\cdot\} \mid S \sim \mathrm{Binomial}(n - 1, \bar\Phi(S))\ (\text{binomial sampler})

    ``snr``, ``n_blocks``, ``top_k`` and ``sd_ratio`` broadcast together (e.g. an array of SNRs); each
    element is one configuration and one output row, sampled with its own stream spawned from ``seed``
    (an int, or a numpy Generator). ``method``: "binomial" (O(1) per trial) or "explicit" (draws all
    n - 1 noise scores). ``top_k >= n_blocks`` always hits.

    Returns a tidy DataFrame: method="score-level", backend="numpy", causal=False, snr, sd_ratio,
    n_blocks, top_k, sampler, hits, trials, estimate, ci_low, ci_high (95% Wilson), seed.

    Examples
    --------
    >>> from mobalab import simulate, snr
    >>> df = simulate.score_level_router([1.0, 2.0], n_blocks=512, top_k=8, trials=100_000, seed=0)
    >>> print(df[["snr", "n_blocks", "top_k", "trials"]].to_string(index=False))
     snr  n_blocks  top_k  trials
     1.0       512      8  100000
     2.0       512      8  100000
    >>> theory = snr.hit_probability(df["snr"].to_numpy(), 512, 8)
    >>> print(theory.round(3), bool(abs(df["estimate"] - theory).max() < 0.01))
    [0.226 0.741] True
    """
    trials = scalar_count("trials", trials)
    choice("method", method, SCORE_METHODS)
    progress = flag("progress", progress)
    cfg = _configs(
        snr=real("snr", snr),
        n_blocks=count("n_blocks", n_blocks),
        top_k=count("top_k", top_k),
        sd_ratio=real("sd_ratio", sd_ratio, low=0.0),
    )
    n_arr, k_arr = cfg["n_blocks"], cfg["top_k"]
    _check_explicit_memory(method, int(np.max(np.where(k_arr < n_arr, n_arr - 1, 0))))
    rngs = spawn_generators(seed, len(n_arr))
    rows = []
    with tqdm(total=trials * len(n_arr), disable=not progress, desc="score-level", unit="trial") as bar:
        for i, rng in enumerate(rngs):
            hits = _non_causal_hits(
                rng,
                float(cfg["snr"][i]),
                float(cfg["sd_ratio"][i]),
                int(n_arr[i]),
                int(k_arr[i]),
                trials,
                method,
                bar,
            )
            rows.append(
                {
                    "method": "score-level",
                    "backend": "numpy",
                    "causal": False,
                    "snr": float(cfg["snr"][i]),
                    "sd_ratio": float(cfg["sd_ratio"][i]),
                    "n_blocks": int(n_arr[i]),
                    "top_k": int(k_arr[i]),
                    "sampler": method,
                    **outcome_columns(hits, trials),
                    "seed": seed_record(seed),
                }
            )
    return pd.DataFrame(rows)


def draw_causal_positions(rng, seq_len: int, size: int, query_pos=None, needle_pos=None):
    """Query and needle positions for causal trials: (t, p) int64 arrays of length ``size``.

    Neither given: t uniform on {0..N-1}, then p uniform on {0..t}. Only ``query_pos``: p uniform on
    {0..t}. Only ``needle_pos``: t uniform on {p..N-1}. Both: fixed (no draws).
    """
    if query_pos is None:
        low = 0 if needle_pos is None else needle_pos
        t = rng.integers(low, seq_len, size=size, dtype=np.int64)
    else:
        t = np.full(size, query_pos, dtype=np.int64)
    if needle_pos is None:
        p = rng.integers(0, t + 1, dtype=np.int64)
    else:
        p = np.full(size, needle_pos, dtype=np.int64)
    return t, p


def check_causal_positions(seq_len: int, query_pos, needle_pos):
    """Validate optional fixed query / needle positions: 0 <= needle_pos <= query_pos < seq_len."""
    if query_pos is not None:
        query_pos = scalar_count("query_pos", query_pos, 0)
        if query_pos >= seq_len:
            raise ValueError(f"query_pos must be in [0, seq_len = {seq_len}), got {query_pos}")
    if needle_pos is not None:
        needle_pos = scalar_count("needle_pos", needle_pos, 0)
        if needle_pos >= seq_len:
            raise ValueError(f"needle_pos must be in [0, seq_len = {seq_len}), got {needle_pos}")
    if query_pos is not None and needle_pos is not None and needle_pos > query_pos:
        raise ValueError(f"causal needle_pos = {needle_pos} must not lie after query_pos = {query_pos}")
    return query_pos, needle_pos


def _causal_hits(rng, snr, r, seq_len, block_size, top_k, trials, method, query_pos, needle_pos, bar) -> int:
    width = max(seq_len // block_size - 1, 0)
    chunk = _chunk_size(method, width)
    beaten_by = _beaten_by_binomial if method == "binomial" else _beaten_by_explicit
    hits = 0
    for start in range(0, trials, chunk):
        size = min(chunk, trials - start)
        t, p = draw_causal_positions(rng, seq_len, size, query_pos, needle_pos)
        c = t // block_size
        own = (p // block_size) == c
        s = _signal_scores(rng, snr, r, size)
        # Competitors: the c - 1 other complete past blocks (a needle in the own block needs none; its
        # count is irrelevant, zero keeps the explicit sampler's matrix small).
        n_noise = np.where(own, 0, np.maximum(c - 1, 0))
        past_hit = beaten_by(rng, s, n_noise) < top_k - 1
        hits += int(np.count_nonzero(own | past_hit))
        bar.update(size)
    return hits


def score_level_router_causal(
    snr,
    seq_len,
    block_size,
    top_k,
    *,
    trials: int,
    seed,
    sd_ratio=1.0,
    method: str = "binomial",
    query_pos: int | None = None,
    needle_pos: int | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    r"""Monte Carlo hit rate of causal MoBA routing under the Gaussian block-score model.

    .. math::
        \text{hit} \iff \lfloor p/B\rfloor = c\ \ \text{or}\ \
        \#\{i < c - 1 : N_i > S\} < k - 1,\qquad c = \lfloor t/B\rfloor,\ S\ \text{as in}\
        :func:`score\_level\_router`

    Per trial: query t uniform on {0..N-1} and needle p uniform on {0..t} (fixed by ``query_pos`` /
    ``needle_pos`` when given; with only ``needle_pos``, t is uniform on {p..N-1}); own block c = t // B forced;
    a needle in block c is a hit; otherwise hit iff fewer than k - 1 of the c - 1 other complete past
    blocks score above the needle's block (binomial or explicit sampler, as in
    :func:`score_level_router`). ``snr``, ``seq_len``, ``block_size``, ``top_k``, ``sd_ratio`` broadcast
    together, one row each, each with its own stream spawned from ``seed``. Fixed ``query_pos`` /
    ``needle_pos`` apply to every row.

    Columns: as :func:`score_level_router` with causal=True, n_blocks = ceil(N/B), plus seq_len,
    block_size, query_pos, needle_pos.

    Examples
    --------
    >>> from mobalab import simulate, snr
    >>> df = simulate.score_level_router_causal(2.0, seq_len=8192, block_size=32, top_k=8, trials=100_000, seed=0)
    >>> theory = snr.causal_hit_probability(2.0, 8192, 32, 8)
    >>> print(df["n_blocks"][0], round(theory, 3), bool(abs(df["estimate"][0] - theory) < 0.01))
    256 0.892 True
    """
    trials = scalar_count("trials", trials)
    choice("method", method, SCORE_METHODS)
    progress = flag("progress", progress)
    cfg = _configs(
        snr=real("snr", snr),
        seq_len=count("seq_len", seq_len),
        block_size=count("block_size", block_size),
        top_k=count("top_k", top_k),
        sd_ratio=real("sd_ratio", sd_ratio, low=0.0),
    )
    n_tok, bs, k_arr = cfg["seq_len"], cfg["block_size"], cfg["top_k"]
    _check_explicit_memory(method, int(np.max(np.maximum(n_tok // bs - 1, 0))))
    rows_pos = [check_causal_positions(int(n), query_pos, needle_pos) for n in n_tok]
    rngs = spawn_generators(seed, len(n_tok))
    rows = []
    with tqdm(
        total=trials * len(n_tok), disable=not progress, desc="score-level causal", unit="trial"
    ) as bar:
        for i, rng in enumerate(rngs):
            qpos, npos = rows_pos[i]
            hits = _causal_hits(
                rng,
                float(cfg["snr"][i]),
                float(cfg["sd_ratio"][i]),
                int(n_tok[i]),
                int(bs[i]),
                int(k_arr[i]),
                trials,
                method,
                qpos,
                npos,
                bar,
            )
            rows.append(
                {
                    "method": "score-level",
                    "backend": "numpy",
                    "causal": True,
                    "snr": float(cfg["snr"][i]),
                    "sd_ratio": float(cfg["sd_ratio"][i]),
                    "n_blocks": int(-(-n_tok[i] // bs[i])),
                    "top_k": int(k_arr[i]),
                    "seq_len": int(n_tok[i]),
                    "block_size": int(bs[i]),
                    "query_pos": qpos,
                    "needle_pos": npos,
                    "sampler": method,
                    **outcome_columns(hits, trials),
                    "seed": seed_record(seed),
                }
            )
    return pd.DataFrame(rows)
