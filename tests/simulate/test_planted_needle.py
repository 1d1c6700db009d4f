"""Generators: unit vectors, planted keys (moments and the 'exact' identity), needle layouts."""

import numpy as np
import pytest
import torch

from mobalab.simulate import (
    planted_keys,
    planted_needle,
    random_cluster_positions,
    random_unit_vectors,
)


def _check_moments(x, mean, var, mu4, n_se=5.0):
    """Sample mean and variance of ``x`` against exact values, within ``n_se`` standard errors.

    ``mu4`` = E[(x - mean)^4]; the sample variance has standard error sqrt((mu4 - var^2) / M).
    """
    m = x.size
    assert abs(x.mean() - mean) < n_se * np.sqrt(var / m), (x.mean(), mean)
    assert abs(x.var() - var) < n_se * np.sqrt((mu4 - var**2) / m), (x.var(), var)


def _sphere_mu4(d):
    # For x = <q, k> with k uniform on S^{d-1}: E x^2 = 1/d, E x^4 = 3/(d(d+2)).
    return 3.0 / (d * (d + 2))


@pytest.mark.parametrize("d", [2, 16, 64])
def test_unit_vectors_norm_and_dot_moments(d):
    rng = np.random.default_rng(10 + d)
    q = random_unit_vectors(rng, 50_000, d, dtype=np.float64)
    k = random_unit_vectors(rng, (50_000,), d, dtype=np.float64)
    assert q.shape == (50_000, d) and q.dtype == np.float64
    np.testing.assert_allclose(np.linalg.norm(k, axis=-1), 1.0, atol=1e-12)
    _check_moments((q * k).sum(-1), 0.0, 1.0 / d, _sphere_mu4(d))


def test_unit_vectors_default_float32_and_shapes():
    rng = np.random.default_rng(0)
    assert random_unit_vectors(rng, (), 8).shape == (8,)
    x = random_unit_vectors(rng, (3, 4), 8)
    assert x.shape == (3, 4, 8) and x.dtype == np.float32


@pytest.mark.parametrize("mu", [0.0, 0.3, -0.6, 0.9])
@pytest.mark.parametrize("d", [8, 32])
def test_isotropic_planted_moments(mu, d):
    rng = np.random.default_rng(int(1000 * (mu + 1)) + d)
    q = random_unit_vectors(rng, 50_000, d, dtype=np.float64)
    k = planted_keys(rng, q, mu, "isotropic")
    var = (1 - mu**2) / d
    _check_moments((q * k).sum(-1), mu, var, (1 - mu**2) ** 2 * _sphere_mu4(d))


@pytest.mark.parametrize("mu", [0.0, 0.25, -0.7, 1.0, -1.0])
def test_exact_planted_gives_exactly_mu_and_unit_norm(mu):
    rng = np.random.default_rng(3)
    d = 32
    q = random_unit_vectors(rng, 50_000, d, dtype=np.float64)
    k = planted_keys(rng, q, mu, "exact")
    np.testing.assert_allclose((q * k).sum(-1), mu, atol=1e-13)
    np.testing.assert_allclose(np.linalg.norm(k, axis=-1), 1.0, atol=1e-13)
    if abs(mu) < 1:
        # The orthogonal part is uniform on the (d-2)-sphere orthogonal to q: a fixed coordinate of
        # xi has mean 0 and variance 1/(d-1) on average over q.
        xi = (k - mu * q) / np.sqrt(1 - mu**2)
        _check_moments(xi[:, 0], 0.0, 1.0 / d, 3.0 / (d * (d + 2)), n_se=6.0)


def test_planted_mu_broadcasts_per_row():
    rng = np.random.default_rng(5)
    q = random_unit_vectors(rng, (4, 3), 16, dtype=np.float64)
    mu = np.array([0.1, 0.5, -0.9])
    k = planted_keys(rng, q, mu, "exact")
    np.testing.assert_allclose((q * k).sum(-1), np.broadcast_to(mu, (4, 3)), atol=1e-13)


def test_torch_generator_path():
    gen = torch.Generator().manual_seed(7)
    q = random_unit_vectors(gen, (1000,), 16)
    assert isinstance(q, torch.Tensor) and q.dtype == torch.float32 and q.shape == (1000, 16)
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(1000))
    k = planted_keys(gen, q.double(), 0.4, "exact")
    torch.testing.assert_close((q.double() * k).sum(-1), torch.full((1000,), 0.4, dtype=torch.float64))
    k_iso = planted_keys(gen, q, 0.4, "isotropic")
    dots = (q * k_iso).sum(-1).numpy().astype(np.float64)
    assert abs(dots.mean() - 0.4) < 5 * np.sqrt(0.84 / 16 / 1000)


def test_planted_keys_validation():
    rng = np.random.default_rng(0)
    q = random_unit_vectors(rng, 4, 8)
    with pytest.raises(ValueError, match="mu"):
        planted_keys(rng, q, 1.5)
    with pytest.raises(ValueError, match="planted"):
        planted_keys(rng, q, 0.5, "gaussian")
    with pytest.raises(ValueError, match="unit vectors"):
        planted_keys(rng, 2 * q, 0.5)
    with pytest.raises(TypeError, match="rng"):
        planted_keys(42, q, 0.5)
    with pytest.raises(TypeError, match="torch tensor"):
        planted_keys(torch.Generator(), q, 0.5)
    with pytest.raises(ValueError, match="d >= 2"):
        planted_keys(rng, np.ones((3, 1)), 0.5, "exact")
    with pytest.raises(ValueError, match="broadcast"):
        planted_keys(rng, q, np.zeros(3))
    with pytest.raises(ValueError, match="shape"):
        random_unit_vectors(rng, (2, -1), 8)
    with pytest.raises(ValueError, match="d must be an integer >= 1, got 0"):
        random_unit_vectors(rng, 2, 0)


def test_cluster_positions_layout_and_uniformity():
    rng = np.random.default_rng(11)
    B, N = 8, 30  # last block holds positions 24..29 (6 of them)
    p = rng.integers(0, N, 20_000)
    pos = random_cluster_positions(rng, p, B, N, 3)
    assert pos.shape == (20_000, 3)
    assert np.all(pos // B == (p // B)[:, None])
    assert np.all(pos < N)
    assert np.all(pos != p[:, None])
    srt = np.sort(pos, axis=1)
    assert np.all(np.diff(srt, axis=1) > 0)
    # Uniform over the block's other positions: for needles at offset 0 of full blocks each of the
    # 7 free offsets is chosen with probability 3/7.
    sel = (p % B == 0) & (p < 24)
    offsets = (pos[sel] % B).ravel()
    counts = np.bincount(offsets, minlength=B)
    assert counts[0] == 0
    expected = sel.sum() * 3 / 7
    assert np.all(np.abs(counts[1:] - expected) < 5 * np.sqrt(expected))


def test_cluster_positions_too_many_for_partial_block():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="do not fit"):
        random_cluster_positions(rng, np.array([25]), 8, 27, 3)  # last block has 3 positions
    assert random_cluster_positions(rng, np.array([25]), 8, 27, 2).shape == (1, 2)


def test_cluster_positions_of_no_needle():
    rng = np.random.default_rng(0)
    assert random_cluster_positions(rng, np.zeros(0, dtype=np.int64), 8, 27, 2).shape == (0, 2)


def test_planted_needle_refuses_a_cluster_that_may_not_fit_whatever_the_seed():
    # seq_len 10 in blocks of 4: the last block holds 2 positions. A random needle lands there one time in
    # five, and m = 3 then failed for that seed only; it is refused up front, before any draw.
    for seed in range(40):
        rng = np.random.default_rng(seed)
        state = rng.bit_generator.state
        with pytest.raises(
            ValueError,
            match=r"m = 3 planted keys \(needle included\) do not fit in the partial "
            r"last block of 2 positions \(seq_len = 10, block_size = 4\)",
        ):
            planted_needle(rng, 8, 10, 4, 0.5, m=3)
        assert rng.bit_generator.state == state
    with pytest.raises(ValueError, match="do not fit in the partial last block of 2 positions.*needle_pos = 9"):
        planted_needle(np.random.default_rng(0), 8, 10, 4, 0.5, m=3, needle_pos=9)
    s = planted_needle(np.random.default_rng(0), 8, 10, 4, 0.5, m=3, needle_pos=1)  # a full block: fits
    assert np.all(s.cluster_pos // 4 == 0)
    s = planted_needle(np.random.default_rng(0), 8, 10, 4, 0.5, m=3, cluster_positions=[0, 1])
    assert s.m == 3
    for seed in range(40):  # m = 2 fits every block
        assert planted_needle(np.random.default_rng(seed), 8, 10, 4, 0.5, m=2).m == 2


@pytest.mark.parametrize("dtype", [np.int32, np.float16, "float64x", torch.float32])
def test_unit_vectors_refuse_dtypes_a_numpy_generator_cannot_draw(dtype):
    with pytest.raises(TypeError, match="dtype must be numpy.float32 or numpy.float64 for a numpy Generator"):
        random_unit_vectors(np.random.default_rng(0), 3, 4, dtype=dtype)
    with pytest.raises(TypeError, match="dtype must be numpy.float32 or numpy.float64"):
        planted_needle(np.random.default_rng(0), 4, 8, 4, 0.5, dtype=dtype)


def test_unit_vectors_refuse_non_float_torch_dtypes():
    with pytest.raises(TypeError, match="dtype must be a floating-point torch.dtype for a torch.Generator"):
        random_unit_vectors(torch.Generator().manual_seed(0), 3, 4, dtype=torch.int32)
    assert random_unit_vectors(torch.Generator().manual_seed(0), 3, 4, dtype=torch.float64).dtype == torch.float64


def test_planted_needle_defaults_and_dot_products():
    rng = np.random.default_rng(21)
    s = planted_needle(rng, 32, 200, 16, 0.8, m=4, mu_cluster=0.5, planted="exact")
    assert s.keys.shape == (200, 32) and s.q.shape == (32,)
    assert s.m == 4 and s.n_blocks == 13 and s.head_dim == 32 and s.seq_len == 200
    assert np.all(s.cluster_pos // 16 == s.needle_block)
    assert len(set(s.cluster_pos.tolist()) | {s.needle_pos}) == 4
    dots = s.keys @ s.q
    assert abs(dots[s.needle_pos] - 0.8) < 1e-5
    np.testing.assert_allclose(dots[s.cluster_pos], 0.5, atol=1e-5)
    others = np.setdiff1d(np.arange(200), np.r_[s.needle_pos, s.cluster_pos])
    np.testing.assert_allclose(np.linalg.norm(s.keys[others], axis=1), 1.0, atol=1e-5)


def test_planted_needle_explicit_positions_cross_blocks():
    rng = np.random.default_rng(2)
    s = planted_needle(
        rng,
        16,
        64,
        16,
        0.9,
        m=3,
        mu_cluster=0.7,
        needle_pos=15,
        cluster_positions=[16, 17],
        planted="exact",
        dtype=np.float64,
    )
    assert s.needle_pos == 15 and s.cluster_pos.tolist() == [16, 17]
    np.testing.assert_allclose(s.keys[[15, 16, 17]] @ s.q, [0.9, 0.7, 0.7], atol=1e-12)


def test_planted_needle_torch_and_reproducible():
    a = planted_needle(torch.Generator().manual_seed(3), 8, 40, 8, 0.5, m=2, mu_cluster=0.2)
    b = planted_needle(torch.Generator().manual_seed(3), 8, 40, 8, 0.5, m=2, mu_cluster=0.2)
    assert isinstance(a.keys, torch.Tensor)
    assert a.needle_pos == b.needle_pos and a.cluster_pos.tolist() == b.cluster_pos.tolist()
    assert torch.equal(a.keys, b.keys)
    c = planted_needle(np.random.default_rng(3), 8, 40, 8, 0.5)
    d = planted_needle(np.random.default_rng(3), 8, 40, 8, 0.5)
    assert np.array_equal(c.keys, d.keys) and c.needle_pos == d.needle_pos


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(m=9), "do not fit"),
        (dict(needle_pos=40), "needle_pos"),
        (dict(m=3, cluster_positions=[1]), "m - 1"),
        (dict(m=3, needle_pos=5, cluster_positions=[5, 6]), "distinct"),
        (dict(m=3, needle_pos=5, cluster_positions=[6, 6]), "distinct"),
        (dict(m=2, cluster_positions=[40]), "seq_len"),
        (dict(m=2, cluster_positions="span"), "cluster_positions"),
        (dict(planted="exact", head_dim=1), "head_dim"),
        (dict(mu_signal=-1.5), "mu_signal"),
        (dict(block_size=0), "block_size"),
        (dict(m=1.5), "m must be an integer >= 1, got 1.5"),
    ],
)
def test_planted_needle_validation(kwargs, match):
    args = dict(head_dim=8, seq_len=40, block_size=8, mu_signal=0.5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        planted_needle(np.random.default_rng(0), **args)


def test_same_device_treats_implicit_index_as_current():
    import torch

    from mobalab.simulate._array_backend import same_device as _same_device

    assert _same_device(torch.device("cpu"), torch.device("cpu"))
    assert not _same_device(torch.device("cpu"), torch.device("meta"))
    if torch.cuda.is_available():
        assert _same_device(torch.device("cuda"), torch.device("cuda", torch.cuda.current_device()))
    else:
        with pytest.raises((AssertionError, RuntimeError)):  # CPU-only torch: no current CUDA device
            _same_device(torch.device("cuda"), torch.device("cuda:0"))
