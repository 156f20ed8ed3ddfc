"""Request and response bodies of the OpenAI-compatible API (/v1), mirroring OpenAI's schema.

Fields OpenAI defines that this server cannot honour (n > 1, logprobs, tools ...) are accepted
only at their defaults, so a client learns at once, with a 400, instead of getting something
else than it asked for. Unknown fields are ignored, as OpenAI's SDKs add new ones over time.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_serializer, model_validator

from service.protocol import StopString, Text, Usage, check_unicode

ROLES = ("system", "developer", "user", "assistant")


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stop: StopString | list[StopString] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logprobs: bool | int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    @model_validator(mode="after")
    def _supported(self) -> _Request:
        if self.n != 1:
            raise ValueError("n: only n=1 is supported")
        if self.logprobs:
            raise ValueError("logprobs: not supported")
        if self.frequency_penalty or self.presence_penalty:
            raise ValueError("frequency_penalty and presence_penalty are not supported")
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise ValueError("stop: at most 4 sequences")
        return self

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: str
    content: Text | list[dict[str, Any]] | None = None
    name: Text | None = None
    tool_calls: list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _text_only(self) -> ChatMessage:
        if self.role not in ROLES:
            raise ValueError(f"role {self.role!r} is not supported (use one of {', '.join(ROLES)})")
        if self.tool_calls:
            raise ValueError("tool calls are not supported")
        if isinstance(self.content, list):
            for part in self.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("only text content parts are supported")
                check_unicode(part["text"])
        return self

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part["text"] for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _chat_supported(self) -> ChatCompletionRequest:
        if self.tools:
            raise ValueError("tools: not supported")
        self.response_schema  # noqa: B018  # validates it
        return self

    @property
    def response_schema(self) -> dict[str, Any] | None:
        """The JSON schema the reply must match (response_format json_schema / json_object), if any."""
        kind = (self.response_format or {}).get("type", "text")
        if kind == "text":
            return None
        if kind == "json_object":
            return {"type": "object"}
        spec = (self.response_format or {}).get("json_schema")
        if kind != "json_schema" or not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise ValueError("response_format: {'type': 'text'}, {'type': 'json_object'} or {'type': 'json_schema', "
                             "'json_schema': {'name': ..., 'schema': {...}}}")
        return dict(spec.get("schema") or {"type": "object"})

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Request):
    prompt: Text | list[Text] | list[StrictInt]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _completion_supported(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo: not supported")
        if self.suffix:
            raise ValueError("suffix: not supported")
        if self.best_of not in (None, 1):
            raise ValueError("best_of: only 1 is supported")
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str) and len(self.prompt) != 1:
            raise ValueError("prompt: give one prompt (batches of prompts are not supported)")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatCompletionMessage
    finish_reason: str
    logprobs: None = None


class _Response(BaseModel):
    """Fields every completion object and chunk carries; `object` and `choices` differ."""

    id: str
    created: int
    model: str
    system_fingerprint: str


class ChatCompletion(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _only_set(self, handler: Any) -> dict[str, Any]:  # OpenAI sends {"content": "x"}, not role: null
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class Completion(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "hmt-serve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorBody(BaseModel):
    error: OpenAIErrorDetail


def openai_error_body(status: int, kind: str, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape: type is the family, code our specific kind."""
    family = ("authentication_error" if status == 401 else "server_error" if status >= 500
              else "invalid_request_error")
    return OpenAIErrorBody(error=OpenAIErrorDetail(message=message, type=family, param=param,
                                                   code=kind)).model_dump()
