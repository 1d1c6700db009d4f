r"""Key-block-major pair lists of a chunk by a stable counting sort on the GPU (cuda/pairs.cu), and the torch
reference they equal (see docs/design.md, "Forward").

The forward and the backward visit, per (kv head, key block j), every (query, head, slot) pair of the chunk
that selected j. Pair :math:`i = (h \cdot n_q + t)\, k + s` has the segment key
:math:`\kappa_i = \lfloor h / g \rfloor\, n_{blocks} + j_{t,h,s}` (:math:`n_{seg}` for an unused slot), and the
lists are the pairs in stable key order, with

.. math::
    \mathrm{seg\_off}_\kappa = \#\{i : \kappa_i < \kappa\},\qquad
    \mathrm{tile\_cum}_\kappa = \sum_{\kappa' < \kappa} \lceil n_{\kappa'} / R \rceil ,

(:math:`n_\kappa` pairs of key :math:`\kappa`, :math:`R` rows per work unit of the tile kernel). The stable
order is the torch path's ``torch.sort(keys, stable=True)``, a radix sort over all 32 key bits (about 6
launches and 24 bytes per pair per pass). The counting sort knows the key range, so it needs three launches:
per tile of ``TILE`` pairs (``WIDE_TILE`` where a tile's key window is wide: :func:`tile_plan`) the count of every
key, an exclusive scan over (tile, key) in key-major order, and a scatter that ranks each tile's pairs stably (per
warp, in order, 32 at a time). It writes the same lists
pair for pair, so everything downstream (forward partials, backward sums, determinism) is unchanged. A second form,
the two-digit sort ("radix", :func:`radix_launches`), runs two such stable passes over a low and a high digit of
the key (at most ``RADIX_BINS`` values each), each tile's pairs leaving shared memory in runs of one digit, where
the one-pass scatter writes every pair on its own.

Bytes at 64K tokens (batch 2, 16 heads, B = 128, k = 8; 8 chunks of 4 kv heads, 2.1 M pairs and 2049 keys each):
per chunk topk is read twice (16.8 MB), pairs written once (16.8 MB; the backward also writes the sorted keys,
8.4 MB) and the count table of 512 x 513 ints (each tile counts only the keys of its kv head: a window of
:func:`key_window` columns and the unused slots', where a row of all 2049 keys moved 16.8 MB) moves 4 times (4.2 MB):
~40 MB per chunk, ~0.3 GB per forward, about 0.1 ms at 3.5 TB/s. Measured on an H200 (GPU kernel time): 0.60 ms per
forward (0.65 with rows of every key, 0.76 with tiles of 8192 pairs; the torch path 1.36 ms); at B = 32 (8193 keys,
2049 columns) 0.78 ms, where rows of every key took 1.04. The kernels are latency-bound, not bandwidth-bound: at 512K
(chunks of one head and 256K queries, 4097 keys, wide tiles) Nsight Compute puts the scatter, ~88 of a chunk's
~118 us on an H100, at about 14% of DRAM and 46% of L2 throughput with two CTAs of 8 warps per SM (its shared memory),
most of its stalls in its scattered 8-byte stores; four CTAs per SM (8-bit counts) did not make it faster.

:func:`rebased_topk` (one more kernel of cuda/pairs.cu) gives routing local to a range of blocks, for kernel
calls over one key segment of a longer sequence (context parallelism).

Limits: the scatter keeps 20 bytes of shared memory per key, so a chunk with more keys (``n_seg + 1``) than
:func:`max_keys` of its device (11622 on an H100 / H200, 8345 on an A100, 5068 on sm_86 / sm_89; ``MAX_KEYS``
where there is no CUDA device), or with 2^31 pairs or more, takes the torch path. ``$MOBALAB_PAIR_SORT``
("counting", the default, or "torch"), read at each call, forces either path; ``$MOBALAB_PAIR_TILES`` ("auto", the
default, "narrow", "wide" or "radix") likewise the counting sort's form.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from ._build import on_device
from ._contract import getenv
from ._launch import Launch, i32, i64, kernel_ready, launch

__all__: list[str] = []

SOURCE = "pairs.cu"
PAIRS_THREADS = 256  # kPairsThreads in cuda/pairs.cu
PAIRS_ROUNDS = 16  # kPairsRounds
TILE = PAIRS_THREADS * PAIRS_ROUNDS  # pairs per CTA of the count and scatter kernels (narrow tiles)
WIDE_ROUNDS = 32  # kWideRounds: the wide scatter's pairs per lane
WIDE_COUNT_THREADS = 512  # kWideCountThreads: the wide count's threads, PAIRS_ROUNDS pairs each
WIDE_TILE = PAIRS_THREADS * WIDE_ROUNDS  # pairs per CTA of the wide tiles
# Narrow key windows of at least this many block columns take the two-digit sort ("radix"). Its forward lists on an
# H100 (kernel time): 512K 5.51 against 6.85 ms (wide tiles), 64K at B 32 (2048 columns) 0.69 against 0.73, 64K at
# B 128 (512 columns) 0.525 against 0.527, 8K 0.061 against 0.050 (six launches where three were short).
RADIX_MIN_WINDOW = 2048
# The two-digit sort (cuda/pairs.cu, "radix"): two stable counting passes over a low and a high digit of the key,
# each tile's pairs leaving shared memory in runs of a digit's pairs.
RADIX_BINS = 128  # kRadixBins: the most values of a digit
RADIX_THREADS = 512  # kRadixThreads: the scatters' CTAs
RADIX_ROUNDS = 16  # kRadixRounds: pairs per lane of a scatter
RADIX_TILE = RADIX_THREADS * RADIX_ROUNDS  # kRadixTile: pairs per tile of every radix launch
RADIX_COUNT_THREADS = RADIX_TILE // PAIRS_ROUNDS  # kRadixCountThreads: 16 pairs each
RADIX_SCAN_THREADS = 1024  # kRadixScanThreads
# the scatters' dynamic shared memory: the warps' digit counts, the digits' adjustments, the tile's keys and indices
RADIX_SMEM = 4 * ((RADIX_THREADS // 32) * RADIX_BINS + RADIX_BINS + 2 * RADIX_TILE)
TILES = ("auto", "narrow", "wide", "radix")
TILES_ENV = "MOBALAB_PAIR_TILES"
SCAN_THREADS = 1024  # kScanThreads: 32 keys per CTA
MAX_KEYS = 8192  # n_seg + 1 without a CUDA device to ask (the host emulation): 160 KiB of scatter shared memory
KEY_BITS = 15  # the scatter packs a key beside a 16-bit rank in one int
SORTS = ("counting", "torch")
SORT_ENV = "MOBALAB_PAIR_SORT"


def resolve_sort(sort: str | None) -> str:
    """The pair sort: ``sort``, or the ``MOBALAB_PAIR_SORT`` environment variable (default "counting") when
    None."""
    if sort is None:
        sort = getenv(SORT_ENV, "counting")
    if sort not in SORTS:
        raise ValueError(f"pair sort must be one of {SORTS} (or None: ${SORT_ENV}, default 'counting'), "
                         f"got {sort!r}")
    return sort


def resolve_tiles(tiles: str | None) -> str:
    """The counting sort's tiles: ``tiles``, or the ``MOBALAB_PAIR_TILES`` environment variable (default "auto":
    :func:`pair_plan`'s choice) when None. "narrow" and "wide" are the one-pass sort's tiles of ``TILE`` and
    ``WIDE_TILE`` pairs, "radix" the two-digit sort."""
    if tiles is None:
        tiles = getenv(TILES_ENV, "auto")
    if tiles not in TILES:
        raise ValueError(f"pair tiles must be one of {TILES} (or None: ${TILES_ENV}, default 'auto'), got {tiles!r}")
    return tiles


def max_keys(device=None) -> int:
    """Most keys (``n_seg + 1``) the counting sort serves on ``device``: as many as the scatter's shared memory
    (:func:`scatter_smem_bytes`) fits in the device's opt-in limit per CTA, and fewer than 2^KEY_BITS; ``MAX_KEYS``
    when ``device`` is None or not a CUDA device."""
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda":
        return MAX_KEYS
    return _device_max_keys(torch.cuda.current_device() if device.index is None else device.index)


@functools.cache
def _device_max_keys(index: int) -> int:
    limit = torch.cuda.get_device_properties(index).shared_memory_per_block_optin
    return keys_within(limit)


def keys_within(smem_bytes: int) -> int:
    """Most keys whose scatter shared memory fits in ``smem_bytes`` (below 2^KEY_BITS)."""
    n_keys = min(2**KEY_BITS - 1, smem_bytes // 20 + 1)
    while n_keys > 1 and scatter_smem_bytes(n_keys - 1) > smem_bytes:
        n_keys -= 1
    return n_keys


def counting_supported(n_pairs: int, n_seg: int, device=None) -> bool:
    """Whether the counting sort serves a chunk of ``n_pairs`` pairs and ``n_seg`` segments on ``device``
    (:func:`max_keys`)."""
    return n_seg + 1 <= max_keys(device) and n_pairs < 2**31


def n_tiles(n_pairs: int, tile: int = TILE) -> int:
    """CTAs of the count and scatter kernels (tiles of ``tile`` pairs: TILE or WIDE_TILE)."""
    return max(1, math.ceil(n_pairs / tile))


def count_smem_bytes(win: int) -> int:
    """Shared memory of moba_pairs_count for a window of ``win`` block columns (:func:`key_window`; at most the
    chunk's n_seg keys, where :func:`max_keys` is checked): one int per column and the unused slots'."""
    return 4 * (win + 1)


def scatter_smem_bytes(win: int) -> int:
    """Shared memory of moba_pairs_scatter for a window of ``win`` block columns (as :func:`count_smem_bytes`): a
    16-bit count per (warp, column), rounded up to 16 bytes (it is zeroed in 16-byte stores), then an int per
    column."""
    n_cols = win + 1
    return ((PAIRS_THREADS // 32) * n_cols * 2 + 15) // 16 * 16 + 4 * n_cols


def counts_elems(n_pairs: int, n_seg: int) -> int:
    """Ints of the (tile, key) count table at most (narrow tiles, a row of every key; :func:`key_window` narrows
    it, wide tiles halve the rows), or of the two-digit sort's (tile, digit) table where that is larger."""
    return max(n_tiles(n_pairs) * (n_seg + 1), n_tiles(n_pairs, RADIX_TILE) * RADIX_BINS)


def radix_elems(n_pairs: int) -> int:
    """Ints of the two-digit sort's scratch: the pairs' keys and indices after the first pass, then the digit
    offsets and column totals."""
    return 2 * n_pairs + 2 * RADIX_BINS


def key_window(n_pairs: int, n_seg: int, n_blocks: int, tile: int = TILE) -> int:
    r"""Columns ``win`` of a tile's key window before its unused-slot column (cuda/pairs.cu): ``span * n_blocks``,
    where ``span`` is the most kv heads one tile of ``tile`` (T) consecutive pairs reaches. The pairs run kv head
    after kv head, :math:`P = n_{pairs} / n_{kv}` each, so a tile starting at :math:`tT`, at :math:`r = tT \bmod P`
    into a kv head, reaches :math:`\lfloor (r + T - 1)/P \rfloor + 1` of them, and r is a multiple of
    :math:`g = \gcd(T, P)` below P:

    .. math::
        \mathrm{span} = \min\left(n_{kv},\ \lfloor (P - g + T - 1)/P \rfloor + 1\right)

    (one where P is a multiple of T, T / P where T is a multiple of P)."""
    n_kv = n_seg // n_blocks if n_blocks > 0 else 0
    if n_kv <= 1 or n_pairs <= 0:
        return n_seg
    per_kv = n_pairs // n_kv
    span = (per_kv - math.gcd(tile, per_kv) + tile - 1) // per_kv + 1
    return min(n_kv, span) * n_blocks


def pair_plan(n_pairs: int, n_seg: int, n_blocks: int, tiles: str | None = None) -> str:
    """The counting sort of a chunk: "narrow", "wide" or "radix" as ``tiles`` (:func:`resolve_tiles`) names it;
    for "auto", "radix" where the narrow tiles' key window has ``RADIX_MIN_WINDOW`` columns or more, else
    "narrow" (wide tiles, 1.10x of narrow ones at 512K, only when asked for: the two-digit sort took their
    place)."""
    tiles = resolve_tiles(tiles)
    if tiles != "auto":
        return tiles
    return "radix" if key_window(n_pairs, n_seg, n_blocks) >= RADIX_MIN_WINDOW else "narrow"


def tile_plan(n_pairs: int, n_seg: int, n_blocks: int, tiles: str | None = None) -> tuple[int, int]:
    """(pairs per tile, key window) of the one-pass sort of a chunk: narrow tiles (``TILE``) unless
    :func:`pair_plan` names wide ones (``WIDE_TILE`` and its window). The two-digit sort has no key window: for a
    "radix" plan this is the wide tiles' (not used)."""
    if pair_plan(n_pairs, n_seg, n_blocks, tiles) == "narrow":
        return TILE, key_window(n_pairs, n_seg, n_blocks)
    return WIDE_TILE, key_window(n_pairs, n_seg, n_blocks, WIDE_TILE)


def radix_digits(n_keys: int) -> tuple[int, int, int]:
    r"""(lo_bits, low-digit values, high-digit values) of the two-digit sort of ``n_keys`` keys: keys of
    :math:`b = \lceil \log_2 n_{keys} \rceil` bits split into a low digit of :math:`\lfloor b/2 \rfloor` bits and
    the rest, both at most ``RADIX_BINS`` values (``n_keys`` up to :math:`2^{14}`)."""
    if not 1 <= n_keys <= 2**14:
        raise ValueError(f"the two-digit sort takes 1..{2**14} keys, got {n_keys}")
    lo_bits = max(1, (n_keys - 1).bit_length()) // 2
    return lo_bits, 1 << lo_bits, ((n_keys - 1) >> lo_bits) + 1


@dataclass(frozen=True)
class CountingScratch:
    """Buffers of the counting sort, reused by every chunk of a call: ``pairs`` (int64), the (tile, key)
    ``counts`` and per-key ``seg_total`` (int32), the scan's ``ticket`` (one int32, which the count kernel
    sets to 0 before the scan counts on it), and the two-digit sort's ``radix`` (int32, :func:`radix_elems`)."""

    pairs: torch.Tensor
    counts: torch.Tensor
    seg_total: torch.Tensor
    ticket: torch.Tensor
    radix: torch.Tensor


def counting_scratch(max_pairs: int, max_seg: int, device, with_pairs: bool = True) -> CountingScratch:
    """Scratch for chunks of at most ``max_pairs`` pairs and ``max_seg`` segments (``with_pairs`` False: an empty
    pair buffer, for callers that pass every chunk a ``pairs_out`` of its own). The int32 buffers are views of one
    allocation: a step at 8K spends some 5 us of host time per allocation while the GPU waits for its lists."""
    n_counts = counts_elems(max_pairs, max_seg)
    n_radix = radix_elems(max_pairs)
    ints = torch.empty(n_counts + max_seg + 2 + n_radix, dtype=torch.int32, device=device)
    end = n_counts + max_seg + 2
    return CountingScratch(pairs=torch.empty(max_pairs if with_pairs else 0, dtype=torch.int64, device=device),
                           counts=ints[:n_counts], seg_total=ints[n_counts:n_counts + max_seg + 1],
                           ticket=ints[n_counts + max_seg + 1:end], radix=ints[end:])


# --------------------------------------------------------------------------------------------------
# launch plans (pure: the CPU tests pass them through _launch.check_args)


def _chunk_args(seqlen, heads, top_k, n_blocks, chunk, group):
    return (i32(seqlen), i32(heads), i32(top_k), i32(n_blocks), i32(chunk.batch_index),
            i32(chunk.h0), i32(chunk.n_heads), i32(chunk.t0), i32(chunk.n_q), i32(group))


def count_launch(topk, counts, ticket, *, seqlen, heads, top_k, n_blocks, chunk, group, win,
                 tile: int = TILE) -> Launch:
    """Pairs of every key of each tile's window (``win``: :func:`key_window`) per tile of ``tile`` pairs of the chunk
    (``chunk`` has batch_index, h0, n_heads, t0, n_q); sets the scan's ``ticket`` to 0."""
    n_pairs = chunk.n_heads * chunk.n_q * top_k
    kernel, threads = _tile_kernels(tile)[0]
    return Launch(SOURCE, kernel, (n_tiles(n_pairs, tile),), (threads,),
                  (topk, counts, ticket, *_chunk_args(seqlen, heads, top_k, n_blocks, chunk, group), i32(win)),
                  shared_mem=count_smem_bytes(win))


def scan_launch(counts, seg_total, ticket, seg_off, tile_cum, *, n_pairs, n_seg, rows_per_unit, n_blocks,
                win, tile: int = TILE) -> Launch:
    """Exclusive scan of the count table per key over the tiles that reach it (``win``: :func:`key_window`), then
    (last CTA) seg_off and tile_cum (``tile_cum`` 0: not wanted). ``ticket`` must be 0 (the count launch before it
    sets it); the kernel leaves it 0."""
    pairs_per_kv = max(1, n_pairs // max(1, n_seg // n_blocks))
    args = (counts, i32(n_tiles(n_pairs, tile)), i32(n_seg), i32(rows_per_unit), seg_total, ticket,
            seg_off, tile_cum, i32(n_blocks), i32(pairs_per_kv), i32(win), i32(tile))
    return Launch(SOURCE, "moba_pairs_scan", (math.ceil((n_seg + 1) / 32),), (SCAN_THREADS,), args)


def scatter_launch(topk, counts, seg_off, pairs, sorted_keys, *, seqlen, heads, top_k, n_blocks, chunk,
                   group, win, tile: int = TILE) -> Launch:
    """Each pair's index to its stable position (and its key, unless ``sorted_keys`` is 0); ``win`` and ``tile`` as
    for :func:`count_launch`."""
    n_pairs = chunk.n_heads * chunk.n_q * top_k
    kernel, threads = _tile_kernels(tile)[1]
    return Launch(SOURCE, kernel, (n_tiles(n_pairs, tile),), (threads,),
                  (topk, counts, seg_off, pairs, sorted_keys, *_chunk_args(seqlen, heads, top_k, n_blocks, chunk,
                                                                          group), i32(win)),
                  shared_mem=scatter_smem_bytes(win))


def _tile_kernels(tile: int):
    """((count kernel, threads), (scatter kernel, threads)) of tiles of ``tile`` pairs."""
    if tile == TILE:
        return ("moba_pairs_count", PAIRS_THREADS), ("moba_pairs_scatter", PAIRS_THREADS)
    if tile == WIDE_TILE:
        return ("moba_pairs_count_wide", WIDE_COUNT_THREADS), ("moba_pairs_scatter_wide", PAIRS_THREADS)
    raise ValueError(f"pair tiles hold {TILE} or {WIDE_TILE} pairs, got {tile}")


def radix_launches(topk, counts, seg_total, ticket, radix, pairs, sorted_keys, seg_off, tile_cum, *, seqlen, heads,
                   top_k, n_blocks, chunk, group, rows_per_unit) -> list[Launch]:
    """The two-digit sort's six launches (cuda/pairs.cu: count, scan and scatter of the low digit, then of the
    high one), writing what :func:`counting_launches` writes; ``radix`` holds :func:`radix_elems` ints."""
    n_pairs = chunk.n_heads * chunk.n_q * top_k
    n_seg = (chunk.n_heads // group) * n_blocks
    lo_bits, lo_bins, hi_bins = radix_digits(n_seg + 1)
    grid = (n_tiles(n_pairs, RADIX_TILE),)
    if isinstance(radix, torch.Tensor):
        if radix.numel() < radix_elems(n_pairs):
            raise ValueError(f"two-digit sort: scratch of {radix.numel()} ints, {radix_elems(n_pairs)} needed")
        tmp_keys, tmp_idx = radix[:n_pairs], radix[n_pairs:2 * n_pairs]
        digit_off = radix[2 * n_pairs:2 * n_pairs + 2 * RADIX_BINS]
    else:  # plans without buffers (the CPU tests' argument checks)
        tmp_keys = tmp_idx = digit_off = radix
    geometry = _chunk_args(seqlen, heads, top_k, n_blocks, chunk, group)

    def scan(bins, totals, off, cum):
        return Launch(SOURCE, "moba_pairs_radix_scan", (bins,), (RADIX_SCAN_THREADS,),
                      (counts, i32(grid[0]), i32(bins), digit_off, ticket, totals, i32(n_seg + 1), i32(n_seg),
                       i32(rows_per_unit), off, cum))

    return [Launch(SOURCE, "moba_pairs_radix_count_lo", grid, (RADIX_COUNT_THREADS,),
                   (topk, counts, seg_total, ticket, *geometry, i32(lo_bits))),
            scan(lo_bins, 0, 0, 0),
            Launch(SOURCE, "moba_pairs_radix_scatter_lo", grid, (RADIX_THREADS,),
                   (topk, counts, digit_off, tmp_keys, tmp_idx, *geometry, i32(lo_bits)), shared_mem=RADIX_SMEM),
            Launch(SOURCE, "moba_pairs_radix_count_hi", grid, (RADIX_COUNT_THREADS,),
                   (tmp_keys, i32(n_pairs), i32(n_seg + 1), i32(lo_bits), i32(hi_bins), counts, seg_total),
                   shared_mem=4 * (n_seg + 1)),
            scan(hi_bins, seg_total, seg_off, tile_cum),
            Launch(SOURCE, "moba_pairs_radix_scatter_hi", grid, (RADIX_THREADS,),
                   (tmp_keys, tmp_idx, counts, digit_off, pairs, sorted_keys, i32(n_pairs), i32(lo_bits),
                    i32(hi_bins)), shared_mem=RADIX_SMEM)]


def counting_launches(topk, counts, seg_total, ticket, pairs, sorted_keys, seg_off, tile_cum, *, seqlen, heads,
                      top_k, n_blocks, chunk, group, rows_per_unit, tiles: str | None = None,
                      radix=None) -> list[Launch]:
    """The launches that write the chunk's ``pairs`` (int64, n_pairs), ``seg_off`` (int64, n_seg + 1),
    ``tile_cum`` (int64, n_seg + 1, or 0 for none) and ``sorted_keys`` (int32, n_pairs, or 0 for none), by the
    sort of :func:`pair_plan` (``tiles``: "auto", "narrow", "wide", "radix", or None for ``$MOBALAB_PAIR_TILES``):
    three for the one-pass sort over the tiles of :func:`tile_plan`, six for the two-digit one.

    ``counts`` holds at least :func:`counts_elems` ints, ``seg_total`` n_seg + 1 ints, ``ticket`` one unsigned
    (any value: the count launch sets it to 0, the scan leaves it 0), ``radix`` (the two-digit sort's) at least
    :func:`radix_elems` ints."""
    n_pairs = chunk.n_heads * chunk.n_q * top_k
    n_seg = (chunk.n_heads // group) * n_blocks
    device = topk.device if isinstance(topk, torch.Tensor) else None
    if not counting_supported(n_pairs, n_seg, device):
        raise ValueError(f"counting sort: a chunk of {n_pairs} pairs and {n_seg} segments is too large "
                         f"(at most {max_keys(device) - 1} segments and 2^31 - 1 pairs here)")
    plan = pair_plan(n_pairs, n_seg, n_blocks, tiles)  # the environment and the key window read once
    if plan == "radix":
        if radix is None:
            raise ValueError("the two-digit sort needs its scratch (radix=, counting_scratch().radix)")
        return radix_launches(topk, counts, seg_total, ticket, radix, pairs, sorted_keys, seg_off, tile_cum,
                              seqlen=seqlen, heads=heads, top_k=top_k, n_blocks=n_blocks, chunk=chunk, group=group,
                              rows_per_unit=rows_per_unit)
    tile, win = tile_plan(n_pairs, n_seg, n_blocks, plan)
    geometry = dict(seqlen=seqlen, heads=heads, top_k=top_k, n_blocks=n_blocks, chunk=chunk, group=group, win=win,
                    tile=tile)
    return [count_launch(topk, counts, ticket, **geometry),
            scan_launch(counts, seg_total, ticket, seg_off, tile_cum, n_pairs=n_pairs, n_seg=n_seg,
                        rows_per_unit=rows_per_unit, n_blocks=n_blocks, win=win, tile=tile),
            scatter_launch(topk, counts, seg_off, pairs, sorted_keys, **geometry)]


# --------------------------------------------------------------------------------------------------
# a chunk's lists gathered from kept lists over the same full sequences


GATHER_THREADS = 256


def gather_table(kept_chunks, kept_layout, chunk, *, top_k: int, n_blocks: int, group: int) -> np.ndarray:
    """(4, P, n_seg) int64 of ``chunk``'s segments in the kept lists (:func:`moba_pairs_gather`'s ``table``): per
    piece p of each segment, the position of the kept segment's start and end offsets, of its chunk's pairs, and
    the pair-index shift.

    ``chunk`` covers full sequences (t0 = 0, n_q = seqlen); ``kept_chunks`` (with ``kept_layout``:
    :func:`mobalab.kernels._cuda_attention.kept_lists_layout`) hold each of its kv heads in chunks that tile the
    sequence in query order: one chunk over the whole sequence, or several over parts of it that hold a single
    head (group 1). Pair i = (hc n_q' + tt) top_k + slot of a kept chunk starting at head h0' and query t0' is
    pair i + ((h0' - h0) seqlen + t0') top_k of ``chunk`` (n_q' = seqlen where the kept chunk has several heads,
    so the shift is one number per piece). Segment s of ``chunk`` is its pieces (the kept chunks' segments of the
    same kv head and block) in query order: the lists built for ``chunk``, in the same stable order. Heads with
    fewer pieces than P get empty ones."""
    if chunk.t0 != 0:
        raise ValueError(f"gathered lists need a chunk over full sequences (t0 = 0), got t0 = {chunk.t0}")
    seqlen = chunk.n_q
    n_kv = chunk.n_heads // group
    per_head = []
    for g in range(n_kv):
        head = chunk.h0 + g * group
        found = sorted(((c, lay) for c, lay in zip(kept_chunks, kept_layout, strict=True)
                        if c.batch_index == chunk.batch_index and c.h0 <= head < c.h0 + c.n_heads),
                       key=lambda item: item[0].t0)
        if not found:
            raise ValueError(f"no kept chunk holds batch {chunk.batch_index}, head {head}")
        t = 0
        for c, _ in found:
            if c.t0 != t or c.t0 + c.n_q > seqlen:
                raise ValueError(f"the kept chunks of batch {chunk.batch_index}, head {head} do not tile its "
                                 f"{seqlen} queries in order (one starts at {c.t0}, expected {t})")
            if c.n_q != seqlen and c.n_heads != 1:
                raise ValueError(f"a kept chunk over part of a sequence must hold one head to be gathered; got "
                                 f"{c.n_heads} heads over queries {c.t0}..{c.t0 + c.n_q - 1}")
            t += c.n_q
        if t != seqlen:
            raise ValueError(f"the kept chunks of batch {chunk.batch_index}, head {head} cover {t} of its "
                             f"{seqlen} queries")
        per_head.append(found)
    n_pieces = max(len(found) for found in per_head)
    table = np.empty((4, n_pieces, n_kv * n_blocks), dtype=np.int64)
    for g, found in enumerate(per_head):
        head = chunk.h0 + g * group
        rows = slice(g * n_blocks, (g + 1) * n_blocks)
        for p in range(n_pieces):
            c, (p0, _, s0, _) = found[min(p, len(found) - 1)]
            first = s0 + ((head - c.h0) // group) * n_blocks
            table[0, p, rows] = np.arange(first, first + n_blocks)
            if p < len(found):
                table[1, p, rows] = table[0, p, rows] + 1
                table[2, p, rows] = p0
                table[3, p, rows] = ((c.h0 - chunk.h0) * seqlen + c.t0) * top_k
            else:  # an empty piece: from the segment's start to itself
                table[1, p, rows] = table[0, p, rows]
                table[2, p, rows] = table[3, p, rows] = 0
    return table


def gather_launch(kept, table, dst_off, dst_pairs, n_seg: int, n_pieces: int = 1) -> Launch:
    """``chunk``'s pairs from the kept lists (``table`` from :func:`gather_table`, flattened, on the device, with
    ``n_pieces`` pieces per segment; ``dst_off`` its seg_off, the scan of the gathered segments' sizes)."""
    return Launch(SOURCE, "moba_pairs_gather", (max(1, n_seg),), (GATHER_THREADS,),
                  (kept, table, dst_off, dst_pairs, i32(n_seg), i32(n_pieces)))


# --------------------------------------------------------------------------------------------------
# the backward's CTA order: segments longest first


ORDER_THREADS = 1024  # kOrderKeys in cuda/pairs.cu: one thread per tile count
MAX_ORDER_SEGMENTS = 12288  # 48 KiB of keys in shared memory


def longest_first_launch(seg_off, n_seg: int, rows_per_tile: int, order) -> Launch:
    """``order`` (int32, ``n_seg``) = the segments by descending tile count (``ceil(rows / rows_per_tile)``, capped at
    ``ORDER_THREADS - 1``), equal counts in segment order: :func:`longest_first_reference` in one launch."""
    if not 0 < n_seg <= MAX_ORDER_SEGMENTS:
        raise ValueError(f"longest_first_launch: n_seg must be in 1..{MAX_ORDER_SEGMENTS}, got {n_seg}")
    return Launch(SOURCE, "moba_pairs_longest_first", (1,), (ORDER_THREADS,),
                  (seg_off, i32(n_seg), i32(rows_per_tile), order), shared_mem=4 * n_seg)


def longest_first_reference(seg_off: torch.Tensor, n_seg: int, rows_per_tile: int) -> torch.Tensor:
    """The order of :func:`longest_first_launch` in torch: a stable sort of the segments by descending tile count."""
    sizes = seg_off[1:n_seg + 1] - seg_off[:n_seg]
    tiles = torch.clamp((sizes + rows_per_tile - 1) // rows_per_tile, max=ORDER_THREADS - 1)
    return torch.sort(-tiles, stable=True).indices.to(torch.int32)


# --------------------------------------------------------------------------------------------------
# routing rebased to a range of blocks (a kernel call over one key segment of a longer sequence)


REBASE_THREADS = 256


def rebase_launch(topk, out, first: int, n_blocks: int) -> Launch:
    """``out`` = ``topk`` rebased to blocks ``first .. first + n_blocks - 1`` (-1 elsewhere); int32, contiguous,
    16-byte aligned, a multiple of 4 slots (:func:`rebased_topk` checks)."""
    n_vec = topk.numel() // 4
    grid = max(1, min(math.ceil(n_vec / REBASE_THREADS), 65535))
    return Launch(SOURCE, "moba_topk_rebase", (grid,), (REBASE_THREADS,),
                  (topk, out, i64(n_vec), i32(first), i32(n_blocks)))


def rebased_topk(topk: torch.Tensor, first: int, n_blocks: int) -> torch.Tensor:
    r"""Routing local to the blocks ``first .. first + n_blocks - 1``: :math:`j - \mathrm{first}` for a selected
    block j among them, -1 for every other slot; int32, topk's shape. One kernel pass on CUDA (int32 routing
    whose slots come in whole 16-byte vectors), the torch expression otherwise.

    Examples
    --------
    >>> import torch
    >>> rebased_topk(torch.tensor([[3, 5, -1, 9]], dtype=torch.int32), 4, 6).tolist()  # blocks 4 .. 9
    [[-1, 1, -1, 5]]
    """
    if topk.is_cuda and topk.dtype == torch.int32 and topk.numel() % 4 == 0 and topk.numel() > 0:
        src = kernel_ready(topk)
        out = torch.empty_like(src)
        with on_device(topk.device):
            launch(rebase_launch(src, out, first, n_blocks))
        return out
    local = topk - first
    return torch.where((local >= 0) & (local < n_blocks), local, -1).to(torch.int32)


# --------------------------------------------------------------------------------------------------
# the torch reference (any device)


def chunk_keys_reference(topk, chunk, *, n_blocks, group, top_k) -> torch.Tensor:
    r"""Segment key :math:`\kappa_i` (int32) of every pair of the chunk, moba_attn_keys' rule."""
    sel = topk[chunk.batch_index, chunk.t0:chunk.t0 + chunk.n_q, chunk.h0:chunk.h0 + chunk.n_heads, :top_k]
    sel = sel.permute(1, 0, 2).to(torch.int64)  # (head, query, slot): pair order
    n_seg = (chunk.n_heads // group) * n_blocks
    kv = (torch.arange(chunk.n_heads, device=topk.device) // group).view(-1, 1, 1)
    keys = torch.where((sel >= 0) & (sel < n_blocks), kv * n_blocks + sel, torch.full_like(sel, n_seg))
    return keys.reshape(-1).to(torch.int32)


def pair_lists_reference(topk, chunk, *, n_blocks, group, top_k, rows_per_unit):
    """(pairs, sorted_keys, seg_off, tile_cum) of the chunk by a stable torch sort: the torch path's lists."""
    keys = chunk_keys_reference(topk, chunk, n_blocks=n_blocks, group=group, top_k=top_k)
    n_seg = (chunk.n_heads // group) * n_blocks
    sorted_keys, pairs = torch.sort(keys, stable=True)
    counts = torch.bincount(keys.to(torch.int64), minlength=n_seg + 1)
    zero = torch.zeros(1, dtype=torch.int64, device=keys.device)
    seg_off = torch.cat([zero, counts.cumsum(0)])[:n_seg + 1]
    units = (counts[:n_seg] + rows_per_unit - 1) // rows_per_unit
    tile_cum = torch.cat([zero, units.cumsum(0)])
    return pairs, sorted_keys, seg_off, tile_cum
