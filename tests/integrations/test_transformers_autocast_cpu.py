"""A tiny Llama with ``attn_implementation="moba"`` under CPU bf16 autocast, as training code runs it: Llama's
RoPE leaves q and k in fp32 while v comes from a bf16 projection, and the attention, like transformers' sdpa
attention, runs in the autocast dtype."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from mobalab.integrations import transformers as hf  # noqa: E402

VOCAB = 97


@pytest.fixture(scope="module", autouse=True)
def registered():
    assert hf.register() == "moba"


def _model(attn="moba", top_k=2):
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         attn_implementation=attn, moba_block_size=4, moba_top_k=top_k)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _ids(*shape, seed=1):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def test_dense_top_k_equals_sdpa_under_autocast_forward_and_backward():
    moba, sdpa = _model(top_k=8), _model("sdpa")  # 8 blocks of 4 tokens: every block
    ids = _ids(2, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = moba(ids).logits, sdpa(ids).logits
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0.02)
    got.float().sum().backward()
    assert all(p.grad is not None and bool(p.grad.isfinite().all()) for p in moba.parameters())


def test_padded_batch_under_autocast():
    moba = _model()
    ids, mask = _ids(2, 20), torch.ones(2, 20, dtype=torch.long)
    mask[0, :5] = 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        both = moba(ids, attention_mask=mask).logits
        alone = moba(ids[:1, 5:]).logits
    torch.testing.assert_close(both[:1, 5:].float(), alone.float(), rtol=0, atol=0.02)


def test_moba_cache_generation_under_autocast_equals_the_dynamic_cache():
    """The MobaCache held one dtype and refused the bf16 values beside the fp32 keys."""
    moba = _model()
    ids = _ids(1, 18)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dynamic = moba.generate(ids, max_new_tokens=4, do_sample=False)
        cache = hf.MobaCache(moba.config, 32)
        cached = moba.generate(ids, max_new_tokens=4, do_sample=False, **{hf.cache_argument(moba): cache})
    assert torch.equal(cached, dynamic)
