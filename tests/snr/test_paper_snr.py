import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm

from mobalab.snr import delta_mu_eff, pairwise_failure, paper_threshold, snr


def test_delta_mu_eff_counts_the_needle_in_m():
    assert delta_mu_eff(0.3) == pytest.approx(0.3)
    assert delta_mu_eff(0.3, m=1, mu_cluster=0.9) == pytest.approx(0.3)
    assert delta_mu_eff(0.3, m=4, mu_cluster=0.2, mu_noise=0.05) == pytest.approx(0.3 + 3 * 0.15)


def test_delta_mu_eff_broadcasts():
    out = delta_mu_eff(np.array([0.1, 0.2]), m=np.array([[1], [3]]), mu_cluster=0.1)
    np.testing.assert_allclose(out, [[0.1, 0.2], [0.3, 0.4]])


def test_snr_paper_form_and_sigma_form_agree():
    assert snr(64, 128, 2.0) == pytest.approx(2.0 * math.sqrt(64 / 256))
    assert snr(64, 128, 2.0, sigma=1 / 8) == pytest.approx(snr(64, 128, 2.0))
    assert snr(64, 128, 2.0, sigma=0.25) == pytest.approx(2.0 / (0.25 * math.sqrt(256)))


@given(
    d=st.integers(1, 1024),
    b=st.integers(1, 4096),
    dmu=st.floats(-5, 5, allow_nan=False),
)
@settings(max_examples=60, deadline=None)
def test_halving_block_size_multiplies_snr_by_sqrt2(d, b, dmu):
    assert snr(d, b, dmu) == pytest.approx(math.sqrt(2) * snr(d, 2 * b, dmu), rel=1e-12, abs=1e-300)
    assert snr(4 * d, b, dmu) == pytest.approx(2 * snr(d, b, dmu), rel=1e-12, abs=1e-300)


def test_pairwise_failure_is_normal_tail():
    s = np.array([-2.0, 0.0, 1.0, 8.0])
    np.testing.assert_allclose(pairwise_failure(s), norm.sf(s), rtol=1e-14)
    assert pairwise_failure(0.0) == 0.5


def test_paper_threshold_values_and_saturation():
    assert paper_threshold(64, 8) == pytest.approx(norm.ppf(1 - 8 / 64))
    assert paper_threshold(128, 2) == pytest.approx(2.154, abs=5e-4)  # the paper's table at 64K, B=512
    assert paper_threshold(10**9, 1) == pytest.approx(norm.isf(1e-9), rel=1e-12)
    assert paper_threshold(8, 8) == -math.inf
    assert paper_threshold(4, 9) == -math.inf
    np.testing.assert_allclose(paper_threshold(np.array([64, 512]), 8), norm.ppf(1 - 8 / np.array([64, 512])))
    # k/n = 1/2: the threshold is 0, printed as 0.0 (not -0.0) in tables
    assert paper_threshold(2, 1) == 0.0 and not math.copysign(1.0, paper_threshold(2, 1)) < 0
    assert not np.any(np.signbit(paper_threshold(np.array([2, 16]), np.array([1, 8]))))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: delta_mu_eff(0.2, m=0.5), ValueError, "m must be >= 1, got 0.5"),
        (lambda: delta_mu_eff(float("nan")), ValueError, "delta_mu must be finite"),
        (lambda: delta_mu_eff(0.2, m=2, mu_cluster=1.5), ValueError, r"mu_cluster is a cosine and must lie in"),
        (lambda: delta_mu_eff(0.2, m=2, mu_noise=-2.0), ValueError, "mu_noise is a cosine"),
        (lambda: snr(0, 16, 1.0), ValueError, "d must be an integer >= 1, got 0"),
        (lambda: snr(64, -1, 1.0), ValueError, "block_size must be an integer >= 1, got -1"),
        (lambda: snr(64, 16, 1.0, sigma=0.0), ValueError, "sigma must be > 0, got 0.0"),
        (lambda: pairwise_failure(float("inf")), ValueError, "snr must be finite"),
        (lambda: paper_threshold(0, 1), ValueError, "n_blocks must be an integer >= 1, got 0"),
        (lambda: paper_threshold(10, 2.5), ValueError, "top_k must be an integer >= 1, got 2.5"),
        (lambda: snr(64, 16, "abc"), TypeError, "delta_mu_eff must be a real number"),
    ],
)
def test_validation_messages(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_hit_probability_at_the_paper_threshold_is_well_above_a_coin_toss():
    from mobalab.snr import hit_probability

    cases = [(8, 1), (16, 2), (64, 8), (512, 8), (2048, 8), (1024, 1), (131072, 8)]
    at = [float(hit_probability(paper_threshold(n, k), n, k)) for n, k in cases]
    assert all(0.55 < p < 0.95 for p in at), at
    assert at[cases.index((2048, 8))] == pytest.approx(0.859, abs=5e-4)
