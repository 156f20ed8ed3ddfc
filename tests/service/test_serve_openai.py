"""The OpenAI-compatible API, driven by the official `openai` package against a live server."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from serve_helpers import ROOT, Fleet, RedisServer, Server


@pytest.fixture(scope="module")
def sdk(server: Server) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    yield client
    client.close()


@pytest.fixture(scope="module")
def model_id(sdk: openai.OpenAI) -> str:
    return sdk.models.list().data[0].id


def chat(sdk: openai.OpenAI, model: str, messages: list[dict[str, str]], session: str | None = None,
         max_tokens: int = 5, **kwargs: object) -> tuple[str, dict[str, str], openai.types.chat.ChatCompletion]:
    """One non-streaming turn at temperature 0: (reply text, response headers, completion)."""
    headers = {"X-Session-Id": session} if session else {}
    raw = sdk.chat.completions.with_raw_response.create(model=model, messages=messages, max_tokens=max_tokens,
                                                        temperature=0, extra_headers=headers, **kwargs)
    completion = raw.parse()
    return completion.choices[0].message.content or "", dict(raw.headers), completion


def tokens_seen(server: Server, session: str) -> int:
    response = httpx.get(f"{server.url}/sessions/{session}")
    assert response.status_code == 200, response.text
    return int(response.json()["tokens_seen"])


def test_models(sdk: openai.OpenAI, model_id: str) -> None:
    assert model_id and sdk.models.retrieve(model_id).id == model_id
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        sdk.models.retrieve("gpt-4o")


def test_chat_non_streaming_and_streaming_agree(sdk: openai.OpenAI, server: Server, model_id: str) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
    text, headers, completion = chat(sdk, model_id, messages, session="oa-plain", max_tokens=6)
    assert completion.object == "chat.completion" and completion.model == model_id
    finish = completion.choices[0].finish_reason
    assert completion.choices[0].message.role == "assistant" and finish in ("stop", "length")
    assert completion.usage is not None and 1 <= completion.usage.completion_tokens <= 6
    assert headers["x-session-id"] == "oa-plain" and headers["x-hmt-continuation"] == "new"
    # the session holds exactly what this turn read and wrote
    assert tokens_seen(server, "oa-plain") == completion.usage.prompt_tokens + completion.usage.completion_tokens

    stream = sdk.chat.completions.create(model=model_id, messages=messages, max_tokens=6, temperature=0, stream=True,
                                         stream_options={"include_usage": True},
                                         extra_headers={"X-Session-Id": "oa-stream"})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert content == text and finishes == [finish]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == completion.usage.model_dump()
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")


def test_full_history_resend_appends_only_the_new_messages(sdk: openai.OpenAI, server: Server,
                                                           model_id: str) -> None:
    """Turn n reads the same number of tokens as turn 2: the history is never read again."""
    messages = [{"role": "system", "content": "the quick brown fox"}]
    read: list[int] = []
    before = 0
    for turn in range(5):
        messages.append({"role": "user", "content": "hello world"})
        text, headers, completion = chat(sdk, model_id, messages, session="oa-long", max_tokens=4)
        assert headers["x-hmt-continuation"] == ("new" if turn == 0 else "continued")
        usage = completion.usage
        assert usage is not None
        after = tokens_seen(server, "oa-long")
        assert after - before == usage.prompt_tokens + usage.completion_tokens  # nothing else was appended
        before = after
        read.append(usage.prompt_tokens)
        messages.append({"role": "assistant", "content": text})
    assert read[0] > read[1]  # the first turn also read the system message
    assert len(set(read[1:])) == 1, read  # constant cost per turn


def test_regenerate_and_edit_continue_from_snapshots(sdk: openai.OpenAI, server: Server, model_id: str) -> None:
    messages = [{"role": "user", "content": "hello world"}]
    first, _, _ = chat(sdk, model_id, messages, session="oa-branch")
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "the lazy dog"}]
    second, _, turn2 = chat(sdk, model_id, messages, session="oa-branch")
    messages += [{"role": "assistant", "content": second}, {"role": "user", "content": "memory"}]
    chat(sdk, model_id, messages, session="oa-branch")

    # regenerate turn 2: resend its history; the session rewinds to the snapshot after turn 1
    again, headers, regen = chat(sdk, model_id, messages[:3], session="oa-branch")
    assert headers["x-hmt-continuation"] == "branched"
    assert again == second  # greedy from the same state
    assert regen.usage is not None and turn2.usage is not None
    assert regen.usage.prompt_tokens == turn2.usage.prompt_tokens  # only turn 2's message was read again
    seen = tokens_seen(server, "oa-branch")

    # edit the first message: nothing older to keep, so it reads the edited history from the start,
    # and answers exactly as a fresh session given the same history does
    edited = [{"role": "user", "content": "hello fox"}, {"role": "assistant", "content": first},
              {"role": "user", "content": "the lazy dog"}]
    reply, headers, _ = chat(sdk, model_id, edited, session="oa-branch")
    assert headers["x-hmt-continuation"] == "branched"
    fresh, _, _ = chat(sdk, model_id, edited, session="oa-branch-fresh")
    assert reply == fresh
    assert tokens_seen(server, "oa-branch") == tokens_seen(server, "oa-branch-fresh") != seen
    metrics = httpx.get(f"{server.url}/metrics").text
    series = 'hmt_chat_turns_total{continuation="branched"}'
    branched = [line for line in metrics.splitlines() if line.startswith(series)]
    assert branched and float(branched[0].split()[-1]) >= 2


def test_without_session_id_a_known_prefix_continues_its_session(sdk: openai.OpenAI, server: Server,
                                                                 model_id: str) -> None:
    messages = [{"role": "user", "content": "hierarchical memory"}]
    first, headers, _ = chat(sdk, model_id, messages)
    session = headers["x-session-id"]
    assert headers["x-hmt-continuation"] == "new"
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "sessions live in redis"}]
    second, headers, _ = chat(sdk, model_id, messages)
    assert headers["x-session-id"] == session and headers["x-hmt-continuation"] == "continued"
    seen = tokens_seen(server, session)

    # another client diverges after the first turn: it gets its own session, forked from the snapshot,
    # and the original conversation is left as it was
    other = [*messages[:2], {"role": "user", "content": "the quick brown fox"}]
    _, headers, _ = chat(sdk, model_id, other)
    assert headers["x-session-id"] != session and headers["x-hmt-continuation"] == "branched"
    assert tokens_seen(server, session) == seen
    # and continuing the original history still finds the original session
    messages += [{"role": "assistant", "content": second}, {"role": "user", "content": "more"}]
    _, headers, _ = chat(sdk, model_id, messages)
    assert headers["x-session-id"] == session


def test_snapshots_are_bounded(sdk: openai.OpenAI, redis_server: RedisServer, model_id: str) -> None:
    messages: list[dict[str, str]] = []
    for _ in range(18):  # the server keeps 16 (its default): the first turn's and the newest
        messages.append({"role": "user", "content": "hello"})
        text, _, _ = chat(sdk, model_id, messages, session="oa-bounded", max_tokens=1)
        messages.append({"role": "assistant", "content": text})
    keys = sorted(int(k) for k in redis_server.client().hkeys("hmt:snapshots:{oa-bounded}"))
    assert len(keys) == 16 and keys[0] == 0 and keys[-1] == len(messages)


def test_errors_are_openai_shaped(sdk: openai.OpenAI, server: Server, model_id: str) -> None:
    user = [{"role": "user", "content": "hi"}]
    cases: list[tuple[dict[str, object], str]] = [
        ({"n": 2}, "n=1"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "role 'tool'"),
        ({"messages": []}, "messages"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"max_tokens": 100000}, "over this server's limit"),
        ({"extra_headers": {"X-Session-Id": "bad id!"}}, "session id"),
        ({"extra_headers": {"X-HMT-Messages": "new"}}, "needs a session id"),
    ]
    for overrides, message in cases:
        kwargs: dict[str, object] = {"model": model_id, "messages": user, "max_tokens": 2, **overrides}
        with pytest.raises(openai.BadRequestError, match=message.replace("(", r"\(")) as caught:
            sdk.chat.completions.create(**kwargs)  # type: ignore[call-overload]
        body = caught.value.body
        assert isinstance(body, dict) and body["type"] == "invalid_request_error" and body["code"], body
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        sdk.chat.completions.create(model="gpt-4o", messages=user)  # type: ignore[arg-type,list-item]
    raw = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json",
                     headers={"content-type": "application/json"})
    assert raw.status_code == 400 and set(raw.json()["error"]) == {"message", "type", "param", "code"}


def test_api_keys(fleet: Fleet) -> None:
    server = fleet.get("auth")
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0) as bad, \
            pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="key-one", max_retries=0) as good:
        assert good.models.list().data


def test_completions(sdk: openai.OpenAI, server: Server, model_id: str) -> None:
    stateless = sdk.completions.create(model=model_id, prompt="hello world", max_tokens=4, temperature=0)
    assert stateless.object == "text_completion" and stateless.choices[0].finish_reason in ("stop", "length")
    streamed = sdk.completions.create(model=model_id, prompt="hello world", max_tokens=4, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == stateless.choices[0].text

    first = sdk.completions.create(model=model_id, prompt="hello", max_tokens=3, temperature=0,
                                   extra_headers={"X-Session-Id": "oa-text"})
    assert first.usage is not None
    assert tokens_seen(server, "oa-text") == first.usage.total_tokens
    second = sdk.completions.create(model=model_id, prompt=" world", max_tokens=3, temperature=0, user="oa-text")
    assert second.usage is not None
    assert tokens_seen(server, "oa-text") == first.usage.total_tokens + second.usage.total_tokens


def test_hmt_chat_terminal_client(server: Server) -> None:
    """`hmt chat` end to end, over the Responses API: two turns of a new conversation, then a second
    run resumes the conversation by id, reading only its new message."""

    def run_chat(lines: str, *extra: str, code: int = 0) -> str:
        done = subprocess.run([sys.executable, "-m", "hmt_lab.cli", "chat", "--url", server.url, "--max-tokens", "4",
                               "--temperature", "0", *extra], input=lines, capture_output=True, text=True,
                              timeout=120, cwd=ROOT)
        assert done.returncode == code, done.stderr
        return done.stdout + done.stderr

    def memory(conversation: str) -> dict[str, Any]:
        response = httpx.get(f"{server.url}/v1/conversations/{conversation}/memory")
        assert response.status_code == 200, response.text
        return dict(response.json())

    out = run_chat("hello world\nthe lazy dog\n", "--system", "be brief")
    assert out.count("hmt> ") == 2 and out.count("ms to first token") == 2
    found = re.search(r"conversation (conv_[0-9a-f]{32}) on", out)
    assert found is not None
    conversation = found[1]
    assert f"conversation {conversation}: " in out and "memory" in out and "KiB" in out
    items = httpx.get(f"{server.url}/v1/conversations/{conversation}/items", params={"order": "asc"}).json()["data"]
    assert [i["role"] for i in items] == ["user", "assistant", "user", "assistant"]
    assert [i["content"][0]["text"] for i in items[::2]] == ["hello world", "the lazy dog"]
    seen = memory(conversation)["tokens_seen"]
    out = run_chat("more\n/exit\nnot sent\n", "--session", conversation)  # --session: the old name
    assert out.count("hmt> ") == 1 and f"resuming conversation {conversation}" in out
    held = re.search(r"read (\d+) new tokens, (\d+) held in memory", out)
    assert held is not None and int(held[2]) == seen and 0 < int(held[1]) < seen  # only the new message was read
    assert memory(conversation)["tokens_seen"] > seen  # resumed: the earlier turns are still in the state
    assert f"resume with: hmt chat --conversation {conversation}" in out
    assert "not found" in run_chat("", "--conversation", "conv_" + "0" * 32, code=1)


def test_a_client_leaving_mid_stream_leaves_a_consistent_session(sdk: openai.OpenAI, server: Server,
                                                                  model_id: str) -> None:
    messages = [{"role": "user", "content": "hello world"}]
    body = {"model": model_id, "messages": messages, "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.Client(base_url=server.url, timeout=30) as http, \
            http.stream("POST", "/v1/chat/completions", json=body, headers={"X-Session-Id": "oa-gone"}) as response:
        assert response.status_code == 200
        next(response.iter_lines())  # the first chunk, then hang up
    # the turn is saved (the lock released) with what was generated; the client never saw the whole
    # reply, so resending its history regenerates from the snapshot before the turn
    deadline = time.monotonic() + 30
    while (info := httpx.get(f"{server.url}/sessions/oa-gone")).status_code == 404:  # created when saved
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert info.status_code == 200 and info.json()["version"] >= 1
    _, headers, completion = chat(sdk, model_id, messages, session="oa-gone")
    assert headers["x-hmt-continuation"] == "branched"
    assert completion.usage is not None
    assert tokens_seen(server, "oa-gone") == completion.usage.prompt_tokens + completion.usage.completion_tokens
