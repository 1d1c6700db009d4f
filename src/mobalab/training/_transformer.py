r"""A small decoder-only transformer for the recall task, with dense or MoBA attention.

Per layer (pre-norm):

.. math::
    h = x + W_o\,\mathrm{Attn}\big(R(W_q\,\mathrm{LN}(x)),\ R(\kappa(W_k\,\mathrm{LN}(x))),\ W_v\,\mathrm{LN}(x)\big),
    \qquad x' = h + \mathrm{MLP}(\mathrm{LN}(h)),

with R the rotary position embedding (RoPE, rotate-half form, base ``rope_base``; the identity with
``rope=False``), κ the optional trainable
key convolution (:class:`KeyConv`; applied before RoPE, so it mixes key *content* and the rotation still
encodes each key's own position) and Attn either dense causal softmax attention (torch SDPA) or MoBA
(:func:`mobalab.kernels.moba_attention`: the CUDA kernels for CUDA tensors, the torch reference on the
CPU; own block forced, top-k past blocks by q·centroid, see docs/design.md, "MoBA semantics"). The router
therefore sees exactly the post-convolution, post-RoPE q and k that ``forward(..., capture=True)``
returns.

Input embedding (the task's factored vocabulary, :class:`RecallTask`): a token of kind κ ∈ {filler,
needle, query} embeds as :math:`e_{\rm kind}[\kappa] + e_{\rm fill}[i]` (filler),
:math:`e_{\rm kind} + e_{\rm key}[k] + e_{\rm val}[v]` (needle) or :math:`e_{\rm kind} + e_{\rm key}[k]`
(query): needles and queries share the key table, as tokens of one word would. The output head maps the
final hidden state at the query positions to the ``n_values`` value classes.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._recall_task import RecallTask
from ._trainable_key_conv import KeyConv

__all__ = ["ModelConfig", "RecallTransformer", "rotary"]

ATTENTION_KINDS = ("dense", "moba")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture: width, depth, heads, attention kind, MoBA routing (``block_size``, ``top_k``),
    key-convolution width ``key_conv`` (0: none; the paper's kconv3 / kconv5 are 3 / 5) and ``rope`` (False:
    no position encoding at all, as the paper's MoBA layers; causal masking still orders the tokens).

    Examples
    --------
    >>> ModelConfig(attention="moba", block_size=32, top_k=16, key_conv=3).label
    'moba-32-kconv3'
    """

    d_model: int = 256
    n_layers: int = 2
    n_heads: int = 4
    head_dim: int = 64
    mlp_ratio: int = 4
    attention: str = "dense"
    block_size: int = 128
    top_k: int = 4
    key_conv: int = 0
    rope_base: float = 10000.0
    rope: bool = True

    def __post_init__(self):
        for name in ("d_model", "n_layers", "n_heads", "head_dim", "mlp_ratio", "block_size", "top_k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"ModelConfig: {name} must be an integer >= 1, got {v!r}")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig: head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"ModelConfig: attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if isinstance(self.key_conv, bool) or not isinstance(self.key_conv, numbers.Integral) or self.key_conv < 0:
            raise ValueError(f"ModelConfig: key_conv must be an integer >= 0 (0: none), got {self.key_conv!r}")
        if not isinstance(self.rope, bool):
            raise ValueError(f"ModelConfig: rope must be True or False, got {self.rope!r}")
        # inf would pass ``> 1`` and turn every pair but the first into the identity
        if isinstance(self.rope_base, bool) or not (isinstance(self.rope_base, numbers.Real)
                                                    and math.isfinite(self.rope_base) and self.rope_base > 1):
            raise ValueError(f"ModelConfig: rope_base must be a finite number > 1, got {self.rope_base!r}")

    @property
    def label(self) -> str:
        """'dense' or 'moba-<B>', then '-kconv<W>' with a key convolution and '-nope' without RoPE."""
        base = "dense" if self.attention == "dense" else f"moba-{self.block_size}"
        return base + (f"-kconv{self.key_conv}" if self.key_conv else "") + ("" if self.rope else "-nope")


def rotary(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    r"""RoPE, rotate-half form, on (batch, seqlen, heads, d): channel pairs (i, i + d/2) at position t turn by
    :math:`t\,\theta_i`, :math:`\theta_i = \mathrm{base}^{-2i/d}`. Computed in fp32, returned in x's dtype.

    Examples
    --------
    >>> x = torch.zeros(1, 3, 1, 2); x[..., 0] = 1.0
    >>> [[round(v, 4) for v in row] for row in rotary(x)[0, :, 0].tolist()]  # (cos t, sin t), t = 0, 1, 2
    [[1.0, 0.0], [0.5403, 0.8415], [-0.4161, 0.9093]]
    """
    positions = torch.arange(x.shape[1], device=x.device).view(1, -1, 1)
    return rotate(x, positions, base)


def rotate(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """The rotation of :func:`rotary` by ``positions`` (broadcast against x's leading dims, e.g. offsets per
    element); computed in fp32, returned in x's dtype."""
    d = x.shape[-1]
    half = d // 2
    inv = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) * 2.0 / d)
    angle = positions.to(torch.float32)[..., None] * inv
    cos, sin = angle.cos(), angle.sin()
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class _Layer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        width = cfg.n_heads * cfg.head_dim
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * width, bias=False)
        self.proj = nn.Linear(width, cfg.d_model, bias=False)
        self.key_conv = KeyConv(cfg.key_conv, width) if cfg.key_conv else None
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model), nn.GELU(),
                                 nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model))

    def attend(self, q, k, v):
        cfg = self.cfg
        # with top_k >= the number of blocks MoBA selects every past block and the own block: it is dense causal
        # attention exactly, and SDPA computes it several times faster (short curriculum stages)
        if cfg.attention == "dense" or cfg.top_k >= math.ceil(q.shape[1] / cfg.block_size):
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True)
            return y.transpose(1, 2)
        from mobalab.kernels import moba_attention

        if q.is_cuda:  # the CUDA kernels take bf16 / fp16
            dt = q.dtype if q.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
            q, k, v = (x.to(dt).contiguous() for x in (q, k, v))
        return moba_attention(q, k, v, cfg.block_size, cfg.top_k, causal=True)

    def forward(self, x, capture: list | None = None):
        cfg = self.cfg
        b, n, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, cfg.n_heads, cfg.head_dim).unbind(2)
        if self.key_conv is not None:
            k = self.key_conv(k)
        if cfg.rope:
            q, k = rotary(q, cfg.rope_base), rotary(k, cfg.rope_base)
        if capture is not None:
            capture.append((q.detach(), k.detach()))
        y = self.attend(q, k, v).reshape(b, n, cfg.n_heads * cfg.head_dim)
        x = x + self.proj(y.to(x.dtype))
        return x + self.mlp(self.norm2(x))


class RecallTransformer(nn.Module):
    """Decoder-only transformer for a :class:`RecallTask` (module docstring).

    ``forward(tokens, query_pos, capture=False)``: tokens (b, N) int64, query_pos (b, Q) int64 ->
    logits over the value classes (b, Q, n_values); with ``capture=True`` also a list with one
    ``(q, k)`` pair per layer, each (b, N, heads, head_dim): the post-convolution, post-RoPE queries and keys
    the attention (and the MoBA router) saw.

    Examples
    --------
    >>> task = RecallTask(seq_len=32, n_pairs=2, n_queries=2, n_keys=4, n_values=3, n_filler=5)
    >>> torch.manual_seed(0) and None
    >>> model = RecallTransformer(ModelConfig(d_model=16, n_heads=2, head_dim=8), task)
    >>> tokens = torch.randint(0, 5, (2, 32)); qpos = torch.tensor([[30, 31], [30, 31]])
    >>> logits, qk = model(tokens, qpos, capture=True)
    >>> tuple(logits.shape), len(qk), tuple(qk[0][1].shape)
    ((2, 2, 3), 2, (2, 32, 2, 8))
    """

    def __init__(self, config: ModelConfig, task: RecallTask):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        if not isinstance(task, RecallTask):
            raise TypeError(f"task must be a RecallTask, got {type(task).__name__}")
        self.config, self.task = config, task
        dm = config.d_model
        self.kind = nn.Embedding(3, dm)
        self.filler = nn.Embedding(task.n_filler, dm)
        self.key = nn.Embedding(task.n_keys, dm)
        self.value = nn.Embedding(task.n_values, dm)
        self.layers = nn.ModuleList(_Layer(config) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(dm)
        self.head = nn.Linear(dm, task.n_values)
        self.apply(self._init)
        for layer in self.layers:  # residual branches start small (GPT-2's 1/sqrt(2L) scaling)
            for lin in (layer.proj, layer.mlp[2]):
                nn.init.normal_(lin.weight, std=lin.in_features ** -0.5 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init(m):
        # fan-in scaling (not GPT-2's fixed 0.02): at d_model 64-512 a fixed 0.02 makes the initial q·k
        # logits tiny, and attention then sits for hundreds of steps before it starts to pick the needle
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=m.in_features ** -0.5)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=1.0)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        t = self.task
        needle = (tokens >= t.needle_offset) & (tokens < t.query_offset)
        query = tokens >= t.query_offset
        filler = ~(needle | query)
        rel = tokens - t.needle_offset
        key = torch.where(needle, rel // t.n_values, torch.where(query, tokens - t.query_offset, 0))
        kind = needle.long() + 2 * query.long()
        x = self.kind(kind) + self.filler(torch.where(filler, tokens, 0)) * filler[..., None]
        x = x + self.key(key) * (~filler)[..., None]
        return x + self.value(torch.where(needle, rel % t.n_values, 0)) * needle[..., None]

    def forward(self, tokens: torch.Tensor, query_pos: torch.Tensor, capture: bool = False):
        if tokens.dim() != 2 or query_pos.dim() != 2 or query_pos.shape[0] != tokens.shape[0]:
            raise ValueError(f"tokens must be (batch, seqlen) and query_pos (batch, queries), got "
                             f"{tuple(tokens.shape)} and {tuple(query_pos.shape)}")
        for name, x in (("tokens", tokens), ("query_pos", query_pos)):
            if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
                raise ValueError(f"{name} must be an integer tensor, got {x.dtype}")
        # on the GPU the range checks would cost a host synchronisation per step; the batches come from make_batch.
        # Under torch.compile they would read values a graph cannot hold (the CPU's indexing still refuses them)
        checked = not tokens.is_cuda and not torch.compiler.is_compiling()
        if checked and (int(tokens.min()) < 0 or int(tokens.max()) >= self.task.vocab_size):
            raise ValueError(f"tokens must lie in [0, {self.task.vocab_size}), got "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")
        if checked and not query_pos.is_cuda and query_pos.numel() and (
                int(query_pos.min()) < 0 or int(query_pos.max()) >= tokens.shape[1]):
            raise ValueError(f"query_pos must lie in [0, seqlen = {tokens.shape[1]}), got "
                             f"[{int(query_pos.min())}, {int(query_pos.max())}]")
        qk: list | None = [] if capture else None
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, qk)
        rows = torch.arange(tokens.shape[0], device=tokens.device)[:, None]
        logits = self.head(self.norm(x[rows, query_pos])).float()
        return (logits, qk) if capture else logits
