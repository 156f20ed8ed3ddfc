"""The model worker: one thread owns the model and schedules the engine's work in rounds.

A round is: admit new jobs; one batched commit for the sessions still reading input (a 100k-token
append advances a bounded number of segments per round, so it never freezes the streams); move
generating sessions whose input is in into the decode batch while it has room (`max_batch` rows);
one `DecodeEngine.step()` that gives every generating session its next token. The HMT arithmetic
is all in `hmt_core.engine`; this module only decides what runs when. A bad session fails only
its own request: the engine isolates rows, and a cancelled stream leaves at the next round.
Events and results go back to the event loop through the job's channel (service.job). A state
the service checked (`Job.checked`) is not checked again.

On CPU the worker thread is the only one that runs parallel torch work: it sets its own OpenMP
thread count (a per-thread setting), and `hmt-serve` keeps the event loop's thread at one. Two
threads with OpenMP teams on a 2-core machine make libgomp stop spinning between parallel
regions (more managed threads than cores), which cost ~60k context switches per 24 decode steps
of 32 rows (measured with getrusage).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import torch

from hmt_core import HMTModel, SamplingParams, SessionState
from hmt_core.engine import DecodeEngine, DecodeRow, advance_appends, begin_append
from service import metrics
from service.job import Constraint, Job, SegmentEvent, TokenEvent, deliver

log = logging.getLogger(__name__)


class ModelWorker:
    def __init__(self, model: HMTModel, max_batch: int = 16, round_token_budget: int = 2048,
                 threads: int = 0, compile: bool = False) -> None:
        self.model = model
        self.threads = threads or torch.get_num_threads()  # the worker thread's torch CPU threads
        self.max_batch = max_batch
        # while sessions are generating, appends read at most this many tokens per round
        self.commits_per_round = max(1, round_token_budget // model.hmt_config.segment_tokens)
        self.compile = compile and not model.memory.adapts  # Temp-LoRA adapters are hooks: never compiled
        if compile and not self.compile:
            log.warning("--compile ignored: %s memory decodes on the HF path", model.hmt_config.memory)
        self.engine = self._new_engine()
        self._inbox: list[Job] = []
        self._reading: list[Job] = []  # input still to commit
        self._waiting: list[Job] = []  # input in, waiting for a decode row
        self._decoding: dict[DecodeRow, Job] = {}
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

    def submit(self, state: SessionState, tokens: list[int], params: SamplingParams | None,
               constraint: Constraint | None = None, checked: bool = False) -> Job:
        """Called on the event loop; the job's events and result arrive on that loop. `constraint`
        picks the reply's tokens (service.constrained); `checked`: the caller checked the state
        against the model (`HMTModel.check_session`), so it is not again."""
        loop = asyncio.get_running_loop()
        job = Job(state, list(tokens), params, loop, asyncio.Queue(), loop.create_future(), checked,
                  constraint=constraint)
        with self._wake:
            self._inbox.append(job)
            metrics.QUEUE_DEPTH.set(self.pending)
            self._wake.notify()
        return job

    @property
    def pending(self) -> int:
        return len(self._inbox) + len(self._reading) + len(self._waiting) + len(self._decoding)

    # ----- worker thread -------------------------------------------------------------------

    def _run(self) -> None:
        torch.set_num_threads(self.threads)  # OpenMP's thread count and the FPU flags are per thread
        torch.set_flush_denormal(True)  # CPU: subnormal activations make matmuls up to 10x slower (measured)
        while True:
            with self._wake:
                while not self._inbox and self.pending == 0 and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    for job in self._all_jobs():
                        job.finish(RuntimeError("the model worker stopped"))
                    return
                inbox, self._inbox = self._inbox, []
            try:
                self._round(inbox)
            except Exception:  # never let the thread die: fail what is in flight instead
                log.exception("model worker round failed")
                for job in self._all_jobs():
                    job.finish(RuntimeError("internal model error"))
                self._reading, self._waiting, self._decoding = [], [], {}
                self.engine = self._new_engine()
            metrics.QUEUE_DEPTH.set(self.pending)

    def _new_engine(self) -> DecodeEngine:
        engine = DecodeEngine(self.model, max_rows=self.max_batch, compile=self.compile)
        if self.compile:  # every bucket now (at start, and after a failed round), so no request waits for one
            metrics.DECODE_COMPILE_SECONDS.set(engine.warm_up())
        return engine

    def _all_jobs(self) -> list[Job]:
        return self._inbox + self._reading + self._waiting + list(self._decoding.values())

    def _round(self, inbox: list[Job]) -> None:
        for job in inbox:
            try:
                job.task = begin_append(self.model, job.state, job.tokens, checked=job.checked)
            except Exception as exc:  # a bad request or state fails alone, before it joins a batch
                job.finish(exc)
                continue
            self._reading.append(job)
        self._read_input()
        self._join_decode()
        if self.engine.size:
            self._decode_step()

    def _read_input(self) -> None:
        """One segment for each of (a bounded number of) the sessions still reading input."""
        if not self._reading:
            return
        limit = self.max_batch if not self.engine.size else min(self.max_batch, self.commits_per_round)
        batch = [j for j in self._reading if not j.task.done][:limit]  # type: ignore[union-attr]
        if batch:
            start = time.perf_counter()
            advanced = advance_appends(self.model, [j.task for j in batch])  # type: ignore[misc]
            metrics.SEGMENT_SECONDS.observe(time.perf_counter() - start)
            metrics.BATCH_SIZE.observe(len(batch))
            metrics.SEGMENTS.inc(len(advanced))
            by_task = {id(j.task): j for j in batch}
            for advanced_task in advanced:
                recall = advanced_task.recalls[-1]
                metrics.RECALL_DISTANCE.observe(recall.distance)
                by_task[id(advanced_task)].emit(SegmentEvent(
                    advanced_task.segments, advanced_task.state.segments_committed,
                    advanced_task.state.tokens_seen, recall))
            # round-robin: the sessions served this round go to the back
            self._reading = [j for j in self._reading if j not in batch] + batch
        for job in list(self._reading):
            task = job.task
            assert task is not None
            if task.error is not None:
                job.finish(task.error)
            elif not task.done:
                continue
            elif job.params is None:
                job.finish(job.result(task.state))
            elif job.cancelled:  # the client left during its prompt: the prompt is applied, no reply
                job.finish(job.result(task.state, finish_reason="cancelled"))
            else:
                self._waiting.append(job)
            self._reading.remove(job)

    def _join_decode(self) -> None:
        for row, job in list(self._decoding.items()):
            if job.cancelled:
                self.engine.remove(row)
                self._finish_row(job, row, "cancelled")
        while self._waiting and self.engine.has_room:
            job = self._waiting.pop(0)
            if job.cancelled:
                job.finish(job.result(job.task.state, finish_reason="cancelled"))  # type: ignore[union-attr]
                continue
            try:
                # the state begin_append took in (and checked, or found checked), with the input read
                job.row = self.engine.add(job.task.state, job.params, checked=True)  # type: ignore[union-attr,arg-type]
            except Exception as exc:
                job.finish(exc)
                continue
            self._decoding[job.row] = job

    def _decode_step(self) -> None:
        start = time.perf_counter()
        rows = self.engine.size
        # Constrained rows sample once, in the batch, under their grammar's mask (or take the end of
        # the reply when it is complete): the joining rows are prefilled (as step() would) first, so a
        # row that fails there has left before its token is decided.
        constrained = [(row, job.constraint) for row, job in self._decoding.items() if job.constraint is not None]
        failed = self.engine.admit() if constrained else []
        forced: dict[DecodeRow, int] = {}
        masks: dict[DecodeRow, torch.Tensor] = {}
        for row, constraint in constrained:
            if row.slot >= 0 and row.error is None:
                allowed = constraint.allowed()
                if isinstance(allowed, int):
                    forced[row] = allowed
                else:
                    masks[row] = allowed
        out = self.engine.step(forced or None, masks or None)
        out.failed = failed + out.failed
        metrics.DECODE_STEP_SECONDS.observe(time.perf_counter() - start)
        metrics.DECODE_BATCH_SIZE.observe(rows)
        metrics.SEGMENTS.inc(out.commits)
        now = time.perf_counter()
        events: list[tuple[Job, TokenEvent]] = []
        finished: list[tuple[Job, DecodeRow, str]] = []
        for row, token in out.tokens:
            job = self._decoding[row]
            if job.last_token_at:
                metrics.INTER_TOKEN_SECONDS.observe(now - job.last_token_at)
            job.last_token_at = now
            metrics.TOKENS_OUT.inc()
            if job.constraint is not None:
                job.constraint.consume(token.token_id)
            events.append((job, TokenEvent(token.token_id, token.text)))
            if row.finish_reason is not None:
                finished.append((job, row, row.finish_reason))
        deliver(events)  # before the finishes: a stream's last token comes before its end
        for job, row, reason in finished:
            self._finish_row(job, row, reason)
        for row in out.failed:
            job = self._decoding.pop(row)
            job.finish(row.error)  # type: ignore[arg-type]

    def _finish_row(self, job: Job, row: DecodeRow, reason: str) -> None:
        for distance in row.commit_distances:  # windows that filled up mid-reply
            metrics.RECALL_DISTANCE.observe(distance)
        self._decoding.pop(row, None)
        job.finish(job.result(row.state, row, reason))
