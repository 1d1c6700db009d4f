import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mobalab.snr import cluster_rho, clustering_multiplier, delta_mu_eff, snr


def test_rho_and_multiplier_values():
    assert cluster_rho(0.4, 0.3, 0.1) == pytest.approx(0.5)
    assert cluster_rho(0.4, 0.5) == pytest.approx(1.25)
    assert clustering_multiplier(1, 0.7) == 1.0
    assert clustering_multiplier(4, 1.0) == 4.0
    np.testing.assert_allclose(clustering_multiplier(np.array([1, 2, 5]), 0.5), [1.0, 1.5, 3.0])


@given(
    dmu=st.floats(0.01, 2),
    mu_noise=st.floats(-0.2, 0.2),
    mu_cluster=st.floats(-0.5, 1),
    m=st.integers(1, 64),
)
@settings(max_examples=60, deadline=None)
def test_multiplier_reproduces_delta_mu_eff(dmu, mu_noise, mu_cluster, m):
    rho = cluster_rho(dmu, mu_cluster, mu_noise)
    assert dmu * clustering_multiplier(m, rho) == pytest.approx(
        delta_mu_eff(dmu, m, mu_cluster, mu_noise), rel=1e-12, abs=1e-12
    )


@given(gain=st.integers(1, 8), rho=st.sampled_from([0.25, 0.5, 1.0]), b=st.integers(1, 64), d=st.integers(8, 256))
@settings(max_examples=60, deadline=None)
def test_snr_gain_equals_block_shrink_by_the_square(gain, rho, b, d):
    # m - 1 = (gain - 1) / rho clustered keys multiply the signal by an integer factor `gain` ...
    m = 1 + round((gain - 1) / rho)
    mult = clustering_multiplier(m, rho)
    assert mult == pytest.approx(gain, rel=1e-12)
    base = snr(d, b, 0.3)
    assert snr(d, b, 0.3 * mult) == pytest.approx(mult * base, rel=1e-12)
    # ... which is what a block gain^2 times smaller gives: b * gain^2 with clustering equals b without.
    assert snr(d, b * gain**2, 0.3 * mult) == pytest.approx(base, rel=1e-12)


def test_validation_messages():
    with pytest.raises(ValueError, match="delta_mu must be non-zero"):
        cluster_rho(0.0, 0.2)
    with pytest.raises(ValueError, match="m must be >= 1, got 0"):
        clustering_multiplier(0, 0.5)
    with pytest.raises(ValueError, match=r"mu_cluster is a cosine and must lie in \[-1, 1\], got 1.5"):
        cluster_rho(0.4, 1.5)
    with pytest.raises(ValueError, match="rho must be finite"):
        clustering_multiplier(2, float("nan"))
