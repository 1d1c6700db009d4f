"""CPU checks of the GPU routing wrappers: validation, launch arithmetic and the kernel ABI.

The argument tuples are built by the same pure plan functions the CUDA path uses and checked against the
parameter lists parsed from cuda/centroids.cu and cuda/topk.cu, so a Python int or float given to an
``int``/``float`` parameter (silently wrong under CuPy) fails here. Validation runs on fake CUDA tensors
(shapes and devices without memory), which reach every check without a GPU.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from mobalab.kernels import _build
from mobalab.kernels import _contract as C
from mobalab.kernels import _cuda_routing as routing
from mobalab.kernels._launch import check_args, signatures

sys.path.insert(0, str(Path(__file__).parent))
from _topk_emulation import split_hi_lo  # noqa: E402


def _fake(shape, dtype=torch.bfloat16, device="cuda:0"):
    with FakeTensorMode():
        return torch.empty(shape, dtype=dtype, device=device)


def _topk_args(**over):
    args = dict(q_shape=(2, 1000, 8, 128), q_dtype=torch.bfloat16, q_device="cuda:0", k_shape=(2, 1000, 2, 128),
                k_dtype=torch.bfloat16, k_device="cuda:0", block_size=64, top_k=8, causal=True, centroids=None)
    args.update(over)
    q = _fake(args["q_shape"], args["q_dtype"], args["q_device"])
    k = _fake(args["k_shape"], args["k_dtype"], args["k_device"])
    return q, k, args


def test_valid_inputs_pass_validation():
    q, k, _ = _topk_args()
    C.check_inputs("f", q, k, path="cuda")
    C.check_cuda_device("f", q)
    assert C.check_block_size("f", 64, "cuda") == 64 and C.check_top_k("f", 8, "cuda") == 8
    assert C.check_block_size("f", np.int64(16), "cuda") == 16 and C.check_top_k("f", np.int32(64), "cuda") == 64
    C.check_centroids("f", _fake((2, 16, 2, 128), torch.float32), k, 64)
    C.check_keys("f", _fake((1, 5, 1, 64), torch.float16), path="cuda")


@pytest.mark.parametrize(
    "over, match",
    [
        (dict(q_dtype=torch.float32, k_dtype=torch.float32), "dtype torch.float32"),
        (dict(k_dtype=torch.float16), "must share one dtype"),
        (dict(q_shape=(2, 1000, 8, 48), k_shape=(2, 1000, 2, 48)), "head_dim 48"),
        (dict(q_shape=(2, 1000, 8), k_shape=(2, 1000, 2)), "4-D"),
        (dict(q_shape=(2, 0, 8, 128), k_shape=(2, 0, 2, 128)), "empty dimension"),
        (dict(k_shape=(2, 999, 2, 128)), "seqlen"),
        (dict(k_shape=(2, 1000, 3, 128)), "multiple of kv heads"),
        (dict(block_size=48), "block_size=48"),
        (dict(block_size=1024), "block_size=1024"),
        (dict(block_size=64.0), "block_size=64.0"),
        (dict(top_k=0), "top_k=0"),
        (dict(top_k=65), "top_k=65"),
        (dict(top_k=True), "top_k=True"),
        (dict(causal=1), "causal"),
        (dict(q_device="cpu", k_device="cpu"), "needs CUDA tensors"),
        (dict(k_device="cuda:1"), "one device"),
        (dict(q_shape=(70000, 4, 8, 128), k_shape=(70000, 4, 2, 128)), "<= 65535"),
        (dict(centroids=((2, 15, 2, 128), torch.float32, "cuda:0")), "expected \\(2, 16, 2, 128\\)"),
        (dict(centroids=((2, 16, 2, 128), torch.bfloat16, "cuda:0")), "float32"),
        (dict(centroids=((2, 16, 2, 128), torch.float32, "cuda:1")), "centroids are on"),
    ],
)
def test_invalid_topk_inputs_raise(over, match):
    q, k, args = _topk_args(**over)
    if args["q_device"] == "cpu":
        q, k = torch.zeros(args["q_shape"], dtype=args["q_dtype"]), torch.zeros(args["k_shape"], dtype=args["k_dtype"])
    cent = None if args["centroids"] is None else _fake(*args["centroids"])
    with pytest.raises(ValueError, match=match):
        routing.moba_topk_cuda(q, k, args["block_size"], args["top_k"], causal=args["causal"], centroids=cent)


@pytest.mark.parametrize(
    "shape, dtype, device, block, match",
    [
        ((1, 5, 1, 64), torch.float64, "cuda:0", 16, "supported on the cuda path"),
        ((1, 5, 1, 48), torch.bfloat16, "cuda:0", 16, "head_dim 48"),
        ((1, 5, 1, 64), torch.bfloat16, "cuda:0", 8, "block_size=8"),
        ((1, 5, 1, 64), torch.bfloat16, "cpu", 16, "needs CUDA tensors"),
    ],
)
def test_invalid_centroid_inputs_raise(shape, dtype, device, block, match):
    k = torch.zeros(shape, dtype=dtype) if device == "cpu" else _fake(shape, dtype, device)
    with pytest.raises(ValueError, match=match):
        routing.moba_centroids_cuda(k, block)


def test_non_tensors_and_meta_tensors_raise_clearly():
    q, k, _ = _topk_args()
    with pytest.raises(TypeError, match="moba_topk_cuda: q must be a torch.Tensor, got numpy.ndarray"):
        routing.moba_topk_cuda(torch.zeros(2, 8, 2, 64).numpy(), k, 64, 8)
    with pytest.raises(ValueError, match="k is a meta tensor"):
        routing.moba_centroids_cuda(torch.empty(1, 8, 1, 64, dtype=torch.bfloat16, device="meta"), 16)


# ---------------------------------------------------------------------------------------------------
# ABI: every variant's argument tuple against the parsed CUDA signature


def _variant_plans(dtype, dim, causal, top_k=8, block_size=64, seqlen=300, heads=4, kv_heads=2, batch=2,
                   router="mma"):
    """Launch plans of one variant; the top-k kernel of ``router`` once per list tier it has (top_k 8, 16, 64)."""
    n = math.ceil(seqlen / block_size)
    q = torch.empty((batch, seqlen, heads, dim), dtype=dtype)
    k = torch.empty((batch, seqlen, kv_heads, dim), dtype=dtype)
    cent = torch.empty((batch, n, kv_heads, dim), dtype=torch.float32)
    hi = torch.empty((batch, kv_heads, n, dim), dtype=dtype)
    lo = torch.empty_like(hi)
    plans = [
        routing.centroid_launch(k, cent, hi, lo, block_size),
        routing.centroid_launch(k, cent, None, None, block_size),
        routing.split_launch(cent, hi, lo),
    ]
    for kk in (top_k, 16, 64):
        if router == "split" and not routing.split_router_supports(kk, causal):
            continue
        out = torch.empty((batch, seqlen, heads, kk), dtype=torch.int32)
        plans.append(routing.topk_launch(q, hi, lo, out, block_size, kk, causal, variant=router))
    return plans


VARIANTS = list(itertools.product(C.CUDA_DTYPES, C.CUDA_HEAD_DIMS, (True, False)))


@pytest.mark.parametrize("router", ["mma", "split"])
@pytest.mark.parametrize("dtype, dim, causal", VARIANTS)
def test_launch_args_match_cuda_signatures(dtype, dim, causal, router):
    for plan in _variant_plans(dtype, dim, causal, router=router):
        cargs = check_args(plan.source, plan.kernel, plan.args)
        assert len(cargs) == len(signatures(plan.source)[plan.kernel])
        if plan.kernel.startswith("moba_topk"):
            assert plan.kernel.endswith("_split") == (router == "split")
            assert plan.block == ((routing.SPLIT_THREADS if router == "split" else routing.TOPK_THREADS), 1, 1)


def test_every_routing_kernel_is_launched_by_some_plan():
    launched = {(p.source, p.kernel) for v in VARIANTS for r in ("mma", "split")
                for p in _variant_plans(*v, router=r)}
    defined = {(f, name) for f in ("centroids.cu", "topk.cu") for name in signatures(f)}
    assert defined == launched


@pytest.mark.parametrize("dim", C.CUDA_HEAD_DIMS)
def test_split_and_mma_plans_differ_only_in_kernel_threads_and_shared_memory(dim):
    """One argument tuple and grid for both mma.sync kernels: callers switch kernels with the variant alone."""
    q = torch.empty((2, 300, 4, dim), dtype=torch.bfloat16)
    hi = torch.empty((2, 2, 5, dim), dtype=torch.bfloat16)
    out = torch.empty((2, 300, 4, 9), dtype=torch.int32)
    mma = routing.topk_launch(q, hi, hi, out, 64, 9, True, 7, variant="mma")
    split = routing.topk_launch(q, hi, hi, out, 64, 9, True, 7, variant="split")
    assert split.kernel == mma.kernel + "_split" == f"moba_topk_bf16_d{dim}_causal_k8_split"
    assert split.grid == mma.grid and split.source == mma.source == "topk.cu"
    assert all(a is b for a, b in zip(split.args[:4], mma.args[:4], strict=True))
    assert split.args[4:] == mma.args[4:] and split.args[-2:] == (np.int32(7), np.int32(0))  # offset, no fold
    assert split.shared_mem == routing.split_topk_shared_bytes(dim)


@pytest.mark.parametrize(
    "top_k, causal, tier",
    [(1, True, 8), (9, True, 8), (8, False, 8), (9, False, 16), (17, True, 16), (17, False, 64),
     (64, True, 64)],
)
def test_list_tier(top_k, causal, tier):
    assert routing.topk_list_tier(top_k, causal) == tier
    plan = _variant_plans(torch.bfloat16, 64, causal, top_k=top_k)[3]
    assert plan.kernel.endswith(f"_k{tier}")


def test_python_scalars_are_rejected_by_the_abi_check():
    plan = _variant_plans(torch.bfloat16, 128, True)[3]
    bad = list(plan.args)
    bad[4] = int(bad[4])  # seqlen as a Python int: CuPy would pass 8 bytes to an `int`
    with pytest.raises(TypeError, match="seqlen"):
        check_args(plan.source, plan.kernel, tuple(bad))


@pytest.mark.parametrize("router", ["mma", "split"])
@pytest.mark.parametrize("seqlen", [1, 127, 128, 129, 65536])
def test_topk_grid_covers_every_query_once(seqlen, router):
    plan = _variant_plans(torch.float16, 64, True, seqlen=seqlen, block_size=16, router=router)[3]
    gx, gy, gz = plan.grid
    assert (gy, gz) == (4, 2)
    assert (gx - 1) * routing.TOPK_BM < seqlen <= gx * routing.TOPK_BM
    assert plan.block == ((routing.SPLIT_THREADS if router == "split" else routing.TOPK_THREADS), 1, 1)


@functools.cache
def _min_ctas(dim: int) -> int:
    """The CTAs per SM topk_body's register-list kernels are compiled for at head dim ``dim``: the source's
    MOBA_TOPK_MIN_CTAS(D), a chain "((D) <= a ? x : ... : z)"."""
    macro = re.search(r"#define MOBA_TOPK_MIN_CTAS\(D\) (.+)", _build.source("topk.cu")).group(1)
    cases = [(int(a), int(x)) for a, x in re.findall(r"\(D\) <= (\d+) \? (\d+) :", macro)]
    assert cases, macro
    return next((x for a, x in cases if dim <= a), int(re.search(r": (\d+)\)$", macro).group(1)))


def test_shared_memory_fits_the_opt_in_limit():
    limit = 232448  # H100 / H200 opt-in maximum per block
    for dim, top_k, causal in itertools.product(C.CUDA_HEAD_DIMS, range(1, C.MAX_TOP_K + 1), (True, False)):
        smem = routing.topk_shared_bytes(dim, top_k, causal)
        assert 0 < smem <= routing.topk_shared_bytes(dim, C.MAX_TOP_K, False) <= limit
        # The CTAs per SM the register-list kernels are compiled for fit (228 KB per SM, 1 KB reserved per CTA).
        if routing.topk_list_tier(top_k, causal) < 64:
            assert _min_ctas(dim) * (smem + 1024) <= 228 * 1024


@pytest.mark.parametrize("dim", C.CUDA_HEAD_DIMS)
def test_split_shared_memory(dim):
    """Q tile, hi/lo tiles of 64 centroids, fp32 score tile, two threshold rows; two CTAs (16 warps) per SM where
    the default takes the split kernel, within the opt-in limit everywhere; the merge area (two lists of 16
    scores and blocks per row) fits in the score tile."""
    smem = routing.split_topk_shared_bytes(dim)
    assert smem == (128 * dim + 2 * 64 * dim) * 2 + 128 * 64 * 4 + 2 * 128 * 4
    assert smem <= 232448
    if dim in routing.SPLIT_DEFAULT_HEAD_DIMS:
        assert 2 * (smem + 1024) <= 228 * 1024
    assert 16 * routing.TOPK_BM * 8 <= routing.TOPK_BM * routing.SPLIT_BN * 4


# ---------------------------------------------------------------------------------------------------
# the hi/lo centroid split that the kernels rely on for fp32-grade scores


@pytest.mark.parametrize("dtype", list(C.CUDA_DTYPES))
@pytest.mark.parametrize("block_size", [16, 512])
def test_hi_lo_split_recovers_fp32_centroids(dtype, block_size):
    """Scores are sums of q_i * c_i, so what matters is the error of each c_i against the scale of c.

    bf16: hi and lo carry 8 bits each (relative error ~2^-17). fp16: lo underflows into fp16 subnormals
    for |c| < 2^-3, where the absolute error is at most 2^-25; both stay far below 2^-15 of rms(c) for
    centroids of unit-variance keys.
    """
    gen = torch.Generator().manual_seed(7)
    c = torch.randn(1 << 14, generator=gen) / math.sqrt(block_size)
    hi, lo = split_hi_lo(c, dtype)
    rms = c.double().pow(2).mean().sqrt()
    split_err = ((hi.double() + lo.double()) - c.double()).abs().max() / rms
    assert split_err.item() < 2.0**-15
    # A single low-precision centroid would be far worse: the reason for the second MMA.
    single_err = (hi.double() - c.double()).abs().max() / rms
    assert single_err.item() > 2.0**-12


# ---------------------------------------------------------------------------------------------------
# the router variant: mma.sync (topk.cu) or wgmma (topk_wgmma.cu)


def test_router_variant_refused_before_the_device(no_router_env):
    q, k = torch.zeros(1, 200, 2, 128, dtype=torch.bfloat16), torch.zeros(1, 200, 1, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="moba_topk_cuda: router variant must be one of"):
        routing.moba_topk_cuda(q, k, 64, 8, variant="fast")
    with pytest.raises(ValueError, match="moba_topk_cuda: router variant 'split' needs top_k <= 17"):
        routing.moba_topk_cuda(q, k, 64, 20, variant="split")
    no_router_env.setenv(routing.ROUTER_VARIANT_ENV, "fast")
    with pytest.raises(ValueError, match="moba_topk_cuda: router variant must be one of"):
        routing.moba_topk_cuda(q, k, 64, 8)
    no_router_env.delenv(routing.ROUTER_VARIANT_ENV)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        routing.moba_topk_cuda(q, k, 64, 8, variant="wgmma")  # the device decides whether wgmma runs


@pytest.fixture
def no_router_env(monkeypatch):
    monkeypatch.delenv(routing.ROUTER_VARIANT_ENV, raising=False)
    return monkeypatch


def test_router_variant_default_env_and_argument(no_router_env):
    assert routing.DEFAULT_ROUTER_VARIANT == "auto"
    assert routing.resolve_router_variant(None, 128, 8, True) == "mma"  # no device: auto takes mma
    assert routing.resolve_router_variant(None) == "mma"
    no_router_env.setenv(routing.ROUTER_VARIANT_ENV, "split")
    assert routing.resolve_router_variant(None, 128, 8, True) == "split"
    no_router_env.setenv(routing.ROUTER_VARIANT_ENV, "wgmma")
    assert routing.resolve_router_variant(None, 128, 8, True) == "wgmma"
    assert routing.resolve_router_variant("mma", 128, 8, True) == "mma"  # the argument wins
    no_router_env.setenv(routing.ROUTER_VARIANT_ENV, "tiles")
    with pytest.raises(ValueError, match="router variant must be one of"):
        routing.resolve_router_variant(None)


@pytest.mark.parametrize("dim, top_k, causal, ok", [
    (128, 8, True, True), (64, 17, True, True), (64, 16, False, True), (128, 1, True, True),
    (128, 18, True, False), (128, 17, False, False), (96, 8, True, False), (256, 8, False, False),
    (32, 8, True, False)])
def test_wgmma_router_shapes(no_router_env, dim, top_k, causal, ok):
    """Asked for (argument or environment), wgmma raises on shapes it has no kernel for; chosen by the default, it
    falls back to mma there."""
    assert routing.wgmma_router_supports(dim, top_k, causal) == ok
    if ok:
        assert routing.resolve_router_variant("wgmma", dim, top_k, causal) == "wgmma"
    else:
        with pytest.raises(ValueError, match="router variant 'wgmma' needs head_dim in"):
            routing.resolve_router_variant("wgmma", dim, top_k, causal)
        no_router_env.setenv(routing.ROUTER_VARIANT_ENV, "wgmma")
        with pytest.raises(ValueError, match=f"got head_dim={dim}, top_k={top_k}"):
            routing.resolve_router_variant(None, dim, top_k, causal)
        no_router_env.delenv(routing.ROUTER_VARIANT_ENV)
    no_router_env.setattr(routing, "DEFAULT_ROUTER_VARIANT", "wgmma")
    assert routing.resolve_router_variant(None, dim, top_k, causal) == ("wgmma" if ok else "mma")


@pytest.mark.parametrize("dim, top_k, causal, default", [
    (128, 8, True, "split"), (32, 17, True, "split"), (96, 16, False, "split"), (64, 1, True, "split"),
    (256, 8, True, "mma"), (128, 18, True, "mma"), (64, 17, False, "mma"), (128, 64, True, "mma")])
def test_split_router_shapes(no_router_env, dim, top_k, causal, default):
    """A split default (mma is the default now) takes split for register-list tiers at head dims up to 128, mma
    elsewhere; split asked for runs at every head dim and raises on the heap tier."""
    no_router_env.setattr(routing, "DEFAULT_ROUTER_VARIANT", "split")
    assert routing.resolve_router_variant(None, dim, top_k, causal) == default
    ok = routing.split_router_supports(top_k, causal)
    assert ok == (routing.topk_list_tier(top_k, causal) < 64)
    if ok:
        assert routing.resolve_router_variant("split", dim, top_k, causal) == "split"
        no_router_env.setenv(routing.ROUTER_VARIANT_ENV, "split")
        assert routing.resolve_router_variant(None, dim, top_k, causal) == "split"
    else:
        with pytest.raises(ValueError, match=f"router variant 'split' needs top_k .* got top_k={top_k}"):
            routing.resolve_router_variant("split", dim, top_k, causal)
        no_router_env.setenv(routing.ROUTER_VARIANT_ENV, "split")
        with pytest.raises(ValueError, match="router variant 'split' needs"):
            routing.resolve_router_variant(None, dim, top_k, causal)


WG_VARIANTS = list(itertools.product(C.CUDA_DTYPES, routing.WG_HEAD_DIMS, (True, False), (8, 16)))


def _wgmma_plan(dtype, dim, causal, top_k, seqlen=300, block_size=64, heads=4, kv_heads=2, batch=2):
    n = math.ceil(seqlen / block_size)
    q = torch.empty((batch, seqlen, heads, dim), dtype=dtype)
    hi = torch.empty((batch, kv_heads, n, dim), dtype=dtype)
    out = torch.empty((batch, seqlen, heads, top_k), dtype=torch.int32)
    return routing.topk_launch(q, hi, torch.empty_like(hi), out, block_size, top_k, causal, variant="wgmma")


def test_topk_launch_plans_the_build_options():
    """A build option that changes a CTA's shared memory is planned with it: the mma kernel's 64-centroid tiles."""
    q = torch.empty((2, 300, 4, 128), dtype=torch.bfloat16)
    hi = torch.empty((2, 2, 5, 128), dtype=torch.bfloat16)
    out = torch.empty((2, 300, 4, 8), dtype=torch.int32)
    wide = routing.topk_launch(q, hi, hi, out, 64, 8, True, variant="mma", defines=("MOBA_TOPK_BN=64",))
    assert wide.defines == ("MOBA_TOPK_BN=64",)
    assert wide.shared_mem == routing.topk_shared_bytes(128, 8, True, bn=64) == 96 * 1024
    assert routing.topk_launch(q, hi, hi, out, 64, 8, True, variant="mma").shared_mem == 64 * 1024


@pytest.mark.parametrize("dtype, dim, causal, top_k", WG_VARIANTS)
def test_wgmma_launch_args_match_cuda_signatures(dtype, dim, causal, top_k):
    plan = _wgmma_plan(dtype, dim, causal, top_k)
    assert plan.source == routing.WGMMA_SOURCE and plan.kernel.startswith("moba_topk_wg_")
    assert plan.kernel.endswith(f"_k{routing.topk_list_tier(top_k, causal)}")
    cargs = check_args(plan.source, plan.kernel, plan.args)
    assert len(cargs) == len(signatures(plan.source)[plan.kernel])
    # the same arguments as the mma kernel of the shape: one launch path for both
    mma = routing.topk_launch(*plan.args[:4], 64, top_k, causal, variant="mma")
    assert [type(a) for a in plan.args] == [type(a) for a in mma.args]
    assert mma.source == "topk.cu"


def test_every_wgmma_router_kernel_is_launched_by_some_plan():
    launched = {_wgmma_plan(*v).kernel for v in WG_VARIANTS}
    assert launched == set(signatures(routing.WGMMA_SOURCE))


@pytest.mark.parametrize("seqlen", [1, 255, 256, 257, 65536])
def test_wgmma_grid_covers_every_query_once(seqlen):
    plan = _wgmma_plan(torch.bfloat16, 128, True, 8, seqlen=seqlen, block_size=16)
    gx, gy, gz = plan.grid
    assert (gy, gz) == (4, 2)
    assert (gx - 1) * routing.WG_BM < seqlen <= gx * routing.WG_BM
    assert plan.block == (routing.WG_THREADS, 1, 1)


@pytest.mark.parametrize("dim", routing.WG_HEAD_DIMS)
def test_wgmma_shared_memory(dim):
    """Q tile, two stacked hi/lo chunks, score tile, alignment slack: within the opt-in limit of one CTA."""
    smem = routing.wgmma_topk_shared_bytes(dim)
    parts = routing.WG_BM * dim * 2 + 2 * 2 * routing.WG_BN * dim * 2 + routing.WG_BM * routing.WG_BN * 4
    assert smem == parts + 1024
    assert smem <= 232448
    assert _wgmma_plan(torch.float16, dim, False, 16).shared_mem == smem


@pytest.mark.parametrize("cap, dim, top_k, causal, n_blocks, expected", [
    ((9, 0), 128, 8, True, 2048, "wgmma"), ((9, 0), 128, 17, True, 4096, "wgmma"),
    ((9, 0), 128, 16, False, 2048, "wgmma"), ((9, 0), 128, 8, True, 2047, "mma"), ((9, 0), 128, 8, True, 1024, "mma"),
    ((9, 0), 128, 8, True, 64, "mma"),
    ((9, 0), 128, 18, True, 4096, "mma"), ((9, 0), 64, 8, True, 4096, "mma"), ((9, 0), 96, 8, True, 4096, "mma"),
    ((8, 0), 128, 8, True, 4096, "mma"), ((8, 9), 128, 8, True, 4096, "mma"), ((10, 0), 128, 8, True, 4096, "mma")])
def test_auto_router_variant(no_router_env, cap, dim, top_k, causal, n_blocks, expected):
    """"auto" (the default, or asked for) takes wgmma on sm_90 at head dim 128 with at least WG_AUTO_MIN_BLOCKS key
    blocks where wgmma has a kernel, mma elsewhere; a CPU device, a missing shape or block count gives mma."""
    assert routing.WG_AUTO_MIN_BLOCKS == 2048
    no_router_env.setattr(routing, "_device_capability", lambda device: cap)
    cuda = torch.device("cuda", 0)
    assert routing.resolve_router_variant(None, dim, top_k, causal, cuda, n_blocks) == expected
    assert routing.resolve_router_variant("auto", dim, top_k, causal, cuda, n_blocks) == expected
    no_router_env.setenv(routing.ROUTER_VARIANT_ENV, "auto")
    assert routing.resolve_router_variant(None, dim, top_k, causal, cuda, n_blocks) == expected
    assert routing.resolve_router_variant("auto", dim, top_k, causal, torch.device("cpu"), n_blocks) == "mma"
    assert routing.resolve_router_variant("auto", None, top_k, causal, cuda, n_blocks) == "mma"
    assert routing.resolve_router_variant("auto", dim, top_k, causal, cuda) == "mma"  # no block count
    assert routing.resolve_router_variant("mma", dim, top_k, causal, cuda, n_blocks) == "mma"  # the argument wins


def test_auto_router_plan_follows_the_block_count(no_router_env, monkeypatch):
    """topk_launch resolves the variant with the block count of the centroid halves (the plan only; nothing runs):
    under "auto" the wgmma kernel from 2048 blocks on."""
    seen = []

    def resolve(variant, head_dim, top_k, causal, device, n_blocks=None):
        seen.append(n_blocks)
        return "wgmma" if n_blocks >= routing.WG_AUTO_MIN_BLOCKS else "mma"

    monkeypatch.setattr(routing, "resolve_router_variant", resolve)
    for n_blocks, kernel in ((2047, "moba_topk_bf16_d128_causal_k8"), (2048, "moba_topk_wg_bf16_d128_causal_k8")):
        q = torch.empty((1, 8, 2, 128), dtype=torch.bfloat16, device="meta")
        hi = torch.empty((1, 2, n_blocks, 128), dtype=torch.bfloat16, device="meta")
        out = torch.empty((1, 8, 2, 8), dtype=torch.int32, device="meta")
        assert routing.topk_launch(q, hi, hi, out, 128, 8, True).kernel == kernel
    assert seen == [2047, 2048]
