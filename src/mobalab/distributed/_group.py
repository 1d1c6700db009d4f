"""The process group as context parallelism uses it: ring neighbours, small all-gathers, ring exchanges.

Every collective here is called by all ranks of the group in the same order; a rank that skips one would
block the others until the group's timeout. Tensors live on the device the backend serves (CUDA for NCCL,
CPU for gloo).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Ring", "ring_of", "all_gather_rows", "exchange"]


@dataclass(frozen=True)
class Ring:
    """This rank's place in ``group``: its rank there, the group size and the global ranks of its ring
    neighbours (P2P operations address global ranks)."""

    group: object
    rank: int
    world: int
    next_peer: int
    prev_peer: int


def ring_of(group) -> Ring:
    rank, world = dist.get_rank(group), dist.get_world_size(group)

    def peer(r: int) -> int:
        return dist.get_global_rank(group, r) if group is not None else r

    return Ring(group, rank, world, peer((rank + 1) % world), peer((rank - 1) % world))


def all_gather_rows(row: torch.Tensor, ring: Ring) -> torch.Tensor:
    """(world, *row.shape): every rank's ``row`` (same shape and dtype on all ranks), in rank order."""
    parts = [torch.empty_like(row) for _ in range(ring.world)]
    dist.all_gather(parts, row.contiguous(), group=ring.group)
    return torch.stack(parts)


def exchange(ring: Ring, sends: list[torch.Tensor], recvs: list[torch.Tensor]) -> list:
    """Post ``sends`` to the next rank and ``recvs`` from the previous one, all at once; return the requests.

    The k-th receive matches the previous rank's k-th send, so both lists must have the same order on every
    rank. Nothing waits here: the caller computes, then waits on the requests (on CUDA the wait orders the
    current stream after the transfer without blocking the host).
    """
    ops = [dist.P2POp(dist.isend, t, ring.next_peer, ring.group) for t in sends]
    ops += [dist.P2POp(dist.irecv, t, ring.prev_peer, ring.group) for t in recvs]
    if not ops:
        return []
    return dist.batch_isend_irecv(ops)
