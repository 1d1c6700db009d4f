"""The router's two centroid precisions side by side on one GPU, and FlashMoBA's forward + backward beside them.

Usage: python scripts/centroid_precision_ab.py [--points 64K 512K 64K-B32 8K] [--rounds 3]

Per point (batch 2, 16 heads, d 128, k 8, causal, bf16, random normal inputs; ``NK`` is N = N * 1024 with B 128,
``NK-B32`` B 32): the top-k launch with its centroid pass (``moba_topk_cuda``), the attention forward
(``moba_attention_cuda``) and, at B 128, the training step (forward + backward through ``moba_attention_autograd``)
with ``centroid_precision`` "fp32" and "input", each timed by ``mobalab.bench.attention.time_ms`` (CUDA events, from
an idle GPU, median of its repetitions) in alternating order over ``--rounds`` rounds; the medians over rounds.
Useful forward TFLOP/s as the benchmark counts them. Where FlashMoBA is importable (``scripts/build_flash_moba.sh``),
its forward + backward on the same inputs and the step ratio against both precisions; at 64K also how often its block
sets differ from mobalab's in each precision, and for those rows which side equals the fp64 selection
(``mobalab.bench._flash_moba_peer.selection_agreement``). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from mobalab.bench import _flash_moba_peer as FM
from mobalab.bench.attention import _grad_fn, attention_flops, make_inputs, routing_flops, time_ms
from mobalab.kernels import _cuda_attention as A
from mobalab.kernels._cuda_routing import moba_topk_cuda
from mobalab.kernels.autograd import moba_attention_autograd

K = 1024
PRECISIONS = ("fp32", "input")
BATCH, HEADS, DIM, TOP_K = 2, 16, 128, 8


def _point(text: str) -> tuple[int, int]:
    n, _, block = text.partition("-B")
    return int(n.rstrip("K")) * K, int(block) if block else 128


def _median(values):
    return statistics.median(values) if values else float("nan")


def run_point(n: int, block: int, rounds: int) -> dict:
    q, k, v = make_inputs("random", BATCH, n, HEADS, DIM, torch.bfloat16, n + DIM + block, block)
    dout = torch.randn(q.shape, device="cuda", dtype=q.dtype, generator=torch.Generator(device="cuda").manual_seed(n))
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    times = {(p, what): [] for p in PRECISIONS for what in ("topk", "fwd", "step")}
    for r in range(rounds):
        for p in PRECISIONS if r % 2 == 0 else PRECISIONS[::-1]:
            times[p, "topk"].append(time_ms(lambda p=p: moba_topk_cuda(q, k, block, TOP_K, centroid_precision=p))[0])
            times[p, "fwd"].append(time_ms(lambda p=p: A.moba_attention_cuda(q, k, v, block, TOP_K,
                                                                               centroid_precision=p))[0])
            if block == 128:
                step = _grad_fn(lambda a, b, c, p=p: moba_attention_autograd(a, b, c, block, TOP_K,
                                                                             centroid_precision=p), leaves, dout)
                times[p, "step"].append(time_ms(step)[0])
    row = {"N": n, "B": block, **{f"{what}_{p}": _median(ts) for (p, what), ts in times.items()}}
    flops = routing_flops(BATCH, n, HEADS, DIM, block, True) + attention_flops(BATCH, n, HEADS, DIM, block, TOP_K, True)
    for p in PRECISIONS:
        row[f"tflops_{p}"] = flops / (row[f"fwd_{p}"] * 1e9)
    if block == 128 and FM.load()[0] is not None:
        fm_leaves, forward, grad_out = FM.packed_step(q, k, v, dout, block, TOP_K, True)
        step = lambda: torch.autograd.grad(forward(), fm_leaves, grad_out)  # noqa: E731
        row["flashmoba"] = _median([time_ms(step, budget_s=4.0)[0] for _ in range(2 if n > 64 * K else rounds)])
        del fm_leaves, forward, grad_out
        if n == 64 * K:
            theirs = FM.selection(q, k, block, TOP_K, True)
            for p in PRECISIONS:
                mine = moba_topk_cuda(q, k, block, TOP_K, centroid_precision=p)
                row[f"agreement_{p}"] = FM.selection_agreement(theirs, mine, q, k, block, TOP_K, True)
    torch.cuda.empty_cache()
    return row


def table(rows) -> str:
    def cell(r, a, b=None, nd=3):
        if b is None:
            return f"{r[a]:.{nd}f}" if a in r else "-"
        return f"{r[a]:.{nd}f} / {r[b]:.{nd}f} ({r[a] / r[b]:.3f}x)" if a in r and b in r else "-"

    lines = ["| N | B | top-k ms fp32 / input | forward ms fp32 / input | forward TFLOP/s fp32 / input | "
             "step ms fp32 / input | FlashMoBA step ms | x FlashMoBA fp32 / input |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fm = "-" if "flashmoba" not in r else \
            f"{r['flashmoba'] / r['step_fp32']:.2f} / {r['flashmoba'] / r['step_input']:.2f}"
        lines.append(f"| {r['N'] // K}K | {r['B']} | {cell(r, 'topk_fp32', 'topk_input')} | "
                     f"{cell(r, 'fwd_fp32', 'fwd_input')} | {r['tflops_fp32']:.1f} / {r['tflops_input']:.1f} | "
                     f"{cell(r, 'step_fp32', 'step_input') if r['B'] == 128 else '-'} | {cell(r, 'flashmoba', nd=2)} | "
                     f"{fm} |")
    for r in rows:
        for p in PRECISIONS:
            if f"agreement_{p}" in r:
                agreement = r[f"agreement_{p}"]
                lines.append(f"\nFlashMoBA's selections against mobalab's ({p}) at {r['N'] // K}K: {agreement}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", nargs="+", default=["64K", "512K", "64K-B32", "8K"])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rows = []
    for text in args.points:
        rows.append(run_point(*_point(text), args.rounds))
        print(rows[-1], flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
