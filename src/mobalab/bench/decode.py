r"""MoBA decode step against dense decode on the same KV cache: ``python -m mobalab.bench.decode [--quick]``.

One step = every sequence of the batch attends its newest token (q_len 1) over a cache of N tokens:
mobalab's :func:`~mobalab.kernels.moba_decode` (one launch: routing over the cached block sums, then
split-KV attention over the selected blocks) side by side with torch SDPA on the whole cache (FLASH_ATTENTION,
CUDNN_ATTENTION and EFFICIENT_ATTENTION backends, whichever run; the query heads of each kv head packed as
query rows, so K and V are read once) and FlexAttention with a block mask built from mobalab's selection
(attention only, GQA; skipped when it does not compile or run). 32 query
heads / 8 kv heads, head dim 128, bf16, random Gaussian q / k / v (never zeros).

Timing: each method is captured in a CUDA graph (so the numbers are device time, not Python launch
overhead; ``mobalab_eager_ms`` is the plain call for comparison), replayed many times after warm-up with
L2 flushed before every replay, each replay timed by CUDA events; the median is reported. The flush reads
a 256 MB buffer: a write would leave L2 full of dirty lines whose write-back (~50 MB) lands inside the
timed step, a sizeable extra on a step that reads ~100 MB and nearly nothing on dense decode.
``routing_ms`` times the same kernel launched with the routing items only; ``attention_ms`` is the rest of
the step (attention, the hand-over from routing, the final merge). ``mobalab_ms_items1`` / ``_items3`` time
the step with one or three routing items and attention units per CTA slot instead of two (CSV only).
``--kernel`` picks the decode kernel: ``fused`` (cuda/decode.cu, one persistent launch), ``split``
(cuda/decode_split.cu: a score launch, a select launch unless the attention CTAs select, then an attention
launch; its ``routing_ms`` is the score and select launches alone, as a step without attention runs them, no
items columns) or ``both`` (the default: two rows per configuration, column
``kernel``).
Bytes needed per step are counted from the actual selection: the fp32 block sums of the complete past
blocks (with ``--centroid-precision input`` and the split kernel, their 16-bit means), the K and V of the
union of the blocks the query heads of each kv head selected (the own block with its real tokens), q and
out. Achieved bandwidth = bytes / time, shown as a fraction of the measured device-to-device copy bandwidth
of the same run (the datasheet's figure is shown beside it: :func:`datasheet_tbps`); dense decode's bytes
are the whole cache. Writes ``decode.csv``, ``decode_table.md`` and ``decode_env.json``
under ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import statistics
import sys
from dataclasses import asdict, dataclass

import torch

from mobalab.kernels._contract import CENTROID_PRECISIONS

from ._ncu import NCU_METRICS, kernel_summaries

__all__ = ["main", "configs", "DecodeConfig", "selection_bytes", "markdown", "targets", "ncu_command", "ncu_summary",
           "profile_steps", "COLUMNS", "datasheet_tbps"]

K = 1024
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
#: HBM bandwidth by the datasheets (TB/s), by a substring of the device name; the first match counts
DATASHEET_TBPS = (("H200", 4.8), ("H100 PCIe", 2.0), ("H100 NVL", 3.9), ("H100", 3.35), ("H800 PCIe", 2.0),
                  ("H800", 3.35), ("A100-SXM4-80GB", 2.039), ("A100 80GB PCIe", 1.935), ("A100", 1.555))


def datasheet_tbps(device_name: str | None) -> float:
    """The datasheet HBM bandwidth of ``device_name`` in TB/s, NaN for a device not in :data:`DATASHEET_TBPS`.

    Examples
    --------
    >>> datasheet_tbps("NVIDIA H100 80GB HBM3"), datasheet_tbps("NVIDIA H200")
    (3.35, 4.8)
    >>> datasheet_tbps("NVIDIA GeForce RTX 4090")
    nan
    """
    for key, tbps in DATASHEET_TBPS:
        if key in (device_name or ""):
            return tbps
    return math.nan


#: tokens x batch of one cache (K + V are 4 KB per token at 8 kv heads, d 128, bf16): 32 GB
MAX_TOKENS = 8 * 1024 * K
SDPA_BACKENDS = ("flash", "cudnn", "efficient")
KERNEL_CHOICES = {"fused": ("fused",), "split": ("split",), "both": ("fused", "split")}


@dataclass(frozen=True)
class DecodeConfig:
    seq_len: int
    batch: int
    block_size: int
    top_k: int
    flex: bool = False
    heads: int = HEADS
    kv_heads: int = KV_HEADS
    head_dim: int = HEAD_DIM
    centroid_precision: str = "fp32"  # moba_decode's routing precision ("input": the split kernel reads 16-bit means)


def configs(quick: bool) -> list[DecodeConfig]:
    """The sweep: context 8K..1M, batch 1 / 8 / 64 (caches up to 8M tokens), B 32 / 64 / 128, k 4 / 8 / 16.

    ``quick`` (under a minute): the targets (512K and 32K at batch 8, B 128, k 8), the roofline points
    (batch 8 at 128K and 1M), the other block sizes and top-k at 128K, and batch 1 and 64; no FlexAttention
    (its compilation alone takes longer than the rest), which the full sweep times at 32K and 512K.
    """
    if quick:
        return [DecodeConfig(512 * K, 8, 128, 8), DecodeConfig(32 * K, 8, 128, 8),
                DecodeConfig(128 * K, 8, 128, 8), DecodeConfig(128 * K, 8, 32, 8), DecodeConfig(128 * K, 8, 64, 4),
                DecodeConfig(128 * K, 8, 128, 16), DecodeConfig(1024 * K, 8, 128, 8), DecodeConfig(128 * K, 1, 128, 8),
                DecodeConfig(32 * K, 64, 128, 8)]
    out = []
    for n in (8 * K, 32 * K, 128 * K, 512 * K, 1024 * K):
        for batch in (1, 8, 64):
            if n * batch > MAX_TOKENS:
                continue
            for block in (32, 64, 128):
                for top_k in (4, 8, 16):
                    flex = batch == 8 and top_k == 8 and n in (32 * K, 512 * K)
                    out.append(DecodeConfig(n, batch, block, top_k, flex=flex))
    return out


# --------------------------------------------------------------------------------------------------
# counting


def selection_bytes(sel: torch.Tensor, seq_len: int, block_size: int, kv_heads: int, head_dim: int,
                    itemsize: int = 2, centroid_itemsize: int = 4) -> dict:
    """Bytes a step needs given the selection ``sel`` (batch, q_len, heads, top_k), all sequences of length N.

    Block rows the score pass streams: :math:`\\lceil R/64\\rceil n_p d` elements of ``centroid_itemsize`` bytes
    per (sequence, kv head) (4: the fp32 sums; the split kernel of ``centroid_precision="input"`` streams the
    16-bit means), :math:`R` = heads / kv_heads x q_len (the query rows of a kv head),
    :math:`n_p = \\lfloor(N-1)/B\\rfloor`; K and V: the union of the blocks the heads of a kv head
    selected (the own block with its real tokens); q and out; ``unique_blocks`` is the mean union size per kv head.
    """
    if not isinstance(sel, torch.Tensor) or sel.dim() != 4:
        raise ValueError(f"selection_bytes: sel must be a (batch, q_len, heads, top_k) tensor, got "
                         f"{tuple(sel.shape) if isinstance(sel, torch.Tensor) else type(sel).__name__}")
    batch, q_len, heads, top_k = sel.shape
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"selection_bytes: sel's {heads} heads are not a multiple of kv_heads {kv_heads}")
    group = heads // kv_heads
    rows = group * q_len
    n_blocks = math.ceil(seq_len / block_size)
    n_past = (seq_len - 1) // block_size
    flat = sel.permute(0, 2, 1, 3).reshape(batch, kv_heads, rows * top_k).long()
    hit = torch.zeros(batch, kv_heads, n_blocks + 1, dtype=torch.bool, device=sel.device)
    hit.scatter_(2, torch.where(flat >= 0, flat, n_blocks), True)
    hit = hit[..., :n_blocks]
    tokens = torch.full((n_blocks,), block_size, dtype=torch.int64, device=sel.device)
    tokens[-1] = seq_len - (n_blocks - 1) * block_size
    kv_tokens = int((hit.to(torch.int64) * tokens).sum())
    centroid = batch * kv_heads * math.ceil(rows / 64) * n_past * head_dim * centroid_itemsize
    kv = 2 * kv_tokens * head_dim * itemsize
    q_out = 2 * batch * q_len * heads * head_dim * itemsize + batch * q_len * heads * 4
    return dict(centroid_bytes=centroid, kv_bytes=kv, q_out_bytes=q_out, bytes_needed=centroid + kv + q_out,
                unique_blocks=float(hit.sum()) / (batch * kv_heads))


def dense_bytes(batch: int, seq_len: int, heads: int, kv_heads: int, head_dim: int, itemsize: int = 2) -> int:
    return 2 * batch * kv_heads * seq_len * head_dim * itemsize + 2 * batch * heads * head_dim * itemsize


# --------------------------------------------------------------------------------------------------
# timing


def l2_flush_buffer() -> torch.Tensor:
    """256 MB on the current GPU (several times its L2): reading it with :func:`_flush_l2` evicts the L2."""
    return torch.zeros(64 << 20, dtype=torch.float32, device="cuda")


def _flush_l2(buf: torch.Tensor) -> None:
    """Evict L2 by reading ``buf`` (larger than L2); reading leaves no dirty lines to write back later."""
    if buf.numel():
        torch.sum(buf)


def _events(reps, fn, flush):
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for a, b in zip(starts, ends, strict=True):
        _flush_l2(flush)  # evict L2 (outside the timed region)
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in zip(starts, ends, strict=True))


def time_step(fn, reps: int, flush: torch.Tensor) -> tuple[float, str]:
    """(median ms, "graph" | "eager"): ``fn`` captured in a CUDA graph and replayed, else called directly."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        torch.cuda.synchronize()
        return _events(reps, graph.replay, flush), "graph"
    except Exception as exc:  # a method that cannot be captured is timed as called
        print(f"    (no CUDA graph: {type(exc).__name__}: {str(exc)[:100]}); timing eager calls", flush=True)
        torch.cuda.synchronize()
        return _events(reps, fn, flush), "eager"


def copy_bandwidth(nbytes: int = 2 << 30, reps: int = 20) -> float:
    """Measured device-to-device copy bandwidth, TB/s (read + write bytes over time)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)

    def copy():
        dst.copy_(src)

    for _ in range(3):
        copy()
    torch.cuda.synchronize()
    ms = _events(reps, copy, torch.empty(0, device="cuda"))
    return 2 * nbytes / (ms * 1e-3) / 1e12


# --------------------------------------------------------------------------------------------------
# one (context, batch) group


def _dense_fns(q, k, v):
    """Dense decode on the cache k, v (b, kv_heads, N, d): the G query heads of a kv head are packed as G query
    rows of that head (q_len 1 needs no mask), so every backend reads K and V once, without GQA support."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION}
    batch, _, heads, dim = q.shape
    packed = q.reshape(batch, k.shape[1], heads // k.shape[1], dim)  # (b, kv_heads, G, d)

    def make(backend):
        def run():
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(packed, k, v)
        return run

    return {name: make(be) for name, be in names.items()}


def _flex_fn(q, k, v, sel, block_size, seq_len):
    """FlexAttention over mobalab's selection: the selected blocks as full blocks of a BlockMask (no mask_mod
    evaluated inside them, unselected blocks skipped), with the matching mask_mod for every other path."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    batch, _, heads, top_k = sel.shape
    n_blocks = math.ceil(seq_len / block_size)
    blocks = sel[:, 0].long()  # (b, heads, top_k)
    chosen = torch.zeros((batch, heads, n_blocks + 1), dtype=torch.bool, device=sel.device)
    chosen.scatter_(2, torch.where(blocks >= 0, blocks, n_blocks), True)
    chosen = chosen[..., :n_blocks].contiguous()
    count = chosen.sum(-1, dtype=torch.int32).unsqueeze(-1)  # (b, heads, 1 query block)
    # one row of kv block indices as wide as the number of kv blocks, the selected ones first (ascending)
    order = torch.argsort((~chosen).to(torch.int8), dim=-1, stable=True).to(torch.int32).unsqueeze(2)
    none = torch.zeros_like(count)

    def mask_mod(b, h, q_idx, kv_idx):
        return chosen[b, h, kv_idx // block_size]

    mask = BlockMask.from_kv_blocks(none, order, count, order, BLOCK_SIZE=(128, block_size), mask_mod=mask_mod,
                                    seq_lengths=(1, seq_len))
    flex = torch.compile(flex_attention, dynamic=False)
    qt = q.transpose(1, 2)
    return lambda: flex(qt, k, v, block_mask=mask, enable_gqa=True)


def run_group(cfgs: list[DecodeConfig], reps: int, flush: torch.Tensor, copy_tbps: float, use_flex: bool,
              kernels: tuple[str, ...] = ("fused",), sink: list | None = None) -> list:
    """All configurations of one (context, batch): one prompt, one cache per block size, dense timed once;
    one row per configuration and decode kernel, each also appended to ``sink`` as soon as it is measured (so
    a later failure in the group keeps it)."""
    from mobalab.kernels import MobaKVCache

    c0 = cfgs[0]
    n, batch, heads, kvh, d = c0.seq_len, c0.batch, c0.heads, c0.kv_heads, c0.head_dim
    gen = torch.Generator(device="cuda").manual_seed(n + batch)
    k = torch.randn((batch, n, kvh, d), generator=gen, device="cuda", dtype=torch.bfloat16)
    v = torch.randn((batch, n, kvh, d), generator=gen, device="cuda", dtype=torch.bfloat16)
    q = torch.randn((batch, 1, heads, d), generator=gen, device="cuda", dtype=torch.bfloat16)
    rows, dense = [], {}
    for block in sorted({c.block_size for c in cfgs}):
        cache = MobaKVCache(batch, kvh, d, block, n, dtype=torch.bfloat16, device="cuda")
        cache.prefill(k, v)
        if not dense:  # the whole cache, (b, kv_heads, N, d), same memory as mobalab reads
            kc, vc = cache.k[:, :, :n], cache.v[:, :, :n]
            for name, fn in _dense_fns(q, kc, vc).items():
                try:
                    dense[name], _ = time_step(fn, max(10, reps // 4), flush)
                except Exception as exc:  # a backend that does not take this shape / GQA
                    dense[name] = math.nan
                    print(f"    sdpa {name}: not run ({type(exc).__name__}: {str(exc)[:80]})", flush=True)
        for cfg in (c for c in cfgs if c.block_size == block):
            flex_ms = None
            for kernel in kernels:
                row = _measure(cfg, q, cache, dense, reps, flush, use_flex, kernel, flex_ms)
                flex_ms = row["flex_ms"]  # FlexAttention on the same selection: timed once per configuration
                _derive(row, copy_tbps)
                rows.append(row)
                if sink is not None:
                    sink.append(row)
                print({key: (round(x, 4) if isinstance(x, float) else x) for key, x in row.items()}, flush=True)
        del cache
        torch.cuda.empty_cache()
    return rows


def _measure(cfg: DecodeConfig, q, cache, dense: dict, reps: int, flush, use_flex: bool, kernel: str = "fused",
             flex_ms: float | None = None) -> dict:
    """One configuration and decode kernel: mobalab's step (graph and eager), its routing alone, bytes from its
    selection, flex (timed unless ``flex_ms`` is given)."""
    from mobalab.kernels import _decode as D
    from mobalab.kernels import decode_flops
    from mobalab.kernels._build import sm_count
    from mobalab.kernels._cuda_decode import decode_cuda, run, step_launches
    from mobalab.kernels._cuda_decode_split import split_launches

    n, batch, heads, kvh, d, block = cfg.seq_len, cfg.batch, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.block_size
    scale = 1.0 / math.sqrt(d)
    row = asdict(cfg)
    row["kernel"] = kernel

    def step():  # what moba_decode does, with the kernel named instead of read from the environment
        top_k, sc = D.check_decode(q, cache, cfg.top_k)
        return decode_cuda(q, cache, top_k, sc, False, kernel=kernel, centroid_precision=cfg.centroid_precision)

    row["mobalab_ms"], row["timing"] = time_step(step, reps, flush)
    row["mobalab_eager_ms"] = _events(max(10, reps // 4), step, flush)
    dev = torch.cuda.current_device()
    plans = step_launches if kernel == "fused" else split_launches
    _, _, launches = plans(q, cache, cfg.top_k, scale, sm_count=sm_count(dev), route_only=True,
                           centroid_precision=cfg.centroid_precision)

    def route():
        for launch in launches:  # the fused step's routing items; or the scores, then the selection
            run(launch, dev)

    row["routing_ms"], _ = time_step(route, reps, flush)
    for items in (1, 3):  # other work decompositions of the fused kernel
        if kernel != "fused":
            row[f"mobalab_ms_items{items}"] = math.nan
            continue
        _, _, other = step_launches(q, cache, cfg.top_k, scale, sm_count=sm_count(dev), items_per_slot=items,
                                    centroid_precision=cfg.centroid_precision)
        row[f"mobalab_ms_items{items}"], _ = time_step(lambda launch=other[0]: run(launch, dev), reps, flush)
    _, _, sel = decode_cuda(q, cache, cfg.top_k, scale, True, return_selection=True, kernel=kernel,
                            centroid_precision=cfg.centroid_precision)
    # the split kernel's input-precision score pass streams the cache's 16-bit means; the fused kernel the fp32 sums
    means = cfg.centroid_precision == "input" and kernel != "fused"
    row.update(selection_bytes(sel, n, block, kvh, d, centroid_itemsize=q.element_size() if means else 4))
    row["dense_bytes"] = dense_bytes(batch, n, heads, kvh, d)
    row["useful_gflop"] = decode_flops(n, block, cfg.top_k, batch=batch, heads=heads, kv_heads=kvh,
                                       head_dim=d)["total_flops"] / 1e9
    for name in SDPA_BACKENDS:
        row[f"sdpa_{name}_ms"] = dense.get(name, math.nan)
    ok = {name: ms for name, ms in dense.items() if not math.isnan(ms)}
    row["dense_best"] = min(ok, key=ok.get) if ok else ""
    row["dense_best_ms"] = ok[row["dense_best"]] if ok else math.nan
    row["flex_ms"] = math.nan if flex_ms is None else flex_ms
    if cfg.flex and use_flex and flex_ms is None:
        try:
            flex = _flex_fn(q, cache.k[:, :, :n], cache.v[:, :, :n], sel, block, n)
            row["flex_ms"], _ = time_step(flex, reps, flush)
        except Exception as exc:  # FlexAttention is optional: say why it did not run
            print(f"    flex attention: not run ({type(exc).__name__}: {str(exc)[:100]})", flush=True)
    return row


def _derive(row: dict, copy_tbps: float) -> None:
    ms = row["mobalab_ms"]
    row["speedup_vs_dense"] = row["dense_best_ms"] / ms
    row["mobalab_tbps"] = row["bytes_needed"] / (ms * 1e-3) / 1e12
    row["dense_tbps"] = row["dense_bytes"] / (row["dense_best_ms"] * 1e-3) / 1e12
    row["copy_tbps"] = copy_tbps
    row["roofline_fraction"] = row["mobalab_tbps"] / copy_tbps
    row["dense_roofline_fraction"] = row["dense_tbps"] / copy_tbps
    row["byte_ratio"] = row["dense_bytes"] / row["bytes_needed"]
    row["attention_ms"] = ms - row["routing_ms"]


# --------------------------------------------------------------------------------------------------
# report


COLUMNS = ["seq_len", "batch", "heads", "kv_heads", "head_dim", "block_size", "top_k", "kernel", "centroid_precision",
           "mobalab_ms",
           "routing_ms",
           "attention_ms", "mobalab_ms_items1", "mobalab_ms_items3", "mobalab_eager_ms", "timing", "sdpa_flash_ms",
           "sdpa_cudnn_ms", "sdpa_efficient_ms", "dense_best", "dense_best_ms", "flex_ms", "speedup_vs_dense",
           "bytes_needed", "centroid_bytes", "kv_bytes", "q_out_bytes", "unique_blocks", "dense_bytes", "byte_ratio",
           "mobalab_tbps", "dense_tbps", "copy_tbps", "roofline_fraction", "dense_roofline_fraction", "useful_gflop"]


def _fmt(x, nd=3) -> str:
    if isinstance(x, float):
        return "n/a" if math.isnan(x) else f"{x:.{nd}f}"
    return str(x)


def _fmt_x(x) -> str:
    """A speedup: two decimals below 10x, so that 0.96x does not print as a tie ("1.0")."""
    return _fmt(x, 2 if isinstance(x, float) and abs(x) < 10 else 1)


def _tokens(n: int) -> str:
    return f"{n // (1024 * K)}M" if n % (1024 * K) == 0 else f"{n // K}K" if n % K == 0 else str(n)


def _bytes_cell(row: dict) -> str:
    """Total MB and its parts, block sums + K/V + the rest (q, out, lse: over 1 MB at batch 64), so that the parts
    shown add up to the total."""
    total, sums, kv = row["bytes_needed"], row["centroid_bytes"], row["kv_bytes"]
    return f"{total / 1e6:.1f} ({sums / 1e6:.1f} + {kv / 1e6:.1f} + {(total - sums - kv) / 1e6:.1f})"


def _kernel(row: dict) -> str:
    return row.get("kernel", "fused")


def targets(rows: list[dict]) -> list[tuple[str, float, str, bool]]:
    """(what, measured, goal, met) for the headline targets present in ``rows``, per decode kernel."""
    out = []
    kernels = list(dict.fromkeys(_kernel(r) for r in rows))
    for n, goal in ((512 * K, 30.0), (32 * K, 3.0)):
        for r in rows:
            if (r["seq_len"], r["batch"], r["block_size"], r["top_k"]) == (n, 8, 128, 8):
                x = r["speedup_vs_dense"]
                out.append((f"{_tokens(n)} batch 8 B 128 k 8: speedup of the {_kernel(r)} kernel vs fastest dense "
                            f"SDPA ({r['dense_best']})", x, f">= {goal:g}x", not math.isnan(x) and x >= goal))
    for kernel in kernels:
        big = [r for r in rows if r["batch"] >= 8 and r["seq_len"] >= 128 * K and _kernel(r) == kernel]
        if big:
            worst = min(big, key=lambda r: r["roofline_fraction"])
            out.append((f"HBM roofline at batch >= 8, N >= 128K, {kernel} kernel (worst: "
                        f"{_tokens(worst['seq_len'])} b{worst['batch']} B{worst['block_size']} k{worst['top_k']})",
                        worst["roofline_fraction"], ">= 0.70", worst["roofline_fraction"] >= 0.70))
    return out


def markdown(rows: list[dict], env: dict) -> str:
    head = ["N", "batch", "B", "k", "mobalab ms (routing)", "eager ms", "SDPA flash / cuDNN / efficient ms",
            "flex ms", "x dense", "MB needed (sums + K/V + q/out)", "blocks/kv head", "TB/s", "roofline", "dense TB/s",
            "kernel"]
    copy = rows[0]["copy_tbps"] if rows else math.nan
    precision = {r.get("centroid_precision", "fp32") for r in rows}
    routed = "" if precision <= {"fp32"} else f", routing on {'/'.join(sorted(precision))} centroids"
    lines = [f"MoBA decode step vs dense decode, {HEADS} / {KV_HEADS} heads, d {HEAD_DIM}, bf16, q_len 1{routed} -- "
             f"{env.get('cuda_device')}, {env.get('utc')}, commit {env.get('git_commit')}; measured copy bandwidth "
             f"{_fmt(copy, 2)} TB/s (datasheet {_fmt(datasheet_tbps(env.get('cuda_device')), 2)})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [_tokens(r["seq_len"]), r["batch"], r["block_size"], r["top_k"],
                 f"{_fmt(r['mobalab_ms'])} ({_fmt(r['routing_ms'])})", _fmt(r["mobalab_eager_ms"]),
                 " / ".join(_fmt(r[f"sdpa_{n}_ms"]) for n in SDPA_BACKENDS), _fmt(r["flex_ms"]),
                 _fmt_x(r["speedup_vs_dense"]),
                 _bytes_cell(r),
                 _fmt(r["unique_blocks"], 1), _fmt(r["mobalab_tbps"], 2), f"{100 * r['roofline_fraction']:.0f}%",
                 _fmt(r["dense_tbps"], 2), _kernel(r)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "Targets:"]
    for what, value, goal, met in targets(rows):
        lines.append(f"- {what}: {_fmt(value, 2)} (goal {goal}) -> {'met' if met else 'NOT met'}")
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: str, rows: list[dict], env: dict) -> None:
    with open(os.path.join(out_dir, "decode.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in COLUMNS})
    with open(os.path.join(out_dir, "decode_env.json"), "w") as f:
        json.dump(env, f, indent=1, default=str)
    with open(os.path.join(out_dir, "decode_table.md"), "w") as f:
        f.write(markdown(rows, env))


# --------------------------------------------------------------------------------------------------
# driver


# --------------------------------------------------------------------------------------------------
# profiling: one small program per configuration, run under Nsight Compute

#: (N, batch) of the profiled steps (B 128, k 8): the two speed targets
PROFILE_POINTS = ((512 * K, 8), (32 * K, 8))
PROFILE_STEPS = 3  # launches of the step kernel; Nsight Compute profiles the last
NCU_SECTIONS = ("SpeedOfLight", "MemoryWorkloadAnalysis", "Occupancy", "WarpStateStats", "LaunchStats",
                "SchedulerStats")


def random_cache(seq_len: int, batch: int, block_size: int, seed: int):
    """(cache, q): a CUDA MobaKVCache prefilled with ``seq_len`` random bf16 tokens of K and V per sequence (32 / 8
    heads, d 128) and the queries of one step (q_len 1), from generator seed ``seed``."""
    from mobalab.kernels import MobaKVCache

    gen = torch.Generator(device="cuda").manual_seed(seed)
    cache = MobaKVCache(batch, KV_HEADS, HEAD_DIM, block_size, seq_len, dtype=torch.bfloat16, device="cuda")
    k = torch.randn((batch, seq_len, KV_HEADS, HEAD_DIM), generator=gen, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    cache.prefill(k, v)
    del k, v
    return cache, torch.randn((batch, 1, HEADS, HEAD_DIM), generator=gen, device="cuda", dtype=torch.bfloat16)


def profile_steps(seq_len: int, batch: int, block_size: int = 128, top_k: int = 8, steps: int = PROFILE_STEPS,
                  kernel: str = "fused") -> None:
    """Build one cache (random bf16 K/V, 32 / 8 heads, d 128) and run ``steps`` decode steps (q_len 1) of the
    decode ``kernel``, L2 flushed before each: the program Nsight Compute profiles (it takes the last step's
    launches)."""
    from mobalab.kernels import _decode as D
    from mobalab.kernels._cuda_decode import decode_cuda

    cache, q = random_cache(seq_len, batch, block_size, seq_len + batch)
    flush = l2_flush_buffer()
    for _ in range(steps):
        _flush_l2(flush)
        k_sel, scale = D.check_decode(q, cache, top_k)
        out = decode_cuda(q, cache, k_sel, scale, False, kernel=kernel)
    torch.cuda.synchronize()
    print(f"profiled program ({kernel} kernel): N {seq_len}, batch {batch}, B {block_size}, k {top_k}: {steps} steps, "
          f"out finite: {bool(torch.isfinite(out.float()).all())}", flush=True)


#: kernel-name pattern and launches per step of each decode kernel
_NCU_KERNELS = {"fused": ("regex:moba_decode_step", 1), "split": ("regex:moba_decode_(route|attend)", 3)}


def ncu_command(report: str, seq_len: int, batch: int, ncu: str = "ncu", kernel: str = "fused") -> list[str]:
    """The Nsight Compute command line for one profiled point: the decode kernel's launches only (fused: the
    step kernel; split: the score, select and attention kernels), those of the last of :data:`PROFILE_STEPS`
    steps, clocks left alone, the sections and metrics of the summary."""
    pattern, per_step = _NCU_KERNELS[kernel]
    cmd = [ncu, "--clock-control", "none", "--kernel-name", pattern, "--launch-skip",
           str(per_step * (PROFILE_STEPS - 1)), "--launch-count", str(per_step), "--force-overwrite", "-o", report]
    for sec in NCU_SECTIONS:
        cmd += ["--section", sec]
    cmd += ["--metrics", ",".join(NCU_METRICS)]
    prog = [sys.executable, "-m", "mobalab.bench.decode", "--profile", "--seq-len", str(seq_len), "--batch", str(batch)]
    return cmd + prog + (["--kernel", kernel] if kernel != "fused" else [])


def ncu_summary(raw_csv: str) -> dict:
    """Duration, DRAM throughput (% of peak and GB/s), achieved occupancy, registers and the three largest warp
    stall reasons from ``ncu --import REPORT --page raw --csv`` text: its last launch (the step kernel; see
    :func:`mobalab.bench._ncu.kernel_summaries`)."""
    s = kernel_summaries(raw_csv)[-1]
    return {k: s[k] for k in ("duration_us", "dram_pct", "dram_gbps", "dram_mb", "occupancy_pct", "registers",
                              "grid", "stalls")}


def run_ncu(out_dir: str, ncu: str = "ncu", kernel: str = "fused") -> int:
    """Profile :data:`PROFILE_POINTS` of the decode ``kernel`` under Nsight Compute: full reports (``.ncu-rep``
    and text) under ``out_dir``, the summary (one row per profiled launch) printed and written to
    ``decode_ncu_table.md`` (fused) or ``decode_ncu_<kernel>_table.md``."""
    import shutil
    import subprocess

    exe = shutil.which(ncu)
    if exe is None:
        print(f"mobalab bench --decode --ncu: Nsight Compute ({ncu}) is not on PATH", file=sys.stderr)
        return 2
    os.makedirs(out_dir, exist_ok=True)
    lines = [f"Nsight Compute, the {kernel} decode kernel's launches of one step after warm-up (L2 flushed, clocks "
             f"not locked), B 128, k 8, {HEADS} / {KV_HEADS} heads, d {HEAD_DIM}, bf16", "",
             "| N | batch | duration us | DRAM % of peak | DRAM GB/s (MB moved) | achieved occupancy % | registers "
             "| grid | top warp stalls (cycles per issued instruction) | kernel |", "|" + "---|" * 10]
    status = 0
    tag = "" if kernel == "fused" else f"_{kernel}"
    for n, batch in PROFILE_POINTS:
        report = os.path.join(out_dir, f"decode{tag}_{_tokens(n)}_b{batch}")
        proc = subprocess.run(ncu_command(report, n, batch, exe, kernel), capture_output=True, text=True,
                              timeout=300)
        with open(report + ".log", "w") as f:
            f.write(proc.stdout + proc.stderr)
        if proc.returncode != 0 or not os.path.exists(report + ".ncu-rep"):
            print(f"ncu failed at N {_tokens(n)} batch {batch} (exit {proc.returncode}); see {report}.log\n"
                  f"{(proc.stdout + proc.stderr)[-1500:]}", flush=True)
            status = 1
            continue
        details = subprocess.run([exe, "--import", report + ".ncu-rep", "--page", "details", "--print-details", "all"],
                                 capture_output=True, text=True, timeout=120)
        with open(report + ".txt", "w") as f:
            f.write(details.stdout + details.stderr)
        raw = subprocess.run([exe, "--import", report + ".ncu-rep", "--page", "raw", "--csv", "--print-units", "base"],
                             capture_output=True, text=True, timeout=120)
        try:
            summaries = kernel_summaries(raw.stdout)[-_NCU_KERNELS[kernel][1]:]
        except ValueError as exc:
            print(f"N {_tokens(n)} batch {batch}: {exc}", flush=True)
            status = 1
            continue
        for s in summaries:
            stalls = ", ".join(f"{name} {x:.1f}" for name, x in s["stalls"]) or "n/a"
            lines.append(f"| {_tokens(n)} | {batch} | {s['duration_us']:.1f} | {s['dram_pct']:.1f} | "
                         f"{s['dram_gbps']:.0f} ({s['dram_mb']:.1f}) | {s['occupancy_pct']:.1f} | {s['registers']:.0f} "
                         f"| {s['grid']:.0f} | {stalls} | {s['kernel']} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, f"decode_ncu{tag}_table.md"), "w") as f:
        f.write(text)
    print(text, flush=True)
    return status


def _at_least(minimum: int):
    """An argparse type: an integer >= ``minimum`` (a zero or negative size fails at parsing, on any machine)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mobalab bench --decode", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="the targets and a few more points, no FlexAttention (under a minute)")
    p.add_argument("--out", default=os.path.join("runs", "bench-decode"), help="output folder")
    p.add_argument("--reps", type=_at_least(3), default=100, help="timed replays per method, at least 3 (default 100)")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention (it compiles per shape)")
    p.add_argument("--kernel", choices=sorted(KERNEL_CHOICES), default=None,
                   help="decode kernel(s): fused (one persistent launch), split (score + select + attention launches) "
                        "or both (two rows per configuration); default: both for the benchmark, fused for --profile "
                        "and --ncu (which take fused or split)")
    p.add_argument("--centroid-precision", choices=CENTROID_PRECISIONS, default="fp32",
                   help="moba_decode's routing: the fp32 block means (default) or the means rounded to the cache's "
                        "dtype (centroid_precision='input')")
    p.add_argument("--profile", action="store_true",
                   help=f"no benchmark: build one cache (--seq-len, --batch, --block-size, --top-k) and run "
                        f"{PROFILE_STEPS} steps, for a profiler")
    p.add_argument("--ncu", metavar="DIR", default=None,
                   help="profile the step kernel under Nsight Compute at 512K and 32K, batch 8, B 128, k 8; reports "
                        "and a summary table under DIR")
    p.add_argument("--seq-len", type=_at_least(1), default=512 * K,
                   help="--profile: tokens per sequence (default 512K)")
    p.add_argument("--batch", type=_at_least(1), default=8, help="--profile: sequences (default 8)")
    p.add_argument("--block-size", type=_at_least(1), default=128, help="--profile: block size (default 128)")
    p.add_argument("--top-k", type=_at_least(1), default=8, help="--profile: top-k (default 8)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mobalab.kernels import gpu_available

    if not gpu_available():
        print("mobalab bench --decode: needs an NVIDIA GPU with CUDA and CuPy (pip install 'mobalab[gpu]'); "
              "none is usable here", file=sys.stderr)
        return 2
    if args.profile or args.ncu is not None:
        kernel = args.kernel or "fused"
        if kernel == "both":
            print("mobalab bench --decode: --profile and --ncu take --kernel fused or split, not both", file=sys.stderr)
            return 2
        if args.profile:
            profile_steps(args.seq_len, args.batch, args.block_size, args.top_k, kernel=kernel)
            return 0
        return run_ncu(args.ncu, kernel=kernel)
    from mobalab.bench.environment import environment

    os.makedirs(args.out, exist_ok=True)
    env = environment()
    flush = l2_flush_buffer()
    env["copy_tbps"] = copy_tbps = copy_bandwidth()
    env["datasheet_tbps"] = datasheet_tbps(env.get("cuda_device"))
    print(json.dumps(env, default=str), flush=True)
    kernels = KERNEL_CHOICES[args.kernel or "both"]
    groups: dict[tuple[int, int], list[DecodeConfig]] = {}
    for cfg in configs(args.quick):
        cfg = dataclasses.replace(cfg, centroid_precision=args.centroid_precision)
        groups.setdefault((cfg.seq_len, cfg.batch), []).append(cfg)
    rows, failed = [], 0
    for (n, batch), cfgs in groups.items():
        print(f"N = {_tokens(n)}, batch {batch}: {len(cfgs)} configuration(s)", flush=True)
        try:
            run_group(cfgs, args.reps, flush, copy_tbps, not args.no_flex, kernels, sink=rows)
        except Exception as exc:  # keep the sweep going; say what failed
            failed += 1
            print(f"FAILED N={n} batch={batch}: {type(exc).__name__}: {exc}", flush=True)
            try:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            except Exception as sticky:  # a kernel fault poisons the context: keep what was measured, stop
                print(f"CUDA context unusable ({type(sticky).__name__}); stopping the sweep", flush=True)
                write_outputs(args.out, rows, env)
                break
        write_outputs(args.out, rows, env)  # after every group: a run cut short keeps its numbers
    print(markdown(rows, env))
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    raise SystemExit(main())
