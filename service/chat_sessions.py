"""Chat sessions: a conversation kept beside its session state, for every chat front end.

Sessions over a stateless protocol: standard clients resend the whole history each turn;
service.conversation decides what is new, so only that is read. A turn without a session id
continues the session whose last turn ended exactly where its messages' prefix does (or forks a
new session from a snapshot of it, never rewinding another client's conversation). A turn may
also send only its new messages (`delta`), for a session it names.

What is stored, in the session's hash and written atomically with its state (service.store.SideWrites):
the conversation record (CONVERSATION_FIELD: the hash chain of the absorbed messages, the text
pending before the next ones, the snapshots kept), the transcript (TRANSCRIPT_FIELD: the messages'
text, for clients that resume), and a snapshot of the state at the end of each turn (labelled by
its message count). After the save, a hint from the turn's last hash to the session, for the next
turn of a client without a session id (SessionStore.remember_chat, find_chat).

The interface: `ChatSessions.start_turn` (plan and launch a turn under the session's lock) and
`ChatSessions.finish` (the saved result); `read_transcript` for the session API.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, replace

from hmt_core import CorruptStateError, InvalidInputError, SamplingParams
from service import metrics
from service.conversation import (
    EMPTY,
    ROOT_HASH,
    ChatTemplate,
    Continuation,
    Conversation,
    Message,
    Plan,
    Transcript,
    after_turn,
    chain_hashes,
    plan_turn,
    restart_plan,
)
from service.job import Constraint, Job, JobResult
from service.session_service import JOB_FIELDS, Service
from service.store import SessionStore, SideWrites

CONVERSATION_FIELD = "conversation"  # the session hash field that holds the record
TRANSCRIPT_FIELD = "transcript"  # the session hash field with the messages' text (for clients that resume)


@dataclass
class ChatTurn:
    """A started chat turn: its job (read it with `job.stream` or `job.stream_tokens`), the task
    that saves its result (`ChatSessions.finish` awaits it), and what a response reports."""

    session_id: str
    owner: str
    job: Job
    saved: asyncio.Task[JobResult]
    prompt_tokens: int  # tokens read for this turn: the new part of the conversation, not the history
    continuation: Continuation  # how it continued its session: new, continued, branched, restarted
    chain: list[str]  # the hash chain of the conversation up to the reply

    def end_hash(self, reply: str) -> str:
        """The chain hash after the reply: where the next turn continues."""
        return chain_hashes([Message("assistant", reply)], self.chain[-1])[-1]


@dataclass
class _Fork:
    """A new session started from another session's snapshot (a turn without a session id)."""

    state: bytes
    record: Conversation
    messages: int


class ChatSessions:
    def __init__(self, service: Service) -> None:
        self.service = service
        tokenizer = service.model.tokenizer
        self.template = ChatTemplate(tokenizer) if tokenizer is not None else None

    async def start_turn(self, owner: str, session_id: str | None, messages: list[Message],
                         params: SamplingParams, delta: bool = False,
                         constraint: Constraint | None = None) -> ChatTurn:
        """Find (or fork, or create) the turn's session, read what is new in `messages` and generate
        the reply. delta: the messages are only the new ones, not the whole history. constraint: the
        reply's tokens are chosen under it (response_format, service.constrained)."""
        if self.template is None:
            raise InvalidInputError("chat needs a model with a tokenizer")
        if delta:
            if session_id is None:
                raise InvalidInputError("X-HMT-Messages: new needs a session id (X-Session-Id)")
            turn = await self._start(owner, session_id, messages, [], params, None, False, True, constraint)
            assert turn is not None
            return turn
        chain = chain_hashes(messages)
        fork: _Fork | None = None
        if session_id is None:
            found, fork = await self._find(owner, chain)
            if found is not None and fork is None:
                turn = await self._start(owner, found, messages, chain, params, None, True,
                                         constraint=constraint)
                if turn is not None:
                    return turn
                # the found session moved on meanwhile: start anew, leaving it alone
            session_id = uuid.uuid4().hex
        turn = await self._start(owner, session_id, messages, chain, params, fork, False, constraint=constraint)
        assert turn is not None
        return turn

    async def finish(self, turn: ChatTurn) -> JobResult:
        """The saved result; then let a client without a session id find this session by its
        history next turn (before the response ends, so that next turn cannot come first)."""
        result: JobResult = await turn.saved
        await self.service.store.remember_chat(turn.owner, turn.end_hash(result.text), turn.session_id)
        return result

    async def _find(self, owner: str, chain: list[str]) -> tuple[str | None, _Fork | None]:
        """The session to continue (its id, no fork), a fork of one, or nothing."""
        store = self.service.store
        hit = await store.find_chat(owner, chain)
        if hit is not None:
            n, source = hit
            raw = await store.field(source, owner, CONVERSATION_FIELD)
            record = _record(raw) if raw else None
            if record is not None and record.chain[n - 1:n] == chain[n - 1:n]:
                if len(record.chain) == n:
                    return source, None
                k = max((m for m in record.snapshots if m <= n), default=None)
                data = await store.labelled_state(source, owner, str(k)) if k is not None else None
                if k is not None and data is not None:
                    pending = record.snapshots[k]
                    return None, _Fork(data, Conversation(chain[:k], pending, {k: pending}), k)
        return None, None

    async def _start(self, owner: str, session_id: str, messages: list[Message], chain: list[str],
                     params: SamplingParams, fork: _Fork | None, implicit: bool,
                     delta: bool = False, constraint: Constraint | None = None) -> ChatTurn | None:
        """Plan and launch a turn under the session's lock; None if an implicitly found session
        no longer ends where the request continues (it is left alone)."""
        service, store, template = self.service, self.service.store, self.template
        assert template is not None
        prompt = template.render(messages, generation_prompt=True)  # once: O(history) for full resends
        # read with the state: the record, the transcript a delta turn extends, what the job's save reads
        fields = (CONVERSATION_FIELD, *((TRANSCRIPT_FIELD,) if delta else ()), *JOB_FIELDS)
        async with store.leased(session_id, owner, must_exist=False, fields=fields) as lease:
            keep: dict[int, bytes] = {}  # snapshots this turn stores besides its result
            record: Conversation | None = None
            if lease.version < 0:
                state = service.state_from(fork.state) if fork else service.model.new_session()
                if fork:
                    record, keep[fork.messages] = fork.record, fork.state
            else:
                state = service.state_from(lease.data)
                raw = lease.fields[CONVERSATION_FIELD]
                record = _record(raw) if raw else None
            history = Transcript(list(messages))  # the whole conversation, for the transcript
            if delta:
                if lease.version >= 0:
                    history = Transcript.from_bytes(lease.fields[TRANSCRIPT_FIELD])
                    history.complete &= len(history.messages) == len(record.chain if record else [])
                    history.messages += messages
                prior = record.chain if record else []
                chain = prior + chain_hashes(messages, prior[-1] if prior else ROOT_HASH)
                plan = Plan("continued" if record else "new", None, len(prior), record.pending if record else "")
                text: str | None = template.continuation(messages) if prior or state.tokens_seen else prompt
            else:
                plan = plan_turn(record, chain)
                if implicit and plan.continuation != "continued":
                    return None
                text = template.suffix(messages, prompt, plan.absorbed)
            if text is None:  # the template does not render this conversation incrementally
                plan = restart_plan(record)
                text = prompt
            if plan.continuation == "new":
                keep[0] = lease.data or service.encode(state)
            if plan.base == EMPTY:
                state = service.model.new_session()
                keep[0] = service.encode(state)
            elif plan.base is not None:
                data = await store.labelled_state(session_id, owner, str(plan.base))
                if data is None:
                    raise CorruptStateError(f"snapshot {plan.base} of session {session_id!r} is missing")
                state = service.state_from(data)
            state = replace(state, version=max(state.version, lease.version))  # the version only grows
            tokens = await service.tokens_of(plan.pending + text, None)
            continuation: Continuation = "branched" if fork else plan.continuation
            records = _TurnRecords(template, messages, prompt, chain, record, plan, history, keep,
                                   service.settings.chat_snapshots)
            job, saved = service.launch(lease, owner, state, tokens, params, records.side_writes,
                                         constraint)
            metrics.CHAT_TURNS.labels(continuation).inc()
            return ChatTurn(session_id, owner, job, saved, len(tokens), continuation, chain)


@dataclass
class _TurnRecords:
    """What a turn's save writes beside the new state, from its result: the conversation record, the
    transcript, the state under the turn's message count, the snapshots kept and dropped."""

    template: ChatTemplate
    messages: list[Message]
    prompt: str  # render(messages, generation_prompt=True): what preceded the reply
    chain: list[str]
    record: Conversation | None
    plan: Plan
    history: Transcript
    keep: dict[int, bytes]  # snapshots to store, by message count, if the new record keeps them
    max_snapshots: int

    def side_writes(self, result: JobResult) -> SideWrites:
        ended = self.template.ended_turn(result.tokens, result.finish_reason)
        pending = self.template.closing(self.messages, self.prompt, result.text, ended)
        full_chain = self.chain + chain_hashes([Message("assistant", result.text)], self.chain[-1])
        new_record, drop = after_turn(self.record, self.plan, full_chain, pending, self.max_snapshots)
        snapshots = {n: s for n, s in self.keep.items() if n in new_record.snapshots}
        transcript = Transcript([*self.history.messages, Message("assistant", result.text)], self.history.complete)
        return SideWrites(fields={CONVERSATION_FIELD: new_record.to_bytes(),
                                  TRANSCRIPT_FIELD: transcript.to_bytes()}, state_as=str(len(full_chain)),
                          states={str(n): s for n, s in snapshots.items()}, drop_states=[str(n) for n in drop])


async def read_transcript(store: SessionStore, session_id: str, owner: str) -> Transcript:
    """A session's chat transcript (empty for a session that never chatted); SessionNotFoundError for
    an unknown session (or another key's)."""
    raw = await store.field(session_id, owner, TRANSCRIPT_FIELD)
    await store.get(session_id, owner)  # 404 for an unknown session (or another key's)
    return Transcript.from_bytes(raw)


def _record(raw: bytes) -> Conversation:
    try:
        return Conversation.from_bytes(raw)
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptStateError(f"the stored conversation record is unusable: {exc}") from None
