r"""FlashMoBA (the MoBA paper's CUDA code) as an optional benchmark peer, when its extension is importable.

FlashMoBA is not a dependency: ``scripts/build_flash_moba.sh`` builds it from a source bundle into
``$MOBALAB_FLASH_MOBA_DIR`` (default ``/tmp/fm/flash-moba``), whose ``flash_moba`` package and ``build_min``
extension folder are put on ``sys.path`` here when a plain import fails. Its API is packed variable-length
only: (total_tokens, heads, d) tensors with int32 ``cu_seqlens``; a (b, N, h, d) batch packs as a view.

Its routing rule is the one of docs/design.md, "MoBA semantics" (own block forced and counted in k, candidates
the complete past blocks), with its block centroids pooled to the input dtype (bf16) before scoring, where
mobalab keeps them in fp32. Its per-query selection (its fused top-k kernel's row output) is compared with
mobalab's: the share of (batch, query, head) rows whose block sets differ, and for those rows which side
equals the fp64 selection (:func:`selection_agreement`).
"""

from __future__ import annotations

import math
import os
import sys

import torch

DIR_ENV = "MOBALAB_FLASH_MOBA_DIR"
DEFAULT_DIR = "/tmp/fm/flash-moba"
#: What the minimal build covers (other head dims / dtypes / non-causal need more kernels compiled in).
BUILT = dict(dtype=torch.bfloat16, head_dim=128, causal=True, max_top_k=16)

_LOADED = None


def load():
    """(``flash_moba`` package, ``flash_moba_cuda`` extension), or (None, reason)."""
    global _LOADED
    if _LOADED is not None:
        return _LOADED
    try:
        import flash_moba  # noqa: F401
    except ImportError:
        root = os.environ.get(DIR_ENV, DEFAULT_DIR)
        for p in (os.path.join(root, "build_min"), root):
            if os.path.isdir(p) and p not in sys.path:
                sys.path.insert(0, p)
    try:
        import flash_moba
        import flash_moba_cuda
    except Exception as exc:  # ImportError, or a broken build's OSError / undefined symbol
        _LOADED = (None, f"flash_moba not importable: {type(exc).__name__}: {str(exc)[:80]}")
    else:
        _LOADED = (flash_moba, flash_moba_cuda)
    return _LOADED


def unavailable(dtype, head_dim, causal, top_k, heads, kv_heads) -> str | None:
    """Why the peer cannot run this configuration (None when it can)."""
    mod, reason = load()
    if mod is None:
        return reason
    if dtype != BUILT["dtype"] or head_dim != BUILT["head_dim"] or causal != BUILT["causal"]:
        return "built for bf16, d 128, causal only"
    if top_k > BUILT["max_top_k"]:
        return f"top-k > {BUILT['max_top_k']}"
    if heads != kv_heads:
        return "GQA not compared"
    return None


def pack(x):
    """(b, N, h, d) -> (b N, h, d) and int32 ``cu_seqlens`` (b + 1,) of equal lengths N."""
    b, n = x.shape[:2]
    cu = torch.arange(0, (b + 1) * n, n, dtype=torch.int32, device=x.device)
    return x.reshape(b * n, *x.shape[2:]), cu


def selection(q, k, block_size, top_k, causal=True):
    """FlashMoBA's selected blocks, int32 (b, N, h, top_k), -1 = unused: its fused top-k kernel's per-query
    output on its own bf16 block means (the routing its attention uses)."""
    mod, ext = load()
    from flash_moba.triton_mean_pool import flash_topk_mean_pool

    b, n, h, _ = q.shape
    qp, cu = pack(q)
    kp, _ = pack(k)
    km, cu_km, _ = flash_topk_mean_pool(kp, cu, n, block_size)
    res = ext.moba_fused_topk(qp, km, cu, cu, cu_km, n, n, top_k, block_size, causal)
    rows = res[4]  # (total_q, heads, slots rounded up to 16): per-query block indices, -1 padded
    return rows[..., :top_k].reshape(b, n, h, top_k).to(torch.int32)


def _fp64_selection(q_rows, cent_rows, t, block_size, top_k, causal):
    """fp64 routing of some rows: q_rows (m, d), cent_rows (m, n_blocks, d), t (m,) positions; (m, top_k)
    sorted, -1 padded, ties toward the higher block index (docs/design.md, "MoBA semantics")."""
    scores = torch.einsum("md,mnd->mn", q_rows, cent_rows)
    n_blocks = scores.shape[1]
    blk = torch.arange(n_blocks, device=scores.device)
    own = (t // block_size).unsqueeze(1)
    if causal:
        scores = torch.where(blk < own, scores, torch.tensor(-math.inf, dtype=scores.dtype, device=scores.device))
        scores = torch.where(blk == own, torch.tensor(math.inf, dtype=scores.dtype, device=scores.device), scores)
    take = min(top_k, n_blocks)
    order = torch.sort(scores.flip(-1), dim=-1, descending=True, stable=True).indices[:, :take]
    picked = n_blocks - 1 - order
    picked = torch.where(scores.gather(1, picked) == -math.inf, -1, picked)
    out = torch.full((scores.shape[0], top_k), -1, dtype=torch.long, device=scores.device)
    out[:, :take] = picked
    return out.sort(-1).values


def block_sets_differ(sel_a, sel_b):
    """Per (batch, query, head) row of two routings (b, N, h, top_k): whether their block sets differ (slot order
    aside)."""
    a, b = (s.long().sort(-1).values for s in (sel_a, sel_b))
    return (a != b).any(-1)


def selection_agreement(sel_a, sel_b, q, k, block_size, top_k, causal=True, *, max_rows=16384):
    """Compare two routings (b, N, h, top_k) of the same q, k as block sets per (batch, query, head) row.

    Returns ``rows_differ`` (share of rows whose sets differ), ``checked`` (differing rows checked against the
    fp64 routing: all, or an evenly spaced ``max_rows`` of them), ``a_is_fp64`` / ``b_is_fp64`` (share of the
    checked rows where that side's set equals the fp64 one). fp64 centroids are the means of the real keys of
    each block (kv head ``h // (heads / kv_heads)``).
    """
    a, b = (s.long().sort(-1).values for s in (sel_a, sel_b))
    differ = (a != b).any(-1)  # (b, N, h); the sorted sets are compared with the fp64 ones below too
    out = dict(rows_differ=differ.float().mean().item(), checked=0, a_is_fp64=math.nan, b_is_fp64=math.nan)
    idx = differ.nonzero()
    if idx.shape[0] == 0:
        return out
    if idx.shape[0] > max_rows:
        idx = idx[torch.linspace(0, idx.shape[0] - 1, max_rows, device=idx.device).long()]
    batch, seqlen, heads, _ = q.shape
    kv_heads = k.shape[2]
    n_blocks = math.ceil(seqlen / block_size)
    kd = torch.nn.functional.pad(k.double(), (0, 0, 0, 0, 0, n_blocks * block_size - seqlen))
    counts = torch.clamp(seqlen - torch.arange(n_blocks, device=k.device) * block_size, max=block_size)
    cent = kd.view(batch, n_blocks, block_size, kv_heads, -1).sum(2) / counts.view(1, -1, 1, 1).double()
    a_ok = b_ok = 0
    for part in idx.split(1024):
        bi, ti, hi = part.unbind(1)
        ref = _fp64_selection(q[bi, ti, hi].double(), cent[bi, :, hi // (heads // kv_heads)], ti, block_size,
                              top_k, causal)
        a_ok += (a[bi, ti, hi] == ref).all(-1).sum().item()
        b_ok += (b[bi, ti, hi] == ref).all(-1).sum().item()
    out.update(checked=idx.shape[0], a_is_fp64=a_ok / idx.shape[0], b_is_fp64=b_ok / idx.shape[0])
    return out


def _rel_err(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def packed_step(q, k, v, dout, block_size, top_k, causal=True):
    """FlashMoBA's forward on mobalab's (b, N, h, d) inputs for a gradient: (leaves, forward, grad_out) with the
    packed q, k, v copies as leaves, ``forward()`` their attention output (packed), ``grad_out`` dout packed."""
    mod, _ = load()
    b, n, h, d = q.shape
    leaves = tuple(pack(x.detach())[0].clone().requires_grad_() for x in (q, k, v))
    cu = pack(q)[1]

    def forward():
        return mod.flash_moba_varlen_func(*leaves, cu, cu, n, n, block_size, top_k, causal=causal)

    return leaves, forward, dout.reshape(b * n, h, d)


def run_flash_moba(q, k, v, block_size, top_k, causal, time_ms, *, ref_out=None, ref_topk=None, dout=None,
                   budget_s=1.5):
    """Time FlashMoBA (its routing + attention) on mobalab's inputs (bench row keys ``flashmoba_*``).

    Forward (``dout`` None): ``flashmoba_ms``, ``flashmoba_rel_err`` against ``ref_out``, and with ``ref_topk``
    (mobalab's routing) the selection comparison (``flashmoba_sel_differ``, ``flashmoba_sel_fm_fp64``,
    ``flashmoba_sel_mb_fp64``); forward + backward: ``flashmoba_ms`` of ``torch.autograd.grad`` over q, k, v."""
    reason = unavailable(q.dtype, q.shape[-1], causal, top_k, q.shape[2], k.shape[2])
    if reason:
        return {"flashmoba_note": f"n/a ({reason})"}
    mod, _ = load()
    fn = mod.flash_moba_varlen_func
    b, n, h, d = q.shape
    row = {}
    if dout is None:
        qp, cu = pack(q)
        kp, vp = pack(k)[0], pack(v)[0]

        def call():
            with torch.no_grad():
                return fn(qp, kp, vp, cu, cu, n, n, block_size, top_k, causal=causal)

        if ref_out is not None:
            row["flashmoba_rel_err"] = _rel_err(call().view(b, n, h, d), ref_out)
        if ref_topk is not None:
            try:
                agree = selection_agreement(selection(q, k, block_size, top_k, causal), ref_topk, q, k, block_size,
                                            top_k, causal)
                row.update(flashmoba_sel_differ=agree["rows_differ"], flashmoba_sel_fm_fp64=agree["a_is_fp64"],
                           flashmoba_sel_mb_fp64=agree["b_is_fp64"], flashmoba_sel_checked=agree["checked"])
            except Exception as exc:  # the comparison is extra: keep the timing
                row["flashmoba_sel_note"] = f"n/a ({type(exc).__name__}: {str(exc)[:80]})"
    else:
        leaves, forward, dp = packed_step(q, k, v, dout, block_size, top_k, causal)

        def call():
            return torch.autograd.grad(forward(), leaves, dp)

    row["flashmoba_ms"], _ = time_ms(call, budget_s=budget_s)
    return row
