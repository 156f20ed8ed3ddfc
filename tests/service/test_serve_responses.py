"""The Responses API (/v1/responses), driven by the official `openai` package against live servers
sharing one Redis. Every response object and streaming event is validated against the Open
Responses schema (the `openresponses-types` models)."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import openresponses_types as spec
import pytest
from serve_helpers import Fleet, RedisServer, Server

EVENT_MODELS: dict[str, type[Any]] = {
    "response.created": spec.ResponseCreatedStreamingEvent,
    "response.in_progress": spec.ResponseInProgressStreamingEvent,
    "response.output_item.added": spec.ResponseOutputItemAddedStreamingEvent,
    "response.content_part.added": spec.ResponseContentPartAddedStreamingEvent,
    "response.output_text.delta": spec.ResponseOutputTextDeltaStreamingEvent,
    "response.output_text.done": spec.ResponseOutputTextDoneStreamingEvent,
    "response.content_part.done": spec.ResponseContentPartDoneStreamingEvent,
    "response.output_item.done": spec.ResponseOutputItemDoneStreamingEvent,
    "response.function_call_arguments.delta": spec.ResponseFunctionCallArgumentsDeltaStreamingEvent,
    "response.function_call_arguments.done": spec.ResponseFunctionCallArgumentsDoneStreamingEvent,
    "response.completed": spec.ResponseCompletedStreamingEvent,
    "response.incomplete": spec.ResponseIncompleteStreamingEvent,
    "response.failed": spec.ResponseFailedStreamingEvent,
}


def sdk_for(server: Server, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def sdk(server: Server) -> Iterator[openai.OpenAI]:
    with sdk_for(server) as client:
        yield client


@pytest.fixture(scope="module")
def model_id(sdk: openai.OpenAI) -> str:
    return sdk.models.list().data[0].id


def spec_view(data: dict[str, Any]) -> dict[str, Any]:
    """openresponses-types 2.4 types JsonSchemaResponseFormat.schema as null (its generator dropped the
    object type): the response to check against it, with the schema (which the spec and OpenAI echo) left out."""
    if data["text"]["format"]["type"] != "json_schema":
        return data
    return {**data, "text": {**data["text"], "format": {**data["text"]["format"], "schema": None}}}


def valid(response: openai.types.responses.Response | dict[str, Any]) -> dict[str, Any]:
    """The response as JSON, checked against the Open Responses schema."""
    data = response if isinstance(response, dict) else response.model_dump(mode="json", by_alias=True)
    spec.ResponseResource.model_validate(spec_view(data))
    return data


def valid_event(event: dict[str, Any]) -> None:
    """A streaming event, checked against its Open Responses model."""
    EVENT_MODELS[event["type"]].model_validate({**event, "response": spec_view(event["response"])}
                                               if "response" in event else event)


def create(sdk: openai.OpenAI, model: str, tokens: int = 5, **kwargs: Any) -> openai.types.responses.Response:
    response = sdk.responses.create(model=model, max_output_tokens=tokens, temperature=0, **kwargs)
    valid(response)
    return response


def read(response: openai.types.responses.Response) -> int:
    """Tokens this response read: its input less what the memory already held."""
    usage = response.usage
    assert usage is not None
    return usage.input_tokens - usage.input_tokens_details.cached_tokens


def held(response: openai.types.responses.Response) -> int:
    """Tokens in the memory once the response is done: everything read and written so far."""
    usage = response.usage
    assert usage is not None
    return usage.input_tokens + usage.output_tokens


def raw_events(server: Server, body: dict[str, Any], key: str | None = None,
               extra: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """A streamed response's events as sent, each checked against its Open Responses model (but
    the HMT extension's `hmt.*` ones, sent when `extra` headers ask for them)."""
    events = []
    headers = {**({"Authorization": f"Bearer {key}"} if key else {}), **(extra or {})}
    with httpx.stream("POST", f"{server.url}/v1/responses", json={**body, "stream": True}, headers=headers,
                      timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = json.loads(line.removeprefix("data: "))
                assert data["type"] == name, (name, data)
                if not name.startswith("hmt."):
                    valid_event(data)
                events.append(data)
    return events


def test_create_retrieve_and_input_items(sdk: openai.OpenAI, model_id: str) -> None:
    response = create(sdk, model_id, input="hello world", metadata={"topic": "greeting"}, user="someone",
                      truncation="auto", safety_identifier="user-1")
    assert response.id.startswith("resp_") and response.object == "response" and response.model == model_id
    assert response.status in ("completed", "incomplete") and response.store is True
    assert response.output[0].type == "message" and response.output[0].role == "assistant"
    assert response.output_text == response.output[0].content[0].text  # type: ignore[union-attr]
    usage = response.usage
    assert usage is not None and usage.input_tokens_details.cached_tokens == 0 and 1 <= usage.output_tokens <= 5
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert response.metadata == {"topic": "greeting"} and response.truncation == "auto"
    if response.status == "incomplete":
        assert response.incomplete_details is not None
        assert response.incomplete_details.reason == "max_output_tokens"
    again = sdk.responses.retrieve(response.id)
    assert valid(again) == valid(response)

    items = list(sdk.responses.input_items.list(response.id))
    assert len(items) == 1 and items[0].type == "message" and items[0].role == "user"  # type: ignore[union-attr]
    assert items[0].content[0].type == "input_text"  # type: ignore[union-attr]
    assert items[0].content[0].text == "hello world"  # type: ignore[union-attr]


def test_input_items_paginate_as_the_spec_says(sdk: openai.OpenAI, model_id: str) -> None:
    texts = ["the quick brown fox", "jumps over", "the lazy dog"]
    conversation = [{"role": "developer", "content": "be brief"},
                    {"role": "user", "content": [{"type": "input_text", "text": texts[0]}]},
                    {"role": "assistant", "content": [{"type": "output_text", "text": texts[1]}]},
                    {"type": "message", "role": "user", "content": texts[2]}]
    response = create(sdk, model_id, input=conversation, instructions="answer in one word")  # type: ignore[arg-type]
    assert response.instructions == "answer in one word"
    page = sdk.responses.input_items.list(response.id, limit=3)  # newest first by default
    assert page.has_more is True and len(page.data) == 3
    assert [i.role for i in page.data] == ["user", "assistant", "user"]  # type: ignore[union-attr]
    everything = list(sdk.responses.input_items.list(response.id, limit=1))  # the SDK follows the cursor
    assert [i.role for i in everything] == ["user", "assistant", "user", "developer"]  # type: ignore[union-attr]
    assert len({i.id for i in everything}) == 4
    oldest = list(sdk.responses.input_items.list(response.id, order="asc"))
    assert [i.id for i in oldest] == [i.id for i in everything][::-1]
    assert oldest[2].content[0].type == "output_text"  # type: ignore[union-attr]
    raw = sdk.responses.input_items.list(response.id, order="asc", after=oldest[1].id, limit=1)
    assert [i.id for i in raw.data] == [oldest[2].id] and raw.has_more is True
    assert raw.first_id == raw.last_id == oldest[2].id  # type: ignore[attr-defined]


def test_streaming_sends_every_event_in_order(sdk: openai.OpenAI, server: Server, model_id: str) -> None:
    body = {"model": model_id, "input": "hello world", "max_output_tokens": 6, "temperature": 0}
    events = raw_events(server, body)
    kinds = [e["type"] for e in events]
    deltas = kinds.count("response.output_text.delta")
    assert deltas >= 1
    last = kinds[-1]
    assert last in ("response.completed", "response.incomplete")
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * deltas,
                     "response.output_text.done", "response.content_part.done", "response.output_item.done", last]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    final = events[-1]["response"]
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert final["output"][0]["content"][0]["text"] == text == events[-4]["text"]
    item_id = final["output"][0]["id"]
    assert {e["item_id"] for e in events if "item_id" in e} == {item_id}
    assert events[2]["item"]["status"] == "in_progress" and events[-2]["item"] == final["output"][0]
    # greedy from the same input: the same reply without streaming, and the streamed one is stored
    plain = create(sdk, model_id, tokens=6, input="hello world")
    assert plain.output_text == text
    stored = httpx.get(f"{server.url}/v1/responses/{final['id']}").json()
    assert valid(stored) == final

    # the SDK's stream: the same events
    streamed = list(sdk.responses.create(model=model_id, input="hello world", max_output_tokens=6, temperature=0,
                                         stream=True))
    assert [e.type for e in streamed] == kinds
    assert streamed[-1].response.output_text == text  # type: ignore[union-attr]


def test_previous_response_id_continues_on_another_replica(sdk: openai.OpenAI, fleet: Fleet, model_id: str,
                                                           redis_server: RedisServer) -> None:
    """The history is never read again: each turn reads only its new input, on either replica."""
    first = create(sdk, model_id, input="hello world")
    assert read(first) == held(first) - first.usage.output_tokens  # type: ignore[union-attr]
    with sdk_for(fleet.get("second")) as other:
        second = create(other, model_id, input="the lazy dog", previous_response_id=first.id)
        assert second.previous_response_id == first.id
        assert second.usage is not None and second.usage.input_tokens_details.cached_tokens == held(first)
        third = create(sdk, model_id, input="the lazy dog", previous_response_id=second.id)
        assert third.usage is not None and third.usage.input_tokens_details.cached_tokens == held(second)
        assert read(third) == read(second) < held(second)  # constant cost per turn: only the new message
        fourth = create(other, model_id, input="the lazy dog", previous_response_id=third.id, instructions="be brief")
        assert read(fourth) > read(third)  # the instructions are read as a system message
    assert redis_server.client().hget(f"hmt:responses:session:{{{third.id}}}", "state")  # its own state


def test_two_continuations_branch_from_the_same_state(sdk: openai.OpenAI, model_id: str) -> None:
    root = create(sdk, model_id, input="hierarchical memory")
    left = create(sdk, model_id, input="the quick brown fox", previous_response_id=root.id)
    right = create(sdk, model_id, input="the quick brown fox", previous_response_id=root.id)
    other = create(sdk, model_id, input="sessions live in redis", previous_response_id=root.id)
    assert len({left.id, right.id, other.id}) == 3
    assert left.output_text == right.output_text  # greedy from one state: the continuation did not move it
    for branch in (left, right, other):
        assert branch.usage is not None and branch.usage.input_tokens_details.cached_tokens == held(root)
    # a branch continues its own line: from the left branch's state, not the right one's
    deeper = create(sdk, model_id, input="more", previous_response_id=left.id)
    assert deeper.usage is not None and deeper.usage.input_tokens_details.cached_tokens == held(left)
    # an unsaved continuation starts from the same state and answers the same
    unsaved = create(sdk, model_id, input="the quick brown fox", previous_response_id=root.id, store=False)
    assert unsaved.output_text == left.output_text and unsaved.store is False


def test_store_false_and_delete(sdk: openai.OpenAI, model_id: str, redis_server: RedisServer) -> None:
    unsaved = create(sdk, model_id, input="hello", store=False)
    assert unsaved.store is False and unsaved.output_text is not None
    with pytest.raises(openai.NotFoundError, match="not found"):
        sdk.responses.retrieve(unsaved.id)
    with pytest.raises(openai.NotFoundError) as caught:
        create(sdk, model_id, input="more", previous_response_id=unsaved.id)
    assert caught.value.body["code"] == "previous_response_not_found"  # type: ignore[index]
    assert not redis_server.client().keys(f"*{unsaved.id}*")

    saved = create(sdk, model_id, input="hello")
    assert redis_server.client().exists(f"hmt:responses:session:{{{saved.id}}}")
    sdk.responses.delete(saved.id)
    assert not redis_server.client().keys(f"*{saved.id}*")
    for call in (lambda: sdk.responses.retrieve(saved.id), lambda: sdk.responses.delete(saved.id),
                 lambda: list(sdk.responses.input_items.list(saved.id))):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.NotFoundError, match="Previous response"):
        create(sdk, model_id, input="more", previous_response_id=saved.id)


def test_responses_are_visible_only_to_their_api_key(fleet: Fleet, model_id: str) -> None:
    server = fleet.get("auth")
    with sdk_for(server, "key-one") as one, sdk_for(server, "key-two") as two:
        mine = create(one, model_id, input="hello world")
        assert create(one, model_id, input="more", previous_response_id=mine.id).usage is not None
        with pytest.raises(openai.NotFoundError) as caught:
            create(two, model_id, input="more", previous_response_id=mine.id)
        unknown = "resp_" + "0" * 32
        with pytest.raises(openai.NotFoundError) as unknown_caught:
            create(two, model_id, input="more", previous_response_id=unknown)
        # another key's id is exactly an unknown one, but for the id itself
        assert caught.value.body == json.loads(json.dumps(unknown_caught.value.body).replace(unknown, mine.id))
        assert caught.value.body["code"] == "previous_response_not_found"  # type: ignore[index]
        for call in (lambda: two.responses.retrieve(mine.id), lambda: two.responses.delete(mine.id),
                     lambda: list(two.responses.input_items.list(mine.id))):
            with pytest.raises(openai.NotFoundError):
                call()
        assert one.responses.retrieve(mine.id).id == mine.id  # the other key's delete did nothing
        conversation = one.conversations.create()
        create(one, model_id, input="hello", conversation=conversation.id)
        for call in (lambda: two.conversations.retrieve(conversation.id),
                     lambda: two.conversations.delete(conversation.id),
                     lambda: list(two.conversations.items.list(conversation.id)),
                     lambda: create(two, model_id, input="hello", conversation=conversation.id)):
            with pytest.raises(openai.NotFoundError):
                call()
        assert len(list(one.conversations.items.list(conversation.id))) == 2
    with sdk_for(server, "wrong") as bad, pytest.raises(openai.AuthenticationError):
        bad.responses.retrieve(mine.id)


def test_responses_expire_after_their_ttl(model_dir: Path, redis_server: RedisServer, tmp_path: Path) -> None:
    server = Server(["--model", str(model_dir), "--redis-url", redis_server.url, "--response-ttl-s", "2"],
                    tmp_path / "ttl.log").start()
    try:
        with sdk_for(server) as client:
            model = client.models.list().data[0].id
            response = create(client, model, input="hello world")
            ttl = redis_server.client().pttl(f"hmt:responses:session:{{{response.id}}}")
            assert 0 < ttl <= 2000
            assert client.responses.retrieve(response.id).id == response.id
            time.sleep(2.5)
            with pytest.raises(openai.NotFoundError):
                client.responses.retrieve(response.id)
            with pytest.raises(openai.NotFoundError, match="Previous response"):
                create(client, model, input="more", previous_response_id=response.id)
            assert not redis_server.client().keys(f"*{response.id}*")
    finally:
        server.stop()


def test_what_the_model_cannot_take_is_a_clear_400(sdk: openai.OpenAI, server: Server, model_id: str) -> None:
    image = [{"role": "user", "content": [{"type": "input_image", "image_url": "https://example.com/a.png"}]}]
    file = [{"role": "user", "content": [{"type": "input_file", "file_id": "file-1"}]}]
    tool_output = [{"type": "function_call_output", "output": "42"}]
    tool = {"type": "function", "name": "f", "parameters": {"type": "object"}}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"input": image}, "input_image is not supported: this model reads text only"),
        ({"input": file}, "input_file is not supported"),
        ({"input": tool_output}, "input[0].call_id: give the call's id"),
        ({"input": [{"role": "tool", "content": "x"}]}, "role 'tool'"),
        ({"input": []}, "at least one message"),
        ({"tools": [{"type": "web_search"}]}, "built-in tool 'web_search' is not supported"),
        ({"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "built-in tool 'file_search'"),
        ({"tools": [{"type": "function", "name": "bad name"}]}, "tools[0]: name"),
        ({"tools": [tool, tool]}, "function names must be unique"),
        ({"tool_choice": "required"}, "'required' needs function tools"),
        ({"tools": [tool], "tool_choice": {"type": "function", "name": "g"}}, "naming one of the tools"),
        ({"tools": [tool], "tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": []}},
         "allowed_tools"),
        ({"background": True}, "background: true is not supported"),
        ({"reasoning": {"effort": "low"}}, "no reasoning options"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format: schema: Field required"),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nonsense"}}}},
         "text.format.schema"),
        ({"text": {"format": {"type": "xml"}}}, "type 'xml' is not supported"),
        ({"conversation": "conv_1", "previous_response_id": "resp_1"}, "at most one of conversation"),
        ({"max_output_tokens": 100000}, "over this server's limit"),
        ({"temperature": 3}, "temperature"),
    ]
    for overrides, message in cases:
        kwargs = {"model": model_id, "input": "hi", "max_output_tokens": 2, **overrides}
        with pytest.raises(openai.BadRequestError) as caught:
            sdk.responses.create(**kwargs)
        assert message in caught.value.message, (overrides, caught.value.message)
        body = caught.value.body
        assert isinstance(body, dict) and body["type"] == "invalid_request_error" and body["code"], body
        spec.Error.model_validate(body)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        sdk.responses.create(model="gpt-4o", input="hi")
    with pytest.raises(openai.NotFoundError, match="Previous response"):
        sdk.responses.create(model=model_id, input="hi", previous_response_id="resp_nope{}", max_output_tokens=2)
    raw = httpx.post(f"{server.url}/v1/responses", content=b"{not json", headers={"content-type": "application/json"})
    assert raw.status_code == 400 and set(raw.json()["error"]) == {"message", "type", "param", "code"}


def test_a_client_leaving_mid_stream_still_stores_its_response(sdk: openai.OpenAI, server: Server,
                                                               model_id: str) -> None:
    body = {"model": model_id, "input": "hello world", "max_output_tokens": 250, "temperature": 0, "stream": True}
    with httpx.Client(base_url=server.url, timeout=30) as http, \
            http.stream("POST", "/v1/responses", json=body) as response:
        lines = response.iter_lines()
        created = next(line for line in lines if line.startswith("data: "))
        response_id = json.loads(created.removeprefix("data: "))["response"]["id"]
    # saved by its own task (the reply so far is in the state), so it can be read and continued
    deadline = time.monotonic() + 30
    while (stored := httpx.get(f"{server.url}/v1/responses/{response_id}")).status_code == 404:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    data = valid(stored.json())
    assert data["status"] == "cancelled" and data["output"][0]["status"] == "incomplete"
    assert data["usage"]["output_tokens"] < 250
    after = create(sdk, model_id, input="more", previous_response_id=response_id)
    assert after.usage is not None and after.usage.input_tokens_details.cached_tokens == (
        data["usage"]["input_tokens"] + data["usage"]["output_tokens"])


def test_cancel_stops_a_running_response_and_stores_it(sdk: openai.OpenAI, fleet: Fleet, model_id: str) -> None:
    server = fleet.get("auth")
    body = {"model": model_id, "input": "hello world", "max_output_tokens": 1000, "temperature": 0, "stream": True}
    with sdk_for(server, "key-one") as one, sdk_for(server, "key-two") as two, \
            httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": "Bearer key-one"}) as http, \
            http.stream("POST", "/v1/responses", json=body) as stream:
        lines = stream.iter_lines()
        events: list[dict[str, Any]] = []
        for line in lines:  # until the reply has begun
            if line.startswith("data: "):
                events.append(json.loads(line.removeprefix("data: ")))
                if events[-1]["type"] == "response.output_text.delta":
                    break
        response_id = events[0]["response"]["id"]
        with pytest.raises(openai.NotFoundError):
            two.responses.cancel(response_id)  # another key's: as unknown
        cancelled = httpx.post(f"{server.url}/v1/responses/{response_id}/cancel", timeout=60,
                               headers={"Authorization": "Bearer key-one"})  # returns once stored
        data = valid(cancelled.json())
        assert data["status"] == "cancelled" and data["output"][0]["status"] == "incomplete"
        assert 0 < data["usage"]["output_tokens"] < 1000
        # its stream ends with it (the text sent so far is what it says)
        events += [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
        assert events[-1]["type"] == "response.incomplete" and events[-1]["response"] == data
        text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
        assert data["output"][0]["content"][0]["text"] == text
        assert http.get(f"/v1/responses/{response_id}").json() == data
        again = one.responses.cancel(response_id)  # over: as stored
        assert again.status == "cancelled" and again.output_text == text
        after = create(one, model_id, input="more", previous_response_id=response_id)
        assert after.usage is not None and after.usage.input_tokens_details.cached_tokens == (
            data["usage"]["input_tokens"] + data["usage"]["output_tokens"])
        with pytest.raises(openai.NotFoundError):
            one.responses.cancel("resp_" + "0" * 32)


def test_memory_and_progress_of_responses_and_conversations(server: Server, fleet: Fleet, model_id: str) -> None:
    """HMT extensions: GET /v1/responses/{id}/memory and /v1/conversations/{id}/memory (as
    /sessions/{id}/memory), and `hmt.segment` events with X-HMT-Progress: segments."""
    long_input = " ".join(["the quick brown fox jumps over the lazy dog."] * 12)
    body = {"model": model_id, "input": long_input, "max_output_tokens": 4, "temperature": 0}
    plain = raw_events(server, body)
    assert not [e for e in plain if e["type"].startswith("hmt.")]  # only when asked for
    events = raw_events(server, body, extra={"X-HMT-Progress": "segments"})
    spec_events = [e for e in events if not e["type"].startswith("hmt.")]
    assert [e["type"] for e in spec_events] == [e["type"] for e in plain]
    assert [e["sequence_number"] for e in spec_events] == list(range(len(spec_events)))  # the spec's, unbroken
    segments = [e for e in events if e["type"] == "hmt.segment"]
    expected = segments[0]["segments_expected"]
    assert expected > 3 and [s["segments_committed"] for s in segments][:expected] == list(range(1, expected + 1))
    assert events.index(segments[expected - 1]) < [e["type"] for e in events].index("response.output_text.delta")
    first = events[-1]["response"]
    with httpx.Client(base_url=server.url, timeout=60) as http:
        memory = http.get(f"/v1/responses/{first['id']}/memory").json()
        assert memory["segments_total"] >= segments[-1]["segments_total"] and memory["state_bytes"] > 0
        assert [r["segment"] for r in memory["recalls"]] == list(range(memory["segments_total"]))
        second = http.post("/v1/responses", json={**body, "input": long_input, "previous_response_id": first["id"]})
        assert second.json()["usage"]["input_tokens_details"]["cached_tokens"] == memory["tokens_seen"]
        after = http.get(f"/v1/responses/{second.json()['id']}/memory", params={"last": 64}).json()
        # the recall history goes on from the previous response's
        assert [r["segment"] for r in after["recalls"]] == list(range(after["segments_total"]))[-64:]
        assert after["segments_total"] > memory["segments_total"]
        assert http.get(f"/v1/responses/{first['id']}/memory").json() == memory  # the previous one is unchanged
        conversation = http.post("/v1/conversations", json={}).json()["id"]
        assert http.get(f"/v1/conversations/{conversation}/memory").json()["tokens_seen"] == 0
        http.post("/v1/responses", json={**body, "conversation": conversation})
        assert http.get(f"/v1/conversations/{conversation}/memory").json()["segments_total"] > 3
        for path in ("/v1/responses/resp_nope/memory", f"/v1/responses/resp_{'0' * 32}/memory",
                     f"/v1/conversations/conv_{'0' * 32}/memory"):
            got = http.get(path)
            assert got.status_code == 404 and got.json()["error"]["code"] == "not_found", path
        assert http.get(f"/v1/responses/{first['id']}/memory", params={"last": 0}).status_code == 400
    auth = fleet.get("auth")
    with httpx.Client(base_url=auth.url, timeout=60) as http:
        mine = http.post("/v1/responses", json=body, headers={"Authorization": "Bearer key-one"}).json()["id"]
        assert http.get(f"/v1/responses/{mine}/memory", headers={"Authorization": "Bearer key-one"}).status_code == 200
        assert http.get(f"/v1/responses/{mine}/memory", headers={"Authorization": "Bearer key-two"}).status_code == 404


def texts(items: Any) -> list[tuple[str, str]]:
    return [(i.role, "".join(part.text for part in i.content)) for i in items]


def test_conversations(sdk: openai.OpenAI, server: Server, model_id: str) -> None:
    """A conversation is a session its responses continue: each reads only what is new to it."""
    conversation = sdk.conversations.create(items=[{"type": "message", "role": "user", "content": "hello world"}],
                                            metadata={"topic": "a"})
    assert conversation.id.startswith("conv_") and conversation.metadata == {"topic": "a"}
    assert sdk.conversations.update(conversation.id, metadata={"topic": "b"}).metadata == {"topic": "b"}
    assert sdk.conversations.retrieve(conversation.id).metadata == {"topic": "b"}

    first = create(sdk, model_id, input="the lazy dog", conversation=conversation.id)
    assert first.conversation is not None and first.conversation.id == conversation.id
    assert first.usage is not None and first.usage.input_tokens_details.cached_tokens == 0
    items = list(sdk.conversations.items.list(conversation.id, order="asc"))
    assert texts(items) == [("user", "hello world"), ("user", "the lazy dog"), ("assistant", first.output_text)]
    # the response is stored apart too: a conversation turn and a previous_response_id turn agree
    second = create(sdk, model_id, input="more", conversation=conversation.id)
    apart = create(sdk, model_id, input="more", previous_response_id=first.id)
    assert second.output_text == apart.output_text
    assert second.usage is not None and apart.usage is not None
    assert second.usage.input_tokens_details.cached_tokens == held(first)
    assert second.usage.model_dump() == apart.usage.model_dump()

    # an added item is read by the next response, before its input
    added = sdk.conversations.items.create(conversation.id, items=[{"role": "user", "content": "the quick fox"}])
    assert texts(added.data) == [("user", "the quick fox")]
    third = create(sdk, model_id, input="more", conversation=conversation.id)
    assert third.usage is not None and third.usage.input_tokens_details.cached_tokens == held(second)
    assert read(third) > read(second)
    item = sdk.conversations.items.retrieve(added.data[0].id, conversation_id=conversation.id)
    assert texts([item]) == [("user", "the quick fox")]

    # deleting an item the memory read: the next response reads the rest again from a fresh state
    sdk.conversations.items.delete(items[1].id, conversation_id=conversation.id)
    kept = texts(sdk.conversations.items.list(conversation.id, order="asc"))
    assert ("user", "the lazy dog") not in kept and len(kept) == 7
    fourth = create(sdk, model_id, input="more", conversation=conversation.id)
    assert fourth.usage is not None and fourth.usage.input_tokens_details.cached_tokens == 0
    assert read(fourth) > read(third)
    page = sdk.conversations.items.list(conversation.id, limit=2)  # newest first
    assert texts(page.data)[1] == ("user", "more") and page.has_more is True

    assert sdk.conversations.delete(conversation.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        sdk.conversations.retrieve(conversation.id)
    with pytest.raises(openai.NotFoundError, match="Conversation"):
        create(sdk, model_id, input="more", conversation=conversation.id)
    assert sdk.responses.retrieve(second.id).id == second.id  # its responses stay
    raw = httpx.post(f"{server.url}/v1/conversations/conv_{'0' * 32}/items", json={"items": []})
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"


def random_schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    """A JSON schema whose every instance is short (bounded strings, integers, arrays, objects)."""
    kinds = ["boolean", "integer", "enum", "string", "null"] + (["object", "array"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "integer":
        return {"type": "integer", "minimum": -50, "maximum": 50}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", 1, 2, None, True], 3)}
    if kind == "string":
        return {"type": "string", "pattern": "^[a-z]{0,5}$"}
    if kind == "object":
        names = [f"k{i}" for i in range(rng.randint(1, 3))]
        return {"type": "object", "properties": {n: random_schema(rng, depth + 1) for n in names},
                "required": names, "additionalProperties": False}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1), "maxItems": 2}
    return {"type": kind}


def test_structured_output_matches_random_schemas(sdk: openai.OpenAI, model_id: str) -> None:
    """Even a random tiny model answers schema-valid JSON: sampling is constrained to the schema."""
    rng = random.Random(28)
    for i in range(8):
        schema = {"type": "object", "properties": {"answer": random_schema(rng)}, "required": ["answer"],
                  "additionalProperties": False}
        response = sdk.responses.create(
            model=model_id, input="hello world", max_output_tokens=200, temperature=0 if i % 2 else 1,
            text={"format": {"type": "json_schema", "name": f"s{i}", "schema": schema, "strict": True}})
        valid(response)
        assert response.status == "completed", (schema, response.output_text)
        jsonschema.validate(json.loads(response.output_text), schema)
        assert response.text is not None and response.text.format.type == "json_schema"
        assert response.text.format.schema_ == schema  # type: ignore[union-attr]
    anything = create(sdk, model_id, tokens=200, input="hello", text={"format": {"type": "json_object"}})
    if anything.status == "completed":  # an object may go on past the limit; what there is is its prefix
        assert isinstance(json.loads(anything.output_text), dict)
    else:
        assert anything.output_text.startswith("{")
    # a continuation of a structured reply reads on as usual, and free rows batch with constrained ones
    after = create(sdk, model_id, input="more", previous_response_id=anything.id)
    assert after.usage is not None and after.usage.input_tokens_details.cached_tokens == held(anything)


def test_hostile_schemas_are_refused_or_bounded(sdk: openai.OpenAI, model_id: str) -> None:
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(300):
        deep = {"type": "object", "properties": {"a": deep}, "required": ["a"]}
    recursive = {"$ref": "#/$defs/node", "$defs": {"node": {
        "type": "object", "properties": {"next": {"$ref": "#/$defs/node"}}, "required": ["next"]}}}
    huge_enum = {"enum": [f"v{i}" for i in range(20000)]}
    big_alternation = {"type": "string", "pattern": "^(" + "|".join(f"w{i}x" * 3 for i in range(3000)) + ")$"}
    for schema in (deep, recursive, huge_enum, big_alternation):
        start = time.monotonic()
        try:
            response = sdk.responses.create(model=model_id, input="hi", max_output_tokens=20, temperature=0,
                                            text={"format": {"type": "json_schema", "name": "h", "schema": schema}})
            assert response.status in ("completed", "incomplete")
        except openai.BadRequestError as exc:
            assert "text.format.schema" in exc.message or "over" in exc.message, exc.message
        assert time.monotonic() - start < 30


WEATHER = {"type": "function", "name": "get_weather", "description": "the weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[a-z]{1,8}$"}},
                          "required": ["city"], "additionalProperties": False}}
TIME = {"type": "function", "name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"],
    "additionalProperties": False}}


def test_function_call_then_its_output_then_an_answer(sdk: openai.OpenAI, server: Server, model_id: str) -> None:
    """tool_choice required (or a named function) constrains the reply to a call with valid arguments."""
    first = create(sdk, model_id, tokens=64, input="what is the weather in paris?", tools=[WEATHER, TIME],
                   tool_choice="required")
    call = first.output[0]
    assert first.status == "completed" and call.type == "function_call", first.output
    assert call.name in ("get_weather", "get_time") and call.call_id.startswith("call_")
    arguments = json.loads(call.arguments)
    jsonschema.validate(arguments, (WEATHER if call.name == "get_weather" else TIME)["parameters"])
    named = create(sdk, model_id, tokens=64, input="and the time?", tools=[WEATHER, TIME],
                   tool_choice={"type": "function", "name": "get_time"})
    assert named.output[0].type == "function_call" and named.output[0].name == "get_time"
    assert json.loads(named.output[0].arguments)["zone"] in ("utc", "cet")

    answer = create(sdk, model_id, tokens=8, previous_response_id=first.id, tools=[WEATHER, TIME],
                    tool_choice="none", input=[{"type": "function_call_output", "call_id": call.call_id,
                                                "output": "sunny, 21 C"}])
    assert answer.output[0].type == "message" and answer.tool_choice == "none"
    assert answer.usage is not None and answer.usage.input_tokens_details.cached_tokens == held(first)
    items = list(sdk.responses.input_items.list(answer.id))
    assert [(i.type, i.call_id, i.output) for i in items] == [  # type: ignore[union-attr]
        ("function_call_output", call.call_id, "sunny, 21 C")]
    # without previous_response_id: the client replays the call and its output
    replayed = create(sdk, model_id, tokens=8, input=[
        {"role": "user", "content": "what is the weather in paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}])
    assert replayed.output[0].type == "message"
    assert [i.type for i in sdk.responses.input_items.list(replayed.id, order="asc")] == [
        "message", "function_call", "function_call_output"]

    # streamed: the call's events, each valid, in order
    body = {"model": model_id, "input": "weather?", "max_output_tokens": 64, "temperature": 0,
            "tools": [WEATHER], "tool_choice": "required"}
    events = raw_events(server, body)
    kinds = [e["type"] for e in events]
    deltas = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"]
    assert len(deltas) > 1  # the arguments stream as they are generated
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     *["response.function_call_arguments.delta"] * len(deltas),
                     "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    done = events[-1]["response"]["output"][0]
    assert done["type"] == "function_call" and events[2]["item"]["name"] == done["name"] == "get_weather"
    assert events[2]["item"]["call_id"] == done["call_id"] and events[2]["item"]["arguments"] == ""
    assert "".join(deltas) == events[-3]["arguments"] == done["arguments"]
    jsonschema.validate(json.loads(done["arguments"]), WEATHER["parameters"])
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    # cut short by max_output_tokens: an incomplete call, its arguments so far, events consistent
    # (the call's head, {"name":"get_weather","arguments":, is 33 characters: at most 33 tokens)
    cut = raw_events(server, {**body, "max_output_tokens": 36})
    item = cut[-1]["response"]["output"][0]
    assert cut[-1]["type"] == "response.incomplete" and item["status"] == "incomplete"
    assert cut[-2]["type"] == "response.output_item.done" and cut[-2]["item"] == item
    assert item["type"] == "function_call" and item["name"] == "get_weather"
    streamed = [e["delta"] for e in cut if e["type"] == "response.function_call_arguments.delta"]
    assert "".join(streamed) == item["arguments"] and not item["arguments"].endswith("}}")
    # auto: the model decides; a small one mostly answers in text, and either is a valid response
    auto = create(sdk, model_id, tokens=16, input="weather in paris?", tools=[WEATHER])
    assert auto.output[0].type in ("message", "function_call")


def test_chat_completions_response_format_constrains_too(sdk: openai.OpenAI, model_id: str) -> None:
    """The same constrained decoding on /v1/chat/completions (response_format)."""
    schema = {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[a-z]{1,8}$"},
                                               "sunny": {"type": "boolean"}},
              "required": ["city", "sunny"], "additionalProperties": False}
    completion = sdk.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": "weather?"}], max_tokens=64, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": schema, "strict": True}})
    assert completion.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(completion.choices[0].message.content or ""), schema)
    anything = sdk.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=64, temperature=0, response_format={"type": "json_object"})
    assert (anything.choices[0].message.content or "").startswith("{")
    with pytest.raises(openai.BadRequestError, match="response_format"):
        sdk.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                    response_format={"type": "json_schema"})  # type: ignore[typeddict-item]


def test_random_requests_with_the_served_model_never_fail_the_server(server: Server, model_id: str) -> None:
    """Schemathesis fuzzes with random model names, which stop at the model check: here every
    request names the served model, so the input, tools, formats and continuations are reached."""
    import hypothesis
    from hypothesis import strategies as st

    anchor = httpx.post(f"{server.url}/v1/responses", timeout=60, json={
        "model": model_id, "input": "hello", "max_output_tokens": 2}).json()["id"]
    text = st.text(max_size=20)
    part = st.fixed_dictionaries({"type": st.sampled_from(["input_text", "output_text", "input_image", "refusal"]),
                                  "text": st.one_of(text, st.integers())})
    item = st.one_of(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "developer", "tool"]),
                               "content": st.one_of(text, st.lists(part, max_size=2), st.none())}),
        st.fixed_dictionaries({"type": st.sampled_from(["function_call", "function_call_output", "reasoning"]),
                               "call_id": st.one_of(text, st.none()), "name": st.sampled_from(["f", "bad name"]),
                               "arguments": st.sampled_from(["{}", "nope", 3]), "output": text}))
    schema = st.sampled_from([{"type": "object"}, {"type": "nonsense"}, {"enum": []}, {"type": "integer"},
                              {"type": "string", "maxLength": 3}, {"anyOf": [{"type": "null"}, {"type": "boolean"}]}])
    tool = st.fixed_dictionaries({"type": st.sampled_from(["function", "web_search", "mcp"]),
                                  "name": st.sampled_from(["f", "g", ""]), "parameters": schema})
    body = st.fixed_dictionaries({
        "model": st.just(model_id), "input": st.one_of(text, st.lists(item, max_size=3)),
        "max_output_tokens": st.integers(1, 6), "temperature": st.sampled_from([0, 0.7, 2]),
        "stream": st.booleans(), "store": st.booleans(),
        "previous_response_id": st.sampled_from([None, anchor, "resp_x", "resp_" + "1" * 32]),
        "instructions": st.one_of(st.none(), text),
        "text": st.one_of(st.none(), st.fixed_dictionaries({"format": st.one_of(
            st.fixed_dictionaries({"type": st.just("json_schema"), "name": st.just("s"), "schema": schema}),
            st.fixed_dictionaries({"type": st.sampled_from(["json_object", "text", "yaml"])}))})),
        "tools": st.one_of(st.none(), st.lists(tool, max_size=2)),
        "tool_choice": st.sampled_from([None, "auto", "none", "required", {"type": "function", "name": "f"}]),
    })

    statuses: list[int] = []

    @hypothesis.given(body=body)
    @hypothesis.settings(max_examples=60, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    def call(body: dict[str, Any]) -> None:
        body = {k: v for k, v in body.items() if v is not None}
        response = httpx.post(f"{server.url}/v1/responses", json=body, timeout=60)
        statuses.append(response.status_code)
        described = f"{body}: {response.status_code} {response.text[:300]}"
        assert response.status_code < 500 and "Traceback" not in response.text, described
        if response.status_code == 200 and body["stream"]:
            events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]
            assert events[-1]["type"] in ("response.completed", "response.incomplete"), described
            for event in events:
                valid_event(event)
        elif response.status_code == 200:
            valid(response.json())

    call()
    assert statuses.count(200) >= 5 and statuses.count(400) >= 5, statuses  # both paths were reached
