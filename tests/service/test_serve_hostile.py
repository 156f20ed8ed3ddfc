"""Hostile and malformed input against a live server (#15): a clear 4xx, or a correct 200, never a
500 or a traceback, and the session unchanged by a refused request."""

from __future__ import annotations

import dataclasses
import json

import httpx
import pytest
from serve_helpers import Fleet, RedisServer, Server, error_of

from hmt_core import SessionState

SEG = 8  # segment_tokens of the test model


def _session(client: httpx.Client, tokens: list[int] | None = None) -> str:
    sid = client.post("/sessions", json={}).json()["id"]
    if tokens:
        assert client.post(f"/sessions/{sid}/append", json={"tokens": tokens}).status_code == 200
    return sid


def _raw(client: httpx.Client, path: str, body: str) -> httpx.Response:
    """A JSON body written by hand: lone surrogates, Infinity and NaN survive as they were sent."""
    return client.post(path, content=body.encode(), headers={"content-type": "application/json"})


def _v1_error(response: httpx.Response) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and "Traceback" not in error["message"]
    return str(error["message"])


@pytest.fixture(scope="module")
def model_id(server: Server) -> str:
    with server.client() as c:
        return str(c.get("/v1/models").json()["data"][0]["id"])


def test_seeds_of_any_size_sample_reproducibly(client: httpx.Client, model_id: str) -> None:
    history = [5, 9, 13, 21, 34]
    for seed in (2**64, 2**70 + 1, -(2**90)):
        replies = []
        for _ in range(2):
            sid = _session(client, history)
            response = client.post(f"/sessions/{sid}/generate", json={
                "max_tokens": 6, "temperature": 1.0, "seed": seed, "ignore_eos": True})
            assert response.status_code == 200, response.text
            replies.append(response.json()["tokens"])
        assert replies[0] == replies[1]
    chat = client.post("/v1/chat/completions", json={
        "model": model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "seed": 2**70})
    assert chat.status_code == 200, chat.text
    completion = client.post("/v1/completions", json={"model": model_id, "prompt": "hi", "max_tokens": 3,
                                                      "seed": 2**80})
    assert completion.status_code == 200, completion.text


def test_a_tiny_temperature_is_greedy(client: httpx.Client, model_id: str) -> None:
    history = [3, 1, 4, 1, 5, 9, 2, 6]
    replies = []
    for temperature in (0.0, 1e-38, 1e-45):
        sid = _session(client, history)
        response = client.post(f"/sessions/{sid}/generate", json={
            "max_tokens": 8, "temperature": temperature, "ignore_eos": True})
        assert response.status_code == 200, response.text
        replies.append(response.json()["tokens"])
    assert replies[1] == replies[0] and replies[2] == replies[0]
    chat = client.post("/v1/chat/completions", json={
        "model": model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 1e-40})
    assert chat.status_code == 200, chat.text


def test_token_ids_beyond_int64_are_refused(client: httpx.Client, model_id: str) -> None:
    sid = _session(client, [7, 8, 9])
    before = client.get(f"/sessions/{sid}").json()
    for huge in (2**63, 10**30, -(2**64)):
        assert error_of(client.post(f"/sessions/{sid}/append", json={"tokens": [1, huge]}), 422) == "invalid_input"
        assert error_of(client.post(f"/sessions/{sid}/generate", json={"prompt_tokens": [huge]}), 422) \
            == "invalid_input"
        assert "vocabulary" in _v1_error(client.post("/v1/completions", json={
            "model": model_id, "prompt": [huge], "max_tokens": 2}))
    assert client.get(f"/sessions/{sid}").json() == before  # nothing was applied


@pytest.mark.parametrize(("path", "body"), [
    ("/sessions/{sid}/append", '{"text": "abc\\ud800def"}'),
    ("/sessions/{sid}/generate", '{"prompt": "abc\\udfff", "max_tokens": 2}'),
    ("/sessions/{sid}/generate", '{"prompt": "ok", "stop": ["a\\ud800"], "max_tokens": 2}'),
])
def test_lone_surrogates_are_refused_on_the_session_api(client: httpx.Client, path: str, body: str) -> None:
    sid = _session(client, [1, 2, 3])
    before = client.get(f"/sessions/{sid}").json()
    response = _raw(client, path.format(sid=sid), body)
    assert error_of(response, 422) == "invalid_request"
    assert "surrogate" in response.json()["error"]["message"]
    assert client.get(f"/sessions/{sid}").json() == before


@pytest.mark.parametrize("body", [
    '{{"model": "{m}", "messages": [{{"role": "user", "content": "abc\\ud800"}}]}}',
    '{{"model": "{m}", "messages": [{{"role": "user", "content": "hi", "name": "\\udc00x"}}]}}',
    '{{"model": "{m}", "messages": [{{"role": "user", "content": [{{"type": "text", "text": "\\ud83d"}}]}}]}}',
    '{{"model": "{m}", "messages": [{{"role": "user", "content": "hi"}}], "stop": "\\ud800"}}',
])
def test_lone_surrogates_are_refused_on_chat(client: httpx.Client, model_id: str, body: str) -> None:
    assert "surrogate" in _v1_error(_raw(client, "/v1/chat/completions", body.format(m=model_id)))


def test_lone_surrogates_are_refused_on_completions(client: httpx.Client, model_id: str) -> None:
    for prompt in ('"abc\\ud800"', '["\\udfff"]'):
        body = f'{{"model": "{model_id}", "prompt": {prompt}, "max_tokens": 2}}'
        assert "surrogate" in _v1_error(_raw(client, "/v1/completions", body))


@pytest.mark.parametrize("field", [
    '"max_tokens": "10"', '"stream": "yes"', '"ignore_eos": 1', '"temperature": Infinity', '"temperature": NaN',
    '"top_p": "0.5"', '"seed": 1.5', '"max_tokens": 4.0',
])
def test_the_session_api_is_strictly_typed(client: httpx.Client, field: str) -> None:
    sid = _session(client, [4, 5, 6])
    assert error_of(_raw(client, f"/sessions/{sid}/generate", f'{{"prompt": "hi", {field}}}'), 422) \
        == "invalid_request"


@pytest.mark.parametrize("field", ['"max_tokens": "10"', '"stream": "yes"', '"temperature": Infinity',
                                   '"temperature": NaN', '"top_p": NaN'])
def test_the_openai_api_is_strictly_typed(client: httpx.Client, model_id: str, field: str) -> None:
    body = f'{{"model": "{model_id}", "messages": [{{"role": "user", "content": "hi"}}], {field}}}'
    _v1_error(_raw(client, "/v1/chat/completions", body))


def test_stop_strings_are_bounded(client: httpx.Client) -> None:
    sid = _session(client, [1, 2, 3, 4])
    for stop in (["x"] * 17, ["y" * 257], [""]):
        response = client.post(f"/sessions/{sid}/generate", json={"max_tokens": 2, "stop": stop})
        assert error_of(response, 422) == "invalid_request"
    most = [chr(ord("a") + i) * 256 for i in range(16)]
    response = client.post(f"/sessions/{sid}/generate", json={"max_tokens": 2, "stop": most, "ignore_eos": True})
    assert response.status_code == 200, response.text


def test_max_tokens_over_the_limit_is_the_same_error_on_both_apis(client: httpx.Client, model_id: str) -> None:
    sid = _session(client, [1, 2])
    response = client.post(f"/sessions/{sid}/generate", json={"max_tokens": 257})
    assert error_of(response, 422) == "invalid_input" and "over this server's limit" in response.text
    assert "over this server's limit" in _v1_error(client.post("/v1/chat/completions", json={
        "model": model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 257}))


def test_with_api_keys_the_schema_needs_a_key_and_the_docs_are_off(fleet: Fleet) -> None:
    server = fleet.get("auth")
    with server.client() as anonymous, server.client("key-one") as keyed:
        assert error_of(anonymous.get("/openapi.json"), 401) == "unauthorized"
        assert keyed.get("/openapi.json").json()["info"]["title"] == "hmt-serve"
        for path in ("/docs", "/redoc"):
            assert anonymous.get(path).status_code == 404 and keyed.get(path).status_code == 404
        for path in ("/healthz", "/readyz", "/metrics"):
            assert anonymous.get(path).status_code == 200


def test_every_store_error_series_is_exported_from_the_start(fleet: Fleet) -> None:
    with fleet.get("auth").client() as c:
        text = c.get("/metrics").text
    for op in ("ping", "create", "read", "lock", "unlock", "write"):
        assert f'hmt_store_errors_total{{op="{op}"}}' in text


def test_chat_hints_are_deleted_with_their_session(client: httpx.Client, redis_server: RedisServer,
                                                   model_id: str) -> None:
    messages = [{"role": "user", "content": "a conversation that is deleted later"}]
    response = client.post("/v1/chat/completions", json={"model": model_id, "messages": messages, "max_tokens": 3})
    assert response.status_code == 200, response.text
    sid = response.headers["x-session-id"]
    messages += [{"role": "assistant", "content": response.json()["choices"][0]["message"]["content"]},
                 {"role": "user", "content": "and a second turn"}]
    response = client.post("/v1/chat/completions", json={"model": model_id, "messages": messages, "max_tokens": 3})
    assert response.headers["x-session-id"] == sid
    redis = redis_server.client()
    hints = redis.smembers(f"hmt:hints:{{{sid}}}")
    assert len(hints) == 2 and all(redis.get(key) == sid.encode() for key in hints)
    assert client.delete(f"/sessions/{sid}").status_code == 200
    assert not redis.exists(f"hmt:hints:{{{sid}}}") and not any(redis.exists(key) for key in hints)
    # the same history again starts a new session instead of finding the deleted one
    response = client.post("/v1/chat/completions", json={"model": model_id, "messages": messages, "max_tokens": 3})
    assert response.status_code == 200 and response.headers["x-session-id"] != sid
    assert json.loads(response.text)["choices"]


def test_a_chunked_body_over_the_limit_is_413_while_it_streams(client: httpx.Client) -> None:
    sid = _session(client, [1, 2, 3])
    before = client.get(f"/sessions/{sid}").json()
    sent = {"bytes": 0}

    def chunks(total: int):  # no Content-Length: the server can only count as the body arrives
        yield b'{"text": "'
        while sent["bytes"] < total:
            sent["bytes"] += 65536
            yield b"a" * 65536
        yield b'"}'

    for method, path in (("POST", f"/sessions/{sid}/append"), ("PUT", f"/sessions/{sid}/state")):
        sent["bytes"] = 0
        response = client.request(method, path, content=chunks(20_000_000),
                                  headers={"content-type": "application/json"})
        assert error_of(response, 413) == "too_large"
    assert client.get(f"/sessions/{sid}").json() == before


def _forged(data: bytes, key: bytes | None = None, **changes: object) -> bytes:
    """What a client can do without the secret: edit a state and recompute its plain checksum."""
    state = SessionState.from_bytes(data)
    return dataclasses.replace(state, **changes).to_bytes(key)  # type: ignore[arg-type]


def test_forged_states_are_refused_whole(client: httpx.Client) -> None:
    sid = _session(client, list(range(1, 3 * SEG + 3)))
    exported = client.get(f"/sessions/{sid}/state").content
    state = SessionState.from_bytes(exported)
    before = client.get(f"/sessions/{sid}").json()
    forgeries = {
        "counters": _forged(exported, tokens_seen=state.tokens_seen + 5),
        "segments": _forged(exported, segments_committed=state.segments_committed + 1),
        "negative": _forged(exported, segments_committed=-1),
        "version": _forged(exported, version=2**60),
        "vocabulary": _forged(exported, window=(*state.window[:-1], 10**6)),
        "sensory": _forged(exported, sensory=(*state.sensory[:-1], -3)),
        "memory": _forged(exported, ltm=state.ltm.clone().fill_(float("nan"))),
        "memory rows": _forged(exported, ltm=state.ltm[:-1]),
    }
    for name, data in forgeries.items():
        response = client.put(f"/sessions/{sid}/state", content=data)
        assert error_of(response, 422) == "corrupt_state", name
    assert client.get(f"/sessions/{sid}").json() == before
    # the untouched export still imports, and the session works on
    assert client.put(f"/sessions/{sid}/state", content=exported).status_code == 200
    assert client.post(f"/sessions/{sid}/append", json={"tokens": [4, 5]}).status_code == 200


def test_with_a_secret_only_this_deployments_states_import(fleet: Fleet, client: httpx.Client) -> None:
    with fleet.get("auth").client("key-one") as signed:
        sid = signed.post("/sessions", json={}).json()["id"]
        assert signed.post(f"/sessions/{sid}/append", json={"tokens": list(range(1, 12))}).status_code == 200
        exported = signed.get(f"/sessions/{sid}/state").content
        before = signed.get(f"/sessions/{sid}").json()
        assert signed.put(f"/sessions/{sid}/state", content=exported).status_code == 200  # its own: accepted
        state = SessionState.from_bytes(exported)
        refused = {
            "edited": _forged(exported, window=(*state.window[:-1], 1)),
            "resigned with another key": _forged(exported, key=b"guess", window=(*state.window[:-1], 1)),
            "unsigned": _forged(exported),
            "another deployment's": client.get(f"/sessions/{_session(client, [1, 2])}/state").content,
        }
        for name, data in refused.items():
            response = signed.put(f"/sessions/{sid}/state", content=data)
            assert error_of(response, 422) == "corrupt_state", name
            assert "secret" in response.json()["error"]["message"], name
        after = signed.get(f"/sessions/{sid}").json()
        assert {k: after[k] for k in ("tokens_seen", "window_tokens")} == \
            {k: before[k] for k in ("tokens_seen", "window_tokens")}
