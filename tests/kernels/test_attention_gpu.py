"""The CUDA MoBA attention forward against the fp32 oracle with the same routing (run on the GPU machine).

Criterion (FlashAttention's): max|out - ref| <= 2 * max|out_torch_lowprec - ref| + a tiny floor, where ref
is the fp32 computation from the same bf16/fp16 inputs and out_torch_lowprec the same computation done as
plain torch does it in the input dtype. Routing indices are computed once and passed to both, so routing
differences cannot pollute attention errors. Outputs and scratch are poisoned (NaN) before each launch.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from mobalab.kernels import attention as A

FLOOR = 1e-4
SAMPLE_ABOVE = 20000  # longer sequences are checked on a sample of query positions (all heads, all batches)


def _inputs(batch, seqlen, heads, kv_heads, dim, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(batch, seqlen, heads, dim, device="cuda", dtype=torch.float32, generator=g).to(dtype)
    k = torch.randn(batch, seqlen, kv_heads, dim, device="cuda", dtype=torch.float32, generator=g).to(dtype)
    v = torch.randn(batch, seqlen, kv_heads, dim, device="cuda", dtype=torch.float32, generator=g).to(dtype)
    return q, k, v


def _routing(q, k, block, top_k, causal):
    from mobalab.kernels.reference import moba_topk

    return moba_topk(q, k, block, top_k, causal=causal)


def _check(q, k, v, topk, block, top_k, causal, out, lse, scale=None, label=""):
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
    ref, ref_lse = A.indexed_attention_torch(q, k, v, topk, block, causal, scale, query_positions=rows)
    low, _ = A.indexed_attention_torch(q, k, v, topk, block, causal, scale, query_positions=rows,
                                       low_precision=True)
    err = (out[:, rows].float() - ref).abs().max().item()
    err_low = (low - ref).abs().max().item()
    assert err <= 2 * err_low + FLOOR, f"{label}: kernel error {err:.3e} vs torch low precision {err_low:.3e}"
    torch.testing.assert_close(lse[:, rows], ref_lse, atol=2e-3, rtol=1e-3)
    return err, err_low


# ---------------------------------------------------------------------------------------------------
# the case grid: every head dim, block size, dtype; causal and not; GQA 1/4/8; awkward seqlens; top_k 1..64

_GQA = {1: (2, 2), 4: (4, 1), 8: (8, 1)}  # ratio -> (heads, kv_heads)
_CASES = []
_i = 0
for _block in A.SUPPORTED_BLOCK_SIZES:
    for _dim in A.SUPPORTED_HEAD_DIMS:
        for _n in ([_block - 1, _block + 1, 4097] if _i % 2 == 0 else [_block, 1000, 4097]):
            _ratio = (1, 4, 8)[_i % 3]
            _CASES.append(dict(
                dtype=(torch.bfloat16, torch.float16)[_i % 2], dim=_dim, block=_block, causal=(_i % 4) < 2,
                ratio=_ratio, seqlen=_n, top_k=(1, 2, 8, 64)[(_i // 2) % 4], batch=2 if _n < 2000 else 1))
            _i += 1
# seqlen 1, both modes and head dims
for _dim in A.SUPPORTED_HEAD_DIMS:
    for _causal in (True, False):
        _CASES.append(dict(dtype=torch.bfloat16, dim=_dim, block=64, causal=_causal, ratio=4, seqlen=1,
                           top_k=8, batch=3))
# k >= n (dense) and long context
_CASES += [
    dict(dtype=torch.bfloat16, dim=128, block=128, causal=True, ratio=1, seqlen=300, top_k=8, batch=2),
    dict(dtype=torch.float16, dim=64, block=128, causal=False, ratio=4, seqlen=300, top_k=8, batch=2),
    dict(dtype=torch.bfloat16, dim=128, block=128, causal=True, ratio=4, seqlen=65536, top_k=8, batch=1),
    dict(dtype=torch.float16, dim=64, block=32, causal=False, ratio=1, seqlen=65536, top_k=8, batch=1),
    dict(dtype=torch.bfloat16, dim=64, block=16, causal=True, ratio=8, seqlen=65536, top_k=64, batch=1),
]


def _case_id(c):
    dt = "bf16" if c["dtype"] == torch.bfloat16 else "f16"
    mode = "causal" if c["causal"] else "full"
    return (f"{dt}-d{c['dim']}-B{c['block']}-{mode}-g{c['ratio']}-N{c['seqlen']}"
            f"-k{c['top_k']}-b{c['batch']}")


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["auto", "streaming"])
@pytest.mark.parametrize("case", _CASES, ids=[_case_id(c) for c in _CASES])
def test_attention_matches_oracle(case, variant, monkeypatch, poisoned_empty):
    if variant == "streaming" and not A.resident(case["dim"], case["block"], "auto"):
        pytest.skip("auto already runs the streaming kernel here")
    monkeypatch.setattr(A, "FWD_VARIANT", variant)
    heads, kv_heads = _GQA[case["ratio"]]
    q, k, v = _inputs(case["batch"], case["seqlen"], heads, kv_heads, case["dim"], case["dtype"],
                      seed=zlib.crc32(_case_id(case).encode()))
    topk = _routing(q, k, case["block"], case["top_k"], case["causal"])
    with poisoned_empty():
        out, lse = A.moba_attention_cuda(q, k, v, case["block"], case["top_k"], causal=case["causal"],
                                         return_lse=True, topk_indices=topk)
    _check(q, k, v, topk, case["block"], case["top_k"], case["causal"], out, lse, label=_case_id(case))


def test_case_grid_covers_the_contract():
    assert len(_CASES) >= 40
    assert {c["dim"] for c in _CASES} == set(A.SUPPORTED_HEAD_DIMS)
    assert {c["block"] for c in _CASES} == set(A.SUPPORTED_BLOCK_SIZES)
    assert {c["dtype"] for c in _CASES} == set(A.SUPPORTED_DTYPES)
    assert {c["ratio"] for c in _CASES} == {1, 4, 8} and {c["causal"] for c in _CASES} == {True, False}
    assert {1, 2, 8, 64} <= {c["top_k"] for c in _CASES}
    assert {1, 1000, 4097, 65536} <= {c["seqlen"] for c in _CASES}
    for b in A.SUPPORTED_BLOCK_SIZES:
        assert {b - 1, b, b + 1} & {c["seqlen"] for c in _CASES if c["block"] == b}


# ---------------------------------------------------------------------------------------------------
# chunking, determinism, layout, scale, routing given or not


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["auto", "streaming"])
@pytest.mark.parametrize("budget, seqlen, heads, kv_heads, dim, causal", [
    (2 << 20, 4097, 8, 2, 128, True),  # query ranges split into many chunks
    (7 << 20, 1000, 8, 8, 64, False),  # kv groups split across chunks
])
def test_many_chunks_match_one(budget, seqlen, heads, kv_heads, dim, causal, variant, monkeypatch, poisoned_empty):
    monkeypatch.setattr(A, "FWD_VARIANT", variant)
    q, k, v = _inputs(2, seqlen, heads, kv_heads, dim, torch.bfloat16, seed=7)
    topk = _routing(q, k, 64, 8, causal)
    chunks = A.plan_chunks(2, seqlen, heads, kv_heads, dim, 8, budget)
    assert len(chunks) > 2 * 2
    whole = A.moba_attention_cuda(q, k, v, 64, 8, causal=causal, topk_indices=topk)
    monkeypatch.setattr(A, "SCRATCH_BUDGET_BYTES", budget)
    with poisoned_empty():
        out, lse = A.moba_attention_cuda(q, k, v, 64, 8, causal=causal, return_lse=True, topk_indices=topk)
    _check(q, k, v, topk, 64, 8, causal, out, lse, label="chunked")
    # partials of one (query, slot) do not depend on which other rows share their tiles: same bits
    assert torch.equal(out, whole)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["auto", "streaming"])
@pytest.mark.parametrize("causal", [True, False])
def test_two_runs_are_bit_identical(causal, variant, monkeypatch):
    monkeypatch.setattr(A, "FWD_VARIANT", variant)
    q, k, v = _inputs(2, 8192, 8, 2, 128, torch.bfloat16, seed=11)
    topk = _routing(q, k, 128, 8, causal)
    out1, lse1 = A.moba_attention_cuda(q, k, v, 128, 8, causal=causal, return_lse=True, topk_indices=topk)
    out2, lse2 = A.moba_attention_cuda(q, k, v, 128, 8, causal=causal, return_lse=True, topk_indices=topk)
    assert torch.equal(out1, out2) and torch.equal(lse1, lse2)


@pytest.mark.gpu
def test_non_contiguous_inputs_and_custom_scale(poisoned_empty):
    q, k, v = _inputs(2, 777, 4, 2, 64, torch.float16, seed=3)
    # (b, h, N, d) storage viewed as (b, N, h, d): strided, must be read correctly
    qt, kt, vt = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    assert not qt.is_contiguous()
    topk = _routing(q, k, 32, 4, True)
    with poisoned_empty():
        out, lse = A.moba_attention_cuda(qt, kt, vt, 32, 4, causal=True, softmax_scale=0.3, return_lse=True,
                                         topk_indices=topk.long())
    _check(q, k, v, topk, 32, 4, True, out, lse, scale=0.3, label="strided")
    again = A.moba_attention_cuda(q, k, v, 32, 4, causal=True, softmax_scale=0.3, topk_indices=topk)
    assert torch.equal(out, again)


@pytest.mark.gpu
def test_random_routing_lists():
    # Uniformly random distinct blocks per (query, head): long, scattered lists in every key block.
    q, k, v = _inputs(1, 16384, 4, 4, 128, torch.bfloat16, seed=5)
    n_blocks = 16384 // 64
    topk = torch.argsort(torch.rand(1, 16384, 4, n_blocks, device="cuda"), dim=-1)[..., :8].to(torch.int32)
    out, lse = A.moba_attention_cuda(q, k, v, 64, 8, causal=False, return_lse=True, topk_indices=topk)
    _check(q, k, v, topk, 64, 8, False, out, lse, label="random routing")


@pytest.mark.gpu
def test_end_to_end_through_the_public_api():
    import mobalab.kernels as K

    q, k, v = _inputs(2, 3000, 8, 2, 128, torch.bfloat16, seed=13)
    out, lse = K.moba_attention(q, k, v, 128, 4, causal=True, return_lse=True)
    topk = A._route(q, k, 128, 4, True)  # what the public API routes with
    again = A.moba_attention_cuda(q, k, v, 128, 4, causal=True, topk_indices=topk)
    assert torch.equal(out, again)  # routing + attention == attention with the router's indices
    _check(q, k, v, topk, 128, 4, True, out, lse, label="end to end")
    # and the router agrees with the reference routing on (nearly) every row
    ref_topk = _routing(q, k, 128, 4, True)
    agree = (topk.sort(-1).values == ref_topk.sort(-1).values).all(-1).float().mean().item()
    assert agree >= 0.99


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["auto", "streaming"])
def test_concentrated_routing(variant, monkeypatch, poisoned_empty):
    # Every query picks block 0 (and its own block): one very long list, many tiles/units of one segment.
    monkeypatch.setattr(A, "FWD_VARIANT", variant)
    q, k, v = _inputs(1, 20000, 4, 2, 128, torch.bfloat16, seed=17)
    t = torch.arange(20000, device="cuda")
    own = (t // 128).view(1, -1, 1).expand(1, 20000, 4)
    first = torch.where(own > 0, 0, -1)
    topk = torch.stack([own, first, torch.full_like(own, -1)], dim=-1).to(torch.int32)
    with poisoned_empty():
        out, lse = A.moba_attention_cuda(q, k, v, 128, 3, causal=True, return_lse=True, topk_indices=topk)
    _check(q, k, v, topk, 128, 3, True, out, lse, label="concentrated")
