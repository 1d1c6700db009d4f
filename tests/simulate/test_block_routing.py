"""MoBA routing rules of the vector router against a brute-force per-query implementation."""

import numpy as np
import pytest
import torch

from mobalab.kernels.reference import moba_topk
from mobalab.simulate import block_centroids, block_hit, block_scores, select_blocks


def brute_force_scores(q, keys, block_size):
    """Block scores with Python loops: centroid = mean of the keys that exist in the block; <q, centroid>."""
    n_tok, d = keys.shape
    scores = []
    for j in range(-(-n_tok // block_size)):
        members = keys[j * block_size : min((j + 1) * block_size, n_tok)]
        centroid = [sum(float(row[ch]) for row in members) / len(members) for ch in range(d)]
        scores.append(sum(float(q[ch]) * centroid[ch] for ch in range(d)))
    return scores


def brute_force_route(scores, top_k, c=None):
    """Selected blocks straight from the MoBA rules; ties toward the higher block index.

    Non-causal (c None): the best k of all blocks. Causal: own block c forced and counted in k, then the
    best k-1 complete past blocks j < c (all of them if fewer).
    """
    if c is None:
        return set(sorted(range(len(scores)), key=lambda j: (scores[j], j), reverse=True)[:top_k])
    past = sorted(range(c), key=lambda j: (scores[j], j), reverse=True)
    return {c} | set(past[: top_k - 1])


def tie_prone_inputs(rng, n_tok, d):
    """Small-integer keys and queries: many blocks get exactly equal scores."""
    return rng.integers(-1, 2, d).astype(np.float64), rng.integers(-1, 2, (n_tok, d)).astype(np.float64)


CASES = [
    # (seq_len, block_size, top_k, d)
    (64, 8, 3, 2),  # many ties, N a multiple of B
    (61, 8, 3, 2),  # partial last block
    (40, 8, 1, 3),  # k = 1: own block only (causal)
    (40, 8, 5, 3),  # k = n: everything in the past
    (40, 8, 9, 3),  # k > number of blocks
    (37, 5, 4, 1),  # d = 1, partial last block
]


@pytest.mark.parametrize("seq_len, block_size, top_k, d", CASES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("tie_prone", [True, False])
def test_select_blocks_and_block_hit_match_brute_force(seq_len, block_size, top_k, d, causal, tie_prone):
    rng = np.random.default_rng(seq_len * 100 + top_k * 10 + d + causal)
    for _ in range(4):
        if tie_prone:
            q, keys = tie_prone_inputs(rng, seq_len, d)
        else:
            q, keys = rng.standard_normal(d), rng.standard_normal((seq_len, d))
        n = -(-seq_len // block_size)
        # Routing depends on t only through c = t // B: test the first and last position of every block.
        ts = sorted({min(t, seq_len - 1) for c in range(n) for t in (c * block_size, c * block_size + block_size - 1)})
        ts = ts if causal else [None]
        bf_scores = brute_force_scores(q, keys, block_size)
        scores_np = block_scores(q, keys, block_size)
        np.testing.assert_allclose(scores_np, bf_scores, rtol=1e-12, atol=1e-12)
        scores_t = block_scores(torch.from_numpy(q), torch.from_numpy(keys), block_size)
        for t in ts:
            c = None if t is None else t // block_size
            expected = brute_force_route(bf_scores, top_k, c)
            for scores in (scores_np, scores_t):
                mask = select_blocks(scores, top_k, c)
                got = set(np.flatnonzero(np.asarray(mask)).tolist())
                assert got == expected, (t, got, expected)
                hits = [bool(block_hit(scores, j, top_k, c)) for j in range(n)]
                assert hits == [j in expected for j in range(n)], (t, hits, expected)


def test_batched_routing_matches_per_row():
    """Batched scores with per-row query blocks give the per-row answers."""
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 3, (50, 12)).astype(np.float32)  # ties
    c = rng.integers(0, 12, 50)
    target = rng.integers(0, 12, 50)
    for xp_scores in (scores, torch.from_numpy(scores)):
        mask = np.asarray(select_blocks(xp_scores, 4, c))
        hit = np.asarray(
            block_hit(xp_scores, target if isinstance(xp_scores, np.ndarray) else torch.from_numpy(target), 4, c)
        )
        for i in range(50):
            ref = select_blocks(scores[i], 4, int(c[i]))
            np.testing.assert_array_equal(mask[i], ref)
            assert hit[i] == ref[target[i]]
    # The first causal block is always just the own block.
    np.testing.assert_array_equal(select_blocks(scores[:, :3], 5, 0), np.eye(3, dtype=bool)[[0] * 50])


def test_block_hit_with_truncated_past_scores():
    """Causal block_hit only needs the scores of the past blocks j < c (how the vector router calls it)."""
    scores = np.array([[0.5, 0.1, 0.9], [0.5, 0.1, 0.9]])
    # c = 3: past blocks 0..2, k = 2 gives one past slot: block 2 wins.
    np.testing.assert_array_equal(block_hit(scores, np.array([2, 0]), 2, np.array([3, 3])), [True, False])
    # Own block (target == c) is a hit even though its score is not given.
    assert block_hit(scores[0], 3, 2, 3)
    # A future block is never hit.
    assert not block_hit(scores[0], 2, 5, 1)
    with pytest.raises(ValueError, match="cover"):
        block_hit(scores[0], 0, 2, 5)


def test_centroids_average_real_length():
    keys = np.arange(14, dtype=np.float64).reshape(7, 2)
    np.testing.assert_allclose(block_centroids(keys, 3), [[2, 3], [8, 9], [12, 13]])
    half = torch.from_numpy(keys).to(torch.bfloat16)
    assert block_centroids(half, 3).dtype == torch.float32  # accumulated in fp32
    with pytest.raises(ValueError, match="block_size"):
        block_centroids(keys, 0)
    with pytest.raises(ValueError, match="head dim"):
        block_scores(np.ones(3), keys, 3)
    with pytest.raises(ValueError, match="top_k"):
        select_blocks(np.ones(3), 0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_len, block_size, top_k", [(64, 8, 3), (61, 8, 3), (40, 8, 1), (40, 8, 9), (37, 5, 4)])
@pytest.mark.parametrize("inputs", ["ties", "gaussian"])
def test_agrees_with_kernel_reference(causal, seq_len, block_size, top_k, inputs):
    """The simulators' routing and the kernels' ground truth select the same blocks, in the same order."""
    rng = np.random.default_rng(seq_len + top_k + 100 * causal)
    if inputs == "ties":  # small integers: many exactly equal block scores
        qs = rng.integers(-1, 2, (seq_len, 3)).astype(np.float64)
        keys = rng.integers(-1, 2, (seq_len, 3)).astype(np.float64)
    else:
        qs, keys = rng.standard_normal((seq_len, 16)), rng.standard_normal((seq_len, 16))
    idx = moba_topk(
        torch.from_numpy(qs)[None, :, None], torch.from_numpy(keys)[None, :, None], block_size, top_k, causal
    )[0, :, 0].numpy()
    n = -(-seq_len // block_size)
    scores = block_scores(qs, np.broadcast_to(keys, (seq_len, *keys.shape)), block_size)
    c = np.arange(seq_len) // block_size if causal else None
    mask = select_blocks(scores, top_k, c)
    for t in range(seq_len):
        chosen = [int(j) for j in idx[t] if j >= 0]
        assert set(chosen) == set(np.flatnonzero(mask[t]).tolist()), t
        assert len(chosen) == min(top_k, 1 + t // block_size if causal else n)
        # Slot order: the own block first (causal), then by descending score, ties to the higher index.
        ranked = chosen[1:] if causal else chosen
        if causal:
            assert chosen[0] == t // block_size
        assert ranked == sorted(ranked, key=lambda j: (scores[t, j], j), reverse=True), t
        for j in range(n):
            assert bool(block_hit(scores[t], j, top_k, None if c is None else int(c[t]))) == (j in chosen)


@pytest.mark.parametrize("causal", [False, True])
def test_non_finite_keys_route_like_the_kernel_reference(causal):
    """A block with a NaN or infinite key scores NaN and is never selected (causal: unless it is the own
    block), in numpy and torch alike, as the kernels' reference routes it."""
    rng = np.random.default_rng(5 + causal)
    seq_len, block_size, d = 61, 8, 4
    n = -(-seq_len // block_size)
    for top_k in (1, 3, 8):
        qs, keys = rng.standard_normal((seq_len, d)), rng.standard_normal((seq_len, d))
        keys[[3, 20, 60], [0, 1, 2]] = [np.nan, np.inf, -np.inf]  # blocks 0, 2 and the partial last one
        idx = moba_topk(
            torch.from_numpy(qs)[None, :, None], torch.from_numpy(keys)[None, :, None], block_size, top_k, causal
        )[0, :, 0].numpy()
        all_keys = np.broadcast_to(keys, (seq_len, *keys.shape))
        c = np.arange(seq_len) // block_size if causal else None
        for scores in (
            block_scores(qs, all_keys, block_size),
            block_scores(torch.from_numpy(qs), torch.from_numpy(all_keys.copy()), block_size),
        ):
            assert np.isnan(np.asarray(scores)[:, [0, 2, n - 1]]).all()
            mask = np.asarray(select_blocks(scores, top_k, c))
            for t in range(seq_len):
                chosen = {int(j) for j in idx[t] if j >= 0}
                assert set(np.flatnonzero(mask[t]).tolist()) == chosen, (top_k, t)
                ct = None if c is None else int(c[t])
                assert [bool(block_hit(scores[t], j, top_k, ct)) for j in range(n)] == [j in chosen for j in range(n)]


@pytest.mark.parametrize("to", [np.asarray, torch.from_numpy])
def test_nan_and_minus_inf_scores_take_no_slot(to):
    scores = to(np.array([0.3, np.nan, -np.inf, 0.2]))
    # k = n: only the two selectable blocks; a NaN target is never a hit, and outranks nothing.
    np.testing.assert_array_equal(np.asarray(select_blocks(scores, 4)), [True, False, False, True])
    assert [bool(block_hit(scores, j, 4)) for j in range(4)] == [True, False, False, True]
    assert [bool(block_hit(scores, j, 1)) for j in range(4)] == [True, False, False, False]
    assert not np.asarray(select_blocks(to(np.full(3, np.nan)), 2)).any()
    # Causal: the own block is taken whatever it scores; NaN past blocks stay out.
    np.testing.assert_array_equal(np.asarray(select_blocks(scores, 3, 2)), [True, False, True, False])
    assert bool(block_hit(scores, 1, 3, 1)) and not bool(block_hit(scores, 1, 4, 3))
