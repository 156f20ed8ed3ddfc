"""API keys: every route but health and metrics needs one; sessions are private to their key."""

from __future__ import annotations

import pytest
from serve_helpers import Fleet, Server, error_of


@pytest.fixture(scope="module")
def server(fleet: Fleet) -> Server:
    return fleet.get("auth")


def test_missing_or_bad_key_is_401(server: Server) -> None:
    with server.client() as anonymous, server.client("wrong") as wrong:
        for c in (anonymous, wrong):
            assert error_of(c.post("/sessions", json={}), 401) == "unauthorized"
            assert error_of(c.get("/sessions/x"), 401) == "unauthorized"
            assert error_of(c.post("/sessions/x/append", json={"tokens": [1]}), 401) == "unauthorized"
        assert error_of(anonymous.get("/sessions/x", headers={"Authorization": "Basic key-one"}), 401)
        # health and metrics stay open
        assert anonymous.get("/healthz").status_code == 200
        assert anonymous.get("/readyz").status_code == 200
        assert anonymous.get("/metrics").status_code == 200


def test_sessions_are_visible_only_to_their_key(server: Server) -> None:
    with server.client("key-one") as one, server.client("key-two") as two:
        assert one.post("/sessions", json={"id": "private"}).status_code == 201
        assert one.post("/sessions/private/append", json={"tokens": [1, 2, 3]}).status_code == 200
        data = one.get("/sessions/private/state").content
        for method, path, kwargs in (("GET", "", {}), ("GET", "/state", {}), ("DELETE", "", {}),
                                     ("POST", "/append", {"json": {"tokens": [1]}}),
                                     ("POST", "/generate", {"json": {"max_tokens": 2}})):
            assert error_of(two.request(method, f"/sessions/private{path}", **kwargs), 404) == "not_found", path
        # each key's ids are its own: the same id is free for another key, and tells it nothing
        created = two.post("/sessions", json={"id": "private"})
        assert created.status_code == 201 and created.json()["tokens_seen"] == 0
        assert two.put("/sessions/private/state", content=data).json()["tokens_seen"] == 3  # its own copy
        assert two.post("/sessions/private/append", json={"tokens": [4]}).json()["tokens_seen"] == 4
        info = one.get("/sessions/private").json()
        assert info["tokens_seen"] == 3 and info["version"] == 1  # the other key changed nothing
        assert two.delete("/sessions/private").status_code == 200
        assert one.get("/sessions/private").json()["tokens_seen"] == 3
        assert two.post("/sessions", json={"id": "theirs"}).status_code == 201
        assert error_of(one.get("/sessions/theirs"), 404) == "not_found"
        assert one.delete("/sessions/private").status_code == 200

