"""Recall weights over HTTP: the append stream's `segment` events and GET /sessions/{id}/memory,
checked for shape and bounds and against the model's own recall on the same states."""

from __future__ import annotations

import json

import httpx
from httpx_sse import connect_sse
from serve_helpers import error_of

from hmt_core.recall import RECALL_TOP_K

SEG, LTM = 8, 16  # segment_tokens and ltm_context of the test model
HISTORY = 64  # recall entries a session keeps (service.memory.RECALL_HISTORY)


def tokens(n: int, start: int = 3) -> list[int]:
    return [(start + 11 * i) % 250 + 1 for i in range(n)]


def stream_append(client: httpx.Client, sid: str, ids: list[int]) -> list[dict]:
    with connect_sse(client, "POST", f"/sessions/{sid}/append", json={"tokens": ids},
                     headers={"Accept": "text/event-stream"}) as source:
        return [json.loads(e.data) for e in source.iter_sse() if e.event == "segment"]


def check_bounds(recall: dict) -> None:
    segment, slots, weights = recall["segment"], recall["slots"], recall["weights"]
    held = min(segment, LTM)
    assert len(slots) == len(weights) == min(RECALL_TOP_K, held)
    assert all(segment - held <= s < segment for s in slots) and len(set(slots)) == len(slots)
    assert all(0 <= w <= 1 for w in weights) and weights == sorted(weights, reverse=True)
    assert sum(weights) <= 1 + 1e-6
    assert recall["distance"] == (segment - slots[0] if slots else 0)


def reference(local_model, ids: list[int], segments: int) -> list:
    """Each commit's recall, from the model's recall called on the state just before that commit."""
    state, traces = local_model.new_session(), []
    for segment in range(segments):
        state = local_model.append(state, ids[segment * SEG:(segment + 1) * SEG])  # its window, full, uncommitted
        assert state.segments_committed == segment
        recalled = local_model.recall_for([state.ltm], [state.window])
        traces += recalled.traces([segment], [state.ltm.shape[0]])
    return traces


def assert_matches(recalls: list[dict], expected: list) -> None:
    assert [r["segment"] for r in recalls] == [t.segment for t in expected]
    for got, want in zip(recalls, expected, strict=True):
        assert got["slots"] == list(want.slots), (got, want)
        assert max((abs(a - b) for a, b in zip(got["weights"], want.weights, strict=True)), default=0) < 1e-5


def test_segment_events_and_memory_carry_the_models_recall(client: httpx.Client, local_model) -> None:
    segments = HISTORY + 6  # past the memory's capacity (16) and the history's bound (64)
    ids = tokens(segments * SEG + 1)
    sid = client.post("/sessions", json={}).json()["id"]
    events = stream_append(client, sid, ids)
    assert [e["segments_total"] for e in events] == list(range(1, segments + 1))
    for event in events:
        assert event["recall"]["segment"] == event["segments_total"] - 1
        assert event["recall_distance"] == event["recall"]["distance"]
        check_bounds(event["recall"])
    expected = reference(local_model, ids, segments)
    assert_matches([e["recall"] for e in events], expected)

    memory = client.get(f"/sessions/{sid}/memory").json()
    assert len(memory["recalls"]) == HISTORY  # bounded: the last 64
    assert_matches(memory["recalls"], expected[-HISTORY:])
    for stored, event in zip(memory["recalls"], [e["recall"] for e in events[-HISTORY:]], strict=True):
        assert stored["slots"] == event["slots"] and stored["distance"] == event["distance"]
        assert max(abs(a - b) for a, b in zip(stored["weights"], event["weights"], strict=True)) <= 1e-6
    assert [r["segment"] for r in client.get(f"/sessions/{sid}/memory", params={"last": 3}).json()["recalls"]] \
        == [segments - 3, segments - 2, segments - 1]


def test_memory_sizes(client: httpx.Client, local_model) -> None:
    sid = client.post("/sessions", json={}).json()["id"]
    empty = client.get(f"/sessions/{sid}/memory").json()
    assert (empty["tokens_seen"], empty["segments_total"], empty["memories"], empty["recalls"]) == (0, 0, 0, [])
    client.post(f"/sessions/{sid}/append", json={"tokens": tokens(20 * SEG + 5)})
    memory = client.get(f"/sessions/{sid}/memory").json()
    info = client.get(f"/sessions/{sid}").json()
    assert memory["id"] == sid and memory["state_bytes"] == info["state_bytes"]
    assert (memory["tokens_seen"], memory["segments_total"], memory["window_tokens"]) == (20 * SEG + 5, 20, 5)
    assert (memory["memories"], memory["memory_capacity"], memory["segment_tokens"]) == (LTM, LTM, SEG)
    assert memory["memory_kind"] == "hmt"
    # llama, 2 layers, 2 KV heads of 16 dims, float32: keys and values
    assert memory["kv_cache_bytes_per_token"] == 2 * 2 * 2 * 16 * 4 == local_model.kv_cache_bytes_per_token
    assert memory["kv_cache_bytes"] == memory["kv_cache_bytes_per_token"] * memory["tokens_seen"]
    assert memory["recall_top_k"] == RECALL_TOP_K
    assert [r["segment"] for r in memory["recalls"]] == list(range(20))
    for recall in memory["recalls"]:
        check_bounds(recall)


def test_a_reply_that_commits_records_its_recalls(client: httpx.Client, local_model) -> None:
    sid = client.post("/sessions", json={}).json()["id"]
    ids = tokens(3 * SEG + 2)
    client.post(f"/sessions/{sid}/append", json={"tokens": ids})
    reply = client.post(f"/sessions/{sid}/generate", json={"max_tokens": 2 * SEG, "ignore_eos": True}).json()
    assert reply["segments_total"] == 5
    memory = client.get(f"/sessions/{sid}/memory").json()
    assert [r["segment"] for r in memory["recalls"]] == [0, 1, 2, 3, 4]
    assert_matches(memory["recalls"], reference(local_model, ids + reply["tokens"], 5))


def test_an_import_starts_a_new_history_and_bad_requests_are_4xx(client: httpx.Client) -> None:
    sid = client.post("/sessions", json={}).json()["id"]
    client.post(f"/sessions/{sid}/append", json={"tokens": tokens(3 * SEG + 1)})
    assert len(client.get(f"/sessions/{sid}/memory").json()["recalls"]) == 3
    exported = client.get(f"/sessions/{sid}/state").content
    assert client.put(f"/sessions/{sid}/state", content=exported).status_code == 200
    memory = client.get(f"/sessions/{sid}/memory").json()
    assert memory["segments_total"] == 3 and memory["recalls"] == []  # what the imported state lived through is unknown
    for last in (0, HISTORY + 1, "x"):
        assert error_of(client.get(f"/sessions/{sid}/memory", params={"last": last}), 422) == "invalid_request"
    assert error_of(client.get("/sessions/no-such-session/memory"), 404) == "not_found"


def test_memory_is_in_the_openapi_schema(client: httpx.Client) -> None:
    schema = client.get("/openapi.json").json()
    route = schema["paths"]["/sessions/{session_id}/memory"]["get"]
    assert route["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/SessionMemory")
    components = schema["components"]["schemas"]
    assert {"SessionMemory", "RecallEntry", "SegmentProgress"} <= set(components)  # the append stream's events too
    assert components["SegmentProgress"]["properties"]["recall"]["$ref"].endswith("/RecallEntry")
    assert set(components["RecallEntry"]["properties"]) == {"segment", "slots", "weights", "distance"}
