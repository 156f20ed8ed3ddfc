"""Stored responses (/v1/responses) and conversations (/v1/conversations): each an HMT session
of its own, in Redis.

A stored response is a session whose state is the model's memory after that turn (its input and
its reply read), so `previous_response_id` resumes it on any replica by reading only the new
input, and two responses that name the same one both start from that same state (the previous
state is only read, never written: stored responses do not change). Beside the state, in the same
atomic save (store.SideWrites), the session's hash keeps the response object, its input items and
the chat template's text still owed after the reply (`pending`, as service.conversation computes it).

A conversation is a session that its responses continue in turn (one writer at a time, under the
session's lock): its state is the memory after its last response, and a record beside it keeps the
conversation's items, how many of them the state has read (items added through the items API are
read by the next response), and its metadata. Deleting an item the state has read cannot make the
memory forget it: the conversation is marked stale, and its next response reads the remaining
items again from a fresh state.

Both live in a SessionStore of their own: the key prefix `<key_prefix>responses:` (so they are not
listed among the /sessions) and the TTL `--response-ttl-s`, which the store's save script sets on
every key of the response atomically with the write. Each API key's ids are its own namespace (the
store scopes keys by owner): another key's response id is simply not there.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from service.errors import APIError
from service.job import Job
from service.memory import RECALL_FIELD
from service.protocol import SessionMemory
from service.responses_protocol import ITEMS, Item, ResponseObject
from service.session_service import JOB_FIELDS, Service
from service.store import Lease, SessionNotFoundError, SessionStore, SideWrites

RESPONSE_FIELD = "response"  # the response object (JSON)
INPUT_FIELD = "input_items"  # its input items (JSON list)
PENDING_FIELD = "pending"  # template text after the reply that the state has not read yet
CONVERSATION_FIELD = "conversation"  # a conversation's record (JSON)
ID_PATTERN = re.compile(r"resp_[0-9a-f]{32}")
CONVERSATION_PATTERN = re.compile(r"conv_[0-9a-f]{32}")


def new_id(kind: str) -> str:
    return f"{kind}_{uuid.uuid4().hex}"


def not_found(kind: str, object_id: str) -> APIError:
    return APIError(404, "not_found", f"{kind} with id {object_id!r} not found.")


@dataclass
class ConversationRecord:
    created_at: int
    metadata: dict[str, str] = field(default_factory=dict)
    items: list[Item] = field(default_factory=list)
    read: int = 0  # items[:read] are in the state
    pending: str = ""  # template text after the last reply that the state has not read yet
    stale: bool = False  # the state read an item since deleted: read them all again from a fresh state

    def to_bytes(self) -> bytes:
        return json.dumps({"created_at": self.created_at, "metadata": self.metadata, "read": self.read,
                           "pending": self.pending, "stale": self.stale,
                           "items": [item.model_dump() for item in self.items]}).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> ConversationRecord:
        raw = json.loads(data)
        return cls(int(raw["created_at"]), dict(raw["metadata"]), ITEMS.validate_python(raw["items"]),
                   int(raw["read"]), str(raw["pending"]), bool(raw["stale"]))


@dataclass
class Base:
    """What a continuation starts from: the previous response's state and its pending text."""

    state: bytes
    pending: str
    recall: bytes | None  # its recall history (service.memory), which the continuation's carries on


class ResponseStore:
    def __init__(self, service: Service) -> None:
        settings = service.settings
        self.store = SessionStore(service.store.target.url, f"{settings.key_prefix}responses:", settings.response_ttl_s,
                                  settings.lock_ttl_s, settings.lock_wait_s, settings.redis_wait_replicas,
                                  settings.redis_wait_s)

    async def close(self) -> None:
        await self.store.close()

    async def base(self, response_id: str, owner: str) -> Base:
        """The previous response to continue; 404 previous_response_not_found when it is unknown,
        expired, deleted, not stored, or another API key's."""
        missing = APIError(404, "previous_response_not_found",
                           f"Previous response with id {response_id!r} not found.")
        if ID_PATTERN.fullmatch(response_id) is None:
            raise missing
        try:
            state, _ = await self.store.get(response_id, owner)
        except SessionNotFoundError:
            raise missing from None
        pending = await self.store.field(response_id, owner, PENDING_FIELD)
        if pending is None:  # deleted between the two reads
            raise missing
        return Base(state, pending.decode(), await self.store.field(response_id, owner, RECALL_FIELD))

    async def launch(self, response_id: str, owner: str, run: Callable[[Lease], tuple[Job, Any]]) -> tuple[Job, Any]:
        """Run `run(lease)` (which hands the lease to Service.launch, with this store) on the new
        response's session."""
        async with self.store.leased(response_id, owner, must_exist=False, fields=JOB_FIELDS) as lease:
            return run(lease)

    @staticmethod
    def writes(response: ResponseObject, items: list[Item], pending: str) -> SideWrites:
        return SideWrites(fields={RESPONSE_FIELD: response.model_dump_json().encode(),
                                  INPUT_FIELD: json.dumps([i.model_dump() for i in items]).encode(),
                                  PENDING_FIELD: pending.encode()})

    async def saved(self, owner: str) -> None:
        """After a save: drop listing entries older than the TTL (their responses have expired), so
        the store's per-owner listing does not grow with every response ever made."""
        await self.store.trim_listing(owner)

    async def _field(self, response_id: str, owner: str, name: str) -> bytes:
        if ID_PATTERN.fullmatch(response_id) is not None:
            raw = await self.store.field(response_id, owner, name)
            if raw is not None and await self.store.exists_for(response_id, owner):
                return raw
        raise not_found("Response", response_id)

    async def memory(self, service: Service, kind: str, object_id: str, owner: str, last: int) -> SessionMemory:
        """The memory of a stored response's or a conversation's state (GET .../memory, an HMT extension)."""
        pattern = ID_PATTERN if kind == "Response" else CONVERSATION_PATTERN
        if pattern.fullmatch(object_id) is not None:
            with contextlib.suppress(SessionNotFoundError):
                return await service.memory(self.store, object_id, owner, last)
        raise not_found(kind, object_id)

    async def get(self, response_id: str, owner: str) -> ResponseObject:
        return ResponseObject.model_validate_json(await self._field(response_id, owner, RESPONSE_FIELD))

    async def input_items(self, response_id: str, owner: str) -> list[Item]:
        return ITEMS.validate_json(await self._field(response_id, owner, INPUT_FIELD))

    async def keep(self, response_id: str, owner: str, state: bytes, version: int, writes: SideWrites) -> None:
        """Store a response made in a conversation as a response of its own (its state a copy of the
        conversation's after it), so it can be retrieved and named by previous_response_id."""
        async with self.store.leased(response_id, owner, must_exist=False) as lease:
            await self.store.save(lease, state, version, writes, release=True)

    # ----- conversations -----------------------------------------------------------------------

    async def create_conversation(self, owner: str, state: bytes, version: int, record: ConversationRecord) -> str:
        conversation_id = new_id("conv")
        async with self.store.leased(conversation_id, owner, must_exist=False) as lease:
            await self.store.save(lease, state, version, self.conversation_writes(record), release=True)
        return conversation_id

    @staticmethod
    def conversation_writes(record: ConversationRecord) -> SideWrites:
        return SideWrites(fields={CONVERSATION_FIELD: record.to_bytes()})

    @contextlib.asynccontextmanager
    async def conversation(self, conversation_id: str, owner: str) -> AsyncIterator[tuple[Lease, ConversationRecord]]:
        """A conversation's lock, state and record (read in one round trip, with what a job's save
        reads) for a block (handed over when a job takes the lease)."""
        missing = not_found("Conversation", conversation_id)
        if CONVERSATION_PATTERN.fullmatch(conversation_id) is None:
            raise missing
        try:
            async with self.store.leased(conversation_id, owner, fields=(CONVERSATION_FIELD, *JOB_FIELDS)) as lease:
                raw = lease.fields[CONVERSATION_FIELD]
                if raw is None:
                    raise missing
                yield lease, ConversationRecord.from_bytes(raw)
        except SessionNotFoundError:
            raise missing from None

    async def update_conversation(self, lease: Lease, record: ConversationRecord) -> None:
        """A change of the record only (the state as it is)."""
        await self.store.save(lease, lease.data, lease.version, self.conversation_writes(record), release=True)

    async def read_conversation(self, conversation_id: str, owner: str) -> ConversationRecord:
        if CONVERSATION_PATTERN.fullmatch(conversation_id) is not None:
            raw = await self.store.field(conversation_id, owner, CONVERSATION_FIELD)
            if raw is not None:
                return ConversationRecord.from_bytes(raw)
        raise not_found("Conversation", conversation_id)

    async def delete_conversation(self, conversation_id: str, owner: str) -> None:
        await self._delete("Conversation", CONVERSATION_PATTERN, conversation_id, owner)

    async def delete(self, response_id: str, owner: str) -> None:
        await self._delete("Response", ID_PATTERN, response_id, owner)

    async def _delete(self, kind: str, pattern: re.Pattern[str], object_id: str, owner: str) -> None:
        """Delete a response's or a conversation's session (state, record, items)."""
        if pattern.fullmatch(object_id) is not None:
            with contextlib.suppress(SessionNotFoundError):
                await self.store.delete(object_id, owner)
                return
        raise not_found(kind, object_id)
