"""Every kernel source compiles under plain nvcc for sm_90a, with no register spills and no stack frame.

Each ``cuda/*.cu`` file is taken as NVRTC sees it (``_build.source``: local headers inlined) and compiled to
a cubin with the flags of shared/reference/toolkit-conventions.md §2.2 (``-gencode`` rather than
``-arch=sm_90a -c``, which runs a plain compute_90 pass that rejects sm_90a instructions). ptxas' ``-v``
report gives registers, shared memory, stack frame and spills per function; spills or a stack frame mean
a register array went to local memory, a silent slowdown that these tests turn into a failure.
Files compile in parallel (CI has 2 cores); run with ``-s`` to see the resource table.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mobalab.kernels._build import CUDA_DIR, source

NVCC_FLAGS = ["-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-cubin", "--use_fast_math",
              "-Xptxas", "-v"]
CU_FILES = sorted(p.name for p in CUDA_DIR.iterdir() if p.name.endswith(".cu"))

_FUNC = re.compile(r"Function properties for (\S+)")
_ENTRY = re.compile(r"Compiling entry function '(\S+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas(log: str) -> dict[str, dict[str, int]]:
    """``{function: {registers, smem, stack, spill_stores, spill_loads}}`` from a ptxas -v log."""
    funcs: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current = m.group(1)
            funcs.setdefault(current, {})
        elif m := _FUNC.search(line):
            current = m.group(1)
            funcs.setdefault(current, {})
        elif (m := _FRAME.search(line)) and current is not None:
            funcs[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                                  spill_loads=int(m.group(3)))
        elif (m := _USED.search(line)) and current is not None:
            funcs[current].update(registers=int(m.group(1)), smem=int(m.group(2) or 0))
    return funcs


def _compile(name: str) -> tuple[int, str]:
    nvcc = shutil.which("nvcc")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / name
        src.write_text(source(name))
        proc = subprocess.run([nvcc, *NVCC_FLAGS, "-o", str(src.with_suffix(".cubin")), str(src)],
                              capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def compiled() -> dict[str, tuple[int, str]]:
    workers = max(1, min(len(CU_FILES), os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(CU_FILES, pool.map(_compile, CU_FILES), strict=True))


def test_there_are_kernel_sources():
    assert "topk.cu" in CU_FILES and "centroids.cu" in CU_FILES


def test_parse_ptxas_reads_spills_and_registers():
    log = (
        "ptxas info    : Compiling entry function 'kern' for 'sm_90a'\n"
        "ptxas info    : Function properties for kern\n"
        "    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 4096 bytes smem, 400 bytes cmem[0]\n"
    )
    assert parse_ptxas(log) == {
        "kern": dict(stack=16, spill_stores=8, spill_loads=4, registers=255, smem=4096)
    }


@pytest.mark.nvcc
@pytest.mark.parametrize("name", CU_FILES)
def test_compiles_without_spills(name, compiled):
    rc, log = compiled[name]
    assert rc == 0, f"nvcc failed on {name}:\n{log}"
    funcs = parse_ptxas(log)
    entries = _ENTRY.findall(log)
    assert entries, f"{name}: no kernel entry points in the ptxas report:\n{log}"
    print(f"\n{name}: {'kernel':<40} {'regs':>5} {'smem':>6} {'stack':>6} {'spill':>6}")
    for fn in entries:
        r = funcs[fn]
        print(f"{'':<{len(name) + 2}}{fn:<40} {r.get('registers', 0):>5} {r.get('smem', 0):>6} "
              f"{r.get('stack', 0):>6} {r.get('spill_stores', 0) + r.get('spill_loads', 0):>6}")
    bad = {fn: r for fn, r in funcs.items()
           if r.get("stack", 0) or r.get("spill_stores", 0) or r.get("spill_loads", 0)}
    assert not bad, f"{name}: stack frame or register spills: {bad}"
