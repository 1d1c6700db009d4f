r"""MoBA decode on the GPU (cuda/decode.cu): launch plans and the runner behind :func:`moba_decode`.

Two launches per step (the kernel file's header has the design and the byte / FLOP budget):

1. routing, grid (n_split, kv_heads * n_rg, batch): every CTA scores up to 64 query rows of one kv head
   against a contiguous range of cached block sums and keeps the rows' best k - 1 past blocks; the last
   CTA of each (sequence, kv head, row group) merges the ranges' lists into ``sel``;
2. attention, grid (rows * top_k * n_chunks, kv_heads, batch): one unit per (selection entry, chunk of
   <= 64 tokens), working only for the first entry that names a block, so the union of the group's blocks
   is read once; the last CTA of each (sequence, kv head) merges the partial softmax results.

Everything that decides what a kernel receives (:func:`plan_decode`, :func:`route_launch`,
:func:`attention_launch`) is plain Python, so CI checks it against the CUDA signatures and runs it through
the host emulation of the kernels without a GPU. Memory comes from torch's caching allocator, kernels run
on torch's current stream, nothing synchronises with the host (a step can be captured in a CUDA graph).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["DecodePlan", "Launch", "plan_decode", "route_launch", "attention_launch", "decode_buffers",
           "decode_cuda", "SOURCE"]

SOURCE = "decode.cu"
_TYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}

# Must match the #defines in cuda/decode.cu.
ROUTE_THREADS = 256
ROUTE_WARPS = ROUTE_THREADS // 32
ROUTE_TILE = 128
ATTN_THREADS = 128
ATTN_CHUNK = 64
ATTN_ROWS = 16
ATTN_MAX_ROWS = 512

ROUTE_MAX_ROWS = 64  # query rows of one routing CTA (a row group)
ROUTE_MAX_SPLIT = 32  # routing CTAs per (sequence, kv head, row group)
ROUTE_MERGE_ENTRIES = 512  # n_split * (top_k - 1) entries per row that the last CTA merges
ROUTE_MIN_BLOCKS = 32  # fewest candidate blocks per routing CTA worth a split
_FLAGS = 16  # bytes of flags at the start of each kernel's shared memory


@dataclass(frozen=True)
class DecodePlan:
    """Sizes of one decode step: the grids, the split of the candidate blocks, shared memory, scratch."""

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
    n_rg: int  # routing row groups
    rows_per_group: int
    n_split: int  # routing CTAs per row group
    blocks_per_split: int
    chunk: int  # tokens per attention unit
    n_chunks: int  # attention units per block
    route_smem: int
    attn_smem: int

    @property
    def lcap(self) -> int:
        return self.top_k - 1

    @property
    def route_grid(self) -> tuple[int, int, int]:
        return (self.n_split, self.kv_heads * self.n_rg, self.batch)

    @property
    def attn_grid(self) -> tuple[int, int, int]:
        return (self.rows * self.top_k * self.n_chunks, self.kv_heads, self.batch)

    @property
    def n_route_counters(self) -> int:
        return self.batch * self.kv_heads * self.n_rg

    @property
    def n_attn_counters(self) -> int:
        return self.batch * self.kv_heads


def route_smem_bytes(head_dim: int, rows_per_group: int, top_k: int, n_split: int) -> int:
    """Dynamic shared memory of a routing CTA: q rows, score tile, lists, own blocks; or the merge staging."""
    lcap = top_k - 1
    tiles = rows_per_group * (head_dim * 4 + ROUTE_TILE * 4 + lcap * 8 + 4)
    merge = ROUTE_WARPS * n_split * lcap * 8
    return _FLAGS + max(tiles, merge)


def attn_smem_bytes(head_dim: int, itemsize: int = 2) -> int:
    """Dynamic shared memory of an attention CTA: K and V chunks, q rows, scores, (m, l), limits, row list."""
    return (_FLAGS + 2 * ATTN_CHUNK * head_dim * itemsize + ATTN_ROWS * head_dim * 4 + ATTN_ROWS * ATTN_CHUNK * 4
            + ATTN_ROWS * 8 + ATTN_ROWS * 4 + ATTN_MAX_ROWS * 4)


def plan_decode(batch: int, q_len: int, heads: int, kv_heads: int, head_dim: int, block_size: int, top_k: int,
                max_length: int, n_blocks_cap: int, capacity: int, sm_count: int = 132) -> DecodePlan:
    """The launch sizes for one step over sequences of at most ``max_length`` tokens (pure arithmetic).

    Routing splits the candidate blocks of the longest sequence, :math:`n_c = \\lfloor(L-1)/B\\rfloor`,
    over ``n_split`` CTAs per row group: up to two per SM in one wave, at least 32 blocks each, at most 32
    splits and 512 list entries per row to merge.
    """
    group = heads // kv_heads
    rows = group * q_len
    n_rg = math.ceil(rows / ROUTE_MAX_ROWS)
    rows_per_group = math.ceil(rows / n_rg)
    lcap = top_k - 1
    n_cand = (max_length - 1) // block_size
    if lcap == 0 or n_cand == 0:
        n_split, per_split = 1, max(1, n_cand)
    else:
        most = max(1, min(ROUTE_MAX_SPLIT, ROUTE_MERGE_ENTRIES // lcap, math.ceil(n_cand / ROUTE_MIN_BLOCKS)))
        want = (2 * sm_count) // (batch * kv_heads * n_rg)  # one wave of two CTAs per SM
        n_split = max(1, min(most, want))
        per_split = math.ceil(n_cand / n_split)
        n_split = math.ceil(n_cand / per_split)  # no empty trailing split
    chunk = min(block_size, ATTN_CHUNK)
    return DecodePlan(batch=batch, q_len=q_len, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                      block_size=block_size, top_k=top_k, n_blocks_cap=n_blocks_cap, capacity=capacity, rows=rows,
                      n_rg=n_rg, rows_per_group=rows_per_group, n_split=n_split, blocks_per_split=per_split,
                      chunk=chunk, n_chunks=block_size // chunk,
                      route_smem=route_smem_bytes(head_dim, rows_per_group, top_k, n_split),
                      attn_smem=attn_smem_bytes(head_dim))


@dataclass(frozen=True)
class Launch:
    """One kernel launch: kernel name, grid, block, arguments (tensors or exact numpy scalars), shared memory."""

    filename: str
    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    args: tuple
    shared_mem: int


def decode_buffers(plan: DecodePlan, device, dtype) -> dict[str, torch.Tensor]:
    """Outputs and scratch of one step (``torch.empty``: every element a kernel reads it has written)."""
    p = plan
    lists = p.batch * p.kv_heads * p.n_rg * p.n_split * p.rows_per_group * max(p.lcap, 1)
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


def route_launch(plan: DecodePlan, q: torch.Tensor, sums: torch.Tensor, lengths: torch.Tensor, bufs: dict,
                 counters: torch.Tensor) -> Launch:
    """Routing kernel: q (b, q_len, h, d), sums (b, kv_heads, n_blocks_cap, d) fp32, lengths int32 -> sel."""
    p = plan
    name = f"moba_decode_route_{_TYPE_NAMES[q.dtype]}_d{p.head_dim}"
    args = (q, sums, lengths, bufs["sel"], bufs["part_v"], bufs["part_j"], counters, np.int32(p.q_len),
            np.int32(p.heads), np.int32(p.kv_heads), np.int32(p.n_blocks_cap), np.int32(p.block_size),
            np.int32(p.top_k), np.int32(p.n_rg), np.int32(p.rows_per_group), np.int32(p.n_split),
            np.int32(p.blocks_per_split))
    return Launch(SOURCE, name, p.route_grid, (ROUTE_THREADS, 1, 1), args, p.route_smem)


def attention_launch(plan: DecodePlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                     bufs: dict, counters: torch.Tensor, scale: float) -> Launch:
    """Attention kernel: q, the cache's k / v (b, kv_heads, capacity, d), sel -> out, lse."""
    p = plan
    name = f"moba_decode_attn_{_TYPE_NAMES[q.dtype]}_d{p.head_dim}"
    args = (q, k, v, lengths, bufs["sel"], bufs["part_o"], bufs["part_ml"], counters, bufs["out"], bufs["lse"],
            np.int32(p.q_len), np.int32(p.heads), np.int32(p.kv_heads), np.int32(p.capacity),
            np.int32(p.block_size), np.int32(p.top_k), np.int32(p.n_chunks), np.int32(p.chunk),
            np.float32(scale * math.log2(math.e)))
    return Launch(SOURCE, name, p.attn_grid, (ATTN_THREADS, 1, 1), args, p.attn_smem)


def step_launches(q, cache, top_k: int, scale: float, bufs: dict | None = None, sm_count: int = 132):
    """(plan, buffers, [routing launch, attention launch]) for one step on ``cache`` (no kernel runs)."""
    batch, q_len, heads, dim = q.shape
    plan = plan_decode(batch, q_len, heads, cache.kv_heads, dim, cache.block_size, top_k, int(cache._len.max()),
                       cache.n_blocks, cache.capacity, sm_count)
    if bufs is None:
        bufs = decode_buffers(plan, q.device, q.dtype)
    counters = cache._workspace_counters(plan.n_route_counters + plan.n_attn_counters)
    route_counters = counters[:plan.n_route_counters]
    attn_counters = counters[plan.n_route_counters:plan.n_route_counters + plan.n_attn_counters]
    launches = [route_launch(plan, q, cache.block_sums, cache._len_dev, bufs, route_counters),
                attention_launch(plan, q, cache.k, cache.v, cache._len_dev, bufs, attn_counters, scale)]
    return plan, bufs, launches


# ---------------------------------------------------------------------------------------------------
# running


@functools.cache
def _function(kernel: str, device_index: int):
    """The compiled kernel with its dynamic shared-memory limit raised once (per process and device)."""
    from ._build import get_kernel

    most = max(route_smem_bytes(128, ROUTE_MAX_ROWS, 32, ROUTE_MAX_SPLIT),
               route_smem_bytes(128, ROUTE_MAX_ROWS, 2, ROUTE_MAX_SPLIT), attn_smem_bytes(128))
    return get_kernel(SOURCE, kernel, max_dynamic_smem=most)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def run(launch: Launch, device_index: int) -> None:
    """Check the arguments against the .cu signature and launch on torch's current stream."""
    from ._build import torch_stream
    from ._launch import check_args

    cargs = check_args(launch.filename, launch.kernel, launch.args)
    _function(launch.kernel, device_index)(launch.grid, launch.block, cargs, shared_mem=launch.shared_mem,
                                           stream=torch_stream())


def decode_cuda(q: torch.Tensor, cache, top_k: int, scale: float, return_lse: bool, *,
                return_selection: bool = False):
    """The CUDA path of :func:`moba_decode` (arguments already validated by ``check_decode``).

    ``return_selection`` also returns the int32 (batch, q_len, heads, top_k) selection (benchmarks and tests).
    """
    device_index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    with torch.cuda.device(device_index):
        q = q.contiguous()
        _, bufs, launches = step_launches(q, cache, top_k, scale, sm_count=_sm_count(device_index))
        for launch in launches:
            run(launch, device_index)
    result = (bufs["out"], bufs["lse"]) if return_lse else (bufs["out"],)
    if return_selection:
        result = result + (bufs["sel"],)
    return result if len(result) > 1 else result[0]
