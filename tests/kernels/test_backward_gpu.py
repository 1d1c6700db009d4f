"""The CUDA MoBA backward against autograd through the fp32 reference with the same routing (GPU machine).

Criterion (FlashAttention's for gradients, conftest.GpuOracle): max|g - g_ref| <= 3 * max|g_torch_lowprec - g_ref|
+ floor, where g_ref is autograd through the fp32 reference (:func:`moba_attention_given_routing`) from the same
bf16/fp16 inputs and g_torch_lowprec autograd through the same computation done as plain torch does it in the
input dtype (a dense softmax masked to the routed tokens). Routing is computed once and given to all of them.
Outputs and scratch are poisoned (NaN) before the backward launches.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from mobalab.bench._interleaved import extra_defines
from mobalab.kernels import _contract as C
from mobalab.kernels import _cuda_backward as G
from mobalab.kernels._cuda_attention import moba_attention_cuda
from mobalab.kernels._cuda_routing import moba_topk_cuda


def _check(gpu, grads, q, k, v, dout, topk, block, causal, scale=None, dlse=None, label=""):
    ref = gpu.oracle_grads(q, k, v, dout, topk, block, causal, scale, dlse=dlse)
    low = gpu.lowp_grads(q, k, v, dout, topk, block, causal, scale, dlse=dlse)
    report = []
    for name, g, r, lo, x in zip("qkv", grads, ref, low, (q, k, v), strict=True):
        assert g.dtype == x.dtype and g.shape == x.shape, f"{label}: d{name} has {g.dtype} {tuple(g.shape)}"
        assert torch.isfinite(g).all(), f"{label}: non-finite d{name} (unwritten or NaN)"
        err, err_low = gpu.assert_within_torch_error(g, r, lo, factor=3, floor=1e-4 * (1.0 + r.abs().max().item()),
                                                     label=f"{label}: d{name}")
        report.append(f"d{name} {err:.2e}/{err_low:.2e}")
    return report


@pytest.mark.gpu
def test_gradients_match_oracle(backward_case, gpu, poisoned_empty):
    case = backward_case
    heads, kv_heads = gpu.gqa[case["ratio"]]
    q, k, v, dout = gpu.inputs(case["batch"], case["seqlen"], heads, kv_heads, case["dim"], case["dtype"],
                               seed=zlib.crc32(gpu.case_id(case).encode()), dout=True)
    block, top_k, causal = case["block"], case["top_k"], case["causal"]
    topk = gpu.routing(q, k, block, top_k, causal)
    out, lse = moba_attention_cuda(q, k, v, block, top_k, causal=causal, return_lse=True, topk_indices=topk)
    scale = 1.0 / math.sqrt(case["dim"])
    with poisoned_empty():
        grads = G.moba_attention_backward_cuda(dout, q, k, v, out, lse, topk, block, top_k, causal, scale,
                                               deterministic=case["deterministic"])
    report = _check(gpu, grads, q, k, v, dout, topk, block, causal, label=gpu.case_id(case))
    print(gpu.case_id(case), *report)


BLOCK_VARIANT_CASES = [
    # the "block" variant (8 warps per 128 keys): dim, block, seqlen, heads, kv_heads, top_k, causal, dtype, det
    (128, 128, 4097, 8, 2, 8, True, torch.bfloat16, False),
    (128, 128, 127, 2, 2, 3, True, torch.float16, True),
    (64, 256, 3000, 8, 1, 4, True, torch.float16, True),
    (128, 512, 5000, 4, 4, 2, False, torch.bfloat16, False),
    (64, 128, 1, 4, 4, 2, True, torch.bfloat16, False),
    (64, 128, 2049, 4, 1, 64, False, torch.bfloat16, False),
]


# the "wgmma" variant (two warpgroups per 128 keys, sm_90): head dim 128 only
WGMMA_VARIANT_CASES = [c for c in BLOCK_VARIANT_CASES if c[0] == 128] + [
    (128, 256, 3000, 8, 1, 4, True, torch.float16, True),
    (128, 128, 2049, 4, 1, 64, False, torch.bfloat16, False),
    (128, 128, 1, 4, 4, 2, True, torch.bfloat16, False),
    (128, 256, 1000, 6, 2, 2, True, torch.float16, False),
]


def _variant_matches_oracle(variant, case, gpu, poisoned_empty):
    dim, block, seqlen, heads, kv_heads, top_k, causal, dtype, det = case
    q, k, v, dout = gpu.inputs(2, seqlen, heads, kv_heads, dim, dtype, seed=seqlen + dim, dout=True)
    topk = gpu.routing(q, k, block, top_k, causal)
    out, lse = moba_attention_cuda(q, k, v, block, top_k, causal=causal, return_lse=True, topk_indices=topk)
    args = (dout, q, k, v, out, lse, topk, block, top_k, causal, dim ** -0.5)
    with poisoned_empty():
        grads = G.moba_attention_backward_cuda(*args, deterministic=det, variant=variant)
    report = _check(gpu, grads, q, k, v, dout, topk, block, causal, label=f"{variant} {case}")
    print(variant, case, *report)
    if det:
        again = G.moba_attention_backward_cuda(*args, deterministic=True, variant=variant)
        assert all(torch.equal(a, b) for a, b in zip(grads, again, strict=True))


@pytest.mark.gpu
@pytest.mark.parametrize("case", BLOCK_VARIANT_CASES, ids=lambda c: "-".join(map(str, c)).replace("torch.", ""))
def test_block_variant_matches_oracle(case, gpu, poisoned_empty):
    """variant="block" against the oracle (the criterion above), and bit-identical run to run when deterministic."""
    _variant_matches_oracle("block", case, gpu, poisoned_empty)


def _needs_sm90():
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wgmma backward runs on sm_90 GPUs only")


@pytest.mark.gpu
@pytest.mark.parametrize("case", WGMMA_VARIANT_CASES, ids=lambda c: "-".join(map(str, c)).replace("torch.", ""))
def test_wgmma_variant_matches_oracle(case, gpu, poisoned_empty):
    """variant="wgmma" against the oracle, and bit-identical run to run when deterministic."""
    _needs_sm90()
    _variant_matches_oracle("wgmma", case, gpu, poisoned_empty)


@pytest.mark.gpu
@pytest.mark.parametrize("accumulator", ["fp32", "input"])
@pytest.mark.parametrize("case", [(128, 128, 4096, 8, 2, 8, True, torch.bfloat16, False),
                                  (128, 256, 3000, 4, 4, 16, False, torch.float16, False),
                                  (128, 128, 700, 2, 1, 3, True, torch.bfloat16, False)],
                         ids=lambda c: "-".join(map(str, c)).replace("torch.", ""))
def test_wgmma_dq_accumulators_match_oracle(accumulator, case, gpu, poisoned_empty, monkeypatch):
    """The wgmma kernel's atomic dQ into the fp32 accumulator and straight into a dQ of the input type (bf16's default,
    fp16's when forced), against the oracle: up to k + 1 roundings a row in the 16-bit mode (k up to 16 here)."""
    _needs_sm90()
    monkeypatch.setenv(G.DQ_ACCUMULATOR_ENV, accumulator)
    _variant_matches_oracle("wgmma", case, gpu, poisoned_empty)


@pytest.mark.gpu
@pytest.mark.parametrize("option", G.WGMMA_BUILD_OPTIONS)
@pytest.mark.parametrize("case", [WGMMA_VARIANT_CASES[0], (128, 128, 3000, 8, 2, 6, True, torch.bfloat16, True),
                                  (128, 128, 2500, 4, 4, 4, False, torch.float16, True)],
                         ids=lambda c: "-".join(map(str, c)).replace("torch.", ""))
def test_wgmma_build_options_match_the_default_build(option, case, gpu, poisoned_empty):
    """The wgmma kernel built with one of its measurement options (G.WGMMA_BUILD_OPTIONS) against the oracle in the
    atomic dQ mode, and bit-identical to the default build in the deterministic one (the options move work, not
    arithmetic). Long segments of full tiles, so the unmasked warps and the dQ-next loop's later tiles run."""
    _needs_sm90()
    dim, block, seqlen, heads, kv_heads, top_k, causal, dtype, _ = case
    q, k, v, dout = gpu.inputs(2, seqlen, heads, kv_heads, dim, dtype, seed=seqlen + 7, dout=True)
    topk = gpu.routing(q, k, block, top_k, causal)
    out, lse = moba_attention_cuda(q, k, v, block, top_k, causal=causal, return_lse=True, topk_indices=topk)
    args = (dout, q, k, v, out, lse, topk, block, top_k, causal, dim ** -0.5)
    default = G.moba_attention_backward_cuda(*args, deterministic=True, variant="wgmma")
    with extra_defines(G, G.WGMMA_SOURCE, (option,)):
        with poisoned_empty():
            grads = G.moba_attention_backward_cuda(*args, variant="wgmma")
        _check(gpu, grads, q, k, v, dout, topk, block, causal, label=f"wgmma {option} {case}")
        with poisoned_empty():
            det = G.moba_attention_backward_cuda(*args, deterministic=True, variant="wgmma")
    for name, a, b in zip("qkv", det, default, strict=True):
        assert torch.equal(a, b), f"{option}: d{name} differs from the default build's (deterministic)"


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True])
def test_wgmma_variant_chunked_and_into(deterministic, gpu, poisoned_empty):
    """variant="wgmma" with chunks that split the query range (dK / dV through the fp32 store / add modes), and
    into fp32 buffers: equal to the "block" variant's sums within fp32 reordering, and to the oracle."""
    _needs_sm90()
    q, k, v, dout = gpu.inputs(2, 3000, 8, 2, 128, torch.bfloat16, seed=11, dout=True)
    topk = gpu.routing(q, k, 128, 4, True)
    out, lse = moba_attention_cuda(q, k, v, 128, 4, causal=True, return_lse=True, topk_indices=topk)
    args = (dout, q, k, v, out, lse, topk, 128, 4, True, 128 ** -0.5)
    assert any(G.dkv_mode(c, 3000) == 2 for c in G.bwd_plan(2, 3000, 8, 2, 128, 4, deterministic, 1 << 20))
    with poisoned_empty():
        grads = G.moba_attention_backward_cuda(*args, deterministic=deterministic, scratch_budget_bytes=1 << 20,
                                               variant="wgmma")
    _check(gpu, grads, q, k, v, dout, topk, 128, True, label="wgmma chunked")
    block = G.moba_attention_backward_cuda(*args, deterministic=deterministic, variant="block")
    for a, b in zip(grads, block, strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)
    if not deterministic:
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dk, dv = (torch.full(x.shape, math.nan, dtype=torch.float32, device=x.device) for x in (k, v))
        G.moba_attention_backward_cuda(*args, into=(dq, dk, dv), kv_fresh=True, variant="wgmma")
        for a, b in zip((dq, dk, dv), block, strict=True):
            torch.testing.assert_close(a.to(b.dtype).float(), b.float(), atol=2e-2, rtol=2e-2)


KEPT_LISTS_CASES = [
    # dim, block, seqlen, heads, kv_heads, top_k, causal, dtype, deterministic, forward kv heads per chunk
    (128, 128, 3000, 8, 2, 8, True, torch.bfloat16, False, None),  # "block" variant, GQA 4, the lists as kept
    (64, 32, 1000, 4, 4, 4, True, torch.float16, True, None),       # "tile", deterministic dQ
    (96, 64, 777, 4, 1, 3, False, torch.bfloat16, False, None),     # "tile", non-causal, GQA 4
    (128, 128, 3000, 8, 4, 8, True, torch.bfloat16, False, 1),      # gathered: forward chunks of 1 kv head
    (64, 64, 1500, 6, 3, 4, True, torch.float16, True, 2),          # det: backward chunks of 1 kv head, parts
                                                                    # of the forward's chunks of 2 and 1
    (128, 128, 3000, 4, 4, 8, True, torch.bfloat16, False, 0.4),    # gathered: forward chunks of a head's
    (96, 32, 1000, 3, 3, 5, False, torch.float16, False, 0.3),      # queries in 3 / 4 parts (as at 512K)
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", KEPT_LISTS_CASES, ids=[str(c[:3] + c[-1:]) for c in KEPT_LISTS_CASES])
def test_backward_over_the_forwards_kept_lists(case, gpu, poisoned_empty, monkeypatch):
    """The forward's kept key-block lists (keep_lists) serve the backward, as they are or gathered where the
    forward's chunks split the kv heads finer or a head's queries (forced here with a smaller forward budget;
    fwd_kv below 1: that share of a head's queries per forward chunk): gradients within the
    criterion, dK / dV (and the deterministic dQ) bit-identical to a backward that builds its lists; the custom
    op's autograd keeps them too and agrees."""
    dim, block, seqlen, heads, kv_heads, top_k, causal, dtype, det, fwd_kv = case
    q, k, v, dout = gpu.inputs(2, seqlen, heads, kv_heads, dim, dtype, seed=seqlen + 3, dout=True)
    if fwd_kv is not None:  # forward chunks of fwd_kv kv heads (the last one smaller): other chunks than the backward's
        from mobalab.kernels import _cuda_attention as A

        budget = int(seqlen * fwd_kv * (heads // kv_heads) * top_k * A.bytes_per_pair(dim))
        monkeypatch.setattr(A, "default_scratch_budget", lambda *a, **kw: budget)
        monkeypatch.setattr(A, "forward_scratch_budget", lambda *a, **kw: budget)
        fwd_plan = G.forward_plan(2, seqlen, heads, kv_heads, dim, top_k)
        assert fwd_plan != G.bwd_plan(2, seqlen, heads, kv_heads, dim, top_k, det)
    assert G.forward_lists_reusable(2, seqlen, heads, kv_heads, dim, top_k, det)
    # the CUDA router's selection, which the custom op below computes too (the oracle's can differ at near-ties)
    topk = moba_topk_cuda(q, k, block, top_k, causal=causal).to(torch.int32).contiguous()
    with poisoned_empty():
        out, lse, lists = moba_attention_cuda(q, k, v, block, top_k, causal=causal, return_lse=True,
                                              topk_indices=topk, keep_lists=True)
    args = (dout, q, k, v, out, lse, topk, block, top_k, causal, dim ** -0.5)
    with poisoned_empty():
        grads = G.moba_attention_backward_cuda(*args, deterministic=det, fwd_lists=lists)
    _check(gpu, grads, q, k, v, dout, topk, block, causal, label=f"kept lists {case}")
    rebuilt = G.moba_attention_backward_cuda(*args, deterministic=det)
    for name, a, b in zip("qkv", grads, rebuilt, strict=True):
        if name != "q" or det:
            assert torch.equal(a, b), f"d{name} over the kept lists differs from the rebuilt lists'"
    from mobalab.kernels.autograd import moba_attention_autograd

    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o = moba_attention_autograd(*leaves, block, top_k, causal=causal, deterministic=det)
    auto = torch.autograd.grad(o, leaves, dout)
    for name, a, b in zip("qkv", auto, rebuilt, strict=True):
        if name != "q" or det:
            assert torch.equal(a, b), f"autograd d{name} differs from the explicit backward's"
        else:
            torch.testing.assert_close(a, b, rtol=0.02, atol=1e-3 * b.abs().max().item())


def test_case_grid_covers_the_contract(backward_grid):
    cases = backward_grid
    assert len(cases) >= 40
    assert {c["dim"] for c in cases} == set(C.CUDA_HEAD_DIMS)
    assert {c["block"] for c in cases} == set(C.CUDA_BLOCK_SIZES)
    assert {c["dtype"] for c in cases} == set(C.CUDA_DTYPES)
    assert {c["ratio"] for c in cases} == {1, 4, 8} and {c["causal"] for c in cases} == {True, False}
    assert {1, 2, 8, 64} <= {c["top_k"] for c in cases}
    assert {1, 1000, 4097} <= {c["seqlen"] for c in cases}
    assert {True, False} == {c["deterministic"] for c in cases}
    for b in C.CUDA_BLOCK_SIZES:
        assert {b - 1, b, b + 1} & {c["seqlen"] for c in cases if c["block"] == b}
    assert any(c["top_k"] * c["block"] >= c["seqlen"] for c in cases)  # k >= n


# ---------------------------------------------------------------------------------------------------
# determinism, chunking, autograd wiring, lse gradient, torch.compile


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("block", [32, 128, 256])
def test_deterministic_is_bit_identical(causal, block, gpu):
    q, k, v, dout = gpu.inputs(2, 4096, 8, 2, 128, torch.bfloat16, seed=11, dout=True)
    topk = gpu.routing(q, k, block, 8, causal)
    out, lse = moba_attention_cuda(q, k, v, block, 8, causal=causal, return_lse=True, topk_indices=topk)
    args = (dout, q, k, v, out, lse, topk, block, 8, causal, 128 ** -0.5)
    g1 = G.moba_attention_backward_cuda(*args, deterministic=True)
    g2 = G.moba_attention_backward_cuda(*args, deterministic=True)
    for a, b in zip(g1, g2, strict=True):
        assert torch.equal(a, b)
    fast = G.moba_attention_backward_cuda(*args, deterministic=False)
    assert torch.equal(fast[1], g1[1]) and torch.equal(fast[2], g1[2])  # dK/dV: one writer per element
    torch.testing.assert_close(fast[0].float(), g1[0].float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("budget", [None, 1 << 20])
def test_gradients_into_fp32_buffers(budget, gpu):
    """``into``: dQ added into the caller's fp32 rows, dK / dV stored when ``kv_fresh`` (poisoned buffers: every
    key row must be written), added otherwise; two calls give twice the gradients of the usual call. With a
    tiny scratch budget the chunks split the query range (the store, then adds, within one call)."""
    q, k, v, dout = gpu.inputs(2, 3000, 8, 2, 128, torch.bfloat16, seed=7, dout=True)
    topk = gpu.routing(q, k, 64, 8, True)
    out, lse = moba_attention_cuda(q, k, v, 64, 8, causal=True, return_lse=True, topk_indices=topk)
    args = (dout, q, k, v, out, lse, topk, 64, 8, True, 0.125)
    want = G.moba_attention_backward_cuda(*args, scratch_budget_bytes=budget)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk, dv = (torch.full(x.shape, math.nan, dtype=torch.float32, device=x.device) for x in (k, v))
    got = G.moba_attention_backward_cuda(*args, scratch_budget_bytes=budget, into=(dq, dk, dv), kv_fresh=True)
    assert all(a is b for a, b in zip(got, (dq, dk, dv), strict=True))
    for a, b in zip(got, want, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.to(b.dtype).float(), b.float(), atol=2e-2, rtol=2e-2)
    assert torch.equal(dk.to(k.dtype), want[1]) and torch.equal(dv.to(v.dtype), want[2])  # one writer each
    once = [x.clone() for x in got]
    G.moba_attention_backward_cuda(*args, scratch_budget_bytes=budget, into=(dq, dk, dv), kv_fresh=False)
    for a, b in zip((dq, dk, dv), once, strict=True):
        torch.testing.assert_close(a, 2 * b, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="deterministic"):
        G.moba_attention_backward_cuda(*args, deterministic=True, into=(dq, dk, dv))


@pytest.mark.gpu
def test_given_delta_replaces_out_and_dlse(gpu):
    """``delta`` from :func:`backward_delta` (D = dO.O - dlse, fp32) gives the gradients of the call that
    computes it itself, bit for bit with ``deterministic``; out and dlse are then not read (poisoned here); a
    delta of the wrong shape or dtype is refused."""
    q, k, v, dout = gpu.inputs(2, 1500, 8, 2, 128, torch.bfloat16, seed=9, dout=True)
    topk = gpu.routing(q, k, 64, 8, True)
    out, lse = moba_attention_cuda(q, k, v, 64, 8, causal=True, return_lse=True, topk_indices=topk)
    dlse = torch.randn(lse.shape, device=q.device)
    delta = G.backward_delta(out, dout, dlse)
    assert delta.shape == lse.shape and delta.dtype == torch.float32
    torch.testing.assert_close(delta, (dout.float() * out.float()).sum(-1) - dlse, atol=1e-3, rtol=1e-4)
    want = G.moba_attention_backward_cuda(dout, q, k, v, out, lse, topk, 64, 8, True, 0.125, True, dlse)
    poisoned = torch.full_like(out, math.nan)
    got = G.moba_attention_backward_cuda(dout, q, k, v, poisoned, lse, topk, 64, 8, True, 0.125, True,
                                         torch.full_like(dlse, math.nan), delta=delta)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="delta"):
        G.moba_attention_backward_cuda(dout, q, k, v, out, lse, topk, 64, 8, True, 0.125, delta=delta.double())
    with pytest.raises(ValueError, match="out is"):
        G.backward_delta(out.float(), dout)


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True])
def test_chunked_backward(deterministic, gpu, poisoned_empty):
    # A tiny scratch budget splits query ranges: dK/dV go through the fp32 store/add path.
    q, k, v, dout = gpu.inputs(2, 3000, 8, 2, 64, torch.bfloat16, seed=5, dout=True)
    topk = gpu.routing(q, k, 64, 8, True)
    out, lse = moba_attention_cuda(q, k, v, 64, 8, causal=True, return_lse=True, topk_indices=topk)
    chunks = G.bwd_plan(2, 3000, 8, 2, 64, 8, deterministic, 1 << 20)
    assert any(G.dkv_mode(c, 3000) == 2 for c in chunks)
    with poisoned_empty():
        grads = G.moba_attention_backward_cuda(dout, q, k, v, out, lse, topk, 64, 8, True, 0.125,
                                               deterministic=deterministic, scratch_budget_bytes=1 << 20)
    _check(gpu, grads, q, k, v, dout, topk, 64, True, label="chunked")


@pytest.mark.gpu
def test_public_api_autograd_and_lse_gradient(gpu):
    import mobalab.kernels as K

    q, k, v, dout = gpu.inputs(2, 2500, 8, 2, 128, torch.bfloat16, seed=13, dout=True)
    dlse = torch.randn(2, 2500, 8, device="cuda")
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = K.moba_attention(*leaves, 128, 4, causal=True, return_lse=True, deterministic=True)
    ((out.float() * dout.float()).sum() + (lse * dlse).sum()).backward()
    topk = moba_topk_cuda(q, k, 128, 4, causal=True)
    assert torch.equal(out, moba_attention_cuda(q, k, v, 128, 4, causal=True, topk_indices=topk))
    _check(gpu, [x.grad for x in leaves], q, k, v, dout, topk, 128, True, dlse=dlse, label="public api + dlse")
    # the same call again: bit-identical gradients
    leaves2 = [x.clone().requires_grad_() for x in (q, k, v)]
    out2, lse2 = K.moba_attention(*leaves2, 128, 4, causal=True, return_lse=True, deterministic=True)
    ((out2.float() * dout.float()).sum() + (lse2 * dlse).sum()).backward()
    for a, b in zip(leaves, leaves2, strict=True):
        assert torch.equal(a.grad, b.grad)


@pytest.mark.gpu
@pytest.mark.parametrize(("shape", "deterministic"), [((2, 1024, 8, 2, 128, 128, 4), True),
                                                      ((3, 512, 4, 4, 64, 64, 3), False),
                                                      ((2, 8192, 16, 16, 128, 128, 8), False),
                                                      ((8, 4096, 16, 16, 128, 128, 8), True)])
def test_folded_batch_is_bit_identical(gpu, monkeypatch, shape, deterministic):
    """A training step that attends the batch as one sequence (mobalab.kernels._batch_fold: N a multiple of B,
    fewer chunks) gives the per-sequence step's out, LSE, dK, dV (and deterministic dQ) bit for bit, with the LSE's
    gradient honoured."""
    import mobalab.kernels as K
    from mobalab.kernels import _batch_fold, _cuda_routing, autograd

    batch, seqlen, heads, kv_heads, dim, block, top_k = shape
    assert _batch_fold.folds(batch, seqlen, heads, kv_heads, dim, block, top_k, deterministic)
    q, k, v, dout = gpu.inputs(batch, seqlen, heads, kv_heads, dim, torch.bfloat16, seed=seqlen, dout=True)
    dlse = torch.randn(batch, seqlen, heads, device="cuda")
    folded = []
    real = _cuda_routing.topk_cuda_checked
    monkeypatch.setattr(_cuda_routing, "topk_cuda_checked",
                        lambda *a, **kw: folded.append(kw.get("fold", False)) or real(*a, **kw))

    def step(fold):
        monkeypatch.setattr(autograd, "FOLD_BATCH", fold)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out, lse = K.moba_attention(*leaves, block, top_k, causal=True, return_lse=True, deterministic=deterministic)
        ((out.float() * dout.float()).sum() + (lse * dlse).sum()).backward()
        return out, lse, *(x.grad for x in leaves)

    one, per_seq = step(True), step(False)
    assert folded == [True, False]  # the folded step's routing renumbered by the top-k kernel, the other's not
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), one, per_seq, strict=True):
        if name != "dq" or deterministic:
            assert torch.equal(a, b), f"{name} of the folded batch differs from the per-sequence chunks'"
    if seqlen <= 1024:  # the oracle's dense fp32 gradients; the 8K case (the benchmark's shape) is compared only
        topk = moba_topk_cuda(q, k, block, top_k, causal=True)
        _check(gpu, one[2:], q, k, v, dout, topk, block, True, dlse=dlse, label="folded batch")


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["mma", "split", "wgmma"])
@pytest.mark.parametrize(("dim", "top_k", "causal"), [(128, 8, True), (64, 16, False), (128, 40, True)])
def test_topk_kernel_numbers_a_folded_batch(variant, dim, top_k, causal):
    """The top-k kernel with fold_blocks = n: the plain selections renumbered for the batch's sequences end to end
    (``_batch_fold.folded_topk``, -1 kept), exactly, in every router that has a kernel for the list length."""
    from mobalab.kernels import _cuda_routing as routing
    from mobalab.kernels._batch_fold import folded_topk

    if routing._variant_problem(variant, dim, top_k, causal, torch.device("cuda")) is not None:
        pytest.skip(f"router {variant!r} has no kernel for d {dim}, top_k {top_k} on this GPU")
    g = torch.Generator(device="cuda").manual_seed(dim + top_k)
    q = torch.randn(3, 1024, 4, dim, device="cuda", generator=g).to(torch.bfloat16)
    k = torch.randn(3, 1024, 2, dim, device="cuda", generator=g).to(torch.bfloat16)
    with torch.cuda.device(q.device):
        plain = routing.topk_cuda_checked(q, k, 32, top_k, causal, variant=variant)
        folded = routing.topk_cuda_checked(q, k, 32, top_k, causal, variant=variant, fold=True)
    assert bool((plain < 0).any()) == causal and torch.equal(folded, folded_topk(plain, 1024 // 32))


@pytest.mark.gpu
def test_custom_scale_and_strided_inputs(gpu, poisoned_empty):
    q, k, v, dout = gpu.inputs(2, 777, 4, 2, 64, torch.float16, seed=3, dout=True)
    qt, kt, vt, dt = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v, dout))
    topk = gpu.routing(q, k, 32, 4, True)
    out, lse = moba_attention_cuda(q, k, v, 32, 4, causal=True, softmax_scale=0.3, return_lse=True,
                                   topk_indices=topk)
    with poisoned_empty():
        grads = G.moba_attention_backward_cuda(dt, qt, kt, vt, out, lse, topk, 32, 4, True, 0.3)
    _check(gpu, grads, q, k, v, dout, topk, 32, True, scale=0.3, label="strided, scale 0.3")


@pytest.mark.gpu
def test_concentrated_routing_long_segment(gpu):
    # Every query picks block 0 and its own block: one very long list per kv head (many tiles in one CTA).
    q, k, v, dout = gpu.inputs(1, 8000, 4, 2, 128, torch.bfloat16, seed=17, dout=True)
    t = torch.arange(8000, device="cuda")
    own = (t // 128).view(1, -1, 1).expand(1, 8000, 4)
    first = torch.where(own > 0, 0, -1)
    topk = torch.stack([own, first, torch.full_like(own, -1)], dim=-1).to(torch.int32)
    out, lse = moba_attention_cuda(q, k, v, 128, 3, causal=True, return_lse=True, topk_indices=topk)
    grads = G.moba_attention_backward_cuda(dout, q, k, v, out, lse, topk, 128, 3, True, 128 ** -0.5)
    _check(gpu, grads, q, k, v, dout, topk, 128, True, label="concentrated")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend, gpu):
    import mobalab.kernels as K

    q, k, v, dout = gpu.inputs(1, 1024, 4, 2, 64, torch.bfloat16, seed=19, dout=True)

    def f(q, k, v):
        return K.moba_attention(q, k, v, 64, 4, causal=True) * 2.0

    compiled = torch.compile(f, fullgraph=True, backend=backend)  # a graph break raises
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = compiled(*leaves)
    (out.float() * dout.float()).sum().backward()
    eager = [x.clone().requires_grad_() for x in (q, k, v)]
    out_e = f(*eager)
    (out_e.float() * dout.float()).sum().backward()
    torch.testing.assert_close(out.float(), out_e.float(), atol=2e-2, rtol=2e-2)  # inductor fuses the * 2
    for a, b in zip(leaves, eager, strict=True):
        torch.testing.assert_close(a.grad.float(), b.grad.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize(("seqlen", "dim", "block"), [(8192, 128, 128), (3000, 64, 64)])
def test_step_replays_from_a_cuda_graph(gpu, seqlen, dim, block):
    """Forward + backward through the custom op captured in a CUDA graph (after a warm-up on a side stream, as
    torch.cuda.graphs and torch.compile's "reduce-overhead" do it): nothing in the step waits on the host, and
    every replay gives the eager step's output and gradients (dK, dV bit for bit; dQ, summed by atomics, within
    the accumulation order's rounding), also after the inputs change in place."""
    import mobalab.kernels as K
    from mobalab.bench.attention import graphed

    q, k, v, dout = gpu.inputs(2, seqlen, 8, 2, dim, torch.bfloat16, seed=23, dout=True)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    result = {}

    def step():
        out = K.moba_attention(*leaves, block, 8, causal=True)
        result["out"] = out
        result["grads"] = torch.autograd.grad(out, leaves, dout)

    replay = graphed(step)

    def eager():
        fresh = [x.detach().clone().requires_grad_() for x in leaves]
        out = K.moba_attention(*fresh, block, 8, causal=True)
        return out, torch.autograd.grad(out, fresh, dout)

    for round_ in range(2):
        replay()
        torch.cuda.synchronize()
        out, grads = eager()
        assert torch.equal(result["out"], out), round_
        torch.testing.assert_close(result["grads"][0].float(), grads[0].float(), atol=2e-3, rtol=2e-2)
        assert torch.equal(result["grads"][1], grads[1]) and torch.equal(result["grads"][2], grads[2]), round_
        with torch.no_grad():  # new inputs in the same tensors: the graph reads them at the next replay
            for x in leaves:
                x.copy_(torch.randn_like(x))
