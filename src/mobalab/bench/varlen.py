r"""Packed variable-length MoBA and MoBA inside a transformers model, timed on one GPU.

``python -m mobalab.bench.varlen [--quick] [--out DIR]``. Two measurements, CUDA-event timed, median after
warm-up, side by side in one process:

1. **Varlen efficiency.** 16 sequences of mixed lengths (1K to 64K, 262144 tokens in all, :data:`MIXED_LENGTHS`)
   through :func:`mobalab.kernels.moba_attention_varlen`, against the same token count as an equal-length
   batch (16 x 16K) through :func:`mobalab.kernels.moba_attention`, that equal-length batch packed
   through the varlen path (one run of one length: a batched call), and 16 packed sequences of distinct lengths
   near 16K (16K +- 128 i, i = 1..8: a call per sequence, the cost of packing without the length mix), and
   packed short documents (64 to 4096 tokens, :func:`short_documents`, 122 of them) as the call batches them
   (zero-padded batches of near lengths) and with a call per run of one length. 16 heads,
   d 128, B 128, k 8, causal, bf16; forward + backward (``torch.autograd.grad``). Useful work counts the
   routing and the selected tokens only, from the routing actually taken:

   .. math::
       F = 2 d h \sum_t n_{\mathrm{scored}}(t) + 3.5 \cdot 4 d h \sum_t |S_t| ,

   (forward attention :math:`4 d |S_t|` per query and head, backward 2.5 times that; :math:`n_{\mathrm{scored}}`
   = complete past blocks of the query's own sequence). The figure of merit is the varlen run's useful
   TFLOP/s over the equal-length batch's (target: at least 0.9).
2. **Model step.** A tiny Llama-style model (4 layers, 8 heads of d 128, MLP 2816, vocabulary 4096, bf16
   weights, AdamW) built from a config in code: one training step (forward with loss, backward, optimizer
   step) at 32K and 128K tokens (batch 1) with ``attn_implementation="moba"`` (B 128, k 8) against
   ``"sdpa"``.

Writes ``varlen_kernels.csv``, ``varlen_model.csv``, ``varlen.md`` and ``varlen_env.json`` under ``--out``.
``--quick`` (a smoke run, under 2 minutes on an H200): fewer repetitions and the model at 32K only.
``--hf-only`` runs the model step alone (no kernel table), ``--kernels-only`` the kernel table alone;
``--hf-lengths 32K,128K`` sets the model's context lengths (with or without ``--quick``). ``--hf-generate
32K,128K`` runs only the generation table (``generation.csv``, ``generation.md``): the time per new token after a
prompt of each length, MoBA through ``MobaCache`` (each step ``moba_decode``) against MoBA through transformers'
dynamic cache and SDPA. A training step that runs out of GPU memory is a row that says so (``step_ms`` NaN,
``note`` "out of memory"), and the other rows still run.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import importlib.util
import json
import os
import statistics
import sys

import torch

__all__ = ["main", "useful_flops", "parse_lengths", "short_documents", "MIXED_LENGTHS"]

#: The mixed-length batch: 16 sequences, 1024 .. 65536 tokens, 262144 in all (some not multiples of 128).
MIXED_LENGTHS = (5000, 65536, 1024, 12288, 43368, 2048, 20480, 7000, 32768, 3000, 16384, 8192, 24576, 4096, 10240,
                 6144)
HEADS, HEAD_DIM, BLOCK, TOP_K = 16, 128, 128, 8
MODEL = dict(num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, head_dim=128, hidden_size=1024,
             intermediate_size=2816, vocab_size=4096)
MODEL_LENGTHS = (32768, 131072)  # training-step context lengths (--quick: the first; --hf-lengths: any)
BWD_FACTOR = 2.5  # backward attention FLOPs per forward attention FLOP (five matmuls against two)


# --------------------------------------------------------------------------------------------------
# counting


def useful_flops(topk, cu_seqlens, block_size: int, head_dim: int, causal: bool = True) -> dict:
    r"""Useful FLOPs of MoBA over packed sequences, from the routing ``topk`` (total, heads, k; -1 = unused).

    Routing :math:`2 d \sum_{t,h} n_{\mathrm{scored}}(t)` (complete past blocks of the sequence when causal,
    all its blocks otherwise) and forward attention :math:`4 d \sum_{t,h} |S_{t,h}|`, :math:`|S_{t,h}|` the
    keys query t of head h attends: its own block up to t plus every selected past block (causal), or the
    selected blocks at their real length (non-causal). Returns ``{"routing": ..., "attention_fwd": ...}``.

    Examples
    --------
    >>> import torch
    >>> from mobalab.kernels import moba_topk_varlen
    >>> from mobalab.bench.varlen import useful_flops
    >>> q = k = torch.ones(6, 1, 2)
    >>> cu = torch.tensor([0, 6], dtype=torch.int32)
    >>> useful_flops(moba_topk_varlen(q, k, cu, 6, 2, 8), cu, 2, 2)  # dense: 21 attended keys, 6 scored blocks
    {'routing': 24, 'attention_fwd': 168}
    """
    from mobalab import _validate as V

    block_size, head_dim = V.scalar_count("block_size", block_size), V.scalar_count("head_dim", head_dim)
    causal = V.flag("causal", causal)
    for name, x in (("topk", topk), ("cu_seqlens", cu_seqlens)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"useful_flops: {name} must be a tensor, got {type(x).__name__}")
    if topk.dim() != 3:
        raise ValueError(f"useful_flops: topk must be (total, heads, top_k), got shape {tuple(topk.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"useful_flops: cu_seqlens must be 1-D with at least two offsets, got shape "
                         f"{tuple(cu_seqlens.shape)}")
    topk = topk.long()
    total, heads, _ = topk.shape
    device = topk.device
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    lengths = cu.diff()
    # the counts index topk by these offsets: any other cut would count some other query's keys, or none
    if int(cu[0]) != 0 or int(cu[-1]) != total or bool((lengths < 0).any()):
        raise ValueError(f"useful_flops: cu_seqlens must rise from 0 to topk's {total} rows, got "
                         f"{cu_seqlens.tolist()}")
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)
    t = torch.arange(total, device=device) - cu[seq]  # position inside the sequence
    n_seq = lengths[seq]
    valid = topk >= 0
    if causal:
        own = t % block_size + 1
        attended = own.unsqueeze(1) + block_size * (valid.sum(-1) - 1)
        scored = (t // block_size) * heads
    else:
        size = torch.clamp(n_seq.unsqueeze(1).unsqueeze(2) - topk * block_size, max=block_size)
        attended = torch.where(valid, size, 0).sum(-1)
        scored = ((n_seq + block_size - 1) // block_size) * heads
    return {"routing": int(2 * head_dim * scored.sum()), "attention_fwd": int(4 * head_dim * attended.sum())}


def parse_lengths(text: str) -> tuple[int, ...]:
    """``"32K,128K"`` -> ``(32768, 131072)``: token counts, ``K`` = 1024, each a positive multiple of 128.

    Examples
    --------
    >>> parse_lengths("32K, 131072,4k")
    (32768, 131072, 4096)
    """
    if not isinstance(text, str):
        raise TypeError(f"lengths: expected a comma-separated string, got {type(text).__name__}")
    out = []
    for item in text.split(","):
        word = item.strip().upper()
        scale = 1024 if word.endswith("K") else 1
        digits = word[:-1] if scale > 1 else word
        n = int(digits) * scale if digits.isdigit() else 0
        if n <= 0 or n % BLOCK:
            raise ValueError(f"lengths: {item.strip()!r} in {text!r} is not a token count > 0 and a multiple of "
                             f"{BLOCK} (e.g. 32K or 131072)")
        out.append(n)
    return tuple(out)


def _lengths_arg(text: str) -> tuple[int, ...]:
    try:
        return parse_lengths(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# --------------------------------------------------------------------------------------------------
# timing


def _time_ms(fn, warmup: int, reps: int) -> float:
    """Median of ``reps`` calls, each from an idle GPU, after ``warmup``."""
    from mobalab.bench.attention import time_queued_ms

    return time_queued_ms(fn, steps=1, rounds=reps, warmup=warmup)


def _cu(lengths, device):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _near_equal(equal: int, n: int) -> tuple[int, ...]:
    """n distinct block-aligned lengths around ``equal`` with the same sum: equal +- BLOCK i, i = 1..n/2."""
    half = [BLOCK * i for i in range(1, n // 2 + 1)]
    lengths = [equal + d for d in half] + [equal - d for d in half] + [equal] * (n % 2)
    return tuple(lengths)


def short_documents(total: int, shortest: int = 64, longest: int = 4096, seed: int = 0) -> tuple[int, ...]:
    """Document lengths drawn uniformly from ``[shortest, longest]`` (seeded) until they fill ``total`` tokens,
    the last one cut to fit: packed pretraining data.

    Examples
    --------
    >>> docs = short_documents(65536)
    >>> sum(docs), min(docs) >= 1, max(docs) <= 4096
    (65536, True, True)
    """
    g = torch.Generator().manual_seed(seed)
    lengths, left = [], total
    while left > 0:
        n = min(left, int(torch.randint(shortest, longest + 1, (1,), generator=g)))
        lengths.append(n)
        left -= n
    return tuple(lengths)


@contextlib.contextmanager
def _calls_per_run():
    """Every run of one length a call of its own (no zero-padded batches): what the grouping saves."""
    from mobalab.kernels import _varlen

    saved, _varlen.RUN_COST = _varlen.RUN_COST, 0
    try:
        yield
    finally:
        _varlen.RUN_COST = saved


def kernel_rows(quick: bool, seed: int = 0) -> list[dict]:
    """Forward + backward of the mixed-length batch, the equal-length batch, the equal one packed, distinct
    lengths near the equal one packed, and short documents packed (grouped into padded batches, and a call per
    run)."""
    from mobalab.kernels import moba_attention, moba_attention_varlen, moba_topk_varlen

    total = sum(MIXED_LENGTHS)
    n = len(MIXED_LENGTHS)
    equal = total // n
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, dout = (torch.randn(total, HEADS, HEAD_DIM, device="cuda", generator=g, dtype=torch.bfloat16)
                     for _ in range(4))
    leaves = [x.requires_grad_() for x in (q, k, v)]
    warmup, reps = (1, 3) if quick else (2, 10)
    docs = short_documents(total, seed=seed)
    runs = {
        "varlen, mixed lengths": (MIXED_LENGTHS, lambda q, k, v, cu, m: moba_attention_varlen(
            q, k, v, cu, m, BLOCK, TOP_K)),
        "varlen, equal lengths": ((equal,) * n, lambda q, k, v, cu, m: moba_attention_varlen(
            q, k, v, cu, m, BLOCK, TOP_K)),
        "varlen, distinct lengths near equal": (_near_equal(equal, n), lambda q, k, v, cu, m: moba_attention_varlen(
            q, k, v, cu, m, BLOCK, TOP_K)),
        "varlen, short documents": (docs, lambda q, k, v, cu, m: moba_attention_varlen(
            q, k, v, cu, m, BLOCK, TOP_K)),
        "varlen, short documents, a call per run": (docs, lambda q, k, v, cu, m: _per_run(
            moba_attention_varlen, q, k, v, cu, m, BLOCK, TOP_K)),
        "batch, equal lengths": ((equal,) * n, lambda q, k, v, cu, m: moba_attention(
            *(x.view(n, equal, HEADS, HEAD_DIM) for x in (q, k, v)), BLOCK, TOP_K).view(total, HEADS, HEAD_DIM)),
    }
    rows = []
    for name, (lengths, attend) in runs.items():
        cu, longest = _cu(lengths, "cuda"), max(lengths)
        with torch.no_grad():
            flops = useful_flops(moba_topk_varlen(q, k, cu, longest, BLOCK, TOP_K), cu, BLOCK, HEAD_DIM)

        def step(attend=attend, cu=cu, longest=longest):
            return torch.autograd.grad(attend(*leaves, cu, longest), leaves, dout)

        def forward(attend=attend, cu=cu, longest=longest):
            with torch.no_grad():
                return attend(*leaves, cu, longest)

        ms = _time_ms(step, warmup, reps)
        fwd_ms = _time_ms(forward, warmup, reps)
        useful = flops["routing"] + (1 + BWD_FACTOR) * flops["attention_fwd"]
        rows.append(dict(run=name, sequences=len(lengths), tokens=total, shortest=min(lengths), longest=longest,
                         heads=HEADS, head_dim=HEAD_DIM, block=BLOCK, top_k=TOP_K, fwd_ms=round(fwd_ms, 3),
                         fwd_bwd_ms=round(ms, 3), useful_tflop=round(useful / 1e12, 4),
                         useful_tflops=useful / ms / 1e9))
    base = rows[-1]["useful_tflops"]
    for row in rows:
        row["vs_equal_batch"] = round(row["useful_tflops"] / base, 3)
        row["useful_tflops"] = round(row["useful_tflops"], 2)
    return rows


def _per_run(fn, *args):
    with _calls_per_run():
        return fn(*args)


def model_rows(quick: bool, seed: int = 0, lengths=None, on_row=None, device="cuda") -> list[dict]:
    """Training-step time of the tiny Llama with MoBA and with SDPA at each context length (``lengths``, default
    :data:`MODEL_LENGTHS`, the first only when ``quick``). A step that runs out of memory gives a row with
    ``step_ms`` NaN and ``note`` "out of memory". ``on_row(rows)`` is called after every row (to save them)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mobalab.integrations.transformers import register

    register()
    if lengths is None:
        lengths = MODEL_LENGTHS[:1] if quick else MODEL_LENGTHS
    warmup, reps = (1, 3) if quick else (2, 5)
    rows = []
    for seqlen in lengths:
        g = torch.Generator(device=device).manual_seed(seed)
        ids = torch.randint(0, MODEL["vocab_size"], (1, seqlen), device=device, generator=g)
        for attn in ("moba", "sdpa"):
            row = dict(attention=attn, seqlen=seqlen, layers=MODEL["num_hidden_layers"],
                       heads=MODEL["num_attention_heads"], head_dim=MODEL["head_dim"])
            try:
                ms, peak = _model_step(LlamaConfig, LlamaForCausalLM, attn, ids, seed, warmup, reps)
                row.update(step_ms=round(ms, 2), tokens_per_s=round(seqlen / ms * 1e3), peak_gb=round(peak, 2),
                           note="")
            except torch.cuda.OutOfMemoryError:
                # the row says so; the other lengths and the other attention still run
                row.update(step_ms=float("nan"), tokens_per_s=float("nan"),
                           peak_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2),
                           note=f"out of memory ({torch.cuda.get_device_properties(0).total_memory / 1e9:.0f} GB)")
            gc.collect()
            torch.cuda.empty_cache()
            print(row, flush=True)
            rows.append(row)
            if attn == "sdpa":
                rows[-2]["speedup_vs_sdpa"] = round(row["step_ms"] / rows[-2]["step_ms"], 2)
                row["speedup_vs_sdpa"] = 1.0
            if on_row is not None:
                on_row(rows)
    return rows


def _model_step(config_cls, model_cls, attn, ids, seed, warmup, reps):
    """(median ms, peak GB) of forward with loss, backward and AdamW step of a freshly built model."""
    config = config_cls(**MODEL, max_position_embeddings=ids.shape[1], attn_implementation=attn,
                        moba_block_size=BLOCK, moba_top_k=TOP_K)
    torch.manual_seed(seed)
    model = model_cls(config).to(device=ids.device, dtype=torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        model(ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    try:
        return _time_ms(step, warmup, reps), torch.cuda.max_memory_allocated() / 1e9
    finally:
        opt.zero_grad(set_to_none=True)  # an out-of-memory step leaves gradients behind


GENERATE_STEPS = 16  # new tokens timed per generation row (the first two dropped as warm-up)
GENERATE_WAYS = (("moba", "dynamic"), ("moba", "MobaCache"), ("sdpa", "dynamic"))  # the reference first


def generation_rows(lengths, seed: int = 0, steps: int = GENERATE_STEPS, on_row=None, device="cuda") -> list[dict]:
    """Time per generated token of the tiny Llama (bf16, batch 1) after a prompt of each length in ``lengths``:
    MoBA with :class:`mobalab.integrations.transformers.MobaCache` (a step runs ``moba_decode``), MoBA with
    transformers' dynamic cache (a step runs a full-length MoBA over the zero-padded query sequence) and SDPA with
    the dynamic cache (dense decode). Each row: the median of ``steps - 2`` single-token forward calls (greedy
    token fed back), the prompt's prefill time, and the speedup against the SDPA row; the logits of the first
    step are compared with the MoBA dynamic-cache row's (relative norm of the difference)."""
    from mobalab.integrations.transformers import register

    register()
    rows = []
    for seqlen in lengths:
        g = torch.Generator(device=device).manual_seed(seed)
        ids = torch.randint(0, MODEL["vocab_size"], (1, seqlen), device=device, generator=g)
        ref = None
        for attn, kind in GENERATE_WAYS:
            row, first = _generation_row(attn, kind, ids, steps, seed, device)
            if (attn, kind) == ("moba", "dynamic"):
                ref = first
            row["first_step_rel_diff"] = (round(((first - ref).norm() / ref.norm()).item(), 4)
                                          if ref is not None and attn == "moba" else "")
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
            print(row, flush=True)
            rows.append(row)
            if on_row is not None:
                on_row(rows)
        sdpa = rows[-1]["token_ms"]
        for r in rows[-len(GENERATE_WAYS):]:
            r["speedup_vs_sdpa"] = round(sdpa / r["token_ms"], 2)
        if on_row is not None:
            on_row(rows)
    return rows


def _generation_row(attn: str, kind: str, ids, steps: int, seed: int, device) -> tuple[dict, torch.Tensor]:
    """One way of generating after the prompt ``ids``: (row with prefill_ms and token_ms, first step's logits)."""
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    from mobalab.integrations.transformers import MobaCache, cache_argument

    seqlen = ids.shape[1]
    config = LlamaConfig(**MODEL, max_position_embeddings=seqlen + steps, attn_implementation=attn,
                         moba_block_size=BLOCK, moba_top_k=TOP_K)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16).eval()
    cache = {cache_argument(): MobaCache(config, seqlen + steps) if kind == "MobaCache" else DynamicCache()}
    times, first = [], None
    with torch.no_grad():
        prefill_ms, out = _timed(lambda: model(ids, use_cache=True, **cache), device)
        logits = out.logits[:, -1:]
        for _ in range(steps):
            token = logits.argmax(-1)
            ms, out = _timed(lambda token=token: model(token, use_cache=True, **cache), device)
            logits = out.logits
            times.append(ms)
            first = logits.float() if first is None else first
    row = dict(attention=attn, cache=kind, context=seqlen, layers=MODEL["num_hidden_layers"],
               prefill_ms=round(prefill_ms, 2), token_ms=round(statistics.median(times[2:]), 3))
    return row, first


def _timed(fn, device):
    """(ms, result) of one call: CUDA events on a GPU, the wall clock elsewhere (the CPU tests)."""
    if device != "cuda":
        import time

        t0 = time.perf_counter()
        out = fn()
        return (time.perf_counter() - t0) * 1e3, out
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end), out


# --------------------------------------------------------------------------------------------------
# output


def _table(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def markdown(kernels: list[dict], model: list[dict], env: dict, generation: list[dict] | None = None) -> str:
    """The report: environment line, the kernel table and the model table (each left out when it has no rows),
    and the generation table when there is one."""
    title = "Packed variable-length MoBA" if kernels else "MoBA in a transformers model"
    head = (f"# {title}\n\n{env.get('cuda_device')} ({env.get('cuda_sms')} SMs), torch "
            f"{env.get('torch')}, CUDA {env.get('cuda')}, commit {env.get('git_commit')}, {env.get('utc')}\n")
    if kernels:
        head += (f"\n## Forward + backward, {sum(MIXED_LENGTHS)} tokens, {HEADS} heads, d {HEAD_DIM}, B {BLOCK}, "
                 f"k {TOP_K}, causal, bf16\n\n{_table(kernels)}\n")
    text = head
    if model:
        text += (f"\n## Training step, tiny Llama "
                 f"({MODEL['num_hidden_layers']} layers, {MODEL['num_attention_heads']} heads, d {MODEL['head_dim']})"
                 f"\n\n{_table(model)}\n")
    if generation:
        text += (f"\n## Generation, tiny Llama, batch 1, B {BLOCK}, k {TOP_K}: ms per new token after the prompt\n\n"
                 f"{_table(generation)}\n")
    return text


def _write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        if rows:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def main(argv=None) -> int:
    """Run the benchmark (needs a CUDA GPU, CuPy and transformers); returns the process exit status."""
    p = argparse.ArgumentParser(prog="python -m mobalab.bench.varlen", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: fewer repetitions, the model at 32K only")
    p.add_argument("--out", default="bench_out", help="output folder (default: bench_out)")
    p.add_argument("--hf-only", action="store_true", help="only the transformers training step (no kernel table)")
    p.add_argument("--kernels-only", action="store_true", help="only the kernel table (no transformers model)")
    p.add_argument("--hf-lengths", type=_lengths_arg, default=None, metavar="N,N,...",
                   help="context lengths of the training step, e.g. 32K,128K (default: 32K and 128K; --quick: 32K)")
    p.add_argument("--hf-generate", type=_lengths_arg, default=None, metavar="N,N,...",
                   help="only the generation table: ms per new token after prompts of these lengths, MoBA with "
                        "MobaCache / with the dynamic cache / SDPA (e.g. 32K,128K)")
    args = p.parse_args(argv)
    if args.hf_only and args.kernels_only:
        p.error("--hf-only and --kernels-only exclude each other")
    from mobalab.kernels import gpu_available

    if not gpu_available():
        print("mobalab.bench.varlen: needs a CUDA GPU with CuPy (pip install 'mobalab[gpu]')", file=sys.stderr)
        return 2
    if importlib.util.find_spec("transformers") is None:
        print("mobalab.bench.varlen: needs transformers (pip install 'mobalab[hf]')", file=sys.stderr)
        return 2
    from .environment import environment

    env = environment()
    if args.hf_generate:
        os.makedirs(args.out, exist_ok=True)

        def save_generation(rows):
            _write_csv(os.path.join(args.out, "generation.csv"), rows)
            with open(os.path.join(args.out, "generation.md"), "w") as f:
                f.write(markdown([], [], env, rows))

        rows = generation_rows(args.hf_generate, on_row=save_generation)
        print(markdown([], [], env, rows))
        return 0
    kernels = [] if args.hf_only else kernel_rows(args.quick)
    if kernels:
        print(_table(kernels), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "varlen_env.json"), "w") as f:
        json.dump(env, f, indent=2)
    if kernels:
        _write_csv(os.path.join(args.out, "varlen_kernels.csv"), kernels)

    def report(model) -> str:
        text = markdown(kernels, model, env)
        with open(os.path.join(args.out, "varlen.md"), "w") as f:
            f.write(text)
        return text

    def save(model):  # after every model row: a run cut short keeps what it measured
        _write_csv(os.path.join(args.out, "varlen_model.csv"), model)
        report(model)

    model = [] if args.kernels_only else model_rows(args.quick, lengths=args.hf_lengths, on_row=save)
    print(report(model))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
