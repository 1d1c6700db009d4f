r"""Readable torch MoBA: the ground truth that the CUDA kernels are tested against.

Layout is FlashAttention's: ``q`` is (batch, seqlen, heads, head_dim), ``k`` and ``v`` are
(batch, seqlen, kv_heads, head_dim), ``heads % kv_heads == 0``, and query head ``h`` reads kv head
``h // (heads // kv_heads)`` (GQA / MQA). Queries and keys share one sequence (self-attention, seqlen_q ==
seqlen_k). With block size :math:`B`, a sequence of :math:`N` tokens has :math:`n = \lceil N/B \rceil`
key blocks; block :math:`j` holds keys :math:`[jB, \min((j+1)B, N))`.

Routing (hard, computed without gradient):

.. math::
    \bar k_j = \frac{1}{|j|}\sum_{i \in j} k_i \quad(\text{fp32}), \qquad
    s_{t,j} = \langle q_t, \bar k_j \rangle \quad(\text{fp32, no } 1/\sqrt d).

* causal: the own block :math:`c = \lfloor t/B \rfloor` is always selected and takes one of the
  :math:`k` slots; the other :math:`k-1` are the best-scoring blocks lying entirely in the past
  (:math:`j < c`), all of them if there are fewer;
* non-causal: the :math:`k` best-scoring of all :math:`n` blocks (the partial last block included).

Exact score ties go to the higher block index. Attention over the selected token set :math:`S_t`:

.. math::
    o_t = \sum_{i \in S_t} \frac{e^{\sigma q_t\cdot k_i}}{\sum_{i' \in S_t} e^{\sigma q_t\cdot k_{i'}}} v_i,
    \qquad \mathrm{lse}_t = \log \sum_{i \in S_t} e^{\,\sigma\, q_t\cdot k_i},

with :math:`\sigma = 1/\sqrt d` by default; in causal mode :math:`S_t` holds only keys :math:`i \le t`
of the own block and every key of the selected past blocks. When :math:`N \le kB` (causal) every past
block fits into the slots and MoBA is dense causal attention.

Memory: nothing of size N x N is ever built. Queries are processed in chunks; a chunk materialises
(batch, chunk, heads, keys) scores, with the chunk sized from :data:`DEFAULT_MEMORY_BUDGET_BYTES` unless
``query_chunk`` is given. Under autograd each chunk is checkpointed (recomputed in backward), so the
backward pass is bounded the same way. This makes the reference usable as the GPU oracle at long
context (e.g. 65536 tokens); keep ``torch.backends.cuda.matmul.allow_tf32`` off (torch's default) there,
or the fp32 matmuls lose precision.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["moba_centroids", "moba_topk", "moba_attention", "DEFAULT_MEMORY_BUDGET_BYTES"]

#: Scratch memory one query chunk may use when ``query_chunk`` is not given (scores, mask, probabilities).
DEFAULT_MEMORY_BUDGET_BYTES = 1 << 30

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Rough bytes per (query, head, key) element alive at once in a chunk: fp32 scores, the masked copy,
# exp, probabilities, bool masks. Per (query, head, block) element of routing: scores and two sorts.
_ATTENTION_BYTES_PER_ELEMENT = 32
_ROUTING_BYTES_PER_ELEMENT = 48


# ---------------------------------------------------------------------------------------------------
# validation


def _check_size(name: str, value, fn: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{fn}: {name} must be an integer >= 1, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{fn}: {name} must be an integer >= 1, got {value}")
    return int(value)


def _check_tensor(name: str, x, fn: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(
            f"{fn}: {name} must be 4-D (batch, seqlen, heads, head_dim), got shape {tuple(x.shape)}"
        )
    if x.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(
            f"{fn}: {name} has dtype {x.dtype}; supported: float16, bfloat16, float32, float64"
        )
    if any(s == 0 for s in x.shape):
        raise ValueError(
            f"{fn}: {name} has an empty dimension, shape {tuple(x.shape)}; "
            "batch, seqlen, heads and head_dim must all be >= 1"
        )


def _check_qk(q, k, fn: str, v=None) -> None:
    named = [("q", q), ("k", k)] + ([("v", v)] if v is not None else [])
    for name, x in named:
        _check_tensor(name, x, fn)
    dtypes = {name: x.dtype for name, x in named}
    if len(set(dtypes.values())) != 1:
        raise ValueError(f"{fn}: q, k, v must share one dtype, got {dtypes}")
    devices = {name: str(x.device) for name, x in named}
    if len(set(devices.values())) != 1:
        raise ValueError(f"{fn}: q, k, v must be on one device, got {devices}")
    if v is not None and k.shape != v.shape:
        raise ValueError(
            f"{fn}: k and v must have the same shape, got k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    (bq, nq, hq, dq), (bk, nk, hk, dk) = q.shape, k.shape
    if bq != bk:
        raise ValueError(f"{fn}: batch differs, q has {bq} and k has {bk}; they must match")
    if nq != nk:
        raise ValueError(
            f"{fn}: seqlen differs, q has {nq} and k has {nk}; "
            "only self-attention (equal seqlen) is supported"
        )
    if dq != dk:
        raise ValueError(f"{fn}: head_dim differs, q has {dq} and k has {dk}; they must match")
    if hq % hk != 0:
        raise ValueError(
            f"{fn}: q heads ({hq}) must be a multiple of kv heads ({hk}) (MHA, GQA or MQA)"
        )


def _check_flag(name: str, value, fn: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{fn}: {name} must be True or False, got {value!r}")
    return value


def _check_chunk(query_chunk, fn: str) -> int | None:
    if query_chunk is None:
        return None
    return _check_size("query_chunk", query_chunk, fn)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # fp64 stays fp64 so that gradcheck and fp64 oracles work; everything else is done in fp32.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------------
# centroids and routing


def moba_centroids(k: torch.Tensor, block_size: int) -> torch.Tensor:
    r"""Per-block mean of the keys: :math:`\bar k_j = \frac{1}{|j|}\sum_{i=jB}^{\min((j+1)B,N)-1} k_i`.

    ``k`` is (batch, seqlen, kv_heads, head_dim). Returns (batch, n_blocks, kv_heads, head_dim) with
    ``n_blocks = ceil(seqlen / block_size)``, accumulated and returned in float32 (float64 when ``k`` is
    float64). A partial last block is the mean of the keys it really holds (no zero padding in the mean).
    """
    fn = "moba_centroids"
    _check_tensor("k", k, fn)
    block_size = _check_size("block_size", block_size, fn)
    return _centroids(k.to(_compute_dtype(k)), block_size)


def _centroids(k: torch.Tensor, block_size: int) -> torch.Tensor:
    batch, seqlen, kv_heads, dim = k.shape
    n_blocks = math.ceil(seqlen / block_size)
    pad = n_blocks * block_size - seqlen
    # Zero rows added to the last block change its sum but not its count, which comes from the real length.
    padded = F.pad(k, (0, 0, 0, 0, 0, pad))
    sums = padded.view(batch, n_blocks, block_size, kv_heads, dim).sum(dim=2)
    starts = torch.arange(n_blocks, device=k.device) * block_size
    counts = torch.clamp(seqlen - starts, max=block_size).to(k.dtype)
    return sums / counts.view(1, n_blocks, 1, 1)


def _default_chunk(per_query_bytes: int, seqlen: int) -> int:
    return max(1, min(seqlen, DEFAULT_MEMORY_BUDGET_BYTES // max(1, per_query_bytes)))


def _rank_blocks(scores: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """Block indices ordered by (candidate first, score descending, block index descending).

    ``scores`` is (..., n); ``candidate`` is a bool tensor broadcastable to it. Two stable sorts give the
    lexicographic order; the first runs on the reversed block axis so that equal scores keep the higher
    block index in front.
    """
    n = scores.shape[-1]
    order = torch.sort(scores.flip(-1), dim=-1, descending=True, stable=True).indices
    blocks = (n - 1) - order
    is_candidate = candidate.expand_as(scores).gather(-1, blocks).to(torch.int32)
    by_candidate = torch.sort(is_candidate, dim=-1, descending=True, stable=True).indices
    return blocks.gather(-1, by_candidate)


def _route(q: torch.Tensor, centroids: torch.Tensor, t0: int, block_size: int, top_k: int,
           causal: bool) -> torch.Tensor:
    """Selected blocks, int32 (batch, chunk, heads, top_k), for queries at positions t0, t0+1, ...

    ``q`` is the query chunk in the compute dtype; ``centroids`` (batch, n, kv_heads, d) likewise.
    """
    batch, chunk, heads, dim = q.shape
    n_blocks, kv_heads = centroids.shape[1], centroids.shape[2]
    group = heads // kv_heads
    device = q.device

    grouped = q.reshape(batch, chunk, kv_heads, group, dim)
    scores = torch.einsum("btkgd,bjkd->btkgj", grouped, centroids).reshape(batch, chunk, heads, n_blocks)

    positions = torch.arange(t0, t0 + chunk, device=device)
    own = positions // block_size
    blocks = torch.arange(n_blocks, device=device)
    if causal:
        candidate = blocks.view(1, n_blocks) < own.view(chunk, 1)  # complete past blocks only
        n_free = top_k - 1  # the own block takes slot 0
    else:
        candidate = torch.ones(chunk, n_blocks, dtype=torch.bool, device=device)
        n_free = top_k
    candidate = candidate.view(1, chunk, 1, n_blocks)

    ranked = _rank_blocks(scores, candidate)
    take = min(n_free, n_blocks)
    picked = ranked[..., :take]
    n_candidates = candidate.sum(dim=-1, keepdim=True)  # (1, chunk, 1, 1)
    slot = torch.arange(take, device=device)
    picked = torch.where(slot < n_candidates, picked, torch.full_like(picked, -1))

    parts = []
    if causal:
        parts.append(own.view(1, chunk, 1, 1).expand(batch, chunk, heads, 1))
    parts.append(picked)
    filled = sum(p.shape[-1] for p in parts)
    parts.append(torch.full((batch, chunk, heads, top_k - filled), -1, dtype=picked.dtype, device=device))
    return torch.cat(parts, dim=-1).to(torch.int32)


def moba_topk(q: torch.Tensor, k: torch.Tensor, block_size: int, top_k: int, causal: bool = True, *,
              query_chunk: int | None = None) -> torch.Tensor:
    r"""MoBA routing: the key blocks each query attends, int32 (batch, seqlen, heads, top_k).

    Scores :math:`s_{t,j} = \langle q_t, \bar k_j \rangle` in float32 (float64 for float64 inputs), no
    :math:`1/\sqrt d`, with :math:`\bar k_j` from :func:`moba_centroids` on kv head
    ``h // (heads // kv_heads)``. Exact ties rank the higher block index first. The ranking is defined
    for non-NaN scores (infinite ones included); NaN inputs give an unspecified selection.

    Slot order:

    * ``causal=True``: slot 0 is the own block ``t // block_size``; slots ``1 .. top_k-1`` hold the
      best past blocks (``j < t // block_size``) by descending score; slots beyond the number of past
      blocks are ``-1``. ``top_k = 1`` selects the own block only.
    * ``causal=False``: slots ``0 .. top_k-1`` hold the best of all ``n`` blocks (partial last block
      included) by descending score; slots ``n .. top_k-1`` are ``-1`` when ``top_k > n``.

    ``query_chunk`` sets how many queries are scored at once (default: sized from
    :data:`DEFAULT_MEMORY_BUDGET_BYTES`); the result does not depend on it.
    """
    fn = "moba_topk"
    _check_qk(q, k, fn)
    block_size = _check_size("block_size", block_size, fn)
    top_k = _check_size("top_k", top_k, fn)
    causal = _check_flag("causal", causal, fn)
    query_chunk = _check_chunk(query_chunk, fn)

    batch, seqlen, heads, _ = q.shape
    n_blocks = math.ceil(seqlen / block_size)
    if query_chunk is None:
        query_chunk = _default_chunk(batch * heads * n_blocks * _ROUTING_BYTES_PER_ELEMENT, seqlen)
    compute = _compute_dtype(q)
    with torch.no_grad():
        centroids = _centroids(k.detach().to(compute), block_size)
        chunks = [
            _route(q[:, t0:t0 + query_chunk].detach().to(compute), centroids, t0, block_size, top_k, causal)
            for t0 in range(0, seqlen, query_chunk)
        ]
    return torch.cat(chunks, dim=1)


# ---------------------------------------------------------------------------------------------------
# attention


def _allowed_keys(selected: torch.Tensor, t0: int, n_keys: int, block_size: int, n_blocks: int,
                  causal: bool) -> torch.Tensor:
    """Token mask (batch, chunk, heads, n_keys): key i is attended by the query at t0 + row."""
    batch, chunk, heads, _ = selected.shape
    device = selected.device
    # Column n_blocks is a sink for the -1 slots, dropped afterwards.
    in_selection = torch.zeros(batch, chunk, heads, n_blocks + 1, dtype=torch.bool, device=device)
    slots = torch.where(selected >= 0, selected, n_blocks).long()
    in_selection.scatter_(-1, slots, True)
    key_positions = torch.arange(n_keys, device=device)
    allowed = in_selection[..., :n_blocks][..., key_positions // block_size]
    if causal:
        # Past blocks lie entirely before t, so "key <= t" only trims the own block.
        query_positions = torch.arange(t0, t0 + chunk, device=device)
        allowed = allowed & (key_positions.view(1, n_keys) <= query_positions.view(chunk, 1)).view(
            1, chunk, 1, n_keys)
    return allowed


def _attend_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selected: torch.Tensor, t0: int,
                  block_size: int, n_blocks: int, causal: bool, scale: float):
    """Masked softmax attention for one query chunk.

    ``q`` is (batch, chunk, heads, d); ``k`` and ``v`` are head-major (batch, kv_heads, n_keys, d).
    Returns (out (batch, chunk, heads, d), lse (batch, chunk, heads)).
    """
    batch, chunk, heads, dim = q.shape
    kv_heads, n_keys = k.shape[1], k.shape[2]
    group = heads // kv_heads

    def kv_major(x: torch.Tensor) -> torch.Tensor:
        # (batch, chunk, heads, m) -> (batch, kv_heads, group * chunk, m): the rows that share a kv head
        x = x.reshape(batch, chunk, kv_heads, group, x.shape[-1]).permute(0, 2, 3, 1, 4)
        return x.reshape(batch, kv_heads, group * chunk, x.shape[-1])

    # Built here rather than passed in so that checkpointing keeps only the small selection alive.
    allowed = kv_major(_allowed_keys(selected, t0, n_keys, block_size, n_blocks, causal))

    logits = (kv_major(q) @ k.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~allowed, float("-inf"))
    # Every query attends at least one key (its own position, or a non-empty selected block), so the
    # log-sum-exp is finite and no row is all -inf.
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - lse.unsqueeze(-1))
    out = probs @ v  # (batch, kv_heads, group * chunk, d)

    out = out.view(batch, kv_heads, group, chunk, dim).permute(0, 3, 1, 2, 4)
    out = out.reshape(batch, chunk, heads, dim)
    lse = lse.view(batch, kv_heads, group, chunk).permute(0, 3, 1, 2).reshape(batch, chunk, heads)
    return out, lse


def moba_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, top_k: int,
                   causal: bool = True, softmax_scale: float | None = None, return_lse: bool = False, *,
                   query_chunk: int | None = None):
    r"""MoBA attention: softmax attention of each query over the tokens of its routed key blocks.

    .. math::
        o_t = \mathrm{softmax}\big(\sigma\, q_t K_{S_t}^\top\big)\, V_{S_t}, \qquad
        \mathrm{lse}_t = \log \sum_{i \in S_t} \exp(\sigma\, q_t \cdot k_i),

    where :math:`S_t` is the union of the blocks :func:`moba_topk` selects for (t, head), token-causal
    (keys :math:`\le t`) inside the own block when ``causal``; selected past blocks are attended fully.
    :math:`\sigma` is ``softmax_scale``, :math:`1/\sqrt{d}` by default; lse is the natural log.

    Shapes: ``q`` (batch, seqlen, heads, d), ``k`` and ``v`` (batch, seqlen, kv_heads, d). Computes in
    float32 (float64 when the inputs are float64). Returns ``out`` (batch, seqlen, heads, d) in q's dtype,
    and with ``return_lse`` also ``lse`` (batch, seqlen, heads) in float32 (float64 for float64 inputs).

    Routing is hard: it runs under ``no_grad``, so no gradient flows through centroids or scores; the
    attention is differentiable w.r.t. q, k and v by autograd (each query chunk is checkpointed so the
    backward pass stays within the same memory bound). ``query_chunk`` sets the number of queries per
    chunk (default: sized from :data:`DEFAULT_MEMORY_BUDGET_BYTES`); the result does not depend on it.
    """
    fn = "moba_attention"
    _check_qk(q, k, fn, v=v)
    block_size = _check_size("block_size", block_size, fn)
    top_k = _check_size("top_k", top_k, fn)
    causal = _check_flag("causal", causal, fn)
    return_lse = _check_flag("return_lse", return_lse, fn)
    query_chunk = _check_chunk(query_chunk, fn)
    batch, seqlen, heads, dim = q.shape
    if softmax_scale is None:
        scale = 1.0 / math.sqrt(dim)
    elif isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real) or not math.isfinite(
            softmax_scale):
        raise ValueError(f"{fn}: softmax_scale must be a finite real number or None, got {softmax_scale!r}")
    else:
        scale = float(softmax_scale)

    n_blocks = math.ceil(seqlen / block_size)
    if query_chunk is None:
        per_key = seqlen * _ATTENTION_BYTES_PER_ELEMENT + n_blocks * _ROUTING_BYTES_PER_ELEMENT
        per_query = batch * heads * per_key
        query_chunk = _default_chunk(per_query, seqlen)

    compute = _compute_dtype(q)
    qc = q.to(compute)
    # Head-major keys and values, made once, so that every chunk's matmuls read slices without copying.
    kc, vc = (x.to(compute).transpose(1, 2).contiguous() for x in (k, v))
    with torch.no_grad():
        centroids = _centroids(k.detach().to(compute), block_size)
    use_checkpoint = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)

    # Filled chunk by chunk (autograd records each slice copy), so no second full-size copy is made.
    out = q.new_empty(q.shape)
    lse = q.new_empty(q.shape[:3], dtype=compute)
    for t0 in range(0, seqlen, query_chunk):
        t1 = min(seqlen, t0 + query_chunk)
        with torch.no_grad():
            selected = _route(qc[:, t0:t1].detach(), centroids, t0, block_size, top_k, causal)
        # Causal queries below t1 never see keys at or beyond t1.
        n_keys = t1 if causal else seqlen
        args = (qc[:, t0:t1], kc[:, :, :n_keys], vc[:, :, :n_keys], selected, t0,
                block_size, n_blocks, causal, scale)
        if use_checkpoint:
            out_chunk, lse_chunk = checkpoint(_attend_chunk, *args, use_reentrant=False)
        else:
            out_chunk, lse_chunk = _attend_chunk(*args)
        out[:, t0:t1] = out_chunk
        lse[:, t0:t1] = lse_chunk

    if return_lse:
        return out, lse
    return out
