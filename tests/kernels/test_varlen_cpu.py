"""Packed variable-length MoBA on CPU: each sequence equals ``moba_attention`` of that sequence alone.

Fresh random inputs per test; awkward lengths (not a multiple of B, shorter than B, k >= n, empty); outputs,
LSE, routing and gradients against the per-sequence reference; GQA; causal and non-causal; the errors a bad
``cu_seqlens`` gets; the op under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import math

import pytest
import torch

from mobalab.kernels import moba_attention, moba_attention_varlen, moba_topk, moba_topk_varlen

# B = 4: 13 is not a multiple, 3 is shorter than B, 0 is empty, 9 with top_k 3 has k >= n = 3
LENGTHS = (13, 3, 0, 9, 22)
# runs of one length, attended as batches: two 9s, three 8s with an empty sequence among them
RUNS = (13, 3, 0, 9, 9, 22, 8, 8, 0, 8)
# one run holds every row (empty sequences aside): its batched outputs are the packed ones, with no copy
ONE_RUN = (0, 9, 9, 0, 9)


def _packed(lengths, heads=4, kv_heads=2, dim=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(total, heads, dim, generator=g, dtype=dtype)
    k = torch.randn(total, kv_heads, dim, generator=g, dtype=dtype)
    v = torch.randn(total, kv_heads, dim, generator=g, dtype=dtype)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu


def _pieces(cu):
    c = cu.tolist()
    return [(s, e) for s, e in zip(c[:-1], c[1:], strict=True)]


@pytest.mark.parametrize("lengths", [LENGTHS, RUNS, ONE_RUN])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_outputs_and_lse_equal_each_sequence_alone(causal, heads, kv_heads, lengths, varlen_entry,
                                                   varlen_grouping):
    q, k, v, cu = _packed(lengths, heads, kv_heads, seed=heads * 10 + kv_heads + causal)
    out, lse = moba_attention_varlen(q, k, v, cu, max(lengths), 4, 3, causal=causal, softmax_scale=0.4,
                                     return_lse=True)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == q.shape[:2]
    for s, e in _pieces(cu):
        if e == s:
            continue
        o, lo = moba_attention(q[s:e][None], k[s:e][None], v[s:e][None], 4, 3, causal=causal, softmax_scale=0.4,
                               return_lse=True)
        torch.testing.assert_close(out[s:e], o[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(lse[s:e], lo[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("lengths", [LENGTHS, RUNS, ONE_RUN])
@pytest.mark.parametrize("causal", [True, False])
def test_routing_is_local_to_each_sequence(causal, lengths, varlen_grouping):
    q, k, _, cu = _packed(lengths, seed=3 + causal)
    sel = moba_topk_varlen(q, k, cu, max(lengths), 4, 3, causal=causal)
    assert sel.dtype == torch.int32 and sel.shape == (q.shape[0], q.shape[1], 3)
    for s, e in _pieces(cu):
        if e > s:
            want = moba_topk(q[s:e][None], k[s:e][None], 4, 3, causal=causal)[0]
            assert torch.equal(sel[s:e], want)
            assert int(sel[s:e].max()) < -(-(e - s) // 4)  # local block indices


def test_routing_differs_from_packing_into_one_sequence():
    # the packed sequences must not see each other: one long sequence routes to other sequences' blocks
    q, k, _, cu = _packed((16, 16), heads=2, kv_heads=2, seed=5)
    sel = moba_topk_varlen(q, k, cu, 16, 4, 2, causal=True)
    joint = moba_topk(q[None], k[None], 4, 2, causal=True)[0]
    assert not torch.equal(sel[16:], joint[16:])
    assert int(sel[16:].max()) <= 3


@pytest.mark.parametrize("lengths", [LENGTHS, RUNS, ONE_RUN])
@pytest.mark.parametrize("causal", [True, False])
def test_gradients_equal_each_sequence_alone(causal, lengths, varlen_entry, varlen_grouping):
    q, k, v, cu = _packed(lengths, 4, 2, seed=7 + causal)
    g = torch.Generator().manual_seed(11)
    w = torch.randn(q.shape, generator=g, dtype=q.dtype)
    w_lse = torch.randn(q.shape[:2], generator=g, dtype=q.dtype)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = moba_attention_varlen(*leaves, cu, max(lengths), 4, 3, causal=causal, return_lse=True)
    got = torch.autograd.grad((out * w).sum() + (lse * w_lse).sum(), leaves)
    want = [torch.zeros_like(x) for x in (q, k, v)]
    for s, e in _pieces(cu):
        if e == s:
            continue
        one = [x[s:e][None].clone().requires_grad_() for x in (q, k, v)]
        o, lo = moba_attention(*one, 4, 3, causal=causal, return_lse=True)
        grads = torch.autograd.grad((o[0] * w[s:e]).sum() + (lo[0] * w_lse[s:e]).sum(), one)
        for acc, gr in zip(want, grads, strict=True):
            acc[s:e] = gr[0]
    for name, a, b in zip("qkv", got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"d{name}")


def test_gradient_of_the_lse_alone(varlen_entry):
    # the output unused: its gradient arrives as None (not materialised) and counts as zero
    q, k, v, cu = _packed(RUNS, seed=41)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    _, lse = moba_attention_varlen(*leaves, cu, 22, 4, 3, return_lse=True)
    got = torch.autograd.grad(lse.sum(), leaves, allow_unused=True)
    one = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = moba_attention_varlen(*one, cu, 22, 4, 3, return_lse=True)
    want = torch.autograd.grad(lse.sum() + 0 * out.sum(), one)
    for name, a, b in zip("qkv", got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"d{name}")


def test_runs_of_one_length():
    from mobalab.kernels._varlen import _runs

    bounds = list(zip([0, 13, 16, 16, 25, 34, 56, 64, 72, 72], [13, 16, 16, 25, 34, 56, 64, 72, 72, 80], strict=True))
    assert _runs(bounds) == [(0, 13, 1), (13, 16, 1), (16, 34, 2), (34, 56, 1), (56, 80, 3)]
    assert _runs([(0, 0), (0, 0)]) == []
    assert _runs([(0, 4), (4, 8), (8, 10), (10, 12)]) == [(0, 8, 2), (8, 12, 2)]
    # at most max_batch sequences a run (the CUDA kernels' largest batch)
    assert _runs([(i, i + 1) for i in range(5)], max_batch=2) == [(0, 2, 2), (2, 4, 2), (4, 5, 1)]


def _spans(lengths):
    c = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    return list(zip(c[:-1], c[1:], strict=True))


def test_groups_pad_short_causal_sequences_into_one_batch():
    from mobalab.kernels._varlen import RUN_COST, _groups

    # heads x head_dim 1024: a run's cost is 4096 token units, copying a token 0.35 of one
    groups = _groups(_spans((1000, 70, 0, 129, 2048, 31, 300)), True, 8, 128)
    assert len(groups) == 1 and groups[0].m == 6 and groups[0].length == 2048
    assert groups[0].spans == ((0, 1000), (1000, 1070), (1070, 1199), (1199, 3247), (3247, 3278), (3278, 3578))
    # 4000 is too long to pad 129s to (3871 padded rows each); the three short ones share a batch
    groups = _groups(_spans((4000, 127, 128, 129)), True, 8, 128)
    assert [(g.start, g.end, g.m, g.length, g.spans) for g in groups] == [
        (0, 4000, 1, 4000, ()), (-1, -1, 3, 129, ((4000, 4127), (4127, 4255), (4255, 4384)))]
    # equal-length neighbours stay a view; long sequences (copies above a call's cost) stay calls of their own
    groups = _groups(_spans((600, 600, 0, 600, 2048, 2048)), True, 8, 128)
    assert [(g.start, g.end, g.m, g.length, g.spans) for g in groups] == [(0, 1800, 3, 600, ()),
                                                                           (1800, 5896, 2, 2048, ())]
    assert all(not g.spans for g in _groups(_spans((16000, 16128, 16256)), True, 16, 128))
    # more heads: a token's copies cost more, so less is padded
    assert len(_groups(_spans((1000, 900, 800)), True, 8, 128)) == 1
    assert len(_groups(_spans((1000, 900, 800)), True, 64, 128)) == 3
    assert RUN_COST > 0
    # the padded length rounded up to a multiple of the block (the CUDA passes attend the batch as one sequence)
    groups = _groups(_spans((100, 90, 70)), True, 8, 128, block_size=64)
    assert len(groups) == 1 and groups[0].length == 128


def test_groups_keep_runs_when_not_causal_or_switched_off(monkeypatch):
    from mobalab.kernels import _varlen

    spans = _spans((13, 3, 0, 9, 9, 22))
    want = [(s, e, m) for s, e, m in _varlen._runs(spans)]
    assert [(g.start, g.end, g.m) for g in _varlen._groups(spans, False, 4, 8)] == want
    assert any(g.spans for g in _varlen._groups(spans, True, 4, 8))
    monkeypatch.setattr(_varlen, "RUN_COST", 0)
    assert [(g.start, g.end, g.m) for g in _varlen._groups(spans, True, 4, 8)] == want
    # at most max_batch sequences a batch
    monkeypatch.setattr(_varlen, "RUN_COST", 1 << 62)
    groups = _varlen._groups(_spans((5, 4, 3, 2, 1)), True, 1, 1, max_batch=2)
    assert [g.m for g in groups] == [2, 2, 1] and sum(len(g.spans) or g.m for g in groups) == 5


def test_gradcheck(varlen_entry, varlen_grouping):
    q, k, v, cu = _packed((5, 0, 5, 7), heads=2, kv_heads=1, dim=4, seed=13)
    leaves = tuple(x.requires_grad_() for x in (q, k, v))
    fn = lambda q, k, v: moba_attention_varlen(q, k, v, cu, 7, 3, 2, return_lse=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-6)


def test_low_precision_dtypes_and_no_sequences(varlen_entry):
    q, k, v, cu = _packed((6, 10), dtype=torch.bfloat16, seed=17)
    out = moba_attention_varlen(q, k, v, cu, 10, 4, 2)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out[6:], moba_attention(q[6:][None], k[6:][None], v[6:][None], 4, 2)[0])
    empty = [x[:0].clone().requires_grad_() for x in (q, k, v)]
    out = moba_attention_varlen(*empty, torch.zeros(3, dtype=torch.int32), 0, 4, 2)  # two empty sequences
    assert out.shape == (0, *q.shape[1:])
    grads = torch.autograd.grad(out.sum(), empty)
    assert [g.shape for g in grads] == [x.shape for x in empty]


def test_input_centroid_precision_per_sequence(varlen_entry):
    """centroid_precision "input" reaches every sequence's routing: the outputs and routing of each sequence alone
    in that precision (bf16 keys near 1, whose block means mostly round to equal values: not the "fp32" routing)."""
    q, k, v, cu = _packed(LENGTHS, seed=23)
    q, k, v = q.to(torch.bfloat16), (1 + 2.0**-9 * k).to(torch.bfloat16), v.to(torch.bfloat16)
    out = moba_attention_varlen(q, k, v, cu, max(LENGTHS), 4, 3, centroid_precision="input")
    sel = moba_topk_varlen(q, k, cu, max(LENGTHS), 4, 3, centroid_precision="input")
    assert not torch.equal(sel, moba_topk_varlen(q, k, cu, max(LENGTHS), 4, 3))
    for s, e in _pieces(cu):
        if e == s:
            continue
        one = (q[s:e][None], k[s:e][None], v[s:e][None])
        assert torch.equal(out[s:e], moba_attention(*one, 4, 3, centroid_precision="input")[0])
        assert torch.equal(sel[s:e], moba_topk(*one[:2], 4, 3, centroid_precision="input")[0])
    with pytest.raises(ValueError, match="moba_attention_varlen: centroid_precision must be one of"):
        moba_attention_varlen(q, k, v, cu, max(LENGTHS), 4, 3, centroid_precision="half")


def _masked_softmax_moba(q, k, v, block_size, top_k, causal, scale):
    """One sequence (N, heads, d), float64, as a dense masked softmax: each query's selected token set built from
    the contract's rules in plain Python (block means, scores ranked by (score, index) descending), then one
    N x N softmax per head (differentiable w.r.t. q, k, v; the mask is not)."""
    n_tokens, heads, _ = q.shape
    group = heads // k.shape[1]
    n_blocks = -(-n_tokens // block_size)
    with torch.no_grad():
        means = torch.stack([k[j * block_size:(j + 1) * block_size].mean(0) for j in range(n_blocks)])
        mask = torch.zeros(heads, n_tokens, n_tokens, dtype=torch.bool)
        for h in range(heads):
            scores = (q[:, h] @ means[:, h // group].T).tolist()
            for t in range(n_tokens):
                own = t // block_size
                rank = sorted(range(own) if causal else range(n_blocks), key=lambda j: (-scores[t][j], -j))
                for j in [own] + rank[:top_k - 1] if causal else rank[:top_k]:
                    mask[h, t, j * block_size:min((j + 1) * block_size, t + 1 if causal else n_tokens)] = True
    logits = torch.einsum("thd,shd->hts", q, k.repeat_interleave(group, 1)) * scale
    lse = logits.masked_fill(~mask, -math.inf).logsumexp(-1)
    p = (logits - lse.unsqueeze(-1)).exp() * mask
    return torch.einsum("hts,shd->thd", p, v.repeat_interleave(group, 1)), lse.T


@pytest.mark.parametrize("causal", [True, False])
def test_outputs_lse_and_gradients_against_a_masked_softmax(causal, varlen_entry, varlen_grouping):
    """Not against moba_attention (which the varlen entry runs): a dense masked softmax per sequence. Lengths 1,
    shorter than B, not a multiple of B, k >= n, empty ones; GQA; a negative scale; gradients of out and lse."""
    lengths = (1, 0, 3, 13, 0, 7, 7, 22)
    q, k, v, cu = _packed(lengths, heads=4, kv_heads=2, seed=41)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = moba_attention_varlen(*leaves, cu, 22, 4, 3, causal=causal, softmax_scale=-0.6, return_lse=True)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), leaves)
    for s, e in _pieces(cu):
        if e == s:
            continue
        one = [x[s:e].clone().requires_grad_() for x in (q, k, v)]
        o, lo = _masked_softmax_moba(*one, 4, 3, causal, -0.6)
        want = torch.autograd.grad((o * dout[s:e]).sum() + (lo * dlse[s:e]).sum(), one, allow_unused=True)
        torch.testing.assert_close(out[s:e], o, rtol=0, atol=1e-12)
        torch.testing.assert_close(lse[s:e], lo, rtol=0, atol=1e-12)
        for got, ref in zip(grads, want, strict=True):
            torch.testing.assert_close(got[s:e], torch.zeros_like(got[s:e]) if ref is None else ref, rtol=0,
                                       atol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
def test_exact_ties_route_as_the_sequence_alone(causal, varlen_grouping):
    """Blocks that repeat one block's keys have equal means: ties, which go to the higher block in every batch the
    call forms (a zero-padded batch scores more blocks per query than the sequence alone; a matrix product need
    not round equal columns alike, so a tie once went by the column's place)."""
    lengths = (13, 3, 0, 9, 9, 22, 1, 4)
    q, _, v, cu = _packed(lengths, seed=43)
    k = torch.randn(4, 2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(44)).repeat(6, 1, 1)
    k = torch.cat([k[:e - s] for s, e in _pieces(cu)])  # each sequence: the 4 keys again in every block
    sel = moba_topk_varlen(q, k, cu, 22, 4, 3, causal=causal)
    out = moba_attention_varlen(q, k, v, cu, 22, 4, 3, causal=causal)
    for s, e in _pieces(cu):
        if e == s:
            continue
        n_blocks, own = -(-(e - s) // 4), torch.arange(e - s) // 4
        if causal:  # the own block, then the past ones from the latest
            want = torch.stack([own - i for i in range(3)], -1).clamp(min=-1)
        else:  # the highest blocks (where every block is whole: a partial block's mean differs)
            want = (n_blocks - 1 - torch.arange(3)).clamp(min=-1).expand(e - s, 3)
        if causal or (e - s) % 4 == 0:
            assert torch.equal(sel[s:e].long(), want.view(e - s, 1, 3).expand(e - s, 4, 3)), (s, e)
        one = (q[s:e][None], k[s:e][None], v[s:e][None])
        assert torch.equal(sel[s:e], moba_topk(*one[:2], 4, 3, causal=causal)[0])
        torch.testing.assert_close(out[s:e], moba_attention(*one, 4, 3, causal=causal)[0], rtol=0, atol=1e-12)


def test_opcheck_of_the_ops():
    # schema, fake implementation, autograd registration (compilation: test_torch_compile_fullgraph_cpu);
    # through torch.ops, the live registration
    q, k, v, cu = _packed((5, 9), seed=19)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.mobalab.moba_topk_varlen.default, (q, k, cu, 9, 4, 2, True), test_utils=utils)
    torch.library.opcheck(torch.ops.mobalab.moba_attention_varlen_fwd.default,
                          (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), cu, 9, 4, 2, True, 0.3, False),
                          test_utils=utils)
    torch.library.opcheck(torch.ops.mobalab.moba_topk_varlen.default, (q, k, cu, 9, 4, 2, True, "input"),
                          test_utils=utils)
    torch.library.opcheck(torch.ops.mobalab.moba_attention_varlen_fwd.default,
                          (q, k, v, cu, 9, 4, 2, True, 0.3, False, "input"), test_utils=utils)


def test_torch_compile_fullgraph_cpu(varlen_grouping):
    q, k, v, cu = _packed(LENGTHS, seed=29)

    def f(q, k, v, cu):
        return torch.tanh(moba_attention_varlen(q, k, v, cu, 30, 4, 3, causal=True)).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break would raise
    a = [x.clone().requires_grad_() for x in (q, k, v)]
    b = [x.clone().requires_grad_() for x in (q, k, v)]
    loss = compiled(*a, cu)
    loss.backward()
    want = f(*b, cu)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=0, atol=1e-12)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-10, atol=1e-12)
    # other lengths, same shapes: the compiled graph reads the new cu_seqlens values
    cu2 = torch.tensor([0, 30, 47], dtype=torch.int32)
    torch.testing.assert_close(compiled(q, k, v, cu2), f(q, k, v, cu2), rtol=0, atol=1e-12)
    cu3 = torch.tensor([0, 20, 40, 47], dtype=torch.int32)  # a run of two sequences of 20: one batched call
    torch.testing.assert_close(compiled(q, k, v, cu3), f(q, k, v, cu3), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# errors


def _call(cu, max_seqlen=22, q=None, **kw):
    qq, k, v, _ = _packed(LENGTHS, seed=31)
    return moba_attention_varlen(qq if q is None else q, k, v, cu, max_seqlen, 4, 3, **kw)


@pytest.mark.parametrize("cu,match", [
    (torch.tensor([0, 13, 16, 16, 25, 47], dtype=torch.int64), "cu_seqlens must be int32.*torch.int64"),
    (torch.tensor([[0, 47]], dtype=torch.int32), r"cu_seqlens must be 1-D.*\(1, 2\)"),
    (torch.zeros(0, dtype=torch.int32), r"cu_seqlens must be 1-D.*\(0,\)"),
    (torch.tensor([1, 13, 47], dtype=torch.int32), "cu_seqlens must start at 0, got 1"),
    (torch.tensor([0, 13, 10, 47], dtype=torch.int32), r"non-decreasing.*cu_seqlens\[1\] = 13 > cu_seqlens\[2\] = 10"),
    (torch.tensor([0, 13, 40], dtype=torch.int32), r"q.shape\[0\] = 47, got cu_seqlens\[-1\] = 40"),
    (torch.tensor([0, 13, 50], dtype=torch.int32), r"q.shape\[0\] = 47, got cu_seqlens\[-1\] = 50"),
])
def test_bad_cu_seqlens(cu, match):
    with pytest.raises(ValueError, match=match):
        _call(cu)


def test_non_tensors_raise_type_errors():  # as every other entry point does (_contract)
    with pytest.raises(TypeError, match="cu_seqlens must be a torch.Tensor.*list"):
        _call([0, 47])
    with pytest.raises(TypeError, match="q must be a torch.Tensor, got list"):
        _call(torch.tensor([0, 47], dtype=torch.int32), q=[[0.0]])


def test_bad_max_seqlen_and_arguments():
    cu = torch.tensor([0, 13, 16, 16, 25, 47], dtype=torch.int32)
    with pytest.raises(ValueError, match="max_seqlen = 21 is smaller than the longest sequence.*22 tokens"):
        _call(cu, max_seqlen=21)
    with pytest.raises(ValueError, match=r"max_seqlen must be an integer >= 0, got 22.0 \(float\)"):
        _call(cu, max_seqlen=22.0)
    with pytest.raises(ValueError, match=r"q must be 3-D.*\(1, 47, 4, 8\)"):
        _call(cu, q=torch.zeros(1, 47, 4, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="total_tokens differs, q has 40 and k has 47"):
        _call(cu, q=torch.zeros(40, 4, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"q heads \(3\) must be a multiple of kv heads \(2\)"):
        _call(cu, q=torch.zeros(47, 3, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="q, k, v must share one dtype"):
        _call(cu, q=torch.zeros(47, 4, 8))
    with pytest.raises(ValueError, match="deterministic must be True or False"):
        _call(cu, deterministic=1)
    with pytest.raises(ValueError, match="softmax_scale must be a finite"):
        _call(cu, softmax_scale=float("nan"))
    q, k, _, _ = _packed(LENGTHS, seed=37)
    with pytest.raises(ValueError, match="moba_topk_varlen: cu_seqlens must start at 0"):
        moba_topk_varlen(q, k, torch.tensor([2, 47], dtype=torch.int32), 47, 4, 2)
    with pytest.raises(ValueError, match="moba_topk_varlen: top_k must be an integer >= 1, got 0"):
        moba_topk_varlen(q, k, cu, 22, 4, 0)


def test_cu_seqlens_on_another_device():
    meta = torch.tensor([0, 47], dtype=torch.int32, device="meta")
    with pytest.raises(ValueError, match="cu_seqlens is on meta but q is on cpu; it must be on q's device or on"):
        _call(meta)


def test_meta_tensors_are_refused_in_the_entry_points_name():
    q, k, v, cu = _packed((5, 9), seed=47)
    with pytest.raises(ValueError, match="moba_attention_varlen: q is a meta tensor"):
        moba_attention_varlen(q.to("meta"), k.to("meta"), v.to("meta"), cu, 9, 4, 2)
    with pytest.raises(ValueError, match="moba_topk_varlen: k is a meta tensor"):
        moba_topk_varlen(q, k.to("meta"), cu, 9, 4, 2)
