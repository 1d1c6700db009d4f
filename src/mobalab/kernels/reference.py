r"""Readable torch MoBA: the ground truth that the CUDA kernels are tested against.

Layout is FlashAttention's: ``q`` is (batch, seqlen, heads, head_dim), ``k`` and ``v`` are
(batch, seqlen, kv_heads, head_dim), ``heads % kv_heads == 0``, and query head ``h`` reads kv head
``h // (heads // kv_heads)`` (GQA / MQA). Queries and keys share one sequence (self-attention, seqlen_q ==
seqlen_k). With block size :math:`B`, a sequence of :math:`N` tokens has :math:`n = \lceil N/B \rceil`
key blocks; block :math:`j` holds keys :math:`[jB, \min((j+1)B, N))`. See docs/design.md, "MoBA semantics".

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

How it is computed: only the selected blocks are read. Each (query, head, slot) *row* is softmax attention
over one block's keys, giving a partial :math:`(o_{t,s}, \mathrm{lse}_{t,s})`; a query's partials merge as

.. math::
    \mathrm{lse}_t = \log \sum_s e^{\mathrm{lse}_{t,s}}, \qquad
    o_t = \sum_s e^{\mathrm{lse}_{t,s} - \mathrm{lse}_t}\, o_{t,s}.

Rows that read the same (batch, kv head, block) share its keys and form one matrix product; segments of
similar length are padded to a common length and batched. Work is :math:`O(N k \min(B, N) d)` per head (plus
routing, :math:`O(N n d)`; a block longer than the sequence costs what its keys cost), and memory is bounded:
queries are processed in chunks sized from a byte budget (or ``query_chunk``), and under autograd each chunk
is checkpointed (recomputed in backward). This makes the reference usable as the GPU oracle at long context;
keep ``torch.backends.cuda.matmul.allow_tf32`` off (torch's default) there, or the fp32 matmuls lose precision.

Non-finite inputs. A query reads only its selected blocks, so a NaN or Inf in ``q``, ``k`` or ``v`` of token
:math:`i` changes only the outputs of queries that attend :math:`i` (those become non-finite: an output
element whose attended values include a non-finite one is NaN, or infinite where an infinite value meets only
finite weights). A non-finite key also makes its block's
centroid non-finite, and a block whose centroid is not finite scores NaN for every query (the CUDA router,
which scores :math:`q\cdot c_{hi} + q\cdot c_{lo}` with :math:`c_{lo} = c - c_{hi}`, or :math:`q\cdot c_{hi}`
alone for ``centroid_precision="input"``, gets NaN there too: its centroid pass writes both halves NaN where
:math:`c_{hi}` is not finite; the decode kernels likewise score NaN for a block whose sum is not finite). A
score of NaN or :math:`-\infty` is never selected: such a block cannot take a slot (the slot stays -1), so
a non-causal query reads nothing of it and a causal query reads it only as its own block. A query with no
selected block (possible only when every block scores NaN, non-causal) has ``out = 0`` and ``lse = -inf``.
Gradients are defined for finite inputs only. (The CUDA router's heap tier, used for lists longer than 16,
does select a :math:`-\infty` score; such scores need infinite inputs or a product overflowing float32.)
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from . import _contract as C

__all__ = [
    "moba_centroids",
    "moba_topk",
    "moba_block_sums",
    "moba_topk_from_centroids",
    "moba_attention",
    "moba_attention_given_routing",
    "moba_attention_backward",
    "dense_attention",
]

# Scratch one query chunk may use when ``query_chunk`` is not given.
_MEMORY_BUDGET_BYTES = 1 << 30
# Rough bytes alive at once per (row, key) element of a chunk's attention (scores and mask, with padding),
# per (row, feature) element (gathered queries, outputs) and per (query, head, block) score of routing.
_BYTES_PER_ROW_KEY = 12
_BYTES_PER_ROW_FEATURE = 20
_BYTES_PER_SCORE = 8
# Key block that dense attention is cut into (any size gives the same result).
_DENSE_BLOCK = 128


def _exact(fn):
    """``fn`` with autocast off for its tensors' device type: under ``torch.autocast`` a matrix product runs in
    the autocast dtype, which would score the routing in bf16 and hand partials of another dtype to the merge,
    where the contract scores and attends in the compute dtype (float32, float64 for float64 inputs)."""

    @functools.wraps(fn)
    def entry(*args, **kwargs):
        if not args or C.autocast_dtype(args[0]) is None:
            return fn(*args, **kwargs)
        with torch.autocast(args[0].device.type, enabled=False):
            return fn(*args, **kwargs)

    return entry


def _transformed() -> bool:
    """Whether a ``torch.func`` transform (grad, vjp, jacrev, ...) is active: it refuses saved-tensor hooks, and so
    the checkpoints that bound the attention's memory under autograd."""
    return torch._C._functorch.peek_interpreter_stack() is not None


# ---------------------------------------------------------------------------------------------------
# centroids


def moba_centroids(k: torch.Tensor, block_size: int) -> torch.Tensor:
    r"""Per-block mean of the keys: :math:`\bar k_j = \frac{1}{|j|}\sum_{i=jB}^{\min((j+1)B,N)-1} k_i`.

    ``k`` is (batch, seqlen, kv_heads, head_dim). Returns (batch, n_blocks, kv_heads, head_dim) with
    ``n_blocks = ceil(seqlen / block_size)``, accumulated and returned in float32 (float64 when ``k`` is
    float64). A partial last block is the mean of the keys it really holds (no zero padding in the mean).

    Examples
    --------
    >>> import torch
    >>> k = torch.arange(6.0).view(1, 6, 1, 1)
    >>> moba_centroids(k, 4).flatten().tolist()
    [1.5, 4.5]
    """
    fn = "moba_centroids"
    C.check_keys(fn, k, path="reference")
    block_size = C.check_block_size(fn, block_size, "reference")
    return _centroids(k.to(C.compute_dtype(k.dtype)), block_size)


def _centroids(k: torch.Tensor, block_size: int) -> torch.Tensor:
    batch, seqlen, kv_heads, dim = k.shape
    # A block longer than the sequence is one block of all the keys, as a block of exactly seqlen is: summed as
    # that, so that the zero padding (below) never outgrows the keys.
    block_size = min(block_size, seqlen)
    n_blocks = math.ceil(seqlen / block_size)
    pad = n_blocks * block_size - seqlen
    # Zero rows added to the last block change its sum but not its count, which comes from the real length.
    padded = torch.nn.functional.pad(k, (0, 0, 0, 0, 0, pad))
    sums = padded.view(batch, n_blocks, block_size, kv_heads, dim).sum(dim=2)
    starts = torch.arange(n_blocks, device=k.device) * block_size
    counts = torch.clamp(seqlen - starts, max=block_size).to(k.dtype)
    return sums / counts.view(1, n_blocks, 1, 1)


# ---------------------------------------------------------------------------------------------------
# routing


def _best_blocks(scores: torch.Tensor, take: int) -> torch.Tensor:
    """Indices (..., take) of the highest scores, ranked by (score desc, index desc); -1 where a row has fewer
    than ``take`` scores above -inf. ``scores`` holds no NaN (-inf marks a block that cannot be selected).

    ``topk`` orders equal scores arbitrarily, so a row whose cut (its take-th best score) has more copies than
    ``topk`` kept is resolved again: every score above the cut, then the highest-index blocks at it; rows with
    equal scores are then ranked by index.
    """
    n = scores.shape[-1]
    width = min(take, n)
    if width == 0:
        return torch.full((*scores.shape[:-1], take), -1, dtype=torch.long, device=scores.device)
    # one more than needed: ties straddle the cut exactly when the next score equals it
    vals, idx = scores.topk(min(width + 1, n), dim=-1)
    if width < n:
        ambiguous = (vals[..., width - 1] > -math.inf) & (vals[..., width - 1] == vals[..., width])
        vals, idx = vals[..., :width].contiguous(), idx[..., :width].contiguous()
    else:
        ambiguous = torch.zeros(vals.shape[:-1], dtype=torch.bool, device=vals.device)
    cut = vals[..., -1:]
    if bool(ambiguous.any()):
        rows = ambiguous.nonzero(as_tuple=True)
        s, c = scores[rows], cut[rows]
        j = torch.arange(n, device=scores.device)
        key = torch.where(s > c, j + n, torch.where(s == c, j, -1))
        picked = key.topk(width, dim=-1).values
        idx[rows] = torch.where(picked >= n, picked - n, picked)
        vals[rows] = s.gather(-1, idx[rows])
    # topk's order is by score; rows with equal scores (or resolved above) are ranked again: by index
    # descending, then stably by score descending
    tied = ambiguous | ((vals[..., 1:] == vals[..., :-1]) & (vals[..., 1:] > -math.inf)).any(-1)
    if bool(tied.any()):
        rows = tied.nonzero(as_tuple=True)
        i, v = idx[rows], vals[rows]
        by_index = i.sort(dim=-1, descending=True).indices
        i, v = i.gather(-1, by_index), v.gather(-1, by_index)
        by_score = v.sort(dim=-1, descending=True, stable=True).indices
        idx[rows], vals[rows] = i.gather(-1, by_score), v.gather(-1, by_score)
    idx = idx.masked_fill(vals == -math.inf, -1)
    if width < take:
        idx = torch.nn.functional.pad(idx, (0, take - width), value=-1)
    return idx


def _equal_centroids(centroids: torch.Tensor) -> torch.Tensor | None:
    """Per (batch, kv head, block) the lowest block whose centroid equals this block's, int64 (batch, kv_heads, n);
    None when no two centroids of one (batch, kv head) are equal.

    Equal centroids score equally in exact arithmetic, but a matrix product need not round its columns alike (the
    summation order can follow a column's place in the kernel's tiles, and so the matrix's shape), which would
    rank such a tie by that place instead of by block index, and differently for another query chunk or batch.
    :func:`_route` gives every block its first equal's score instead.
    """
    batch, n_blocks, kv_heads, dim = centroids.shape
    if n_blocks < 2:
        return None
    rows = centroids.permute(0, 2, 1, 3).reshape(-1, dim)
    # the (batch, kv head) as a leading column, so that only centroids of one head are compared (exact in float32)
    owner = torch.arange(batch * kv_heads, device=rows.device, dtype=rows.dtype).repeat_interleave(n_blocks)
    distinct, inverse = torch.unique(torch.cat([owner.unsqueeze(1), rows], dim=1), dim=0, return_inverse=True)
    if distinct.shape[0] == rows.shape[0]:
        return None
    index = torch.arange(rows.shape[0], device=rows.device)
    first = torch.full((distinct.shape[0],), rows.shape[0], device=rows.device).scatter_reduce_(0, inverse, index,
                                                                                                  "amin")
    return (first[inverse] % n_blocks).view(batch, kv_heads, n_blocks)


def _route(q: torch.Tensor, centroids: torch.Tensor, t0: int, block_size: int, top_k: int,
           causal: bool, equal: torch.Tensor | None = None) -> torch.Tensor:
    """Selected blocks, int32 (batch, chunk, heads, top_k), for queries at positions t0, t0+1, ...

    ``q`` is the query chunk in the compute dtype; ``centroids`` (batch, n, kv_heads, d) likewise, with
    non-finite centroids already replaced by NaN; ``equal``: :func:`_equal_centroids` of them.
    """
    batch, chunk, heads, dim = q.shape
    n_blocks, kv_heads = centroids.shape[1], centroids.shape[2]
    group = heads // kv_heads
    device = q.device
    positions = torch.arange(t0, t0 + chunk, device=device)
    own = positions // block_size
    # causal queries of this chunk score only blocks before the last query's own block
    n_scored = min(n_blocks, int(own[-1])) if causal else n_blocks

    # scores (batch, kv_heads, group, chunk, n_scored): one matrix product per kv head, no output copy
    grouped = q.view(batch, chunk, kv_heads, group, dim).permute(0, 2, 3, 1, 4).reshape(
        batch, kv_heads, group * chunk, dim)
    scores = (grouped @ centroids[:, :n_scored].permute(0, 2, 3, 1)).view(batch, kv_heads, group, chunk, n_scored)
    if equal is not None and n_scored > 0:  # equal centroids score bitwise equally (their first one's score)
        scores = scores.gather(-1, equal[:, :, None, None, :n_scored].expand(scores.shape))
    # NaN ranks below every score (never selected). Replaced on every chunk rather than after a test for NaN: the
    # test would read the scores back to the host, a synchronisation per chunk on a GPU.
    scores.nan_to_num_(nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    if causal:
        past = torch.arange(n_scored, device=device).view(1, n_scored) < own.view(chunk, 1)
        scores.masked_fill_(~past, -math.inf)
        picked = _best_blocks(scores, top_k - 1)
    else:
        picked = _best_blocks(scores, top_k)
    picked = picked.permute(0, 3, 1, 2, 4).reshape(batch, chunk, heads, -1)
    if causal:
        picked = torch.cat([own.view(1, chunk, 1, 1).expand(batch, chunk, heads, 1), picked], dim=-1)
    return picked.to(torch.int32)


def _prepared_centroids(k: torch.Tensor, block_size: int, precision: str = "fp32") -> torch.Tensor:
    """Centroids in the compute dtype, NaN wherever a centroid is not finite (it then scores NaN); ``precision``
    "input": each rounded to k's dtype first (the compute dtype holds it exactly)."""
    cent = C.routed_centroids(_centroids(k.detach().to(C.compute_dtype(k.dtype)), block_size), k.dtype, precision)
    return C.unroutable_as_nan(cent)


def _chunk_size(query_chunk: int | None, per_query_bytes: int, seqlen: int) -> int:
    if query_chunk is not None:
        return query_chunk
    return max(1, min(seqlen, _MEMORY_BUDGET_BYTES // max(1, per_query_bytes)))


@_exact
def moba_topk(q: torch.Tensor, k: torch.Tensor, block_size: int, top_k: int, causal: bool = True, *,
              query_chunk: int | None = None, centroid_precision: str = "fp32") -> torch.Tensor:
    r"""MoBA routing: the key blocks each query attends, int32 (batch, seqlen, heads, top_k).

    Scores :math:`s_{t,j} = \langle q_t, \bar k_j \rangle` in float32 (float64 for float64 inputs), no
    :math:`1/\sqrt d`, with :math:`\bar k_j` from :func:`moba_centroids` on kv head
    ``h // (heads // kv_heads)``. Exact ties rank the higher block index first (blocks of equal centroids tie
    whatever the rounding of the product that scores them: each takes its first equal's score). Scores of NaN or -inf
    (a non-finite centroid scores NaN) are never selected; see the module docstring.

    ``centroid_precision``: "fp32" (the default) scores the fp32 mean itself; "input" scores
    :math:`T(\bar k_j)`, the mean rounded to the keys' dtype T, as MoBA and FlashMoBA store their centroids
    (the same for float32 and float64 keys). The CUDA router then needs one tensor-core product per score
    instead of two; selections of the two differ only where a row's scores lie within T's rounding of each other.

    Slot order:

    * ``causal=True``: slot 0 is the own block ``t // block_size``; slots ``1 .. top_k-1`` hold the
      best past blocks (``j < t // block_size``) by descending score; slots beyond the number of past
      blocks are ``-1``. ``top_k = 1`` selects the own block only.
    * ``causal=False``: slots ``0 .. top_k-1`` hold the best of all ``n`` blocks (partial last block
      included) by descending score; slots ``n .. top_k-1`` are ``-1`` when ``top_k > n``.

    ``query_chunk`` sets how many queries are scored at once (default: sized from a 1 GiB budget); the
    result does not depend on it.

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> q, k = torch.randn(1, 8, 1, 4, generator=g), torch.randn(1, 8, 1, 4, generator=g)
    >>> moba_topk(q, k, block_size=2, top_k=2)[0, :, 0].tolist()
    [[0, -1], [0, -1], [1, 0], [1, 0], [2, 0], [2, 0], [3, 0], [3, 1]]
    """
    fn = "moba_topk"
    C.check_inputs(fn, q, k, path="reference")
    block_size = C.check_block_size(fn, block_size, "reference")
    top_k = C.check_top_k(fn, top_k, "reference")
    causal = C.check_flag(fn, "causal", causal)
    centroid_precision = C.check_centroid_precision(fn, centroid_precision)
    if query_chunk is not None:
        query_chunk = C.check_positive_int(fn, "query_chunk", query_chunk)
    C.check_not_vmapped(fn, [("q", q), ("k", k)])
    if (torch.compiler.is_compiling() or C.is_fake(q)) and not q.is_cuda:
        # The selection branches on tensor values, which a graph (or fake tensors) cannot hold: the compiler sees
        # one opaque op (the result does not depend on query_chunk, which only bounds memory).
        from .autograd import moba_topk_op

        return moba_topk_op(q, k, block_size, top_k, causal, centroid_precision)

    batch, seqlen, heads, _ = q.shape
    n_blocks = math.ceil(seqlen / block_size)
    chunk = _chunk_size(query_chunk, batch * heads * n_blocks * _BYTES_PER_SCORE, seqlen)
    compute = C.compute_dtype(q.dtype)
    with torch.no_grad():
        centroids = _prepared_centroids(k, block_size, centroid_precision)
        equal = _equal_centroids(centroids)
        parts = [_route(q[:, t0:t0 + chunk].detach().to(compute), centroids, t0, block_size, top_k, causal, equal)
                 for t0 in range(0, seqlen, chunk)]
    return torch.cat(parts, dim=1)


@dataclass(frozen=True)
class _BlockCut:
    """Keys ``[start, start + n)`` cut into head (before the first block boundary), body (whole blocks) and tail
    (after the last boundary), as ranges local to them."""

    head: tuple[int, int]
    body: tuple[int, int]
    tail: tuple[int, int]


def _block_cut(start: int, n: int, block_size: int) -> _BlockCut:
    head = min(n, (-start) % block_size)
    body = (n - head) // block_size * block_size
    return _BlockCut((0, head), (head, head + body), (head + body, n))


def moba_block_sums(k: torch.Tensor, block_size: int, *, key_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per-block sums and counts of the keys of one part of a sequence: the pieces of :func:`moba_centroids`.

    ``k`` (batch, L, kv_heads, d) holds the keys at positions ``key_offset .. key_offset + L - 1`` of a longer
    sequence. For the blocks ``j = key_offset // B, ..., (key_offset + L - 1) // B`` it touches, returns
    ``sums`` (batch, n_touched, kv_heads, d), :math:`s_j = \sum_{i \in j,\ i \text{ held}} k_i` in float32
    (float64 for float64 keys), and ``counts`` (n_touched,) int64, the number of keys held. A block cut by the
    part's ends gets a partial sum; adding the parts' sums and counts per block and dividing gives the
    centroids, :math:`\bar k_j = \sum_p s_{p,j} / \sum_p c_{p,j}` (context parallelism: docs/design.md,
    "Context parallelism").

    Examples
    --------
    >>> import torch
    >>> k = torch.arange(6.0).view(1, 6, 1, 1)
    >>> s1, c1 = moba_block_sums(k[:, :3], 4)
    >>> s2, c2 = moba_block_sums(k[:, 3:], 4, key_offset=3)  # block 0 is cut after key 2
    >>> c1.tolist(), c2.tolist()
    ([3], [1, 2])
    >>> ((s1[0, 0] + s2[0, 0]) / 4).item(), (s2[0, 1] / 2).item()
    (1.5, 4.5)
    """
    fn = "moba_block_sums"
    C.check_keys(fn, k, path="reference")
    block_size = C.check_block_size(fn, block_size, "reference")
    _, key_offset, _ = _check_offsets(fn, None, key_offset)
    batch, n_keys, kv_heads, dim = k.shape
    front = key_offset % block_size
    n_touched = math.ceil((front + n_keys) / block_size)
    # the part is a cut head (keys of the block it starts inside), whole blocks, and a cut tail; each is summed
    # in the compute dtype straight from k (no converted or zero-padded copy: at millions of keys those copies
    # cost several times the sums)
    cut = _block_cut(key_offset, n_keys, block_size)
    (_, h1), (b0, b1), (t0, t1) = cut.head, cut.body, cut.tail
    with torch.no_grad():
        kd, acc = k.detach(), C.compute_dtype(k.dtype)
        pieces = [] if h1 == 0 else [kd[:, :h1].sum(dim=1, keepdim=True, dtype=acc)]
        if b1 > b0:
            whole = kd[:, b0:b1].reshape(batch, (b1 - b0) // block_size, block_size, kv_heads, dim)
            pieces.append(whole.sum(dim=2, dtype=acc))
        if t1 > t0:
            pieces.append(kd[:, t0:t1].sum(dim=1, keepdim=True, dtype=acc))
        sums = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
    starts = torch.arange(n_touched, device=k.device) * block_size - front
    counts = (starts + block_size).clamp(max=n_keys) - starts.clamp(min=0)
    return sums, counts


@_exact
def moba_topk_from_centroids(q: torch.Tensor, centroids: torch.Tensor, block_size: int, top_k: int,
                             causal: bool = True, *, query_offset: int = 0,
                             query_chunk: int | None = None) -> torch.Tensor:
    r"""MoBA routing of queries at positions ``query_offset + t`` against given block centroids.

    The rule of :func:`moba_topk` (scores :math:`s_{t,j} = \langle q_t, \bar k_j \rangle`, ties, slot order,
    -1 slots) with the centroids given: ``centroids`` (batch, n_blocks, kv_heads, d) of a sequence whose block
    ``j`` is positions ``[jB, (j+1)B)``, e.g. from :func:`moba_centroids` or the parts' :func:`moba_block_sums`;
    ``q`` (batch, T, heads, d) the queries at positions ``query_offset .. query_offset + T - 1`` of that
    sequence (with ``causal``, their own blocks must be among the centroids). Scored in q's compute dtype.
    Returns int32 (batch, T, heads, top_k) block indices of the whole sequence: for ``query_offset = 0`` and
    the centroids of ``k``, ``moba_topk(q, k, ...)``.

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> q, k = torch.randn(1, 8, 1, 4, generator=g), torch.randn(1, 8, 1, 4, generator=g)
    >>> late = moba_topk_from_centroids(q[:, 5:], moba_centroids(k, 2), 2, 2, query_offset=5)
    >>> torch.equal(late, moba_topk(q, k, 2, 2)[:, 5:])
    True
    """
    fn = "moba_topk_from_centroids"
    C.check_keys(fn, q, path="reference")
    block_size = C.check_block_size(fn, block_size, "reference")
    top_k = C.check_top_k(fn, top_k, "reference")
    causal = C.check_flag(fn, "causal", causal)
    query_offset, _, _ = _check_offsets(fn, query_offset, None)
    if query_chunk is not None:
        query_chunk = C.check_positive_int(fn, "query_chunk", query_chunk)
    C.check_tensor(fn, "centroids", centroids)
    batch, n_q, heads, dim = q.shape
    if centroids.dim() != 4 or centroids.shape[0] != batch or centroids.shape[3] != dim or (
            heads % centroids.shape[2] != 0) or not centroids.is_floating_point():
        raise ValueError(f"{fn}: centroids have shape {tuple(centroids.shape)} and dtype {centroids.dtype}; "
                         f"expected float (batch, n_blocks, kv_heads, head_dim) with batch {batch}, head_dim "
                         f"{dim} and heads {heads} a multiple of kv_heads")
    C.check_same_device(fn, [("q", q), ("centroids", centroids)])
    n_blocks = centroids.shape[1]
    last = query_offset + n_q - 1
    if causal and last // block_size >= n_blocks:
        raise ValueError(f"{fn}: the last query (position {last}) lies in block {last // block_size}, beyond the "
                         f"{n_blocks} centroids given; causal routing needs every query's own block")
    compute = C.compute_dtype(q.dtype)
    chunk = _chunk_size(query_chunk, batch * heads * n_blocks * _BYTES_PER_SCORE, n_q)
    with torch.no_grad():
        cent = C.unroutable_as_nan(centroids.detach().to(compute))  # as moba_topk's
        equal = _equal_centroids(cent)
        parts = [_route(q[:, t0:t0 + chunk].detach().to(compute), cent, query_offset + t0, block_size, top_k,
                        causal, equal) for t0 in range(0, n_q, chunk)]
    return torch.cat(parts, dim=1)


# ---------------------------------------------------------------------------------------------------
# attention over the selected blocks


def _segments(seg: torch.Tensor):
    """Group rows by segment id: yields (segment ids (S,), rows (S, cap), real (L,)) per size class.

    ``rows[s]`` lists the rows of segment ``s``, padded to ``cap`` by repeating its last row; ``real`` holds
    the flat positions (in ``rows.flatten()``) of the real ones. A class holds the segments with
    ``cap / 2 < count <= cap``, so padding wastes less than half of a class and segments of any length stay
    within the same bounded memory.
    """
    seg_sorted, order = torch.sort(seg.int() if seg.numel() and int(seg.max()) < 2**31 else seg)
    ids, counts = torch.unique_consecutive(seg_sorted, return_counts=True)
    starts = counts.cumsum(0) - counts
    size_class = torch.ceil(torch.log2(counts.double())).long()
    for c in torch.unique(size_class).tolist():
        which = (size_class == c).nonzero().squeeze(1)
        count = counts[which].unsqueeze(1)
        cap = int(count.max())
        offsets = torch.arange(cap, device=seg.device)
        rows = order[starts[which].unsqueeze(1) + torch.minimum(offsets, count - 1)]
        yield ids[which].long(), rows, (offsets < count).flatten().nonzero().squeeze(1)


def _block_rows(ids: torch.Tensor, block_size: int, seqlen: int, kv_heads: int,
                key_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys of segments ``ids`` = ``(batch * kv_heads + kv head) * n_blocks + block``: their positions (S, W) and
    their rows (S, W) in (batch, seqlen, kv_heads, d) flattened to rows, the keys being those of positions
    ``key_offset ..`` (n_blocks = ceil((key_offset + seqlen) / B)); positions not held read the nearest held
    key (they are masked, :func:`_not_held`).

    ``W = min(B, seqlen)``: a block holds at most that many of the keys, all of them inside the window of W
    positions that starts at its first key held, moved back where needed to end inside the block. So a block
    far longer than the keys costs what the keys cost; with ``B <= seqlen`` the window is the whole block.
    """
    n_blocks = math.ceil((key_offset + seqlen) / block_size)
    width = min(block_size, seqlen)
    first = (ids % n_blocks) * block_size
    start = torch.minimum(first.clamp(min=key_offset), first + (block_size - width))
    positions = start.unsqueeze(1) + torch.arange(width, device=ids.device)
    batch_kv = (ids // n_blocks).unsqueeze(1)
    held = (positions - key_offset).clamp(min=0, max=seqlen - 1)
    rows = ((batch_kv // kv_heads) * seqlen + held) * kv_heads + batch_kv % kv_heads
    return positions, rows


def _not_held(keys: torch.Tensor, key_offset: int, seqlen: int) -> torch.Tensor:
    """Key positions the keys given do not hold: before ``key_offset`` or past the last one."""
    return (keys < key_offset) | (keys >= key_offset + seqlen)


def _weighted_values(p: torch.Tensor, v: torch.Tensor, hidden, v_finite: bool) -> torch.Tensor:
    """``p @ v`` in which a key that is not attended contributes nothing, even when its value is not finite.

    A plain product would turn 0 * NaN of a masked key (a future key of the own block) into NaN for every
    query of the block; instead the product runs on finite values and exactly the output elements whose
    attended values include a non-finite one are set to NaN. ``hidden`` (None: every key is attended) marks
    the keys that are not.
    """
    if v_finite or hidden is None:
        return p @ v
    finite = torch.isfinite(v)
    out = p @ torch.where(finite, v, 0.0)
    reaches = (~hidden).to(v.dtype) @ (~finite).to(v.dtype)
    return out.masked_fill(reaches > 0, math.nan)


def _row_layout(topk: torch.Tensor, positions: torch.Tensor, block_size: int, kv_heads: int, n_blocks: int,
                causal: bool, key_range: tuple[int, int] | None = None):
    """The (query, head, slot) rows of a chunk that select a block.

    Returns per row: the flat (batch, query, head, slot) index, the query's position, the segment id
    ``(batch * kv_heads + kv head) * n_blocks + block`` (see :func:`_block_rows`) and whether the block is the
    query's own (causal: the one block whose keys are cut at the query). A causal query never attends keys
    after it, so a selected block that starts after the query adds nothing and is dropped here (routing never
    selects one; given routing may). With ``key_range`` = (first, end) the keys given are those of positions
    first .. end - 1: blocks holding none of them (or, causal, none before the query) are dropped too.
    """
    batch, chunk, heads, slots = topk.shape
    selected = topk >= 0
    first_key = topk.long() * block_size  # int64: an int32 product would wrap for blocks of 2**31 keys and more
    if key_range is not None:
        selected &= (first_key + block_size > key_range[0]) & (first_key < key_range[1])
        first_key = first_key.clamp(min=key_range[0])  # the block's first key held
    if causal:
        selected &= first_key <= positions.view(1, chunk, 1, 1)
    slot_index = selected.reshape(-1).nonzero().squeeze(1)
    blocks = topk.reshape(-1)[slot_index].long()
    query = slot_index // slots
    pos = positions[(query // heads) % chunk]
    head = query % heads
    seg = ((query // (heads * chunk)) * kv_heads + head // (heads // kv_heads)) * n_blocks + blocks
    own = (blocks == pos // block_size) if causal else None
    return slot_index, pos, seg, own


def _attend(q: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk: torch.Tensor,
            seqlen: int, kv_heads: int, block_size: int, causal: bool, scale: float, v_finite: bool,
            key_offset: int | None = None):
    """Attention of a chunk of queries over their selected blocks.

    ``q`` (batch, T, heads, d) in the compute dtype at sequence ``positions`` (T,); ``k``, ``v``: the keys and
    values (batch, seqlen, kv_heads, d) flattened to rows (read block by block and converted to q's dtype), of
    positions ``key_offset ..`` when given (a part of the sequence: what is not held is masked); ``topk``
    (batch, T, heads, slots), -1 = unused slot. Returns (out (batch, T, heads, d), lse (batch, T, heads)).
    """
    batch, chunk, heads, dim = q.shape
    slots = topk.shape[-1]
    offset = key_offset or 0
    n_blocks = math.ceil((offset + seqlen) / block_size)
    key_range = None if key_offset is None else (offset, offset + seqlen)
    slot_index, pos, seg, own = _row_layout(topk, positions, block_size, kv_heads, n_blocks, causal, key_range)
    q_rows = (q * scale).reshape(-1, dim)

    def gather(x, index):  # rows of x at index (any shape), as (*index.shape, d)
        return x.index_select(0, index.reshape(-1)).view(*index.shape, dim)

    # per (query, head, slot): the partial softmax over the slot's block, lse -inf for an unused slot
    slot_out = q.new_empty(topk.numel(), dim)
    slot_lse = q.new_full((topk.numel(),), -math.inf)
    # causal rows of their own block need the token mask; rows of past blocks read every key of the block
    groups = [own.nonzero().squeeze(1), (~own).nonzero().squeeze(1)] if causal else [None]
    for group in groups:
        for ids, rows, real in _segments(seg if group is None else seg[group]):
            if group is not None:
                rows = group[rows]
            keys, key_rows = _block_rows(ids, block_size, seqlen, kv_heads, offset)  # (S, B)
            row_slots = slot_index.index_select(0, rows.view(-1))
            not_held = _not_held(keys, offset, seqlen).unsqueeze(1)  # the partial last block, or a part's ends
            if group is groups[0] and causal:
                hidden = keys.unsqueeze(1) > pos.index_select(0, rows.view(-1)).view(*rows.shape, 1)
                hidden = hidden | not_held if key_range is not None else hidden
            else:
                hidden = not_held if bool(not_held.any()) else None
            scores = gather(q_rows, (row_slots // slots).view(rows.shape)) @ gather(k, key_rows).to(
                q.dtype).transpose(-1, -2)  # (S, cap, B)
            if hidden is not None:
                scores.masked_fill_(hidden, -math.inf)
            peak = scores.detach().amax(dim=-1, keepdim=True)
            p = scores.sub_(peak).exp_()
            total = p.sum(dim=-1, keepdim=True)
            out = _weighted_values(p, gather(v, key_rows).to(q.dtype), hidden, v_finite).div_(total)
            lse = (peak + torch.log(total)).view(-1)
            real_slots = row_slots.index_select(0, real)
            slot_out.index_copy_(0, real_slots, out.view(-1, dim).index_select(0, real))
            slot_lse.index_copy_(0, real_slots, lse.index_select(0, real))

    slot_out.index_fill_(0, (slot_lse == -math.inf).nonzero().squeeze(1), 0.0)  # unused slots

    # merge the slots of each query: lse = log sum exp(lse_s), out = sum exp(lse_s - lse) out_s
    slot_lse = slot_lse.view(-1, slots)
    lse = torch.logsumexp(slot_lse, dim=-1)
    # a query that selected nothing keeps out = 0 and lse = -inf (weights exp(-inf) = 0, not NaN)
    weight = torch.exp(slot_lse - torch.where(lse == -math.inf, 0.0, lse).unsqueeze(1))
    out = weight.unsqueeze(1) @ slot_out.view(-1, slots, dim)
    return out.view(batch, chunk, heads, dim), lse.view(batch, chunk, heads)


def _attention_chunk_bytes(batch: int, heads: int, slots: int, block_size: int, dim: int, n_keys: int) -> int:
    """Scratch per query of a chunk's attention; a row reads at most ``min(B, n_keys)`` keys (:func:`_block_rows`)."""
    rows = batch * heads * slots
    return rows * (min(block_size, n_keys) * _BYTES_PER_ROW_KEY + dim * _BYTES_PER_ROW_FEATURE)


def _attend_chunks(q, k, v, positions, routing, block_size, causal, scale, chunk, query_offset=0, key_offset=None):
    """Run :func:`_attend` over query chunks; ``routing(lo, hi, q_chunk)`` gives the chunk's selection.

    ``positions``: the query positions, None for all of them in order from ``query_offset``; ``key_offset``:
    the position of the first key when k and v are a part of the sequence (None: the whole). Returns (out in
    q's dtype, lse in the compute dtype); each chunk is checkpointed under autograd.
    """
    compute = C.compute_dtype(q.dtype)
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    transformed = needs_grad and _transformed()  # no checkpoints: autograd keeps each chunk's tensors instead
    seqlen, kv_heads, dim = k.shape[1], k.shape[2], k.shape[3]
    if needs_grad:  # one conversion, so that gradients accumulate in the compute dtype
        k, v = k.to(compute), v.to(compute)
    k_rows, v_rows = k.reshape(-1, dim), v.reshape(-1, dim)
    v_finite = bool(torch.isfinite(v).all())
    n_q = q.shape[1] if positions is None else positions.numel()
    out = q.new_empty((q.shape[0], n_q, q.shape[2], q.shape[3]))
    lse = q.new_empty((q.shape[0], n_q, q.shape[2]), dtype=compute)
    for lo in range(0, n_q, chunk):
        hi = min(n_q, lo + chunk)
        if positions is None:  # a slice: no copy, and its gradient is no full-size tensor per chunk
            pos = torch.arange(query_offset + lo, query_offset + hi, device=q.device)
            q_chunk = q[:, lo:hi].to(compute)
        else:
            pos = positions[lo:hi]
            q_chunk = q[:, pos].to(compute)
        with torch.no_grad():
            selected = routing(lo, hi, q_chunk)
        args = (q_chunk, pos, k_rows, v_rows, selected, seqlen, kv_heads, block_size, causal, scale, v_finite,
                key_offset)
        if needs_grad and not transformed:
            o, l_ = checkpoint(_attend, *args, use_reentrant=False)
        else:
            o, l_ = _attend(*args)
        out[:, lo:hi] = o
        lse[:, lo:hi] = l_
    return out, lse


@_exact
def moba_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, top_k: int,
                   causal: bool = True, softmax_scale: float | None = None, return_lse: bool = False, *,
                   query_chunk: int | None = None, centroid_precision: str = "fp32"):
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
    chunk (default: sized from a 1 GiB budget); the result does not depend on it. ``centroid_precision``:
    the routing's centroids, as :func:`moba_topk`.

    Under ``torch.autocast`` it computes in these dtypes all the same (autocast is off inside: the routing
    scores and the partials keep the compute dtype), so ``out`` has q's dtype. Under ``torch.func`` transforms
    (``grad``, ``vjp``, ``jacrev``), which refuse the checkpoints' saved-tensor hooks, the chunks are not
    checkpointed; ``torch.func.vmap`` is refused (the selected blocks' shapes depend on the data: fold the
    mapped dimension into the batch). Fake tensors (``FakeTensorMode``) get their shapes from the custom op's
    fake implementation.

    Under ``torch.compile`` (``fullgraph=True`` included), tensors not on a CUDA device run as the custom op
    ``mobalab::moba_attention_fwd`` (:mod:`mobalab.kernels.autograd`), whose body is this module's
    :func:`moba_topk` and :func:`moba_attention_given_routing`: the same ``out`` and ``lse``, bit for bit, and
    gradients by :func:`moba_attention_backward` (equal up to rounding to those of the eager chunks; the op sizes
    its chunks from the budget, ``query_chunk`` aside).

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> q, k, v = (torch.randn(1, 8, 2, 4, generator=g) for _ in range(3))
    >>> out, lse = moba_attention(q, k, v, block_size=2, top_k=2, return_lse=True)
    >>> out.shape, lse.shape
    (torch.Size([1, 8, 2, 4]), torch.Size([1, 8, 2]))
    >>> round(out[0, 0, 0, 0].item(), 4) == round(v[0, 0, 0, 0].item(), 4)  # query 0 sees key 0 only
    True
    """
    fn = "moba_attention"
    C.check_inputs(fn, q, k, v, path="reference")
    block_size = C.check_block_size(fn, block_size, "reference")
    top_k = C.check_top_k(fn, top_k, "reference")
    causal = C.check_flag(fn, "causal", causal)
    return_lse = C.check_flag(fn, "return_lse", return_lse)
    if query_chunk is not None:
        query_chunk = C.check_positive_int(fn, "query_chunk", query_chunk)
    centroid_precision = C.check_centroid_precision(fn, centroid_precision)
    batch, seqlen, heads, dim = q.shape
    scale = C.check_softmax_scale(fn, softmax_scale, dim)
    C.check_not_vmapped(fn, [("q", q), ("k", k), ("v", v)])
    if (torch.compiler.is_compiling() or C.is_fake(q)) and not q.is_cuda:
        # The routing and the segment loop below branch on tensor values, which a graph (or fake tensors) cannot
        # hold; the compiler sees one opaque op instead (as the CUDA path and moba_attention_varlen do).
        from .autograd import moba_attention_autograd

        return moba_attention_autograd(q, k, v, block_size, top_k, causal=causal, softmax_scale=softmax_scale,
                                       return_lse=return_lse, centroid_precision=centroid_precision)

    n_blocks = math.ceil(seqlen / block_size)
    # slots beyond the n blocks there are stay unused (-1): a top_k far above n (dense attention asked for by a
    # large k) then gathers and routes no more than k = n
    top_k = min(top_k, n_blocks)
    chunk = _chunk_size(query_chunk, _attention_chunk_bytes(batch, heads, top_k, block_size, dim, seqlen), seqlen)
    route_chunk = _chunk_size(query_chunk, batch * heads * n_blocks * _BYTES_PER_SCORE, seqlen)
    with torch.no_grad():
        centroids = _prepared_centroids(k, block_size, centroid_precision)
        equal = _equal_centroids(centroids)

    def routing(lo, hi, q_chunk):
        q_chunk = q_chunk.detach()
        return torch.cat([_route(q_chunk[:, a:a + route_chunk], centroids, lo + a, block_size, top_k, causal, equal)
                          for a in range(0, hi - lo, route_chunk)], dim=1)

    out, lse = _attend_chunks(q, k, v, None, routing, block_size, causal, scale, chunk)
    return (out, lse) if return_lse else out


@_exact
def moba_attention_given_routing(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk: torch.Tensor,
                                 block_size: int, causal: bool = True, softmax_scale: float | None = None, *,
                                 query_offset: int | None = None, key_offset: int | None = None):
    r"""MoBA attention with the routing given: each query attends the blocks ``topk`` lists for it.

    The attention equations of :func:`moba_attention` with :math:`S_t` the keys of the blocks in
    ``topk[b, t, h]`` (int (batch, seqlen, heads, slots), -1 = unused slot; each listed block counts once per
    slot it appears in), keys :math:`\le t` only when ``causal``. Returns (``out`` in q's dtype, ``lse`` in
    float32, float64 for float64 inputs); differentiable w.r.t. q, k and v. This is the oracle the CUDA
    attention kernels are tested against (same routing on both sides).

    Parts of one sequence: given ``query_offset`` or ``key_offset`` (None = 0), ``q`` holds the queries at
    positions ``query_offset + i`` and ``k``, ``v`` the keys at positions ``key_offset + j`` (any lengths;
    ``topk`` lists blocks of the whole sequence, block ``b`` being positions ``[bB, (b+1)B)``, so a part may cut
    blocks). :math:`S_t` is then restricted to the keys held; a query that selects none of them gets ``out`` 0
    and ``lse`` :math:`-\infty`. The parts' results combine into the whole by
    :math:`\mathrm{lse} = \log\sum_p e^{\mathrm{lse}_p}`, :math:`o = \sum_p e^{\mathrm{lse}_p - \mathrm{lse}} o_p`
    (docs/design.md, "Context parallelism").

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> q, k, v = (torch.randn(1, 6, 1, 4, generator=g) for _ in range(3))
    >>> topk = moba_topk(q, k, 2, 2)
    >>> out, lse = moba_attention_given_routing(q, k, v, topk, 2)
    >>> torch.allclose(out, moba_attention(q, k, v, 2, 2))
    True

    The same from two parts of the keys, positions 0..2 and 3..5 (which cut block 1):

    >>> o1, l1 = moba_attention_given_routing(q, k[:, :3], v[:, :3], topk, 2, key_offset=0)
    >>> o2, l2 = moba_attention_given_routing(q, k[:, 3:], v[:, 3:], topk, 2, key_offset=3)
    >>> both = torch.logaddexp(l1, l2)
    >>> merged = o1 * (l1 - both).exp().unsqueeze(-1) + o2 * (l2 - both).exp().unsqueeze(-1)
    >>> torch.allclose(merged, out), torch.allclose(both, lse)
    (True, True)
    """
    fn = "moba_attention_given_routing"
    query_offset, key_offset, parts = _check_offsets(fn, query_offset, key_offset)
    C.check_inputs(fn, q, k, v, path="reference", same_seqlen=not parts)
    block_size = C.check_block_size(fn, block_size, "reference")
    causal = C.check_flag(fn, "causal", causal)
    batch, seqlen, heads, dim = q.shape
    scale = C.check_softmax_scale(fn, softmax_scale, dim)
    C.check_not_vmapped(fn, [("q", q), ("k", k), ("v", v), ("topk", topk)])
    slots = _check_routing(fn, topk, q, block_size, whole=not parts)
    chunk = _chunk_size(None, _attention_chunk_bytes(batch, heads, slots, block_size, dim, k.shape[1]), seqlen)

    def routing(lo, hi, q_chunk):
        return topk[:, lo:hi]

    return _attend_chunks(q, k, v, None, routing, block_size, causal, scale, chunk, query_offset,
                          key_offset if parts else None)


def _check_routing(fn: str, topk, q, block_size: int, whole: bool = True) -> int:
    """``topk`` of q's (batch, seqlen, heads) and some slots; block indices -1 .. n_blocks - 1 when q and k are
    the whole sequence (``whole``), else -1 and up (a part's queries select blocks its keys may not hold)."""
    C.check_tensor(fn, "topk", topk)
    if topk.dim() != 4 or tuple(topk.shape[:3]) != tuple(q.shape[:3]) or topk.shape[3] < 1:
        raise ValueError(f"{fn}: topk has shape {tuple(topk.shape)}; expected (batch, seqlen, heads, slots) = "
                         f"{tuple(q.shape[:3])} + (slots >= 1,)")
    C.check_topk_indices(fn, topk, q, topk.shape[3], name="topk")
    lo, hi = int(topk.min()), int(topk.max())
    if whole:
        n_blocks = math.ceil(q.shape[1] / block_size)
        if lo < -1 or hi >= n_blocks:
            raise ValueError(f"{fn}: topk holds block indices {lo}..{hi}; supported: -1 (unused) and "
                             f"0..{n_blocks - 1}")
    elif lo < -1:
        raise ValueError(f"{fn}: topk holds block indices {lo}..{hi}; supported: -1 (unused) and 0 and up")
    return int(topk.shape[3])


def _check_offsets(fn: str, query_offset, key_offset) -> tuple[int, int, bool]:
    """Positions of the first query and the first key in the whole sequence (integers >= 0, None = 0), and
    whether q and k are parts of a longer sequence (an offset given) rather than the whole one."""
    for name, value in (("query_offset", query_offset), ("key_offset", key_offset)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0):
            raise ValueError(f"{fn}: {name} must be an integer >= 0 or None, got {value!r}")
    return int(query_offset or 0), int(key_offset or 0), query_offset is not None or key_offset is not None


@_exact
def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    softmax_scale: float | None = None, query_positions=None):
    r"""Dense softmax attention, :math:`o_t = \sum_{i \in S_t} \mathrm{softmax}_i(\sigma q_t\cdot k_i)\, v_i` with
    :math:`S_t = \{i \le t\}` (causal) or every key, for all queries or only ``query_positions``.

    Dense attention is MoBA whose routing selects every block (docs/design.md, "MoBA semantics"), and it is
    computed that way, in query chunks of bounded memory: nothing of size N x N is built, so a few query rows
    of a very long sequence are cheap. Shapes as in :func:`moba_attention`; ``query_positions`` is a 1-D
    sequence of positions in ``0 .. seqlen-1`` (default: all). Returns (``out`` (batch, Q, heads, d) in q's
    dtype, ``lse`` (batch, Q, heads) in float32, float64 for float64 inputs).

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> q, k, v = (torch.randn(1, 5, 2, 4, generator=g) for _ in range(3))
    >>> out, lse = dense_attention(q, k, v, query_positions=[4])
    >>> sdpa = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
    ...                                                         v.transpose(1, 2), is_causal=True)
    >>> torch.allclose(out[:, 0], sdpa.transpose(1, 2)[:, 4], atol=1e-6)
    True
    """
    fn = "dense_attention"
    C.check_inputs(fn, q, k, v, path="reference")
    causal = C.check_flag(fn, "causal", causal)
    batch, seqlen, heads, dim = q.shape
    scale = C.check_softmax_scale(fn, softmax_scale, dim)
    C.check_not_vmapped(fn, [("q", q), ("k", k), ("v", v)])
    positions = _check_positions(fn, query_positions, seqlen, q.device)
    block_size = min(_DENSE_BLOCK, seqlen)
    n_blocks = math.ceil(seqlen / block_size)
    blocks = torch.arange(n_blocks, device=q.device)
    chunk = _chunk_size(None, _attention_chunk_bytes(batch, heads, n_blocks, block_size, dim, seqlen),
                        positions.numel())

    def routing(lo, hi, q_chunk):
        pos = positions[lo:hi]
        every = blocks.expand(pos.numel(), n_blocks)
        if causal:
            every = torch.where(every <= (pos // block_size).unsqueeze(1), every, -1)
        return every.view(1, -1, 1, n_blocks).expand(batch, -1, heads, -1)

    given = None if query_positions is None else positions
    return _attend_chunks(q, k, v, given, routing, block_size, causal, scale, chunk)


def _check_positions(fn: str, query_positions, seqlen: int, device) -> torch.Tensor:
    if query_positions is None:
        return torch.arange(seqlen, device=device)
    try:
        pos = torch.as_tensor(query_positions, device=device)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{fn}: query_positions must be a 1-D sequence of integers, got "
                        f"{type(query_positions).__name__}") from exc
    if pos.dim() != 1 or pos.numel() == 0 or pos.dtype.is_floating_point or pos.dtype == torch.bool:
        raise ValueError(f"{fn}: query_positions must be a non-empty 1-D sequence of integers, got "
                         f"{pos.dtype} of shape {tuple(pos.shape)}")
    lo, hi = int(pos.min()), int(pos.max())
    if lo < 0 or hi >= seqlen:
        raise ValueError(f"{fn}: query_positions span {lo}..{hi}; supported: 0..{seqlen - 1}")
    return pos.long()


# ---------------------------------------------------------------------------------------------------
# backward


@_exact
def moba_attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            out: torch.Tensor, lse: torch.Tensor, topk: torch.Tensor, block_size: int,
                            causal: bool = True, softmax_scale: float | None = None, dlse=None, *,
                            query_offset: int | None = None, key_offset: int | None = None):
    r"""Gradients (dq, dk, dv) of MoBA attention with given routing: the equations the CUDA backward implements.

    With :math:`P_{ti} = e^{\sigma q_t\cdot k_i - \mathrm{lse}_t}` on the attended keys (0 elsewhere):

    .. math::
        D_t = \textstyle\sum_c dO_{t,c}\, O_{t,c} - d\mathrm{lse}_t, \qquad
        dS_{ti} = P_{ti}\,(dO_t\cdot v_i - D_t),

        dV_i = \textstyle\sum_t P_{ti}\, dO_t, \qquad
        dQ_t = \sigma \textstyle\sum_i dS_{ti}\, k_i, \qquad
        dK_i = \sigma \textstyle\sum_t dS_{ti}\, q_t,

    summed over the query heads of each kv head (GQA). ``out`` and ``lse`` are the forward's
    (:func:`moba_attention_given_routing` with the same ``topk``), ``dout`` the gradient w.r.t. ``out`` and
    ``dlse`` (batch, seqlen, heads) the one w.r.t. ``lse`` (None: zero). Computed block by block like the
    forward, with bounded memory; gradients come back in the input dtype.

    ``query_offset`` and ``key_offset`` place q and k in a longer sequence as in
    :func:`moba_attention_given_routing`. With ``out`` and ``lse`` of the whole attention (all parts of the
    keys combined) the results are the whole gradient's terms of the keys held: dq sums over the parts, dk and
    dv are exact for the keys held.

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> q, k, v, dout = (torch.randn(1, 6, 1, 4, dtype=torch.float64, generator=g) for _ in range(4))
    >>> topk = moba_topk(q, k, 2, 2)
    >>> out, lse = moba_attention_given_routing(q, k, v, topk, 2)
    >>> dq, dk, dv = moba_attention_backward(dout, q, k, v, out, lse, topk, 2)
    >>> leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    >>> ref = torch.autograd.grad((moba_attention_given_routing(*leaves, topk, 2)[0] * dout).sum(), leaves)
    >>> all(torch.allclose(a, b) for a, b in zip((dq, dk, dv), ref))
    True
    """
    fn = "moba_attention_backward"
    query_offset, key_offset, parts = _check_offsets(fn, query_offset, key_offset)
    C.check_inputs(fn, q, k, v, path="reference", same_seqlen=not parts)
    block_size = C.check_block_size(fn, block_size, "reference")
    causal = C.check_flag(fn, "causal", causal)
    batch, seqlen, heads, dim = q.shape
    n_keys = k.shape[1]
    scale = C.check_softmax_scale(fn, softmax_scale, dim)
    C.check_not_vmapped(fn, [("dout", dout), ("q", q), ("k", k), ("v", v), ("topk", topk)])
    slots = _check_routing(fn, topk, q, block_size, whole=not parts)
    C.check_like(fn, "dout", dout, q.shape, device=q.device)
    C.check_like(fn, "out", out, q.shape, device=q.device)
    C.check_like(fn, "lse", lse, q.shape[:3], device=q.device)
    if dlse is not None:
        C.check_like(fn, "dlse", dlse, q.shape[:3], device=q.device)

    compute = C.compute_dtype(q.dtype)
    kv_heads = k.shape[2]
    n_blocks = math.ceil((key_offset + n_keys) / block_size)
    key_range = (key_offset, key_offset + n_keys) if parts else None
    with torch.no_grad():
        q_rows, g_rows = (x.to(compute).reshape(-1, dim) for x in (q, dout))
        k_rows, v_rows = (x.to(compute).reshape(-1, dim) for x in (k, v))
        lse_rows = lse.to(compute).reshape(-1)
        delta = (dout.to(compute) * out.to(compute)).sum(-1).reshape(-1)
        if dlse is not None:
            delta = delta - dlse.to(compute).reshape(-1)
        dq = torch.zeros_like(q_rows)
        dk, dv = torch.zeros_like(k_rows), torch.zeros_like(v_rows)
        positions = torch.arange(query_offset, query_offset + seqlen, device=q.device)
        chunk = _chunk_size(None, 2 * _attention_chunk_bytes(batch, heads, slots, block_size, dim, n_keys), seqlen)
        for t0 in range(0, seqlen, chunk):
            t1 = min(seqlen, t0 + chunk)
            slot_index, pos, seg, _ = _row_layout(topk[:, t0:t1], positions[t0:t1], block_size, kv_heads,
                                                  n_blocks, causal, key_range)
            # (batch, chunk query, head) -> (batch, query, head) of the whole sequence
            query = slot_index // slots
            query = query + (query // (heads * (t1 - t0))) * heads * (seqlen - (t1 - t0)) + t0 * heads
            for ids, rows, real in _segments(seg):
                keys, key_rows = _block_rows(ids, block_size, n_keys, kv_heads, key_offset)  # (S, B)
                valid = torch.zeros(rows.numel(), dtype=torch.bool, device=q.device)
                valid[real] = True
                held = ~_not_held(keys, key_offset, n_keys)
                attended = held.unsqueeze(1) & valid.view(rows.shape).unsqueeze(-1)  # padding adds 0
                if causal:
                    attended = attended & (keys.unsqueeze(1) <= pos[rows].unsqueeze(-1))
                r = query[rows]  # (S, cap)
                qr, gr, k_blk, v_blk = q_rows[r], g_rows[r], k_rows[key_rows], v_rows[key_rows]
                p = torch.exp((qr @ k_blk.transpose(-1, -2)) * scale - lse_rows[r].unsqueeze(-1))
                p = torch.where(attended, p, 0.0)
                ds = p * ((gr @ v_blk.transpose(-1, -2)) - delta[r].unsqueeze(-1))
                dq.index_add_(0, r.reshape(-1)[real], (ds @ k_blk).reshape(-1, dim)[real], alpha=scale)
                in_seq = held.reshape(-1)  # keys not held: the nearest held key read again, adds nothing
                dk.index_add_(0, key_rows.reshape(-1)[in_seq], (ds.transpose(-1, -2) @ qr).reshape(-1, dim)[in_seq],
                              alpha=scale)
                dv.index_add_(0, key_rows.reshape(-1)[in_seq], (p.transpose(-1, -2) @ gr).reshape(-1, dim)[in_seq])
    return dq.view(q.shape).to(q.dtype), dk.view(k.shape).to(k.dtype), dv.view(v.shape).to(v.dtype)
