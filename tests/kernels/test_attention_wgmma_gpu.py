"""The wgmma forward tile kernel (variant "wgmma", cuda/attention_wgmma.cu: head dim 128, B 64 and 128, sm_90)
against the fp32 oracle with the same routing, under the criterion of test_attention_gpu.py (conftest.GpuOracle:
max|out - ref| <= 2 max|out_torch_lowprec - ref| + 1e-4, lse within 2e-3 + 1e-3 |lse|), on the forward grid's
cases restricted to the shapes the kernel serves. Outputs and scratch are poisoned (NaN) before each launch, so
a row or column the kernel does not write fails. The transposed-B operand it relies on is probed on its own in
test_wgmma_probe_gpu.py (the "regmn" cases): when those fail, these fail too.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from mobalab.kernels import _cuda_attention as A

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # pragma: no cover - depends on the machine
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("cupy")
if torch.cuda.get_device_capability() != (9, 0):  # pragma: no cover - wgmma is sm_90a only
    pytest.skip("wgmma needs an sm_90 (Hopper) GPU", allow_module_level=True)

FLOOR = 1e-4
SAMPLE_ABOVE = 20000


@pytest.fixture(autouse=True)
def _default_partial_format(monkeypatch):
    monkeypatch.delenv(A.PARTIAL_ENV, raising=False)
    monkeypatch.delenv(A.VARIANT_ENV, raising=False)


def _check(gpu, q, k, v, topk, block, causal, out, lse, label=""):
    seqlen = q.shape[1]
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all(), f"{label}: non-finite output (unwritten or NaN)"
    assert torch.isfinite(lse).all(), f"{label}: non-finite lse"
    if seqlen > SAMPLE_ABOVE:
        g = torch.Generator(device="cuda").manual_seed(seqlen)
        rows = torch.cat([torch.arange(4, device="cuda"), torch.arange(seqlen - 4, seqlen, device="cuda"),
                          torch.randint(0, seqlen, (504,), device="cuda", generator=g)])
    else:
        rows = torch.arange(seqlen, device="cuda")
    ref, ref_lse = gpu.oracle(q, k, v, topk, block, causal, None)
    ref, ref_lse = ref[:, rows], ref_lse[:, rows]
    low = gpu.lowp_rows(q, k, v, topk, block, causal, None, rows)
    errs = gpu.assert_within_torch_error(out[:, rows], ref, low, factor=2, floor=FLOOR, label=label)
    torch.testing.assert_close(lse[:, rows], ref_lse, atol=2e-3, rtol=1e-3)
    return errs


def _run(q, k, v, block, top_k, causal, topk, **kw):
    return A.moba_attention_cuda(q, k, v, block, top_k, causal=causal, return_lse=True, topk_indices=topk,
                                 variant="wgmma", **kw)


def test_wgmma_matches_oracle(attention_case, gpu, poisoned_empty):
    case = attention_case
    if not A.wgmma_supports(case["dim"], case["block"]):
        pytest.skip("no wgmma kernel for this shape (head dim 128, B 64 or 128 only)")
    heads, kv_heads = gpu.gqa[case["ratio"]]
    q, k, v = gpu.inputs(case["batch"], case["seqlen"], heads, kv_heads, case["dim"], case["dtype"],
                         seed=zlib.crc32(gpu.case_id(case).encode()))
    topk = gpu.routing(q, k, case["block"], case["top_k"], case["causal"])
    with poisoned_empty():
        out, lse = _run(q, k, v, case["block"], case["top_k"], case["causal"], topk)
    _check(gpu, q, k, v, topk, case["block"], case["causal"], out, lse, label="wgmma " + gpu.case_id(case))


@pytest.mark.parametrize("block", A.WGMMA_BLOCK_SIZES)
def test_wgmma_concentrated_routing(block, gpu, poisoned_empty):
    # every query picks block 0 and its own block: one long list of many 4-tile units, a partial last tile
    n = 20000
    q, k, v = gpu.inputs(1, n, 4, 2, 128, torch.bfloat16, seed=17 + block)
    t = torch.arange(n, device="cuda")
    own = (t // block).view(1, -1, 1).expand(1, n, 4)
    first = torch.where(own > 0, 0, -1)
    topk = torch.stack([own, first, torch.full_like(own, -1)], dim=-1).to(torch.int32)
    with poisoned_empty():
        out, lse = _run(q, k, v, block, 3, True, topk)
    _check(gpu, q, k, v, topk, block, True, out, lse, label=f"wgmma concentrated B{block}")


@pytest.mark.parametrize("causal", [True, False])
def test_wgmma_chunked_and_deterministic(causal, gpu, poisoned_empty):
    """Many chunks give the same bits as one; two runs are bit-identical."""
    q, k, v = gpu.inputs(2, 4097, 8, 2, 128, torch.float16, seed=7)
    topk = gpu.routing(q, k, 64, 8, causal)
    whole, whole_lse = _run(q, k, v, 64, 8, causal, topk)
    again, again_lse = _run(q, k, v, 64, 8, causal, topk)
    assert torch.equal(whole, again) and torch.equal(whole_lse, again_lse)
    with poisoned_empty():
        out, lse = _run(q, k, v, 64, 8, causal, topk, scratch_budget_bytes=2 << 20)
    _check(gpu, q, k, v, topk, 64, causal, out, lse, label="wgmma chunked")
    assert torch.equal(out, whole)


def test_wgmma_fp32_partials(gpu, monkeypatch, poisoned_empty):
    """The fp32-partial module of the wgmma kernel (-DMOBA_PARTIAL_FP32=1) meets the criterion too, and lse
    does not depend on the partial format."""
    q, k, v = gpu.inputs(2, 4097, 4, 4, 128, torch.bfloat16, seed=128 + 128 + 8)
    topk = gpu.routing(q, k, 128, 8, True)
    out16, lse16 = _run(q, k, v, 128, 8, True, topk)
    monkeypatch.setenv(A.PARTIAL_ENV, "fp32")
    with poisoned_empty():
        out32, lse32 = _run(q, k, v, 128, 8, True, topk)
    _check(gpu, q, k, v, topk, 128, True, out32, lse32, label="wgmma fp32 partials")
    assert torch.equal(lse16, lse32)


def test_wgmma_agrees_with_the_mma_kernel(gpu):
    """Same routing, same partial format: the wgmma and the mma.sync resident kernels agree within the
    rounding of P (one 128-key softmax step against two 64-key steps), at the benchmark shape."""
    q, k, v = gpu.inputs(1, 8192, 8, 8, 128, torch.bfloat16, seed=3)
    topk = gpu.routing(q, k, 128, 8, True)
    wg, wg_lse = _run(q, k, v, 128, 8, True, topk)
    mma, mma_lse = A.moba_attention_cuda(q, k, v, 128, 8, causal=True, return_lse=True, topk_indices=topk,
                                         variant="resident")
    torch.testing.assert_close(wg_lse, mma_lse, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(wg.float(), mma.float(), atol=2e-2, rtol=2e-2)
