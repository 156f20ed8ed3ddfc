"""The opt-in attention-sink token (HMTConfig.sink_token, #27): windows read as [E(sink), p, E(sensory), E(x), p],
the same layout in training, scoring, commits, the decode engine's slots and Temp-LoRA commits; saved, loaded and
fingerprinted; refused where it cannot apply."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
import torch

from hmt_core import HMTConfig, HMTModel, SamplingParams
from hmt_core.engine import DecodeEngine
from hmt_core.errors import InvalidInputError, ModelMismatchError
from hmt_core.temp_lora import TempLoRAConfig
from hmt_core.testing import assert_states_equal, tiny_hmt_model
from hmt_lab.episodes import EpisodeConfig, prepare, read_hidden

CONFIG = HMTConfig(segment_tokens=8, num_sensory=3, ltm_context=4, recall_dim=16, sink_token=5)


def sink_model(memory: str = "hmt", family: str = "llama") -> HMTModel:
    lora = TempLoRAConfig(learning_rate=1e-2, target_modules=("q_proj", "v_proj")) if memory == "hmt+temp-lora" \
        else None
    return tiny_hmt_model(family, dataclasses.replace(CONFIG, memory=memory, temp_lora=lora), seed=4)


def test_a_window_is_read_behind_the_sink_token() -> None:
    model = sink_model()
    prompts = torch.randn(2, model.dim)
    sensory = torch.randint(0, 128, (2, 3))
    tokens = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        logits, memory = model.segment_logits(prompts, sensory, tokens)
        sink = model.embed(torch.tensor([[5, 5]])).transpose(0, 1)  # [2, 1, d]
        embeds = torch.cat([sink, prompts[:, None], model.embed(sensory), model.embed(tokens), prompts[:, None]], 1)
        out = model.backbone(inputs_embeds=embeds, output_hidden_states=True)
    torch.testing.assert_close(logits, out.logits[:, -9:-1])
    torch.testing.assert_close(memory, out.hidden_states[-1][:, -1])
    plain = tiny_hmt_model("llama", dataclasses.replace(CONFIG, sink_token=None), seed=4)
    with torch.no_grad():
        assert not torch.allclose(plain.segment_logits(prompts, sensory, tokens)[0], logits, atol=1e-3)
    # the episode trainer reads its question rows the same way
    with torch.no_grad():
        hidden, offset = read_hidden(model, prompts, sensory.tolist(), tokens.tolist())
    assert offset == 2 + 3
    torch.testing.assert_close(model.lm_logits(hidden[:, offset:]), out.logits[:, offset:-1])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_sink_model_serves_what_it_scores(family: str) -> None:
    """Chunked appends, the engine's prefill and decode slots (commits read in the slot included) agree with
    the teacher-forced reading."""
    model = sink_model(family=family)
    seg = model.hmt_config.segment_tokens
    rng = random.Random(3)
    tokens = [rng.randrange(model.vocab_size) for _ in range(3 * seg + 3)]
    out = model.score(torch.tensor([tokens]))
    state = model.new_session()
    for start in range(0, len(tokens), 5):
        state = model.append(state, tokens[start:start + 5])
    torch.testing.assert_close(state.ltm, out.memories[0, :3], atol=1e-5, rtol=1e-4)
    generation = model.generate(state, SamplingParams(max_tokens=3 * seg, ignore_eos=True))
    torch.testing.assert_close(generation._logits, out.logits[0, -1], atol=1e-4, rtol=1e-4)
    reply = [t.token_id for t in generation]
    assert generation.state.segments_committed >= 5
    assert_states_equal(generation.state, model.append(state, reply), atol=1e-4)


def test_sink_rows_batch_as_they_decode_alone() -> None:
    model = sink_model()
    seg = model.hmt_config.segment_tokens
    rng = random.Random(5)
    states = [model.append(model.new_session(), [rng.randrange(128) for _ in range(n)]) for n in (1, seg, 3 * seg + 2)]
    params = [SamplingParams(max_tokens=2 * seg + i, ignore_eos=True) for i in range(len(states))]
    engine = DecodeEngine(model, max_rows=len(states))
    assert engine.columns == 2 + 3 + seg + 1
    rows = [engine.add(s, p) for s, p in zip(states, params, strict=True)]
    while engine.size:
        engine.step()
    for state, param, row in zip(states, params, rows, strict=True):
        assert row.tokens == model.generate(state, param).run().tokens


def test_hmt_with_temp_lora_commits_its_adapter_behind_the_sink() -> None:
    model = sink_model("hmt+temp-lora")
    seg = model.hmt_config.segment_tokens
    tokens = [random.Random(6).randrange(128) for _ in range(2 * seg + 1)]
    out = model.score(torch.tensor([tokens]))
    state = model.append(model.new_session(), tokens)
    torch.testing.assert_close(state.ltm, out.memories[0, :2], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.generate(state)._logits, out.logits[0, -1], atol=1e-4, rtol=1e-4)


def test_the_sink_is_saved_loaded_fingerprinted_and_states_do_not_cross(tmp_path: Path) -> None:
    model = sink_model()
    model.save_pretrained(tmp_path / "m")
    loaded = HMTModel.from_pretrained(tmp_path / "m")
    assert loaded.hmt_config.sink_token == 5 and loaded.fingerprint == model.fingerprint
    plain = tiny_hmt_model("llama", dataclasses.replace(CONFIG, sink_token=None), seed=4)
    assert plain.fingerprint != model.fingerprint
    assert "sink_token" not in plain.hmt_config.to_dict()  # models without it keep their files and fingerprints
    state = plain.append(plain.new_session(), list(range(20)))
    with pytest.raises(ModelMismatchError):
        model.check_session(state)


def test_the_episode_trainer_adds_a_sink_to_a_model_without_one() -> None:
    model = tiny_hmt_model("llama", dataclasses.replace(CONFIG, sink_token=None), seed=4)
    before = model.fingerprint
    prepare(model, EpisodeConfig(sink_token=7, backbone_training="full"))
    assert model.hmt_config.sink_token == 7 and model.fingerprint != before
    with pytest.raises(InvalidInputError, match="already reads"):
        model.add_sink_token(3)


@pytest.mark.parametrize(("changes", "message"), [
    ({"sink_token": -1}, "sink_token must be a token id"),
    ({"sink_token": True}, "sink_token must be a token id"),
    ({"sink_token": 1, "memory": "window"}, "reads none"),
])
def test_bad_sink_settings_are_refused(changes: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        dataclasses.replace(CONFIG, **changes)  # type: ignore[arg-type]


def test_a_sink_outside_the_vocabulary_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="outside the vocabulary"):
        tiny_hmt_model("llama", dataclasses.replace(CONFIG, sink_token=128))
    with pytest.raises(InvalidInputError, match="outside the vocabulary"):
        tiny_hmt_model("llama", dataclasses.replace(CONFIG, sink_token=None)).add_sink_token(500)
