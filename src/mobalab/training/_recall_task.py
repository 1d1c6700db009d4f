r"""Key-value recall with distractors: the synthetic long-context task the small models are trained on.

A sequence of N tokens holds ``n_pairs`` *needles* scattered over filler and ends with ``n_queries``
*queries*:

* filler token ids ``[0, F)``: random, uniform over the ``F = n_filler`` filler ids;
* needle token ids ``F + key·V + value``: one token carrying a key (``n_keys`` of them) and a value
  (``V = n_values``); the keys of one sequence are distinct, the values random;
* query token ids ``F + K·V + key``: the key of one of the needles, asked for its value.

A needle is a run of ``needle_len`` = r consecutive copies of its token; the runs sit at random,
non-overlapping places in ``[0, N - Q)``; the queries take the last Q positions and ask for a random subset
of the needles (each at most once), so the needles that are not asked for, and the other queries' needles,
are distractors: the same kind of token with another key. The model must output, at query position
:math:`t_j`, the value of the needle whose key the query carries:

.. math:: \hat y_j = \mathrm{value}(x_{p_j}),\qquad p_j:\ \mathrm{key}(x_{p_j}) = \mathrm{key}(x_{t_j}),\ p_j < N - Q,

a single attention hop from the query to any copy of the needle (key and value share one token, so no
induction circuit is needed and a small model learns it in a few hundred steps); ``needle_pos`` is the run's
first token. Why runs (r > 1): a block's routing score is the mean of its B key scores, so one needle
token raises it by Δμ/B while the noise of a block mean is about σ/√B; attention is satisfied (softmax
saturated on the needle) at Δμ/σ of about √(2 ln N), 4-5 at 1K-4K, far below the ≈ 2√(2B) a single token
needs to win a top-k slot (16 at B = 32), and once attention is saturated the loss has no gradient left to
raise Δμ further (routing itself has none). A run of r related keys raises the block's excess to
r·Δμ (the paper's Δμ_eff with m = r), which is what real text offers the router (see docs/design.md,
"Clustering and key convolution"). Everything is drawn from a ``torch.Generator`` on the CPU, so a seed gives
the same batch on every machine.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

__all__ = ["RecallTask", "RecallBatch", "make_batch"]


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class RecallTask:
    """The recall task's sizes (module docstring): context, needles, queries, the three vocabularies and the
    length of a needle's run.

    Examples
    --------
    >>> task = RecallTask(seq_len=256, n_pairs=8, n_queries=4, n_keys=16, n_values=8, n_filler=32)
    >>> task.vocab_size, task.needle_id(key=2, value=5), task.query_id(key=2)
    (176, 53, 162)
    """

    seq_len: int = 4096
    n_pairs: int = 32
    n_queries: int = 16
    n_keys: int = 256
    n_values: int = 64
    n_filler: int = 256
    needle_len: int = 1

    def __post_init__(self):
        for name in ("seq_len", "n_pairs", "n_queries", "n_keys", "n_values", "n_filler", "needle_len"):
            _positive_int(name, getattr(self, name))
        if self.n_queries > self.n_pairs:
            raise ValueError(f"n_queries ({self.n_queries}) must be <= n_pairs ({self.n_pairs}): each query asks "
                             "for a different needle")
        if self.n_pairs > self.n_keys:
            raise ValueError(f"n_pairs ({self.n_pairs}) must be <= n_keys ({self.n_keys}): keys are distinct")
        if self.n_pairs * self.needle_len > self.seq_len - self.n_queries:
            raise ValueError(f"{self.n_pairs} needles of needle_len {self.needle_len} do not fit before the "
                             f"{self.n_queries} queries in seq_len = {self.seq_len}")

    @property
    def context_len(self) -> int:
        """Positions before the queries, where needles and filler live."""
        return self.seq_len - self.n_queries

    @property
    def needle_offset(self) -> int:
        return self.n_filler

    @property
    def query_offset(self) -> int:
        return self.n_filler + self.n_keys * self.n_values

    @property
    def vocab_size(self) -> int:
        return self.query_offset + self.n_keys

    def needle_id(self, key, value):
        """Token id of the needle (key, value): F + key·V + value (ints or integer tensors)."""
        return self.needle_offset + key * self.n_values + value

    def query_id(self, key):
        """Token id of the query for ``key``: F + K·V + key."""
        return self.query_offset + key


@dataclass(frozen=True)
class RecallBatch:
    """One batch: ``tokens`` (b, N) int64; per query j: ``query_pos``, ``needle_pos``, ``key``, ``answer``
    (b, Q) int64; ``answer`` is the value class in [0, n_values)."""

    tokens: torch.Tensor
    query_pos: torch.Tensor
    needle_pos: torch.Tensor
    key: torch.Tensor
    answer: torch.Tensor

    def to(self, device) -> RecallBatch:
        move = {name: getattr(self, name).to(device, non_blocking=True)
                for name in ("tokens", "query_pos", "needle_pos", "key", "answer")}
        return RecallBatch(**move)


def make_batch(task: RecallTask, batch_size: int, generator: torch.Generator) -> RecallBatch:
    """Draw ``batch_size`` sequences of ``task`` with the CPU ``generator`` (module docstring).

    Examples
    --------
    >>> task = RecallTask(seq_len=64, n_pairs=4, n_queries=2, n_keys=8, n_values=4, n_filler=16)
    >>> b = make_batch(task, 3, torch.Generator().manual_seed(0))
    >>> tuple(b.tokens.shape), tuple(b.answer.shape)
    ((3, 64), (3, 2))
    >>> rows = torch.arange(3)[:, None]
    >>> bool((b.tokens[rows, b.needle_pos] == task.needle_id(b.key, b.answer)).all())
    True
    >>> runs = RecallTask(seq_len=64, n_pairs=4, n_queries=2, n_keys=8, n_values=4, n_filler=16, needle_len=3)
    >>> b = make_batch(runs, 3, torch.Generator().manual_seed(0))
    >>> [bool((b.tokens[rows, b.needle_pos + j] == runs.needle_id(b.key, b.answer)).all()) for j in range(3)]
    [True, True, True]
    """
    if not isinstance(task, RecallTask):
        raise TypeError(f"task must be a RecallTask, got {type(task).__name__}")
    batch_size = _positive_int("batch_size", batch_size)
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise TypeError("generator must be a torch.Generator on the CPU (batches are drawn there, then moved)")
    b, n_q, n_p = batch_size, task.n_queries, task.n_pairs
    tokens = torch.randint(0, task.n_filler, (b, task.seq_len), generator=generator)
    r = task.needle_len
    # distinct positions and distinct keys per row: the first entries of a random permutation; runs of r:
    # n_p distinct starts among context - n_p (r - 1) places, sorted, the i-th moved right by i (r - 1)
    pos = torch.rand(b, task.context_len - n_p * (r - 1), generator=generator).argsort(dim=1)[:, :n_p]
    if r > 1:
        pos = pos.sort(dim=1).values + torch.arange(n_p) * (r - 1)
    keys = torch.rand(b, task.n_keys, generator=generator).argsort(dim=1)[:, :n_p]
    values = torch.randint(0, task.n_values, (b, n_p), generator=generator)
    rows = torch.arange(b)[:, None]
    for offset in range(r):
        tokens[rows, pos + offset] = task.needle_id(keys, values)
    asked = torch.rand(b, n_p, generator=generator).argsort(dim=1)[:, :n_q]
    query_pos = torch.arange(task.context_len, task.seq_len).expand(b, n_q).contiguous()
    key = keys.gather(1, asked)
    tokens[rows, query_pos] = task.query_id(key)
    return RecallBatch(tokens=tokens, query_pos=query_pos, needle_pos=pos.gather(1, asked), key=key,
                       answer=values.gather(1, asked))
