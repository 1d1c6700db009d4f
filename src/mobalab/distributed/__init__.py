"""Context parallelism for MoBA: one long sequence sharded over the processes (GPUs) of a torch.distributed group.

* :func:`context_parallel_moba_attention` -- MoBA attention of the whole sequence from each rank's shard
  (routing by an all-gather of block key sums, attention by K/V passed around a ring, gradients w.r.t. q, k
  and v); equal to single-device :func:`mobalab.kernels.moba_attention` on the whole sequence;
* :func:`shard_positions` -- which positions of the sequence a rank holds (contiguous or zigzag layout);
* :func:`ring_step_model` -- bytes against FLOPs per ring step: where the ring becomes communication-bound.

``torchrun --nproc-per-node N -m mobalab.distributed.bench`` checks the result against one process and
times forward + backward per rank. Design and communication model: docs/design.md, "Context parallelism".
"""

from ._api import context_parallel_moba_attention
from ._layout import shard_positions
from ._model import ring_step_model

__all__ = ["context_parallel_moba_attention", "shard_positions", "ring_step_model"]
