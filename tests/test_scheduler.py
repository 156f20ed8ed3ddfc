"""The service's scheduler in-process (no HTTP): batching, fairness, bounds, cancellation, isolation."""

from __future__ import annotations

import asyncio

import pytest

from hmt_core import CorruptStateError, HMTModel, SamplingParams, SessionState
from hmt_core.testing import assert_states_equal
from service.job import Job, JobResult, SegmentEvent, TokenEvent
from service.worker import ModelWorker


def _record_batch_widths(worker: ModelWorker) -> list[int]:
    """Rows in each decode step of this worker (the global histogram also sees other tests' workers)."""
    widths: list[int] = []
    step = worker.engine.step

    def counted_step(*args, **kwargs):  # type: ignore[no-untyped-def]
        widths.append(worker.engine.size)
        return step(*args, **kwargs)

    worker.engine.step = counted_step  # type: ignore[method-assign]
    return widths


async def _drain(job: Job) -> tuple[JobResult, list[object]]:
    result = await job.done
    events = []
    while not job.events.empty():
        events.append(job.events.get_nowait())
    return result, events


def _run(worker: ModelWorker, coroutine_factory):  # type: ignore[no-untyped-def]
    async def main():  # type: ignore[no-untyped-def]
        worker.start()
        try:
            return await coroutine_factory()
        finally:
            worker.stop()

    return asyncio.run(main())


def _prompted(model: HMTModel, i: int) -> SessionState:
    seg = model.hmt_config.segment_tokens
    return model.append(model.new_session(), [(7 * i + j) % model.vocab_size for j in range(1 + (5 * i) % (3 * seg))])


def test_concurrent_streams_share_decode_steps_and_keep_their_tokens(model: HMTModel) -> None:
    worker = ModelWorker(model, max_batch=8)
    params = [SamplingParams(max_tokens=20, ignore_eos=True),
              SamplingParams(max_tokens=20, temperature=1.2, top_p=0.9, seed=4, ignore_eos=True)] * 4
    states = [_prompted(model, i) for i in range(8)]
    widths = _record_batch_widths(worker)

    async def scenario():  # type: ignore[no-untyped-def]
        jobs = [worker.submit(s, [3, 4], p) for s, p in zip(states, params, strict=True)]
        return await asyncio.gather(*(_drain(job) for job in jobs))

    results = _run(worker, scenario)
    assert max(widths) > 4  # steps carried more than 4 rows
    for state, param, (result, events) in zip(states, params, results, strict=True):
        alone = model.generate(model.append(state, [3, 4]), param).run()
        assert result.tokens == alone.tokens
        assert [e.token for e in events if isinstance(e, TokenEvent)] == alone.tokens
        assert_states_equal(result.state, alone.state)
        assert result.finish_reason == "length"


def test_a_long_append_does_not_freeze_a_running_stream(model: HMTModel) -> None:
    seg = model.hmt_config.segment_tokens
    worker = ModelWorker(model, max_batch=4)
    order: list[str] = []

    async def scenario():  # type: ignore[no-untyped-def]
        stream = worker.submit(_prompted(model, 1), [5], SamplingParams(max_tokens=15, ignore_eos=True))
        append = worker.submit(model.new_session(), [i % model.vocab_size for i in range(80 * seg)], None)
        stream.done.add_done_callback(lambda _: order.append("stream"))
        append.done.add_done_callback(lambda _: order.append("append"))
        return await _drain(stream), await _drain(append)

    (stream_result, _), (append_result, append_events) = _run(worker, scenario)
    assert order == ["stream", "append"]  # 15 tokens came out while 80 segments were read
    assert len(stream_result.tokens) == 15
    assert sum(isinstance(e, SegmentEvent) for e in append_events) == 79  # the last window stays open
    assert_states_equal(append_result.state, model.append(model.new_session(),
                                                          [i % model.vocab_size for i in range(80 * seg)]))


def test_max_batch_bounds_the_decode_batch(model: HMTModel) -> None:
    worker = ModelWorker(model, max_batch=2)
    widths = _record_batch_widths(worker)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    states = [_prompted(model, i) for i in range(5)]  # before the worker runs: one thread uses the model at a time

    async def scenario():  # type: ignore[no-untyped-def]
        jobs = [worker.submit(state, [], params) for state in states]
        return await asyncio.gather(*(_drain(job) for job in jobs))

    results = _run(worker, scenario)
    assert max(widths) == 2
    for state, (result, _) in zip(states, results, strict=True):
        assert result.tokens == model.generate(state, params).run().tokens


def test_a_cancelled_stream_leaves_and_keeps_what_it_said(model: HMTModel) -> None:
    worker = ModelWorker(model, max_batch=4)
    params = SamplingParams(max_tokens=200, ignore_eos=True)
    first, second = _prompted(model, 2), _prompted(model, 3)  # before the worker runs: one model thread

    async def scenario():  # type: ignore[no-untyped-def]
        leaving = worker.submit(first, [], params)
        staying = worker.submit(second, [], SamplingParams(max_tokens=30, ignore_eos=True))
        await leaving.events.get()  # the first token arrived: the client goes away
        leaving.cancelled = True
        return await _drain(leaving), await _drain(staying)

    (left, _), (stayed, _) = _run(worker, scenario)
    assert left.finish_reason == "cancelled" and 1 <= len(left.tokens) < 200
    assert_states_equal(left.state, model.append(first, left.tokens))
    assert stayed.tokens == model.generate(second, SamplingParams(max_tokens=30, ignore_eos=True)
                                           ).run().tokens


def test_a_generate_cancelled_before_it_decodes_never_takes_a_row(model: HMTModel) -> None:
    worker = ModelWorker(model, max_batch=4)
    added: list[SessionState] = []
    real_add = worker.engine.add
    worker.engine.add = lambda state, params: (added.append(state), real_add(state, params))[1]  # type: ignore[method-assign]
    prompt = list(range(3 * model.hmt_config.segment_tokens))

    async def scenario():  # type: ignore[no-untyped-def]
        job = worker.submit(_prompted(model, 1), prompt, SamplingParams(max_tokens=50, ignore_eos=True))
        job.cancelled = True  # the client left before its prompt was read
        return await _drain(job)

    result, events = _run(worker, scenario)
    assert added == []  # no prefill, no slot
    assert result.finish_reason == "cancelled" and result.tokens == []
    assert not any(isinstance(e, TokenEvent) for e in events)
    assert_states_equal(result.state, model.append(_prompted(model, 1), prompt))  # accepted input is applied


def test_a_bad_session_fails_only_its_own_request(model: HMTModel) -> None:
    worker = ModelWorker(model, max_batch=4)
    good = _prompted(model, 4)
    source = model.append(model.new_session(), list(range(3 * model.hmt_config.segment_tokens)))
    poisoned = SessionState(source.ltm.clone().fill_(float("inf")), source.sensory, source.window,
                            source.segments_committed, source.tokens_seen, source.version, source.fingerprint)
    params = SamplingParams(max_tokens=10, ignore_eos=True)

    async def scenario():  # type: ignore[no-untyped-def]
        jobs = [worker.submit(good, [1, 2], params), worker.submit(poisoned, [1, 2], params),
                worker.submit(poisoned, list(range(40)), None), worker.submit(good, list(range(40)), None)]
        return await asyncio.gather(*(job.done for job in jobs), return_exceptions=True)

    ok_stream, bad_stream, bad_append, ok_append = _run(worker, scenario)
    assert isinstance(bad_stream, CorruptStateError) and isinstance(bad_append, CorruptStateError)
    assert ok_stream.tokens == model.generate(model.append(good, [1, 2]), params).run().tokens
    assert_states_equal(ok_append.state, model.append(good, list(range(40))))


@pytest.mark.parametrize("max_batch", [1, 3])
def test_appends_are_batched_and_equal_sequential_ones(model: HMTModel, max_batch: int) -> None:
    seg = model.hmt_config.segment_tokens
    worker = ModelWorker(model, max_batch=max_batch)
    inputs = [[(i * 11 + j) % model.vocab_size for j in range((i + 2) * seg + i)] for i in range(5)]

    async def scenario():  # type: ignore[no-untyped-def]
        jobs = [worker.submit(model.new_session(), tokens, None) for tokens in inputs]
        return await asyncio.gather(*(job.done for job in jobs))

    for tokens, result in zip(inputs, _run(worker, scenario), strict=True):
        assert_states_equal(result.state, model.append(model.new_session(), tokens))
