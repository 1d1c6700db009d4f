"""The benchmark peers' CPU-checkable parts: FlexAttention with a MoBA mask against the reference, the
block-mask construction, FlashMoBA's availability and the selection comparison."""

from __future__ import annotations

import pytest
import torch

from mobalab.bench import _flex_peer as fx
from mobalab.kernels.reference import moba_attention_given_routing, moba_topk

pytest.importorskip("torch.nn.attention.flex_attention")


def _inputs(seqlen, heads, kv_heads, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, seqlen, heads, dim, generator=g)
    k = torch.randn(2, seqlen, kv_heads, dim, generator=g)
    v = torch.randn(2, seqlen, kv_heads, dim, generator=g)
    return q, k, v


def _selection_mask(topk, block, seqlen, causal):
    """bool (b, h, N, N): key j in S_t (docs/design.md, "MoBA semantics"), from the routing."""
    sel = topk.permute(0, 2, 1, 3).long()
    blk = torch.arange(seqlen) // block
    keep = (sel.unsqueeze(-1) == blk).any(-2)
    if causal:
        keep &= torch.ones(seqlen, seqlen, dtype=torch.bool).tril()
    return keep


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kv_heads, kv_tile", [(2, None), (1, 32), (2, 64)])
def test_flex_with_moba_mask_equals_reference(causal, kv_heads, kv_tile):
    seqlen, block, top_k = 256, 32, 3
    q, k, v = _inputs(seqlen, 2, kv_heads, 32)
    topk = moba_topk(q, k, block, top_k, causal=causal)
    mask = fx.moba_block_mask(topk, block, seqlen, causal, kv_tile=kv_tile)
    out = fx.flex_moba_attention(q, k, v, topk, block, causal, block_mask=mask)
    ref, _ = moba_attention_given_routing(q, k, v, topk, block, causal=causal)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("block, kv_tile", [(32, 128), (32, 32), (48, 128), (256, 256)])
def test_tile_union_is_the_smallest_cover_of_the_selection(causal, block, kv_tile):
    seqlen, top_k = 512, 3
    q, k, _ = _inputs(seqlen, 2, 2, 16, seed=1)
    topk = moba_topk(q, k, block, top_k, causal=causal)
    union = fx.tile_union(topk, block, seqlen, kv_tile=kv_tile)
    keep = _selection_mask(topk, block, seqlen, False)  # block membership, before the causal cut
    n_q, n_kv = union.shape[-2:]
    pad_q, pad_kv = n_q * fx.Q_TILE - seqlen, n_kv * kv_tile - seqlen
    tiles = torch.nn.functional.pad(keep, (0, pad_kv, 0, pad_q))
    tiles = tiles.view(2, 2, n_q, fx.Q_TILE, n_kv, kv_tile).any(-1).any(-2)
    assert torch.equal(union, tiles)
    assert union.any(-1).all()  # every query tile lists at least its own tile


def test_mask_mod_is_the_token_selection():
    seqlen, block = 256, 32
    q, k, _ = _inputs(seqlen, 2, 2, 16, seed=2)
    for causal in (True, False):
        topk = moba_topk(q, k, block, 3, causal=causal)
        mm = fx.moba_mask_mod(topk, block, causal)
        t = torch.arange(seqlen)
        got = torch.stack([torch.stack([mm(torch.tensor(b), torch.tensor(h), t.view(-1, 1), t.view(1, -1))
                                        for h in range(2)]) for b in range(2)])
        assert torch.equal(got, _selection_mask(topk, block, seqlen, causal))


def test_flex_refuses_what_it_cannot_run():
    assert fx.flex_unavailable(64 * 1024, 128) is None
    assert "int32" in fx.flex_unavailable(256 * 1024, 128)
    assert "multiple of 128" in fx.flex_unavailable(1000, 128)
    assert fx.kv_tile_for(128) == 128 and fx.kv_tile_for(256) == 256 and fx.kv_tile_for(32) == 128
