"""MoBA attention is differentiable once: a second derivative through its gradients raises, on every entry whose
backward is not plain autograd (the autograd Function of moba_attention_autograd and of moba_attention_varlen, and
their custom ops), instead of leaving out MoBA's terms without a word. The reference's own autograd (CPU
``moba_attention``) has a second derivative and keeps it."""

from __future__ import annotations

import pytest
import torch

from mobalab.kernels import moba_attention, moba_attention_varlen
from mobalab.kernels.autograd import moba_attention_autograd


def _leaves(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 12, 2, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]


def _autograd_entry(q, k, v):
    return moba_attention_autograd(q, k, v, 4, 2)


def _varlen_entry(q, k, v):
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    return moba_attention_varlen(q[0], k[0], v[0], cu, 7, 4, 2)[None]


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "ops"])
@pytest.mark.parametrize(
    "entry,name",
    [(_autograd_entry, "moba_attention"), (_varlen_entry, "moba_attention_varlen")],
    ids=["autograd", "varlen"],
)
def test_a_gradient_penalty_raises(entry, name, eager, monkeypatch):
    from mobalab.kernels import _varlen, autograd

    monkeypatch.setattr(autograd, "EAGER_FUNCTION", eager)
    monkeypatch.setattr(_varlen, "EAGER_FUNCTION", eager)
    q, k, v = _leaves()
    w = torch.ones(2, dtype=torch.float64, requires_grad=True)
    out = entry(q, k, v)
    (dq,) = torch.autograd.grad(out.square().sum(), (q,), create_graph=True)
    loss = (dq * w[0]).square().sum() + (q * w[1]).sum()  # also differentiable w.r.t. q without MoBA
    match = f"{name}: MoBA attention is differentiable once" if eager else "no autograd formula was registered"
    with pytest.raises(RuntimeError, match=match):
        torch.autograd.grad(loss, (q, w))
    # a linear loss: the output gradient is a constant, the penalty still reaches q through the attention
    (dq,) = torch.autograd.grad(entry(q, k, v).sum(), (q,), create_graph=True)
    with pytest.raises(RuntimeError, match=match):
        torch.autograd.grad(dq.square().sum(), (k,))


@pytest.mark.parametrize("entry", [_autograd_entry, _varlen_entry], ids=["autograd", "varlen"])
def test_first_derivatives_under_create_graph_are_unchanged(entry):
    q, k, v = _leaves(1)
    plain = torch.autograd.grad(entry(q, k, v).square().sum(), (q, k, v))
    graph = torch.autograd.grad(entry(q, k, v).square().sum(), (q, k, v), create_graph=True)
    for a, b in zip(plain, graph, strict=True):
        assert not a.requires_grad and b.requires_grad
        assert torch.equal(a, b.detach())
    # the second derivative w.r.t. what does not pass through the attention's gradients is exact
    w = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    (gw,) = torch.autograd.grad((graph[0] * w).sum(), (w,))
    assert torch.equal(gw, graph[0].detach().sum())


def test_the_reference_keeps_its_second_derivative():
    q, k, v = _leaves(2)
    (dq,) = torch.autograd.grad(moba_attention(q, k, v, 4, 2).square().sum(), (q,), create_graph=True)
    (ddq,) = torch.autograd.grad(dq.square().sum(), (q,))
    assert torch.isfinite(ddq).all() and ddq.abs().sum() > 0
