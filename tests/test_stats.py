import numpy as np
import pytest
from scipy.special import ndtri

from mobalab.stats import interval_units, wilson_interval


def test_wilson_matches_closed_form_and_contains_estimate():
    h = np.array([0, 1, 17, 50, 99, 100, 300])
    n = np.array([100, 100, 100, 100, 100, 100, 300])
    lo, hi = wilson_interval(h, n)
    p = h / n
    assert np.all(lo <= p) and np.all(p <= hi)
    assert lo[0] == 0.0 and hi[-1] == 1.0 and hi[5] == 1.0
    # textbook value for 17/100 at 95%
    assert lo[2] == pytest.approx(0.1090, abs=1e-4) and hi[2] == pytest.approx(0.2554, abs=1e-4)


def test_wilson_coverage_is_close_to_nominal():
    rng = np.random.default_rng(0)
    p, n = 0.3, 400
    hits = rng.binomial(n, p, size=20000)
    lo, hi = wilson_interval(hits, n)
    cover = np.mean((lo <= p) & (p <= hi))
    assert abs(cover - 0.95) < 0.01


def test_wilson_validation():
    with pytest.raises(ValueError, match="trials must be an integer >= 1, got 0"):
        wilson_interval(1, 0)
    with pytest.raises(ValueError, match="hits must lie"):
        wilson_interval(5, 4)
    with pytest.raises(ValueError, match="confidence"):
        wilson_interval(1, 4, confidence=1.5)


def test_interval_units():
    lo, hi = wilson_interval(50, 100)
    assert interval_units(0.5, 50, 100) == 0.0
    assert interval_units(hi, 50, 100) == pytest.approx(1.0)
    assert interval_units(lo, 50, 100) == pytest.approx(-1.0)
    assert interval_units(0.9, 50, 100) > 1
    # a prediction of exactly 1 at a perfect score sits on the estimate
    assert interval_units(1.0, 100, 100) == 0.0


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: wilson_interval(True, 10), TypeError, "hits must be a real number >= 0"),
        (lambda: wilson_interval(3, "10"), TypeError, "trials must be an integer >= 1"),
        (lambda: wilson_interval(-0.5, 10), ValueError, "hits must be >= 0, got -0.5"),
        (lambda: wilson_interval(3, 2.5), ValueError, "trials must be an integer >= 1, got 2.5"),
        (lambda: wilson_interval([1, 2], [10, 10, 10]), ValueError, r"hits \(2,\), trials \(3,\)"),
        (lambda: wilson_interval(1, 4, confidence=True), TypeError, "confidence must be a real number"),
        (lambda: interval_units(1.5, 5, 10), ValueError, r"prediction must be in \[0, 1\], got 1.5"),
        (lambda: interval_units([0.5, 0.6], [5, 6, 7], 10), ValueError, r"prediction \(2,\), hits \(3,\)"),
    ],
)
def test_inputs_follow_the_library_rules(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_counts_may_be_integer_valued_floats_and_predictions_nan():
    np.testing.assert_array_equal(wilson_interval(17.0, 100.0), wilson_interval(np.int64(17), 100))
    assert np.isnan(interval_units(np.nan, 5, 10))


def test_fractional_hits_are_a_sum_of_soft_outcomes():
    # e.g. attention mass kept, summed over trials: the interval of its mean, as for integer hits
    lo, hi = wilson_interval(7.5, 10)
    assert lo < 0.75 < hi
    np.testing.assert_allclose(wilson_interval(np.array([7.0, 8.0]), 10), wilson_interval([7, 8], 10))


@pytest.mark.parametrize("confidence", [0.5, 0.9, 0.95, 0.999])
def test_wilson_matches_scipy_at_the_ends_and_at_huge_counts(confidence):
    from scipy.stats import binomtest

    for n in (1, 2, 7, 10**6, 10**12):
        for h in sorted({0, 1, n // 3, n - 1, n}):
            ci = binomtest(h, n).proportion_ci(confidence, method="wilson")
            lo, hi = wilson_interval(h, n, confidence)
            assert lo == pytest.approx(ci.low, abs=1e-15) and hi == pytest.approx(ci.high, abs=1e-15), (h, n)
    # closed ends: 0 successes in n gives [0, z^2/(n + z^2)], n in n its mirror
    z2 = ndtri(0.5 + confidence / 2) ** 2
    np.testing.assert_allclose(wilson_interval(0, 1, confidence), (0.0, z2 / (1 + z2)), rtol=1e-14)
    np.testing.assert_allclose(wilson_interval(1, 1, confidence), (1 / (1 + z2), 1.0), rtol=1e-14)


def test_interval_units_sign_and_scale_follow_the_confidence():
    lo, hi = wilson_interval(17, 100, 0.99)
    assert interval_units(hi, 17, 100, confidence=0.99) == pytest.approx(1.0)
    assert interval_units(lo, 17, 100, confidence=0.99) == pytest.approx(-1.0)
    # the same prediction is fewer units away from a wider interval; the sign says on which side it lies
    u = np.array([interval_units([0.1, 0.25], 17, 100, confidence=c) for c in (0.5, 0.9, 0.999)])
    assert np.all(u[:, 0] < 0) and np.all(u[:, 1] > 0)
    assert np.all(np.diff(np.abs(u), axis=0) < 0)
