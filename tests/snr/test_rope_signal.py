import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mobalab.snr import (
    clustering_multiplier,
    delta_mu_eff,
    dirichlet_factor,
    generator_block_model,
    rope_block_model,
    rope_clustering_multiplier,
    rope_delta_mu_eff,
    rope_frequencies,
    rope_pair_factors,
)


def _direct(m, phi):
    """|Σ_{j<m} e^{ijφ}| / m by summing the phasors."""
    return abs(np.exp(1j * np.arange(m) * phi).sum()) / m


# ---------------------------------------------------------------------------------------------------
# the Dirichlet factor


@pytest.mark.parametrize("phi", [0.0, 1e-9, 0.3, 1.0, np.pi, 2.5, 7.0, -4.2])
def test_one_token_is_fully_coherent(phi):
    assert dirichlet_factor(1, phi) == pytest.approx(1.0, abs=1e-15)


@pytest.mark.parametrize("m", [2, 3, 16, 1000])
def test_zero_angle_is_fully_coherent(m):
    assert dirichlet_factor(m, 0.0) == 1.0
    assert dirichlet_factor(m, 1e-13) == pytest.approx(1.0, abs=1e-12)
    assert dirichlet_factor(m, 2 * np.pi) == pytest.approx(1.0, abs=1e-9)  # every phasor back at 1
    # continuous at 0: D_m(φ) = 1 - (m² - 1) φ² / 24 + O(φ⁴)
    phi = 1e-4
    assert dirichlet_factor(m, phi) == pytest.approx(1 - (m * m - 1) * phi * phi / 24, rel=1e-6)


@given(m=st.integers(1, 300), phi=st.floats(-20.0, 20.0))
@settings(max_examples=300, deadline=None)
def test_closed_form_matches_direct_sum(m, phi):
    assert dirichlet_factor(m, phi) == pytest.approx(_direct(m, phi), abs=1e-9)


def test_zeros_broadcasting_and_bounds():
    m = 8
    np.testing.assert_allclose(dirichlet_factor(m, 2 * np.pi * np.arange(1, 8) / m), 0.0, atol=1e-14)
    phi = np.linspace(-10, 10, 401)
    grid = dirichlet_factor(np.array([[1], [4], [32]]), phi)
    assert grid.shape == (3, 401) and np.all((grid >= 0) & (grid <= 1))
    np.testing.assert_allclose(grid[1], [_direct(4, p) for p in phi], atol=1e-12)


@pytest.mark.parametrize("m, phi, error, match", [
    (0, 0.1, ValueError, "m must be an integer >= 1, got 0"),
    (2.5, 0.1, ValueError, "m must be an integer >= 1, got 2.5"),
    (np.inf, 0.1, ValueError, "m must be an integer >= 1, got inf"),  # was accepted and gave NaN
    (3, np.nan, ValueError, "phi must be finite"),
    ([1, 2, 3], [0.1, 0.2], ValueError, r"incompatible shapes: m \(3,\), phi \(2,\)"),
    (True, 0.1, TypeError, "m must be an integer"),
    ("8", 0.1, TypeError, "m must be an integer"),
    (3, "x", TypeError, "phi must be a real number"),
    (3, "0.1", TypeError, "phi must be a real number"),  # was parsed as 0.1
    (3, True, TypeError, "phi must be a real number"),  # was taken as 1 radian
    (3, None, TypeError, "phi must be a real number"),
])
def test_dirichlet_validation(m, phi, error, match):
    with pytest.raises(error, match=match):
        dirichlet_factor(m, phi)


@pytest.mark.parametrize("rho", ["1.0", True, None])
def test_rope_clustering_multiplier_refuses_rho_of_the_wrong_kind(rho):
    with pytest.raises(TypeError, match="rho must be a real number"):
        rope_clustering_multiplier(4, rho, head_dim=64)


# ---------------------------------------------------------------------------------------------------
# frequencies and per-pair factors


def test_frequencies():
    np.testing.assert_allclose(rope_frequencies(8, 10000.0), [1.0, 0.1, 0.01, 0.001], rtol=1e-14)
    th = rope_frequencies(128, 500000.0)
    assert th.shape == (64,) and th[0] == 1.0 and np.all(np.diff(th) < 0)
    assert th[-1] == pytest.approx(500000.0 ** (-126 / 128))
    for bad, match in [((7, 1e4), "even"), ((0, 1e4), ">= 2"), ((8, 1.0), "> 1")]:
        with pytest.raises(ValueError, match=match):
            rope_frequencies(*bad)
    for bad in [("8", 1e4), (True, 1e4), (8, "a"), (8, None)]:  # the wrong kind of value: TypeError
        with pytest.raises(TypeError, match="head_dim|base"):
            rope_frequencies(*bad)


@pytest.mark.parametrize("d, m, base, a, lag", [(64, 16, 1e4, 0, 0), (64, 16, 1e4, 7, 0), (32, 5, 100.0, 4, 0),
                                                (128, 64, 5e5, 31, 0), (64, 4, 1e4, 1, -300), (16, 1, 1e4, 0, 17)])
def test_pair_factors_are_the_direct_sum_and_bounded_by_dirichlet(d, m, base, a, lag):
    theta = rope_frequencies(d, base)
    direct = np.cos(np.outer(theta, np.arange(m) - a + lag)).mean(axis=1)
    f = rope_pair_factors(d, m, base, needle_index=a, needle_lag=lag)
    np.testing.assert_allclose(f, direct, atol=1e-12)
    assert np.all(np.abs(f) <= dirichlet_factor(m, theta) + 1e-12)
    if lag == 0 and 2 * a == m - 1:  # a query anchored at the span's centre attains the envelope (up to sign)
        np.testing.assert_allclose(np.abs(f), dirichlet_factor(m, theta), atol=1e-12)


def test_pair_factors_low_pass():
    f = rope_pair_factors(64, 32, 1e4, needle_index=15)
    # the slow pairs keep (almost) all of the span, the fastest ones almost nothing
    assert f[-8:].min() > 0.99 and np.abs(f[:2]).max() < 0.1


# ---------------------------------------------------------------------------------------------------
# multiplier, Δμ_eff and the block model


def test_multiplier_limits():
    # a lone needle matched at its own offset: RoPE changes nothing
    assert rope_clustering_multiplier(1, 0.7, 64) == pytest.approx(1.0)
    # a huge base stops every pair but pair 0 (θ_0 = 1 always): those keep the blind multiplier, pair 0
    # contributes its own cosines
    for m, rho, a in [(4, 1.0, 2), (16, 0.5, 0)]:
        slow = rope_clustering_multiplier(m, rho, 8, base=1e200, needle_index=a)
        o = np.arange(m) - a
        pair0 = 1.0 + rho * (np.cos(o).sum() - 1.0)
        assert slow == pytest.approx(0.75 * clustering_multiplier(m, rho) + 0.25 * pair0, rel=1e-12)
        assert slow < clustering_multiplier(m, rho)
    # a content match far away decays the needle itself
    assert abs(rope_clustering_multiplier(1, 0.0, 64, needle_lag=-5000)) < 0.3


@given(dmu=st.floats(0.01, 1), mu_c=st.floats(-0.5, 1), mu_n=st.floats(-0.2, 0.2), m=st.integers(1, 64),
       d=st.sampled_from([16, 64, 128]), base=st.sampled_from([100.0, 1e4, 5e5]), lag=st.integers(-50, 50),
       data=st.data())
@settings(max_examples=60, deadline=None)
def test_delta_mu_eff_is_delta_mu_times_multiplier(dmu, mu_c, mu_n, m, d, base, lag, data):
    a = data.draw(st.integers(0, m - 1))
    rho = (mu_c - mu_n) / dmu
    kw = dict(base=base, needle_index=a, needle_lag=lag)
    got = rope_delta_mu_eff(dmu, d, m, mu_c, mu_n, **kw)
    assert got == pytest.approx(dmu * rope_clustering_multiplier(m, rho, d, **kw), rel=1e-9, abs=1e-12)
    blind = delta_mu_eff(dmu, m, mu_c, mu_n)
    if lag == 0:
        assert abs(got) <= abs(dmu) + abs(mu_c - mu_n) * (m - 1) + 1e-12
    # equal cosines: Δμ_eff = m·μ·mean_i F_i
    if mu_n == 0:
        eq = rope_delta_mu_eff(dmu, d, m, dmu, **kw)
        assert eq == pytest.approx(m * dmu * rope_pair_factors(d, m, **kw).mean(), rel=1e-9, abs=1e-12)
    assert np.isfinite(blind)


def test_block_model_reduces_to_the_generator_without_rotation_effects():
    # lone needle, needle-anchored: exactly the planted generator
    mod = rope_block_model(64, 32, 0.6, base=1e4)
    gen = generator_block_model(64, 32, 0.6)
    assert mod.var_phase == 0.0
    assert mod.snr == pytest.approx(gen.snr, rel=1e-12) and mod.sd_ratio == pytest.approx(gen.sd_ratio, rel=1e-12)
    # the blind fields are the generator's for any span
    mod = rope_block_model(64, 64, 0.3, m=16, mu_cluster=0.2, base=500.0, needle_index=3)
    gen = generator_block_model(64, 64, 0.3, m=16, mu_cluster=0.2)
    assert mod.blind_snr == pytest.approx(gen.snr, rel=1e-12)
    assert mod.blind_sd_ratio == pytest.approx(gen.sd_ratio, rel=1e-12)
    assert mod.blind_delta_mu_eff == pytest.approx(0.3 + 15 * 0.2)
    assert mod.delta_mu_eff == pytest.approx(rope_delta_mu_eff(0.3, 64, 16, 0.2, base=500.0, needle_index=3))
    assert mod.multiplier == pytest.approx(mod.delta_mu_eff / 0.3)
    assert mod.snr < mod.blind_snr and mod.var_phase > 0 and mod.sd_ratio > mod.blind_sd_ratio
    assert mod.paper_snr == pytest.approx(mod.delta_mu_eff * np.sqrt(64 / 128))


@pytest.mark.parametrize("d, m, a, lag, base", [(16, 8, 0, 0, 1e4), (32, 12, 5, 0, 100.0), (64, 4, 1, -40, 1e4)])
def test_signal_moments_against_sampled_queries(d, m, a, lag, base):
    """E and Var of Σ_i w_i A_i over q uniform on the sphere: the Dirichlet(1..1) moments of the docstring."""
    mu_s, mu_c = 0.5, 0.4
    mod = rope_block_model(d, 64, mu_s, m=m, mu_cluster=mu_c, base=base, needle_index=a, needle_lag=lag)
    theta = rope_frequencies(d, base)
    mus = np.full(m, mu_c)
    mus[a] = mu_s
    amp = np.cos(np.outer(theta, np.arange(m) - a + lag)) @ mus
    rng = np.random.default_rng(7)
    q = rng.standard_normal((400_000, d))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w = q[:, 0::2] ** 2 + q[:, 1::2] ** 2
    x = w @ amp
    se_mean = x.std() / np.sqrt(x.size)
    assert abs(x.mean() - mod.delta_mu_eff) < 5 * se_mean
    assert x.var() == pytest.approx(mod.var_phase, rel=0.03)


@pytest.mark.parametrize("kwargs, match", [
    (dict(head_dim=63), "even"),
    (dict(m=65), "do not fit"),
    (dict(needle_index=16), "needle_index"),
    (dict(mu_signal=1.5), "mu_signal"),
    (dict(base=0.5), "> 1"),
    (dict(needle_lag=0.5), "needle_lag"),
])
def test_block_model_validation(kwargs, match):
    args = dict(head_dim=64, block_size=64, mu_signal=0.3, m=16, mu_cluster=0.3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        rope_block_model(**args)


def test_delta_mu_eff_takes_cosines_as_cosines():
    # the RoPE-blind delta_mu_eff refuses these; the RoPE one returned 5.8 for mu_cluster = 2
    for kw, name in ((dict(mu_cluster=2.0), "mu_cluster"), (dict(mu_noise=-1.5), "mu_noise")):
        with pytest.raises(ValueError, match=f"{name} is a cosine and must lie in \\[-1, 1\\]"):
            rope_delta_mu_eff(0.5, 64, 4, **kw)
    with pytest.raises(ValueError, match="incompatible shapes"):
        rope_delta_mu_eff([0.5, 0.2], 64, 4, mu_cluster=[0.1, 0.2, 0.3])
    assert rope_delta_mu_eff(0.5, 64, 1) == pytest.approx(0.5, rel=1e-12)
