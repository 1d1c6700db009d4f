r"""A batch of short sequences attended as one long sequence: one chunk of launches instead of one per sequence.

The CUDA attention passes work in chunks that never span two sequences, so a batch of short sequences costs a
chunk of launches per sequence (pair lists, tile kernel, merge; row records and the main kernel in the
backward): at 8K tokens, batch 2, that is twice the launches, each paying its host cost and its tail, for work
that fits one chunk. Given the routing, MoBA attention of a batch of equal-length sequences whose length
:math:`N` is a multiple of the block size :math:`B` is exactly the attention of one sequence of :math:`bN`
tokens, the batch's rows laid end to end (the (b, N, h, d) tensors viewed as (1, bN, h, d)), once the routing
names block :math:`j` of sequence :math:`\beta` as block

.. math:: j' = \beta n + j, \qquad n = N / B,

of the concatenation. Its keys sit at positions :math:`\beta N + jB + i`, and its queries at
:math:`\beta N + t`, so every key and query address, and the causal mask :math:`\text{key} \le t`, come out as
they were; a sequence's queries select only its own blocks, so no row sees another sequence. The pair lists,
tiles, partials and merges hold the same rows in the same order, so the results are bit-identical to the
per-sequence launches. The routing itself stays per sequence (it must: a causal query of sequence 1 may not
select sequence 0's blocks).

:func:`folds` decides from the shapes alone (so the custom op's fake implementation agrees with the kernels)
whether folding gives fewer chunks without losing what the per-sequence plan had (the backward reading the
forward's lists as they are, the counting sort). The top-k kernel writes the renumbered routing itself
(``fold_blocks``, :func:`mobalab.kernels._cuda_routing.topk_launch`); :func:`folded_topk` is its readable reference.
"""

from __future__ import annotations

import functools
import math

import torch

__all__: list[str] = []


@functools.lru_cache(maxsize=256)  # asked once per pass of a training step, on the host's hot path
def folds(batch: int, seqlen: int, heads: int, kv_heads: int, head_dim: int, block_size: int, top_k: int,
          deterministic: bool, elem_bytes: int = 2) -> bool:
    """Whether the training step attends the batch as one sequence of ``batch * seqlen`` tokens: the length is a
    multiple of the block size, and the folded plans of both passes have fewer chunks in one pass and no more in
    the other, keep the backward on the forward's lists exactly where the per-sequence plans did (or, where
    folding halves the chunks of both passes together, on lists gathered from the forward's: a chunk of launches
    costs ~0.25 ms of host time, more than the gather), and stay on the counting sort (at most
    ``_pairs.MAX_KEYS`` segment keys per chunk, the bound that holds on every device)."""
    from . import _cuda_backward as CB
    from ._pairs import MAX_KEYS

    if batch == 1 or seqlen % block_size != 0:
        return False
    shapes = ((batch, seqlen), (1, batch * seqlen))
    fwd = [CB.forward_plan(b, n, heads, kv_heads, head_dim, top_k, elem_bytes) for b, n in shapes]
    bwd = [CB.bwd_plan(b, n, heads, kv_heads, head_dim, top_k, deterministic) for b, n in shapes]
    reuse = [CB.forward_lists_reusable(b, n, heads, kv_heads, head_dim, top_k, deterministic, elem_bytes)
             for b, n in shapes]
    same = [list(f) == list(g) for f, g in zip(fwd, bwd, strict=True)]
    group = heads // kv_heads
    n_blocks = math.ceil(batch * seqlen / block_size)
    max_keys = max(c.n_heads // group for c in (*fwd[1], *bwd[1])) * n_blocks + 1
    fewer = len(fwd[1]) < len(fwd[0]) or len(bwd[1]) < len(bwd[0])
    no_more = len(fwd[1]) <= len(fwd[0]) and len(bwd[1]) <= len(bwd[0])
    halves = 2 * (len(fwd[1]) + len(bwd[1])) <= len(fwd[0]) + len(bwd[0])
    return (fewer and no_more and reuse[1] >= reuse[0] and (same[1] >= same[0] or halves)
            and max_keys <= MAX_KEYS)


def folded_topk(topk: torch.Tensor, n_blocks: int) -> torch.Tensor:
    r"""Routing of the batch's sequences renumbered for their concatenation: :math:`\beta n + j` for block
    :math:`j` selected in sequence :math:`\beta` (``n_blocks`` = n blocks per sequence), -1 kept; int32,
    topk's shape (batch, seqlen, heads, top_k): what the top-k kernel writes with ``fold_blocks`` = n (the
    training step's routing of a folded batch), here as a torch expression.

    Examples
    --------
    >>> import torch
    >>> folded_topk(torch.tensor([[[[0, -1]]], [[[2, 1]]]], dtype=torch.int32), 3).flatten().tolist()
    [0, -1, 5, 4]
    """
    offset = (torch.arange(topk.shape[0], device=topk.device, dtype=torch.int32) * n_blocks).view(-1, 1, 1, 1)
    return torch.where(topk >= 0, topk + offset, topk).to(torch.int32)
