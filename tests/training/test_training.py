import dataclasses

import pytest
import torch

from mobalab.training import (
    H200_ASSUMPTIONS,
    ModelConfig,
    RecallTask,
    TrainConfig,
    evaluate,
    load_checkpoint,
    save_checkpoint,
    train,
    training_cost,
)

TASK = RecallTask(seq_len=64, n_pairs=4, n_queries=4, n_keys=8, n_values=4, n_filler=8)
CFG = ModelConfig(d_model=32, n_layers=1, n_heads=2, head_dim=16, attention="moba", block_size=16, top_k=2,
                  key_conv=3)
TC = TrainConfig(steps=4, batch_size=2, device="cpu", log_every=1, seed=7)


def test_deterministic_and_seeded():
    a, b = train(CFG, TASK, TC), train(CFG, TASK, TC)
    c = train(CFG, TASK, dataclasses.replace(TC, seed=8))
    assert a.history["loss"].tolist() == b.history["loss"].tolist()
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert a.history["loss"].tolist() != c.history["loss"].tolist()
    # the kconv weights moved away from their zero start
    assert float(a.model.layers[0].key_conv.weight.detach().abs().sum()) > 0


def test_same_seed_same_start_across_variants():
    # paired comparisons: dense, MoBA and kconv models of one seed start from the same weights
    from mobalab.training._training import build_model

    m1 = build_model(CFG, TASK, 3)
    m2 = build_model(dataclasses.replace(CFG, attention="dense", key_conv=0), TASK, 3)
    shared = m2.state_dict()
    for name, p in m1.state_dict().items():
        if name in shared:
            assert torch.equal(p, shared[name]), name


def test_checkpoint_roundtrip(tmp_path):
    run = train(CFG, TASK, TC)
    path = save_checkpoint(run, tmp_path / "m.pt")
    back = load_checkpoint(path)
    assert back.model_config == CFG and back.task == TASK
    tokens = torch.randint(0, TASK.n_filler, (2, 64))
    qpos = torch.tensor([[60, 61, 62, 63]] * 2)
    torch.testing.assert_close(back.model(tokens, qpos), run.model(tokens, qpos))
    df = evaluate(back, sequences=2, batch_size=2)
    assert len(df) == CFG.n_layers * CFG.n_heads and df["answers"].iloc[0] == 8


def test_evaluate_dense_needs_routes():
    run = train(dataclasses.replace(CFG, attention="dense"), TASK, TC)
    with pytest.raises(ValueError, match="routes"):
        evaluate(run, sequences=2)
    for bad in [(16, 2), [], [(16.5, 2)], [(16, 0)], [(16, 2, 1)]]:  # a lone pair, nothing, not integers >= 1
        with pytest.raises(ValueError, match=r"routes must be a non-empty sequence of \(block_size, top_k\)"):
            evaluate(run, sequences=2, routes=bad)
    df = evaluate(run, sequences=2, routes=[(16, 2), (32, 1)])
    assert set(zip(df["block_size"], df["top_k"], strict=True)) == {(16, 2), (32, 1)}
    assert not df["routed"].any()


def test_curriculum_stages_keep_tokens_per_step():
    task = RecallTask(seq_len=128, n_pairs=4, n_queries=4, n_keys=8, n_values=4, n_filler=8)
    tc = dataclasses.replace(TC, steps=6, curriculum=[(32, 2), (64, 2)])
    assert tc.curriculum == ((32, 2), (64, 2))
    run = train(CFG, task, tc)
    assert run.history["seq_len"].tolist() == [32, 32, 64, 64, 128, 128]
    # the batches behind the stages: 4x and 2x as many sequences as at the full length
    cost = training_cost(CFG, task, tc)
    full = training_cost(CFG, task, dataclasses.replace(tc, curriculum=()))
    assert cost["flops_linear"] == full["flops_linear"]  # per step, same tokens
    assert cost["flops_total"] < full["flops_total"]  # shorter sequences: less attention
    with pytest.raises(ValueError, match="<= the task's seq_len"):
        train(CFG, task, dataclasses.replace(tc, curriculum=[(256, 2)]))
    with pytest.raises(ValueError, match="<= the task's seq_len"):  # not a stage of zero sequences, costing nothing
        training_cost(CFG, task, dataclasses.replace(tc, curriculum=[(256, 2)]))
    with pytest.raises(ValueError, match="too short"):
        train(CFG, task, dataclasses.replace(tc, curriculum=[(6, 2)]))


def test_train_config_validation():
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=0.0)
    with pytest.raises(ValueError, match="fewer than"):
        TrainConfig(steps=10, curriculum=[(64, 10)])
    with pytest.raises(ValueError, match="pairs"):
        TrainConfig(curriculum=[64])
    # no silent truncation of a stage, no bool as a rate
    with pytest.raises(ValueError, match="pairs of integers"):
        TrainConfig(steps=10, curriculum=[(32.7, 2)])
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=True)
    with pytest.raises(ValueError, match="device"):
        train(CFG, TASK, dataclasses.replace(TC, device="tpu"))


def test_cost_counts_flops():
    task = RecallTask(seq_len=4096)
    tc = TrainConfig(steps=1, batch_size=1)
    dense = training_cost(ModelConfig(attention="dense"), task, tc)
    moba = training_cost(ModelConfig(attention="moba", block_size=128, top_k=4), task, tc)
    # dense causal attention: 3.5 x 4 H D L Σ(t+1) for batch 1
    assert dense["flops_attention"] == pytest.approx(3.5 * 4 * 256 * 2 * 4096 * 4097 / 2)
    # MoBA at k·B = 512 attends about 3.5 blocks per query: ~4.5x fewer keys than dense at 4K
    assert 4.0 < dense["flops_attention"] / moba["flops_attention"] < 5.0
    assert dense["flops_linear"] == moba["flops_linear"] == pytest.approx(3 * 2 * 4096 * 2 * 786432)


def _step_flops(mc, n, batch, moba):
    """The module's per-step FLOPs with a_t counted key by key from MoBA's causal rule (own block up to t,
    k - 1 of the complete past blocks) rather than summed per block."""
    width, n_blocks = mc.n_heads * mc.head_dim, -(-n // mc.block_size)
    keys = 0
    for t in range(n):
        own = t // mc.block_size
        past = set(range(own)[-(mc.top_k - 1):]) if moba and mc.top_k > 1 else set()
        keys += sum(1 for s in range(t + 1) if not moba or s // mc.block_size == own or s // mc.block_size in past)
    per_token = 4 * width * mc.d_model + 2 * mc.mlp_ratio * mc.d_model**2
    routing = 3 * 2 * width * mc.n_layers * batch * n * n_blocks / 2 if moba else 0.0
    return 3 * 2 * batch * n * mc.n_layers * per_token, 3.5 * 4 * width * mc.n_layers * batch * keys, routing


def test_cost_counts_every_attended_key_and_every_stage():
    # a partial last block (200 = 12·16 + 8) and a stage at a quarter of the length with 4x the sequences
    mc = ModelConfig(d_model=16, n_layers=2, n_heads=2, head_dim=8, attention="moba", block_size=16, top_k=3)
    task = RecallTask(seq_len=200, n_pairs=4, n_queries=4, n_keys=8, n_values=4, n_filler=8)
    tc = TrainConfig(steps=5, batch_size=3, curriculum=[(50, 2)])
    cost = training_cost(mc, task, tc)
    lin, attn, routing = _step_flops(mc, 200, 3, moba=True)
    assert (cost["flops_linear"], cost["flops_attention"], cost["flops_routing"]) == pytest.approx(
        (lin, attn, routing), rel=1e-12
    )
    stage = _step_flops(mc, 50, 3 * 4, moba=True)
    assert cost["flops_total"] == pytest.approx(3 * (lin + attn + routing) + 2 * sum(stage), rel=1e-12)
    dense = training_cost(dataclasses.replace(mc, attention="dense"), task, dataclasses.replace(tc, curriculum=()))
    assert dense["flops_attention"] == pytest.approx(_step_flops(mc, 200, 3, moba=False)[1], rel=1e-12)


def test_cost_of_a_stage_whose_top_k_covers_every_block_is_dense():
    # the model runs such a stage as dense attention (SDPA), and the estimate costs it so
    task = RecallTask(seq_len=4096)
    mc = ModelConfig(attention="moba", block_size=32, top_k=16)
    short = RecallTask(seq_len=512)
    tc = TrainConfig(steps=1, batch_size=1)
    assert training_cost(mc, short, tc)["flops_routing"] == 0
    assert training_cost(mc, short, tc)["seconds"] == training_cost(ModelConfig(), short, tc)["seconds"]
    assert training_cost(mc, task, tc)["flops_routing"] > 0


def test_cost_checks_its_inputs():
    tc = TrainConfig(steps=2, batch_size=1)
    with pytest.raises(TypeError, match="model_config must be a ModelConfig, got str"):
        training_cost("moba", TASK, tc)
    with pytest.raises(TypeError, match="train_config must be a TrainConfig, got NoneType"):
        training_cost(CFG, TASK, None)
    with pytest.raises(ValueError, match=r"assumptions lack \['step_overhead_s'\]"):
        training_cost(CFG, TASK, tc, {k: v for k, v in H200_ASSUMPTIONS.items() if k != "step_overhead_s"})
    with pytest.raises(ValueError, match=r"assumptions\['linear_flops_per_s'\] must be a finite number > 0, got 0"):
        training_cost(CFG, TASK, tc, {**H200_ASSUMPTIONS, "linear_flops_per_s": 0})
    # a stage train() refuses is not costed either
    with pytest.raises(ValueError, match="curriculum stage seq_len 6 is too short"):
        training_cost(CFG, TASK, dataclasses.replace(tc, curriculum=[(6, 1)]))


def test_evaluation_seed_is_checked():
    run = train(CFG, TASK, dataclasses.replace(TC, steps=1))
    # -1 would be drawn as 2**64 - 1 and 1.5 as 1: another seed's sequences
    for seed in (-1, 1.5, "0", 2**64):
        with pytest.raises(ValueError, match=f"seed must be an integer from 0 to 2\\*\\*63 - 1, got {seed!r}"):
            evaluate(run, sequences=2, seed=seed)
