"""GPU MoBA decode (cuda/decode.cu, the fused kernel, and cuda/decode_split.cu, the three-launch path) against
the torch reference, on the device machine. Every test that runs a step runs once per kernel.

Every case decodes from a prompt through a CUDA MobaKVCache with every ``torch.empty`` poisoned (NaN, int
2**30), so any output or scratch element the kernels fail to write shows up. Checks:

* routing: the kernel's selection equals the fp64 selection (``moba_topk`` on fp64 inputs) except at
  near-ties: at a mismatched slot both blocks are valid and their fp64 scores lie within
  ``TIE_RTOL * |q| * |centroid|``; overall mismatches < 0.1% of the slots chosen by score;
* attention: on the kernel's own selection, the kernel's error against fp64 is at most twice the error of
  the same computation done in torch in the input dtype (bf16 / fp16 matmuls and softmax);
* the token-by-token outputs equal ``moba_attention`` (reference, fp32) over the whole sequences at every
  decoded position wherever the selections agree;
* repeat calls are bit-identical (the completion counters reset themselves), a step replays from a CUDA
  graph, and an append and a step captured together replay token by token.
"""

from __future__ import annotations

import math

import pytest
import torch

from mobalab.kernels import MobaKVCache, moba_decode, reference
from mobalab.kernels import _decode as D

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
TIE_RTOL = 2.0**-12
STATS = {"slots": 0, "mismatches": 0}
KERNELS = ("split", "fused")  # the default kernel first: a run cut short has tested it


@pytest.fixture(params=KERNELS)
def kernel(request):
    """The decode kernel under test."""
    return request.param


def _kernel_decode(q, cache, top_k, kernel, scale=None):
    """(out, lse, sel) of one step through the CUDA path of ``kernel``."""
    from mobalab.kernels._cuda_decode import decode_cuda

    top_k, scale = D.check_decode(q, cache, top_k, scale)
    return decode_cuda(q, cache, top_k, scale, True, return_selection=True, kernel=kernel)


def _rand(shape, dtype, gen):
    return torch.randn(shape, generator=gen, device=DEVICE, dtype=torch.float32).to(dtype)


def _decode_run(dtype, dim, block, kv_heads, heads, top_k, lengths, steps, q_len, poisoned_empty, seed, kernel):
    """Prefill a ragged prompt, then `steps` steps of q_len tokens (append, decode). Returns the token streams,
    the final lengths and per-step (positions, out, lse, sel)."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    batch = len(lengths)
    total = max(lengths) + steps * q_len
    q = _rand((batch, total, heads, dim), dtype, gen)
    k = _rand((batch, total, kv_heads, dim), dtype, gen)
    v = _rand((batch, total, kv_heads, dim), dtype, gen)
    cache = MobaKVCache(batch, kv_heads, dim, block, total, dtype=dtype, device=DEVICE)
    cache.prefill(k, v, lengths=lengths)
    rows = torch.arange(batch, device=DEVICE).view(batch, 1)
    records = []
    for step in range(steps):
        pos = (torch.tensor(lengths, device=DEVICE) + step * q_len).view(batch, 1) + torch.arange(q_len, device=DEVICE)
        cache.append(k[rows, pos], v[rows, pos])
        with poisoned_empty():
            out, lse, sel = _kernel_decode(q[rows, pos], cache, top_k, kernel)
        records.append((pos, out, lse, sel))
    return (q, k, v), cache, records


def _scores64(qv, k, b, blocks, block, group, heads_idx):
    """fp64 scores <q, centroid> of `blocks` for query rows qv (n, d) of sequence b, heads heads_idx."""
    cent = reference.moba_centroids(k[b:b + 1].double(), block)[0]  # (n_blocks, kv_heads, d)
    c = cent[blocks.long().clamp(min=0), (heads_idx // group).view(-1, 1)]
    return (qv.double().unsqueeze(1) * c).sum(-1), c.norm(dim=-1)


def _check_routing(qkv, lengths_end, block, top_k, records, group):
    """Kernel selection vs the fp64 selection at every decoded position (near-ties allowed)."""
    q, k, _ = qkv
    for b, end in enumerate(lengths_end):
        ref = reference.moba_topk(q[b:b + 1, :end].double(), k[b:b + 1, :end].double(), block, top_k)[0]
        for pos, _, _, sel in records:
            mine = sel[b]  # (q_len, heads, top_k)
            want = ref[pos[b]]
            assert not (mine == 2**30).any(), "unwritten selection slots"
            assert torch.equal(mine < 0, want < 0), "valid-slot pattern differs from the fp64 reference"
            assert torch.equal(mine[..., 0], want[..., 0]), "own block"
            bad = mine != want
            STATS["slots"] += int((want[..., 1:] >= 0).sum())
            n_bad = int(bad.sum())
            STATS["mismatches"] += n_bad
            if n_bad:
                i, h, s = bad.nonzero(as_tuple=True)
                qv = q[b, pos[b][i], h]
                s_mine, n_mine = _scores64(qv, k[:, :end], b, mine[i, h, s].view(-1, 1), block, group, h)
                s_want, n_want = _scores64(qv, k[:, :end], b, want[i, h, s].view(-1, 1), block, group, h)
                bound = TIE_RTOL * qv.double().norm(dim=-1) * torch.maximum(n_mine, n_want)[:, 0]
                gap = ((s_mine - s_want).abs()[:, 0] / bound).max().item()
                assert gap <= 1.0, f"{n_bad} mismatched slots, not all near-ties (worst {gap:.3g} x bound)"


def _attend_on(q_rows, cache_k, cache_v, sel, t, block, group, scale, dtype):
    """Attention of q_rows (heads, d) at position t over the tokens of `sel` (heads, top_k), in `dtype`."""
    heads, top_k = sel.shape
    tokens = sel.long().unsqueeze(-1) * block + torch.arange(block, device=sel.device)
    valid = ((sel.unsqueeze(-1) >= 0) & (tokens <= t)).view(heads, -1)
    tokens = torch.where(valid, tokens.view(heads, -1), 0)
    kv = (torch.arange(heads, device=sel.device) // group).view(heads, 1)
    keys, values = cache_k[kv, tokens].to(dtype), cache_v[kv, tokens].to(dtype)
    logits = (torch.einsum("hd,hnd->hn", q_rows.to(dtype), keys) * scale).masked_fill(~valid, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.einsum("hn,hnd->hd", probs, values)


def _check_attention(cache, qkv, records, block, group, dtype):
    """Kernel error vs fp64 on its own selection <= 2x the error of the same computation in `dtype`."""
    q = qkv[0]
    scale = 1.0 / math.sqrt(q.shape[-1])
    worst = 0.0
    for pos, out, lse, sel in records:
        assert not torch.isnan(out.float()).any() and not torch.isnan(lse).any(), "unwritten outputs"
        for b in range(out.shape[0]):
            for i in range(out.shape[1]):
                t = int(pos[b, i])
                args = (q[b, t], cache.k[b], cache.v[b], sel[b, i], t, block, group, scale)
                exact = _attend_on(*args, torch.float64)
                low = _attend_on(*args, dtype).double()
                err_kernel = (out[b, i].double() - exact).abs().max().item()
                err_low = (low - exact).abs().max().item()
                assert err_kernel <= 2 * err_low + 1e-6, (t, err_kernel, err_low)
                worst = max(worst, err_kernel / max(err_low, 1e-9))
    return worst


def _check_against_moba_attention(qkv, lengths_end, block, top_k, records, dtype):
    """Token-by-token outputs vs moba_attention (reference, fp32) over the whole sequences."""
    q, k, v = qkv
    tol = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    compared = total = 0
    for b, end in enumerate(lengths_end):
        f32 = [x[b:b + 1, :end].float() for x in (q, k, v)]
        ref_out, ref_lse = reference.moba_attention(*f32, block, top_k, return_lse=True)
        ref_sel = reference.moba_topk(f32[0], f32[1], block, top_k)
        for pos, out, lse, sel in records:
            same = (sel[b] == ref_sel[0, pos[b]]).all(dim=-1)  # (q_len, heads): rows routed alike
            total += same.numel()
            compared += int(same.sum())
            got, want = out[b].float()[same], ref_out[0, pos[b]][same]
            torch.testing.assert_close(got, want, atol=tol, rtol=tol)
            torch.testing.assert_close(lse[b][same], ref_lse[0, pos[b]][same], atol=1e-3, rtol=1e-3)
    assert compared >= 0.99 * total, f"only {compared} of {total} rows route like the fp32 reference"


CASES = [
    # dtype, d, B, kv_heads, heads, top_k, prompt lengths, steps, q_len
    pytest.param(torch.bfloat16, 128, 128, 2, 8, 8, [3000, 1100], 20, 1, id="bf16-d128-B128-gqa4-ragged"),
    pytest.param(torch.float16, 64, 16, 1, 4, 16, [2000], 40, 1, id="fp16-d64-B16-k16"),
    pytest.param(torch.bfloat16, 64, 32, 2, 2, 4, [700, 1500, 33], 12, 1, id="bf16-d64-B32-mha-short-seq"),
    pytest.param(torch.bfloat16, 128, 512, 1, 4, 3, [2600], 6, 1, id="bf16-d128-B512"),
    pytest.param(torch.float16, 128, 64, 2, 8, 8, [1500, 900], 6, 4, id="fp16-d128-B64-qlen4"),
    pytest.param(torch.bfloat16, 64, 16, 1, 32, 8, [600], 3, 3, id="bf16-mqa32-qlen3-two-row-groups"),
    pytest.param(torch.bfloat16, 128, 256, 2, 4, 1, [800, 300], 4, 1, id="bf16-top1"),
    pytest.param(torch.bfloat16, 64, 16, 2, 8, 32, [5000, 4000], 3, 16, id="bf16-qlen16-top32"),
]


@pytest.mark.parametrize(("dtype", "dim", "block", "kv_heads", "heads", "top_k", "lengths", "steps", "q_len"), CASES)
def test_decode_matches_reference(poisoned_empty, kernel, dtype, dim, block, kv_heads, heads, top_k, lengths, steps,
                                  q_len):
    seed = dim + block + heads + top_k + q_len
    qkv, cache, records = _decode_run(dtype, dim, block, kv_heads, heads, top_k, lengths, steps, q_len,
                                      poisoned_empty, seed, kernel)
    ends = cache.lengths.tolist()
    group = heads // kv_heads
    _check_routing(qkv, ends, block, top_k, records, group)
    _check_attention(cache, qkv, records, block, group, dtype)
    _check_against_moba_attention(qkv, ends, block, top_k, records, dtype)


@pytest.mark.parametrize(("block", "top_k"), [(16, 32), (64, 8), (128, 8), (512, 4)])
def test_routing_at_long_context(poisoned_empty, kernel, block, top_k):
    """32K tokens, 32 / 8 heads: many routing splits and tiles; selections vs fp64 with near-ties only."""
    qkv, cache, records = _decode_run(torch.bfloat16, 128, block, 8, 32, top_k, [32768, 20000], 2, 1,
                                      poisoned_empty, seed=block, kernel=kernel)
    _check_routing(qkv, cache.lengths.tolist(), block, top_k, records, 4)
    _check_attention(cache, qkv, records, block, 4, torch.bfloat16)


def test_mismatch_rate_is_small():
    """Run after the cases above: near-tie flips are rare (< 0.1% of the slots chosen by score)."""
    if STATS["slots"] == 0:
        pytest.skip("no routing statistics collected (run the whole file)")
    assert STATS["mismatches"] <= 1e-3 * STATS["slots"], STATS


def test_repeat_calls_are_identical_and_graph_replay_works(kernel, monkeypatch):
    from mobalab.kernels._cuda_decode_split import ENV_VAR

    monkeypatch.setenv(ENV_VAR, kernel)  # moba_decode reads it at every call
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    cache = MobaKVCache(4, 8, 128, 128, 9000, dtype=torch.bfloat16, device=DEVICE)
    k, v = _rand((4, 8192, 8, 128), torch.bfloat16, gen), _rand((4, 8192, 8, 128), torch.bfloat16, gen)
    cache.prefill(k, v, lengths=[8192, 5000, 7777, 129])
    cache.append(_rand((4, 1, 8, 128), torch.bfloat16, gen), _rand((4, 1, 8, 128), torch.bfloat16, gen))
    q = _rand((4, 1, 32, 128), torch.bfloat16, gen)
    first, lse = moba_decode(q, cache, 8, return_lse=True)
    second, lse2 = moba_decode(q, cache, 8, return_lse=True)
    assert torch.equal(first, second) and torch.equal(lse, lse2)
    assert int(cache._counters.abs().sum()) == 0
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        moba_decode(q, cache, 8)  # warm-up on the capture stream (compiles nothing new)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = moba_decode(q, cache, 8)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(replayed, first)


def test_a_captured_step_replays_token_by_token(kernel, monkeypatch):
    """An append and a decode captured once in a CUDA graph, then replayed token by token across block boundaries and
    far past the lengths at the capture (a ragged batch, one sequence shorter than a block): every replay selects
    what the same step run eagerly on a twin cache selects, its output within one bf16 rounding and its LSE within
    1e-5 of the twin's (the captured step is planned for max_seqlen, the eager one for the lengths held), the caches
    end equal, and the host then reads the lengths that the replays reached."""
    from mobalab.kernels._cuda_decode_split import ENV_VAR

    monkeypatch.setenv(ENV_VAR, kernel)
    gen = torch.Generator(device=DEVICE).manual_seed(21)
    batch, kv_heads, heads, dim, block, top_k, steps, lengths = 3, 2, 8, 128, 32, 4, 40, [1000, 95, 30]
    k, v = _rand((batch, 1000, kv_heads, dim), torch.bfloat16, gen), _rand((batch, 1000, kv_heads, dim),
                                                                           torch.bfloat16, gen)
    graph_cache, eager, scratch = (MobaKVCache(batch, kv_heads, dim, block, 1200, dtype=torch.bfloat16,
                                               device=DEVICE) for _ in range(3))
    for cache in (graph_cache, eager, scratch):
        cache.prefill(k, v, lengths=lengths)
    ks, vs = (_rand((steps, batch, 1, kv_heads, dim), torch.bfloat16, gen) for _ in range(2))
    qs = _rand((steps, batch, 1, heads, dim), torch.bfloat16, gen)
    static_k, static_v, static_q = ks[0].clone(), vs[0].clone(), qs[0].clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), pytest.MonkeyPatch.context() as mp:
        mp.setattr(MobaKVCache, "_capturing", lambda self: True)  # the captured plan's kernels, loaded beforehand
        scratch.append(static_k, static_v)
        _kernel_decode(static_q, scratch, top_k, kernel)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_cache.append(static_k, static_v)
        out, lse, sel = _kernel_decode(static_q, graph_cache, top_k, kernel)
    for t in range(steps):
        static_k.copy_(ks[t])
        static_v.copy_(vs[t])
        static_q.copy_(qs[t])
        graph.replay()
        eager.append(ks[t], vs[t])
        e_out, e_lse, e_sel = _kernel_decode(qs[t], eager, top_k, kernel)
        assert torch.equal(sel, e_sel), (t, (sel != e_sel).nonzero()[:4])
        torch.testing.assert_close(out.float(), e_out.float(), atol=2**-7, rtol=2**-7)
        torch.testing.assert_close(lse, e_lse, atol=1e-5, rtol=1e-5)
    torch.cuda.synchronize()
    assert graph_cache.lengths.tolist() == [n + steps for n in lengths] == eager.lengths.tolist()
    assert torch.equal(graph_cache.k, eager.k) and torch.equal(graph_cache.block_sums, eager.block_sums)
    assert int(graph_cache._counters.abs().sum()) == 0


@pytest.mark.parametrize("page_size", [None, 256], ids=["contiguous", "paged"])
def test_speculative_steps_with_crops_follow_the_cpu_cache(kernel, page_size):
    """Draft steps of 5 tokens, the rejected ones cropped per sequence, on a CUDA cache and on a CPU twin: every
    step's selection is the twin's reference selection and the output within one bf16 rounding of it; the caches end
    equal (K, V, block sums, lengths, pages)."""
    if kernel == "fused" and page_size is not None:
        pytest.skip("the fused kernel reads contiguous caches only")
    gen = torch.Generator().manual_seed(31)
    batch, kv_heads, heads, dim, block, top_k, draft = 3, 2, 8, 128, 64, 4, 5
    lengths, accepted = [700, 64, 190], [[5, 0, 2], [1, 4, 0], [3, 3, 5], [0, 1, 1]]
    caches = [MobaKVCache(batch, kv_heads, dim, block, 800, dtype=torch.bfloat16, device=dev, page_size=page_size)
              for dev in (DEVICE, "cpu")]
    k, v = (torch.randn(batch, 700, kv_heads, dim, generator=gen).to(torch.bfloat16) for _ in range(2))
    for cache in caches:
        cache.prefill(k.to(cache.device), v.to(cache.device), lengths=lengths)
    held = list(lengths)
    for took in accepted:
        k_new, v_new = (torch.randn(batch, draft, kv_heads, dim, generator=gen).to(torch.bfloat16) for _ in range(2))
        q = torch.randn(batch, draft, heads, dim, generator=gen).to(torch.bfloat16)
        for cache in caches:
            cache.append(k_new.to(cache.device), v_new.to(cache.device))
        out, lse, sel = _kernel_decode(q.to(DEVICE), caches[0], top_k, kernel)
        ref_sel = D._route(q, caches[1], top_k)
        ref_out, ref_lse = D._attend(q, caches[1], ref_sel, 1.0 / math.sqrt(dim))
        assert torch.equal(sel.cpu(), ref_sel)
        torch.testing.assert_close(out.cpu().float(), ref_out.float(), atol=2**-7, rtol=2**-7)
        torch.testing.assert_close(lse.cpu(), ref_lse, atol=1e-5, rtol=1e-5)
        held = [n + a for n, a in zip(held, took, strict=True)]
        for cache in caches:
            cache.crop(held)
    gpu, cpu = caches
    assert gpu.lengths.tolist() == cpu.lengths.tolist() == held
    assert torch.equal(gpu.k.cpu(), cpu.k) and torch.equal(gpu.v.cpu(), cpu.v)
    torch.testing.assert_close(gpu.block_sums.cpu(), cpu.block_sums, atol=1e-5, rtol=1e-5)
    if page_size is not None:
        assert torch.equal(gpu.page_table, cpu.page_table) and torch.equal(gpu._pages_dev.cpu(), cpu.page_table)


def test_split_decode_is_bit_identical_run_to_run():
    """Sixteen query tokens per sequence with k 16: some 2000 entries per kv head over ~500 blocks of 4 chunks,
    entered into the kv head's set by hundreds of rows at once. Five calls: selections, outputs and LSEs
    bit-identical (the set does not depend on the order of the entries, so neither does the attention's
    sharing of its blocks among CTAs, nor which chunks a CTA folds together)."""
    from mobalab.kernels._cuda_decode_split import ENV_VAR

    gen = torch.Generator(device=DEVICE).manual_seed(11)
    cache = MobaKVCache(2, 2, 128, 128, 70_000, dtype=torch.bfloat16, device=DEVICE)
    k, v = _rand((2, 65_000, 2, 128), torch.bfloat16, gen), _rand((2, 65_000, 2, 128), torch.bfloat16, gen)
    cache.prefill(k, v, lengths=[65_000, 40_001])
    cache.append(_rand((2, 16, 2, 128), torch.bfloat16, gen), _rand((2, 16, 2, 128), torch.bfloat16, gen))
    q = _rand((2, 16, 16, 128), torch.bfloat16, gen)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV_VAR, "split")
        first = moba_decode(q, cache, 16, return_lse=True)
        for _ in range(4):
            again = moba_decode(q, cache, 16, return_lse=True)
            assert all(torch.equal(a, b) for a, b in zip(again, first, strict=True))
    assert int(cache._counters.abs().sum()) == 0


def test_cuda_rejects_what_the_kernels_do_not_support():
    cache = MobaKVCache(1, 1, 64, 16, 64, dtype=torch.float32, device=DEVICE)
    cache.prefill(torch.zeros(1, 8, 1, 64, device=DEVICE), torch.zeros(1, 8, 1, 64, device=DEVICE))
    with pytest.raises(ValueError, match="the CUDA kernels support bfloat16, float16"):
        moba_decode(torch.zeros(1, 1, 1, 64, device=DEVICE), cache, 2)
    # the reference runs anything on any device
    assert D.moba_decode_reference(torch.zeros(1, 1, 1, 64, device=DEVICE), cache, 2).is_cuda


def _check_routing_on_sums(q, cache, sel, top_k, dropped=()):
    """Selections of the last query (q_len 1) vs fp64 scores on the cache's block sums: every slot equal,
    or both blocks within a near-tie of each other. Returns the number of mismatched slots. ``dropped``: blocks
    that no query may select (their sums not finite), ranked last."""
    batch, _, heads, _ = q.shape
    group, block = heads // cache.kv_heads, cache.block_size
    kv_of_head = torch.arange(heads, device=q.device) // group
    bad = 0
    for b, length in enumerate(cache.lengths.tolist()):
        own = (length - 1) // block
        assert torch.equal(sel[b, 0, :, 0], torch.full_like(sel[b, 0, :, 0], own)), "own block"
        take = min(top_k - 1, own)
        assert (sel[b, 0, :, 1 + take:] == -1).all() and (sel[b, 0, :, 1:1 + take] >= 0).all()
        if take == 0:
            continue
        sums = cache.block_sums[b, :, :own].double() / block  # (kv_heads, own, d)
        gone = [j for j in dropped if j < own]
        sums[:, gone] = 0.0
        qv = q[b, 0].double()  # (heads, d)
        scores = torch.einsum("hd,hjd->hj", qv, sums[kv_of_head])
        scores[:, gone] = -math.inf
        # fp64 ranking, ties to the higher block index (stable sort of the reversed block axis)
        want = (own - 1) - torch.sort(scores.flip(-1), dim=-1, descending=True, stable=True).indices[:, :take]
        mine = sel[b, 0, :, 1:1 + take].long()
        diff = mine != want
        bad += int(diff.sum())
        if diff.any():
            h, s = diff.nonzero(as_tuple=True)
            gap = (scores[h, mine[h, s]] - scores[h, want[h, s]]).abs()
            norms = sums[kv_of_head[h]].norm(dim=-1).max(dim=-1).values
            bound = TIE_RTOL * qv[h].norm(dim=-1) * norms
            assert (gap <= bound).all(), f"mismatched slots that are not near-ties: {gap.max().item():.3g}"
    return bad


def _check_last_token_attention(q, cache, sel, out, dtype):
    """q_len 1: the kernel's output vs fp64 on its own selection, within 2x the error of the same in dtype."""
    heads = q.shape[2]
    group, block = heads // cache.kv_heads, cache.block_size
    scale = 1.0 / math.sqrt(q.shape[-1])
    for b, length in enumerate(cache.lengths.tolist()):
        args = (q[b, 0], cache.k[b], cache.v[b], sel[b, 0], length - 1, block, group, scale)
        exact = _attend_on(*args, torch.float64)
        err_low = (_attend_on(*args, dtype).double() - exact).abs().max().item()
        err_kernel = (out[b, 0].double() - exact).abs().max().item()
        assert err_kernel <= 2 * err_low + 1e-6, (b, err_kernel, err_low)


@pytest.mark.parametrize(("block", "top_k"), [(32, 16), (64, 4), (128, 8)])
def test_benchmark_shaped_step(poisoned_empty, kernel, block, top_k):
    """Batch 8, 32 / 8 heads, d 128, 64K tokens (ragged): the plan has the benchmark's structure (fused: two
    waves of routing items of several stages, eight attention units per kv head, all SMs busy; split: several
    routing ranges per kv head)."""
    from mobalab.kernels._cuda_decode import plan_decode
    from mobalab.kernels._cuda_decode_split import plan_split

    gen = torch.Generator(device=DEVICE).manual_seed(block + top_k)
    batch, kv_heads, heads, dim, n = 8, 8, 32, 128, 1 << 16
    lengths = [n - 1 - 977 * i for i in range(batch)]
    cache = MobaKVCache(batch, kv_heads, dim, block, n, dtype=torch.bfloat16, device=DEVICE)
    cache.prefill(_rand((batch, n - 1, kv_heads, dim), torch.bfloat16, gen),
                  _rand((batch, n - 1, kv_heads, dim), torch.bfloat16, gen), lengths=lengths)
    cache.append(_rand((batch, 1, kv_heads, dim), torch.bfloat16, gen), _rand((batch, 1, kv_heads, dim),
                                                                               torch.bfloat16, gen))
    plan = plan_decode(batch, 1, heads, kv_heads, dim, block, top_k, n, cache.n_blocks, cache.capacity,
                       torch.cuda.get_device_properties(0).multi_processor_count)
    assert plan.n_split > 1 and plan.blocks_per_split > 16384 // (4 * dim) and plan.n_x > 1
    assert plan_split(batch, 1, heads, kv_heads, dim, block, top_k, n, cache.n_blocks, cache.capacity).n_range > 1
    q = _rand((batch, 1, heads, dim), torch.bfloat16, gen)
    with poisoned_empty():
        out, lse, sel = _kernel_decode(q, cache, top_k, kernel)
    torch.cuda.synchronize()
    assert not torch.isnan(out.float()).any() and not torch.isnan(lse).any()
    slots = batch * heads * (top_k - 1)
    assert _check_routing_on_sums(q, cache, sel, top_k) <= 1e-3 * slots
    _check_last_token_attention(q, cache, sel, out, torch.bfloat16)
    assert int(cache._counters.abs().sum()) == 0
    # the routing-only launch (what the benchmark times as routing) writes the same selection
    from mobalab.kernels._cuda_decode import run, step_launches
    from mobalab.kernels._cuda_decode_split import split_launches

    if kernel == "fused":
        _, bufs, launches = step_launches(q, cache, top_k, 1.0 / math.sqrt(dim), route_only=True,
                                          sm_count=torch.cuda.get_device_properties(0).multi_processor_count)
        bufs["sel"].fill_(2**30)
        run(launches[0], 0)
    else:
        _, bufs, launches = split_launches(q, cache, top_k, 1.0 / math.sqrt(dim), route_only=True)
        assert [launch.kernel.split("_")[3] for launch in launches] == ["score", "select"]
        bufs["sel"].fill_(2**30)
        for launch in launches:
            run(launch, 0)
    torch.cuda.synchronize()
    assert torch.equal(bufs["sel"], sel) and int(cache._counters.abs().sum()) == 0


@pytest.mark.parametrize(("block", "top_k", "n"), [(64, 8, 128 * 1024), (16, 16, 128 * 1024 + 40)])
def test_split_routing_at_128k(poisoned_empty, block, top_k, n):
    """The split path's score and select launches alone at 128K tokens (2047 and 8194 candidate blocks, so
    several score ranges and select load rounds), 4 kv heads of 4 query heads, ragged: every selection equals the
    fp64 ranking on the block sums except at near-ties."""
    from mobalab.kernels._cuda_decode import run
    from mobalab.kernels._cuda_decode_split import split_launches

    gen = torch.Generator(device=DEVICE).manual_seed(block + n)
    batch, kv_heads, heads, dim = 2, 4, 16, 128
    lengths = [n - 1, n - 1 - 5000]
    cache = MobaKVCache(batch, kv_heads, dim, block, n, dtype=torch.bfloat16, device=DEVICE)
    cache.prefill(_rand((batch, n - 1, kv_heads, dim), torch.bfloat16, gen),
                  _rand((batch, n - 1, kv_heads, dim), torch.bfloat16, gen), lengths=lengths)
    cache.append(_rand((batch, 1, kv_heads, dim), torch.bfloat16, gen),
                 _rand((batch, 1, kv_heads, dim), torch.bfloat16, gen))
    q = _rand((batch, 1, heads, dim), torch.bfloat16, gen)
    with poisoned_empty():
        plan, bufs, launches = split_launches(q, cache, top_k, 1.0 / math.sqrt(dim), route_only=True)
    assert plan.n_range > 1
    for launch in launches:
        run(launch, 0)
    torch.cuda.synchronize()
    assert not (bufs["sel"] == 2**30).any(), "unwritten selection slots"
    assert _check_routing_on_sums(q, cache, bufs["sel"], top_k) <= 2  # near-ties only, and rare


def test_exact_ties_go_to_the_higher_block(poisoned_empty, kernel):
    """Every third block a copy of block 1 and queries equal to its sum: the copies' scores tie exactly and
    outrank every other block, so slots 1.. hold the highest-index copies in descending order (64K tokens,
    B 32: 2047 candidate blocks, 4 / 2 heads, both sequences)."""
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    batch, kv_heads, heads, dim, block, top_k, n = 2, 2, 8, 128, 32, 16, 64 * 1024
    k = _rand((batch, n, kv_heads, dim), torch.bfloat16, gen)
    v = _rand((batch, n, kv_heads, dim), torch.bfloat16, gen)
    copies = [1, *range(4, n // block, 3)]
    for j in copies[1:]:
        k[:, j * block:(j + 1) * block] = k[:, block:2 * block]
    cache = MobaKVCache(batch, kv_heads, dim, block, n, dtype=torch.bfloat16, device=DEVICE)
    cache.prefill(k[:, :n - 1], v[:, :n - 1])
    cache.append(k[:, n - 1:], v[:, n - 1:])
    cache.block_sums[:, :, copies[1:-1]] = cache.block_sums[:, :, 1:2]  # bitwise equal, whatever the reduction
    q = cache.block_sums[:, :, 1].repeat_interleave(heads // kv_heads, dim=1).unsqueeze(1).to(torch.bfloat16)
    with poisoned_empty():
        _, _, sel = _kernel_decode(q.contiguous(), cache, top_k, kernel)
    torch.cuda.synchronize()
    own = (n - 1) // block
    want = sorted((j for j in copies if j < own), reverse=True)[:top_k - 1]
    assert (sel[..., 0] == own).all()
    assert (sel[..., 1:] == torch.tensor(want, dtype=sel.dtype, device=DEVICE)).all(), sel[0, 0, 0].tolist()


@pytest.mark.parametrize(("block", "page_size", "dim", "dtype"), [
    (128, 128, 128, torch.bfloat16), (64, 256, 128, torch.float16), (16, 64, 64, torch.bfloat16)])
def test_paged_cache_decodes_bit_identically(poisoned_empty, block, page_size, dim, dtype):
    """The split kernel over a paged cache, its pages shuffled over the pool, against the same kernel over a
    contiguous cache holding the same tokens: selections, outputs and LSEs bit-identical at every step (only
    where a block is read differs); the fused kernel refuses a paged cache."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from _decode_cases import shuffle_pages

    gen = torch.Generator(device=DEVICE).manual_seed(block + page_size)
    lengths, steps, q_len, kv_heads, heads = [20_000, 700, 9_999, 4_100], 3, 2, 2, 8
    batch, total = len(lengths), max(lengths) + steps * q_len
    q = _rand((batch, total, heads, dim), dtype, gen)
    k = _rand((batch, total, kv_heads, dim), dtype, gen)
    v = _rand((batch, total, kv_heads, dim), dtype, gen)
    flat = MobaKVCache(batch, kv_heads, dim, block, total, dtype=dtype, device=DEVICE)
    paged = MobaKVCache(batch, kv_heads, dim, block, total, dtype=dtype, device=DEVICE, page_size=page_size)
    for cache in (flat, paged):
        cache.prefill(k, v, lengths=lengths)
    shuffle_pages(paged, torch.Generator().manual_seed(page_size))
    rows = torch.arange(batch, device=DEVICE).view(batch, 1)
    for step in range(steps):
        pos = (torch.tensor(lengths, device=DEVICE) + step * q_len).view(batch, 1) + torch.arange(q_len, device=DEVICE)
        for cache in (flat, paged):
            cache.append(k[rows, pos], v[rows, pos])
        with poisoned_empty():
            want = _kernel_decode(q[rows, pos], flat, 8, "split")
            got = _kernel_decode(q[rows, pos], paged, 8, "split")
        for x, y in zip(got, want, strict=True):
            assert torch.equal(x, y), step
    assert int(paged._counters.abs().sum()) == 0
    with pytest.raises(ValueError, match="reads contiguous caches only; this cache is paged"):
        _kernel_decode(q[rows, pos], paged, 8, "fused")


@pytest.mark.parametrize(("dtype", "block", "dim", "page_size"), [
    (torch.bfloat16, 64, 128, None), (torch.float16, 16, 64, None), (torch.bfloat16, 128, 128, 256)])
def test_input_centroid_decode_follows_moba_attention_of_that_precision(poisoned_empty, kernel, dtype, block, dim,
                                                                        page_size):
    """``centroid_precision="input"`` token by token: the selections are the CUDA router's of that precision over
    the whole sequence (``moba_topk``) on all but near-tied rows, and where they agree the outputs are
    ``moba_attention``'s of that precision within the 16-bit rounding; the fp32 routing of the same steps selects
    otherwise on many rows (keys of mean 2 and a spread of a few ulps there, so that rounding the means moves the
    ranking). The fused kernel refuses a paged cache (tested above), so it runs the contiguous cases only."""
    import sys
    from pathlib import Path

    from mobalab.kernels import moba_attention, moba_topk
    from mobalab.kernels._cuda_decode import decode_cuda

    sys.path.insert(0, str(Path(__file__).parent))
    from _decode_cases import ulp_at

    if kernel == "fused" and page_size is not None:
        pytest.skip("the fused kernel reads contiguous caches only")
    gen = torch.Generator(device=DEVICE).manual_seed(block + dim)
    lengths, steps, kv_heads, heads, top_k = [6000, 2500], 4, 2, 8, 8
    batch, total = len(lengths), max(lengths) + steps
    q = _rand((batch, total, heads, dim), dtype, gen)
    k = (2.0 + 16 * ulp_at(2.0, dtype) * torch.randn((batch, total, kv_heads, dim), generator=gen,
                                                   device=DEVICE)).to(dtype)
    v = _rand((batch, total, kv_heads, dim), dtype, gen)
    cache = MobaKVCache(batch, kv_heads, dim, block, total, dtype=dtype, device=DEVICE, page_size=page_size)
    cache.prefill(k, v, lengths=lengths)
    rows = torch.arange(batch, device=DEVICE).view(batch, 1)
    rows_seen = rows_equal = rows_fp32_differ = 0
    for step in range(steps):
        pos = (torch.tensor(lengths, device=DEVICE) + step).view(batch, 1)
        cache.append(k[rows, pos], v[rows, pos])
        qt = q[rows, pos]
        t_k, scale = D.check_decode(qt, cache, top_k)
        with poisoned_empty():
            out, _, sel = decode_cuda(qt, cache, t_k, scale, True, return_selection=True, kernel=kernel,
                                      centroid_precision="input")
            _, _, sel32 = decode_cuda(qt, cache, t_k, scale, True, return_selection=True, kernel=kernel)
        assert not torch.isnan(out.float()).any() and not (sel == 2**30).any()
        for b in range(batch):
            end = int(pos[b, 0]) + 1
            full = moba_attention(q[b:b + 1, :end], k[b:b + 1, :end], v[b:b + 1, :end], block, top_k,
                                  centroid_precision="input")[0, -1]
            want = moba_topk(q[b:b + 1, :end], k[b:b + 1, :end], block, top_k, centroid_precision="input")[0, -1]
            same = (sel[b, 0].sort(-1).values == want.sort(-1).values).all(-1)  # (heads,)
            rows_seen += heads
            rows_equal += int(same.sum())
            rows_fp32_differ += int((sel32[b, 0].sort(-1).values != sel[b, 0].sort(-1).values).any(-1).sum())
            eps = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
            torch.testing.assert_close(out[b, 0][same].float(), full[same].float(), atol=4 * eps, rtol=4 * eps)
    assert rows_equal >= 0.97 * rows_seen, (rows_equal, rows_seen)
    assert rows_fp32_differ >= 0.2 * rows_seen, (rows_fp32_differ, rows_seen)


@pytest.mark.parametrize("precision", ["fp32", "input"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
def test_a_block_with_a_non_finite_key_is_never_selected(poisoned_empty, kernel, value, precision):
    """One key element of block 2 infinite or NaN: the block's sum is not finite, so no query selects it (it
    scores NaN, as in ``moba_topk``, whatever sign a query gives an infinite product), the selections are the
    fp64 ranking's (near-ties aside), and the outputs stay finite."""
    from mobalab.kernels._cuda_decode import decode_cuda

    gen = torch.Generator(device=DEVICE).manual_seed(5)
    batch, kv_heads, heads, dim, block, top_k, n = 2, 2, 8, 128, 64, 8, 4000
    q = _rand((batch, 1, heads, dim), torch.bfloat16, gen)
    k = _rand((batch, n, kv_heads, dim), torch.bfloat16, gen)
    v = _rand((batch, n, kv_heads, dim), torch.bfloat16, gen)
    k[:, 2 * block + 1, :, 3] = value
    q[..., 3] = torch.where(torch.arange(heads, device=DEVICE) % 2 == 0, 1.0, -1.0).to(q.dtype)  # both signs
    cache = MobaKVCache(batch, kv_heads, dim, block, n, dtype=torch.bfloat16, device=DEVICE)
    cache.prefill(k[:, :n - 1], v[:, :n - 1])
    cache.append(k[:, n - 1:], v[:, n - 1:])
    t_k, scale = D.check_decode(q, cache, top_k)
    with poisoned_empty():
        out, lse, sel = decode_cuda(q, cache, t_k, scale, True, return_selection=True, kernel=kernel,
                                    centroid_precision=precision)
    torch.cuda.synchronize()
    assert not (sel == 2).any(), "the block with a non-finite key was selected"
    assert torch.isfinite(out.float()).all() and torch.isfinite(lse).all()
    if precision == "fp32":  # the other slots as ranked in fp64 on the sums
        assert _check_routing_on_sums(q, cache, sel, t_k, dropped=(2,)) <= 2
