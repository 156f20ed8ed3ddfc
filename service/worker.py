"""The model worker: one thread owns the model; a round-robin scheduler interleaves sessions.

Each round commits at most one segment per appending session, all of them batched into one
`HMTModel.commit_windows` forward, and then produces one token per generating session. So a
huge append advances one segment per round and never freezes another session's token stream.
Results go back to the event loop through `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from hmt_core import Generation, HMTModel, SamplingParams, SessionState
from hmt_core.session import fill_window
from service import metrics

log = logging.getLogger(__name__)


@dataclass
class SegmentEvent:
    """One segment committed for this job."""

    segments_committed: int  # by this request so far
    segments_total: int
    tokens_seen: int
    recall_distance: int


@dataclass
class TokenEvent:
    token: int
    text: str


@dataclass
class JobResult:
    state: SessionState
    segments_committed: int
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # generate: "stop", "length" or "cancelled" (client went away)


@dataclass(eq=False)  # identity matters: jobs are removed from lists; states hold tensors
class Job:
    """An append (params None) or a generate (prompt tokens first, then sampling).

    Cancelling only stops the sampling phase: accepted input is always applied in full, and the
    reply generated until the worker sees the flag stays in the state (the "all recorded" rule)."""

    state: SessionState
    tokens: list[int]
    params: SamplingParams | None
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Any]
    done: asyncio.Future[JobResult]
    cancelled: bool = False
    segments: int = 0
    generation: Generation | None = None
    started: bool = False
    last_token_at: float = 0.0

    def emit(self, event: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed at shutdown: nobody is listening
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

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


class ModelWorker:
    def __init__(self, model: HMTModel, max_batch: int = 16) -> None:
        self.model = model
        self.max_batch = max_batch
        self._inbox: list[Job] = []
        self._active: list[Job] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="hmt-model-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=10)

    def submit(self, state: SessionState, tokens: list[int], params: SamplingParams | None) -> Job:
        """Called on the event loop; the job's events and result arrive on that loop."""
        loop = asyncio.get_running_loop()
        job = Job(state, list(tokens), params, loop, asyncio.Queue(), loop.create_future())
        with self._wake:
            self._inbox.append(job)
            metrics.QUEUE_DEPTH.set(len(self._inbox) + len(self._active))
            self._wake.notify()
        return job

    # ----- worker thread -------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._inbox and not self._active and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    for job in self._inbox + self._active:
                        job.finish(RuntimeError("the model worker stopped"))
                    return
                self._active += self._inbox
                self._inbox.clear()
            try:
                self._round()
            except Exception:  # never let the thread die: fail the active jobs instead
                log.exception("model worker round failed")
                for job in self._active:
                    job.finish(RuntimeError("internal model error"))
                self._active.clear()
            metrics.QUEUE_DEPTH.set(len(self._inbox) + len(self._active))

    def _round(self) -> None:
        for job in self._active:
            if not job.started:  # admission: fill the open window, as HMTModel.append does
                job.started = True
                job.state, job.tokens = fill_window(job.state.bumped(), job.tokens, self.model.hmt_config) \
                    if job.tokens else (job.state, [])
        batch = [j for j in self._active if j.tokens][:self.max_batch]
        self._commit_round(batch)
        if len(batch) == self.max_batch:  # round-robin: others go first next time
            self._active = [j for j in self._active if j not in batch] + [j for j in batch if j in self._active]
        finished: list[Job] = []
        for job in self._active:
            if job.tokens:
                continue
            try:
                if self._advance(job):
                    finished.append(job)
            except Exception as exc:
                job.finish(exc)
                finished.append(job)
        for job in finished:
            self._active.remove(job)

    def _commit_round(self, jobs: list[Job]) -> None:
        """One segment for each appending session, in one batched forward."""
        if not jobs:
            return
        start = time.perf_counter()
        try:
            states, distances = self.model.commit_windows([j.state for j in jobs])
        except Exception as exc:
            for job in jobs:
                job.finish(exc)
                self._active.remove(job)
            return
        metrics.SEGMENT_SECONDS.observe(time.perf_counter() - start)
        metrics.BATCH_SIZE.observe(len(jobs))
        metrics.SEGMENTS.inc(len(jobs))
        for job, state, distance in zip(jobs, states, distances.tolist(), strict=True):
            metrics.RECALL_DISTANCE.observe(distance)
            job.segments += 1
            job.state, job.tokens = fill_window(state, job.tokens, self.model.hmt_config)
            job.emit(SegmentEvent(job.segments, state.segments_committed, state.tokens_seen, int(distance)))

    def _advance(self, job: Job) -> bool:
        """A job whose input is all in: finish an append, or produce one token. True when done."""
        if job.params is None:
            job.finish(JobResult(job.state, job.segments))
            return True
        if job.generation is None:
            job.generation = self.model.generate(job.state, job.params)
        gen = job.generation
        if job.cancelled:
            job.finish(JobResult(gen.state, job.segments, list(gen.tokens), gen.text, "cancelled"))
            return True
        commits_before = len(gen.commit_distances)
        token = next(gen)
        for distance in gen.commit_distances[commits_before:]:  # a window filled up mid-reply
            metrics.RECALL_DISTANCE.observe(distance)
            metrics.SEGMENTS.inc()
        now = time.perf_counter()
        if job.last_token_at:
            metrics.INTER_TOKEN_SECONDS.observe(now - job.last_token_at)
        job.last_token_at = now
        metrics.TOKENS_OUT.inc()
        job.emit(TokenEvent(token.token_id, token.text))
        if gen.finished:
            job.finish(JobResult(gen.state, job.segments, list(gen.tokens), gen.text, gen.finish_reason))
            return True
        return False
