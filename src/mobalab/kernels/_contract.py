"""The one input contract of every MoBA entry point: what q, k, v, routing indices and sizes may be.

Layout is FlashAttention's (see docs/design.md, "MoBA semantics"): ``q`` is (batch, seqlen, heads, head_dim),
``k`` and ``v`` are (batch, seqlen, kv_heads, head_dim) with ``heads % kv_heads == 0``, one sequence for
queries and keys (self-attention). Two paths accept different sizes:

* ``"reference"`` (torch, CPU or CUDA tensors): float16, bfloat16, float32, float64; any head_dim, any
  block_size >= 1, any top_k >= 1;
* ``"cuda"`` (the CuPy kernels): bfloat16 and float16, head_dim in :data:`CUDA_HEAD_DIMS`, block_size in
  :data:`CUDA_BLOCK_SIZES`, top_k up to :data:`MAX_TOP_K`, CUDA tensors.

Every entry point (the public dispatch, the reference, the CUDA wrappers, the custom ops) validates here,
so one input gets one message wherever it enters: the function name, the argument, what was given and what
is supported. Non-tensors raise TypeError; everything else ValueError. The CUDA wrappers call
:func:`check_cuda_device` after every other check, so CPU tensors reach each message in tests without a GPU.
"""

from __future__ import annotations

import functools
import math
import numbers
import os

import torch
from torch._subclasses.fake_tensor import is_fake as _is_fake

__all__ = [
    "check_tensor",
    "check_same_device",
    "check_inputs",
    "check_keys",
    "check_cuda_device",
    "check_block_size",
    "check_top_k",
    "check_positive_int",
    "check_flag",
    "check_softmax_scale",
    "check_topk_indices",
    "check_centroids",
    "check_like",
    "dtype_tag",
    "compute_dtype",
]

PATHS = ("reference", "cuda")
REFERENCE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
CUDA_DTYPES = (torch.bfloat16, torch.float16)
CUDA_HEAD_DIMS = (32, 64, 96, 128, 256)
CUDA_BLOCK_SIZES = (16, 32, 64, 128, 256, 512)
_CUDA_BLOCK_SET = frozenset(CUDA_BLOCK_SIZES)
MAX_TOP_K = 64
# grid.y / grid.z carry heads and batch; seqlen is a 32-bit int in every kernel signature
CUDA_MAX_GRID_YZ = 65535
CUDA_MAX_SEQLEN = 2**31 - 1

# Kernel names spell fp16 differently per source file (the names are fixed by the .cu files); this table is
# the one place that knows it.
_DTYPE_TAGS = {torch.bfloat16: "bf16", torch.float16: "fp16"}
_SHORT_FP16_SOURCES = ("attention.cu", "attention_bwd.cu")


def _names(dtypes) -> str:
    return ", ".join(str(d) for d in dtypes)


def _type_name(x) -> str:
    t = type(x)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _check_path(path: str) -> None:
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")


def dtype_tag(dtype: torch.dtype, source: str) -> str:
    """The dtype's tag in the kernel names of ``cuda/<source>``: "bf16"; "fp16" ("f16" in the attention files)."""
    tag = _DTYPE_TAGS[dtype]
    return "f16" if tag == "fp16" and source in _SHORT_FP16_SOURCES else tag


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The reference computes in float64 for float64 inputs and in float32 for every other dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------------
# tensors


def check_tensor(fn: str, name: str, x) -> None:
    """``x`` is a torch.Tensor with data (not a numpy array, a list, or a meta tensor)."""
    if not isinstance(x, torch.Tensor):
        hint = " (convert with torch.from_numpy)" if type(x).__module__ == "numpy" else ""
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {_type_name(x)}{hint}")
    if x.is_meta:
        raise ValueError(f"{fn}: {name} is a meta tensor (a shape without data); supported: CPU or CUDA tensors "
                         "(for shapes alone, fake tensors: torch._subclasses.fake_tensor.FakeTensorMode)")


def is_fake(x) -> bool:
    """Whether ``x`` is a FakeTensor (``FakeTensorMode``, ``torch.export``): a shape whose values cannot be read, so the
    entry points answer with their custom ops' fake implementations instead of computing."""
    # a plain tensor that wraps nothing is not fake: answered without the walk over wrappers (host time per call)
    return (type(x) is not torch.Tensor or torch._is_functional_tensor(x)) and _is_fake(x)


def autocast_dtype(x) -> torch.dtype | None:
    """The dtype ``torch.autocast`` runs matrix products in on ``x``'s device type (CPU or CUDA), None where it is
    off (or ``x`` is no tensor)."""
    device = x.device.type if isinstance(x, torch.Tensor) else None
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def check_not_vmapped(fn: str, named) -> None:
    """Refuse ``torch.func.vmap``: the routing picks blocks by value and the attention gathers what it picked, in
    shapes that follow the data, which vmap cannot batch."""
    for name, x in named:
        if x is not None and torch._C._functorch.is_batchedtensor(x):
            raise ValueError(f"{fn}: {name} is batched by torch.func.vmap, which is not supported (the routing "
                             "selects key blocks by value, in shapes that depend on the data); put the mapped "
                             "dimension into the batch dimension instead, e.g. q.flatten(0, 1) for a vmap over "
                             "dim 0 of (n, batch, seqlen, heads, d)")


def check_same_device(fn: str, named) -> None:
    """All tensors of ``named`` (pairs of name and tensor) live on one device."""
    device = named[0][1].device
    if all(x.device == device for _, x in named):  # (every entry point asks, at every call)
        return
    devices = {name: str(x.device) for name, x in named}
    if len(set(devices.values())) != 1:
        raise ValueError(f"{fn}: {', '.join(devices)} must be on one device, got {devices}")


def _check_4d(fn: str, name: str, x, path: str) -> None:
    check_tensor(fn, name, x)
    shape = tuple(x.shape)
    if len(shape) != 4:
        raise ValueError(f"{fn}: {name} must be 4-D (batch, seqlen, heads, head_dim), got shape {shape}")
    if 0 in shape:
        raise ValueError(f"{fn}: {name} has an empty dimension, shape {shape}; "
                         "batch, seqlen, heads and head_dim must all be >= 1")
    check_path_dtype(fn, name, x.dtype, path)


def check_path_dtype(fn: str, name: str, dtype: torch.dtype, path: str) -> None:
    """``dtype`` is one the ``path`` ("reference" or "cuda") supports."""
    supported = REFERENCE_DTYPES if path == "reference" else CUDA_DTYPES
    if dtype not in supported:
        raise ValueError(f"{fn}: {name} has dtype {dtype}; supported on the {path} path: {_names(supported)}")


def _check_cuda_sizes(fn: str, x, path: str) -> None:
    if path != "cuda":
        return
    check_cuda_shape(fn, *x.shape)


def check_cuda_shape(fn: str, batch: int, seqlen: int, heads: int, dim: int) -> None:
    """The sizes the cuda path supports: head_dim in :data:`CUDA_HEAD_DIMS`, seqlen up to
    :data:`CUDA_MAX_SEQLEN`, batch and heads each up to :data:`CUDA_MAX_GRID_YZ`."""
    if dim not in CUDA_HEAD_DIMS:
        raise ValueError(f"{fn}: head_dim {dim} is not supported; supported on the cuda path: {CUDA_HEAD_DIMS}")
    if seqlen > CUDA_MAX_SEQLEN:
        raise ValueError(f"{fn}: seqlen {seqlen} is not supported; supported on the cuda path: up to {CUDA_MAX_SEQLEN}")
    if batch > CUDA_MAX_GRID_YZ or heads > CUDA_MAX_GRID_YZ:
        raise ValueError(f"{fn}: batch {batch} and heads {heads} are not supported; supported on the cuda path: "
                         f"each <= {CUDA_MAX_GRID_YZ}")


def check_cuda_device(fn: str, x) -> None:
    """The cuda path's last check: ``x`` (q, or k for the centroids) is a CUDA tensor."""
    if x.device.type != "cuda":
        raise ValueError(f"{fn}: inputs are on {x.device}; the cuda path needs CUDA tensors "
                         "(CPU tensors run the reference)")


def check_keys(fn: str, k, *, path: str) -> None:
    """``k`` alone (for the centroids): a 4-D tensor of a supported dtype (and, on the cuda path, head dim)."""
    _check_path(path)
    _check_4d(fn, "k", k, path)
    _check_cuda_sizes(fn, k, path)


def check_inputs(fn: str, q, k, v=None, *, path: str, same_seqlen: bool = True) -> None:
    """q, k (and v): tensors of one dtype on one device, shapes that agree, heads a multiple of kv heads.

    ``path`` is "reference" or "cuda" and selects the supported dtypes, head dims and devices;
    ``same_seqlen=False`` lets q and k differ in length (queries and keys of two parts of one sequence).
    """
    _check_path(path)
    named = [("q", q), ("k", k)] + ([("v", v)] if v is not None else [])
    for name, x in named:
        _check_4d(fn, name, x, path)
    dtypes = {name: x.dtype for name, x in named}
    if len(set(dtypes.values())) != 1:
        raise ValueError(f"{fn}: {', '.join(dtypes)} must share one dtype, got {dtypes}")
    check_same_device(fn, named)
    if v is not None and k.shape != v.shape:
        raise ValueError(f"{fn}: k and v must have the same shape, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    (bq, nq, hq, dq), (bk, nk, hk, dk) = q.shape, k.shape
    if bq != bk:
        raise ValueError(f"{fn}: batch differs, q has {bq} and k has {bk}; they must match")
    if same_seqlen and nq != nk:
        raise ValueError(f"{fn}: seqlen differs, q has {nq} and k has {nk}; "
                         "only self-attention (equal seqlen) is supported")
    if dq != dk:
        raise ValueError(f"{fn}: head_dim differs, q has {dq} and k has {dk}; they must match")
    if hq % hk != 0:
        raise ValueError(f"{fn}: q heads ({hq}) must be a multiple of kv heads ({hk}) (MHA, GQA or MQA)")
    _check_cuda_sizes(fn, q, path)


def check_like(fn: str, name: str, x, shape, dtypes=None, device=None) -> None:
    """``x`` is a tensor of exactly ``shape`` (and, when given, one of ``dtypes`` on ``device``)."""
    check_tensor(fn, name, x)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{fn}: {name} has shape {tuple(x.shape)}; expected {tuple(shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        raise ValueError(f"{fn}: {name} has dtype {x.dtype}; supported: {_names(dtypes)}")
    if device is not None and x.device != device:
        raise ValueError(f"{fn}: {name} is on {x.device}; expected {device} like q")


def check_into(fn: str, into, names: tuple[str, ...], shapes, device) -> None:
    """In-place output buffers (``into=``): one contiguous fp32 tensor per name, of its shape, on ``device``
    (the kernels address them as dense arrays)."""
    if len(into) != len(names):
        raise ValueError(f"{fn}: into must be ({', '.join(names)}); got {len(into)} tensors")
    for name, buf, shape in zip(names, into, shapes, strict=True):
        check_like(fn, f"into {name}", buf, shape, dtypes=(torch.float32,), device=device)
        if not buf.is_contiguous():
            raise ValueError(f"{fn}: into {name} must be contiguous (the kernels address it as a dense array); "
                             f"got strides {tuple(buf.stride())}")


# ---------------------------------------------------------------------------------------------------
# sizes, flags, scale


def check_positive_int(fn: str, name: str, value) -> int:
    """An integer >= 1 (bool excluded)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{fn}: {name} must be an integer >= 1, got {value!r} ({_type_name(value)})")
    if value < 1:
        raise ValueError(f"{fn}: {name} must be an integer >= 1, got {value}")
    return int(value)


def check_block_size(fn: str, block_size, path: str) -> int:
    """Any integer >= 1 on the reference path; one of :data:`CUDA_BLOCK_SIZES` on the cuda path."""
    if path == "cuda" and type(block_size) is int and block_size in _CUDA_BLOCK_SET:  # the common case, fast
        return block_size
    _check_path(path)
    if path == "reference":
        return check_positive_int(fn, "block_size", block_size)
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral) or (
            int(block_size) not in CUDA_BLOCK_SIZES):
        raise ValueError(f"{fn}: block_size={block_size!r} is not supported; supported on the cuda path: "
                         f"{CUDA_BLOCK_SIZES}")
    return int(block_size)


def check_top_k(fn: str, top_k, path: str) -> int:
    """Any integer >= 1 on the reference path; 1 .. :data:`MAX_TOP_K` on the cuda path."""
    if path == "cuda" and type(top_k) is int and 1 <= top_k <= MAX_TOP_K:  # the common case, fast
        return top_k
    _check_path(path)
    if path == "reference":
        return check_positive_int(fn, "top_k", top_k)
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or not 1 <= int(top_k) <= MAX_TOP_K:
        raise ValueError(f"{fn}: top_k={top_k!r} is not supported; supported on the cuda path: "
                         f"integers 1..{MAX_TOP_K}")
    return int(top_k)


def check_flag(fn: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{fn}: {name} must be True or False, got {value!r}")
    return value


def check_softmax_scale(fn: str, softmax_scale, head_dim: int) -> float:
    """``softmax_scale`` as a float: :math:`1/\\sqrt{d}` for None, else a finite real number."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real) or not math.isfinite(
            float(softmax_scale)):
        raise ValueError(f"{fn}: softmax_scale must be a finite real number or None, got {softmax_scale!r}")
    return float(softmax_scale)


# ---------------------------------------------------------------------------------------------------
# routing indices and centroids

#: What the router's centroids are rounded to before scoring: "fp32", the fp32 mean itself (the default), or
#: "input", the fp32 mean rounded to the keys' dtype, as MoBA and FlashMoBA store it (for float32 and float64 keys
#: the two are the same).
CENTROID_PRECISIONS = ("fp32", "input")


def check_centroid_precision(fn: str, value) -> str:
    if not isinstance(value, str) or value not in CENTROID_PRECISIONS:
        raise ValueError(f"{fn}: centroid_precision must be one of {CENTROID_PRECISIONS}, got {value!r}")
    return value


def routed_centroids(centroids: torch.Tensor, key_dtype: torch.dtype, precision: str) -> torch.Tensor:
    """The centroids a router of ``precision`` scores, in ``centroids``' (compute) dtype: as given for "fp32",
    rounded to the keys' dtype for "input" (the compute dtype holds the rounded values exactly)."""
    return centroids.to(key_dtype).to(centroids.dtype) if precision == "input" else centroids


def unroutable_as_nan(centroids: torch.Tensor) -> torch.Tensor:
    """``centroids`` (..., d) with every centroid that has a non-finite element set to NaN whole: such a block
    scores NaN for every query, which no router selects (the contract's locality of non-finite keys)."""
    return centroids.masked_fill(~torch.isfinite(centroids).all(dim=-1, keepdim=True), math.nan)



def check_topk_indices(fn: str, topk, q, top_k: int, name: str = "topk_indices") -> None:
    """Routing indices: integer (batch, seqlen, heads, top_k) on q's device, -1 for an unused slot."""
    want = tuple(q.shape[:3]) + (int(top_k),)
    check_like(fn, name, topk, want, dtypes=(torch.int32, torch.int64))
    if topk.device != q.device:
        raise ValueError(f"{fn}: {name} is on {topk.device}, q on {q.device}; they must match")


def check_centroids(fn: str, centroids, k, block_size: int) -> None:
    """Given centroids: float32 (batch, n_blocks, kv_heads, head_dim) on k's device."""
    batch, seqlen, kv_heads, dim = k.shape
    want = (batch, math.ceil(seqlen / block_size), kv_heads, dim)
    check_tensor(fn, "centroids", centroids)
    if tuple(centroids.shape) != want:
        raise ValueError(f"{fn}: centroids have shape {tuple(centroids.shape)}; expected {want} "
                         "(batch, n_blocks, kv_heads, head_dim)")
    if centroids.dtype != torch.float32:
        raise ValueError(f"{fn}: centroids have dtype {centroids.dtype}; supported: torch.float32")
    if centroids.device != k.device:
        raise ValueError(f"{fn}: centroids are on {centroids.device} and k on {k.device}; they must match")


@functools.cache
def _env_key(name: str):
    return os.environ.encodekey(name)


def getenv(name: str, default: str | None = None) -> str | None:
    """``os.environ.get(name, default)``, read at every call. The wrappers read their settings at each call, some 30
    per training step and most of them unset, and for an unset name ``os.environ.get`` raises and catches a KeyError
    inside (about 1 us each); the lookup in the mapping's own dict of encoded names, which every write to os.environ
    updates, is what that call does without the exception."""
    environ = os.environ
    data = getattr(environ, "_data", None)
    if data is None or not hasattr(environ, "encodekey"):  # os.environ replaced by some other mapping
        return environ.get(name, default)
    value = data.get(_env_key(name))
    return default if value is None else environ.decodevalue(value)


def choice_or_env(what: str, value: str | None, choices: tuple[str, ...], env: str, default: str) -> str:
    """``value``, or the environment variable ``env`` (else ``default``) when None; one of ``choices``."""
    if value is None:
        value = getenv(env, default)
    if value not in choices:
        raise ValueError(f"{what} must be one of {choices} (or None: ${env}, default {default!r}), got {value!r}")
    return value
