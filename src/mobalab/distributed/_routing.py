r"""Routing of a sharded sequence: the same blocks single-device MoBA selects, at global positions.

Each rank sums the keys of the blocks its segments touch (:func:`mobalab.kernels.reference.moba_block_sums`;
a block cut by a shard boundary gets a partial sum from each rank holding part of it). One all-gather gives
every rank every partial sum; added per block in rank order and divided by the block's key count
:math:`\min(B, N - jB)` (known from the shard lengths) they are the centroids of the whole sequence,

.. math::
    \bar k_j = \frac{1}{|j|} \sum_{r} \sum_{i \in j \cap \mathrm{shard}_r} k_i ,

and each rank routes its own queries against them at their global positions: the top-k rule of
docs/design.md, "MoBA semantics", unchanged. Bytes moved: each rank receives the block sums of the others,
about ``batch * n_blocks * kv_heads * d`` fp32 values, once per call (not per ring step).

Who scores: the reference (:func:`~mobalab.kernels.reference.moba_topk_from_centroids`) on CPUs, or the fused
CUDA top-k kernel, told where the shard's first query sits (its ``query_offset``): row i of a segment starting
at t0 is scored at position t0 + i, own block (t0 + i) // B, candidates the complete blocks before it, so each
segment is one kernel call over the global centroids and does exactly its rows' share of the causal work.
Non-causal routing is the same call without the causal mask. The kernel scores as
:math:`q\cdot c_{hi} + q\cdot c_{lo}` (about 2^-16 relative), so selections can differ from the
reference's at near-ties, exactly as the single-device CUDA router's do.
"""

from __future__ import annotations

import contextlib

import torch

from ..kernels import _contract as C
from ..kernels import reference as R
from ._group import Ring, all_gather_rows
from ._layout import Layout

__all__ = ["global_centroids", "route"]

# Scores held at once while routing on a GPU (the reference's default is sized for CPUs: on a GPU its many
# small chunks are launch-bound); bytes per (query, head, block) score as the reference counts them.
_GPU_SCORE_BUDGET_BYTES = 4 << 30
_BYTES_PER_SCORE = 24


def _local_sums(k: torch.Tensor, layout: Layout, rank: int, block_size: int) -> torch.Tensor:
    """Block sums of this rank's segments, concatenated along the block axis: (batch, touched, kv_heads, d)."""
    sums = [R.moba_block_sums(k[:, s.local:s.local + s.length], block_size, key_offset=s.start)[0]
            for s in layout.segments(rank)]
    return torch.cat(sums, dim=1)


def global_centroids(k: torch.Tensor, layout: Layout, ring: Ring, block_size: int) -> torch.Tensor:
    """Centroids of the whole sequence on every rank: (batch, n_blocks, kv_heads, d) in the compute dtype."""
    batch, _, kv_heads, dim = k.shape
    n_blocks = -(-layout.seq_len // block_size)
    # all_gather needs one shape on every rank: pad each rank's sums to the largest block count
    touched = [sum(n for _, n in layout.touched_blocks(r, block_size)) for r in range(ring.world)]
    local = _local_sums(k, layout, ring.rank, block_size)
    padded = local.new_zeros((batch, max(touched), kv_heads, dim))
    padded[:, :local.shape[1]] = local
    gathered = all_gather_rows(padded, ring)
    sums = local.new_zeros((batch, n_blocks, kv_heads, dim))
    for r in range(ring.world):  # rank order: a cut block's partial sums add up the same way on every rank
        at = 0
        for first, count in layout.touched_blocks(r, block_size):
            sums[:, first:first + count] += gathered[r, :, at:at + count]
            at += count
    starts = torch.arange(n_blocks, device=k.device) * block_size
    counts = (layout.seq_len - starts).clamp(max=block_size).to(sums.dtype)
    return sums / counts.view(1, n_blocks, 1, 1)


def kernel_lists(q: torch.Tensor, centroids: torch.Tensor, block_size: int, top_k: int, causal: bool,
                 query_offset: int = 0, centroid_precision: str = "fp32") -> torch.Tensor:
    """The fused CUDA top-k over given centroids, row i of ``q`` at position ``query_offset + i``
    (``centroid_precision`` "input": centroids already rounded to q's dtype, scored by one product each)."""
    from ..kernels._cuda_routing import split_launch, topk_launch
    from ..kernels._launch import kernel_ready, launch

    batch, n_q, heads, dim = q.shape
    kv_heads, n_blocks = centroids.shape[2], centroids.shape[1]
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():  # (CPU: the launch plans' tests)
        hi = torch.empty((batch, kv_heads, n_blocks, dim), dtype=q.dtype, device=q.device)
        lo = torch.empty_like(hi)
        out = torch.empty((batch, n_q, heads, top_k), dtype=torch.int32, device=q.device)
        launch(split_launch(centroids.float().contiguous(), hi, lo))
        launch(topk_launch(kernel_ready(q), hi, lo, out, block_size, top_k, causal, query_offset,
                           centroid_precision=centroid_precision))
    return out


def reference_lists(q, centroids, block_size, top_k, causal, query_offset: int = 0):
    """What :func:`kernel_lists` computes, by the reference."""
    return R.moba_topk_from_centroids(q, centroids, block_size, top_k, causal, query_offset=query_offset)


def route_segment(q, start: int, centroids, block_size: int, top_k: int, causal: bool, lists) -> torch.Tensor:
    """Routing of the queries ``q`` at positions ``start ..`` by a top-k ``lists`` (the kernel or the reference)."""
    return lists(q, centroids, block_size, top_k, causal, query_offset=start)


def route(q: torch.Tensor, k: torch.Tensor, layout: Layout, ring: Ring, block_size: int, top_k: int,
          causal: bool, lists=None, centroid_precision: str = "fp32") -> torch.Tensor:
    """Selected blocks (global indices) of this rank's queries: int32 (batch, shard_len, heads, top_k).

    ``lists``: a top-k with a query offset (:func:`kernel_lists`) to route with, or None for the reference.
    ``centroid_precision`` "input": the whole sequence's centroids rounded to k's dtype before scoring.
    """
    centroids = C.routed_centroids(global_centroids(k, layout, ring, block_size), k.dtype, centroid_precision)
    parts = []
    for s in layout.segments(ring.rank):
        q_seg = q[:, s.local:s.local + s.length]
        if lists is not None:
            parts.append(route_segment(q_seg, s.start, centroids, block_size, top_k, causal, lists))
            continue
        chunk = None
        if q.is_cuda:
            per_query = q.shape[0] * q.shape[2] * centroids.shape[1] * _BYTES_PER_SCORE
            chunk = max(1, _GPU_SCORE_BUDGET_BYTES // per_query)
        parts.append(R.moba_topk_from_centroids(q_seg, centroids, block_size, top_k, causal, query_offset=s.start,
                                                query_chunk=chunk))
    return torch.cat(parts, dim=1)
