r"""Exact MoBA block routing on given queries and keys (numpy arrays or torch tensors).

Per query, with block size B and n = ceil(N/B) blocks (docs/design.md, "MoBA semantics"):

* centroid of block j = mean of the keys that exist in it (a partial last block averages its real length),
  accumulated in at least fp32; score :math:`s_j = \langle q, \bar k_j\rangle` (no :math:`1/\sqrt d`);
* non-causal: plain top-k over all n blocks;
* causal, query in block c = floor(t/B): block c is forced and counts toward k; the candidates are the
  complete past blocks j < c, and the top k-1 of them are added (all of them if fewer);
* ties break toward the higher block index;
* a block whose centroid is not finite scores NaN, and a score of NaN or -inf is never selected (a causal
  query still takes such a block as its own block), as in the kernels' reference (docs/design.md, "MoBA semantics").

:func:`block_hit` answers "is block ``target`` selected?" in O(n) per query by counting the eligible blocks
that outrank it (score higher, or equal with a higher index); :func:`select_blocks` returns the whole
selection. Both take ``query_block`` = c for causal routing, or None for non-causal.
"""

from __future__ import annotations

import numpy as np

from .._validate import count, scalar_count
from ._array_backend import is_torch_tensor

__all__ = ["block_centroids", "block_scores", "select_blocks", "block_hit"]


def _real_array(name: str, x):
    """``x`` as a real numpy array or torch tensor (TypeError for strings, bools, complex, objects)."""
    if is_torch_tensor(x):
        import torch

        if x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{name} must hold real numbers, got a tensor of dtype {x.dtype}")
        return x
    arr = np.asarray(x)
    if arr.dtype.kind not in "iuf":
        raise TypeError(
            f"{name} must be a real numpy array or torch tensor, got {type(x).__name__} of dtype {arr.dtype}"
        )
    return arr


def _accum_dtype_keys(keys):
    keys = _real_array("keys", keys)
    if is_torch_tensor(keys):
        import torch

        return keys if keys.dtype in (torch.float32, torch.float64) else keys.to(torch.float32)
    return keys if keys.dtype in (np.float32, np.float64) else keys.astype(np.float32)


def block_centroids(keys, block_size: int):
    r"""Block means :math:`\bar k_j = \frac{1}{|K_j|}\sum_{i\in K_j} k_i` of (..., N, d) keys -> (..., n, d).

    Accumulated in fp32 (fp64 inputs stay fp64); the partial last block is averaged over its real length.

    Examples
    --------
    >>> import numpy as np
    >>> from mobalab import simulate
    >>> print(simulate.block_centroids(np.arange(10.0).reshape(5, 2), block_size=2))
    [[1. 2.]
     [5. 6.]
     [8. 9.]]
    """
    block_size = scalar_count("block_size", block_size)
    keys = _accum_dtype_keys(keys)
    if keys.ndim < 2 or keys.shape[-2] < 1:
        raise ValueError(f"keys must have shape (..., N, d) with N >= 1, got shape {tuple(keys.shape)}")
    *lead, n_tok, d = keys.shape
    n_full = n_tok // block_size
    parts = []
    if n_full:
        full = keys[..., : n_full * block_size, :].reshape(*lead, n_full, block_size, d)
        parts.append(full.sum(-2) / block_size)
    rem = n_tok - n_full * block_size
    if rem:
        parts.append(keys[..., n_full * block_size :, :].sum(-2, **_keepdim(keys)) / rem)
    if len(parts) == 1:
        return parts[0]
    if is_torch_tensor(keys):
        import torch

        return torch.cat(parts, dim=-2)
    return np.concatenate(parts, axis=-2)


def _keepdim(x) -> dict:
    return {"keepdim": True} if is_torch_tensor(x) else {"keepdims": True}


def block_scores(q, keys, block_size: int):
    r"""Router scores :math:`s_j = \langle q, \bar k_j\rangle`: q (..., d), keys (..., N, d) -> (..., n).

    A block whose centroid is not finite (a NaN or infinite key in it) scores NaN for every query, as in the
    kernels' reference, whatever the product with q would give (an infinite centroid can score +inf):
    :func:`select_blocks` and :func:`block_hit` never select it.

    Examples
    --------
    >>> import numpy as np
    >>> from mobalab import simulate
    >>> keys = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0], [2.0, 0.0]])
    >>> print(simulate.block_scores(np.array([1.0, 0.0]), keys, block_size=2))
    [0.5 0.5 2. ]
    """
    q = _real_array("q", q)
    if is_torch_tensor(q) != is_torch_tensor(keys):
        raise TypeError(
            f"q and keys must both be numpy arrays or both torch tensors, got {type(q).__name__} "
            f"and {type(keys).__name__}"
        )
    cent = block_centroids(keys, block_size)
    if q.ndim < 1 or q.shape[-1] != cent.shape[-1]:
        raise ValueError(f"q has head dim {q.shape[-1] if q.ndim else None} but keys have {cent.shape[-1]}")
    try:
        np.broadcast_shapes(tuple(q.shape[:-1]), tuple(cent.shape[:-2]))
    except ValueError:
        raise ValueError(
            f"q (..., d) and keys (..., N, d) must have leading dimensions that broadcast, got q "
            f"{tuple(q.shape)} and keys {tuple(keys.shape)}"
        ) from None
    q = q.to(cent.dtype) if is_torch_tensor(q) else np.asarray(q, dtype=cent.dtype)
    if is_torch_tensor(cent):
        return (cent @ q[..., :, None])[..., 0].masked_fill(~cent.isfinite().all(-1), float("nan"))
    with np.errstate(invalid="ignore"):  # non-finite inputs score NaN by contract, not by accident
        scores = (cent @ q[..., :, None])[..., 0]
    return np.where(np.isfinite(cent).all(-1), scores, np.nan)


def _block_indices(name: str, x, ref):
    """Block indices (integers >= 0) as an int64 array of ``ref``'s kind and device."""
    if is_torch_tensor(x):
        import torch

        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers, got a tensor of dtype {x.dtype}")
        if (x < 0).any():
            raise ValueError(f"{name} must be an integer >= 0, got {int(x.min())}")
    else:
        x = count(name, x, 0)
    if is_torch_tensor(ref):
        import torch

        return torch.as_tensor(x, device=ref.device, dtype=torch.int64)
    return np.asarray(x, dtype=np.int64)


def _arange_like(n, ref):
    if is_torch_tensor(ref):
        import torch

        return torch.arange(n, device=ref.device)
    return np.arange(n)


def _eligibility(scores, top_k: int, query_block):
    """(eligible mask of scores' shape, forced mask or None, slots, query_block array or None).

    A score of NaN or -inf is never eligible (the kernels' reference turns NaN into -inf and leaves such a
    slot empty); only the forced own block of a causal query is taken whatever its score.
    """
    top_k = scalar_count("top_k", top_k)
    if scores.ndim < 1 or scores.shape[-1] < 1:
        raise ValueError(f"scores must have shape (..., n) with n >= 1 blocks, got {tuple(scores.shape)}")
    selectable = scores > -np.inf  # False for NaN too
    if query_block is None:
        return selectable, None, top_k, None
    j = _arange_like(scores.shape[-1], scores)
    c = _block_indices("query_block", query_block, scores)[..., None]
    return selectable & (j < c), j == c, top_k - 1, c


def select_blocks(scores, top_k: int, query_block=None):
    r"""Boolean mask (same shape as ``scores`` (..., n)) of the blocks MoBA routes each query to.

    .. math:: S = \operatorname{top}_k\{0..n-1\}\ \text{(non-causal)},\qquad
              S = \{c\} \cup \operatorname{top}_{k-1}\{j < c\}\ \text{(causal)},

    ranking by score, ties to the higher block index (docs/design.md, "MoBA semantics"). A score of NaN
    or -inf is never selected, so fewer than k blocks may be (none when every score is NaN, non-causal);
    the causal own block is selected whatever its score (docs/design.md, "MoBA semantics").

    ``query_block``: None for non-causal routing, else the query's block c (an int or an array
    broadcastable to ``scores.shape[:-1]``); blocks j > c are never selected, and block c is selected only
    when it lies within ``scores`` (a caller may pass just the past blocks' scores).

    Examples
    --------
    Scores tie between blocks 1 and 3: the higher index wins the last slot. Causally, a query in block 3
    always takes its own block and the best k - 1 = 1 of the past blocks 0..2:

    >>> import numpy as np
    >>> from mobalab import simulate
    >>> scores = np.array([0.3, 0.9, 0.1, 0.9])
    >>> print(simulate.select_blocks(scores, top_k=1), simulate.select_blocks(scores, top_k=2, query_block=3))
    [False False False  True] [False  True False  True]
    """
    scores = _real_array("scores", scores)
    eligible, forced, slots, _ = _eligibility(scores, top_k, query_block)
    n = scores.shape[-1]
    if is_torch_tensor(scores):
        import torch

        elig = eligible.expand(scores.shape)
        # Stable sorts applied from the least to the most significant key: index descending (ties toward
        # the higher index), then score descending, then eligible first.
        perm = torch.arange(n - 1, -1, -1, device=scores.device).expand(scores.shape).contiguous()
        order = torch.sort(scores.gather(-1, perm), dim=-1, descending=True, stable=True).indices
        perm = perm.gather(-1, order)
        order = torch.sort(elig.gather(-1, perm).to(torch.int8), dim=-1, descending=True, stable=True).indices
        perm = perm.gather(-1, order)
        rank = torch.empty_like(perm).scatter_(-1, perm, _arange_like(n, scores).expand(scores.shape).contiguous())
        chosen = elig & (rank < slots)
    else:
        scores = np.asarray(scores)
        elig = np.broadcast_to(eligible, scores.shape)
        idx = np.broadcast_to(np.arange(n), scores.shape)
        # np.lexsort: the last key is the primary one.
        perm = np.lexsort((-idx, -scores, ~elig), axis=-1)
        rank = np.empty_like(perm)
        np.put_along_axis(rank, perm, np.broadcast_to(np.arange(n), scores.shape), axis=-1)
        chosen = elig & (rank < slots)
    if forced is not None:
        chosen = chosen | forced
    return chosen


def block_hit(scores, target_block, top_k: int, query_block=None):
    r"""Whether MoBA routes each query to ``target_block``: bool array of shape ``scores.shape[:-1]``.

    .. math:: \text{hit} \iff \#\{j \text{ eligible} : s_j > s_{\rm target}\ \text{or}\
              (s_j = s_{\rm target},\ j > \text{target})\} < \text{slots},

    with all n blocks eligible and k slots (non-causal), or the past blocks j < c and k - 1 slots
    (causal, where target = c is always a hit and target > c never). A target that scores NaN or -inf is
    never a hit (unless it is the causal own block), and such blocks outrank nothing.

    Non-causal: hit iff fewer than k blocks outrank the target (higher score, or an equal score and a
    higher index). Causal (``query_block`` = c given): hit if target == c; miss if target > c; otherwise hit
    iff fewer than k-1 past blocks j < c outrank it. ``scores`` must cover every block j < c (the own and
    future blocks' scores are not needed).

    Examples
    --------
    >>> import numpy as np
    >>> from mobalab import simulate
    >>> scores = np.array([0.3, 0.9, 0.1, 0.9])
    >>> print(simulate.block_hit(scores, 1, top_k=1), simulate.block_hit(scores, 1, top_k=2, query_block=3))
    False True
    """
    scores = _real_array("scores", scores)
    eligible, _, slots, c = _eligibility(scores, top_k, query_block)
    n = scores.shape[-1]
    target = _block_indices("target_block", target_block, scores)
    if c is None and (target >= n).any():
        raise ValueError(f"target_block must be < n = {n} blocks")
    if c is not None and (c[..., 0] > n).any():
        raise ValueError(f"scores cover {n} blocks, fewer than the past blocks of query_block")
    lead = scores.shape[:-1]
    if is_torch_tensor(scores):
        target = target.expand(lead)
        safe = target.clamp(max=n - 1)[..., None]
        s_t = scores.gather(-1, safe)
    else:
        target = np.broadcast_to(target, lead)
        safe = np.minimum(target, n - 1)[..., None]
        s_t = np.take_along_axis(scores, safe, axis=-1)
    j = _arange_like(n, scores)
    beats = ((scores > s_t) | ((scores == s_t) & (j > safe))) & eligible
    hit = (beats.sum(-1) < slots) & (s_t[..., 0] > -np.inf)
    if c is not None:
        c0 = c[..., 0]
        hit = (hit & (target < c0)) | (target == c0)
    return hit
