"""The CUDA decode kernels (cuda/decode.cu) run on the host: their logic against the torch reference, no GPU.

``host_emulation/cuda_host.h`` runs every CUDA thread as a coroutine (switching at __syncthreads and at
the warp operations, in shuffled orders, CTAs in shuffled order) and the harness executes exactly the
launches that ``_cuda_decode.step_launches`` plans for a cache on the CPU: grids, shared-memory sizes and
argument tuples as the GPU would get them (checked against the kernel signatures). It is compiled with
AddressSanitizer, so any access beyond a buffer or beyond the planned shared memory fails the run; every
output and scratch buffer is poisoned first. What this cannot show (PTX, the memory model between CTAs,
speed) is left to the GPU tests.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from mobalab.kernels import MobaKVCache
from mobalab.kernels import _cuda_decode as C
from mobalab.kernels import _decode as D
from mobalab.kernels._build import source
from mobalab.kernels._launch import check_args

HERE = Path(__file__).parent / "host_emulation"
CXX = shutil.which("g++") or shutil.which("clang++")
pytestmark = pytest.mark.skipif(CXX is None, reason="needs a C++ compiler (g++ or clang++)")


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Path:
    build = tmp_path_factory.mktemp("decode_emulation")
    (build / "decode_kernels.cu").write_text(source("decode.cu"))
    exe = build / "decode_harness"
    cmd = [CXX, "-std=c++17", "-O1", "-U_FORTIFY_SOURCE", "-fno-strict-aliasing", "-fsanitize=address",
           f"-I{HERE}", f"-I{build}", "-o", str(exe),
           str(HERE / "decode_harness.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return exe


def _storage_bytes(t: torch.Tensor) -> torch.Tensor:
    """A uint8 tensor over the whole storage of ``t`` (shared: writing it writes every view)."""
    return torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage())


def run_emulated(exe: Path, workdir: Path, launches, seed: int) -> None:
    """Execute ``launches`` (C.Launch) in the harness; every tensor they name is updated in place."""
    storages: dict[int, torch.Tensor] = {}
    tokens = []
    for launch in launches:
        check_args(launch.filename, launch.kernel, launch.args)  # exactly what CuPy would receive
        args = []
        for a in launch.args:
            if isinstance(a, torch.Tensor):
                assert a.is_contiguous()
                base = a.untyped_storage().data_ptr()
                storages.setdefault(base, a)
                args.append(f"p:{list(storages).index(base)}:{a.data_ptr() - base}")
            elif isinstance(a, np.float32):
                args.append(f"f:{int(a.view(np.uint32))}")
            else:
                assert isinstance(a, np.int32), (launch.kernel, a)
                args.append(f"i:{int(a)}")
        tokens.append((launch, args))
    lines = [f"seed {seed}", f"buffers {len(storages)}"]
    for i, t in enumerate(storages.values()):
        raw = _storage_bytes(t).numpy()
        src, dst = workdir / f"buf{i}.in", workdir / f"buf{i}.out"
        raw.tofile(src)
        lines.append(f"{i} {raw.size} {src} {dst}")
    lines.append(f"launches {len(tokens)}")
    for launch, args in tokens:
        lines.append(" ".join([launch.kernel, *map(str, launch.grid), *map(str, launch.block), str(launch.shared_mem),
                               str(len(args)), *args]))
    manifest = workdir / "manifest.txt"
    manifest.write_text("\n".join(lines) + "\n")
    proc = subprocess.run([str(exe), str(manifest)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for i, t in enumerate(storages.values()):
        _storage_bytes(t).copy_(torch.from_numpy(np.fromfile(workdir / f"buf{i}.out", dtype=np.uint8)))


def _poison(bufs: dict) -> None:
    for t in bufs.values():
        t.fill_(float("nan") if t.is_floating_point() else -7)


def _case(seed, dtype, dim, block, kv_heads, heads, q_len, prompt_lengths, steps, ties=False):
    """A CPU cache filled by a ragged prefill and ``steps`` appends of q_len tokens, and the last queries.

    ``ties``: every third block repeats block 1, so their sums and scores tie exactly."""
    g = torch.Generator().manual_seed(seed)
    batch = len(prompt_lengths)
    total = max(prompt_lengths) + steps * q_len
    cache = MobaKVCache(batch, kv_heads, dim, block, total + 3, dtype=dtype)
    k = torch.randn(batch, max(prompt_lengths), kv_heads, dim, generator=g).to(dtype)
    if ties:
        for j in range(4, max(prompt_lengths) // block, 3):
            k[:, j * block:(j + 1) * block] = k[:, block:2 * block]
    v = torch.randn(batch, max(prompt_lengths), kv_heads, dim, generator=g).to(dtype)
    cache.prefill(k, v, lengths=prompt_lengths)
    for _ in range(steps):
        cache.append(torch.randn(batch, q_len, kv_heads, dim, generator=g).to(dtype),
                     torch.randn(batch, q_len, kv_heads, dim, generator=g).to(dtype))
    q = torch.randn(batch, q_len, heads, dim, generator=g).to(dtype)
    return cache, q


CASES = [
    # dtype, d, B, kv_heads, heads, q_len, prompt lengths, appends, top_k, sm_count, ties (see _case)
    pytest.param(torch.bfloat16, 64, 16, 2, 8, 1, [700, 333], 1, 8, 132, False, id="bf16-d64-B16-gqa4-ragged-split"),
    pytest.param(torch.bfloat16, 128, 16, 1, 2, 2, [2100, 1500], 1, 16, 1, False, id="bf16-d128-B16-tiles"),
    pytest.param(torch.float16, 128, 128, 1, 2, 3, [520, 390], 2, 3, 132, False, id="fp16-d128-B128-qlen3-chunks"),
    pytest.param(torch.bfloat16, 64, 32, 1, 16, 5, [300], 1, 4, 8, False, id="bf16-d64-B32-two-row-groups"),
    pytest.param(torch.bfloat16, 128, 16, 2, 2, 2, [40, 17], 1, 1, 132, False, id="bf16-top1-own-only"),
    pytest.param(torch.float16, 64, 64, 1, 1, 16, [150], 1, 32, 132, False, id="fp16-qlen16-topk32-fewer-blocks"),
    pytest.param(torch.bfloat16, 64, 16, 1, 2, 1, [1400], 1, 16, 4, True, id="bf16-exact-ties"),
]


@pytest.mark.parametrize(("dtype", "dim", "block", "kv_heads", "heads", "q_len", "lengths", "steps", "top_k", "sms",
                          "ties"), CASES)
def test_emulated_kernels_match_reference(harness, tmp_path, dtype, dim, block, kv_heads, heads, q_len, lengths, steps,
                                          top_k, sms, ties):
    cache, q = _case(dim + block + heads + q_len, dtype, dim, block, kv_heads, heads, q_len, lengths, steps, ties)
    if ties:  # make the repeated blocks the best: their exact ties decide the selection
        q[:, :, :] = cache.block_sums[:, :1, 1].to(q.dtype).unsqueeze(1)
    top_k, scale = D.check_decode(q, cache, top_k, kernel_limits=True)
    plan, bufs, launches = C.step_launches(q, cache, top_k, scale, sm_count=sms)
    _poison(bufs)
    run_emulated(harness, tmp_path, launches, seed=7)

    ref_sel = D._route(q, cache, top_k)
    assert torch.equal(bufs["sel"], ref_sel), (bufs["sel"] != ref_sel).nonzero()[:8]
    if ties:  # the tied copies outscore the rest; of the 29 copies the highest-index 15 win
        copies = [1] + list(range(4, lengths[0] // block, 3))
        assert ref_sel[0, 0, 0, 1:].tolist() == sorted(copies, reverse=True)[:top_k - 1]
    ref_out, ref_lse = D._attend(q, cache, ref_sel, scale)
    assert not torch.isnan(bufs["out"].float()).any() and not torch.isnan(bufs["lse"]).any()
    # out: one rounding to the 16-bit type apart at most
    eps = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    torch.testing.assert_close(bufs["out"].float(), ref_out.float(), atol=2 * eps, rtol=2 * eps)
    torch.testing.assert_close(bufs["lse"], ref_lse, atol=1e-5, rtol=1e-5)
    # the counters are back to zero for the next step
    assert int(cache._counters.abs().sum()) == 0


def test_plans_of_the_cases_cover_the_kernel_paths():
    """The emulated cases reach splits, several tiles, row groups, chunks and top_k = 1."""
    seen = set()
    for p in CASES:
        dtype, dim, block, kv_heads, heads, q_len, lengths, steps, top_k, sms, _ = p.values
        cache, q = _case(0, dtype, dim, block, kv_heads, heads, q_len, lengths, steps)
        plan = C.plan_decode(len(lengths), q_len, heads, kv_heads, dim, block, top_k, int(cache._len.max()),
                             cache.n_blocks, cache.capacity, sms)
        seen |= {"split"} if plan.n_split > 1 else set()
        seen |= {"tiles"} if plan.blocks_per_split > C.ROUTE_TILE else set()
        seen |= {"row groups"} if plan.n_rg > 1 else set()
        seen |= {"chunks"} if plan.n_chunks > 1 else set()
        seen |= {"own only"} if top_k == 1 else set()
        seen |= {"short"} if top_k - 1 > (int(cache._len.min()) - 1) // block else set()
    assert seen == {"split", "tiles", "row groups", "chunks", "own only", "short"}


def test_second_step_reuses_counters(harness, tmp_path):
    """Two decode steps in a row on one cache: the completion counters left by the first are zero."""
    cache, q = _case(3, torch.bfloat16, 64, 32, 1, 4, 1, [400, 250], 1)
    for step in range(2):
        if step:
            g = torch.Generator().manual_seed(11)
            cache.append(*(torch.randn(2, 1, 1, 64, generator=g).to(torch.bfloat16) for _ in range(2)))
        top_k, scale = D.check_decode(q, cache, 8, kernel_limits=True)
        _, bufs, launches = C.step_launches(q, cache, top_k, scale)
        _poison(bufs)
        run_emulated(harness, tmp_path, launches, seed=step)
        ref_out, _ = D._attend(q, cache, D._route(q, cache, top_k), scale)
        torch.testing.assert_close(bufs["out"].float(), ref_out.float(), atol=2**-7, rtol=2**-7)
    assert math.isfinite(float(bufs["lse"].sum()))
