r"""MoBA decode on the GPU in two or three plain launches (cuda/decode_split.cu): the launch plan and the runner.

The bandwidth-first alternative to the fused persistent kernel of :mod:`._cuda_decode` (same semantics,
layouts and outputs; the kernel file's header has the design, the byte counts and the predictions):

1. ``moba_decode_route_score_*``: one CTA per (sequence, kv head, row group of <= 64 query rows, range of
   ``range_blocks`` candidate blocks); its warps stream the block sums (16 float4 loads per lane in flight)
   and write :math:`s_j = q\cdot S_j` of every row to an fp32 scratch (b, kv_heads, R, n_cols), NaN where
   block j is not a candidate of the row;
2. ``moba_decode_route_select``: ``select_wpr`` warps per (sequence, kv head, row), 8 // select_wpr rows per
   CTA; a row's warps keep sorted lists of the best k - 1 (score desc, block desc) one entry per lane, merged in a
   tree of bitonic merges, and the row's first warp writes ``sel``; it also enters the row's blocks into its kv
   head's set of selected blocks (a bitmap in the cache's zeroed workspace: the same set, and so the same outputs
   bit for bit, whatever the order in which the rows enter their blocks);
3. ``moba_decode_attend_*``: ``cpg`` CTAs of 4 warps per (sequence, kv head) share the items (chunk of <= 64
   tokens of a block in the set) in contiguous runs; a CTA copies the K and V of its next item while it
   computes the current one on the tensor cores, for every row that selected the block (so a block is read
   once per kv head), folds a run of chunks of one block into one partial softmax result per row; the last
   CTA of a (sequence, kv head) merges them into ``out`` and ``lse`` and empties the set.

Where the attention CTAs run in one wave and keep their kv head's entries and query rows in shared memory (at most
``FUSED_MAX_ROWS`` rows; :attr:`SplitPlan.fused_select`), there is no select launch: the score pass also writes
every row's largest score per score batch (its "tops"), and every attention CTA selects its kv head's rows itself
from the tops (the best k - 1 batches, then the best k - 1 of their blocks: exact, the same ``sel``) before its
first copy. Those two are kernels of their own (``route_score_tops``, ``attend_select``), and on sm_90 the attention
launch is a programmatic dependent launch (its CTAs take the SMs as the score CTAs leave them and wait for their own
kv head's scores, on a counter that its score CTAs release, in the second half of the plan's counters); measured on an
H200 5-7 us shorter a step than the three launches at every one-wave benchmark point (512K 82.9-84.8 against 89.6 us;
the kernel header).

Which kernel :func:`mobalab.kernels.moba_decode` runs: the environment variable ``MOBALAB_DECODE_KERNEL``
(``auto``, the default, is this split path at every length; ``fused`` / ``split`` force one), read at every
call (:func:`decode_kernel`). Everything that decides what the kernels receive is plain Python (CI checks it
against the CUDA signatures and runs it through the host emulation). Memory comes from torch's caching
allocator, the kernels run on torch's current stream, and nothing synchronises with the host. A step captured in
a CUDA graph is planned for sequences of the cache's ``max_seqlen`` (``_cuda_decode.plan_length``), so that its
plan, scratch and sets serve every replay, whatever lengths the cache has reached by then.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from ._build import device_capability, smem_per_sm
from ._contract import getenv
from ._cuda_decode import _TYPE_NAMES, StepShape, plan_length, precision_defines, step_outputs
from ._launch import Launch
from ._tensor_map import TensorMap2D, tensor_map_2d

__all__ = ["SplitPlan", "plan_split", "split_buffers", "split_launches", "decode_kernel",
           "KERNELS", "ENV_VAR", "SOURCE"]

SOURCE = "decode_split.cu"
ENV_VAR = "MOBALAB_DECODE_KERNEL"
KERNELS = ("fused", "split")
CHOICES = (*KERNELS, "auto")  # "auto": split

# Must match the #defines in cuda/decode_split.cu.
THREADS = 256
WARPS = THREADS // 32
FLAGS = 64
SCORE_LOADS = 16  # float4 block-sum loads per lane of one score batch
ROUTE_MAX_ROWS = 64
SELECT_LOADS = 8
ATTN_CHUNK = 64
ATTN_ROWS = 4
ATTN_THREADS = 128
ATTN_WARPS = ATTN_THREADS // 32
SCORE_MIN_CTAS = 2  # __launch_bounds__ minimum CTAs per SM of the score kernel
SELECT_MIN_CTAS = 4
ATTN_MIN_CTAS = 3
ATTN_STAGES = 2
ATTN_CACHE = 6144  # most bytes of a kv head's entries and query rows the attention CTAs keep in shared memory
ATTN_WAVE_ITEMS = 16  # items per attention CTA where the kv heads outnumber one wave's CTA slots
SMEM_PER_SM = 233472  # H100 / H200: 228 KB of shared memory per SM, 1 KB of it reserved per CTA

FUSED_MAX_ROWS = 2 * ATTN_WARPS  # the selection inside the attention launch: at most two rows per warp
SCORE_MAX_PASSES = 16  # most batches one score warp streams
MAX_GRID = 2**31 - 1


def decode_kernel(kernel: str | None = None) -> str:
    """The decode kernel to run: ``kernel`` if given, else ``$MOBALAB_DECODE_KERNEL``, else ``"auto"``, which is
    "split" at every length (its score pass streams the block sums at the bandwidth the fused kernel's routing
    does not reach, and its attention launch measured faster; see cuda/decode_split.cu)."""
    name = kernel if kernel is not None else getenv(ENV_VAR) or "auto"
    if name not in CHOICES:
        where = "kernel" if kernel is not None else ENV_VAR
        raise ValueError(f"moba_decode: {where} = {name!r} is not a decode kernel; supported: {', '.join(CHOICES)}")
    return "split" if name == "auto" else name


def score_batch(head_dim: int) -> int:
    """Block sums one score warp loads per batch: 16 float4 per lane, 8 lanes per block sum (16 at d 128, 32 at
    d 64)."""
    return 4 * (SCORE_LOADS // (head_dim // 32))


def _align16(x: int) -> int:
    return (x + 15) & ~15


def score_smem_bytes(head_dim: int, rows_per_group: int) -> int:
    """Score CTA: own blocks, then the row group's query rows in fp32."""
    return _align16(FLAGS + 4 * rows_per_group) + rows_per_group * head_dim * 4


def select_smem_bytes() -> int:
    """Select CTA: every warp's list, 32 (value, block) pairs each."""
    return THREADS * 8


def attn_cached(head_dim: int, rows: int, top_k: int, itemsize: int = 2) -> bool:
    """Whether the attention CTAs keep the kv head's selection entries and query rows in shared memory."""
    return _cache_bytes(head_dim, rows, top_k, itemsize) <= ATTN_CACHE


def _cache_bytes(head_dim: int, rows: int, top_k: int, itemsize: int) -> int:
    return _align16(4 * rows * top_k) + rows * head_dim * itemsize


def attn_smem_bytes(head_dim: int, rows: int, chunk: int, itemsize: int = 2, top_k: int = 1,
                    cached: bool = False, stages: int = ATTN_STAGES) -> int:
    """Attention CTA: flags, the window of selected blocks, the block's rows (entry, row, position), (``cached``:
    :func:`attn_cached`) the kv head's entries and query rows, q rows of a pass, per-warp P.V sums, maxima and
    sums, then ``stages`` (ATTN_STAGES) chunks of K and V."""
    head = _align16(FLAGS + 4 * (ATTN_THREADS + 3 * rows))
    if cached:
        head += _cache_bytes(head_dim, rows, top_k, itemsize)
    return head + ATTN_ROWS * (head_dim + 8) * itemsize + ATTN_WARPS * ATTN_ROWS * (head_dim + 2) * 4 + \
        stages * 2 * chunk * head_dim * itemsize


def attn_ctas_per_sm(attn_smem: int, smem_per_sm: int = SMEM_PER_SM, most: int = ATTN_MIN_CTAS) -> int:
    """Attention CTAs that fit on one SM: ``most`` (the launch bounds'), fewer where their shared memory is
    short (each CTA also takes 1 KB the hardware reserves), at least one."""
    return max(1, min(most, smem_per_sm // (attn_smem + 1024)))


def attn_build(attn_chunk: int, attn_stages: int) -> tuple[int, tuple[str, ...]]:
    """(launch bounds' CTAs per SM, preprocessor defines) of the attention kernel built with ``attn_chunk`` tokens
    per item and ``attn_stages`` stages: (ATTN_MIN_CTAS, ()) for the defaults, else the CTAs per SM that q_len 1,
    32 / 8 heads, d 128, k 8 fit (at most five: 102 registers a thread) and the build options (more than two stages
    with the cp.async copies)."""
    if (attn_chunk, attn_stages) == (ATTN_CHUNK, ATTN_STAGES):
        return ATTN_MIN_CTAS, ()
    if attn_chunk not in (32, 64) or attn_stages not in (2, 3, 4):
        raise ValueError(f"split_launches: attn_chunk = {attn_chunk}, attn_stages = {attn_stages}; "
                         "supported: 32 or 64, and 2, 3 or 4")
    most = attn_ctas_per_sm(attn_smem_bytes(128, 4, attn_chunk, 2, 8, True, attn_stages), most=5)
    # more than two stages: the cp.async copies (the tensor-map build's flags hold two stages' mbarriers)
    return most, (f"DSP_ATTN_CHUNK={attn_chunk}", f"DSP_ATTN_STAGES={attn_stages}", f"DSP_ATTN_MIN_CTAS={most}",
                  *(("DSP_ATTN_TMA=0",) if attn_stages > 2 else ()))


def select_warps(n_cand: int) -> int:
    """Select warps per row for rows of at most ``n_cand`` candidate blocks: one warp up to 8 chunks of 32
    candidates (no list merging; measured on an H200 at 32K, batch 64: routing 0.060 -> 0.040 ms), else all
    eight (two or four per row measured ~2 us slower at 128K); the kernel takes 1, 2, 4 or 8."""
    return 1 if math.ceil(n_cand / 32) <= 8 else WARPS


def set_words(n_blocks: int) -> int:
    """32-bit words of one kv head's set of selected blocks (a bitmap) over blocks 0 .. ``n_blocks`` - 1."""
    return max(1, math.ceil(n_blocks / 32))


@dataclass(frozen=True)
class SplitPlan(StepShape):
    """Sizes of one decode step of the three-launch path."""

    n_rg: int  # score row groups per kv head
    rows_per_group: int
    n_range: int  # score CTAs per row group (0: no score launch, nothing to rank)
    range_blocks: int  # candidate blocks per score CTA
    n_cols: int  # scratch columns per row: the longest sequence's candidate blocks (at least 1)
    chunk: int  # tokens per attention item
    n_chunks: int  # attention items per selected block
    select_wpr: int  # select warps per row (WARPS // select_wpr rows per select CTA)
    n_words: int  # 32-bit words of a kv head's set of selected blocks (a bitmap of its blocks)
    cpg: int  # attention CTAs per (sequence, kv head)
    cached: bool  # the attention CTAs keep the kv head's entries and query rows in shared memory
    score_smem: int
    select_smem: int
    attn_smem: int
    fused_select: bool = False  # no select launch: the attention CTAs select from the score pass's batch tops
    n_bat: int = 1  # batch tops per row: score batches of score_batch(head_dim) blocks over n_cols

    @property
    def n_score_ctas(self) -> int:
        return self.batch * self.kv_heads * self.n_rg * self.n_range

    @property
    def n_select_ctas(self) -> int:
        return self.batch * self.kv_heads * math.ceil(self.rows / (WARPS // self.select_wpr))

    @property
    def n_attn_ctas(self) -> int:
        return self.batch * self.kv_heads * self.cpg

    @property
    def n_counters(self) -> int:
        """One per (sequence, kv head) for the attention launch; with ``fused_select`` a second one, which the
        kv head's score CTAs release (the attention CTAs of a DSP_OWN_WAIT build wait for it)."""
        return self.batch * self.kv_heads * (2 if self.fused_select else 1)

    @property
    def n_table(self) -> int:
        """Words of the sets of selected blocks, one set per (sequence, kv head)."""
        return self.batch * self.kv_heads * self.n_words


def plan_split(batch: int, q_len: int, heads: int, kv_heads: int, head_dim: int, block_size: int, top_k: int,
               max_length: int, n_blocks_cap: int, capacity: int, itemsize: int = 2, sm_count: int = 132,
               range_blocks: int | None = None, attn_ctas: int | None = None,
               select_wpr: int | None = None, attn_chunk: int = ATTN_CHUNK, attn_stages: int = ATTN_STAGES,
               smem_per_sm: int = SMEM_PER_SM, attn_most: int = ATTN_MIN_CTAS,
               fused_select: bool | None = None) -> SplitPlan:
    r"""The launch sizes for one step over sequences of at most ``max_length`` tokens (pure arithmetic).

    Scores: the :math:`n_c = \lfloor(L-1)/B\rfloor` candidate blocks of the longest sequence in ranges of
    ``range_blocks`` blocks per CTA, by default a whole number of passes (every warp one batch of
    :func:`score_batch` blocks per pass) that gives about one wave of score CTAs on ``sm_count`` SMs (fewer,
    longer CTAs: a CTA's start, its query rows and its first load's latency are paid once per range), at most
    SCORE_MAX_PASSES passes; no score launch when there is nothing to rank (top_k 1 or no candidate).
    Selection: ``select_wpr`` warps per (sequence, kv head, row) (default :func:`select_warps`), WARPS // that
    rows per CTA; it also enters the row's blocks into its kv head's set of selected blocks (a bitmap of
    :func:`set_words` words over the longest sequence's blocks). Attention: items of :math:`\min(B, 64)`
    tokens of a selected block; ``attn_ctas`` CTAs per (sequence, kv head) share its items, by default one wave
    (:func:`attn_ctas_per_sm` per SM, on ``smem_per_sm`` bytes of shared memory, at most ``attn_most``) where the
    kv heads fit in it, else about ATTN_WAVE_ITEMS items per CTA (several waves of short CTAs: measured on an
    H200 at 32K, batch 64, 0.425 ms with one CTA per kv head in 1.3 waves against 0.330 with four), at most one
    per item. ``attn_chunk`` and ``attn_stages``: the attention kernel's most tokens per item and its stages (its
    DSP_ATTN_CHUNK, DSP_ATTN_STAGES; other than the defaults only for a kernel built with them).
    """
    group = heads // kv_heads
    rows = group * q_len
    n_rg = math.ceil(rows / ROUTE_MAX_ROWS)
    rows_per_group = math.ceil(rows / n_rg)
    n_cand = (max_length - 1) // block_size
    pass_blocks = WARPS * score_batch(head_dim)
    if top_k == 1 or n_cand == 0:
        n_range, per_range = 0, max(1, n_cand)
    else:
        if range_blocks is None:
            passes = math.ceil(n_cand / pass_blocks)
            ranges = max(1, sm_count * SCORE_MIN_CTAS // (batch * kv_heads * n_rg))  # per row group, one wave
            per = min(SCORE_MAX_PASSES, math.ceil(passes / ranges))
            range_blocks = per * pass_blocks
        if range_blocks < 1:
            raise ValueError(f"plan_split: range_blocks = {range_blocks}; it must be positive")
        per_range = range_blocks
        n_range = math.ceil(n_cand / per_range)
    chunk = min(block_size, attn_chunk)
    entries = rows * top_k
    distinct = min(entries, (max_length - 1) // block_size + 1)  # selected blocks of one kv head, at most
    items = distinct * (block_size // chunk)
    cached = attn_cached(head_dim, rows, top_k, itemsize)
    attn_smem = attn_smem_bytes(head_dim, rows, chunk, itemsize, top_k, cached, attn_stages)
    slots = sm_count * attn_ctas_per_sm(attn_smem, smem_per_sm, attn_most)  # attention CTAs of one wave
    if attn_ctas is None:
        per_kvh = slots // (batch * kv_heads) if batch * kv_heads <= slots else math.ceil(items / ATTN_WAVE_ITEMS)
        attn_ctas = max(1, min(items, per_kvh))
    elif attn_ctas < 1:
        raise ValueError(f"plan_split: attn_ctas = {attn_ctas}; it must be positive")
    bw, n_words = score_batch(head_dim), set_words(n_cand + 1)
    # The selection inside the attention launch: every attention CTA selects its kv head's rows, so only where
    # the attention CTAs run in one wave (a later wave would pay the selection's latency again).
    fits = n_range > 0 and cached and rows <= FUSED_MAX_ROWS and per_range % bw == 0 and \
        batch * kv_heads * attn_ctas <= slots
    if fused_select is None:
        fused_select = fits
    elif fused_select and not fits:
        raise ValueError(f"plan_split: fused_select needs a score launch with ranges of a multiple of {bw} blocks "
                         f"(range_blocks = {per_range}, {n_range} ranges), the kv head's entries and query rows "
                         f"in shared memory (cached = {cached}), at most {FUSED_MAX_ROWS} rows per kv head "
                         f"({rows}) and the attention CTAs in one wave ({batch * kv_heads * attn_ctas})")
    if select_wpr is None:
        select_wpr = select_warps(max(1, n_cand))
    elif select_wpr not in (1, 2, 4, 8):
        raise ValueError(f"plan_split: select_wpr = {select_wpr}; supported: 1, 2, 4, 8")
    plan = SplitPlan(batch=batch, q_len=q_len, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                     block_size=block_size, top_k=top_k, n_blocks_cap=n_blocks_cap, capacity=capacity, rows=rows,
                     n_rg=n_rg, rows_per_group=rows_per_group, n_range=n_range, range_blocks=per_range,
                     n_cols=max(1, n_cand), chunk=chunk, n_chunks=block_size // chunk,
                     select_wpr=select_wpr, n_words=n_words, cpg=attn_ctas, cached=cached,
                     score_smem=score_smem_bytes(head_dim, rows_per_group), select_smem=select_smem_bytes(),
                     attn_smem=attn_smem, fused_select=bool(fused_select), n_bat=max(1, math.ceil(n_cand / bw)))
    over = [f"{n} {what}" for n, what in ((plan.n_score_ctas, "score"), (plan.n_select_ctas, "select"),
                                          (plan.n_attn_ctas, "attention")) if n > MAX_GRID]
    if over:
        raise ValueError(f"moba_decode (split kernel): batch {batch}, kv_heads {kv_heads}, {rows} query rows per kv "
                         f"head and {n_cand} candidate blocks take {' and '.join(over)} CTAs; one grid holds at most "
                         f"{MAX_GRID}: use MOBALAB_DECODE_KERNEL=fused (contiguous caches) or a smaller batch")
    return plan


def split_buffers(plan: SplitPlan, device, dtype) -> dict[str, torch.Tensor]:
    """Outputs and scratch of one step (``torch.empty``: every element the kernels read they have written)."""
    p = plan
    partials = p.batch * p.kv_heads * p.rows * p.top_k * p.n_chunks
    scores = p.batch * p.kv_heads * p.rows * p.n_cols if p.n_range else 1
    tops = p.batch * p.kv_heads * p.rows * p.n_bat if p.fused_select else 1
    return dict(step_outputs(p, partials, device, dtype),
                scores=torch.empty(scores, dtype=torch.float32, device=device),
                tops=torch.empty(tops, dtype=torch.float32, device=device))


def released_counters(plan: SplitPlan, counters: torch.Tensor) -> torch.Tensor:
    """The score CTAs' release counters of a ``fused_select`` plan: the second half of its ``n_counters`` counters
    (the first half: the attention launch's completion tickets)."""
    return counters[plan.batch * plan.kv_heads:]


def score_launch(plan: SplitPlan, q, sums, lengths, bufs: dict, released=0, centroid_precision: str = "fp32") -> Launch:
    """The score kernel: q (b, q_len, h, d), the block rows it streams (b, kv_heads, n_blocks_cap, d), lengths
    int32 -> the scores scratch (b, kv_heads, R, n_cols); with the plan's ``fused_select`` the ``route_score_tops``
    kernel, which also writes every row's batch tops (b, kv_heads, R, n_bat) and, built with DSP_OWN_WAIT, adds one
    to its kv head's counter of ``released`` (b * kv_heads zeros, which the attention launch empties again; 0, a
    null pointer: no counting, for the routing alone). The rows: fp32 block sums S_j (``centroid_precision``
    "fp32"), or for "input" the cache's block means T(S_j / B) in q's dtype (``MobaKVCache._input_means``), read by
    the module built with ``_cuda_decode.precision_defines`` (scores q . T(S_j / B))."""
    want = q.dtype if centroid_precision == "input" else torch.float32
    if sums.dtype != want:  # the kernel reads the rows by this type: any other would be read as garbage
        raise ValueError(f"score_launch: centroid_precision={centroid_precision!r} streams {want} block rows, "
                         f"got {sums.dtype}")
    p, i32 = plan, np.int32
    args = (q, sums, lengths, bufs["scores"], i32(p.q_len), i32(p.heads), i32(p.kv_heads), i32(p.n_blocks_cap),
            i32(p.block_size), i32(p.n_rg), i32(p.rows_per_group), i32(p.n_range), i32(p.range_blocks),
            i32(p.n_cols))
    if p.fused_select:
        name = f"moba_decode_route_score_tops_{_TYPE_NAMES[q.dtype]}_d{p.head_dim}"
        args = (*args, bufs["tops"], i32(p.n_bat), released)
    else:
        name = f"moba_decode_route_score_{_TYPE_NAMES[q.dtype]}_d{p.head_dim}"
    return Launch(SOURCE, name, (p.n_score_ctas, 1, 1), (THREADS, 1, 1), args, p.score_smem,
                  defines=precision_defines(centroid_precision))


def select_launch(plan: SplitPlan, lengths, bufs: dict, table=None) -> Launch:
    """The selection kernel: the scores scratch, lengths int32 -> sel, and the row's blocks into ``table`` (the
    sets of selected blocks, ``plan.n_table`` int32 zeros; None: no set, for the routing alone)."""
    p, i32 = plan, np.int32
    args = (bufs["scores"], lengths, bufs["sel"], table if table is not None else bufs["sel"], i32(p.q_len),
            i32(p.heads), i32(p.kv_heads), i32(p.block_size), i32(p.top_k), i32(p.n_cols),
            i32(p.n_words if table is not None else 0), i32(p.select_wpr))
    return Launch(SOURCE, "moba_decode_route_select", (p.n_select_ctas, 1, 1), (THREADS, 1, 1), args,
                  p.select_smem)


def kv_tensor_maps(cache, chunk: int) -> tuple[TensorMap2D, TensorMap2D]:
    """Tensor maps of the cache's K and V, each viewed as (rows, head_dim) (a block of a kv head is rows of one
    slab, contiguous or paged alike), boxes of ``chunk`` rows by 64 columns (one attention item's half or whole
    row at d 128 / 64); made once per chunk and kept on the cache (its K and V stay where they were allocated)."""
    got = cache._tensor_maps.get(chunk)
    if got is None:
        dim = cache.head_dim
        got = cache._tensor_maps[chunk] = (tensor_map_2d(cache.k, dim, chunk), tensor_map_2d(cache.v, dim, chunk))
    return got


def attend_launch(plan: SplitPlan, q, k, v, lengths, bufs: dict, counters, table, scale: float,
                  pages=None, maps: tuple[TensorMap2D, TensorMap2D] | None = None, dependent: bool = False) -> Launch:
    """The attention kernel: the cache's k / v (b, kv_heads, capacity, d), ``sel`` and the sets of selected
    blocks ``table`` (emptied again) -> out, lse (with the plan's ``fused_select``: the ``attend_select`` kernel,
    the scores scratch and batch tops -> sel, out, lse, the attention CTAs filling ``table`` themselves);
    ``counters``: ``plan.n_counters`` zeros. ``pages``: a paged cache's (page table (batch, pages_per_seq) int32,
    page_size), k / v then (n_pages, kv_heads, page_size, d): the ``attend_paged`` kernels, which differ only in
    where they read a block. ``maps``:
    tensor maps of k and v (:func:`kv_tensor_maps`; made here when None), which the kernel's tensor-map build
    copies with. ``dependent``: a programmatic dependent launch (:class:`._launch.Launch`)."""
    p, i32 = plan, np.int32
    if maps is None:
        maps = (tensor_map_2d(k, k.shape[-1], p.chunk), tensor_map_2d(v, v.shape[-1], p.chunk))
    head = (q, k, v, lengths, bufs["sel"], table, bufs["part_o"], bufs["part_ml"], counters, bufs["out"],
            bufs["lse"], i32(p.q_len), i32(p.heads), i32(p.kv_heads))
    tail = (i32(p.block_size), i32(p.top_k), i32(p.n_chunks), i32(p.chunk), i32(p.n_words), i32(p.cpg))
    scale_log2 = np.float32(scale * math.log2(math.e))
    if p.fused_select:  # the select kernel holds the entries and rows in shared memory (no `cached` argument)
        tail = (*tail, scale_log2, bufs["scores"], bufs["tops"], i32(p.n_cols), i32(p.n_bat),
                released_counters(p, counters), i32(p.n_rg * p.n_range))
    else:
        tail = (*tail, i32(p.cached), scale_log2)
    t, d = _TYPE_NAMES[q.dtype], p.head_dim
    if pages is None:
        name = f"moba_decode_attend_select_{t}_d{d}" if p.fused_select else f"moba_decode_attend_{t}_d{d}"
        args = (*head, i32(p.capacity), *tail, *maps)
    else:
        page_table, page_size = pages
        name = f"moba_decode_attend_paged_select_{t}_d{d}" if p.fused_select else f"moba_decode_attend_paged_{t}_d{d}"
        args = (*head, *tail, page_table, i32(page_size), i32(page_table.shape[1]), *maps)
    return Launch(SOURCE, name, (p.n_attn_ctas, 1, 1), (ATTN_THREADS, 1, 1), args, p.attn_smem,
                  dependent=dependent)


def split_launches(q, cache, top_k: int, scale: float, bufs: dict | None = None, route_only: bool = False,
                   range_blocks: int | None = None, sm_count: int = 132, attn_ctas: int | None = None,
                   select_wpr: int | None = None, attn_chunk: int = ATTN_CHUNK, attn_stages: int = ATTN_STAGES,
                   fused_select: bool | None = None, dependent: bool | None = None, centroid_precision: str = "fp32",
                   max_length: int | None = None):
    """(plan, buffers, launches) for one step on ``cache`` (no kernel runs): [score (when there is something to
    rank), select (unless the plan's ``fused_select``: the attention CTAs select), attention]; ``route_only``: the
    routing launches alone, score and select (``sel`` only; for measuring them);
    ``range_blocks``: candidate blocks per score CTA instead of the plan's choice; ``sm_count`` of the GPU;
    ``attn_ctas``: attention CTAs per (sequence, kv head) and ``select_wpr`` select warps per row instead of the
    plan's choices, ``fused_select`` whether the attention launch selects (None: the plan's choice);
    ``attn_chunk`` (32 or 64 tokens per item) and ``attn_stages`` (2-4): the attention kernel
    built with other items or stages than the defaults, its launch bounds the CTAs per SM that the benchmark's
    shape fits (build options: a launch with defines, run by ``_launch.launch``; for side-by-side timing);
    ``dependent``: with the plan's ``fused_select``, the attention launch a programmatic dependent launch (sm_90 and
    later: its CTAs take the SMs as the score CTAs leave them, stage their query rows and wait for their kv head's
    scores; None, the default: so wherever the plan selects in the attention launch); ``centroid_precision``: the
    score pass's build (:func:`score_launch`); ``max_length``: the plan covers sequences of up to that many tokens
    (None: ``_cuda_decode.plan_length``).

    The completion counters and the sets of selected blocks live in the cache's zeroed workspace (the
    attention launch leaves both zero again); the routing alone fills no set."""
    batch, q_len, heads, dim = q.shape
    most, defines = attn_build(attn_chunk, attn_stages)
    smem = smem_per_sm(q.device.index, SMEM_PER_SM) if q.device.type == "cuda" and q.device.index is not None \
        else SMEM_PER_SM
    longest = plan_length(cache) if max_length is None else max_length
    plan = plan_split(batch, q_len, heads, cache.kv_heads, dim, cache.block_size, top_k, longest, cache.n_blocks,
                      cache.capacity, q.element_size(), sm_count, range_blocks, attn_ctas, select_wpr, attn_chunk,
                      attn_stages, smem, most, fused_select)
    if bufs is None:
        bufs = split_buffers(plan, q.device, q.dtype)
    released = 0  # the routing alone releases nothing (no attention launch would empty the counters)
    if not route_only:
        work = cache._workspace_counters(plan.n_counters + plan.n_table)
        counters, table = work[:plan.n_counters], work[plan.n_counters:plan.n_counters + plan.n_table]
        released = released_counters(plan, counters) if plan.fused_select else 0
    rows = cache._input_means() if centroid_precision == "input" else cache.block_sums
    route = [score_launch(plan, q, rows, cache._len_dev, bufs, released, centroid_precision)] if plan.n_range else []
    if route_only:
        return plan, bufs, [*route, select_launch(plan, cache._len_dev, bufs)]
    if not plan.fused_select:
        route.append(select_launch(plan, cache._len_dev, bufs, table))
    pages = (cache._pages_dev, cache.page_size) if cache.paged else None
    dependent = (dependent is None or bool(dependent)) and plan.fused_select and q.device.type == "cuda" and \
        device_capability(q.device)[0] >= 9
    attend = attend_launch(plan, q, cache.k, cache.v, cache._len_dev, bufs, counters, table, scale, pages,
                           kv_tensor_maps(cache, plan.chunk), dependent)
    if defines:
        attend = dataclasses.replace(attend, defines=defines)
    return plan, bufs, [*route, attend]
