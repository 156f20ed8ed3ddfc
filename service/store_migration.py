"""The earlier key layout: sessions' keys before Redis Cluster hash tags, moved to their names now.

Before hash tags a session's keys were `<prefix>session:<sid>`, `<prefix>snapshots:<sid>` and
`<prefix>hints:<sid>`; now the id is in braces (`<prefix>session:{<sid>}`, service.store), so that
every key of one session is in one cluster slot. `upgrade` runs once before a store's first
operation (`SessionStore._start`): unless a marker says no key of the earlier layout is left, it
scans for them and moves them (`migrate`), and sets the marker when none is left.
"""

from __future__ import annotations

import hashlib
import logging
import re
from typing import cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

log = logging.getLogger("hmt-serve.store")

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
_LAYOUT = b"hash-tagged"  # <prefix>layout once no key of the earlier layout is left (`upgrade`)
_MIGRATE_BATCH = 16  # keys per round trip (a cluster copies values through the service: bounded memory)


def layout_key(prefix: str) -> str:
    return f"{prefix}layout"


async def upgrade(redis: aioredis.Redis | RedisCluster, prefix: str) -> None:
    """Move the keys of the earlier layout, unless a previous pass left none (marked): a scan walks the
    whole keyspace (2.2 s at 400k keys), and the marker spares every later start of every replica one."""
    if await redis.get(layout_key(prefix)) == _LAYOUT:
        return
    moved, kept = await migrate(redis, prefix)
    if moved or kept:
        log.log(logging.WARNING if kept else logging.INFO, "moved %d keys of the earlier layout to "
                "hash-tagged names; %d kept (see above)", moved, kept)
    if not kept:
        await redis.set(layout_key(prefix), _LAYOUT)


async def migrate(redis: aioredis.Redis | RedisCluster, prefix: str) -> tuple[int, int]:
    """Rename the keys of sessions, snapshots and hint lists of the layout before hash tags
    (`<prefix>session:<sid>`) to `<prefix>session:{<sid>}`, keeping their TTLs: RENAME on one
    server, DUMP/RESTORE then a checked delete on a cluster (SCAN of every primary). Idempotent
    and safe to run from several replicas at once: a new name that exists is never overwritten;
    an old key whose twin holds the same content is deleted (an interrupted earlier run), one
    whose twin differs is kept and reported. Returns (keys moved, keys kept)."""
    moved = kept = 0
    heads = [f"{prefix}{kind}:".encode() for kind in _LEGACY_KINDS]
    batches: dict[bytes, list[bytes]] = {head: [] for head in heads}
    # one pass over the prefix for every kind: a SCAN visits the whole keyspace whatever it matches
    async for key in redis.scan_iter(match=_glob_escape(prefix.encode()) + b"*", count=1000):
        head = next((h for h in heads if key.startswith(h)), None)
        if head is None or key[len(head):].startswith(b"{"):
            continue
        batches[head].append(key)
        if len(batches[head]) == _MIGRATE_BATCH:
            done, left = await _move(redis, head, batches[head])
            moved, kept, batches[head] = moved + done, kept + left, []
    for head, batch in batches.items():
        if batch:
            done, left = await _move(redis, head, batch)
            moved, kept = moved + done, kept + left
    return moved, kept

async def _move(redis: aioredis.Redis | RedisCluster, head: bytes, keys: list[bytes]) -> tuple[int, int]:
    pairs = [(key, head + b"{" + key[len(head):] + b"}") for key in keys]
    moved = kept = 0
    clashes: list[tuple[bytes, bytes]] = []
    if not isinstance(redis, RedisCluster):
        pipe = redis.pipeline(transaction=False)
        for old, new in pairs:
            pipe.execute_command("EVAL", _MOVE, 2, old, new)
        for pair, result in zip(pairs, await pipe.execute(), strict=True):
            moved += result == 1
            if result == -1:
                clashes.append(pair)
    else:
        reads = redis.pipeline(transaction=False)
        for old, _ in pairs:
            reads.dump(old)
            reads.pttl(old)
        got = await reads.execute()
        copies = [(old, new, payload, ttl) for (old, new), payload, ttl in zip(pairs, got[::2], got[1::2],
                                                                                strict=True)
                  if payload is not None and ttl != -2]
        restores = redis.pipeline(transaction=False)
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
            drops = redis.pipeline(transaction=False)
            for old, digest in copied:
                drops.execute_command("EVAL", _DROP_COPIED, 1, old, digest)
            await drops.execute()
            moved += len(copied)
    for old, new in clashes:
        before, after = await _content(redis, old), await _content(redis, new)
        if before is not None and before == after:
            await redis.delete(old)
            moved += 1
        elif before is not None:
            log.warning("both %r and %r exist and differ: the new one is served, the old one kept for you "
                        "to inspect (an old-version replica still writing?)", old, new)
            kept += 1
    return moved, kept

async def _content(redis: aioredis.Redis | RedisCluster, key: bytes) -> object:
    """What a key holds, to compare two copies across nodes (a DUMP may differ in encoding)."""
    kind = cast(bytes, await redis.type(key))
    if kind == b"hash":
        return cast("dict[bytes, bytes]", await redis.hgetall(key))
    if kind == b"set":
        return cast("set[bytes]", await redis.smembers(key))
    return None if kind == b"none" else await redis.dump(key)


def _glob_escape(text: bytes) -> bytes:
    """`text` matched literally by SCAN's MATCH pattern."""
    return re.sub(rb"([*?\[\]\\])", rb"\\\1", text)
