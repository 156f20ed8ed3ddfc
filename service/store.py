"""Redis session store: one hash per session, whole-value writes fenced by the state's version,
one writer per session through a lock with expiry.

Layout, where <sid> is the session id, or `<owner>/<id>` with API keys (each key's ids are its own
namespace: another key's id is simply not there): `<prefix>session:{<sid>}` hash {state:
SessionState bytes, version, owner, created, and the fields written beside the state (SideWrites):
for chat sessions the conversation record and transcript of service.chat_sessions, for any
session the recall history of service.memory};
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

Round trips: taking the lock reads the state (and any fields asked for) in the same script; a
save and the lock's release after it go down one pipeline. On one server the owner's listing goes
down that pipeline too, and a chat hint down its listing's; on a cluster, where they are in other
slots, each is a round trip of its own.

The store's neighbours: service.redis_connection (the --redis-url forms and a client for each),
service.store_migration (keys of the earlier layout, without hash tags, renamed before the store's
first operation) and service.embedded_redis (the redis-server `hmt-serve` starts without a URL).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from service import metrics, store_migration
from service.redis_connection import TIMEOUT_S, connect, parse_redis_url

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
    """A held writer lock plus the state (and the fields asked for) read under it."""

    session_id: str
    token: str
    data: bytes
    version: int
    owner: str = ""
    handed_over: bool = False  # a task that saves and releases it took it over (SessionStore.leased)
    fields: dict[str, bytes | None] = field(default_factory=dict)  # the fields asked for, read with the state
    released: bool = False  # by the save (`SessionStore.save(..., release=True)`)


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


# ----- scripts ---------------------------------------------------------------------------------
# KEYS[1] lock, KEYS[2] session; ARGV: token, lock ttl ms, then fields to read beside the state.
# Nothing (nil) if another writer holds the lock, else 1 and the fields state, version, owner, ...
_ACQUIRE = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return false end
return {1, unpack(redis.call('HMGET', KEYS[2], 'state', 'version', 'owner', unpack(ARGV, 3)))}
"""

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
        self._acquire = self.redis.register_script(_ACQUIRE)
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
            await store_migration.upgrade(self.redis, self.prefix)
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

    async def _write(self, key: str, *commands: tuple[Any, ...], wait: bool = True,
                     optional: int = 0) -> tuple[list[Any], bool]:
        """Commands on keys of one session (one hash slot, that of `key`) in one round trip on one
        connection: their results, and whether wait_replicas replicas confirmed them (Redis WAIT
        counts the writes of the connection it runs on, so it goes down the same pipeline). The
        first `optional` commands may fail without failing the rest (their result is the error)."""
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
        results = list(await pipe.execute(raise_on_error=not optional))
        for result in results[optional:]:
            if isinstance(result, Exception):
                raise result
        confirmed = not waiting or int(results.pop()) >= self.wait_replicas
        return results, confirmed

    async def _write_listed(self, op: str, owner: str, session_id: str,
                            *commands: tuple[Any, ...]) -> tuple[list[Any], bool]:
        """`_write` of a session's commands, the session listed under its owner first: listed before
        the write, so that whoever sees the write sees it listed at least this recently, and the
        listing's order follows the order clients see writes in. On one server the listing goes down
        the same pipeline; on a cluster it is in another slot, so it is a round trip of its own."""
        key = self._key(owner, session_id)
        if isinstance(self.redis, RedisCluster):
            await self._list(owner, session_id)
            async with self._op(op):
                return await self._write(key, *commands)
        async with self._op(op):  # a failure to list is no error (see _list)
            results, confirmed = await self._write(key, self._listing(owner, session_id), *commands, optional=1)
        return results[1:], confirmed

    def _unconfirmed(self, what: str) -> StoreUnavailableError:
        metrics.STORE_ERRORS.labels("write").inc()
        log.warning("%s: not confirmed by %d replica(s) within %d ms", what, self.wait_replicas, self.wait_ms)
        return StoreUnavailableError(f"session store unavailable: {what} was not confirmed by {self.wait_replicas} "
                                     f"replica(s) within {self.wait_ms} ms; the primary has it but a failover "
                                     "may lose it: read the session to see its version")

    async def create(self, session_id: str, owner: str, data: bytes, version: int) -> None:
        key = self._key(owner, session_id)
        (created,), confirmed = await self._write_listed(
            "create", owner, session_id, ("EVAL", _CREATE, 1, key, data, version, owner, time.time(), self.ttl_ms))
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

    async def acquire(self, session_id: str, owner: str, must_exist: bool = True,
                      fields: Sequence[str] = ()) -> Lease:
        """Take the writer lock (waiting up to lock_wait_s) and read the state under it, and the
        `fields` written beside it (SideWrites) into `lease.fields`, in the same round trip.

        With must_exist=False a missing session gives a lease with empty data and version -1."""
        token = secrets.token_hex(16)
        deadline = time.monotonic() + self.lock_wait_s
        keys = [self._lock_key(owner, session_id), self._key(owner, session_id)]
        while True:
            async with self._op("lock"):
                got = cast("list[Any] | None", await self._acquire(keys=keys, args=[token, self.lock_ttl_ms, *fields]))
            if got:
                break
            # Check existence first so an unknown session is 404, not 409, even while locked.
            if must_exist and not await self.exists_for(session_id, owner):
                raise SessionNotFoundError(f"no session {session_id!r}")
            if time.monotonic() >= deadline:
                raise SessionBusyError(f"session {session_id!r} is busy with another request; retry later")
            await asyncio.sleep(0.02)
        lease = Lease(session_id, token, b"", -1, owner, fields=dict.fromkeys(fields))
        data, version, stored_owner, *values = got[1:]
        if data is None or (stored_owner or b"").decode() != owner:  # as `get`: missing, or another key's
            if must_exist:
                await self.release(lease)
                raise SessionNotFoundError(f"no session {session_id!r}")
        else:
            lease.data, lease.version = data, int(version)  # "version" is written together with "state"
            lease.fields = dict(zip(fields, values, strict=True))
        return lease

    @contextlib.asynccontextmanager
    async def leased(self, session_id: str, owner: str, must_exist: bool = True,
                     fields: Sequence[str] = ()) -> AsyncIterator[Lease]:
        """The session's writer lock (and state, and `fields`) for a block, released when the block
        ends, unless the block handed it over (`lease.handed_over = True`) to a task that saves and
        releases it."""
        lease = await self.acquire(session_id, owner, must_exist, fields)
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
        if lease.released:  # by its save
            return
        with contextlib.suppress(StoreUnavailableError):  # an unreleased lock expires by itself
            async with self._op("unlock"):
                await self._release(keys=[self._lock_key(lease.owner, lease.session_id)], args=[lease.token])

    async def save(self, lease: Lease, data: bytes, version: int, side: SideWrites | None = None,
                   release: bool = False) -> None:
        """Compare-and-set: write only if the stored version is still the one read under the lease.
        With `side`, other fields and labelled states change in the same atomic script. With
        `release`, the lease's lock is released right after, in the same round trip, whatever the
        outcome (a writer's last step)."""
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
        commands: list[tuple[Any, ...]] = [("EVAL", _SAVE, 2, key, self._snapshots_key(lease.owner, lease.session_id),
                                            *args)]
        if release:
            commands.append(("EVAL", _RELEASE, 1, self._lock_key(lease.owner, lease.session_id), lease.token))
        (result, *_), confirmed = await self._write_listed("write", lease.owner, lease.session_id, *commands)
        lease.released = release
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

    def _listing(self, owner: str, session_id: str) -> tuple[Any, ...]:
        return ("ZADD", self._listing_key(owner), time.time(), session_id)

    async def _list(self, owner: str, session_id: str) -> None:
        """List the session under its owner, by time of last write. A listing only (another slot
        than the session's, so not in its script): checked on reading, a failure to write it is no error."""
        with contextlib.suppress(StoreUnavailableError):
            async with self._op("write"):
                await self.redis.execute_command(*self._listing(owner, session_id))

    async def trim_listing(self, owner: str) -> None:
        """With a TTL: drop the owner's listing entries last written longer than the TTL ago (their
        sessions have expired), so a listing of short-lived sessions (stored responses) does not grow
        with every one ever made. A listing only: a failure is no error."""
        if self.ttl_ms:
            with contextlib.suppress(StoreUnavailableError):
                async with self._op("write"):
                    await self.redis.zremrangebyscore(self._listing_key(owner), "-inf",
                                                      time.time() - self.ttl_ms / 1000)

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
        session first (its slot), then written (its own slot): no hint outlives its session. On one
        server both go down one pipeline, in that order; a cluster sends the hint to its own slot."""
        hint, hints = self._hint_key(owner, chain_hash), self._hints_key(owner, session_id)
        listing: list[tuple[Any, ...]] = [("SADD", hints, hint)]
        if self.ttl_ms:
            listing.append(("PEXPIRE", hints, self.ttl_ms))
        written = ("SET", hint, session_id, *(("PX", self.ttl_ms) if self.ttl_ms else ()))
        with contextlib.suppress(StoreUnavailableError):
            async with self._op("write"):
                if isinstance(self.redis, RedisCluster):
                    await self._write(hints, *listing, wait=False)
                    await self.redis.execute_command(*written)
                else:
                    await self._write(hints, *listing, written, wait=False)
