r"""Log-sum-exp combination of partial attention results.

Attention of a query over a key set split into parts :math:`p` (here: the shards of a sequence) is

.. math::
    \mathrm{lse} = \log \sum_p e^{\mathrm{lse}_p}, \qquad o = \sum_p e^{\mathrm{lse}_p - \mathrm{lse}}\, o_p ,

with :math:`(o_p, \mathrm{lse}_p)` the softmax attention over part p alone; a part with nothing attended has
:math:`\mathrm{lse}_p = -\infty` and weight 0. Folding the parts in one at a time gives the same result in
any order up to rounding.
"""

from __future__ import annotations

import math

import torch

__all__ = ["Accumulator"]


class Accumulator:
    """Running (out, lse) of a shard's queries, in the compute dtype, folded in part by part.

    Bytes per element of out (the cost at millions of rows): the first part of a row range is copied in
    (read the part, write the accumulator: e + 4 for input dtype e); a later one is ``mul_`` then ``addcmul_``
    (4 + 4, then 4 + e + 4), where separate scale, cast, multiply and add passes moved about twice as much.
    """

    def __init__(self, out_shape, dtype: torch.dtype, device):
        self.out = torch.zeros(out_shape, dtype=dtype, device=device)
        self.lse = torch.full(tuple(out_shape[:3]), -math.inf, dtype=dtype, device=device)
        self._folded: list[tuple[int, int]] = []  # row ranges that hold a part already

    def add(self, lo: int, hi: int, out: torch.Tensor, lse: torch.Tensor) -> None:
        """Fold the partial ``out`` (batch, hi - lo, heads, d) and ``lse`` of query rows ``lo .. hi - 1`` in."""
        acc_out, acc_lse = self.out[:, lo:hi], self.lse[:, lo:hi]
        lse = lse.to(acc_lse.dtype)
        fresh = all(hi <= a or lo >= b for a, b in self._folded)
        self._folded.append((lo, hi))
        if fresh:  # (0, -inf) folded with (o, lse) is (o, lse) exactly: weight e^(lse - lse) = 1, or 0 with o = 0
            acc_out.copy_(out)
            acc_lse.copy_(lse)
            return
        total = torch.logaddexp(acc_lse, lse)
        empty = total == -math.inf  # neither side attended anything yet: keep zeros, avoid -inf - -inf
        w_old = torch.where(empty, 0.0, torch.exp(acc_lse - total)).unsqueeze(-1)
        w_new = torch.where(empty, 0.0, torch.exp(lse - total)).unsqueeze(-1)
        acc_out.mul_(w_old).addcmul_(out, w_new)
        acc_lse.copy_(total)
