"""The wgmma forward tile kernels (cuda/attention_wgmma.cu: variants "wgmma" and the warp-specialised "wgmma-ws")
without a GPU: variant selection, kernel names, launch plans against the CUDA signatures, shared memory, and the
compiled module (wgmma in its PTX, the transposed-B form for P V, the mbarrier pipeline and register re-allocation of
wgmma-ws; no spills: test_compile.py). Correctness on hardware: tests/kernels/test_attention_wgmma_gpu.py."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from mobalab.kernels import _contract as C
from mobalab.kernels import _cuda_attention as A
from mobalab.kernels._build import source
from mobalab.kernels._launch import check_args, signatures


def test_wgmma_variant_is_opt_in(monkeypatch):
    assert set(A.WGMMA_VARIANTS) == {"wgmma", "wgmma-ws"} and set(A.WGMMA_VARIANTS) <= set(A.VARIANTS)
    assert not set(A.WGMMA_VARIANTS) & set(A.MMA_VARIANTS)
    monkeypatch.delenv(A.VARIANT_ENV, raising=False)
    # without a device "auto" keeps choosing the mma.sync kernels at the shapes wgmma serves (device_variant takes
    # wgmma for B 64 and 128 on sm_90: test_auto_takes_wgmma_on_hopper)
    for block in A.WGMMA_BLOCK_SIZES:
        for dtype in C.CUDA_DTYPES:
            assert A.kernel_names(dtype, 128, block, "auto")[0].startswith("moba_attn_res_")
            assert A.kernel_names(dtype, 128, block, None)[0].startswith("moba_attn_res_")
        assert A.fwd_source(128, block, "auto") == A.SOURCE
    monkeypatch.setenv(A.VARIANT_ENV, "wgmma")
    assert A.resolve_variant(None, 128, 128) == "wgmma"
    assert A.kernel_names(torch.bfloat16, 128, 128)[0] == "moba_attn_wg_bf16_d128_b128"
    assert A.variant_label(128, 64) == "wgmma" and A.fwd_source(128, 64) == A.WGMMA_SOURCE
    monkeypatch.setenv(A.VARIANT_ENV, "wgmma-ws")
    assert A.kernel_names(torch.float16, 128, 64)[0] == "moba_attn_wgws_f16_d128_b64"
    assert A.variant_label(128, 128) == "wgmma-ws" and A.fwd_source(128, 128) == A.WGMMA_SOURCE
    # the environment never changes the mma kernels' thread count: only an explicit "wgmma-ws" does
    assert A.fwd_threads(128) == 128 and A.fwd_threads(256) == 256 and A.fwd_threads(128, "wgmma-ws") == 384
    assert not A.resident(128, 128) and A.rows_per_unit(128, 128) == A.ROWS * A.TILES_PER_UNIT


@pytest.mark.parametrize("cap, dim, block, variant, top_k, group, expected", [
    ((9, 0), 128, 64, "auto", 8, 1, "wgmma"), ((9, 0), 128, 128, "auto", 8, 1, "wgmma"),
    ((9, 0), 128, 128, "auto", None, 1, "wgmma"), ((9, 0), 128, 32, "auto", 8, 1, "auto"),
    ((9, 0), 128, 32, "auto", 9, 1, "wgmma"), ((9, 0), 128, 32, "auto", 32, 1, "wgmma"),
    ((9, 0), 128, 32, "auto", 64, 1, "wgmma"), ((9, 0), 128, 32, "auto", None, 1, "auto"),
    ((9, 0), 128, 32, "auto", 2, 4, "auto"), ((9, 0), 128, 32, "auto", 3, 4, "wgmma"),
    ((9, 0), 128, 32, "auto", 4, 2, "auto"), ((9, 0), 128, 32, "auto", 5, 2, "wgmma"),
    ((9, 0), 128, 32, "auto", 1, 8, "auto"), ((9, 0), 128, 32, "auto", 2, 8, "wgmma"),
    ((9, 0), 128, 32, "resident", 8, 4, "resident"), ((8, 0), 128, 32, "auto", 8, 4, "auto"),
    ((9, 0), 64, 32, "auto", 64, 1, "auto"), ((9, 0), 64, 64, "auto", 8, 1, "auto"),
    ((8, 0), 128, 64, "auto", 8, 1, "auto"), ((8, 9), 128, 64, "auto", 8, 1, "auto"),
    ((8, 0), 128, 32, "auto", 9, 1, "auto"), ((9, 0), 128, 64, "resident", 8, 1, "resident"),
    ((9, 0), 128, 32, "resident", 64, 1, "resident"), ((9, 0), 128, 64, "wgmma-ws", 8, 1, "wgmma-ws")])
def test_auto_takes_wgmma_on_hopper(monkeypatch, cap, dim, block, variant, top_k, group, expected):
    """On an sm_90 device "auto" runs the wgmma tile kernel at head dim 128, B 64 and 128 (measured faster there) and
    at B 32 from top_k G = 9 (k B G >= 288 with G query heads per kv head: long lists), the mma.sync kernels
    elsewhere; an explicit variant and any other device keep what was asked for."""
    monkeypatch.setattr(A, "_device_capability", lambda device: cap)
    cuda = torch.device("cuda", 0)
    assert A.device_variant(variant, dim, block, cuda, top_k, group) == expected
    assert A.device_variant(variant, dim, block, torch.device("cpu"), top_k, group) == variant
    assert A.device_variant(variant, dim, block, None, top_k, group) == variant
    if group == 1:  # the default
        assert A.device_variant(variant, dim, block, cuda, top_k) == expected
    label = A.variant_label(dim, block, variant, cuda, top_k, group)
    assert label == ("wgmma" if expected == "wgmma" else A.variant_label(dim, block, variant))


@pytest.mark.parametrize("variant,dim,block", [
    *((v, d, b) for v in ("wgmma", "wgmma-ws") for d, b in [(64, 128), (256, 64), (128, 256), (96, 64), (128, 16)]),
    ("wgmma-ws", 128, 32)])
def test_wgmma_refuses_unsupported_shapes(dim, block, variant, monkeypatch):
    sizes = r"\(32, 64, 128\)" if variant == "wgmma" else r"\(64, 128\)"
    with pytest.raises(ValueError, match=rf"variant '{variant}' supports head_dim in \(128,\) and block_size in "
                                         rf"{sizes}, got head_dim=\d+, block_size=\d+"):
        A.resolve_variant(variant, dim, block)
    with pytest.raises(ValueError, match=f"variant '{variant}' supports"):
        A.kernel_names(torch.bfloat16, dim, block, variant)
    monkeypatch.setenv(A.VARIANT_ENV, variant)  # through the environment as well
    with pytest.raises(ValueError, match=f"variant '{variant}' supports"):
        A.fwd_smem_bytes(dim, block)
    assert A.resolve_variant(variant) == variant  # no shape: nothing to refuse


@pytest.mark.parametrize("variant", ["wgmma", "wgmma-ws"])
def test_wrapper_refuses_wgmma_shapes_before_touching_the_gpu(variant):
    q = torch.zeros(1, 64, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=f"variant '{variant}' supports"):
        A.moba_attention_cuda(q, q, q, 64, 1, variant=variant)


@pytest.mark.parametrize("dtype", C.CUDA_DTYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("partial", A.PARTIALS)
@pytest.mark.parametrize("variant,block", [(v, b) for v in A.WGMMA_VARIANTS for b in A.wgmma_block_sizes(v)])
def test_wgmma_plans_pass_check_args(dtype, block, causal, partial, variant):
    dim, batch, seqlen, heads, kv_heads, top_k = 128, 2, 300, 4, 2, 3
    q = torch.zeros(batch, seqlen, heads, dim, dtype=dtype)
    k = torch.zeros(batch, seqlen, kv_heads, dim, dtype=dtype)
    n_blocks = math.ceil(seqlen / block)
    chunk = A.plan_chunks(batch, seqlen, heads, kv_heads, dim, top_k, 1 << 20, partial)[0]
    n_pairs = chunk.n_heads * chunk.n_q * top_k
    n_seg = chunk.n_heads // (heads // kv_heads) * n_blocks
    pairs, seg = torch.zeros(n_pairs, dtype=torch.int64), torch.zeros(n_seg + 1, dtype=torch.int64)
    part_o = torch.zeros(n_pairs * dim, dtype=A.partial_dtype(dtype, partial))
    fwd, merge = A.kernel_names(dtype, dim, block, variant)
    kind = "wg" if variant == "wgmma" else "wgws"
    assert fwd == f"moba_attn_{kind}_{C.dtype_tag(dtype, A.SOURCE)}_d128_b{block}"
    assert fwd in signatures(A.WGMMA_SOURCE) and merge in signatures(A.SOURCE)
    unit = A.rows_per_unit(dim, block, variant)
    # the block stays resident for up to 16 tiles (wgmma: two warpgroups) or 4 (wgmma-ws)
    assert unit == A.ROWS * (A.WG_TILES_PER_UNIT if variant == "wgmma" else A.TILES_PER_UNIT)
    plan = A.fwd_launch(fwd, q, k, k, pairs, seg, seg, part_o, torch.zeros(2 * n_pairs), seqlen=seqlen, heads=heads,
                        kv_heads=kv_heads, top_k=top_k, block_size=block, n_blocks=n_blocks, chunk=chunk,
                        n_pairs=n_pairs, n_seg=n_seg, causal=causal, scale_log2=0.18, rows_per_unit=unit,
                        smem=A.fwd_smem_bytes(dim, block, variant), partial=partial,
                        source=A.fwd_source(dim, block, variant), threads=A.fwd_threads(dim, variant),
                        max_ctas=3 if variant == "wgmma-ws" else None)
    assert plan.source == A.WGMMA_SOURCE and plan.block == ((256,) if variant == "wgmma" else (384,))
    assert plan.defines == A.partial_defines(partial)
    assert len(check_args(plan.source, plan.kernel, plan.args)) == len(signatures(A.WGMMA_SOURCE)[fwd])
    grid = A.fwd_grid(n_pairs, n_seg, unit)
    if variant == "wgmma":
        # K and V (B x 128 each), three 64 x 128 Q tiles and 64 staged partial rows of 272 bytes per warpgroup,
        # 1024 bytes to align the swizzle patterns
        assert plan.shared_mem == 2 * block * 256 + 6 * 64 * 256 + 2 * 64 * 272 + 1024 and plan.grid == (grid,)
    else:
        # two K / V buffers, four Q slots, 1024 bytes of alignment; persistent: the grid is capped
        assert plan.shared_mem == 4 * block * 256 + 4 * 64 * 256 + 1024
        assert grid > 3 and plan.grid == (3,)
    # the same parameter list as the mma tile kernels: one launch plan serves both
    assert signatures(A.WGMMA_SOURCE)[fwd] == signatures(A.SOURCE)[A.kernel_names(dtype, dim, block, "auto")[0]]


@pytest.mark.parametrize("block", A.WGMMA_BLOCK_SIZES)
def test_wgmma_shared_memory_fits_one_cta(block):
    # 227 KB per CTA usable on H100 / H200; the kernel also has the row bookkeeping of its 16 tiles (20752 bytes of
    # static shared memory in ptxas' report)
    assert A.fwd_smem_bytes(128, block, "wgmma") + 20752 <= 227 * 1024


@pytest.mark.parametrize("block", A.WS_BLOCK_SIZES)
def test_wgmma_ws_shared_memory_fits_one_cta(block):
    # one CTA per SM (227 KB opt-in limit per CTA), with its double-buffered row bookkeeping (10512 bytes of static
    # shared memory in ptxas' report) and mbarriers
    assert A.fwd_smem_bytes(128, block, "wgmma-ws") + 10512 <= 227 * 1024


@pytest.mark.nvcc
def test_wgmma_module_ptx_holds_the_warpgroup_mmas():
    """The module compiled to PTX: S = Q K^T as m64nBk16 with both operands in shared memory (imm-trans-b 0)
    and P V as m64n128k16 with A from registers and the transposed (MN-major) B, imm-trans-b 1: 8 + B / 16
    wgmma per tile, the wgmma kernel's S issued at two places (tile 0's, then tile u + 1's inside the loop)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / A.WGMMA_SOURCE
        src.write_text(source(A.WGMMA_SOURCE))
        ptx = src.with_suffix(".ptx")
        proc = subprocess.run([nvcc, "-std=c++17", "-arch=sm_90a", "-ptx", "--use_fast_math", "-o", str(ptx), str(src)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        text = ptx.read_text()
    # each entry's text runs to the next entry (the inline asm blocks close their own braces)
    parts = re.split(r"\.entry (moba_attn_wg(?:ws)?_\w+)\(", text)[1:]
    bodies = dict(zip(parts[::2], parts[1::2], strict=True))
    assert sorted(bodies) == sorted(signatures(A.WGMMA_SOURCE))
    assert sum(name.startswith("moba_attn_wgws_") for name in bodies) == 4
    for name, body in bodies.items():
        block = int(name.rsplit("_b", 1)[1])
        kind = "bf16" if "_bf16_" in name else "f16"
        ss = re.findall(rf"wgmma\.mma_async\.sync\.aligned\.m64n{block}k16\.f32\.{kind}\.{kind} [^;]*?, p, 1, 1, 0, 0;",
                        body)
        rs = re.findall(rf"wgmma\.mma_async\.sync\.aligned\.m64n128k16\.f32\.{kind}\.{kind} [^;]*?, p, 1, 1, 1;", body)
        assert len(ss) == (8 if name.startswith("moba_attn_wgws_") else 16), (name, len(ss))
        assert len(rs) == block // 16, (name, len(rs))
        assert "fence.proxy.async.shared::cta" in body and "wgmma.wait_group.sync.aligned 0" in body
        if name.startswith("moba_attn_wgws_"):
            # the producer / consumer pipeline: register re-allocation per warpgroup, cp.async completion tracked by
            # mbarriers (.noinc: counted in the init count), acquiring waits, and no CTA-wide barrier after the
            # mbarrier setup (one bar.sync 0; the producer's own barrier is bar.sync 1 over 128 threads)
            assert re.findall(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32 (\d+);", body) == [("dec", "56"),
                                                                                          ("inc", "224")]
            assert body.count("cp.async.mbarrier.arrive.noinc.shared::cta.b64") >= 4
            assert "mbarrier.try_wait.parity.shared::cta.b64" in body and "mbarrier.init.shared::cta.b64" in body
            assert len(re.findall(r"\bbar\.sync\s+0;", body)) == 1


def test_device_capability_is_asked_once_per_device(monkeypatch):
    """The wrappers ask for the compute capability on every call; _build asks torch once per device index (the index
    of a torch.device, or the current device's)."""
    from mobalab.kernels import _build

    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: asked.append(i) or (9, i))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 5)
    _build._capability.cache_clear()
    try:
        caps = [_build.device_capability(d) for d in (torch.device("cuda", 3), 3, torch.device("cuda"), "cuda:3")]
        assert caps == [(9, 3), (9, 3), (9, 5), (9, 3)]
        assert asked == [3, 5]
    finally:
        _build._capability.cache_clear()


def test_a_module_is_built_once_per_compute_capability(monkeypatch):
    """CuPy loads a built module on every device it runs on; an sm_90a build does not load on another
    architecture, so a process with GPUs of two architectures needs a build for each (and one for two GPUs of one)."""
    from types import SimpleNamespace

    from mobalab.kernels import _build

    built = []

    class Module:
        def __init__(self, code, options, name_expressions):
            built.append(options)

        def compile(self):
            pass

        def get_function(self, name):
            return SimpleNamespace(name=name, options=built[-1])

    current = [0]
    runtime = SimpleNamespace(getDevice=lambda: current[0])
    fake = SimpleNamespace(RawModule=Module, cuda=SimpleNamespace(runtime=runtime))
    monkeypatch.setattr(_build, "cupy", lambda: fake)
    monkeypatch.setattr(_build, "device_capability", lambda d: {0: (9, 0), 1: (8, 0), 2: (9, 0)}[d])
    _build._module.cache_clear()
    _build._kernel.cache_clear()
    try:
        fns = []
        for device in (0, 1, 2, 0):
            current[0] = device
            fns.append(_build.get_kernel("topk.cu", "moba_topk_kernel"))
        assert len(built) == 2
        assert "-arch=sm_90a" in fns[0].options and "-arch=sm_90a" not in fns[1].options
        assert fns[0] is fns[2] is fns[3] and fns[1] is not fns[0]
    finally:
        _build._module.cache_clear()
        _build._kernel.cache_clear()
