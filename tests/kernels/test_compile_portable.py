"""Every kernel source compiles for sm_80 (the Ampere instruction set of sm_80 / 86 / 89 GPUs), where the runtime
compiles for the device's own target (``_build.arch_options``): sm_90 instructions without an older form must sit
behind ``__CUDA_ARCH_FEAT_SM90_ALL`` or ``MOBA_SM90`` (ptx.cuh), or ptxas rejects them for .target sm_80. One head
dim per source (``-DMOBA_HEAD_DIM=64``; the instructions do not depend on it) keeps CI short; the sm_90a builds,
with their register budgets, are test_compile.py's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mobalab.kernels._build import CUDA_DIR, NVRTC_OPTIONS, arch_options, source

sys.path.insert(0, str(Path(__file__).parent))
from _background import background_fixture  # noqa: E402

CU_FILES = sorted(p.name for p in CUDA_DIR.iterdir() if p.name.endswith(".cu"))


def _compile(name: str) -> tuple[int, str]:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / name
        src.write_text(source(name))
        proc = subprocess.run([shutil.which("nvcc"), *NVRTC_OPTIONS, "-gencode=arch=compute_80,code=sm_80", "-cubin",
                               "-DMOBA_HEAD_DIM=64", "-o", str(src.with_suffix(".cubin")), str(src)],
                              capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def _compile_all() -> dict[str, tuple[int, str]]:
    with ThreadPoolExecutor(max_workers=max(1, min(len(CU_FILES), os.cpu_count() or 1))) as pool:
        return dict(zip(CU_FILES, pool.map(_compile, CU_FILES), strict=True))


compiled_sm80 = background_fixture("compiled_sm80", _compile_all)


def test_the_target_follows_the_device():
    assert arch_options((9, 0)) == ("-arch=sm_90a",)
    for capability in ((8, 0), (8, 6), (8, 9), (10, 0), (12, 0)):
        assert arch_options(capability) == ()  # CuPy's own -arch=sm_<cc>
    assert not any(o.startswith("-arch") for o in NVRTC_OPTIONS)


@pytest.mark.nvcc
@pytest.mark.parametrize("name", CU_FILES)
def test_compiles_for_sm80(name, compiled_sm80):
    rc, log = compiled_sm80[name]
    assert rc == 0, f"nvcc -arch sm_80 failed on {name}:\n{log}"
