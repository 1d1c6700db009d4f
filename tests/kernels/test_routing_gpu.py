"""GPU routing kernels (centroids.cu, topk.cu) against the torch reference, on the device machine.

Every case draws fresh random inputs and poisons every buffer the kernels write (centroids and hi/lo
halves NaN, indices -7) before the launch. Index differences from the reference are allowed only at
near-ties: at a mismatched slot both blocks must be valid and their fp32-centroid scores (in fp64) must
lie within ``TIE_RTOL * |q| * |centroid|`` of each other; the kernel's score error is about 2^-16 of that
bound, a wrong block typically differs by ~|q||c|/sqrt(d). The overall mismatch rate must stay below 0.1%.
Set ``ROUTING_STATS_FILE`` to append the rate to a file.

Every test runs once per top-k kernel (the ``router`` fixture, made the default variant): "split" (topk.cu's
split body), "mma" (topk.cu's one-thread-per-row body) and "wgmma" (topk_wgmma.cu). Shapes a variant has no
kernel for (split: the heap tier and, as the default, head dim 256; wgmma: also head dims other than 64 and 128,
or a GPU without wgmma) take the fallback to mma as in normal use; the sweeps leave such cases out of those runs,
as they would repeat the mma runs. ``-k wgmma`` / ``-k split`` select one variant's runs and its direct comparison
with mma at the end (split must select exactly what mma selects: the same score tile, a scan that only skips
pairs that cannot be selected).
"""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch

from mobalab.kernels import reference

pytestmark = pytest.mark.gpu

TIE_RTOL = 2.0**-12
DTYPES = (torch.bfloat16, torch.float16)
DIMS = (64, 128)
BLOCKS = (16, 32, 64, 128, 256, 512)
STATS = {"slots": 0, "mismatches": 0, "cases": 0}
ROUTERS = ("split", "mma", "wgmma")


def _routing():
    from mobalab.kernels import _cuda_routing

    return _cuda_routing


@pytest.fixture(autouse=True, params=ROUTERS)
def router(request, monkeypatch):
    """The top-k kernel of the test, as the default variant (the environment variable unset)."""
    routing = _routing()
    monkeypatch.delenv(routing.ROUTER_VARIANT_ENV, raising=False)
    monkeypatch.setattr(routing, "DEFAULT_ROUTER_VARIANT", request.param)
    return request.param


def _hopper() -> bool:
    return torch.cuda.get_device_capability() == (9, 0)


def _rand(shape, dtype, gen):
    return torch.randn(shape, generator=gen, device="cuda", dtype=torch.float32).to(dtype)


def _poisoned_topk(q, k, block_size, top_k, causal, centroids=None, centroid_precision="fp32"):
    """Run the routing launches into poisoned buffers; returns (indices, fp32 centroids used)."""
    routing = _routing()
    batch, seqlen, heads, dim = q.shape
    kv_heads = k.shape[2]
    n = math.ceil(seqlen / block_size)
    hi = torch.full((batch, kv_heads, n, dim), float("nan"), dtype=q.dtype, device="cuda")
    lo = torch.full_like(hi, float("nan"))
    out = torch.full((batch, seqlen, heads, top_k), -7, dtype=torch.int32, device="cuda")
    if centroids is None:
        cent = torch.full((batch, n, kv_heads, dim), float("nan"), device="cuda")
    else:
        cent = centroids
    routing.topk_into(q, k, block_size, top_k, causal, centroids is not None, cent, hi, lo, out,
                      centroid_precision=centroid_precision)
    return out, cent


def _compare(out, ref, q, cent, causal, block_size):
    """Assert ``out`` equals ``ref`` up to near-ties; returns the number of mismatched slots."""
    assert not (out == -7).any(), "unwritten output slots"
    assert out.shape == ref.shape and out.dtype == torch.int32
    # The pattern of unused slots and (causal) the forced own block carry no score: exact.
    assert torch.equal(out < 0, ref < 0), "valid-slot pattern differs from the reference"
    if causal:
        assert torch.equal(out[..., 0], ref[..., 0])
    bad = out != ref
    n_bad = int(bad.sum())
    if n_bad:
        b, t, h, _ = bad.nonzero(as_tuple=True)
        group = q.shape[2] // cent.shape[2]
        qv = q[b, t, h].double()
        ck = cent[b, out[bad].long(), h // group].double()
        cr = cent[b, ref[bad].long(), h // group].double()
        sk, sr = (qv * ck).sum(-1), (qv * cr).sum(-1)
        bound = TIE_RTOL * qv.norm(dim=-1) * torch.maximum(ck.norm(dim=-1), cr.norm(dim=-1))
        worst = ((sk - sr).abs() / bound).max().item()
        assert worst <= 1.0, f"{n_bad} mismatched slots, not all near-ties (worst gap {worst:.3g} x bound)"
    # Rate denominator: slots chosen by score (not the forced own block, not the -1 padding).
    STATS["slots"] += int((ref[..., int(causal):] >= 0).sum())
    STATS["mismatches"] += n_bad
    STATS["cases"] += 1
    # Selected past blocks are distinct and lie in the past (causal) / exist (non-causal).
    n_blocks = cent.shape[1]
    valid = out[..., int(causal):]
    if valid.numel() == 0:  # causal top-1: the own block only
        return n_bad
    assert int(valid.max()) < n_blocks
    if causal:
        own = out[..., :1]
        assert bool(((valid < own) | (valid < 0)).all())
    srt = torch.sort(valid, dim=-1).values
    assert not bool(((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any()), "duplicate blocks"
    return n_bad


def _falls_back(dim, top_k, causal) -> bool:
    """Whether the split or wgmma run of a case would only repeat the mma run (no kernel for it as the default: the
    fallback, which the CPU tests and test_forced_wgmma_raises_where_it_has_no_kernel cover); such cases are left
    out to save device time."""
    routing = _routing()
    return routing.DEFAULT_ROUTER_VARIANT != "mma" and \
        routing.resolve_router_variant(None, dim, top_k, causal, torch.device("cuda")) != routing.DEFAULT_ROUTER_VARIANT


def _check_case(dtype, dim, block_size, causal, seqlen, top_k, heads, kv_heads, batch, seed):
    if _falls_back(dim, top_k, causal):
        return
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = _rand((batch, seqlen, heads, dim), dtype, gen)
    k = _rand((batch, seqlen, kv_heads, dim), dtype, gen)
    out, cent = _poisoned_topk(q, k, block_size, top_k, causal)
    ref_cent = reference.moba_centroids(k, block_size)
    torch.testing.assert_close(cent, ref_cent, rtol=1e-5, atol=1e-6)
    ref = reference.moba_topk(q, k, block_size, top_k, causal=causal)
    _compare(out, ref, q, ref_cent, causal, block_size)


# ---------------------------------------------------------------------------------------------------
# the sweep: every dtype x head dim x block size x causal, each at every short seqlen, with top-k rotating
# through {1, 2, 8, 16, 64, 9, 17} (all three list tiers and their edges) and GQA ratio through {1, 4, 8}


SHORT = [
    (dtype, dim, bs, causal)
    for dtype, dim, bs, causal in itertools.product(DTYPES, DIMS, BLOCKS, (True, False))
]


@pytest.mark.parametrize("dtype, dim, block_size, causal", SHORT,
                         ids=[f"{str(d)[6:]}-d{m}-B{b}-{'c' if c else 'nc'}" for d, m, b, c in SHORT])
def test_topk_sweep(dtype, dim, block_size, causal):
    seqlens = [1, block_size - 1, block_size, block_size + 1, 1000, 4097]
    for i, seqlen in enumerate(seqlens):
        top_k = (1, 2, 8, 16, 64, 9, 17)[(i + block_size // 16 + dim // 64 + int(causal)) % 7]
        ratio = (1, 4, 8)[(i + dim // 64) % 3]
        kv_heads = 1 + i % 2
        _check_case(dtype, dim, block_size, causal, seqlen, top_k, heads=kv_heads * ratio, kv_heads=kv_heads,
                    batch=2, seed=1000 * i + block_size + dim + int(causal))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("top_k", [8, 16, 64])
def test_topk_k_at_least_n(causal, top_k):
    # n = 4 blocks: every candidate is taken and the rest of the slots are -1.
    _check_case(torch.bfloat16, 128, 32, causal, 100, top_k, heads=4, kv_heads=1, batch=3, seed=top_k)


@pytest.mark.parametrize(
    "dtype, dim, block_size, top_k, causal, ratio",
    [
        (torch.bfloat16, 128, 128, 8, True, 4),
        (torch.float16, 64, 16, 64, False, 2),
        (torch.bfloat16, 64, 32, 2, True, 1),
        (torch.float16, 128, 512, 8, False, 8),
    ],
)
def test_topk_65536(dtype, dim, block_size, top_k, causal, ratio):
    _check_case(dtype, dim, block_size, causal, 65536, top_k, heads=ratio, kv_heads=1, batch=1,
                seed=65536 + top_k)


# ---------------------------------------------------------------------------------------------------
# planted winners: centroids alpha_j * u with integer-valued alpha_j, q_t = +-u, so every score is exact
# in fp32 on both sides. Distinct alpha_j: no near-ties exist. Repeated alpha_j: exact ties, which must go
# to the higher block index.


@pytest.mark.parametrize("dtype, dim, block_size", [(torch.bfloat16, 128, 128), (torch.float16, 64, 16),
                                                    (torch.bfloat16, 64, 512)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("ties", [False, True])
def test_topk_planted_winners_exact(dtype, dim, block_size, causal, ties):
    batch, kv_heads, heads, n = 2, 2, 8, 40
    seqlen = n * block_size
    gen = torch.Generator(device="cuda").manual_seed(block_size + int(causal) + 2 * int(ties))
    u = torch.where(torch.rand(dim, generator=gen, device="cuda") < 0.5, -1.0, 1.0)
    if ties:
        alpha = torch.randint(0, 5, (batch * kv_heads, n), generator=gen, device="cuda")
    else:
        perms = [torch.randperm(n, generator=gen, device="cuda") for _ in range(batch * kv_heads)]
        alpha = torch.stack(perms)
    alpha = (alpha.view(batch, kv_heads, n).permute(0, 2, 1).float() + 1) / 8  # exact in bf16/fp16
    keys = alpha.repeat_interleave(block_size, dim=1)[..., None] * u  # (b, N, g, d)
    # +-noise on row pairs cancels in every block mean, so the centroids stay exactly alpha_j * u.
    noise = torch.randint(-4, 5, (batch, seqlen // 2, kv_heads, dim), generator=gen, device="cuda") / 16
    keys = keys + torch.stack([noise, -noise], dim=2).view(batch, seqlen, kv_heads, dim)
    sign = torch.where(torch.rand(batch, seqlen, heads, 1, generator=gen, device="cuda") < 0.5, -1.0, 1.0)
    q = (sign * u).to(dtype)
    k = keys.to(dtype)
    for top_k in (1, 3, 8, 12, 40, 64):
        if _falls_back(dim, top_k, causal):
            continue
        out, _ = _poisoned_topk(q, k, block_size, top_k, causal)
        ref = reference.moba_topk(q, k, block_size, top_k, causal=causal)
        assert torch.equal(out, ref), f"top_k={top_k}: {(out != ref).sum().item()} slots differ"


# ---------------------------------------------------------------------------------------------------
# API properties


def test_public_api_matches_poisoned_run_and_is_deterministic():
    routing = _routing()
    gen = torch.Generator(device="cuda").manual_seed(5)
    q = _rand((2, 5000, 8, 128), torch.bfloat16, gen)
    k = _rand((2, 5000, 2, 128), torch.bfloat16, gen)
    first = routing.moba_topk_cuda(q, k, 64, 8, causal=True)
    second = routing.moba_topk_cuda(q, k, 64, 8, causal=True)
    assert torch.equal(first, second)
    poisoned, _ = _poisoned_topk(q, k, 64, 8, True)
    assert torch.equal(first, poisoned)
    from mobalab.kernels import moba_topk

    assert torch.equal(moba_topk(q, k, 64, 8, causal=True), first)


def test_given_centroids_give_the_same_indices():
    routing = _routing()
    gen = torch.Generator(device="cuda").manual_seed(6)
    q = _rand((1, 3000, 4, 64), torch.float16, gen)
    k = _rand((1, 3000, 4, 64), torch.float16, gen)
    cent = routing.moba_centroids_cuda(k, 32)
    torch.testing.assert_close(cent, reference.moba_centroids(k, 32), rtol=1e-5, atol=1e-6)
    for causal in (True, False):
        direct = routing.moba_topk_cuda(q, k, 32, 8, causal=causal)
        via = routing.moba_topk_cuda(q, k, 32, 8, causal=causal, centroids=cent)
        assert torch.equal(direct, via)
        poisoned, _ = _poisoned_topk(q, k, 32, 8, causal, centroids=cent)
        assert torch.equal(direct, poisoned)


def test_non_contiguous_inputs_are_read_correctly():
    routing = _routing()
    gen = torch.Generator(device="cuda").manual_seed(8)
    q_bhnd = _rand((2, 8, 777, 128), torch.bfloat16, gen)
    k_bhnd = _rand((2, 2, 777, 128), torch.bfloat16, gen)
    q, k = q_bhnd.transpose(1, 2), k_bhnd.transpose(1, 2)  # (b, N, h, d) views, not contiguous
    assert not q.is_contiguous()
    got = routing.moba_topk_cuda(q, k, 16, 8, causal=False)
    assert torch.equal(got, routing.moba_topk_cuda(q.contiguous(), k.contiguous(), 16, 8, causal=False))
    torch.testing.assert_close(routing.moba_centroids_cuda(k, 16), reference.moba_centroids(k, 16),
                               rtol=1e-5, atol=1e-6)


def test_runs_on_torch_current_stream():
    routing = _routing()
    gen = torch.Generator(device="cuda").manual_seed(9)
    q = _rand((1, 4096, 4, 128), torch.bfloat16, gen)
    k = _rand((1, 4096, 4, 128), torch.bfloat16, gen)
    expect = routing.moba_topk_cuda(q, k, 128, 8)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = routing.moba_topk_cuda(q, k, 128, 8)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(got, expect)


def test_invalid_cuda_inputs_raise_before_launch():
    routing = _routing()
    q = torch.zeros((1, 64, 2, 48), dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="head_dim 48"):
        routing.moba_topk_cuda(q, q, 16, 4)
    q = torch.zeros((1, 64, 2, 64), dtype=torch.float32, device="cuda")
    with pytest.raises(ValueError, match="float32"):
        routing.moba_centroids_cuda(q, 16)


# ---------------------------------------------------------------------------------------------------
# the two top-k kernels against each other: same selections except at near-ties (both compute the fp32-centroid
# score to ~2^-16; they differ in the fp32 rounding order only)

WG_CASES = [
    # dtype, dim, block, causal, seqlen, top_k, heads, kv_heads, batch
    (torch.bfloat16, 128, 128, True, 65536, 8, 2, 1, 1),      # the benchmark shape, two chunks of overlap or more
    (torch.bfloat16, 128, 64, True, 5000, 17, 8, 2, 2),       # N not a multiple of B, tier 16, GQA 4
    (torch.float16, 128, 16, False, 4097, 16, 4, 4, 1),       # many chunks, ragged last chunk and query tile
    (torch.float16, 64, 32, True, 3000, 9, 8, 1, 2),          # d 64, GQA 8
    (torch.bfloat16, 64, 512, False, 300, 8, 2, 2, 3),        # N < B: a single block, k >= n
    (torch.bfloat16, 128, 32, True, 100, 16, 4, 1, 3),        # k >= n blocks, one query tile
    (torch.float16, 64, 16, False, 257, 1, 2, 1, 1),          # top-1, one row past a 256-row tile
]


WG_IDS = [f"{str(c[0])[6:]}-d{c[1]}-B{c[2]}-{'c' if c[3] else 'nc'}-N{c[4]}-k{c[5]}" for c in WG_CASES]


@pytest.mark.parametrize("case", WG_CASES, ids=WG_IDS)
def test_wgmma_selects_what_mma_selects(case, router):
    if router != "wgmma":
        pytest.skip("one comparison per case")
    if not _hopper():
        pytest.skip("wgmma needs an sm_90 GPU")
    routing = _routing()
    dtype, dim, block_size, causal, seqlen, top_k, heads, kv_heads, batch = case
    gen = torch.Generator(device="cuda").manual_seed(seqlen + top_k)
    q = _rand((batch, seqlen, heads, dim), dtype, gen)
    k = _rand((batch, seqlen, kv_heads, dim), dtype, gen)
    n = math.ceil(seqlen / block_size)
    hi = torch.empty((batch, kv_heads, n, dim), dtype=dtype, device="cuda")
    plan = routing.topk_launch(q, hi, hi, torch.empty((batch, seqlen, heads, top_k), dtype=torch.int32,
                                                     device="cuda"), block_size, top_k, causal, variant="wgmma")
    assert plan.source == routing.WGMMA_SOURCE  # the shape has a wgmma kernel: no fallback below
    mma = routing.moba_topk_cuda(q, k, block_size, top_k, causal=causal, variant="mma")
    wg = routing.moba_topk_cuda(q, k, block_size, top_k, causal=causal, variant="wgmma")
    _compare(wg, mma, q, reference.moba_centroids(k, block_size), causal, block_size)
    out, cent = _poisoned_topk(q, k, block_size, top_k, causal)  # the default (wgmma) into poisoned buffers
    assert torch.equal(out, wg)


# the split kernel against mma on awkward shapes, every head dim (256 and the heap-free tiers asked for explicitly)
SPLIT_CASES = [
    # dtype, dim, block, causal, seqlen, top_k, heads, kv_heads, batch, query_offset
    (torch.bfloat16, 128, 128, True, 65536, 8, 2, 1, 1, 0),     # the benchmark shape: 8 centroid tiles per row
    (torch.bfloat16, 128, 64, True, 5000, 17, 8, 2, 2, 0),      # N not a multiple of B, tier 16 at its top, GQA 4
    (torch.float16, 64, 16, False, 4097, 16, 4, 4, 1, 0),       # non-causal, many tiles, ragged last tile and rows
    (torch.float16, 32, 32, True, 3000, 9, 8, 1, 2, 0),         # head dim 32, GQA 8
    (torch.bfloat16, 96, 16, True, 2000, 8, 2, 1, 1, 0),        # head dim 96 (k-steps not unrolled)
    (torch.bfloat16, 256, 16, False, 2000, 12, 2, 2, 1, 0),     # head dim 256 (one CTA per SM)
    (torch.bfloat16, 64, 512, False, 300, 8, 2, 2, 3, 0),       # N < B: a single block, k >= n
    (torch.bfloat16, 128, 32, True, 100, 16, 4, 1, 3, 0),       # k >= n blocks, one query tile
    (torch.float16, 64, 16, True, 257, 1, 2, 1, 1, 0),          # causal top-1: the own block only
    (torch.float16, 64, 16, False, 257, 1, 2, 1, 1, 0),         # non-causal top-1
    (torch.bfloat16, 128, 64, True, 3000, 8, 4, 2, 1, 1000),    # query offset (a context-parallel shard)
    (torch.bfloat16, 64, 16, False, 3000, 16, 2, 1, 1, 1234),   # query offset, non-causal, inside a block
]
SPLIT_IDS = [f"{str(c[0])[6:]}-d{c[1]}-B{c[2]}-{'c' if c[3] else 'nc'}-N{c[4]}-k{c[5]}-off{c[9]}" for c in SPLIT_CASES]


@pytest.mark.parametrize("case", SPLIT_CASES, ids=SPLIT_IDS)
def test_split_selects_exactly_what_mma_selects(case, router):
    if router != "split":
        pytest.skip("one comparison per case")
    routing = _routing()
    dtype, dim, block_size, causal, seqlen, top_k, heads, kv_heads, batch, offset = case
    gen = torch.Generator(device="cuda").manual_seed(seqlen + top_k + offset)
    q = _rand((batch, seqlen, heads, dim), dtype, gen)
    k = _rand((batch, seqlen, kv_heads, dim), dtype, gen)
    cent = routing.moba_centroids_cuda(k, block_size)
    n = cent.shape[1]
    hi = torch.empty((batch, kv_heads, n, dim), dtype=dtype, device="cuda")
    lo = torch.empty_like(hi)
    routing.launch(routing.split_launch(cent, hi, lo))
    rows = q[:, offset:].contiguous()
    outs = {}
    for variant in ("mma", "split"):
        out = torch.full((*rows.shape[:3], top_k), -7, dtype=torch.int32, device="cuda")
        plan = routing.topk_launch(rows, hi, lo, out, block_size, top_k, causal, offset, variant=variant)
        assert plan.kernel.endswith("_split") == (variant == "split")
        routing.launch(plan)
        outs[variant] = out
    assert torch.equal(outs["split"], outs["mma"]), f"{int((outs['split'] != outs['mma']).sum())} slots differ"
    ref = reference.moba_topk(q, k, block_size, top_k, causal=causal)[:, offset:]
    _compare(outs["split"], ref, rows, reference.moba_centroids(k, block_size), causal, block_size)


def test_forced_wgmma_raises_where_it_has_no_kernel(router, monkeypatch):
    if router != "wgmma":
        pytest.skip("once")
    routing = _routing()
    q = torch.zeros((1, 64, 2, 64), dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="router variant 'wgmma' needs"):
        routing.moba_topk_cuda(q, q, 16, 64, variant="wgmma")
    monkeypatch.setenv(routing.ROUTER_VARIANT_ENV, "wgmma")
    with pytest.raises(ValueError, match="router variant 'wgmma' needs"):
        routing.moba_topk_cuda(q, q, 16, 18, causal=True)
    monkeypatch.delenv(routing.ROUTER_VARIANT_ENV)
    # chosen by the default, the same call falls back to mma
    assert torch.equal(routing.moba_topk_cuda(q, q, 16, 18, causal=True),
                       routing.moba_topk_cuda(q, q, 16, 18, causal=True, variant="mma"))


def test_mismatch_rate_below_0p1_percent():
    """Runs last in this file: the near-tie mismatch rate over every comparison above."""
    if STATS["cases"] == 0:
        pytest.skip("no comparison ran (select the whole file)")
    rate = STATS["mismatches"] / max(1, STATS["slots"])
    line = (f"routing near-tie mismatches: {STATS['mismatches']} of {STATS['slots']} scored slots "
            f"({rate:.2e}) over {STATS['cases']} cases")
    print(line)
    if path := os.environ.get("ROUTING_STATS_FILE"):
        with open(path, "a") as fh:
            fh.write(line + "\n")
    assert rate < 1e-3


INPUT_CASES = [
    # dtype, dim, block, causal, seqlen, top_k, heads, kv_heads
    (torch.bfloat16, 128, 128, True, 8192, 8, 4, 2),
    (torch.float16, 64, 16, False, 3001, 16, 2, 1),
    (torch.bfloat16, 128, 32, True, 70000, 8, 2, 2),  # 2188 blocks: "auto" would take wgmma here on an H100
    (torch.bfloat16, 96, 64, True, 1000, 40, 2, 1),  # the heap tier (mma)
]


@pytest.mark.parametrize("case", INPUT_CASES, ids=[f"{c[0]}-d{c[1]}-B{c[2]}-N{c[4]}-k{c[5]}" for c in INPUT_CASES])
def test_input_centroids_select_what_the_reference_selects_in_that_precision(case, router):
    """centroid_precision "input" (the kernels' build scoring q.hi alone) into poisoned buffers against
    ``reference.moba_topk(..., centroid_precision="input")``, near-ties judged on the rounded centroids; the same
    kernels with the fp32 centroids replaced by their rounding select exactly the same blocks."""
    dtype, dim, block_size, causal, seqlen, top_k, heads, kv_heads = case
    if _falls_back(dim, top_k, causal):
        return
    gen = torch.Generator(device="cuda").manual_seed(seqlen + top_k)
    q = _rand((1, seqlen, heads, dim), dtype, gen)
    k = _rand((1, seqlen, kv_heads, dim), dtype, gen)
    out, cent = _poisoned_topk(q, k, block_size, top_k, causal, centroid_precision="input")
    rounded = cent.to(dtype).float()
    ref = reference.moba_topk(q, k, block_size, top_k, causal=causal, centroid_precision="input")
    _compare(out, ref, q, rounded, causal, block_size)
    again, _ = _poisoned_topk(q, k, block_size, top_k, causal, centroids=rounded.contiguous())
    assert torch.equal(out, again)


def test_input_centroids_through_the_public_functions(router):
    """moba_topk and moba_attention (forward and backward) with centroid_precision "input": the attention is the
    kernels' attention over the routing moba_topk gives in that precision, bit for bit."""
    from mobalab.kernels import _cuda_attention, moba_attention, moba_topk

    gen = torch.Generator(device="cuda").manual_seed(11)
    q, k, v = (_rand((1, 8192, 4, 128), torch.bfloat16, gen) for _ in range(3))
    topk = moba_topk(q, k, 64, 8, centroid_precision="input")
    ref = reference.moba_topk(q, k, 64, 8, centroid_precision="input")
    _compare(topk, ref, q, reference.moba_centroids(k, 64).to(torch.bfloat16).float(), True, 64)
    given = _cuda_attention.moba_attention_cuda(q, k, v, 64, 8, topk_indices=topk)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out = moba_attention(*leaves, 64, 8, centroid_precision="input")
    assert torch.equal(out, given)
    out.float().square().sum().backward()
    assert all(bool(x.grad.isfinite().all()) for x in leaves)
    with pytest.raises(ValueError, match="centroid_precision must be one of"):
        moba_attention(q, k, v, 64, 8, centroid_precision="bf16")


@pytest.mark.parametrize("precision", ["fp32", "input"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
def test_a_block_with_a_non_finite_key_is_never_selected(value, causal, precision, router):
    """One key element of block 2 infinite or NaN: its centroid is not finite, so the block scores NaN in either
    precision (the centroid pass makes both halves NaN: q . hi alone would be +-inf) and no query selects it but
    as its own block; every other slot is the reference's up to near-ties."""
    dtype, dim, block_size, top_k, seqlen = torch.bfloat16, 128, 64, 8, 2000
    if _falls_back(dim, top_k, causal):
        return
    gen = torch.Generator(device="cuda").manual_seed(17)
    q = _rand((2, seqlen, 4, dim), dtype, gen)
    k = _rand((2, seqlen, 2, dim), dtype, gen)
    k[:, 2 * block_size + 1, :, 3] = value
    q[..., 3] = torch.where(torch.arange(4, device="cuda") % 2 == 0, 1.0, -1.0).to(dtype)  # both signs of q . inf
    out, cent = _poisoned_topk(q, k, block_size, top_k, causal, centroid_precision=precision)
    scored = out[..., 1:] if causal else out
    assert not (scored == 2).any(), "the block with a non-finite key was selected"
    ref = reference.moba_topk(q, k, block_size, top_k, causal=causal, centroid_precision=precision)
    assert not (ref[..., int(causal):] == 2).any()
    _compare(out, ref, q, cent.to(dtype).float() if precision == "input" else cent, causal, block_size)


def test_moba_topk_compiles_fullgraph_on_cuda(router):
    """Under torch.compile the CUDA routing is one custom op (mobalab::moba_topk): no graph break, the eager
    selections bit for bit."""
    from mobalab.kernels import moba_topk

    gen = torch.Generator(device="cuda").manual_seed(23)
    q = _rand((1, 4096, 4, 128), torch.bfloat16, gen)
    k = _rand((1, 4096, 2, 128), torch.bfloat16, gen)
    compiled = torch.compile(lambda q, k: moba_topk(q, k, 64, 8), fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(q, k), moba_topk(q, k, 64, 8))
