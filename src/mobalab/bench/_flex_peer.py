r"""FlexAttention (``torch.nn.attention.flex_attention``) as a benchmark peer: MoBA through a block mask.

Given mobalab's routing ``topk`` (batch, N, heads, k; -1 = unused slot), FlexAttention runs MoBA with

* a **block mask**: for each 128-query tile :math:`Q` and each KV tile :math:`T` (``kv_tile`` keys: the MoBA
  block size B when B is a multiple of 128, else 128), :math:`T` is listed iff some query of :math:`Q` selects a
  MoBA block that overlaps :math:`T` (the union of the tile's selections), so FlexAttention visits only those;
* a **per-token** ``mask_mod``: key :math:`j` is kept for query :math:`t` iff :math:`\lfloor j/B \rfloor` is one
  of :math:`t`'s selected blocks and, when causal, :math:`j \le t`. This is exactly :math:`S_t` of
  docs/design.md, "MoBA semantics", so the output equals the reference's given the same routing.

The union is coarse (random routing makes a 128-query tile touch most past blocks), which is the cost of
expressing MoBA as a block-sparse mask; the token mask keeps the result exact.
"""

from __future__ import annotations

import math
import time

import torch

#: Longest sequence the peer takes: FlexAttention's mask indexing overflows int32 beyond it.
FLEX_MAX_SEQLEN = 128 * 1024
#: Query tile of the block mask (FlexAttention's default sparse block size).
Q_TILE = 128


def kv_tile_for(block_size: int) -> int:
    """KV tile of the block mask: B itself when it is a multiple of 128, else 128 (a FlexAttention kernel tile
    must divide the mask's tile; the token mask keeps any B exact)."""
    return block_size if block_size % 128 == 0 else 128


def flex_unavailable(seqlen: int, block_size: int) -> str | None:
    """Why the peer cannot run this shape (None when it can)."""
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError as exc:
        return f"torch {torch.__version__} has no flex_attention ({exc})"
    if seqlen > FLEX_MAX_SEQLEN:
        return f"N > {FLEX_MAX_SEQLEN // 1024}K: mask indexing overflows int32"
    if seqlen % Q_TILE:
        return f"N not a multiple of {Q_TILE}"
    return None


def tile_union(topk: torch.Tensor, block_size: int, seqlen: int, *, q_tile: int = Q_TILE,
               kv_tile: int | None = None) -> torch.Tensor:
    """bool (batch, heads, ceil(N/q_tile), ceil(N/kv_tile)): KV tile T listed for query tile Q iff a query of Q
    selects a block that overlaps T (a block of B keys covers tiles first..last: at most two when B <= tile,
    up to ceil(B / tile) + 1 when a tile narrower than B is asked for)."""
    kv_tile = kv_tile_for(block_size) if kv_tile is None else kv_tile
    b, n, h, k = topk.shape
    n_q, n_kv = math.ceil(seqlen / q_tile), math.ceil(seqlen / kv_tile)
    sel = topk.permute(0, 2, 1, 3).long()  # (b, h, n, k)
    valid = sel >= 0
    blk = sel.clamp(min=0)
    first = blk * block_size // kv_tile
    last = (torch.clamp((blk + 1) * block_size, max=seqlen) - 1) // kv_tile
    row = (torch.arange(b, device=topk.device).view(b, 1, 1, 1) * h
           + torch.arange(h, device=topk.device).view(1, h, 1, 1)) * n_q \
        + (torch.arange(n, device=topk.device) // q_tile).view(1, 1, n, 1)
    union = torch.zeros(b * h * n_q * n_kv, dtype=torch.bool, device=topk.device)
    for step in range(-(-block_size // kv_tile) + 1):  # every tile first..last, the middle ones too
        tile = first + step
        union[(row * n_kv + tile)[valid & (tile <= last)]] = True
    return union.view(b, h, n_q, n_kv)


def moba_mask_mod(topk: torch.Tensor, block_size: int, causal: bool):
    """The per-token mask: key ``kv`` kept for query ``q`` iff ``kv // B`` is in ``topk[b, q, h]`` (and
    ``kv <= q`` when causal). The slots are unrolled (one comparison each) so the function compiles to a
    Triton mask; -1 slots never match a block."""
    table = topk.permute(0, 2, 1, 3).contiguous().to(torch.int32)  # (b, h, n, k): one row per query
    slots = table.shape[-1]

    def mask_mod(b, h, q_idx, kv_idx):
        blk = kv_idx // block_size
        hit = table[b, h, q_idx, 0] == blk
        for s in range(1, slots):
            hit = hit | (table[b, h, q_idx, s] == blk)
        if causal:
            hit = hit & (kv_idx <= q_idx)
        return hit

    return mask_mod


def moba_block_mask(topk: torch.Tensor, block_size: int, seqlen: int, causal: bool, *,
                    kv_tile: int | None = None):
    """FlexAttention ``BlockMask`` for MoBA with the routing ``topk``: :func:`tile_union` as the KV blocks of
    each 128-query tile (listed in ascending order) and :func:`moba_mask_mod` as the token mask."""
    from torch.nn.attention.flex_attention import BlockMask

    kv_tile = kv_tile_for(block_size) if kv_tile is None else kv_tile
    union = tile_union(topk, block_size, seqlen, kv_tile=kv_tile)
    counts = union.sum(-1, dtype=torch.int32)
    # listed tiles first, each group in ascending tile order (stable sort of the 0/1 flags)
    order = torch.sort(union.to(torch.int8), dim=-1, descending=True, stable=True).indices.to(torch.int32)
    return BlockMask.from_kv_blocks(counts, order.contiguous(), BLOCK_SIZE=(Q_TILE, kv_tile),
                                    mask_mod=moba_mask_mod(topk, block_size, causal), seq_lengths=(seqlen, seqlen))


def flex_moba_attention(q, k, v, topk, block_size, causal=True, *, block_mask=None, compiled=False):
    """MoBA attention through FlexAttention, layouts of docs/design.md, "MoBA semantics" (q (b, N, h, d), k and
    v (b, N, kv_heads, d)); output (b, N, h, d). ``compiled`` uses the peer's ``torch.compile`` d kernel."""
    from torch.nn.attention.flex_attention import flex_attention

    seqlen = q.shape[1]
    if block_mask is None:
        block_mask = moba_block_mask(topk, block_size, seqlen, causal)
    fn = compiled_flex() if compiled else flex_attention
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    out = fn(qt, kt, vt, block_mask=block_mask, enable_gqa=kt.shape[1] != qt.shape[1])
    return out.transpose(1, 2)


_COMPILED = None


def compiled_flex():
    global _COMPILED
    if _COMPILED is None:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED = torch.compile(flex_attention, dynamic=False)
    return _COMPILED


def _rel_err(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def run_flex(q, k, v, topk, block_size, top_k, causal, time_ms, *, ref_out=None, dout=None, budget_s=1.5):
    """Time the compiled FlexAttention peer on mobalab's inputs and routing (bench row keys ``flex_*``).

    Forward (``dout`` None): ``flex_ms``, ``flex_rel_err`` (against ``ref_out``); forward + backward: ``flex_ms``
    of ``torch.autograd.grad`` over q, k, v. Also ``flex_mask_ms`` (block mask build, not in ``flex_ms``) and
    ``flex_compile_s`` (first call, not timed). The inputs are leaves with ``requires_grad`` in both passes so
    one compiled graph serves both (its backward compiles lazily at the first backward)."""
    reason = flex_unavailable(q.shape[1], block_size)
    if reason:
        return {"flex_note": f"n/a ({reason})"}
    seqlen = q.shape[1]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    mask = moba_block_mask(topk, block_size, seqlen, causal)
    torch.cuda.synchronize()
    row = {"flex_mask_ms": (time.perf_counter() - t0) * 1e3,
           "flex_tiles": mask.kv_num_blocks.float().mean().item()}
    fn = compiled_flex()
    leaves = [x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v)]
    gqa = leaves[1].shape[1] != leaves[0].shape[1]

    def fwd():
        return fn(*leaves, block_mask=mask, enable_gqa=gqa)

    if dout is None:
        call = fwd
    else:
        dt = dout.transpose(1, 2).contiguous()

        def call():
            return torch.autograd.grad(fwd(), leaves, dt)

    t0 = time.perf_counter()
    out = call()
    torch.cuda.synchronize()
    row["flex_compile_s"] = time.perf_counter() - t0
    if dout is None and ref_out is not None:
        row["flex_rel_err"] = _rel_err(out.transpose(1, 2), ref_out)
    del out
    row["flex_ms"], _ = time_ms(call, budget_s=budget_s)
    return row
