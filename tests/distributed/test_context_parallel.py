"""Context-parallel MoBA on gloo groups of 2, 3 and 4 CPU processes equals single-process MoBA (forward and grads).

One world of four processes runs every case (spawning processes is the expensive part): the two-rank cases
on the group of ranks 0 and 1, the three-rank cases on ranks 0-2, the four-rank cases on the default group;
each case is then its own test.
Cases: shard boundaries that cut a block, unequal and tiny shards (a block spread over three ranks), GQA,
causal and non-causal, top_k >= number of blocks, the zigzag layout, batch > 1, softmax_scale, a gradient
through the returned lse, and the CUDA-kernel decomposition (head / whole-block body / tail, padding, the
kernel router's cut and merge) with the kernels' work done by the reference.
"""

import csv
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _cases  # noqa: E402
import _world  # noqa: E402

TOLERANCE = 1e-10  # float64: anything above rounding is a bug
NAMES = {w: [n for n, c in _cases.CASES.items() if len(c.lengths) == w] for w in (2, 3, 4)}


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory):
    return tmp_path_factory.mktemp("cp_bench")


@pytest.fixture(scope="module")
def results(bench_out):
    payload = dict(pair=NAMES[2], three=NAMES[3], all=NAMES[4], bench_out=str(bench_out))
    return _world.run_world(4, "_cases", "run_world_tests", payload, timeout=300)


@pytest.mark.parametrize("name", [n for w in (2, 3, 4) for n in NAMES[w]])
def test_equals_single_process(results, name):
    world = len(_cases.CASES[name].lengths)
    for rank, per_rank in enumerate(results[:world]):
        got = per_rank["cases"][name]
        assert got["routing_equal"], f"rank {rank}: routing differs from single-process routing"
        for what in ("out", "lse", "dq", "dk", "dv"):
            assert got[what] <= TOLERANCE * max(1.0, got["scale"]), f"rank {rank}: {what} differs by {got[what]}"


def test_ranks_that_disagree_all_raise(results):
    for per_rank in results:
        message = per_rank["disagree"]
        assert "ranks disagree on top_k" in message and "[2, 3, 2, 2]" in message, message


def test_a_rank_that_rejects_its_arguments_makes_every_rank_raise(results):
    for rank, per_rank in enumerate(results):
        message = per_rank["one_rejects"]
        if rank == 2:
            assert "seqlen differs, q has 8 and k has 5" in message, message
        else:
            assert "rank 2 of the group (of 4) rejected its arguments" in message, message


def test_a_rank_whose_tensors_cannot_carry_its_flag_still_makes_every_rank_raise(results):
    """A non-tensor q, or tensors with no data, on one rank: its flag travels on a device the backend serves."""
    for rank, per_rank in enumerate(results):
        not_a_tensor, meta = per_rank["no_tensor"]
        if rank == 3:
            assert "q must be a torch.Tensor, got numpy.ndarray" in not_a_tensor, not_a_tensor
            assert "q is a meta tensor" in meta, meta
        else:
            for message in (not_a_tensor, meta):
                assert "rank 3 of the group (of 4) rejected its arguments" in message, message


def test_ranks_that_disagree_on_recording_a_graph_all_raise(results):
    for per_rank in results:
        message = per_rank["no_graph"]
        assert "ranks disagree on requires_grad" in message and "[True, False, True, True]" in message, message
        assert "record a graph for backward" in message, message


def test_a_second_derivative_raises_and_first_derivatives_stay(results):
    for per_rank in results:
        got = per_rank["second_derivative"]
        assert got["same_first"] and got["graph"] and got["gw"], got
        assert "context_parallel_moba_attention: MoBA attention is differentiable once" in got["error"], got


def test_benchmark_checks_times_and_writes(results, bench_out):
    assert [r["bench_status"] for r in results] == [0, 0, 0, 0]
    assert [r["single_device_in_four"] for r in results] == [2, 2, 2, 2]  # the one-device path refuses 4 ranks
    assert [r["three_tokens_in_four"] for r in results] == [2, 2, 2, 2]  # a length shorter than the world
    with open(bench_out / "cp_check.csv") as f:
        check = list(csv.DictReader(f))
    assert [row["passed"] for row in check] == ["True"] * 4
    assert all(float(row["routing_agreement"]) == 1.0 for row in check)
    with open(bench_out / "cp_bench.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["seq_len"]), int(r["rank"]), r["mode"]) for r in rows] == [
        (n, rank, "fwd+bwd") for n in (256, 512) for rank in range(4)]
    assert all(float(r["fwdbwd_ms"]) > 0 and float(r["useful_tflops"]) > 0 and float(r["hop_GBps"]) > 0
               for r in rows)
    table = (bench_out / "cp_bench_table.md").read_text()
    assert "| 512 | 4 | 3 | fwd+bwd |" in table
    env = json.loads((bench_out / "cp_bench_env.json").read_text())
    assert env["world"] == 4 and env["backend"] == "gloo" and "git_commit" in env


def test_benchmark_single_device_path(tmp_path):
    """``--path single-device`` (one process): the one-GPU baseline without the ring, marked in the env file."""
    out = tmp_path / "plain"
    assert _world.run_world(1, "_cases", "single_device_bench", dict(bench_out=str(out)), timeout=120) == [
        {"status": 0}]
    with open(out / "cp_bench.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["seq_len"]), r["mode"]) for r in rows] == [(256, "fwd+bwd")] and float(rows[0]["fwdbwd_ms"]) > 0
    assert json.loads((out / "cp_bench_env.json").read_text())["path"] == "single-device"


def test_input_centroid_precision_routes_the_whole_sequence():
    """centroid_precision "input" over two ranks (gloo): single-process routing in that precision, attention given
    it (bf16 outputs within a rounding), and a rank that asks for another precision makes every rank raise."""
    for r in _world.run_world(2, "_cases", "input_precision_case", timeout=120):
        assert r["routing_equal"] and r["differs_from_fp32"]
        assert r["out"] <= 2.0**-7
        assert "centroid_precision" in r["disagree"], r["disagree"]
