"""The CUDA MoBA backward against autograd through the fp32 torch oracle with the same routing (GPU machine).

Criterion (FlashAttention's for gradients): max|g - g_ref| <= 3 * max|g_torch_lowprec - g_ref| + floor, where
g_ref is autograd through the fp32 computation from the same bf16/fp16 inputs and g_torch_lowprec autograd
through the same computation done as plain torch does it in the input dtype
(a dense softmax masked to the routed tokens, :func:`_dense`). Routing is computed once and given to all of
them. Outputs and scratch are poisoned (NaN) before the backward launches.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from mobalab.kernels import attention as A
from mobalab.kernels import autograd as G

_GQA = {1: (2, 2), 4: (4, 1), 8: (8, 1)}  # ratio -> (heads, kv_heads)


def _inputs(batch, seqlen, heads, kv_heads, dim, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda h: torch.randn(batch, seqlen, h, dim, device="cuda", generator=g).to(dtype)  # noqa: E731
    return mk(heads), mk(kv_heads), mk(kv_heads), mk(heads)  # q, k, v, dout


def _routing(q, k, block, top_k, causal):
    from mobalab.kernels.reference import moba_topk

    return moba_topk(q, k, block, top_k, causal=causal)


def _dense(q, k, v, topk, block, causal, scale, low_precision):
    """MoBA attention as a dense masked softmax over the routed tokens (mask from ``topk``); autograd-able.

    fp32 throughout, or (``low_precision``) as plain torch does it in the input dtype: scores and P @ V as
    input-dtype matmuls, softmax in fp32, probabilities rounded to the input dtype.
    """
    from mobalab.kernels.reference import _allowed_keys

    batch, seqlen, heads, dim = q.shape
    group = heads // k.shape[2]
    scale = dim ** -0.5 if scale is None else scale
    allowed = _allowed_keys(topk, 0, seqlen, block, math.ceil(seqlen / block), causal).permute(0, 2, 1, 3)
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    kh, vh = (x.repeat_interleave(group, dim=1) for x in (kh, vh))
    s = (qh @ kh.transpose(-1, -2)).float() * scale
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1))
    o = p.to(vh.dtype) @ vh
    return o.transpose(1, 2).float(), lse.transpose(1, 2)


def _oracle_grads(q, k, v, dout, topk, block, causal, scale=None, low_precision=False, dlse=None):
    if low_precision:
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    else:
        leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
    out, lse = _dense(*leaves, topk, block, causal, scale, low_precision)
    loss = (out * dout.float()).sum()
    if dlse is not None:
        loss = loss + (lse * dlse).sum()
    grads = torch.autograd.grad(loss, leaves)
    return [x.float() for x in grads]


def _check(grads, q, k, v, dout, topk, block, causal, scale=None, dlse=None, label=""):
    ref = _oracle_grads(q, k, v, dout, topk, block, causal, scale, dlse=dlse)
    low = _oracle_grads(q, k, v, dout, topk, block, causal, scale, low_precision=True, dlse=dlse)
    report = []
    for name, g, r, lo, x in zip("qkv", grads, ref, low, (q, k, v), strict=True):
        assert g.dtype == x.dtype and g.shape == x.shape, f"{label}: d{name} has {g.dtype} {tuple(g.shape)}"
        assert torch.isfinite(g).all(), f"{label}: non-finite d{name} (unwritten or NaN)"
        err = (g.float() - r).abs().max().item()
        err_low = (lo - r).abs().max().item()
        floor = 1e-4 * (1.0 + r.abs().max().item())
        report.append(f"d{name} {err:.2e}/{err_low:.2e}")
        assert err <= 3 * err_low + floor, f"{label}: d{name} error {err:.3e} vs torch low precision {err_low:.3e}"
    return report


# ---------------------------------------------------------------------------------------------------
# the case grid: every head dim, block size, dtype; causal and not; GQA 1/4/8; awkward seqlens; top_k 1..64

_CASES = []
_i = 0
for _block in A.SUPPORTED_BLOCK_SIZES:
    for _dim in A.SUPPORTED_HEAD_DIMS:
        for _n in ([_block - 1, _block + 1, 4097] if _i % 2 == 0 else [_block, 1000, 4097]):
            _CASES.append(dict(
                dtype=(torch.bfloat16, torch.float16)[_i % 2], dim=_dim, block=_block, causal=(_i % 4) < 2,
                ratio=(1, 4, 8)[_i % 3], seqlen=_n, top_k=(1, 2, 8, 64)[(_i // 2) % 4],
                batch=2 if _n < 2000 else 1, deterministic=(_i % 5) in (1, 3)))
            _i += 1
for _dim in A.SUPPORTED_HEAD_DIMS:
    for _causal in (True, False):
        _CASES.append(dict(dtype=torch.bfloat16, dim=_dim, block=64, causal=_causal, ratio=4, seqlen=1, top_k=8,
                           batch=3, deterministic=_causal))
_CASES += [  # k >= n (dense)
    dict(dtype=torch.bfloat16, dim=128, block=128, causal=True, ratio=1, seqlen=300, top_k=8, batch=2,
         deterministic=False),
    dict(dtype=torch.float16, dim=64, block=128, causal=False, ratio=4, seqlen=300, top_k=8, batch=2,
         deterministic=True),
]


def _case_id(c):
    dt = "bf16" if c["dtype"] == torch.bfloat16 else "f16"
    mode = "causal" if c["causal"] else "full"
    det = "-det" if c["deterministic"] else ""
    return f"{dt}-d{c['dim']}-B{c['block']}-{mode}-g{c['ratio']}-N{c['seqlen']}-k{c['top_k']}-b{c['batch']}{det}"


@pytest.mark.gpu
@pytest.mark.parametrize("case", _CASES, ids=[_case_id(c) for c in _CASES])
def test_gradients_match_oracle(case, poisoned_empty):
    heads, kv_heads = _GQA[case["ratio"]]
    q, k, v, dout = _inputs(case["batch"], case["seqlen"], heads, kv_heads, case["dim"], case["dtype"],
                            seed=zlib.crc32(_case_id(case).encode()))
    block, top_k, causal = case["block"], case["top_k"], case["causal"]
    topk = _routing(q, k, block, top_k, causal)
    out, lse = A.moba_attention_cuda(q, k, v, block, top_k, causal=causal, return_lse=True, topk_indices=topk)
    scale = 1.0 / math.sqrt(case["dim"])
    with poisoned_empty():
        grads = G.moba_attention_backward_cuda(dout, q, k, v, out, lse, topk, block, top_k, causal, scale,
                                               deterministic=case["deterministic"])
    report = _check(grads, q, k, v, dout, topk, block, causal, label=_case_id(case))
    print(_case_id(case), *report)


def test_case_grid_covers_the_contract():
    assert len(_CASES) >= 40
    assert {c["dim"] for c in _CASES} == set(A.SUPPORTED_HEAD_DIMS)
    assert {c["block"] for c in _CASES} == set(A.SUPPORTED_BLOCK_SIZES)
    assert {c["dtype"] for c in _CASES} == set(A.SUPPORTED_DTYPES)
    assert {c["ratio"] for c in _CASES} == {1, 4, 8} and {c["causal"] for c in _CASES} == {True, False}
    assert {1, 2, 8, 64} <= {c["top_k"] for c in _CASES}
    assert {1, 1000, 4097} <= {c["seqlen"] for c in _CASES}
    assert {True, False} == {c["deterministic"] for c in _CASES}
    for b in A.SUPPORTED_BLOCK_SIZES:
        assert {b - 1, b, b + 1} & {c["seqlen"] for c in _CASES if c["block"] == b}
    assert any(c["top_k"] * c["block"] >= c["seqlen"] for c in _CASES)  # k >= n


# ---------------------------------------------------------------------------------------------------
# determinism, chunking, autograd wiring, lse gradient, torch.compile


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("block", [32, 128, 256])
def test_deterministic_is_bit_identical(causal, block):
    q, k, v, dout = _inputs(2, 4096, 8, 2, 128, torch.bfloat16, seed=11)
    topk = _routing(q, k, block, 8, causal)
    out, lse = A.moba_attention_cuda(q, k, v, block, 8, causal=causal, return_lse=True, topk_indices=topk)
    args = (dout, q, k, v, out, lse, topk, block, 8, causal, 128 ** -0.5)
    g1 = G.moba_attention_backward_cuda(*args, deterministic=True)
    g2 = G.moba_attention_backward_cuda(*args, deterministic=True)
    for a, b in zip(g1, g2, strict=True):
        assert torch.equal(a, b)
    fast = G.moba_attention_backward_cuda(*args, deterministic=False)
    assert torch.equal(fast[1], g1[1]) and torch.equal(fast[2], g1[2])  # dK/dV: one writer per element
    torch.testing.assert_close(fast[0].float(), g1[0].float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True])
def test_chunked_backward(deterministic, monkeypatch, poisoned_empty):
    # A tiny scratch budget splits query ranges: dK/dV go through the fp32 store/add path.
    q, k, v, dout = _inputs(2, 3000, 8, 2, 64, torch.bfloat16, seed=5)
    topk = _routing(q, k, 64, 8, True)
    out, lse = A.moba_attention_cuda(q, k, v, 64, 8, causal=True, return_lse=True, topk_indices=topk)
    monkeypatch.setattr(A, "SCRATCH_BUDGET_BYTES", 1 << 20)
    chunks = G.bwd_plan(2, 3000, 8, 2, 64, 8, deterministic)
    assert any(G.dkv_mode(c, 3000) == 2 for c in chunks)
    with poisoned_empty():
        grads = G.moba_attention_backward_cuda(dout, q, k, v, out, lse, topk, 64, 8, True, 0.125,
                                               deterministic=deterministic)
    _check(grads, q, k, v, dout, topk, 64, True, label="chunked")


@pytest.mark.gpu
def test_public_api_autograd_and_lse_gradient():
    import mobalab.kernels as K

    q, k, v, dout = _inputs(2, 2500, 8, 2, 128, torch.bfloat16, seed=13)
    dlse = torch.randn(2, 2500, 8, device="cuda")
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = K.moba_attention(*leaves, 128, 4, causal=True, return_lse=True, deterministic=True)
    ((out.float() * dout.float()).sum() + (lse * dlse).sum()).backward()
    topk = A._route(q, k, 128, 4, True)
    assert torch.equal(out, A.moba_attention_cuda(q, k, v, 128, 4, causal=True, topk_indices=topk))
    _check([x.grad for x in leaves], q, k, v, dout, topk, 128, True, dlse=dlse, label="public api + dlse")
    # the same call again: bit-identical gradients
    leaves2 = [x.clone().requires_grad_() for x in (q, k, v)]
    out2, lse2 = K.moba_attention(*leaves2, 128, 4, causal=True, return_lse=True, deterministic=True)
    ((out2.float() * dout.float()).sum() + (lse2 * dlse).sum()).backward()
    for a, b in zip(leaves, leaves2, strict=True):
        assert torch.equal(a.grad, b.grad)


@pytest.mark.gpu
def test_custom_scale_and_strided_inputs(poisoned_empty):
    q, k, v, dout = _inputs(2, 777, 4, 2, 64, torch.float16, seed=3)
    qt, kt, vt, dt = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v, dout))
    topk = _routing(q, k, 32, 4, True)
    out, lse = A.moba_attention_cuda(q, k, v, 32, 4, causal=True, softmax_scale=0.3, return_lse=True,
                                     topk_indices=topk)
    with poisoned_empty():
        grads = G.moba_attention_backward_cuda(dt, qt, kt, vt, out, lse, topk, 32, 4, True, 0.3)
    _check(grads, q, k, v, dout, topk, 32, True, scale=0.3, label="strided, scale 0.3")


@pytest.mark.gpu
def test_concentrated_routing_long_segment():
    # Every query picks block 0 and its own block: one very long list per kv head (many tiles in one CTA).
    q, k, v, dout = _inputs(1, 8000, 4, 2, 128, torch.bfloat16, seed=17)
    t = torch.arange(8000, device="cuda")
    own = (t // 128).view(1, -1, 1).expand(1, 8000, 4)
    first = torch.where(own > 0, 0, -1)
    topk = torch.stack([own, first, torch.full_like(own, -1)], dim=-1).to(torch.int32)
    out, lse = A.moba_attention_cuda(q, k, v, 128, 3, causal=True, return_lse=True, topk_indices=topk)
    grads = G.moba_attention_backward_cuda(dout, q, k, v, out, lse, topk, 128, 3, True, 128 ** -0.5)
    _check(grads, q, k, v, dout, topk, 128, True, label="concentrated")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    import mobalab.kernels as K

    q, k, v, dout = _inputs(1, 1024, 4, 2, 64, torch.bfloat16, seed=19)

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
