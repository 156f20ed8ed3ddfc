"""Sessions outlive processes: two servers on one Redis, a Redis outage, an embedded Redis
across a server kill, and a clear exit without a model."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import pytest
from serve_helpers import Fleet, RedisServer, Server, error_of


def script(client_a: httpx.Client, client_b: httpx.Client, sid: str) -> list:
    """Appends and generations on one session, alternating between two clients."""
    assert client_a.post("/sessions", json={"id": sid}).status_code == 201
    out = []
    steps = [(client_a, "append", {"tokens": list(range(1, 14))}),
             (client_b, "append", {"text": "the quick brown fox"}),
             (client_a, "generate", {"max_tokens": 9, "ignore_eos": True}),
             (client_b, "generate", {"prompt": "hello world", "max_tokens": 9, "ignore_eos": True}),
             (client_a, "append", {"tokens": [5, 6, 7]}),
             (client_b, "generate", {"max_tokens": 5, "ignore_eos": True})]
    for c, route, body in steps:
        response = c.post(f"/sessions/{sid}/{route}", json=body)
        assert response.status_code == 200, response.text
        out.append(response.json().get("tokens"))
    info = client_b.get(f"/sessions/{sid}").json()
    out.append((info["tokens_seen"], info["segments_total"], info["window_tokens"]))
    return out


@pytest.fixture(scope="module")
def pair(fleet: Fleet) -> tuple[Server, Server]:
    return fleet.get("main"), fleet.get("second")


def test_two_servers_alternating_equal_one(pair: tuple[Server, Server]) -> None:
    a, b = pair
    with a.client() as ca, b.client() as cb:
        alternating = script(ca, cb, "shared")
        alone = script(ca, ca, "alone")
    assert alternating == alone
    assert all(len(t) == n for t, n in zip(alternating[2:4], (9, 9), strict=True))


def test_a_killed_writers_session_is_free_again_within_seconds(fleet: Fleet) -> None:
    """kill -9 of a server mid-stream: its lock is not renewed any more and expires (5 s lease),
    and the session is as it was before that request (the dead writer never saved)."""
    survivor, victim = fleet.get("main"), fleet.get("second")
    with survivor.client() as c:
        assert c.post("/sessions", json={"id": "orphaned"}).status_code == 201
        assert c.post("/sessions/orphaned/append", json={"tokens": list(range(1, 12))}).status_code == 200
        before = c.get("/sessions/orphaned").json()
    with victim.client() as v, v.stream("POST", "/sessions/orphaned/generate",
                                        json={"max_tokens": 256, "ignore_eos": True, "stream": True}) as stream:
        assert stream.status_code == 200
        next(stream.iter_lines())  # it is generating, holding the session's lock
        victim.stop(signal.SIGKILL)
    killed_at = time.monotonic()
    with survivor.client() as c:
        while (response := c.post("/sessions/orphaned/append", json={"tokens": [7]})).status_code == 409:
            assert time.monotonic() - killed_at < 12, "the dead writer's lock outlived its lease"
        assert response.status_code == 200, response.text
        assert response.json()["tokens_seen"] == before["tokens_seen"] + 1
    fleet.restart("second")


def test_redis_outage_is_503_then_recovers(pair: tuple[Server, Server], redis_server: RedisServer) -> None:
    a, _ = pair
    with a.client() as c:
        assert c.post("/sessions", json={"id": "durable"}).status_code == 201
        assert c.post("/sessions/durable/append", json={"tokens": [1, 2, 3, 4, 5]}).status_code == 200
        redis_server.stop()
        try:
            assert error_of(c.get("/sessions/durable"), 503) == "store_unavailable"
            assert error_of(c.post("/sessions/durable/append", json={"tokens": [1]}), 503) == "store_unavailable"
            assert error_of(c.post("/sessions", json={}), 503) == "store_unavailable"
            assert c.get("/readyz").status_code == 503
            assert c.get("/healthz").status_code == 200
        finally:
            redis_server.start()  # same port and directory: the AOF brings the data back
        deadline = time.monotonic() + 20
        while c.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "no recovery after Redis came back"
            time.sleep(0.2)
        assert c.get("/sessions/durable").json()["tokens_seen"] == 5
        assert c.post("/sessions/durable/append", json={"tokens": [6]}).json()["tokens_seen"] == 6
        assert 'hmt_store_errors_total{op="read"}' in c.get("/metrics").text


def test_embedded_redis_survives_a_server_kill(fleet: Fleet) -> None:
    first = fleet.get("embedded")
    data = Path(first.args[first.args.index("--data-dir") + 1])
    with first.client() as c:
        assert c.post("/sessions", json={"id": "kept"}).status_code == 201
        assert c.post("/sessions/kept/append", json={"tokens": list(range(1, 20))}).status_code == 200
        reply = c.post("/sessions/kept/generate", json={"max_tokens": 4, "ignore_eos": True}).json()["tokens"]
        state = c.get("/sessions/kept/state").content
    time.sleep(1.2)  # appendfsync everysec
    first.stop(signal.SIGKILL)
    socket = data / "redis.sock"
    deadline = time.monotonic() + 15
    while socket.exists():  # the orphaned redis-server gets SIGTERM (PDEATHSIG) and exits
        assert time.monotonic() < deadline, "embedded redis-server outlived its parent"
        time.sleep(0.1)
    assert (data / "appendonly.aof").exists() or (data / "appendonlydir").exists()
    second = fleet.restart("embedded")
    with second.client() as c:
        assert c.get("/sessions/kept/state").content == state
        assert c.get("/sessions/kept").json()["tokens_seen"] == 19 + len(reply)
        assert c.post("/sessions/kept/append", json={"tokens": [3]}).status_code == 200


def test_no_flags_serves_the_shipped_demo_model(tmp_path: Path) -> None:
    """The README's first command: no model named, no Redis started by hand."""
    server = Server(["--data-dir", str(tmp_path / "data")], tmp_path / "server.log")
    server.launch().wait_ready()
    try:
        with server.client() as c:
            sid = c.post("/sessions", json={}).json()["id"]
            reply = c.post(f"/sessions/{sid}/generate", json={"prompt": "In the beginning God created",
                                                              "max_tokens": 8, "temperature": 0})
            assert reply.status_code == 200, reply.text
            assert len(reply.json()["tokens"]) >= 1 and reply.json()["text"]
            assert c.get(f"/sessions/{sid}").json()["tokens_seen"] > 8
        assert (tmp_path / "data").is_dir()  # the embedded Redis keeps its files there
    finally:
        server.stop()
