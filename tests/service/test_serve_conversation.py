"""service.conversation on its own: chat templates rendered incrementally, hash chains, plans."""

from __future__ import annotations

import pytest
from serve_helpers import ROOT
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from service.conversation import (
    EMPTY,
    ChatTemplate,
    Conversation,
    Message,
    after_turn,
    chain_hashes,
    plan_turn,
)

LLAMA3_LIKE = (
    "{{ '<|begin_of_text|>' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
    " + m['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# numbers every message by the total count: a template whose render of a prefix is no prefix of the render
NOT_INCREMENTAL = "{% for m in messages %}{{ messages|length }}:{{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def demo_tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(ROOT / "models" / "hmt-demo")


def conversation(n: int) -> list[Message]:
    return [Message("user" if i % 2 == 0 else "assistant", f"message {i}") for i in range(n)]


def test_chatml_template_of_the_demo(demo_tokenizer: PreTrainedTokenizerBase) -> None:
    template = ChatTemplate(demo_tokenizer)
    assert template.turn_end == "<|im_end|>"
    assert template.stop_token_ids == (demo_tokenizer.convert_tokens_to_ids("<|im_end|>"),)
    assert template.stop_strings == ()
    messages = conversation(3)
    # the new suffix: exactly the rendering of the new message plus the generation prompt
    prompt = template.render(messages, generation_prompt=True)
    assert template.suffix(messages, prompt, 2) == "<|im_start|>user\nmessage 2<|im_end|>\n<|im_start|>assistant\n"
    assert template.suffix(messages, prompt, 0) == prompt
    assert template.continuation(messages[2:]) == template.suffix(messages, prompt, 2)
    # after a reply: the session still needs the end of the turn, minus what the model generated
    assert template.closing(messages, prompt, "hi", ended_turn=True) == "\n"
    assert template.closing(messages, prompt, "hi", ended_turn=False) == "<|im_end|>\n"
    reply = demo_tokenizer.encode("hi<|im_end|>", add_special_tokens=False)
    assert template.ended_turn(reply, "stop") and not template.ended_turn(reply, "length")
    assert not template.ended_turn(demo_tokenizer.encode("hi there", add_special_tokens=False), "stop")


def test_template_without_special_tokens_stops_on_a_string() -> None:
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "models" / "hmt-demo")
    tokenizer.chat_template = LLAMA3_LIKE  # its markers are not special tokens of this tokenizer
    template = ChatTemplate(tokenizer)
    assert template.turn_end == "<|eot_id|>" and template.stop_strings == ("<|eot_id|>",)
    messages = conversation(3)
    # sent alone, new messages do not get a second beginning-of-text
    assert template.continuation(messages[2:]).startswith("<|start_header_id|>user")
    prompt = template.render(messages, generation_prompt=True)
    assert template.suffix(messages, prompt, 2) == template.continuation(messages[2:])


def test_non_incremental_template_is_detected() -> None:
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "models" / "hmt-demo")
    tokenizer.chat_template = NOT_INCREMENTAL
    template = ChatTemplate(tokenizer)
    prompt = template.render(conversation(3), generation_prompt=True)
    assert template.suffix(conversation(3), prompt, 2) is None
    assert template.suffix(conversation(3), prompt, 0) is not None


def test_chain_hashes_cover_the_whole_prefix() -> None:
    a = chain_hashes(conversation(4))
    edited = conversation(4)
    edited[1] = Message("assistant", "changed")
    b = chain_hashes(edited)
    assert a[0] == b[0] and a[1:] != b[1:] and len(set(a) & set(b[1:])) == 0
    assert chain_hashes(conversation(4)[2:], a[1]) == a[2:]  # a chain extends from any point
    assert chain_hashes([Message("user", "x", name="bob")]) != chain_hashes([Message("user", "x")])


def test_plans_continue_branch_and_restart() -> None:
    chain = chain_hashes(conversation(6))
    assert plan_turn(None, chain[:1]).continuation == "new"
    record = Conversation(chain[:4], "P4", {0: "", 2: "P2", 4: "P4"})
    continued = plan_turn(record, chain[:5])
    assert (continued.continuation, continued.base, continued.absorbed, continued.pending) == \
        ("continued", None, 4, "P4")
    other = chain_hashes([*conversation(3), Message("assistant", "edited"), Message("user", "x")])
    branched = plan_turn(record, other)  # diverges at message 3: the snapshot after 2 messages
    assert (branched.continuation, branched.base, branched.absorbed, branched.pending) == ("branched", 2, 2, "P2")
    forked = Conversation(chain[:4], "P4", {2: "P2", 4: "P4"})  # a fork: its oldest snapshot is at 2
    restarted = plan_turn(forked, chain_hashes([Message("user", "other")]))
    assert (restarted.continuation, restarted.base, restarted.absorbed) == ("restarted", EMPTY, 0)


def test_after_turn_keeps_the_root_and_the_newest_snapshots() -> None:
    record: Conversation | None = None
    messages: list[Message] = []
    dropped: list[int] = []
    for turn in range(10):
        messages += [Message("user", f"q{turn}"), Message("assistant", f"a{turn}")]
        chain = chain_hashes(messages)
        plan = plan_turn(record, chain[:-1])
        record, drop = after_turn(record, plan, chain, "P", max_snapshots=4)
        dropped += drop
    assert record is not None and sorted(record.snapshots) == [0, 16, 18, 20]
    assert sorted(dropped) == [2, 4, 6, 8, 10, 12, 14]
    # a branch drops the snapshots of the abandoned line
    plan = plan_turn(record, chain_hashes([*messages[:16], Message("user", "new")]))
    assert plan.base == 16
    branched, drop = after_turn(record, plan, chain_hashes([*messages[:16], Message("user", "new"),
                                                            Message("assistant", "r")]), "P", max_snapshots=4)
    assert sorted(branched.snapshots) == [0, 16, 18] and drop == [20]
    assert Conversation.from_bytes(branched.to_bytes()) == branched
