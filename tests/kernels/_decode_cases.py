"""The decode-step cases of the host-emulated decode kernels (cuda/decode.cu, cuda/decode_split.cu), and the check
of one step's outputs against the torch reference (``mobalab.kernels._decode``).

Test modules are imported with ``--import-mode=importlib``: they put this folder on ``sys.path`` and import
``_decode_cases``.
"""

from __future__ import annotations

import math

import torch

from mobalab.kernels import MobaKVCache
from mobalab.kernels import _decode as D


def shuffle_pages(cache: MobaKVCache, gen: torch.Generator) -> None:
    """Move a paged cache's pages to a random permutation of the pool (contents and table together), so that
    no sequence's pages are in order: what a reader of the table must not depend on."""
    cache._move_pages(torch.randperm(cache.num_pages, generator=gen))


def decode_case(seed, dtype, dim, block, kv_heads, heads, q_len, prompt_lengths, steps=1, ties=False, shared=False,
                page_size=None, key_mean=None, poison_key=None, spare=3):
    """A CPU cache filled by a ragged prefill and ``steps`` appends of q_len tokens, and the last queries.

    ``ties``: every third block repeats block 1, so their sums and scores tie exactly, and the queries make the
    repeated blocks the best (their exact ties decide the selection); ``shared``: the query heads of a kv head are
    equal, so they select the same blocks (a small union: each block read once for several rows); ``page_size``:
    a paged cache, its pages shuffled over the pool after the prefill and after the appends; ``key_mean``: keys of
    that mean and a spread of a few of the dtype's ulps there, so that rounding the block means to the dtype
    (``centroid_precision="input"``) changes many selections; ``poison_key``: that value (inf, -inf or NaN) in one
    element of a key of block 2 of the first sequence (kv head 0), so that block's sum is not finite and its
    score NaN: a block that no query may select; ``spare``: tokens the cache holds room for beyond the appends
    (its ``max_seqlen`` is the longest sequence plus ``spare``)."""
    g = torch.Generator().manual_seed(seed)
    batch = len(prompt_lengths)
    total = max(prompt_lengths) + steps * q_len
    cache = MobaKVCache(batch, kv_heads, dim, block, total + spare, dtype=dtype, page_size=page_size)
    k = torch.randn(batch, max(prompt_lengths), kv_heads, dim, generator=g)
    if key_mean is not None:
        k = key_mean + 16 * ulp_at(key_mean, dtype) * k
    k = k.to(dtype)
    if ties:
        for j in range(4, max(prompt_lengths) // block, 3):
            k[:, j * block:(j + 1) * block] = k[:, block:2 * block]
    if poison_key is not None:
        k[0, 2 * block + 1, 0, 3] = poison_key
    v = torch.randn(batch, max(prompt_lengths), kv_heads, dim, generator=g).to(dtype)
    cache.prefill(k, v, lengths=prompt_lengths)
    if page_size is not None:
        shuffle_pages(cache, g)
    for _ in range(steps):
        cache.append(torch.randn(batch, q_len, kv_heads, dim, generator=g).to(dtype),
                     torch.randn(batch, q_len, kv_heads, dim, generator=g).to(dtype))
    if page_size is not None:
        shuffle_pages(cache, g)
    q = torch.randn(batch, q_len, heads, dim, generator=g).to(dtype)
    if shared:
        group = heads // kv_heads
        q = q.view(batch, q_len, kv_heads, group, dim)[:, :, :, :1].expand(-1, -1, -1, group, -1)
        q = q.reshape(batch, q_len, heads, dim).contiguous()
    if ties:
        q[:, :, :] = cache.block_sums[:, :1, 1].to(q.dtype).unsqueeze(1)
    return cache, q


def ulp_at(x: float, dtype) -> float:
    """The spacing of the 16-bit ``dtype``'s values at x > 0 (bf16: 8 significant bits, fp16: 11)."""
    return 2.0 ** (math.frexp(x)[1] - {torch.bfloat16: 8, torch.float16: 11}[dtype])


def assert_step_matches_reference(q, cache, top_k, scale, bufs, *, block, lengths, ties=False,
                                  centroid_precision="fp32"):
    """The step's selection ``bufs["sel"]`` is the reference routing of ``centroid_precision`` exactly (with
    ``ties``: the highest-index tied copies win), ``out`` is one rounding to the 16-bit type from the reference
    attention, ``lse`` within 1e-5, nothing NaN, and every completion counter is back to zero for the next step."""
    ref_sel = D._route(q, cache, top_k, centroid_precision)
    assert torch.equal(bufs["sel"], ref_sel), (bufs["sel"] != ref_sel).nonzero()[:8]
    if ties:  # the tied copies outscore the rest; the highest-index ones win
        copies = [1] + list(range(4, lengths[0] // block, 3))
        assert ref_sel[0, 0, 0, 1:].tolist() == sorted(copies, reverse=True)[:top_k - 1]
    ref_out, ref_lse = D._attend(q, cache, ref_sel, scale)
    assert not torch.isnan(bufs["out"].float()).any() and not torch.isnan(bufs["lse"]).any()
    eps = 2.0 ** -8 if q.dtype == torch.bfloat16 else 2.0 ** -11  # one rounding to the 16-bit type
    torch.testing.assert_close(bufs["out"].float(), ref_out.float(), atol=2 * eps, rtol=2 * eps)
    torch.testing.assert_close(bufs["lse"], ref_lse, atol=1e-5, rtol=1e-5)
    assert int(cache._counters.abs().sum()) == 0
