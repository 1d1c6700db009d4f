"""`mobalab bench --decode` (the decode benchmark, in-process) and the decode cost `mobalab design` reports."""

from __future__ import annotations

import sys
import types

import pandas as pd
import pytest

from mobalab import cli
from mobalab.experiments.decode_cost import decode_cost_table

DESIGN = ["design", "--head-dim", "128", "--seq-len", "32768", "--top-k", "8", "--target", "0.5",
          "--delta-mu", "0.5", "--m", "4", "--block-sizes", "64,128"]


@pytest.fixture
def stand_in_decode(monkeypatch):
    """A stand-in for mobalab.bench.decode that records the arguments its main receives."""
    calls = []
    mod = types.ModuleType("mobalab.bench.decode")

    def main(argv=None):
        from mobalab.bench.decode import build_parser

        calls.append(build_parser().parse_args(argv))
        return 0

    real = __import__("mobalab.bench.decode", fromlist=["build_parser"])
    mod.build_parser = real.build_parser
    mod.main = main
    monkeypatch.setitem(sys.modules, "mobalab.bench.decode", mod)
    return calls


def test_bench_decode_without_gpu_says_what_it_needs(capsys, monkeypatch, stand_in_decode):
    monkeypatch.setattr("mobalab.kernels.gpu_available", lambda: False)
    assert cli.main(["bench", "--decode", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "mobalab bench --decode" in err and "needs an NVIDIA GPU" in err and "decode-cost" in err
    assert stand_in_decode == []


def test_bench_decode_runs_the_decode_benchmark_with_its_options(capsys, monkeypatch, stand_in_decode):
    monkeypatch.setattr("mobalab.kernels.gpu_available", lambda: True)
    assert cli.main(["bench", "--decode", "--quick", "--reps", "7", "--out", "there", "--no-flex"]) == 0
    args = stand_in_decode[0]
    assert args.quick and args.reps == 7 and args.out == "there" and args.no_flex
    assert cli.main(["bench", "--quick", "--decode"]) == 0  # the flag anywhere
    assert stand_in_decode[1].quick


def test_bench_decode_help_and_bad_flags_without_gpu(capsys, monkeypatch):
    monkeypatch.setattr("mobalab.kernels.gpu_available", lambda: False)
    assert cli.main(["bench", "--decode", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mobalab bench --decode") and "--reps" in out and "--profile" in out
    monkeypatch.setattr("mobalab.kernels.gpu_available", lambda: True)
    assert cli.main(["bench", "--decode", "--no-such-flag"]) == 2
    assert "usage: mobalab bench --decode" in capsys.readouterr().err


def test_design_reports_the_decode_cost_of_its_recommendation(capsys):
    assert cli.main([*DESIGN, "--decode-context", "524288", "--decode-batch", "4"]) == 0
    out = capsys.readouterr().out
    assert "largest: B = 128" in out
    ref = decode_cost_table(524288, 0.5, batch=4, block_sizes=(128,), top_ks=(8,), delta_mu=0.5, m=4).iloc[0]
    assert "decode cost of B = 128, k = 8 at N = 524288 (batch 4, 32 / 8 heads, d 128" in out
    assert f"{ref['bytes_per_step'] / 1e6:.1f} MB of HBM per step" in out
    assert f"{ref['centroid_bytes'] / 1e6:.1f} MB fp32 block sums" in out
    # by hand: batch 4 x 8 kv heads x 4095 past blocks x d 128 fp32 sums (one score pass of 4 rows); dense decode
    # reads K and V of every token (bf16) plus q and out of the 32 heads
    assert f"{4 * 8 * 4095 * 128 * 4 / 1e6:.1f} MB fp32 block sums" in out
    assert f"dense decode reads {(2 * 4 * 8 * 524288 * 128 * 2 + 2 * 4 * 32 * 128 * 2) / 1e6:.1f} MB" in out
    assert "no decode benchmark row" in out
    # the default context is --seq-len
    assert cli.main(DESIGN) == 0
    assert "at N = 32768 (batch 8," in capsys.readouterr().out


def test_design_decode_cost_reads_a_decode_benchmark_csv(capsys, tmp_path):
    csv = tmp_path / "decode.csv"
    pd.DataFrame(dict(seq_len=[524288, 524288], batch=[8, 8], heads=[32, 32], kv_heads=[8, 8], head_dim=[128, 128],
                      block_size=[128, 64], top_k=[8, 8], mobalab_ms=[0.125, 0.5],
                      dense_best_ms=[4.0, 4.0])).to_csv(csv, index=False)
    assert cli.main([*DESIGN, "--decode-context", "524288", "--decode-bench-csv", str(csv)]) == 0
    assert "measured step time: 0.125 ms, dense decode 4.000 ms (32.0x)" in capsys.readouterr().out
    assert cli.main([*DESIGN, "--decode-bench-csv", str(tmp_path / "missing.csv")]) == 2
    captured = capsys.readouterr()
    assert "argument --decode-bench-csv: decode benchmark CSV" in captured.err and "does not exist" in captured.err
    assert captured.out == ""  # refused before the design table is printed


@pytest.mark.parametrize("value", ["recorded", "2026-12-03-h200-decode-bb72941.csv", "2026-12-01-h200-decode-7e51062"])
def test_design_takes_the_recorded_decode_benchmarks_as_run_does(value, capsys):
    """The forms of `mobalab run decode-cost --bench-csv`: `recorded` and a recorded CSV's name, same resolution."""
    from mobalab.experiments.decode_cost import RECORDED_BENCH, find_bench_csv

    path = find_bench_csv(value)
    assert path.name == (RECORDED_BENCH if value == "recorded" else value.removesuffix(".csv") + ".csv")
    argv = [*DESIGN, "--decode-context", "524288"]  # B = 128, k = 8: a point every recorded benchmark timed
    assert cli.main([*argv, "--decode-bench-csv", value]) == 0
    out = capsys.readouterr().out
    assert "measured step time: 0." in out and "no decode benchmark row" not in out
    assert cli.main([*argv, "--decode-bench-csv", str(path)]) == 0
    assert capsys.readouterr().out == out  # the same as the file's full path


def test_design_decode_cost_of_input_precision_routing(capsys, tmp_path):
    """--decode-centroid-precision input: the 16-bit block means (half the fp32 sums' bytes) and the benchmark's
    rows of that precision."""
    assert cli.main([*DESIGN, "--decode-context", "524288", "--decode-centroid-precision", "input"]) == 0
    out = capsys.readouterr().out
    ref = decode_cost_table(524288, 0.5, block_sizes=(128,), top_ks=(8,), delta_mu=0.5, m=4,
                            centroid_precision="input").iloc[0]
    assert f"{ref['centroid_bytes'] / 1e6:.1f} MB 16-bit block means" in out and "fp32 block sums" not in out
    assert f"{8 * 8 * 4095 * 128 * 2 / 1e6:.1f} MB 16-bit block means" in out  # batch 8, 2 bytes an element
    assert f"{ref['bytes_per_step'] / 1e6:.1f} MB of HBM per step" in out
    csv = tmp_path / "decode.csv"
    pd.DataFrame(dict(seq_len=[524288] * 2, batch=[8] * 2, heads=[32] * 2, kv_heads=[8] * 2, head_dim=[128] * 2,
                      block_size=[128] * 2, top_k=[8] * 2, centroid_precision=["fp32", "input"],
                      mobalab_ms=[0.125, 0.1], dense_best_ms=[4.0, 4.0])).to_csv(csv, index=False)
    assert cli.main([*DESIGN, "--decode-context", "524288", "--decode-bench-csv", str(csv),
                     "--decode-centroid-precision", "input"]) == 0
    assert "measured step time: 0.100 ms, dense decode 4.000 ms (40.0x)" in capsys.readouterr().out


def test_design_without_a_feasible_block_says_so(capsys):
    argv = list(DESIGN)
    argv[argv.index("--target") + 1] = "0.99999"
    assert cli.main(argv) == 0
    assert "decode cost: no feasible block size to cost" in capsys.readouterr().out


def test_design_decode_cost_names_the_own_block_beside_the_past_blocks(capsys):
    """The K/V bytes hold the own block's tokens too; the block count printed beside them is of past blocks."""
    assert cli.main(["design", "--head-dim", "64", "--seq-len", "100", "--top-k", "8", "--target", "0.9",
                     "--block-sizes", "512"]) == 0
    out = capsys.readouterr().out
    assert "K/V of the own block and 0.0 selected past blocks per kv head" in out


def test_design_decode_cost_when_moba_reads_more_than_dense(capsys):
    """Top-k covering every past block reads the whole cache plus the block sums: the ratio is below 1, and said
    as a ratio, not as "x more"."""
    argv = [*DESIGN, "--decode-context", "1024", "--block-sizes", "128"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    ref = decode_cost_table(1024, 0.5, block_sizes=(128,), top_ks=(8,), delta_mu=0.5, m=4).iloc[0]
    assert ref["byte_ratio"] < 1
    assert f"({ref['byte_ratio']:.2f}x MoBA's bytes)" in out and "x more" not in out


def test_design_decode_cost_says_whether_the_newest_token_meets_the_target(capsys):
    assert cli.main([*DESIGN, "--decode-context", "1073741824"]) == 0
    out = capsys.readouterr().out
    assert "P(hit) of the newest token at N = 1073741824: 0.0" in out and "(below the target 0.5)" in out
    assert cli.main(DESIGN) == 0
    assert "(meets the target 0.5)" in capsys.readouterr().out


def test_design_decode_cost_without_a_matching_benchmark_row_names_the_csv(capsys):
    """A benchmark was given: the report says it has no row at this point, not to pass one."""
    argv = [*DESIGN, "--decode-context", "524288", "--decode-batch", "3", "--decode-bench-csv", "recorded"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "no decode benchmark row in 2026-12-03-h200-decode-36727b2.csv at this point" in out
    assert "pass --decode-bench-csv" not in out


def test_design_decode_cost_of_another_head_layout(capsys, tmp_path):
    argv = [*DESIGN, "--decode-context", "524288", "--decode-heads", "16", "--decode-kv-heads", "2"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    ref = decode_cost_table(524288, 0.5, heads=16, kv_heads=2, block_sizes=(128,), top_ks=(8,), delta_mu=0.5,
                            m=4).iloc[0]
    assert "(batch 8, 16 / 2 heads, d 128" in out and f"{ref['bytes_per_step'] / 1e6:.1f} MB of HBM per step" in out
    csv = tmp_path / "decode.csv"
    pd.DataFrame(dict(seq_len=[524288] * 2, batch=[8] * 2, heads=[32, 16], kv_heads=[8, 2], head_dim=[128] * 2,
                      block_size=[128] * 2, top_k=[8] * 2, mobalab_ms=[0.125, 0.25],
                      dense_best_ms=[4.0, 5.0])).to_csv(csv, index=False)
    assert cli.main([*argv, "--decode-bench-csv", str(csv)]) == 0
    assert "measured step time: 0.250 ms, dense decode 5.000 ms (20.0x)" in capsys.readouterr().out


@pytest.mark.parametrize(("extra", "message"), [
    (["--decode-context", "1"], "argument --decode-context: a decode context is an integer >= 2 tokens, got '1'"),
    (["--decode-heads", "32", "--decode-kv-heads", "6"],
     "--decode-heads (32) must be a multiple of --decode-kv-heads (6)"),
    (["--decode-kv-heads", "0"], "argument --decode-kv-heads: must be an integer >= 1, got '0'"),
    (["--seq-len", "1"], "pass --decode-context N"),
])
def test_design_refuses_a_bad_decode_setting_before_any_output(extra, message, capsys):
    assert cli.main([*DESIGN, *extra]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


def test_design_refuses_a_decode_csv_of_another_kind_before_any_output(capsys, tmp_path):
    csv = tmp_path / "bench.csv"
    pd.DataFrame(dict(seqlen=[8192], block=[64], mobalab_ms=[1.0])).to_csv(csv, index=False)
    assert cli.main([*DESIGN, "--decode-bench-csv", str(csv)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "argument --decode-bench-csv:" in captured.err and "lacks the columns" in captured.err
    assert "mobalab bench --decode" in captured.err
