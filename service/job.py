"""A job and its channel from the model worker to the HTTP side: one request's work on one session.

The worker (service.worker) runs a job on its own thread and reports through it: `emit` a typed
event (a committed segment, a generated token), `finish` with the result. The session service
(service.session_service) saves the result, then `end`s the job, after which no event follows.
Every API reads a job the same way, through `Job.stream` (or `Job.stream_tokens`, its tokens
only), which ends when the job ends; the saved result is what the saver task returns.

Order: the worker hands a step's events to the event loop before it settles the result
(`loop.call_soon_threadsafe` runs callbacks in order), so a stream's last token always comes
before its end, and the end always after the save.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from hmt_core import SamplingParams, SegmentRecall, SessionState
from service import metrics

if TYPE_CHECKING:
    import torch

    from hmt_core.engine import AppendTask, DecodeRow


@dataclass(frozen=True)
class SegmentEvent:
    """One segment committed for this job."""

    segments_committed: int  # by this request so far
    segments_total: int
    tokens_seen: int
    recall: SegmentRecall


@dataclass(frozen=True)
class TokenEvent:
    """One generated token, and the text it releases (stop strings are held back until decided)."""

    token: int
    text: str


@dataclass(frozen=True)
class JobEnded:
    """The job's last event: its result is saved (or failed), nothing follows."""


JobEvent = SegmentEvent | TokenEvent | JobEnded
ENDED = JobEnded()


@dataclass
class JobResult:
    state: SessionState
    segments_committed: int
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # generate: "stop", "length" or "cancelled" (client went away)
    recalls: list[SegmentRecall] = field(default_factory=list)  # of every segment the job committed, in order


def deliver(events: Sequence[tuple[Job, JobEvent]]) -> None:
    """Hand a step's events to their event loops with one wake-up per loop, not one per token:
    each wake-up makes the loop thread take the GIL from the model thread."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, JobEvent]]] = {}
    for job, event in events:
        by_loop.setdefault(job.loop, []).append((job, event))
    for loop, batch in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop closed at shutdown: nobody is listening
            loop.call_soon_threadsafe(_put_events, batch)


def _put_events(batch: list[tuple[Job, JobEvent]]) -> None:
    for job, event in batch:
        job.events.put_nowait(event)


class Constraint(Protocol):
    """Restricts a reply's tokens (service.constrained.JsonConstraint); called on the worker thread."""

    def allowed(self) -> torch.Tensor | int:
        """The tokens allowed next, as a bool mask [V] the engine samples the row under; or the one
        token to take (the end of the reply, once the constraint is complete or broken)."""
        ...

    def consume(self, token: int) -> None: ...


@dataclass(eq=False)  # identity matters: jobs are kept in lists and dicts
class Job:
    """An append (params None) or a generate (prompt tokens first, then sampling).

    `checked`: the state was checked against the model where it entered the service (read from the
    store, imported, or made by the model), so the worker does not check it again.
    Cancelling only stops the sampling phase: accepted input is always applied in full, and the
    reply generated until the worker sees the flag stays in the state (the "all recorded" rule)."""

    state: SessionState
    tokens: list[int]
    params: SamplingParams | None
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[JobEvent]  # filled by the worker; read with `stream`
    done: asyncio.Future[JobResult]  # the worker's result (not yet saved)
    checked: bool = False
    cancelled: bool = False
    task: AppendTask | None = None  # reading its input
    row: DecodeRow | None = None  # generating
    last_token_at: float = 0.0
    constraint: Constraint | None = None  # picks each token of the reply (service.constrained)

    # ----- the worker's side (any thread) -------------------------------------------------------

    def emit(self, event: SegmentEvent | TokenEvent) -> None:
        deliver([(self, event)])

    def finish(self, result: JobResult | BaseException) -> None:
        def settle() -> None:
            if self.done.done():
                return
            if isinstance(result, BaseException):
                self.done.set_exception(result)
            else:
                self.done.set_result(result)

        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(settle)

    @property
    def segments(self) -> int:
        return self.task.segments if self.task is not None else 0

    def result(self, state: SessionState, row: DecodeRow | None = None, finish_reason: str | None = None) -> JobResult:
        """The job's result: its input's commits, then (with `row`) the reply's."""
        recalls = list(self.task.recalls) if self.task is not None else []
        if row is None:
            return JobResult(state, self.segments, finish_reason=finish_reason, recalls=recalls)
        return JobResult(state, self.segments, list(row.tokens), row.text.released, finish_reason,
                         recalls + row.commit_recalls)

    # ----- the HTTP side (the event loop) ------------------------------------------------------

    def end(self) -> None:
        """After the result is saved (or failed): the readers' streams end."""
        self.events.put_nowait(ENDED)

    async def stream(self, started: float | None = None) -> AsyncIterator[SegmentEvent | TokenEvent]:
        """The job's events as they come, until it ends. `started` (perf_counter at the request's
        start) records the time to the first token."""
        while not isinstance(event := await self.events.get(), JobEnded):
            if started is not None and isinstance(event, TokenEvent):
                metrics.TTFT_SECONDS.observe(time.perf_counter() - started)
                started = None
            yield event

    async def stream_tokens(self, started: float | None = None) -> AsyncIterator[TokenEvent]:
        """The job's tokens as they come, until it ends (its segments pass by unread)."""
        async for event in self.stream(started):
            if isinstance(event, TokenEvent):
                yield event
