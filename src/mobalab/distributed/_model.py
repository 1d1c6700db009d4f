r"""Communication model of ring context parallelism for MoBA: bytes per ring step against compute per step.

Per rank r of R (shard of L = N/R tokens, b sequences, h query heads, g kv heads, head dim d, block B, top-k k):

* a forward ring step moves one K/V shard one hop, :math:`2\,b\,L\,g\,d\,e` bytes (e bytes per element),
  and computes the rank's attention over that shard; a rank's whole forward attention is
  :math:`4\,b\,h\,d\,\sum_t |S_t|` FLOPs over its L queries (docs/design.md, "FLOP and byte budget"), spread
  over the R shards it meets, so a step computes about :math:`4\,b\,h\,d\,L\,\bar S / R`;
* a backward step moves K/V and the travelling dK/dV (sent in the input dtype): :math:`4\,b\,L\,g\,d\,e`
  bytes, and computes 2.5x the forward's FLOPs;
* routing is local after one all-gather of block key sums (:math:`b\,n\,g\,d\cdot 4` bytes received);
  its cost grows with position (causal): :math:`2\,b\,h\,d` FLOPs per scored (query, block) pair.

Compute over communication per step,

.. math::
    \rho = \frac{t_\mathrm{compute}}{t_\mathrm{comm}} = \frac{h\,\bar S\,W}{g\,F\,R}\cdot
    \frac{2}{e}\ \text{(forward)},

does not depend on N: both shrink as N/R. The ring hides communication while :math:`\rho \ge 1`; past
:math:`R^* = h \bar S W / (g F)\cdot 2/e` it is communication-bound. With the step time
:math:`\max(t_\mathrm{compute}, t_\mathrm{comm})`, a pass takes :math:`t_\mathrm{compute} + (R - 1)\max(\cdot)`
(the own shard needs no transfer; the backward adds one last dK/dV hop). Throughputs are measured single-GPU
rates (RESULTS.md, H200: forward 111, backward 133 useful TFLOP/s at 512K; routing kernel 72 TFLOP/s at
64K); link bandwidths are per direction per GPU.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ._layout import LAYOUTS, Layout

__all__ = ["ring_step_model", "DEFAULT_LINKS"]

#: Link bandwidth per direction per GPU, GB/s: H200 NVLink 4 (18 links) and one 400 Gb/s InfiniBand NIC per GPU.
DEFAULT_LINKS = {"NVLink": 450.0, "InfiniBand": 50.0}


def _attended_keys(seq_len: int, block_size: int, top_k: int, causal: bool) -> int:
    """Sum over queries of |S_t| when routing fills every slot it can (own block token-causal)."""
    n = math.ceil(seq_len / block_size)
    c = np.arange(n, dtype=np.int64)
    m = np.minimum(block_size, seq_len - c * block_size)  # tokens (queries and keys) of block c
    if not causal:
        return int(seq_len * min(top_k, n) * block_size)  # a partial last block counted as full: upper bound
    return int((m * (m + 1) // 2 + m * np.minimum(c, top_k - 1) * block_size).sum())


def _scored_before(x: int, block_size: int) -> int:
    """Sum over t < x of floor(t / B): (query, past block) pairs that causal routing scores."""
    q, r = divmod(x, block_size)
    return block_size * q * (q - 1) // 2 + r * q


def _routing_pairs(layout: Layout, rank: int, block_size: int, causal: bool) -> int:
    n = math.ceil(layout.seq_len / block_size)
    segments = layout.segments(rank)
    if not causal:
        return sum(s.length for s in segments) * n
    return sum(_scored_before(s.end, block_size) - _scored_before(s.start, block_size) for s in segments)


def _positive(fn: str, name: str, value, integer: bool = True):
    ok = not isinstance(value, bool) and isinstance(value, numbers.Integral if integer else numbers.Real)
    if not ok or not 0 < value < math.inf:
        raise ValueError(f"{fn}: {name} must be {'an integer' if integer else 'a finite number'} > 0, got {value!r}")
    return int(value) if integer else float(value)


def _listed(fn: str, name: str, values) -> list:
    """A sequence of values, or one value standing for a list of one; never empty."""
    if isinstance(values, numbers.Number):
        return [values]
    try:
        values = list(values)
    except TypeError:
        raise ValueError(f"{fn}: {name} must be an integer or a sequence of integers, got {values!r}") from None
    if not values:
        raise ValueError(f"{fn}: {name} must list at least one value, got an empty sequence")
    return values


@dataclass(frozen=True)
class _Rank:
    """The busiest rank's work for one (sequence length, GPU count): FLOPs and bytes."""

    shard: int
    routing_flops: float
    fwd_flops: float
    kv_bytes: float  # K and V of a shard: one forward hop
    grad_bytes: float  # dK and dV of a shard (input dtype): the extra backward hop load
    gather_bytes: float  # block sums received by one rank in the all-gather


def _rank_work(seq_len, gpus, batch, heads, kv_heads, head_dim, block_size, top_k, causal, elem_bytes,
               layout) -> _Rank:
    lengths = tuple(seq_len // gpus + (r < seq_len % gpus) for r in range(gpus))
    lay = Layout(lengths, layout)
    shard = max(lengths)
    pairs = max(_routing_pairs(lay, r, block_size, causal) for r in range(gpus))
    mean_keys = _attended_keys(seq_len, block_size, top_k, causal) / seq_len
    n_blocks = math.ceil(seq_len / block_size)
    per_key = 2 * batch * shard * kv_heads * head_dim
    return _Rank(shard, 2 * batch * heads * head_dim * pairs, 4 * batch * heads * head_dim * shard * mean_keys,
                 per_key * elem_bytes, per_key * elem_bytes,
                 batch * n_blocks * kv_heads * head_dim * 4 * (gpus - 1) / gpus)


def _times(w: _Rank, gpus: int, bandwidth: float, forward_tflops, backward_tflops, routing_tflops) -> dict:
    """Seconds per step and per pass on a link of ``bandwidth`` bytes/s."""
    hops = gpus - 1
    fwd_step = w.fwd_flops / gpus / (forward_tflops * 1e12)
    bwd_step = 2.5 * w.fwd_flops / gpus / (backward_tflops * 1e12)
    fwd_comm = w.kv_bytes / bandwidth if hops else 0.0
    bwd_comm = (w.kv_bytes + w.grad_bytes) / bandwidth if hops else 0.0
    fwd = fwd_step + hops * max(fwd_step, fwd_comm)
    bwd = bwd_step + hops * max(bwd_step, bwd_comm) + (w.grad_bytes / bandwidth if hops else 0.0)
    routing = w.routing_flops / (routing_tflops * 1e12)
    gather = w.gather_bytes / bandwidth
    return dict(fwd_step=fwd_step, bwd_step=bwd_step, fwd_comm=fwd_comm, bwd_comm=bwd_comm, fwd=fwd, bwd=bwd,
                routing=routing, gather=gather, total=routing + gather + fwd + bwd)


def ring_step_model(seq_lens=(1 << 20, 1 << 21, 1 << 22), n_gpus=(2, 4, 8, 16, 32, 64), *, batch: int = 1,
                    heads: int = 16, kv_heads: int | None = None, head_dim: int = 128, block_size: int = 128,
                    top_k: int = 8, causal: bool = True, elem_bytes: int = 2, layout: str = "contiguous",
                    links: dict | None = None, forward_tflops: float = 111.0, backward_tflops: float = 133.0,
                    routing_tflops: float = 72.0) -> pd.DataFrame:
    r"""Predicted bytes, FLOPs and time per ring step and per rank for MoBA context parallelism.

    One row per (sequence length, GPU count, link); ``seq_lens`` and ``n_gpus`` are integers or sequences of
    them. Shards are as even as possible; the row describes the
    busiest rank (the most routing work: the last shard when causal and contiguous). Columns:

    * ``fwd_bytes_step`` / ``bwd_bytes_step``: bytes one ring step sends per GPU (K/V; K/V + dK/dV);
    * ``fwd_compute_ms_step`` / ``fwd_comm_ms_step`` (and ``bwd_``): the step's attention time at the given
      throughput against its transfer time at the link's bandwidth; ``fwd_ratio`` / ``bwd_ratio`` = compute /
      comm (below 1: communication-bound; infinite on one GPU); ``comm_bound``: either ratio below 1;
    * ``routing_ms`` (scoring at ``routing_tflops``), ``gather_ms`` (the block-sum all-gather), ``fwd_ms``,
      ``bwd_ms`` (ring passes, step time = max(compute, comm)), ``total_ms`` = routing + gather + fwd + bwd;
    * ``useful_tflops_per_gpu``: the rank's useful FLOPs (routing + attention forward + 2.5x backward) per
      second of ``total_ms``; ``speedup``: the model's one-GPU time divided by ``total_ms``.

    ``links`` maps a name to GB/s per direction per GPU (default :data:`DEFAULT_LINKS`); the throughputs
    are useful TFLOP/s of one GPU. See docs/design.md, "Context parallelism".

    Examples
    --------
    >>> df = ring_step_model([1 << 20], [2, 8], links={"NVLink": 450.0})
    >>> print(df[["gpus", "fwd_ratio", "bwd_ratio", "comm_bound"]].round(2).to_string(index=False))
     gpus  fwd_ratio  bwd_ratio  comm_bound
        2       1.95       2.03       False
        8       0.49       0.51        True
    """
    fn = "ring_step_model"
    seq_lens = [_positive(fn, "each seq_len", n) for n in _listed(fn, "seq_lens", seq_lens)]
    n_gpus = [_positive(fn, "each GPU count", r) for r in _listed(fn, "n_gpus", n_gpus)]
    batch, heads, head_dim, block_size, top_k, elem_bytes = (
        _positive(fn, name, value) for name, value in (("batch", batch), ("heads", heads), ("head_dim", head_dim),
                                                       ("block_size", block_size), ("top_k", top_k),
                                                       ("elem_bytes", elem_bytes)))
    kv_heads = heads if kv_heads is None else _positive(fn, "kv_heads", kv_heads)
    if heads % kv_heads:
        raise ValueError(f"{fn}: heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    if not isinstance(causal, bool):
        raise ValueError(f"{fn}: causal must be True or False, got {causal!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"{fn}: layout must be one of {LAYOUTS}, got {layout!r}")
    rates = [_positive(fn, name, value, integer=False) for name, value in (
        ("forward_tflops", forward_tflops), ("backward_tflops", backward_tflops), ("routing_tflops", routing_tflops))]
    links = dict(DEFAULT_LINKS if links is None else links)
    if not links:
        raise ValueError(f"{fn}: links must name at least one link")
    bandwidths = {name: _positive(fn, f"links[{name!r}]", gbps, integer=False) * 1e9 for name, gbps in links.items()}
    shape = (batch, heads, kv_heads, head_dim, block_size, top_k, causal, elem_bytes, layout)

    rows = []
    for seq_len in seq_lens:
        one = _times(_rank_work(seq_len, 1, *shape), 1, 1.0, *rates)["total"]
        for gpus in n_gpus:
            if gpus > seq_len:
                raise ValueError(f"{fn}: {gpus} GPUs need at least {gpus} tokens, got seq_len {seq_len}")
            w = _rank_work(seq_len, gpus, *shape)
            for link, bandwidth in bandwidths.items():
                t = _times(w, gpus, bandwidth, *rates)
                fwd_ratio = t["fwd_step"] / t["fwd_comm"] if gpus > 1 else math.inf
                bwd_ratio = t["bwd_step"] / t["bwd_comm"] if gpus > 1 else math.inf
                rows.append(dict(
                    seq_len=seq_len, gpus=gpus, link=link, link_GBps=bandwidth / 1e9, shard_len=w.shard,
                    fwd_bytes_step=w.kv_bytes if gpus > 1 else 0.0,
                    bwd_bytes_step=w.kv_bytes + w.grad_bytes if gpus > 1 else 0.0,
                    fwd_compute_ms_step=1e3 * t["fwd_step"], fwd_comm_ms_step=1e3 * t["fwd_comm"],
                    bwd_compute_ms_step=1e3 * t["bwd_step"], bwd_comm_ms_step=1e3 * t["bwd_comm"],
                    fwd_ratio=fwd_ratio, bwd_ratio=bwd_ratio, comm_bound=bool(min(fwd_ratio, bwd_ratio) < 1),
                    routing_ms=1e3 * t["routing"], gather_ms=1e3 * t["gather"], fwd_ms=1e3 * t["fwd"],
                    bwd_ms=1e3 * t["bwd"], total_ms=1e3 * t["total"],
                    useful_tflops_per_gpu=(w.routing_flops + 3.5 * w.fwd_flops) / t["total"] / 1e12,
                    speedup=one / t["total"]))
    return pd.DataFrame(rows)
