"""The store's fencing against a real redis-server: a writer whose lock expired cannot
overwrite a newer state, and a second writer waits then gets SessionBusyError."""

from __future__ import annotations

import asyncio

import pytest
from serve_helpers import RedisServer

from service.store import SessionBusyError, SessionConflictError, SessionNotFoundError, SessionStore, SideWrites


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


def test_trim_listing_drops_only_entries_older_than_the_ttl(redis_server: RedisServer) -> None:
    """The owner's listing of a store with a TTL (the stored responses'): entries last written longer
    than the TTL ago go (their sessions expired), newer ones stay; without a TTL nothing goes."""
    async def scenario() -> None:
        store = SessionStore(redis_server.url, prefix="trim:", ttl_s=0.4)
        await store.create("old", "o", b"v0", 0)
        await asyncio.sleep(0.6)
        await store.create("new", "o", b"v0", 0)
        listing = "trim:sessions:o"
        assert await store.redis.zcard(listing) == 2  # the expired one is still listed
        await store.trim_listing("o")
        assert [m.decode() for m in await store.redis.zrange(listing, 0, -1)] == ["new"]
        forever = SessionStore(redis_server.url, prefix="trim-none:")
        await forever.create("a", "o", b"v0", 0)
        await asyncio.sleep(0.05)
        await forever.trim_listing("o")
        assert await forever.redis.zcard("trim-none:sessions:o") == 1
        await forever.close()
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


def test_a_lease_reads_its_fields_with_the_lock_and_a_save_can_release_it(redis_server: RedisServer) -> None:
    """Taking the lock reads the state and the fields asked for (one script); a save with release=True
    frees the lock in the same round trip, whatever its outcome, but never another writer's lock."""
    import redis.asyncio.connection as aioconnection

    async def scenario() -> None:
        store = SessionStore(redis_server.url, prefix="fields:", lock_ttl_s=0.2, lock_wait_s=0.2)
        await store.create("s", "owner", b"v0", 0)
        await store.release(await store.acquire("s", "owner"))  # the scripts loaded (EVALSHA's first miss)
        trips = 0
        send = aioconnection.AbstractConnection.send_packed_command

        async def counted(connection, command, check_health=True):  # type: ignore[no-untyped-def]
            nonlocal trips
            trips += 1
            await send(connection, command, check_health)

        aioconnection.AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]
        try:
            lease = await store.acquire("s", "owner", fields=("note", "absent"))
            assert (lease.data, lease.version, lease.fields) == (b"v0", 0, {"note": None, "absent": None})
            await store.save(lease, b"v1", 1, SideWrites(fields={"note": b"n1"}), release=True)
            assert lease.released and trips == 2  # lock + read; listing + save + release
            await store.release(lease)  # a no-op now: no round trip
            assert trips == 2
        finally:
            aioconnection.AbstractConnection.send_packed_command = send  # type: ignore[method-assign]
        again = await store.acquire("s", "owner", fields=("note", "absent"))  # free: no wait
        assert (again.data, again.version, again.fields) == (b"v1", 1, {"note": b"n1", "absent": None})
        await asyncio.sleep(0.35)  # its lock expires; a second writer (holding its lock for long) saves
        patient = SessionStore(redis_server.url, prefix="fields:", lock_ttl_s=30, lock_wait_s=0.1)
        other = await patient.acquire("s", "owner")
        await patient.save(other, b"v2", 2)
        with pytest.raises(SessionConflictError):
            await store.save(again, b"v2-stale", 2, release=True)
        with pytest.raises(SessionBusyError):  # the stale release left the other writer's lock alone
            await store.acquire("s", "owner")
        await patient.release(other)
        await patient.close()
        # another key's session: not found, and none of its fields read
        with pytest.raises(SessionNotFoundError):
            await store.acquire("s", "someone-else", fields=("note",))
        foreign = await store.acquire("s", "someone-else", must_exist=False, fields=("note",))
        assert (foreign.data, foreign.version, foreign.fields) == (b"", -1, {"note": None})
        await store.release(foreign)
        assert await store.get("s", "owner") == (b"v2", 2)
        assert await store.field("s", "owner", "note") == b"n1"
        await store.close()

    run(scenario())
