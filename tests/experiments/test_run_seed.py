"""Every experiment's CSV carries the run's seed as ``run_seed`` (README, "Where results go"), whether or not
the experiment draws random numbers, so that any result can be traced back to the run that made it.

Each registered experiment runs once at a tiny size (its quick configuration, shrunk further, a few seconds
on a CPU); an experiment added to the registry without an entry here fails the test until it gets one.
"""

import io

import pandas as pd
import pytest

from mobalab import experiments

SEED = 7  # not the default 0, so a column filled with a constant would not pass

TINY = {
    "block-size": dict(seq_len=1024, block_sizes=(64, 32), head_dims=(32,), clt_block_sizes=(4,),
                       clt_head_dims=(16,), clt_blocks=64, clt_trials=200, score_trials=2_000, vector_trials=50,
                       device="cpu"),
    "decode-cost": dict(bench_csv=None),
    "kernel-speed": dict(bench_csv="recorded"),
    "key-conv": dict(seq_len=256, span_lengths=(2,), trials=32),
    "needle-retrieval": dict(tasks=("single",), seqlens=(256,), block_sizes=(16,), top_ks=(2,)),
    "rope": dict(head_dim=32, block_size=16, m=4, span_lengths=(4,), block_sizes=(16,), head_dims=(32,),
                 bases=(10000.0,), trials=100, kernel_cpu_trials=16, device="cpu", kernel_device="cpu"),
    "snr-vs-accuracy": dict(panels=((64, 8),), mc_snr=(1.0,), curve_points=11, score_trials=2_000,
                            vector_trials=50, kernel_cpu_trials=16, device="cpu", kernel_device="cpu"),
    "trained-routing": dict(variants=("dense", "moba-16"), n_seeds=1, steps=4, curriculum=((64, 2),),
                            eval_sequences=2, eval_batch_size=2),
}


def test_every_registered_experiment_has_a_tiny_configuration():
    assert sorted(TINY) == experiments.names()


@pytest.mark.parametrize("name", experiments.names())
def test_the_csv_carries_the_runs_seed(name, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # kernel-speed and decode-cost would otherwise pick up CSVs under runs/
    monkeypatch.delenv("MOBALAB_BENCH_CSV", raising=False)
    monkeypatch.delenv("MOBALAB_DECODE_BENCH_CSV", raising=False)
    mod = experiments.get(name)
    df = mod.run(mod.Config.quick(seed=SEED, **TINY.get(name, {})))
    assert "run_seed" in df.columns, f"{name}: columns {list(df.columns)}"
    assert len(df) and (df["run_seed"] == SEED).all()
    # written as an integer (7, not 7.0) in every row, as the CLI writes the CSV
    text = pd.read_csv(io.StringIO(df.to_csv(index=False)), dtype=str, keep_default_na=False)
    assert set(text["run_seed"]) == {str(SEED)}
