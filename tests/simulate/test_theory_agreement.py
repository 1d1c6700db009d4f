"""Theory vs simulation: Monte Carlo hit rates agree with mobalab.snr within their Wilson intervals.

The acceptance test of the two legs against each other. Each configuration gives a Monte Carlo estimate (hits / trials)
and an analytic prediction (``hit_probability`` or ``causal_hit_probability``; for vector-level runs at
``generator_block_model``'s snr and sd_ratio). The distance is measured with
``mobalab.stats.interval_units``: |u| <= 1 means the prediction lies inside the interval.

Expected misses. Even with an exact theory, a 99% interval misses the true value about 1% of the
time, so with M configurations some misses are normal. The seeds are fixed, so the test is
deterministic; the rule it applies is the one that would hold with probability >= 1 - 1e-4 for fresh
seeds if the theory were exact:

* at most X configurations may fall outside the 99% interval, where X is the 1 - 1e-4 quantile of
  Binomial(M, 0.01) (computed from M below, not hard-coded);
* none may fall outside the 99.99% interval (chance of any such miss <= M * 1e-4, about 0.5%).

A real discrepancy (a wrong rule, a wrong variance, an off-by-one in the causal contest) shifts
hit rates by far more than these intervals' widths at the trial counts used (score level: 100k-200k
trials, half-width about 0.003; vector level: 3k-4k trials, half-width about 0.02).

Vector-level configurations also carry the Gaussian (central-limit) approximation of the block score;
they use blocks of 16-32 keys and n <= 64, where that approximation's error is far below the interval
widths (docs/design.md, "Generator variance").
"""

import numpy as np
import pandas as pd
from scipy.stats import binom

from mobalab.simulate import score_level_router, score_level_router_causal, vector_level_router
from mobalab.snr import causal_hit_probability, generator_block_model, hit_probability
from mobalab.stats import interval_units

# (snr, n_blocks, top_k, sd_ratio)
NON_CAUSAL = [
    (0.0, 8, 1, 1.0),
    (1.0, 8, 1, 1.0),
    (2.5, 8, 2, 0.5),
    (4.0, 8, 4, 1.0),
    (0.5, 64, 1, 1.0),
    (1.15, 64, 8, 1.0),
    (2.0, 64, 8, 2.0),
    (3.0, 64, 16, 1.0),
    (1.5, 64, 4, 0.0),
    (0.0, 512, 8, 1.0),
    (1.0, 512, 8, 1.0),
    (2.0, 512, 8, 1.0),
    (2.5, 512, 32, 0.7),
    (4.0, 512, 1, 1.0),
    (1.5, 1024, 64, 1.0),
    (3.0, 2048, 2, 1.5),
    (0.0, 8192, 64, 1.0),
    (2.0, 8192, 8, 1.0),
    (3.0, 8192, 16, 1.0),
    (4.0, 8192, 1, 1.0),
    (3.5, 8192, 64, 0.5),
]
# (snr, seq_len, block_size, top_k, sd_ratio, query_pos)
CAUSAL = [
    (1.0, 8192, 1024, 2, 1.0, None),  # n = 8
    (2.0, 8192, 1024, 1, 1.0, None),  # k = 1: own block only
    (1.5, 8192, 128, 8, 1.0, None),  # n = 64
    (0.5, 65536, 128, 8, 1.0, None),  # n = 512, the paper's design point
    (2.0, 65536, 128, 8, 1.0, None),
    (3.0, 65536, 128, 4, 2.0, None),
    (2.5, 65536, 1024, 64, 1.0, None),  # N = k * B: dense
    (2.0, 65536, 512, 16, 0.5, None),
    (4.0, 524288, 64, 64, 1.0, None),  # n = 8192
    (3.0, 524288, 64, 8, 1.0, None),
    (0.0, 524288, 64, 32, 1.0, None),
    (1.5, 65536, 128, 8, 1.0, 40000),  # fixed query, needle uniform on {0..t}
    (2.5, 524288, 64, 16, 1.0, 524287),
]
# Both samplers are exact; a few configurations also run the explicit one.
EXPLICIT = [(1.0, 64, 8, 1.0), (2.0, 512, 8, 1.0), (0.5, 8, 1, 2.0)]
EXPLICIT_CAUSAL = [(1.5, 8192, 128, 8, 1.0, None)]

# (head_dim, seq_len, block_size, top_k, mu_signal, m, mu_cluster, planted, causal, trials)
VECTOR = [
    (16, 512, 16, 4, 0.6, 1, 0.0, "isotropic", False, 4000),
    (16, 512, 16, 1, 0.5, 3, 0.2, "isotropic", False, 4000),
    (32, 256, 16, 2, 0.9, 2, 0.4, "exact", False, 4000),
    (8, 1024, 32, 8, 0.9, 4, 0.3, "isotropic", False, 3000),
    (16, 512, 16, 4, 0.6, 1, 0.0, "isotropic", True, 4000),
    (16, 1024, 16, 8, 0.4, 3, 0.3, "exact", True, 3000),
    (32, 512, 32, 2, 0.8, 2, 0.5, "isotropic", True, 4000),
]


def _score_rows():
    frames = []
    s, n, k, r = map(np.array, zip(*NON_CAUSAL, strict=True))
    df = score_level_router(s, n, k, sd_ratio=r, trials=200_000, seed=20250601)
    frames.append(df.assign(prediction=hit_probability(s, n, k, sd_ratio=r)))
    s, n, k, r = map(np.array, zip(*EXPLICIT, strict=True))
    df = score_level_router(s, n, k, sd_ratio=r, trials=40_000, seed=20250602, method="explicit")
    frames.append(df.assign(prediction=hit_probability(s, n, k, sd_ratio=r)))
    causal_runs = [(c, "binomial", 100_000) for c in CAUSAL] + [
        (c, "explicit", 20_000) for c in EXPLICIT_CAUSAL
    ]
    for i, ((s, n_tok, bs, k, r, t), method, trials) in enumerate(causal_runs):
        df = score_level_router_causal(
            s, n_tok, bs, k, sd_ratio=r, trials=trials, seed=20250700 + i, method=method, query_pos=t
        )
        frames.append(df.assign(prediction=causal_hit_probability(s, n_tok, bs, k, query_pos=t, sd_ratio=r)))
    return frames


def _vector_rows():
    frames = []
    for i, (d, n_tok, bs, k, mu, m, mu_c, planted, causal, trials) in enumerate(VECTOR):
        df = vector_level_router(
            d,
            n_tok,
            bs,
            k,
            mu,
            m=m,
            mu_cluster=mu_c,
            planted=planted,
            causal=causal,
            trials=trials,
            seed=20250800 + i,
        )
        model = generator_block_model(d, bs, mu, m=m, mu_cluster=mu_c, planted=planted)
        assert np.isclose(df.snr[0], model.snr) and np.isclose(df.sd_ratio[0], model.sd_ratio)
        if causal:
            pred = causal_hit_probability(model.snr, n_tok, bs, k, sd_ratio=model.sd_ratio)
        else:
            pred = hit_probability(model.snr, -(-n_tok // bs), k, sd_ratio=model.sd_ratio)
        frames.append(df.assign(prediction=float(pred)))
    return frames


def test_monte_carlo_agrees_with_theory():
    df = pd.concat(_score_rows() + _vector_rows(), ignore_index=True)
    M = len(df)
    assert M >= 30
    assert df.n_blocks.min() <= 8 and df.n_blocks.max() >= 8192
    assert df.top_k.min() == 1 and df.top_k.max() >= 64
    assert df.snr.min() <= 0.0 and df.snr.max() >= 4.0
    assert df.causal.any() and (~df.causal).any()

    df["u99"] = interval_units(df.prediction, df.hits, df.trials, 0.99)
    df["u9999"] = interval_units(df.prediction, df.hits, df.trials, 0.9999)
    allowed = int(binom.ppf(1 - 1e-4, M, 0.01))
    outside = df[np.abs(df.u99) > 1]
    report = df[["method", "causal", "snr", "sd_ratio", "n_blocks", "top_k", "estimate", "prediction", "u99"]]
    assert len(outside) <= allowed, (
        f"{len(outside)} of {M} outside the 99% interval (allowed {allowed}):\n{report}"
    )
    assert np.all(np.abs(df.u9999) <= 1), f"a configuration lies outside its 99.99% interval:\n{report}"
