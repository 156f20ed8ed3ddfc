"""Memory exercises and probes: random offsets, held-out wording and facts, exact lengths."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from transformers import PreTrainedTokenizerFast

from hmt_core import InvalidInputError
from hmt_lab.evaluate import passkey_trials
from hmt_lab.exercises import (
    HELD_OUT_FACTS,
    HELD_OUT_WORDINGS,
    PASSKEY_QUESTION,
    STANDARD_WORDING,
    TRAINING_FACTS,
    TRAINING_WORDINGS,
    build_passkey_prompt,
    chat_fact,
    chat_fact_exercise,
    fact_recalled,
    fact_value,
    passkey_answer_correct,
    passkey_exercise,
)

SEG = 16


@pytest.mark.parametrize("distance", [0, 1, 3, 8])
def test_passkey_prompt_places_key_and_question(tokenizer: PreTrainedTokenizerFast, distance: int) -> None:
    for seed in range(5):
        prompt = build_passkey_prompt(tokenizer, 48213, distance, SEG, random.Random(seed))
        text = tokenizer.decode(prompt.tokens)
        assert text.startswith("There is an important info hidden inside a lot of irrelevant text.")
        assert STANDARD_WORDING.line(48213) in text and text.endswith(PASSKEY_QUESTION)
        assert text.index(STANDARD_WORDING.line(48213)) < text.index(PASSKEY_QUESTION)
        assert tokenizer.decode(prompt.tokens[prompt.key_position:]).lstrip().startswith("The pass key is 48213.")
        assert tokenizer.decode(prompt.tokens[prompt.question_position:]).strip() == PASSKEY_QUESTION
        assert prompt.distance_segments(SEG) == distance


def test_passkey_offsets_are_random_relative_to_segments(tokenizer: PreTrainedTokenizerFast) -> None:
    """Key and question land all over their segments: no fixed layout to learn."""
    prompts = [p for ps in passkey_trials(tokenizer, [1, 2, 4], 40, SEG, seed=3).values() for p in ps]
    question_offsets = Counter(p.question_position % SEG for p in prompts)
    key_offsets = Counter(p.key_position % SEG for p in prompts)
    assert len(question_offsets) >= SEG - 2 and len(key_offsets) >= SEG - 2
    assert max(question_offsets.values()) < len(prompts) / 4
    assert all(p.distance_segments(SEG) == d for d, ps in passkey_trials(tokenizer, [1, 2, 4], 10, SEG, 4).items()
               for p in ps)


def test_a_layout_memorizing_reader_fails_the_random_offset_test(tokenizer: PreTrainedTokenizerFast) -> None:
    """The first demo's flaw: a reader that only answers when the question opens a segment (the
    old layout) scored full marks on the old builder; on this one it fails almost every trial."""
    def layout_reader(prompt_position: int, key: int) -> str:
        return f" {key}." if prompt_position % SEG == 0 else " 12345."

    trials = passkey_trials(tokenizer, [1, 4, 8], 50, SEG, seed=0)
    scores = [passkey_answer_correct(p.key, layout_reader(p.question_position, p.key))
              for ps in trials.values() for p in ps]
    assert sum(scores) / len(scores) < 0.2
    old_layout = [passkey_answer_correct(48213, layout_reader(d * SEG, 48213)) for d in (1, 4, 8)]
    assert all(old_layout)  # the same reader passes when questions open segments


def test_held_out_wording_is_never_a_training_wording(tokenizer: PreTrainedTokenizerFast) -> None:
    assert not set(HELD_OUT_WORDINGS) & set(TRAINING_WORDINGS)
    held_out = passkey_trials(tokenizer, [1], 30, SEG, seed=1, wording="held-out")[1]
    texts = [tokenizer.decode(p.tokens) for p in held_out]
    assert {w.question for w in HELD_OUT_WORDINGS} == {w.question for w in HELD_OUT_WORDINGS
                                                       if any(t.endswith(w.question) for t in texts)}


def test_passkey_exercise_is_exact_length_and_answers_its_key(tokenizer: PreTrainedTokenizerFast) -> None:
    rng = random.Random(0)
    stream = tokenizer.encode(" in the beginning was the word and the word was with god") * 100
    distances = set()
    for _ in range(30):
        exercise = passkey_exercise(tokenizer, rng, 256, SEG, stream)
        tokens = exercise.tokens
        assert len(tokens) == 256
        key = tokenizer.decode(tokens[exercise.answer]).strip().rstrip(".")
        assert key.isdigit() and len(key) == 5
        text = tokenizer.decode(tokens[:exercise.answer.start])
        wording = next(w for w in TRAINING_WORDINGS if text.endswith(w.question))
        assert wording.line(int(key)) in text
        # the extra-weighted span is the key's in-line repeat, before the question
        assert tokenizer.decode(tokens[exercise.extra]).strip() == key
        assert tokenizer.decode(tokens[:exercise.extra.start]).count(key) == 1
        question = text.rindex(wording.question)
        distances.add(len(tokenizer.encode(text[:question])) // SEG)
    assert len(distances) > 5  # questions at many positions, not one
    with pytest.raises(InvalidInputError, match="pass-key exercise needs"):
        passkey_exercise(tokenizer, rng, 64, SEG, stream)  # no room for one segment between key and question


def test_facts_hold_out_templates_and_values() -> None:
    assert not {t.question for t in TRAINING_FACTS} & {t.question for t in HELD_OUT_FACTS}
    rng = random.Random(0)
    for template in HELD_OUT_FACTS:
        if template.pool in ("number", "small"):
            continue
        held = {fact_value(template, rng, held_out=True) for _ in range(50)}
        trained = {fact_value(t, rng, held_out=False) for t in TRAINING_FACTS if t.pool == template.pool
                   for _ in range(50)}
        assert held and not held & trained


def test_chat_fact_conversation_and_scorer() -> None:
    passages = ["It was a dark and stormy night.", "Call me Ishmael.", "The sea was calm."]
    fact = chat_fact(random.Random(2), passages, filler_turns=3, held_out=True)
    assert [m["role"] for m in fact.messages] == ["user", "assistant"] * 4 + ["user"]
    assert fact.value in fact.messages[0]["content"] and fact.value in fact.answer
    assert all(fact.value not in m["content"] for m in fact.messages[1:])
    assert fact_recalled("Celine", "Your sister is Celine.") and not fact_recalled("Leon", "It is Leonard.")
    assert fact_recalled("4021", "The number is 4021") and not fact_recalled("4021", "It is 40211")


def test_chat_fact_exercise_uses_the_template_and_marks_the_answer(tokenizer: PreTrainedTokenizerFast) -> None:
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    passages = ["And the earth was without form, and void.", "And God saw the light, that it was good."]
    stream = tokenizer.encode(" and the evening and the morning were the first day") * 50
    exercise = chat_fact_exercise(tokenizer, random.Random(1), 400, passages, stream)
    assert len(exercise.tokens) == 400
    text = tokenizer.decode(exercise.tokens)
    answer = tokenizer.decode(exercise.tokens[exercise.answer])
    assert any(answer == t.answer.split("{value}")[0] + answer[len(t.answer.split("{value}")[0]):]
               and answer.startswith(t.answer.split("{value}")[0]) for t in TRAINING_FACTS)
    assert text.count("<|im_start|>user") >= 2 and text.index(answer) > text.rindex("<|im_start|>assistant")
