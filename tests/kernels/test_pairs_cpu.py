"""The counting-sort pair lists (cuda/pairs.cu, mobalab.kernels._pairs) without a GPU: launch plans against the
CUDA signatures, the torch reference against the keys rule, and the kernels themselves run on the host
(``host_emulation/cuda_host.h``: every CUDA thread a coroutine, switching at barriers and warp operations in
shuffled orders, CTAs in a shuffled order, AddressSanitizer on, shared memory and outputs poisoned) against the
stable torch sort: the exact pair order, the sorted keys, seg_off and tile_cum. What this cannot show (PTX, the
memory order between concurrent CTAs around the scan's ticket, speed) is left to tests/kernels/test_pairs_gpu.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from mobalab.kernels import _cuda_attention as A
from mobalab.kernels import _pairs as P
from mobalab.kernels._build import source
from mobalab.kernels._launch import check_args, signatures

sys.path.insert(0, str(Path(__file__).parent))
from _emulation import harness_fixture, run_emulated  # noqa: E402


def _topk(seed, batch, seqlen, heads, top_k, n_blocks, *, unused=0.0, hot=None):
    """Random routing (distinct blocks per row, -1 for a fraction ``unused`` of the slots); ``hot``: every
    slot 0 picks that block (one huge segment)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(batch, seqlen, heads, n_blocks, generator=g)
    sel = scores.topk(min(top_k, n_blocks), dim=-1).indices
    if sel.shape[-1] < top_k:
        sel = torch.cat([sel, torch.full((*sel.shape[:-1], top_k - sel.shape[-1]), -1)], dim=-1)
    sel = torch.where(torch.rand(sel.shape, generator=g) < unused, torch.full_like(sel, -1), sel)
    if hot is not None:
        sel[..., 0] = hot
        sel[..., 1:] = torch.where(sel[..., 1:] == hot, torch.full_like(sel[..., 1:], -1), sel[..., 1:])
    return sel.to(torch.int32).contiguous()


def _buffers(n_pairs, n_seg, poison=-7):
    return dict(counts=torch.full((P.counts_elems(n_pairs, n_seg),), poison, dtype=torch.int32),
                seg_total=torch.full((n_seg + 1,), poison, dtype=torch.int32),
                ticket=torch.full((1,), poison, dtype=torch.int32),  # the count kernel sets it to 0
                pairs=torch.full((n_pairs,), poison, dtype=torch.int64),
                sorted_keys=torch.full((n_pairs,), poison, dtype=torch.int32),
                seg_off=torch.full((n_seg + 1,), poison, dtype=torch.int64),
                tile_cum=torch.full((n_seg + 1,), poison, dtype=torch.int64),
                radix=torch.full((P.radix_elems(n_pairs),), poison, dtype=torch.int32))


def _plans(topk, bufs, chunk, *, seqlen, heads, top_k, n_blocks, group, rows_per_unit, with_keys=True,
           with_tile_cum=True, tiles="auto"):
    return P.counting_launches(topk, bufs["counts"], bufs["seg_total"], bufs["ticket"], bufs["pairs"],
                               bufs["sorted_keys"] if with_keys else 0, bufs["seg_off"],
                               bufs["tile_cum"] if with_tile_cum else 0, seqlen=seqlen, heads=heads, top_k=top_k,
                               n_blocks=n_blocks, chunk=chunk, group=group, rows_per_unit=rows_per_unit,
                               tiles=tiles, radix=bufs["radix"])


# ---- plans and arguments (no compiler) ----

def test_pairs_kernels_have_the_planned_signatures():
    assert set(signatures(P.SOURCE)) == {"moba_pairs_count", "moba_pairs_scan", "moba_pairs_scatter",
                                         "moba_pairs_count_wide", "moba_pairs_scatter_wide",
                                         "moba_topk_rebase", "moba_pairs_gather", "moba_pairs_longest_first",
                                         "moba_pairs_radix_count_lo", "moba_pairs_radix_scan",
                                         "moba_pairs_radix_scatter_lo", "moba_pairs_radix_count_hi",
                                         "moba_pairs_radix_scatter_hi"}
    seqlen, heads, top_k, n_blocks, group = 300, 4, 3, 5, 2
    chunk = A.Chunk(1, 2, 2, 10, 250)
    topk = _topk(0, 2, seqlen, heads, top_k, n_blocks)
    n_pairs, n_seg = 2 * 250 * 3, 5
    bufs = _buffers(n_pairs, n_seg)
    for with_keys in (True, False):
        plans = _plans(topk, bufs, chunk, seqlen=seqlen, heads=heads, top_k=top_k, n_blocks=n_blocks, group=group,
                       rows_per_unit=64, with_keys=with_keys, with_tile_cum=not with_keys)
        assert [p.kernel for p in plans] == ["moba_pairs_count", "moba_pairs_scan", "moba_pairs_scatter"]
        for p in plans:
            check_args(p.source, p.kernel, p.args)
        count, scan, scatter = plans
        assert count.grid == scatter.grid == (P.n_tiles(n_pairs),) and count.block == scatter.block == (256,)
        assert scan.grid == (1,) and scan.block == (P.SCAN_THREADS,) and scan.shared_mem == 0
        assert count.shared_mem == 4 * 6 and scatter.shared_mem == 96 + 24
    # wide tiles: twice the pairs per CTA, the count on twice the threads, the scan told the tile size
    count, scan, scatter = _plans(topk, bufs, chunk, seqlen=seqlen, heads=heads, top_k=top_k, n_blocks=n_blocks,
                                  group=group, rows_per_unit=64, tiles="wide")
    for p in (count, scan, scatter):
        check_args(p.source, p.kernel, p.args)
    assert (count.kernel, scatter.kernel) == ("moba_pairs_count_wide", "moba_pairs_scatter_wide")
    assert count.block == (P.WIDE_COUNT_THREADS,) and scatter.block == (256,)
    assert count.grid == scatter.grid == (P.n_tiles(n_pairs, P.WIDE_TILE),) and int(scan.args[-1]) == P.WIDE_TILE
    # the two-digit sort: six launches over tiles of RADIX_TILE pairs, digits of 2 and 3 values for 6 keys
    plans = _plans(topk, bufs, chunk, seqlen=seqlen, heads=heads, top_k=top_k, n_blocks=n_blocks, group=group,
                   rows_per_unit=64, tiles="radix")
    assert [p.kernel for p in plans] == ["moba_pairs_radix_count_lo", "moba_pairs_radix_scan",
                                         "moba_pairs_radix_scatter_lo", "moba_pairs_radix_count_hi",
                                         "moba_pairs_radix_scan", "moba_pairs_radix_scatter_hi"]
    for p in plans:
        check_args(p.source, p.kernel, p.args)
    assert P.radix_digits(n_seg + 1) == (1, 2, 3)
    assert [p.grid for p in plans] == [(P.n_tiles(n_pairs, P.RADIX_TILE),), (2,), (1,), (1,), (3,), (1,)]
    assert plans[2].shared_mem == plans[5].shared_mem == P.RADIX_SMEM and plans[3].shared_mem == 4 * 6
    with pytest.raises(ValueError, match="needs its scratch"):
        P.counting_launches(topk, 0, 0, 0, 0, 0, 0, 0, seqlen=seqlen, heads=heads, top_k=top_k, n_blocks=n_blocks,
                            chunk=chunk, group=group, rows_per_unit=64, tiles="radix")
    with pytest.raises(ValueError, match="4096 or 8192 pairs"):
        P.count_launch(topk, 0, 0, seqlen=seqlen, heads=heads, top_k=top_k, n_blocks=n_blocks, chunk=chunk,
                       group=group, win=5, tile=1000)


@pytest.mark.parametrize(("n_pairs", "n_seg", "n_blocks", "want"), [
    (2 * 2**20, 4096, 4096, "radix"),       # 512K: one kv head of 4096 blocks per chunk
    (2 * 2**20, 4 * 2048, 2048, "radix"),   # 64K at B 32: four kv heads of 2048 blocks, a window of one
    (2 * 2**20, 4 * 512, 512, "narrow"),    # 64K at B 128
    (2 * 2**20, 2 * 2047, 2047, "narrow"),  # below the threshold
    (4096, 4 * 600, 600, "radix"),          # one narrow tile over four kv heads: a window of 2400 columns
])
def test_the_two_digit_sort_where_the_key_window_is_wide(monkeypatch, n_pairs, n_seg, n_blocks, want):
    monkeypatch.delenv(P.TILES_ENV, raising=False)
    assert P.pair_plan(n_pairs, n_seg, n_blocks) == want
    for tiles in ("narrow", "wide", "radix"):
        assert P.pair_plan(n_pairs, n_seg, n_blocks, tiles) == tiles
    assert P.tile_plan(n_pairs, n_seg, n_blocks, "narrow") == (P.TILE, P.key_window(n_pairs, n_seg, n_blocks))
    assert P.tile_plan(n_pairs, n_seg, n_blocks, "wide") == (P.WIDE_TILE,
                                                             P.key_window(n_pairs, n_seg, n_blocks, P.WIDE_TILE))
    monkeypatch.setenv(P.TILES_ENV, "narrow")
    assert P.pair_plan(n_pairs, n_seg, n_blocks) == "narrow" and P.tile_plan(n_pairs, n_seg, n_blocks)[0] == P.TILE
    monkeypatch.setenv(P.TILES_ENV, "huge")
    with pytest.raises(ValueError, match="MOBALAB_PAIR_TILES"):
        P.pair_plan(n_pairs, n_seg, n_blocks)


def test_the_constants_match_the_source():
    text = source(P.SOURCE)
    for name, value in (("kPairsThreads", P.PAIRS_THREADS), ("kPairsRounds", P.PAIRS_ROUNDS),
                        ("kWideRounds", "2 * kPairsRounds"), ("kWideCountThreads", "2 * kPairsThreads"),
                        ("kScanThreads", P.SCAN_THREADS), ("kOrderKeys", P.ORDER_THREADS)):
        assert f"constexpr int {name} = {value};" in text
    # keys are packed into 15 bits beside a 16-bit rank, positions counted in 16 bits per tile
    assert P.WIDE_ROUNDS == 2 * P.PAIRS_ROUNDS and P.WIDE_COUNT_THREADS == 2 * P.PAIRS_THREADS
    assert P.WIDE_TILE == P.WIDE_COUNT_THREADS * P.PAIRS_ROUNDS  # the count's and the scatter's tiles agree
    assert P.MAX_KEYS <= 2**15 and P.WIDE_TILE < 2**16
    assert P.scatter_smem_bytes(P.MAX_KEYS - 1) <= 160 << 10
    for name, value in (("kRadixBins", P.RADIX_BINS), ("kRadixThreads", P.RADIX_THREADS),
                        ("kRadixRounds", P.RADIX_ROUNDS), ("kRadixScanThreads", P.RADIX_SCAN_THREADS)):
        assert f"constexpr int {name} = {value};" in text
    assert P.RADIX_COUNT_THREADS * P.PAIRS_ROUNDS == P.RADIX_TILE  # the counts' and the scatters' tiles agree
    assert P.RADIX_TILE < 2**16 and P.radix_digits(2**14) == (7, 128, 128)  # ranks in 16 bits, digits in the bins
    # two scatter CTAs per SM (their launch bounds) fit the shared memory of an H100
    assert 2 * P.RADIX_SMEM <= 227 << 10


def test_the_key_limit_follows_the_device_shared_memory(monkeypatch):
    # H100 / H200, A100, sm_86 / sm_89 opt-in limits per CTA: the largest count whose scatter fits
    for smem, keys in ((232448, 11622), (166912, 8345), (101376, 5068), (160 << 10, P.MAX_KEYS)):
        assert P.keys_within(smem) == keys
        assert P.scatter_smem_bytes(keys - 1) <= smem < P.scatter_smem_bytes(keys)
    assert P.keys_within(10**7) == 2**P.KEY_BITS - 1  # the packing's bound
    assert P.max_keys(None) == P.max_keys("cpu") == P.MAX_KEYS
    props = type("Props", (), {"shared_memory_per_block_optin": 101376})
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    P._device_max_keys.cache_clear()
    try:
        assert P.max_keys(torch.device("cuda", 3)) == 5068
        assert P.counting_supported(10**6, 5067, "cuda:3") and not P.counting_supported(10**6, 5068, "cuda:3")
    finally:
        P._device_max_keys.cache_clear()


def test_too_large_chunks_are_refused_and_sorts_resolve(monkeypatch):
    assert P.counting_supported(10**6, P.MAX_KEYS - 1) and not P.counting_supported(10**6, P.MAX_KEYS)
    assert not P.counting_supported(2**31, 10)
    chunk = A.Chunk(0, 0, 1, 0, 8)
    with pytest.raises(ValueError, match="too large"):
        P.counting_launches(0, 0, 0, 0, 0, 0, 0, 0, seqlen=8, heads=1, top_k=1, n_blocks=P.MAX_KEYS, chunk=chunk,
                            group=1, rows_per_unit=64)
    monkeypatch.delenv(P.SORT_ENV, raising=False)
    assert P.resolve_sort(None) == "counting"
    monkeypatch.setenv(P.SORT_ENV, "torch")
    assert P.resolve_sort(None) == "torch" and P.resolve_sort("counting") == "counting"
    monkeypatch.setenv(P.SORT_ENV, "radix")
    with pytest.raises(ValueError, match="MOBALAB_PAIR_SORT"):
        P.resolve_sort(None)


def test_reference_keys_follow_the_rule():
    seqlen, heads, top_k, n_blocks, group = 40, 6, 4, 3, 3
    topk = _topk(1, 2, seqlen, heads, top_k, n_blocks, unused=0.3)
    topk[1, 7, 4, 2] = n_blocks  # out of range: unused too
    chunk = A.Chunk(1, 3, 3, 5, 30)
    keys = P.chunk_keys_reference(topk, chunk, n_blocks=n_blocks, group=group, top_k=top_k)
    n_seg = n_blocks  # one kv head in the chunk
    want = []
    for hc in range(chunk.n_heads):
        for tt in range(chunk.n_q):
            for s in range(top_k):
                j = int(topk[1, 5 + tt, 3 + hc, s])
                want.append((hc // group) * n_blocks + j if 0 <= j < n_blocks else n_seg)
    assert keys.tolist() == want
    pairs, sorted_keys, seg_off, tile_cum = P.pair_lists_reference(topk, chunk, n_blocks=n_blocks, group=group,
                                                                   top_k=top_k, rows_per_unit=16)
    assert sorted(range(len(want)), key=lambda i: (want[i], i)) == pairs.tolist()
    assert sorted_keys.tolist() == sorted(want)
    assert seg_off.tolist() == [sum(k < s for k in want) for s in range(n_seg + 1)]
    units = [-(-sum(k == s for k in want) // 16) for s in range(n_seg)]
    assert tile_cum.tolist() == [sum(units[:s]) for s in range(n_seg + 1)]


# ---- the kernels on the host ----

harness = harness_fixture("pairs_harness", lambda: {"pairs_kernels.cu": source(P.SOURCE)})


# (batch, seqlen, heads, group, top_k, n_blocks, chunk, routing options)
EMU_CASES = [
    # three tiles and a 37-pair tail: 2 * 2 * 4100 + ... pairs, GQA, a chunk inside the sequence
    pytest.param(2, 4400, 4, 2, 2, 40, A.Chunk(1, 2, 2, 300, 4100), {}, id="tiles-tail-gqa-offset-chunk"),
    # one block chosen by every row: one huge segment, most others empty, unused slots
    pytest.param(1, 3000, 2, 1, 4, 30, A.Chunk(0, 0, 2, 0, 3000), dict(hot=3, unused=0.2), id="one-huge-segment"),
    # fewer blocks than slots: many unused slots (the last key), a chunk smaller than one tile, 1 kv head
    pytest.param(1, 500, 3, 3, 8, 5, A.Chunk(0, 0, 3, 0, 500), dict(unused=0.1), id="few-blocks-unused"),
    # more keys than the scan's 32 per CTA, many small segments
    pytest.param(1, 2000, 2, 1, 3, 120, A.Chunk(0, 0, 2, 0, 2000), {}, id="many-segments"),
    # fewer queries than a thread's step covers (its walk wraps over several heads and kv heads per step)
    pytest.param(2, 12, 6, 3, 2, 4, A.Chunk(1, 0, 6, 2, 9), dict(unused=0.2), id="short-query-range"),
    # a top-k that does not divide the steps (32, 256), GQA: carries in the slot and the head
    pytest.param(1, 700, 4, 2, 7, 60, A.Chunk(0, 2, 2, 40, 600), {}, id="odd-top-k"),
    # key windows: kv heads of exactly one tile (1024 queries x 4 slots), so each tile's window is one kv head
    pytest.param(1, 1100, 3, 1, 4, 40, A.Chunk(0, 0, 3, 30, 1024), dict(unused=0.1), id="window-one-kv-head"),
    # tiles of exactly eight kv heads (256 queries x 2 slots) out of 16
    pytest.param(1, 300, 16, 1, 2, 9, A.Chunk(0, 0, 16, 10, 256), dict(unused=0.1), id="window-whole-kv-heads"),
    # tiles reaching into six of eight kv heads of a GQA chunk (900 pairs per kv head)
    pytest.param(1, 200, 16, 2, 3, 7, A.Chunk(0, 0, 16, 20, 150), dict(unused=0.1), id="window-straddling"),
]


@pytest.mark.parametrize(("n_q", "top_k", "group", "n_kv", "n_blocks"),
                         [(1024, 4, 1, 3, 40), (256, 2, 1, 16, 9), (150, 3, 2, 8, 7), (3000, 4, 1, 2, 30),
                          (9, 2, 3, 2, 4), (4096, 8, 4, 4, 512), (65536, 8, 1, 4, 2048), (1, 1, 1, 5, 3)])
@pytest.mark.parametrize("tile", [P.TILE, P.WIDE_TILE])
def test_key_window_holds_every_tile(n_q, top_k, group, n_kv, n_blocks, tile):
    """A tile's window (``key_window`` columns from its first pair's kv head) holds the keys of every pair in it,
    and is one kv head's blocks where tiles never cross a kv head's end."""
    per_kv = group * n_q * top_k
    n_pairs, n_seg = n_kv * per_kv, n_kv * n_blocks
    win = P.key_window(n_pairs, n_seg, n_blocks, tile)
    assert win % n_blocks == 0 and n_blocks <= win <= n_seg
    reach = max(((min(t * tile + tile, n_pairs) - 1) // per_kv) - (t * tile) // per_kv + 1
                for t in range(P.n_tiles(n_pairs, tile)))
    assert win >= reach * n_blocks
    if per_kv % tile == 0:
        assert win == n_blocks
    # the count table of either tile size fits the scratch's
    assert P.n_tiles(n_pairs, tile) * (win + 1) <= P.counts_elems(n_pairs, n_seg)


@pytest.mark.parametrize("tiles", ["narrow", "wide", "radix"])
@pytest.mark.parametrize(("batch", "seqlen", "heads", "group", "top_k", "n_blocks", "chunk", "opts"), EMU_CASES)
def test_emulated_counting_sort_is_the_stable_sort(harness, tmp_path, batch, seqlen, heads, group, top_k, n_blocks,
                                                  chunk, opts, tiles):
    topk = _topk(seqlen + n_blocks, batch, seqlen, heads, top_k, n_blocks, **opts)
    n_pairs = chunk.n_heads * chunk.n_q * top_k
    n_seg = (chunk.n_heads // group) * n_blocks
    rows = 64
    want = P.pair_lists_reference(topk, chunk, n_blocks=n_blocks, group=group, top_k=top_k, rows_per_unit=rows)
    bufs = _buffers(n_pairs, n_seg)
    plans = _plans(topk, bufs, chunk, seqlen=seqlen, heads=heads, top_k=top_k, n_blocks=n_blocks, group=group,
                   rows_per_unit=rows, tiles=tiles)
    assert plans[-1].kernel == {"wide": "moba_pairs_scatter_wide", "narrow": "moba_pairs_scatter",
                                "radix": "moba_pairs_radix_scatter_hi"}[tiles]
    run_emulated(harness, tmp_path, plans, seed=n_pairs)
    for name, w in zip(("pairs", "sorted_keys", "seg_off", "tile_cum"), want, strict=True):
        assert torch.equal(bufs[name], w), (name, (bufs[name] != w).nonzero()[:8])
    assert int(bufs["ticket"]) == 0  # ready for the next chunk
    assert int(bufs["seg_total"].sum()) == n_pairs


@pytest.mark.parametrize(("n_blocks", "digits"), [(8190, (6, 64, 128)), (4096, (6, 64, 65)), (1, (0, 1, 2))])
def test_emulated_two_digit_sort_at_its_widest_digits(harness, tmp_path, n_blocks, digits):
    """The two-digit sort where both digits take (nearly) all RADIX_BINS values, and where one key is all there
    is besides the unused slots': still the stable sort."""
    batch, seqlen, heads, group, top_k = 1, 1100, 2, 1, 4
    chunk = A.Chunk(0, 0, 1, 0, seqlen)
    topk = _topk(n_blocks, batch, seqlen, heads, top_k, n_blocks, unused=0.1)
    n_pairs, n_seg = seqlen * top_k, n_blocks
    assert P.radix_digits(n_seg + 1) == digits
    want = P.pair_lists_reference(topk, chunk, n_blocks=n_blocks, group=group, top_k=top_k, rows_per_unit=64)
    bufs = _buffers(n_pairs, n_seg)
    plans = _plans(topk, bufs, chunk, seqlen=seqlen, heads=heads, top_k=top_k, n_blocks=n_blocks, group=group,
                   rows_per_unit=64, tiles="radix")
    run_emulated(harness, tmp_path, plans, seed=n_blocks)
    for name, w in zip(("pairs", "sorted_keys", "seg_off", "tile_cum"), want, strict=True):
        assert torch.equal(bufs[name], w), (name, (bufs[name] != w).nonzero()[:8])
    assert int(bufs["ticket"]) == 0


harness_batched_scan = harness_fixture("pairs_harness", lambda: {"pairs_kernels.cu": source(P.SOURCE)},
                                       flags=("-DMOBA_PAIRS_SCAN_CACHED=1",), name="harness_batched_scan")


def test_emulated_scan_in_batches_is_the_stable_sort(harness_batched_scan, tmp_path):
    """The scan reading its tiles in batches (more tiles per thread than it keeps in registers: the kernel built
    with one tile per batch, so 36 tiles give each thread two): still the stable sort."""
    batch, seqlen, heads, group, top_k, n_blocks = 1, 9000, 4, 2, 4, 50
    chunk = A.Chunk(0, 0, 4, 0, seqlen)
    topk = _topk(9, batch, seqlen, heads, top_k, n_blocks, unused=0.05)
    n_pairs, n_seg = 4 * seqlen * top_k, 2 * n_blocks
    assert P.n_tiles(n_pairs) > 32
    want = P.pair_lists_reference(topk, chunk, n_blocks=n_blocks, group=group, top_k=top_k, rows_per_unit=64)
    bufs = _buffers(n_pairs, n_seg)
    plans = _plans(topk, bufs, chunk, seqlen=seqlen, heads=heads, top_k=top_k, n_blocks=n_blocks, group=group,
                   rows_per_unit=64)
    run_emulated(harness_batched_scan, tmp_path, plans, seed=1)
    for name, w in zip(("pairs", "sorted_keys", "seg_off", "tile_cum"), want, strict=True):
        assert torch.equal(bufs[name], w), (name, (bufs[name] != w).nonzero()[:8])
    assert int(bufs["ticket"]) == 0


@pytest.mark.parametrize("tiles", ["auto", "radix"])
def test_emulated_chunks_in_a_row_reuse_the_scratch(harness, tmp_path, tiles):
    """Chunks one after another through one count table, one seg_total and one ticket (the wrappers' use), in
    one run: the backward's launches (sorted keys, no tile_cum) and the forward's (tile_cum, no sorted keys)."""
    batch, seqlen, heads, group, top_k, n_blocks = 2, 1100, 4, 2, 3, 12
    topk = _topk(5, batch, seqlen, heads, top_k, n_blocks, unused=0.05)
    chunks = [A.Chunk(0, 0, 2, 0, 550), A.Chunk(0, 2, 2, 550, 550), A.Chunk(1, 2, 2, 0, 550),
              A.Chunk(1, 0, 2, 550, 550)]
    n_pairs, n_seg = 2 * 550 * top_k, n_blocks
    shared = _buffers(n_pairs, n_seg)
    outs, plans = [], []
    for i, chunk in enumerate(chunks):
        fwd = i % 2 == 1
        bufs = {**_buffers(n_pairs, n_seg), **{k: shared[k] for k in ("counts", "seg_total", "ticket", "radix")}}
        plans += _plans(topk, bufs, chunk, seqlen=seqlen, heads=heads, top_k=top_k, n_blocks=n_blocks, group=group,
                        rows_per_unit=256, with_keys=not fwd, with_tile_cum=fwd, tiles=tiles)
        outs.append(bufs)
    run_emulated(harness, tmp_path, plans, seed=3)
    for i, (chunk, bufs) in enumerate(zip(chunks, outs, strict=True)):
        fwd = i % 2 == 1
        want = P.pair_lists_reference(topk, chunk, n_blocks=n_blocks, group=group, top_k=top_k, rows_per_unit=256)
        assert torch.equal(bufs["pairs"], want[0]) and torch.equal(bufs["seg_off"], want[2]), i
        assert torch.equal(bufs["tile_cum"] if fwd else bufs["sorted_keys"], want[3] if fwd else want[1]), i
        assert (bufs["sorted_keys"] if fwd else bufs["tile_cum"]).eq(-7).all(), i  # not wanted: not written
    assert int(shared["ticket"]) == 0


# ---- the wrappers' choice of path (launches recorded, not run) ----

@pytest.mark.parametrize(("sort", "n_blocks", "tile_cum", "want"), [
    ("counting", 10, True, ["moba_pairs_count", "moba_pairs_scan", "moba_pairs_scatter"]),
    ("counting", P.MAX_KEYS, True, ["moba_attn_keys", "moba_attn_bounds", "moba_attn_segments"]),  # too many keys
    ("torch", 10, True, ["moba_attn_keys", "moba_attn_bounds", "moba_attn_segments"]),
    ("torch", 10, False, ["moba_attn_keys", "moba_attn_bounds"]),  # the backward: no tile_cum
])
def test_build_pair_lists_picks_the_path(monkeypatch, sort, n_blocks, tile_cum, want):
    launched = []

    def record(plan):
        check_args(plan.source, plan.kernel, plan.args)  # what CuPy would receive
        launched.append(plan.kernel)

    monkeypatch.setattr(A, "launch", record)
    seqlen, heads, top_k = 64, 2, 2
    chunk = A.Chunk(0, 0, heads, 0, seqlen)
    n_pairs, n_seg = heads * seqlen * top_k, heads * n_blocks
    topk = torch.zeros(1, seqlen, heads, top_k, dtype=torch.int32)
    keys = torch.zeros(n_pairs, dtype=torch.int32)
    seg_off = torch.zeros(n_seg + 1, dtype=torch.int64)
    cum = torch.zeros(n_seg + 1, dtype=torch.int64) if tile_cum else None
    scratch = A.pair_scratch(n_pairs, min(n_seg, 20), "cpu", sort)  # a chunk may be larger than the scratch serves
    assert (scratch is None) == (sort == "torch")
    assert A.pair_scratch(n_pairs, n_seg, "cpu", sort) is None or P.counting_supported(n_pairs, n_seg)
    pairs, sorted_keys = A.build_pair_lists(topk, keys, scratch, chunk, seqlen=seqlen, heads=heads, top_k=top_k,
                                            n_blocks=n_blocks, group=1, seg_off=seg_off, tile_cum=cum,
                                            rows_per_unit=64, with_keys=not tile_cum)
    assert launched == want
    assert pairs.dtype == torch.int64 and pairs.shape == (n_pairs,)
    if launched[0] == "moba_pairs_count":
        assert pairs.data_ptr() == scratch.pairs.data_ptr()
        assert (sorted_keys is None) == tile_cum
    else:
        assert sorted_keys is not None


def test_rebased_topk_plan_and_torch_path(monkeypatch):
    """The rebase launch binds to moba_topk_rebase's signature (4 slots per 16-byte vector); the torch path
    (CPU, or slots that are not whole vectors) maps the range to 0 .. n_blocks - 1 and everything else to -1."""
    topk = torch.tensor([[-1, 0, 3, 4], [8, 9, 10, 2]], dtype=torch.int32)
    plan = P.rebase_launch(topk, torch.empty_like(topk), 3, 7)
    args = check_args(plan.source, plan.kernel, plan.args)
    assert plan.kernel == "moba_topk_rebase" and int(args[2]) == 2 and plan.block == (P.REBASE_THREADS,)
    assert P.rebased_topk(topk, 3, 7).tolist() == [[-1, -1, 0, 1], [5, 6, -1, -1]]
    assert P.rebased_topk(topk[:, :3].to(torch.int64), 0, 4).tolist() == [[-1, 0, 3], [-1, -1, -1]]


# ---- lists gathered from kept lists ----

GATHER_CASES = [
    # (batch, seqlen, heads, group, top_k, n_blocks, kept chunks, gathered chunk)
    pytest.param(2, 300, 6, 2, 3, 10, [A.Chunk(b, h, 2, 0, 300) for b in (0, 1) for h in (0, 2, 4)],
                 A.Chunk(1, 0, 6, 0, 300), id="three-kept-chunks-into-one"),
    pytest.param(1, 260, 4, 1, 4, 9, [A.Chunk(0, 0, 3, 0, 260), A.Chunk(0, 3, 1, 0, 260)],
                 A.Chunk(0, 2, 2, 0, 260), id="part-of-a-kept-chunk"),
    # kept chunks over parts of one head's queries (the forward's chunks at long context): 2, 1 and 3 pieces
    # per head (empty pieces pad the shorter heads), uneven parts, a second batch entry
    pytest.param(2, 260, 3, 1, 3, 11, [A.Chunk(1, 0, 1, 0, 100), A.Chunk(1, 0, 1, 100, 160), A.Chunk(1, 1, 1, 0, 260),
                                       A.Chunk(1, 2, 1, 0, 90), A.Chunk(1, 2, 1, 90, 90), A.Chunk(1, 2, 1, 180, 80),
                                       A.Chunk(0, 0, 3, 0, 260)],
                 A.Chunk(1, 0, 3, 0, 260), id="query-parts-in-pieces"),
]


@pytest.mark.parametrize(("batch", "seqlen", "heads", "group", "top_k", "n_blocks", "kept", "chunk"), GATHER_CASES)
def test_emulated_gather_equals_the_built_lists(harness, tmp_path, batch, seqlen, heads, group, top_k, n_blocks,
                                                kept, chunk):
    """A chunk's lists gathered from other chunks' kept lists (the backward from the forward's) equal the lists
    built for it, pair for pair, with its seg_off; positions past the listed pairs are not written."""
    topk = _topk(seqlen, batch, seqlen, heads, top_k, n_blocks, unused=0.1)
    layout, total = A.kept_lists_layout(kept, top_k, n_blocks, group)
    lists = torch.full((total,), -5, dtype=torch.int64)
    for c, (p0, n_pairs, s0, n_seg) in zip(kept, layout, strict=True):
        pairs, _, seg_off, _ = P.pair_lists_reference(topk, c, n_blocks=n_blocks, group=group, top_k=top_k,
                                                      rows_per_unit=64)
        lists[p0:p0 + n_pairs] = pairs
        lists[s0:s0 + n_seg + 1] = seg_off
    table = torch.from_numpy(P.gather_table(kept, layout, chunk, top_k=top_k, n_blocks=n_blocks, group=group))
    n_pairs, n_seg = chunk.n_heads * chunk.n_q * top_k, (chunk.n_heads // group) * n_blocks
    want_pairs, _, want_off, _ = P.pair_lists_reference(topk, chunk, n_blocks=n_blocks, group=group, top_k=top_k,
                                                        rows_per_unit=64)
    sizes = (lists[table[1]] - lists[table[0]]).sum(0)
    seg_off = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
    assert torch.equal(seg_off, want_off)
    dst = torch.full((n_pairs,), -9, dtype=torch.int64)
    run_emulated(harness, tmp_path, [P.gather_launch(lists, table.reshape(-1).contiguous(), seg_off, dst, n_seg,
                                                     table.shape[1])], seed=n_pairs)
    listed = int(want_off[-1])
    assert torch.equal(dst[:listed], want_pairs[:listed]), (dst[:listed] != want_pairs[:listed]).nonzero()[:8]
    assert (dst[listed:] == -9).all()


def test_gather_table_refuses_chunks_it_cannot_serve():
    kept = [A.Chunk(0, 0, 2, 0, 100)]
    layout, _ = A.kept_lists_layout(kept, 2, 4, 1)
    with pytest.raises(ValueError, match="no kept chunk holds batch 0, head 2"):
        P.gather_table(kept, layout, A.Chunk(0, 0, 3, 0, 100), top_k=2, n_blocks=4, group=1)
    with pytest.raises(ValueError, match="full sequences"):
        P.gather_table(kept, layout, A.Chunk(0, 0, 2, 50, 50), top_k=2, n_blocks=4, group=1)
    with pytest.raises(ValueError, match="do not tile its 50 queries"):
        P.gather_table(kept, layout, A.Chunk(0, 0, 2, 0, 50), top_k=2, n_blocks=4, group=1)
    parts = [A.Chunk(0, 0, 2, 0, 60), A.Chunk(0, 0, 2, 60, 40)]  # parts of the queries of two heads
    layout, _ = A.kept_lists_layout(parts, 2, 4, 2)
    with pytest.raises(ValueError, match="must hold one head"):
        P.gather_table(parts, layout, A.Chunk(0, 0, 2, 0, 100), top_k=2, n_blocks=4, group=2)
    part = [A.Chunk(0, 0, 1, 0, 60)]
    layout, _ = A.kept_lists_layout(part, 2, 4, 1)
    with pytest.raises(ValueError, match="cover 60 of its 100 queries"):
        P.gather_table(part, layout, A.Chunk(0, 0, 1, 0, 100), top_k=2, n_blocks=4, group=1)


# ---- the backward's CTA order ----


@pytest.mark.parametrize("n_seg, top", [(1, 5), (37, 3), (700, 9), (2112, 200), (3000, 5000)])
def test_emulated_longest_first_is_the_stable_sort_by_tiles(harness, tmp_path, n_seg, top):
    """Segments by descending tile count, equal counts in segment order: many ties, empty segments, counts past
    the cap (ORDER_THREADS - 1 tiles), more segments than threads; the output poisoned before the launch."""
    g = torch.Generator().manual_seed(n_seg)
    sizes = torch.randint(0, top * 64 + 1, (n_seg,), generator=g)
    sizes[torch.randint(0, n_seg, (max(1, n_seg // 10),), generator=g)] = 0
    if top > 1000:
        sizes[:3] = (P.ORDER_THREADS + 5) * 64
    seg_off = torch.zeros(n_seg + 1, dtype=torch.int64)
    seg_off[1:] = torch.cumsum(sizes, 0)
    order = torch.full((n_seg,), -7, dtype=torch.int32)
    run_emulated(harness, tmp_path, [P.longest_first_launch(seg_off, n_seg, 64, order)], seed=n_seg)
    assert torch.equal(order, P.longest_first_reference(seg_off, n_seg, 64))
    key = torch.clamp((sizes + 63) // 64, max=P.ORDER_THREADS - 1)[order.long()]
    idx = order.long()
    assert sorted(idx.tolist()) == list(range(n_seg))  # a permutation
    assert (key[1:] <= key[:-1]).all() and (idx[1:] > idx[:-1])[key[1:] == key[:-1]].all()


def test_longest_first_launch_refuses_sizes_it_cannot_hold():
    seg_off = torch.zeros(2, dtype=torch.int64)
    for n in (0, P.MAX_ORDER_SEGMENTS + 1):
        with pytest.raises(ValueError, match="n_seg must be in"):
            P.longest_first_launch(seg_off, n, 64, torch.empty(1, dtype=torch.int32))


# ---- a batch folded into one sequence ----

def test_folded_topk_renumbers_the_batch():
    """Block j of sequence b becomes b * n_blocks + j; -1 (an unused slot) stays."""
    from mobalab.kernels._batch_fold import folded_topk

    topk = torch.tensor([[[[0, -1, 2, 1]]], [[[3, 0, -1, -1]]], [[[1, 2, 3, 0]]]], dtype=torch.int32)
    assert folded_topk(topk, 4).flatten().tolist() == [0, -1, 2, 1, 7, 4, -1, -1, 9, 10, 11, 8]


@pytest.mark.parametrize(("shape", "want"), [
    ((2, 8192, 16, 16, 128, 128, 8, False), True),    # two chunks per pass -> one
    ((4, 4096, 16, 4, 64, 64, 8, False), True),
    ((2, 16384, 16, 16, 128, 128, 8, False), False),  # the forward needs two chunks either way
    ((8, 4096, 16, 16, 128, 128, 8, False), True),    # 16 chunks -> 3, the backward on gathered lists
    ((8, 8192, 16, 16, 128, 128, 8, False), False),   # more segment keys than the counting sort takes
    ((2, 8000, 16, 16, 128, 128, 8, False), False),   # N not a multiple of B
    ((1, 8192, 16, 16, 128, 128, 8, False), False),   # nothing to fold
])
def test_folds_only_where_it_saves_chunks(shape, want):
    from mobalab.kernels import _cuda_backward as CB
    from mobalab.kernels._batch_fold import folds

    assert folds(*shape) is want
    batch, seqlen, heads, kv_heads, dim, _, top_k, det = shape
    if want:
        assert len(CB.forward_plan(1, batch * seqlen, heads, kv_heads, dim, top_k)) < \
            len(CB.forward_plan(batch, seqlen, heads, kv_heads, dim, top_k))
