"""Chat over a stateless protocol: which messages a session has already read.

OpenAI-style clients resend the whole history every turn. A chat session keeps a hash chain of
the messages it has absorbed (h_i = sha256(h_{i-1} | message_i)); a request is matched against
it and only the messages past the common prefix are rendered with the chat template and
appended, so turn 100 costs what turn 2 costs. At the end of every turn the state is kept as a
snapshot (a bounded number of them, the first always): when a client edits or regenerates an
earlier turn, the session continues from the newest snapshot at or before the point where the
histories diverge instead of re-reading everything.

Rendering is incremental: the text for messages[n:] is render(messages)[len(render(messages[:n])):],
which holds for templates whose render of a prefix is a prefix of the render (ChatML, Llama 3,
Mistral, Qwen ...). For a template where it does not, the turn restarts from the first snapshot.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from hmt_core import InvalidInputError
from hmt_core.tokenizer import CHATML_TEMPLATE, render_chat, render_continuation

ROOT_HASH = "0" * 32
Continuation = Literal["new", "continued", "branched", "restarted"]


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    name: str | None = None

    def template_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content, **({"name": self.name} if self.name else {})}


def chain_hashes(messages: Sequence[Message], previous: str = ROOT_HASH) -> list[str]:
    """h_1..h_n: each hash covers every message up to and including its own."""
    hashes: list[str] = []
    for message in messages:
        canonical = json.dumps([message.role, message.content, message.name], ensure_ascii=False)
        previous = hashlib.sha256(f"{previous}|{canonical}".encode()).hexdigest()[:32]
        hashes.append(previous)
    return hashes


class ChatTemplate:
    """The tokenizer's chat template, or ChatML when it has none."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.template: str = getattr(tokenizer, "chat_template", None) or CHATML_TEMPLATE
        probe = [Message("user", "\x00"), Message("assistant", "\x01")]
        closing = self.render(probe)
        # the text the template puts after an assistant reply (e.g. "<|im_end|>\n"): its first token
        # is where a reply ends, when it is a special token
        self.reply_end = closing[closing.index("\x01") + 1:]
        self.stop_token_ids: tuple[int, ...] = ()
        self.stop_strings: tuple[str, ...] = ()
        self.turn_end = self.reply_end.strip()  # generation stops here: a special token or a stop string
        special = set(getattr(tokenizer, "all_special_tokens", ())) | {
            t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
        for token in sorted(special, key=len, reverse=True):
            if token and self.turn_end.startswith(token):
                self.turn_end = token
                self.stop_token_ids = (int(tokenizer.convert_tokens_to_ids(token)),)
                break
        else:
            self.stop_strings = (self.turn_end,) if self.turn_end else ()

    def ended_turn(self, tokens: Sequence[int], finish_reason: str | None) -> bool:
        """Did a reply stop at the template's end of turn (which is then already in the session)?"""
        if finish_reason != "stop" or not self.turn_end or not tokens:
            return False
        tail = self.tokenizer.decode(list(tokens[-len(self.turn_end) - 4:]), skip_special_tokens=False)
        return self.turn_end in tail

    def render(self, messages: Sequence[Message], generation_prompt: bool = False) -> str:
        if not messages:
            return ""
        try:
            return render_chat(self.tokenizer, [m.template_dict() for m in messages], generation_prompt, self.template)
        except Exception as exc:  # jinja raises for conversations the template forbids
            raise InvalidInputError(f"the chat template rejected the messages: {exc}") from None

    def suffix(self, messages: Sequence[Message], prompt: str, absorbed: int) -> str | None:
        """The text to append for messages[absorbed:] plus the generation prompt, given
        prompt = render(messages, generation_prompt=True); None if the template does not
        render incrementally here."""
        head = self.render(messages[:absorbed])
        return prompt[len(head):] if prompt.startswith(head) else None

    def continuation(self, messages: Sequence[Message]) -> str:
        """The text for messages sent alone (X-HMT-Messages: new), as the template renders them
        after an earlier exchange (so no second beginning-of-text or default system prompt)."""
        try:
            return render_continuation(self.tokenizer, [m.template_dict() for m in messages], True, self.template)
        except Exception as exc:  # jinja raises for conversations the template forbids
            raise InvalidInputError(f"the chat template rejected the messages: {exc}") from None

    def closing(self, messages: Sequence[Message], prompt: str, reply: str, ended_turn: bool) -> str:
        """What the template puts after the reply that the session has not read yet ("\\n" after
        a generated <|im_end|>, the whole "<|im_end|>\\n" after a reply cut by max_tokens)."""
        read = prompt + reply  # prompt = render(messages, generation_prompt=True), what preceded the reply
        target = self.render([*messages, Message("assistant", reply)])
        if not target.startswith(read):
            return ""
        rest = target[len(read):]
        if ended_turn and rest.startswith(self.turn_end):
            rest = rest[len(self.turn_end):]
        return rest


@dataclass
class Conversation:
    """The record of a chat session, stored beside its state (JSON)."""

    chain: list[str] = field(default_factory=list)  # hashes of the absorbed messages, in order
    pending: str = ""  # text to append before the next messages: the template's end of the last reply
    snapshots: dict[int, str] = field(default_factory=dict)  # message count -> pending text then

    def to_bytes(self) -> bytes:
        return json.dumps({"chain": self.chain, "pending": self.pending,
                           "snapshots": {str(k): v for k, v in self.snapshots.items()}}).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Conversation:
        raw = json.loads(data)
        return cls(list(raw["chain"]), str(raw["pending"]), {int(k): str(v) for k, v in raw["snapshots"].items()})


MAX_TRANSCRIPT_CHARS = 1_000_000  # a transcript keeps its newest messages up to this many characters


@dataclass
class Transcript:
    """The text of a chat session's messages, stored beside its state so a client (the playground)
    can show and resend them after a reload. Bounded: past MAX_TRANSCRIPT_CHARS the oldest messages
    are dropped and `complete` turns false (the state itself never needs it)."""

    messages: list[Message] = field(default_factory=list)
    complete: bool = True  # every message the session absorbed through the chat API is here

    def to_bytes(self) -> bytes:
        messages, complete, chars = list(self.messages), self.complete, 0
        for start in range(len(messages) - 1, -1, -1):
            chars += len(messages[start].content)
            if chars > MAX_TRANSCRIPT_CHARS:
                messages, complete = messages[start + 1:], False
                break
        rows = [m.template_dict() for m in messages]
        return json.dumps({"messages": rows, "complete": complete}, ensure_ascii=False).encode()

    @classmethod
    def from_bytes(cls, data: bytes | None) -> Transcript:
        """A missing or damaged field reads as empty (and complete only when missing)."""
        if not data:
            return cls()
        try:
            raw = json.loads(data)
            messages = [Message(str(m["role"]), str(m["content"]), m.get("name")) for m in raw["messages"]]
            return cls(messages, bool(raw["complete"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            return cls([], False)


EMPTY = -1  # Plan.base for a fresh, empty state


@dataclass
class Plan:
    """How a chat request continues its session."""

    continuation: Continuation
    base: int | None  # None: the current state; n: the snapshot after n messages; EMPTY: a new state
    absorbed: int  # messages of the request already in the base state
    pending: str  # the base's pending text


def plan_turn(record: Conversation | None, chain: list[str]) -> Plan:
    """Match a request's chain against the record: continue, or branch from the newest snapshot
    at or before the divergence (or re-read everything when no snapshot is that old)."""
    if record is None:
        return Plan("new", None, 0, "")
    common = 0
    for mine, theirs in zip(record.chain, chain, strict=False):
        if mine != theirs:
            break
        common += 1
    if common == len(record.chain):
        return Plan("continued", None, common, record.pending)
    candidates = [n for n in record.snapshots if n <= common]
    if not candidates:
        return restart_plan(record)
    base = max(candidates)
    return Plan("branched", base, base, record.snapshots[base])


def restart_plan(record: Conversation | None) -> Plan:
    """Read the whole conversation again, from the state before the first chat turn if known."""
    if record is not None and 0 in record.snapshots:
        return Plan("restarted", 0, 0, record.snapshots[0])
    return Plan("restarted", EMPTY, 0, "")


def after_turn(record: Conversation | None, plan: Plan, chain: list[str], pending: str,
               max_snapshots: int) -> tuple[Conversation, list[int]]:
    """The record once the turn is saved (chain = request + reply), and the snapshot keys to drop.
    The oldest snapshot (the root) is always kept; the rest are the newest turns."""
    old = dict(record.snapshots) if record else {}
    if plan.base is None:
        kept = dict(old)
    else:
        kept = {n: p for n, p in old.items() if n <= plan.absorbed and plan.base != EMPTY}
    if plan.continuation in ("new", "restarted"):
        kept[plan.absorbed] = plan.pending  # the service stores the base state as this snapshot
    root = min(kept, default=len(chain))
    kept[len(chain)] = pending
    newest = sorted(n for n in kept if n != root)[-max(1, max_snapshots - 1):]
    kept = {n: kept[n] for n in [root, *newest]}
    return Conversation(list(chain), pending, kept), sorted(set(old) - set(kept))
