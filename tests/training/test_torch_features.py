"""The recall transformer with MoBA attention under torch features of training code, on CPU: bf16 autocast,
``torch.compile(fullgraph=True)``, ``torch.func`` over its parameters, copies of the module."""

from __future__ import annotations

import copy
import pickle

import torch

from mobalab.training import ModelConfig, RecallTask, RecallTransformer, make_batch

TASK = RecallTask(seq_len=48, n_pairs=3, n_queries=2, n_keys=6, n_values=4, n_filler=5)
# 6 blocks of 8 tokens, 2 of them per query: MoBA, not SDPA (which attends when top_k covers every block)
MOBA = ModelConfig(d_model=16, n_layers=1, n_heads=2, head_dim=8, attention="moba", block_size=8, top_k=2,
                   key_conv=3)


def _model_and_batch():
    torch.manual_seed(0)
    model = RecallTransformer(MOBA, TASK)
    with torch.no_grad():
        model.layers[0].key_conv.weight.normal_()
    return model, make_batch(TASK, 2, torch.Generator().manual_seed(1))


def test_bf16_autocast_trains():
    """Under CPU autocast the projections hand MoBA bf16 q, k, v; the reference then merged bf16 partials into
    fp32 ones and raised."""
    model, b = _model_and_batch()
    want = model(b.tokens, b.query_pos)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(b.tokens, b.query_pos)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), b.answer.flatten()).backward()
    assert all(p.grad is not None and bool(p.grad.isfinite().all()) for p in model.parameters())
    torch.testing.assert_close(logits, want, rtol=0, atol=0.05)


def test_compile_fullgraph():
    """The forward's eager range checks read token values, which a graph cannot hold."""
    model, b = _model_and_batch()
    want = model(b.tokens, b.query_pos)
    got = torch.compile(model, fullgraph=True, backend="eager")(b.tokens, b.query_pos)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_torch_func_grad_over_the_parameters():
    model, b = _model_and_batch()
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(p):
        return torch.func.functional_call(model, p, (b.tokens, b.query_pos)).square().sum()

    grads = torch.func.grad(loss)(params)
    loss(dict(model.named_parameters())).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6)


def test_copies_of_the_module_compute_the_same():
    model, b = _model_and_batch()
    want = model(b.tokens, b.query_pos)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(other(b.tokens, b.query_pos), want)
    fresh = RecallTransformer(MOBA, TASK)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(b.tokens, b.query_pos), want)
