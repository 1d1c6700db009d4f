"""MoBA attention under the torch features training code uses, on CPU: ``torch.autocast``, ``torch.func``
transforms, fake tensors, non-contiguous inputs and gradients w.r.t. only some of q, k, v.

Results are held to a dense masked softmax written here (brute-force routing in float64), not to the reference.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from mobalab.kernels import moba_attention, moba_attention_varlen, moba_topk, moba_topk_varlen
from mobalab.kernels.autograd import moba_attention_autograd

B, K = 4, 2


def _qkv(batch=1, n=13, heads=4, kv_heads=2, dim=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, n, heads, dim, generator=g, dtype=dtype),
            torch.randn(batch, n, kv_heads, dim, generator=g, dtype=dtype),
            torch.randn(batch, n, kv_heads, dim, generator=g, dtype=dtype))


def _masked_softmax_moba(q, k, v, block_size=B, top_k=K, causal=True):
    """out, lse of MoBA as dense attention under a mask built from a brute-force routing (scores in float64)."""
    batch, n, heads, dim = q.shape
    group = heads // k.shape[2]
    n_blocks = math.ceil(n / block_size)
    with torch.no_grad():
        kd = k.detach().double()
        means = torch.stack([kd[:, j * block_size:(j + 1) * block_size].mean(1) for j in range(n_blocks)], 1)
        scores = torch.einsum("bthd,bjhd->bhtj", q.detach().double(), means.repeat_interleave(group, 2)).tolist()
        mask = torch.zeros(batch, heads, n, n, dtype=torch.bool)
        for b in range(batch):
            for h in range(heads):
                for t in range(n):
                    own = t // block_size
                    rank = sorted(range(own) if causal else range(n_blocks), key=lambda j: (-scores[b][h][t][j], -j))
                    for j in [own] + rank[:top_k - 1] if causal else rank[:top_k]:
                        mask[b, h, t, j * block_size:min((j + 1) * block_size, t + 1 if causal else n)] = True
    logits = torch.einsum("bthd,bshd->bhts", q, k.repeat_interleave(group, 2)) / math.sqrt(dim)
    lse = logits.masked_fill(~mask, -math.inf).logsumexp(-1)
    p = (logits - lse.unsqueeze(-1)).exp() * mask
    return torch.einsum("bhts,bshd->bthd", p, v.repeat_interleave(group, 2)), lse.transpose(1, 2)


def _brute_grads(q, k, v, dout):
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out, _ = _masked_softmax_moba(*leaves)
    return torch.autograd.grad((out * dout.double()).sum(), leaves)


def test_autocast_keeps_the_routing_and_the_compute_dtype():
    """bf16 autocast used to score the routing in bf16 (other blocks than the contract's fp32 scores on a few rows)
    and to crash merging bf16 partials into fp32 ones; autocast is off inside, as the contract computes."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 64, 2, 32, generator=g), torch.randn(1, 64, 2, 32, generator=g)
    want = moba_topk(q, k, 2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = moba_topk(q, k, 2, 4)
    assert torch.equal(got, want)

    q, k, v = (x.float().requires_grad_() for x in _qkv())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, lse = moba_attention(q, k, v, B, K, return_lse=True)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    ref_out, ref_lse = _masked_softmax_moba(*(x.detach().double() for x in (q, k, v)))
    torch.testing.assert_close(out.double(), ref_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=1e-5)
    dout = torch.randn_like(out)
    for got, ref in zip(torch.autograd.grad((out * dout).sum(), (q, k, v)), _brute_grads(q, k, v, dout),
                        strict=True):
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5)


def test_autocast_with_bf16_inputs_returns_bf16():
    q, k, v = (x.bfloat16() for x in _qkv())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moba_attention(q, k, v, B, K)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, moba_attention(q, k, v, B, K), rtol=0, atol=0)


def test_varlen_under_autocast():
    q, k, v = (x[0].float() for x in _qkv(n=21))
    cu = torch.tensor([0, 8, 21], dtype=torch.int32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moba_attention_varlen(q, k, v, cu, 13, B, K)
        sel = moba_topk_varlen(q, k, cu, 13, B, K)
    assert torch.equal(sel, moba_topk_varlen(q, k, cu, 13, B, K))
    for s, e in ((0, 8), (8, 21)):
        ref, _ = _masked_softmax_moba(*(x[None, s:e].double() for x in (q, k, v)))
        torch.testing.assert_close(out[s:e].double(), ref[0], rtol=0, atol=1e-5)


def _varlen_as_batch(q, k, v):
    cu = torch.tensor([0, 13], dtype=torch.int32)
    return moba_attention_varlen(q[0], k[0], v[0], cu, 13, B, K)[None]


def _autograd_entry(q, k, v):
    return moba_attention_autograd(q, k, v, B, K)


def _entry(q, k, v):
    return moba_attention(q, k, v, B, K)


ENTRIES = pytest.mark.parametrize("entry", [_entry, _autograd_entry, _varlen_as_batch],
                                  ids=["moba_attention", "autograd", "varlen"])


@ENTRIES
def test_torch_func_grad_and_vjp(entry):
    """torch.func refused the reference's chunk checkpoints (saved-tensor hooks) and autograd Functions whose
    forward takes ctx."""
    q, k, v = _qkv()
    dout = torch.randn(q.shape, dtype=q.dtype, generator=torch.Generator().manual_seed(1))
    grads = torch.func.grad(lambda a, b, c: (entry(a, b, c) * dout).sum(), argnums=(0, 1, 2))(q, k, v)
    want = _brute_grads(q, k, v, dout)
    for got, ref in zip(grads, want, strict=True):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    out, vjp = torch.func.vjp(entry, q, k, v)
    torch.testing.assert_close(out, _masked_softmax_moba(q, k, v)[0], rtol=0, atol=1e-12)
    for got, ref in zip(vjp(dout), want, strict=True):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


def test_torch_func_jacrev_of_the_reference():
    q, k, v = _qkv(n=6, heads=1, kv_heads=1, dim=2)
    jac = torch.func.jacrev(lambda a: moba_attention(a, k, v, 2, 2))(q)
    want = torch.autograd.functional.jacobian(lambda a: _masked_softmax_moba(a, k, v, 2, 2)[0], q)
    torch.testing.assert_close(jac, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("call", [
    lambda q, k, v: moba_attention(q, k, v, B, K),
    lambda q, k, v: moba_topk(q, k, B, K),
    lambda q, k, v: moba_attention_autograd(q, k, v, B, K),
    lambda q, k, v: moba_attention_varlen(q[0], k[0], v[0], torch.tensor([0, 13], dtype=torch.int32), 13, B, K),
], ids=["moba_attention", "moba_topk", "autograd", "varlen"])
def test_vmap_is_refused_with_the_way_around_it(call):
    q, k, v = (torch.stack([x, x]) for x in _qkv())
    with pytest.raises(ValueError, match=r"batched by torch.func.vmap.*into the batch dimension"):
        torch.func.vmap(call)(q, k, v)


def test_fake_tensors_get_shapes():
    with FakeTensorMode():
        q, k, v = (torch.empty(2, 13, 4, 8), torch.empty(2, 13, 2, 8), torch.empty(2, 13, 2, 8))
        out, lse = moba_attention(q, k, v, B, K, return_lse=True)
        out2, lse2 = moba_attention_autograd(q, k, v, B, K, return_lse=True)
        sel = moba_topk(q, k, B, K)
    assert (out.shape, lse.shape, lse.dtype) == ((2, 13, 4, 8), (2, 13, 4), torch.float32)
    assert (out2.shape, lse2.shape) == (out.shape, lse.shape)
    assert (sel.shape, sel.dtype) == ((2, 13, 4, K), torch.int32)
    with FakeTensorMode(shape_env=ShapeEnv()):
        q, k, v = (torch.empty(21, 4, 8), torch.empty(21, 2, 8), torch.empty(21, 2, 8))
        out = moba_attention_varlen(q, k, v, torch.tensor([0, 8, 21], dtype=torch.int32), 13, B, K)
    assert out.shape == (21, 4, 8)


def test_meta_tensors_point_to_fake_tensors():
    q, k, v = (torch.empty(1, 13, 2, 8, device="meta") for _ in range(3))
    with pytest.raises(ValueError, match=r"q is a meta tensor.*FakeTensorMode"):
        moba_attention(q, k, v, B, K)


@ENTRIES
def test_strided_views_and_some_inputs_requiring_grad(entry):
    """Transposed q, k a strided view of a larger buffer, v expanded from one row; gradients w.r.t. each alone."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 13, 8, generator=g, dtype=torch.float64).transpose(1, 2)
    k = torch.randn(1, 13, 4, 8, generator=g, dtype=torch.float64)[:, :, ::2]
    v = torch.randn(1, 1, 2, 8, generator=g, dtype=torch.float64).expand(1, 13, 2, 8)
    dout = torch.randn(1, 13, 4, 8, generator=g, dtype=torch.float64)
    want = _brute_grads(q, k, v, dout)
    torch.testing.assert_close(entry(q, k, v), _masked_softmax_moba(q, k, v)[0], rtol=0, atol=1e-12)
    for i in range(3):
        inputs = [q, k, v]
        inputs[i] = inputs[i].detach().requires_grad_()
        got, = torch.autograd.grad((entry(*inputs) * dout).sum(), inputs[i])
        torch.testing.assert_close(got, want[i], rtol=0, atol=1e-12)
