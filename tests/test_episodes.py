"""The episode trainer (hmt_lab.episodes): the episodes it builds, the recall loss's target, exact resume, and
that a tiny model learns to recall a pass key several segments back with it."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from hmt_core import HMTConfig, HMTModel
from hmt_core.errors import InvalidInputError
from hmt_core.testing import SAMPLE_TEXTS, tiny_hmt_model
from hmt_core.tokenizer import train_bpe_tokenizer
from hmt_lab.episodes import (
    EpisodeConfig,
    build_episode,
    build_fact_episode,
    episode_losses,
    eval_facts,
    question_bank,
    step_data,
    train_episodes,
)
from hmt_lab.exercises import (
    HELD_OUT_FACTS,
    TRAINING_FACTS,
    TRAINING_WORDINGS,
    ChatFiller,
    FactTemplate,
    PasskeyWording,
    encoder,
    fact_value,
)

SHORT = PasskeyWording("", "key is {key}.", "key is")  # fits the tiny models' segments


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return train_bpe_tokenizer([*SAMPLE_TEXTS, "0123456789 key is"], vocab_size=300)


@pytest.fixture(scope="module")
def stream(tok) -> list[int]:  # type: ignore[no-untyped-def]
    return encoder(tok)(" ".join(SAMPLE_TEXTS))


def tiny(tok, segment_tokens: int = 32, hidden: int = 32, seed: int = 0) -> HMTModel:  # type: ignore[no-untyped-def]
    model = tiny_hmt_model("llama", HMTConfig(segment_tokens=segment_tokens, num_sensory=4, ltm_context=16,
                                              recall_dim=16), vocab_size=len(tok), seed=seed,
                           hidden_size=hidden, intermediate_size=2 * hidden)
    model.tokenizer = tok
    return model


# ----- the episodes ---------------------------------------------------------------------------------------


def test_no_query_reads_an_answer_token(tok, stream) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(0)
    for _ in range(300):
        episode = build_episode(tok, rng, 128, 64, rng.sample(range(1, 9), 3), stream, TRAINING_WORDINGS[2:3], [])
        for q in episode.questions:
            assert q.query_end <= q.answer_start and q.query_end <= 64
            assert min(q.value_positions) >= q.answer_start
            assert [q.tokens[i] for i in q.value_positions] == episode.values  # the scored tokens are the key's
            assert len(q.tokens) <= 128 and q.tokens[-1] == q.tokens[max(q.value_positions) + 1]  # cut after "."


def test_offsets_spread_over_the_whole_segment(tok, stream) -> None:  # type: ignore[no-untyped-def]
    """Key lines and questions land anywhere: each quarter of the possible offsets gets its share."""
    rng = random.Random(1)
    key_quarters: Counter[int] = Counter()
    question_quarters: Counter[int] = Counter()
    for _ in range(400):
        episode = build_episode(tok, rng, 128, 64, [1], stream, [SHORT], [])
        line = len(encoder(tok)(" " + SHORT.line(episode.key)))
        key_quarters[4 * episode.key_start // (128 - line + 1)] += 1
        q = episode.questions[0]
        room = 128 - (len(q.tokens) - q.answer_start) - len(encoder(tok)(" " + SHORT.question))
        question_quarters[4 * (q.answer_start - len(encoder(tok)(" " + SHORT.question))) // (room + 1)] += 1
    for quarters in (key_quarters, question_quarters):
        assert sorted(quarters) == [0, 1, 2, 3]
        assert min(quarters.values()) >= 60, quarters  # 100 expected each


def test_short_rows_hold_the_key_and_the_question_within_their_lengths(tok, stream) -> None:  # type: ignore[no-untyped-def]
    model = tiny(tok)
    config = EpisodeConfig(stage="A", episodes_per_step=6, key_digits=3, write_tokens=20, question_tokens=16)
    starts: set[int] = set()
    for step in range(10):
        data = step_data(model, config, step, stream, [SHORT], [])
        for episode in data.episodes:
            assert len(episode.write) == 20
            line = encoder(tok)(" " + SHORT.line(episode.key))
            assert episode.write[episode.key_start:episode.key_start + len(line)] == line
            for q in episode.questions:
                assert len(q.tokens) <= 16 and q.query_end <= q.answer_start
                starts.add(q.answer_start)
        assert all(len(segment) == 32 for segment in data.chain)  # the distractors stay full segments
    assert len(starts) >= 3  # the question's offset still varies
    losses = episode_losses(model, step_data(model, config, 0, stream, [SHORT], []), config)
    assert math.isfinite(float(losses.total))
    for bad in ({"write_tokens": 0}, {"question_tokens": -1}):
        with pytest.raises(InvalidInputError, match="must be >= 1"):
            EpisodeConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match=r"write_tokens must be in 1\.\.32"):
        build_episode(tok, random.Random(0), 32, 16, [1], stream, [SHORT], [], write_tokens=33)


def test_distances_are_as_asked(tok, stream) -> None:  # type: ignore[no-untyped-def]
    model = tiny(tok)
    config = EpisodeConfig(stage="A", min_distance=3, max_distance=7, questions=3, episodes_per_step=4,
                           key_digits=3, max_history=2)
    seen: set[int] = set()
    histories: set[int] = set()
    for step in range(20):
        data = step_data(model, config, step, stream, [SHORT], [])
        histories.add(data.history)
        longest = max(q.distance for e in data.episodes for q in e.questions)
        assert len(data.chain) == data.history + longest - 1  # every question has its distractors
        for episode in data.episodes:
            distances = [q.distance for q in episode.questions]
            assert distances == sorted(set(distances)) and len(distances) == 3
            assert all(3 <= d <= 7 for d in distances)
            assert len(episode.write) == 32 and 100 <= episode.key < 1000
            seen.update(distances)
    assert seen == {3, 4, 5, 6, 7}
    assert histories == {0, 1, 2}  # 0: the key in a session's first segment
    assert step_data(model, config, 5, stream, [SHORT], []) == step_data(model, config, 5, stream, [SHORT], [])


# ----- chat facts (stage C) --------------------------------------------------------------------------------


def test_fact_episodes_score_the_value_and_no_query_reads_the_reply(tok) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(3)
    filler = ChatFiller(tok, SAMPLE_TEXTS, rng)
    training_values = {v for template in TRAINING_FACTS for v in _fact_values(template)}
    offsets: list[float] = []
    for i in range(200):
        session_start = i % 2 == 0
        episode = build_fact_episode(tok, rng, 128, 64, [1, 4], filler, session_start, write_tokens=100,
                                     question_tokens=100)
        assert len(episode.write) == 100 and isinstance(episode.key, str)
        assert episode.key in training_values or episode.key.isdigit()  # never a held-out value
        text = tok.decode(episode.write)
        statement = text[text.index("<|im_start|>user\n", tok.decode(episode.write[:episode.key_start]).__len__()):]
        assert episode.key in statement.split("<|im_end|>")[0]  # the first turn after key_start states it
        if session_start:  # the session's first turn: nothing before it
            assert episode.key_start == 0 and text.startswith("<|im_start|>user\n")
        else:  # after the end of an earlier exchange, anywhere in the row
            assert _after_an_exchange(tok.decode(episode.write[:episode.key_start]))
            offsets.append(episode.key_start / 100)
        for q in episode.questions:
            assert q.query_end <= q.answer_start and q.query_end <= 64  # the query never reads the reply
            prompt, reply = tok.decode(q.tokens[:q.answer_start]), tok.decode(q.tokens[q.answer_start:])
            assert prompt.endswith("<|im_start|>assistant\n") and episode.key in reply
            assert episode.key in tok.decode([q.tokens[t] for t in q.value_positions])
            assert [q.tokens[t] for t in q.value_positions] == episode.values
            before_question = prompt[:prompt.rindex("<|im_start|>user\n")]
            assert _after_an_exchange(before_question)
    assert min(offsets) < 0.1 and max(offsets) > 0.4  # spread over the row, not at one place


def _after_an_exchange(text: str) -> bool:
    """The tail of a finished exchange (maybe just the end of its turn-end line), or nothing."""
    return text.endswith("<|im_end|>\n") or "<|im_end|>\n".endswith(text)


def _fact_values(template: FactTemplate) -> set[str]:
    rng = random.Random(0)
    return {fact_value(template, rng, held_out=False) for _ in range(400)}


def test_held_out_facts_are_asked_at_every_distance(tok) -> None:  # type: ignore[no-untyped-def]
    items = eval_facts(tok, 128, [1, 4], 8, SAMPLE_TEXTS, seed=0)
    questions = {template.question for template in HELD_OUT_FACTS}
    first_turns = 0
    for item in items:
        assert len(item.segments) == item.key_segment + 4 and {len(s) for s in item.segments} == {128}
        read = tok.decode([t for segment in item.segments[:item.key_segment + 1] for t in segment])
        assert str(item.key) in read and str(item.key) not in tok.decode(item.segments[-1])
        first_turns += read.startswith("<|im_start|>user\n")
        for head, answer in item.questions.values():
            assert any(question in tok.decode(head) for question in questions)
            assert str(item.key) in tok.decode([answer[i] for i in item.value_indices])
    assert 0 < first_turns < len(items)  # as a new chat states it, and after earlier exchanges


def test_a_chat_step_reads_one_conversation_and_stage_c_mixes_in_pass_keys(  # type: ignore[no-untyped-def]
        tok, stream, tmp_path: Path) -> None:
    model = tiny(tok, segment_tokens=128)
    config = EpisodeConfig(stage="C", fact_share=1.0, episodes_per_step=2, max_distance=3, bf16=False)
    data = step_data(model, config, 0, stream, passages=SAMPLE_TEXTS)
    assert data.facts and all(isinstance(e.key, str) for e in data.episodes)
    conversation = tok.decode([t for row in [*data.chain, data.plain] for t in row])
    assert conversation.count("<|im_start|>user\n") >= 2  # distractors and the LM row: a chat, not a book
    losses = episode_losses(model, data, config)
    assert all(math.isfinite(v) for v in losses.parts.values())
    kinds = {step_data(model, EpisodeConfig(stage="C"), step, stream, passages=SAMPLE_TEXTS).facts
             for step in range(12)}
    assert kinds == {True, False}  # half the steps replay pass keys
    assert EpisodeConfig(stage="C").distances == (1, 16) and EpisodeConfig().facts == 0.0
    with pytest.raises(InvalidInputError, match="fact_share"):
        EpisodeConfig(fact_share=1.5)
    with pytest.raises(InvalidInputError, match="needs book passages"):
        train_episodes(model, stream, EpisodeConfig(stage="C"), tmp_path / "none")
    run = train_episodes(tiny(tok, segment_tokens=128), stream,
                         EpisodeConfig(stage="C", steps=2, episodes_per_step=2, max_distance=3, eval_every=2,
                                       eval_distances=(1, 4), eval_keys=2), tmp_path / "run",
                         passages=SAMPLE_TEXTS, eval_passages=SAMPLE_TEXTS)
    last = run.log[-1]
    assert {entry["kind"] for entry in run.log} <= {"facts", "passkey"}
    assert set(last["eval_facts_fp32"]["value_loss"]) == set(last["eval_fp32"]["digit_loss"]) == {"1", "4"}


def test_the_recall_target_is_the_write_memory() -> None:
    distractors = torch.arange(10.0)[:, None].expand(10, 4)
    written = torch.full((4,), -1.0)
    for history, distance in ((1, 1), (2, 3), (3, 5)):
        bank = question_bank(distractors, written, history, distance)
        assert bank.shape[0] == history + distance  # the history, the write, then distance - 1 distractors
        assert torch.equal(bank[history], written)
        assert bank[:history, 0].tolist() == list(range(history))
        assert bank[history + 1:, 0].tolist() == list(range(history, history + distance - 1))


def test_every_loss_reaches_what_it_trains(tok, stream) -> None:  # type: ignore[no-untyped-def]
    model = tiny(tok)
    config = EpisodeConfig(stage="A", max_distance=3, key_digits=3, bf16=False)
    model.requires_grad_(True)
    losses = episode_losses(model, step_data(model, config, 0, stream, [SHORT], []), config)
    assert set(losses.parts) >= {"answer", "recall", "bow", "value_bow", "lm", "total", "recall_weight"}
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.parts.values())
    losses.total.backward()
    for param in (model.recall_wq.weight, model.recall_wk.weight, model.summary_prompt):
        assert param.grad is not None and param.grad.abs().sum() > 0


def test_the_attention_loss_raises_the_answers_attention_to_the_memory_prompt(tok, stream) -> None:  # type: ignore[no-untyped-def]
    model = tiny(tok)
    config = EpisodeConfig(stage="A", max_distance=3, key_digits=3, bf16=False, answer_weight=0.0,
                           recall_weight=0.0, bow_weight=0.0, value_bow_weight=0.0, lm_weight=0.0,
                           attention_weight=1.0, attention_target=0.9)
    data = step_data(model, config, 0, stream, [SHORT], [])
    model.requires_grad_(True)
    before = episode_losses(model, data, config)
    assert 0.0 < before.parts["attention"] < 0.9
    assert before.parts["total"] == pytest.approx(math.log(0.9) - math.log(before.parts["attention"]), rel=1e-4)
    optimizer = torch.optim.Adam(model.backbone.parameters(), lr=1e-2)
    for _ in range(5):
        optimizer.zero_grad()
        episode_losses(model, data, config).total.backward()
        optimizer.step()
    after = episode_losses(model, data, config).parts["attention"]
    assert after > 1.5 * before.parts["attention"]
    assert model.base_model.config._attn_implementation != "eager"  # the eager read was for the questions only


# ----- resume ----------------------------------------------------------------------------------------------


def _config(**overrides: object) -> EpisodeConfig:
    base = {"stage": "A", "steps": 6, "max_distance": 3, "key_digits": 3, "backbone_training": "lora",
            "lora_r": 2, "eval_every": 3, "eval_distances": (1, 3), "eval_keys": 2, "bf16": False,
            "warmup_steps": 2}
    return EpisodeConfig(**{**base, **overrides})  # type: ignore[arg-type]


def _trained(model: HMTModel) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def test_a_resumed_run_equals_an_uninterrupted_one(tok, stream, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    whole = tiny(tok)
    whole_run = train_episodes(whole, stream, _config(), tmp_path / "whole", wordings=[SHORT], fillers=[],
                               eval_wording=SHORT)
    first = tiny(tok)
    assert train_episodes(first, stream, _config(), tmp_path / "split", stop_after=4, wordings=[SHORT],
                          fillers=[], eval_wording=SHORT).steps_done == 4
    second = tiny(tok)  # a fresh process: the same starting model, the checkpoint in the directory
    split_run = train_episodes(second, stream, _config(), tmp_path / "split", wordings=[SHORT], fillers=[],
                               eval_wording=SHORT)
    assert split_run.steps_done == whole_run.steps_done == 6
    expected, got = _trained(whole), _trained(second)
    assert expected.keys() == got.keys() and any("lora_B" in name for name in got)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    strip = [{k: v for k, v in entry.items() if k != "seconds"} for entry in whole_run.log]
    assert strip == [{k: v for k, v in entry.items() if k != "seconds"} for entry in split_run.log]
    assert "eval_fp32" in split_run.log[2] and "eval_fp32" in split_run.log[5]


def test_a_run_resumes_from_its_carry_file(tok, stream, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    carry = tmp_path / "carry.pt"
    first = tiny(tok)
    train_episodes(first, stream, _config(), tmp_path / "one", stop_after=3, carry=carry, wordings=[SHORT],
                   fillers=[], eval_wording=SHORT)
    assert carry.is_file()
    second = tiny(tok)  # another machine: no checkpoint directory, only the carry file
    run = train_episodes(second, stream, _config(), tmp_path / "two", stop_after=1, carry=carry, wordings=[SHORT],
                         fillers=[], eval_wording=SHORT)
    assert run.steps_done == 4 and run.log[-1]["step"] == 4


def test_a_checkpoint_of_another_model_is_refused(tok, stream, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from hmt_core.errors import CheckpointError

    model = tiny(tok)
    train_episodes(model, stream, _config(), tmp_path / "run", stop_after=1, wordings=[SHORT], fillers=[],
                   eval_wording=SHORT)
    other = tiny(tok, hidden=48)
    with pytest.raises(CheckpointError, match="does not fit"):
        train_episodes(other, stream, _config(), tmp_path / "run", stop_after=1, wordings=[SHORT], fillers=[],
                       eval_wording=SHORT)


def test_question_rows_batch_by_length() -> None:
    from hmt_lab.episodes import length_groups

    lengths = [40, 12, 200, 45, 13, 250, 100]
    groups = length_groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        assert max(lengths[i] for i in group) <= 1.25 * min(lengths[i] for i in group)
    assert [sorted(lengths[i] for i in g) for g in groups] == [[12, 13], [40, 45], [100], [200, 250]]


def test_sigterm_stops_after_the_step_with_a_checkpoint(tok, stream, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import os
    import signal

    def stop_at_two(entry: dict) -> None:
        if entry["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # what `kill <pid>` does to a background run

    carry = tmp_path / "carry.pt"
    run = train_episodes(tiny(tok), stream, _config(eval_every=0), tmp_path / "run", carry=carry, progress=stop_at_two,
                         wordings=[SHORT], fillers=[], eval_wording=SHORT)
    assert run.steps_done == 2 and [e["step"] for e in run.log] == [1, 2]
    assert (tmp_path / "run" / "checkpoint-2" / "trainer_state.pt").is_file() and carry.is_file()
    assert torch.load(carry, weights_only=True)["step"] == 2
    assert signal.getsignal(signal.SIGTERM) is not None  # the previous handler is back


# ----- learning: a tiny random model, a pass key 4 and 8 segments back ------------------------------------

LEARN_STEPS = 400
LEARN_ROWS = 8  # episodes per step for the episode trainer, sequences per step for the old one


def learner(tok) -> HMTModel:  # type: ignore[no-untyped-def]
    """64-wide, 2 layers, 16-token segments, 2 sensory tokens: the key can only reach a question through memory."""
    model = tiny_hmt_model("llama", HMTConfig(segment_tokens=16, num_sensory=2, ltm_context=16, recall_dim=32,
                                              memory_input_scale=0.05),
                           vocab_size=len(tok), seed=0, hidden_size=64, intermediate_size=128)
    model.tokenizer = tok
    return model


def old_trainer_rows(tok, stream: list[int], rows: int, segments: int) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    """Pass-key rows as `hmt train` reads them: key line, 1-4 segments, question, answer, filler to the row's end;
    every token scored, the answer's digits 8 times as much (the old recipe weighted answers up)."""
    from hmt_lab.exercises import FillerStream, build_passkey_prompt, value_token_indices

    rng = random.Random(7)
    encode = encoder(tok)
    samples, weights = [], []
    for _ in range(rows):
        key = rng.randrange(10, 100)
        built = build_passkey_prompt(tok, key, rng.randint(1, 4), 16, rng, SHORT, stream)
        answer = encode(f" {key}.")
        tokens = (built.tokens + answer + FillerStream(stream, rng).take(16 * segments))[:16 * segments]
        weight = [1.0] * len(tokens)
        for i in value_token_indices(tok, answer):
            weight[len(built.tokens) + i] = 8.0
        samples.append(tokens)
        weights.append(weight)
    return torch.tensor(samples), torch.tensor(weights)


@pytest.mark.slow
def test_a_tiny_model_learns_a_pass_key_4_and_8_segments_back_where_the_old_trainer_does_not(  # type: ignore[no-untyped-def]
        tok, stream, tmp_path: Path) -> None:
    """Same model, same optimizer steps and rows per step. The old trainer backpropagates through every segment of
    its rows (more compute per step); the episode trainer reads 1-4 segments apart without it. Questions at 4 and 8
    segments, 8 beyond anything either trained on."""
    from hmt_lab.episodes import eval_keys, evaluate_keys
    from hmt_lab.train import TrainConfig, train

    torch.set_num_threads(1)  # tiny matmuls: OpenMP barriers only cost time on a loaded machine
    keys = eval_keys(tok, 16, (4, 8), 32, stream, seed=11, wording=SHORT, key_digits=2)
    config = EpisodeConfig(stage="A", min_distance=1, max_distance=4, questions=2, episodes_per_step=LEARN_ROWS,
                           steps=LEARN_STEPS, key_digits=2, max_history=2, value_bow_weight=1.0, bow_weight=0.0,
                           lm_weight=0.0, backbone_training="full", lr_hmt=1e-3, lr_backbone=1e-3, warmup_steps=10,
                           eval_every=0, bf16=False)
    episodic = learner(tok)
    train_episodes(episodic, stream, config, tmp_path / "episodes", wordings=[SHORT], fillers=[])
    new = evaluate_keys(episodic, keys)

    old = learner(tok)
    samples, weights = old_trainer_rows(tok, stream, LEARN_ROWS * LEARN_STEPS, segments=7)
    train(old, samples, TrainConfig(stage=2, steps=LEARN_STEPS, batch_size=LEARN_ROWS, segments_per_sample=7,
                                    bptt_depth=7, backbone_training="full", learning_rate=1e-3, warmup_steps=10,
                                    save_every=10 * LEARN_STEPS), tmp_path / "old", progress=False, weights=weights)
    before = evaluate_keys(learner(tok), keys)
    got = evaluate_keys(old, keys)
    print("untrained", before, "episode trainer", new, "old trainer", got)
    chance = math.log(10)
    for distance in (4, 8):
        assert new["digit_loss"][distance] < 0.5 * chance  # the key's digits, read from memory
        assert new["accuracy"][distance] >= 0.25  # every digit the argmax, for a quarter of 32 held-out keys
        assert got["digit_loss"][distance] > 0.8 * chance  # the old trainer: about chance


def test_the_cli_trains_the_chat_model_on_short_rows_and_writes_a_model_eval_can_read(  # type: ignore[no-untyped-def]
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`hmt train-episodes` end to end on the shipped chat model and the real book corpus: stage C's two kinds of
    step on short rows (a chat fact in SmolLM2's template, then a pass key), then the finished model carries the
    held-out text that `hmt eval` reads when given no --data."""
    from hmt_lab import cli

    shipped = Path(__file__).resolve().parents[1] / "models" / "hmt-smollm2"
    out, finished = tmp_path / "run", tmp_path / "model"
    args = ["train-episodes", "--model", str(shipped), "--out", str(out), "--steps", "2", "--episodes-per-step", "1",
            "--stage", "C", "--fact-share", "0.5", "--seed", "2", "--max-distance", "2",
            "--questions", "1", "--max-history", "1", "--write-tokens", "64", "--question-tokens", "48",
            "--eval-every", "0", "--sink-token", "0", "--memory-input-scale", "0.0625", "--max-book-tokens", "20000",
            "--finish", str(finished), "--device", "cpu"]
    assert cli.main([args[0], "--model", str(shipped), "--out", str(out), "--write-tokens", "0"]) == 2
    assert "write_tokens must be >= 1" in capsys.readouterr().err
    assert cli.main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    steps = [json.loads(line) for line in lines[:-1]]
    assert [step["kind"] for step in steps] == ["facts", "passkey"]  # seed 2's draws
    for step in steps:
        assert all(math.isfinite(step[k]) for k in ("answer", "recall", "value_bow", "lm"))
    written = json.loads(lines[-1])
    model = HMTModel.from_pretrained(finished)
    assert written["fingerprint"] == model.fingerprint != HMTModel.from_pretrained(shipped).fingerprint
    assert model.hmt_config.sink_token == 0
    held_out = (finished / "held_out.txt").read_text()
    assert "Call me Ishmael" in held_out and len(held_out) > 100_000  # Moby-Dick, kept out of training
