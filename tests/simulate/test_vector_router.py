"""Vector-level router: outcomes fixed by the rules, reproducibility, torch agrees with numpy, validation."""

import numpy as np
import pandas as pd
import pytest
import torch

from mobalab.simulate import KeyConv, averaging_weights, vector_level_router
from mobalab.simulate._vector_router import _batches, resolve_backend

SMALL = dict(head_dim=16, seq_len=256, block_size=16, top_k=3, mu_signal=0.4)


def two_proportion_z(a, b):
    p = (a.hits + b.hits) / (a.trials + b.trials)
    se = np.sqrt(p * (1 - p) * (1 / a.trials + 1 / b.trials))
    return float(((a.estimate - b.estimate) / se).iloc[0])


@pytest.mark.parametrize("device", ["cpu", "torch-cpu"])
def test_outcomes_fixed_by_the_rules(device):
    run = dict(trials=300, seed=1, device=device)
    # A whole block of exact cosine-1 keys: its centroid scores exactly 1, any other block less.
    full = dict(head_dim=16, seq_len=128, block_size=4, mu_signal=1.0, m=4, mu_cluster=1.0, planted="exact")
    assert vector_level_router(top_k=1, **full, **run).hits[0] == 300
    assert vector_level_router(top_k=1, causal=True, **full, **run).hits[0] > 0
    anti = dict(full, mu_signal=-1.0, mu_cluster=-1.0)
    assert vector_level_router(top_k=31, **anti, **run).hits[0] == 0
    # Causal k = 1 with the needle in a past block: never found; in the own block: always.
    assert vector_level_router(top_k=1, causal=True, query_pos=100, needle_pos=3, **full, **run).hits[0] == 0
    assert vector_level_router(top_k=1, causal=True, query_pos=102, needle_pos=100, **anti, **run).hits[0] == 300
    # Causal, k - 1 >= past blocks / query in block 0 / N <= k * B: everything is found.
    assert vector_level_router(top_k=5, causal=True, query_pos=15, **anti, **run).hits[0] == 300
    assert vector_level_router(top_k=2, causal=True, query_pos=3, **anti, **run).hits[0] == 300
    assert vector_level_router(**dict(SMALL, mu_signal=-1.0, top_k=16), causal=True, **run).hits[0] == 300
    # Non-causal k >= n.
    assert vector_level_router(**dict(SMALL, mu_signal=-1.0, top_k=16), **run).hits[0] == 300


def _brute_force_hit(q, keys, block_size, top_k, target, c):
    """Per-query MoBA rules with Python sorting (ties toward the higher index); keys already truncated."""
    n_tok = keys.shape[0]
    scores = [
        float(q @ keys[j * block_size : min((j + 1) * block_size, n_tok)].mean(0))
        for j in range(-(-n_tok // block_size))
    ]
    if c is None:
        chosen = sorted(range(len(scores)), key=lambda j: (scores[j], j), reverse=True)[:top_k]
    else:
        chosen = [c] + sorted(range(c), key=lambda j: (scores[j], j), reverse=True)[: top_k - 1]
    return target in chosen


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("device", ["cpu", "torch-cpu"])
def test_batches_route_like_brute_force(monkeypatch, causal, device):
    """Record what the router draws and decides per trial; redo each trial by brute force."""
    import mobalab.simulate._vector_router as vr

    seen = []

    def spy_scores(q, keys, block_size):
        seen.append({"q": np.asarray(q, dtype=np.float64), "keys": np.asarray(keys, dtype=np.float64)})
        return block_scores(q, keys, block_size)

    def spy_hit(scores, target, top_k, c):
        hit = block_hit(scores, target, top_k, c)
        seen[-1].update(target=np.asarray(target), c=None if c is None else np.asarray(c), hit=np.asarray(hit))
        return hit

    from mobalab.simulate._block_routing import block_hit, block_scores

    monkeypatch.setattr(vr, "block_scores", spy_scores)
    monkeypatch.setattr(vr, "block_hit", spy_hit)
    B, k, mu_s, mu_c = 4, 3, 0.7, 0.4
    kw = dict(m=3, mu_cluster=mu_c, planted="exact", causal=causal, trials=80, batch_size=9)
    # seq_len 51: a partial last block of 3 positions, just enough for the needle and its cluster.
    df = vr.vector_level_router(6, 51, B, k, mu_s, **kw, seed=4, device=device)
    checked = 0
    for batch in seen:
        assert batch["keys"].shape[0] <= 9
        for i in range(batch["keys"].shape[0]):
            q, keys, target = batch["q"][i], batch["keys"][i], int(batch["target"][i])
            c = None if batch["c"] is None else int(batch["c"][i])
            dots = keys @ q
            block = slice(target * B, (target + 1) * B)
            # The needle's block holds the needle (mu_s) and m - 1 = 2 clustered keys (mu_c), exactly.
            assert np.sum(np.isclose(dots[block], mu_s, atol=1e-5)) >= 1
            assert np.sum(np.isclose(dots[block], mu_c, atol=1e-5)) >= 2
            if c is not None:
                assert target < c and keys.shape[0] >= c * B
                keys = keys[: c * B]
            assert bool(batch["hit"][i]) == _brute_force_hit(q, keys, B, k, target, c)
            checked += 1
    assert checked == df.trials[0] - (df.hits[0] - sum(int(b["hit"].sum()) for b in seen))
    assert checked > 20


def test_anti_signal_causal_hits_only_own_block_and_short_past():
    """mu = -1 blocks always lose, so hits are exactly the own-block needles plus queries with c <= k-1."""
    df = vector_level_router(
        16, 128, 4, 2, -1.0, m=4, mu_cluster=-1.0, planted="exact", causal=True, trials=4000, seed=2
    )
    t = np.arange(128)
    c = t // 4
    own = (t % 4 + 1) / (t + 1)
    expected = np.mean(np.where(c <= 1, 1.0, own))
    from mobalab.stats import interval_units

    assert abs(interval_units(expected, df.hits[0], df.trials[0], 0.999)) <= 1


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("device", ["cpu", "torch-cpu"])
def test_reproducible_and_seed_sensitive(causal, device):
    kw = dict(SMALL, m=3, mu_cluster=0.2, causal=causal, trials=400, device=device)
    a = vector_level_router(**kw, seed=11)
    b = vector_level_router(**kw, seed=11)
    pd.testing.assert_frame_equal(a, b)
    results = {int(vector_level_router(**kw, seed=s).hits[0]) for s in range(12, 17)}
    assert len(results | {int(a.hits[0])}) > 1
    g = vector_level_router(**kw, seed=np.random.default_rng(0))
    assert g.seed[0] is None


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(causal=False),
        dict(causal=True),
        dict(causal=True, key_conv=KeyConv(averaging_weights(3), "residual_silu")),
        dict(causal=False, planted="exact", m=2, mu_cluster=0.3, seq_len=250),
    ],
    ids=["non-causal", "causal", "causal-kconv", "exact-partial-block"],
)
def test_torch_cpu_agrees_with_numpy(kwargs):
    kw = dict(SMALL, trials=3000)
    kw.update(kwargs)
    a = vector_level_router(**kw, seed=21, device="cpu")
    b = vector_level_router(**kw, seed=22, device="torch-cpu")
    assert a.backend[0] == "numpy" and b.backend[0] == "torch-cpu"
    assert abs(two_proportion_z(a, b)) < 4.0, (a.estimate[0], b.estimate[0])


def test_batch_size_does_not_bias():
    kw = dict(SMALL, causal=True, trials=3000)
    a = vector_level_router(**kw, seed=5)
    b = vector_level_router(**kw, seed=6, batch_size=7)
    assert b.batch_size[0] == 7
    assert abs(two_proportion_z(a, b)) < 4.0


def test_key_conv_is_applied_before_routing():
    base = dict(
        head_dim=16,
        seq_len=64,
        block_size=4,
        top_k=1,
        mu_signal=1.0,
        planted="exact",
        needle_pos=7,
        trials=1000,
    )
    plain = vector_level_router(**base, seed=1)
    # Scaling every key by 2 (exact in floating point) cannot change any ranking: bit-identical hits.
    scaled = vector_level_router(**base, seed=1, key_conv={"weights": np.array([2.0]), "form": "linear"})
    assert scaled.hits[0] == plain.hits[0]
    assert np.isnan(scaled.snr[0]) and np.isfinite(plain.snr[0])
    assert scaled.key_conv[0] == "linear(W=1,w=[2])" and plain.key_conv[0] == "none"
    # k'_t = k_{t-1} moves the needle from the last position of block 1 into block 2: block 1 loses it.
    shifted = vector_level_router(**base, seed=1, key_conv=KeyConv(np.array([0.0, 1.0]), "linear"))
    assert plain.estimate[0] > 0.4 and shifted.estimate[0] < 0.2, (plain.estimate[0], shifted.estimate[0])


def test_columns():
    df = vector_level_router(**SMALL, m=2, mu_cluster=0.1, trials=50, seed=0)
    expected = [
        "method",
        "backend",
        "causal",
        "snr",
        "sd_ratio",
        "n_blocks",
        "top_k",
        "head_dim",
        "seq_len",
        "block_size",
        "mu_signal",
        "m",
        "mu_cluster",
        "planted",
        "key_conv",
        "hits",
        "trials",
        "estimate",
        "ci_low",
        "ci_high",
        "seed",
    ]
    for col in expected:
        assert col in df.columns, col
    assert df.method[0] == "vector-level" and df.n_blocks[0] == 16 and df.seed[0] == 0


def test_batches_respect_budget_and_order():
    lengths = np.array([1, 1, 2, 2, 3, 8, 8])
    spans = _batches(lengths, 1, 6, None)
    assert spans[0][0] == 0 and spans[-1][1] == 7
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    for start, stop in spans:
        assert (stop - start) * lengths[stop - 1] <= 6 or stop - start == 1
    assert _batches(lengths, 1, 100, 2) == [(0, 2), (2, 4), (4, 6), (6, 7)]


def test_resolve_backend():
    assert resolve_backend("cpu") == ("numpy", None)
    assert resolve_backend(None) == ("numpy", None)
    assert resolve_backend("torch-cpu")[0] == "torch-cpu"
    assert resolve_backend(torch.device("cpu"))[0] == "torch-cpu"
    with pytest.raises(ValueError, match="device"):
        resolve_backend("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            resolve_backend("cuda")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(m=17), "do not fit in a block"),
        (dict(seq_len=250, m=11), "partial last block"),
        (dict(query_pos=3), "causal"),
        (dict(needle_pos=256), "needle_pos"),
        (dict(causal=True, query_pos=5, needle_pos=6), "after"),
        (dict(batch_size=0), "batch_size"),
        (dict(key_conv={"weights": np.ones((3, 8))}), "head dim"),
        (dict(planted="gauss"), "planted"),
        (dict(planted="exact", head_dim=1), "head_dim"),
        (dict(mu_signal=2.0), "mu_signal"),
        (dict(trials=0), "trials"),
        (dict(top_k=0), "top_k"),
        (dict(device="tpu"), "device"),
    ],
)
def test_validation(kwargs, match):
    args = dict(SMALL, trials=10, seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        vector_level_router(**args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs torch with CUDA")
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_agrees_with_numpy_and_reproduces(causal):
    kw = dict(SMALL, m=2, mu_cluster=0.2, causal=causal, trials=20_000)
    a = vector_level_router(**kw, seed=31, device="cpu")
    b = vector_level_router(**kw, seed=32, device="cuda")
    c = vector_level_router(**kw, seed=32, device="cuda")
    assert b.backend[0] == "torch-cuda"
    pd.testing.assert_frame_equal(b, c)
    assert abs(two_proportion_z(a, b)) < 4.0


def test_model_columns_follow_the_partial_last_block():
    """N % B != 0, non-causal: a needle in the last block of L keys is scored against a mean of L keys."""
    from mobalab.snr import generator_block_model, hit_probability
    from mobalab.stats import interval_units

    d, n_tok, B, k, mu = 16, 200, 16, 3, 0.3  # 13 blocks, the last one of L = 8 keys
    L = n_tok - 12 * B
    run = dict(head_dim=d, seq_len=n_tok, block_size=B, top_k=k, mu_signal=mu, seed=1)
    last = vector_level_router(**run, trials=4000, needle_pos=195).iloc[0]
    # Needle block of L keys (planted variance (1 - mu^2)/d, L - 1 noise keys), 12 noise blocks of B keys.
    var_s, var_n = ((1 - mu * mu) / d + (L - 1) / d) / L**2, 1 / (d * B)
    assert last.snr == pytest.approx(mu / L / np.sqrt(var_s + var_n), rel=1e-12)
    assert last.sd_ratio == pytest.approx(np.sqrt(var_s / var_n), rel=1e-12)
    theory = hit_probability(last.snr, last.n_blocks, k, sd_ratio=last.sd_ratio)
    assert abs(interval_units(theory, last.hits, last.trials, confidence=0.999)) <= 1, (last.estimate, theory)
    # A partial noise block (variance 1/(dL)) is no model of equal noise blocks: no columns to mislead.
    for needle_pos in (None, 5):
        row = vector_level_router(**run, trials=10, needle_pos=needle_pos).iloc[0]
        assert np.isnan(row.snr) and np.isnan(row.sd_ratio)
    # Causal routing never scores the partial block; whole blocks keep the generator's model.
    model = generator_block_model(d, B, mu)
    for extra in (dict(seq_len=n_tok, causal=True), dict(seq_len=12 * B)):
        row = vector_level_router(**dict(run, **extra), trials=10).iloc[0]
        assert (row.snr, row.sd_ratio) == (float(model.snr), float(model.sd_ratio))


def test_replays_the_documented_draws_through_the_moba_rules():
    """Redraw each trial from the seed (streams of spawn_generators, draws in the planted_needle order) and
    route it with Python sorting: the router's hit count is exact, partial last block included."""
    from mobalab.simulate import random_cluster_positions, spawn_generators

    d, n_tok, B, k, mu_s, m, mu_c, trials, batch = 8, 45, 8, 2, 0.5, 2, 0.4, 60, 16
    df = vector_level_router(d, n_tok, B, k, mu_s, m=m, mu_cluster=mu_c, trials=trials, seed=3, batch_size=batch)

    def unit(rng, shape):
        g = rng.standard_normal((*shape, d), dtype=np.float32)
        return g / np.sqrt(np.einsum("...i,...i->...", g, g))[..., None]

    pos_rng, vec_rng = spawn_generators(3, 2)
    needles = pos_rng.integers(0, n_tok, size=trials, dtype=np.int64)
    hits = 0
    for start in range(0, trials, batch):
        p = needles[start : start + batch]
        cpos = random_cluster_positions(pos_rng, p, B, n_tok, m - 1)
        q, keys = unit(vec_rng, (len(p),)), unit(vec_rng, (len(p), n_tok))
        keys[np.arange(len(p)), p] = mu_s * q + np.float32(np.sqrt(1 - mu_s**2)) * unit(vec_rng, (len(p),))
        keys[np.arange(len(p))[:, None], cpos] = mu_c * q[:, None] + np.float32(np.sqrt(1 - mu_c**2)) * unit(
            vec_rng, (len(p), m - 1)
        )
        hits += sum(_brute_force_hit(q[i], keys[i], B, k, int(p[i]) // B, None) for i in range(len(p)))
    assert df.hits[0] == hits
