"""mobalab.bench._interleaved: the alternating order of the A/B scripts' rounds and the dropped first rounds, the
build options added to one source's launches, the scripts' table output, a source tree's arm in a process."""

import types

import pytest
import torch

from mobalab.bench._interleaved import (
    build_options,
    extra_defines,
    interleaved_times,
    parse_build_option,
    print_point_rows,
    tree_arm_rows,
)
from mobalab.kernels._launch import Launch


def test_arms_alternate_and_the_first_rounds_are_dropped():
    calls = []

    def timer(arm):
        calls.append(arm)
        return float(len(calls))

    times = interleaved_times({"a": "a", "b": "b", "c": "c"}, rounds=4, timer=timer, drop=2)
    assert calls == ["a", "b", "c", "c", "b", "a", "a", "b", "c", "c", "b", "a"]
    assert times == {"a": [7.0, 12.0], "b": [8.0, 11.0], "c": [9.0, 10.0]}


def test_extra_defines_reach_only_that_source_and_are_undone():
    seen = []
    module = types.SimpleNamespace(launch=lambda plan: seen.append(plan))
    real = module.launch
    with extra_defines(module, "attention.cu", ("MOBA_X=2",)):
        module.launch(Launch("attention.cu", "moba_attn_merge_bf16_d128", (1,), (32,), (), 0, ("A=1",)))
        module.launch(Launch("pairs.cu", "moba_pairs_count", (1,), (32,), ()))
    assert [p.defines for p in seen] == [("A=1", "MOBA_X=2"), ()]
    assert module.launch is real  # restored
    with extra_defines(module, "attention.cu", ()):
        assert module.launch is real  # nothing to add: untouched


def test_build_options_reach_every_launching_module_for_their_source_only(monkeypatch):
    from mobalab.kernels import _cuda_attention, _cuda_backward, _cuda_routing, _pairs

    modules = (_cuda_attention, _cuda_backward, _cuda_routing, _pairs)
    seen = []
    for m in modules:
        monkeypatch.setattr(m, "launch", lambda plan, m=m: seen.append((m.__name__, plan.source, plan.defines)))
    reals = [m.launch for m in modules]
    with build_options(["attention_bwd_wgmma.cu:MOBA_BWD_WG_STEP_DESC=0", "topk_wgmma.cu:MOBA_TOPK_WG_STEP_DESC=0",
                        "attention_bwd_wgmma.cu:MOBA_BWD_WG_DQ_NEXT=2"]):
        for m in modules:
            m.launch(Launch("attention_bwd_wgmma.cu", "k", (1,), (32,), (), 0, ("A=1",)))
            m.launch(Launch("topk_wgmma.cu", "k", (1,), (32,), ()))
            m.launch(Launch("pairs.cu", "k", (1,), (32,), ()))
    assert [m.launch for m in modules] == reals  # restored
    for m in modules:
        assert [(s, d) for name, s, d in seen if name == m.__name__] == [
            ("attention_bwd_wgmma.cu", ("A=1", "MOBA_BWD_WG_STEP_DESC=0", "MOBA_BWD_WG_DQ_NEXT=2")),
            ("topk_wgmma.cu", ("MOBA_TOPK_WG_STEP_DESC=0",)), ("pairs.cu", ())]


@pytest.mark.parametrize("text", ["attention_bwd_wgmma.cu", "nosuch.cu:MOBA_X=1", "attention.cu:X=1",
                                  "attention.cu:MOBA_X=one", "attention.cu:MOBA_X"])
def test_a_malformed_build_option_is_refused_with_the_accepted_form(text):
    with pytest.raises(ValueError, match=r"SOURCE\.cu:MOBA_NAME=INTEGER with SOURCE\.cu one of .*topk_wgmma\.cu"):
        parse_build_option(text)
    with pytest.raises(ValueError), build_options([text]):
        pass


def test_the_benchmark_refuses_a_malformed_build_option(capsys):
    from mobalab.bench.attention import main

    with pytest.raises(SystemExit):
        main(["--build-option", "nosuch.cu:MOBA_X=1"])
    assert "SOURCE.cu:MOBA_NAME=INTEGER" in capsys.readouterr().err


def test_print_point_rows(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert print_point_rows("s", ["8K", "64K"], lambda p: [{"v": p}, {"v": p + "!"}], "| h |",
                            lambda p, r: f"| {p} {r['v']} |") == 0
    assert capsys.readouterr().out.splitlines() == ["| h |", "| 8K 8K |", "| 8K 8K! |", "| 64K 64K |", "| 64K 64K! |"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert print_point_rows("s", ["8K"], lambda p: [], "| h |", str) == 2
    assert "s: needs a CUDA GPU" in capsys.readouterr().err


def test_time_arms_warms_up_each_arm_then_takes_medians(monkeypatch):
    from mobalab.bench import _interleaved as I

    calls = []
    clock = iter(range(1, 100))
    monkeypatch.setattr(I, "idle_gpu_ms", lambda fn: (fn(), float(next(clock)))[1])
    results, medians = I.time_arms(lambda arm: calls.append(arm) or arm.upper(), ["a", "b"], rounds=4, drop=2)
    assert results == {"a": "A", "b": "B"}
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]  # warm-ups, then alternating rounds
    assert medians == {"a": 6.5, "b": 6.5}  # rounds 3 and 4 kept: a timed 5 and 8, b 6 and 7


def test_tree_arm_rows_runs_the_child_on_the_other_tree(tmp_path):
    """The child sees ``src`` as its path and ``--child`` with the arguments; its JSON lines come back, other
    output is skipped; a failing child raises with its stderr."""
    script = tmp_path / "s.py"
    script.write_text("import json, os, sys\n"
                      "print('progress')\n"
                      "print(json.dumps({'path': os.environ['PYTHONPATH'], 'argv': sys.argv[1:]}))\n"
                      "sys.exit(3 if '--fail' in sys.argv else 0)\n")
    assert tree_arm_rows(script, tmp_path / "src", ["--reps", 5]) == [
        {"path": str(tmp_path / "src"), "argv": ["--child", "--reps", "5"]}]
    with pytest.raises(RuntimeError, match="s.py: the arm of"):
        tree_arm_rows(script, tmp_path / "src", ["--fail"])
