import pytest
import torch

from mobalab.training import RecallTask, make_batch

TASK = RecallTask(seq_len=300, n_pairs=12, n_queries=5, n_keys=20, n_values=7, n_filler=11)


def _batch(seed, task=TASK, size=6):
    return make_batch(task, size, torch.Generator().manual_seed(seed))


def test_deterministic_with_seed():
    a, b, c = _batch(3), _batch(3), _batch(4)
    for name in ("tokens", "query_pos", "needle_pos", "key", "answer"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.tokens, c.tokens)


def test_answer_recoverable_from_tokens():
    b = _batch(0)
    rows = torch.arange(b.tokens.shape[0])[:, None]
    t = TASK
    # the queries sit at the end, one per position, and carry the key they ask for
    assert torch.equal(b.query_pos, torch.arange(t.context_len, t.seq_len).expand(6, t.n_queries))
    assert torch.equal(b.tokens[rows, b.query_pos], t.query_id(b.key))
    # the needle the query points at holds that key and the answer
    assert torch.equal(b.tokens[rows, b.needle_pos], t.needle_id(b.key, b.answer))
    assert bool((b.needle_pos < t.context_len).all()) and bool((b.answer < t.n_values).all())
    # recover every answer by scanning the sequence: exactly one needle carries the queried key
    tok = b.tokens
    is_needle = (tok >= t.needle_offset) & (tok < t.query_offset)
    needle_key = (tok - t.needle_offset) // t.n_values
    for i in range(tok.shape[0]):
        assert int(is_needle[i].sum()) == t.n_pairs  # distinct positions: no needle overwrote another
        for j in range(t.n_queries):
            match = (is_needle[i] & (needle_key[i] == b.key[i, j])).nonzero().flatten()
            assert match.tolist() == [int(b.needle_pos[i, j])]
            assert int((tok[i, match] - t.needle_offset) % t.n_values) == int(b.answer[i, j])
        assert len(set(b.key[i].tolist())) == t.n_queries  # each needle asked at most once
    filler = ~is_needle & (tok < t.query_offset)
    assert bool((tok[filler] < t.n_filler).all())


def test_vocabulary_layout():
    assert TASK.vocab_size == 11 + 20 * 7 + 20
    assert TASK.needle_id(0, 0) == 11 and TASK.query_id(19) == TASK.vocab_size - 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_queries=13), "n_queries"),
    (dict(n_pairs=21), "n_pairs"),
    (dict(seq_len=10), "do not fit"),
    (dict(needle_len=25), "do not fit"),
    (dict(needle_len=0), "needle_len"),
    (dict(n_keys=0), "n_keys"),
])
def test_invalid_task(kwargs, match):
    base = dict(seq_len=300, n_pairs=12, n_queries=5, n_keys=20, n_values=7, n_filler=11)
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        RecallTask(**base)


def test_make_batch_validates():
    with pytest.raises(TypeError, match="generator"):
        make_batch(TASK, 2, None)
    with pytest.raises(ValueError, match="batch_size"):
        make_batch(TASK, 0, torch.Generator())


@pytest.mark.parametrize("r", [2, 5])
def test_needles_are_runs(r):
    import dataclasses

    t = dataclasses.replace(TASK, n_pairs=12, needle_len=r)
    # a tight fit (12 runs of 5 in 295 places) as well as a loose one
    b = make_batch(t, 40, torch.Generator().manual_seed(r))
    rows = torch.arange(40)[:, None]
    for j in range(r):  # every copy of the asked needle carries its key and value
        assert torch.equal(b.tokens[rows, b.needle_pos + j], t.needle_id(b.key, b.answer))
    tok = b.tokens
    is_needle = (tok >= t.needle_offset) & (tok < t.query_offset)
    # runs do not overlap: r·n_pairs needle tokens, all before the queries, in runs of exactly r equal tokens
    assert (is_needle.sum(1) == r * t.n_pairs).all() and not is_needle[:, t.context_len:].any()
    for i in range(40):
        ids = tok[i, is_needle[i]]
        assert torch.equal(ids.view(-1, r), ids.view(-1, r)[:, :1].expand(-1, r))
        assert len(set(ids.tolist())) == t.n_pairs
    # the starts are spread over the whole context, not packed at its beginning
    assert int(b.needle_pos.max()) > t.context_len * 3 // 4
