"""Launching CuPy kernels with arguments checked against the CUDA signature.

CuPy does no type checking: a Python float passed to a ``float`` parameter arrives as the low half of
a double (silently 0.0), a Python int passed to ``int`` works only by little-endian luck, and a strided
view is read as if contiguous (see docs/design.md, "Building and launching kernels"). So every launch goes
through :func:`check_args`, which parses the kernel's parameter list from its ``.cu`` source and requires

* pointer parameters: a contiguous torch tensor (passed as its ``data_ptr()``), or an ``int`` address;
* scalar parameters: a numpy scalar of exactly the C type (``int`` -> ``np.int32``, ``float`` ->
  ``np.float32``, ``long long``/``int64_t`` -> ``np.int64``, ...);
* tensor maps (``const __grid_constant__ moba_tensor_map``, the copy engine's 128-byte descriptor passed by
  value): a :class:`._tensor_map.TensorMap2D` (passed as its encoded bytes; the driver launcher only).

A launch is a :class:`Launch` record built by plain Python (the ``_cuda_*`` wrappers' plan functions) and
run by :func:`launch`, the one launch path, which packs the checked arguments into the kernel's parameter block
and calls cuLaunchKernel itself (CuPy's kernel call on ``$MOBALAB_LAUNCH=cupy``). :func:`check_args` is pure
Python, so CI (no GPU) tests every wrapper's plans against the source.
Entry points are either literal ``__global__`` functions or instantiations of a function-like macro whose
body is one (``#define K(NAME, T, D) extern "C" __global__ void NAME(const T* q, int n) {...}`` followed by
lines ``K(moba_x_bf16_d64, __nv_bfloat16, 64)``): :func:`signatures` expands those macros the way the C
preprocessor does (argument substitution, ``##`` pasting), so the parameter list is still read from text
written once.
"""

from __future__ import annotations

import ctypes
import functools
import re
import struct
import threading
from dataclasses import dataclass

import numpy as np
from torch import Tensor as _Tensor

from ._build import cupy, current_stream, get_kernel, source, torch_stream
from ._contract import choice_or_env
from ._tensor_map import MAP_BYTES, TensorMap2D

__all__ = ["Param", "signatures", "check_args", "launch"]

LAUNCH_ENV = "MOBALAB_LAUNCH"
LAUNCHERS = ("driver", "cupy")

_SCALAR_TYPES = {
    "int": np.int32,
    "int32_t": np.int32,
    "unsigned": np.uint32,
    "unsigned int": np.uint32,
    "uint32_t": np.uint32,
    "long long": np.int64,
    "long long int": np.int64,
    "int64_t": np.int64,
    "unsigned long long": np.uint64,
    "uint64_t": np.uint64,
    "float": np.float32,
    "double": np.float64,
    "bool": np.bool_,
}

TENSOR_MAP = "moba_tensor_map"  # the C type of a tensor-map parameter (cuda/decode_common.cuh)

_KERNEL = re.compile(
    r"(?:extern\s+\"C\"\s+)?(?:template\s*<[^>]*>\s*)?__global__\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?"
    r"void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(([^)]*)\)",
    re.S,
)


@dataclass(frozen=True)
class Param:
    name: str
    ctype: str  # normalised C type without const/__restrict__/name
    pointer: bool


def _parse_param(text: str) -> Param:
    t = re.sub(r"\b(const|__restrict__|volatile|__grid_constant__)\b", " ", text)
    t = " ".join(t.replace("*", " * ").split())
    pointer = "*" in t
    words = t.replace("*", " ").split()
    if len(words) < 2:
        raise ValueError(f"cannot parse kernel parameter {text!r}")
    return Param(name=words[-1], ctype=" ".join(words[:-1]), pointer=pointer)


_FUNC_MACRO = re.compile(r"^[ \t]*#[ \t]*define[ \t]+(\w+)\(([^)]*)\)(.*)$", re.M)
_DIRECTIVE = re.compile(r"^[ \t]*#.*$", re.M)


def _macro_args(text: str, open_paren: int) -> list[str]:
    """Arguments of the macro call whose ``(`` is at ``open_paren``, split at top-level commas."""
    depth, start, args = 0, open_paren + 1, []
    for i in range(open_paren, len(text)):
        c = text[i]
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                args.append(text[start:i].strip())
                return args
        elif c == "," and depth == 1:
            args.append(text[start:i].strip())
            start = i + 1
    raise ValueError(f"unbalanced macro call: {text[open_paren - 40:open_paren + 40]!r}")


def _expand(params: list[str], args: list[str], body: str) -> str:
    """``body`` with each macro parameter replaced by its argument (not inside string literals), then ``##``
    pasted."""
    values = dict(zip(params, args, strict=True))
    text = re.sub(r'"[^"]*"|\b\w+\b', lambda m: values.get(m.group(0), m.group(0)), body)
    return re.sub(r"\s*##\s*", "", text)


def _parse_signatures(text: str) -> dict[str, tuple[Param, ...]]:
    """``{kernel name: parameters}`` of the ``__global__`` functions in CUDA source ``text``: literal ones and
    those that function-like macros define (one per call of such a macro outside preprocessor lines)."""
    text = text.replace("\\\n", " ")  # line splicing comes before comments (C translation phases 2, 3)
    text = re.sub(r"//[^\n]*|/\*.*?\*/", "", text, flags=re.S)
    macros = {m.group(1): ([p.strip() for p in m.group(2).split(",")], m.group(3))
              for m in _FUNC_MACRO.finditer(text) if "__global__" in m.group(3)}
    code = _DIRECTIVE.sub("", text)
    found = list(_KERNEL.findall(code))
    for macro, (params, body) in macros.items():
        for call in re.finditer(rf"\b{macro}\s*\(", code):
            args = _macro_args(code, call.end() - 1)
            if len(args) != len(params):
                raise ValueError(f"{macro} takes {len(params)} arguments {params}, got {args}")
            found += _KERNEL.findall(_expand(params, args, body))
    out = {}
    for name, params in found:
        if name in out:
            raise ValueError(f"kernel {name} is defined twice")
        params = params.strip()
        out[name] = tuple(_parse_param(p) for p in params.split(",")) if params and params != "void" else ()
    return out


@functools.cache
def signatures(filename: str) -> dict[str, tuple[Param, ...]]:
    """``{kernel name: parameters}`` for every ``__global__`` function in ``cuda/<filename>`` (headers
    inlined), including those instantiated through a kernel-defining macro."""
    return _parse_signatures(source(filename))


def _base_name(kernel: str) -> str:
    return kernel.split("<", 1)[0].strip()


@functools.cache
def _param_kinds(filename: str, kernel: str) -> tuple[tuple[str, str, bool, type | None], ...]:
    """Per parameter of ``kernel``: (name, C type, pointer, the numpy scalar type a scalar needs or None), read once
    (:func:`check_args` runs at every launch, some 20 per training step)."""
    sig = signatures(filename).get(_base_name(kernel))
    if sig is None:
        raise KeyError(f"no __global__ function {kernel!r} in cuda/{filename}")
    return tuple((p.name, p.ctype, p.pointer,
                  None if p.pointer else TensorMap2D if p.ctype == TENSOR_MAP else _SCALAR_TYPES.get(p.ctype))
                 for p in sig)


def check_args(filename: str, kernel: str, args) -> tuple:
    """Validate ``args`` against the signature of ``kernel`` and return what CuPy should receive.

    Raises TypeError naming the parameter, the C type and what was given.
    """
    # Whether an argument is accepted depends on its type only, except that a tensor must be contiguous: once a
    # kernel's arguments of some types have passed, arguments of the same types need only the tensors looked at.
    key = (filename, kernel, tuple(map(type, args)))
    accepted = _ACCEPTED.get(key)
    if accepted is None:
        out = _check_all(filename, kernel, args)
        kinds = _param_kinds(filename, kernel)
        _ACCEPTED[key] = (tuple(i for i, (kind, a) in enumerate(zip(kinds, args, strict=True))
                                if kind[2] and not isinstance(a, int)),
                          tuple(i for i, kind in enumerate(kinds) if kind[3] is TensorMap2D))
        return out
    tensors, maps = accepted
    out = list(args)
    for i in tensors:
        a = out[i]
        if not a.is_contiguous():
            raise TypeError(f"{kernel}: pointer argument {_param_kinds(filename, kernel)[i][0]} must be contiguous")
        out[i] = a.data_ptr()
    for i in maps:
        out[i] = out[i].encoded()
    return tuple(out)


_ACCEPTED: dict = {}  # (filename, kernel, argument types) -> positions of the tensors and of the tensor maps


def _check_all(filename: str, kernel: str, args) -> tuple:
    """:func:`check_args`, every argument looked at."""
    kinds = _param_kinds(filename, kernel)
    if len(args) != len(kinds):
        raise TypeError(f"{kernel}: expected {len(kinds)} arguments {[k[0] for k in kinds]}, got {len(args)}")
    out = []
    for (name, ctype, pointer, want), a in zip(kinds, args, strict=True):
        if pointer:
            if type(a) is _Tensor or (hasattr(a, "data_ptr") and hasattr(a, "is_contiguous")):
                if not a.is_contiguous():
                    raise TypeError(f"{kernel}: pointer argument {name} must be contiguous")
                out.append(a.data_ptr())
            elif isinstance(a, int) and not isinstance(a, bool):
                out.append(a)
            else:
                raise TypeError(f"{kernel}: pointer argument {name} ({ctype}*) got {type(a).__name__}")
        else:
            if want is None:
                raise TypeError(f"{kernel}: parameter {name} has C type {ctype!r} that check_args does not know")
            if type(a) is not want:
                raise TypeError(
                    f"{kernel}: scalar {name} is C {ctype!r} and needs {want.__name__}, "
                    f"got {type(a).__name__} ({a!r})"
                )
            out.append(a.encoded() if want is TensorMap2D else a)
    return tuple(out)


@dataclass(slots=True)  # not frozen: a frozen init costs ~1.5 us more, and a step builds ~25 plans
class Launch:
    """One kernel launch: kernel ``kernel`` of ``cuda/<source>``, its grid and block, its arguments (as
    :func:`check_args` takes them), its dynamic shared memory in bytes and extra preprocessor ``defines``
    (``"NAME=value"``) of the module it comes from: a build option that changes a kernel without changing
    its name or signature (each set of defines is its own compiled module). ``dependent``: a programmatic dependent
    launch (the driver launcher's cuLaunchKernelEx with programmatic stream serialization; sm_90 and later): the
    kernel may start while the previous one on the stream runs, once that one's CTAs have all run
    ``griddepcontrol.launch_dependents``, and its CTAs wait before they read what it writes, in
    ``griddepcontrol.wait`` or on counters its CTAs release (the kernel's own business: without the wait it would
    read too early); CuPy's call launches it as an ordinary launch, which the same kernel also runs correctly."""

    source: str
    kernel: str
    grid: tuple[int, ...]
    block: tuple[int, ...]
    args: tuple
    shared_mem: int = 0
    defines: tuple[str, ...] = ()
    dependent: bool = False


@functools.lru_cache(maxsize=4096)
def i32(value) -> np.int32:
    """``np.int32(value)``, kept: the plans pass every int scalar as one (:func:`check_args`), some 150 per training
    step, and numpy takes about 0.5 us to make each, several times the lookup here (numpy scalars are immutable)."""
    return np.int32(value)


@functools.lru_cache(maxsize=1024)
def i64(value) -> np.int64:
    """``np.int64(value)``, kept (as :func:`i32`)."""
    return np.int64(value)


def kernel_ready(x):
    """``x`` contiguous and 16-byte aligned (the kernels read 16-byte vectors), copying only when needed."""
    x = x.contiguous()
    if x.data_ptr() % 16 != 0:
        x = x.clone()
    return x


@functools.cache
def _layout(filename: str, kernel: str) -> tuple[struct.Struct, tuple[int, ...]]:
    """The kernel's parameters as one C struct (pointers as 64-bit addresses, scalars at their numpy type's native
    size and alignment): its packer and each parameter's offset in it."""
    # a tensor map as 128 raw bytes: cuLaunchKernel copies each parameter from its own pointer to the offset the
    # kernel declares (64-byte aligned there), so its place in this host-side block needs no alignment
    codes = ["Q" if p.pointer else f"{MAP_BYTES}s" if p.ctype == TENSOR_MAP else np.dtype(_SCALAR_TYPES[p.ctype]).char
             for p in signatures(filename)[_base_name(kernel)]]
    offsets = tuple(struct.calcsize("@" + "".join(codes[:i + 1])) - struct.calcsize("@" + c)
                    for i, c in enumerate(codes))
    return struct.Struct("@" + "".join(codes)), offsets


class _Blocks(threading.local):
    """Per thread and kernel: a parameter block and the array of pointers into it that cuLaunchKernel reads (it
    copies the values at the launch, so a block is refilled by the next launch of its kernel on its thread)."""

    def __init__(self):
        self.by_kernel: dict = {}

    def get(self, filename: str, kernel: str):
        key = (filename, kernel)
        entry = self.by_kernel.get(key)
        if entry is None:
            packer, offsets = _layout(filename, kernel)
            block = ctypes.create_string_buffer(max(packer.size, 1))
            base = ctypes.addressof(block)
            pointers = (ctypes.c_void_p * max(len(offsets), 1))(*(base + o for o in offsets))
            entry = self.by_kernel[key] = (packer, block, pointers, ctypes.addressof(pointers))
        return entry


_BLOCKS = _Blocks()
_INVALID_CONTEXT = 201  # CUDA_ERROR_INVALID_CONTEXT: a thread that has made no CUDA call yet


def resolve_launcher(launcher: str | None = None) -> str:
    """How :func:`launch` starts kernels: "driver" (the default: the arguments packed into one C struct here,
    then cuLaunchKernel) or "cupy" (CuPy's kernel call); None reads ``$MOBALAB_LAUNCH``."""
    return choice_or_env("kernel launcher", launcher, LAUNCHERS, LAUNCH_ENV, "driver")


def launch(plan: Launch) -> None:
    """Check ``plan.args`` and launch the kernel on torch's current stream.

    A step of MoBA attention is some 25 launches, and at 8K its forward takes about a millisecond of GPU time, so
    the host's cost per launch shows: the default launcher packs the checked arguments into the kernel's
    parameter block itself (one ``struct.pack_into``) and calls cuLaunchKernel, instead of CuPy's call, which
    wraps every argument in an object first. ``$MOBALAB_LAUNCH=cupy`` selects CuPy's call.
    """
    cargs = check_args(plan.source, plan.kernel, plan.args)
    if resolve_launcher() == "driver":
        # A kernel launched before from the same module with the same shared memory on this device: its CUfunction
        # as it was (the compile cache, the shared-memory limit and the function lookup cost ~5 us per launch).
        device, stream = current_stream()
        key = (plan.source, plan.kernel, plan.defines, plan.shared_mem, device)
        fptr = _READY.get(key)
        if fptr is None:
            fn = _compiled(plan)
            fptr = _READY[key] = _function_ptr(fn, device)
        if not _driver_launch(fptr, plan, cargs, stream):
            _launch_without_context(_compiled(plan), plan, cargs, device, fptr, stream)
    else:
        _cupy_launch(_compiled(plan), plan, cargs)
    if _after_launch is not None:
        _after_launch(plan)


_READY: dict = {}  # (source, kernel, defines, shared memory, device) -> CUfunction of a kernel launch() has started
_after_launch = None  # a callable(plan) run after every launch() (scripts/profile_host.py records events with it)


def _compiled(plan: Launch):
    """The compiled kernel of ``plan``, its module built with the plan's defines, opted into its shared memory."""
    return get_kernel(plan.source, plan.kernel, defines=_module_defines(plan.kernel, plan.defines),
                      max_dynamic_smem=int(plan.shared_mem))


def _dim3(d) -> tuple[int, int, int]:
    return int(d[0]), int(d[1]) if len(d) > 1 else 1, int(d[2]) if len(d) > 2 else 1


def _driver_launch(fptr: int, plan: Launch, cargs: tuple, stream: int) -> bool:
    """cuLaunchKernel of CUfunction ``fptr`` with ``plan``'s geometry and ``cargs`` packed into the kernel's
    parameter block, on ``stream``; False (nothing launched) where this thread has no current CUDA context."""
    packer, params, _, params_addr = _BLOCKS.get(plan.source, plan.kernel)
    packer.pack_into(params, 0, *cargs)
    gx, gy, gz = _dim3(plan.grid)
    bx, by, bz = _dim3(plan.block)
    if plan.dependent:
        return _driver_launch_dependent(fptr, (gx, gy, gz), (bx, by, bz), int(plan.shared_mem), stream, params_addr)
    driver = cupy().cuda.driver
    try:
        driver.launchKernel(fptr, gx, gy, gz, bx, by, bz, int(plan.shared_mem), stream, params_addr, 0)
    except driver.CUDADriverError as exc:
        if getattr(exc, "status", None) != _INVALID_CONTEXT:
            raise
        return False
    return True


ATTR_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CUlaunchAttributeID (cuda.h)


class _LaunchAttrValue(ctypes.Union):  # CUlaunchAttributeValue: a 64-byte union
    _fields_ = [("pad", ctypes.c_char * 64), ("programmatic", ctypes.c_int), ("align", ctypes.c_uint64)]


class _LaunchAttr(ctypes.Structure):  # CUlaunchAttribute: the id, padding to 8 bytes, the value
    _fields_ = [("id", ctypes.c_uint32), ("pad", ctypes.c_char * 4), ("value", _LaunchAttrValue)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint32 * 3), ("block", ctypes.c_uint32 * 3), ("shared_mem", ctypes.c_uint32),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttr)), ("num_attrs", ctypes.c_uint32)]


@functools.cache
def _launch_kernel_ex():
    fn = ctypes.CDLL("libcuda.so.1").cuLaunchKernelEx
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    return fn


@functools.lru_cache(maxsize=256)
def _dependent_config(grid, block, shared_mem: int, stream: int) -> _LaunchConfig:
    """The CUlaunchConfig of a programmatic dependent launch (its one attribute kept alive by the config), made
    once per geometry and stream: a decode step launches the same one every token, and the driver only reads it."""
    attr = _LaunchAttr(id=ATTR_PROGRAMMATIC_STREAM_SERIALIZATION)
    attr.value.programmatic = 1
    config = _LaunchConfig((ctypes.c_uint32 * 3)(*grid), (ctypes.c_uint32 * 3)(*block), shared_mem,
                           ctypes.c_void_p(stream), ctypes.pointer(attr), 1)
    config._attr = attr
    return config


def _driver_launch_dependent(fptr: int, grid, block, shared_mem: int, stream: int, params_addr: int) -> bool:
    """cuLaunchKernelEx with programmatic stream serialization (see :class:`Launch`); False where this thread has
    no current CUDA context."""
    err = _launch_kernel_ex()(ctypes.byref(_dependent_config(grid, block, shared_mem, stream)),
                              ctypes.c_void_p(fptr), ctypes.c_void_p(params_addr), None)
    if err == _INVALID_CONTEXT:
        return False
    if err != 0:
        raise RuntimeError(f"cuLaunchKernelEx (programmatic dependent launch) failed with CUresult {err}")
    return True


def _cupy_launch(fn, plan: Launch, cargs: tuple) -> None:
    """CuPy's call of compiled kernel ``fn`` on torch's current stream (which cannot pass a tensor map, the copy
    engine's 128-byte descriptor: such a kernel raises TypeError)."""
    if any(isinstance(a, bytes) for a in cargs):
        raise TypeError(f"{plan.kernel}: a kernel with tensor-map parameters needs the driver launcher "
                        f"(${LAUNCH_ENV}=driver, the default)")
    fn(_dim3(plan.grid), _dim3(plan.block), cargs, shared_mem=int(plan.shared_mem), stream=torch_stream())


def _launch_without_context(fn, plan: Launch, cargs: tuple, device: int, fptr: int, stream: int) -> None:
    """A driver launch found no current context on this thread: CuPy's call makes the device's current first and
    launches; a kernel with tensor maps, which CuPy cannot pass, gets the device's primary context made current
    here and the driver launch again."""
    if not any(isinstance(a, bytes) for a in cargs):
        _cupy_launch(fn, plan, cargs)
        return
    cupy().cuda.runtime.setDevice(device)
    if not _driver_launch(fptr, plan, cargs, stream):
        raise RuntimeError(f"{plan.kernel}: no CUDA context on this thread after making device {device} current")


@functools.cache
def _module_defines(kernel: str, defines: tuple[str, ...]) -> tuple[str, ...]:
    """The defines of ``kernel``'s module: its head dim, then ``defines``. One head dim per module (-DMOBA_HEAD_DIM,
    cuda/ptx.cuh): compiling every head dim of a source at once takes several times as long; kernels without a
    head dim get a module of their own (no head dim is 1). Any dynamic shared-memory request opts the kernel in
    (get_kernel): static + dynamic above 48 KB fails otherwise, even when dynamic <= 48 KB."""
    dim = re.search(r"_d(\d+)(?:_|$)", kernel)
    return (f"MOBA_HEAD_DIM={dim.group(1) if dim else 1}", *defines)


def start(fn, plan: Launch, cargs: tuple) -> None:
    """Start compiled kernel ``fn`` with ``plan``'s geometry and the checked arguments ``cargs``
    (:func:`check_args`) on torch's current stream, by the launcher :func:`resolve_launcher` names."""
    if resolve_launcher() == "driver":
        device, stream = current_stream()
        fptr = _function_ptr(fn, device)
        if not _driver_launch(fptr, plan, cargs, stream):
            _launch_without_context(fn, plan, cargs, device, fptr, stream)
        return
    _cupy_launch(fn, plan, cargs)


_FUNCTIONS: dict = {}


def _function_ptr(fn, device: int) -> int:
    """The CUfunction of CuPy kernel ``fn`` on ``device`` (a RawKernel holds one per device, loaded on first use),
    kept: looking it up asks the runtime for the current device."""
    key = (id(fn), device)  # fn lives as long as the process (_build memoises it), so id(fn) stays its own
    ptr = _FUNCTIONS.get(key)
    if ptr is None:
        ptr = _FUNCTIONS[key] = getattr(fn, "kernel", fn).ptr
    return ptr
