"""Where a context-parallel forward + backward spends its GPU time: torch.profiler over one call per rank.

    torchrun --nproc-per-node 2 scripts/profile_cp.py --length 2M --layout zigzag --out DIR
    torchrun --nproc-per-node 1 scripts/profile_cp.py --length 2M --path single-device --out DIR

Batch 1, 16 heads, d 128, B 128, k 8, causal, bf16 (the scaling benchmark's configuration); one warm-up call,
then one profiled forward + backward. Rank 0 writes the kernel table (CUDA time per kernel name, summed) to
DIR/profile_<path>_<layout>_<N>.txt and prints its first rows; every rank writes its timeline as a Chrome
trace, DIR/trace_<path>_<layout>_<N>_rank<r>.json.
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from mobalab.distributed import context_parallel_moba_attention
from mobalab.distributed._device import use_device
from mobalab.distributed.bench import _parse_lengths
from mobalab.kernels import moba_attention


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--length", default="2M")
    p.add_argument("--layout", default="zigzag")
    p.add_argument("--path", choices=("cp", "single-device"), default="cp")
    p.add_argument("--rows", type=int, default=40)
    p.add_argument("--out", default="profile_cp")
    args = p.parse_args()
    rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", rank)
    use_device(rank)
    dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=300), device_id=device)
    world = dist.get_world_size()
    n = _parse_lengths(args.length)[0]
    shard = n // world
    g = torch.Generator(device=device).manual_seed(rank)
    q, k, v, dout = (torch.randn(1, shard, 16, 128, generator=g, device=device, dtype=torch.bfloat16)
                     for _ in range(4))
    leaves = [x.requires_grad_() for x in (q, k, v)]

    def call():
        if args.path == "single-device":
            out = moba_attention(*leaves, 128, 8, True)
        else:
            out = context_parallel_moba_attention(*leaves, 128, 8, True, layout=args.layout)
        torch.autograd.grad(out, leaves, dout)

    call()
    torch.cuda.synchronize(device)
    dist.barrier()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize(device)
    os.makedirs(args.out, exist_ok=True)
    # every rank's timeline (chrome://tracing or Perfetto): gaps, overlap of NCCL with compute
    prof.export_chrome_trace(os.path.join(args.out, f"trace_{args.path}_{args.layout}_{n}_rank{rank}.json"))
    if rank == 0:
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=70)
        name = os.path.join(args.out, f"profile_{args.path}_{args.layout}_{n}.txt")
        with open(name, "w") as f:
            f.write(table)
        print(f"== {args.path} {args.layout} N {n} world {world}")
        print(table)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
