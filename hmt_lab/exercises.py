"""Memory exercises and probes at random positions: pass keys, and facts stated in a chat.

Training exercises and evaluation prompts both come from here, so neither can drift back to one
layout. The first demo recipe put the key at one offset and the question exactly at a segment
start; its model learned that layout, not recall (0/10 through the HTTP API once the question
moved). Here key, filler and question land at random offsets relative to segment boundaries,
and wording, fillers and facts come in disjoint training and held-out sets: a model is never
scored on the sentences it was trained on.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hmt_core.errors import InvalidInputError
from hmt_core.tokenizer import render_continuation

# ----- pass keys ----------------------------------------------------------------------------

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_QUESTION = "What is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyWording:
    intro: str
    key_line: str  # "{key}" marks where the digits go (twice: the in-line repeat is a training signal)
    question: str  # ends where the answer's digits follow

    def line(self, key: int) -> str:
        return self.key_line.format(key=key)


# The paper's wording (Mohtashami & Jaggi's pass-key test) is held out: evaluation uses it.
STANDARD_WORDING = PasskeyWording(PASSKEY_INTRO, "The pass key is {key}. Remember it. {key} is the pass key.",
                                  PASSKEY_QUESTION)
HELD_OUT_WORDINGS = (
    STANDARD_WORDING,
    PasskeyWording("Hidden somewhere in this long document is a short code. Remember it.",
                   "The code to remember is {key}. Again: {key}.", "What code did the document hide? The code is"),
)
TRAINING_WORDINGS = (
    PasskeyWording("Somewhere in the text below is a secret number. Keep it in mind: you will be asked for it.",
                   "The secret number is {key}. Keep it: {key}.", "What was the secret number? The secret number is"),
    PasskeyWording("Read the following carefully. One line holds an access code you must recall later.",
                   "Your access code is {key}. Once more, the access code is {key}.",
                   "Now recall the access code. The access code is"),
    PasskeyWording("A number is hidden in this document. Memorize it.",
                   "Note this number: {key}. The number is {key}.", "Which number were you asked to note? It is"),
    PasskeyWording("Pay attention: a key appears once in this long text.",
                   "The key is {key}. Remember the key {key}.", "Question: what is the key? The key is"),
    PasskeyWording("Below is a long passage with a magic number inside it.",
                   "The magic number is {key}. Do not forget {key}.",
                   "What is the magic number mentioned above? The magic number is"),
    PasskeyWording("", "(The password is {key}. Remember {key}.)", "What was the password? The password is"),
)
# repetitive fillers beside book text; the standard one is held out for evaluation
TRAINING_FILLERS = (
    "The river runs to the sea. Birds fly over the hills. The wind is cold today. We walk on.",
    "One day follows another. The clock ticks on the wall. Nothing much happens here.",
    "Rain falls on the roof. The road is long and grey. A dog barks far away. Time goes by.",
)


@dataclass
class PasskeyPrompt:
    key: int
    tokens: list[int]
    key_position: int  # token index where the key line starts
    key_end: int  # token index just after the key line
    question_position: int  # token index where the question starts

    def distance_segments(self, segment_tokens: int) -> int:
        """Segments from the one holding the end of the key line to the one holding the question's start."""
        return self.question_position // segment_tokens - (self.key_end - 1) // segment_tokens


def encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    """Text -> ids without special tokens: pieces are encoded separately and concatenated."""
    return lambda text: list(tokenizer.encode(text, add_special_tokens=False))


class FillerStream:
    """Endless filler tokens read from a random place of a token stream (book text, or a sentence
    repeated), so consecutive prompts never share their filler."""

    def __init__(self, tokens: Sequence[int], rng: random.Random) -> None:
        if not tokens:
            raise InvalidInputError("a filler stream needs tokens")
        self.tokens, self.position = tokens, rng.randrange(len(tokens))  # no copy: streams are whole corpora

    def take(self, count: int) -> list[int]:
        out: list[int] = []
        while len(out) < count:
            piece = list(self.tokens[self.position:self.position + count - len(out)])
            out += piece
            self.position = (self.position + len(piece)) % len(self.tokens)
        return out


@functools.lru_cache(maxsize=64)
def sentence_filler(tokenizer: Any, sentence: str = PASSKEY_FILLER, repeats: int = 64) -> tuple[int, ...]:
    """A sentence repeated, as tokens (cached: data sets build thousands of exercises on a few sentences, and
    encoding the repeats was most of the demo recipe's data time)."""
    return tuple(encoder(tokenizer)(" " + " ".join([sentence] * repeats)))


def value_token_indices(tokenizer: Any, answer: Sequence[int]) -> list[int]:
    """Which tokens of an answer carry its value: the digits of a pass key."""
    return [i for i, token in enumerate(answer) if str(tokenizer.decode([token])).strip().isdigit()]


def build_passkey_prompt(tokenizer: Any, key: int, distance_segments: int, segment_tokens: int,
                         rng: random.Random | None = None, wording: PasskeyWording = STANDARD_WORDING,
                         filler: Sequence[int] | None = None) -> PasskeyPrompt:
    """intro, filler of random length (so the key line starts anywhere in its segment), the key
    line, then filler until the question starts at a random offset of the segment that lies
    `distance_segments` after the one where the key line ends (0: the question follows the key).

    rng: offsets and filler start (default: seeded by key and distance, so a prompt is
    reproducible). filler: tokens to cut filler from (default: the standard sentence repeated)."""
    rng = rng or random.Random(key * 1009 + distance_segments)
    encode = encoder(tokenizer)
    stream = FillerStream(filler if filler is not None else sentence_filler(tokenizer), rng)
    tokens = encode(wording.intro) if wording.intro else []
    tokens += stream.take(rng.randrange(segment_tokens))
    key_position = len(tokens)
    tokens += encode(" " + wording.line(key))
    key_end = len(tokens)
    if distance_segments > 0:
        target = ((key_end - 1) // segment_tokens + distance_segments) * segment_tokens + rng.randrange(segment_tokens)
        tokens += stream.take(target - len(tokens))
    question_position = len(tokens)
    return PasskeyPrompt(key, tokens + encode(" " + wording.question), key_position, key_end, question_position)


def passkey_answer_correct(key: int, answer: str) -> bool:
    """The reply must start with the key's digits (surrounding spaces and a trailing dot allowed)."""
    digits = answer.strip().split(" ")[0].rstrip(".,")
    return digits == str(key)


@dataclass
class Exercise:
    """A training row: tokens exactly sample_tokens long, the answer's span (weighted in the loss),
    and spans worth extra weight for a reason of their own (the key's in-line repeat)."""

    tokens: list[int]
    answer: slice
    extra: slice = field(default_factory=lambda: slice(0, 0))


def _fill_to(tokens: list[int], sample_tokens: int, eos: int | None, stream: FillerStream) -> list[int]:
    """Pad an exercise to the sample length with plain text after an end-of-text token."""
    tail = ([eos] if eos is not None else [])
    return (tokens + tail + stream.take(max(0, sample_tokens - len(tokens) - len(tail))))[:sample_tokens]


def passkey_exercise(tokenizer: Any, rng: random.Random, sample_tokens: int, segment_tokens: int,
                     text_stream: Sequence[int], wordings: Sequence[PasskeyWording] = TRAINING_WORDINGS,
                     fillers: Sequence[str] = TRAINING_FILLERS) -> Exercise:
    """A pass-key exercise of exactly sample_tokens: training wording, a random distance that
    fits, random offsets, and filler that is book text or a repeated sentence, chosen at random."""
    encode = encoder(tokenizer)
    wording = rng.choice(wordings)
    key = rng.randrange(10_000, 100_000)
    answer = encode(f" {key}.")
    use_text = rng.random() < 0.5 or not fillers
    filler = text_stream if use_text else sentence_filler(tokenizer, rng.choice(fillers))
    # the longest distance whose worst case (key at the end of its segment, question at the end
    # of its own) still leaves room for the question and answer
    tail = len(encode(" " + wording.question)) + len(answer) + 1
    head = len(encode(wording.intro)) if wording.intro else 0
    head += segment_tokens + len(encode(" " + wording.line(key)))
    most = (sample_tokens - tail - head) // segment_tokens
    if most < 1:
        raise InvalidInputError(f"a pass-key exercise needs about {head + tail + segment_tokens} tokens "
                                f"(distance 1), samples have {sample_tokens}")
    built = build_passkey_prompt(tokenizer, key, rng.randint(1, most), segment_tokens, rng, wording, filler)
    prompt = built.tokens
    digits = encode(str(key))
    found = [i for i in range(built.key_position, built.key_end - len(digits) + 1)
             if prompt[i:i + len(digits)] == digits]
    repeat = slice(found[-1], found[-1] + len(digits)) if len(found) > 1 else slice(0, 0)
    tokens = _fill_to([*prompt, *answer], sample_tokens, tokenizer.eos_token_id, FillerStream(text_stream, rng))
    return Exercise(tokens, slice(len(prompt), len(prompt) + len(answer)), repeat)


# ----- facts stated in a conversation ----------------------------------------------------------

@dataclass(frozen=True)
class FactTemplate:
    statement: str  # "{value}" marks the fact
    question: str
    answer: str  # the assistant's reply, with "{value}"
    pool: str  # which value pool fills it


# Training and held-out facts differ in template and in value: a held-out question never appeared
# in training, nor did its answer's value.
TRAINING_FACTS = (
    FactTemplate("My sister's name is {value}.", "What is my sister's name?", "Your sister's name is {value}.", "name"),
    FactTemplate("I was born in {value}.", "Where was I born?", "You were born in {value}.", "city"),
    FactTemplate("My locker number is {value}.", "What is my locker number?", "Your locker number is {value}.",
                 "number"),
    FactTemplate("I parked the car on level {value} of the garage.", "Which level did I park on?",
                 "You parked on level {value}.", "small"),
    FactTemplate("The wifi password here is {value}.", "What's the wifi password?", "The wifi password is {value}.",
                 "word"),
    FactTemplate("My dog is called {value}.", "What is my dog called?", "Your dog is called {value}.", "name"),
    FactTemplate("I work as a {value}.", "What do I do for a living?", "You work as a {value}.", "job"),
    FactTemplate("Our meeting is on the {value} floor.", "Which floor is our meeting on?",
                 "The meeting is on the {value} floor.", "ordinal"),
    FactTemplate("My favourite fruit is the {value}.", "Which fruit do I like best?",
                 "Your favourite fruit is the {value}.", "fruit"),
    FactTemplate("I moved here from {value} last year.", "Where did I move here from?",
                 "You moved here from {value}.", "city"),
    FactTemplate("Remember that my order number is {value}.", "What is my order number?",
                 "Your order number is {value}.", "number"),
    FactTemplate("My best friend is {value}.", "Who is my best friend?", "Your best friend is {value}.", "name"),
)
HELD_OUT_FACTS = (
    FactTemplate("My brother is named {value}.", "What's my brother's name?", "Your brother is named {value}.",
                 "name"),
    FactTemplate("I grew up in {value}.", "Where did I grow up?", "You grew up in {value}.", "city"),
    FactTemplate("My room number at the hotel is {value}.", "What is my hotel room number?",
                 "Your room number is {value}.", "number"),
    FactTemplate("The cat's name is {value}.", "What is the cat's name?", "The cat's name is {value}.", "name"),
    FactTemplate("My job is {value}.", "What is my job?", "Your job is {value}.", "job"),
    FactTemplate("The secret word for the party is {value}.", "What is the secret word for the party?",
                 "The secret word is {value}.", "word"),
    FactTemplate("I keep my spare key under the {value}.", "Where do I keep my spare key?",
                 "Under the {value}.", "place"),
)


def _words(text: str) -> list[str]:
    return text.split()


_POOLS_TRAINING = {
    "name": _words("Alice Bruno Clara Dmitri Elena Farid Greta Hugo Ingrid Jonas Keiko Lars Maya Nikolai Olga "
                   "Pablo Quentin Rosa Stefan Tamara Ulrich Vera Walter Xenia Yusuf Zora Anton Bianca Cyril Dora"),
    "city": _words("Lisbon Oslo Nairobi Denver Kyoto Lima Dublin Perth Quebec Seville Tbilisi Hanoi Zurich Accra "
                   "Bergen Cusco"),
    "word": _words("pelican marble tornado velvet lantern cobalt saffron meadow quartz falcon harbor juniper"),
    "job": _words("carpenter nurse pilot librarian baker chemist plumber teacher architect farmer"),
    "ordinal": _words("second third fifth seventh ninth eleventh"),
    "fruit": _words("mango plum apricot cherry papaya kiwi"),
}
_POOLS_HELD_OUT = {
    "name": _words("Amira Boris Celine Dario Esther Felix Gemma Henrik Isolde Jasper Kamala Leon Mirela Nadia "
                   "Oscar Petra Rafael Sabine Tobias Ursula Viktor Wanda Yara Zeno"),
    "city": _words("Montreal Krakow Bogota Adelaide Marseille Ljubljana Casablanca Helsinki Valencia Porto Gdansk "
                   "Tallinn"),
    "word": _words("orchid granite comet thistle amber walnut cascade ember"),
    "job": _words("dentist electrician journalist translator veterinarian mechanic"),
    "place": _words("doormat flowerpot mailbox stone lamp bench"),
}
ACKNOWLEDGEMENTS = ("Got it.", "Noted, I'll remember that.", "Thanks for telling me.", "Okay!",
                    "Understood.", "Good to know.")
FILLER_REQUESTS = ("Here is a passage from a book:", "Read this:", "What do you make of this text?",
                   "Can you continue this?", "Some reading for you:", "Consider the following lines.")


def fact_value(template: FactTemplate, rng: random.Random, held_out: bool) -> str:
    if template.pool == "number":
        return str(rng.randrange(100, 10_000))
    if template.pool == "small":
        return str(rng.randrange(1, 10))
    pools = _POOLS_HELD_OUT if held_out else _POOLS_TRAINING
    return rng.choice(pools[template.pool])


@dataclass
class ChatFact:
    """A conversation: a fact stated in the first user turn, unrelated turns, then a question."""

    messages: list[dict[str, str]]  # up to and including the question
    answer: str  # the reply that recalls the fact
    value: str
    fact_turn: int  # index of the message that states the fact


def chat_fact(rng: random.Random, passages: Sequence[str], filler_turns: int, held_out: bool = False,
              template: FactTemplate | None = None) -> ChatFact:
    """A fact, `filler_turns` exchanges about book passages, then the question. The fact may sit
    inside a longer first message; the passages give the turns their length."""
    facts = HELD_OUT_FACTS if held_out else TRAINING_FACTS
    template = template or rng.choice(facts)
    value = fact_value(template, rng, held_out)
    statement = template.statement.format(value=value)
    if rng.random() < 0.5:
        statement = f"{rng.choice(('Hi!', 'Hello.', 'Before we start:', 'Quick note.'))} {statement}"
    messages = [{"role": "user", "content": statement},
                {"role": "assistant", "content": rng.choice(ACKNOWLEDGEMENTS)}]
    for _ in range(filler_turns):
        request, reply = rng.choice(passages), rng.choice(passages)
        messages += [{"role": "user", "content": f"{rng.choice(FILLER_REQUESTS)} {request}"},
                     {"role": "assistant", "content": reply}]
    messages.append({"role": "user", "content": template.question})
    return ChatFact(messages, template.answer.format(value=value), value, 0)


def chat_fact_exercise(tokenizer: Any, rng: random.Random, sample_tokens: int, passages: Sequence[str],
                       text_stream: Sequence[int]) -> Exercise:
    """A training conversation in the tokenizer's own chat template, exactly sample_tokens long:
    as many filler turns as fit (at least none), the answer's span marked."""
    encode = encoder(tokenizer)
    for turns in range(rng.randint(2, 12), -1, -1):
        fact = chat_fact(rng, passages, turns)
        prompt_text = tokenizer.apply_chat_template(fact.messages, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template([*fact.messages, {"role": "assistant", "content": fact.answer}],
                                                  tokenize=False)
        prompt, answer = encode(prompt_text), encode(fact.answer)
        end = encode(full_text[len(prompt_text) + len(fact.answer):])  # the template's end of turn
        if len(prompt) + len(answer) + len(end) <= sample_tokens:
            tokens = _fill_to([*prompt, *answer, *end], sample_tokens, None, FillerStream(text_stream, rng))
            return Exercise(tokens, slice(len(prompt), len(prompt) + len(answer)))
    raise InvalidInputError(f"a chat exercise does not fit in {sample_tokens} tokens")


def fact_recalled(value: str, reply: str) -> bool:
    """A reply recalls the fact when it contains the value as a word (case-insensitive)."""
    words = reply.lower().replace(",", " ").replace(".", " ").replace("!", " ").split()
    return all(part in words for part in value.lower().split())


def tokens_with_span(tokenizer: Any, text: str, start: int, end: int) -> tuple[list[int], list[int]]:
    """text's tokens, and the indices of those that overlap text[start:end] (a fact's value in a reply)."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = encoded["offset_mapping"]
    return list(encoded["input_ids"]), [i for i, (a, b) in enumerate(spans) if a < end and b > start]


def fact_reply(tokenizer: Any, fact: ChatFact, template: FactTemplate) -> tuple[list[int], list[int]]:
    """The reply that recalls a fact as tokens, and the indices of its value's tokens (what the answer loss
    and the evaluation score)."""
    start = len(template.answer.split("{value}")[0])
    return tokens_with_span(tokenizer, fact.answer, start, start + len(fact.value))


class ChatFiller:
    """Filler exchanges of a conversation, rendered as its later turns: a request quoting one book passage, a
    reply quoting another. Drawn from `rng`, so a step's filler is a function of its seed."""

    def __init__(self, tokenizer: Any, passages: Sequence[str], rng: random.Random) -> None:
        if not passages:
            raise InvalidInputError("chat filler needs passages")
        self.tokenizer, self.passages, self.rng = tokenizer, passages, rng
        self.encode = encoder(tokenizer)

    def exchange(self) -> list[int]:
        messages = [{"role": "user", "content": f"{self.rng.choice(FILLER_REQUESTS)} {self.rng.choice(self.passages)}"},
                    {"role": "assistant", "content": self.rng.choice(self.passages)}]
        return self.encode(render_continuation(self.tokenizer, messages))

    def take(self, count: int) -> list[int]:
        """The first `count` tokens of whole exchanges (what follows the end of a turn)."""
        out: list[int] = []
        while len(out) < count:
            out += self.exchange()
        return out[:count]

    def tail(self, count: int) -> list[int]:
        """The last `count` tokens of whole exchanges (what precedes the start of a turn)."""
        out: list[int] = []
        while len(out) < count:
            out = self.exchange() + out
        return out[len(out) - count:]
