"""scripts/router_certificate_sim.py on the CPU: its error bound holds, fp16 centroids tighten it, and more list
entries leave fewer rows undecided."""

import torch

SCRIPT_NAME = "router_certificate_sim"  # the conftest's `script` fixture loads it


def _rows(n_blocks=256, rows=256, d=128, bs=128, seed=3):
    gen = torch.Generator().manual_seed(seed)
    cent = torch.randn((n_blocks, bs, d), generator=gen).mean(1)
    q = torch.randn((rows, d), generator=gen).to(torch.bfloat16).float()
    own = torch.randint(8, n_blocks, (rows,), generator=gen)
    return q, cent, own


def test_bound_holds_and_fp16_tightens_it(script):
    q, cent, own = _rows()
    r = {name: script.certificate(q, cent, own, 7, t, range(5), (0, 1))
         for name, t in script.TYPES.items()}
    for res in r.values():
        assert 0.0 < res["worst_error_over_bound"] <= 1.0
        assert all(a >= b for a, b in zip(res["undecided"][:-1], res["undecided"][1:], strict=True))
        assert res["offers"][1] >= res["offers"][0]
    # 11 against 8 significant bits: the bound ~8x tighter, fewer rows undecided with the list of k-1
    assert r["fp16"]["bound_over_spread"] < r["bf16"]["bound_over_spread"] / 4
    assert r["fp16"]["undecided"][0] < r["bf16"]["undecided"][0]


def test_bound_covers_queries_outside_fp16_range(script):
    q, cent, own = _rows(n_blocks=64, rows=64)
    q[:4, :3] = 1e6  # rounds to inf in fp16: the kernels would clamp, here the rounding error must be counted
    q[4:8, :] *= 1e-9  # fp16 subnormals
    q = q.to(torch.bfloat16).float()
    res = script.certificate(q, cent, own, 7, torch.float16, range(2), (0,))
    assert res["worst_error_over_bound"] <= 1.0


def test_prints_one_line_per_size_and_type(script, capsys):
    assert script.main(["--blocks", "64", "--rows", "32"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and "64 blocks, bf16" in lines[1] and "64 blocks, fp16" in lines[2]
