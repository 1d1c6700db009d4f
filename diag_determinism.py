import math, torch
from mobalab.kernels import MobaKVCache, moba_decode
from mobalab.kernels import _cuda_decode_split as S
from mobalab.kernels._cuda_decode import run, _sm_count
dev = "cuda"
def rand(shape, gen): return torch.randn(shape, generator=gen, device=dev, dtype=torch.float32).bfloat16()
gen = torch.Generator(device=dev).manual_seed(5)
cache = MobaKVCache(4, 8, 128, 128, 9000, dtype=torch.bfloat16, device=dev)
k, v = rand((4, 8192, 8, 128), gen), rand((4, 8192, 8, 128), gen)
cache.prefill(k, v, lengths=[8192, 5000, 7777, 129])
cache.append(rand((4, 1, 8, 128), gen), rand((4, 1, 8, 128), gen))
q = rand((4, 1, 32, 128), gen)
for wi in (False, True):
    outs = []
    for rep in range(6):
        plan, bufs, launches = S.split_launches(q, cache, 8, 1 / math.sqrt(128), sm_count=_sm_count(0), warp_items=wi)
        for x in launches: run(x, 0)
        torch.cuda.synchronize()
        outs.append((bufs["out"].clone(), bufs["lse"].clone()))
    diff = [int((o != outs[0][0]).sum()) + int((l != outs[0][1]).sum()) for o, l in outs[1:]]
    print("warp_items", wi, "cpg", plan.cpg, "mismatching elements vs first run:", diff, flush=True)
# the set of selected blocks: slot order run to run
tabs = []
for rep in range(6):
    plan, bufs, launches = S.split_launches(q, cache, 8, 1 / math.sqrt(128), sm_count=_sm_count(0))
    for x in launches[:-1]: run(x, 0)
    torch.cuda.synchronize()
    work = cache._workspace_counters(plan.n_counters + plan.n_table)
    tab = work[plan.n_counters:plan.n_counters + plan.n_table]
    tabs.append(tab.clone()); tab.zero_()
print("table slot orders differing from the first:", [int((t != tabs[0]).sum()) for t in tabs[1:]],
      "same sets:", all(torch.equal(t.view(32, -1).sort(1).values, tabs[0].view(32, -1).sort(1).values) for t in tabs))
