"""Settings: HMT_* environment variables, overridden by flags."""

from __future__ import annotations

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
