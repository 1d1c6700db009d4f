import numpy as np
import pytest

from mobalab import snr


def test_coverage_of_averaging_filter():
    src, a = snr.conv_coverage(np.full(3, 1 / 3), 8)
    np.testing.assert_array_equal(src, np.arange(-2, 8))
    # previous block's last 2 tokens spill in (1/3, 2/3); the block's last 2 spill out (2/3, 1/3 kept)
    np.testing.assert_allclose(a, [1 / 3, 2 / 3, 1, 1, 1, 1, 1, 1, 2 / 3, 1 / 3])
    assert a.sum() == pytest.approx(8)  # a linear filter with sum w = 1 keeps the block's total
    _, a1 = snr.conv_coverage([1.0], 8, block=1)
    np.testing.assert_array_equal(a1, np.ones(8))


def test_cluster_stats():
    dmu, m, c = snr.cluster_stats([0, 0.5, 0.5, 0.5, 0.5, 0], 1)
    assert (dmu, m, c) == pytest.approx((2.0, 4.0, 0.5))
    dmu, m, c = snr.cluster_stats([0, 0.5, 0, 0], 1)
    assert m == 1.0 and np.isnan(c) and dmu == 0.5
    with pytest.raises(ValueError, match="needle_index"):
        snr.cluster_stats([0.1, 0.2], 5)


def test_no_conv_reduces_to_generator_model():
    mdl = snr.linear_conv_block_model(64, 32, [1.0], [10, 11, 12, 13], 0.5)
    gen = snr.generator_block_model(64, 32, 0.5, m=4, mu_cluster=0.5)
    assert mdl.snr == pytest.approx(gen.snr) and mdl.sd_ratio == pytest.approx(gen.sd_ratio)
    assert (mdl.delta_mu_eff, mdl.m, mdl.mu_cluster) == pytest.approx((2.0, 4.0, 0.5))
    assert mdl.paper_snr == pytest.approx(2.0)
    assert snr.linear_conv_hit_probability(mdl, 64, 4) == pytest.approx(
        snr.hit_probability(gen.snr, 64, 4, gen.sd_ratio), abs=1e-7)


def test_averaging_inflates_cosine_multiplier_not_snr():
    W = 4
    base = snr.linear_conv_block_model(64, 32, [1.0], [10], 0.5)
    conv = snr.linear_conv_block_model(64, 32, np.full(W, 1 / W), [10], 0.5)
    # W keys of cosine ~ mu/sqrt(W): the paper's Delta mu_eff grows by ~sqrt(W) ...
    assert conv.m == pytest.approx(W, rel=1e-6)
    assert conv.delta_mu_eff / base.delta_mu_eff == pytest.approx(np.sqrt(W), rel=0.02)
    # ... the block score's SNR does not (only the edge taper changes the noise a little)
    assert conv.snr == pytest.approx(base.snr, rel=0.03)


def test_cut_span_loses_to_next_block():
    none = snr.linear_conv_block_model(64, 32, [1.0], [30, 31, 32, 33], 0.5)
    conv = snr.linear_conv_block_model(64, 32, np.full(5, 0.2), [30, 31, 32, 33], 0.5)
    assert none.mean_signal == pytest.approx(none.mean_next)  # two tokens each side
    assert conv.mean_signal < none.mean_signal and conv.mean_next > none.mean_next
    p_none, p_conv = (snr.linear_conv_hit_probability(x, 64, 4) for x in (none, conv))
    assert p_conv < p_none


def test_hit_probability_limits_and_validation():
    mdl = snr.linear_conv_block_model(64, 32, [1.0], [3], 0.5)
    assert snr.linear_conv_hit_probability(mdl, 8, 8) == 1.0
    # no signal: chance level k/n (up to the small variance difference of the planted token)
    zero = snr.linear_conv_block_model(64, 32, [1.0], [3], 0.0)
    assert snr.linear_conv_hit_probability(zero, 64, 4) == pytest.approx(4 / 64, abs=2e-3)
    with pytest.raises(ValueError, match="offsets"):
        snr.linear_conv_block_model(64, 32, [1.0], [3, 3], 0.5)
    with pytest.raises(ValueError, match="needle_offset"):
        snr.linear_conv_block_model(64, 32, [1.0], [40], 0.5)
    with pytest.raises(ValueError, match="weights"):
        snr.linear_conv_block_model(64, 32, [[1.0]], [3], 0.5)
    with pytest.raises(ValueError, match="cosine"):
        snr.linear_conv_block_model(64, 32, [1.0], [3], 1.5)


def test_all_zero_weights_are_refused_by_name():
    with pytest.raises(ValueError, match=r"weights must not all be zero .*got \[0.0, 0.0\]"):
        snr.linear_conv_block_model(64, 32, [0.0, 0.0], [3], 0.5)


@pytest.mark.filterwarnings("error")
def test_blocks_without_variance_are_constants_and_ties_go_to_the_later_block():
    # μ = 1 on every source of the needle's block and the next: both scores are exactly 1 (no variance)
    both = snr.linear_conv_block_model(16, 4, [1.0], list(range(8)), 1.0)
    assert both.var_signal == 0.0 and both.var_next == 0.0 and both.mean_next == both.mean_signal == 1.0
    # the next block wins the tie (higher index): top 1 never holds the needle's block, top 2 always does
    assert snr.linear_conv_hit_probability(both, 8, 1) == 0.0
    assert snr.linear_conv_hit_probability(both, 8, 2) == pytest.approx(1.0, abs=1e-12)
    # a constant next block at 1 against a needle block at 0.25 with sd 0.108: beaten unless 6.9 sd above
    high = snr.linear_conv_block_model(16, 4, [1.0], [0, 4, 5, 6, 7], 1.0)
    assert high.var_next == 0.0 and high.mean_next == 1.0 and high.mean_signal == 0.25
    assert snr.linear_conv_hit_probability(high, 2, 1) == pytest.approx(0.0, abs=1e-10)


def test_copies_convolved_past_the_next_block_are_refused():
    # offset 15 of blocks of 8 with W = 2 puts a copy at 16, in block 2, which the model scored as noise:
    # it predicted 0.50 where vectors give 0.48, and 0.38 against 0.30 with more relevant tokens there
    with pytest.raises(ValueError, match=r"offset 15 is convolved into position 16.*offset \+ W - 1 < 2B \(W = 2\)"):
        snr.linear_conv_block_model(16, 8, [0.5, 0.5], [3, 15], 0.9)
    with pytest.raises(ValueError, match="offset 0 is convolved into position 16"):
        snr.linear_conv_block_model(16, 8, np.full(17, 1 / 17), [0], 0.9)
    edge = snr.linear_conv_block_model(16, 8, [0.5, 0.5], [3, 14], 0.9)  # the last copy lands at 15
    assert edge.mean_next > 0.0


def test_model_fields_are_python_floats():
    mdl = snr.linear_conv_block_model(64, 32, [0.25] * 4, [10], 0.5)
    for name in ("mean_signal", "var_signal", "mean_next", "var_next", "var_noise", "snr", "sd_ratio",
                 "delta_mu_eff", "m", "paper_snr"):
        assert type(getattr(mdl, name)) is float, name
