r"""MoBA decode on the GPU (cuda/decode.cu): the launch plan and the runner behind :func:`moba_decode`.

One launch per step (the kernel file's header has the design, the byte budget, the decomposition and the predictions):
persistent CTAs (two of 256 threads per SM, one where a plan needs more than half the shared memory) take work
items from one ticket counter,

1. routing items (sequence, kv head, row group of <= 64 query rows, split of the candidate blocks): stream
   the cached block sums through a cp.async pipeline and keep each row's best k - 1 past blocks; the last
   split of a row group merges the lists into ``sel`` and marks the row group done;
2. attention units (sequence, kv head, x < n_x): once every row group of the kv head is done, build the
   union of its selected blocks, take an even share of its (block, chunk of <= 64 tokens) items, stream
   their K and V through a pipeline and write partial softmax results for every row that selected the
   block; the last unit of the kv head merges the partials into ``out`` and ``lse``.

``centroid_precision="input"`` builds the module with :data:`INPUT_CENTROIDS_DEFINE`: the routing ranks the
candidates by :math:`q\cdot T(S_j/B)`, the block mean rounded to the cache's type as the prefill's router of that
precision scores it, instead of :math:`q\cdot S_j` (both kernels; cuda/decode_common.cuh).

Everything that decides what the kernel receives (:func:`plan_decode`, :func:`decode_launch`) is plain
Python, so CI checks it against the CUDA signature and runs it through the host emulation of the kernel
without a GPU. Memory comes from torch's caching allocator, the kernel runs on torch's current stream, and
nothing synchronises with the host. A step captured in a CUDA graph is planned for sequences of the cache's
``max_seqlen`` (:func:`plan_length`), since its replays run at whatever lengths the cache has reached by then
(read from the device by the kernels); outside a capture a step is planned for the longest sequence it holds.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from ._build import sm_count
from ._launch import Launch

__all__ = ["DecodePlan", "Launch", "plan_decode", "plan_length", "decode_launch", "decode_buffers", "step_launches",
           "decode_cuda", "SOURCE"]

SOURCE = "decode.cu"
# the build of both decode kernels (this file's and cuda/decode_split.cu's score pass) for centroid_precision "input"
INPUT_CENTROIDS_DEFINE = "MOBA_DECODE_CENTROIDS_INPUT=1"


def precision_defines(centroid_precision: str) -> tuple[str, ...]:
    """The defines of a decode score pass's module for ``centroid_precision``."""
    return (INPUT_CENTROIDS_DEFINE,) if centroid_precision == "input" else ()

_TYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}

# Must match the #defines in cuda/decode.cu.
THREADS = 256
WARPS = THREADS // 32
FLAGS = 64  # bytes of flags at the start of shared memory
ROUTE_STAGES = 6
ROUTE_STAGE_BYTES = 16384
ROUTE_MAX_ROWS = 64  # query rows of one routing item (a row group)
ATTN_CHUNK = 64
ATTN_ROWS = 8
ATTN_STAGE_BYTES = 98304
ATTN_MAX_STAGES = 8

CTAS_PER_SM = 2  # the kernel's __launch_bounds__ minimum
ITEMS_PER_SLOT = 2  # routing items and attention units per CTA slot (see plan_decode)
SMEM_PER_SM = 233472  # H100 / H200: 228 KB per SM, of which 1 KB is reserved per CTA
SMEM_RESERVED_PER_CTA = 1024
SMEM_MAX = 232448  # opt-in maximum of one CTA
ROUTE_MAX_SPLIT = 32  # routing items per row group
ROUTE_MERGE_ENTRIES = 512  # n_split * (top_k - 1) entries per row that the last split merges
ROUTE_MIN_TILES = 4  # fewest routing stages per split: a split of fewer never has a pipeline full of sums
UNION_WINDOW_WORDS = 1024  # bitmap words of one window of the union (32768 blocks)
ROWLIST_BYTES = 16384  # most shared memory of an attention unit's block and row lists


def route_tile(head_dim: int) -> int:
    """Block sums per routing stage (16 KB of fp32)."""
    return ROUTE_STAGE_BYTES // (4 * head_dim)


def attn_stages(head_dim: int, chunk: int = ATTN_CHUNK, itemsize: int = 2) -> int:
    """K/V stages of an attention unit (chunks of K and V in 96 KB, at most 8)."""
    return min(ATTN_MAX_STAGES, ATTN_STAGE_BYTES // (2 * chunk * head_dim * itemsize))


def _align16(x: int) -> int:
    return (x + 15) & ~15


def route_smem_bytes(head_dim: int, rows_per_group: int, top_k: int) -> int:
    """Shared memory of a routing item: q rows, own blocks, lists, score tile, then the sum stages."""
    lcap = top_k - 1
    head = FLAGS + rows_per_group * (head_dim * 4 + 4 + lcap * 8 + route_tile(head_dim) * 4)
    return _align16(head) + ROUTE_STAGES * ROUTE_STAGE_BYTES


def attn_smem_bytes(head_dim: int, rows: int, nb_max: int) -> int:
    """Shared memory of an attention unit: q rows, scores, row limits, block and row lists, K/V stages."""
    head = FLAGS + ATTN_ROWS * (head_dim * 4 + ATTN_CHUNK * 4 + 4) + nb_max * (8 + rows * 4)
    return _align16(head) + ATTN_STAGE_BYTES


@dataclass(frozen=True)
class StepShape:
    """What every decode kernel's plan knows of a step: the shapes of q and of the cache, B, k."""

    batch: int
    q_len: int
    heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    top_k: int
    n_blocks_cap: int
    capacity: int
    rows: int  # query rows per kv head: (heads // kv_heads) * q_len

    @property
    def lcap(self) -> int:
        return self.top_k - 1


def step_outputs(p: StepShape, partials: int, device, dtype) -> dict[str, torch.Tensor]:
    """sel, out, lse and the attention partials (o, then m and l) of ``partials`` (row, slot, chunk) entries, as
    every decode kernel writes them (``torch.empty``: the kernels write every element they read)."""
    return dict(
        sel=torch.empty((p.batch, p.q_len, p.heads, p.top_k), dtype=torch.int32, device=device),
        part_o=torch.empty(partials * p.head_dim, dtype=torch.float32, device=device),
        part_ml=torch.empty(partials * 2, dtype=torch.float32, device=device),
        out=torch.empty((p.batch, p.q_len, p.heads, p.head_dim), dtype=dtype, device=device),
        lse=torch.empty((p.batch, p.q_len, p.heads), dtype=torch.float32, device=device),
    )


@dataclass(frozen=True)
class DecodePlan(StepShape):
    """Sizes of one decode step: work items, the split of the candidate blocks and of the union, memory."""

    n_rg: int  # routing row groups per kv head
    rows_per_group: int
    n_split: int  # routing items per row group
    blocks_per_split: int
    n_x: int  # attention units per kv head
    nb_max: int  # most union blocks one attention unit spans
    chunk: int  # tokens per attention item
    n_chunks: int  # attention items per block
    win_words: int  # bitmap words per window of the union
    smem: int
    ctas: int  # persistent CTAs of a full step

    @property
    def n_route_items(self) -> int:
        return self.batch * self.kv_heads * self.n_rg * self.n_split

    @property
    def n_attn_units(self) -> int:
        return self.batch * self.kv_heads * self.n_x

    @property
    def n_counters(self) -> int:
        """Ticket, leavers, one per (sequence, kv head, row group), two per (sequence, kv head)."""
        return 2 + self.batch * self.kv_heads * (self.n_rg + 2)


def plan_decode(batch: int, q_len: int, heads: int, kv_heads: int, head_dim: int, block_size: int, top_k: int,
                max_length: int, n_blocks_cap: int, capacity: int, sm_count: int = 132,
                win_words: int = UNION_WINDOW_WORDS, items_per_slot: int = ITEMS_PER_SLOT) -> DecodePlan:
    """The launch sizes for one step over sequences of at most ``max_length`` tokens (pure arithmetic).

    Routing splits the candidate blocks of the longest sequence, :math:`n_c = \\lfloor(L-1)/B\\rfloor`, over
    ``n_split`` items per row group: about two items per CTA slot (two slots per SM), at least four stages
    of sums each (an item of one or two stages is all prologue and epilogue: its pipeline never fills), at
    most 32 splits and 512 list entries per row to merge, whole stages per split. Attention gives
    each kv head ``n_x`` units, about two per CTA slot, more when the union of a kv head (at most
    :math:`\\min(R k, n_c + 1)` blocks) would need larger block and row lists than fit. Two waves of
    routing items let the first wave's row groups be merged while the second streams, and the attention
    units of those row groups cover the merge of the second wave's. ``items_per_slot`` changes the two
    (benchmarks time other decompositions with it).
    """
    group = heads // kv_heads
    rows = group * q_len
    n_rg = math.ceil(rows / ROUTE_MAX_ROWS)
    rows_per_group = math.ceil(rows / n_rg)
    lcap = top_k - 1
    slots = CTAS_PER_SM * sm_count
    n_cand = (max_length - 1) // block_size
    tile = route_tile(head_dim)
    if lcap == 0 or n_cand == 0:
        n_split, per_split = 1, max(1, n_cand)
    else:
        most = max(1, min(ROUTE_MAX_SPLIT, ROUTE_MERGE_ENTRIES // lcap, n_cand // (ROUTE_MIN_TILES * tile)))
        n_split = max(1, min(most, items_per_slot * slots // (batch * kv_heads * n_rg)))
        per_split = math.ceil(math.ceil(n_cand / n_split) / tile) * tile  # whole stages
        n_split = math.ceil(n_cand / per_split)  # no empty trailing split
    chunk = min(block_size, ATTN_CHUNK)
    n_chunks = block_size // chunk
    items = min(rows * top_k, n_cand + 1) * n_chunks  # most (block, chunk) items of one kv head
    nb_cap = max(2, ROWLIST_BYTES // (8 + 4 * rows))
    n_x = max(1, min(items, items_per_slot * slots // (batch * kv_heads)),
              math.ceil(items / ((nb_cap - 1) * n_chunks)))
    if 4 * (win_words + rows * top_k) > ATTN_STAGE_BYTES:
        raise ValueError(f"plan_decode: a union window of {win_words} words and {rows} x {top_k} selection "
                         f"entries do not fit in {ATTN_STAGE_BYTES} bytes")
    nb_max = math.ceil(math.ceil(items / n_x) / n_chunks) + 1
    smem = max(route_smem_bytes(head_dim, rows_per_group, top_k), attn_smem_bytes(head_dim, rows, nb_max))
    per_sm = max(1, min(CTAS_PER_SM, SMEM_PER_SM // (smem + SMEM_RESERVED_PER_CTA)))
    n_items = batch * kv_heads * (n_rg * n_split + n_x)
    return DecodePlan(batch=batch, q_len=q_len, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                      block_size=block_size, top_k=top_k, n_blocks_cap=n_blocks_cap, capacity=capacity, rows=rows,
                      n_rg=n_rg, rows_per_group=rows_per_group, n_split=n_split, blocks_per_split=per_split,
                      n_x=n_x, nb_max=nb_max, chunk=chunk, n_chunks=n_chunks, win_words=win_words, smem=smem,
                      ctas=min(n_items, per_sm * sm_count))


def decode_buffers(plan: DecodePlan, device, dtype) -> dict[str, torch.Tensor]:
    """Outputs and scratch of one step (``torch.empty``: every element the kernel reads it has written)."""
    p = plan
    lists = p.batch * p.kv_heads * p.n_rg * p.n_split * p.rows_per_group * max(p.lcap, 1)
    partials = p.batch * p.kv_heads * p.rows * p.top_k * p.n_chunks
    return dict(step_outputs(p, partials, device, dtype),
                part_v=torch.empty(lists, dtype=torch.float32, device=device),
                part_j=torch.empty(lists, dtype=torch.int32, device=device))


def decode_launch(plan: DecodePlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sums: torch.Tensor,
                  lengths: torch.Tensor, bufs: dict, counters: torch.Tensor, scale: float,
                  route_only: bool = False, centroid_precision: str = "fp32") -> Launch:
    """The step kernel: q (b, q_len, h, d), the cache's k / v (b, kv_heads, capacity, d) and fp32 block sums
    (b, kv_heads, n_blocks_cap, d), lengths int32 -> sel, out, lse. ``route_only`` launches the routing
    items alone (``sel`` only; for measuring them); ``centroid_precision`` "input": the module built with
    :data:`INPUT_CENTROIDS_DEFINE`."""
    p = plan
    name = f"moba_decode_step_{_TYPE_NAMES[q.dtype]}_d{p.head_dim}"
    n_x = 0 if route_only else p.n_x
    ctas = min(p.ctas, p.n_route_items) if route_only else p.ctas
    i32 = np.int32
    args = (q, k, v, sums, lengths, bufs["sel"], bufs["part_v"], bufs["part_j"], bufs["part_o"], bufs["part_ml"],
            counters, bufs["out"], bufs["lse"], i32(p.batch), i32(p.q_len), i32(p.heads), i32(p.kv_heads),
            i32(p.n_blocks_cap), i32(p.capacity), i32(p.block_size), i32(p.top_k), i32(p.n_rg),
            i32(p.rows_per_group), i32(p.n_split), i32(p.blocks_per_split), i32(n_x), i32(p.n_chunks),
            i32(p.chunk), i32(p.win_words), i32(p.nb_max), np.float32(scale * math.log2(math.e)))
    return Launch(SOURCE, name, (ctas, 1, 1), (THREADS, 1, 1), args, p.smem,
                  defines=precision_defines(centroid_precision))


def plan_length(cache) -> int:
    """The longest sequence a step's plan covers: the longest the cache holds, or during a CUDA graph capture its
    ``max_seqlen`` (every replay runs the captured plan, at lengths that later appends have reached; a plan covers
    any sequence shorter than its length, as in a ragged batch)."""
    return cache.max_seqlen if cache._capturing() else int(cache._host_lengths().max())


def step_launches(q, cache, top_k: int, scale: float, bufs: dict | None = None, sm_count: int = 132,
                  route_only: bool = False, win_words: int = UNION_WINDOW_WORDS, items_per_slot: int = ITEMS_PER_SLOT,
                  centroid_precision: str = "fp32", max_length: int | None = None):
    """(plan, buffers, [the step's launch]) for one step on ``cache`` (no kernel runs), planned for sequences of up
    to ``max_length`` tokens (None: :func:`plan_length`)."""
    if cache.paged:
        raise ValueError("moba_decode: the fused decode kernel (MOBALAB_DECODE_KERNEL=fused) reads contiguous caches "
                         f"only; this cache is paged (page_size={cache.page_size}): use the split kernel (the "
                         "default, MOBALAB_DECODE_KERNEL=split or auto)")
    batch, q_len, heads, dim = q.shape
    longest = plan_length(cache) if max_length is None else max_length
    plan = plan_decode(batch, q_len, heads, cache.kv_heads, dim, cache.block_size, top_k, longest, cache.n_blocks,
                       cache.capacity, sm_count, win_words, items_per_slot)
    if bufs is None:
        bufs = decode_buffers(plan, q.device, q.dtype)
    counters = cache._workspace_counters(plan.n_counters)[:plan.n_counters]
    launch = decode_launch(plan, q, cache.k, cache.v, cache.block_sums, cache._len_dev, bufs, counters, scale,
                           route_only, centroid_precision)
    return plan, bufs, [launch]


# ---------------------------------------------------------------------------------------------------
# running


def max_smem_bytes() -> int:
    """The most dynamic shared memory any plan asks for (d 128, 64-row groups, top_k 32; full row lists)."""
    return max(route_smem_bytes(128, ROUTE_MAX_ROWS, 32),
               max(attn_smem_bytes(128, rows, max(2, ROWLIST_BYTES // (8 + 4 * rows))) for rows in (1, 512)))


@functools.cache
def _function(source: str, kernel: str, device_index: int, smem: int, defines: tuple[str, ...] = ()):
    """The compiled kernel (its module built with ``defines``) with its dynamic shared-memory limit raised for
    ``smem`` bytes, once per process, device, size and build (a decode step is ~0.1 ms: no per-launch device
    queries)."""
    from ._build import get_kernel

    return get_kernel(source, kernel, defines=defines, max_dynamic_smem=smem)


def run(launch: Launch, device_index: int) -> None:
    """Check the arguments against the .cu signature and launch on torch's current stream (the fused step of
    this file and the split kernels of cuda/decode_split.cu alike), the module built with the launch's defines."""
    run_all((launch,), device_index)


def run_all(launches, device_index: int) -> None:
    """Run one step's launches in order (:func:`run` each), every kernel built and every argument checked (tensor
    maps encoded) before the first starts: a step stopped after its score launch would leave its kv heads' release
    counters raised in the cache's workspace, which the next step's attention CTAs would take for their own score
    CTAs' releases (and read scores not yet written)."""
    from ._launch import check_args, start

    ready = [(check_args(x.source, x.kernel, x.args), _function(x.source, x.kernel, device_index, x.shared_mem,
                                                                x.defines)) for x in launches]
    for launch, (cargs, fn) in zip(launches, ready, strict=True):
        start(fn, launch, cargs)


def kernel_queries(q: torch.Tensor) -> torch.Tensor:
    """``q`` as the decode kernels read it: contiguous at an address that is a multiple of 16 bytes (a copy where it
    is not). The split attention kernel loads query rows as 16-byte vectors, so a contiguous view that starts
    between two such addresses (a slice of a flat buffer) would stop the kernel with a misaligned access."""
    if q.is_contiguous() and q.data_ptr() % 16 == 0:
        return q
    return q.clone(memory_format=torch.contiguous_format)


def decode_cuda(q: torch.Tensor, cache, top_k: int, scale: float, return_lse: bool, *,
                return_selection: bool = False, kernel: str | None = None, centroid_precision: str = "fp32"):
    """The CUDA path of :func:`moba_decode` (arguments already validated by ``check_decode``).

    ``return_selection`` also returns the int32 (batch, q_len, heads, top_k) selection (benchmarks and tests).
    ``kernel``: ``"fused"`` (this file's launch), ``"split"`` (cuda/decode_split.cu, two or three launches) or
    ``"auto"`` (:func:`._cuda_decode_split.decode_kernel`: split); None reads ``$MOBALAB_DECODE_KERNEL``
    (default auto).
    """
    from ._cuda_decode_split import decode_kernel, split_launches

    plans = split_launches if decode_kernel(kernel) == "split" else step_launches
    device_index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    with torch.cuda.device(device_index):
        q = kernel_queries(q)
        _, bufs, launches = plans(q, cache, top_k, scale, sm_count=sm_count(device_index),
                                  centroid_precision=centroid_precision)
        run_all(launches, device_index)
    result = (bufs["out"], bufs["lse"]) if return_lse else (bufs["out"],)
    if return_selection:
        result = result + (bufs["sel"],)
    return result if len(result) > 1 else result[0]
