r"""MoBA decode over a :class:`~mobalab.kernels.MobaKVCache`: the contract, the readable reference, dispatch.

A decode step appends the new tokens' keys and values to the cache, then calls :func:`moba_decode` with
their queries ``q`` (batch, q_len, heads, d). Query i of sequence b sits at position
:math:`t = L_b - q_len + i` (the last q_len positions of the cache) and gets exactly causal MoBA at t
(see docs/design.md, "MoBA semantics"):

* own block :math:`c = \lfloor t/B \rfloor` in slot 0, then the best :math:`k-1` complete past blocks
  :math:`j < c` by :math:`s_j = \langle q_t, \bar k_j\rangle` (fp32, :math:`\bar k_j = S_j / B` from the
  cache's running sums; with ``centroid_precision="input"`` :math:`T(S_j / B)`, the mean rounded to the cache's
  dtype T, as the prefill's router of that precision scores it), ties to the higher block index, ``-1`` for
  slots beyond the past blocks; a block whose centroid is not finite scores NaN and is never selected;
* :math:`o_t = \mathrm{softmax}(\sigma\, q_t K_{S_t}^\top) V_{S_t}` over the selected tokens, token-causal
  (keys :math:`\le t`) inside the own block, :math:`\sigma = 1/\sqrt d` by default,
  :math:`\mathrm{lse}_t = \log \sum_{i\in S_t} e^{\sigma q_t\cdot k_i}`.

So the output equals :func:`mobalab.kernels.moba_attention` over the whole sequence at those positions.
CPU tensors run :func:`moba_decode_reference` (gathers only the selected blocks); CUDA tensors run the
kernels of ``cuda/decode_split.cu`` or ``cuda/decode.cu`` (:func:`moba_decode`). :func:`check_decode` is the one
place that validates the arguments.
"""

from __future__ import annotations

import math
import numbers

import torch

from . import _contract as C
from ._kv_cache import MobaKVCache

__all__ = ["moba_decode", "moba_decode_reference", "check_decode", "MAX_Q_LEN", "GPU_DTYPES", "GPU_HEAD_DIMS",
           "GPU_BLOCK_SIZES", "GPU_MAX_TOP_K", "GPU_MAX_ROWS"]

#: Query positions per sequence and step (speculative decoding verifies a few at once).
MAX_Q_LEN = 16
#: What the CUDA kernels take (CPU caches take float16/bfloat16/float32/float64 and any sizes).
GPU_DTYPES = (torch.bfloat16, torch.float16)
GPU_HEAD_DIMS = (64, 128)
GPU_BLOCK_SIZES = (16, 32, 64, 128, 256, 512)
GPU_MAX_TOP_K = 32
#: Query rows per kv head, (heads // kv_heads) * q_len, the CUDA kernels take.
GPU_MAX_ROWS = 512
_GRID_YZ = 65535


def _names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_decode(q, cache, top_k, softmax_scale=None, return_lse=False, *, kernel_limits=None) -> tuple[int, float]:
    """Validate the arguments of :func:`moba_decode`; returns ``(top_k, softmax scale)``.

    ``kernel_limits`` (default: whether ``q`` is a CUDA tensor) adds what the CUDA kernels support:
    dtypes :data:`GPU_DTYPES`, head dims :data:`GPU_HEAD_DIMS`, block sizes :data:`GPU_BLOCK_SIZES`,
    top_k <= :data:`GPU_MAX_TOP_K`, (heads // kv_heads) * q_len <= :data:`GPU_MAX_ROWS`. Raises TypeError for
    arguments of the wrong kind, ValueError naming the argument, the value given and what is supported.
    """
    fn = "moba_decode"
    if not isinstance(cache, MobaKVCache):
        raise TypeError(f"{fn}: cache must be a MobaKVCache, got {type(cache).__name__}")
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"{fn}: q must be a torch.Tensor, got {type(q).__name__}")
    if q.dim() != 4:
        raise ValueError(f"{fn}: q must be 4-D (batch, q_len, heads, head_dim), got shape {tuple(q.shape)}")
    batch, q_len, heads, dim = q.shape
    if q.dtype != cache.dtype:
        raise ValueError(f"{fn}: q has dtype {q.dtype}; the cache holds {cache.dtype} (they must match)")
    if q.device != cache.device:
        raise ValueError(f"{fn}: q is on {q.device}; the cache is on {cache.device}")
    if batch != cache.batch:
        raise ValueError(f"{fn}: q has batch {batch}; the cache has batch {cache.batch}")
    if dim != cache.head_dim:
        raise ValueError(f"{fn}: q has head_dim {dim}; the cache has head_dim {cache.head_dim}")
    if heads < 1 or heads % cache.kv_heads:
        raise ValueError(f"{fn}: q has {heads} heads; it must be a positive multiple of the cache's kv_heads "
                         f"({cache.kv_heads}) (MHA, GQA or MQA)")
    if not 1 <= q_len <= MAX_Q_LEN:
        raise ValueError(f"{fn}: q_len = {q_len} is not supported; supported: 1..{MAX_Q_LEN} query positions")
    appended = int(cache._appended.min())
    if q_len > appended:
        raise ValueError(f"{fn}: q_len = {q_len} but the last prefill/append added only {appended} token(s) to "
                         f"some sequence (appended: {cache._appended.tolist()}); the queries must be those of the "
                         "newest tokens: append their keys and values first")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:
        raise ValueError(f"{fn}: top_k must be an integer >= 1, got {top_k!r}")
    top_k = int(top_k)
    if softmax_scale is None:
        scale = 1.0 / math.sqrt(dim)
    elif isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real) or not math.isfinite(
            softmax_scale):
        raise ValueError(f"{fn}: softmax_scale must be a finite real number or None, got {softmax_scale!r}")
    else:
        scale = float(softmax_scale)
    if not isinstance(return_lse, bool):
        raise ValueError(f"{fn}: return_lse must be True or False, got {return_lse!r}")

    if kernel_limits is None:
        kernel_limits = q.is_cuda
    if kernel_limits:
        where = "the CUDA kernels support"
        if q.dtype not in GPU_DTYPES:
            raise ValueError(f"{fn}: dtype {q.dtype} on {q.device}: {where} {_names(GPU_DTYPES)}")
        if dim not in GPU_HEAD_DIMS:
            raise ValueError(f"{fn}: head_dim {dim}: {where} {GPU_HEAD_DIMS}")
        if cache.block_size not in GPU_BLOCK_SIZES:
            raise ValueError(f"{fn}: block_size {cache.block_size}: {where} {GPU_BLOCK_SIZES}")
        if top_k > GPU_MAX_TOP_K:
            raise ValueError(f"{fn}: top_k = {top_k}: {where} 1..{GPU_MAX_TOP_K}")
        rows = heads // cache.kv_heads * q_len
        if rows > GPU_MAX_ROWS:
            raise ValueError(f"{fn}: (heads // kv_heads) * q_len = {heads // cache.kv_heads} * {q_len} = {rows} query "
                             f"rows per kv head: {where} up to {GPU_MAX_ROWS}")
        if batch > _GRID_YZ or cache.kv_heads * math.ceil(rows / 64) > _GRID_YZ:
            raise ValueError(f"{fn}: batch {batch} and kv_heads {cache.kv_heads}: {where} up to {_GRID_YZ} each")
    return top_k, scale


# ---------------------------------------------------------------------------------------------------
# reference


def _compute_dtype(cache: MobaKVCache) -> torch.dtype:
    return torch.float64 if cache.dtype == torch.float64 else torch.float32


def _route(q: torch.Tensor, cache: MobaKVCache, top_k: int, centroid_precision: str = "fp32") -> torch.Tensor:
    """Selected blocks, int32 (batch, q_len, heads, top_k), slot 0 the own block, -1 where unused."""
    batch, q_len, heads, dim = q.shape
    kv_heads, bsz = cache.kv_heads, cache.block_size
    group = heads // kv_heads
    compute = _compute_dtype(cache)
    sel = torch.full((batch, q_len, heads, top_k), -1, dtype=torch.int32, device=q.device)
    for b, length in enumerate(cache._host_lengths().tolist()):
        for i in range(q_len):
            t = length - q_len + i
            own = t // bsz
            sel[b, i, :, 0] = own
            take = min(top_k - 1, own)
            if take == 0:
                continue
            # Candidates are complete blocks, |j| = B: the centroid is the running sum over B.
            cent = C.unroutable_as_nan(C.routed_centroids(cache.block_sums[b, :, :own].to(compute) / bsz,
                                                          cache.dtype, centroid_precision))  # (kv_heads, own, d)
            qi = q[b, i].to(compute).view(kv_heads, group, dim)
            scores = torch.einsum("kgd,kjd->kgj", qi, cent).reshape(heads, own)
            # Stable sort of the reversed block axis: equal scores keep the higher block index first.
            order = torch.sort(scores.flip(-1), dim=-1, descending=True, stable=True).indices
            ranked = (own - 1) - order
            # A NaN score is never selected, as in moba_topk; the descending sort ranks NaN first, so those
            # blocks move to the end as unused slots.
            nan = torch.isnan(scores).flip(-1).gather(-1, order)
            last = torch.sort(nan.to(torch.uint8), dim=-1, stable=True).indices
            ranked = ranked.masked_fill(nan, -1).gather(-1, last)
            sel[b, i, :, 1:1 + take] = ranked[:, :take].to(torch.int32)
    return sel


def _attend(q: torch.Tensor, cache: MobaKVCache, sel: torch.Tensor, scale: float):
    """Softmax attention over the tokens of the selected blocks only; (out in q's dtype, lse)."""
    batch, q_len, heads, dim = q.shape
    top_k = sel.shape[-1]
    bsz = cache.block_size
    group = heads // cache.kv_heads
    compute = _compute_dtype(cache)
    out = torch.empty_like(q)
    lse = torch.empty((batch, q_len, heads), dtype=compute, device=q.device)
    kv_of_head = (torch.arange(heads, device=q.device) // group).view(heads, 1)
    offsets = torch.arange(bsz, device=q.device)
    for b, length in enumerate(cache._host_lengths().tolist()):
        for i in range(q_len):
            t = length - q_len + i
            blocks = sel[b, i].long()  # (heads, top_k)
            tokens = blocks.unsqueeze(-1) * bsz + offsets  # (heads, top_k, B)
            valid = ((blocks.unsqueeze(-1) >= 0) & (tokens <= t)).view(heads, top_k * bsz)
            tokens = torch.where(valid, tokens.view(heads, top_k * bsz), 0)
            keys, values = cache.token_rows(b, kv_of_head, tokens)  # (heads, top_k * B, d)
            # the rows read for unattended slots (token 0) must add nothing, even where token 0 is not finite
            keys = torch.where(valid.unsqueeze(-1), keys.to(compute), 0.0)
            values = torch.where(valid.unsqueeze(-1), values.to(compute), 0.0)
            logits = torch.einsum("hd,hnd->hn", q[b, i].to(compute), keys) * scale
            logits = logits.masked_fill(~valid, float("-inf"))
            row_lse = torch.logsumexp(logits, dim=-1)  # finite: token t itself is always attended
            probs = torch.exp(logits - row_lse.unsqueeze(-1))
            out[b, i] = torch.einsum("hn,hnd->hd", probs, values).to(q.dtype)
            lse[b, i] = row_lse
    return out, lse


def _reference(q, cache, top_k: int, scale: float, return_lse: bool, centroid_precision: str = "fp32"):
    # Slots beyond the blocks the longest sequence reaches stay unused: without them a top_k far above the number
    # of blocks (dense attention asked for by a large k) costs no more than k = that number.
    top_k = min(top_k, max(1, math.ceil(int(cache._host_lengths().max()) / cache.block_size)))
    with torch.no_grad():
        out, lse = _attend(q, cache, _route(q, cache, top_k, centroid_precision), scale)
    return (out, lse) if return_lse else out


def moba_decode_reference(q: torch.Tensor, cache: MobaKVCache, top_k: int, softmax_scale: float | None = None,
                          return_lse: bool = False, *, centroid_precision: str = "fp32"):
    r"""Readable torch MoBA decode (any device): routes over the cache's block sums and attends only the
    tokens of the selected blocks, in fp32 (fp64 for an fp64 cache). Same contract as :func:`moba_decode`.

    Examples
    --------
    >>> import torch
    >>> from mobalab.kernels import MobaKVCache, moba_decode_reference
    >>> g = torch.Generator().manual_seed(0)
    >>> cache = MobaKVCache(1, 1, 8, block_size=4, max_seqlen=32)
    >>> k, v = torch.randn(1, 20, 1, 8, generator=g), torch.randn(1, 20, 1, 8, generator=g)
    >>> cache.prefill(k, v)
    >>> q = torch.randn(1, 1, 2, 8, generator=g)
    >>> out, lse = moba_decode_reference(q, cache, top_k=2, return_lse=True)
    >>> out.shape, [round(x, 3) for x in lse[0, 0].tolist()]
    (torch.Size([1, 1, 2, 8]), [3.09, 3.812])
    """
    top_k, scale = check_decode(q, cache, top_k, softmax_scale, return_lse, kernel_limits=False)
    centroid_precision = C.check_centroid_precision("moba_decode", centroid_precision)
    return _reference(q, cache, top_k, scale, return_lse, centroid_precision)


def moba_decode(q: torch.Tensor, cache: MobaKVCache, top_k: int, softmax_scale: float | None = None,
                return_lse: bool = False, *, centroid_precision: str = "fp32"):
    r"""MoBA attention of the newest ``q_len`` tokens of every sequence over a :class:`MobaKVCache`.

    ``q`` (batch, q_len, heads, head_dim), q_len 1..16, heads a multiple of the cache's kv_heads, same dtype
    and device as the cache; the queries' keys and values must already be appended (module docstring:
    positions and semantics). Returns ``out`` (batch, q_len, heads, head_dim) in q's dtype, and with
    ``return_lse`` also ``lse`` (batch, q_len, heads), the natural log, in float32 (float64 for a float64 cache).
    Equal to :func:`mobalab.kernels.moba_attention` over the whole sequences at those positions (causal), with the
    same ``centroid_precision``: "fp32" (the default) ranks the blocks by the fp32 means, "input" by the means
    rounded to the cache's dtype (as MoBA and FlashMoBA store centroids; a model trained with that routing decodes
    with it; on the GPU the default kernel then reads those means from a 16-bit copy the cache keeps from its first
    such call on, half the bytes of the fp32 sums).

    CUDA tensors run one of two kernels (no gradient): by default two or three plain launches
    (cuda/decode_split.cu: scores of every candidate block from the cached block sums, the selection (inside the
    attention launch where its CTAs run in one wave), then attention over the selected blocks, each block read
    once per kv head; paged caches too); ``MOBALAB_DECODE_KERNEL=fused`` runs one
    persistent launch instead (contiguous caches only; cuda/decode.cu: routing reading each sum once per kv head
    for all query rows of the group, then split-KV attention over the union of the selected blocks with a merge of
    the partial softmax results), and ``split`` forces the default. A step (with its appends) captured in a CUDA
    graph replays at the lengths the cache has reached by then, up to its ``max_seqlen`` (:class:`MobaKVCache`,
    "CUDA graphs"). CPU tensors run :func:`moba_decode_reference`.

    Examples
    --------
    >>> import torch
    >>> from mobalab.kernels import MobaKVCache, moba_attention, moba_decode
    >>> g = torch.Generator().manual_seed(1)
    >>> k, v, q = (torch.randn(1, 24, 1, 8, generator=g) for _ in range(3))
    >>> cache = MobaKVCache(1, 1, 8, block_size=4, max_seqlen=24)
    >>> cache.prefill(k[:, :20], v[:, :20])
    >>> for t in range(20, 24):  # token by token: append, then attend
    ...     cache.append(k[:, t:t + 1], v[:, t:t + 1])
    ...     out = moba_decode(q[:, t:t + 1], cache, top_k=3)
    >>> full = moba_attention(q, k, v, block_size=4, top_k=3)
    >>> bool(torch.allclose(out, full[:, 23:24], atol=1e-6))
    True
    """
    top_k, scale = check_decode(q, cache, top_k, softmax_scale, return_lse)
    centroid_precision = C.check_centroid_precision("moba_decode", centroid_precision)
    if q.is_cuda:
        from ._cuda_decode import decode_cuda

        return decode_cuda(q, cache, top_k, scale, return_lse, centroid_precision=centroid_precision)
    return _reference(q, cache, top_k, scale, return_lse, centroid_precision)
