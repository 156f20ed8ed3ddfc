"""The session service: what every route needs (model, worker, store, settings) and the one path
of a write.

Data path of a write: handler -> store.acquire (lock + read) -> worker job -> store.save
(version compare-and-set) and release -> response/stream. The store-to-store part runs in its
own task, not in the response: a client that disconnects mid-stream cannot leave a session
half-written. Disconnect rule: accepted input (the append, the generate prompt) is always
applied in full, and a generation's reply so far is all recorded (every token sent, plus any
the worker produced before it saw the disconnect); the session stays consistent either way.

A state is checked against the model once, where it enters: read from the store (`state_from`),
sent by a client (`imported`), or made by the model. The worker trusts those (`Job.checked`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi import Request

from hmt_core import CorruptStateError, HMTModel, InvalidInputError, SamplingParams, SessionState
from hmt_core.recall import RECALL_TOP_K
from service import metrics
from service.errors import APIError
from service.job import Constraint, Job, JobResult
from service.memory import RECALL_FIELD, entry, merge_history, read_history
from service.protocol import SessionInfo, SessionMemory
from service.settings import Settings
from service.store import Lease, SessionStore, SideWrites, StoreUnavailableError
from service.worker import ModelWorker

JOB_FIELDS = (RECALL_FIELD,)  # what a job's save reads of its session: read with the state, under the lease


class Service:
    """Everything a request needs: the model, its worker, the store, the settings."""

    def __init__(self, settings: Settings, model: HMTModel, store: SessionStore) -> None:
        self.settings = settings
        self.model = model
        self.store = store
        self.worker = ModelWorker(model, settings.max_batch, settings.round_token_budget, settings.threads,
                                  settings.compile)
        self.fingerprint = model.fingerprint
        self._tasks: set[asyncio.Task[Any]] = set()  # strong references to session tasks
        self._keys = {hashlib.sha256(k.encode()).hexdigest()[:32]: k for k in settings.keys}
        self._state_key = settings.state_secret.encode() if settings.state_secret else None

    # ----- auth ------------------------------------------------------------------------------

    def owner(self, request: Request) -> str:
        """The owner tag sessions are stored under: '' without keys, else a hash of the key."""
        if not self._keys:
            return ""
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and key:
            for tag, known in self._keys.items():
                if hmac.compare_digest(key.encode(), known.encode()):
                    return tag
        raise APIError(401, "unauthorized", "missing or invalid API key (Authorization: Bearer <key>)")

    # ----- helpers -----------------------------------------------------------------------------

    def encode(self, state: SessionState) -> bytes:
        """A state's stored (and exported) bytes: signed when the operator set a secret."""
        return state.to_bytes(self._state_key)

    def imported(self, data: bytes) -> SessionState:
        """A state a client sent: verified whole (signature when there is a secret, then every
        invariant) before anything is written."""
        state = SessionState.from_bytes(data, key=self._state_key)
        self.model.check_session(state)  # memory kind, then model, then every invariant
        return state

    def state_from(self, data: bytes) -> SessionState:
        """A stored state, checked against this model (409 if another model made it)."""
        try:
            state = SessionState.from_bytes(data)
            self.model.check_session(state)  # memory kind, then model, then every invariant
        except CorruptStateError as exc:
            raise APIError(409, "corrupt_state", f"the stored session state is unusable: {exc}") from None
        return state

    async def tokens_of(self, text: str | None, tokens: list[int] | None) -> list[int]:
        if text is not None:
            if self.model.tokenizer is None:
                raise InvalidInputError("this model has no tokenizer: send token ids")
            # off the event loop: a long text takes a while to tokenize
            tokens = await asyncio.to_thread(self.model.tokenizer.encode, text, add_special_tokens=False)
        tokens = list(tokens or [])
        if len(tokens) > self.settings.max_append_tokens:
            raise APIError(413, "too_large", f"{len(tokens)} tokens exceed the limit of "
                                             f"{self.settings.max_append_tokens} per request")
        if tokens:
            self.model.check_tokens(tokens)
        return tokens

    def sampling_params(self, *, max_tokens: int, stop: Sequence[str] = (), stop_token_ids: Sequence[int] = (),
                        **sampling: Any) -> SamplingParams:
        """Both APIs build their sampling parameters here: one set of limits and checks."""
        limit = self.settings.max_generate_tokens
        if max_tokens > limit:
            raise InvalidInputError(f"max_tokens {max_tokens} is over this server's limit of {limit}")
        if stop and self.model.tokenizer is None:
            raise InvalidInputError("stop strings need a model with a tokenizer")
        return SamplingParams(max_tokens=max_tokens, stop=tuple(stop), stop_token_ids=tuple(stop_token_ids),
                              **sampling)

    def info(self, session_id: str, state: SessionState, size: int) -> SessionInfo:
        return SessionInfo(id=session_id, tokens_seen=state.tokens_seen, segments_total=state.segments_committed,
                           window_tokens=len(state.window), state_bytes=size, version=state.version,
                           fingerprint=state.fingerprint)

    async def memory(self, store: SessionStore, session_id: str, owner: str, last: int) -> SessionMemory:
        """A stored state's memory (GET /sessions/{id}/memory, and a response's or a conversation's):
        its tokens and segments, its size next to a KV cache's for the same history, and the top
        recall weights of its last `last` committed segments."""
        raw = await store.field(session_id, owner, RECALL_FIELD)  # before the state: never newer
        data, _ = await store.get(session_id, owner)
        state, model = self.state_from(data), self.model
        per_token = model.kv_cache_bytes_per_token
        return SessionMemory(id=session_id, tokens_seen=state.tokens_seen, segments_total=state.segments_committed,
                             window_tokens=len(state.window), state_bytes=len(data), memories=state.ltm.shape[0],
                             memory_kind=state.memory, memory_capacity=model.hmt_config.memory_rows,
                             segment_tokens=model.hmt_config.segment_tokens, kv_cache_bytes_per_token=per_token,
                             kv_cache_bytes=per_token * state.tokens_seen, recall_top_k=RECALL_TOP_K,
                             recalls=[entry(r) for r in read_history(raw, state.segments_committed)[-last:]])

    async def start_job(self, session_id: str, owner: str, tokens: list[int], params: SamplingParams | None,
                        create: bool = False) -> tuple[Job, asyncio.Task[JobResult]]:
        """A job on a stored session (with `create`, a new one when there is none), saved when done."""
        async with self.store.leased(session_id, owner, must_exist=not create, fields=JOB_FIELDS) as lease:
            state = self.state_from(lease.data) if lease.version >= 0 else self.model.new_session()
            return self.launch(lease, owner, state, tokens, params)

    def launch(self, lease: Lease, owner: str, state: SessionState, tokens: list[int], params: SamplingParams | None,
               side: Callable[[JobResult], SideWrites] | None = None,
               constraint: Constraint | None = None,
               store: SessionStore | None = None) -> tuple[Job, asyncio.Task[JobResult]]:
        """Run a job on a state read under `lease` (held with `SessionStore.leased`, best with
        `fields=JOB_FIELDS`), which the job's saver task takes over: it is released when the result is
        saved (or failed). `state` was checked (`state_from`, `imported`) or made by the model. `side`
        (from the result) is written atomically with the state: the chat layer's conversation record.
        `constraint` picks the reply's tokens (service.constrained). `store`: the store the lease is
        of, when not the sessions' (the Responses API's, service.responses_store)."""
        if params is not None and not tokens and not state.window:
            raise InvalidInputError("the session has no tokens yet: give a prompt")
        metrics.TOKENS_IN.inc(len(tokens))
        job = self.worker.submit(state, tokens, params, constraint, checked=True)
        lease.handed_over = True
        task = self.spawn(self._complete(lease, owner, job, side, store or self.store))
        return job, task

    def run_unsaved(self, state: SessionState, tokens: list[int], params: SamplingParams,
                    constraint: Constraint | None = None) -> tuple[Job, asyncio.Task[JobResult]]:
        """A job on a state that is not stored (a stateless request); the state was made by the model."""
        metrics.TOKENS_IN.inc(len(tokens))
        job = self.worker.submit(state, tokens, params, constraint, checked=True)

        async def complete() -> JobResult:
            try:
                return await job.done
            finally:
                job.end()

        return job, self.spawn(complete())

    def spawn(self, coroutine: Awaitable[Any]) -> asyncio.Task[Any]:
        """A task that outlives the request (kept referenced so it is not collected)."""
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _complete(self, lease: Lease, owner: str, job: Job,
                        side: Callable[[JobResult], SideWrites] | None, store: SessionStore) -> JobResult:
        """Wait for the worker, save with compare-and-set, release; runs even if the client left.
        The recall history of the segments the job committed is saved with the state."""
        metrics.ACTIVE_SESSIONS.inc()
        renewer = asyncio.create_task(self._renew(lease, store))
        try:
            result: JobResult = await job.done
            writes = side(result) if side else None
            if result.recalls:
                # under the lease: read with the state (JOB_FIELDS), else now
                raw = lease.fields[RECALL_FIELD] if RECALL_FIELD in lease.fields else \
                    await store.field(lease.session_id, owner, RECALL_FIELD)
                writes = writes or SideWrites()
                writes.fields[RECALL_FIELD] = merge_history(raw, job.state.segments_committed, result.recalls)
            await store.save(lease, self.encode(result.state), result.state.version, writes, release=True)
            return result
        finally:
            renewer.cancel()
            await store.release(lease)  # when the save did not
            metrics.ACTIVE_SESSIONS.dec()
            job.end()

    async def _renew(self, lease: Lease, store: SessionStore) -> None:
        """Keep the lock while a long job runs; if renewal fails the version fence still protects."""
        while True:
            await asyncio.sleep(store.lock_ttl_ms / 3000)
            with contextlib.suppress(StoreUnavailableError):
                await store.renew(lease)
