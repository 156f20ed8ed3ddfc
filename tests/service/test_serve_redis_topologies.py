"""Redis Cluster and Redis Sentinel behind --redis-url, with real redis-server processes on loopback
(no mocks): a 3-master cluster, and a master + replica watched by 3 sentinels. The store and the
HTTP service on both; the earlier key layout moved on start; a master killed (SIGKILL) under HTTP
traffic, the replica promoted, and the same service process answering again, with every save it
acknowledged (confirmed on a replica with --redis-wait-replicas 1) still there."""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from redis.cluster import RedisCluster
from serve_helpers import RedisServer, Server, error_of, redis_binary

from service.redis_connection import parse_redis_url
from service.store import (
    SessionConflictError,
    SessionNotFoundError,
    SessionStore,
    SideWrites,
    StoreUnavailableError,
)
from service.store_migration import migrate


def _binaries() -> tuple[str, str] | None:
    try:
        server = redis_binary()
    except ImportError:
        return None
    cli = shutil.which("redis-cli")
    return (server, cli) if cli else None


pytestmark = pytest.mark.skipif(_binaries() is None, reason="needs redis-server and redis-cli to start a Redis "
                                                           "Cluster and Redis Sentinel on loopback")
MASTER = "hmt-master"


def run(coro):
    return asyncio.run(coro)


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too (redis 6 has no --cluster-port)."""
    while True:
        port = random.randint(20000, 40000)
        if _free(port) and _free(port + 10000):
            return port


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(redis.RedisError):
            if check():
                return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


class Cluster:
    """Three masters (and `replicas` replicas of each), slots spread by redis-cli --cluster create."""

    def __init__(self, base: Path, replicas: int = 0) -> None:
        self.replicas = replicas
        self.nodes = []
        for i in range(3 * (1 + replicas)):
            (base / f"node{i}").mkdir()
            self.nodes.append(RedisServer(base / f"node{i}", port=cluster_port(), args=[
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000",
                "--appendonly", "no"]))

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes[:2])

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        binaries = _binaries()
        assert binaries is not None
        subprocess.run([binaries[1], "--cluster", "create", *(f"127.0.0.1:{node.port}" for node in self.nodes),
                        "--cluster-replicas", str(self.replicas), "--cluster-yes"], check=True, capture_output=True,
                       timeout=60)
        for node in self.nodes:
            wait_for(lambda n=node: n.client().cluster("info")["cluster_state"] == "ok", 30, "the cluster")
        for node in self.nodes:  # every replica attached and in sync
            wait_for(lambda n=node: (lambda r: r["role"] == "master" or r["master_link_status"] == "up")(
                n.client().info("replication")), 30, "the replicas")

    def client(self) -> RedisCluster:
        return RedisCluster(host="127.0.0.1", port=self.nodes[0].port)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class SentinelGroup:
    """A master, one replica, three sentinels (quorum 2) that fail over within seconds."""

    def __init__(self, base: Path) -> None:
        self.base = base
        for name in ("master", "replica", "s0", "s1", "s2"):
            (base / name).mkdir()
        self.master = RedisServer(base / "master", args=["--appendonly", "no"])
        self.replica = RedisServer(base / "replica", args=["--appendonly", "no", "--replicaof", "127.0.0.1",
                                                           str(self.master.port)])
        self.sentinels = []
        for i in range(3):
            config = base / f"s{i}" / "sentinel.conf"
            config.write_text(f"sentinel monitor {MASTER} 127.0.0.1 {self.master.port} 2\n"
                              f"sentinel down-after-milliseconds {MASTER} 1000\n"
                              f"sentinel failover-timeout {MASTER} 4000\n"
                              f"sentinel parallel-syncs {MASTER} 1\n")
            self.sentinels.append(RedisServer(base / f"s{i}", config=config, args=["--sentinel"]))
        self.revived: RedisServer | None = None

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels) + f"/{MASTER}"

    def start(self) -> None:
        self.master.start()
        self.replica.start()
        wait_for(lambda: self.replica.client().info("replication")["master_link_status"] == "up", 30, "replication")
        for sentinel in self.sentinels:  # after the replica is up: their first INFO of the master lists it
            sentinel.start()
        for sentinel in self.sentinels:
            wait_for(lambda s=sentinel: (lambda m: m["num-other-sentinels"] == 2 and m["num-slaves"] == 1)(
                s.client().sentinel_master(MASTER)), 30, "the sentinels to know each other and the replica")

    def master_port(self) -> int:
        return int(self.sentinels[0].client().sentinel_get_master_addr_by_name(MASTER)[1])

    def stop(self) -> None:
        for server in [*self.sentinels, self.master, self.replica, self.revived]:
            if server is not None and server.process is not None:
                server.process.kill()
                server.process.wait()
                server.process = None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    nodes = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture(scope="module")
def sentinel_group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    group = SentinelGroup(tmp_path_factory.mktemp("sentinel"))
    try:
        group.start()
        yield group
    finally:
        group.stop()


@pytest.fixture(scope="module")
def services(model_dir: Path, cluster: Cluster, sentinel_group: SentinelGroup,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    """An hmt-serve on each topology, launched at once (torch takes seconds to import) and waited
    for by the HTTP tests; the store tests run meanwhile."""
    base = tmp_path_factory.mktemp("topologies")
    common = ["--model", str(model_dir)]
    servers = {
        "cluster": Server([*common, "--redis-url", cluster.url], base / "cluster.log").launch(),
        "sentinel": Server([*common, "--redis-url", sentinel_group.url, "--redis-wait-replicas", "1",
                            "--redis-wait-s", "1"], base / "sentinel.log").launch(),
    }
    yield servers
    for server in servers.values():
        server.stop()


def ids_on_every_master(client: RedisCluster, pattern: str, count: int = 3) -> list[str]:
    """Session ids whose keys (`pattern` with the id) live on `count` different masters."""
    ids, nodes = [], set()
    for i in range(1000):
        sid = f"s{i}"
        node = client.get_node_from_key(pattern.format(sid)).name
        if node not in nodes:
            nodes.add(node)
            ids.append(sid)
            if len(ids) == count:
                return ids
    raise AssertionError("the slots are not spread over the masters")


# ----- URLs ------------------------------------------------------------------------------------


def test_redis_url_forms() -> None:
    single = parse_redis_url("redis://:pw@host:6380/2")
    assert single.mode == "single" and single.url == "redis://:pw@host:6380/2"
    assert parse_redis_url("unix:///tmp/r.sock").mode == "single"
    cluster = parse_redis_url("redis+cluster://user:p%40ss@10.0.0.1:7000,[::1]:7001,node-c")
    assert (cluster.mode, cluster.username, cluster.password, cluster.tls) == ("cluster", "user", "p@ss", False)
    assert cluster.nodes == (("10.0.0.1", 7000), ("::1", 7001), ("node-c", 6379))
    sentinel = parse_redis_url("rediss+sentinel://:secret@s1:26379,s2,s3:26380/mymaster/3?sentinel_password=x")
    assert (sentinel.mode, sentinel.master, sentinel.db, sentinel.password, sentinel.tls) == (
        "sentinel", "mymaster", 3, "secret", True)
    assert sentinel.nodes == (("s1", 26379), ("s2", 26379), ("s3", 26380)) and sentinel.sentinel_password == "x"
    assert parse_redis_url("redis+sentinel://s1/mymaster").db == 0
    for bad, message in [("redis+sentinel://s1:26379", "master's name"), ("redis+cluster://a:1/3", "only database 0"),
                         ("redis+cluster://a:99999", "host:port"), ("redis+cluster://a:1?x=1", "unknown option"),
                         ("mongodb://:hunter2@a", "unknown Redis URL scheme"), ("localhost:6379", "unknown"),
                         ("redis+sentinel://s1/m/zero", "is a number")]:
        with pytest.raises(ValueError, match=message) as info:
            parse_redis_url(bad)
        assert "hunter2" not in str(info.value)
    with pytest.raises(ValueError, match="hash tags"):
        SessionStore("redis://localhost", prefix="a{b}:")


# ----- the store on a cluster ------------------------------------------------------------------


def test_store_on_a_cluster(cluster: Cluster, services: dict[str, Server]) -> None:
    client = cluster.client()
    ids = ids_on_every_master(client, "c:session:{{{}}}")

    async def scenario() -> None:
        store = SessionStore(cluster.url, prefix="c:", lock_wait_s=0.2)
        assert await store.ping()
        for sid in ids:
            await store.create(sid, "", b"v0", 0)
            with pytest.raises(SessionConflictError):
                await store.create(sid, "", b"again", 0)
            async with store.leased(sid, "") as lease:
                # the save script touches the session and its snapshots: one slot, one node
                await store.save(lease, b"v1-" + sid.encode(), 1,
                                 SideWrites(fields={"conversation": b"record"}, state_as="2", states={"0": b"first"}))
            assert await store.get(sid, "") == (b"v1-" + sid.encode(), 1)
            assert await store.labelled_state(sid, "", "2") == b"v1-" + sid.encode()
            assert await store.labelled_state(sid, "", "0") == b"first"
            assert await store.field(sid, "", "conversation") == b"record"
            await store.remember_chat("", f"hash-{sid}", sid)
            await store.remember_chat("", f"hash-{sid}-2", sid)
        assert await store.find_chat("", ["nowhere", *(f"hash-{sid}" for sid in ids)]) == (4, ids[-1])
        # an expired writer is fenced off on a cluster too
        slow = await store.acquire(ids[0], "")
        await store.release(slow)
        async with store.leased(ids[0], "") as fast:
            await store.save(fast, b"v2", 2)
        with pytest.raises(SessionConflictError):
            await store.save(slow, b"v2-slow", 2)
        # keys of one session share a slot; the sessions are on three masters
        for sid in ids:
            async with store.leased(sid, ""):
                slots = {client.keyslot(f"c:{kind}:{{{sid}}}") for kind in ("session", "snapshots", "hints", "lock")}
                assert len(slots) == 1 and client.exists(f"c:lock:{{{sid}}}") == 1
        assert len({client.get_node_from_key(f"c:session:{{{sid}}}").name for sid in ids}) == 3
        # delete: the session, its snapshots, and its chat hints (each in a slot of its own)
        hints = [f"c:chat::hash-{ids[1]}", f"c:chat::hash-{ids[1]}-2"]
        assert client.exists(*hints) == 2
        await store.delete(ids[1], "")
        with pytest.raises(SessionNotFoundError):
            await store.get(ids[1], "")
        assert client.exists(*hints, f"c:hints:{{{ids[1]}}}", f"c:snapshots:{{{ids[1]}}}") == 0
        assert await store.find_chat("", [f"hash-{ids[1]}"]) is None
        assert await store.find_chat("", [f"hash-{ids[2]}"]) == (1, ids[2])
        # API keys: the owner is inside the hash tag
        await store.create("mine", "owner1", b"o", 0)
        assert client.hget("c:session:{owner1/mine}", "state") == b"o"
        with pytest.raises(SessionNotFoundError):
            await store.get("mine", "owner2")
        await store.close()
        # WAIT goes to the session's node: this cluster has no replicas, so no write is confirmed
        waiting = SessionStore(cluster.url, prefix="c:", wait_replicas=1, wait_s=0.2)
        async with waiting.leased(ids[2], "") as lease:
            with pytest.raises(StoreUnavailableError, match="not confirmed by 1 replica"):
                await waiting.save(lease, b"unconfirmed", 2)
        assert await waiting.get(ids[2], "") == (b"unconfirmed", 2)  # the primary has it
        await waiting.close()

    run(scenario())
    client.close()


def test_a_plain_url_to_a_cluster_node_is_refused_clearly(cluster: Cluster) -> None:
    async def scenario() -> None:
        store = SessionStore(f"redis://127.0.0.1:{cluster.nodes[0].port}/0", prefix="c:")
        assert not await store.ping()
        with pytest.raises(StoreUnavailableError, match=r"redis\+cluster://"):
            await store.get("any", "")
        await store.close()

    run(scenario())


# ----- the earlier key layout ------------------------------------------------------------------


def write_legacy(client: redis.Redis | RedisCluster, prefix: str) -> None:
    """Keys as the store wrote them before hash tags: sessions (one with a TTL, one of an API key),
    snapshots, a hint list, a chat hint, a lock; and two sessions already under both names (an
    interrupted earlier migration: same content; a divergent writer: different content)."""
    client.hset(f"{prefix}session:a", mapping={"state": b"A", "version": 3, "owner": ""})
    client.pexpire(f"{prefix}session:a", 600_000)
    client.hset(f"{prefix}snapshots:a", mapping={"2": b"A2", "4": b"A4"})
    client.sadd(f"{prefix}hints:a", f"{prefix}chat::h1")
    client.set(f"{prefix}chat::h1", "a")
    client.hset(f"{prefix}session:k1/b", mapping={"state": b"B", "version": 1, "owner": "k1"})
    client.set(f"{prefix}lock:a", "token", px=60_000)
    for name in (f"{prefix}session:same", f"{prefix}session:{{same}}"):
        client.hset(name, mapping={"state": b"S", "version": 1, "owner": ""})
    client.hset(f"{prefix}session:diff", mapping={"state": b"old", "version": 1, "owner": ""})
    client.hset(f"{prefix}session:{{diff}}", mapping={"state": b"new", "version": 2, "owner": ""})


def check_migrated(client: redis.Redis | RedisCluster, prefix: str) -> None:
    assert client.exists(f"{prefix}session:a", f"{prefix}snapshots:a", f"{prefix}hints:a",
                         f"{prefix}session:k1/b", f"{prefix}session:same") == 0
    assert 590_000 < client.pttl(f"{prefix}session:{{a}}") <= 600_000  # the TTL came along
    assert client.pttl(f"{prefix}snapshots:{{a}}") == -1
    assert client.smembers(f"{prefix}hints:{{a}}") == {f"{prefix}chat::h1".encode()}
    assert client.exists(f"{prefix}lock:a") == 1  # left to expire
    assert client.hget(f"{prefix}session:diff", "state") == b"old"  # kept: the operator decides


async def use_migrated(store: SessionStore) -> None:
    assert await store.get("a", "") == (b"A", 3)
    assert await store.labelled_state("a", "", "4") == b"A4"
    assert await store.get("b", "k1") == (b"B", 1)
    assert await store.get("same", "") == (b"S", 1)
    assert await store.get("diff", "") == (b"new", 2)
    assert await store.find_chat("", ["h1"]) == (1, "a")
    async with store.leased("a", "") as lease:  # the old lock key does not block the new layout
        await store.save(lease, b"A'", 4)
    await store.delete("a", "")
    assert await store.find_chat("", ["h1"]) is None


def test_legacy_keys_move_on_one_server(redis_server: RedisServer) -> None:
    client = redis_server.client()
    write_legacy(client, "old1:")

    async def scenario() -> None:
        first, second = SessionStore(redis_server.url, prefix="old1:"), SessionStore(redis_server.url, prefix="old1:")
        await asyncio.gather(first.ping(), second.ping())  # two replicas starting at once
        check_migrated(client, "old1:")
        assert client.get("old1:layout") is None, "a key was kept: later starts must look again"
        await use_migrated(first)
        again = SessionStore(redis_server.url, prefix="old1:")  # idempotent: nothing left to move
        assert await migrate(again.redis, "old1:") == (0, 1)
        for store in (first, second, again):
            await store.close()

    run(scenario())


def test_a_finished_migration_is_not_scanned_again(redis_server: RedisServer) -> None:
    """A pass that leaves no key of the earlier layout marks the layout, and later starts skip the
    scan (a SCAN walks the whole keyspace, on every replica's start)."""
    client = redis_server.client()

    async def scenario() -> None:
        first = SessionStore(redis_server.url, prefix="old3:")
        await first.create("a", "", b"v0", 0)
        assert client.get("old3:layout") == b"hash-tagged"
        client.hset("old3:session:late", mapping={"state": b"s", "version": "1"})  # a stray earlier-layout key
        second = SessionStore(redis_server.url, prefix="old3:")
        await second.ping()
        assert client.exists("old3:session:late") and not client.exists("old3:session:{late}"), "scanned again"
        client.delete("old3:layout")
        third = SessionStore(redis_server.url, prefix="old3:")
        await third.ping()
        assert client.exists("old3:session:{late}") and client.get("old3:layout") == b"hash-tagged"
        for store in (first, second, third):
            await store.close()

    run(scenario())


def test_legacy_keys_move_on_a_cluster(cluster: Cluster) -> None:
    """The old and new names are in different slots (nodes): copied with DUMP/RESTORE, TTL kept."""
    client = cluster.client()
    write_legacy(client, "old2:")
    names = ["old2:session:a", "old2:session:{a}", "old2:snapshots:a", "old2:session:k1/b", "old2:session:{k1/b}"]
    assert len({client.get_node_from_key(name).name for name in names}) >= 2

    async def scenario() -> None:
        first, second = SessionStore(cluster.url, prefix="old2:"), SessionStore(cluster.url, prefix="old2:")
        await asyncio.gather(first.ping(), second.ping())
        check_migrated(client, "old2:")
        assert client.get("old2:layout") is None
        await use_migrated(first)
        again = SessionStore(cluster.url, prefix="old2:")
        assert await migrate(again.redis, "old2:") == (0, 1)
        for store in (first, second, again):
            await store.close()

    run(scenario())
    client.close()


def test_store_follows_a_cluster_failover(tmp_path: Path) -> None:
    """A master of a cluster with replicas is killed: its replica is promoted, and the same store
    serves the session again without a restart, with the save WAIT confirmed before the kill."""
    nodes = Cluster(tmp_path, replicas=1)
    try:
        nodes.start()
        client = nodes.client()

        async def scenario() -> None:
            store = SessionStore(nodes.url, prefix="fo:", wait_replicas=1, wait_s=2)
            await store.create("s", "", b"v0", 0)
            async with store.leased("s", "") as lease:
                await store.save(lease, b"v1", 1)
            port = int(client.get_node_from_key("fo:session:{s}").port)
            (master,) = [node for node in nodes.nodes if node.port == port]
            assert master.process is not None
            master.process.kill()
            master.process.wait()
            master.process = None
            start, outage = time.monotonic(), 0
            while True:  # clean 503s until a replica takes over the slot, then the same store serves
                try:
                    assert await store.get("s", "") == (b"v1", 1), "the confirmed save survived"
                    break
                except StoreUnavailableError:
                    outage += 1
                    assert time.monotonic() - start < 45, "no failover"
                    await asyncio.sleep(0.2)
            assert outage, "the request right after the kill should have failed"
            # the promoted master has no replica left: a write lands there but is not confirmed (503)
            async with store.leased("s", "") as lease:
                with pytest.raises(StoreUnavailableError, match="not confirmed by 1 replica"):
                    await store.save(lease, b"v2", 2)
            assert await store.get("s", "") == (b"v2", 2)
            master.start()  # the old master comes back as the new one's replica
            wait_for(lambda: master.client().info("replication").get("master_link_status") == "up", 30,
                     "the old master to rejoin as a replica")
            async with store.leased("s", "") as lease:
                await store.save(lease, b"v3", 3)
            replica = redis.Redis(port=master.port, single_connection_client=True)
            replica.execute_command("READONLY")  # a cluster replica answers reads of its master's slots
            assert replica.hget("fo:session:{s}", "version") == b"3", "confirmed: the replica has it"
            replica.close()
            await store.close()

        run(scenario())
        client.close()
    finally:
        nodes.stop()


# ----- the store through Sentinel --------------------------------------------------------------


def test_store_through_sentinel_waits_for_replicas(sentinel_group: SentinelGroup) -> None:
    async def scenario() -> None:
        store = SessionStore(sentinel_group.url, prefix="st:", wait_replicas=1, wait_s=2)
        await store.create("s", "", b"v0", 0)
        async with store.leased("s", "") as lease:
            await store.save(lease, b"v1", 1)
        # acknowledged with WAIT 1: the replica has it already
        assert sentinel_group.replica.client().hget("st:session:{s}", "version") == b"1"
        await store.close()
        greedy = SessionStore(sentinel_group.url, prefix="st:", wait_replicas=2, wait_s=0.3)  # one replica only
        async with greedy.leased("s", "") as lease:
            with pytest.raises(StoreUnavailableError, match="not confirmed by 2 replica"):
                await greedy.save(lease, b"v2", 2)
        assert await greedy.get("s", "") == (b"v2", 2)
        await greedy.close()

    run(scenario())


# ----- HTTP ------------------------------------------------------------------------------------


def test_http_on_a_cluster(services: dict[str, Server], cluster: Cluster) -> None:
    client = cluster.client()
    ids = ids_on_every_master(client, "hmt:session:{{{}}}")
    server = services["cluster"].wait_ready()
    with server.client() as c:
        for sid in ids:
            assert c.post("/sessions", json={"id": sid}).status_code == 201
            assert c.post(f"/sessions/{sid}/append", json={"tokens": list(range(1, 14))}).status_code == 200
            reply = c.post(f"/sessions/{sid}/generate", json={"max_tokens": 5, "ignore_eos": True})
            assert reply.status_code == 200, reply.text
            info = c.get(f"/sessions/{sid}").json()
            assert info["tokens_seen"] == 13 + 5
            state = c.get(f"/sessions/{sid}/state")
            assert state.status_code == 200
            copy = c.put(f"/sessions/{sid}-copy/state", content=state.content)
            assert copy.status_code == 200, copy.text
            assert c.get(f"/sessions/{sid}-copy").json()["tokens_seen"] == 18
        assert len({client.get_node_from_key(f"hmt:session:{{{sid}}}").name for sid in ids}) == 3
        # chat turns: the conversation record and snapshots beside the state, and hints elsewhere
        model = c.get("/v1/models").json()["data"][0]["id"]
        messages = [{"role": "user", "content": "hello world"}]
        first = c.post("/v1/chat/completions", headers={"X-Session-Id": ids[0]},
                       json={"model": model, "messages": messages, "max_tokens": 4, "temperature": 0})
        assert first.status_code == 200, first.text
        messages += [first.json()["choices"][0]["message"], {"role": "user", "content": "the quick brown fox"}]
        second = c.post("/v1/chat/completions", json={"model": model, "messages": messages, "max_tokens": 4,
                                                       "temperature": 0})
        assert second.status_code == 200, second.text
        assert second.headers["X-Session-Id"] == ids[0]  # found through a hint, in another slot
        assert second.headers["X-HMT-Continuation"] == "continued"
        hints = [key.decode() for key in client.smembers(f"hmt:hints:{{{ids[0]}}}")]
        assert hints and client.exists(*hints) == len(hints)
        assert client.hlen(f"hmt:snapshots:{{{ids[0]}}}") >= 1
        for sid in ids:
            assert c.delete(f"/sessions/{sid}").status_code == 200
            assert error_of(c.get(f"/sessions/{sid}"), 404) == "not_found"
        assert client.exists(*hints, f"hmt:snapshots:{{{ids[0]}}}") == 0
    client.close()


def test_http_survives_a_sentinel_failover(services: dict[str, Server], sentinel_group: SentinelGroup) -> None:
    """Appends go on while the master is SIGKILLed. Until a replica is promoted they are clean 503s
    (or 409 while a dead writer's lock runs out); after, with --redis-wait-replicas 1 and no replica
    left, still 503 (the write is not confirmed) until the old node returns as a replica; then the
    same process serves again, and no session lost a save that was acknowledged."""
    server = services["sentinel"].wait_ready()
    pid = server.process.pid if server.process else None
    sids = ["fo-a", "fo-b", "fo-c"]
    acknowledged: dict[str, int] = {}  # tokens_seen of the last 200 per session
    outcomes: list[tuple[float, str, int, str]] = []  # (time, session, status, error type)
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            while not stop.is_set():
                for sid in sids:
                    status, kind = -1, ""
                    try:  # anything but a 200 or a clean JSON error is recorded, and fails the test
                        response = c.post(f"/sessions/{sid}/append", json={"tokens": [1, 2, 3]})
                        if response.status_code == 200:
                            acknowledged[sid] = response.json()["tokens_seen"]
                        else:
                            kind = error_of(response, response.status_code)
                        status = response.status_code
                    except Exception as exc:
                        kind = repr(exc)
                    outcomes.append((time.monotonic(), sid, status, kind))

    with server.client() as c:
        for sid in sids:
            assert c.post("/sessions", json={"id": sid}).status_code == 201
    old_port = sentinel_group.master_port()
    worker = threading.Thread(target=traffic, daemon=True)
    worker.start()
    try:
        time.sleep(1.5)
        before = dict(acknowledged)
        assert all(before.get(sid, 0) > 0 for sid in sids), outcomes
        assert sentinel_group.master.process is not None
        sentinel_group.master.process.send_signal(signal.SIGKILL)
        sentinel_group.master.process.wait()
        killed = time.monotonic()
        wait_for(lambda: sentinel_group.master_port() != old_port, 30, "a sentinel failover")
        promoted = time.monotonic()
        assert sentinel_group.master_port() == sentinel_group.replica.port
        time.sleep(1.5)  # the service on the new master, with no replica: writes are not confirmed
        # the old node comes back (empty) as a replica of the new master
        sentinel_group.revived = RedisServer(sentinel_group.base / "master", port=old_port, args=[
            "--appendonly", "no", "--replicaof", "127.0.0.1", str(sentinel_group.replica.port)])
        sentinel_group.revived.start()
        revived = time.monotonic()
        deadline = revived + 30
        while not all(any(t > revived and s == sid and status == 200 for t, s, status, _ in outcomes[:])
                      for sid in sids):
            assert time.monotonic() < deadline, f"no recovery: {outcomes[-6:]}"
            time.sleep(0.2)
    finally:
        stop.set()
        worker.join(timeout=60)
    assert server.process is not None and server.process.pid == pid and server.process.poll() is None
    failures = [(status, kind) for t, _, status, kind in outcomes if status != 200]
    assert failures, "the outage was not seen"
    assert set(failures) <= {(503, "store_unavailable"), (409, "session_busy")}, failures
    unconfirmed = [o for o in outcomes if promoted + 0.5 < o[0] < revived and o[2] == 200]
    assert not unconfirmed, "a write was acknowledged while no replica could confirm it"
    assert any(killed < t and status == 503 for t, _, status, _ in outcomes)
    with server.client() as c:
        for sid in sids:
            info = c.get(f"/sessions/{sid}").json()
            # every acknowledged save was on the replica (WAIT 1) that is now the master
            assert info["tokens_seen"] >= acknowledged[sid] >= before[sid], (sid, info, acknowledged)
            assert info["tokens_seen"] % 3 == 0  # whole appends only: a state is never half-written
            response = c.post(f"/sessions/{sid}/append", json={"tokens": [4, 5, 6]})
            assert response.status_code == 200, response.text
            assert response.json()["tokens_seen"] == info["tokens_seen"] + 3
