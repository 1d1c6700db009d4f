import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mobalab.snr import (
    causal_hit_probability,
    causal_required_snr,
    design_table,
    hit_probability,
    largest_block_size,
    paper_threshold,
    required_snr,
    smallest_head_dim,
    smallest_top_k,
    snr,
)


@given(
    target=st.floats(0.001, 0.9999),
    n=st.integers(2, 10**6),
    r=st.floats(0.1, 4),
    data=st.data(),
)
@settings(max_examples=40, deadline=None)
def test_required_snr_round_trips(target, n, r, data):
    k = data.draw(st.integers(1, min(n - 1, 1024)))
    s = required_snr(target, n, k, r)
    assert hit_probability(s, n, k, r) == pytest.approx(target, abs=1e-7)
    assert hit_probability(s - 1e-4, n, k, r) < target  # smallest such SNR


def test_required_snr_vectorised_and_known_values():
    targets = np.array([0.5, 0.9, 0.99])
    s = required_snr(targets, 64, 8)
    assert s.shape == (3,) and np.all(np.diff(s) > 0)
    np.testing.assert_allclose(hit_probability(s, 64, 8), targets, atol=1e-9)
    # r = 1, SNR = 0 gives k/n exactly, so that target needs SNR 0.
    assert required_snr(8 / 64, 64, 8) == pytest.approx(0.0, abs=1e-9)
    # Paper's threshold reaches only ~67 % at n = 64, k = 8.
    assert required_snr(0.6715, 64, 8) == pytest.approx(paper_threshold(64, 8), abs=1e-3)
    assert required_snr(0.9, 8, 8) == -math.inf
    out = required_snr(0.9, np.array([4, 64]), 4)
    assert out[0] == -math.inf and np.isfinite(out[1])


@pytest.mark.parametrize("target", [0.0, 1.0, -0.1, 1.5, math.nan])
def test_required_snr_rejects_targets_outside_the_open_interval(target):
    with pytest.raises(ValueError, match=r"target must (be in \(0, 1\)|be finite)"):
        required_snr(target, 64, 8)


def test_causal_required_snr_round_trips():
    for n_tok, bsz, k, target in [(65536, 64, 8, 0.9), (8192, 16, 2, 0.5), (10**6, 128, 16, 0.99)]:
        s = causal_required_snr(target, n_tok, bsz, k)
        assert causal_hit_probability(s, n_tok, bsz, k) == pytest.approx(target, abs=1e-7)
    floor = causal_hit_probability(-50.0, 65536, 64, 8)
    assert causal_required_snr(floor * 0.99, 65536, 64, 8) == -math.inf
    assert causal_required_snr(0.999, 512, 64, 8) == -math.inf  # N <= k·B
    own_share = causal_hit_probability(0.0, 4096, 64, 1)  # k = 1: independent of the SNR
    assert causal_required_snr(own_share * 0.9, 4096, 64, 1) == -math.inf
    with pytest.raises(ValueError, match="only own-block needles are found"):
        causal_required_snr(own_share * 1.1, 4096, 64, 1)
    with pytest.raises(ValueError, match=r"target must be in \(0, 1\), got 1.0"):
        causal_required_snr(1.0, 4096, 64, 4)


def test_design_table_columns_and_values():
    df = design_table(64, 65536, 8, 2.0, causal=False, target=0.9)
    assert list(df.columns[:6]) == [
        "block_size",
        "n_blocks",
        "snr",
        "paper_threshold",
        "hit_probability",
        "meets_target",
    ]
    assert df["block_size"].tolist() == [16, 32, 64, 128, 256, 512]
    assert df["n_blocks"].tolist() == [4096, 2048, 1024, 512, 256, 128]
    np.testing.assert_allclose(df["snr"], snr(64, df["block_size"].to_numpy(), 2.0))
    np.testing.assert_allclose(df["paper_threshold"], paper_threshold(df["n_blocks"].to_numpy(), 8))
    np.testing.assert_allclose(
        df["hit_probability"], hit_probability(df["snr"].to_numpy(), df["n_blocks"].to_numpy(), 8)
    )
    assert df["meets_target"].tolist() == (df["hit_probability"] >= 0.9).tolist()
    assert (df["head_dim"] == 64).all() and (df["target"] == 0.9).all() and not df["causal"].any()


def test_design_table_causal_and_without_target():
    df = design_table(64, 20_000, 4, 1.5, block_sizes=(32, 100), causal=True)
    assert df["n_blocks"].tolist() == [625, 200]
    expected = [causal_hit_probability(s, 20_000, b, 4) for s, b in zip(df["snr"], [32, 100], strict=True)]
    np.testing.assert_allclose(df["hit_probability"], expected, atol=1e-15)
    assert df["meets_target"].isna().all() and df["target"].isna().all()
    assert isinstance(pd.concat([df, df]), pd.DataFrame)


def test_largest_block_size():
    args = (64, 65536, 8, 2.0)
    df = design_table(*args, causal=True)
    for target in (0.3, 0.6, 0.9):
        best = largest_block_size(target, *args)
        ok = df.loc[df["hit_probability"] >= target, "block_size"]
        assert best == (None if ok.empty else int(ok.max()))
    sizes = [largest_block_size(t, *args) for t in (0.2, 0.5, 0.8, 0.95)]
    clean = [-1 if s is None else s for s in sizes]
    assert clean == sorted(clean, reverse=True)  # a stricter target never allows a larger block
    assert largest_block_size(0.999999, 64, 10**6, 2, 0.5) is None


def _prob(top_k, causal):
    s = snr(64, 64, 2.0)
    return causal_hit_probability(s, 65536, 64, top_k) if causal else hit_probability(s, 1024, top_k)


def test_smallest_top_k():
    for causal in (True, False):
        args = (64, 65536, 64, 2.0)
        ks = []
        for target in (0.3, 0.6, 0.9):
            k = smallest_top_k(target, *args, causal=causal)
            ks.append(k)
            assert _prob(k, causal) >= target and (k == 1 or _prob(k - 1, causal) < target)
        assert ks == sorted(ks)
    assert smallest_top_k(0.999, 16, 10**6, 512, 0.1, max_top_k=4) is None
    assert smallest_top_k(0.5, 64, 1024, 64, 0.0, causal=False) == 8  # SNR 0: k/n = k/16


def test_smallest_head_dim():
    args = (65536, 64, 8, 1.0)
    dims = [smallest_head_dim(t, *args) for t in (0.2, 0.5, 0.8)]
    clean = [10**9 if d is None else d for d in dims]
    assert clean == sorted(clean)
    d = smallest_head_dim(0.5, *args)
    assert causal_hit_probability(snr(d, 64, 1.0), 65536, 64, 8) >= 0.5
    assert causal_hit_probability(snr(d // 2, 64, 1.0), 65536, 64, 8) < 0.5
    assert smallest_head_dim(0.5, *args, head_dims=(512, 16, 64)) == d  # order of candidates is irrelevant
    assert smallest_head_dim(0.9999, 10**6, 512, 2, 0.2, causal=False) is None


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: design_table(64, 4096, 8, 1.0, block_sizes=()), ValueError, "block_sizes must be a non-empty"),
        (lambda: design_table(64, 4096, 8, 1.0, block_sizes=(0, 16)), ValueError, "block_sizes must be an integer"),
        (lambda: design_table(64, 4096, 8, 1.0, block_sizes=(16, 2.5)), ValueError, "got 2.5"),
        (lambda: design_table(64, 4096, 8, 1.0, target=1.2), ValueError, r"target must be in \(0, 1\), got 1.2"),
        (lambda: design_table(64, 4096, 8, 1.0, causal=1), TypeError, "causal must be True or False"),
        (lambda: largest_block_size(None, 64, 4096, 8, 1.0), TypeError, "target must be a real number in"),
        (lambda: largest_block_size(0.9, 64, 4096, True, 1.0), TypeError, "top_k must be an integer >= 1, got bool"),
        (lambda: smallest_top_k(0.9, 64, 4096, 64, 1.0, max_top_k=0), ValueError, "max_top_k must be an integer"),
        (lambda: smallest_top_k(0.9, 63.5, 4096, 64, 1.0), ValueError, "head_dim must be an integer >= 1, got 63.5"),
        (lambda: smallest_head_dim(0.9, 4096, 64, 8, 1.0, head_dims=[]), ValueError, "head_dims must be a non-empty"),
        (lambda: smallest_head_dim(0.9, 4096, "64", 8, 1.0), TypeError, "block_size must be an integer >= 1"),
        (lambda: design_table(0, 4096, 8, 1.0), ValueError, "head_dim must be an integer >= 1, got 0"),
        (lambda: required_snr(0.9, [64, 128], [8, 8, 8]), ValueError, r"n_blocks \(2,\), top_k \(3,\)"),
        (lambda: causal_required_snr(0.9, 4096, 64, 8, sd_ratio=[1.0, 2.0]), ValueError, "sd_ratio must be a single"),
    ],
)
def test_validation_messages(call, error, match):
    with pytest.raises(error, match=match):
        call()
