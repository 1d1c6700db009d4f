"""MoBA inside a Hugging Face model through the CUDA kernels (GPU machine): a tiny bf16 Llama from a config.

Dense-equivalent routing (top_k >= blocks) against ``attn_implementation="sdpa"`` on the same weights
(logits and gradients, within bf16 training noise); packed and padded batches against each sequence alone;
a few training steps that lower the loss.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from mobalab.integrations import transformers as hf  # noqa: E402

pytestmark = pytest.mark.gpu

VOCAB = 512


def _model(attn="moba", top_k=4, block=32, head_dim=64, seed=0):
    hf.register()
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=4 * head_dim, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                         max_position_embeddings=4096, attn_implementation=attn, moba_block_size=block,
                         moba_top_k=top_k)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(device="cuda", dtype=torch.bfloat16)


def _ids(*shape, seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randint(0, VOCAB, shape, device="cuda", generator=g)


def _fp32_cpu(model):
    """A float32 copy of ``model`` on the CPU (its MoBA runs the torch reference there)."""
    import copy

    return copy.deepcopy(model).to(device="cpu", dtype=torch.float32)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("head_dim", [64, 128])
def test_dense_routing_matches_sdpa_forward_and_backward(head_dim):
    moba, sdpa = _model("moba", top_k=64, head_dim=head_dim), _model("sdpa", head_dim=head_dim)
    ids = _ids(2, 1000)  # 32 blocks of 32, the last partial: top_k 64 covers them all
    out_m, out_s = moba(ids, labels=ids), sdpa(ids, labels=ids)
    assert _rel(out_m.logits, out_s.logits) < 2e-2
    out_m.loss.backward()
    out_s.loss.backward()
    for (name, p), q in zip(moba.named_parameters(), sdpa.parameters(), strict=True):
        assert torch.isfinite(p.grad).all(), name
        assert _rel(p.grad, q.grad) < 5e-2, name


def test_sparse_packed_and_padded_equal_each_sequence_alone():
    model = _model(top_k=3, block=32).eval()
    lengths = (700, 45, 1290)
    seqs = [_ids(n, seed=10 + n) for n in lengths]
    with torch.no_grad():
        alone = [model(s[None]).logits[0] for s in seqs]
        packed = model(torch.cat(seqs)[None],
                       position_ids=torch.cat([torch.arange(n, device="cuda") for n in lengths])[None]).logits[0]
        width = max(lengths)
        ids = torch.zeros(len(seqs), width, dtype=torch.long, device="cuda")
        mask = torch.zeros_like(ids)
        for row, s in enumerate(seqs):
            ids[row, :len(s)], mask[row, :len(s)] = s, 1
        padded = model(ids, attention_mask=mask).logits
    start = 0
    for row, (s, a) in enumerate(zip(seqs, alone, strict=True)):
        assert _rel(packed[start:start + len(s)], a) < 2e-2
        assert _rel(padded[row, :len(s)], a) < 2e-2
        start += len(s)


def test_training_steps_lower_the_loss():
    model = _model(top_k=4, block=64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = _ids(4, 2048, seed=3)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss  # the same batch: the loss must fall
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("head_dim", [64, 128])
def test_moba_cache_decoding_steps_match_the_whole_sequence(head_dim, monkeypatch):
    """A 1500-token prompt through a MobaCache, then 6 single-token steps and one of 4 tokens, each through the
    CUDA decode kernels: against the same model in fp32 (CPU, the torch reference), the logits at every decoded
    position are within twice the error of the whole sequence's bf16 CUDA forward (the forward's error criterion,
    taken through the model), and generate() with the cache runs."""
    import mobalab.kernels as K

    calls, real = [], K.moba_decode
    monkeypatch.setattr(K, "moba_decode", lambda q, *a, **kw: calls.append(tuple(q.shape)) or real(q, *a, **kw))
    model = _model(top_k=4, block=64, head_dim=head_dim).eval()
    ids = _ids(2, 1510, seed=40)
    arg = hf.cache_argument()
    cache = hf.MobaCache(model.config, max_cache_len=1600)
    with torch.no_grad():
        whole = model(ids).logits
        steps = [model(ids[:, :1500], use_cache=True, **{arg: cache}).logits[:, -1:]]
        steps += [model(ids[:, t:t + 1], use_cache=True, **{arg: cache}).logits for t in range(1500, 1506)]
        steps.append(model(ids[:, 1506:1510], use_cache=True, **{arg: cache}).logits)
    assert calls == [(2, 1, 4, head_dim)] * 12 + [(2, 4, 4, head_dim)] * 2
    with torch.no_grad():
        exact = _fp32_cpu(model)(ids.cpu()).logits[:, 1499:]
    err_steps, err_whole = _rel(torch.cat(steps, dim=1).cpu(), exact), _rel(whole[:, 1499:].cpu(), exact)
    assert err_steps <= 2 * err_whole, (err_steps, err_whole)
    out = model.generate(ids[:, :300], max_new_tokens=20, do_sample=False,
                         **{arg: hf.MobaCache(model.config, max_cache_len=320)})
    assert out.shape == (2, 320)
