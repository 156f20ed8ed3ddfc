"""The page itself, and the session API's views of a chat: the key's sessions, a chat session's
transcript, and the append stream's progress; all on a live server. (The playground chats over the
Responses API: what it needs from that is in test_serve_responses.py, and tests/browser drives it.)"""

from __future__ import annotations

import json

import httpx
from httpx_sse import connect_sse
from serve_helpers import Fleet, Server, error_of

SEG = 8


def chat(client: httpx.Client, sid: str, messages: list[dict[str, str]], new_only: bool = False) -> str:
    headers = {"X-Session-Id": sid, **({"X-HMT-Messages": "new"} if new_only else {})}
    model = client.get("/v1/models").json()["data"][0]["id"]
    response = client.post("/v1/chat/completions", headers=headers,
                           json={"model": model, "messages": messages, "max_tokens": 6, "temperature": 0})
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


def transcript(client: httpx.Client, sid: str) -> tuple[list[tuple[str, str]], bool]:
    body = client.get(f"/sessions/{sid}/messages").json()
    return [(m["role"], m["content"]) for m in body["messages"]], body["complete"]


def test_the_page_and_its_assets_are_served_locally(client: httpx.Client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp  # nothing from elsewhere
    for asset, kind in (("playground.js", "javascript"), ("playground.css", "text/css"), ("favicon.svg", "svg")):
        assert f"/static/{asset}" in page.text
        response = client.get(f"/static/{asset}")
        assert response.status_code == 200 and kind in response.headers["content-type"], asset
    assert "http://" not in page.text and "https://" not in page.text
    assert client.get("/playground.json").json() == {"keys": False}
    assert "/" not in client.get("/openapi.json").json()["paths"]  # the page is not part of the API
    assert error_of(client.get("/static/no-such-file.js"), 404) == "not_found"


def test_a_transcript_follows_the_chat_turns(client: httpx.Client) -> None:
    sid = client.post("/sessions", json={}).json()["id"]
    assert transcript(client, sid) == ([], True)
    first = chat(client, sid, [{"role": "user", "content": "hello"}])
    history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first}]
    second = chat(client, sid, [*history, {"role": "user", "content": "again"}])
    assert transcript(client, sid) == ([("user", "hello"), ("assistant", first), ("user", "again"),
                                        ("assistant", second)], True)
    # regenerate: the history up to the last question again; the transcript follows the branch,
    # and so does the recall history (the old branch's segments are not shown as this one's)
    third = chat(client, sid, [*history, {"role": "user", "content": "again"}])
    assert transcript(client, sid)[0][2:] == [("user", "again"), ("assistant", third)]
    memory = client.get(f"/sessions/{sid}/memory").json()
    assert memory["segments_total"] > 2
    assert [r["segment"] for r in memory["recalls"]] == list(range(memory["segments_total"]))
    # only the new message (X-HMT-Messages: new): appended to the stored transcript
    fourth = chat(client, sid, [{"role": "user", "content": "more"}], new_only=True)
    messages, complete = transcript(client, sid)
    assert complete and messages[-2:] == [("user", "more"), ("assistant", fourth)] and len(messages) == 6
    # an import replaces the state: the transcript no longer describes it
    exported = client.get(f"/sessions/{sid}/state").content
    assert client.put(f"/sessions/{sid}/state", content=exported).status_code == 200
    assert transcript(client, sid) == ([], True)
    assert error_of(client.get("/sessions/no-such-session/messages"), 404) == "not_found"


def test_append_events_say_how_far_along_the_request_is(client: httpx.Client) -> None:
    sid = client.post("/sessions", json={}).json()["id"]
    client.post(f"/sessions/{sid}/append", json={"tokens": list(range(1, 6))})  # 5 tokens in the window
    with connect_sse(client, "POST", f"/sessions/{sid}/append", json={"tokens": list(range(1, 30))},
                     headers={"Accept": "text/event-stream"}) as source:
        events = [(e.event, json.loads(e.data)) for e in source.iter_sse()]
    segments = [body for name, body in events if name == "segment"]
    assert [s["segments_committed"] for s in segments] == [1, 2, 3, 4]  # (5 + 29 - 1) // 8
    assert {s["segments_expected"] for s in segments} == {4}
    assert events[-1][0] == "summary" and events[-1][1]["segments_committed"] == 4


def test_sessions_are_listed_per_key_newest_first(fleet: Fleet) -> None:
    server: Server = fleet.get("auth")
    with server.client("key-one") as one, server.client("key-two") as two:
        ids = [one.post("/sessions", json={}).json()["id"] for _ in range(3)]
        assert one.post(f"/sessions/{ids[0]}/append", json={"tokens": [1, 2]}).status_code == 200  # used last
        listed = [s["id"] for s in one.get("/sessions").json()["sessions"]]
        assert listed[:3] == [ids[0], ids[2], ids[1]]
        assert not set(ids) & {s["id"] for s in two.get("/sessions").json()["sessions"]}
        assert one.delete(f"/sessions/{ids[2]}").status_code == 200
        assert ids[2] not in [s["id"] for s in one.get("/sessions").json()["sessions"]]
        assert [s["id"] for s in one.get("/sessions", params={"limit": 1}).json()["sessions"]] == [ids[0]]
        for limit in (0, 1001, "x"):
            assert error_of(one.get("/sessions", params={"limit": limit}), 422) == "invalid_request"
        assert error_of(httpx.get(server.url + "/sessions"), 401) == "unauthorized"
        assert httpx.get(server.url + "/playground.json").json() == {"keys": True}
        assert httpx.get(server.url + "/").status_code == 200  # the page asks for the key itself
