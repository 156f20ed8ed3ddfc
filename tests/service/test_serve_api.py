"""The HTTP API against one live server and a real redis-server."""

from __future__ import annotations

import itertools
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from httpx_sse import connect_sse
from serve_helpers import RedisServer, Server, error_of

from hmt_core import SamplingParams, SessionState

SEG = 8  # segment_tokens of the test model


def new_session(client: httpx.Client, tokens: list[int] | None = None) -> str:
    response = client.post("/sessions", json={})
    assert response.status_code == 201, response.text
    sid = response.json()["id"]
    if tokens:
        assert client.post(f"/sessions/{sid}/append", json={"tokens": tokens}).status_code == 200
    return sid


def history(n: int, start: int = 1) -> list[int]:
    return [(start + 7 * i) % 250 + 1 for i in range(n)]


def generate(client: httpx.Client, sid: str, **body) -> dict:
    response = client.post(f"/sessions/{sid}/generate", json={"ignore_eos": True, **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_health_ready_and_docs(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/sessions", "/sessions/{session_id}/append", "/sessions/{session_id}/generate",
            "/sessions/{session_id}/state"} <= set(paths)


def test_create_get_delete(client: httpx.Client, local_model) -> None:
    created = client.post("/sessions", json={"id": "alpha"})
    assert created.status_code == 201
    assert created.json()["id"] == "alpha" and created.json()["fingerprint"] == local_model.fingerprint
    assert error_of(client.post("/sessions", json={"id": "alpha"}), 409) == "conflict"
    info = client.get("/sessions/alpha").json()
    assert (info["tokens_seen"], info["segments_total"], info["window_tokens"]) == (0, 0, 0)
    assert info["state_bytes"] > 0
    anonymous = client.post("/sessions").json()["id"]  # no body at all: a random id
    assert anonymous != "alpha" and client.get(f"/sessions/{anonymous}").status_code == 200
    assert client.delete("/sessions/alpha").status_code == 200
    assert error_of(client.get("/sessions/alpha"), 404) == "not_found"
    assert error_of(client.delete("/sessions/alpha"), 404) == "not_found"


def test_text_append_uses_the_model_tokenizer(client: httpx.Client, local_model) -> None:
    sid = new_session(client)
    text = "the quick brown fox jumps over the lazy dog. hello world!"
    expected = local_model.tokenizer.encode(text, add_special_tokens=False)
    body = client.post(f"/sessions/{sid}/append", json={"text": text}).json()
    n = len(expected)
    assert body["tokens_appended"] == body["tokens_seen"] == n
    assert body["segments_committed"] == body["segments_total"] == (n - 1) // SEG  # lazy commit
    assert body["window_tokens"] == n - SEG * ((n - 1) // SEG)
    reference = local_model.append(local_model.new_session(), expected)
    exported = SessionState.from_bytes(client.get(f"/sessions/{sid}/state").content)
    assert exported.window == reference.window and exported.sensory == reference.sensory


def test_token_append_lazy_commit(client: httpx.Client) -> None:
    sid = new_session(client)
    first = client.post(f"/sessions/{sid}/append", json={"tokens": history(20)}).json()
    assert (first["segments_committed"], first["segments_total"], first["window_tokens"]) == (2, 2, 4)
    second = client.post(f"/sessions/{sid}/append", json={"tokens": history(4, 50)}).json()
    assert (second["segments_committed"], second["window_tokens"]) == (0, 8)  # full, not yet committed
    third = client.post(f"/sessions/{sid}/append", json={"tokens": [5]}).json()
    assert (third["segments_committed"], third["segments_total"], third["window_tokens"], third["tokens_seen"]) \
        == (1, 3, 1, 25)


def test_append_stream_one_event_per_segment(client: httpx.Client) -> None:
    sid = new_session(client)
    with connect_sse(client, "POST", f"/sessions/{sid}/append", json={"tokens": history(30)},
                     headers={"Accept": "text/event-stream"}) as source:
        assert source.response.headers["content-type"].startswith("text/event-stream")
        events = [(e.event, json.loads(e.data)) for e in source.iter_sse()]
    segments = [d for name, d in events if name == "segment"]
    assert [d["segments_committed"] for d in segments] == [1, 2, 3]
    assert [d["segments_total"] for d in segments] == [1, 2, 3]
    name, summary = events[-1]
    assert name == "summary" and summary["segments_committed"] == 3 and summary["tokens_seen"] == 30
    assert summary["window_tokens"] == 6


def test_chunking_invariance_and_equal_to_hmt_core(client: httpx.Client, local_model) -> None:
    tokens = history(45, 3)
    whole = new_session(client, tokens)
    pieces = new_session(client)
    cut = [0, 1, 8, 21, 23, 45]
    for a, b in itertools.pairwise(cut):
        assert client.post(f"/sessions/{pieces}/append", json={"tokens": tokens[a:b]}).status_code == 200
    one, many = (SessionState.from_bytes(client.get(f"/sessions/{s}/state").content) for s in (whole, pieces))
    assert (one.window, one.sensory, one.tokens_seen, one.segments_committed) == \
        (many.window, many.sensory, many.tokens_seen, many.segments_committed)
    assert one.ltm.shape == many.ltm.shape and (one.ltm - many.ltm).abs().max() < 1e-5
    replies = [generate(client, s, max_tokens=12)["tokens"] for s in (whole, pieces)]
    state = local_model.append(local_model.new_session(), tokens)
    expected = local_model.generate(state, SamplingParams(max_tokens=12, ignore_eos=True)).run().tokens
    assert replies[0] == replies[1] == expected


def test_generate_stream_matches_non_stream(client: httpx.Client) -> None:
    a, b = new_session(client, history(19)), new_session(client, history(19))
    plain = generate(client, a, prompt="hello world", max_tokens=10)
    assert plain["finish_reason"] == "length" and len(plain["tokens"]) == 10
    with connect_sse(client, "POST", f"/sessions/{b}/generate",
                     json={"prompt": "hello world", "max_tokens": 10, "ignore_eos": True, "stream": True}) as source:
        raw = [e.data for e in source.iter_sse()]
    assert raw[-1] == "[DONE]"
    tokens = [json.loads(d) for d in raw[:-2]]
    final = json.loads(raw[-2])
    assert [t["token"] for t in tokens] == plain["tokens"]
    assert "".join(t["text"] for t in tokens) == plain["text"]
    assert final["finish_reason"] == "length"
    assert final["usage"] == plain["usage"] and plain["usage"]["completion_tokens"] == 10
    prompt_len = plain["usage"]["prompt_tokens"]
    assert prompt_len > 0 and plain["tokens_seen"] == 19 + prompt_len + 10
    # the reply belongs to the session: both sessions are equal afterwards
    sa, sb = (SessionState.from_bytes(client.get(f"/sessions/{s}/state").content) for s in (a, b))
    assert (sa.window, sa.sensory, sa.tokens_seen, sa.version) == (sb.window, sb.sensory, sb.tokens_seen, sb.version)
    assert (sa.ltm - sb.ltm).abs().max() < 1e-5, (sa.ltm - sb.ltm).abs().max()


def test_sampling_is_reproducible_with_a_seed(client: httpx.Client) -> None:
    a, b = new_session(client, history(12)), new_session(client, history(12))
    params = {"max_tokens": 16, "temperature": 1.5, "top_k": 50, "top_p": 0.95, "seed": 7}
    first, second = generate(client, a, **params), generate(client, b, **params)
    assert first["tokens"] == second["tokens"]
    c = new_session(client, history(12))
    other = generate(client, c, **{**params, "seed": 8})
    assert other["tokens"] != first["tokens"]  # 16 tokens from a 297-word vocabulary at T=1.5


def test_stop_string_ends_the_reply(client: httpx.Client) -> None:
    a = new_session(client, history(10))
    snapshot = client.get(f"/sessions/{a}/state").content
    full = generate(client, a, max_tokens=20)["text"]
    # a plain-ASCII stop string from the later part of the reply (random weights emit odd bytes)
    candidates = [full[i:i + 2] for i in range(len(full) // 3, len(full) - 1)
                  if full[i:i + 2].isascii() and full[i:i + 2].isprintable()]
    assert candidates, full
    stop = candidates[0]
    b = "stop-copy"
    assert client.put(f"/sessions/{b}/state", content=snapshot).status_code == 200
    stopped = generate(client, b, max_tokens=20, stop=[stop])
    assert stopped["finish_reason"] == "stop"
    assert stopped["text"] == full[:full.index(stop)]


def test_invalid_input_is_422(client: httpx.Client, local_model) -> None:
    sid = new_session(client)
    url = f"/sessions/{sid}/append"
    for body in ({"text": ""}, {"tokens": []}, {"tokens": [-1]}, {"tokens": [local_model.vocab_size]},
                 {"text": "a", "tokens": [1]}, {}, {"tokens": ["x"]}, {"tokens": [1.5]}):
        assert error_of(client.post(url, json=body), 422) in ("invalid_input", "invalid_request"), body
    assert error_of(client.post(url, content=b"{not json", headers={"content-type": "application/json"}),
                    422) == "invalid_request"
    gen = f"/sessions/{sid}/generate"
    assert error_of(client.post(gen, json={"max_tokens": 5}), 422) == "invalid_input"  # empty session
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"max_tokens": 0}, {"top_k": -2},
                {"stop": [""]}, {"prompt": "x", "prompt_tokens": [1]}, {"prompt_tokens": [9999]}):
        assert error_of(client.post(gen, json={"prompt": "hi", "max_tokens": 4, **bad}), 422), bad
    assert error_of(client.post("/sessions", json={"id": "has space"}), 422) == "invalid_request"
    assert client.get(f"/sessions/{sid}").json()["tokens_seen"] == 0  # nothing was applied


def test_too_large_is_413(client: httpx.Client) -> None:
    sid = new_session(client)
    assert error_of(client.post(f"/sessions/{sid}/append", json={"tokens": [1] * 5001}), 413) == "too_large"
    assert error_of(client.post(f"/sessions/{sid}/append", json={"text": "a" * 250_000}), 413) == "too_large"
    assert error_of(client.post(f"/sessions/{sid}/generate", json={"prompt": "hi", "max_tokens": 257}), 422)
    assert error_of(client.put(f"/sessions/{sid}/state", content=b"x" * 250_000), 413)
    assert client.get(f"/sessions/{sid}").json()["tokens_seen"] == 0


def test_unknown_session_is_404(client: httpx.Client) -> None:
    for method, path, body in (("GET", "", None), ("DELETE", "", None), ("GET", "/state", None),
                               ("POST", "/append", {"tokens": [1]}),
                               ("POST", "/generate", {"prompt": "hi", "max_tokens": 2})):
        response = client.request(method, f"/sessions/nope{path}", json=body)
        assert error_of(response, 404) == "not_found", path
    assert error_of(client.get("/no/such/route"), 404) == "not_found"


def test_state_export_import_and_bad_imports_change_nothing(client: httpx.Client, local_model) -> None:
    sid = new_session(client, history(21))
    before = client.get(f"/sessions/{sid}/state")
    assert before.headers["content-type"] == "application/octet-stream"
    data = before.content
    for bad in (b"", b"garbage", data[:-10], data[:40] + bytes([data[40] ^ 1]) + data[41:]):
        assert error_of(client.put(f"/sessions/{sid}/state", content=bad), 422) == "corrupt_state"
    foreign = SessionState.empty(local_model.dim, "0" * 32).to_bytes()
    assert error_of(client.put(f"/sessions/{sid}/state", content=foreign), 409) == "model_mismatch"
    assert client.get(f"/sessions/{sid}/state").content == data
    # a good import into a new id continues exactly as the original
    copy = client.put("/sessions/imported/state", content=data)
    assert copy.status_code == 200 and copy.json()["tokens_seen"] == 21
    assert generate(client, "imported", max_tokens=6)["tokens"] == generate(client, sid, max_tokens=6)["tokens"]
    # importing an older state over a newer one keeps the version growing (the CAS fence)
    newer = client.get(f"/sessions/{sid}").json()["version"]
    assert client.put(f"/sessions/{sid}/state", content=data).json()["version"] > newer
    assert client.get(f"/sessions/{sid}").json()["tokens_seen"] == 21


def test_stored_state_of_another_model_is_409(client: httpx.Client, redis_server: RedisServer, local_model) -> None:
    sid = new_session(client)
    foreign = SessionState.empty(local_model.dim, "f" * 32).to_bytes()
    redis_server.client().hset(f"hmt:session:{{{sid}}}", "state", foreign)
    assert error_of(client.post(f"/sessions/{sid}/append", json={"tokens": [1]}), 409) == "model_mismatch"
    assert error_of(client.get(f"/sessions/{sid}"), 409) == "model_mismatch"
    assert redis_server.client().hget(f"hmt:session:{{{sid}}}", "state") == foreign  # untouched


def test_busy_session_is_409_after_a_short_wait(client: httpx.Client, redis_server: RedisServer) -> None:
    sid = new_session(client)
    lock = f"hmt:lock:{{{sid}}}"
    redis_server.client().set(lock, "someone-else", px=10_000)
    start = time.monotonic()
    assert error_of(client.post(f"/sessions/{sid}/append", json={"tokens": [1]}), 409) == "session_busy"
    assert time.monotonic() - start >= 0.9  # waited --lock-wait-s first
    redis_server.client().delete(lock)
    assert client.post(f"/sessions/{sid}/append", json={"tokens": [1]}).status_code == 200


def test_concurrent_appends_lose_nothing(server: Server) -> None:
    with server.client() as c:
        sid = new_session(c)

    def append(i: int) -> int:
        with server.client() as c:
            return c.post(f"/sessions/{sid}/append", json={"tokens": history(13, i * 13)}).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(append, range(16)))
    assert set(codes) <= {200, 409} and codes.count(200) >= 1
    with server.client() as c:
        info = c.get(f"/sessions/{sid}").json()
    assert info["tokens_seen"] == 13 * codes.count(200)
    assert info["segments_total"] == (info["tokens_seen"] - 1) // SEG
    assert info["version"] == codes.count(200)


def test_huge_append_does_not_freeze_another_stream(server: Server) -> None:
    with server.client() as c:
        big, small = new_session(c), new_session(c, history(5))
    finished: dict[str, float] = {}

    def huge() -> None:
        with server.client() as c:
            assert c.post(f"/sessions/{big}/append", json={"tokens": history(3000)}).status_code == 200
        finished["append"] = time.monotonic()

    thread = threading.Thread(target=huge)
    thread.start()
    time.sleep(0.3)  # the append is under way
    with server.client() as c:
        reply = generate(c, small, max_tokens=20)
    finished["generate"] = time.monotonic()
    thread.join()
    assert len(reply["tokens"]) == 20
    assert finished["generate"] < finished["append"]


def test_concurrent_sessions_are_batched(server: Server) -> None:
    with server.client() as c:
        ids = [new_session(c) for _ in range(3)]

    def append(sid: str) -> None:
        with server.client() as c:
            assert c.post(f"/sessions/{sid}/append", json={"tokens": history(1200)}).status_code == 200

    before = metric(server, "hmt_batch_size_count") - metric(server, 'hmt_batch_size_bucket{le="1.0"}')
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(append, ids))
    after = metric(server, "hmt_batch_size_count") - metric(server, 'hmt_batch_size_bucket{le="1.0"}')
    assert after > before  # some forwards committed several sessions at once


def test_disconnect_mid_stream_records_the_reply_so_far(server: Server) -> None:
    with server.client() as c:
        sid = new_session(c, history(9))
    received = 0
    with server.client() as c, connect_sse(c, "POST", f"/sessions/{sid}/generate",
                                           json={"max_tokens": 250, "ignore_eos": True, "stream": True}) as source:
        for _event in source.iter_sse():
            received += 1
            if received == 3:
                break
    with server.client() as c:
        # the write finishes in the background; the next append waits for the lock
        assert c.post(f"/sessions/{sid}/append", json={"tokens": [1]}).status_code == 200
        info = c.get(f"/sessions/{sid}").json()
        state = SessionState.from_bytes(c.get(f"/sessions/{sid}/state").content)
    generated = info["tokens_seen"] - 9 - 1
    assert 3 <= generated <= 250
    print("generated before the disconnect was seen:", generated)
    assert state.tokens_seen == state.segments_committed * SEG + len(state.window)


def metric(server: Server, query: str) -> float:
    """Sum of the samples named like `query`, whose labels include the query's labels."""
    name, _, labels = query.partition("{")
    wanted = [w for w in labels.rstrip("}").split(",") if w]
    total = 0.0
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample.split("{")[0] == name and all(w in sample for w in wanted):
            total += float(value)
    return total


def test_metrics_after_traffic(server: Server) -> None:
    with server.client() as c:
        sid = new_session(c, history(30))
        with connect_sse(c, "POST", f"/sessions/{sid}/generate",
                         json={"max_tokens": 5, "ignore_eos": True, "stream": True}) as source:
            list(source.iter_sse())
    text = httpx.get(f"{server.url}/metrics").text
    for series in ("hmt_requests_total", "hmt_request_seconds_bucket", "hmt_time_to_first_token_seconds_count",
                   "hmt_inter_token_seconds_count", "hmt_tokens_in_total", "hmt_tokens_out_total",
                   "hmt_segments_committed_total", "hmt_segment_seconds_count", "hmt_batch_size_count",
                   "hmt_queue_depth", "hmt_store_seconds_count", "hmt_state_bytes_count", "hmt_active_sessions",
                   "hmt_model_memory_bytes", "hmt_recall_distance_count", "hmt_store_errors"):
        assert series in text, series
    assert metric(server, 'hmt_requests_total{route="/sessions/{session_id}/generate",status="200"}') >= 1
    assert metric(server, "hmt_tokens_in_total") >= 30
    assert metric(server, "hmt_tokens_out_total") >= 5
    assert metric(server, "hmt_segments_committed_total") >= 3
    assert metric(server, "hmt_time_to_first_token_seconds_count") >= 1
    assert metric(server, "hmt_recall_distance_count") >= 3
    assert metric(server, "hmt_model_memory_bytes") > 0
    assert metric(server, "hmt_active_sessions") == 0 and metric(server, "hmt_queue_depth") == 0
