"""Every public function of mobalab.simulate checks its arguments by the rule set of mobalab.snr.

Counts are integers (not bools or strings; numpy integers and integer-valued floats are fine), cosines lie
in [-1, 1], flags are True or False, mismatched shapes name the arguments, and requests that cannot fit
in memory (or hold no configuration at all) are refused up front with a message that says what to do.
"""

import numpy as np
import pytest
import torch

from mobalab import simulate

_RNG = np.random.default_rng


def _q(n=4, d=8):
    return simulate.random_unit_vectors(_RNG(0), (n,), d)


# (label, call with the argument under test replaced by v, argument name, minimum)
COUNTS = [
    ("score_level_router", lambda v: simulate.score_level_router(1.0, v, 4, trials=10, seed=0), "n_blocks", 1),
    ("score_level_router", lambda v: simulate.score_level_router(1.0, 64, v, trials=10, seed=0), "top_k", 1),
    ("score_level_router", lambda v: simulate.score_level_router(1.0, 64, 4, trials=v, seed=0), "trials", 1),
    (
        "score_level_router_causal",
        lambda v: simulate.score_level_router_causal(1.0, v, 16, 4, trials=10, seed=0),
        "seq_len",
        1,
    ),
    (
        "score_level_router_causal",
        lambda v: simulate.score_level_router_causal(1.0, 512, v, 4, trials=10, seed=0),
        "block_size",
        1,
    ),
    (
        "score_level_router_causal",
        lambda v: simulate.score_level_router_causal(1.0, 512, 16, 4, trials=10, seed=0, query_pos=v),
        "query_pos",
        0,
    ),
    ("vector_level_router", lambda v: simulate.vector_level_router(v, 64, 8, 2, 0.5, trials=10, seed=0), "head_dim", 1),
    ("vector_level_router", lambda v: simulate.vector_level_router(8, v, 8, 2, 0.5, trials=10, seed=0), "seq_len", 1),
    (
        "vector_level_router",
        lambda v: simulate.vector_level_router(8, 64, v, 2, 0.5, trials=10, seed=0),
        "block_size",
        1,
    ),
    ("vector_level_router", lambda v: simulate.vector_level_router(8, 64, 8, v, 0.5, trials=10, seed=0), "top_k", 1),
    ("vector_level_router", lambda v: simulate.vector_level_router(8, 64, 8, 2, 0.5, m=v, trials=10, seed=0), "m", 1),
    (
        "vector_level_router",
        lambda v: simulate.vector_level_router(8, 64, 8, 2, 0.5, trials=10, seed=0, batch_size=v),
        "batch_size",
        1,
    ),
    ("random_unit_vectors", lambda v: simulate.random_unit_vectors(_RNG(0), (3,), v), "d", 1),
    ("random_unit_vectors", lambda v: simulate.random_unit_vectors(_RNG(0), (3, v), 8), "shape entry", 0),
    ("random_cluster_positions", lambda v: simulate.random_cluster_positions(_RNG(0), [5], v, 64, 1), "block_size", 1),
    ("random_cluster_positions", lambda v: simulate.random_cluster_positions(_RNG(0), [0], 8, v, 1), "seq_len", 1),
    ("random_cluster_positions", lambda v: simulate.random_cluster_positions(_RNG(0), [5], 8, 64, v), "count", 0),
    ("random_cluster_positions", lambda v: simulate.random_cluster_positions(_RNG(0), [v], 8, 64, 1), "needle_pos", 0),
    ("planted_needle", lambda v: simulate.planted_needle(_RNG(0), v, 64, 8, 0.5), "head_dim", 1),
    ("planted_needle", lambda v: simulate.planted_needle(_RNG(0), 8, 64, 8, 0.5, m=v), "m", 1),
    ("planted_needle", lambda v: simulate.planted_needle(_RNG(0), 8, 64, 8, 0.5, needle_pos=v), "needle_pos", 0),
    ("averaging_weights", lambda v: simulate.averaging_weights(v), "W", 1),
    ("block_centroids", lambda v: simulate.block_centroids(np.ones((16, 4)), v), "block_size", 1),
    ("select_blocks", lambda v: simulate.select_blocks(np.arange(6.0), v), "top_k", 1),
    ("select_blocks", lambda v: simulate.select_blocks(np.arange(6.0), 2, v), "query_block", 0),
    ("block_hit", lambda v: simulate.block_hit(np.arange(6.0), v, 2), "target_block", 0),
    ("spawn_generators", lambda v: simulate.spawn_generators(0, v), "count", 1),
]
COUNT_IDS = [f"{label}-{name}" for label, _, name, _ in COUNTS]
OPTIONAL = {"query_pos", "needle_pos", "batch_size", "query_block"}


@pytest.mark.parametrize("label, call, name, minimum", COUNTS, ids=COUNT_IDS)
def test_counts_refuse_bools_strings_and_none(label, call, name, minimum):
    for bad in [True, np.False_, "2"] + ([] if name in OPTIONAL else [None]):  # None: "not given"
        with pytest.raises(TypeError, match=f"{name} must be an integer >= {minimum}"):
            call(bad)


@pytest.mark.parametrize("label, call, name, minimum", COUNTS, ids=COUNT_IDS)
def test_counts_refuse_fractions_and_values_below_the_minimum(label, call, name, minimum):
    for bad in (2.5, np.float32(1.5), minimum - 1, float("nan")):
        with pytest.raises(ValueError, match=f"{name} must be an integer >= {minimum}"):
            call(bad)


@pytest.mark.parametrize("label, call, name, minimum", COUNTS, ids=COUNT_IDS)
def test_counts_accept_numpy_integers_and_integer_valued_floats(label, call, name, minimum):
    for value in (np.int64(2), np.uint8(2), 2.0, np.array(2)):
        call(value)


COSINES = [
    ("vector_level_router", lambda v: simulate.vector_level_router(8, 64, 8, 2, v, trials=10, seed=0), "mu_signal"),
    (
        "vector_level_router",
        lambda v: simulate.vector_level_router(8, 64, 8, 2, 0.5, m=2, mu_cluster=v, trials=10, seed=0),
        "mu_cluster",
    ),
    ("planted_keys", lambda v: simulate.planted_keys(_RNG(0), _q(), v), "mu"),
    ("planted_needle", lambda v: simulate.planted_needle(_RNG(0), 8, 64, 8, v), "mu_signal"),
    ("planted_needle", lambda v: simulate.planted_needle(_RNG(0), 8, 64, 8, 0.5, m=2, mu_cluster=v), "mu_cluster"),
    (
        "plant_into",
        lambda v: simulate.plant_into(
            _RNG(0),
            _q(2),
            np.zeros((2, 8, 8), np.float32),
            np.array([1, 2]),
            np.zeros((2, 0), np.int64),
            v,
            0.0,
            "exact",
        ),
        "mu_signal",
    ),
]


@pytest.mark.parametrize("label, call, name", COSINES, ids=[f"{a}-{c}" for a, _, c in COSINES])
def test_cosines_lie_in_minus_one_to_one(label, call, name):
    for ok in (-1.0, 1.0, 0, np.float32(0.5)):
        call(ok)
    for bad in (1.5, -1.01):
        with pytest.raises(ValueError, match=rf"{name} is a cosine and must lie in \[-1, 1\]"):
            call(bad)
    with pytest.raises(ValueError, match=f"{name} must be finite"):
        call(float("nan"))
    for bad in ("0.5", True):
        with pytest.raises(TypeError, match=f"{name} must be a real number"):
            call(bad)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: simulate.score_level_router("high", 64, 4, trials=10, seed=0), TypeError, "snr must be a real"),
        (lambda: simulate.score_level_router(1.0, 64, 4, trials=10, seed=True), TypeError, "seed must be"),
        (
            lambda: simulate.score_level_router(1.0, 64, 4, trials=10, seed=0, progress="yes"),
            TypeError,
            "progress must be True or False",
        ),
        (
            lambda: simulate.score_level_router(1.0, 64, 4, trials=10, seed=0, sd_ratio=-1.0),
            ValueError,
            "sd_ratio must be >= 0",
        ),
        (lambda: simulate.score_level_router(1.0, 64, 4, trials=10, seed=0, method=3), ValueError, "method must be"),
        (
            lambda: simulate.vector_level_router(8, 64, 8, 2, 0.5, trials=10, seed=0, causal=1),
            TypeError,
            "causal must be True or False",
        ),
        (lambda: simulate.vector_level_router(8, 64, 8, 2, 0.5, trials=10, seed="a"), TypeError, "seed must be"),
        (lambda: simulate.random_unit_vectors(42, 3, 8), TypeError, "rng must be"),
        (lambda: simulate.random_unit_vectors(_RNG(0), "3", 8), TypeError, "shape must be"),
        (lambda: simulate.planted_keys(_RNG(0), torch.ones(3, 8), 0.5), TypeError, "q must be a torch tensor for"),
        (
            lambda: simulate.plant_into(
                _RNG(0), _q(2), np.zeros((2, 8, 8)), np.array([1, 8]), np.zeros((2, 0), int), 0.5, 0.0, "exact"
            ),
            ValueError,
            r"needle_pos must lie in \[0, L = 8\)",
        ),
        (
            lambda: simulate.plant_into(
                _RNG(0), _q(2), np.zeros((3, 8, 8)), np.array([1, 2]), np.zeros((2, 0), int), 0.5, 0.0, "exact"
            ),
            ValueError,
            "same b and d",
        ),
        (
            lambda: simulate.plant_into(
                _RNG(0), _q(2), np.zeros((2, 8, 8)), np.array([1.5, 2]), np.zeros((2, 0), int), 0.5, 0.0, "exact"
            ),
            ValueError,
            "needle_pos must be an integer >= 0, got 1.5",
        ),
        (
            lambda: simulate.random_cluster_positions(_RNG(0), [64], 8, 64, 1),
            ValueError,
            r"needle_pos must lie in \[0, seq_len = 64\)",
        ),
        (
            lambda: simulate.block_hit(np.arange(6.0), torch.tensor([1.0]), 2),
            TypeError,
            "target_block must hold integers",
        ),
        (
            lambda: simulate.block_scores(torch.ones(4), np.ones((8, 4)), 4),
            TypeError,
            "must both be numpy arrays or both torch tensors",
        ),
        (lambda: simulate.block_scores(np.ones((3, 4)), np.ones((2, 8, 4)), 4), ValueError, "leading dimensions"),
        (lambda: simulate.select_blocks(["a", "b"], 1), TypeError, "scores must be a real"),
        (lambda: simulate.key_conv(np.array([["a"]]), [1.0]), TypeError, "keys must be a real array"),
        (lambda: simulate.key_conv(np.ones((4, 2)), [1.0, float("inf")]), ValueError, "weights must be finite"),
        (lambda: simulate.spawn_generators(-1, 2), ValueError, "seed must be an integer >= 0"),
    ],
)
def test_kinds_values_and_shapes(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_mismatched_configurations_name_the_arguments():
    with pytest.raises(ValueError, match=r"snr \(2,\), n_blocks \(3,\)"):
        simulate.score_level_router([1.0, 2.0], [8, 16, 32], 4, trials=10, seed=0)
    with pytest.raises(ValueError, match=r"seq_len \(2,\), block_size \(3,\)"):
        simulate.score_level_router_causal(1.0, [256, 512], [8, 16, 32], 4, trials=10, seed=0)


@pytest.mark.parametrize(
    "empty", [dict(snr=[]), dict(n_blocks=np.zeros(0, int)), dict(top_k=np.ones((0, 1), int), snr=np.ones((0, 3)))]
)
def test_no_configuration_is_refused(empty):
    args = dict(snr=1.0, n_blocks=64, top_k=4) | empty
    with pytest.raises(ValueError, match="broadcast to an empty shape .* no configuration to simulate"):
        simulate.score_level_router(args.pop("snr"), args.pop("n_blocks"), args.pop("top_k"), trials=10, seed=0)
    with pytest.raises(ValueError, match="no configuration to simulate"):
        simulate.score_level_router_causal([], 512, 16, 4, trials=10, seed=0)


def test_allocations_that_cannot_fit_are_refused_up_front():
    # n_blocks = 2**40 would draw 2**40 noise scores per trial: 8 TiB for the float64 scores alone.
    with pytest.raises(ValueError, match=r"method='explicit' .* TiB of memory at once.*use method='binomial'"):
        simulate.score_level_router(1.0, 2**40, 8, trials=1, seed=0, method="explicit")
    with pytest.raises(ValueError, match=r"method='explicit' .* TiB .*use method='binomial'"):
        simulate.score_level_router_causal(1.0, 2**42, 4, 8, trials=1, seed=0, method="explicit")
    # ... while the binomial sampler is O(1) per trial, whatever n.
    assert simulate.score_level_router(1.0, 2**40, 8, trials=100, seed=0).trials[0] == 100
    assert simulate.score_level_router(40.0, 2**40, 2**40, trials=5, seed=0, method="explicit").hits[0] == 5
    with pytest.raises(ValueError, match=r"vector_level_router with 1099511627776 keys .* TiB .*score_level_router"):
        simulate.vector_level_router(64, 2**40, 64, 8, 0.5, trials=1, seed=0)
    with pytest.raises(ValueError, match=r"key convolution.*needs"):
        simulate.vector_level_router(
            64,
            2**36,
            64,
            8,
            0.5,
            trials=1,
            seed=0,
            causal=True,
            key_conv=simulate.KeyConv(simulate.averaging_weights(3)),
        )
    with pytest.raises(ValueError, match=r"random_unit_vectors of shape \(1024, 1073741824, 8\) needs"):
        simulate.random_unit_vectors(_RNG(0), (1024, 2**30), 8)
    with pytest.raises(ValueError, match="needs .* of memory at once"):
        simulate.planted_needle(_RNG(0), 64, 2**40, 64, 0.5)


def test_routing_decided_without_vectors_needs_no_memory():
    # k >= n (non-causal) and N <= kB (causal): every trial is a hit without drawing a vector.
    assert simulate.vector_level_router(64, 2**40, 2**37, 8, 0.5, trials=3, seed=0).hits[0] == 3
    assert simulate.vector_level_router(64, 2**40, 2**37, 9, 0.5, trials=3, seed=0, causal=True).hits[0] == 3


def test_cluster_positions_do_not_allocate_by_block_size():
    # A block far longer than the sequence: the slots drawn are bounded by the sequence, not by B.
    pos = simulate.random_cluster_positions(_RNG(0), np.array([3, 7]), 2**40, 10, 4)
    assert pos.shape == (2, 4) and np.all((pos >= 0) & (pos < 10))
