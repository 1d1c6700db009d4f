"""How many list offers a warp of the router's top-k scan runs per 64-block chunk, modelled on random scores (CPU).

Usage: python scripts/offer_counts.py [--blocks 512,1024,2048,4096] [--warps 32] [--cap 7] [--seed 0]

The wgmma top-k kernel (cuda/topk_wgmma.cu) scans a chunk of 64 candidate blocks per row as two 32-block words,
in descending block order: a word's bit mask holds the scores above the row list's threshold (the list's last
entry, or, while the list is not full, the word's own bound: the cap-th largest of its 16 column-pair maxima), and
each set bit is offered to the list. A warp holds 32 rows, one per lane, and runs an offer loop as many times as its
busiest lane has bits, so its cost per word is the lanes' maximum, not their mean.

Per row of `blocks` candidates (independent standard normal scores, the rows of a warp all of that length) this
counts, per warp and chunk:

- ``word_by_word``: the kernel's order, word 0's mask taken after word 1's offers (max over lanes of each word,
  summed over the two words);
- ``stale_masks``: both masks taken against the threshold at the chunk's start, offered word by word;
- ``joint_loop``: the same masks offered in one loop over the 64 bits (max over lanes of the two words' sum).

All three give the same final lists (a stale threshold only adds offers that cannot change a list). Prints a
Markdown table; `offer_counts` returns it as a DataFrame. (Real scores are not independent normals: this counts the
benchmark's random inputs, which the router's timings use.) Counts are not times: built into the wgmma kernel, the
stale masks ran 0.975-0.98x and the joint loop 0.95-0.98x of the word-by-word scan on an H200 (RESULTS.md).
"""

from __future__ import annotations

import argparse
import heapq

import numpy as np
import pandas as pd

WORD = 32
CHUNK = 2 * WORD


def word_bound(scores: np.ndarray, cap: int) -> float:
    """The cap-th largest of the word's 16 column-pair maxima: cap of its scores lie at or above it."""
    pairs = np.maximum(scores[0::2], scores[1::2])
    return float(np.sort(pairs)[-cap])


def word_mask(scores: np.ndarray, threshold: float, cap: int) -> np.ndarray:
    """The offered columns of a word against a list threshold (-inf: the list is not full, the word's bound)."""
    if threshold > -np.inf:
        return scores > threshold
    return scores >= word_bound(scores, cap)


def offer(heap: list[float], x: float, cap: int) -> None:
    """Insert x into a min-heap of the best cap scores (a no-op when x does not beat the last entry)."""
    if len(heap) < cap:
        heapq.heappush(heap, x)
    elif x > heap[0]:
        heapq.heapreplace(heap, x)


def threshold(heap: list[float], cap: int) -> float:
    """The list's last entry once it holds cap scores, else -inf (the kernel then filters by the word's bound)."""
    return heap[0] if len(heap) == cap else -np.inf


def warp_counts(scores: np.ndarray, cap: int) -> np.ndarray:
    """Offers per chunk, shape (chunks, 3): word_by_word, stale_masks, joint_loop, for one warp's rows (32, n)."""
    rows, n = scores.shape
    lists: list[list[float]] = [[] for _ in range(rows)]
    out = []
    for c in range(n // CHUNK - 1, -1, -1):
        word_by_word = np.zeros((2, rows), int)
        stale = np.zeros((2, rows), int)
        for r in range(rows):
            words = (scores[r, c * CHUNK + WORD:(c + 1) * CHUNK], scores[r, c * CHUNK:c * CHUNK + WORD])
            start = threshold(lists[r], cap)
            for w, s in enumerate(words):
                stale[w, r] = int(word_mask(s, start, cap).sum())
            for w, s in enumerate(words):
                m = word_mask(s, threshold(lists[r], cap), cap)
                word_by_word[w, r] = int(m.sum())
                for x in s[::-1][m[::-1]]:  # descending block order
                    offer(lists[r], float(x), cap)
        out.append((word_by_word.max(axis=1).sum(), stale.max(axis=1).sum(), stale.sum(axis=0).max()))
    return np.asarray(out)


def offer_counts(blocks=(512, 1024, 2048, 4096), warps: int = 32, cap: int = 7, seed: int = 0) -> pd.DataFrame:
    """Mean offers per warp and 64-block chunk for rows of each candidate count in `blocks` (multiples of 64).

    Examples
    --------
    >>> df = offer_counts(blocks=(128,), warps=2, seed=1)
    >>> list(df.columns)
    ['blocks', 'word_by_word', 'stale_masks', 'joint_loop']
    >>> bool((df.joint_loop <= df.stale_masks).all())
    True
    """
    bad = [n for n in blocks if n <= 0 or n % CHUNK]
    if bad:
        raise ValueError(f"blocks must be positive multiples of {CHUNK}; got {bad}")
    if warps < 1 or not 1 <= cap <= 16:
        raise ValueError(f"warps must be >= 1 and cap in 1..16 (register lists); got warps={warps}, cap={cap}")
    rng = np.random.default_rng(seed)
    rows = []
    for n in blocks:
        counts = np.concatenate([warp_counts(rng.standard_normal((32, n)).astype(np.float32), cap)
                                 for _ in range(warps)])
        rows.append((n, *counts.mean(axis=0)))
    return pd.DataFrame(rows, columns=["blocks", "word_by_word", "stale_masks", "joint_loop"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--blocks", default="512,1024,2048,4096", help="candidate blocks per row, multiples of 64")
    p.add_argument("--warps", type=int, default=32)
    p.add_argument("--cap", type=int, default=7, help="list capacity (causal top-k 8: 7)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        df = offer_counts(tuple(int(x) for x in args.blocks.split(",")), args.warps, args.cap, args.seed)
    except ValueError as e:
        p.error(str(e))
    print(f"offers per warp and 64-block chunk (random normal scores, cap {args.cap}, {args.warps} warps)\n")
    print("| " + " | ".join(df.columns) + " |")
    print("|" + "---|" * len(df.columns))
    for row in df.itertuples(index=False):
        print(f"| {row.blocks} | " + " | ".join(f"{v:.2f}" for v in row[1:]) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
