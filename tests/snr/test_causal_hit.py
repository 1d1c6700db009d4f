import math
import time

import numpy as np
import pytest

from mobalab.snr import causal_hit_probability, hit_probability
from mobalab.snr._causal_hit import _harmonic_diff


def brute_force_average(snr, seq_len, block_size, top_k, sd_ratio=1.0):
    """Mean over t uniform on {0..N-1} and p uniform on {0..t}, straight from the routing rule."""
    total = 0.0
    for t in range(seq_len):
        c = t // block_size
        if top_k == 1:
            past = 0.0
        elif top_k - 1 >= c:
            past = 1.0
        else:
            past = hit_probability(snr, c, top_k - 1, sd_ratio)
        hits = sum(1.0 if p // block_size == c else past for p in range(t + 1))
        total += hits / (t + 1)
    return total / seq_len


def test_point_values_follow_the_routing_rule():
    n_tok, bsz = 4096, 64
    s = 1.7
    assert causal_hit_probability(s, n_tok, bsz, 8, query_pos=1000, needle_pos=960) == 1.0  # own block 15
    assert causal_hit_probability(s, n_tok, bsz, 8, query_pos=1000, needle_pos=1000) == 1.0
    assert causal_hit_probability(s, n_tok, bsz, 8, query_pos=1000, needle_pos=959) == pytest.approx(
        hit_probability(s, 15, 7), abs=0
    )
    assert causal_hit_probability(s, n_tok, bsz, 1, query_pos=1000, needle_pos=3) == 0.0
    assert causal_hit_probability(s, n_tok, bsz, 16, query_pos=1000, needle_pos=3) == 1.0  # 15 <= k-1
    assert causal_hit_probability(s, n_tok, bsz, 15, query_pos=1000, needle_pos=3) < 1.0


def test_point_values_broadcast_over_snr_and_positions():
    s = np.array([0.0, 1.0, 2.0])
    out = causal_hit_probability(s, 4096, 64, 4, query_pos=4095, needle_pos=0)
    np.testing.assert_allclose(out, hit_probability(s, 63, 3), atol=0)
    grid = causal_hit_probability(1.0, 4096, 64, 4, query_pos=np.array([[100], [4000]]), needle_pos=[0, 99])
    assert grid.shape == (2, 2)
    assert grid[0, 1] == 1.0 and grid[1, 1] < 1.0


@pytest.mark.parametrize("seq_len, block_size", [(200, 16), (203, 16), (97, 8)])
@pytest.mark.parametrize("top_k", [1, 2, 3, 5])
def test_average_equals_brute_force(seq_len, block_size, top_k):
    for s, r in [(0.0, 1.0), (1.3, 1.0), (0.8, 0.4), (2.1, 2.5)]:
        expected = brute_force_average(s, seq_len, block_size, top_k, r)
        got = causal_hit_probability(s, seq_len, block_size, top_k, sd_ratio=r)
        assert got == pytest.approx(expected, abs=1e-12)


def test_query_only_averages_needles_uniformly():
    n_tok, bsz, k, s = 1000, 32, 4, 1.1
    for t in (0, 31, 32, 500, 999):
        points = [causal_hit_probability(s, n_tok, bsz, k, query_pos=t, needle_pos=p) for p in range(t + 1)]
        average = causal_hit_probability(s, n_tok, bsz, k, query_pos=t)
        assert average == pytest.approx(np.mean(points), abs=1e-13)


def test_top_1_finds_only_own_block_needles():
    # k = 1: only the own block; the average is the share of (t, p) pairs with p in t's block.
    n_tok, bsz = 300, 16
    share = np.mean([((t % bsz) + 1) / (t + 1) for t in range(n_tok)])
    for s in (-2.0, 0.0, 5.0):
        assert causal_hit_probability(s, n_tok, bsz, 1) == pytest.approx(share, abs=1e-13)


@pytest.mark.parametrize("seq_len, block_size, top_k", [(512, 64, 8), (500, 64, 8), (64, 64, 1), (1, 16, 1)])
def test_short_sequences_are_dense(seq_len, block_size, top_k):
    # N <= k·B: every past block fits, MoBA equals dense causal attention.
    assert causal_hit_probability(-4.0, seq_len, block_size, top_k) == 1.0


@pytest.mark.parametrize("top_k, sd_ratio", [(2, 1.0), (8, 0.2), (8, 3.0), (40, 1.0)])
def test_interpolated_sum_equals_term_by_term_sum(top_k, sd_ratio):
    # Force the piecewise-Chebyshev path on a size where the term-by-term sum is cheap.
    s = np.array([0.5, 2.0, 3.5])
    args = (s, 24_000, 64, top_k)
    exact = causal_hit_probability(*args, sd_ratio=sd_ratio, _exact_max=10**9)
    interp = causal_hit_probability(*args, sd_ratio=sd_ratio, _exact_max=0)
    np.testing.assert_allclose(interp, exact, atol=1e-11)


@pytest.mark.slow
def test_interpolated_sum_equals_term_by_term_sum_large():
    s = np.array([1.0, 3.0])
    for k, r in [(8, 1.0), (128, 0.3)]:
        exact = causal_hit_probability(s, 120_000, 32, k, sd_ratio=r, _exact_max=10**9)
        interp = causal_hit_probability(s, 120_000, 32, k, sd_ratio=r)
        np.testing.assert_allclose(interp, exact, atol=1e-11)


def test_average_is_fast_at_a_million_tokens():
    start = time.perf_counter()
    p = causal_hit_probability(np.array([1.0, 2.0, 3.0]), 10**6, 16, 8)
    elapsed = time.perf_counter() - start
    assert np.all(np.diff(p) > 0) and np.all((p > 0) & (p < 1))
    assert elapsed < 5.0, f"{elapsed:.2f} s for 3 SNRs at N = 1e6, B = 16"


def test_average_is_monotone_and_bounded():
    s = np.linspace(-3, 6, 10)
    p = causal_hit_probability(s, 50_000, 32, 4)
    assert np.all(np.diff(p) > 0)
    assert p[0] > causal_hit_probability(-50.0, 50_000, 32, 4) - 1e-15  # floor: own-block needles
    assert p[-1] <= 1.0
    assert causal_hit_probability(30.0, 50_000, 32, 4) == pytest.approx(1.0, abs=1e-12)


def test_causal_is_easier_than_non_causal_for_a_needle_in_the_past():
    # Query at the end: k - 1 slots among n - 1 past blocks vs k among n; own block is free.
    n_tok, bsz, k, s = 65536, 128, 8, 2.0
    point = causal_hit_probability(s, n_tok, bsz, k, query_pos=n_tok - 1, needle_pos=0)
    assert point == pytest.approx(hit_probability(s, 511, 7), abs=0)


def test_harmonic_differences_are_accurate():
    for a, b in [(0, 1), (3, 50), (63, 64), (64, 200), (999_936, 1_000_000), (10**9, 10**9 + 7)]:
        exact = math.fsum(1.0 / (t + 1) for t in range(a, b))
        assert _harmonic_diff(np.array([a]), np.array([b]))[0] == pytest.approx(exact, rel=1e-14)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"needle_pos": 3}, "needle_pos given without query_pos"),
        ({"query_pos": 10, "needle_pos": 11}, "needle_pos must be <= query_pos"),
        ({"query_pos": 1000}, "query_pos must be < seq_len = 1000"),
        ({"query_pos": -1}, "query_pos must be an integer >= 0, got -1"),
        ({"seq_len": 0}, "seq_len must be an integer >= 1, got 0"),
        ({"block_size": 0}, "block_size must be an integer >= 1, got 0"),
        ({"top_k": [1, 2]}, "top_k must be a single integer"),
        ({"snr": math.nan}, "snr must be finite"),
        ({"sd_ratio": -1.0}, "sd_ratio must be >= 0"),
    ],
)
def test_validation_messages(kwargs, match):
    args = {"snr": 1.0, "seq_len": 1000, "block_size": 16, "top_k": 4} | kwargs
    with pytest.raises(ValueError, match=match):
        causal_hit_probability(**args)
