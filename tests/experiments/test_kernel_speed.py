import csv
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mobalab.experiments import kernel_speed as exp

K = 1024


def _write_bench(folder, device="NVIDIA H200 (synthetic fixture)"):
    """A small CSV shaped like `mobalab bench` output, numbers made up but consistent."""
    rows = []
    for d in (64, 128):
        for n in (8 * K, 32 * K, 128 * K):
            fa2 = 1e-9 * n * n * d / 8
            rows.append(dict(workload="random", seqlen=n, head_dim=d, block=128, top_k=8, variant="resident",
                             routing="cuda", mobalab_ms=fa2 / (n / (4 * K)), routing_ms=0.1 * fa2,
                             attention_ms=0.5 * fa2,
                             routing_share=0.3, fa2_ms=fa2, cudnn_ms=0.8 * fa2, useful_tflops=20.0 + n / K,
                             attention_tflops=40.0, routing_tflops=100.0, mobalab_peak_gb=0.1 * n / K,
                             fa2_peak_gb=0.12 * n / K, cudnn_peak_gb="" if n > 64 * K else 0.13 * n / K,
                             fa2_tflops=300.0, cudnn_tflops=400.0, batch=2, heads=16, causal=True, dtype="bf16",
                             reps=10))
    base = rows[-2]
    for b in (32, 64, 256):
        r = dict(base)
        r.update(block=b, mobalab_ms=r["mobalab_ms"] * b / 128, variant="streaming" if b == 256 else "resident")
        rows.append(r)
    rows.append(dict(rows[0], fa2_ms="", cudnn_ms=""))  # a failed dense baseline: blank cells
    rows[-1]["seqlen"] = 4 * K
    path = folder / "bench.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (folder / "bench_env.json").write_text(json.dumps({"device": device, "date": "2026-01-01 00:00 UTC"}))
    return path, rows


@pytest.fixture()
def bench(tmp_path):
    return _write_bench(tmp_path)


def test_schema_rows_and_speedups(bench):
    path, rows = bench
    df = exp.run(exp.Config(bench_csv=str(path)))
    assert len(df) == 3 * len(rows)
    assert set(df["method"]) == {"mobalab", "fa2", "cudnn"}
    assert {"experiment", "source", "device", "seqlen", "head_dim", "block", "latency_ms", "tflops", "peak_gb",
            "speedup_vs_fa2", "speedup_vs_cudnn"} <= set(df.columns)
    assert df["device"].str.contains("H200").all()
    assert set(df.loc[df["method"] == "mobalab", "backend"]) == {"cuda-kernel"}
    mob = df[df["method"] == "mobalab"].reset_index(drop=True)
    raw = pd.read_csv(path)
    np.testing.assert_allclose(mob["speedup_vs_fa2"], raw["fa2_ms"] / raw["mobalab_ms"])
    fa2 = df[df["method"] == "fa2"]["speedup_vs_fa2"].dropna()
    np.testing.assert_allclose(fa2, 1.0)
    assert math.isnan(mob["speedup_vs_fa2"].iloc[-1])  # blank dense cells stay missing, not zero
    s = exp.summary(df)
    assert len(s) == len(rows) and {"mobalab_ms", "fa2_ms", "cudnn_ms", "x_fa2", "useful_tflops"} <= set(s.columns)


def test_summary_keeps_configurations_that_differ_only_in_top_k(tmp_path):
    raw = pd.read_csv(exp.find_bench_csv("recorded")).head(2)
    other = raw.iloc[[0]].assign(top_k=raw["top_k"].iloc[0] * 2, mobalab_ms=raw["mobalab_ms"].iloc[0] * 2)
    path = tmp_path / "bench.csv"
    pd.concat([raw, other]).to_csv(path, index=False)
    s = exp.summary(exp.run(exp.Config(bench_csv=str(path))))
    same = s[(s["seqlen"] == raw["seqlen"].iloc[0]) & (s["block"] == raw["block"].iloc[0])]
    assert len(s) == 3 and sorted(same["top_k"]) == sorted([raw["top_k"].iloc[0], 2 * raw["top_k"].iloc[0]])
    by_k = same.set_index("top_k")["mobalab_ms"]
    assert by_k[2 * raw["top_k"].iloc[0]] == pytest.approx(2 * by_k[raw["top_k"].iloc[0]])


def test_plot_labelled(bench):
    df = exp.run(exp.Config(bench_csv=str(bench[0])))
    fig = exp.plot(df)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 6
    for ax in visible:
        assert ax.get_xlabel() and ax.get_ylabel() and ax.has_data()
        assert "(" in ax.get_ylabel() or "%" in ax.get_ylabel()  # units
    assert "H200" in fig._suptitle.get_text()


def test_missing_columns_and_missing_csv(tmp_path, monkeypatch):
    bad = tmp_path / "x.csv"
    pd.DataFrame({"seqlen": [1], "mobalab_ms": [1.0]}).to_csv(bad, index=False)
    with pytest.raises(ValueError, match="lacks the columns"):
        exp.run(exp.Config(bench_csv=str(bad)))
    with pytest.raises(FileNotFoundError, match="mobalab bench --out runs/bench"):
        exp.run(exp.Config(bench_csv=str(tmp_path / "nope.csv")))


def test_without_a_csv_or_gpu_the_recorded_csv_is_read_and_labelled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the checkout: the recorded CSV comes from the installed package
    monkeypatch.delenv(exp.ENV_VAR, raising=False)
    monkeypatch.setattr("mobalab.kernels.gpu_available", lambda: False)
    assert exp.Config().bench_csv is None
    assert exp.plan(exp.Config()).startswith("reads the recorded benchmark 2026-11-22-h200-moba-forward-43ade7f.csv")
    df = exp.run(exp.Config())
    assert df["recorded"].all() and set(df["commit"]) == {"43ade7f"} and set(df["device"]) == {"NVIDIA H200"}
    assert exp.caption(df).startswith("RECORDED forward benchmark, not measured on this machine")
    assert "recorded 2026-11-22" in exp.plot(df)._suptitle.get_text()


def test_a_measured_csv_is_not_labelled_recorded(bench):
    df = exp.run(exp.Config(bench_csv=str(bench[0])))
    assert not df["recorded"].any()
    assert exp.caption(df) == f"forward benchmark: NVIDIA H200 (synthetic fixture), 2026-01-01 00:00 UTC, " \
                              f"commit unknown ({bench[0]})"


@pytest.mark.parametrize("name", ["2026-11-22-h200-moba-fwdbwd-e4ca8e1.csv", "2026-11-22-h200-moba-fwdbwd-sweep"])
def test_forward_backward_csv(name):
    path = exp.find_bench_csv(name)
    raw = pd.read_csv(path)
    df = exp.run(exp.Config(bench_csv=name))
    assert set(df["pass"]) == {"forward+backward"} and len(df) == 3 * len(raw)
    mob = df[df["method"] == "mobalab"].reset_index(drop=True)
    np.testing.assert_allclose(mob["latency_ms"], raw["fwdbwd_ms"])
    np.testing.assert_allclose(mob["speedup_vs_fa2"], raw["fa2_fwdbwd_ms"] / raw["fwdbwd_ms"])
    np.testing.assert_allclose(mob["backward_share"], raw["bwd_ms"] / raw["fwdbwd_ms"])
    fa2 = df[df["method"] == "fa2"].reset_index(drop=True)
    # dense causal forward + backward FLOPs by the benchmark's convention: 3.5 x 4·b·h·N²·d / 2
    flops = 3.5 * 2 * raw["batch"] * raw["heads"] * raw["seqlen"] ** 2 * raw["head_dim"]
    np.testing.assert_allclose(fa2["tflops"], flops / (raw["fa2_fwdbwd_ms"] * 1e9))
    assert df["recorded"].all() and df["commit"].notna().all()
    if "sweep" in name:  # one figure is enough
        fig = exp.plot(df)
        assert "forward+backward" in fig._suptitle.get_text()
        assert any("backward share" in ax.get_title() for ax in fig.axes)
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_find_bench_csv():
    assert exp.find_bench_csv("recorded").name.endswith("moba-forward-43ade7f.csv")
    with pytest.raises(FileNotFoundError, match="recorded CSVs: .*fwdbwd-sweep.csv"):
        exp.find_bench_csv("no-such.csv")


def test_quick_benchmark_runs_in_process(tmp_path, monkeypatch, bench):
    """With no CSV and a GPU, run() calls mobalab.bench.attention.main in this process (no subprocess)."""
    import subprocess
    import sys
    import types

    calls = []

    def main(argv=None):
        calls.append(argv)
        out = Path(argv[argv.index("--out") + 1])
        out.mkdir(parents=True)
        _write_bench(out)
        return 0

    monkeypatch.setitem(sys.modules, "mobalab.bench.attention", types.SimpleNamespace(main=main))
    monkeypatch.setattr("mobalab.kernels.gpu_available", lambda: True)
    monkeypatch.setattr(subprocess, "run", None)
    monkeypatch.setattr(subprocess, "Popen", None)
    cfg = exp.Config(bench_csv=None, bench_out=str(tmp_path / "runs"))
    assert exp.plan(cfg).startswith("no benchmark CSV given: runs the quick benchmark on this GPU first")
    df = exp.run(cfg)
    assert calls and calls[0][0] == "--quick" and not df["recorded"].any()
    assert "quick-" in df["source"].iloc[0]


def test_default_csv_is_env_var_then_newest_under_runs_bench(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(exp.ENV_VAR, raising=False)
    (tmp_path / "runs" / "bench" / "a").mkdir(parents=True)
    old, _ = _write_bench(tmp_path / "runs" / "bench" / "a")
    new = tmp_path / "runs" / "bench" / "b.csv"
    new.write_text(old.read_text())
    import os

    os.utime(old, (1, 1))
    assert exp.Config().bench_csv == os.path.join("runs", "bench", "b.csv")
    monkeypatch.setenv(exp.ENV_VAR, str(old))
    assert exp.Config().bench_csv == str(old)


def test_required_columns_match_the_benchmark():
    import mobalab.bench.attention as bench
    assert set(exp.REQUIRED_COLUMNS) <= set(bench.COLUMNS)
    assert set(exp.BACKWARD_COLUMNS) <= set(bench.BWD_COLUMNS)


def test_cli_reads_env_csv(bench, tmp_path, monkeypatch):
    from mobalab.cli import main

    monkeypatch.setenv(exp.ENV_VAR, str(bench[0]))
    out = tmp_path / "out"
    assert main(["run", "kernel-speed", "--quick", "--out", str(out), "--no-progress"]) == 0
    for suffix in ("csv", "json", "png"):
        assert (out / f"kernel-speed.{suffix}").stat().st_size > 0
    meta = json.loads((out / "kernel-speed.json").read_text())
    assert meta["config"]["bench_csv"] == str(bench[0])


def test_a_peers_csv_is_refused_and_its_provenance_read_from_its_name():
    # the --peers CSV times mobalab beside FlexAttention / FlashMoBA per pass: read as a forward+backward sweep, its
    # forward rows came out all NaN
    from mobalab.experiments.kernel_speed import _bench_info, find_bench_csv, read_bench_csv

    path = find_bench_csv("2026-11-30-h200-peers-ce1fd61.csv")
    with pytest.raises(ValueError, match=r"timed per pass \(forward, forward\+backward\).*--peers"):
        read_bench_csv(path)
    info = _bench_info(path)  # no JSON beside it: the name says where and when
    assert (info["date"], info["commit"]) == ("2026-11-30", "ce1fd61")
    assert info["device"] == "NVIDIA H200 (from the file name)"
