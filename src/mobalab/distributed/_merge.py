r"""Log-sum-exp combination of partial attention results.

Attention of a query over a key set split into parts :math:`p` (here: the shards of a sequence) is

.. math::
    \mathrm{lse} = \log \sum_p e^{\mathrm{lse}_p}, \qquad o = \sum_p e^{\mathrm{lse}_p - \mathrm{lse}}\, o_p ,

with :math:`(o_p, \mathrm{lse}_p)` the softmax attention over part p alone; a part with nothing attended has
:math:`\mathrm{lse}_p = -\infty` and weight 0. Folding the parts in one at a time gives the same result in
any order up to rounding. Gradients of a shard's pieces simply add (:class:`GradientSum`). Both copy a piece
into rows that nothing has written yet instead of combining it with a neutral start (:class:`_Rows`).
"""

from __future__ import annotations

import math

import torch

__all__ = ["Accumulator", "GradientSum"]


class _Rows:
    """The row ranges written so far, to tell which rows of a new range are untouched."""

    def __init__(self):
        self._written: list[tuple[int, int]] = []

    def pieces(self, lo: int, hi: int) -> list[tuple[int, int, bool]]:
        """[lo, hi) cut at the bounds of the written ranges: (start, end, untouched) pieces in order."""
        cuts = sorted({lo, hi, *(x for a, b in self._written for x in (a, b) if lo < x < hi)})
        return [(r0, r1, all(r1 <= a or r0 >= b for a, b in self._written))
                for r0, r1 in zip(cuts, cuts[1:], strict=False) if r1 > r0]

    def split(self, lo: int, hi: int) -> list[tuple[int, int, bool]]:
        """:meth:`pieces`; then [lo, hi) counts as written."""
        pieces = self.pieces(lo, hi)
        self._written.append((lo, hi))
        return pieces


class Accumulator:
    """Running (out, lse) of a shard's queries, in the compute dtype, folded in part by part.

    Read the combination with :meth:`result`. Bytes per element of out (the cost at millions of rows): the
    first part of a row range is copied in (read the part, write the accumulator: e + 4 for input dtype e); a
    later one is ``mul_`` then ``addcmul_`` (4 + 4, then 4 + e + 4), where separate scale, cast, multiply and
    add passes moved about twice as much; nothing is filled beforehand.
    """

    def __init__(self, out_shape, dtype: torch.dtype, device):
        self.out = torch.empty(out_shape, dtype=dtype, device=device)
        self.lse = torch.empty(tuple(out_shape[:3]), dtype=dtype, device=device)
        self._rows = _Rows()

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, lse); rows that no part reached are (0, -inf)."""
        self._neutral(self._rows.split(0, self.out.shape[1]))
        return self.out, self.lse

    def _neutral(self, pieces) -> None:
        """The untouched pieces set to (0, -inf), the combination of no part."""
        for r0, r1, fresh in pieces:
            if fresh:
                self.out[:, r0:r1].zero_()
                self.lse[:, r0:r1].fill_(-math.inf)

    def dense(self, lo: int, hi: int) -> bool:
        """Whether rows [lo, hi) of out and lse are dense blocks of memory (batch 1, or all rows)."""
        return self.out[:, lo:hi].is_contiguous() and self.lse[:, lo:hi].is_contiguous()

    def target(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Rows [lo, hi) for a kernel that combines its part in place (check :meth:`dense` first): (out, lse,
        fold). ``fold`` False: no row holds a part yet, the kernel stores; True: it folds by log-sum-exp (rows
        untouched so far are set to (0, -inf) first). The rows count as written from now on."""
        pieces = self._rows.split(lo, hi)
        fold = not all(fresh for _, _, fresh in pieces)
        if fold:
            self._neutral(pieces)
        return self.out[:, lo:hi], self.lse[:, lo:hi], fold

    def add(self, lo: int, hi: int, out: torch.Tensor, lse: torch.Tensor) -> None:
        """Fold the partial ``out`` (batch, hi - lo, heads, d) and ``lse`` of query rows ``lo .. hi - 1`` in."""
        lse = lse.to(self.lse.dtype)
        for r0, r1, fresh in self._rows.split(lo, hi):
            part_out, part_lse = out[:, r0 - lo:r1 - lo], lse[:, r0 - lo:r1 - lo]
            if fresh:  # (0, -inf) folded with (o, lse) is (o, lse) exactly: weight e^0 = 1, or 0 with o = 0
                self.out[:, r0:r1].copy_(part_out)
                self.lse[:, r0:r1].copy_(part_lse)
            else:
                self._fold(self.out[:, r0:r1], self.lse[:, r0:r1], part_out, part_lse)

    @staticmethod
    def _fold(acc_out, acc_lse, out, lse) -> None:
        total = torch.logaddexp(acc_lse, lse)
        empty = total == -math.inf  # neither side attended anything yet: keep zeros, avoid -inf - -inf
        w_old = torch.where(empty, 0.0, torch.exp(acc_lse - total)).unsqueeze(-1)
        w_new = torch.where(empty, 0.0, torch.exp(lse - total)).unsqueeze(-1)
        acc_out.mul_(w_old).addcmul_(out, w_new)
        acc_lse.copy_(total)


class GradientSum:
    """An fp32 sum over dim 1 of a (batch, n, ...) tensor built from pieces: a piece on untouched rows is copied
    in (read e, write 4 bytes per element), later ones are added; :meth:`result` zeroes the rows that nothing
    touched. (Zeroing first and adding every piece moved 4 + 10 bytes per element.) A kernel can also write its
    terms straight into the sum (:meth:`target`): no piece, no conversion to the input dtype and back."""

    def __init__(self, shape, dtype, device):
        self.value = torch.empty(shape, dtype=dtype, device=device)
        self._rows = _Rows()

    def add(self, lo: int, hi: int, piece: torch.Tensor) -> None:
        for r0, r1, fresh in self._rows.split(lo, hi):
            if fresh:
                self.value[:, r0:r1].copy_(piece[:, r0 - lo:r1 - lo])
            else:
                self.value[:, r0:r1] += piece[:, r0 - lo:r1 - lo]

    def dense(self, lo: int, hi: int) -> bool:
        """Whether rows [lo, hi) are one dense block of memory (batch 1, or all rows), as a kernel writes them."""
        return self.value[:, lo:hi].is_contiguous()

    def target(self, lo: int, hi: int, store_ok: bool) -> tuple[torch.Tensor, bool]:
        """Rows [lo, hi) handed to a kernel that writes them in place (check :meth:`dense` first): (view, store).

        ``store`` is True when ``store_ok`` and no row of the range holds a value yet: the kernel may store
        over the view. Otherwise the untouched rows are zeroed first and the kernel must add. Either way the
        rows count as written from now on.
        """
        pieces = self._rows.split(lo, hi)
        store = store_ok and all(fresh for _, _, fresh in pieces)
        if not store:
            self._zero(pieces)
        return self.value[:, lo:hi], store

    def result(self) -> torch.Tensor:
        """The whole sum; rows nothing touched are zeroed."""
        self._zero(self._rows.split(0, self.value.shape[1]))
        return self.value

    def _zero(self, pieces) -> None:
        for r0, r1, fresh in pieces:
            if fresh:
                self.value[:, r0:r1].zero_()

    def add_to(self, target: torch.Tensor, lo: int, hi: int) -> None:
        """``target`` (rows [lo, hi) of some tensor) += rows [lo, hi) of the sum, only where a piece was written:
        rows nothing touched add nothing, so neither are they zeroed nor read (at 512K untouched rows that was
        ~7 ms of a last ring step)."""
        for r0, r1, untouched in self._rows.pieces(lo, hi):
            if not untouched:
                target[:, r0 - lo:r1 - lo] += self.value[:, r0:r1]
