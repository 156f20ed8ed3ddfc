"""Settings: HMT_* environment variables, overridden by flags."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service import settings as settings_module
from service.settings import parse_args


def test_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HMT_PORT", "9001")
    monkeypatch.setenv("HMT_API_KEYS", "a, b,,")
    monkeypatch.setenv("HMT_SESSION_TTL_S", "60")
    settings = parse_args(["--model", "some/dir", "--port", "9002", "--redis-url", "redis://x:1/0"])
    assert settings.port == 9002 and settings.model == "some/dir" and settings.redis_url == "redis://x:1/0"
    assert settings.keys == ["a", "b"] and settings.session_ttl_s == 60
    assert parse_args([]).port == 9001


def test_invalid_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError):
        parse_args(["--dtype", "int3"])
    monkeypatch.setenv("HMT_MAX_BATCH", "0")
    with pytest.raises(ValueError):
        parse_args([])


def test_model_path_needs_a_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HMT_MODEL", raising=False)
    monkeypatch.setattr(settings_module, "DEFAULT_MODEL_DIRS", (Path("models/hmt-smollm2"), tmp_path / "shipped"))
    with pytest.raises(SystemExit, match="no --model given"):
        parse_args([]).model_path()
    (tmp_path / "shipped").mkdir()
    (tmp_path / "shipped" / "hmt_config.json").write_text("{}")
    assert parse_args([]).model_path() == str(tmp_path / "shipped")
    assert parse_args([]).model_name() == "shipped"  # no card: the directory's name
    (tmp_path / "models" / "hmt-smollm2").mkdir(parents=True)
    (tmp_path / "models" / "hmt-smollm2" / "hmt_config.json").write_text("{}")
    assert parse_args([]).model_path() == "models/hmt-smollm2"  # the working directory's wins
    (tmp_path / "models" / "hmt-smollm2" / "model_card.json").write_text('{"name": "hmt-smollm2-135m"}')
    assert parse_args([]).model_name() == "hmt-smollm2-135m"
    assert parse_args(["--served-model-name", "mine"]).model_name() == "mine"


def test_model_load_failure_is_a_clear_exit_from_the_passing_thread(tmp_path: Path) -> None:
    """The model loads on a passing thread (so its OpenMP team ends with it); a broken model
    directory must still end hmt-serve with the message, not a thread traceback."""
    from service.main import in_passing_thread, load_model

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "hmt_config.json").write_text("{not json")
    settings = parse_args(["--model", str(broken), "--threads", "1"])
    with pytest.raises(SystemExit, match="cannot load model"):
        in_passing_thread(lambda: load_model(settings))
    assert in_passing_thread(lambda: 41 + 1) == 42


def test_the_worker_thread_runs_torch_with_its_own_thread_count() -> None:
    """OpenMP thread counts are per thread: the model worker sets its own, and the caller's
    (the event loop's, kept at one by hmt-serve) is left as it was."""
    import asyncio
    import threading

    import torch

    from hmt_core.testing import tiny_hmt_model
    from service.worker import ModelWorker

    before = torch.get_num_threads()
    unusual = max(before, os.cpu_count() or 1) + 1  # neither the caller's count nor a new thread's default
    worker = ModelWorker(tiny_hmt_model(), max_batch=2, threads=unusual)
    seen: list[int] = []
    original = worker._round

    def spy(inbox: list) -> None:  # records the count the worker thread runs the model with
        seen.append(torch.get_num_threads())
        original(inbox)

    worker._round = spy  # type: ignore[method-assign]
    worker.start()
    try:
        async def one_append() -> None:
            job = worker.submit(worker.model.new_session(), [1, 2, 3], None)
            await job.done

        asyncio.run(one_append())
    finally:
        worker.stop()
    assert seen and set(seen) == {worker.threads}
    assert torch.get_num_threads() == before and threading.current_thread() is threading.main_thread()


def test_compile_is_off_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """--compile (HMT_COMPILE): the compiled decode step costs minutes at start on a CPU (README)."""
    assert parse_args([]).compile is False
    assert parse_args(["--compile", "true"]).compile is True
    monkeypatch.setenv("HMT_COMPILE", "1")
    assert parse_args([]).compile is True
    with pytest.raises(ValueError):
        parse_args(["--compile", "maybe"])
