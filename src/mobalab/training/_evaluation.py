r"""Evaluating a trained model: retrieval accuracy and, per layer and head, the routing statistics.

On ``sequences`` fresh sequences (a generator seeded with ``seed``, so every model sees the same evaluation
set) the model runs once with ``capture=True``; its answers give the accuracy (the argmax value class at
each query position equals the needle's value) and its captured post-RoPE q / k give, per layer, head and
router setting (B, k), the measured statistics and the predicted and observed recall of
:func:`routing_statistics`. A MoBA model is measured with its own (B, k) (``routed`` = True: the recall is the
routing it used); any other ``routes`` (e.g. a dense model measured as if it were routed) have ``routed`` =
False.
"""

from __future__ import annotations

import numbers

import pandas as pd
import torch

from ._recall_task import make_batch
from ._routing_statistics import STAT_COLUMNS, aggregate_measurements, concat_measurements, measure_queries
from ._training import TrainedModel

__all__ = ["evaluate"]


def check_routes(routes, prefix: str = "evaluate: ") -> list[tuple[int, int]]:
    """``routes`` as a non-empty list of (block_size, top_k) pairs of integers >= 1; ``prefix`` opens the error."""
    try:
        pairs = [tuple(route) for route in routes]
    except TypeError:
        pairs = None
    ok = bool(pairs) and all(len(p) == 2 and all(not isinstance(x, bool) and isinstance(x, numbers.Integral) and x >= 1
                                                 for x in p) for p in pairs)
    if not ok:
        raise ValueError(f"{prefix}routes must be a non-empty sequence of (block_size, top_k) pairs of integers "
                         f">= 1, e.g. [(32, 4)]; got {routes!r}")
    return [(int(b), int(k)) for b, k in pairs]


def evaluate(trained: TrainedModel, *, sequences: int = 64, batch_size: int = 16, seed: int = 0,
             routes=None) -> pd.DataFrame:
    """Accuracy and routing statistics of ``trained`` on ``sequences`` evaluation sequences.

    ``routes``: (block_size, top_k) pairs to measure; default: the model's own for a MoBA model (required
    for a dense one). ``seed`` (an integer in [0, 2**63)) draws the evaluation sequences. Returns one row per
    (layer, head, route) with columns ``layer``, ``routed``, the :data:`STAT_COLUMNS` and the model-level
    ``correct``, ``answers``, ``accuracy``, ``eval_loss``.

    Examples
    --------
    >>> from mobalab.training import ModelConfig, RecallTask, TrainConfig, train
    >>> task = RecallTask(seq_len=128, n_pairs=4, n_queries=4, n_keys=8, n_values=4, n_filler=8)
    >>> cfg = ModelConfig(d_model=32, n_layers=1, n_heads=2, head_dim=16, attention="moba", block_size=16,
    ...                   top_k=2)
    >>> run = train(cfg, task, TrainConfig(steps=2, batch_size=2, device="cpu"))
    >>> df = evaluate(run, sequences=4, batch_size=2)
    >>> len(df), int(df["answers"].iloc[0]), bool(df["routed"].all())
    (2, 16, True)
    """
    if not isinstance(trained, TrainedModel):
        raise TypeError(f"trained must be a TrainedModel, got {type(trained).__name__}")
    for name, v in (("sequences", sequences), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"evaluate: {name} must be an integer >= 1, got {v!r}")
    # int() would truncate 1.5 to 1 and torch wraps -1 to 2**64 - 1: each silently another seed's sequences
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**63:
        raise ValueError(f"evaluate: seed must be an integer from 0 to 2**63 - 1, got {seed!r}")
    mc, task, model, device = trained.model_config, trained.task, trained.model, trained.device
    own = (mc.block_size, mc.top_k) if mc.attention == "moba" else None
    if routes is None:
        if own is None:
            raise ValueError("evaluate: a dense model has no router; give routes=[(block_size, top_k), ...]")
        routes = [own]
    routes = list(dict.fromkeys(check_routes(routes)))
    gen = torch.Generator().manual_seed(int(seed))
    parts: dict[tuple[int, int, int], list] = {}
    correct = answers = 0
    loss_sum = 0.0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    model.eval()
    with torch.no_grad():
        done = 0
        while done < sequences:
            bs = min(batch_size, sequences - done)
            batch = make_batch(task, bs, gen).to(device)
            if autocast is not None:
                with autocast:
                    logits, qk = model(batch.tokens, batch.query_pos, capture=True)
            else:
                logits, qk = model(batch.tokens, batch.query_pos, capture=True)
            correct += int((logits.argmax(-1) == batch.answer).sum())
            answers += batch.answer.numel()
            loss_sum += float(torch.nn.functional.cross_entropy(
                logits.reshape(-1, task.n_values), batch.answer.reshape(-1), reduction="sum"))
            for layer, (q, k) in enumerate(qk):
                for bsz, top_k in routes:
                    parts.setdefault((layer, bsz, top_k), []).append(
                        measure_queries(q, k, batch.query_pos, batch.needle_pos, bsz, top_k, span=task.needle_len,
                                        rope_base=mc.rope_base if mc.rope else None))
            done += bs
    frames = []
    for (layer, bsz, top_k), measured in parts.items():
        df = aggregate_measurements(concat_measurements(measured))
        df.insert(0, "layer", layer)
        df.insert(1, "routed", (bsz, top_k) == own)
        frames.append(df)
    out = pd.concat(frames, ignore_index=True)
    out["correct"], out["answers"] = correct, answers
    out["accuracy"] = correct / answers
    out["eval_loss"] = loss_sum / answers
    return out[["layer", "routed", *STAT_COLUMNS, "correct", "answers", "accuracy", "eval_loss"]]
