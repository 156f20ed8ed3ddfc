"""Continuous batching in the engine: a row's tokens do not depend on who shares its batch."""

from __future__ import annotations

import random

import pytest
import torch

from hmt_core import CorruptStateError, HMTConfig, HMTModel, SamplingParams, SessionState
from hmt_core import engine as engine_module
from hmt_core.engine import DecodeEngine, DecodeRow, advance_appends, begin_append
from hmt_core.sampling import sample_tokens, seed_key
from hmt_core.temp_lora import TempLoRAConfig
from hmt_core.testing import assert_states_equal, tiny_hmt_model


def _sessions(model: HMTModel, count: int, seed: int = 0) -> list[SessionState]:
    """Sessions of varied history: empty-memory ones, many segments, windows near full and full."""
    rng = random.Random(seed)
    seg = model.hmt_config.segment_tokens
    lengths = [1, seg - 1, seg, seg + 1, 2 * seg, 3 * seg - 1, 5 * seg + 3, 7 * seg]
    states = []
    for i in range(count):
        length = lengths[i % len(lengths)] + (i // len(lengths))
        states.append(model.append(model.new_session(), [rng.randrange(model.vocab_size) for _ in range(length)]))
    return states


def _alone(model: HMTModel, state: SessionState, params: SamplingParams) -> list[int]:
    return model.generate(state, params).run().tokens


def _batched(model: HMTModel, states: list[SessionState], params: list[SamplingParams],
             max_rows: int | None = None) -> list[DecodeRow]:
    engine = DecodeEngine(model, max_rows=max_rows or len(states))
    rows = [engine.add(s, p) for s, p in zip(states, params, strict=True)]
    while engine.size:
        engine.step()
    return rows


# Memory tolerance after several commits. A commit read from the decode slot equals the canonical
# one within float rounding (tested one commit at a time below, at 1e-5); the random tiny GPT-2
# amplifies such a 2e-7 difference about 4000x through the next commit (measured), the trained
# SmolLM2 model does not (1e-5 on memories of magnitude 40 after two commits).
CHAINED_COMMIT_ATOL = {"llama": 1e-5, "gpt2": 1e-2, "opt": 1e-5}


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("batch", [2, 9, 64])
def test_greedy_rows_equal_their_solo_decoding(family: str, batch: int) -> None:
    model = tiny_hmt_model(family)
    seg = model.hmt_config.segment_tokens
    states = _sessions(model, batch)
    # different reply lengths: rows leave at different steps, and replies cross window boundaries
    params = [SamplingParams(max_tokens=1 + (i * 5) % (3 * seg), ignore_eos=True) for i in range(batch)]
    rows = _batched(model, states, params)
    for state, param, row in zip(states, params, rows, strict=True):
        assert row.tokens == _alone(model, state, param)
        assert row.finish_reason == "length"
        assert_states_equal(row.state, model.append(state, row.tokens), atol=CHAINED_COMMIT_ATOL[family])


@pytest.mark.parametrize("kind", ["rmt", "window", "temp-lora", "hmt+temp-lora"])
def test_other_memory_kinds_batch_as_they_decode_alone(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """RMT's prompt does not read the window, so every commit is read from the slot; the
    window-only kind commits without a forward; Temp-LoRA rows each read with their own adapter
    (batched multi-adapter matmuls) and commit by training it; HMT+Temp-LoRA rows recall and read
    with their adapters, and commit canonically (the adapter trains on the window). Either way a
    row's tokens and state are its own."""
    lora = TempLoRAConfig(learning_rate=3e-2) if "temp-lora" in kind else None
    model = tiny_hmt_model("llama", config=HMTConfig(segment_tokens=8, num_sensory=3, ltm_context=4,
                                                    recall_dim=16, memory=kind, temp_lora=lora))
    seg = model.hmt_config.segment_tokens
    states = _sessions(model, 9)
    params = [SamplingParams(max_tokens=1 + (i * 5) % (3 * seg), ignore_eos=True) for i in range(9)]
    canonical_commits = []
    real_commit = DecodeEngine._commit
    monkeypatch.setattr(DecodeEngine, "_commit", lambda engine, rows: (
        canonical_commits.extend(rows), real_commit(engine, rows))[1])
    rows = _batched(model, states, params)
    monkeypatch.undo()
    for state, param, row in zip(states, params, rows, strict=True):
        assert row.state.memory == kind
        assert_states_equal(row.state, model.append(state, row.tokens))
        assert row.tokens == _alone(model, state, param)
    committing = [row for state, row in zip(states, rows, strict=True)
                  if row.state.segments_committed > state.segments_committed]
    assert len(committing) > 3
    if kind == "rmt":
        assert canonical_commits == []
    else:
        assert set(canonical_commits) == set(committing)


def test_decode_steps_reuse_the_stacked_adapters_until_the_rows_change(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rows' adapters are stacked once, not on every decode step: again only when a row joins,
    leaves or commits (a new adapter); and the tokens are those of a fresh stack every step."""
    model = tiny_hmt_model("llama", config=HMTConfig(segment_tokens=8, num_sensory=3, ltm_context=4, recall_dim=16,
                                                    memory="temp-lora", temp_lora=TempLoRAConfig(learning_rate=3e-2)))
    states = [model.append(model.new_session(), [7 + i] * (8 + i)) for i in range(3)]  # windows of 8 (full), 1, 2
    # the first row commits before the first decode forward, the last one after its 6th token
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (4, 5, 12)]
    built: list[int] = []
    real = engine_module.StackedAdapters
    monkeypatch.setattr(engine_module, "StackedAdapters", lambda backbone, adapters: (
        built.append(len(adapters)), real(backbone, adapters))[1])
    rows = _batched(model, states, params)
    # 11 decode forwards: stacked for 3 rows, again for 2 (the first left), for 1 (the second left),
    # and for its new adapter after the last row's commit
    assert built == [3, 2, 1, 1]
    for state, param, row in zip(states, params, rows, strict=True):
        assert row.tokens == _alone(model, state, param)
        assert_states_equal(row.state, model.append(state, row.tokens))


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_a_commit_read_from_the_slot_equals_the_canonical_commit(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_hmt_model(family)
    seg, summary = model.hmt_config.segment_tokens, model.hmt_config.summary_tokens
    rng = random.Random(2)
    # windows that already hold the summary's tokens (the slot's prompt is the commit's), some
    # that do not (canonical commit), with and without sensory memory and long-term memory
    histories = [summary, seg - 1, seg, 2 * seg + summary, 3 * seg - 1, 1, summary - 1, 4 * seg + 1]
    states = [model.append(model.new_session(), [rng.randrange(model.vocab_size) for _ in range(n)])
              for n in histories]
    params = [SamplingParams(max_tokens=seg - len(s.window) + 1, ignore_eos=True) for s in states]  # one commit
    canonical_commits = []
    real_commit = DecodeEngine._commit
    monkeypatch.setattr(DecodeEngine, "_commit", lambda engine, rows: (
        canonical_commits.extend(rows), real_commit(engine, rows))[1])
    rows = _batched(model, states, params)
    for state, row in zip(states, rows, strict=True):
        assert row.state.segments_committed == state.segments_committed + 1
        assert_states_equal(row.state, model.append(state, row.tokens))
        appended = begin_append(model, state, row.tokens)
        advance_appends(model, [appended])
        assert row.commit_distances == appended.distances
        assert (row in canonical_commits) == (len(state.window) < summary)


def test_rows_joining_and_leaving_mid_batch_keep_their_tokens(model: HMTModel) -> None:
    seg = model.hmt_config.segment_tokens
    states = _sessions(model, 12, seed=3)
    params = [SamplingParams(max_tokens=2 * seg + i, ignore_eos=True) for i in range(12)]
    engine = DecodeEngine(model, max_rows=6)
    waiting = list(zip(states, params, strict=True))
    rows: list[DecodeRow] = []
    cancelled: DecodeRow | None = None
    steps = 0
    while waiting or engine.size:
        while waiting and engine.has_room and (steps % 3 == 0 or not engine.size):  # join every third step
            rows.append(engine.add(*waiting.pop(0)))
        engine.step()
        steps += 1
        if steps == 7 and cancelled is None:  # a client leaves mid-reply: its slot is reused
            cancelled = rows[1]
            engine.remove(cancelled)
    for state, param, row in zip(states, params, rows, strict=True):
        solo = _alone(model, state, param)
        if row is cancelled:
            assert row.tokens == solo[:len(row.tokens)] and row.finish_reason is None
        else:
            assert row.tokens == solo
        assert_states_equal(row.state, model.append(state, row.tokens))


def test_sampled_rows_follow_their_seed_whatever_the_batch(model: HMTModel) -> None:
    states = _sessions(model, 8, seed=5)
    sampled = [SamplingParams(max_tokens=20, temperature=t, top_k=k, top_p=p, seed=100 + i, ignore_eos=True)
               for i, (t, k, p) in enumerate([(0.7, 0, 1.0), (1.5, 5, 1.0), (1.0, 0, 0.8), (2.0, 3, 0.9)] * 2)]
    greedy = [SamplingParams(max_tokens=20, ignore_eos=True)] * 8
    mixed = [p for pair in zip(sampled, greedy, strict=True) for p in pair]
    rows = _batched(model, [s for s in states for _ in range(2)], mixed)
    for i, state in enumerate(states):
        assert rows[2 * i].tokens == _alone(model, state, sampled[i])
        assert rows[2 * i + 1].tokens == _alone(model, state, greedy[i])
    # a seed is a seed: other seeds give other replies, and a huge seed is fine
    assert _alone(model, states[0], sampled[0]) != _alone(model, states[0], SamplingParams(
        max_tokens=20, temperature=0.7, seed=999, ignore_eos=True))
    assert len(_alone(model, states[0], SamplingParams(max_tokens=5, temperature=1.0, seed=2**70))) == 5


def test_masked_rows_sample_once_under_their_mask_beside_free_rows(model: HMTModel) -> None:
    """A grammar's rows (`step(masks=...)`): each token is the one sampling its masked logits alone
    would give (same key and step), and the free rows beside them decode exactly as without."""
    states = _sessions(model, 4, seed=7)
    params = [SamplingParams(max_tokens=20, temperature=t, top_p=p, seed=10 + i, ignore_eos=True)
              for i, (t, p) in enumerate([(1.0, 1.0), (1.3, 0.9), (0.0, 1.0), (0.8, 1.0)])]
    free = _batched(model, states, params)
    engine = DecodeEngine(model, max_rows=4)
    rows = [engine.add(s, p) for s, p in zip(states, params, strict=True)]
    allowed = torch.zeros(model.vocab_size, dtype=torch.bool)
    allowed[3::7] = True  # a seventh of the vocabulary
    masked = {rows[0]: allowed, rows[2]: allowed}
    engine.admit()
    while engine.size:
        expected = {row: int(sample_tokens(engine.logits_of(row).masked_fill(~mask, float("-inf"))[None],
                                           [row.params], [row.key], [len(row.tokens)])[0])
                    for row, mask in masked.items() if row.slot >= 0}
        engine.step(None, {row: mask for row, mask in masked.items() if row in expected})
        for row, token in expected.items():
            assert row.tokens[-1] == token
    for row in (rows[0], rows[2]):
        assert len(row.tokens) == 20 and all(token % 7 == 3 for token in row.tokens)
    assert rows[0].tokens != free[0].tokens  # the mask mattered
    assert [rows[1].tokens, rows[3].tokens] == [free[1].tokens, free[3].tokens]


def test_vectorized_sampling_matches_each_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    params = [SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=1.0, top_k=2, seed=2)]
    draws = torch.stack([sample_tokens(logits, params, [seed_key(1), seed_key(2)], [step, step])
                         for step in range(4000)])
    expected = torch.softmax(logits[0], dim=-1)
    observed = torch.bincount(draws[:, 0], minlength=4).float() / len(draws)
    torch.testing.assert_close(observed, expected, atol=0.03, rtol=0)
    assert set(draws[:, 1].tolist()) == {0, 1}  # top-2 of equal logits: the first two only
    # a vanishing temperature is greedy, not inf - inf
    tiny = sample_tokens(logits[:1], [SamplingParams(temperature=1e-38, seed=0)], [seed_key(0)], [0])
    assert int(tiny) == 0


def test_a_bad_row_is_refused_alone(model: HMTModel) -> None:
    good = [_sessions(model, 5)[i] for i in (0, 4)]  # the second has memory to poison
    engine = DecodeEngine(model, max_rows=4)
    row = engine.add(good[0], SamplingParams(max_tokens=4, ignore_eos=True))
    poisoned = SessionState(good[1].ltm.clone().fill_(float("nan")), good[1].sensory, good[1].window,
                            good[1].segments_committed, good[1].tokens_seen, good[1].version, good[1].fingerprint)
    with pytest.raises(CorruptStateError, match="non-finite"):
        engine.add(poisoned, SamplingParams())
    outside = SessionState(good[1].ltm, good[1].sensory, (*good[1].window[:-1], model.vocab_size + 3),
                           good[1].segments_committed, good[1].tokens_seen, good[1].version, good[1].fingerprint)
    with pytest.raises(CorruptStateError, match="outside the vocabulary"):
        engine.add(outside, SamplingParams())
    while engine.size:
        engine.step()
    assert row.tokens == _alone(model, good[0], SamplingParams(max_tokens=4, ignore_eos=True))


def test_a_failing_commit_fails_only_its_own_append(model: HMTModel, monkeypatch: pytest.MonkeyPatch) -> None:
    seg = model.hmt_config.segment_tokens
    tasks = [begin_append(model, model.new_session(), list(range(i, i + 3 * seg))) for i in range(4)]
    doomed = tasks[2]
    real_commit = model.commit_windows

    def commit_failing_for_doomed(states: list[SessionState]):  # an injected fault, the model is real
        if any(s is doomed.state for s in states):
            raise RuntimeError("injected fault")
        return real_commit(states)

    monkeypatch.setattr(model, "commit_windows", commit_failing_for_doomed)
    while not all(t.done for t in tasks):
        advance_appends(model, tasks)
    assert isinstance(doomed.error, RuntimeError)
    for i, task in enumerate(tasks):
        if task is not doomed:
            assert task.error is None
            assert_states_equal(task.state, model.append(model.new_session(), list(range(i, i + 3 * seg))))


def test_a_failing_decode_forward_recovers_from_the_states(model: HMTModel, monkeypatch: pytest.MonkeyPatch) -> None:
    states = _sessions(model, 3, seed=7)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    engine = DecodeEngine(model, max_rows=3)
    rows = [engine.add(s, params) for s in states]
    engine.step()
    real = engine._decode_batch
    calls = {"n": 0}

    def flaky(batch_rows: list[DecodeRow], committing: list[DecodeRow]) -> None:  # the batched forward fails once
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected fault")
        real(batch_rows, committing)

    monkeypatch.setattr(engine, "_decode_batch", flaky)
    while engine.size:
        engine.step()
    assert calls["n"] > 2 and engine.recoveries == 1
    for state, row in zip(states, rows, strict=True):
        assert row.error is None and row.tokens == _alone(model, state, params)


@pytest.mark.slow
def test_compiled_static_shape_decoding_equals_eager(model: HMTModel) -> None:
    states = _sessions(model, 5, seed=11)
    params = [SamplingParams(max_tokens=3 + 4 * i, ignore_eos=True) for i in range(5)]
    engine = DecodeEngine(model, max_rows=8, compile=True)
    rows = [engine.add(s, p) for s, p in zip(states, params, strict=True)]
    while engine.size:  # 5 rows, then fewer: buckets of 8, 4, 2 and 1 rows
        engine.step()
    assert engine.recoveries == 0  # every step ran the compiled forward
    for state, param, row in zip(states, params, rows, strict=True):
        assert row.error is None
        assert row.tokens == _alone(model, state, param)


def test_bfloat16_rows_equal_their_solo_decoding() -> None:
    model = tiny_hmt_model("llama").to(torch.bfloat16)  # the GPU dtype runs on the CPU too
    states = _sessions(model, 6)
    params = [SamplingParams(max_tokens=20, ignore_eos=True)] * 6
    for state, param, row in zip(states, params, _batched(model, states, params), strict=True):
        assert row.error is None and row.tokens == _alone(model, state, param)


@pytest.mark.parametrize("kv_heads", [2, 6])  # grouped-query and multi-head
@pytest.mark.parametrize("boolean", [False, True])
def test_decode_attention_equals_sdpa(kv_heads: int, boolean: bool) -> None:
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from hmt_core.engine import decode_attention

    torch.manual_seed(0)
    module = SimpleNamespace(num_key_value_groups=6 // kv_heads, is_causal=True)
    keys, values = torch.randn(5, kv_heads, 40, 16), torch.randn(5, kv_heads, 40, 16)
    visible = torch.arange(40)[None, None, None, :] <= torch.randint(0, 40, (5, 1, 1, 1))
    mask = visible if boolean else torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
    query = torch.randn(5, 1, 6, 16).transpose(1, 2)  # one token, laid out as the backbones make it
    ours, _ = decode_attention(module, query, keys, values, mask, scaling=0.3)
    torch.testing.assert_close(ours, sdpa_attention_forward(module, query, keys, values, mask, scaling=0.3)[0])
    longer = torch.randn(5, 6, 3, 16)  # prefill and commits: sdpa itself
    assert torch.equal(decode_attention(module, longer, keys, values, mask[..., :1, :])[0],
                       sdpa_attention_forward(module, longer, keys, values, mask[..., :1, :])[0])


def test_decode_forward_runs_decode_attention_and_restores_sdpa(model: HMTModel,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AttentionInterface

    from hmt_core import engine as engine_module

    queries: list[int] = []

    def spy(module, query, *args, **kwargs):  # type: ignore[no-untyped-def]
        queries.append(query.shape[2])
        return engine_module.decode_attention(module, query, *args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, engine_module.DECODE_ATTENTION, spy)
    config = model.base_model.config
    assert config._attn_implementation == "sdpa"
    engine = DecodeEngine(model, max_rows=3, lean=False)  # the HF forward (the lean step has its own attention)
    rows = [engine.add(s, SamplingParams(max_tokens=4, ignore_eos=True)) for s in _sessions(model, 3)]
    while engine.size:
        engine.step()
    assert all(r.error is None for r in rows)
    assert queries and set(queries) == {1}  # decode forwards only, prefills stay on sdpa
    assert config._attn_implementation == "sdpa"
