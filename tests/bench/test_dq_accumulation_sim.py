"""scripts/dq_accumulation_sim.py on the CPU: both dQ forms within the gradient criterion, the 16-bit sums closer
to the cast of the fp32 sum than torch's low precision is to the oracle, and the script's table."""

import torch

SCRIPT_NAME = "dq_accumulation_sim"  # the conftest's `script` fixture loads it


def test_both_forms_meet_the_criterion(script):
    g = torch.Generator().manual_seed(5)
    n, block, top_k = 320, 64, 3
    q, k, v, dout = (torch.randn(1, n, 2, 128, generator=g).to(torch.bfloat16) for _ in range(4))
    topk = script.moba_topk(q, k, block, top_k, causal=True)
    ref = script.G.oracle_grads(q, k, v, dout, topk, block, True)[0]
    low = script.G.lowp_grads(q, k, v, dout, topk, block, True)[0]
    cast, summed = script.dq_two_ways(q, k, v, dout, topk, block, g)
    e_low = (low - ref).abs().max().item()
    for form in (cast, summed):
        assert (form - ref).abs().max().item() <= 3 * e_low
    # the two forms lie closer to each other than plain torch lies to the oracle
    assert (summed - cast).abs().max().item() <= e_low
    assert not torch.equal(summed, cast)  # the forms do differ: the comparison above is not vacuous


def test_prints_a_table(script, capsys):
    assert script.main(["--quick", "--seeds", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| N | B | k |") and len(out) == 3 and out[2].startswith("| 384 | 64 | 3 | bfloat16 |")
