r"""Training a :class:`RecallTransformer` from scratch on fresh batches of a :class:`RecallTask`.

Loss: cross-entropy of the value logits at the query positions,
:math:`\mathcal L = -\frac1{bQ}\sum_{i,j}\log p_\theta(y_{ij} \mid x_i)`. AdamW (β = (0.9, 0.95), weight
decay on matrices only), linear warm-up over ``warmup`` steps then cosine decay to 10% of ``lr``,
gradient clipping at ``grad_clip``. On CUDA the matmuls run under bf16 autocast and MoBA layers call the
CUDA kernels (bf16 q, k, v); on the CPU everything is fp32 and MoBA runs the torch reference.

Length curriculum (optional): ``curriculum`` lists stages ``(seq_len_i, steps_i)`` run first, in order, on
the same task at a shorter length, with the batch enlarged by ``seq_len // seq_len_i`` so that a step holds
as many tokens and far more queries; the remaining steps train at the full length. Attention learns to
match a query to its needle in the first, short stage, where the weight on one needle is not yet diluted over
thousands of positions (from scratch, the first correct answers otherwise take hundreds of steps longer at 1K
than at 256, and do not come at all within a few hundred steps at 4K); the longer stages then let MoBA's
routing adapt step by step (a MoBA layer with ``seq_len_i <= k·B`` attends every past block, i.e. it is dense).

Seeds: ``seed`` fixes the initial weights and the training batches (two independent streams derived
from it), so a run is reproducible on one device; every batch is drawn on the CPU, so CPU and GPU runs
see the same data.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ._recall_task import RecallTask, make_batch
from ._transformer import ModelConfig, RecallTransformer

__all__ = ["TrainConfig", "TrainedModel", "train", "resolve_device", "save_checkpoint", "load_checkpoint"]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; ``device`` is 'auto' (CUDA when usable for the model's attention), 'cpu',
    'cuda' or 'cuda:N'; the loss is recorded every ``log_every`` steps; ``curriculum``: optional
    ``(seq_len, steps)`` stages at shorter lengths run first (module docstring)."""

    steps: int = 400
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 25
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    log_every: int = 10
    curriculum: tuple = ()

    def __post_init__(self):
        try:
            stages = tuple((n, k) for n, k in self.curriculum)
        except (TypeError, ValueError):
            stages = None
        # integers only: int() would truncate a stage of 1.5 steps or 511.9 tokens without a word
        if stages is None or any(isinstance(x, bool) or not isinstance(x, numbers.Integral) for s in stages for x in s):
            raise ValueError(f"TrainConfig: curriculum must be a sequence of (seq_len, steps) pairs of integers, got "
                             f"{self.curriculum!r}")
        stages = tuple((int(n), int(k)) for n, k in stages)
        if any(n < 1 or k < 1 for n, k in stages):
            raise ValueError(f"TrainConfig: curriculum stages need seq_len >= 1 and steps >= 1, got {stages}")
        object.__setattr__(self, "curriculum", stages)
        if isinstance(self.steps, numbers.Integral) and sum(k for _, k in stages) >= self.steps:
            raise ValueError(f"TrainConfig: the curriculum's {sum(k for _, k in stages)} steps must be fewer than "
                             f"steps = {self.steps}")
        for name in ("steps", "batch_size", "log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"TrainConfig: {name} must be an integer >= 1, got {v!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, numbers.Integral) or self.warmup < 0:
            raise ValueError(f"TrainConfig: warmup must be an integer >= 0, got {self.warmup!r}")
        for name in ("lr", "weight_decay", "grad_clip"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0 or (
                    name == "lr" and v == 0):
                raise ValueError(f"TrainConfig: {name} must be a finite number >= 0 (lr > 0), got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) or self.seed < 0:
            raise ValueError(f"TrainConfig: seed must be an integer >= 0, got {self.seed!r}")


@dataclass
class TrainedModel:
    """A trained model with its configs, the device it lives on, the loss curve (``history``: step, loss,
    accuracy on the training batch) and the wall time of training in seconds."""

    model: RecallTransformer
    model_config: ModelConfig
    task: RecallTask
    train_config: TrainConfig
    device: torch.device
    history: pd.DataFrame
    seconds: float


def _cuda_kernels_usable() -> bool:
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("cupy") is not None


def resolve_device(device: str = "auto", attention: str = "moba") -> torch.device:
    """'auto' -> CUDA if a GPU is usable (and CuPy, for MoBA's kernels), else the CPU; explicit names are
    checked.

    Examples
    --------
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if not isinstance(device, str):
        raise TypeError(f"device must be a string ('auto', 'cpu', 'cuda', 'cuda:N'), got {type(device).__name__}")
    if device == "auto":
        usable = _cuda_kernels_usable() if attention == "moba" else torch.cuda.is_available()
        return torch.device("cuda" if usable else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asks for CUDA, but no CUDA device is usable here")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return dev


def _streams(seed: int) -> tuple[int, int]:
    init, data = np.random.SeedSequence(int(seed)).generate_state(2, dtype=np.uint64)
    return int(init >> np.uint64(1)), int(data >> np.uint64(1))


def build_model(model_config: ModelConfig, task: RecallTask, seed: int) -> RecallTransformer:
    """The model's initial weights for ``seed`` (CPU), independent of the global RNG state."""
    init_seed, _ = _streams(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        return RecallTransformer(model_config, task)


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * min(1.0, frac)))


def train(model_config: ModelConfig, task: RecallTask, train_config: TrainConfig = TrainConfig(), *,
          progress: bool = False) -> TrainedModel:
    """Train a fresh :class:`RecallTransformer` (module docstring: loss, optimiser, precision, seeds).

    Examples
    --------
    >>> task = RecallTask(seq_len=64, n_pairs=4, n_queries=4, n_keys=8, n_values=4, n_filler=8)
    >>> cfg = ModelConfig(d_model=32, n_layers=1, n_heads=1, head_dim=32, attention="moba", block_size=16,
    ...                   top_k=2, key_conv=3)
    >>> run = train(cfg, task, TrainConfig(steps=3, batch_size=2, device="cpu", log_every=1))
    >>> run.history["step"].tolist(), run.device.type
    ([0, 1, 2], 'cpu')
    """
    for name, value, cls in (("model_config", model_config, ModelConfig), ("task", task, RecallTask),
                             ("train_config", train_config, TrainConfig)):
        if not isinstance(value, cls):
            raise TypeError(f"{name} must be a {cls.__name__}, got {type(value).__name__}")
    cfg = train_config
    phases = []
    for seq_len, n_steps in cfg.curriculum:
        if seq_len > task.seq_len:
            raise ValueError(f"curriculum stage seq_len {seq_len} must be <= the task's seq_len ({task.seq_len})")
        try:
            short = dataclasses.replace(task, seq_len=seq_len)
        except ValueError as exc:
            raise ValueError(f"curriculum stage seq_len {seq_len} is too short for the task: {exc}") from None
        phases.append((short, cfg.batch_size * (task.seq_len // seq_len), n_steps))
    phases.append((task, cfg.batch_size, cfg.steps - sum(k for _, k in cfg.curriculum)))
    device = resolve_device(cfg.device, model_config.attention)
    model = build_model(model_config, task, cfg.seed).to(device)
    _, data_seed = _streams(cfg.seed)
    gen = torch.Generator().manual_seed(data_seed)

    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg.steps, cfg.warmup))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    logged_steps, losses, accs = [], [], []

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, desc=model_config.label, disable=not progress, unit="step", leave=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    model.train()
    schedule = [(t, b) for t, b, n in phases for _ in range(n)]
    for step, (phase_task, phase_batch) in enumerate(schedule):
        batch = make_batch(phase_task, phase_batch, gen).to(device)
        if autocast is not None:
            with autocast:
                logits = model(batch.tokens, batch.query_pos)
        else:
            logits = model(batch.tokens, batch.query_pos)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, task.n_values), batch.answer.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            # kept on the device: one synchronisation at the end instead of one per logged step
            logged_steps.append(step)
            losses.append(loss.detach())
            accs.append((logits.detach().argmax(-1) == batch.answer).float().mean())
        bar.update(1)
    bar.close()
    history = pd.DataFrame({"step": logged_steps, "loss": torch.stack(losses).float().cpu().numpy(),
                            "accuracy": torch.stack(accs).cpu().numpy()})
    history["seq_len"] = [schedule[s][0].seq_len for s in logged_steps]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    model.eval()
    return TrainedModel(model=model, model_config=model_config, task=task, train_config=cfg, device=device,
                        history=history, seconds=seconds)


def save_checkpoint(trained: TrainedModel, path) -> Path:
    """Write the weights and the three configs to ``path`` (a ``.pt`` file, a few MB for the default sizes).

    Examples
    --------
    >>> import os, tempfile
    >>> task = RecallTask(seq_len=32, n_pairs=2, n_queries=2, n_keys=4, n_values=2, n_filler=4)
    >>> run = train(ModelConfig(d_model=16, n_layers=1, n_heads=1, head_dim=16), task,
    ...             TrainConfig(steps=1, batch_size=1, device="cpu"))
    >>> path = save_checkpoint(run, os.path.join(tempfile.mkdtemp(), "dense.pt"))
    >>> load_checkpoint(path).model_config == run.model_config
    True
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {k: v.detach().cpu() for k, v in trained.model.state_dict().items()},
                "model_config": dataclasses.asdict(trained.model_config),
                "task": dataclasses.asdict(trained.task),
                "train_config": dataclasses.asdict(trained.train_config),
                "history": trained.history.to_dict(orient="list"), "seconds": trained.seconds}, path)
    return path


def load_checkpoint(path, device: str = "cpu") -> TrainedModel:
    """Read a checkpoint written by :func:`save_checkpoint` onto ``device``."""
    blob = torch.load(Path(path), map_location="cpu", weights_only=True)
    mcfg, task = ModelConfig(**blob["model_config"]), RecallTask(**blob["task"])
    tcfg = TrainConfig(**blob["train_config"])
    dev = resolve_device(device, mcfg.attention)
    model = RecallTransformer(mcfg, task)
    model.load_state_dict(blob["state_dict"])
    model.to(dev).eval()
    return TrainedModel(model=model, model_config=mcfg, task=task, train_config=tcfg, device=dev,
                        history=pd.DataFrame(blob["history"]), seconds=float(blob["seconds"]))
