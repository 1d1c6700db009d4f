"""Which tokens of the whole sequence each rank holds: the shard layouts of context parallelism.

Rank ``r`` of ``R`` holds a shard of ``lengths[r]`` tokens (any lengths >= 1; the whole sequence has
``N = sum(lengths)``). A shard is one or two *segments*, runs of consecutive positions:

* ``"contiguous"``: rank r holds positions ``[sum(lengths[:r]), sum(lengths[:r+1]))``;
* ``"zigzag"``: the sequence is cut into 2R pieces; rank r holds piece r (the first ``ceil(L_r / 2)`` tokens
  of its shard) and piece 2R-1-r (the other ``floor(L_r / 2)``), so every rank holds an early and a late
  part. Piece p < R has length ``ceil(L_p / 2)``, piece p >= R length ``floor(L_{2R-1-p} / 2)``.

Why zigzag exists (see docs/design.md, "Context parallelism"): with causal routing a query at position t
scores the ~t/B blocks before it, so routing work grows with position and the last contiguous shard does
(2R-1)/R times the average; zigzag gives every rank the same share. MoBA attention itself costs about the
same for every query (k blocks of B keys), so the attention is balanced in both layouts.
"""

from __future__ import annotations

import numbers
import operator
from dataclasses import dataclass

import torch

__all__ = ["LAYOUTS", "Segment", "Layout", "shard_positions"]

LAYOUTS = ("contiguous", "zigzag")


@dataclass(frozen=True)
class Segment:
    """``length`` consecutive tokens at positions ``start ..`` of the sequence, rows ``local ..`` of the shard."""

    start: int
    local: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class Layout:
    """Shard lengths per rank and the layout kind; the segments every rank holds."""

    lengths: tuple[int, ...]
    kind: str = "contiguous"

    def __post_init__(self):
        if self.kind not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.kind!r}")
        if not self.lengths or any(int(n) < 1 for n in self.lengths):
            raise ValueError(f"every shard needs at least one token, got shard lengths {list(self.lengths)}")

    @property
    def world(self) -> int:
        return len(self.lengths)

    @property
    def seq_len(self) -> int:
        return sum(self.lengths)

    def segments(self, rank: int) -> tuple[Segment, ...]:
        """The segments of rank ``rank``'s shard, in shard order."""
        if self.kind == "contiguous":
            return (Segment(sum(self.lengths[:rank]), 0, self.lengths[rank]),)
        first = [(n + 1) // 2 for n in self.lengths]
        second = [n // 2 for n in self.lengths]
        # pieces 0..R-1 are the first halves in rank order, pieces R..2R-1 the second halves in reverse
        late_start = sum(first) + sum(second[rank + 1:])
        parts = [Segment(sum(first[:rank]), 0, first[rank])]
        if second[rank]:
            parts.append(Segment(late_start, first[rank], second[rank]))
        return tuple(parts)

    def touched_blocks(self, rank: int, block_size: int) -> list[tuple[int, int]]:
        """(first block, number of blocks) that each segment of ``rank`` touches."""
        return [(s.start // block_size, (s.end - 1) // block_size - s.start // block_size + 1)
                for s in self.segments(rank)]


def shard_positions(lengths, rank: int, layout: str = "contiguous") -> torch.Tensor:
    r"""Positions in the whole sequence of the tokens rank ``rank`` holds, in shard order (int64).

    ``lengths`` lists the shard length :math:`L_r` of every rank. Contiguous: rank r holds
    :math:`[\sum_{s<r} L_s,\ \sum_{s \le r} L_s)`; zigzag: piece r (the first :math:`\lceil L_r/2 \rceil`
    positions of its shard) and piece 2R-1-r (the other :math:`\lfloor L_r/2 \rfloor`) of the 2R pieces the
    sequence is cut into. Cut a whole-sequence tensor ``x`` (batch, N, ...) into the shard of ``rank`` with
    ``x[:, shard_positions(lengths, rank, layout)]``.

    Examples
    --------
    >>> shard_positions([3, 3], 1).tolist()
    [3, 4, 5]
    >>> shard_positions([3, 3], 0, layout="zigzag").tolist()
    [0, 1, 5]
    >>> shard_positions([3, 3], 1, layout="zigzag").tolist()
    [2, 3, 4]
    """
    fn = "shard_positions"
    try:  # operator.index, not int(): a length of 2.7 must not become 2 tokens
        values = list(lengths) if not isinstance(lengths, str) else None
        if values is None or any(isinstance(n, bool) for n in values):
            raise TypeError
        values = [operator.index(n) for n in values]
    except TypeError as exc:
        raise TypeError(f"{fn}: lengths must be a sequence of integers, got {lengths!r}") from exc
    lengths = values
    if not lengths:
        raise ValueError(f"{fn}: lengths must list the shard length of every rank, got an empty sequence")
    if min(lengths) < 1:
        raise ValueError(f"{fn}: every shard needs at least one token, got lengths {lengths}")
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or not 0 <= rank < len(lengths):
        raise ValueError(f"{fn}: rank must be an integer in 0..{len(lengths) - 1}, got {rank!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"{fn}: layout must be one of {LAYOUTS}, got {layout!r}")
    segments = Layout(tuple(lengths), layout).segments(int(rank))
    return torch.cat([torch.arange(s.start, s.end) for s in segments])
