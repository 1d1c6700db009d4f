"""Small transformers trained from scratch on a long-context recall task, and their routing measured.

* :class:`RecallTask`, :func:`make_batch` -- key-value needles with distractors, generated in code;
* :class:`ModelConfig`, :class:`RecallTransformer` -- a decoder-only transformer with RoPE whose attention is
  dense (torch SDPA) or MoBA (:func:`mobalab.kernels.moba_attention`), optionally with the paper's trainable
  key convolution (:class:`KeyConv`);
* :class:`TrainConfig`, :func:`train` -- training from scratch (bf16 + CUDA kernels on a GPU, fp32 on the CPU);
* :func:`evaluate`, :func:`routing_statistics` -- per layer and head, the statistics the routing theory takes
  (μ_signal, μ_noise, σ, m, μ_cluster, Δμ_eff) measured on the post-RoPE q / k, the predicted and the observed
  recall of the needle's block, and the retrieval accuracy;
* :func:`training_cost` -- FLOPs and an H200 time estimate of a training run, computed on the CPU.
"""

from ._cost import H200_ASSUMPTIONS, training_cost
from ._evaluation import evaluate
from ._recall_task import RecallBatch, RecallTask, make_batch
from ._routing_statistics import STAT_COLUMNS, routing_statistics
from ._trainable_key_conv import KeyConv
from ._training import TrainConfig, TrainedModel, load_checkpoint, resolve_device, save_checkpoint, train
from ._transformer import ModelConfig, RecallTransformer, rotary

__all__ = [
    "RecallTask",
    "RecallBatch",
    "make_batch",
    "ModelConfig",
    "RecallTransformer",
    "KeyConv",
    "rotary",
    "TrainConfig",
    "TrainedModel",
    "train",
    "resolve_device",
    "save_checkpoint",
    "load_checkpoint",
    "evaluate",
    "routing_statistics",
    "STAT_COLUMNS",
    "training_cost",
    "H200_ASSUMPTIONS",
]
