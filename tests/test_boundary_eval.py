"""`hmt eval boundary` (#27's "no damage at boundaries"): where the boundary is, what is scored on each
side of it, the teacher-forced window heads against the bare backbone, and the report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from hmt_core import HMTModel
from hmt_core.errors import InvalidInputError
from hmt_core.testing import SAMPLE_TEXTS
from hmt_lab.boundary_eval import (
    BoundaryReport,
    ReplyBoundary,
    boundary_eval,
    chat_prompts,
    measure_reply,
    planned_boundary,
    sample_across_boundary,
    window_head_losses,
)
from hmt_lab.cli import main


def _stream_losses(model: HMTModel, ids: list[int]) -> list[float]:
    """Token i's loss under the bare backbone reading ids whole (index 0: nothing predicts the first token)."""
    with torch.no_grad():
        log_probs = torch.log_softmax(model.backbone(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    return [math.nan] + [-float(log_probs[i - 1, ids[i]]) for i in range(1, len(ids))]


def test_planned_boundary_is_the_first_window_start_far_enough_into_the_reply() -> None:
    assert planned_boundary(5, 8, 3) == 3  # stream position 8
    assert planned_boundary(5, 8, 4) == 11  # 3 tokens in is too early: the next window, stream position 16
    assert planned_boundary(8, 8, 4) == 8  # a full prompt window: the first reply token commits it, too early
    assert planned_boundary(16, 8, 1) == 8
    assert planned_boundary(30, 256, 64) == 226


@pytest.mark.parametrize("prompt_tokens", [5, 8, 11, 13])
def test_the_boundary_is_where_the_session_committed(model: HMTModel, prompt_tokens: int) -> None:
    prompt = [(7 * i + 3) % model.vocab_size for i in range(prompt_tokens)]
    reply, boundary = sample_across_boundary(model, prompt, window=4, seed=prompt_tokens)
    assert boundary >= 4 and len(reply) == boundary + 4
    assert (prompt_tokens + boundary) % model.hmt_config.segment_tokens == 0
    # replayed as appends: reading reply[boundary] is what commits a window
    before = model.append(model.new_session(), prompt + reply[:boundary])
    after = model.append(before, reply[boundary:boundary + 1])
    assert after.segments_committed == before.segments_committed + 1
    assert before.segments_committed == model.append(model.new_session(), prompt + reply[:boundary - 1]) \
        .segments_committed
    # sampled: another seed, another reply (the seed reaches the sampler)
    assert sample_across_boundary(model, prompt, window=4, seed=prompt_tokens + 100)[0] != reply


def test_sixty_four_tokens_on_each_side_scored_by_the_bare_backbone(model: HMTModel) -> None:
    prompt = [3, 9, 27, 81, 115]
    reply, boundary = sample_across_boundary(model, prompt, window=64, seed=1)  # the default span, L=8
    assert boundary == planned_boundary(5, 8, 64) == 67 and len(reply) == 67 + 64
    measured = measure_reply(model, prompt, reply, boundary, window=64)
    losses = _stream_losses(model, prompt + reply)
    start = len(prompt) + boundary  # the stream position of the first token after the boundary
    assert measured.loss_before == pytest.approx(sum(losses[start - 64:start]) / 64, rel=1e-5)
    assert measured.loss_after == pytest.approx(sum(losses[start:start + 64]) / 64, rel=1e-5)
    # not off by one: the 63 or 65 tokens around would give other means
    assert measured.loss_after != pytest.approx(sum(losses[start + 1:start + 65]) / 64, rel=1e-6)
    assert measured.loss_before != pytest.approx(sum(losses[start - 65:start - 1]) / 64, rel=1e-6)
    assert measured.ratio == pytest.approx(math.exp(measured.loss_after - measured.loss_before))


def test_the_end_of_turn_is_reported_not_obeyed(model: HMTModel) -> None:
    reply = [5] * 10 + [0] + [6] * 9  # 0 is the tiny model's end of sequence
    measured = measure_reply(model, [1, 2, 3], reply, 10, window=8, eos=model.eos_token_ids)
    assert measured.end_of_turn == 10 and len(measured.reply) == 20


def test_teacher_forced_heads_of_a_window_only_model_equal_the_backbone(model: HMTModel) -> None:
    """The self-check: a window-only model reads each window bare, which is the backbone's reading."""
    window_only = model.with_memory("window")
    docs = torch.randint(1, model.vocab_size, (3, 5 * 8), generator=torch.Generator().manual_seed(4))
    hmt, bare = window_head_losses(window_only, docs, head=4, batch_size=2)
    assert hmt.shape == bare.shape == (3 * 4, 4)  # windows 2..5 of 3 documents, 4 positions each
    torch.testing.assert_close(hmt, bare, atol=1e-5, rtol=1e-5)
    report = boundary_eval(window_only, [[1, 2, 3]], docs, window=4, head=4)
    assert report.head_loss_difference == pytest.approx(0.0, abs=1e-5) and report.windows_scored == 12


def test_teacher_forced_heads_of_hmt_against_the_backbone_after_the_sensory_tokens(model: HMTModel) -> None:
    seg, k, head = 8, model.hmt_config.num_sensory, 5
    docs = torch.randint(1, model.vocab_size, (2, 3 * seg + 2), generator=torch.Generator().manual_seed(5))
    hmt, bare = window_head_losses(model, docs, head=head, batch_size=1)
    assert hmt.shape == (2 * 2, head)  # the short third window has 1 target, not 5: not scored
    with torch.no_grad():
        logits = model.score(docs).logits.float()
    order = [(0, seg), (0, 2 * seg), (1, seg), (1, 2 * seg)]  # batches of one: window-major per document
    for row, (doc_index, start) in enumerate(order):
        doc = docs[doc_index]
        with torch.no_grad():  # the backbone reads the whole window after the k sensory tokens
            alone = torch.log_softmax(model.backbone(input_ids=doc[None, start - k:start + seg]).logits[0].float(),
                                      dim=-1)
        expected = [-float(alone[k + i, doc[start + i + 1]]) for i in range(head)]
        torch.testing.assert_close(bare[row], torch.tensor(expected), atol=1e-4, rtol=1e-4)
        # HMT's row is its own whole-document scoring
        expected_hmt = torch.nn.functional.cross_entropy(logits[doc_index, start:start + head],
                                                         doc[start + 1:start + head + 1], reduction="none")
        torch.testing.assert_close(hmt[row], expected_hmt, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(hmt, bare, atol=1e-3)  # the memory prompt changes HMT's reading


def test_bad_input_is_refused_with_a_reason(model: HMTModel) -> None:
    with pytest.raises(InvalidInputError, match="does not hold 64 tokens on each side"):
        measure_reply(model, [1, 2], [5] * 100, boundary=40, window=64)
    with pytest.raises(InvalidInputError, match="it needs at least 140 tokens"):
        measure_reply(model, [1, 2], [5] * 100, boundary=76, window=64)
    with pytest.raises(InvalidInputError, match="no second window"):
        window_head_losses(model, torch.ones(2, 8 + 4, dtype=torch.long), head=4)
    with pytest.raises(InvalidInputError, match="longer than a window"):
        window_head_losses(model, torch.ones(2, 40, dtype=torch.long), head=9)
    with pytest.raises(InvalidInputError, match="at least one prompt"):
        boundary_eval(model, [], torch.ones(1, 40, dtype=torch.long), window=4, head=4)
    with pytest.raises(InvalidInputError, match="at least one token"):
        sample_across_boundary(model, [], window=4)
    with pytest.raises(InvalidInputError, match="do not fit the backbone's 512 positions"):
        measure_reply(model, [1] * 500, [5] * 20, boundary=8, window=8)


def test_report_holds_by_the_median_ratio() -> None:
    def reply(ratio: float) -> ReplyBoundary:
        return ReplyBoundary(10, [], 64, 2.0, 2.0 + math.log(ratio), None)

    report = BoundaryReport(8, 3, 64, 32, [reply(1.0), reply(1.3), reply(1.1)], 1, 4, 3.0, 3.1)
    assert report.median_ratio == pytest.approx(1.1) and report.share_within == pytest.approx(2 / 3)
    assert report.sampled_holds and report.teacher_forced_holds
    assert report.head_loss_difference == pytest.approx(-0.1)
    worse = BoundaryReport(8, 3, 64, 32, [reply(1.0), reply(1.3), reply(1.5)], 1, 4, 3.2, 3.1)
    assert not worse.sampled_holds and not worse.teacher_forced_holds
    assert "does not hold" in worse.table() and worse.to_json()["sampled"]["holds"] is False


def test_chat_prompts_are_seeded_and_varied(text_model: HMTModel) -> None:
    first = chat_prompts(text_model.tokenizer, 8, seed=0)
    assert first == chat_prompts(text_model.tokenizer, 8, seed=0) != chat_prompts(text_model.tokenizer, 8, seed=1)
    assert len({tuple(p) for p in first}) == 8
    with pytest.raises(InvalidInputError, match="at least one prompt"):
        chat_prompts(text_model.tokenizer, 0)


def test_eval_boundary_cli(text_model: HMTModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text_model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "held_out.txt").write_text(" ".join(SAMPLE_TEXTS))  # the default held-out text
    base = ["eval", "boundary", "--model", str(tmp_path / "m"), "--doc-segments", "4", "--docs", "2",
            "--prompts", "2", "--boundary-tokens", "4", "--head-tokens", "4", "--device", "cpu"]
    assert main([*base, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["sampled"]["replies"]) == 2 and out["teacher_forced"]["windows"] == 2 * 3
    assert isinstance(out["sampled"]["holds"], bool) and isinstance(out["teacher_forced"]["holds"], bool)
    assert all(r["boundary"] >= 4 and r["reply_tokens"] == r["boundary"] + 4 for r in out["sampled"]["replies"])
    assert main(base) == 0
    assert "median after / before" in capsys.readouterr().out
    assert main([*base, "--head-tokens", "9"]) == 2  # an HMTError: printed, not raised
    assert "longer than a window" in capsys.readouterr().err
