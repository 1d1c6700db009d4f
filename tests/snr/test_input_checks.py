"""Every public function of mobalab.snr checks its arguments by one rule set (mobalab._validate).

Counts are integers >= 1 (positions >= 0): Python or numpy integers, integer-valued floats or arrays of
them; never bools or strings. Cosines lie in [-1, 1]. Arguments that broadcast together and do not fit are
named in the error, with their shapes.
"""

import dataclasses

import numpy as np
import pytest

from mobalab import snr

_MODEL = snr.linear_conv_block_model(64, 32, [1.0], [3], 0.5)

# (label, call with the argument under test replaced by v, argument name, minimum)
COUNTS = [
    ("snr", lambda v: snr.snr(v, 32, 2.0), "d", 1),
    ("snr", lambda v: snr.snr(64, v, 2.0), "block_size", 1),
    ("paper_threshold", lambda v: snr.paper_threshold(v, 8), "n_blocks", 1),
    ("paper_threshold", lambda v: snr.paper_threshold(2048, v), "top_k", 1),
    ("hit_probability", lambda v: snr.hit_probability(1.0, v, 8), "n_blocks", 1),
    ("hit_probability", lambda v: snr.hit_probability(1.0, 2048, v), "top_k", 1),
    ("causal_hit_probability", lambda v: snr.causal_hit_probability(1.0, v, 32, 8), "seq_len", 1),
    ("causal_hit_probability", lambda v: snr.causal_hit_probability(1.0, 256, v, 8), "block_size", 1),
    ("causal_hit_probability", lambda v: snr.causal_hit_probability(1.0, 256, 32, v), "top_k", 1),
    ("causal_hit_probability", lambda v: snr.causal_hit_probability(1.0, 256, 32, 8, query_pos=v), "query_pos", 0),
    (
        "causal_hit_probability",
        lambda v: snr.causal_hit_probability(1.0, 256, 32, 8, query_pos=100, needle_pos=v),
        "needle_pos",
        0,
    ),
    ("planted_token_variance", lambda v: snr.planted_token_variance(0.5, v), "d", 1),
    ("generator_block_model", lambda v: snr.generator_block_model(v, 32, 0.5), "head_dim", 1),
    ("generator_block_model", lambda v: snr.generator_block_model(64, v, 0.5), "block_size", 1),
    ("generator_block_model", lambda v: snr.generator_block_model(64, 32, 0.5, m=v), "m", 1),
    ("required_snr", lambda v: snr.required_snr(0.9, v, 8), "n_blocks", 1),
    ("required_snr", lambda v: snr.required_snr(0.9, 2048, v), "top_k", 1),
    ("causal_required_snr", lambda v: snr.causal_required_snr(0.9, v, 32, 8), "seq_len", 1),
    ("causal_required_snr", lambda v: snr.causal_required_snr(0.9, 256, v, 8), "block_size", 1),
    ("causal_required_snr", lambda v: snr.causal_required_snr(0.9, 256, 32, v), "top_k", 1),
    ("design_table", lambda v: snr.design_table(v, 256, 8, 2.0), "head_dim", 1),
    ("design_table", lambda v: snr.design_table(64, v, 8, 2.0), "seq_len", 1),
    ("design_table", lambda v: snr.design_table(64, 256, v, 2.0), "top_k", 1),
    ("design_table", lambda v: snr.design_table(64, 256, 8, 2.0, block_sizes=(16, v)), "block_sizes", 1),
    ("largest_block_size", lambda v: snr.largest_block_size(0.9, v, 256, 8, 2.0), "head_dim", 1),
    ("smallest_top_k", lambda v: snr.smallest_top_k(0.9, 64, 256, v, 2.0), "block_size", 1),
    ("smallest_top_k", lambda v: snr.smallest_top_k(0.9, 64, 256, 32, 2.0, max_top_k=v), "max_top_k", 1),
    ("smallest_head_dim", lambda v: snr.smallest_head_dim(0.9, 256, 32, v, 2.0), "top_k", 1),
    ("smallest_head_dim", lambda v: snr.smallest_head_dim(0.9, 256, 32, 8, 2.0, head_dims=(v, 64)), "head_dims", 1),
    ("conv_coverage", lambda v: snr.conv_coverage([0.5, 0.5], v), "block_size", 1),
    ("conv_coverage", lambda v: snr.conv_coverage([0.5, 0.5], 8, block=v), "block", 0),
    ("cluster_stats", lambda v: snr.cluster_stats([0.1, 0.5, 0.2], v), "needle_index", 0),
    ("linear_conv_block_model", lambda v: snr.linear_conv_block_model(v, 32, [1.0], [3], 0.5), "head_dim", 1),
    ("linear_conv_block_model", lambda v: snr.linear_conv_block_model(64, v, [1.0], [3], 0.5), "block_size", 1),
    ("linear_conv_block_model", lambda v: snr.linear_conv_block_model(64, 32, [1.0], [3, v], 0.5), "offsets", 0),
    ("linear_conv_hit_probability", lambda v: snr.linear_conv_hit_probability(_MODEL, v, 4), "n_blocks", 2),
    ("linear_conv_hit_probability", lambda v: snr.linear_conv_hit_probability(_MODEL, 64, v), "top_k", 1),
]
COUNT_IDS = [f"{label}-{name}" for label, _, name, _ in COUNTS]


@pytest.mark.parametrize("label, call, name, minimum", COUNTS, ids=COUNT_IDS)
def test_counts_refuse_bools_strings_and_none(label, call, name, minimum):
    optional = name in ("query_pos", "needle_pos")  # None means "not given" there
    for bad in [True, False, np.True_, "2", b"2", [True]] + ([] if optional else [None]):
        with pytest.raises(TypeError, match=f"^{name} must be an integer >= {minimum}"):
            call(bad)


@pytest.mark.parametrize("label, call, name, minimum", COUNTS, ids=COUNT_IDS)
def test_counts_refuse_fractions_and_values_below_the_minimum(label, call, name, minimum):
    for bad in (2.5, 63.5, np.float64(1.25), minimum - 1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"^{name} must be an integer >= {minimum}|^{name} must be at most"):
            call(bad)


@pytest.mark.parametrize("label, call, name, minimum", COUNTS, ids=COUNT_IDS)
def test_counts_accept_numpy_integers_and_integer_valued_floats(label, call, name, minimum):
    value = 2 if name in ("needle_index", "n_blocks") else 16 if name == "head_dims" else 8
    plain = call(value)
    for same in (np.int64(value), np.int32(value), np.uint16(value), float(value), np.array(value)):
        got = call(same)
        _assert_same(got, plain)


def _assert_same(got, expected):
    if dataclasses.is_dataclass(expected):
        got, expected = dataclasses.astuple(got), dataclasses.astuple(expected)
    if isinstance(expected, tuple):
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_array_equal(a, b)
    elif hasattr(expected, "equals"):  # a DataFrame
        assert expected.equals(got)
    else:
        np.testing.assert_array_equal(got, expected)


def test_the_reported_inputs_are_refused():
    with pytest.raises(TypeError, match="d must be an integer >= 1.*got bool True"):
        snr.snr(d=True, block_size=32, delta_mu_eff=1.0)
    with pytest.raises(TypeError, match="block_size must be an integer >= 1.*got bool True"):
        snr.snr(d=64, block_size=True, delta_mu_eff=1.0)
    with pytest.raises(ValueError, match="block_size must be an integer >= 1, got 2.5"):
        snr.snr(d=64, block_size=2.5, delta_mu_eff=1.0)
    with pytest.raises(ValueError, match="d must be an integer >= 1, got 63.5"):
        snr.snr(d=63.5, block_size=32, delta_mu_eff=1.0)
    with pytest.raises(TypeError, match="d must be an integer >= 1.*got str '2'"):
        snr.snr(d="2", block_size=32, delta_mu_eff=1.0)
    with pytest.raises(TypeError, match="n_blocks must be an integer >= 1.*got bool True"):
        snr.hit_probability(1.0, n_blocks=True, top_k=1)
    with pytest.raises(TypeError, match="top_k must be an integer >= 1.*got bool True"):
        snr.hit_probability(1.0, n_blocks=64, top_k=True)


def test_count_arrays_broadcast_and_must_be_integer_valued():
    np.testing.assert_array_equal(
        snr.hit_probability(1.0, np.array([64, 128]), 8), snr.hit_probability(1.0, np.array([64.0, 128.0]), 8)
    )
    with pytest.raises(ValueError, match=r"n_blocks must be an integer >= 1, got 64.5 \(in an array of shape \(2,\)\)"):
        snr.hit_probability(1.0, np.array([128.0, 64.5]), 8)
    with pytest.raises(TypeError, match="n_blocks must be an integer >= 1 or an array of them, got ndarray"):
        snr.hit_probability(1.0, np.array([True, False]), 8)


COSINES = [
    ("delta_mu_eff", lambda v: snr.delta_mu_eff(0.3, m=2, mu_cluster=v), "mu_cluster"),
    ("delta_mu_eff", lambda v: snr.delta_mu_eff(0.3, m=2, mu_noise=v), "mu_noise"),
    ("cluster_rho", lambda v: snr.cluster_rho(0.3, v), "mu_cluster"),
    ("cluster_rho", lambda v: snr.cluster_rho(0.3, 0.2, v), "mu_noise"),
    ("planted_token_variance", lambda v: snr.planted_token_variance(v, 64), "mu"),
    ("generator_block_model", lambda v: snr.generator_block_model(64, 32, v), "mu_signal"),
    ("generator_block_model", lambda v: snr.generator_block_model(64, 32, 0.5, m=2, mu_cluster=v), "mu_cluster"),
    ("linear_conv_block_model", lambda v: snr.linear_conv_block_model(64, 32, [1.0], [3], v), "mu"),
]
COSINE_IDS = [f"{label}-{name}" for label, _, name in COSINES]


@pytest.mark.parametrize("label, call, name", COSINES, ids=COSINE_IDS)
def test_cosines_lie_in_minus_one_to_one(label, call, name):
    for ok in (-1.0, 1.0, 0, np.float32(0.5)):
        call(ok)
    for bad in (1.5, -1.01, 2):
        with pytest.raises(ValueError, match=rf"^{name} is a cosine and must lie in \[-1, 1\]"):
            call(bad)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"^{name} must be finite"):
            call(bad)
    for bad in ("0.5", True, None):
        with pytest.raises(TypeError, match=f"^{name} must be a real number"):
            call(bad)


MISMATCHED = [
    (lambda: snr.snr([64, 128], [16, 32, 64], 2.0), ("d (2,)", "block_size (3,)")),
    (lambda: snr.snr(64, 32, [1.0, 2.0], sigma=[0.1, 0.2, 0.3]), ("delta_mu_eff (2,)", "sigma (3,)")),
    (lambda: snr.delta_mu_eff([0.1, 0.2], m=[1, 2, 3]), ("delta_mu (2,)", "m (3,)")),
    (lambda: snr.paper_threshold([64, 128], [1, 2, 4]), ("n_blocks (2,)", "top_k (3,)")),
    (lambda: snr.hit_probability([1.0, 2.0], [64, 128, 256], 8), ("snr (2,)", "n_blocks (3,)")),
    (lambda: snr.hit_probability(1.0, 64, [1, 2], sd_ratio=[1.0, 2.0, 3.0]), ("top_k (2,)", "sd_ratio (3,)")),
    (lambda: snr.causal_hit_probability([1.0, 2.0], 4096, 32, 8, query_pos=[1, 2, 3]), ("snr (2,)", "query_pos (3,)")),
    (
        lambda: snr.causal_hit_probability(1.0, 4096, 32, 8, query_pos=[100, 200], needle_pos=[1, 2, 3]),
        ("query_pos (2,)", "needle_pos (3,)"),
    ),
    (lambda: snr.planted_token_variance([0.1, 0.2], [16, 32, 64]), ("mu (2,)", "d (3,)")),
    (lambda: snr.generator_block_model([16, 32], [8, 16, 32], 0.5), ("head_dim (2,)", "block_size (3,)")),
    (lambda: snr.cluster_rho([0.1, 0.2], [0.1, 0.2, 0.3]), ("delta_mu (2,)", "mu_cluster (3,)")),
    (lambda: snr.clustering_multiplier([1, 2], [0.1, 0.2, 0.3]), ("m (2,)", "rho (3,)")),
    (lambda: snr.required_snr([0.5, 0.9], [64, 128, 256], 8), ("target (2,)", "n_blocks (3,)")),
]


@pytest.mark.parametrize("call, names", MISMATCHED)
def test_mismatched_shapes_name_the_arguments(call, names):
    with pytest.raises(ValueError, match="arguments of incompatible shapes") as info:
        call()
    for name in names:
        assert name in str(info.value)
