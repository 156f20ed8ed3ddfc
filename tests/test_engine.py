"""HMT numerics over every supported family: score, sessions, batched commits, generation."""

from __future__ import annotations

import pytest
import torch

from hmt_core import HMTConfig, HMTModel, SamplingParams, SessionState
from hmt_core.errors import InvalidInputError
from hmt_core.generation import continuation_log_probs
from hmt_core.testing import FAMILIES, assert_states_equal, tiny_hmt_model


@pytest.mark.parametrize("family", FAMILIES)
def test_family_scores_and_generates(family: str) -> None:
    model = tiny_hmt_model(family)
    seg = model.hmt_config.segment_tokens
    ids = torch.randint(0, model.vocab_size, (2, 3 * seg + 3), generator=torch.Generator().manual_seed(1))
    out = model.score(ids)
    assert out.logits.shape == (2, 3 * seg + 3, model.vocab_size)
    assert out.memories.shape == (2, 4, model.dim)
    assert torch.isfinite(out.logits).all()
    # rows are independent: scoring one row alone gives the same numbers
    torch.testing.assert_close(model.score(ids[1:]).logits, out.logits[1:], atol=1e-5, rtol=1e-4)

    state = model.append(model.new_session(), ids[0])
    assert state.segments_committed == 3 and len(state.window) == 3
    torch.testing.assert_close(state.ltm, out.memories[0, :3], atol=1e-5, rtol=1e-4)

    generation = model.generate(state, SamplingParams(max_tokens=2 * seg, ignore_eos=True))
    first_logits = generation._logits.clone()
    reply = [t.token_id for t in generation]
    # the first generated logits are the reference's logits for the stream's last token
    torch.testing.assert_close(first_logits, out.logits[0, -1], atol=1e-4, rtol=1e-4)
    assert len(reply) == 2 * seg and generation.finish_reason == "length"
    assert_states_equal(generation.state, model.append(state, reply))


def test_generation_crosses_three_boundaries_and_equals_append(model: HMTModel) -> None:
    seg = model.hmt_config.segment_tokens
    prompt = torch.randint(0, model.vocab_size, (seg + 5,), generator=torch.Generator().manual_seed(2))
    state = model.append(model.new_session(), prompt)
    generation = model.generate(state, SamplingParams(max_tokens=4 * seg, ignore_eos=True))
    reply = [t.token_id for t in generation]
    assert generation.state.segments_committed - state.segments_committed >= 3
    assert len(generation.commit_distances) == generation.state.segments_committed - state.segments_committed
    assert all(1 <= d <= model.hmt_config.ltm_context for d in generation.commit_distances)
    assert_states_equal(generation.state, model.append(state, reply))
    assert_states_equal(generation.state, model.append(model.new_session(), prompt.tolist() + reply))
    assert generation.state.version > state.version


def test_generation_from_a_full_window_commits_first(model: HMTModel) -> None:
    seg = model.hmt_config.segment_tokens
    prompt = list(range(10, 10 + 2 * seg))  # lazy commit: the second segment stays open, full
    state = model.append(model.new_session(), prompt)
    assert len(state.window) == seg and state.segments_committed == 1
    generation = model.generate(state, SamplingParams(max_tokens=3, ignore_eos=True))
    reply = [t.token_id for t in generation]
    assert generation.state.segments_committed == 2
    assert generation.state.window == tuple(reply)
    expected_first = model.score(torch.tensor([prompt])).logits[0, -1].argmax().item()
    assert reply[0] == expected_first


def test_continuation_log_probs_are_teacher_forced_and_leave_the_session(model: HMTModel) -> None:
    seg = model.hmt_config.segment_tokens
    prompt = list(range(10, 10 + seg + 3))  # one committed segment, an open window of 3
    continuation = [7, 99, 5, 42]  # stays inside the open window
    state = model.append(model.new_session(), prompt)
    before = SessionState.from_bytes(state.to_bytes())
    log_probs = continuation_log_probs(model, state, continuation)
    reference = torch.log_softmax(model.score(torch.tensor([prompt + continuation])).logits[0].float(), -1)
    expected = [float(reference[len(prompt) + i - 1, token]) for i, token in enumerate(continuation)]
    assert log_probs == pytest.approx(expected, abs=1e-4)
    assert_states_equal(state, before)
    assert continuation_log_probs(model, state, []) == []


def test_forced_tokens_cross_a_boundary_like_appended_ones(model: HMTModel) -> None:
    seg = model.hmt_config.segment_tokens
    state = model.append(model.new_session(), list(range(3, 3 + seg - 1)))
    forced = list(range(50, 50 + 4))  # fills the window, then commits it
    generation = model.generate(state, SamplingParams(max_tokens=len(forced), ignore_eos=True))
    assert all(lp <= 0.0 for lp in (generation.force(t) for t in forced))
    assert generation.finish_reason == "length"
    assert_states_equal(generation.state, model.append(state, forced))
    with pytest.raises(InvalidInputError, match="finished"):
        generation.force(1)
    with pytest.raises(InvalidInputError, match="outside the vocabulary"):
        model.generate(state).force(model.vocab_size)


def test_greedy_is_deterministic_and_sampling_follows_seed(model: HMTModel) -> None:
    state = model.append(model.new_session(), list(range(20)))
    greedy = [model.generate(state, SamplingParams(max_tokens=12, ignore_eos=True)).run().tokens for _ in range(2)]
    assert greedy[0] == greedy[1]
    topk1 = model.generate(state, SamplingParams(max_tokens=12, temperature=1.0, top_k=1, seed=3, ignore_eos=True))
    assert topk1.run().tokens == greedy[0]

    def sampled(seed: int) -> list[int]:
        params = SamplingParams(max_tokens=24, temperature=5.0, seed=seed, ignore_eos=True)
        return model.generate(state, params).run().tokens

    assert sampled(7) == sampled(7)
    assert sampled(7) != sampled(8)


def test_top_p_keeps_sampling_within_the_nucleus() -> None:
    from hmt_core.sampling import sample_tokens, seed_key

    logits = torch.tensor([5.0, 4.9, -10.0, -10.0, -10.0])
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=0)
    drawn = {int(sample_tokens(logits[None], [params], [seed_key(0)], [step])) for step in range(200)}
    assert drawn == {0, 1}
    narrow = SamplingParams(temperature=1.0, top_p=0.1)
    assert {int(sample_tokens(logits[None], [narrow], [seed_key(0)], [step])) for step in range(50)} == {0}


def test_stop_at_eos_and_max_tokens(model: HMTModel) -> None:
    state = model.append(model.new_session(), list(range(1, 12)))
    free = model.generate(state, SamplingParams(max_tokens=6, ignore_eos=True)).run()
    assert free.finish_reason == "length" and len(free.tokens) == 6
    stop_id = free.tokens[2]
    stopped = model.generate(state, SamplingParams(max_tokens=6, stop_token_ids=(stop_id,))).run()
    assert stopped.finish_reason == "stop"
    assert stopped.tokens == free.tokens[:free.tokens.index(stop_id) + 1]
    assert stopped.state.tokens_seen == state.tokens_seen + len(stopped.tokens)


def test_stop_strings_cut_the_text(text_model: HMTModel) -> None:
    tok = text_model.tokenizer
    state = text_model.append(text_model.new_session(), tok.encode("Hello memory"))
    free = text_model.generate(state, SamplingParams(max_tokens=40, ignore_eos=True)).run()
    full_text = tok.decode(free.tokens, skip_special_tokens=True)
    assert free.text == full_text
    stop = full_text[5:8]
    assert stop.strip(), "the tiny model must produce some text for this test"
    cut = text_model.generate(state, SamplingParams(max_tokens=40, stop=(stop,), ignore_eos=True))
    streamed = "".join(t.text for t in cut)
    assert cut.finish_reason == "stop"
    assert streamed == cut.text == full_text[:full_text.index(stop)]
    assert stop not in streamed


def _history(model: HMTModel, n_tokens: int, seed: int) -> SessionState:
    ids = torch.randint(0, model.vocab_size, (n_tokens,), generator=torch.Generator().manual_seed(seed))
    return model.append(model.new_session(), ids)


def test_batched_commit_equals_sequential(model: HMTModel) -> None:
    seg = model.hmt_config.segment_tokens
    # full windows with different histories: no sensory yet, a short memory, a full memory
    states = [_history(model, seg, 1), _history(model, 2 * seg, 2), _history(model, 7 * seg, 3)]
    assert [len(s.sensory) for s in states] == [0, 3, 3]
    assert [s.ltm.shape[0] for s in states] == [0, 1, 4]
    batched, recalls = model.commit_windows(states)
    distances = [recall.distance for recall in recalls]
    for state, together in zip(states, batched, strict=True):
        (alone,), _ = model.commit_windows([state])
        assert_states_equal(together, alone)
    assert distances[0] == 0 and 1 <= distances[2] <= 4


def test_score_recall_distances_point_into_memory(model: HMTModel) -> None:
    out = model.score(torch.randint(0, model.vocab_size, (1, 10 * model.hmt_config.segment_tokens)))
    distances = out.recall_distances[0].tolist()
    assert distances[0] == 0
    assert all(1 <= d <= min(i, model.hmt_config.ltm_context) for i, d in enumerate(distances) if i > 0)


def test_sum_fraction_one_and_no_sensory() -> None:
    model = tiny_hmt_model("qwen2", HMTConfig(segment_tokens=6, num_sensory=0, ltm_context=3, recall_dim=8,
                                              sum_fraction=1.0))
    ids = torch.randint(0, model.vocab_size, (1, 20))
    state = model.append(model.new_session(), ids[0])
    assert state.sensory == ()
    torch.testing.assert_close(state.ltm, model.score(ids).memories[0, :3], atol=1e-5, rtol=1e-4)
    reply = model.generate(state, SamplingParams(max_tokens=8, ignore_eos=True)).run()
    assert_states_equal(reply.state, model.append(state, reply.tokens))


def test_dtype_and_fingerprint_survive_casting(model: HMTModel) -> None:
    bf16 = tiny_hmt_model("llama", model.hmt_config).to(torch.bfloat16)
    assert bf16.fingerprint == model.fingerprint
    state = bf16.append(bf16.new_session(), list(range(30)))
    assert state.ltm.dtype == torch.float32  # a state keeps fp32 memory whatever the model's dtype (#29)
    restored = SessionState.from_bytes(state.to_bytes(), model.fingerprint)
    assert restored.ltm.dtype == torch.float32
    model.append(restored, [1, 2, 3])  # an fp32 model continues a bf16-made state
