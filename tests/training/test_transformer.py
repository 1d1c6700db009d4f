import dataclasses

import pytest
import torch

from mobalab.training import ModelConfig, RecallTask, RecallTransformer, make_batch, rotary

TASK = RecallTask(seq_len=96, n_pairs=6, n_queries=4, n_keys=10, n_values=5, n_filler=7)
SMALL = ModelConfig(d_model=32, n_layers=2, n_heads=2, head_dim=16, attention="moba", block_size=16, top_k=2)


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    return RecallTransformer(cfg, TASK)


def _batch(size=3, seed=1):
    return make_batch(TASK, size, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cfg", [
    dataclasses.replace(SMALL, attention="dense"),
    SMALL,
    dataclasses.replace(SMALL, key_conv=3),
    dataclasses.replace(SMALL, key_conv=5, attention="dense"),
], ids=lambda c: c.label)
def test_forward_backward_shapes(cfg):
    model = _model(cfg)
    b = _batch()
    logits, qk = model(b.tokens, b.query_pos, capture=True)
    assert logits.shape == (3, TASK.n_queries, TASK.n_values) and logits.dtype == torch.float32
    assert len(qk) == cfg.n_layers
    for q, k in qk:
        assert q.shape == k.shape == (3, TASK.seq_len, cfg.n_heads, cfg.head_dim)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, TASK.n_values), b.answer.reshape(-1))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
    if cfg.key_conv:
        assert all(float(layer.key_conv.weight.grad.abs().sum()) > 0 for layer in model.layers)


def test_moba_equals_dense_when_budget_covers_the_context():
    # N <= k·B: every past block fits in the k - 1 free slots, so MoBA is dense causal attention
    moba = dataclasses.replace(SMALL, block_size=32, top_k=3)
    m1, m2 = _model(moba), _model(dataclasses.replace(moba, attention="dense"))
    m2.load_state_dict(m1.state_dict())
    b = _batch()
    torch.testing.assert_close(m1(b.tokens, b.query_pos), m2(b.tokens, b.query_pos), atol=2e-5, rtol=2e-5)
    # the layer then runs SDPA instead of the MoBA reference: both give the same attention
    from mobalab.kernels import moba_attention

    g = torch.Generator().manual_seed(5)
    for n, top_k in ((96, 3), (64, 2), (33, 2)):
        q, k, v = (torch.randn(2, n, 2, 16, generator=g) for _ in range(3))
        layer = m1.layers[0]
        layer.cfg = dataclasses.replace(moba, top_k=top_k)
        torch.testing.assert_close(layer.attend(q, k, v), moba_attention(q, k, v, 32, top_k), atol=2e-6, rtol=2e-5)


def test_routing_matters_below_the_budget():
    m1, m2 = _model(SMALL), _model(dataclasses.replace(SMALL, attention="dense"))
    m2.load_state_dict(m1.state_dict())
    b = _batch()
    assert not torch.allclose(m1(b.tokens, b.query_pos), m2(b.tokens, b.query_pos), atol=1e-4)


@pytest.mark.parametrize("cfg", [SMALL, dataclasses.replace(SMALL, key_conv=5)], ids=lambda c: c.label)
def test_causal(cfg):
    model = _model(cfg)
    b = _batch(size=1)
    s = 50
    tokens2 = b.tokens.clone()
    tokens2[0, s] = (tokens2[0, s] + 1) % TASK.n_filler if tokens2[0, s] < TASK.n_filler else 0
    with torch.no_grad():
        _, qk1 = model(b.tokens, b.query_pos, capture=True)
        _, qk2 = model(tokens2, b.query_pos, capture=True)
    for (q1, k1), (q2, k2) in zip(qk1, qk2, strict=True):
        torch.testing.assert_close(q1[:, :s], q2[:, :s], atol=0, rtol=0)
        torch.testing.assert_close(k1[:, :s], k2[:, :s], atol=0, rtol=0)
        assert not torch.equal(k1[:, s], k2[:, s])


def test_rotary_is_relative():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8, generator=g), torch.randn(1, 1, 1, 8, generator=g)
    n = 40
    rq, rk = rotary(q.expand(1, n, 1, 8)), rotary(k.expand(1, n, 1, 8))
    dots = torch.einsum("bthd,bshd->ts", rq, rk)
    # <R_t q, R_s k> depends on t - s only
    torch.testing.assert_close(dots[10, 3], dots[30, 23], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dots[5, 5], (q * k).sum(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1).expand(1, n, 1), atol=1e-5, rtol=1e-5)


def test_without_rope_the_keys_do_not_depend_on_position():
    model = _model(dataclasses.replace(SMALL, rope=False, n_layers=1))
    tokens = torch.full((1, TASK.seq_len), 3)  # one filler token everywhere: only RoPE could tell them apart
    with torch.no_grad():
        _, qk = model(tokens, torch.tensor([[TASK.seq_len - 1]]), capture=True)
    q, k = qk[0]
    torch.testing.assert_close(k[0, 0].expand_as(k[0]), k[0], atol=0, rtol=0)
    model_rope = _model(dataclasses.replace(SMALL, n_layers=1))
    with torch.no_grad():
        _, qk = model_rope(tokens, torch.tensor([[TASK.seq_len - 1]]), capture=True)
    assert not torch.allclose(qk[0][1][0, 0], qk[0][1][0, 5])


def test_config_validation_and_labels():
    assert ModelConfig().label == "dense"
    assert ModelConfig(attention="moba", block_size=128, key_conv=5).label == "moba-128-kconv5"
    with pytest.raises(ValueError, match="attention"):
        ModelConfig(attention="sparse")
    with pytest.raises(ValueError, match="head_dim"):
        ModelConfig(head_dim=15)
    with pytest.raises(ValueError, match="key_conv"):
        ModelConfig(key_conv=-1)
    with pytest.raises(ValueError, match="rope_base must be a finite number > 1, got inf"):
        ModelConfig(rope_base=float("inf"))
    with pytest.raises(TypeError, match="task"):
        RecallTransformer(SMALL, "task")
    model = _model(SMALL)
    with pytest.raises(ValueError, match="tokens must lie"):
        model(torch.full((1, 96), TASK.vocab_size), torch.tensor([[95]]))


def test_query_positions_and_token_dtypes_are_checked():
    model = _model(SMALL)
    tokens = torch.zeros(1, 96, dtype=torch.long)
    with pytest.raises(ValueError, match=r"query_pos must lie in \[0, seqlen = 96\), got \[90, 96\]"):
        model(tokens, torch.tensor([[90, 96]]))
    with pytest.raises(ValueError, match="query_pos must lie"):
        model(tokens, torch.tensor([[-1]]))
    with pytest.raises(ValueError, match="tokens must be an integer tensor, got torch.float32"):
        model(tokens.float(), torch.tensor([[95]]))
    with pytest.raises(ValueError, match="query_pos must be an integer tensor, got torch.float32"):
        model(tokens, torch.tensor([[95.0]]))
