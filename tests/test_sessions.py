"""Session invariants (chunking, resume), the byte format, and every bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hmt_core import (
    CorruptStateError,
    HMTConfig,
    HMTModel,
    InvalidInputError,
    ModelMismatchError,
    SamplingParams,
    SessionState,
)
from hmt_core.testing import assert_states_equal, tiny_hmt_model


@st.composite
def split_streams(draw: st.DrawFn) -> tuple[list[int], list[int]]:
    tokens = draw(st.lists(st.integers(0, 127), min_size=1, max_size=70))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(tokens) - 1)), max_size=8)))
    return tokens, [c for c in cuts if c < len(tokens)]


@settings(max_examples=40, deadline=None)
@given(split_streams())
def test_chunking_invariance(model: HMTModel, stream: tuple[list[int], list[int]]) -> None:
    tokens, cuts = stream
    whole = model.append(model.new_session(), tokens)
    pieces = model.new_session()
    for start, end in zip([0, *cuts], [*cuts, len(tokens)], strict=True):
        pieces = model.append(pieces, tokens[start:end])
    assert_states_equal(pieces, whole)
    # lazy commit: the window is never empty once there are tokens
    seg = model.hmt_config.segment_tokens
    assert whole.segments_committed == (len(tokens) - 1) // seg
    assert 1 <= len(whole.window) <= seg
    if whole.segments_committed:
        memories = model.score(torch.tensor([tokens])).memories[0, :whole.segments_committed]
        torch.testing.assert_close(whole.ltm, memories[-model.hmt_config.ltm_context:], atol=1e-5, rtol=1e-4)


def test_resume_in_a_fresh_model_object(model: HMTModel, tmp_path: Path) -> None:
    prompt = list(range(5, 40))
    state = model.append(model.new_session(), prompt)
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    uninterrupted = model.generate(state, params).run()

    model.save_pretrained(tmp_path / "m")
    fresh = HMTModel.from_pretrained(tmp_path / "m")
    resumed_state = SessionState.from_bytes(state.to_bytes(), fresh.fingerprint)
    resumed = fresh.generate(resumed_state, params).run()
    assert resumed.tokens == uninterrupted.tokens
    assert_states_equal(resumed.state, uninterrupted.state)

    # two turns with a save/load between them = the same two turns in one process
    turn2 = [7, 8, 9]
    direct = model.generate(model.append(uninterrupted.state, turn2), params).run()
    reloaded = SessionState.from_bytes(uninterrupted.state.to_bytes(), fresh.fingerprint)
    via_bytes = fresh.generate(fresh.append(reloaded, turn2), params).run()
    assert via_bytes.tokens == direct.tokens


def test_state_bytes_round_trip_and_stay_bounded(model: HMTModel) -> None:
    cfg = model.hmt_config
    sizes = []
    state = model.new_session()
    for _ in range(4):
        state = model.append(state, list(range(3 * cfg.segment_tokens * cfg.ltm_context)))
        data = state.to_bytes()
        sizes.append(len(data))
        restored = SessionState.from_bytes(data)
        assert_states_equal(restored, state, atol=0)
        assert restored.version == state.version and restored.fingerprint == state.fingerprint
    assert len(set(sizes)) == 1, "the state must not grow with the conversation"


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "flipped_tensor", "flipped_counter",
                                    "header_only"])
def test_corrupt_bytes_are_refused(model: HMTModel, damage: str) -> None:
    data = bytearray(model.append(model.new_session(), list(range(30))).to_bytes())
    if damage == "empty":
        data = bytearray()
    elif damage == "truncated":
        data = data[:len(data) - 17]
    elif damage == "garbage":
        data = bytearray(b"\x00\x01definitely not a state" * 10)
    elif damage == "flipped_tensor":
        data[-5] ^= 0x40
    elif damage == "flipped_counter":
        text = bytes(data).replace(b'"tokens_seen":"30"', b'"tokens_seen":"31"')
        assert text != bytes(data)
        data = bytearray(text)
    elif damage == "header_only":
        data = data[:8]
    with pytest.raises(CorruptStateError):
        SessionState.from_bytes(bytes(data))


def test_state_of_another_model_is_refused(model: HMTModel) -> None:
    other = tiny_hmt_model("llama", model.hmt_config, seed=99)
    assert other.fingerprint != model.fingerprint
    state = other.append(other.new_session(), [1, 2, 3])
    with pytest.raises(ModelMismatchError):
        SessionState.from_bytes(state.to_bytes(), model.fingerprint)
    with pytest.raises(ModelMismatchError):
        model.append(state, [4])
    with pytest.raises(ModelMismatchError):
        model.generate(state)
    differently_configured = tiny_hmt_model("llama", HMTConfig(segment_tokens=9, num_sensory=3, ltm_context=4,
                                                               recall_dim=16))
    assert differently_configured.fingerprint != model.fingerprint


@pytest.mark.parametrize("tokens, message", [
    ([], "no tokens"),
    ([1, 128], "outside the vocabulary"),
    ([-1], "outside the vocabulary"),
    (torch.tensor([1.5, 2.0]), "must be integers"),
])
def test_bad_tokens_are_refused_and_change_nothing(model: HMTModel, tokens: object, message: str) -> None:
    state = model.append(model.new_session(), [1, 2, 3])
    with pytest.raises(InvalidInputError, match=message):
        model.append(state, tokens)  # type: ignore[arg-type]
    assert state.window == (1, 2, 3) and state.tokens_seen == 3


def test_bad_generation_requests(model: HMTModel, text_model: HMTModel) -> None:
    with pytest.raises(InvalidInputError, match="no tokens yet"):
        model.generate(model.new_session())
    state = model.append(model.new_session(), [1, 2])
    with pytest.raises(InvalidInputError, match="tokenizer"):
        model.generate(state, SamplingParams(stop=("x",)))
    with pytest.raises(InvalidInputError, match="vocabulary"):
        model.generate(state, SamplingParams(stop_token_ids=(10_000,)))
    for bad in ({"max_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -2},
                {"stop": ("",)}, {"temperature": float("nan")}):
        with pytest.raises(InvalidInputError):
            SamplingParams(**bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("fields", [
    {"segment_tokens": 0}, {"num_sensory": 9, "segment_tokens": 8}, {"ltm_context": 0}, {"recall_dim": 0},
    {"sum_fraction": 0.0}, {"sum_fraction": 1.5}, {"segment_tokens": 1, "sum_fraction": 0.1},
    {"recall_scale": "cubic"}, {"recall_dtype": "int8"}, {"recall_dtype": "bfloat"},
])
def test_bad_configs_are_refused(fields: dict[str, object]) -> None:
    with pytest.raises(InvalidInputError):
        HMTConfig(**fields)  # type: ignore[arg-type]


def test_commit_needs_a_full_window(model: HMTModel) -> None:
    with pytest.raises(InvalidInputError, match="full window"):
        model.commit_windows([model.append(model.new_session(), [1, 2])])
