"""The turns of the Responses API: what a response reads, from which state, and what it stores.

A response is one chat turn. Without `previous_response_id` it reads its input (the instructions
as a system message, then the input messages, rendered with the chat template) into a fresh
session; with one, it starts from that response's stored state and reads only the new input:
the history is in the memory, never sent or read again. In a conversation it continues the
conversation's session (under its lock), reading the items added since its last response, then
its input. `usage.input_tokens_details.cached_tokens` counts the tokens that memory already held.
A stored response (`store`, the default) keeps its state (service.responses_store); `store: false`
runs on a state that is never written (in a conversation: the conversation still advances).

Instructions, as OpenAI defines them, apply to one response; here earlier responses' instructions
stay in the memory (the state has read them), and new ones are read as a system message before
the new input.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pydantic import BaseModel

from hmt_core import InvalidInputError, SessionState
from service.constrained import JsonConstraint, compiler_for
from service.conversation import ChatTemplate, Message
from service.errors import error_payload
from service.job import Job, JobResult, SegmentEvent
from service.memory import RECALL_FIELD, entry
from service.openai_api import OpenAIFrontend
from service.protocol import SegmentProgress
from service.responses_protocol import (
    ContentPartEvent,
    ConversationRef,
    CreateResponse,
    FunctionArgumentsDeltaEvent,
    FunctionArgumentsDoneEvent,
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionTool,
    IncompleteDetails,
    InputMessage,
    InputText,
    InputTokensDetails,
    Item,
    JsonObjectFormat,
    JsonSchemaFormat,
    MessageItem,
    OutputItemEvent,
    OutputText,
    ResponseError,
    ResponseEvent,
    ResponseObject,
    ResponseUsage,
    TextConfig,
    TextDeltaEvent,
    TextDoneEvent,
)
from service.responses_store import ConversationRecord, ResponseStore, new_id
from service.session_service import Service
from service.store import Lease, SideWrites
from service.streaming import sse

INCOMPLETE = {"length": "max_output_tokens"}  # finish reason -> incomplete_details.reason
CALL_HEAD = re.compile(r'\{"name":"(?P<name>[A-Za-z0-9_-]{1,64})","arguments":')  # a call, as constrained


@dataclass
class Run:
    """A started response: its job and the task that (when stored) saves it."""

    response: ResponseObject  # in progress; `final` once the job is done
    job: Job
    task: Any  # asyncio.Task[JobResult]
    messages: list[Message]
    prompt: str  # the new messages rendered with a generation prompt (closing() needs it)
    tokens: list[int]  # what this response reads
    cached: int  # tokens the base state held
    final: ResponseObject | None = None
    pending: str = ""
    items: list[Item] = field(default_factory=list)  # its input items
    keep: bool = False  # a conversation's turn: store the response apart once the conversation is saved
    tools: list[FunctionTool] = field(default_factory=list)  # a reply that calls one becomes a function_call
    buffered: bool = False  # with tools the reply's kind is known at its end: stream its events then
    forced: bool = False  # tool_choice required or named: the reply is a call, its arguments stream as they come
    call_id: str = field(default_factory=lambda: new_id("call"))
    expected: int = 0  # segments that reading the input commits
    progress: bool = False  # stream an hmt.segment event per committed segment (X-HMT-Progress: segments)
    saved: asyncio.Future[ResponseObject] | None = None  # ResponsesFrontend.completed, once


class ResponsesFrontend:
    def __init__(self, service: Service, store: ResponseStore) -> None:
        self.service, self.store = service, store
        self.chat = OpenAIFrontend(service)  # the model's name and chat template, as /v1/chat uses them
        chat_template = self.chat.chats.template
        self.compiler = compiler_for(service.model, chat_template.stop_token_ids if chat_template else ())
        self.running: dict[tuple[str, str], Run] = {}  # (owner, id): responses running on this replica

    @property
    def template(self) -> ChatTemplate:
        if self.chat.chats.template is None:
            raise InvalidInputError("the Responses API needs a model with a tokenizer")
        return self.chat.chats.template

    async def start(self, owner: str, body: CreateResponse) -> Run:
        service, template = self.service, self.template
        self.chat.check_model(body.model)
        inputs = body.messages
        instructions = [Message("system", body.instructions)] if body.instructions else []
        tools = body.functions if body.tool_choice != "none" else []
        if tools:  # what the model is told (it has no tool format of its own): the calls it may answer with
            instructions.append(Message("system", tools_prompt(tools)))
        params = service.sampling_params(
            max_tokens=body.max_output_tokens or service.settings.default_max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            stop=template.stop_strings, stop_token_ids=template.stop_token_ids)
        conversation_id = body.conversation_id
        text_format = body.text_format
        constraint = None
        if body.forced_tools:  # tool_choice required or named: the reply is one of the calls
            constraint = await self.compiler.compile({"anyOf": [call_schema(t) for t in body.forced_tools]},
                                                     "tools[].parameters")
        elif isinstance(text_format, JsonSchemaFormat):
            constraint = await self.compiler.compile(text_format.json_schema)
            text_format = text_format.model_copy(update={"strict": True})  # what was done, whatever was asked
        elif isinstance(text_format, JsonObjectFormat):
            constraint = await self.compiler.compile({"type": "object"})
        response = ResponseObject(
            id=new_id("resp"), created_at=int(time.time()), status="in_progress", model=self.chat.model_name,
            previous_response_id=body.previous_response_id, instructions=body.instructions,
            truncation=body.truncation or "disabled", top_p=params.top_p, temperature=params.temperature,
            max_output_tokens=body.max_output_tokens,
            store=body.store, metadata=body.metadata or {}, safety_identifier=body.safety_identifier,
            prompt_cache_key=body.prompt_cache_key, user=body.user,
            conversation=ConversationRef(id=conversation_id) if conversation_id else None,
            text=TextConfig(format=text_format), tools=body.functions,
            tool_choice=body.tool_choice or "auto",  # type: ignore[arg-type]  # checked in CreateResponse
            service_tier="default" if body.service_tier in (None, "auto") else body.service_tier)
        items = [input_item(m) for m in inputs]
        if conversation_id is not None:
            run = await self._in_conversation(owner, conversation_id, response, instructions, items, params,
                                              constraint, tools)
            run.forced = bool(body.forced_tools)  # before the job's first token reaches the event loop
            return run
        if body.previous_response_id is not None:
            base = await self.store.base(body.previous_response_id, owner)
            state, pending, recall = service.state_from(base.state), base.pending, base.recall
        else:
            state, pending, recall = service.model.new_session(), "", None
        run = await self._prepare(response, state, pending, [*instructions, *map(chat_message, items)], items, tools)
        run.forced = bool(body.forced_tools)
        if body.store:
            def side(result: JobResult) -> SideWrites:  # the response is saved with the state, atomically
                final = self.finish(run, result)
                writes = self.store.writes(final, run.items, run.pending)
                if recall:  # the previous response's recall history, as it is when this turn commits nothing
                    writes.fields[RECALL_FIELD] = recall
                return writes

            def launch(lease: Lease) -> tuple[Job, Any]:
                lease.fields[RECALL_FIELD] = recall  # what the job's commits, if any, are merged onto
                return service.launch(lease, owner, state, run.tokens, params, side, constraint, self.store.store)

            run.job, run.task = await self.store.launch(response.id, owner, launch)
        else:
            run.job, run.task = service.run_unsaved(state, run.tokens, params, constraint)
        return run

    async def _prepare(self, response: ResponseObject, state: SessionState, pending: str, messages: list[Message],
                       items: list[Item], tools: list[FunctionTool]) -> Run:
        """The text a turn reads on `state`: the messages as they continue it (or open a fresh one)."""
        prompt = self.template.render(messages, generation_prompt=True)
        text = pending + self.template.continuation(messages) if state.tokens_seen else prompt
        tokens = await self.service.tokens_of(text, None)
        # lazy commit: the window's tokens and the new ones, less the last, fill whole segments
        expected = (len(state.window) + len(tokens) - 1) // self.service.model.hmt_config.segment_tokens
        return Run(response, None, None, messages, prompt, tokens, state.tokens_seen,  # type: ignore[arg-type]
                   items=items, tools=tools, buffered=bool(tools), expected=expected)

    async def _in_conversation(self, owner: str, conversation_id: str, response: ResponseObject,
                               instructions: list[Message], items: list[Item], params: Any,
                               constraint: JsonConstraint | None, tools: list[FunctionTool]) -> Run:
        """A turn of a conversation, under its lock: it reads the items added since the last turn (all
        of them again from a fresh state when one it had read was deleted), then its own input."""
        service = self.service
        async with self.store.conversation(conversation_id, owner) as (lease, record):
            if record.stale:
                state, pending, unread = service.model.new_session(), "", record.items
            else:
                state, pending, unread = service.state_from(lease.data), record.pending, record.items[record.read:]
            state = replace(state, version=max(state.version, lease.version))  # the version only grows
            messages = [*map(chat_message, unread), *instructions, *map(chat_message, items)]
            run = await self._prepare(response, state, pending, messages, items, tools)
            run.keep = response.store

            def side(result: JobResult) -> SideWrites:  # the conversation advances with the state, atomically
                final = self.finish(run, result)
                after = ConversationRecord(record.created_at, record.metadata, [*record.items, *items, *final.output])
                after.read, after.pending = len(after.items), run.pending
                return self.store.conversation_writes(after)

            run.job, run.task = service.launch(lease, owner, state, run.tokens, params, side, constraint,
                                               self.store.store)
        return run

    def finish(self, run: Run, result: JobResult) -> ResponseObject:
        """The response once its job is done (and the template text its state still owes)."""
        if run.final is not None:
            return run.final
        template = self.template
        ended = template.ended_turn(result.tokens, result.finish_reason)
        run.pending = template.closing(run.messages, run.prompt, result.text, ended)
        status: Literal["completed", "incomplete", "cancelled"] = "completed"
        if result.finish_reason in INCOMPLETE:
            status = "incomplete"
        elif result.finish_reason == "cancelled":  # the client went away mid-stream
            status = "cancelled"
        output: Item = MessageItem(id=self.message_id(run), role="assistant", content=[OutputText(text=result.text)],
                                   status="incomplete" if status != "completed" else "completed")
        call = as_call(result.text, run.tools) if status == "completed" else None
        head = CALL_HEAD.match(result.text) if run.forced and call is None else None
        if head is not None:  # a forced call cut short: the arguments so far
            call = head["name"], result.text[head.end():]
        if call is not None:
            name, arguments = call
            output = FunctionCallItem(id=self.call_item_id(run), call_id=run.call_id, name=name, arguments=arguments,
                                      status="completed" if status == "completed" else "incomplete")
        context = run.cached + len(run.tokens)  # input tokens: those held in memory and those read now
        usage = ResponseUsage(input_tokens=context, input_tokens_details=InputTokensDetails(cached_tokens=run.cached),
                              output_tokens=len(result.tokens), total_tokens=context + len(result.tokens))
        run.final = run.response.model_copy(update={
            "status": status, "completed_at": int(time.time()) if status == "completed" else None,
            "incomplete_details": IncompleteDetails(reason=INCOMPLETE[result.finish_reason or ""])
            if status == "incomplete" else None, "output": [output], "usage": usage})
        return run.final

    @staticmethod
    def message_id(run: Run) -> str:
        return "msg_" + run.response.id.removeprefix("resp_")  # one output item per response

    @staticmethod
    def call_item_id(run: Run) -> str:
        return "fc_" + run.response.id.removeprefix("resp_")

    # ----- streaming ------------------------------------------------------------------------

    def event_stream(self, run: Run, start: float, owner: str) -> AsyncIterator[str]:
        """The response's server-sent events, from its job's tokens (`Job.stream_tokens`)."""
        counter = iter(range(1 << 62))

        def event(model: type[BaseModel], **fields: Any) -> str:
            data = model(sequence_number=next(counter), **fields).model_dump(mode="json")
            return sse(data, data["type"])

        item_id = self.message_id(run)
        where = {"item_id": item_id, "output_index": 0, "content_index": 0}

        def opened(item: Item) -> Iterator[str]:
            """The events that open an output item (a message: with its empty text part)."""
            if isinstance(item, MessageItem):
                empty = item.model_copy(update={"status": "in_progress", "content": []})
                yield event(OutputItemEvent, type="response.output_item.added", output_index=0, item=empty)
                yield event(ContentPartEvent, type="response.content_part.added", part=OutputText(text=""),
                            **where)
            elif isinstance(item, FunctionCallItem):
                empty_call = item.model_copy(update={"status": "in_progress", "arguments": ""})
                yield event(OutputItemEvent, type="response.output_item.added", output_index=0, item=empty_call)

        def closed(item: Item, sent: int) -> Iterator[str]:
            """The events that end an output item, after the `sent` characters of its text (or
            arguments) streamed so far: the rest as one delta."""
            if isinstance(item, MessageItem):
                part = item.content[0]
                if part.text[sent:]:
                    yield event(TextDeltaEvent, delta=part.text[sent:], **where)
                yield event(TextDoneEvent, text=part.text, **where)
                yield event(ContentPartEvent, type="response.content_part.done", part=part, **where)
            elif isinstance(item, FunctionCallItem):
                call = {"item_id": item.id, "output_index": 0}
                if item.arguments[sent:]:
                    yield event(FunctionArgumentsDeltaEvent, delta=item.arguments[sent:], **call)
                yield event(FunctionArgumentsDoneEvent, arguments=item.arguments, **call)
            yield event(OutputItemEvent, type="response.output_item.done", output_index=0, item=item)

        async def stream() -> AsyncIterator[str]:
            try:
                yield event(ResponseEvent, type="response.created", response=run.response)
                yield event(ResponseEvent, type="response.in_progress", response=run.response)
                if not run.buffered:
                    for line in opened(MessageItem(id=item_id, role="assistant", content=[])):
                        yield line
                text, sent, call_opened = "", 0, False  # a forced call: its arguments stream once it is named
                async for token in run.job.stream(start):
                    if isinstance(token, SegmentEvent):
                        if run.progress:
                            yield self.progress(run, token)
                        continue
                    if not token.text:
                        continue
                    if not run.buffered:
                        yield event(TextDeltaEvent, delta=token.text, **where)
                        sent += len(token.text)
                    elif run.forced:
                        text += token.text
                        head = CALL_HEAD.match(text)
                        if head is not None and not call_opened:
                            call_opened, text = True, text[head.end():]
                            for line in opened(FunctionCallItem(id=self.call_item_id(run), call_id=run.call_id,
                                                                name=head["name"], arguments="")):
                                yield line
                        if call_opened and len(text) - 1 > sent:  # the last character may close the call
                            call = {"item_id": self.call_item_id(run), "output_index": 0}
                            yield event(FunctionArgumentsDeltaEvent, delta=text[sent:-1], **call)
                            sent = len(text) - 1
                try:
                    final = await self.completed(run, owner)
                except Exception as exc:  # the job or its save failed: the response failed
                    _, body = error_payload(exc)
                    error = ResponseError(code=body["error"]["type"], message=body["error"]["message"])
                    failed = run.response.model_copy(update={"status": "failed", "error": error})
                    yield event(ResponseEvent, type="response.failed", response=failed)
                    return
                done = final.output[0]
                if call_opened and not (isinstance(done, FunctionCallItem) and done.arguments.startswith(text[:sent])):
                    sent = 0  # cannot happen under the constraint; the item's own events say what it is
                if run.buffered and not call_opened:
                    for line in opened(done):
                        yield line
                    sent = 0
                for line in closed(done, sent):
                    yield line
                kind = "response.completed" if final.status == "completed" else "response.incomplete"
                yield event(ResponseEvent, type=kind, response=final)
            finally:
                run.job.cancelled = True  # no-op after the end; on disconnect, stops sampling

        return stream()

    @staticmethod
    def progress(run: Run, event: SegmentEvent) -> str:
        """An `hmt.segment` event (asked for with `X-HMT-Progress: segments`; not numbered, so the spec's
        events keep their sequence): a segment committed while the response reads its input (and
        then while it answers: `segments_committed` can pass `segments_expected`, the input's)."""
        progress = SegmentProgress(segments_committed=event.segments_committed, segments_total=event.segments_total,
                                   tokens_seen=event.tokens_seen, segments_expected=run.expected,
                                   recall_distance=event.recall.distance, recall=entry(event.recall))
        return sse({"type": "hmt.segment", **progress.model_dump(mode="json")}, "hmt.segment")

    def track(self, owner: str, run: Run) -> None:
        """Make a started response cancellable (POST /v1/responses/{id}/cancel) while it runs."""
        key = (owner, run.response.id)
        self.running[key] = run
        run.task.add_done_callback(lambda _: self.running.pop(key, None))

    async def cancel(self, response_id: str, owner: str) -> ResponseObject:
        """Stop a response running on this replica (as a client leaving mid-stream does) and return
        it once stored, with status `cancelled` and the reply so far; a finished one as stored."""
        run = self.running.get((owner, response_id))
        if run is None:
            return await self.store.get(response_id, owner)
        run.job.cancelled = True
        return await self.completed(run, owner)

    async def completed(self, run: Run, owner: str) -> ResponseObject:
        """The finished response, once saved (so the next request can name it); once, however
        many wait for it (its request, a cancel)."""
        if run.saved is None:
            run.saved = asyncio.ensure_future(self._completed(run, owner))
        return await asyncio.shield(run.saved)

    async def _completed(self, run: Run, owner: str) -> ResponseObject:
        result: JobResult = await run.task
        final = self.finish(run, result)
        if run.keep:
            await self.store.keep(final.id, owner, self.service.encode(result.state), result.state.version,
                                  self.store.writes(final, run.items, run.pending))
        if run.response.store:
            await self.store.saved(owner)
        return final


def input_item(message: InputMessage) -> Item:
    if message.kind == "function_call":
        return FunctionCallItem(id=new_id("fc"), call_id=message.call_id, name=message.name, arguments=message.text)
    if message.kind == "function_call_output":
        return FunctionCallOutputItem(id=new_id("fco"), call_id=message.call_id, output=message.text)
    text = OutputText(text=message.text) if message.part == "output_text" else InputText(text=message.text)
    return MessageItem(id=new_id("msg"), role=message.role, content=[text])  # type: ignore[arg-type]  # parse_input


def chat_message(item: Item) -> Message:
    """An item as the chat template reads it: developer as system, a call as the JSON the model
    answers calls with, a call's output as a message of the role tool."""
    if isinstance(item, FunctionCallItem):
        try:
            arguments: Any = json.loads(item.arguments)
        except ValueError:
            arguments = item.arguments
        return Message("assistant", json.dumps({"name": item.name, "arguments": arguments}, separators=(",", ":")))
    if isinstance(item, FunctionCallOutputItem):
        return Message("tool", item.output)
    text = "".join(part.text for part in item.content)
    return Message("system" if item.role == "developer" else item.role, text)


def call_schema(tool: FunctionTool) -> dict[str, Any]:
    """The JSON a call of `tool` is: {"name": ..., "arguments": {...}}, the arguments per its parameters."""
    return {"type": "object", "properties": {"name": {"const": tool.name},
                                             "arguments": tool.parameters or {"type": "object"}},
            "required": ["name", "arguments"], "additionalProperties": False}


def tools_prompt(tools: list[FunctionTool]) -> str:
    described = [{"name": t.name, "description": t.description, "parameters": t.parameters} for t in tools]
    return ("You can call these functions. To call one, answer with only the JSON "
            '{"name": <function name>, "arguments": {...}}.\n' + json.dumps(described, ensure_ascii=False))


def as_call(text: str, tools: list[FunctionTool]) -> tuple[str, str] | None:
    """(name, arguments as JSON) when a reply is exactly a call of one of the tools; the arguments
    as the model wrote them when it wrote the call compactly (as constrained calls are, so they
    equal what streamed)."""
    if not tools:
        return None
    try:
        call = json.loads(text)
    except ValueError:
        return None
    if not isinstance(call, dict) or set(call) != {"name", "arguments"} or not isinstance(call["arguments"], dict):
        return None
    if call["name"] not in {t.name for t in tools}:
        return None
    head = CALL_HEAD.match(text)
    if head is not None and head["name"] == call["name"] and text.endswith("}"):
        return call["name"], text[head.end():-1]
    return call["name"], json.dumps(call["arguments"], ensure_ascii=False)
