"""scripts/offer_counts.py on the CPU: a planted row counted by hand, the orderings every input must obey, and the
refusal of bad arguments."""

import numpy as np
import pytest

SCRIPT_NAME = "offer_counts"  # the conftest's `script` fixture loads it


def test_a_planted_row(script):
    # scores 0..63 rising with the block, cap 1: word 1 (blocks 32..63) offers its maximum against its own bound,
    # after which nothing in word 0 beats 63; against the chunk's first threshold (the list still empty) word 0
    # offers its own maximum too
    counts = script.warp_counts(np.arange(64, dtype=np.float32)[None, :], cap=1)
    assert counts.tolist() == [[1, 2, 2]]


def test_orderings_on_random_rows(script):
    rng = np.random.default_rng(3)
    counts = np.concatenate([script.warp_counts(rng.standard_normal((32, 256)).astype(np.float32), cap=7)
                             for _ in range(3)])
    word_by_word, stale, joint = counts.T
    assert (joint <= stale).all()  # the maximum of a sum is at most the sum of the maxima
    assert (joint < stale).any()
    # (word_by_word may exceed stale_masks in a chunk: where the list fills during word 1, word 0 is filtered by the
    # list's threshold, which can lie below the word's own bound that the stale mask uses)
    assert word_by_word.sum() > 0


@pytest.mark.parametrize("argv", [["--blocks", "100"], ["--blocks", "0"], ["--cap", "0"], ["--warps", "0"]])
def test_refuses_bad_arguments(script, argv):
    with pytest.raises(SystemExit):
        script.main(argv)


def test_prints_a_table(script, capsys):
    assert script.main(["--blocks", "128", "--warps", "1"]) == 0
    out = capsys.readouterr().out
    assert "| blocks | word_by_word | stale_masks | joint_loop |" in out
    assert "| 128 |" in out
