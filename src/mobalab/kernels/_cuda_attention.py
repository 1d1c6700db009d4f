r"""MoBA attention forward on the GPU (cuda/attention.cu), organised key-block-major so that tensor-core tiles
are full (see docs/design.md, "Forward").

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

Two tile kernels (``variant``): *resident* (a CTA takes up to 4 tiles of one key block, loads the block's K
and V into shared memory once and gathers the next tile's queries while computing the current one; used when
K and V of a block fit in 64 KB, i.e. B <= 128 at d = 128 and B <= 256 at d = 64) and *streaming* (one
tile per CTA, K/V streamed in double-buffered 64-key sub-tiles; large blocks). ``"auto"`` picks resident when
it fits; the environment variable ``MOBALAB_ATTN_VARIANT`` sets the default, read at each call. A third,
variant, *wgmma* (cuda/attention_wgmma.cu), keeps the block resident too, on Hopper warpgroup MMAs, for head dim
128 and B in {32, 64, 128} on sm_90 GPUs only (two warpgroups on units of 16 tiles, the gathered rows three deep per
warpgroup, the next tile's S = Q K^T running under the current tile's partial writes): same partials and merge;
``"auto"`` takes it on an sm_90 GPU at B 64 and 128, and at B 32 from top_k G = 9 (G query heads per kv head). A
fourth, *wgmma-ws*, is its warp-specialised form (a producer warpgroup loading with cp.async and mbarriers, two
consumer warpgroups on the tiles of a unit, persistent CTAs: the grid is capped at the SM count), B in {64, 128},
opt-in.

Determinism: the lists come from a stable sort (equal keys keep their (head, query, slot) order: the counting
sort of cuda/pairs.cu, or ``torch.sort`` where ``$MOBALAB_PAIR_SORT`` is "torch" or a chunk has more segments
than it serves, both giving the same lists, see :mod:`mobalab.kernels._pairs`), every
partial is written by exactly one CTA, and the merge order is fixed, so two runs are bit-identical.

Partial format: o is stored in the input dtype (bf16 or fp16, rounded to nearest; the merge reads it back
to fp32 and accumulates in fp32), m and l in fp32: ``head_dim * 2 + 8`` bytes per (query, head, slot),
written once and read once. The environment variable ``MOBALAB_ATTN_PARTIAL`` ("16bit", the default, or
"fp32", read at each call) selects fp32 o instead (``head_dim * 4 + 8`` bytes), a separately compiled
module (``-DMOBA_PARTIAL_FP32=1``) with the same kernel names; lse depends on (m, l) only and is the same
under both. The work is cut into chunks
(one batch row, a group of kv heads with their query heads, a query range) whose scratch fits a byte
budget, and each chunk's query range stays long enough that lists fill tiles. Everything runs on torch's
current stream with torch-allocated memory and no host synchronisation. What each kernel receives is decided
by the plan functions (``*_launch``), plain Python that CI checks against the CUDA signatures.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from . import _contract as C
from . import _pairs
from ._build import device_capability as _device_capability
from ._build import on_device, sm_count
from ._cuda_routing import moba_topk_cuda
from ._launch import Launch, i32, i64, kernel_ready, launch

__all__ = ["moba_attention_cuda"]

SOURCE = "attention.cu"
WGMMA_SOURCE = "attention_wgmma.cu"  # the wgmma tile kernels (the merge and index kernels stay in SOURCE)
ROWS = 64  # rows per tile (MOBA_ROWS in attention.cuh)
TILES_PER_UNIT = 4  # tiles per CTA of the resident and wgmma-ws kernels (MOBA_TPC in attention.cuh)
WG_TILES_PER_UNIT = 16  # tiles per CTA of the wgmma kernel (MOBA_WG_TPC in attention_wgmma.cuh)
WG_THREADS = 256  # wgmma: two warpgroups (WG_THREADS in attention_wgmma.cuh)
WG_STAGES = 3  # wgmma: gathered Q tiles per warpgroup (WG_STAGES in attention_wgmma.cuh)
WG_STAGE_PITCH = 272  # wgmma: bytes per staged 16-bit partial row, 64 per warpgroup (WG_STAGE_PITCH there)
RESIDENT_SMEM_BYTES = 96 << 10  # per 128 threads: a resident CTA holds K + V of its block and two Q tiles
MERGE_THREADS = 256
INDEX_THREADS = 256  # moba_attn_keys / moba_attn_bounds
SEGMENT_THREADS = 512  # moba_attn_segments
MAX_INDEX_CTAS = 4096
LOG2E = 1.4426950408889634
MMA_VARIANTS = ("auto", "resident", "streaming")  # mma.sync kernels, every supported shape
WGMMA_VARIANTS = ("wgmma", "wgmma-ws")  # Hopper kernels (cuda/attention_wgmma.cu), opt-in
VARIANTS = (*MMA_VARIANTS, *WGMMA_VARIANTS)
WGMMA_HEAD_DIMS = (128,)
WGMMA_BLOCK_SIZES = (32, 64, 128)  # the wgmma kernel's
WS_BLOCK_SIZES = (64, 128)  # the wgmma-ws kernel's
# Where "auto" takes the wgmma kernel on an sm_90 GPU: measured on an H200 (d 128, k 8, causal; RESULTS.md) it was
# 1.20x faster than the mma.sync resident kernel at B 64 and 1.29-1.37x at B 128 (8K-64K), so both; at B 32 it was
# 0.90-0.92x (the resident kernel runs three CTAs per SM there), so B 32 keeps the resident kernel for short lists.
# A key block's list holds about k B G rows (G query heads per kv head), and the wgmma kernel's 16-tile units fill
# only with long lists: at B 32 (H100, the attention forward with the routing given, 16K and 64K) the crossing lies
# between k B G = 256 and 288 whatever G is. Without GQA the resident kernel stays 1.02x faster at k 8, the wgmma
# kernel is 1.01-1.03x faster at k 9, 1.07x at k 12, 1.13x at k 16, 1.17-1.19x at k 24 and 1.21x at k 32; with G 2
# 0.96-0.97x at k 4 (256), 1.025x at k 5 (320), 1.10-1.11x at k 8; with G 4 0.96x at k 2 (256), 1.03-1.05x at k 3
# (384), 1.07-1.09x at k 4, 1.15-1.17x at k 8. So B 32 takes it from k B G = 288.
# (head dim, B): "auto" takes wgmma there from top_k * B * G = this (0: at every top_k)
WGMMA_AUTO_MIN_KEYS = {(128, 64): 0, (128, 128): 0, (128, 32): 288}
WGMMA_ALIGN_BYTES = 1024  # the wgmma kernel aligns its swizzled tiles to 1024 bytes inside dynamic smem
WS_THREADS = 384  # wgmma-ws: a producer and two consumer warpgroups (WS_THREADS in attention_wgmma.cuh)
VARIANT_ENV = "MOBALAB_ATTN_VARIANT"
PARTIALS = ("16bit", "fp32")  # element type of the partial o: the input dtype, or fp32
PARTIAL_ENV = "MOBALAB_ATTN_PARTIAL"
# 640 MiB: a batch row of 16 heads at 16K with k 8 (593 MiB of 16-bit partials at head dim 128) is one chunk, so the
# forward's chunks are the backward's and it reads their lists as they are (no gather)
_MIN_BUDGET = 640 << 20
_MAX_BUDGET = 768 << 20
_BUDGET_FRACTION = 0.04  # of the bytes of q, k, v and out
# The forward alone may take more at long context (forward_scratch_budget): 18% of those bytes up to 3 GiB
_FWD_MAX_BUDGET = 3 << 30
_FWD_BUDGET_FRACTION = 0.18


@dataclass(frozen=True)
class Chunk:
    """Work unit: batch row ``batch_index``, query heads ``h0 .. h0+n_heads``, queries ``t0 .. t0+n_q``."""

    batch_index: int
    h0: int
    n_heads: int
    t0: int
    n_q: int


# --------------------------------------------------------------------------------------------------
# sizes and plans (pure)


def resolve_partial(partial: str | None) -> str:
    """The partial format: ``partial``, or the ``MOBALAB_ATTN_PARTIAL`` environment variable (default
    "16bit") when None."""
    return C.choice_or_env("partial format", partial, PARTIALS, PARTIAL_ENV, "16bit")


def partial_elem_bytes(partial: str) -> int:
    """Bytes of one element of the partial o: 2 (the input dtype) or 4 (fp32)."""
    return 4 if resolve_partial(partial) == "fp32" else 2


def partial_dtype(dtype: torch.dtype, partial: str) -> torch.dtype:
    """torch dtype of the partial o for inputs of ``dtype``."""
    return torch.float32 if resolve_partial(partial) == "fp32" else dtype


def partial_defines(partial: str) -> tuple[str, ...]:
    """Preprocessor defines of the attention module for the partial format (none for the default)."""
    return ("MOBA_PARTIAL_FP32=1",) if resolve_partial(partial) == "fp32" else ()


def bytes_per_pair(head_dim: int, partial: str = "16bit") -> int:
    """Scratch per (query, head, slot): partial o, (m, l) in fp32, segment key, sorted key, sort index, temp."""
    return head_dim * partial_elem_bytes(partial) + 8 + 4 + 4 + 8 + 16


def default_scratch_budget(batch: int, seqlen: int, heads: int, kv_heads: int, head_dim: int,
                           elem_bytes: int = 2) -> int:
    """Scratch budget: 4% of the q, k, v and out bytes, clamped to [640 MiB, 768 MiB]."""
    io = _io_bytes(batch, seqlen, heads, kv_heads, head_dim, elem_bytes)
    return int(min(_MAX_BUDGET, max(_MIN_BUDGET, _BUDGET_FRACTION * io)))


def _io_bytes(batch: int, seqlen: int, heads: int, kv_heads: int, head_dim: int, elem_bytes: int) -> int:
    """Bytes of q, k, v and out."""
    return batch * seqlen * (2 * heads + 2 * kv_heads) * head_dim * elem_bytes


def forward_scratch_budget(batch: int, seqlen: int, heads: int, kv_heads: int, head_dim: int,
                           elem_bytes: int = 2) -> int:
    """The forward's scratch budget: :func:`default_scratch_budget` (the backward's), or 18% of the q, k, v and out
    bytes up to 3 GiB where that is more (from ~128K tokens of 16 heads at d 128). Fewer, larger chunks cost the
    tile kernel and the merge fewer launch tails and fill more of each key block's tiles: at 512K (batch 2, 16 heads,
    d 128, B 128, k 8; H100) chunks of two whole heads took the forward's tiles, merges and lists ~2 ms less than
    chunks of half a head's queries (768 MiB), and they are the backward's chunks, so it reads the kept lists as
    they are. The scratch is the forward's only and is freed before the backward's peak."""
    io = _io_bytes(batch, seqlen, heads, kv_heads, head_dim, elem_bytes)
    base = default_scratch_budget(batch, seqlen, heads, kv_heads, head_dim, elem_bytes)
    return max(base, int(min(_FWD_MAX_BUDGET, _FWD_BUDGET_FRACTION * io)))


def plan_chunks(batch: int, seqlen: int, heads: int, kv_heads: int, head_dim: int, top_k: int,
                budget_bytes: int, partial: str = "16bit") -> list[Chunk]:
    """Split (batch, heads, queries) into chunks whose scratch (:func:`bytes_per_pair` of the ``partial``
    format per (query, head, slot)) fits ``budget_bytes``.

    A chunk holds whole kv groups (so every tile shares one kv head) and, when a full sequence does not
    fit, one kv group and an even share of the queries (long ranges keep tiles full).
    """
    return list(_plan_chunks(batch, seqlen, heads, kv_heads, head_dim, top_k, budget_bytes, partial))


@functools.lru_cache(maxsize=256)  # a training step asks for the same plans several times, on the host's hot path
def _plan_chunks(batch, seqlen, heads, kv_heads, head_dim, top_k, budget_bytes, partial) -> tuple[Chunk, ...]:
    group = heads // kv_heads
    per_query = group * top_k * bytes_per_pair(head_dim, partial)  # one query position of one kv group
    max_q = max(1, budget_bytes // per_query)
    # the kernels decode a chunk's pair ids p = (hc * n_q + tt) * top_k + slot in 32-bit arithmetic (pair_query_head):
    # a budget large enough for 2^31 pairs (hundreds of GB of scratch) still gets chunks below it
    max_q = min(max_q, (2**31 - 1) // (group * top_k))
    chunks = []
    if max_q >= seqlen:
        # as few chunks as fit, of even sizes (16 groups at 3 per chunk: 3, 3, 3, 3, 2, 2 rather than ..., 3, 1):
        # a small last chunk is a launch of a few waves whose tail the others do not share
        n_chunks = math.ceil(kv_heads / max(1, min(kv_heads, max_q // seqlen)))
        sizes = [kv_heads // n_chunks + (i < kv_heads % n_chunks) for i in range(n_chunks)]
        for b in range(batch):
            g0 = 0
            for n_kv in sizes:
                chunks.append(Chunk(b, g0 * group, n_kv * group, 0, seqlen))
                g0 += n_kv
    else:
        n_t = math.ceil(seqlen / max_q)
        n_q = math.ceil(seqlen / n_t)
        for b in range(batch):
            for g0 in range(kv_heads):
                for t0 in range(0, seqlen, n_q):
                    chunks.append(Chunk(b, g0 * group, group, t0, min(n_q, seqlen - t0)))
    return tuple(chunks)


def wgmma_block_sizes(variant: str = "wgmma") -> tuple[int, ...]:
    """The block sizes a Hopper tile kernel ("wgmma" or "wgmma-ws") is instantiated for."""
    return WS_BLOCK_SIZES if variant == "wgmma-ws" else WGMMA_BLOCK_SIZES


def wgmma_supports(head_dim: int, block_size: int, variant: str = "wgmma") -> bool:
    """Whether the Hopper tile kernel ``variant`` ("wgmma" or "wgmma-ws") has an instantiation for this head dim and
    block size."""
    return head_dim in WGMMA_HEAD_DIMS and block_size in wgmma_block_sizes(variant)


def resolve_variant(variant: str | None, head_dim: int | None = None, block_size: int | None = None) -> str:
    """The tile-kernel choice: ``variant``, or the ``MOBALAB_ATTN_VARIANT`` environment variable (default
    "auto") when None. With ``head_dim`` and ``block_size`` given, "wgmma" and "wgmma-ws" are refused
    (ValueError) for shapes they have no kernel for."""
    variant = C.choice_or_env("variant", variant, VARIANTS, VARIANT_ENV, "auto")
    if variant in WGMMA_VARIANTS and head_dim is not None and block_size is not None \
            and not wgmma_supports(head_dim, block_size, variant):
        raise ValueError(f"variant {variant!r} supports head_dim in {WGMMA_HEAD_DIMS} and block_size in "
                         f"{wgmma_block_sizes(variant)}, got head_dim={head_dim}, block_size={block_size}; use "
                         f"'auto', 'resident' or 'streaming'")
    return variant


def key_tile(block_size: int) -> int:
    """Keys per inner step: the whole block when it is small, else 64 (every supported B is a multiple)."""
    return min(block_size, 64)


def fwd_threads(head_dim: int, variant: str | None = None) -> int:
    """Threads of the tile kernels: head dim 256 splits the output columns over warp pairs (8 warps); the
    wgmma kernel (``variant`` "wgmma", given explicitly) runs two warpgroups, its warp-specialised form
    ("wgmma-ws") three."""
    if variant == "wgmma-ws":
        return WS_THREADS
    if variant == "wgmma":
        return WG_THREADS
    return 256 if head_dim == 256 else 128


def resident(head_dim: int, block_size: int, variant: str | None = None) -> bool:
    """Whether the resident tile kernel runs: the block's K and V and two Q tiles fit in the shared memory
    budget of its CTA, 96 KiB per 128 threads (or it is forced)."""
    variant = resolve_variant(variant, head_dim, block_size)
    if variant in WGMMA_VARIANTS:
        return False  # a kernel of its own (kernel_names); it keeps the block resident too (rows_per_unit)
    need = 2 * block_size * head_dim * 2 + 2 * ROWS * head_dim * 2
    fits = need <= RESIDENT_SMEM_BYTES * fwd_threads(head_dim) // 128
    return fits if variant == "auto" else (variant == "resident" and fits)


def rows_per_unit(head_dim: int, block_size: int, variant: str | None = None) -> int:
    """Rows one CTA of the tile kernel handles: a tile, or a resident unit of tiles: TILES_PER_UNIT (the resident
    and the wgmma-ws kernels) or WG_TILES_PER_UNIT (the wgmma kernel)."""
    variant = resolve_variant(variant, head_dim, block_size)
    if variant == "wgmma":
        return ROWS * WG_TILES_PER_UNIT
    if variant == "wgmma-ws":
        return ROWS * TILES_PER_UNIT
    return ROWS * (TILES_PER_UNIT if resident(head_dim, block_size, variant) else 1)


def device_variant(variant: str, head_dim: int, block_size: int, device, top_k: int | None = None,
                   group: int = 1) -> str:
    """``variant`` (resolved) on ``device``: "auto" becomes "wgmma" on an sm_90 GPU at the shapes of
    WGMMA_AUTO_MIN_KEYS where ``top_k * block_size * group`` (the rows of a key block's list per kv head, ``group``
    query heads per kv head) reaches the shape's bound (``top_k`` None: only a bound of 0)."""
    if variant != "auto" or device is None or torch.device(device).type != "cuda":
        return variant
    min_keys = WGMMA_AUTO_MIN_KEYS.get((head_dim, block_size))
    wanted = min_keys is not None and (top_k or 0) * block_size * group >= min_keys
    return "wgmma" if wanted and _device_capability(device) == (9, 0) else variant


def variant_label(head_dim: int, block_size: int, variant: str | None = None, device=None,
                  top_k: int | None = None, group: int = 1) -> str:
    """The tile kernel that runs (on ``device``, with ``top_k`` and ``group`` query heads per kv head, where given),
    in words: "wgmma", "wgmma-ws", "resident" or "streaming"."""
    variant = device_variant(resolve_variant(variant, head_dim, block_size), head_dim, block_size, device, top_k,
                             group)
    if variant in WGMMA_VARIANTS:
        return variant
    return "resident" if resident(head_dim, block_size, variant) else "streaming"


def fwd_source(head_dim: int, block_size: int, variant: str | None = None) -> str:
    """The source file of the tile kernel (the merge kernel is always in SOURCE)."""
    return WGMMA_SOURCE if resolve_variant(variant, head_dim, block_size) in WGMMA_VARIANTS else SOURCE


def kernel_names(dtype: torch.dtype, head_dim: int, block_size: int,
                 variant: str | None = None) -> tuple[str, str]:
    """(forward tile kernel, merge kernel) names of the variant for these inputs."""
    tag = C.dtype_tag(dtype, SOURCE)
    variant = resolve_variant(variant, head_dim, block_size)
    merge = f"moba_attn_merge_{tag}_d{head_dim}"
    if variant == "wgmma":
        return f"moba_attn_wg_{tag}_d{head_dim}_b{block_size}", merge
    if variant == "wgmma-ws":  # fewer block sizes than wgmma: a name template of its own
        return f"moba_attn_wgws_{tag}_d{head_dim}_b{block_size}", merge
    kind = "res" if resident(head_dim, block_size, variant) else "fwd"
    fwd = f"moba_attn_{kind}_{tag}_d{head_dim}_kt{key_tile(block_size)}"
    return fwd, merge


def fwd_smem_bytes(head_dim: int, block_size: int, variant: str | None = None) -> int:
    """Dynamic shared memory of the tile kernel.

    Streaming: a Q tile + double-buffered K and V sub-tiles. Resident: the block's K and V + two Q tiles.
    wgmma: the block's K and V and WG_STAGES Q tiles per warpgroup (128-byte swizzled), each warpgroup's 64 staged
    partial rows, plus 1024 bytes to align them. wgmma-ws: two K / V buffers
    (the unit being computed and the next one) and a Q slot per tile of a unit, plus the 1024 bytes.
    """
    variant = resolve_variant(variant, head_dim, block_size)
    if variant == "wgmma":
        return (2 * block_size * head_dim * 2 + 2 * WG_STAGES * ROWS * head_dim * 2 + 2 * ROWS * WG_STAGE_PITCH
                + WGMMA_ALIGN_BYTES)
    if variant == "wgmma-ws":
        return 2 * 2 * block_size * head_dim * 2 + TILES_PER_UNIT * ROWS * head_dim * 2 + WGMMA_ALIGN_BYTES
    if resident(head_dim, block_size, variant):
        return 2 * block_size * head_dim * 2 + 2 * ROWS * head_dim * 2
    return ROWS * head_dim * 2 + 4 * key_tile(block_size) * head_dim * 2


def fwd_grid(n_pairs: int, n_seg: int, rows: int = ROWS) -> int:
    """Upper bound on the CTAs (units of ``rows`` rows) of a chunk: each non-empty segment wastes < 1 unit."""
    return max(1, math.ceil(n_pairs / rows) + min(n_seg, n_pairs))


# --------------------------------------------------------------------------------------------------
# launch plans (pure: the CPU tests pass them through _launch.check_args)


def keys_launch(topk, keys, seqlen, heads, top_k, n_blocks, chunk: Chunk, group) -> Launch:
    """Segment key of every (head, query, slot) pair of the chunk: (kv head in chunk) * n_blocks + block."""
    n_pairs = chunk.n_heads * chunk.n_q * top_k
    args = (topk, keys, i32(seqlen), i32(heads), i32(top_k), i32(n_blocks),
            i32(chunk.batch_index), i32(chunk.h0), i32(chunk.n_heads), i32(chunk.t0),
            i32(chunk.n_q), i32(group))
    return Launch(SOURCE, "moba_attn_keys", (min(MAX_INDEX_CTAS, math.ceil(n_pairs / INDEX_THREADS)),),
                  (INDEX_THREADS,), args)


def bounds_launch(sorted_keys, n_pairs, n_seg, seg_off) -> Launch:
    """Segment offsets from the sorted keys."""
    args = (sorted_keys, i64(n_pairs), i32(n_seg), seg_off)
    return Launch(SOURCE, "moba_attn_bounds", (min(MAX_INDEX_CTAS, math.ceil((n_pairs + 1) / INDEX_THREADS)),),
                  (INDEX_THREADS,), args)


def segments_launch(seg_off, n_seg, rows_per_unit, tile_cum) -> Launch:
    """Cumulative work units per segment (one CTA)."""
    args = (seg_off, i32(n_seg), i32(rows_per_unit), tile_cum)
    return Launch(SOURCE, "moba_attn_segments", (1,), (SEGMENT_THREADS,), args)


def build_pair_lists(topk, keys, scratch, c: Chunk, *, seqlen, heads, top_k, n_blocks, group, seg_off, tile_cum,
                     rows_per_unit, with_keys, pairs_out=None):
    """Launch the index building of chunk ``c``: the key-block-major lists ``pairs`` (int64 pair indices in
    stable key order), ``seg_off`` and, unless ``tile_cum`` is None, ``tile_cum``; returns (pairs, sorted keys),
    the sorted keys only ``with_keys`` (else None; the torch path returns them anyway).

    ``scratch`` (:func:`mobalab.kernels._pairs.counting_scratch`, or None for the torch path) selects the
    counting sort where the chunk fits it; ``keys`` holds an int32 per pair (the torch path's keys, the counting
    sort's sorted keys), or is None for one allocated here when needed. Both paths give the same lists pair for
    pair. ``pairs_out`` (int64, the chunk's pair count): the lists are written there (and returned) instead of
    into the scratch.
    """
    n_pairs = c.n_heads * c.n_q * top_k
    n_seg = (c.n_heads // group) * n_blocks
    counting = scratch is not None and _pairs.counting_supported(n_pairs, n_seg, topk.device)
    if keys is None and (with_keys or not counting):
        keys = torch.empty(n_pairs, dtype=torch.int32, device=topk.device)
    if counting:
        pairs = scratch.pairs[:n_pairs] if pairs_out is None else pairs_out
        sorted_keys = keys[:n_pairs] if with_keys else None
        for plan in _pairs.counting_launches(
                topk, scratch.counts, scratch.seg_total, scratch.ticket, pairs,
                0 if sorted_keys is None else sorted_keys, seg_off, 0 if tile_cum is None else tile_cum,
                seqlen=seqlen, heads=heads, top_k=top_k, n_blocks=n_blocks, chunk=c, group=group,
                rows_per_unit=rows_per_unit, radix=scratch.radix):
            launch(plan)
        return pairs, sorted_keys
    keys_c = keys[:n_pairs]
    launch(keys_launch(topk, keys_c, seqlen, heads, top_k, n_blocks, c, group))
    # Stable: equal segment keys keep their (head, query, slot) order, so the lists are deterministic.
    sorted_keys, pairs = torch.sort(keys_c, stable=True)
    launch(bounds_launch(sorted_keys, n_pairs, n_seg, seg_off))
    if tile_cum is not None:
        launch(segments_launch(seg_off, n_seg, rows_per_unit, tile_cum))
    if pairs_out is not None:
        pairs = pairs_out.copy_(pairs)
    return pairs, sorted_keys


def kept_lists_layout(chunks, top_k: int, n_blocks: int, group: int) -> tuple[list[tuple[int, int, int, int]], int]:
    """Where each chunk's key-block lists sit in the one int64 tensor the forward keeps for the backward
    (``keep_lists``): per chunk (pairs offset, pair count, seg_off offset, segment count), and the total length
    (each chunk's pairs, then its n_seg + 1 segment offsets)."""
    layout, off = [], 0
    for c in chunks:
        n_pairs = c.n_heads * c.n_q * top_k
        n_seg = (c.n_heads // group) * n_blocks
        layout.append((off, n_pairs, off + n_pairs, n_seg))
        off += n_pairs + n_seg + 1
        off += off % 2  # each chunk's lists 16-byte aligned
    return layout, off


def pair_scratch(max_pairs, max_seg, device, sort=None, with_pairs: bool = True):
    """Counting-sort scratch when the pair sort (:func:`mobalab.kernels._pairs.resolve_sort`; None: the
    ``MOBALAB_PAIR_SORT`` environment variable) is "counting" and serves chunks of ``max_pairs`` pairs and
    ``max_seg`` segments, else None (the torch path). ``with_pairs`` False: no pair buffer (every chunk writes its
    lists to a ``pairs_out`` of its own)."""
    if _pairs.resolve_sort(sort) != "counting" or not _pairs.counting_supported(max_pairs, max_seg, device):
        return None
    return _pairs.counting_scratch(max_pairs, max_seg, device, with_pairs=with_pairs)


def _check_part_o(fn, part_o, dtype, partial):
    """part_o must hold the elements the module of ``partial`` writes (an address is taken as is)."""
    want = partial_dtype(dtype, partial)
    if hasattr(part_o, "dtype") and part_o.dtype != want:
        raise ValueError(f"{fn}: part_o has dtype {part_o.dtype}, the {partial!r} partial format of "
                         f"{dtype} inputs needs {want}")


def fwd_launch(name, q, k, v, pairs, seg_off, tile_cum, part_o, part_ml, *, seqlen, heads, kv_heads, top_k,
               block_size, n_blocks, chunk: Chunk, n_pairs, n_seg, causal, scale_log2, rows_per_unit,
               smem, partial, source=SOURCE, threads=None, max_ctas=None) -> Launch:
    """The tile kernel ``name`` of ``cuda/<source>`` (:func:`fwd_source`) over the chunk's segments: partial
    (o, m, l) per (query, head, slot), o in the ``partial`` format (its module's defines). ``threads``:
    :func:`fwd_threads` of the variant (None: of the mma kernels); ``max_ctas`` caps the grid (the persistent
    wgmma-ws kernel loops over the units itself; None: one CTA per unit)."""
    partial = resolve_partial(partial)
    _check_part_o("fwd_launch", part_o, q.dtype, partial)
    args = (q, k, v, pairs, seg_off, tile_cum, part_o, part_ml, i32(seqlen), i32(heads),
            i32(kv_heads), i32(top_k), i32(block_size), i32(n_blocks),
            i32(chunk.batch_index), i32(chunk.h0), i32(chunk.n_q), i32(chunk.t0),
            i32(n_seg), i32(1 if causal else 0), np.float32(scale_log2))
    grid = fwd_grid(n_pairs, n_seg, rows_per_unit)
    if max_ctas is not None:
        grid = max(1, min(grid, max_ctas))
    threads = fwd_threads(q.shape[-1]) if threads is None else threads
    return Launch(source, name, (grid,), (threads,), args, shared_mem=smem, defines=partial_defines(partial))


#: merge output modes (attention.cuh, merge_rows): out in the input dtype; fp32 (out, lse) stored; folded in
MERGE_OUT, MERGE_STORE, MERGE_FOLD = 0, 1, 2


def merge_launch(name, part_o, part_ml, topk, out, lse, *, seqlen, heads, top_k, n_blocks, chunk: Chunk,
                 write_lse, partial, out_mode: int = MERGE_OUT) -> Launch:
    """Merge of each (query, head)'s slot partials (o in the ``partial`` format) into out (and lse), one warp
    per row; with ``out_mode`` MERGE_STORE / MERGE_FOLD into fp32 ``out`` and ``lse`` (stored, or folded into
    what they hold by log-sum-exp)."""
    partial = resolve_partial(partial)
    if out_mode == MERGE_OUT:  # (fp32 out does not tell the input dtype; the kernel name does)
        _check_part_o("merge_launch", part_o, out.dtype, partial)
    args = (part_o, part_ml, topk, out, lse, i32(seqlen), i32(heads), i32(top_k),
            i32(n_blocks), i32(chunk.batch_index), i32(chunk.h0), i32(chunk.n_heads),
            i32(chunk.t0), i32(chunk.n_q), i32(1 if write_lse else 0), i32(out_mode))
    warps = chunk.n_heads * chunk.n_q
    return Launch(SOURCE, name, (math.ceil(warps / (MERGE_THREADS // 32)),), (MERGE_THREADS,), args,
                  defines=partial_defines(partial))


# --------------------------------------------------------------------------------------------------
# the wrapper


def moba_attention_cuda(q, k, v, block_size: int, top_k: int, causal: bool = True, softmax_scale=None,
                        return_lse: bool = False, topk_indices=None, *, variant: str | None = None,
                        scratch_budget_bytes: int | None = None, into=None, fold: bool = False,
                        keep_lists: bool = False, centroid_precision: str = "fp32"):
    """MoBA attention forward on CUDA tensors; contract of :func:`mobalab.kernels.reference.moba_attention`.

    ``q`` (batch, seqlen, heads, d), ``k``/``v`` (batch, seqlen, kv_heads, d), bf16 or fp16, d in CUDA_HEAD_DIMS;
    ``block_size`` in {16, 32, 64, 128, 256, 512}; ``top_k`` in 1..64. ``topk_indices`` (int32 or int64 (batch,
    seqlen, heads, top_k), -1 = unused slot) skips routing; its values are not checked (that would wait for the
    GPU): any index outside 0 .. n_blocks - 1 counts as an unused slot, where the reference
    (:func:`mobalab.kernels.reference.moba_attention_given_routing`) refuses it.
    ``variant`` picks the tile kernel ("auto", "resident",
    "streaming", or "wgmma" (head dim 128, B 32, 64 or 128) / "wgmma-ws" (B 64 or 128): sm_90 GPUs; None:
    ``$MOBALAB_ATTN_VARIANT``, default "auto": wgmma on sm_90 GPUs at head dim 128, B 64 or 128 (B 32 from top_k
    times query heads per kv head = 9), else the mma.sync kernels); the partial format is ``$MOBALAB_ATTN_PARTIAL``
    ("16bit", default, or "fp32"); ``scratch_budget_bytes`` bounds the per-chunk scratch (None:
    :func:`forward_scratch_budget`). Returns ``out`` in q's dtype and, with ``return_lse``, the natural-log ``lse``
    (batch, seqlen, heads) in fp32.

    ``into`` (out, lse), contiguous fp32 tensors of shapes (batch, seqlen, heads, d) and (batch, seqlen,
    heads): the result is stored there in fp32 instead, or with ``fold`` combined by log-sum-exp with the
    (out, lse) they hold, which is how attention over several key sets adds up (context parallelism); returns
    ``into``.

    ``keep_lists`` (with ``return_lse``, not with ``into``): also return the key-block lists the forward built,
    as one int64 tensor laid out by :func:`kept_lists_layout` over the forward's chunks, for a backward that
    runs over the same chunks (:mod:`mobalab.kernels._cuda_backward` then skips building them again).

    ``centroid_precision``: the routing's centroids when ``topk_indices`` is None, "fp32" or "input"
    (:func:`mobalab.kernels.reference.moba_topk`).
    """
    fn = "moba_attention_cuda"
    C.check_inputs(fn, q, k, v, path="cuda")
    block_size = C.check_block_size(fn, block_size, "cuda")
    top_k = C.check_top_k(fn, top_k, "cuda")
    causal = C.check_flag(fn, "causal", causal)
    return_lse = C.check_flag(fn, "return_lse", return_lse)
    scale = C.check_softmax_scale(fn, softmax_scale, q.shape[-1])
    centroid_precision = C.check_centroid_precision(fn, centroid_precision)
    if topk_indices is not None:
        C.check_topk_indices(fn, topk_indices, q, top_k)
    try:
        variant = resolve_variant(variant, q.shape[-1], block_size)
    except ValueError as exc:
        raise ValueError(f"{fn}: {exc}") from None
    partial = resolve_partial(None)
    if scratch_budget_bytes is not None:
        scratch_budget_bytes = C.check_positive_int(fn, "scratch_budget_bytes", scratch_budget_bytes)
    if into is not None:
        C.check_into(fn, into, ("out", "lse"), (q.shape, q.shape[:3]), q.device)
    fold = C.check_flag(fn, "fold", fold)
    if fold and into is None:
        raise ValueError(f"{fn}: fold=True combines the result with the (out, lse) that into holds: it needs into=")
    keep_lists = C.check_flag(fn, "keep_lists", keep_lists)
    if keep_lists and (into is not None or not return_lse):
        raise ValueError(f"{fn}: keep_lists=True returns (out, lse, lists): it needs return_lse=True and no into=")
    C.check_cuda_device(fn, q)
    variant = tile_variant(fn, variant, q, k, block_size, top_k)
    with on_device(q.device):
        return _forward(q, k, v, block_size, top_k, causal, scale, return_lse, topk_indices, variant,
                        scratch_budget_bytes, partial, into, fold, keep_lists, centroid_precision)


def check_variant_device(fn: str, variant: str, device) -> None:
    """The wgmma tile kernels run on sm_90 GPUs only."""
    if variant in WGMMA_VARIANTS and _device_capability(device) != (9, 0):
        raise ValueError(f"{fn}: variant {variant!r} needs an sm_90 (Hopper) GPU, got compute capability "
                         f"{_device_capability(device)}")


def tile_variant(fn: str, variant: str, q, k, block_size: int, top_k: int) -> str:
    """The tile kernel that runs for these inputs: ``variant`` (resolved) refused where q's device cannot run it
    (:func:`check_variant_device`), "auto" made concrete there by :func:`device_variant` with q's query heads per kv
    head."""
    check_variant_device(fn, variant, q.device)
    return device_variant(variant, q.shape[-1], block_size, q.device, top_k, q.shape[2] // k.shape[2])


def forward_checked(q, k, v, block_size: int, top_k: int, causal: bool, scale: float, topk, keep_lists: bool):
    """(out, lse[, lists]) of :func:`moba_attention_cuda` given the routing ``topk`` (int32) for inputs it would
    accept, on q's device (the current one), the variant and the partial format from the environment: the
    forward of a training step, whose entry has checked the inputs."""
    variant = tile_variant("moba_attention_cuda", resolve_variant(None, q.shape[-1], block_size), q, k, block_size,
                           top_k)
    return _forward(q, k, v, block_size, top_k, causal, scale, True, topk, variant, None, resolve_partial(None), None,
                    False, keep_lists)


def _forward(q, k, v, block_size, top_k, causal, scale, return_lse, topk_indices, variant, budget, partial,
             into, fold, keep_lists=False, centroid_precision="fp32"):
    q, k, v = kernel_ready(q), kernel_ready(k), kernel_ready(v)
    batch, seqlen, heads, dim = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    n_blocks = math.ceil(seqlen / block_size)
    if topk_indices is None:
        topk = moba_topk_cuda(q, k, block_size, top_k, causal=causal, centroid_precision=centroid_precision)
    else:
        topk = topk_indices
    topk = topk.to(torch.int32).contiguous()

    device = q.device
    if into is not None:
        (out, lse), out_mode = into, (MERGE_FOLD if fold else MERGE_STORE)
    else:
        out, out_mode = torch.empty_like(q), MERGE_OUT
        lse = torch.empty((batch, seqlen, heads) if return_lse else (1,), dtype=torch.float32, device=device)

    if budget is None:
        budget = forward_scratch_budget(batch, seqlen, heads, kv_heads, dim, q.element_size())
    chunks = plan_chunks(batch, seqlen, heads, kv_heads, dim, top_k, budget, partial)
    max_pairs = max(c.n_heads * c.n_q for c in chunks) * top_k
    max_seg = max(c.n_heads // group for c in chunks) * n_blocks
    part_o = torch.empty(max_pairs * dim, dtype=partial_dtype(q.dtype, partial), device=device)
    part_ml = torch.empty(max_pairs * 2, dtype=torch.float32, device=device)
    # tile_cum, and seg_off unless the kept lists hold it, in one allocation
    i64 = torch.empty((max_seg + 1) * (1 if keep_lists else 2), dtype=torch.int64, device=device)
    tile_cum = i64[:max_seg + 1]
    scratch = pair_scratch(max_pairs, max_seg, device, with_pairs=not keep_lists)
    if keep_lists:  # every chunk's seg_off is a view of the kept lists
        layout, total = kept_lists_layout(chunks, top_k, n_blocks, group)
        lists = torch.empty(total, dtype=torch.int64, device=device)
    else:
        seg_off = i64[max_seg + 1:]

    fwd_name, merge_name = kernel_names(q.dtype, dim, block_size, variant)
    smem = fwd_smem_bytes(dim, block_size, variant)  # launch() opts the kernel into large shared memory
    unit_rows = rows_per_unit(dim, block_size, variant)
    # the persistent kernel: one CTA per SM (its shared memory and 384 threads allow one), each looping over units
    max_ctas = sm_count(device.index) if variant == "wgmma-ws" else None
    scale_log2 = scale * LOG2E
    for i, c in enumerate(chunks):
        n_pairs = c.n_heads * c.n_q * top_k
        n_seg = (c.n_heads // group) * n_blocks
        pairs_out = None
        if keep_lists:
            p0, _, s0, _ = layout[i]
            pairs_out, seg_off = lists[p0:p0 + n_pairs], lists[s0:s0 + n_seg + 1]
        pairs, _ = build_pair_lists(topk, None, scratch, c, seqlen=seqlen, heads=heads, top_k=top_k,
                                    n_blocks=n_blocks, group=group, seg_off=seg_off, tile_cum=tile_cum,
                                    rows_per_unit=unit_rows, with_keys=False, pairs_out=pairs_out)
        launch(fwd_launch(fwd_name, q, k, v, pairs, seg_off, tile_cum, part_o, part_ml, seqlen=seqlen, heads=heads,
                          kv_heads=kv_heads, top_k=top_k, block_size=block_size, n_blocks=n_blocks, chunk=c,
                          n_pairs=n_pairs, n_seg=n_seg, causal=causal, scale_log2=scale_log2,
                          rows_per_unit=unit_rows, smem=smem, partial=partial,
                          source=fwd_source(dim, block_size, variant), threads=fwd_threads(dim, variant),
                          max_ctas=max_ctas))
        launch(merge_launch(merge_name, part_o, part_ml, topk, out, lse, seqlen=seqlen, heads=heads, top_k=top_k,
                            n_blocks=n_blocks, chunk=c, write_lse=return_lse, partial=partial, out_mode=out_mode))
    if into is not None:
        return into
    if keep_lists:
        return out, lse, lists
    if return_lse:
        return out, lse
    return out
