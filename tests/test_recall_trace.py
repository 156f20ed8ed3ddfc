"""The recall trace: each commit's top long-term-memory slots and softmax weights, from the recall itself."""

from __future__ import annotations

import math

import pytest
import torch

from hmt_core import HMTConfig, HMTModel, SamplingParams, SessionState
from hmt_core.engine import advance_appends, begin_append
from hmt_core.recall import RECALL_TOP_K
from hmt_core.testing import tiny_hmt_model


@pytest.fixture(scope="module")
def model() -> HMTModel:
    model = tiny_hmt_model("llama", HMTConfig(segment_tokens=8, num_sensory=3, ltm_context=6, recall_dim=16,
                                                    recall_dtype="float32"))  # the reference below: float32
    with torch.no_grad():  # a sharper recall than the random init's near-uniform one: no ties
        model.recall_wq.weight.normal_(0, 2.0)
        model.recall_wk.weight.normal_(0, 2.0)
    return model


def _history(model: HMTModel, segments: int, seed: int) -> SessionState:
    """A session whose full window is segment `segments` (that many committed before it)."""
    seg = model.hmt_config.segment_tokens
    ids = torch.randint(0, model.vocab_size, ((segments + 1) * seg,), generator=torch.Generator().manual_seed(seed))
    return model.append(model.new_session(), ids)


def _full_weights(model: HMTModel, state: SessionState) -> torch.Tensor:
    """Step 2's softmax over the whole memory, written out here."""
    query = model.summary_queries(torch.tensor([state.window[:model.hmt_config.summary_tokens]]))
    scores = (query @ model.recall_wq.weight.t()) @ (state.ltm @ model.recall_wk.weight.t()).t()
    return torch.softmax(scores[0] / model.recall_divisor, dim=-1)


@pytest.mark.parametrize("segments", [0, 1, 3, 6, 9])
def test_a_commit_reports_the_top_weights_of_its_recall(model: HMTModel, segments: int) -> None:
    state = _history(model, segments, seed=segments)
    (_, (recall,)) = model.commit_windows([state])
    held = state.ltm.shape[0]
    assert recall.segment == segments and held == min(segments, model.hmt_config.ltm_context)
    assert len(recall.slots) == len(recall.weights) == min(RECALL_TOP_K, held)
    if not held:
        assert recall.distance == 0
        return
    full = _full_weights(model, state)
    order = torch.argsort(full, descending=True, stable=True)[:RECALL_TOP_K]
    assert list(recall.slots) == [segments - held + int(i) for i in order]  # slot i: written by that segment
    torch.testing.assert_close(torch.tensor(recall.weights), full[order], atol=1e-5, rtol=1e-4)
    assert all(0 <= w <= 1 for w in recall.weights) and list(recall.weights) == sorted(recall.weights, reverse=True)
    assert sum(recall.weights) <= 1 + 1e-6
    assert all(segments - held <= s < segments for s in recall.slots) and len(set(recall.slots)) == len(recall.slots)
    assert recall.distance == segments - recall.slots[0] == held - int(full.argmax())


def test_batched_rows_of_different_memory_lengths_report_what_they_would_alone(model: HMTModel) -> None:
    states = [_history(model, n, seed=10 + n) for n in (0, 2, 7)]
    _, together = model.commit_windows(states)
    for state, recall in zip(states, together, strict=True):
        (_, (alone,)) = model.commit_windows([state])
        assert recall.slots == alone.slots and recall.segment == alone.segment
        assert all(math.isclose(a, b, abs_tol=1e-5) for a, b in zip(recall.weights, alone.weights, strict=True))


def test_ties_keep_memory_order() -> None:
    """Equal weights (the random tiny model's recall is uniform) list the oldest slot first, as
    argmax does, whatever the batch's padding: the trace must not depend on who shares the batch."""
    uniform = tiny_hmt_model("llama")
    with torch.no_grad():
        uniform.recall_wk.weight.zero_()
    state = _history(uniform, 3, seed=1)
    short = _history(uniform, 1, seed=2)
    _, recalls = uniform.commit_windows([state, short])
    assert recalls[0].slots == (0, 1, 2) and recalls[0].weights == pytest.approx((1 / 3,) * 3)
    assert recalls[1].slots == (0,) and recalls[1].distance == 1


def test_appends_and_replies_carry_one_trace_per_commit(model: HMTModel) -> None:
    seg = model.hmt_config.segment_tokens
    task = begin_append(model, model.new_session(), list(range(1, 5 * seg + 2)))
    while not task.done:
        advance_appends(model, [task])
    assert [r.segment for r in task.recalls] == list(range(5)) and task.distances == [r.distance for r in task.recalls]
    generation = model.generate(task.state, SamplingParams(max_tokens=2 * seg + 1, ignore_eos=True))
    generation.run()
    assert [r.segment for r in generation.commit_recalls] == list(range(5, generation.state.segments_committed))
    assert generation.commit_distances == [r.distance for r in generation.commit_recalls]
