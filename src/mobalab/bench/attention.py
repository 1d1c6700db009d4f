r"""MoBA forward vs dense attention on one GPU: ``python -m mobalab.bench.attention [--quick] [--out DIR]``.

Side by side in one process, on the same inputs: mobalab's forward (CUDA routing + key-block-major
attention), its routing alone and its attention alone (given the routing), and torch SDPA with the
FLASH_ATTENTION backend (FlashAttention-2) and the CUDNN_ATTENTION backend. Configuration of the published
FlashMoBA benchmark: batch 2, 16 heads, head dim 128, block 128, top-k 8, causal, bf16, seqlen 8K..512K;
also head dim 64, and block sizes 32..256 at 64K. Workloads: random Gaussian q/k/v (near-random routing,
the published benchmark's data) and a clustered / planted one (query groups share a direction that a few
key blocks are aligned with, so routing concentrates).

Reported: median ms over CUDA-event-timed repetitions (warm-up first; repetitions sized to ~1.5 s, a
single one for the dense baselines beyond 128K, where the forward warms up cuDNN and the backward times its
dense steps without a warm-up: a dense 512K step takes seconds, and their times scale by 4.0x per doubling),
speedups, routing share of the forward, useful TFLOP/s

.. math::
    F = \underbrace{2\,b\,h\,\textstyle\sum_t n_{\mathrm{scored}}(t)\, d}_{\text{routing}}
      + \underbrace{4\,b\,h\,\textstyle\sum_t |S_t|\, d}_{\text{attention}},

(:math:`n_{\mathrm{scored}}(t)` = complete past blocks when causal, all blocks otherwise; :math:`|S_t|` =
attended keys) and peak memory: the ``torch.cuda.max_memory_allocated`` rise during the call, plus the
inputs the method reads (q, k, v; for SDPA its (b, h, N, d) copies), so totals compare like for like.
Writes ``bench.csv``, ``bench_table.md`` and ``bench_env.json`` (:func:`mobalab.bench.environment` plus the
kernel settings: routing, tile-kernel variant, scratch budget) under ``--out``. Also ``mobalab bench``.

``--backward`` times forward + backward instead (``bench_bwd.csv``, ``bench_bwd_table.md``): mobalab
(routing, forward, CUDA backward through the autograd op, default atomic dQ and ``deterministic=True``),
SDPA FLASH_ATTENTION and CUDNN_ATTENTION, each as ``torch.autograd.grad(out, (q, k, v), dout)`` on the same
inputs and upstream gradient. Backward useful FLOPs are 2.5x the forward attention FLOPs (five matmuls of
the selected tokens: S, dP, dV, dK, dQ, against two); backward time = fwd+bwd time - forward time; peak
memory = the ``max_memory_allocated`` rise over one fwd+bwd call plus the inputs it reads (q, k, v, dout).

``--head-dims 64,128,256`` runs every head-dim-128 configuration of the forward (or ``--backward``) sweep at
each listed head dim instead (default: the sweeps as they are, head dim 128 plus the full forward sweep's
head-dim-64 rows). Useful FLOPs carry the head dim (:math:`d` in both terms of :math:`F`).

``--dims`` measures speed per head dim in one short run (``dims.csv``, ``dims_table.md``): batch 2, 16 heads,
N 64K, B 128, k 8, causal, bf16, random inputs, mobalab only (no dense baselines), forward and forward +
backward (atomic dQ) at head dims 32, 64, 96, 128, 256 (or ``--head-dims``; 128 always runs, first). Each
row's useful TFLOP/s (forward :math:`F`; forward + backward :math:`F_{\mathrm{route}} + 3.5\,F_{\mathrm{attn}}`)
is divided by head dim 128's in the same run and held to its target (:data:`DIMS_TARGETS`: at least 0.7
for head dims 96 and 256, 0.5 for 32 and 64).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys

import torch

from mobalab import _validate as V
from mobalab.kernels import _cuda_attention as A
from mobalab.kernels._contract import CENTROID_PRECISIONS, CUDA_HEAD_DIMS
from mobalab.kernels._cuda_routing import (
    DEFAULT_ROUTER_VARIANT,
    ROUTER_CHOICES,
    ROUTER_VARIANT_ENV,
    moba_topk_cuda,
)
from mobalab.kernels.autograd import moba_attention_autograd

from ._interleaved import build_option_arg, build_options
from .environment import environment

__all__ = ["main", "routing_flops", "attended_keys", "attention_flops", "dense_flops", "parse_head_dims",
           "with_head_dims", "dims_summary", "parse_peers"]

#: Useful TFLOP/s of head dim d over head dim 128's (same run, same pass) that the ``--dims`` run asks for.
DIMS_TARGETS = {32: 0.5, 64: 0.5, 96: 0.7, 256: 0.7}
#: The ``--dims`` configuration: (batch, seqlen, heads, block, top_k), causal, bf16, random inputs.
DIMS_CONFIG = (2, 64 * 1024, 16, 128, 8)
DIMS_REFERENCE = 128


# --------------------------------------------------------------------------------------------------
# counting


def _counts(**values) -> list[int]:
    """Shape arguments of the counts as Python ints: a count >= 1, ``seqlen`` >= 0 (a float or a negative
    would make a count that is no count of anything)."""
    return [V.scalar_count(name, value, 0 if name == "seqlen" else 1) for name, value in values.items()]


def routing_flops(batch, seqlen, heads, dim, block, causal):
    r"""Useful routing FLOPs, :math:`2\,b\,h\,d\sum_t n_{\mathrm{scored}}(t)`: one :math:`q\cdot\bar k` per scored
    block (causal: the complete past blocks, :math:`\lfloor t/B \rfloor`; otherwise all :math:`\lceil N/B \rceil`).

    Examples
    --------
    >>> routing_flops(1, 8, 1, 4, 2, causal=True)  # queries score 0, 0, 1, 1, 2, 2, 3, 3 blocks
    96
    """
    batch, seqlen, heads, dim = _counts(batch=batch, seqlen=seqlen, heads=heads, dim=dim)
    block, causal = V.scalar_count("block", block), V.flag("causal", causal)
    n_blocks = math.ceil(seqlen / block)
    if causal:  # sum_t floor(t / B): complete past blocks scored by query t
        full, rest = divmod(seqlen, block)
        scored = block * full * (full - 1) // 2 + rest * full
    else:
        scored = seqlen * n_blocks
    return 2 * batch * heads * scored * dim


def attended_keys(seqlen, block, top_k, causal):
    r""":math:`\sum_t |S_t|` for routing that fills every slot it can (own block token-causal, past blocks full).

    Examples
    --------
    >>> attended_keys(8, 2, 2, causal=True)  # 1, 2, then 3, 4 (one past block + own) for every later block
    24
    """
    seqlen = V.scalar_count("seqlen", seqlen, 0)
    block, top_k, causal = V.scalar_count("block", block), V.scalar_count("top_k", top_k), V.flag("causal", causal)
    if not causal:  # k full blocks, an upper bound where the partial last block may be among them; every key at k >= n
        return seqlen * min(top_k * block, seqlen)
    t = torch.arange(seqlen, dtype=torch.float64)
    own = t // block
    return int(((t - own * block + 1) + torch.clamp(own, max=top_k - 1) * block).sum().item())


def attention_flops(batch, seqlen, heads, dim, block, top_k, causal):
    r"""Useful attention FLOPs, :math:`4\,b\,h\,d\sum_t |S_t|` (:math:`QK^\top` and :math:`PV`).

    Examples
    --------
    >>> attention_flops(1, 8, 1, 4, 2, 2, causal=True)
    384
    """
    batch, heads, dim = _counts(batch=batch, heads=heads, dim=dim)
    return 4 * batch * heads * attended_keys(seqlen, block, top_k, causal) * dim


def dense_flops(batch, seqlen, heads, dim, causal):
    r"""FLOPs of dense attention, :math:`4\,b\,h\,N^2 d` (halved when causal), the FA2 / cuDNN reference.

    Examples
    --------
    >>> dense_flops(1, 8, 1, 4, causal=True)
    512
    """
    batch, seqlen, heads, dim = _counts(batch=batch, seqlen=seqlen, heads=heads, dim=dim)
    causal = V.flag("causal", causal)
    return 4 * batch * heads * seqlen * seqlen * dim // (2 if causal else 1)


# --------------------------------------------------------------------------------------------------
# inputs


def make_inputs(workload, batch, seqlen, heads, dim, dtype, seed, block):
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape = (batch, seqlen, heads, dim)
    q = torch.randn(shape, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(shape, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(shape, device="cuda", dtype=dtype, generator=g)
    if workload == "clustered":
        # Query groups of 2048 positions share a direction u_g; 4 key blocks in each group's past (own
        # block for the first group) hold keys aligned with u_g. Routing then concentrates on those blocks.
        group = 2048
        n_groups = math.ceil(seqlen / group)
        n_blocks = math.ceil(seqlen / block)
        u = torch.randn(n_groups, heads, dim, device="cuda", generator=g)
        u = u / u.norm(dim=-1, keepdim=True) * math.sqrt(dim)
        gid = torch.arange(seqlen, device="cuda") // group
        q.add_((2.0 * u[gid]).unsqueeze(0).to(dtype))
        starts = torch.arange(n_groups, device="cuda") * group // block  # first block of each group
        picks = torch.rand(n_groups, 4, device="cuda", generator=g) * torch.clamp(starts, min=1).unsqueeze(1)
        picks = picks.long().clamp(max=n_blocks - 1)
        for c in range(4):
            blk = picks[:, c]
            idx = (blk.view(-1, 1) * block + torch.arange(block, device="cuda")).clamp(max=seqlen - 1)
            k[:, idx.flatten()] += (1.5 * u.repeat_interleave(block, 0)).to(dtype)
    return q, k, v


# --------------------------------------------------------------------------------------------------
# timing


def time_ms(fn, *, budget_s=1.5, max_reps=50, min_reps=3, warmup=1, single=False):
    """Median of CUDA-event-timed calls; repetitions sized from a first timed call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()

    def once():
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b)

    first = once()
    if single:
        return first, 1
    reps = int(max(min_reps, min(max_reps, budget_s * 1e3 / max(first, 1e-3))))
    times = [once() for _ in range(reps)]
    return statistics.median(times), reps


def time_queued_ms(fn, *, steps=10, rounds=7, warmup=2):
    """Median over ``rounds`` of the mean time per call of ``steps`` calls issued back to back (CUDA events around
    the run, one wait at its end). A training loop issues the next step while the GPU runs this one, so a step's
    host time shows only where it exceeds its GPU time; this is how torch.utils.benchmark's ``Timer.timeit`` (and
    FlashAttention's benchmarks with it) time a call, where :func:`time_ms` starts every call from an idle GPU."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(steps):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / steps)
    return statistics.median(times)


def peak_gb(fn):
    """Rise of max_memory_allocated over the call (GB)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 1e9


# --------------------------------------------------------------------------------------------------
# one configuration


def _dense(backend, qt, kt, vt):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"fa2": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]

    def run():
        with sdpa_kernel(be):
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)

    return run


def kernel_times(fn, warmup: int = 1) -> dict[str, tuple[float, int]]:
    """{kernel name: (GPU ms, launches)} over one call of ``fn`` after ``warmup`` calls, from the torch profiler
    (CuPy kernels included), largest first; each kernel's own time, so no gaps between launches. Names are whole
    (C++ template names run long: shorten them for display)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    totals = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t > 0:
            totals[ev.key] = (t / 1e3, ev.count)
    return dict(sorted(totals.items(), key=lambda kv: -kv[1][0]))


def kernel_breakdown(fn) -> dict:
    """GPU time (ms) per kernel name over one call, from the torch profiler (CuPy kernels included): the eight
    largest."""
    return {name[:48]: round(ms, 3) for name, (ms, _) in list(kernel_times(fn).items())[:8]}


def run_config(workload, batch, seqlen, heads, dim, block, top_k, dense=True, seed=0, dense_cache=None,
               profile=False, variant="auto", peers=(), budget_s=1.5):
    # "auto": the tile-kernel default ($MOBALAB_ATTN_VARIANT, else auto)
    variant = None if variant == "auto" else variant
    causal = True
    dtype = torch.bfloat16
    q, k, v = make_inputs(workload, batch, seqlen, heads, dim, dtype, seed, block)
    in_gb = 3 * q.numel() * q.element_size() / 1e9
    row = dict(workload=workload, batch=batch, seqlen=seqlen, heads=heads, head_dim=dim, block=block,
               top_k=top_k, causal=causal, dtype="bf16", routing="cuda",
               variant=A.variant_label(dim, block, variant, q.device, top_k, q.shape[2] // k.shape[2]),
               scratch_budget_bytes=A.forward_scratch_budget(batch, seqlen, heads, heads, dim))

    route = lambda: moba_topk_cuda(q, k, block, top_k, causal=causal)  # noqa: E731
    row["routing_ms"], _ = time_ms(route, budget_s=budget_s)
    topk = route()
    attn = lambda: A.moba_attention_cuda(q, k, v, block, top_k, causal=causal, topk_indices=topk,  # noqa: E731
                                         variant=variant)
    row["attention_ms"], row["reps"] = time_ms(attn, budget_s=budget_s)
    full = lambda: A.moba_attention_cuda(q, k, v, block, top_k, causal=causal, variant=variant)  # noqa: E731
    row["mobalab_ms"], _ = time_ms(full, budget_s=budget_s)
    row["mobalab_peak_gb"] = peak_gb(full) + in_gb
    if profile:
        row["phases"] = kernel_breakdown(attn)
        print(f"  kernel time by name (attention only, N={seqlen}, B={block}): {row['phases']}")
    row["routing_share"] = row["routing_ms"] / row["mobalab_ms"]
    f_route = routing_flops(batch, seqlen, heads, dim, block, causal)
    f_attn = attention_flops(batch, seqlen, heads, dim, block, top_k, causal)
    row["useful_tflops"] = (f_route + f_attn) / (row["mobalab_ms"] * 1e9)
    row["attention_tflops"] = f_attn / (row["attention_ms"] * 1e9)
    row["routing_tflops"] = f_route / (row["routing_ms"] * 1e9)
    if peers:
        row.update(run_peers(peers, q, k, v, block, top_k, causal, topk=topk, ref_out=full(), budget_s=budget_s))
        for name, base, flops in (("flex", "attention_ms", f_attn), ("flashmoba", "mobalab_ms", f_route + f_attn)):
            _peer_ratios(row, name, base, flops)

    key = (seqlen, dim, batch, heads, workload)
    if dense and dense_cache is not None and key in dense_cache:
        row.update(dense_cache[key])
    elif dense:
        qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        del q, k, v
        res = {}
        for name in ("fa2", "cudnn"):
            fn = _dense(name, qt, kt, vt)
            long = seqlen > 131072
            try:
                res[f"{name}_ms"], _ = time_ms(fn, warmup=1 if (name == "cudnn" or not long) else 0,
                                               single=long)
                res[f"{name}_peak_gb"] = peak_gb(fn) + in_gb if seqlen <= 131072 else float("nan")
                dense_f = dense_flops(batch, seqlen, heads, dim, True)
                res[f"{name}_tflops"] = dense_f / (res[f"{name}_ms"] * 1e9)
            except RuntimeError as exc:  # e.g. a backend that does not take this shape
                print(f"  {name} failed at N={seqlen}: {exc}")
                res[f"{name}_ms"] = res[f"{name}_peak_gb"] = res[f"{name}_tflops"] = float("nan")
        if seqlen > 131072:  # one memory measurement for the long ones (FA2 only: it is the target)
            res["fa2_peak_gb"] = peak_gb(_dense("fa2", qt, kt, vt)) + in_gb
        del qt, kt, vt
        if dense_cache is not None:
            dense_cache[key] = res
        row.update(res)
    for name in ("fa2", "cudnn"):
        if f"{name}_ms" in row:
            row[f"speedup_vs_{name}"] = row[f"{name}_ms"] / row["mobalab_ms"]
    torch.cuda.empty_cache()
    return row


# --------------------------------------------------------------------------------------------------
# head dims


def parse_head_dims(text: str) -> tuple[int, ...]:
    """``"64,128"`` -> ``(64, 128)``: distinct head dims in the given order, each one the CUDA kernels support.

    Examples
    --------
    >>> parse_head_dims("256, 32,128,32")
    (256, 32, 128)
    """
    if not isinstance(text, str):
        raise TypeError(f"head dims: expected a comma-separated string, got {type(text).__name__}")
    dims = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit() or int(item) not in CUDA_HEAD_DIMS:
            raise ValueError(f"head dims: {item!r} in {text!r} is not a supported head dim; supported: "
                             f"{', '.join(map(str, CUDA_HEAD_DIMS))}")
        if int(item) not in dims:
            dims.append(int(item))
    return tuple(dims)


def _head_dims_arg(text: str) -> tuple[int, ...]:
    try:
        return parse_head_dims(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def with_head_dims(cfgs, head_dims, dim_index: int = 4):
    """Every configuration at head dim 128, once per head dim of ``head_dims`` (the configuration's order
    first, then the head dims'); configurations at other head dims are dropped. ``head_dims`` None: unchanged.

    Examples
    --------
    >>> with_head_dims([("a", 128), ("b", 64), ("c", 128)], (32, 128), dim_index=1)
    [('a', 32), ('a', 128), ('c', 32), ('c', 128)]
    """
    if head_dims is None:
        return list(cfgs)
    out = []
    for cfg in cfgs:
        if cfg[dim_index] != DIMS_REFERENCE:
            continue
        for d in head_dims:
            new = (*cfg[:dim_index], d, *cfg[dim_index + 1:])
            if new not in out:
                out.append(new)
    return out


def run_dims_config(dim, budget_s=0.5):
    """Forward and forward + backward of mobalab alone at :data:`DIMS_CONFIG` and head dim ``dim``: two rows."""
    batch, seqlen, heads, block, top_k = DIMS_CONFIG
    q, k, v = make_inputs("random", batch, seqlen, heads, dim, torch.bfloat16, seqlen + dim + block, block)
    g = torch.Generator(device="cuda").manual_seed(seqlen + dim + block + 1)
    dout = torch.randn(q.shape, device="cuda", dtype=q.dtype, generator=g)
    f_route = routing_flops(batch, seqlen, heads, dim, block, True)
    f_attn = attention_flops(batch, seqlen, heads, dim, block, top_k, True)
    fwd = lambda: A.moba_attention_cuda(q, k, v, block, top_k, causal=True)  # noqa: E731
    fwd_ms, fwd_reps = time_ms(fwd, budget_s=budget_s)
    leaves = [x.requires_grad_() for x in (q, k, v)]  # after the forward timing, which ran without autograd
    step = _grad_fn(lambda q, k, v: moba_attention_autograd(q, k, v, block, top_k, causal=True), leaves, dout)
    both_ms, both_reps = time_ms(step, budget_s=budget_s)
    common = dict(head_dim=dim, batch=batch, seqlen=seqlen, heads=heads, block=block, top_k=top_k, causal=True,
                  dtype="bf16", variant="resident" if A.resident(dim, block, None) else "streaming")
    return [dict(common, timed="forward", ms=fwd_ms, reps=fwd_reps, useful_tflop=(f_route + f_attn) / 1e12,
                 useful_tflops=(f_route + f_attn) / (fwd_ms * 1e9)),
            dict(common, timed="forward+backward", ms=both_ms, reps=both_reps,
                 useful_tflop=(f_route + 3.5 * f_attn) / 1e12,
                 useful_tflops=(f_route + 3.5 * f_attn) / (both_ms * 1e9))]


def dims_summary(rows):
    """Rows (``timed``, ``head_dim``, ``useful_tflops``, ...) sorted by pass then head dim, each with
    ``vs_d128`` (its useful TFLOP/s over head dim 128's of the same pass; NaN without a head-dim-128 row),
    ``target`` (:data:`DIMS_TARGETS`; NaN for head dim 128) and ``result`` (met / missed / reference / n/a).

    Examples
    --------
    >>> rows = [dict(timed="forward", head_dim=d, useful_tflops=t) for d, t in ((128, 80.0), (32, 36.0), (96, 60.0))]
    >>> [(r["head_dim"], round(r["vs_d128"], 2), r["result"]) for r in dims_summary(rows)]
    [(32, 0.45, 'missed'), (96, 0.75, 'met'), (128, 1.0, 'reference')]
    """
    order = {"forward": 0, "forward+backward": 1}
    out = []
    for r in sorted(rows, key=lambda r: (order.get(r["timed"], 2), r["timed"], r["head_dim"])):
        ref = [x["useful_tflops"] for x in rows if x["timed"] == r["timed"] and x["head_dim"] == DIMS_REFERENCE]
        ratio = r["useful_tflops"] / ref[0] if ref and ref[0] > 0 else float("nan")
        target = DIMS_TARGETS.get(r["head_dim"], float("nan"))
        if r["head_dim"] == DIMS_REFERENCE:
            result = "reference"
        elif math.isnan(ratio) or math.isnan(target):
            result = "n/a"
        else:
            result = "met" if ratio >= target else "missed"
        out.append(dict(r, vs_d128=ratio, target=target, result=result))
    return out


DIMS_COLUMNS = ["timed", "head_dim", "ms", "useful_tflops", "vs_d128", "target", "result", "useful_tflop", "reps",
                "variant", "batch", "seqlen", "heads", "block", "top_k", "causal", "dtype"]


def markdown_dims(rows, env) -> str:
    """The ``--dims`` table: one row per pass and head dim, with its ratio to head dim 128 and its target."""
    batch, seqlen, heads, block, top_k = DIMS_CONFIG
    head = ["timed", "d", "kernel", "ms", "useful TFLOP/s", "vs d 128", "target", "result"]
    lines = [f"MoBA speed per head dim, batch {batch}, {heads} heads, N {seqlen // 1024}K, B {block}, k {top_k}, "
             f"causal, bf16, random inputs -- {env.get('cuda_device')}, {env.get('utc')}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in dims_summary(rows):
        target = "" if math.isnan(r["target"]) else f"≥ {r['target']:.1f}"
        cells = [r["timed"], r["head_dim"], r.get("variant", ""), _fmt(r["ms"]), _fmt(r["useful_tflops"], 1),
                 _fmt(r["vs_d128"]), target, r["result"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main_dims(args, env) -> int:
    dims = [DIMS_REFERENCE] + [d for d in (args.head_dims or CUDA_HEAD_DIMS) if d != DIMS_REFERENCE]
    rows, failed = [], 0
    for dim in dims:
        try:
            new = run_dims_config(dim)
        except Exception as exc:  # keep going: the other head dims still give their ratios
            print(f"FAILED head dim {dim}: {exc!r}", flush=True)
            failed += 1
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            continue
        torch.cuda.empty_cache()
        rows += new
        for r in new:
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
        with open(os.path.join(args.out, "dims.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=DIMS_COLUMNS, extrasaction="ignore")
            w.writeheader()
            for r in dims_summary(rows):
                w.writerow({c: r.get(c, "") for c in DIMS_COLUMNS})
        with open(os.path.join(args.out, "dims_table.md"), "w") as f:
            f.write(markdown_dims(rows, env))
    print(markdown_dims(rows, env))
    return 1 if failed or not rows else 0


# --------------------------------------------------------------------------------------------------
# peers: FlexAttention with a MoBA block mask, FlashMoBA (each optional; one that cannot run leaves a reason)

PEERS = ("flex", "flashmoba")
PEER_LABELS = {"flex": "Flex", "flashmoba": "FlashMoBA"}
STEP_TIMING_LABELS = {"queued": "back to back", "graph": "from CUDA graphs"}
PEER_COLUMNS = ["flex_ms", "flex_x", "flex_tflops", "flex_rel_err", "flex_mask_ms", "flex_tiles", "flex_compile_s",
                "flex_note", "flashmoba_ms", "flashmoba_x", "flashmoba_tflops", "flashmoba_rel_err",
                "flashmoba_sel_differ", "flashmoba_sel_fm_fp64", "flashmoba_sel_mb_fp64", "flashmoba_sel_checked",
                "flashmoba_sel_note", "flashmoba_note"] + [
    f"{who}_{key}_{what}" for key in ("queued", "graph") for who, what in (
        ("fwdbwd", "ms"), ("flex", "ms"), ("flex", "x"), ("flashmoba", "ms"), ("flashmoba", "x"))]
#: ``--peers-quick``: (batch, heads, head dim, block, top-k) at these lengths, causal, bf16, random inputs.
PEERS_QUICK = dict(batch=2, heads=16, dim=128, block=128, top_k=8, seqlens=(8 * 1024, 64 * 1024))


def parse_peers(text: str) -> tuple[str, ...]:
    """``"flex,flashmoba"`` -> ``("flex", "flashmoba")``: distinct peer names in order ("" or "none": no peer).

    Examples
    --------
    >>> parse_peers("flashmoba, flex,flex")
    ('flashmoba', 'flex')
    """
    if not isinstance(text, str):
        raise TypeError(f"peers: expected a comma-separated string, got {type(text).__name__}")
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        if item in ("", "none"):
            continue
        if item not in PEERS:
            raise ValueError(f"peers: {item!r} in {text!r} is not a peer; supported: {', '.join(PEERS)}")
        if item not in out:
            out.append(item)
    return tuple(out)


def _peers_arg(text: str) -> tuple[str, ...]:
    try:
        return parse_peers(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run_peers(peers, q, k, v, block, top_k, causal, *, topk=None, ref_out=None, dout=None, budget_s=1.5,
              timer=None) -> dict:
    """Each peer's row keys on the same inputs (forward, or forward + backward given ``dout``); a peer that fails
    gets ``<peer>_note = "n/a (reason)"`` and the benchmark goes on. ``timer`` (``fn -> ms``, one of
    :func:`_step_timers`): the peers' calls timed that way instead of from an idle GPU."""
    from . import _flash_moba_peer, _flex_peer

    timing = time_ms if timer is None else (lambda fn, budget_s: (timer(fn), None))
    res = {}
    for name in peers:
        try:
            if name == "flex":
                res.update(_flex_peer.run_flex(q, k, v, topk, block, top_k, causal, timing, ref_out=ref_out,
                                               dout=dout, budget_s=budget_s))
            else:
                res.update(_flash_moba_peer.run_flash_moba(q, k, v, block, top_k, causal, timing, ref_out=ref_out,
                                                           ref_topk=topk, dout=dout, budget_s=budget_s))
        except Exception as exc:  # a peer never stops the benchmark
            msg = str(exc).strip().splitlines()[0][:100] if str(exc).strip() else ""
            res[f"{name}_note"] = f"n/a ({type(exc).__name__}: {msg})"
            print(f"  peer {name} failed at N={q.shape[1]}: {exc!r}"[:400], flush=True)
            torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return res


def _peer_ratios(row, name, base_key, flops):
    """``<peer>_x`` = peer ms / mobalab ms (above 1: mobalab is faster); the peer's rate on mobalab's useful FLOPs."""
    ms = row.get(f"{name}_ms")
    if ms is None:
        return
    row[f"{name}_x"] = ms / row[base_key]
    row[f"{name}_tflops"] = flops / (ms * 1e9)


def _peer_cell(r, name, nd=2):
    if f"{name}_ms" in r:
        return f"{_fmt(r[name + '_ms'], nd)} ({_fmt(r[name + '_x'])}x)"
    return r.get(f"{name}_note", "not run")


def markdown_peers(rows, env, peers, passes) -> str:
    """Peers next to mobalab: one row per pass and length; ``x`` = peer ms / mobalab ms (mobalab's speedup)."""
    head = ["pass", "N", "d", "B", "k", "mobalab ms (attn given routing)"]
    for name in peers:
        head.append(f"{PEER_LABELS[name]} ms (x)")
    if "flex" in peers:
        head += ["Flex rel err", "Flex KV tiles per Q tile", "Flex compile s"]
    if "flashmoba" in peers:
        head += ["FlashMoBA rel err", "selection differs (FlashMoBA = fp64 / mobalab = fp64)"]
    timed = [key for key in ("queued", "graph") if any(f"fwdbwd_{key}_ms" in r for r in rows)]
    for key in timed:
        head += [f"mobalab ms, {STEP_TIMING_LABELS[key]}"] + [f"{PEER_LABELS[p]} ms (x), {STEP_TIMING_LABELS[key]}"
                                                             for p in peers]
    lines = [f"Peers on mobalab's inputs, causal, bf16 -- {env.get('cuda_device')}, {env.get('utc')}",
             "Flex: compiled flex_attention given mobalab's routing, block mask built outside the timing (x vs "
             "mobalab's attention-given-routing forward, vs its full fwd+bwd); FlashMoBA: its own routing + "
             "attention (x vs mobalab's full pass). rel err = |o - o_mobalab| / |o_mobalab| (forward).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    nan = float("nan")
    for r, kind in zip(rows, passes, strict=True):
        n = r["seqlen"]
        ns = f"{n // 1024}K" if n % 1024 == 0 else str(n)
        if kind == "forward":
            mb = f"{_fmt(r['mobalab_ms'])} ({_fmt(r['attention_ms'])})"
        else:
            mb = _fmt(r["fwdbwd_ms"])
        cells = [kind, ns, r["head_dim"], r["block"], r["top_k"], mb] + [_peer_cell(r, p) for p in peers]
        if "flex" in peers:
            cells += [_fmt(r.get("flex_rel_err", nan), 4), _fmt(r.get("flex_tiles", nan), 1),
                      _fmt(r.get("flex_compile_s", nan), 1)]
        if "flashmoba" in peers:
            if "flashmoba_sel_differ" in r:
                fm_ok, mb_ok = (_fmt(100 * r[f"flashmoba_sel_{s}_fp64"], 0) for s in ("fm", "mb"))
                sel = (f"{_fmt(100 * r['flashmoba_sel_differ'], 3)}% of rows ({fm_ok}% / {mb_ok}% of "
                       f"{r['flashmoba_sel_checked']} checked)")
            else:
                sel = r.get("flashmoba_sel_note", "" if kind != "forward" else r.get("flashmoba_note", ""))
            cells += [_fmt(r.get("flashmoba_rel_err", nan), 4), sel]
        for key in timed:
            if f"fwdbwd_{key}_ms" not in r:
                cells += [""] * (1 + len(peers))
                continue
            cells.append(_fmt(r[f"fwdbwd_{key}_ms"]))
            cells += [f"{_fmt(r[f'{p}_{key}_ms'])} ({_fmt(r[f'{p}_{key}_x'])}x)" if f"{p}_{key}_ms" in r
                      else r.get(f"{p}_note", "not run") for p in peers]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _write_rows(path, rows, columns):
    cols = columns + [c for c in PEER_COLUMNS if any(c in r for r in rows)]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in cols})


def main_peers_quick(args, env) -> int:
    """``--peers-quick``: :data:`PEERS_QUICK`, both passes per length, mobalab and the peers, no dense
    baselines, short timing budgets (``peers.csv``, ``peers_table.md``)."""
    c = PEERS_QUICK
    peers = args.peers or PEERS
    rows, passes, failed = [], [], 0
    for n in c["seqlens"]:  # both passes of a length together: the backward reuses the forward's Flex compile
        for kind in ("forward", "forward+backward"):
            seed = n + c["dim"] + c["block"]
            try:
                if kind == "forward":
                    row = run_config("random", c["batch"], n, c["heads"], c["dim"], c["block"], c["top_k"],
                                     dense=False, seed=seed, peers=peers, budget_s=0.3)
                else:
                    row = run_backward_config("random", c["batch"], n, c["heads"], c["dim"], c["block"], c["top_k"],
                                              dense=False, seed=seed, deterministic=False, peers=peers, budget_s=0.3,
                                              graph=args.graph, queued=args.queued)
            except Exception as exc:  # keep going: the other rows still compare
                print(f"FAILED peers {kind} N={n}: {exc!r}", flush=True)
                failed += 1
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                continue
            rows.append(dict(row, timed=kind))
            passes.append(kind)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            _write_rows(os.path.join(args.out, "peers.csv"), rows, ["timed"] + COLUMNS + [
                c for c in BWD_COLUMNS if c not in COLUMNS])
            with open(os.path.join(args.out, "peers_table.md"), "w") as f:
                f.write(markdown_peers(rows, env, peers, passes))
    print(markdown_peers(rows, env, peers, passes))
    return 1 if failed or not rows else 0


# --------------------------------------------------------------------------------------------------
# driver


COLUMNS = ["workload", "seqlen", "head_dim", "block", "top_k", "variant", "routing", "mobalab_ms",
           "routing_ms", "attention_ms", "routing_share", "fa2_ms", "cudnn_ms", "speedup_vs_fa2",
           "speedup_vs_cudnn",
           "useful_tflops", "attention_tflops", "routing_tflops", "mobalab_peak_gb", "fa2_peak_gb",
           "cudnn_peak_gb", "fa2_tflops", "cudnn_tflops", "batch", "heads", "causal", "dtype", "reps",
           "scratch_budget_bytes"]


def configs(quick: bool, head_dims=None):
    if head_dims is not None:
        return with_head_dims(configs(quick), head_dims)
    K = 1024
    if quick:
        return [("random", 2, n, 16, 128, 128, 8, "auto") for n in (8 * K, 64 * K)] + [
            ("random", 2, 64 * K, 16, 128, 32, 8, "auto"), ("clustered", 2, 64 * K, 16, 128, 128, 8, "auto")]
    seqlens = [8 * K * 2**i for i in range(7)]  # 8K .. 512K
    out = [("random", 2, n, 16, 128, 128, 8, "auto") for n in seqlens]
    out += [("random", 2, 64 * K, 16, 128, b, 8, "auto") for b in (32, 64, 256)]
    out += [("random", 2, 64 * K, 16, 128, b, 8, "streaming") for b in (32, 128)]
    out += [("clustered", 2, n, 16, 128, 128, 8, "auto") for n in (64 * K, 512 * K)]
    out += [("random", 2, n, 16, 64, 128, 8, "auto") for n in seqlens]
    return out


def _fmt(x, nd=2):
    if isinstance(x, float):
        return "n/a" if math.isnan(x) else f"{x:.{nd}f}"
    return str(x)


def _fmt_dense_ms(x):
    """A dense baseline's ms: one decimal from 10 ms (seconds at 512K), two below, where one decimal of a 1.04 ms
    FA2 step would not match the speedup beside it."""
    return _fmt(x, 1 if isinstance(x, float) and abs(x) >= 10 else 2)


def _fmt_x(x):
    """A speedup: two decimals below 10x, so that 0.96x does not print as a tie ("1.0")."""
    return _fmt(x, 2 if isinstance(x, float) and abs(x) < 10 else 1)


def markdown(rows, env) -> str:
    head = ["workload", "N", "d", "B", "kernel", "mobalab ms", "routing ms (share)", "attn ms", "FA2 ms",
            "cuDNN ms", "x FA2", "x cuDNN", "useful TFLOP/s", "attn TFLOP/s", "peak GB (mobalab / FA2)"]
    lines = [f"MoBA forward, batch 2, 16 heads, top-k 8, causal, bf16 -- {_run_label(env)}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        n = r["seqlen"]
        ns = f"{n // 1024}K" if n % 1024 == 0 else str(n)
        cells = [r["workload"], ns, r["head_dim"], r["block"], r["variant"], _fmt(r["mobalab_ms"]),
                 f"{_fmt(r['routing_ms'])} ({_fmt(100 * r['routing_share'], 0)}%)", _fmt(r["attention_ms"]),
                 _fmt_dense_ms(r.get("fa2_ms", float("nan"))), _fmt_dense_ms(r.get("cudnn_ms", float("nan"))),
                 _fmt_x(r.get("speedup_vs_fa2", float("nan"))),
                 _fmt_x(r.get("speedup_vs_cudnn", float("nan"))),
                 _fmt(r["useful_tflops"], 0), _fmt(r["attention_tflops"], 0),
                 f"{_fmt(r['mobalab_peak_gb'])} / {_fmt(r.get('fa2_peak_gb', float('nan')))}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def run_record() -> dict:
    """:func:`mobalab.bench.environment` plus the kernel settings every row ran with."""
    env = environment()
    from mobalab.kernels._cuda_backward import resolve_bwd_variant
    from mobalab.kernels._launch import resolve_launcher

    env.update(routing="cuda", attn_variant=A.resolve_variant(None),
               router_variant=os.environ.get(ROUTER_VARIANT_ENV, DEFAULT_ROUTER_VARIANT),
               bwd_variant=resolve_bwd_variant(None), launcher=resolve_launcher(),
               scratch_budget="default: 4% of the q, k, v, out bytes within [640 MiB, 768 MiB] (per row: "
                              "scratch_budget_bytes)")
    return env


def _diagnose(dim, block, variant):
    from mobalab.kernels._build import get_kernel

    variant = None if variant == "auto" else variant
    name = A.kernel_names(torch.bfloat16, dim, block, variant)[0]
    smem = A.fwd_smem_bytes(dim, block, variant)
    fn = get_kernel(A.fwd_source(dim, block, variant), name, max_dynamic_smem=smem)
    attrs = {k: fn.attributes.get(k) for k in ("num_regs", "shared_size_bytes", "max_dynamic_shared_size_bytes",
                                                "max_threads_per_block")}
    print(f"  {name}: requested dynamic smem {smem}, attributes {attrs}, variant {A.resolve_variant(variant)}",
          flush=True)


# --------------------------------------------------------------------------------------------------
# forward + backward


def _grad_fn(forward, leaves, dout):
    def run():
        out = forward(*leaves)
        return torch.autograd.grad(out, leaves, dout)

    return run


def graphed(fn, warmup: int = 3):
    """``fn`` (no arguments, the same input tensors at every call) captured into a CUDA graph after ``warmup``
    calls on a side stream (compiles the kernels and fills every cache a first call fills); returns the graph's
    replay. Replaying issues the whole step in one launch, so the time has no host overhead in it: what a
    training loop gets from ``torch.cuda.graphs`` or ``torch.compile(mode="reduce-overhead")``, and how fast the
    GPU runs the step's kernels back to back."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _time_and_peak(fn, long):
    """(median ms, peak GB rise): one timed call for the long dense runs (peak from that call)."""
    if not long:
        ms, _ = time_ms(fn)
        return ms, peak_gb(fn)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ms, _ = time_ms(fn, warmup=0, single=True)
    return ms, (torch.cuda.max_memory_allocated() - base) / 1e9


def _step_timers(graph: bool, queued: bool, budget_s: float) -> dict:
    """The extra step timings asked for, ``{"graph" | "queued": timer(fn, slow=False) -> ms}``: ``fn`` replayed
    from a CUDA graph (:func:`graphed`), or issued back to back (:func:`time_queued_ms`; ``slow``: a step of
    seconds, the long dense runs, timed once per round and in fewer rounds)."""
    timers = {}
    if graph:
        timers["graph"] = lambda fn, slow=False: time_ms(graphed(fn), budget_s=budget_s)[0]
    if queued:
        timers["queued"] = lambda fn, slow=False: time_queued_ms(fn, steps=1 if slow else 10, rounds=3 if slow else 7)
    return timers


def run_backward_config(workload, batch, seqlen, heads, dim, block, top_k, dense=True, seed=0,
                        deterministic=True, peers=(), budget_s=1.5, graph=False, queued=False,
                        centroid_precision="fp32"):
    causal = True
    cp = centroid_precision
    q, k, v = make_inputs(workload, batch, seqlen, heads, dim, torch.bfloat16, seed, block)
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    dout = torch.randn(q.shape, device="cuda", dtype=q.dtype, generator=g)
    in_gb = 4 * q.numel() * q.element_size() / 1e9
    row = dict(workload=workload, batch=batch, seqlen=seqlen, heads=heads, head_dim=dim, block=block,
               top_k=top_k, causal=causal, dtype="bf16")
    leaves = [x.requires_grad_() for x in (q, k, v)]
    timers = _step_timers(graph, queued, budget_s)
    fwd = lambda: A.moba_attention_cuda(q.detach(), k.detach(), v.detach(), block, top_k, causal=causal,  # noqa: E731
                                        centroid_precision=cp)
    row["fwd_ms"], _ = time_ms(fwd, budget_s=budget_s)
    for name, det in (("fwdbwd", False), ("fwdbwd_det", True)):
        if det and not deterministic:
            continue
        f = lambda q, k, v, det=det: moba_attention_autograd(q, k, v, block, top_k, causal=causal,  # noqa: E731
                                                             deterministic=det, centroid_precision=cp)
        fn = _grad_fn(f, leaves, dout)
        row[f"{name}_ms"], _ = time_ms(fn, budget_s=budget_s)
        row[f"{name}_peak_gb"] = peak_gb(fn) + in_gb
        if not det:
            for key, timer in timers.items():
                row[f"fwdbwd_{key}_ms"] = timer(fn)
    for key, timer in timers.items():
        row[f"fwd_{key}_ms"] = timer(fwd)
    row["bwd_ms"] = row["fwdbwd_ms"] - row["fwd_ms"]
    f_route = routing_flops(batch, seqlen, heads, dim, block, causal)
    f_attn = attention_flops(batch, seqlen, heads, dim, block, top_k, causal)
    for key in timers:  # the backward's time and rate without the host's share as well
        row[f"bwd_{key}_ms"] = row[f"fwdbwd_{key}_ms"] - row[f"fwd_{key}_ms"]
        row[f"bwd_{key}_useful_tflops"] = 2.5 * f_attn / (row[f"bwd_{key}_ms"] * 1e9)
    row["fwd_useful_tflops"] = (f_route + f_attn) / (row["fwd_ms"] * 1e9)
    row["bwd_useful_tflops"] = 2.5 * f_attn / (row["bwd_ms"] * 1e9)
    row["fwdbwd_useful_tflops"] = (f_route + 3.5 * f_attn) / (row["fwdbwd_ms"] * 1e9)
    row["bwd_over_fwd_rate"] = row["bwd_useful_tflops"] / row["fwd_useful_tflops"]
    if peers:
        qd, kd, vd = (x.detach() for x in (q, k, v))
        topk = moba_topk_cuda(qd, kd, block, top_k, causal=causal, centroid_precision=cp) if "flex" in peers else None
        row.update(run_peers(peers, qd, kd, vd, block, top_k, causal, topk=topk, dout=dout, budget_s=budget_s))
        for name, flops in (("flex", 3.5 * f_attn), ("flashmoba", f_route + 3.5 * f_attn)):
            _peer_ratios(row, name, "fwdbwd_ms", flops)
        for key, timer in timers.items():  # the peers timed as mobalab's step was
            extra = run_peers(peers, qd, kd, vd, block, top_k, causal, topk=topk, dout=dout, budget_s=budget_s,
                              timer=timer)
            for name in peers:
                if f"{name}_ms" in extra:
                    row[f"{name}_{key}_ms"] = extra[f"{name}_ms"]
                    row[f"{name}_{key}_x"] = extra[f"{name}_ms"] / row[f"fwdbwd_{key}_ms"]
        del topk
    if dense:
        qt, kt, vt, dt = (x.detach().transpose(1, 2).contiguous() for x in (q, k, v, dout))
        del q, k, v, leaves
        torch.cuda.empty_cache()
        tleaves = [x.requires_grad_() for x in (qt, kt, vt)]
        long = seqlen > 131072
        for name in ("fa2", "cudnn"):
            from torch.nn.attention import SDPBackend, sdpa_kernel

            be = {"fa2": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[name]

            def f(q, k, v, be=be):
                with sdpa_kernel(be):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

            try:
                ms, pk = _time_and_peak(_grad_fn(f, tleaves, dt), long)
                row[f"{name}_fwdbwd_ms"], row[f"{name}_fwdbwd_peak_gb"] = ms, pk + in_gb
            except RuntimeError as exc:
                print(f"  {name} fwd+bwd failed at N={seqlen}: {exc}")
                row[f"{name}_fwdbwd_ms"] = row[f"{name}_fwdbwd_peak_gb"] = float("nan")
            row[f"speedup_vs_{name}"] = row[f"{name}_fwdbwd_ms"] / row["fwdbwd_ms"]
            for key, timer in timers.items():  # the dense side timed as mobalab's was
                try:
                    row[f"{name}_fwdbwd_{key}_ms"] = timer(_grad_fn(f, tleaves, dt), slow=long)
                except RuntimeError as exc:
                    print(f"  {name} fwd+bwd ({key}) failed at N={seqlen}: {exc}")
                    row[f"{name}_fwdbwd_{key}_ms"] = float("nan")
                row[f"{key}_speedup_vs_{name}"] = row[f"{name}_fwdbwd_{key}_ms"] / row[f"fwdbwd_{key}_ms"]
        del qt, kt, vt, dt, tleaves
    torch.cuda.empty_cache()
    return row


BWD_COLUMNS = ["workload", "seqlen", "head_dim", "block", "top_k", "fwd_ms", "fwdbwd_ms", "bwd_ms",
               "fwdbwd_det_ms", "fa2_fwdbwd_ms", "cudnn_fwdbwd_ms", "speedup_vs_fa2", "speedup_vs_cudnn",
               "fwd_useful_tflops", "bwd_useful_tflops", "bwd_over_fwd_rate", "fwdbwd_useful_tflops",
               "fwdbwd_peak_gb", "fwdbwd_det_peak_gb", "fa2_fwdbwd_peak_gb", "cudnn_fwdbwd_peak_gb", "batch",
               "heads", "causal", "dtype", "fwdbwd_graph_ms", "fa2_fwdbwd_graph_ms", "cudnn_fwdbwd_graph_ms",
               "graph_speedup_vs_fa2", "graph_speedup_vs_cudnn", "fwdbwd_queued_ms", "fa2_fwdbwd_queued_ms",
               "cudnn_fwdbwd_queued_ms", "queued_speedup_vs_fa2", "queued_speedup_vs_cudnn", "fwd_graph_ms",
               "bwd_graph_ms", "bwd_graph_useful_tflops", "fwd_queued_ms", "bwd_queued_ms", "bwd_queued_useful_tflops"]


def backward_configs(quick: bool, head_dims=None):
    if head_dims is not None:
        return with_head_dims(backward_configs(quick), head_dims)
    K = 1024
    if quick:
        return [("random", 2, n, 16, 128, 128, 8) for n in (8 * K, 64 * K)] + [("random", 2, 64 * K, 16, 128, 32, 8)]
    # the target sizes first (a run cut short keeps its rows): 64K, 512K, 256K, then the rest
    out = [("random", 2, n * K, 16, 128, 128, 8) for n in (64, 512, 256, 128, 32, 16, 8)]
    out += [("random", 2, 64 * K, 16, 128, b, 8) for b in (32, 64, 256)]
    out += [("random", 2, 64 * K, 16, 64, 128, 8), ("clustered", 2, 64 * K, 16, 128, 128, 8)]
    return out


def _run_label(env) -> str:
    """A table's device and time, and the build options of a run that had any (``--build-option``)."""
    label = f"{env['cuda_device']}, {env['utc']}"
    if env.get("centroid_precision", "fp32") != "fp32":
        label += f", routing on centroids rounded to the input dtype (centroid_precision {env['centroid_precision']!r})"
    return label + (f", build options {' '.join(env['build_options'])}" if env.get("build_options") else "")


def markdown_backward(rows, env) -> str:
    head = ["workload", "N", "d", "B", "fwd ms", "fwd+bwd ms", "bwd ms", "det fwd+bwd ms", "FA2 fwd+bwd ms",
            "cuDNN fwd+bwd ms", "x FA2", "x cuDNN", "fwd / bwd useful TFLOP/s", "bwd/fwd rate",
            "peak GB (mobalab / det / FA2 / cuDNN)"]
    lines = [f"MoBA forward+backward, batch 2, 16 heads, top-k 8, causal, bf16 -- {_run_label(env)}",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        n = r["seqlen"]
        ns = f"{n // 1024}K" if n % 1024 == 0 else str(n)
        nan = float("nan")
        cells = [r["workload"], ns, r["head_dim"], r["block"], _fmt(r["fwd_ms"]), _fmt(r["fwdbwd_ms"]),
                 _fmt(r["bwd_ms"]), _fmt(r.get("fwdbwd_det_ms", nan)), _fmt_dense_ms(r.get("fa2_fwdbwd_ms", nan)),
                 _fmt_dense_ms(r.get("cudnn_fwdbwd_ms", nan)), _fmt_x(r.get("speedup_vs_fa2", nan)),
                 _fmt_x(r.get("speedup_vs_cudnn", nan)),
                 f"{_fmt(r['fwd_useful_tflops'], 0)} / {_fmt(r['bwd_useful_tflops'], 0)}",
                 _fmt(r["bwd_over_fwd_rate"]),
                 " / ".join(_fmt(r.get(c, nan)) for c in ("fwdbwd_peak_gb", "fwdbwd_det_peak_gb",
                                                          "fa2_fwdbwd_peak_gb", "cudnn_fwdbwd_peak_gb"))]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    for key, title in (("graph", "Replayed from CUDA graphs (every side; no host time in the step):"),
                       ("queued", "Steps issued back to back (every side; the host runs ahead where it can, as in a "
                                  "training loop):")):
        timed = [r for r in rows if f"fwdbwd_{key}_ms" in r]
        if not timed:
            continue
        lines += ["", title, "",
                  "| N | B | fwd+bwd ms | FA2 ms | cuDNN ms | x FA2 | x cuDNN | fwd ms | bwd ms | bwd useful TFLOP/s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in timed:
            n = r["seqlen"]
            nan = float("nan")
            cells = [f"{n // 1024}K" if n % 1024 == 0 else str(n), r["block"], _fmt(r[f"fwdbwd_{key}_ms"]),
                     _fmt(r.get(f"fa2_fwdbwd_{key}_ms", nan)), _fmt(r.get(f"cudnn_fwdbwd_{key}_ms", nan)),
                     _fmt(r.get(f"{key}_speedup_vs_fa2", nan)), _fmt(r.get(f"{key}_speedup_vs_cudnn", nan)),
                     _fmt(r.get(f"fwd_{key}_ms", nan)), _fmt(r.get(f"bwd_{key}_ms", nan)),
                     _fmt(r.get(f"bwd_{key}_useful_tflops", nan), 0)]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main_backward(args, env) -> int:
    rows, failed = [], 0
    cfgs = backward_configs(args.quick, args.head_dims)
    if args.select:
        cfgs = [cfgs[int(i)] for i in args.select.split(",")]
    for workload, batch, n, heads, dim, block, top_k in cfgs:
        try:
            row = run_backward_config(workload, batch, n, heads, dim, block, top_k, seed=n + dim + block,
                                      deterministic=n <= 128 * 1024 or args.select is not None, peers=args.peers,
                                      graph=args.graph, queued=args.queued,
                                      centroid_precision=args.centroid_precision)
        except Exception as exc:  # keep the sweep going
            print(f"FAILED fwd+bwd {workload} N={n} d={dim} B={block}: {exc!r}", flush=True)
            failed += 1
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            continue
        rows.append(row)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        _write_rows(os.path.join(args.out, "bench_bwd.csv"), rows, BWD_COLUMNS)
        with open(os.path.join(args.out, "bench_bwd_table.md"), "w") as f:
            f.write(markdown_backward(rows, env))
            if args.peers:
                f.write("\n" + markdown_peers(rows, env, args.peers, ["forward+backward"] * len(rows)))
    print(markdown_backward(rows, env))
    if args.peers:
        print(markdown_peers(rows, env, args.peers, ["forward+backward"] * len(rows)))
    return 1 if failed or not rows else 0


def main(argv=None) -> int:
    """Run the benchmark (``mobalab bench`` / ``python -m mobalab.bench.attention``); 0 when every
    configuration ran, 1 otherwise (failures are printed and the sweep goes on)."""
    p = argparse.ArgumentParser(prog="mobalab bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a few configurations (smoke run)")
    p.add_argument("--out", default="bench_out", help="output folder")
    p.add_argument("--variant", choices=A.VARIANTS, default=None,
                   help="forward sweep: run every configuration with this tile kernel (default: each configuration's "
                        "own, 'auto' meaning $MOBALAB_ATTN_VARIANT); configurations it does not support are skipped")
    p.add_argument("--router-variant", choices=ROUTER_CHOICES, default=None,
                   help="top-k kernel of the routing in every run (sets $MOBALAB_ROUTER_VARIANT; default: that "
                        "variable, else auto)")
    p.add_argument("--centroid-precision", choices=CENTROID_PRECISIONS, default="fp32",
                   help="with --backward: the routing's centroids, fp32 means (default) or rounded to the input "
                        "dtype as MoBA and FlashMoBA store them (one tensor-core product per score)")
    p.add_argument("--backward", action="store_true", help="forward + backward (mobalab, FA2, cuDNN)")
    p.add_argument("--select", default=None, help="with --backward: comma-separated indices of the configs to run")
    p.add_argument("--graph", action="store_true",
                   help="with --backward or --peers-quick: also time each step replayed from a CUDA graph (mobalab "
                        "and the dense or MoBA peers alike): the step's GPU time without the host's launch overhead")
    p.add_argument("--queued", action="store_true",
                   help="with --backward or --peers-quick: also time steps issued back to back (mobalab and the "
                        "peers alike; ten steps per CUDA-event pair): the host's launch time counts only where it "
                        "exceeds the GPU's")
    p.add_argument("--head-dims", type=_head_dims_arg, default=None, metavar="D,D,...",
                   help="run each head-dim-128 configuration at these head dims (of "
                        f"{','.join(map(str, CUDA_HEAD_DIMS))}; default: 128, plus the full forward sweep's 64)")
    p.add_argument("--dims", action="store_true",
                   help="speed per head dim: forward and forward+backward at N 64K, B 128, k 8, mobalab only, "
                        "head dims 32..256 (or --head-dims), each against head dim 128 (dims_table.md)")
    p.add_argument("--peers", type=_peers_arg, default=(), metavar="flex,flashmoba",
                   help="also run these peers on the same inputs (forward or --backward): FlexAttention with a MoBA "
                        "block mask, FlashMoBA (when its extension is importable); default none")
    p.add_argument("--peers-quick", action="store_true",
                   help="mobalab and the peers (all, or --peers) only: batch 2, 16 heads, d 128, B 128, k 8, causal, "
                        "bf16, 8K and 64K, forward and forward+backward, no FA2/cuDNN (peers_table.md)")
    p.add_argument("--build-option", action="append", default=[], type=build_option_arg,
                   metavar="SOURCE.cu:MOBA_NAME=INT",
                   help="compile mobalab's kernels from SOURCE.cu with this build option as well (repeatable; e.g. "
                        "attention_bwd_wgmma.cu:MOBA_BWD_WG_STEP_DESC=0): a whole run of an option that is not the "
                        "default; recorded in the run's environment")
    args = p.parse_args(argv)
    if args.peers_quick and (args.backward or args.quick or args.select or args.dims or args.head_dims):
        p.error("--peers-quick runs its own configuration: drop --backward, --quick, --select, --dims, --head-dims")
    if args.dims and (args.backward or args.quick or args.select):
        p.error("--dims runs its own configuration (forward and forward+backward): drop --backward, --quick, "
                "--select")
    for flag in ("graph", "queued"):
        if getattr(args, flag) and not (args.backward or args.peers_quick):
            p.error(f"--{flag} applies to --backward and --peers-quick")
    if args.centroid_precision != "fp32" and not args.backward:
        p.error("--centroid-precision applies to --backward")
    if args.variant and (args.backward or args.dims or args.peers_quick):
        p.error("--variant applies to the forward sweep: drop --backward, --dims, --peers-quick")
    from mobalab.kernels import gpu_available

    if not gpu_available():
        print("mobalab bench: needs an NVIDIA GPU with CUDA and CuPy (pip install 'mobalab[gpu]'); none is usable here",
              file=sys.stderr)
        return 2  # as the decode and varlen benchmarks: a usage error, where 1 means a configuration failed
    os.makedirs(args.out, exist_ok=True)
    if args.router_variant:
        os.environ[ROUTER_VARIANT_ENV] = args.router_variant
    env = run_record()
    if args.variant:
        env["attn_variant"] = args.variant
    if args.build_option:
        env["build_options"] = list(args.build_option)
    env["centroid_precision"] = args.centroid_precision
    print(json.dumps(env))
    with build_options(args.build_option):
        return _run(args, env)


def _run(args, env) -> int:
    """The run :func:`main` chose, after its checks."""
    if args.backward or args.dims or args.peers_quick:
        with open(os.path.join(args.out, "bench_env.json"), "w") as f:
            json.dump(env, f, indent=1)
        if args.peers_quick:
            return main_peers_quick(args, env)
        return main_dims(args, env) if args.dims else main_backward(args, env)
    rows, cache, failed = [], {}, 0
    for workload, batch, n, heads, dim, block, top_k, variant in configs(args.quick, args.head_dims):
        variant = args.variant or variant
        if variant in A.WGMMA_VARIANTS and not A.wgmma_supports(dim, block, variant):
            print(f"skipped {workload} N={n} d={dim} B={block}: no wgmma kernel for this shape", flush=True)
            continue
        prof = dim == 128 and n in (64 * 1024, 512 * 1024) and workload == "random" and block in (32, 128) \
            and variant in ("auto", args.variant)
        try:
            row = run_config(workload, batch, n, heads, dim, block, top_k, seed=n + dim + block,
                             dense_cache=cache, profile=prof, variant=variant, peers=args.peers)
        except Exception as exc:  # keep the sweep going; say what failed and with which kernel settings
            print(f"FAILED {workload} N={n} d={dim} B={block} variant={variant}: {exc!r}", flush=True)
            failed += 1
            _diagnose(dim, block, variant)
            torch.cuda.synchronize()
            continue
        rows.append(row)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        write_outputs(args.out, rows, env, args.peers)  # after every row: a run cut short still leaves its numbers
    print(markdown(rows, env))
    if args.peers:
        print(markdown_peers(rows, env, args.peers, ["forward"] * len(rows)))
    return 1 if failed or not rows else 0


def write_outputs(out_dir, rows, env, peers=()):
    _write_rows(os.path.join(out_dir, "bench.csv"), rows, COLUMNS)
    with open(os.path.join(out_dir, "bench_env.json"), "w") as f:
        json.dump(env, f, indent=1)
    with open(os.path.join(out_dir, "bench_table.md"), "w") as f:
        f.write(markdown(rows, env))
        if peers:
            f.write("\n" + markdown_peers(rows, env, peers, ["forward"] * len(rows)))


if __name__ == "__main__":
    raise SystemExit(main())
