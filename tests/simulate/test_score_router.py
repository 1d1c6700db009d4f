"""Score-level router: the two samplers agree, outcomes fixed by the rules, reproducibility, validation."""

import numpy as np
import pandas as pd
import pytest

from mobalab.simulate import score_level_router, score_level_router_causal
from mobalab.stats import interval_units


def two_proportion_z(a, b):
    """z statistic of the difference of two independent binomial proportions (pooled variance)."""
    p = (a.hits + b.hits) / (a.trials + b.trials)
    se = np.sqrt(p * (1 - p) * (1 / a.trials + 1 / b.trials))
    return np.where(se > 0, (a.estimate - b.estimate) / np.where(se > 0, se, 1), 0.0)


def test_binomial_and_explicit_agree_non_causal():
    snr = np.array([0.0, 0.8, 1.5, 2.5, 1.0, 1.0])
    n = np.array([8, 64, 256, 64, 1000, 2])
    k = np.array([1, 8, 4, 1, 16, 1])
    r = np.array([1.0, 1.0, 0.5, 2.0, 1.0, 0.0])
    a = score_level_router(snr, n, k, sd_ratio=r, trials=20_000, seed=1, method="binomial")
    b = score_level_router(snr, n, k, sd_ratio=r, trials=20_000, seed=2, method="explicit")
    z = two_proportion_z(a, b)
    assert np.all(np.abs(z) < 4.0), z
    assert list(b.sampler.unique()) == ["explicit"]


def test_binomial_and_explicit_agree_causal():
    kw = dict(trials=20_000)
    for fixed in [dict(), dict(query_pos=300), dict(needle_pos=40), dict(query_pos=500, needle_pos=10)]:
        a = score_level_router_causal([0.5, 1.5], 512, 16, [4, 8], sd_ratio=[1.0, 1.5], seed=3, **kw, **fixed)
        b = score_level_router_causal(
            [0.5, 1.5], 512, 16, [4, 8], sd_ratio=[1.0, 1.5], seed=4, method="explicit", **kw, **fixed
        )
        assert np.all(np.abs(two_proportion_z(a, b)) < 4.0), (fixed, a.estimate.values, b.estimate.values)


def test_outcomes_fixed_by_the_rules():
    # k >= n: every block is routed.
    assert score_level_router(-3.0, 8, 8, trials=1000, seed=0).hits[0] == 1000
    # Overwhelming signal / anti-signal.
    assert score_level_router(40.0, 4096, 1, trials=1000, seed=0).hits[0] == 1000
    assert score_level_router(-40.0, 4096, 8, trials=1000, seed=0, method="explicit").hits[0] == 0
    for method in ("binomial", "explicit"):
        causal = dict(trials=2000, seed=5, method=method)
        # N <= k * B: MoBA is dense causal attention, every needle is found.
        assert score_level_router_causal(-5.0, 256, 32, 8, **causal).hits[0] == 2000
        # Query in block 0: only the own block exists.
        assert score_level_router_causal(-5.0, 4096, 64, 2, query_pos=63, **causal).hits[0] == 2000
        # k = 1: only the own block; a needle in the past is never found, one in the own block always.
        assert (
            score_level_router_causal(40.0, 4096, 64, 1, query_pos=700, needle_pos=10, **causal).hits[0] == 0
        )
        assert (
            score_level_router_causal(-40.0, 4096, 64, 1, query_pos=700, needle_pos=650, **causal).hits[0]
            == 2000
        )
        # k - 1 >= number of past blocks: all past blocks are taken.
        assert score_level_router_causal(-40.0, 4096, 64, 4, query_pos=200, **causal).hits[0] == 2000


@pytest.mark.parametrize("method", ["binomial", "explicit"])
def test_fixed_needle_averages_the_model_over_queries_at_or_after_it(method):
    # only needle_pos given: t uniform on {p..N-1}; a query before the needle would be a free (wrong) hit
    from mobalab.snr import causal_hit_probability

    n_tok, bs, k, p = 512, 16, 4, 40
    expected = np.mean(causal_hit_probability(1.0, n_tok, bs, k, query_pos=np.arange(p, n_tok), needle_pos=p))
    row = score_level_router_causal(1.0, n_tok, bs, k, needle_pos=p, trials=20_000, seed=6, method=method)
    assert abs(interval_units(expected, row.hits[0], row.trials[0], confidence=0.999)) <= 1, row.estimate[0]


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("method", ["binomial", "explicit"])
def test_huge_sd_ratio_samples_the_noise_free_limit(method):
    # σ_s >> σ_n: hit iff the signal score is above 0, probability Φ(SNR) = 1/2 at SNR 0; sqrt(1 + r²)
    # overflowed and numpy refused the binomial draw with "p < 0, p > 1 or p contains NaNs"
    for row in (score_level_router(0.0, 16, 2, trials=2000, seed=3, sd_ratio=1e200, method=method),
                score_level_router_causal(0.0, 4096, 32, 4, query_pos=4000, needle_pos=10, trials=2000, seed=3,
                                          sd_ratio=1e200, method=method)):
        assert abs(interval_units(0.5, row.hits[0], row.trials[0], confidence=0.999)) <= 1


def test_causal_k1_rate_is_own_block_fraction():
    """With k = 1 only needles in the own block are found: P = E[(t mod B + 1) / (t + 1)] exactly."""
    n_tok, bs = 1024, 32
    t = np.arange(n_tok)
    expected = np.mean((t % bs + 1) / (t + 1))
    df = score_level_router_causal(3.0, n_tok, bs, 1, trials=100_000, seed=9)
    assert abs(interval_units(expected, df.hits[0], df.trials[0], 0.999)) <= 1.0


def test_reproducible_and_seed_sensitive():
    args = ([0.5, 1.0, 2.0], 512, 8)
    a = score_level_router(*args, trials=5000, seed=123)
    b = score_level_router(*args, trials=5000, seed=123)
    pd.testing.assert_frame_equal(a, b)
    c = score_level_router(*args, trials=5000, seed=124)
    assert not np.array_equal(a.hits.values, c.hits.values)
    for method in ("binomial", "explicit"):
        x = score_level_router_causal([0.5, 1.0], 4096, 64, 4, trials=3000, seed=7, method=method)
        y = score_level_router_causal([0.5, 1.0], 4096, 64, 4, trials=3000, seed=7, method=method)
        pd.testing.assert_frame_equal(x, y)
    g = score_level_router(1.0, 64, 4, trials=1000, seed=np.random.default_rng(1))
    assert g.seed[0] is None
    h = score_level_router(1.0, 64, 4, trials=1000, seed=np.random.default_rng(1))
    assert g.hits[0] == h.hits[0]


def test_columns():
    df = score_level_router([1.0, 2.0], 64, 4, trials=100, seed=0)
    for col in [
        "method",
        "backend",
        "causal",
        "snr",
        "sd_ratio",
        "n_blocks",
        "top_k",
        "hits",
        "trials",
        "estimate",
        "ci_low",
        "ci_high",
        "seed",
    ]:
        assert col in df.columns, col
    assert (df.method == "score-level").all() and (df.backend == "numpy").all() and not df.causal.any()
    assert np.all((df.ci_low <= df.estimate) & (df.estimate <= df.ci_high))
    dc = score_level_router_causal(1.0, [1000, 2048], 64, 4, trials=100, seed=0)
    assert dc.causal.all() and dc.n_blocks.tolist() == [16, 32]
    for col in ["seq_len", "block_size", "query_pos", "needle_pos"]:
        assert col in dc.columns


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(trials=0), "trials"),
        (dict(method="sort"), "method"),
        (dict(n_blocks=0), "n_blocks"),
        (dict(n_blocks=3.5), "n_blocks must be an integer >= 1, got 3.5"),
        (dict(top_k=0), "top_k"),
        (dict(snr=np.nan), "snr must be finite"),
        (dict(sd_ratio=-1.0), "sd_ratio"),
        (dict(seed=1.5), "seed"),
        (dict(seed=-1), "seed"),
        (dict(snr=[1.0, 2.0], n_blocks=[8, 16, 32]), "broadcast"),
    ],
)
def test_validation(kwargs, match):
    args = dict(snr=1.0, n_blocks=64, top_k=4, trials=10, seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        score_level_router(args.pop("snr"), args.pop("n_blocks"), args.pop("top_k"), **args)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(query_pos=1024), "query_pos"),
        (dict(needle_pos=-1), "needle_pos"),
        (dict(query_pos=10, needle_pos=11), "after"),
        (dict(block_size=0), "block_size"),
        (dict(seq_len=0), "seq_len"),
        (dict(query_pos=2.5), "query_pos must be an integer >= 0, got 2.5"),
    ],
)
def test_causal_validation(kwargs, match):
    args = dict(snr=1.0, seq_len=1024, block_size=64, top_k=4, trials=10, seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        score_level_router_causal(
            args.pop("snr"), args.pop("seq_len"), args.pop("block_size"), args.pop("top_k"), **args
        )


def test_progress_bar_runs(capsys):
    df = score_level_router(1.0, 64, 4, trials=100, seed=0, progress=True)
    assert df.trials[0] == 100
