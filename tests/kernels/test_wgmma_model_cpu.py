"""The host model of Hopper's warpgroup MMAs (host_emulation/wgmma_host_model.h) against torch, no GPU.

``host_emulation/wgmma_model_harness.cpp`` runs one CTA of one or two warpgroups (cuda_host.h: every thread a
coroutine) that stage random bf16 / fp16 operands in shared memory with wgmma.cuh's own ``sw128_offset`` and
descriptor functions (``wgmma_desc_sw128`` K-major, ``wgmma_desc_sw128_mn`` MN-major) or pass A in registers, issue
the MMAs of D = A B^T in two commit groups, wait, and write D from the accumulator layout. The model must give the
fp32 product of torch (within fp32 accumulation error) for every form the kernels use: both operands K-major
(``wgmma_ss``), A from registers with B K-major or MN-major at N 64 and 128 (``wgmma_rs<T, TRANS_B>``), and both from
shared memory with either one MN-major (``wgmma_ss_t<T, TRANS_A, TRANS_B>``); and a reference with the operand's 16 x
16 blocks transposed must not match, so a model that swapped the roles of MN and K would fail. The failure checks
(other swizzles, an MN-major start inside a pattern, a warpgroup whose threads do not all wait, groups never waited
for) stop the run, and an operand overwritten while its MMA is pending is read at the wait.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mobalab.kernels._build import source

sys.path.insert(0, str(Path(__file__).parent))
from _emulation import NEEDS_CXX, harness_fixture, storage_bytes  # noqa: E402

pytestmark = NEEDS_CXX

harness = harness_fixture("wgmma_model_harness", lambda: {
    "wgmma.cuh": source("wgmma.cuh"), "cuda_bf16.h": "#pragma once\n", "cuda_fp16.h": "#pragma once\n"})

# wgmma_model_harness.cpp's Case: kind, flags and the shared memory per warpgroup
SS, RS, SST = 0, 1, 2
PACK_A, SWIZZLE_64B, START_OFFSET, CLOBBER_B, WARP3_LEAVES, NO_WAIT = 1, 2, 4, 8, 16, 32
REGION = 48 * 1024
BF16, FP16 = torch.bfloat16, torch.float16


def _run(exe: Path, tmp: Path, mmas, seed: int):
    """Run one CTA with a warpgroup per MMA of ``mmas`` ((kind, dtype, n, k, trans_a, trans_b, flags) each); returns
    (the harness' process, [(a, b, d)]): a 64 x k, b n x k (D = a b^T), d as the harness wrote it (NaN: unwritten)."""
    g = torch.Generator().manual_seed(seed)
    params, data, outs, off, d_off = [], [], [], 0, 0
    for kind, dtype, n, k, ta, tb, flags in mmas:
        a, b = torch.randn(64, k, generator=g).to(dtype), torch.randn(n, k, generator=g).to(dtype)
        params += [kind, int(dtype == BF16), n, k, ta, tb, off, off + a.numel(), d_off, flags]
        data += [a, b]
        outs.append((a, b, d_off, n))
        off += a.numel() + b.numel()
        d_off += 64 * n
    bufs = [torch.tensor(params, dtype=torch.int32), torch.cat([x.flatten().view(torch.int16) for x in data]),
            torch.full((d_off,), float("nan"))]
    lines = [f"seed {seed}", f"buffers {len(bufs)}"]
    for i, t in enumerate(bufs):
        storage_bytes(t).numpy().tofile(tmp / f"buf{i}.in")
        lines.append(f"{i} {t.numel() * t.element_size()} {tmp / f'buf{i}.in'} {tmp / f'buf{i}.out'}")
    smem = 1024 + len(mmas) * REGION
    lines += ["launches 1", f"wgmma_case 1 1 1 {128 * len(mmas)} 1 1 {smem} 3 p:0:0 p:1:0 p:2:0"]
    (tmp / "manifest.txt").write_text("\n".join(lines) + "\n")
    proc = subprocess.run([str(exe), str(tmp / "manifest.txt")], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        return proc, []
    d = torch.from_numpy(np.fromfile(tmp / "buf2.out", dtype=np.float32))
    return proc, [(a, b, d[o:o + 64 * n].view(64, n)) for a, b, o, n in outs]


def _blocks_transposed(b: torch.Tensor) -> torch.Tensor:
    """b (n x k) with each 16 x 16 block transposed: what a model that read MN for K (and K for MN) would multiply."""
    n, k = b.shape
    return b.reshape(n // 16, 16, k // 16, 16).transpose(1, 3).reshape(n, k)


def _check(a, b, d, label):
    """d = a b^T within twice the fp32 summation bound of both sides, and far from the block-transposed product."""
    af, bf = a.float(), b.float()
    ref = af @ bf.T
    bound = 4 * a.shape[1] * 2.0**-24 * (af.abs() @ bf.abs().T) + 1e-30
    assert torch.isfinite(d).all(), f"{label}: unwritten or non-finite accumulators"
    err = ((d - ref).abs() / bound).max().item()
    assert err <= 1, f"{label}: error {err:.2f} x the fp32 accumulation bound"
    assert (d - af @ _blocks_transposed(bf).T).abs().max().item() > 1, f"{label}: matches a transposed reference"
    assert (d - _blocks_transposed(af) @ bf.T).abs().max().item() > 1, f"{label}: matches a transposed reference"


CASES = [
    # kind, dtype, n, k, trans_a, trans_b, flags
    (SS, BF16, 64, 128, 0, 0, 0),        # both K-major (the router's form): K over two 64-element blocks
    (SS, FP16, 128, 64, 0, 0, 0),
    (RS, BF16, 64, 64, 0, 0, 0),         # A from registers, B K-major
    (RS, FP16, 128, 128, 0, 0, 0),
    (RS, BF16, 64, 128, 0, 1, 0),        # B MN-major at N 64 (the forward's P V)
    (RS, FP16, 64, 64, 0, 1, PACK_A),    # ... A packed from an accumulator by wgmma_pack_a
    (RS, BF16, 128, 64, 0, 1, PACK_A),   # B MN-major at N 128: its second 64-element block at LBO
    (RS, FP16, 128, 128, 0, 1, 0),
    (SST, BF16, 64, 64, 1, 1, 0),        # both MN-major
    (SST, FP16, 64, 128, 1, 1, 0),
    (SST, BF16, 64, 128, 0, 1, 0),       # B MN-major
    (SST, FP16, 64, 64, 0, 1, 0),
    (SST, BF16, 64, 64, 1, 0, 0),        # A MN-major
    (SST, FP16, 64, 128, 1, 0, 0),
    (SST, BF16, 64, 32, 0, 0, 0),        # ss_t<T, 0, 0> is wgmma_ss
]


def _id(c) -> str:
    kind, dtype, n, k, ta, tb, flags = c
    return (f"{('ss', 'rs', 'sst')[kind]}{ta}{tb}-{str(dtype)[6:]}-n{n}-k{k}" + ("-pack" if flags & PACK_A else ""))


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_model_matches_torch(harness, tmp_path, case):
    proc, res = _run(harness, tmp_path, [case], seed=len(_id(case)) + case[3])
    assert proc.returncode == 0, proc.stderr[-2000:]
    _check(*res[0], _id(case))


@pytest.mark.parametrize("pair", [((RS, BF16, 128, 64, 0, 1, 0), (SST, FP16, 64, 128, 1, 1, 0)),
                                  ((SS, FP16, 128, 128, 0, 0, 0), (RS, BF16, 64, 64, 0, 0, PACK_A))],
                         ids=["rs-mn128+sst11", "ss128+rs-pack"])
def test_two_warpgroups_run_their_own_mmas(harness, tmp_path, pair):
    """A CTA of 256 threads: each warpgroup its own MMA (shape, type, A source, layouts), A registers and waits."""
    proc, res = _run(harness, tmp_path, list(pair), seed=5)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for (a, b, d), c in zip(res, pair, strict=True):
        _check(a, b, d, _id(c))


def test_a_pending_mma_reads_its_operand_at_the_wait(harness, tmp_path):
    """B zeroed after the first group was issued and before any wait: both groups read zeros (D = 0 exactly), as the
    hardware may (the latest moment it reads shared memory); a kernel that refills a pending operand gets wrong data."""
    proc, res = _run(harness, tmp_path, [(SS, BF16, 64, 128, 0, 0, CLOBBER_B)], seed=1)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert torch.equal(res[0][2], torch.zeros(64, 64))


@pytest.mark.parametrize("case, message", [
    ((SS, BF16, 64, 64, 0, 0, SWIZZLE_64B), "only the 128-byte swizzle is modelled"),
    ((RS, FP16, 64, 64, 0, 1, START_OFFSET), "MN-major k-step start is not at the beginning"),
    ((RS, BF16, 64, 64, 0, 0, WARP3_LEAVES), "not reached by every thread of the warpgroup"),
    ((SST, BF16, 64, 64, 1, 0, NO_WAIT), "ended with wgmma groups it never waited for"),
], ids=["swizzle-64B", "mn-start", "partial-wait", "no-wait"])
def test_model_stops_on_what_it_does_not_model(harness, tmp_path, case, message):
    proc, _ = _run(harness, tmp_path, [case], seed=2)
    assert proc.returncode == 3 and message in proc.stderr, proc.stderr[-2000:]
