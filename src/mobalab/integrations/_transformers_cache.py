r"""A transformers ``Cache`` whose layers keep their keys and values in :class:`mobalab.kernels.MobaKVCache`.

With it, a generation step of a model built with ``attn_implementation="moba"`` runs
:func:`mobalab.kernels.moba_decode` (routing over the cached block sums, attention over the selected blocks:
bytes read per step ~ centroids + k·B tokens) instead of a MoBA forward over the whole zero-padded sequence,
which is what transformers' own dynamic cache leads to. The outputs are the same: query i of a step sits at
position :math:`t = L - q_\mathrm{len} + i` and gets causal MoBA at t (docs/design.md, "MoBA semantics").

Each layer's :meth:`MobaCacheLayer.update` writes the new keys and values into its ``MobaKVCache`` (the prompt by
``prefill``, later tokens by ``append``, which keeps the block sums :math:`S_j` current in :math:`O(d)` per token)
and returns views of the cache's first L positions, (batch, kv_heads, L, head_dim), transformers' layout. The
attention function recognises such a view (:func:`cache_of`) and decodes from the cache.
"""

from __future__ import annotations

import numbers
import weakref

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from mobalab.kernels import MobaKVCache
from mobalab.kernels._contract import autocast_dtype

__all__ = ["MobaCache", "MobaCacheLayer", "cache_of"]

# key storage address -> the MobaKVCache that owns it (weak: a cache that is gone is forgotten)
_BY_KEYS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def cache_of(key: torch.Tensor) -> MobaKVCache | None:
    """The ``MobaKVCache`` whose keys ``key`` (what :meth:`MobaCacheLayer.update` returned) is a view of, else
    None."""
    cache = _BY_KEYS.get(key.data_ptr())
    return cache if cache is not None and cache.k.data_ptr() == key.data_ptr() else None


class MobaCacheLayer(CacheLayerMixin):
    """One attention layer's cache: a :class:`~mobalab.kernels.MobaKVCache` of ``max_cache_len`` tokens per
    sequence with blocks of ``block_size``, created at the first :meth:`update` with its batch, kv heads, head dim,
    dtype and device."""

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, block_size: int, max_cache_len: int):
        super().__init__()
        self.block_size = block_size
        self.max_cache_len = max_cache_len
        self.cache: MobaKVCache | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, kv_heads, _, head_dim = key_states.shape
        self.cache = MobaKVCache(batch, kv_heads, head_dim, self.block_size, self.max_cache_len,
                                 dtype=key_states.dtype, device=key_states.device)
        _BY_KEYS[self.cache.k.data_ptr()] = self.cache
        self.device, self.dtype = self.cache.device, key_states.dtype
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the new tokens' keys and values, (batch, kv_heads, n, head_dim), after the cached ones; returns
        the cache's keys and values of all L tokens held, (batch, kv_heads, L, head_dim) views."""
        held, new = self.get_seq_length(), key_states.shape[2]
        if held + new > self.max_cache_len:
            raise ValueError(f"MobaCache: {new} new token(s) after the {held} held exceed max_cache_len="
                             f"{self.max_cache_len} (prompt + generated tokens); create the MobaCache with a larger "
                             "max_cache_len")
        dtype = autocast_dtype(key_states)
        if dtype is not None:
            # the attention reads them in the autocast dtype (moba_attention_forward), and a MobaKVCache holds one
            # dtype, where the layer may hand over keys after RoPE in fp32 and values from a bf16 projection
            key_states, value_states = key_states.to(dtype), value_states.to(dtype)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        k, v = key_states.transpose(1, 2), value_states.transpose(1, 2)  # (batch, n, kv_heads, head_dim)
        if self.get_seq_length() == 0:
            self.cache.prefill(k, v)
        else:
            self.cache.append(k, v)
        held = self.get_seq_length()
        self.keys, self.values = self.cache.k[:, :, :held], self.cache.v[:, :, :held]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        """Tokens held (every sequence of the batch holds as many)."""
        return int(self.cache._host_lengths()[0]) if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        """Forget every token (the next :meth:`update` starts over with a prefill)."""
        self.cache = self.keys = self.values = None
        self.is_initialized = False

    def _unsupported(self, what: str):
        raise NotImplementedError(f"MobaCache: {what} is not supported (a MoBA KV cache keeps running block sums "
                                  "per sequence; beam search and reordering would have to rebuild them)")

    def crop(self, length: int) -> None:
        """Drop the newest tokens (assisted generation's rejected draft tokens; :meth:`MobaKVCache.crop`):
        ``length`` < 0 removes that many, ``length`` > 0 keeps that many (transformers' two conventions; 0 removes
        none)."""
        if isinstance(length, bool) or not isinstance(length, numbers.Integral):
            raise ValueError(f"MobaCache.crop: length must be an integer, got {length!r}")
        held = self.get_seq_length()
        keep = held + int(length) if length <= 0 else min(int(length), held)
        if not self.is_initialized or keep == held:
            return
        if keep < 0:
            raise ValueError(f"MobaCache.crop: removing {-int(length)} token(s) from the {held} held")
        self.cache.crop(keep)
        self.keys, self.values = self.cache.k[:, :, :keep], self.cache.v[:, :, :keep]

    def batch_repeat_interleave(self, *args, **kwargs):
        self._unsupported("batch_repeat_interleave")

    def batch_select_indices(self, *args, **kwargs):
        self._unsupported("batch_select_indices")

    def reorder_cache(self, *args, **kwargs):
        self._unsupported("reorder_cache")

    def offload(self):
        self._unsupported("offloading")


def _text_config(config):
    """The text model's config of ``config`` (itself for a text-only model)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _num_layers(config) -> int:
    n = getattr(_text_config(config), "num_hidden_layers", None)
    if not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"MobaCache: the config has no usable num_hidden_layers (got {n!r})")
    return int(n)


class MobaCache(Cache):
    r"""transformers cache for generation with ``attn_implementation="moba"``: every layer a
    :class:`MobaCacheLayer`, so each decoding step runs :func:`mobalab.kernels.moba_decode` over the layer's
    :class:`~mobalab.kernels.MobaKVCache` (CUDA kernels on CUDA tensors, the torch reference on CPU tensors).

    ``config``: the model's config (``num_hidden_layers`` and ``moba_block_size`` are read);
    ``max_cache_len``: the most tokens a sequence may reach (prompt + generated), as for transformers'
    ``StaticCache``. Batches must be unpadded (every sequence equally long: the cache holds whole rows); assisted
    generation crops the rejected draft tokens (:meth:`MobaCacheLayer.crop`); beam search and offloading are not
    supported. A step of more than 16 new tokens (a chunked prefill) is
    computed over the cached keys the usual way.

    Examples
    --------
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from mobalab.integrations.transformers import MobaCache, register
    >>> _ = register()
    >>> config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="moba",
    ...                      moba_block_size=4, moba_top_k=2)
    >>> _ = torch.manual_seed(0)
    >>> model = LlamaForCausalLM(config).eval()
    >>> ids = torch.arange(12)[None] % 64
    >>> from mobalab.integrations.transformers import cache_argument  # "cache" or "past_key_values", by release
    >>> out = model.generate(ids, max_new_tokens=5, do_sample=False,
    ...                      **{cache_argument(model): MobaCache(config, max_cache_len=32)})
    >>> out.shape
    torch.Size([1, 17])
    """

    def __init__(self, config, max_cache_len: int):
        if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, numbers.Integral) or max_cache_len < 1:
            raise ValueError(f"MobaCache: max_cache_len must be an integer >= 1, got {max_cache_len!r}")
        block = getattr(_text_config(config), "moba_block_size", None)
        if isinstance(block, bool) or not isinstance(block, numbers.Integral) or block < 1:
            raise ValueError(f"MobaCache: the config's moba_block_size must be an integer >= 1, got {block!r} (set "
                             "config.moba_block_size, as for attn_implementation='moba')")
        super().__init__(layers=[MobaCacheLayer(int(block), int(max_cache_len)) for _ in range(_num_layers(config))])
        self._max_cache_len = int(max_cache_len)

    @property
    def max_cache_len(self) -> int:
        """The most tokens a sequence may reach (prompt + generated). A property of its own: some transformers
        versions define a read-only, deprecated one on ``Cache``."""
        return self._max_cache_len
