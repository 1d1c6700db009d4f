"""The CUDA MoBA attention forward against the fp32 oracle with the same routing (run on the GPU machine).

Criterion (FlashAttention's, conftest.GpuOracle): max|out - ref| <= 2 * max|out_torch_lowprec - ref| + a tiny
floor, where ref is the fp32 reference (:func:`mobalab.kernels.reference.moba_attention_given_routing`) from
the same bf16/fp16 inputs and out_torch_lowprec the same computation done as plain torch does it in the input
dtype. Routing indices are computed once and passed to both, so routing differences cannot pollute attention
errors. Outputs and scratch are poisoned (NaN) before each launch.

The kernel stores the per-slot partial o in the input dtype by default; every test here runs with that
default (whatever the caller's ``MOBALAB_ATTN_PARTIAL``) except those that set the fp32 fallback themselves.
"""

from __future__ import annotations

import contextlib
import zlib

import pytest
import torch

from mobalab.kernels import _contract as C
from mobalab.kernels import _cuda_attention as A
from mobalab.kernels._cuda_routing import moba_topk_cuda


@pytest.fixture(autouse=True)
def _default_partial_format(monkeypatch):
    """The criterion tests measure the default partial format (o in the input dtype)."""
    monkeypatch.delenv(A.PARTIAL_ENV, raising=False)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["auto", "streaming"])
def test_attention_matches_oracle(attention_case, variant, gpu, poisoned_empty):
    case = attention_case
    if variant == "streaming" and not A.resident(case["dim"], case["block"], "auto"):
        pytest.skip("auto already runs the streaming kernel here")
    heads, kv_heads = gpu.gqa[case["ratio"]]
    q, k, v = gpu.inputs(case["batch"], case["seqlen"], heads, kv_heads, case["dim"], case["dtype"],
                         seed=zlib.crc32(gpu.case_id(case).encode()))
    topk = gpu.routing(q, k, case["block"], case["top_k"], case["causal"])
    with poisoned_empty():
        out, lse = A.moba_attention_cuda(q, k, v, case["block"], case["top_k"], causal=case["causal"],
                                         return_lse=True, topk_indices=topk, variant=variant)
    gpu.check_forward(q, k, v, topk, case["block"], case["causal"], out, lse, label=gpu.case_id(case))


def test_case_grid_covers_the_contract(attention_grid):
    cases = attention_grid
    assert len(cases) >= 40
    assert {c["dim"] for c in cases} == set(C.CUDA_HEAD_DIMS)
    assert {c["block"] for c in cases} == set(C.CUDA_BLOCK_SIZES)
    assert {c["dtype"] for c in cases} == set(C.CUDA_DTYPES)
    assert {c["ratio"] for c in cases} == {1, 4, 8} and {c["causal"] for c in cases} == {True, False}
    assert {1, 2, 8, 64} <= {c["top_k"] for c in cases}
    assert {1, 1000, 4097, 65536} <= {c["seqlen"] for c in cases}
    for b in C.CUDA_BLOCK_SIZES:
        assert {b - 1, b, b + 1} & {c["seqlen"] for c in cases if c["block"] == b}


# ---------------------------------------------------------------------------------------------------
# chunking, determinism, layout, scale, routing given or not


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["auto", "streaming"])
@pytest.mark.parametrize("budget, seqlen, heads, kv_heads, dim, causal", [
    (2 << 20, 4097, 8, 2, 128, True),  # query ranges split into many chunks
    (4 << 20, 1000, 8, 8, 64, False),  # kv groups split across chunks (3 of 8 per chunk)
])
def test_many_chunks_match_one(budget, seqlen, heads, kv_heads, dim, causal, variant, gpu, poisoned_empty):
    q, k, v = gpu.inputs(2, seqlen, heads, kv_heads, dim, torch.bfloat16, seed=7)
    topk = gpu.routing(q, k, 64, 8, causal)
    chunks = A.plan_chunks(2, seqlen, heads, kv_heads, dim, 8, budget)
    assert len(chunks) > 2 * 2
    whole = A.moba_attention_cuda(q, k, v, 64, 8, causal=causal, topk_indices=topk, variant=variant)
    with poisoned_empty():
        out, lse = A.moba_attention_cuda(q, k, v, 64, 8, causal=causal, return_lse=True, topk_indices=topk,
                                         variant=variant, scratch_budget_bytes=budget)
    gpu.check_forward(q, k, v, topk, 64, causal, out, lse, label="chunked")
    # partials of one (query, slot) do not depend on which other rows share their tiles: same bits
    assert torch.equal(out, whole)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["auto", "streaming"])
@pytest.mark.parametrize("causal", [True, False])
def test_two_runs_are_bit_identical(causal, variant, gpu):
    q, k, v = gpu.inputs(2, 8192, 8, 2, 128, torch.bfloat16, seed=11)
    topk = gpu.routing(q, k, 128, 8, causal)
    out1, lse1 = A.moba_attention_cuda(q, k, v, 128, 8, causal=causal, return_lse=True, topk_indices=topk,
                                       variant=variant)
    out2, lse2 = A.moba_attention_cuda(q, k, v, 128, 8, causal=causal, return_lse=True, topk_indices=topk,
                                       variant=variant)
    assert torch.equal(out1, out2) and torch.equal(lse1, lse2)


@pytest.mark.gpu
def test_non_contiguous_inputs_and_custom_scale(gpu, poisoned_empty):
    q, k, v = gpu.inputs(2, 777, 4, 2, 64, torch.float16, seed=3)
    # (b, h, N, d) storage viewed as (b, N, h, d): strided, must be read correctly
    qt, kt, vt = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    assert not qt.is_contiguous()
    topk = gpu.routing(q, k, 32, 4, True)
    with poisoned_empty():
        out, lse = A.moba_attention_cuda(qt, kt, vt, 32, 4, causal=True, softmax_scale=0.3, return_lse=True,
                                         topk_indices=topk.long())
    gpu.check_forward(q, k, v, topk, 32, True, out, lse, scale=0.3, label="strided")
    again = A.moba_attention_cuda(q, k, v, 32, 4, causal=True, softmax_scale=0.3, topk_indices=topk)
    assert torch.equal(out, again)


@pytest.mark.gpu
def test_random_routing_lists(gpu):
    # Uniformly random distinct blocks per (query, head): long, scattered lists in every key block.
    q, k, v = gpu.inputs(1, 16384, 4, 4, 128, torch.bfloat16, seed=5)
    n_blocks = 16384 // 64
    topk = torch.argsort(torch.rand(1, 16384, 4, n_blocks, device="cuda"), dim=-1)[..., :8].to(torch.int32)
    out, lse = A.moba_attention_cuda(q, k, v, 64, 8, causal=False, return_lse=True, topk_indices=topk)
    gpu.check_forward(q, k, v, topk, 64, False, out, lse, label="random routing")


@pytest.mark.gpu
def test_end_to_end_through_the_public_api(gpu):
    import mobalab.kernels as K

    q, k, v = gpu.inputs(2, 3000, 8, 2, 128, torch.bfloat16, seed=13)
    out, lse = K.moba_attention(q, k, v, 128, 4, causal=True, return_lse=True)
    topk = moba_topk_cuda(q, k, 128, 4, causal=True)  # what the public API routes with
    again = A.moba_attention_cuda(q, k, v, 128, 4, causal=True, topk_indices=topk)
    assert torch.equal(out, again)  # routing + attention == attention with the router's indices
    gpu.check_forward(q, k, v, topk, 128, True, out, lse, label="end to end")
    # and the router agrees with the reference routing on (nearly) every row
    ref_topk = gpu.routing(q, k, 128, 4, True)
    agree = (topk.sort(-1).values == ref_topk.sort(-1).values).all(-1).float().mean().item()
    assert agree >= 0.99


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["auto", "streaming"])
def test_concentrated_routing(variant, gpu, poisoned_empty):
    # Every query picks block 0 (and its own block): one very long list, many tiles/units of one segment.
    q, k, v = gpu.inputs(1, 20000, 4, 2, 128, torch.bfloat16, seed=17)
    t = torch.arange(20000, device="cuda")
    own = (t // 128).view(1, -1, 1).expand(1, 20000, 4)
    first = torch.where(own > 0, 0, -1)
    topk = torch.stack([own, first, torch.full_like(own, -1)], dim=-1).to(torch.int32)
    with poisoned_empty():
        out, lse = A.moba_attention_cuda(q, k, v, 128, 3, causal=True, return_lse=True, topk_indices=topk,
                                         variant=variant)
    gpu.check_forward(q, k, v, topk, 128, True, out, lse, label="concentrated")


# ---------------------------------------------------------------------------------------------------
# the fp32-partial fallback (MOBALAB_ATTN_PARTIAL=fp32): same contract, a separately compiled module


def _both_formats(monkeypatch, q, k, v, topk, block, top_k, causal, variant, poisoned_empty=None):
    """(out, lse) with 16-bit partials, then with fp32 partials, and the plans of the fp32 run."""
    def run():
        with poisoned_empty() if poisoned_empty is not None else contextlib.nullcontext():
            return A.moba_attention_cuda(q, k, v, block, top_k, causal=causal, return_lse=True, topk_indices=topk,
                                         variant=variant)

    out16, lse16 = run()
    monkeypatch.setenv(A.PARTIAL_ENV, "fp32")
    plans, real = [], A.launch
    monkeypatch.setattr(A, "launch", lambda plan: (plans.append(plan), real(plan))[-1])
    out32, lse32 = run()
    monkeypatch.setattr(A, "launch", real)
    monkeypatch.delenv(A.PARTIAL_ENV)
    return out16, lse16, out32, lse32, plans


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, dim, block, top_k, causal, seqlen, ratio, variant", [
    (torch.bfloat16, 128, 128, 8, True, 4097, 1, "auto"),  # resident, V = 4 per merge lane
    (torch.float16, 64, 512, 4, False, 3000, 4, "auto"),  # streaming, V = 2 per lane
    (torch.bfloat16, 256, 64, 3, True, 2000, 8, "auto"),  # 8-warp tiles, V = 8 (one 16-byte load)
])  # few: each head dim's fallback is one more NVRTC module to build on the device
def test_fp32_partial_fallback(dtype, dim, block, top_k, causal, seqlen, ratio, variant, gpu, monkeypatch,
                               poisoned_empty):
    heads, kv_heads = gpu.gqa[ratio]
    q, k, v = gpu.inputs(2, seqlen, heads, kv_heads, dim, dtype, seed=dim + block + top_k)
    topk = gpu.routing(q, k, block, top_k, causal)
    out16, lse16, out32, lse32, plans = _both_formats(monkeypatch, q, k, v, topk, block, top_k, causal, variant,
                                                      poisoned_empty)
    # the fp32 run launched the fallback module's tile and merge kernels (those "auto" takes on this device)
    names = set(A.kernel_names(dtype, dim, block, A.tile_variant("test", variant, q, k, block, top_k)))
    assert {p.defines for p in plans if p.kernel in names} == {A.partial_defines("fp32")}
    assert {p.kernel for p in plans} >= names
    label = f"{dtype} d{dim} B{block} k{top_k}"
    err16, low = gpu.check_forward(q, k, v, topk, block, causal, out16, lse16, label=label + " 16-bit")
    err32, _ = gpu.check_forward(q, k, v, topk, block, causal, out32, lse32, label=label + " fp32")
    print(f"\n{label}: max error 16-bit partials {err16:.3e}, fp32 partials {err32:.3e}, torch {low:.3e}")
    # rounding o to the input dtype moves each partial by <= half an ulp: outputs agree within a few ulps
    tol = dict(atol=2e-2, rtol=1.6e-2) if dtype == torch.bfloat16 else dict(atol=3e-3, rtol=2e-3)
    torch.testing.assert_close(out16.float(), out32.float(), **tol)
    torch.testing.assert_close(lse16, lse32, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["auto", "streaming"])
def test_lse_does_not_depend_on_the_partial_format(variant, gpu, monkeypatch):
    q, k, v = gpu.inputs(2, 4097, 8, 2, 128, torch.bfloat16, seed=23)
    topk = gpu.routing(q, k, 128, 8, True)
    out16, lse16, out32, lse32, _ = _both_formats(monkeypatch, q, k, v, topk, 128, 8, True, variant)
    # m and l are fp32 under both formats and computed by the same instructions: lse to fp32 rounding
    torch.testing.assert_close(lse16, lse32, rtol=2.5e-7, atol=1e-6)
    # while out does see the format (the environment variable took effect)
    assert not torch.equal(out16, out32)


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [64, 128, 256])
def test_merge_into_fp32_stores_and_folds(dim, gpu):
    """``into``: the merge stores fp32 (out, lse) whose rounding to the input dtype is the usual output bit for
    bit; ``fold`` combines with what the buffers hold by log-sum-exp, equal to the torch fold of two separate
    calls (here over two different routings, and rows where one side attends nothing)."""
    import math

    q, k, v = gpu.inputs(1, 3000, 8, 2, dim, torch.bfloat16, seed=dim)
    topk = moba_topk_cuda(q, k, 64, 4, causal=True)
    out, lse = A.moba_attention_cuda(q, k, v, 64, 4, causal=True, return_lse=True, topk_indices=topk)
    acc_out = torch.full(q.shape, math.nan, dtype=torch.float32, device=q.device)
    acc_lse = torch.full(q.shape[:3], math.nan, dtype=torch.float32, device=q.device)
    got = A.moba_attention_cuda(q, k, v, 64, 4, causal=True, topk_indices=topk, into=(acc_out, acc_lse))
    assert got[0] is acc_out and got[1] is acc_lse
    assert torch.equal(acc_out.to(q.dtype), out) and torch.equal(acc_lse, lse)
    # a second routing: slot 0 only, and no slot at all for every third query
    other = topk.clone()
    other[..., 1:] = -1
    other[:, ::3] = -1
    out2, lse2 = A.moba_attention_cuda(q, k, v, 64, 4, causal=True, return_lse=True, topk_indices=other)
    A.moba_attention_cuda(q, k, v, 64, 4, causal=True, topk_indices=other, into=(acc_out, acc_lse), fold=True)
    total = torch.logaddexp(lse, lse2)
    want = (torch.exp(lse - total).unsqueeze(-1) * out.float() + torch.exp(lse2 - total).unsqueeze(-1) * out2.float())
    torch.testing.assert_close(acc_lse, total, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(acc_out, want, atol=1e-2, rtol=1e-2)
    assert torch.equal(acc_out[:, ::3].to(q.dtype), out[:, ::3])  # weights exactly 1 and 0: the stored rows stay
    # nothing on both sides stays (0, -inf)
    none = torch.full_like(topk, -1)
    acc_out.zero_()
    acc_lse.fill_(-math.inf)
    A.moba_attention_cuda(q, k, v, 64, 4, causal=True, topk_indices=none, into=(acc_out, acc_lse), fold=True)
    assert not acc_out.any() and (acc_lse == -math.inf).all()
