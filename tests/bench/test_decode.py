"""The decode benchmark's CPU side: it imports, refuses clearly without a GPU, plans the sweep and counts bytes."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from mobalab.bench import decode as bench
from mobalab.kernels import decode_bytes, gpu_available

K = 1024


def test_without_a_gpu_it_says_so(tmp_path, capsys):
    if gpu_available():
        pytest.skip("a GPU is usable here")
    assert bench.main(["--quick", "--out", str(tmp_path / "out")]) == 2
    assert "needs an NVIDIA GPU with CUDA and CuPy" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_help_names_the_command(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--help"])
    assert exc.value.code == 0
    assert "mobalab bench --decode" in capsys.readouterr().out


def test_quick_sweep_holds_the_targets():
    quick = bench.configs(True)
    keys = {(c.seq_len, c.batch, c.block_size, c.top_k) for c in quick}
    assert {(512 * K, 8, 128, 8), (32 * K, 8, 128, 8)} <= keys
    assert any(c.batch >= 8 and c.seq_len >= 128 * K for c in quick)
    assert {c.block_size for c in quick} == {32, 64, 128} and {c.top_k for c in quick} == {4, 8, 16}
    assert all((c.heads, c.kv_heads, c.head_dim) == (32, 8, 128) for c in quick)
    full = bench.configs(False)
    assert {c.seq_len for c in full} == {8 * K, 32 * K, 128 * K, 512 * K, 1024 * K}
    assert {c.batch for c in full} == {1, 8, 64} and all(c.seq_len * c.batch <= bench.MAX_TOKENS for c in full)
    assert len(full) == len(set(full))


def test_selection_bytes_counts_the_union_per_kv_head():
    # 2 sequences of N = 100, B = 16 (7 blocks, the last holds 4 tokens), 4 heads on 2 kv heads, top_k 3
    sel = torch.tensor([[[[6, 1, 2], [6, 2, 0], [6, 5, -1], [6, 5, 4]]],
                        [[[6, 0, 1], [6, 0, 1], [6, 3, 2], [6, 2, 3]]]], dtype=torch.int32)
    got = bench.selection_bytes(sel, 100, 16, kv_heads=2, head_dim=8)
    # unions: seq 0: {6,1,2,0} {6,5,4}; seq 1: {6,0,1} {6,3,2} -> own block 4 tokens + past blocks of 16
    tokens = (4 + 3 * 16) + (4 + 2 * 16) + (4 + 2 * 16) + (4 + 2 * 16)
    assert got["kv_bytes"] == 2 * tokens * 8 * 2
    assert got["centroid_bytes"] == 2 * 2 * 1 * 6 * 8 * 4
    assert got["q_out_bytes"] == 2 * 2 * 4 * 8 * 2 + 2 * 4 * 4
    assert got["unique_blocks"] == pytest.approx((4 + 3 + 3 + 3) / 4)
    assert got["bytes_needed"] == got["kv_bytes"] + got["centroid_bytes"] + got["q_out_bytes"]
    # the 16-bit block means of centroid_precision="input": 2 bytes an element
    assert bench.selection_bytes(sel, 100, 16, kv_heads=2, head_dim=8, centroid_itemsize=2)["centroid_bytes"] == (
        2 * 2 * 1 * 6 * 8 * 2)
    # 65 query rows on one kv head: two score passes of 64 rows over the block sums
    wide = torch.zeros(1, 1, 65, 1, dtype=torch.int32)
    assert bench.selection_bytes(wide, 100, 16, kv_heads=1, head_dim=8)["centroid_bytes"] == 1 * 1 * 2 * 6 * 8 * 4


def test_selection_bytes_agree_with_the_shared_model():
    """Heads that all pick the same blocks: the byte model's "shared" case."""
    n, block, top_k = 4096, 128, 8
    own = (n - 1) // block
    blocks = torch.tensor([own, 3, 7, 11, 13, 17, 19, 23], dtype=torch.int32)
    sel = blocks.expand(2, 1, 32, top_k).contiguous()
    got = bench.selection_bytes(sel, n, block, kv_heads=8, head_dim=128)
    model = decode_bytes(n, block, top_k, batch=2, overlap="shared")
    for key in ("centroid_bytes", "kv_bytes", "q_out_bytes"):
        assert got[key] == model[key], key


def _row(n, batch, block, top_k, ms, dense_ms, frac):
    return dict(seq_len=n, batch=batch, block_size=block, top_k=top_k, mobalab_ms=ms, routing_ms=ms / 2,
                mobalab_eager_ms=ms * 3, sdpa_flash_ms=dense_ms, sdpa_cudnn_ms=math.nan, sdpa_efficient_ms=dense_ms * 2,
                dense_best="flash", dense_best_ms=dense_ms, flex_ms=math.nan, speedup_vs_dense=dense_ms / ms,
                bytes_needed=2e8, centroid_bytes=1.3e8, kv_bytes=7e7, unique_blocks=28.0, mobalab_tbps=3.4,
                roofline_fraction=frac, dense_tbps=4.0, copy_tbps=4.3)


def test_targets_and_table():
    rows = [_row(512 * K, 8, 128, 8, 0.1, 4.0, 0.8), _row(32 * K, 8, 128, 8, 0.1, 0.25, 0.5),
            _row(128 * K, 1, 128, 8, 0.05, 0.3, 0.2)]
    got = {what.split(":")[0]: met for what, _, _, met in bench.targets(rows)}
    assert got["512K batch 8 B 128 k 8"] is True and got["32K batch 8 B 128 k 8"] is False
    roof = [t for t in bench.targets(rows) if t[0].startswith("HBM roofline")]
    assert len(roof) == 1 and roof[0][1] == 0.8 and roof[0][3]  # batch 1 is not a roofline point
    table = bench.markdown(rows, {"cuda_device": "GPU", "utc": "now", "git_commit": "abc"})
    assert table.count("\n| ") == 4 and "NOT met" in table and "n/a" in table
    # every cell from the row's numbers: eager, SDPA backends, MB parts, roofline in %, dense TB/s
    assert ("| 512K | 8 | 128 | 8 | 0.100 (0.050) | 0.300 | 4.000 / n/a / 8.000 | n/a | 40.0 | 200.0 (130.0 + 70.0 + "
            "0.0) | 28.0 | 3.40 | 80% | 4.00 | fused |") in table.splitlines()
    assert "| 32K | 8 | 128 | 8 | 0.100 (0.050) | 0.300 | 0.250 / n/a / 0.500 | n/a | 2.50 | " in table  # 2 decimals


def test_targets_are_met_at_their_goals_and_the_roofline_is_the_worst_row():
    at_goal = _row(512 * K, 8, 128, 8, 0.1, 3.0, 0.95)
    at_goal["speedup_vs_dense"] = 30.0
    rows = [at_goal, _row(128 * K, 8, 64, 4, 0.1, 1.0, 0.7), _row(1024 * K, 8, 128, 16, 0.1, 1.0, 0.9),
            _row(1024 * K, 1, 128, 8, 0.1, 1.0, 0.1)]  # batch 1: not a roofline point
    got = bench.targets(rows)
    assert got[0][1:] == (30.0, ">= 30x", True)
    assert [t[1:] for t in got[1:]] == [(0.7, ">= 0.70", True)] and "(worst: 128K b8 B64 k4)" in got[1][0]
    rows[1]["roofline_fraction"] = 0.69
    assert bench.targets(rows)[1][1:] == (0.69, ">= 0.70", False)


def test_dense_bytes_read_the_whole_cache_and_q_out():
    # batch 2, N 100, 4 heads on 2 kv heads, d 8, bf16: K and V of every token, q and out of every head
    assert bench.dense_bytes(2, 100, 4, 2, 8) == 2 * (2 * 2 * 100 * 8) * 2 + 2 * (2 * 4 * 8) * 2 == 13056


def test_flex_block_mask_attends_the_selection(monkeypatch):
    """The FlexAttention baseline's BlockMask (selected blocks as full blocks + the matching mask_mod) gives the
    reference decode output; checked with flex_attention's unfused path on the CPU."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    from mobalab.kernels import MobaKVCache
    from mobalab.kernels import _decode as D

    g = torch.Generator().manual_seed(0)
    b, kvh, group, d, block, n = 2, 2, 4, 16, 16, 256
    k, v = torch.randn(b, n, kvh, d, generator=g), torch.randn(b, n, kvh, d, generator=g)
    q = torch.randn(b, 1, kvh * group, d, generator=g)
    cache = MobaKVCache(b, kvh, d, block, n)
    cache.prefill(k, v)
    sel = D._route(q, cache, 4)
    ref, _ = D._attend(q, cache, sel, 1 / math.sqrt(d))
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    with warnings.catch_warnings():  # flex_attention without torch.compile warns that it is unfused
        warnings.simplefilter("ignore", UserWarning)
        out = bench._flex_fn(q, cache.k, cache.v, sel, block, n)().transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_table_bytes_parts_add_up_to_the_total():
    """The MB cell's parts (block sums, K/V, q/out) sum to the total it shows, at a batch where q/out is over 1 MB."""
    sel = torch.tensor([255, 3, 7, 11, 13, 17, 19, 23], dtype=torch.int32).expand(64, 1, 32, 8).contiguous()
    row = _row(32 * K, 64, 128, 8, 0.1, 1.0, 0.5)
    row.update(bench.selection_bytes(sel, 32 * K, 128, kv_heads=8, head_dim=128))
    assert row["q_out_bytes"] > 1e6
    table = bench.markdown([row], {"cuda_device": "GPU", "utc": "now", "git_commit": "abc"})
    assert "MB needed (sums + K/V + q/out)" in table
    cell = table.split("\n")[4].split(" | ")[9]
    total, parts = cell.split(" (")
    assert abs(float(total) - sum(float(x) for x in parts.rstrip(")").split(" + "))) <= 0.15
