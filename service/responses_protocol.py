"""Request, response and event bodies of the Responses API (POST /v1/responses), as the Open
Responses spec defines them for text output.

What the model cannot take (image, file, audio or video input, built-in tools, background mode,
reasoning options) and what this server does not build yet (allowed_tools, prompt templates,
logprobs) is refused with a 400 that says so, never ignored: a client
learns at once instead of getting something else than it asked for. Unknown fields are ignored,
as OpenAI's SDKs add new ones over time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from service.protocol import Text, check_unicode

INPUT_ROLES = ("user", "system", "developer", "assistant")
TEXT_PARTS = ("input_text", "output_text")
MEDIA_PARTS = ("input_image", "input_file", "input_audio", "input_video")
MAX_METADATA_KEYS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512  # the spec's limits
# tools that run on the provider's side: this server runs the model alone
BUILT_IN_TOOLS = ("web_search", "web_search_preview", "file_search", "computer_use", "computer_use_preview",
                  "code_interpreter", "image_generation", "mcp", "local_shell", "shell", "apply_patch", "custom")
NOT_YET = "is not supported yet by this server"
FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"


@dataclass(frozen=True)
class InputMessage:
    """One input item: a message (its content parts joined into text), a function call (the
    arguments as text) or a function call's output."""

    role: str  # as sent (developer stays developer in the stored items); tool for a call's output
    text: str
    part: str  # the content part type it came as (input_text; output_text for assistant history)
    kind: Literal["message", "function_call", "function_call_output"] = "message"
    call_id: str = ""
    name: str = ""


def parse_input(raw: str | list[dict[str, Any]]) -> list[InputMessage]:
    """The input as messages; ValueError naming the item for anything that is not a text message."""
    if isinstance(raw, str):
        return [InputMessage("user", raw, "input_text")]
    if not raw:
        raise ValueError("input: give a string or at least one message item")
    return [_message(i, item) for i, item in enumerate(raw)]


def _message(i: int, item: dict[str, Any]) -> InputMessage:
    where = f"input[{i}]"
    kind = item.get("type", "message")
    if kind in ("function_call_output", "function_call"):
        call_id = item.get("call_id")
        if not isinstance(call_id, str) or not 1 <= len(call_id) <= 64:
            raise ValueError(f"{where}.call_id: give the call's id (1 to 64 characters)")
        if kind == "function_call":
            name, arguments = item.get("name"), item.get("arguments")
            if not isinstance(name, str) or re.fullmatch(FUNCTION_NAME, name) is None:
                raise ValueError(f"{where}.name: a function name matching {FUNCTION_NAME}")
            if not isinstance(arguments, str):
                raise ValueError(f"{where}.arguments: the arguments as a JSON string")
            return InputMessage("assistant", check_unicode(arguments), "", kind, call_id, name)
        output = item.get("output")
        if isinstance(output, list):
            output = _text_of(f"{where}.output", output)
        if not isinstance(output, str):
            raise ValueError(f"{where}.output: a string or input_text parts")
        return InputMessage("tool", check_unicode(output), "", kind, call_id)
    if kind == "item_reference":
        raise ValueError(f"{where}: item references {NOT_YET}; continue with previous_response_id")
    if kind != "message":
        raise ValueError(f"{where}: items of type {kind!r} are not supported (give message items)")
    role = item.get("role")
    if role not in INPUT_ROLES:
        raise ValueError(f"{where}: role {role!r} is not supported (use one of {', '.join(INPUT_ROLES)})")
    content = item.get("content")
    if isinstance(content, str):
        return InputMessage(role, check_unicode(content), "output_text" if role == "assistant" else "input_text")
    if not isinstance(content, list):
        raise ValueError(f"{where}.content: give a string or a list of content parts")
    return InputMessage(role, _text_of(f"{where}.content", content),
                        "output_text" if role == "assistant" else "input_text")


def _text_of(where: str, parts: list[Any]) -> str:
    texts: list[str] = []
    for j, part in enumerate(parts):
        part_type = part.get("type") if isinstance(part, dict) else None
        if part_type in MEDIA_PARTS:
            raise ValueError(f"{where}[{j}]: {part_type} is not supported: this model reads text only")
        if part_type not in TEXT_PARTS or not isinstance(part.get("text"), str):  # type: ignore[union-attr]
            raise ValueError(f"{where}[{j}]: give input_text parts ({{'type': 'input_text', 'text': ...}})")
        texts.append(check_unicode(part["text"]))  # type: ignore[index]
    return "".join(texts)


class CreateResponse(BaseModel):
    """POST /v1/responses. Accepted and echoed without effect: `truncation` (an HMT session never
    outgrows its context: its memory is bounded), `user`, `safety_identifier`, `prompt_cache_key`,
    `parallel_tool_calls`, `service_tier`."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    model: str
    input: Text | list[dict[str, Any]] | None = None
    instructions: Text | None = None
    previous_response_id: str | None = None
    store: bool = True
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    parallel_tool_calls: bool | None = None
    service_tier: str | None = None
    # refused unless at their defaults (see _supported)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    max_tool_calls: int | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    background: bool | None = None
    conversation: str | dict[str, Any] | None = None
    include: list[str] | None = None
    prompt: dict[str, Any] | None = None
    top_logprobs: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None

    @model_validator(mode="after")
    def _supported(self) -> CreateResponse:
        if self.input is None:
            raise ValueError("input: required (a string or message items)")
        parse_input(self.input)
        if self.background:
            raise ValueError("background: true is not supported (a response runs within its request; "
                             "use stream: true to see it as it is made)")
        if self.reasoning and any(v is not None for v in self.reasoning.values()):
            raise ValueError("reasoning: this model has no reasoning options")
        names = [tool.name for tool in self.functions]
        if len(set(names)) != len(names):
            raise ValueError("tools: function names must be unique")
        choice = self.tool_choice
        if isinstance(choice, dict):
            if choice.get("type") != "function" or choice.get("name") not in names:
                raise ValueError("tool_choice: {'type': 'function', 'name': ...} naming one of the tools "
                                 "(allowed_tools and built-in tools are not supported)")
        elif choice not in (None, "none", "auto", "required"):
            raise ValueError("tool_choice: 'none', 'auto', 'required' or {'type': 'function', 'name': ...}")
        elif choice == "required" and not names:
            raise ValueError("tool_choice: 'required' needs function tools")
        self.text_format  # noqa: B018  # validates it
        if (self.text or {}).get("verbosity") not in (None, "medium"):
            raise ValueError("text.verbosity: only 'medium' (this model has no verbosity control)")
        if self.conversation is not None and self.previous_response_id is not None:
            raise ValueError("give at most one of conversation and previous_response_id")
        if isinstance(self.conversation, dict) and not isinstance(self.conversation.get("id"), str):
            raise ValueError("conversation: give its id, or {'id': ...}")
        if self.include:
            raise ValueError(f"include: {', '.join(self.include)} {NOT_YET}")
        if self.prompt is not None:
            raise ValueError(f"prompt: prompt templates {NOT_YET}")
        if self.top_logprobs:
            raise ValueError(f"top_logprobs: logprobs {NOT_YET}")
        if self.frequency_penalty or self.presence_penalty:
            raise ValueError("frequency_penalty and presence_penalty are not supported")
        check_metadata(self.metadata)
        return self

    @property
    def messages(self) -> list[InputMessage]:
        assert self.input is not None  # checked in _supported
        return parse_input(self.input)

    @property
    def functions(self) -> list[FunctionTool]:
        tools = []
        for i, tool in enumerate(self.tools or []):
            kind = str(tool.get("type"))
            if kind.startswith(BUILT_IN_TOOLS):
                raise ValueError(f"tools: the built-in tool {kind!r} is not supported: this server runs the model "
                                 "alone, with no tools of its own")
            if kind != "function":
                raise ValueError(f"tools: tools of type {kind!r} are not supported")
            try:
                tools.append(FunctionTool.model_validate(tool))
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
                raise ValueError(f"tools[{i}]: {problems}") from None
        return tools

    @property
    def forced_tools(self) -> list[FunctionTool]:
        """The tools one of which the reply must call (tool_choice required, or one named)."""
        if isinstance(self.tool_choice, dict):
            return [t for t in self.functions if t.name == self.tool_choice["name"]]
        return self.functions if self.tool_choice == "required" else []

    @property
    def text_format(self) -> TextFormat | JsonObjectFormat | JsonSchemaFormat:
        raw = (self.text or {}).get("format") or {"type": "text"}
        kind = raw.get("type") if isinstance(raw, dict) else raw
        try:
            if kind == "json_schema":
                return JsonSchemaFormat.model_validate(raw)
            if kind == "json_object":
                return JsonObjectFormat.model_validate(raw)
            if kind == "text":
                return TextFormat.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"text.format: {problems}") from None
        raise ValueError(f"text.format: type {kind!r} is not supported (text, json_object or json_schema)")

    @property
    def conversation_id(self) -> str | None:
        if isinstance(self.conversation, dict):
            return str(self.conversation["id"])
        return self.conversation


def check_metadata(metadata: dict[str, str] | None) -> None:
    if metadata is None:
        return
    if len(metadata) > MAX_METADATA_KEYS:
        raise ValueError(f"metadata: at most {MAX_METADATA_KEYS} keys")
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY or len(value) > MAX_METADATA_VALUE:
            raise ValueError(f"metadata: keys of at most {MAX_METADATA_KEY} characters, values of at most "
                             f"{MAX_METADATA_VALUE}")


# ----- conversations ---------------------------------------------------------------------------

MAX_ADDED_ITEMS = 20  # items per create or add, as the spec allows


class _ConversationBody(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class CreateConversation(_ConversationBody):
    items: list[dict[str, Any]] | None = Field(None, max_length=MAX_ADDED_ITEMS)
    metadata: dict[str, str] | None = None

    @model_validator(mode="after")
    def _valid(self) -> CreateConversation:
        if self.items:
            parse_input(self.items)
        check_metadata(self.metadata)
        return self


class UpdateConversation(_ConversationBody):
    metadata: dict[str, str]

    @model_validator(mode="after")
    def _valid(self) -> UpdateConversation:
        check_metadata(self.metadata)
        return self


class AddItems(_ConversationBody):
    items: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_ADDED_ITEMS)

    @model_validator(mode="after")
    def _valid(self) -> AddItems:
        parse_input(self.items)
        return self


class ConversationObject(BaseModel):
    id: str
    object: Literal["conversation"] = "conversation"
    created_at: int
    metadata: dict[str, str] = Field(default_factory=dict)


class DeletedConversation(BaseModel):
    id: str
    object: Literal["conversation.deleted"] = "conversation.deleted"
    deleted: Literal[True] = True


class ConversationRef(BaseModel):
    id: str


# ----- the response object ---------------------------------------------------------------------

class InputText(BaseModel):
    type: Literal["input_text"] = "input_text"
    text: str


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[dict[str, Any]] = Field(default_factory=list)
    logprobs: list[dict[str, Any]] = Field(default_factory=list)


ItemStatus = Literal["in_progress", "completed", "incomplete"]


class MessageItem(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: ItemStatus = "completed"
    role: Literal["user", "system", "developer", "assistant"]
    content: list[InputText | OutputText]


class FunctionCallItem(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: ItemStatus = "completed"


class FunctionCallOutputItem(BaseModel):
    type: Literal["function_call_output"] = "function_call_output"
    id: str
    call_id: str
    output: str
    status: ItemStatus = "completed"


Item = Annotated[MessageItem | FunctionCallItem | FunctionCallOutputItem, Field(discriminator="type")]
ITEMS: TypeAdapter[list[Item]] = TypeAdapter(list[Item])


class InputTokensDetails(BaseModel):
    cached_tokens: int = Field(description="tokens of the conversation the memory already held: not read again")


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int = Field(description="the whole context: the tokens held in memory plus those read now")
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class ResponseError(BaseModel):
    code: str
    message: str


class IncompleteDetails(BaseModel):
    reason: str


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"] = "function"
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class TextFormat(BaseModel):
    type: Literal["text"] = "text"


class JsonObjectFormat(BaseModel):
    """Any JSON object."""

    type: Literal["json_object"] = "json_object"


class JsonSchemaFormat(BaseModel):
    """JSON that matches `schema` (always enforced, whatever `strict` says: sampling is constrained)."""

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    type: Literal["json_schema"] = "json_schema"
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class TextConfig(BaseModel):
    format: TextFormat | JsonObjectFormat | JsonSchemaFormat = Field(default_factory=TextFormat)
    verbosity: Literal["medium"] = "medium"


ResponseStatus = Literal["in_progress", "completed", "incomplete", "failed", "cancelled"]


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    completed_at: int | None = None
    status: ResponseStatus
    incomplete_details: IncompleteDetails | None = None
    model: str
    previous_response_id: str | None = None
    instructions: str | None = None
    output: list[Item] = Field(default_factory=list)
    error: ResponseError | None = None
    tools: list[FunctionTool] = Field(default_factory=list)
    tool_choice: Literal["none", "auto", "required"] | dict[str, str] = "auto"
    truncation: Literal["auto", "disabled"] = "disabled"
    parallel_tool_calls: bool = True
    text: TextConfig = Field(default_factory=TextConfig)
    top_p: float
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    top_logprobs: int = 0
    temperature: float
    reasoning: None = None
    usage: ResponseUsage | None = None
    max_output_tokens: int | None = None
    max_tool_calls: int | None = None
    store: bool
    background: bool = False
    service_tier: str = "default"
    metadata: dict[str, str] = Field(default_factory=dict)
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    user: str | None = None
    conversation: ConversationRef | None = None


class InputItemList(BaseModel):
    """GET /v1/responses/{id}/input_items, GET /v1/conversations/{id}/items: a cursor page."""

    object: Literal["list"] = "list"
    data: list[Item]
    first_id: str | None
    last_id: str | None
    has_more: bool


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: Literal[True] = True


# ----- streaming events (each the `data` of an SSE event named by its type) ---------------------

class ResponseEvent(BaseModel):
    """response.created, .in_progress, .completed, .incomplete, .failed."""

    type: Literal["response.created", "response.in_progress", "response.completed", "response.incomplete",
                  "response.failed"]
    sequence_number: int
    response: ResponseObject


class OutputItemEvent(BaseModel):
    type: Literal["response.output_item.added", "response.output_item.done"]
    sequence_number: int
    output_index: int
    item: Item


class _ItemEvent(BaseModel):
    """An event about one output item (and, for text, one of its content parts)."""

    sequence_number: int
    item_id: str
    output_index: int


class _PartEvent(_ItemEvent):
    content_index: int


class ContentPartEvent(_PartEvent):
    type: Literal["response.content_part.added", "response.content_part.done"]
    part: OutputText


class TextDeltaEvent(_PartEvent):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    delta: str
    logprobs: list[dict[str, Any]] = Field(default_factory=list)


class TextDoneEvent(_PartEvent):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    text: str
    logprobs: list[dict[str, Any]] = Field(default_factory=list)


class FunctionArgumentsDeltaEvent(_ItemEvent):
    type: Literal["response.function_call_arguments.delta"] = "response.function_call_arguments.delta"
    delta: str


class FunctionArgumentsDoneEvent(_ItemEvent):
    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
    arguments: str
