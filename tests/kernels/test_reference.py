"""The torch MoBA reference against deliberately naive, loop-based re-implementations of the contract
(docs/design.md, "MoBA semantics"), plus its cost (no N x N work), non-finite inputs and validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import mobalab.kernels
from mobalab.kernels.reference import (
    dense_attention,
    moba_attention,
    moba_attention_backward,
    moba_attention_given_routing,
    moba_centroids,
    moba_topk,
)

# ---------------------------------------------------------------------------------------------------
# naive implementations (one query at a time, straight from docs/design.md, "MoBA semantics")


def naive_centroids(k, block_size):
    batch, seqlen, kv_heads, _ = k.shape
    n_blocks = math.ceil(seqlen / block_size)
    out = torch.empty(batch, n_blocks, kv_heads, k.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for j in range(n_blocks):
            for h in range(kv_heads):
                rows = [k[b, i, h].double() for i in range(j * block_size, min((j + 1) * block_size, seqlen))]
                out[b, j, h] = sum(rows) / len(rows)
    return out


def naive_topk(q, k, block_size, top_k, causal, centroid_precision="fp32"):
    """Per query: candidates sorted by (score desc, block index desc), Python lists throughout; "input": each
    centroid rounded to k's dtype (from fp32, as the means are kept)."""
    batch, seqlen, heads, _ = q.shape
    group = heads // k.shape[2]
    centroids = naive_centroids(k, block_size)
    if centroid_precision == "input":
        centroids = centroids.float().to(k.dtype).double()
    n_blocks = centroids.shape[1]
    out = torch.full((batch, seqlen, heads, top_k), -1, dtype=torch.int32)
    for b in range(batch):
        for t in range(seqlen):
            own = t // block_size
            for h in range(heads):
                qt = q[b, t, h].double()
                scores = {j: float(torch.dot(qt, centroids[b, j, h // group])) for j in range(n_blocks)}
                if causal:
                    candidates = [j for j in range(n_blocks) if j < own]
                    chosen = [own] + sorted(candidates, key=lambda j: (-scores[j], -j))[: top_k - 1]
                else:
                    chosen = sorted(range(n_blocks), key=lambda j: (-scores[j], -j))[:top_k]
                out[b, t, h, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return out


def attended_keys(selected_row, t, block_size, seqlen, causal):
    keys = []
    for j in selected_row.tolist():
        if j < 0:
            continue
        for i in range(j * block_size, min((j + 1) * block_size, seqlen)):
            if not causal or i <= t:
                keys.append(i)
    return keys


def naive_attention(q, k, v, selected, block_size, causal, scale):
    """fp64 softmax over an explicit per-query key list; returns (out, lse)."""
    batch, seqlen, heads, dim = q.shape
    group = heads // k.shape[2]
    out = torch.empty(batch, seqlen, heads, dim, dtype=torch.float64)
    lse = torch.empty(batch, seqlen, heads, dtype=torch.float64)
    for b in range(batch):
        for t in range(seqlen):
            for h in range(heads):
                keys = attended_keys(selected[b, t, h], t, block_size, seqlen, causal)
                kk = k[b, keys, h // group].double()
                vv = v[b, keys, h // group].double()
                logits = scale * (kk @ q[b, t, h].double())
                lse[b, t, h] = torch.logsumexp(logits, dim=0)
                out[b, t, h] = torch.softmax(logits, dim=0) @ vv
    return out, lse


def randn(batch, seqlen, heads, kv_heads, dim, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seqlen, heads, dim, generator=g, dtype=dtype)
    k = torch.randn(batch, seqlen, kv_heads, dim, generator=g, dtype=dtype)
    v = torch.randn(batch, seqlen, kv_heads, dim, generator=g, dtype=dtype)
    return q, k, v


def sdpa_causal(q, k, v):
    group = q.shape[2] // k.shape[2]
    kr, vr = (x.repeat_interleave(group, dim=2) for x in (k, v))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), kr.transpose(1, 2), vr.transpose(1, 2),
                                         is_causal=True)
    return out.transpose(1, 2)


# (batch, seqlen, heads, kv_heads, dim, block_size, top_k)
SHAPES = [
    pytest.param(2, 24, 2, 2, 4, 4, 3, id="N-multiple-of-B"),
    pytest.param(1, 23, 4, 2, 5, 4, 3, id="partial-last-block-gqa2"),
    pytest.param(2, 17, 4, 1, 3, 3, 2, id="mqa-gqa4"),
    pytest.param(1, 5, 2, 2, 4, 8, 2, id="N-lt-B"),
    pytest.param(1, 19, 2, 1, 4, 4, 9, id="k-ge-n"),
    pytest.param(1, 21, 2, 2, 4, 3, 1, id="k1"),
    pytest.param(1, 30, 2, 2, 3, 1, 4, id="B1"),
]


# ---------------------------------------------------------------------------------------------------
# centroids


@pytest.mark.parametrize("seqlen,block_size", [(12, 4), (13, 4), (3, 8), (7, 1)])
def test_centroids_match_loop_mean(seqlen, block_size):
    _, k, _ = randn(2, seqlen, 3, 3, 5)
    got = moba_centroids(k, block_size)
    assert got.shape == (2, math.ceil(seqlen / block_size), 3, 5)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, naive_centroids(k, block_size), rtol=0, atol=1e-14)


def test_centroids_are_fp32_for_half_inputs():
    _, k, _ = randn(1, 10, 2, 2, 4, dtype=torch.float32)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        got = moba_centroids(k.to(dtype), 4)
        assert got.dtype == torch.float32
        ref = naive_centroids(k.to(dtype), 4)
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-6)
    # the partial last block (2 keys) is averaged over 2, not 4
    torch.testing.assert_close(moba_centroids(k, 4)[:, 2], k[:, 8:10].mean(dim=1))


# ---------------------------------------------------------------------------------------------------
# routing


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("batch,seqlen,heads,kv_heads,dim,block_size,top_k", SHAPES)
def test_topk_matches_naive_loop(batch, seqlen, heads, kv_heads, dim, block_size, top_k, causal):
    q, k, _ = randn(batch, seqlen, heads, kv_heads, dim)
    got = moba_topk(q, k, block_size, top_k, causal=causal)
    assert got.dtype == torch.int32 and got.shape == (batch, seqlen, heads, top_k)
    assert torch.equal(got, naive_topk(q, k, block_size, top_k, causal))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_topk_low_precision_matches_naive(dtype):
    q, k, _ = randn(2, 29, 4, 2, 8, dtype=torch.float32, seed=3)
    q, k = q.to(dtype), k.to(dtype)
    for causal in (True, False):
        assert torch.equal(moba_topk(q, k, 4, 3, causal=causal), naive_topk(q, k, 4, 3, causal))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_topk_input_centroid_precision_scores_the_rounded_means(dtype):
    """centroid_precision "input": the naive routing over centroids rounded to the keys' dtype; float32 keys: the
    same as "fp32"."""
    q, k, _ = randn(2, 301, 4, 2, 8, dtype=torch.float32, seed=13)
    for causal in (True, False):
        got = moba_topk(q.to(dtype), k.to(dtype), 4, 3, causal=causal, centroid_precision="input")
        assert torch.equal(got, naive_topk(q.to(dtype), k.to(dtype), 4, 3, causal, "input"))
        assert torch.equal(moba_topk(q, k, 4, 3, causal=causal, centroid_precision="input"),
                           moba_topk(q, k, 4, 3, causal=causal))


def test_topk_input_centroid_precision_is_not_fp32():
    """bf16 keys 1 + small offsets: block means distinct in fp32 and mostly equal once rounded to bf16, so the two
    precisions select differently (and "input" breaks its many exact ties toward the higher block)."""
    q, k, _ = randn(1, 64, 2, 1, 8, dtype=torch.float32, seed=15)
    q, k = q.to(torch.bfloat16), (1 + 2.0**-9 * k).to(torch.bfloat16)
    got = moba_topk(q, k, 4, 3, centroid_precision="input")
    assert torch.equal(got, naive_topk(q, k, 4, 3, True, "input"))
    assert not torch.equal(got, moba_topk(q, k, 4, 3))


def test_attention_routes_with_the_centroid_precision_given():
    q, k, v = randn(1, 40, 2, 1, 8, dtype=torch.float32, seed=14)
    q, k, v = q.to(torch.bfloat16), (1 + 2.0**-9 * k).to(torch.bfloat16), v.to(torch.bfloat16)
    topk = moba_topk(q, k, 4, 3, centroid_precision="input")
    out, lse = moba_attention(q, k, v, 4, 3, return_lse=True, centroid_precision="input")
    ref_out, ref_lse = moba_attention_given_routing(q, k, v, topk, 4)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    with pytest.raises(ValueError, match=r"moba_topk: centroid_precision must be one of \('fp32', 'input'\)"):
        moba_topk(q, k, 4, 3, centroid_precision="float32")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("seqlen", [24, 22], ids=["full", "partial-2"])
def test_topk_exact_ties_go_to_higher_block(causal, seqlen):
    # Small integers and a power-of-two block (and last block of 2 keys) keep every centroid and score
    # exact, so equal scores are bitwise equal in any summation order; blocks are copies of two patterns.
    g = torch.Generator().manual_seed(7)
    block_size, dim = 4, 4
    patterns = torch.randint(-2, 3, (2, block_size, 2, dim), generator=g).double()
    n_blocks = math.ceil(seqlen / block_size)
    k = torch.cat([patterns[j % 2] for j in range(n_blocks)], dim=0)[:seqlen].unsqueeze(0)
    q = torch.randint(-2, 3, (1, seqlen, 4, dim), generator=g).double()
    got = moba_topk(q, k, block_size, 3, causal=causal)
    assert torch.equal(got, naive_topk(q, k, block_size, 3, causal))
    # an all-equal score row: the highest-index candidates win, in descending index order
    flat_k = torch.ones(1, 24, 1, 2, dtype=torch.float64)
    flat_q = torch.ones(1, 24, 1, 2, dtype=torch.float64)
    sel = moba_topk(flat_q, flat_k, 4, 3, causal=causal)
    if causal:
        assert sel[0, 23, 0].tolist() == [5, 4, 3]
        assert sel[0, 9, 0].tolist() == [2, 1, 0]
    else:
        assert sel[0, 0, 0].tolist() == [5, 4, 3]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("dtype,seqlen,heads,kv_heads,dim", [(torch.float64, 128, 4, 2, 32),
                                                             (torch.float32, 64, 2, 1, 16)], ids=["fp64", "fp32"])
def test_topk_ties_of_equal_centroids_go_to_higher_block_in_any_shape(dtype, seqlen, heads, kv_heads, dim, causal):
    """Random (not small-integer) keys, every block a copy of one: equal centroids, whose scores a matrix product
    may round differently by column (in a way that follows the product's shape); the ties still go to the higher
    block, whatever the query chunk, and moba_attention attends that routing."""
    g = torch.Generator().manual_seed(8)
    block_size, top_k = 8, 4
    k = torch.randn(1, block_size, kv_heads, dim, generator=g, dtype=dtype).repeat(1, seqlen // block_size, 1, 1)
    q = torch.randn(1, seqlen, heads, dim, generator=g, dtype=dtype)
    got = moba_topk(q, k, block_size, top_k, causal=causal)
    if causal:
        own = torch.arange(seqlen) // block_size
        want = torch.stack([own - i for i in range(top_k)], -1).clamp(min=-1).view(1, seqlen, 1, top_k)
    else:
        want = (seqlen // block_size - 1 - torch.arange(top_k)).view(1, 1, 1, top_k)
    assert torch.equal(got.long(), want.expand(got.shape))
    assert torch.equal(moba_topk(q, k, block_size, top_k, causal=causal, query_chunk=24), got)
    out = moba_attention(q, k, k, block_size, top_k, causal=causal, query_chunk=48)
    want_out = moba_attention_given_routing(q, k, k, got, block_size, causal=causal)[0]
    torch.testing.assert_close(out, want_out, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-5)


def test_topk_slot_layout():
    q, k, _ = randn(1, 14, 2, 2, 4)
    sel = moba_topk(q, k, 4, 3, causal=True)  # blocks 0..3, last one of 2 keys
    own = torch.arange(14) // 4
    assert torch.equal(sel[0, :, 0, 0].long(), own)
    assert (sel[0, :4, :, 1:] == -1).all()  # block 0: no past block
    assert (sel[0, 4:8, :, 1] == 0).all() and (sel[0, 4:8, :, 2] == -1).all()
    past = sel[0, 8:, :, 1:]
    assert ((past >= 0) & (past < own[8:].view(-1, 1, 1))).all()
    assert (sel[..., 1] != sel[..., 2]).logical_or(sel[..., 1] == -1).all()
    sel1 = moba_topk(q, k, 4, 1, causal=True)
    assert torch.equal(sel1[0, :, :, 0].long(), own.view(-1, 1).expand(14, 2))
    nc = moba_topk(q, k, 4, 6, causal=False)
    assert (nc[..., 4:] == -1).all()
    assert torch.equal(nc[..., :4].sort(dim=-1).values.long(), torch.arange(4).expand(1, 14, 2, 4))


# ---------------------------------------------------------------------------------------------------
# attention


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("batch,seqlen,heads,kv_heads,dim,block_size,top_k", SHAPES)
def test_attention_matches_masked_softmax(batch, seqlen, heads, kv_heads, dim, block_size, top_k, causal):
    q, k, v = randn(batch, seqlen, heads, kv_heads, dim, seed=1)
    out, lse = moba_attention(q, k, v, block_size, top_k, causal=causal, return_lse=True)
    selected = moba_topk(q, k, block_size, top_k, causal=causal)
    ref_out, ref_lse = naive_attention(q, k, v, selected, block_size, causal, 1 / math.sqrt(dim))
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)


def test_attention_actually_sparse():
    # With more blocks than slots, MoBA must differ from dense causal attention (else the test above
    # could pass with any selection).
    q, k, v = randn(1, 40, 2, 2, 4, seed=2)
    out = moba_attention(q, k, v, 4, 2)
    assert (out - sdpa_causal(q, k, v)).abs().max() > 1e-3


@pytest.mark.parametrize(
    "seqlen,block_size,top_k,heads,kv_heads",
    [(24, 4, 6, 2, 2), (24, 4, 7, 4, 2), (23, 4, 6, 4, 1), (5, 8, 1, 2, 2), (16, 16, 1, 2, 1),
     (9, 2, 5, 2, 2)],
)
def test_attention_is_dense_causal_when_everything_fits(seqlen, block_size, top_k, heads, kv_heads):
    q, k, v = randn(2, seqlen, heads, kv_heads, 8, dtype=torch.float32, seed=4)
    assert seqlen <= top_k * block_size
    torch.testing.assert_close(moba_attention(q, k, v, block_size, top_k), sdpa_causal(q, k, v),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("group", [2, 4])
def test_gqa_equals_repeated_kv_heads(group, causal):
    q, k, v = randn(2, 27, 2 * group, 2, 6, seed=5)
    out, lse = moba_attention(q, k, v, 4, 3, causal=causal, return_lse=True)
    kr, vr = (x.repeat_interleave(group, dim=2) for x in (k, v))
    out_r, lse_r = moba_attention(q, kr, vr, 4, 3, causal=causal, return_lse=True)
    torch.testing.assert_close(out, out_r, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(lse, lse_r, rtol=1e-13, atol=1e-13)
    assert torch.equal(moba_topk(q, k, 4, 3, causal=causal), moba_topk(q, kr, 4, 3, causal=causal))


@pytest.mark.parametrize("scale", [0.05, 1.0, -0.3])
def test_softmax_scale(scale):
    q, k, v = randn(1, 18, 2, 1, 4, seed=6)
    out, lse = moba_attention(q, k, v, 4, 2, softmax_scale=scale, return_lse=True)
    ref_out, ref_lse = naive_attention(q, k, v, moba_topk(q, k, 4, 2), 4, True, scale)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)


def test_lse_is_logsumexp_over_attended_logits():
    # Independent check of return_lse: causal with N <= kB is dense causal, so lse is a masked logsumexp.
    q, k, v = randn(1, 12, 2, 2, 4, seed=8)
    _, lse = moba_attention(q, k, v, 4, 3, return_lse=True)
    logits = torch.einsum("bthd,bshd->bhts", q, k) / 2.0
    causal_mask = torch.ones(12, 12, dtype=torch.bool).tril()
    ref = torch.logsumexp(logits.masked_fill(~causal_mask, float("-inf")), dim=-1).transpose(1, 2)
    torch.testing.assert_close(lse, ref, rtol=1e-13, atol=1e-13)


def test_lse_is_fp32_for_fp32_and_half_inputs():
    q, k, v = randn(1, 10, 2, 2, 4, dtype=torch.float32)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out, lse = moba_attention(q.to(dtype), k.to(dtype), v.to(dtype), 4, 2, return_lse=True)
        assert out.dtype == dtype and lse.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_half_inputs_close_to_fp32(dtype, causal):
    q, k, v = randn(2, 33, 4, 2, 16, dtype=torch.float32, seed=9)
    qh, kh, vh = q.to(dtype), k.to(dtype), v.to(dtype)
    out = moba_attention(qh, kh, vh, 8, 2, causal=causal)
    assert out.dtype == dtype
    # same rounded inputs in fp32: identical routing and maths, so only the output rounding differs
    ref = moba_attention(qh.float(), kh.float(), vh.float(), 8, 2, causal=causal)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.float(), ref, rtol=eps, atol=eps)


# ---------------------------------------------------------------------------------------------------
# gradients


@pytest.mark.parametrize(
    "causal,heads,kv_heads", [(True, 2, 2), (False, 2, 2), (True, 4, 2), (False, 4, 1)],
    ids=["causal", "noncausal", "causal-gqa2", "noncausal-gqa4"],
)
def test_gradcheck(causal, heads, kv_heads):
    q, k, v = randn(1, 10, heads, kv_heads, 2, seed=10)
    inputs = tuple(x.requires_grad_() for x in (q, k, v))

    def fn(q, k, v):
        out, lse = moba_attention(q, k, v, 3, 2, causal=causal, return_lse=True, query_chunk=4)
        return out, lse

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_gradients_treat_routing_as_constant(causal):
    # The same masked softmax with the selection frozen (no path to centroids) gives the same grads.
    q, k, v = randn(1, 20, 4, 2, 4, seed=11)
    qa, ka, va = (x.clone().requires_grad_() for x in (q, k, v))
    out = moba_attention(qa, ka, va, 4, 2, causal=causal, query_chunk=7)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (out * weights).sum().backward()
    for g in (qa.grad, ka.grad, va.grad):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0

    selected = moba_topk(q, k, 4, 2, causal=causal)
    qb, kb, vb = (x.clone().requires_grad_() for x in (q, k, v))
    mask = torch.zeros(1, 4, 20, 20, dtype=torch.bool)
    for t in range(20):
        for h in range(4):
            mask[0, h, t, attended_keys(selected[0, t, h], t, 4, 20, causal)] = True
    logits = torch.einsum("bthd,bshd->bhts", qb, kb.repeat_interleave(2, dim=2)) / 2.0
    probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
    ref = torch.einsum("bhts,bshd->bthd", probs, vb.repeat_interleave(2, dim=2))
    torch.testing.assert_close(out.detach(), ref.detach(), rtol=1e-12, atol=1e-12)
    (ref * weights).sum().backward()
    for got, want in ((qa.grad, qb.grad), (ka.grad, kb.grad), (va.grad, vb.grad)):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)


def test_half_inputs_get_grads_in_their_dtype():
    q, k, v = randn(1, 12, 2, 2, 8, dtype=torch.bfloat16)
    for x in (q, k, v):
        x.requires_grad_()
    moba_attention(q, k, v, 4, 2).float().sum().backward()
    assert all(x.grad is not None and x.grad.dtype == torch.bfloat16 for x in (q, k, v))


# ---------------------------------------------------------------------------------------------------
# chunking


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_results_do_not_depend_on_query_chunk(causal):
    q, k, v = randn(2, 37, 4, 2, 5, seed=12)
    results = {}
    for chunk in (1, 3, 8, 37, 1000, None):
        qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
        out, lse = moba_attention(qs, ks, vs, 4, 3, causal=causal, return_lse=True, query_chunk=chunk)
        out.square().sum().backward()
        results[chunk] = (out.detach(), lse.detach(), qs.grad, ks.grad, vs.grad,
                          moba_topk(q, k, 4, 3, causal=causal, query_chunk=chunk))
    base = results[None]
    for chunk, res in results.items():
        assert torch.equal(res[-1], base[-1]), chunk
        for got, want in zip(res[:-1], base[:-1], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)


# ---------------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.parametrize("entry", ["reference", "public"])
@pytest.mark.parametrize("causal", [True, False])
def test_moba_topk_compiles_fullgraph(entry, causal):
    # compiled, the routing is one custom op running the eager code; fullgraph=True raises on a graph break
    fn = moba_topk if entry == "reference" else mobalab.kernels.moba_topk

    def f(q, k):
        return fn(q, k, 3, 2, causal=causal)

    q, k, _ = randn(2, 13, 2, 1, 8, seed=41)
    k[0, 4, 0, 1] = float("nan")  # a block no query may select, compiled or not
    got, want = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k), f(q, k)
    assert got.dtype == torch.int32 and got.shape == (2, 13, 2, 2)
    assert torch.equal(got, want)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("entry", ["reference", "public"])
def test_torch_compile_fullgraph_equals_eager(entry, causal):
    # compiled, the call is one custom op whose body is this reference; fullgraph=True raises on a graph break
    fn = moba_attention if entry == "reference" else mobalab.kernels.moba_attention

    def f(q, k, v):
        return fn(q, k, v, 2, 2, causal=causal, return_lse=True)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    q, k, v = randn(1, 11, 2, 2, 8, seed=31)
    a = [x.clone().requires_grad_() for x in (q, k, v)]
    b = [x.clone().requires_grad_() for x in (q, k, v)]
    got, want = compiled(*a), f(*b)
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    w = torch.randn(q.shape, dtype=q.dtype, generator=torch.Generator().manual_seed(32))
    for x, y in zip(torch.autograd.grad((got[0] * w).sum() + got[1].sum(), a),
                    torch.autograd.grad((want[0] * w).sum() + want[1].sum(), b), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    # non-finite inputs keep their eager results: a NaN key unroutes its block, a NaN value reaches its readers
    k[0, 4, 1, 0] = v[0, 9, 0, 2] = float("nan")
    with torch.no_grad():
        got, want = compiled(q, k, v), f(q, k, v)
    assert torch.isnan(got[0]).any()
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------------------------------------------
# validation


def _qkv(**kw):
    shape = dict(batch=1, seqlen=8, heads=4, kv_heads=2, dim=4) | kw
    return randn(shape["batch"], shape["seqlen"], shape["heads"], shape["kv_heads"], shape["dim"],
                 dtype=torch.float32)


# (make, match, also_for_topk): moba_topk takes no v, so v-only errors are checked on attention alone
@pytest.mark.parametrize(
    "make,match,also_for_topk",
    [
        (lambda q, k, v: (q[0], k, v), r"q must be 4-D .* got shape \(8, 4, 4\)", True),
        (lambda q, k, v: (q, k[..., None], v), r"k must be 4-D", True),
        (lambda q, k, v: (q, k, v[0]), r"v must be 4-D", False),
        (lambda q, k, v: (q.expand(2, -1, -1, -1), k, v), r"batch differs, q has 2 and k has 1", True),
        (lambda q, k, v: (q[:, :6], k, v), r"seqlen differs, q has 6 and k has 8.*self-attention", True),
        (lambda q, k, v: (q[..., :3], k, v), r"head_dim differs, q has 3 and k has 4", True),
        (lambda q, k, v: (q, k, v[:, :, :1]), r"k and v must have the same shape", False),
        (lambda q, k, v: (q, k, v[:, :5]), r"k and v must have the same shape", False),
        (lambda q, k, v: (q[:, :, :3], k, v), r"q heads \(3\) must be a multiple of kv heads \(2\)", True),
        (lambda q, k, v: (q.int(), k.int(), v.int()),
         r"q has dtype torch.int32; supported on the reference path: torch.float16, torch.bfloat16", True),
        (lambda q, k, v: (q, k.double(), v), r"must share one dtype", True),
        (lambda q, k, v: (q, k, v.half()), r"must share one dtype", False),
        (lambda q, k, v: (q, _fake_cuda(k), v), r"q, k(, v)? must be on one device", True),
        (lambda q, k, v: (q.to("meta"), k, v), r"q is a meta tensor", True),
        (lambda q, k, v: (q[:, :0], k[:, :0], v[:, :0]), r"empty dimension", True),
    ],
)
def test_input_validation(make, match, also_for_topk):
    """Every reference entry point validates through the one contract, with the same message."""
    q, k, v = make(*_qkv())
    with pytest.raises(ValueError, match=match):
        moba_attention(q, k, v, 4, 2)
    with pytest.raises(ValueError, match=match):
        dense_attention(q, k, v)
    if also_for_topk:
        with pytest.raises(ValueError, match=match):
            moba_topk(q, k, 4, 2)


def _fake_cuda(x):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return torch.empty(x.shape, dtype=x.dtype, device="cuda")


def test_non_tensor_inputs_raise_type_error():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"moba_attention: q must be a torch.Tensor, got numpy.ndarray"):
        moba_attention(q.numpy(), k, v, 4, 2)
    with pytest.raises(TypeError, match=r"moba_topk: k must be a torch.Tensor, got list"):
        moba_topk(q, k.tolist(), 4, 2)
    with pytest.raises(TypeError, match=r"moba_centroids: k must be a torch.Tensor, got numpy.ndarray"):
        moba_centroids(k.numpy(), 4)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(block_size=0), r"block_size must be an integer >= 1, got 0"),
        (dict(block_size=4.0), r"block_size must be an integer >= 1, got 4.0 \(float\)"),
        (dict(block_size=True), r"block_size must be an integer >= 1, got True"),
        (dict(top_k=0), r"top_k must be an integer >= 1, got 0"),
        (dict(top_k="2"), r"top_k must be an integer >= 1, got '2'"),
        (dict(causal=1), r"causal must be True or False, got 1"),
        (dict(query_chunk=0), r"query_chunk must be an integer >= 1, got 0"),
    ],
)
def test_argument_validation(kwargs, match):
    q, k, v = _qkv()
    args = dict(block_size=4, top_k=2) | kwargs
    with pytest.raises(ValueError, match=match):
        moba_attention(q, k, v, **args)
    with pytest.raises(ValueError, match=match):
        moba_topk(q, k, **args)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "0.5", True])
def test_softmax_scale_validation(scale):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="softmax_scale must be a finite real number"):
        moba_attention(q, k, v, 4, 2, softmax_scale=scale)


def test_centroid_validation():
    _, k, _ = _qkv()
    with pytest.raises(ValueError, match=r"moba_centroids: block_size must be an integer >= 1, got -1"):
        moba_centroids(k, -1)
    with pytest.raises(ValueError, match=r"moba_centroids: k must be 4-D"):
        moba_centroids(k[0], 4)
    with pytest.raises(ValueError, match=r"moba_centroids: k has dtype torch.int64"):
        moba_centroids(k.long(), 4)


def test_given_routing_and_dense_validation():
    q, k, v = _qkv()
    topk = moba_topk(q, k, 4, 2)
    with pytest.raises(ValueError, match=r"topk holds block indices -1..1; supported: -1 \(unused\) and 0..0"):
        moba_attention_given_routing(q, k, v, topk, 8)
    with pytest.raises(ValueError, match=r"topk has shape \(1, 8, 4\)"):
        moba_attention_given_routing(q, k, v, topk[..., 0], 4)
    with pytest.raises(ValueError, match="topk has dtype torch.float32"):
        moba_attention_given_routing(q, k, v, topk.float(), 4)
    with pytest.raises(ValueError, match=r"query_positions span 0..8; supported: 0..7"):
        dense_attention(q, k, v, query_positions=[0, 8])
    with pytest.raises(ValueError, match="non-empty 1-D sequence of integers"):
        dense_attention(q, k, v, query_positions=[0.5])
    out, lse = moba_attention_given_routing(q, k, v, topk, 4)
    with pytest.raises(ValueError, match=r"dout has shape \(1, 7, 4, 4\); expected \(1, 8, 4, 4\)"):
        moba_attention_backward(out[:, :-1], q, k, v, out, lse, topk, 4)


# ---------------------------------------------------------------------------------------------------
# attention with the routing given, dense attention, the backward equations


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_given_routing_matches_naive(causal):
    # arbitrary selections: random distinct blocks per (query, head), some slots unused; causal rows keep
    # their own block in slot 0 and may list future blocks (they add nothing)
    q, k, v = randn(2, 29, 4, 2, 5, seed=14)
    block, n_blocks, slots = 4, 8, 4
    g = torch.Generator().manual_seed(15)
    topk = torch.argsort(torch.rand(2, 29, 4, n_blocks, generator=g), dim=-1)[..., :slots].int()
    topk[torch.rand(topk.shape, generator=g) < 0.25] = -1
    if causal:
        topk[..., 0] = (torch.arange(29) // block).view(1, 29, 1).int()
    else:
        topk[..., 0] = torch.where(topk[..., 0] < 0, 0, topk[..., 0])
    out, lse = moba_attention_given_routing(q, k, v, topk, block, causal=causal, softmax_scale=0.8)
    ref_out, ref_lse = naive_attention(q, k, v, topk, block, causal, 0.8)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("seqlen, heads, kv_heads", [(1, 2, 1), (37, 4, 2), (300, 2, 2)])
def test_dense_attention_matches_sdpa(causal, seqlen, heads, kv_heads):
    q, k, v = randn(2, seqlen, heads, kv_heads, 8, seed=16)
    group = heads // kv_heads
    kr, vr = (x.repeat_interleave(group, dim=2).transpose(1, 2) for x in (k, v))
    qt = q.transpose(1, 2)
    ref = F.scaled_dot_product_attention(qt, kr, vr, is_causal=causal, scale=0.4).transpose(1, 2)
    logits = (qt @ kr.transpose(-1, -2)) * 0.4
    if causal:
        logits = logits.masked_fill(~torch.ones(seqlen, seqlen, dtype=torch.bool).tril(), float("-inf"))
    ref_lse = torch.logsumexp(logits, dim=-1).transpose(1, 2)
    out, lse = dense_attention(q, k, v, causal=causal, softmax_scale=0.4)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)
    rows = [seqlen - 1, 0, seqlen // 2]
    out_rows, lse_rows = dense_attention(q, k, v, causal=causal, softmax_scale=0.4, query_positions=rows)
    torch.testing.assert_close(out_rows, ref[:, rows], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse_rows, ref_lse[:, rows], rtol=1e-12, atol=1e-12)


def test_dense_attention_rows_equal_moba_when_everything_fits():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 128, 3, 64, generator=g) for _ in range(3))
    rows = np.array([120, 127])
    out, lse = dense_attention(q, k, v, softmax_scale=0.7, query_positions=rows)
    ref, ref_lse = moba_attention(q, k, v, 32, 4, causal=True, softmax_scale=0.7, return_lse=True)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    torch.testing.assert_close(out, ref[:, rows], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse[:, rows], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal, heads, kv_heads", [(True, 4, 1), (False, 4, 2), (True, 2, 2)])
def test_backward_equations_match_autograd(causal, heads, kv_heads):
    # the backward formulas (what the CUDA kernel implements) vs autograd through the reference
    q, k, v = randn(2, 30, heads, kv_heads, 8, seed=5)
    topk = moba_topk(q, k, 8, 2, causal=causal)
    dout = torch.randn(q.shape, dtype=q.dtype, generator=torch.Generator().manual_seed(6))
    dlse = torch.randn(q.shape[:3], dtype=q.dtype, generator=torch.Generator().manual_seed(7))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = moba_attention_given_routing(*leaves, topk, 8, causal=causal, softmax_scale=0.3)
    want = torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), leaves, retain_graph=True)
    got = moba_attention_backward(dout, q, k, v, out.detach(), lse.detach(), topk, 8, causal, 0.3, dlse=dlse)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    got = moba_attention_backward(dout, q, k, v, out.detach(), lse.detach(), topk, 8, causal, 0.3)
    want = torch.autograd.grad((out * dout).sum(), leaves)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# non-finite inputs: a query reads only its selected blocks


def _attends(topk, key, block_size, causal):
    """(batch, seqlen, heads) bool: the query attends token ``key`` under the routing ``topk``."""
    t = torch.arange(topk.shape[1]).view(1, -1, 1)
    chosen = (topk == key // block_size).any(-1)
    return chosen & (key <= t) if causal else chosen


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_nan_value_reaches_only_the_queries_that_attend_it(causal):
    q, k, v = randn(1, 256, 2, 1, 8, dtype=torch.float32, seed=17)
    topk = moba_topk(q, k, 32, 2, causal=causal)
    v[0, 100] = float("nan")
    out, lse = moba_attention(q, k, v, 32, 2, causal=causal, return_lse=True)
    expect = _attends(topk, 100, 32, causal)
    assert 0 < int(expect.sum()) < expect.numel() // 2  # most queries never read token 100
    assert torch.equal(torch.isnan(out).any(-1), expect)
    assert torch.isfinite(lse).all()  # v does not enter lse
    clean = moba_attention(q, k, torch.nan_to_num(v), 32, 2, causal=causal)
    torch.testing.assert_close(out[~expect], clean[~expect], rtol=0, atol=0)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_key_drops_its_block_from_routing(value):
    # the block's centroid is not finite, so it scores NaN and is never selected by score: only its own
    # queries at or after the key (causal) read it, and a non-causal query never does
    q, k, v = randn(1, 256, 2, 1, 8, dtype=torch.float32, seed=18)
    k[0, 100] = value
    causal_topk = moba_topk(q, k, 32, 3, causal=True)
    assert not (causal_topk[..., 1:] == 3).any() and (causal_topk[0, 96:128, :, 0] == 3).all()
    assert not (moba_topk(q, k, 32, 3, causal=False) == 3).any()
    out = moba_attention(q, k, v, 32, 3, causal=True)
    bad = ~torch.isfinite(out).all(-1)
    assert torch.equal(bad[0, :, 0], (torch.arange(256) >= 100) & (torch.arange(256) < 128))
    assert torch.isfinite(moba_attention(q, k, v, 32, 3, causal=False)).all()


def test_non_finite_query_stays_in_its_row():
    q, k, v = randn(1, 64, 2, 2, 8, dtype=torch.float32, seed=19)
    q[0, 40, 1] = float("inf")
    out, lse = moba_attention(q, k, v, 8, 3, return_lse=True)
    bad = ~torch.isfinite(out).all(-1) | ~torch.isfinite(lse)
    assert bad[0, 40, 1] and int(bad.sum()) == 1


def test_every_block_unselectable_gives_zero_output():
    # non-causal, every centroid NaN: no block can be selected; the query reads nothing (CUDA merge: same)
    q, k, v = randn(1, 16, 1, 1, 4, dtype=torch.float32, seed=20)
    k[0, ::4] = float("nan")
    assert (moba_topk(q, k, 4, 2, causal=False) == -1).all()
    out, lse = moba_attention(q, k, v, 4, 2, causal=False, return_lse=True)
    assert (out == 0).all() and (lse == float("-inf")).all()


# ---------------------------------------------------------------------------------------------------
# cost: only the selected blocks are read (no N x N work or memory)


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_work_and_memory_follow_the_selected_blocks(causal):
    seqlen, heads, dim, block, top_k = 4096, 1, 8, 16, 2
    q, k, v = randn(1, seqlen, heads, heads, dim, dtype=torch.float32, seed=21)
    leaves = [x.requires_grad_() for x in (q, k, v)]
    with FlopCounterMode(display=False) as flops, _LargestTensor() as size:
        moba_attention(*leaves, block, top_k, causal=causal).square().sum().backward()
    n_blocks = seqlen // block
    routing = 2 * seqlen * heads * n_blocks * dim
    attention = 2 * 2 * seqlen * heads * top_k * block * dim  # S = QK^T and PV
    dense = 2 * 2 * seqlen * seqlen * heads * dim
    # forward, recomputed forward and backward (2x), segments padded to < 2x their length
    assert flops.get_total_flops() <= 2 * routing + 4 * 2 * attention
    assert flops.get_total_flops() < dense / 4  # the masked dense computation did > 2x dense
    assert size.largest <= max(heads * seqlen * n_blocks, 2 * heads * seqlen * top_k * block)
    assert size.largest < seqlen * seqlen / 8


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_a_block_longer_than_the_sequence_costs_what_its_keys_cost(causal):
    # Any B >= N is one block holding all N keys (docs/design.md, "MoBA semantics"), so every result equals that
    # of B = N, and so does the work: padding to B keys would take 2**40 rows, more than can be allocated.
    seqlen, top_k = 16, 2
    q, k, v = randn(1, seqlen, 4, 2, 8, dtype=torch.float32, seed=24)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(25))

    def everything(block):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        with _LargestTensor() as size:
            topk = moba_topk(q, k, block, top_k, causal=causal)
            out, lse = moba_attention(*leaves, block, top_k, causal=causal, return_lse=True)
            grads = torch.autograd.grad((out * dout).sum() + lse.sum(), leaves)
            given = moba_attention_given_routing(q, k, v, topk, block, causal)
            parts = [moba_attention_given_routing(q, k[:, a:b], v[:, a:b], topk, block, causal, key_offset=a)
                     for a, b in ((0, 7), (7, seqlen))]
            back = moba_attention_backward(dout, q, k[:, 7:], v[:, 7:], *given, topk, block, causal, key_offset=7)
            results = (moba_centroids(k, block), topk, out, lse, *grads, *given, *parts[0], *parts[1], *back)
        return [x.detach() for x in results], size.largest

    want, want_size = everything(seqlen)
    for block in (seqlen + 1, 2**40):
        got, size = everything(block)
        assert size <= want_size
        for x, y in zip(got, want, strict=True):
            assert torch.equal(x, y), block


def test_top_k_far_above_the_blocks_costs_what_top_k_n_costs():
    # slots beyond the n blocks are unused: a dense request by a large k must not gather k * B rows per query
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 40, 2, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    for causal in (True, False):
        expected = moba_attention(q, k, v, block_size=8, top_k=5, causal=causal)
        with _LargestTensor() as size:
            got = moba_attention(q, k, v, block_size=8, top_k=4096, causal=causal)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        assert size.largest <= 2 * 40 * 5 * 8 * 8  # (queries x heads) x (n blocks x B) x d at most, not x 4096 / 5
