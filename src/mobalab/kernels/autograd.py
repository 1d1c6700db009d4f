"""The torch boundary of MoBA attention: two ``torch.library`` custom ops, their autograd, the public entry.

* ``mobalab::moba_attention_fwd``: route (hard top-k, no gradient), then attend; returns and saves the
  output, the natural-log LSE, the routing and, where they serve the backward's chunks
  (:func:`mobalab.kernels._cuda_backward.forward_lists_reusable`), the key-block lists the forward built (else an
  empty tensor), so the backward does not build them again. CUDA
  tensors run :mod:`mobalab.kernels._cuda_routing` and :mod:`mobalab.kernels._cuda_attention`; CPU tensors run
  :func:`mobalab.kernels.reference.moba_topk` and :func:`~mobalab.kernels.reference.moba_attention_given_routing`
  (so the op's plumbing, ``torch.compile`` and ``gradcheck`` are tested without a GPU).
* ``mobalab::moba_attention_bwd``: dq, dk, dv from the saved tensors, by
  :mod:`mobalab.kernels._cuda_backward` (CUDA) or :func:`~mobalab.kernels.reference.moba_attention_backward`
  (CPU), honouring the gradient w.r.t. the LSE.
* ``mobalab::moba_topk``: the routing alone (:func:`mobalab.kernels.moba_topk`), for ``torch.compile``.

``torch.compile`` sees both ops as opaque custom ops (the fake implementations give the shapes), so there is
no graph break. :func:`moba_attention_autograd` validates its inputs and calls the forward op under
``torch.compile``, and in eager mode :class:`_EagerMoba`, an autograd.Function over the same two bodies
(:func:`_fwd_impl`, :func:`_bwd_impl`) without the custom ops' per-call dispatch cost.
"""

from __future__ import annotations

import functools

import torch

from . import _contract as C
from . import reference as R
from ._build import on_device

__all__ = ["moba_attention_autograd"]


# --------------------------------------------------------------------------------------------------
# the custom ops


#: The CUDA passes attend a batch of short sequences as one sequence where that takes fewer chunks of launches
#: (:mod:`mobalab.kernels._batch_fold`; bit-identical results); False: one plan of chunks per sequence.
FOLD_BATCH = True


def _folded(q, k, block_size, top_k, deterministic) -> bool:
    """Whether the CUDA passes attend the batch as one sequence (:func:`._batch_fold.folds`; shapes only)."""
    return q.is_cuda and _shape_plan(*_plan_key(q, k, block_size, top_k, deterministic))[0]


def _plan_key(q, k, block_size, top_k, deterministic) -> tuple:
    batch, seqlen, heads, dim = q.shape
    return batch, seqlen, heads, k.shape[2], dim, block_size, top_k, deterministic, q.element_size(), FOLD_BATCH


@functools.lru_cache(maxsize=256)  # asked on the host's path to the first launches of every training step
def _shape_plan(batch, seqlen, heads, kv_heads, dim, block_size, top_k, deterministic, elem_bytes,
                fold) -> tuple[bool, int]:
    """(batch folded into one sequence, length of the lists the forward keeps) of a CUDA training step; ``fold``
    False: never folded (:data:`FOLD_BATCH`)."""
    from . import _cuda_backward as B
    from ._batch_fold import folds

    folded = fold and folds(batch, seqlen, heads, kv_heads, dim, block_size, top_k, deterministic, elem_bytes)
    if folded:
        batch, seqlen = 1, batch * seqlen
    kept = B.kept_lists_plan(batch, seqlen, heads, kv_heads, dim, block_size, top_k, deterministic, elem_bytes)
    return folded, 0 if kept is None else kept[2]


def _as_one(x):
    """(batch, seqlen, ...) as (1, batch * seqlen, ...): the batch's rows end to end."""
    return x.reshape(1, x.shape[0] * x.shape[1], *x.shape[2:])


def _as_is(x):
    return x


def _routing(q, k, block_size, top_k, causal, deterministic, centroid_precision="fp32"):
    """The CUDA routing of a training step, launched: where the batch is folded into one sequence
    (:func:`_folded`), the top-k kernel numbers the blocks for the sequences end to end (as
    :func:`._batch_fold.folded_topk` renumbers them)."""
    from ._cuda_routing import topk_cuda_checked

    with on_device(q.device):
        return topk_cuda_checked(q, k, block_size, top_k, causal, fn="moba_attention",
                                 fold=_folded(q, k, block_size, top_k, deterministic),
                                 centroid_precision=centroid_precision)


def _fwd_impl(q, k, v, block_size, top_k, causal, scale, deterministic, topk=None, keep=True,
              centroid_precision="fp32"):
    """The forward op's body (both entries, :func:`_fwd_op` and :class:`_EagerMoba`): out, lse, routing, lists.

    The routing is the one the attention read (:func:`_routing` with ``centroid_precision``; given as ``topk``
    where the caller launched it already), which the backward reads as it is. ``keep`` False: no lists kept (a
    caller with no backward)."""
    if q.is_cuda:  # inputs checked at the entry (moba_attention_autograd): the kernels' checked paths
        from ._cuda_attention import forward_checked

        with on_device(q.device):
            if topk is None:
                topk = _routing(q, k, block_size, top_k, causal, deterministic, centroid_precision)
            keep = keep and _lists_numel(q, k, block_size, top_k, deterministic) > 0
            # a folded batch's routing is numbered for it already
            view = _as_one if _folded(q, k, block_size, top_k, deterministic) else _as_is
            out, lse, *lists = forward_checked(view(q), view(k), view(v), block_size, top_k, causal, scale,
                                               view(topk), keep)
        return out.view(q.shape), lse.view(q.shape[:3]), topk, lists[0] if keep else _no_lists(q)
    topk = R.moba_topk(q, k, block_size, top_k, causal=causal, centroid_precision=centroid_precision)
    with torch.no_grad():
        out, lse = R.moba_attention_given_routing(q, k, v, topk, block_size, causal=causal, softmax_scale=scale)
    return out.contiguous(), lse.contiguous(), topk, _no_lists(q)


@torch.library.custom_op("mobalab::moba_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, top_k: int, causal: bool,
            scale: float, deterministic: bool, centroid_precision: str = "fp32"
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fwd_impl(q, k, v, block_size, top_k, causal, scale, deterministic,
                     centroid_precision=centroid_precision)


def _no_lists(q):
    return torch.empty(0, dtype=torch.int64, device=q.device)


def _lists_numel(q, k, block_size, top_k, deterministic) -> int:
    """Length of the key-block lists the CUDA forward keeps for the backward: 0 unless they serve it
    (:func:`mobalab.kernels._cuda_backward.forward_lists_reusable`); a function of the shapes only, so the fake
    implementation gives it too."""
    return _shape_plan(*_plan_key(q, k, block_size, top_k, deterministic))[1] if q.is_cuda else 0


@_fwd_op.register_fake
def _(q, k, v, block_size, top_k, causal, scale, deterministic, centroid_precision="fp32"):
    batch, seqlen, heads, _ = q.shape
    return (q.new_empty(q.shape), q.new_empty((batch, seqlen, heads), dtype=C.compute_dtype(q.dtype)),
            q.new_empty((batch, seqlen, heads, top_k), dtype=torch.int32),
            q.new_empty((_lists_numel(q, k, block_size, top_k, deterministic),), dtype=torch.int64))


def _bwd_impl(dout, dlse, q, k, v, out, lse, topk, lists, block_size, top_k, causal, scale, deterministic):
    """The backward op's body (both entries): dq, dk, dv."""
    if q.is_cuda:  # the forward's tensors, checked at its entry, and their gradients, which autograd checked
        from ._cuda_backward import backward_checked

        with on_device(q.device):
            # folded: the forward's routing is the folded one already
            view = _as_one if _folded(q, k, block_size, top_k, deterministic) else _as_is
            dq, dk, dv = backward_checked(*map(view, (dout, q, k, v, out, lse, topk)), block_size, top_k, causal,
                                          scale, deterministic, None if dlse is None else view(dlse), lists)
            return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape)
    dq, dk, dv = R.moba_attention_backward(dout, q, k, v, out, lse, topk, block_size, causal, scale, dlse=dlse)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@torch.library.custom_op("mobalab::moba_attention_bwd", mutates_args=())
def _bwd_op(dout: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            out: torch.Tensor, lse: torch.Tensor, topk: torch.Tensor, lists: torch.Tensor, block_size: int,
            top_k: int, causal: bool, scale: float, deterministic: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd_impl(dout, dlse, q, k, v, out, lse, topk, lists, block_size, top_k, causal, scale, deterministic)


@_bwd_op.register_fake
def _(dout, dlse, q, k, v, out, lse, topk, lists, block_size, top_k, causal, scale, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.custom_op("mobalab::moba_topk", mutates_args=())
def moba_topk_op(q: torch.Tensor, k: torch.Tensor, block_size: int, top_k: int, causal: bool,
                 centroid_precision: str) -> torch.Tensor:
    """:func:`mobalab.kernels.moba_topk` as one opaque op, what ``torch.compile`` sees of it (the routing branches
    on tensor values, and the CUDA router launches through CuPy: neither can be traced)."""
    from . import moba_topk

    return moba_topk(q, k, block_size, top_k, causal, centroid_precision=centroid_precision).contiguous()


@moba_topk_op.register_fake
def _(q, k, block_size, top_k, causal, centroid_precision):
    batch, seqlen, heads, _ = q.shape
    return q.new_empty((batch, seqlen, heads, top_k), dtype=torch.int32)


# --------------------------------------------------------------------------------------------------
# autograd


def _setup_context(ctx, inputs, output):
    q, k, v, block_size, top_k, causal, scale, deterministic, *_ = inputs  # the routing's precision: not needed
    out, lse, topk, lists = output
    ctx.save_for_backward(q, k, v, out, lse, topk, lists)
    ctx.params = (block_size, top_k, causal, scale, deterministic)
    ctx.set_materialize_grads(False)  # an unused LSE's gradient stays None: no zero tensor made and subtracted


def _grads(ctx, dout, dlse, bwd):
    """The gradients of the forward's inputs from its saved tensors, by ``bwd`` (the backward op or its body)."""
    q, k, v, out, lse, topk, lists = ctx.saved_tensors
    block_size, top_k, causal, scale, deterministic = ctx.params
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = bwd(dout, dlse, q, k, v, out, lse, topk, lists, block_size, top_k, causal, scale, deterministic)
    return dq, dk, dv, None, None, None, None, None, None


def _backward(ctx, dout, dlse, dtopk, dlists):
    return _grads(ctx, dout, dlse, _bwd_op)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _FirstOrderOnly(torch.autograd.Function):
    """A backward's gradients under ``create_graph``: the same tensors, tied to what they depend on (the output
    gradients, q, k and v) by a node whose own backward raises. The backward bodies have no backward of their own;
    left as constants, a second derivative through them (a gradient penalty, say) would lack MoBA's terms without a
    word, where the custom ops that ``torch.compile`` traces raise."""

    @staticmethod
    def forward(fn, n, *tensors):
        return tuple(x.view_as(x) for x in tensors[:n])

    @staticmethod
    def setup_context(ctx, inputs, output):  # this form (not ctx in forward) is what torch.func transforms take
        ctx.fn = inputs[0]

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"{ctx.fn}: MoBA attention is differentiable once; its gradients have no gradient "
                           "(double backward, e.g. a gradient penalty through the attention, is not supported)")


def _first_order(fn: str, grads: tuple, *depends) -> tuple:
    """``grads`` as they are, or through :class:`_FirstOrderOnly` where autograd records the backward itself
    (``create_graph``: grad mode on inside it); ``depends``: the tensors they are functions of (None skipped)."""
    if not torch.is_grad_enabled():
        return grads
    return _FirstOrderOnly.apply(fn, len(grads), *grads, *(x for x in depends if x is not None))


class _EagerMoba(torch.autograd.Function):
    """The same forward and backward bodies without the custom ops, for eager calls: a custom op's dispatch
    (schema handling, the aliasing checks of its outputs, its autograd wrapper) costs the host some 0.3 ms per
    training step, which a step at 8K cannot hide. ``torch.compile`` traces the custom ops instead
    (:func:`moba_attention_autograd`), which it sees as opaque nodes with fake implementations."""

    @staticmethod
    def forward(q, k, v, block_size, top_k, causal, scale, deterministic, centroid_precision, topk):
        return _fwd_impl(q, k, v, block_size, top_k, causal, scale, deterministic, topk=topk,
                         centroid_precision=centroid_precision)

    @staticmethod
    def setup_context(ctx, inputs, output):  # this form (not ctx in forward) is what torch.func transforms take
        _setup_context(ctx, inputs, output)
        ctx.mark_non_differentiable(output[2], output[3])  # the routing and the lists

    @staticmethod
    def backward(ctx, dout, dlse, dtopk, dlists):
        dq, dk, dv, *rest = _grads(ctx, dout, dlse, _bwd_impl)
        dq, dk, dv = _first_order("moba_attention", (dq, dk, dv), dout, dlse, *ctx.saved_tensors[:3])
        return dq, dk, dv, *rest, None  # none for the routing passed in


#: Eager calls take :class:`_EagerMoba` (True) or the custom ops (False); under ``torch.compile`` the ops always.
EAGER_FUNCTION = True


# --------------------------------------------------------------------------------------------------
# the entry


def moba_attention_autograd(q, k, v, block_size: int, top_k: int, causal: bool = True, softmax_scale=None,
                            return_lse: bool = False, *, deterministic: bool = False,
                            centroid_precision: str = "fp32"):
    """Differentiable MoBA attention through the ``mobalab::moba_attention_fwd`` custom op.

    CUDA tensors: what the CUDA kernels support, the "cuda" path of the input contract
    (``mobalab.kernels._contract``: bf16/fp16, head_dim in ``CUDA_HEAD_DIMS``, block_size in ``CUDA_BLOCK_SIZES``,
    top_k up to ``MAX_TOP_K``); gradients dq, dk, dv from the CUDA backward (``deterministic=True``:
    bit-identical dq run to run, at some extra time and scratch; dk, dv are always reproducible). CPU tensors: the
    torch reference behind the same op (any float dtype). Returns ``out`` and, with ``return_lse``, the
    natural-log ``lse`` (float32, float64 for float64 inputs; the gradient w.r.t. it is honoured as well).
    Differentiable once: a second derivative through the gradients (double backward) raises. Works under
    ``torch.func.grad`` / ``vjp`` (``vmap`` is refused); fake tensors get the op's fake implementation.
    ``centroid_precision``: the routing's centroids, "fp32" or "input" (:func:`mobalab.kernels.reference.moba_topk`).

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> q, k, v = (torch.randn(1, 8, 2, 4, generator=g, requires_grad=True) for _ in range(3))
    >>> out = moba_attention_autograd(q, k, v, block_size=2, top_k=2)
    >>> out.sum().backward()
    >>> q.grad.shape
    torch.Size([1, 8, 2, 4])
    """
    fn = "moba_attention_autograd"
    C.check_tensor(fn, "q", q)
    path = "cuda" if q.is_cuda else "reference"
    C.check_inputs(fn, q, k, v, path=path)
    block_size = C.check_block_size(fn, block_size, path)
    top_k = C.check_top_k(fn, top_k, path)
    causal = C.check_flag(fn, "causal", causal)
    return_lse = C.check_flag(fn, "return_lse", return_lse)
    deterministic = C.check_flag(fn, "deterministic", deterministic)
    centroid_precision = C.check_centroid_precision(fn, centroid_precision)
    scale = C.check_softmax_scale(fn, softmax_scale, q.shape[-1])
    C.check_not_vmapped(fn, [("q", q), ("k", k), ("v", v)])
    # fake tensors (FakeTensorMode) hold no values to route by: the op's fake implementation gives the shapes
    if EAGER_FUNCTION and not torch.compiler.is_compiling() and not C.is_fake(q):
        # CUDA: the routing launched first, so that the GPU starts while autograd sets up the node (~50 us of host
        # time before the first launch otherwise)
        topk = _routing(q, k, block_size, top_k, causal, deterministic, centroid_precision) if q.is_cuda else None
        out, lse, _, _ = _EagerMoba.apply(q, k, v, block_size, top_k, causal, scale, deterministic,
                                          centroid_precision, topk)
    else:
        out, lse, _, _ = _fwd_op(q, k, v, block_size, top_k, causal, scale, deterministic, centroid_precision)
    if return_lse:
        return out, lse
    return out
