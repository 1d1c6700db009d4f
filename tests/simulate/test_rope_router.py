"""RoPE in the simulators: the rotation, the span generator, and the RoPE-aware theory against Monte Carlo.

The agreement test applies the rule of tests/simulate/test_theory_agreement.py: with M configurations at
fixed seeds, at most the 1 - 1e-4 quantile of Binomial(M, 0.01) may fall outside their 99% interval and
none outside the 99.99% one. It also checks that the test can fail: the RoPE-blind theory of the same
vectors must fall outside the 99.99% interval at most of the configurations.
"""

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import binom

from mobalab.simulate import apply_rope, plant_rope_span, random_span_positions, rope_vector_router
from mobalab.snr import causal_hit_probability, hit_probability, rope_frequencies
from mobalab.stats import interval_units

# ---------------------------------------------------------------------------------------------------
# the rotation


def _rotate_2x2(x, s, base):
    theta = rope_frequencies(x.shape[-1], base)
    out = np.empty_like(x)
    c, sn = np.cos(s * theta), np.sin(s * theta)
    out[0::2] = x[0::2] * c - x[1::2] * sn
    out[1::2] = x[0::2] * sn + x[1::2] * c
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rotation_is_the_interleaved_2x2_rotation_and_preserves_norms(dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 40, 64)).astype(dtype)
    pos = np.arange(40) * 37
    got = apply_rope(x, pos, base=500.0)
    assert got.dtype == dtype and got.shape == x.shape
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got[2, 9], _rotate_2x2(x[2, 9].astype(np.float64), 9 * 37, 500.0), atol=tol)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1), rtol=tol)
    np.testing.assert_array_equal(apply_rope(x, 0), x)
    back = apply_rope(got, -pos, base=500.0)  # R_{-s} R_s = I
    np.testing.assert_allclose(back, x, atol=10 * tol)


def test_dot_product_depends_on_relative_position_only():
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((2, 128))
    for t, s in [(0, 0), (5, 2), (1000, 3), (3, 1000), (123456, 123000)]:
        ref = apply_rope(q, t - s) @ k  # = R_t q · R_s k with R_s k moved over
        for shift in (0, 1, 77, 1_000_003):
            got = apply_rope(q, t + shift) @ apply_rope(k, s + shift)
            assert got == pytest.approx(ref, abs=1e-9)
    # and it does depend on t - s
    assert abs(apply_rope(q, 1) @ k - apply_rope(q, 2) @ k) > 1e-3


def test_torch_matches_numpy_and_keeps_device_and_dtype():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 17, 32)).astype(np.float32)
    pos = np.arange(17) + 4000
    ref = apply_rope(x.astype(np.float64), pos, 1e4)
    for dt, tol in [(torch.float32, 1e-5), (torch.float64, 1e-12), (torch.bfloat16, 0.05)]:
        got = apply_rope(torch.tensor(x).to(dt), torch.arange(17) + 4000, 1e4)
        assert got.dtype == dt and got.device.type == "cpu"
        np.testing.assert_allclose(got.double().numpy(), ref, atol=tol)
    np.testing.assert_allclose(apply_rope(x.astype(np.float16), pos, 1e4), ref, atol=0.02)


@pytest.mark.parametrize("x, pos, match", [
    (np.zeros((4, 7)), 0, "d even"),
    (np.zeros((4, 8), dtype=np.int64), 0, "floating"),
    (np.zeros((4, 8)), 0.5, "positions must be an integer, got 0.5"),
    (np.zeros((4, 8)), np.inf, "positions must be an integer, got inf"),  # was accepted and rotated to NaN
    (np.zeros((4, 8)), np.array([0.0, np.nan, 2.0, 3.0]), "positions must be an integer, got nan"),
    (np.zeros((4, 8)), np.arange(3), "broadcast"),
])
def test_rotation_validation(x, pos, match):
    with pytest.raises(ValueError, match=match):
        apply_rope(x, pos)


@pytest.mark.parametrize("pos", ["3", True, None])
def test_rotation_refuses_positions_of_the_wrong_kind(pos):
    with pytest.raises(TypeError, match="positions must be an integer"):
        apply_rope(np.zeros((4, 8)), pos)


# ---------------------------------------------------------------------------------------------------
# the span generator


def test_span_positions_lie_in_one_block():
    rng = np.random.default_rng(3)
    p = random_span_positions(rng, 20_000, 512, 32, 8, needle_index=3)
    start = p - 3
    assert np.all(start // 32 == (start + 7) // 32) and p.min() >= 3 and p.max() <= 511 - 4
    # every block and every admissible offset occurs
    assert len(np.unique(p // 32)) == 16 and len(np.unique(start % 32)) == 32 - 8 + 1
    with pytest.raises(ValueError, match="multiple"):
        random_span_positions(rng, 3, 500, 32, 8)


@pytest.mark.parametrize("match", ["needle", "content"])
def test_planted_span_is_the_rotated_query(match):
    """With cosines 1 the span keys are pure content: after RoPE, token j of the span is R_{o_j} q̃."""
    rng = np.random.default_rng(4)
    d, L, m, a, base = 32, 64, 5, 2, 300.0
    q = rng.standard_normal((3, d))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    keys = rng.standard_normal((3, L, d))
    t, p = np.array([63, 40, 20]), np.array([10, 30, 50])
    plant_rope_span(rng, q, keys, t, p, m, 1.0, 1.0, needle_index=a, base=base, match=match)
    k_rot = apply_rope(keys, np.arange(L), base)
    q_rot = apply_rope(q, t, base)
    ref = p if match == "needle" else t  # the position at which the content matches the query
    for b in range(3):
        for j in range(m):
            s = p[b] - a + j
            np.testing.assert_allclose(k_rot[b, s], apply_rope(q_rot[b], s - ref[b], base), atol=1e-12)
    if match == "needle":
        np.testing.assert_allclose(np.einsum("bd,bd->b", q_rot, k_rot[np.arange(3), p]), 1.0, atol=1e-12)


@pytest.mark.parametrize("t, p, match", [
    ([63, 63], [10.7, 20.2], "needle_pos must be an integer >= 0, got 10.7"),  # was truncated to 10
    ([63.5, 63], [10, 20], "query_pos must be an integer >= 0, got 63.5"),
    ([63, 63, 63], [10, 20, 30], r"query_pos, needle_pos \(b,\) arrays, got q \(2, 16\), query_pos \(3,\)"),
    (63, 10, r"query_pos, needle_pos \(b,\) arrays, got q \(2, 16\), query_pos \(\)"),
])
def test_planted_span_positions_are_checked(t, p, match):
    rng = np.random.default_rng(5)
    q = rng.standard_normal((2, 16))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    keys = rng.standard_normal((2, 64, 16))
    before = keys.copy()
    with pytest.raises(ValueError, match=match):
        plant_rope_span(rng, q, keys, t, p, 2, 0.5, 0.5)
    np.testing.assert_array_equal(keys, before)


# ---------------------------------------------------------------------------------------------------
# theory vs Monte Carlo

# (head_dim, seq_len, block_size, top_k, mu, m, needle_index, base, match, causal, query_pos, needle_pos, trials)
CONFIGS = [
    (64, 512, 32, 2, 0.28, 16, 7, 1e4, "needle", False, None, None, 2500),
    (64, 512, 32, 1, 0.22, 32, 0, 500.0, "needle", False, None, None, 2500),
    (32, 256, 16, 2, 0.4, 8, 0, 100.0, "needle", False, None, None, 3000),
    (16, 512, 32, 2, 0.35, 16, 0, 1e4, "needle", False, None, None, 3000),
    (64, 512, 16, 2, 0.6, 4, 1, 1e4, "content", False, 500, 421, 2500),
    (64, 1024, 32, 3, 0.3, 16, 8, 1e4, "needle", True, 1000, 300, 2500),
]


@pytest.fixture(scope="module")
def agreement():
    rows = []
    for i, (d, n_tok, bs, k, mu, m, a, base, match, causal, t, p, trials) in enumerate(CONFIGS):
        df = rope_vector_router(d, n_tok, bs, k, mu, m=m, mu_cluster=mu, base=base, needle_index=a, match=match,
                                causal=causal, query_pos=t, needle_pos=p, trials=trials, seed=20260100 + i)
        r = df.iloc[0]
        if causal:
            pred, blind = (causal_hit_probability(r[s], n_tok, bs, k, query_pos=t, needle_pos=p, sd_ratio=r[q])
                           for s, q in (("snr", "sd_ratio"), ("blind_snr", "blind_sd_ratio")))
        else:
            pred, blind = (hit_probability(r[s], n_tok // bs, k, sd_ratio=r[q])
                           for s, q in (("snr", "sd_ratio"), ("blind_snr", "blind_sd_ratio")))
        rows.append(df.assign(prediction=float(pred), blind_prediction=float(blind)))
    return pd.concat(rows, ignore_index=True)


def test_rope_theory_agrees_with_monte_carlo(agreement):
    df = agreement
    M = len(df)
    u99 = interval_units(df.prediction, df.hits, df.trials, 0.99)
    u9999 = interval_units(df.prediction, df.hits, df.trials, 0.9999)
    report = df[["match", "causal", "head_dim", "m", "rope_base", "estimate", "prediction", "blind_prediction"]]
    assert int((np.abs(u99) > 1).sum()) <= int(binom.ppf(1 - 1e-4, M, 0.01)), report
    assert np.all(np.abs(u9999) <= 1), report


def test_the_blind_theory_fails_on_the_same_vectors(agreement):
    u = interval_units(agreement.blind_prediction, agreement.hits, agreement.trials, 0.9999)
    assert (np.abs(u) > 1).sum() >= len(agreement) - 1, agreement[["estimate", "prediction", "blind_prediction"]]


def test_reproducible_and_backends_agree():
    kw = dict(m=8, mu_cluster=0.4, needle_index=3, base=500.0, trials=400)
    a = rope_vector_router(32, 256, 32, 2, 0.4, seed=5, **kw)
    b = rope_vector_router(32, 256, 32, 2, 0.4, seed=5, **kw)
    assert a.hits[0] == b.hits[0]
    c = rope_vector_router(32, 256, 32, 2, 0.4, seed=5, device="torch-cpu", **kw)
    assert c.backend[0] == "torch-cpu" and c.snr[0] == a.snr[0]
    # independent streams: the two estimates differ only by sampling noise
    assert abs(c.estimate[0] - a.estimate[0]) < 4 * np.sqrt(2 * 0.25 / 400)


def test_decided_trials_and_columns():
    own = rope_vector_router(32, 256, 32, 2, 0.0, m=4, causal=True, query_pos=200, needle_pos=193, trials=30, seed=0)
    assert own.hits[0] == 30  # needle in the query's own block: always routed
    dense = rope_vector_router(32, 256, 32, 8, 0.0, trials=30, seed=0)
    assert dense.hits[0] == 30  # top_k = n
    assert {"snr", "sd_ratio", "blind_snr", "blind_sd_ratio", "match", "rope_base", "ci_low", "ci_high"} <= set(
        dense.columns)


@pytest.mark.parametrize("kwargs, match", [
    (dict(head_dim=31), "even"),
    (dict(seq_len=250), "multiple"),
    (dict(match="content"), "needs both"),
    (dict(causal=True, query_pos=100), "needs both"),
    (dict(causal=True, query_pos=100, needle_pos=120), "after"),
    (dict(needle_pos=30), "outside one block"),
    (dict(match="relative"), "match"),
    (dict(m=40), "m <= block_size"),
    (dict(seed=-1), "seed"),
    (dict(device="tpu"), "device"),
])
def test_router_validation(kwargs, match):
    args = dict(head_dim=32, seq_len=256, block_size=32, top_k=2, mu_signal=0.3, m=4, needle_index=0, trials=5,
                seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        rope_vector_router(**args)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(match=np.array(["needle"])), ValueError, "match must be one of"),  # was accepted
    (dict(causal=1), TypeError, "causal must be True or False"),
    (dict(progress="yes"), TypeError, "progress must be True or False"),
])
def test_router_refuses_arguments_of_the_wrong_kind(kwargs, error, match):
    with pytest.raises(error, match=match):
        rope_vector_router(32, 256, 32, 2, 0.3, trials=5, seed=0, **kwargs)
