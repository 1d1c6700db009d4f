"""One place that turns the ``cuda/*.cu`` sources into CuPy kernels.

Why this file exists (see docs/design.md, "Building and launching kernels"):

* CuPy's kernel cache hashes the source string but not headers pulled in with ``#include``, so local
  ``#include "x.cuh"`` lines are inlined textually here before compiling (each header once per source, at
  its first include): editing a header then always recompiles.
* ``wgmma``/``setmaxnreg`` need ``-arch=sm_90a``; NVRTC keeps it even though CuPy appends ``-arch=sm_90``. On any
  other GPU no ``-arch`` is passed: CuPy's own ``-arch=sm_<cc>`` targets it (NVRTC given two different targets takes
  CuPy's or fails), and the sources compile for sm_80 / 86 / 89 with the older forms of sm_90's instructions.
* Shared memory above 48 KB must be opted into per kernel object, before its first launch.
* CuPy is imported lazily: ``import mobalab`` must work with no GPU and no CuPy.

The same source files compile under plain ``nvcc`` in CI (tests/kernels/test_compile.py), so every
device helper in them is annotated ``__device__``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from importlib import resources

__all__ = ["source", "arch_options", "get_kernel", "cupy", "current_stream", "torch_stream", "sm_count", "on_device"]

CUDA_DIR = resources.files("mobalab.kernels") / "cuda"
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)

# Options shared by NVRTC (run time) and the nvcc compile check (CI); the target comes from arch_options.
NVRTC_OPTIONS = ("-std=c++17", "--use_fast_math", "-lineinfo")
# MOBALAB_CUDA_PORTABLE=1 (read once, at import): every module built with -DMOBA_PORTABLE=1, the older forms of
# sm_90's instructions that sm_80 / 86 / 89 GPUs run (cuda/ptx.cuh), so that a Hopper's GPU tests can run them.
PORTABLE_DEFINES = ("MOBA_PORTABLE=1",) if os.environ.get("MOBALAB_CUDA_PORTABLE", "") == "1" else ()


def arch_options(capability: tuple[int, int]) -> tuple[str, ...]:
    """The ``-arch`` option for a GPU of compute ``capability``: sm_90a on sm_90 (the Hopper-only instructions),
    none elsewhere (CuPy appends the device's own target).

    Examples
    --------
    >>> arch_options((9, 0)), arch_options((8, 0))
    (('-arch=sm_90a',), ())
    """
    return ("-arch=sm_90a",) if tuple(capability) == (9, 0) else ()


def source(name: str) -> str:
    """Text of ``cuda/<name>`` with local ``#include "..."`` files inlined, each at its first include only
    (a header included from two places, such as ptx.cuh, then appears once)."""
    return _inline(name, set())


def _inline(name: str, seen: set[str]) -> str:
    seen.add(name)

    def inline(match: re.Match) -> str:
        inc = match.group(1)
        if inc in seen:
            return f"// ---- {inc} already included ----"
        return f"// ---- begin {inc} ----\n{_inline(inc, seen)}\n// ---- end {inc} ----"

    return _INCLUDE.sub(inline, (CUDA_DIR / name).read_text())


def cupy():
    """Import CuPy on first use, with a clear error when it is missing."""
    try:
        import cupy as cp
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise RuntimeError(
            "mobalab's GPU kernels need CuPy: pip install 'mobalab[gpu]' (cupy-cuda13x>=14.2)"
        ) from exc
    return cp


@functools.cache
def _module(filename: str, defines: tuple[str, ...], name_expressions: tuple[str, ...], capability: tuple[int, int]):
    # one build per compute capability: CuPy loads a module on every device it runs on, and an sm_90a cubin does not
    # load on another architecture (a process with an H100 and an A100)
    cp = cupy()
    opts = NVRTC_OPTIONS + arch_options(capability) + tuple(f"-D{d}" for d in (*PORTABLE_DEFINES, *defines))
    mod = cp.RawModule(code=source(filename), options=opts, name_expressions=name_expressions or None)
    mod.compile()
    return mod


@functools.cache
def _kernel(filename: str, kernel: str, defines: tuple[str, ...], name_expressions: tuple[str, ...],
            capability: tuple[int, int]):
    return _module(filename, defines, name_expressions, capability).get_function(kernel)


def get_kernel(filename: str, kernel: str, *, defines: tuple[str, ...] = (),
               name_expressions: tuple[str, ...] = (), max_dynamic_smem: int = 0):
    """Compiled kernel ``kernel`` from ``cuda/<filename>`` (memoised per process).

    ``kernel`` is an ``extern "C"`` name or one of ``name_expressions`` (a template instantiation).
    ``max_dynamic_smem`` > 0 opts the kernel into large dynamic shared memory. The limit is an attribute
    of the CUDA function, shared by every Python object that wraps it, so it is always raised to the
    device's opt-in maximum (never to the request): a smaller request can then not lower the limit under
    a larger launch of the same function.
    """
    device = cupy().cuda.runtime.getDevice()
    fn = _kernel(filename, kernel, tuple(defines), tuple(name_expressions), device_capability(device))
    if max_dynamic_smem > 0:
        limit = _dynamic_smem_limit(fn, device)
        if max_dynamic_smem > limit:
            raise ValueError(f"{kernel} needs {max_dynamic_smem} B of dynamic shared memory; this GPU allows {limit} B")
    return fn


_SMEM_LIMITS: dict = {}


def _dynamic_smem_limit(fn, device: int) -> int:
    """The dynamic shared memory ``fn`` may use on ``device``, raised to it once: a kernel launch happens
    every few microseconds, and reading the device's and the function's attributes takes several."""
    key = (id(fn), device)
    limit = _SMEM_LIMITS.get(key)
    if limit is None:
        cp = cupy()
        rt = cp.cuda.runtime
        optin = rt.deviceGetAttribute(getattr(rt, "cudaDevAttrMaxSharedMemoryPerBlockOptin", 97), device)
        limit = optin - fn.attributes["shared_size_bytes"]
        if fn.max_dynamic_shared_size_bytes < limit:
            fn.max_dynamic_shared_size_bytes = limit
        _SMEM_LIMITS[key] = limit  # fn lives as long as the process (_kernel is memoised), so id(fn) stays its own
    return limit


@functools.cache
def sm_count(device_index: int) -> int:
    """Streaming multiprocessors of CUDA device ``device_index`` (asked once: launch plans size grids by it)."""
    import torch

    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.cache
def smem_per_sm(device_index: int, default: int = 233472) -> int:
    """Shared memory per SM of CUDA device ``device_index`` in bytes (asked once; ``default``, an H100's / H200's
    228 KB, where torch does not say)."""
    import torch

    return int(getattr(torch.cuda.get_device_properties(device_index), "shared_memory_per_multiprocessor", default))


def device_capability(device) -> tuple[int, int]:
    """(major, minor) compute capability of CUDA device ``device`` (a torch.device or an index; no index: the current
    device), asked once per device: the wrappers choose kernels by it on every call."""
    import torch

    if not isinstance(device, int):
        device = torch.device(device)
        device = torch.cuda.current_device() if device.index is None else device.index
    return _capability(device)


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    import torch

    return torch.cuda.get_device_capability(device_index)


_STREAMS: dict = {}


def current_stream() -> tuple[int, int]:
    """(current device, address of torch's current CUDA stream on it)."""
    import torch

    device = torch.cuda.current_device()
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return device, (raw(device) if raw is not None else torch.cuda.current_stream(device).cuda_stream)


_SAME_DEVICE = contextlib.nullcontext()


def on_device(device):
    """``torch.cuda.device(device)``, or a no-op context where ``device`` (a torch.device) is the current one:
    entering and leaving torch's context costs ~8 us of host time, which an 8K training step pays several times
    while the GPU waits for its first launches."""
    import torch

    index = device.index
    if index is None or index == torch.cuda.current_device():
        return _SAME_DEVICE
    return torch.cuda.device(device)


def torch_stream():
    """The CuPy view of torch's current CUDA stream, so kernels are ordered with torch work (one CuPy object per
    stream, kept: building one per launch took several microseconds of a launch's ~20)."""
    device, ptr = current_stream()
    stream = _STREAMS.get((device, ptr))
    if stream is None:
        stream = _STREAMS[(device, ptr)] = cupy().cuda.ExternalStream(ptr, device)
    return stream
