"""The benchmark peers' CPU-checkable parts: FlexAttention with a MoBA mask against the reference, the
block-mask construction, FlashMoBA's availability and the selection comparison."""

from __future__ import annotations

import pytest
import torch

from mobalab.bench import _flash_moba_peer as fm
from mobalab.bench import _flex_peer as fx
from mobalab.kernels.reference import moba_attention_given_routing, moba_topk

pytest.importorskip("torch.nn.attention.flex_attention")


def _inputs(seqlen, heads, kv_heads, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, seqlen, heads, dim, generator=g)
    k = torch.randn(2, seqlen, kv_heads, dim, generator=g)
    v = torch.randn(2, seqlen, kv_heads, dim, generator=g)
    return q, k, v


def _selection_mask(topk, block, seqlen, causal):
    """bool (b, h, N, N): key j in S_t (docs/design.md, "MoBA semantics"), from the routing."""
    sel = topk.permute(0, 2, 1, 3).long()
    blk = torch.arange(seqlen) // block
    keep = (sel.unsqueeze(-1) == blk).any(-2)
    if causal:
        keep &= torch.ones(seqlen, seqlen, dtype=torch.bool).tril()
    return keep


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kv_heads, kv_tile", [(2, None), (1, 32), (2, 64)])
def test_flex_with_moba_mask_equals_reference(causal, kv_heads, kv_tile):
    seqlen, block, top_k = 256, 32, 3
    q, k, v = _inputs(seqlen, 2, kv_heads, 32)
    topk = moba_topk(q, k, block, top_k, causal=causal)
    mask = fx.moba_block_mask(topk, block, seqlen, causal, kv_tile=kv_tile)
    out = fx.flex_moba_attention(q, k, v, topk, block, causal, block_mask=mask)
    ref, _ = moba_attention_given_routing(q, k, v, topk, block, causal=causal)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("block, kv_tile", [(32, 128), (32, 32), (48, 128), (256, 256), (256, 64), (48, 16)])
def test_tile_union_is_the_smallest_cover_of_the_selection(causal, block, kv_tile):
    seqlen, top_k = 512, 3
    q, k, _ = _inputs(seqlen, 2, 2, 16, seed=1)
    topk = moba_topk(q, k, block, top_k, causal=causal)
    union = fx.tile_union(topk, block, seqlen, kv_tile=kv_tile)
    keep = _selection_mask(topk, block, seqlen, False)  # block membership, before the causal cut
    n_q, n_kv = union.shape[-2:]
    pad_q, pad_kv = n_q * fx.Q_TILE - seqlen, n_kv * kv_tile - seqlen
    tiles = torch.nn.functional.pad(keep, (0, pad_kv, 0, pad_q))
    tiles = tiles.view(2, 2, n_q, fx.Q_TILE, n_kv, kv_tile).any(-1).any(-2)
    assert torch.equal(union, tiles)
    assert union.any(-1).all()  # every query tile lists at least its own tile


def test_mask_mod_is_the_token_selection():
    seqlen, block = 256, 32
    q, k, _ = _inputs(seqlen, 2, 2, 16, seed=2)
    for causal in (True, False):
        topk = moba_topk(q, k, block, 3, causal=causal)
        mm = fx.moba_mask_mod(topk, block, causal)
        t = torch.arange(seqlen)
        got = torch.stack([torch.stack([mm(torch.tensor(b), torch.tensor(h), t.view(-1, 1), t.view(1, -1))
                                        for h in range(2)]) for b in range(2)])
        assert torch.equal(got, _selection_mask(topk, block, seqlen, causal))


def test_flex_refuses_what_it_cannot_run():
    assert fx.flex_unavailable(64 * 1024, 128) is None
    assert "int32" in fx.flex_unavailable(256 * 1024, 128)
    assert "multiple of 128" in fx.flex_unavailable(1000, 128)
    assert fx.kv_tile_for(128) == 128 and fx.kv_tile_for(256) == 256 and fx.kv_tile_for(32) == 128


# --------------------------------------------------------------------------------------------------
# FlashMoBA


def test_flash_moba_absent_is_a_reason_not_an_error(monkeypatch, tmp_path):
    monkeypatch.setattr(fm, "_LOADED", None)
    monkeypatch.setenv(fm.DIR_ENV, str(tmp_path))  # an empty folder: nothing to import
    monkeypatch.setitem(__import__("sys").modules, "flash_moba", None)
    reason = fm.unavailable(torch.bfloat16, 128, True, 8, 16, 16)
    assert reason.startswith("flash_moba not importable")
    row = fm.run_flash_moba(*_inputs(128, 2, 2, 16), 32, 3, True, time_ms=None)
    assert row == {"flashmoba_note": f"n/a ({reason})"}
    monkeypatch.setattr(fm, "_LOADED", None)


def test_pack_is_the_varlen_layout():
    q = torch.randn(3, 5, 2, 4)
    qp, cu = fm.pack(q)
    assert qp.shape == (15, 2, 4) and cu.tolist() == [0, 5, 10, 15] and cu.dtype == torch.int32
    assert torch.equal(qp[cu[1]:cu[2]], q[1])


@pytest.mark.parametrize("causal, kv_heads", [(True, 2), (False, 1)])
def test_selection_agreement_counts_rows_and_arbitrates_with_fp64(causal, kv_heads):
    seqlen, block, top_k = 200, 32, 3  # a partial last block
    q, k, _ = _inputs(seqlen, 2, kv_heads, 16, seed=3)
    exact = moba_topk(q.double(), k.double(), block, top_k, causal=causal)
    assert fm.selection_agreement(exact, exact.flip(-1), q, k, block, top_k, causal)["rows_differ"] == 0
    # swap one selected past block for an unselected one in some rows: those rows differ, only `exact` is fp64
    other = exact.clone()
    rows = [(0, 150, 1), (1, 199, 0), (1, 120, 1)]
    for b, t, h in rows:
        chosen = set(other[b, t, h].tolist())
        spare = next(j for j in range(t // block) if j not in chosen) if causal else \
            next(j for j in range(7) if j not in chosen)
        other[b, t, h, -1] = spare
    res = fm.selection_agreement(other, exact, q, k, block, top_k, causal)
    assert res["rows_differ"] == pytest.approx(len(rows) / (2 * seqlen * 2))
    assert res["checked"] == len(rows) and res["a_is_fp64"] == 0 and res["b_is_fp64"] == 1
    res = fm.selection_agreement(other, exact, q, k, block, top_k, causal, max_rows=2)
    assert res["checked"] == 2 and res["b_is_fp64"] == 1


# --------------------------------------------------------------------------------------------------
# benchmark hooks


def test_parse_peers_and_the_cli_flags(capsys, monkeypatch):
    from mobalab.bench import attention as bench

    assert bench.parse_peers("none") == () and bench.parse_peers("flex") == ("flex",)
    with pytest.raises(ValueError, match="'fa3' in 'flex,fa3' is not a peer; supported: flex, flashmoba"):
        bench.parse_peers("flex,fa3")
    with pytest.raises(TypeError, match="peers"):
        bench.parse_peers(None)
    for argv in (["--peers", "fa3"], ["--peers-quick", "--backward"]):
        with pytest.raises(SystemExit):
            bench.main(argv)
    monkeypatch.setattr("mobalab.kernels.gpu_available", lambda: False)
    assert bench.main(["--peers-quick", "--out", "unused"]) == 2
    assert "needs an NVIDIA GPU" in capsys.readouterr().err


def test_peers_table_shows_times_ratios_and_reasons(tmp_path):
    from mobalab.bench import attention as bench

    common = dict(seqlen=65536, head_dim=128, block=128, top_k=8)
    fwd = dict(common, mobalab_ms=10.0, attention_ms=8.0, flex_ms=40.0, flex_rel_err=0.002, flex_tiles=300.0,
               flex_compile_s=12.0, flashmoba_note="n/a (flash_moba not importable: ImportError: x)")
    bench._peer_ratios(fwd, "flex", "attention_ms", 8e12)
    bench._peer_ratios(fwd, "flashmoba", "mobalab_ms", 1e12)  # not run: no keys added
    bwd = dict(common, fwdbwd_ms=30.0, flex_note="n/a (N > 128K: mask indexing overflows int32)", flashmoba_ms=60.0,
               flashmoba_rel_err=float("nan"))
    bench._peer_ratios(bwd, "flashmoba", "fwdbwd_ms", 3e12)
    assert fwd["flex_x"] == 5.0 and fwd["flex_tflops"] == 200.0 and "flashmoba_x" not in fwd
    assert bwd["flashmoba_x"] == 2.0 and bwd["flashmoba_tflops"] == 50.0
    table = bench.markdown_peers([fwd, bwd], {}, ("flex", "flashmoba"), ["forward", "forward+backward"])
    lines = table.splitlines()
    assert "| forward | 64K | 128 | 128 | 8 | 10.00 (8.00) | 40.00 (5.00x) | n/a (flash_moba not" in lines[-2]
    assert "| 30.00 | n/a (N > 128K: mask indexing overflows int32) | 60.00 (2.00x) |" in lines[-1]
    bench._write_rows(tmp_path / "p.csv", [fwd, bwd], ["seqlen"])
    header = (tmp_path / "p.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["seqlen", "flex_ms", "flex_x"] and "flashmoba_note" in header and "flex_note" in header


def test_peers_are_timed_back_to_back_as_mobalab_is(monkeypatch):
    """With a step timer (``--queued``), each peer's forward + backward is timed again by that timer and its ratio
    taken against mobalab's step timed the same way; the table shows both timings."""
    from mobalab.bench import _flash_moba_peer
    from mobalab.bench import attention as bench

    calls = []

    def fake_flash_moba(q, k, v, block, top_k, causal, timing, **kw):
        ms, _ = timing(lambda: None, budget_s=0.3)
        calls.append(ms)
        return {"flashmoba_ms": ms}

    monkeypatch.setattr(_flash_moba_peer, "run_flash_moba", fake_flash_moba)
    monkeypatch.setattr(bench, "time_ms", lambda fn, budget_s: (6.0, 10))
    q = torch.zeros(1, 4, 1, 8)
    assert bench.run_peers(("flashmoba",), q, q, q, 2, 2, True, dout=q) == {"flashmoba_ms": 6.0}
    assert bench.run_peers(("flashmoba",), q, q, q, 2, 2, True, dout=q, timer=lambda fn: 5.0) == {"flashmoba_ms": 5.0}
    assert calls == [6.0, 5.0]
    row = dict(seqlen=8192, head_dim=128, block=128, top_k=8, fwdbwd_ms=3.0, flashmoba_ms=6.0, flashmoba_x=2.0,
               fwdbwd_queued_ms=2.5, flashmoba_queued_ms=5.0, flashmoba_queued_x=2.0)
    table = bench.markdown_peers([row], {}, ("flashmoba",), ["forward+backward"])
    assert "mobalab ms, back to back | FlashMoBA ms (x), back to back |" in table
    assert table.splitlines()[-1].endswith("| 2.50 | 5.00 (2.00x) |")
    assert {"fwdbwd_queued_ms", "flashmoba_queued_ms", "flashmoba_queued_x"} <= set(bench.PEER_COLUMNS)


@pytest.mark.gpu
def test_flex_and_flash_moba_peers_on_the_gpu():
    """Compiled FlexAttention with the MoBA mask equals mobalab on the GPU; FlashMoBA runs when importable,
    else reports why; neither raises."""
    from mobalab.bench import attention as bench
    from mobalab.kernels import moba_attention
    from mobalab.kernels._cuda_routing import moba_topk_cuda

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(1, 2048, 2, 128, device="cuda", dtype=torch.bfloat16, generator=g)
                     for _ in range(4))
    topk = moba_topk_cuda(q, k, 128, 4, causal=True)
    ref = moba_attention(q, k, v, 128, 4, causal=True)
    row = bench.run_peers(("flex", "flashmoba"), q, k, v, 128, 4, True, topk=topk, ref_out=ref, budget_s=0.05)
    assert row["flex_rel_err"] < 1e-2 and row["flex_ms"] > 0
    assert ("flashmoba_ms" in row and row["flashmoba_rel_err"] < 2e-2) or row["flashmoba_note"].startswith("n/a")
    both = bench.run_peers(("flex", "flashmoba"), q, k, v, 128, 4, True, topk=topk, dout=dout, budget_s=0.05)
    assert both["flex_ms"] > 0 and ("flashmoba_ms" in both or both["flashmoba_note"].startswith("n/a"))
