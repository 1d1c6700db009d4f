"""scripts/bwd_step_ab.py on the CPU: its choices and refusals, and the switches it flips (the timing needs a
GPU)."""

import pytest

SCRIPT_NAME = "bwd_step_ab"  # the conftest's `script` fixture loads it


@pytest.fixture(scope="module")
def ab(script):
    return script


def test_arguments_are_checked_before_any_gpu_work(ab, capsys):
    for argv in (["--compare", "fast"], ["--compare", "lists", "--points", "3M"], []):
        with pytest.raises(SystemExit):
            ab.main(argv)
        capsys.readouterr()
    with pytest.raises(SystemExit):
        ab.main(["--compare", "order", "--rounds", "2"])
    assert "at least 3" in capsys.readouterr().err


def test_without_a_gpu_it_says_so(ab, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ab.main(["--compare", "lists", "--points", "8K"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_the_switches_turn_the_settings_off_and_back_on(ab):
    import mobalab.kernels._cuda_backward as G
    import mobalab.kernels.autograd as AG

    kept, ordered = AG._lists_numel, G.orders_longest_first
    try:
        lists, order = ab._switch("lists"), ab._switch("order")
        lists(False)
        order(False)
        assert AG._lists_numel(None, None, 128, 8, False) == 0
        assert not G.orders_longest_first("block", 100, 132)
        lists(True)
        order(True)
        assert AG._lists_numel is kept and G.orders_longest_first is ordered
    finally:
        AG._lists_numel, G.orders_longest_first = kept, ordered


def test_the_plan_tpc_and_sort_switches(ab):
    """``plan`` restores the previous chunk planner (a smaller last chunk, 512 MiB floor), ``tpc`` the forward's
    8 tiles per CTA with its build option, ``sort`` torch.argsort of the sizes; each switched back on restores
    the module as it was."""
    import torch

    import mobalab.kernels._cuda_attention as A
    import mobalab.kernels._cuda_backward as G
    from mobalab.kernels._launch import Launch

    planner, floor, launch, tpc, order = A._plan_chunks, A._MIN_BUDGET, A.launch, A.TILES_PER_UNIT, G.longest_first
    try:
        plan = ab._switch("plan")
        plan(False)
        budget = A.default_scratch_budget(2, 16384, 16, 16, 128)
        assert budget == 512 << 20
        assert [c.n_heads for c in A.plan_chunks(2, 16384, 16, 16, 128, 8, budget)] == [13, 3, 13, 3]
        plan(True)
        assert A._plan_chunks is planner and A._MIN_BUDGET == floor
        assert [c.n_heads for c in A.plan_chunks(2, 16384, 16, 16, 128, 8, floor)] == [16, 16]
        assert [c.n_heads for c in A.plan_chunks(1, 65536, 16, 16, 128, 8, floor)] == [4, 4, 4, 4]

        seen = []
        A.launch = seen.append  # the switch wraps whatever launch it finds
        tiles = ab._switch("tpc")
        tiles(True)
        assert A.TILES_PER_UNIT == 8 and A.rows_per_unit(128, 128) == 8 * A.ROWS
        A.launch(Launch(A.SOURCE, "moba_attn_res_bf16_d128_kt64", (1,), (128,), ()))
        A.launch(Launch("pairs.cu", "moba_pairs_count", (1,), (256,), ()))
        assert seen[0].defines == ("MOBA_TPC=8",) and seen[1].defines == ()
        tiles(False)
        assert A.launch == seen.append and A.TILES_PER_UNIT == tpc

        sort = ab._switch("sort")
        sort(False)
        assert G.longest_first(torch.tensor([0, 3, 3, 10], dtype=torch.int64), 3).tolist() == [2, 0, 1]
        sort(True)
        assert G.longest_first is order
    finally:
        A._plan_chunks, A._MIN_BUDGET, A.launch, A.TILES_PER_UNIT, G.longest_first = planner, floor, launch, tpc, order
