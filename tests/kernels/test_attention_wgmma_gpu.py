"""The wgmma forward tile kernels (variants "wgmma" and the warp-specialised, persistent "wgmma-ws",
cuda/attention_wgmma.cu: head dim 128, B 32, 64 and 128 (wgmma-ws: 64 and 128), sm_90) against the fp32 oracle with
the same routing, under the criterion of test_attention_gpu.py (conftest.GpuOracle: max|out - ref| <= 2
max|out_torch_lowprec - ref| + 1e-4, lse within 2e-3 + 1e-3 |lse|), on the forward grid's cases restricted to the
shapes the kernels serve. Outputs and scratch are poisoned (NaN) before each launch, so a row or column a kernel
does not write fails. The transposed-B operand they rely on is probed on its own in test_wgmma_probe_gpu.py (the
"regmn" cases): when those fail, these fail too. wgmma-ws runs the same tile arithmetic (wg_tile) behind a producer
/ consumer mbarrier pipeline, so it is also checked against wgmma on units of every fill (one row, a consumer left
idle, partial tiles) and across many units per persistent CTA (the concentrated routing, the 64K case).
"""

from __future__ import annotations

import sys
import zlib
from pathlib import Path

import pytest
import torch

from mobalab.kernels import _cuda_attention as A

pytestmark = pytest.mark.gpu

sys.path.insert(0, str(Path(__file__).parent))
from _hopper import hopper_missing  # noqa: E402

if reason := hopper_missing():  # pragma: no cover - depends on the machine
    pytest.skip(reason, allow_module_level=True)

VARIANTS = ("wgmma", "wgmma-ws")
VARIANT_IDS = ("wg", "ws")  # `-k ws` / `-k "not ws"` select one kernel's tests (scripts/gpu_check.sh)


@pytest.fixture(autouse=True)
def _default_partial_format(monkeypatch):
    monkeypatch.delenv(A.PARTIAL_ENV, raising=False)
    monkeypatch.delenv(A.VARIANT_ENV, raising=False)


def _run(q, k, v, block, top_k, causal, topk, variant="wgmma", **kw):
    return A.moba_attention_cuda(q, k, v, block, top_k, causal=causal, return_lse=True, topk_indices=topk,
                                 variant=variant, **kw)


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_wgmma_matches_oracle(attention_case, variant, gpu, poisoned_empty):
    case = attention_case
    if not A.wgmma_supports(case["dim"], case["block"], variant):
        pytest.skip(f"no {variant} kernel for this shape (head dim 128, B in {A.wgmma_block_sizes(variant)} only)")
    heads, kv_heads = gpu.gqa[case["ratio"]]
    q, k, v = gpu.inputs(case["batch"], case["seqlen"], heads, kv_heads, case["dim"], case["dtype"],
                         seed=zlib.crc32(gpu.case_id(case).encode()))
    topk = gpu.routing(q, k, case["block"], case["top_k"], case["causal"])
    with poisoned_empty():
        out, lse = _run(q, k, v, case["block"], case["top_k"], case["causal"], topk, variant)
    gpu.check_forward(q, k, v, topk, case["block"], case["causal"], out, lse, label=f"{variant} " + gpu.case_id(case))


_VARIANT_BLOCKS = [(v, b) for v in VARIANTS for b in A.wgmma_block_sizes(v)]


@pytest.mark.parametrize("variant,block", _VARIANT_BLOCKS,
                         ids=[f"{VARIANT_IDS[VARIANTS.index(v)]}-{b}" for v, b in _VARIANT_BLOCKS])
def test_wgmma_concentrated_routing(block, variant, gpu, poisoned_empty):
    # every query picks block 0 and its own block: one long list of many 4-tile units, a partial last tile
    n = 20000
    q, k, v = gpu.inputs(1, n, 4, 2, 128, torch.bfloat16, seed=17 + block)
    t = torch.arange(n, device="cuda")
    own = (t // block).view(1, -1, 1).expand(1, n, 4)
    first = torch.where(own > 0, 0, -1)
    topk = torch.stack([own, first, torch.full_like(own, -1)], dim=-1).to(torch.int32)
    with poisoned_empty():
        out, lse = _run(q, k, v, block, 3, True, topk, variant)
    gpu.check_forward(q, k, v, topk, block, True, out, lse, label=f"{variant} concentrated B{block}")


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("causal", [True, False])
def test_wgmma_chunked_and_deterministic(causal, variant, gpu, poisoned_empty):
    """Many chunks give the same bits as one; two runs are bit-identical."""
    q, k, v = gpu.inputs(2, 4097, 8, 2, 128, torch.float16, seed=7)
    topk = gpu.routing(q, k, 64, 8, causal)
    whole, whole_lse = _run(q, k, v, 64, 8, causal, topk, variant)
    again, again_lse = _run(q, k, v, 64, 8, causal, topk, variant)
    assert torch.equal(whole, again) and torch.equal(whole_lse, again_lse)
    with poisoned_empty():
        out, lse = _run(q, k, v, 64, 8, causal, topk, variant, scratch_budget_bytes=2 << 20)
    gpu.check_forward(q, k, v, topk, 64, causal, out, lse, label=f"{variant} chunked")
    assert torch.equal(out, whole)


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_wgmma_fp32_partials(variant, gpu, monkeypatch, poisoned_empty):
    """The fp32-partial module of the wgmma kernels (-DMOBA_PARTIAL_FP32=1) meets the criterion too, and lse
    does not depend on the partial format."""
    q, k, v = gpu.inputs(2, 4097, 4, 4, 128, torch.bfloat16, seed=128 + 128 + 8)
    topk = gpu.routing(q, k, 128, 8, True)
    out16, lse16 = _run(q, k, v, 128, 8, True, topk, variant)
    monkeypatch.setenv(A.PARTIAL_ENV, "fp32")
    with poisoned_empty():
        out32, lse32 = _run(q, k, v, 128, 8, True, topk, variant)
    gpu.check_forward(q, k, v, topk, 128, True, out32, lse32, label=f"{variant} fp32 partials")
    assert torch.equal(lse16, lse32)


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("dtype,scale", [(torch.bfloat16, 0.3), (torch.bfloat16, -0.05), (torch.float16, -0.05),
                                         (torch.float16, 0.0)])
def test_wgmma_softmax_scales(variant, dtype, scale, gpu, poisoned_empty):
    """A large, a negative and a zero softmax scale: the wgmma tile folds a positive scale into the exponent and
    takes another branch for the rest (scaling S first); bf16 partials are unnormalised, fp16 ones normalised."""
    q, k, v = gpu.inputs(1, 1500, 4, 2, 128, dtype, seed=int(1000 * abs(scale)) + (scale < 0))
    topk = gpu.routing(q, k, 64, 4, True)
    with poisoned_empty():
        out, lse = _run(q, k, v, 64, 4, True, topk, variant, softmax_scale=scale)
    gpu.check_forward(q, k, v, topk, 64, True, out, lse, scale, label=f"{variant} scale {scale}")


# Rows per (kv head, key block) list, cycled over the blocks: a unit of one row, units that leave the second
# consumer warpgroup idle (<= 64 rows) or give it a partial tile, 3-tile units (consumer 1 without its second
# tile), full 4-tile units and lists that spill one row into a further unit.
UNIT_FILLS = (1, 63, 64, 65, 127, 128, 129, 191, 192, 193, 255, 256, 257, 320, 0, 2)


@pytest.mark.parametrize("block", A.WS_BLOCK_SIZES)
def test_wgmma_ws_unit_fills(block, gpu, poisoned_empty):
    """Hand-made routing (not causal: any query may pick any block) that gives the key blocks lists of UNIT_FILLS
    rows, so that units have every fill the two consumers split in different ways; wgmma-ws meets the oracle and
    agrees with wgmma, which computes each tile with the same MMAs (wgmma folds the scale into the exponent,
    wgmma-ws scales S first: the two differ by rounding)."""
    n, heads = 8192, 2
    q, k, v = gpu.inputs(1, n, heads, heads, 128, torch.bfloat16, seed=41 + block)  # one list per head
    n_blocks = n // block
    owner = []
    for j in range(n_blocks):
        owner += [j] * UNIT_FILLS[j % len(UNIT_FILLS)]
    owner = (owner + [n_blocks - 1] * n)[:n]  # any queries left over pick the last block
    first = torch.tensor(owner, device="cuda", dtype=torch.int32)
    # head 1 sees the fills shifted by one block; slot 1 is unused (-1) for every query
    pick = torch.stack([first, (first + 1) % n_blocks], dim=1).view(1, n, heads, 1)
    topk = torch.cat([pick, torch.full_like(pick, -1)], dim=-1)
    with poisoned_empty():
        out, lse = _run(q, k, v, block, 2, False, topk, "wgmma-ws")
    gpu.check_forward(q, k, v, topk, block, False, out, lse, label=f"wgmma-ws unit fills B{block}")
    ref, ref_lse = _run(q, k, v, block, 2, False, topk, "wgmma")
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_wgmma_agrees_with_the_mma_kernel(variant, gpu):
    """Same routing, same partial format: the wgmma and the mma.sync resident kernels agree within the
    rounding of P (one 128-key softmax step against two 64-key steps), at the benchmark shape."""
    q, k, v = gpu.inputs(1, 8192, 8, 8, 128, torch.bfloat16, seed=3)
    topk = gpu.routing(q, k, 128, 8, True)
    wg, wg_lse = _run(q, k, v, 128, 8, True, topk, variant)
    mma, mma_lse = A.moba_attention_cuda(q, k, v, 128, 8, causal=True, return_lse=True, topk_indices=topk,
                                         variant="resident")
    torch.testing.assert_close(wg_lse, mma_lse, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(wg.float(), mma.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("top_k, heads, kv_heads", [(8, 2, 2), (9, 2, 2), (16, 4, 4), (2, 8, 2), (3, 8, 2)])
def test_auto_at_b32_follows_top_k(top_k, heads, kv_heads, gpu, monkeypatch, poisoned_empty):
    """At B 32 "auto" launches the resident mma.sync tile kernel below top_k G = 9 (G query heads per kv head) and
    the wgmma kernel from there (WGMMA_AUTO_MIN_KEYS), and either meets the oracle; a length that is not a multiple
    of B."""
    q, k, v = gpu.inputs(2, 3001, heads, kv_heads, 128, torch.bfloat16, seed=top_k)
    topk = gpu.routing(q, k, 32, top_k, True)
    plans, real = [], A.launch
    monkeypatch.setattr(A, "launch", lambda plan: (plans.append(plan), real(plan))[-1])
    with poisoned_empty():
        out, lse = _run(q, k, v, 32, top_k, True, topk, variant="auto")
    group = heads // kv_heads
    expected = "wgmma" if top_k * 32 * group >= A.WGMMA_AUTO_MIN_KEYS[(128, 32)] else "resident"
    assert expected == ("wgmma" if top_k * group >= 9 else "resident")  # the rule as the docstrings state it
    tile = set(A.kernel_names(torch.bfloat16, 128, 32, expected))
    assert tile <= {p.kernel for p in plans}, f"k {top_k} G {group}: launched {sorted({p.kernel for p in plans})}"
    gpu.check_forward(q, k, v, topk, 32, True, out, lse, label=f"auto B32 k{top_k} G{group}")
