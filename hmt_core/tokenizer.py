"""Offline tokenizers: a byte-level BPE trained on local text, saved in transformers format."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

END_OF_TEXT = "<|endoftext|>"
TURN_START = "<|im_start|>"
TURN_END = "<|im_end|>"

# ChatML, the default for tokenizers that ship without a template of their own.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, split_digits: bool = True) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any UTF-8 text round-trips) with end-of-text and ChatML turn tokens.

    split_digits: one token per digit, so numbers (pass keys, say) are copied digit by digit.
    """
    tokenizer = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]) \
        if split_digits else byte_level
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT, TURN_START, TURN_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=END_OF_TEXT, bos_token=END_OF_TEXT,
                                      pad_token=END_OF_TEXT)
    wrapped.chat_template = CHATML_TEMPLATE
    return wrapped


def render_chat(tokenizer: Any, messages: Sequence[dict[str, str]], generation_prompt: bool = False,
                template: str | None = None) -> str:
    """Messages as text in the tokenizer's chat template (ChatML when it has none)."""
    template = template or getattr(tokenizer, "chat_template", None) or CHATML_TEMPLATE
    return str(tokenizer.apply_chat_template(list(messages), chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt))


def render_continuation(tokenizer: Any, messages: Sequence[dict[str, str]], generation_prompt: bool = False,
                        template: str | None = None) -> str:
    """Messages as the template renders them after an earlier exchange: no second beginning of text and no
    default system prompt (the text a session appends for a later turn)."""
    earlier = [{"role": "user", "content": "\x00"}, {"role": "assistant", "content": "\x01"}]
    head = render_chat(tokenizer, earlier, template=template)
    full = render_chat(tokenizer, [*earlier, *messages], generation_prompt, template)
    return full[len(head):] if full.startswith(head) else render_chat(tokenizer, messages, generation_prompt,
                                                                       template)
