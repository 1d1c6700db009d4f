"""scripts/decode_attn_trace.py on the CPU: the step's timeline from its launches' traces (the tracing itself
needs a GPU)."""

import pytest
import torch

SCRIPT_NAME = "decode_attn_trace"  # the conftest's `script` fixture loads it


@pytest.fixture(scope="module")
def trace(script):
    return script


def test_timeline_counts_from_the_first_score_cta(trace):
    """Stamps in ns (globaltimer) -> us after the first score CTA's start, min / median / max per column."""
    us = 1000
    score = torch.zeros(3, 8, dtype=torch.int64)
    score[:, 0] = torch.tensor([5, 0, 2]) * us + 10_000  # starts
    score[:, 1] = score[:, 0] + us // 2  # when the length arrived
    score[:, 2] = score[:, 0] + 6 * us  # first batches
    score[:, 3] = torch.tensor([30, 26, 33]) * us + 10_000  # ends
    select = torch.tensor([[36, 42], [36, 43]], dtype=torch.int64) * us + 10_000
    attend = torch.zeros(2, 16, dtype=torch.int64)
    attend[:, 8:12] = torch.tensor([[45, 47, 70, 73], [46, 48, 82, 85]]) * us + 10_000
    lines = trace.timeline(score, select, attend)
    assert lines[0] == ("    score (3 CTAs): start 0.0 / 2.0 / 5.0 | length 0.5 / 2.5 / 5.5 | first batch 6.0 / 8.0 / "
                        "11.0 | end 26.0 / 30.0 / 33.0")
    assert lines[1] == "    select (2 CTAs): start 36.0 / 36.0 / 36.0 | end 42.0 / 43.0 / 43.0"
    assert lines[2].startswith("    attend (2 CTAs): start 45.0 / 46.0 / 46.0 | first item 47.0 / 48.0 / 48.0 | "
                               "loop end 70.0 / 82.0 / 82.0 | end 73.0 / 85.0 / 85.0")
    # no score launch (nothing to rank): the first select CTA's start is the origin
    assert trace.timeline(None, select, attend)[0] == "    select (2 CTAs): start 0.0 / 0.0 / 0.0 | end 6.0 / 7.0 / 7.0"
    # no select launch (the attention CTAs select): score then attend
    two = trace.timeline(score, None, attend)
    assert len(two) == 2 and two[0] == lines[0] and two[1] == lines[2]
