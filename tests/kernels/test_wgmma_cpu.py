"""The Hopper warpgroup MMA helpers (cuda/wgmma.cuh) and their probe (cuda/wgmma_probe.cu) without a GPU.

* The probe's launch plans pass ``_launch.check_args`` against the CUDA signature, and bad shapes are refused.
* The encodings, compiled by nvcc into a host program, give the values derived by hand below from NVIDIA's
  PTX ISA, chapter "Asynchronous Warpgroup Level Matrix Multiply-Accumulate Instructions" (sections
  "Matrix Descriptor Format", "Shared Memory Matrix Layout" with its 128-byte swizzling mode, and "Register
  Fragments" for the accumulator and the A operand).
* The probe compiles for sm_90a with no spills and no stack frame, and its PTX (and SASS, where cuobjdump is
  installed) holds the warpgroup MMAs.
"""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from mobalab.kernels import _cuda_wgmma_probe as P
from mobalab.kernels._build import CUDA_DIR, source
from mobalab.kernels._launch import check_args, signatures

# ---- launch plans ----

@pytest.mark.parametrize("dtype,n,k,a_source",
                         list(itertools.product((torch.bfloat16, torch.float16), P.WIDTHS, (16, 64, 128), P.A_SOURCES)))
def test_plans_pass_check_args(dtype, n, k, a_source):
    a, b = torch.ones(64, k, dtype=dtype), torch.ones(n, k, dtype=dtype)
    out = torch.empty(64, n)
    plan = P.probe_launch(a, b, out, a_source)
    assert plan.kernel in signatures(P.SOURCE)
    check_args(plan.source, plan.kernel, plan.args)
    assert plan.block == (128,) and plan.grid == (1,)
    # 1024 bytes of alignment slack, then 128-byte rows of A (64) and B (n) per 64-element block of K
    assert plan.shared_mem == 1024 + (1 if k <= 64 else 2) * (64 + n) * 128


@pytest.mark.parametrize("dtype,n,k", list(itertools.product((torch.bfloat16, torch.float16), P.WIDTHS, (16, 64, 128))))
def test_mn_major_plans_pass_check_args(dtype, n, k):
    """The transposed-B probe (the P V path): b is K x N, passed as given; B's tile holds K rows of 128
    bytes per 64 elements of N."""
    a, b = torch.ones(64, k, dtype=dtype), torch.ones(k, n, dtype=dtype)
    plan = P.probe_launch(a, b, torch.empty(64, n), "reg", "mn")
    assert plan.kernel.endswith(f"_n{n}_regmn") and plan.kernel in signatures(P.SOURCE)
    assert check_args(plan.source, plan.kernel, plan.args)[1] == b.data_ptr()
    assert plan.shared_mem == 1024 + (1 if k <= 64 else 2) * 64 * 128 + (n // 64) * k * 128
    with pytest.raises(ValueError, match="a_source='reg'"):
        P.probe_launch(a, b, torch.empty(64, n), "smem", "mn")
    with pytest.raises(ValueError, match="b_major"):
        P.probe_launch(a, b, torch.empty(64, n), "reg", "t")


def test_plans_refuse_bad_inputs():
    a, b, out = torch.ones(64, 32, dtype=torch.bfloat16), torch.ones(64, 32, dtype=torch.bfloat16), torch.empty(64, 64)
    with pytest.raises(ValueError, match="a_source"):
        P.probe_launch(a, b, out, "global")
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        P.probe_launch(a, b.half(), out)
    with pytest.raises(ValueError, match="multiple of 16"):
        P.probe_launch(a[:, :24], b[:, :24], out)
    with pytest.raises(ValueError, match="multiple of 16"):
        P.probe_launch(torch.ones(64, 144, dtype=torch.bfloat16), torch.ones(64, 144, dtype=torch.bfloat16), out)
    with pytest.raises(ValueError, match="N in"):
        P.probe_launch(a, torch.ones(96, 32, dtype=torch.bfloat16), torch.empty(64, 96))
    with pytest.raises(ValueError, match="out must be"):
        P.probe_launch(a, b, torch.empty(64, 64, dtype=torch.float16))


# ---- encodings, by hand ----

HOST_PROGRAM = r'''
#include <cstdio>
#include "wgmma.cuh"
using namespace moba;
int main() {
  // descriptors of the tiles of the probe: A at 0x400 (64 rows), B at 0x400 + 8192 (128 rows)
  for (unsigned s : {0u, 1u, 3u, 4u, 7u})
    std::printf("descA %u %llx\n", s, wgmma_desc_sw128(0x400, s, 64));
  std::printf("descB 5 %llx\n", wgmma_desc_sw128(0x400 + 8192, 5, 128));
  std::printf("desc raw %llx\n", wgmma_desc(0x12340, 0x230, 0x4560, WGMMA_SWIZZLE_64B));
  // every element of a 128 x 128 tile: one line per row of offsets
  for (unsigned r = 0; r < 128; ++r) {
    std::printf("sw %u", r);
    for (unsigned k = 0; k < 128; ++k) std::printf(" %u", sw128_offset(r, k, 128));
    std::printf("\n");
  }
  for (int t = 0; t < 128; ++t) {
    std::printf("acc %d", t);
    for (int i = 0; i < 64; ++i) std::printf(" %d,%d", wgmma_acc_row(t, i), wgmma_acc_col(t, i));
    std::printf("\n");
  }
  return 0;
}
'''


@pytest.fixture(scope="module")
def host_values(tmp_path_factory) -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("needs nvcc")
    tmp = Path(tmp_path_factory.mktemp("wgmma_host"))
    (tmp / "wgmma.cuh").write_text(source("wgmma.cuh"))
    (tmp / "main.cu").write_text(HOST_PROGRAM)
    exe = tmp / "main"
    proc = subprocess.run([nvcc, "-std=c++17", "-I", str(tmp), "-o", str(exe), str(tmp / "main.cu")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return subprocess.run([str(exe)], capture_output=True, text=True, check=True, timeout=60).stdout


@pytest.mark.nvcc
def test_descriptor_bits(host_values):
    got = dict(re.findall(r"^(desc\w* \w+) ([0-9a-f]+)$", host_values, re.M))
    # "Matrix Descriptor Format": start address >> 4 in bits 0-13, LBO >> 4 in 16-29, SBO >> 4 in 32-45,
    # swizzle mode in 62-63 (1 = 128-byte). The swizzled K-major tile: LBO 16 bytes (encoded 1, not used),
    # SBO 1024 bytes (encoded 0x40: 8 rows of 128 bytes). k-step s starts 32 s bytes into its row (16
    # elements of 2 bytes) inside a 64-element block, and block s // 4 starts rows x 128 bytes further.
    swz, lbo, sbo = 1 << 62, 1 << 16, 0x40 << 32
    assert int(got["descA 0"], 16) == swz | sbo | lbo | (0x400 >> 4)  # 0x4000004000010040
    assert int(got["descA 0"], 16) == 0x4000004000010040
    assert int(got["descA 1"], 16) == swz | sbo | lbo | ((0x400 + 32) >> 4)
    assert int(got["descA 3"], 16) == swz | sbo | lbo | ((0x400 + 96) >> 4)
    assert int(got["descA 4"], 16) == swz | sbo | lbo | ((0x400 + 64 * 128) >> 4)  # second K block of A
    assert int(got["descA 7"], 16) == swz | sbo | lbo | ((0x400 + 64 * 128 + 96) >> 4)
    assert int(got["descB 5"], 16) == swz | sbo | lbo | ((0x400 + 8192 + 128 * 128 + 32) >> 4)
    # a raw descriptor with every field distinct: 0x1234, 0x23, 0x456, swizzle 2 (64-byte)
    assert int(got["desc raw"], 16) == (2 << 62) | (0x456 << 32) | (0x23 << 16) | 0x1234


@pytest.mark.nvcc
def test_swizzle_128b_layout(host_values):
    off = np.array([[int(v) for v in line.split()[2:]] for line in re.findall(r"^sw \d+ .*$", host_values, re.M)])
    assert off.shape == (128, 128)
    # "Shared Memory Matrix Layout", 128-byte swizzle: row r of a pattern of 8 rows x 128 bytes keeps its
    # 16-byte chunk c at chunk c ^ (r % 8); K elements 0..63 of row r are in bytes 128 r .. 128 r + 127 of the
    # first block of K, elements 64..127 in the second block, which starts after all 128 rows.
    assert off[0, 0] == 0 and off[0, 1] == 2 and off[0, 8] == 16
    assert off[1, 0] == 128 + 16 and off[1, 8] == 128  # chunks 0 and 1 of row 1 trade places
    assert off[3, 17] == 3 * 128 + (2 ^ 3) * 16 + 2  # element 17: chunk 2, element 1 of it
    assert off[7, 63] == 7 * 128 + (7 ^ 7) * 16 + 14
    assert off[8, 0] == 1024  # row 8 starts the next pattern, unswizzled again: SBO = 1024
    assert off[13, 40] == 13 * 128 + (5 ^ 5) * 16  # element 40 is chunk 5, row 13 is pattern row 5
    assert off[2, 70] == 128 * 128 + 2 * 128 + (0 ^ 2) * 16 + 12  # second block of K
    assert off[127, 127] == 128 * 128 + 127 * 128 + (7 ^ 7) * 16 + 14
    # the same in address bits: bits 4-6 of the unswizzled offset XOR bits 7-9
    r, k = np.meshgrid(np.arange(128), np.arange(128), indexing="ij")
    plain = (k // 64) * 128 * 128 + r * 128 + (k % 64) * 2
    assert (off == plain ^ (((plain >> 7) & 7) << 4)).all()
    # a bijection onto the tile, 8 consecutive elements of K in one 16-byte chunk
    assert sorted(off.ravel() // 2) == list(range(128 * 128))
    assert (off.reshape(128, 16, 8)[..., 1:] - off.reshape(128, 16, 8)[..., :1] == np.arange(2, 16, 2)).all()


@pytest.mark.nvcc
def test_accumulator_mapping(host_values):
    lines = re.findall(r"^acc (\d+) (.*)$", host_values, re.M)
    where = {(int(t), i): tuple(int(x) for x in rc.split(","))
             for t, rest in lines for i, rc in enumerate(rest.split())}
    # "Register Fragments", m64nNk16 f32 accumulator: warp w owns rows 16 w .. 16 w + 15; lane l holds, per
    # 8 columns, (row l / 4, columns 2 (l % 4) and + 1) then the same 8 rows lower
    assert where[(0, 0)] == (0, 0) and where[(0, 1)] == (0, 1) and where[(0, 2)] == (8, 0)
    assert where[(0, 4)] == (0, 8) and where[(5, 0)] == (1, 2)
    assert where[(37, 1)] == (16 + 1, 3) and where[(37, 3)] == (16 + 9, 3)  # warp 1, lane 5
    assert where[(127, 63)] == (63, 127)
    # the 128 threads x 64 floats cover the 64 x 128 accumulator exactly once
    assert sorted(where.values()) == [(r, c) for r in range(64) for c in range(128)]
    # A from registers: register j, half h of the fragment of K columns 16 s .. 16 s + 15 is (row l / 4 +
    # 8 (j % 2), column 16 s + 8 (j / 2) + 2 (l % 4) + h): floats 8 s + 2 j + h of the accumulator
    for t, s, j, h in itertools.product(range(128), range(8), range(4), range(2)):
        row = 16 * (t // 32) + (t % 32) // 4 + 8 * (j % 2)
        col = 16 * s + 8 * (j // 2) + 2 * (t % 4) + h
        assert where[(t, 8 * s + 2 * j + h)] == (row, col)


# ---- sm_90a build ----

_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


@pytest.mark.nvcc
def test_probe_compiles_to_warpgroup_mmas(tmp_path):
    nvcc = shutil.which("nvcc")
    src = tmp_path / "wgmma_probe.cu"
    src.write_text(source("wgmma_probe.cu"))
    flags = ["-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "--use_fast_math"]
    proc = subprocess.run([nvcc, *flags, "-cubin", "-Xptxas", "-v", "-o", str(tmp_path / "p.cubin"), str(src)],
                          capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    entries = re.findall(r"Compiling entry function '(\S+)'", log)
    assert sorted(entries) == sorted(signatures("wgmma_probe.cu"))
    frames = _FRAME.findall(log)
    assert len(frames) == len(entries) and all(f == ("0", "0", "0") for f in frames), log
    assert "C7515" not in log and "serialized" not in log, f"ptxas serialises the wgmmas:\n{log}"
    ptx = subprocess.run([nvcc, *flags, "-ptx", "-o", "-", str(src)], capture_output=True, text=True, timeout=300)
    assert ptx.returncode == 0, ptx.stderr
    for shape in ("m64n64k16", "m64n128k16"):
        for ab in ("bf16", "f16"):
            assert f"wgmma.mma_async.sync.aligned.{shape}.f32.{ab}.{ab}" in ptx.stdout
    assert "fence.proxy.async.shared::cta" in ptx.stdout and "wgmma.wait_group.sync.aligned 0" in ptx.stdout
    if cuobjdump := shutil.which("cuobjdump"):
        sass = subprocess.run([cuobjdump, "-sass", str(tmp_path / "p.cubin")], capture_output=True, text=True,
                              check=True, timeout=120).stdout
        assert "HGMMA" in sass


def test_the_header_is_local():
    assert (CUDA_DIR / "wgmma.cuh").is_file() and '#include "wgmma.cuh"' in (CUDA_DIR / "wgmma_probe.cu").read_text()
