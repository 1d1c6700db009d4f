"""The targets' arithmetic of the context-parallel summary, on benchmark files written as the bench writes them."""

import csv
import json

from mobalab.distributed import bench, summary


def _run(folder, layout, rows):
    folder.mkdir()
    (folder / "cp_bench_env.json").write_text(json.dumps({"layout": layout}))
    with open(folder / "cp_bench.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=bench.BENCH_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in bench.BENCH_COLUMNS})


def test_rates_use_the_slowest_rank_and_memory_the_one_gpu_tokens(tmp_path):
    one = dict(gpus=1, rank=0, mode="fwd+bwd", routing_ms=1)
    _run(tmp_path / "single", "contiguous", [
        dict(one, seq_len=1000, fwdbwd_ms=100, useful_tflop=5, peak_gb=2.0),
        dict(one, seq_len=2000, fwdbwd_ms=200, useful_tflop=20, peak_gb=4.0)])  # 100 TFLOP/s, 2 MB/token
    two = dict(gpus=2, mode="fwd+bwd", routing_ms=1)
    _run(tmp_path / "ring", "zigzag", [
        dict(two, seq_len=2000, rank=0, fwdbwd_ms=100, useful_tflop=9, peak_gb=2.1, model_ms=80),
        dict(two, seq_len=2000, rank=1, fwdbwd_ms=125, useful_tflop=11, peak_gb=2.5, model_ms=100),
        dict(two, seq_len=4000, rank=0, mode="fwd", fwd_ms=50, useful_tflop=1, peak_gb=9, note="too big"),
        dict(two, seq_len=4000, rank=1, mode="fwd", fwd_ms=50, useful_tflop=1, peak_gb=9, note="too big")])
    text = summary.summarize([str(tmp_path / "ring")], str(tmp_path / "single"))
    # 20 TFLOP over 2 GPUs x 125 ms = 80 TFLOP/s per GPU = 0.80 of one GPU; peak 2.5 of the 4.0 GB one GPU needs
    assert "| zigzag | 2000 | 2 | fwd+bwd | 125.0 | 1.0 | 80.0 | 0.80 | 2.5 | 4.0 | 0.62 | 100 | 1.25 |" in text
    assert "zigzag N 2000: per-GPU rate 0.80 x one GPU (target >= 0.80): met" in text
    assert "zigzag N 4000: fwd, peak per GPU - GB of 8.0 one-GPU GB (target fwd+bwd and <= 0.55): not met" in text


def test_baseline_is_the_fastest_one_gpu_run_at_the_longest_length_and_the_least_memory(tmp_path):
    """Two one-GPU runs (the ring code in one process, the single-device path): the rate compares with the faster
    at the longest length either did forward + backward; the memory with the lesser per-token need."""
    one = dict(gpus=1, rank=0, mode="fwd+bwd", routing_ms=1)
    _run(tmp_path / "single", "contiguous", [dict(one, seq_len=2000, fwdbwd_ms=200, useful_tflop=20, peak_gb=4.0)])
    _run(tmp_path / "plain", "contiguous", [  # faster at 2000 (125 TFLOP/s), less memory per token at 1000
        dict(one, seq_len=1000, fwdbwd_ms=60, useful_tflop=5, peak_gb=1.5),
        dict(one, seq_len=2000, fwdbwd_ms=160, useful_tflop=20, peak_gb=3.6),
        dict(one, seq_len=4000, mode="skip", note="ran out of GPU memory")])
    env = json.loads((tmp_path / "plain" / "cp_bench_env.json").read_text())
    (tmp_path / "plain" / "cp_bench_env.json").write_text(json.dumps(dict(env, path="single-device")))
    two = dict(gpus=2, mode="fwd+bwd", routing_ms=1, seq_len=2000)
    _run(tmp_path / "ring", "zigzag", [dict(two, rank=0, fwdbwd_ms=100, useful_tflop=10, peak_gb=1.0),
                                       dict(two, rank=1, fwdbwd_ms=100, useful_tflop=10, peak_gb=0.9)])
    text = summary.summarize([str(tmp_path / "ring")], [str(tmp_path / "single"), str(tmp_path / "plain")])
    assert "One-GPU baseline: N 2000, 160.0 ms, 125.0 useful TFLOP/s (single-device path)" in text
    # 20 TFLOP / (2 x 100 ms) = 100 TFLOP/s per GPU = 0.80 of 125; memory: 1.8 MB/token (the plain run's) x 2000
    assert "| zigzag | 2000 | 2 | fwd+bwd | 100.0 | 1.0 | 100.0 | 0.80 | 1.0 | 3.6 | 0.28 |" in text


def test_folders_without_results_are_named_not_dropped_silently(tmp_path):
    one = dict(gpus=1, rank=0, mode="fwd+bwd", routing_ms=1, seq_len=1000, fwdbwd_ms=100, useful_tflop=5)
    _run(tmp_path / "single", "contiguous", [one])
    (tmp_path / "cut-short").mkdir()  # a run stopped before its first length wrote no cp_bench.csv
    text = summary.summarize([str(tmp_path / "cut-short"), str(tmp_path / "typo")], str(tmp_path / "single"))
    assert f"No cp_bench.csv, left out: {tmp_path / 'cut-short'}, {tmp_path / 'typo'}" in text
    assert "left out" not in summary.summarize([str(tmp_path / "single")], None)
