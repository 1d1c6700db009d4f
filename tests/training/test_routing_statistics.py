"""routing_statistics on hand-built queries and keys whose statistics are known exactly.

Keys are N(0, I/d) noise; query j is a unit vector q_j; its needle key is mu·q_j + noise and the m - 1 keys
right after the needle are mu_c·q_j + noise. So for every query: q·k_noise ~ N(0, 1/d), q·k_needle ~
N(mu, 1/d), the companions N(mu_c, 1/d): exactly the paper's Gaussian model with sigma = 1/sqrt(d),
independent tokens, and a companion at offset delta lands in the needle's block with probability
(B - delta)/B (the needle is uniform in its block).
"""

import math

import numpy as np
import pytest
import torch

from mobalab import snr
from mobalab.training import STAT_COLUMNS, routing_statistics

D, N, B, TOP_K, MU, MU_C, M = 64, 2048, 32, 4, 0.55, 0.45, 3


def _planted(batch=64, n_q=8, seed=0, mu=MU, mu_c=MU_C, m=M):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(batch, N, 1, D, generator=g, dtype=torch.float64) / math.sqrt(D)
    q = torch.randn(batch, N, 1, D, generator=g, dtype=torch.float64)
    q = q / q.norm(dim=-1, keepdim=True)
    qpos = torch.arange(N - n_q, N).expand(batch, n_q).contiguous()
    # distinct needle blocks per row (so companions never overlap), needles uniform in their block,
    # all before the query block
    blocks = torch.rand(batch, N // B - 1, generator=g).argsort(dim=1)[:, :n_q]
    npos = blocks * B + torch.randint(0, B, (batch, n_q), generator=g)
    rows = torch.arange(batch)[:, None]
    qv = q[rows, qpos, 0]  # (batch, n_q, D)
    k[rows, npos, 0] += mu * qv
    for delta in range(1, m):
        pos = (npos + delta).clamp(max=N - n_q - 1)
        k[rows, pos, 0] += mu_c * qv
    return q, k, qpos, npos


@pytest.fixture(scope="module")
def row():
    q, k, qpos, npos = _planted()
    df = routing_statistics(q, k, qpos, npos, B, TOP_K)
    assert list(df.columns) == list(STAT_COLUMNS) and len(df) == 1
    return df.iloc[0]


def test_token_statistics(row):
    se = 1 / math.sqrt(D) / math.sqrt(row["valid_queries"])
    assert row["mu_signal"] == pytest.approx(MU, abs=4 * se)
    assert row["mu_noise"] == pytest.approx(0.0, abs=0.01)
    assert row["delta_mu"] == pytest.approx(MU, abs=4 * se)
    assert row["sigma"] == pytest.approx(1 / math.sqrt(D), rel=0.02)


def test_cluster_statistics(row):
    inside = sum((B - d) / B for d in range(1, M))  # expected companions inside the needle's block
    want = MU + MU_C * inside
    # a block's excess sums B noise terms of variance 1/d: standard error sqrt(B/d/queries)
    se = math.sqrt(B / D / row["valid_queries"])
    assert row["delta_mu_eff"] == pytest.approx(want, abs=4 * se)
    # the identity the paper writes holds by construction of mu_cluster
    assert row["delta_mu"] + (row["m"] - 1) * (row["mu_cluster"] - row["mu_noise"]) == pytest.approx(
        row["delta_mu_eff"], rel=1e-9)
    # participation ratio of (MU, MU_C·31/32, MU_C·30/32): close to M = 3 tokens
    a = np.array([MU] + [MU_C * (B - d) / B for d in range(1, M)])
    assert row["m"] == pytest.approx(a.sum() ** 2 / (a**2).sum(), abs=0.15)
    assert row["mu_cluster"] == pytest.approx(MU_C * inside / (M - 1), abs=4 * se / (M - 1) + 0.02)
    # independent tokens: block-score variance is sigma^2 / B
    assert row["block_var_ratio"] == pytest.approx(1.0, abs=0.06)


def test_predictions_match_observed_recall(row):
    want_snr = row["delta_mu_eff"] / (row["sigma"] * math.sqrt(2 * B))
    assert row["snr_paper"] == pytest.approx(want_snr, rel=1e-9)
    # cosines of N(0, I/d) keys with a unit query also have standard deviation ~1/sqrt(d)
    assert row["cos_sigma_sqrt_d"] == pytest.approx(1.0, abs=0.05)
    assert 0.15 < row["recall"] < 0.95  # a regime where the test has power
    # the data follow the paper's Gaussian model exactly, so both predictions sit inside the Wilson interval
    assert abs(row["paper_units"]) < 1.5
    assert abs(row["block_units"]) < 1.5
    # the causal prediction at the true parameters, averaged over the same positions
    assert row["pred_paper"] == pytest.approx(
        float(snr.causal_hit_probability(want_snr, N, B, TOP_K, query_pos=N - 1, needle_pos=0)), abs=0.03)
    assert row["recall_low"] <= row["recall"] <= row["recall_high"]


def test_strong_needle_is_always_routed_and_attended():
    q, k, qpos, npos = _planted(batch=8, mu=4.0, mu_c=0.0, m=1, seed=2)
    r = routing_statistics(q, k, qpos, npos, B, TOP_K, softmax_scale=8.0).iloc[0]
    assert r["recall"] == 1.0 and r["pred_paper"] > 0.999
    assert r["m"] == pytest.approx(1.0) and math.isnan(r["mu_cluster"])
    assert r["needle_mass"] > 0.5


def test_needle_in_own_block_counts_as_hit_and_is_excluded_from_statistics():
    q, k, qpos, npos = _planted(batch=4, n_q=2, seed=3)
    npos = npos.clone()
    npos[:, 0] = N - 2 * B + 3  # not in the query's block: a past block
    npos[:, 1] = N - 5  # the queries' own (last) block
    df = routing_statistics(q, k, qpos, npos, B, TOP_K)
    assert int(df["valid_queries"].iloc[0]) == 4
    assert int(df["recall_trials"].iloc[0]) == 8


def test_inputs_are_checked():
    q, k, qpos, npos = _planted(batch=2, n_q=2, seed=4)
    with pytest.raises(ValueError, match="needle_pos <= query_pos"):
        routing_statistics(q, k, npos, qpos, B, TOP_K)
    with pytest.raises(ValueError, match="block_size"):
        routing_statistics(q, k, qpos, npos, 0, TOP_K)
    with pytest.raises(ValueError, match="4-D"):
        routing_statistics(q[0], k, qpos, npos, B, TOP_K)
    with pytest.raises(ValueError, match="query_pos must be an integer tensor.*torch.float32"):
        routing_statistics(q, k, qpos.float(), npos, B, TOP_K)


def test_rope_factor_measures_the_run_against_its_keys_at_the_anchor():
    """Pre-RoPE run keys equal, post-RoPE by the model's own rotation: the coherent reference is exactly the run
    rotated to the anchor, so the factor is sum(q.R_{p+i}u) / (r q.R_{p+a}u); without rotation it is 1."""
    from mobalab.training._transformer import rotary

    g = torch.Generator().manual_seed(3)
    b, n, d, r, bsz = 3, 512, 32, 6, 64
    k_pre = torch.randn(b, n, 1, d, generator=g) * 0.05
    u = torch.randn(d, generator=g)
    npos = torch.tensor([[70], [200], [333]])
    for i in range(b):
        k_pre[i, npos[i, 0]:npos[i, 0] + r, 0] = u
    q_pre = torch.randn(b, n, 1, d, generator=g) * 0.05
    qpos = torch.full((b, 1), n - 1)
    # the query matches the content at the run's third token (anchor a = 2, its score the run's highest)
    for i in range(b):
        at = torch.zeros(1, n, 1, d)
        at[0, int(npos[i, 0]) + 2, 0] = u
        q_pre[i, n - 1, 0] = rotary(at, 500.0)[0, int(npos[i, 0]) + 2, 0]
    q_post = q_pre.clone()  # the query is given post-RoPE directly
    k_post = rotary(k_pre, 500.0)
    row = routing_statistics(q_post, k_post, qpos, npos, bsz, 3, span=r, rope_base=500.0).iloc[0]
    mu_n = []
    seen = coh = 0.0
    for i in range(b):
        p, qv = int(npos[i, 0]), q_post[i, n - 1, 0]
        blocks = torch.arange(n) // bsz
        noise = (blocks < (n - 1) // bsz) & (blocks != p // bsz)
        mu = float((k_post[i, noise, 0] @ qv).mean())
        mu_n.append(mu)
        seen += float((k_post[i, p:p + r, 0] @ qv).sum()) - r * mu
        coh += r * (float(k_post[i, p + 2, 0] @ qv) - mu)
    assert row["rope_factor"] == pytest.approx(seen / coh, rel=1e-4)
    assert 0 < row["rope_factor"] < 1
    theta = 500.0 ** (-np.arange(d // 2) * 2.0 / d)
    g_th = np.mean([np.cos((i - 2) * theta).mean() for i in range(r)])
    assert row["rope_factor_theory"] == pytest.approx(g_th, rel=1e-6)
    # no RoPE (or a lone needle): no factor
    plain = routing_statistics(q_post, k_pre, qpos, npos, bsz, 3, span=r).iloc[0]
    assert np.isnan(plain["rope_factor"]) and np.isnan(plain["rope_factor_theory"])


def test_a_block_longer_than_the_sequence_measures_as_one_block_of_it():
    # Any B >= N is one block holding the whole sequence, so every measurement equals that of B = N, computed on
    # the N scores alone: padding them to B = 2**40 could not even be allocated.
    from mobalab.training._routing_statistics import measure_queries

    q, k, qpos, npos = _planted(batch=2, n_q=2, seed=5)
    want = measure_queries(q, k, qpos, npos, N, TOP_K)
    got = measure_queries(q, k, qpos, npos, 2**40, TOP_K)
    assert set(got) == set(want)
    for key in set(want) - {"meta"}:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert got["raw_profile"].shape[-1] == 2 * N - 1
    row = routing_statistics(q, k, qpos, npos, 2**40, TOP_K).iloc[0]
    assert row["recall"] == 1.0 and row["valid_queries"] == 0  # every needle in the queries' own block


def test_span_scale_and_base_are_checked():
    q, k, qpos, npos = _planted(batch=2, n_q=2, seed=6)
    for kwargs, match in ((dict(span=0), "span must be an integer >= 1, got 0"),
                          (dict(span=2.5), "span must be an integer >= 1, got 2.5"),
                          (dict(span=2, rope_base=0.0), "rope_base must be None or a finite number > 1, got 0.0"),
                          (dict(softmax_scale=float("nan")), "softmax_scale must be None or a finite number > 0"),
                          (dict(softmax_scale="a"), "softmax_scale must be None or a finite number > 0, got 'a'")):
        with pytest.raises(ValueError, match=match):
            routing_statistics(q, k, qpos, npos, B, TOP_K, **kwargs)
    # a run past the last position would be read as copies of the last key
    end = torch.full_like(npos, N - 3)
    with pytest.raises(ValueError, match=f"span 4 from needle_pos {N - 3} passes the end"):
        routing_statistics(q, k, torch.full_like(qpos, N - 1), end, B, TOP_K, span=4, rope_base=10000.0)
    with pytest.raises(ValueError, match="at least one query"):
        routing_statistics(q, k, qpos[:, :0], npos[:, :0], B, TOP_K)


def test_a_model_s_router_statistics_recomputed_by_hand():
    """Δμ, σ, Δμ_eff, the token-model prediction and the recall of a RecallTransformer's own q / k, recomputed
    from the definitions: block centroids, own block forced, top k - 1 of the complete past blocks."""
    from scipy import integrate
    from scipy import stats as sps

    from mobalab.training import ModelConfig, RecallTask, RecallTransformer, make_batch

    task = RecallTask(seq_len=96, n_pairs=4, n_queries=4, n_keys=8, n_values=4, n_filler=8, needle_len=2)
    bsz, top_k = 8, 3
    torch.manual_seed(0)
    model = RecallTransformer(ModelConfig(d_model=16, n_layers=1, n_heads=1, head_dim=8, attention="moba",
                                          block_size=bsz, top_k=top_k), task).eval()
    batch = make_batch(task, 4, torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, [(q, k)] = model(batch.tokens, batch.query_pos, capture=True)
    row = routing_statistics(q, k, batch.query_pos, batch.needle_pos, bsz, top_k).iloc[0]

    def hit_probability(snr_value, n, slots):  # the paper's Gaussian model, equal variances
        if slots >= n:
            return 1.0
        return integrate.quad(lambda z: sps.norm.pdf(z) * sps.binom.cdf(slots - 1, n - 1, sps.norm.sf(
            z + math.sqrt(2) * snr_value)), -12, 12)[0]

    dmu, var, eff, hits, tp, mass, blk_d, blk_var = [], [], [], [], [], [], [], []
    qd, kd = q.double().numpy(), k.double().numpy()
    for i in range(4):
        for j in range(4):
            t, p = int(batch.query_pos[i, j]), int(batch.needle_pos[i, j])
            c, cs = t // bsz, p // bsz
            qv = qd[i, t, 0]
            s = kd[i, :, 0] @ qv
            centroids = kd[i, :c * bsz, 0].reshape(c, bsz, -1).mean(1) @ qv
            hits.append(cs == c or cs in np.argsort(-centroids)[:top_k - 1])
            tp.append((t, p))
            w = np.exp((s[:t + 1] - s[:t + 1].max()) / math.sqrt(8))  # dense causal softmax, scale 1/sqrt(d)
            mass.append(w[p] / w.sum())
            if cs < c and c - 1 >= 2:
                noise = np.concatenate([s[b * bsz:(b + 1) * bsz] for b in range(c) if b != cs])
                dmu.append(s[p] - noise.mean())
                var.append(noise.var(ddof=1))
                eff.append((s[cs * bsz:(cs + 1) * bsz] - noise.mean()).sum())
                others = np.delete(centroids, cs)
                blk_d.append(centroids[cs] - others.mean())
                blk_var.append(others.var(ddof=1))
    sigma = math.sqrt(np.mean(var))
    snr_value = np.mean(eff) / (sigma * math.sqrt(2 * bsz))
    h = {c: hit_probability(snr_value, c, top_k - 1) for c in {t // bsz for t, _ in tp}}
    pred = np.mean([1.0 if p // bsz == t // bsz else h[t // bsz] for t, p in tp])
    assert row["valid_queries"] == len(dmu) >= 12
    assert row["delta_mu"] == pytest.approx(np.mean(dmu), rel=1e-5)
    assert row["sigma"] == pytest.approx(sigma, rel=1e-5)
    assert row["delta_mu_eff"] == pytest.approx(np.mean(eff), rel=1e-5)
    assert row["snr_paper"] == pytest.approx(snr_value, rel=1e-5)
    assert row["pred_paper"] == pytest.approx(pred, abs=1e-6)
    assert row["recall_hits"] == sum(hits)
    assert row["needle_mass"] == pytest.approx(np.mean(mass), rel=1e-5)
    var_d, v_n = np.var(blk_d, ddof=1), np.mean(blk_var)
    assert row["block_snr"] == pytest.approx(np.mean(blk_d) / math.sqrt(var_d + v_n), rel=1e-5)
    assert row["block_sd_ratio"] == pytest.approx(math.sqrt(var_d / v_n), rel=1e-5)
    assert row["block_var_ratio"] == pytest.approx(v_n / (sigma**2 / bsz), rel=1e-5)
