r"""MoBA as a Hugging Face ``transformers`` attention implementation: ``attn_implementation="moba"``.

:func:`register` adds the attention function :func:`moba_attention_forward` to transformers'
``AttentionInterface`` under the name ``"moba"`` (and, under the same name, the flash-attention mask
function, so that the model hands the attention a 2-D padding mask, or None when nothing is padded). A model
built with ``attn_implementation="moba"`` then computes every attention layer as

.. math::
    o_t = \mathrm{softmax}\big(\sigma\, q_t K_{S_t}^\top\big) V_{S_t}

over the key blocks :math:`S_t` that MoBA routes query :math:`t` to (see docs/design.md, "MoBA semantics"):
:func:`mobalab.kernels.moba_attention` on CUDA tensors runs the CUDA kernels (forward and backward), on CPU
tensors the torch reference.

Settings come from the model config, read at every call: ``moba_block_size`` (B) and ``moba_top_k`` (k) are
required (there is no block size that suits every head dimension and context, so a missing one is an error
that says how to set it); ``moba_deterministic`` (default False) selects the bit-reproducible CUDA backward;
``moba_centroid_precision`` (default ``"fp32"``) is the router's ``centroid_precision`` (``"input"``: block means
rounded to the model's dtype, as MoBA and FlashMoBA store them), in training, prefill and decode alike.
Set them on the loaded model (``model.config.moba_block_size = 128``): ``from_pretrained`` ignores keyword
arguments that are not config fields. Causality is the
layer's (``is_causal``); ``scaling`` is the layer's softmax scale. Under ``torch.autocast`` q, k and v are cast to
the autocast dtype first, as transformers' sdpa attention does. MoBA has no attention dropout (a non-zero
``attention_dropout`` while training is refused), no sliding window, soft-capping or attention sinks, and returns
no attention weights (``output_attentions=True`` is refused).

What the attention accepts:

* a plain batch, no padding: batched MoBA, each row one sequence;
* packed sequences, as ``cu_seq_lens_q``/``cu_seq_lens_k`` (+ ``max_length_q``; e.g. from
  ``DataCollatorWithFlattening``), or as ``position_ids`` that restart (a sequence starts wherever the position
  does not continue the previous one): :func:`mobalab.kernels.moba_attention_varlen`, blocks restart at every
  sequence, nothing crosses sequences;
* a padded batch (2-D attention mask, left or right padding: each row's tokens one contiguous run) is
  unpadded to the varlen path, a row's tokens cut further where ``position_ids`` restart (packed and padded
  rows); padded positions get zero output and reach no other token. A mask with holes inside a row, or a custom
  4-D mask, is refused (neither is MoBA routing);
* decoding with a KV cache (fewer queries than keys, the queries being the last positions): with
  :class:`MobaCache` (``model.generate(..., **{cache_argument(model): MobaCache(model.config, max_cache_len)})``)
  a step of up to 16 new tokens runs :func:`mobalab.kernels.moba_decode` over the layer's
  :class:`~mobalab.kernels.MobaKVCache`, reading the block sums and the selected blocks only (unpadded batches).
  With transformers' own dynamic cache the queries are placed at their positions in a zero-padded query
  sequence over all keys, which is exact (each query's routing and attention depend only on itself and the
  keys) but costs one full-length MoBA per step, not one per new token. Static caches (keys beyond the current
  length) are refused.

Reading masks, ``position_ids`` and ``cu_seq_lens`` values synchronises with the device once per layer.
"""

from __future__ import annotations

import numbers
import sys

import torch

from mobalab.kernels._contract import CENTROID_PRECISIONS, autocast_dtype
from mobalab.kernels._decode import MAX_Q_LEN

__all__ = ["register", "moba_attention_forward", "MobaCache", "cache_argument"]  # noqa: F822 (module __getattr__)


def __getattr__(name: str):
    # MobaCache subclasses transformers' Cache: defined when first asked for, so that importing this module does
    # not import transformers
    if name == "MobaCache":
        from ._transformers_cache import MobaCache

        return MobaCache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

#: The ``attn_implementation`` name :func:`register` uses by default.
NAME = "moba"


def cache_argument(model=None) -> str:
    """The keyword under which ``model``'s ``forward()`` (and ``generate()``) take a cache object: ``"cache"`` where
    the forward has that parameter (recent transformers 5 releases), ``"past_key_values"`` otherwise (earlier
    releases, 5.17 among them). Without a model, the installed transformers' ``LlamaForCausalLM`` is asked.

    Examples
    --------
    >>> from mobalab.integrations.transformers import cache_argument
    >>> cache_argument() in ("cache", "past_key_values")
    True
    """
    import inspect

    if model is None:
        from transformers import LlamaForCausalLM as model
    forward = model.forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def register(name: str = NAME) -> str:
    """Make MoBA available to transformers models as ``attn_implementation=name``; returns ``name``.

    Registers :func:`moba_attention_forward` with ``transformers.AttentionInterface`` and transformers'
    flash-attention mask function with ``AttentionMaskInterface`` (the 2-D padding mask, or None without
    padding, is what :func:`moba_attention_forward` understands). Calling it again is harmless.

    Examples
    --------
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from mobalab.integrations.transformers import register
    >>> register()
    'moba'
    >>> config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="moba",
    ...                      moba_block_size=4, moba_top_k=2)
    >>> _ = torch.manual_seed(0)
    >>> model = LlamaForCausalLM(config)
    >>> model(torch.arange(10)[None] % 64).logits.shape
    torch.Size([1, 10, 64])
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register: name must be a non-empty string, got {name!r}")
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    except ImportError as err:
        raise ImportError("mobalab.integrations.transformers needs transformers>=4.56: "
                          "pip install 'mobalab[hf]'") from err
    AttentionInterface.register(name, moba_attention_forward)
    AttentionMaskInterface.register(name, flash_attention_mask)
    return name


# --------------------------------------------------------------------------------------------------
# settings and masks


def _settings(module) -> tuple[int, int, bool, str]:
    config = getattr(module, "config", None)
    if config is None:
        raise ValueError(f"moba attention: the attention module {type(module).__name__} has no `config`; "
                         "moba_block_size and moba_top_k are read from it")
    values = {}
    for key in ("moba_block_size", "moba_top_k"):
        value = getattr(config, key, None)
        if value is None:
            raise ValueError(
                f"moba attention: the model config has no {key}. Set both on the config, e.g. "
                "model.config.moba_block_size = 128; model.config.moba_top_k = 8 (from_pretrained drops unknown "
                "keyword arguments), or LlamaConfig(..., moba_block_size=128, moba_top_k=8)")
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"moba attention: config.{key} must be an integer >= 1, got {value!r}")
        values[key] = int(value)
    deterministic = getattr(config, "moba_deterministic", False)
    if not isinstance(deterministic, bool):
        raise ValueError(f"moba attention: config.moba_deterministic must be True or False, got {deterministic!r}")
    precision = getattr(config, "moba_centroid_precision", "fp32")
    if precision not in CENTROID_PRECISIONS:
        raise ValueError(f"moba attention: config.moba_centroid_precision must be one of {CENTROID_PRECISIONS}, got "
                         f"{precision!r}")
    return values["moba_block_size"], values["moba_top_k"], deterministic, precision


def _padding_mask(attention_mask, batch: int, kv_len: int) -> torch.Tensor | None:
    """The 2-D keep-mask (batch, kv_len) as bool, or None when nothing is padded."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise ValueError(f"moba attention: attention_mask must be None or a 2-D padding mask tensor, got "
                         f"{type(attention_mask).__name__}; was the model built after mobalab's register()?")
    if attention_mask.dim() != 2:
        raise ValueError(f"moba attention: got an attention mask of shape {tuple(attention_mask.shape)}; MoBA takes "
                         "a 2-D padding mask (batch, keys) or none. A custom 4-D mask cannot be expressed as MoBA "
                         "routing; pass the 2-D mask from the tokenizer instead")
    if tuple(attention_mask.shape) != (batch, kv_len):
        raise ValueError(f"moba attention: attention_mask has shape {tuple(attention_mask.shape)}, expected "
                         f"(batch, keys) = {(batch, kv_len)}; static caches are not supported")
    mask = attention_mask.bool()
    return None if bool(mask.all()) else mask


def _unpadding(mask: torch.Tensor, position_ids=None):
    """Indices of the kept tokens in the flattened batch, cu_seqlens and the longest sequence of a padded batch.

    Each row's kept run is one sequence, split further wherever ``position_ids`` (when they cover the row) restart
    between two kept tokens: a packed row is then cut the same whether or not another row of the batch is padded.
    """
    batch, seqlen = mask.shape
    inner = mask[:, 1:] & ~mask[:, :-1]
    runs = mask[:, 0].int() + inner.sum(1)  # number of contiguous kept runs per row
    bad = (runs > 1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"moba attention: row {bad[0]} of the attention mask has padding between tokens; only "
                         "left or right padding (each row's tokens one contiguous run) can be unpadded into "
                         "sequences")
    starts = mask.clone()
    starts[:, 1:] = inner
    if (position_ids is not None and position_ids.dim() == 2 and position_ids.shape[-1] == seqlen
            and position_ids.shape[0] in (1, batch)):
        pos = position_ids.to(mask.device).expand(batch, seqlen)
        starts[:, 1:] |= mask[:, 1:] & mask[:, :-1] & (pos[:, 1:] != pos[:, :-1] + 1)
    index = mask.reshape(-1).nonzero().flatten()
    # cu_seqlens on the host: the attention reads it without waiting for the GPU
    first = starts.reshape(-1)[index].nonzero().flatten().cpu()
    cu_seqlens = torch.cat([first, torch.tensor([index.numel()], dtype=first.dtype)]).to(torch.int32)
    return index, cu_seqlens, int(cu_seqlens.diff().max()) if first.numel() else 0


def _restarts(position_ids, batch: int, seqlen: int):
    """cu_seqlens of the flattened batch when ``position_ids`` restart inside a row (packed sequences), else None."""
    if position_ids is None or seqlen < 2:
        return None
    if position_ids.dim() != 2 or position_ids.shape[-1] != seqlen or position_ids.shape[0] not in (1, batch):
        raise ValueError(f"moba attention: position_ids has shape {tuple(position_ids.shape)}, expected "
                         f"(batch, seqlen) = {(batch, seqlen)} or (1, seqlen)")
    pos = position_ids.expand(batch, seqlen)
    starts = torch.ones((batch, seqlen), dtype=torch.bool, device=pos.device)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    if not bool(starts[:, 1:].any()):
        return None
    first = starts.reshape(-1).nonzero().flatten().cpu()  # on the host: read by the attention without a wait
    cu_seqlens = torch.cat([first, torch.tensor([batch * seqlen], dtype=first.dtype)]).to(torch.int32)
    return cu_seqlens, int(cu_seqlens.diff().max())


def _given_cu_seqlens(kwargs, total: int):
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_k is not None and (cu_k.shape != cu_q.shape or not bool(torch.equal(cu_k.to(cu_q.device), cu_q))):
        raise ValueError("moba attention: cu_seq_lens_k differs from cu_seq_lens_q; MoBA is self-attention over the "
                         "same packed tokens")
    cu = cu_q.to(device="cpu", dtype=torch.int32)  # on the host: read by the attention without a wait
    max_len = kwargs.get("max_length_q")
    max_len = int(cu.diff().max()) if max_len is None or cu.numel() < 2 else int(max_len)
    if int(cu[-1]) != total:
        raise ValueError(f"moba attention: cu_seq_lens_q ends at {int(cu[-1])}, but the batch holds {total} tokens")
    return cu, max_len


# --------------------------------------------------------------------------------------------------
# the attention function


def moba_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    r"""transformers attention function: MoBA over (batch, heads, seq, head_dim) query/key/value.

    Signature and layout of transformers' ``sdpa_attention_forward``: ``query`` (batch, heads, q_len, d),
    ``key``/``value`` (batch, kv_heads, kv_len, d) (GQA without repeating), ``attention_mask`` None or the 2-D
    padding mask, ``scaling`` the softmax scale :math:`\sigma`; keyword arguments ``is_causal``,
    ``position_ids``, ``cu_seq_lens_q``/``_k``, ``max_length_q``. Returns ``(attn_output, None)`` with
    ``attn_output`` (batch, q_len, heads, d). What is accepted is listed in the module docstring.

    Examples
    --------
    >>> import torch
    >>> from types import SimpleNamespace
    >>> from mobalab.integrations.transformers import moba_attention_forward
    >>> layer = SimpleNamespace(config=SimpleNamespace(moba_block_size=4, moba_top_k=2), is_causal=True)
    >>> g = torch.Generator().manual_seed(0)
    >>> q, k, v = torch.randn(1, 4, 10, 8, generator=g), torch.randn(1, 2, 10, 8, generator=g), torch.randn(1, 2, 10, 8)
    >>> out, weights = moba_attention_forward(layer, q, k, v, None)
    >>> tuple(out.shape), weights
    ((1, 10, 4, 8), None)
    """
    from mobalab.kernels import moba_attention, moba_attention_varlen

    block_size, top_k, deterministic, precision = _settings(module)
    if dropout:
        raise ValueError(f"moba attention: attention dropout {dropout} is not supported (MoBA has none); set the "
                         "config's attention_dropout to 0")
    if kwargs.get("sliding_window") is not None:  # e.g. Mistral's config sets 4096 by default
        raise ValueError(f"moba attention: sliding_window = {kwargs['sliding_window']!r} is not supported (MoBA "
                         "routes over the whole past, whatever the window's length); set the config's "
                         "sliding_window to None (Mistral), or build the model from a config whose layers all use "
                         "full attention (Qwen2: use_sliding_window=False; configs with layer_types: every entry "
                         "'full_attention')")
    if kwargs.get("output_attentions"):
        raise ValueError("moba attention: output_attentions=True is not supported (MoBA never forms the attention "
                         "weights); call without it, or switch to dense attention for that call with "
                         "model.set_attn_implementation('eager') (its weights are dense attention's, not MoBA's)")
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"moba attention: {name} = {kwargs[name]!r} is not supported")
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if causal is None else causal)
    batch, heads, q_len, dim = query.shape
    kv_len = key.shape[2]
    if q_len > kv_len:
        raise ValueError(f"moba attention: {q_len} queries but only {kv_len} keys; MoBA is self-attention")
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # (batch, seq, heads, d)
    mask = _padding_mask(attention_mask, batch, kv_len)
    held = sys.modules.get(f"{__package__}._transformers_cache")  # loaded once a MobaCache exists
    cache = held.cache_of(key) if held is not None else None
    dtype = autocast_dtype(query)
    if dtype is not None:
        # transformers' sdpa attention runs in the autocast dtype (SDPA is on autocast's lower-precision list), and
        # the layer may hand over q, k and v in different dtypes (RoPE in fp32, v from a bf16 projection); a
        # MobaCache holds them in that dtype (MobaCacheLayer.update)
        q, k, v = (x.to(dtype) for x in (q, k, v))
    if cache is not None:
        if mask is not None:
            raise ValueError("moba attention: MobaCache holds unpadded batches only (every row's tokens from "
                             "position 0); generate padded prompts with transformers' dynamic cache, or one prompt "
                             "at a time")
        if cache.block_size != block_size:
            raise ValueError(f"moba attention: the MobaCache has blocks of {cache.block_size} tokens, the config "
                             f"asks for moba_block_size={block_size}")
        if q_len < kv_len and q_len <= MAX_Q_LEN and causal:
            from mobalab.kernels import moba_decode

            return moba_decode(q, cache, top_k, softmax_scale=scaling, centroid_precision=precision), None
    if q_len < kv_len:
        # Decoding with a cache: the new queries are the last positions of the key sequence.
        position_ids = kwargs.get("position_ids")
        if mask is None and position_ids is not None and position_ids.dim() == 2 and position_ids.numel():
            # a static cache hands over all its max_cache_len keys, the rows past the queries unwritten zeros, and
            # (nothing padded) no mask: only the queries' positions tell that keys lie beyond them
            last = int(position_ids[:, -1].max())
            if last < kv_len - 1:
                raise ValueError(f"moba attention: the last query sits at position {last} but {kv_len} keys were "
                                 f"given: keys beyond the queries (a static cache) are not supported; generate "
                                 "with a MobaCache or transformers' dynamic cache")
        if mask is not None and not bool(mask[:, kv_len - q_len:].all()):
            raise ValueError("moba attention: some new queries are masked as padding; left-padded decoding with "
                             "a dynamic cache is supported, static caches and right padding are not")
        q = torch.cat([q.new_zeros(batch, kv_len - q_len, heads, dim), q], dim=1)

    common = dict(block_size=block_size, top_k=top_k, causal=causal, softmax_scale=scaling,
                  centroid_precision=precision)
    total = batch * kv_len
    flat = lambda x: x.reshape(total, *x.shape[2:])  # noqa: E731
    if kwargs.get("cu_seq_lens_q") is not None:
        if q_len != kv_len:
            raise ValueError("moba attention: cu_seq_lens_q together with a KV cache is not supported")
        cu, max_len = _given_cu_seqlens(kwargs, total)
        out = moba_attention_varlen(flat(q), flat(k), flat(v), cu, max_len, **common, deterministic=deterministic)
        out = out.view(batch, kv_len, heads, dim)
    elif mask is not None:
        position_ids = kwargs.get("position_ids") if q_len == kv_len else None
        index, cu, max_len = _unpadding(mask, position_ids)
        packed = moba_attention_varlen(*(flat(x).index_select(0, index) for x in (q, k, v)), cu, max_len, **common,
                                       deterministic=deterministic)
        out = packed.new_zeros(total, heads, dim).index_copy(0, index, packed).view(batch, kv_len, heads, dim)
    elif q_len == kv_len and (packing := _restarts(kwargs.get("position_ids"), batch, kv_len)) is not None:
        cu, max_len = packing
        out = moba_attention_varlen(flat(q), flat(k), flat(v), cu, max_len, **common, deterministic=deterministic)
        out = out.view(batch, kv_len, heads, dim)
    else:
        out = moba_attention(q, k, v, **common, deterministic=deterministic)
    return out[:, kv_len - q_len:], None
