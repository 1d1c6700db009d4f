r"""Context-parallel MoBA on N processes: ``torchrun --nproc-per-node N -m mobalab.distributed.bench [options]``.

1. **Check** (``--check-len``): every rank draws the same whole sequence, runs
   :func:`mobalab.distributed.context_parallel_moba_attention` on its shard (forward and gradients) and compares
   its rows with single-device MoBA on the whole sequence on its own device: the torch reference
   :func:`mobalab.kernels.reference.moba_attention_given_routing` with the same selections (all ranks' routing
   gathered), computed in fp32, for out, lse, dq, dk, dv (relative Frobenius error); the routing against the
   single-device reference router (share of (query, head) rows with the same selected blocks: all but
   near-ties); on GPUs also against the single-device CUDA router, and the output against the CUDA path
   (:func:`mobalab.kernels.moba_attention`) on the rows both route alike.
2. **Timing** (``--lengths``): per total length, shards as even as possible, random Gaussian q, k, v, dO;
   warm-up, then ``--reps`` forward + backward calls timed per rank (CUDA events on GPUs, wall clock with a
   barrier on CPUs; median). Also per rank: routing alone, one ring hop of K/V alone (GB/s in the pieces of one
   head-group pass; ms for the whole shard), peak memory
   (``torch.cuda.max_memory_allocated`` over the call, inputs included), useful TFLOP/s (docs/design.md,
   "FLOP and byte budget": routing :math:`2bhd` per scored (query, block) pair, attention
   :math:`4bhd\sum_t |S_t|` forward and 2.5x that backward, counted exactly from the rank's routing) and the
   communication model's prediction (:func:`mobalab.distributed.ring_step_model` at the measured bandwidth).
   A length whose forward + backward would not fit in GPU memory (estimated from the shapes and, after the
   first length, from the measured peak) runs forward only, or is skipped; the row says which.

Writes ``cp_check.csv``, ``cp_bench.csv``, ``cp_bench_table.md`` and ``cp_bench_env.json``
(:func:`mobalab.bench.environment` plus the run's settings) under ``--out`` on rank 0. Exit status 0 when the
check passed and every length ran, 1 otherwise. ``--backend`` gloo (CPU tensors) or nccl (one GPU per
process, ``LOCAL_RANK``); ``--quick``: small sizes (seconds on a CPU).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import statistics
import time

import torch
import torch.distributed as dist

from ..bench.environment import environment
from ..kernels import moba_attention, moba_topk
from ..kernels import reference as R
from . import _model, _ring
from ._api import context_parallel_moba_attention
from ._device import use_device
from ._group import exchange, ring_of
from ._layout import Layout, shard_positions
from ._local import Params, cuda_kernels
from ._routing import route

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
# relative Frobenius error allowed against the fp32 reference (16-bit outputs and gradients are rounded)
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4, torch.float64: 1e-9}
# share of (query, head) rows routed as the single-device reference routes them: all but exact near-ties with
# the reference router; the CUDA kernel router scores to ~2^-16 relative, like the single-device CUDA router
MIN_ROUTING_AGREEMENT = {"reference": 0.9999, "cuda": 0.99}
MEMORY_FRACTION = 0.93  # of the GPU's memory that a length may be predicted to need (allocated, not reserved)

CHECK_COLUMNS = ["rank", "seq_len", "shard_len", "router", "routing_agreement", "out_rel_err", "lse_max_err",
                 "dq_rel_err", "dk_rel_err", "dv_rel_err", "cuda_router_agreement", "cuda_out_rel_err", "passed"]
BENCH_COLUMNS = ["seq_len", "gpus", "rank", "shard_len", "mode", "fwd_ms", "bwd_ms", "fwdbwd_ms", "routing_ms",
                 "hop_ms", "hop_GBps", "peak_gb", "useful_tflop", "useful_tflops", "model_ms", "note"]


# --------------------------------------------------------------------------------------------------
# counting


def useful_flops(topk: torch.Tensor, layout: Layout, rank: int, heads: int, head_dim: int, block_size: int,
                 causal: bool) -> tuple[float, float]:
    """(routing FLOPs, forward attention FLOPs) of this rank's queries, counted from their routing."""
    batch = topk.shape[0]
    pairs = _model._routing_pairs(layout, rank, block_size, causal)
    positions = shard_positions(layout.lengths, rank, layout.kind).to(topk.device)
    n = layout.seq_len
    blocks = topk.long()
    keys = (n - blocks.clamp(min=0) * block_size).clamp(max=block_size)  # keys of each selected block
    if causal:  # the own block (slot 0) only up to the query
        own = positions.view(1, -1, 1) - blocks[..., 0] * block_size + 1
        keys[..., 0] = own
    attended = torch.where(blocks >= 0, keys, 0).sum().item()
    return 2.0 * batch * heads * head_dim * pairs, 4.0 * head_dim * attended  # attended sums over batch, heads


# --------------------------------------------------------------------------------------------------
# timing helpers


class _Timer:
    """Elapsed milliseconds between marks: CUDA events on a GPU, the wall clock after a barrier on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def elapsed(self, a, b) -> float:
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b)
        return 1e3 * (b - a)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-300))


def _even(n: int, world: int) -> tuple[int, ...]:
    return tuple(n // world + (r < n % world) for r in range(world))


# --------------------------------------------------------------------------------------------------
# the steps


def _gather_routing(topk: torch.Tensor, lengths, layout: str, ring) -> torch.Tensor:
    """Every rank's routing in whole-sequence order: (batch, N, heads, top_k) on every rank."""
    longest = max(lengths)
    padded = topk.new_full((topk.shape[0], longest, *topk.shape[2:]), -1)
    padded[:, :topk.shape[1]] = topk
    parts = [torch.empty_like(padded) for _ in range(ring.world)]
    dist.all_gather(parts, padded, group=ring.group)
    whole = topk.new_empty((topk.shape[0], sum(lengths), *topk.shape[2:]))
    for r, part in enumerate(parts):
        whole[:, shard_positions(lengths, r, layout).to(topk.device)] = part[:, :lengths[r]]
    return whole


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of (query, head) rows whose selected block sets are equal."""
    return float((a.sort(-1).values == b.sort(-1).values).all(-1).double().mean())


def check(args, device, dtype, ring) -> dict:
    """This rank's differences from single-device MoBA on the whole sequence."""
    n = args.check_len
    g = torch.Generator(device=device).manual_seed(args.seed)
    shapes = [(args.batch, n, h, args.head_dim) for h in (args.heads, args.kv_heads, args.kv_heads, args.heads)]
    q, k, v, dout = (torch.randn(s, generator=g, device=device, dtype=dtype) for s in shapes)
    lengths = _even(n, ring.world)
    pos = shard_positions(lengths, ring.rank, args.layout).to(device)
    shard = [x[:, pos].clone().requires_grad_() for x in (q, k, v)]
    out, lse = context_parallel_moba_attention(*shard, args.block_size, args.top_k, args.causal, return_lse=True,
                                               layout=args.layout, kernels=args.kernels)
    grads = torch.autograd.grad(out, shard, dout[:, pos])
    kernels = cuda_kernels(q, Params(args.block_size, args.top_k, args.causal, 1 / math.sqrt(args.head_dim)),
                           args.kernels)
    with torch.no_grad():
        topk = route(shard[0], shard[1], Layout(lengths, args.layout), ring, args.block_size, args.top_k,
                     args.causal, lists=None if kernels is None else kernels.lists)
        whole_topk = _gather_routing(topk, lengths, args.layout, ring)
    row = {"rank": ring.rank, "seq_len": n, "shard_len": lengths[ring.rank], "router": "reference" if kernels is None
           else "cuda"}

    # attention: the single-device reference (fp32) with the same selections
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = R.moba_attention_given_routing(*leaves, whole_topk, args.block_size, args.causal)
    ref_grads = torch.autograd.grad(ref_out, leaves, dout)
    row.update(out_rel_err=_rel(out, ref_out[:, pos]), lse_max_err=float((lse - ref_lse[:, pos]).detach().abs().max()),
               dq_rel_err=_rel(grads[0], ref_grads[0][:, pos]), dk_rel_err=_rel(grads[1], ref_grads[1][:, pos]),
               dv_rel_err=_rel(grads[2], ref_grads[2][:, pos]))
    del leaves, ref_out, ref_lse, ref_grads
    # routing: the single-device routers
    row["routing_agreement"] = _agreement(topk, R.moba_topk(q, k, args.block_size, args.top_k, args.causal)[:, pos])
    if device.type == "cuda":
        with torch.no_grad():
            cuda_topk = moba_topk(q, k, args.block_size, args.top_k, args.causal)[:, pos]
            cuda_out = moba_attention(q, k, v, args.block_size, args.top_k, args.causal)[:, pos]
        same = (topk.sort(-1).values == cuda_topk.sort(-1).values).all(-1).unsqueeze(-1)
        row.update(cuda_router_agreement=_agreement(topk, cuda_topk),
                   cuda_out_rel_err=_rel(torch.where(same, out.detach(), 0), torch.where(same, cuda_out, 0)))
    tol = TOLERANCE[dtype]
    agreement = MIN_ROUTING_AGREEMENT[row["router"]]
    row["passed"] = bool(row["routing_agreement"] >= agreement and all(
        row[c] <= tol for c in ("out_rel_err", "dq_rel_err", "dk_rel_err", "dv_rel_err")))
    return row


_FIXED_BYTES = 3 << 30  # routing scores (4 GiB budget is the worst case of a chunk; usually less) and scratch


def _predicted_bytes(shard: int, args, elem: int, backward: bool, device_bytes: float | None = None) -> float:
    """Peak bytes of one rank from the shapes: the caller's tensors, routing, and one ring pass's working set
    (:func:`mobalab.distributed._ring.ring_bytes_per_token` over the heads of a pass, :func:`head_groups`)."""
    hd, gd = args.heads * args.head_dim, args.kv_heads * args.head_dim
    # q, k, v, dO, out, lse, routing (int32) and the routing's candidate lists while it runs
    base = elem * (3 * hd + 2 * gd) + 4 * args.heads + 4 * args.heads * args.top_k + 48 * args.heads
    if backward:
        base += elem * (hd + 2 * gd)  # dq, dk, dv returned
    passes = _ring.backward_head_groups(args.batch, shard, args.heads, args.kv_heads, args.head_dim, elem,
                                        device_bytes)
    width = passes[0][1] - passes[0][0]
    if len(passes) == 1 and device_bytes is not None:  # one pass over all heads, in place: no slices, no scratch
        ring = _ring.ring_bytes_per_token(args.heads, args.kv_heads, args.head_dim, elem, False, False)
    else:
        ring = _ring.ring_bytes_per_token(args.heads, args.kv_heads, args.head_dim, elem) * width / args.heads
    return args.batch * shard * (base + ring) + _FIXED_BYTES


def time_length(n: int, args, device, dtype, ring, measured: dict) -> dict:
    lengths = _even(n, ring.world)
    shard = lengths[ring.rank]
    row = {"seq_len": n, "gpus": ring.world, "rank": ring.rank, "shard_len": shard, "note": ""}
    mode = "fwd+bwd"
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        elem = torch.finfo(dtype).bits // 8
        # a measured peak per token holds for lengths whose ring runs the same passes (one pass over all heads
        # holds far more per token than per-head passes)
        n_passes = len(_ring.backward_head_groups(args.batch, shard, args.heads, args.kv_heads, args.head_dim,
                                                  elem, total))
        need = {m: max(_predicted_bytes(shard, args, elem, m == "fwd+bwd", total),
                       measured.get((m, n_passes), 0.0) * shard + _FIXED_BYTES) for m in ("fwd+bwd", "fwd")}
        fits = torch.tensor([need["fwd+bwd"] <= MEMORY_FRACTION * total, need["fwd"] <= MEMORY_FRACTION * total],
                            device=device, dtype=torch.int32)
        dist.all_reduce(fits, op=dist.ReduceOp.MIN, group=ring.group)  # every rank takes the same branch
        mode = "fwd+bwd" if fits[0] else "fwd" if fits[1] else "skip"
        if mode != "fwd+bwd":
            row["note"] = f"fwd+bwd needs ~{need['fwd+bwd'] / 1e9:.0f} GB per GPU of {total / 1e9:.0f}"
    row["mode"] = mode
    if mode == "skip":
        return row

    g = torch.Generator(device=device).manual_seed(args.seed + 1000 * ring.rank + n)
    shapes = [(args.batch, shard, h, args.head_dim) for h in (args.heads, args.kv_heads, args.kv_heads, args.heads)]
    q, k, v, dout = (torch.randn(s, generator=g, device=device, dtype=dtype) for s in shapes)
    leaves = [x.requires_grad_(mode == "fwd+bwd") for x in (q, k, v)]
    timer = _Timer(device)

    def call():
        if args.path == "single-device":  # the one-device path, no ring: what one GPU does without this module
            return moba_attention(*leaves, args.block_size, args.top_k, args.causal)
        return context_parallel_moba_attention(*leaves, args.block_size, args.top_k, args.causal,
                                               layout=args.layout, kernels=args.kernels)

    fwd, bwd = [], []
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        for rep in range(args.warmup + args.reps):
            dist.barrier(group=ring.group)
            t0 = timer.mark()
            out = call()
            t1 = timer.mark()
            if mode == "fwd+bwd":
                torch.autograd.grad(out, leaves, dout)
            t2 = timer.mark()
            _sync(device)
            if rep >= args.warmup:
                fwd.append(timer.elapsed(t0, t1))
                bwd.append(timer.elapsed(t1, t2))
            del out
    except torch.cuda.OutOfMemoryError:
        if args.path != "single-device":  # the ring's lengths are predicted to fit: running out is a failure
            raise
        row.update(mode="skip", note=f"{mode} ran out of GPU memory on the single-device path")
        return row
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        row["peak_gb"] = peak / 1e9
        measured[(mode, n_passes)] = max(measured.get((mode, n_passes), 0.0), max(0, peak - _FIXED_BYTES) / shard)
    row["fwd_ms"] = statistics.median(fwd)
    if mode == "fwd+bwd":
        row["bwd_ms"] = statistics.median(bwd)
        row["fwdbwd_ms"] = statistics.median(a + b for a, b in zip(fwd, bwd, strict=True))

    layout = Layout(lengths, args.layout)
    kernels = cuda_kernels(q, Params(args.block_size, args.top_k, args.causal, 1 / math.sqrt(args.head_dim)),
                           args.kernels)
    with torch.no_grad():
        dist.barrier(group=ring.group)
        t0 = timer.mark()
        topk = route(q, k, layout, ring, args.block_size, args.top_k, args.causal,
                     lists=None if kernels is None else kernels.lists)
        t1 = timer.mark()
        row["routing_ms"] = timer.elapsed(t0, t1)
        # one hop of K and V around the ring, nothing else (the bandwidth the model needs), in the pieces the
        # ring sends: the kv heads of one pass (head_groups), timed once per pass
        passes = _ring.backward_head_groups(args.batch, max(lengths), args.heads, args.kv_heads, args.head_dim,
                                            k.element_size(), torch.cuda.get_device_properties(device).total_memory
                                            if device.type == "cuda" else None)
        kv = (passes[0][1] - passes[0][0]) * args.kv_heads // args.heads
        sends = [x.detach()[:, :, :kv].contiguous() for x in (k, v)]
        incoming = [torch.empty((args.batch, lengths[(ring.rank - 1) % ring.world], kv, args.head_dim),
                                dtype=dtype, device=device) for _ in range(2)]
        if ring.world > 1:
            hops = []
            for _ in range(3):
                dist.barrier(group=ring.group)
                t0 = timer.mark()
                for request in exchange(ring, sends, incoming):
                    request.wait()
                t1 = timer.mark()
                hops.append(timer.elapsed(t0, t1))
            row["hop_GBps"] = sum(x.numel() for x in sends) * k.element_size() / statistics.median(hops) / 1e6
            row["hop_ms"] = statistics.median(hops) * len(passes)  # the whole shard's K/V
        del sends, incoming
    routing_flops, fwd_flops = useful_flops(topk, layout, ring.rank, args.heads, args.head_dim, args.block_size,
                                            args.causal)
    row["useful_tflop"] = (routing_flops + (3.5 if mode == "fwd+bwd" else 1.0) * fwd_flops) / 1e12
    row["useful_tflops"] = row["useful_tflop"] / (row["fwdbwd_ms" if mode == "fwd+bwd" else "fwd_ms"] / 1e3)
    if "hop_GBps" in row and device.type == "cuda":
        model = _model.ring_step_model([n], [ring.world], batch=args.batch, heads=args.heads, kv_heads=args.kv_heads,
                                       head_dim=args.head_dim, block_size=args.block_size, top_k=args.top_k,
                                       causal=args.causal, elem_bytes=torch.finfo(dtype).bits // 8,
                                       layout=args.layout, links={"measured": row["hop_GBps"]}).iloc[0]
        row["model_ms"] = float(model.total_ms if mode == "fwd+bwd" else model.routing_ms + model.gather_ms
                                + model.fwd_ms)
    return row


# --------------------------------------------------------------------------------------------------
# output


def _fmt(x, digits=2):
    if x is None or x == "" or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if 10 ** -digits <= abs(x) < 1e4 or x == 0 else f"{x:.3g}"
    return str(x)


def markdown(check_rows, bench_rows, env) -> str:
    lines = [f"Context-parallel MoBA, {env.get('world')} x {env.get('cuda_device') or 'CPU'}, backend "
             f"{env.get('backend')}, commit {env.get('git_commit')}, {env.get('utc')}: batch {env['batch']}, "
             f"heads {env['heads']} / kv {env['kv_heads']}, d {env['head_dim']}, B {env['block_size']}, "
             f"k {env['top_k']}, {'causal' if env['causal'] else 'non-causal'}, {env['dtype']}, layout "
             f"{env['layout']}, kernels {env['kernels']}", ""]
    if check_rows:
        lines += ["| check N | rank | router | routing agreement | out | dq | dk | dv (rel. err vs reference) | "
                  "CUDA router agreement / out err | passed |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in check_rows:
            lines.append(f"| {r['seq_len']} | {r['rank']} | {r['router']} | {r['routing_agreement']:.6f} | "
                         f"{r['out_rel_err']:.2e} | "
                         f"{r['dq_rel_err']:.2e} | {r['dk_rel_err']:.2e} | {r['dv_rel_err']:.2e} | "
                         f"{_fmt(r.get('cuda_router_agreement'), 4)} / {_fmt(r.get('cuda_out_rel_err'), 4)} | "
                         f"{r['passed']} |")
        lines.append("")
    if bench_rows:
        lines += ["| N | GPUs | rank | mode | fwd ms | bwd ms | fwd+bwd ms | routing ms | hop ms (GB/s) | peak GB "
                  "| useful TFLOP/s | model ms | note |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in bench_rows:
            lines.append(
                f"| {r['seq_len']} | {r['gpus']} | {r['rank']} | {r['mode']} | {_fmt(r.get('fwd_ms'), 1)} | "
                f"{_fmt(r.get('bwd_ms'), 1)} | {_fmt(r.get('fwdbwd_ms'), 1)} | {_fmt(r.get('routing_ms'), 1)} | "
                f"{_fmt(r.get('hop_ms'), 2)} ({_fmt(r.get('hop_GBps'), 0)}) | {_fmt(r.get('peak_gb'), 1)} | "
                f"{_fmt(r.get('useful_tflops'), 1)} | {_fmt(r.get('model_ms'), 0)} | {r.get('note', '')} |")
    return "\n".join(lines) + "\n"


def _write(out_dir, name, columns, rows):
    with open(os.path.join(out_dir, name), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in columns})


def _parse_lengths(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20}.get(part[-1:], 1)
        try:
            n = int(part[:-1] if scale > 1 else part) * scale
        except ValueError:
            raise argparse.ArgumentTypeError(f"lengths are integers >= 0 with an optional K or M, separated by "
                                             f"commas (e.g. 1M,2M), got {text!r}") from None
        if n < 0:
            raise argparse.ArgumentTypeError(f"a length must be >= 0, got {part}")
        out.append(n)
    return out


def _at_least(low: int):
    def parse(text: str) -> int:
        n = int(text)
        if n < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text}")
        return n

    parse.__name__ = f"integer >= {low}"  # what argparse names in its error
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m mobalab.distributed.bench", description=__doc__.split("\n")[0])
    p.add_argument("--backend", choices=("gloo", "nccl"), default=None,
                   help="gloo (CPU tensors) or nccl (GPUs); default nccl when CUDA is available")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run in seconds")
    p.add_argument("--check-len", type=_parse_lengths, default=None, help="total length of the check (0: none)")
    p.add_argument("--lengths", type=_parse_lengths, default=None, help="total lengths to time, e.g. 1M,2M,4M")
    p.add_argument("--batch", type=_at_least(1), default=1)
    p.add_argument("--heads", type=_at_least(1), default=None)
    p.add_argument("--kv-heads", type=_at_least(1), default=None)
    p.add_argument("--head-dim", type=_at_least(1), default=None)
    p.add_argument("--block-size", type=_at_least(1), default=None)
    p.add_argument("--top-k", type=_at_least(1), default=None)
    p.add_argument("--non-causal", dest="causal", action="store_false")
    p.add_argument("--layout", choices=("contiguous", "zigzag"), default="contiguous")
    p.add_argument("--kernels", choices=("auto", "reference"), default="auto")
    p.add_argument("--path", choices=("cp", "single-device"), default="cp",
                   help="cp: context_parallel_moba_attention; single-device (one process only): "
                        "mobalab.kernels.moba_attention on the whole sequence, the one-GPU baseline without the ring")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on GPUs, fp32 on CPUs")
    p.add_argument("--reps", type=_at_least(1), default=3)
    p.add_argument("--warmup", type=_at_least(0), default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a collective may wait before failing")
    p.add_argument("--out", default="bench_out", help="output folder (rank 0 writes)")
    return p.parse_args(argv)


def _defaults(args, gpu: bool):
    """Fill what was not given: the reference configuration on GPUs, a small one on CPUs or with --quick."""
    big = gpu and not args.quick
    fill = dict(heads=16 if big else 4, head_dim=128 if gpu else 32, block_size=128 if gpu else 64,
                top_k=8 if gpu else 4, dtype="bf16" if gpu else "fp32")
    for name, value in fill.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.kv_heads is None:  # GQA on CPUs where the heads allow it
        args.kv_heads = args.heads if gpu or args.heads % 2 else args.heads // 2
    if args.check_len is None:
        args.check_len = [(256 << 10) if big else (64 << 10) if gpu else 1500]
    if args.lengths is None:
        args.lengths = [1 << 20, 1 << 21, 1 << 22] if big else [1 << 18, 1 << 19] if gpu else [4096, 8192]
    args.check_len = args.check_len[0]
    if args.quick:
        args.reps, args.warmup = min(args.reps, 2), min(args.warmup, 1)
    return args


def _refusal(args, world: int) -> str | None:
    """Why these settings cannot run on ``world`` processes, or None."""
    if args.path == "single-device" and world != 1:
        return f"--path single-device runs in one process, not {world}"
    if args.heads % args.kv_heads:
        return f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})"
    short = [n for n in [args.check_len or world, *args.lengths] if n < world]
    if short:
        return f"every length needs at least one token per process ({world}), got {', '.join(map(str, short))}"
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    owned = not dist.is_initialized()  # else: run in the default group the caller made
    if owned and ("RANK" not in os.environ or "WORLD_SIZE" not in os.environ):
        print("mobalab.distributed.bench: start it with torchrun, e.g. "
              "torchrun --nproc-per-node 2 -m mobalab.distributed.bench --backend gloo --quick")
        return 2
    if owned:
        backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    else:
        backend = str(dist.get_backend()).lower()
        if args.backend not in (None, backend):
            print(f"mobalab.distributed.bench: the process group runs {backend}, not {args.backend}")
            return 2
    gpu = backend == "nccl"
    if gpu:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
        use_device(device.index)  # torch's and CuPy's current device: the kernels launch on CuPy's
    else:
        device = torch.device("cpu")
        if owned:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["WORLD_SIZE"])))
    args = _defaults(args, gpu)
    dtype = DTYPES[args.dtype]
    if owned:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.timeout),
                                device_id=device if gpu else None)
    ring = ring_of(None)
    refusal = _refusal(args, ring.world)
    if refusal:
        print(f"mobalab.distributed.bench: {refusal}")
        if owned:
            dist.destroy_process_group()
        return 2
    env = environment()
    env.update(world=ring.world, backend=backend, batch=args.batch, heads=args.heads, kv_heads=args.kv_heads,
               head_dim=args.head_dim, block_size=args.block_size, top_k=args.top_k, causal=args.causal,
               dtype=args.dtype, layout=args.layout, kernels=args.kernels, reps=args.reps, warmup=args.warmup,
               path=args.path)
    if ring.rank == 0:
        os.makedirs(args.out, exist_ok=True)
        print(json.dumps(env), flush=True)
        with open(os.path.join(args.out, "cp_bench_env.json"), "w") as f:  # now: a run cut short keeps it
            json.dump(env, f, indent=1)
    status = 0
    check_rows, bench_rows = [], []
    try:
        if args.check_len:
            row = check(args, device, dtype, ring)
            gathered = [None] * ring.world
            dist.all_gather_object(gathered, row, group=ring.group)
            check_rows = gathered
            if ring.rank == 0:
                for r in check_rows:
                    print({k: (round(v, 8) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
                _write(args.out, "cp_check.csv", CHECK_COLUMNS, check_rows)
            if not all(r["passed"] for r in check_rows):
                status = 1
            if gpu:
                torch.cuda.empty_cache()
        measured = {}
        for n in args.lengths:
            row = time_length(n, args, device, dtype, ring, measured)
            gathered = [None] * ring.world
            dist.all_gather_object(gathered, row, group=ring.group)
            bench_rows += gathered
            if any(r["mode"] == "skip" for r in gathered):
                status = 1
            if ring.rank == 0:
                for r in gathered:
                    print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
                _write(args.out, "cp_bench.csv", BENCH_COLUMNS, bench_rows)
                with open(os.path.join(args.out, "cp_bench_table.md"), "w") as f:
                    f.write(markdown(check_rows, bench_rows, env))
            if gpu:
                torch.cuda.empty_cache()
        if ring.rank == 0:
            with open(os.path.join(args.out, "cp_bench_env.json"), "w") as f:
                json.dump(env, f, indent=1)
            with open(os.path.join(args.out, "cp_bench_table.md"), "w") as f:
                f.write(markdown(check_rows, bench_rows, env))
            print(markdown(check_rows, bench_rows, env), flush=True)
    finally:
        if owned:
            dist.destroy_process_group()
    return status


if __name__ == "__main__":
    raise SystemExit(main())
