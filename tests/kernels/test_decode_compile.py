"""cuda/decode.cu compiles under nvcc for sm_90a with every entry point, no spills, no stack frame.

The source is taken as NVRTC sees it (``_build.source``) and compiled with the project's NVRTC options
(``_build.NVRTC_OPTIONS``: C++17, fast math) for ``-gencode=arch=compute_90a,code=sm_90a``. ptxas' ``-v``
report gives registers, shared memory, stack frame and spills per kernel; run with ``-s`` to see them.
Registers must stay within what the kernels' ``__launch_bounds__`` promise (2 routing CTAs of 256 threads,
4 attention CTAs of 128 threads per SM: at most 128 registers each).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mobalab.kernels import _cuda_decode as C
from mobalab.kernels._build import NVRTC_OPTIONS, source
from mobalab.kernels._launch import signatures

ENTRY_POINTS = [f"moba_decode_{kind}_{t}_d{d}" for kind in ("route", "attn") for t in ("bf16", "fp16")
                for d in (64, 128)]
_ENTRY = re.compile(r"Compiling entry function '(\S+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def _flags() -> list[str]:
    keep = [o for o in NVRTC_OPTIONS if not o.startswith("-arch")]  # -gencode instead (see test_compile.py)
    return [*keep, "-gencode=arch=compute_90a,code=sm_90a", "-cubin", "-Xptxas", "-v"]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict[str, dict[str, int]]:
    tmp = Path(tmp_path_factory.mktemp("decode_nvcc"))
    src = tmp / "decode.cu"
    src.write_text(source("decode.cu"))
    proc = subprocess.run([shutil.which("nvcc"), *_flags(), "-o", str(tmp / "decode.cubin"), str(src)],
                          capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"nvcc failed on decode.cu:\n{log}"
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current = m.group(1)
            out[current] = {}
        elif (m := _FRAME.search(line)) and current:
            out[current].update(stack=int(m.group(1)), spills=int(m.group(2)) + int(m.group(3)))
        elif (m := _USED.search(line)) and current:
            out[current].update(registers=int(m.group(1)), smem=int(m.group(2) or 0))
    print(f"\n{'kernel':<32} {'regs':>5} {'smem':>5} {'stack':>6} {'spill':>6}")
    for name, r in sorted(out.items()):
        print(f"{name:<32} {r.get('registers', 0):>5} {r.get('smem', 0):>5} {r.get('stack', 0):>6} "
              f"{r.get('spills', 0):>6}")
    return out


def test_entry_points_match_the_wrapper():
    assert sorted(signatures("decode.cu")) == sorted(ENTRY_POINTS)
    assert C.ROUTE_THREADS == 256 and C.ATTN_THREADS == 128  # the #defines the plans mirror
    text = source("decode.cu")
    for name, value in (("DEC_ROUTE_THREADS", C.ROUTE_THREADS), ("DEC_ROUTE_TILE", C.ROUTE_TILE),
                        ("DEC_ATTN_THREADS", C.ATTN_THREADS), ("DEC_ATTN_CHUNK", C.ATTN_CHUNK),
                        ("DEC_ATTN_ROWS", C.ATTN_ROWS), ("DEC_ATTN_MAX_ROWS", C.ATTN_MAX_ROWS)):
        assert re.search(rf"#define {name} {value}\b", text), name


@pytest.mark.nvcc
def test_decode_compiles_without_spills(report):
    assert sorted(report) == sorted(ENTRY_POINTS)
    for name, r in report.items():
        assert r.get("stack", 0) == 0 and r.get("spills", 0) == 0, (name, r)
        assert r["registers"] <= 128, (name, r)
        assert r.get("smem", 0) == 0, (name, r)  # all shared memory is dynamic, sized by the plan
