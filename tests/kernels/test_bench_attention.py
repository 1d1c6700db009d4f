"""The attention benchmark's CPU-checkable parts: entry point, FLOP counts against brute force."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mobalab.bench import attention as bench


def test_main_without_a_gpu_says_what_it_needs(capsys, monkeypatch):
    monkeypatch.setattr("mobalab.kernels.gpu_available", lambda: False)
    assert bench.main(["--quick", "--out", "unused"]) == 2
    assert "needs an NVIDIA GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    assert capsys.readouterr().out.startswith("usage: mobalab bench")


@pytest.mark.parametrize("seqlen, block, top_k", [(37, 4, 3), (64, 8, 8), (5, 8, 2), (17, 16, 2), (13, 4, 9)])
@pytest.mark.parametrize("causal", [True, False])
def test_flop_counts_match_brute_force(seqlen, block, top_k, causal):
    n_blocks = math.ceil(seqlen / block)
    t = torch.arange(seqlen)
    scored = (t // block).sum().item() if causal else seqlen * n_blocks
    assert bench.routing_flops(2, seqlen, 3, 16, block, causal) == 2 * 2 * 3 * scored * 16
    if causal:  # own block up to t, plus min(own, top_k - 1) full past blocks
        keys = ((t % block) + 1 + torch.clamp(t // block, max=top_k - 1) * block).sum().item()
    else:  # the keys of the blocks the reference selects: all of them at k >= n, at most k full blocks below
        from mobalab.kernels import reference

        q, k = torch.randn(2, 1, seqlen, 1, 8).unbind(0)
        sel = reference.moba_topk(q, k, block, top_k, causal=False)[0, :, 0]
        sizes = torch.tensor([min(block, seqlen - j * block) for j in range(n_blocks)])
        actual = sizes[sel.clamp(min=0).long()].masked_fill(sel < 0, 0).sum().item()
        keys = seqlen * min(top_k * block, seqlen)
        assert actual == keys if top_k >= n_blocks else actual <= keys == seqlen * top_k * block
    assert bench.attended_keys(seqlen, block, top_k, causal) == keys
    assert bench.attention_flops(2, seqlen, 3, 16, block, top_k, causal) == 4 * 2 * 3 * keys * 16
    assert bench.dense_flops(1, seqlen, 1, 1, causal) == 4 * seqlen * seqlen // (2 if causal else 1)
    assert {"seqlen", "block", "head_dim", "mobalab_ms", "scratch_budget_bytes"} <= set(bench.COLUMNS)


# --------------------------------------------------------------------------------------------------
# head dims


def test_parse_head_dims_keeps_order_and_refuses_unsupported():
    assert bench.parse_head_dims("32,64,96,128,256") == (32, 64, 96, 128, 256)
    assert bench.parse_head_dims(" 128 ,64,128") == (128, 64)
    for bad in ("48", "64,", "", "sixty-four", "-64"):
        with pytest.raises(ValueError, match="supported: 32, 64, 96, 128, 256"):
            bench.parse_head_dims(bad)
    with pytest.raises(TypeError):
        bench.parse_head_dims(64)


def test_head_dims_option_on_the_command_line(capsys, monkeypatch):
    for argv in (["--head-dims", "48"], ["--dims", "--backward"], ["--dims", "--quick"]):
        with pytest.raises(SystemExit):
            bench.main(argv)
        assert "error:" in capsys.readouterr().err
    monkeypatch.setattr("mobalab.kernels.gpu_available", lambda: False)
    assert bench.main(["--head-dims", "32,256", "--out", "unused"]) == 2  # parsed, then stopped for want of a GPU


def test_head_dims_sweep_the_head_dim_128_configurations():
    assert bench.configs(True, None) == bench.configs(True)  # default: the sweep as it is
    assert bench.backward_configs(False, None) == bench.backward_configs(False)
    for sweep, dim_at in ((bench.configs, 4), (bench.backward_configs, 4)):
        for quick in (True, False):
            base = sweep(quick)
            swept = sweep(quick, (256, 32))
            at_128 = [c for c in base if c[dim_at] == 128]
            assert len(swept) == 2 * len(set(at_128))
            assert [c[dim_at] for c in swept[:2]] == [256, 32]  # configuration order first, then the head dims
            # the same configurations, head dim swapped
            strip = {c[:dim_at] + c[dim_at + 1:] for c in swept}
            assert strip == {c[:dim_at] + c[dim_at + 1:] for c in at_128}
    # the full forward sweep's own head-dim-64 rows are replaced by the swept ones, not added twice
    assert all(c[4] == 64 for c in bench.configs(False, (64,)))
    assert len(bench.configs(False, (64,))) == len([c for c in bench.configs(False) if c[4] == 128])


def test_useful_flops_carry_the_head_dim():
    for d in (32, 64, 96, 256):
        assert bench.routing_flops(2, 65536, 16, d, 128, True) * 128 == bench.routing_flops(2, 65536, 16, 128, 128,
                                                                                             True) * d
        assert bench.attention_flops(2, 65536, 16, d, 128, 8, True) * 128 == bench.attention_flops(
            2, 65536, 16, 128, 128, 8, True) * d


def _rows(rates):
    return [dict(timed=timed, head_dim=d, ms=1.0, useful_tflops=t, variant="resident")
            for timed, by_dim in rates.items() for d, t in by_dim.items()]


def test_dims_summary_ratio_to_head_dim_128_per_pass():
    rows = _rows({"forward+backward": {256: 69.9, 128: 100.0, 32: 50.0},
                  "forward": {32: 39.0, 64: 41.0, 96: 56.0, 128: 80.0, 256: 56.0}})
    out = bench.dims_summary(rows)
    assert [(r["timed"], r["head_dim"]) for r in out] == [("forward", d) for d in (32, 64, 96, 128, 256)] + [
        ("forward+backward", d) for d in (32, 128, 256)]
    got = {(r["timed"], r["head_dim"]): (round(r["vs_d128"], 4), r["target"], r["result"]) for r in out}
    assert got[("forward", 32)] == (0.4875, 0.5, "missed")
    assert got[("forward", 64)] == (0.5125, 0.5, "met")
    assert got[("forward", 96)] == (0.7, 0.7, "met")  # the boundary counts as met
    assert got[("forward", 256)] == (0.7, 0.7, "met")
    assert got[("forward+backward", 256)] == (0.699, 0.7, "missed")  # against the same pass's d 128, not forward's
    assert got[("forward+backward", 32)] == (0.5, 0.5, "met")
    assert got[("forward", 128)][0] == 1.0 and got[("forward", 128)][2] == "reference"
    assert all(math.isnan(r["target"]) for r in out if r["head_dim"] == 128)


def test_dims_summary_without_head_dim_128_says_n_a():
    out = bench.dims_summary(_rows({"forward": {32: 40.0, 96: 60.0}}))
    assert [r["result"] for r in out] == ["n/a", "n/a"] and all(math.isnan(r["vs_d128"]) for r in out)


def test_dims_table():
    rows = _rows({"forward": {128: 80.0, 256: 50.0}, "forward+backward": {128: 100.0, 256: 80.0}})
    text = bench.markdown_dims(rows, {"cuda_device": "GPU", "utc": "now"})
    assert "N 64K, B 128, k 8" in text and "GPU" in text
    assert "| timed | d | kernel | ms | useful TFLOP/s | vs d 128 | target | result |" in text
    assert "| forward | 256 | resident | 1.00 | 50.0 | 0.62 | ≥ 0.7 | missed |" in text
    assert "| forward+backward | 256 | resident | 1.00 | 80.0 | 0.80 | ≥ 0.7 | met |" in text
    assert "| forward | 128 | resident | 1.00 | 80.0 | 1.00 |  | reference |" in text


def test_dims_run_writes_its_table_head_dim_128_first(tmp_path, monkeypatch):
    seen = []

    def fake_run(dim, budget_s=0.5):
        seen.append(dim)
        return [dict(timed=t, head_dim=dim, ms=1.0, useful_tflops=dim / f, variant="resident")
                for t, f in (("forward", 1.0), ("forward+backward", 2.0))]

    monkeypatch.setattr("mobalab.kernels.gpu_available", lambda: True)
    monkeypatch.setattr(bench, "run_record", lambda: {"cuda_device": "GPU", "utc": "now"})
    monkeypatch.setattr(bench, "run_dims_config", fake_run)
    assert bench.main(["--dims", "--out", str(tmp_path)]) == 0
    assert seen == [128, 32, 64, 96, 256]
    table = (tmp_path / "dims_table.md").read_text()
    assert "| forward | 32 | resident | 1.00 | 32.0 | 0.25 | ≥ 0.5 | missed |" in table
    assert "| forward+backward | 256 | resident | 1.00 | 128.0 | 2.00 | ≥ 0.7 | met |" in table
    assert (tmp_path / "dims.csv").read_text().count("\n") == 11  # header + 5 head dims x 2 passes
    seen.clear()
    assert bench.main(["--dims", "--head-dims", "256", "--out", str(tmp_path)]) == 0
    assert seen == [128, 256]  # head dim 128 always runs: the ratios need it


def test_backward_table_shows_the_graph_replays_when_timed():
    row = dict(workload="random", seqlen=8192, head_dim=128, block=128, fwd_ms=1.4, fwdbwd_ms=3.4, bwd_ms=2.0,
               fwd_useful_tflops=50.0, bwd_useful_tflops=150.0, bwd_over_fwd_rate=3.0, cudnn_fwdbwd_ms=3.9,
               speedup_vs_cudnn=1.15)
    env = {"cuda_device": "GPU", "utc": "now"}
    assert "CUDA graphs" not in bench.markdown_backward([row], env)
    row.update(fwdbwd_graph_ms=3.0, fa2_fwdbwd_graph_ms=6.0, cudnn_fwdbwd_graph_ms=3.75, graph_speedup_vs_fa2=2.0,
               graph_speedup_vs_cudnn=1.25)
    text = bench.markdown_backward([row], env)
    assert "| 8K | 128 | 3.00 | 6.00 | 3.75 | 2.00 | 1.25 | n/a | n/a | n/a |" in text
    assert set(row) - set(bench.BWD_COLUMNS) == set()


def test_backward_table_shows_back_to_back_steps_when_timed():
    row = dict(workload="random", seqlen=16384, head_dim=128, block=128, fwd_ms=2.7, fwdbwd_ms=6.5, bwd_ms=3.8,
               fwd_useful_tflops=90.0, bwd_useful_tflops=160.0, bwd_over_fwd_rate=1.8)
    env = {"cuda_device": "GPU", "utc": "now"}
    assert "back to back" not in bench.markdown_backward([row], env)
    row.update(fwdbwd_queued_ms=5.9, fa2_fwdbwd_queued_ms=24.3, cudnn_fwdbwd_queued_ms=14.75,
               queued_speedup_vs_fa2=24.3 / 5.9, queued_speedup_vs_cudnn=14.75 / 5.9, fwd_queued_ms=2.4,
               bwd_queued_ms=3.5, bwd_queued_useful_tflops=171.4)
    text = bench.markdown_backward([row], env)
    assert "back to back" in text and "CUDA graphs" not in text
    assert "| 16K | 128 | 5.90 | 24.30 | 14.75 | 4.12 | 2.50 | 2.40 | 3.50 | 171 |" in text
    assert set(row) - set(bench.BWD_COLUMNS) == set()


@pytest.mark.parametrize("flag", ["--graph", "--queued"])
def test_step_timing_options_need_backward(capsys, flag):
    with pytest.raises(SystemExit):
        bench.main([flag])
    assert f"{flag} applies to --backward and --peers-quick" in capsys.readouterr().err


def test_a_build_option_run_compiles_every_mobalab_launch_with_it_and_says_so(tmp_path, monkeypatch, capsys):
    from mobalab.kernels import _cuda_backward, _launch

    launched = []
    monkeypatch.setattr("mobalab.kernels.gpu_available", lambda: True)
    monkeypatch.setattr(bench, "run_record", lambda: {"cuda_device": "GPU", "utc": "now"})
    monkeypatch.setattr(_cuda_backward, "launch", lambda plan: launched.append(plan.defines))

    def fake_backward(args, env):  # a launch of the wgmma backward from inside the run, then the run's table
        _cuda_backward.launch(_launch.Launch("attention_bwd_wgmma.cu", "k", (1,), (32,), ()))
        row = dict(workload="random", seqlen=8192, head_dim=128, block=128, fwd_ms=1.4, fwdbwd_ms=3.4, bwd_ms=2.0,
                   fwd_useful_tflops=50.0, bwd_useful_tflops=150.0, bwd_over_fwd_rate=3.0)
        print(bench.markdown_backward([row], env))
        return 0

    monkeypatch.setattr(bench, "main_backward", fake_backward)
    option = "attention_bwd_wgmma.cu:MOBA_BWD_WG_STEP_DESC=0"
    assert bench.main(["--backward", "--build-option", option, "--out", str(tmp_path)]) == 0
    assert launched == [("MOBA_BWD_WG_STEP_DESC=0",)]
    assert f"-- GPU, now, build options {option}" in capsys.readouterr().out
    assert json.loads((tmp_path / "bench_env.json").read_text())["build_options"] == [option]
    _cuda_backward.launch(_launch.Launch("attention_bwd_wgmma.cu", "k", (1,), (32,), ()))
    assert launched[-1] == ()  # only within the run
