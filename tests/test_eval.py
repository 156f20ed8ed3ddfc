"""`hmt eval`: perplexity table and plot, pass-key prompt builder, scorer and report."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hmt_core import HMTModel
from hmt_core.temp_lora import TempLoRAConfig, score_document
from hmt_core.testing import SAMPLE_TEXTS, tiny_hmt_model
from hmt_lab.evaluate import (
    build_passkey_prompt,
    key_digit_loss,
    passkey,
    passkey_answer_correct,
    passkey_trials,
    perplexity,
    plot_loss_by_position,
)


def test_perplexity_report_and_plot(text_model: HMTModel, tmp_path: Path) -> None:
    docs = torch.randint(0, text_model.vocab_size, (3, 5 * 8), generator=torch.Generator().manual_seed(0))
    report = perplexity({"window": text_model, "rmt": text_model, "hmt": text_model, "full": text_model}, docs,
                        batch_size=2)
    assert set(report.loss) == {"window", "rmt", "hmt", "full"}
    with torch.no_grad():
        full_logits = text_model.backbone(input_ids=docs).logits
    full = torch.nn.functional.cross_entropy(full_logits[:, :-1].flatten(0, 1), docs[:, 1:].flatten())
    assert report.loss["full"] == pytest.approx(float(full), rel=1e-4)
    assert all(len(v) == 5 for v in report.loss_by_segment.values())
    # the overall loss is the token-weighted mean of the per-segment losses, and matches a direct computation
    with torch.no_grad():
        logits = text_model.score(docs).logits
    direct = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), docs[:, 1:].flatten())
    assert report.loss["hmt"] == pytest.approx(float(direct), rel=1e-4)
    assert report.perplexity["hmt"] == pytest.approx(math.exp(report.loss["hmt"]))
    assert report.loss["window"] != report.loss["hmt"]
    # the windowed reader of an HMT model is the bare backbone on each L-token segment alone
    with torch.no_grad():
        alone = torch.cat([text_model.backbone(input_ids=docs[:, i:i + 8]).logits for i in range(0, 40, 8)], dim=1)
    windowed = torch.nn.functional.cross_entropy(alone[:, :-1].flatten(0, 1), docs[:, 1:].flatten())
    assert report.loss["window"] == pytest.approx(float(windowed), rel=1e-4)
    table = report.table()
    assert "HMT" in table and "window" in table and "| perplexity |" in table
    png = plot_loss_by_position(report, tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_temp_lora_reader_reads_each_document_with_its_own_adapter(text_model: HMTModel) -> None:
    seg = text_model.hmt_config.segment_tokens
    docs = torch.randint(0, text_model.vocab_size, (3, 4 * seg), generator=torch.Generator().manual_seed(1))
    cfg = TempLoRAConfig(context_tokens=3, learning_rate=1e-2)
    report = perplexity({"window": text_model, "temp-lora": text_model}, docs, batch_size=2, temp_lora=cfg)
    # batches of documents never share an adapter: the same as each document read alone
    direct = torch.stack([score_document(text_model.backbone, doc.tolist(), cfg, seg) for doc in docs]).mean()
    assert report.loss["temp-lora"] == pytest.approx(float(direct), rel=1e-4)
    # the first chunk is read before any training, with no context: the windowed backbone's reading
    assert report.loss_by_segment["temp-lora"][0] == pytest.approx(report.loss_by_segment["window"][0], rel=1e-5)
    assert report.loss_by_segment["temp-lora"][1:] != report.loss_by_segment["window"][1:]
    assert set(report.seconds_per_segment) == {"window", "temp-lora"}
    assert all(s > 0 for s in report.seconds_per_segment.values())


def test_hmt_with_temp_lora_reader_reads_hmt_weights_with_an_adapter(text_model: HMTModel) -> None:
    seg = text_model.hmt_config.segment_tokens
    docs = torch.randint(0, text_model.vocab_size, (3, 4 * seg), generator=torch.Generator().manual_seed(2))
    cfg = TempLoRAConfig(learning_rate=1e-2)
    report = perplexity({"hmt": text_model, "hmt+temp-lora": text_model}, docs, batch_size=2, temp_lora=cfg)
    both = text_model.with_memory("hmt+temp-lora", cfg)
    logits = torch.cat([both.score(docs[i:i + 2]).logits for i in (0, 2)]).float()
    direct = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), docs[:, 1:])
    assert report.loss["hmt+temp-lora"] == pytest.approx(float(direct), rel=1e-4)
    # the first segment is read before any commit trained the adapter: HMT's own reading
    assert report.loss_by_segment["hmt+temp-lora"][0] == pytest.approx(report.loss_by_segment["hmt"][0], rel=1e-5)
    assert report.loss_by_segment["hmt+temp-lora"][1:] != report.loss_by_segment["hmt"][1:]


def test_passkey_scorer() -> None:
    assert passkey_answer_correct(48213, " 48213. Remember it.")
    assert passkey_answer_correct(48213, "48213")
    assert not passkey_answer_correct(48213, " 4821")
    assert not passkey_answer_correct(48213, " 482134")
    assert not passkey_answer_correct(48213, " the key")


def test_passkey_report_runs_every_reader(text_model: HMTModel) -> None:
    report = passkey(text_model, distances=[1, 70], trials=1, seed=1, readers=("window", "full", "hmt"))
    assert set(report.accuracy) == {"window", "full", "hmt"}
    # 70 segments of 8 tokens are beyond the tiny backbone's positions: the full-context reader has none
    assert report.accuracy["full"][70] is None and report.accuracy["full"][1] is not None
    assert "beyond context" in report.table()
    report = passkey(text_model, distances=[1, 2], trials=2, seed=1)
    assert set(report.accuracy) == {"window", "hmt"}
    # the bare readers can read another model's backbone (the bare one, for a LoRA-trained model)
    other = tiny_hmt_model("llama", text_model.hmt_config, vocab_size=text_model.vocab_size, seed=7)
    other.tokenizer = text_model.tokenizer
    rebased = passkey(text_model, distances=[1, 2], trials=2, seed=1, baseline=other, readers=("window",))
    assert rebased.digit_loss["window"] != report.digit_loss["window"]
    assert all(0.0 <= a <= 1.0 for by_d in report.accuracy.values() for a in by_d.values())
    assert "1 seg" in report.table() and "2 seg" in report.table()
    assert set(report.digit_loss) == {"window", "hmt"}
    assert all(0.0 < loss < 20.0 for by_d in report.digit_loss.values() for loss in by_d.values())


def test_passkey_temp_lora_reader_reads_the_prompt_as_a_temp_lora_session(text_model: HMTModel) -> None:
    cfg = TempLoRAConfig(learning_rate=1e-2, context_tokens=3)
    readers = ("window", "temp-lora", "hmt+temp-lora")
    report = passkey(text_model, distances=[2], trials=2, seed=3, readers=readers, temp_lora=cfg)
    assert set(report.accuracy) == set(readers)
    # its digit loss is the session's: a Temp-LoRA session of the bare backbone that appended the prompt
    prompt = passkey_trials(text_model.tokenizer, [2], 2, text_model.hmt_config.segment_tokens, seed=3)[2]
    sessions = HMTModel(text_model.backbone, dataclasses.replace(text_model.hmt_config, memory="temp-lora",
                                                                 temp_lora=cfg), text_model.tokenizer)
    expected = [key_digit_loss(sessions, p.tokens, p.key, "temp-lora") for p in prompt]
    assert report.digit_loss["temp-lora"][2] == pytest.approx(sum(expected) / 2, rel=1e-5)  # type: ignore[arg-type]
    assert report.digit_loss["temp-lora"][2] != report.digit_loss["window"][2]
    both = text_model.with_memory("hmt+temp-lora", cfg)  # the HMT model's sessions, with an adapter
    expected = [key_digit_loss(both, p.tokens, p.key, "hmt+temp-lora") for p in prompt]
    assert report.digit_loss["hmt+temp-lora"][2] == pytest.approx(sum(expected) / 2, rel=1e-5)  # type: ignore[arg-type]


def test_key_digit_loss_is_the_teacher_forced_loss_of_the_digits(text_model: HMTModel) -> None:
    tokenizer = text_model.tokenizer
    prompt = build_passkey_prompt(tokenizer, 48213, 1, text_model.hmt_config.segment_tokens).tokens
    answer = tokenizer.encode(" 48213")
    digits = [i for i, t in enumerate(answer) if tokenizer.decode([t]).strip().isdigit()]
    assert len(digits) >= 1
    logits = text_model.score(torch.tensor([prompt + answer])).logits[0].float()
    nll = -torch.log_softmax(logits, -1)[[len(prompt) + i - 1 for i in digits], [answer[i] for i in digits]]
    assert key_digit_loss(text_model, prompt, 48213, "hmt") == pytest.approx(float(nll.mean()), rel=1e-4)
    window = key_digit_loss(text_model, prompt, 48213, "window")
    assert window > 0 and window != pytest.approx(float(nll.mean()))


def test_eval_cli_writes_table_json_and_plot(text_model: HMTModel, tmp_path: Path) -> None:
    text_model.save_pretrained(tmp_path / "m")
    (tmp_path / "held_out.txt").write_text(" ".join(SAMPLE_TEXTS))
    base = [sys.executable, "-m", "hmt_lab.cli", "eval", "--model", str(tmp_path / "m"), "--data",
            str(tmp_path / "held_out.txt"), "--doc-segments", "4", "--docs", "2"]
    table = subprocess.run([*base, "--plot", str(tmp_path / "p.png")], capture_output=True, text=True, timeout=300)
    assert table.returncode == 0, table.stderr
    assert "| HMT |" in table.stdout and (tmp_path / "p.png").exists()
    machine = subprocess.run([*base, "--json"], capture_output=True, text=True, timeout=300)
    assert set(json.loads(machine.stdout)["perplexity"]) == {"window", "rmt", "hmt"}
    with_lora = subprocess.run([*base, "--json", "--temp-lora", "--temp-lora-steps", "1"], capture_output=True,
                               text=True, timeout=300)
    assert with_lora.returncode == 0, with_lora.stderr
    assert set(json.loads(with_lora.stdout)["seconds_per_segment"]) == {"window", "rmt", "hmt", "temp-lora",
                                                                        "hmt+temp-lora"}
    keys = subprocess.run([sys.executable, "-m", "hmt_lab.cli", "eval", "passkey", "--model", str(tmp_path / "m"),
                           "--distances", "1", "--trials", "1", "--json"], capture_output=True, text=True, timeout=300)
    assert keys.returncode == 0, keys.stderr
    assert set(json.loads(keys.stdout)["accuracy"]) == set(json.loads(keys.stdout)["digit_loss"]) == {"window", "hmt"}
