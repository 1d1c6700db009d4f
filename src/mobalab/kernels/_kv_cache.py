r"""KV cache for MoBA decoding: keys, values and the running per-block key sums.

Routing needs the centroid of every block, :math:`\bar k_j = S_j / |j|` with :math:`S_j = \sum_{i \in j} k_i`.
The cache keeps :math:`S_j` in fp32 beside K and V, so appending token t costs :math:`O(d)` per kv head,
:math:`S_{\lfloor t/B \rfloor} \mathrel{+}= k_t`, and no centroid is ever recomputed from the keys.
"""

from __future__ import annotations

import heapq
import math
import numbers

import torch
import torch.nn.functional as F

__all__ = ["MobaKVCache"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Prefill sums its keys this many tokens at a time (rounded to whole blocks), which bounds the fp32 copy.
_PREFILL_CHUNK_TOKENS = 1 << 16


def _size(name: str, value, fn: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{fn}: {name} must be an integer >= 1, got {value!r}")
    return int(value)


class MobaKVCache:
    r"""Per-sequence KV cache with running block key sums, for :func:`mobalab.kernels.moba_decode`.

    Storage (contiguous, head-major so that one block of one kv head is one contiguous slab):

    * ``k``, ``v``: (batch, kv_heads, capacity, head_dim) in ``dtype``, capacity = ceil(max_seqlen / B)·B;
    * ``block_sums``: (batch, kv_heads, n_blocks, head_dim), fp32 (fp64 for an fp64 cache), with
      :math:`S_{b,h,j} = \sum_{i \in j,\, i < L_b} k_{b,i,h}`, so the centroid is :math:`S_j / |j|`,
      :math:`|j| = \min(B, L_b - jB)`;
    * ``lengths``: tokens held per sequence :math:`L_b` (a CPU int64 tensor, also kept on the device for
      the kernels; reading it does not synchronise, unless an append was captured in a CUDA graph, below);
    * for 16-bit caches, once a CUDA decode has routed on centroids of ``centroid_precision="input"``: the
      block means rounded to ``dtype``, :math:`T(S_j / B)`, (batch, kv_heads, n_blocks, head_dim), which that
      router's score pass streams instead of the fp32 sums (half the bytes). :meth:`prefill` and :meth:`append`
      keep them in step with the sums from then on (a block's mean is exact once the block is complete, the
      only blocks a router scores).

    :meth:`prefill` starts new sequences from a prompt (ragged lengths allowed); :meth:`append` adds tokens
    at each sequence's end and updates :math:`S` token by token in order. Positions beyond a sequence's
    length are never read by :func:`~mobalab.kernels.moba_decode`.

    **Paged layout** (``page_size`` given, as serving engines keep their caches): ``k`` and ``v`` are a pool of
    ``num_pages`` pages (num_pages, kv_heads, page_size, head_dim), and a page table maps page
    :math:`\lfloor t / P \rfloor` of sequence b to a page of the pool, so a sequence holds
    :math:`\lceil L_b / P \rceil` pages and the pool needs only as many as the sequences' tokens take (a
    ragged batch no longer reserves ``max_seqlen`` per sequence). ``page_size`` is a multiple of B, so every block
    lies in one page and is still one slab. Pages are taken from the pool lowest-numbered first, by
    :meth:`prefill` (which returns every page first) and by :meth:`append` when a sequence crosses into a new
    page; a pool too small for a request is an error before anything changes. The block sums stay per sequence
    (1/B of the bytes of the keys they summarise). Read the mapping with :attr:`page_table`.

    **CUDA graphs**: a decode step (:meth:`append`, then :func:`~mobalab.kernels.moba_decode`) on a contiguous
    cache can be captured in a CUDA graph and replayed, each replay one step further: the captured append adds
    its tokens at the lengths the device holds at the replay, and a decode captured in the graph is planned for
    sequences of up to ``max_seqlen`` tokens, so it serves every replay. The host cannot count replays: once an
    append has been captured, whatever reads the lengths on the host (:attr:`lengths`, :meth:`append`'s check,
    a decode outside the graph) reads them back from the device first (a synchronisation), and no check stops a
    replay that would pass ``max_seqlen`` (stop replaying before the sequences are full). A paged cache takes
    its pages on the host, so its appends cannot be captured (its decodes can).

    :meth:`crop` drops tokens at the ends of the sequences (speculative decoding's rejected draft tokens).
    Not supported: evicting tokens from the start or the middle, pages shared between sequences, and concurrent
    decodes on one cache from several CUDA streams (the CUDA kernels keep completion counters in the cache).

    Examples
    --------
    >>> import torch
    >>> from mobalab.kernels import MobaKVCache
    >>> cache = MobaKVCache(2, 1, 4, block_size=2, max_seqlen=8, dtype=torch.float32)
    >>> k = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 1, 4)
    >>> cache.prefill(k, k, lengths=[3, 2])
    >>> cache.lengths.tolist()
    [3, 2]
    >>> cache.append(torch.ones(2, 1, 1, 4), torch.ones(2, 1, 1, 4))
    >>> cache.lengths.tolist(), cache.centroids()[1, :, 0, 0].tolist()
    ([4, 3], [14.0, 1.0])

    A paged cache of 4-token pages (two blocks each) holds the same tokens in 3 pages:

    >>> paged = MobaKVCache(2, 1, 4, block_size=2, max_seqlen=8, dtype=torch.float32, page_size=4)
    >>> paged.prefill(k, k, lengths=[3, 2])
    >>> paged.append(torch.ones(2, 2, 1, 4), torch.ones(2, 2, 1, 4))  # sequence 0 crosses into its 2nd page
    >>> paged.page_table.tolist(), paged.free_pages
    ([[0, 2], [1, -1]], 1)
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, block_size: int, max_seqlen: int,
                 dtype: torch.dtype = torch.float32, device="cpu", *, page_size: int | None = None,
                 num_pages: int | None = None):
        fn = "MobaKVCache"
        self.batch = _size("batch", batch, fn)
        self.kv_heads = _size("kv_heads", kv_heads, fn)
        self.head_dim = _size("head_dim", head_dim, fn)
        self.block_size = _size("block_size", block_size, fn)
        self.max_seqlen = _size("max_seqlen", max_seqlen, fn)
        if page_size is None and num_pages is not None:
            raise ValueError(f"{fn}: num_pages={num_pages!r} needs a page_size (a paged cache); got page_size=None")
        if page_size is not None:
            page_size = _size("page_size", page_size, fn)
            if page_size % self.block_size:
                raise ValueError(f"{fn}: page_size must be a multiple of block_size={self.block_size} (every block "
                                 f"in one page), got page_size={page_size}")
        if dtype not in _DTYPES:
            raise ValueError(f"{fn}: dtype {dtype!r} is not supported; supported: float16, bfloat16, float32, float64")
        self.dtype = dtype
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        elif self.device.type == "cpu":  # CPU tensors report "cpu" whatever index was asked for ("cpu:0")
            self.device = torch.device("cpu")
        self.n_blocks = math.ceil(self.max_seqlen / self.block_size)
        self.capacity = self.n_blocks * self.block_size
        #: tokens per page (None: one contiguous slab per sequence), pages per sequence's table, pages in the pool
        self.page_size = page_size
        if page_size is None:
            self.pages_per_seq = self.num_pages = 0
            shape = (self.batch, self.kv_heads, self.capacity, self.head_dim)
        else:
            self.pages_per_seq = math.ceil(self.capacity / page_size)
            self.num_pages = (self.batch * self.pages_per_seq if num_pages is None
                              else _size("num_pages", num_pages, fn))
            shape = (self.num_pages, self.kv_heads, page_size, self.head_dim)
            self._pages = torch.full((self.batch, self.pages_per_seq), -1, dtype=torch.int32)
            self._pages_dev = self._pages.to(self.device, copy=True)  # the kernels' copy
            self._free = list(range(self.num_pages))  # a heap: the lowest-numbered free page goes first
        # zeros, not empty: rows past a sequence's length are masked, but must never hold NaN bit patterns
        self.k = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=dtype, device=self.device)
        self.sum_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.block_sums = torch.zeros((self.batch, self.kv_heads, self.n_blocks, self.head_dim),
                                      dtype=self.sum_dtype, device=self.device)
        self._len = torch.zeros(self.batch, dtype=torch.int64)
        self._appended = torch.zeros(self.batch, dtype=torch.int64)
        self._len_dev = torch.zeros(self.batch, dtype=torch.int32, device=self.device)
        # set once an append is captured in a CUDA graph: its replays lengthen the sequences on the device alone
        self._device_lengths_lead = False
        self._means = None  # the 16-bit block means T(S_j / B), made by the first decode that routes on them
        self._counters = None
        self._tensor_maps = {}  # the split decode kernel's tensor maps of K and V, per attention chunk

    # -----------------------------------------------------------------------------------------------
    # state

    @property
    def lengths(self) -> torch.Tensor:
        """Tokens held per sequence, (batch,) int64 on the CPU (a copy)."""
        return self._host_lengths().clone()

    def _capturing(self) -> bool:
        """Whether work on this cache's device is being captured in a CUDA graph now (nothing runs)."""
        return self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()

    def _host_lengths(self) -> torch.Tensor:
        """The lengths as the host knows them (int64, CPU; the cache's own tensor). Once an append has been captured
        in a CUDA graph, the device's lengths lead (each replay adds its tokens there): they are read back first,
        which waits for the queued work, except during a capture, which cannot wait."""
        if self._device_lengths_lead and not self._capturing():
            self._len = self._len_dev.to("cpu", torch.int64)
        return self._len

    @property
    def paged(self) -> bool:
        """Whether K and V are kept in pages (``page_size`` given)."""
        return self.page_size is not None

    @property
    def page_table(self) -> torch.Tensor:
        """Paged caches: the page of the pool that holds page i of sequence b, (batch, pages_per_seq) int32 on the
        CPU (a copy), -1 where a sequence has not reached page i."""
        self._need_pages("page_table")
        return self._pages.clone()

    @property
    def free_pages(self) -> int:
        """Paged caches: pages of the pool that no sequence holds."""
        self._need_pages("free_pages")
        return len(self._free)

    def _need_pages(self, what: str) -> None:
        if not self.paged:
            raise ValueError(f"MobaKVCache.{what}: this cache is not paged (page_size=None)")

    @property
    def appended(self) -> torch.Tensor:
        """Tokens the last :meth:`prefill` / :meth:`append` added per sequence, (batch,) int64 on the CPU."""
        return self._appended.clone()

    def __repr__(self) -> str:
        return (f"MobaKVCache(batch={self.batch}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, "
                f"block_size={self.block_size}, max_seqlen={self.max_seqlen}, dtype={self.dtype}, "
                f"device={self.device}, "
                + (f"page_size={self.page_size}, num_pages={self.num_pages}, free_pages={len(self._free)}, "
                   if self.paged else "")
                + f"lengths={self._host_lengths().tolist()})")

    def centroids(self) -> torch.Tensor:
        r"""Block centroids :math:`S_j / |j|`, (batch, n, kv_heads, head_dim) with n = ceil(max length / B).

        Blocks a sequence does not reach are zero. Same layout and precision as
        :func:`mobalab.kernels.moba_centroids`.
        """
        lengths = self._host_lengths()
        n = max(1, math.ceil(int(lengths.max()) / self.block_size))
        starts = torch.arange(n, dtype=torch.int64) * self.block_size
        counts = torch.clamp(lengths.view(-1, 1) - starts.view(1, -1), 0, self.block_size)
        counts = counts.clamp(min=1).to(device=self.device, dtype=self.sum_dtype)
        return (self.block_sums[:, :, :n] / counts.view(self.batch, 1, n, 1)).transpose(1, 2)

    # -----------------------------------------------------------------------------------------------
    # writing

    def _check_kv(self, fn: str, k, v, lengths=None):
        """Validate new keys / values (batch, n, kv_heads, head_dim) for this cache; returns per-sequence counts."""
        for name, x in (("k", k), ("v", v)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
            if x.dim() != 4:
                raise ValueError(f"{fn}: {name} must be 4-D (batch, seqlen, kv_heads, head_dim), "
                                 f"got shape {tuple(x.shape)}")
            if x.dtype != self.dtype:
                raise ValueError(f"{fn}: {name} has dtype {x.dtype}; this cache holds {self.dtype}")
            if x.device != self.device:
                raise ValueError(f"{fn}: {name} is on {x.device}; this cache is on {self.device}")
        if k.shape != v.shape:
            raise ValueError(f"{fn}: k and v must have the same shape, got k {tuple(k.shape)}, v {tuple(v.shape)}")
        batch, n, kv_heads, dim = k.shape
        want = (self.batch, kv_heads, self.kv_heads, self.head_dim)
        if (batch, kv_heads, dim) != (self.batch, self.kv_heads, self.head_dim) or n < 1:
            raise ValueError(f"{fn}: k has shape {tuple(k.shape)}; this cache takes (batch={want[0]}, seqlen >= 1, "
                             f"kv_heads={self.kv_heads}, head_dim={self.head_dim})")
        if lengths is None:
            return torch.full((self.batch,), n, dtype=torch.int64)
        lens = self._per_sequence(fn, lengths, f"a sequence of {self.batch} integers")
        if int(lens.min()) < 1 or int(lens.max()) > n:
            raise ValueError(f"{fn}: lengths must lie in [1, {n}] (the prompt's seqlen), got {lens.tolist()}")
        return lens

    def _per_sequence(self, fn: str, lengths, what: str) -> torch.Tensor:
        """One integer per sequence, from a sequence of integers or an integer tensor, as (batch,) int64 on the CPU;
        ``what``: what the error names as accepted."""
        if isinstance(lengths, torch.Tensor):
            lens = lengths.detach().to("cpu")
            if lens.dtype.is_floating_point or lens.dtype == torch.bool:
                raise ValueError(f"{fn}: lengths must hold integers, got dtype {lengths.dtype}")
            lens = lens.to(torch.int64).reshape(-1)
        else:
            try:
                items = list(lengths)
            except TypeError:
                raise ValueError(f"{fn}: lengths must be {what}, got {lengths!r}") from None
            if any(isinstance(x, bool) or not isinstance(x, numbers.Integral) for x in items):
                raise ValueError(f"{fn}: lengths must hold integers, got {items!r}")
            lens = torch.tensor([int(x) for x in items], dtype=torch.int64)
        if lens.numel() != self.batch:
            raise ValueError(f"{fn}: lengths has {lens.numel()} entries; the cache has batch {self.batch}")
        return lens

    def prefill(self, k: torch.Tensor, v: torch.Tensor, lengths=None) -> None:
        r"""Start new sequences from a prompt: ``k``, ``v`` (batch, seqlen, kv_heads, head_dim).

        ``lengths`` (optional, ``batch`` integers in [1, seqlen]) gives each sequence's real length in a
        right-padded ragged batch; the padding is neither stored nor summed, and only the longest sequence has to
        fit in ``max_seqlen``. Replaces whatever the cache held. Block sums :math:`S_j` are computed here once, in
        fp32, from the prompt's keys.
        """
        fn = "MobaKVCache.prefill"
        lens = self._check_kv(fn, k, v, lengths)
        if lengths is not None:  # padding past the longest sequence (a batch padded to a bucket size) is not held
            longest = int(lens.max())
            k, v = k[:, :longest], v[:, :longest]
        seqlen = k.shape[1]
        if seqlen > self.max_seqlen:
            raise ValueError(f"{fn}: the prompt has {seqlen} tokens; this cache holds at most max_seqlen="
                             f"{self.max_seqlen}")
        if self.paged:  # every page back to the pool, then each sequence's pages in order
            need = [math.ceil(n / self.page_size) for n in lens.tolist()]
            if sum(need) > self.num_pages:
                raise ValueError(f"{fn}: lengths {lens.tolist()} take {sum(need)} pages of {self.page_size} tokens; "
                                 f"the pool has num_pages={self.num_pages}")
            self._pages.fill_(-1)
            start = 0
            for b, n in enumerate(need):
                self._pages[b, :n] = torch.arange(start, start + n, dtype=torch.int32)
                start += n
            self._free = list(range(start, self.num_pages))  # sorted: a heap
            self._pages_dev.copy_(self._pages)
        bsz = self.block_size
        chunk = max(bsz, (_PREFILL_CHUNK_TOKENS // bsz) * bsz)
        lens_dev = lens.to(self.device)
        self.block_sums.zero_()
        for t0 in range(0, seqlen, chunk):
            t1 = min(seqlen, t0 + chunk)
            valid = (torch.arange(t0, t1, device=self.device).view(1, -1) < lens_dev.view(-1, 1)).view(
                self.batch, t1 - t0, 1, 1)
            kc = torch.where(valid, k[:, t0:t1], 0)
            vc = torch.where(valid, v[:, t0:t1], 0)
            if self.paged:  # the prompt's tokens only: padding has no page
                pos = torch.arange(t0, t1, device=self.device).expand(self.batch, -1)
                page, off = self._slots(pos)
                held = valid.view(self.batch, t1 - t0)
                self.k[page[held], :, off[held]] = kc[held]
                self.v[page[held], :, off[held]] = vc[held]
            else:
                self.k[:, :, t0:t1] = kc.transpose(1, 2)
                self.v[:, :, t0:t1] = vc.transpose(1, 2)
            nb = math.ceil((t1 - t0) / bsz)
            # padded rows are zero: they change no sum (same reduction as moba_centroids)
            padded = F.pad(kc.to(self.sum_dtype), (0, 0, 0, 0, 0, nb * bsz - (t1 - t0)))
            sums = padded.view(self.batch, nb, bsz, self.kv_heads, self.head_dim).sum(dim=2)
            self.block_sums[:, :, t0 // bsz:t0 // bsz + nb] = sums.transpose(1, 2)
        self._len = lens.clone()
        self._appended = lens.clone()
        self._len_dev.copy_(lens.to(torch.int32))
        if self._means is not None:
            self._means.copy_(self._round_means(self.block_sums))

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        r"""Add ``q_len`` tokens at the end of every sequence: ``k_new``, ``v_new`` (batch, q_len, kv_heads, d).

        Token i of sequence b lands at position :math:`L_b + i`; its key is added to the fp32 sum of block
        :math:`\lfloor (L_b + i)/B \rfloor`, tokens in order (an :math:`O(d)` update per token and kv head).
        Meant for decode steps (a few tokens); start sequences with :meth:`prefill`. Runs on the cache's
        device without synchronising with the host (see the class docstring for appends captured in a CUDA graph).
        """
        fn = "MobaKVCache.append"
        self._check_kv(fn, k_new, v_new)
        n = k_new.shape[1]
        capturing = self._capturing()
        if capturing and self.paged:
            raise ValueError(f"{fn}: a paged cache (page_size={self.page_size}) takes its pages on the host, which a "
                             "CUDA graph's replays would not do: append outside the graph (a decode inside it is "
                             "fine), or capture the steps of a contiguous cache (page_size=None)")
        lengths = self._host_lengths()
        if int(lengths.max()) + n > self.max_seqlen:
            room = self.max_seqlen - int(lengths.max())
            raise ValueError(f"{fn}: appending {n} token(s) to lengths {lengths.tolist()} exceeds "
                             f"max_seqlen={self.max_seqlen}; the cache has room for {room} more token(s) per sequence")
        if self.paged:  # pages for the tokens that cross into a sequence's next page, all or none
            grow = [(b, math.ceil(length / self.page_size), math.ceil((length + n) / self.page_size))
                    for b, length in enumerate(lengths.tolist())]
            need = sum(hi - lo for _, lo, hi in grow)
            if need > len(self._free):
                raise ValueError(f"{fn}: appending {n} token(s) to lengths {lengths.tolist()} needs {need} new "
                                 f"page(s) of {self.page_size} tokens; {len(self._free)} of num_pages="
                                 f"{self.num_pages} are free")
            self._take_pages(grow)
        dev = self.device
        rows = torch.arange(self.batch, device=dev)
        pos = self._len_dev.to(torch.int64).view(-1, 1) + torch.arange(n, device=dev).view(1, n)  # (batch, n)
        # index dims 0 and 2 with a slice between: the indexed view is (batch, n, kv_heads, d), as k_new
        if self.paged:
            page, off = self._slots(pos)
            self.k[page, :, off] = k_new
            self.v[page, :, off] = v_new
        else:
            self.k[rows.view(-1, 1), :, pos] = k_new
            self.v[rows.view(-1, 1), :, pos] = v_new
        keys = k_new.to(self.sum_dtype)
        blocks = torch.div(pos, self.block_size, rounding_mode="floor")
        for i in range(n):  # in token order: the same fp32 rounding as adding tokens one step at a time
            self.block_sums[rows, :, blocks[:, i]] += keys[:, i]
        if self._means is not None:  # the blocks the tokens touched (a block's last token makes its mean exact)
            at = (rows.view(-1, 1), slice(None), blocks)
            self._means[at] = self._round_means(self.block_sums[at])
        self._len_dev += n
        self._len += n
        self._appended = torch.full((self.batch,), n, dtype=torch.int64)
        self._device_lengths_lead |= capturing

    def crop(self, lengths) -> None:
        r"""Keep the first ``lengths`` tokens of every sequence and drop the rest: an integer for every sequence or
        ``batch`` integers, each between 0 and the sequence's length (speculative decoding drops the draft tokens
        the model rejected this way).

        The dropped rows of K and V become zeros, the sums of the blocks past a sequence's new end :math:`L'` are
        emptied, and the block the cut falls in, :math:`c = \lfloor L'/B \rfloor`, is summed again from the tokens
        it keeps, :math:`S_c = \sum_{cB \le i < L'} k_i` in fp32: the sums of a cache that never held the dropped
        tokens, up to the order of the fp32 additions. Pages no longer reached go back to the pool. The next
        :func:`~mobalab.kernels.moba_decode` needs an :meth:`append` first (its queries are the newest tokens').
        The lengths are read on the host, so a crop cannot be captured in a CUDA graph.

        Examples
        --------
        >>> import torch
        >>> from mobalab.kernels import MobaKVCache
        >>> cache = MobaKVCache(1, 1, 2, block_size=2, max_seqlen=8, dtype=torch.float32)
        >>> k = torch.arange(10, dtype=torch.float32).view(1, 5, 1, 2)
        >>> cache.prefill(k, k)
        >>> cache.crop(3)  # tokens 3 and 4 dropped: block 1 keeps token 2 alone
        >>> cache.lengths.tolist(), cache.block_sums[0, 0, :3].tolist()
        ([3], [[2.0, 4.0], [4.0, 5.0], [0.0, 0.0]])
        """
        fn = "MobaKVCache.crop"
        if self._capturing():
            raise ValueError(f"{fn}: a crop reads the lengths on the host, which a CUDA graph's replays would not "
                             "do: crop outside the graph")
        old = self._host_lengths()
        if isinstance(lengths, torch.Tensor) and lengths.dim() == 0 and not lengths.dtype.is_floating_point:
            lengths = int(lengths)
        if isinstance(lengths, numbers.Integral) and not isinstance(lengths, bool):
            new = torch.full((self.batch,), int(lengths), dtype=torch.int64)
        else:
            new = self._per_sequence(fn, lengths, f"an integer or a sequence of {self.batch} integers")
        if bool(((new < 0) | (new > old)).any()):
            raise ValueError(f"{fn}: lengths {new.tolist()} must lie between 0 and the lengths held, "
                             f"{old.tolist()} (a crop only drops tokens)")
        cut = [(b, lo, hi) for b, (lo, hi) in enumerate(zip(new.tolist(), old.tolist(), strict=True)) if lo < hi]
        bsz, heads = self.block_size, torch.arange(self.kv_heads, device=self.device).view(-1, 1)
        for b, lo, hi in cut:
            dropped = torch.arange(lo, hi, device=self.device)
            if self.paged:
                page = self._pages_dev[b].to(torch.int64)[torch.div(dropped, self.page_size, rounding_mode="floor")]
                self.k[page, :, dropped % self.page_size] = 0
                self.v[page, :, dropped % self.page_size] = 0
            else:
                self.k[b, :, lo:hi] = 0
                self.v[b, :, lo:hi] = 0
            first = lo // bsz  # the block the cut falls in: summed again from the tokens it keeps, or emptied
            self.block_sums[b, :, first:math.ceil(hi / bsz)] = 0
            if lo % bsz:
                kept, _ = self.token_rows(b, heads, torch.arange(first * bsz, lo, device=self.device).view(1, -1))
                self.block_sums[b, :, first] = kept.to(self.sum_dtype).sum(dim=1)
            if self._means is not None:
                self._means[b] = self._round_means(self.block_sums[b])
        if self.paged:  # pages past a sequence's new end go back to the pool
            held = [(b, i) for b, lo, hi in cut
                    for i in range(math.ceil(lo / self.page_size), math.ceil(hi / self.page_size))]
            for b, i in held:
                heapq.heappush(self._free, int(self._pages[b, i]))
                self._pages[b, i] = -1
            self._set_page_entries([(b, i, -1) for b, i in held])
        self._len = new
        self._appended = torch.zeros(self.batch, dtype=torch.int64)
        self._len_dev.copy_(self._to_device(new.to(torch.int32)))

    # -----------------------------------------------------------------------------------------------
    # pages

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A small CPU tensor on the cache's device, from pinned memory without a wait where that is a GPU: a plain
        copy from host memory would wait for every kernel queued on the stream (a decode loop's steps must not);
        torch's pinned-memory cache keeps the buffer until the copy has run."""
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _set_page_entries(self, entries) -> None:
        """Entries (b, i, page) of the page table into the device's copy (the host's already hold them)."""
        if entries:
            new = self._to_device(torch.tensor(entries, dtype=torch.int64))
            self._pages_dev[new[:, 0], new[:, 1]] = new[:, 2].to(torch.int32)

    def _take_pages(self, spans) -> None:
        """Give sequence b pages i in [lo, hi) for each (b, lo, hi) of ``spans``, from the pool's lowest-numbered
        free pages (a heap; the caller has checked that enough are free); the device's table follows."""
        entries = []
        for b, lo, hi in spans:
            for i in range(lo, hi):
                page = heapq.heappop(self._free)
                self._pages[b, i] = page
                entries.append((b, i, page))
        self._set_page_entries(entries)  # only the new entries

    def _move_pages(self, perm: torch.Tensor) -> None:
        """Move page p of the pool to page ``perm[p]`` (a permutation of the pool), contents and table together:
        the tokens a sequence holds stay the same (tests and benchmarks use it to scatter a sequence's pages)."""
        self._need_pages("_move_pages")
        perm = torch.as_tensor(perm, dtype=torch.int64).cpu()
        if not torch.equal(perm.sort().values, torch.arange(self.num_pages)):
            raise ValueError(f"MobaKVCache._move_pages: perm must be a permutation of the {self.num_pages} pages")
        for store in (self.k, self.v):
            moved = torch.empty_like(store)
            moved[perm.to(store.device)] = store
            store.copy_(moved)
        held = self._pages >= 0
        self._pages[held] = perm[self._pages[held].long()].to(torch.int32)
        self._pages_dev.copy_(self._pages)
        self._free = sorted(perm[torch.tensor(self._free, dtype=torch.int64)].tolist())  # sorted: a heap

    def _slots(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(page, offset in the page) of positions ``pos`` (batch, n) of each sequence, on the cache's device."""
        pos = pos.to(torch.int64)
        page = self._pages_dev.to(torch.int64).gather(1, torch.div(pos, self.page_size, rounding_mode="floor"))
        return page, pos % self.page_size

    def token_rows(self, b: int, kv_index: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of sequence ``b`` at kv heads ``kv_index`` and positions ``tokens`` (broadcast
        together; positions the sequence holds), ``(k, v)`` of shape (*broadcast shape, head_dim): the one read of
        either layout, for readers in torch such as :func:`mobalab.kernels.moba_decode_reference`."""
        if not self.paged:
            return self.k[b][kv_index, tokens], self.v[b][kv_index, tokens]
        page = self._pages_dev[b].to(torch.int64)[torch.div(tokens, self.page_size, rounding_mode="floor")]
        off = tokens % self.page_size
        return self.k[page, kv_index, off], self.v[page, kv_index, off]

    # -----------------------------------------------------------------------------------------------
    # routing on centroids of the input precision

    def _round_means(self, sums: torch.Tensor) -> torch.Tensor:
        """:math:`T(S / B)`: block sums to the means of complete blocks, rounded to the cache's dtype (as
        :func:`mobalab.kernels.moba_decode_reference` rounds them for ``centroid_precision="input"``)."""
        return (sums / self.block_size).to(self.dtype)

    def _input_means(self) -> torch.Tensor:
        r"""The block means :math:`T(S_j / B)` (batch, kv_heads, n_blocks, head_dim) in the cache's dtype, the
        rows that the CUDA score pass of ``centroid_precision="input"`` streams (2 bytes per element against the
        sums' 4). Made from the sums on the first call (one pass over them), then kept in step by
        :meth:`prefill` and :meth:`append`. Rows of blocks that are not complete hold the running sum over B,
        which no router reads (a query's candidates are the complete blocks before its own). Made during a CUDA
        graph capture, that first pass becomes part of the graph and runs at every replay: a decode step before
        the capture (as warm-ups are) keeps it out."""
        if self.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"MobaKVCache: 16-bit block means need a float16 or bfloat16 cache, this one holds "
                             f"{self.dtype}")
        if self._means is None:
            self._means = self._round_means(self.block_sums)
        return self._means

    # -----------------------------------------------------------------------------------------------
    # kernel workspace

    def _workspace_counters(self, count: int) -> torch.Tensor:
        """Zeroed int32 workspace (at least ``count``) for the CUDA decode kernels: completion counters and the
        split path's sets of selected blocks.

        Every kernel resets what it used before it exits, so one zero-filled allocation serves every later
        call; it grows (a fresh zeroed tensor) when a call needs more.
        """
        if self._counters is None or self._counters.numel() < count:
            self._counters = torch.zeros(max(count, 256), dtype=torch.int32, device=self.device)
        return self._counters
