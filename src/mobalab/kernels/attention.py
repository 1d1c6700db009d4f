r"""MoBA attention forward on the GPU, organised key-block-major so that tensor-core tiles are full.

For every (batch, query head, query t) the router picked ``top_k`` key blocks (slot ``s`` holds block
:math:`j_{t,s}`, -1 when unused). FlashMoBA walks query blocks and gathers, per (query block, key block),
the few queries that chose that key block: at long context with near-random routing those tiles are mostly
empty. Here the selection is inverted instead: for each (kv head, key block j) the list of every
(query, head, slot) row that selected j, in ascending (head, query) order, is cut into tiles of 64 rows;
a CTA gathers a tile's query vectors into a dense Q tile and runs flash-style online softmax over the
block's keys on tensor cores (mma.sync m16n8k16, fp32 accumulation), emitting per row the partial

.. math::
    m = \max_i x_i,\quad l = \sum_i 2^{x_i - m},\quad o = \frac{1}{l}\sum_i 2^{x_i - m} v_i,
    \qquad x_i = \sigma \log_2(e)\, q_t\cdot k_i ,

over the block's keys :math:`i` (token-causal, :math:`i \le t`, in causal mode; the mask only bites in
the own block). A merge kernel then combines each query's slots in slot order:

.. math::
    M = \max_s m_s,\quad w_s = l_s 2^{m_s - M},\quad
    o_t = \frac{\sum_s w_s o_s}{\sum_s w_s},\quad
    \mathrm{lse}_t = \ln 2\,\big(M + \log_2 \textstyle\sum_s w_s\big).

Two tile kernels: *resident* (a CTA takes up to 4 tiles of one key block, loads the block's K and V
into shared memory once and gathers the next tile's queries while computing the current one; used when
K and V of a block fit in 64 KB, i.e. B <= 128 at d = 128 and B <= 256 at d = 64) and *streaming* (one
tile per CTA, K/V streamed in double-buffered 64-key sub-tiles; large blocks).

Determinism: the lists come from a stable sort (equal keys keep their (head, query, slot) order), every
partial is written by exactly one CTA, and the merge order is fixed, so two runs are bit-identical.

Memory: partials cost ``head_dim * 4 + 8`` bytes per (query, head, slot). The work is cut into chunks
(one batch row, a group of kv heads with their query heads, a query range) whose scratch fits a byte
budget, and each chunk's query range stays long enough that lists fill tiles. Everything runs on torch's
current stream with torch-allocated memory and no host synchronisation.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "moba_attention_cuda",
    "Chunk",
    "plan_chunks",
    "scratch_budget_bytes",
    "kernel_names",
    "key_tile",
    "fwd_smem_bytes",
    "resident",
    "rows_per_unit",
    "keys_args",
    "bounds_args",
    "segments_args",
    "fwd_args",
    "merge_args",
    "SUPPORTED_HEAD_DIMS",
    "SUPPORTED_BLOCK_SIZES",
    "SUPPORTED_DTYPES",
    "MAX_TOP_K",
    "ROWS",
    "indexed_attention_torch",
]

SOURCE = "attention.cu"
SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128, 256, 512)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)
MAX_TOP_K = 64
ROWS = 64  # rows per tile (MOBA_ROWS in attention.cuh)
TILES_PER_UNIT = 4  # tiles per CTA of the resident kernel (MOBA_TPC in attention.cuh)
RESIDENT_MAX_KV_BYTES = 64 << 10  # K + V of one block at most this large: the resident kernel is used
FWD_THREADS = 128
MERGE_THREADS = 256
LOG2E = 1.4426950408889634

#: Override of the per-call scratch budget in bytes (None: :func:`scratch_budget_bytes` decides).
SCRATCH_BUDGET_BYTES: int | None = None
#: Tile kernel: "auto" (resident key block when it fits, else streaming), "resident" or "streaming";
#: the environment variable MOBALAB_ATTN_VARIANT sets the default.
FWD_VARIANT = os.environ.get("MOBALAB_ATTN_VARIANT", "auto")
_MIN_BUDGET = 512 << 20
_MAX_BUDGET = 768 << 20
_BUDGET_FRACTION = 0.04  # of the bytes of q, k, v and out


@dataclass(frozen=True)
class Chunk:
    """Work unit: batch row ``batch_index``, query heads ``h0 .. h0+n_heads``, queries ``t0 .. t0+n_q``."""

    batch_index: int
    h0: int
    n_heads: int
    t0: int
    n_q: int


def bytes_per_pair(head_dim: int) -> int:
    """Scratch per (query, head, slot): fp32 partial o, (m, l), segment key, sorted key, sort index, temp."""
    return head_dim * 4 + 8 + 4 + 4 + 8 + 16


def scratch_budget_bytes(batch: int, seqlen: int, heads: int, kv_heads: int, head_dim: int,
                         elem_bytes: int = 2) -> int:
    """Scratch budget: 4% of the q, k, v and out bytes, clamped to [512 MiB, 768 MiB] (or the override)."""
    if SCRATCH_BUDGET_BYTES is not None:
        return int(SCRATCH_BUDGET_BYTES)
    io = batch * seqlen * (2 * heads + 2 * kv_heads) * head_dim * elem_bytes
    return int(min(_MAX_BUDGET, max(_MIN_BUDGET, _BUDGET_FRACTION * io)))


def plan_chunks(batch: int, seqlen: int, heads: int, kv_heads: int, head_dim: int, top_k: int,
                budget_bytes: int) -> list[Chunk]:
    """Split (batch, heads, queries) into chunks whose scratch fits ``budget_bytes``.

    A chunk holds whole kv groups (so every tile shares one kv head) and, when a full sequence does not
    fit, one kv group and an even share of the queries (long ranges keep tiles full).
    """
    group = heads // kv_heads
    per_query = group * top_k * bytes_per_pair(head_dim)  # one query position of one kv group
    max_q = max(1, budget_bytes // per_query)
    chunks = []
    if max_q >= seqlen:
        kv_per_chunk = max(1, min(kv_heads, max_q // seqlen))
        for b in range(batch):
            for g0 in range(0, kv_heads, kv_per_chunk):
                n_kv = min(kv_per_chunk, kv_heads - g0)
                chunks.append(Chunk(b, g0 * group, n_kv * group, 0, seqlen))
    else:
        n_t = math.ceil(seqlen / max_q)
        n_q = math.ceil(seqlen / n_t)
        for b in range(batch):
            for g0 in range(kv_heads):
                for t0 in range(0, seqlen, n_q):
                    chunks.append(Chunk(b, g0 * group, group, t0, min(n_q, seqlen - t0)))
    return chunks


def key_tile(block_size: int) -> int:
    """Keys per inner step: the whole block when it is small, else 64 (every supported B is a multiple)."""
    return min(block_size, 64)


def resident(head_dim: int, block_size: int, variant: str | None = None) -> bool:
    """Whether the resident tile kernel runs: the block's K and V fit in shared memory (or it is forced)."""
    variant = FWD_VARIANT if variant is None else variant
    if variant not in ("auto", "resident", "streaming"):
        raise ValueError(f"FWD_VARIANT must be 'auto', 'resident' or 'streaming', got {variant!r}")
    fits = 2 * block_size * head_dim * 2 <= RESIDENT_MAX_KV_BYTES
    return fits if variant == "auto" else (variant == "resident" and fits)


def rows_per_unit(head_dim: int, block_size: int, variant: str | None = None) -> int:
    """Rows one CTA of the tile kernel handles: a tile, or a resident unit of TILES_PER_UNIT tiles."""
    return ROWS * (TILES_PER_UNIT if resident(head_dim, block_size, variant) else 1)


def kernel_names(dtype: torch.dtype, head_dim: int, block_size: int,
                 variant: str | None = None) -> tuple[str, str]:
    """(forward tile kernel, merge kernel) names of the variant for these inputs."""
    tag = {torch.bfloat16: "bf16", torch.float16: "f16"}[dtype]
    kind = "res" if resident(head_dim, block_size, variant) else "fwd"
    fwd = f"moba_attn_{kind}_{tag}_d{head_dim}_kt{key_tile(block_size)}"
    return fwd, f"moba_attn_merge_{tag}_d{head_dim}"


def fwd_smem_bytes(head_dim: int, block_size: int, variant: str | None = None) -> int:
    """Dynamic shared memory of the tile kernel.

    Streaming: a Q tile + double-buffered K and V sub-tiles. Resident: the block's K and V + two Q tiles.
    """
    if resident(head_dim, block_size, variant):
        return 2 * block_size * head_dim * 2 + 2 * ROWS * head_dim * 2
    return ROWS * head_dim * 2 + 4 * key_tile(block_size) * head_dim * 2


# --------------------------------------------------------------------------------------------------
# argument tuples (pure functions: the CPU tests pass them through _launch.check_args)


def keys_args(topk, keys, seqlen, heads, top_k, n_blocks, chunk: Chunk, group):
    return (topk, keys, np.int32(seqlen), np.int32(heads), np.int32(top_k), np.int32(n_blocks),
            np.int32(chunk.batch_index), np.int32(chunk.h0), np.int32(chunk.n_heads), np.int32(chunk.t0),
            np.int32(chunk.n_q), np.int32(group))


def bounds_args(sorted_keys, n_pairs, n_seg, seg_off):
    return (sorted_keys, np.int64(n_pairs), np.int32(n_seg), seg_off)


def segments_args(seg_off, n_seg, rows_per_unit, tile_cum):
    return (seg_off, np.int32(n_seg), np.int32(rows_per_unit), tile_cum)


def fwd_args(q, k, v, pairs, seg_off, tile_cum, part_o, part_ml, *, seqlen, heads, kv_heads, top_k,
             block_size, n_blocks, chunk: Chunk, n_seg, causal, scale_log2):
    return (q, k, v, pairs, seg_off, tile_cum, part_o, part_ml, np.int32(seqlen), np.int32(heads),
            np.int32(kv_heads), np.int32(top_k), np.int32(block_size), np.int32(n_blocks),
            np.int32(chunk.batch_index), np.int32(chunk.h0), np.int32(chunk.n_q), np.int32(chunk.t0),
            np.int32(n_seg), np.int32(1 if causal else 0), np.float32(scale_log2))


def merge_args(part_o, part_ml, topk, out, lse, *, seqlen, heads, top_k, n_blocks, chunk: Chunk, write_lse):
    return (part_o, part_ml, topk, out, lse, np.int32(seqlen), np.int32(heads), np.int32(top_k),
            np.int32(n_blocks), np.int32(chunk.batch_index), np.int32(chunk.h0), np.int32(chunk.n_heads),
            np.int32(chunk.t0), np.int32(chunk.n_q), np.int32(1 if write_lse else 0))


def fwd_grid(n_pairs: int, n_seg: int, rows: int = ROWS) -> int:
    """Upper bound on the CTAs (units of ``rows`` rows) of a chunk: each non-empty segment wastes < 1 unit."""
    return max(1, math.ceil(n_pairs / rows) + min(n_seg, n_pairs))


# --------------------------------------------------------------------------------------------------
# validation


def _fail(msg: str):
    raise ValueError(f"moba_attention_cuda: {msg}")


def _validate(q, k, v, block_size, top_k, causal, softmax_scale, return_lse, topk_indices):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            _fail(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            _fail(f"{name} must be 4-D (batch, seqlen, heads, head_dim), got shape {tuple(x.shape)}")
        if x.dtype not in SUPPORTED_DTYPES:
            _fail(f"{name} has dtype {x.dtype}; supported: torch.bfloat16, torch.float16")
        if any(s == 0 for s in x.shape):
            _fail(f"{name} has an empty dimension, shape {tuple(x.shape)}; all sizes must be >= 1")
    if len({q.dtype, k.dtype, v.dtype}) != 1:
        _fail(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if len({q.device, k.device, v.device}) != 1:
        _fail(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        _fail(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    (bq, nq, hq, dq), (bk, nk, hk, dk) = q.shape, k.shape
    if bq != bk:
        _fail(f"batch differs: q has {bq}, k has {bk}")
    if nq != nk:
        _fail(f"seqlen differs: q has {nq}, k has {nk}; only self-attention (equal seqlen) is supported")
    if dq != dk:
        _fail(f"head_dim differs: q has {dq}, k has {dk}")
    if dq not in SUPPORTED_HEAD_DIMS:
        _fail(f"head_dim {dq} is not supported; supported: {SUPPORTED_HEAD_DIMS}")
    if hq % hk != 0:
        _fail(f"q heads ({hq}) must be a multiple of kv heads ({hk})")
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral) or \
            int(block_size) not in SUPPORTED_BLOCK_SIZES:
        _fail(f"block_size {block_size!r} is not supported; supported: {SUPPORTED_BLOCK_SIZES}")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or not 1 <= int(top_k) <= MAX_TOP_K:
        _fail(f"top_k {top_k!r} is not supported; supported: integers 1..{MAX_TOP_K}")
    if not isinstance(causal, bool):
        _fail(f"causal must be True or False, got {causal!r}")
    if not isinstance(return_lse, bool):
        _fail(f"return_lse must be True or False, got {return_lse!r}")
    if softmax_scale is None:
        scale = 1.0 / math.sqrt(dq)
    elif isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real) or \
            not math.isfinite(float(softmax_scale)):
        _fail(f"softmax_scale must be a finite real number or None, got {softmax_scale!r}")
    else:
        scale = float(softmax_scale)
    if topk_indices is not None:
        want = (bq, nq, hq, int(top_k))
        if not isinstance(topk_indices, torch.Tensor):
            _fail(f"topk_indices must be a torch.Tensor, got {type(topk_indices).__name__}")
        if tuple(topk_indices.shape) != want:
            _fail(f"topk_indices has shape {tuple(topk_indices.shape)}; "
                  f"expected (batch, seqlen, heads, top_k) = {want}")
        if topk_indices.dtype not in (torch.int32, torch.int64):
            _fail(f"topk_indices has dtype {topk_indices.dtype}; supported: torch.int32, torch.int64")
        if topk_indices.device != q.device:
            _fail(f"topk_indices is on {topk_indices.device}, q on {q.device}")
    if not q.is_cuda:  # last, so that every other check can be exercised on a CPU-only machine
        _fail(f"inputs are on {q.device}; the CUDA kernel needs CUDA tensors (for CPU: the reference)")
    return int(block_size), int(top_k), scale


def _prepare(x: torch.Tensor) -> torch.Tensor:
    """Contiguous and 16-byte aligned (cp.async reads 16-byte chunks); copies only when needed."""
    if not x.is_contiguous():
        x = x.contiguous()
    if x.data_ptr() % 16:
        x = x.clone()
    return x


def _route(q, k, block_size, top_k, causal):
    from .routing import moba_topk_cuda

    return moba_topk_cuda(q, k, block_size, top_k, causal=causal)


# --------------------------------------------------------------------------------------------------
# the API


def moba_attention_cuda(q, k, v, block_size: int, top_k: int, causal: bool = True, softmax_scale=None,
                        return_lse: bool = False, topk_indices=None):
    """MoBA attention forward on CUDA tensors; contract of :func:`mobalab.kernels.reference.moba_attention`.

    ``q`` (batch, seqlen, heads, d), ``k``/``v`` (batch, seqlen, kv_heads, d), bf16 or fp16, d in {64, 128};
    ``block_size`` in {16, 32, 64, 128, 256, 512}; ``top_k`` in 1..64. ``topk_indices`` (int32
    (batch, seqlen, heads, top_k), -1 = unused slot) skips routing. Returns ``out`` in q's dtype and, with
    ``return_lse``, the natural-log ``lse`` (batch, seqlen, heads) in fp32.
    """
    block_size, top_k, scale = _validate(q, k, v, block_size, top_k, causal, softmax_scale, return_lse,
                                         topk_indices)
    with torch.cuda.device(q.device):
        return _forward(q, k, v, block_size, top_k, causal, scale, return_lse, topk_indices)


def _forward(q, k, v, block_size, top_k, causal, scale, return_lse, topk_indices):
    from ._launch import launch

    q, k, v = _prepare(q), _prepare(k), _prepare(v)
    batch, seqlen, heads, dim = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    n_blocks = math.ceil(seqlen / block_size)
    if topk_indices is None:
        topk = _route(q, k, block_size, top_k, causal)
    else:
        topk = topk_indices
    topk = topk.to(torch.int32).contiguous()

    device = q.device
    out = torch.empty_like(q)
    lse = torch.empty((batch, seqlen, heads) if return_lse else (1,), dtype=torch.float32, device=device)

    chunks = plan_chunks(batch, seqlen, heads, kv_heads, dim,
                         top_k, scratch_budget_bytes(batch, seqlen, heads, kv_heads, dim, q.element_size()))
    max_pairs = max(c.n_heads * c.n_q for c in chunks) * top_k
    max_seg = max(c.n_heads // group for c in chunks) * n_blocks
    part_o = torch.empty(max_pairs * dim, dtype=torch.float32, device=device)
    part_ml = torch.empty(max_pairs * 2, dtype=torch.float32, device=device)
    keys = torch.empty(max_pairs, dtype=torch.int32, device=device)
    seg_off = torch.empty(max_seg + 1, dtype=torch.int64, device=device)
    tile_cum = torch.empty(max_seg + 1, dtype=torch.int64, device=device)

    fwd_name, merge_name = kernel_names(q.dtype, dim, block_size)
    smem = fwd_smem_bytes(dim, block_size)  # launch() opts the kernel into large shared memory
    unit_rows = rows_per_unit(dim, block_size)
    scale_log2 = scale * LOG2E
    for c in chunks:
        n_pairs = c.n_heads * c.n_q * top_k
        n_seg = (c.n_heads // group) * n_blocks
        keys_c = keys[:n_pairs]
        launch(SOURCE, "moba_attn_keys", (min(4096, math.ceil(n_pairs / 256)),), (256,),
               keys_args(topk, keys_c, seqlen, heads, top_k, n_blocks, c, group))
        # Stable: equal segment keys keep their (head, query, slot) order, so the lists are deterministic.
        sorted_keys, pairs = torch.sort(keys_c, stable=True)
        launch(SOURCE, "moba_attn_bounds", (min(4096, math.ceil((n_pairs + 1) / 256)),), (256,),
               bounds_args(sorted_keys, n_pairs, n_seg, seg_off))
        launch(SOURCE, "moba_attn_segments", (1,), (512,), segments_args(seg_off, n_seg, unit_rows, tile_cum))
        launch(SOURCE, fwd_name, (fwd_grid(n_pairs, n_seg, unit_rows),), (FWD_THREADS,),
               fwd_args(q, k, v, pairs, seg_off, tile_cum, part_o, part_ml, seqlen=seqlen, heads=heads,
                        kv_heads=kv_heads, top_k=top_k, block_size=block_size, n_blocks=n_blocks, chunk=c,
                        n_seg=n_seg, causal=causal, scale_log2=scale_log2),
               shared_mem=smem)
        warps = c.n_heads * c.n_q
        launch(SOURCE, merge_name, (math.ceil(warps / (MERGE_THREADS // 32)),), (MERGE_THREADS,),
               merge_args(part_o, part_ml, topk, out, lse, seqlen=seqlen, heads=heads, top_k=top_k,
                          n_blocks=n_blocks, chunk=c, write_lse=return_lse))
    if return_lse:
        return out, lse
    return out


# --------------------------------------------------------------------------------------------------
# torch oracle with given routing (tests and benchmark checks)


def indexed_attention_torch(q, k, v, topk, block_size: int, causal: bool = True, softmax_scale=None, *,
                            query_positions=None, low_precision: bool = False, max_bytes: int = 256 << 20):
    r"""Attention of each query over its routed blocks, by gathering the selected keys (no N x N mask).

    Same maths as :func:`mobalab.kernels.reference.moba_attention` but with the routing ``topk``
    (batch, seqlen, heads, top_k; -1 = unused) given, and only for ``query_positions`` (default: all).
    ``low_precision=False``: fp32 throughout (the oracle). ``low_precision=True``: the same computation as
    plain torch does it in the input dtype -- scores and P @ V as input-dtype matmuls, softmax in fp32,
    probabilities rounded to the input dtype -- whose error sets the tolerance scale for the kernel.
    Returns (out (batch, T, heads, d) fp32, lse (batch, T, heads) fp32).
    """
    batch, seqlen, heads, dim = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    scale = 1.0 / math.sqrt(dim) if softmax_scale is None else float(softmax_scale)
    device = q.device
    if query_positions is None:
        query_positions = torch.arange(seqlen, device=device)
    query_positions = torch.as_tensor(query_positions, device=device, dtype=torch.long)
    # Slots that are -1 everywhere (top_k > n) hold no keys: drop them (a host sync; this is an oracle).
    used = (topk >= 0).flatten(0, -2).any(0).nonzero()
    topk = topk[..., : int(used.max()) + 1] if used.numel() else topk[..., :1]
    top_k = topk.shape[-1]
    per_query = batch * heads * top_k * block_size * (dim * 2 + 8) * 4
    step = max(1, max_bytes // max(1, per_query))
    mm_dtype = q.dtype if low_precision else torch.float32
    kv_of = (torch.arange(heads, device=device) // group).view(1, 1, heads, 1)
    b_ix = torch.arange(batch, device=device).view(batch, 1, 1, 1)
    offs = torch.arange(block_size, device=device)
    outs, lses = [], []
    for i in range(0, query_positions.numel(), step):
        t = query_positions[i:i + step]
        sel = topk[:, t].long()  # (b, T, h, top_k)
        keys = (sel.unsqueeze(-1) * block_size + offs).flatten(-2)  # (b, T, h, top_k * B)
        ok = (sel >= 0).unsqueeze(-1).expand(*sel.shape, block_size).flatten(-2) & (keys < seqlen)
        if causal:
            ok &= keys <= t.view(1, -1, 1, 1)
        kc = keys.clamp(0, seqlen - 1)
        kg = k[b_ix, kc, kv_of].to(mm_dtype)  # (b, T, h, L, d)
        vg = v[b_ix, kc, kv_of].to(mm_dtype)
        qg = q[:, t].to(mm_dtype).unsqueeze(-2)  # (b, T, h, 1, d)
        s = (qg @ kg.transpose(-1, -2)).squeeze(-2).float() * scale
        s = s.masked_fill(~ok, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - lse.unsqueeze(-1))
        o = (p.to(mm_dtype).unsqueeze(-2) @ vg).squeeze(-2)
        outs.append(o.to(q.dtype).float() if low_precision else o.float())
        lses.append(lse)
    return torch.cat(outs, dim=1), torch.cat(lses, dim=1)
