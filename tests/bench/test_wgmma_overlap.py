"""scripts/wgmma_overlap.cu compiles for sm_90a with its warpgroup MMAs unserialised, no spills and no stack frame
(its tables need an H100 / H200: scripts/wgmma_overlap.py, recorded in RESULTS.md); the driver's launch sizes
match the source's tiles."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mobalab.kernels._build import CUDA_DIR

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "kernels"))
from _ptxas_report import parse_ptxas, serialized_wgmma  # noqa: E402

SOURCE = ROOT / "scripts" / "wgmma_overlap.cu"
SCRIPT_NAME = "wgmma_overlap"  # the conftest's `script` fixture loads it


@pytest.mark.nvcc
def test_probe_compiles_without_spills_or_serialised_wgmma(tmp_path):
    proc = subprocess.run([shutil.which("nvcc"), "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-cubin",
                           "--use_fast_math", "-Xptxas", "-v", f"-I{CUDA_DIR}", "-o", str(tmp_path / "p.cubin"),
                           str(SOURCE)], capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert serialized_wgmma(log) == []
    report = parse_ptxas(log)
    assert set(report) == {"overlap_ss", "pingpong_1", "pingpong_2"}
    for name, r in report.items():
        assert r["stack"] == 0 and r["spill_stores"] == 0 and r["spill_loads"] == 0, (name, r)


def test_driver_shared_memory_matches_the_source(script):
    """The driver's dynamic shared-memory sizes cover the tiles the kernels address (1 KB alignment slack)."""
    text = SOURCE.read_text()
    assert "sw128_tile_bytes(64, 128)" in text and "sw128_tile_bytes(128, 128)" in text
    assert "ss = sb + kBTile" in text and "4 * kQTile + kBTile + 256 * 256" in text
    assert "sb = s0 + 8 * kQTile" in text
    assert script.TILE == 64 * 128 * 2 and script.B_TILE == 128 * 128 * 2
    assert script.OVERLAP_SMEM == 4 * script.TILE + script.B_TILE + 256 * 256 + 1024
    assert script.PINGPONG_SMEM == 8 * script.TILE + script.B_TILE + 1024
