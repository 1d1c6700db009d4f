"""The counting-sort pair lists (cuda/pairs.cu) on the GPU: the exact lists of the stable torch sort on awkward
routing, and MoBA attention through them bit-identical to the torch-sort path (forward out and lse, backward
dq / dk / dv in both determinism modes). A timing at 64K tokens (batch 2, 16 heads, B 128, k 8, d 128) prints
the index building and the forward of both paths and requires the counting sort to be the faster.
"""

from __future__ import annotations

import math

import pytest
import torch

from mobalab.kernels import _cuda_attention as A
from mobalab.kernels import _cuda_backward as G
from mobalab.kernels import _pairs as P

pytestmark = pytest.mark.gpu


def _routing(seed, batch, seqlen, heads, top_k, n_blocks, *, causal=True, unused=0.0, hot=None, block_size=None):
    """Distinct blocks per (query, head): the own block (of ``block_size``, default seqlen / n_blocks) first when
    causal, the rest random among the earlier ones (-1 where there are too few, and for a fraction ``unused`` of
    the slots); ``hot``: slot 0 is that block."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    scores = torch.rand(batch, seqlen, heads, n_blocks, device="cuda", generator=g)
    block_size = block_size or math.ceil(seqlen / n_blocks)
    own = (torch.arange(seqlen, device="cuda") // block_size).view(1, -1, 1, 1)
    j = torch.arange(n_blocks, device="cuda").view(1, 1, 1, -1)
    if causal:
        scores = torch.where(j > own, torch.full_like(scores, -1.0), scores)
        scores = torch.where(j == own, torch.full_like(scores, 2.0), scores)
    vals, sel = scores.topk(min(top_k, n_blocks), dim=-1)
    sel = torch.where(vals < 0, torch.full_like(sel, -1), sel)
    if sel.shape[-1] < top_k:
        sel = torch.cat([sel, torch.full((*sel.shape[:-1], top_k - sel.shape[-1]), -1, device="cuda")], dim=-1)
    drop = torch.rand(sel.shape, device="cuda", generator=g) < unused
    sel = torch.where(drop, torch.full_like(sel, -1), sel)
    if hot is not None:
        sel[..., 0] = hot
        sel[..., 1:] = torch.where(sel[..., 1:] == hot, torch.full_like(sel[..., 1:], -1), sel[..., 1:])
    return sel.to(torch.int32).contiguous()


def _lists(topk, chunk, *, seqlen, heads, top_k, n_blocks, group, rows, sort, with_keys=True):
    n_pairs = chunk.n_heads * chunk.n_q * top_k
    n_seg = (chunk.n_heads // group) * n_blocks
    keys = torch.full((n_pairs,), -5, dtype=torch.int32, device="cuda")
    seg_off = torch.full((n_seg + 1,), -5, dtype=torch.int64, device="cuda")
    tile_cum = torch.full((n_seg + 1,), -5, dtype=torch.int64, device="cuda")
    scratch = A.pair_scratch(n_pairs, min(n_seg, P.max_keys("cuda") - 1), "cuda", sort)  # a chunk may exceed it
    if scratch is not None:
        scratch.pairs.fill_(-5)
        scratch.counts.fill_(-5)
    pairs, sorted_keys = A.build_pair_lists(topk, keys, scratch, chunk, seqlen=seqlen, heads=heads, top_k=top_k,
                                            n_blocks=n_blocks, group=group, seg_off=seg_off, tile_cum=tile_cum,
                                            rows_per_unit=rows, with_keys=with_keys)
    return pairs, sorted_keys, seg_off, tile_cum, scratch


# (batch, seqlen, heads, group, top_k, n_blocks, chunk, routing options)
CASES = [
    pytest.param(2, 9000, 4, 2, 3, 70, A.Chunk(1, 2, 2, 300, 8500), {}, id="tiles-tail-gqa-offset-chunk"),
    pytest.param(1, 6000, 2, 1, 4, 50, A.Chunk(0, 0, 2, 0, 6000), dict(hot=0, unused=0.2), id="one-huge-segment"),
    pytest.param(1, 700, 3, 3, 8, 5, A.Chunk(0, 0, 3, 0, 700), dict(unused=0.1), id="few-blocks-unused"),
    pytest.param(1, 8192, 8, 1, 8, 512, A.Chunk(0, 0, 8, 0, 8192), {}, id="4096-segments-many-tiles"),
    pytest.param(1, 6000, 2, 2, 8, 8191, A.Chunk(0, 0, 2, 0, 6000), dict(causal=False), id="8192-keys"),
    # n_seg + 1 = 8193 (64K tokens at B 32, 4 heads per chunk) and the device's most keys (11622 on an H200)
    pytest.param(1, 4096, 4, 1, 8, 2048, A.Chunk(0, 0, 4, 0, 4096), {}, id="8193-keys"),
    pytest.param(1, 3000, 1, 1, 8, "most", A.Chunk(0, 0, 1, 0, 3000), dict(causal=False), id="most-keys"),
    pytest.param(1, 100, 1, 1, 1, 1, A.Chunk(0, 0, 1, 0, 100), {}, id="one-segment-one-tile"),
]


@pytest.mark.parametrize("tiles", P.TILES)
@pytest.mark.parametrize(("batch", "seqlen", "heads", "group", "top_k", "n_blocks", "chunk", "opts"), CASES)
def test_counting_sort_is_the_stable_sort(monkeypatch, batch, seqlen, heads, group, top_k, n_blocks, chunk, opts,
                                          tiles):
    """Narrow, wide, two-digit and the automatic choice of tiles (wide for "8192-keys" and "most-keys")."""
    monkeypatch.setenv(P.TILES_ENV, tiles)
    if n_blocks == "most":
        n_blocks = P.max_keys("cuda") - 1
    topk = _routing(seqlen + n_blocks, batch, seqlen, heads, top_k, n_blocks, **opts)
    geometry = dict(seqlen=seqlen, heads=heads, top_k=top_k, n_blocks=n_blocks, group=group, rows=256)
    want = P.pair_lists_reference(topk, chunk, n_blocks=n_blocks, group=group, top_k=top_k, rows_per_unit=256)
    torch_path = _lists(topk, chunk, sort="torch", **geometry)
    got = _lists(topk, chunk, sort="counting", **geometry)
    assert got[-1] is not None  # the counting path ran
    n_seg = (chunk.n_heads // group) * n_blocks
    for name, w, t, g in zip(("pairs", "sorted_keys", "seg_off", "tile_cum"), want, torch_path[:4], got[:4],
                             strict=True):
        if name in ("seg_off", "tile_cum"):
            t, g = t[:n_seg + 1], g[:n_seg + 1]
        assert torch.equal(t, w), ("torch path", name)
        assert torch.equal(g, w), (name, (g != w).nonzero()[:8].tolist())
    assert int(got[-1].ticket) == 0
    again = _lists(topk, chunk, sort="counting", **geometry)
    assert all(torch.equal(a, b) for a, b in zip(got[:4], again[:4], strict=True))


def test_too_many_segments_take_the_torch_path():
    seqlen, heads, top_k, n_blocks = 300, 1, 2, P.max_keys("cuda")  # n_seg + 1 > the device's limit
    chunk = A.Chunk(0, 0, 1, 0, seqlen)
    topk = _routing(3, 1, seqlen, heads, top_k, n_blocks, causal=False)
    got = _lists(topk, chunk, seqlen=seqlen, heads=heads, top_k=top_k, n_blocks=n_blocks, group=1, rows=64,
                 sort="counting")
    want = P.pair_lists_reference(topk, chunk, n_blocks=n_blocks, group=1, top_k=top_k, rows_per_unit=64)
    assert all(torch.equal(g, w) for g, w in zip(got[:4], want, strict=True))
    assert int(got[-1].pairs[0]) == -5  # the counting scratch was left alone


ATTN_CASES = [
    # (batch, seqlen, heads, kv_heads, dim, block, top_k, causal, scratch budget (None: default), variant)
    pytest.param(2, 3000, 4, 2, 64, 64, 4, True, None, "auto", id="gqa2-d64-B64"),
    pytest.param(1, 5000, 8, 1, 128, 128, 8, True, 4 << 20, "auto", id="gqa8-d128-B128-many-chunks"),
    pytest.param(1, 2500, 2, 2, 128, 256, 3, False, None, "streaming", id="noncausal-streaming-B256"),
]


def _attn(sort, monkeypatch, q, k, v, dout, block, top_k, causal, budget, variant, topk, deterministic):
    monkeypatch.setenv(P.SORT_ENV, sort)
    out, lse = A.moba_attention_cuda(q, k, v, block, top_k, causal=causal, return_lse=True, topk_indices=topk,
                                     variant=variant, scratch_budget_bytes=budget)
    grads = G.moba_attention_backward_cuda(dout, q, k, v, out, lse, topk, block, top_k, causal,
                                           1.0 / math.sqrt(q.shape[-1]), deterministic=deterministic,
                                           scratch_budget_bytes=budget)
    return out, lse, *grads


@pytest.mark.parametrize("tiles", ["auto", "wide", "radix"])
@pytest.mark.parametrize(("batch", "seqlen", "heads", "kv_heads", "dim", "block", "top_k", "causal", "budget",
                          "variant"), ATTN_CASES)
def test_attention_through_the_counting_sort_is_bit_identical(monkeypatch, batch, seqlen, heads, kv_heads, dim,
                                                              block, top_k, causal, budget, variant, tiles):
    monkeypatch.setenv(P.TILES_ENV, tiles)
    g = torch.Generator(device="cuda").manual_seed(seqlen)
    q, dout = (torch.randn(batch, seqlen, heads, dim, device="cuda", generator=g).bfloat16() for _ in range(2))
    k, v = (torch.randn(batch, seqlen, kv_heads, dim, device="cuda", generator=g).bfloat16() for _ in range(2))
    n_blocks = math.ceil(seqlen / block)
    # unused slots only beside the own block: no row without keys
    topk = _routing(7, batch, seqlen, heads, top_k, n_blocks, causal=causal, unused=0.05 if causal else 0.0,
                    block_size=block)
    if causal:  # slot 0 holds the own block, which is never dropped (see docs/design.md, "Causal routing")
        topk[..., 0] = (torch.arange(seqlen, device="cuda") // block).view(1, -1, 1).int()
    args = (q, k, v, dout, block, top_k, causal, budget, variant, topk)
    names = ("out", "lse", "dq", "dk", "dv")
    for deterministic in (True, False):
        ref = _attn("torch", monkeypatch, *args, deterministic)
        got = _attn("counting", monkeypatch, *args, deterministic)
        for name, r, x in zip(names, ref, got, strict=True):
            if name == "dq" and not deterministic:  # float atomics: the last bits may differ run to run
                torch.testing.assert_close(x, r, atol=2e-2, rtol=2e-2)
            else:
                assert torch.equal(x, r), (name, deterministic, (x.float() - r.float()).abs().max().item())


def _time_ms(fn, reps=10):
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def test_counting_sort_is_faster_at_64k(monkeypatch, capsys):
    batch, seqlen, heads, dim, block, top_k = 2, 65536, 16, 128, 128, 8
    n_blocks = seqlen // block
    topk = _routing(11, batch, seqlen, heads, top_k, n_blocks, block_size=block)
    chunks = A.plan_chunks(batch, seqlen, heads, heads, dim, top_k,
                           A.default_scratch_budget(batch, seqlen, heads, heads, dim))
    max_pairs = max(c.n_heads * c.n_q for c in chunks) * top_k
    max_seg = max(c.n_heads for c in chunks) * n_blocks
    keys = torch.empty(max_pairs, dtype=torch.int32, device="cuda")
    seg_off = torch.empty(max_seg + 1, dtype=torch.int64, device="cuda")
    tile_cum = torch.empty(max_seg + 1, dtype=torch.int64, device="cuda")

    def index(sort):
        scratch = A.pair_scratch(max_pairs, max_seg, "cuda", sort)
        return lambda: [A.build_pair_lists(topk, keys, scratch, c, seqlen=seqlen, heads=heads, top_k=top_k,
                                           n_blocks=n_blocks, group=1, seg_off=seg_off, tile_cum=tile_cum,
                                           rows_per_unit=256, with_keys=False) for c in chunks]

    index_ms = {sort: _time_ms(index(sort)) for sort in P.SORTS}
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(batch, seqlen, heads, dim, device="cuda", generator=g).bfloat16() for _ in range(3))
    fwd_ms = {}
    for sort in P.SORTS:
        monkeypatch.setenv(P.SORT_ENV, sort)
        fwd_ms[sort] = _time_ms(lambda: A.moba_attention_cuda(q, k, v, block, top_k, topk_indices=topk), reps=5)
    with capsys.disabled():
        print(f"\npair lists at 64K (batch 2, 16 heads, B 128, k 8, {len(chunks)} chunks): index building "
              f"counting {index_ms['counting']:.3f} ms, torch {index_ms['torch']:.3f} ms; forward counting "
              f"{fwd_ms['counting']:.2f} ms, torch {fwd_ms['torch']:.2f} ms")
    assert index_ms["counting"] < index_ms["torch"]


@pytest.mark.parametrize(("shape", "first", "n_blocks"), [((1, 777, 3, 8), 5, 40), ((2, 64, 4, 4), 0, 1),
                                                           ((1, 33, 2, 6), 100, 7), ((3, 5, 7, 3), 2, 9)])
def test_rebase_kernel_equals_the_torch_expression(shape, first, n_blocks):
    """moba_topk_rebase against the torch expression on routing that spans below, inside and above the range
    (and -1 slots); a strided slice and a slot count that is not whole vectors (torch path) give the same."""
    g = torch.Generator(device="cuda").manual_seed(sum(shape) + first)
    topk = torch.randint(-1, first + n_blocks + 20, shape, device="cuda", generator=g, dtype=torch.int32)

    def want(x):
        local = x - first
        return torch.where((local >= 0) & (local < n_blocks), local, -1)

    got = P.rebased_topk(topk, first, n_blocks)
    assert got.dtype == torch.int32 and torch.equal(got, want(topk))
    sliced = topk[:, 1:]
    assert torch.equal(P.rebased_topk(sliced, first, n_blocks), want(sliced))
