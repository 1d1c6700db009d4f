r"""MoBA over packed variable-length batches, in the flash-attn ``cu_seqlens`` convention.

``q`` is (total_tokens, heads, d), ``k`` and ``v`` are (total_tokens, kv_heads, d); sequence :math:`i` holds the
rows :math:`[c_i, c_{i+1})` of ``cu_seqlens`` :math:`= (c_0 = 0, c_1, \dots, c_b = \text{total})`. Each sequence is
its own MoBA problem: its blocks start at its first token, and nothing is routed or attended across sequences,

.. math::
    o_{[c_i, c_{i+1})} = \mathrm{MoBA}\big(q_{[c_i, c_{i+1})},\, k_{[c_i, c_{i+1})},\, v_{[c_i, c_{i+1})}\big),

with the routing, the attention and the LSE exactly those of :func:`mobalab.kernels.moba_attention` on that
sequence alone (see docs/design.md, "MoBA semantics"). Zero-length sequences are allowed and produce nothing.

Each call reads ``cu_seqlens`` to the host once and runs the batched forward and backward bodies of
:func:`mobalab.kernels.moba_attention` once per group of sequences (:func:`_groups`): a run of ``m`` consecutive
sequences of one length is the rows of an ``(m, L, heads, d)`` view of the packed tensors, a batch of ``m``
independent MoBA problems, so packed equal-length sequences cost what the same batch costs; and, when causal,
sequences of near lengths too short to be worth a call each (short documents) are copied into one zero-padded
batch, which causal MoBA attends exactly as each sequence alone (the CUDA kernels for CUDA tensors, the torch
reference for CPU tensors). As in a batched training step, the forward keeps for the backward the routing it
used, each group's key-block lists, and the groups themselves, so the backward neither routes again, nor sorts
again, nor waits for the GPU to read ``cu_seqlens`` a second time. Eager calls go through an autograd Function
(:class:`_EagerVarlen`, no custom-op dispatch on the host's path); ``torch.compile`` sees the custom ops
``mobalab::moba_attention_varlen_fwd`` / ``_bwd`` and ``mobalab::moba_topk_varlen``, opaque nodes whose fake
implementations give the shapes (the lists' length and the number of groups as sizes that depend on data),
so the data-dependent sequence loop causes no graph break.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from . import _contract as C
from ._pairs import MAX_KEYS
from .autograd import _bwd_impl, _first_order, _fwd_impl, _no_lists

__all__ = ["moba_attention_varlen", "moba_topk_varlen"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------------
# validation: everything that needs no tensor values here (traceable); the values of cu_seqlens in the ops


def _check_int(name: str, value, fn: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{fn}: {name} must be an integer >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{fn}: {name} must be an integer >= {minimum}, got {value}")
    return int(value)


def _check_bool(name: str, value, fn: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{fn}: {name} must be True or False, got {value!r}")
    return value


def _check_inputs(q, k, v, cu_seqlens, max_seqlen, block_size, top_k, causal, fn):
    named = [("q", q), ("k", k)] + ([("v", v)] if v is not None else [])
    for name, x in named:
        C.check_tensor(fn, name, x)  # a tensor with data: a meta tensor would fail later, in another function's name
        if x.dim() != 3:
            raise ValueError(f"{fn}: {name} must be 3-D (total_tokens, heads, head_dim), got shape {tuple(x.shape)}")
        if x.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{fn}: {name} has dtype {x.dtype}; supported: float16, bfloat16, float32, float64")
    if len({x.dtype for _, x in named}) != 1:
        raise ValueError(f"{fn}: q, k, v must share one dtype, got {', '.join(f'{n} {x.dtype}' for n, x in named)}")
    if len({x.device for _, x in named}) != 1:
        raise ValueError(f"{fn}: q, k, v must be on one device, got {', '.join(f'{n} {x.device}' for n, x in named)}")
    if v is not None and k.shape != v.shape:
        raise ValueError(f"{fn}: k and v must have the same shape, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    (tq, hq, dq), (tk, hk, dk) = q.shape, k.shape
    if tq != tk:
        raise ValueError(f"{fn}: total_tokens differs, q has {tq} and k has {tk}; "
                         "only self-attention over the same packed tokens is supported")
    if dq != dk:
        raise ValueError(f"{fn}: head_dim differs, q has {dq} and k has {dk}; they must match")
    if hq < 1 or hk < 1 or dq < 1:
        raise ValueError(f"{fn}: heads and head_dim must be >= 1, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if hq % hk != 0:
        raise ValueError(f"{fn}: q heads ({hq}) must be a multiple of kv heads ({hk}) (MHA, GQA or MQA)")
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{fn}: cu_seqlens must be a torch.Tensor (int32, shape (batch + 1,)), "
                        f"got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"{fn}: cu_seqlens must be int32 (the flash-attn convention), got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{fn}: cu_seqlens must be 1-D of shape (batch + 1,) starting at 0, "
                         f"got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device and cu_seqlens.device.type != "cpu":
        raise ValueError(f"{fn}: cu_seqlens is on {cu_seqlens.device} but q is on {q.device}; it must be on q's "
                         "device or on the CPU")
    max_seqlen = _check_int("max_seqlen", max_seqlen, fn, 0)
    block_size = _check_int("block_size", block_size, fn, 1)
    top_k = _check_int("top_k", top_k, fn, 1)
    _check_bool("causal", causal, fn)
    if q.is_cuda:  # refused here, before any sequence runs, in the terms of the cuda path
        C.check_path_dtype(fn, "q", q.dtype, "cuda")  # (k and v share it)
        C.check_cuda_shape(fn, 1, max_seqlen, hq, dq)
        block_size = C.check_block_size(fn, block_size, "cuda")
        top_k = C.check_top_k(fn, top_k, "cuda")
    return max_seqlen, block_size, top_k


def _check_scale(softmax_scale, head_dim: int, fn: str) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real) or \
            not math.isfinite(float(softmax_scale)):
        raise ValueError(f"{fn}: softmax_scale must be a finite real number or None, got {softmax_scale!r}")
    return float(softmax_scale)


def _bounds(cu_seqlens: torch.Tensor, total: int, max_seqlen: int | None, fn: str) -> list[tuple[int, int]]:
    """(start, end) per sequence from one host read of ``cu_seqlens``; checks the values."""
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        raise ValueError(f"{fn}: cu_seqlens must start at 0, got {cu[0]} (cu_seqlens = {_short(cu)})")
    steps = [b - a for a, b in zip(cu[:-1], cu[1:], strict=True)]
    bad = [i for i, s in enumerate(steps) if s < 0]
    if bad:
        i = bad[0]
        raise ValueError(f"{fn}: cu_seqlens must be non-decreasing, got cu_seqlens[{i}] = {cu[i]} > "
                         f"cu_seqlens[{i + 1}] = {cu[i + 1]} (cu_seqlens = {_short(cu)})")
    if cu[-1] != total:
        raise ValueError(f"{fn}: cu_seqlens must end at the number of packed tokens, q.shape[0] = {total}, "
                         f"got cu_seqlens[-1] = {cu[-1]}")
    longest = max(steps, default=0)
    if max_seqlen is not None and max_seqlen < longest:
        raise ValueError(f"{fn}: max_seqlen = {max_seqlen} is smaller than the longest sequence in cu_seqlens "
                         f"({longest} tokens)")
    return list(zip(cu[:-1], cu[1:], strict=True))


def _runs(bounds: list[tuple[int, int]], max_batch: int = C.CUDA_MAX_GRID_YZ) -> list[tuple[int, int, int]]:
    """(start, end, m) per run of ``m`` consecutive non-empty sequences of one length ``(end - start) / m``:
    the packed rows ``[start, end)`` viewed as ``(m, L, ...)`` are those sequences as a batch (empty sequences
    hold no rows, so the ones around them stay adjacent). A run holds at most ``max_batch`` sequences, the
    largest batch the CUDA kernels launch."""
    runs: list[list[int]] = []
    for s, e in bounds:
        if e == s:
            continue
        if runs and runs[-1][1] == s and runs[-1][2] < max_batch and \
                (runs[-1][1] - runs[-1][0]) == runs[-1][2] * (e - s):
            runs[-1][1] = e
            runs[-1][2] += 1
        else:
            runs.append([s, e, 1])
    return [(s, e, m) for s, e, m in runs]


#: What one more batched call (its forward and backward launches and their host work, ~0.25 ms on an H100) costs,
#: in attention work of (token x head x head-dim) units: 16 x 16K tokens x 16 heads at d 128, B 128, k 8 take
#: 28.7 ms forward + backward, ~6.8 ns per (token, head), so 0.25 ms is ~37 K (token, head) pairs at d 128. 0: no
#: padded batches (every run of one length a call of its own).
RUN_COST = 1 << 22
#: Copying a token's rows into a padded batch and back (q, k, v, out in the forward; q, k, v, out, dout, dq, dk, dv
#: in the backward: ~6 KB per (token, head) at d 128, ~2.4 ns; 2.35 ns measured on an H100 with the copies by
#: torch.cat) as a fraction of the token's attention work.
COPY_COST = 0.35


class _Group(NamedTuple):
    """A batched call: ``m`` sequences as an ``(m, length, ...)`` batch. ``spans`` empty: the packed rows
    ``[start, end)`` themselves (a run of one length, a view); else the sequences' ``(start, end)`` rows copied
    into a zero-padded batch of the longest one's ``length`` (causal only)."""

    start: int
    end: int
    m: int
    length: int
    spans: tuple[tuple[int, int], ...] = ()


def _groups(bounds: list[tuple[int, int]], causal: bool, heads: int, head_dim: int, block_size: int = 1,
            max_batch: int = C.CUDA_MAX_GRID_YZ, max_tokens: int | None = None) -> list[_Group]:
    r"""The batched calls for the sequences in ``bounds``: the runs of one length (:func:`_runs`), and, when
    causal, runs of different lengths joined into one zero-padded batch where the copies and the padding cost
    less than a call of their own.

    Padding is exact for causal MoBA: a query at :math:`t < L` attends keys at most :math:`t` and routes among
    the complete blocks before its own, none of which holds a padded row; a padded query row (zero, with a zero
    output gradient) adds exactly zero to every gradient. A padded batch's length :math:`P` is its longest
    member's rounded up to a multiple of ``block_size``, and a batch holds at most ``max_tokens`` rows, so the
    CUDA passes can attend it as one sequence (:mod:`mobalab.kernels._batch_fold`) rather than a chunk of
    launches per member. Greedy over the runs by decreasing length: a run of ``m`` sequences of length :math:`L`
    joins the group led by length :math:`L_0` when its copies and padding cost less than a call,
    :math:`h d\, m\,(c L + P - L) \le` :data:`RUN_COST` (:math:`c` = :data:`COPY_COST`), and a group of
    :math:`r` runs stays one padded batch when all its copies and padding cost less than the :math:`r - 1` calls
    it saves,

    .. math::
        h d \sum_{\text{runs}} m\,(c L + P - L) \le (r - 1)\, \mathrm{RUN\_COST},

    else the longest run is a call of its own and the others are grouped again. Non-causal calls keep the runs:
    a padded key would be attended."""
    runs = [(s, e, m, (e - s) // m) for s, e, m in _runs(bounds, max_batch)]  # each with its length
    if not causal or RUN_COST <= 0:
        return [_Group(*run) for run in runs]
    runs.sort(key=lambda r: -r[3])  # stable: packed order among equal lengths
    hd = heads * head_dim

    def cost(run, padded):  # a run's copies and padding in a batch of length padded, in attention-work units
        return run[2] * (COPY_COST * run[3] + padded - run[3])

    def fits(batch, run, padded):
        return (batch + run[2] <= max_batch and hd * cost(run, padded) <= RUN_COST
                and (max_tokens is None or (batch + run[2]) * padded <= max_tokens))

    groups: list[_Group] = []
    i = 0
    while i < len(runs):
        padded = -(-runs[i][3] // block_size) * block_size
        j, batch, extra = i + 1, runs[i][2], cost(runs[i], padded)
        while j < len(runs) and fits(batch, runs[j], padded):
            j, batch, extra = j + 1, batch + runs[j][2], extra + cost(runs[j], padded)
        if j - i == 1 or hd * extra > (j - i - 1) * RUN_COST:  # the longest run alone; the others again
            groups.append(_Group(*runs[i]))
            i += 1
            continue
        spans = sorted((s + t * n, s + (t + 1) * n) for s, _, m, n in runs[i:j] for t in range(m))
        groups.append(_Group(-1, -1, len(spans), padded, tuple(spans)))
        i = j
    return sorted(groups, key=lambda g: g.spans[0][0] if g.spans else g.start)


def _batch(x: torch.Tensor, s: int, e: int, m: int) -> torch.Tensor:
    """Rows ``[s, e)`` of a packed tensor as a batch of ``m`` equal-length sequences (a view)."""
    return x[s:e].view(m, (e - s) // m, *x.shape[1:])


def _short(values: list[int]) -> str:
    return str(values) if len(values) <= 12 else f"[{', '.join(map(str, values[:10]))}, ...] ({len(values)} values)"


# --------------------------------------------------------------------------------------------------
# the groups: the batched forward and backward bodies (mobalab.kernels.autograd) called once per group


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _take(x: torch.Tensor | None, group: _Group) -> torch.Tensor | None:
    """A packed tensor's rows of ``group`` as its ``(m, length, ...)`` batch: a view, or the members' rows and
    zero rows after each, end to end in one ``torch.cat`` (one read of the rows, one write of the batch; an
    ``index_copy_`` into a zeroed batch moved ~3x the bytes and ran far below the memory bandwidth)."""
    if x is None:
        return None
    if not group.spans:
        return _batch(x, group.start, group.end, group.m)
    zeros = x.new_zeros((group.length - min(e - s for s, e in group.spans), *x.shape[1:]))
    pieces = []
    for s, e in group.spans:
        pieces.append(x[s:e])
        if e - s < group.length:
            pieces.append(zeros[:group.length - (e - s)])
    return torch.cat(pieces).view(group.m, group.length, *x.shape[1:])


def _packed(parts, groups, shape, dtype, device) -> torch.Tensor:
    """The groups' batched results (each ``(m, length, ...)``) as one packed tensor of ``shape``: where one view
    group holds every row (sequences of one length, empty ones aside) its result as it is, else every group's
    rows (a padded group's real rows only) in packed order, written by one ``torch.cat``."""
    if len(groups) == 1 and not groups[0].spans:
        return parts[0].view(shape)
    pieces = []  # (first packed row, rows)
    for g, part in zip(groups, parts, strict=True):
        flat = part.reshape(g.m * g.length, *part.shape[2:])
        if not g.spans:
            pieces.append((g.start, flat))
        else:
            pieces += [(s, flat[i * g.length:i * g.length + e - s]) for i, (s, e) in enumerate(g.spans)]
    pieces.sort(key=lambda piece: piece[0])
    # torch.empty (not new_empty): the GPU tests poison it, so a row left unwritten shows up
    out = torch.empty(shape, dtype=dtype, device=device)
    if pieces:
        assert sum(p.shape[0] for _, p in pieces) == shape[0], "the groups must cover every packed row"
        torch.cat([p for _, p in pieces], out=out)
    return out


def _forward_groups(q, k, v, groups, block_size, top_k, causal, scale, deterministic, keep_lists,
                    centroid_precision="fp32"):
    """out, lse, routing over the packed rows; each group's kept key-block lists (``keep_lists`` False: none
    kept) and, for a padded group, its batch's lse and routing (the backward's, padded rows included; None for a
    view)."""
    total, heads, _ = q.shape
    done = [_fwd_impl(_take(q, g), _take(k, g), _take(v, g), block_size, top_k, causal, scale, deterministic,
                      keep=keep_lists, centroid_precision=centroid_precision) for g in groups]
    outs, lses, topks, lists = ([d[i] for d in done] for i in range(4))
    pads = [(d[1], d[2]) if g.spans else None for d, g in zip(done, groups, strict=True)]
    return (_packed(outs, groups, q.shape, q.dtype, q.device),
            _packed(lses, groups, (total, heads), _lse_dtype(q), q.device),
            _packed(topks, groups, (total, heads, top_k), torch.int32, q.device), lists, pads)


def _backward_groups(dout, dlse, q, k, v, out, lse, topk, groups, lists, pads, block_size, top_k, causal,
                     scale, deterministic):
    """dq, dk, dv over the packed rows, each group's from the routing its forward took and the lists it kept (a
    padded group's rows padded with zeros again: a zero output gradient adds nothing)."""
    grads = []
    for g, kept, pad in zip(groups, lists, pads, strict=True):
        do, dl, qs, ks, vs, os_ = (_take(x, g) for x in (dout, dlse, q, k, v, out))
        ls, ts = (_batch(lse, g.start, g.end, g.m), _batch(topk, g.start, g.end, g.m)) if pad is None else pad
        grads.append(_bwd_impl(do, dl, qs, ks, vs, os_, ls, ts, kept, block_size, top_k, causal, scale,
                               deterministic))
    return tuple(_packed([gr[i] for gr in grads], groups, x.shape, x.dtype, x.device)
                 for i, x in enumerate((q, k, v)))


def _plan(cu_seqlens, q, k, max_seqlen, block_size, causal, fn) -> list[_Group]:
    """The groups of a call: padded batches short enough to be attended as one sequence (the counting sort's
    segment keys, kv heads x blocks, bound a folded batch's length)."""
    return _groups(_bounds(cu_seqlens, q.shape[0], max_seqlen, fn), causal, q.shape[1], q.shape[2], block_size,
                   max_tokens=(MAX_KEYS - 1) // k.shape[1] * block_size)


def _op(name: str):
    """The op's current registration. Looked up at every call rather than holding the CustomOpDef: a second
    execution of a module that defines ops (pytest's doctest import does that) replaces the registration,
    and the first definition's objects then point at freed dispatcher entries."""
    return getattr(torch.ops.mobalab, name).default


# --------------------------------------------------------------------------------------------------
# eager calls


class _Held:
    """What :meth:`_EagerVarlen.forward` hands to its ``setup_context``: not a dict or list, which torch.func would
    take apart and rebuild (pytree containers) between the two."""

    groups = lists = pads = None


class _EagerVarlen(torch.autograd.Function):
    """The varlen forward and backward without the custom ops, for eager calls (a custom op's dispatch costs the
    host time before the first launch); each group's lists stay separate tensors, with no copy end to end.
    ``torch.compile`` traces the custom ops instead."""

    @staticmethod
    def forward(q, k, v, cu_seqlens, max_seqlen, block_size, top_k, causal, scale, deterministic,
                centroid_precision, keep, held):
        """``keep``: whether a backward will run (the lists serve it only); ``held``: a :class:`_Held` that takes
        the groups, their lists and padded batches for :meth:`setup_context` (forward takes no ctx, for
        torch.func)."""
        groups = _plan(cu_seqlens, q, k, max_seqlen, block_size, causal, "moba_attention_varlen")
        out, lse, topk, lists, pads = _forward_groups(q, k, v, groups, block_size, top_k, causal, scale,
                                                      deterministic, keep, centroid_precision)
        held.groups, held.lists, held.pads = groups, lists, pads
        return out, lse, topk

    @staticmethod
    def setup_context(ctx, inputs, output):  # this form (not ctx in forward) is what torch.func transforms take
        q, k, v, _, _, block_size, top_k, causal, scale, deterministic, _, _, held = inputs
        out, lse, topk = output
        ctx.save_for_backward(q, k, v, out, lse, topk, *held.lists)
        ctx.groups, ctx.pads = held.groups, held.pads
        ctx.params = (block_size, top_k, causal, scale, deterministic)
        ctx.mark_non_differentiable(topk)
        ctx.set_materialize_grads(False)  # an unused LSE's gradient stays None

    @staticmethod
    def backward(ctx, dout, dlse, dtopk):
        q, k, v, out, lse, topk, *lists = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = _backward_groups(dout, dlse, q, k, v, out, lse, topk, ctx.groups, lists, ctx.pads,
                                      *ctx.params)
        dq, dk, dv = _first_order("moba_attention_varlen", (dq, dk, dv), dout, dlse, q, k, v)
        return dq, dk, dv, None, None, None, None, None, None, None, None, None, None


#: Eager calls take :class:`_EagerVarlen` (True) or the custom ops (False); under ``torch.compile`` the ops always.
EAGER_FUNCTION = True


# --------------------------------------------------------------------------------------------------
# the custom ops (what torch.compile sees)


def _record(groups, lists) -> torch.Tensor:
    """The groups as a host tensor for the backward (which so reads ``cu_seqlens`` no second time): per group
    start, end, m, length, the length of its lists, the number of its padded spans, then those spans."""
    record = []
    for g, kept in zip(groups, lists, strict=True):
        record += [g.start, g.end, g.m, g.length, kept.numel(), len(g.spans), *(x for span in g.spans for x in span)]
    return torch.tensor(record, dtype=torch.int64)


def _unrecord(record: torch.Tensor) -> tuple[list[_Group], list[int]]:
    values, groups, sizes, i = record.tolist(), [], [], 0  # a host tensor: no wait for the GPU
    while i < len(values):
        start, end, m, length, size, n = values[i:i + 6]
        spans = values[i + 6:i + 6 + 2 * n]
        groups.append(_Group(start, end, m, length, tuple(zip(spans[::2], spans[1::2], strict=True))))
        sizes.append(size)
        i += 6 + 2 * n
    return groups, sizes


@torch.library.custom_op("mobalab::moba_attention_varlen_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
            block_size: int, top_k: int, causal: bool, scale: float, deterministic: bool,
            centroid_precision: str = "fp32"
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                       torch.Tensor]:
    """out, lse, routing, the groups' kept key-block lists end to end, the groups as a host tensor
    (:func:`_record`), and the padded groups' batch lse and routing end to end (flat) for the backward."""
    groups = _plan(cu_seqlens, q, k, max_seqlen, block_size, causal, "moba_attention_varlen")
    out, lse, topk, lists, pads = _forward_groups(q, k, v, groups, block_size, top_k, causal, scale,
                                                  deterministic, True, centroid_precision)
    joined = lists[0] if len(lists) == 1 else torch.cat(lists) if lists else _no_lists(q)
    padded = [p for p in pads if p is not None]
    pad_lse = torch.cat([p[0].reshape(-1) for p in padded]) if padded else lse.new_empty(0)
    pad_topk = torch.cat([p[1].reshape(-1) for p in padded]) if padded else topk.new_empty(0)
    return out, lse, topk, joined, _record(groups, lists), pad_lse, pad_topk


@_fwd_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, block_size, top_k, causal, scale, deterministic, centroid_precision="fp32"):
    total, heads, _ = q.shape
    ctx = torch.library.get_ctx()  # the lists', the record's and the padding's lengths follow cu_seqlens's values
    return (q.new_empty(q.shape), q.new_empty((total, heads), dtype=_lse_dtype(q)),
            q.new_empty((total, heads, top_k), dtype=torch.int32),
            q.new_empty((ctx.new_dynamic_size(),), dtype=torch.int64),
            torch.empty((ctx.new_dynamic_size(),), dtype=torch.int64, device="cpu"),
            q.new_empty((ctx.new_dynamic_size(),), dtype=_lse_dtype(q)),
            q.new_empty((ctx.new_dynamic_size(),), dtype=torch.int32))


@torch.library.custom_op("mobalab::moba_attention_varlen_bwd", mutates_args=())
def _bwd_op(dout: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            out: torch.Tensor, lse: torch.Tensor, topk: torch.Tensor, lists: torch.Tensor, record: torch.Tensor,
            pad_lse: torch.Tensor, pad_topk: torch.Tensor, block_size: int, top_k: int, causal: bool, scale: float,
            deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups, sizes = _unrecord(record)
    heads = q.shape[1]
    padded = [g for g in groups if g.spans]
    lse_parts = torch.split(pad_lse, [g.m * g.length * heads for g in padded])
    topk_parts = torch.split(pad_topk, [g.m * g.length * heads * top_k for g in padded])
    parts, pads = iter(zip(lse_parts, topk_parts, strict=True)), []
    for g in groups:
        ls, ts = next(parts) if g.spans else (None, None)
        pads.append(None if ls is None else (ls.view(g.m, g.length, heads), ts.view(g.m, g.length, heads, top_k)))
    return _backward_groups(dout, dlse, q, k, v, out, lse, topk, groups, list(torch.split(lists, sizes)),
                            pads, block_size, top_k, causal, scale, deterministic)


@_bwd_op.register_fake
def _(dout, dlse, q, k, v, out, lse, topk, lists, record, pad_lse, pad_topk, block_size, top_k, causal, scale,
      deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, _, _, block_size, top_k, causal, scale, deterministic, *_ = inputs  # the routing's precision: not needed
    out, lse, topk, lists, record, pad_lse, pad_topk = output
    ctx.save_for_backward(q, k, v, out, lse, topk, lists, record, pad_lse, pad_topk)
    ctx.params = (block_size, top_k, causal, scale, deterministic)
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse, dtopk, dlists, drecord, dpad_lse, dpad_topk):
    q, k, v, out, lse, topk, lists, record, pad_lse, pad_topk = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _op("moba_attention_varlen_bwd")(dout, dlse, q, k, v, out, lse, topk, lists, record, pad_lse,
                                                  pad_topk, *ctx.params)
    return dq, dk, dv, None, None, None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("mobalab::moba_topk_varlen", mutates_args=())
def _topk_op(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, block_size: int,
             top_k: int, causal: bool, centroid_precision: str = "fp32") -> torch.Tensor:
    from . import moba_topk

    total, heads, _ = q.shape
    groups = _plan(cu_seqlens, q, k, max_seqlen, block_size, causal, "moba_topk_varlen")
    parts = [moba_topk(_take(q, g), _take(k, g), block_size, top_k, causal=causal,
                       centroid_precision=centroid_precision) for g in groups]
    return _packed(parts, groups, (total, heads, top_k), torch.int32, q.device)


@_topk_op.register_fake
def _(q, k, cu_seqlens, max_seqlen, block_size, top_k, causal, centroid_precision="fp32"):
    return q.new_empty((q.shape[0], q.shape[1], top_k), dtype=torch.int32)


# --------------------------------------------------------------------------------------------------
# the API


def moba_attention_varlen(q, k, v, cu_seqlens, max_seqlen: int, block_size: int, top_k: int, causal: bool = True,
                          softmax_scale=None, return_lse: bool = False, *, deterministic: bool = False,
                          centroid_precision: str = "fp32"):
    r"""MoBA attention over packed variable-length sequences (flash-attn ``cu_seqlens`` layout).

    .. math::
        o_{[c_i, c_{i+1})} = \mathrm{MoBA}\big(q_{[c_i, c_{i+1})}, k_{[c_i, c_{i+1})}, v_{[c_i, c_{i+1})}\big)
        \quad\text{for each sequence } i,

    the output of :func:`mobalab.kernels.moba_attention` on each sequence alone: blocks of ``block_size``
    start at the sequence's first token, and nothing is routed or attended across sequences.

    Parameters
    ----------
    q : Tensor (total_tokens, heads, head_dim)
    k, v : Tensor (total_tokens, kv_heads, head_dim), ``heads % kv_heads == 0``
    cu_seqlens : int32 Tensor (batch + 1,) on q's device or on the CPU
        Cumulative sequence lengths: 0, then non-decreasing, ending at ``total_tokens``. Zero-length
        sequences are allowed. The call reads them on the host once: a CPU tensor is read without waiting for
        the GPU to finish the work queued before the call.
    max_seqlen : int
        At least the longest sequence (checked).
    block_size, top_k, causal, softmax_scale, return_lse, deterministic, centroid_precision
        As in :func:`mobalab.kernels.moba_attention`. CUDA tensors need what the CUDA kernels support, the
        "cuda" path of the input contract (``mobalab.kernels._contract``: bf16/fp16, head_dim in
        ``CUDA_HEAD_DIMS``, block_size in ``CUDA_BLOCK_SIZES``, top_k up to ``MAX_TOP_K``); CPU tensors run the
        torch reference (any float dtype).

    Returns
    -------
    out : Tensor (total_tokens, heads, head_dim) in q's dtype, and with ``return_lse`` the natural-log
    ``lse`` (total_tokens, heads) in float32 (float64 for float64 inputs). Differentiable w.r.t. q, k, v
    (CUDA backward on CUDA tensors), once: a second derivative through the gradients raises; works under
    ``torch.compile(fullgraph=True)`` and ``torch.func.grad``, not ``torch.func.vmap`` (refused). Fake tensors
    get their shapes from the custom op's fake implementation, whose kept lists have sizes that depend on data:
    ``FakeTensorMode(shape_env=ShapeEnv())``.

    Examples
    --------
    >>> import torch
    >>> from mobalab.kernels import moba_attention, moba_attention_varlen
    >>> g = torch.Generator().manual_seed(0)
    >>> q, k, v = (torch.randn(11, 2, 8, generator=g) for _ in range(3))
    >>> cu_seqlens = torch.tensor([0, 4, 4, 11], dtype=torch.int32)  # lengths 4, 0 and 7
    >>> out = moba_attention_varlen(q, k, v, cu_seqlens, 7, block_size=2, top_k=2)
    >>> tuple(out.shape)
    (11, 2, 8)
    >>> alone = moba_attention(q[4:][None], k[4:][None], v[4:][None], block_size=2, top_k=2)
    >>> bool(torch.allclose(out[4:], alone[0]))
    True
    """
    fn = "moba_attention_varlen"
    max_seqlen, block_size, top_k = _check_inputs(q, k, v, cu_seqlens, max_seqlen, block_size, top_k, causal, fn)
    scale = _check_scale(softmax_scale, q.shape[-1], fn)
    _check_bool("return_lse", return_lse, fn)
    _check_bool("deterministic", deterministic, fn)
    centroid_precision = C.check_centroid_precision(fn, centroid_precision)
    C.check_not_vmapped(fn, [("q", q), ("k", k), ("v", v)])
    # fake tensors (FakeTensorMode) hold no cu_seqlens values to plan by: the op's fake implementation gives shapes
    if EAGER_FUNCTION and not torch.compiler.is_compiling() and not C.is_fake(q):
        keep = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
        out, lse, _ = _EagerVarlen.apply(q, k, v, cu_seqlens, max_seqlen, block_size, top_k, causal, scale,
                                         deterministic, centroid_precision, keep, _Held())
    else:
        out, lse, *_ = _op("moba_attention_varlen_fwd")(q, k, v, cu_seqlens, max_seqlen, block_size, top_k,
                                                        causal, scale, deterministic, centroid_precision)
    if return_lse:
        return out, lse
    return out


def moba_topk_varlen(q, k, cu_seqlens, max_seqlen: int, block_size: int, top_k: int, causal: bool = True, *,
                     centroid_precision: str = "fp32"):
    """MoBA routing of packed variable-length sequences: int32 (total_tokens, heads, top_k).

    Row ``c_i + t`` holds :func:`mobalab.kernels.moba_topk` of sequence ``i`` alone at its query ``t``
    (with the same ``centroid_precision``): block indices local to the sequence (block ``j`` = its tokens
    ``[jB, (j+1)B)``), ``-1`` for unused slots. Shapes and ``cu_seqlens`` as in :func:`moba_attention_varlen`.

    Examples
    --------
    >>> import torch
    >>> from mobalab.kernels import moba_topk_varlen
    >>> g = torch.Generator().manual_seed(0)
    >>> q, k = (torch.randn(7, 1, 4, generator=g) for _ in range(2))
    >>> sel = moba_topk_varlen(q, k, torch.tensor([0, 3, 7], dtype=torch.int32), 4, block_size=2, top_k=2)
    >>> sel[:, 0].tolist()  # sequence 2 starts again at block 0
    [[0, -1], [0, -1], [1, 0], [0, -1], [0, -1], [1, 0], [1, 0]]
    """
    fn = "moba_topk_varlen"
    max_seqlen, block_size, top_k = _check_inputs(q, k, None, cu_seqlens, max_seqlen, block_size, top_k, causal, fn)
    centroid_precision = C.check_centroid_precision(fn, centroid_precision)
    return _op("moba_topk_varlen")(q, k, cu_seqlens, max_seqlen, block_size, top_k, causal, centroid_precision)
