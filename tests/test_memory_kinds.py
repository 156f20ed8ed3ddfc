"""Memory as an interface (hmt_core.memory): HMT, RMT and window-only sessions on one code path."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from hmt_core import CorruptStateError, HMTConfig, HMTModel, ModelMismatchError, SamplingParams, SessionState
from hmt_core.errors import InvalidInputError
from hmt_core.memory import MEMORY_KINDS, memory_of
from hmt_core.session import _checksum, _read_metadata
from hmt_core.temp_lora import TempLoRAConfig, new_adapter
from hmt_core.testing import assert_states_equal, tiny_hmt_model

CONFIG = HMTConfig(segment_tokens=8, num_sensory=3, ltm_context=4, recall_dim=16)


def model_of(kind: str, family: str = "llama") -> HMTModel:
    """The same random weights (seed 0) under each kind of memory (Temp-LoRA: a learning rate at
    which two steps visibly change a tiny model)."""
    lora = None
    if memory_of(kind).adapts:
        targets = ("c_attn",) if family == "gpt2" else ("q_proj", "v_proj")
        lora = TempLoRAConfig(learning_rate=1e-2, target_modules=targets)
    return tiny_hmt_model(family, config=dataclasses.replace(CONFIG, memory=kind, temp_lora=lora))


def append_in_random_chunks(model: HMTModel, tokens: list[int], rng: random.Random) -> SessionState:
    state = model.new_session()
    position = 0
    while position < len(tokens):
        step = rng.randint(1, 2 * model.hmt_config.segment_tokens)
        state = model.append(state, tokens[position:position + step])
        position += step
    return state


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", MEMORY_KINDS)
def test_each_kind_serves_what_it_scores(kind: str, family: str) -> None:
    """Chunked appends, the first generated logits and a generated reply agree with the
    teacher-forced reading of the same kind: serving runs the same memory as training and eval."""
    model = model_of(kind, family)
    seg = model.hmt_config.segment_tokens
    rng = random.Random(7)
    tokens = [rng.randrange(model.vocab_size) for _ in range(3 * seg + 3)]
    out = model.score(torch.tensor([tokens]))
    state = append_in_random_chunks(model, tokens, rng)
    assert (state.segments_committed, len(state.window), state.memory) == (3, 3, kind)
    assert state.ltm.shape[0] == {"hmt": 3, "rmt": 1, "window": 0, "temp-lora": 0, "hmt+temp-lora": 3}[kind]
    assert len(state.sensory) == (0 if kind == "window" else 3)
    assert (state.adapter is not None) == (kind in ("temp-lora", "hmt+temp-lora"))
    if state.ltm.shape[0]:  # the kept memories are the last ones the reading wrote
        torch.testing.assert_close(state.ltm, out.memories[0, 3 - state.ltm.shape[0]:3], atol=1e-5, rtol=1e-4)
    generation = model.generate(state, SamplingParams(max_tokens=2 * seg, ignore_eos=True))
    torch.testing.assert_close(generation._logits, out.logits[0, -1], atol=1e-4, rtol=1e-4)
    reply = [t.token_id for t in generation]
    assert_states_equal(generation.state, model.append(state, reply))


def test_rmt_reads_the_previous_segment_memory_and_window_reads_nothing() -> None:
    seg, k = CONFIG.segment_tokens, CONFIG.num_sensory
    ids = torch.randint(0, 128, (2, 3 * seg), generator=torch.Generator().manual_seed(3))
    rmt, window = model_of("rmt"), model_of("window")
    out = rmt.score(ids)
    # segment 2 by hand: prompt = the memory segment 1 wrote, sensory = segment 1's last k tokens
    logits, memory = rmt.segment_logits(out.memories[:, 1], ids[:, 2 * seg - k:2 * seg], ids[:, 2 * seg:])
    torch.testing.assert_close(out.logits[:, 2 * seg:], logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.memories[:, 2], memory, atol=1e-5, rtol=1e-4)
    assert out.recall_distances.tolist() == [[0, 1, 1]] * 2  # RMT's "recall": one segment back, all weight
    bare = window.backbone(input_ids=ids[:, seg:2 * seg]).logits
    torch.testing.assert_close(window.score(ids).logits[:, seg:2 * seg], bare, atol=1e-6, rtol=1e-5)


def test_the_kind_is_part_of_the_model_identity_and_of_every_state() -> None:
    hmt, rmt = model_of("hmt"), model_of("rmt")
    assert hmt.fingerprint != rmt.fingerprint
    # HMT configurations do not name the default, so HMT models keep their files and fingerprints
    assert "memory" not in hmt.hmt_config.to_dict() and rmt.hmt_config.to_dict()["memory"] == "rmt"
    state = rmt.append(rmt.new_session(), list(range(20)))
    data = state.to_bytes()
    assert _read_metadata(data)["memory"] == "rmt"
    loaded = SessionState.from_bytes(data)
    assert loaded.memory == "rmt"
    rmt.check_session(loaded)
    with pytest.raises(ModelMismatchError, match="keeps rmt memory, and this model keeps hmt memory"):
        hmt.check_session(loaded)
    with pytest.raises(ModelMismatchError, match="keeps hmt memory"):
        rmt.check_session(hmt.new_session())
    # even with a forged fingerprint, a state of another kind does not fit: refused, never read
    forged = dataclasses.replace(loaded, fingerprint=hmt.fingerprint)
    with pytest.raises(ModelMismatchError, match="keeps rmt memory"):
        hmt.append(forged, [1])


def test_states_from_before_kinds_are_hmt_and_unknown_kinds_are_corrupt() -> None:
    hmt = model_of("hmt")
    state = hmt.append(hmt.new_session(), list(range(20)))

    def rewritten(change: dict[str, str | None]) -> bytes:
        meta = _read_metadata(state.to_bytes())
        tensors = load_tensors(state.to_bytes())
        meta.pop("checksum")
        for key, value in change.items():
            if value is None:
                meta.pop(key)
            else:
                meta[key] = value
        meta["checksum"] = _checksum(meta, tensors)
        return save_tensors(tensors, metadata=meta)

    old = SessionState.from_bytes(rewritten({"memory": None}))
    assert old.memory == "hmt"
    assert_states_equal(hmt.append(old, [5, 6]), hmt.append(state, [5, 6]))
    with pytest.raises(CorruptStateError, match="unknown memory kind 'lru'"):
        SessionState.from_bytes(rewritten({"memory": "lru"}))


def test_model_directories_keep_their_kind(tmp_path: Path) -> None:
    rmt = model_of("rmt")
    rmt.save_pretrained(tmp_path / "rmt")
    assert json.loads((tmp_path / "rmt" / "hmt_config.json").read_text())["hmt"]["memory"] == "rmt"
    loaded = HMTModel.from_pretrained(tmp_path / "rmt")
    assert loaded.hmt_config.memory == "rmt" and loaded.memory is memory_of("rmt")
    assert loaded.fingerprint == rmt.fingerprint
    model_of("hmt").save_pretrained(tmp_path / "hmt")
    assert "memory" not in json.loads((tmp_path / "hmt" / "hmt_config.json").read_text())["hmt"]


def test_unknown_kinds_are_refused() -> None:
    with pytest.raises(InvalidInputError, match="memory must be one of hmt, rmt, window"):
        dataclasses.replace(CONFIG, memory="lru")
    with pytest.raises(ValueError, match="unknown memory kind"):
        memory_of("lru")


def test_temp_lora_sessions_learn_their_own_text() -> None:
    """A Temp-LoRA session reads a repeat of text it committed better than the same reading with an
    adapter that cannot learn; its adapter is its state, and that state round-trips."""
    seg = CONFIG.segment_tokens

    def temp_lora_model(learning_rate: float) -> HMTModel:
        lora = TempLoRAConfig(learning_rate=learning_rate, steps=4)
        config = dataclasses.replace(CONFIG, memory="temp-lora", temp_lora=lora)
        return tiny_hmt_model("llama", config=config, initializer_range=0.3)  # logits a LoRA can move

    block = torch.randint(0, 128, (1, 3 * seg), generator=torch.Generator().manual_seed(5))
    ids = torch.cat([block, block], dim=1)

    def repeat_loss(model: HMTModel) -> float:
        logits = model.score(ids).logits[0, 3 * seg:-1]
        return float(torch.nn.functional.cross_entropy(logits, ids[0, 3 * seg + 1:]))

    learning, frozen = temp_lora_model(3e-2), temp_lora_model(1e-12)
    assert repeat_loss(learning) < 0.8 * repeat_loss(frozen)
    state = learning.append(learning.new_session(), ids[0].tolist())
    assert state.adapter is not None and state.adapter.commits == state.segments_committed == 5
    assert any(bool(b.abs().sum() > 0) for b in state.adapter.b.values())  # B moved off zero
    loaded = SessionState.from_bytes(state.to_bytes(), learning.fingerprint)
    assert loaded.adapter is not None and loaded.adapter.to_bytes() == state.adapter.to_bytes()
    learning.check_session(loaded)
    with pytest.raises(ModelMismatchError, match="keeps temp-lora memory"):
        model_of("hmt").check_session(loaded)
    with pytest.raises(CorruptStateError, match="adapter disagrees"):
        behind = dataclasses.replace(loaded, segments_committed=4, tokens_seen=4 * seg + len(loaded.window))
        learning.check_session(behind)
    with pytest.raises(CorruptStateError, match="lacks an adapter"):
        learning.check_session(dataclasses.replace(loaded, adapter=None))
    other_modules = dataclasses.replace(new_adapter(learning.backbone, TempLoRAConfig(target_modules=("k_proj",))),
                                        commits=5)
    with pytest.raises(CorruptStateError, match="does not fit this model's backbone"):
        learning.check_session(dataclasses.replace(loaded, adapter=other_modules))


def test_hmt_new_makes_a_servable_model_of_any_kind(tmp_path: Path) -> None:
    import subprocess
    import sys

    backbone = tiny_hmt_model("llama").backbone
    backbone.save_pretrained(tmp_path / "backbone")
    command = [sys.executable, "-m", "hmt_lab.cli", "new", "--backbone", str(tmp_path / "backbone"),
               "--out", str(tmp_path / "tl"), "--segment-tokens", "8", "--num-sensory", "3", "--temp-lora-steps", "3"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    model = HMTModel.from_pretrained(tmp_path / "tl")
    assert model.hmt_config.memory == "temp-lora" and model.hmt_config.temp_lora is not None
    assert (model.hmt_config.temp_lora.steps, model.hmt_config.temp_lora.context_tokens) == (3, 3)
    state = model.append(model.new_session(), list(range(1, 30)))
    assert state.adapter is not None and state.adapter.commits == 3
    assert json.loads(done.stdout)["fingerprint"] == model.fingerprint
    bad = subprocess.run([*command[:-6], "--memory", "lru"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "invalid choice: 'lru'" in bad.stderr
    # a trained HMT model's weights, read with an adapter besides its memory
    hmt = tiny_hmt_model("llama", config=CONFIG)
    hmt.save_pretrained(tmp_path / "hmt")
    command = [sys.executable, "-m", "hmt_lab.cli", "new", "--model", str(tmp_path / "hmt"),
               "--memory", "hmt+temp-lora", "--out", str(tmp_path / "both"), "--temp-lora-rank", "4"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    both = HMTModel.from_pretrained(tmp_path / "both")
    assert both.hmt_config == dataclasses.replace(hmt.hmt_config, memory="hmt+temp-lora",
                                                  temp_lora=both.hmt_config.temp_lora)
    assert both.hmt_config.temp_lora is not None and both.hmt_config.temp_lora.rank == 4
    torch.testing.assert_close(both.recall_wk.weight, hmt.recall_wk.weight)
    state = both.append(both.new_session(), list(range(1, 30)))
    assert state.ltm.shape[0] == 3 and state.adapter is not None and state.adapter.commits == 3
    neither = subprocess.run([*command[:4], "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=300)
    assert neither.returncode == 2 and "one of the arguments --backbone --model is required" in neither.stderr


def test_hmt_with_temp_lora_is_hmt_plus_what_its_adapter_learns() -> None:
    """HMT+Temp-LoRA on an HMT model's weights: with an adapter that cannot learn it reads exactly as
    HMT does; with one that learns, it reads a repeat of committed text better than HMT alone, and
    its state holds both memories and adapter, refused by a model of either single kind."""
    seg = CONFIG.segment_tokens
    hmt = tiny_hmt_model("llama", config=CONFIG, initializer_range=0.3)  # logits a LoRA can move
    block = torch.randint(0, 128, (1, 3 * seg), generator=torch.Generator().manual_seed(5))
    ids = torch.cat([block, block], dim=1)

    def combined(learning_rate: float) -> HMTModel:
        return hmt.with_memory("hmt+temp-lora", TempLoRAConfig(learning_rate=learning_rate, steps=4))

    def repeat_loss(model: HMTModel) -> float:
        logits = model.score(ids).logits[0, 3 * seg:-1]
        return float(torch.nn.functional.cross_entropy(logits, ids[0, 3 * seg + 1:]))

    frozen, learning = combined(1e-12), combined(3e-2)
    assert frozen.recall_wq is hmt.recall_wq and frozen.backbone is hmt.backbone  # shared, not copied
    assert frozen.fingerprint != hmt.fingerprint and frozen.hmt_config.memory == "hmt+temp-lora"
    reference = hmt.score(ids)
    torch.testing.assert_close(frozen.score(ids).logits, reference.logits, atol=1e-5, rtol=1e-4)
    assert repeat_loss(learning) < 0.8 * repeat_loss(hmt)
    state = learning.append(learning.new_session(), ids[0].tolist())
    assert state.ltm.shape[0] == CONFIG.ltm_context and state.adapter is not None
    assert state.adapter.commits == state.segments_committed == 5
    # the memories a session keeps are those its teacher-forced reading wrote (adapters trained alike)
    torch.testing.assert_close(state.ltm, learning.score(ids).memories[0, 1:5], atol=1e-4, rtol=1e-3)
    loaded = SessionState.from_bytes(state.to_bytes(), learning.fingerprint)
    learning.check_session(loaded)
    assert_states_equal(learning.append(loaded, [1, 2]), learning.append(state, [1, 2]))
    with pytest.raises(ModelMismatchError, match="keeps hmt\\+temp-lora memory, and this model keeps hmt memory"):
        hmt.check_session(loaded)
    with pytest.raises(ModelMismatchError, match="keeps hmt\\+temp-lora memory, and this model keeps temp-lora"):
        model_of("temp-lora").check_session(loaded)
    with pytest.raises(CorruptStateError, match="lacks an adapter"):
        learning.check_session(dataclasses.replace(loaded, adapter=None))
