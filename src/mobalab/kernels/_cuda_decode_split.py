r"""MoBA decode on the GPU in two plain launches (cuda/decode_split.cu): the launch plan and the runner.

The bandwidth-first alternative to the fused persistent kernel of :mod:`._cuda_decode` (same semantics,
layouts and outputs; the kernel file's header has the design, the byte counts and the predictions):

1. ``moba_decode_route_*``: one CTA per (sequence, kv head, row group of <= 64 query rows, range of
   ``tiles_per_range`` tiles of 32 KB of block sums); each keeps the best k - 1 candidate blocks of every row
   of its range, and the last CTA of a (sequence, kv head, row group) merges the ranges' lists into ``sel``;
2. ``moba_decode_attend_*``: one CTA per (sequence, kv head, selection entry, chunk of <= 64 tokens); the
   CTA of the first entry that names a block reads that chunk of its K and V once for every row that
   selected it and writes partial softmax results; the last CTA of a (sequence, kv head) merges them into
   ``out`` and ``lse``.

Which kernel :func:`mobalab.kernels.moba_decode` runs: the environment variable ``MOBALAB_DECODE_KERNEL``
(``auto``, the default: split up to 2048 candidate blocks, fused beyond, as measured; or ``fused`` / ``split``),
read at every call (:func:`decode_kernel`). Everything that decides
what the kernels receive is plain Python (CI checks it against the CUDA signatures and runs it through the
host emulation). Memory comes from torch's caching allocator, the kernels run on torch's current stream, and
nothing synchronises with the host (a step can be captured in a CUDA graph).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from ._launch import Launch

__all__ = ["SplitPlan", "plan_split", "split_buffers", "split_launches", "run", "decode_split_cuda", "decode_kernel",
           "KERNELS", "ENV_VAR", "SOURCE"]

SOURCE = "decode_split.cu"
ENV_VAR = "MOBALAB_DECODE_KERNEL"
KERNELS = ("fused", "split")
_TYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}

# Must match the #defines in cuda/decode_split.cu.
THREADS = 256
WARPS = THREADS // 32
FLAGS = 64
ROUTE_TILE_BYTES = 32768
ROUTE_MAX_ROWS = 64
ATTN_CHUNK = 64
ATTN_ROWS = 4
ROUTE_MIN_CTAS = 2  # __launch_bounds__ minimum CTAs per SM of the routing kernel
ATTN_MIN_CTAS = 4

ROUTE_MAX_TILES = 8  # most 32 KB tiles one routing CTA streams (when there are enough to keep two waves)
ROUTE_MERGE_ENTRIES = 512  # most list entries per row that the last range of a row group merges
MAX_GRID = 2**31 - 1


# "auto": the split kernel while the longest sequence has at most this many candidate blocks, else the fused
# one. Measured on an H200 (batch 8, 32 / 8 heads, d 128, bf16): split faster at 256-2048 candidates (32K B 128:
# 0.082 vs 0.118 ms; 128K B 128: 0.121 vs 0.136; 128K B 64 k 4: 0.078 vs 0.094), fused faster at 4096 and
# more (128K B 32: 0.137 vs 0.176; 512K B 128: 0.176 vs 0.210; 1M: 0.226 vs 0.294), where the split kernel's
# routing streams the block sums at under 1 TB/s (RESULTS.md).
AUTO_SPLIT_MAX_CANDIDATES = 2048


def decode_kernel(kernel: str | None = None, n_candidates: int | None = None) -> str:
    """The decode kernel to run: ``kernel`` if given, else ``$MOBALAB_DECODE_KERNEL``, else ``"auto"``; "auto"
    is "split" for at most AUTO_SPLIT_MAX_CANDIDATES candidate blocks (``n_candidates``, the longest
    sequence's complete past blocks), else "fused"."""
    name = kernel if kernel is not None else os.environ.get(ENV_VAR, "") or "auto"
    if name not in (*KERNELS, "auto"):
        where = "kernel" if kernel is not None else ENV_VAR
        raise ValueError(f"moba_decode: {where} = {name!r} is not a decode kernel; supported: "
                         f"{', '.join((*KERNELS, 'auto'))}")
    if name == "auto":
        return "split" if n_candidates is not None and n_candidates <= AUTO_SPLIT_MAX_CANDIDATES else "fused"
    return name


def route_tile(head_dim: int) -> int:
    """Block sums per routing tile (32 KB of fp32: 64 at d 128, 128 at d 64)."""
    return ROUTE_TILE_BYTES // (4 * head_dim)


def _align16(x: int) -> int:
    return (x + 15) & ~15


def route_smem_bytes(head_dim: int, rows_per_group: int, top_k: int, n_range: int) -> int:
    """Routing CTA: own blocks, then (q rows, tile scores, two lists) or the last range's merge staging."""
    lcap = top_k - 1
    phase1 = rows_per_group * (head_dim * 4 + route_tile(head_dim) * 4 + 4 * lcap * 4)
    merge = min(rows_per_group, WARPS) * n_range * lcap * 8 if n_range > 1 else 0
    return _align16(FLAGS + 4 * rows_per_group) + max(phase1, merge)


def attn_smem_bytes(head_dim: int, rows: int, chunk: int, itemsize: int = 2) -> int:
    """Attention CTA: row list, q rows, scores, row limits, per-warp P.V sums, then K and V of the chunk."""
    head = _align16(FLAGS + 4 * rows)
    return head + ATTN_ROWS * (head_dim * 4 + ATTN_CHUNK * 4 + 4) + WARPS * ATTN_ROWS * head_dim * 4 + \
        2 * chunk * head_dim * itemsize


@dataclass(frozen=True)
class SplitPlan:
    """Sizes of one decode step of the two-launch path."""

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
    n_rg: int  # routing row groups per kv head
    rows_per_group: int
    n_range: int  # routing CTAs per row group
    tiles_per_range: int
    chunk: int  # tokens per attention CTA
    n_chunks: int  # attention CTAs per (entry, block)
    route_smem: int
    attn_smem: int

    @property
    def lcap(self) -> int:
        return self.top_k - 1

    @property
    def n_route_ctas(self) -> int:
        return self.batch * self.kv_heads * self.n_rg * self.n_range

    @property
    def n_attn_ctas(self) -> int:
        return self.batch * self.kv_heads * self.rows * self.top_k * self.n_chunks

    @property
    def n_route_counters(self) -> int:
        return self.batch * self.kv_heads * self.n_rg

    @property
    def n_counters(self) -> int:
        """One per (sequence, kv head, row group) for routing, one per (sequence, kv head) for attention."""
        return self.n_route_counters + self.batch * self.kv_heads


def plan_split(batch: int, q_len: int, heads: int, kv_heads: int, head_dim: int, block_size: int, top_k: int,
               max_length: int, n_blocks_cap: int, capacity: int, itemsize: int = 2,
               merge_entries: int = ROUTE_MERGE_ENTRIES, sm_count: int = 132) -> SplitPlan:
    r"""The launch sizes for one step over sequences of at most ``max_length`` tokens (pure arithmetic).

    Routing: the :math:`n_c = \lfloor(L-1)/B\rfloor` candidate blocks of the longest sequence in tiles of
    32 KB of sums. A CTA streams a range of tiles (the next tile's loads in flight while one is scored): as
    many as keep about two waves of routing CTAs on ``sm_count`` SMs (at most ROUTE_MAX_TILES), and at least
    as many as keep the last range's merge within ``merge_entries`` list entries per row
    (:math:`n_\mathrm{range}(k-1)`).
    Attention: chunks of :math:`\min(B, 64)` tokens, one CTA per (entry, chunk).
    """
    group = heads // kv_heads
    rows = group * q_len
    n_rg = math.ceil(rows / ROUTE_MAX_ROWS)
    rows_per_group = math.ceil(rows / n_rg)
    lcap = top_k - 1
    n_cand = (max_length - 1) // block_size
    tiles = math.ceil(n_cand / route_tile(head_dim))
    if lcap == 0 or tiles == 0:
        n_range, per_range = 1, max(tiles, 1)
    else:
        per_range = max(1, math.ceil(tiles / max(1, merge_entries // lcap)))
        waves = tiles * batch * kv_heads * n_rg // (2 * sm_count * ROUTE_MIN_CTAS)
        per_range = max(per_range, min(ROUTE_MAX_TILES, waves))
        n_range = math.ceil(tiles / per_range)
    chunk = min(block_size, ATTN_CHUNK)
    plan = SplitPlan(batch=batch, q_len=q_len, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                     block_size=block_size, top_k=top_k, n_blocks_cap=n_blocks_cap, capacity=capacity, rows=rows,
                     n_rg=n_rg, rows_per_group=rows_per_group, n_range=n_range, tiles_per_range=per_range,
                     chunk=chunk, n_chunks=block_size // chunk,
                     route_smem=route_smem_bytes(head_dim, rows_per_group, top_k, n_range),
                     attn_smem=attn_smem_bytes(head_dim, rows, chunk, itemsize))
    if plan.n_attn_ctas > MAX_GRID or plan.n_route_ctas > MAX_GRID:
        raise ValueError(f"moba_decode (split kernel): {plan.n_attn_ctas} attention CTAs exceed one grid "
                         f"({MAX_GRID}); use MOBALAB_DECODE_KERNEL=fused")
    return plan


def split_buffers(plan: SplitPlan, device, dtype) -> dict[str, torch.Tensor]:
    """Outputs and scratch of one step (``torch.empty``: every element the kernels read they have written)."""
    p = plan
    lists = p.batch * p.kv_heads * p.n_rg * p.n_range * p.rows_per_group * max(p.lcap, 1)
    partials = p.batch * p.kv_heads * p.rows * p.top_k * p.n_chunks
    return dict(
        sel=torch.empty((p.batch, p.q_len, p.heads, p.top_k), dtype=torch.int32, device=device),
        part_v=torch.empty(lists, dtype=torch.float32, device=device),
        part_j=torch.empty(lists, dtype=torch.int32, device=device),
        part_o=torch.empty(partials * p.head_dim, dtype=torch.float32, device=device),
        part_ml=torch.empty(partials * 2, dtype=torch.float32, device=device),
        out=torch.empty((p.batch, p.q_len, p.heads, p.head_dim), dtype=dtype, device=device),
        lse=torch.empty((p.batch, p.q_len, p.heads), dtype=torch.float32, device=device),
    )


def route_launch(plan: SplitPlan, q, sums, lengths, bufs: dict, counters) -> Launch:
    """The routing kernel: q (b, q_len, h, d), fp32 block sums (b, kv_heads, n_blocks_cap, d), lengths int32
    -> sel; ``counters``: plan.n_route_counters zeros."""
    p, i32 = plan, np.int32
    name = f"moba_decode_route_{_TYPE_NAMES[q.dtype]}_d{p.head_dim}"
    args = (q, sums, lengths, bufs["sel"], bufs["part_v"], bufs["part_j"], counters, i32(p.q_len), i32(p.heads),
            i32(p.kv_heads), i32(p.n_blocks_cap), i32(p.block_size), i32(p.top_k), i32(p.n_rg),
            i32(p.rows_per_group), i32(p.n_range), i32(p.tiles_per_range))
    return Launch(SOURCE, name, (p.n_route_ctas, 1, 1), (THREADS, 1, 1), args, p.route_smem)


def attend_launch(plan: SplitPlan, q, k, v, lengths, bufs: dict, counters, scale: float) -> Launch:
    """The attention kernel: the cache's k / v (b, kv_heads, capacity, d) and ``sel`` -> out, lse;
    ``counters``: batch * kv_heads zeros."""
    p, i32 = plan, np.int32
    name = f"moba_decode_attend_{_TYPE_NAMES[q.dtype]}_d{p.head_dim}"
    args = (q, k, v, lengths, bufs["sel"], bufs["part_o"], bufs["part_ml"], counters, bufs["out"], bufs["lse"],
            i32(p.q_len), i32(p.heads), i32(p.kv_heads), i32(p.capacity), i32(p.block_size), i32(p.top_k),
            i32(p.n_chunks), i32(p.chunk), np.float32(scale * math.log2(math.e)))
    return Launch(SOURCE, name, (p.n_attn_ctas, 1, 1), (THREADS, 1, 1), args, p.attn_smem)


def split_launches(q, cache, top_k: int, scale: float, bufs: dict | None = None, route_only: bool = False,
                   merge_entries: int = ROUTE_MERGE_ENTRIES):
    """(plan, buffers, [routing launch, attention launch]) for one step on ``cache`` (no kernel runs);
    ``route_only``: the routing launch alone (``sel`` only; for measuring it)."""
    batch, q_len, heads, dim = q.shape
    sm_count = 132
    if q.is_cuda:
        from ._cuda_decode import _sm_count

        sm_count = _sm_count(q.device.index if q.device.index is not None else torch.cuda.current_device())
    plan = plan_split(batch, q_len, heads, cache.kv_heads, dim, cache.block_size, top_k, int(cache._len.max()),
                      cache.n_blocks, cache.capacity, q.element_size(), merge_entries, sm_count)
    if bufs is None:
        bufs = split_buffers(plan, q.device, q.dtype)
    counters = cache._workspace_counters(plan.n_counters)[:plan.n_counters]
    route = route_launch(plan, q, cache.block_sums, cache._len_dev, bufs, counters[:plan.n_route_counters])
    if route_only:
        return plan, bufs, [route]
    attend = attend_launch(plan, q, cache.k, cache.v, cache._len_dev, bufs, counters[plan.n_route_counters:], scale)
    return plan, bufs, [route, attend]


@functools.cache
def _function(kernel: str, device_index: int, smem: int):
    """The compiled kernel; its dynamic shared-memory limit is raised once to the device's maximum (so one
    object serves every plan, whose shared memory stays far below it)."""
    from ._build import get_kernel

    return get_kernel(SOURCE, kernel, max_dynamic_smem=smem)


def run(launch: Launch, device_index: int) -> None:
    """Check the arguments against the .cu signature and launch on torch's current stream (no per-call
    device queries: the kernel object is cached per process and device)."""
    from ._build import torch_stream
    from ._launch import check_args

    cargs = check_args(launch.source, launch.kernel, launch.args)
    _function(launch.kernel, device_index, 1)(launch.grid, launch.block, cargs, shared_mem=launch.shared_mem,
                                              stream=torch_stream())


def decode_split_cuda(q: torch.Tensor, cache, top_k: int, scale: float, return_lse: bool, *,
                      return_selection: bool = False):
    """The two-launch CUDA path of :func:`moba_decode` (arguments already validated by ``check_decode``)."""
    device_index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    with torch.cuda.device(device_index):
        q = q.contiguous()
        _, bufs, launches = split_launches(q, cache, top_k, scale)
        for one in launches:
            run(one, device_index)
    result = (bufs["out"], bufs["lse"]) if return_lse else (bufs["out"],)
    if return_selection:
        result = result + (bufs["sel"],)
    return result if len(result) > 1 else result[0]
