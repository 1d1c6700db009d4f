r"""The routing model's inputs, measured on a model's actual queries and keys, and what they predict.

For every query j (position :math:`t_j`, needle at :math:`p_j`) and head, with the scores
:math:`s_i = q_{t_j}\cdot k_i` the router uses (post-convolution, post-RoPE, no :math:`1/\sqrt d`), block
size B, own block :math:`c = \lfloor t_j/B\rfloor` and needle block :math:`c^* = \lfloor p_j/B\rfloor`:

* *noise tokens*: the keys of complete past blocks other than the needle's (:math:`\lfloor i/B\rfloor < c`,
  :math:`\ne c^*`), the only blocks the needle's block competes with (see docs/design.md, "Causal routing");
  per query their mean :math:`\bar\mu_n(j)` and variance :math:`\sigma^2(j)`;
* :math:`\mu_{\rm signal} = \mathbb E\,s_{p_j}`, :math:`\mu_{\rm noise} = \mathbb E\,\bar\mu_n(j)`,
  :math:`\Delta\mu = \mathbb E[s_{p_j} - \bar\mu_n(j)]`, :math:`\sigma^2 = \mathbb E\,\sigma^2(j)` (centring per
  query: every comparison the router makes is within one query);
* :math:`\Delta\mu_{\rm eff} = \mathbb E\sum_{i \in c^*}(s_i - \bar\mu_n(j))
  = B\,\mathbb E[\bar s_{c^*} - \bar\mu_n(j)]`, the needle block's total excess, which is what its
  centroid score carries;
* m and :math:`\mu_{\rm cluster}`: the excess profile :math:`\bar e(\delta) = \mathbb E[s_{p_j+\delta} -
  \bar\mu_n(j)]` over offsets δ inside the needle's block (entries within 3 standard errors of 0 set to
  0), weighted by the chance :math:`(B-|\delta|)/B` that offset δ is in the block;
  m = :math:`(\sum a^+)^2/\sum (a^+)^2` of those weights times :math:`\bar e` (participation ratio,
  :func:`mobalab.snr.cluster_stats`), and :math:`\mu_{\rm cluster} - \mu_{\rm noise} =
  (\Delta\mu_{\rm eff} - \Delta\mu)/(m - 1)`, so that the paper's identity
  :math:`\Delta\mu_{\rm eff} = \Delta\mu + (m-1)(\mu_{\rm cluster} - \mu_{\rm noise})` holds exactly.

Three predictions of the routing recall, each the causal hit probability
(:func:`mobalab.snr.causal_hit_probability`, own block forced, k - 1 slots among the
:math:`\lfloor t_j/B\rfloor` complete past blocks) at each query's own (t_j, p_j), averaged over queries:

* ``paper``: the token model, :math:`\mathrm{SNR} = \Delta\mu_{\rm eff}/(\sigma\sqrt{2B})` with the measured
  σ (independent tokens: a block score has variance σ²/B);
* ``cosine``: the paper's formula taken literally, :math:`\Delta\mu_{\rm eff}\sqrt{d/2B}` with the
  statistics measured on cosines :math:`\cos(q, k_i)` (σ = 1/√d assumed);
* ``block``: the Gaussian block-score model with the measured block moments: per query
  :math:`D_j = \bar s_{c^*} - \mathrm{mean}_{\rm noise\ blocks}\,\bar s`, noise-block variance
  :math:`v_n = \mathbb E\,\mathrm{Var}_{\rm noise\ blocks}\bar s`, SNR = :math:`\mathbb E D/\sqrt{\mathrm{Var} D + v_n}`
  and ``sd_ratio`` :math:`\sqrt{\mathrm{Var} D / v_n}`. ``block_var_ratio`` = :math:`v_n / (\sigma^2/B)` is 1
  when keys are independent, and shows how far they are not.

RoPE factor (models with RoPE, needles that are runs of r tokens at :math:`p_j .. p_j + r - 1`): how much of
the run's coherent signal survives the rotations, measured and predicted. With :math:`\tilde k_i` the post-RoPE
keys and a the run token the query scores highest (the anchor, :math:`p_j + a`),

.. math::
    \mathrm{rope\_factor} = \frac{\sum_j \sum_{i<r} (s_{p_j+i} - \bar\mu_n(j))}
                                {\sum_j \sum_{i<r} (q\cdot R_{a-i}\tilde k_{p_j+i} - \bar\mu_n(j))},

the run's excess as the router sees it over the excess it would have if every run key sat at the anchor's
position (:math:`R_{a-i}\tilde k_{p+i} = R_{p+a} k_{p+i}`: the pre-RoPE key rotated to the anchor). The RoPE
model's prediction for a query with its energy spread evenly over the d/2 frequency pairs
(:mod:`mobalab.snr`, RoPE: :math:`g(o) = \frac2d\sum_i\cos(o\theta_i)`) is
``rope_factor_theory`` = :math:`\mathrm{mean}_j \frac1r\sum_{i<r} g(i - a_j)`; a trained query that puts its
energy in the slow pairs keeps more of the run (factor above the prediction). NaN without RoPE or for r = 1,
and ``rope_factor`` also where the coherent sum (the denominator) is not positive: a run the query does not
single out has no signal for RoPE to spread.

Observed: ``recall``, the fraction of queries whose needle block the router selects
(:func:`mobalab.kernels.moba_topk` on the same q and k), with its 95% Wilson interval; ``*_units`` place each
prediction in units of that interval (:func:`mobalab.stats.interval_units`). ``needle_mass`` is the mean
softmax weight dense causal attention (scale 1/√d) would give the needle token. Queries whose needle lies in
their own block are always hit and enter recall and predictions (as 1), not the statistics.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import pandas as pd
import torch

from ._transformer import rotate

__all__ = ["routing_statistics", "STAT_COLUMNS"]

#: the per-head columns :func:`routing_statistics` returns, in order
STAT_COLUMNS = (
    "head", "block_size", "top_k", "seq_len", "head_dim", "queries", "valid_queries", "mu_signal", "mu_noise",
    "delta_mu", "sigma", "m", "mu_cluster", "delta_mu_eff", "z_needle", "z_eff", "snr_paper", "pred_paper",
    "cos_delta_mu_eff", "cos_sigma_sqrt_d", "snr_cosine", "pred_cosine", "block_snr", "block_sd_ratio",
    "block_var_ratio", "pred_block", "recall_hits", "recall_trials", "recall", "recall_low", "recall_high",
    "paper_units", "cosine_units", "block_units", "needle_mass", "rope_factor", "rope_factor_theory",
)


def _check_inputs(q, k, query_pos, needle_pos, block_size, top_k, softmax_scale=None, span=1, rope_base=None):
    fn = "routing_statistics"
    for name, x in (("q", q), ("k", k)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{fn}: {name} must be a 4-D tensor (batch, seqlen, heads, head_dim), got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2]:
        raise ValueError(f"{fn}: q {tuple(q.shape)} and k {tuple(k.shape)} must share batch, seqlen and head_dim, "
                         "with q heads a multiple of k heads")
    for name, x in (("query_pos", query_pos), ("needle_pos", needle_pos)):
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] != q.shape[0] or (
                x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool):
            raise ValueError(f"{fn}: {name} must be an integer tensor (batch, queries) with batch {q.shape[0]}, got "
                             + (f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor)
                                else type(x).__name__))
    if query_pos.shape != needle_pos.shape:
        raise ValueError(f"{fn}: query_pos {tuple(query_pos.shape)} and needle_pos {tuple(needle_pos.shape)} "
                         "must have one shape")
    if query_pos.shape[1] == 0:
        raise ValueError(f"{fn}: query_pos and needle_pos must hold at least one query, got shape "
                         f"{tuple(query_pos.shape)}")
    n = q.shape[1]
    if bool((needle_pos > query_pos).any()) or bool((needle_pos < 0).any()) or bool((query_pos >= n).any()):
        raise ValueError(f"{fn}: positions must satisfy 0 <= needle_pos <= query_pos < seqlen = {n} (causal)")
    for name, v in (("block_size", block_size), ("top_k", top_k), ("span", span)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{fn}: {name} must be an integer >= 1, got {v!r}")
    # a run past the end would be read as copies of the last key (the positions are clamped to the sequence)
    if bool((needle_pos + (int(span) - 1) >= n).any()):
        raise ValueError(f"{fn}: a needle run of span {span} from needle_pos {int(needle_pos.max())} passes the end "
                         f"of the sequence (seqlen = {n})")
    for name, v, low in (("softmax_scale", softmax_scale, 0.0), ("rope_base", rope_base, 1.0)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v)
                              or v <= low):
            raise ValueError(f"{fn}: {name} must be None or a finite number > {low:g}, got {v!r}")


def _block_sums(s, block_size):
    """Sums of the last axis over consecutive blocks of ``block_size`` (the last one partial):
    (..., N) -> (..., ceil(N / B))."""
    n = s.shape[-1]
    # A block longer than the axis holds all of it and is summed as a block of N, so that the zero padding never
    # outgrows the scores.
    width = min(block_size, n)
    n_blocks = math.ceil(n / width)
    return torch.nn.functional.pad(s, (0, n_blocks * width - n)).view(*s.shape[:-1], n_blocks, width).sum(-1)


def _score_stats(s, t_blk, c_star, p, block_size):
    """Per-query statistics of one score tensor s (b, Q, H, N) (module docstring)."""
    b, nq, h, n = s.shape
    dev = s.device
    key_blk = torch.arange(n, device=dev) // block_size
    noise = (key_blk.view(1, 1, n) < t_blk[..., None]) & (key_blk.view(1, 1, n) != c_star[..., None])
    cnt = noise.sum(-1).clamp(min=2).unsqueeze(-1).to(s.dtype)  # (b, Q, 1)
    mask = noise.unsqueeze(2).to(s.dtype)  # (b, Q, 1, N)
    mu_n = (s * mask).sum(-1) / cnt
    var_n = (((s - mu_n[..., None]) ** 2) * mask).sum(-1) / (cnt - 1)
    s_p = s.gather(-1, p.view(b, nq, 1, 1).expand(b, nq, h, 1)).squeeze(-1)
    blocks = _block_sums(s, block_size)
    blk_sum_star = blocks.gather(-1, c_star.view(b, nq, 1, 1).expand(b, nq, h, 1)).squeeze(-1)
    # offsets δ that can lie in the needle's block: |δ| <= R = min(B, N) - 1 (beyond N - 1 none is in the sequence)
    reach = min(block_size, n) - 1
    offsets = torch.arange(-reach, reach + 1, device=dev)
    pos = p[..., None] + offsets  # (b, Q, 2R+1)
    inside = (pos >= 0) & (pos < n) & (torch.div(pos, block_size, rounding_mode="floor") == c_star[..., None])
    prof = s.gather(-1, pos.clamp(0, n - 1).unsqueeze(2).expand(b, nq, h, offsets.numel())) - mu_n[..., None]
    prof = torch.where(inside.unsqueeze(2), prof, torch.full_like(prof, float("nan")))
    return {"mu_n": mu_n, "var_n": var_n, "s_p": s_p, "excess_sum": blk_sum_star - block_size * mu_n,
            "profile": prof}


@torch.no_grad()
def _span_coherence(qv, kf, needle_pos, mu_n, span: int, base: float):
    """Per query and head: the run's excess as seen, and with every run key rotated to the anchor's position;
    the RoPE model's factor for the anchor (module docstring, RoPE factor)."""
    b, nq, h, d = qv.shape
    i = torch.arange(span, device=qv.device)
    pos = (needle_pos[..., None] + i).clamp(max=kf.shape[1] - 1)  # (b, Q, r)
    run = kf[torch.arange(b, device=qv.device)[:, None, None], pos]  # (b, Q, r, H, d)
    s_run = torch.einsum("bqhd,bqrhd->bqhr", qv, run)
    anchor = s_run.argmax(-1)  # (b, Q, H)
    off = (anchor[..., None] - i).permute(0, 1, 3, 2)  # (b, Q, r, H): rotate run key i by a - i
    s_coh = torch.einsum("bqhd,bqrhd->bqhr", qv, rotate(run, off, base))
    seen = (s_run - mu_n[..., None]).sum(-1)
    coherent = (s_coh - mu_n[..., None]).sum(-1)
    theta = base ** (-torch.arange(d // 2, device=qv.device, dtype=torch.float64) * 2.0 / d)
    lags = (i.view(1, 1, 1, -1) - anchor[..., None]).to(torch.float64)  # (b, Q, H, r)
    g = torch.cos(lags[..., None] * theta).mean(-1)  # g(i - a)
    return seen, coherent, g.mean(-1)


def measure_queries(q, k, query_pos, needle_pos, block_size: int, top_k: int, softmax_scale=None, *,
                    span: int = 1, rope_base: float | None = None) -> dict:
    """Per-query, per-head measurements (numpy arrays with leading axis = queries, flattened over batch).

    The building block of :func:`routing_statistics`; batches are concatenated with :func:`concat_measurements`
    before :func:`aggregate_measurements` turns them into one row per head. ``span``: the needle run's length
    r, ``rope_base``: the model's RoPE base (None: no RoPE), for the RoPE factor (module docstring).
    """
    from mobalab.kernels import moba_topk

    _check_inputs(q, k, query_pos, needle_pos, block_size, top_k, softmax_scale, span, rope_base)
    b, n, h, d = q.shape
    group = h // k.shape[2]
    dev = q.device
    query_pos, needle_pos = query_pos.to(dev), needle_pos.to(dev)
    n_blocks = math.ceil(n / block_size)
    rows = torch.arange(b, device=dev)[:, None]
    qv = q[rows, query_pos].float()  # (b, Q, H, d)
    kf = k.float().repeat_interleave(group, dim=2) if group > 1 else k.float()
    s = torch.einsum("bqhd,bnhd->bqhn", qv, kf)
    t_blk = torch.div(query_pos, block_size, rounding_mode="floor")
    c_star = torch.div(needle_pos, block_size, rounding_mode="floor")

    raw = _score_stats(s, t_blk, c_star, needle_pos, block_size)
    qn = qv.norm(dim=-1).clamp_min(1e-30)  # (b, Q, H)
    kn = kf.norm(dim=-1).clamp_min(1e-30).permute(0, 2, 1)  # (b, H, N)
    cos = s / (qn[..., None] * kn[:, None])
    cosine = _score_stats(cos, t_blk, c_star, needle_pos, block_size)

    # block-level: centroid score = mean of the block's token scores (the centroid is linear in the keys)
    counts = torch.clamp(n - torch.arange(n_blocks, device=dev) * block_size, max=block_size).to(s.dtype)
    blk = _block_sums(s, block_size) / counts
    bid = torch.arange(n_blocks, device=dev)
    nb_mask = ((bid.view(1, 1, -1) < t_blk[..., None]) & (bid.view(1, 1, -1) != c_star[..., None]))
    nb_cnt = nb_mask.sum(-1)
    nbm = nb_mask.unsqueeze(2).to(s.dtype)
    nb_c = nb_cnt.clamp(min=2).unsqueeze(-1).to(s.dtype)
    mu_nb = (blk * nbm).sum(-1) / nb_c
    var_nb = (((blk - mu_nb[..., None]) ** 2) * nbm).sum(-1) / (nb_c - 1)
    d_blk = blk.gather(-1, c_star.view(b, -1, 1, 1).expand(b, c_star.shape[1], h, 1)).squeeze(-1) - mu_nb

    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    causal = torch.arange(n, device=dev).view(1, 1, 1, n) <= query_pos.view(b, -1, 1, 1)
    logits = torch.where(causal, s * scale, torch.full_like(s, float("-inf")))
    mass = torch.softmax(logits, dim=-1).gather(-1, needle_pos.view(b, -1, 1, 1).expand(b, -1, h, 1)).squeeze(-1)

    selected = moba_topk(q, k, block_size, top_k, causal=True)  # (b, N, H, k)
    sel_q = selected[rows, query_pos].long()  # (b, Q, H, k)
    hit = (sel_q == c_star.view(b, -1, 1, 1)).any(-1)

    valid = (c_star < t_blk) & (nb_cnt >= 2)
    if rope_base is not None and span > 1:
        seen, coherent, rope_th = _span_coherence(qv, kf, needle_pos, raw["mu_n"], int(span), float(rope_base))
    else:
        seen = coherent = rope_th = torch.full_like(mu_nb, float("nan"))

    def flat(x):
        x = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else x
        return x.reshape((-1,) + x.shape[2:])

    out = {f"raw_{key}": flat(v) for key, v in raw.items()}
    out.update({f"cos_{key}": flat(v) for key, v in cosine.items()})
    out.update(block_d=flat(d_blk), block_var=flat(var_nb), mass=flat(mass), hit=flat(hit.float()),
               rope_seen=flat(seen), rope_coherent=flat(coherent), rope_theory=flat(rope_th),
               valid=flat(valid.float()) > 0.5, query_pos=flat(query_pos.float()).astype(np.int64),
               needle_pos=flat(needle_pos.float()).astype(np.int64))
    out["meta"] = {"seq_len": n, "head_dim": d, "block_size": int(block_size), "top_k": int(top_k), "heads": h}
    return out


def concat_measurements(parts: list[dict]) -> dict:
    """Join the per-query measurements of several batches (same model, block size and top-k)."""
    if not parts:
        raise ValueError("concat_measurements: need at least one batch of measurements")
    metas = {tuple(sorted(p["meta"].items())) for p in parts}
    if len(metas) != 1:
        raise ValueError(f"concat_measurements: batches differ in their settings: {metas}")
    out = {key: np.concatenate([p[key] for p in parts], axis=0) for key in parts[0] if key != "meta"}
    out["meta"] = parts[0]["meta"]
    return out


def _profile_cluster(profile: np.ndarray, block_size: int, delta_mu: float, delta_mu_eff: float):
    """(m, mu_cluster - mu_noise) from per-query excess profiles (queries, 2R+1) of the offsets |δ| <= R,
    R = min(B, N) - 1 (module docstring)."""
    from mobalab.snr import cluster_stats

    cnt = np.sum(np.isfinite(profile), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(cnt > 0, np.nansum(profile, axis=0) / np.maximum(cnt, 1), 0.0)
        sq = np.where(cnt > 1, np.nansum((profile - mean) ** 2, axis=0) / np.maximum(cnt - 1, 1), np.inf)
        se = np.sqrt(sq / np.maximum(cnt, 1))
    mean = np.where(np.abs(mean) > 3.0 * se, mean, 0.0)
    reach = (profile.shape[1] - 1) // 2
    offsets = np.arange(-reach, reach + 1)
    weighted = mean * (block_size - np.abs(offsets)) / block_size
    if not np.any(weighted > 0):
        return 1.0, math.nan
    _, m, _ = cluster_stats(weighted, reach)
    cluster = (delta_mu_eff - delta_mu) / (m - 1.0) if m > 1.0 + 1e-9 else math.nan
    return float(m), float(cluster)


def _mean_causal_hit(snr_value: float, sd_ratio: float, t: np.ndarray, p: np.ndarray, n: int, bsz: int,
                     top_k: int) -> float:
    """Mean over queries of the causal point hit probability at (t_j, p_j).

    The point value depends on the positions only through the own block c = t // B and whether the needle
    shares it (then it is 1), so it is evaluated once per distinct c.
    """
    from mobalab import snr

    c = t // bsz
    own = (p // bsz) == c
    values = np.ones(t.shape, dtype=float)
    for cc in np.unique(c[~own]):
        h = snr.causal_hit_probability(snr_value, n, bsz, top_k, query_pos=int(cc) * bsz, needle_pos=0,
                                       sd_ratio=sd_ratio)
        values[(c == cc) & ~own] = float(h)
    return float(values.mean())


def aggregate_measurements(meas: dict) -> pd.DataFrame:
    """One row per head from :func:`measure_queries` output (columns :data:`STAT_COLUMNS`)."""
    from mobalab import snr
    from mobalab.stats import interval_units, wilson_interval

    meta = meas["meta"]
    n, d, bsz, k = meta["seq_len"], meta["head_dim"], meta["block_size"], meta["top_k"]
    valid = meas["valid"]
    t, p = meas["query_pos"], meas["needle_pos"]
    rows = []
    for h in range(meta["heads"]):
        hits = int(round(float(meas["hit"][:, h].sum())))
        trials = int(meas["hit"].shape[0])
        row = {"head": h, "block_size": bsz, "top_k": k, "seq_len": n, "head_dim": d, "queries": trials,
               "valid_queries": int(valid.sum())}
        stats = {}
        for kind in ("raw", "cos"):
            v = valid
            s_p, mu_n = meas[f"{kind}_s_p"][v, h], meas[f"{kind}_mu_n"][v, h]
            var_n, exc = meas[f"{kind}_var_n"][v, h], meas[f"{kind}_excess_sum"][v, h]
            if s_p.size == 0:
                stats[kind] = dict(mu_signal=math.nan, mu_noise=math.nan, delta_mu=math.nan, sigma=math.nan,
                                   delta_mu_eff=math.nan, m=math.nan, cluster=math.nan)
                continue
            dmu, dmu_eff = float(np.mean(s_p - mu_n)), float(np.mean(exc))
            m, cluster = _profile_cluster(meas[f"{kind}_profile"][v, h], bsz, dmu, dmu_eff)
            stats[kind] = dict(mu_signal=float(np.mean(s_p)), mu_noise=float(np.mean(mu_n)), delta_mu=dmu,
                               sigma=float(math.sqrt(max(np.mean(var_n), 0.0))), delta_mu_eff=dmu_eff, m=m,
                               cluster=cluster)
        r = stats["raw"]
        row.update(mu_signal=r["mu_signal"], mu_noise=r["mu_noise"], delta_mu=r["delta_mu"], sigma=r["sigma"],
                   m=r["m"], mu_cluster=r["mu_noise"] + r["cluster"], delta_mu_eff=r["delta_mu_eff"],
                   z_needle=r["delta_mu"] / r["sigma"] if r["sigma"] > 0 else math.nan,
                   z_eff=r["delta_mu_eff"] / r["sigma"] if r["sigma"] > 0 else math.nan)

        def predicted(snr_value, sd_ratio=1.0):
            if not math.isfinite(snr_value):
                return math.nan
            return _mean_causal_hit(snr_value, sd_ratio, t, p, n, bsz, k)

        snr_paper = float(snr.snr(d, bsz, r["delta_mu_eff"], sigma=r["sigma"])) if r["sigma"] > 0 else math.nan
        c = stats["cos"]
        snr_cos = float(snr.snr(d, bsz, c["delta_mu_eff"])) if math.isfinite(c["delta_mu_eff"]) else math.nan
        dv, vn = meas["block_d"][valid, h], meas["block_var"][valid, h]
        if dv.size >= 2 and np.mean(vn) > 0:
            var_d, mean_vn = float(np.var(dv, ddof=1)), float(np.mean(vn))
            block_snr = float(np.mean(dv)) / math.sqrt(var_d + mean_vn)
            sd_ratio = math.sqrt(var_d / mean_vn)
            var_ratio = mean_vn / (r["sigma"] ** 2 / bsz) if r["sigma"] > 0 else math.nan
        else:
            block_snr = sd_ratio = var_ratio = math.nan
        lo, hi = wilson_interval(hits, trials)
        row.update(snr_paper=snr_paper, pred_paper=predicted(snr_paper), cos_delta_mu_eff=c["delta_mu_eff"],
                   cos_sigma_sqrt_d=c["sigma"] * math.sqrt(d), snr_cosine=snr_cos, pred_cosine=predicted(snr_cos),
                   block_snr=block_snr, block_sd_ratio=sd_ratio, block_var_ratio=var_ratio,
                   pred_block=predicted(block_snr, sd_ratio) if math.isfinite(sd_ratio) else math.nan,
                   recall_hits=hits, recall_trials=trials, recall=hits / trials, recall_low=float(lo),
                   recall_high=float(hi), needle_mass=float(np.mean(meas["mass"][:, h])))
        seen, coherent = meas["rope_seen"][valid, h], meas["rope_coherent"][valid, h]
        den = float(np.sum(coherent)) if coherent.size else math.nan
        row.update(rope_factor=float(np.sum(seen)) / den if math.isfinite(den) and den > 0 else math.nan,
                   rope_factor_theory=float(np.mean(meas["rope_theory"][valid, h])) if coherent.size else math.nan)
        for kind in ("paper", "cosine", "block"):
            pred = row[f"pred_{kind}"]
            row[f"{kind}_units"] = float(interval_units(pred, hits, trials)) if math.isfinite(pred) else math.nan
        rows.append(row)
    return pd.DataFrame(rows, columns=list(STAT_COLUMNS))


def routing_statistics(q, k, query_pos, needle_pos, block_size: int, top_k: int, *,
                       softmax_scale=None, span: int = 1, rope_base: float | None = None) -> pd.DataFrame:
    r"""Measured routing statistics, predicted and observed recall, one row per query head.

    ``q`` (batch, seqlen, heads, d) and ``k`` (batch, seqlen, kv_heads, d) are the router's inputs (post key
    convolution, post-RoPE); ``query_pos`` and ``needle_pos`` (batch, queries) integer tensors with
    ``needle_pos <= query_pos``; ``block_size`` and ``top_k`` the causal MoBA router's; ``span`` (needle run
    length; the run must end inside the sequence) and ``rope_base`` (the RoPE the keys carry, None: none) for
    the RoPE factor; ``softmax_scale`` the dense attention's scale for ``needle_mass`` (None: 1/√d). Columns
    :data:`STAT_COLUMNS`; definitions and equations in the module docstring.

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> q = torch.randn(4, 256, 1, 64, generator=g); k = torch.randn(4, 256, 1, 64, generator=g)
    >>> qp = torch.full((4, 1), 255); npos = torch.full((4, 1), 40)
    >>> k[:, 40, 0] = 3.0 * q[:, 255, 0]  # a strong needle
    >>> row = routing_statistics(q, k, qp, npos, block_size=32, top_k=3).iloc[0]
    >>> int(row["recall_hits"]), bool(row["z_needle"] > 20)
    (4, True)
    """
    return aggregate_measurements(measure_queries(q, k, query_pos, needle_pos, block_size, top_k, softmax_scale,
                                                  span=span, rope_base=rope_base))
