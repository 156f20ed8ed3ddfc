"""The store's fencing against a real redis-server: a writer whose lock expired cannot
overwrite a newer state, and a second writer waits then gets SessionBusyError."""

from __future__ import annotations

import asyncio

import pytest
from serve_helpers import RedisServer

from service.store import SessionBusyError, SessionConflictError, SessionNotFoundError, SessionStore


def run(coro):
    return asyncio.run(coro)


def test_expired_writer_is_fenced_off(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        store = SessionStore(redis_server.url, prefix="fence:", lock_ttl_s=0.2, lock_wait_s=1.0)
        await store.create("s", "", b"v0", 0)
        slow = await store.acquire("s", "")
        await asyncio.sleep(0.35)  # slow writer's lock expires
        fast = await store.acquire("s", "")
        await store.save(fast, b"v1-fast", 1)
        await store.release(fast)
        with pytest.raises(SessionConflictError):
            await store.save(slow, b"v1-slow", 1)
        assert await store.get("s", "") == (b"v1-fast", 1)
        await store.release(slow)  # a stale token does not free someone else's lock
        await store.close()

    run(scenario())


def test_second_writer_waits_then_busy(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        store = SessionStore(redis_server.url, prefix="busy:", lock_ttl_s=5, lock_wait_s=0.2)
        await store.create("s", "", b"v0", 0)
        first = await store.acquire("s", "")
        with pytest.raises(SessionBusyError):
            await store.acquire("s", "")
        with pytest.raises(SessionNotFoundError):
            await store.acquire("missing", "")
        await store.release(first)
        second = await store.acquire("s", "")  # free again
        await store.save(second, b"v1", 1)
        assert await store.get("s", "") == (b"v1", 1)
        with pytest.raises(SessionNotFoundError):
            await store.get("s", "another-owner")
        await store.close()

    run(scenario())


def test_ttl_expires_idle_sessions(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        store = SessionStore(redis_server.url, prefix="ttl:", ttl_s=0.3)
        await store.create("s", "", b"v0", 0)
        assert await store.get("s", "") == (b"v0", 0)
        await asyncio.sleep(0.5)
        with pytest.raises(SessionNotFoundError):
            await store.get("s", "")
        await store.close()

    run(scenario())


def test_a_lease_is_released_with_its_block_unless_handed_over(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        store = SessionStore(redis_server.url, prefix="leased:", lock_ttl_s=5, lock_wait_s=0.2)
        await store.create("s", "", b"v0", 0)
        with pytest.raises(RuntimeError, match="fails mid-block"):
            async with store.leased("s", "") as lease:
                assert lease.data == b"v0"
                raise RuntimeError("fails mid-block")
        async with store.leased("s", "") as lease:  # free again: the failed block released it
            lease.handed_over = True  # now a saver task owns it
        with pytest.raises(SessionBusyError):
            await store.acquire("s", "")
        await store.release(lease)  # what the saver does at its end
        async with store.leased("s", ""):
            pass
        await store.close()

    run(scenario())
