r"""Byte and FLOP model of one MoBA decode step (:func:`decode_bytes`, :func:`decode_flops`).

One step = every sequence of the batch decodes its last ``q_len`` positions (t = N - q_len, ..., N - 1)
against a cache of N tokens. Per (sequence, kv head), with G = heads / kv_heads query heads per kv head and
R = G·q_len query rows, the kernels need

* routing: the fp32 key sums of the complete past blocks of the last query, :math:`n_p = \lfloor (N-1)/B
  \rfloor` blocks of d floats, read once per group of up to 64 rows (every row of a group is scored in one
  pass); routing on centroids of the input precision (``centroid_precision="input"``), the cache's block means
  rounded to the cache's dtype, d elements of ``itemsize`` bytes per block;
* attention: the keys and values of the union of the selected blocks. Every row attends its own (partial)
  block; its k - 1 past blocks are chosen by score. How much the rows of one kv head overlap decides the
  bytes: ``overlap="shared"`` (all rows pick the same blocks: k - 1 past blocks per kv head) or
  ``"independent"`` (each row picks a uniformly random set of k - 1 of the :math:`n_p` past blocks, as on
  random data), where the expected union is

  .. math:: E[U] = n_p\Big(1 - \big(1 - \tfrac{\min(k-1,\,n_p)}{n_p}\big)^{R}\Big);

* q in, out (and lse) back: :math:`2\,b\,h\,q_{len}\,d` elements.

Dense decode reads the whole cache: :math:`2\,b\,h_{kv}\,N\,d` elements of K and V. The cache's own blocks
at the end are partial; their real tokens are counted. Scratch traffic (selection, partial softmax results)
stays in L2 and is not counted. See docs/design.md, "FLOP and byte budget".
"""

from __future__ import annotations

import math
import numbers

from ._contract import check_centroid_precision

__all__ = ["decode_bytes", "decode_flops", "expected_unique_blocks", "OVERLAPS", "ROUTING_ROWS_PER_PASS"]

OVERLAPS = ("independent", "shared")
#: Query rows (heads of a group x positions) that one routing pass scores against each centroid.
ROUTING_ROWS_PER_PASS = 64


def _int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def expected_unique_blocks(n_past: int, top_k: int, rows: int, overlap: str = "independent") -> float:
    r"""Expected number of distinct past blocks that ``rows`` query rows select (k - 1 each of ``n_past``).

    ``"shared"``: :math:`\min(k-1, n_p)`; ``"independent"``: :math:`n_p(1 - (1 - \min(k-1,n_p)/n_p)^R)`.

    Examples
    --------
    >>> from mobalab.kernels import expected_unique_blocks
    >>> round(expected_unique_blocks(4096, 8, 4), 2), expected_unique_blocks(4096, 8, 4, "shared")
    (27.93, 7)
    """
    n_past = _int("n_past", n_past, 0)
    top_k = _int("top_k", top_k, 1)
    rows = _int("rows", rows, 1)
    if overlap not in OVERLAPS:
        raise ValueError(f"overlap must be one of {OVERLAPS}, got {overlap!r}")
    free = min(top_k - 1, n_past)
    if overlap == "shared" or free == 0:
        return free
    return n_past * (1.0 - (1.0 - free / n_past) ** rows)


def _check(seq_len, block_size, top_k, batch, heads, kv_heads, head_dim, q_len, itemsize):
    vals = dict(seq_len=_int("seq_len", seq_len, 1), block_size=_int("block_size", block_size, 1),
                top_k=_int("top_k", top_k, 1), batch=_int("batch", batch, 1), heads=_int("heads", heads, 1),
                kv_heads=_int("kv_heads", kv_heads, 1), head_dim=_int("head_dim", head_dim, 1),
                q_len=_int("q_len", q_len, 1), itemsize=_int("itemsize", itemsize, 1))
    if vals["heads"] % vals["kv_heads"]:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    if vals["q_len"] > vals["seq_len"]:
        raise ValueError(f"q_len ({q_len}) cannot exceed seq_len ({seq_len})")
    return vals


def _own_tokens(seq_len: int, block_size: int, q_len: int) -> int:
    """Tokens (up to seq_len) of the blocks that hold the query positions seq_len - q_len .. seq_len - 1."""
    first = (seq_len - q_len) // block_size
    return seq_len - first * block_size


def decode_bytes(seq_len: int, block_size: int, top_k: int, *, batch: int = 1, heads: int = 32, kv_heads: int = 8,
                 head_dim: int = 128, q_len: int = 1, itemsize: int = 2, overlap: str = "independent",
                 centroid_precision: str = "fp32") -> dict:
    r"""HBM bytes one MoBA decode step needs, by part, and what dense decode reads (module docstring).

    Returns a dict: ``centroid_bytes`` (fp32 block sums, :math:`b\,h_{kv}\lceil R/64\rceil n_p d\cdot 4`; for
    ``centroid_precision="input"`` the 16-bit block means, ``itemsize`` bytes an element instead of 4),
    ``kv_bytes`` (:math:`2\,b\,h_{kv}(T_{own} + E[U]B)\,d\cdot` itemsize), ``q_out_bytes``, ``total_bytes``,
    ``dense_bytes`` (whole cache + q/out), ``byte_ratio`` (dense / MoBA), ``unique_blocks`` (E[U] per kv
    head, past blocks only) and ``n_past`` (complete past blocks of the last query).

    Examples
    --------
    >>> from mobalab.kernels import decode_bytes
    >>> c = decode_bytes(512 * 1024, 128, 8, batch=8, heads=32, kv_heads=8, head_dim=128, overlap="shared")
    >>> round(c["total_bytes"] / 2**20, 1), round(c["byte_ratio"], 1)
    (160.1, 102.3)
    >>> c = decode_bytes(512 * 1024, 128, 8, batch=8, overlap="shared", centroid_precision="input")
    >>> round(c["centroid_bytes"] / 2**20, 1), round(c["byte_ratio"], 1)
    (64.0, 170.5)
    """
    v = _check(seq_len, block_size, top_k, batch, heads, kv_heads, head_dim, q_len, itemsize)
    check_centroid_precision("decode_bytes", centroid_precision)
    if overlap not in OVERLAPS:
        raise ValueError(f"overlap must be one of {OVERLAPS}, got {overlap!r}")
    n, bsz, k, b, h, hk, d, ql, it = (v[x] for x in ("seq_len", "block_size", "top_k", "batch", "heads", "kv_heads",
                                                     "head_dim", "q_len", "itemsize"))
    rows = (h // hk) * ql
    n_past = (n - 1) // bsz
    passes = math.ceil(rows / ROUTING_ROWS_PER_PASS)
    centroid = b * hk * passes * n_past * d * (it if centroid_precision == "input" else 4)
    unique = expected_unique_blocks(n_past, k, rows, overlap)
    own = _own_tokens(n, bsz, ql)
    # When the query positions span two blocks, the earlier one is also a past block of the last query and
    # is already counted in the own tokens: drop its expected share (each past block is selected with
    # probability E[U] / n_p) from the union.
    past = unique - (unique / n_past if own > bsz and n_past else 0.0)
    kv = 2 * b * hk * (own + past * bsz) * d * it
    q_out = 2 * b * h * ql * d * it + b * h * ql * 4
    dense_kv = 2 * b * hk * n * d * it
    total = centroid + kv + q_out
    return dict(centroid_bytes=float(centroid), kv_bytes=float(kv), q_out_bytes=float(q_out), total_bytes=float(total),
                dense_bytes=float(dense_kv + q_out), byte_ratio=float((dense_kv + q_out) / total),
                unique_blocks=float(unique), n_past=n_past)


def decode_flops(seq_len: int, block_size: int, top_k: int, *, batch: int = 1, heads: int = 32, kv_heads: int = 8,
                 head_dim: int = 128, q_len: int = 1) -> dict:
    r"""Useful FLOPs of one MoBA decode step and of dense decode.

    Routing :math:`2\,b\,h\sum_t n_p(t)\,d` (each query row scores the complete past blocks of its position);
    attention :math:`4\,b\,h\sum_t |S_t|\,d` with :math:`|S_t|` = own-block tokens up to t plus
    :math:`\min(k-1, n_p(t))\,B`; dense :math:`4\,b\,h\sum_t (t+1)\,d`. Returns a dict with
    ``routing_flops``, ``attention_flops``, ``total_flops``, ``dense_flops``.

    Examples
    --------
    >>> from mobalab.kernels import decode_flops
    >>> f = decode_flops(32768, 128, 8, batch=1, heads=32, kv_heads=8, head_dim=128)
    >>> f["routing_flops"], f["attention_flops"]
    (2088960, 16777216)
    """
    v = _check(seq_len, block_size, top_k, batch, heads, kv_heads, head_dim, q_len, 1)
    n, bsz, k, b, h, d, ql = (v[x] for x in ("seq_len", "block_size", "top_k", "batch", "heads", "head_dim", "q_len"))
    routing = attention = dense = 0
    for t in range(n - ql, n):
        own = t // bsz
        attended = (t - own * bsz + 1) + min(k - 1, own) * bsz
        routing += 2 * b * h * own * d
        attention += 4 * b * h * attended * d
        dense += 4 * b * h * (t + 1) * d
    return dict(routing_flops=routing, attention_flops=attention, total_flops=routing + attention, dense_flops=dense)
