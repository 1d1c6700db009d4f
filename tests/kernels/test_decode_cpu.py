"""MoBA decode on the CPU: the KV cache, the reference decode, argument checks and the CUDA launch plans.

The ground truth is ``moba_attention`` over the whole sequence: decoding token by token from a prompt
(append the token's key and value, then attend its query) must reproduce it at every position, with the
same block selections as ``moba_topk``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mobalab.kernels import (
    MobaKVCache,
    decode_bytes,
    decode_flops,
    expected_unique_blocks,
    moba_attention,
    moba_centroids,
    moba_decode,
    moba_decode_reference,
    moba_topk,
)
from mobalab.kernels import _contract as C_
from mobalab.kernels import _cuda_decode as C
from mobalab.kernels import _decode as D
from mobalab.kernels._launch import check_args

# one rounding of the output to the 16-bit type (both sides compute in fp32 from the same inputs)
TOL = {torch.float32: 2e-6, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float64: 1e-12}


def _stream(seed, batch, total, heads, kv_heads, dim, dtype):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, total, heads, dim, generator=g).to(dtype)
    k = torch.randn(batch, total, kv_heads, dim, generator=g).to(dtype)
    v = torch.randn(batch, total, kv_heads, dim, generator=g).to(dtype)
    return q, k, v


def _full_reference(q, k, v, b, end, block, top_k, q_len=1, scale=None, centroid_precision="fp32"):
    """moba_attention of sequence b over its first ``end`` tokens, at the last ``q_len`` positions."""
    out, lse = moba_attention(q[b:b + 1, :end], k[b:b + 1, :end], v[b:b + 1, :end], block, top_k,
                              softmax_scale=scale, return_lse=True, centroid_precision=centroid_precision)
    sel = moba_topk(q[b:b + 1, :end], k[b:b + 1, :end], block, top_k, centroid_precision=centroid_precision)
    return out[0, end - q_len:], lse[0, end - q_len:], sel[0, end - q_len:]


DECODE_CASES = [
    # dtype, batch, kv_heads, heads, d, B, top_k, prompt lengths, decode steps
    pytest.param(torch.float32, 1, 1, 1, 16, 4, 3, [9], 12, id="fp32-mha-crosses-blocks"),
    pytest.param(torch.float32, 2, 2, 8, 8, 8, 2, [13, 20], 14, id="fp32-gqa4-ragged"),
    pytest.param(torch.bfloat16, 2, 1, 3, 16, 8, 3, [30, 7], 10, id="bf16-mqa-ragged"),
    pytest.param(torch.float16, 1, 2, 4, 8, 16, 4, [33], 18, id="fp16-gqa2"),
    pytest.param(torch.float32, 3, 1, 2, 8, 5, 4, [1, 6, 11], 9, id="fp32-odd-block-from-one-token"),
]


@pytest.mark.parametrize(("dtype", "batch", "kv_heads", "heads", "dim", "block", "top_k", "lengths", "steps"),
                         DECODE_CASES)
def test_token_by_token_decode_equals_moba_attention(dtype, batch, kv_heads, heads, dim, block, top_k, lengths,
                                                     steps):
    total = max(lengths) + steps
    q, k, v = _stream(len(lengths) + dim, batch, total, heads, kv_heads, dim, dtype)
    cache = MobaKVCache(batch, kv_heads, dim, block, total, dtype=dtype)
    cache.prefill(k, v, lengths=lengths)  # positions >= lengths[b] are padding, replaced by the appends
    rows = torch.arange(batch)
    for step in range(steps):
        pos = torch.tensor(lengths) + step
        cache.append(k[rows, pos].unsqueeze(1), v[rows, pos].unsqueeze(1))
        qt = q[rows, pos].unsqueeze(1)
        out, lse = moba_decode(qt, cache, top_k, return_lse=True)
        sel = D._route(qt, cache, top_k)
        assert out.dtype == dtype and out.shape == (batch, 1, heads, dim) and lse.dtype == torch.float32
        for b in range(batch):
            ref_out, ref_lse, ref_sel = _full_reference(q, k, v, b, int(pos[b]) + 1, block, top_k)
            assert torch.equal(sel[b], ref_sel), (step, b)
            torch.testing.assert_close(out[b].float(), ref_out.float(), atol=TOL[dtype], rtol=TOL[dtype])
            torch.testing.assert_close(lse[b], ref_lse, atol=1e-5, rtol=1e-5)
    assert cache.lengths.tolist() == [n + steps for n in lengths]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_input_centroid_decode_equals_moba_attention_of_that_precision(dtype):
    """``centroid_precision="input"``: token by token, the selections are moba_topk's of that precision (block means
    rounded to the cache's dtype) at every position, and the outputs moba_attention's; the fp32 routing of the
    same steps selects other blocks at a quarter of the steps at least (keys of a large mean and a small spread:
    rounding the means moves the ranking), so the test tells the two precisions apart."""
    batch, kv_heads, heads, dim, block, top_k, prompt, steps = 2, 1, 4, 16, 4, 3, 40, 24
    q, k, v = _stream(11, batch, prompt + steps, heads, kv_heads, dim, torch.float32)
    # means ~2, spread ~3 ulps of the dtype at 2 (bf16 2^-6, fp16 2^-9): rounding them moves the ranking
    k = (2.0 + (0.1 if dtype == torch.bfloat16 else 0.0125) * k).to(dtype)
    q, v = q.to(dtype), v.to(dtype)
    cache = MobaKVCache(batch, kv_heads, dim, block, prompt + steps, dtype=dtype)
    cache.prefill(k[:, :prompt], v[:, :prompt])
    differ = 0
    for t in range(prompt, prompt + steps):
        cache.append(k[:, t:t + 1], v[:, t:t + 1])
        out, lse = moba_decode(q[:, t:t + 1], cache, top_k, return_lse=True, centroid_precision="input")
        sel = D._route(q[:, t:t + 1], cache, top_k, "input")
        differ += int((sel != D._route(q[:, t:t + 1], cache, top_k)).any())
        for b in range(batch):
            ref_out, ref_lse, ref_sel = _full_reference(q, k, v, b, t + 1, block, top_k, centroid_precision="input")
            assert torch.equal(sel[b], ref_sel), (t, b)
            torch.testing.assert_close(out[b].float(), ref_out.float(), atol=TOL[dtype], rtol=TOL[dtype])
            torch.testing.assert_close(lse[b], ref_lse, atol=1e-5, rtol=1e-5)
    assert differ >= steps // 4, differ


@pytest.mark.parametrize(("q_len", "prompt", "block"), [(4, 21, 8), (5, 30, 8), (16, 40, 16), (3, 3, 4)])
def test_multi_token_step_equals_moba_attention(q_len, prompt, block):
    """q_len > 1 (e.g. verifying draft tokens): the queries sit at the last q_len positions, each with its own
    own block and causal limit, also when they straddle a block boundary."""
    q, k, v = _stream(q_len, 2, prompt + q_len, 4, 2, 8, torch.float32)
    cache = MobaKVCache(2, 2, 8, block, prompt + q_len + 5)
    cache.prefill(k[:, :prompt], v[:, :prompt])
    cache.append(k[:, prompt:], v[:, prompt:])
    out = moba_decode(q[:, prompt:], cache, 3)
    for b in range(2):
        ref_out, _, _ = _full_reference(q, k, v, b, prompt + q_len, block, 3, q_len=q_len)
        torch.testing.assert_close(out[b], ref_out, atol=2e-6, rtol=2e-6)


def test_float64_is_exact_and_scale_is_honoured():
    q, k, v = _stream(5, 1, 40, 2, 1, 8, torch.float64)
    cache = MobaKVCache(1, 1, 8, 4, 40, dtype=torch.float64)
    cache.prefill(k[:, :39], v[:, :39])
    cache.append(k[:, 39:], v[:, 39:])
    out, lse = moba_decode(q[:, 39:], cache, 3, softmax_scale=0.7, return_lse=True)
    ref_out, ref_lse = moba_attention(q, k, v, 4, 3, softmax_scale=0.7, return_lse=True)
    assert lse.dtype == torch.float64
    torch.testing.assert_close(out[0, 0], ref_out[0, 39], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse[0, 0], ref_lse[0, 39], atol=1e-12, rtol=1e-12)


def test_short_context_is_dense_causal_attention():
    """N <= k·B: every past block fits, MoBA decode is dense causal attention at the last position."""
    q, k, v = _stream(2, 1, 23, 2, 2, 8, torch.float32)
    cache = MobaKVCache(1, 2, 8, 8, 32)
    cache.prefill(k[:, :22], v[:, :22])
    cache.append(k[:, 22:], v[:, 22:])
    out = moba_decode(q[:, 22:], cache, 3)
    dense = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                             v.transpose(1, 2), is_causal=True).transpose(1, 2)
    torch.testing.assert_close(out[0, 0], dense[0, 22], atol=2e-6, rtol=2e-6)


def test_reference_function_matches_dispatch():
    q, k, v = _stream(9, 2, 30, 4, 2, 8, torch.bfloat16)
    cache = MobaKVCache(2, 2, 8, 4, 30, dtype=torch.bfloat16)
    cache.prefill(k[:, :29], v[:, :29])
    cache.append(k[:, 29:], v[:, 29:])
    a, la = moba_decode(q[:, 29:], cache, 4, return_lse=True)
    b, lb = moba_decode_reference(q[:, 29:], cache, 4, return_lse=True)
    assert torch.equal(a, b) and torch.equal(la, lb)


def _masked_softmax_moba(q, k, v, block, top_k, positions):
    """Causal MoBA of one sequence at ``positions``, in float64 from the definition (docs/design.md, "MoBA
    semantics"): each block's mean key, the own block plus the best top_k - 1 complete past blocks by q . mean
    (ties to the higher index), a softmax over their keys masked to <= t. q (n, heads, d), k and v (n, kv_heads, d);
    returns out (len(positions), heads, d) and lse (len(positions), heads)."""
    q, k, v = q.double(), k.double(), v.double()
    heads, kv_heads, dim = q.shape[1], k.shape[1], q.shape[2]
    out = torch.empty(len(positions), heads, dim, dtype=torch.float64)
    lse = torch.empty(len(positions), heads, dtype=torch.float64)
    for r, t in enumerate(positions):
        own = t // block
        for h in range(heads):
            keys, values = k[:t + 1, h * kv_heads // heads], v[:t + 1, h * kv_heads // heads]
            scores = [(float(q[t, h] @ keys[j * block:(j + 1) * block].mean(0)), j) for j in range(own)]
            chosen = [own] + [j for _, j in sorted(scores, reverse=True)[:top_k - 1]]
            keep = torch.zeros(t + 1, dtype=torch.bool)
            for j in chosen:
                keep[j * block:(j + 1) * block] = True
            logits = (keys @ q[t, h] / math.sqrt(dim)).masked_fill(~keep, -math.inf)
            lse[r, h] = torch.logsumexp(logits, 0)
            out[r, h] = torch.softmax(logits, 0) @ values
    return out, lse


@pytest.mark.parametrize(("dtype", "block", "top_k", "lengths", "q_len", "page_size"), [
    pytest.param(torch.float32, 4, 3, [6, 11], 1, None, id="fp32-ragged-partial-blocks"),
    pytest.param(torch.float32, 3, 2, [1, 5], 4, 6, id="fp32-paged-q_len-4-across-block-ends"),
    pytest.param(torch.float32, 4, 9, [7, 2], 2, None, id="fp32-top_k-beyond-the-blocks"),
    pytest.param(torch.float32, 32, 2, [9, 3], 3, None, id="fp32-block-longer-than-the-sequences"),
    pytest.param(torch.bfloat16, 4, 2, [10, 5], 2, 8, id="bf16-paged"),
    pytest.param(torch.float16, 5, 3, [12, 4], 1, None, id="fp16-odd-block"),
    pytest.param(torch.float64, 4, 2, [9, 14], 3, None, id="fp64"),
])
def test_decode_equals_a_float64_masked_softmax(dtype, block, top_k, lengths, q_len, page_size):
    """Steps of q_len tokens from a ragged prompt against MoBA written out from its definition in float64 (GQA, 6
    query heads over 3 kv heads): the outputs within one rounding to the dtype, the LSEs within fp32 rounding."""
    steps, heads, kv_heads, dim = 3, 6, 3, 8
    total = max(lengths) + steps * q_len
    q, k, v = _stream(block + q_len, 2, total, heads, kv_heads, dim, dtype)
    cache = MobaKVCache(2, kv_heads, dim, block, total, dtype=dtype, page_size=page_size)
    cache.prefill(k, v, lengths=lengths)
    rows = torch.arange(2).view(2, 1)
    for step in range(steps):
        pos = torch.tensor(lengths).view(2, 1) + step * q_len + torch.arange(q_len)
        cache.append(k[rows, pos], v[rows, pos])
        out, lse = moba_decode(q[rows, pos], cache, top_k, return_lse=True)
        for b in range(2):
            want, want_lse = _masked_softmax_moba(q[b], k[b], v[b], block, top_k, pos[b].tolist())
            tol = max(TOL[dtype], 1e-6)
            torch.testing.assert_close(out[b].double(), want, atol=4 * tol, rtol=4 * tol)
            torch.testing.assert_close(lse[b].double(), want_lse, atol=1e-5, rtol=1e-5)


def test_top_k_beyond_the_blocks_gathers_only_the_blocks_there_are(monkeypatch):
    """A top_k far above the number of blocks (dense attention asked for by a large k) equals k = the number of
    blocks the longest sequence reaches, and the reference gathers no more slots than that per query."""
    q, k, v = _stream(7, 2, 22, 4, 2, 8, torch.float32)
    cache = MobaKVCache(2, 2, 8, 4, 22)
    cache.prefill(k, v, lengths=[22, 13])
    slots, attend = [], D._attend
    monkeypatch.setattr(D, "_attend", lambda *a: (slots.append(a[2].shape[-1]), attend(*a))[1])
    out, lse = moba_decode(q[:, :1], cache, 1000, return_lse=True)
    assert slots == [6]  # ceil(22 / 4)
    ref_out, ref_lse = moba_decode(q[:, :1], cache, 6, return_lse=True)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    dense = torch.nn.functional.scaled_dot_product_attention(q[:1, 21:22].transpose(1, 2), k[:1].transpose(1, 2),
                                                             v[:1].transpose(1, 2), enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(moba_decode(q[:, 21:22], cache, 1000)[0], dense[0], atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("poison", ["nan-value", "inf-value", "nan-key", "inf-key"])
def test_non_finite_token_reaches_only_the_queries_that_attend_it(poison):
    """Locality (docs/design.md, "MoBA semantics"): a non-finite key or value of token 0 changes only the queries
    that attend block 0, and a block whose centroid is not finite is never routed to, exactly as moba_attention
    over the whole sequence. The own block's future slots and unused slots read no row of token 0."""
    q, k, v = _stream(12, 1, 40, 2, 1, 8, torch.float32)
    value, what = poison.split("-")
    (v if what == "value" else k)[0, 0, 0, 0] = float(value)
    cache = MobaKVCache(1, 1, 8, 4, 40)
    cache.prefill(k[:, :30], v[:, :30])
    full, full_lse = moba_attention(q, k, v, 4, 2, return_lse=True)
    for t in range(30, 40):
        cache.append(k[:, t:t + 1], v[:, t:t + 1])
        out, lse = moba_decode(q[:, t:t + 1], cache, 2, return_lse=True)
        assert torch.equal(torch.isfinite(out), torch.isfinite(full[:, t:t + 1])), t
        finite = torch.isfinite(full[:, t:t + 1])
        torch.testing.assert_close(out[finite], full[:, t:t + 1][finite], atol=2e-6, rtol=2e-6)
        torch.testing.assert_close(lse, full_lse[:, t:t + 1], atol=2e-6, rtol=2e-6, equal_nan=True)


# ---------------------------------------------------------------------------------------------------
# the cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cache_sums_match_recomputed_centroids(dtype):
    """Prefill (ragged) then appends of 1 and 3 tokens: the running sums give moba_centroids of the keys."""
    lengths, block = [17, 5, 24], 4
    q, k, v = _stream(1, 3, 40, 2, 2, 8, dtype)
    cache = MobaKVCache(3, 2, 8, block, 40, dtype=dtype)
    cache.prefill(k[:, :24], v[:, :24], lengths=torch.tensor(lengths))
    ends = list(lengths)
    rows = torch.arange(3)
    for n_new in (1, 3, 1, 2):
        pos = torch.tensor(ends).view(3, 1) + torch.arange(n_new)
        cache.append(k[rows.view(3, 1), pos], v[rows.view(3, 1), pos])
        ends = [e + n_new for e in ends]
        cent = cache.centroids()
        assert cent.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        for b, end in enumerate(ends):
            ref = moba_centroids(k[b:b + 1, :end], block)[0]
            torch.testing.assert_close(cent[b, :ref.shape[0]], ref, atol=1e-6, rtol=1e-6)
            assert not cent[b, ref.shape[0]:].any()  # blocks it does not reach are zero
            # K and V land head-major at their positions
            assert torch.equal(cache.k[b, :, :end].transpose(0, 1), k[b, :end])
            assert torch.equal(cache.v[b, :, :end].transpose(0, 1), v[b, :end])
    assert cache.lengths.tolist() == ends and cache.appended.tolist() == [2, 2, 2]


@pytest.mark.parametrize("page_size", [None, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_input_means_follow_the_sums(dtype, page_size):
    """The 16-bit block means that the CUDA score pass of centroid_precision "input" streams: made from the sums on
    first use, then kept in step by appends (1 and 3 tokens, across block ends) and a new prefill; every complete
    block's mean is T(S_j / B) of its keys, the centroid the reference router of that precision scores."""
    lengths, block = [17, 5, 24], 4
    _, k, v = _stream(2, 3, 40, 2, 2, 8, dtype)
    k = k + 3.0  # means far from zero: their last bits differ between T(S / B) and a rounding of anything else
    cache = MobaKVCache(3, 2, 8, block, 40, dtype=dtype, page_size=page_size)
    cache.prefill(k[:, :24], v[:, :24], lengths=torch.tensor(lengths))
    means = cache._input_means()
    assert means.dtype == dtype and means.shape == (3, 2, cache.n_blocks, 8)
    assert cache._input_means() is means  # made once

    def check(ends):
        cent = cache.centroids()
        for b, end in enumerate(ends):
            full = end // block  # complete blocks: the only ones a router scores
            want = C_.routed_centroids(moba_centroids(k[b:b + 1, :end], block)[0][:full], dtype, "input")
            got = means[b, :, :full].transpose(0, 1).float()
            torch.testing.assert_close(got, want, atol=0, rtol=0)
            assert torch.equal(got, C_.routed_centroids(cent[b, :full], dtype, "input"))

    check(lengths)
    ends, rows = list(lengths), torch.arange(3)
    for n_new in (1, 3, 1, 2, 4):
        pos = torch.tensor(ends).view(3, 1) + torch.arange(n_new)
        cache.append(k[rows.view(3, 1), pos], v[rows.view(3, 1), pos])
        ends = [e + n_new for e in ends]
        check(ends)
    cache.prefill(k[:, 5:35], v[:, 5:35], lengths=[30, 9, 13])  # a new prompt: the means follow it
    k = k[:, 5:35]
    check([30, 9, 13])
    assert cache._input_means() is means


def test_input_means_need_a_16_bit_cache():
    cache = MobaKVCache(1, 1, 8, 4, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match="16-bit block means need a float16 or bfloat16 cache, this one holds "
                                         "torch.float32"):
        cache._input_means()


def test_prefill_replaces_and_chunks(monkeypatch):
    """A second prefill starts over (old sums gone); sums computed in chunks equal one pass."""
    from mobalab.kernels import _kv_cache

    _, k, v = _stream(4, 2, 64, 1, 1, 8, torch.float32)
    cache = MobaKVCache(2, 1, 8, 4, 64)
    cache.prefill(k, v)
    monkeypatch.setattr(_kv_cache, "_PREFILL_CHUNK_TOKENS", 8)
    cache.prefill(k[:, :30], v[:, :30], lengths=[30, 9])
    assert cache.lengths.tolist() == [30, 9]
    for b, end in enumerate([30, 9]):
        ref = moba_centroids(k[b:b + 1, :end], 4)[0]
        torch.testing.assert_close(cache.centroids()[b, :ref.shape[0]], ref, atol=1e-6, rtol=1e-6)
    assert not cache.block_sums[:, :, 8:].any() and not cache.block_sums[1, :, 3:].any()


def test_padded_prompt_longer_than_max_seqlen_holds_its_lengths():
    """A ragged batch padded past max_seqlen (to a bucket size): the padding is not held, so only the longest
    sequence has to fit; the cache equals one prefilled from the prompt cut to that sequence."""
    q, k, v = _stream(6, 2, 16, 2, 1, 8, torch.float32)
    cache, cut = MobaKVCache(2, 1, 8, 4, 10), MobaKVCache(2, 1, 8, 4, 10)
    cache.prefill(k, v, lengths=[9, 4])
    cut.prefill(k[:, :9], v[:, :9], lengths=[9, 4])
    assert cache.lengths.tolist() == [9, 4]
    assert torch.equal(cache.k, cut.k) and torch.equal(cache.block_sums, cut.block_sums)
    assert torch.equal(moba_decode(q[:, :1], cache, 2), moba_decode(q[:, :1], cut, 2))
    with pytest.raises(ValueError, match="the prompt has 11 tokens; this cache holds at most max_seqlen=10"):
        cache.prefill(k, v, lengths=[11, 4])
    assert cache.lengths.tolist() == [9, 4]


def test_cpu_device_with_an_index_takes_cpu_tensors():
    """device="cpu:0" names the CPU: the cache takes CPU tensors (which report "cpu") and decodes as a "cpu" one."""
    q, k, v = _stream(8, 1, 9, 2, 1, 8, torch.float32)
    cache, plain = MobaKVCache(1, 1, 8, 4, 9, device="cpu:0"), MobaKVCache(1, 1, 8, 4, 9)
    assert cache.device == torch.device("cpu")
    for c in (cache, plain):
        c.prefill(k, v)
    assert torch.equal(moba_decode(q[:, -1:], cache, 2), moba_decode(q[:, -1:], plain, 2))


def test_cache_layout_and_repr():
    cache = MobaKVCache(2, 3, 8, 16, 40, dtype=torch.bfloat16)
    assert cache.capacity == 48 and cache.n_blocks == 3
    assert cache.k.shape == (2, 3, 48, 8) and cache.block_sums.shape == (2, 3, 3, 8)
    assert cache.block_sums.dtype == torch.float32 and cache.k.is_contiguous()
    assert "lengths=[0, 0]" in repr(cache)


@pytest.mark.parametrize(("dtype", "block", "page_size", "lengths", "accepted"), [
    pytest.param(torch.float32, 4, None, [9, 14], [[2, 0], [4, 1], [0, 3], [1, 4], [3, 2]], id="fp32-contiguous"),
    pytest.param(torch.bfloat16, 4, 8, [6, 13, 1], [[0, 4, 2], [3, 1, 4], [4, 0, 1], [1, 2, 0]], id="bf16-paged"),
])
def test_speculative_steps_crop_the_rejected_drafts(dtype, block, page_size, lengths, accepted):
    """Speculative decoding: each step appends four draft tokens to every sequence, of which the first a_b are the
    sequence's true next tokens and the rest random (rejected), decodes their queries, then crops every sequence to
    its accepted tokens. At every accepted position the output equals moba_attention over the true sequence (same
    selections), and in the end the cache holds what a prefill of the true sequences gives: the same K and V rows,
    zeros past them, the same block sums up to fp32 rounding, the pages the tokens need."""
    batch, heads, kv_heads, dim, top_k, draft = len(lengths), 4, 2, 8, 3, 4
    total = max(lengths) + draft * len(accepted)
    q, k, v = _stream(7, batch, total, heads, kv_heads, dim, dtype)
    g = torch.Generator().manual_seed(8)
    cache = MobaKVCache(batch, kv_heads, dim, block, total, dtype=dtype, page_size=page_size)
    cache.prefill(k, v, lengths=lengths)
    held = list(lengths)
    rows = torch.arange(batch).view(-1, 1)
    for step, took in enumerate(accepted):
        pos = torch.tensor(held).view(-1, 1) + torch.arange(draft)  # (batch, draft)
        true = pos.clamp(max=total - 1)
        real = torch.arange(draft).view(1, -1) < torch.tensor(took).view(-1, 1)
        noise = torch.randn(batch, draft, kv_heads, dim, generator=g).to(dtype)
        k_new = torch.where(real.view(batch, draft, 1, 1), k[rows, true], noise)
        v_new = torch.where(real.view(batch, draft, 1, 1), v[rows, true], noise)
        cache.append(k_new, v_new)
        out = moba_decode(q[rows, true], cache, top_k)
        sel = D._route(q[rows, true], cache, top_k)
        for b, a in enumerate(took):
            if a:
                end = held[b] + a
                ref_out, _, ref_sel = _full_reference(q, k, v, b, end, block, top_k, q_len=a)
                assert torch.equal(sel[b, :a], ref_sel), (step, b)
                torch.testing.assert_close(out[b, :a].float(), ref_out.float(), atol=TOL[dtype], rtol=TOL[dtype])
        held = [n + a for n, a in zip(held, took, strict=True)]
        cache.crop(held)
        assert cache.lengths.tolist() == held and cache.appended.tolist() == [0] * batch
    fresh = MobaKVCache(batch, kv_heads, dim, block, total, dtype=dtype, page_size=page_size)
    fresh.prefill(k[:, :max(held)], v[:, :max(held)], lengths=held)
    torch.testing.assert_close(cache.block_sums, fresh.block_sums, atol=1e-5, rtol=1e-5)
    for b, n in enumerate(held):
        every = torch.arange(cache.capacity if page_size is None else cache.pages_per_seq * page_size)
        tokens = every[every < math.ceil(n / block) * block]  # the blocks a sequence reaches: its rows, then zeros
        if page_size is None:
            got_k, got_v = cache.k[b][:, tokens], cache.v[b][:, tokens]
        else:
            got_k, got_v = cache.token_rows(b, torch.arange(kv_heads).view(-1, 1), tokens.view(1, -1))
        want = (tokens < n).view(1, -1, 1)
        assert torch.equal(got_k, torch.where(want, k[b, tokens].transpose(0, 1), 0)), b
        assert torch.equal(got_v, torch.where(want, v[b, tokens].transpose(0, 1), 0)), b
    if page_size is not None:
        assert cache.free_pages == cache.num_pages - sum(math.ceil(n / page_size) for n in held)
        assert (cache.page_table >= 0).sum(dim=1).tolist() == [math.ceil(n / page_size) for n in held]


def test_crop_to_nothing_then_decode_again():
    """A sequence cropped to no token starts over at position 0; a decode straight after a crop asks for an append
    first; crop(n) with one integer means every sequence."""
    q, k, v = _stream(3, 2, 10, 2, 1, 8, torch.float32)
    cache = MobaKVCache(2, 1, 8, 4, 10)
    cache.prefill(k, v, lengths=[7, 10])
    cache.crop([0, 6])
    assert cache.lengths.tolist() == [0, 6] and not cache.block_sums[0].any() and not cache.k[0].any()
    assert not cache.k[1, :, 6:].any() and torch.equal(cache.k[1, :, :6], k[1, :6].transpose(0, 1))
    with pytest.raises(ValueError, match="append their keys and values first"):
        moba_decode(q[:, :1], cache, 2)
    with pytest.raises(ValueError, match=r"lengths \[3, 3\] must lie between 0 and the lengths held, \[0, 6\]"):
        cache.crop(3)
    cache.append(torch.stack([k[0, :1], k[1, 6:7]]), torch.stack([v[0, :1], v[1, 6:7]]))
    out = moba_decode(torch.stack([q[0, :1], q[1, 6:7]]), cache, 2)
    for b, end in ((0, 1), (1, 7)):
        ref_out, _, _ = _full_reference(q, k, v, b, end, 4, 2)
        torch.testing.assert_close(out[b], ref_out, atol=TOL[torch.float32], rtol=TOL[torch.float32])
    cache.crop(torch.tensor([1, 7]))
    cache.crop(torch.tensor(1))
    assert cache.lengths.tolist() == [1, 1]


@pytest.mark.parametrize(("lengths", "match"), [
    ([1], r"lengths has 1 entries; the cache has batch 2"),
    ([1, True], r"lengths must hold integers, got \[1, True\]"),
    ([1.0, 2], r"lengths must hold integers"),
    (-1, r"lengths \[-1, -1\] must lie between 0 and the lengths held, \[5, 3\]"),
    ([5, 4], r"lengths \[5, 4\] must lie between 0 and the lengths held, \[5, 3\] \(a crop only drops tokens\)"),
    ("ab", r"lengths must hold integers"),
    (None, r"lengths must be an integer or a sequence of 2 integers, got None"),
])
def test_crop_errors_are_named(lengths, match):
    cache = MobaKVCache(2, 1, 4, 2, 8)
    cache.prefill(torch.ones(2, 5, 1, 4), torch.ones(2, 5, 1, 4), lengths=[5, 3])
    with pytest.raises(ValueError, match=match):
        cache.crop(lengths)
    assert cache.lengths.tolist() == [5, 3] and cache.block_sums[0, 0, 2, 0] == 1.0


def test_a_crop_is_not_captured(monkeypatch):
    cache = MobaKVCache(1, 1, 4, 2, 8)
    cache.prefill(torch.ones(1, 5, 1, 4), torch.ones(1, 5, 1, 4))
    monkeypatch.setattr(MobaKVCache, "_capturing", lambda self: True)
    with pytest.raises(ValueError, match="a crop reads the lengths on the host"):
        cache.crop(2)


def test_lengths_follow_the_device_once_an_append_is_captured(monkeypatch):
    """A CUDA graph's replays of a captured append lengthen the sequences on the device alone, so from the capture
    on the host reads the device's lengths, and a step captured in the graph is planned for max_seqlen (a CPU cache
    here: the capture and two replays played by hand)."""
    cache = MobaKVCache(2, 1, 8, 4, 12)
    k = torch.randn(2, 5, 1, 8, generator=torch.Generator().manual_seed(0))
    cache.prefill(k, k, lengths=[5, 3])
    assert C.plan_length(cache) == 5
    monkeypatch.setattr(MobaKVCache, "_capturing", lambda self: True)
    cache.append(k[:, :1], k[:, :1])
    assert C.plan_length(cache) == 12
    monkeypatch.setattr(MobaKVCache, "_capturing", lambda self: False)
    cache._len_dev += 2  # what two replays of the captured append do
    assert cache.lengths.tolist() == [8, 6] and "lengths=[8, 6]" in repr(cache)
    assert C.plan_length(cache) == 8 and cache.centroids().shape[1] == 2
    with pytest.raises(ValueError, match=r"appending 5 token\(s\) to lengths \[8, 6\] exceeds max_seqlen=12; "
                                         r"the cache has room for 4"):
        cache.append(k, k)


def test_a_paged_append_is_not_captured(monkeypatch):
    cache = MobaKVCache(1, 1, 8, 4, 16, page_size=4)
    k = torch.randn(1, 3, 1, 8, generator=torch.Generator().manual_seed(1))
    cache.prefill(k, k)
    monkeypatch.setattr(MobaKVCache, "_capturing", lambda self: True)
    with pytest.raises(ValueError, match=r"a paged cache \(page_size=4\) takes its pages on the host"):
        cache.append(k[:, :1], k[:, :1])
    assert cache.lengths.tolist() == [3] and cache.free_pages == 3


# ---------------------------------------------------------------------------------------------------
# paged layout


def _twin_caches(seed, dtype, batch, kv_heads, dim, block, page_size, max_seqlen, num_pages=None):
    """A contiguous cache and a paged one of the same shape, and a token stream to fill them with."""
    q, k, v = _stream(seed, batch, max_seqlen, 2 * kv_heads, kv_heads, dim, dtype)
    flat = MobaKVCache(batch, kv_heads, dim, block, max_seqlen, dtype=dtype)
    paged = MobaKVCache(batch, kv_heads, dim, block, max_seqlen, dtype=dtype, page_size=page_size,
                        num_pages=num_pages)
    return q, k, v, flat, paged


@pytest.mark.parametrize(("dtype", "block", "page_size", "lengths"), [
    pytest.param(torch.float32, 4, 4, [9, 2, 14], id="fp32-one-block-pages"),
    pytest.param(torch.bfloat16, 4, 12, [13, 1, 30], id="bf16-three-block-pages"),
    pytest.param(torch.float16, 8, 64, [5, 40, 17], id="fp16-page-longer-than-a-prompt"),
])
def test_paged_cache_decodes_exactly_as_a_contiguous_one(dtype, block, page_size, lengths):
    """Token by token from a ragged prompt, with the pages shuffled over the pool between steps: the paged
    cache's outputs, LSEs and block sums equal the contiguous cache's bit for bit, and moba_attention's within
    the usual rounding."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from _decode_cases import shuffle_pages

    batch, steps = len(lengths), 11
    total = max(lengths) + steps
    q, k, v, flat, paged = _twin_caches(len(lengths) + page_size, dtype, batch, 2, 8, block, page_size, total)
    gen = torch.Generator().manual_seed(page_size)
    for cache in (flat, paged):
        cache.prefill(k, v, lengths=lengths)
    rows = torch.arange(batch)
    for step in range(steps):
        pos = torch.tensor(lengths) + step
        for cache in (flat, paged):
            cache.append(k[rows, pos].unsqueeze(1), v[rows, pos].unsqueeze(1))
        if step % 3 == 0:
            shuffle_pages(paged, gen)
        qt = q[rows, pos].unsqueeze(1)
        out, lse = moba_decode(qt, paged, 3, return_lse=True)
        ref_out, ref_lse = moba_decode(qt, flat, 3, return_lse=True)
        assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse), step
        assert torch.equal(paged.block_sums, flat.block_sums)
        for b in range(batch):
            full_out, _, _ = _full_reference(q, k, v, b, int(pos[b]) + 1, block, 3)
            torch.testing.assert_close(out[b].float(), full_out.float(), atol=TOL[dtype], rtol=TOL[dtype])
    held = [math.ceil(n / page_size) for n in paged.lengths.tolist()]
    table = paged.page_table
    assert [(row >= 0).sum().item() for row in table] == held  # pages taken as the sequences grew, no more
    used = table[table >= 0]
    assert used.unique().numel() == used.numel() == paged.num_pages - paged.free_pages


def test_paged_pool_smaller_than_batch_times_max_seqlen():
    """A ragged batch in a pool sized for its tokens: pages come lowest-numbered first, in sequence order at a
    prefill and as sequences cross a page boundary at an append; a request beyond the pool fails before anything
    changes."""
    q, k, v, _, cache = _twin_caches(3, torch.float32, 3, 1, 8, 4, 8, 64, num_pages=6)
    assert cache.k.shape == (6, 1, 8, 8) and cache.pages_per_seq == 8 and cache.free_pages == 6
    cache.prefill(k[:, :20], v[:, :20], lengths=[20, 3, 8])  # 3 + 1 + 1 pages
    assert cache.page_table[:, :3].tolist() == [[0, 1, 2], [3, -1, -1], [4, -1, -1]]
    cache.append(k[:, 20:21], v[:, 20:21])  # 21, 4, 9 tokens: only the third sequence crosses into a page
    assert cache.page_table[:, :3].tolist() == [[0, 1, 2], [3, -1, -1], [4, 5, -1]] and cache.free_pages == 0
    before = (cache.k.clone(), cache.block_sums.clone(), cache.page_table, cache.lengths)
    with pytest.raises(ValueError, match=r"needs 1 new page\(s\) of 8 tokens; 0 of num_pages=6 are free"):
        cache.append(k[:, 21:25], v[:, 21:25])  # the second sequence would cross 8
    with pytest.raises(ValueError, match=r"lengths \[30, 20, 9\] take 9 pages of 8 tokens; the pool has "
                                         r"num_pages=6"):
        cache.prefill(k[:, :30], v[:, :30], lengths=[30, 20, 9])
    after = (cache.k, cache.block_sums, cache.page_table, cache.lengths)
    assert all(torch.equal(x, y) for x, y in zip(before, after, strict=True))
    # the tokens are where the table says
    keys, _ = cache.token_rows(2, torch.tensor([0]), torch.arange(9))
    assert torch.equal(keys, torch.cat([k[2, :8, 0], k[2, 20:21, 0]]))  # the prompt's 8, then the appended one
    assert torch.equal(cache.k[5, 0, 0], k[2, 20, 0])  # token 8 of sequence 2: page 5, offset 0
    assert "page_size=8, num_pages=6, free_pages=0" in repr(cache)


def test_paged_cache_arguments_are_checked():
    with pytest.raises(ValueError, match="page_size must be a multiple of block_size=4 .* got page_size=6"):
        MobaKVCache(1, 1, 8, 4, 16, page_size=6)
    with pytest.raises(ValueError, match="page_size must be an integer >= 1, got 0"):
        MobaKVCache(1, 1, 8, 4, 16, page_size=0)
    with pytest.raises(ValueError, match="num_pages=3 needs a page_size"):
        MobaKVCache(1, 1, 8, 4, 16, num_pages=3)
    with pytest.raises(ValueError, match="num_pages must be an integer >= 1"):
        MobaKVCache(1, 1, 8, 4, 16, page_size=4, num_pages=0)
    flat = MobaKVCache(1, 1, 8, 4, 16)
    assert not flat.paged
    with pytest.raises(ValueError, match="page_table: this cache is not paged"):
        flat.page_table  # noqa: B018
    paged = MobaKVCache(2, 1, 8, 4, 16, page_size=8)
    assert paged.paged and paged.num_pages == 4 and paged.page_table.tolist() == [[-1, -1], [-1, -1]]
    with pytest.raises(ValueError, match="perm must be a permutation of the 4 pages"):
        paged._move_pages([0, 0, 1, 2])
    q, k, v = _stream(1, 2, 6, 2, 1, 8, torch.float32)
    paged.prefill(k, v)
    with pytest.raises(ValueError, match="fused decode kernel .* reads contiguous caches only; this cache is paged"):
        C.step_launches(q[:, -1:].contiguous(), paged, 2, 0.35)


# ---------------------------------------------------------------------------------------------------
# errors


@pytest.fixture
def filled():
    q, k, v = _stream(0, 2, 12, 4, 2, 8, torch.float32)
    cache = MobaKVCache(2, 2, 8, 4, 12)
    cache.prefill(k[:, :10], v[:, :10])
    cache.append(k[:, 10:11], v[:, 10:11])
    return q[:, 10:11], cache


@pytest.mark.parametrize(("make", "match"), [
    (lambda q, c: (torch.zeros(2, 17, 4, 8), c), r"q_len = 17 is not supported; supported: 1\.\.16"),
    (lambda q, c: (torch.zeros(2, 2, 4, 8), c), r"q_len = 2 but the last prefill/append added only 1"),
    (lambda q, c: (q.double(), c), r"q has dtype torch.float64; the cache holds torch.float32"),
    (lambda q, c: (q.to("meta"), c), r"q is on meta"),
    (lambda q, c: (torch.zeros(2, 1, 3, 8), c), r"3 heads; it must be a positive multiple of the cache's kv_heads"),
    (lambda q, c: (torch.zeros(2, 1, 4, 16), c), r"head_dim 16; the cache has head_dim 8"),
    (lambda q, c: (torch.zeros(3, 1, 4, 8), c), r"batch 3; the cache has batch 2"),
    (lambda q, c: (torch.zeros(2, 4, 8), c), r"q must be 4-D"),
])
def test_bad_queries_are_named(filled, make, match):
    q, cache = make(*filled)
    with pytest.raises(ValueError, match=match):
        moba_decode(q, cache, 2)


def test_bad_arguments_are_named(filled):
    q, cache = filled
    with pytest.raises(ValueError, match="top_k must be an integer >= 1, got 0"):
        moba_decode(q, cache, 0)
    with pytest.raises(ValueError, match="softmax_scale must be a finite real number"):
        moba_decode(q, cache, 2, softmax_scale=float("inf"))
    with pytest.raises(ValueError, match="return_lse must be True or False"):
        moba_decode(q, cache, 2, return_lse=1)
    with pytest.raises(ValueError, match=r"centroid_precision must be one of \('fp32', 'input'\), got 'bf16'"):
        moba_decode(q, cache, 2, centroid_precision="bf16")
    with pytest.raises(ValueError, match="centroid_precision must be one of"):
        moba_decode_reference(q, cache, 2, centroid_precision=None)
    with pytest.raises(TypeError, match="cache must be a MobaKVCache, got dict"):
        moba_decode(q, {}, 2)
    with pytest.raises(TypeError, match="q must be a torch.Tensor, got list"):
        moba_decode([1.0], cache, 2)


def test_cache_errors_are_named(filled):
    _, cache = filled
    kv = torch.zeros(2, 1, 2, 8)
    with pytest.raises(ValueError, match="exceeds max_seqlen=12; the cache has room for 1 more token"):
        cache.append(torch.zeros(2, 2, 2, 8), torch.zeros(2, 2, 2, 8))
    with pytest.raises(ValueError, match="k has dtype torch.bfloat16; this cache holds torch.float32"):
        cache.append(kv.bfloat16(), kv.bfloat16())
    with pytest.raises(ValueError, match="k is on meta; this cache is on cpu"):
        cache.append(kv.to("meta"), kv.to("meta"))
    with pytest.raises(ValueError, match=r"k has shape \(2, 1, 3, 8\); this cache takes \(batch=2, seqlen >= 1, "
                                         r"kv_heads=2, head_dim=8\)"):
        cache.append(torch.zeros(2, 1, 3, 8), torch.zeros(2, 1, 3, 8))
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        cache.append(kv, torch.zeros(2, 2, 2, 8))
    with pytest.raises(ValueError, match=r"the prompt has 13 tokens; this cache holds at most max_seqlen=12"):
        cache.prefill(torch.zeros(2, 13, 2, 8), torch.zeros(2, 13, 2, 8))
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 5\]"):
        cache.prefill(torch.zeros(2, 5, 2, 8), torch.zeros(2, 5, 2, 8), lengths=[0, 5])
    with pytest.raises(ValueError, match="lengths has 3 entries; the cache has batch 2"):
        cache.prefill(torch.zeros(2, 5, 2, 8), torch.zeros(2, 5, 2, 8), lengths=[1, 2, 3])
    with pytest.raises(ValueError, match="lengths must hold integers"):
        cache.prefill(torch.zeros(2, 5, 2, 8), torch.zeros(2, 5, 2, 8), lengths=[1.5, 2])
    with pytest.raises(ValueError, match="dtype torch.int8 is not supported"):
        MobaKVCache(1, 1, 8, 4, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="block_size must be an integer >= 1, got 0"):
        MobaKVCache(1, 1, 8, 0, 8)
    assert cache.lengths.tolist() == [11, 11]  # failed calls change nothing


def test_kernel_limits_name_what_the_gpu_supports():
    def check(dtype=torch.bfloat16, dim=64, block=64, heads=4, q_len=1, top_k=8):
        cache = MobaKVCache(1, 1, dim, block, 64, dtype=dtype)
        cache.prefill(torch.zeros(1, 16, 1, dim, dtype=dtype), torch.zeros(1, 16, 1, dim, dtype=dtype))
        D.check_decode(torch.zeros(1, q_len, heads, dim, dtype=dtype), cache, top_k, kernel_limits=True)

    check()
    with pytest.raises(ValueError, match="dtype torch.float32 on cpu: the CUDA kernels support bfloat16, float16"):
        check(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"head_dim 96: the CUDA kernels support \(64, 128\)"):
        check(dim=96)
    with pytest.raises(ValueError, match=r"block_size 48: the CUDA kernels support \(16, 32, 64, 128, 256, 512\)"):
        check(block=48)
    with pytest.raises(ValueError, match=r"top_k = 33: the CUDA kernels support 1\.\.32"):
        check(top_k=33)
    with pytest.raises(ValueError, match=r"= 528 query rows per kv head: the CUDA kernels support up to 512"):
        check(heads=33, q_len=16)


# ---------------------------------------------------------------------------------------------------
# CUDA launch plans (pure Python)


@pytest.mark.parametrize(("batch", "q_len", "heads", "kv_heads", "dim", "block", "top_k", "length"), [
    (8, 1, 32, 8, 128, 128, 8, 512 * 1024), (8, 1, 32, 8, 128, 64, 4, 128 * 1024), (8, 1, 32, 8, 128, 32, 16, 1 << 20),
    (1, 1, 32, 8, 128, 32, 16, 1 << 20), (64, 1, 32, 8, 128, 128, 8, 32 * 1024), (2, 16, 32, 8, 64, 16, 32, 100_000),
    (1, 16, 32, 1, 128, 512, 2, 700), (3, 2, 4, 4, 64, 16, 1, 5), (1, 16, 32, 1, 128, 16, 32, 1 << 20),
])
@pytest.mark.parametrize("items_per_slot", [1, 2, 3])
def test_plans_fit_the_kernel(batch, q_len, heads, kv_heads, dim, block, top_k, length, items_per_slot):
    n_blocks = math.ceil((length + 10) / block)
    plan = C.plan_decode(batch, q_len, heads, kv_heads, dim, block, top_k, length, n_blocks, n_blocks * block,
                         items_per_slot=items_per_slot)
    rows = heads // kv_heads * q_len
    assert plan.rows == rows and plan.n_rg * plan.rows_per_group >= rows and plan.rows_per_group <= C.ROUTE_MAX_ROWS
    n_cand = (length - 1) // block
    assert plan.n_split * plan.blocks_per_split >= n_cand
    assert (plan.n_split - 1) * plan.blocks_per_split < max(n_cand, 1)  # no empty split
    assert plan.n_split == 1 or plan.blocks_per_split % C.route_tile(dim) == 0  # whole stages
    assert plan.n_split <= C.ROUTE_MAX_SPLIT and plan.n_split * max(plan.lcap, 0) <= C.ROUTE_MERGE_ENTRIES
    assert plan.lcap > 0 or plan.n_split == 1
    assert plan.chunk * plan.n_chunks == block and plan.chunk <= C.ATTN_CHUNK
    # an attention unit's share of the largest possible union spans at most nb_max blocks, and its lists fit
    items = min(rows * top_k, n_cand + 1) * plan.n_chunks
    per_unit = math.ceil(items / plan.n_x)
    assert math.ceil(per_unit / plan.n_chunks) + 1 <= plan.nb_max and plan.nb_max * (8 + 4 * rows) <= C.ROWLIST_BYTES
    assert plan.smem == max(C.route_smem_bytes(dim, plan.rows_per_group, top_k),
                            C.attn_smem_bytes(dim, rows, plan.nb_max)) <= C.max_smem_bytes() <= C.SMEM_MAX
    assert 1 <= plan.ctas <= C.CTAS_PER_SM * 132 and plan.ctas <= plan.n_route_items + plan.n_attn_units
    # the merge staging and the union bitmap fit in the stages they reuse
    assert 8 * plan.n_split * max(plan.lcap, 1) * 8 <= C.ROUTE_STAGES * C.ROUTE_STAGE_BYTES
    assert (plan.win_words + rows * top_k) * 4 <= C.ATTN_STAGE_BYTES  # union bitmap and selection copy
    # the launch's arguments have exactly the kernel's C types
    q = torch.zeros(batch, q_len, heads, dim, dtype=torch.bfloat16)
    bufs = {name: torch.zeros(1) for name in ("sel", "part_v", "part_j", "part_o", "part_ml", "out", "lse")}
    for route_only in (False, True):
        launch = C.decode_launch(plan, q, q, q, torch.zeros(1), torch.zeros(1, dtype=torch.int32), bufs,
                                 torch.zeros(1), 0.1, route_only)
        check_args(launch.source, launch.kernel, launch.args)
        assert launch.block == (C.THREADS, 1, 1) and launch.grid[1:] == (1, 1) and launch.shared_mem == plan.smem
        assert launch.args[25] == (0 if route_only else plan.n_x)  # n_x: no attention units when routing only


def test_target_plans_keep_every_sm_busy():
    """The benchmark's batch-8 configurations: two CTAs per SM, two waves of routing items (splits of whole
    stages; at 32K the 255 candidates are fewer than two splits of four stages: one split per kv head) and
    about two attention units per CTA slot."""
    for length, block, top_k, splits in ((512 * 1024, 128, 8, 8), (32 * 1024, 128, 8, 1), (128 * 1024, 64, 4, 8),
                                         (1 << 20, 128, 8, 8)):
        n_blocks = length // block
        plan = C.plan_decode(8, 1, 32, 8, 128, block, top_k, length, n_blocks, length)
        assert plan.ctas == 264 and plan.smem <= C.SMEM_PER_SM // 2 - C.SMEM_RESERVED_PER_CTA
        assert plan.n_split == splits and plan.n_route_items == 64 * splits and plan.n_attn_units == 512
        assert plan.blocks_per_split >= C.ROUTE_MIN_TILES * C.route_tile(128) or plan.n_split == 1
        assert plan.blocks_per_split % C.route_tile(128) == 0 and plan.nb_max * (8 + 16) <= C.ROWLIST_BYTES


def test_step_buffers_have_the_planned_sizes():
    q, k, v = _stream(0, 2, 70, 8, 2, 64, torch.bfloat16)
    cache = MobaKVCache(2, 2, 64, 16, 80, dtype=torch.bfloat16)
    cache.prefill(k, v, lengths=[70, 40])
    plan, bufs, launches = C.step_launches(q[:, :1], cache, 4, 0.125)
    assert len(launches) == 1
    assert bufs["sel"].shape == (2, 1, 8, 4) and bufs["out"].dtype == torch.bfloat16
    assert bufs["part_o"].numel() == 2 * 2 * plan.rows * 4 * plan.n_chunks * 64
    assert launches[0].args[10].numel() == plan.n_counters == 2 + 2 * 2 * (plan.n_rg + 2)
    assert not cache._counters.any()
    assert launches[0].args[-1] == np.float32(0.125 * math.log2(math.e))


# ---------------------------------------------------------------------------------------------------
# cost model


def test_decode_bytes_model():
    c = decode_bytes(1 << 19, 128, 8, batch=8, heads=32, kv_heads=8, head_dim=128, overlap="shared")
    assert c["centroid_bytes"] == 8 * 8 * 4095 * 128 * 4
    assert c["kv_bytes"] == 2 * 8 * 8 * (128 + 7 * 128) * 128 * 2  # own block is full at N = 512K
    assert c["dense_bytes"] == 2 * 8 * 8 * (1 << 19) * 128 * 2 + c["q_out_bytes"]
    ind = decode_bytes(1 << 19, 128, 8, batch=8)
    assert ind["unique_blocks"] > 27 and ind["total_bytes"] > c["total_bytes"]
    # more rows than one routing pass takes: the sums are read once per 64 rows
    assert decode_bytes(4096, 16, 4, heads=64, kv_heads=1, q_len=2)["centroid_bytes"] == 2 * 255 * 128 * 4
    assert expected_unique_blocks(3, 8, 4) == 3 and expected_unique_blocks(0, 8, 4) == 0
    assert expected_unique_blocks(100, 11, 1) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="overlap must be one of"):
        decode_bytes(100, 16, 4, overlap="random")
    with pytest.raises(ValueError, match=r"heads \(6\) must be a multiple of kv_heads \(4\)"):
        decode_bytes(100, 16, 4, heads=6, kv_heads=4)


def test_decode_flops_counts_the_attended_tokens():
    f = decode_flops(100, 16, 3, batch=1, heads=1, kv_heads=1, head_dim=1, q_len=2)
    # t = 98, 99: own block 6 (tokens 96..t), 2 past blocks of 16; routing scores 6 past blocks each
    assert f["attention_flops"] == 4 * ((3 + 32) + (4 + 32))
    assert f["routing_flops"] == 2 * (6 + 6)
    assert f["dense_flops"] == 4 * (99 + 100)
