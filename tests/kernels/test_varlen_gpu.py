"""Packed variable-length MoBA through the CUDA kernels (GPU machine).

The varlen call runs the batched CUDA path once per group of sequences: a run of consecutive sequences of one
length (a view of the packed rows), or, when causal, sequences of near lengths copied into one zero-padded batch
(as the cost model picks them, and with every causal sequence in one padded batch), through either entry (the
eager autograd Function, which keeps each group's key-block lists for the backward, and the custom ops). Its
forward (output, LSE, routing) must be bit-identical to ``moba_attention`` / ``moba_topk`` of each sequence alone,
and so must its deterministic gradients where the sequence is not padded (a padded batch, planned for its
padded length, may sum dK and dV in another order: within a bf16 rounding, and bit-identical run to run); the
default (atomic dQ) gradients agree within a bf16 rounding. Outputs and gradients are allocated poisoned (NaN), so
an unwritten row fails. The output is also held to the fp32 torch reference on the rows whose routing the
reference reproduces (bf16/fp16 tolerance).
"""

from __future__ import annotations

import pytest
import torch

from mobalab.kernels import moba_attention, moba_attention_varlen, moba_topk, moba_topk_varlen
from mobalab.kernels import reference as R

pytestmark = pytest.mark.gpu

# lengths: not multiples of B, shorter than B, empty, k >= n, a few thousand tokens
CASES = [
    # (lengths, heads, kv_heads, dim, block, top_k, causal, dtype)
    ((1000, 70, 0, 129, 2048, 31, 300), 8, 2, 128, 64, 4, True, torch.bfloat16),
    ((513, 0, 0, 17, 1500), 4, 4, 64, 16, 8, False, torch.float16),
    ((4000, 127, 128, 129), 8, 1, 128, 128, 3, True, torch.bfloat16),
    ((90, 2500), 2, 2, 64, 32, 64, True, torch.bfloat16),
    # runs of one length, attended as batches: 2048 x 2 (a multiple of B: a batch folded into one sequence),
    # 600 x 3 with an empty sequence among them, 129 x 2
    ((600, 600, 0, 600, 129, 129, 2048, 2048), 8, 2, 128, 128, 8, True, torch.bfloat16),
    ((300, 300, 300, 77), 4, 4, 64, 32, 4, False, torch.float16),
    # one run holds every row: the batch's outputs and gradients are the packed ones, with no copy
    ((0, 2048, 2048, 0, 2048), 8, 2, 128, 128, 8, True, torch.bfloat16),
    ((1000, 1000), 4, 4, 64, 64, 4, False, torch.float16),
]


def _packed(lengths, heads, kv_heads, dim, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    total = sum(lengths)
    mk = lambda h: torch.randn(total, h, dim, device="cuda", generator=g).to(dtype)  # noqa: E731
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    return mk(heads), mk(kv_heads), mk(kv_heads), mk(heads), cu


def _pieces(cu):
    c = cu.tolist()
    return [(s, e) for s, e in zip(c[:-1], c[1:], strict=True) if e > s]


@pytest.mark.parametrize("varlen_grouping", ["default", "pad-all"], indirect=True)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_forward_equals_each_sequence_alone(case, poisoned_empty, varlen_entry, varlen_grouping):
    lengths, heads, kv_heads, dim, block, top_k, causal, dtype = CASES[case]
    q, k, v, _, cu = _packed(lengths, heads, kv_heads, dim, dtype, seed=case)
    with poisoned_empty():
        out, lse = moba_attention_varlen(q, k, v, cu, max(lengths), block, top_k, causal=causal, return_lse=True)
        sel = moba_topk_varlen(q, k, cu, max(lengths), block, top_k, causal=causal)
    assert out.dtype == dtype and torch.isfinite(out).all() and torch.isfinite(lse).all()
    for s, e in _pieces(cu):
        one = [x[s:e][None] for x in (q, k, v)]
        o, lo = moba_attention(*one, block, top_k, causal=causal, return_lse=True)
        assert torch.equal(out[s:e], o[0]), f"case {case}: output of sequence [{s}, {e}) differs"
        assert torch.equal(lse[s:e], lo[0]), f"case {case}: lse of sequence [{s}, {e}) differs"
        t = moba_topk(*one[:2], block, top_k, causal=causal)[0]
        assert torch.equal(sel[s:e], t), f"case {case}: routing of sequence [{s}, {e}) differs"
        # the fp32 reference, on the (query, head) rows whose routing it reproduces (near-ties may flip)
        ref_sel = R.moba_topk(*(x.float() for x in one[:2]), block, top_k, causal=causal)[0]
        same = (ref_sel == t).all(-1)
        assert same.float().mean() > 0.99
        ref = R.moba_attention(*(x.float() for x in one), block, top_k, causal=causal)[0]
        err = (out[s:e].float() - ref).abs()[same].max().item()
        assert err < 2e-2, f"case {case}: error {err:.3e} against the fp32 reference"


@pytest.mark.parametrize("varlen_grouping", ["default", "pad-all"], indirect=True)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_gradients_equal_each_sequence_alone(case, poisoned_empty, varlen_entry, varlen_grouping):
    from mobalab.kernels import _varlen

    lengths, heads, kv_heads, dim, block, top_k, causal, dtype = CASES[case]
    q, k, v, dout, cu = _packed(lengths, heads, kv_heads, dim, dtype, seed=100 + case)
    groups = _varlen._plan(cu, q, k, max(lengths), block, causal, "moba_attention_varlen")  # the call's own grouping
    padded = {span for g in groups for span in g.spans}
    for deterministic in (True, False):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = moba_attention_varlen(*leaves, cu, max(lengths), block, top_k, causal=causal,
                                    deterministic=deterministic)
        with poisoned_empty():
            got = torch.autograd.grad(out, leaves, dout)
        if deterministic:  # bit-identical run to run, padded batches included
            again = torch.autograd.grad(moba_attention_varlen(*leaves, cu, max(lengths), block, top_k,
                                                              causal=causal, deterministic=True), leaves, dout)
            assert all(torch.equal(a, b) for a, b in zip(got, again, strict=True)), f"case {case}: not repeatable"
        for s, e in _pieces(cu):
            one = [x[s:e][None].clone().requires_grad_() for x in (q, k, v)]
            o = moba_attention(*one, block, top_k, causal=causal, deterministic=True)
            want = torch.autograd.grad(o, one, dout[s:e][None])
            for name, a, b in zip("qkv", got, want, strict=True):
                a = a[s:e]
                assert torch.isfinite(a).all(), f"case {case}: non-finite d{name} in [{s}, {e})"
                # a padded batch is planned for its padded length, not the sequence's: its dK, dV sums over
                # query tiles may run in another order
                if deterministic and (s, e) not in padded:
                    assert torch.equal(a, b[0]), f"case {case}: d{name} of [{s}, {e}) differs"
                else:
                    torch.testing.assert_close(a.float(), b[0].float(), rtol=1.6e-2, atol=1e-2)


def test_cu_seqlens_on_the_host(varlen_entry):
    # read without waiting for the GPU; the same outputs and (deterministic) gradients as from the GPU tensor
    q, k, v, dout, cu = _packed((600, 600, 0, 1000), 8, 2, 128, torch.bfloat16, seed=5)
    results = []
    for c in (cu, cu.cpu()):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out, lse = moba_attention_varlen(*leaves, c, 1000, 64, 4, return_lse=True, deterministic=True)
        results.append((out, lse, *torch.autograd.grad(out, leaves, dout)))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), *results, strict=True):
        assert torch.equal(a, b), f"{name} differs with cu_seqlens on the host"


@pytest.mark.parametrize("varlen_grouping", ["default", "pad-all"], indirect=True)
def test_torch_compile_fullgraph_cuda(varlen_grouping):
    q, k, v, _, cu = _packed((700, 0, 333, 1200), 8, 2, 128, torch.bfloat16, seed=7)

    def f(q, k, v, cu):
        out = moba_attention_varlen(q, k, v, cu, 1200, 64, 4, causal=True, deterministic=True)
        return (out.float() ** 2).sum()

    compiled = torch.compile(f, fullgraph=True)  # a graph break would raise
    a = [x.clone().requires_grad_() for x in (q, k, v)]
    b = [x.clone().requires_grad_() for x in (q, k, v)]
    loss_a, loss_b = compiled(*a, cu), f(*b, cu)
    loss_a.backward()
    loss_b.backward()
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=0)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x.grad.float(), y.grad.float(), rtol=1e-2, atol=1e-3)


def test_unsupported_head_dim_is_refused_by_the_cuda_path():
    q, k, v, _, cu = _packed((100, 50), 2, 2, 48, torch.bfloat16, seed=9)
    with pytest.raises(ValueError, match="head_dim 48"):
        moba_attention_varlen(q, k, v, cu, 100, 64, 2)
