r"""Rotary position encoding (RoPE) for the simulators: the rotation, a RoPE'd span generator and its router.

Rotation (the convention used everywhere in mobalab): head dim d even, P = d/2 pairs, the *interleaved*
pairs :math:`(x_{2i}, x_{2i+1})`, angle :math:`s\,\theta_i` at position s with
:math:`\theta_i = \mathrm{base}^{-2i/d}` (:func:`mobalab.snr.rope_frequencies`):

.. math::
    (x_{2i}, x_{2i+1}) \mapsto (x_{2i}\cos s\theta_i - x_{2i+1}\sin s\theta_i,\ \
                                x_{2i}\sin s\theta_i + x_{2i+1}\cos s\theta_i).

(The "half-split" layout of some codebases pairs x_i with x_{i+d/2}; it is the same rotation up to a
fixed permutation of the coordinates, which changes no dot product.) Each pair turns rigidly, so norms
are preserved and :math:`\langle R_t q, R_s k\rangle` depends on t - s only.

Generator (the model of :func:`mobalab.snr.rope_block_model`, module docstring there): pre-RoPE query q and noise keys
uniform on the sphere; a span of m consecutive tokens, the needle its token ``needle_index`` = a, all in
the needle's block, sharing one content direction u and planted isotropically,
:math:`k_s = \mu_s u + \sqrt{1-\mu_s^2}\,\xi_s`; u = :math:`R_{t-r}\,q` where r, the position at which
the query matches the content, is the needle (``match="needle"``, r = p) or the query itself
(``match="content"``, r = t, u = q). Then every key is rotated by its position and the query by t, and
the MoBA router (:func:`mobalab.simulate.block_scores`, :func:`mobalab.simulate.block_hit`) runs on the
rotated vectors. See docs/design.md, "RoPE".
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from mobalab import _validate as V
from mobalab.snr import rope_block_model, rope_frequencies

from ._seeding import seed_record, spawn_generators
from ._vector_router import resolve_backend

__all__ = ["MATCH_KINDS", "apply_rope", "random_span_positions", "plant_rope_span", "rope_vector_router"]

MATCH_KINDS = ("needle", "content")

# Key elements (trials x tokens x head_dim) per batch: fixed per backend so a seed reproduces everywhere.
_BATCH_ELEMENTS = {"numpy": 1 << 22, "torch-cpu": 1 << 22, "torch-cuda": 1 << 27}


# ---------------------------------------------------------------------------------------------------
# argument checks


def _is_torch(x) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


# ---------------------------------------------------------------------------------------------------
# the rotation


def _rotate(x, positions, theta: np.ndarray):
    """R_s x for positions s broadcastable to x.shape[:-1]; angles in float64, then x's dtype."""
    # An interleaved pair (x_2i, x_2i+1) is the complex number x_2i + i x_2i+1, so the rotation is one
    # complex multiplication by e^{i s θ_i} (half the memory traffic of the real 2x2 form).
    n_pairs = theta.size
    if _is_torch(x):
        import torch

        pos = torch.as_tensor(positions, device=x.device).to(torch.float64)
        ang = pos[..., None] * torch.as_tensor(theta, device=x.device)
        if x.dtype in (torch.float32, torch.float64):
            phase = torch.polar(torch.ones_like(ang), ang).to(torch.complex64 if x.dtype == torch.float32
                                                                 else torch.complex128)
            z = torch.view_as_complex(x.contiguous().reshape(*x.shape[:-1], n_pairs, 2))
            w = z * phase
            return torch.view_as_real(w).reshape(*w.shape[:-1], 2 * n_pairs)
        cos, sin = torch.cos(ang).to(x.dtype), torch.sin(ang).to(x.dtype)
        pairs = x.reshape(*x.shape[:-1], n_pairs, 2)
        x0, x1 = pairs[..., 0], pairs[..., 1]
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
        return out.reshape(*out.shape[:-2], 2 * n_pairs)
    ang = np.asarray(positions, dtype=np.float64)[..., None] * theta
    if x.dtype in (np.float32, np.float64):
        ctype = np.complex64 if x.dtype == np.float32 else np.complex128
        z = np.ascontiguousarray(x).view(ctype) * np.exp(1j * ang).astype(ctype)
        return z.view(x.dtype)
    cos, sin = np.cos(ang).astype(x.dtype), np.sin(ang).astype(x.dtype)
    pairs = x.reshape(*x.shape[:-1], n_pairs, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    shape = np.broadcast_shapes(x0.shape, cos.shape)
    out = np.empty((*shape, 2), dtype=x.dtype)
    out[..., 0] = x0 * cos - x1 * sin
    out[..., 1] = x0 * sin + x1 * cos
    return out.reshape(*shape[:-1], 2 * n_pairs)


def apply_rope(x, positions, base=10000.0):
    r"""Rotate ``x`` (..., d) by RoPE at ``positions``: pair :math:`(x_{2i}, x_{2i+1})` turns by :math:`s\theta_i`.

    :math:`\theta_i = \mathrm{base}^{-2i/d}` (interleaved pairs; module docstring). ``x``: a float numpy
    array or torch tensor with even last dimension d; ``positions``: integer(s) (numpy array, torch
    tensor, list or scalar) broadcastable to ``x.shape[:-1]``, e.g. ``np.arange(N)`` for (..., N, d) keys;
    ``base`` > 1. Angles are formed in float64, so large positions keep their precision. Returns a new
    array of x's kind, dtype and device; norms are preserved and
    :math:`\langle R_t q, R_s k\rangle` depends on t - s only.

    Examples
    --------
    >>> import numpy as np
    >>> from mobalab.simulate import apply_rope
    >>> q, k = np.array([1.0, 0.0, 0.5, 0.5]), np.array([0.3, -0.2, 0.9, 0.1])
    >>> apply_rope(q, 1, base=100.0).round(4).tolist()
    [0.5403, 0.8415, 0.4476, 0.5474]
    >>> a = apply_rope(q, 7, 100.0) @ apply_rope(k, 3, 100.0)
    >>> b = apply_rope(q, 104, 100.0) @ apply_rope(k, 100, 100.0)
    >>> bool(np.isclose(a, b))
    True
    """
    if _is_torch(x):
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    else:
        x = np.asarray(x)
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"x must be a floating-point array, got dtype {x.dtype}")
    if x.ndim < 1 or x.shape[-1] < 2 or x.shape[-1] % 2:
        raise ValueError(f"x must have shape (..., d) with d even (pairs of coordinates), got {tuple(x.shape)}")
    pos = V.count("positions", positions.cpu().numpy() if _is_torch(positions) else positions, None)
    try:
        np.broadcast_shapes(pos.shape, tuple(x.shape[:-1]))
    except ValueError:
        raise ValueError(
            f"positions of shape {pos.shape} do not broadcast to x.shape[:-1] = {tuple(x.shape[:-1])}"
        ) from None
    theta = rope_frequencies(int(x.shape[-1]), V.rope_base(base))
    return _rotate(x, pos, theta)


# ---------------------------------------------------------------------------------------------------
# the span generator


def random_span_positions(rng, count: int, seq_len: int, block_size: int, m: int, needle_index: int = 0):
    r"""Needle positions (int64, ``count``) of spans of m tokens placed uniformly inside a uniform block.

    The block j is uniform on the n = seq_len // block_size blocks, the span's first token uniform on
    {jB, ..., jB + B - m} (so the whole span lies in block j), and the needle is its token
    ``needle_index``. ``seq_len`` must be a multiple of ``block_size`` and ``1 <= m <= block_size``:

    .. math:: p = jB + s + a, \qquad j \sim U\{0, \dots, n-1\},\quad s \sim U\{0, \dots, B-m\}.

    Examples
    --------
    >>> import numpy as np
    >>> from mobalab.simulate import random_span_positions
    >>> p = random_span_positions(np.random.default_rng(0), 4, 1024, 64, 16, needle_index=8)
    >>> bool(((p - 8) % 64 <= 64 - 16).all())   # every span lies inside one block
    True
    """
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    count = V.scalar_count("count", count, 0)
    seq_len, bsz = V.scalar_count("seq_len", seq_len, 1), V.scalar_count("block_size", block_size, 1)
    m, a = V.scalar_count("m", m, 1), V.scalar_count("needle_index", needle_index, 0)
    if seq_len % bsz:
        raise ValueError(f"seq_len = {seq_len} must be a multiple of block_size = {bsz} (whole blocks only)")
    if m > bsz or a >= m:
        raise ValueError(f"need 1 <= m <= block_size and 0 <= needle_index < m, got m={m}, needle_index={a}, "
                         f"block_size={bsz}")
    block = rng.integers(0, seq_len // bsz, size=count, dtype=np.int64)
    start = rng.integers(0, bsz - m + 1, size=count, dtype=np.int64)
    return block * bsz + start + a


def plant_rope_span(rng, q, keys, query_pos, needle_pos, m: int, mu_signal: float, mu_cluster: float, *,
                    needle_index: int = 0, base: float = 10000.0, match: str = "needle"):
    r"""Overwrite, in place, the span of m relevant *pre-RoPE* keys of each sequence; returns ``keys``.

    ``q``: (b, d) pre-RoPE unit queries; ``keys``: (b, L, d) pre-RoPE keys, index = position;
    ``query_pos``, ``needle_pos``: (b,) integer positions (numpy); the span occupies
    needle_pos - needle_index + {0..m-1}, which must lie in [0, L). The content direction is
    :math:`u = R_{t-r}\,q` (r = needle_pos for ``match="needle"``, r = query_pos, u = q, for
    ``"content"``); the needle is planted with cosine ``mu_signal`` to u and the other m - 1 tokens with
    ``mu_cluster``, isotropically (:func:`mobalab.simulate.plant_into`). ``rng``: the stream of ``q``
    and ``keys`` (numpy Generator, or torch.Generator on their device). Rotating the keys by position and
    the query by query_pos afterwards gives the model of :func:`mobalab.snr.rope_block_model`:

    .. math:: k_{s_j} = \mu_j\, u + \sqrt{1 - \mu_j^2}\,\xi_j, \qquad u = R_{t-r}\, q.

    Examples
    --------
    >>> import numpy as np
    >>> from mobalab.simulate import plant_rope_span
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((2, 64)); q /= np.linalg.norm(q, axis=1, keepdims=True)
    >>> keys = rng.standard_normal((2, 256, 64)); before = keys.copy()
    >>> _ = plant_rope_span(rng, q, keys, np.array([255, 255]), np.array([100, 40]), 4, 0.9, 0.5)
    >>> [np.nonzero((keys[b] != before[b]).any(-1))[0].tolist() for b in range(2)]
    [[100, 101, 102, 103], [40, 41, 42, 43]]
    """
    from mobalab.simulate import plant_into

    V.choice("match", match, MATCH_KINDS)
    m, a = V.scalar_count("m", m, 1), V.scalar_count("needle_index", needle_index, 0)
    if a >= m:
        raise ValueError(f"needle_index must lie in [0, m = {m}), got {a}")
    t = V.count("query_pos", query_pos, 0)
    p = V.count("needle_pos", needle_pos, 0)
    q_shape = tuple(q.shape) if hasattr(q, "shape") else np.shape(q)
    if len(q_shape) != 2 or t.shape != q_shape[:1] or p.shape != q_shape[:1]:
        raise ValueError(
            f"q must be (b, d) and query_pos, needle_pos (b,) arrays, got q {q_shape}, query_pos {t.shape}, "
            f"needle_pos {p.shape}"
        )
    span = p[:, None] - a + np.arange(m)[None, :]
    if span.size and (span.min() < 0 or span.max() >= keys.shape[-2]):
        raise ValueError(f"the span {span.min()}..{span.max()} does not fit in the {keys.shape[-2]} keys")
    theta = rope_frequencies(int(q.shape[-1]), V.rope_base(base))
    u = _rotate(q, t - p, theta) if match == "needle" else q
    cluster = np.delete(span, a, axis=1)
    if _is_torch(keys):
        import torch

        p_a, c_a = torch.as_tensor(p, device=keys.device), torch.as_tensor(cluster, device=keys.device)
    else:
        p_a, c_a = p, cluster
    return plant_into(rng, u, keys, p_a, c_a, mu_signal, mu_cluster, "isotropic")


# ---------------------------------------------------------------------------------------------------
# the router


def _check_positions(n_tok, bs, m, a, causal, match, query_pos, needle_pos):
    """Validated (query_pos, needle_pos) (None where drawn)."""
    if query_pos is not None:
        query_pos = V.scalar_count("query_pos", query_pos, 0)
        if query_pos >= n_tok:
            raise ValueError(f"query_pos must be in [0, seq_len = {n_tok}), got {query_pos}")
    if needle_pos is not None:
        needle_pos = V.scalar_count("needle_pos", needle_pos, 0)
        start = needle_pos - a
        if start < 0 or needle_pos >= n_tok or start // bs != (start + m - 1) // bs:
            raise ValueError(
                f"needle_pos = {needle_pos} puts the span {start}..{start + m - 1} (needle_index = {a}) outside "
                f"one block of block_size = {bs} within seq_len = {n_tok}")
    if causal and (query_pos is None or needle_pos is None):
        raise ValueError("causal=True needs both query_pos and needle_pos (a point configuration)")
    if causal and needle_pos > query_pos:
        raise ValueError(f"causal needle_pos = {needle_pos} must not lie after query_pos = {query_pos}")
    if match == "content" and (query_pos is None or needle_pos is None):
        raise ValueError("match='content' needs both query_pos and needle_pos (the signal depends on t - p)")
    return query_pos, needle_pos


def rope_vector_router(head_dim: int, seq_len: int, block_size: int, top_k: int, mu_signal: float, *,
                       m: int = 1, mu_cluster: float = 0.0, base: float = 10000.0, needle_index: int = 0,
                       match: str = "needle", causal: bool = False, query_pos: int | None = None,
                       needle_pos: int | None = None, trials: int, seed, device="cpu",
                       batch_size: int | None = None, progress: bool = False) -> pd.DataFrame:
    r"""Monte Carlo hit rate of MoBA routing on RoPE'd planted-span vectors; one tidy row.

    Each trial draws pre-RoPE vectors (module docstring): q and ``seq_len`` keys uniform on the sphere, a
    span of ``m`` tokens (the needle its token ``needle_index``, cosine ``mu_signal``; the others cosine
    ``mu_cluster``) sharing the content :math:`R_{t-r}q`; rotates every key by its position and q by t
    (:func:`apply_rope`, ``base``); forms centroids and scores :math:`s_j = \tilde q\cdot\bar{\tilde k}_j`
    and applies the MoBA rules. A hit: the needle's block is selected.

    * non-causal: the span uniform as :func:`random_span_positions` draws it (or at ``needle_pos``), the
      query at ``query_pos`` (default seq_len - 1; irrelevant for ``match="needle"``); plain top-k over
      n = seq_len / block_size blocks;
    * causal: ``query_pos`` and ``needle_pos`` given (a point value); own block forced, the top k - 1 of
      the complete past blocks added; only those past blocks' keys are drawn.

    ``match="content"`` needs both positions. ``seq_len`` must be a multiple of ``block_size``; ``head_dim``
    even. ``device``: "cpu" (numpy), "torch-cpu", "cuda" / "cuda:N" / a torch device. ``seed``: int or numpy
    Generator; same seed, backend and batch_size give bit-identical results.

    Columns: method="vector-level-rope", backend, causal, match, rope_base, snr, sd_ratio (of
    :func:`mobalab.snr.rope_block_model` at these positions), blind_snr, blind_sd_ratio (the same
    generator without RoPE), n_blocks, top_k, head_dim, seq_len, block_size, mu_signal, m, mu_cluster,
    needle_index, query_pos, needle_pos, batch_size, hits, trials, estimate, ci_low, ci_high (95%
    Wilson), seed.

    Examples
    --------
    >>> from mobalab.simulate import rope_vector_router
    >>> row = rope_vector_router(32, 256, 32, 2, 0.3, m=8, mu_cluster=0.3, needle_index=3, trials=50, seed=1)
    >>> print(row.loc[0, "method"], row.loc[0, "n_blocks"], row.loc[0, "trials"])
    vector-level-rope 8 50
    >>> bool(row["snr"].iloc[0] < row["blind_snr"].iloc[0])
    True
    """
    # the package's public pieces; imported here because mobalab.simulate imports this module
    from mobalab import simulate
    from mobalab.stats import wilson_interval

    d = V.scalar_count("head_dim", head_dim, 2)
    if d % 2:
        raise ValueError(f"head_dim must be even (RoPE rotates pairs of coordinates), got {d}")
    n_tok, bs = V.scalar_count("seq_len", seq_len, 1), V.scalar_count("block_size", block_size, 1)
    top_k, trials = V.scalar_count("top_k", top_k, 1), V.scalar_count("trials", trials, 1)
    m, a = V.scalar_count("m", m, 1), V.scalar_count("needle_index", needle_index, 0)
    mu_signal = V.scalar_cosine("mu_signal", mu_signal)
    mu_cluster = V.scalar_cosine("mu_cluster", mu_cluster)
    base = V.rope_base(base)
    V.choice("match", match, MATCH_KINDS)
    causal, progress = V.flag("causal", causal), V.flag("progress", progress)
    if batch_size is not None:
        batch_size = V.scalar_count("batch_size", batch_size, 1)
    if n_tok % bs:
        raise ValueError(f"seq_len = {n_tok} must be a multiple of block_size = {bs} (whole blocks only)")
    if m > bs or a >= m:
        raise ValueError(f"need 1 <= m <= block_size and 0 <= needle_index < m, got m={m}, needle_index={a}, "
                         f"block_size={bs}")
    query_pos, needle_pos = _check_positions(n_tok, bs, m, a, causal, match, query_pos, needle_pos)
    backend, dev = resolve_backend(device)
    seed_rec = seed_record(seed)
    pos_rng, vec_np_rng = spawn_generators(seed, 2)
    if backend == "numpy":
        vec_rng = vec_np_rng
    else:
        import torch

        vec_rng = torch.Generator(device=dev)
        vec_rng.manual_seed(int(vec_np_rng.integers(0, 2**63 - 1)))

    n_blocks = n_tok // bs
    t_fixed = n_tok - 1 if query_pos is None else query_pos
    lag = 0 if match == "needle" else needle_pos - t_fixed
    model = rope_block_model(d, bs, mu_signal, m=m, mu_cluster=mu_cluster, base=base, needle_index=a,
                                 needle_lag=lag)
    theta = rope_frequencies(d, base)

    # Trials whose outcome the rules fix without any score are hits without drawing vectors.
    if causal:
        c = query_pos // bs
        decided = needle_pos // bs == c or c <= top_k - 1
        n_keys = c * bs
    else:
        c = None
        decided = top_k >= n_blocks
        n_keys = n_tok
    hits = trials if decided else 0
    per_batch = max(1, _BATCH_ELEMENTS[backend] // max(n_keys * d, 1))
    if batch_size is not None:
        per_batch = min(per_batch, batch_size)
    with tqdm(total=trials, disable=not progress, desc=f"vector-level rope {backend}", unit="trial") as bar:
        if decided:
            bar.update(trials)
        for start in range(0, 0 if decided else trials, per_batch):
            b = min(per_batch, trials - start)
            p = (np.full(b, needle_pos, dtype=np.int64) if needle_pos is not None
                 else random_span_positions(pos_rng, b, n_tok, bs, m, a))
            t = np.full(b, t_fixed, dtype=np.int64)
            q = simulate.random_unit_vectors(vec_rng, (b,), d)
            keys = simulate.random_unit_vectors(vec_rng, (b, n_keys), d)
            plant_rope_span(vec_rng, q, keys, t, p, m, mu_signal, mu_cluster, needle_index=a, base=base,
                            match=match)
            keys = _rotate(keys, np.arange(n_keys), theta)
            q = _rotate(q, t, theta)
            scores = simulate.block_scores(q, keys, bs)
            target = p // bs
            if backend != "numpy":
                import torch

                target = torch.as_tensor(target, device=dev)
            hits += int(simulate.block_hit(scores, target, top_k, c).sum())
            bar.update(b)

    lo, hi = wilson_interval(hits, trials)
    row = {
        "method": "vector-level-rope", "backend": backend, "causal": causal, "match": match, "rope_base": base,
        "snr": model.snr, "sd_ratio": model.sd_ratio, "blind_snr": model.blind_snr,
        "blind_sd_ratio": model.blind_sd_ratio, "n_blocks": n_blocks, "top_k": top_k, "head_dim": d,
        "seq_len": n_tok, "block_size": bs, "mu_signal": mu_signal, "m": m, "mu_cluster": mu_cluster,
        "needle_index": a, "query_pos": query_pos, "needle_pos": needle_pos, "batch_size": batch_size,
        "hits": int(hits), "trials": trials, "estimate": hits / trials, "ci_low": float(lo), "ci_high": float(hi),
        "seed": seed_rec,
    }
    return pd.DataFrame([row])
