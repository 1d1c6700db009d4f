"""MoBA inside a Hugging Face model on CPU: a tiny randomly initialised Llama built from a config in code.

With top_k >= the number of blocks MoBA is dense causal attention, so the logits and gradients equal the same
weights under ``attn_implementation="sdpa"``; with a small top_k, packed sequences (restarting position ids or
``cu_seq_lens``) and padded batches equal each sequence run alone, and cached decoding equals recomputing
the whole sequence.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from mobalab.integrations import transformers as hf  # noqa: E402

VOCAB = 97
B = 4


@pytest.fixture(scope="module", autouse=True)
def registered():
    assert hf.register() == "moba"


def _model(attn="moba", top_k=2, dtype=torch.float64, seed=0, **extra):
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         attn_implementation=attn, moba_block_size=B, moba_top_k=top_k, **extra)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype).eval()


def _ids(*shape, seed=1):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _alone(model, ids):
    return model(ids[None]).logits[0]


def test_import_mobalab_does_not_import_transformers():
    code = ("import sys, mobalab, mobalab.kernels, mobalab.integrations; "
            "assert 'transformers' not in sys.modules, 'transformers imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_every_layer_runs_moba(monkeypatch):
    model = _model(top_k=2)
    calls = []
    real = hf.moba_attention_forward

    def counting(*args, **kwargs):
        calls.append(args[0].layer_idx)
        return real(*args, **kwargs)

    transformers.AttentionInterface.register("moba_counting", counting)
    model.config._attn_implementation_internal = "moba_counting"
    model(_ids(2, 18))
    assert calls == [0, 1]


def test_dense_when_top_k_covers_every_block_forward_and_backward():
    moba, sdpa = _model("moba", top_k=64), _model("sdpa")
    ids = _ids(2, 23)  # 23 tokens: 6 blocks of 4, the last partial
    out_m, out_s = moba(ids, labels=ids), sdpa(ids, labels=ids)
    torch.testing.assert_close(out_m.logits, out_s.logits, rtol=1e-10, atol=1e-10)
    out_m.loss.backward()
    out_s.loss.backward()
    for (name, p), q in zip(moba.named_parameters(), sdpa.parameters(), strict=True):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-10, msg=name)


def test_the_models_softmax_scale_is_applied():
    # Llama's scaling is 1/sqrt(d), MoBA's default; models that scale otherwise (e.g. query_pre_attn_scalar)
    # rely on the scale passed through
    from types import SimpleNamespace

    layer = SimpleNamespace(config=SimpleNamespace(moba_block_size=B, moba_top_k=64), is_causal=True)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 11, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 11, 8, generator=g, dtype=torch.float64) for _ in range(2))
    for scale in (0.05, 1.0):
        out, _ = hf.moba_attention_forward(layer, q, k, v, None, scaling=scale)
        want = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True, scale=scale
        )
        torch.testing.assert_close(out, want.transpose(1, 2), rtol=1e-10, atol=1e-10)


def test_the_models_softmax_scale_reaches_the_cached_decode(decode_calls):
    """The same through a MobaCache: a step of new queries over the cache's view runs moba_decode with the
    model's scale (dense here: top_k covers every block)."""
    from types import SimpleNamespace

    layer = SimpleNamespace(config=SimpleNamespace(moba_block_size=B, moba_top_k=64), is_causal=True)
    from mobalab.integrations._transformers_cache import MobaCacheLayer

    cache = MobaCacheLayer(B, 16)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 11, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 11, 8, generator=g, dtype=torch.float64) for _ in range(2))
    cache.update(k[:, :, :9], v[:, :, :9])
    keys, values = cache.update(k[:, :, 9:], v[:, :, 9:])
    for scale in (0.05, 1.0):
        out, _ = hf.moba_attention_forward(layer, q[:, :, 9:], keys, values, None, scaling=scale)
        want = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True, scale=scale)
        torch.testing.assert_close(out, want.transpose(1, 2)[:, 9:], rtol=1e-10, atol=1e-10)
    assert decode_calls == [(2, 2, 4, 8)] * 2


def test_sparse_routing_changes_the_output_and_trains():
    moba, sdpa = _model("moba", top_k=2), _model("sdpa")
    ids = _ids(2, 30, seed=2)
    out = moba(ids, labels=ids)
    assert (out.logits - sdpa(ids).logits).abs().max() > 1e-3  # 8 blocks, 2 attended: not dense
    out.loss.backward()
    grads = [p.grad for p in moba.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("how", ["position_ids", "cu_seq_lens"])
def test_packed_sequences_equal_each_sequence_alone(how):
    model = _model(top_k=2)
    lengths = (9, 3, 14)  # 9 and 14 not multiples of B, 3 shorter than B
    seqs = [_ids(n, seed=10 + n) for n in lengths]
    ids = torch.cat(seqs)[None]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    kwargs = {}
    if how == "cu_seq_lens":
        cu = torch.tensor([0, 9, 12, 26], dtype=torch.int32)
        kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=14, max_length_k=14)
    packed = model(ids, position_ids=position_ids, **kwargs).logits[0]
    start = 0
    for seq in seqs:
        torch.testing.assert_close(packed[start:start + len(seq)], _alone(model, seq), rtol=1e-10, atol=1e-10)
        start += len(seq)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_equals_each_sequence_alone(side):
    model = _model(top_k=2)
    lengths, width = (17, 6, 11), 17
    seqs = [_ids(n, seed=20 + n) for n in lengths]
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for row, seq in enumerate(seqs):
        cols = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        ids[row, cols], mask[row, cols] = seq, 1
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)  # each sequence's own positions (RoPE)
    logits = model(ids, attention_mask=mask, position_ids=position_ids).logits
    for row, seq in enumerate(seqs):
        torch.testing.assert_close(logits[row][mask[row].bool()], _alone(model, seq), rtol=1e-10, atol=1e-10)


def test_packed_rows_beside_padded_rows_equal_each_sequence_alone():
    """Restarting position_ids cut a row into sequences in a padded batch too, so a packed row's logits do not
    depend on whether another row of the batch is padded."""
    model = _model(top_k=2)
    docs = [(9, 11), (4, 7)]  # row 0 fills the width, row 1 is right-padded by 9
    seqs = [[_ids(n, seed=50 + n) for n in row] for row in docs]
    ids = torch.zeros(2, 20, dtype=torch.long)
    mask = torch.zeros(2, 20, dtype=torch.long)
    position_ids = torch.zeros(2, 20, dtype=torch.long)
    for row, parts in enumerate(seqs):
        width = sum(len(seq) for seq in parts)
        ids[row, :width], mask[row, :width] = torch.cat(parts), 1
        position_ids[row, :width] = torch.cat([torch.arange(len(seq)) for seq in parts])
    logits = model(ids, attention_mask=mask, position_ids=position_ids).logits
    for row, parts in enumerate(seqs):
        start = 0
        for seq in parts:
            torch.testing.assert_close(logits[row, start:start + len(seq)], _alone(model, seq), rtol=1e-10,
                                       atol=1e-10)
            start += len(seq)


def test_output_attentions_is_refused():
    model = _model(top_k=2)
    with pytest.raises(ValueError, match=r"output_attentions=True is not supported.*set_attn_implementation"):
        model(_ids(1, 8), output_attentions=True)


def test_sliding_window_layers_are_refused_with_the_config_field_to_change():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, attn_implementation="moba", moba_block_size=B,
                         moba_top_k=2, use_sliding_window=True, sliding_window=8, max_window_layers=0)
    with pytest.raises(ValueError, match="sliding_window = 8 is not supported.*use_sliding_window=False"):
        Qwen2ForCausalLM(config)(_ids(1, 8))


def test_mask_with_holes_is_refused():
    model = _model(top_k=2)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 5] = 0
    with pytest.raises(ValueError, match="row 1 of the attention mask has padding between tokens"):
        model(_ids(2, 12), attention_mask=mask)


def test_cached_decoding_equals_recomputing():
    model = _model(top_k=2)
    ids = _ids(1, 13, seed=30)
    cached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, return_dict_in_generate=True,
                            output_logits=True)
    full = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False, return_dict_in_generate=True,
                          output_logits=True)
    assert torch.equal(cached.sequences, full.sequences)
    for a, b in zip(cached.logits, full.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_left_padded_cached_decoding_equals_recomputing():
    model = _model(top_k=2)
    ids = _ids(2, 10, seed=31)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
              output_logits=True, pad_token_id=0)
    cached, full = model.generate(ids, use_cache=True, **kw), model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached.sequences, full.sequences)
    for a, b in zip(cached.logits, full.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_missing_settings_and_unsupported_options_are_refused():
    model = _model(top_k=2)
    del model.config.moba_top_k
    with pytest.raises(ValueError, match="the model config has no moba_top_k.*model.config.moba_top_k = 8"):
        model(_ids(1, 8))
    model.config.moba_top_k = 2  # settings are read at every call, e.g. after from_pretrained
    model(_ids(1, 8))
    model = _model(top_k=2, attention_dropout=0.1).train()
    with pytest.raises(ValueError, match="attention dropout 0.1 is not supported"):
        model(_ids(1, 8))
    layer = model.model.layers[0].self_attn
    q = torch.zeros(1, 4, 8, 16, dtype=torch.float64)
    kv = torch.zeros(1, 2, 8, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"attention mask of shape \(1, 1, 8, 8\).*2-D padding mask"):
        hf.moba_attention_forward(layer, q, kv, kv, torch.ones(1, 1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="sliding_window = 4096 is not supported.*sliding_window to None"):
        hf.moba_attention_forward(layer, q, kv, kv, None, sliding_window=4096)
    with pytest.raises(ValueError, match="softcap = 30.0 is not supported"):
        hf.moba_attention_forward(layer, q, kv, kv, None, softcap=30.0)
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        hf.register("")


def test_centroid_precision_setting_reaches_every_path(monkeypatch):
    """config.moba_centroid_precision is the router's centroid_precision in a plain batch, packed sequences and
    MobaCache decoding (default "fp32"); a value that is not a precision is refused by name."""
    import mobalab.kernels as K

    seen = []

    def spying(name, real):
        def spy(*args, **kwargs):
            seen.append((name, kwargs.get("centroid_precision")))
            return real(*args, **kwargs)
        return spy

    for name in ("moba_attention", "moba_attention_varlen", "moba_decode"):
        monkeypatch.setattr(K, name, spying(name, getattr(K, name)))
    model = _model(top_k=2)
    model(_ids(1, 12))
    assert set(seen) == {("moba_attention", "fp32")}
    model.config.moba_centroid_precision = "input"
    seen.clear()
    ids = _ids(1, 21, seed=41)
    model(ids)
    model(ids, position_ids=torch.cat([torch.arange(9), torch.arange(12)])[None])
    cache = hf.MobaCache(model.config, max_cache_len=24)
    with torch.no_grad():
        model(ids[:, :20], use_cache=True, **{hf.cache_argument(): cache})
        model(ids[:, 20:], use_cache=True, **{hf.cache_argument(): cache})
    assert set(seen) == {("moba_attention", "input"), ("moba_attention_varlen", "input"), ("moba_decode", "input")}
    model.config.moba_centroid_precision = "bf16"
    with pytest.raises(ValueError, match=r"config.moba_centroid_precision must be one of \('fp32', 'input'\), got "
                                         "'bf16'"):
        model(_ids(1, 8))


def test_settings_survive_save_and_load(tmp_path):
    model = _model(top_k=2)
    model.save_pretrained(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="moba").to(torch.float64).eval()
    assert (loaded.config.moba_block_size, loaded.config.moba_top_k) == (B, 2)
    ids = _ids(1, 20, seed=40)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# MobaCache: decoding steps through moba_decode


@pytest.fixture
def decode_calls(monkeypatch):
    """The query shapes moba_decode was called with."""
    import mobalab.kernels as K

    calls, real = [], K.moba_decode

    def counting(q, *args, **kwargs):
        calls.append(tuple(q.shape))
        return real(q, *args, **kwargs)

    monkeypatch.setattr(K, "moba_decode", counting)
    return calls


def test_moba_cache_generation_decodes_every_step_and_equals_recomputing(decode_calls):
    model = _model(top_k=2)
    ids = _ids(2, 13, seed=32)
    kw = dict(max_new_tokens=9, do_sample=False, return_dict_in_generate=True, output_logits=True,
              attention_mask=torch.ones_like(ids), pad_token_id=0)
    cached = model.generate(ids, **kw, **{hf.cache_argument(): hf.MobaCache(model.config, max_cache_len=40)})
    full = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached.sequences, full.sequences)
    for a, b in zip(cached.logits, full.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert decode_calls == [(2, 1, 4, 16)] * (8 * 2)  # every step after the prompt, in both layers


def test_moba_cache_steps_of_several_tokens(decode_calls):
    """A step of 3 new tokens (verifying draft tokens) decodes at their three positions; a step of 18 (more than
    moba_decode takes) is computed over the cached keys instead; both equal the whole sequence at once."""
    model = _model(top_k=2)
    ids = _ids(1, 41, seed=33)
    cache = hf.MobaCache(model.config, max_cache_len=48)
    with torch.no_grad():
        whole = model(ids).logits
        parts = [model(ids[:, :20], use_cache=True, **{hf.cache_argument(): cache}).logits,
                 model(ids[:, 20:23], use_cache=True, **{hf.cache_argument(): cache}).logits,
                 model(ids[:, 23:41], use_cache=True, **{hf.cache_argument(): cache}).logits]
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, rtol=1e-10, atol=1e-10)
    assert decode_calls == [(1, 3, 4, 16)] * 2
    assert cache.get_seq_length() == 41 and cache.layers[0].cache.lengths.tolist() == [41]


def test_assisted_generation_crops_the_rejected_drafts(decode_calls, monkeypatch):
    """Assisted generation: a draft model (the same weights with dense attention, so it is right often but not
    always) proposes tokens, the model verifies them in one step through moba_decode, and the cache drops the
    rejected ones (MobaKVCache.crop). The tokens equal greedy decoding without a cache."""
    from mobalab.kernels import MobaKVCache

    crops, real = [], MobaKVCache.crop

    def counting(self, lengths):
        crops.append(self.lengths.tolist())
        real(self, lengths)
        crops[-1] = (crops[-1], self.lengths.tolist())

    monkeypatch.setattr(MobaKVCache, "crop", counting)
    model, draft = _model(top_k=2), _model(attn="sdpa")
    ids = _ids(1, 13, seed=32)
    kw = dict(max_new_tokens=30, do_sample=False, pad_token_id=0)
    assisted = model.generate(ids, assistant_model=draft, **kw,
                              **{hf.cache_argument(): hf.MobaCache(model.config, max_cache_len=64)})
    assert torch.equal(assisted, model.generate(ids, use_cache=False, **kw))
    assert any(before[0] > after[0] for before, after in crops), crops
    assert any(q_len > 1 for _, q_len, _, _ in decode_calls), decode_calls  # drafts verified in one step


def test_crop_conventions_of_transformers_releases():
    """crop(-n) removes n tokens (transformers 5), crop(n > 0) keeps n (earlier releases), crop(0) removes none."""
    model = _model(top_k=2)
    cache = hf.MobaCache(model.config, max_cache_len=24)
    with torch.no_grad():
        model(_ids(1, 15, seed=37), use_cache=True, **{hf.cache_argument(): cache})
    for length, held in ((0, 15), (-2, 13), (20, 13), (9, 9)):
        cache.crop(length)
        assert cache.get_seq_length() == held and all(x.cache.lengths.tolist() == [held] for x in cache.layers)
        assert all(x.keys.shape[2] == held for x in cache.layers)
    with pytest.raises(ValueError, match="MobaCache.crop: length must be an integer, got 2.5"):
        cache.crop(2.5)


def test_moba_cache_refuses_what_it_cannot_hold():
    model = _model(top_k=2)
    ids = _ids(2, 10, seed=34)
    cache = hf.MobaCache(model.config, max_cache_len=12)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    with pytest.raises(ValueError, match="MobaCache holds unpadded batches only"):
        model(ids, attention_mask=mask, use_cache=True, **{hf.cache_argument(): cache})
    cache = hf.MobaCache(model.config, max_cache_len=12)
    with torch.no_grad():
        model(ids, use_cache=True, **{hf.cache_argument(): cache})
        with pytest.raises(ValueError, match=r"MobaCache: 3 new token\(s\) after the 10 held exceed max_cache_len=12"):
            model(_ids(2, 3, seed=35), use_cache=True, **{hf.cache_argument(): cache})
    assert cache.get_seq_length() == 10 and all(layer.cache.lengths.tolist() == [10, 10] for layer in cache.layers)
    with pytest.raises(ValueError, match=r"MobaCache: 13 new token\(s\) after the 0 held exceed max_cache_len=12"):
        model(_ids(2, 13, seed=36), use_cache=True, **{hf.cache_argument(): hf.MobaCache(model.config, 12)})
    with pytest.raises(NotImplementedError, match="MobaCache: batch_select_indices is not supported"):
        cache.batch_select_indices(torch.tensor([0]))
    with pytest.raises(ValueError, match=r"MobaCache.crop: removing 11 token\(s\) from the 10 held"):
        cache.crop(-11)
    with pytest.raises(ValueError, match="max_cache_len must be an integer >= 1, got 0"):
        hf.MobaCache(model.config, 0)
    with pytest.raises(ValueError, match="moba_block_size must be an integer >= 1, got None"):
        hf.MobaCache(LlamaConfig(num_hidden_layers=2), 8)
    other = _model(top_k=2)
    other.config.moba_block_size = 8
    with pytest.raises(ValueError, match="the MobaCache has blocks of 8 tokens, the config asks for moba_block_size=4"):
        cache = hf.MobaCache(other.config, max_cache_len=12)
        model(ids, use_cache=True, **{hf.cache_argument(): cache})


def test_static_cache_is_refused():
    """A static cache hands the attention all its max_cache_len keys, the rows past the queries zeros, and no mask:
    MoBA over them would route to and attend those zeros, so it is refused, at the prompt already."""
    model = _model(top_k=2)
    with pytest.raises(ValueError, match="the last query sits at position 6 but .* keys beyond the queries "
                                         r"\(a static cache\) are not supported"):
        model.generate(_ids(1, 7, seed=37), max_new_tokens=2, do_sample=False, pad_token_id=0,
                       cache_implementation="static")
