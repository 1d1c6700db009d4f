r"""MoBA attention backward on the GPU (cuda/attention_bwd.cu), with recomputation and no N x N or N x n buffer.

The equations of :func:`mobalab.kernels.reference.moba_attention_backward` (see docs/design.md, "Backward"):

.. math::
    D_t = \textstyle\sum_c dO_{t,c}\, O_{t,c} - d\mathrm{lse}_t, \qquad
    P = e^{\sigma q k^\top - \mathrm{lse}}, \qquad dV_j \mathrel{+}= P^\top dO, \qquad
    dS = P \circ (dO\, V_j^\top - D), \qquad dK_j \mathrel{+}= \sigma\, dS^\top Q, \qquad
    dQ \mathrel{+}= \sigma\, dS\, K_j ,

per (kv head, 64-key sub-tile of key block j) over the (query, head) rows that selected j, gathered in
tiles of 64 (so tensor-core tiles are full), with the forward's key-block lists (cuda/attention.cu's index
kernels); GQA sums dK/dV over the query heads of a kv head because one kv head's rows come from all of its
query heads. Routing is hard: no gradient reaches centroids or scores.

Determinism. ``deterministic=False`` (default) adds each tile's dQ contribution to an fp32
(batch, seqlen, heads, d) accumulator with float atomics (on the "wgmma" kernel with bf16 inputs straight into
the bf16 dQ, :func:`dq_accumulates_in_input_type`): the order of additions, hence the last bits of
dQ, can change from run to run (dK and dV are always bit-reproducible: each element has one writer).
``deterministic=True`` writes per-(query, head, slot) fp32 partials instead (key sub-tiles of one block in
separate launches, in order) and a merge sums the slots in slot order: bit-identical gradients run to run,
at the cost of ``4 d`` bytes of scratch per (query, head, slot) (bounded by chunking), extra traffic and
less overlap (the sub-tile launches of a block run one after another, so a very long key-block list is
waited for once per sub-tile): on the benchmark the deterministic fwd+bwd took 1.5x (d = 64) to 5x
(clustered routing, B = 128) the default's time.

Variants of the main kernel (``$MOBALAB_BWD_VARIANT``, read at each call, or the ``variant`` argument): "tile"
(a CTA of 4 warps per 64 keys, each warp owning 16 keys of dK and dV), "block" (a CTA of 8 warps per 128 keys
with 32 x 32 warp tiles decoupled from the dK / dV ownership, cuda/attention_bwd_block.cuh; head dims 64 and
128, block sizes that are multiples of 128), "wgmma" ("block"'s work units on Hopper warpgroup MMAs, two
warpgroups per 128 keys, cuda/attention_bwd_wgmma.cu; sm_90 GPUs, head dim 128, block sizes that are multiples of
128) and "auto" (the default: "wgmma" on sm_90 GPUs where it has a kernel, else "block" at head dim 128 where it
has a kernel, else "tile"). All compute the same sums; "block" is the tiling of FlashMoBA's backward, which issues
fewer instructions per MMA. On an H200 "block" measured 1.12-1.18x faster than "tile" at d 128 and 0.99x at d 64,
where "tile" keeps three CTAs per SM, and "wgmma" 1.33x faster than "block" (16K, d 128; its first form 1.18-1.19x
at 8K-64K; RESULTS.md; docs/design.md, "Backward").
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from . import _contract as C
from . import _cuda_attention as A
from . import _pairs
from ._build import device_capability, on_device, sm_count
from ._launch import Launch, i32, i64, kernel_ready, launch

__all__ = ["moba_attention_backward_cuda"]

SOURCE = "attention_bwd.cu"
WGMMA_SOURCE = "attention_bwd_wgmma.cu"  # the wgmma main kernels (delta and dQ merge stay in SOURCE)
ROWS = 64  # gathered rows per tile (MOBA_BWD_ROWS)
KEYS = 64  # keys per CTA (MOBA_BWD_KEYS)
ROW_THREADS = 256
DELTA_STAGED_ROWS = 2048  # kDeltaStagedRows (attention_bwd.cuh): RowStats a delta CTA stages
ROW_INFO_BYTES = 16
PAIR_BYTES = 8  # the wgmma kernel's ring of pairs, one per row record
LOG2E_F32 = float(np.float32(A.LOG2E))  # log2(e) as the kernels' fp32 literal
BLOCK_KEYS = 128  # keys per CTA of the "block" variant (MOBA_BWD_BLOCK_KEYS)
BLOCK_THREADS = 256  # MOBA_BWD_BLOCK_THREADS
BLOCK_HEAD_DIMS = (64, 128)
AUTO_BLOCK_HEAD_DIM = 128  # where "auto" takes "block"
WGMMA_HEAD_DIMS = (128,)
WGMMA_ALIGN_BYTES = 1024  # the wgmma kernel aligns its swizzled tiles to 1024 bytes inside dynamic smem
WGMMA_DQ_PITCH = 288  # bytes per staged dQ row of the wgmma kernel (MOBA_BWD_WG_DQ_PITCH)
WGMMA_THREADS = 384  # the wgmma kernel's three warpgroups (MOBA_BWD_WG_THREADS)
WGMMA_STAGES = 3  # gathered Q / dO tiles in flight or in use (kWgStages)
# Build options of the wgmma main kernel (same results), for measuring against the default build in one process
# (scripts/bwd_variants_ab.py, variant "wgmma+NAME=VALUE"): the next tiles' gathers issued after a tile's S^T / dP^T
# MMAs (serial loop); the rows' lse read before the wait for S^T; every warp masks P (the default skips the mask where
# every row of a full tile sees the warp's keys); the serial loop (DQ_NEXT=0) or a tile's dQ MMAs issued at the next
# tile's start after its S^T (1; the default, 2, before it); each descriptor built from its address (the default
# steps them from a warp-uniform warpgroup index).
WGMMA_BUILD_OPTIONS = ("MOBA_BWD_WG_LATE_GATHER=1", "MOBA_BWD_WG_EARLY_LSE=1", "MOBA_BWD_WG_FULL_TILES=0",
                       "MOBA_BWD_WG_DQ_NEXT=0", "MOBA_BWD_WG_DQ_NEXT=1", "MOBA_BWD_WG_STEP_DESC=0")
BWD_VARIANTS = ("auto", "tile", "block", "wgmma")
BWD_VARIANT_ENV = "MOBALAB_BWD_VARIANT"
DQ_ACCUMULATORS = ("auto", "fp32", "input")
DQ_ACCUMULATOR_ENV = "MOBALAB_BWD_DQ_ACC"


def block_supported(head_dim: int, block_size: int) -> bool:
    """Whether the "block" variant has a kernel for this head dim and block size."""
    return head_dim in BLOCK_HEAD_DIMS and block_size % BLOCK_KEYS == 0


def wgmma_supported(head_dim: int, block_size: int) -> bool:
    """Whether the "wgmma" variant has a kernel for this head dim and block size."""
    return head_dim in WGMMA_HEAD_DIMS and block_size % BLOCK_KEYS == 0


def resolve_bwd_variant(variant: str | None = None, head_dim: int | None = None,
                        block_size: int | None = None, device=None) -> str:
    """The main backward kernel: ``variant``, or ``$MOBALAB_BWD_VARIANT`` when None (default "auto"). With
    ``head_dim`` and ``block_size`` given, "auto" becomes "block" at head dim 128 where :func:`block_supported`
    (the faster of the two there; at 64 "tile" measured as fast), else "tile" (and "wgmma" instead of "block"
    where ``device`` is an sm_90 GPU), and "block" or "wgmma" with a head dim or block size it has no kernel for
    raises ValueError, as does "wgmma" asked for on a ``device`` that cannot run it (:func:`check_variant_device`);
    without them "auto" stays "auto"."""
    variant = C.choice_or_env("backward variant", variant, BWD_VARIANTS, BWD_VARIANT_ENV, "auto")
    if head_dim is None or block_size is None:
        return variant
    if variant == "auto":
        if head_dim != AUTO_BLOCK_HEAD_DIM or not block_supported(head_dim, block_size):
            return "tile"
        hopper = device is not None and device.type == "cuda" and device_capability(device) == (9, 0)
        return "wgmma" if hopper and wgmma_supported(head_dim, block_size) else "block"
    if variant == "block" and not block_supported(head_dim, block_size):
        raise ValueError(f"backward variant 'block' supports head_dim in {BLOCK_HEAD_DIMS} and block sizes that are "
                         f"multiples of {BLOCK_KEYS}, got head_dim={head_dim}, block_size={block_size}; use 'tile'")
    if variant == "wgmma":
        if not wgmma_supported(head_dim, block_size):
            raise ValueError(f"backward variant 'wgmma' supports head_dim in {WGMMA_HEAD_DIMS} and block sizes that "
                             f"are multiples of {BLOCK_KEYS}, got head_dim={head_dim}, block_size={block_size}; use "
                             "'auto'")
        if device is not None:
            check_variant_device(variant, device)
    return variant


def dq_accumulates_in_input_type(variant: str, dtype: torch.dtype, accumulator: str | None = None) -> bool:
    """Whether the atomic dQ adds straight into a dQ of the input type (the "_dq16" main kernels) rather than
    into an fp32 accumulator that is cast afterwards: ``accumulator`` "fp32", "input" or "auto", or
    ``$MOBALAB_BWD_DQ_ACC`` when None (default "auto": the input type for bf16 on the "wgmma" kernel, the only one
    that has the mode; fp16 keeps fp32, whose range a partial sum of fp16 values might leave). Each tile's
    contribution is rounded to the input type and added by a 16-bit bulk reduction, so dQ takes up to k + 1
    roundings of its slots' partial sums instead of one: measured within the gradient criterion throughout
    (tests/kernels/test_backward_gpu.py), and at 512K on an H100 the main kernel moved 1.5x faster (half the
    bytes of read-modify-write in L2 and DRAM, no fp32 zeroing and cast: docs/design.md, "Backward")."""
    accumulator = C.choice_or_env("dQ accumulator", accumulator, DQ_ACCUMULATORS, DQ_ACCUMULATOR_ENV, "auto")
    if accumulator == "fp32":
        return False
    if accumulator == "auto":
        return variant == "wgmma" and dtype == torch.bfloat16
    if variant != "wgmma":
        raise ValueError(f"a dQ accumulator of the input type needs the backward variant 'wgmma', got {variant!r}; "
                         "use 'fp32' or 'auto'")
    return True


def check_variant_device(variant: str, device) -> None:
    """The "wgmma" main kernel runs on sm_90 GPUs only (and on CPU tensors, the kernels' host emulation)."""
    if variant == "wgmma" and device.type == "cuda" and device_capability(device) != (9, 0):
        raise ValueError(f"backward variant 'wgmma' needs an sm_90 (Hopper) GPU, got compute capability "
                         f"{device_capability(device)}; use 'auto', 'block' or 'tile'")


# --------------------------------------------------------------------------------------------------
# sizes and plans (pure)


def n_key_subtiles(block_size: int, variant: str = "tile") -> int:
    """CTAs per key block: 64-key sub-tiles (a block of 16 or 32 keys fills part of one), 128 for "block" and
    "wgmma"."""
    return max(1, math.ceil(block_size / (BLOCK_KEYS if variant in ("block", "wgmma") else KEYS)))


def bwd_threads(head_dim: int, variant: str = "tile") -> int:
    """Threads of the main kernel: head dim 256 pairs warps over the dK / dV / dQ columns (8 warps); "block" has
    8 warps, "wgmma" two computing warpgroups and one that issues the dQ bulk reductions."""
    if variant == "wgmma":
        return WGMMA_THREADS
    return 256 if head_dim == 256 or variant == "block" else 128


def bwd_smem_bytes(head_dim: int, variant: str = "tile") -> int:
    """Dynamic shared memory of the main kernel: K, V, 2 x Q, 2 x dO tiles, dS^T (64 x 64), 3 x 64 row records;
    "block": K, V of 128 keys, 2 x Q, 2 x dO tiles, P^T and dS^T (128 x 64 each), the row records; "wgmma": K, V,
    3 x Q, 3 x dO tiles, dS^T, two warpgroups' staged dQ rows, 5 x 64 row records, 5 x 64 pairs (the records are
    built in the kernel) and 1024 bytes to align the swizzled tiles."""
    if variant == "wgmma":
        return (2 * BLOCK_KEYS * head_dim * 2 + 2 * WGMMA_STAGES * ROWS * head_dim * 2 + BLOCK_KEYS * ROWS * 2
                + 2 * ROWS * WGMMA_DQ_PITCH + (2 * WGMMA_STAGES - 1) * ROWS * (ROW_INFO_BYTES + PAIR_BYTES)
                + WGMMA_ALIGN_BYTES)
    if variant == "block":
        return (2 * BLOCK_KEYS * head_dim * 2 + 4 * ROWS * head_dim * 2 + 2 * BLOCK_KEYS * ROWS * 2
                + 3 * ROWS * ROW_INFO_BYTES)
    return 6 * ROWS * head_dim * 2 + KEYS * ROWS * 2 + 3 * ROWS * ROW_INFO_BYTES


def bwd_bytes_per_pair(head_dim: int, deterministic: bool) -> int:
    """Scratch per (query, head, slot): segment key, sort output and temp, row record (+ fp32 dQ partial)."""
    return 64 + (4 * head_dim if deterministic else 0)


def bwd_plan(batch, seqlen, heads, kv_heads, head_dim, top_k, deterministic, budget_bytes=None):
    """Chunks for the backward: the forward's planner with the backward's scratch per pair."""
    if budget_bytes is None:
        budget_bytes = A.default_scratch_budget(batch, seqlen, heads, kv_heads, head_dim)
    # plan_chunks sizes with the forward's bytes per pair; rescale the budget to the backward's.
    scaled = int(budget_bytes * A.bytes_per_pair(head_dim) / bwd_bytes_per_pair(head_dim, deterministic))
    return A.plan_chunks(batch, seqlen, heads, kv_heads, head_dim, top_k, max(1, scaled))


def forward_plan(batch, seqlen, heads, kv_heads, head_dim, top_k, elem_bytes: int = 2) -> list[A.Chunk]:
    """The forward's chunks with its default scratch budget and the partial format in force."""
    return A.plan_chunks(batch, seqlen, heads, kv_heads, head_dim, top_k,
                         A.forward_scratch_budget(batch, seqlen, heads, kv_heads, head_dim, elem_bytes),
                         A.resolve_partial(None))


def forward_lists_reusable(batch, seqlen, heads, kv_heads, head_dim, top_k, deterministic,
                           elem_bytes: int = 2) -> bool:
    """Whether the key-block lists the forward builds (``moba_attention_cuda(..., keep_lists=True)``) serve the
    backward with default scratch budgets (:func:`lists_serve`). Where the plans are the same chunks the backward
    reads the lists as they are; else it gathers each of its chunks' lists from them
    (:func:`mobalab.kernels._pairs.gather_table`), one read and one write per pair instead of a sort. The kept
    lists are 8 bytes per (query, head, slot), a few percent of the forward's scratch traffic."""
    return lists_serve(forward_plan(batch, seqlen, heads, kv_heads, head_dim, top_k, elem_bytes),
                       bwd_plan(batch, seqlen, heads, kv_heads, head_dim, top_k, deterministic), seqlen)


def lists_serve(fwd_chunks, bwd_chunks, seqlen: int) -> bool:
    """Whether lists kept by ``fwd_chunks`` serve ``bwd_chunks``: the same chunks, or backward chunks over whole
    sequences gathered from forward chunks that each cover whole sequences or part of one head's queries (at
    long context the forward splits a head's queries: one head per chunk, so a pair's index moves by one shift;
    with grouped heads it splits a kv group, whose lists are built again)."""
    if list(fwd_chunks) == list(bwd_chunks):
        return True

    def whole(c):
        return c.t0 == 0 and c.n_q == seqlen

    return all(whole(c) for c in bwd_chunks) and all(whole(c) or c.n_heads == 1 for c in fwd_chunks)


def kept_lists_plan(batch, seqlen, heads, kv_heads, head_dim, block_size, top_k, deterministic, elem_bytes: int = 2):
    """(the forward's chunks, their :func:`~mobalab.kernels._cuda_attention.kept_lists_layout`, its total length,
    whether the backward's chunks are the same) where the forward's kept lists serve the backward
    (:func:`forward_lists_reusable`), else None. Both passes of a training step ask; the plans are kept per scratch
    budget and partial format, which are read at each call."""
    return _kept_lists_plan(batch, seqlen, heads, kv_heads, head_dim, block_size, top_k, deterministic,
                            A.forward_scratch_budget(batch, seqlen, heads, kv_heads, head_dim, elem_bytes),
                            A.default_scratch_budget(batch, seqlen, heads, kv_heads, head_dim), A.resolve_partial(None))


@functools.lru_cache(maxsize=64)
def _kept_lists_plan(batch, seqlen, heads, kv_heads, head_dim, block_size, top_k, deterministic, fwd_budget, bwd_budget,
                     partial):
    fwd = tuple(A.plan_chunks(batch, seqlen, heads, kv_heads, head_dim, top_k, fwd_budget, partial))
    bwd = bwd_plan(batch, seqlen, heads, kv_heads, head_dim, top_k, deterministic, bwd_budget)
    if not lists_serve(fwd, bwd, seqlen):
        return None
    layout, total = A.kept_lists_layout(fwd, top_k, -(-seqlen // block_size), heads // kv_heads)
    return fwd, tuple(layout), total, list(fwd) == bwd


@functools.lru_cache(maxsize=64)
def _gather_table(fwd_chunks: tuple, chunk: A.Chunk, top_k: int, n_blocks: int, group: int, device: str):
    """(the flattened gather table on ``device``, its pieces per segment)."""
    layout, _ = A.kept_lists_layout(fwd_chunks, top_k, n_blocks, group)
    table = _pairs.gather_table(fwd_chunks, layout, chunk, top_k=top_k, n_blocks=n_blocks, group=group)
    return torch.from_numpy(table.reshape(-1)).to(device), table.shape[1]


def bwd_kernel_names(dtype: torch.dtype, head_dim: int, variant: str = "tile",
                     dq16: bool = False) -> tuple[str, str, str]:
    """(delta kernel, main kernel, deterministic dQ merge kernel) for these inputs; ``dq16``: the "wgmma" main kernel
    whose atomic dQ adds into a dQ of the input type (:func:`dq_accumulates_in_input_type`)."""
    tag = C.dtype_tag(dtype, SOURCE)
    if variant == "block":
        main = f"moba_bwd_blk_{tag}_d{head_dim}"
    elif variant == "wgmma":
        main = f"moba_bwd_wg_{tag}_d{head_dim}_dq16" if dq16 else f"moba_bwd_wg_{tag}_d{head_dim}"
    else:
        main = f"moba_bwd_{tag}_d{head_dim}"
    return f"moba_bwd_delta_{tag}_d{head_dim}", main, f"moba_bwd_dq_merge_{tag}_d{head_dim}"


def dkv_mode(chunk: A.Chunk, seqlen: int) -> int:
    """0: the chunk covers whole sequences (dK/dV written once, in the input dtype); else fp32 store/add."""
    if chunk.t0 == 0 and chunk.n_q == seqlen:
        return 0
    return 1 if chunk.t0 == 0 else 2


# --------------------------------------------------------------------------------------------------
# launch plans (pure: the CPU tests pass them through _launch.check_args)


def delta_tokens(n_bt: int, heads: int) -> int:
    """(batch, query) positions per delta CTA: a power of two up to 32 whose rows (every head's) fit the kernel's
    staged stats, fewer where that would leave under 1024 CTAs for an H100's / H200's 132 SMs."""
    tokens = 32
    while tokens > 1 and (tokens * heads > DELTA_STAGED_ROWS or math.ceil(n_bt / tokens) < 1024):
        tokens //= 2
    return tokens


def delta_launch(name, out, dout, delta, n_rows, zero_rows=0, *, lse=0, dlse=0, stats=0, seqlen, heads,
                 tokens=None) -> Launch:
    """D = rowsum(dO * O) - dlse per (query, head), one warp per row, a CTA taking :func:`delta_tokens` positions of
    every head; ``zero_rows`` (the dQ accumulator, fp32 or 16-bit, a row of d per (query, head), or 0 for none) set
    to 0 on the way, without a fill launch of its own; ``stats`` (fp32 (batch, heads, seqlen, 2), or 0 for none)
    gets each row's (lse log2(e), D) for the row records, from ``lse`` (batch, seqlen, heads). ``tokens``
    overrides :func:`delta_tokens` (tests)."""
    tokens = delta_tokens(n_rows // heads, heads) if tokens is None else tokens
    zero_bytes = zero_rows.element_size() if isinstance(zero_rows, torch.Tensor) else 4
    return Launch(SOURCE, name, (math.ceil(n_rows // heads / tokens),), (ROW_THREADS,),
                  (out, dout, delta, zero_rows, i32(zero_bytes), i64(n_rows), lse, dlse, stats, i32(seqlen),
                   i32(heads), i32(tokens)))


def rows_launch(pairs, seg_off, stats, rows, n_pairs, n_seg, *, seqlen, heads, top_k,
                chunk: A.Chunk) -> Launch:
    """Row records (lse, D, query offset, head) of every listed pair (the first seg_off[n_seg] positions), from the
    rows' (lse log2(e), D) in ``stats`` (fp32 (batch, heads, seqlen, 2): :func:`row_stats`)."""
    args = (pairs, seg_off, stats, rows, i64(n_pairs), i32(n_seg), i32(seqlen),
            i32(heads), i32(top_k), i32(chunk.batch_index), i32(chunk.h0),
            i32(chunk.n_q), i32(chunk.t0))
    return Launch(SOURCE, "moba_bwd_rows", (min(A.MAX_INDEX_CTAS, math.ceil(n_pairs / ROW_THREADS)),),
                  (ROW_THREADS,), args)


def bwd_launch(name, q, k, v, dout, rows, pairs, seg_off, dq_acc, part_dq, dk, dv, dk_acc, dv_acc, *, seqlen,
               heads, kv_heads, block_size, n_blocks, chunk: A.Chunk, n_seg, causal, scale, sub0, n_sub_launch,
               dq_mode, dkv_mode, smem, variant="tile", seg_order=None, top_k=None) -> Launch:
    """The main kernel: one CTA per (segment, key sub-tile) for sub-tiles sub0 .. sub0 + n_sub_launch, the
    segments in ``seg_order`` (int32, :func:`longest_first`; None: their own order). ``rows``: the row records
    (:func:`rows_launch`), or for the "wgmma" kernel, which builds its records itself from the pairs, the rows'
    stats (:func:`row_stats`); that kernel also takes ``top_k`` and the chunk's queries."""
    order = 0 if seg_order is None else seg_order  # a null pointer: the segments' own order
    args = (q, k, v, dout, rows, pairs, seg_off, order, dq_acc, part_dq, dk, dv, dk_acc, dv_acc, i32(seqlen),
            i32(heads), i32(kv_heads), i32(block_size), i32(n_blocks),
            i32(chunk.batch_index), i32(chunk.h0), i32(n_seg), i32(1 if causal else 0),
            np.float32(scale), np.float32(scale * A.LOG2E), i32(sub0), i32(n_sub_launch),
            i32(dq_mode), i32(dkv_mode))
    if variant == "wgmma":
        if top_k is None:
            raise ValueError("bwd_launch: the wgmma kernel needs top_k (it decodes the pairs itself)")
        args += (i32(top_k), i32(chunk.n_q), i32(chunk.t0))
    return Launch(WGMMA_SOURCE if variant == "wgmma" else SOURCE, name, (n_seg * n_sub_launch,),
                  (bwd_threads(q.shape[-1], variant),), args, shared_mem=smem)


#: The "block" and "wgmma" main kernels take their segments longest first when a launch is at most this many waves of
#: CTAs.
LONGEST_FIRST_MAX_WAVES = 16


def longest_first(seg_off, n_seg: int):
    """The chunk's segments by descending tile count (64 gathered rows), equal counts in segment order (int32, one
    launch of ``moba_pairs_longest_first``): the main kernel's CTAs start in that order, so a causal sequence's long
    lists (its first key blocks, several times the mean) do not run alone at the kernel's end. Simulated as greedy
    list scheduling on 132 SMs with the routing of random inputs (8K, 16 heads, B 128, k 8): in segment order the
    kernel takes 1.23x its balanced time, longest first 1.01x."""
    if n_seg > _pairs.MAX_ORDER_SEGMENTS:  # more keys than shared memory holds (never at <= 16 waves of 132 SMs)
        return _pairs.longest_first_reference(seg_off, n_seg, ROWS)
    order = torch.empty(n_seg, dtype=torch.int32, device=seg_off.device)
    launch(_pairs.longest_first_launch(seg_off, n_seg, ROWS, order))
    return order


def orders_longest_first(variant: str, n_ctas: int, n_sms: int) -> bool:
    """Whether a main-kernel launch of ``n_ctas`` CTAs takes its segments longest first (:func:`longest_first`):
    the "block" and "wgmma" variants (one CTA per SM) at up to :data:`LONGEST_FIRST_MAX_WAVES` waves. Measured on an
    H200 ("block", backward op, d 128, B 128): 1.05x at 8K (8 waves), 1.02x at 16K (16), 0.975x at 64K (62 waves: the
    tail is a small share, and segment order keeps each head's gathered rows together in L2); "tile" (several CTAs
    per SM) measured 0.93x (8K, d 64, B 64) and 0.87x (16K, d 64, B 32). "wgmma", also one CTA per SM over the same
    segments, follows "block" (not measured on its own)."""
    return variant in ("block", "wgmma") and n_ctas <= LONGEST_FIRST_MAX_WAVES * n_sms


def dq_merge_launch(name, part_dq, topk, dq, *, seqlen, heads, top_k, n_blocks, chunk: A.Chunk) -> Launch:
    """Deterministic dQ: sum of each (query, head)'s slot partials in slot order, one warp per row."""
    args = (part_dq, topk, dq, i32(seqlen), i32(heads), i32(top_k), i32(n_blocks),
            i32(chunk.batch_index), i32(chunk.h0), i32(chunk.n_heads), i32(chunk.t0),
            i32(chunk.n_q))
    warps = chunk.n_heads * chunk.n_q
    return Launch(SOURCE, name, (math.ceil(warps / (ROW_THREADS // 32)),), (ROW_THREADS,), args)


# --------------------------------------------------------------------------------------------------
# the wrapper


def moba_attention_backward_cuda(dout, q, k, v, out, lse, topk, block_size: int, top_k: int, causal: bool,
                                 scale: float, deterministic: bool = False, dlse=None, *,
                                 scratch_budget_bytes: int | None = None, into=None, kv_fresh: bool = False,
                                 delta=None, variant: str | None = None, fwd_lists=None):
    r"""dq, dk, dv of MoBA attention given the forward's ``out``, natural-log ``lse`` and routing ``topk``.

    Shapes as in :func:`mobalab.kernels._cuda_attention.moba_attention_cuda`; ``lse`` is float32, ``topk`` read as
    that function's ``topk_indices`` (an index outside 0 .. n_blocks - 1 counts as an unused slot); ``dlse``
    (batch, seqlen, heads) is the gradient w.r.t. the returned LSE, or None. ``scratch_budget_bytes`` bounds the
    per-chunk scratch (None: the forward's default budget). Gradients come back in the input dtype.

    ``into`` (dq, dk, dv), contiguous fp32 tensors shaped like q, k, v: the gradients are added into them
    instead (dQ by the kernel's atomics, so its rows must hold a value already; dK, dV stored over whatever
    they hold when ``kv_fresh``, else added), and they are returned. For callers that sum gradients over
    several calls (context parallelism): no conversion to the input dtype and back per call. Not with
    ``deterministic=True``.

    ``delta``: the rows' :math:`D_t = dO_t\cdot O_t - d\mathrm{lse}_t` (fp32, (batch, seqlen, heads)) from
    :func:`backward_delta`, for a caller that runs several calls over the same query rows; ``out`` and ``dlse``
    are then not read.

    ``fwd_lists``: the key-block lists of the forward (``moba_attention_cuda(..., keep_lists=True)`` on the
    same inputs, routing and default budgets), read or gathered instead of building them again; the plans must
    allow it (:func:`forward_lists_reusable`), else ValueError. An empty tensor means none.

    ``variant``: the main kernel, "auto", "tile", "block" or "wgmma" (module docstring; None: ``$MOBALAB_BWD_VARIANT``,
    default "auto": "block" at head dim 128 where it has a kernel).
    """
    fn = "moba_attention_backward_cuda"
    C.check_inputs(fn, q, k, v, path="cuda")
    block_size = C.check_block_size(fn, block_size, "cuda")
    top_k = C.check_top_k(fn, top_k, "cuda")
    causal = C.check_flag(fn, "causal", causal)
    deterministic = C.check_flag(fn, "deterministic", deterministic)
    scale = C.check_softmax_scale(fn, scale, q.shape[-1])
    # gradients of any float dtype are rounded to the kernels' types; an integer one would be converted silently,
    # and a 16-bit lse has lost the bits the probabilities exp(x - lse) are recomputed from
    C.check_like(fn, "dout", dout, q.shape, dtypes=C.REFERENCE_DTYPES, device=q.device)
    C.check_like(fn, "out", out, q.shape, dtypes=(q.dtype,), device=q.device)
    C.check_like(fn, "lse", lse, q.shape[:3], dtypes=(torch.float32,), device=q.device)
    if dlse is not None:
        C.check_like(fn, "dlse", dlse, q.shape[:3], dtypes=C.REFERENCE_DTYPES, device=q.device)
    C.check_topk_indices(fn, topk, q, top_k, name="topk")
    kv_fresh = C.check_flag(fn, "kv_fresh", kv_fresh)
    if scratch_budget_bytes is not None:
        scratch_budget_bytes = C.check_positive_int(fn, "scratch_budget_bytes", scratch_budget_bytes)
    if into is not None:
        if deterministic:
            raise ValueError(f"{fn}: into= (gradients added into fp32 buffers) is not supported with "
                             "deterministic=True: the deterministic dQ is written by its slot merge")
        C.check_into(fn, into, ("dq", "dk", "dv"), (q.shape, k.shape, v.shape), q.device)
    if delta is not None:
        C.check_like(fn, "delta", delta, q.shape[:3], dtypes=(torch.float32,), device=q.device)
    try:
        variant = resolve_bwd_variant(variant, q.shape[-1], block_size, q.device)
    except ValueError as exc:
        raise ValueError(f"{fn}: {exc}") from None
    if fwd_lists is not None:
        C.check_tensor(fn, "fwd_lists", fwd_lists)
        if fwd_lists.dim() != 1 or fwd_lists.dtype != torch.int64 or fwd_lists.device != q.device \
                or not fwd_lists.is_contiguous():
            raise ValueError(f"{fn}: fwd_lists must be a contiguous 1-d int64 tensor on {q.device}; got "
                             f"{fwd_lists.dtype} of shape {tuple(fwd_lists.shape)} on {fwd_lists.device}")
        if fwd_lists.numel() == 0:
            fwd_lists = None
    C.check_cuda_device(fn, q)
    with on_device(q.device):
        return _backward(dout, q, k, v, out, lse, topk, block_size, top_k, causal, scale, deterministic, dlse,
                         scratch_budget_bytes, into, kv_fresh, delta, variant, fwd_lists)


def backward_checked(dout, q, k, v, out, lse, topk, block_size: int, top_k: int, causal: bool, scale: float,
                     deterministic: bool, dlse, fwd_lists):
    """dq, dk, dv of :func:`moba_attention_backward_cuda` for inputs it would accept, on q's device (the current one),
    the variant from the environment: the backward of a training step, whose tensors are the forward's (checked at
    its entry) and the gradients of its outputs, which autograd has given their shapes, dtypes and devices.
    ``fwd_lists``: the forward's kept lists, empty for none."""
    try:
        variant = resolve_bwd_variant(None, q.shape[-1], block_size, q.device)
    except ValueError as exc:
        raise ValueError(f"moba_attention_backward_cuda: {exc}") from None
    return _backward(dout, q, k, v, out, lse, topk, block_size, top_k, causal, scale, deterministic, dlse, None, None,
                     False, None, variant, fwd_lists if fwd_lists.numel() else None)


def backward_delta(out, dout, dlse=None):
    r""":math:`D_t = dO_t\cdot O_t - d\mathrm{lse}_t` of every (row, head): fp32 (batch, seqlen, heads), what
    :func:`moba_attention_backward_cuda` computes first; ``out`` and ``dout`` CUDA tensors of one 16-bit dtype,
    ``dlse`` (batch, seqlen, heads) or None."""
    fn = "backward_delta"
    C.check_tensor(fn, "out", out)
    if out.dim() != 4 or out.dtype not in C.CUDA_DTYPES or out.shape[-1] not in C.CUDA_HEAD_DIMS:
        raise ValueError(f"{fn}: out is {out.dtype} of shape {tuple(out.shape)}; supported: (batch, seqlen, heads, "
                         f"d) of {sorted(map(str, C.CUDA_DTYPES))}, d in {sorted(C.CUDA_HEAD_DIMS)}")
    C.check_like(fn, "dout", dout, out.shape, device=out.device)
    if dlse is not None:
        C.check_like(fn, "dlse", dlse, out.shape[:3], device=out.device)
    C.check_cuda_device(fn, out)
    with on_device(out.device):
        return _delta(out, dout, dlse)[0].view(out.shape[:3])


def _delta(out, dout, dlse, zero_rows=0, lse=None, tokens=None):
    """(D, the rows' stats for the row records (:func:`row_stats`) where ``lse`` is given, else None); ``zero_rows``
    and ``tokens``: :func:`delta_launch`'s."""
    out, dout = kernel_ready(out), kernel_ready(dout.to(out.dtype))
    batch, seqlen, heads = out.shape[:3]
    n_rows = batch * seqlen * heads
    delta = torch.empty(n_rows, dtype=torch.float32, device=out.device)
    stats = None if lse is None else torch.empty((batch, heads, seqlen, 2), dtype=torch.float32, device=out.device)
    dlse = 0 if dlse is None else dlse.float().contiguous()
    launch(delta_launch(bwd_kernel_names(out.dtype, out.shape[-1])[0], out, dout, delta, n_rows, zero_rows,
                        lse=0 if lse is None else lse, dlse=dlse, stats=0 if stats is None else stats, seqlen=seqlen,
                        heads=heads, tokens=tokens))
    return delta, stats


def row_stats(lse, delta):
    """Each (batch, query, head) row's (lse log2(e), D) in head-major order, fp32 (batch, heads, seqlen, 2): what
    the delta kernel writes beside D, for a D computed elsewhere. ``lse`` fp32 (batch, seqlen, heads), ``delta``
    its D row for row."""
    lse2 = lse * LOG2E_F32  # the kernel's fp32 product: lse * 1.4426950408889634f
    return torch.stack((lse2, delta.view(lse.shape)), -1).permute(0, 2, 1, 3).contiguous()


def _backward(dout, q, k, v, out, lse, topk, block_size, top_k, causal, scale, deterministic, dlse, budget,
              into, kv_fresh, delta, variant=None, fwd_lists=None):
    q, k, v, dout = (kernel_ready(x) for x in (q, k, v, dout.to(q.dtype)))
    lse = lse.float().contiguous()
    topk = topk.to(torch.int32).contiguous()
    batch, seqlen, heads, dim = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    n_blocks = math.ceil(seqlen / block_size)
    device = q.device
    variant = resolve_bwd_variant(variant, dim, block_size)  # the entry points resolved it on the device
    atomic = into is None and not deterministic  # this call adds dQ into a tensor of its own
    dq16 = atomic and dq_accumulates_in_input_type(variant, q.dtype)
    _, main_name, merge_name = bwd_kernel_names(q.dtype, dim, variant, dq16)
    # the atomic dQ accumulator (fp32, or dQ itself in the inputs' type), zeroed by the delta launch where this call
    # computes D, else by torch
    dq_atomic = None
    if atomic:
        dq_atomic = (torch.empty if delta is None else torch.zeros)(q.shape, dtype=q.dtype if dq16 else torch.float32,
                                                                     device=device)
    # the row records take D from the stats only
    if delta is None:
        _, stats = _delta(out, dout, dlse, 0 if dq_atomic is None else dq_atomic, lse=lse)
    else:
        stats = row_stats(lse, delta.contiguous())

    chunks = bwd_plan(batch, seqlen, heads, kv_heads, dim, top_k, deterministic, budget)
    if fwd_lists is not None:
        kept = None if budget is not None else kept_lists_plan(batch, seqlen, heads, kv_heads, dim, block_size, top_k,
                                                                deterministic, q.element_size())
        if kept is None:
            raise ValueError("moba_attention_backward_cuda: fwd_lists serve only a backward with the forward's chunks, "
                             "or over whole sequences gathered from them (default scratch budgets, "
                             "forward_lists_reusable)")
        fwd_chunks, layout, total, same_chunks = kept
        if fwd_lists.numel() != total:
            raise ValueError(f"moba_attention_backward_cuda: fwd_lists holds {fwd_lists.numel()} entries, the "
                             f"forward's lists of these shapes take {total}")
    max_pairs = max(c.n_heads * c.n_q for c in chunks) * top_k
    max_seg = max(c.n_heads // group for c in chunks) * n_blocks
    # the row records (the wgmma kernel builds its own from the pairs and the stats)
    records = variant != "wgmma"
    rows = torch.empty(max_pairs * ROW_INFO_BYTES // 4, dtype=torch.float32, device=device) if records else stats
    if fwd_lists is None:
        seg_off = torch.empty(max_seg + 1, dtype=torch.int64, device=device)
        scratch = A.pair_scratch(max_pairs, max_seg, device)
    elif not same_chunks:
        gathered = torch.empty(max_pairs, dtype=torch.int64, device=device)
        seg_off = torch.zeros(max_seg + 1, dtype=torch.int64, device=device)  # seg_off[0] stays 0
    if into is not None:  # the fp32 buffers are the result: nothing to copy back (dk, dv unused: modes 1 / 2)
        dq_acc, dk, dv = into
        part_dq, dk_acc, dv_acc = dq_acc, dk, dv
    else:
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        split = any(dkv_mode(c, seqlen) != 0 for c in chunks)
        if split:
            dk_acc = torch.empty(k.shape, dtype=torch.float32, device=device)
            dv_acc = torch.empty(v.shape, dtype=torch.float32, device=device)
        else:
            dk_acc, dv_acc = dk, dv  # unused by the kernel (dkv_mode 0)
        if deterministic:
            dq = torch.empty_like(q)
            part_dq = torch.empty(max_pairs * dim, dtype=torch.float32, device=device)
            dq_acc = part_dq  # unused (dq_mode 1/2)
        else:
            dq_acc = part_dq = dq_atomic  # part_dq unused (dq_mode 0)

    smem = bwd_smem_bytes(dim, variant)
    n_sub = n_key_subtiles(block_size, variant)
    # CPU tensors: the kernels' host emulation (tests), counted as an H100 / H200 (132 SMs)
    n_sms = sm_count(torch.cuda.current_device() if device.index is None else device.index) \
        if device.type == "cuda" else 132
    for i, c in enumerate(chunks):
        n_pairs = c.n_heads * c.n_q * top_k
        n_seg = (c.n_heads // group) * n_blocks
        # the forward's lists (kept, or built again): stable key order, so dK / dV sum their rows in the same
        # order every run
        if fwd_lists is not None and same_chunks:
            p0, _, s0, _ = layout[i]
            pairs, seg_off = fwd_lists[p0:p0 + n_pairs], fwd_lists[s0:s0 + n_seg + 1]
        elif fwd_lists is not None:
            table, pieces = _gather_table(fwd_chunks, c, top_k, n_blocks, group, str(device))
            m = pieces * n_seg
            sizes = fwd_lists[table[m:2 * m]] - fwd_lists[table[:m]]
            torch.cumsum(sizes.view(pieces, n_seg).sum(0) if pieces > 1 else sizes, 0, out=seg_off[1:n_seg + 1])
            pairs = gathered[:n_pairs]
            launch(_pairs.gather_launch(fwd_lists, table, seg_off, pairs, n_seg, pieces))
        else:
            pairs, _ = A.build_pair_lists(topk, None, scratch, c, seqlen=seqlen, heads=heads, top_k=top_k,
                                          n_blocks=n_blocks, group=group, seg_off=seg_off, tile_cum=None,
                                          rows_per_unit=ROWS, with_keys=False)
        if records:
            launch(rows_launch(pairs, seg_off, stats, rows, n_pairs, n_seg, seqlen=seqlen, heads=heads,
                               top_k=top_k, chunk=c))
        common = dict(seqlen=seqlen, heads=heads, kv_heads=kv_heads, block_size=block_size, n_blocks=n_blocks,
                      chunk=c, n_seg=n_seg, causal=causal, scale=scale, smem=smem, variant=variant,
                      seg_order=longest_first(seg_off, n_seg) if orders_longest_first(variant, n_seg * n_sub, n_sms)
                      else None,
                      dkv_mode=dkv_mode(c, seqlen) if into is None else (1 if kv_fresh and c.t0 == 0 else 2),
                      top_k=top_k)
        if deterministic:
            for sub in range(n_sub):  # fixed order: sub-tile 0 stores the partial, later ones add
                launch(bwd_launch(main_name, q, k, v, dout, rows, pairs, seg_off, dq_acc, part_dq, dk, dv, dk_acc,
                                  dv_acc, sub0=sub, n_sub_launch=1, dq_mode=1 if sub == 0 else 2, **common))
            launch(dq_merge_launch(merge_name, part_dq, topk, dq, seqlen=seqlen, heads=heads, top_k=top_k,
                                   n_blocks=n_blocks, chunk=c))
        else:
            launch(bwd_launch(main_name, q, k, v, dout, rows, pairs, seg_off, dq_acc, part_dq, dk, dv, dk_acc,
                              dv_acc, sub0=0, n_sub_launch=n_sub, dq_mode=0, **common))
    if into is not None:
        return into
    if not deterministic:
        dq = dq_acc if dq16 else dq_acc.to(q.dtype)
    if split:
        dk.copy_(dk_acc)
        dv.copy_(dv_acc)
    return dq, dk, dv
