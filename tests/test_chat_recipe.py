"""`hmt build-chat` end to end on a tiny backbone: two LoRA stages on books and memory exercises,
a model directory that refers to its backbone and ships only HMT weights and LoRA deltas, resumable."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from hmt_core import HMTModel, InvalidInputError, SamplingParams
from hmt_core.testing import tiny_backbone_config
from hmt_lab.chat_recipe import ChatRecipe, build_chat_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def chat_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with the demo's tokenizer and chat template (a stand-in for SmolLM2)."""
    directory = tmp_path_factory.mktemp("backbone")
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "models" / "hmt-demo")
    AutoModelForCausalLM.from_config(tiny_backbone_config("llama", vocab_size=len(tokenizer))).save_pretrained(
        directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_build_chat_model_trains_ships_deltas_and_resumes(tmp_path: Path, chat_backbone: Path) -> None:
    chapters = (ROOT / "models" / "hmt-demo" / "held_out.txt").read_text().split("\n")
    texts = (["\n\n".join(chapters[:40])], ["\n\n".join(chapters[40:])])
    recipe = ChatRecipe(backbone=str(chat_backbone), served_name="tiny-chat", segment_tokens=32, num_sensory=4,
                        ltm_context=8, recall_dim=16, stage1_segments=2, stage1_steps=2, stage2_segments=6,
                        stage2_steps=3, bptt_depth=2, max_book_tokens=20_000)
    card = build_chat_model(tmp_path / "chat", recipe, progress=False, texts=texts)
    out = tmp_path / "chat"
    meta = json.loads((out / "hmt_config.json").read_text())
    assert meta["backbone"] == str(chat_backbone) and meta["backbone_deltas"] == "backbone_deltas.safetensors"
    assert not (out / "model.safetensors").exists()
    assert card["name"] == json.loads((out / "model_card.json").read_text())["name"] == "tiny-chat"
    model = HMTModel.from_pretrained(out)
    assert model.fingerprint == card["fingerprint"] and len(model.backbone_deltas) == 2  # one per stage
    log = json.loads((tmp_path / "chat.work" / "stage2" / "train_log.json").read_text())
    assert log["config"]["memory_bow_weight"] == recipe.memory_bow_weight and len(log["losses"]) == 3
    prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": "Who made the light?"}],
                                                 tokenize=False, add_generation_prompt=True)
    state = model.append(model.new_session(), model.tokenizer.encode(prompt, add_special_tokens=False))
    assert len(model.generate(state, SamplingParams(max_tokens=5, ignore_eos=True)).run().tokens) == 5
    # a rerun reuses the finished phases (same weights), and refuses phases trained otherwise
    again = build_chat_model(tmp_path / "chat", recipe, progress=False, texts=texts)
    assert again["fingerprint"] == card["fingerprint"]
    # reloaded from its run directory, stage 2 still refers to the original backbone, not the run's copy
    assert json.loads((out / "hmt_config.json").read_text())["backbone"] == str(chat_backbone)
    assert HMTModel.from_pretrained(out).fingerprint == card["fingerprint"]
    with pytest.raises(InvalidInputError, match="trained with other settings"):
        build_chat_model(tmp_path / "chat", replace(recipe, stage1_lr=1e-3), progress=False, texts=texts)


def test_a_backbone_without_a_chat_template_is_refused(tmp_path: Path) -> None:
    from hmt_core.testing import tiny_hmt_model

    tiny_hmt_model().backbone.save_pretrained(tmp_path / "plain")
    with pytest.raises(InvalidInputError, match="no tokenizer with a chat template"):
        build_chat_model(tmp_path / "out", ChatRecipe(backbone=str(tmp_path / "plain")), progress=False,
                         texts=(["text"], []))
