"""The host-emulation harnesses (``host_emulation/*_harness.cpp``) from the tests: build one, run launches in it.

A harness is compiled once per test module (:func:`harness_fixture`) with AddressSanitizer, next to the kernel
text it includes (the ``cuda/*.cu`` source as NVRTC sees it, written into the build folder under the name the
harness includes). The manifest harnesses (``host_emulation/harness_io.h``) take a list of launches: every
tensor a launch names is written to a file, the launches run in order on the host, and the files are read back
into the tensors.

Test modules are imported with ``--import-mode=importlib``: they put this folder on ``sys.path`` and import
``_emulation``. A harness build (5-50 s of a C++ compiler) starts in the background once the tests are collected
(``_background``).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from _background import background_fixture, scratch_dir

from mobalab.kernels._launch import check_args
from mobalab.kernels._tensor_map import TensorMap2D

HOST_EMULATION = Path(__file__).parent / "host_emulation"
CXX = shutil.which("g++") or shutil.which("clang++")
NEEDS_CXX = pytest.mark.skipif(CXX is None, reason="needs a C++ compiler (g++ or clang++)")
# no _FORTIFY_SOURCE: its checked longjmp rejects the jumps between the coroutine stacks of cuda_host.h (where a
# switch is a longjmp). -Og, not -O1: half the compile time of a harness (the decode-split harness 15 s against 30 s
# here) for about the same run time, so less CPU time in all.
CXX_FLAGS = ("-std=c++17", "-Og", "-U_FORTIFY_SOURCE", "-fno-strict-aliasing", "-fsanitize=address")


def build_harness(build: Path, harness: str, files: dict[str, str], flags: tuple[str, ...] = ()) -> Path:
    """Compile ``host_emulation/<harness>.cpp`` into ``build/<harness>`` after writing ``files`` (name -> text:
    the kernel source and any header it includes) into ``build``; skips the test without a C++ compiler."""
    if CXX is None:
        pytest.skip("needs a C++ compiler (g++ or clang++)")
    for name, text in files.items():
        (build / name).write_text(text)
    exe = build / harness
    cmd = [CXX, *CXX_FLAGS, *flags, f"-I{HOST_EMULATION}", f"-I{build}", "-o", str(exe),
           str(HOST_EMULATION / f"{harness}.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return exe


def harness_fixture(harness: str, files, flags: tuple[str, ...] = (), name: str = "harness"):
    """The module-scoped fixture ``name`` of a test module (``harness = harness_fixture(...)``): the executable of
    :func:`build_harness`, built once per module, in the background (``_background``); ``files`` returns the
    files to write (called at build time)."""
    return background_fixture(name, lambda: build_harness(scratch_dir(harness), harness, files(), flags), depth=2)


def poison(bufs: dict[str, torch.Tensor]) -> None:
    """NaN in every float buffer, -7 in every integer one: an element a kernel does not write stays visible."""
    for t in bufs.values():
        t.fill_(float("nan") if t.is_floating_point() else -7)


def storage_bytes(t: torch.Tensor) -> torch.Tensor:
    """A uint8 tensor over the whole storage of ``t`` (shared: writing it writes every view)."""
    return torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage())


def _arg_tokens(launch, storages: dict[int, torch.Tensor]) -> list[str]:
    check_args(launch.source, launch.kernel, launch.args)  # exactly what CuPy would receive
    args = []
    for a in launch.args:
        if isinstance(a, TensorMap2D):  # the harness models the map over the tensor's buffer
            base = a.tensor.untyped_storage().data_ptr()
            storages.setdefault(base, a.tensor)
            args.append(f"t:{list(storages).index(base)}:{a.tensor.data_ptr() - base}:{a.rows}:{a.cols}:"
                        f"{a.box_rows}:{a.box_cols}")
        elif isinstance(a, torch.Tensor):
            assert a.is_contiguous()
            base = a.untyped_storage().data_ptr()
            storages.setdefault(base, a)
            args.append(f"p:{list(storages).index(base)}:{a.data_ptr() - base}")
        elif isinstance(a, np.float32):
            args.append(f"f:{int(a.view(np.uint32))}")
        elif type(a) is int:  # check_args lets a plain int through for a pointer alone: a null pointer
            assert a == 0, (launch.kernel, a)
            args.append("z:0")
        else:
            assert isinstance(a, (np.int32, np.int64)), (launch.kernel, a)
            args.append(f"i:{int(a)}")
    return args


def run_emulated(exe: Path, workdir: Path, launches, seed: int) -> None:
    """Execute ``launches`` (``_launch.Launch``) in the manifest harness ``exe``, launch
    l with seed ``seed + l``; every tensor they name is updated in place. Arguments are tensors (contiguous),
    np.int32, np.int64, np.float32 and the int 0 (a null pointer)."""
    storages: dict[int, torch.Tensor] = {}
    tokens = [(launch, _arg_tokens(launch, storages)) for launch in launches]
    lines = [f"seed {seed}", f"buffers {len(storages)}"]
    for i, t in enumerate(storages.values()):
        raw = storage_bytes(t).numpy()
        src, dst = workdir / f"buf{i}.in", workdir / f"buf{i}.out"
        raw.tofile(src)
        lines.append(f"{i} {raw.size} {src} {dst}")
    lines.append(f"launches {len(tokens)}")
    for launch, args in tokens:
        grid, block = (*launch.grid, 1, 1)[:3], (*launch.block, 1, 1)[:3]
        lines.append(" ".join([launch.kernel, *map(str, grid), *map(str, block), str(launch.shared_mem),
                               str(len(args)), *args]))
    manifest = workdir / "manifest.txt"
    manifest.write_text("\n".join(lines) + "\n")
    proc = subprocess.run([str(exe), str(manifest)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for i, t in enumerate(storages.values()):
        storage_bytes(t).copy_(torch.from_numpy(np.fromfile(workdir / f"buf{i}.out", dtype=np.uint8)))
